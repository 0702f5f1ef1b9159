//! Decoding xz images with resume points at block boundaries.
//!
//! An xz stream is a header, blocks, an index listing every block's sizes, and a footer; a
//! file may hold several streams (with zero padding between them). Every block is compressed
//! on its own: a decoder can start at any block header knowing only the stream's check type.
//! `xz -T` (what Yocto's image conversion runs), `pixz` and `xz --block-size` write many
//! blocks; plain single-threaded `xz` writes one per stream, so such an image has no point
//! after its start.
//!
//! [`XzDecoder`] follows the container itself and hands each block to lzma-rust2's decoder as
//! a stream of its own: a stream header with the real stream's flags, the block's bytes as
//! they arrive, then an index listing that one block and a footer, made here once the block's
//! bytes (with its check) went through. lzma-rust2 thus decodes every block with its filters
//! and checks the block's check; this module checks the container around it: the stream
//! header's and footer's CRCs, every block header's dictionary against
//! [`super::compress::MAX_XZ_DICTIONARY`] before the decoder allocates it, what lzma-rust2
//! does not check of a block header (reserved flags, LZMA2 only as the last filter, the
//! compressed and uncompressed sizes it may declare, against the block's), and every real
//! index against the blocks decoded (their count and, through a sha256 of the records, their
//! sizes) without holding the index in memory (lzma-rust2 reserves memory for the record
//! count it reads; it only ever sees the one-record indexes made here).
//!
//! Between two blocks the decoder's whole state is where the stream started (artifact and
//! output offsets), its check type and how many blocks of it came before ([`XzState`]). A
//! resumed decoder checks the stream's index at its end against the point too: the records
//! before the point must add up to the point's artifact and output offsets, so a point the
//! decoder did not make, or one moved to another block, fails the install instead of writing
//! a wrong image. The output offset is bound that way only relative to the stream's: the
//! artifact's first stream has none before it ([`ResumeAt::plausible`]), a later stream's is
//! bound by nothing here (the resume record's sha256 of the slot's prefix binds it).

use std::io::{self, BufRead, BufReader, Read};

use sha2::{Digest, Sha256};

use super::compress::{check_block_header, DeclaredSizes};
use super::sha256_state::Sha256State;

const MAGIC: [u8; 6] = [0xfd, b'7', b'z', b'X', b'Z', 0];
/// Dictionary bytes the blocks may ask for, in all, per byte of output before them (beyond a
/// first [`super::compress::MAX_XZ_DICTIONARY`]): lzma-rust2 allocates and zeroes a block's
/// whole dictionary for every block, so a file of tiny blocks with large dictionaries would
/// cost the device seconds of CPU per KiB. `xz --threads` makes blocks of three times the
/// dictionary; 64 allows blocks down to 1 MiB at `xz -9`, 128 KiB at `xz -6`.
const DICTIONARY_PER_OUTPUT: u64 = 64;
const FOOTER_MAGIC: [u8; 2] = *b"YZ";
/// Stream header and footer size.
const HEADER_LEN: u64 = 12;
/// The smallest block: an 8-byte header, the LZMA2 end marker, padding to 4, no check.
const MIN_BLOCK: u64 = 12;

/// The state of a stream at a block boundary: what a decoder starting at the next block header
/// needs, and what the stream's index is checked against at its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XzState {
    /// Artifact offset of the stream's header.
    pub stream_start: u64,
    /// Output bytes before the stream's content.
    pub stream_out: u64,
    /// The stream's check type (the low 4 bits of its flags).
    pub check: u8,
    /// Blocks of the stream before the boundary.
    pub blocks: u64,
}

impl XzState {
    /// `STREAM_START:STREAM_OUT:CHECK:BLOCKS`, as the resume record keeps it.
    pub fn to_text(&self) -> String {
        let XzState {
            stream_start,
            stream_out,
            check,
            blocks,
        } = self;
        format!("{stream_start}:{stream_out}:{check}:{blocks}")
    }

    pub fn from_text(text: &str) -> Option<Self> {
        let mut fields = text.split(':');
        let mut next = || fields.next()?.parse::<u64>().ok();
        let state = XzState {
            stream_start: next()?,
            stream_out: next()?,
            check: u8::try_from(next()?).ok()?,
            blocks: next()?,
        };
        fields.next().is_none().then_some(state)
    }
}

