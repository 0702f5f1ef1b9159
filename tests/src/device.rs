//! A file-backed device for integration tests and the demo: two slot files of a fixed size, a
//! redundant U-Boot environment in a file with its `fw_env.config`, a kernel command line file,
//! the agent's `config.toml`, a reboot command that only leaves a marker, and a health check that
//! inspects the booted slot. [`FileDevice::reboot`] plays U-Boot at power-on with the boot
//! script's exact decision (`bootctl::boot_script`, via [`boot_store`]), so the real `ddi-agent` sees what it would see on a
//! board. Also builds the images tests install (good, broken, gzip, tar).

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use bootctl::env::{Env, Layout};
use bootctl::fw_env_config::FwEnvConfig;
use bootctl::scheme::{SchemeKind, Slot};
use bootctl::store::EnvStore;

use crate::harness::{self, CommandOutput};

/// Size of one environment copy (`CONFIG_ENV_SIZE`), as on most eMMC boards.
pub const ENV_SIZE: usize = 0x4000;

/// Default capacity of each slot file.
pub const DEFAULT_SLOT_SIZE: u64 = 4 * 1024 * 1024;

/// Errors of the fixture, with the path or step that failed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("boot control on the simulated device: {0}")]
    Bootctl(#[from] bootctl::Error),
    #[error("image of {len} bytes does not fit into a slot of {slot_size} bytes")]
    TooBig { len: u64, slot_size: u64 },
}

type Result<T> = std::result::Result<T, DeviceError>;

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> DeviceError {
    let path = path.to_path_buf();
    move |source| DeviceError::Io {
        action,
        path,
        source,
    }
}

/// How to build a [`FileDevice`]. Start from [`DeviceOptions::new`] and change fields.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// hawkBit (or test server) base URL.
    pub server_url: String,
    pub tenant: String,
    pub controller_id: String,
    /// Target security token (`[server] target_token`).
    pub target_token: String,
    /// When set, `[server] gateway_token` is written instead of `target_token`.
    pub gateway_token: Option<String>,
    /// Capacity of each slot file; never changed by the agent.
    pub slot_size: u64,
    /// Image in slot A at creation (the factory image).
    pub factory_image: Vec<u8>,
    pub scheme: SchemeKind,
    /// Two environment copies (default) or one (`Layout::Single`, one line in `fw_env.config`).
    pub env_layout: Layout,
    /// Trial boots before U-Boot falls back (`[boot] attempts`).
    pub attempts: u32,
    /// Variables of the environment at creation, in order. The defaults are a plausible board
    /// environment (`bootcmd`, `bootargs`, vendor variables) so that preservation is visible.
    pub initial_env: Vec<(String, String)>,
    /// `[agent] health_checks` (shell strings). `None` = the device's own check
    /// ([`FileDevice::health_check_path`]), which fails on images built with [`Health::Broken`].
    pub health_checks: Option<Vec<String>>,
    /// `[agent] health_check_timeout` in seconds.
    pub health_check_timeout: u64,
    /// `[agent] max_download_rate`, e.g. `"2M"`.
    pub max_download_rate: Option<String>,
    /// `[agent] checkpoint_interval`, e.g. `"256k"`.
    pub checkpoint_interval: Option<String>,
    /// Extra `key = value` lines for the `[agent]` table.
    pub agent_extra: String,
    /// Extra TOML appended after all tables (e.g. a `[bundle]` table).
    pub config_extra: String,
}

impl DeviceOptions {
    pub fn new(server_url: &str, controller_id: &str, target_token: &str) -> DeviceOptions {
        DeviceOptions {
            server_url: server_url.to_string(),
            tenant: "DEFAULT".to_string(),
            controller_id: controller_id.to_string(),
            target_token: target_token.to_string(),
            gateway_token: None,
            slot_size: DEFAULT_SLOT_SIZE,
            factory_image: Image::new("factory", "1.0", Health::Good, 512 * 1024).bytes,
            scheme: SchemeKind::Bootcount,
            env_layout: Layout::Redundant,
            attempts: 3,
            initial_env: default_board_env(),
            health_checks: None,
            health_check_timeout: 20,
            max_download_rate: None,
            checkpoint_interval: None,
            agent_extra: String::new(),
            config_extra: String::new(),
        }
    }
}

/// The environment a board ships with: the boot script's slot variable plus variables the agent
/// does not own and must preserve byte for byte.
pub fn default_board_env() -> Vec<(String, String)> {
    [
        ("bootcmd", "run ddi_boot"),
        (
            "ddi_boot",
            "load mmc 0:1 ${scriptaddr} boot.scr; source ${scriptaddr}",
        ),
        ("bootargs", "console=ttyS0,115200 rootwait"),
        ("bootctl_slot", "A"),
        ("board_serial", "DDI-DEMO-0001"),
        ("ethaddr", "02:00:5e:00:53:01"),
    ]
    .iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect()
}

