//! Follows a zstd frame's blocks as their bytes go by, without decoding them: the latest
//! literal and sequence table descriptions, and, for the blocks it is asked to capture, the
//! repeat offsets (by decoding the sequences' codes and extra bits, not the literals). RFC 8878
//! sections 3.1.1.2-3.1.1.5 and 4.1 are the reference for every layout read here.
//!
//! Nothing here fails an install: a block it cannot follow only means no resume point until
//! the frame ends (the C decoder is the judge of the stream's validity).

/// The description of one of the three sequence tables as the frame last set it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Table {
    /// Not set yet in this frame (a block cannot repeat it).
    Unset,
    Predefined,
    Rle(u8),
    /// An FSE table description (the normalized counts, as in the block).
    Fse(Vec<u8>),
}

/// The three sequence tables, in the order of a block's header: literal lengths, offsets,
/// match lengths.
pub const LL: usize = 0;
pub const OF: usize = 1;
pub const ML: usize = 2;

const MAX_SYMBOL: [usize; 3] = [35, 31, 52];
const MAX_LOG: [u32; 3] = [9, 8, 9];

const LL_DEFAULT: [i16; 36] = [
    4, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3, 2, 1, 1, 1, 1, 1,
    -1, -1, -1, -1,
];
const OF_DEFAULT: [i16; 29] = [
    1, 1, 1, 1, 1, 1, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1,
];
const ML_DEFAULT: [i16; 53] = [
    1, 4, 3, 2, 2, 2, 2, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1,
    1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1,
];

const LL_BITS: [u8; 36] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 4, 6, 7, 8, 9, 10, 11,
    12, 13, 14, 15, 16,
];
const ML_BITS: [u8; 53] = [
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    1, 1, 1, 1, 2, 2, 3, 3, 4, 4, 5, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
];

/// The normalized counts of a predefined table, and their accuracy log.
fn predefined(table: usize) -> (&'static [i16], u32) {
    match table {
        LL => (&LL_DEFAULT, 6),
        OF => (&OF_DEFAULT, 5),
        _ => (&ML_DEFAULT, 6),
    }
}

/// The stream cannot be followed (or is corrupt; the decoder will say).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost;

/// An FSE table description: normalized counts and accuracy log, and its length in bytes.
pub fn read_ncount(bytes: &[u8], table: usize) -> Result<(Vec<i16>, u32, usize), Lost> {
    let mut bits = ForwardBits { bytes, pos: 0 };
    let log = bits.read(4)? + 5;
    if log > MAX_LOG[table] {
        return Err(Lost);
    }
    let mut counts = Vec::with_capacity(MAX_SYMBOL[table] + 1);
    let mut remaining: i32 = (1 << log) + 1;
    let mut threshold: i32 = 1 << log;
    let mut nb_bits = log + 1;
    let mut previous_zero = false;
    while remaining > 1 {
        if previous_zero {
            loop {
                let repeat = bits.read(2)?;
                counts.extend(std::iter::repeat_n(0, repeat as usize));
                if repeat != 3 {
                    break;
                }
            }
        }
        if counts.len() > MAX_SYMBOL[table] {
            return Err(Lost);
        }
        let max = (2 * threshold - 1) - remaining;
        let value = bits.peek(nb_bits)? as i32;
        let mut count;
        if (value & (threshold - 1)) < max {
            count = value & (threshold - 1);
            bits.pos += nb_bits as usize - 1;
        } else {
            count = value & (2 * threshold - 1);
            if count >= threshold {
                count -= max;
            }
            bits.pos += nb_bits as usize;
        }
        if bits.pos > bytes.len() * 8 {
            return Err(Lost);
        }
        count -= 1;
        remaining -= count.abs();
        counts.push(count as i16);
        previous_zero = count == 0;
        while remaining < threshold {
            nb_bits -= 1;
            threshold >>= 1;
        }
    }
    if remaining != 1 || counts.len() > MAX_SYMBOL[table] + 1 {
        return Err(Lost);
    }
    Ok((counts, log, bits.pos.div_ceil(8)))
}

