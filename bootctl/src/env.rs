//! The U-Boot environment codec: the in-memory [`Env`], the [`ChangeSet`] one state transition
//! makes, and the byte layout of single and redundant copies on the medium.
//!
//! Pure logic, no I/O. The on-medium format (U-Boot `include/env_internal.h`) is:
//!
//! * single copy: `crc32 [4] | data [size - 4]`
//! * redundant copy: `crc32 [4] | flag [1] | data [size - 5]`
//!
//! The CRC is zlib's CRC-32 over the whole data area, padding included, flag excluded, stored
//! little-endian (the byte order of ARM, x86 and RISC-V; [`ByteOrder::Big`] reads images made
//! with `mkenvimage -b` for big-endian targets). The data area is `name=value\0` entries ending
//! with an empty entry, then padding of any value (U-Boot pads with 0x00, `mkenvimage` with 0xff,
//! libubootenv with whatever its buffer held). We write 0x00 padding, as U-Boot does.
//!
//! Redundant copies carry an incrementing flag (eMMC/SD/file/NAND/UBI semantics): the valid copy
//! with the higher flag is current, 255 → 0 wraps, equal flags pick the first copy. A save writes
//! the *other* copy with `flag + 1`, so a torn write only loses that one save.
//!
//! Every variable the agent does not touch is kept byte for byte, in its original order, even
//! when it is not UTF-8; new variables are appended.

use std::fmt;

/// Bytes of the CRC at the start of every copy.
pub const CRC_SIZE: usize = 4;

/// How many copies the environment has, which fixes the header size of each copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layout {
    /// One copy, 4-byte header (CRC). A power cut during a save destroys the environment.
    Single,
    /// Two copies, 5-byte header (CRC + flag). A power cut during a save loses only that save.
    Redundant,
}

impl Layout {
    /// Header bytes before the data area of one copy.
    pub fn header_size(self) -> usize {
        match self {
            Layout::Single => CRC_SIZE,
            Layout::Redundant => CRC_SIZE + 1,
        }
    }

    /// Number of copies on the medium.
    pub fn copies(self) -> usize {
        match self {
            Layout::Single => 1,
            Layout::Redundant => 2,
        }
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Single => "single",
            Layout::Redundant => "redundant",
        })
    }
}

/// Byte order of the stored CRC (the target CPU's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ByteOrder {
    /// ARM, x86, RISC-V: what U-Boot, `mkenvimage` and `fw_setenv` write on these targets.
    #[default]
    Little,
    /// Big-endian targets (`mkenvimage -b`).
    Big,
}

/// Errors of the codec: invalid names or values, an environment that does not fit, a copy
/// that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvError {
    #[error("invalid variable name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    #[error("invalid value for variable {name:?}: {reason}")]
    InvalidValue { name: String, reason: &'static str },
    #[error(
        "environment does not fit: {needed} bytes of variables but the data area of a \
         {layout} copy of {env_size} bytes holds {available}"
    )]
    TooLarge {
        needed: usize,
        available: usize,
        env_size: usize,
        layout: Layout,
    },
    #[error(
        "environment size {env_size} is too small for a {layout} copy (header is {header} bytes)"
    )]
    SizeTooSmall {
        env_size: usize,
        layout: Layout,
        header: usize,
    },
    #[error("copy is {actual} bytes, expected {expected}")]
    WrongLength { expected: usize, actual: usize },
    #[error("bad CRC: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("no valid environment copy: {}", describe_failures(.failures))]
    NoValidCopy { failures: Vec<(usize, EnvError)> },
}

