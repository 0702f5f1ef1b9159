//! The manifest (what the image is) and the signature member (who vouches for it).

use serde::{Deserialize, Serialize};

use crate::BundleError;

/// The only manifest format this code reads and writes. A device refuses other numbers rather
/// than guess what a newer vendor tool meant.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// Which devices may install this bundle; compared for equality with the device's own.
    pub compatible: String,
    pub version: String,
    pub image: ImageInfo,
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
        if self.format != FORMAT_VERSION {
            return fail(format!(
                "format {} is not supported (this device reads format {FORMAT_VERSION})",
                self.format
            ));
        }
        if self.compatible.is_empty() {
            return fail("`compatible` is empty".into());
        }
        let name = &self.image.name;
        if name.is_empty()
            || name.len() > 100
            || name.contains('/')
            || name == crate::MANIFEST_NAME
            || name == crate::SIGNATURE_NAME
        {
            return fail(format!(
                "image name {name:?} must be a plain file name of at most 100 bytes"
            ));
        }
        let hash = &self.image.sha256;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return fail(format!("image sha256 {hash:?} is not 64 hex digits"));
        }
        Ok(())
    }

    /// The exact bytes that are signed and stored as the first member.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest always serializes");
        bytes.push(b'\n');
        bytes
    }
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
}
