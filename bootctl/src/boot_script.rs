//! The boot script's decision at power-on, as a pure function over the environment.
//!
//! This is the same decision the real boot script makes (the project's `boot.cmd`, one source
//! for QEMU and the Yocto layer): which slot boots, and what the script saves before booting it.
//! [`crate::scheme::Scheme::next`] uses it to say which slot boots next; the test crate's
//! file-backed device and the demo use it to "reboot".
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
//! - A missing `BOOT_x_LEFT` reads as the default attempts; a `BOOT_ORDER` that names neither
//!   A nor B (or is missing) reads as `A B`; other words in it are skipped. Defaults are not
//!   saved.
//! - The first slot in that order with `0x${BOOT_x_LEFT} > 0` boots, its counter decremented
//!   (written as hex, as `setexpr` would), saved before booting.
//! - No slot has attempts left: like RAUC's example script, reset both counters to the default
//!   attempts, save and `reset`. The board then powers on again and picks the first slot in
//!   the order. The simulator folds the reset and that second boot into one decision.
//!
//! Every save is the script's `env export` of the environment U-Boot imported, so variables
//! with an empty value (which U-Boot drops on import, while libubootenv keeps them, e.g. RAUC's
//! `BOOT_ORDER=` after marking both slots bad) disappear with the first save.
//!
//! Lenient reads mirror U-Boot: hex counters are read as far as they are hex digits (`zz` is
//! 0), a `bootctl_slot` other than `B` boots A, and only `upgrade_available=1` is a trial.
//!
//! When no environment copy is valid, U-Boot runs on its built-in defaults: the script boots
//! slot A and saves nothing (the test crate's file-backed device does the same).

use crate::env::{ChangeSet, Env};
use crate::slot::{bootcount_vars, rauc_vars, SchemeKind, Slot};

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
        let sets = vec![
            (bootcount_vars::SLOT, to.as_str().to_string()),
            (bootcount_vars::UPGRADE_AVAILABLE, "0".to_string()),
            (bootcount_vars::BOOTCOUNT, "0".to_string()),
        ];
        BootDecision {
            slot: to,
            changes: script_save(env, sets),
            event: BootEvent::Fallback {
                from: slot,
                count,
                limit: uboot_decimal(limit),
            },
        }
    } else {
        BootDecision {
            slot,
            changes: script_save(env, vec![(bootcount_vars::BOOTCOUNT, count.to_string())]),
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
    let left = |slot: Slot| -> u64 {
        non_empty(env.get(rauc_vars::left(slot))).map_or(u64::from(default_attempts), uboot_hex)
    };
    let counters = [left(Slot::A), left(Slot::B)];
    let order = script_boot_order(env.get(rauc_vars::BOOT_ORDER));

    let mut sets: Vec<(&str, String)> = Vec::new();
    let (slot, before, reset) = match order.iter().copied().find(|s| counters[s.index()] > 0) {
        Some(slot) => (slot, counters[slot.index()], false),
        None => {
            // Nothing bootable: both counters back to the default, save, reset; the next
            // power-on takes the first slot of the same order.
            for s in Slot::ALL {
                sets.push((rauc_vars::left(s), default_left.clone()));
            }
            (order[0], u64::from(default_attempts), true)
        }
    };
    // The script's hex lookup counts 1..=ff down; anything above ff becomes fe... from ff.
    let after = before.min(0x100) - 1;
    sets.retain(|(name, _)| *name != rauc_vars::left(slot));
    sets.push((rauc_vars::left(slot), format!("{after:x}")));
    BootDecision {
        slot,
        changes: script_save(env, sets),
        event: if reset {
            BootEvent::CountersReset { left: after }
        } else {
            BootEvent::Attempt { left: after }
        },
    }
}

/// The order the script walks: `BOOT_ORDER` when it names A or B at all (other words are
/// skipped), else `A B`. Never empty.
pub fn script_boot_order(boot_order: Option<&str>) -> Vec<Slot> {
    let mut order: Vec<Slot> = boot_order
        .unwrap_or("")
        .split_whitespace()
        .filter_map(|word| word.parse().ok())
        .collect();
    if order.is_empty() {
        order = vec![Slot::A, Slot::B];
    }
    order
}

/// What one `saveenv` of the script changes: the variables it set, and the removal of every
/// variable with an empty value (U-Boot drops `name=` on import, so its export lacks them).
fn script_save(env: &Env, sets: Vec<(&str, String)>) -> ChangeSet {
    let mut changes = ChangeSet::new();
    for (name, value) in env.iter() {
        if value.is_empty() && !sets.iter().any(|(set, _)| *set == name) {
            changes.unset(name);
        }
    }
    for (name, value) in sets {
        if env.get(name) != Some(value.as_str()) {
            changes.set(name, value);
        }
    }
    changes
}

/// `previous` with its slot tokens replaced by the boot script's: `bootctl.slot=X`, plus
/// `rauc.slot=X` for the `rauc` scheme (appended), as one line.
pub fn cmdline_for(previous: &str, kind: SchemeKind, slot: Slot) -> String {
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
    if kind == SchemeKind::Rauc {
        params.push(format!("rauc.slot={slot}"));
    }
    let mut line = params.join(" ");
    line.push('\n');
    line
}

/// U-Boot drops variables with an empty value on import, so `name=` reads as missing.
pub(crate) fn non_empty(value: Option<&str>) -> Option<&str> {
    value.filter(|v| !v.is_empty())
}

/// Leading decimal digits as U-Boot's `simple_strtoul(s, NULL, 10)` reads them ("3x" is 3,
/// "x" is 0), saturating instead of wrapping.
fn uboot_decimal(value: &str) -> u64 {
    value
        .trim_start()
        .chars()
        .map_while(|c| c.to_digit(10))
        .fold(0u64, |acc, d| {
            acc.saturating_mul(10).saturating_add(u64::from(d))
        })
}

/// Leading hex digits as U-Boot reads `0x${VALUE}` ("a" is 10, "zz" is 0), saturating.
fn uboot_hex(value: &str) -> u64 {
    value
        .trim_start()
        .chars()
        .map_while(|c| c.to_digit(16))
        .fold(0u64, |acc, d| {
            acc.saturating_mul(16).saturating_add(u64::from(d))
        })
}
