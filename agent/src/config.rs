//! Agent configuration: the TOML file of the contract turned into validated settings.
//!
//! Parsing is two-layered: private serde structs mirror the file (unknown keys are rejected with
//! the key and its line; closed sets such as `boot.scheme` and `agent.consent` are serde enums),
//! then each table turns into its validated type through its own `TryFrom`, which checks values
//! and resolves relative paths against the config file's folder; [`Config::from_toml`] puts the
//! line to each problem. Secrets never appear in `Debug` output.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bootctl::SchemeKind;
use serde::Deserialize;
use toml::Spanned;

use crate::health::HealthCheck;
use crate::install::BundlePolicy;

/// Default config path of the contract.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/ddi-agent/config.toml";

/// A configuration error; `line` is 1-based when the problem has a place in the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {message}")]
    AtLine {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// How the agent authenticates against the DDI API.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    TargetToken(String),
    GatewayToken(String),
    /// No token: mutual TLS (or a reverse proxy) authenticates the device.
    None,
}

impl Auth {
    /// The `Authorization` header value, if any. Callers must mark it sensitive.
    pub fn header_value(&self) -> Option<String> {
        match self {
            Auth::TargetToken(t) => Some(format!("TargetToken {t}")),
            Auth::GatewayToken(t) => Some(format!("GatewayToken {t}")),
            Auth::None => None,
        }
    }
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Auth::TargetToken(_) => f.write_str("TargetToken(<redacted>)"),
            Auth::GatewayToken(_) => f.write_str("GatewayToken(<redacted>)"),
            Auth::None => f.write_str("None"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `scheme://host[:port][/context-path]` without a trailing slash.
    pub url: reqwest::Url,
    pub tenant: String,
    pub controller_id: String,
    pub auth: Auth,
    pub ca_file: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    /// Attempts per request for transient failures (extension, default 4).
    pub retries: u32,
    pub connect_timeout: Duration,
    /// A transfer that delivers no byte for this long is aborted (extension, default 60 s).
    pub low_speed_timeout: Duration,
}

impl ServerConfig {
    /// `{url}/{tenant}/controller/v1/{controller_id}`: the poll resource.
    pub fn base_url(&self) -> String {
        let root = self.url.as_str().trim_end_matches('/');
        format!(
            "{root}/{}/controller/v1/{}",
            self.tenant, self.controller_id
        )
    }
}

#[derive(Debug, Clone)]
pub struct BootConfig {
    pub scheme: SchemeKind,
    pub env_config: PathBuf,
    pub cmdline: PathBuf,
    pub attempts: u32,
    pub reboot_command: Vec<String>,
    /// `run`: how long the system may take to go down after `reboot_command` succeeded before
    /// the agent reports it and runs the command again (extension, default 300 s).
    pub reboot_timeout: Duration,
    /// The environment lock (extension; default libubootenv's `/var/lock/fw_printenv.lock`).
    pub env_lock_file: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Consent {
    Auto,
    Manual,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub state_dir: PathBuf,
    pub health_checks: Vec<HealthCheck>,
    pub health_check_timeout: Duration,
    pub consent: Consent,
    /// Bytes per second.
    pub max_download_rate: Option<u64>,
    pub artifact_part: String,
    pub send_token_to_other_hosts: bool,
    pub version_file: PathBuf,
    pub lock_file: PathBuf,
    /// Bytes between durable checkpoints of a server install (its resume points after a power
    /// cut); at least [`MIN_CHECKPOINT_INTERVAL`].
    pub checkpoint_interval: u64,
}

/// The smallest `agent.checkpoint_interval`: the slot writer's buffer.
pub const MIN_CHECKPOINT_INTERVAL: u64 = 256 << 10;

/// Validated agent settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was read from.
    pub path: PathBuf,
    pub server: ServerConfig,
    pub attributes: BTreeMap<String, String>,
    pub slot_a: PathBuf,
    pub slot_b: PathBuf,
    pub boot: BootConfig,
    pub agent: AgentConfig,
    pub bundle: BundlePolicy,
}

// ---- file layer -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRoot {
    server: Spanned<FileServer>,
    #[serde(default)]
    device: FileDevice,
    slots: Spanned<FileSlots>,
    #[serde(default)]
    boot: FileBoot,
    #[serde(default)]
    agent: FileAgent,
    #[serde(default)]
    bundle: Option<Spanned<BundlePolicy>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileServer {
    url: Spanned<String>,
    tenant: Spanned<String>,
    controller_id: Spanned<String>,
    target_token: Option<Spanned<String>>,
    gateway_token: Option<Spanned<String>>,
    ca_file: Option<String>,
    client_cert: Option<Spanned<String>>,
    client_key: Option<Spanned<String>>,
    retries: Option<Spanned<u32>>,
    connect_timeout: Option<Spanned<u64>>,
    low_speed_timeout: Option<Spanned<u64>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileDevice {
    #[serde(default)]
    attributes: BTreeMap<String, Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSlots {
    #[serde(rename = "A")]
    a: String,
    #[serde(rename = "B")]
    b: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileBoot {
    scheme: Option<SchemeKind>,
    env_config: Option<String>,
    cmdline: Option<String>,
    attempts: Option<Spanned<u32>>,
    reboot_command: Option<Spanned<Vec<String>>>,
    reboot_timeout: Option<Spanned<u64>>,
    env_lock_file: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileAgent {
    state_dir: Option<String>,
    #[serde(default)]
    health_checks: Vec<Spanned<HealthCheck>>,
    health_check_timeout: Option<Spanned<u64>>,
    consent: Option<Consent>,
    max_download_rate: Option<Spanned<RateValue>>,
    artifact_part: Option<Spanned<String>>,
    send_token_to_other_hosts: Option<bool>,
    version_file: Option<String>,
    lock_file: Option<String>,
    checkpoint_interval: Option<Spanned<RateValue>>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RateValue {
    Number(i64),
    Text(String),
}

/// Parses `512k`, `2M`, `1G` (binary multiples) or plain bytes per second.
pub fn parse_rate(text: &str) -> Result<u64, String> {
    parse_bytes(text, "rate")
}

/// `512k`, `2M`, `1G` (binary multiples) or plain bytes; `what` names the value in errors.
fn parse_bytes(text: &str, what: &str) -> Result<u64, String> {
    let t = text.trim();
    let (digits, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let mult = match c.to_ascii_lowercase() {
                'k' => 1024,
                'm' => 1024 * 1024,
                'g' => 1024 * 1024 * 1024,
                _ => {
                    return Err(format!(
                        "unknown unit '{c}' in {what} \"{text}\" (use k, M or G)"
                    ))
                }
            };
            (&t[..i], mult)
        }
        _ => (t, 1u64),
    };
    let n: u64 = digits
        .trim()
        .parse()
        .map_err(|_| format!("{what} \"{text}\" is not a number with optional k/M/G suffix"))?;
    let bytes = n
        .checked_mul(mult)
        .ok_or_else(|| format!("{what} \"{text}\" is too large"))?;
    if bytes == 0 {
        return Err(format!("{what} must be greater than 0"));
    }
    Ok(bytes)
}

/// `section.key` of the `key = value` line at `offset` (a serde error names neither).
fn key_at(text: &str, offset: usize) -> Option<String> {
    let line_no = line_of(text, offset) - 1;
    let lines: Vec<&str> = text.lines().collect();
    let (key, _) = lines.get(line_no)?.split_once('=')?;
    let key = key.trim();
    if key.is_empty() || key.starts_with('[') {
        return None;
    }
    let section = lines[..line_no].iter().rev().find_map(|l| {
        let l = l.trim();
        l.strip_prefix('[')?.strip_suffix(']').map(str::trim)
    });
    Some(match section {
        Some(section) => format!("{section}.{key}"),
        None => key.to_string(),
    })
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_toml(&text, path)
    }

    /// Validates `text` as if read from `path` (relative paths resolve against its folder).
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let at_line = |e: Invalid| ConfigError::AtLine {
            path: path.to_path_buf(),
            line: line_of(text, e.span.start),
            message: e.message,
        };
        let root: FileRoot = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => {
                // Type errors do not name the key; quote the line so the user sees it.
                let line = text
                    .lines()
                    .nth(line_of(text, span.start) - 1)
                    .unwrap_or("");
                let message = match key_at(text, span.start) {
                    Some(key) => format!("{key}: {}", e.message().trim()),
                    None => e.message().trim().to_string(),
                };
                at_line(invalid(span, format!("{message} (in `{}`)", line.trim())))
            }
            None => ConfigError::Invalid {
                path: path.to_path_buf(),
                message: e.message().trim().to_string(),
            },
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        // Absolute, so that paths stay right whatever the working directory later is.
        let base = if base.is_absolute() {
            base
        } else {
            match std::env::current_dir() {
                Ok(cwd) if base.as_os_str().is_empty() => cwd,
                Ok(cwd) => cwd.join(&base),
                Err(_) => base,
            }
        };
        let base = base.as_path();

        // Checked in the order of the file's tables: the first problem is reported.
        let server = ServerConfig::try_from(Section::new(root.server.into_inner(), base))
            .map_err(at_line)?;
        let attributes = BTreeMap::try_from(root.device).map_err(at_line)?;
        let slots = SlotPaths::try_from(Section::new(root.slots, base)).map_err(at_line)?;
        let boot = BootConfig::try_from(Section::new(root.boot, base)).map_err(at_line)?;
        let agent = AgentConfig::try_from(Section::new(root.agent, base)).map_err(at_line)?;
        let bundle = match root.bundle {
            None => BundlePolicy::default(),
            Some(b) => BundlePolicy::try_from(Section::new(b, base)).map_err(at_line)?,
        };
        Ok(Config {
            path: path.to_path_buf(),
            server,
            attributes,
            slot_a: slots.a,
            slot_b: slots.b,
            boot,
            agent,
            bundle,
        })
    }
}

// ---- validation, one table at a time ----------------------------------------------------------

/// A value the file holds but the agent cannot use: where it is (bytes of the file) and why.
#[derive(Debug)]
struct Invalid {
    span: std::ops::Range<usize>,
    message: String,
}

fn invalid(span: std::ops::Range<usize>, message: impl Into<String>) -> Invalid {
    Invalid {
        span,
        message: message.into(),
    }
}

/// A table of the file with the folder its relative paths resolve against.
struct Section<'a, T> {
    table: T,
    base: &'a Path,
}

impl<'a, T> Section<'a, T> {
    fn new(table: T, base: &'a Path) -> Self {
        Section { table, base }
    }
}

fn resolve(base: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

/// `v` when it is set and not 0, `default` when it is not set.
fn positive(v: Option<Spanned<u64>>, key: &str, default: u64) -> Result<u64, Invalid> {
    match v {
        None => Ok(default),
        Some(v) if *v.get_ref() == 0 => {
            Err(invalid(v.span(), format!("{key} must be greater than 0")))
        }
        Some(v) => Ok(v.into_inner()),
    }
}

fn non_empty(v: Spanned<String>, key: &str) -> Result<String, Invalid> {
    let span = v.span();
    let s = v.into_inner();
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c == '/') {
        return Err(invalid(
            span,
            format!("{key} must be non-empty without whitespace or '/'"),
        ));
    }
    Ok(s)
}

fn token(v: Spanned<String>, key: &str) -> Result<String, Invalid> {
    let span = v.span();
    let t = v.into_inner();
    if t.is_empty() || t.chars().any(|c| c.is_control() || c == ' ') {
        return Err(invalid(
            span,
            format!("{key} must be non-empty without spaces or control characters"),
        ));
    }
    Ok(t)
}

impl TryFrom<Section<'_, FileServer>> for ServerConfig {
    type Error = Invalid;

    fn try_from(
        Section {
            table: server,
            base,
        }: Section<'_, FileServer>,
    ) -> Result<Self, Invalid> {
        let url_span = server.url.span();
        let url_text = server.url.into_inner();
        let url = reqwest::Url::parse(url_text.trim())
            .map_err(|e| invalid(url_span.clone(), format!("server.url \"{url_text}\": {e}")))?;
        if url.scheme() != "http" && url.scheme() != "https" {
            return Err(invalid(
                url_span,
                format!("server.url must start with https:// or http://, got \"{url_text}\""),
            ));
        }
        if url.query().is_some() || url.fragment().is_some() || url.host_str().is_none() {
            return Err(invalid(
                url_span,
                format!(
                    "server.url must be scheme://host[:port][/context-path], got \"{url_text}\""
                ),
            ));
        }
        let tenant = non_empty(server.tenant, "server.tenant")?;
        let controller_id = non_empty(server.controller_id, "server.controller_id")?;
        let auth = match (server.target_token, server.gateway_token) {
            (Some(_), Some(g)) => {
                return Err(invalid(
                    g.span(),
                    "server.gateway_token: target_token and gateway_token are both set; use at most one",
                ))
            }
            (Some(t), None) => Auth::TargetToken(token(t, "server.target_token")?),
            (None, Some(g)) => Auth::GatewayToken(token(g, "server.gateway_token")?),
            (None, None) => Auth::None,
        };
        let (client_cert, client_key) = match (server.client_cert, server.client_key) {
            (Some(c), Some(k)) => (
                Some(resolve(base, c.get_ref())),
                Some(resolve(base, k.get_ref())),
            ),
            (None, None) => (None, None),
            (Some(c), None) => {
                return Err(invalid(
                    c.span(),
                    "server.client_cert needs server.client_key",
                ))
            }
            (None, Some(k)) => {
                return Err(invalid(
                    k.span(),
                    "server.client_key needs server.client_cert",
                ))
            }
        };
        let retries = match server.retries {
            None => 4,
            Some(v) if *v.get_ref() == 0 => {
                return Err(invalid(v.span(), "server.retries must be at least 1"))
            }
            Some(v) => v.into_inner(),
        };
        Ok(ServerConfig {
            url,
            tenant,
            controller_id,
            auth,
            ca_file: server.ca_file.as_deref().map(|p| resolve(base, p)),
            client_cert,
            client_key,
            retries,
            connect_timeout: Duration::from_secs(positive(
                server.connect_timeout,
                "server.connect_timeout",
                30,
            )?),
            low_speed_timeout: Duration::from_secs(positive(
                server.low_speed_timeout,
                "server.low_speed_timeout",
                60,
            )?),
        })
    }
}

/// `[device]`: the attributes, each one that hawkBit would accept.
impl TryFrom<FileDevice> for BTreeMap<String, String> {
    type Error = Invalid;

