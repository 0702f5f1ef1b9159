//! The blocking stage of the install: artifact bytes arrive from the download task over a
//! bounded channel and go through hash -> (bundle) -> gzip, zstd or xz / tar -> size guard ->
//! slot writer; then the hash is checked, the slot synced and read back.
//!
//! It runs on a blocking thread (`spawn_blocking`) because decoders and file writes are
//! blocking `Read`/`Write` code. The slot writer writes on a thread of its own (and reads back
//! on another), so this thread decodes and hashes the next buffer while the previous one is
//! written.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, Cursor, Read};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, Semaphore};

use super::archive::{self, ImageSink};
use super::bundle::{self, BundlePolicy};
use super::chunked;
use super::compress;
use super::decode::{self, DownloadAborted, Format};
use super::gunzip::{self, GzDecoder};
use super::hash::{self, HashAlgorithm, Hasher, HashingReader, SharedSha256};
use super::resume::{
    self, DecoderPoint, GzipPoint, MemberPoint, ResumeRecord, XzPoint, ZstdPoint,
    MAX_MEMBER_OFFSET, MAX_TAR_HEAD,
};
use super::sha256_state::Sha256State;
use super::slot::{self, SlotDevice, SlotWriter};
use super::unxz::{self, XzDecoder};
use super::unzstd::{self, ResumePrefix, ZstdDecoder};
use super::{InstallError, Installed};

/// What the download task sends.
#[derive(Debug)]
pub enum Chunk {
    Data(Bytes),
    /// The artifact is complete. A channel closed without it means "aborted".
    End,
}

/// Bytes of artifact data that may sit between the download task and the blocking stage,
/// counted in KiB permits. hyper hands out chunks of up to ~400 KiB, so a bound in chunks
/// alone lets tens of MiB pile up while the slot waits for writeback.
#[derive(Debug, Clone)]
pub struct Budget {
    permits: Arc<Semaphore>,
    total: u32,
}

/// Largest piece of a chunk sent over the channel (see [`ChunkSender::send_data`]); well under
/// glibc's mmap threshold (128 KiB), so pieces come from the heap, not fresh mappings.
const PIECE: usize = 64 << 10;

/// The reader returns permits in batches of this many KiB (at most half the budget), so that
/// a parked download task is woken once per batch and not for every small chunk.
const RELEASE_BATCH_KIB: u32 = 512;

impl Budget {
    pub fn new(bytes: usize) -> Self {
        let total = bytes.div_ceil(1024).max(1) as u32;
        Budget {
            permits: Arc::new(Semaphore::new(total as usize)),
            total,
        }
    }

    /// Permits a chunk of `len` bytes holds; a chunk larger than the whole budget takes all
    /// of it (it is already in memory, waiting for more would deadlock).
    fn permits_for(&self, len: usize) -> u32 {
        (len.div_ceil(1024) as u64).min(u64::from(self.total)) as u32
    }

    /// Wait until a chunk of `len` bytes fits; false when the blocking stage is gone.
    async fn reserve(&self, len: usize) -> bool {
        match self.permits.acquire_many(self.permits_for(len)).await {
            Ok(permit) => {
                permit.forget();
                true
            }
            Err(_) => false,
        }
    }
}

/// The download side of the channel: bounded in chunks and in bytes.
#[derive(Debug)]
pub struct ChunkSender {
    tx: mpsc::Sender<Chunk>,
    budget: Budget,
}

impl ChunkSender {
    /// Send one chunk, copied in pieces of at most [`PIECE`] bytes, each once the budget has
    /// room; false when the blocking stage is gone.
    ///
    /// hyper's chunks are slices of its read buffer: one held in the channel makes hyper
    /// allocate a fresh buffer (up to ~400 KiB) for its next read, and these large blocks
    /// churn and fragment the heap. Copies let hyper reuse its buffer as soon as the chunk is
    /// dropped here, and small pieces of one size reuse each other's memory (issue 19: about
    /// 0.3 MiB of peak RSS for one memcpy of the artifact on the download thread).
    pub async fn send_data(&self, data: Bytes) -> bool {
        for piece in data.chunks(PIECE) {
            if !(self.budget.reserve(piece.len()).await
                && self
                    .tx
                    .send(Chunk::Data(Bytes::copy_from_slice(piece)))
                    .await
                    .is_ok())
            {
                return false;
            }
        }
        true
    }

    /// Mark the artifact complete.
    pub async fn send_end(&self) {
        let _ = self.tx.send(Chunk::End).await;
    }
}

/// The blocking side of the channel. Without a budget (tests that fill the channel before
/// running the stage) it is bounded in chunks only.
#[derive(Debug)]
pub struct ChunkReceiver {
    rx: mpsc::Receiver<Chunk>,
    budget: Option<Budget>,
    /// Permits of consumed chunks not yet returned (see [`RELEASE_BATCH_KIB`]).
    unreleased: u32,
}

impl ChunkReceiver {
    /// Return the permits of a consumed chunk; `flush` returns the batch at once (before
    /// waiting for the next chunk, so that a parked sender can send it).
    fn release(&mut self, len: usize, flush: bool) {
        if let Some(budget) = &self.budget {
            self.unreleased += budget.permits_for(len);
            let batch = RELEASE_BATCH_KIB.min(budget.total / 2).max(1);
            if self.unreleased > 0 && (flush || self.unreleased >= batch) {
                budget.permits.add_permits(self.unreleased as usize);
                self.unreleased = 0;
            }
        }
    }
}

impl Drop for ChunkReceiver {
    fn drop(&mut self) {
        // Wake a download task waiting for room: nobody will make any.
        if let Some(budget) = &self.budget {
            budget.permits.close();
        }
    }
}

impl From<mpsc::Receiver<Chunk>> for ChunkReceiver {
    fn from(rx: mpsc::Receiver<Chunk>) -> Self {
        ChunkReceiver {
            rx,
            budget: None,
            unreleased: 0,
        }
    }
}

/// A channel of at most `chunks` chunks and about `bytes` bytes.
pub fn channel(chunks: usize, bytes: usize) -> (ChunkSender, ChunkReceiver) {
    let (tx, rx) = mpsc::channel(chunks);
    let budget = Budget::new(bytes);
    let receiver = ChunkReceiver {
        rx,
        budget: Some(budget.clone()),
        unreleased: 0,
    };
    (ChunkSender { tx, budget }, receiver)
}

/// Shared between the stages and the progress reporter.
#[derive(Debug)]
pub struct Counters {
    /// Artifact bytes received (including a resumed prefix).
    pub downloaded: AtomicU64,
    /// Artifact size, `u64::MAX` while unknown.
    pub total: AtomicU64,
    /// Artifact bytes consumed by the blocking stage.
    pub consumed: AtomicU64,
    /// For a gzip artifact: the ISIZE field of its trailer (decoded size mod 2^32 of the
    /// last member, so a lower bound of the decoded size), `u64::MAX` while unknown.
    pub gzip_isize: AtomicU64,
    pub verifying: AtomicBool,
    /// Set when the install was dropped: the blocking stage stops reading (and writing).
    pub stopped: AtomicBool,
    pub verify_done: AtomicU64,
    pub verify_total: AtomicU64,
    /// Nanoseconds the blocking stage waited for the download (for the install timeline).
    download_wait_ns: AtomicU64,
}

impl Counters {
    pub fn new(start: u64, total: Option<u64>) -> Self {
        Counters {
            downloaded: AtomicU64::new(start),
            total: AtomicU64::new(total.unwrap_or(u64::MAX)),
            consumed: AtomicU64::new(start),
            gzip_isize: AtomicU64::new(u64::MAX),
            verifying: AtomicBool::new(false),
            stopped: AtomicBool::new(false),
            verify_done: AtomicU64::new(0),
            verify_total: AtomicU64::new(0),
            download_wait_ns: AtomicU64::new(0),
        }
    }

    pub fn total(&self) -> Option<u64> {
        match self.total.load(Ordering::Acquire) {
            u64::MAX => None,
            t => Some(t),
        }
    }

    pub fn gzip_isize(&self) -> Option<u64> {
        match self.gzip_isize.load(Ordering::Acquire) {
            u64::MAX => None,
            n => Some(n),
        }
    }

    /// Time the blocking stage spent waiting for artifact bytes.
    pub fn download_wait(&self) -> Duration {
        Duration::from_nanos(self.download_wait_ns.load(Ordering::Relaxed))
    }

    fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Relaxed)
    }
}

/// Turns the channel into a blocking `Read`.
struct ChannelReader<'a> {
    rx: ChunkReceiver,
    current: Bytes,
    /// Length of the chunk in `current` when it arrived (its permits).
    current_len: usize,
    ended: bool,
    counters: &'a Counters,
}

impl Read for ChannelReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.counters.stopped.load(Ordering::Acquire) {
            return Err(io::Error::other(DownloadAborted));
        }
        while self.current.is_empty() {
            if self.ended {
                return Ok(0);
            }
            let len = std::mem::take(&mut self.current_len);
            let next = match self.rx.rx.try_recv() {
                Ok(chunk) => {
                    self.rx.release(len, false);
                    Some(chunk)
                }
                Err(_) => {
                    self.rx.release(len, true);
                    let began = Instant::now();
                    let next = self.rx.rx.blocking_recv();
                    let waited = began.elapsed().as_nanos() as u64;
                    self.counters
                        .download_wait_ns
                        .fetch_add(waited, Ordering::Relaxed);
                    next
                }
            };
            match next {
                Some(Chunk::Data(b)) => {
                    self.current_len = b.len();
                    self.current = b;
                }
                Some(Chunk::End) => self.ended = true,
                None => return Err(io::Error::other(DownloadAborted)),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current[..n]);
        self.current.advance(n);
        self.counters
            .consumed
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Everything the blocking stage needs to know.
#[derive(Debug, Clone)]
pub struct SinkPlan {
    pub url: String,
    pub algorithm: HashAlgorithm,
    pub expected: String,
    pub size: Option<u64>,
    /// Resume offset of a raw image (0 = from the start).
    pub start: u64,
    pub resume_path: PathBuf,
    pub archive_member: Option<String>,
    pub bundle: Option<BundlePolicy>,
    pub checkpoint_interval: u64,
    /// A plain gzip image continued from a resume record (the download starts at its
    /// artifact offset; `start` is 0).
    pub gzip_resume: Option<GzipResume>,
    /// A plain zstd image continued from a resume record (as `gzip_resume`).
    pub zstd_resume: Option<ZstdResume>,
    /// A plain xz image continued from a resume record (as `gzip_resume`).
    pub xz_resume: Option<XzResume>,
    /// A raw image member of a tar or signed bundle continued from a `member` record (the
    /// download starts after the resume point; `start` is 0).
    pub replay: Option<Replay>,
    /// The gzip, zstd or xz decoder reads a signed bundle's (format 1) image member, whose
    /// data starts at this artifact offset: its resume records are `bundle-` ones.
    pub bundle_image_at: Option<u64>,
    /// A gzip, zstd or xz resume in a signed bundle's image member: the artifact's bytes
    /// before that member's data, fetched again (the bundle's signature is checked again on
    /// them).
    pub bundle_head: Option<Vec<u8>>,
    /// The artifact's sha256 as it is being computed, when a signed bundle's records need its
    /// state (set by the blocking stage itself).
    pub artifact_sha256: Option<SharedSha256>,
}

/// A replay resume (format `member`, see [`resume`]): the artifact's head, fetched again, then
/// the slot's first bytes, then the download go through the reading path of a fresh install.
#[derive(Clone)]
pub struct Replay {
    pub point: MemberPoint,
    /// The artifact's first `point.member_offset` bytes.
    pub head: Vec<u8>,
}

impl std::fmt::Debug for Replay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replay")
            .field("point", &self.point)
            .field("head", &self.head.len())
            .finish()
    }
}

