//! An LZMA2 decoder (the last filter of every xz block), written for the agent so that its
//! state at a chunk boundary is at hand: what a resume inside a block needs (`super`).
//!
//! LZMA2 is a sequence of chunks, each a control byte and a header:
//!
//! - `0x00`: the end of the data;
//! - `0x01`, `0x02`: stored bytes (a 16-bit size), `0x01` after a dictionary reset;
//! - `0x80..=0xff`: LZMA-compressed bytes; bits 0-4 and a 16-bit field give the uncompressed
//!   size, another 16-bit field the compressed size; bits 5-6 the reset level: 0 none, 1 the
//!   LZMA state, 2 the state and new properties (a byte after the sizes), 3 also the dictionary.
//!
//! Every LZMA chunk has a range coder of its own (its first byte 0, its code 0 at the chunk's
//! end, every compressed byte consumed: liblzma's rules) and must produce exactly its declared
//! number of bytes (a match may not run past the chunk). The LZMA state (probabilities, the
//! state machine's state, the four repeated distances, lc/lp/pb) goes on from chunk to chunk
//! unless reset. The decoded bytes go into a circular dictionary of the block's dictionary
//! size and are handed out from there ([`Lzma2Reader::read`]); a distance may reach only bytes
//! decoded since the last dictionary reset, within the dictionary.
//!
//! Hostile input gives an [`io::ErrorKind::InvalidData`] error, never a panic or an access out
//! of bounds: the range coder reads past its chunk as zeros and the chunk then fails its
//! checks; distances, lengths and properties are checked before they are used.

use std::io::{self, Read};

/// Probabilities, one array: these are their offsets.
const IS_MATCH: usize = 0; // [state][pos_state]: 12 * 16
const IS_REP: usize = IS_MATCH + 12 * 16;
const IS_REP0: usize = IS_REP + 12;
const IS_REP1: usize = IS_REP0 + 12;
const IS_REP2: usize = IS_REP1 + 12;
const IS_REP0_LONG: usize = IS_REP2 + 12; // [state][pos_state]
const DIST_SLOT: usize = IS_REP0_LONG + 12 * 16; // [length state 0-3][64]
/// The distance slots 4-13's reverse bit trees: 114 probabilities, after one unused.
const DIST_SPECIAL: usize = DIST_SLOT + 4 * 64;
const DIST_ALIGN: usize = DIST_SPECIAL + 115; // 16, index 0 unused
/// A length coder: choice, choice 2, low [16][8], mid [16][8], high [256].
const LEN_CODER: usize = 2 + 16 * 8 * 2 + 256;
const MATCH_LEN: usize = DIST_ALIGN + 16;
const REP_LEN: usize = MATCH_LEN + LEN_CODER;
const LITERAL: usize = REP_LEN + LEN_CODER; // [0x300 << (lc + lp)]
/// Probabilities in all, for the largest lc + lp LZMA2 allows (4).
pub const PROBS: usize = LITERAL + (0x300 << 4);

/// A probability's initial value (one half, 11 bits).
const HALF: u16 = 1 << 10;
/// The largest uncompressed size of a chunk.
const MAX_CHUNK: usize = 2 << 20;

/// The LZMA state that goes on from one chunk to the next.
#[derive(Clone, PartialEq, Eq)]
pub struct LzmaState {
    pub lc: u32,
    pub lp: u32,
    pub pb: u32,
    /// The state machine's state, 0-11.
    pub state: usize,
    /// The last four distances (0 = the previous byte).
    pub reps: [u32; 4],
    pub probs: Box<[u16; PROBS]>,
}

impl std::fmt::Debug for LzmaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LzmaState")
            .field("lc", &self.lc)
            .field("lp", &self.lp)
            .field("pb", &self.pb)
            .field("state", &self.state)
            .field("reps", &self.reps)
            .finish_non_exhaustive()
    }
}

impl LzmaState {
    fn new() -> Self {
        LzmaState {
            lc: 0,
            lp: 0,
            pb: 0,
            state: 0,
            reps: [0; 4],
            probs: vec![HALF; PROBS]
                .into_boxed_slice()
                .try_into()
                .expect("PROBS long"),
        }
    }

