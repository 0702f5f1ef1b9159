//! Installs that no server assigned (issue 18): `ddi-agent install --check SOURCE`, the field
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

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::install::hash::HashAlgorithm;
use crate::install::pipeline::{self, ChunkSender, Counters, SinkPlan};
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
    let mut file = None;
    let size = match &req.source {
        Source::File(path) => {
            let f = tokio::fs::File::open(path).await.map_err(|e| {
                InstallError::InvalidRequest(format!("cannot open {}: {e}", path.display()))
            })?;
            let meta = f.metadata().await.map_err(|e| {
                InstallError::InvalidRequest(format!("cannot read {}: {e}", path.display()))
            })?;
            if !meta.is_file() {
                return Err(InstallError::InvalidRequest(format!(
                    "{} is not a regular file",
                    path.display()
                )));
            }
            file = Some(f);
            Some(meta.len())
        }
        Source::Url(_) => None,
    };
    let counters = Arc::new(Counters::new(0, size));
    if let Some(f) = &mut file {
        if let Some(isize) = gzip_isize(f).await? {
            counters
                .gzip_isize
                .store(isize, std::sync::atomic::Ordering::Release);
        }
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
    };
    let mut sink_slot = DiscardSlot {
        path: req.slot_path.clone(),
        capacity: req.slot_capacity,
    };
    let sink_counters = Arc::clone(&counters);
    let mut sink = tokio::task::spawn_blocking(move || {
        pipeline::run(
            &plan,
            &mut sink_slot as &mut dyn SlotDevice,
            rx,
            &sink_counters,
        )
    });
    let feed = async {
        match (file, &req.source) {
            (Some(f), _) => feed_file(f, tx, &counters).await,
            (None, Source::Url(url)) => {
                let spec = source::SourceSpec {
                    url: url.clone(),
                    auth_header: req.auth_header.clone(),
                    size: None,
                    max_rate: req.max_rate,
                    retry: req.retry,
                    stall_timeout: req.stall_timeout,
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

/// The ISIZE of a gzip file's trailer (a lower bound of its decoded size), so that an image
/// that cannot fit fails before the first byte, as for a download.
async fn gzip_isize(f: &mut tokio::fs::File) -> Result<Option<u64>, InstallError> {
    let mut head = [0u8; 2];
    let mut trailer = [0u8; 4];
    let found = f.read_exact(&mut head).await.is_ok()
        && crate::install::decode::is_gzip(&head)
        && f.seek(io::SeekFrom::End(-4)).await.is_ok()
        && f.read_exact(&mut trailer).await.is_ok();
    f.seek(io::SeekFrom::Start(0))
        .await
        .map_err(|e| InstallError::InvalidRequest(format!("reading the source: {e}")))?;
    Ok(found.then(|| u64::from(u32::from_le_bytes(trailer))))
}

const FILE_CHUNK: usize = 256 * 1024;

/// Stream a local file into the pipeline.
async fn feed_file(
    mut f: tokio::fs::File,
    tx: ChunkSender,
    counters: &Counters,
) -> Result<(), InstallError> {
    let mut done = 0u64;
    loop {
        let mut buf = vec![0u8; FILE_CHUNK];
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| InstallError::InvalidRequest(format!("reading the source: {e}")))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        if !tx.send_data(Bytes::from(buf)).await {
            // The pipeline stopped; its error is the one that counts.
            return Ok(());
        }
        done += n as u64;
        counters
            .downloaded
            .store(done, std::sync::atomic::Ordering::Relaxed);
    }
    tx.send_end().await;
    Ok(())
}
