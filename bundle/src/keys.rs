//! ed25519 key files: generation, parsing and the short key id shown in errors.
//!
//! Key files are one line of text so that they diff, copy and paste well:
//! `ddi-ed25519-public <base64 of 32 bytes>` and `ddi-ed25519-secret <base64 of the 32-byte seed>`.

use std::fmt;
use std::io::Read;
use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use ed25519_dalek::{Signature, SigningKey, Verifier, VerifyingKey};
use sha2::{Digest, Sha256};

const PUBLIC_TAG: &str = "ddi-ed25519-public";
const SECRET_TAG: &str = "ddi-ed25519-secret";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    // The cause is in the message, not a `source` too (else `{:#}` says it twice).
    #[error("cannot read key file {path}: {error}")]
    Read { path: String, error: std::io::Error },
    #[error("cannot write key file {path}: {error}")]
    Write { path: String, error: std::io::Error },
    #[error("{what}: expected a line `{tag} <base64 of 32 bytes>`")]
    Format { what: String, tag: &'static str },
    #[error("{what}: not a valid ed25519 public key")]
    InvalidPublicKey { what: String },
    #[error("cannot get random bytes for a new key: {0}")]
    Random(std::io::Error),
}

/// A key the device trusts. Cheap to clone and compare.
#[derive(Clone, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

/// A vendor's signing key. Never logged: its `Debug` shows only the key id.
pub struct SecretKey(SigningKey);

impl PublicKey {
    /// Parses the one-line text form; `what` names the source in errors (a path, a config key).
    pub fn parse(text: &str, what: &str) -> Result<Self, KeyError> {
        let bytes = parse_tagged(text, PUBLIC_TAG, what)?;
        VerifyingKey::from_bytes(&bytes)
            .map(PublicKey)
            .map_err(|_| KeyError::InvalidPublicKey {
                what: what.to_string(),
            })
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read_small(path)?;
        Self::parse(&text, &path.display().to_string())
    }

    /// The first 8 bytes of the sha256 of the key, in hex: enough to tell keys apart in a
    /// message, never enough to matter for security.
    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.0.as_bytes())[..8])
    }

    pub fn to_text(&self) -> String {
        format!("{PUBLIC_TAG} {}\n", BASE64.encode(self.0.as_bytes()))
    }

    pub(crate) fn verify(&self, message: &[u8], signature: &[u8; 64]) -> bool {
        self.0
            .verify(message, &Signature::from_bytes(signature))
            .is_ok()
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

impl SecretKey {
    pub fn parse(text: &str, what: &str) -> Result<Self, KeyError> {
        let seed = parse_tagged(text, SECRET_TAG, what)?;
        Ok(SecretKey(SigningKey::from_bytes(&seed)))
    }

    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = read_small(path)?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    pub fn to_text(&self) -> String {
        format!("{SECRET_TAG} {}\n", BASE64.encode(self.0.to_bytes()))
    }

    #[cfg(feature = "create")]
    pub(crate) fn sign(&self, message: &[u8]) -> [u8; 64] {
        ed25519_dalek::Signer::sign(&self.0, message).to_bytes()
    }

    /// The entry of the signature member that signs `manifest` (its exact bytes) with this
    /// key.
    #[cfg(feature = "create")]
    pub fn signature_entry(&self, manifest: &[u8]) -> crate::SignatureEntry {
        crate::SignatureEntry {
            algorithm: "ed25519".into(),
            key_id: self.public_key().key_id(),
            signature: BASE64.encode(self.sign(manifest)),
        }
    }
}

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SecretKey(for {})", self.public_key().key_id())
    }
}

/// A new key pair from the kernel's random source.
pub fn generate_keypair() -> Result<SecretKey, KeyError> {
    let mut seed = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(KeyError::Random)?;
    Ok(SecretKey(SigningKey::from_bytes(&seed)))
}

fn parse_tagged(text: &str, tag: &'static str, what: &str) -> Result<[u8; 32], KeyError> {
    let format_error = || KeyError::Format {
        what: what.to_string(),
        tag,
    };
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .ok_or_else(format_error)?;
    let encoded = line
        .strip_prefix(tag)
        .map(str::trim)
        .ok_or_else(format_error)?;
    let bytes = BASE64.decode(encoded).map_err(|_| format_error())?;
    bytes.try_into().map_err(|_| format_error())
}

fn read_small(path: &Path) -> Result<String, KeyError> {
    let read_error = |error| KeyError::Read {
        path: path.display().to_string(),
        error,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read_error)?
        .take(4096)
        .read_to_string(&mut text)
        .map_err(read_error)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip_through_their_text_form() {
        let secret = generate_keypair().unwrap();
        let again = SecretKey::parse(&secret.to_text(), "test").unwrap();
        assert_eq!(secret.public_key(), again.public_key());
        let public = PublicKey::parse(&secret.public_key().to_text(), "test").unwrap();
        assert_eq!(public, secret.public_key());
        assert_eq!(public.key_id().len(), 16);
    }

    #[test]
    fn a_secret_key_is_not_accepted_as_public_and_errors_name_the_source() {
        let secret = generate_keypair().unwrap();
        let err = PublicKey::parse(&secret.to_text(), "keys/vendor.pub").unwrap_err();
        let message = err.to_string();
        assert!(message.contains("keys/vendor.pub"), "{message}");
        assert!(message.contains(PUBLIC_TAG), "{message}");
    }

    #[test]
    fn debug_output_never_shows_secret_material() {
        let secret = generate_keypair().unwrap();
        let text = secret.to_text();
        let encoded = text.split_whitespace().nth(1).unwrap();
        assert!(!format!("{secret:?}").contains(encoded));
    }
}
