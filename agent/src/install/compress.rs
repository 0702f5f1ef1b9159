//! Decoders for the compressions an image may be shipped in besides gzip: zstd and xz, both
//! in pure Rust (ruzstd, lzma-rust2) to keep the agent binary small (BENCHMARKS.md has the
//! sizes). Each is a `Read` that yields the decompressed image.

use std::io::{self, BufRead, BufReader, Read};

use ruzstd::decoding::errors::{FrameDecoderError, ReadFrameHeaderError};
use ruzstd::decoding::FrameDecoder;

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
/// that multi-threaded and chunked compressors' output streams like a single frame.
pub struct ZstdReader<R: Read> {
    source: BufReader<R>,
    decoder: FrameDecoder,
    /// A frame is being decoded.
    in_frame: bool,
}

impl<R: Read> ZstdReader<R> {
    pub fn new(source: R) -> Self {
        ZstdReader {
            source: BufReader::with_capacity(128 * 1024, source),
            decoder: FrameDecoder::new(),
            in_frame: false,
        }
    }

    /// Start the next frame; false at the clean end of the stream.
    fn next_frame(&mut self) -> io::Result<bool> {
        loop {
            if self.source.fill_buf()?.is_empty() {
                return Ok(false);
            }
            let mut header = [0u8; MAX_FRAME_HEADER];
            let len = read_frame_header(&mut self.source, &mut header)?;
            let header = io::Cursor::new(&header[..len]);
            match self.decoder.reset(header.chain(&mut self.source)) {
                Ok(()) => return Ok(true),
                Err(FrameDecoderError::ReadFrameHeaderError(ReadFrameHeaderError::SkipFrame {
                    length,
                    ..
                })) => {
                    let skipped = io::copy(
                        &mut (&mut self.source).take(u64::from(length)),
                        &mut io::sink(),
                    )?;
                    if skipped < u64::from(length) {
                        return Err(invalid("the stream ends inside a skippable frame"));
                    }
                }
                Err(e) => return Err(invalid(&e.to_string())),
            }
        }
    }
}

/// The largest LZMA2 dictionary an xz image may ask for: `xz -9`'s (the decoder allocates the
/// whole dictionary before the first byte, and a hostile header may ask for 4 GiB).
pub const MAX_XZ_DICTIONARY: u64 = 64 << 20;

