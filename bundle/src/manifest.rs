//! The manifest (what the image is) and the signature member (who vouches for it).

use serde::{Deserialize, Serialize};

use crate::chunk::ChunkerParams;
use crate::BundleError;

/// Format 1: one image member, raw or compressed as a whole.
pub const FORMAT_VERSION: u32 = 1;
/// Format 2: a chunked image (see [`crate::chunked`]). A device refuses numbers it does not
/// know rather than guess what a newer vendor tool meant.
pub const FORMAT_CHUNKED: u32 = 2;
/// Format 3: a chunked image whose frames are compressed with the image bytes before them as
/// context (`chunked.history`), with a compact, compressed index (see [`crate::chunked`]).
/// A device that reads only formats 1 and 2 refuses it up front (`format 3 is not supported`).
pub const FORMAT_CHUNKED_CONTEXT: u32 = 3;

/// Largest `chunked.history` a device accepts: it keeps that many bytes of the image in
/// memory (twice, once in its decoder) while it installs.
pub const MAX_HISTORY: u32 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Which devices may install this bundle; compared for equality with the device's own.
    pub compatible: String,
    pub version: String,
    pub image: ImageInfo,
    /// Format 2 only: how the image member is chunked, and the signed index of its chunks.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunked: Option<ChunkedInfo>,
}

/// What a format-2 manifest says about the chunked image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkedInfo {
    /// The chunking algorithm ([`crate::chunk::ALGORITHM`]).
    pub algorithm: String,
    pub chunker: ChunkerParams,
    /// Bytes of the image once decompressed (what the slot receives).
    pub image_size: u64,
    /// sha256 of the decompressed image, lower-case hex.
    pub image_sha256: String,
    /// Number of chunks.
    pub chunks: u64,
    /// Name of the index member, which comes right after the signature member.
    pub index_name: String,
    /// Bytes of the index member.
    pub index_size: u64,
    /// sha256 of the index member, lower-case hex.
    pub index_sha256: String,
    /// Format 3 only: every chunk's zstd frame is compressed with the `history` image bytes
    /// right before the chunk (fewer at the image's start) as a raw-content prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Name of the third archive member.
    pub name: String,
    /// Size in bytes of the image member as stored (compressed if `compression` says so).
    pub size: u64,
    /// sha256 of the image member as stored, lower-case hex.
    pub sha256: String,
    pub compression: Compression,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    None,
    Gzip,
    Zstd,
    Xz,
    /// Format 2: one zstd frame per chunk.
    #[serde(rename = "zstd-chunks")]
    ZstdChunks,
}

/// The second member: signatures over the manifest's exact bytes. More than one lets a vendor
/// sign with the old and the new key while devices move from one to the other.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signatures {
    pub signatures: Vec<SignatureEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignatureEntry {
    /// Always `ed25519` in format 1.
    pub algorithm: String,
    /// [`crate::PublicKey::key_id`] of the signing key: a hint for messages, not trusted.
    pub key_id: String,
    /// Base64 of the 64-byte signature.
    pub signature: String,
}

impl Manifest {
    pub fn parse(bytes: &[u8]) -> Result<Manifest, BundleError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| BundleError::Manifest(e.to_string()))?;
        manifest.validate()?;
        Ok(manifest)
    }

    pub fn validate(&self) -> Result<(), BundleError> {
        let fail = |why: String| Err(BundleError::Manifest(why));
        if ![FORMAT_VERSION, FORMAT_CHUNKED, FORMAT_CHUNKED_CONTEXT].contains(&self.format) {
            return fail(format!(
                "format {} is not supported (this device reads formats {FORMAT_VERSION}, \
                 {FORMAT_CHUNKED} and {FORMAT_CHUNKED_CONTEXT})",
                self.format
            ));
        }
        if self.compatible.is_empty() {
            return fail("`compatible` is empty".into());
        }
        let name = &self.image.name;
        if !is_member_name(name) {
            return fail(format!(
                "image name {name:?} must be a plain file name of at most 100 bytes"
            ));
        }
        let hash = &self.image.sha256;
        if !is_sha256_hex(hash) {
            return fail(format!("image sha256 {hash:?} is not 64 hex digits"));
        }
        let chunked_image = self.image.compression == Compression::ZstdChunks;
        match (&self.chunked, self.format) {
            (None, FORMAT_VERSION) if !chunked_image => Ok(()),
            (Some(chunked), FORMAT_CHUNKED | FORMAT_CHUNKED_CONTEXT) if chunked_image => {
                chunked.validate(name, self.format)
            }
            _ => fail(format!(
                "format {} with compression {:?} and {} chunk index: format 2 or 3, \
                 compression zstd-chunks and a chunk index go together",
                self.format,
                self.image.compression,
                if self.chunked.is_some() { "a" } else { "no" }
            )),
        }
    }

    /// The exact bytes that are signed and stored as the first member.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        bytes.push(b'\n');
        bytes
    }
}

