//! Decoders for the compressions an image may be shipped in besides gzip: zstd (the C
//! library's decoder, which chunked bundles use too) and xz (lzma-rust2, pure Rust; BENCHMARKS.md
//! has the sizes and speeds). Each is a `Read` that yields the decompressed image.

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

/// An xz stream on its way to the decoder, followed through its container (stream header,
/// blocks of LZMA2 chunks with their padding and check, index, footer, stream padding, further
/// streams) without decoding it: every block header's LZMA2 dictionary is checked against
/// [`MAX_XZ_DICTIONARY`] before the decoder gets the header's last byte (lzma-rust2 allocates
/// the dictionary as soon as it has parsed a block header, and checks no limit itself).
pub struct XzGuard<R> {
    inner: R,
    state: XzState,
    /// Bytes of the block header being collected (its size byte first).
    header: Vec<u8>,
    /// Check field size of the current stream (from its header's flags).
    check_len: u64,
    /// Compressed bytes of the current block, or bytes of the current index.
    counted: u64,
    blocks: u64,
    /// Blocks of the streams before the current one.
    blocks_before_stream: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum XzState {
    /// `got` of the 12 stream header bytes seen (the check type is the 8th).
    StreamHeader { got: u8 },
    /// A block header's size byte, or 0: the index.
    BlockStart,
    /// Collecting a block header of this many bytes.
    BlockHeader { len: usize },
    /// An LZMA2 chunk's control byte (0: the block's data ends).
    ChunkControl,
    /// The rest of an LZMA2 chunk's header: `left` bytes, the sizes big-endian in `value`.
    ChunkHeader { control: u8, left: u8, value: u64 },
    /// Bytes to pass over, then `then`.
    Skip { left: u64, then: AfterSkip },
    /// The index's record count, a variable-length integer (`shift` bits read).
    IndexCount { value: u64, shift: u32 },
    /// `left` variable-length integers of index records.
    IndexRecords { left: u64 },
    /// Zeros between streams, or the next stream's magic.
    StreamPadding,
    /// Past what the decoder accepts: it reports the error.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterSkip {
    Chunk,
    /// Block padding done: the check follows.
    Check,
    Block,
    /// Index padding done: its CRC32 and the stream footer follow.
    IndexEnd,
    StreamPadding,
}

impl<R> XzGuard<R> {
    pub fn new(inner: R) -> Self {
        XzGuard {
            inner,
            state: XzState::StreamHeader { got: 0 },
            header: Vec::new(),
            check_len: 0,
            counted: 0,
            blocks: 0,
            blocks_before_stream: 0,
        }
    }

    /// Follow the container through `data` (the next bytes of the stream).
    fn watch(&mut self, mut data: &[u8]) -> io::Result<()> {
        while let Some((&byte, rest)) = data.split_first() {
            if let XzState::Skip { left, then } = self.state {
                let n = left.min(data.len() as u64);
                data = &data[n as usize..];
                self.counted += n;
                self.state = match left - n {
                    0 => self.after_skip(then),
                    left => XzState::Skip { left, then },
                };
                continue;
            }
            data = rest;
            self.state = self.step(byte)?;
        }
        Ok(())
    }

    fn after_skip(&mut self, then: AfterSkip) -> XzState {
        match then {
            AfterSkip::Chunk => XzState::ChunkControl,
            AfterSkip::Check => skip(self.check_len, AfterSkip::Block),
            AfterSkip::Block => XzState::BlockStart,
            AfterSkip::IndexEnd => skip(4 + 12, AfterSkip::StreamPadding),
            AfterSkip::StreamPadding => XzState::StreamPadding,
        }
    }

