//! Parser for `fw_env.config`, the file that tells U-Boot's `fw_printenv` / libubootenv where
//! the environment copies live.
//!
//! Syntax (U-Boot `tools/env/fw_env.config`, libubootenv `docs/fw_env_config.md`), one line per
//! copy, two lines meaning a redundant environment:
//!
//! ```text
//! # device-or-file   offset   env-size   [sector-size   [sectors   [disable-mtd-lock]]]
//! /dev/mmcblk0       0x100000 0x4000
//! /dev/mmcblk0       0x104000 0x4000
//! ```
//!
//! Numbers are read exactly as both tools read them with `sscanf("%ms %lli %zx %zx %lx %d")`:
//! the offset is C-style (`0x` hex, a leading `0` octal, else decimal, `-` counts back from the
//! end of a block device); the size, sector size and sector count are always hexadecimal, with
//! or without `0x`. `#` starts a comment. Where the C tools silently skip a line they cannot
//! read (or take a number from the front of a malformed field), this parser refuses it with the
//! line number: a half-read config would put the environment in the wrong place. A relative
//! device path is resolved against the folder of the config file.

use std::path::{Path, PathBuf};

use crate::env::Layout;

/// Where one environment copy lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvLocation {
    /// Block device or regular file holding the copy.
    pub device: PathBuf,
    /// Byte offset of the copy; counted back from the end of the device when `from_end`.
    pub offset: u64,
    /// `true` for a negative offset in the config (`-0x4000` = 0x4000 bytes before the end).
    pub from_end: bool,
    /// `CONFIG_ENV_SIZE`: bytes of the copy, header included.
    pub env_size: u64,
    /// Erase sector size (MTD only; unused for files and block devices).
    pub sector_size: Option<u64>,
    /// Number of sectors (NAND bad-block skipping; unused for files and block devices).
    pub sectors: Option<u64>,
}

impl EnvLocation {
    /// A copy at a (non-negative) offset of a file or block device.
    pub fn new(device: impl Into<PathBuf>, offset: u64, env_size: u64) -> Self {
        EnvLocation {
            device: device.into(),
            offset,
            from_end: false,
            env_size,
            sector_size: None,
            sectors: None,
        }
    }

    /// `device@offset` for messages (`device@-offset` when counted from the end).
    pub fn describe(&self) -> String {
        format!(
            "{}@{}{:#x}",
            self.device.display(),
            if self.from_end { "-" } else { "" },
            self.offset
        )
    }
}

/// A parsed `fw_env.config`: one copy (single environment) or two (redundant).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FwEnvConfig {
    /// The copies in config order (copy 1 first).
    pub copies: Vec<EnvLocation>,
}

/// What is wrong with a `fw_env.config`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    InFile {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("line {line}: expected `DEVICE OFFSET ENV-SIZE [SECTOR-SIZE [SECTORS]]`, found {found} field(s)")]
    MissingFields { line: usize, found: usize },
    #[error("line {line}: {field} {text:?} is not a number ({expected})")]
    BadNumber {
        line: usize,
        field: &'static str,
        text: String,
        expected: &'static str,
    },
    #[error("line {line}: unexpected field {text:?} after the 6 fields the format has")]
    ExtraField { line: usize, text: String },
    #[error("line {line}: env-size {size:#x} is too small for a {layout} environment copy")]
    SizeTooSmall {
        line: usize,
        size: u64,
        layout: Layout,
    },
    #[error("line {line}: a third environment copy; fw_env.config describes one or two")]
    TooManyCopies { line: usize },
    #[error(
        "line {line}: env-size {second:#x} differs from the first copy's {first:#x}; \
         both copies must have the same size"
    )]
    SizeMismatch {
        line: usize,
        first: u64,
        second: u64,
    },
    #[error("no environment copy configured (every line is blank or a comment)")]
    Empty,
    #[error(
        "line {line}: the second copy overlaps the first on {}; the two copies must not share \
         bytes (a save would overwrite the current copy)",
        device.display()
    )]
    Overlap { line: usize, device: PathBuf },
}

/// One device named two ways (relative and absolute, a symlink): the same canonical path.
fn same_device(a: &Path, b: &Path) -> bool {
    let key = |p: &Path| std::fs::canonicalize(p);
    a == b || matches!((key(a), key(b)), (Ok(x), Ok(y)) if x == y)
}