/// The description [`read_ncount`] reads (FSE_writeNCount of the reference encoder).
pub fn write_ncount(counts: &[i16], log: u32) -> Vec<u8> {
    let mut out = BitWriter::default();
    out.write(log - 5, 4);
    let mut remaining: i32 = (1 << log) + 1;
    let mut threshold: i32 = 1 << log;
    let mut nb_bits = log + 1;
    let mut symbol = 0;
    let mut previous_zero = false;
    while remaining > 1 && symbol < counts.len() {
        if previous_zero {
            let start = symbol;
            while symbol < counts.len() && counts[symbol] == 0 {
                symbol += 1;
            }
            let mut zeros = symbol - start;
            while zeros >= 3 {
                out.write(3, 2);
                zeros -= 3;
            }
            out.write(zeros as u32, 2);
        }
        let mut count = i32::from(counts[symbol]);
        symbol += 1;
        let max = (2 * threshold - 1) - remaining;
        remaining -= count.abs();
        count += 1;
        if count >= threshold {
            count += max;
        }
        out.write(count as u32, nb_bits - u32::from(count < max));
        previous_zero = count == 1;
        while remaining < threshold {
            nb_bits -= 1;
            threshold >>= 1;
        }
    }
    out.finish()
}

/// The counts that make a table of `symbol` alone: what a repeated RLE table decodes to.
pub fn rle_counts(symbol: u8) -> (Vec<i16>, u32) {
    let mut counts = vec![0i16; usize::from(symbol) + 1];
    counts[usize::from(symbol)] = 32;
    (counts, 5)
}

/// The normalized counts and log a table description stands for (None when unset).
pub fn table_counts(table: usize, desc: &Table) -> Option<(Vec<i16>, u32)> {
    match desc {
        Table::Unset => None,
        Table::Predefined => {
            let (counts, log) = predefined(table);
            Some((counts.to_vec(), log))
        }
        Table::Rle(symbol) => Some(rle_counts(*symbol)),
        Table::Fse(bytes) => read_ncount(bytes, table)
            .ok()
            .map(|(counts, log, _)| (counts, log)),
    }
}

struct ForwardBits<'a> {
    bytes: &'a [u8],
    /// Bits read so far.
    pos: usize,
}

impl ForwardBits<'_> {
    /// The next `n` bits; bits past the end read as zero (a description's last value may
    /// use one bit less than it peeks), [`Self::read`] and the caller check the end.
    fn peek(&self, n: u32) -> Result<u32, Lost> {
        if self.pos >= self.bytes.len() * 8 {
            return Err(Lost);
        }
        let first = self.pos / 8;
        let mut word = [0u8; 8];
        let end = (first + 8).min(self.bytes.len());
        word[..end - first].copy_from_slice(&self.bytes[first..end]);
        let value = u64::from_le_bytes(word) >> (self.pos % 8);
        Ok((value & ((1u64 << n) - 1)) as u32)
    }

    fn read(&mut self, n: u32) -> Result<u32, Lost> {
        let value = self.peek(n)?;
        self.pos += n as usize;
        if self.pos > self.bytes.len() * 8 {
            return Err(Lost);
        }
        Ok(value)
    }
}

#[derive(Default)]
struct BitWriter {
    bytes: Vec<u8>,
    bits: usize,
}

impl BitWriter {
    fn write(&mut self, value: u32, n: u32) {
        for i in 0..n {
            if self.bits.is_multiple_of(8) {
                self.bytes.push(0);
            }
            let bit = ((value >> i) & 1) as u8;
            *self.bytes.last_mut().expect("pushed") |= bit << (self.bits % 8);
            self.bits += 1;
        }
    }

    fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// One state of an FSE decoding table.
#[derive(Debug, Clone, Copy, Default)]
struct State {
    symbol: u8,
    bits: u8,
    baseline: u16,
}

struct FseTable {
    log: u32,
    states: Vec<State>,
}

impl FseTable {
    fn build(counts: &[i16], log: u32) -> Result<Self, Lost> {
        let size = 1usize << log;
        let mut states = vec![State::default(); size];
        let mut next = vec![0u32; counts.len()];
        let mut high = size - 1;
        for (s, &c) in counts.iter().enumerate() {
            if c == -1 {
                states[high].symbol = s as u8;
                high = high.wrapping_sub(1);
                next[s] = 1;
            } else {
                next[s] = c.max(0) as u32;
            }
        }
        let step = (size >> 1) + (size >> 3) + 3;
        let mask = size - 1;
        let mut pos = 0usize;
        for (s, &c) in counts.iter().enumerate() {
            for _ in 0..c.max(0) {
                states[pos].symbol = s as u8;
                loop {
                    pos = (pos + step) & mask;
                    if high == usize::MAX || pos <= high {
                        break;
                    }
                }
            }
        }
        if pos != 0 {
            return Err(Lost);
        }
        for state in states.iter_mut() {
            let n = next.get_mut(usize::from(state.symbol)).ok_or(Lost)?;
            let next_state = *n;
            *n += 1;
            if next_state == 0 {
                return Err(Lost);
            }
            let bits = log - (31 - next_state.leading_zeros());
            state.bits = bits as u8;
            state.baseline = ((next_state << bits) as usize - size) as u16;
        }
        Ok(FseTable { log, states })
    }
}

/// A sequences bitstream, read backwards from its last byte's highest set bit.
struct BackwardBits<'a> {
    bytes: &'a [u8],
    /// Bits not read yet: `[0, pos)`.
    pos: usize,
}

