//! A zstd decoder (RFC 8878, frames and skippable frames like [`super::compress::ZstdReader`])
//! that reports block boundaries, so a plain zstd image can resume after a restart or power
//! cut (see [`super::resume`]).
//!
//! The C library cannot restart a decoder in the middle of a frame, but it can start a frame
//! with a dictionary, and a zstd dictionary holds exactly what a block may refer back to: the
//! Huffman table of the literals, the three FSE tables of the sequences, the three repeat
//! offsets and the content before it (the window). So between two blocks the decoder's state
//! is the window (on the slot) plus a few hundred bytes. This module follows the compressed
//! stream beside the decoder, without decoding it: it keeps the latest table descriptions as
//! they pass, and to know the repeat offsets it decodes the sequences (not the literals) of a
//! block or two when a resume point is wanted. Resuming loads a dictionary made of those
//! tables, offsets and the window, and hands the decoder a frame header of its own followed by
//! the rest of the frame's blocks.
//!
//! A resumed frame is checked end to end as a fresh one is: its content checksum (the low 32
//! bits of XXH64, as in the frame) is computed over the slot's part of the frame and the
//! decoder's output and compared with the frame's, and its content size, when its header has
//! one, with what came out; frames without a checksum get no resume points inside. A state
//! that is wrong (tampered with, or a bug of this module) therefore fails the frame instead of
//! writing a wrong image. The dictionary stands in for what a state cannot hold as it was (an
//! RLE table, a table or tree the frame never set), so the first blocks after a resume point
//! are read ahead whole until the frame has set them all: a block repeating an RLE table is
//! rewritten to set it itself, one repeating a table the frame never set is refused as a fresh
//! decoder refuses it. Nothing here binds a point between two frames to the output before it:
//! the resume record's sha256 of the slot's prefix does.

mod follow;
mod xxh64;

use std::io::{self, BufRead, BufReader, Read};

use zstd::zstd_safe::{DCtx, DParameter, InBuffer, OutBuffer};

use self::follow::{Lost, Rep, Table, LL, ML, OF};
use self::xxh64::Xxh64;
use super::compress::{decoder_error, hand_header, invalid, start_frame, MAX_ZSTD_WINDOW_LOG};
use super::sha256_state::Sha256State;

/// The largest window a resume point is made for: the resume reads it from the slot and the
/// decoder holds it twice (dictionary and window) for the rest of the frame.
pub const MAX_RESUME_WINDOW: u64 = 8 << 20;

/// The compressed side's buffer (as [`super::compress::ZstdReader`]'s).
const SOURCE_BUFFER: usize = 16 * 1024;

/// Captured blocks in a row whose repeat offsets did not all become known before the follower
/// gives up until the frame ends (each holds three new offsets in practice).
const MAX_TRIES: u32 = 8;

/// The tail of the slot's prefix a resumed slot writer starts its buffers with.
const WRITER_TAIL: u64 = super::slot::DIRECT_ALIGN as u64;

/// The smallest zstd frame: magic, frame header descriptor, window descriptor, one empty
/// block. No resume point is before its end.
const MIN_FRAME: u64 = 4 + 2 + 3;

/// What a fresh decoder needs at a boundary besides the window bytes (saved as text in the
/// resume record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ZstdState {
    /// Between two frames: nothing.
    Between,
    /// Between two blocks of a frame.
    InFrame(FrameState),
}

/// A frame's state between two of its blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrameState {
    /// Output offset of the frame's first byte.
    pub frame_start: u64,
    /// The frame's window size.
    pub window: u64,
    /// The frame's content size, when its header has one (a resumed frame is checked
    /// against it at its end: the decoder is not told it).
    pub content_size: Option<u64>,
    /// The Huffman tree description the literals use when they repeat it.
    pub huffman: Option<Vec<u8>>,
    /// Literal lengths, offsets, match lengths.
    pub tables: [Table; 3],
    pub reps: [u32; 3],
}

impl FrameState {
    /// What a point ever holds: a window this module makes points for, repeat offsets within
    /// it, a tree description of a valid length.
    fn valid(&self) -> bool {
        self.window <= MAX_RESUME_WINDOW
            && self
                .reps
                .iter()
                .all(|&r| r > 0 && u64::from(r) <= self.window)
            && self
                .huffman
                .as_ref()
                .is_none_or(|h| (2..=129).contains(&h.len()))
            && self.content_size.is_none_or(|s| s > 0)
    }

    /// Bytes of output before `out` the frame may refer to.
    fn window_len(&self, out: u64) -> u64 {
        self.window.min(out.saturating_sub(self.frame_start))
    }

