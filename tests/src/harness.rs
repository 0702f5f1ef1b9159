//! Running the real workspace binaries from tests and the demo: `ddi-agent` and `ddi-bootctl`
//! with a device's config, output captured line by line, a timeout that kills a hung process,
//! and background processes that are killed when dropped.

use std::io::{self, BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use crate::bin_path;

/// Which output stream a captured line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// What a finished (or killed) process produced.
#[derive(Debug, Clone)]
pub struct CommandOutput {
    /// The command line, for messages.
    pub command: String,
    /// Exit status; `None` when the process was killed by a signal (including our timeout).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    /// True when the process was killed because it ran past its timeout.
    pub timed_out: bool,
    pub elapsed: Duration,
}

impl CommandOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// A multi-line description for assertion messages: command, exit code, both outputs.
    pub fn describe(&self) -> String {
        format!(
            "`{}` exited with {}{} after {:.1?}\n--- stdout ---\n{}--- stderr ---\n{}",
            self.command,
            self.code
                .map_or_else(|| "a signal".to_string(), |code| code.to_string()),
            if self.timed_out {
                " (killed: timeout)"
            } else {
                ""
            },
            self.elapsed,
            self.stdout,
            self.stderr
        )
    }
}

/// Describe a command (program and arguments) for messages.
pub fn command_line(cmd: &Command) -> String {
    let mut text = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        text.push(' ');
        text.push_str(&arg.to_string_lossy());
    }
    text
}

/// Run `cmd` to completion (or kill it after `timeout`), capturing stdout and stderr.
pub fn run_with_timeout(cmd: Command, timeout: Duration) -> io::Result<CommandOutput> {
    run_streaming(cmd, timeout, |_, _| {})
}

/// Like [`run_with_timeout`], and calls `on_line` for every output line as it arrives (from the
/// calling thread), e.g. to show an agent's progress live.
pub fn run_streaming(
    mut cmd: Command,
    timeout: Duration,
    mut on_line: impl FnMut(Stream, &str),
) -> io::Result<CommandOutput> {
    let command = command_line(&cmd);
    let started = Instant::now();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .map_err(|err| io::Error::new(err.kind(), format!("cannot start `{command}`: {err}")))?;
    let (lines_tx, lines_rx) = mpsc::channel();
    let readers = spawn_line_readers(&mut child, lines_tx);
    let mut stdout = String::new();
    let mut stderr = String::new();
    let mut timed_out = false;
    let deadline = started + timeout;
    let status: ExitStatus = loop {
        drain(
            &lines_rx,
            &mut stdout,
            &mut stderr,
            &mut on_line,
            Duration::from_millis(20),
        );
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            // Already exited between try_wait and kill is fine: wait() reaps it either way.
            let _ = child.kill();
            break child.wait()?;
        }
    };
    for reader in readers {
        let _ = reader.join();
    }
    // The readers are done, so every remaining line is already in the channel.
    while let Ok((stream, line)) = lines_rx.try_recv() {
        record(stream, &line, &mut stdout, &mut stderr, &mut on_line);
    }
    Ok(CommandOutput {
        command,
        code: status.code(),
        stdout,
        stderr,
        timed_out,
        elapsed: started.elapsed(),
    })
}

fn drain(
    lines: &mpsc::Receiver<(Stream, String)>,
    stdout: &mut String,
    stderr: &mut String,
    on_line: &mut impl FnMut(Stream, &str),
    wait: Duration,
) {
    if let Ok((stream, line)) = lines.recv_timeout(wait) {
        record(stream, &line, stdout, stderr, on_line);
        while let Ok((stream, line)) = lines.try_recv() {
            record(stream, &line, stdout, stderr, on_line);
        }
    }
}

fn record(
    stream: Stream,
    line: &str,
    stdout: &mut String,
    stderr: &mut String,
    on_line: &mut impl FnMut(Stream, &str),
) {
    on_line(stream, line);
    let buffer = match stream {
        Stream::Stdout => stdout,
        Stream::Stderr => stderr,
    };
    buffer.push_str(line);
    buffer.push('\n');
}

fn spawn_line_readers(
    child: &mut Child,
    lines: mpsc::Sender<(Stream, String)>,
) -> Vec<thread::JoinHandle<()>> {
    let mut readers = Vec::new();
    if let Some(out) = child.stdout.take() {
        readers.push(spawn_reader(out, Stream::Stdout, lines.clone()));
    }
    if let Some(err) = child.stderr.take() {
        readers.push(spawn_reader(err, Stream::Stderr, lines));
    }
    readers
}

fn spawn_reader(
    source: impl Read + Send + 'static,
    stream: Stream,
    lines: mpsc::Sender<(Stream, String)>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut reader = BufReader::new(source);
        let mut buffer = Vec::new();
        loop {
            buffer.clear();
            match reader.read_until(b'\n', &mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&buffer);
                    let line = text.trim_end_matches(['\n', '\r']).to_string();
                    if lines.send((stream, line)).is_err() {
                        break;
                    }
                }
            }
        }
    })
}

/// A process running in the background (e.g. `ddi-agent run`). Its output is collected; it is
/// killed when [`Background::stop`] is called or when the value is dropped.
pub struct Background {
    command: String,
    child: Option<Child>,
    lines: mpsc::Receiver<(Stream, String)>,
    readers: Vec<thread::JoinHandle<()>>,
    stdout: String,
    stderr: String,
    started: Instant,
}