impl<'a> BackwardBits<'a> {
    fn new(bytes: &'a [u8]) -> Result<Self, Lost> {
        let last = *bytes.last().ok_or(Lost)?;
        if last == 0 {
            return Err(Lost);
        }
        let marker = 7 - last.leading_zeros() as usize;
        Ok(BackwardBits {
            bytes,
            pos: (bytes.len() - 1) * 8 + marker,
        })
    }

    fn read(&mut self, n: u8) -> Result<u64, Lost> {
        let n = usize::from(n);
        if n == 0 {
            return Ok(0);
        }
        if n > self.pos {
            return Err(Lost);
        }
        self.pos -= n;
        let first = self.pos / 8;
        let mut word = [0u8; 8];
        let end = (first + 8).min(self.bytes.len());
        word[..end - first].copy_from_slice(&self.bytes[first..end]);
        let value = u64::from_le_bytes(word) >> (self.pos % 8);
        Ok(value & ((1u64 << n) - 1))
    }
}

/// A repeat offset while following: known, or not (what it was before the followed blocks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rep {
    Known(u32),
    Unknown,
}

/// Apply one sequence's offset to the repeat offsets (RFC 8878 3.1.2.5).
fn update_reps(reps: &mut [Rep; 3], offset_value: u64, literals_zero: bool) -> Result<(), Lost> {
    if offset_value > 3 {
        let offset = u32::try_from(offset_value - 3).map_err(|_| Lost)?;
        *reps = [Rep::Known(offset), reps[0], reps[1]];
        return Ok(());
    }
    match offset_value + u64::from(literals_zero) {
        1 => {}
        2 => *reps = [reps[1], reps[0], reps[2]],
        3 => *reps = [reps[2], reps[0], reps[1]],
        _ => {
            let minus_one = match reps[0] {
                Rep::Known(0 | 1) => return Err(Lost),
                Rep::Known(r) => Rep::Known(r - 1),
                Rep::Unknown => Rep::Unknown,
            };
            *reps = [minus_one, reps[0], reps[1]];
        }
    }
    Ok(())
}

/// Run a block's sequences through the repeat offsets: `bitstream` is the block's bytes after
/// its sequence table descriptions.
pub fn follow_sequences(
    bitstream: &[u8],
    count: usize,
    tables: &[Table; 3],
    reps: &mut [Rep; 3],
) -> Result<(), Lost> {
    let mut fse = Vec::with_capacity(3);
    for (t, desc) in tables.iter().enumerate() {
        if let Table::Rle(symbol) = desc {
            // One state that reads no bits (a table of accuracy log 0).
            fse.push(FseTable {
                log: 0,
                states: vec![State {
                    symbol: *symbol,
                    bits: 0,
                    baseline: 0,
                }],
            });
            continue;
        }
        let (counts, log) = table_counts(t, desc).ok_or(Lost)?;
        if counts.len() > MAX_SYMBOL[t] + 1 {
            return Err(Lost);
        }
        fse.push(FseTable::build(&counts, log)?);
    }
    let mut bits = BackwardBits::new(bitstream)?;
    let mut ll = bits.read(fse[LL].log as u8)? as usize;
    let mut of = bits.read(fse[OF].log as u8)? as usize;
    let mut ml = bits.read(fse[ML].log as u8)? as usize;
    for i in 0..count {
        let of_state = *fse[OF].states.get(of).ok_or(Lost)?;
        let ml_state = *fse[ML].states.get(ml).ok_or(Lost)?;
        let ll_state = *fse[LL].states.get(ll).ok_or(Lost)?;
        let of_code = of_state.symbol;
        if of_code > 31 {
            return Err(Lost);
        }
        let offset_value = (1u64 << of_code) + bits.read(of_code)?;
        bits.read(*ML_BITS.get(usize::from(ml_state.symbol)).ok_or(Lost)?)?;
        let ll_code = usize::from(ll_state.symbol);
        bits.read(*LL_BITS.get(ll_code).ok_or(Lost)?)?;
        update_reps(reps, offset_value, ll_code == 0)?;
        if i + 1 < count {
            ll = usize::from(ll_state.baseline) + bits.read(ll_state.bits)? as usize;
            ml = usize::from(ml_state.baseline) + bits.read(ml_state.bits)? as usize;
            of = usize::from(of_state.baseline) + bits.read(of_state.bits)? as usize;
        }
    }
    if bits.pos != 0 {
        return Err(Lost);
    }
    Ok(())
}

