//! The resume record: how far a download got, kept in `resume_path` so a restart or power cut
//! does not start over.
//!
//! What is resumable across a restart:
//!
//! **Raw images** (format `raw`): artifact byte N is slot byte N, so the record holds one
//! offset (always a durable checkpoint: the slot was fdatasync'ed up to it before the record
//! was written). A hasher cannot be serialised, so on
//! resume the slot's first N bytes are read and hashed again, and the download continues
//! with a Range request from N; the final hash check then covers the bytes already on the
//! slot too, so a corrupted prefix fails the install instead of being activated.
//!
//! **Delta installs of chunked bundles** (format `chunks`): the record names the signed image
//! (its sha256) and how far the slot holds it durably; a restart scans the seed again, re-hashes
//! the slot's prefix, and fetches or reuses only the chunks from the one that straddles that
//! offset on. The prefix is checked against the signed chunks as it is re-read (and the
//! straddling chunk's part once its signed bytes are known): a slot written behind the
//! agent's back makes that install start over from byte 0, once
//! ([`super::InstallError::ResumedPrefixMismatch`]).
//!
//! **Plain gzip images** (format `gzip`; one gzip stream holding the image, artifact hash
//! sha256): at a deflate block boundary the decoder's whole state is the last 32 KiB of output
//! (on the slot) and a few input bits ([`super::gunzip`]). The record names the boundary (the
//! artifact byte holding it and its unused bits, the slot offset, the CRC-32 so far), the
//! artifact's sha256 state at that byte ([`Sha256State`]: those bytes are not on the slot to
//! hash again) and the sha256 of the slot's bytes before the boundary as written. A boundary
//! is recorded only once the slot writer reported a durable checkpoint at or after it, so the
//! record never names bytes a power cut could lose. A restart reads the slot's prefix back: a
//! different sha256 drops the record and starts over from byte 0; else its last 32 KiB become
//! the deflate dictionary, the unused bits are primed, and the download continues with a Range
//! request from the boundary's byte. The final checks (artifact sha256, CRC-32 and ISIZE,
//! whole-image read-back) are unchanged, so a record tampered with either does not fit or fails
//! a check; it cannot make a wrong image pass. A resumed install that fails a check (decode,
//! hash, size) starts over from byte 0, once: a clean download may well succeed.
//!
//! **Plain zstd images** (format `zstd`; a zstd stream holding the image, artifact hash
//! sha256): between two blocks the decoder's state is the frame's window (the output before
//! the boundary, on the slot) plus its entropy tables and repeat offsets ([`super::unzstd`]).
//! The record holds what a `gzip` record holds (the artifact offset where the next block
//! starts, the slot offset, the artifact's sha256 state there, the slot prefix's sha256) and,
//! instead of the unused bits and the CRC-32, `zstd_state`: the tables and offsets as text.
//! Boundaries inside a frame are made only in frames with a content checksum whose window is
//! at most [`unzstd::MAX_RESUME_WINDOW`] (8 MiB), boundaries between two frames after any
//! frame; they are recorded only once the slot is durable up to them, as for gzip. A restart reads the slot's prefix back (a different sha256 starts over,
//! as for gzip); the frame's window, its last bytes, becomes the decoder's dictionary, and the
//! download continues with a Range request from the boundary's byte. The frame's content
//! checksum is checked over the slot's part of the frame and the rest as it is decoded, so a
//! `zstd_state` that is wrong fails that frame; the resumed install then starts over from byte
//! 0, once, as after a gzip resume. A boundary between two frames is bound to the output before
//! it only by the record's sha256 of the slot's prefix (no checksum covers a whole stream), so
//! a record is refused before the prefix is read when the decoder could not have made its
//! point (`ResumeAt::plausible`: not after a first frame, or a frame's state that does not fit
//! its offsets); a record forged with the artifact at hand could still move such a point to
//! another frame's start. For the rest of that frame a resumed install holds the
//! window once more than a fresh one (the decoder's dictionary made of it): up to 8 MiB; while
//! it starts, twice (the window read from the slot, and the dictionary).
//!
//! **Plain xz images** (format `xz`; an xz file of one or more streams holding the image,
//! artifact hash sha256): xz blocks are compressed independently, so between two blocks the
//! decoder needs nothing of the output before ([`super::unxz`]). The record holds what a
//! `gzip` record holds (the artifact offset of the next block header, the slot offset, the
//! artifact's sha256 state there, the slot prefix's sha256) and, instead of the unused bits
//! and the CRC-32, `xz_state`: where the block's stream starts in the artifact and in the
//! image, its check type and its number of blocks before the point. Files with several
//! blocks have such points (`xz --threads`, which Yocto runs, `--block-size`, pixz). Inside a
//! block a point is an LZMA2 chunk boundary, made only in blocks of LZMA2 alone with a check
//! (what `xz` writes by default, `-0` to `-9`: every dictionary the device decodes,
//! [`unxz::MAX_RESUME_DICTIONARY`]), one block per stream single-threaded, blocks of three
//! times the dictionary with `--threads` (Yocto's image conversion). `xz_state` then also holds the block's
//! start (artifact and image offsets), its header, the check's state (a CRC, a sha256 state)
//! and the LZMA2 decoder's (the LZMA probabilities, state and repeated distances, the bytes
//! since the dictionary's reset), after the four fields an agent that knows only block
//! boundaries reads: it refuses the longer text and starts over rather than take the point
//! for a block header. A restart reads the slot's prefix back (a different sha256 starts over,
//! as for gzip); inside a block its last bytes (and the tar's head's, for a tar inside) are
//! written straight into the LZMA2 dictionary as they are read ([`unxz::ResumeWindow`]), so a
//! resumed install holds no more memory than a fresh one; it downloads from the point's byte. The block's check is checked over the whole block at its end, the slot's part
//! included through the record's check state, so a state that is wrong fails there (or before:
//! a distance beyond the dictionary, a chunk that does not end where it says) and the install
//! starts over from byte 0, once. The stream's index is checked against the point at the
//! stream's end: the records of the blocks before it (before its block, inside one) must add up
//! to its artifact and image offsets, so a record whose point is not where the decoder made it
//! fails (and starts over from byte 0, once) instead of writing a wrong image. The image offset
//! is bound that way only relative to where the stream's content starts: 0 for the artifact's
//! first stream (`ResumeAt::plausible` refuses a record saying otherwise, and a state inside a
//! block that does not fit its offsets, header, check type or LZMA limits), for a later stream
//! only the slot prefix's sha256, so a record forged with the slot at hand could move a point
//! of a later stream in the image together with its stream (as a zstd point between frames).
//!
//! **A raw image member of a plain tar or a signed bundle** (format `member`; a format-1
//! bundle whose image is neither compressed nor a tar; any artifact hash): "replay", no reader
//! state to save. The artifact's bytes before slot offset N are its head `[0, D)` (D =
//! `member_offset`, where the image member's data starts: tar headers, other members, the
//! bundle's manifest and signature; at most [`MAX_MEMBER_OFFSET`]) followed by the slot's bytes
//! `[0, N)`. A restart fetches the head again with one Range request and feeds
//! `head ++ slot[0, N) ++ download from D + N` through the unchanged reading path (artifact
//! hash, bundle reader with its signature and signed image hash, tar rules); the image bytes
//! before N must be found at D and be the slot's (their sha256 is compared with the slot's as
//! read) and are not written again; the slot writer starts at N. Every final check therefore
//! covers the replayed bytes: a slot prefix changed behind the agent's back fails the artifact
//! hash or the signed hash, a record that does not fit fails before (image member elsewhere,
//! shorter than N), and the install starts over from byte 0, once, as after a gzip resume. So
//! does a server that answers the head's Range with the whole artifact. `member_of` says
//! whether the record was made through a bundle reader ("bundle", used only under a signature
//! policy) or for a plain tar ("tar"); the replay must take the same path.
//!
//! **A tar inside gzip, zstd or xz** (formats `tar-gzip`, `tar-zstd`, `tar-xz`; artifact hash
//! sha256): the decoder's points as above, kept only where they fall in the image member's data,
//! the record also holding `tar_head`: the tar's decompressed bytes before that data (headers, and
//! any members before the image; at most [`MAX_TAR_HEAD`]). The decoder's output before the point
//! is that head followed by the slot's first `slot_offset` bytes: that is what a restart feeds the
//! decoder's prefix checks (gzip's CRC-32 and window, zstd's window and checksum) while it hashes
//! only the slot's bytes. The tar rules then read the head, as many zeros as the slot holds
//! (standing in for the image bytes there, dropped, not written) and the decoder's output from the
//! point: the image member must start where the head ends and reach the point, which may be at its
//! end (else [`super::InstallError::ReplayMismatch`]), and the archive after it is checked as in a
//! fresh install; a failure starts over from byte 0, once. The record also holds the head's sha256
//! (`tar_head_sha256`), checked before the slot is read: a record damaged in its head is not used.
//! That is all that checks a PAX or GNU long-name member's data in the head, or a head in an
//! earlier xz block or zstd frame than the point: the head is bound to the artifact only by what
//! checks the decoder's output (gzip's CRC-32 of the first member, a zstd frame's content checksum
//! when the head is in the point's frame, xz's index its length) and by the tar header checksums,
//! so a head forged with the artifact at hand could end the image member early, as a forged point
//! between zstd frames or in a later xz stream could move it.
//!
//! **A gzip, zstd or xz image (or a tar inside one) in a signed bundle's image member** (format
//! 1; formats `bundle-` and one of the above, e.g. `bundle-gzip`, `bundle-tar-zstd`; artifact
//! hash sha256; used only under a signature policy): the decoder reads the member's bytes, so its
//! points and its sha256 state count those; the record holds them as for the plain formats (the
//! member's state in `member_sha256_state`), with `member_offset` where the member's data starts
//! (the bundle's manifest, signature and tar headers before it, at most [`MAX_MEMBER_OFFSET`]),
//! `artifact_offset` that plus the point's member offset, and in `artifact_sha256_state` the
//! artifact's own sha256 state as far as it had read when the record was made (at or after the
//! point: the artifact is hashed as it arrives, ahead of the decoder; no second pass). A restart
//! fetches the bundle's head (`[0, member_offset)`) again with one Range request, checks its
//! signature through the bundle reader again (the member must start where the record says),
//! reads the slot's prefix back as for the plain formats and downloads from `artifact_offset`;
//! the bundle reader still checks the member's size and the archive's end, the member's signed
//! sha256 is checked on the record's member state continued over the rest, and the artifact's
//! hash on the record's artifact state continued over the download after the bytes it already
//! covers. So a download host that serves another bundle signed by a trusted key (an older
//! release, say) fails the artifact's hash after a resume as it would without one. A resumed
//! install that fails a check (a head that does not verify, a member elsewhere, decode, either
//! hash) starts over from byte 0, once. The hashes bind the member's compressed bytes, not the
//! decoded image, so what the plain formats admit above stays true here: a record forged with
//! the artifact and the slot at hand (a point between zstd frames moved to a later frame's
//! start with the genuine hash states there, a point in a later xz stream, a tar head) can make
//! the resumed install write an image spliced from signed pieces. Records live in `state_dir`
//! (mode 0700, root's): whoever can write there can write the slots and the environment too.
//!
//! Everything else restarts from the beginning after a restart: an xz block without a check
//! or with filters before LZMA2 (an interrupted install continues at the block's start: an xz
//! file of one such block starts over); a zstd frame without a content checksum or
//! with a window above 8 MiB (no resume points are made in it); a gzip, zstd or xz image with a
//! sha1 or md5 artifact hash because only a sha256 state is saved. (Within one run they resume
//! after network faults like raw images: the decoder just waits for the next bytes.)
//!
//! Agents from before a format was added match records by `format` and start over on one
//! they do not know (and remove it), so `version` stays 1.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::gunzip::ResumeAt;
use super::sha256_state::Sha256State;
use super::unxz;
use super::unzstd::{self, ZstdState};
use super::InstallError;

