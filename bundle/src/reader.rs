//! Streaming verification: the manifest and its signature are checked before the image is
//! handed out, and the image is counted and hashed while it is read.

use std::io::{self, Read};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::chunked::{ChunkIndex, MAX_INDEX_SIZE};
use crate::manifest::{Manifest, Signatures};
use crate::tar::{self, BLOCK};
use crate::{BundleError, PublicKey, MANIFEST_NAME, MAX_METADATA_SIZE, SIGNATURE_NAME};

/// What the device accepts.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Any one of these may have signed the manifest (several allow key rotation).
    pub trusted_keys: Vec<PublicKey>,
    /// The device's own compatible string; `None` accepts any.
    pub compatible: Option<String>,
    /// The most image bytes the target can take (the slot's capacity), checked before the image
    /// is read. Only meaningful for uncompressed images; the writer guards the decoded size.
    pub max_image_size: Option<u64>,
}

/// True when `prefix` (at least the first 512 bytes of an artifact) is a tar archive whose first
/// member is the bundle manifest. Used to tell bundles from plain images.
pub fn looks_like_bundle(prefix: &[u8]) -> bool {
    let Some(block) = prefix.get(..BLOCK) else {
        return false;
    };
    let block: &[u8; BLOCK] = block.try_into().expect("slice of BLOCK bytes");
    matches!(tar::parse_header(block), Ok(h) if h.name == MANIFEST_NAME)
}

/// The manifest of a bundle, read WITHOUT any verification: for display only.
pub fn read_manifest_unverified<R: Read>(mut reader: R) -> Result<Manifest, BundleError> {
    Manifest::parse(&read_metadata_member(
        &mut reader,
        MANIFEST_NAME,
        MAX_METADATA_SIZE,
    )?)
}

/// The signed manifest and the length of everything before the image member's data
/// (metadata members, index, the image's header), read from the first two members and
/// verified against `trusted_keys`: how much of a bundle a device fetches before its chunks.
/// Nothing the manifest says (such as the index size) is believed before the signature
/// checks out, so a hostile server cannot make the device fetch MiBs it never signed.
pub fn read_prefix_verified<R: Read>(
    mut reader: R,
    trusted_keys: &[PublicKey],
) -> Result<(Manifest, u64), BundleError> {
    if trusted_keys.is_empty() {
        return Err(BundleError::NoTrustedKeys);
    }
    let manifest_bytes = read_metadata_member(&mut reader, MANIFEST_NAME, MAX_METADATA_SIZE)?;
    let signature_bytes = read_metadata_member(&mut reader, SIGNATURE_NAME, MAX_METADATA_SIZE)?;
    verify_any(
        &manifest_bytes,
        &Signatures::parse(&signature_bytes)?,
        trusted_keys,
    )?;
    let manifest = Manifest::parse(&manifest_bytes)?;
    let len = prefix_len(&manifest, manifest_bytes.len(), signature_bytes.len());
    Ok((manifest, len))
}

/// What a bundle says about itself, read WITHOUT checking the signature: for tools that
/// display or compare bundles. The index is checked against the manifest.
#[derive(Debug, Clone)]
pub struct UnverifiedBundle {
    pub manifest: Manifest,
    /// Format 2: the chunk index.
    pub index: Option<ChunkIndex>,
    /// Offset of the image member's data in the bundle (chunk offsets count from it).
    pub data_offset: u64,
}

/// Reads a bundle up to the first byte of its image, see [`UnverifiedBundle`].
pub fn read_unverified<R: Read>(mut reader: R) -> Result<UnverifiedBundle, BundleError> {
    let manifest_bytes = read_metadata_member(&mut reader, MANIFEST_NAME, MAX_METADATA_SIZE)?;
    let manifest = Manifest::parse(&manifest_bytes)?;
    let signature_bytes = read_metadata_member(&mut reader, SIGNATURE_NAME, MAX_METADATA_SIZE)?;
    let index = read_index(&mut reader, &manifest)?;
    let data_offset = prefix_len(&manifest, manifest_bytes.len(), signature_bytes.len());
    Ok(UnverifiedBundle {
        manifest,
        index,
        data_offset,
    })
}

/// Bytes before the image member's data: the metadata members and the image's header.
fn prefix_len(manifest: &Manifest, manifest_len: usize, signature_len: usize) -> u64 {
    let index = manifest
        .chunked
        .as_ref()
        .map_or(0, |c| member_span(c.index_size));
    member_span(manifest_len as u64) + member_span(signature_len as u64) + index + BLOCK as u64
}

/// Bytes a metadata member of `size` bytes takes in the archive (header, data, padding).
fn member_span(size: u64) -> u64 {
    BLOCK as u64 + size + tar::padding(size)
}