/// A resume point whose slot prefix was read back and matched the record.
#[derive(Clone)]
pub struct PrefixResume<P, W = Vec<u8>> {
    pub point: P,
    /// sha256 of the slot's bytes before the point (starts the image and read-back hashes).
    pub prefix_hash: Sha256,
    /// gzip: the output's last [`gunzip::WINDOW`] bytes before the point (the deflate
    /// dictionary; a tar's head is output too); xz: at a point inside a block, the block's
    /// LZMA2 dictionary filled with the output before the point, at a block boundary none.
    pub window: W,
    /// The slot's last bytes before the point, as the slot writer keeps them.
    pub tail: Vec<u8>,
}

impl<P: std::fmt::Debug> std::fmt::Debug for PrefixResume<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixResume")
            .field("point", &self.point)
            .field("window", &self.window.len())
            .finish_non_exhaustive()
    }
}

impl<P: std::fmt::Debug> std::fmt::Debug for PrefixResume<P, Option<unxz::ResumeWindow>> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrefixResume")
            .field("point", &self.point)
            .field("window", &self.window)
            .finish_non_exhaustive()
    }
}

/// A gzip resume point whose slot prefix was read back and matched the record.
pub type GzipResume = PrefixResume<GzipPoint>;

/// An xz resume point whose slot prefix was read back and matched the record.
pub type XzResume = PrefixResume<XzPoint, Option<unxz::ResumeWindow>>;

/// Read the slot's bytes before a gzip resume point: the resume point when they are still
/// what the interrupted install wrote (their sha256 is the record's), None when the slot was
/// changed since (the install must start over).
pub fn read_gzip_prefix(
    dev: &mut dyn SlotDevice,
    point: GzipPoint,
) -> Result<Option<GzipResume>, InstallError> {
    // The decoder's CRC-32 of the output so far (a boundary is only ever in the first member,
    // so it covers the whole prefix): a record whose crc32 is off would fail the trailer check
    // only after the whole download.
    let mut crc = 0u32;
    let mut window = slot::PrefixTail::keeping(gunzip::WINDOW);
    let (hash, tail) = read_prefix(dev, &point, |b| {
        crc = zlib_rs::crc32::crc32(crc, b);
        window.update(b);
    })?;
    if hex::encode(hash.clone().finalize()) != point.slot_sha256 || crc != point.at.crc {
        return Ok(slot_changed(dev, point.slot_offset()));
    }
    Ok(Some(GzipResume {
        point,
        prefix_hash: hash,
        window: window.into_bytes(),
        tail,
    }))
}

/// [`read_gzip_prefix`] for a zstd resume point: the prefix also goes through the decoder's
/// [`ResumePrefix`] (its window and the frame's checksum so far).
pub fn read_zstd_prefix(
    dev: &mut dyn SlotDevice,
    point: ZstdPoint,
) -> Result<Option<ZstdResume>, InstallError> {
    let mut prefix = ResumePrefix::new(&point.at);
    let (hash, tail) = read_prefix(dev, &point, |b| prefix.update(b))?;
    if hex::encode(hash.clone().finalize()) != point.slot_sha256 {
        return Ok(slot_changed(dev, point.slot_offset()));
    }
    Ok(Some(ZstdResume {
        point,
        prefix_hash: hash,
        tail,
        prefix: Arc::new(Mutex::new(Some(prefix))),
    }))
}

/// [`read_gzip_prefix`] for an xz resume point: at a block boundary the decoder needs
/// nothing of the prefix (xz blocks are independent), inside a block its LZMA2 dictionary's
/// bytes, the output's last ones (a tar's head is output too); the slot writer its last bytes.
pub fn read_xz_prefix(
    dev: &mut dyn SlotDevice,
    point: XzPoint,
) -> Result<Option<XzResume>, InstallError> {
    // Filled in place: the dictionary is the decoder's once the resume starts.
    let mut window = point.at.window();
    let (hash, tail) = read_prefix(dev, &point, |b| {
        if let Some(window) = &mut window {
            window.update(b);
        }
    })?;
    if hex::encode(hash.clone().finalize()) != point.slot_sha256 {
        return Ok(slot_changed(dev, point.slot_offset()));
    }
    Ok(Some(XzResume {
        point,
        prefix_hash: hash,
        window,
        tail,
    }))
}

/// The decoder's output before `point` handed to `each` in order (a tar's head from the
/// record, then the slot's bytes before the point); returns the sha256 of the slot's bytes
/// and their last bytes as the slot writer keeps them.
fn read_prefix(
    dev: &mut dyn SlotDevice,
    point: &impl DecoderPoint,
    mut each: impl FnMut(&[u8]),
) -> Result<(Sha256, Vec<u8>), InstallError> {
    if let Some(head) = point.tar_head() {
        each(head);
    }
    let mut hash = Sha256::new();
    let mut tail = slot::PrefixTail::default();
    slot::read_range(
        dev,
        point.slot_offset(),
        |b| {
            hash.update(b);
            tail.update(b);
            each(b);
        },
        |_| {},
    )?;
    Ok((hash, tail.bytes().to_vec()))
}

/// A resume point at slot offset `at` whose prefix is not what the interrupted install wrote:
/// none (the install starts over).
fn slot_changed<T>(dev: &dyn SlotDevice, at: u64) -> Option<T> {
    tracing::warn!(
        slot = %dev.path().display(),
        resume_at = at,
        "the slot no longer holds what the interrupted install wrote; starting over"
    );
    None
}

/// A zstd resume point whose slot prefix was read back and matched the record.
#[derive(Clone)]
pub struct ZstdResume {
    pub point: ZstdPoint,
    /// sha256 of the slot's bytes before the point (starts the image and read-back hashes).
    pub prefix_hash: Sha256,
    /// The slot's last bytes before the point, as the slot writer keeps them.
    pub tail: Vec<u8>,
    /// The output before the point as the decoder needs it; taken by the blocking stage (the plan is
    /// shared, the decoder owns it).
    prefix: Arc<Mutex<Option<ResumePrefix>>>,
}

impl ZstdResume {
    fn take_prefix(&self) -> Option<ResumePrefix> {
        self.prefix.lock().ok()?.take()
    }
}

impl std::fmt::Debug for ZstdResume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZstdResume")
            .field("point", &self.point)
            .finish_non_exhaustive()
    }
}

impl SinkPlan {
    /// A raw image that is not in a bundle is the artifact byte for byte (including a resumed
    /// prefix, which both hashes covered), so its sha256 artifact hash is the image hash.
    fn artifact_is_image_sha256(&self) -> bool {
        self.bundle.is_none() && self.algorithm == HashAlgorithm::Sha256
    }

    /// In a signed bundle's image member: the artifact hash's state now (it has read at least
    /// as far as the decoder).
    fn artifact_hash_ahead(&self) -> Option<Sha256State> {
        let shared = self.artifact_sha256.as_ref()?;
        self.bundle_image_at.map(|_| hash::lock(shared).clone())
    }

    /// A gzip, zstd or xz image (or a tar inside one) can resume across restarts when nothing
    /// wraps it and its artifact hash is sha256 (whose state [`Sha256State`] can save).
    fn decoder_resumable(&self) -> bool {
        self.bundle.is_none() && self.algorithm == HashAlgorithm::Sha256
    }
}

impl ImageSink for SlotWriter<'_> {
    fn expect_size(&mut self, size: u64) -> Result<(), InstallError> {
        SlotWriter::expect_size(self, size)
    }
    fn write(&mut self, data: &[u8]) -> Result<(), InstallError> {
        SlotWriter::write(self, data)?;
        // No resume records here.
        self.drop_checkpoints();
        Ok(())
    }
}

/// Run the blocking stage to the end: the image is on the slot, synced and verified.
pub fn run(
    mut plan: SinkPlan,
    dev: &mut dyn SlotDevice,
    rx: ChunkReceiver,
    counters: &Counters,
) -> Result<Installed, InstallError> {
    // Taken, not copied: an xz resume inside a block holds the dictionary once.
    let xz_window = plan.xz_resume.as_mut().and_then(|r| r.window.take());
    let plan = &plan;
    let began = Instant::now();
    let channel = channel_reader(rx, counters);
    if let Some(replay) = &plan.replay {
        return run_replay(plan, dev, channel, replay, counters, began);
    }
    if let Some(resume) = &plan.gzip_resume {
        let r = resumed_input(plan, &resume.point, channel, &*dev)?;
        let check = (r.expected.as_str(), r.then);
        return run_gzip(plan, dev, r.input, Some(resume), check, counters, began);
    }
    if let Some(resume) = &plan.zstd_resume {
        let r = resumed_input(plan, &resume.point, channel, &*dev)?;
        let check = (r.expected.as_str(), r.then);
        return run_zstd(plan, dev, r.input, Some(resume), check, counters, began);
    }
    if let Some(resume) = &plan.xz_resume {
        let r = resumed_input(plan, &resume.point, channel, &*dev)?;
        let check = (r.expected.as_str(), r.then);
        let resume = Some((resume, xz_window));
        return run_xz(plan, dev, r.input, resume, check, counters, began);
    }
    if plan.start == 0 && plan.decoder_resumable() {
        let (head, sniffed) = decode::sniff(channel)
            .map_err(|e| decode::read_error(e, Format::Raw, counters.consumed()))?;
        let input: DecoderInput<'_> = Box::new(sniffed);
        let check = (plan.expected.as_str(), None);
        match Format::compression_of(&head) {
            Some(Format::Gzip) => return run_gzip(plan, dev, input, None, check, counters, began),
            Some(Format::Zstd) => return run_zstd(plan, dev, input, None, check, counters, began),
            Some(Format::Xz) => return run_xz(plan, dev, input, None, check, counters, began),
            _ => return run_stream(plan, dev, input, counters, began),
        }
    }
    run_stream(plan, dev, channel, counters, began)
}

