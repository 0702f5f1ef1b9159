//! The target slot: opening it safely (never the booted slot, never a mounted device, never
//! created, truncated or grown), its capacity, and the writer that fills it with large aligned
//! buffers, bounded dirty memory and durable checkpoints, plus the read-back after writing.

use std::fs::{File, Metadata, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::InstallError;

/// Size of one write to the slot (and of the read-back reads).
pub const WRITE_BUFFER: usize = 1 << 20;
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
    /// Second descriptor with O_DIRECT for the read-back, opened on first use.
    direct: Direct,
}

/// Alignment O_DIRECT needs for offsets, lengths and buffers (covers 512 and 4096 sectors).
const DIRECT_ALIGN: usize = 4096;

#[derive(Debug)]
enum Direct {
    NotOpened,
    Open(File),
    /// The file system refuses O_DIRECT (tmpfs, some FUSE): buffered reads after dropping
    /// the cache.
    Unsupported,
}

impl SlotDevice for FileSlot {
    fn path(&self) -> &Path {
        &self.path
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn write_all_at(&mut self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
        // The read-back reads the medium, not the page cache, and a direct read of a
        // dropped range is several times faster than buffered reads that must allocate
        // page cache on a busy machine.
        let aligned = offset % DIRECT_ALIGN as u64 == 0
            && buf.len() % DIRECT_ALIGN == 0
            && (buf.as_ptr() as usize) % DIRECT_ALIGN == 0;
        if aligned {
            if let Direct::NotOpened = self.direct {
                self.direct = match OpenOptions::new()
                    .read(true)
                    .custom_flags(libc::O_DIRECT)
                    .open(&self.path)
                {
                    Ok(f) => Direct::Open(f),
                    Err(_) => Direct::Unsupported,
                };
            }
            if let Direct::Open(direct) = &self.direct {
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

    fn as_mut_slice(&mut self) -> &mut [u8] {
        let len = self.0.len() * 4096;
        // SAFETY: `Page` is a plain `[u8; 4096]` with no padding; the Vec owns `len` bytes.
        unsafe { std::slice::from_raw_parts_mut(self.0.as_mut_ptr().cast::<u8>(), len) }
    }
}

/// Writes the image into a slot: guards the capacity, hashes the image bytes (sha256, for the
/// read-back check), bounds dirty memory and reports durable checkpoints.
pub struct SlotWriter<'a> {
    dev: &'a mut dyn SlotDevice,
    buf: AlignedBuffer,
    filled: usize,
    /// Slot offset where `buf` starts.
    offset: u64,
    /// None when the caller hashes exactly the bytes written already (see
    /// [`SlotWriter::leave_hash_to_caller`]).
    image_hash: Option<Sha256>,
    /// Start of the window being filled.
    window_start: u64,
    /// The window whose writeback was started but not yet waited for.
    started: Option<(u64, u64)>,
    last_checkpoint: u64,
    new_checkpoint: Option<u64>,
    sync_window: u64,
    checkpoint_interval: u64,
}

impl<'a> SlotWriter<'a> {
    /// Write from `start` on; `image_hash` already covers the slot bytes before it (resume).
    /// A durable checkpoint is made every `checkpoint_interval` bytes.
    pub fn new(
        dev: &'a mut dyn SlotDevice,
        start: u64,
        image_hash: Sha256,
        checkpoint_interval: u64,
    ) -> Self {
        let checkpoint_interval = checkpoint_interval.max(WRITE_BUFFER as u64);
        SlotWriter {
            dev,
            buf: AlignedBuffer::new(WRITE_BUFFER),
            filled: 0,
            offset: start,
            image_hash: Some(image_hash),
            window_start: start,
            started: None,
            last_checkpoint: start,
            new_checkpoint: None,
            sync_window: SYNC_WINDOW.min(checkpoint_interval),
            checkpoint_interval,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.dev.capacity()
    }

    pub fn slot_path(&self) -> &Path {
        self.dev.path()
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
            let n = (WRITE_BUFFER - self.filled).min(data.len());
            self.buf.as_mut_slice()[self.filled..self.filled + n].copy_from_slice(&data[..n]);
            self.filled += n;
            data = &data[n..];
            if self.filled == WRITE_BUFFER {
                self.flush_buffer()?;
            }
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
        self.dev
            .write_all_at(offset, &buf[..filled])
            .map_err(|e| InstallError::SlotIo {
                slot: self.dev.path().to_path_buf(),
                op: "write",
                offset,
                source: e,
            })?;
        self.offset += filled as u64;
        self.filled = 0;
        self.bound_dirty_memory()
    }

    fn bound_dirty_memory(&mut self) -> Result<(), InstallError> {
        let window_start = self.window_start;
        if self.offset - window_start < self.sync_window {
            return Ok(());
        }
        let len = self.offset - window_start;
        if self.offset - self.last_checkpoint >= self.checkpoint_interval {
            // A durable point: everything so far reached the device (usable for resume).
            let at = self.offset;
            self.dev
                .sync_data()
                .map_err(|e| self.io_error("sync", at, e))?;
            self.dev
                .drop_cache(self.last_checkpoint, at - self.last_checkpoint);
            self.last_checkpoint = at;
            self.new_checkpoint = Some(at);
            self.started = None;
        } else {
            // Start writeback of this window, then wait for the one started before it:
            // the device stays busy while at most two windows are dirty.
            self.dev
                .sync_range(window_start, len, false)
                .map_err(|e| self.io_error("start writeback of", window_start, e))?;
            if let Some((prev, prev_len)) = self.started.replace((window_start, len)) {
                self.dev
                    .sync_range(prev, prev_len, true)
                    .map_err(|e| self.io_error("sync", prev, e))?;
                self.dev.drop_cache(prev, prev_len);
            }
        }
        self.window_start = self.offset;
        Ok(())
    }

    /// A new durable offset since the last call: everything before it is on the device.
    pub fn take_checkpoint(&mut self) -> Option<u64> {
        self.new_checkpoint.take()
    }

    /// Stop hashing the image: the caller already computes the sha256 of exactly the bytes it
    /// writes (a raw image whose artifact hash is sha256), and hashing them twice costs ~0.5 s
    /// of CPU per GiB. [`SlotWriter::finish`] then returns no hash.
    pub fn leave_hash_to_caller(&mut self) {
        self.image_hash = None;
    }

    /// Flush, make everything durable; returns the image bytes and the sha256 of the image
    /// bytes (None after [`SlotWriter::leave_hash_to_caller`]).
    pub fn finish(mut self) -> Result<(u64, Option<String>), InstallError> {
        self.flush_buffer()?;
        let end = self.offset;
        self.dev
            .sync_data()
            .map_err(|e| self.io_error("sync", end, e))?;
        self.dev.drop_cache(0, end);
        Ok((end, self.image_hash.map(|h| hex::encode(h.finalize()))))
    }
}

/// Feed the first `len` bytes of the slot to `consume`, in large reads; `done` gets the
/// running count (for progress).
pub fn read_range(
    dev: &mut dyn SlotDevice,
    len: u64,
    mut consume: impl FnMut(&[u8]),
    mut done: impl FnMut(u64),
) -> Result<(), InstallError> {
    let mut buf = AlignedBuffer::new(WRITE_BUFFER);
    let buf = buf.as_mut_slice();
    let mut at = 0u64;
    while at < len {
        let want = ((len - at) as usize).min(buf.len());
        // Ask for whole 4 KiB blocks (O_DIRECT needs them); the bytes past `len` are ignored.
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
        let (n, _) = w.finish().unwrap();
        assert_eq!(n, 9_000);
        let bytes = std::fs::read(&a).unwrap();
        assert_eq!(bytes.len(), 10_000);
        assert!(bytes[..9_000].iter().all(|&b| b == 1));
        assert!(bytes[9_000..].iter().all(|&b| b == 7));
    }
}

#[cfg(test)]
mod writeback_tests {
    use super::*;

    /// An in-memory slot that records the sync calls.
    #[derive(Default)]
    struct Recorder {
        data: Vec<u8>,
        calls: Vec<String>,
        /// Bytes written since the last wait or full sync (dirty).
        dirty: u64,
        max_dirty: u64,
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
            Ok(())
        }
        fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.data.len() - offset as usize);
            buf[..n].copy_from_slice(&self.data[offset as usize..offset as usize + n]);
            Ok(n)
        }
        fn sync_range(&mut self, offset: u64, len: u64, wait: bool) -> io::Result<()> {
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
            self.calls.push("sync".into());
            self.dirty = 0;
            Ok(())
        }
    }

    #[test]
    fn dirty_data_is_bounded_and_checkpoints_are_durable() {
        let mut dev = Recorder {
            data: vec![0; 40 << 20],
            ..Recorder::default()
        };
        let mut checkpoints = Vec::new();
        let mut w = SlotWriter::new(&mut dev, 0, Sha256::new(), 16 << 20);
        let chunk = vec![0x5a; 300_000];
        let mut written = 0u64;
        while written + chunk.len() as u64 <= 40 << 20 {
            w.write(&chunk).unwrap();
            written += chunk.len() as u64;
            checkpoints.extend(w.take_checkpoint());
        }
        let (n, sha) = w.finish().unwrap();
        assert_eq!(n, written);
        assert_eq!(
            sha.as_deref(),
            Some(hex::encode(Sha256::digest(vec![0x5a; written as usize])).as_str())
        );
        assert_eq!(checkpoints, vec![16 << 20, 32 << 20]);
        assert_eq!(
            dev.calls,
            [
                "start 0M+8M",
                "sync", // 16 MiB: checkpoint
                "start 16M+8M",
                "sync", // 32 MiB: checkpoint
                "sync", // finish
            ]
        );
        // Never more than two sync windows dirty.
        assert!(dev.max_dirty <= 2 * SYNC_WINDOW, "{} dirty", dev.max_dirty);
    }

    #[test]
    fn windows_between_checkpoints_are_waited_for() {
        let mut dev = Recorder {
            data: vec![0; 40 << 20],
            ..Recorder::default()
        };
        let mut w = SlotWriter::new(&mut dev, 0, Sha256::new(), 1 << 40);
        w.write(&vec![1; 32 << 20]).unwrap();
        w.finish().unwrap();
        assert_eq!(
            dev.calls,
            [
                "start 0M+8M",
                "start 8M+8M",
                "wait 0M+8M",
                "start 16M+8M",
                "wait 8M+8M",
                "start 24M+8M",
                "wait 16M+8M",
                "sync"
            ]
        );
        assert!(dev.max_dirty <= 2 * SYNC_WINDOW, "{} dirty", dev.max_dirty);
    }
}
