//! Reading and saving the U-Boot environment on its medium: the copies named by a
//! `fw_env.config` (regular files or block devices), or an in-memory medium for tests.
//!
//! A save ([`EnvStore::apply`]) is one read-modify-write under the libubootenv lock
//! ([`crate::lock`]): read every copy, select the current one (see [`crate::env::select`]),
//! apply the whole [`ChangeSet`], encode, write **only the non-current copy** with the flag
//! incremented, fsync, then read it back and check it. A change set that changes nothing writes
//! nothing. If no copy is valid nothing is written: U-Boot would be running its built-in
//! default environment, and writing our variables on top of an empty environment would throw
//! away `bootcmd` and everything else the integrator stored.
//!
//! Why redundant is safer: a single-copy environment is rewritten in place (there is nowhere
//! else to write), so a power cut during the save leaves a copy with a bad CRC; U-Boot then
//! boots its compiled-in default environment and the A/B state is gone. With two copies the
//! current one is never touched; a torn write only invalidates the copy being written, and
//! the previous state stays current (the whole save is lost, nothing is mixed).
//!
//! The copies are written in place with `pwrite` + `fsync` rather than through a temporary
//! file and `rename`: U-Boot reads fixed offsets of a device, so the redundant pair itself is
//! what makes the update atomic.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::env::{self, ByteOrder, ChangeSet, DecodedCopy, Env, EnvError, Layout, Selected};
use crate::fw_env_config::{EnvLocation, FwEnvConfig};
use crate::lock::{EnvLock, LockError, DEFAULT_LOCK_PATH};

/// What went wrong reading or saving the environment.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Lock(#[from] LockError),
    #[error("cannot open {}: {source}", device.display())]
    Open {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read environment copy {location}: {source}")]
    Read {
        location: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot write environment copy {location}: {source}")]
    Write {
        location: String,
        #[source]
        source: io::Error,
    },
    #[error("environment copy {location} lies outside its device: {reason}")]
    OutOfRange { location: String, reason: String },
    #[error(
        "no valid U-Boot environment copy, nothing written ({}); U-Boot would use its \
         built-in default environment",
        describe_copies(.copies)
    )]
    NoValidCopy { copies: Vec<(String, EnvError)> },
    #[error("environment copy {location} did not read back as written: {reason}")]
    VerifyFailed { location: String, reason: String },
    #[error("unsupported environment configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Env(#[from] EnvError),
}

