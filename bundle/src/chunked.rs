//! Formats 2 and 3: the chunked image and its index.
//!
//! The image is cut into content-defined chunks ([`crate::chunk`]); each chunk is one zstd
//! frame of its own, stored one after the other as the image member. The index member lists,
//! per chunk, where its frame is in the image member and how long it is, its length once
//! decompressed and the sha256 of the decompressed bytes. The signed manifest holds the
//! index's size and sha256, so every chunk is trusted through the signature and can be checked
//! on its own: that is what lets a device take chunks it already has from its active slot and
//! download only the others, with HTTP Range requests.
//!
//! Format 3 compresses each chunk's frame with the `history` image bytes before the chunk as a
//! zstd raw-content prefix (the device has them: it writes the image in order), and stores a
//! compact index: frame and raw lengths and the first 16 bytes of each chunk's sha256, the
//! whole zstd-compressed. BENCHMARKS.md ("Delta updates") has what each part saves.

use sha2::{Digest, Sha256};
use zstd::zstd_safe::zstd_sys::ZSTD_ErrorCode;
use zstd::zstd_safe::{DCtx, ResetDirective};

use crate::manifest::ChunkedInfo;
use crate::BundleError;

/// Bytes per format-2 index record: offset u64, stored length u32, raw length u32
/// (little-endian), sha256 of the raw bytes.
pub const RECORD_LEN: usize = 48;

/// Bytes per format-3 index record: stored length u32, raw length u32 (little-endian), the
/// first [`COMPACT_HASH_LEN`] bytes of the sha256 of the raw bytes. Offsets follow from the
/// stored lengths (frames are contiguous).
pub const COMPACT_RECORD_LEN: usize = 24;

/// Bytes of a chunk's sha256 a format-3 index keeps: 128 bits, so that forging a chunk for a
/// signed entry stays a 2^128 second-preimage search; the whole image's full sha256 is still
/// checked before a slot is used.
pub const COMPACT_HASH_LEN: usize = 16;

/// Bytes per index record of a bundle format (2 or 3).
pub fn record_len(format: u32) -> usize {
    if format == crate::FORMAT_CHUNKED {
        RECORD_LEN
    } else {
        COMPACT_RECORD_LEN
    }
}

/// Largest index a device reads (its records are kept in memory during the install):
/// 32 MiB = 699 050 chunks, 42 GiB of image at a 64 KiB average.
pub const MAX_INDEX_SIZE: u64 = 32 << 20;

/// Most chunks an image may have, in either format: a format-2 index of [`MAX_INDEX_SIZE`]
/// holds 699 050. A device keeps one [`ChunkEntry`] (48 bytes) per chunk during the install
/// whatever the format, so the cap is on the count: by bytes alone, a format-3 index (24-byte
/// records) could list twice as many.
pub const MAX_CHUNKS: u64 = MAX_INDEX_SIZE / RECORD_LEN as u64;

/// A (signed) manifest announces more chunks than a device holds in memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("it announces {chunks} chunks, more than the {limit} a device holds in memory")]
pub struct TooManyChunks {
    pub chunks: u64,
    pub limit: u64,
}

/// Refuse a chunk count above [`MAX_CHUNKS`]; called before anything is sized by it.
pub fn check_chunk_count(chunks: u64) -> Result<(), TooManyChunks> {
    if chunks > MAX_CHUNKS {
        return Err(TooManyChunks {
            chunks,
            limit: MAX_CHUNKS,
        });
    }
    Ok(())
}

/// One chunk of a chunked image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// Offset of the chunk's zstd frame from the start of the image member's data.
    pub offset: u64,
    /// Bytes of the zstd frame.
    pub stored_len: u32,
    /// Bytes of the chunk decompressed.
    pub raw_len: u32,
    /// sha256 of the decompressed bytes; in a format-3 index only its first
    /// [`ChunkIndex::hash_len`] bytes, the rest zero ([`chunk_key`]).
    pub sha256: [u8; 32],
}

impl ChunkEntry {
    /// End of the chunk's frame in the image member.
    pub fn end(&self) -> u64 {
        self.offset + u64::from(self.stored_len)
    }
}

/// The parsed, validated index: chunks in image order, frames contiguous from offset 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkIndex {
    pub chunks: Vec<ChunkEntry>,
    /// Bytes of each chunk's sha256 the index holds: 32 (format 2) or 16 (format 3).
    pub hash_len: usize,
}

impl Default for ChunkIndex {
    fn default() -> Self {
        ChunkIndex {
            chunks: Vec::new(),
            hash_len: 32,
        }
    }
}

