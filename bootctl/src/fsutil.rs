//! Small file-system helpers the whole workspace shares: replacing a file atomically, taking an
//! exclusive `flock`, and reading until a buffer is full.
//!
//! They live here because `bootctl` is the lowest crate of the device side: the agent depends
//! on it, and so do the test crates, so one copy serves the environment lock, the boot
//! simulation, the agent's state files and the test server alike without a crate of its own.
//! (`ddi-bundle`, a host-side tool crate, does not depend on `bootctl` and keeps its own
//! `tar::read_full`.)

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// One step of [`write_atomic`] failed.
#[derive(Debug, thiserror::Error)]
#[error("{}: {op}: {source}", path.display())]
pub struct WriteError {
    /// The file (or folder, for `fsync directory`) the step worked on.
    pub path: PathBuf,
    /// `create`, `write`, `fsync`, `rename` or `fsync directory`.
    pub op: &'static str,
    #[source]
    pub source: io::Error,
}

impl From<WriteError> for io::Error {
    fn from(e: WriteError) -> io::Error {
        io::Error::new(e.source.kind(), e.to_string())
    }
}

/// Replaces `path` with `bytes` so that a crash leaves the old or the new content, never a
/// mix: a temporary file next to it (`.NAME.tmp`, created with `mode` before the umask) is
/// written and fsynced, renamed over `path`, and the folder is fsynced. A failed attempt
/// removes its temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), WriteError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let Some(name) = path.file_name() else {
        return Err(WriteError {
            path: path.to_path_buf(),
            op: "create",
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path has no file name"),
        });
    };
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    let step = |path: &Path, op: &'static str| {
        let path = path.to_path_buf();
        move |source| WriteError { path, op, source }
    };
    let written = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)
            .map_err(step(&tmp, "create"))?;
        file.write_all(bytes).map_err(step(&tmp, "write"))?;
        file.sync_all().map_err(step(&tmp, "fsync"))?;
        fs::rename(&tmp, path).map_err(step(path, "rename"))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(step(dir, "fsync directory"))
}

/// Creates the folder `path` lives in when it is missing (`/var/lock` may be absent on a
/// minimal root).
pub fn create_parent_dir(path: &Path) -> io::Result<()> {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() && !dir.exists() => fs::create_dir_all(dir),
        _ => Ok(()),
    }
}

/// Takes an exclusive `flock` on `file`, held until the file is closed. With `wait`, blocks
/// until it is free (an interrupted wait is resumed); without, a lock held elsewhere is an
/// error of kind [`io::ErrorKind::WouldBlock`].
pub fn flock_exclusive(file: &File, wait: bool) -> io::Result<()> {
    let operation = if wait {
        libc::LOCK_EX
    } else {
        libc::LOCK_EX | libc::LOCK_NB
    };
    loop {
        // SAFETY: flock on a file descriptor the caller keeps open for the call.
        if unsafe { libc::flock(file.as_raw_fd(), operation) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Reads until `buf` is full or the stream ends (an interrupted read is resumed); returns how
/// many bytes were read, fewer than `buf.len()` only at the end of the stream.
pub fn read_full<R: Read + ?Sized>(reader: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_atomic_replaces_the_file_with_the_mode_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        fs::write(&path, b"old").unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let fresh = dir.path().join("fresh");
        write_atomic(&fresh, b"x", 0o600).unwrap();
        assert_eq!(
            fs::metadata(&fresh).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }

    #[test]
    fn failed_write_names_the_step_and_keeps_the_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        fs::write(&path, b"old").unwrap();
        // A directory where the temporary file goes: creating it fails.
        fs::create_dir(dir.path().join(".f.tmp")).unwrap();
        let e = write_atomic(&path, b"new", 0o644).unwrap_err();
        assert_eq!(e.op, "create");
        assert!(e.to_string().contains(".f.tmp: create:"), "{e}");
        assert_eq!(fs::read(&path).unwrap(), b"old");
        let e = write_atomic(&dir.path().join("missing/f"), b"x", 0o644).unwrap_err();
        assert_eq!(io::Error::from(e).kind(), io::ErrorKind::NotFound);
    }

    #[test]
    fn second_non_blocking_lock_would_block() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/lock");
        create_parent_dir(&path).unwrap();
        let open = || File::create(&path).unwrap();
        let first = open();
        flock_exclusive(&first, false).unwrap();
        let second = open();
        let e = flock_exclusive(&second, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(first);
        flock_exclusive(&second, false).unwrap();
    }

    /// Hands out one byte per read and is interrupted in between.
    struct Trickle {
        data: Vec<u8>,
        interrupt: bool,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.interrupt = !self.interrupt;
            if self.interrupt {
                return Err(io::ErrorKind::Interrupted.into());
            }
            if self.data.is_empty() || buf.is_empty() {
                return Ok(0);
            }
            buf[0] = self.data.remove(0);
            Ok(1)
        }
    }

    #[test]
    fn read_full_fills_across_short_and_interrupted_reads() {
        let mut reader = Trickle {
            data: b"abcdef".to_vec(),
            interrupt: false,
        };
        let mut buf = [0u8; 4];
        assert_eq!(read_full(&mut reader, &mut buf).unwrap(), 4);
        assert_eq!(&buf, b"abcd");
        assert_eq!(read_full(&mut reader, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"ef");
    }
}
