//! The target slot: opening it safely (never the booted slot, never a mounted device, never
//! created, truncated or grown), its capacity, and the writer that fills it with large aligned
//! buffers (`O_DIRECT` where the slot allows it), bounded dirty memory and durable checkpoints,
//! and reads every range back from the device once it got there, while later ranges are still
//! being written.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use super::InstallError;

/// Size of one write to the slot (and of the inline read-back's reads). 512 KiB O_DIRECT writes
/// kept the write time of 1 MiB ones in the benchmark; 1 MiB cost 0.5 MiB of peak RSS
/// (issue 19, BENCHMARKS.md).
pub const WRITE_BUFFER: usize = 512 << 10;
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
const DIRECT_ALIGN: usize = 4096;

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
        Some(Box::new(FileSlot {
            file: self.file.try_clone().ok()?,
            path: self.path.clone(),
            capacity: self.capacity,
            direct: Direct::NotOpened,
        }))
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

    fn len(&self) -> usize {
        self.0.len() * 4096
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.len();
        // SAFETY: `Page` is a plain `[u8; 4096]` with no padding; the Vec owns `len` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// Where the blocking stage spent its time on the slot (for the install timeline).
#[derive(Debug, Default, Clone, Copy)]
pub struct SlotTimes {
    /// In `write` calls (with O_DIRECT: until the device has the data).
    pub write: Duration,
    /// Starting and waiting for writeback, and the durable syncs (checkpoints, the last one).
    pub writeback: Duration,
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

/// Writes the image into a slot: guards the capacity, hashes the image bytes (sha256, for the
/// read-back check), bounds dirty memory, reports durable checkpoints, and reads back every
/// range that reached the device while the next ones are written (so the read-back mostly
/// overlaps the write instead of following it).
pub struct SlotWriter<'a> {
    dev: &'a mut dyn SlotDevice,
    /// Gathers image bytes into aligned writes; between writes it is the read-back buffer.
    buf: AlignedBuffer,
    filled: usize,
    /// Slot offset where `buf` starts.
    offset: u64,
    /// None when the caller hashes exactly the bytes written already (see
    /// [`SlotWriter::leave_hash_to_caller`]).
    image_hash: Option<Sha256>,
    read_back: ReadBack,
    /// Start of the window being filled.
    window_start: u64,
    /// The window whose writeback was started but not yet waited for.
    started: Option<(u64, u64)>,
    last_checkpoint: u64,
    new_checkpoint: Option<u64>,
    sync_window: u64,
    checkpoint_interval: u64,
    times: SlotTimes,
}

impl<'a> SlotWriter<'a> {
    /// Write from `start` on; `prefix_hash` is the sha256 of the slot bytes before it, read
    /// from the device (resume), and starts both the image hash and the read-back hash.
    /// A durable checkpoint is made every `checkpoint_interval` bytes.
    pub fn new(
        dev: &'a mut dyn SlotDevice,
        start: u64,
        prefix_hash: Sha256,
        checkpoint_interval: u64,
    ) -> Self {
        let checkpoint_interval = checkpoint_interval.max(WRITE_BUFFER as u64);
        let read_back = ReadBack::new(&*dev, start, prefix_hash.clone());
        SlotWriter {
            dev,
            buf: AlignedBuffer::new(WRITE_BUFFER),
            filled: 0,
            offset: start,
            image_hash: Some(prefix_hash.clone()),
            read_back,
            window_start: start,
            started: None,
            last_checkpoint: start,
            new_checkpoint: None,
            sync_window: SYNC_WINDOW.min(checkpoint_interval),
            checkpoint_interval,
            times: SlotTimes::default(),
        }
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
    /// takes what it filled. Empty only when the slot is full.
    pub fn spare(&mut self) -> &mut [u8] {
        let room = self.dev.capacity().saturating_sub(self.position());
        let free = (self.buf.len() - self.filled).min(usize::try_from(room).unwrap_or(usize::MAX));
        &mut self.buf.as_mut_slice()[self.filled..self.filled + free]
    }

    /// Take the first `n` bytes of [`SlotWriter::spare`] as the next image bytes.
    pub fn commit(&mut self, n: usize) -> Result<(), InstallError> {
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

    fn io_error(&self, op: &'static str, offset: u64, source: io::Error) -> InstallError {
        InstallError::SlotIo {
            slot: self.dev.path().to_path_buf(),
            op,
            offset,
            source,
        }
    }

    fn flush_buffer(&mut self) -> Result<(), InstallError> {
        if self.filled == 0 {
            return Ok(());
        }
        let offset = self.offset;
        let filled = self.filled;
        let buf = self.buf.as_mut_slice();
        let began = Instant::now();
        self.dev
            .write_all_at(offset, &buf[..filled])
            .map_err(|e| InstallError::SlotIo {
                slot: self.dev.path().to_path_buf(),
                op: "write",
                offset,
                source: e,
            })?;
        self.times.write += began.elapsed();
        self.offset += filled as u64;
        self.filled = 0;
        self.bound_dirty_memory()
    }

    /// At the end of each window: start its writeback, wait for the window before it, read
    /// back everything before this window (it has reached the device) while this one is being
    /// written back, and make a durable checkpoint when one is due.
    fn bound_dirty_memory(&mut self) -> Result<(), InstallError> {
        let window_start = self.window_start;
        if self.offset - window_start < self.sync_window {
            return Ok(());
        }
        let len = self.offset - window_start;
        let began = Instant::now();
        self.dev
            .sync_range(window_start, len, false)
            .map_err(|e| self.io_error("start writeback of", window_start, e))?;
        if let Some((prev, prev_len)) = self.started.replace((window_start, len)) {
            self.dev
                .sync_range(prev, prev_len, true)
                .map_err(|e| self.io_error("sync", prev, e))?;
            self.dev.drop_cache(prev, prev_len);
        }
        self.times.writeback += began.elapsed();
        let began = Instant::now();
        self.read_back_to(window_start)?;
        self.times.read_back_overlapped += began.elapsed();
        if self.offset - self.last_checkpoint >= self.checkpoint_interval {
            // A durable point: everything so far reached the device (usable for resume).
            let began = Instant::now();
            let at = self.offset;
            self.dev
                .sync_data()
                .map_err(|e| self.io_error("sync", at, e))?;
            self.dev.drop_cache(window_start, at - window_start);
            self.times.writeback += began.elapsed();
            self.last_checkpoint = at;
            self.new_checkpoint = Some(at);
            self.started = None;
        }
        self.window_start = self.offset;
        Ok(())
    }

    /// Read the slot back up to `end` (it has reached the device): on the read-back thread,
    /// or here with `buf` as the read buffer (only called with `buf` empty, after a flush).
    fn read_back_to(&mut self, end: u64) -> Result<(), InstallError> {
        debug_assert_eq!(self.filled, 0);
        if !self.dev.keeps_data() {
            return Ok(());
        }
        match &mut self.read_back {
            ReadBack::Inline { hash, verified } => {
                read_into(
                    &mut *self.dev,
                    self.buf.as_mut_slice(),
                    *verified,
                    end,
                    |b| hash.update(b),
                    |_| {},
                )?;
                *verified = end.max(*verified);
                Ok(())
            }
            ReadBack::Thread(thread) => thread.request(end),
        }
    }

    /// Image bytes already read back from the device.
    pub fn read_back(&self) -> u64 {
        match &self.read_back {
            ReadBack::Inline { verified, .. } => *verified,
            ReadBack::Thread(thread) => thread.done.load(Ordering::Relaxed),
        }
    }

    /// A new durable offset since the last call: everything before it is on the device.
    pub fn take_checkpoint(&mut self) -> Option<u64> {
        self.new_checkpoint.take()
    }

    /// Stop hashing the image: the caller already computes the sha256 of exactly the bytes it
    /// writes (a raw image whose artifact hash is sha256), and hashing them twice costs ~0.5 s
    /// of CPU per GiB. [`SlotWriter::finish`] then returns no image hash.
    pub fn leave_hash_to_caller(&mut self) {
        self.image_hash = None;
    }

    /// Flush, make everything durable, read back what was not read back yet.
    pub fn finish(mut self) -> Result<Written, InstallError> {
        self.flush_buffer()?;
        let end = self.offset;
        let began = Instant::now();
        self.dev
            .sync_data()
            .map_err(|e| self.io_error("sync", end, e))?;
        self.dev.drop_cache(0, end);
        self.times.writeback += began.elapsed();
        let began = Instant::now();
        self.read_back_to(end)?;
        let read_hash = match self.read_back {
            ReadBack::Inline { hash, .. } => hash,
            ReadBack::Thread(thread) => {
                let (hash, busy) = thread.finish()?;
                self.times.read_back_overlapped += busy;
                hash
            }
        };
        self.times.read_back_tail += began.elapsed();
        Ok(Written {
            bytes: end,
            image_sha256: self.image_hash.map(|h| hex::encode(h.finalize())),
            read_back_sha256: hex::encode(read_hash.finalize()),
            times: self.times,
        })
    }
}

/// Read-back buffer of the read-back thread (smaller than the write buffer: memory; 128 KiB
/// O_DIRECT reads still keep a device busy, and each 128 KiB more were peak RSS, issue 19).
const READ_BACK_BUFFER: usize = 128 << 10;

/// Where the read-back runs.
enum ReadBack {
    /// On the writing thread, into the write buffer: `hash` covers the slot before `verified`.
    Inline {
        hash: Sha256,
        verified: u64,
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
            },
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
        match self.handle.take().map(|h| h.join()) {
            Some(Ok(result)) => result,
            Some(Err(_)) => Err(InstallError::Internal("the read-back thread died".into())),
            None => Err(InstallError::Internal(
                "the read-back thread is gone".into(),
            )),
        }
    }
}

impl Drop for ReadBackThread {
    fn drop(&mut self) {
        // An unfinished install: stop reading and wait, so no thread outlives the slot.
        self.stop.store(true, Ordering::Relaxed);
        self.requests = None;
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
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
        let want = ((to - at) as usize).min(buf.len());
        // Ask for whole 4 KiB blocks (O_DIRECT needs them); the bytes past `to` are ignored.
        let ask = want
            .next_multiple_of(DIRECT_ALIGN)
            .min(buf.len())
            .min(dev.capacity().saturating_sub(at).max(want as u64) as usize);
        let n = dev
            .read_at(at, &mut buf[..ask])
            .map_err(|e| InstallError::SlotIo {
                slot: dev.path().to_path_buf(),
                op: "read back",
                offset: at,
                source: e,
            })?;
        if n == 0 {
            return Err(InstallError::SlotIo {
                slot: dev.path().to_path_buf(),
                op: "read back",
                offset: at,
                source: io::ErrorKind::UnexpectedEof.into(),
            });
        }
        let n = n.min(want);
        consume(&buf[..n]);
        at += n as u64;
        done(at);
    }
    Ok(())
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

    #[test]
    fn dirty_data_is_bounded_and_checkpoints_are_durable() {
        let mut dev = Recorder::new(40 << 20);
        let mut checkpoints = Vec::new();
        let mut w = SlotWriter::new(&mut dev, 0, Sha256::new(), 16 << 20);
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
        assert_eq!(checkpoints, vec![16 << 20, 32 << 20]);
        assert_eq!(
            dev.calls(),
            [
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
            ]
        );
        // Never more than two sync windows dirty.
        assert!(dev.max_dirty <= 2 * SYNC_WINDOW, "{} dirty", dev.max_dirty);
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
