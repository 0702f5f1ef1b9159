//! The target slot: opening it safely (never the booted slot, never a mounted device, never
//! created, truncated or grown), its capacity, and the writer that fills it with large aligned
//! buffers (`O_DIRECT` where the slot allows it) on its own thread while the next buffer is
//! filled, bounded dirty memory and durable checkpoints, and reads every range back from the
//! device once it got there, while later ranges are still being written.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::InstallError;

/// Size of one write to the slot (and of the inline read-back's reads). There are two such
/// buffers, one filled by the install thread while the writer thread writes the other: the
/// 512 KiB of the single buffer before (512 KiB O_DIRECT writes kept the write time of 1 MiB
/// ones; 1 MiB cost 0.5 MiB of peak RSS, issue 19, BENCHMARKS.md).
pub const WRITE_BUFFER: usize = 256 << 10;
/// Writeback is started for every window of this size, and the previous window is waited for,
/// so at most about two windows of dirty pages are outstanding.
pub const SYNC_WINDOW: u64 = 8 << 20;
/// Default distance between durable checkpoints (fdatasync, usable for resume after a
/// power cut).
pub const CHECKPOINT_INTERVAL: u64 = 16 << 20;

/// The operations the pipeline needs from a slot; a seam so tests can inject write errors.
pub trait SlotDevice: Send {
    fn path(&self) -> &Path;
    /// Bytes the slot can hold: a partition's size, or a regular file's current length.
    fn capacity(&self) -> u64;
    fn write_all_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()>;
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize>;
    /// Start writeback of a range; with `wait`, also wait until it (and earlier writes to
    /// it) reached the device.
    fn sync_range(&mut self, offset: u64, len: u64, wait: bool) -> io::Result<()>;
    /// Make everything written so far durable.
    fn sync_data(&mut self) -> io::Result<()>;
    /// Drop cached pages of a range (best effort) so reads come from the device.
    fn drop_cache(&mut self, _offset: u64, _len: u64) {}
    /// A second handle for reading the slot back on another thread while this one writes;
    /// None (the default) reads back on the writing thread.
    fn reader(&self) -> Option<Box<dyn SlotDevice>> {
        None
    }
    /// A second handle that writes and syncs the slot on the writer thread while the install
    /// thread fills the next buffer (all writes and syncs then go through it, never through
    /// this one); None (the default) writes on the install thread.
    fn writer(&self) -> Option<Box<dyn SlotDevice>> {
        None
    }
    /// False for a sink that keeps nothing (a dry run): there is nothing to read back.
    fn keeps_data(&self) -> bool {
        true
    }
}

/// A slot backed by a block device or a regular file.
#[derive(Debug)]
pub struct FileSlot {
    file: File,
    path: PathBuf,
    capacity: u64,
    /// Second descriptor with O_DIRECT for aligned writes and the read-back, opened on first
    /// use (without O_EXCL: `file` already holds a block device exclusively).
    direct: Direct,
}

/// Alignment O_DIRECT needs for offsets, lengths and buffers (covers 512 and 4096 sectors).
pub(crate) const DIRECT_ALIGN: usize = 4096;

#[derive(Debug)]
enum Direct {
    NotOpened,
    Open(File),
    /// The file system refuses O_DIRECT (tmpfs, some FUSE): buffered writes, and buffered
    /// reads after dropping the cache.
    Unsupported,
}

fn is_direct_aligned(offset: u64, buf: &[u8]) -> bool {
    offset.is_multiple_of(DIRECT_ALIGN as u64)
        && buf.len().is_multiple_of(DIRECT_ALIGN)
        && (buf.as_ptr() as usize).is_multiple_of(DIRECT_ALIGN)
}

impl FileSlot {
    /// The same slot through a duplicate of the descriptor (same open file: the exclusive
    /// open of a block device covers it) and its own O_DIRECT descriptor.
    fn another_handle(&self) -> Option<FileSlot> {
        Some(FileSlot {
            file: self.file.try_clone().ok()?,
            path: self.path.clone(),
            capacity: self.capacity,
            direct: Direct::NotOpened,
        })
    }

    /// The O_DIRECT descriptor, opened on first use; None where the slot refuses it.
    fn direct(&mut self) -> Option<&File> {
        if let Direct::NotOpened = self.direct {
            self.direct = match OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_DIRECT)
                .open(&self.path)
            {
                Ok(f) => Direct::Open(f),
                Err(_) => Direct::Unsupported,
            };
        }
        match &self.direct {
            Direct::Open(f) => Some(f),
            _ => None,
        }
    }
}

impl SlotDevice for FileSlot {
    fn path(&self) -> &Path {
        &self.path
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn write_all_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        // Aligned writes bypass the page cache: no copy into it, no dirty pages to bound or
        // drop, and the device is written while the next buffer fills. The unaligned tail
        // (and slots that refuse O_DIRECT) go through the page cache.
        if is_direct_aligned(offset, data) {
            if let Some(direct) = self.direct() {
                match direct.write_all_at(data, offset) {
                    // Rewriting the whole buffer through the page cache is idempotent.
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct = Direct::Unsupported
                    }
                    result => return result,
                }
            }
        }
        self.file.write_all_at(data, offset)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        // The read-back reads the medium, not the page cache, and a direct read of a
        // dropped range is several times faster than buffered reads that must allocate
        // page cache on a busy machine.
        if is_direct_aligned(offset, buf) {
            if let Some(direct) = self.direct() {
                match direct.read_at(buf, offset) {
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        self.direct = Direct::Unsupported
                    }
                    result => return result,
                }
            }
        }
        self.file.read_at(buf, offset)
    }

    fn sync_range(&mut self, offset: u64, len: u64, wait: bool) -> io::Result<()> {
        let flags = if wait {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER
        } else {
            libc::SYNC_FILE_RANGE_WRITE
        };
        // SAFETY: plain syscall on an fd we own; no memory is passed.
        let rc = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                flags,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            // Not supported for this file: fall back to a full data sync when asked to wait.
            Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ESPIPE) => {
                if wait {
                    self.file.sync_data()
                } else {
                    Ok(())
                }
            }
            _ => Err(err),
        }
    }

    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn reader(&self) -> Option<Box<dyn SlotDevice>> {
        Some(Box::new(self.another_handle()?))
    }

    fn writer(&self) -> Option<Box<dyn SlotDevice>> {
        Some(Box::new(self.another_handle()?))
    }

    fn drop_cache(&mut self, offset: u64, len: u64) {
        // SAFETY: advisory syscall on an fd we own; failure is harmless.
        unsafe {
            libc::posix_fadvise(
                self.file.as_raw_fd(),
                offset as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
    }
}

/// Open `slot` for writing after checking it is safe to write: it exists, is a block device
/// or a regular file with a non-zero size, is not `booted`, and holds no mounted filesystem
/// (checked against `mountinfo`, normally `/proc/self/mountinfo`).
pub fn open(
    slot: &Path,
    booted: Option<&Path>,
    mountinfo: &Path,
) -> Result<FileSlot, InstallError> {
    let unusable = |reason: String| InstallError::SlotUnusable {
        slot: slot.to_path_buf(),
        reason,
    };
    let meta = std::fs::metadata(slot).map_err(|e| unusable(e.to_string()))?;
    let is_block = meta.file_type().is_block_device();
    if !is_block && !meta.is_file() {
        return Err(unusable("neither a block device nor a regular file".into()));
    }
    check_not_booted(slot, &meta, booted)?;
    check_not_mounted(slot, &meta, mountinfo)?;

    let mut options = OpenOptions::new();
    // Never create, truncate or append: the slot's size is its capacity.
    options.read(true).write(true);
    if is_block {
        // O_EXCL on a block device fails with EBUSY while it is mounted or held (dm, md).
        options.custom_flags(libc::O_EXCL);
    }
    let mut file = options
        .open(slot)
        .map_err(|e| unusable(format!("cannot open for writing: {e}")))?;
    let capacity = if is_block {
        file.seek(SeekFrom::End(0))
            .map_err(|e| unusable(format!("cannot find its size: {e}")))?
    } else {
        meta.len()
    };
    if capacity == 0 {
        return Err(unusable("its size is 0 bytes".into()));
    }
    Ok(FileSlot {
        file,
        path: slot.to_path_buf(),
        capacity,
        direct: Direct::NotOpened,
    })
}

/// Same device (block devices: same major:minor) or same file (same inode).
fn same_target(a: &Metadata, b: &Metadata) -> bool {
    let block = |m: &Metadata| m.file_type().is_block_device();
    if block(a) && block(b) {
        a.rdev() == b.rdev()
    } else {
        !block(a) && !block(b) && a.dev() == b.dev() && a.ino() == b.ino()
    }
}

fn check_not_booted(
    slot: &Path,
    meta: &Metadata,
    booted: Option<&Path>,
) -> Result<(), InstallError> {
    let Some(booted) = booted else {
        return Ok(());
    };
    let in_use = || InstallError::SlotInUse {
        slot: slot.to_path_buf(),
        reason: format!("it is the booted slot {}", booted.display()),
    };
    if slot == booted {
        return Err(in_use());
    }
    // Symlinks (by-partlabel, by-uuid, ...) resolve to the same device or inode.
    if let Ok(booted_meta) = std::fs::metadata(booted) {
        if same_target(meta, &booted_meta) {
            return Err(in_use());
        }
    }
    Ok(())
}

/// One line of /proc/self/mountinfo, reduced to what the check needs.
#[derive(Debug, PartialEq, Eq)]
struct MountEntry {
    major: u32,
    minor: u32,
    mount_point: String,
    source: String,
}

/// Undo the octal escapes (`\040` for a space, ...) the kernel puts into mountinfo fields.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' && i + 4 <= bytes.len() {
            let digits = std::str::from_utf8(&bytes[i + 1..i + 4]).ok();
            if let Some(v) = digits.and_then(|d| u8::from_str_radix(d, 8).ok()) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let (major, minor) = fields.get(2)?.split_once(':')?;
            let mount_point = unescape(fields.get(4)?);
            let sep = fields.iter().position(|f| *f == "-")?;
            let source = unescape(fields.get(sep + 2)?);
            Some(MountEntry {
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                mount_point,
                source,
            })
        })
        .collect()
}