/// What every gzip, zstd and xz decoder with resume points reads from: one type, so that each
/// decoder and the code around it ([`run_points`]) is in the binary once (the xz decoder,
/// lzma-rust2's LZMA2 decoder and filters, is ~40 KB of code per instance).
type DecoderInput<'a> = Box<dyn Read + 'a>;

/// What a resumed decoder reads, and how its install is checked in the end.
struct ResumedInput<'a> {
    input: DecoderInput<'a>,
    /// The sha256 the decoder's input must have: the artifact's, or a signed bundle image
    /// member's.
    expected: String,
    /// In a signed bundle: the rest of the artifact read and the artifact's hash checked.
    then: Option<ArtifactCheck<'a>>,
}

/// A check run once the decoder read its input to the end.
type ArtifactCheck<'a> = Box<dyn FnOnce() -> Result<(), InstallError> + 'a>;

/// The input of a decoder resumed at `point`: the download (from the point's byte on), whose
/// sha256 is the artifact's; in a signed bundle's image member, the bundle's head (fetched
/// again) and the download read through the bundle reader, whose signature is checked again,
/// the input's sha256 the member's signed one, and the artifact's own hash continued from the
/// record's state (which ran ahead of the point) over the rest of the download.
fn resumed_input<'a>(
    plan: &SinkPlan,
    point: &impl DecoderPoint,
    channel: impl Read + 'a,
    dev: &dyn SlotDevice,
) -> Result<ResumedInput<'a>, InstallError> {
    let Some(member_offset) = point.member_offset() else {
        return Ok(ResumedInput {
            input: Box::new(channel),
            expected: plan.expected.clone(),
            then: None,
        });
    };
    let (Some(policy), Some(head), Some(ahead)) =
        (&plan.bundle, &plan.bundle_head, point.artifact_hash_ahead())
    else {
        return Err(InstallError::Internal(
            "a resume in a signed bundle without its policy, head or artifact hash".into(),
        ));
    };
    let skip = ahead
        .len()
        .checked_sub(point.download_from())
        .ok_or_else(|| {
            InstallError::Internal("the artifact hash's state is before the resume point".into())
        })?;
    let tail = Rc::new(RefCell::new(AheadHash {
        inner: channel,
        skip,
        hash: ahead.clone(),
    }));
    let expected_artifact = plan.expected.clone();
    let rest = Rc::clone(&tail);
    let then: ArtifactCheck<'a> = Box::new(move || {
        let mut rest = rest.borrow_mut();
        io::copy(&mut *rest, &mut io::sink()).map_err(|e| decode::read_error(e, Format::Raw, 0))?;
        let actual = rest.hash.finish_hex();
        if actual != expected_artifact {
            return Err(InstallError::HashMismatch {
                algorithm: HashAlgorithm::Sha256.name(),
                expected: expected_artifact,
                actual,
            });
        }
        Ok(())
    });
    // The same reader type as a fresh install's bundle reader: one copy of it in the binary.
    let rest: Box<dyn Read + 'a> = Box::new(SharedTail(tail));
    let stream = Read::chain(Cursor::new(head.clone()), rest);
    let mut reader = ddi_bundle::BundleReader::open(stream, &policy.verifier(dev.capacity())?)
        .map_err(|e| bundle::bundle_error(&e))?;
    if reader.data_offset() != member_offset || reader.chunk_index().is_some() {
        return Err(InstallError::ReplayMismatch {
            slot: dev.path().to_path_buf(),
            resume_at: point.slot_offset(),
            why: format!(
                "the bundle's image member is not at artifact offset {member_offset}, where \
                 the resume record says"
            ),
        });
    }
    reader
        .continue_unhashed(point.artifact_offset())
        .map_err(|e| bundle::bundle_error(&e))?;
    let expected = reader.image_sha256().to_ascii_lowercase();
    Ok(ResumedInput {
        input: Box::new(reader),
        expected,
        then: Some(then),
    })
}

/// The download after a resume point in a signed bundle: its first `skip` bytes are in the
/// artifact hash's saved state already, the rest is hashed on.
struct AheadHash<R> {
    inner: R,
    skip: u64,
    hash: Sha256State,
}

impl<R: Read> Read for AheadHash<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let skipped = usize::try_from(self.skip).unwrap_or(usize::MAX).min(n);
        self.skip -= skipped as u64;
        self.hash.update(&buf[skipped..n]);
        Ok(n)
    }
}

/// An [`AheadHash`] the bundle reader reads from while [`resumed_input`]'s check keeps it to
/// read the rest of the artifact in the end.
struct SharedTail<R>(Rc<RefCell<AheadHash<R>>>);

impl<R: Read> Read for SharedTail<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.borrow_mut().read(buf)
    }
}

/// [`run`] for everything but gzip, zstd and xz artifacts with a sha256: hash the artifact as it
/// arrives, decode it by its format.
fn run_stream<R: Read>(
    plan: &SinkPlan,
    dev: &mut dyn SlotDevice,
    input: R,
    counters: &Counters,
    began: Instant,
) -> Result<Installed, InstallError> {
    // A signed bundle's gzip, zstd or xz image keeps the artifact hash's state in its records.
    let shared =
        (plan.bundle.is_some() && plan.start == 0 && plan.algorithm == HashAlgorithm::Sha256)
            .then(SharedSha256::default);
    let with_shared;
    let plan = match &shared {
        Some(shared) => {
            with_shared = SinkPlan {
                artifact_sha256: Some(shared.clone()),
                ..plan.clone()
            };
            &with_shared
        }
        None => plan,
    };
    let mut artifact_hash = match shared {
        Some(shared) => Hasher::SharedSha256(shared),
        None => Hasher::new(plan.algorithm),
    };
    let mut prefix_hash = Sha256::new();
    let mut tail = slot::PrefixTail::default();
    if plan.start > 0 {
        // The hashers cannot be saved: hash the bytes already on the slot again. They are
        // read from the device, so they also count as read back.
        slot::read_range(
            dev,
            plan.start,
            |b| {
                artifact_hash.update(b);
                prefix_hash.update(b);
                tail.update(b);
            },
            |_| {},
        )?;
    }
    let mut hashing = HashingReader::new(input, artifact_hash, plan.start);
    let interval = plan.checkpoint_interval;
    let mut writer = SlotWriter::resume(dev, plan.start, prefix_hash, tail.bytes(), interval);
    let (format, signed_image_sha256) = write_image(plan, &mut hashing, &mut writer, counters)?;
    let actual = check_artifact_hash(plan, hashing, format, counters)?;
    // Without the writer's hash the image is the artifact itself, hashed with sha256 above,
    // or a chunked bundle's image, whose hash is the signed one (see `chunked`).
    let image_sha256 = signed_image_sha256.clone().unwrap_or(actual);
    finish(
        writer,
        counters,
        Some(image_sha256),
        signed_image_sha256.as_deref(),
        began,
    )
}

/// [`run`] for a replay resume (format `member`, see [`resume`]): the artifact's head (fetched
/// again), the slot's first bytes and the download from after them are read as the artifact,
/// through the artifact hash, the bundle reader or the tar rules, exactly as a fresh install
/// reads them. The image bytes before the resume point must be the slot's bytes (same sha256)
/// and are not written again; the slot writer starts there.
fn run_replay<R: Read>(
    plan: &SinkPlan,
    dev: &mut dyn SlotDevice,
    channel: R,
    replay: &Replay,
    counters: &Counters,
    began: Instant,
) -> Result<Installed, InstallError> {
    let point = replay.point;
    let prefix = slot::PrefixReader::new(&*dev, point.slot_offset).ok_or_else(|| {
        InstallError::Internal("the slot has no second handle to replay its bytes from".into())
    })?;
    let slot_hash = Rc::new(RefCell::new(None));
    let slot_part = SlotPart {
        reader: prefix,
        hash: Sha256::new(),
        tail: slot::PrefixTail::default(),
        done: Rc::clone(&slot_hash),
    };
    let replayed = Counted {
        inner: Read::chain(Cursor::new(&replay.head[..]), slot_part),
        counters,
    };
    let mut hashing = HashingReader::new(replayed.chain(channel), Hasher::new(plan.algorithm), 0);
    let capacity = dev.capacity();
    let mut sink = ReplaySink {
        slot: dev.path().to_path_buf(),
        capacity,
        stage: Stage::Skipping {
            dev,
            left: point.slot_offset,
            emitted: Sha256::new(),
        },
        slot_hash,
        plan,
        point,
    };
    let format = replay_image(plan, &mut hashing, &mut sink, capacity, counters);
    if let Stage::Writing(writer) = &mut sink.stage {
        // As in `copy_all`: a checkpoint made durable but not taken yet still counts.
        writer.settle();
    }
    sink.record();
    let format = format?;
    check_artifact_hash(plan, hashing, format, counters)?;
    match sink.stage {
        Stage::Writing(writer) => finish(*writer, counters, None, None, began),
        _ => Err(sink.mismatch("the image ends before it")),
    }
}

/// The reading path of [`run_replay`]: the same bundle reader and tar rules as a fresh install;
/// the image must be found where the record says, and be raw.
fn replay_image<R: Read>(
    plan: &SinkPlan,
    hashing: &mut HashingReader<R>,
    sink: &mut ReplaySink<'_, '_>,
    capacity: u64,
    counters: &Counters,
) -> Result<Format, InstallError> {
    let offset = || counters.consumed();
    let (reader, bundle_at): (Box<dyn Read + '_>, _) = match &plan.bundle {
        Some(policy) => {
            let opened = bundle::open_image(policy, Box::new(hashing), capacity)?;
            let at = opened.data_offset.filter(|_| opened.chunked.is_none());
            (opened.reader, at)
        }
        None => (Box::new(hashing), None),
    };
    let (head, mut sniffed) =
        decode::sniff(reader).map_err(|e| decode::read_error(e, Format::Raw, offset()))?;
    let raw = Format::compression_of(&head).is_none() && !decode::is_tar(&head);
    let point = sink.point;
    let format = match bundle_at {
        Some(at) if point.in_bundle && at == point.member_offset && raw => {
            copy_replayed(&mut sniffed, sink, &offset)?;
            Format::Raw
        }
        None if !point.in_bundle && decode::is_tar(&head) => {
            let member = plan.archive_member.as_deref();
            archive::extract_image(&mut sniffed, Format::Tar, member, capacity, &offset, sink)?;
            Format::Tar
        }
        _ => return Err(sink.mismatch("the artifact does not hold a raw image where it did")),
    };
    // As in `write_image`: to the end of the bundle's image member or of the archive.
    io::copy(&mut sniffed, &mut io::sink()).map_err(|e| decode::read_error(e, format, offset()))?;
    Ok(format)
}

