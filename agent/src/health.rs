//! Health checks run after a reboot into a new slot, on `tokio::process`: each configured
//! command must exit 0 within the timeout. A string runs through `sh -c`, an array is an argv. Each check runs in
//! its own process group, so a timeout kills the check and everything it started; the
//! failure carries the command, how it ended and the tail of its output (stdout and stderr
//! interleaved).

use std::fmt;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use serde::Deserialize;

/// Bytes of output kept for the failure report.
pub const OUTPUT_TAIL: usize = 4096;

/// One configured check: `"cmd args"` (run by `sh -c`) or `["prog", "arg", ...]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum HealthCheck {
    Shell(String),
    Argv(Vec<String>),
}

impl HealthCheck {
    /// Nothing to run: a blank shell string or an argv without a program.
    pub fn is_empty(&self) -> bool {
        match self {
            HealthCheck::Shell(s) => s.trim().is_empty(),
            HealthCheck::Argv(v) => v.first().is_none_or(|p| p.is_empty()),
        }
    }
}

impl fmt::Display for HealthCheck {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HealthCheck::Shell(s) => f.write_str(s),
            HealthCheck::Argv(v) => write!(f, "{v:?}"),
        }
    }
}

/// How a failed check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exited with a non-zero code.
    Exit(i32),
    /// Killed by a signal it did not get from us.
    Signal(i32),
    /// Ran longer than the timeout (its process group was killed).
    TimedOut(Duration),
    /// Could not be started.
    SpawnFailed(String),
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exit(c) => write!(f, "exited with status {c}"),
            Outcome::Signal(s) => write!(f, "killed by signal {s}"),
            Outcome::TimedOut(t) => write!(f, "timed out after {}s", t.as_secs_f64()),
            Outcome::SpawnFailed(e) => write!(f, "could not be started: {e}"),
        }
    }
}

/// The first check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("health check `{command}` {outcome}{}", if output_tail.is_empty() { String::new() } else { format!("; output: {output_tail}") })]
pub struct HealthFailure {
    pub command: String,
    pub outcome: Outcome,
    /// The last [`OUTPUT_TAIL`] bytes of its output (lossy UTF-8).
    pub output_tail: String,
}