impl ChunkIndex {
    /// Parse and check the index member of a bundle of `format` (2 or 3) against the (signed)
    /// manifest: the record count, contiguous frames that fill the image member exactly, raw
    /// lengths that respect the chunker's maximum and sum to the image size. A format-3 index
    /// is decompressed first, to exactly the size its record count gives.
    pub fn parse(
        bytes: &[u8],
        info: &ChunkedInfo,
        member_size: u64,
        format: u32,
    ) -> Result<ChunkIndex, BundleError> {
        let fail = |why: String| Err(BundleError::Manifest(format!("chunk index: {why}")));
        // Before anything below is sized by the count (the manifest's parser checks it too).
        check_chunk_count(info.chunks)?;
        let record_len = record_len(format);
        let decompressed;
        let bytes = if format == crate::FORMAT_CHUNKED {
            bytes
        } else {
            let want = info
                .chunks
                .saturating_mul(record_len as u64)
                .min(MAX_INDEX_SIZE) as usize;
            if let Ok(window) = frame_window_size(bytes) {
                let limit = max_chunk_window(want as u32);
                if window > limit {
                    return fail(format!(
                        "its zstd frame asks for a {window}-byte window, more than the {limit} \
                         bytes it may"
                    ));
                }
            }
            let mut out = vec![0; want + 1];
            let got = decompress_exact(&mut DCtx::create(), bytes, want, &mut out)
                .map_err(|why| BundleError::Manifest(format!("chunk index: {why}")))?;
            if got != want {
                return fail(format!(
                    "it decompresses to {got} bytes, {} records need {want}",
                    info.chunks
                ));
            }
            out.truncate(want);
            decompressed = out;
            &decompressed[..]
        };
        if bytes.len() % record_len != 0 {
            return fail(format!(
                "{} bytes is not a whole number of {record_len}-byte records",
                bytes.len()
            ));
        }
        let count = bytes.len() / record_len;
        if count as u64 != info.chunks {
            return fail(format!(
                "{count} records, the manifest says {}",
                info.chunks
            ));
        }
        let mut chunks = Vec::with_capacity(count);
        let (mut stored, mut raw) = (0u64, 0u64);
        for (i, record) in bytes.chunks_exact(record_len).enumerate() {
            let u32_at = |at: usize| u32::from_le_bytes(record[at..at + 4].try_into().expect("4"));
            let entry = if record_len == RECORD_LEN {
                ChunkEntry {
                    offset: u64::from_le_bytes(record[0..8].try_into().expect("8 bytes")),
                    stored_len: u32_at(8),
                    raw_len: u32_at(12),
                    sha256: record[16..48].try_into().expect("32 bytes"),
                }
            } else {
                let mut sha256 = [0u8; 32];
                sha256[..COMPACT_HASH_LEN].copy_from_slice(&record[8..]);
                ChunkEntry {
                    offset: stored,
                    stored_len: u32_at(0),
                    raw_len: u32_at(4),
                    sha256,
                }
            };
            if entry.offset != stored {
                return fail(format!(
                    "chunk {i} starts at {}, the previous one ends at {stored}",
                    entry.offset
                ));
            }
            if entry.raw_len == 0 || entry.raw_len > info.chunker.max_size {
                return fail(format!(
                    "chunk {i} is {} bytes, outside 1..={}",
                    entry.raw_len, info.chunker.max_size
                ));
            }
            if entry.stored_len == 0 || entry.stored_len > max_frame_len(info.chunker.max_size) {
                return fail(format!(
                    "chunk {i} is stored in {} bytes, more than a frame of {} bytes needs",
                    entry.stored_len, info.chunker.max_size
                ));
            }
            stored = entry.end();
            raw += u64::from(entry.raw_len);
            chunks.push(entry);
        }
        if stored != member_size {
            return fail(format!(
                "the chunks fill {stored} bytes, the image member has {member_size}"
            ));
        }
        if raw != info.image_size {
            return fail(format!(
                "the chunks hold {raw} bytes, the manifest says the image has {}",
                info.image_size
            ));
        }
        let hash_len = if record_len == RECORD_LEN {
            32
        } else {
            COMPACT_HASH_LEN
        };
        Ok(ChunkIndex { chunks, hash_len })
    }

    /// The format-2 records (48 bytes each).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.chunks.len() * RECORD_LEN);
        for c in &self.chunks {
            out.extend_from_slice(&c.offset.to_le_bytes());
            out.extend_from_slice(&c.stored_len.to_le_bytes());
            out.extend_from_slice(&c.raw_len.to_le_bytes());
            out.extend_from_slice(&c.sha256);
        }
        out
    }

    /// The format-3 records (24 bytes each), before compression.
    pub fn to_compact_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.chunks.len() * COMPACT_RECORD_LEN);
        for c in &self.chunks {
            out.extend_from_slice(&c.stored_len.to_le_bytes());
            out.extend_from_slice(&c.raw_len.to_le_bytes());
            out.extend_from_slice(&c.sha256[..COMPACT_HASH_LEN]);
        }
        out
    }

    /// What an entry of this index holds for the chunk `raw` (see [`chunk_key`]).
    pub fn key_of(&self, raw: &[u8]) -> [u8; 32] {
        chunk_key(raw, self.hash_len)
    }

    /// Bytes of the image decompressed.
    pub fn raw_size(&self) -> u64 {
        self.chunks.iter().map(|c| u64::from(c.raw_len)).sum()
    }

    /// Bytes of the image member (all frames).
    pub fn stored_size(&self) -> u64 {
        self.chunks.last().map_or(0, ChunkEntry::end)
    }
}

/// The largest zstd frame a chunk of `max_raw` bytes can need: the compressor's worst case
/// (ZSTD_compressBound) plus room for the frame header; anything larger is not a real frame.
pub fn max_frame_len(max_raw: u32) -> u32 {
    let raw = max_raw as u64;
    let bound = raw + raw / 256 + 1024;
    bound.min(u64::from(u32::MAX)) as u32
}

/// Why a chunk's bytes were not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk {index} does not decompress: {reason}")]
    Corrupt { index: usize, reason: String },
    #[error("chunk {index} decompresses to {actual} bytes, the signed index says {expected}")]
    Length {
        index: usize,
        expected: u32,
        actual: usize,
    },
    #[error("chunk {index} has sha256 {actual}, the signed index says {expected}")]
    Hash {
        index: usize,
        expected: String,
        actual: String,
    },
}