/// A block boundary the decoder reached: where a fresh decoder could continue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boundary {
    /// The artifact byte where the next block header starts: a resume downloads from here.
    pub artifact_offset: u64,
    /// Output bytes before the boundary.
    pub out: u64,
    pub state: XzState,
    /// The artifact hash over bytes `0..artifact_offset` (None when not hashing).
    pub artifact_hash: Option<Sha256State>,
}

/// Where a resumed decoder continues (from a resume record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeAt {
    pub artifact_offset: u64,
    pub out: u64,
    pub state: XzState,
}

impl ResumeAt {
    /// Whether a point read from a record can be one this decoder made: at a block header of a
    /// stream with a supported check, after some output, with room for its blocks between the
    /// stream's header and the point, in the artifact's first stream only with no output
    /// before the stream (the index's sums bind the point's output offset only to the
    /// stream's). Checked before the slot is read; the stream's index checks the rest at its
    /// end.
    pub fn plausible(&self) -> bool {
        let s = &self.state;
        let Some(span) = self
            .artifact_offset
            .checked_sub(s.stream_start)
            .and_then(|d| d.checked_sub(HEADER_LEN))
        else {
            return false;
        };
        check_len(s.check).is_some()
            && self.out > 0
            && self.out >= s.stream_out
            && span % 4 == 0
            && s.blocks
                .checked_mul(MIN_BLOCK)
                .is_some_and(|min| min <= span)
            && (s.blocks > 0 || (span == 0 && s.stream_start > 0))
            && (s.stream_start > 0 || s.stream_out == 0)
    }
}

/// Size of a check type's field; None for the types lzma-rust2 does not verify (the format
/// reserves them; `xz` writes none of them).
fn check_len(check: u8) -> Option<u64> {
    match check {
        0 => Some(0),
        1 => Some(4),
        4 => Some(8),
        10 => Some(32),
        _ => None,
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("xz: {msg}"))
}

fn crc32(crc: u32, bytes: &[u8]) -> u32 {
    zlib_rs::crc32::crc32(crc, bytes)
}

/// The artifact as the decoder reads it: buffered, counted, and hashed as consumed.
struct Input<R> {
    source: BufReader<R>,
    /// Artifact offset of the next byte.
    offset: u64,
    hash: Option<Sha256State>,
}

/// Reads from the source in pieces of this size (the decoder asks for a chunk's compressed
/// bytes, up to 64 KiB, at once).
const SOURCE_BUFFER: usize = 16 * 1024;

impl<R: Read> Input<R> {
    fn peek(&mut self) -> io::Result<Option<u8>> {
        loop {
            match self.source.fill_buf() {
                Ok(buf) => return Ok(buf.first().copied()),
                // The source's, not a stop at a boundary (which `XzDecoder::read` returns).
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn read_exact_here(&mut self, buf: &mut [u8], what: &str) -> io::Result<()> {
        match self.read_exact(buf) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                Err(invalid(format!("the artifact ends inside {what}")))
            }
            other => other,
        }
    }

    fn byte(&mut self, what: &str) -> io::Result<u8> {
        let mut b = [0u8];
        self.read_exact_here(&mut b, what)?;
        Ok(b[0])
    }
}

impl<R: Read> Read for Input<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.source.read(buf)?;
        if let Some(hash) = &mut self.hash {
            hash.update(&buf[..n]);
        }
        self.offset += n as u64;
        Ok(n)
    }
}

/// The stream being decoded.
#[derive(Debug, Clone)]
struct Stream {
    state: XzState,
    check_len: u64,
    /// Blocks decoded in this run (after `state.blocks` before the resume point, if any).
    decoded: u64,
    /// sha256 over the index records (unpadded and uncompressed size, little-endian) of the
    /// blocks decoded in this run.
    records: Sha256,
    /// A resumed stream: the artifact and output offsets of the resume point, which the
    /// index's records before it must add up to.
    resumed_at: Option<(u64, u64)>,
}

/// Decodes an xz file of one or more streams block by block (see the module doc); reports
/// block boundaries when asked to ([`Self::boundaries_from`]).
pub struct XzDecoder<R: Read> {
    stage: Stage<R>,
    stream: Option<Stream>,
    /// Output bytes so far.
    out: u64,
    /// Output offset from which block boundaries are reported.
    points_from: u64,
    boundary: Option<Boundary>,
    /// Artifact offset of the last boundary reported (each is reported once).
    reported_at: Option<u64>,
    /// Blocks decoded, all streams (numbers blocks in messages).
    blocks: u64,
    /// Dictionary bytes the blocks decoded asked for (see [`DICTIONARY_PER_OUTPUT`]).
    dictionaries: u64,
}