impl Background {
    pub fn spawn(mut cmd: Command) -> io::Result<Background> {
        let command = command_line(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(|err| {
            io::Error::new(err.kind(), format!("cannot start `{command}`: {err}"))
        })?;
        let (tx, rx) = mpsc::channel();
        let readers = spawn_line_readers(&mut child, tx);
        Ok(Background {
            command,
            child: Some(child),
            lines: rx,
            readers,
            stdout: String::new(),
            stderr: String::new(),
            started: Instant::now(),
        })
    }

    /// Process id, e.g. to send it a signal.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Collect the output produced so far (stdout, stderr).
    pub fn output_so_far(&mut self) -> (&str, &str) {
        while let Ok((stream, line)) = self.lines.try_recv() {
            record(
                stream,
                &line,
                &mut self.stdout,
                &mut self.stderr,
                &mut |_, _| {},
            );
        }
        (&self.stdout, &self.stderr)
    }

    /// Has the process exited on its own? Returns its exit code (None = killed by a signal).
    pub fn try_exit(&mut self) -> io::Result<Option<Option<i32>>> {
        match self.child.as_mut() {
            Some(child) => Ok(child.try_wait()?.map(|status| status.code())),
            None => Ok(None),
        }
    }

    /// Wait up to `timeout` for the process to exit on its own, then kill it. Returns everything
    /// it printed.
    pub fn stop_after(mut self, timeout: Duration) -> io::Result<CommandOutput> {
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = {
            let child = self.child.as_mut().expect("child present until stopped");
            loop {
                if let Some(status) = child.try_wait()? {
                    break status;
                }
                if Instant::now() >= deadline {
                    timed_out = true;
                    let _ = child.kill();
                    break child.wait()?;
                }
                thread::sleep(Duration::from_millis(20));
            }
        };
        self.child = None;
        for reader in std::mem::take(&mut self.readers) {
            let _ = reader.join();
        }
        self.output_so_far();
        Ok(CommandOutput {
            command: self.command.clone(),
            code: status.code(),
            stdout: std::mem::take(&mut self.stdout),
            stderr: std::mem::take(&mut self.stderr),
            timed_out,
            elapsed: self.started.elapsed(),
        })
    }

    /// Kill the process now and return what it printed.
    pub fn stop(self) -> io::Result<CommandOutput> {
        self.stop_after(Duration::ZERO)
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `ddi-agent -c CONFIG` (add the subcommand). Logs are plain (no colours) so they can be read
/// back; set `RUST_LOG` on the returned command to change the level.
pub fn agent_command(config: &Path) -> Command {
    let mut cmd = Command::new(bin_path("ddi-agent"));
    cmd.arg("-c").arg(config).env("NO_COLOR", "1");
    cmd
}

/// Run `ddi-agent -c CONFIG once` with a timeout.
pub fn agent_once(config: &Path, timeout: Duration) -> io::Result<CommandOutput> {
    let mut cmd = agent_command(config);
    cmd.arg("once");
    run_with_timeout(cmd, timeout)
}

/// `ddi-bootctl --env-config ENV --cmdline CMDLINE` (add scheme/attempts and the subcommand).
pub fn bootctl_command(env_config: &Path, cmdline: &Path) -> Command {
    let mut cmd = Command::new(bin_path("ddi-bootctl"));
    cmd.arg("--env-config")
        .arg(env_config)
        .arg("--cmdline")
        .arg(cmdline);
    cmd
}

/// Poll `condition` every `interval` until it is true (returns true) or `timeout` passes (false).
pub fn wait_until(
    timeout: Duration,
    interval: Duration,
    mut condition: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(interval);
    }
}

/// xorshift64*: reproducible randomness for randomized trials (kill points, faults), replayed
/// from the seed a test prints, without a dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A whole number from the environment (trial counts, seeds), if set and valid.
pub fn env_number(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn captures_both_streams_and_exit_code() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo out1; echo err1 >&2; echo out2; exit 3"]);
        let mut seen = Vec::new();
        let output = run_streaming(cmd, Duration::from_secs(10), |stream, line| {
            seen.push((stream, line.to_string()))
        })
        .unwrap();
        assert_eq!(output.code, Some(3));
        assert_eq!(output.stdout, "out1\nout2\n");
        assert_eq!(output.stderr, "err1\n");
        assert!(!output.timed_out);
        assert!(seen.contains(&(Stream::Stderr, "err1".to_string())));
        assert_eq!(seen.len(), 3);
    }

    #[test]
    fn kills_a_process_that_runs_past_its_timeout() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo started; exec sleep 30"]);
        let output = run_with_timeout(cmd, Duration::from_millis(300)).unwrap();
        assert!(output.timed_out, "{}", output.describe());
        assert_eq!(output.code, None);
        assert_eq!(output.stdout, "started\n");
        assert!(output.elapsed < Duration::from_secs(10));
    }

    #[test]
    fn background_process_is_stopped_with_its_output() {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo hello; exec sleep 30"]);
        let mut background = Background::spawn(cmd).unwrap();
        assert!(wait_until(
            Duration::from_secs(10),
            Duration::from_millis(10),
            || { background.output_so_far().0.contains("hello") }
        ));
        assert_eq!(background.try_exit().unwrap(), None);
        let output = background.stop().unwrap();
        assert!(output.timed_out);
        assert_eq!(output.stdout, "hello\n");
    }

    #[test]
    fn a_failed_start_names_the_program() {
        let err = run_with_timeout(
            Command::new("/nonexistent/ddi-no-such-binary"),
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(err.to_string().contains("ddi-no-such-binary"), "{err}");
    }
}