    /// A zstd dictionary (RFC 8878 section 5) that starts a decoder in this state: the
    /// tables, the repeat offsets and `window` as content. None when a table is not valid.
    fn dictionary(&self, window: &[u8]) -> Option<Vec<u8>> {
        // A valid tree of two symbols, standing in for a tree the frame never set (the
        // blocks after the point are checked not to use it, see [`follow::check_resumed_block`]).
        const NO_TREE: [u8; 2] = [0x80, 0x10];
        let mut dict = Vec::with_capacity(window.len() + 1024);
        dict.extend_from_slice(&0xEC30_A437u32.to_le_bytes());
        dict.extend_from_slice(&1u32.to_le_bytes());
        dict.extend_from_slice(self.huffman.as_deref().unwrap_or(&NO_TREE));
        for t in [OF, ML, LL] {
            // An RLE table cannot be a dictionary's (its accuracy log would be 0): it is set
            // again in the first block that repeats it; an unset one must never be repeated
            // ([`follow::check_resumed_block`]).
            let table = match &self.tables[t] {
                Table::Rle(_) | Table::Unset => &Table::Predefined,
                table => table,
            };
            let (counts, log) = follow::table_counts(t, table)?;
            dict.extend_from_slice(&follow::write_ncount(&counts, log));
        }
        for rep in self.reps {
            dict.extend_from_slice(&rep.to_le_bytes());
        }
        dict.extend_from_slice(window);
        Some(dict)
    }

    /// The header of the frame a resumed decoder is handed: no content size, no checksum (it
    /// is checked here), no dictionary id, a window at least the original's.
    fn frame_header(&self) -> [u8; 6] {
        let mut descriptor = 0u8;
        'search: for exponent in 0..=31u8 {
            let base = 1u64 << (10 + exponent);
            for mantissa in 0..8u8 {
                if base + base / 8 * u64::from(mantissa) >= self.window {
                    descriptor = (exponent << 3) | mantissa;
                    break 'search;
                }
            }
        }
        let mut header = [0x28, 0xb5, 0x2f, 0xfd, 0, 0];
        header[5] = descriptor;
        header
    }
}

fn table_text(table: &Table) -> String {
    match table {
        Table::Unset => "-".into(),
        Table::Predefined => "p".into(),
        Table::Rle(symbol) => format!("r{symbol:02x}"),
        Table::Fse(bytes) => format!("f{}", hex::encode(bytes)),
    }
}

fn table_from_text(text: &str, t: usize) -> Option<Table> {
    let (kind, rest) = text.split_at_checked(1)?;
    Some(match kind {
        "-" if rest.is_empty() => Table::Unset,
        "p" if rest.is_empty() => Table::Predefined,
        "r" if rest.len() == 2 => Table::Rle(u8::from_str_radix(rest, 16).ok()?),
        "f" => {
            let bytes = hex::decode(rest).ok()?;
            // Exactly one description, as a block holds it.
            let (_, _, len) = follow::read_ncount(&bytes, t).ok()?;
            (len == bytes.len()).then_some(())?;
            Table::Fse(bytes)
        }
        _ => return None,
    })
}

impl ZstdState {
    /// A compact text form for the resume record: `between`, or
    /// `frame:START:WINDOW:SIZE:HUFFMAN:LL:OF:ML:REP1,REP2,REP3` (SIZE `-` when the frame
    /// header has no content size).
    pub fn to_text(&self) -> String {
        match self {
            ZstdState::Between => "between".into(),
            ZstdState::InFrame(f) => format!(
                "frame:{}:{}:{}:{}:{}:{}:{}:{},{},{}",
                f.frame_start,
                f.window,
                f.content_size.map_or("-".into(), |s| s.to_string()),
                f.huffman.as_deref().map(hex::encode).unwrap_or("-".into()),
                table_text(&f.tables[LL]),
                table_text(&f.tables[OF]),
                table_text(&f.tables[ML]),
                f.reps[0],
                f.reps[1],
                f.reps[2],
            ),
        }
    }

    /// Parses [`Self::to_text`]; None for anything else.
    pub fn from_text(text: &str) -> Option<Self> {
        if text == "between" {
            return Some(ZstdState::Between);
        }
        let fields: Vec<&str> = text.strip_prefix("frame:")?.split(':').collect();
        let [start, window, size, huffman, ll, of, ml, reps] = fields[..] else {
            return None;
        };
        let content_size = match size {
            "-" => None,
            s => Some(s.parse().ok()?),
        };
        let huffman = match huffman {
            "-" => None,
            h => Some(hex::decode(h).ok()?),
        };
        let reps: Vec<u32> = reps
            .split(',')
            .map(|r| r.parse().ok())
            .collect::<Option<_>>()?;
        let state = FrameState {
            frame_start: start.parse().ok()?,
            window: window.parse().ok()?,
            content_size,
            huffman,
            tables: [
                table_from_text(ll, LL)?,
                table_from_text(of, OF)?,
                table_from_text(ml, ML)?,
            ],
            reps: reps.try_into().ok()?,
        };
        state.valid().then_some(ZstdState::InFrame(state))
    }
}