/// The chunk index member of a chunked (format 2 or 3) bundle, checked against the manifest's size and
/// sha256 (which the caller has verified, or displays as unverified) and parsed.
fn read_index<R: Read>(
    reader: &mut R,
    manifest: &Manifest,
) -> Result<Option<ChunkIndex>, BundleError> {
    let Some(chunked) = &manifest.chunked else {
        return Ok(None);
    };
    let bytes = read_metadata_member(reader, &chunked.index_name, MAX_INDEX_SIZE)?;
    if bytes.len() as u64 != chunked.index_size {
        return Err(BundleError::IndexMismatch(format!(
            "chunk index member is {} bytes, the manifest says {}",
            bytes.len(),
            chunked.index_size
        )));
    }
    let actual = hex::encode(Sha256::digest(&bytes));
    if !actual.eq_ignore_ascii_case(&chunked.index_sha256) {
        return Err(BundleError::IndexMismatch(format!(
            "chunk index sha256 is {actual}, the signed manifest says {}",
            chunked.index_sha256
        )));
    }
    ChunkIndex::parse(&bytes, chunked, manifest.image.size, manifest.format).map(Some)
}

/// The image of a verified bundle, as a `Read`. Reading to the end checks the image's size and
/// sha256 against the signed manifest, and that nothing follows it; a mismatch is an
/// `InvalidData` error wrapping a [`BundleError`] (see [`BundleError::from_io`]).
pub struct BundleReader<R> {
    inner: R,
    manifest: Manifest,
    verified_by: String,
    remaining: u64,
    hasher: Sha256,
    /// False after [`BundleReader::continue_unhashed`]: the caller checks the image's sha256.
    hashing: bool,
    /// Format 2: the verified chunk index.
    index: Option<ChunkIndex>,
    /// Where the image member's data starts in the bundle.
    data_offset: u64,
    finished: bool,
    /// The end check's error, returned again by every later read: a caller that ignored it
    /// once must not see a clean end next.
    failed: Option<String>,
}