/// Decompresses chunk frames and checks them; keeps its buffers between chunks.
///
/// For format 3 ([`ChunkDecoder::for_index`] with a history) it also keeps the last
/// `history` bytes of the image, the context every frame is compressed with: the caller hands
/// it every chunk in image order, decoded here or taken from elsewhere ([`Self::remember`]).
pub struct ChunkDecoder {
    /// The C library's decoder, kept between chunks: creating one costs a CPUID instruction
    /// (its BMI2 check), which traps to the hypervisor in a virtual machine (~25 µs, a quarter
    /// of a second for 10 000 chunks). A format-3 chunk's prefix is referenced by it only for
    /// the duration of one [`decompress_prefixed`] call.
    decoder: Option<DCtx<'static>>,
    /// Format 2: the last chunk decoded (and one byte of room).
    out: Vec<u8>,
    hash_len: usize,
    /// Format 3: how many image bytes before a chunk its frame was compressed with.
    history: usize,
    /// Format 3: the image bytes before the next chunk in `recent[..filled]` (the last
    /// `history` of them are used), and room after them that the next chunk is decoded into,
    /// so that a decoded chunk is its successor's context without being copied. Grows to about
    /// twice `history` plus a chunk before the old bytes are dropped, so each byte is moved
    /// about once.
    recent: Vec<u8>,
    filled: usize,
    /// The chunk the next one follows: a frame decodes only after its predecessor was seen.
    next: usize,
}

impl Default for ChunkDecoder {
    fn default() -> Self {
        ChunkDecoder {
            decoder: None,
            out: Vec::new(),
            hash_len: 32,
            history: 0,
            recent: Vec::new(),
            filled: 0,
            next: 0,
        }
    }
}

impl ChunkDecoder {
    /// A decoder for format-2 frames (no history, full sha256).
    pub fn new() -> Self {
        Self::default()
    }

    /// A decoder for the chunks of `index`, whose frames were compressed with `history`
    /// bytes of context (format 3; 0 for format 2).
    pub fn for_index(index: &ChunkIndex, history: u32) -> Self {
        ChunkDecoder {
            hash_len: index.hash_len,
            history: history as usize,
            ..Self::default()
        }
    }

    /// Chunk `index` was obtained without decoding (from a seed, or already on the slot):
    /// its bytes are the context of the next frame. Call in image order.
    pub fn remember(&mut self, index: usize, raw: &[u8]) {
        if self.history == 0 {
            return;
        }
        if index != self.next {
            // A gap (resumed chunks): the caller hands the bytes before `index` first.
            self.filled = 0;
        }
        self.push_recent(raw);
        self.next = index + 1;
    }

    /// The image bytes right before chunk `index` are `bytes` (at most `history` are kept):
    /// for a resume that starts in the middle of the image.
    pub fn set_context(&mut self, index: usize, bytes: &[u8]) {
        self.filled = 0;
        self.push_recent(bytes);
        self.next = index;
    }

    fn push_recent(&mut self, raw: &[u8]) {
        let raw = &raw[raw.len().saturating_sub(self.history)..];
        let at = self.make_room(raw.len());
        self.recent[at..at + raw.len()].copy_from_slice(raw);
        self.filled += raw.len();
    }

    /// Room for `n` more bytes after the context: drops all but the last `history` bytes when
    /// the buffer would grow past twice `history` (and `n`). Returns where the room starts.
    fn make_room(&mut self, n: usize) -> usize {
        if self.filled + n > 2 * self.history.max(n) {
            let keep = self.history.min(self.filled);
            self.recent.copy_within(self.filled - keep..self.filled, 0);
            self.filled = keep;
        }
        if self.recent.len() < self.filled + n {
            self.recent.resize(self.filled + n, 0);
        }
        self.filled
    }

    /// The raw bytes of chunk `index` from its stored `frame`, checked against `entry`'s
    /// length and sha256. The frame must be exactly one zstd frame whose window is at most
    /// [`max_chunk_window`] (the format's rule: a streaming decoder would hold a whole window
    /// before it could tell that the output is longer than the signed length, and the frame is
    /// not verified yet).
    /// Decompression never writes more than the signed length. With a history, chunk
    /// `index - 1` must have been decoded or [remembered](Self::remember) just before.
    pub fn decode(
        &mut self,
        index: usize,
        entry: &ChunkEntry,
        frame: &[u8],
    ) -> Result<&[u8], ChunkError> {
        let corrupt = |reason: String| ChunkError::Corrupt { index, reason };
        let window = frame_window_size(frame).map_err(|why| corrupt(why.into()))?;
        let limit = max_chunk_window(entry.raw_len);
        if window > limit {
            return Err(corrupt(format!(
                "its zstd frame asks for a {window}-byte window, more than the {limit} bytes \
                 a chunk of {} bytes needs",
                entry.raw_len
            )));
        }
        let want = entry.raw_len as usize;
        if self.history == 0 {
            let decoder = self.decoder.get_or_insert_with(DCtx::create);
            self.out.resize(want + 1, 0);
            let got = decompress_exact(decoder, frame, want, &mut self.out).map_err(corrupt)?;
            check_length(index, entry, got)?;
            check_chunk(index, entry, &self.out[..want], self.hash_len)?;
            return Ok(&self.out[..want]);
        }
        if index != self.next {
            return Err(corrupt(format!(
                "its context (the image before it) is unknown: chunk {} came last",
                self.next as i64 - 1
            )));
        }
        // The chunk is decoded right after its context; `filled` moves past it only once it
        // checks out, so a refused chunk is never anyone's context.
        let at = self.make_room(want + 1);
        let decoder = self.decoder.get_or_insert_with(DCtx::create);
        let (context, room) = self.recent.split_at_mut(at);
        let prefix = &context[at.saturating_sub(self.history)..];
        let got = decompress_prefixed(decoder, prefix, frame, want, &mut room[..want + 1])
            .map_err(corrupt)?;
        check_length(index, entry, got)?;
        let raw = &self.recent[at..at + want];
        check_chunk(index, entry, raw, self.hash_len)?;
        self.filled = at + want;
        self.next = index + 1;
        Ok(raw)
    }
}

