//! Signed bundles in the install pipeline: [`open`] receives the artifact stream (already being
//! hashed against the server's hash) and returns the stream of the image to decode and write.
//!
//! A bundle (see `docs/bundle-format.md` and the `ddi-bundle` crate) is recognised by its first
//! tar header naming `manifest.json`. Its signature and `compatible` are checked here, before
//! the pipeline writes a byte; the image's size and sha256 are checked by the returned reader,
//! whose last read fails on a mismatch, so the slot is never activated with a bad image.
//! With `require_signature`, anything that is not a verifiable bundle is refused.

use std::io::{self, Cursor, Read};
use std::path::PathBuf;

use ddi_bundle::{looks_like_bundle, BundleError, BundleReader, ChunkIndex, Policy, PublicKey};

use super::InstallError;

/// The signature policy: the `[bundle]` table of the configuration, read straight into this.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BundlePolicy {
    /// Public keys accepted for bundle signatures.
    #[serde(default)]
    pub trusted_keys: Vec<PathBuf>,
    /// Refuse artifacts that are not signed bundles.
    #[serde(default)]
    pub require_signature: bool,
    /// The `compatible` string a bundle must name.
    pub compatible: Option<String>,
}

impl BundlePolicy {
    /// The policy for an install request: `None` (plain images only) when no key is trusted
    /// and no signature is required.
    pub fn for_install(&self) -> Option<BundlePolicy> {
        (self.require_signature || !self.trusted_keys.is_empty()).then(|| self.clone())
    }

    /// What `policy` accepts (its settings and the keys' contents), hashed; 0 for none: an
    /// image checked under one policy is activated later only under the same.
    pub fn fingerprint(policy: Option<&BundlePolicy>) -> u64 {
        use std::os::unix::ffi::OsStrExt;
        let Some(p) = policy else { return 0 };
        // The resumable sha256 the pipeline has anyway (a second sha256 API costs binary).
        let mut hash = super::sha256_state::Sha256State::new();
        let mut field = |bytes: &[u8]| {
            hash.update(&(bytes.len() as u64).to_le_bytes());
            hash.update(bytes);
        };
        field(&[
            u8::from(p.require_signature),
            u8::from(p.compatible.is_some()),
        ]);
        field(p.compatible.as_deref().unwrap_or_default().as_bytes());
        for key in &p.trusted_keys {
            field(key.as_os_str().as_bytes());
            // A key that cannot be read verifies nothing: as good as an empty one.
            field(&std::fs::read(key).unwrap_or_default());
        }
        let digest = hash.finish();
        u64::from_le_bytes(digest[..8].try_into().expect("8 bytes")) | 1
    }

    /// The bundle reader's policy: the trusted keys loaded, images larger than
    /// `slot_capacity` refused.
    pub fn verifier(&self, slot_capacity: u64) -> Result<Policy, InstallError> {
        let trusted_keys = self
            .trusted_keys
            .iter()
            .map(|path| PublicKey::load(path))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| InstallError::Signature(e.to_string()))?;
        Ok(Policy {
            trusted_keys,
            compatible: self.compatible.clone(),
            max_image_size: Some(slot_capacity),
        })
    }
}

/// Bytes read ahead to recognise a bundle: one tar header.
const HEADER_LEN: usize = 512;

/// Wrap the artifact stream; what comes out is what gets decoded and written. An uncompressed
/// bundle image larger than `slot_capacity` is refused before its first byte is read.
pub fn open<'a>(
    policy: &BundlePolicy,
    artifact: Box<dyn Read + 'a>,
    slot_capacity: u64,
) -> Result<Box<dyn Read + 'a>, InstallError> {
    open_image(policy, artifact, slot_capacity).map(|opened| opened.reader)
}

/// The image stream of an artifact, and for a chunked (format 2 or 3) bundle its verified chunk index.
pub struct Opened<'a> {
    pub reader: Box<dyn Read + 'a>,
    pub chunked: Option<SignedChunks>,
    /// A bundle: where its image member's data starts in the artifact (None: the artifact
    /// is passed through as it is).
    pub data_offset: Option<u64>,
}

/// What the signature vouches for in a chunked (format 2 or 3) bundle.
#[derive(Debug, Clone)]
pub struct SignedChunks {
    pub index: ChunkIndex,
    /// sha256 of the decompressed image.
    pub image_sha256: String,
    /// Format 3: image bytes before each chunk its frame is compressed with (0: format 2).
    pub history: u32,
}