fn describe_failures(failures: &[(usize, EnvError)]) -> String {
    failures
        .iter()
        .map(|(index, err)| format!("copy {}: {err}", index + 1))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Checks a variable name we are about to write.
///
/// U-Boot and libubootenv reject an empty name and a name containing `=`. We also reject what
/// cannot survive the text tools (`fw_setenv -s` is line based) or U-Boot's import
/// (`himport_r` skips leading blanks and entries starting with `#`): NUL, newline, a leading
/// blank or `#`.
pub fn validate_name(name: &str) -> Result<(), EnvError> {
    let reason = if name.is_empty() {
        Some("name is empty")
    } else if name.contains('=') {
        Some("name contains '='")
    } else if name.contains('\0') {
        Some("name contains a NUL byte")
    } else if name.contains('\n') || name.contains('\r') {
        Some("name contains a line break")
    } else if name.starts_with([' ', '\t']) {
        Some("name starts with a blank, which U-Boot strips on import")
    } else if name.starts_with('#') {
        Some("name starts with '#', which U-Boot skips as a comment")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EnvError::InvalidName {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// Checks a value we are about to write.
///
/// NUL ends the entry, a newline breaks the line-based tools, and U-Boot's import turns `\x`
/// into `x`, so a backslash would read back differently in U-Boot than in Linux. An empty value
/// is also refused: U-Boot deletes `name=` on import while libubootenv keeps it, so the two
/// would disagree; unset the variable instead.
pub fn validate_value(name: &str, value: &str) -> Result<(), EnvError> {
    let reason = if value.is_empty() {
        Some("value is empty (U-Boot would delete the variable; unset it instead)")
    } else if value.contains('\0') {
        Some("value contains a NUL byte")
    } else if value.contains('\n') || value.contains('\r') {
        Some("value contains a line break")
    } else if value.contains('\\') {
        Some("value contains a backslash, which U-Boot's import would remove")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(EnvError::InvalidValue {
            name: name.to_string(),
            reason,
        }),
        None => Ok(()),
    }
}

/// One stored entry. `name`/`value` are the text view; `raw` holds the exact bytes when they
/// are not UTF-8 (or the entry has no `=`), so that encoding reproduces them byte for byte.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    name: String,
    value: String,
    raw: Option<RawEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum RawEntry {
    /// `name=value` whose bytes are not valid UTF-8.
    NonUtf8 { name: Vec<u8>, value: Vec<u8> },
    /// An entry without `=`: not a variable we can see, kept as it was.
    Opaque(Vec<u8>),
}

impl Entry {
    fn name_bytes(&self) -> &[u8] {
        match &self.raw {
            Some(RawEntry::NonUtf8 { name, .. }) => name,
            Some(RawEntry::Opaque(_)) => &[],
            None => self.name.as_bytes(),
        }
    }

    fn is_variable(&self) -> bool {
        !matches!(self.raw, Some(RawEntry::Opaque(_)))
    }

    fn encoded_len(&self) -> usize {
        match &self.raw {
            Some(RawEntry::NonUtf8 { name, value }) => name.len() + 1 + value.len() + 1,
            Some(RawEntry::Opaque(bytes)) => bytes.len() + 1,
            None => self.name.len() + 1 + self.value.len() + 1,
        }
    }

    /// A NUL would end the entry early; only pairs built without validation can hold one.
    fn has_nul(&self) -> bool {
        match &self.raw {
            Some(RawEntry::NonUtf8 { name, value }) => name.contains(&0) || value.contains(&0),
            Some(RawEntry::Opaque(bytes)) => bytes.contains(&0),
            None => self.name.contains('\0') || self.value.contains('\0'),
        }
    }

    fn encode_into(&self, out: &mut Vec<u8>) {
        match &self.raw {
            Some(RawEntry::NonUtf8 { name, value }) => {
                out.extend_from_slice(name);
                out.push(b'=');
                out.extend_from_slice(value);
            }
            Some(RawEntry::Opaque(bytes)) => out.extend_from_slice(bytes),
            None => {
                out.extend_from_slice(self.name.as_bytes());
                out.push(b'=');
                out.extend_from_slice(self.value.as_bytes());
            }
        }
        out.push(0);
    }
}

/// An environment: ordered `name=value` variables.
///
/// Order is kept as read; [`Env::set`] of a new name appends it. Values read from the medium
/// are kept byte for byte (a value that is not UTF-8 is seen through [`Env::get`] with U+FFFD
/// replacement characters, but is written back unchanged unless it is set).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Env {
    entries: Vec<Entry>,
}

impl Env {
    /// An empty environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// Parses a data area: `name=value\0` entries up to the first empty entry. Bytes after it
    /// (padding) are ignored. A name that appears twice keeps its first position and its last
    /// value, as U-Boot and libubootenv read it. The end of the area also ends the list (and
    /// an entry cut off by it), as U-Boot's import treats it.
    pub fn from_data(data: &[u8]) -> Self {
        let mut env = Env::new();
        for entry in data.split(|&b| b == 0) {
            if entry.is_empty() {
                break;
            }
            env.push_raw(entry);
        }
        env
    }

    fn push_raw(&mut self, entry: &[u8]) {
        let Some(eq) = entry.iter().position(|&b| b == b'=') else {
            self.entries.push(Entry {
                name: String::new(),
                value: String::new(),
                raw: Some(RawEntry::Opaque(entry.to_vec())),
            });
            return;
        };
        let (name, value) = (&entry[..eq], &entry[eq + 1..]);
        let new = match (std::str::from_utf8(name), std::str::from_utf8(value)) {
            (Ok(n), Ok(v)) => Entry {
                name: n.to_string(),
                value: v.to_string(),
                raw: None,
            },
            _ => Entry {
                name: String::from_utf8_lossy(name).into_owned(),
                value: String::from_utf8_lossy(value).into_owned(),
                raw: Some(RawEntry::NonUtf8 {
                    name: name.to_vec(),
                    value: value.to_vec(),
                }),
            },
        };
        match self
            .entries
            .iter_mut()
            .find(|e| e.is_variable() && e.name_bytes() == name)
        {
            Some(existing) => *existing = new,
            None => self.entries.push(new),
        }
    }

    /// The data area content without padding: every entry, then the terminating NUL.
    pub fn to_data(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.data_len());
        for entry in &self.entries {
            entry.encode_into(&mut out);
        }
        // The empty entry that ends the list; an empty environment is this lone NUL.
        out.push(0);
        out
    }

    /// Bytes [`Env::to_data`] produces.
    pub fn data_len(&self) -> usize {
        self.entries.iter().map(Entry::encoded_len).sum::<usize>() + 1
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.entries
            .iter()
            .position(|e| e.is_variable() && e.name_bytes() == name.as_bytes())
    }

    /// The value of `name`, if set.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.position(name).map(|i| self.entries[i].value.as_str())
    }

    /// The exact stored bytes of the value of `name`, if set.
    pub fn get_bytes(&self, name: &str) -> Option<&[u8]> {
        self.position(name).map(|i| match &self.entries[i].raw {
            Some(RawEntry::NonUtf8 { value, .. }) => value.as_slice(),
            _ => self.entries[i].value.as_bytes(),
        })
    }

    /// Whether `name` is set.
    pub fn contains(&self, name: &str) -> bool {
        self.position(name).is_some()
    }

    /// Sets `name` to `value`, in place if it exists, else appended. Returns whether the
    /// environment changed.
    pub fn set(&mut self, name: &str, value: &str) -> Result<bool, EnvError> {
        validate_name(name)?;
        validate_value(name, value)?;
        let entry = Entry {
            name: name.to_string(),
            value: value.to_string(),
            raw: None,
        };
        match self.position(name) {
            Some(i) if self.entries[i] == entry => Ok(false),
            Some(i) => {
                self.entries[i] = entry;
                Ok(true)
            }
            None => {
                self.entries.push(entry);
                Ok(true)
            }
        }
    }

    /// Removes `name`. Returns whether it was set.
    pub fn remove(&mut self, name: &str) -> bool {
        match self.position(name) {
            Some(i) => {
                self.entries.remove(i);
                true
            }
            None => false,
        }
    }

    /// Applies every change in order. Either all apply or, on the first invalid change, the
    /// environment is left as it was. Returns whether anything changed.
    pub fn apply(&mut self, changes: &ChangeSet) -> Result<bool, EnvError> {
        let mut next = self.clone();
        let mut changed = false;
        for (name, value) in changes.iter() {
            changed |= match value {
                Some(value) => next.set(name, value)?,
                None => {
                    validate_name(name)?;
                    next.remove(name)
                }
            };
        }
        if changed {
            *self = next;
        }
        Ok(changed)
    }

    /// Variables in stored order (entries without `=` are not variables and are skipped).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.entries
            .iter()
            .filter(|e| e.is_variable())
            .map(|e| (e.name.as_str(), e.value.as_str()))
    }

    /// Number of variables.
    pub fn len(&self) -> usize {
        self.iter().count()
    }

    /// Whether no variable is set.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<N: AsRef<str>, V: AsRef<str>> FromIterator<(N, V)> for Env {
    /// Builds an environment from pairs without validation (tests, defaults); later pairs
    /// override earlier ones with the same name.
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut env = Env::new();
        for (name, value) in iter {
            let mut entry = Vec::new();
            entry.extend_from_slice(name.as_ref().as_bytes());
            entry.push(b'=');
            entry.extend_from_slice(value.as_ref().as_bytes());
            env.push_raw(&entry);
        }
        env
    }
}