/// A simulated board in a directory. All paths are inside it; nothing needs root.
pub struct FileDevice {
    dir: PathBuf,
    options: DeviceOptions,
    // Keeps a temporary directory alive as long as the device (see `create_temp`).
    temp: Option<tempfile::TempDir>,
}

impl FileDevice {
    /// Build the device in `dir` (created if missing): slot files, environment, cmdline, config.
    pub fn create(dir: &Path, options: DeviceOptions) -> Result<FileDevice> {
        fs::create_dir_all(dir).map_err(io_err("create directory", dir))?;
        let dir = dir
            .canonicalize()
            .map_err(io_err("resolve directory", dir))?;
        let device = FileDevice {
            dir,
            options,
            temp: None,
        };
        device.build()?;
        Ok(device)
    }

    /// Build the device in a fresh temporary directory that is removed when the device is dropped.
    pub fn create_temp(options: DeviceOptions) -> Result<FileDevice> {
        let temp = tempfile::Builder::new()
            .prefix("ddi-device-")
            .tempdir()
            .map_err(io_err("create temporary directory", &std::env::temp_dir()))?;
        let mut device = FileDevice::create(temp.path(), options)?;
        device.temp = Some(temp);
        Ok(device)
    }

    fn build(&self) -> Result<()> {
        let factory = &self.options.factory_image;
        if factory.len() as u64 > self.options.slot_size {
            return Err(DeviceError::TooBig {
                len: factory.len() as u64,
                slot_size: self.options.slot_size,
            });
        }
        for slot in [Slot::A, Slot::B] {
            let path = self.slot_path(slot);
            let file = fs::File::create(&path).map_err(io_err("create slot file", &path))?;
            file.set_len(self.options.slot_size)
                .map_err(io_err("size slot file", &path))?;
        }
        write_at_start(&self.slot_path(Slot::A), factory)?;

        let mut env = Env::new();
        for (name, value) in &self.options.initial_env {
            env.set(name, value).map_err(bootctl::Error::from)?;
        }
        let layout = self.options.env_layout;
        let image =
            bootctl::env::create_image(&env, ENV_SIZE, layout).map_err(bootctl::Error::from)?;
        write_file(&self.env_file_path(), &image)?;
        // Relative device paths are resolved against the config file's folder (contract).
        let mut fw_env = format!(
            "# device-or-file  offset  env-size\n\
             uboot.env        0x0000  {ENV_SIZE:#x}\n"
        );
        if layout == Layout::Redundant {
            fw_env.push_str(&format!("uboot.env        {ENV_SIZE:#x}  {ENV_SIZE:#x}\n"));
        }
        write_file(&self.env_config_path(), fw_env.as_bytes())?;
        write_file(
            &self.cmdline_path(),
            b"console=ttyS0,115200 root=/dev/mmcblk0p2 rootwait bootctl.slot=A\n",
        )?;
        fs::create_dir_all(self.state_dir()).map_err(io_err("create", &self.state_dir()))?;
        self.write_health_check()?;
        self.write_os_release(Slot::A)?;
        self.write_config()?;
        Ok(())
    }

    /// Do not remove the temporary directory when the device is dropped.
    pub fn keep(mut self) -> FileDevice {
        if let Some(temp) = self.temp.take() {
            let _ = temp.keep();
        }
        self
    }

    pub fn options(&self) -> &DeviceOptions {
        &self.options
    }