/// [`open`], also handing out the chunk index of a chunked bundle.
pub fn open_image<'a>(
    policy: &BundlePolicy,
    mut artifact: Box<dyn Read + 'a>,
    slot_capacity: u64,
) -> Result<Opened<'a>, InstallError> {
    let mut head = vec![0u8; HEADER_LEN];
    let got = bootctl::fsutil::read_full(&mut artifact, &mut head)
        .map_err(|e| InstallError::Signature(format!("reading the artifact's first bytes: {e}")))?;
    head.truncate(got);
    let is_bundle = looks_like_bundle(&head);
    let stream = Cursor::new(head).chain(artifact);

    if !is_bundle {
        if policy.require_signature {
            return Err(InstallError::Signature(
                "the artifact is not a signed bundle (its first member is not manifest.json), \
                 and require_signature is on"
                    .into(),
            ));
        }
        return Ok(Opened {
            reader: Box::new(stream),
            chunked: None,
            data_offset: None,
        });
    }

    let mut reader = BundleReader::open(stream, &policy.verifier(slot_capacity)?)
        .map_err(|e| bundle_error(&e))?;
    tracing::info!(
        version = %reader.manifest().version,
        key = %reader.verified_by(),
        "bundle signature verified; streaming its image"
    );
    // Moved out of the reader (which does not need it to stream the image), not copied.
    let chunked = match (reader.take_chunk_index(), &reader.manifest().chunked) {
        (Some(index), Some(info)) => Some(SignedChunks {
            index,
            image_sha256: info.image_sha256.clone(),
            history: info.history.unwrap_or(0),
        }),
        _ => None,
    };
    let data_offset = Some(reader.data_offset());
    Ok(Opened {
        reader: Box::new(reader),
        chunked,
        data_offset,
    })
}

/// A bundle's error as an install reports it: a manifest that breaks the format's rules is
/// [`InstallError::Bundle`] (its signature may well be fine), anything else a
/// [`InstallError::Signature`] (trust, tampering, a member that is not the signed one).
pub fn bundle_error(err: &BundleError) -> InstallError {
    match err {
        BundleError::Manifest(why) => InstallError::Bundle(why.clone()),
        BundleError::TooManyChunks(too_many) => InstallError::Bundle(too_many.to_string()),
        other => InstallError::Signature(other.to_string()),
    }
}