fn describe_copies(copies: &[(String, EnvError)]) -> String {
    copies
        .iter()
        .map(|(location, e)| format!("{location}: {e}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Where the copies live and how to read and write them. Implemented for files/block devices
/// ([`FileMedium`]) and memory ([`MemMedium`]).
pub trait EnvMedium: Send + Sync {
    /// Copy `index` for messages, e.g. `/dev/mmcblk0@0x100000`.
    fn describe(&self, index: usize) -> String;
    /// Reads up to `len` bytes of copy `index`; fewer when the medium ends first.
    fn read_copy(&self, index: usize, len: usize) -> Result<Vec<u8>, StoreError>;
    /// Writes copy `index` and returns once it is on the medium (fsync).
    fn write_copy(&self, index: usize, data: &[u8]) -> Result<(), StoreError>;
}

/// Copies on regular files or block devices, at the offsets of a `fw_env.config`.
#[derive(Debug, Clone)]
pub struct FileMedium {
    copies: Vec<EnvLocation>,
}

impl FileMedium {
    /// The copies of a parsed config.
    pub fn new(copies: Vec<EnvLocation>) -> Self {
        FileMedium { copies }
    }

    /// Absolute byte offset of copy `index` in an open device.
    fn offset(&self, index: usize, file: &mut File) -> Result<u64, StoreError> {
        let location = &self.copies[index];
        if !location.from_end {
            return Ok(location.offset);
        }
        // Works for block devices too, where metadata().len() is 0.
        let size = file
            .seek(SeekFrom::End(0))
            .map_err(|source| StoreError::Read {
                location: location.describe(),
                source,
            })?;
        size.checked_sub(location.offset)
            .ok_or_else(|| StoreError::OutOfRange {
                location: location.describe(),
                reason: format!("the device is only {size:#x} bytes"),
            })
    }
}

impl EnvMedium for FileMedium {
    fn describe(&self, index: usize) -> String {
        self.copies[index].describe()
    }

    fn read_copy(&self, index: usize, len: usize) -> Result<Vec<u8>, StoreError> {
        let device = &self.copies[index].device;
        let mut file = File::open(device).map_err(|source| StoreError::Open {
            device: device.clone(),
            source,
        })?;
        let offset = self.offset(index, &mut file)?;
        let read_error = |source| StoreError::Read {
            location: self.describe(index),
            source,
        };
        file.seek(SeekFrom::Start(offset)).map_err(read_error)?;
        let mut buf = vec![0u8; len];
        let filled = crate::fsutil::read_full(&mut file, &mut buf).map_err(read_error)?;
        buf.truncate(filled);
        Ok(buf)
    }

    fn write_copy(&self, index: usize, data: &[u8]) -> Result<(), StoreError> {
        let device = &self.copies[index].device;
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(device)
            .map_err(|source| StoreError::Open {
                device: device.clone(),
                source,
            })?;
        let offset = self.offset(index, &mut file)?;
        let write_err = |source| StoreError::Write {
            location: self.describe(index),
            source,
        };
        let _writable = ForceRoGuard::clear(device).map_err(write_err)?;
        file.write_all_at(data, offset).map_err(write_err)?;
        // fsync on a block device also flushes the eMMC/SD cache.
        file.sync_all().map_err(write_err)?;
        // Drop the now clean pages so the read-back verification reads the medium, not the
        // page cache (best effort: not every file system honours it).
        // SAFETY: plain syscall on a descriptor we own; no memory is passed.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                offset as libc::off_t,
                data.len() as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            );
        }
        Ok(())
    }
}

/// eMMC hardware boot partitions (`mmcblkXbootY`) are read-only until
/// `/sys/class/block/mmcblkXbootY/force_ro` is 0. Like libubootenv, clear it for the write and
/// set it back afterwards.
struct ForceRoGuard {
    control: Option<PathBuf>,
}

impl ForceRoGuard {
    fn clear(device: &Path) -> io::Result<Self> {
        let Some(name) = emmc_boot_partition(device) else {
            return Ok(ForceRoGuard { control: None });
        };
        let control = Path::new("/sys/class/block").join(name).join("force_ro");
        match std::fs::read_to_string(&control) {
            Ok(state) if state.trim() == "1" => {
                std::fs::write(&control, "0")?;
                Ok(ForceRoGuard {
                    control: Some(control),
                })
            }
            _ => Ok(ForceRoGuard { control: None }),
        }
    }
}

impl Drop for ForceRoGuard {
    fn drop(&mut self) {
        if let Some(control) = &self.control {
            // Best effort: a failure leaves the partition writable, as it was during the write.
            let _ = std::fs::write(control, "1");
        }
    }
}

/// `/dev/mtdN` and `/dev/ubiX_Y` (or `ubiX:name`) are flash, not block devices.
fn is_raw_flash(device: &Path) -> bool {
    device.starts_with("/dev")
        && device
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("mtd") || n.starts_with("ubi"))
}

/// `mmcblk0boot1` for a path naming an eMMC boot partition (through symlinks too).
fn emmc_boot_partition(device: &Path) -> Option<String> {
    let resolved = std::fs::canonicalize(device).unwrap_or_else(|_| device.to_path_buf());
    let name = resolved.file_name()?.to_str()?;
    let rest = name.strip_prefix("mmcblk")?;
    let (disk, part) = rest.split_once("boot")?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(disk) && digits(part)).then(|| name.to_string())
}