    /// Set lc, lp and pb from a properties byte.
    fn set_props(&mut self, props: u8) -> io::Result<()> {
        let (lc, lp, pb) = split_props(props)
            .ok_or_else(|| invalid(format!("invalid LZMA properties {props:#04x}")))?;
        (self.lc, self.lp, self.pb) = (lc, lp, pb);
        Ok(())
    }

    /// Whether the state could be one the decoder made: lc/lp/pb within LZMA2's limits, a
    /// state machine's state, every probability strictly between 0 and 1.
    pub fn valid(&self) -> bool {
        self.lc + self.lp <= 4
            && self.pb <= 4
            && self.state < 12
            && self.probs.iter().all(|&p| p > 0 && p < 2 * HALF)
    }

    /// `PROPS:STATE:REP0,REP1,REP2,REP3:PROBS`, the properties byte and the state in decimal,
    /// the probabilities a literal coder of these lc and lp uses and those before them as
    /// hex of their little-endian bytes (7 991 probabilities, 31 964 characters, for the usual
    /// lc 3, lp 0).
    pub fn to_text(&self) -> String {
        let props = self.lc + 9 * self.lp + 45 * self.pb;
        let used = LITERAL + (0x300 << (self.lc + self.lp));
        let bytes: Vec<u8> = self.probs[..used]
            .iter()
            .flat_map(|p| p.to_le_bytes())
            .collect();
        let [r0, r1, r2, r3] = self.reps;
        format!(
            "{props}:{}:{r0},{r1},{r2},{r3}:{}",
            self.state,
            hex::encode(bytes)
        )
    }

    /// What [`Self::to_text`] wrote, if it is a [valid](Self::valid) state.
    pub fn from_text(text: &str) -> Option<Self> {
        let mut fields = text.split(':');
        let mut lzma = LzmaState::new();
        lzma.set_props(fields.next()?.parse().ok()?).ok()?;
        lzma.state = fields.next()?.parse().ok()?;
        let mut reps = fields.next()?.split(',');
        for rep in &mut lzma.reps {
            *rep = reps.next()?.parse().ok()?;
        }
        let bytes = hex::decode(fields.next()?).ok()?;
        let used = LITERAL + (0x300 << (lzma.lc + lzma.lp));
        if reps.next().is_some() || fields.next().is_some() || bytes.len() != 2 * used {
            return None;
        }
        for (p, b) in lzma.probs.iter_mut().zip(bytes.chunks_exact(2)) {
            *p = u16::from_le_bytes([b[0], b[1]]);
        }
        lzma.valid().then_some(lzma)
    }

    fn reset(&mut self) {
        self.state = 0;
        self.reps = [0; 4];
        let used = LITERAL + (0x300 << (self.lc + self.lp));
        self.probs[..used].fill(HALF);
    }
}

/// lc, lp, pb of an LZMA properties byte, if LZMA2 allows them (lc + lp <= 4, pb <= 4).
fn split_props(props: u8) -> Option<(u32, u32, u32)> {
    let props = u32::from(props);
    let (lc, lp, pb) = (props % 9, props / 9 % 5, props / 45);
    (pb <= 4 && lc + lp <= 4).then_some((lc, lp, pb))
}

/// The dictionary's length for a dictionary size: at least 4 KiB, a multiple of 16.
pub(super) fn dict_len(dict_size: u64) -> usize {
    (dict_size.max(4096) as usize).next_multiple_of(16)
}

/// The dictionary a decoder resumed at a chunk boundary continues with, filled with the
/// output's bytes before the point as they are read back (the slot, a tar's head), each
/// written in place where the decoder keeps it ([`Lzma2Reader::resume`] takes it over): so a
/// resume holds one dictionary, not a copy of its bytes beside it.
#[derive(Clone)]
pub struct ResumeWindow {
    dict: Vec<u8>,
    dict_size: u64,
    since_reset: u64,
    /// Output bytes before the point, and how many of them were given so far.
    total: u64,
    given: u64,
}

impl ResumeWindow {
    /// A window for a point `total` output bytes in, `since_reset` of them since the LZMA2
    /// data's last dictionary reset, in data with a `dict_size` dictionary.
    pub fn new(dict_size: u64, since_reset: u64, total: u64) -> Self {
        ResumeWindow {
            // Zeroed lazily by the allocator: only the window's pages become resident.
            dict: vec![0; dict_len(dict_size)],
            dict_size,
            since_reset,
            total,
            given: 0,
        }
    }