    fn try_from(device: FileDevice) -> Result<Self, Invalid> {
        let mut attributes = BTreeMap::new();
        for (k, v) in device.attributes {
            let span = v.span();
            let v = v.into_inner();
            if let Some(problem) = attribute_problem(&k, &v) {
                return Err(invalid(span, problem));
            }
            attributes.insert(k, v);
        }
        Ok(attributes)
    }
}

/// `[slots]`: two different devices or files.
struct SlotPaths {
    a: PathBuf,
    b: PathBuf,
}

impl TryFrom<Section<'_, Spanned<FileSlots>>> for SlotPaths {
    type Error = Invalid;

    fn try_from(Section { table, base }: Section<'_, Spanned<FileSlots>>) -> Result<Self, Invalid> {
        let span = table.span();
        let slots = table.into_inner();
        let (a, b) = (resolve(base, &slots.a), resolve(base, &slots.b));
        if slots.a.is_empty() || slots.b.is_empty() || a == b {
            return Err(invalid(
                span,
                "slots.A and slots.B must be two different non-empty paths",
            ));
        }
        Ok(SlotPaths { a, b })
    }
}

impl TryFrom<Section<'_, FileBoot>> for BootConfig {
    type Error = Invalid;

    fn try_from(Section { table: boot, base }: Section<'_, FileBoot>) -> Result<Self, Invalid> {
        let scheme = boot.scheme.unwrap_or_default();
        // What `BootControl::open` accepts, so that it is a config error and not a boot error.
        let max = match scheme {
            SchemeKind::Bootcount => bootctl::boot_script::MAX_BOOTLIMIT,
            SchemeKind::Rauc => 255,
        };
        let attempts = match boot.attempts {
            None => 3,
            Some(a) if *a.get_ref() == 0 || *a.get_ref() > max => {
                return Err(invalid(
                    a.span(),
                    format!("boot.attempts must be between 1 and {max} for scheme {scheme}"),
                ))
            }
            Some(a) => a.into_inner(),
        };
        let reboot_command = match boot.reboot_command {
            None => vec!["systemctl".to_string(), "reboot".to_string()],
            Some(c) if c.get_ref().is_empty() || c.get_ref()[0].is_empty() => {
                return Err(invalid(
                    c.span(),
                    "boot.reboot_command must be a non-empty argv array",
                ))
            }
            Some(c) => c.into_inner(),
        };
        Ok(BootConfig {
            scheme,
            env_config: resolve(
                base,
                boot.env_config.as_deref().unwrap_or("/etc/fw_env.config"),
            ),
            cmdline: resolve(base, boot.cmdline.as_deref().unwrap_or("/proc/cmdline")),
            attempts,
            reboot_command,
            reboot_timeout: Duration::from_secs(positive(
                boot.reboot_timeout,
                "boot.reboot_timeout",
                300,
            )?),
            env_lock_file: resolve(
                base,
                boot.env_lock_file
                    .as_deref()
                    .unwrap_or("/var/lock/fw_printenv.lock"),
            ),
        })
    }
}