    fn step(&mut self, byte: u8) -> io::Result<XzState> {
        Ok(match self.state {
            XzState::StreamHeader { got } => {
                if got == 7 {
                    self.check_len = match byte & 0x0f {
                        0 => 0,
                        id => 4u64 << ((id - 1) / 3),
                    };
                }
                match got + 1 {
                    12 => XzState::BlockStart,
                    got => XzState::StreamHeader { got },
                }
            }
            XzState::BlockStart if byte == 0 => {
                self.counted = 1;
                XzState::IndexCount { value: 0, shift: 0 }
            }
            XzState::BlockStart => {
                self.header.clear();
                self.header.push(byte);
                XzState::BlockHeader {
                    len: (usize::from(byte) + 1) * 4,
                }
            }
            XzState::BlockHeader { len } => {
                self.header.push(byte);
                if self.header.len() < len {
                    return Ok(self.state);
                }
                self.blocks += 1;
                check_block_header(&self.header, self.blocks)?;
                self.counted = 0;
                XzState::ChunkControl
            }
            XzState::ChunkControl => {
                self.counted += 1;
                match byte {
                    0 => skip((4 - self.counted % 4) % 4, AfterSkip::Check),
                    1 | 2 => XzState::ChunkHeader {
                        control: byte,
                        left: 2,
                        value: 0,
                    },
                    0x80.. => XzState::ChunkHeader {
                        control: byte,
                        // Uncompressed and compressed size, and the properties after a reset.
                        left: if byte >= 0xc0 { 5 } else { 4 },
                        value: 0,
                    },
                    _ => XzState::Done, // not LZMA2: the decoder refuses it
                }
            }
            XzState::ChunkHeader {
                control,
                left,
                value,
            } => {
                self.counted += 1;
                let value = (value << 8) | u64::from(byte);
                let left = left - 1;
                let data_len = match (control, left) {
                    (_, 1..) => {
                        return Ok(XzState::ChunkHeader {
                            control,
                            left,
                            value,
                        })
                    }
                    (1 | 2, 0) => value + 1,
                    // The properties byte comes after the compressed size.
                    (0xc0.., 0) => ((value >> 8) & 0xffff) + 1,
                    _ => (value & 0xffff) + 1,
                };
                skip(data_len, AfterSkip::Chunk)
            }
            XzState::IndexCount { value, shift } => {
                self.counted += 1;
                let value = value | (u64::from(byte & 0x7f) << shift.min(63));
                match byte & 0x80 {
                    0 => {
                        // The index has one record per block of its stream (xz format
                        // 1.2.1, 4.2); the decoder reserves memory for the count it reads,
                        // so a forged count must stop here, before it gets to the decoder.
                        let blocks = self.blocks - self.blocks_before_stream;
                        if value != blocks {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("xz: the index lists {value} records for {blocks} blocks"),
                            ));
                        }
                        self.blocks_before_stream = self.blocks;
                        self.index_records(value.saturating_mul(2))
                    }
                    _ => XzState::IndexCount {
                        value,
                        shift: shift.saturating_add(7),
                    },
                }
            }
            XzState::IndexRecords { left } => {
                self.counted += 1;
                match byte & 0x80 {
                    0 => self.index_records(left - 1),
                    _ => XzState::IndexRecords { left },
                }
            }
            XzState::StreamPadding => match byte {
                0 => XzState::StreamPadding,
                0xfd => XzState::StreamHeader { got: 1 },
                _ => XzState::Done,
            },
            XzState::Skip { .. } => unreachable!("skipped in bulk"),
            XzState::Done => XzState::Done,
        })
    }

    /// `left` more integers of index records, then the index's padding.
    fn index_records(&self, left: u64) -> XzState {
        match left {
            0 => skip((4 - self.counted % 4) % 4, AfterSkip::IndexEnd),
            left => XzState::IndexRecords { left },
        }
    }
}

fn skip(left: u64, then: AfterSkip) -> XzState {
    XzState::Skip { left, then }
}

impl<R: Read> Read for XzGuard<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.watch(&buf[..n])?;
        Ok(n)
    }
}