    /// How many of the output's last bytes the dictionary holds at the point.
    fn window_len(&self) -> u64 {
        Lzma2Reader::<&[u8]>::window_len(self.dict_size, self.since_reset).min(self.total)
    }

    /// The output's next bytes, in order from its first.
    pub fn update(&mut self, data: &[u8]) {
        let first_kept = self.total - self.window_len();
        let from = self.given;
        self.given = self.given.saturating_add(data.len() as u64);
        // The part of `data` at output offsets first_kept..total.
        let start = first_kept.saturating_sub(from).min(data.len() as u64) as usize;
        let end = self.total.saturating_sub(from).min(data.len() as u64) as usize;
        if start >= end {
            return;
        }
        let len = self.dict.len();
        // The byte `total - 1` goes just before the position the decoder continues at.
        let next = (self.since_reset % len as u64) as usize;
        let back = (self.total - (from + start as u64)) as usize;
        let mut at = (next + len - back) % len;
        let mut part = &data[start..end];
        while !part.is_empty() {
            let n = part.len().min(len - at);
            self.dict[at..at + n].copy_from_slice(&part[..n]);
            (at, part) = ((at + n) % len, &part[n..]);
        }
    }

    /// Bytes given so far.
    pub fn given(&self) -> u64 {
        self.given
    }

    /// The output bytes before the point it was made for.
    pub fn total(&self) -> u64 {
        self.total
    }
}

impl std::fmt::Debug for ResumeWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResumeWindow")
            .field("dict_size", &self.dict_size)
            .field("since_reset", &self.since_reset)
            .field("total", &self.total)
            .field("given", &self.given)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("xz: LZMA2: {msg}"))
}

/// What the decoder is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Before a chunk's control byte.
    Control,
    /// Stored bytes, `left` of them still to copy.
    Stored { left: usize },
    /// An LZMA chunk with `left` bytes still to decode.
    Lzma { left: usize },
    /// After the end marker.
    End,
}

/// Decodes the LZMA2 data of one xz block from `inner` (which must hold nothing else before
/// it); hands the decoded bytes out through [`Read`]. Reads `inner` only as far as the data
/// goes (the end marker is its last byte read).
pub struct Lzma2Reader<R> {
    inner: R,
    /// The circular dictionary: its length a multiple of 16 (for the position bits), at
    /// least the block's dictionary size.
    dict: Vec<u8>,
    /// Where the next byte goes; bytes since the last dictionary reset modulo the length.
    pos: usize,
    /// Bytes of `dict` decoded since the last dictionary reset (at most its length).
    full: usize,
    /// Bytes decoded since the last dictionary reset.
    since_reset: u64,
    /// Bytes before `pos` not handed out yet.
    pending: usize,
    lzma: LzmaState,
    /// What is left of a match the last batch stopped in (its distance is `reps[0]`).
    len_left: usize,
    chunk: Chunk,
    /// The current LZMA chunk's compressed bytes, and the range coder's place in them.
    packed: Vec<u8>,
    at: usize,
    range: u32,
    code: u32,
    need_dict_reset: bool,
    need_props: bool,
    /// Bytes read from `inner` (chunk headers included).
    compressed: u64,
    /// Bytes decoded.
    uncompressed: u64,
}

impl<R: Read> Lzma2Reader<R> {
    /// A decoder of LZMA2 data with a dictionary of `dict_size` bytes (as the block header
    /// says; 4 KiB at least).
    pub fn new(inner: R, dict_size: u64) -> Self {
        Self::with_dictionary(inner, vec![0; dict_len(dict_size)])
    }

    fn with_dictionary(inner: R, dict: Vec<u8>) -> Self {
        Lzma2Reader {
            inner,
            dict,
            pos: 0,
            full: 0,
            since_reset: 0,
            pending: 0,
            lzma: LzmaState::new(),
            len_left: 0,
            chunk: Chunk::Control,
            packed: Vec::new(),
            at: 0,
            range: 0,
            code: 0,
            need_dict_reset: true,
            need_props: true,
            compressed: 0,
            uncompressed: 0,
        }
    }

    /// Compressed bytes read (chunk headers and the end marker included).
    pub fn compressed(&self) -> u64 {
        self.compressed
    }

    /// Bytes decoded.
    pub fn uncompressed(&self) -> u64 {
        self.uncompressed
    }