    /// Change options that only affect the agent's config (health checks, rate, extras) and
    /// rewrite `config.toml`.
    pub fn reconfigure(&mut self, change: impl FnOnce(&mut DeviceOptions)) -> Result<()> {
        change(&mut self.options);
        self.write_config()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.toml")
    }
    pub fn env_config_path(&self) -> PathBuf {
        self.dir.join("fw_env.config")
    }
    pub fn env_file_path(&self) -> PathBuf {
        self.dir.join("uboot.env")
    }
    /// Lock file the environment store takes instead of `/var/lock/fw_printenv.lock`: the
    /// agent (`[boot] env_lock_file`), `ddi-bootctl` (`--lock-file`) and the fixture share it.
    pub fn env_lock_path(&self) -> PathBuf {
        self.dir.join("fw_printenv.lock")
    }
    pub fn cmdline_path(&self) -> PathBuf {
        self.dir.join("cmdline")
    }
    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("state")
    }
    pub fn slot_path(&self, slot: Slot) -> PathBuf {
        self.dir.join(format!("slot-{slot}.img"))
    }
    /// Marker the `reboot_command` appends a line to.
    pub fn reboot_marker_path(&self) -> PathBuf {
        self.dir.join("reboot-requested")
    }
    /// The device's own health check script.
    pub fn health_check_path(&self) -> PathBuf {
        self.dir.join("health-check.sh")
    }
    /// `/etc/os-release` of the running system (rewritten by [`FileDevice::reboot`]).
    pub fn os_release_path(&self) -> PathBuf {
        self.dir.join("os-release")
    }

    /// The agent's `config.toml` for this device.
    pub fn config_text(&self) -> String {
        let o = &self.options;
        let q = |path: PathBuf| toml_string(&path.to_string_lossy());
        let health_checks = o
            .health_checks
            .clone()
            .unwrap_or_else(|| vec![crate::shell_quote(&self.health_check_path())]);
        let health_checks: Vec<String> = health_checks.iter().map(|c| toml_string(c)).collect();
        let reboot = format!(
            "echo reboot >> {}",
            crate::shell_quote(&self.reboot_marker_path())
        );
        let mut text = format!(
            "# ddi-agent configuration of a simulated device (ddi_tests::device)\n\
             [server]\n\
             url = {url}\n\
             tenant = {tenant}\n\
             controller_id = {controller}\n\
             {token}\n\
             \n\
             [device]\n\
             attributes = {{ hw_revision = \"sim-1\" }}\n\
             \n\
             [slots]\n\
             A = {slot_a}\n\
             B = {slot_b}\n\
             \n\
             [boot]\n\
             scheme = {scheme}\n\
             env_config = {env_config}\n\
             cmdline = {cmdline}\n\
             attempts = {attempts}\n\
             env_lock_file = {env_lock}\n\
             reboot_command = [\"sh\", \"-c\", {reboot}]\n\
             \n\
             [agent]\n\
             state_dir = {state_dir}\n\
             health_checks = [{health_checks}]\n\
             health_check_timeout = {timeout}\n\
             version_file = {version_file}\n\
             lock_file = {lock_file}\n",
            url = toml_string(&o.server_url),
            tenant = toml_string(&o.tenant),
            controller = toml_string(&o.controller_id),
            token = match &o.gateway_token {
                Some(key) => format!("gateway_token = {}", toml_string(key)),
                None => format!("target_token = {}", toml_string(&o.target_token)),
            },
            slot_a = q(self.slot_path(Slot::A)),
            slot_b = q(self.slot_path(Slot::B)),
            scheme = toml_string(scheme_name(o.scheme)),
            env_config = q(self.env_config_path()),
            cmdline = q(self.cmdline_path()),
            attempts = o.attempts,
            env_lock = q(self.env_lock_path()),
            reboot = toml_string(&reboot),
            state_dir = q(self.state_dir()),
            health_checks = health_checks.join(", "),
            timeout = o.health_check_timeout,
            version_file = q(self.os_release_path()),
            lock_file = q(self.dir.join("agent.lock")),
        );
        if let Some(rate) = &o.max_download_rate {
            text.push_str(&format!("max_download_rate = {}\n", toml_string(rate)));
        }
        if let Some(interval) = &o.checkpoint_interval {
            text.push_str(&format!(
                "checkpoint_interval = {}\n",
                toml_string(interval)
            ));
        }
        if !o.agent_extra.is_empty() {
            text.push_str(&o.agent_extra);
            if !o.agent_extra.ends_with('\n') {
                text.push('\n');
            }
        }
        if !o.config_extra.is_empty() {
            text.push('\n');
            text.push_str(&o.config_extra);
            if !o.config_extra.ends_with('\n') {
                text.push('\n');
            }
        }
        text
    }

    pub fn write_config(&self) -> Result<()> {
        write_file(&self.config_path(), self.config_text().as_bytes())
    }

    fn write_health_check(&self) -> Result<()> {
        let path = self.health_check_path();
        let script = format!(
            "#!/bin/sh\n\
             # Self-test of the running system on the simulated device: the first line of the\n\
             # booted slot's image says whether this build works.\n\
             dir={dir}\n\
             slot=$(sed -n 's/.*bootctl\\.slot=\\([AB]\\).*/\\1/p' \"$dir/cmdline\")\n\
             [ -n \"$slot\" ] || {{ echo \"self-test: no bootctl.slot= on the kernel command line\"; exit 2; }}\n\
             header=$(head -c 200 \"$dir/slot-$slot.img\" | tr -d '\\000' | head -n 1)\n\
             case \"$header\" in\n\
             *health=broken*) echo \"self-test failed on slot $slot: service ddi-demo-app crashed ($header)\"; exit 1 ;;\n\
             esac\n\
             echo \"self-test passed on slot $slot\"\n",
            dir = crate::shell_quote(&self.dir)
        );
        write_file(&path, script.as_bytes())?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .map_err(io_err("make executable", &path))
    }

    fn write_os_release(&self, booted: Slot) -> Result<()> {
        let header = self.slot_image(booted);
        let (name, version) = match &header {
            Some(h) => (h.name.as_str(), h.version.as_str()),
            None => ("unknown", "0"),
        };
        let text = format!(
            "NAME=\"DDI simulated device\"\nID=ddi-sim\nVERSION_ID={version}\n\
             BUILD_ID={name}\nDDI_SLOT={booted}\n"
        );
        write_file(&self.os_release_path(), text.as_bytes())
    }

    /// Power the device on (or reset it): U-Boot's boot script decides the slot from the
    /// environment, saves what it saves (one write), and starts "Linux" with `bootctl.slot=X` on
    /// the command line. Also refreshes `os-release` from the booted image.
    pub fn reboot(&self) -> Result<Slot> {
        let slot = boot_store(
            &self.env_store()?,
            self.options.scheme,
            &self.cmdline_path(),
        )?;
        self.write_os_release(slot)?;
        Ok(slot)
    }

    /// How many reboots the agent requested since the last call (and forget them).
    pub fn take_reboot_requests(&self) -> Result<usize> {
        let path = self.reboot_marker_path();
        match fs::read_to_string(&path) {
            Ok(text) => {
                fs::remove_file(&path).map_err(io_err("remove", &path))?;
                Ok(text.lines().count())
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(0),
            Err(err) => Err(io_err("read", &path)(err)),
        }
    }

    /// The slot the running system booted from (kernel command line).
    pub fn booted(&self) -> Result<Slot> {
        bootctl::booted::booted_slot(&self.cmdline_path(), None)
            .map_err(|err| DeviceError::Bootctl(err.into()))
    }

    /// Whole content of a slot file (always `slot_size` bytes).
    pub fn slot_bytes(&self, slot: Slot) -> Result<Vec<u8>> {
        let path = self.slot_path(slot);
        fs::read(&path).map_err(io_err("read slot", &path))
    }

    /// Does `slot` start with exactly `image`?
    pub fn slot_holds(&self, slot: Slot, image: &[u8]) -> Result<bool> {
        let bytes = self.slot_bytes(slot)?;
        Ok(bytes.len() >= image.len() && &bytes[..image.len()] == image)
    }

    /// Invert the byte at `offset` of `slot` (written behind the agent's back: bit rot,
    /// another writer).
    pub fn flip_slot_byte(&self, slot: Slot, offset: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let path = self.slot_path(slot);
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err("open slot", &path))?;
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, offset)
            .and_then(|()| file.write_all_at(&[!byte[0]], offset))
            .map_err(io_err("flip a slot byte", &path))
    }

    /// The header of the image in `slot`, if it holds one built by [`Image`].
    pub fn slot_image(&self, slot: Slot) -> Option<ImageHeader> {
        let bytes = self.slot_bytes(slot).ok()?;
        ImageHeader::parse(&bytes)
    }

    /// The device's environment store (locked with [`FileDevice::env_lock_path`]).
    pub fn env_store(&self) -> Result<EnvStore> {
        let config = FwEnvConfig::load(&self.env_config_path()).map_err(bootctl::Error::from)?;
        let store = EnvStore::open(&config).map_err(bootctl::Error::from)?;
        Ok(store.with_lock_path(self.env_lock_path()))
    }

    /// [`bootctl::BootControl`] over this device (scheme, attempts, cmdline and lock path of the
    /// device), e.g. to play the agent's part by hand in tests.
    pub fn boot_control(&self) -> Result<bootctl::BootControl> {
        Ok(bootctl::BootControl::with_store(
            self.env_store()?,
            self.options.scheme,
            self.cmdline_path(),
            self.options.attempts,
        ))
    }

    /// The current U-Boot environment.
    pub fn env(&self) -> Result<Env> {
        Ok(self.env_store()?.read().map_err(bootctl::Error::from)?)
    }

    /// The current U-Boot environment as (name, value) pairs in stored order.
    pub fn env_vars(&self) -> Result<Vec<(String, String)>> {
        Ok(self
            .env()?
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()))
            .collect())
    }

    /// The current U-Boot environment as a map.
    pub fn env_map(&self) -> Result<BTreeMap<String, String>> {
        Ok(self.env_vars()?.into_iter().collect())
    }

    /// `ddi-agent -c CONFIG` for this device (add the subcommand).
    pub fn agent_command(&self) -> Command {
        harness::agent_command(&self.config_path())
    }

    /// Run `ddi-agent once` for this device.
    pub fn agent_once(&self, timeout: Duration) -> io::Result<CommandOutput> {
        harness::agent_once(&self.config_path(), timeout)
    }

    /// Run `ddi-agent once` and kill -9 it after `delay` if it is still running (a power cut
    /// or crash at a random point); returns what it did until then.
    pub fn agent_once_killed_after(&self, delay: Duration) -> io::Result<CommandOutput> {
        let mut cmd = self.agent_command();
        cmd.arg("once");
        let mut agent = harness::Background::spawn(cmd)?;
        let deadline = std::time::Instant::now() + delay;
        while std::time::Instant::now() < deadline {
            if agent.try_exit()?.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        agent.stop()
    }

    /// `ddi-bootctl` with this device's env config, cmdline, scheme and attempts (add the command).
    pub fn bootctl_command(&self) -> Command {
        let mut cmd = harness::bootctl_command(&self.env_config_path(), &self.cmdline_path());
        cmd.arg("--scheme")
            .arg(scheme_name(self.options.scheme))
            .arg("--attempts")
            .arg(self.options.attempts.to_string())
            .arg("--lock-file")
            .arg(self.env_lock_path());
        cmd
    }
}

