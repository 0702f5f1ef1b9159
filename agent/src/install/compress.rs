//! Decoders for the compressions an image may be shipped in besides gzip: zstd (the C
//! library's decoder, which chunked bundles use too; [`super::unzstd`] follows it for resume
//! points) and the limits and checks shared with the xz decoder ([`super::unxz`], lzma-rust2
//! underneath, pure Rust; BENCHMARKS.md has the sizes and speeds).

use std::io::{self, BufRead, BufReader, Read};

use ddi_bundle::chunked::{error_code, zstd_error};
use zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode;
use zstd::zstd_safe::{DCtx, DParameter, InBuffer, OutBuffer};

/// zstd magic number (RFC 8878), little-endian.
pub fn is_zstd(head: &[u8]) -> bool {
    head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd])
}

/// xz stream header magic.
pub fn is_xz(head: &[u8]) -> bool {
    head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0])
}

/// Decodes a zstd stream of one or more frames (concatenated frames decode to the
/// concatenation of their contents, RFC 8878 section 3.1; skippable frames are skipped), so
/// that multi-threaded and chunked compressors' output streams like a single frame. Every
/// frame's header is checked against [`MAX_ZSTD_WINDOW`] before the decoder sees it, and a
/// frame's content checksum, when it has one, is checked at its end.
pub struct ZstdReader<R: Read> {
    source: BufReader<R>,
    /// The C library's streaming decoder: it holds the frame's window (plus two blocks) and
    /// the compressed block being read (up to 128 KiB).
    decoder: DCtx<'static>,
    /// A frame is being decoded.
    in_frame: bool,
}

/// The compressed side's buffer: the decoder gathers a block that is not whole in it into its
/// own input buffer, so this one only has to keep the reads from the source few.
const SOURCE_BUFFER: usize = 16 * 1024;

impl<R: Read> ZstdReader<R> {
    pub fn new(source: R) -> Self {
        let mut decoder = DCtx::create();
        // The decoder's own limit, above ours (which is checked on every frame header first):
        // a frame it would not take is refused with our message, not its own.
        decoder
            .set_parameter(DParameter::WindowLogMax(MAX_ZSTD_WINDOW_LOG))
            .expect("a valid window log");
        ZstdReader {
            source: BufReader::with_capacity(SOURCE_BUFFER, source),
            decoder,
            in_frame: false,
        }
    }

    /// Start the next frame (see [`start_frame`]). False at the clean end of the stream.
    fn next_frame(&mut self) -> io::Result<bool> {
        Ok(start_frame(&mut self.source, &mut self.decoder)?.is_some())
    }
}

/// The largest LZMA2 dictionary an xz image may ask for: `xz -9`'s (the decoder allocates the
/// whole dictionary before the first byte, and a hostile header may ask for 4 GiB).
pub const MAX_XZ_DICTIONARY: u64 = 64 << 20;

/// What a block header says (see [`check_block_header`]): the sizes it declares (each
/// optional; its compressed data's, LZMA2 chunks with the end marker, and its output's), the
/// LZMA2 dictionary it asks for and the filters before LZMA2, first (outermost) first.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct DeclaredSizes {
    pub compressed: Option<u64>,
    pub uncompressed: Option<u64>,
    pub dictionary: u64,
    pub filters: [Option<XzFilter>; 3],
}

/// A filter before LZMA2 in an xz block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum XzFilter {
    /// Delta, with its distance (1-256).
    Delta(usize),
    /// A branch converter: its filter ID (0x04-0x0b) and start offset.
    Bcj(u8, u32),
}