/// The changes of one state transition, applied in order and saved at once:
/// `(name, Some(value))` sets, `(name, None)` unsets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChangeSet {
    changes: Vec<(String, Option<String>)>,
}

impl ChangeSet {
    /// No changes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `name=value`.
    pub fn set(&mut self, name: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.changes.push((name.into(), Some(value.into())));
        self
    }

    /// Adds an unset of `name`.
    pub fn unset(&mut self, name: impl Into<String>) -> &mut Self {
        self.changes.push((name.into(), None));
        self
    }

    /// Builder form of [`ChangeSet::set`].
    pub fn with(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.set(name, value);
        self
    }

    /// Builder form of [`ChangeSet::unset`].
    pub fn without(mut self, name: impl Into<String>) -> Self {
        self.unset(name);
        self
    }

    /// Changes in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Option<&str>)> + '_ {
        self.changes.iter().map(|(n, v)| (n.as_str(), v.as_deref()))
    }

    /// Number of changes.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// Whether there is no change.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Checks every name and value without applying anything.
    pub fn validate(&self) -> Result<(), EnvError> {
        for (name, value) in self.iter() {
            validate_name(name)?;
            if let Some(value) = value {
                validate_value(name, value)?;
            }
        }
        Ok(())
    }
}

impl<N: Into<String>, V: Into<String>> FromIterator<(N, Option<V>)> for ChangeSet {
    fn from_iter<I: IntoIterator<Item = (N, Option<V>)>>(iter: I) -> Self {
        ChangeSet {
            changes: iter
                .into_iter()
                .map(|(n, v)| (n.into(), v.map(Into::into)))
                .collect(),
        }
    }
}