/// A block (or frame) boundary: the output before `out` is all handed out, and a decoder
/// resumed here with the artifact from `artifact_offset` continues the stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boundary {
    /// The artifact byte where the next block (or frame) starts: a resume downloads from here.
    pub artifact_offset: u64,
    /// Output bytes before the boundary.
    pub out: u64,
    pub state: ZstdState,
    /// The artifact hash over bytes `0..artifact_offset` (None when not hashing).
    pub artifact_hash: Option<Sha256State>,
}

impl Boundary {
    /// Where a decoder continues from this point.
    pub fn resume_at(&self) -> ResumeAt {
        ResumeAt {
            artifact_offset: self.artifact_offset,
            out: self.out,
            state: self.state.clone(),
        }
    }
}

/// Where a resumed decoder continues (from a resume record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeAt {
    pub artifact_offset: u64,
    pub out: u64,
    pub state: ZstdState,
}

impl ResumeAt {
    /// Whether a point read from a record can be one this decoder made: checked before the
    /// slot's prefix is read (a resume checks it again, with the prefix). A point is never
    /// before the end of a first frame, and a point inside a frame is after the frame's start,
    /// with offsets within its window and no more output than its content size.
    pub fn plausible(&self) -> bool {
        if self.artifact_offset < MIN_FRAME || self.out == 0 {
            return false;
        }
        match &self.state {
            ZstdState::Between => true,
            ZstdState::InFrame(f) => {
                f.valid()
                    && f.frame_start < self.out
                    && f.reps
                        .iter()
                        .all(|&r| u64::from(r) <= f.window_len(self.out))
                    && f.content_size.is_none_or(|s| self.out - f.frame_start <= s)
            }
        }
    }
}

/// What a resume needs of the slot's bytes before the resume point: fed all of them, in
/// order, it keeps the window and the checksum state of the frame the point is in.
pub struct ResumePrefix {
    out: u64,
    fed: u64,
    /// The frame's first byte and its checksum so far (a point inside a frame).
    frame: Option<(u64, Xxh64)>,
    /// The last `keep` bytes so far: a ring, no larger than that (a window may be 8 MiB, and
    /// the prefix comes in small pieces), made contiguous when the last byte came.
    tail: std::collections::VecDeque<u8>,
    keep: usize,
}

impl ResumePrefix {
    pub fn new(at: &ResumeAt) -> Self {
        let writer_tail = at.out.min(WRITER_TAIL);
        let (frame, keep) = match &at.state {
            ZstdState::Between => (None, writer_tail),
            ZstdState::InFrame(f) => (
                Some((f.frame_start, Xxh64::default())),
                f.window_len(at.out).max(writer_tail),
            ),
        };
        ResumePrefix {
            out: at.out,
            fed: 0,
            frame,
            tail: std::collections::VecDeque::with_capacity(keep as usize),
            keep: keep as usize,
        }
    }

    /// The next bytes of the slot's prefix (from offset 0, in order, up to `at.out`).
    pub fn update(&mut self, bytes: &[u8]) {
        let bytes = &bytes[..bytes.len().min((self.out - self.fed) as usize)];
        if let Some((start, check)) = &mut self.frame {
            let skip = start.saturating_sub(self.fed).min(bytes.len() as u64) as usize;
            check.update(&bytes[skip..]);
        }
        self.fed += bytes.len() as u64;
        let kept = &bytes[bytes.len().saturating_sub(self.keep)..];
        let over = (self.tail.len() + kept.len()).saturating_sub(self.keep);
        self.tail.drain(..over);
        self.tail.extend(kept);
        if self.fed == self.out {
            self.tail.make_contiguous();
        }
    }

    /// The prefix's last bytes that the decoder needs (at most [`MAX_RESUME_WINDOW`]; at least
    /// the last 4 KiB when the prefix is that long, for the slot writer).
    pub fn window(&self) -> &[u8] {
        // Contiguous once the whole prefix came (else not a prefix a resume takes).
        self.tail.as_slices().0
    }
}

/// The stage of a decoder.
enum Stage {
    NextFrame,
    InFrame,
    Done,
}

/// Where the follower is in a frame.
#[derive(Debug)]
enum Unit {
    Header {
        bytes: [u8; 3],
        got: usize,
    },
    Block {
        kind: u8,
        size: usize,
        pos: usize,
        last: bool,
    },
    Checksum {
        left: usize,
    },
    Done,
}