    /// Whether the end marker was read.
    pub fn ended(&self) -> bool {
        self.chunk == Chunk::End
    }

    pub fn into_inner(self) -> R {
        self.inner
    }

    pub fn inner(&self) -> &R {
        &self.inner
    }

    /// Whether the decoder is between two chunks after the first, every byte handed out: a
    /// decoder made by [`Self::resume`] with [`Self::state`] and the dictionary's bytes
    /// continues here.
    pub fn at_chunk_boundary(&self) -> bool {
        self.chunk == Chunk::Control && self.pending == 0 && !self.need_dict_reset
    }

    /// The state a chunk boundary needs besides the dictionary's bytes: the LZMA state,
    /// whether the next LZMA chunk must bring properties, the bytes since the last dictionary
    /// reset.
    pub fn state(&self) -> (&LzmaState, bool, u64) {
        (&self.lzma, self.need_props, self.since_reset)
    }

    /// How many of the last output bytes the dictionary holds after `since_reset` bytes: the
    /// window [`Self::resume`] needs.
    pub fn window_len(dict_size: u64, since_reset: u64) -> u64 {
        since_reset.min(dict_len(dict_size) as u64)
    }

    /// A decoder continuing at a chunk boundary of data with a `dict_size` dictionary, from
    /// what [`Self::state`] gave there and `window`, given every output byte before the point
    /// (made for this `dict_size` and `since_reset`); `compressed` and `uncompressed` bytes
    /// of the data came before.
    pub fn resume(
        inner: R,
        dict_size: u64,
        (lzma, need_props, since_reset): (LzmaState, bool, u64),
        window: ResumeWindow,
        (compressed, uncompressed): (u64, u64),
    ) -> io::Result<Self> {
        let len = dict_len(dict_size);
        if !lzma.valid()
            || (window.dict_size, window.since_reset) != (dict_size, since_reset)
            || window.given != window.total
            || window.window_len() != Self::window_len(dict_size, since_reset)
            || lzma.reps.iter().any(|&r| r as usize >= len)
        {
            return Err(invalid(
                "a resume point's state does not fit its data".into(),
            ));
        }
        let full = window.window_len() as usize;
        let mut reader = Self::with_dictionary(inner, window.dict);
        let pos = (since_reset % len as u64) as usize;
        (reader.pos, reader.full, reader.since_reset) = (pos, full, since_reset);
        reader.lzma = lzma;
        reader.need_props = need_props;
        reader.need_dict_reset = false;
        (reader.compressed, reader.uncompressed) = (compressed, uncompressed);
        Ok(reader)
    }