/// A bundle's raw image in [`run_replay`]: through a buffer up to the resume point (skipped),
/// then straight into the slot writer's buffer as in a fresh install.
fn copy_replayed<R: Read>(
    reader: &mut R,
    sink: &mut ReplaySink<'_, '_>,
    offset: &dyn Fn() -> u64,
) -> Result<(), InstallError> {
    let mut buf = vec![0u8; 64 << 10];
    while matches!(sink.stage, Stage::Skipping { .. }) {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(decode::read_error(e, Format::Raw, offset())),
        };
        sink.write(&buf[..n])?;
    }
    drop(buf);
    let (plan, point) = (sink.plan, sink.point);
    match &mut sink.stage {
        Stage::Writing(writer) => copy_all(
            reader,
            writer,
            Format::Raw,
            plan,
            Record::Member(point),
            offset,
        ),
        _ => Ok(()),
    }
}

/// The slot's bytes before a replay's resume point as part of the replayed artifact: hashed
/// as they are read, the sha256 and the last bytes (for the slot writer) published in `done`
/// with the last of them.
struct SlotPart {
    reader: slot::PrefixReader,
    hash: Sha256,
    tail: slot::PrefixTail,
    done: Rc<RefCell<Option<(Sha256, slot::PrefixTail)>>>,
}

impl Read for SlotPart {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.reader.read(buf)?;
        self.hash.update(&buf[..n]);
        self.tail.update(&buf[..n]);
        if n > 0 && self.reader.remaining() == 0 {
            *self.done.borrow_mut() = Some((self.hash.clone(), self.tail.clone()));
        }
        Ok(n)
    }
}

/// Counts the bytes of a replay that do not come through the channel as consumed (error
/// offsets).
struct Counted<'c, R> {
    inner: R,
    counters: &'c Counters,
}

impl<R: Read> Read for Counted<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.counters
            .consumed
            .fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

/// Where a replay's image bytes go: the first `slot_offset` are compared (by sha256) with the
/// slot's and dropped; then a slot writer from there takes the rest and leaves `member`
/// records at its checkpoints.
struct ReplaySink<'a, 'p> {
    slot: PathBuf,
    capacity: u64,
    stage: Stage<'a>,
    /// The slot prefix's sha256 and last bytes, once it was read (see [`SlotPart`]).
    slot_hash: Rc<RefCell<Option<(Sha256, slot::PrefixTail)>>>,
    plan: &'p SinkPlan,
    point: MemberPoint,
}

enum Stage<'a> {
    Skipping {
        dev: &'a mut dyn SlotDevice,
        left: u64,
        /// The image bytes skipped so far.
        emitted: Sha256,
    },
    Writing(Box<SlotWriter<'a>>),
    /// After the comparison failed.
    Failed,
}

impl<'a> ReplaySink<'a, '_> {
    fn mismatch(&self, why: &str) -> InstallError {
        InstallError::ReplayMismatch {
            slot: self.slot.clone(),
            resume_at: self.point.slot_offset,
            why: why.into(),
        }
    }

    /// Skip what is left of the resume point's prefix in `data`; returns the rest. At the
    /// resume point the skipped bytes must be the slot's: then the writer starts there.
    fn skip<'d>(&mut self, data: &'d [u8]) -> Result<&'d [u8], InstallError> {
        let Stage::Skipping { left, emitted, .. } = &mut self.stage else {
            return Ok(data);
        };
        let n = usize::try_from(*left).unwrap_or(usize::MAX).min(data.len());
        emitted.update(&data[..n]);
        *left -= n as u64;
        if *left > 0 {
            return Ok(&data[n..]);
        }
        let Stage::Skipping { dev, emitted, .. } =
            std::mem::replace(&mut self.stage, Stage::Failed)
        else {
            unreachable!("matched above");
        };
        let slot_hash = self.slot_hash.borrow_mut().take();
        let same = slot_hash
            .as_ref()
            .is_some_and(|(h, _)| h.clone().finalize() == emitted.finalize());
        match slot_hash.filter(|_| same) {
            Some((prefix_hash, tail)) => {
                let (start, interval) = (self.point.slot_offset, self.plan.checkpoint_interval);
                let writer = SlotWriter::resume(dev, start, prefix_hash, tail.bytes(), interval);
                self.stage = Stage::Writing(Box::new(writer));
                Ok(&data[n..])
            }
            None => Err(self.mismatch("the image's bytes before it are not the slot's")),
        }
    }

    /// Leave a record when the writer made a new checkpoint durable.
    fn record(&mut self) {
        if let Stage::Writing(writer) = &mut self.stage {
            while let Some(at) = writer.take_checkpoint() {
                let point = Record::Member(self.point);
                save_resume_record(self.plan, writer.slot_path(), point, at);
            }
        }
    }
}

impl ImageSink for ReplaySink<'_, '_> {
    fn image_member(&mut self, data_offset: u64) -> Result<(), InstallError> {
        if data_offset != self.point.member_offset {
            return Err(self.mismatch("the image member is not where it was"));
        }
        Ok(())
    }
    fn expect_size(&mut self, size: u64) -> Result<(), InstallError> {
        if size > self.capacity {
            return Err(InstallError::TooLarge {
                slot: self.slot.clone(),
                image_size: size,
                at_least: false,
                capacity: self.capacity,
            });
        }
        if size < self.point.slot_offset {
            return Err(self.mismatch("the image ends before it"));
        }
        Ok(())
    }
    fn write(&mut self, data: &[u8]) -> Result<(), InstallError> {
        let rest = self.skip(data)?;
        if rest.is_empty() {
            return Ok(());
        }
        match &mut self.stage {
            Stage::Writing(writer) => writer.write(rest)?,
            _ => return Err(InstallError::Internal("replay sink stopped".into())),
        }
        self.record();
        Ok(())
    }
}

/// Read the artifact to its end (the hash covers what follows the image too: tar padding and
/// end blocks) and check its hash; returns it.
fn check_artifact_hash<R: Read>(
    plan: &SinkPlan,
    mut hashing: HashingReader<R>,
    format: Format,
    counters: &Counters,
) -> Result<String, InstallError> {
    io::copy(&mut hashing, &mut io::sink())
        .map_err(|e| decode::read_error(e, format, counters.consumed()))?;
    let actual = hashing.into_hex();
    // An empty expectation: no hash was announced (a local install), the signature or the
    // image's own trailer is the proof.
    if !plan.expected.is_empty() && actual != plan.expected {
        return Err(InstallError::HashMismatch {
            algorithm: plan.algorithm.name(),
            expected: plan.expected.clone(),
            actual,
        });
    }
    Ok(actual)
}

/// Sync the slot, read back what was not read back yet, and check the image: its sha256 is the
/// writer's (or `artifact_sha256` when the writer left it to the caller: the artifact's sha256
/// of a raw image, the signed image hash of a chunked bundle's verified chunks), equal to
/// `signed` (a chunked bundle's signed image hash) when given, and equal to what was read
/// back.
pub fn finish(
    writer: SlotWriter<'_>,
    counters: &Counters,
    artifact_sha256: Option<String>,
    signed: Option<&str>,
    began: Instant,
) -> Result<Installed, InstallError> {
    if writer.position() == 0 {
        return Err(InstallError::EmptyImage);
    }
    // Most of the image was read back while it was written; the rest follows the last sync.
    counters
        .verify_total
        .store(writer.position(), Ordering::Relaxed);
    counters
        .verify_done
        .store(writer.read_back(), Ordering::Relaxed);
    counters.verifying.store(true, Ordering::Release);
    let slot_path = writer.slot_path().to_path_buf();
    let keeps_data = writer.keeps_data();
    let written = writer.finish()?;
    let bytes = written.bytes;
    counters.verify_done.store(bytes, Ordering::Relaxed);
    let image_sha256 = match (written.image_sha256, artifact_sha256) {
        (Some(hash), _) => hash,
        // Lowercase, as the hashes computed here: a signed manifest may spell its hash in
        // capitals, and the read-back is compared with it below.
        (None, Some(hash)) => hash.to_ascii_lowercase(),
        (None, None) => return Err(InstallError::Internal("nothing hashed the image".into())),
    };
    if let Some(signed) = signed {
        chunked::check_image_hash(signed, &image_sha256)?;
    }
    let times = written.times;
    // This thread's phases, one after the other: waiting for the download, waiting for the
    // slot writer (`write_s`: its thread had not freed a buffer yet, or the last writes), the
    // last sync and the read-back after it; the rest of `total_s` is decoding, hashing and
    // copies. `device_write_s` (the writes themselves), `writeback_s` (writeback and the
    // checkpoints' syncs) and `read_back_overlapped_s` were spent on the writer and read-back
    // threads meanwhile (see `slot::SlotTimes`).
    tracing::info!(
        bytes,
        total_s = began.elapsed().as_secs_f64(),
        waiting_for_download_s = counters.download_wait().as_secs_f64(),
        write_s = times.write.as_secs_f64(),
        device_write_s = times.device_write.as_secs_f64(),
        writeback_s = times.writeback.as_secs_f64(),
        last_sync_s = times.last_sync.as_secs_f64(),
        read_back_overlapped_s = times.read_back_overlapped.as_secs_f64(),
        read_back_tail_s = times.read_back_tail.as_secs_f64(),
        "install timeline"
    );
    // A sink that keeps nothing (a dry run) has nothing to read back.
    if keeps_data && written.read_back_sha256 != image_sha256 {
        return Err(InstallError::ReadBackMismatch {
            slot: slot_path,
            written: image_sha256,
            read: written.read_back_sha256,
        });
    }
    Ok(Installed {
        bytes_written: bytes,
        sha256_of_slot_image: image_sha256,
    })
}

/// The channel as a blocking reader: `Ok(0)` after the download's end, an error when the
/// download was aborted or the install dropped.
pub fn channel_reader(rx: ChunkReceiver, counters: &Counters) -> impl Read + '_ {
    ChannelReader {
        rx,
        current: Bytes::new(),
        current_len: 0,
        ended: false,
        counters,
    }
}

