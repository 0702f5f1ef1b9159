//! The install pipeline: stream one artifact from the server into the inactive slot and prove
//! it arrived intact.
//!
//! ```text
//!  async task                    bounded channel   blocking thread
//!  HTTP GET (Range on resume) ─► Chunk::Data … ─► hash ─► (bundle) ─► gz/zst/xz? ─► tar? ─► size guard ─► slot writer
//!   retries + backoff, rate limit                  (as served)          (magic bytes)     (capacity) fills one 256 KiB buffer
//!                                                              writer thread: writes the other one meanwhile (O_DIRECT if allowed),
//!                                                                             bounded dirty pages, durable checkpoints
//!                                                              read-back thread: every 8 MiB window that reached the device ─► sha256
//!                                       end: hash check ─► fsync ─► read back the rest, compare sha256 ─► Installed
//! ```
//!
//! Safety before the first byte: the slot is opened without create/truncate (a regular
//! file's size is its capacity), is not the booted slot (path, symlinks, major:minor) and holds
//! no mounted filesystem (`/proc/self/mountinfo`, O_EXCL on block devices). An image too
//! large for the slot fails before the first byte when its size is known: raw = the artifact
//! size, tar = the member's header, gzip = at least the trailer's ISIZE (fetched with a 4-byte
//! Range request when the first bytes show gzip). A decoder that still overruns the slot stops
//! at once.
//! The caller (the driver) marks the slot bad in the bootloader before calling [`install`].
//!
//! Delta: with a trusted key, the head of the artifact is read first; a signed chunked bundle
//! then fetches only the chunks the running slot lacks ([`delta`]), anything else goes the
//! way above.
//!
//! Resume: within one run, network faults are resumed with Range requests; across restarts,
//! raw images continue from the last durable checkpoint, plain gzip images from the last deflate
//! block boundary before it ([`gunzip`]), plain zstd images from the last block boundary before
//! it (frames with a content checksum and a window of at most 8 MiB, [`unzstd`]), a raw image
//! in a plain tar or signed bundle by replaying the artifact's head (fetched again) and the
//! slot's bytes through the same reading path, delta installs from the chunk at it (see
//! [`resume`]).
//!
//! Layout: [`source`] (download), [`pipeline`] (blocking stage), [`decode`] (format
//! detection), [`gunzip`] (gzip with resume points), [`unzstd`] (zstd with resume points),
//! [`compress`] (zstd and xz decoders), [`chunked`] (chunked bundles, formats 2 and 3),
//! [`delta`] (delta installs of them), [`archive`] (tar rules), [`slot`] (slot safety and
//! writer), [`hash`], [`sha256_state`], [`resume`], [`bundle`] (signed-bundle seam), [`error`].

pub mod archive;
pub mod bundle;
pub mod chunked;
pub mod compress;
pub mod decode;
pub mod delta;
pub mod error;
pub mod gunzip;
pub mod hash;
pub mod pipeline;
pub mod resume;
pub mod sha256_state;
pub mod slot;
pub mod source;
pub mod unxz;
pub mod unzstd;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;

pub use bundle::BundlePolicy;
pub use error::InstallError;

use pipeline::{Counters, SinkPlan};
use slot::SlotDevice;

/// The hashes the server announced for the artifact (lower- or upper-case hex).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExpectedHash {
    pub sha256: Option<String>,
    pub sha1: Option<String>,
    pub md5: Option<String>,
}

/// One artifact to install into one slot.
#[derive(Debug, Clone, Default)]
pub struct InstallRequest {
    /// Artifact link href (download-http or download).
    pub url: String,
    /// e.g. ("Authorization", "TargetToken x"); the driver decides the same-host policy.
    pub auth_header: Option<(String, String)>,
    pub expected: ExpectedHash,
    /// Artifact size from the server.
    pub size: Option<u64>,
    pub filename: String,
    /// The version the server gave for the artifact's software module (the deployment chunk's
    /// `version`; empty if none): a delta install needs a signed bundle of this version.
    pub version: String,
    /// Target slot (block device or regular file).
    pub slot_path: PathBuf,
    /// Never written.
    pub booted_slot_path: Option<PathBuf>,
    /// State file for resume across restarts (in state_dir).
    pub resume_path: PathBuf,
    /// Bytes per second.
    pub max_rate: Option<u64>,
    /// Signature policy; None = plain images.
    pub bundle: Option<BundlePolicy>,
    /// A local install (`ddi-agent install SOURCE`), never a server's artifact: no hash was
    /// announced (a signed bundle's signature or the format's own checks are the proof, see
    /// [`crate::local_install`]), and nothing is resumed across restarts.
    pub local: bool,
    /// With `local`: read the image from this file instead of downloading `url`.
    pub local_file: Option<PathBuf>,
}