    fn read_exact_here(&mut self, buf: &mut [u8]) -> io::Result<()> {
        match self.inner.read_exact(buf) {
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "xz: the artifact ends inside a block's LZMA2 data",
            )),
            Err(e) => Err(e),
            Ok(()) => {
                self.compressed += buf.len() as u64;
                Ok(())
            }
        }
    }

    /// Read a chunk's control byte and header (and an LZMA chunk's compressed bytes).
    fn start_chunk(&mut self) -> io::Result<()> {
        let mut control = [0u8];
        self.read_exact_here(&mut control)?;
        let control = control[0];
        if control == 0 {
            self.chunk = Chunk::End;
            return Ok(());
        }
        if (3..0x80).contains(&control) {
            return Err(invalid(format!(
                "invalid chunk control byte {control:#04x}"
            )));
        }
        if control >= 0xe0 || control == 1 {
            self.need_props = true;
            self.need_dict_reset = false;
            self.pos = 0;
            self.full = 0;
            self.since_reset = 0;
            let last = self.dict.len() - 1;
            self.dict[last] = 0; // the "previous byte" of the first literal
        } else if self.need_dict_reset {
            return Err(invalid(format!(
                "the first chunk ({control:#04x}) does not reset the dictionary"
            )));
        }
        if control < 0x80 {
            let mut size = [0u8; 2];
            self.read_exact_here(&mut size)?;
            self.chunk = Chunk::Stored {
                left: usize::from(u16::from_be_bytes(size)) + 1,
            };
            return Ok(());
        }
        let mut header = [0u8; 5];
        let header_len = if control >= 0xc0 { 5 } else { 4 };
        self.read_exact_here(&mut header[..header_len])?;
        let unpacked = (usize::from(control & 0x1f) << 16)
            + usize::from(u16::from_be_bytes([header[0], header[1]]))
            + 1;
        let packed = usize::from(u16::from_be_bytes([header[2], header[3]])) + 1;
        if control >= 0xc0 {
            self.lzma.set_props(header[4])?;
            self.need_props = false;
        } else if self.need_props {
            return Err(invalid(format!(
                "chunk {control:#04x} without properties after a dictionary reset"
            )));
        }
        if control >= 0xa0 {
            self.lzma.reset();
        }
        if packed < 5 {
            return Err(invalid(format!(
                "an LZMA chunk of {packed} compressed bytes"
            )));
        }
        self.packed.resize(packed, 0);
        let mut packed_bytes = std::mem::take(&mut self.packed);
        let read = self.read_exact_here(&mut packed_bytes);
        self.packed = packed_bytes;
        read?;
        if self.packed[0] != 0 {
            return Err(invalid(
                "an LZMA chunk's range coder starts with a non-zero byte".into(),
            ));
        }
        self.code = u32::from_be_bytes(self.packed[1..5].try_into().expect("4 bytes"));
        self.range = u32::MAX;
        self.at = 5;
        self.chunk = Chunk::Lzma { left: unpacked };
        Ok(())
    }

    /// Fill the dictionary from `pos` on with up to `want` bytes (`pending` is 0).
    fn produce(&mut self, want: usize) -> io::Result<()> {
        if self.pos == self.dict.len() {
            self.pos = 0;
        }
        let room = self.dict.len() - self.pos;
        match self.chunk {
            Chunk::Control => self.start_chunk()?,
            Chunk::End => {}
            Chunk::Stored { left } => {
                let n = left.min(room).min(want);
                let (start, end) = (self.pos, self.pos + n);
                let mut dict = std::mem::take(&mut self.dict);
                let read = self.read_exact_here(&mut dict[start..end]);
                self.dict = dict;
                read?;
                self.advance(n);
                self.chunk = match left - n {
                    0 => Chunk::Control,
                    left => Chunk::Stored { left },
                };
            }
            Chunk::Lzma { left } => {
                let n = left.min(room).min(want);
                self.decode(self.pos + n)?;
                self.advance(n);
                if left == n {
                    if self.len_left > 0 {
                        return Err(invalid("a match runs past its chunk's end".into()));
                    }
                    if self.at != self.packed.len() || self.code != 0 {
                        return Err(invalid(format!(
                            "an LZMA chunk does not end with its {} compressed bytes",
                            self.packed.len()
                        )));
                    }
                    self.chunk = Chunk::Control;
                } else {
                    self.chunk = Chunk::Lzma { left: left - n };
                }
            }
        }
        Ok(())
    }

    /// `n` bytes were put at `pos`.
    fn advance(&mut self, n: usize) {
        self.pos += n;
        self.full = (self.full + n).min(self.dict.len());
        self.pending = n;
        self.since_reset += n as u64;
        self.uncompressed += n as u64;
    }

    /// Decode LZMA symbols into the dictionary from `pos` up to `limit` (not past its end);
    /// leaves `pos` where it was (see [`Self::advance`]).
    #[inline(never)]
    fn decode(&mut self, limit: usize) -> io::Result<()> {
        let start = self.pos;
        let mut pos = start;
        let dict = &mut self.dict[..];
        let size = dict.len();
        let full = self.full;
        let lzma = &mut self.lzma;
        let probs = &mut lzma.probs[..];
        let (lc, lp_mask, pb_mask) = (
            lzma.lc as usize,
            (1usize << lzma.lp) - 1,
            (1usize << lzma.pb) - 1,
        );
        let mut state = lzma.state;
        let mut reps = lzma.reps;
        let mut rc = RangeDecoder {
            range: self.range,
            code: self.code,
            input: &self.packed,
            at: self.at,
        };
        let mut error = None;
        if self.len_left > 0 {
            let n = self.len_left.min(limit - pos);
            copy_match(dict, &mut pos, reps[0] as usize, n);
            self.len_left -= n;
        }
        while pos < limit {
            let pos_state = pos & pb_mask;
            if rc.bit(&mut probs[IS_MATCH + state * 16 + pos_state]) == 0 {
                let prev = usize::from(dict[if pos > 0 { pos - 1 } else { size - 1 }]);
                let at = LITERAL + 0x300 * (((pos & lp_mask) << lc) + (prev >> (8 - lc)));
                let probs = &mut probs[at..at + 0x300];
                let byte = if state < 7 {
                    rc.tree(probs, 8)
                } else {
                    let back = reps[0] as usize + 1;
                    if back > (full + pos - start).min(size) {
                        error = Some("a distance beyond the bytes decoded");
                        break;
                    }
                    let from = if pos >= back {
                        pos - back
                    } else {
                        pos + size - back
                    };
                    rc.matched_literal(probs, dict[from])
                };
                dict[pos] = byte as u8;
                pos += 1;
                state = if state < 4 {
                    0
                } else if state < 10 {
                    state - 3
                } else {
                    state - 6
                };
                continue;
            }
            let len;
            if rc.bit(&mut probs[IS_REP + state]) == 0 {
                len = rc.length(&mut probs[MATCH_LEN..MATCH_LEN + LEN_CODER], pos_state);
                state = if state < 7 { 7 } else { 10 };
                let slot_at = DIST_SLOT + 64 * (len - 2).min(3);
                let slot = rc.tree(&mut probs[slot_at..slot_at + 64], 6);
                let dist = if slot < 4 {
                    slot
                } else {
                    let direct = (slot >> 1) - 1;
                    let base = (2 | (slot & 1)) << direct;
                    if slot < 14 {
                        let at = DIST_SPECIAL + (base - slot) as usize;
                        base + rc.reverse_tree(&mut probs[at..at + (1 << direct)], direct)
                    } else {
                        let high = rc.direct(direct - 4) << 4;
                        let align = rc.reverse_tree(&mut probs[DIST_ALIGN..DIST_ALIGN + 16], 4);
                        base.wrapping_add(high).wrapping_add(align)
                    }
                };
                if dist == u32::MAX {
                    error = Some("an end marker inside a chunk");
                    break;
                }
                reps = [dist, reps[0], reps[1], reps[2]];
            } else if rc.bit(&mut probs[IS_REP0 + state]) == 0 {
                if rc.bit(&mut probs[IS_REP0_LONG + state * 16 + pos_state]) == 0 {
                    state = if state < 7 { 9 } else { 11 };
                    len = 1;
                } else {
                    len = rc.length(&mut probs[REP_LEN..REP_LEN + LEN_CODER], pos_state);
                    state = if state < 7 { 8 } else { 11 };
                }
            } else {
                let dist;
                if rc.bit(&mut probs[IS_REP1 + state]) == 0 {
                    dist = reps[1];
                } else {
                    if rc.bit(&mut probs[IS_REP2 + state]) == 0 {
                        dist = reps[2];
                    } else {
                        dist = reps[3];
                        reps[3] = reps[2];
                    }
                    reps[2] = reps[1];
                }
                reps[1] = reps[0];
                reps[0] = dist;
                len = rc.length(&mut probs[REP_LEN..REP_LEN + LEN_CODER], pos_state);
                state = if state < 7 { 8 } else { 11 };
            }
            let dist = reps[0] as usize;
            if dist >= (full + pos - start).min(size) {
                error = Some("a distance beyond the bytes decoded");
                break;
            }
            let n = len.min(limit - pos);
            copy_match(dict, &mut pos, dist, n);
            self.len_left = len - n;
        }
        rc.normalize();
        if error.is_none() && rc.at > rc.input.len() {
            error = Some("an LZMA chunk needs more than its compressed bytes");
        }
        if let Some(error) = error {
            return Err(invalid(error.into()));
        }
        debug_assert_eq!(pos, limit);
        (self.range, self.code, self.at) = (rc.range, rc.code, rc.at);
        lzma.state = state;
        lzma.reps = reps;
        Ok(())
    }
}