fn sysfs_dev(major: u32, minor: u32) -> PathBuf {
    PathBuf::from(format!("/sys/dev/block/{major}:{minor}"))
}

fn check_not_mounted(slot: &Path, meta: &Metadata, mountinfo: &Path) -> Result<(), InstallError> {
    let text = match std::fs::read_to_string(mountinfo) {
        Ok(t) => t,
        // No mount table (not Linux /proc): the booted-path check and O_EXCL still apply.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(InstallError::SlotUnusable {
                slot: slot.to_path_buf(),
                reason: format!("cannot read {}: {e}", mountinfo.display()),
            })
        }
    };
    let canonical = std::fs::canonicalize(slot).unwrap_or_else(|_| slot.to_path_buf());
    let mounted = |m: &MountEntry, why: &str| InstallError::SlotInUse {
        slot: slot.to_path_buf(),
        reason: format!("{why} (mounted on {} from {})", m.mount_point, m.source),
    };
    for m in parse_mountinfo(&text) {
        if meta.file_type().is_block_device() {
            let (major, minor) = (libc::major(meta.rdev()), libc::minor(meta.rdev()));
            if (m.major, m.minor) == (major, minor) {
                return Err(mounted(&m, "it holds a mounted filesystem"));
            }
            // A whole disk whose partition is mounted.
            let part = sysfs_dev(m.major, m.minor);
            if part.join("partition").exists() {
                if let Ok(parent) = std::fs::read_to_string(part.join("../dev")) {
                    if parent.trim() == format!("{major}:{minor}") {
                        return Err(mounted(&m, "a partition of it is mounted"));
                    }
                }
            }
        } else {
            // A file mounted directly (the source names it) or through a loop device.
            let source_is_slot = std::fs::canonicalize(&m.source)
                .map(|p| p == canonical)
                .unwrap_or(false);
            let backing =
                std::fs::read_to_string(sysfs_dev(m.major, m.minor).join("loop/backing_file"))
                    .map(|b| Path::new(b.trim()) == canonical)
                    .unwrap_or(false);
            if source_is_slot || backing {
                return Err(mounted(&m, "it is mounted"));
            }
        }
    }
    Ok(())
}

#[repr(C, align(4096))]
#[derive(Clone, Copy)]
struct Page([u8; 4096]);

/// A page-aligned buffer (what O_DIRECT-capable drivers and the page cache like best).
struct AlignedBuffer(Vec<Page>);

impl AlignedBuffer {
    fn new(len: usize) -> Self {
        AlignedBuffer(vec![Page([0; 4096]); len.div_ceil(4096)])
    }

    /// No bytes (stands in for a buffer handed to the writer thread).
    fn empty() -> Self {
        AlignedBuffer(Vec::new())
    }

    fn len(&self) -> usize {
        self.0.len() * 4096
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: `Page` is a plain `[u8; 4096]` with no padding; the Vec owns `len` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// Where the blocking stage spent its time on the slot (for the install timeline). With a
/// writer thread (every real slot), `write`, `last_sync` and `read_back_tail` are time the
/// install thread waited; `device_write`, `writeback` and `read_back_overlapped` were spent on
/// the writer and read-back threads while it went on decoding and hashing.
#[derive(Debug, Default, Clone, Copy)]
pub struct SlotTimes {
    /// The install thread waited to hand a full buffer over: for the writer thread to free
    /// one, and at the end to write the last ones. Without a writer thread (a slot without
    /// [`SlotDevice::writer`]): the writes themselves and everything done after each
    /// (writeback, checkpoints, an inline read-back).
    pub write: Duration,
    /// In the slot's `write` calls (with O_DIRECT: until the device has the data).
    pub device_write: Duration,
    /// Starting and waiting for writeback, and the durable checkpoints' syncs.
    pub writeback: Duration,
    /// The last durable sync, after the last write.
    pub last_sync: Duration,
    /// Reading ranges back and hashing them while later ranges were still being written.
    pub read_back_overlapped: Duration,
    /// Reading back the tail after the last sync (nothing left to overlap with).
    pub read_back_tail: Duration,
}

/// What [`SlotWriter::finish`] reports: the image is on the device and was read back.
#[derive(Debug)]
pub struct Written {
    /// Image bytes on the slot (including a resumed prefix).
    pub bytes: u64,
    /// sha256 of the bytes handed to the writer (None after
    /// [`SlotWriter::leave_hash_to_caller`]).
    pub image_sha256: Option<String>,
    /// sha256 of the same range as read back from the device.
    pub read_back_sha256: String,
    pub times: SlotTimes,
}

fn slot_io(dev: &dyn SlotDevice, op: &'static str, offset: u64, source: io::Error) -> InstallError {
    InstallError::SlotIo {
        slot: dev.path().to_path_buf(),
        op,
        offset,
        source,
    }
}

/// Put the slot's bytes from the 4 KiB boundary below `start` up to it into `buf`, taken from
/// `tail` (the last bytes before `start`, as the caller hashed them), so the writer's buffers
/// start aligned; returns how many (0 when `start` is aligned, the slot keeps nothing, or
/// `tail` is too short: the writer then starts at `start`, unaligned, and its writes go through
/// the page cache).
fn align_start(dev: &dyn SlotDevice, start: u64, tail: &[u8], buf: &mut [u8]) -> usize {
    let before = (start % DIRECT_ALIGN as u64) as usize;
    if before == 0 || !dev.keeps_data() || tail.len() < before {
        return 0;
    }
    buf[..before].copy_from_slice(&tail[tail.len() - before..]);
    before
}

/// The last bytes of a slot prefix as it is read: by default 4 KiB, what a resumed
/// [`SlotWriter`] writes again before its resume point to start its buffers aligned; a gzip
/// resume keeps its 32 KiB window this way ([`PrefixTail::keeping`]).
#[derive(Debug, Clone)]
pub struct PrefixTail {
    keep: usize,
    bytes: Vec<u8>,
}

impl Default for PrefixTail {
    fn default() -> Self {
        Self::keeping(DIRECT_ALIGN)
    }
}

impl PrefixTail {
    /// Keeps the last `keep` bytes.
    pub fn keeping(keep: usize) -> Self {
        PrefixTail {
            keep,
            bytes: Vec::with_capacity(2 * keep),
        }
    }

    /// The next bytes of the prefix.
    pub fn update(&mut self, data: &[u8]) {
        if data.len() >= self.keep {
            self.bytes.clear();
            self.bytes
                .extend_from_slice(&data[data.len() - self.keep..]);
        } else {
            self.bytes.extend_from_slice(data);
            let extra = self.bytes.len().saturating_sub(self.keep);
            self.bytes.drain(..extra);
        }
    }

    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }
}

/// Writes the image into a slot: guards the capacity, hashes the image bytes (sha256, for the
/// read-back check), and hands full aligned buffers to a writer thread, which writes them,
/// bounds dirty memory, makes durable checkpoints, and has every range that reached the device
/// read back while the next ones are written. So decoding and hashing the next buffer overlap
/// the write of the previous one, and the read-back overlaps both.
pub struct SlotWriter<'a> {
    dev: &'a mut dyn SlotDevice,
    /// The buffer being filled (one of the two the writer thread and this one pass between
    /// them).
    buf: AlignedBuffer,
    filled: usize,
    /// Slot offset where `buf` starts.
    offset: u64,
    /// None when the caller hashes exactly the bytes written already (see
    /// [`SlotWriter::leave_hash_to_caller`]).
    image_hash: Option<Sha256>,
    flush: Flush,
    /// The durable checkpoints the flusher made (each published after its sync returned) and
    /// [`SlotWriter::take_checkpoint`] has not reported yet.
    durable: Arc<Checkpoints>,
    /// Bytes read back so far (progress).
    read_back_done: Arc<AtomicU64>,
    /// This thread's share of the timeline (`write`).
    times: SlotTimes,
    /// A write, sync or hand-over failed: the device's state past the last checkpoint is
    /// unknown, so nothing more is taken (a retried write could land at the wrong offset).
    failed: bool,
}

/// Where full buffers go.
enum Flush {
    /// A slot without a second handle for writing (test doubles, the dry run's sink): written
    /// on the install thread.
    Inline(Box<Flusher>),
    Thread(WriterThread),
}

