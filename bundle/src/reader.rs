//! Streaming verification: the manifest and its signature are checked before the image is
//! handed out, and the image is counted and hashed while it is read.

use std::io::{self, Read};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha2::{Digest, Sha256};

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
    Manifest::parse(&read_metadata_member(&mut reader, MANIFEST_NAME)?)
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
        let manifest_bytes = read_metadata_member(&mut inner, MANIFEST_NAME)?;
        let signature_bytes = read_metadata_member(&mut inner, SIGNATURE_NAME)?;

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
            if manifest.image.compression == crate::Compression::None && manifest.image.size > limit
            {
                return Err(BundleError::ImageTooLarge {
                    size: manifest.image.size,
                    limit,
                });
            }
        }

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
            finished: false,
            failed: None,
        })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// Key id of the trusted key whose signature verified.
    pub fn verified_by(&self) -> &str {
        &self.verified_by
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
        let actual = hex::encode(self.hasher.clone().finalize());
        if !actual.eq_ignore_ascii_case(&self.manifest.image.sha256) {
            return Err(BundleError::ImageHashMismatch {
                manifest: self.manifest.image.sha256.clone(),
                actual,
            });
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
        self.hasher.update(&buf[..n]);
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

fn read_metadata_member<R: Read>(reader: &mut R, expected: &str) -> Result<Vec<u8>, BundleError> {
    let header = tar::read_header(reader)?.ok_or_else(|| {
        BundleError::NotABundle(format!("the archive is empty where {expected:?} must be"))
    })?;
    if header.name != expected {
        return Err(BundleError::UnexpectedMember {
            expected: expected.to_string(),
            found: header.name,
        });
    }
    if header.size > MAX_METADATA_SIZE {
        return Err(BundleError::MemberTooLarge {
            name: header.name,
            size: header.size,
            limit: MAX_METADATA_SIZE,
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