/// Copy `n` bytes from `dist + 1` bytes back (within the dictionary, checked) to `pos`.
#[inline(always)]
fn copy_match(dict: &mut [u8], pos: &mut usize, dist: usize, n: usize) {
    let size = dict.len();
    let back = dist + 1;
    let at = *pos;
    let mut from = if at >= back {
        at - back
    } else {
        at + size - back
    };
    if from < at && from + n <= at && n >= 16 {
        dict.copy_within(from..from + n, at);
    } else {
        for to in at..at + n {
            dict[to] = dict[from];
            from += 1;
            if from == size {
                from = 0;
            }
        }
    }
    *pos = at + n;
}

struct RangeDecoder<'a> {
    range: u32,
    code: u32,
    input: &'a [u8],
    /// The next byte; past the input's end the coder reads zeros (the chunk then fails).
    at: usize,
}

impl RangeDecoder<'_> {
    #[inline(always)]
    fn normalize(&mut self) {
        if self.range < 1 << 24 {
            let byte = self.input.get(self.at).copied().unwrap_or(0);
            self.at += 1;
            self.range <<= 8;
            self.code = (self.code << 8) | u32::from(byte);
        }
    }

    #[inline(always)]
    fn bit(&mut self, prob: &mut u16) -> u32 {
        self.normalize();
        let p = *prob;
        let bound = (self.range >> 11) * u32::from(p);
        if self.code < bound {
            self.range = bound;
            *prob = p + ((2 * HALF - p) >> 5);
            0
        } else {
            self.range -= bound;
            self.code -= bound;
            *prob = p - (p >> 5);
            1
        }
    }

    /// A `bits`-bit symbol, most significant bit first (`probs[1..1 << bits]`).
    #[inline(always)]
    fn tree(&mut self, probs: &mut [u16], bits: u32) -> u32 {
        let mut m = 1usize;
        for _ in 0..bits {
            m = (m << 1) | self.bit(&mut probs[m]) as usize;
        }
        (m - (1 << bits)) as u32
    }

    /// A `bits`-bit symbol, least significant bit first (`probs[1..1 << bits]`).
    #[inline(always)]
    fn reverse_tree(&mut self, probs: &mut [u16], bits: u32) -> u32 {
        let mut m = 1usize;
        let mut symbol = 0;
        for i in 0..bits {
            let bit = self.bit(&mut probs[m]);
            m = (m << 1) | bit as usize;
            symbol |= bit << i;
        }
        symbol
    }

    /// `count` bits of probability one half.
    fn direct(&mut self, count: u32) -> u32 {
        let mut value = 0u32;
        for _ in 0..count {
            self.normalize();
            self.range >>= 1;
            let bit = u32::from(self.code >= self.range);
            self.code = self.code.wrapping_sub(self.range & 0u32.wrapping_sub(bit));
            value = (value << 1) | bit;
        }
        value
    }

    /// A literal after a match: its bits coded against those of the byte at the distance,
    /// while they agree.
    #[inline(always)]
    fn matched_literal(&mut self, probs: &mut [u16], matched: u8) -> u32 {
        let mut matched = u32::from(matched);
        let mut symbol = 1u32;
        let mut offset = 0x100u32;
        while symbol < 0x100 {
            matched <<= 1;
            let match_bit = matched & offset;
            let bit = self.bit(&mut probs[(offset + match_bit + symbol) as usize]);
            symbol = (symbol << 1) | bit;
            offset &= if bit == 0 { !match_bit } else { match_bit };
        }
        symbol - 0x100
    }

    /// A match length, 2-273, from the length coder `probs`.
    #[inline(always)]
    fn length(&mut self, probs: &mut [u16], pos_state: usize) -> usize {
        let value = if self.bit(&mut probs[0]) == 0 {
            let at = 2 + pos_state * 8;
            self.tree(&mut probs[at..at + 8], 3)
        } else if self.bit(&mut probs[1]) == 0 {
            let at = 2 + 16 * 8 + pos_state * 8;
            8 + self.tree(&mut probs[at..at + 8], 3)
        } else {
            16 + self.tree(&mut probs[2 + 16 * 8 * 2..LEN_CODER], 8)
        };
        value as usize + 2
    }
}

impl<R: Read> Read for Lzma2Reader<R> {
    /// Decoded bytes: at most what one chunk holds, at most `buf.len()`; 0 after the end
    /// marker.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            if self.pending > 0 {
                let n = self.pending.min(buf.len());
                let from = self.pos - self.pending;
                buf[..n].copy_from_slice(&self.dict[from..from + n]);
                self.pending -= n;
                return Ok(n);
            }
            if self.chunk == Chunk::End {
                return Ok(0);
            }
            self.produce(buf.len().min(MAX_CHUNK))?;
        }
    }
}

#[cfg(test)]
mod tests;
