//! Durable agent state in `state_dir`: the state file (phase, last result, feedback outbox) and
//! the consent decision, written atomically (temp file, fsync, rename, fsync of the folder) so a
//! power cut leaves either the old or the new version, never a mix.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::machine::State;

/// File name of the state inside `state_dir`.
pub const STATE_FILE: &str = "state.json";
/// File name of a pending consent decision inside `state_dir`.
pub const CONSENT_FILE: &str = "consent.json";

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: unreadable state ({message}); move it away to start over (owed feedback in it would be lost)")]
    Corrupt { path: PathBuf, message: String },
}

fn io<'a>(path: &'a Path, op: &'static str) -> impl FnOnce(std::io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        path: path.to_path_buf(),
        op,
        source,
    }
}

/// A user's answer to a consent request, picked up by the next cycle.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConsentDecision {
    pub action_id: String,
    pub accept: bool,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens `dir`, creating it with mode 0700 when missing.
    pub fn open(dir: &Path) -> Result<Store, PersistError> {
        if !dir.is_dir() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io(dir, "create state_dir"))?;
            // The umask may have narrowed more than asked; set exactly 0700.
            fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
                .map_err(io(dir, "chmod state_dir"))?;
        }
        Ok(Store {
            dir: dir.to_path_buf(),
        })
    }

    /// Opens an existing directory read-only (for `status`): no creation.
    pub fn at(dir: &Path) -> Store {
        Store {
            dir: dir.to_path_buf(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The saved state; a missing file is a fresh agent.
    pub fn load(&self) -> Result<State, PersistError> {
        let path = self.path(STATE_FILE);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| PersistError::Corrupt {
                path,
                message: e.to_string(),
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(io(&path, "read")(e)),
        }
    }

    pub fn save(&self, state: &State) -> Result<(), PersistError> {
        let bytes = serde_json::to_vec_pretty(state).expect("state serializes");
        write_atomic(&self.path(STATE_FILE), &bytes)
    }

    pub fn load_consent(&self) -> Result<Option<ConsentDecision>, PersistError> {
        let path = self.path(CONSENT_FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| PersistError::Corrupt {
                        path,
                        message: e.to_string(),
                    })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, "read")(e)),
        }
    }

    pub fn save_consent(&self, d: &ConsentDecision) -> Result<(), PersistError> {
        write_atomic(
            &self.path(CONSENT_FILE),
            &serde_json::to_vec(d).expect("consent serializes"),
        )
    }

    pub fn clear_consent(&self) -> Result<(), PersistError> {
        let path = self.path(CONSENT_FILE);
        match fs::remove_file(&path) {
            Ok(()) => sync_dir(&self.dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path, "remove")(e)),
        }
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), PersistError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io(&tmp, "create"))?;
        f.write_all(bytes).map_err(io(&tmp, "write"))?;
        f.sync_all().map_err(io(&tmp, "fsync"))?;
    }
    fs::rename(&tmp, path).map_err(io(path, "rename"))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> Result<(), PersistError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir, "fsync directory"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddi::{Execution, Feedback, Finished};
    use crate::machine::{Channel, Outgoing};

    #[test]
    fn state_dir_is_created_private_and_state_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/state");
        let store = Store::open(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(store.load().unwrap(), State::default());
        let mut s = State::default();
        s.outbox.push(Outgoing {
            seq: 4,
            channel: Channel::Deployment,
            link: "http://h/deploymentBase/1".into(),
            feedback: Feedback::new("1", Execution::Closed, Finished::Success),
        });
        s.next_seq = 5;
        store.save(&s).unwrap();
        assert_eq!(Store::open(&dir).unwrap().load().unwrap(), s);
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(
            names,
            vec![STATE_FILE.to_string()],
            "no temp file left behind"
        );
    }

    #[test]
    fn corrupt_state_is_an_error_not_a_reset() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        fs::write(store.path(STATE_FILE), b"{not json").unwrap();
        let e = store.load().unwrap_err().to_string();
        assert!(e.contains("state.json") && e.contains("unreadable"), "{e}");
    }

    #[test]
    fn consent_decision_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        assert_eq!(store.load_consent().unwrap(), None);
        let d = ConsentDecision {
            action_id: "3".into(),
            accept: true,
        };
        store.save_consent(&d).unwrap();
        assert_eq!(store.load_consent().unwrap(), Some(d));
        store.clear_consent().unwrap();
        store.clear_consent().unwrap();
        assert_eq!(store.load_consent().unwrap(), None);
    }
}