/// Follows one frame's blocks (see [`follow`]).
struct Follower {
    frame_start: u64,
    window: u64,
    content_size: Option<u64>,
    huffman: Option<Vec<u8>>,
    tables: [Table; 3],
    reps: [Rep; 3],
    checksum: bool,
    unit: Unit,
    /// No points until the frame ends.
    lost: bool,
    /// A point is wanted: blocks are captured until their repeat offsets are known.
    wanted: bool,
    /// The current block is captured (a point was wanted when it began).
    capturing: bool,
    tries: u32,
    /// The captured block's bytes.
    capture: Vec<u8>,
    /// The first bytes of a compressed block (literals header and Huffman description).
    head: Vec<u8>,
    head_need: usize,
    literals: Option<follow::Literals>,
    /// The sequences header's bytes.
    seq_head: Vec<u8>,
    /// The state at the block end just passed, when a point can be made there.
    ready: Option<FrameState>,
}

impl Follower {
    fn new(frame_start: u64, window: u64, content_size: Option<u64>, checksum: bool) -> Self {
        Follower {
            frame_start,
            window,
            content_size,
            huffman: None,
            tables: [Table::Unset, Table::Unset, Table::Unset],
            reps: [Rep::Known(1), Rep::Known(4), Rep::Known(8)],
            checksum,
            unit: Unit::Header {
                bytes: [0; 3],
                got: 0,
            },
            // A frame without a checksum could not be checked after a resume.
            lost: !checksum || window > MAX_RESUME_WINDOW,
            wanted: false,
            capturing: false,
            tries: 0,
            capture: Vec::new(),
            head: Vec::new(),
            head_need: 0,
            literals: None,
            seq_head: Vec::new(),
            ready: None,
        }
    }

    fn resumed(state: &FrameState) -> Self {
        let mut f = Follower::new(state.frame_start, state.window, state.content_size, true);
        f.huffman = state.huffman.clone();
        f.tables = state.tables.clone();
        f.reps = state.reps.map(Rep::Known);
        f
    }

    /// Bytes to the end of the current header, block or checksum.
    fn unit_left(&self) -> usize {
        match &self.unit {
            Unit::Header { got, .. } => 3 - got,
            Unit::Block { size, pos, .. } => size - pos,
            Unit::Checksum { left } => *left,
            Unit::Done => usize::MAX,
        }
    }

    fn want(&mut self) {
        if !self.lost {
            self.wanted = true;
        }
    }

