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
        let scheme = self.scheme.as_ref();
        let (changes, applied) = self
            .store
            .update(|env| decide(scheme, env).map_err(crate::Error::from))?;
        Ok(Transition {
            changes,
            saved: applied.saved.is_some(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::env::Layout;
    use crate::store::MemMedium;

    /// A control over an in-memory redundant environment and a cmdline file in `dir`.
    fn control(
        vars: &[(&str, &str)],
        kind: SchemeKind,
        booted: &str,
    ) -> (BootControl, MemMedium, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let cmdline = dir.path().join("cmdline");
        std::fs::write(&cmdline, booted).unwrap();
        let env: Env = vars.iter().copied().collect();
        let (store, medium) = EnvStore::in_memory(&env, 0x1000, Layout::Redundant).unwrap();
        (
            BootControl::with_store(store, kind, cmdline, 3),
            medium,
            dir,
        )
    }

    #[test]
    fn each_transition_is_exactly_one_save() {
        let (ctl, medium, dir) =
            control(&[("bootcmd", "x")], SchemeKind::Bootcount, "bootctl.slot=A");
        let t = ctl.activate(Slot::B).unwrap();
        assert!(t.saved);
        assert_eq!(t.changes.len(), 4);
        assert_eq!(medium.writes(), 1);
        // Nothing new: no save.
        assert!(!ctl.activate(Slot::B).unwrap().saved);
        assert_eq!(medium.writes(), 1);
        // Rebooted into B.
        std::fs::write(dir.path().join("cmdline"), "bootctl.slot=B").unwrap();
        assert!(ctl.mark_good().unwrap().saved);
        assert_eq!(medium.writes(), 2);
        assert!(!ctl.mark_good().unwrap().saved);
        assert!(!ctl.mark_bad(Slot::A).unwrap().saved);
        assert_eq!(medium.writes(), 2);
        assert!(ctl.mark_bad(Slot::B).unwrap().saved);
        assert_eq!(medium.writes(), 3);
        assert_eq!(ctl.env().unwrap().get("bootcmd"), Some("x"));
    }

    #[test]
    fn refused_transition_writes_nothing() {
        let (ctl, medium, _dir) = control(
            &[("bootctl_slot", "B")],
            SchemeKind::Bootcount,
            "bootctl.slot=A",
        );
        let err = ctl.mark_good().unwrap_err();
        assert!(err.to_string().contains("cannot mark slot A good"), "{err}");
        let (ctl2, medium2, _dir2) = control(&[], SchemeKind::Bootcount, "quiet");
        assert!(ctl2
            .mark_good()
            .unwrap_err()
            .to_string()
            .contains("no slot token"));
        assert_eq!(medium.writes() + medium2.writes(), 0);
    }

    #[test]
    fn status_reports_the_contract_fields() {
        let (ctl, _medium, _dir) = control(
            &[
                ("BOOT_ORDER", "B A"),
                ("BOOT_B_LEFT", "0"),
                ("bootcmd", "x"),
            ],
            SchemeKind::Rauc,
            "rauc.slot=B",
        );
        let status = ctl.status().unwrap();
        assert_eq!(status.booted, Some(Slot::B));
        assert_eq!(status.next, Slot::A);
        assert_eq!(status.trial, None);
        assert!(status.redundant);
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "scheme": "rauc",
                "booted": "B",
                "next": "A",
                "trial": null,
                "redundant": true,
                "variables": {"BOOT_ORDER": "B A", "BOOT_B_LEFT": "0"},
            })
        );
        let (ctl, _medium, _dir) = control(&[], SchemeKind::Bootcount, "");
        let json = serde_json::to_value(ctl.status().unwrap()).unwrap();
        assert_eq!(json["booted"], serde_json::Value::Null);
        assert_eq!(json["trial"], false);
    }

    #[test]
    fn open_validates_attempts_before_touching_anything() {
        let err = BootControl::open(BootOptions {
            attempts: 0,
            env_config: PathBuf::from("/nonexistent/fw_env.config"),
            ..BootOptions::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
        let err = BootControl::open(BootOptions {
            env_config: PathBuf::from("/nonexistent/fw_env.config"),
            ..BootOptions::default()
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/fw_env.config"),
            "{err}"
        );
        assert_eq!(
            BootOptions::default().env_config,
            PathBuf::from("/etc/fw_env.config")
        );
        assert_eq!(
            BootOptions::default().cmdline,
            PathBuf::from("/proc/cmdline")
        );
        assert_eq!(BootOptions::default().attempts, 3);
        assert_eq!(BootOptions::default().scheme, SchemeKind::Bootcount);
    }
}