/// Durable checkpoints from the flusher to the slot writer's caller, in the order they were
/// made.
#[derive(Debug, Default)]
struct Checkpoints(std::sync::Mutex<std::collections::VecDeque<u64>>);

impl Checkpoints {
    fn push(&self, at: u64) {
        self.queue().push_back(at);
    }

    fn pop(&self) -> Option<u64> {
        self.queue().pop_front()
    }

    /// Nothing panics while holding the lock; were it poisoned, the queue is still whole.
    fn queue(&self) -> std::sync::MutexGuard<'_, std::collections::VecDeque<u64>> {
        self.0
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

impl<'a> SlotWriter<'a> {
    /// Write from `start` on; `prefix_hash` is the sha256 of the slot bytes before it, read
    /// from the device (resume), and starts both the image hash and the read-back hash.
    /// A durable checkpoint is made every `checkpoint_interval` bytes. A writer resumed at an
    /// offset that is not 4 KiB aligned writes through the page cache; see
    /// [`SlotWriter::resume`].
    pub fn new(
        dev: &'a mut dyn SlotDevice,
        start: u64,
        prefix_hash: Sha256,
        checkpoint_interval: u64,
    ) -> Self {
        Self::resume(dev, start, prefix_hash, &[], checkpoint_interval)
    }

    /// [`SlotWriter::new`] for a resume that read the slot's prefix: `tail` holds its last
    /// bytes as they were hashed into `prefix_hash` ([`PrefixTail`]).
    ///
    /// A resume point is rarely 4 KiB aligned (a deflate block boundary, a chunk's end): the
    /// slot's bytes from the aligned offset below it to `start` (from `tail`) go into the
    /// buffer first, so every buffer is written at an aligned offset and the rest of the image
    /// goes `O_DIRECT` as a fresh install does, instead of through the page cache. Those bytes
    /// are written again exactly as `prefix_hash` covers them, not read from the device a
    /// second time: the read-back starts at `start` and never sees them, so a second read that
    /// returned other bytes would put bytes on the slot that no hash vouches for.
    pub fn resume(
        dev: &'a mut dyn SlotDevice,
        start: u64,
        prefix_hash: Sha256,
        tail: &[u8],
        checkpoint_interval: u64,
    ) -> Self {
        let checkpoint_interval = checkpoint_interval.max(WRITE_BUFFER as u64);
        let mut buf = AlignedBuffer::new(WRITE_BUFFER);
        let filled = align_start(&*dev, start, tail, buf.as_mut_slice());
        let buf_offset = start - filled as u64;
        let read_back = ReadBack::new(&*dev, start, prefix_hash.clone());
        let read_back_done = read_back.progress();
        let durable = Arc::new(Checkpoints::default());
        let flusher = Flusher {
            offset: buf_offset,
            read_back,
            window_start: buf_offset,
            started: None,
            last_checkpoint: buf_offset,
            durable: Arc::clone(&durable),
            sync_window: SYNC_WINDOW.min(checkpoint_interval),
            checkpoint_interval,
            times: SlotTimes::default(),
        };
        let flush = match dev.writer() {
            Some(handle) => Flush::Thread(WriterThread::spawn(
                handle,
                flusher,
                AlignedBuffer::new(WRITE_BUFFER),
            )),
            None => Flush::Inline(Box::new(flusher)),
        };
        SlotWriter {
            dev,
            buf,
            filled,
            offset: buf_offset,
            image_hash: Some(prefix_hash),
            flush,
            durable,
            read_back_done,
            times: SlotTimes::default(),
            failed: false,
        }
    }

    /// The error for every call after a failed write: the first error was returned already.
    fn refuse_after_failure(&self) -> Result<(), InstallError> {
        if self.failed {
            return Err(InstallError::Internal(
                "the slot writer stopped after an error".into(),
            ));
        }
        Ok(())
    }

    pub fn capacity(&self) -> u64 {
        self.dev.capacity()
    }

    pub fn slot_path(&self) -> &Path {
        self.dev.path()
    }

    /// False for a sink that keeps nothing (a dry run): nothing to read back.
    pub fn keeps_data(&self) -> bool {
        self.dev.keeps_data()
    }

    /// Image bytes accepted so far (including a resumed prefix).
    pub fn position(&self) -> u64 {
        self.offset + self.filled as u64
    }

    fn too_large(&self, image_size: u64, at_least: bool) -> InstallError {
        InstallError::TooLarge {
            slot: self.dev.path().to_path_buf(),
            image_size,
            at_least,
            capacity: self.dev.capacity(),
        }
    }

    /// Fail before the first byte when the image's size is known and does not fit.
    pub fn expect_size(&self, image_size: u64) -> Result<(), InstallError> {
        if image_size > self.dev.capacity() {
            return Err(self.too_large(image_size, false));
        }
        Ok(())
    }

    /// Fail before the first byte when the image has at least `lower_bound` bytes and those
    /// do not fit.
    pub fn expect_at_least(&self, lower_bound: u64) -> Result<(), InstallError> {
        if lower_bound > self.dev.capacity() {
            return Err(self.too_large(lower_bound, true));
        }
        Ok(())
    }

    pub fn write(&mut self, mut data: &[u8]) -> Result<(), InstallError> {
        self.refuse_after_failure()?;
        let end = self.position() + data.len() as u64;
        if end > self.dev.capacity() {
            // Stop at once: nothing of this chunk is written.
            return Err(self.too_large(end, true));
        }
        if let Some(hash) = &mut self.image_hash {
            hash.update(data);
        }
        while !data.is_empty() {
            let n = (self.buf.len() - self.filled).min(data.len());
            self.buf.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == self.buf.len() {
                self.flush_buffer()?;
            }
        }
        Ok(())
    }

    /// The free part of the write buffer, up to the slot's end: a reader (the channel, a
    /// decoder) fills it directly, without a copy buffer of its own, and [`SlotWriter::commit`]
    /// takes what it filled. Empty when the slot is full, or after a failed write (see
    /// [`SlotWriter::check_usable`]).
    pub fn spare(&mut self) -> &mut [u8] {
        if self.failed {
            return &mut [];
        }
        let room = self.dev.capacity().saturating_sub(self.position());
        let free = (self.buf.len() - self.filled).min(usize::try_from(room).unwrap_or(usize::MAX));
        &mut self.buf.as_mut_slice()[self.filled..self.filled + free]
    }

    /// Take the first `n` bytes of [`SlotWriter::spare`] as the next image bytes.
    pub fn commit(&mut self, n: usize) -> Result<(), InstallError> {
        self.refuse_after_failure()?;
        let free = self.buf.len() - self.filled;
        assert!(
            n <= free,
            "committed {n} bytes of a {free}-byte spare buffer"
        );
        let filled = self.filled;
        if let Some(hash) = &mut self.image_hash {
            hash.update(&self.buf.as_mut_slice()[filled..filled + n]);
        }
        self.filled += n;
        if self.filled == self.buf.len() {
            self.flush_buffer()?;
        }
        Ok(())
    }

    /// Hand the full buffer over (to the writer thread, which gives the other one back), or
    /// write it here.
    fn flush_buffer(&mut self) -> Result<(), InstallError> {
        if self.filled == 0 {
            return Ok(());
        }
        let flushed = self.flush_filled();
        self.failed |= flushed.is_err();
        flushed
    }

    fn flush_filled(&mut self) -> Result<(), InstallError> {
        let filled = self.filled;
        let began = Instant::now();
        match &mut self.flush {
            Flush::Inline(flusher) => {
                flusher.write(&mut *self.dev, self.buf.as_mut_slice(), filled)?
            }
            Flush::Thread(thread) => {
                let full = std::mem::replace(&mut self.buf, AlignedBuffer::empty());
                // Nothing is filled until a buffer comes back (none after an error).
                self.filled = 0;
                self.buf = thread.hand_over(full, filled)?;
            }
        }
        self.times.write += began.elapsed();
        self.offset += filled as u64;
        self.filled = 0;
        Ok(())
    }

    /// An error when an earlier write failed: for a caller that found [`SlotWriter::spare`]
    /// empty and must tell a full slot from a stopped writer.
    pub fn check_usable(&self) -> Result<(), InstallError> {
        self.refuse_after_failure()
    }

    /// Image bytes already read back from the device.
    pub fn read_back(&self) -> u64 {
        self.read_back_done.load(Ordering::Relaxed)
    }

    /// The next durable checkpoint not reported yet, in order: everything before it was
    /// written and synced (usable for resume). With a writer thread it shows up at the first
    /// call after the writer's sync returned. Every checkpoint is reported once, however far
    /// the writer thread got meanwhile, so the resume records an install leaves do not depend
    /// on the threads' timing (the crash-point suite replays a cycle step by step).
    pub fn take_checkpoint(&mut self) -> Option<u64> {
        self.durable.pop()
    }

    /// Forget the durable checkpoints not taken yet: for a caller that leaves no resume records,
    /// so they do not pile up (one per checkpoint of the whole image otherwise).
    pub fn drop_checkpoints(&mut self) {
        self.durable.queue().clear();
    }

    /// Durable checkpoints made and not taken yet (tests: a writer whose caller leaves no
    /// records must not keep them all).
    #[cfg(test)]
    pub(crate) fn untaken_checkpoints(&self) -> usize {
        self.durable.queue().len()
    }