enum Stage<R: Read> {
    /// Between two blocks (or streams): the decoder holds the artifact.
    Between(Input<R>),
    /// In a block: its own decoder holds the artifact; output bytes before the block.
    Block(Box<lzma_rust2::XzReader<BlockFeed<R>>>, u64),
    /// The artifact ended after a complete stream.
    Ended(Input<R>),
    /// An error stopped the decoder.
    Failed,
}

impl<R: Read> XzDecoder<R> {
    /// A decoder of the artifact from its first byte; `hash`: hash the artifact's bytes as
    /// they are read (a fresh state).
    pub fn new(source: R, hash: Option<Sha256State>) -> Self {
        XzDecoder {
            stage: Stage::Between(Input {
                source: BufReader::with_capacity(SOURCE_BUFFER, source),
                offset: 0,
                hash,
            }),
            stream: None,
            out: 0,
            points_from: u64::MAX,
            boundary: None,
            reported_at: None,
            blocks: 0,
            dictionaries: 0,
        }
    }

    /// A decoder continuing at `at`, a block boundary: `source` is the artifact from
    /// `at.artifact_offset` on, `hash` the artifact hash's state over the bytes before it.
    pub fn resume(source: R, at: &ResumeAt, hash: Option<Sha256State>) -> io::Result<Self> {
        if !at.plausible() {
            return Err(invalid(format!(
                "resume point at byte {} is not a block boundary of a stream",
                at.artifact_offset
            )));
        }
        let check_len = check_len(at.state.check).expect("plausible checked it");
        Ok(XzDecoder {
            stage: Stage::Between(Input {
                source: BufReader::with_capacity(SOURCE_BUFFER, source),
                offset: at.artifact_offset,
                hash,
            }),
            stream: Some(Stream {
                state: at.state,
                check_len,
                decoded: 0,
                records: Sha256::new(),
                resumed_at: Some((at.artifact_offset, at.out)),
            }),
            out: at.out,
            points_from: u64::MAX,
            boundary: None,
            reported_at: Some(at.artifact_offset),
            blocks: at.state.blocks,
            dictionaries: 0,
        })
    }

    /// Output bytes so far.
    pub fn output_offset(&self) -> u64 {
        self.out
    }

    /// Report block boundaries from output offset `out` on (none before; `u64::MAX`: none).
    /// At a reported boundary a read returns [`io::ErrorKind::Interrupted`] once, before any
    /// byte after it: the caller takes it with [`Self::take_boundary`].
    pub fn boundaries_from(&mut self, out: u64) {
        self.points_from = out;
    }

    /// The boundary reached since the last call, if any.
    pub fn take_boundary(&mut self) -> Option<Boundary> {
        self.boundary.take()
    }

    /// The artifact hash over every byte read (the whole artifact once decoding ended).
    pub fn finish_hash(self) -> Option<Sha256State> {
        match self.stage {
            Stage::Between(input) | Stage::Ended(input) => input.hash,
            Stage::Block(reader, _) => reader.into_inner().input.hash,
            Stage::Failed => None,
        }
    }

    /// One step between blocks: read a stream header, an index and what follows it, or start
    /// the next block. Returns the next stage and whether to stop at a boundary here.
    fn between(&mut self, mut input: Input<R>) -> io::Result<(Stage<R>, bool)> {
        let Some(stream) = &mut self.stream else {
            let state = read_stream_header(&mut input, self.out)?;
            self.stream = Some(Stream::new(state));
            return Ok((Stage::Between(input), false));
        };
        match input.peek()? {
            None => Err(invalid(format!(
                "the artifact ends at byte {} before the stream's index",
                input.offset
            ))),
            Some(0) => {
                read_index(&mut input, stream)?;
                self.stream = None;
                if stream_padding(&mut input)? {
                    Ok((Stage::Between(input), false))
                } else {
                    Ok((Stage::Ended(input), false))
                }
            }
            Some(_) => {
                let state = XzState {
                    blocks: stream.state.blocks + stream.decoded,
                    ..stream.state
                };
                if self.out >= self.points_from && self.reported_at != Some(input.offset) {
                    self.reported_at = Some(input.offset);
                    self.boundary = Some(Boundary {
                        artifact_offset: input.offset,
                        out: self.out,
                        state,
                        artifact_hash: input.hash.clone(),
                    });
                    return Ok((Stage::Between(input), true));
                }
                self.blocks += 1;
                let budget = super::compress::MAX_XZ_DICTIONARY
                    .saturating_add(self.out.saturating_mul(DICTIONARY_PER_OUTPUT))
                    .saturating_sub(self.dictionaries);
                let mut feed = BlockFeed::new(input, state.check, stream.check_len, self.blocks);
                feed.dictionary_budget = budget;
                let reader = lzma_rust2::XzReader::new(feed, false);
                Ok((Stage::Block(Box::new(reader), self.out), false))
            }
        }
    }