/// A block's literals section: its length, and the Huffman tree description it holds if it
/// sets one (`start..end` in the block).
#[derive(Debug, PartialEq, Eq)]
pub struct Literals {
    /// Raw 0, RLE 1, compressed with a tree 2, compressed with the previous tree 3.
    pub kind: u8,
    pub len: usize,
    pub huffman: Option<std::ops::Range<usize>>,
}

/// Bytes of a block's start needed to know its literals section.
pub const LITERALS_HEAD: usize = 5 + 1;

/// The literals section of a compressed block starting at `block[0]`; `block` holds at least
/// [`LITERALS_HEAD`] bytes, or the whole block.
pub fn literals(block: &[u8]) -> Result<Literals, Lost> {
    let b0 = *block.first().ok_or(Lost)?;
    let byte = |i: usize| block.get(i).map(|&b| b as usize).ok_or(Lost);
    let kind = b0 & 3;
    let format = (b0 >> 2) & 3;
    if kind < 2 {
        let (header, size) = match format {
            0 | 2 => (1, usize::from(b0 >> 3)),
            1 => (2, usize::from(b0 >> 4) + (byte(1)? << 4)),
            _ => (3, usize::from(b0 >> 4) + (byte(1)? << 4) + (byte(2)? << 12)),
        };
        let len = header + if kind == 0 { size } else { 1 };
        return Ok(Literals {
            kind,
            len,
            huffman: None,
        });
    }
    let header = match format {
        0 | 1 => 3,
        2 => 4,
        _ => 5,
    };
    let mut le = [0u8; 8];
    for (i, b) in le.iter_mut().enumerate().take(header) {
        *b = byte(i)? as u8;
    }
    let v = u64::from_le_bytes(le) >> 4;
    let size_bits = match header {
        3 => 10,
        4 => 14,
        _ => 18,
    };
    let compressed = ((v >> size_bits) & ((1 << size_bits) - 1)) as usize;
    let huffman = if kind == 2 {
        let first = byte(header)?;
        let desc = if first < 128 {
            1 + first
        } else {
            1 + (first - 127).div_ceil(2)
        };
        if desc > compressed {
            return Err(Lost);
        }
        Some(header..header + desc)
    } else {
        None
    };
    Ok(Literals {
        kind,
        len: header + compressed,
        huffman,
    })
}

/// A block's sequences section header.
#[derive(Debug, PartialEq, Eq)]
pub struct Sequences {
    pub count: usize,
    /// The tables as the block sets them (None: repeated from the previous block).
    pub tables: [Option<Table>; 3],
    /// Bytes of the header and table descriptions; the bitstream follows.
    pub len: usize,
    /// Where each table's description ends (an empty one, repeated, ends where it starts).
    pub ends: [usize; 3],
    /// Where the byte of the three tables' modes is.
    pub modes_at: usize,
}

/// Most bytes a sequences header with its three table descriptions takes.
pub const SEQUENCES_HEAD: usize = 4 + 3 * 100;