/// A torn write to inject into a [`MemMedium`]: what reaches the medium before "power fails".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tear {
    /// Only the first `n` bytes of the new copy are written; the rest keeps the old bytes.
    Truncate(usize),
    /// The whole copy is written, then byte `at` is XORed with `mask` (non-zero).
    Corrupt { at: usize, mask: u8 },
    /// Only the first `n` bytes are stored but the write reports success, like the MTD
    /// driver bug that stored only the first byte.
    Silent(usize),
}

#[derive(Debug, Default)]
struct MemState {
    copies: Vec<Vec<u8>>,
    writes: usize,
    tear_next: Option<Tear>,
}

/// Copies held in memory, for tests. Clones share the same copies, so a test keeps one handle
/// to inspect or damage them while the store uses another.
#[derive(Debug, Clone, Default)]
pub struct MemMedium {
    state: Arc<Mutex<MemState>>,
}

impl MemMedium {
    /// A medium holding these copies (each normally `env_size` bytes).
    pub fn new(copies: Vec<Vec<u8>>) -> Self {
        MemMedium {
            state: Arc::new(Mutex::new(MemState {
                copies,
                ..MemState::default()
            })),
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        // A test that panicked while holding the lock leaves usable data behind.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current bytes of every copy.
    pub fn copies(&self) -> Vec<Vec<u8>> {
        self.lock().copies.clone()
    }

    /// Replaces copy `index`.
    pub fn set_copy(&self, index: usize, bytes: Vec<u8>) {
        self.lock().copies[index] = bytes;
    }

    /// Number of copy writes so far (complete or torn).
    pub fn writes(&self) -> usize {
        self.lock().writes
    }

    /// Makes the next write torn: it stores what `tear` says and then fails like a power cut.
    pub fn tear_next_write(&self, tear: Tear) {
        self.lock().tear_next = Some(tear);
    }
}

impl EnvMedium for MemMedium {
    fn describe(&self, index: usize) -> String {
        format!("memory copy {}", index + 1)
    }

    fn read_copy(&self, index: usize, len: usize) -> Result<Vec<u8>, StoreError> {
        let state = self.lock();
        let copy = &state.copies[index];
        Ok(copy[..len.min(copy.len())].to_vec())
    }

    fn write_copy(&self, index: usize, data: &[u8]) -> Result<(), StoreError> {
        let mut state = self.lock();
        state.writes += 1;
        let tear = state.tear_next.take();
        let copy = &mut state.copies[index];
        if copy.len() < data.len() {
            copy.resize(data.len(), 0xff);
        }
        match tear {
            None => {
                copy[..data.len()].copy_from_slice(data);
                Ok(())
            }
            Some(Tear::Truncate(n)) => {
                let n = n.min(data.len());
                copy[..n].copy_from_slice(&data[..n]);
                Err(power_cut(index))
            }
            Some(Tear::Corrupt { at, mask }) => {
                copy[..data.len()].copy_from_slice(data);
                copy[at % data.len()] ^= mask;
                Err(power_cut(index))
            }
            Some(Tear::Silent(n)) => {
                let n = n.min(data.len());
                copy[..n].copy_from_slice(&data[..n]);
                Ok(())
            }
        }
    }
}

fn power_cut(index: usize) -> StoreError {
    StoreError::Write {
        location: format!("memory copy {}", index + 1),
        source: io::Error::other("simulated power cut"),
    }
}

/// Result of [`EnvStore::apply`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// The environment after the change (what is now current on the medium).
    pub env: Env,
    /// The save made, or `None` when the change set changed nothing (nothing was written).
    pub saved: Option<Saved>,
}

impl Applied {
    /// Whether the environment was written.
    pub fn changed(&self) -> bool {
        self.saved.is_some()
    }
}

/// The copy one save wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    /// Index of the written copy (0 = copy 1).
    pub copy: usize,
    /// Its location, e.g. `/dev/mmcblk0@0x104000`.
    pub location: String,
    /// Its flag (redundant only).
    pub flag: Option<u8>,
}