/// Recognise the format and write the image; returns the format found and, for a chunked
/// bundle, the signed sha256 of the whole image.
fn write_image<R: Read>(
    plan: &SinkPlan,
    hashing: &mut HashingReader<R>,
    writer: &mut SlotWriter<'_>,
    counters: &Counters,
) -> Result<(Format, Option<String>), InstallError> {
    let offset = || counters.consumed();
    if plan.start > 0 {
        if plan.bundle.is_some() {
            // A resumed prefix would never pass the bundle reader: the caller never does this.
            return Err(InstallError::Internal(
                "a download under a signature policy cannot be resumed".into(),
            ));
        }
        // Only raw images are resumed (see resume.rs).
        if plan.artifact_is_image_sha256() {
            writer.leave_hash_to_caller();
        }
        copy_all(hashing, writer, Format::Raw, plan, Record::Raw, &offset)?;
        return Ok((Format::Raw, None));
    }
    let (mut reader, signed_chunks, within): (Box<dyn Read + '_>, _, _) = match &plan.bundle {
        Some(policy) => {
            let opened = bundle::open_image(policy, Box::new(hashing), writer.capacity())?;
            let within = opened
                .data_offset
                .map_or(Within::Artifact, Within::BundleImage);
            (opened.reader, opened.chunked, within)
        }
        None => (Box::new(hashing), None, Within::Artifact),
    };
    if let Some(signed) = signed_chunks {
        chunked::leave_hash_to_read_back(writer);
        chunked::write_chunks(&mut reader, &signed.index, signed.history, writer, &offset)?;
        // The member's signed size and sha256 were checked by the read that completed it;
        // this reads the end of the archive.
        io::copy(&mut reader, &mut io::sink())
            .map_err(|e| decode::read_error(e, Format::ZstdChunks, offset()))?;
        return Ok((Format::ZstdChunks, Some(signed.image_sha256)));
    }
    let (head, mut sniffed) =
        decode::sniff(reader).map_err(|e| decode::read_error(e, Format::Raw, offset()))?;
    let decoded = decode_into_slot(plan, &head, &mut sniffed, writer, within, counters);
    let format = match decoded {
        Ok(format) => format,
        Err(err @ (InstallError::Decode { .. } | InstallError::ArchiveRejected(_)))
            if plan.bundle.is_some() =>
        {
            // Signed content that does not decode is most likely not what was signed: the
            // signed hash at the end of the image tells, and names the real problem.
            return match io::copy(&mut sniffed, &mut io::sink()) {
                Err(e) => Err(bundle::bundle_error_in(&e).unwrap_or(err)),
                Ok(_) => Err(err),
            };
        }
        Err(err) => return Err(err),
    };
    // Decoders stop where their format ends (a tar at its end marker, gzip at its trailer), but
    // a bundle's signed hash covers its whole image member: read the stream to its end, so the
    // bundle reader checks the sha256 and size of every byte the slot received, whatever the
    // inner format. Without a bundle this reads what follows the image (covered by the artifact
    // hash).
    io::copy(&mut sniffed, &mut io::sink()).map_err(|e| decode::read_error(e, format, offset()))?;
    Ok((format, None))
}

/// Where the image stream handed to [`decode_into_slot`] starts in the artifact.
#[derive(Debug, Clone, Copy)]
enum Within {
    /// At its first byte: the artifact itself (a tar's member offsets are artifact offsets).
    Artifact,
    /// At this byte: a signed bundle's image member.
    BundleImage(u64),
}

/// Decode the (sniffed) image stream by its format and write it to the slot.
fn decode_into_slot<R: Read>(
    plan: &SinkPlan,
    head: &[u8],
    sniffed: &mut R,
    writer: &mut SlotWriter<'_>,
    within: Within,
    counters: &Counters,
) -> Result<Format, InstallError> {
    let offset = || counters.consumed();
    let member = plan.archive_member.as_deref();
    let compression = Format::compression_of(head);
    if let (Some(compression), Within::BundleImage(at)) = (compression, within) {
        // Records need the artifact hash's state (sha256).
        if at <= MAX_MEMBER_OFFSET && plan.artifact_sha256.is_some() {
            return decode_bundle_image(plan, at, compression, sniffed, writer, counters);
        }
    }
    if let Some(compression) = compression {
        let mut decoder: Box<dyn Read + '_> = match compression {
            Format::Gzip => Box::new(MultiGzDecoder::new(sniffed)),
            Format::Zstd => Box::new(compress::ZstdReader::new(sniffed)),
            _ => {
                let source: DecoderInput<'_> = Box::new(sniffed);
                Box::new(XzDecoder::new(source, None))
            }
        };
        let (inner_head, inner) = decode::sniff(&mut decoder)
            .map_err(|e| decode::read_error(e, compression, offset()))?;
        let format = if decode::is_tar(&inner_head) {
            let capacity = writer.capacity();
            let format = compression.with_tar();
            archive::extract_image(inner, format, member, capacity, &offset, writer)?;
            format
        } else {
            if plan.bundle.is_none() && compression == Format::Gzip {
                if let Some(lower_bound) = counters.gzip_isize() {
                    // Too large for sure: fail before the first byte.
                    writer.expect_at_least(lower_bound)?;
                }
            }
            copy_all(inner, writer, compression, plan, Record::Nothing, &offset)?;
            compression
        };
        // Read the compressed stream to its end so its checks (gzip CRC and length, the end
        // of the last zstd frame or xz stream) run.
        io::copy(&mut decoder, &mut io::sink())
            .map_err(|e| decode::read_error(e, format, offset()))?;
        Ok(format)
    } else if decode::is_tar(head) {
        let capacity = writer.capacity();
        // A plain tar's member is written as it is: a replay resume can continue it.
        let records = matches!(within, Within::Artifact);
        let mut sink = MemberSink {
            writer,
            plan,
            member: None,
            records,
        };
        let extracted =
            archive::extract_image(sniffed, Format::Tar, member, capacity, &offset, &mut sink);
        // As in `copy_all`: a checkpoint made durable but not taken yet still counts.
        sink.writer.settle();
        sink.record();
        extracted?;
        Ok(Format::Tar)
    } else {
        if plan.bundle.is_none() {
            if let Some(total) = counters.total() {
                writer.expect_size(total)?;
            }
        }
        if plan.artifact_is_image_sha256() {
            writer.leave_hash_to_caller();
        }
        let record = match within {
            Within::Artifact if plan.bundle.is_none() => Record::Raw,
            Within::BundleImage(at) if at <= MAX_MEMBER_OFFSET => Record::Member(MemberPoint {
                member_offset: at,
                slot_offset: 0,
                in_bundle: true,
            }),
            _ => Record::Nothing,
        };
        copy_all(sniffed, writer, Format::Raw, plan, record, &offset)?;
        Ok(Format::Raw)
    }
}

/// A gzip, zstd or xz image in a signed bundle's (format 1) image member, whose data starts at
/// artifact offset `at`: decoded with resume points as a plain one ([`decode_points`]), which
/// become `bundle-` records. The decoder hashes the member's bytes for them (the state at a
/// point is where a resumed install continues the signed hash); here the bundle reader checks
/// the signed hash itself, as for any bundle.
fn decode_bundle_image<R: Read>(
    plan: &SinkPlan,
    at: u64,
    compression: Format,
    sniffed: &mut R,
    writer: &mut SlotWriter<'_>,
    counters: &Counters,
) -> Result<Format, InstallError> {
    let plan = SinkPlan {
        bundle_image_at: Some(at),
        ..plan.clone()
    };
    let input: DecoderInput<'_> = Box::new(sniffed);
    let hash = Some(Sha256State::new());
    match compression {
        Format::Gzip => {
            let mut decoder = GzDecoder::new(input, hash);
            decode_points(&plan, &mut decoder, writer, None, counters)
        }
        Format::Zstd => {
            let mut decoder = ZstdDecoder::new(input, hash);
            decode_points(&plan, &mut decoder, writer, None, counters)
        }
        _ => {
            let mut decoder = XzDecoder::new(input, hash);
            // As a plain xz image's (`run_xz`, which also resumes this member).
            decoder.points_inside_blocks(true);
            decode_points(&plan, &mut decoder, writer, None, counters)
        }
    }
}

/// Which resume records a copy of image bytes to the slot leaves at its checkpoints.
#[derive(Debug, Clone, Copy)]
enum Record {
    Nothing,
    /// "raw": the image is the artifact.
    Raw,
    /// "member": the image is the member whose data starts at `member_offset` (the point's
    /// `slot_offset` is the checkpoint's).
    Member(MemberPoint),
}

/// The slot writer as a plain tar's sink: leaves `member` records at its checkpoints once the
/// image member's offset is known (and within [`MAX_MEMBER_OFFSET`]).
struct MemberSink<'w, 'a> {
    writer: &'w mut SlotWriter<'a>,
    plan: &'w SinkPlan,
    member: Option<MemberPoint>,
    /// False: no records (a tar inside something else).
    records: bool,
}

impl MemberSink<'_, '_> {
    fn record(&mut self) {
        while let Some(at) = self.writer.take_checkpoint() {
            if let Some(point) = self.member {
                save_resume_record(
                    self.plan,
                    self.writer.slot_path(),
                    Record::Member(point),
                    at,
                );
            }
        }
    }
}

impl ImageSink for MemberSink<'_, '_> {
    fn image_member(&mut self, data_offset: u64) -> Result<(), InstallError> {
        self.member = (self.records && data_offset <= MAX_MEMBER_OFFSET).then_some(MemberPoint {
            member_offset: data_offset,
            slot_offset: 0,
            in_bundle: false,
        });
        Ok(())
    }
    fn expect_size(&mut self, size: u64) -> Result<(), InstallError> {
        self.writer.expect_size(size)
    }
    fn write(&mut self, data: &[u8]) -> Result<(), InstallError> {
        self.writer.write(data)?;
        self.record();
        Ok(())
    }
}

/// Copy a stream of image bytes to the slot; raw images leave the resume records `records`
/// at checkpoints (also the last one made durable before an error stopped the copy).
fn copy_all<R: Read>(
    reader: R,
    writer: &mut SlotWriter<'_>,
    format: Format,
    plan: &SinkPlan,
    records: Record,
    offset: &dyn Fn() -> u64,
) -> Result<(), InstallError> {
    let records = if format == Format::Raw {
        records
    } else {
        Record::Nothing
    };
    let record_resume = !matches!(records, Record::Nothing);
    let record = |writer: &mut SlotWriter<'_>| {
        while let Some(at) = writer.take_checkpoint() {
            save_resume_record(plan, writer.slot_path(), records, at);
        }
    };
    let copied = copy_to_slot(reader, writer, format, offset, |w, _| record(w));
    if record_resume {
        // The writer thread may have made a checkpoint durable that was not taken yet: after
        // an error here, or one of `finish` (the last sync, the read-back), a restart resumes
        // from it.
        writer.settle();
        record(writer);
    }
    copied
}

