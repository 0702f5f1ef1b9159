//! The boot script's decision at power-on, as a pure function over the environment.
//!
//! This is the same decision the real boot script makes (the project's `boot.cmd`, one source
//! for QEMU and the Yocto layer): which slot boots, and what the script saves before booting it.
//! Tests and the demo use it to "reboot" a file-backed device; [`crate::scheme::Scheme::next`]
//! uses it to say which slot boots next.
//!
//! `bootcount` (U-Boot's `CONFIG_BOOTCOUNT_ENV` semantics):
//! - `upgrade_available` is not `1`: boot `bootctl_slot`, save nothing.
//! - `upgrade_available=1`: `bootcount` + 1; while it is `<= bootlimit` (default 3), save it
//!   and boot `bootctl_slot`; once it is `> bootlimit`, fall back (`altbootcmd`):
//!   `bootctl_slot` = the other slot, `upgrade_available=0`, `bootcount=0`, and boot that.
//!   `bootlimit=0` disables the fallback (as in U-Boot). The script counts without `setexpr`,
//!   so a `bootcount` outside 0..98 becomes 100 ([`script_increment`]).
//!
//! `rauc` (RAUC's `contrib/uboot.sh` semantics, with counters compared as hex):
//! - Missing `BOOT_ORDER` reads as `A B`, a missing `BOOT_x_LEFT` as the default attempts; the
//!   script sets these defaults and they are saved with the rest.
//! - The first slot in `BOOT_ORDER` with `0x${BOOT_x_LEFT} > 0` boots, its counter decremented
//!   (written as hex, as `setexpr` does), saved before booting.
//! - No slot has attempts left: like RAUC's example script, reset every counter to the default
//!   attempts, save and `reset`. The board then powers on again and picks the first slot in
//!   `BOOT_ORDER`. The simulator folds the reset and that second boot into one decision.
//!
//! Lenient reads mirror U-Boot: numbers are read as far as they are digits (`3x` is 3, `zz` is
//! 0), a `bootctl_slot` other than `B` boots A, names other than A and B in `BOOT_ORDER` are
//! skipped.

use std::fs;
use std::io::{self, Write};
use std::path::Path;

use crate::env::{ChangeSet, Env};
use crate::error::Error;
use crate::scheme::{
    bootcount_vars, non_empty, rauc_vars, uboot_decimal, uboot_hex, SchemeKind, Slot,
};
use crate::store::EnvStore;

/// The attempts the boot script assumes when a variable is missing (its built-in default).
pub const SCRIPT_DEFAULT_ATTEMPTS: u32 = 3;

/// What happened at one power-on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootEvent {
    /// `bootcount`: no trial; the configured slot boots and nothing is saved.
    Normal,
    /// `bootcount`: a trial boot; `bootcount` is now `count`, still within `limit`.
    Trial { count: u64, limit: u64 },
    /// `bootcount`: `count > limit`: fell back from `from` to the other slot.
    Fallback { from: Slot, count: u64, limit: u64 },
    /// `rauc`: the first slot with attempts left boots; `left` is what remains after this boot.
    Attempt { left: u64 },
    /// `rauc`: no slot had attempts left; all counters were reset, then the first slot booted.
    CountersReset { left: u64 },
}

/// The decision of one power-on: the booted slot and what the boot script saves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootDecision {
    /// The slot whose kernel starts.
    pub slot: Slot,
    /// What the script saves before booting (empty: no save).
    pub changes: ChangeSet,
    /// Why.
    pub event: BootEvent,
}

/// What the boot script does at power-on with its built-in defaults
/// ([`SCRIPT_DEFAULT_ATTEMPTS`]): the slot it boots and what it saves.
pub fn power_on(env: &Env, kind: SchemeKind) -> (Slot, ChangeSet) {
    let decision = decide(env, kind, SCRIPT_DEFAULT_ATTEMPTS);
    (decision.slot, decision.changes)
}