fn check_length(index: usize, entry: &ChunkEntry, got: usize) -> Result<(), ChunkError> {
    if got != entry.raw_len as usize {
        return Err(ChunkError::Length {
            index,
            expected: entry.raw_len,
            actual: got,
        });
    }
    Ok(())
}

/// Decompress the single zstd `frame` into `out` (`want` + 1 bytes long); returns how many
/// bytes it held (`want` + 1 means "longer than `want`"). Anything after the frame is an
/// error. The frame's content checksum, when it has one, is checked (the C library's
/// default).
fn decompress_exact(
    decoder: &mut DCtx<'_>,
    frame: &[u8],
    want: usize,
    out: &mut [u8],
) -> Result<usize, String> {
    // The one-shot call decodes every frame it is given: refuse a second one before it.
    let frame_len = zstd::zstd_safe::find_frame_compressed_size(frame).map_err(zstd_error)?;
    if frame_len < frame.len() {
        return Err(format!(
            "{} bytes follow its zstd frame",
            frame.len() - frame_len
        ));
    }
    // One byte of room past the signed length tells "too long" from "exactly right"; the
    // decoder writes into this buffer directly (its window is the output), so nothing larger
    // than it is ever allocated.
    match decoder.decompress(&mut out[..want + 1], frame) {
        Ok(got) => Ok(got),
        Err(code) if error_code(code) == ZSTD_ErrorCode::ZSTD_error_dstSize_tooSmall => {
            Ok(want + 1)
        }
        Err(code) => Err(zstd_error(code)),
    }
}

/// [`decompress_exact`] with `prefix` as the frame's raw-content history (RFC 8878), on a
/// context kept between frames. The context holds a reference to the prefix only within this
/// call: it is reset (the reference dropped) before returning, whatever the outcome.
fn decompress_prefixed(
    decoder: &mut DCtx<'static>,
    prefix: &[u8],
    frame: &[u8],
    want: usize,
    out: &mut [u8],
) -> Result<usize, String> {
    // SAFETY: `ZSTD_DCtx_refPrefix` keeps a pointer to the prefix, not a copy. The context
    // reads it only in the `decompress` below and forgets it when `forget` resets it, before
    // this call returns or unwinds, while `prefix` is borrowed; should the reset fail, the
    // context is replaced instead (freeing a context does not read the prefix).
    let prefix: &'static [u8] =
        unsafe { std::slice::from_raw_parts(prefix.as_ptr(), prefix.len()) };
    let forget = ForgetPrefix(decoder);
    forget
        .0
        .ref_prefix(prefix)
        .map_err(zstd_error)
        .and_then(|_| decompress_exact(forget.0, frame, want, out))
}

/// Resets a context when dropped, so the prefix it references never outlives the call that
/// lent it, not even when a panic unwinds through it.
struct ForgetPrefix<'d>(&'d mut DCtx<'static>);

impl Drop for ForgetPrefix<'_> {
    fn drop(&mut self) {
        if self.0.reset(ResetDirective::SessionAndParameters).is_err() {
            *self.0 = DCtx::create();
        }
    }
}

/// The C library's code for a failed call's result.
pub fn error_code(code: usize) -> ZSTD_ErrorCode {
    // SAFETY: a pure function of the number.
    unsafe { zstd::zstd_safe::zstd_sys::ZSTD_getErrorCode(code) }
}

/// What a failed zstd call says, for messages.
pub fn zstd_error(code: usize) -> String {
    match error_code(code) {
        ZSTD_ErrorCode::ZSTD_error_checksum_wrong => {
            "frame checksum mismatch: the data is corrupt".into()
        }
        _ => zstd::zstd_safe::get_error_name(code).into(),
    }
}

/// The largest zstd window a chunk of `raw_len` bytes may ask for: the window a compressor
/// picks for it knowing its size (its length rounded up to a power of two), or the 8 MiB
/// every zstd decoder is expected to support (RFC 8878, 3.1.1.1.2), whichever is larger.
pub fn max_chunk_window(raw_len: u32) -> u64 {
    u64::from(raw_len).next_power_of_two().max(8 << 20)
}

