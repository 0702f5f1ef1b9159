//! Which slot is running: the slot token on the kernel command line (`bootctl.slot=A`, or
//! RAUC's `rauc.slot=A`), optionally cross-checked against the device the root file system was
//! mounted from.
//!
//! The command line is split like the kernel does (whitespace, double quotes group, nothing
//! after ` -- ` is a kernel parameter). Every slot token must agree; a missing token, an
//! unknown slot name or two tokens naming different slots are errors, never a guess.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use crate::slot::Slot;

/// The parameter names that carry the booted slot.
pub const SLOT_PARAMETERS: [&str; 2] = ["bootctl.slot", "rauc.slot"];

/// Why the booted slot could not be determined.
#[derive(Debug, thiserror::Error)]
pub enum BootedError {
    #[error("cannot read kernel command line {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no slot token (bootctl.slot= or rauc.slot=) on the kernel command line {}", path.display())]
    NoToken { path: PathBuf },
    #[error("kernel command line {}: {token} does not name slot A or B", path.display())]
    InvalidToken { path: PathBuf, token: String },
    #[error("kernel command line {}: {first} and {second} name different slots", path.display())]
    Conflict {
        path: PathBuf,
        first: String,
        second: String,
    },
    #[error("cannot check root device {}: {source}", path.display())]
    RootDevice {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "kernel command line {} says slot {slot} with root={cmdline_root}, but the root file \
         system is on {}",
        path.display(),
        root_device.display()
    )]
    RootMismatch {
        path: PathBuf,
        slot: Slot,
        cmdline_root: String,
        root_device: PathBuf,
    },
    #[error(
        "kernel command line {} says slot {slot}, but the root file system is on {} and slot \
         {slot} is {}",
        path.display(),
        root_device.display(),
        slot_device.display()
    )]
    SlotDeviceMismatch {
        path: PathBuf,
        slot: Slot,
        root_device: PathBuf,
        slot_device: PathBuf,
    },
}

/// The parameters of a kernel command line, in order (up to ` -- `), quotes removed.
pub fn parameters(cmdline: &str) -> Vec<String> {
    let mut params = Vec::new();
    let mut current = String::new();
    let mut in_quotes = false;
    let mut has_token = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                in_quotes = !in_quotes;
                has_token = true;
            }
            c if c.is_whitespace() && !in_quotes => {
                if has_token {
                    if current == "--" {
                        return params;
                    }
                    params.push(std::mem::take(&mut current));
                    has_token = false;
                }
            }
            c => {
                current.push(c);
                has_token = true;
            }
        }
    }
    if has_token && current != "--" {
        params.push(current);
    }
    params
}

/// The value of the parameter `name` (last one wins, as for the kernel).
pub fn parameter<'a>(params: &'a [String], name: &str) -> Option<&'a str> {
    params
        .iter()
        .rev()
        .find_map(|p| p.strip_prefix(name).and_then(|rest| rest.strip_prefix('=')))
}

/// The slot named by the command line text; `path` only names it in errors.
pub fn slot_from_cmdline(cmdline: &str, path: &Path) -> Result<Slot, BootedError> {
    let params = parameters(cmdline);
    let mut found: Option<(Slot, String)> = None;
    for param in &params {
        let Some((name, value)) = param.split_once('=') else {
            continue;
        };
        if !SLOT_PARAMETERS.contains(&name) {
            continue;
        }
        let slot: Slot = value.parse().map_err(|_| BootedError::InvalidToken {
            path: path.to_path_buf(),
            token: param.clone(),
        })?;
        match &found {
            Some((seen, first)) if *seen != slot => {
                return Err(BootedError::Conflict {
                    path: path.to_path_buf(),
                    first: first.clone(),
                    second: param.clone(),
                })
            }
            Some(_) => {}
            None => found = Some((slot, param.clone())),
        }
    }
    found
        .map(|(slot, _)| slot)
        .ok_or_else(|| BootedError::NoToken {
            path: path.to_path_buf(),
        })
}

