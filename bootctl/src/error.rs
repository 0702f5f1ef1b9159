//! The crate's top-level error: everything the facade ([`crate::BootControl`]) and the boot
//! simulator's file helper can fail with, each variant keeping its own context (paths,
//! offsets, variable names).

use std::io;
use std::path::PathBuf;

/// What went wrong in a `bootctl` operation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `fw_env.config` could not be read or parsed.
    #[error(transparent)]
    Config(#[from] crate::fw_env_config::ConfigError),
    /// Reading or saving the environment failed (including: no valid copy).
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// The codec refused a name, value or size.
    #[error(transparent)]
    Env(#[from] crate::env::EnvError),
    /// The scheme refused the transition (nothing was written).
    #[error(transparent)]
    Scheme(#[from] crate::scheme::SchemeError),
    /// The booted slot could not be determined.
    #[error(transparent)]
    Booted(#[from] crate::booted::BootedError),
    /// Writing a file (the simulated kernel command line) failed.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl From<crate::store::OpenError> for Error {
    fn from(e: crate::store::OpenError) -> Self {
        match e {
            crate::store::OpenError::Config(e) => Error::Config(e),
            crate::store::OpenError::Store(e) => Error::Store(e),
        }
    }
}

/// `Result` with [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
