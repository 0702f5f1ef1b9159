//! Recognising what the artifact is (raw image, gzip, zstd, xz, tar, or a tar in one of the
//! three compressions) from its first bytes,
//! without consuming them, and mapping decoder errors to typed errors.

use std::io::{self, Chain, Cursor, Read};

use super::InstallError;

/// How many bytes are looked at to decide: one tar header block.
pub const SNIFF_LEN: usize = 512;

/// What the image is wrapped in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Raw,
    Gzip,
    Zstd,
    Xz,
    Tar,
    TarGzip,
    TarZstd,
    TarXz,
    /// A chunked (format 2 or 3) bundle's image: one zstd frame per chunk.
    ZstdChunks,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Gzip => "gzip",
            Format::Zstd => "zstd",
            Format::Xz => "xz",
            Format::Tar => "tar",
            Format::TarGzip => "tar.gz",
            Format::TarZstd => "tar.zst",
            Format::TarXz => "tar.xz",
            Format::ZstdChunks => "zstd-chunks",
        }
    }

    /// The compression this artifact's first bytes show, if any.
    pub fn compression_of(head: &[u8]) -> Option<Format> {
        if is_gzip(head) {
            Some(Format::Gzip)
        } else if super::compress::is_zstd(head) {
            Some(Format::Zstd)
        } else if super::compress::is_xz(head) {
            Some(Format::Xz)
        } else {
            None
        }
    }

    /// The format of a tar inside this compression.
    pub fn with_tar(self) -> Format {
        match self {
            Format::Gzip => Format::TarGzip,
            Format::Zstd => Format::TarZstd,
            Format::Xz => Format::TarXz,
            other => other,
        }
    }
}

/// gzip magic and the deflate method byte (RFC 1952).
pub fn is_gzip(head: &[u8]) -> bool {
    head.len() >= 3 && head[0] == 0x1f && head[1] == 0x8b && head[2] == 8
}

/// A POSIX/GNU tar header: "ustar" magic and a valid header checksum.
pub fn is_tar(head: &[u8]) -> bool {
    if head.len() < 512 || &head[257..262] != b"ustar" {
        return false;
    }
    let field = &head[148..156];
    let digits: String = field
        .iter()
        .take_while(|&&b| b != 0 && b != b' ')
        .skip_while(|&&b| b == b' ')
        .map(|&b| b as char)
        .collect();
    let Ok(stored) = u32::from_str_radix(digits.trim(), 8) else {
        return false;
    };
    let sum: u32 = head[..512]
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (148..156).contains(&i) {
                u32::from(b' ')
            } else {
                u32::from(b)
            }
        })
        .sum();
    sum == stored
}

/// A reader whose first bytes were looked at and are given back first.
pub type Sniffed<R> = Chain<Cursor<Vec<u8>>, R>;

/// Read up to `SNIFF_LEN` bytes (fewer only at end of stream) and return them with a reader
/// that yields them again followed by the rest.
pub fn sniff<R: Read>(mut reader: R) -> io::Result<(Vec<u8>, Sniffed<R>)> {
    let mut head = vec![0u8; SNIFF_LEN];
    let got = bootctl::fsutil::read_full(&mut reader, &mut head)?;
    head.truncate(got);
    Ok((head.clone(), Cursor::new(head).chain(reader)))
}

/// Marks an I/O error that only says "the download side stopped" (its own error says why).
#[derive(Debug)]
pub struct DownloadAborted;

impl std::fmt::Display for DownloadAborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("download aborted")
    }
}

impl std::error::Error for DownloadAborted {}

/// Map an error from reading the artifact (possibly through decoders) to a typed error.
pub fn read_error(e: io::Error, format: Format, artifact_offset: u64) -> InstallError {
    if e.get_ref()
        .is_some_and(|inner| inner.is::<DownloadAborted>())
    {
        return InstallError::Aborted;
    }
    if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<ArchiveRule>()) {
        return InstallError::ArchiveRejected(inner.0.clone());
    }
    if let Some(bundle) = super::bundle::bundle_error_in(&e) {
        return bundle;
    }
    InstallError::Decode {
        format: format.name(),
        offset: artifact_offset,
        source: e,
    }
}

/// An archive rule broken while reading (carried through `io::Error`).
#[derive(Debug)]
pub struct ArchiveRule(pub String);

impl std::fmt::Display for ArchiveRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ArchiveRule {}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar_with(name: &str, data: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
        b.into_inner().unwrap()
    }

    #[test]
    fn recognises_formats() {
        assert!(is_gzip(&[0x1f, 0x8b, 8, 0]));
        assert!(!is_gzip(&[0x1f, 0x8b]));
        let t = tar_with("image.ext4", b"hello");
        assert!(is_tar(&t));
        let mut broken = t.clone();
        broken[0] ^= 1;
        assert!(!is_tar(&broken), "checksum must be checked");
        assert!(!is_tar(&[0u8; 512]));
    }

    #[test]
    fn sniff_gives_bytes_back() {
        let data: Vec<u8> = (0..2000u32).map(|i| i as u8).collect();
        let (head, mut r) = sniff(&data[..]).unwrap();
        assert_eq!(head, &data[..512]);
        let mut all = Vec::new();
        r.read_to_end(&mut all).unwrap();
        assert_eq!(all, data);
        let (head, _) = sniff(&b"ab"[..]).unwrap();
        assert_eq!(head, b"ab");
    }
}