/// A decoder with resume points ([`GzDecoder`], [`ZstdDecoder`], [`XzDecoder`]) as [`run_points`] and
/// [`copy_points`] use it: both report boundaries where a fresh decoder could continue, and
/// hash the artifact bytes they consume (the state at a boundary goes into its record).
trait PointDecoder: Read {
    type Boundary;
    /// The plain image's format (the tar inside it is [`Format::with_tar`]).
    const FORMAT: Format;
    fn output_offset(&self) -> u64;
    fn boundaries_from(&mut self, out: u64);
    fn take_boundary(&mut self) -> Option<Self::Boundary>;
    fn finish_hash(self) -> Option<Sha256State>;
    /// Output bytes before `boundary`.
    fn out(boundary: &Self::Boundary) -> u64;
    /// The resume record of `boundary`, durable on `slot`, whose image bytes before it have
    /// the sha256 `slot_sha256` (`tar_head`: in a tar's image member after these bytes); None
    /// when the decoder did not hash the artifact.
    fn record(
        plan: &SinkPlan,
        slot: &Path,
        boundary: Self::Boundary,
        slot_sha256: String,
        tar_head: Option<&[u8]>,
    ) -> Option<ResumeRecord>;
}

/// The [`PointDecoder`] methods both decoders have under the same names.
macro_rules! delegate_to_inherent {
    ($decoder:ident) => {
        fn output_offset(&self) -> u64 {
            $decoder::output_offset(self)
        }
        fn boundaries_from(&mut self, out: u64) {
            $decoder::boundaries_from(self, out)
        }
        fn take_boundary(&mut self) -> Option<Self::Boundary> {
            $decoder::take_boundary(self)
        }
        fn finish_hash(self) -> Option<Sha256State> {
            $decoder::finish_hash(self)
        }
        fn out(boundary: &Self::Boundary) -> u64 {
            boundary.out
        }
    };
}

impl<R: Read> PointDecoder for GzDecoder<R> {
    type Boundary = gunzip::Boundary;
    const FORMAT: Format = Format::Gzip;
    delegate_to_inherent!(GzDecoder);
    fn record(
        plan: &SinkPlan,
        slot: &Path,
        boundary: Self::Boundary,
        slot_sha256: String,
        tar_head: Option<&[u8]>,
    ) -> Option<ResumeRecord> {
        let point = GzipPoint {
            at: gunzip::ResumeAt {
                artifact_offset: boundary.artifact_offset,
                bits: boundary.bits,
                out: boundary.out,
                crc: boundary.crc,
            },
            artifact_hash: boundary.artifact_hash?,
            slot_sha256,
            tar_head: tar_head.map(<[u8]>::to_vec),
            member_offset: plan.bundle_image_at,
            artifact_hash_ahead: plan.artifact_hash_ahead(),
        };
        let hash = (plan.algorithm.name(), plan.expected.as_str());
        Some(ResumeRecord::gzip(&plan.url, slot, hash, plan.size, &point))
    }
}

/// [`PointDecoder`] for a decoder whose boundary is its module's `ResumeAt` (artifact offset,
/// output offset, decoder state) with the artifact hash, saved as a `$point` record by
/// `ResumeRecord::$record`.
macro_rules! point_decoder {
    ($decoder:ident, $module:ident, $format:expr, $point:ident, $record:ident) => {
        impl<R: Read> PointDecoder for $decoder<R> {
            type Boundary = $module::Boundary;
            const FORMAT: Format = $format;
            delegate_to_inherent!($decoder);
            fn record(
                plan: &SinkPlan,
                slot: &Path,
                boundary: Self::Boundary,
                slot_sha256: String,
                tar_head: Option<&[u8]>,
            ) -> Option<ResumeRecord> {
                let point = $point {
                    at: boundary.resume_at(),
                    artifact_hash: boundary.artifact_hash?,
                    slot_sha256,
                    tar_head: tar_head.map(<[u8]>::to_vec),
                    member_offset: plan.bundle_image_at,
                    artifact_hash_ahead: plan.artifact_hash_ahead(),
                };
                let hash = (plan.algorithm.name(), plan.expected.as_str());
                Some(ResumeRecord::$record(
                    &plan.url, slot, hash, plan.size, &point,
                ))
            }
        }
    };
}

point_decoder!(ZstdDecoder, unzstd, Format::Zstd, ZstdPoint, zstd);
point_decoder!(XzDecoder, unxz, Format::Xz, XzPoint, xz);