fn scheme_name(kind: SchemeKind) -> &'static str {
    match kind {
        SchemeKind::Bootcount => "bootcount",
        SchemeKind::Rauc => "rauc",
    }
}

/// A TOML basic string. JSON string escapes are valid TOML escapes.
fn toml_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string always serialises")
}

fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    fs::write(path, bytes).map_err(io_err("write", path))
}

fn write_at_start(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("open", path))?;
    file.write_all(bytes).map_err(io_err("write", path))?;
    file.sync_all().map_err(io_err("sync", path))
}

/// Whether an image's system passes the device's health check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Good,
    /// Boots, but the device's health check fails on it.
    Broken,
    /// Never reaches userspace (the demo resets the board instead of running the agent).
    Hangs,
}

/// A recognisable OS image: one header line `DDI-SIM-IMAGE name=.. version=.. health=..`
/// followed by deterministic pseudo-random filler (different for each name and version).
#[derive(Debug, Clone)]
pub struct Image {
    pub header: ImageHeader,
    pub bytes: Vec<u8>,
}

/// The first line of an [`Image`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageHeader {
    pub name: String,
    pub version: String,
    pub health: Health,
}

const IMAGE_MAGIC: &str = "DDI-SIM-IMAGE";

impl ImageHeader {
    pub fn parse(bytes: &[u8]) -> Option<ImageHeader> {
        let end = bytes.iter().take(256).position(|&b| b == b'\n')?;
        let line = std::str::from_utf8(&bytes[..end]).ok()?;
        let mut words = line.split(' ');
        if words.next()? != IMAGE_MAGIC {
            return None;
        }
        let mut fields: BTreeMap<&str, &str> = BTreeMap::new();
        for word in words {
            let (key, value) = word.split_once('=')?;
            fields.insert(key, value);
        }
        let health = match *fields.get("health")? {
            "ok" => Health::Good,
            "broken" => Health::Broken,
            "hangs" => Health::Hangs,
            _ => return None,
        };
        Some(ImageHeader {
            name: fields.get("name")?.to_string(),
            version: fields.get("version")?.to_string(),
            health,
        })
    }