const VERSION: u32 = 1;

/// What was durably written for which artifact. Fields are added, never changed: a new field is
/// optional, and a reader ignores fields it does not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRecord {
    pub version: u32,
    pub url: String,
    pub slot: PathBuf,
    pub algorithm: String,
    pub expected_hash: String,
    pub size: Option<u64>,
    /// "raw" (artifact byte N is slot byte N), "chunks" (a delta install of a chunked
    /// bundle), "gzip" (a plain gzip image), "zstd" (a plain zstd image), "xz" (a plain xz
    /// image), "tar-gzip", "tar-zstd", "tar-xz" (the image member of a tar inside one of them)
    /// or "member" (a raw image member of a plain tar or signed bundle, resumed by replay; see
    /// the module doc); "bundle-" and a `gzip`, `zstd`, `xz` or `tar-` format: the same in a
    /// signed bundle's (format 1) image member.
    pub format: String,
    /// Bytes of the artifact (as served) covered by the record: a resume downloads from here.
    pub artifact_offset: u64,
    /// Bytes of the slot durably written; equal to `artifact_offset` for raw images.
    pub slot_offset: u64,
    /// "chunks": the signed sha256 of the whole image being written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
    /// "gzip": bits of the artifact byte at `artifact_offset` the deflate decoder had not
    /// used yet (0..=7, its high bits); the resume point is a deflate block boundary there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bits: Option<u8>,
    /// "gzip": CRC-32 of the image bytes before `slot_offset` (all in the first gzip member).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crc32: Option<u32>,
    /// "gzip", "zstd", "xz": the artifact's sha256 state after its first `artifact_offset`
    /// bytes (see [`Sha256State::to_text`]); those bytes are not on the slot, so cannot be
    /// hashed again. "bundle-": the artifact's state after its first N bytes, N (in the state)
    /// at least `artifact_offset` and at most its size (the hash reads ahead of the decoder: a
    /// resume hashes the download from byte N on).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_sha256_state: Option<String>,
    /// "gzip", "zstd", "xz": sha256 of the slot's bytes before `slot_offset` as written: a
    /// resume reads them back and starts over when they differ.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub slot_sha256: Option<String>,
    /// "bundle-": the sha256 state of the image member's first `artifact_offset -
    /// member_offset` bytes (the signed image hash continues from it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_sha256_state: Option<String>,
    /// "member", "bundle-": offset of the image member's data in the artifact (everything
    /// before it is fetched again on resume); "member": `artifact_offset` is `member_offset +
    /// slot_offset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_offset: Option<u64>,
    /// "member": what holds the image, "tar" (a plain tar) or "bundle" (a signed bundle's
    /// image member); "bundle-": "bundle".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_of: Option<String>,
    /// "zstd": what the decoder needs at the resume point besides the window on the slot
    /// (the tables and repeat offsets of the frame so far, see [`ZstdState::to_text`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zstd_state: Option<String>,
    /// "xz": the stream the resume point's block is in (where it starts in the artifact and
    /// the image, its check type, its blocks before the point; see [`XzState::to_text`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xz_state: Option<String>,
    /// "tar-gzip", "tar-zstd", "tar-xz": the decompressed tar's bytes before the image member's
    /// data (its headers, and any members before it), hex; the decoder's output offset at the
    /// resume point is their length plus `slot_offset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar_head: Option<String>,
    /// "tar-gzip", "tar-zstd", "tar-xz": the sha256 (hex) of `tar_head`'s bytes. Nothing else
    /// checks all of the head (no tar header checksum covers a PAX or GNU long-name member's
    /// data, no decoder check a head in an earlier xz block or zstd frame), so a record damaged
    /// there would otherwise move the image member's end.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tar_head_sha256: Option<String>,
}

