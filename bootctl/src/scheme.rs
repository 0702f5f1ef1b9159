//! The A/B slot schemes of the contract as pure transitions over environment variables.
//!
//! A [`Scheme`] reads an [`Env`] and answers "which slot boots next" and "is a slot on trial", and
//! turns the three state changes (activate, mark good, mark bad) into one [`ChangeSet`] each, which
//! the caller writes in ONE environment save. Nothing here does I/O.
//!
//! Two schemes exist:
//! - [`Bootcount`]: U-Boot's native counter (`bootctl_slot`, `upgrade_available`, `bootcount`,
//!   `bootlimit`).
//! - [`Rauc`]: RAUC's variables (`BOOT_ORDER`, `BOOT_A_LEFT`, `BOOT_B_LEFT`, counters in hex), so
//!   RAUC and `ddi-bootctl` can share one environment.
//!
//! Every transition returns only the variables whose value actually changes, so "nothing to do"
//! is an empty change set and costs no save.

use std::collections::BTreeMap;
use std::fmt;

use crate::boot_script::non_empty;
use crate::env::{ChangeSet, Env};

pub use crate::slot::{
    bootcount_vars, rauc_vars, ParseSchemeError, ParseSlotError, SchemeKind, Slot,
};

/// Why a transition was refused. Nothing must be written when one of these is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SchemeError {
    /// A variable the scheme needs holds something it cannot interpret.
    #[error("environment variable {name}={value:?} is invalid: expected {expected}")]
    InvalidVariable {
        name: &'static str,
        value: String,
        expected: &'static str,
    },
    /// Confirming a slot that U-Boot is not set to boot.
    #[error("cannot mark slot {booted} good: {variable}={configured}, U-Boot is set to boot slot {configured}")]
    NotTheBootSlot {
        booted: Slot,
        variable: &'static str,
        configured: Slot,
    },
    /// The configured number of attempts cannot work.
    #[error("invalid number of boot attempts {attempts}: {reason}")]
    InvalidAttempts { attempts: u32, reason: &'static str },
    /// The integrator's `bootlimit` would leave the trial without a fallback.
    #[error("bootlimit={value} is above {max}, the largest limit the boot script enforces")]
    BootlimitTooHigh { value: String, max: u32 },
    /// `bootlimit=0` turns the fallback off: a trial under it would have none.
    #[error("bootlimit=0 turns the boot script's fallback off; a trial boot needs one")]
    FallbackDisabled,
}

/// One A/B scheme: pure reads and transitions over the environment.
pub trait Scheme: fmt::Debug + Send + Sync {
    /// Which scheme this is.
    fn kind(&self) -> SchemeKind;
    /// The configured number of trial boots.
    fn attempts(&self) -> u32;
    /// Activate `slot` for a trial boot.
    fn activate(&self, env: &Env, slot: Slot) -> Result<ChangeSet, SchemeError>;
    /// Confirm the slot that is running (`booted`).
    fn mark_good(&self, env: &Env, booted: Slot) -> Result<ChangeSet, SchemeError>;
    /// Mark `slot` as not bootable.
    fn mark_bad(&self, env: &Env, slot: Slot) -> Result<ChangeSet, SchemeError>;
    /// The slot the boot script boots at the next power-on (the same decision as [`crate::boot_script`]).
    fn next(&self, env: &Env) -> Slot;
    /// `Some(true)` while a slot is on trial; `None` when the environment cannot tell.
    fn trial(&self, env: &Env) -> Option<bool>;
    /// The scheme's variables exactly as stored (missing ones are absent).
    fn variables(&self, env: &Env) -> BTreeMap<String, String>;
}

/// The scheme of `kind` with `attempts` trial boots.
pub fn for_kind(kind: SchemeKind, attempts: u32) -> Box<dyn Scheme> {
    match kind {
        SchemeKind::Bootcount => Box::new(Bootcount::new(attempts)),
        SchemeKind::Rauc => Box::new(Rauc::new(attempts)),
    }
}

/// Checks a configured attempt count for `kind`: at least 1 (0 would never boot the new slot),
/// and for `bootcount` at most [`crate::boot_script::MAX_BOOTLIMIT`] (the boot script counts to 100).
pub fn validate_attempts(kind: SchemeKind, attempts: u32) -> Result<u32, SchemeError> {
    if attempts == 0 {
        return Err(SchemeError::InvalidAttempts {
            attempts,
            reason: "must be at least 1",
        });
    }
    if kind == SchemeKind::Bootcount && attempts > crate::boot_script::MAX_BOOTLIMIT {
        return Err(SchemeError::InvalidAttempts {
            attempts,
            reason: "the bootcount boot script enforces at most 99",
        });
    }
    Ok(attempts)
}