impl<R: Read> BundleReader<R> {
    /// Reads the manifest and signature members from `inner`, verifies them against `policy`,
    /// and stops at the first byte of the image.
    pub fn open(mut inner: R, policy: &Policy) -> Result<Self, BundleError> {
        if policy.trusted_keys.is_empty() {
            return Err(BundleError::NoTrustedKeys);
        }
        let manifest_bytes = read_metadata_member(&mut inner, MANIFEST_NAME, MAX_METADATA_SIZE)?;
        let signature_bytes = read_metadata_member(&mut inner, SIGNATURE_NAME, MAX_METADATA_SIZE)?;

        // Nothing in the manifest is believed before the signature checks out.
        let signatures = Signatures::parse(&signature_bytes)?;
        let verified_by = verify_any(&manifest_bytes, &signatures, &policy.trusted_keys)?;
        let manifest = Manifest::parse(&manifest_bytes)?;

        if let Some(device) = &policy.compatible {
            if &manifest.compatible != device {
                return Err(BundleError::Incompatible {
                    bundle: manifest.compatible.clone(),
                    device: device.clone(),
                });
            }
        }
        if let Some(limit) = policy.max_image_size {
            // The decoded size is known for raw and chunked images.
            let decoded = match (&manifest.chunked, manifest.image.compression) {
                (Some(chunked), _) => Some(chunked.image_size),
                (None, crate::Compression::None) => Some(manifest.image.size),
                _ => None,
            };
            if let Some(size) = decoded.filter(|&size| size > limit) {
                return Err(BundleError::ImageTooLarge { size, limit });
            }
        }
        let index = read_index(&mut inner, &manifest)?;
        let data_offset = prefix_len(&manifest, manifest_bytes.len(), signature_bytes.len());

        let header = tar::read_header(&mut inner)?.ok_or_else(|| {
            BundleError::Archive("the archive ends before the image member".into())
        })?;
        if header.name != manifest.image.name {
            return Err(BundleError::UnexpectedMember {
                expected: manifest.image.name.clone(),
                found: header.name,
            });
        }
        if header.size != manifest.image.size {
            return Err(BundleError::ImageSizeMismatch {
                manifest: manifest.image.size,
                actual: header.size,
            });
        }
        Ok(BundleReader {
            inner,
            remaining: manifest.image.size,
            manifest,
            verified_by,
            hasher: Sha256::new(),
            hashing: true,
            index,
            data_offset,
            finished: false,
            failed: None,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Format 2: the chunk index, verified through the signature.
    pub fn chunk_index(&self) -> Option<&ChunkIndex> {
        self.index.as_ref()
    }

    /// Format 2: the chunk index, moved out (no copy; [`Self::chunk_index`] is `None` after).
    pub fn take_chunk_index(&mut self) -> Option<ChunkIndex> {
        self.index.take()
    }

    /// Offset of the image member's first byte in the bundle (chunk offsets count from it).
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Key id of the trusted key whose signature verified.
    pub fn verified_by(&self) -> &str {
        &self.verified_by
    }

    /// Continue the image after its first `offset` bytes, which an earlier run read (the
    /// stream this reader was opened on goes on at the image's byte `offset`). The image's
    /// size, padding and the archive's end are still checked, its sha256 no longer: the caller
    /// must check the image against [`Self::image_sha256`] itself (with the hash state saved
    /// at `offset`) before it trusts a byte of it. Call before the first image byte is read.
    pub fn continue_unhashed(&mut self, offset: u64) -> Result<(), BundleError> {
        let size = self.manifest.image.size;
        if offset > size || self.remaining != size {
            return Err(BundleError::ImageSizeMismatch {
                manifest: size,
                actual: offset,
            });
        }
        self.remaining = size - offset;
        self.hashing = false;
        Ok(())
    }

    /// The signed sha256 (hex) of the image member's bytes.
    pub fn image_sha256(&self) -> &str {
        &self.manifest.image.sha256
    }

    /// [`Self::finish`], remembering a failure for every later read.
    fn check_end(&mut self) -> io::Result<()> {
        self.finish().map_err(|err| {
            self.failed = Some(err.to_string());
            err.into_io()
        })
    }

    /// Called once the image's last byte was read: hash, padding and trailer checks.
    fn finish(&mut self) -> Result<(), BundleError> {
        if self.hashing {
            let actual = hex::encode(self.hasher.clone().finalize());
            if !actual.eq_ignore_ascii_case(&self.manifest.image.sha256) {
                return Err(BundleError::ImageHashMismatch {
                    manifest: self.manifest.image.sha256.clone(),
                    actual,
                });
            }
        }
        let mut pad = vec![0u8; tar::padding(self.manifest.image.size) as usize];
        let got = tar::read_full(&mut self.inner, &mut pad)?;
        if got < pad.len() {
            // A stream cut inside the padding lost nothing signed; tolerate it like tar does.
            return Ok(());
        }
        match tar::read_header(&mut self.inner)? {
            None => Ok(()),
            Some(extra) => Err(BundleError::TrailingData(format!(
                "member {:?} follows the image",
                extra.name
            ))),
        }
    }
}

impl<R: Read> Read for BundleReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(err) = &self.failed {
            return Err(BundleError::Archive(format!("read again after: {err}")).into_io());
        }
        if self.remaining == 0 {
            if !self.finished {
                self.finished = true;
                self.check_end()?;
            }
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            return Err(BundleError::ImageSizeMismatch {
                manifest: self.manifest.image.size,
                actual: self.manifest.image.size - self.remaining,
            }
            .into_io());
        }
        if self.hashing {
            self.hasher.update(&buf[..n]);
        }
        self.remaining -= n as u64;
        if self.remaining == 0 {
            // Check at once, so the caller sees a bad image on the read that completes it
            // rather than only if it happens to read again.
            self.finished = true;
            self.check_end()?;
        }
        Ok(n)
    }
}

fn read_metadata_member<R: Read>(
    reader: &mut R,
    expected: &str,
    limit: u64,
) -> Result<Vec<u8>, BundleError> {
    let header = tar::read_header(reader)?.ok_or_else(|| {
        BundleError::NotABundle(format!("the archive is empty where {expected:?} must be"))
    })?;
    if header.name != expected {
        return Err(BundleError::UnexpectedMember {
            expected: expected.to_string(),
            found: header.name,
        });
    }
    if header.size > limit {
        return Err(BundleError::MemberTooLarge {
            name: header.name,
            size: header.size,
            limit,
        });
    }
    let padded = header.size + tar::padding(header.size);
    let mut bytes = vec![0u8; padded as usize];
    let got = tar::read_full(reader, &mut bytes)?;
    if got < bytes.len() {
        return Err(BundleError::Archive(format!(
            "the stream ends inside member {expected:?}"
        )));
    }
    bytes.truncate(header.size as usize);
    Ok(bytes)
}

fn verify_any(
    message: &[u8],
    signatures: &Signatures,
    trusted: &[PublicKey],
) -> Result<String, BundleError> {
    for entry in &signatures.signatures {
        if entry.algorithm != "ed25519" {
            continue;
        }
        let Ok(raw) = BASE64.decode(entry.signature.trim()) else {
            continue;
        };
        let Ok(raw) = <[u8; 64]>::try_from(raw.as_slice()) else {
            continue;
        };
        if let Some(key) = trusted.iter().find(|k| k.verify(message, &raw)) {
            return Ok(key.key_id());
        }
    }
    let signed_by: Vec<String> = signatures
        .signatures
        .iter()
        .map(|s| format!("{} ({})", s.key_id, s.algorithm))
        .collect();
    let trusted: Vec<String> = trusted.iter().map(PublicKey::key_id).collect();
    Err(BundleError::Untrusted {
        signed_by: signed_by.join(", "),
        trusted: trusted.join(", "),
    })
}
