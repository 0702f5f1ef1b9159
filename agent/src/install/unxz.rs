//! Decoding xz images with resume points at block boundaries and inside blocks.
//!
//! An xz stream is a header, blocks, an index listing every block's sizes, and a footer; a
//! file may hold several streams (with zero padding between them). Every block is compressed
//! on its own: a decoder can start at any block header knowing only the stream's check type.
//! `xz -T` (what Yocto's image conversion runs), `pixz` and `xz --block-size` write many
//! blocks; plain single-threaded `xz` writes one per stream, so such an image has block
//! boundaries only at its streams' ends: its points are inside the block ([`InBlock`]).
//!
//! [`XzDecoder`] follows the container and decodes every block itself: the block header
//! (checked whole before anything is allocated: its CRC32, reserved flags, known filters with
//! valid properties, LZMA2 last and only there, zero padding, the dictionary against
//! [`super::compress::MAX_XZ_DICTIONARY`]), the LZMA2 data with the agent's own decoder
//! ([`lzma2`], whose state at a chunk boundary is at hand), the filters before LZMA2 with
//! lzma-rust2's public delta and branch-converter readers, the block's padding, its check
//! (CRC32, CRC64 or SHA-256, over its output) and the sizes its header may declare. Every
//! stream's header and footer CRCs are checked, and every index against the blocks decoded
//! (their count and, through a sha256 of the records, their sizes) without holding the index
//! in memory.
//!
//! Inside a block, when asked to ([`XzDecoder::points_inside_blocks`]), the decoder stops at
//! LZMA2 chunk boundaries of blocks of LZMA2 alone with a check (any dictionary the device
//! decodes, [`MAX_RESUME_DICTIONARY`]): there its state is the block's start and header, the check's
//! state, the LZMA2 decoder's ([`lzma2::LzmaState`], the bytes since the dictionary's reset)
//! and the output's last bytes the dictionary holds (on the slot; the caller reads them back).
//! A block resumed there is checked as a whole at its end (its check over its whole output,
//! its sizes, its index record), so a wrong state fails the block instead of writing a wrong
//! image unnoticed; a block without a check has no point inside it.
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

use lzma_rust2::filter::bcj::BcjReader;
use lzma_rust2::filter::delta::DeltaReader;

use super::compress::{check_block_header, DeclaredSizes, XzFilter};
use super::sha256_state::Sha256State;
use lzma2::Lzma2Reader;
pub use lzma2::ResumeWindow;

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
    /// A point inside a block (at an LZMA2 chunk boundary; see
    /// [`XzDecoder::points_inside_blocks`]): the block's state there.
    pub in_block: Option<Box<InBlock>>,
}

impl Boundary {
    /// Where a decoder continues from this point.
    pub fn resume_at(&self) -> ResumeAt {
        ResumeAt {
            artifact_offset: self.artifact_offset,
            out: self.out,
            state: self.state,
            in_block: self.in_block.clone(),
        }
    }
}

/// The largest dictionary of a block with points inside it: every one the device decodes
/// (`xz -9`'s 64 MiB). A resume holds no more than a fresh decoder: it reads the slot's bytes
/// straight into the dictionary ([`ResumeWindow`]).
pub const MAX_RESUME_DICTIONARY: u64 = super::compress::MAX_XZ_DICTIONARY;

/// A block's state at an LZMA2 chunk boundary inside it: with the output before the point
/// (the dictionary's bytes, [`ResumeAt::window`]), what a decoder continuing there
/// needs. Made only in blocks of LZMA2 alone with a check (which a wrong state then fails at
/// the block's end) and a dictionary of at most [`MAX_RESUME_DICTIONARY`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InBlock {
    /// Artifact offset of the block header.
    pub block_start: u64,
    /// Output bytes before the block.
    pub block_out: u64,
    /// The block header (its size byte to its CRC).
    pub header: Vec<u8>,
    /// Output bytes since the LZMA2 data's last dictionary reset.
    pub since_reset: u64,
    /// Whether the next LZMA chunk must bring properties (after a stored chunk with a
    /// dictionary reset).
    pub need_props: bool,
    pub lzma: lzma2::LzmaState,
    /// The block's check over its output before the point.
    pub check: Check,
}