/// Progress, reported at most about once per second.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Downloading {
        done: u64,
        total: Option<u64>,
    },
    Verifying {
        done: u64,
        total: u64,
    },
    /// Once, before a delta install downloads: what it downloads and reuses.
    Delta(delta::DeltaSummary),
}

/// The result of a successful install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Installed {
    /// Image bytes on the slot (after decompression / extraction).
    pub bytes_written: u64,
    /// sha256 of those bytes, as read back from the slot.
    pub sha256_of_slot_image: String,
}

/// How network faults are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Faults in a row (without receiving a byte in between) before giving up.
    pub attempts: u32,
    pub first_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The backoff schedule of [`crate::http_policy`] for these bounds.
    pub fn schedule(&self) -> crate::http_policy::Backoff {
        crate::http_policy::Backoff {
            first: self.first_backoff,
            max: self.max_backoff,
        }
    }

    /// The nominal backoff for the `failure`-th fault in a row (1-based); the wait adds
    /// jitter and honours `Retry-After` ([`crate::http_policy::Backoff::wait`]).
    pub fn backoff(&self, failure: u32) -> Duration {
        self.schedule().nominal(failure)
    }
}

/// Knobs beyond the request; `Default` is what production uses.
#[derive(Debug, Clone)]
pub struct InstallOptions {
    pub retry: RetryPolicy,
    /// A connection that delivers nothing for this long counts as a network fault.
    pub stall_timeout: Duration,
    /// The image member of a tar artifact holding several files.
    pub archive_member: Option<String>,
    /// The mount table checked for the slot (`/proc/self/mountinfo`).
    pub mountinfo: PathBuf,
    /// Minimum time between progress callbacks.
    pub progress_interval: Duration,
    /// Bytes between durable checkpoints of a raw image (resume points after a power cut).
    pub checkpoint_interval: u64,
}

impl Default for InstallOptions {
    fn default() -> Self {
        InstallOptions {
            retry: RetryPolicy::default(),
            stall_timeout: Duration::from_secs(60),
            archive_member: None,
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            progress_interval: Duration::from_secs(1),
            checkpoint_interval: slot::CHECKPOINT_INTERVAL,
        }
    }
}