    fn line(&self) -> String {
        let health = match self.health {
            Health::Good => "ok",
            Health::Broken => "broken",
            Health::Hangs => "hangs",
        };
        format!(
            "{IMAGE_MAGIC} name={} version={} health={health}\n",
            self.name, self.version
        )
    }
}

impl Image {
    /// An image of exactly `size` bytes (at least the header). `name` and `version` must not
    /// contain spaces.
    pub fn new(name: &str, version: &str, health: Health, size: usize) -> Image {
        let header = ImageHeader {
            name: name.to_string(),
            version: version.to_string(),
            health,
        };
        let mut bytes = header.line().into_bytes();
        let mut seed = fnv1a(format!("{name}/{version}").as_bytes()) | 1;
        while bytes.len() < size {
            // xorshift64: cheap, deterministic, incompressible enough to make gzip honest.
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let word = seed.to_le_bytes();
            let take = (size - bytes.len()).min(word.len());
            bytes.extend_from_slice(&word[..take]);
        }
        Image { header, bytes }
    }

    /// A good image (passes the device's health check).
    pub fn good(version: &str, size: usize) -> Image {
        Image::new("demo-os", version, Health::Good, size)
    }

    /// An image whose system fails the device's health check after booting.
    pub fn broken(version: &str, size: usize) -> Image {
        Image::new("demo-os", version, Health::Broken, size)
    }

    pub fn gzip(&self) -> Vec<u8> {
        gzip(&self.bytes)
    }

    /// gzip at level 9, as Yocto compresses images (`gzip -9`, pigz): deflate blocks every
    /// few dozen KiB, so a download can resume at one. ([`Image::gzip`]'s level 1 may write
    /// one block for a whole incompressible image.)
    pub fn gzip_best(&self) -> Vec<u8> {
        gzip_best(&self.bytes)
    }

    /// zstd at level 3 with a content checksum, as the `zstd` tool writes it by default
    /// (`zstd -3`): one frame, blocks of up to 128 KiB output, a window of at most 2 MiB.
    pub fn zstd(&self) -> Vec<u8> {
        let mut encoder = zstd::Encoder::new(Vec::new(), 3).expect("a zstd encoder at level 3");
        encoder
            .include_checksum(true)
            .expect("zstd content checksum");
        encoder
            .write_all(&self.bytes)
            .expect("writing to memory cannot fail");
        encoder.finish().expect("writing to memory cannot fail")
    }