/// The U-Boot environment on its medium.
pub struct EnvStore {
    medium: Box<dyn EnvMedium>,
    layout: Layout,
    env_size: usize,
    lock_path: Option<PathBuf>,
    /// The configured copies when the medium is files/devices (for provisioning).
    locations: Vec<EnvLocation>,
    byte_order: ByteOrder,
}

impl std::fmt::Debug for EnvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let copies: Vec<String> = (0..self.layout.copies())
            .map(|i| self.medium.describe(i))
            .collect();
        f.debug_struct("EnvStore")
            .field("copies", &copies)
            .field("layout", &self.layout)
            .field("env_size", &self.env_size)
            .field("lock_path", &self.lock_path)
            .finish()
    }
}

impl EnvStore {
    /// The environment a `fw_env.config` describes, locked with libubootenv's lock file.
    /// Nothing is opened until the first read.
    pub fn open(config: &FwEnvConfig) -> Result<Self, StoreError> {
        if config.copies.is_empty() || config.copies.len() > 2 {
            return Err(StoreError::Config(format!(
                "{} environment copies configured; one or two are supported",
                config.copies.len()
            )));
        }
        if let Some(flash) = config.copies.iter().find(|c| is_raw_flash(&c.device)) {
            return Err(StoreError::Config(format!(
                "{} is MTD/UBI flash, which needs erase blocks and NOR's boolean flags; only \
                 block devices and files are supported (use fw_setenv for flash)",
                flash.device.display()
            )));
        }
        let env_size = usize::try_from(config.env_size()).map_err(|_| {
            StoreError::Config(format!("env-size {:#x} is too large", config.env_size()))
        })?;
        Ok(EnvStore {
            medium: Box::new(FileMedium::new(config.copies.clone())),
            layout: config.layout(),
            env_size,
            lock_path: Some(PathBuf::from(DEFAULT_LOCK_PATH)),
            locations: config.copies.clone(),
            byte_order: ByteOrder::Little,
        })
    }

    /// Loads `fw_env.config` from `path` and opens the environment it names.
    pub fn open_config_file(path: &Path) -> Result<Self, OpenError> {
        let config = FwEnvConfig::load(path)?;
        Ok(Self::open(&config)?)
    }

    /// A store over any medium (tests: [`MemMedium`]); no lock file.
    pub fn with_medium(medium: Box<dyn EnvMedium>, layout: Layout, env_size: usize) -> Self {
        EnvStore {
            medium,
            layout,
            env_size,
            lock_path: None,
            locations: Vec::new(),
            byte_order: ByteOrder::Little,
        }
    }

    /// An in-memory environment holding `env` as a fresh image (see [`env::create_image`]),
    /// plus a handle on its copies.
    pub fn in_memory(
        env: &Env,
        env_size: usize,
        layout: Layout,
    ) -> Result<(Self, MemMedium), StoreError> {
        let image = env::create_image(env, env_size, layout)?;
        let medium = MemMedium::new(image.chunks(env_size).map(<[u8]>::to_vec).collect());
        Ok((
            Self::with_medium(Box::new(medium.clone()), layout, env_size),
            medium,
        ))
    }

