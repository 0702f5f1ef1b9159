//! Links `ddi-agent` with packed relative relocations (`-z pack-relative-relocs`, DT_RELR)
//! where the target's glibc can load them.
//!
//! A position-independent Rust binary carries one 24-byte `R_*_RELATIVE` record per pointer in
//! its read-only data (vtables, string tables): ~140 KiB for this agent, all of it read, and so
//! resident, at every start. DT_RELR packs them into a bitmap of ~2 KiB: the stripped binary
//! and its idle and peak RSS shrink by that much (BENCHMARKS.md, "Packed relocations").
//!
//! glibc loads DT_RELR since 2.36; the linker then also records a `GLIBC_ABI_DT_RELR` version
//! need, so an older glibc refuses the binary at start with a message naming it (it never runs
//! half-relocated). Hence the rule:
//!
//! - `DDI_AGENT_PACK_RELOCS=1` or `=0` decides (the Yocto recipe sets 1: every release the
//!   layer supports has glibc 2.36 or later);
//! - otherwise: only for a glibc target that is the machine building it (no `--target` other
//!   than the host) and whose glibc is 2.36 or later, and never for a static (`crt-static`)
//!   binary, which relocates itself.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DDI_AGENT_PACK_RELOCS");
    let pack = match env::var("DDI_AGENT_PACK_RELOCS").as_deref() {
        Ok("1") => true,
        Ok("0") => false,
        Ok(other) => panic!("DDI_AGENT_PACK_RELOCS must be 1 or 0, not {other:?}"),
        Err(_) => built_for_this_glibc_2_36_or_later(),
    };
    if pack {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

fn built_for_this_glibc_2_36_or_later() -> bool {
    let var = |name: &str| env::var(name).unwrap_or_default();
    let glibc_target =
        var("CARGO_CFG_TARGET_OS") == "linux" && var("CARGO_CFG_TARGET_ENV") == "gnu";
    let static_binary = var("CARGO_CFG_TARGET_FEATURE")
        .split(',')
        .any(|feature| feature == "crt-static");
    glibc_target
        && !static_binary
        && var("TARGET") == var("HOST")
        && host_glibc().is_some_and(|version| version >= (2, 36))
}

/// The glibc this build script runs on: the one the binary will run on when it is built for
/// the host.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn host_glibc() -> Option<(u32, u32)> {
    extern "C" {
        fn gnu_get_libc_version() -> *const std::ffi::c_char;
    }
    // SAFETY: glibc returns a pointer to a static NUL-terminated string ("2.36").
    let version = unsafe { std::ffi::CStr::from_ptr(gnu_get_libc_version()) };
    let mut parts = version.to_str().ok()?.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn host_glibc() -> Option<(u32, u32)> {
    None
}