    /// The next bytes of the frame (after its header), as the decoder consumed them.
    fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match &mut self.unit {
                Unit::Header { bytes, got } => {
                    let take = (3 - *got).min(data.len());
                    bytes[*got..*got + take].copy_from_slice(&data[..take]);
                    *got += take;
                    data = &data[take..];
                    if *got == 3 {
                        let h = u32::from(bytes[0])
                            | (u32::from(bytes[1]) << 8)
                            | (u32::from(bytes[2]) << 16);
                        let kind = ((h >> 1) & 3) as u8;
                        let size = if kind == 1 { 1 } else { (h >> 3) as usize };
                        self.start_block(kind, size, h & 1 == 1);
                    }
                }
                Unit::Block { .. } => {
                    let take = self.unit_left().min(data.len());
                    self.block_bytes(&data[..take]);
                    data = &data[take..];
                }
                Unit::Checksum { left } => {
                    let take = (*left).min(data.len());
                    *left -= take;
                    data = &data[take..];
                    if *left == 0 {
                        self.unit = Unit::Done;
                    }
                }
                Unit::Done => return,
            }
        }
    }

    fn start_block(&mut self, kind: u8, size: usize, last: bool) {
        self.ready = None;
        self.unit = Unit::Block {
            kind,
            size,
            pos: 0,
            last,
        };
        if kind == 3 {
            // Reserved: the decoder refuses it.
            self.lost = true;
        }
        self.capturing = self.wanted;
        if kind == 2 {
            self.head.clear();
            self.head_need = follow::LITERALS_HEAD.min(size);
            self.literals = None;
            self.seq_head.clear();
            self.capture.clear();
        }
        if size == 0 {
            self.end_block();
        }
    }

    /// Bytes of the current block (at most to its end).
    fn block_bytes(&mut self, mut data: &[u8]) {
        let Unit::Block {
            kind, size, pos, ..
        } = &mut self.unit
        else {
            return;
        };
        let (kind, size) = (*kind, *size);
        if kind == 2 && !self.lost {
            if self.capturing {
                self.capture.extend_from_slice(data);
            }
            while !data.is_empty() {
                let at = *pos;
                let mut take = data.len();
                if at < self.head_need {
                    take = take.min(self.head_need - at);
                    self.head.extend_from_slice(&data[..take]);
                } else if let Some(lit) = &self.literals {
                    let seq_end = (lit.len + follow::SEQUENCES_HEAD).min(size);
                    if at < lit.len {
                        take = take.min(lit.len - at);
                    } else if at < seq_end {
                        take = take.min(seq_end - at);
                        self.seq_head.extend_from_slice(&data[..take]);
                    }
                }
                *pos += take;
                data = &data[take..];
                if self.literals.is_none() && self.head.len() == self.head_need {
                    match follow::literals(&self.head) {
                        Ok(lit) => {
                            if let Some(h) = &lit.huffman {
                                self.head_need = h.end.min(size);
                            }
                            if lit.len < *pos {
                                let end = (*pos).min(lit.len + follow::SEQUENCES_HEAD);
                                self.seq_head.extend_from_slice(&self.head[lit.len..end]);
                            }
                            self.literals = Some(lit);
                        }
                        Err(Lost) => {
                            self.lost = true;
                            *pos += data.len();
                            data = &[];
                        }
                    }
                }
            }
        } else {
            *pos += data.len();
        }
        if *pos == size {
            self.end_block();
        }
    }

    fn end_block(&mut self) {
        let Unit::Block { kind, last, .. } = self.unit else {
            return;
        };
        if kind == 2 && !self.lost {
            if let Err(Lost) = self.end_compressed_block() {
                self.lost = true;
            }
        }
        self.unit = if !last {
            Unit::Header {
                bytes: [0; 3],
                got: 0,
            }
        } else if self.checksum {
            Unit::Checksum { left: 4 }
        } else {
            Unit::Done
        };
        if last || self.lost || !self.wanted {
            return;
        }
        let reps = match self.reps {
            [Rep::Known(a), Rep::Known(b), Rep::Known(c)] => [a, b, c],
            _ => return,
        };
        self.ready = Some(FrameState {
            frame_start: self.frame_start,
            window: self.window,
            content_size: self.content_size,
            huffman: self.huffman.clone(),
            tables: self.tables.clone(),
            reps,
        });
    }

    fn end_compressed_block(&mut self) -> Result<(), Lost> {
        let lit = self.literals.take().ok_or(Lost)?;
        if let Some(h) = lit.huffman {
            self.huffman = Some(self.head.get(h).ok_or(Lost)?.to_vec());
        }
        let seq = follow::sequences(&self.seq_head)?;
        if seq.count == 0 {
            return Ok(());
        }
        for (t, table) in seq.tables.into_iter().enumerate() {
            match table {
                Some(table) => self.tables[t] = table,
                None if self.tables[t] == Table::Unset => return Err(Lost),
                None => {}
            }
        }
        if !self.capturing {
            self.reps = [Rep::Unknown; 3];
            return Ok(());
        }
        let bitstream = self.capture.get(lit.len + seq.len..).ok_or(Lost)?;
        follow::follow_sequences(bitstream, seq.count, &self.tables, &mut self.reps)?;
        if self.reps.contains(&Rep::Unknown) {
            self.tries += 1;
            if self.tries >= MAX_TRIES {
                self.tries = 0;
            }
        } else {
            self.tries = 0;
        }
        Ok(())
    }

    fn in_last_block(&self) -> bool {
        matches!(
            self.unit,
            Unit::Block { last: true, .. } | Unit::Checksum { .. }
        )
    }

    fn at_block_start(&self) -> bool {
        matches!(self.unit, Unit::Header { got: 0, .. })
    }

    /// The state at the block end just passed, if a point can be made there.
    fn take_ready(&mut self) -> Option<FrameState> {
        let ready = self.ready.take();
        if ready.is_some() {
            self.wanted = false;
        }
        ready
    }
}

/// The source, hashing what is consumed.
struct Source<R> {
    reader: BufReader<R>,
    hash: Option<Sha256State>,
    /// Artifact offset of the next byte.
    offset: u64,
}

impl<R: Read> Source<R> {
    /// Consume `n` buffered bytes, hashing them.
    fn advance(&mut self, n: usize) {
        if let Some(h) = &mut self.hash {
            h.update(&self.reader.buffer()[..n]);
        }
        self.reader.consume(n);
        self.offset += n as u64;
    }
}

impl<R: Read> BufRead for Source<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        self.reader.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.advance(n);
    }
}

impl<R: Read> Read for Source<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.reader.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.advance(n);
        Ok(n)
    }
}