    /// The block just decoded ended: check its output against its chunks, add its record.
    fn end_block(&mut self, feed: BlockFeed<R>, block_out: u64) -> io::Result<Input<R>> {
        let decoded = self.out - block_out;
        if !feed.done() || decoded != feed.uncompressed {
            return Err(invalid(format!(
                "block {} decoded to {decoded} bytes, its chunks hold {}",
                self.blocks, feed.uncompressed
            )));
        }
        let DeclaredSizes {
            compressed,
            uncompressed,
            ..
        } = feed.declared;
        if compressed.is_some_and(|c| c != feed.compressed)
            || uncompressed.is_some_and(|u| u != decoded)
        {
            return Err(invalid(format!(
                "block {} has {} compressed bytes for {decoded} bytes, its header declares \
                 {compressed:?} and {uncompressed:?}",
                self.blocks, feed.compressed
            )));
        }
        self.dictionaries = self.dictionaries.saturating_add(feed.declared.dictionary);
        let stream = self.stream.as_mut().expect("a block is in a stream");
        stream.decoded += 1;
        stream.records.update(feed.unpadded().to_le_bytes());
        stream.records.update(feed.uncompressed.to_le_bytes());
        Ok(feed.input)
    }
}

impl Stream {
    fn new(state: XzState) -> Self {
        Stream {
            check_len: check_len(state.check).expect("checked with the header"),
            state,
            decoded: 0,
            records: Sha256::new(),
            resumed_at: None,
        }
    }
}

impl<R: Read> Read for XzDecoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match std::mem::replace(&mut self.stage, Stage::Failed) {
                Stage::Block(mut reader, block_out) => {
                    let n = reader.read(buf)?;
                    if n > 0 {
                        self.out += n as u64;
                        self.stage = Stage::Block(reader, block_out);
                        return Ok(n);
                    }
                    let input = self.end_block(reader.into_inner(), block_out)?;
                    self.stage = Stage::Between(input);
                }
                Stage::Between(input) => {
                    let (stage, stop) = self.between(input)?;
                    self.stage = stage;
                    if stop {
                        return Err(io::ErrorKind::Interrupted.into());
                    }
                }
                Stage::Ended(input) => {
                    self.stage = Stage::Ended(input);
                    return Ok(0);
                }
                Stage::Failed => return Err(invalid("decoding stopped after an error".into())),
            }
        }
    }
}

/// Read a stream header (the artifact is at its first byte) of a stream whose content starts
/// at output offset `out`.
fn read_stream_header<R: Read>(input: &mut Input<R>, out: u64) -> io::Result<XzState> {
    let start = input.offset;
    let mut header = [0u8; HEADER_LEN as usize];
    input.read_exact_here(&mut header, "a stream header")?;
    if header[..6] != MAGIC {
        return Err(invalid(format!("no stream header at byte {start}")));
    }
    let flags = &header[6..8];
    if crc32(0, flags).to_le_bytes() != header[8..12] {
        return Err(invalid(format!(
            "the stream header at byte {start} is corrupt"
        )));
    }
    if flags[0] != 0 || flags[1] & 0xf0 != 0 || check_len(flags[1]).is_none() {
        return Err(invalid(format!(
            "the stream at byte {start} has unsupported flags {:02x}{:02x}",
            flags[0], flags[1]
        )));
    }
    Ok(XzState {
        stream_start: start,
        stream_out: out,
        check: flags[1],
        blocks: 0,
    })
}

