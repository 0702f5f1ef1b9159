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
            match self.decoder.reset(&mut self.source) {
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