/// A point between blocks waiting for the decoder to hand out all output before it.
struct Pending {
    artifact_offset: u64,
    state: ZstdState,
    artifact_hash: Option<Sha256State>,
}

/// Decodes a zstd stream read from `inner` (the artifact from offset 0, or from a resume
/// point), hashing the artifact bytes it consumes when given a hash state.
pub struct ZstdDecoder<R> {
    source: Source<R>,
    decoder: DCtx<'static>,
    stage: Stage,
    follower: Option<Follower>,
    /// The checksum of a resumed frame, computed here.
    resumed: Option<Xxh64>,
    /// What the first blocks of a resumed frame are checked for, until none is left (see
    /// [`follow::check_resumed_block`]).
    fix: Option<follow::Fix>,
    /// A resumed frame's start and content size (checked at its end).
    resumed_size: Option<(u64, Option<u64>)>,
    /// A block read ahead (and rewritten) that the decoder is being handed: bytes, how many
    /// it took.
    held: Option<(Vec<u8>, usize)>,
    out: u64,
    boundaries_from: u64,
    pending: Option<Pending>,
    boundary: Option<Boundary>,
    /// A byte taken out of the decoder to learn whether it held more output (see
    /// [`Self::flushed`]), handed out first by the next read.
    carry: Option<u8>,
}

fn decoder() -> DCtx<'static> {
    let mut decoder = DCtx::create();
    decoder
        .set_parameter(DParameter::WindowLogMax(MAX_ZSTD_WINDOW_LOG))
        .expect("a valid window log");
    decoder
}

/// The content size field of a frame header (RFC 8878 3.1.1.1.4), if it has one.
fn frame_content_size(header: &[u8]) -> Option<u64> {
    let descriptor = header[4];
    let single_segment = descriptor & 0x20 != 0;
    let size_len = match descriptor >> 6 {
        0 if single_segment => 1,
        0 => return None,
        flag => [0usize, 2, 4, 8][usize::from(flag)],
    };
    let dict_id_len = [0usize, 1, 2, 4][usize::from(descriptor & 3)];
    let start = 5 + usize::from(!single_segment) + dict_id_len;
    let field = header.get(start..start + size_len)?;
    let mut le = [0u8; 8];
    le[..size_len].copy_from_slice(field);
    let size = u64::from_le_bytes(le);
    Some(if size_len == 2 { size + 256 } else { size })
}

fn bad_point() -> io::Error {
    invalid("invalid zstd resume point")
}

impl<R: Read> ZstdDecoder<R> {
    pub fn new(inner: R, hash: Option<Sha256State>) -> Self {
        ZstdDecoder {
            source: Source {
                reader: BufReader::with_capacity(SOURCE_BUFFER, inner),
                hash,
                offset: 0,
            },
            decoder: decoder(),
            stage: Stage::NextFrame,
            follower: None,
            resumed: None,
            fix: None,
            resumed_size: None,
            held: None,
            out: 0,
            boundaries_from: u64::MAX,
            pending: None,
            boundary: None,
            carry: None,
        }
    }

    /// A decoder continuing at `at`: `inner` yields the artifact from `at.artifact_offset`,
    /// `hash` covers the bytes before it, `prefix` was fed the slot's first `at.out` bytes.
    pub fn resume(
        inner: R,
        at: &ResumeAt,
        hash: Option<Sha256State>,
        prefix: ResumePrefix,
    ) -> io::Result<Self> {
        if prefix.out != at.out || prefix.fed != at.out || !at.plausible() {
            return Err(bad_point());
        }
        let mut d = ZstdDecoder::new(inner, hash);
        d.source.offset = at.artifact_offset;
        d.out = at.out;
        let ZstdState::InFrame(state) = &at.state else {
            if prefix.frame.is_some() {
                return Err(bad_point());
            }
            return Ok(d);
        };
        let window_len = state.window_len(at.out) as usize;
        let window = prefix.window();
        let prefix_frame = prefix.frame.as_ref().map(|(start, _)| *start);
        if !state.valid()
            || prefix_frame != Some(state.frame_start)
            || state.frame_start >= at.out
            || window.len() < window_len
            || state.reps.iter().any(|&r| r as usize > window_len)
            || state
                .content_size
                .is_some_and(|s| at.out - state.frame_start > s)
        {
            return Err(bad_point());
        }
        let dictionary = state
            .dictionary(&window[window.len() - window_len..])
            .ok_or_else(bad_point)?;
        let check = prefix.frame.map(|(_, check)| check);
        // Its window is in the dictionary now: not three copies at once.
        drop(prefix.tail);
        d.decoder
            .load_dictionary(&dictionary)
            .map_err(|_| bad_point())?;
        hand_header(&mut d.decoder, &state.frame_header()).map_err(|_| bad_point())?;
        d.follower = Some(Follower::resumed(state));
        let fix = follow::Fix {
            rle: state.tables.clone().map(|t| match t {
                Table::Rle(symbol) => Some(symbol),
                _ => None,
            }),
            unset: state.tables.clone().map(|t| t == Table::Unset),
            no_tree: state.huffman.is_none(),
        };
        d.fix = (!fix.done()).then_some(fix);
        d.resumed = check;
        d.resumed_size = Some((state.frame_start, state.content_size));
        d.stage = Stage::InFrame;
        Ok(d)
    }

