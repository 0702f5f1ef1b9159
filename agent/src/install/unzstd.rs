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
//! A resumed frame is checked end to end as a fresh one is: its content checksum (XXH64) is
//! computed over the slot's part of the frame and the decoder's output, and compared with the
//! frame's; frames without a checksum get no resume points. A state that is wrong (tampered
//! with, or a bug of this module) therefore fails the frame instead of writing a wrong image.

use std::io::{self, Read};

use super::sha256_state::Sha256State;

/// The largest window a resume point is made for: the resume reads it from the slot and the
/// decoder holds it twice (dictionary and window) for the rest of the frame.
pub const MAX_RESUME_WINDOW: u64 = 8 << 20;

/// What a fresh decoder needs at a boundary besides the window bytes (opaque; saved as text
/// in the resume record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZstdState {
    _todo: (),
}

impl ZstdState {
    /// A compact text form for the resume record.
    pub fn to_text(&self) -> String {
        todo!()
    }

    /// Parses [`Self::to_text`]; None for anything else.
    pub fn from_text(_text: &str) -> Option<Self> {
        todo!()
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

/// Where a resumed decoder continues (from a resume record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeAt {
    pub artifact_offset: u64,
    pub out: u64,
    pub state: ZstdState,
}

/// What a resume needs of the slot's bytes before the resume point: fed all of them, in
/// order, it keeps the window and the checksum state of the frame the point is in.
pub struct ResumePrefix {
    _todo: (),
}

impl ResumePrefix {
    pub fn new(_at: &ResumeAt) -> Self {
        todo!()
    }

    /// The next bytes of the slot's prefix (from offset 0, in order, up to `at.out`).
    pub fn update(&mut self, _bytes: &[u8]) {
        todo!()
    }

    /// The prefix's last bytes that the decoder needs (at most [`MAX_RESUME_WINDOW`]; at least
    /// the last 4 KiB when the prefix is that long, for the slot writer).
    pub fn window(&self) -> &[u8] {
        todo!()
    }
}

/// Decodes a zstd stream read from `inner` (the artifact from offset 0, or from a resume
/// point), hashing the artifact bytes it consumes when given a hash state.
pub struct ZstdDecoder<R> {
    _inner: R,
}

impl<R: Read> ZstdDecoder<R> {
    pub fn new(_inner: R, _hash: Option<Sha256State>) -> Self {
        todo!()
    }

    /// A decoder continuing at `at`: `inner` yields the artifact from `at.artifact_offset`,
    /// `hash` covers the bytes before it, `prefix` was fed the slot's first `at.out` bytes.
    pub fn resume(
        _inner: R,
        _at: &ResumeAt,
        _hash: Option<Sha256State>,
        _prefix: ResumePrefix,
    ) -> io::Result<Self> {
        todo!()
    }

    /// Output bytes so far (including a resumed prefix).
    pub fn output_offset(&self) -> u64 {
        todo!()
    }

    /// Look for boundaries only from output offset `out` on (never by default: following the
    /// sequences of a block costs CPU, so a caller asks for the next point when it wants one).
    pub fn boundaries_from(&mut self, _out: u64) {
        todo!()
    }

    /// The boundary the last `read` stopped at (its output ends there), if any.
    pub fn take_boundary(&mut self) -> Option<Boundary> {
        todo!()
    }

    /// The artifact hash after the whole input (call after `read` returned 0).
    pub fn finish_hash(self) -> Option<Sha256State> {
        todo!()
    }
}

impl<R: Read> Read for ZstdDecoder<R> {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        todo!()
    }
}
