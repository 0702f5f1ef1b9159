//! [`BootControl`]: the facade the agent and `ddi-bootctl` use. It ties the environment store,
//! a slot scheme and the kernel command line together; every transition reads the
//! environment, asks the scheme for one [`ChangeSet`] and writes it in ONE save (none when
//! nothing changes).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::booted;
use crate::env::{ChangeSet, Env};
use crate::error::Result;
use crate::fw_env_config::FwEnvConfig;
use crate::scheme::{self, Scheme, SchemeKind, Slot};
use crate::store::EnvStore;

/// Default `fw_env.config` path (contract).
pub const DEFAULT_ENV_CONFIG: &str = "/etc/fw_env.config";
/// Default kernel command line (contract).
pub const DEFAULT_CMDLINE: &str = "/proc/cmdline";
/// Default number of trial boots (contract).
pub const DEFAULT_ATTEMPTS: u32 = 3;

/// Where the environment and the command line are, and how the slots are switched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootOptions {
    /// The `fw_env.config` naming the environment copies.
    pub env_config: PathBuf,
    /// The slot scheme.
    pub scheme: SchemeKind,
    /// The file holding the kernel command line.
    pub cmdline: PathBuf,
    /// Trial boots of a newly activated slot.
    pub attempts: u32,
}

impl Default for BootOptions {
    fn default() -> Self {
        BootOptions {
            env_config: PathBuf::from(DEFAULT_ENV_CONFIG),
            scheme: SchemeKind::default(),
            cmdline: PathBuf::from(DEFAULT_CMDLINE),
            attempts: DEFAULT_ATTEMPTS,
        }
    }
}

/// What `ddi-bootctl status` reports. Field names are the contract's `status --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Status {
    /// `bootcount` or `rauc`.
    pub scheme: SchemeKind,
    /// The running slot, `None` when the command line names none.
    pub booted: Option<Slot>,
    /// The slot the boot script boots at the next power-on.
    pub next: Slot,
    /// `true` while a slot is on trial; `None` when the scheme cannot tell (`rauc`).
    pub trial: Option<bool>,
    /// Whether the environment has two copies.
    pub redundant: bool,
    /// The scheme's variables as stored.
    pub variables: BTreeMap<String, String>,
}

/// What one transition did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// The variables the scheme changed (empty: nothing to do).
    pub changes: ChangeSet,
    /// Whether the environment was saved (exactly once) for it.
    pub saved: bool,
}

/// The U-Boot environment and slot scheme of one device.
#[derive(Debug)]
pub struct BootControl {
    store: EnvStore,
    scheme: Box<dyn Scheme>,
    cmdline: PathBuf,
}

impl BootControl {
    /// Loads `fw_env.config` and prepares the scheme. Nothing is read or written yet.
    pub fn open(options: BootOptions) -> Result<Self> {
        scheme::validate_attempts(options.scheme, options.attempts)?;
        let config = FwEnvConfig::load(&options.env_config)?;
        let store = EnvStore::open(&config)?;
        Ok(Self::with_store(
            store,
            options.scheme,
            options.cmdline,
            options.attempts,
        ))
    }

    /// Over an already open store (tests: an in-memory one).
    pub fn with_store(
        store: EnvStore,
        scheme: SchemeKind,
        cmdline: PathBuf,
        attempts: u32,
    ) -> Self {
        BootControl {
            store,
            scheme: scheme::for_kind(scheme, attempts),
            cmdline,
        }
    }

    /// Uses another lock file than libubootenv's `/var/lock/fw_printenv.lock`.
    pub fn with_lock_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.store = self.store.with_lock_path(path);
        self
    }

    /// The scheme in use.
    pub fn scheme(&self) -> &dyn Scheme {
        self.scheme.as_ref()
    }

    /// The environment store.
    pub fn store(&self) -> &EnvStore {
        &self.store
    }

    /// The current environment.
    pub fn env(&self) -> Result<Env> {
        Ok(self.store.read()?)
    }

    /// The running slot, from the kernel command line.
    pub fn booted(&self) -> Result<Slot> {
        Ok(booted::booted_slot(&self.cmdline, None)?)
    }

    /// Everything `ddi-bootctl status` shows. A command line without a slot token gives
    /// `booted: None`; an unreadable environment is an error.
    pub fn status(&self) -> Result<Status> {
        let env = self.store.read()?;
        Ok(Status {
            scheme: self.scheme.kind(),
            booted: self.booted().ok(),
            next: self.scheme.next(&env),
            trial: self.scheme.trial(&env),
            redundant: self.store.is_redundant(),
            variables: self.scheme.variables(&env),
        })
    }

    /// Activates `slot` for a trial boot (one save).
    pub fn activate(&self, slot: Slot) -> Result<Transition> {
        self.transition(|scheme, env| scheme.activate(env, slot))
    }

    /// Confirms the running slot (one save, or none when nothing is on trial).
    pub fn mark_good(&self) -> Result<Transition> {
        let booted = self.booted()?;
        self.transition(|scheme, env| scheme.mark_good(env, booted))
    }

    /// Marks `slot` as not bootable (one save, or none when nothing changes).
    pub fn mark_bad(&self, slot: Slot) -> Result<Transition> {
        self.transition(|scheme, env| scheme.mark_bad(env, slot))
    }

    fn transition(
        &self,
        decide: impl FnOnce(&dyn Scheme, &Env) -> Result<ChangeSet, scheme::SchemeError>,
    ) -> Result<Transition> {
        let env = self.store.read()?;
        let changes = decide(self.scheme.as_ref(), &env)?;
        if changes.is_empty() {
            return Ok(Transition {
                changes,
                saved: false,
            });
        }
        let applied = self.store.apply(&changes)?;
        Ok(Transition {
            changes,
            saved: applied.saved.is_some(),
        })
    }
}
