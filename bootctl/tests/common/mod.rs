//! Shared by bootctl's file-based tests: a power-on with the boot script's decision. (The test
//! crate's `device::boot_store` is the full version: atomic writes, no valid copy, typed errors.)

use std::fs;
use std::path::Path;

use bootctl::store::EnvStore;
use bootctl::{boot_script, SchemeKind, Slot};

/// Reads the environment of `store`, saves what the boot script saves and rewrites the kernel
/// command line at `cmdline` for the slot it boots.
pub fn power_on(store: &EnvStore, kind: SchemeKind, cmdline: &Path) -> Slot {
    let (slot, changes) = boot_script::power_on(&store.read().unwrap(), kind);
    store.apply(&changes).unwrap();
    let previous = fs::read_to_string(cmdline).unwrap_or_default();
    fs::write(cmdline, boot_script::cmdline_for(&previous, kind, slot)).unwrap();
    slot
}