impl ChunkedInfo {
    fn validate(&self, image_name: &str, format: u32) -> Result<(), BundleError> {
        let fail = |why: String| Err(BundleError::Manifest(why));
        // First: a reader sizes the index and its records by this count.
        crate::chunked::check_chunk_count(self.chunks)?;
        if self.algorithm != crate::chunk::ALGORITHM {
            return fail(format!(
                "chunking algorithm {:?} is not supported (this device knows {:?})",
                self.algorithm,
                crate::chunk::ALGORITHM
            ));
        }
        self.chunker.validate().map_err(BundleError::Manifest)?;
        for (what, hash) in [("image", &self.image_sha256), ("index", &self.index_sha256)] {
            if !is_sha256_hex(hash) {
                return fail(format!("{what} sha256 {hash:?} is not 64 hex digits"));
            }
        }
        let name = &self.index_name;
        if !is_member_name(name) || name == image_name {
            return fail(format!(
                "index name {name:?} must be a plain file name of at most 100 bytes, not the image's"
            ));
        }
        let record = crate::chunked::record_len(format) as u64;
        let records = self.chunks.saturating_mul(record);
        // Format 3 stores its records zstd-compressed: any size up to the cap.
        let stored_ok = match format {
            FORMAT_CHUNKED => self.index_size == records,
            _ => self.index_size > 0,
        };
        if self.index_size > crate::chunked::MAX_INDEX_SIZE
            || records > crate::chunked::MAX_INDEX_SIZE
            || !stored_ok
        {
            return fail(format!(
                "index of {} bytes for {} chunks (records of {record} bytes, at most {} bytes)",
                self.index_size,
                self.chunks,
                crate::chunked::MAX_INDEX_SIZE
            ));
        }
        match (format, self.history) {
            (FORMAT_CHUNKED, None) => Ok(()),
            (FORMAT_CHUNKED_CONTEXT, Some(history)) if (1..=MAX_HISTORY).contains(&history) => {
                Ok(())
            }
            (format, history) => fail(format!(
                "format {format} with chunk history {history:?}: format 3 needs a history of \
                 1 to {MAX_HISTORY} bytes, format 2 has none"
            )),
        }
    }
}

fn is_sha256_hex(hash: &str) -> bool {
    hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit())
}

fn is_member_name(name: &str) -> bool {
    !(name.is_empty()
        || name.len() > 100
        || name.contains('/')
        || name == crate::MANIFEST_NAME
        || name == crate::SIGNATURE_NAME)
}

impl Signatures {
    pub fn parse(bytes: &[u8]) -> Result<Signatures, BundleError> {
        let parsed: Signatures =
            serde_json::from_slice(bytes).map_err(|e| BundleError::SignatureFile(e.to_string()))?;
        if parsed.signatures.is_empty() {
            return Err(BundleError::SignatureFile("it holds no signature".into()));
        }
        Ok(parsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            format: FORMAT_VERSION,
            compatible: "acme-gw".into(),
            version: "1.2.3".into(),
            image: ImageInfo {
                name: "rootfs.ext4.gz".into(),
                size: 10,
                sha256: "a".repeat(64),
                compression: Compression::Gzip,
            },
            chunked: None,
        }
    }

    #[test]
    fn manifest_round_trips() {
        let m = sample();
        assert_eq!(Manifest::parse(&m.to_bytes()).unwrap(), m);
    }

