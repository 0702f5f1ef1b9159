//! The install pipeline's error type: one variant per way an install can fail, each carrying
//! the context (URL, path, offset, sizes) an operator needs to understand it.

use std::io;
use std::path::PathBuf;

/// Why an install failed. [`InstallError::is_retryable`] separates transient network trouble
/// (worth another attempt later, resuming where it stopped) from permanent failures.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InstallError {
    /// The request itself cannot be carried out (no hash offered, empty URL, ...).
    #[error("invalid install request: {0}")]
    InvalidRequest(String),

    /// The server answered with an HTTP status that is not a success.
    #[error("download of {url} failed: HTTP status {status}")]
    HttpStatus { url: String, status: u16 },

    /// The connection kept failing; the retries are exhausted.
    #[error("download of {url} failed at byte {offset} after {attempts} attempts: {message}")]
    Network {
        url: String,
        offset: u64,
        attempts: u32,
        message: String,
    },

    /// The body ended before the announced size, on every retry.
    #[error(
        "download of {url} truncated: got {received} of {expected} bytes after {attempts} attempts"
    )]
    Truncated {
        url: String,
        received: u64,
        expected: u64,
        attempts: u32,
    },

    /// The install used up its request budget
    /// ([`super::source::MAX_REQUESTS_PER_INSTALL`]): the server kept ending its answers early.
    #[error(
        "download of {url} stopped after {requests} requests at byte {offset}: the server keeps \
         ending its answers early (each Range request may cost the server an action status)"
    )]
    TooManyRequests {
        url: String,
        requests: u32,
        offset: u64,
    },

    /// The server sent more bytes, or announced another size, than the artifact's size.
    #[error("download of {url}: server sent {actual} bytes, the artifact has {expected}")]
    SizeMismatch {
        url: String,
        expected: u64,
        actual: u64,
    },

    /// The artifact bytes do not have the hash the server announced.
    #[error("{algorithm} mismatch: expected {expected}, got {actual}")]
    HashMismatch {
        algorithm: &'static str,
        expected: String,
        actual: String,
    },

    /// The image does not fit into the slot.
    #[error("image of {image_size} bytes{} does not fit slot {} ({capacity} bytes)", if *.at_least { " or more" } else { "" }, slot.display())]
    TooLarge {
        slot: PathBuf,
        image_size: u64,
        /// true when only a lower bound of the image size is known (the decoder overran).
        at_least: bool,
        capacity: u64,
    },

    /// The artifact holds an image of 0 bytes (nothing that could boot).
    #[error("the image is empty")]
    EmptyImage,

    /// The target is the running system (or holds a mounted filesystem).
    #[error("refusing to write {}: {reason}", slot.display())]
    SlotInUse { slot: PathBuf, reason: String },

    /// The target cannot be used as a slot (missing, a directory, empty, ...).
    #[error("slot {} cannot be used: {reason}", slot.display())]
    SlotUnusable { slot: PathBuf, reason: String },

    /// Reading, writing or syncing the slot failed (disk full, I/O error, ...).
    #[error("{op} slot {} at offset {offset}: {source}", slot.display())]
    SlotIo {
        slot: PathBuf,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },

    /// What was read back from the slot is not what was written.
    #[error("read-back of slot {} differs: wrote sha256 {written}, read {read}", slot.display())]
    ReadBackMismatch {
        slot: PathBuf,
        written: String,
        read: String,
    },

    /// The gzip stream is corrupt or truncated.
    #[error("{format} data corrupt at artifact byte {offset}: {source}")]
    Decode {
        format: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },

    /// The tar archive breaks a rule (traversal, links, devices, several images, ...).
    #[error("archive rejected: {0}")]
    ArchiveRejected(String),

    /// Signed-bundle verification failed or is required but unavailable.
    #[error("signature: {0}")]
    Signature(String),

    /// The bundle's manifest breaks the format's rules (a chunk table or count that does not
    /// add up, a format this agent does not read): the vendor tool's output, not its signature,
    /// is wrong.
    #[error("bundle manifest is invalid: {0}")]
    Bundle(String),

    /// A resumed install found that the slot's bytes before its resume point are not the
    /// signed image's any more (the slot was written behind the agent's back): the install
    /// starts over from byte 0 once; this is the error if that happens again.
    #[error(
        "slot {} no longer holds what this install wrote before byte {resume_at}: chunk {chunk} \
         (at byte {offset}) is not the signed one",
        slot.display()
    )]
    ResumedPrefixMismatch {
        slot: PathBuf,
        resume_at: u64,
        chunk: usize,
        offset: u64,
    },

    /// A replay resume (a raw image member of a tar or signed bundle, see `resume.rs`) found
    /// that the artifact and the slot do not fit its record: the image member is elsewhere or
    /// shorter, or the bytes read from the slot are not the image's. The install starts over
    /// from byte 0 once.
    #[error("slot {}: cannot resume at byte {resume_at}: {why}", slot.display())]
    ReplayMismatch {
        slot: PathBuf,
        resume_at: u64,
        why: String,
    },

    /// The resume state file could not be written.
    #[error("resume state {}: {source}", path.display())]
    ResumeState {
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// The download side stopped without saying why (install cancelled).
    #[error("download aborted before the end of the artifact")]
    Aborted,

    /// A pipeline task died (a bug).
    #[error("internal error: {0}")]
    Internal(String),
}

impl InstallError {
    /// True for transient network faults that exhausted their retries: trying the same
    /// install again later may succeed (and resumes where possible). Everything else is
    /// permanent for this artifact.
    pub fn is_retryable(&self) -> bool {
        match self {
            InstallError::Network { .. } | InstallError::Truncated { .. } => true,
            InstallError::HttpStatus { status, .. } => {
                crate::http_policy::is_transient_status(*status)
            }
            _ => false,
        }
    }
}
