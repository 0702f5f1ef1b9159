//! Hashing of the artifact as served (sha256 when offered, else sha1, else md5) and a `Read`
//! adapter that hashes and counts every byte passing through it.

use std::io::{self, Read};

use md5::Md5;
use sha1::Sha1;
use sha2::{Digest, Sha256};

use super::sha256_state::Sha256State;
use super::{ExpectedHash, InstallError};

/// The hash algorithm chosen from what the server offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashAlgorithm {
    Sha256,
    Sha1,
    Md5,
}

impl HashAlgorithm {
    pub fn name(self) -> &'static str {
        match self {
            HashAlgorithm::Sha256 => "sha256",
            HashAlgorithm::Sha1 => "sha1",
            HashAlgorithm::Md5 => "md5",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            HashAlgorithm::Sha256 => 64,
            HashAlgorithm::Sha1 => 40,
            HashAlgorithm::Md5 => 32,
        }
    }
}

/// The strongest offered hash, normalised to lower-case hex and checked for shape.
pub fn choose(expected: &ExpectedHash) -> Result<(HashAlgorithm, String), InstallError> {
    let (algorithm, value) = if let Some(v) = &expected.sha256 {
        (HashAlgorithm::Sha256, v)
    } else if let Some(v) = &expected.sha1 {
        (HashAlgorithm::Sha1, v)
    } else if let Some(v) = &expected.md5 {
        (HashAlgorithm::Md5, v)
    } else {
        return Err(InstallError::InvalidRequest(
            "the artifact has no sha256, sha1 or md5 hash".into(),
        ));
    };
    let value = value.trim().to_ascii_lowercase();
    if value.len() != algorithm.hex_len() || !value.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(InstallError::InvalidRequest(format!(
            "{} {value:?} is not {} hex digits",
            algorithm.name(),
            algorithm.hex_len()
        )));
    }
    Ok((algorithm, value))
}

/// A running hash of one of the supported algorithms.
#[derive(Clone)]
pub enum Hasher {
    Sha256(Sha256),
    Sha1(Sha1),
    Md5(Md5),
    /// sha256 whose state others can read while it hashes (a signed bundle's resume records
    /// keep the artifact's state, see `pipeline::decode_bundle_image`).
    SharedSha256(SharedSha256),
}

/// A sha256 state shared between the reader that hashes and whoever saves it.
pub type SharedSha256 = std::sync::Arc<std::sync::Mutex<Sha256State>>;

impl Hasher {
    pub fn new(algorithm: HashAlgorithm) -> Self {
        match algorithm {
            HashAlgorithm::Sha256 => Hasher::Sha256(Sha256::new()),
            HashAlgorithm::Sha1 => Hasher::Sha1(Sha1::new()),
            HashAlgorithm::Md5 => Hasher::Md5(Md5::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha1(h) => h.update(data),
            Hasher::Md5(h) => h.update(data),
            Hasher::SharedSha256(h) => lock(h).update(data),
        }
    }

    pub fn finish_hex(self) -> String {
        match self {
            Hasher::Sha256(h) => hex::encode(h.finalize()),
            Hasher::Sha1(h) => hex::encode(h.finalize()),
            Hasher::Md5(h) => hex::encode(h.finalize()),
            Hasher::SharedSha256(h) => lock(&h).finish_hex(),
        }
    }
}

/// The state behind a [`SharedSha256`] (a panic elsewhere does not make it wrong: it is only
/// ever updated whole).
pub fn lock(shared: &SharedSha256) -> std::sync::MutexGuard<'_, Sha256State> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

/// Hashes and counts the bytes read through it: the artifact bytes exactly as served.
pub struct HashingReader<R> {
    inner: R,
    hasher: Hasher,
    count: u64,
}

impl<R: Read> HashingReader<R> {
    /// `hasher` and `count` may already cover a prefix (resume).
    pub fn new(inner: R, hasher: Hasher, count: u64) -> Self {
        HashingReader {
            inner,
            hasher,
            count,
        }
    }

    /// Artifact bytes read so far.
    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn into_hex(self) -> String {
        self.hasher.finish_hex()
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_sha256_then_sha1_then_md5() {
        let mut e = ExpectedHash {
            sha256: None,
            sha1: Some("A".repeat(40)),
            md5: Some("b".repeat(32)),
        };
        assert_eq!(choose(&e).unwrap(), (HashAlgorithm::Sha1, "a".repeat(40)));
        e.sha256 = Some("c".repeat(64));
        assert_eq!(choose(&e).unwrap().0, HashAlgorithm::Sha256);
        e.sha256 = None;
        e.sha1 = None;
        assert_eq!(choose(&e).unwrap().0, HashAlgorithm::Md5);
        e.md5 = None;
        assert!(matches!(choose(&e), Err(InstallError::InvalidRequest(_))));
    }

    #[test]
    fn rejects_malformed_hash() {
        let e = ExpectedHash {
            sha256: Some("xyz".into()),
            sha1: None,
            md5: None,
        };
        assert!(matches!(choose(&e), Err(InstallError::InvalidRequest(_))));
    }

    #[test]
    fn hashing_reader_hashes_what_passes() {
        let mut r = HashingReader::new(&b"abc"[..], Hasher::new(HashAlgorithm::Md5), 0);
        io::copy(&mut r, &mut io::sink()).unwrap();
        assert_eq!(r.count(), 3);
        assert_eq!(r.into_hex(), "900150983cd24fb0d6963f7d28e17f72");
    }
}