    /// Wait until the writer thread has written what it was handed (and made the checkpoints
    /// due by then), so [`SlotWriter::take_checkpoint`] reports every durable one: for an
    /// install stopped by an error that records where a restart may resume. An error of the
    /// writer thread is not reported here (the next write or [`SlotWriter::finish`] does).
    pub fn settle(&mut self) {
        if let Flush::Thread(thread) = &mut self.flush {
            thread.settle();
        }
    }

    /// The sha256 of the image bytes accepted so far (before [`SlotWriter::position`]), as a
    /// hasher to finalise; None after [`SlotWriter::leave_hash_to_caller`].
    pub fn image_hash_so_far(&self) -> Option<Sha256> {
        self.image_hash.clone()
    }

    /// Stop hashing the image: the caller already knows the sha256 of exactly the bytes it
    /// writes (a raw image whose artifact hash is sha256; a chunked image of verified chunks,
    /// whose hash is the signed one), and hashing them twice costs ~0.5 s of CPU per GiB.
    /// [`SlotWriter::finish`] then returns no image hash (the read-back hash still covers
    /// everything, a resumed prefix included).
    pub fn leave_hash_to_caller(&mut self) {
        self.image_hash = None;
    }

    /// Write the rest, make everything durable, read back what was not read back yet; returns
    /// once all of it is done (and the writer thread has ended).
    pub fn finish(mut self) -> Result<Written, InstallError> {
        self.refuse_after_failure()?;
        let end = self.position();
        let filled = std::mem::take(&mut self.filled);
        let began = Instant::now();
        let (read_hash, mut times) = match self.flush {
            Flush::Inline(mut flusher) => {
                flusher.write(&mut *self.dev, self.buf.as_mut_slice(), filled)?;
                self.times.write += began.elapsed();
                flusher.finish(&mut *self.dev, self.buf.as_mut_slice())?
            }
            Flush::Thread(thread) => {
                let (hash, times) = thread.finish(self.buf, filled)?;
                // What the wait was not the last sync and the tail read-back, was the last
                // writes.
                let waited = began.elapsed();
                self.times.write += waited.saturating_sub(times.last_sync + times.read_back_tail);
                (hash, times)
            }
        };
        times.write = self.times.write;
        Ok(Written {
            bytes: end,
            image_sha256: self.image_hash.map(|h| hex::encode(h.finalize())),
            read_back_sha256: hex::encode(read_hash.finalize()),
            times,
        })
    }
}

/// The device side of [`SlotWriter`]: writes full buffers in order, bounds dirty memory, makes
/// durable checkpoints, and has what reached the device read back. Runs on the writer thread,
/// or on the install thread for a slot without [`SlotDevice::writer`]; it makes the same
/// device calls in the same order either way.
struct Flusher {
    /// End of the bytes written.
    offset: u64,
    read_back: ReadBack,
    /// Start of the window being filled.
    window_start: u64,
    /// The window whose writeback was started but not yet waited for.
    started: Option<(u64, u64)>,
    last_checkpoint: u64,
    /// The durable checkpoints, each published once its sync returned.
    durable: Arc<Checkpoints>,
    sync_window: u64,
    checkpoint_interval: u64,
    times: SlotTimes,
}

impl Flusher {
    /// Write the first `len` bytes of `buf` at the next offset; then `buf` is free (the
    /// inline read-back's buffer).
    fn write(
        &mut self,
        dev: &mut dyn SlotDevice,
        buf: &mut [u8],
        len: usize,
    ) -> Result<(), InstallError> {
        if len == 0 {
            return Ok(());
        }
        let offset = self.offset;
        let began = Instant::now();
        dev.write_all_at(offset, &buf[..len])
            .map_err(|e| slot_io(dev, "write", offset, e))?;
        self.times.device_write += began.elapsed();
        self.offset += len as u64;
        self.bound_dirty_memory(dev, buf)
    }

    /// At the end of each window: start its writeback, wait for the window before it, read
    /// back everything before this window (it has reached the device) while this one is being
    /// written back, and make a durable checkpoint when one is due.
    fn bound_dirty_memory(
        &mut self,
        dev: &mut dyn SlotDevice,
        scratch: &mut [u8],
    ) -> Result<(), InstallError> {
        let window_start = self.window_start;
        if self.offset - window_start < self.sync_window {
            return Ok(());
        }
        let len = self.offset - window_start;
        let began = Instant::now();
        dev.sync_range(window_start, len, false)
            .map_err(|e| slot_io(dev, "start writeback of", window_start, e))?;
        if let Some((prev, prev_len)) = self.started.replace((window_start, len)) {
            dev.sync_range(prev, prev_len, true)
                .map_err(|e| slot_io(dev, "sync", prev, e))?;
            dev.drop_cache(prev, prev_len);
        }
        self.times.writeback += began.elapsed();
        let began = Instant::now();
        self.read_back_to(dev, scratch, window_start)?;
        self.times.read_back_overlapped += began.elapsed();
        if self.offset - self.last_checkpoint >= self.checkpoint_interval {
            // A durable point: everything so far reached the device (usable for resume).
            let began = Instant::now();
            let at = self.offset;
            dev.sync_data().map_err(|e| slot_io(dev, "sync", at, e))?;
            dev.drop_cache(window_start, at - window_start);
            self.times.writeback += began.elapsed();
            self.last_checkpoint = at;
            self.durable.push(at);
            self.started = None;
        }
        self.window_start = self.offset;
        Ok(())
    }

    /// Read the slot back up to `end` (it has reached the device): on the read-back thread,
    /// or here with `scratch` (a written buffer) as the read buffer.
    fn read_back_to(
        &mut self,
        dev: &mut dyn SlotDevice,
        scratch: &mut [u8],
        end: u64,
    ) -> Result<(), InstallError> {
        if !dev.keeps_data() {
            return Ok(());
        }
        match &mut self.read_back {
            ReadBack::Inline {
                hash,
                verified,
                done,
            } => {
                read_into(dev, scratch, *verified, end, |b| hash.update(b), |_| {})?;
                *verified = end.max(*verified);
                done.store(*verified, Ordering::Relaxed);
                Ok(())
            }
            ReadBack::Thread(thread) => thread.request(end),
        }
    }

    /// Make everything written durable and read back what was not read back yet: the
    /// read-back hash and the times.
    fn finish(
        mut self,
        dev: &mut dyn SlotDevice,
        scratch: &mut [u8],
    ) -> Result<(Sha256, SlotTimes), InstallError> {
        let end = self.offset;
        let began = Instant::now();
        dev.sync_data().map_err(|e| slot_io(dev, "sync", end, e))?;
        dev.drop_cache(0, end);
        self.times.last_sync += began.elapsed();
        let began = Instant::now();
        self.read_back_to(dev, scratch, end)?;
        let read_hash = match self.read_back {
            ReadBack::Inline { hash, .. } => hash,
            ReadBack::Thread(thread) => {
                let (hash, busy) = thread.finish()?;
                self.times.read_back_overlapped += busy;
                hash
            }
        };
        self.times.read_back_tail += began.elapsed();
        Ok((read_hash, self.times))
    }
}

/// What the install thread hands the writer thread.
enum ToWriter {
    /// Write the first `len` bytes of the buffer at the next offset, then hand it back.
    Write(AlignedBuffer, usize),
    /// Write the first `len` bytes (the tail, maybe none), make everything durable, read it
    /// back, and end.
    Finish(AlignedBuffer, usize),
}

type FlushResult = Result<(Sha256, SlotTimes), InstallError>;

/// Writes (and syncs) full buffers on its own thread while the install thread fills the other
/// buffer, so decoding and hashing overlap the `O_DIRECT` writes and the syncs instead of
/// adding up with them. Two buffers in all: one filled, one written (or waiting to be).
struct WriterThread {
    /// A rendezvous: a full buffer is handed over when the writer is done with the previous
    /// one.
    full: Option<mpsc::SyncSender<ToWriter>>,
    /// Written buffers, back to be filled again.
    free: mpsc::Receiver<AlignedBuffer>,
    /// The other buffer while the writer thread is idle (taken back by
    /// [`WriterThread::settle`], or not handed over yet).
    spare: Option<AlignedBuffer>,
    handle: Option<std::thread::JoinHandle<FlushResult>>,
    /// Set when the install goes away unfinished: write nothing more.
    stop: Arc<AtomicBool>,
}

impl WriterThread {
    fn spawn(mut dev: Box<dyn SlotDevice>, mut flusher: Flusher, spare: AlignedBuffer) -> Self {
        let (full_tx, full_rx) = mpsc::sync_channel::<ToWriter>(0);
        let (free_tx, free_rx) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = Arc::clone(&stop);
        let handle = std::thread::spawn(move || -> FlushResult {
            while let Ok(msg) = full_rx.recv() {
                if thread_stop.load(Ordering::Acquire) {
                    break;
                }
                match msg {
                    ToWriter::Write(mut buf, len) => {
                        flusher.write(&mut *dev, buf.as_mut_slice(), len)?;
                        if free_tx.send(buf).is_err() {
                            break;
                        }
                    }
                    ToWriter::Finish(mut buf, len) => {
                        flusher.write(&mut *dev, buf.as_mut_slice(), len)?;
                        return flusher.finish(&mut *dev, buf.as_mut_slice());
                    }
                }
            }
            // The writer was dropped unfinished; nobody reads this.
            Err(InstallError::Aborted)
        });
        WriterThread {
            full: Some(full_tx),
            free: free_rx,
            spare: Some(spare),
            handle: Some(handle),
            stop,
        }
    }