/// After a stream's footer: skip stream padding (zeros in fours). True when another stream
/// follows, false at the end of the artifact.
fn stream_padding<R: Read>(input: &mut Input<R>) -> io::Result<bool> {
    loop {
        match input.peek()? {
            None => return Ok(false),
            Some(0) => {
                let at = input.offset;
                let mut zeros = [0u8; 4];
                match bootctl::fsutil::read_full(input, &mut zeros)? {
                    4 if zeros == [0; 4] => {}
                    _ => {
                        return Err(invalid(format!(
                            "stream padding at byte {at} is not a multiple of four zeros"
                        )))
                    }
                }
            }
            Some(0xfd) => return Ok(true),
            Some(_) => {
                return Err(invalid(format!(
                    "data that is not an xz stream at byte {}",
                    input.offset
                )))
            }
        }
    }
}

/// Read a stream's index and footer (the artifact is at the index indicator) and check them
/// against the blocks decoded.
fn read_index<R: Read>(input: &mut Input<R>, stream: &Stream) -> io::Result<()> {
    let mut index = IndexReader {
        input,
        start: 0,
        crc: 0,
        len: 0,
    };
    index.start = index.input.offset;
    let start = index.start;
    index.byte()?; // the indicator, 0 (peeked)
    let before = stream.state.blocks;
    let blocks = before + stream.decoded;
    let count = index.varint()?;
    if count != blocks {
        return Err(invalid(format!(
            "the index at byte {start} lists {count} records for {blocks} blocks"
        )));
    }
    let (mut bytes_before, mut out_before) = (0u64, 0u64);
    let mut records = Sha256::new();
    for i in 0..count {
        let unpadded = index.varint()?;
        let uncompressed = index.varint()?;
        if unpadded == 0 {
            return Err(invalid(format!(
                "a record of size 0 in the index at byte {start}"
            )));
        }
        if i < before {
            bytes_before = bytes_before.saturating_add(unpadded.div_ceil(4).saturating_mul(4));
            out_before = out_before.saturating_add(uncompressed);
        } else {
            records.update(unpadded.to_le_bytes());
            records.update(uncompressed.to_le_bytes());
        }
    }
    if let Some((artifact_offset, point_out)) = stream.resumed_at {
        let s = &stream.state;
        // A hostile index's records may add up past 2^64 (they saturated above).
        if bytes_before.checked_add(s.stream_start + HEADER_LEN) != Some(artifact_offset)
            || out_before.checked_add(s.stream_out) != Some(point_out)
        {
            return Err(invalid(format!(
                "the index at byte {start} does not put a block boundary where the resume \
                 point is (byte {artifact_offset}, output {point_out})"
            )));
        }
    }
    if records.finalize() != stream.records.clone().finalize() {
        return Err(invalid(format!(
            "the index at byte {start} does not match the stream's blocks"
        )));
    }
    while !index.len.is_multiple_of(4) {
        if index.byte()? != 0 {
            return Err(invalid(format!(
                "the index at byte {start} has non-zero padding"
            )));
        }
    }
    let (crc, len) = (index.crc, index.len);
    let mut stored = [0u8; 4];
    input.read_exact_here(&mut stored, "a stream index")?;
    if stored != crc.to_le_bytes() {
        return Err(invalid(format!(
            "the index at byte {start} is corrupt (CRC32)"
        )));
    }
    let mut footer = [0u8; HEADER_LEN as usize];
    input.read_exact_here(&mut footer, "a stream footer")?;
    let backward = u64::from(u32::from_le_bytes(
        footer[4..8].try_into().expect("4 bytes"),
    ));
    let fits = crc32(0, &footer[4..10]).to_le_bytes() == footer[..4]
        && (backward + 1) * 4 == len + 4
        && footer[8..10] == [0, stream.state.check]
        && footer[10..] == FOOTER_MAGIC;
    if !fits {
        return Err(invalid(format!(
            "the stream footer at byte {} does not match its stream",
            start + len + 4
        )));
    }
    Ok(())
}

/// An index as it is read: its CRC32 and length so far.
struct IndexReader<'a, R> {
    input: &'a mut Input<R>,
    start: u64,
    crc: u32,
    len: u64,
}

impl<R: Read> IndexReader<'_, R> {
    fn byte(&mut self) -> io::Result<u8> {
        let b = self.input.byte("a stream index")?;
        self.crc = crc32(self.crc, &[b]);
        self.len += 1;
        Ok(b)
    }

    fn varint(&mut self) -> io::Result<u64> {
        let mut value = 0u64;
        for shift in (0..63).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            // A last byte 0 after the first: more bytes than the number needs.
            if b & 0x80 == 0 && (b != 0 || shift == 0) {
                return Ok(value);
            }
            if b == 0 {
                break;
            }
        }
        Err(invalid(format!(
            "an overlong number in the index at byte {}",
            self.start
        )))
    }
}