    #[test]
    fn nonsense_manifests_are_refused_with_the_reason() {
        let mut m = sample();
        m.format = 2;
        assert!(Manifest::parse(&m.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("format 2"));
        let mut m = sample();
        m.image.name = "../etc/passwd".into();
        assert!(Manifest::parse(&m.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("plain file name"));
        let mut m = sample();
        m.image.sha256 = "xyz".into();
        assert!(Manifest::parse(&m.to_bytes())
            .unwrap_err()
            .to_string()
            .contains("64 hex"));
        assert!(matches!(
            Manifest::parse(b"{not json"),
            Err(BundleError::Manifest(_))
        ));
    }

    fn chunked(format: u32, history: Option<u32>) -> Manifest {
        Manifest {
            format,
            image: ImageInfo {
                name: "rootfs.chunks".into(),
                compression: Compression::ZstdChunks,
                ..sample().image
            },
            chunked: Some(ChunkedInfo {
                algorithm: crate::chunk::ALGORITHM.into(),
                chunker: ChunkerParams::with_average(16384),
                image_size: 1 << 20,
                image_sha256: "b".repeat(64),
                chunks: 64,
                index_name: "chunks.idx".into(),
                index_size: if format == FORMAT_CHUNKED {
                    64 * 48
                } else {
                    900
                },
                index_sha256: "c".repeat(64),
                history,
            }),
            ..sample()
        }
    }

    #[test]
    fn formats_2_and_3_go_with_their_history_and_index() {
        let ok = chunked(FORMAT_CHUNKED, None);
        assert_eq!(Manifest::parse(&ok.to_bytes()).unwrap(), ok);
        let ok = chunked(FORMAT_CHUNKED_CONTEXT, Some(128 << 10));
        assert_eq!(Manifest::parse(&ok.to_bytes()).unwrap(), ok);
        for (format, history) in [
            (FORMAT_CHUNKED, Some(4096)),
            (FORMAT_CHUNKED_CONTEXT, None),
            (FORMAT_CHUNKED_CONTEXT, Some(0)),
            (FORMAT_CHUNKED_CONTEXT, Some(MAX_HISTORY + 1)),
        ] {
            let err = Manifest::parse(&chunked(format, history).to_bytes()).unwrap_err();
            assert!(
                err.to_string().contains("history"),
                "{format} {history:?}: {err}"
            );
        }
        // A format-3 index member larger than a device reads is refused.
        let mut big = chunked(FORMAT_CHUNKED_CONTEXT, Some(4096));
        big.chunked.as_mut().unwrap().index_size = crate::chunked::MAX_INDEX_SIZE + 1;
        let err = Manifest::parse(&big.to_bytes()).unwrap_err();
        assert!(err.to_string().contains("at most"), "{err}");
        // A later format is refused by its number.
        let mut later = chunked(FORMAT_CHUNKED_CONTEXT, Some(4096));
        later.format = 4;
        let err = Manifest::parse(&later.to_bytes()).unwrap_err();
        assert!(
            err.to_string().contains("format 4 is not supported"),
            "{err}"
        );
    }

    #[test]
    fn more_chunks_than_a_device_holds_are_refused_in_both_formats() {
        use crate::chunked::{ChunkIndex, TooManyChunks, MAX_CHUNKS};
        assert_eq!(MAX_CHUNKS, 699_050);
        for (format, history) in [(FORMAT_CHUNKED_CONTEXT, Some(4096)), (FORMAT_CHUNKED, None)] {
            let record = crate::chunked::record_len(format) as u64;
            let with_chunks = |chunks: u64| {
                let mut m = chunked(format, history);
                let info = m.chunked.as_mut().unwrap();
                info.chunks = chunks;
                info.image_size = chunks * 1024;
                if format == FORMAT_CHUNKED {
                    // Format 2's index size follows from the count; keep it consistent.
                    info.index_size = chunks * record;
                }
                m
            };
            // The limit itself is accepted.
            let at_limit = with_chunks(MAX_CHUNKS);
            assert_eq!(Manifest::parse(&at_limit.to_bytes()).unwrap(), at_limit);
            // One more is refused by name, count and limit (format 3's 24-byte records
            // would still fit the index's byte limit).
            let over = with_chunks(MAX_CHUNKS + 1);
            let err = Manifest::parse(&over.to_bytes()).unwrap_err();
            let expected = TooManyChunks {
                chunks: MAX_CHUNKS + 1,
                limit: MAX_CHUNKS,
            };
            assert!(
                matches!(&err, BundleError::TooManyChunks(e) if *e == expected),
                "format {format}: {err:?}"
            );
            assert_eq!(
                err.to_string(),
                "bundle manifest is invalid: it announces 699051 chunks, more than the \
                 699050 a device holds in memory"
            );
            // The index parser refuses the count before it sizes anything by it, even when
            // given chunk info that did not come through the manifest's checks.
            let info = over.chunked.as_ref().unwrap();
            let err = ChunkIndex::parse(&[], info, 0, format).unwrap_err();
            assert!(
                matches!(&err, BundleError::TooManyChunks(e) if *e == expected),
                "format {format}: {err:?}"
            );
        }
    }
}