    /// Hand a full buffer over and take the free one back (waiting while the writer thread
    /// still writes it). An error of the writer thread (the first write or sync that failed)
    /// comes back here, at the first hand-over after it.
    fn hand_over(&mut self, buf: AlignedBuffer, len: usize) -> Result<AlignedBuffer, InstallError> {
        let sent = self
            .full
            .as_ref()
            .is_some_and(|tx| tx.send(ToWriter::Write(buf, len)).is_ok());
        if sent {
            if let Some(free) = self.spare.take().or_else(|| self.free.recv().ok()) {
                return Ok(free);
            }
        }
        // The thread stopped early: only an error does that.
        Err(match self.join() {
            Err(e) => e,
            Ok(_) => InstallError::Internal("the slot writer thread ended early".into()),
        })
    }

    /// Wait until the writer thread is idle (it gave the other buffer back) or stopped.
    fn settle(&mut self) {
        if self.spare.is_none() {
            self.spare = self.free.recv().ok();
        }
    }

    /// Write the tail, wait until everything is durable and read back.
    fn finish(mut self, buf: AlignedBuffer, len: usize) -> FlushResult {
        if let Some(tx) = self.full.take() {
            // When this fails the thread has stopped with an error, which join returns.
            let _ = tx.send(ToWriter::Finish(buf, len));
        }
        self.join()
    }

    fn join(&mut self) -> FlushResult {
        self.full = None;
        join_thread(&mut self.handle, "slot writer")
    }
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        // An unfinished install: write nothing more, and wait for the write in progress, so
        // no thread writes to the slot once the writer is gone.
        self.stop.store(true, Ordering::Release);
        let _ = self.join();
    }
}

/// The result of a helper thread of the writer, or why there is none.
fn join_thread<T>(
    handle: &mut Option<std::thread::JoinHandle<Result<T, InstallError>>>,
    name: &str,
) -> Result<T, InstallError> {
    match handle.take().map(|h| h.join()) {
        Some(Ok(result)) => result,
        Some(Err(_)) => Err(InstallError::Internal(format!("the {name} thread died"))),
        None => Err(InstallError::Internal(format!("the {name} thread is gone"))),
    }
}

/// Read-back buffer of the read-back thread (smaller than the write buffer: memory; 128 KiB
/// O_DIRECT reads still keep a device busy, and each 128 KiB more were peak RSS, issue 19).
const READ_BACK_BUFFER: usize = 128 << 10;

/// Where the read-back runs.
enum ReadBack {
    /// On the writing thread, into a written buffer: `hash` covers the slot before
    /// `verified`; `done` is `verified` for progress.
    Inline {
        hash: Sha256,
        verified: u64,
        done: Arc<AtomicU64>,
    },
    Thread(ReadBackThread),
}

impl ReadBack {
    fn new(dev: &dyn SlotDevice, start: u64, prefix_hash: Sha256) -> Self {
        match dev.reader() {
            Some(reader) => ReadBack::Thread(ReadBackThread::spawn(reader, start, prefix_hash)),
            None => ReadBack::Inline {
                hash: prefix_hash,
                verified: start,
                done: Arc::new(AtomicU64::new(start)),
            },
        }
    }

    /// Bytes read back so far, updated as the read-back goes on.
    fn progress(&self) -> Arc<AtomicU64> {
        match self {
            ReadBack::Inline { done, .. } => Arc::clone(done),
            ReadBack::Thread(thread) => Arc::clone(&thread.done),
        }
    }
}

type ReadBackResult = Result<(Sha256, Duration), InstallError>;

/// Reads ranges back on its own thread as the writer reports them on the device, so reading
/// and hashing them overlaps writing the next ones (and the download) instead of following.
struct ReadBackThread {
    /// Ends of ranges to read back; bounded, so a slow read-back holds the writer back.
    requests: Option<mpsc::SyncSender<u64>>,
    handle: Option<std::thread::JoinHandle<ReadBackResult>>,
    /// Bytes read back so far (progress).
    done: Arc<AtomicU64>,
    /// Set when the writer goes away without finishing: stop after the current read.
    stop: Arc<AtomicBool>,
    requested: u64,
}

impl ReadBackThread {
    fn spawn(mut reader: Box<dyn SlotDevice>, start: u64, mut hash: Sha256) -> Self {
        let (tx, rx) = mpsc::sync_channel::<u64>(4);
        let done = Arc::new(AtomicU64::new(start));
        let stop = Arc::new(AtomicBool::new(false));
        let (thread_done, thread_stop) = (Arc::clone(&done), Arc::clone(&stop));
        let handle = std::thread::spawn(move || -> ReadBackResult {
            let mut buf = AlignedBuffer::new(READ_BACK_BUFFER);
            let mut at = start;
            let mut busy = Duration::ZERO;
            while let Ok(end) = rx.recv() {
                if thread_stop.load(Ordering::Relaxed) {
                    break;
                }
                let began = Instant::now();
                read_into(
                    &mut *reader,
                    buf.as_mut_slice(),
                    at,
                    end,
                    |b| hash.update(b),
                    |d| thread_done.store(d, Ordering::Relaxed),
                )?;
                at = end.max(at);
                busy += began.elapsed();
            }
            Ok((hash, busy))
        });
        ReadBackThread {
            requests: Some(tx),
            handle: Some(handle),
            done,
            stop,
            requested: start,
        }
    }

    fn request(&mut self, end: u64) -> Result<(), InstallError> {
        if end <= self.requested {
            return Ok(());
        }
        self.requested = end;
        let sent = self
            .requests
            .as_ref()
            .is_some_and(|tx| tx.send(end).is_ok());
        if sent {
            return Ok(());
        }
        // The thread stopped early: only an error does that.
        self.join().map(|_| ())
    }

    /// Wait for everything requested to be read back; the hash and the time spent reading.
    fn finish(mut self) -> ReadBackResult {
        self.requests = None;
        self.join()
    }

    fn join(&mut self) -> ReadBackResult {
        self.requests = None;
        join_thread(&mut self.handle, "read-back")
    }
}

impl Drop for ReadBackThread {
    fn drop(&mut self) {
        // An unfinished install: stop reading and wait, so no thread outlives the slot.
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.join();
    }
}

/// Feed the first `len` bytes of the slot to `consume`, in large reads; `done` gets the
/// running count (for progress).
pub fn read_range(
    dev: &mut dyn SlotDevice,
    len: u64,
    consume: impl FnMut(&[u8]),
    done: impl FnMut(u64),
) -> Result<(), InstallError> {
    let mut buf = AlignedBuffer::new(WRITE_BUFFER);
    read_into(dev, buf.as_mut_slice(), 0, len, consume, done)
}

/// Feed the slot's bytes `from..to` to `consume` in reads of up to `buf.len()`.
fn read_into(
    dev: &mut dyn SlotDevice,
    buf: &mut [u8],
    from: u64,
    to: u64,
    mut consume: impl FnMut(&[u8]),
    mut done: impl FnMut(u64),
) -> Result<(), InstallError> {
    let mut at = from;
    while at < to {
        let n = read_some(dev, buf, at, to)?;
        consume(&buf[..n]);
        at += n as u64;
        done(at);
    }
    Ok(())
}

/// One read of the slot's bytes from `at` (before `to`, which is past `at`) into the start of
/// `buf`; returns how many (at least one).
fn read_some(
    dev: &mut dyn SlotDevice,
    buf: &mut [u8],
    at: u64,
    to: u64,
) -> Result<usize, InstallError> {
    let want = usize::try_from(to - at)
        .unwrap_or(usize::MAX)
        .min(buf.len());
    // Ask for whole 4 KiB blocks (O_DIRECT needs them); the bytes past `to` are ignored.
    let ask = want
        .next_multiple_of(DIRECT_ALIGN)
        .min(buf.len())
        .min(dev.capacity().saturating_sub(at).max(want as u64) as usize);
    let read = dev.read_at(at, &mut buf[..ask]);
    let failed = |source| InstallError::SlotIo {
        slot: dev.path().to_path_buf(),
        op: "read back",
        offset: at,
        source,
    };
    match read {
        Ok(0) => Err(failed(io::ErrorKind::UnexpectedEof.into())),
        Ok(n) => Ok(n.min(want)),
        Err(e) => Err(failed(e)),
    }
}

/// The slot's first bytes as a `Read` (in large aligned reads through a handle of its own),
/// for a resume that feeds them through the reading path again.
pub struct PrefixReader {
    dev: Box<dyn SlotDevice>,
    buf: AlignedBuffer,
    /// The unread part of `buf`.
    start: usize,
    end: usize,
    /// Slot offset of the next read, and where the prefix ends.
    at: u64,
    len: u64,
}