impl InBlock {
    /// `BLOCK_START:BLOCK_OUT:HEADER:SINCE_RESET:NEED_PROPS:LZMA:CHECK`: the header in hex,
    /// NEED_PROPS 0 or 1, LZMA as [`lzma2::LzmaState::to_text`], CHECK the check's state last
    /// (a CRC in decimal, a sha256 state as [`Sha256State::to_text`]).
    fn to_text(&self) -> String {
        let check = match &self.check {
            Check::None => String::new(),
            Check::Crc32(crc) => crc.to_string(),
            Check::Crc64(crc) => crc.to_string(),
            Check::Sha256(state) => state.to_text(),
        };
        format!(
            "{}:{}:{}:{}:{}:{}:{check}",
            self.block_start,
            self.block_out,
            hex::encode(&self.header),
            self.since_reset,
            u8::from(self.need_props),
            self.lzma.to_text(),
        )
    }

    /// What [`Self::to_text`] wrote, for a stream of check type `check`.
    fn from_text(text: &str, check: u8) -> Option<Self> {
        // BLOCK_START, BLOCK_OUT, HEADER, SINCE_RESET, NEED_PROPS, the LZMA state's 4 fields,
        // the check's (a sha256 state has colons).
        let fields: Vec<&str> = text.splitn(10, ':').collect();
        let [start, out, header, since, props, l1, l2, l3, l4, check_text] = fields[..] else {
            return None;
        };
        let lzma = [l1, l2, l3, l4];
        let number = |t: &str| t.parse::<u64>().ok();
        let check = match check {
            1 => Check::Crc32(check_text.parse().ok()?),
            4 => Check::Crc64(check_text.parse().ok()?),
            10 => Check::Sha256(Box::new(Sha256State::from_text(check_text)?)),
            _ => return None,
        };
        Some(InBlock {
            block_start: number(start)?,
            block_out: number(out)?,
            header: hex::decode(header).ok()?,
            since_reset: number(since)?,
            need_props: match props {
                "0" => false,
                "1" => true,
                _ => return None,
            },
            lzma: lzma2::LzmaState::from_text(&lzma.join(":"))?,
            check,
        })
    }

    /// Whether this can be the state of a point at `artifact_offset`, `out` that the decoder
    /// made in a stream `stream` (see [`ResumeAt::plausible`]).
    fn plausible(&self, artifact_offset: u64, out: u64, stream: &XzState) -> bool {
        let header_len = self.header.len() as u64;
        let Some(&size) = self.header.first() else {
            return false;
        };
        // The length first: the header is a record's text, not what the decoder read.
        if header_len != (u64::from(size) + 1) * 4 {
            return false;
        }
        let Ok(declared) = check_block_header(&self.header, 1) else {
            return false;
        };
        let Some(data_start) = self.block_start.checked_add(header_len) else {
            return false;
        };
        let (data, decoded) = (
            artifact_offset.saturating_sub(data_start),
            out.saturating_sub(self.block_out),
        );
        let check_fits = match &self.check {
            Check::None => false,
            Check::Crc32(_) => stream.check == 1,
            Check::Crc64(_) => stream.check == 4,
            Check::Sha256(state) => stream.check == 10 && state.len() == decoded,
        };
        let dict = lzma2::dict_len(declared.dictionary) as u64;
        // The block's start is a block boundary the stream's header and blocks before allow.
        let start = ResumeAt {
            artifact_offset: self.block_start,
            out: self.block_out,
            state: *stream,
            in_block: None,
        };
        check_fits
            && start.boundary_fits(true)
            && declared.filters == [None; 3]
            && declared.dictionary <= MAX_RESUME_DICTIONARY
            && declared.compressed.is_none_or(|c| data < c)
            && declared.uncompressed.is_none_or(|u| decoded <= u)
            && artifact_offset > data_start
            && decoded > 0
            && self.since_reset > 0
            && self.since_reset <= decoded
            && self.lzma.valid()
            && self.lzma.reps.iter().all(|&r| u64::from(r) < dict)
    }
}

/// `XzState::to_text`, and for a point inside a block its [`InBlock`] state after a colon: the
/// record's `xz_state`. An agent that knows only block boundaries refuses the longer text
/// (its `XzState::from_text` takes four fields), so it starts over instead of taking the
/// point for a block header.
pub fn state_text(state: &XzState, in_block: Option<&InBlock>) -> String {
    match in_block {
        None => state.to_text(),
        Some(b) => format!("{}:{}", state.to_text(), b.to_text()),
    }
}