    /// xz as the `xz` tool writes it with threads (Yocto's image conversion runs
    /// `xz --threads=N`): blocks compressed on their own, each header with its sizes, check
    /// CRC64; blocks of `block_size` bytes (`--block-size`; three times the dictionary by
    /// default).
    pub fn xz_threaded(&self, block_size: usize) -> Vec<u8> {
        self.xz_tool(&["-3", "--threads=2", &format!("--block-size={block_size}")])
    }

    /// The image as single-threaded `xz -6` writes it: one block (CRC64, an 8 MiB dictionary).
    pub fn xz_single_block(&self) -> Vec<u8> {
        self.xz_tool(&["-6", "--threads=1"])
    }

    /// The image through the xz tool with `args`.
    fn xz_tool(&self, args: &[&str]) -> Vec<u8> {
        use std::process::Stdio;
        let mut xz = Command::new("xz")
            .args(args)
            .arg("-c")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the xz tool (Debian package xz-utils)");
        let mut stdin = xz.stdin.take().expect("piped");
        let bytes = self.bytes.clone();
        let feeder = std::thread::spawn(move || stdin.write_all(&bytes));
        let out = xz.wait_with_output().expect("xz runs");
        feeder
            .join()
            .expect("no panic")
            .expect("xz reads its input");
        assert!(out.status.success(), "xz failed");
        out.stdout
    }

    /// The image with its filler made about as compressible as a file system image, so that a
    /// compressor writes real compressed blocks (entropy-coded literals, matches near and far,
    /// repeated offsets) instead of storing it: in 4 KiB pieces, one in four stays random,
    /// one is random 3-bit values, one is random letters of 16, and one is a copy of an
    /// earlier piece (up to 1 MiB back) with every 97th byte changed. (`zstd -3` makes about
    /// 60 % of it.)
    pub fn compressible(mut self) -> Image {
        const PIECE: usize = 4096;
        let start = self
            .bytes
            .iter()
            .position(|&b| b == b'\n')
            .map_or(0, |i| i + 1);
        let filler = &mut self.bytes[start..];
        for i in 0..filler.len().div_ceil(PIECE) {
            let at = i * PIECE;
            let end = (at + PIECE).min(filler.len());
            match i % 4 {
                0 => {}
                1 => filler[at..end].iter_mut().for_each(|b| *b &= 0x07),
                2 => filler[at..end]
                    .iter_mut()
                    .for_each(|b| *b = (*b & 0x0f) | 0x60),
                _ => {
                    let back = 1 + usize::from(filler[at]) % i.min(256);
                    let from = at - back * PIECE;
                    filler.copy_within(from..from + (end - at), at);
                    for j in (at..end).step_by(97) {
                        filler[j] ^= 1;
                    }
                }
            }
        }
        self
    }

    /// A tar holding this image as `file_name`.
    pub fn tar(&self, file_name: &str) -> Vec<u8> {
        tar_of(&[(file_name, &self.bytes)])
    }

    pub fn tar_gz(&self, file_name: &str) -> Vec<u8> {
        gzip(&self.tar(file_name))
    }

    /// [`Image::tar`] at gzip level 9 (see [`Image::gzip_best`]).
    pub fn tar_gz_best(&self, file_name: &str) -> Vec<u8> {
        gzip_best(&self.tar(file_name))
    }
}

fn gzip_best(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder
        .write_all(bytes)
        .expect("writing to memory cannot fail");
    encoder.finish().expect("writing to memory cannot fail")
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// gzip-compress `bytes`.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder
        .write_all(bytes)
        .expect("writing to memory cannot fail");
    encoder.finish().expect("writing to memory cannot fail")
}

/// A ustar archive of regular files `(name, content)`.
pub fn tar_of(files: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (name, content) in files {
        let mut header = tar::Header::new_ustar();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(1_700_000_000);
        builder
            .append_data(&mut header, name, *content)
            .expect("writing to memory cannot fail");
    }
    builder.into_inner().expect("writing to memory cannot fail")
}

/// Data ranges of the members of a ustar archive (octal sizes), up to its end marker: e.g.
/// where a bundle's manifest and image are, to tamper with them.
pub fn tar_member_ranges(archive: &[u8]) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let mut at = 0;
    while at + 512 <= archive.len() && archive[at..at + 512].iter().any(|&b| b != 0) {
        let field = String::from_utf8_lossy(&archive[at + 124..at + 136]);
        let size = usize::from_str_radix(field.trim_matches(|c| c == '\0' || c == ' '), 8)
            .expect("an octal member size");
        ranges.push(at + 512..at + 512 + size);
        at += 512 + size.div_ceil(512) * 512;
    }
    ranges
}

