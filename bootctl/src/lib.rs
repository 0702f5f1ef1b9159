//! `bootctl`: U-Boot environment and A/B slot control for the `ddi` update agent.
//!
//! Layers, bottom up:
//! - [`env`](mod@env): the environment codec (copies, CRC, flags, `name=value` data) and [`ChangeSet`].
//! - [`slot`]: the shared names: [`Slot`], [`SchemeKind`], the schemes' variable names.
//! - [`booted`]: which slot is running, from the kernel command line.
//! - [`boot_script`]: the decision the boot script makes at power-on (pure), which the schemes
//!   use to say what boots next and the tests use to "reboot".
//! - [`scheme`]: the slot schemes of the contract (`bootcount`, `rauc`) as pure transitions.
//! - [`BootControl`] ([`control`]): the facade the agent and `ddi-bootctl` use.
//! - [`fw_env_config`], [`store`], [`lock`]: where the environment lives and how it is saved.
//! - [`fsutil`]: atomic file replacement, `flock`, read-until-full, shared with the agent and
//!   the tests.
//!
//! Every state transition is computed as one [`ChangeSet`] and written in one environment save.

pub mod boot_script;
pub mod booted;
pub mod control;
pub mod env;
pub mod error;
pub mod fsutil;
pub mod fw_env_config;
pub mod lock;
pub mod scheme;
pub mod slot;
pub mod store;

pub use control::{BootControl, BootOptions, Status, Transition};
pub use env::{ChangeSet, Env};
pub use error::{Error, Result};
pub use scheme::{Scheme, SchemeKind, Slot};
