//! Signed format-1 bundles for the integration tests: a vendor key pair a device trusts (its
//! public key in a temporary directory, named by the `[bundle]` config [`Vendor::config`]
//! writes) and the bundles it signs.

use std::path::Path;

use ddi_bundle::{create_bundle, generate_keypair, CreateOptions, SecretKey};

/// The `[bundle]` section of an agent config trusting the public key file `public`.
pub fn bundle_config(public: &Path, require_signature: bool, compatible: &str) -> String {
    format!(
        "[bundle]\ntrusted_keys = [{:?}]\nrequire_signature = {require_signature}\ncompatible = {compatible:?}\n",
        public.display().to_string()
    )
}

/// A format-1 bundle (version 2.0) for `compatible` signed by `key`, its image `content`
/// written as the file `name` in `dir` first and taken as it is (`compression: None`: a `.gz`
/// file is the image member as given).
pub fn signed_bundle(
    dir: &Path,
    name: &str,
    content: &[u8],
    compatible: &str,
    key: &SecretKey,
) -> Vec<u8> {
    let path = dir.join(name);
    std::fs::write(&path, content).expect("write the bundle's image file");
    let mut out = Vec::new();
    create_bundle(
        &path,
        &CreateOptions {
            compatible: compatible.into(),
            version: "2.0".into(),
            image_name: None,
            compression: None,
            keys: std::slice::from_ref(key),
        },
        &mut out,
    )
    .expect("create the bundle");
    out
}

/// Offset of the image member's data in a format-1 bundle: its third tar member, after
/// `manifest.json` and the signature (what a `member_offset` of a resume record names).
pub fn image_offset(bundle: &[u8]) -> usize {
    crate::device::tar_member_ranges(bundle)[2].start
}

/// A vendor key pair, its public key in a temporary directory (which also takes the image
/// files of the bundles it signs).
pub struct Vendor {
    pub key: SecretKey,
    dir: tempfile::TempDir,
}

impl Vendor {
    pub fn new() -> Vendor {
        let dir = tempfile::tempdir().expect("temporary directory");
        let key = generate_keypair().expect("ed25519 key pair");
        std::fs::write(dir.path().join("vendor.pub"), key.public_key().to_text())
            .expect("write the public key");
        Vendor { key, dir }
    }

    /// The `[bundle]` config trusting this key (see [`bundle_config`]).
    pub fn config(&self, require_signature: bool, compatible: &str) -> String {
        bundle_config(
            &self.dir.path().join("vendor.pub"),
            require_signature,
            compatible,
        )
    }

    /// A bundle of `content` (as the file `name`) signed by this key (see [`signed_bundle`]).
    pub fn bundle(&self, name: &str, content: &[u8], compatible: &str) -> Vec<u8> {
        signed_bundle(self.dir.path(), name, content, compatible, &self.key)
    }
}

impl Default for Vendor {
    fn default() -> Vendor {
        Vendor::new()
    }
}