impl PrefixReader {
    /// The first `len` bytes of the slot behind `dev`; None for a slot without a second
    /// handle ([`SlotDevice::reader`]).
    pub fn new(dev: &dyn SlotDevice, len: u64) -> Option<Self> {
        Some(PrefixReader {
            dev: dev.reader()?,
            buf: AlignedBuffer::new(WRITE_BUFFER),
            start: 0,
            end: 0,
            at: 0,
            len,
        })
    }

    /// Bytes not handed out yet.
    pub fn remaining(&self) -> u64 {
        self.len - self.at + (self.end - self.start) as u64
    }
}

impl Read for PrefixReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.start == self.end {
            if self.at == self.len {
                return Ok(0);
            }
            let n = read_some(&mut *self.dev, self.buf.as_mut_slice(), self.at, self.len)
                .map_err(io::Error::other)?;
            self.at += n as u64;
            (self.start, self.end) = (0, n);
        }
        let n = out.len().min(self.end - self.start);
        out[..n].copy_from_slice(&self.buf.as_mut_slice()[self.start..self.start + n]);
        self.start += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mountinfo_with_escapes() {
        let text = "36 35 98:0 /mnt1 /mnt\\040x rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:5 / /proc rw - proc proc rw\n";
        let entries = parse_mountinfo(text);
        assert_eq!(entries.len(), 2);
        assert_eq!(entries[0].major, 98);
        assert_eq!(entries[0].mount_point, "/mnt x");
        assert_eq!(entries[0].source, "/dev/root");
        assert_eq!(entries[1].source, "proc");
    }

    #[test]
    fn refuses_booted_slot_by_path_and_by_symlink() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        std::fs::write(&a, vec![0u8; 4096]).unwrap();
        let link = dir.path().join("root");
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let none = dir.path().join("no-mountinfo");
        for booted in [&a, &link] {
            let err = open(&a, Some(booted), &none).unwrap_err();
            assert!(matches!(err, InstallError::SlotInUse { .. }), "{err}");
        }
    }

    #[test]
    fn refuses_file_named_as_mount_source() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a b.img");
        std::fs::write(&a, vec![0u8; 4096]).unwrap();
        let info = dir.path().join("mountinfo");
        let escaped = a.display().to_string().replace(' ', "\\040");
        std::fs::write(&info, format!("40 1 7:3 / /mnt rw - ext4 {escaped} rw\n")).unwrap();
        let err = open(&a, None, &info).unwrap_err();
        assert!(matches!(err, InstallError::SlotInUse { .. }), "{err}");
    }

    #[test]
    fn refuses_missing_empty_and_directory_slots() {
        let dir = tempfile::tempdir().unwrap();
        let none = dir.path().join("no-mountinfo");
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        for p in [dir.path().join("missing"), empty, dir.path().to_path_buf()] {
            let err = open(&p, None, &none).unwrap_err();
            assert!(matches!(err, InstallError::SlotUnusable { .. }), "{err}");
        }
    }

    #[test]
    fn writer_refuses_to_grow_the_slot() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        std::fs::write(&a, vec![7u8; 10_000]).unwrap();
        let mut slot = open(&a, None, &dir.path().join("none")).unwrap();
        assert_eq!(slot.capacity(), 10_000);
        let mut w = SlotWriter::new(&mut slot, 0, Sha256::new(), CHECKPOINT_INTERVAL);
        assert!(w.expect_size(10_001).is_err());
        w.write(&[1u8; 9_000]).unwrap();
        let err = w.write(&[1u8; 1_001]).unwrap_err();
        assert!(
            matches!(err, InstallError::TooLarge { at_least: true, .. }),
            "{err}"
        );
        let written = w.finish().unwrap();
        assert_eq!(written.bytes, 9_000);
        let sha = hex::encode(Sha256::digest([1u8; 9_000]));
        assert_eq!(written.image_sha256.as_ref(), Some(&sha));
        assert_eq!(written.read_back_sha256, sha);
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(bytes.len(), 10_000);
        assert!(bytes[..9_000].iter().all(|&b| b == 1));
        assert!(bytes[9_000..].iter().all(|&b| b == 7));
    }

    #[test]
    fn spare_ends_at_the_slot_end_and_commit_writes_what_was_filled() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.img");
        std::fs::write(&a, vec![7u8; 10_000]).unwrap();
        let mut slot = open(&a, None, &dir.path().join("none")).unwrap();
        let mut w = SlotWriter::new(&mut slot, 0, Sha256::new(), CHECKPOINT_INTERVAL);
        let mut image = Vec::new();
        loop {
            let spare = w.spare();
            if spare.is_empty() {
                break;
            }
            let n = spare.len().min(3_000);
            let byte = (image.len() / 3_000) as u8;
            spare[..n].fill(byte);
            image.extend(std::iter::repeat_n(byte, n));
            w.commit(n).unwrap();
        }
        assert_eq!(
            image.len(),
            10_000,
            "the spare buffer stops at the slot's end"
        );
        let written = w.finish().unwrap();
        let sha = hex::encode(Sha256::digest(&image));
        assert_eq!(written.bytes, 10_000);
        assert_eq!(written.image_sha256.as_ref(), Some(&sha));
        assert_eq!(written.read_back_sha256, sha);
        assert_eq!(std::fs::read(&a).unwrap(), image);
    }
}

#[cfg(test)]
mod writeback_tests {
    use super::*;

    /// An in-memory slot that records the sync calls and the reads (merged when contiguous).
    #[derive(Default)]
    struct Recorder {
        data: Vec<u8>,
        calls: Vec<String>,
        /// Bytes written since the last wait or full sync (dirty).
        dirty: u64,
        max_dirty: u64,
        /// End of the bytes written so far, and of those that reached the device (waited for
        /// or synced).
        written_to: u64,
        reached_to: u64,
        /// The read in progress (offset, length), recorded when a non-contiguous call follows.
        reading: Option<(u64, u64)>,
        /// Offset of every write.
        write_offsets: Vec<u64>,
        /// Reads that are not whole 4 KiB blocks return every byte inverted (a device that
        /// returns other bytes than it holds, once).
        garble_partial_reads: bool,
    }

    impl Recorder {
        fn new(len: usize) -> Self {
            Recorder {
                data: vec![0; len],
                ..Recorder::default()
            }
        }

        fn end_read(&mut self) {
            if let Some((offset, len)) = self.reading.take() {
                self.calls
                    .push(format!("read {}M+{}M", offset >> 20, len >> 20));
            }
        }

        fn calls(&mut self) -> &[String] {
            self.end_read();
            &self.calls
        }
    }

