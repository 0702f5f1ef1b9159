//! The resume record: how far a download got, kept in `resume_path` so a restart or power cut
//! does not start over.
//!
//! What is resumable across a restart: **raw images** only. For them artifact byte N is slot
//! byte N, so the record holds one offset (always a durable checkpoint: the slot was
//! fdatasync'ed up to it before the record was written). A hasher cannot be serialised, so on
//! resume the slot's first N bytes are read and hashed again, and the download continues
//! with a Range request from N; the final hash check then covers the bytes already on the
//! slot too, so a corrupted prefix fails the install instead of being activated.
//!
//! **Delta installs of chunked bundles** (format `chunks`): the record names the signed image
//! (its sha256) and how far the slot holds it durably; a restart scans the seed again, re-hashes
//! the slot's prefix, and fetches or reuses only the chunks from the one that straddles that
//! offset on. The prefix is checked against the signed chunks as it is re-read (and the
//! straddling chunk's part once its signed bytes are known): a slot written behind the
//! agent's back makes that install start over from byte 0, once
//! ([`super::InstallError::ResumedPrefixMismatch`]).
//!
//! gzip, tar and tar.gz artifacts restart from the beginning after a restart: a deflate or
//! tar reader's state cannot be rebuilt from the slot. (Within one run they resume after
//! network faults like raw images: the decoder just waits for the next bytes.)

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::InstallError;

const VERSION: u32 = 1;

/// What was durably written for which artifact. Fields are added, never changed: a new field is
/// optional, and a reader ignores fields it does not know.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeRecord {
    pub version: u32,
    pub url: String,
    pub slot: PathBuf,
    pub algorithm: String,
    pub expected_hash: String,
    pub size: Option<u64>,
    /// "raw" (artifact byte N is slot byte N) or "chunks" (a delta install of a chunked
    /// bundle; see the module doc).
    pub format: String,
    /// Bytes of the artifact (as served) covered by the record.
    pub artifact_offset: u64,
    /// Bytes of the slot durably written; equal to `artifact_offset` for raw images.
    pub slot_offset: u64,
    /// "chunks": the signed sha256 of the whole image being written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_sha256: Option<String>,
}

impl ResumeRecord {
    pub fn raw(
        url: &str,
        slot: &Path,
        algorithm: &str,
        expected_hash: &str,
        size: Option<u64>,
        offset: u64,
    ) -> Self {
        ResumeRecord {
            version: VERSION,
            url: url.to_string(),
            slot: slot.to_path_buf(),
            algorithm: algorithm.to_string(),
            expected_hash: expected_hash.to_string(),
            size,
            format: "raw".into(),
            artifact_offset: offset,
            slot_offset: offset,
            image_sha256: None,
        }
    }

    /// A delta install of a chunked bundle whose image (signed sha256 `image_sha256`) is on the
    /// slot up to `slot_offset`.
    pub fn chunks(
        url: &str,
        slot: &Path,
        expected_hash: &str,
        size: Option<u64>,
        image_sha256: &str,
        slot_offset: u64,
    ) -> Self {
        ResumeRecord {
            version: VERSION,
            url: url.to_string(),
            slot: slot.to_path_buf(),
            algorithm: String::new(),
            expected_hash: expected_hash.to_string(),
            size,
            format: "chunks".into(),
            artifact_offset: 0,
            slot_offset,
            image_sha256: Some(image_sha256.to_string()),
        }
    }

    /// Where a delta install of the same bundle into the same slot continues: the slot
    /// offset up to which the image is durably written.
    pub fn chunks_offset(
        &self,
        slot: &Path,
        expected_hash: &str,
        image_sha256: &str,
        image_size: u64,
    ) -> Option<u64> {
        let same = self.version == VERSION
            && self.format == "chunks"
            && self.slot == slot
            && self.expected_hash == expected_hash
            && self.image_sha256.as_deref() == Some(image_sha256)
            && self.slot_offset <= image_size;
        same.then_some(self.slot_offset)
    }