    /// Output bytes so far (including a resumed prefix).
    pub fn output_offset(&self) -> u64 {
        self.out
    }

    /// Look for boundaries only from output offset `out` on (never by default: following the
    /// sequences of a block costs CPU, so a caller asks for the next point when it wants one).
    pub fn boundaries_from(&mut self, out: u64) {
        self.boundaries_from = out;
    }

    /// The boundary the last `read` stopped at (its output ends there), if any.
    pub fn take_boundary(&mut self) -> Option<Boundary> {
        self.boundary.take()
    }

    /// The artifact hash after the whole input (call after `read` returned 0).
    pub fn finish_hash(self) -> Option<Sha256State> {
        self.source.hash
    }

    /// Start the next frame (see [`start_frame`]). False at the clean end of the stream.
    fn next_frame(&mut self) -> io::Result<bool> {
        let Some((header, len)) = start_frame(&mut self.source, &mut self.decoder)? else {
            return Ok(false);
        };
        let window = ddi_bundle::chunked::frame_window_size(&header[..len]).map_err(invalid)?;
        let checksum = header[4] & 4 != 0;
        let content_size = frame_content_size(&header[..len]);
        self.follower = Some(Follower::new(self.out, window, content_size, checksum));
        Ok(true)
    }

    /// The decoder finished a frame: a resumed one's checksum is checked here.
    fn end_frame(&mut self) -> io::Result<()> {
        if let Some(check) = self.resumed.take() {
            let mut stored = [0u8; 4];
            self.source.read_exact(&mut stored).map_err(|e| {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    invalid("the stream ends inside a frame")
                } else {
                    e
                }
            })?;
            if let Some((start, Some(size))) = self.resumed_size.take() {
                if self.out - start != size {
                    return Err(invalid(
                        "the resumed zstd frame's size is not its header's content size",
                    ));
                }
            }
            if u32::from_le_bytes(stored) != check.digest() as u32 {
                return Err(invalid(
                    "the resumed zstd frame's content checksum does not match",
                ));
            }
            // The dictionary was for that frame only.
            self.decoder.load_dictionary(&[]).map_err(decoder_error)?;
        }
        self.follower = None;
        self.stage = Stage::NextFrame;
        Ok(())
    }

    /// Read the next block of a resumed frame ahead, whole, and check it (see
    /// [`follow::check_resumed_block`]).
    fn hold_block(&mut self, mut fix: follow::Fix) -> io::Result<()> {
        let ended = |e: io::Error| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                invalid("the stream ends inside a frame")
            } else {
                e
            }
        };
        let follower = self.follower.as_mut().expect("in a frame");
        let mut block = vec![0u8; 3];
        self.source.read_exact(&mut block).map_err(ended)?;
        follower.feed(&block);
        let header = u32::from(block[0]) | (u32::from(block[1]) << 8) | (u32::from(block[2]) << 16);
        let kind = (header >> 1) & 3;
        let size = if kind == 1 { 1 } else { (header >> 3) as usize };
        if size > follow::MAX_BLOCK {
            return Err(invalid("a zstd block is larger than 128 KiB"));
        }
        block.resize(3 + size, 0);
        self.source.read_exact(&mut block[3..]).map_err(ended)?;
        follower.feed(&block[3..]);
        if kind == 2 {
            match follow::check_resumed_block(&mut block, &mut fix) {
                Ok(()) => self.fix = (!fix.done()).then_some(fix),
                Err(follow::Refused::Unset) => {
                    return Err(invalid(
                        "a zstd block repeats a table its frame never set (corrupt data)",
                    ))
                }
                Err(follow::Refused::Lost) => return Err(bad_point()),
            }
        }
        self.held = Some((block, 0));
        Ok(())
    }

    /// Whether the decoder holds no more output (else its next byte is kept in `carry`).
    fn flushed(&mut self) -> io::Result<bool> {
        let mut spare = [0u8; 1];
        let mut output = OutBuffer::around(&mut spare[..]);
        let mut input = InBuffer::around(&[][..]);
        self.decoder
            .decompress_stream(&mut output, &mut input)
            .map_err(decoder_error)?;
        if output.pos() == 1 {
            self.carry = Some(spare[0]);
            return Ok(false);
        }
        Ok(true)
    }

    fn in_frame(&mut self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let mut wait_for_source = false;
        let mut pre = 0;
        if let Some(b) = self.carry.take() {
            buf[0] = b;
            pre = 1;
            if let Some(check) = &mut self.resumed {
                check.update(&[b]);
            }
            self.out += 1;
        }
        let (head, buf) = buf.split_at_mut(pre);
        let _ = head;
        loop {
            if let (Some(fix), None) = (self.fix, &self.held) {
                if self.follower.as_ref().is_some_and(Follower::at_block_start) {
                    self.hold_block(fix)?;
                }
            }
            let follower = self.follower.as_mut().expect("in a frame");
            // No point before a resumed frame's tables are all its own again.
            let settled = self.fix.is_none() && self.held.is_none();
            if settled && self.pending.is_none() && self.out >= self.boundaries_from {
                follower.want();
            }
            let limit = if self.pending.is_some() {
                0
            } else if follower.wanted && !follower.in_last_block() {
                follower.unit_left()
            } else {
                usize::MAX
            };
            let (input, ended) = match &self.held {
                Some((bytes, fed)) => (&bytes[*fed..], false),
                None => {
                    let input = if wait_for_source {
                        self.source.reader.fill_buf()?
                    } else {
                        self.source.reader.buffer()
                    };
                    (input, input.is_empty() && wait_for_source)
                }
            };
            let input = &input[..input.len().min(limit)];
            let mut input = InBuffer::around(input);
            let mut output = OutBuffer::around(&mut *buf);
            let hint = self
                .decoder
                .decompress_stream(&mut output, &mut input)
                .map_err(decoder_error)?;
            let (used, made) = (input.pos(), output.pos());
            match &mut self.held {
                Some((bytes, fed)) => {
                    *fed += used;
                    if *fed == bytes.len() {
                        self.held = None;
                    } else if used == 0 && made == 0 {
                        return Err(invalid("the zstd decoder takes no more input"));
                    }
                }
                None => {
                    follower.feed(&self.source.reader.buffer()[..used]);
                    self.source.advance(used);
                }
            }
            if let Some(check) = &mut self.resumed {
                check.update(&buf[..made]);
            }
            self.out += made as u64;
            if hint == 0 {
                // The frame ended and all of it is out (a fresh frame's checksum matched).
                self.pending = None;
                self.end_frame()?;
                if pre + made > 0 && self.out >= self.boundaries_from {
                    self.boundary = Some(Boundary {
                        artifact_offset: self.source.offset,
                        out: self.out,
                        state: ZstdState::Between,
                        artifact_hash: self.source.hash.clone(),
                    });
                }
                return Ok((pre + made > 0).then_some(pre + made));
            }
            let follower = self.follower.as_mut().expect("in a frame");
            if let Some(state) = follower.take_ready() {
                self.pending = Some(Pending {
                    artifact_offset: self.source.offset,
                    state: ZstdState::InFrame(state),
                    artifact_hash: self.source.hash.clone(),
                });
            }
            if self.pending.is_some() && (made < buf.len() || self.flushed()?) {
                // Nothing of the blocks before the point is left inside the decoder.
                let p = self.pending.take().expect("pending");
                // A dictionary's repeat offsets must lie within its content (the first few
                // bytes of a frame start with offsets 1, 4 and 8).
                let fits = match &p.state {
                    ZstdState::InFrame(f) => f
                        .reps
                        .iter()
                        .all(|&r| u64::from(r) <= f.window_len(self.out)),
                    ZstdState::Between => true,
                };
                if pre + made > 0 && fits {
                    self.boundary = Some(Boundary {
                        artifact_offset: p.artifact_offset,
                        out: self.out,
                        state: p.state,
                        artifact_hash: p.artifact_hash,
                    });
                }
            }
            if pre + made > 0 {
                return Ok(Some(pre + made));
            }
            if used == 0 && self.pending.is_none() {
                if ended {
                    return Err(invalid("the stream ends inside a frame"));
                }
                wait_for_source = true;
            }
        }
    }
}

impl<R: Read> Read for ZstdDecoder<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.boundary = None;
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            match self.stage {
                Stage::Done => return Ok(0),
                Stage::NextFrame => {
                    if self.next_frame()? {
                        self.stage = Stage::InFrame;
                    } else {
                        self.stage = Stage::Done;
                    }
                }
                Stage::InFrame => {
                    if let Some(n) = self.in_frame(buf)? {
                        return Ok(n);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