/// Collects the desired values of a transition and keeps only the ones that change `env`.
struct Changes<'e> {
    env: &'e Env,
    entries: Vec<(String, Option<String>)>,
}

impl<'e> Changes<'e> {
    fn new(env: &'e Env) -> Self {
        Changes {
            env,
            entries: Vec::new(),
        }
    }

    fn set(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        if self.env.get(name) != Some(value.as_str()) {
            self.entries.push((name.to_string(), Some(value)));
        }
    }

    fn unset(&mut self, name: &str) {
        if self.env.get(name).is_some() {
            self.entries.push((name.to_string(), None));
        }
    }

    fn finish(self) -> ChangeSet {
        self.entries.into_iter().collect()
    }
}

/// A canonical decimal variable value (no sign, no leading zeros: the boot script compares
/// `bootlimit` as a string against "0"), or the error that names it.
fn strict_decimal(name: &'static str, value: &str) -> Result<u64, SchemeError> {
    match value.parse::<u64>() {
        Ok(number) if number.to_string() == value => Ok(number),
        _ => Err(SchemeError::InvalidVariable {
            name,
            value: value.to_string(),
            expected: "a decimal number without leading zeros",
        }),
    }
}

fn scheme_variables(env: &Env, names: &[&str]) -> BTreeMap<String, String> {
    names
        .iter()
        .filter_map(|name| env.get(name).map(|v| (name.to_string(), v.to_string())))
        .collect()
}

/// U-Boot's native boot counter (`CONFIG_BOOTCOUNT_LIMIT` + `CONFIG_BOOTCOUNT_ENV`, or a boot
/// script doing the same).
#[derive(Debug, Clone)]
pub struct Bootcount {
    attempts: u32,
}

impl Bootcount {
    /// The scheme with `attempts` trial boots (the `bootlimit` written when none is set).
    pub fn new(attempts: u32) -> Self {
        Bootcount { attempts }
    }

    /// The slot in `bootctl_slot` (default A), or an error for any other value.
    pub fn configured_slot(env: &Env) -> Result<Slot, SchemeError> {
        match non_empty(env.get(bootcount_vars::SLOT)) {
            None => Ok(Slot::A),
            Some(value) => value.parse().map_err(|_| SchemeError::InvalidVariable {
                name: bootcount_vars::SLOT,
                value: value.to_string(),
                expected: "A or B",
            }),
        }
    }

    /// `true` when `upgrade_available` is `1`.
    pub fn is_trial(env: &Env) -> bool {
        env.get(bootcount_vars::UPGRADE_AVAILABLE) == Some("1")
    }
}

impl Scheme for Bootcount {
    fn kind(&self) -> SchemeKind {
        SchemeKind::Bootcount
    }

    fn attempts(&self) -> u32 {
        self.attempts
    }

    fn activate(&self, env: &Env, slot: Slot) -> Result<ChangeSet, SchemeError> {
        validate_attempts(SchemeKind::Bootcount, self.attempts)?;
        let existing_limit = non_empty(env.get(bootcount_vars::BOOTLIMIT));
        if let Some(limit) = existing_limit {
            // The integrator's limit is kept, but one the boot script cannot enforce would
            // leave the trial without a fallback.
            let value = strict_decimal(bootcount_vars::BOOTLIMIT, limit)?;
            if value == 0 {
                return Err(SchemeError::FallbackDisabled);
            }
            if value > u64::from(crate::boot_script::MAX_BOOTLIMIT) {
                return Err(SchemeError::BootlimitTooHigh {
                    value: limit.to_string(),
                    max: crate::boot_script::MAX_BOOTLIMIT,
                });
            }
        }
        let mut changes = Changes::new(env);
        changes.set(bootcount_vars::SLOT, slot.as_str());
        changes.set(bootcount_vars::UPGRADE_AVAILABLE, "1");
        changes.set(bootcount_vars::BOOTCOUNT, "0");
        if existing_limit.is_none() {
            changes.set(bootcount_vars::BOOTLIMIT, self.attempts.to_string());
        }
        Ok(changes.finish())
    }

    fn mark_good(&self, env: &Env, booted: Slot) -> Result<ChangeSet, SchemeError> {
        let configured = Self::configured_slot(env)?;
        if configured != booted {
            return Err(SchemeError::NotTheBootSlot {
                booted,
                variable: bootcount_vars::SLOT,
                configured,
            });
        }
        let mut changes = Changes::new(env);
        if Self::is_trial(env) {
            changes.set(bootcount_vars::UPGRADE_AVAILABLE, "0");
            changes.set(bootcount_vars::BOOTCOUNT, "0");
        }
        Ok(changes.finish())
    }

