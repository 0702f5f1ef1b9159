//! The names every layer shares: the two slots, the scheme kinds and the environment variables
//! each scheme uses. The bottom of the crate: it imports nothing else from it.

use std::fmt;
use std::str::FromStr;

use serde::{Serialize, Serializer};

/// Variable names of the `bootcount` scheme.
pub mod bootcount_vars {
    /// The slot U-Boot boots (`A` or `B`).
    pub const SLOT: &str = "bootctl_slot";
    /// `1` while a slot is on trial.
    pub const UPGRADE_AVAILABLE: &str = "upgrade_available";
    /// Decimal boot counter, incremented by U-Boot while a slot is on trial.
    pub const BOOTCOUNT: &str = "bootcount";
    /// Decimal limit; `bootcount > bootlimit` makes U-Boot fall back.
    pub const BOOTLIMIT: &str = "bootlimit";
}

/// Variable names of the `rauc` scheme.
pub mod rauc_vars {
    use super::Slot;

    /// Space separated slot names, first is tried first.
    pub const BOOT_ORDER: &str = "BOOT_ORDER";

    /// `BOOT_A_LEFT` / `BOOT_B_LEFT`: attempts left, hexadecimal without prefix.
    pub fn left(slot: Slot) -> &'static str {
        match slot {
            Slot::A => "BOOT_A_LEFT",
            Slot::B => "BOOT_B_LEFT",
        }
    }
}

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    /// Both slots, A first.
    pub const ALL: [Slot; 2] = [Slot::A, Slot::B];

    /// The slot that is not `self`.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// `"A"` or `"B"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Slot::A => "A",
            Slot::B => "B",
        }
    }

    /// 0 for A, 1 for B (index into `[A, B]` pairs).
    pub fn index(self) -> usize {
        match self {
            Slot::A => 0,
            Slot::B => 1,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a slot name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid slot {0:?}: expected A or B")]
pub struct ParseSlotError(pub String);

impl FromStr for Slot {
    type Err = ParseSlotError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "A" => Ok(Slot::A),
            "B" => Ok(Slot::B),
            _ => Err(ParseSlotError(s.to_string())),
        }
    }
}

impl Serialize for Slot {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// Which set of variables drives the boot. Serde spells it as [`SchemeKind::as_str`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SchemeKind {
    /// U-Boot's native boot counter (the default).
    #[default]
    Bootcount,
    /// RAUC-compatible `BOOT_ORDER` / `BOOT_x_LEFT`.
    Rauc,
}

impl SchemeKind {
    /// `"bootcount"` or `"rauc"`.
    pub fn as_str(self) -> &'static str {
        match self {
            SchemeKind::Bootcount => "bootcount",
            SchemeKind::Rauc => "rauc",
        }
    }
}

impl fmt::Display for SchemeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A string that is not a scheme name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid scheme {0:?}: expected bootcount or rauc")]
pub struct ParseSchemeError(pub String);

impl FromStr for SchemeKind {
    type Err = ParseSchemeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "bootcount" => Ok(SchemeKind::Bootcount),
            "rauc" => Ok(SchemeKind::Rauc),
            _ => Err(ParseSchemeError(s.to_string())),
        }
    }
}