impl fmt::Display for ChangeSet {
    /// `name=value` and `name` (unset) joined by spaces, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, value)) in self.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            match value {
                Some(value) => write!(f, "{name}={value}")?,
                None => write!(f, "-{name}")?,
            }
        }
        Ok(())
    }
}

fn check_size(env_size: usize, layout: Layout) -> Result<usize, EnvError> {
    let header = layout.header_size();
    // At least one data byte: the terminator of an empty environment.
    if env_size <= header {
        return Err(EnvError::SizeTooSmall {
            env_size,
            layout,
            header,
        });
    }
    Ok(env_size - header)
}

/// Encodes one copy of `env_size` bytes. A redundant copy gets `flag`; a single copy ignores it.
/// The CRC is stored little-endian; the data area is padded with 0x00 as U-Boot does.
pub fn encode_copy(
    env: &Env,
    env_size: usize,
    layout: Layout,
    flag: u8,
) -> Result<Vec<u8>, EnvError> {
    encode_copy_with(env, env_size, layout, flag, ByteOrder::Little)
}

/// [`encode_copy`] with an explicit CRC byte order.
pub fn encode_copy_with(
    env: &Env,
    env_size: usize,
    layout: Layout,
    flag: u8,
    order: ByteOrder,
) -> Result<Vec<u8>, EnvError> {
    let available = check_size(env_size, layout)?;
    if let Some(bad) = env.entries.iter().find(|e| e.has_nul()) {
        return Err(EnvError::InvalidValue {
            name: bad.name.clone(),
            reason: "name or value contains a NUL byte",
        });
    }
    let needed = env.data_len();
    if needed > available {
        return Err(EnvError::TooLarge {
            needed,
            available,
            env_size,
            layout,
        });
    }
    let header = layout.header_size();
    let mut out = vec![0u8; env_size];
    out[header..header + needed].copy_from_slice(&env.to_data());
    let crc = crc32fast::hash(&out[header..]);
    out[..CRC_SIZE].copy_from_slice(&match order {
        ByteOrder::Little => crc.to_le_bytes(),
        ByteOrder::Big => crc.to_be_bytes(),
    });
    if layout == Layout::Redundant {
        out[CRC_SIZE] = flag;
    }
    Ok(out)
}