/// sha256 of `bytes` as lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// "Power on" a file-backed device: read the environment named by `env_config` (a
/// `fw_env.config`), make the boot script's decision, save what the script saves (one save, none
/// when it saves nothing) and write the kernel command line of the booted slot to
/// `cmdline_path` (atomically: temp file, fsync, rename, fsync of the folder).
///
/// Parameters already in `cmdline_path` are kept; slot tokens are replaced by the ones the
/// boot script puts into `bootargs` ([`bootctl::boot_script::cmdline_for`]). With no valid environment copy the
/// script runs on U-Boot's defaults: slot A boots and nothing is saved.
pub fn boot_file_device(
    env_config: &Path,
    kind: SchemeKind,
    cmdline_path: &Path,
) -> std::result::Result<Slot, bootctl::Error> {
    let store = EnvStore::open_config_file(env_config)?;
    boot_store(&store, kind, cmdline_path)
}

/// [`boot_file_device`] over an open store (e.g. with its own lock path).
pub fn boot_store(
    store: &EnvStore,
    kind: SchemeKind,
    cmdline_path: &Path,
) -> std::result::Result<Slot, bootctl::Error> {
    let slot = match store.read() {
        Ok(env) => {
            let (slot, changes) = bootctl::boot_script::power_on(&env, kind);
            store.apply(&changes)?;
            slot
        }
        Err(bootctl::store::StoreError::NoValidCopy { .. }) => {
            bootctl::boot_script::power_on(&Env::new(), kind).0
        }
        Err(e) => return Err(e.into()),
    };
    let previous = match fs::read_to_string(cmdline_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(bootctl::Error::Booted(bootctl::booted::BootedError::Read {
                path: cmdline_path.to_path_buf(),
                source,
            }))
        }
    };
    let cmdline = bootctl::boot_script::cmdline_for(&previous, kind, slot);
    bootctl::fsutil::write_atomic(cmdline_path, cmdline.as_bytes(), 0o666).map_err(|e| {
        bootctl::Error::Write {
            path: cmdline_path.to_path_buf(),
            source: e.source,
        }
    })?;
    Ok(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_header_round_trips_and_images_differ() {
        let good = Image::good("2.0", 4096);
        let broken = Image::broken("2.0", 4096);
        assert_eq!(good.bytes.len(), 4096);
        assert_eq!(ImageHeader::parse(&good.bytes), Some(good.header.clone()));
        assert_eq!(
            ImageHeader::parse(&broken.bytes).unwrap().health,
            Health::Broken
        );
        assert_ne!(good.bytes[100..], Image::good("2.1", 4096).bytes[100..]);
        assert_eq!(good.bytes, Image::good("2.0", 4096).bytes, "deterministic");
        assert_eq!(ImageHeader::parse(&[0u8; 300]), None);
    }

    #[test]
    fn gzip_and_tar_hold_the_image() {
        use std::io::Read;
        let image = Image::good("3.0", 10_000);
        let mut unzipped = Vec::new();
        flate2::read::GzDecoder::new(&image.gzip()[..])
            .read_to_end(&mut unzipped)
            .unwrap();
        assert_eq!(unzipped, image.bytes);

        let tar_gz = image.tar_gz("rootfs.img");
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(&tar_gz[..]));
        let mut entries = archive.entries().unwrap();
        let mut entry = entries.next().unwrap().unwrap();
        assert_eq!(entry.path().unwrap().to_str(), Some("rootfs.img"));
        let mut content = Vec::new();
        entry.read_to_end(&mut content).unwrap();
        assert_eq!(content, image.bytes);
        assert!(entries.next().is_none());

        let two = tar_of(&[("a", &[1u8; 700]), ("b", &[2u8; 3])]);
        assert_eq!(tar_member_ranges(&two), vec![512..1212, 2048..2051]);
        assert_eq!(two[2048..2051], [2u8; 3]);
    }

    fn device() -> FileDevice {
        let mut options = DeviceOptions::new("http://127.0.0.1:9", "dev-1", "token-1");
        options.slot_size = 256 * 1024;
        options.factory_image = Image::good("1.0", 100_000).bytes;
        FileDevice::create_temp(options).unwrap()
    }

    fn run_health_check(device: &FileDevice) -> std::process::Output {
        Command::new(device.health_check_path()).output().unwrap()
    }

    #[test]
    fn new_device_has_fixed_size_slots_factory_image_and_board_env() {
        let device = device();
        let a = device.slot_bytes(Slot::A).unwrap();
        let b = device.slot_bytes(Slot::B).unwrap();
        assert_eq!(a.len(), 256 * 1024);
        assert_eq!(b.len(), 256 * 1024);
        assert!(device
            .slot_holds(Slot::A, &Image::good("1.0", 100_000).bytes)
            .unwrap());
        assert!(b.iter().all(|&byte| byte == 0));
        assert_eq!(device.slot_image(Slot::A).unwrap().version, "1.0");
        assert_eq!(device.slot_image(Slot::B), None);

        assert_eq!(device.env_vars().unwrap(), default_board_env());
        assert!(device.env_store().unwrap().is_redundant());
        assert_eq!(
            fs::metadata(device.env_file_path()).unwrap().len(),
            2 * ENV_SIZE as u64
        );
        assert_eq!(device.booted().unwrap(), Slot::A);
        assert!(fs::read_to_string(device.os_release_path())
            .unwrap()
            .contains("VERSION_ID=1.0"));
    }

    #[test]
    fn config_is_accepted_by_the_agent() {
        let device = device();
        let config = ddi_agent::config::Config::load(&device.config_path())
            .unwrap_or_else(|err| panic!("{err}\n{}", device.config_text()));
        assert_eq!(config.slot_a, device.slot_path(Slot::A));
        assert_eq!(config.slot_b, device.slot_path(Slot::B));
        assert_eq!(config.boot.env_config, device.env_config_path());
        assert_eq!(config.boot.cmdline, device.cmdline_path());
        assert_eq!(config.boot.env_lock_file, device.env_lock_path());
        assert_eq!(config.agent.state_dir, device.state_dir());
        assert_eq!(config.server.controller_id, "dev-1");
        assert_eq!(config.agent.health_checks.len(), 1);
    }

    #[test]
    fn reboot_command_leaves_a_marker_that_is_taken_once() {
        let device = device();
        assert_eq!(device.take_reboot_requests().unwrap(), 0);
        let config = ddi_agent::config::Config::load(&device.config_path()).unwrap();
        let (program, args) = config.boot.reboot_command.split_first().unwrap();
        for _ in 0..2 {
            assert!(Command::new(program).args(args).status().unwrap().success());
        }
        assert_eq!(device.take_reboot_requests().unwrap(), 2);
        assert_eq!(device.take_reboot_requests().unwrap(), 0);
    }

    #[test]
    fn reboot_follows_u_boot_trial_and_fallback() {
        let device = device();
        assert_eq!(device.reboot().unwrap(), Slot::A);
        let control = device.boot_control().unwrap();
        control.activate(Slot::B).unwrap();
        for count in 1..=3 {
            assert_eq!(device.reboot().unwrap(), Slot::B, "trial boot {count}");
            assert_eq!(device.booted().unwrap(), Slot::B);
            assert_eq!(device.env_map().unwrap()["bootcount"], count.to_string());
        }
        // Never confirmed: the fourth boot exceeds bootlimit=3 and falls back.
        assert_eq!(device.reboot().unwrap(), Slot::A);
        assert_eq!(device.booted().unwrap(), Slot::A);
        let env = device.env_map().unwrap();
        assert_eq!(env["bootctl_slot"], "A");
        assert_eq!(env["upgrade_available"], "0");
        for (name, value) in default_board_env() {
            if name != "bootctl_slot" {
                assert_eq!(env[&name], value, "{name} preserved");
            }
        }
    }

    #[test]
    fn health_check_fails_only_on_a_broken_image() {
        let device = device();
        let output = run_health_check(&device);
        assert!(output.status.success(), "{output:?}");
        assert!(String::from_utf8_lossy(&output.stdout).contains("passed on slot A"));

        write_at_start(
            &device.slot_path(Slot::B),
            &Image::broken("2.1", 50_000).bytes,
        )
        .unwrap();
        device.boot_control().unwrap().activate(Slot::B).unwrap();
        assert_eq!(device.reboot().unwrap(), Slot::B);
        assert!(fs::read_to_string(device.os_release_path())
            .unwrap()
            .contains("VERSION_ID=2.1"));
        let output = run_health_check(&device);
        assert_eq!(output.status.code(), Some(1), "{output:?}");
        assert!(String::from_utf8_lossy(&output.stdout).contains("self-test failed on slot B"));
    }

    #[test]
    fn single_copy_env_and_gateway_token_are_options() {
        let mut options = DeviceOptions::new("http://127.0.0.1:9", "dev-1", "unused");
        options.env_layout = Layout::Single;
        options.gateway_token = Some("gw-key".to_string());
        let device = FileDevice::create_temp(options).unwrap();
        assert!(!device.env_store().unwrap().is_redundant());
        assert_eq!(
            fs::metadata(device.env_file_path()).unwrap().len(),
            ENV_SIZE as u64
        );
        assert_eq!(device.env_vars().unwrap(), default_board_env());
        assert_eq!(device.reboot().unwrap(), Slot::A);
        let text = device.config_text();
        assert!(text.contains("gateway_token = \"gw-key\""), "{text}");
        assert!(!text.contains("target_token"), "{text}");
        ddi_agent::config::Config::load(&device.config_path()).unwrap();
    }

    #[test]
    fn image_larger_than_the_slot_is_refused() {
        let mut options = DeviceOptions::new("http://127.0.0.1:9", "dev-1", "token-1");
        options.slot_size = 1000;
        options.factory_image = Image::good("1.0", 1001).bytes;
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            FileDevice::create(dir.path(), options),
            Err(DeviceError::TooBig {
                len: 1001,
                slot_size: 1000
            })
        ));
    }

    #[test]
    fn toml_strings_are_escaped() {
        assert_eq!(toml_string(r#"a "b" \c"#), r#""a \"b\" \\c""#);
    }
}