/// Check a block header (`header`, from its size byte to its CRC) and return what it says:
/// no reserved flag bits set, known filters (delta, the branch converters, LZMA2)
/// with valid properties, LZMA2 last and only there, zero padding, an LZMA2 dictionary at most
/// [`MAX_XZ_DICTIONARY`], its CRC32, as liblzma checks. `block` numbers the block for the message (1 =
/// first).
pub(super) fn check_block_header(header: &[u8], block: u64) -> io::Result<DeclaredSizes> {
    let xz = |msg: String| io::Error::new(io::ErrorKind::InvalidData, format!("xz: {msg}"));
    // The smallest header: size, flags, one filter's ID, properties size and property, CRC32.
    if header.len() < 8 {
        return Err(xz(format!(
            "block {block}'s header is {} bytes, too short for one",
            header.len()
        )));
    }
    let (body, crc) = header.split_at(header.len() - 4);
    let flags = header[1];
    if flags & 0x3c != 0 {
        return Err(xz(format!(
            "block {block}'s header has reserved flags set ({flags:#04x})"
        )));
    }
    let mut at = 2;
    let varint = |at: &mut usize| -> io::Result<u64> {
        let mut value = 0u64;
        for shift in (0..63).step_by(7) {
            let byte = *body
                .get(*at)
                .ok_or_else(|| xz("a truncated block header".into()))?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            // A last byte 0 after the first: more bytes than the number needs.
            if byte & 0x80 == 0 && (byte != 0 || shift == 0) {
                return Ok(value);
            }
            if byte == 0 {
                break;
            }
        }
        Err(xz("an overlong number in a block header".into()))
    };
    let mut sizes = DeclaredSizes::default();
    if flags & 0x40 != 0 {
        sizes.compressed = Some(varint(&mut at)?);
    }
    if flags & 0x80 != 0 {
        sizes.uncompressed = Some(varint(&mut at)?);
    }
    let filters = usize::from(flags & 3);
    for filter in 0..=filters {
        let id = varint(&mut at)?;
        let props_len = varint(&mut at)?;
        let props = usize::try_from(props_len)
            .ok()
            .and_then(|len| body.get(at..at.checked_add(len)?))
            .ok_or_else(|| xz("a truncated block header".into()))?;
        at += props.len();
        let bad_props = || {
            xz(format!(
                "block {block} has invalid properties for filter {id:#x}"
            ))
        };
        match id {
            0x21 => {
                if filter != filters {
                    return Err(xz(format!(
                        "block {block} has an LZMA2 filter that is not the last filter"
                    )));
                }
                let [bits] = props else {
                    return Err(bad_props());
                };
                let bits = u32::from(*bits);
                let dictionary = match bits {
                    40 => u64::from(u32::MAX),
                    0..=39 => u64::from(2 | (bits & 1)) << (bits / 2 + 11),
                    _ => return Err(xz(format!("an invalid LZMA2 dictionary size ({bits})"))),
                };
                if dictionary > MAX_XZ_DICTIONARY {
                    return Err(xz(format!(
                        "block {block} asks for a {dictionary}-byte dictionary, more than the \
                         {MAX_XZ_DICTIONARY} bytes this device decodes"
                    )));
                }
                sizes.dictionary = dictionary;
            }
            _ if filter == filters => {
                return Err(xz(format!("block {block}'s last filter is not LZMA2")));
            }
            0x03 => {
                let [distance] = props else {
                    return Err(bad_props());
                };
                sizes.filters[filter] = Some(XzFilter::Delta(usize::from(*distance) + 1));
            }
            0x04..=0x0b => {
                let start = match props {
                    [] => 0,
                    [a, b, c, d] => u32::from_le_bytes([*a, *b, *c, *d]),
                    _ => return Err(bad_props()),
                };
                // The instruction alignment of x86, PowerPC, IA-64, ARM, ARM-Thumb, SPARC,
                // ARM64, RISC-V.
                let align = [1, 4, 16, 4, 2, 4, 4, 2][id as usize - 4];
                if start % align != 0 {
                    return Err(bad_props());
                }
                sizes.filters[filter] = Some(XzFilter::Bcj(id as u8, start));
            }
            _ => {
                return Err(xz(format!(
                    "block {block} has an unsupported filter {id:#x}"
                )))
            }
        }
    }
    if body[at..].iter().any(|&b| b != 0) {
        return Err(xz(format!("block {block}'s header has non-zero padding")));
    }
    // Last: what the header asks for is refused as such even when its CRC is not right.
    if zlib_rs::crc32::crc32(0, body).to_le_bytes() != crc {
        return Err(xz(format!("block {block}'s header is corrupt (CRC32)")));
    }
    Ok(sizes)
}

/// The largest window a plain zstd image may ask for: 100 MiB, what the agent's earlier zstd
/// decoder allowed (`zstd -19` of a large image asks for 8 MiB, `--long` for 128 MiB at most).
pub const MAX_ZSTD_WINDOW: u64 = 100 << 20;