/// Encodes one copy; a redundant copy gets flag 1, as `mkenvimage -r` writes it.
pub fn encode(env: &Env, env_size: usize, layout: Layout) -> Result<Vec<u8>, EnvError> {
    encode_copy(env, env_size, layout, 1)
}

/// A fresh environment image for provisioning (tests, demo, disk images): one copy for
/// [`Layout::Single`]; for [`Layout::Redundant`] two copies back to back (`2 * env_size`
/// bytes, copy 2 at offset `env_size`), copy 1 with flag 1 (current) and copy 2 with the same
/// variables and flag 0, so either copy alone is a valid environment.
pub fn create_image(env: &Env, env_size: usize, layout: Layout) -> Result<Vec<u8>, EnvError> {
    match layout {
        Layout::Single => encode_copy(env, env_size, layout, 0),
        Layout::Redundant => {
            let mut image = encode_copy(env, env_size, layout, 1)?;
            image.extend(encode_copy(env, env_size, layout, 0)?);
            Ok(image)
        }
    }
}

/// One copy as read from the medium, with a valid CRC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodedCopy {
    /// The stored CRC (as a number).
    pub crc: u32,
    /// The flag of a redundant copy; `None` for a single copy.
    pub flag: Option<u8>,
    /// The variables.
    pub env: Env,
}

/// Decodes one copy whose CRC is stored little-endian.
pub fn decode_copy(bytes: &[u8], layout: Layout) -> Result<DecodedCopy, EnvError> {
    decode_copy_with(bytes, layout, ByteOrder::Little)
}

/// Decodes one copy (all of its `env_size` bytes): checks the CRC, reads the flag and the
/// variables. Padding after the terminator may hold anything.
pub fn decode_copy_with(
    bytes: &[u8],
    layout: Layout,
    order: ByteOrder,
) -> Result<DecodedCopy, EnvError> {
    check_size(bytes.len(), layout)?;
    let header = layout.header_size();
    let mut stored = [0u8; CRC_SIZE];
    stored.copy_from_slice(&bytes[..CRC_SIZE]);
    let stored = match order {
        ByteOrder::Little => u32::from_le_bytes(stored),
        ByteOrder::Big => u32::from_be_bytes(stored),
    };
    let computed = crc32fast::hash(&bytes[header..]);
    if stored != computed {
        return Err(EnvError::BadCrc { stored, computed });
    }
    Ok(DecodedCopy {
        crc: stored,
        flag: (layout == Layout::Redundant).then(|| bytes[CRC_SIZE]),
        env: Env::from_data(&bytes[header..]),
    })
}

/// Which of two valid redundant copies is current, by their flags (U-Boot
/// `env_check_redund`): 255 → 0 wraps, otherwise the higher flag wins, a tie picks copy 1.
/// Returns 0 for copy 1 and 1 for copy 2.
pub fn newer_copy(flag1: u8, flag2: u8) -> usize {
    if flag1 == 255 && flag2 == 0 {
        1
    } else if flag2 == 255 && flag1 == 0 {
        0
    } else if flag2 > flag1 {
        1
    } else {
        0
    }
}

/// The environment read from all copies: the current copy and what was wrong with the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selected {
    /// Index (0 = copy 1) of the current copy.
    pub current: usize,
    /// The current copy.
    pub copy: DecodedCopy,
    /// Per copy: `None` when valid, else why it is not.
    pub problems: Vec<Option<EnvError>>,
    /// The layout the copies were read with.
    pub layout: Layout,
}

impl Selected {
    /// The current variables.
    pub fn env(&self) -> &Env {
        &self.copy.env
    }

    /// Index of the copy the next save writes: the other copy for a redundant environment,
    /// the only copy for a single one.
    pub fn write_target(&self) -> usize {
        match self.layout {
            Layout::Single => 0,
            Layout::Redundant => 1 - self.current,
        }
    }

    /// The flag the next save writes (current flag + 1, wrapping at 255).
    pub fn next_flag(&self) -> u8 {
        self.copy.flag.unwrap_or(0).wrapping_add(1)
    }
}