    impl SlotDevice for Recorder {
        fn path(&self) -> &Path {
            Path::new("recorder")
        }
        fn capacity(&self) -> u64 {
            self.data.len() as u64
        }
        fn write_all_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
            self.write_offsets.push(offset);
            self.dirty += data.len() as u64;
            self.max_dirty = self.max_dirty.max(self.dirty);
            self.written_to = self.written_to.max(offset + data.len() as u64);
            Ok(())
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.data.len() - offset as usize);
            // Reads past the image (whole blocks for O_DIRECT) are ignored by the reader.
            let image_end = (offset + n as u64).min(self.written_to);
            assert!(
                image_end <= self.reached_to,
                "read back {offset}+{n} before it reached the device (up to {})",
                self.reached_to
            );
            buf[..n].copy_from_slice(&self.data[offset as usize..offset as usize + n]);
            if self.garble_partial_reads && !n.is_multiple_of(4096) {
                buf[..n].iter_mut().for_each(|b| *b = !*b);
            }
            match &mut self.reading {
                Some((start, len)) if *start + *len == offset => *len += n as u64,
                _ => {
                    self.end_read();
                    self.reading = Some((offset, n as u64));
                }
            }
            Ok(n)
        }
        fn sync_range(&mut self, offset: u64, len: u64, wait: bool) -> io::Result<()> {
            self.end_read();
            if wait {
                // Windows are waited for in order.
                self.reached_to = self.reached_to.max(offset + len);
            }
            self.calls.push(format!(
                "{} {}M+{}M",
                if wait { "wait" } else { "start" },
                offset >> 20,
                len >> 20
            ));
            if wait {
                self.dirty = self.dirty.saturating_sub(len);
            }
            Ok(())
        }
        fn sync_data(&mut self) -> io::Result<()> {
            self.end_read();
            self.calls.push("sync".into());
            self.dirty = 0;
            self.reached_to = self.written_to;
            Ok(())
        }
    }

    /// Write 41.7 MB in chunks of 300 KB, taking checkpoints as they come.
    fn write_40m(dev: &mut dyn SlotDevice) -> Vec<u64> {
        let mut checkpoints = Vec::new();
        let mut w = SlotWriter::new(dev, 0, Sha256::new(), 16 << 20);
        let chunk = vec![0x5a; 300_000];
        let mut written = 0u64;
        while written + chunk.len() as u64 <= 40 << 20 {
            w.write(&chunk).unwrap();
            written += chunk.len() as u64;
            checkpoints.extend(w.take_checkpoint());
        }
        let done = w.finish().unwrap();
        assert_eq!(done.bytes, written);
        let expected = hex::encode(Sha256::digest(vec![0x5a; written as usize]));
        assert_eq!(done.image_sha256.as_deref(), Some(expected.as_str()));
        assert_eq!(done.read_back_sha256, expected);
        checkpoints
    }

    const CALLS_40M: [&str; 13] = [
        "start 0M+8M",
        "start 8M+8M",
        "wait 0M+8M",
        "read 0M+8M", // while 8M+8M is written back
        "sync",       // 16 MiB: checkpoint
        "start 16M+8M",
        "read 8M+8M", // synced at the checkpoint, read back while 16M+8M is written
        "start 24M+8M",
        "wait 16M+8M",
        "read 16M+8M",
        "sync",         // 32 MiB: checkpoint
        "sync",         // finish
        "read 24M+15M", // the rest of the 41.7 MB
    ];

    /// A slot holding `prefix` durably from an interrupted install, written on from its end
    /// with `rest` by a resumed writer; returns the device, the whole image and what the
    /// writer's finish returned.
    fn resume_at_unaligned(with_tail: bool) -> (Recorder, Vec<u8>, Result<Written, InstallError>) {
        resume_at_unaligned_on(Recorder::new(4 << 20), with_tail)
    }

    /// [`resume_at_unaligned`] on `dev`; `with_tail`: the writer is given the prefix's tail.
    fn resume_at_unaligned_on(
        mut dev: Recorder,
        with_tail: bool,
    ) -> (Recorder, Vec<u8>, Result<Written, InstallError>) {
        let prefix: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        let rest: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 241) as u8).collect();
        dev.data[..prefix.len()].copy_from_slice(&prefix);
        dev.written_to = prefix.len() as u64;
        dev.reached_to = prefix.len() as u64;
        let mut prefix_hash = Sha256::new();
        let mut tail = PrefixTail::default();
        // As a resume reads it: in pieces.
        for piece in prefix.chunks(700) {
            prefix_hash.update(piece);
            tail.update(piece);
        }
        let tail = if with_tail { tail.bytes() } else { &[] };
        let start = prefix.len() as u64;
        let mut w = SlotWriter::resume(&mut dev, start, prefix_hash, tail, 16 << 20);
        assert_eq!(w.position(), prefix.len() as u64);
        for part in rest.chunks(300_000) {
            w.write(part).unwrap();
        }
        let done = w.finish();
        (dev, [prefix, rest].concat(), done)
    }

    #[test]
    fn a_writer_resumed_at_an_unaligned_offset_writes_aligned_buffers() {
        let (dev, image, done) = resume_at_unaligned(true);
        let done = done.unwrap();
        // The 904 slot bytes before the resume point (the prefix's tail) went into the first
        // buffer, so
        // every write (but the tail) starts on a 4 KiB boundary, the first at 4096.
        assert_eq!(dev.write_offsets.first(), Some(&4096));
        assert!(
            dev.write_offsets.iter().all(|o| o % 4096 == 0),
            "{:?}",
            dev.write_offsets
        );
        assert_eq!(&dev.data[..image.len()], &image[..]);
        assert_eq!(done.bytes, image.len() as u64);
        let expected = hex::encode(Sha256::digest(&image));
        assert_eq!(done.image_sha256.as_deref(), Some(expected.as_str()));
        assert_eq!(done.read_back_sha256, expected);
    }

    /// The slot bytes rewritten before the resume point (to align the buffers) are the ones the
    /// caller hashed, not a second read of the device: a read that returns other bytes than
    /// the slot holds must not end up on the slot behind the hashes' back (the read-back
    /// starts at the resume point, so it would never see them).
    #[test]
    fn a_resumed_writer_rewrites_the_bytes_that_were_hashed() {
        let (dev, image, done) = resume_at_unaligned_on(
            Recorder {
                garble_partial_reads: true,
                ..Recorder::new(4 << 20)
            },
            true,
        );
        let done = done.unwrap();
        let expected = hex::encode(Sha256::digest(&image));
        assert_eq!(done.read_back_sha256, expected);
        assert!(
            dev.data[..image.len()] == image[..],
            "the slot holds other bytes than the image its hashes vouch for"
        );
    }

    #[test]
    fn a_writer_without_the_prefix_tail_writes_from_the_resume_point_unaligned() {
        let (dev, image, done) = resume_at_unaligned(false);
        let expected = hex::encode(Sha256::digest(&image));
        assert_eq!(done.unwrap().read_back_sha256, expected);
        assert_eq!(dev.write_offsets.first(), Some(&5000));
        assert_eq!(&dev.data[..image.len()], &image[..]);
    }

    #[test]
    fn dirty_data_is_bounded_and_checkpoints_are_durable() {
        let mut dev = Recorder::new(40 << 20);
        let checkpoints = write_40m(&mut dev);
        assert_eq!(checkpoints, vec![16 << 20, 32 << 20]);
        assert_eq!(dev.calls(), CALLS_40M);
        // Never more than two sync windows dirty.
        assert!(dev.max_dirty <= 2 * SYNC_WINDOW, "{} dirty", dev.max_dirty);
    }

    /// A recorder behind a lock, with a writer handle to itself: the writer thread runs.
    #[derive(Clone)]
    struct Threaded(Arc<std::sync::Mutex<Recorder>>);

    impl SlotDevice for Threaded {
        fn path(&self) -> &Path {
            Path::new("recorder")
        }
        fn capacity(&self) -> u64 {
            self.0.lock().unwrap().capacity()
        }
        fn write_all_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            self.0.lock().unwrap().write_all_at(offset, data)
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
            self.0.lock().unwrap().read_at(offset, buf)
        }
        fn sync_range(&mut self, offset: u64, len: u64, wait: bool) -> io::Result<()> {
            self.0.lock().unwrap().sync_range(offset, len, wait)
        }
        fn sync_data(&mut self) -> io::Result<()> {
            self.0.lock().unwrap().sync_data()
        }
        fn writer(&self) -> Option<Box<dyn SlotDevice>> {
            Some(Box::new(self.clone()))
        }
    }

    #[test]
    fn the_writer_thread_makes_the_same_calls_in_the_same_order() {
        let mut dev = Threaded(Arc::new(std::sync::Mutex::new(Recorder::new(40 << 20))));
        let checkpoints = write_40m(&mut dev);
        // Checkpoints show up once the writer thread synced them: maybe later, never earlier.
        assert!(
            checkpoints.iter().all(|c| [16 << 20, 32 << 20].contains(c)),
            "{checkpoints:?}"
        );
        let mut recorder = dev.0.lock().unwrap();
        assert_eq!(recorder.calls(), CALLS_40M);
        assert!(
            recorder.max_dirty <= 2 * SYNC_WINDOW,
            "{} dirty",
            recorder.max_dirty
        );
    }

    #[test]
    fn checkpoints_taken_late_are_each_reported_once_in_order() {
        // The install thread takes none while the writer thread makes them: once it settles,
        // it gets every one, in order, not only the latest (a resume record per checkpoint,
        // whatever the threads' timing).
        let mut dev = Threaded(Arc::new(std::sync::Mutex::new(Recorder::new(40 << 20))));
        let mut w = SlotWriter::new(&mut dev, 0, Sha256::new(), 4 << 20);
        w.write(&vec![0x5a; 30 << 20]).unwrap();
        w.settle();
        let taken: Vec<u64> = std::iter::from_fn(|| w.take_checkpoint()).collect();
        assert_eq!(taken, (1..=7).map(|i| i * (4 << 20)).collect::<Vec<u64>>());
        assert_eq!(w.take_checkpoint(), None);
        w.finish().unwrap();
    }

    #[test]
    fn windows_between_checkpoints_are_waited_for() {
        let mut dev = Recorder::new(40 << 20);
        let mut w = SlotWriter::new(&mut dev, 0, Sha256::new(), 1 << 40);
        w.write(&vec![1; 32 << 20]).unwrap();
        w.finish().unwrap();
        assert_eq!(
            dev.calls(),
            [
                "start 0M+8M",
                "start 8M+8M",
                "wait 0M+8M",
                "read 0M+8M",
                "start 16M+8M",
                "wait 8M+8M",
                "read 8M+8M",
                "start 24M+8M",
                "wait 16M+8M",
                "read 16M+8M",
                "sync",
                "read 24M+8M",
            ]
        );
        assert!(dev.max_dirty <= 2 * SYNC_WINDOW, "{} dirty", dev.max_dirty);
    }
}

#[cfg(test)]
mod writer_thread_tests {
    use super::*;
    use std::sync::Mutex;

    /// What a [`SharedSlot`] saw, shared by all its handles.
    #[derive(Default)]
    struct Log {
        data: Vec<u8>,
        /// Device calls and the test's observations, in order.
        calls: Vec<String>,
        /// End of the bytes written, of those that reached the device (waited for or
        /// synced), and of those made durable (`sync_data`).
        written_to: u64,
        reached_to: u64,
        synced_to: u64,
        /// Writes that end past this offset fail with EIO.
        fail_from: Option<u64>,
        /// Every sync (waited `sync_range`, `sync_data`) fails with EIO.
        fail_syncs: bool,
        /// No second handle: the slot writer writes on the install thread.
        inline: bool,
        /// Each write takes this long (a slow device), outside the lock.
        write_delay: Duration,
        /// A write is in progress.
        writing: bool,
        writes: usize,
    }

