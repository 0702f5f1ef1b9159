//! Durable agent state in `state_dir`: the state file (phase, last result, feedback outbox; its
//! format is [`crate::state_file`]) and the consent decision, written atomically (temp file,
//! fsync, rename, fsync of the folder) so a power cut leaves either the old or the new version,
//! never a mix. A state file that cannot be read is kept aside and replaced by a fresh state
//! that answers the action it had open ([`Store::load_or_recover`]).

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::machine::State;
use crate::state_file;

/// File name of the state inside `state_dir`.
pub const STATE_FILE: &str = "state.json";
/// File name of a pending consent decision inside `state_dir`.
pub const CONSENT_FILE: &str = "consent.json";
/// An unreadable state file is kept under this name (the latest one).
pub const UNREADABLE_FILE: &str = "state.json.unreadable";

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: unreadable ({message})")]
    Corrupt { path: PathBuf, message: String },
}

/// What [`Store::load_or_recover`] did with a state file it could not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Where the unreadable file is kept.
    pub kept: PathBuf,
    /// Why it could not be read, and where it is kept.
    pub problem: String,
    /// The action it had open, now answered `closed`/`failure`.
    pub failed_action: Option<String>,
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

    /// The saved state; a missing file is a fresh agent, an unreadable one an error (for
    /// read-only commands; the agent itself uses [`Store::load_or_recover`]).
    pub fn load(&self) -> Result<State, PersistError> {
        let path = self.path(STATE_FILE);
        match self.read_state()? {
            Some(bytes) => state_file::decode(&bytes).map_err(|e| PersistError::Corrupt {
                path,
                message: e.to_string(),
            }),
            None => Ok(State::default()),
        }
    }

    /// The saved state; an unreadable file is not a dead end: it is kept as
    /// [`UNREADABLE_FILE`], and a fresh state takes its place with what could still be read
    /// (owed feedback, finished actions) and a `closed`/`failure` naming the problem for the
    /// action it had open. The copy is durable before the state file is replaced, so a power
    /// cut in between repeats the same recovery.
    pub fn load_or_recover(&self) -> Result<(State, Option<Recovery>), PersistError> {
        let path = self.path(STATE_FILE);
        let Some(bytes) = self.read_state()? else {
            return Ok((State::default(), None));
        };
        let error = match state_file::decode(&bytes) {
            Ok(state) => return Ok((state, None)),
            Err(e) => e,
        };
        let kept = self.path(UNREADABLE_FILE);
        write_atomic(&kept, &bytes)?;
        let problem = format!(
            "state file {} unreadable ({error}); kept as {}",
            path.display(),
            kept.display()
        );
        let salvage = state_file::salvage(&bytes);
        let (state, failed_action) = State::recovered(
            salvage.outbox,
            salvage.finished_actions,
            salvage.open_action,
            &problem,
        );
        self.save(&state)?;
        Ok((
            state,
            Some(Recovery {
                kept,
                problem,
                failed_action,
            }),
        ))
    }

    fn read_state(&self) -> Result<Option<Vec<u8>>, PersistError> {
        let path = self.path(STATE_FILE);
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path, "read")(e)),
        }
    }

    pub fn save(&self, state: &State) -> Result<(), PersistError> {
        write_atomic(&self.path(STATE_FILE), &state_file::encode(state))
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
    bootctl::fsutil::write_atomic(path, bytes, 0o600).map_err(|e| PersistError::Io {
        path: e.path,
        op: e.op,
        source: e.source,
    })
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
    use crate::machine::{Caches, Channel, Outbox, Outgoing, Update};

    #[test]
    fn state_dir_is_created_private_and_state_round_trips() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/state");
        let store = Store::open(&dir).unwrap();
        let mode = fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert_eq!(store.load().unwrap(), State::default());
        let s = State::restore(
            Update::default(),
            Outbox::restore(
                vec![Outgoing {
                    seq: 4,
                    channel: Channel::Deployment,
                    link: "http://h/deploymentBase/1".into(),
                    feedback: Feedback::new("1", Execution::Closed, Finished::Success),
                }],
                5,
            ),
            Caches::default(),
        );
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
    fn unreadable_state_is_kept_aside_and_its_open_action_answered() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path()).unwrap();
        // A slot name this agent does not know: the file does not decode.
        let text = br#"{"phase": {"phase": "awaiting_reboot", "job": {"action_id": "5",
            "link": "http://h/deploymentBase/5", "target": "C"}}, "next_seq": 3}"#;
        fs::write(store.path(STATE_FILE), text).unwrap();
        assert!(store.load().is_err());
        let (state, recovery) = store.load_or_recover().unwrap();
        let recovery = recovery.expect("a recovery");
        assert_eq!(recovery.failed_action.as_deref(), Some("5"));
        assert_eq!(recovery.kept, store.path(UNREADABLE_FILE));
        assert_eq!(fs::read(&recovery.kept).unwrap(), text);
        assert_eq!(state.update().phase(), &crate::machine::Phase::Idle);
        assert_eq!(state.outbox().len(), 1);
        let owed = &state.outbox()[0];
        assert!(owed.is_failure());
        assert_eq!(owed.link, "http://h/deploymentBase/5");
        assert_eq!(owed.seq, 3);
        let details = owed.feedback.details.join("\n");
        assert!(
            details.contains("unreadable") && details.contains(UNREADABLE_FILE),
            "{details}"
        );
        assert_eq!(
            state.update().last_result().map(|r| &r.result),
            Some(&crate::machine::ResultKind::Failure)
        );
        // The fresh state is on disk: the next start reads it and answers nothing twice.
        assert_eq!(store.load_or_recover().unwrap(), (state, None));

        // Nothing readable at all: a fresh state, nothing to answer.
        fs::write(store.path(STATE_FILE), b"\0\0garbage").unwrap();
        let (state, recovery) = store.load_or_recover().unwrap();
        assert_eq!(state, State::default());
        assert_eq!(recovery.unwrap().failed_action, None);
        assert_eq!(
            fs::read(store.path(UNREADABLE_FILE)).unwrap(),
            b"\0\0garbage"
        );
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
