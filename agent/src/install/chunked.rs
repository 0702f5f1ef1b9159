//! Chunked (format 2 and 3) bundles in the streaming install: the image member is read one zstd frame
//! at a time, and every chunk is decompressed and checked against its signed length and sha256
//! **before** it is written, so not even one unverified chunk reaches the slot. The caller then
//! checks the whole image's sha256 (the slot writer's hash) against the signed one and reads the
//! slot back as for every other format.

use std::io::{self, Read};

use ddi_bundle::{ChunkDecoder, ChunkIndex};

use super::decode::{self, Format};
use super::slot::SlotWriter;
use super::InstallError;

/// Write the chunks of `index` from `member` (the bundle reader positioned at the image
/// member's first byte) in order; `history` is the signed context of format-3 frames (0 for
/// format 2). Returns the decompressed bytes written.
pub fn write_chunks<R: Read>(
    member: &mut R,
    index: &ChunkIndex,
    history: u32,
    writer: &mut SlotWriter<'_>,
    offset: &dyn Fn() -> u64,
) -> Result<u64, InstallError> {
    let mut decoder = ChunkDecoder::for_index(index, history);
    let mut frame = Vec::new();
    let mut written = 0u64;
    for (i, entry) in index.chunks.iter().enumerate() {
        frame.resize(entry.stored_len as usize, 0);
        read_frame(member, &mut frame)
            .map_err(|e| decode::read_error(e, Format::ZstdChunks, offset()))?;
        let raw = decoder.decode(i, entry, &frame).map_err(chunk_refused)?;
        writer.write(raw)?;
        written += raw.len() as u64;
    }
    Ok(written)
}

/// A chunk whose bytes are not the signed ones: the bundle was tampered with.
pub fn chunk_refused(err: ddi_bundle::ChunkError) -> InstallError {
    InstallError::Signature(format!("bundle chunk refused: {err}"))
}

/// Read one stored frame (its length is the index entry's).
pub fn read_frame<R: Read>(member: &mut R, frame: &mut [u8]) -> io::Result<()> {
    member.read_exact(frame).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the image member ends inside a chunk",
            )
        } else {
            e
        }
    })
}

/// The signed whole-image sha256 against what the slot writer hashed.
pub fn check_image_hash(expected: &str, actual: &str) -> Result<(), InstallError> {
    if expected.eq_ignore_ascii_case(actual) {
        return Ok(());
    }
    Err(InstallError::Signature(format!(
        "the chunked image has sha256 {actual}, the signed manifest says {expected}"
    )))
}