/// The sequences section header at `section[0]` (at least [`SEQUENCES_HEAD`] bytes of the
/// section, or all of it).
pub fn sequences(section: &[u8]) -> Result<Sequences, Lost> {
    let byte = |i: usize| section.get(i).map(|&b| b as usize).ok_or(Lost);
    let b0 = byte(0)?;
    let (count, mut pos) = match b0 {
        0 => {
            return Ok(Sequences {
                count: 0,
                tables: [None, None, None],
                len: 1,
                ends: [1; 3],
                modes_at: 1,
            })
        }
        1..=127 => (b0, 1),
        128..=254 => (((b0 - 128) << 8) + byte(1)?, 2),
        _ => (byte(1)? + (byte(2)? << 8) + 0x7f00, 3),
    };
    let modes_at = pos;
    let modes = byte(pos)?;
    pos += 1;
    let mut ends = [0; 3];
    if modes & 3 != 0 {
        return Err(Lost);
    }
    let mut tables = [None, None, None];
    for (t, table) in tables.iter_mut().enumerate() {
        let mode = (modes >> (6 - 2 * t)) & 3;
        *table = match mode {
            0 => Some(Table::Predefined),
            1 => {
                let symbol = byte(pos)?;
                pos += 1;
                if symbol > MAX_SYMBOL[t] {
                    return Err(Lost);
                }
                Some(Table::Rle(symbol as u8))
            }
            2 => {
                let (_, _, len) = read_ncount(section.get(pos..).ok_or(Lost)?, t)?;
                let desc = section[pos..pos + len].to_vec();
                pos += len;
                Some(Table::Fse(desc))
            }
            _ => None,
        };
        ends[t] = pos;
    }
    Ok(Sequences {
        count,
        tables,
        len: pos,
        ends,
        modes_at,
    })
}

/// Largest block size (RFC 8878 3.1.1.2.4).
pub const MAX_BLOCK: usize = 128 << 10;

/// What the first blocks of a resumed frame must be checked for: the tables its dictionary
/// could not hold as they were (see [`check_resumed_block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fix {
    /// RLE tables (a dictionary's tables have an accuracy log of at least 5).
    pub rle: [Option<u8>; 3],
    /// Tables the frame never set (the dictionary holds a stand-in).
    pub unset: [bool; 3],
    /// The frame never set a Huffman tree (the dictionary holds a stand-in).
    pub no_tree: bool,
}

impl Fix {
    pub fn done(&self) -> bool {
        self.rle == [None; 3] && self.unset == [false; 3] && !self.no_tree
    }
}

/// Why a block after a resume point is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// It repeats a table or tree the frame never set: a fresh decoder refuses it too.
    Unset,
    /// It cannot be followed (or rewritten within the block size limit).
    Lost,
}

impl From<Lost> for Refused {
    fn from(_: Lost) -> Self {
        Refused::Lost
    }
}

/// A compressed block of a resumed frame (its 3-byte header first), before the decoder gets
/// it: one that repeats a table or tree the frame never set is refused (the dictionary's
/// stand-ins must never decode anything); one whose sequences repeat an RLE table is
/// rewritten to set that table in RLE mode itself (one byte more per table; the same output).
/// `fix` is updated with what the block sets.
pub fn check_resumed_block(block: &mut Vec<u8>, fix: &mut Fix) -> Result<(), Refused> {
    let body = block.get(3..).ok_or(Lost)?;
    let lit = literals(body)?;
    match lit.kind {
        3 if fix.no_tree => return Err(Refused::Unset),
        2 => fix.no_tree = false,
        _ => {}
    }
    let seq = sequences(body.get(lit.len..).ok_or(Lost)?)?;
    if seq.count == 0 {
        return Ok(());
    }
    let mut modes = body[lit.len + seq.modes_at];
    let mut inserts = Vec::new();
    for t in (0..3).rev() {
        if seq.tables[t].is_some() {
            continue;
        }
        if fix.unset[t] {
            return Err(Refused::Unset);
        }
        if let Some(symbol) = fix.rle[t] {
            inserts.push((3 + lit.len + seq.ends[t], symbol));
            modes = (modes & !(3 << (6 - 2 * t))) | (1 << (6 - 2 * t));
        }
    }
    // Every table is the block's own or a repeat of a real one from here on.
    fix.rle = [None; 3];
    fix.unset = [false; 3];
    if inserts.is_empty() {
        return Ok(());
    }
    block[3 + lit.len + seq.modes_at] = modes;
    for (at, symbol) in inserts {
        block.insert(at, symbol);
    }
    let size = block.len() - 3;
    if size > MAX_BLOCK {
        return Err(Refused::Lost);
    }
    let header = u32::from(block[0]) | (u32::from(block[1]) << 8) | (u32::from(block[2]) << 16);
    let header = (header & 7) | ((size as u32) << 3);
    block[..3].copy_from_slice(&header.to_le_bytes()[..3]);
    Ok(())
}