    /// Uses another lock file than `/var/lock/fw_printenv.lock` (tests, or a libubootenv YAML
    /// config with its own `lockfile`).
    pub fn with_lock_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.lock_path = Some(path.into());
        self
    }

    /// Stores the CRC big-endian, for big-endian targets (`mkenvimage -b` images).
    pub fn with_byte_order(mut self, order: ByteOrder) -> Self {
        self.byte_order = order;
        self
    }

    /// Whether the environment has two copies.
    pub fn is_redundant(&self) -> bool {
        self.layout == Layout::Redundant
    }

    /// Single or redundant.
    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Bytes of each copy.
    pub fn env_size(&self) -> usize {
        self.env_size
    }

    fn lock(&self) -> Result<Option<EnvLock>, StoreError> {
        match &self.lock_path {
            Some(path) => Ok(Some(EnvLock::acquire(path)?)),
            None => Ok(None),
        }
    }

    fn read_copies(&self) -> Result<Vec<Result<DecodedCopy, EnvError>>, StoreError> {
        (0..self.layout.copies())
            .map(|i| {
                let bytes = self.medium.read_copy(i, self.env_size)?;
                Ok(if bytes.len() < self.env_size {
                    Err(EnvError::WrongLength {
                        expected: self.env_size,
                        actual: bytes.len(),
                    })
                } else {
                    env::decode_copy_with(&bytes, self.layout, self.byte_order)
                })
            })
            .collect()
    }

    fn select_unlocked(&self) -> Result<Selected, StoreError> {
        let decoded = self.read_copies()?;
        env::select_decoded(decoded, self.layout).map_err(|e| match e {
            EnvError::NoValidCopy { failures } => StoreError::NoValidCopy {
                copies: failures
                    .into_iter()
                    .map(|(i, e)| (self.medium.describe(i), e))
                    .collect(),
            },
            other => StoreError::Env(other),
        })
    }

    /// Reads every copy under the lock and returns the current one with what is wrong with
    /// the others.
    ///
    /// When the lock file cannot be opened at all (an unprivileged user, a read-only `/var`),
    /// the copies are read without the lock, as libubootenv does: a read never changes
    /// anything, and a save racing with it can at worst make this read fail its CRC check.
    pub fn read_selected(&self) -> Result<Selected, StoreError> {
        let _lock = match self.lock() {
            Ok(lock) => lock,
            Err(StoreError::Lock(e)) if e.is_unavailable() => None,
            Err(e) => return Err(e),
        };
        self.select_unlocked()
    }

    /// The current environment.
    pub fn read(&self) -> Result<Env, StoreError> {
        Ok(self.read_selected()?.copy.env)
    }

    /// Applies `changes` in ONE save (see the module docs). A change set that changes nothing
    /// writes nothing. Invalid names or values, or a result that does not fit, are refused
    /// before anything is written.
    pub fn apply(&self, changes: &ChangeSet) -> Result<Applied, StoreError> {
        changes.validate()?;
        let _lock = self.lock()?;
        let selected = self.select_unlocked()?;
        self.apply_locked(selected, changes)
    }

    /// Decides the changes from the current environment and applies them in ONE save, holding
    /// the lock across both, so a writer in between (`fw_setenv`, RAUC) cannot be overwritten
    /// with a decision made on stale variables. Returns the changes and what was saved.
    pub fn update<E: From<StoreError>>(
        &self,
        decide: impl FnOnce(&Env) -> Result<ChangeSet, E>,
    ) -> Result<(ChangeSet, Applied), E> {
        let _lock = self.lock()?;
        let selected = self.select_unlocked()?;
        let changes = decide(&selected.copy.env)?;
        changes.validate().map_err(StoreError::from)?;
        let applied = self.apply_locked(selected, &changes)?;
        Ok((changes, applied))
    }

    fn apply_locked(&self, selected: Selected, changes: &ChangeSet) -> Result<Applied, StoreError> {
        let mut env = selected.copy.env.clone();
        if !env.apply(changes)? {
            return Ok(Applied { env, saved: None });
        }
        let target = selected.write_target();
        let flag = selected.next_flag();
        let bytes = env::encode_copy_with(&env, self.env_size, self.layout, flag, self.byte_order)?;
        self.medium.write_copy(target, &bytes)?;
        let location = self.medium.describe(target);
        self.verify(target, &bytes, &env, &location)?;
        Ok(Applied {
            env,
            saved: Some(Saved {
                copy: target,
                location,
                flag: (self.layout == Layout::Redundant).then_some(flag),
            }),
        })
    }

    /// Reads the written copy back (catches storage paths that drop data, as MTD writes did on
    /// some kernels) and checks that it is now the current one.
    fn verify(
        &self,
        target: usize,
        written: &[u8],
        env: &Env,
        location: &str,
    ) -> Result<(), StoreError> {
        let failed = |reason: String| StoreError::VerifyFailed {
            location: location.to_string(),
            reason,
        };
        let back = self.medium.read_copy(target, self.env_size)?;
        if back != written {
            let first = back
                .iter()
                .zip(written)
                .position(|(a, b)| a != b)
                .unwrap_or(back.len().min(written.len()));
            return Err(failed(format!("first difference at byte {first:#x}")));
        }
        let now = self.select_unlocked()?;
        if now.current != target || now.copy.env != *env {
            return Err(failed(format!(
                "copy {} is current instead of the written copy {}",
                now.current + 1,
                target + 1
            )));
        }
        Ok(())
    }

    /// Writes a fresh environment to every copy (provisioning: tests, demo, disk images),
    /// copy 1 current. This overwrites whatever was there, so it is not for a live device
    /// with state to keep. Regular files that do not exist yet are created.
    pub fn provision(&self, env: &Env) -> Result<(), StoreError> {
        let _lock = self.lock()?;
        for location in &self.locations {
            create_missing_file(&location.device)?;
        }
        // Copy 1 current (flag 1), copy 2 the same variables with flag 0, as create_image.
        for index in 0..self.layout.copies() {
            let flag = if index == 0 { 1 } else { 0 };
            let copy =
                env::encode_copy_with(env, self.env_size, self.layout, flag, self.byte_order)?;
            self.medium.write_copy(index, &copy)?;
        }
        let now = self.select_unlocked()?;
        if now.current != 0 || now.copy.env != *env {
            return Err(StoreError::VerifyFailed {
                location: self.medium.describe(0),
                reason: "the provisioned environment does not read back".to_string(),
            });
        }
        Ok(())
    }
}