    /// An in-memory slot whose [`SlotDevice::writer`] handle is a second handle to the same
    /// state, so the writer thread runs; reads back on the writing thread.
    #[derive(Clone)]
    struct SharedSlot(Arc<Mutex<Log>>);

    impl SharedSlot {
        fn new(len: usize) -> Self {
            SharedSlot(Arc::new(Mutex::new(Log {
                data: vec![0; len],
                ..Log::default()
            })))
        }

        fn log(&self) -> std::sync::MutexGuard<'_, Log> {
            self.0.lock().unwrap()
        }
    }

    impl SlotDevice for SharedSlot {
        fn path(&self) -> &Path {
            Path::new("shared")
        }
        fn capacity(&self) -> u64 {
            self.log().data.len() as u64
        }
        fn write_all_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
            let end = offset + data.len() as u64;
            let delay = {
                let mut log = self.log();
                assert!(!log.writing, "two writes at once");
                log.calls.push(format!("write {offset}+{}", data.len()));
                if log.fail_from.is_some_and(|at| end > at) {
                    return Err(io::Error::from_raw_os_error(libc::EIO));
                }
                log.writing = true;
                log.write_delay
            };
            std::thread::sleep(delay);
            let mut log = self.log();
            log.data[offset as usize..end as usize].copy_from_slice(data);
            log.written_to = log.written_to.max(end);
            log.writing = false;
            log.writes += 1;
            Ok(())
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
            let mut log = self.log();
            let n = buf.len().min(log.data.len() - offset as usize);
            let image_end = (offset + n as u64).min(log.written_to);
            assert!(
                image_end <= log.reached_to,
                "read back {offset}+{n} before it reached the device (up to {})",
                log.reached_to
            );
            buf[..n].copy_from_slice(&log.data[offset as usize..offset as usize + n]);
            log.calls.push(format!("read {offset}+{n}"));
            Ok(n)
        }
        fn sync_range(&mut self, offset: u64, len: u64, wait: bool) -> io::Result<()> {
            let mut log = self.log();
            if wait && log.fail_syncs {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            if wait {
                assert!(offset + len <= log.written_to, "waited for unwritten bytes");
                log.reached_to = log.reached_to.max(offset + len);
            }
            log.calls.push(format!("sync_range {offset}+{len} {wait}"));
            Ok(())
        }
        fn sync_data(&mut self) -> io::Result<()> {
            let mut log = self.log();
            if log.fail_syncs {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            log.reached_to = log.written_to;
            log.synced_to = log.written_to;
            let call = format!("sync {}", log.written_to);
            log.calls.push(call);
            Ok(())
        }
        fn writer(&self) -> Option<Box<dyn SlotDevice>> {
            if self.log().inline {
                return None;
            }
            Some(Box::new(self.clone()))
        }
    }

    fn byte(i: u64) -> u8 {
        (i % 251) as u8
    }

    fn image(len: u64) -> Vec<u8> {
        (0..len).map(byte).collect()
    }

    #[test]
    fn a_write_error_on_the_writer_thread_surfaces_with_its_offset_promptly() {
        let mut dev = SharedSlot::new(16 << 20);
        let fail_at = 3 << 20;
        dev.log().fail_from = Some(fail_at);
        let probe = dev.clone();
        let mut w = SlotWriter::new(&mut dev, 0, Sha256::new(), CHECKPOINT_INTERVAL);
        let img = image(16 << 20);
        let mut err = None;
        for chunk in img.chunks(100_000) {
            if let Err(e) = w.write(chunk) {
                err = Some((e, w.position()));
                break;
            }
        }
        let (err, position) = err.expect("the write error was not reported");
        match &err {
            InstallError::SlotIo {
                op, offset, source, ..
            } => {
                assert_eq!(*op, "write");
                assert_eq!(*offset, fail_at);
                assert_eq!(source.raw_os_error(), Some(libc::EIO));
            }
            other => panic!("unexpected {other}"),
        }
        // Reported at the next hand-over, not after the whole image: the failed buffer, the
        // one filled meanwhile and the chunk being copied at most.
        assert!(
            position <= fail_at + 2 * WRITE_BUFFER as u64 + 100_000,
            "reported at {position}"
        );
        // A caller that goes on anyway gets an error, not a hang or a panic.
        assert!(w.write(&[1; 10]).is_err());
        assert!(w.spare().is_empty());
        drop(w);
        let log = probe.log();
        assert_eq!(log.written_to, fail_at, "wrote past the failure");
        assert!(log
            .calls
            .last()
            .unwrap()
            .starts_with(&format!("write {fail_at}+")));
    }

    #[test]
    fn after_a_failed_sync_the_writer_takes_nothing_more_on_either_path() {
        for inline in [false, true] {
            let mut dev = SharedSlot::new(32 << 20);
            dev.log().fail_syncs = true;
            dev.log().inline = inline;
            let probe = dev.clone();
            let mut w = SlotWriter::new(&mut dev, 0, Sha256::new(), CHECKPOINT_INTERVAL);
            let img = image(32 << 20);
            let err = img
                .chunks(100_000)
                .find_map(|chunk| w.write(chunk).err())
                .expect("the failed sync was not reported");
            assert!(
                matches!(&err, InstallError::SlotIo { op: "sync", .. }),
                "inline {inline}: {err}"
            );
            // Settle: the writer thread has nothing left in flight.
            w.settle();
            let writes = probe.log().writes;
            // Every way in refuses: a retried write could land anywhere, the caller must stop.
            assert!(w.write(&[1; 10]).is_err(), "inline {inline}");
            assert!(w.spare().is_empty(), "inline {inline}");
            assert!(w.check_usable().is_err(), "inline {inline}");
            assert!(w.commit(0).is_err(), "inline {inline}");
            assert!(w.take_checkpoint().is_none(), "inline {inline}");
            assert!(w.finish().is_err(), "inline {inline}");
            let log = probe.log();
            assert_eq!(
                log.writes, writes,
                "inline {inline}: wrote after the failure"
            );
            assert_eq!(log.synced_to, 0, "inline {inline}");
        }
    }

    #[test]
    fn checkpoints_never_run_ahead_of_written_and_synced_bytes() {
        let len = 24u64 << 20;
        let mut dev = SharedSlot::new(len as usize);
        // A slow device: the install thread is always ahead of the writer thread.
        dev.log().write_delay = Duration::from_micros(300);
        let probe = dev.clone();
        let interval = 2 << 20;
        let mut w = SlotWriter::new(&mut dev, 0, Sha256::new(), interval);
        let img = image(len);
        let mut checkpoints = Vec::new();
        for chunk in img.chunks(70_000) {
            w.write(chunk).unwrap();
            if let Some(at) = w.take_checkpoint() {
                let mut log = probe.log();
                assert!(
                    log.synced_to >= at,
                    "checkpoint {at} reported with {} bytes written, {} synced",
                    log.written_to,
                    log.synced_to
                );
                assert!(at <= w.position());
                log.calls.push(format!("checkpoint {at}"));
                checkpoints.push(at);
            }
        }
        let done = w.finish().unwrap();
        assert_eq!(done.bytes, len);
        let sha = hex::encode(Sha256::digest(&img));
        assert_eq!(done.image_sha256.as_deref(), Some(sha.as_str()));
        assert_eq!(done.read_back_sha256, sha);
        assert!(checkpoints.len() >= 5, "{checkpoints:?}");
        assert!(
            checkpoints.windows(2).all(|p| p[0] < p[1]),
            "{checkpoints:?}"
        );
        assert!(
            checkpoints.iter().all(|at| at % interval == 0),
            "{checkpoints:?}"
        );
        let log = probe.log();
        assert_eq!(log.data, img);
        // `finish` returned after the last write, its sync and the read-back of the tail.
        let last_write = log
            .calls
            .iter()
            .rposition(|c| c.starts_with("write"))
            .unwrap();
        let last_sync = log
            .calls
            .iter()
            .rposition(|c| c.starts_with("sync "))
            .unwrap();
        assert_eq!(log.calls[last_sync], format!("sync {len}"));
        assert!(last_write < last_sync);
        assert!(
            log.calls.last().unwrap().starts_with("read"),
            "{:?}",
            log.calls.last()
        );
    }

    #[test]
    fn dropping_the_writer_mid_install_waits_for_the_writer_thread() {
        let mut dev = SharedSlot::new(8 << 20);
        dev.log().write_delay = Duration::from_millis(30);
        let probe = dev.clone();
        let mut w = SlotWriter::new(&mut dev, 0, Sha256::new(), CHECKPOINT_INTERVAL);
        // Returns while the writer thread writes the last full buffer.
        w.write(&image(4 * WRITE_BUFFER as u64 + 1000)).unwrap();
        assert!(probe.log().writes < 4, "the writer thread is not behind");
        drop(w);
        let (writes, calls) = {
            let log = probe.log();
            assert!(!log.writing, "a write still runs after the drop");
            (log.writes, log.calls.len())
        };
        assert_eq!(
            writes, 4,
            "the handed-over buffers are written, the partial one is not"
        );
        assert_eq!(
            Arc::strong_count(&probe.0),
            2,
            "the writer thread's handle outlived the drop"
        );
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(
            probe.log().calls.len(),
            calls,
            "device calls after the drop"
        );
    }
}