/// Largest head (artifact bytes before the image member's data) a `member` record is made
/// for and used with: a bundle's is a few KiB, a tar's one header per member before the image.
pub const MAX_MEMBER_OFFSET: u64 = 1 << 20;

/// The sha256 of `bytes`, hex.
fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Largest tar head (decompressed bytes before the image member's data) a `tar-gzip`,
/// `tar-zstd` or `tar-xz` record holds: one header per member before the image, and their
/// data.
pub const MAX_TAR_HEAD: usize = 64 << 10;

/// Where a raw image member of a tar or a signed bundle continues: the artifact's bytes before
/// `slot_offset` are its first `member_offset` bytes followed by the slot's first
/// `slot_offset` bytes, durable on the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberPoint {
    pub member_offset: u64,
    pub slot_offset: u64,
    /// The image member of a signed bundle (read through the bundle reader), not of a plain
    /// tar.
    pub in_bundle: bool,
}

impl MemberPoint {
    /// Where the download continues.
    pub fn artifact_offset(&self) -> u64 {
        self.member_offset + self.slot_offset
    }

    fn member_of(&self) -> &'static str {
        if self.in_bundle {
            "bundle"
        } else {
            "tar"
        }
    }
}

/// Where a gzip image continues: a deflate block boundary of its first member, durable on the
/// slot up to `at.out`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GzipPoint {
    pub at: ResumeAt,
    pub artifact_hash: Sha256State,
    /// sha256 (hex) of the slot's bytes before the point.
    pub slot_sha256: String,
    /// A tar inside the compression: its bytes before the image member's data (`at.out` is
    /// then their length plus the slot's bytes; see [`DecoderPoint::slot_offset`]).
    pub tar_head: Option<Vec<u8>>,
    /// The image member of a signed bundle (format 1): where its data starts in the artifact.
    /// `at.artifact_offset` and `artifact_hash` then count the member's bytes, not the
    /// artifact's (see [`DecoderPoint::download_from`]).
    pub member_offset: Option<u64>,
    /// In a signed bundle: the artifact's own sha256 state after its first bytes up to some
    /// offset at or after the point (the artifact hash reads ahead of the decoder); a resume
    /// continues it from there, so the artifact's hash is checked too.
    pub artifact_hash_ahead: Option<Sha256State>,
}

/// Where an xz image continues: a block boundary, durable on the slot up to `at.out`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XzPoint {
    pub at: unxz::ResumeAt,
    pub artifact_hash: Sha256State,
    /// sha256 (hex) of the slot's bytes before the point.
    pub slot_sha256: String,
    /// A tar inside the compression: its bytes before the image member's data (`at.out` is
    /// then their length plus the slot's bytes; see [`DecoderPoint::slot_offset`]).
    pub tar_head: Option<Vec<u8>>,
    /// The image member of a signed bundle (format 1): where its data starts in the artifact.
    /// `at.artifact_offset` and `artifact_hash` then count the member's bytes, not the
    /// artifact's (see [`DecoderPoint::download_from`]).
    pub member_offset: Option<u64>,
    /// In a signed bundle: the artifact's own sha256 state after its first bytes up to some
    /// offset at or after the point (the artifact hash reads ahead of the decoder); a resume
    /// continues it from there, so the artifact's hash is checked too.
    pub artifact_hash_ahead: Option<Sha256State>,
}

/// Where a zstd image continues: a block (or frame) boundary, durable on the slot up to
/// `at.out`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ZstdPoint {
    pub at: unzstd::ResumeAt,
    pub artifact_hash: Sha256State,
    /// sha256 (hex) of the slot's bytes before the point.
    pub slot_sha256: String,
    /// A tar inside the compression: its bytes before the image member's data (`at.out` is
    /// then their length plus the slot's bytes; see [`DecoderPoint::slot_offset`]).
    pub tar_head: Option<Vec<u8>>,
    /// The image member of a signed bundle (format 1): where its data starts in the artifact.
    /// `at.artifact_offset` and `artifact_hash` then count the member's bytes, not the
    /// artifact's (see [`DecoderPoint::download_from`]).
    pub member_offset: Option<u64>,
    /// In a signed bundle: the artifact's own sha256 state after its first bytes up to some
    /// offset at or after the point (the artifact hash reads ahead of the decoder); a resume
    /// continues it from there, so the artifact's hash is checked too.
    pub artifact_hash_ahead: Option<Sha256State>,
}

/// What the gzip, zstd and xz resume points share.
pub trait DecoderPoint {
    /// The decoder's input bytes before the point: the artifact's, or in a signed bundle its
    /// image member's.
    fn artifact_offset(&self) -> u64;
    /// In a signed bundle: where its image member's data starts in the artifact.
    fn member_offset(&self) -> Option<u64>;
    /// In a signed bundle: the artifact's sha256 state at or after the point.
    fn artifact_hash_ahead(&self) -> Option<&Sha256State>;
    /// The artifact's byte the download continues at.
    fn download_from(&self) -> u64 {
        self.member_offset().unwrap_or(0) + self.artifact_offset()
    }
    /// The decoder's output offset at the point.
    fn out(&self) -> u64;
    /// The sha256 state of the decoder's input before `artifact_offset` (in a signed bundle,
    /// of its image member's bytes: the signed hash continues from it).
    fn artifact_hash(&self) -> &Sha256State;
    /// sha256 (hex) of the slot's bytes before the point.
    fn slot_sha256(&self) -> &str;
    /// The tar's bytes before the image member's data, when a tar is inside the compression.
    fn tar_head(&self) -> Option<&[u8]>;
    /// The slot's bytes before the point: the output before it, less a tar's head.
    fn slot_offset(&self) -> u64 {
        self.out() - self.tar_head().map_or(0, |h| h.len() as u64)
    }
}

macro_rules! decoder_point {
    ($($point:ident),*) => {$(
        impl DecoderPoint for $point {
            fn artifact_offset(&self) -> u64 {
                self.at.artifact_offset
            }
            fn member_offset(&self) -> Option<u64> {
                self.member_offset
            }
            fn artifact_hash_ahead(&self) -> Option<&Sha256State> {
                self.artifact_hash_ahead.as_ref()
            }
            fn out(&self) -> u64 {
                self.at.out
            }
            fn artifact_hash(&self) -> &Sha256State {
                &self.artifact_hash
            }
            fn slot_sha256(&self) -> &str {
                &self.slot_sha256
            }
            fn tar_head(&self) -> Option<&[u8]> {
                self.tar_head.as_deref()
            }
        }
    )*};
}

decoder_point!(GzipPoint, ZstdPoint, XzPoint);