/// The decoder's own window limit, the power of two above [`MAX_ZSTD_WINDOW`].
pub(super) const MAX_ZSTD_WINDOW_LOG: u32 = 27;

/// Magic, descriptor, window descriptor, dictionary id, content size (RFC 8878, 3.1.1.1).
pub(super) const MAX_FRAME_HEADER: usize = 4 + 1 + 1 + 4 + 8;

/// Read the header of the next frame into `header` (a skippable frame: its magic and the first
/// byte of its length) and refuse a window above [`MAX_ZSTD_WINDOW`] before the decoder
/// reserves it. Returns the bytes read.
/// A frame header, as [`read_frame_header`] reads it: its bytes and their length.
pub(super) type FrameHeader = ([u8; MAX_FRAME_HEADER], usize);

/// Start the next frame of `source`: check its header and hand it to the decoder; skip
/// skippable frames. None at the clean end of the stream.
pub(super) fn start_frame<R: BufRead>(
    source: &mut R,
    decoder: &mut DCtx<'static>,
) -> io::Result<Option<FrameHeader>> {
    loop {
        if source.fill_buf()?.is_empty() {
            return Ok(None);
        }
        let mut header = [0u8; MAX_FRAME_HEADER];
        let len = read_frame_header(source, &mut header)?;
        if !is_zstd(&header) {
            skip_frame(source, &header[..len])?;
            continue;
        }
        hand_header(decoder, &header[..len]).map_err(decoder_error)?;
        return Ok(Some((header, len)));
    }
}

/// Hand a frame header to the decoder (it takes it whole, with no output).
pub(super) fn hand_header(decoder: &mut DCtx<'static>, header: &[u8]) -> Result<(), usize> {
    let mut input = InBuffer::around(header);
    let mut none = [0u8; 0];
    while input.pos() < header.len() {
        decoder.decompress_stream(&mut OutBuffer::around(&mut none[..]), &mut input)?;
    }
    Ok(())
}

/// Pass over a skippable frame (RFC 8878, 3.1.2) whose first `head` bytes were read from
/// `source`; anything else is not zstd.
pub(super) fn skip_frame<R: Read>(source: &mut R, head: &[u8]) -> io::Result<()> {
    if head[0] & 0xf0 != 0x50 || head[1..4] != [0x2a, 0x4d, 0x18] {
        return Err(invalid("not a zstd frame (unknown magic number)"));
    }
    let mut size = [head[4], 0, 0, 0];
    source.read_exact(&mut size[1..]).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            invalid("the stream ends inside a skippable frame")
        } else {
            e
        }
    })?;
    let length = u64::from(u32::from_le_bytes(size));
    let skipped = io::copy(&mut source.take(length), &mut io::sink())?;
    if skipped < length {
        return Err(invalid("the stream ends inside a skippable frame"));
    }
    Ok(())
}

pub(super) fn read_frame_header<R: Read>(
    source: &mut R,
    header: &mut [u8; MAX_FRAME_HEADER],
) -> io::Result<usize> {
    let ended = |e: io::Error| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            invalid("the stream ends inside a frame header")
        } else {
            e
        }
    };
    source.read_exact(&mut header[..5]).map_err(ended)?;
    if !is_zstd(&header[..4]) {
        // A skippable frame, or garbage.
        return Ok(5);
    }
    let descriptor = header[4];
    let single_segment = descriptor & 0x20 != 0;
    let dict_id_len = [0usize, 1, 2, 4][usize::from(descriptor & 3)];
    let content_size_len = match descriptor >> 6 {
        0 => usize::from(single_segment),
        flag => [0usize, 2, 4, 8][usize::from(flag)],
    };
    let len = 5 + usize::from(!single_segment) + dict_id_len + content_size_len;
    source.read_exact(&mut header[5..len]).map_err(ended)?;
    let window = ddi_bundle::chunked::frame_window_size(&header[..len]).map_err(invalid)?;
    if window > MAX_ZSTD_WINDOW {
        return Err(invalid(&format!(
            "a frame asks for a {window}-byte window, more than the {MAX_ZSTD_WINDOW} bytes \
             this device decodes"
        )));
    }
    Ok(len)
}

pub(super) fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {msg}"))
}

