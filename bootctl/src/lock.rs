//! The `flock` that serialises environment read-modify-write with libubootenv's
//! `fw_printenv`/`fw_setenv` (and RAUC, SWUpdate, Mender, which use them).
//!
//! libubootenv opens `/var/lock/fw_printenv.lock` (creating it, mode 0666) and holds
//! `flock(LOCK_EX)` from reading the environment until the save is done; we do the same with
//! the same file so that the two never interleave.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The lock file libubootenv uses.
pub const DEFAULT_LOCK_PATH: &str = "/var/lock/fw_printenv.lock";

/// Could not take the environment lock.
#[derive(Debug, thiserror::Error)]
#[error("cannot lock {}: {source}", path.display())]
pub struct LockError {
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl LockError {
    /// The lock file cannot be created or opened for lack of rights or a read-only file
    /// system (not because another process holds it).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self.source.kind(),
            io::ErrorKind::PermissionDenied
                | io::ErrorKind::ReadOnlyFilesystem
                | io::ErrorKind::NotFound
        )
    }
}

/// An exclusive `flock` on the lock file, released when dropped (the file is closed).
#[derive(Debug)]
pub struct EnvLock {
    _file: File,
    path: PathBuf,
}

impl EnvLock {
    /// Blocks until the exclusive lock on `path` is held. Creates the file, and its folder
    /// (`/var/lock` may be missing on a minimal root), when missing.
    pub fn acquire(path: &Path) -> Result<Self, LockError> {
        let err = |source| LockError {
            path: path.to_path_buf(),
            source,
        };
        crate::fsutil::create_parent_dir(path).map_err(err)?;
        // Like libubootenv: create it writable by all. A user who may not write it (created
        // by root under umask 022) can still flock a read-only descriptor.
        let file = match OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o666)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied && path.exists() => {
                File::open(path).map_err(err)?
            }
            Err(e) => return Err(err(e)),
        };
        crate::fsutil::flock_exclusive(&file, true).map_err(err)?;
        Ok(EnvLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Duration;

    #[test]
    fn creates_missing_folder_and_excludes_a_second_holder() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock").join("fw_printenv.lock");
        let held = EnvLock::acquire(&path).unwrap();
        assert!(path.exists());
        let (tx, rx) = mpsc::channel();
        let path2 = path.clone();
        let waiter = std::thread::spawn(move || {
            let _second = EnvLock::acquire(&path2).unwrap();
            tx.send(()).unwrap();
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "second lock taken while the first is held"
        );
        drop(held);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("second lock taken after release");
        waiter.join().unwrap();
    }
}