impl ResumeRecord {
    pub fn raw(
        url: &str,
        slot: &Path,
        algorithm: &str,
        expected_hash: &str,
        size: Option<u64>,
        offset: u64,
    ) -> Self {
        ResumeRecord {
            version: VERSION,
            url: url.to_string(),
            slot: slot.to_path_buf(),
            algorithm: algorithm.to_string(),
            expected_hash: expected_hash.to_string(),
            size,
            format: "raw".into(),
            artifact_offset: offset,
            slot_offset: offset,
            ..Self::empty()
        }
    }

    /// A delta install of a chunked bundle whose image (signed sha256 `image_sha256`) is on the
    /// slot up to `slot_offset`.
    pub fn chunks(
        url: &str,
        slot: &Path,
        expected_hash: &str,
        size: Option<u64>,
        image_sha256: &str,
        slot_offset: u64,
    ) -> Self {
        ResumeRecord {
            version: VERSION,
            url: url.to_string(),
            slot: slot.to_path_buf(),
            algorithm: String::new(),
            expected_hash: expected_hash.to_string(),
            size,
            format: "chunks".into(),
            artifact_offset: 0,
            slot_offset,
            image_sha256: Some(image_sha256.to_string()),
            ..Self::empty()
        }
    }

    fn empty() -> Self {
        ResumeRecord {
            version: VERSION,
            url: String::new(),
            slot: PathBuf::new(),
            algorithm: String::new(),
            expected_hash: String::new(),
            size: None,
            format: String::new(),
            artifact_offset: 0,
            slot_offset: 0,
            image_sha256: None,
            bits: None,
            crc32: None,
            artifact_sha256_state: None,
            slot_sha256: None,
            member_offset: None,
            member_sha256_state: None,
            member_of: None,
            zstd_state: None,
            xz_state: None,
            tar_head: None,
            tar_head_sha256: None,
        }
    }

    /// A raw image member of a tar or signed bundle (see [`MemberPoint`]) written durably up
    /// to `point.slot_offset`.
    pub fn member(
        url: &str,
        slot: &Path,
        algorithm: &str,
        expected_hash: &str,
        size: Option<u64>,
        point: &MemberPoint,
    ) -> Self {
        ResumeRecord {
            url: url.to_string(),
            slot: slot.to_path_buf(),
            algorithm: algorithm.to_string(),
            expected_hash: expected_hash.to_string(),
            size,
            format: "member".into(),
            artifact_offset: point.artifact_offset(),
            slot_offset: point.slot_offset,
            member_offset: Some(point.member_offset),
            member_of: Some(point.member_of().into()),
            ..Self::empty()
        }
    }

    /// Where a raw image member of the same artifact continues in the same slot; None for any
    /// other record, one whose fields do not fit together, or a bundle's record when no
    /// signature policy is in force (`bundle_policy`). The artifact's size must be known: the
    /// archive goes on after the resume point.
    pub fn member_point(&self, target: &Target<'_>, bundle_policy: bool) -> Option<MemberPoint> {
        let member_offset = self.member_offset?;
        let in_bundle = match self.member_of.as_deref()? {
            "tar" => false,
            "bundle" if bundle_policy => true,
            _ => return None,
        };
        let point = MemberPoint {
            member_offset,
            slot_offset: self.slot_offset,
            in_bundle,
        };
        let size = target.size?;
        let fits = self.is_for("member", target)
            && self.slot_offset > 0
            // At least one tar header before the data, and not more than a sane head.
            && (512..=MAX_MEMBER_OFFSET).contains(&member_offset)
            && member_offset.checked_add(self.slot_offset) == Some(self.artifact_offset)
            && self.artifact_offset < size;
        fits.then_some(point)
    }

    /// A plain gzip image (artifact hash sha256) written up to `point` durably.
    pub fn gzip(
        url: &str,
        slot: &Path,
        (algorithm, expected_hash): (&str, &str),
        size: Option<u64>,
        point: &GzipPoint,
    ) -> Self {
        ResumeRecord {
            bits: Some(point.at.bits),
            crc32: Some(point.at.crc),
            ..Self::decoder("gzip", (url, slot, algorithm, expected_hash, size), point)
        }
    }

    /// A plain zstd image (artifact hash sha256) written up to `point` durably.
    pub fn zstd(
        url: &str,
        slot: &Path,
        (algorithm, expected_hash): (&str, &str),
        size: Option<u64>,
        point: &ZstdPoint,
    ) -> Self {
        ResumeRecord {
            zstd_state: Some(point.at.state.to_text()),
            ..Self::decoder("zstd", (url, slot, algorithm, expected_hash, size), point)
        }
    }

    /// A plain xz image (artifact hash sha256) written up to `point` durably.
    pub fn xz(
        url: &str,
        slot: &Path,
        (algorithm, expected_hash): (&str, &str),
        size: Option<u64>,
        point: &XzPoint,
    ) -> Self {
        ResumeRecord {
            xz_state: Some(unxz::state_text(
                &point.at.state,
                point.at.in_block.as_deref(),
            )),
            ..Self::decoder("xz", (url, slot, algorithm, expected_hash, size), point)
        }
    }

    /// The fields a `gzip`, a `zstd` and an `xz` record share: the artifact (`url`, `slot`,
    /// `algorithm` and `expected_hash`, `size`), the resume point (artifact and slot
    /// offsets), the decoder input's sha256 state there, the slot prefix's sha256, for a tar
    /// inside (format `tar-` and `format`) the tar's head and in a signed bundle (format
    /// `bundle-` and the rest) where its image member starts.
    fn decoder<P: DecoderPoint>(
        format: &str,
        (url, slot, algorithm, expected_hash, size): (&str, &Path, &str, &str, Option<u64>),
        point: &P,
    ) -> Self {
        let format = match point.tar_head() {
            Some(_) => format!("tar-{format}"),
            None => format.to_string(),
        };
        let format = match point.member_offset() {
            Some(_) => format!("bundle-{format}"),
            None => format,
        };
        ResumeRecord {
            url: url.to_string(),
            slot: slot.to_path_buf(),
            algorithm: algorithm.into(),
            expected_hash: expected_hash.to_string(),
            size,
            format,
            artifact_offset: point.download_from(),
            member_offset: point.member_offset(),
            member_of: point.member_offset().map(|_| "bundle".into()),
            member_sha256_state: point
                .member_offset()
                .map(|_| point.artifact_hash().to_text()),
            slot_offset: point.slot_offset(),
            artifact_sha256_state: Some(
                point
                    .artifact_hash_ahead()
                    .unwrap_or(point.artifact_hash())
                    .to_text(),
            ),
            slot_sha256: Some(point.slot_sha256().to_string()),
            tar_head: point.tar_head().map(hex::encode),
            tar_head_sha256: point.tar_head().map(sha256_hex),
            ..Self::empty()
        }
    }

    /// Where a gzip image of the same artifact continues in the same slot (a plain one, or
    /// under a signature policy, `bundle_policy`, one in a signed bundle); None for any other
    /// record, or one whose fields do not fit together.
    pub fn gzip_point(&self, target: &Target<'_>, bundle_policy: bool) -> Option<GzipPoint> {
        let c = self.decoder_point("gzip", target, bundle_policy)?;
        let bits = self.bits.filter(|&b| b <= 7)?;
        let crc = self.crc32?;
        Some(GzipPoint {
            at: ResumeAt {
                artifact_offset: c.input_offset,
                bits,
                out: c.out,
                crc,
            },
            artifact_hash: c.artifact_hash,
            slot_sha256: c.slot_sha256,
            tar_head: c.tar_head,
            member_offset: c.member_offset,
            artifact_hash_ahead: c.artifact_hash_ahead,
        })
    }