/// Run the checks in order; stop at the first failure.
pub async fn run_checks(checks: &[HealthCheck], timeout: Duration) -> Result<(), HealthFailure> {
    for check in checks {
        run_check(check, timeout).await?;
    }
    Ok(())
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

fn tail(bytes: &[u8]) -> String {
    let start = bytes.len().saturating_sub(OUTPUT_TAIL);
    String::from_utf8_lossy(&bytes[start..])
        .trim_end()
        .to_string()
}

/// Run one check.
pub async fn run_check(check: &HealthCheck, timeout: Duration) -> Result<(), HealthFailure> {
    let command = check.to_string();
    let fail = |outcome, output_tail| HealthFailure {
        command: command.clone(),
        outcome,
        output_tail,
    };
    let mut cmd = match check {
        HealthCheck::Shell(s) => {
            let mut c = Command::new("sh");
            c.arg("-c").arg(s);
            c
        }
        HealthCheck::Argv(v) => {
            let Some((prog, args)) = v.split_first() else {
                return Err(fail(
                    Outcome::SpawnFailed("empty command".into()),
                    String::new(),
                ));
            };
            let mut c = Command::new(prog);
            c.args(args);
            c
        }
    };
    let (read_end, write_end) =
        pipe().map_err(|e| fail(Outcome::SpawnFailed(format!("pipe: {e}")), String::new()))?;
    let write_err = write_end
        .try_clone()
        .map_err(|e| fail(Outcome::SpawnFailed(format!("pipe: {e}")), String::new()))?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::from(write_err))
        .process_group(0)
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .map_err(|e| fail(Outcome::SpawnFailed(e.to_string()), String::new()))?;
    // Drop our copies of the write end (held by `cmd`) so EOF comes when the child is done.
    drop(cmd);

    // Collect output on a blocking thread: a chatty check must never block on a full pipe.
    let output = tokio::task::spawn_blocking(move || {
        let mut reader = std::fs::File::from(read_end);
        let mut kept = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 2 * OUTPUT_TAIL {
                kept.drain(..kept.len() - OUTPUT_TAIL);
            }
        }
        kept
    });

    let pgid = child.id().map(|id| id as libc::pid_t);
    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) => Some(status),
        Ok(Err(e)) => {
            return Err(fail(
                Outcome::SpawnFailed(format!("wait: {e}")),
                String::new(),
            ))
        }
        Err(_) => None,
    };
    // Whatever it started is done too (also after a normal exit: no leftovers).
    if let Some(pgid) = pgid {
        // SAFETY: signalling our own child's process group.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
    if status.is_none() {
        let _ = child.wait().await;
    }
    // A grandchild that left the group may still hold the pipe: do not wait for it forever.
    let output = match tokio::time::timeout(Duration::from_secs(2), output).await {
        Ok(Ok(kept)) => tail(&kept),
        _ => String::new(),
    };
    match status {
        None => Err(fail(Outcome::TimedOut(timeout), output)),
        Some(s) if s.success() => Ok(()),
        Some(s) => Err(fail(
            match (s.code(), s.signal()) {
                (Some(c), _) => Outcome::Exit(c),
                (None, Some(sig)) => Outcome::Signal(sig),
                (None, None) => Outcome::Exit(-1),
            },
            output,
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shell(s: &str) -> HealthCheck {
        HealthCheck::Shell(s.into())
    }

    #[tokio::test]
    async fn passing_checks() {
        run_checks(
            &[
                shell("true"),
                HealthCheck::Argv(vec!["test".into(), "1".into(), "=".into(), "1".into()]),
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap();
        run_checks(&[], Duration::from_secs(1)).await.unwrap();
    }

    #[tokio::test]
    async fn failure_carries_status_and_output_tail() {
        let err = run_checks(
            &[
                shell("true"),
                shell("echo out; echo err >&2; exit 3"),
                shell("touch /never"),
            ],
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert_eq!(err.command, "echo out; echo err >&2; exit 3");
        assert_eq!(err.outcome, Outcome::Exit(3));
        assert_eq!(err.output_tail, "out\nerr");
        assert!(err.to_string().contains("exited with status 3"), "{err}");
    }

    #[tokio::test]
    async fn output_is_limited_to_the_tail() {
        let err = run_check(&shell("seq 1 100000; exit 1"), Duration::from_secs(20))
            .await
            .unwrap_err();
        assert!(err.output_tail.len() <= OUTPUT_TAIL);
        assert!(
            err.output_tail.ends_with("99999\n100000"),
            "{}",
            &err.output_tail[err.output_tail.len() - 20..]
        );
    }

    #[tokio::test]
    async fn timeout_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("survivor");
        // A background grandchild that would write the marker if it survived the kill.
        let script = format!(
            "echo started; (sleep 1; touch {}) & sleep 30",
            marker.display()
        );
        let begin = std::time::Instant::now();
        let err = run_check(&shell(&script), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(begin.elapsed() < Duration::from_secs(5));
        assert!(matches!(err.outcome, Outcome::TimedOut(_)), "{err}");
        assert_eq!(err.output_tail, "started");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert!(!marker.exists(), "the grandchild survived the timeout");
    }

    #[tokio::test]
    async fn a_hanging_check_that_ignores_sigterm_is_killed_at_the_timeout() {
        let begin = std::time::Instant::now();
        let err = run_check(
            &shell("trap '' TERM INT; echo hanging; while :; do sleep 1; done"),
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        let took = begin.elapsed();
        assert!(took >= Duration::from_millis(500), "{took:?}");
        assert!(took < Duration::from_secs(4), "{took:?}");
        assert_eq!(err.outcome, Outcome::TimedOut(Duration::from_millis(500)));
        assert_eq!(err.output_tail, "hanging");
        assert!(err.to_string().contains("timed out after 0.5s"), "{err}");
    }

    #[tokio::test]
    async fn missing_program_is_a_failure() {
        let err = run_check(
            &HealthCheck::Argv(vec!["/nonexistent/check".into()]),
            Duration::from_secs(1),
        )
        .await
        .unwrap_err();
        assert!(matches!(err.outcome, Outcome::SpawnFailed(_)), "{err}");
        let err = run_check(&HealthCheck::Argv(vec![]), Duration::from_secs(1))
            .await
            .unwrap_err();
        assert!(matches!(err.outcome, Outcome::SpawnFailed(_)), "{err}");
    }

    #[test]
    fn parses_string_or_array() {
        #[derive(Deserialize)]
        struct C {
            checks: Vec<HealthCheck>,
        }
        let c: C =
            toml::from_str(r#"checks = ["systemctl is-system-running", ["test", "-e", "/x"]]"#)
                .unwrap();
        assert_eq!(c.checks[0], shell("systemctl is-system-running"));
        assert_eq!(
            c.checks[1],
            HealthCheck::Argv(vec!["test".into(), "-e".into(), "/x".into()])
        );
    }
}
