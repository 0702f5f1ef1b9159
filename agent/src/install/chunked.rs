//! Chunked (format 2 and 3) bundles in the streaming install: the image member is read one zstd frame
//! at a time, and every chunk is decompressed and checked against its signed length and sha256
//! **before** it is written, so not even one unverified chunk reaches the slot. The slot is then
//! read back as for every other format, and the sha256 of what was read back is compared with
//! the signed whole-image hash directly ([`leave_hash_to_read_back`]).

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
        // Copied into the writer's buffer: a format-3 chunk must stay in the decoder's
        // history buffer (the next frame's context) anyway, and the copy costs about 1.5 % of
        // decoding and checking the chunk (measured by leaving it out), not worth decoding
        // into `SlotWriter::spare` for.
        writer.write(raw)?;
        // No resume records for a streamed chunked bundle.
        writer.drop_checkpoints();
        written += raw.len() as u64;
    }
    Ok(written)
}

/// A chunked image is written as verified chunks only: each is checked against its signed
/// sha256 (format 3: its first 128 bits) before it is written, and the signed index fixes their
/// order and lengths (they sum to the signed image size). So the slot writer's own sha256 of
/// the bytes it is handed (a third pass over every byte, ~0.15 s of CPU per 256 MiB with
/// SHA-NI) would only repeat that; instead the sha256 of the slot as read back from the device
/// is compared with the signed whole-image hash itself (`pipeline::finish` with the signed hash
/// as the image's), which checks at once the device and that the chunks make the signed image.
/// A resume starts the read-back hash with the prefix read from the slot (checked chunk by
/// chunk against the index as well), so it still covers the whole image as it is on the
/// device.
///
/// What is lost: telling "the device returned other bytes" from "the signed chunks do not make
/// the signed image" (only a signer's bug can make them disagree: both are under the same
/// signature, and a chunk that is not the signed one is refused before it is written). Both
/// end the install with [`InstallError::ReadBackMismatch`] before the slot is activated, the
/// latter instead of a [`InstallError::Signature`]; either is a permanent failure.
///
/// A sink that keeps no data (the dry run) reads nothing back: there the writer keeps its hash,
/// so a dry run still checks the chunks against the signed image hash and reports the sha256
/// the slot would hold, as before.
pub fn leave_hash_to_read_back(writer: &mut SlotWriter<'_>) {
    if writer.keeps_data() {
        writer.leave_hash_to_caller();
    }
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