/// The decision at power-on when missing variables default to `default_attempts`.
pub fn decide(env: &Env, kind: SchemeKind, default_attempts: u32) -> BootDecision {
    match kind {
        SchemeKind::Bootcount => decide_bootcount(env, default_attempts),
        SchemeKind::Rauc => decide_rauc(env, default_attempts),
    }
}

fn decide_bootcount(env: &Env, default_attempts: u32) -> BootDecision {
    let slot = match env.get(bootcount_vars::SLOT) {
        Some("B") => Slot::B,
        _ => Slot::A,
    };
    if env.get(bootcount_vars::UPGRADE_AVAILABLE) != Some("1") {
        return BootDecision {
            slot,
            changes: ChangeSet::new(),
            event: BootEvent::Normal,
        };
    }
    let count = script_increment(non_empty(env.get(bootcount_vars::BOOTCOUNT)));
    let default_limit = default_attempts.to_string();
    let limit = non_empty(env.get(bootcount_vars::BOOTLIMIT)).unwrap_or(&default_limit);
    // The script compares with `itest`, which reads both sides as hex; decimal strings keep
    // their order that way. `bootlimit=0` disables the fallback, as in U-Boot.
    if limit != "0" && uboot_hex(&count.to_string()) > uboot_hex(limit) {
        let to = slot.other();
        let changes = ChangeSet::new()
            .with(bootcount_vars::SLOT, to.as_str())
            .with(bootcount_vars::UPGRADE_AVAILABLE, "0")
            .with(bootcount_vars::BOOTCOUNT, "0");
        BootDecision {
            slot: to,
            changes: only_changed(env, changes),
            event: BootEvent::Fallback {
                from: slot,
                count,
                limit: uboot_decimal(limit),
            },
        }
    } else {
        BootDecision {
            slot,
            changes: only_changed(
                env,
                ChangeSet::new().with(bootcount_vars::BOOTCOUNT, count.to_string()),
            ),
            event: BootEvent::Trial {
                count,
                limit: uboot_decimal(limit),
            },
        }
    }
}

/// `bootcount + 1` as the script computes it without `setexpr`: a lookup over "0".."98";
/// anything else (99, 100+, leading zeros, garbage) becomes 100, above every usable
/// `bootlimit`.
pub fn script_increment(bootcount: Option<&str>) -> u64 {
    let Some(text) = bootcount else {
        return 1;
    };
    match text.parse::<u64>() {
        Ok(n) if n <= 98 && n.to_string() == text => n + 1,
        _ => MAX_SCRIPT_BOOTCOUNT,
    }
}

/// The highest `bootcount` the boot script writes; a `bootlimit` of this or more never falls
/// back, so [`MAX_BOOTLIMIT`] is the largest usable limit.
pub const MAX_SCRIPT_BOOTCOUNT: u64 = 100;

/// The largest `bootlimit` (and `bootcount` attempts) the boot script can enforce.
pub const MAX_BOOTLIMIT: u32 = 99;