/// The window size a zstd frame's header asks for (RFC 8878, 3.1.1.1).
pub fn frame_window_size(frame: &[u8]) -> Result<u64, &'static str> {
    if !frame.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        return Err("it is not a zstd frame (no zstd magic number)");
    }
    let truncated = "its zstd frame header is truncated";
    let descriptor = *frame.get(4).ok_or(truncated)?;
    let single_segment = descriptor & 0x20 != 0;
    if !single_segment {
        let window_descriptor = *frame.get(5).ok_or(truncated)?;
        let log = 10 + u32::from(window_descriptor >> 3);
        let base = 1u64 << log;
        return Ok(base + (base / 8) * u64::from(window_descriptor & 7));
    }
    // Single segment: the window is the frame content size.
    let dict_id_len = [0usize, 1, 2, 4][usize::from(descriptor & 3)];
    let start = 5 + dict_id_len;
    let size_len = [1usize, 2, 4, 8][usize::from(descriptor >> 6)];
    let field = frame.get(start..start + size_len).ok_or(truncated)?;
    let mut le = [0u8; 8];
    le[..size_len].copy_from_slice(field);
    let size = u64::from_le_bytes(le);
    Ok(if size_len == 2 { size + 256 } else { size })
}

/// The sha256 of `raw` as an index with `hash_len`-byte hashes holds it: its first
/// `hash_len` bytes, the rest zero.
pub fn chunk_key(raw: &[u8], hash_len: usize) -> [u8; 32] {
    key_from_digest(Sha256::digest(raw).into(), hash_len)
}

/// [`chunk_key`] of a chunk whose full sha256 is `digest` (hashed piece by piece elsewhere).
pub fn key_from_digest(mut digest: [u8; 32], hash_len: usize) -> [u8; 32] {
    digest[hash_len.min(32)..].fill(0);
    digest
}

/// Check raw chunk bytes (decompressed, or read from a seed) against the index entry (of an
/// index with `hash_len`-byte hashes).
pub fn check_chunk(
    index: usize,
    entry: &ChunkEntry,
    raw: &[u8],
    hash_len: usize,
) -> Result<(), ChunkError> {
    if raw.len() != entry.raw_len as usize {
        return Err(ChunkError::Length {
            index,
            expected: entry.raw_len,
            actual: raw.len(),
        });
    }
    let actual = chunk_key(raw, hash_len);
    if actual != entry.sha256 {
        let len = hash_len.min(32);
        return Err(ChunkError::Hash {
            index,
            expected: hex::encode(&entry.sha256[..len]),
            actual: hex::encode(&actual[..len]),
        });
    }
    Ok(())
}

/// A byte range of the image member to fetch with one request, covering chunks
/// `first..=last` (and, where gaps were merged, chunks that are not needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchRange {
    /// Offset from the start of the image member's data.
    pub start: u64,
    pub end: u64,
    pub first: usize,
    pub last: usize,
}

impl FetchRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Gaps between needed chunks up to this size are downloaded rather than skipped: a request
/// costs a round trip and some hundred bytes of headers, and hawkBit logs each one.
pub const NEAR_GAP: u64 = 4 << 10;

/// The ranges that fetch every chunk for which `needed` is true: adjacent chunks share a
/// range, gaps of at most `near_gap` bytes are merged, and then the smallest gaps are merged
/// until there are at most `max_requests` ranges.
pub fn plan_ranges(
    index: &ChunkIndex,
    needed: &[bool],
    near_gap: u64,
    max_requests: usize,
) -> Vec<FetchRange> {
    assert_eq!(needed.len(), index.chunks.len());
    let mut ranges: Vec<FetchRange> = Vec::new();
    for (i, c) in index.chunks.iter().enumerate() {
        if !needed[i] {
            continue;
        }
        match ranges.last_mut() {
            Some(r) if c.offset - r.end <= near_gap => {
                r.end = c.end();
                r.last = i;
            }
            _ => ranges.push(FetchRange {
                start: c.offset,
                end: c.end(),
                first: i,
                last: i,
            }),
        }
    }
    let max_requests = max_requests.max(1);
    if ranges.len() > max_requests {
        // Merge the smallest gaps: the (len - max) smallest gaps disappear.
        let mut gaps: Vec<(u64, usize)> = ranges
            .windows(2)
            .enumerate()
            .map(|(i, w)| (w[1].start - w[0].end, i))
            .collect();
        gaps.sort_unstable();
        let mut merge_after = vec![false; ranges.len()];
        for &(_, i) in gaps.iter().take(ranges.len() - max_requests) {
            merge_after[i] = true;
        }
        let mut merged: Vec<FetchRange> = Vec::with_capacity(max_requests);
        for (i, r) in ranges.iter().enumerate() {
            if i > 0 && merge_after[i - 1] {
                let last = merged.last_mut().expect("a range precedes");
                last.end = r.end;
                last.last = r.last;
            } else {
                merged.push(*r);
            }
        }
        ranges = merged;
    }
    ranges
}

/// Range requests a device makes at most for the chunk data of one update. hawkBit up to 0.7
/// logs every Range request as an action status, with a quota of 1000 per action; this keeps
/// an update, with the request for the bundle's metadata and some retries, under 100.
pub const MAX_RANGE_REQUESTS: usize = 90;

/// What a device that already has some chunks must download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeltaPlan {
    /// Per chunk of the index: true when it must be downloaded.
    pub needed: Vec<bool>,
    /// The requests that fetch them.
    pub ranges: Vec<FetchRange>,
}

impl DeltaPlan {
    /// Plan for a device that has the chunks for which `have` is true.
    pub fn new(index: &ChunkIndex, have: impl Fn(&ChunkEntry) -> bool) -> DeltaPlan {
        let needed: Vec<bool> = index.chunks.iter().map(|c| !have(c)).collect();
        let ranges = plan_ranges(index, &needed, NEAR_GAP, MAX_RANGE_REQUESTS);
        DeltaPlan { needed, ranges }
    }