    /// The offset to resume from when this record belongs to the same artifact and slot.
    /// The URL may differ (download links can carry expiring tokens); the hash names the
    /// artifact.
    pub fn resume_offset(
        &self,
        slot: &Path,
        algorithm: &str,
        expected_hash: &str,
        size: Option<u64>,
        capacity: u64,
    ) -> Option<u64> {
        let same = self.version == VERSION
            && self.format == "raw"
            && self.slot == slot
            && self.algorithm == algorithm
            && self.expected_hash == expected_hash
            && self.size == size
            && self.artifact_offset == self.slot_offset
            && self.slot_offset <= capacity
            && self.slot_offset <= size.unwrap_or(u64::MAX);
        same.then_some(self.slot_offset)
    }
}

/// The record at `path`, or None when there is none or it is unreadable (it is then only
/// a lost optimisation: the download starts over).
pub fn load(path: &Path) -> Option<ResumeRecord> {
    let text = fs::read_to_string(path).ok()?;
    match serde_json::from_str(&text) {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable resume record");
            None
        }
    }
}

fn state_error(path: &Path) -> impl FnOnce(io::Error) -> InstallError + '_ {
    move |source| InstallError::ResumeState {
        path: path.to_path_buf(),
        source,
    }
}

fn sync_parent(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)?.sync_all()
}

/// Replace the record atomically: temp file, fsync, rename, fsync dir.
pub fn save(path: &Path, record: &ResumeRecord) -> Result<(), InstallError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let text = serde_json::to_string(record).map_err(|e| state_error(path)(io::Error::other(e)))?;
    let mut file = File::create(&tmp).map_err(state_error(&tmp))?;
    file.write_all(text.as_bytes()).map_err(state_error(&tmp))?;
    file.sync_all().map_err(state_error(&tmp))?;
    drop(file);
    fs::rename(&tmp, path).map_err(state_error(path))?;
    sync_parent(path).map_err(state_error(path))
}

/// Remove the record (durably); no record is fine.
pub fn remove(path: &Path) -> Result<(), InstallError> {
    match fs::remove_file(path) {
        Ok(()) => sync_parent(path).map_err(state_error(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(state_error(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_matching() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resume.json");
        assert_eq!(load(&path), None);
        let slot = Path::new("/dev/slot-b");
        let r = ResumeRecord::raw("http://x/a", slot, "sha256", "ab", Some(100), 64);
        save(&path, &r).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back, r);
        assert_eq!(
            back.resume_offset(slot, "sha256", "ab", Some(100), 1000),
            Some(64)
        );
        assert_eq!(
            back.resume_offset(slot, "sha256", "cd", Some(100), 1000),
            None
        );
        assert_eq!(
            back.resume_offset(Path::new("/dev/a"), "sha256", "ab", Some(100), 1000),
            None
        );
        assert_eq!(
            back.resume_offset(slot, "sha256", "ab", Some(100), 10),
            None
        );
        remove(&path).unwrap();
        remove(&path).unwrap();
        assert_eq!(load(&path), None);
    }

    #[test]
    fn records_of_other_agent_versions_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("download.resume");
        let slot = Path::new("/dev/slot-b");
        // Written by an agent before delta installs (no image_sha256).
        fs::write(
            &path,
            r#"{"version":1,"url":"http://x/a","slot":"/dev/slot-b","algorithm":"sha256","expected_hash":"ab","size":100,"format":"raw","artifact_offset":64,"slot_offset":64}"#,
        )
        .unwrap();
        let old = load(&path).unwrap();
        assert_eq!(
            old.resume_offset(slot, "sha256", "ab", Some(100), 1000),
            Some(64)
        );
        assert_eq!(old.chunks_offset(slot, "ab", "cd", 1000), None);
        // Written by a later agent with a field this one does not know.
        fs::write(
            &path,
            r#"{"version":1,"url":"u","slot":"/dev/slot-b","algorithm":"","expected_hash":"ab","size":100,"format":"chunks","artifact_offset":0,"slot_offset":32,"image_sha256":"cd","future":[1]}"#,
        )
        .unwrap();
        let newer = load(&path).unwrap();
        assert_eq!(newer.chunks_offset(slot, "ab", "cd", 1000), Some(32));
        // A chunks record never resumes a raw download, and another image never resumes.
        assert_eq!(newer.resume_offset(slot, "", "ab", Some(100), 1000), None);
        assert_eq!(newer.chunks_offset(slot, "ab", "ef", 1000), None);
        assert_eq!(newer.chunks_offset(slot, "ab", "cd", 16), None);
    }

    #[test]
    fn garbage_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("resume.json");
        fs::write(&path, "{not json").unwrap();
        assert_eq!(load(&path), None);
    }
}
