//! Signed update bundles: the format, the keys, streaming verification and creation.
//!
//! A bundle is a POSIX ustar archive with exactly three members, in this order:
//!
//! 1. `manifest.json`: what the image is ([`Manifest`]: format version, `compatible`, version,
//!    image name, size, sha256, compression);
//! 2. `manifest.json.sig`: one or more detached ed25519 signatures over the manifest's exact bytes;
//! 3. the image itself (raw or gzip), named as the manifest says.
//!
//! Format 2 ([`chunked`]) puts a chunk index between the signature and the image, and stores the
//! image as content-defined chunks ([`chunk`]), each its own zstd frame, so a device can reuse
//! the chunks it already has and fetch only the others. Format 3 compresses each frame with the
//! image bytes before it as context and compacts the index.
//!
//! The order is what makes streaming possible: a device reads the manifest and its signature
//! first, checks them against its trusted keys *before a single image byte is written*, then
//! streams the image through [`BundleReader`], which counts and hashes it and fails the read that
//! reaches the end if the bytes are not the ones the signed manifest names. The full format is
//! documented in `docs/bundle-format.md`.

pub mod chunk;
pub mod chunked;
mod keys;
mod manifest;
mod reader;
mod tar;
#[cfg(feature = "create")]
mod writer;

pub use chunk::{Chunker, ChunkerParams};
pub use chunked::{
    chunk_key, key_from_digest, ChunkDecoder, ChunkEntry, ChunkError, ChunkIndex, DeltaPlan,
    FetchRange, TooManyChunks, MAX_CHUNKS,
};
pub use keys::{generate_keypair, KeyError, PublicKey, SecretKey};
pub use manifest::{
    ChunkedInfo, Compression, ImageInfo, Manifest, SignatureEntry, Signatures, FORMAT_CHUNKED,
    FORMAT_CHUNKED_CONTEXT, FORMAT_VERSION, MAX_HISTORY,
};
pub use reader::{
    looks_like_bundle, read_manifest_unverified, read_prefix_verified, read_unverified,
    BundleReader, Policy, UnverifiedBundle,
};
#[cfg(feature = "create")]
pub use writer::{
    compression_of, create_bundle, create_chunked_bundle, ChunkedOptions, CreateOptions,
    DEFAULT_AVERAGE_CHUNK, DEFAULT_HISTORY, INDEX_NAME,
};

/// Name of the first member of every bundle.
pub const MANIFEST_NAME: &str = "manifest.json";
/// Name of the second member: the signatures over the manifest.
pub const SIGNATURE_NAME: &str = "manifest.json.sig";

/// Largest manifest or signature member accepted: both are small JSON documents, and a hostile
/// bundle must not make the device buffer more than this before anything is verified.
pub const MAX_METADATA_SIZE: u64 = 64 * 1024;

/// Everything that can make a bundle unacceptable. Each variant names the problem so that the
/// agent's `closed`/`failure` feedback says why the update was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    #[error("reading the bundle failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a bundle: {0}")]
    NotABundle(String),
    #[error("malformed bundle archive: {0}")]
    Archive(String),
    #[error("bundle member {found:?} is where {expected:?} must be (the manifest and its signature must come first)")]
    UnexpectedMember { expected: String, found: String },
    #[error("bundle member {name:?} is {size} bytes, more than the {limit} allowed")]
    MemberTooLarge { name: String, size: u64, limit: u64 },
    #[error("bundle manifest is invalid: {0}")]
    Manifest(String),
    #[error("bundle manifest is invalid: {0}")]
    TooManyChunks(#[from] chunked::TooManyChunks),
    /// The index member is not the one the manifest names (tampered with, or another's).
    #[error("bundle chunk index does not match the manifest: {0}")]
    IndexMismatch(String),
    #[error("bundle signature file is invalid: {0}")]
    SignatureFile(String),
    #[error("bundle signature does not verify with any trusted key (signed by key(s) {signed_by}; trusted: {trusted})")]
    Untrusted { signed_by: String, trusted: String },
    #[error("no trusted keys are configured, so no bundle can be verified")]
    NoTrustedKeys,
    #[error("bundle is for {bundle:?}, this device is {device:?}")]
    Incompatible { bundle: String, device: String },
    #[error("bundle image is {size} bytes, more than the {limit} bytes that fit")]
    ImageTooLarge { size: u64, limit: u64 },
    #[error("bundle image member is {actual} bytes but the signed manifest says {manifest}")]
    ImageSizeMismatch { manifest: u64, actual: u64 },
    #[error("bundle image sha256 is {actual} but the signed manifest says {manifest}")]
    ImageHashMismatch { manifest: String, actual: String },
    #[error("bundle has data after the image: {0}")]
    TrailingData(String),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("bundle chunk refused: {0}")]
    Chunk(#[from] ChunkError),
}

impl BundleError {
    /// Wraps the error for `Read` implementations, keeping the typed error recoverable with
    /// [`BundleError::from_io`].
    pub fn into_io(self) -> std::io::Error {
        match self {
            BundleError::Io(e) => e,
            other => std::io::Error::new(std::io::ErrorKind::InvalidData, other),
        }
    }

    /// The typed bundle error inside an I/O error returned by [`BundleReader`], if there is one.
    pub fn from_io(err: &std::io::Error) -> Option<&BundleError> {
        err.get_ref()
            .and_then(|inner| inner.downcast_ref::<BundleError>())
    }
}