/// One block as a stream of its own for lzma-rust2: a stream header with the real stream's
/// flags, the block's bytes (followed through their LZMA2 chunks to find the block's end and
/// sizes, its header checked before the decoder has all of it), then an index listing the
/// block and a footer.
struct BlockFeed<R> {
    input: Input<R>,
    check: u8,
    check_len: u64,
    /// Numbers the block in messages (1 = the artifact's first).
    block: u64,
    phase: Phase,
    /// The made-up stream header, or index and footer, being handed over.
    made_up: Vec<u8>,
    handed: usize,
    /// The block header as collected (its size byte first).
    header: Vec<u8>,
    /// The sizes the block header declares, once it is complete.
    declared: DeclaredSizes,
    /// The largest dictionary the block may ask for (see [`DICTIONARY_PER_OUTPUT`]).
    dictionary_budget: u64,
    /// Compressed bytes of the block so far (LZMA2 chunks with their headers).
    compressed: u64,
    /// Output bytes of the LZMA2 chunks so far.
    uncompressed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// The made-up stream header.
    Head,
    /// The block header: its size byte first, then `len` bytes in all.
    Header { len: usize },
    /// An LZMA2 chunk's control byte (0 ends the block's data).
    ChunkControl,
    /// The rest of a chunk's header: `left` bytes, the sizes big-endian in `value`.
    ChunkHeader { control: u8, left: u8, value: u64 },
    /// Bytes to hand over as they are, then `then`.
    Pass { left: u64, then: AfterPass },
    /// The made-up index and footer.
    Tail,
    /// Everything handed over.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AfterPass {
    /// A chunk's data: the next chunk.
    Chunk,
    /// The block padding: its check.
    Check,
    /// The check: the block is over.
    End,
}