/// Refuse a block header (`header`, from its size byte to its CRC) whose LZMA2 dictionary is
/// above [`MAX_XZ_DICTIONARY`]; `block` numbers the block for the message (1 = first).
fn check_block_header(header: &[u8], block: u64) -> io::Result<()> {
    let xz = |msg: String| io::Error::new(io::ErrorKind::InvalidData, format!("xz: {msg}"));
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
            .get(at..at.saturating_add(props_len))
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
                    "block {block} asks for a {dictionary}-byte dictionary, more than the \
                     {MAX_XZ_DICTIONARY} bytes this device decodes"
                )));
            }
        }
    }
    Ok(())
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

    fn xz(data: &[u8], dict_size: u32) -> Vec<u8> {
        let mut options = lzma_rust2::XzOptions::with_preset(1);
        options.lzma_options.dict_size = dict_size;
        xz_with(data, options)
    }

    fn xz_with(data: &[u8], options: lzma_rust2::XzOptions) -> Vec<u8> {
        let mut writer = lzma_rust2::XzWriter::new(Vec::new(), options).unwrap();
        io::Write::write_all(&mut writer, data).unwrap();
        writer.finish().unwrap()
    }

    /// Pass `stream` through the guard alone.
    fn guard(stream: &[u8]) -> io::Result<()> {
        io::copy(&mut XzGuard::new(stream), &mut io::sink()).map(|_| ())
    }

    /// Decode `stream` as the install does: the guard between the bytes and the decoder.
    fn unxz(stream: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        lzma_rust2::XzReader::new(XzGuard::new(stream), true).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Compressible text with stretches of noise (the encoder stores those uncompressed).
    fn mixed(len: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..len)
            .map(|i| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                if (i / 20_000) % 3 == 2 {
                    state as u8
                } else {
                    b"the quick brown fox\n"[(state % 20) as usize]
                }
            })
            .collect()
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = !0u32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
            }
        }
        !crc
    }

    /// Offsets of the block headers of a one-stream xz file, from its index (not from the
    /// block contents, which is what the guard follows).
    fn block_offsets(stream: &[u8]) -> Vec<usize> {
        let footer = &stream[stream.len() - 12..];
        let backward = u32::from_le_bytes(footer[4..8].try_into().unwrap()) as usize;
        let mut at = stream.len() - 12 - (backward + 1) * 4 + 1;
        let mut varint = || {
            let mut value = 0usize;
            for shift in (0..).step_by(7) {
                let byte = stream[at];
                at += 1;
                value |= usize::from(byte & 0x7f) << shift;
                if byte & 0x80 == 0 {
                    break;
                }
            }
            value
        };
        let count = varint();
        let mut offsets = vec![12];
        for _ in 0..count {
            let unpadded = varint();
            varint(); // uncompressed size
            offsets.push(offsets.last().unwrap() + unpadded.div_ceil(4) * 4);
        }
        offsets.pop();
        offsets
    }

    #[test]
    fn an_xz_dictionary_above_the_cap_is_refused() {
        let data = vec![7u8; 10_000];
        for ok in [4096, 8 << 20, 64 << 20] {
            guard(&xz(&data, ok)).unwrap();
        }
        let err = guard(&xz(&data, 96 << 20)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string()
                .contains("block 1 asks for a 100663296-byte dictionary"),
            "{err}"
        );
        // A hostile header: 4 GiB - 1 (property byte 40), as a forger would write it.
        let mut hostile = xz(&data, 4096);
        let props_at = (12..24)
            .find(|&i| hostile[i] == 0x21 && hostile[i + 1] == 1)
            .unwrap()
            + 2;
        hostile[props_at] = 40;
        let err = guard(&hostile).unwrap_err();
        assert!(err.to_string().contains("4294967295-byte"), "{err}");
        // Empty streams and short heads are left to the decoder.
        guard(&xz(&[], 4096)).unwrap();
        guard(&[0xfd, b'7']).unwrap();
    }

    /// A later block's header is checked too (lzma-rust2 would allocate what it asks for as
    /// soon as it reaches it): here the second block of a genuine multi-block stream asks for
    /// 96 MiB, with a correct header CRC, so the decoder alone would take it.
    #[test]
    fn a_huge_dictionary_in_a_later_block_is_refused_before_it_is_allocated() {
        let data = mixed(200_000);
        let mut options = lzma_rust2::XzOptions::with_preset(1);
        options.lzma_options.dict_size = 4096;
        options.block_size = std::num::NonZeroU64::new(64 << 10);
        let mut stream = xz_with(&data, options);
        let blocks = block_offsets(&stream);
        assert!(blocks.len() >= 3, "{blocks:?}");
        let second = blocks[1];
        let header_len = (usize::from(stream[second]) + 1) * 4;
        let props_at = (second + 2..second + header_len)
            .find(|&i| stream[i] == 0x21 && stream[i + 1] == 1)
            .unwrap()
            + 2;
        stream[props_at] = 29; // 3 << 25: 96 MiB
        let crc_at = second + header_len - 4;
        let crc = crc32(&stream[second..crc_at]);
        stream[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
        // The crafted stream is valid: without the guard it decodes (allocating 96 MiB).
        let mut plain = Vec::new();
        lzma_rust2::XzReader::new(stream.as_slice(), true)
            .read_to_end(&mut plain)
            .unwrap();
        assert!(plain == data);

        let err = unxz(&stream).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(
            err.to_string()
                .contains("block 2 asks for a 100663296-byte dictionary"),
            "{err}"
        );
    }

    /// The guard follows every layout the decoder takes without a false alarm: many blocks,
    /// stored (uncompressed) LZMA2 chunks, every check type, filters before LZMA2, several
    /// streams with stream padding between them; and a later stream's blocks are checked.
    #[test]
    fn an_xz_index_whose_record_count_is_not_its_block_count_is_refused() {
        let stream = xz(&mixed(100_000), 1 << 16);
        assert!(unxz(&stream).is_ok());
        // The index starts `backward size` bytes before the 12-byte stream footer: its
        // indicator (0), then the record count (1 block: one byte, 1).
        let footer = stream.len() - 12;
        let backward = u32::from_le_bytes(stream[footer + 4..footer + 8].try_into().unwrap());
        let index = footer - (backward as usize + 1) * 4;
        assert_eq!(&stream[index..index + 2], &[0, 1]);
        let mut more = stream.clone();
        more[index + 1] = 5;
        let err = unxz(&more).unwrap_err();
        assert!(err.to_string().contains("5 records for 1 blocks"), "{err}");
        // A count the decoder would reserve hundreds of GiB for never reaches it.
        let mut huge = stream.clone();
        huge.splice(index + 1..index + 2, [0xff, 0xff, 0xff, 0xff, 0x7f]);
        let err = unxz(&huge).unwrap_err();
        assert!(
            err.to_string().contains("34359738367 records for 1 blocks"),
            "{err}"
        );
    }

    #[test]
    fn the_xz_guard_follows_every_container_layout() {
        use lzma_rust2::{CheckType, FilterConfig, XzOptions};
        let data = mixed(300_000);
        let mut expected = Vec::new();
        let mut stream = Vec::new();
        let checks = [
            CheckType::None,
            CheckType::Crc32,
            CheckType::Crc64,
            CheckType::Sha256,
        ];
        for (i, check) in checks.into_iter().enumerate() {
            let mut options = XzOptions::with_preset(i as u32 * 2);
            options.check_type = check;
            options.lzma_options.dict_size = 1 << 16;
            options.block_size = std::num::NonZeroU64::new(50_000 + i as u64 * 30_000);
            if i == 1 {
                options.filters = vec![FilterConfig::new_delta(4)];
            }
            if i == 2 {
                options.filters = vec![FilterConfig::new_bcj_x86(0)];
            }
            let part = &data[i * 50_000..];
            stream.extend(xz_with(part, options));
            stream.extend_from_slice(&[0u8; 8]); // stream padding
            expected.extend_from_slice(part);
        }
        assert!(unxz(&stream).unwrap() == expected);
        // Still watching in the last stream: its first block asks for too much.
        stream.extend(xz(b"more", 96 << 20));
        let err = unxz(&stream).unwrap_err();
        assert!(err.to_string().contains("100663296-byte"), "{err}");
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