impl TryFrom<Section<'_, FileAgent>> for AgentConfig {
    type Error = Invalid;

    fn try_from(Section { table: a, base }: Section<'_, FileAgent>) -> Result<Self, Invalid> {
        let state_dir = resolve(base, a.state_dir.as_deref().unwrap_or("/var/lib/ddi-agent"));
        let mut health_checks = Vec::new();
        for c in a.health_checks {
            let span = c.span();
            let c = c.into_inner();
            if c.is_empty() {
                return Err(invalid(span, "agent.health_checks: empty command"));
            }
            health_checks.push(c);
        }
        let max_download_rate = match a.max_download_rate {
            None => None,
            Some(r) => {
                let span = r.span();
                let parsed = match r.into_inner() {
                    RateValue::Number(n) if n > 0 => Ok(n as u64),
                    RateValue::Number(_) => Err("rate must be greater than 0".to_string()),
                    RateValue::Text(t) => parse_rate(&t),
                };
                Some(parsed.map_err(|m| invalid(span, format!("agent.max_download_rate: {m}")))?)
            }
        };
        let checkpoint_interval = match a.checkpoint_interval {
            None => crate::install::slot::CHECKPOINT_INTERVAL,
            Some(v) => {
                let span = v.span();
                let parsed = match v.into_inner() {
                    RateValue::Number(n) => Ok(n.max(0) as u64),
                    RateValue::Text(t) => parse_bytes(&t, "size"),
                };
                match parsed {
                    Ok(n) if n >= MIN_CHECKPOINT_INTERVAL => n,
                    Ok(n) => {
                        return Err(invalid(
                            span,
                            format!(
                                "agent.checkpoint_interval: {n} bytes is below the minimum \
                                 256k ({MIN_CHECKPOINT_INTERVAL} bytes)"
                            ),
                        ))
                    }
                    Err(m) => return Err(invalid(span, format!("agent.checkpoint_interval: {m}"))),
                }
            }
        };
        let artifact_part = match a.artifact_part {
            None => "os".to_string(),
            Some(p) if p.get_ref().is_empty() => {
                return Err(invalid(p.span(), "agent.artifact_part must not be empty"))
            }
            Some(p) => p.into_inner(),
        };
        Ok(AgentConfig {
            lock_file: a
                .lock_file
                .as_deref()
                .map(|p| resolve(base, p))
                .unwrap_or_else(|| state_dir.join("agent.lock")),
            state_dir,
            health_checks,
            health_check_timeout: Duration::from_secs(positive(
                a.health_check_timeout,
                "agent.health_check_timeout",
                60,
            )?),
            consent: a.consent.unwrap_or(Consent::Auto),
            max_download_rate,
            artifact_part,
            send_token_to_other_hosts: a.send_token_to_other_hosts.unwrap_or(false),
            version_file: resolve(base, a.version_file.as_deref().unwrap_or("/etc/os-release")),
            checkpoint_interval,
        })
    }
}