    /// Bytes of chunk data the requests fetch (including merged gaps).
    pub fn download_bytes(&self) -> u64 {
        self.ranges.iter().map(FetchRange::len).sum()
    }

    /// Decompressed bytes of the chunks that are not downloaded.
    pub fn reused_bytes(&self, index: &ChunkIndex) -> u64 {
        index
            .chunks
            .iter()
            .zip(&self.needed)
            .filter(|(_, needed)| !**needed)
            .map(|(c, _)| u64::from(c.raw_len))
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::ChunkerParams;

    fn entry(offset: u64, stored: u32, raw: u32) -> ChunkEntry {
        ChunkEntry {
            offset,
            stored_len: stored,
            raw_len: raw,
            sha256: [0; 32],
        }
    }

    fn index_of(stored: &[u32]) -> ChunkIndex {
        let mut offset = 0;
        ChunkIndex {
            hash_len: 32,
            chunks: stored
                .iter()
                .map(|&s| {
                    let e = entry(offset, s, 100);
                    offset += u64::from(s);
                    e
                })
                .collect(),
        }
    }

    fn info(chunks: u64, image_size: u64) -> ChunkedInfo {
        ChunkedInfo {
            image_size,
            image_sha256: "0".repeat(64),
            chunker: ChunkerParams::with_average(1024),
            algorithm: crate::chunk::ALGORITHM.into(),
            index_name: "chunks.idx".into(),
            index_size: chunks * RECORD_LEN as u64,
            index_sha256: "0".repeat(64),
            chunks,
            history: None,
        }
    }

    #[test]
    fn an_index_round_trips_and_inconsistent_ones_are_refused() {
        let index = index_of(&[10, 20, 30]);
        let bytes = index.to_bytes();
        assert_eq!(
            ChunkIndex::parse(&bytes, &info(3, 300), 60, 2).unwrap(),
            index
        );
        let err = ChunkIndex::parse(&bytes, &info(3, 300), 61, 2).unwrap_err();
        assert!(err.to_string().contains("image member has 61"), "{err}");
        let err = ChunkIndex::parse(&bytes, &info(3, 301), 60, 2).unwrap_err();
        assert!(err.to_string().contains("image has 301"), "{err}");
        let err = ChunkIndex::parse(&bytes, &info(4, 300), 60, 2).unwrap_err();
        assert!(err.to_string().contains("3 records"), "{err}");
        let mut overlapping = index.clone();
        overlapping.chunks[1].offset = 5;
        let err = ChunkIndex::parse(&overlapping.to_bytes(), &info(3, 300), 60, 2).unwrap_err();
        assert!(err.to_string().contains("chunk 1 starts at 5"), "{err}");
        let err = ChunkIndex::parse(&bytes[..47], &info(3, 300), 60, 2).unwrap_err();
        assert!(err.to_string().contains("whole number"), "{err}");
    }

    /// A zstd frame of `blocks` RLE blocks of 128 KiB, with the window descriptor byte
    /// `window_descriptor` (not single-segment).
    fn rle_frame(window_descriptor: u8, blocks: usize) -> Vec<u8> {
        let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd, 0x00, window_descriptor];
        for i in 0..blocks {
            let last = u32::from(i + 1 == blocks);
            let header = (128u32 << 10) << 3 | 1 << 1 | last;
            frame.extend_from_slice(&header.to_le_bytes()[..3]);
            frame.push(0xAB);
        }
        frame
    }

    fn rle_entry(raw_len: u32, frame: &[u8]) -> ChunkEntry {
        let raw = vec![0xABu8; raw_len as usize];
        ChunkEntry {
            offset: 0,
            stored_len: frame.len() as u32,
            raw_len,
            sha256: Sha256::digest(&raw).into(),
        }
    }

    #[test]
    fn a_chunk_frame_asking_for_a_huge_window_is_refused_before_decoding() {
        // 64 MiB window (log 26) for a 1000-byte chunk: decoding would hold 64 MiB before it
        // could tell the output is too long.
        let frame = rle_frame((26 - 10) << 3, 600);
        let entry = rle_entry(1000, &frame);
        let err = ChunkDecoder::new().decode(0, &entry, &frame).unwrap_err();
        assert!(
            matches!(err, ChunkError::Corrupt { .. }) && err.to_string().contains("window"),
            "{err}"
        );
        // The same bytes in a frame with a small window decode and verify.
        let frame = rle_frame(0, 1);
        let entry = rle_entry(128 << 10, &frame);
        let raw = ChunkDecoder::new()
            .decode(0, &entry, &frame)
            .unwrap()
            .to_vec();
        assert_eq!(raw, vec![0xAB; 128 << 10]);
        // A frame with a content checksum is still one frame (its last 4 bytes are its own),
        // and the checksum is checked: a wrong one is refused before the sha256.
        let mut cctx = zstd::zstd_safe::CCtx::create();
        cctx.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
            .unwrap();
        let mut checked = Vec::with_capacity(1024);
        cctx.compress2(&mut checked, &[0xAB; 128 << 10]).unwrap();
        assert_ne!(checked[4] & 0x04, 0);
        let entry = rle_entry(128 << 10, &checked);
        assert!(ChunkDecoder::new().decode(0, &entry, &checked).is_ok());
        let at = checked.len() - 1;
        checked[at] ^= 1;
        let err = ChunkDecoder::new().decode(0, &entry, &checked).unwrap_err();
        assert!(
            matches!(err, ChunkError::Corrupt { .. }) && err.to_string().contains("checksum"),
            "{err}"
        );
        // A second frame after the chunk's frame is refused, not decoded.
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        let entry = rle_entry(128 << 10, &two);
        let err = ChunkDecoder::new().decode(0, &entry, &two).unwrap_err();
        assert!(err.to_string().contains("follow its zstd frame"), "{err}");
        // A frame that is longer than signed is a length error.
        let long = rle_frame(7 << 3, 3);
        let entry = rle_entry(100 << 10, &long);
        let err = ChunkDecoder::new().decode(0, &entry, &long).unwrap_err();
        assert!(matches!(err, ChunkError::Length { .. }), "{err}");
    }