/// What [`state_text`] wrote.
pub fn state_from_text(text: &str) -> Option<(XzState, Option<Box<InBlock>>)> {
    let mut parts = text.splitn(5, ':');
    let head: Vec<&str> = parts.by_ref().take(4).collect();
    let state = XzState::from_text(&head.join(":"))?;
    match parts.next() {
        None => Some((state, None)),
        Some(rest) => Some((
            state,
            Some(Box::new(InBlock::from_text(rest, state.check)?)),
        )),
    }
}

/// Where a resumed decoder continues (from a resume record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeAt {
    pub artifact_offset: u64,
    pub out: u64,
    pub state: XzState,
    /// A point inside a block: the block's state there.
    pub in_block: Option<Box<InBlock>>,
}

impl ResumeAt {
    /// Whether a point read from a record can be one this decoder made: at a block header of a
    /// stream with a supported check, after some output, with room for its blocks between the
    /// stream's header and the point, in the artifact's first stream only with no output
    /// before the stream (the index's sums bind the point's output offset only to the
    /// stream's). Checked before the slot is read; the stream's index checks the rest at its
    /// end.
    pub fn plausible(&self) -> bool {
        match &self.in_block {
            None => self.boundary_fits(false),
            Some(b) => b.plausible(self.artifact_offset, self.out, &self.state),
        }
    }

    /// The dictionary a resume at this point continues with, to be given the output's bytes
    /// before the point ([`ResumeWindow::update`]): inside a block only (at a block boundary
    /// the decoder needs none of them), if its header parses with a dictionary a resume may
    /// hold.
    pub fn window(&self) -> Option<ResumeWindow> {
        let b = self.in_block.as_ref()?;
        let declared = check_block_header(&b.header, 1).ok()?;
        (declared.dictionary <= MAX_RESUME_DICTIONARY)
            .then(|| ResumeWindow::new(declared.dictionary, b.since_reset, self.out))
    }