fn read_cmdline(path: &Path) -> Result<String, BootedError> {
    fs::read_to_string(path).map_err(|source| BootedError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// The booted slot from the command line in `cmdline_path` (e.g. `/proc/cmdline`).
///
/// When `root_device` (the device the root file system was mounted from) is given and the
/// command line also carries `root=/dev/...`, the two must be the same device: a command line
/// that does not describe this boot is refused rather than trusted.
pub fn booted_slot(cmdline_path: &Path, root_device: Option<&Path>) -> Result<Slot, BootedError> {
    let text = read_cmdline(cmdline_path)?;
    let slot = slot_from_cmdline(&text, cmdline_path)?;
    let Some(root_device) = root_device else {
        return Ok(slot);
    };
    let params = parameters(&text);
    if let Some(root) = parameter(&params, "root") {
        if root.starts_with('/') && !same_device(Path::new(root), root_device)? {
            return Err(BootedError::RootMismatch {
                path: cmdline_path.to_path_buf(),
                slot,
                cmdline_root: root.to_string(),
                root_device: root_device.to_path_buf(),
            });
        }
    }
    Ok(slot)
}

/// The booted slot from the command line, checked against the slots' devices: the slot the
/// token names must be the device the root file system is on (Mender's check). `slot_devices`
/// is `[A, B]`.
pub fn booted_slot_on(
    cmdline_path: &Path,
    root_device: &Path,
    slot_devices: [&Path; 2],
) -> Result<Slot, BootedError> {
    let slot = booted_slot(cmdline_path, Some(root_device))?;
    let slot_device = slot_devices[slot.index()];
    if !same_device(slot_device, root_device)? {
        return Err(BootedError::SlotDeviceMismatch {
            path: cmdline_path.to_path_buf(),
            slot,
            root_device: root_device.to_path_buf(),
            slot_device: slot_device.to_path_buf(),
        });
    }
    Ok(slot)
}

/// Whether two paths are the same device: device numbers for device nodes, the same file for
/// anything else (a file-backed slot).
pub fn same_device(a: &Path, b: &Path) -> Result<bool, BootedError> {
    let meta = |path: &Path| {
        fs::metadata(path).map_err(|source| BootedError::RootDevice {
            path: path.to_path_buf(),
            source,
        })
    };
    let (ma, mb) = (meta(a)?, meta(b)?);
    let is_device =
        |m: &fs::Metadata| m.file_type().is_block_device() || m.file_type().is_char_device();
    Ok(if is_device(&ma) && is_device(&mb) {
        ma.rdev() == mb.rdev()
    } else {
        (ma.dev(), ma.ino()) == (mb.dev(), mb.ino())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(text: &str) -> Result<Slot, BootedError> {
        slot_from_cmdline(text, Path::new("/proc/cmdline"))
    }

    #[test]
    fn splits_like_the_kernel() {
        assert_eq!(
            parameters("console=ttyS0 foo=\"a b\" bootctl.slot=B -- rauc.slot=A\n"),
            ["console=ttyS0", "foo=a b", "bootctl.slot=B"]
        );
        assert_eq!(parameters(""), Vec::<String>::new());
        assert_eq!(parameters("  x  "), ["x"]);
        assert_eq!(parameters("a=\"\""), ["a="]);
    }

    #[test]
    fn finds_either_token() {
        assert_eq!(slot("root=/dev/vda3 bootctl.slot=B\n").unwrap(), Slot::B);
        assert_eq!(slot("rauc.slot=A quiet").unwrap(), Slot::A);
        assert_eq!(slot("rauc.slot=A bootctl.slot=A").unwrap(), Slot::A);
        assert_eq!(slot("bootctl.slot=\"B\"").unwrap(), Slot::B);
    }

    #[test]
    fn refuses_missing_invalid_and_conflicting_tokens() {
        let err = slot("console=ttyS0 root=/dev/vda2").unwrap_err();
        assert!(matches!(err, BootedError::NoToken { .. }), "{err}");
        assert!(err.to_string().contains("no slot token"), "{err}");
        // After "--" it is an argument of init, not ours.
        assert!(matches!(
            slot("quiet -- bootctl.slot=A").unwrap_err(),
            BootedError::NoToken { .. }
        ));
        let err = slot("bootctl.slot=C").unwrap_err();
        assert!(err.to_string().contains("bootctl.slot=C"), "{err}");
        let err = slot("bootctl.slot=A rauc.slot=B").unwrap_err();
        assert!(matches!(err, BootedError::Conflict { .. }), "{err}");
        assert!(err.to_string().contains("different slots"), "{err}");
        // Similar names are not ours.
        assert!(slot("xbootctl.slot=A bootctl.slots=B").is_err());
    }

    #[test]
    fn cross_checks_the_root_device() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("slotA"), dir.path().join("slotB"));
        std::fs::write(&a, b"a").unwrap();
        std::fs::write(&b, b"b").unwrap();
        let cmdline = dir.path().join("cmdline");
        std::fs::write(&cmdline, format!("root={} bootctl.slot=B\n", b.display())).unwrap();

        assert_eq!(booted_slot(&cmdline, None).unwrap(), Slot::B);
        assert_eq!(booted_slot(&cmdline, Some(&b)).unwrap(), Slot::B);
        let err = booted_slot(&cmdline, Some(&a)).unwrap_err();
        assert!(matches!(err, BootedError::RootMismatch { .. }), "{err}");
        assert!(err.to_string().contains("root file system is on"), "{err}");

        assert_eq!(booted_slot_on(&cmdline, &b, [&a, &b]).unwrap(), Slot::B);
        // The token says B but the root is slot A's device.
        std::fs::write(&cmdline, "bootctl.slot=B\n").unwrap();
        let err = booted_slot_on(&cmdline, &a, [&a, &b]).unwrap_err();
        assert!(
            matches!(err, BootedError::SlotDeviceMismatch { .. }),
            "{err}"
        );
        // A root device that does not exist is a clear error, not a guess.
        let err = booted_slot_on(&cmdline, &dir.path().join("nope"), [&a, &b]).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
        // The same device reached through a symlink is the same device.
        let link = dir.path().join("root-link");
        std::os::unix::fs::symlink(&b, &link).unwrap();
        assert!(same_device(&link, &b).unwrap());
        assert!(!same_device(&a, &b).unwrap());
    }

    #[test]
    fn unreadable_cmdline_names_the_file() {
        let err = booted_slot(Path::new("/nonexistent/cmdline"), None).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cmdline"), "{err}");
    }

    #[test]
    fn device_nodes_compare_by_device_number() {
        // /dev/null and /dev/zero are both char devices with different numbers.
        assert!(same_device(Path::new("/dev/null"), Path::new("/dev/null")).unwrap());
        assert!(!same_device(Path::new("/dev/null"), Path::new("/dev/zero")).unwrap());
    }
}