const OFFSET_FORMS: &str = "C-style: 0x hex, leading 0 octal, else decimal";
const HEX_FORMS: &str = "hexadecimal, with or without 0x";

/// Parses a C `%lli` integer token in full: optional sign, then `0x` hex, `0` octal or decimal.
fn parse_c_integer(text: &str) -> Option<(bool, u64)> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let value = if let Some(hex) = digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        parse_digits(hex, 16)?
    } else if digits.len() > 1 && digits.starts_with('0') {
        parse_digits(&digits[1..], 8)?
    } else {
        parse_digits(digits, 10)?
    };
    Some((negative, value))
}

/// Parses a C `%x` token in full: hex digits with an optional `0x` prefix.
fn parse_hex(text: &str) -> Option<u64> {
    let digits = text
        .strip_prefix("0x")
        .or_else(|| text.strip_prefix("0X"))
        .unwrap_or(text);
    parse_digits(digits, 16)
}

fn parse_digits(digits: &str, radix: u32) -> Option<u64> {
    // from_str_radix accepts a sign; the caller handled signs already.
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

impl FwEnvConfig {
    /// Parses config text. Relative device paths are resolved against `base_dir` (the folder
    /// of the config file).
    pub fn parse(text: &str, base_dir: &Path) -> Result<Self, ConfigError> {
        let mut copies: Vec<EnvLocation> = Vec::new();
        for (index, raw_line) in text.lines().enumerate() {
            let line = index + 1;
            let fields: Vec<&str> = raw_line
                .split_whitespace()
                .take_while(|f| !f.starts_with('#'))
                .collect();
            if fields.is_empty() {
                continue;
            }
            if fields.len() < 3 {
                return Err(ConfigError::MissingFields {
                    line,
                    found: fields.len(),
                });
            }
            if let Some(extra) = fields.get(6) {
                return Err(ConfigError::ExtraField {
                    line,
                    text: (*extra).to_string(),
                });
            }
            let (from_end, offset) =
                parse_c_integer(fields[1]).ok_or_else(|| ConfigError::BadNumber {
                    line,
                    field: "offset",
                    text: fields[1].to_string(),
                    expected: OFFSET_FORMS,
                })?;
            let hex_field = |i: usize, field: &'static str| -> Result<Option<u64>, ConfigError> {
                match fields.get(i) {
                    None => Ok(None),
                    Some(text) => parse_hex(text).map(Some).ok_or(ConfigError::BadNumber {
                        line,
                        field,
                        text: (*text).to_string(),
                        expected: HEX_FORMS,
                    }),
                }
            };
            let env_size = hex_field(2, "env-size")?.unwrap_or_default();
            let sector_size = hex_field(3, "sector-size")?;
            let sectors = hex_field(4, "sector count")?;
            if let Some(flag) = fields.get(5) {
                // libubootenv's disable-mtd-lock (%d); meaningless for files and block devices.
                if flag.parse::<i32>().is_err() {
                    return Err(ConfigError::BadNumber {
                        line,
                        field: "disable-mtd-lock",
                        text: (*flag).to_string(),
                        expected: "decimal",
                    });
                }
            }
            if copies.len() == 2 {
                return Err(ConfigError::TooManyCopies { line });
            }
            if let Some(first) = copies.first() {
                if first.env_size != env_size {
                    return Err(ConfigError::SizeMismatch {
                        line,
                        first: first.env_size,
                        second: env_size,
                    });
                }
            }
            // The header size depends on the number of copies, known only at the end; the
            // redundant header is the larger, so check against it there.
            if env_size <= Layout::Single.header_size() as u64 {
                return Err(ConfigError::SizeTooSmall {
                    line,
                    size: env_size,
                    layout: Layout::Single,
                });
            }
            if copies.len() == 1 && env_size <= Layout::Redundant.header_size() as u64 {
                return Err(ConfigError::SizeTooSmall {
                    line,
                    size: env_size,
                    layout: Layout::Redundant,
                });
            }
            let device = Path::new(fields[0]);
            let location = EnvLocation {
                device: if device.is_absolute() {
                    device.to_path_buf()
                } else {
                    base_dir.join(device)
                },
                offset,
                from_end: from_end && offset != 0,
                env_size,
                sector_size,
                sectors,
            };
            if let Some(first) = copies.first() {
                // Offsets counted from the same end of the same device can be compared here;
                // one from each end only with the device's size (not known yet).
                if same_device(&first.device, &location.device)
                    && first.from_end == location.from_end
                    && first.offset.abs_diff(location.offset) < env_size
                {
                    return Err(ConfigError::Overlap {
                        line,
                        device: location.device,
                    });
                }
            }
            copies.push(location);
        }
        if copies.is_empty() {
            return Err(ConfigError::Empty);
        }
        Ok(FwEnvConfig { copies })
    }

    /// Reads and parses a config file; relative device paths are resolved against its folder.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path.parent().unwrap_or_else(|| Path::new("."));
        let base = if base.as_os_str().is_empty() {
            Path::new(".")
        } else {
            base
        };
        Self::parse(&text, base).map_err(|e| ConfigError::InFile {
            path: path.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// `Single` for one copy, `Redundant` for two.
    pub fn layout(&self) -> Layout {
        if self.copies.len() == 2 {
            Layout::Redundant
        } else {
            Layout::Single
        }
    }

    /// Whether the environment has two copies.
    pub fn is_redundant(&self) -> bool {
        self.layout() == Layout::Redundant
    }

    /// Size of each copy (`CONFIG_ENV_SIZE`).
    pub fn env_size(&self) -> u64 {
        self.copies.first().map_or(0, |c| c.env_size)
    }

    /// The config text for these copies, in the form U-Boot's tools read (hex numbers).
    pub fn to_text(&self) -> String {
        let mut out = String::from("# device  offset  env-size\n");
        for c in &self.copies {
            out.push_str(&format!(
                "{} {}{:#x} {:#x}",
                c.device.display(),
                if c.from_end { "-" } else { "" },
                c.offset,
                c.env_size
            ));
            if let Some(sector_size) = c.sector_size {
                out.push_str(&format!(" {sector_size:#x}"));
                if let Some(sectors) = c.sectors {
                    out.push_str(&format!(" {sectors:#x}"));
                }
            }
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<FwEnvConfig, ConfigError> {
        FwEnvConfig::parse(text, Path::new("/etc"))
    }

    #[test]
    fn two_lines_are_redundant() {
        let c = parse("# comment\n\n/dev/mmcblk0 0x100000 0x4000\n/dev/mmcblk0 0x104000 4000\n")
            .unwrap();
        assert!(c.is_redundant());
        assert_eq!(c.env_size(), 0x4000);
        assert_eq!(
            c.copies[0],
            EnvLocation::new("/dev/mmcblk0", 0x100000, 0x4000)
        );
        assert_eq!(c.copies[1].offset, 0x104000);
        assert_eq!(
            c.copies[1].env_size, 0x4000,
            "sizes are hex even without 0x"
        );
    }

    /// Review: two lines naming overlapping bytes of one device are not two copies. Each save
    /// "to the other copy" then overwrites the current one (identical lines: in place), so a
    /// power cut during any save leaves no valid environment at all, which the redundant
    /// layout exists to prevent. Such a config must be refused, not used.
    #[test]
    fn overlapping_copies_on_one_device_are_refused() {
        for text in [
            "/dev/mmcblk0 0x100000 0x4000\n/dev/mmcblk0 0x100000 0x4000\n",
            "/dev/mmcblk0 0x100000 0x4000\n/dev/mmcblk0 0x102000 0x4000\n",
            "/dev/mmcblk0 -0x8000 0x4000\n/dev/mmcblk0 -0x6000 0x4000\n",
            "uboot.env 0 0x4000\n/etc/uboot.env 0 0x4000\n",
        ] {
            assert!(parse(text).is_err(), "accepted: {text}");
        }
        // Adjacent copies, or the same offset on two devices, are fine.
        for text in [
            "/dev/mmcblk0 0x100000 0x4000\n/dev/mmcblk0 0x104000 0x4000\n",
            "/dev/mmcblk0 -0x8000 0x4000\n/dev/mmcblk0 -0x4000 0x4000\n",
            "/boot/uboot.env 0 0x4000\n/boot/uboot-redund.env 0 0x4000\n",
        ] {
            assert!(parse(text).is_ok(), "refused: {text}");
        }
    }

    /// The same device named two ways (the config read by a relative path, so its folder is
    /// relative, against an absolute line; a symlink) is still one device.
    #[test]
    fn overlap_is_found_whatever_the_spelling_of_the_device() {
        // The crate's folder is the tests' working directory; any file there will do.
        let cwd = std::env::current_dir().unwrap();
        let text = format!(
            "Cargo.toml 0 0x4000\n{} 0x2000 0x4000\n",
            cwd.join("Cargo.toml").display()
        );
        assert!(FwEnvConfig::parse(&text, Path::new(".")).is_err(), "{text}");
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("env.bin"), [0u8; 0x8000]).unwrap();
        std::os::unix::fs::symlink("env.bin", dir.path().join("link.bin")).unwrap();
        let text = "env.bin 0 0x4000\nlink.bin 0x2000 0x4000\n";
        assert!(FwEnvConfig::parse(text, dir.path()).is_err(), "{text}");
        let text = "env.bin 0 0x4000\nlink.bin 0x4000 0x4000\n";
        assert!(FwEnvConfig::parse(text, dir.path()).is_ok(), "{text}");
    }

    #[test]
    fn offsets_are_c_style() {
        let one = |off: &str| parse(&format!("f {off} 0x1000\n")).unwrap().copies[0].clone();
        assert_eq!(one("4096").offset, 4096);
        assert_eq!(one("0x1000").offset, 0x1000);
        assert_eq!(one("0X1000").offset, 0x1000);
        assert_eq!(one("010").offset, 8, "leading 0 is octal");
        assert_eq!(one("0").offset, 0);
        let end = one("-0x4000");
        assert_eq!((end.from_end, end.offset), (true, 0x4000));
        assert!(matches!(
            parse("f 08 0x1000"),
            Err(ConfigError::BadNumber {
                line: 1,
                field: "offset",
                ..
            })
        ));
        assert!(matches!(
            parse("f 10k 0x1000"),
            Err(ConfigError::BadNumber { .. })
        ));
    }

    #[test]
    fn optional_sector_fields_and_comments() {
        let c = parse("/dev/mtd0 0x4000 0x4000 0x20000 2 1 # NAND\n").unwrap();
        assert_eq!(c.copies[0].sector_size, Some(0x20000));
        assert_eq!(c.copies[0].sectors, Some(2));
        assert!(!c.is_redundant());
        let c = parse("  # indented comment\n/boot/uboot.env 0 0x4000 # trailing\n").unwrap();
        assert_eq!(c.copies.len(), 1);
    }

    #[test]
    fn relative_devices_resolve_against_the_config_folder() {
        let c = FwEnvConfig::parse("env.img 0 0x1000\n", Path::new("/srv/dev")).unwrap();
        assert_eq!(c.copies[0].device, Path::new("/srv/dev/env.img"));
    }

    #[test]
    fn errors_carry_line_numbers() {
        let e = parse("# c\n/dev/x 0\n").unwrap_err();
        assert!(matches!(
            e,
            ConfigError::MissingFields { line: 2, found: 2 }
        ));
        assert!(e.to_string().starts_with("line 2:"), "{e}");
        let e = parse("a 0 0x1000\nb 0 0x2000\n").unwrap_err();
        assert!(
            matches!(e, ConfigError::SizeMismatch { line: 2, .. }),
            "{e}"
        );
        let e = parse("a 0 1000\nb 0 1000\nc 0 1000\n").unwrap_err();
        assert!(matches!(e, ConfigError::TooManyCopies { line: 3 }), "{e}");
        let e = parse("a 0 zz\n").unwrap_err();
        assert!(
            matches!(
                e,
                ConfigError::BadNumber {
                    field: "env-size",
                    ..
                }
            ),
            "{e}"
        );
        assert!(matches!(
            parse("a 0 4\n"),
            Err(ConfigError::SizeTooSmall { .. })
        ));
        assert!(matches!(
            parse("a 0 5\nb 5 5\n"),
            Err(ConfigError::SizeTooSmall { line: 2, .. })
        ));
        assert!(matches!(parse("# only\n\n"), Err(ConfigError::Empty)));
        assert!(matches!(
            parse("a 0 1 2 3 4 5\n"),
            Err(ConfigError::ExtraField { .. })
        ));
    }

    #[test]
    fn load_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fw_env.config");
        std::fs::write(&path, "env.bin 0x0 0x1000\nenv.bin 0x1000 0x1000\n").unwrap();
        let c = FwEnvConfig::load(&path).unwrap();
        assert_eq!(c.copies[1].device, dir.path().join("env.bin"));
        std::fs::write(&path, "env.bin 0x0\n").unwrap();
        let e = FwEnvConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("fw_env.config: line 1:"), "{e}");
        let round = FwEnvConfig::parse(&c.to_text(), Path::new("/")).unwrap();
        assert_eq!(round, c);
    }
}