    /// Whether the point can be a block boundary (`block_start`: a block's start, which may be
    /// the stream's first and at output 0; else a point after some output).
    fn boundary_fits(&self, block_start: bool) -> bool {
        let s = &self.state;
        let Some(span) = self
            .artifact_offset
            .checked_sub(s.stream_start)
            .and_then(|d| d.checked_sub(HEADER_LEN))
        else {
            return false;
        };
        check_len(s.check).is_some()
            && (self.out > 0 || block_start)
            && self.out >= s.stream_out
            && span % 4 == 0
            && s.blocks
                .checked_mul(MIN_BLOCK)
                .is_some_and(|min| min <= span)
            && (s.blocks > 0 || (span == 0 && (s.stream_start > 0 || block_start)))
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
    /// Whether to report points inside blocks too ([`Self::points_inside_blocks`]).
    inside_blocks: bool,
}

enum Stage<R: Read> {
    /// Between two blocks (or streams): the decoder holds the artifact.
    Between(Input<R>),
    /// In a block: its decoder holds the artifact.
    Block(Box<Block<R>>),
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
            inside_blocks: false,
        }
    }

    /// A decoder continuing at `at`, a block boundary: `source` is the artifact from
    /// `at.artifact_offset` on, `hash` the artifact hash's state over the bytes before it.
    pub fn resume(source: R, at: &ResumeAt, hash: Option<Sha256State>) -> io::Result<Self> {
        Self::resume_with_window(source, at, hash, None)
    }

    /// [`Self::resume`] at a point a block boundary or inside a block: `window`, inside a
    /// block [`ResumeAt::window`] given every output byte before the point (the block's
    /// dictionary); none at a block boundary.
    pub fn resume_with_window(
        source: R,
        at: &ResumeAt,
        hash: Option<Sha256State>,
        window: Option<ResumeWindow>,
    ) -> io::Result<Self> {
        if !at.plausible() {
            return Err(invalid(format!(
                "resume point at byte {} is not a block boundary of a stream or a point in a block",
                at.artifact_offset
            )));
        }
        let check_len = check_len(at.state.check).expect("plausible checked it");
        let input = Input {
            source: BufReader::with_capacity(SOURCE_BUFFER, source),
            offset: at.artifact_offset,
            hash,
        };
        // In a block, the index's records before the block must add up to its start.
        let (stage, resumed_at) = match &at.in_block {
            None => {
                if window.is_some() {
                    return Err(invalid("a window for a point between blocks".into()));
                }
                (Stage::Between(input), (at.artifact_offset, at.out))
            }
            Some(b) => {
                let declared = check_block_header(&b.header, at.state.blocks + 1)?;
                let header_len = b.header.len() as u64;
                let window = window
                    .filter(|w| w.total() == at.out)
                    .ok_or_else(|| invalid("no window for this point inside a block".into()))?;
                let lzma2 = Lzma2Reader::resume(
                    input,
                    declared.dictionary,
                    (b.lzma.clone(), b.need_props, b.since_reset),
                    window,
                    (
                        at.artifact_offset - b.block_start - header_len,
                        at.out - b.block_out,
                    ),
                )?;
                let block = Block {
                    chain: Chain::Lzma2(lzma2),
                    check: b.check.clone(),
                    start: b.block_start,
                    header: b.header.clone(),
                    declared,
                    out_before: b.block_out,
                };
                (Stage::Block(Box::new(block)), (b.block_start, b.block_out))
            }
        };
        let in_block = u64::from(at.in_block.is_some());
        Ok(XzDecoder {
            stage,
            stream: Some(Stream {
                state: at.state,
                check_len,
                decoded: 0,
                records: Sha256::new(),
                resumed_at: Some(resumed_at),
            }),
            out: at.out,
            points_from: u64::MAX,
            boundary: None,
            reported_at: Some(at.artifact_offset),
            blocks: at.state.blocks + in_block,
            dictionaries: 0,
            inside_blocks: false,
        })
    }

    /// Report points inside blocks too, at LZMA2 chunk boundaries (see [`InBlock`]): a resume
    /// needs the output's last bytes before such a point ([`Self::resume_with_window`]).
    pub fn points_inside_blocks(&mut self, on: bool) {
        self.inside_blocks = on;
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
            Stage::Block(block) => block.chain.into_lzma2().into_inner().hash,
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
                        in_block: None,
                    });
                    return Ok((Stage::Between(input), true));
                }
                self.blocks += 1;
                let budget = super::compress::MAX_XZ_DICTIONARY
                    .saturating_add(self.out.saturating_mul(DICTIONARY_PER_OUTPUT))
                    .saturating_sub(self.dictionaries);
                let block = Block::start(input, state.check, self.blocks, budget, self.out)?;
                Ok((Stage::Block(Box::new(block)), false))
            }
        }
    }

    /// The block just decoded ended: check its output against its chunks and its header,
    /// read its padding and check, add its record.
    fn end_block(&mut self, block: Block<R>) -> io::Result<Input<R>> {
        let Block {
            chain,
            check,
            header,
            declared,
            out_before,
            ..
        } = block;
        let header_len = header.len() as u64;
        let lzma2 = chain.into_lzma2();
        let decoded = self.out - out_before;
        if !lzma2.ended() || decoded != lzma2.uncompressed() {
            return Err(invalid(format!(
                "block {} decoded to {decoded} bytes, its chunks hold {}",
                self.blocks,
                lzma2.uncompressed()
            )));
        }
        let compressed = lzma2.compressed();
        if declared.compressed.is_some_and(|c| c != compressed)
            || declared.uncompressed.is_some_and(|u| u != decoded)
        {
            return Err(invalid(format!(
                "block {} has {compressed} compressed bytes for {decoded} bytes, its header \
                 declares {:?} and {:?}",
                self.blocks, declared.compressed, declared.uncompressed
            )));
        }
        let mut input = lzma2.into_inner();
        for _ in 0..(4 - (header_len + compressed) % 4) % 4 {
            if input.byte("a block")? != 0 {
                return Err(invalid(format!(
                    "block {} has non-zero padding",
                    self.blocks
                )));
            }
        }
        let stream = self.stream.as_mut().expect("a block is in a stream");
        let mut stored = [0u8; 32];
        let stored = &mut stored[..stream.check_len as usize];
        input.read_exact_here(stored, "a block's check")?;
        if !check.matches(stored) {
            return Err(invalid(format!(
                "block {} is corrupt (its check does not match)",
                self.blocks
            )));
        }
        self.dictionaries = self.dictionaries.saturating_add(declared.dictionary);
        let unpadded = header_len + compressed + stream.check_len;
        stream.decoded += 1;
        stream.records.update(unpadded.to_le_bytes());
        stream.records.update(decoded.to_le_bytes());
        Ok(input)
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
                Stage::Block(mut block) => {
                    if self.inside_blocks && self.out >= self.points_from {
                        if let Some(in_block) = block.point() {
                            let Chain::Lzma2(lzma2) = &block.chain else {
                                unreachable!("a point is in LZMA2 alone")
                            };
                            let input = lzma2.inner();
                            if self.reported_at != Some(input.offset) {
                                self.reported_at = Some(input.offset);
                                let stream = self.stream.as_ref().expect("a block is in a stream");
                                self.boundary = Some(Boundary {
                                    artifact_offset: input.offset,
                                    out: self.out,
                                    state: XzState {
                                        blocks: stream.state.blocks + stream.decoded,
                                        ..stream.state
                                    },
                                    artifact_hash: input.hash.clone(),
                                    in_block: Some(in_block),
                                });
                                self.stage = Stage::Block(block);
                                return Err(io::ErrorKind::Interrupted.into());
                            }
                        }
                    }
                    let n = block.chain.read(buf)?;
                    if n > 0 {
                        block.check.update(&buf[..n]);
                        self.out += n as u64;
                        self.stage = Stage::Block(block);
                        return Ok(n);
                    }
                    let input = self.end_block(*block)?;
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

/// A block being decoded: its LZMA2 data through the filters before it, its check as the
/// output goes by.
struct Block<R: Read> {
    chain: Chain<R>,
    check: Check,
    /// Artifact offset of the block header.
    start: u64,
    /// The block header.
    header: Vec<u8>,
    /// What the block header says.
    declared: DeclaredSizes,
    /// Output bytes before the block.
    out_before: u64,
}

impl<R: Read> Block<R> {
    /// Read block `block`'s header (the artifact is at its size byte, not 0) and start
    /// decoding its data: a block of a stream with check type `check`, at output offset `out`,
    /// whose dictionary may be at most `budget` bytes (see [`DICTIONARY_PER_OUTPUT`]).
    fn start(
        mut input: Input<R>,
        check: u8,
        block: u64,
        budget: u64,
        out: u64,
    ) -> io::Result<Self> {
        let start = input.offset;
        let size = input.byte("a block header")?;
        let mut header = vec![0u8; (usize::from(size) + 1) * 4];
        header[0] = size;
        input.read_exact_here(&mut header[1..], "a block header")?;
        let declared = check_block_header(&header, block)?;
        if declared.dictionary > budget {
            return Err(invalid(format!(
                "block {block} asks for a {}-byte dictionary, more than the blocks before it \
                 leave ({budget} bytes: {DICTIONARY_PER_OUTPUT} per byte of output and one \
                 largest dictionary; tiny blocks cost a dictionary each)",
                declared.dictionary
            )));
        }
        let mut chain = Chain::Lzma2(Lzma2Reader::new(input, declared.dictionary));
        for filter in declared.filters.iter().rev().flatten() {
            chain = match *filter {
                XzFilter::Delta(distance) => {
                    Chain::Delta(Box::new(DeltaReader::new(chain, distance)))
                }
                XzFilter::Bcj(id, start) => {
                    let start = start as usize;
                    Chain::Bcj(Box::new(match id {
                        0x04 => BcjReader::new_x86(chain, start),
                        0x05 => BcjReader::new_ppc(chain, start),
                        0x06 => BcjReader::new_ia64(chain, start),
                        0x07 => BcjReader::new_arm(chain, start),
                        0x08 => BcjReader::new_arm_thumb(chain, start),
                        0x09 => BcjReader::new_sparc(chain, start),
                        0x0a => BcjReader::new_arm64(chain, start),
                        _ => BcjReader::new_riscv(chain, start),
                    }))
                }
            };
        }
        Ok(Block {
            chain,
            check: Check::new(check),
            start,
            header,
            declared,
            out_before: out,
        })
    }

    /// The block's state here if this is a point inside it: a chunk boundary of LZMA2 data
    /// without other filters, with a check (see [`InBlock`]).
    fn point(&self) -> Option<Box<InBlock>> {
        let Chain::Lzma2(lzma2) = &self.chain else {
            return None;
        };
        if matches!(self.check, Check::None)
            || self.declared.dictionary > MAX_RESUME_DICTIONARY
            || !lzma2.at_chunk_boundary()
        {
            return None;
        }
        let (lzma, need_props, since_reset) = lzma2.state();
        Some(Box::new(InBlock {
            block_start: self.start,
            block_out: self.out_before,
            header: self.header.clone(),
            since_reset,
            need_props,
            lzma: lzma.clone(),
            check: self.check.clone(),
        }))
    }
}

/// A block's LZMA2 decoder, under the filters before it (the first, outermost).
// In a boxed `Block`; LZMA2 alone, the common chain, without one more indirection.
#[allow(clippy::large_enum_variant)]
enum Chain<R: Read> {
    Lzma2(Lzma2Reader<Input<R>>),
    Delta(Box<DeltaReader<Chain<R>>>),
    Bcj(Box<BcjReader<Chain<R>>>),
}

impl<R: Read> Read for Chain<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Chain::Lzma2(reader) => reader.read(buf),
            Chain::Delta(reader) => reader.read(buf),
            Chain::Bcj(reader) => reader.read(buf),
        }
    }
}

