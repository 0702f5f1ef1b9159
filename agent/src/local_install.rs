//! Installs that no server assigned (issue 18). `ddi-agent install SOURCE` runs as a local job
//! of the update machine (see [`crate::machine::LocalOrigin`] and `Driver::local_install`);
//! this module holds its progress display and `ddi-agent install --check SOURCE`, the field
//! technician's dry run. SOURCE is a local file or an `http(s)://` URL; it goes through the same
//! streaming pipeline as a server's artifact (signature policy, `compatible`, formats, the size
//! guard against the slot the image would go to, a bundle's signed sizes and hashes) into a sink
//! that keeps nothing: no slot, no boot environment and no state is written.
//!
//! A local source has no server-announced hash: a signed bundle's signature (and its signed
//! image hash) or the format's own checks (gzip CRC, tar structure) are the integrity proof.

use std::io;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::install::hash::HashAlgorithm;
use crate::install::pipeline::{self, Counters, SinkPlan};
use crate::install::slot::SlotDevice;
use crate::install::{source, BundlePolicy, InstallError, Installed, Progress, RetryPolicy};

/// Where the image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    File(PathBuf),
    Url(String),
}

impl Source {
    /// `http://` and `https://` are URLs; anything else is a path.
    pub fn parse(arg: &str) -> Source {
        let lower = arg.to_ascii_lowercase();
        if lower.starts_with("http://") || lower.starts_with("https://") {
            Source::Url(arg.to_string())
        } else {
            Source::File(PathBuf::from(arg))
        }
    }
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Url(u) => f.write_str(u),
        }
    }
}

/// The bytes a slot can hold, read without opening it for writing: a regular file's length,
/// a block device's size.
pub fn slot_capacity(slot: &Path) -> io::Result<u64> {
    let meta = std::fs::metadata(slot)?;
    if meta.file_type().is_block_device() {
        use std::io::Seek;
        let mut dev = std::fs::File::open(slot)?;
        return dev.seek(io::SeekFrom::End(0));
    }
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "neither a block device nor a regular file",
        ));
    }
    Ok(meta.len())
}

/// A sink of the slot's capacity that keeps nothing: the dry run writes here.
struct DiscardSlot {
    path: PathBuf,
    capacity: u64,
}

impl SlotDevice for DiscardSlot {
    fn path(&self) -> &Path {
        &self.path
    }
    fn capacity(&self) -> u64 {
        self.capacity
    }
    fn write_all_at(&mut self, _offset: u64, _data: &[u8]) -> io::Result<()> {
        Ok(())
    }
    fn read_at(&mut self, _offset: u64, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "a dry run keeps no data",
        ))
    }
    fn sync_range(&mut self, _offset: u64, _len: u64, _wait: bool) -> io::Result<()> {
        Ok(())
    }
    fn sync_data(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn keeps_data(&self) -> bool {
        false
    }
}

/// What the dry run is checked against.
#[derive(Debug, Clone)]
pub struct CheckRequest {
    pub source: Source,
    /// The slot the image would be written to (its capacity bounds the image; never opened
    /// for writing).
    pub slot_path: PathBuf,
    pub slot_capacity: u64,
    /// For a URL on the configured server's origin: its token (the driver's same-host rule).
    pub auth_header: Option<(String, String)>,
    /// Signature policy; None = plain images.
    pub bundle: Option<BundlePolicy>,
    pub max_rate: Option<u64>,
    pub retry: RetryPolicy,
    pub stall_timeout: Duration,
    pub progress_interval: Duration,
}

