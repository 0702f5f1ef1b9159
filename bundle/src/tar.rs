//! The small, strict subset of ustar that bundles use: regular files with short names.
//!
//! Our own reader rather than the `tar` crate because verification must stream: the image
//! member is handed out as a plain `Read` that owns the underlying stream, and anything a bundle
//! never contains (links, devices, long-name or pax extensions) is refused outright.

use std::io::{self, Read};

use crate::BundleError;

pub const BLOCK: usize = 512;

/// One member header, as far as bundles care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub name: String,
    pub size: u64,
}

/// Reads the next header. `Ok(None)` is the end-of-archive marker (a zero block) or a clean end
/// of the stream.
pub fn read_header<R: Read>(reader: &mut R) -> Result<Option<Header>, BundleError> {
    let mut block = [0u8; BLOCK];
    let got = read_full(reader, &mut block)?;
    if got == 0 || (got == BLOCK && block.iter().all(|&b| b == 0)) {
        return Ok(None);
    }
    if got < BLOCK {
        return Err(BundleError::Archive(format!(
            "stream ends inside a member header ({got} of {BLOCK} bytes)"
        )));
    }
    parse_header(&block).map(Some)
}

pub fn parse_header(block: &[u8; BLOCK]) -> Result<Header, BundleError> {
    let stored = parse_octal(&block[148..156])
        .ok_or_else(|| BundleError::Archive("header checksum field is not octal".into()))?;
    let computed: u64 = block
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                32
            } else {
                b as u64
            }
        })
        .sum();
    if stored != computed {
        return Err(BundleError::Archive(format!(
            "header checksum is {stored}, the header sums to {computed}: not a tar archive or corrupted"
        )));
    }
    if &block[257..262] != b"ustar" {
        return Err(BundleError::Archive("header is not ustar".into()));
    }
    let name = cstr(&block[0..100]);
    let prefix = cstr(&block[345..500]);
    let name = if prefix.is_empty() {
        name
    } else {
        format!("{prefix}/{name}")
    };
    let typeflag = block[156];
    if typeflag != b'0' && typeflag != 0 {
        return Err(BundleError::Archive(format!(
            "member {name:?} has type {:?}; bundles hold regular files only",
            typeflag as char
        )));
    }
    let size = parse_size(&block[124..136])
        .ok_or_else(|| BundleError::Archive(format!("member {name:?} has an unreadable size")))?;
    Ok(Header { name, size })
}

/// Writes a ustar header for a regular file. Sizes of 8 GiB and more use the GNU base-256 form.
#[cfg(any(feature = "create", test))]
pub fn write_header<W: io::Write>(writer: &mut W, name: &str, size: u64) -> io::Result<()> {
    assert!(name.len() <= 100, "bundle member names are short");
    let mut block = [0u8; BLOCK];
    block[..name.len()].copy_from_slice(name.as_bytes());
    block[100..108].copy_from_slice(b"0000644\0");
    block[108..116].copy_from_slice(b"0000000\0");
    block[116..124].copy_from_slice(b"0000000\0");
    if size < 0o77777777777 {
        block[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    } else {
        block[124] = 0x80;
        block[128..136].copy_from_slice(&size.to_be_bytes());
    }
    block[136..148].copy_from_slice(b"00000000000\0");
    block[156] = b'0';
    block[257..263].copy_from_slice(b"ustar\0");
    block[263..265].copy_from_slice(b"00");
    block[148..156].copy_from_slice(b"        ");
    let sum: u64 = block.iter().map(|&b| b as u64).sum();
    block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    writer.write_all(&block)
}

/// Zero bytes that pad a member of `size` bytes to a whole block.
pub fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

/// Reads until `buf` is full or the stream ends; returns how much was read.
pub fn read_full<R: Read>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

fn cstr(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

fn parse_octal(field: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(field).ok()?;
    let digits = text.trim_matches(|c: char| c == '\0' || c == ' ');
    if digits.is_empty() {
        return Some(0);
    }
    u64::from_str_radix(digits, 8).ok()
}

fn parse_size(field: &[u8]) -> Option<u64> {
    if field[0] & 0x80 != 0 {
        // GNU base-256: the remaining bits are a big-endian number.
        if field[0] != 0x80 || field[1..4].iter().any(|&b| b != 0) {
            return None;
        }
        return Some(u64::from_be_bytes(field[4..12].try_into().ok()?));
    }
    parse_octal(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_round_trip_small_and_huge_sizes() {
        for size in [0u64, 1, 511, 512, 8 << 30, u64::MAX >> 1] {
            let mut out = Vec::new();
            write_header(&mut out, "rootfs.img", size).unwrap();
            let header = read_header(&mut out.as_slice()).unwrap().unwrap();
            assert_eq!(
                header,
                Header {
                    name: "rootfs.img".into(),
                    size
                }
            );
        }
    }

    #[test]
    fn our_headers_are_read_by_the_tar_crate() {
        let mut out = Vec::new();
        write_header(&mut out, "a.bin", 3).unwrap();
        out.extend_from_slice(b"abc");
        out.resize(out.len() + padding(3) as usize + 2 * BLOCK, 0);
        let mut archive = ::tar::Archive::new(out.as_slice());
        let mut entries = archive.entries().unwrap();
        let mut entry = entries.next().unwrap().unwrap();
        assert_eq!(entry.path().unwrap().to_str(), Some("a.bin"));
        let mut body = String::new();
        entry.read_to_string(&mut body).unwrap();
        assert_eq!(body, "abc");
    }

    #[test]
    fn a_flipped_byte_fails_the_checksum() {
        let mut out = Vec::new();
        write_header(&mut out, "a.bin", 3).unwrap();
        out[10] ^= 1;
        let err = read_header(&mut out.as_slice()).unwrap_err();
        assert!(err.to_string().contains("checksum"), "{err}");
    }

    #[test]
    fn links_are_refused() {
        let mut out = Vec::new();
        write_header(&mut out, "evil", 0).unwrap();
        out[156] = b'2';
        out[148..156].copy_from_slice(b"        ");
        let sum: u64 = out.iter().map(|&b| b as u64).sum();
        out[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let err = read_header(&mut out.as_slice()).unwrap_err();
        assert!(err.to_string().contains("regular files only"), "{err}");
    }
}