impl<R: Read> Chain<R> {
    fn into_lzma2(self) -> Lzma2Reader<Input<R>> {
        match self {
            Chain::Lzma2(reader) => reader,
            Chain::Delta(reader) => reader.into_inner().into_lzma2(),
            Chain::Bcj(reader) => reader.into_inner().into_lzma2(),
        }
    }
}

/// A block's check as its output goes by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    None,
    Crc32(u32),
    Crc64(u64),
    Sha256(Box<Sha256State>),
}

impl Check {
    /// The check of a stream's check type (one [`check_len`] knows).
    fn new(check: u8) -> Self {
        match check {
            1 => Check::Crc32(0),
            4 => Check::Crc64(0),
            10 => Check::Sha256(Box::default()),
            _ => Check::None,
        }
    }

    fn update(&mut self, data: &[u8]) {
        match self {
            Check::None => {}
            Check::Crc32(crc) => *crc = crc32(*crc, data),
            Check::Crc64(crc) => *crc = crc64(*crc, data),
            Check::Sha256(state) => state.update(data),
        }
    }

    /// Whether `stored`, a block's check field, holds this check.
    fn matches(&self, stored: &[u8]) -> bool {
        match self {
            Check::None => stored.is_empty(),
            Check::Crc32(crc) => stored == crc.to_le_bytes(),
            Check::Crc64(crc) => stored == crc.to_le_bytes(),
            Check::Sha256(state) => stored == state.finish(),
        }
    }
}