/// The bundle error carried by an I/O error from a bundle's image stream (wrong size or
/// hash at the end of the image), so callers can report it as what it is.
pub fn bundle_error_in(err: &io::Error) -> Option<InstallError> {
    BundleError::from_io(err).map(bundle_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ddi_bundle::{create_bundle, generate_keypair, CreateOptions, SecretKey};

    struct Keys {
        dir: tempfile::TempDir,
        vendor: SecretKey,
    }

    impl Keys {
        fn new() -> Keys {
            let dir = tempfile::tempdir().unwrap();
            let vendor = generate_keypair().unwrap();
            std::fs::write(dir.path().join("vendor.pub"), vendor.public_key().to_text()).unwrap();
            Keys { dir, vendor }
        }

        fn policy(&self) -> BundlePolicy {
            BundlePolicy {
                trusted_keys: vec![self.dir.path().join("vendor.pub")],
                require_signature: true,
                compatible: Some("acme-gw".into()),
            }
        }

        fn bundle(&self, image: &[u8], compatible: &str) -> Vec<u8> {
            let path = self.dir.path().join("image.bin");
            std::fs::write(&path, image).unwrap();
            let mut out = Vec::new();
            create_bundle(
                &path,
                &CreateOptions {
                    compatible: compatible.into(),
                    version: "1".into(),
                    image_name: None,
                    compression: None,
                    keys: std::slice::from_ref(&self.vendor),
                },
                &mut out,
            )
            .unwrap();
            out
        }
    }

    fn read_all(policy: &BundlePolicy, artifact: Vec<u8>) -> Result<Vec<u8>, InstallError> {
        let mut reader = open(policy, Box::new(Cursor::new(artifact)), u64::MAX)?;
        let mut out = Vec::new();
        reader
            .read_to_end(&mut out)
            .map_err(|e| bundle_error_in(&e).unwrap_or(InstallError::Internal(e.to_string())))?;
        Ok(out)
    }

    #[test]
    fn a_signed_bundle_yields_its_image() {
        let keys = Keys::new();
        let image = vec![7u8; 3000];
        let out = read_all(&keys.policy(), keys.bundle(&image, "acme-gw")).unwrap();
        assert_eq!(out, image);
    }

    #[test]
    fn unsigned_images_pass_only_when_signatures_are_optional() {
        let keys = Keys::new();
        let image = vec![1u8; 100];
        let err = read_all(&keys.policy(), image.clone()).unwrap_err();
        assert!(err.to_string().contains("not a signed bundle"), "{err}");
        let optional = BundlePolicy {
            require_signature: false,
            ..keys.policy()
        };
        assert_eq!(read_all(&optional, image.clone()).unwrap(), image);
    }

    #[test]
    fn a_bundle_is_verified_even_when_signatures_are_optional() {
        let keys = Keys::new();
        let optional = BundlePolicy {
            require_signature: false,
            ..keys.policy()
        };
        let err = read_all(&optional, keys.bundle(&[1u8; 10], "other-board")).unwrap_err();
        assert!(err.to_string().contains("other-board"), "{err}");
    }

    #[test]
    fn a_tampered_image_is_a_signature_error_at_the_end() {
        let keys = Keys::new();
        let mut bundle = keys.bundle(&[5u8; 2000], "acme-gw");
        // Image data starts after three 512-byte headers and two padded metadata members;
        // flip a byte near the end of the archive's image data instead of computing offsets.
        let at = bundle.len() - 1024 - 512 - 10;
        bundle[at] ^= 1;
        let err = read_all(&keys.policy(), bundle).unwrap_err();
        assert!(matches!(err, InstallError::Signature(_)), "{err}");
        assert!(err.to_string().contains("sha256"), "{err}");
    }

    #[test]
    fn an_image_larger_than_the_slot_is_refused_before_it_is_read() {
        let keys = Keys::new();
        let bundle = keys.bundle(&[3u8; 5000], "acme-gw");
        let err = open(&keys.policy(), Box::new(Cursor::new(bundle)), 4096)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("more than the 4096 bytes"),
            "{err}"
        );
    }

    /// A tar archive of the manifest `manifest` and its signature by `key`: correctly signed,
    /// whatever the manifest says.
    fn signed_metadata(manifest: &[u8], key: &SecretKey) -> Vec<u8> {
        let signatures = ddi_bundle::Signatures {
            signatures: vec![key.signature_entry(manifest)],
        };
        let signatures = serde_json::to_vec(&signatures).unwrap();
        crate::install::tests::tar_of(&[
            (ddi_bundle::MANIFEST_NAME, manifest),
            (ddi_bundle::SIGNATURE_NAME, &signatures),
        ])
    }

    #[test]
    fn a_signed_manifest_that_breaks_the_rules_is_a_bundle_error_not_a_signature_error() {
        let keys = Keys::new();
        let mut manifest = read_manifest(&keys.bundle(&[9u8; 100], "acme-gw"));
        // A chunked manifest whose chunk table does not add up: 3 chunks in 100 index bytes
        // (format 2 records are 48 bytes each).
        manifest.format = ddi_bundle::FORMAT_CHUNKED;
        manifest.image.compression = ddi_bundle::Compression::ZstdChunks;
        manifest.chunked = Some(ddi_bundle::ChunkedInfo {
            algorithm: "fastcdc-ddi-1".into(),
            chunker: ddi_bundle::ChunkerParams::with_average(4096),
            image_size: 100,
            image_sha256: "d".repeat(64),
            chunks: 3,
            index_name: "chunks.idx".into(),
            index_size: 100,
            index_sha256: "e".repeat(64),
            history: None,
        });
        let bundle = signed_metadata(&manifest.to_bytes(), &keys.vendor);
        let err = open(&keys.policy(), Box::new(Cursor::new(bundle)), u64::MAX)
            .err()
            .unwrap();
        assert!(matches!(err, InstallError::Bundle(_)), "{err:?}");
        let text = err.to_string();
        assert!(
            text.starts_with("bundle manifest is invalid: index of 100 bytes for 3 chunks"),
            "{text}"
        );
        assert!(!text.contains("signature"), "{text}");

        // The same manifest signed by a key the device does not trust is a signature error.
        let stranger = generate_keypair().unwrap();
        let bundle = signed_metadata(&manifest.to_bytes(), &stranger);
        let err = open(&keys.policy(), Box::new(Cursor::new(bundle)), u64::MAX)
            .err()
            .unwrap();
        assert!(matches!(err, InstallError::Signature(_)), "{err:?}");
        assert!(err.to_string().starts_with("signature: "), "{err}");
    }

    fn read_manifest(bundle: &[u8]) -> ddi_bundle::Manifest {
        ddi_bundle::read_manifest_unverified(bundle).unwrap()
    }

    #[test]
    fn a_missing_key_file_is_named() {
        let keys = Keys::new();
        let policy = BundlePolicy {
            trusted_keys: vec![keys.dir.path().join("missing.pub")],
            ..keys.policy()
        };
        let err = read_all(&policy, keys.bundle(&[1u8; 10], "acme-gw")).unwrap_err();
        assert!(err.to_string().contains("missing.pub"), "{err}");
    }
}