/// Reads the copies of an environment (one for [`Layout::Single`], two for
/// [`Layout::Redundant`], each exactly `env_size` bytes) and selects the current one.
pub fn select<B: AsRef<[u8]>>(copies: &[B], layout: Layout) -> Result<Selected, EnvError> {
    select_with(copies, layout, ByteOrder::Little)
}

/// [`select`] with an explicit CRC byte order.
pub fn select_with<B: AsRef<[u8]>>(
    copies: &[B],
    layout: Layout,
    order: ByteOrder,
) -> Result<Selected, EnvError> {
    select_decoded(
        copies
            .iter()
            .map(|c| decode_copy_with(c.as_ref(), layout, order))
            .collect(),
        layout,
    )
}

/// Selects the current copy among copies already decoded (an `Err` is an invalid copy: bad
/// CRC, or a medium too short to hold it).
pub fn select_decoded(
    mut decoded: Vec<Result<DecodedCopy, EnvError>>,
    layout: Layout,
) -> Result<Selected, EnvError> {
    let valid: Vec<(usize, &DecodedCopy)> = decoded
        .iter()
        .enumerate()
        .filter_map(|(i, d)| d.as_ref().ok().map(|d| (i, d)))
        .collect();
    let current = match valid.as_slice() {
        [] => {
            return Err(EnvError::NoValidCopy {
                failures: decoded
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, d)| d.err().map(|e| (i, e)))
                    .collect(),
            })
        }
        [(i, _)] => *i,
        [(i, a), (j, b), ..] => {
            if newer_copy(a.flag.unwrap_or(0), b.flag.unwrap_or(0)) == 0 {
                *i
            } else {
                *j
            }
        }
    };
    let problems = decoded.iter().map(|d| d.as_ref().err().cloned()).collect();
    // `current` indexes a valid copy, so this is never the error branch.
    let copy = decoded.swap_remove(current)?;
    Ok(Selected {
        current,
        copy,
        problems,
        layout,
    })
}

