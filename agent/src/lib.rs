//! `ddi_agent`: the hawkBit DDI update agent as a library.
//!
//! - [`cli`]: the command line: commands, options, help and usage errors.
//! - [`clock`]: the device clock and whether it is synchronised (feedback `timestamp`).
//! - [`config`]: TOML settings.
//! - [`ddi`]: the typed DDI model and HTTP client.
//! - [`http_policy`]: which HTTP failures are retried and how long to wait (DDI and downloads).
//! - [`machine`]: the pure update state machine.
//! - [`persist`]: the state file and feedback outbox in `state_dir`.
//! - [`state_file`]: the versioned format of the state file, read across agent versions.
//! - [`feedback_budget`]: how much progress feedback an install run may send (status quota).
//! - [`driver`]: runs the machine against the server, the bootloader and the installer.
//! - [`install`]: the streaming download/verify/write pipeline for a slot.
//! - [`local_install`]: installs no server assigned: the dry run (`ddi-agent install --check`)
//!   and the progress display of `ddi-agent install`.
//! - [`health`]: the health checks run after booting a new slot.
//! - [`service`]: daemon plumbing (systemd notify, logging, signals) and the CLI commands.

pub mod cli;
pub mod clock;
pub mod config;
pub mod ddi;
pub mod driver;
pub mod feedback_budget;
pub mod health;
pub mod http_policy;
pub mod install;
pub mod local_install;
pub mod machine;
pub mod persist;
pub mod service;
pub mod state_file;
