//! Test support for the `ddi` workspace: the file-backed device, helpers that run the real
//! binaries, the common rig of the integration tests (server, device, agent), and the
//! one-command demo. The hawkBit-compatible test server is its own crate, `ddi_sim`.
//!
//! Integration tests run the real `ddi-agent` and `ddi-bootctl` binaries. They are found next to
//! the test executable's target directory (see [`bin_path`]), so `cargo build --workspace --bins`
//! must run before `cargo test`.

pub mod demo;
pub mod device;
pub mod harness;
pub mod rig;
pub mod signing;

use std::path::{Path, PathBuf};

/// The directory cargo puts the workspace binaries in (`target/<profile>/`), derived from the
/// running executable: tests live in `target/<profile>/deps/`, binaries one level up.
pub fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("cannot find the path of the running executable");
    let mut dir = exe
        .parent()
        .expect("the running executable has no parent directory")
        .to_path_buf();
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir.pop();
    }
    dir
}

/// Path of the workspace binary `name` (e.g. `"ddi-agent"`), built by cargo into the same target
/// directory as the running executable.
///
/// # Panics
/// When the binary has not been built, with a message saying how to build it.
pub fn bin_path(name: &str) -> PathBuf {
    let dir = target_profile_dir();
    let path = dir.join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    if !path.is_file() {
        panic!(
            "binary `{name}` not found at {}: run `cargo build --workspace --bins` first \
             (with the same profile and CARGO_TARGET_DIR as the tests)",
            path.display()
        );
    }
    path
}

/// Like [`bin_path`] but returns `None` instead of panicking when the binary is missing.
pub fn try_bin_path(name: &str) -> Option<PathBuf> {
    let path = target_profile_dir().join(format!("{name}{}", std::env::consts::EXE_SUFFIX));
    path.is_file().then_some(path)
}

/// Quote `path` for a POSIX shell command line: as it is when it holds only safe characters,
/// else in single quotes with embedded quotes escaped.
pub fn shell_quote(path: &Path) -> String {
    let text = path.to_string_lossy();
    let safe = !text.is_empty()
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@%".contains(c));
    if safe {
        text.into_owned()
    } else {
        format!("'{}'", text.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[should_panic(expected = "run `cargo build --workspace --bins` first")]
    fn missing_binary_panics_with_build_hint() {
        bin_path("ddi-no-such-binary");
    }

    #[test]
    fn profile_dir_is_not_deps() {
        let dir = target_profile_dir();
        assert_ne!(dir.file_name().unwrap(), "deps");
        assert!(dir.join("deps").is_dir(), "{}", dir.display());
    }

    #[test]
    fn shell_quote_escapes_single_quotes() {
        assert_eq!(shell_quote(Path::new("/a b/it's")), r"'/a b/it'\''s'");
        assert_eq!(shell_quote(Path::new("/tmp/x-1/a.sh")), "/tmp/x-1/a.sh");
        assert_eq!(shell_quote(Path::new("")), "''");
    }
}