    /// Text-like bytes that repeat across chunks (so that the history matters).
    fn words(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        let mut out = Vec::with_capacity(len + 8);
        while out.len() < len {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            out.extend_from_slice(
                [&b"slot "[..], b"chunk ", b"delta ", b"zstd\n"][(state % 4) as usize],
            );
            out.extend_from_slice(format!("{} ", state % 1000).as_bytes());
        }
        out.truncate(len);
        out
    }

    /// Frames of `chunks` compressed as format 3 does (each with the `history` bytes before it).
    fn context_frames(chunks: &[&[u8]], history: usize) -> (ChunkIndex, Vec<Vec<u8>>) {
        let mut image = Vec::new();
        let mut index = ChunkIndex {
            chunks: Vec::new(),
            hash_len: COMPACT_HASH_LEN,
        };
        let mut frames = Vec::new();
        let mut offset = 0;
        for chunk in chunks {
            let mut cctx = zstd::zstd_safe::CCtx::create();
            let context = &image[image.len().saturating_sub(history)..];
            if !context.is_empty() {
                cctx.ref_prefix(context).unwrap();
            }
            let mut frame = Vec::with_capacity(chunk.len() + 1024);
            cctx.compress2(&mut frame, chunk).unwrap();
            drop(cctx);
            index.chunks.push(ChunkEntry {
                offset,
                stored_len: frame.len() as u32,
                raw_len: chunk.len() as u32,
                sha256: chunk_key(chunk, COMPACT_HASH_LEN),
            });
            offset += frame.len() as u64;
            frames.push(frame);
            image.extend_from_slice(chunk);
        }
        (index, frames)
    }

    #[test]
    fn context_frames_decode_in_order_with_the_image_before_them() {
        // Chunks that repeat an earlier one, as file systems repeat blocks.
        let image: Vec<u8> = (0..9)
            .flat_map(|i| words(7_000, 10 + 2 * (i % 2)))
            .collect();
        let chunks: Vec<&[u8]> = image.chunks(7_000).collect();
        let (index, frames) = context_frames(&chunks, 16_384);
        // The context pays: a chunk like one in the history costs next to nothing.
        let alone = zstd::bulk::compress(chunks[5], 3).unwrap();
        assert!(
            frames[5].len() < alone.len() / 10,
            "{} vs {}",
            frames[5].len(),
            alone.len()
        );

        let mut decoder = ChunkDecoder::for_index(&index, 16_384);
        let mut rebuilt = Vec::new();
        for (i, (entry, frame)) in index.chunks.iter().zip(&frames).enumerate() {
            if i == 3 {
                // A chunk taken from elsewhere (a seed) is remembered, not decoded.
                decoder.remember(i, chunks[i]);
                rebuilt.extend_from_slice(chunks[i]);
                continue;
            }
            rebuilt.extend_from_slice(decoder.decode(i, entry, frame).unwrap());
        }
        assert_eq!(rebuilt, image);

        // Out of order: the decoder does not know the context and says so.
        let mut decoder = ChunkDecoder::for_index(&index, 16_384);
        let err = decoder.decode(4, &index.chunks[4], &frames[4]).unwrap_err();
        assert!(err.to_string().contains("context"), "{err}");
        // With the image before it given (a resume), the same frame decodes.
        decoder.set_context(4, &image[..4 * 7_000]);
        assert_eq!(
            decoder.decode(4, &index.chunks[4], &frames[4]).unwrap(),
            chunks[4]
        );
        // With the wrong context it does not give the signed bytes.
        decoder.set_context(6, &words(6 * 7_000, 2));
        assert!(decoder.decode(6, &index.chunks[6], &frames[6]).is_err());
    }