/// Verify `req.source` without writing anything; `Installed` tells the image's size and
/// sha256 as they would land on the slot.
pub async fn check(
    client: &reqwest::Client,
    req: &CheckRequest,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Installed, InstallError> {
    let file = match &req.source {
        Source::File(path) => Some(source::open_file(path).await?),
        Source::Url(_) => None,
    };
    let size = file.as_ref().map(|f| f.size);
    let counters = Arc::new(Counters::new(0, size));
    if let Some(isize) = file.as_ref().and_then(|f| f.gzip_isize) {
        counters
            .gzip_isize
            .store(isize, std::sync::atomic::Ordering::Release);
    }
    let (tx, rx) = pipeline::channel(64, crate::install::CHANNEL_BYTES);
    let plan = SinkPlan {
        url: req.source.to_string(),
        algorithm: HashAlgorithm::Sha256,
        // No announced hash (see the module docs).
        expected: String::new(),
        size,
        start: 0,
        // Never written: checkpoints are off below.
        resume_path: PathBuf::new(),
        archive_member: None,
        bundle: req.bundle.clone(),
        checkpoint_interval: u64::MAX,
        gzip_resume: None,
        zstd_resume: None,
        xz_resume: None,
        replay: None,
        bundle_image_at: None,
        bundle_head: None,
        artifact_sha256: None,
    };
    let mut sink_slot = DiscardSlot {
        path: req.slot_path.clone(),
        capacity: req.slot_capacity,
    };
    let sink_counters = Arc::clone(&counters);
    let mut sink = tokio::task::spawn_blocking(move || {
        pipeline::run(
            plan,
            &mut sink_slot as &mut dyn SlotDevice,
            rx,
            &sink_counters,
        )
    });
    let feed = async {
        match (file, &req.source) {
            (Some(f), _) => source::feed_file(f.file, tx, &counters).await,
            (None, Source::Url(url)) => {
                let spec = source::SourceSpec {
                    url: url.clone(),
                    auth_header: req.auth_header.clone(),
                    size: None,
                    max_rate: req.max_rate,
                    retry: req.retry,
                    stall_timeout: req.stall_timeout,
                    requests: source::RequestBudget::default(),
                };
                source::fetch(client, &spec, 0, tx, &counters).await
            }
            (None, Source::File(_)) => unreachable!("a file source is opened above"),
        }
    };
    tokio::pin!(feed);
    let mut ticker = tokio::time::interval(req.progress_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut feed_result = None;
    let sink_result = loop {
        tokio::select! {
            r = &mut feed, if feed_result.is_none() => feed_result = Some(r),
            r = &mut sink => break r,
            _ = ticker.tick() => progress(Progress::Downloading {
                done: counters.downloaded.load(std::sync::atomic::Ordering::Relaxed),
                total: counters.total(),
            }),
        }
    };
    let sink_result =
        sink_result.map_err(|e| InstallError::Internal(format!("check stage died: {e}")))?;
    match (sink_result, feed_result) {
        (Ok(done), _) => Ok(done),
        // The source's failure is the cause; what the pipeline saw is its consequence.
        (Err(_), Some(Err(source_error))) => Err(source_error),
        (Err(e), _) => Err(e),
    }
}

/// How often a non-terminal gets a progress log line.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// Shows an install's progress: on a terminal one line rewritten in place (bytes, rate, ETA),
/// otherwise a log line every [`LOG_EVERY`].
pub struct ProgressDisplay {
    terminal: bool,
    started: std::time::Instant,
    last_log: Option<std::time::Instant>,
    drawn: bool,
}

impl ProgressDisplay {
    pub fn new(terminal: bool) -> ProgressDisplay {
        ProgressDisplay {
            terminal,
            started: std::time::Instant::now(),
            last_log: None,
            drawn: false,
        }
    }

    pub fn show(&mut self, p: Progress) {
        let Some(line) = progress_line(p, self.started.elapsed()) else {
            return;
        };
        if self.terminal {
            use std::io::Write;
            let mut err = std::io::stderr().lock();
            let _ = write!(err, "\r\x1b[K{line}");
            let _ = err.flush();
            self.drawn = true;
        } else if self.last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            tracing::info!("{line}");
            self.last_log = Some(std::time::Instant::now());
        }
    }

    /// Ends the terminal's progress line.
    pub fn finish(&mut self) {
        if self.drawn {
            eprintln!();
            self.drawn = false;
        }
    }
}

/// `writing 12.0 MiB / 64.0 MiB (18%), 4.0 MiB/s, ETA 13 s` (the rate is the average over
/// `elapsed`), or `verifying 8.0 MiB / 64.0 MiB (12%)`.
pub fn progress_line(p: Progress, elapsed: Duration) -> Option<String> {
    let (what, done, total) = match p {
        Progress::Downloading { done, total } => ("writing", done, total),
        Progress::Verifying { done, total } => ("verifying", done, Some(total)),
        // Local installs are never delta installs.
        Progress::Delta(_) => return None,
    };
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let mut line = format!("{what} {}", mib(done as f64));
    if let Some(total) = total.filter(|t| *t > 0) {
        line += &format!(
            " / {} ({}%)",
            mib(total as f64),
            done.min(total) * 100 / total
        );
    }
    // Verifying reads back what was written, much of it while writing: no rate of its own.
    if what == "writing" {
        line += &format!(", {}/s", mib(rate));
        if let Some(total) = total.filter(|_| rate > 0.0) {
            let eta = total.saturating_sub(done) as f64 / rate;
            line += &format!(", ETA {} s", eta.ceil() as u64);
        }
    }
    Some(line)
}

fn mib(bytes: f64) -> String {
    format!("{:.1} MiB", bytes / (1024.0 * 1024.0))
}

/// `YYYY-MM-DD HH:MM:SS UTC` of Unix seconds (status output).
pub fn utc_time(unix_secs: u64) -> String {
    let days = (unix_secs / 86_400) as i64;
    let rem = unix_secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_tell_bytes_rate_and_eta() {
        let mib = 1024 * 1024;
        let line = progress_line(
            Progress::Downloading {
                done: 16 * mib,
                total: Some(64 * mib),
            },
            Duration::from_secs(4),
        );
        assert_eq!(
            line.unwrap(),
            "writing 16.0 MiB / 64.0 MiB (25%), 4.0 MiB/s, ETA 12 s"
        );
        let line = progress_line(
            Progress::Downloading {
                done: mib,
                total: None,
            },
            Duration::from_secs(2),
        );
        assert_eq!(line.unwrap(), "writing 1.0 MiB, 0.5 MiB/s");
        let line = progress_line(
            Progress::Verifying {
                done: 0,
                total: 8 * mib,
            },
            Duration::ZERO,
        );
        assert_eq!(line.unwrap(), "verifying 0.0 MiB / 8.0 MiB (0%)");
    }

    #[test]
    fn utc_times() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_796_464_445), "2026-12-05 09:54:05 UTC");
    }
}