    /// Where a zstd image of the same artifact continues in the same slot, as
    /// [`Self::gzip_point`].
    pub fn zstd_point(&self, target: &Target<'_>, bundle_policy: bool) -> Option<ZstdPoint> {
        let c = self.decoder_point("zstd", target, bundle_policy)?;
        let state = ZstdState::from_text(self.zstd_state.as_deref()?)?;
        let at = unzstd::ResumeAt {
            artifact_offset: c.input_offset,
            out: c.out,
            state,
        };
        // Before reading the slot's prefix: a point the decoder could not have made.
        at.plausible().then_some(ZstdPoint {
            at,
            artifact_hash: c.artifact_hash,
            slot_sha256: c.slot_sha256,
            tar_head: c.tar_head,
            member_offset: c.member_offset,
            artifact_hash_ahead: c.artifact_hash_ahead,
        })
    }

    /// Where an xz image of the same artifact continues in the same slot, as
    /// [`Self::gzip_point`].
    pub fn xz_point(&self, target: &Target<'_>, bundle_policy: bool) -> Option<XzPoint> {
        let c = self.decoder_point("xz", target, bundle_policy)?;
        let (state, in_block) = unxz::state_from_text(self.xz_state.as_deref()?)?;
        let at = unxz::ResumeAt {
            artifact_offset: c.input_offset,
            out: c.out,
            state,
            in_block,
        };
        // Before reading the slot's prefix: a point the decoder could not have made.
        at.plausible().then_some(XzPoint {
            at,
            artifact_hash: c.artifact_hash,
            slot_sha256: c.slot_sha256,
            tar_head: c.tar_head,
            member_offset: c.member_offset,
            artifact_hash_ahead: c.artifact_hash_ahead,
        })
    }

    /// What a `format` record (`gzip`, `zstd` or `xz`, after `tar-` for a tar inside, after
    /// `bundle-` in a signed bundle's image member, which only a `bundle_policy` uses) for this
    /// artifact and slot says about its point, when its fields fit together.
    fn decoder_point(
        &self,
        format: &str,
        target: &Target<'_>,
        bundle_policy: bool,
    ) -> Option<CommonPoint> {
        let (inner, in_bundle) = match self.format.strip_prefix("bundle-") {
            Some(inner) => (inner, true),
            None => (self.format.as_str(), false),
        };
        if in_bundle != bundle_policy {
            return None;
        }
        let tar_head = if inner == format {
            None
        } else if inner.strip_prefix("tar-") == Some(format) {
            let head = hex::decode(self.tar_head.as_deref()?).ok()?;
            // Whole tar blocks, at least the image member's header; as recorded.
            let fits = (512..=MAX_TAR_HEAD).contains(&head.len())
                && head.len() % 512 == 0
                && self.tar_head_sha256.as_deref() == Some(sha256_hex(&head).as_str());
            Some(Some(head).filter(|_| fits)?)
        } else {
            return None;
        };
        let member_offset = if in_bundle {
            let offset = self.member_offset?;
            // At least the manifest's, the signature's and the image's headers before it.
            let fits = self.member_of.as_deref() == Some("bundle")
                && (3 * 512..=MAX_MEMBER_OFFSET).contains(&offset);
            if !fits {
                return None;
            }
            Some(offset)
        } else {
            None
        };
        let input_offset = self
            .artifact_offset
            .checked_sub(member_offset.unwrap_or(0))?;
        let out = self
            .slot_offset
            .checked_add(tar_head.as_ref().map_or(0, |h| h.len() as u64))?;
        let size = target.size.unwrap_or(u64::MAX);
        let same = self.is_for(&self.format, target)
            && target.algorithm == "sha256"
            && self.slot_offset > 0
            && self.artifact_offset < size;
        if !same {
            return None;
        }
        let artifact_state = Sha256State::from_text(self.artifact_sha256_state.as_deref()?)?;
        // In a bundle the decoder's input is the member, and the artifact's hash runs ahead.
        let (artifact_hash, artifact_hash_ahead) = if in_bundle {
            let member = Sha256State::from_text(self.member_sha256_state.as_deref()?)?;
            let ahead = artifact_state.len();
            if ahead < self.artifact_offset || ahead > size {
                return None;
            }
            (member, Some(artifact_state))
        } else {
            (artifact_state, None)
        };
        let slot_sha256 = self.slot_sha256.clone()?;
        let well_formed = artifact_hash.len() == input_offset
            && slot_sha256.len() == 64
            && slot_sha256
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        well_formed.then_some(CommonPoint {
            artifact_hash,
            artifact_hash_ahead,
            slot_sha256,
            tar_head,
            out,
            input_offset,
            member_offset,
        })
    }

    /// Where a delta install of the same bundle into the same slot continues: the slot
    /// offset up to which the image is durably written.
    pub fn chunks_offset(
        &self,
        slot: &Path,
        expected_hash: &str,
        image_sha256: &str,
        image_size: u64,
    ) -> Option<u64> {
        let same = self.version == VERSION
            && self.format == "chunks"
            && self.slot == slot
            && self.expected_hash == expected_hash
            && self.image_sha256.as_deref() == Some(image_sha256)
            && self.slot_offset <= image_size;
        same.then_some(self.slot_offset)
    }

    /// The offset to resume from when this record belongs to the same artifact and slot.
    /// The URL may differ (download links can carry expiring tokens); the hash names the
    /// artifact.
    pub fn resume_offset(
        &self,
        slot: &Path,
        algorithm: &str,
        expected_hash: &str,
        size: Option<u64>,
        capacity: u64,
    ) -> Option<u64> {
        let target = Target {
            slot,
            algorithm,
            expected_hash,
            size,
            capacity,
        };
        let same = self.is_for("raw", &target)
            && self.artifact_offset == self.slot_offset
            && self.slot_offset <= size.unwrap_or(u64::MAX);
        same.then_some(self.slot_offset)
    }

    /// Written by this record version in `format` for this artifact and slot, and within it.
    fn is_for(&self, format: &str, t: &Target<'_>) -> bool {
        self.version == VERSION
            && self.format == format
            && self.slot == t.slot
            && self.algorithm == t.algorithm
            && self.expected_hash == t.expected_hash
            && self.size == t.size
            && self.slot_offset <= t.capacity
    }
}

/// What a gzip, zstd and xz record say of their point alike (see [`DecoderPoint`]).
struct CommonPoint {
    artifact_hash: Sha256State,
    artifact_hash_ahead: Option<Sha256State>,
    slot_sha256: String,
    tar_head: Option<Vec<u8>>,
    /// The decoder's output before the point.
    out: u64,
    /// The decoder's input before the point.
    input_offset: u64,
    member_offset: Option<u64>,
}

/// What a download record must match: the artifact (hash algorithm and value, size) and the
/// slot (path, capacity).
pub struct Target<'a> {
    pub slot: &'a Path,
    pub algorithm: &'a str,
    pub expected_hash: &'a str,
    pub size: Option<u64>,
    pub capacity: u64,
}

/// The record at `path`, or None when there is none or it is unreadable (it is then only
/// a lost optimisation: the download starts over).
pub fn load(path: &Path) -> Option<ResumeRecord> {
    let text = fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable resume record");
            None
        }
    }
}