    #[test]
    fn one_decoder_keeps_the_context_over_many_chunks_and_refusals() {
        // Chunks shorter and longer than the history, so that the context buffer is compacted
        // often, in both of its ways (a chunk longer than the history replaces it all).
        let sizes = [
            3_000, 9_000, 500, 20_000, 4_096, 7_000, 13_000, 1, 8_192, 6_000,
        ];
        let mut image = Vec::new();
        for (i, len) in sizes.iter().cycle().take(40).enumerate() {
            image.extend_from_slice(&words(*len, 20 + (i % 3) as u64));
        }
        let mut chunks: Vec<&[u8]> = Vec::new();
        let mut at = 0;
        for len in sizes.iter().cycle().take(40) {
            chunks.push(&image[at..at + len]);
            at += len;
        }
        for history in [4_096, 16_384] {
            let (index, frames) = context_frames(&chunks, history);
            let mut decoder = ChunkDecoder::for_index(&index, history as u32);
            let mut rebuilt = Vec::new();
            for (i, (entry, frame)) in index.chunks.iter().zip(&frames).enumerate() {
                if i % 7 == 3 {
                    decoder.remember(i, chunks[i]);
                    rebuilt.extend_from_slice(chunks[i]);
                    continue;
                }
                if i % 5 == 2 {
                    // A frame that is not this chunk's (the next one's) is refused, and
                    // leaves nothing behind: the right frame still decodes after it.
                    let other = &frames[(i + 1) % frames.len()];
                    assert!(decoder.decode(i, entry, other).is_err(), "chunk {i}");
                }
                let raw = decoder.decode(i, entry, frame).unwrap();
                assert_eq!(raw, chunks[i], "chunk {i}, history {history}");
                rebuilt.extend_from_slice(raw);
            }
            assert_eq!(rebuilt, image);
            // Never more than twice the history (or a chunk) and a chunk.
            assert!(
                decoder.recent.len() <= 2 * history.max(20_001) + 1,
                "{}",
                decoder.recent.len()
            );
        }
    }

    fn compact_info(chunks: u64, image_size: u64, index_size: u64) -> ChunkedInfo {
        ChunkedInfo {
            index_size,
            history: Some(4096),
            ..info(chunks, image_size)
        }
    }

    #[test]
    fn a_compact_index_round_trips_and_bad_ones_are_refused() {
        let mut index = index_of(&[10, 20, 30]);
        index.hash_len = COMPACT_HASH_LEN;
        for (i, c) in index.chunks.iter_mut().enumerate() {
            c.sha256 = chunk_key(&[i as u8], COMPACT_HASH_LEN);
        }
        let stored = zstd::bulk::compress(&index.to_compact_bytes(), 19).unwrap();
        let info = compact_info(3, 300, stored.len() as u64);
        assert_eq!(ChunkIndex::parse(&stored, &info, 60, 3).unwrap(), index);
        // Fewer records than the manifest says, or more: refused, and never decoded past
        // the size the record count gives.
        let err = ChunkIndex::parse(&stored, &compact_info(4, 300, 1), 60, 3).unwrap_err();
        assert!(
            err.to_string().contains("decompresses to 72 bytes"),
            "{err}"
        );
        let err = ChunkIndex::parse(&stored, &compact_info(2, 300, 1), 60, 3).unwrap_err();
        assert!(err.to_string().contains("chunk index"), "{err}");
        // Not zstd, or a frame asking for a huge window: refused before decoding.
        let err = ChunkIndex::parse(&[1, 2, 3, 4, 5, 6], &info, 60, 3).unwrap_err();
        assert!(err.to_string().contains("chunk index"), "{err}");
        let huge = rle_frame((30 - 10) << 3, 2);
        let err = ChunkIndex::parse(&huge, &info, 60, 3).unwrap_err();
        assert!(err.to_string().contains("window"), "{err}");
        // A frame that decompresses to much more than the records: refused at the limit.
        let bomb = zstd::bulk::compress(&vec![0u8; 10 << 20], 19).unwrap();
        let err = ChunkIndex::parse(&bomb, &info, 60, 3).unwrap_err();
        assert!(err.to_string().contains("records need 72"), "{err}");
    }

    #[test]
    fn ranges_join_neighbours_and_near_gaps_only() {
        let index = index_of(&[100; 10]);
        let needed = [
            true, true, false, true, false, false, false, false, true, true,
        ];
        let ranges = plan_ranges(&index, &needed, 100, 100);
        let spans: Vec<(u64, u64, usize, usize)> = ranges
            .iter()
            .map(|r| (r.start, r.end, r.first, r.last))
            .collect();
        assert_eq!(spans, vec![(0, 400, 0, 3), (800, 1000, 8, 9)]);
        assert!(plan_ranges(&index, &[false; 10], 100, 100).is_empty());
    }

    #[test]
    fn the_request_bound_merges_the_smallest_gaps_first() {
        let stored: Vec<u32> = (0..1000).map(|i| 100 + (i % 7) * 10).collect();
        let index = index_of(&stored);
        // Every third chunk is needed: 334 ranges before the bound.
        let needed: Vec<bool> = (0..1000).map(|i| i % 3 == 0).collect();
        let unbounded = plan_ranges(&index, &needed, 0, usize::MAX);
        assert_eq!(unbounded.len(), 334);
        let bounded = plan_ranges(&index, &needed, 0, 90);
        assert_eq!(bounded.len(), 90);
        // Every needed chunk is covered, in order, without overlaps.
        for (i, c) in index.chunks.iter().enumerate() {
            if needed[i] {
                assert!(bounded
                    .iter()
                    .any(|r| r.start <= c.offset && c.end() <= r.end));
            }
        }
        assert!(bounded.windows(2).all(|w| w[0].end < w[1].start));
        // Merging the smallest gaps costs less than any other choice would: at most the
        // 244 smallest gaps were added.
        let extra: u64 = bounded.iter().map(FetchRange::len).sum::<u64>()
            - unbounded.iter().map(FetchRange::len).sum::<u64>();
        let mut gaps: Vec<u64> = unbounded
            .windows(2)
            .map(|w| w[1].start - w[0].end)
            .collect();
        gaps.sort_unstable();
        assert_eq!(extra, gaps[..334 - 90].iter().sum::<u64>());
    }
}