/// Creates an empty regular file at `path` if nothing is there, durably (fsync of the folder).
fn create_missing_file(path: &Path) -> Result<(), StoreError> {
    let err = |source| StoreError::Open {
        device: path.to_path_buf(),
        source,
    };
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(file) => {
            file.sync_all().map_err(err)?;
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d,
                _ => Path::new("."),
            };
            File::open(dir).and_then(|d| d.sync_all()).map_err(err)
        }
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// [`EnvStore::open_config_file`] failed: the config, or the store.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] crate::fw_env_config::ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Env {
        [("bootcmd", "run distro_bootcmd"), ("bootctl_slot", "A")]
            .into_iter()
            .collect()
    }

    #[test]
    fn emmc_boot_partitions_are_recognised() {
        assert_eq!(
            emmc_boot_partition(Path::new("/dev/mmcblk0boot1")).as_deref(),
            Some("mmcblk0boot1")
        );
        assert_eq!(emmc_boot_partition(Path::new("/dev/mmcblk0p2")), None);
        assert_eq!(emmc_boot_partition(Path::new("/dev/mmcblk0boot")), None);
        assert_eq!(emmc_boot_partition(Path::new("/tmp/env.bin")), None);
    }

    #[test]
    fn flash_devices_are_refused() {
        let config = FwEnvConfig::parse("/dev/mtd1 0 0x4000 0x4000\n", Path::new("/")).unwrap();
        let err = EnvStore::open(&config).unwrap_err().to_string();
        assert!(err.contains("/dev/mtd1 is MTD/UBI flash"), "{err}");
        let config = FwEnvConfig::parse("/dev/ubi0:env 0 0x1f000\n", Path::new("/")).unwrap();
        assert!(EnvStore::open(&config).is_err());
        let config = FwEnvConfig::parse("/dev/mmcblk0 0 0x4000\n", Path::new("/")).unwrap();
        assert!(EnvStore::open(&config).is_ok());
    }

    #[test]
    fn big_endian_store_reads_and_writes_big_endian_crcs() {
        let (store, medium) = EnvStore::in_memory(&base(), 128, Layout::Single).unwrap();
        let store = store.with_byte_order(ByteOrder::Big);
        assert!(
            store.read().is_err(),
            "a little-endian CRC is invalid on a BE target"
        );
        let be = env::encode_copy_with(&base(), 128, Layout::Single, 0, ByteOrder::Big).unwrap();
        medium.set_copy(0, be);
        assert_eq!(store.read().unwrap(), base());
        store.apply(&ChangeSet::new().with("x", "1")).unwrap();
        let copy = env::decode_copy_with(&medium.copies()[0], Layout::Single, ByteOrder::Big);
        assert_eq!(copy.unwrap().env.get("x"), Some("1"));
    }

    #[test]
    fn apply_writes_only_the_other_copy_with_flag_plus_one() {
        let (store, medium) = EnvStore::in_memory(&base(), 256, Layout::Redundant).unwrap();
        let before = medium.copies();
        let applied = store
            .apply(
                &ChangeSet::new()
                    .with("bootctl_slot", "B")
                    .with("upgrade_available", "1"),
            )
            .unwrap();
        let saved = applied.saved.clone().unwrap();
        assert_eq!((saved.copy, saved.flag), (1, Some(2)));
        let after = medium.copies();
        assert_eq!(after[0], before[0], "current copy untouched");
        assert_eq!(after[1][4], 2);
        assert_eq!(medium.writes(), 1, "one save");
        let env = store.read().unwrap();
        assert_eq!(env.get("bootctl_slot"), Some("B"));
        assert_eq!(env.get("bootcmd"), Some("run distro_bootcmd"));
        let names: Vec<_> = env.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["bootcmd", "bootctl_slot", "upgrade_available"]);
        // The next save goes back to copy 1 with flag 3.
        let saved = store
            .apply(&ChangeSet::new().with("bootcount", "1"))
            .unwrap()
            .saved
            .unwrap();
        assert_eq!((saved.copy, saved.flag), (0, Some(3)));
    }

    #[test]
    fn no_change_writes_nothing() {
        let (store, medium) = EnvStore::in_memory(&base(), 256, Layout::Redundant).unwrap();
        assert!(!store.apply(&ChangeSet::new()).unwrap().changed());
        let same = ChangeSet::new()
            .with("bootctl_slot", "A")
            .without("missing");
        assert!(!store.apply(&same).unwrap().changed());
        assert_eq!(medium.writes(), 0);
    }

    #[test]
    fn single_copy_is_rewritten_in_place() {
        let (store, medium) = EnvStore::in_memory(&base(), 128, Layout::Single).unwrap();
        assert!(!store.is_redundant());
        let saved = store
            .apply(&ChangeSet::new().with("x", "1"))
            .unwrap()
            .saved
            .unwrap();
        assert_eq!((saved.copy, saved.flag), (0, None));
        assert_eq!(medium.copies().len(), 1);
        assert_eq!(store.read().unwrap().get("x"), Some("1"));
    }

    #[test]
    fn no_valid_copy_refuses_and_writes_nothing() {
        let (store, medium) = EnvStore::in_memory(&base(), 64, Layout::Redundant).unwrap();
        medium.set_copy(0, vec![0xff; 64]);
        medium.set_copy(1, vec![0x00; 64]);
        let err = store.apply(&ChangeSet::new().with("a", "1")).unwrap_err();
        assert!(matches!(err, StoreError::NoValidCopy { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("memory copy 1: bad CRC"), "{text}");
        assert!(text.contains("memory copy 2: bad CRC"), "{text}");
        assert!(text.contains("nothing written"), "{text}");
        assert_eq!(medium.writes(), 0);
        assert!(store.read().is_err());
    }

    #[test]
    fn overflow_and_invalid_values_write_nothing() {
        let (store, medium) = EnvStore::in_memory(&base(), 64, Layout::Redundant).unwrap();
        let big = "x".repeat(64);
        let err = store.apply(&ChangeSet::new().with("big", big)).unwrap_err();
        assert!(
            matches!(err, StoreError::Env(EnvError::TooLarge { .. })),
            "{err}"
        );
        let err = store
            .apply(&ChangeSet::new().with("a", "b\\c"))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::Env(EnvError::InvalidValue { .. })),
            "{err}"
        );
        assert_eq!(medium.writes(), 0);
    }

    #[test]
    fn torn_write_keeps_previous_state() {
        let (store, medium) = EnvStore::in_memory(&base(), 128, Layout::Redundant).unwrap();
        medium.tear_next_write(Tear::Truncate(40));
        assert!(store
            .apply(&ChangeSet::new().with("bootctl_slot", "B"))
            .is_err());
        assert_eq!(store.read().unwrap(), base());
        // The next save goes to the same (torn) copy and succeeds.
        let saved = store
            .apply(&ChangeSet::new().with("bootctl_slot", "B"))
            .unwrap()
            .saved
            .unwrap();
        assert_eq!((saved.copy, saved.flag), (1, Some(2)));
    }

    #[test]
    fn unavailable_lock_allows_reads_but_not_saves() {
        // Nothing can be created in /proc, even by root.
        let (store, medium) = EnvStore::in_memory(&base(), 128, Layout::Redundant).unwrap();
        let store = store.with_lock_path("/proc/ddi-bootctl-test.lock");
        assert_eq!(store.read().unwrap(), base());
        let err = store.apply(&ChangeSet::new().with("x", "1")).unwrap_err();
        assert!(matches!(err, StoreError::Lock(_)), "{err}");
        assert!(
            err.to_string().contains("/proc/ddi-bootctl-test.lock"),
            "{err}"
        );
        assert_eq!(medium.writes(), 0);
    }

    #[test]
    fn lost_write_is_caught_by_read_back() {
        let (store, medium) = EnvStore::in_memory(&base(), 128, Layout::Redundant).unwrap();
        medium.tear_next_write(Tear::Silent(1));
        let err = store
            .apply(&ChangeSet::new().with("bootctl_slot", "B"))
            .unwrap_err();
        assert!(
            matches!(err, StoreError::VerifyFailed { .. }),
            "expected a verification failure, got {err}"
        );
        assert!(err.to_string().contains("memory copy 2"), "{err}");
        assert_eq!(store.read().unwrap(), base());
    }

    #[test]
    fn file_medium_reads_short_file_as_invalid_copy_and_writes_it() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("env.bin");
        // Copy 1 only; copy 2 is past the end of the file.
        std::fs::write(
            &file,
            env::encode(&base(), 0x100, Layout::Redundant).unwrap(),
        )
        .unwrap();
        let config =
            FwEnvConfig::parse("env.bin 0 0x100\nenv.bin 0x100 0x100\n", dir.path()).unwrap();
        let store = EnvStore::open(&config)
            .unwrap()
            .with_lock_path(dir.path().join("lock"));
        let sel = store.read_selected().unwrap();
        assert_eq!(sel.current, 0);
        assert!(matches!(
            sel.problems[1],
            Some(EnvError::WrongLength { .. })
        ));
        store.apply(&ChangeSet::new().with("x", "y")).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().len(), 0x200);
        assert_eq!(store.read_selected().unwrap().current, 1);
    }

    #[test]
    fn file_medium_negative_offset_counts_from_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("disk.img");
        std::fs::write(&file, vec![0u8; 0x1000]).unwrap();
        let config =
            FwEnvConfig::parse("disk.img -0x200 0x100\ndisk.img -0x100 0x100\n", dir.path())
                .unwrap();
        let store = EnvStore::open(&config)
            .unwrap()
            .with_lock_path(dir.path().join("lock"));
        store.provision(&base()).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        assert_eq!(bytes.len(), 0x1000);
        let sel = env::decode_image(&bytes[0xe00..], 0x100, Layout::Redundant).unwrap();
        assert_eq!(sel.env(), &base());
    }
}