fn state_error(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::ResumeState {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Replace the record atomically: temp file, fsync, rename, fsync dir.
pub fn save(path: &Path, record: &ResumeRecord) -> Result<(), InstallError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_string(record).map_err(|e| state_error(path)(io::Error::other(e)))?;
    let mut file = File::create(&tmp).map_err(state_error(&tmp))?;
    file.write_all(text.as_bytes()).map_err(state_error(&tmp))?;
    file.sync_all().map_err(state_error(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(state_error(path))?;
    sync_parent(path).map_err(state_error(path))
}

/// Remove the record (durably); no record is fine.
pub fn remove(path: &Path) -> Result<(), InstallError> {
    match fs::remove_file(path) {
        Ok(()) => sync_parent(path).map_err(state_error(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(state_error(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_matching() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resume.json");
        assert_eq!(load(&path), None);
        let slot = Path::new("/dev/slot-b");
        let r = ResumeRecord::raw("http://x/a", slot, "sha256", "ab", Some(100), 64);
        save(&path, &r).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            back.resume_offset(slot, "sha256", "ab", Some(100), 1000),
            Some(64)
        );
        assert_eq!(
            back.resume_offset(slot, "sha256", "cd", Some(100), 1000),
            None
        );
        assert_eq!(
            back.resume_offset(Path::new("/dev/a"), "sha256", "ab", Some(100), 1000),
            None
        );
        assert_eq!(
            back.resume_offset(slot, "sha256", "ab", Some(100), 10),
            None
        );
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(load(&path), None);
    }

    #[test]
    fn records_of_other_agent_versions_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("download.resume");
        let slot = Path::new("/dev/slot-b");
        // Written by an agent before delta installs (no image_sha256).
        fs::write(
            &path,
            r#"{"version":1,"url":"http://x/a","slot":"/dev/slot-b","algorithm":"sha256","expected_hash":"ab","size":100,"format":"raw","artifact_offset":64,"slot_offset":64}"#,
        )
        .unwrap();
        let old = load(&path).unwrap();
        assert_eq!(
            old.resume_offset(slot, "sha256", "ab", Some(100), 1000),
            Some(64)
        );
        assert_eq!(old.chunks_offset(slot, "ab", "cd", 1000), None);
        // Written by a later agent with a field this one does not know.
        fs::write(
            &path,
            r#"{"version":1,"url":"u","slot":"/dev/slot-b","algorithm":"","expected_hash":"ab","size":100,"format":"chunks","artifact_offset":0,"slot_offset":32,"image_sha256":"cd","future":[1]}"#,
        )
        .unwrap();
        let newer = load(&path).unwrap();
        assert_eq!(newer.chunks_offset(slot, "ab", "cd", 1000), Some(32));
        // A chunks record never resumes a raw download, and another image never resumes.
        assert_eq!(newer.resume_offset(slot, "", "ab", Some(100), 1000), None);
        assert_eq!(newer.chunks_offset(slot, "ab", "ef", 1000), None);
        assert_eq!(newer.chunks_offset(slot, "ab", "cd", 16), None);
    }

    #[test]
    fn a_point_in_a_tar_keeps_the_head_and_counts_the_slot_without_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("download.resume");
        let slot = Path::new("/dev/slot-b");
        let mut hash = Sha256State::new();
        hash.update(&[7u8; 1000]);
        let head: Vec<u8> = (0..1024u32).map(|i| (i % 251) as u8).collect();
        let point = GzipPoint {
            at: ResumeAt {
                artifact_offset: 1000,
                bits: 3,
                out: 1024 + 4096,
                crc: 0xdead_beef,
            },
            artifact_hash: hash,
            slot_sha256: "ab".repeat(32),
            tar_head: Some(head.clone()),
            member_offset: None,
            artifact_hash_ahead: None,
        };
        let r = ResumeRecord::gzip("http://x/a.tgz", slot, ("sha256", "cd"), Some(5000), &point);
        assert_eq!((r.format.as_str(), r.slot_offset), ("tar-gzip", 4096));
        assert_eq!(r.tar_head.as_deref(), Some(hex::encode(&head).as_str()));
        let back = saved_and_loaded(&path, &r);
        let target = target_cd(slot, "sha256", Some(5000), 1 << 20);
        assert_eq!(back.gzip_point(&target, false), Some(point.clone()));
        assert_eq!(back.xz_point(&target, false), None);
        // A head that is not whole tar blocks, too long, missing, or not the one recorded (a
        // byte changed, whole blocks still): no point.
        let mut changed = head.clone();
        changed[100] ^= 1;
        for bad in [
            Some(hex::encode(&changed)),
            Some(hex::encode(&head[..1000])),
            Some(hex::encode(vec![0u8; MAX_TAR_HEAD + 512])),
            Some("not hex".into()),
            None,
        ] {
            let bad = ResumeRecord {
                tar_head: bad,
                ..r.clone()
            };
            assert_eq!(bad.gzip_point(&target, false), None, "{:?}", bad.tar_head);
        }
        // The plain format ignores a head: its point is at the slot offset.
        let plain = ResumeRecord {
            format: "gzip".into(),
            ..r.clone()
        };
        let plain = plain.gzip_point(&target, false).unwrap();
        assert_eq!((plain.at.out, plain.tar_head), (4096, None));
    }

    #[test]
    fn a_point_in_a_signed_bundle_counts_the_members_bytes_and_needs_the_policy() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("download.resume");
        let slot = Path::new("/dev/slot-b");
        let point = gzip_point_after_1000_bytes(4096, None, Some(2048));
        assert_eq!(point.download_from(), 3048);
        let r = ResumeRecord::gzip(
            "http://x/a.bundle",
            slot,
            ("sha256", "cd"),
            Some(9000),
            &point,
        );
        assert_eq!(r.format, "bundle-gzip");
        assert_eq!((r.artifact_offset, r.member_offset), (3048, Some(2048)));
        assert_eq!(r.member_of.as_deref(), Some("bundle"));
        // The member's state, and the artifact's, 4000 bytes in (ahead of the point).
        let ahead = point.artifact_hash_ahead.clone().unwrap();
        assert_eq!(r.member_sha256_state, Some(point.artifact_hash.to_text()));
        assert_eq!(r.artifact_sha256_state, Some(ahead.to_text()));
        let back = saved_and_loaded(&path, &r);
        let target = target_cd(slot, "sha256", Some(9000), 1 << 20);
        assert_eq!(back.gzip_point(&target, true), Some(point.clone()));
        // Only under a signature policy, and a plain record never under one; only with a
        // sha256 artifact hash (whose state is kept).
        assert_eq!(back.gzip_point(&target, false), None);
        let sha1 = ResumeRecord {
            algorithm: "sha1".into(),
            ..r.clone()
        };
        let sha1_target = target_cd(slot, "sha1", Some(9000), 1 << 20);
        assert_eq!(sha1.gzip_point(&sha1_target, true), None);
        let plain = ResumeRecord {
            format: "gzip".into(),
            member_offset: None,
            member_of: None,
            artifact_offset: 1000,
            artifact_sha256_state: r.member_sha256_state.clone(),
            ..r.clone()
        };
        assert!(plain.gzip_point(&target, false).is_some());
        assert_eq!(plain.gzip_point(&target, true), None);
        // The artifact's state behind the point, or beyond the artifact's end.
        let mut behind = Sha256State::new();
        behind.update(&[8u8; 3000]);
        let mut beyond = Sha256State::new();
        beyond.update(&vec![8u8; 9001]);
        // Fields that do not fit: the member's start missing, too early (no room for the
        // manifest's, signature's and image's headers) or too late, not a bundle's, the point
        // before it, a state of another length.
        for bad in [
            ResumeRecord {
                artifact_sha256_state: Some(behind.to_text()),
                ..r.clone()
            },
            ResumeRecord {
                artifact_sha256_state: Some(beyond.to_text()),
                ..r.clone()
            },
            ResumeRecord {
                member_sha256_state: None,
                ..r.clone()
            },
            ResumeRecord {
                member_offset: None,
                ..r.clone()
            },
            ResumeRecord {
                member_offset: Some(1024),
                artifact_offset: 2024,
                ..r.clone()
            },
            ResumeRecord {
                member_offset: Some(MAX_MEMBER_OFFSET + 512),
                artifact_offset: MAX_MEMBER_OFFSET + 1512,
                ..r.clone()
            },
            ResumeRecord {
                member_of: Some("tar".into()),
                ..r.clone()
            },
            ResumeRecord {
                artifact_offset: 1000,
                ..r.clone()
            },
            ResumeRecord {
                artifact_offset: 3049,
                ..r.clone()
            },
        ] {
            assert_eq!(bad.gzip_point(&target, true), None, "{bad:?}");
        }
        // A tar inside, in a bundle.
        let head = vec![0u8; 512];
        let tar = GzipPoint {
            tar_head: Some(head),
            at: ResumeAt {
                out: 4096 + 512,
                ..point.at
            },
            ..point
        };
        let r = ResumeRecord::gzip(
            "http://x/a.bundle",
            slot,
            ("sha256", "cd"),
            Some(9000),
            &tar,
        );
        assert_eq!(
            (r.format.as_str(), r.slot_offset),
            ("bundle-tar-gzip", 4096)
        );
        assert_eq!(r.gzip_point(&target, true), Some(tar));
    }

    /// A gzip point after 1000 input bytes (of 7s) and `out` bytes of output.
    fn gzip_point_after_1000_bytes(
        out: u64,
        tar_head: Option<Vec<u8>>,
        member_offset: Option<u64>,
    ) -> GzipPoint {
        let mut hash = Sha256State::new();
        hash.update(&[7u8; 1000]);
        GzipPoint {
            at: ResumeAt {
                artifact_offset: 1000,
                bits: 3,
                out,
                crc: 0xdead_beef,
            },
            artifact_hash: hash,
            slot_sha256: "ab".repeat(32),
            tar_head,
            member_offset,
            // In a bundle: the artifact hash ran 4000 bytes (of 8s) ahead.
            artifact_hash_ahead: member_offset.map(|_| {
                let mut ahead = Sha256State::new();
                ahead.update(&[8u8; 4000]);
                ahead
            }),
        }
    }

    /// `r` saved at `path` and loaded again: the same record.
    fn saved_and_loaded(path: &Path, r: &ResumeRecord) -> ResumeRecord {
        save(path, r).unwrap();
        let back = load(path).unwrap();
        assert_eq!(&back, r);
        back
    }

    /// The artifact with hash "cd" in `slot`.
    fn target_cd<'a>(
        slot: &'a Path,
        algorithm: &'a str,
        size: Option<u64>,
        capacity: u64,
    ) -> Target<'a> {
        Target {
            slot,
            algorithm,
            expected_hash: "cd",
            size,
            capacity,
        }
    }

    #[test]
    fn gzip_records_round_trip_and_are_used_only_when_everything_fits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("download.resume");
        let slot = Path::new("/dev/slot-b");
        let point = gzip_point_after_1000_bytes(4096, None, None);
        let r = ResumeRecord::gzip("http://x/a.gz", slot, ("sha256", "cd"), Some(5000), &point);
        let back = saved_and_loaded(&path, &r);
        let target = |algorithm, size, capacity| target_cd(slot, algorithm, size, capacity);
        assert_eq!(
            back.gzip_point(&target("sha256", Some(5000), 1 << 20), false),
            Some(point.clone())
        );
        assert_eq!(
            back.gzip_point(&target("sha1", Some(5000), 1 << 20), false),
            None
        );
        assert_eq!(
            back.gzip_point(&target("sha256", Some(999), 1 << 20), false),
            None
        );
        assert_eq!(
            back.gzip_point(&target("sha256", Some(5000), 4000), false),
            None
        );
        // A gzip record is never read as a raw or chunks one: an agent that knows only those
        // (every earlier one: they match the format the same way) starts over.
        assert_eq!(
            back.resume_offset(slot, "sha256", "cd", Some(5000), 1 << 20),
            None
        );
        assert_eq!(back.chunks_offset(slot, "cd", "ab", 1 << 20), None);
        // Fields that do not fit together: not used.
        let broken = [
            ResumeRecord {
                bits: Some(8),
                ..r.clone()
            },
            ResumeRecord {
                bits: None,
                ..r.clone()
            },
            ResumeRecord {
                crc32: None,
                ..r.clone()
            },
            ResumeRecord {
                artifact_offset: 999,
                ..r.clone()
            },
            ResumeRecord {
                slot_offset: 0,
                ..r.clone()
            },
            ResumeRecord {
                slot_sha256: Some("AB".repeat(32)),
                ..r.clone()
            },
            ResumeRecord {
                slot_sha256: Some("ab".into()),
                ..r.clone()
            },
            ResumeRecord {
                artifact_sha256_state: Some("x".into()),
                ..r.clone()
            },
            ResumeRecord {
                format: "raw".into(),
                ..r.clone()
            },
        ];
        for b in broken {
            assert_eq!(
                b.gzip_point(&target("sha256", Some(5000), 1 << 20), false),
                None,
                "{b:?}"
            );
        }
    }

    /// The state at the first block boundary of a zstd frame (a real one: the text form is
    /// the decoder's own).
    fn a_zstd_state() -> ZstdState {
        use std::io::Read;
        let data: Vec<u8> = (0..1u32 << 20)
            .map(|i| ((i % 251) ^ (i / 4096)) as u8)
            .collect();
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.include_checksum(true).unwrap();
        let zst = c.compress(&data).unwrap();
        let mut decoder = unzstd::ZstdDecoder::new(&zst[..], None);
        decoder.boundaries_from(0);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            assert_ne!(decoder.read(&mut buf).unwrap(), 0, "no boundary");
            if let Some(b) = decoder.take_boundary() {
                return b.state;
            }
        }
    }

    #[test]
    fn zstd_records_round_trip_and_are_used_only_when_everything_fits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("download.resume");
        let slot = Path::new("/dev/slot-b");
        let mut hash = Sha256State::new();
        hash.update(&[7u8; 1000]);
        let point = ZstdPoint {
            at: unzstd::ResumeAt {
                artifact_offset: 1000,
                // Past the state's repeat offsets (a point the decoder could have made).
                out: 65536,
                state: a_zstd_state(),
            },
            artifact_hash: hash,
            slot_sha256: "ab".repeat(32),
            tar_head: None,
            member_offset: None,
            artifact_hash_ahead: None,
        };
        let r = ResumeRecord::zstd("http://x/a.zst", slot, ("sha256", "cd"), Some(5000), &point);
        assert_eq!(r.format, "zstd");
        assert_eq!((r.bits, r.crc32), (None, None));
        let back = saved_and_loaded(&path, &r);
        let target = |algorithm, size, capacity| target_cd(slot, algorithm, size, capacity);
        let good = target("sha256", Some(5000), 1 << 20);
        assert_eq!(back.zstd_point(&good, false), Some(point.clone()));
        for other in [
            target("sha1", Some(5000), 1 << 20),
            target("sha256", Some(999), 1 << 20),
            target("sha256", Some(5000), 4000),
        ] {
            assert_eq!(back.zstd_point(&other, false), None);
        }
        // Never read as a record of another format, nor they as a zstd one.
        assert_eq!(back.gzip_point(&good, false), None);
        assert_eq!(back.member_point(&good, true), None);
        assert_eq!(
            back.resume_offset(slot, "sha256", "cd", Some(5000), 1 << 20),
            None
        );
        let gzip = ResumeRecord {
            format: "gzip".into(),
            bits: Some(0),
            crc32: Some(0),
            ..r.clone()
        };
        assert_eq!(gzip.zstd_point(&good, false), None);
        assert!(gzip.gzip_point(&good, false).is_some());
        // Fields that do not fit together: not used.
        let broken = [
            ResumeRecord {
                zstd_state: None,
                ..r.clone()
            },
            ResumeRecord {
                zstd_state: Some("not a state".into()),
                ..r.clone()
            },
            ResumeRecord {
                artifact_offset: 999,
                ..r.clone()
            },
            ResumeRecord {
                slot_offset: 0,
                ..r.clone()
            },
            ResumeRecord {
                slot_sha256: Some("AB".repeat(32)),
                ..r.clone()
            },
            ResumeRecord {
                artifact_sha256_state: None,
                ..r.clone()
            },
            ResumeRecord {
                version: 2,
                ..r.clone()
            },
        ];
        for b in broken {
            assert_eq!(b.zstd_point(&good, false), None, "{b:?}");
        }
    }

    /// Points the decoder could not have made are refused before the slot's prefix is read:
    /// a point between frames at the artifact's start (whose forgery needs nothing of the
    /// artifact: the image would be written behind the slot's old bytes, every hash passing),
    /// a point inside a frame before the frame's start, with an offset outside its window, or
    /// past its content size.
    #[test]
    fn zstd_points_the_decoder_cannot_make_are_refused() {
        let slot = Path::new("/dev/slot-b");
        let good = target_cd(slot, "sha256", Some(5000), 1 << 20);
        let record = |artifact_offset: u64, out: u64, state: &str| {
            let mut hash = Sha256State::new();
            hash.update(&vec![0u8; artifact_offset as usize]);
            let point = ZstdPoint {
                at: unzstd::ResumeAt {
                    artifact_offset,
                    out,
                    state: ZstdState::from_text(state).expect("a state"),
                },
                artifact_hash: hash,
                slot_sha256: "ab".repeat(32),
                tar_head: None,
                member_offset: None,
                artifact_hash_ahead: None,
            };
            ResumeRecord::zstd("http://x/a.zst", slot, ("sha256", "cd"), Some(5000), &point)
        };
        let inside = "frame:0:1048576:-:8010:p:p:p:1,4,8";
        assert!(record(1000, 4096, "between")
            .zstd_point(&good, false)
            .is_some());
        assert!(record(1000, 4096, inside)
            .zstd_point(&good, false)
            .is_some());
        for (artifact_offset, out, state) in [
            (0, 4096, "between"),
            (8, 4096, "between"),
            (1000, 4096, "frame:4096:1048576:-:8010:p:p:p:1,4,8"),
            (1000, 4096, "frame:4000:1048576:-:8010:p:p:p:1,4,200"),
            (1000, 4096, "frame:0:1048576:4000:8010:p:p:p:1,4,8"),
        ] {
            let r = record(artifact_offset, out, state);
            assert_eq!(
                r.zstd_point(&good, false),
                None,
                "{artifact_offset} {out} {state}"
            );
        }
    }

    #[test]
    fn member_records_round_trip_and_are_used_only_when_everything_fits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("download.resume");
        let slot = Path::new("/dev/slot-b");
        let point = MemberPoint {
            member_offset: 1536,
            slot_offset: 4096,
            in_bundle: true,
        };
        let r = ResumeRecord::member("http://x/u.ddib", slot, "sha1", "cd", Some(9000), &point);
        assert_eq!(r.artifact_offset, 1536 + 4096);
        let back = saved_and_loaded(&path, &r);
        let target = |algorithm, size, capacity| target_cd(slot, algorithm, size, capacity);
        let good = target("sha1", Some(9000), 1 << 20);
        assert_eq!(back.member_point(&good, true), Some(point));
        // A bundle's record needs a signature policy; a tar's does not.
        assert_eq!(back.member_point(&good, false), None);
        let tar = ResumeRecord::member(
            "u",
            slot,
            "sha1",
            "cd",
            Some(9000),
            &MemberPoint {
                in_bundle: false,
                ..point
            },
        );
        assert!(tar.member_point(&good, false).is_some_and(|p| !p.in_bundle));
        assert!(tar.member_point(&good, true).is_some_and(|p| !p.in_bundle));
        // Another artifact, slot, hash algorithm, or a slot too small: not used.
        for other in [
            target("sha256", Some(9000), 1 << 20),
            target("sha1", Some(9001), 1 << 20),
            target("sha1", None, 1 << 20),
            target("sha1", Some(9000), 4000),
        ] {
            assert_eq!(back.member_point(&other, true), None);
        }
        let elsewhere = Target {
            slot: Path::new("/dev/slot-a"),
            ..target("sha1", Some(9000), 1 << 20)
        };
        assert_eq!(back.member_point(&elsewhere, true), None);
        // The other formats never read it, nor it theirs.
        assert_eq!(
            back.resume_offset(slot, "sha1", "cd", Some(9000), 1 << 20),
            None
        );
        assert_eq!(back.gzip_point(&good, false), None);
        let raw = ResumeRecord::raw("u", slot, "sha1", "cd", Some(9000), 4096);
        assert_eq!(raw.member_point(&good, true), None);
        // Fields that do not fit together, or a head too large to fetch again: not used.
        let broken = [
            ResumeRecord {
                member_offset: None,
                ..r.clone()
            },
            ResumeRecord {
                member_of: None,
                ..r.clone()
            },
            ResumeRecord {
                member_of: Some("zip".into()),
                ..r.clone()
            },
            ResumeRecord {
                member_offset: Some(1537),
                ..r.clone()
            },
            ResumeRecord {
                artifact_offset: 9000,
                slot_offset: 9000 - 1536,
                ..r.clone()
            },
            ResumeRecord {
                member_offset: Some(0),
                artifact_offset: 4096,
                ..r.clone()
            },
            ResumeRecord {
                slot_offset: 0,
                artifact_offset: 1536,
                ..r.clone()
            },
            ResumeRecord {
                member_offset: Some(MAX_MEMBER_OFFSET + 1),
                artifact_offset: MAX_MEMBER_OFFSET + 1 + 4096,
                size: Some(2 << 20),
                ..r.clone()
            },
            ResumeRecord {
                member_offset: Some(u64::MAX),
                artifact_offset: 4095,
                ..r.clone()
            },
            ResumeRecord {
                version: 2,
                ..r.clone()
            },
        ];
        for b in broken {
            let target = target("sha1", b.size, 1 << 20);
            assert_eq!(b.member_point(&target, true), None, "{b:?}");
        }
    }

    #[test]
    fn garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resume.json");
        fs::write(&path, "{not json").unwrap();
        assert_eq!(load(&path), None);
    }
}