/// Splits an image made of copies back to back (as [`create_image`] writes it) into copies
/// and selects the current one.
pub fn decode_image(image: &[u8], env_size: usize, layout: Layout) -> Result<Selected, EnvError> {
    let expected = env_size * layout.copies();
    if image.len() != expected {
        return Err(EnvError::WrongLength {
            expected,
            actual: image.len(),
        });
    }
    check_size(env_size, layout)?;
    let copies: Vec<&[u8]> = image.chunks(env_size).collect();
    select(&copies, layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        pairs.iter().copied().collect()
    }

    #[test]
    fn empty_env_is_a_lone_nul() {
        assert_eq!(Env::new().to_data(), vec![0]);
        assert_eq!(Env::from_data(&[0, 0xff, 0xff]), Env::new());
        assert_eq!(Env::from_data(&[]), Env::new());
    }

    #[test]
    fn data_has_double_nul_terminator() {
        let e = env(&[("a", "1"), ("b", "x=y")]);
        assert_eq!(e.to_data(), b"a=1\0b=x=y\0\0".to_vec());
        assert_eq!(e.data_len(), e.to_data().len());
    }

    #[test]
    fn end_of_area_ends_the_list() {
        let e = Env::from_data(b"a=1\0b=2\0");
        assert_eq!(e.get("b"), Some("2"));
        let cut = Env::from_data(b"a=1\0b=2");
        assert_eq!(cut.get("b"), Some("2"));
        assert_eq!(cut.to_data(), b"a=1\0b=2\0\0".to_vec());
    }

    #[test]
    fn set_keeps_order_and_appends() {
        let mut e = env(&[("b", "1"), ("a", "2")]);
        assert!(e.set("b", "3").unwrap());
        assert!(!e.set("b", "3").unwrap());
        assert!(e.set("c", "4").unwrap());
        let names: Vec<_> = e.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["b", "a", "c"]);
        assert_eq!(e.get("b"), Some("3"));
        assert!(e.remove("a"));
        assert!(!e.remove("a"));
    }

    #[test]
    fn non_utf8_and_opaque_entries_survive() {
        let data = b"x=\xe9t\xe9\0noequals\0y=1\0\0\xff\xff";
        let mut e = Env::from_data(data);
        assert_eq!(e.get_bytes("x"), Some(&b"\xe9t\xe9"[..]));
        assert_eq!(e.len(), 2);
        e.set("y", "2").unwrap();
        assert_eq!(e.to_data(), b"x=\xe9t\xe9\0noequals\0y=2\0\0".to_vec());
    }

    #[test]
    fn duplicates_keep_first_position_last_value() {
        let e = Env::from_data(b"dup=first\0a=1\0dup=second\0\0");
        let all: Vec<_> = e.iter().collect();
        assert_eq!(all, [("dup", "second"), ("a", "1")]);
    }

    #[test]
    fn validation_rejects_what_uboot_cannot_store() {
        let mut e = Env::new();
        for bad in ["", "a=b", "a\0", "a\nb", " a", "#a"] {
            assert!(
                matches!(e.set(bad, "v"), Err(EnvError::InvalidName { .. })),
                "{bad:?}"
            );
        }
        for bad in ["", "a\0b", "a\nb", "a\\b", "a\rb"] {
            assert!(
                matches!(e.set("n", bad), Err(EnvError::InvalidValue { .. })),
                "{bad:?}"
            );
        }
        assert!(e.set("n", "console=ttyS0,115200 root=/dev/x").is_ok());
    }

    #[test]
    fn apply_is_all_or_nothing() {
        let mut e = env(&[("a", "1")]);
        let bad = ChangeSet::new().with("a", "2").with("b", "x\\y");
        assert!(e.apply(&bad).is_err());
        assert_eq!(e.get("a"), Some("1"));
        let good = ChangeSet::new().with("a", "2").without("zz");
        assert!(e.apply(&good).unwrap());
        assert!(!e.apply(&good).unwrap());
        assert!(!e.apply(&ChangeSet::new()).unwrap());
    }

    #[test]
    fn overflow_detected_before_writing() {
        let e = env(&[("name", "0123456789")]);
        // "name=0123456789\0" + "\0" = 17 bytes
        assert!(encode(&e, 4 + 17, Layout::Single).is_ok());
        assert_eq!(
            encode(&e, 4 + 16, Layout::Single),
            Err(EnvError::TooLarge {
                needed: 17,
                available: 16,
                env_size: 20,
                layout: Layout::Single
            })
        );
        assert!(encode(&e, 5 + 16, Layout::Redundant).is_err());
        assert!(matches!(
            encode(&e, 5, Layout::Redundant),
            Err(EnvError::SizeTooSmall { .. })
        ));
    }

    #[test]
    fn unvalidated_nul_is_refused_at_encoding() {
        let e: Env = [("a", "x\0y")].into_iter().collect();
        assert!(matches!(
            encode(&e, 64, Layout::Single),
            Err(EnvError::InvalidValue { .. })
        ));
    }

    #[test]
    fn flag_selection_follows_uboot() {
        assert_eq!(newer_copy(1, 2), 1);
        assert_eq!(newer_copy(2, 1), 0);
        assert_eq!(newer_copy(255, 0), 1);
        assert_eq!(newer_copy(0, 255), 0);
        assert_eq!(newer_copy(5, 5), 0);
    }

    #[test]
    fn create_image_redundant_selects_copy_one_and_writes_copy_two_next() {
        let e = env(&[("a", "1")]);
        let image = create_image(&e, 64, Layout::Redundant).unwrap();
        assert_eq!(image.len(), 128);
        let sel = decode_image(&image, 64, Layout::Redundant).unwrap();
        assert_eq!(sel.current, 0);
        assert_eq!(sel.write_target(), 1);
        assert_eq!(sel.next_flag(), 2);
        assert_eq!(sel.env(), &e);
    }

    #[test]
    fn bad_crc_is_reported_per_copy() {
        let e = env(&[("a", "1")]);
        let mut image = create_image(&e, 64, Layout::Redundant).unwrap();
        image[10] ^= 1;
        image[64 + 10] ^= 1;
        let err = decode_image(&image, 64, Layout::Redundant).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("copy 1: bad CRC"), "{text}");
        assert!(text.contains("copy 2: bad CRC"), "{text}");
    }
}