/// CRC-64 as xz computes it (ECMA-182, reflected), continued from `crc` over `bytes`: eight
/// bytes a step ("slicing by 8"; a byte a step costs ~0.25 CPU s per 100 MiB, a tenth of the
/// decoding), with tables made on first use (16 KiB that the binary does not carry).
fn crc64(crc: u64, bytes: &[u8]) -> u64 {
    static TABLES: std::sync::OnceLock<Box<[[u64; 256]; 8]>> = std::sync::OnceLock::new();
    let t = TABLES.get_or_init(|| {
        let mut t = Box::new([[0u64; 256]; 8]);
        for i in 0..256 {
            let mut c = i as u64;
            for _ in 0..8 {
                c = (c >> 1) ^ (0xc96c_5795_d787_0f42 & 0u64.wrapping_sub(c & 1));
            }
            t[0][i] = c;
        }
        for i in 0..256 {
            for k in 1..8 {
                let c = t[k - 1][i];
                t[k][i] = (c >> 8) ^ t[0][(c & 0xff) as usize];
            }
        }
        t
    });
    let mut c = !crc;
    let mut words = bytes.chunks_exact(8);
    for word in &mut words {
        let v = c ^ u64::from_le_bytes(word.try_into().expect("8 bytes"));
        c = t[7][(v & 0xff) as usize]
            ^ t[6][((v >> 8) & 0xff) as usize]
            ^ t[5][((v >> 16) & 0xff) as usize]
            ^ t[4][((v >> 24) & 0xff) as usize]
            ^ t[3][((v >> 32) & 0xff) as usize]
            ^ t[2][((v >> 40) & 0xff) as usize]
            ^ t[1][((v >> 48) & 0xff) as usize]
            ^ t[0][(v >> 56) as usize];
    }
    for &b in words.remainder() {
        c = t[0][((c ^ u64::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// A number as xz writes it in indexes and block headers (the tests make those).
#[cfg(test)]
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push(value as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

mod lzma2;
#[cfg(test)]
mod tests;