impl<R: Read> BlockFeed<R> {
    fn new(input: Input<R>, check: u8, check_len: u64, block: u64) -> Self {
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&[0, check]);
        head.extend_from_slice(&crc32(0, &[0, check]).to_le_bytes());
        BlockFeed {
            input,
            check,
            check_len,
            block,
            phase: Phase::Head,
            made_up: head,
            handed: 0,
            header: Vec::new(),
            declared: DeclaredSizes::default(),
            dictionary_budget: u64::MAX,
            compressed: 0,
            uncompressed: 0,
        }
    }

    fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// The block's unpadded size (header, compressed data, check), as its index record has it.
    fn unpadded(&self) -> u64 {
        self.header.len() as u64 + self.compressed + self.check_len
    }

    /// Hand over bytes of `made_up`.
    fn hand_made_up(&mut self, buf: &mut [u8], then: Phase) -> usize {
        let rest = &self.made_up[self.handed..];
        let n = rest.len().min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.handed += n;
        if self.handed == self.made_up.len() {
            self.phase = then;
            self.made_up.clear();
            self.handed = 0;
        }
        n
    }

    /// After the block's check: an index of this one block and a footer.
    fn make_tail(&mut self) {
        let mut index = vec![0u8];
        for value in [1, self.unpadded(), self.uncompressed] {
            put_varint(&mut index, value);
        }
        while index.len() % 4 != 0 {
            index.push(0);
        }
        index.extend_from_slice(&crc32(0, &index).to_le_bytes());
        let backward = (index.len() / 4 - 1) as u32;
        let mut footer = backward.to_le_bytes().to_vec();
        footer.extend_from_slice(&[0, self.check]);
        index.extend_from_slice(&crc32(0, &footer).to_le_bytes());
        index.extend_from_slice(&footer);
        index.extend_from_slice(&FOOTER_MAGIC);
        self.made_up = index;
        self.handed = 0;
        self.phase = Phase::Tail;
    }

    /// Follow the block through `data`, the bytes about to be handed over (at most what the
    /// current phase spans, see `read`).
    fn follow(&mut self, data: &[u8]) -> io::Result<()> {
        match self.phase {
            Phase::Header { len } => {
                self.header.extend_from_slice(data);
                if self.header.len() == len {
                    // Before the decoder has the last byte: it allocates the dictionary.
                    self.declared = check_block_header(&self.header, self.block)?;
                    if self.declared.dictionary > self.dictionary_budget {
                        return Err(invalid(format!(
                            "block {} asks for a {}-byte dictionary, more than the blocks \
                             before it leave ({} bytes: {DICTIONARY_PER_OUTPUT} per byte of \
                             output and one largest dictionary; tiny blocks cost a \
                             dictionary each)",
                            self.block, self.declared.dictionary, self.dictionary_budget
                        )));
                    }
                    self.phase = Phase::ChunkControl;
                }
            }
            Phase::ChunkControl => {
                let control = data[0];
                self.compressed += 1;
                self.phase = match control {
                    0 => {
                        let padding = (4 - (self.header.len() as u64 + self.compressed) % 4) % 4;
                        pass(padding, AfterPass::Check)
                    }
                    1 | 2 => Phase::ChunkHeader {
                        control,
                        left: 2,
                        value: 0,
                    },
                    0x80.. => Phase::ChunkHeader {
                        control,
                        // Uncompressed and compressed size, and the properties after a reset.
                        left: if control >= 0xc0 { 5 } else { 4 },
                        value: 0,
                    },
                    _ => {
                        return Err(invalid(format!(
                            "block {} has an invalid LZMA2 chunk ({control:#04x})",
                            self.block
                        )))
                    }
                };
            }
            Phase::ChunkHeader {
                control,
                left,
                mut value,
            } => {
                for &b in data {
                    value = (value << 8) | u64::from(b);
                }
                self.compressed += data.len() as u64;
                let left = left - data.len() as u8;
                if left > 0 {
                    self.phase = Phase::ChunkHeader {
                        control,
                        left,
                        value,
                    };
                    return Ok(());
                }
                let (uncompressed, data_len) = match control {
                    1 | 2 => (value + 1, value + 1),
                    _ => {
                        // The properties byte, after a reset, comes after the sizes.
                        let sizes = if control >= 0xc0 { value >> 8 } else { value };
                        let high = u64::from(control & 0x1f) << 16;
                        ((high | (sizes >> 16)) + 1, (sizes & 0xffff) + 1)
                    }
                };
                self.uncompressed += uncompressed;
                self.phase = pass(data_len, AfterPass::Chunk);
            }
            Phase::Pass { left, then } => {
                let n = data.len() as u64;
                if then == AfterPass::Chunk {
                    self.compressed += n;
                }
                self.phase = match (left - n, then) {
                    (0, AfterPass::Chunk) => Phase::ChunkControl,
                    (0, AfterPass::Check) => pass(self.check_len, AfterPass::End),
                    (0, AfterPass::End) => {
                        self.make_tail();
                        self.phase
                    }
                    (left, then) => Phase::Pass { left, then },
                };
            }
            Phase::Head | Phase::Tail | Phase::Done => unreachable!("nothing read"),
        }
        Ok(())
    }
}

fn pass(left: u64, then: AfterPass) -> Phase {
    Phase::Pass { left, then }
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

impl<R: Read> Read for BlockFeed<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        // Empty passes (no padding, no check) end here without reading.
        while let Phase::Pass { left: 0, .. } = self.phase {
            self.follow(&[])?;
        }
        let span = match self.phase {
            Phase::Head => return Ok(self.hand_made_up(buf, Phase::Header { len: 0 })),
            Phase::Tail => return Ok(self.hand_made_up(buf, Phase::Done)),
            Phase::Done => return Ok(0),
            Phase::Header { len: 0 } => {
                // The size byte: nonzero (the decoder was started at a block header).
                let size = self.input.byte("a block header")?;
                self.header.push(size);
                self.phase = Phase::Header {
                    len: (usize::from(size) + 1) * 4,
                };
                buf[0] = size;
                return Ok(1);
            }
            Phase::Header { len } => (len - self.header.len()) as u64,
            Phase::ChunkControl => 1,
            Phase::ChunkHeader { left, .. } => u64::from(left),
            Phase::Pass { left, .. } => left,
        };
        // Whole: lzma-rust2 reads the padding with one `read`, and short reads cost it calls.
        let want = span.min(buf.len() as u64) as usize;
        let n = bootctl::fsutil::read_full(&mut self.input, &mut buf[..want])?;
        if n < want {
            return Err(invalid(format!(
                "the artifact ends inside block {} (byte {})",
                self.block, self.input.offset
            )));
        }
        self.follow(&buf[..n])?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests;