/// [`run`] for a plain gzip image with a sha256 artifact hash: the decoder hashes the
/// artifact (its state is saved with resume points) and reports deflate block boundaries,
/// which become resume records once the slot is durable up to them. `input` is the artifact
/// from its start, or from the resume point's byte.
fn run_gzip(
    plan: &SinkPlan,
    dev: &mut dyn SlotDevice,
    input: DecoderInput<'_>,
    resume: Option<&GzipResume>,
    check: (&str, Option<ArtifactCheck<'_>>),
    counters: &Counters,
    began: Instant,
) -> Result<Installed, InstallError> {
    let gzip_error = |e| decode::read_error(e, Format::Gzip, counters.consumed());
    let interval = plan.checkpoint_interval;
    let (decoder, writer) = match resume {
        Some(r) => {
            let hash = Some(r.point.artifact_hash.clone());
            let decoder =
                GzDecoder::resume(input, &r.point.at, hash, &r.window).map_err(gzip_error)?;
            let start = r.point.slot_offset();
            let writer = SlotWriter::resume(dev, start, r.prefix_hash.clone(), &r.tail, interval);
            (decoder, writer)
        }
        None => (
            GzDecoder::new(input, Some(Sha256State::new())),
            SlotWriter::new(dev, 0, Sha256::new(), interval),
        ),
    };
    let from = resume.map(|r| r.point.tar_head.as_deref());
    run_points(plan, decoder, writer, from, check, counters, began)
}

/// [`run`] for a plain zstd image with a sha256 artifact hash, as [`run_gzip`] for gzip: the
/// decoder reports block boundaries ([`unzstd`]), which become resume records once the slot
/// is durable up to them.
fn run_zstd(
    plan: &SinkPlan,
    dev: &mut dyn SlotDevice,
    input: DecoderInput<'_>,
    resume: Option<&ZstdResume>,
    check: (&str, Option<ArtifactCheck<'_>>),
    counters: &Counters,
    began: Instant,
) -> Result<Installed, InstallError> {
    let zstd_error = |e| decode::read_error(e, Format::Zstd, counters.consumed());
    let interval = plan.checkpoint_interval;
    let (decoder, writer) = match resume {
        Some(r) => {
            let prefix = r.take_prefix().ok_or_else(|| {
                InstallError::Internal("the zstd resume's slot prefix was used already".into())
            })?;
            let at = &r.point.at;
            let hash = Some(r.point.artifact_hash.clone());
            let decoder = ZstdDecoder::resume(input, at, hash, prefix).map_err(zstd_error)?;
            let (start, prefix_hash) = (r.point.slot_offset(), r.prefix_hash.clone());
            let writer = SlotWriter::resume(dev, start, prefix_hash, &r.tail, interval);
            (decoder, writer)
        }
        None => (
            ZstdDecoder::new(input, Some(Sha256State::new())),
            SlotWriter::new(dev, 0, Sha256::new(), interval),
        ),
    };
    let from = resume.map(|r| r.point.tar_head.as_deref());
    run_points(plan, decoder, writer, from, check, counters, began)
}

/// [`run`] for a plain xz image with a sha256 artifact hash, as [`run_gzip`] for gzip: the
/// decoder reports block boundaries ([`unxz`]), which become resume records once the slot is
/// durable up to them.
fn run_xz(
    plan: &SinkPlan,
    dev: &mut dyn SlotDevice,
    input: DecoderInput<'_>,
    resume: Option<(&XzResume, Option<unxz::ResumeWindow>)>,
    check: (&str, Option<ArtifactCheck<'_>>),
    counters: &Counters,
    began: Instant,
) -> Result<Installed, InstallError> {
    let from = resume.as_ref().map(|(r, _)| r.point.tar_head.as_deref());
    let interval = plan.checkpoint_interval;
    let (mut decoder, writer) = match resume {
        Some((r, window)) => {
            let at = &r.point.at;
            let hash = Some(r.point.artifact_hash.clone());
            let decoder = XzDecoder::resume_with_window(input, at, hash, window)
                .map_err(|e| decode::read_error(e, Format::Xz, counters.consumed()))?;
            let start = r.point.slot_offset();
            let writer = SlotWriter::resume(dev, start, r.prefix_hash.clone(), &r.tail, interval);
            (decoder, writer)
        }
        None => (
            XzDecoder::new(input, Some(Sha256State::new())),
            SlotWriter::new(dev, 0, Sha256::new(), interval),
        ),
    };
    decoder.points_inside_blocks(true);
    run_points(plan, decoder, writer, from, check, counters, began)
}

/// The rest of [`run_gzip`], [`run_zstd`] and [`run_xz`] once the decoder and the slot writer
/// are made: [`decode_points`], then the decoder's input hash checked against `expected` (the
/// artifact's sha256, or a signed bundle image member's), the check `then` (the artifact's
/// hash after a resume in a signed bundle) and the slot finished.
fn run_points<D: PointDecoder>(
    plan: &SinkPlan,
    mut decoder: D,
    mut writer: SlotWriter<'_>,
    resumed: Option<Option<&[u8]>>,
    (expected, then): (&str, Option<ArtifactCheck<'_>>),
    counters: &Counters,
    began: Instant,
) -> Result<Installed, InstallError> {
    decode_points(plan, &mut decoder, &mut writer, resumed, counters)?;
    let actual = decoder
        .finish_hash()
        .map(|h| h.finish_hex())
        .unwrap_or_default();
    if !expected.is_empty() && actual != expected {
        return Err(InstallError::HashMismatch {
            algorithm: HashAlgorithm::Sha256.name(),
            expected: expected.to_string(),
            actual,
        });
    }
    if let Some(then) = then {
        then()?;
    }
    finish(writer, counters, None, None, began)
}

/// A plain image is decoded to the slot with resume records at its boundaries, a tar inside is
/// extracted by its rules with resume records at the boundaries in its image member; then the
/// decoder's input is read to its end (the checks of the last members or frames, and every
/// byte hashed). `resumed`: the decoder continues at a resume point (`Some(None)`: of a plain
/// image, `Some(Some(head))`: in a tar's image member, the tar's bytes before its data `head`).
fn decode_points<D: PointDecoder>(
    plan: &SinkPlan,
    decoder: &mut D,
    writer: &mut SlotWriter<'_>,
    resumed: Option<Option<&[u8]>>,
    counters: &Counters,
) -> Result<Format, InstallError> {
    let offset = || counters.consumed();
    let format = match resumed {
        Some(None) => {
            copy_points(decoder, writer, plan, &offset)?;
            D::FORMAT
        }
        Some(Some(head)) => {
            let resumed = TarResumed {
                head: head.to_vec(),
                slot_offset: writer.position(),
            };
            extract_points(decoder, writer, plan, TarStart::Resumed(resumed), &offset)?
        }
        None => {
            let mut head = vec![0u8; decode::SNIFF_LEN];
            let got = bootctl::fsutil::read_full(&mut *decoder, &mut head)
                .map_err(|e| decode::read_error(e, D::FORMAT, offset()))?;
            head.truncate(got);
            if decode::is_tar(&head) {
                let start = TarStart::Fresh(head);
                extract_points(decoder, writer, plan, start, &offset)?
            } else {
                let gzip = D::FORMAT == Format::Gzip && plan.bundle.is_none();
                if let Some(lower_bound) = counters.gzip_isize().filter(|_| gzip) {
                    // Too large for sure: fail before the first byte.
                    writer.expect_at_least(lower_bound)?;
                }
                writer.write(&head)?;
                copy_points(decoder, writer, plan, &offset)?;
                D::FORMAT
            }
        }
    };
    io::copy(decoder, &mut io::sink()).map_err(|e| decode::read_error(e, format, offset()))?;
    Ok(format)
}

/// At most this many boundaries wait for the slot to become durable up to them.
const MAX_PENDING_POINTS: usize = 64;

/// A boundary written to the slot, waiting for a durable checkpoint at or after it.
struct PendingPoint<B> {
    boundary: B,
    /// sha256 of the image before it.
    image_hash: Sha256,
}

/// Boundaries written to the slot waiting for a durable checkpoint at or after them, and
/// durable checkpoints waiting until every boundary at or before them is known.
struct Points<B> {
    pending: VecDeque<PendingPoint<B>>,
    checkpoints: VecDeque<u64>,
}

impl<B> Points<B> {
    fn new() -> Self {
        Points {
            pending: VecDeque::new(),
            checkpoints: VecDeque::new(),
        }
    }

    /// A boundary right after the image bytes whose sha256 is `image_hash`.
    fn push(&mut self, boundary: B, image_hash: Sha256) {
        if self.pending.len() == MAX_PENDING_POINTS {
            self.pending.pop_front();
        }
        self.pending.push_back(PendingPoint {
            boundary,
            image_hash,
        });
    }
}

/// Decode a plain gzip, zstd or xz image to the slot; its boundaries become resume records once
/// the slot is durable up to them (also after an error stopped the copy).
fn copy_points<D: PointDecoder>(
    decoder: &mut D,
    writer: &mut SlotWriter<'_>,
    plan: &SinkPlan,
    offset: &dyn Fn() -> u64,
) -> Result<(), InstallError> {
    let spacing = point_spacing(plan);
    let mut points = Points::new();
    let mut next_at = decoder.output_offset().saturating_add(spacing);
    decoder.boundaries_from(next_at);
    let copied = copy_to_slot(decoder, writer, D::FORMAT, offset, |writer, decoder| {
        if let Some(boundary) = decoder.take_boundary() {
            // The writer's hash covers exactly the output before the boundary.
            let out = D::out(&boundary);
            let image_hash = writer.image_hash_so_far();
            if let Some(image_hash) =
                image_hash.filter(|_| out == writer.position() && out >= next_at)
            {
                next_at = out.saturating_add(spacing);
                decoder.boundaries_from(next_at);
                points.push(boundary, image_hash);
            }
        }
        record_point::<D>(plan, writer, &mut points, None, false);
    });
    // As for raw images: a checkpoint made durable but not taken yet still counts.
    writer.settle();
    record_point::<D>(plan, writer, &mut points, None, true);
    copied
}

/// The least output between two boundaries that are kept as resume points.
fn point_spacing(plan: &SinkPlan) -> u64 {
    // A few points per checkpoint interval are plenty: one just before the checkpoint counts.
    // Never more than half an interval apart, so that a small interval (the config's minimum is
    // 256 KiB) still keeps a point before each checkpoint.
    (plan.checkpoint_interval / 16)
        .max(1 << 20)
        .min(plan.checkpoint_interval / 2)
        .max(1)
}

/// Where [`extract_points`] starts.
enum TarStart {
    /// At the artifact's start; the decoder's first output (read to tell the format).
    Fresh(Vec<u8>),
    /// At a resume point in the image member's data.
    Resumed(TarResumed),
}

/// A resume point in a tar's image member.
struct TarResumed {
    /// The tar's bytes before the image member's data (from the record).
    head: Vec<u8>,
    /// The image's bytes on the slot before the point (the slot writer starts after them).
    slot_offset: u64,
}

/// What the tar rules' reader ([`TarTap`]) and the image sink ([`TarSink`]) share.
struct TarShared<B> {
    /// The boundary the decoder last stopped at, not looked at by the sink yet.
    boundary: Option<B>,
    /// A fresh install's output from its start, up to [`MAX_TAR_HEAD`] bytes, until the image
    /// member's data offset is known (the bytes before it go into the records).
    captured: Option<Vec<u8>>,
}

/// The decoder's output as the tar rules read it: `before` first (a fresh install's sniffed
/// bytes; a resumed install's tar head and, standing in for the image bytes on the slot, as
/// many zeros, which the sink drops), then the decoder. Its stops at boundaries go to the
/// shared state, never to the tar reader.
struct TarTap<'d, D: PointDecoder> {
    before: io::Chain<Cursor<Vec<u8>>, io::Take<io::Repeat>>,
    decoder: &'d mut D,
    shared: Rc<RefCell<TarShared<D::Boundary>>>,
    spacing: u64,
}

impl<D: PointDecoder> Read for TarTap<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut n = self.before.read(buf)?;
        if n == 0 && !buf.is_empty() {
            n = loop {
                // gzip and zstd stop a read at a boundary, xz fails the read after it with
                // `Interrupted` (see `copy_to_slot`).
                let read = self.decoder.read(buf);
                if let Some(boundary) = self.decoder.take_boundary() {
                    let next = D::out(&boundary).saturating_add(self.spacing);
                    self.decoder.boundaries_from(next);
                    self.shared.borrow_mut().boundary = Some(boundary);
                }
                match read {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
        }
        if let Some(captured) = &mut self.shared.borrow_mut().captured {
            let room = MAX_TAR_HEAD.saturating_sub(captured.len());
            captured.extend_from_slice(&buf[..n.min(room)]);
        }
        Ok(n)
    }
}

/// The slot writer as the image sink of a tar inside a point decoder: the decoder's boundaries
/// in the image member's data become resume records (with the tar's head) once the slot is
/// durable up to them. Resumed, the image member must start where the record's head ends and
/// reach the point (a point may be at its end); its bytes before the point (on the slot) are
/// dropped.
struct TarSink<'w, 'a, D: PointDecoder> {
    writer: &'w mut SlotWriter<'a>,
    plan: &'w SinkPlan,
    shared: Rc<RefCell<TarShared<D::Boundary>>>,
    /// The tar's bytes before the image member's data, once known (and at most
    /// [`MAX_TAR_HEAD`]); a resumed install's from the start.
    head: Option<Vec<u8>>,
    resumed: bool,
    /// Image bytes still to drop (a resumed install's zeros standing in for the slot's).
    skip: u64,
    points: Points<D::Boundary>,
}

impl<D: PointDecoder> TarSink<'_, '_, D> {
    fn mismatch(&self, why: &str) -> InstallError {
        InstallError::ReplayMismatch {
            slot: self.writer.slot_path().to_path_buf(),
            resume_at: self.writer.position(),
            why: why.into(),
        }
    }

    /// Keep the boundary the decoder last stopped at when it is in the image member's data,
    /// right after the image bytes the writer has (nothing of the image after it was read
    /// yet); leave it for later while the writer has not got all the image before it.
    fn take_boundary(&mut self) {
        let mut shared = self.shared.borrow_mut();
        let Some(out) = shared.boundary.as_ref().map(D::out) else {
            return;
        };
        let Some(head) = &self.head else {
            shared.boundary = None;
            return;
        };
        let image_offset = out.checked_sub(head.len() as u64);
        let position = self.writer.position();
        if self.skip == 0 && image_offset.is_some_and(|at| at > position) {
            return;
        }
        let Some(boundary) = shared.boundary.take() else {
            return;
        };
        drop(shared);
        if self.skip > 0 || image_offset != Some(position) {
            return;
        }
        if let Some(image_hash) = self.writer.image_hash_so_far() {
            self.points.push(boundary, image_hash);
        }
    }

    /// Leave the records due ([`record_point`]; `all`: the image member was read to its end).
    fn record(&mut self, all: bool) {
        let head = self.head.as_deref();
        record_point::<D>(self.plan, self.writer, &mut self.points, head, all);
    }
}

impl<D: PointDecoder> ImageSink for TarSink<'_, '_, D> {
    fn image_member(&mut self, data_offset: u64) -> Result<(), InstallError> {
        if self.resumed {
            let at = self.head.as_ref().map(|h| h.len() as u64);
            if at != Some(data_offset) {
                return Err(self.mismatch("the image member is not where it was"));
            }
            return Ok(());
        }
        let captured = self.shared.borrow_mut().captured.take();
        self.head = captured
            .filter(|c| data_offset <= c.len() as u64)
            .map(|mut c| {
                c.truncate(data_offset as usize);
                c
            });
        Ok(())
    }
    fn expect_size(&mut self, size: u64) -> Result<(), InstallError> {
        if size < self.skip {
            return Err(self.mismatch("the image ends before it"));
        }
        self.writer.expect_size(size)
    }
    fn write(&mut self, data: &[u8]) -> Result<(), InstallError> {
        // A boundary before this data (xz stops a read there).
        self.take_boundary();
        let dropped = usize::try_from(self.skip)
            .unwrap_or(usize::MAX)
            .min(data.len());
        self.skip -= dropped as u64;
        let data = &data[dropped..];
        if !data.is_empty() {
            self.writer.write(data)?;
            // A boundary at the end of this data (gzip and zstd stop there).
            self.take_boundary();
            self.record(false);
        }
        Ok(())
    }
}

/// Extract the image from a tar inside a point decoder by the tar rules, with resume records
/// at the decoder's boundaries in the image member's data ([`TarSink`]); returns the format.
fn extract_points<D: PointDecoder>(
    decoder: &mut D,
    writer: &mut SlotWriter<'_>,
    plan: &SinkPlan,
    start: TarStart,
    offset: &dyn Fn() -> u64,
) -> Result<Format, InstallError> {
    let spacing = point_spacing(plan);
    let (before, skip, head, captured) = match start {
        TarStart::Fresh(sniffed) => (sniffed, 0, None, Some(Vec::new())),
        TarStart::Resumed(r) => (r.head.clone(), r.slot_offset, Some(r.head), None),
    };
    let resumed = head.is_some();
    decoder.boundaries_from(decoder.output_offset().saturating_add(spacing));
    let shared = Rc::new(RefCell::new(TarShared {
        boundary: None,
        captured,
    }));
    let tap = TarTap {
        before: Read::chain(Cursor::new(before), io::repeat(0).take(skip)),
        decoder: &mut *decoder,
        shared: Rc::clone(&shared),
        spacing,
    };
    let capacity = writer.capacity();
    let mut sink = TarSink::<D> {
        writer,
        plan,
        shared,
        head,
        resumed,
        skip,
        points: Points::new(),
    };
    let format = D::FORMAT.with_tar();
    let member = plan.archive_member.as_deref();
    let extracted = archive::extract_image(tap, format, member, capacity, offset, &mut sink);
    // A boundary right at the image member's end; then, as in `copy_all`, a checkpoint made
    // durable but not taken yet still counts.
    sink.take_boundary();
    sink.writer.settle();
    sink.record(true);
    // What follows the archive needs no stops.
    decoder.boundaries_from(u64::MAX);
    extracted.map(|_| format)
}

/// For every checkpoint the slot became durable up to, record the latest pending boundary at
/// or before it (`tar_head`: the boundaries are in a tar's image member after it), once every
/// boundary at or before it is known: the writer holds image bytes after it, or the copy ended
/// (`all`). A boundary right at a checkpoint is known only once the bytes before it are
/// written, maybe after the writer thread made the checkpoint durable; deciding later makes
/// the records an install leaves independent of the threads' timing (the crash-point suite
/// replays a cycle step by step).
fn record_point<D: PointDecoder>(
    plan: &SinkPlan,
    writer: &mut SlotWriter<'_>,
    points: &mut Points<D::Boundary>,
    tar_head: Option<&[u8]>,
    all: bool,
) {
    points
        .checkpoints
        .extend(std::iter::from_fn(|| writer.take_checkpoint()));
    while let Some(&durable) = points.checkpoints.front() {
        if !all && durable >= writer.position() {
            return;
        }
        points.checkpoints.pop_front();
        record_point_at::<D>(
            plan,
            writer.slot_path(),
            &mut points.pending,
            tar_head,
            durable,
        );
    }
}

/// [`record_point`] for the checkpoint `durable`.
fn record_point_at<D: PointDecoder>(
    plan: &SinkPlan,
    slot: &Path,
    pending: &mut VecDeque<PendingPoint<D::Boundary>>,
    tar_head: Option<&[u8]>,
    durable: u64,
) {
    // The slot offset of a boundary: the decoder's output before it, less a tar's head (a
    // pending boundary in a tar's image member is never before the head's end).
    let head = tar_head.map_or(0, |h| h.len() as u64);
    let slot_offset = |p: &PendingPoint<D::Boundary>| D::out(&p.boundary).saturating_sub(head);
    while pending.len() > 1 && slot_offset(&pending[1]) <= durable {
        pending.pop_front();
    }
    if pending.front().is_none_or(|p| slot_offset(p) > durable) {
        return;
    }
    let Some(PendingPoint {
        boundary,
        image_hash,
    }) = pending.pop_front()
    else {
        return;
    };
    let slot_sha256 = hex::encode(image_hash.finalize());
    let Some(record) = D::record(plan, slot, boundary, slot_sha256, tar_head) else {
        return;
    };
    // Resuming is an optimisation: without a record the next try starts over.
    if let Err(e) = resume::save(&plan.resume_path, &record) {
        tracing::warn!(error = %e, "cannot save the resume record");
    }
}

/// Save a resume record of kind `record` for a durable checkpoint at slot offset `at`.
fn save_resume_record(plan: &SinkPlan, slot: &Path, record: Record, at: u64) {
    let (url, algorithm, size) = (&plan.url, plan.algorithm.name(), plan.size);
    let record = match record {
        Record::Nothing => return,
        Record::Raw => ResumeRecord::raw(url, slot, algorithm, &plan.expected, size, at),
        Record::Member(point) => {
            let point = MemberPoint {
                slot_offset: at,
                ..point
            };
            ResumeRecord::member(url, slot, algorithm, &plan.expected, size, &point)
        }
    };
    // Resuming is an optimisation: without a record the next try starts over.
    if let Err(e) = resume::save(&plan.resume_path, &record) {
        tracing::warn!(error = %e, "cannot save the resume record");
    }
}

/// The copy of [`copy_all`] and [`copy_points`]: the reader fills the slot writer's aligned
/// buffer directly, no copy buffer of its own (a 64 KiB one was peak RSS and a second copy of
/// every byte, issue 19); `committed` runs after every commit (with the reader, which may
/// tell what it stopped at).
fn copy_to_slot<R: Read>(
    mut reader: R,
    writer: &mut SlotWriter<'_>,
    format: Format,
    offset: &dyn Fn() -> u64,
    mut committed: impl FnMut(&mut SlotWriter<'_>, &mut R),
) -> Result<(), InstallError> {
    loop {
        let spare = writer.spare();
        if spare.is_empty() {
            // The slot is full: one more byte is an image too large for it.
            let mut probe = [0u8; 1];
            writer.check_usable()?;
            return match reader.read(&mut probe) {
                Ok(0) => Ok(()),
                Ok(_) => writer.write(&probe),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(decode::read_error(e, format, offset())),
            };
        }
        let n = match reader.read(spare) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            // A decoder may stop at a resume point this way ([`XzDecoder::boundaries_from`]):
            // nothing after it was read yet.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                committed(writer, &mut reader);
                continue;
            }
            Err(e) => return Err(decode::read_error(e, format, offset())),
        };
        writer.commit(n)?;
        committed(writer, &mut reader);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;

    #[test]
    fn a_slot_writer_as_a_plain_image_sink_keeps_no_checkpoints() {
        // A tar inside a compressed bundle image is extracted straight into the slot writer,
        // which leaves no resume records: the checkpoints it makes durable must not pile up
        // (one queue entry per checkpoint for the whole image otherwise).
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let mut slot = super::super::slot::open(&img, None, &dir.path().join("none")).unwrap();
        let mut writer = SlotWriter::new(&mut slot, 0, Sha256::new(), 256 << 10);
        let chunk = vec![0x5au8; 64 << 10];
        for _ in 0..(32 << 20) / chunk.len() {
            ImageSink::write(&mut writer, &chunk).unwrap();
        }
        writer.settle();
        let untaken = writer.untaken_checkpoints();
        assert!(untaken <= 2, "{untaken} checkpoints kept");
        writer.finish().unwrap();
    }

    #[tokio::test]
    async fn sender_waits_for_room_in_the_byte_budget() {
        let (tx, rx) = channel(64, 4096);
        for _ in 0..4 {
            let sent = tx.send_data(Bytes::from(vec![1u8; 1024])).now_or_never();
            assert_eq!(sent, Some(true));
        }
        // The budget is full although the channel has room for 60 more chunks.
        let mut fifth = Box::pin(tx.send_data(Bytes::from(vec![1u8; 10])));
        assert!((&mut fifth).now_or_never().is_none());
        // The blocking stage went away: the waiting sender is told so instead of hanging.
        drop(rx);
        assert!(!fifth.await);
    }

    #[tokio::test]
    async fn a_chunk_larger_than_the_budget_takes_all_of_it() {
        let (tx, _rx) = channel(64, 4096);
        let sent = tx.send_data(Bytes::from(vec![1u8; 10_000])).now_or_never();
        assert_eq!(sent, Some(true));
        let next = tx.send_data(Bytes::from(vec![1u8; 1])).now_or_never();
        assert!(next.is_none(), "sent past a full budget");
    }

    #[tokio::test]
    async fn a_large_chunk_travels_as_small_copies() {
        let (tx, mut rx) = channel(64, 1 << 20);
        let data: Bytes = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(tx.send_data(data.clone()).now_or_never(), Some(true));
        drop(tx);
        let mut out = Vec::new();
        while let Some(Chunk::Data(piece)) = rx.rx.recv().await {
            assert!(piece.len() <= PIECE, "a piece of {} bytes", piece.len());
            // A copy, not a slice of the sender's buffer (which it must be free to reuse).
            let inside = data.as_ptr_range().contains(&piece.as_ptr());
            assert!(!inside, "a piece shares the sender's buffer");
            out.extend_from_slice(&piece);
        }
        assert!(out == data, "bytes lost or reordered");
    }

    #[test]
    fn bytes_in_flight_stay_within_the_budget() {
        const BUDGET: usize = 8 << 10;
        let counters = Arc::new(Counters::new(0, None));
        let (tx, rx) = channel(1024, BUDGET);
        let reader_counters = Arc::clone(&counters);
        let reader = std::thread::spawn(move || {
            let mut reader = ChannelReader {
                rx,
                current: Bytes::new(),
                current_len: 0,
                ended: false,
                counters: &reader_counters,
            };
            let mut out = Vec::new();
            let mut buf = [0u8; 700];
            loop {
                match reader.read(&mut buf).unwrap() {
                    0 => return out,
                    n => out.extend_from_slice(&buf[..n]),
                }
                std::thread::sleep(std::time::Duration::from_micros(50));
            }
        });
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let mut max_in_flight = 0u64;
        runtime.block_on(async {
            let mut sent = 0u64;
            for (i, chunk) in data.chunks(3000).enumerate() {
                let chunk = if i % 10 == 0 {
                    chunk
                } else {
                    &chunk[..chunk.len() / 2]
                };
                assert!(tx.send_data(Bytes::copy_from_slice(chunk)).await);
                sent += chunk.len() as u64;
                let in_flight = sent - counters.consumed.load(Ordering::Relaxed);
                max_in_flight = max_in_flight.max(in_flight);
            }
            tx.send_end().await;
        });
        let out = reader.join().unwrap();
        let expected: Vec<u8> = data
            .chunks(3000)
            .enumerate()
            .flat_map(|(i, c)| if i % 10 == 0 { c } else { &c[..c.len() / 2] })
            .copied()
            .collect();
        assert!(out == expected, "bytes lost or reordered");
        assert!(
            max_in_flight <= BUDGET as u64,
            "{max_in_flight} bytes in flight with a budget of {BUDGET}"
        );
        assert!(max_in_flight > BUDGET as u64 / 2, "the budget was not used");
    }
}