/// `[bundle]`: read straight into the policy; here its keys are resolved and a signature is
/// required only with a key to check it.
impl TryFrom<Section<'_, Spanned<BundlePolicy>>> for BundlePolicy {
    type Error = Invalid;

    fn try_from(
        Section { table, base }: Section<'_, Spanned<BundlePolicy>>,
    ) -> Result<Self, Invalid> {
        let span = table.span();
        let mut b = table.into_inner();
        if b.require_signature && b.trusted_keys.is_empty() {
            return Err(invalid(
                span,
                "bundle.require_signature = true needs at least one bundle.trusted_keys entry",
            ));
        }
        for key in &mut b.trusted_keys {
            *key = resolve(base, &key.to_string_lossy());
        }
        Ok(b)
    }
}

/// Why hawkBit would refuse the configured attribute `key = value` (it rejects the whole configData
/// PUT, so one bad attribute would be re-sent and refused on every poll).
pub fn attribute_problem(key: &str, value: &str) -> Option<String> {
    use crate::ddi::attribute_problem as problem;
    problem(key)
        .map(|p| format!("device.attributes: key {key:?}: {p}"))
        .or_else(|| problem(value).map(|p| format!("device.attributes.{key}: value: {p}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[server]
url = "https://hawkbit.example.com"
tenant = "DEFAULT"
controller_id = "dev-1"
target_token = "secret"

[slots]
A = "slot-a.img"
B = "/dev/mmcblk0p3"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("/etc/ddi-agent/config.toml"))
    }

    #[test]
    fn minimal_config_gets_contract_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.server.auth, Auth::TargetToken("secret".into()));
        assert_eq!(
            c.server.base_url(),
            "https://hawkbit.example.com/DEFAULT/controller/v1/dev-1"
        );
        assert_eq!(c.slot_a, PathBuf::from("/etc/ddi-agent/slot-a.img"));
        assert_eq!(c.slot_b, PathBuf::from("/dev/mmcblk0p3"));
        assert_eq!(c.boot.scheme, SchemeKind::Bootcount);
        assert_eq!(c.boot.env_config, PathBuf::from("/etc/fw_env.config"));
        assert_eq!(c.boot.cmdline, PathBuf::from("/proc/cmdline"));
        assert_eq!(c.boot.attempts, 3);
        assert_eq!(c.boot.reboot_command, vec!["systemctl", "reboot"]);
        assert_eq!(c.boot.reboot_timeout, Duration::from_secs(300));
        assert_eq!(
            c.boot.env_lock_file,
            PathBuf::from("/var/lock/fw_printenv.lock")
        );
        assert_eq!(c.agent.state_dir, PathBuf::from("/var/lib/ddi-agent"));
        assert_eq!(c.agent.consent, Consent::Auto);
        assert_eq!(c.agent.artifact_part, "os");
        assert_eq!(c.agent.health_check_timeout, Duration::from_secs(60));
        assert!(!c.agent.send_token_to_other_hosts);
        assert_eq!(c.agent.version_file, PathBuf::from("/etc/os-release"));
        assert_eq!(
            c.agent.lock_file,
            PathBuf::from("/var/lib/ddi-agent/agent.lock")
        );
        assert_eq!(c.agent.max_download_rate, None);
        assert_eq!(c.agent.checkpoint_interval, 16 << 20);
        assert!(
            !format!("{c:?}").contains("secret"),
            "token leaked into Debug"
        );
    }

    #[test]
    fn full_config_is_read() {
        let text = r#"
[server]
url = "http://127.0.0.1:8080/hawkbit"
tenant = "T"
controller_id = "dev"
gateway_token = "gw"
ca_file = "ca.pem"
client_cert = "c.pem"
client_key = "k.pem"
retries = 2

[device]
attributes = { hw_revision = "2" }

[slots]
A = "a"
B = "b"

[boot]
scheme = "rauc"
env_config = "fw_env.config"
cmdline = "cmdline"
attempts = 5
reboot_command = ["touch", "rebooted"]
reboot_timeout = 30

[agent]
state_dir = "state"
health_checks = ["true", ["test", "-e", "/"]]
consent = "manual"
max_download_rate = "512k"
health_check_timeout = 5
artifact_part = "rootfs"
send_token_to_other_hosts = true
version_file = "os-release"
lock_file = "/run/ddi.lock"

[bundle]
trusted_keys = ["key.pub"]
require_signature = true
compatible = "board-x"
"#;
        let c = Config::from_toml(text, Path::new("/cfg/config.toml")).unwrap();
        assert_eq!(c.server.auth, Auth::GatewayToken("gw".into()));
        assert_eq!(c.server.retries, 2);
        assert_eq!(
            c.server.base_url(),
            "http://127.0.0.1:8080/hawkbit/T/controller/v1/dev"
        );
        assert_eq!(c.server.ca_file, Some(PathBuf::from("/cfg/ca.pem")));
        assert_eq!(c.attributes["hw_revision"], "2");
        assert_eq!(c.boot.scheme, SchemeKind::Rauc);
        assert_eq!(c.boot.env_config, PathBuf::from("/cfg/fw_env.config"));
        assert_eq!(c.boot.attempts, 5);
        assert_eq!(c.boot.reboot_timeout, Duration::from_secs(30));
        assert_eq!(c.agent.state_dir, PathBuf::from("/cfg/state"));
        assert_eq!(
            c.agent.health_checks,
            vec![
                HealthCheck::Shell("true".into()),
                HealthCheck::Argv(vec!["test".into(), "-e".into(), "/".into()])
            ]
        );
        assert_eq!(c.agent.consent, Consent::Manual);
        assert_eq!(c.agent.max_download_rate, Some(512 * 1024));
        assert_eq!(c.agent.lock_file, PathBuf::from("/run/ddi.lock"));
        assert_eq!(c.bundle.trusted_keys, vec![PathBuf::from("/cfg/key.pub")]);
        assert_eq!(c.bundle.compatible.as_deref(), Some("board-x"));
    }

    fn err_text(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_key_and_line() {
        let text = format!("{MINIMAL}\n[agent]\nstate_dri = \"x\"\n");
        let line = text
            .lines()
            .position(|l| l.starts_with("state_dri"))
            .unwrap()
            + 1;
        let e = err_text(&text);
        assert!(e.contains("state_dri"), "{e}");
        assert!(e.contains(&format!("config.toml:{line}:")), "{e}");
        let e = err_text(&format!("{MINIMAL}\n[extra]\nx = 1\n"));
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn both_tokens_is_an_error_naming_the_key_and_line() {
        let text = MINIMAL.replace(
            "target_token = \"secret\"",
            "target_token = \"secret\"\ngateway_token = \"other\"",
        );
        let line = text
            .lines()
            .position(|l| l.starts_with("gateway_token"))
            .unwrap()
            + 1;
        let e = err_text(&text);
        assert!(e.contains("gateway_token"), "{e}");
        assert!(e.contains(&format!(":{line}:")), "{e}");
        assert!(!e.contains("secret") && !e.contains("other"), "{e}");
    }

    #[test]
    fn nonsense_values_are_rejected() {
        for (from, to, needle) in [
            ("https://hawkbit.example.com", "ftp://x", "server.url"),
            ("https://hawkbit.example.com", "not a url", "server.url"),
            (
                "controller_id = \"dev-1\"",
                "controller_id = \"\"",
                "controller_id",
            ),
            (
                "target_token = \"secret\"",
                "target_token = \"\"",
                "target_token",
            ),
        ] {
            let e = err_text(&MINIMAL.replace(from, to));
            assert!(e.contains(needle), "{from} -> {to}: {e}");
        }
        for (extra, needle) in [
            ("[boot]\nscheme = \"grub\"", "boot.scheme"),
            ("[boot]\nattempts = 0", "boot.attempts"),
            ("[boot]\nreboot_command = []", "reboot_command"),
            ("[boot]\nreboot_timeout = 0", "boot.reboot_timeout"),
            ("[boot]\nreboot_timeout = -5", "reboot_timeout"),
            ("[agent]\nconsent = \"maybe\"", "agent.consent"),
            ("[agent]\nmax_download_rate = \"fast\"", "max_download_rate"),
            ("[agent]\nmax_download_rate = 0", "max_download_rate"),
            (
                "[agent]\ncheckpoint_interval = 0",
                "agent.checkpoint_interval",
            ),
            (
                "[agent]\ncheckpoint_interval = \"0\"",
                "agent.checkpoint_interval",
            ),
            (
                "[agent]\ncheckpoint_interval = 262143",
                "agent.checkpoint_interval",
            ),
            (
                "[agent]\ncheckpoint_interval = \"255k\"",
                "agent.checkpoint_interval",
            ),
            (
                "[agent]\ncheckpoint_interval = -1",
                "agent.checkpoint_interval",
            ),
            (
                "[agent]\ncheckpoint_interval = \"big\"",
                "agent.checkpoint_interval",
            ),
            ("[agent]\nhealth_check_timeout = 0", "health_check_timeout"),
            ("[agent]\nhealth_checks = [\"\"]", "health_checks"),
            ("[agent]\nstate_dir = 5", "state_dir"),
            ("[device]\nattributes = { k = \"\u{e9}\" }", "attributes"),
            (
                "[device]\nattributes = { k = \"1.0~rc1\" }",
                "device.attributes.k",
            ),
            ("[device]\nattributes = { \"a`b\" = \"1\" }", "key \"a`b\""),
            ("[bundle]\nrequire_signature = true", "trusted_keys"),
        ] {
            let e = err_text(&format!("{MINIMAL}\n{extra}\n"));
            assert!(e.contains(needle), "{extra}: {e}");
        }
        let e = err_text(&MINIMAL.replace("B = \"/dev/mmcblk0p3\"", "B = \"slot-a.img\""));
        assert!(e.contains("slots"), "{e}");
        let e = err_text("[slots]\nA = \"a\"\nB = \"b\"\n");
        assert!(e.contains("server"), "{e}");
    }

    #[test]
    fn closed_sets_name_key_line_and_the_allowed_values() {
        for (extra, key, allowed) in [
            (
                "[boot]\nscheme = \"grub\"",
                "boot.scheme",
                "`bootcount` or `rauc`",
            ),
            (
                "[agent]\nconsent = \"maybe\"",
                "agent.consent",
                "`auto` or `manual`",
            ),
        ] {
            let text = format!("{MINIMAL}\n{extra}\n");
            let line = text.lines().count();
            let e = err_text(&text);
            assert!(e.contains(&format!("config.toml:{line}: {key}:")), "{e}");
            assert!(e.contains(allowed), "{e}");
        }
        let text = format!("{MINIMAL}\n[bundle]\nrequire_signature = true\n");
        let line = text.lines().position(|l| l == "[bundle]").unwrap() + 1;
        let e = err_text(&text);
        assert!(e.contains(&format!("config.toml:{line}:")), "{e}");
        let c = Config::from_toml(
            &format!(
                "{MINIMAL}\n[boot]\nscheme = \"rauc\"\n[bundle]\ntrusted_keys = [\"k.pub\"]\n"
            ),
            Path::new("/cfg/config.toml"),
        )
        .unwrap();
        assert_eq!(c.boot.scheme, SchemeKind::Rauc);
        assert_eq!(
            c.bundle.for_install().unwrap().trusted_keys,
            vec![PathBuf::from("/cfg/k.pub")]
        );
        assert_eq!(parse(MINIMAL).unwrap().bundle.for_install(), None);
    }

    /// Every table's validation names the key, and the line of the value (or of the table's
    /// header, for a problem of the table as a whole).
    #[test]
    fn a_bad_value_in_each_table_names_key_and_line() {
        let with = |extra: &str| format!("{MINIMAL}\n{extra}\n");
        for (text, key, line_start) in [
            (
                MINIMAL.replace("tenant =", "retries = 0\ntenant ="),
                "server.retries",
                "retries",
            ),
            (
                with("[device]\nattributes = { k = \"1.0~rc1\" }"),
                "device.attributes.k",
                "attributes",
            ),
            (
                MINIMAL.replace("B = \"/dev/mmcblk0p3\"", "B = \"slot-a.img\""),
                "slots.A and slots.B",
                "[slots]",
            ),
            (with("[boot]\nattempts = 256"), "boot.attempts", "attempts"),
            // The bootcount boot script counts to 99: more would fail only at activation.
            (with("[boot]\nattempts = 100"), "boot.attempts", "attempts"),
            (
                with("[agent]\nartifact_part = \"\""),
                "agent.artifact_part",
                "artifact_part",
            ),
            (
                with("[bundle]\nrequire_signature = true"),
                "bundle.require_signature",
                "[bundle]",
            ),
        ] {
            let line = text
                .lines()
                .position(|l| l.starts_with(line_start))
                .unwrap()
                + 1;
            let e = err_text(&text);
            assert!(
                e.starts_with(&format!("/etc/ddi-agent/config.toml:{line}: {key}")),
                "{key}: {e}"
            );
        }
    }

    #[test]
    fn rates_parse_with_suffixes() {
        assert_eq!(parse_rate("512k"), Ok(512 * 1024));
        assert_eq!(parse_rate("2M"), Ok(2 * 1024 * 1024));
        assert_eq!(parse_rate("1000"), Ok(1000));
        assert!(parse_rate("2X").is_err());
        assert!(parse_rate("k").is_err());
        assert!(parse_rate("0").is_err());
    }

    #[test]
    fn checkpoint_interval_takes_bytes_or_a_suffix_down_to_the_writer_buffer() {
        for (value, bytes) in [
            ("262144", 256 << 10),
            ("\"256k\"", 256 << 10),
            ("\"64M\"", 64 << 20),
            ("\"1G\"", 1 << 30),
        ] {
            let c = parse(&format!(
                "{MINIMAL}\n[agent]\ncheckpoint_interval = {value}\n"
            ))
            .unwrap();
            assert_eq!(c.agent.checkpoint_interval, bytes, "{value}");
        }
        let e = err_text(&format!(
            "{MINIMAL}\n[agent]\ncheckpoint_interval = \"128k\"\n"
        ));
        assert!(e.contains("below the minimum"), "{e}");
    }

    #[test]
    fn attempts_above_99_only_under_rauc() {
        let boot = |extra: &str| parse(&format!("{MINIMAL}\n[boot]\n{extra}\n"));
        assert_eq!(boot("attempts = 99").unwrap().boot.attempts, 99);
        let rauc = boot("scheme = \"rauc\"\nattempts = 100").unwrap();
        assert_eq!(rauc.boot.attempts, 100);
        let e = err_text(&format!("{MINIMAL}\n[boot]\nattempts = 100\n"));
        assert!(e.contains("boot.attempts") && e.contains("99"), "{e}");
    }

    #[test]
    fn no_token_means_certificate_or_proxy_auth() {
        let c = parse(&MINIMAL.replace("target_token = \"secret\"", "")).unwrap();
        assert_eq!(c.server.auth, Auth::None);
        assert_eq!(c.server.auth.header_value(), None);
    }
}