    fn mark_bad(&self, env: &Env, slot: Slot) -> Result<ChangeSet, SchemeError> {
        let configured = Self::configured_slot(env)?;
        let mut changes = Changes::new(env);
        if configured == slot {
            changes.set(bootcount_vars::SLOT, slot.other().as_str());
            changes.set(bootcount_vars::UPGRADE_AVAILABLE, "0");
            changes.set(bootcount_vars::BOOTCOUNT, "0");
        }
        Ok(changes.finish())
    }

    fn next(&self, env: &Env) -> Slot {
        crate::boot_script::decide(env, SchemeKind::Bootcount, self.attempts).slot
    }

    fn trial(&self, env: &Env) -> Option<bool> {
        Some(Self::is_trial(env))
    }

    fn variables(&self, env: &Env) -> BTreeMap<String, String> {
        scheme_variables(
            env,
            &[
                bootcount_vars::SLOT,
                bootcount_vars::UPGRADE_AVAILABLE,
                bootcount_vars::BOOTCOUNT,
                bootcount_vars::BOOTLIMIT,
            ],
        )
    }
}

/// RAUC's U-Boot variables: `BOOT_ORDER` and `BOOT_x_LEFT` (hex).
#[derive(Debug, Clone)]
pub struct Rauc {
    attempts: u32,
}

impl Rauc {
    /// The scheme with `attempts` trial boots (written as `BOOT_x_LEFT`).
    pub fn new(attempts: u32) -> Self {
        Rauc { attempts }
    }

    /// `BOOT_ORDER` as a list of slots (missing or empty reads as `A B`, as U-Boot, which drops
    /// empty variables, reads it; one slot is valid); an unknown name is an error.
    pub fn boot_order(env: &Env) -> Result<Vec<Slot>, SchemeError> {
        let Some(value) = non_empty(env.get(rauc_vars::BOOT_ORDER)) else {
            return Ok(vec![Slot::A, Slot::B]);
        };
        let mut order = Vec::new();
        for word in value.split_whitespace() {
            let slot: Slot = word.parse().map_err(|_| SchemeError::InvalidVariable {
                name: rauc_vars::BOOT_ORDER,
                value: value.to_string(),
                expected: "slot names A and B separated by spaces",
            })?;
            if !order.contains(&slot) {
                order.push(slot);
            }
        }
        Ok(order)
    }

    fn format_order(order: &[Slot]) -> String {
        order
            .iter()
            .map(|slot| slot.as_str())
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn attempts_hex(&self) -> String {
        format!("{:x}", self.attempts)
    }
}

impl Scheme for Rauc {
    fn kind(&self) -> SchemeKind {
        SchemeKind::Rauc
    }

    fn attempts(&self) -> u32 {
        self.attempts
    }

    fn activate(&self, env: &Env, slot: Slot) -> Result<ChangeSet, SchemeError> {
        validate_attempts(SchemeKind::Rauc, self.attempts)?;
        // Refuse a BOOT_ORDER we cannot read rather than overwrite it blindly.
        Self::boot_order(env)?;
        let mut changes = Changes::new(env);
        changes.set(rauc_vars::left(slot), self.attempts_hex());
        changes.set(
            rauc_vars::BOOT_ORDER,
            Self::format_order(&[slot, slot.other()]),
        );
        Ok(changes.finish())
    }

    fn mark_good(&self, env: &Env, booted: Slot) -> Result<ChangeSet, SchemeError> {
        validate_attempts(SchemeKind::Rauc, self.attempts)?;
        let mut changes = Changes::new(env);
        changes.set(rauc_vars::left(booted), self.attempts_hex());
        Ok(changes.finish())
    }

    fn mark_bad(&self, env: &Env, slot: Slot) -> Result<ChangeSet, SchemeError> {
        let order = Self::boot_order(env)?;
        let remaining: Vec<Slot> = order.into_iter().filter(|s| *s != slot).collect();
        let mut changes = Changes::new(env);
        changes.set(rauc_vars::left(slot), "0");
        if remaining.is_empty() {
            // An empty value cannot be stored (U-Boot deletes `name=` on import), so the variable
            // goes; the boot script then reads its default order and resets the counters.
            changes.unset(rauc_vars::BOOT_ORDER);
        } else {
            changes.set(rauc_vars::BOOT_ORDER, Self::format_order(&remaining));
        }
        Ok(changes.finish())
    }

    fn next(&self, env: &Env) -> Slot {
        crate::boot_script::decide(env, SchemeKind::Rauc, self.attempts).slot
    }

    fn trial(&self, _env: &Env) -> Option<bool> {
        // A counter below its maximum can be a trial or a confirmed slot that rebooted.
        None
    }

    fn variables(&self, env: &Env) -> BTreeMap<String, String> {
        scheme_variables(
            env,
            &[
                rauc_vars::BOOT_ORDER,
                rauc_vars::left(Slot::A),
                rauc_vars::left(Slot::B),
            ],
        )
    }
}