/// Install the artifact of `req` into its slot with the default options.
pub async fn install(
    client: &reqwest::Client,
    req: &InstallRequest,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Installed, InstallError> {
    install_with(client, req, &InstallOptions::default(), progress).await
}

/// Reads the first `bytes` of the slot back and compares their sha256 with `sha256`: proves
/// that an image written earlier (a download-only action's) is still there, byte for byte.
/// The slot is opened as for an install (not the booted slot, nothing mounted) but only read.
pub fn verify_slot_image(
    slot_path: &std::path::Path,
    booted_slot_path: Option<&std::path::Path>,
    bytes: u64,
    sha256: &str,
) -> Result<(), InstallError> {
    let mut slot = slot::open(
        slot_path,
        booted_slot_path,
        std::path::Path::new("/proc/self/mountinfo"),
    )?;
    if bytes == 0 {
        return Err(InstallError::EmptyImage);
    }
    if bytes > slot.capacity() {
        return Err(InstallError::TooLarge {
            slot: slot_path.to_path_buf(),
            image_size: bytes,
            at_least: false,
            capacity: slot.capacity(),
        });
    }
    let mut hasher = hash::Hasher::new(hash::HashAlgorithm::Sha256);
    slot::read_range(&mut slot, bytes, |data| hasher.update(data), |_| {})?;
    let actual = hasher.finish_hex();
    if !actual.eq_ignore_ascii_case(sha256) {
        return Err(InstallError::HashMismatch {
            algorithm: "sha256 of the slot image",
            expected: sha256.to_string(),
            actual,
        });
    }
    Ok(())
}

/// Channel between download and write: at most this many chunks ...
const CHANNEL_CHUNKS: usize = 64;
/// ... and about this many bytes (hyper's chunks reach ~400 KiB on a fast link, so the
/// chunk count alone would let ~30 MiB pile up while the slot waits for writeback). Chunks
/// travel as 64 KiB copies, so 256 KiB keeps four in flight; the socket buffer absorbs the
/// rest while the slot writes. 2 MiB cost ~2 MiB of peak RSS, 1 MiB ~0.5 MiB (issue 19,
/// BENCHMARKS.md).
pub(crate) const CHANNEL_BYTES: usize = 256 << 10;

/// [`install`] with explicit options.
pub async fn install_with(
    client: &reqwest::Client,
    req: &InstallRequest,
    options: &InstallOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Installed, InstallError> {
    if req.url.is_empty() && req.local_file.is_none() {
        return Err(InstallError::InvalidRequest(
            "the artifact has no download URL".into(),
        ));
    }
    let (algorithm, expected) = if req.local {
        (hash::HashAlgorithm::Sha256, String::new())
    } else {
        hash::choose(&req.expected)?
    };
    // A local file is opened before the slot: a missing file touches nothing.
    let local_file = match req.local_file.as_deref().filter(|_| req.local) {
        Some(path) => Some(source::open_file(path).await?),
        None => None,
    };
    let slot = slot::open(
        &req.slot_path,
        req.booted_slot_path.as_deref(),
        &options.mountinfo,
    )?;
    let capacity = slot.capacity();

    let record = resume::load(&req.resume_path);
    let resumable = req.bundle.is_none() && !req.local;
    let start = match &record {
        Some(record) if resumable => record
            .resume_offset(
                &req.slot_path,
                algorithm.name(),
                &expected,
                req.size,
                capacity,
            )
            .unwrap_or(0),
        _ => 0,
    };
    let target = resume::Target {
        slot: &req.slot_path,
        algorithm: algorithm.name(),
        expected_hash: &expected,
        size: req.size,
        capacity,
    };
    // A gzip, zstd or xz image: plain, or under a signature policy in a signed bundle (the
    // bundle's head is fetched again and its signature checked again).
    let signed = req.bundle.is_some();
    let decoder_record = record.as_ref().filter(|_| !req.local && start == 0);
    let gzip_point = decoder_record.and_then(|r| r.gzip_point(&target, signed));
    let zstd_point = decoder_record.and_then(|r| r.zstd_point(&target, signed));
    let xz_point = decoder_record.and_then(|r| r.xz_point(&target, signed));
    // A raw image member of a tar or signed bundle: also under a signature policy (the
    // replay goes through the bundle reader again).
    let member_point = match &record {
        Some(record) if !req.local && start == 0 => {
            record.member_point(&target, req.bundle.is_some())
        }
        _ => None,
    };
    let spec = source_spec(req, options);
    // A chunked bundle signed by a trusted key downloads only what the device lacks.
    // Not for a local install: its source is a file, or a URL resumed from nothing.
    let delta = match req.bundle.as_ref().filter(|_| !req.local) {
        Some(policy) => match delta::probe(client, &spec, policy, capacity, &req.version).await {
            delta::Probe::Delta(signed) => Some(signed),
            delta::Probe::Full(why) => {
                tracing::info!(reason = %why, "no delta install; downloading the whole artifact");
                None
            }
        },
        None => None,
    };

    let result = if let Some(signed) = delta {
        let signed = Arc::new(signed);
        let resume_at = record
            .and_then(|r| {
                r.chunks_offset(
                    &req.slot_path,
                    &expected,
                    &signed.image_sha256,
                    signed.image_size,
                )
            })
            .unwrap_or(0);
        if resume_at == 0 {
            resume::remove(&req.resume_path)?;
        }
        let resumed = run_delta(
            client,
            req,
            options,
            progress,
            slot,
            Arc::clone(&signed),
            resume_at,
            expected.clone(),
            spec.clone(),
        )
        .await;
        match resumed {
            // The slot was written behind the agent's back since the checkpoint: what is on
            // it cannot be trusted, but the bundle may well be fine. Start over, once.
            Err(e @ InstallError::ResumedPrefixMismatch { .. }) => {
                tracing::warn!(error = %e, "starting the install over from byte 0");
                let slot = start_over(req, options)?;
                run_delta(
                    client,
                    req,
                    options,
                    progress,
                    slot,
                    signed,
                    0,
                    expected.clone(),
                    spec,
                )
                .await
            }
            other => other,
        }
    } else {
        // A gzip or zstd image continues only if the slot still holds what the record says.
        let (slot, gzip_resume) = match gzip_point {
            Some(point) => {
                read_slot_prefix(slot, move |s| pipeline::read_gzip_prefix(s, point)).await?
            }
            None => (slot, None),
        };
        let (slot, zstd_resume) = match zstd_point {
            Some(point) => {
                read_slot_prefix(slot, move |s| pipeline::read_zstd_prefix(s, point)).await?
            }
            None => (slot, None),
        };
        let (slot, xz_resume) = match xz_point {
            Some(point) => {
                read_slot_prefix(slot, move |s| pipeline::read_xz_prefix(s, point)).await?
            }
            None => (slot, None),
        };
        let replay = match member_point {
            Some(point) => replay_head(client, &spec, &slot, point).await?,
            None => None,
        };
        let mut from = Resume {
            start,
            gzip_resume,
            zstd_resume,
            xz_resume,
            replay,
            bundle_head: None,
        };
        if let Some(len) = from.bundle_member_offset() {
            from.bundle_head = fetch_head(client, &spec, len).await?;
            if from.bundle_head.is_none() {
                // Without the head the signature cannot be checked again: start over.
                from.gzip_resume = None;
                from.zstd_resume = None;
                from.xz_resume = None;
            }
        }
        if let Some((offset, image_offset)) = from.decoder_point() {
            tracing::info!(slot = %req.slot_path.display(), offset, image_offset, "resuming download");
        } else if let Some(replay) = &from.replay {
            let point = &replay.point;
            tracing::info!(slot = %req.slot_path.display(), offset = point.artifact_offset(), image_offset = point.slot_offset, head = point.member_offset, "resuming download");
        } else if start == 0 {
            resume::remove(&req.resume_path)?;
        } else {
            tracing::info!(slot = %req.slot_path.display(), offset = start, "resuming download");
        }
        tracing::info!(file = %req.filename, url = %req.url, slot = %req.slot_path.display(), capacity, "installing");
        let resumed_decoder = from.decoder_point().is_some();
        // A bundle's head fetched again and checked through the bundle reader fails as a
        // replay's does.
        let replayed = from.replay.is_some() || from.bundle_head.is_some();
        let result = run(
            client,
            req,
            options,
            progress,
            slot,
            algorithm,
            expected.clone(),
            from,
            local_file,
            spec.clone(),
        )
        .await;
        match result {
            // gzip: the record's fields not covered by the slot's sha256 (the CRC-32, the
            // unused bits, the artifact offset and hash state) were wrong, or the resume point
            // was; zstd: the same, with its `zstd_state` for the CRC-32 and bits (a wrong one
            // fails the frame's content checksum at the latest). Replay: the slot's prefix
            // changed (a hash or the signature fails), or the record does not fit the artifact.
            // A clean download may well succeed: start over from byte 0, once, as a delta
            // install does after `ResumedPrefixMismatch`.
            Err(e)
                if (resumed_decoder && decoder_resume_failed(&e))
                    || (replayed && replay_failed(&e)) =>
            {
                tracing::warn!(error = %e, "the resume failed; starting the install over from byte 0");
                let slot = start_over(req, options)?;
                let from = Resume {
                    start: 0,
                    gzip_resume: None,
                    zstd_resume: None,
                    xz_resume: None,
                    replay: None,
                    bundle_head: None,
                };
                run(
                    client, req, options, progress, slot, algorithm, expected, from, None, spec,
                )
                .await
            }
            other => other,
        }
    };
    match &result {
        // Keep the record: a later attempt continues from it.
        Err(e) if e.is_retryable() || matches!(e, InstallError::Aborted) => {}
        // Done or failed for good: the next install starts over. A record that cannot be
        // removed is harmless (a resume re-verifies what is on the slot), so only warn.
        _ => {
            if let Err(e) = resume::remove(&req.resume_path) {
                tracing::warn!(error = %e, "cannot remove the resume record");
            }
        }
    }
    result
}

/// A gzip, zstd or xz resume failed in a way a clean download may not (see [`install_with`]);
/// in a tar's image member also a head that does not fit the rest of the archive.
fn decoder_resume_failed(e: &InstallError) -> bool {
    matches!(
        e,
        InstallError::Decode { .. }
            | InstallError::HashMismatch { .. }
            | InstallError::TooLarge { .. }
            | InstallError::ReplayMismatch { .. }
            | InstallError::ArchiveRejected(_)
    )
}

/// A replay resume failed in a way a clean download may not: every check of the replayed
/// bytes, and a record that does not fit the artifact.
fn replay_failed(e: &InstallError) -> bool {
    decoder_resume_failed(e)
        || matches!(
            e,
            InstallError::ReplayMismatch { .. }
                | InstallError::Signature(_)
                | InstallError::Bundle(_)
                | InstallError::ArchiveRejected(_)
                | InstallError::ReadBackMismatch { .. }
                | InstallError::EmptyImage
                | InstallError::Internal(_)
        )
}

/// The artifact's head for a replay resume at `point` (one Range request); None when the
/// replay is not possible (the slot has no second handle to read from, or [`fetch_head`]
/// found none): the install starts over.
async fn replay_head(
    client: &reqwest::Client,
    spec: &source::SourceSpec,
    slot: &slot::FileSlot,
    point: resume::MemberPoint,
) -> Result<Option<pipeline::Replay>, InstallError> {
    if slot.reader().is_none() {
        return Ok(None);
    }
    let head = fetch_head(client, spec, point.member_offset).await?;
    Ok(head.map(|head| pipeline::Replay { point, head }))
}

/// The artifact's first `len` bytes, fetched again for a resume (one Range request); None when
/// the server ignores the Range or answers something else (the install starts over). A network
/// fault that outlasts the retries is returned (the record is kept for the next attempt).
async fn fetch_head(
    client: &reqwest::Client,
    spec: &source::SourceSpec,
    len: u64,
) -> Result<Option<Vec<u8>>, InstallError> {
    let counters = Counters::new(0, None);
    match source::fetch_bytes(client, spec, 0, len, &counters).await {
        Ok(got) if !got.range_ignored && got.bytes.len() as u64 == len => Ok(Some(got.bytes)),
        Ok(_) => {
            tracing::warn!("the server does not serve the artifact's head as asked; starting over");
            Ok(None)
        }
        Err(e) if e.is_retryable() => Err(e),
        Err(e) => {
            tracing::warn!(error = %e, "cannot fetch the artifact's head again; starting over");
            Ok(None)
        }
    }
}

/// Read the slot's prefix for a resume point (`read`, on a blocking thread); the slot back
/// with what it found.
async fn read_slot_prefix<T: Send + 'static>(
    mut slot: slot::FileSlot,
    read: impl FnOnce(&mut slot::FileSlot) -> Result<Option<T>, InstallError> + Send + 'static,
) -> Result<(slot::FileSlot, Option<T>), InstallError> {
    tokio::task::spawn_blocking(move || read(&mut slot).map(|resume| (slot, resume)))
        .await
        .map_err(|e| InstallError::Internal(format!("slot read died: {e}")))?
}

/// A resumed install failed in a way a clean download may not: drop the record and open the
/// slot again for an install from byte 0.
fn start_over(
    req: &InstallRequest,
    options: &InstallOptions,
) -> Result<slot::FileSlot, InstallError> {
    resume::remove(&req.resume_path)?;
    slot::open(
        &req.slot_path,
        req.booted_slot_path.as_deref(),
        &options.mountinfo,
    )
}

fn source_spec(req: &InstallRequest, options: &InstallOptions) -> source::SourceSpec {
    source::SourceSpec {
        url: req.url.clone(),
        auth_header: req.auth_header.clone(),
        size: req.size,
        max_rate: req.max_rate,
        retry: options.retry,
        stall_timeout: options.stall_timeout,
        requests: source::RequestBudget::default(),
    }
}

/// A delta install (see [`delta`]): scan the seed, plan, fetch the missing chunks.
#[allow(clippy::too_many_arguments)]
async fn run_delta(
    client: &reqwest::Client,
    req: &InstallRequest,
    options: &InstallOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
    mut slot: slot::FileSlot,
    signed: Arc<delta::SignedBundle>,
    resume_at: u64,
    expected_hash: String,
    spec: source::SourceSpec,
) -> Result<Installed, InstallError> {
    let seed = match &req.booted_slot_path {
        Some(path) => {
            let (path, scan_signed) = (path.clone(), Arc::clone(&signed));
            // An older image is rarely more than twice the size of the new one; the rest of a
            // large partition is not worth reading.
            let limit = signed.image_size.saturating_mul(2);
            let scanned = tokio::task::spawn_blocking(move || {
                let scan =
                    delta::SeedSlot::scan(&path, scan_signed.params, &scan_signed.index, limit);
                (path, scan)
            })
            .await
            .map_err(|e| InstallError::Internal(format!("seed scan died: {e}")))?;
            match scanned {
                (_, Ok(seed)) => Some(seed),
                (path, Err(e)) => {
                    tracing::warn!(seed = %path.display(), error = %e, "the running slot cannot be read; downloading every chunk");
                    None
                }
            }
        }
        None => None,
    };
    let plan = delta::plan(&signed.index, seed.as_ref(), resume_at);
    let summary = delta::summarize(&signed, &plan, resume_at);
    tracing::info!(file = %req.filename, slot = %req.slot_path.display(), "{}", summary.describe("the running slot"));
    progress(Progress::Delta(summary));

    let counters = Arc::new(Counters::new(signed.probe_bytes, Some(summary.download)));
    let (tx, rx) = pipeline::channel(CHANNEL_CHUNKS, CHANNEL_BYTES);
    let base = signed.data_offset;
    let ranges: Vec<(u64, u64)> = plan
        .ranges
        .iter()
        .map(|r| (base + r.start, base + r.end))
        .collect();
    let job = delta::DeltaJob {
        signed,
        ranges: plan.ranges,
        resume_at,
        checkpoint_interval: options.checkpoint_interval,
        url: req.url.clone(),
        resume_path: req.resume_path.clone(),
        expected_hash,
        artifact_size: req.size,
        side: delta::SideFetch {
            runtime: tokio::runtime::Handle::current(),
            client: client.clone(),
            spec: spec.clone(),
        },
    };
    let _stop_on_drop = StopOnDrop(Arc::clone(&counters));
    let sink_counters = Arc::clone(&counters);
    let sink = tokio::task::spawn_blocking(move || {
        delta::write_delta(
            &job,
            &mut slot as &mut dyn SlotDevice,
            rx,
            &sink_counters,
            seed.as_ref(),
        )
    });
    let source = source::fetch_ranges(client, &spec, &ranges, tx, &counters);
    drive(source, sink, &counters, options, progress).await
}

/// Where [`run`] continues an interrupted install: a raw image at `start`, a gzip or zstd
/// image at its resume point, or a raw image member by replay (`start` is then 0).
struct Resume {
    start: u64,
    gzip_resume: Option<pipeline::GzipResume>,
    zstd_resume: Option<pipeline::ZstdResume>,
    xz_resume: Option<pipeline::XzResume>,
    replay: Option<pipeline::Replay>,
    /// A gzip, zstd or xz resume in a signed bundle: the artifact's bytes before its image
    /// member's data, fetched again.
    bundle_head: Option<Vec<u8>>,
}

impl Resume {
    /// The artifact and image offsets of a gzip, zstd or xz resume point (the image offset
    /// without a tar's head).
    fn decoder_point(&self) -> Option<(u64, u64)> {
        self.with_decoder_point(|p| (p.download_from(), p.slot_offset()))
    }

    /// Where the image member's data starts of the signed bundle a gzip, zstd or xz resume
    /// point is in.
    fn bundle_member_offset(&self) -> Option<u64> {
        self.with_decoder_point(|p| p.member_offset()).flatten()
    }

    fn with_decoder_point<T>(&self, f: impl Fn(&dyn resume::DecoderPoint) -> T) -> Option<T> {
        let gzip = self.gzip_resume.as_ref().map(|r| f(&r.point));
        let zstd = self.zstd_resume.as_ref().map(|r| f(&r.point));
        let xz = self.xz_resume.as_ref().map(|r| f(&r.point));
        gzip.or(zstd).or(xz)
    }
}

#[allow(clippy::too_many_arguments)]
async fn run(
    client: &reqwest::Client,
    req: &InstallRequest,
    options: &InstallOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
    mut slot: slot::FileSlot,
    algorithm: hash::HashAlgorithm,
    expected: String,
    from: Resume,
    local_file: Option<source::LocalFile>,
    spec: source::SourceSpec,
) -> Result<Installed, InstallError> {
    // The artifact offset the download starts at.
    let download_from = match (from.decoder_point(), &from.replay) {
        (Some((artifact_offset, _)), _) => artifact_offset,
        (_, Some(replay)) => replay.point.artifact_offset(),
        _ => from.start,
    };
    let bundle_image_at = from.bundle_member_offset();
    let Resume {
        start,
        gzip_resume,
        zstd_resume,
        xz_resume,
        replay,
        bundle_head,
    } = from;
    let size = local_file.as_ref().map(|f| f.size).or(req.size);
    let counters = Arc::new(Counters::new(download_from, size));
    if replay.is_some() {
        // The replay reads the head and the slot's prefix first, and counts them.
        counters.consumed.store(0, Ordering::Relaxed);
    }
    if let Some(isize) = local_file.as_ref().and_then(|f| f.gzip_isize) {
        counters.gzip_isize.store(isize, Ordering::Release);
    }
    let (tx, rx) = pipeline::channel(CHANNEL_CHUNKS, CHANNEL_BYTES);
    let plan = SinkPlan {
        url: req.url.clone(),
        algorithm,
        expected,
        size,
        start,
        resume_path: req.resume_path.clone(),
        archive_member: options.archive_member.clone(),
        bundle: req.bundle.clone(),
        // A local install is started over, never resumed: no checkpoints.
        checkpoint_interval: if req.local {
            u64::MAX
        } else {
            options.checkpoint_interval
        },
        gzip_resume,
        zstd_resume,
        xz_resume,
        replay,
        bundle_image_at,
        bundle_head,
        artifact_sha256: None,
    };
    // If this future is dropped (cancelled), the blocking stage stops at its next read.
    let _stop_on_drop = StopOnDrop(Arc::clone(&counters));
    let sink_counters = Arc::clone(&counters);
    let sink = tokio::task::spawn_blocking(move || {
        pipeline::run(plan, &mut slot as &mut dyn SlotDevice, rx, &sink_counters)
    });
    let source = async {
        match local_file {
            Some(file) => source::feed_file(file.file, tx, &counters).await,
            None => source::fetch(client, &spec, download_from, tx, &counters).await,
        }
    };
    drive(source, sink, &counters, options, progress).await
}

/// Run the download and the blocking stage to their end, reporting progress.
async fn drive(
    source: impl std::future::Future<Output = Result<(), InstallError>>,
    mut sink: tokio::task::JoinHandle<Result<Installed, InstallError>>,
    counters: &Counters,
    options: &InstallOptions,
    progress: &mut (dyn FnMut(Progress) + Send),
) -> Result<Installed, InstallError> {
    tokio::pin!(source);

    let mut ticker = tokio::time::interval(options.progress_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_reported = None;
    let mut source_result: Option<Result<(), InstallError>> = None;
    let sink_result = loop {
        tokio::select! {
            r = &mut source, if source_result.is_none() => source_result = Some(r),
            r = &mut sink => break r,
            _ = ticker.tick() => {
                let now = current_progress(counters);
                if last_reported != Some(now) {
                    progress(now);
                    last_reported = Some(now);
                }
            }
        }
    };
    let sink_result =
        sink_result.map_err(|e| InstallError::Internal(format!("install stage died: {e}")))?;
    match sink_result {
        Ok(installed) => Ok(installed),
        Err(sink_error) => {
            // When the download side failed, that is the cause; what the blocking stage saw
            // (an aborted stream, wrapped by a decoder or the bundle reader) is a consequence.
            // A source that is still running is not waited for (it may be mid-request),
            // except after `Aborted`, which means it already stopped.
            let source_result = match source_result {
                Some(r) => Some(r),
                None if matches!(sink_error, InstallError::Aborted) => Some(source.await),
                None => (&mut source).now_or_never(),
            };
            match source_result {
                Some(Err(source_error)) => Err(source_error),
                _ => Err(sink_error),
            }
        }
    }
}

/// Tells the blocking stage to stop when the install future goes away.
struct StopOnDrop(Arc<Counters>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.stopped.store(true, Ordering::Release);
    }
}

fn current_progress(counters: &Counters) -> Progress {
    if counters.verifying.load(Ordering::Acquire) {
        Progress::Verifying {
            done: counters.verify_done.load(Ordering::Relaxed),
            total: counters.verify_total.load(Ordering::Relaxed),
        }
    } else {
        Progress::Downloading {
            done: counters.downloaded.load(Ordering::Relaxed),
            total: counters.total(),
        }
    }
}

#[cfg(test)]
mod range_tests;
#[cfg(test)]
mod tests;