fn decide_rauc(env: &Env, default_attempts: u32) -> BootDecision {
    let default_left = format!("{default_attempts:x}");
    // The script's defaults, saved together with the decrement.
    let mut saved: Vec<(String, String)> = Vec::new();
    let order_value = match non_empty(env.get(rauc_vars::BOOT_ORDER)) {
        None => {
            saved.push((rauc_vars::BOOT_ORDER.to_string(), "A B".to_string()));
            "A B".to_string()
        }
        Some(value) => value.to_string(),
    };
    let left = |slot: Slot, saved: &mut Vec<(String, String)>| -> u64 {
        match non_empty(env.get(rauc_vars::left(slot))) {
            None => {
                saved.push((rauc_vars::left(slot).to_string(), default_left.clone()));
                u64::from(default_attempts)
            }
            Some(value) => uboot_hex(value),
        }
    };
    let counters = [left(Slot::A, &mut saved), left(Slot::B, &mut saved)];
    let order: Vec<Slot> = order_value
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();

    let first_with_attempts = order.iter().copied().find(|s| counters[*s as usize] > 0);
    let (slot, before, event_reset) = match first_with_attempts {
        Some(slot) => (slot, counters[slot as usize], false),
        None => {
            // Nothing bootable: every counter back to the default, then the first slot in
            // BOOT_ORDER (A if it names none) on the next power-on.
            saved.retain(|(name, _)| name == rauc_vars::BOOT_ORDER);
            for s in Slot::ALL {
                saved.push((rauc_vars::left(s).to_string(), default_left.clone()));
            }
            let slot = order.first().copied().unwrap_or(Slot::A);
            (slot, u64::from(default_attempts), true)
        }
    };
    let after = before.saturating_sub(1);
    saved.retain(|(name, _)| name != rauc_vars::left(slot));
    saved.push((rauc_vars::left(slot).to_string(), format!("{after:x}")));

    let changes: ChangeSet = saved
        .into_iter()
        .map(|(name, value)| (name, Some(value)))
        .collect();
    BootDecision {
        slot,
        changes: only_changed(env, changes),
        event: if event_reset {
            BootEvent::CountersReset { left: after }
        } else {
            BootEvent::Attempt { left: after }
        },
    }
}

/// Drops the entries that would not change `env`.
fn only_changed(env: &Env, changes: ChangeSet) -> ChangeSet {
    changes
        .iter()
        .filter(|(name, value)| env.get(name) != *value)
        .map(|(name, value)| (name.to_string(), value.map(str::to_string)))
        .collect()
}

/// "Power on" a file-backed device: read the environment named by `env_config` (a
/// `fw_env.config`), make the boot script's decision, save what the script saves (one save, none
/// when it saves nothing) and write the kernel command line of the booted slot to
/// `cmdline_path` (atomically: temp file, fsync, rename, fsync of the folder).
///
/// Parameters already in `cmdline_path` are kept; slot tokens are replaced by
/// `bootctl.slot=X`, as the boot script builds `bootargs`.
pub fn boot_file_device(
    env_config: &Path,
    kind: SchemeKind,
    cmdline_path: &Path,
) -> Result<Slot, Error> {
    let store = EnvStore::open_config_file(env_config)?;
    boot_store(&store, kind, cmdline_path)
}

/// [`boot_file_device`] over an open store (e.g. with its own lock path).
pub fn boot_store(store: &EnvStore, kind: SchemeKind, cmdline_path: &Path) -> Result<Slot, Error> {
    let env = store.read()?;
    let (slot, changes) = power_on(&env, kind);
    store.apply(&changes)?;
    let previous = match fs::read_to_string(cmdline_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(Error::Booted(crate::booted::BootedError::Read {
                path: cmdline_path.to_path_buf(),
                source,
            }))
        }
    };
    let cmdline = cmdline_for(&previous, slot);
    write_atomically(cmdline_path, cmdline.as_bytes()).map_err(|source| Error::Write {
        path: cmdline_path.to_path_buf(),
        source,
    })?;
    Ok(slot)
}

/// `previous` with every slot token replaced by `bootctl.slot=<slot>` (appended), one line.
pub fn cmdline_for(previous: &str, slot: Slot) -> String {
    let mut params: Vec<String> = crate::booted::parameters(previous)
        .into_iter()
        .filter(|p| {
            let name = p.split_once('=').map_or(p.as_str(), |(n, _)| n);
            !crate::booted::SLOT_PARAMETERS.contains(&name)
        })
        .map(|p| {
            if p.contains(char::is_whitespace) {
                match p.split_once('=') {
                    Some((name, value)) => format!("{name}=\"{value}\""),
                    None => format!("\"{p}\""),
                }
            } else {
                p
            }
        })
        .collect();
    params.push(format!("bootctl.slot={slot}"));
    let mut line = params.join(" ");
    line.push('\n');
    line
}

/// Temp file next to `path`, fsync, rename over `path`, fsync the folder.
fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp{}", std::process::id()));
    let tmp = dir.join(tmp_name);
    let result = (|| {
        let mut file = fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