/// A failed decoder call as the install reports it.
pub(super) fn decoder_error(code: usize) -> io::Error {
    match error_code(code) {
        // The checks of our own header reading come first; this is a backstop.
        ZSTD_ErrorCode::ZSTD_error_frameParameter_windowTooLarge => invalid(&format!(
            "a frame asks for a window larger than the {MAX_ZSTD_WINDOW} bytes this device \
             decodes"
        )),
        _ => invalid(&zstd_error(code)),
    }
}

impl<R: Read> Read for ZstdReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if !self.in_frame {
                if !self.next_frame()? {
                    return Ok(0);
                }
                self.in_frame = true;
            }
            // Decode until there is output or the frame is done. The bytes already buffered
            // go first: the decoder may still hold output of a block it decoded, and waiting
            // for the source before handing it out would stall on a slow network.
            let mut wait_for_source = false;
            loop {
                let input = if wait_for_source {
                    self.source.fill_buf()?
                } else {
                    self.source.buffer()
                };
                let ended = input.is_empty() && wait_for_source;
                let mut input = InBuffer::around(input);
                let mut output = OutBuffer::around(&mut *buf);
                let hint = self
                    .decoder
                    .decompress_stream(&mut output, &mut input)
                    .map_err(decoder_error)?;
                let (used, made) = (input.pos(), output.pos());
                self.source.consume(used);
                if hint == 0 {
                    // The frame ended (its checksum, if any, matched) and all of it is out.
                    self.in_frame = false;
                    if made > 0 {
                        return Ok(made);
                    }
                    break;
                }
                if made > 0 {
                    return Ok(made);
                }
                if used == 0 {
                    if ended {
                        return Err(invalid("the stream ends inside a frame"));
                    }
                    wait_for_source = true;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(stream: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        ZstdReader::new(stream).read_to_end(&mut out)?;
        Ok(out)
    }

    #[test]
    fn a_hostile_window_is_refused_before_anything_is_reserved() {
        // Window descriptor 0xf8: 2^41 bytes (2 TiB), no single segment, no content size.
        let mut hostile = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xf8];
        hostile.extend_from_slice(&[0u8; 64]);
        let err = decode(&hostile).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string().contains("2199023255552-byte window"),
            "{err}"
        );
        // The same behind a genuine first frame: every frame's header is checked.
        let mut two = zstd::encode_all(&b"hello"[..], 3).unwrap();
        two.extend_from_slice(&hostile);
        let err = decode(&two).unwrap_err();
        assert!(
            err.to_string().contains("2199023255552-byte window"),
            "{err}"
        );
    }

    #[test]
    fn frames_with_every_header_layout_decode() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 97) as u8).collect();
        let mut stream = Vec::new();
        // Single segment with a content size (the default), and a streamed frame without one.
        stream.extend(zstd::encode_all(&data[..100], 1).unwrap());
        let mut encoder = zstd::Encoder::new(Vec::new(), 3).unwrap();
        encoder.include_contentsize(false).unwrap();
        encoder.include_checksum(true).unwrap();
        io::Write::write_all(&mut encoder, &data).unwrap();
        stream.extend(encoder.finish().unwrap());
        // A skippable frame between them is skipped.
        stream.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
        stream.extend(zstd::encode_all(&data[..70_000], 19).unwrap());
        let mut expected = data[..100].to_vec();
        expected.extend_from_slice(&data);
        expected.extend_from_slice(&data[..70_000]);
        assert!(decode(&stream).unwrap() == expected);
        assert!(decode(&stream[..stream.len() - 3]).is_err());
    }

    #[test]
    fn a_corrupt_frame_checksum_and_garbage_between_frames_are_refused() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let mut encoder = zstd::Encoder::new(Vec::new(), 3).unwrap();
        encoder.include_checksum(true).unwrap();
        io::Write::write_all(&mut encoder, &data).unwrap();
        let mut stream = encoder.finish().unwrap();
        assert!(decode(&stream).unwrap() == data);
        let last = stream.len() - 1;
        stream[last] ^= 0x40;
        let err = decode(&stream).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        stream[last] ^= 0x40;
        stream.extend_from_slice(b"not zstd");
        let err = decode(&stream).unwrap_err();
        assert!(err.to_string().contains("not a zstd frame"), "{err}");
    }
}