/// Refuse an xz stream whose first block asks for a dictionary above [`MAX_XZ_DICTIONARY`];
/// `head` is the stream's first bytes. Only the first block of the first stream is checked
/// (what lzma-rust2 0.15 lets a caller see): a hostile later block is not caught here.
pub fn check_xz_dictionary(head: &[u8]) -> io::Result<()> {
    let xz = |msg: String| io::Error::new(io::ErrorKind::InvalidData, format!("xz: {msg}"));
    // Stream header (12 bytes), then a block header or the index (0x00).
    let Some(&size_byte) = head.get(12) else {
        return Ok(()); // the decoder reports the short stream
    };
    if size_byte == 0 {
        return Ok(()); // no block: an empty stream
    }
    let header_len = (usize::from(size_byte) + 1) * 4;
    let header = head.get(12..12 + header_len).ok_or_else(|| {
        xz(format!(
            "a {header_len}-byte block header, too long to check its dictionary size"
        ))
    })?;
    let flags = header[1];
    let mut at = 2;
    let varint = |at: &mut usize| -> io::Result<u64> {
        let mut value = 0u64;
        for shift in (0..63).step_by(7) {
            let byte = *header
                .get(*at)
                .ok_or_else(|| xz("a truncated block header".into()))?;
            *at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err(xz("an overlong number in a block header".into()))
    };
    for present in [flags & 0x40 != 0, flags & 0x80 != 0] {
        if present {
            varint(&mut at)?; // compressed / uncompressed size
        }
    }
    for _ in 0..=(flags & 3) {
        let id = varint(&mut at)?;
        let props_len = varint(&mut at)? as usize;
        let props = header
            .get(at..at + props_len)
            .ok_or_else(|| xz("a truncated block header".into()))?;
        at += props_len;
        if id == 0x21 {
            let bits = u32::from(*props.first().unwrap_or(&0));
            let dictionary = match bits {
                40 => u64::from(u32::MAX),
                0..=39 => u64::from(2 | (bits & 1)) << (bits / 2 + 11),
                _ => return Err(xz(format!("an invalid LZMA2 dictionary size ({bits})"))),
            };
            if dictionary > MAX_XZ_DICTIONARY {
                return Err(xz(format!(
                    "the image asks for a {dictionary}-byte dictionary, more than the \
                     {MAX_XZ_DICTIONARY} bytes this device decodes"
                )));
            }
        }
    }
    Ok(())
}

/// The largest window a plain zstd image may ask for: ruzstd's own limit, which it applies to
/// every frame but the first (for that one it reserves whatever the header asks, up to TiBs).
pub const MAX_ZSTD_WINDOW: u64 = 100 << 20;

/// Magic, descriptor, window descriptor, dictionary id, content size (RFC 8878, 3.1.1.1).
const MAX_FRAME_HEADER: usize = 4 + 1 + 1 + 4 + 8;

/// Read the header of the next frame into `header` (a skippable frame: its magic and the first
/// byte of its length) and refuse a window above [`MAX_ZSTD_WINDOW`] before the decoder
/// reserves it. Returns the bytes read.
fn read_frame_header<R: Read>(
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
        // A skippable frame, or garbage: the decoder tells.
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

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("zstd: {msg}"))
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
            // Decode until there is output or the frame is done.
            loop {
                let n = self.decoder.read(buf)?;
                if n > 0 {
                    return Ok(n);
                }
                if self.decoder.is_finished() {
                    break;
                }
                if self.source.fill_buf()?.is_empty() {
                    return Err(invalid("the stream ends inside a frame"));
                }
                self.decoder
                    .decode_blocks(
                        &mut self.source,
                        ruzstd::decoding::BlockDecodingStrategy::UptoBytes(
                            buf.len().max(64 * 1024),
                        ),
                    )
                    .map_err(|e| invalid(&e.to_string()))?;
            }
            // The frame's checksum (the low 32 bits of xxhash64), when it has one: what the
            // zstd tool writes by default, the counterpart of gzip's CRC.
            if let (Some(stored), Some(computed)) = (
                self.decoder.get_checksum_from_data(),
                self.decoder.get_calculated_checksum(),
            ) {
                if stored != computed {
                    return Err(invalid("frame checksum mismatch: the data is corrupt"));
                }
            }
            self.in_frame = false;
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
        // The same behind a genuine first frame (the decoder's own check covers later frames
        // too, but with its message).
        let mut two = zstd::encode_all(&b"hello"[..], 3).unwrap();
        two.extend_from_slice(&hostile);
        assert!(decode(&two).is_err());
    }

    fn xz(data: &[u8], dict_size: u32) -> Vec<u8> {
        let mut options = lzma_rust2::XzOptions::with_preset(1);
        options.lzma_options.dict_size = dict_size;
        let mut writer = lzma_rust2::XzWriter::new(Vec::new(), options).unwrap();
        io::Write::write_all(&mut writer, data).unwrap();
        writer.finish().unwrap()
    }

    #[test]
    fn an_xz_dictionary_above_the_cap_is_refused() {
        let data = vec![7u8; 10_000];
        for ok in [4096, 8 << 20, 64 << 20] {
            check_xz_dictionary(&xz(&data, ok)).unwrap();
        }
        let err = check_xz_dictionary(&xz(&data, 96 << 20)).unwrap_err();
        assert!(
            err.to_string().contains("100663296-byte dictionary"),
            "{err}"
        );
        // A hostile header: 4 GiB - 1 (property byte 40), as a forger would write it.
        let mut hostile = xz(&data, 4096);
        let props_at = (12..24)
            .find(|&i| hostile[i] == 0x21 && hostile[i + 1] == 1)
            .unwrap()
            + 2;
        hostile[props_at] = 40;
        let err = check_xz_dictionary(&hostile).unwrap_err();
        assert!(err.to_string().contains("4294967295-byte"), "{err}");
        // Empty streams and short heads are left to the decoder.
        check_xz_dictionary(&xz(&[], 4096)).unwrap();
        check_xz_dictionary(&[0xfd, b'7']).unwrap();
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
}
