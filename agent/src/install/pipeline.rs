//! The blocking stage of the install: artifact bytes arrive from the download task over a
//! bounded channel and go through hash -> (bundle) -> gzip / tar -> size guard -> slot
//! writer; then the hash is checked, the slot synced and read back.
//!
//! It runs on a blocking thread (`spawn_blocking`) because decoders and file writes are
//! blocking `Read`/`Write` code.

use std::io::{self, Read};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use bytes::{Buf, Bytes};
use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::archive::{self, ImageSink};
use super::bundle::{self, BundlePolicy};
use super::decode::{self, DownloadAborted, Format};
use super::hash::{HashAlgorithm, Hasher, HashingReader};
use super::resume::{self, ResumeRecord};
use super::slot::{self, SlotDevice, SlotWriter};
use super::{InstallError, Installed};

/// What the download task sends.
#[derive(Debug)]
pub enum Chunk {
    Data(Bytes),
    /// The artifact is complete. A channel closed without it means "aborted".
    End,
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

    fn consumed(&self) -> u64 {
        self.consumed.load(Ordering::Relaxed)
    }
}

/// Turns the channel into a blocking `Read`.
struct ChannelReader<'a> {
    rx: mpsc::Receiver<Chunk>,
    current: Bytes,
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
            match self.rx.blocking_recv() {
                Some(Chunk::Data(b)) => self.current = b,
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
}

impl ImageSink for SlotWriter<'_> {
    fn expect_size(&mut self, size: u64) -> Result<(), InstallError> {
        SlotWriter::expect_size(self, size)
    }
    fn write(&mut self, data: &[u8]) -> Result<(), InstallError> {
        SlotWriter::write(self, data)
    }
}

const READ_BUFFER: usize = 256 * 1024;

/// Run the blocking stage to the end: the image is on the slot, synced and verified.
pub fn run(
    plan: &SinkPlan,
    dev: &mut dyn SlotDevice,
    rx: mpsc::Receiver<Chunk>,
    counters: &Counters,
) -> Result<Installed, InstallError> {
    let mut artifact_hash = Hasher::new(plan.algorithm);
    let mut image_hash = Sha256::new();
    if plan.start > 0 {
        // The hashers cannot be saved: hash the bytes already on the slot again.
        slot::read_range(
            dev,
            plan.start,
            |b| {
                artifact_hash.update(b);
                image_hash.update(b);
            },
            |_| {},
        )?;
    }
    let channel = ChannelReader {
        rx,
        current: Bytes::new(),
        ended: false,
        counters,
    };
    let mut hashing = HashingReader::new(channel, artifact_hash, plan.start);
    let mut writer = SlotWriter::new(dev, plan.start, image_hash, plan.checkpoint_interval);
    let format = write_image(plan, &mut hashing, &mut writer, counters)?;
    // The hash covers the whole artifact, including what follows the image (tar padding).
    io::copy(&mut hashing, &mut io::sink())
        .map_err(|e| decode::read_error(e, format, counters.consumed()))?;
    let actual = hashing.into_hex();
    if actual != plan.expected {
        return Err(InstallError::HashMismatch {
            algorithm: plan.algorithm.name(),
            expected: plan.expected.clone(),
            actual,
        });
    }
    if writer.position() == 0 {
        return Err(InstallError::EmptyImage);
    }
    let (written, image_sha256) = writer.finish()?;

    counters.verify_total.store(written, Ordering::Relaxed);
    counters.verifying.store(true, Ordering::Release);
    let mut read_hash = Sha256::new();
    slot::read_range(
        dev,
        written,
        |b| read_hash.update(b),
        |done| counters.verify_done.store(done, Ordering::Relaxed),
    )?;
    let read = hex::encode(read_hash.finalize());
    if read != image_sha256 {
        return Err(InstallError::ReadBackMismatch {
            slot: dev.path().to_path_buf(),
            written: image_sha256,
            read,
        });
    }
    Ok(Installed {
        bytes_written: written,
        sha256_of_slot_image: image_sha256,
    })
}

/// Recognise the format and write the image; returns the format found.
fn write_image<R: Read>(
    plan: &SinkPlan,
    hashing: &mut HashingReader<R>,
    writer: &mut SlotWriter<'_>,
    counters: &Counters,
) -> Result<Format, InstallError> {
    let offset = || counters.consumed();
    let resumable = plan.bundle.is_none();
    if plan.start > 0 {
        // Only raw images are resumed (see resume.rs).
        copy_all(hashing, writer, Format::Raw, plan, resumable, &offset)?;
        return Ok(Format::Raw);
    }
    let reader: Box<dyn Read + '_> = match &plan.bundle {
        Some(policy) => bundle::open(policy, Box::new(hashing), writer.capacity())?,
        None => Box::new(hashing),
    };
    let (head, sniffed) =
        decode::sniff(reader).map_err(|e| decode::read_error(e, Format::Raw, offset()))?;
    let member = plan.archive_member.as_deref();
    if decode::is_gzip(&head) {
        let mut gz = MultiGzDecoder::new(sniffed);
        let (inner_head, inner) =
            decode::sniff(&mut gz).map_err(|e| decode::read_error(e, Format::Gzip, offset()))?;
        let format = if decode::is_tar(&inner_head) {
            let capacity = writer.capacity();
            archive::extract_image(inner, Format::TarGzip, member, capacity, &offset, writer)?;
            Format::TarGzip
        } else {
            if plan.bundle.is_none() {
                if let Some(lower_bound) = counters.gzip_isize() {
                    // Too large for sure: fail before the first byte.
                    writer.expect_at_least(lower_bound)?;
                }
            }
            copy_all(inner, writer, Format::Gzip, plan, false, &offset)?;
            Format::Gzip
        };
        // Read the gzip stream to its end so its CRC and length are checked.
        io::copy(&mut gz, &mut io::sink()).map_err(|e| decode::read_error(e, format, offset()))?;
        Ok(format)
    } else if decode::is_tar(&head) {
        let capacity = writer.capacity();
        archive::extract_image(sniffed, Format::Tar, member, capacity, &offset, writer)?;
        Ok(Format::Tar)
    } else {
        if plan.bundle.is_none() {
            if let Some(total) = counters.total() {
                writer.expect_size(total)?;
            }
        }
        copy_all(sniffed, writer, Format::Raw, plan, resumable, &offset)?;
        Ok(Format::Raw)
    }
}

/// Copy a stream of image bytes to the slot; raw images leave resume records at checkpoints.
fn copy_all<R: Read>(
    mut reader: R,
    writer: &mut SlotWriter<'_>,
    format: Format,
    plan: &SinkPlan,
    record_resume: bool,
    offset: &dyn Fn() -> u64,
) -> Result<(), InstallError> {
    let record_resume = record_resume && format == Format::Raw;
    let mut buf = vec![0u8; READ_BUFFER];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(decode::read_error(e, format, offset())),
        };
        writer.write(&buf[..n])?;
        if let Some(at) = writer.take_checkpoint() {
            if record_resume {
                let record = ResumeRecord::raw(
                    &plan.url,
                    writer.slot_path(),
                    plan.algorithm.name(),
                    &plan.expected,
                    plan.size,
                    at,
                );
                // Resuming is an optimisation: without a record the next try starts over.
                if let Err(e) = resume::save(&plan.resume_path, &record) {
                    tracing::warn!(error = %e, "cannot save the resume record");
                }
            }
        }
    }
}
