//! Server state (targets, software modules with artifacts, distribution sets, actions with their
//! status history and raw feedback) and hawkBit's action state machine as plain functions over it.
//! No I/O here except hashing a registered artifact file; the HTTP layers (`ddi`, `mgmt`) translate
//! requests into these calls and [`DdiError`]s into status codes.

use super::faults::{Endpoint, Fault};
use super::version::HawkbitVersion;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (hawkBit's time unit on the wire).
pub type Millis = i64;

/// Current wall-clock time in milliseconds since the epoch.
pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Status of an action, and type of one status entry; names as hawkBit's `Action.Status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ActionStatus {
    Running,
    Retrieved,
    WaitForConfirmation,
    Canceling,
    Canceled,
    Finished,
    Error,
    Downloaded,
    Warning,
    Download,
    CancelRejected,
    Scheduled,
}

impl ActionStatus {
    /// The upper-case name used in `actionHistory.status` and the management API.
    pub fn name(self) -> &'static str {
        match self {
            ActionStatus::Running => "RUNNING",
            ActionStatus::Retrieved => "RETRIEVED",
            ActionStatus::WaitForConfirmation => "WAIT_FOR_CONFIRMATION",
            ActionStatus::Canceling => "CANCELING",
            ActionStatus::Canceled => "CANCELED",
            ActionStatus::Finished => "FINISHED",
            ActionStatus::Error => "ERROR",
            ActionStatus::Downloaded => "DOWNLOADED",
            ActionStatus::Warning => "WARNING",
            ActionStatus::Download => "DOWNLOAD",
            ActionStatus::CancelRejected => "CANCEL_REJECTED",
            ActionStatus::Scheduled => "SCHEDULED",
        }
    }
}

/// How an assignment was made; decides `download`/`update` in deploymentBase (spec §13).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionType {
    Forced,
    Soft,
    /// Soft until `forced_at` of the action, then forced.
    Timeforced,
    Downloadonly,
}

impl std::str::FromStr for ActionType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "forced" => Ok(ActionType::Forced),
            "soft" => Ok(ActionType::Soft),
            "timeforced" => Ok(ActionType::Timeforced),
            "downloadonly" => Ok(ActionType::Downloadonly),
            _ => Err(format!(
                "unknown action type {s:?} (forced, soft, timeforced, downloadonly)"
            )),
        }
    }
}

/// A maintenance schedule: windows of `duration_ms` starting at `start_ms`, repeating every
/// `every_ms` if set (hawkBit uses cron; a fixed period covers what tests need).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MaintenanceWindow {
    pub start_ms: Millis,
    pub duration_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub every_ms: Option<i64>,
}

impl MaintenanceWindow {
    /// The window that contains `now` or the next one: `(start, end)`; None once the schedule lapsed.
    pub fn current_or_next(&self, now: Millis) -> Option<(Millis, Millis)> {
        let end = self.start_ms + self.duration_ms;
        if now < end {
            return Some((self.start_ms, end));
        }
        let every = self.every_ms.filter(|e| *e > 0)?;
        // Index of the first window whose end is after now.
        let k = (now - end) / every + 1;
        let start = self.start_ms + k * every;
        Some((start, start + self.duration_ms))
    }
    /// True while `now` is inside a window.
    pub fn is_open(&self, now: Millis) -> bool {
        self.current_or_next(now)
            .is_some_and(|(s, e)| s <= now && now < e)
    }
    /// True when no window will ever open again.
    pub fn lapsed(&self, now: Millis) -> bool {
        self.current_or_next(now).is_none()
    }
}

/// One entry of an action's status history (what hawkBit stores as an ActionStatus row).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusEntry {
    pub time_ms: Millis,
    pub status: ActionStatus,
    pub messages: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
}

/// Which DDI channel a feedback came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Deployment,
    Cancel,
    Confirmation,
}

/// A feedback body exactly as the device sent it (accepted ones only), for tests and the CLI.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FeedbackRecord {
    /// Server receive time.
    pub time_ms: Millis,
    pub channel: Channel,
    pub body: serde_json::Value,
}

impl FeedbackRecord {
    /// `status.execution` of a deployment/cancel feedback.
    pub fn execution(&self) -> Option<&str> {
        self.body.pointer("/status/execution")?.as_str()
    }
    /// `status.result.finished` of a deployment/cancel feedback.
    pub fn finished(&self) -> Option<&str> {
        self.body.pointer("/status/result/finished")?.as_str()
    }
    /// `status.details` lines.
    pub fn details(&self) -> Vec<String> {
        self.body
            .pointer("/status/details")
            .and_then(|d| d.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// One assignment of a distribution set to a target.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Action {
    pub id: u64,
    pub target: String,
    pub distribution: u64,
    pub action_type: ActionType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_at_ms: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceWindow>,
    pub status: ActionStatus,
    pub active: bool,
    /// A RETRIEVED entry was registered since the last other status change.
    #[serde(default)]
    pub retrieved: bool,
    /// Multi-assignment weight (0..=1000); absent counts as [`WEIGHT_IF_ABSENT`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u16>,
    pub created_ms: Millis,
    pub history: Vec<StatusEntry>,
    pub feedback: Vec<FeedbackRecord>,
}

impl Action {
    /// `download`, `update` and `maintenanceWindow` as hawkBit derives them (spec §13).
    pub fn deployment_modes(
        &self,
        now: Millis,
    ) -> (&'static str, &'static str, Option<&'static str>) {
        let forced = match self.action_type {
            ActionType::Forced | ActionType::Downloadonly => true,
            ActionType::Soft => false,
            ActionType::Timeforced => self.forced_at_ms.is_some_and(|t| now >= t),
        };
        let download = if forced { "forced" } else { "attempt" };
        if self.action_type == ActionType::Downloadonly {
            let window = self.maintenance.map(|w| {
                if w.is_open(now) {
                    "available"
                } else {
                    "unavailable"
                }
            });
            return (download, "skip", window);
        }
        match self.maintenance {
            Some(w) if w.is_open(now) => (download, download, Some("available")),
            Some(_) => (download, "skip", Some("unavailable")),
            None => (download, download, None),
        }
    }

    /// The `c` cache-buster of poll links: changes whenever the modes change.
    pub fn cache_buster(&self, now: Millis) -> i32 {
        let (d, u, w) = self.deployment_modes(now);
        let mut hash: u32 = 0x811c_9dc5;
        for b in format!("{}:{d}:{u}:{w:?}", self.id).bytes() {
            hash ^= u32::from(b);
            hash = hash.wrapping_mul(0x0100_0193);
        }
        hash as i32
    }

    /// The newest feedback, if any.
    pub fn last_feedback(&self) -> Option<&FeedbackRecord> {
        self.feedback.last()
    }

    fn push_status(
        &mut self,
        time_ms: Millis,
        status: ActionStatus,
        messages: Vec<String>,
        code: Option<i32>,
    ) {
        self.history.push(StatusEntry {
            time_ms,
            status,
            messages,
            code,
        });
    }

    fn set_status(&mut self, status: ActionStatus) {
        self.status = status;
        self.active = !matches!(
            status,
            ActionStatus::Finished
                | ActionStatus::Error
                | ActionStatus::Canceled
                | ActionStatus::Downloaded
        );
        self.retrieved = false;
    }

    /// Count of non-final entries (the ones hawkBit's per-action quota counts).
    fn intermediate_entries(&self) -> usize {
        self.history
            .iter()
            .filter(|e| !matches!(e.status, ActionStatus::Finished | ActionStatus::Error))
            .count()
    }
}

/// The bytes of an artifact: in memory, or a file streamed from disk on each download.
#[derive(Clone, Debug)]
pub enum ArtifactSource {
    Memory(bytes::Bytes),
    File(PathBuf),
}

/// A file of a software module.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Artifact {
    pub filename: String,
    pub size: u64,
    pub sha1: String,
    pub md5: String,
    pub sha256: String,
    pub created_ms: Millis,
    #[serde(with = "source_serde")]
    pub source: ArtifactSource,
}

/// Serializes in-memory artifacts as base64 so a `--state-file` holds everything.
mod source_serde {
    use super::ArtifactSource;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::path::PathBuf;

    #[derive(Serialize, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Repr {
        Base64(String),
        File(PathBuf),
    }

    pub fn serialize<S: Serializer>(src: &ArtifactSource, s: S) -> Result<S::Ok, S::Error> {
        match src {
            ArtifactSource::Memory(b) => {
                Repr::Base64(base64::engine::general_purpose::STANDARD.encode(b)).serialize(s)
            }
            ArtifactSource::File(p) => Repr::File(p.clone()).serialize(s),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ArtifactSource, D::Error> {
        Ok(match Repr::deserialize(d)? {
            Repr::Base64(text) => ArtifactSource::Memory(
                base64::engine::general_purpose::STANDARD
                    .decode(text)
                    .map_err(serde::de::Error::custom)?
                    .into(),
            ),
            Repr::File(p) => ArtifactSource::File(p),
        })
    }
}

impl Artifact {
    /// Hashes `data` and keeps it in memory.
    pub fn from_bytes(filename: &str, data: bytes::Bytes) -> Artifact {
        let mut h = Hashers::default();
        h.update(&data);
        h.finish(filename, data.len() as u64, ArtifactSource::Memory(data))
    }

    /// Hashes the file at `path` (streaming, never loaded whole); it is served from there.
    /// The three digests run on their own threads: GiB artifacts hash in a fraction of the time.
    pub fn from_file(filename: &str, path: &Path) -> std::io::Result<Artifact> {
        // coreutils hash a GiB in seconds; unoptimized (debug) Rust digests take minutes.
        if let Some([sha1, md5, sha256]) = hash_with_coreutils(path) {
            let size = std::fs::metadata(path)?.len();
            return Ok(Artifact {
                filename: filename.to_string(),
                size,
                sha1,
                md5,
                sha256,
                created_ms: now_ms(),
                source: ArtifactSource::File(path.to_path_buf()),
            });
        }
        Self::hash_file(filename, path)
    }

    /// [`Artifact::from_file`] without external tools.
    pub fn hash_file(filename: &str, path: &Path) -> std::io::Result<Artifact> {
        use sha2::Digest;
        use std::io::Read;
        use std::sync::mpsc::sync_channel;
        let mut file = std::fs::File::open(path)?;
        let mut size = 0u64;
        let (digests, read_result) = std::thread::scope(|scope| {
            let mut senders = Vec::new();
            let mut workers = Vec::new();
            for kind in 0..3 {
                let (tx, rx) = sync_channel::<bytes::Bytes>(4);
                senders.push(tx);
                workers.push(scope.spawn(move || {
                    let mut sha1 = sha1::Sha1::new();
                    let mut md5 = md5::Md5::new();
                    let mut sha256 = sha2::Sha256::new();
                    for chunk in rx {
                        match kind {
                            0 => sha1.update(&chunk),
                            1 => md5.update(&chunk),
                            _ => sha256.update(&chunk),
                        }
                    }
                    match kind {
                        0 => hex::encode(sha1.finalize()),
                        1 => hex::encode(md5.finalize()),
                        _ => hex::encode(sha256.finalize()),
                    }
                }));
            }
            let read_result = (|| -> std::io::Result<()> {
                loop {
                    let mut buf = vec![0u8; 1 << 20];
                    let n = file.read(&mut buf)?;
                    if n == 0 {
                        return Ok(());
                    }
                    buf.truncate(n);
                    size += n as u64;
                    let chunk = bytes::Bytes::from(buf);
                    for tx in &senders {
                        // A worker only stops when its channel closes, so send cannot fail.
                        let _ = tx.send(chunk.clone());
                    }
                }
            })();
            drop(senders);
            let digests: Vec<String> = workers
                .into_iter()
                .map(|w| w.join().unwrap_or_default())
                .collect();
            (digests, read_result)
        });
        read_result?;
        Ok(Artifact {
            filename: filename.to_string(),
            size,
            sha1: digests[0].clone(),
            md5: digests[1].clone(),
            sha256: digests[2].clone(),
            created_ms: now_ms(),
            source: ArtifactSource::File(path.to_path_buf()),
        })
    }
}

/// sha1, md5 and sha256 of a file by `sha1sum`, `md5sum`, `sha256sum` run in parallel; None
/// when any of them is missing or fails.
fn hash_with_coreutils(path: &Path) -> Option<[String; 3]> {
    use std::process::{Command, Stdio};
    let spawn = |tool: &str| {
        Command::new(tool)
            .arg("--")
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .ok()
    };
    let children = [spawn("sha1sum"), spawn("md5sum"), spawn("sha256sum")];
    let mut out: Vec<Option<String>> = Vec::new();
    for (child, len) in children.into_iter().zip([40usize, 32, 64]) {
        let hex = child
            .and_then(|c| c.wait_with_output().ok())
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|text| text.split_whitespace().next().map(str::to_ascii_lowercase))
            .filter(|h| h.len() == len && h.chars().all(|c| c.is_ascii_hexdigit()));
        out.push(hex);
    }
    match (out[0].take(), out[1].take(), out[2].take()) {
        (Some(a), Some(b), Some(c)) => Some([a, b, c]),
        _ => None,
    }
}

#[derive(Default)]
struct Hashers {
    sha1: sha1::Sha1,
    md5: md5::Md5,
    sha256: sha2::Sha256,
}

impl Hashers {
    fn update(&mut self, data: &[u8]) {
        use sha2::Digest;
        self.sha1.update(data);
        self.md5.update(data);
        self.sha256.update(data);
    }
    fn finish(self, filename: &str, size: u64, source: ArtifactSource) -> Artifact {
        use sha2::Digest;
        Artifact {
            filename: filename.to_string(),
            size,
            sha1: hex::encode(self.sha1.finalize()),
            md5: hex::encode(self.md5.finalize()),
            sha256: hex::encode(self.sha256.finalize()),
            created_ms: now_ms(),
            source,
        }
    }
}

/// A software module (a DDI chunk).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SoftwareModule {
    pub id: u64,
    /// Module type key, sent as `part` (`application`→`bApp`, `runtime`→`jvm` on the wire).
    pub part: String,
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub metadata: Vec<(String, String)>,
    #[serde(default)]
    pub encrypted: bool,
    pub artifacts: Vec<Artifact>,
}

/// A distribution set: what gets assigned.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Distribution {
    pub id: u64,
    pub name: String,
    pub version: String,
    pub modules: Vec<u64>,
}

/// Auto-confirmation state of a target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AutoConfirm {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remark: Option<String>,
    pub activated_at: Millis,
}

/// A device record.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Target {
    pub controller_id: String,
    /// TargetToken; None = cannot authenticate with a target token.
    pub token: Option<String>,
    pub attributes: BTreeMap<String, String>,
    /// The server asks for configData (link shown on poll).
    pub request_attributes: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_confirm: Option<AutoConfirm>,
    /// Action whose distribution set is installed (FINISHED).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_action: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installation_date: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_ms: Option<Millis>,
    #[serde(default)]
    pub poll_count: u64,
    /// Polling interval for this target only (hawkBit's polling-time overrides); None = tenant's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub polling_ms: Option<i64>,
}

/// Tenant-level settings that the management API may change at run time.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Config {
    pub tenant: String,
    pub version: HawkbitVersion,
    /// Normal polling interval.
    pub polling_ms: i64,
    /// Floor for the maintenance-window shortened interval (hawkBit `minPollingTime`).
    pub min_polling_ms: i64,
    /// Tenant-wide GatewayToken, if enabled.
    pub gateway_token: Option<String>,
    /// TargetToken authentication enabled.
    pub target_token_enabled: bool,
    /// Anonymous DDI access (only honoured when the imitated version is <= 0.7.x).
    pub anonymous: bool,
    /// Certificate authentication through a reverse proxy's headers: the trusted authority
    /// (issuer hash) values; None = disabled.
    #[serde(default)]
    pub trusted_authorities: Option<Vec<String>>,
    /// Also advertise `download`/`md5sum` links (hawkBit: operator-configured), pointing at this
    /// host name instead of the request's (same server, different name: lets agents test their
    /// cross-host token policy). `None` = only `download-http`/`md5sum-http`.
    pub download_link_host: Option<String>,
    /// Name the poll answer's links (deploymentBase, cancelAction, confirmationBase,
    /// installedBase, configData) on this host name instead of the request's (same server,
    /// different name: lets agents test that the token stays on the server's origin).
    #[serde(default)]
    pub action_link_host: Option<String>,
    pub max_status_entries_per_action: usize,
    pub max_messages_per_status: usize,
    pub max_attributes_per_target: usize,
    /// New assignments close older active actions silently (`repository.actions.autoclose.enabled`).
    pub autoclose_obsolete: bool,
    /// hawkBit `skip-artifact-access-check` for this tenant.
    pub skip_artifact_access_check: bool,
    /// hawkBit `maintenanceWindowPollCount`.
    pub maintenance_poll_count: i64,
    /// Random deviation of the polling interval in percent (hawkBit's `~N%`), 0 = none.
    #[serde(default)]
    pub polling_deviation_pct: u8,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            tenant: "DEFAULT".into(),
            version: HawkbitVersion::HEAD,
            polling_ms: 5 * 60 * 1000,
            min_polling_ms: 30 * 1000,
            gateway_token: None,
            target_token_enabled: true,
            anonymous: false,
            trusted_authorities: None,
            download_link_host: None,
            action_link_host: None,
            max_status_entries_per_action: 1000,
            max_messages_per_status: 50,
            max_attributes_per_target: 100,
            autoclose_obsolete: false,
            skip_artifact_access_check: false,
            maintenance_poll_count: 3,
            polling_deviation_pct: 0,
        }
    }
}

/// Why a DDI request is refused; `ddi` maps each to hawkBit's status code and body.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DdiError {
    /// 404 with an empty body (`ResponseEntity.notFound()`).
    #[error("not found")]
    NotFound,
    /// 404 with an ExceptionInfo body (EntityNotFoundException).
    #[error("{kind} with given identifier {{{id}}} does not exist.")]
    EntityNotFound { kind: &'static str, id: String },
    /// 410 Gone, empty body: feedback for a closed action.
    #[error("action is closed")]
    Gone,
    /// 400 `hawkbit.server.error.rest.body.notReadable`.
    #[error("{0}")]
    NotReadable(String),
    /// 400 `hawkbit.server.error.repo.constraintViolation`.
    #[error("{0}")]
    ConstraintViolation(String),
    /// 400 `hawkbit.server.error.repo.invalidTargetAttributes`.
    #[error("{0}")]
    InvalidAttributes(String),
    /// 429 (>= 0.10.0) / 403 `hawkbit.server.error.quota.tooManyEntries`.
    #[error("{0}")]
    Quota(String),
    /// 405 `hawkbit.server.error.action.notCancelable`.
    #[error("action {0} is not canceling")]
    NotCancelable(u64),
    /// 409 `hawkbit.server.error.repo.autoConfAlreadyActive`.
    #[error("auto-confirmation is already active for device {0}")]
    AutoConfirmActive(String),
}

/// A management request that cannot be done.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MgmtError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
}

/// How to assign a distribution set (management side).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    #[serde(rename = "type")]
    pub action_type: ActionType,
    /// For `timeforced`: when the action becomes forced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_at_ms: Option<Millis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceWindow>,
    /// Start in WAIT_FOR_CONFIRMATION (unless the target has auto-confirm on).
    #[serde(default)]
    pub confirmation_required: bool,
    /// A weighted assignment is a multi-assignment: the target's other active actions stay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u16>,
}

/// hawkBit's `action-weight-if-absent`: an action without weight ranks as the heaviest.
pub const WEIGHT_IF_ABSENT: u16 = 1000;

impl Assignment {
    pub fn new(action_type: ActionType) -> Self {
        Assignment {
            action_type,
            forced_at_ms: None,
            maintenance: None,
            confirmation_required: false,
            weight: None,
        }
    }
    pub fn forced() -> Self {
        Self::new(ActionType::Forced)
    }
    pub fn soft() -> Self {
        Self::new(ActionType::Soft)
    }
    pub fn download_only() -> Self {
        Self::new(ActionType::Downloadonly)
    }
    /// Soft until `forced_at_ms`, forced afterwards.
    pub fn time_forced(forced_at_ms: Millis) -> Self {
        Assignment {
            forced_at_ms: Some(forced_at_ms),
            ..Self::new(ActionType::Timeforced)
        }
    }
    pub fn with_maintenance(mut self, window: MaintenanceWindow) -> Self {
        self.maintenance = Some(window);
        self
    }
    pub fn with_confirmation(mut self) -> Self {
        self.confirmation_required = true;
        self
    }
    /// A multi-assignment with this weight (0..=1000).
    pub fn with_weight(mut self, weight: u16) -> Self {
        self.weight = Some(weight);
        self
    }
}

/// Feedback body of deployment and cancel feedback (`DdiActionFeedback`), strictly typed.
#[derive(Debug, Deserialize)]
pub struct ActionFeedback {
    #[serde(default)]
    pub id: Option<serde_json::Value>,
    #[serde(default)]
    pub timestamp: Option<i64>,
    pub status: FeedbackStatus,
}

#[derive(Debug, Deserialize)]
pub struct FeedbackStatus {
    pub execution: Execution,
    pub result: FeedbackResult,
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub details: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
pub struct FeedbackResult {
    pub finished: Finished,
    #[serde(default)]
    pub progress: Option<serde_json::Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Execution {
    Closed,
    Proceeding,
    Canceled,
    Scheduled,
    Rejected,
    Resumed,
    Downloaded,
    Download,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finished {
    Success,
    Failure,
    None,
}

/// `DdiConfirmationFeedback`.
#[derive(Debug, Deserialize)]
pub struct ConfirmationFeedback {
    pub confirmation: Confirmation,
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub details: Option<Vec<String>>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Confirmation {
    Confirmed,
    Denied,
}

/// `DdiConfigData` update mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpdateMode {
    #[default]
    Merge,
    Replace,
    Remove,
}

const UPDATE_SERVER: &str = "Update Server: ";
const MAX_DETAIL_LEN: usize = 512;
const MAX_HISTORY: usize = 100;
/// Who the server says initiated assignments.
pub const INITIATOR: &str = "ddi-sim";

/// The whole server state (serialized as the `--state-file`).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub config: Config,
    pub targets: BTreeMap<String, Target>,
    pub modules: BTreeMap<u64, SoftwareModule>,
    pub distributions: BTreeMap<u64, Distribution>,
    pub actions: BTreeMap<u64, Action>,
    pub faults: Vec<Fault>,
    #[serde(default)]
    pub next_id: u64,
    /// The latest DDI requests, oldest first (at most [`REQUEST_LOG_LEN`]; not persisted).
    #[serde(skip)]
    pub requests: VecDeque<RequestRecord>,
    /// Requests logged so far (the last one's [`RequestRecord::seq`]).
    #[serde(skip)]
    pub requests_logged: u64,
}

/// How many requests [`State::requests`] keeps.
pub const REQUEST_LOG_LEN: usize = 1000;

/// One DDI request as it arrived, before faults and authentication act on it, and how it was
/// answered (filled in once the answer's head is ready; the body may still be streaming).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Assigned by the server when it logs the request: 1, 2, ...
    #[serde(default)]
    pub seq: u64,
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub endpoint: Endpoint,
    pub controller_id: String,
    /// Header names in lower case; values that are not text are left out, repeated headers
    /// joined with `, `.
    pub headers: BTreeMap<String, String>,
    /// The answer's status (None while unanswered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The answer's announced body length (`Content-Length`; None for a multipart body).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body_len: Option<u64>,
}

impl RequestRecord {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// Splits device details into <= 512-char messages and rejects HTML-like markup (hawkBit's
/// `@ValidString`).
fn device_messages(details: Option<&Vec<String>>) -> Result<Vec<String>, DdiError> {
    let mut out = Vec::new();
    for d in details.into_iter().flatten() {
        if looks_like_markup(d) {
            return Err(DdiError::ConstraintViolation(format!(
                "details contain markup, which is not allowed: {d:?}"
            )));
        }
        let chars: Vec<char> = d.chars().collect();
        if chars.is_empty() {
            out.push(String::new());
        }
        for chunk in chars.chunks(MAX_DETAIL_LEN) {
            out.push(chunk.iter().collect());
        }
    }
    Ok(out)
}

/// `<tag`, `</tag` or `<!` followed later by `>`: what jsoup's empty safelist strips.
fn looks_like_markup(s: &str) -> bool {
    let b = s.as_bytes();
    for (i, c) in b.iter().enumerate() {
        if *c == b'<' {
            if let Some(n) = b.get(i + 1) {
                if (n.is_ascii_alphabetic() || *n == b'/' || *n == b'!')
                    && b[i + 1..].contains(&b'>')
                {
                    return true;
                }
            }
        }
    }
    false
}

fn attribute_ok(s: &str) -> bool {
    s.chars().count() <= 128
        && s.chars().all(|c| {
            c.is_ascii_alphanumeric()
                || c.is_ascii_whitespace()
                || "_-!@#$%^&*()+=[]{}|;:'\",.<>/\\?".contains(c)
        })
}

impl State {
    /// Fresh state with this configuration.
    pub fn new(config: Config) -> State {
        State {
            config,
            next_id: 1,
            ..State::default()
        }
    }

    /// Adds a request to the log, dropping the oldest past [`REQUEST_LOG_LEN`]; returns its
    /// sequence number.
    pub fn log_request(&mut self, mut record: RequestRecord) -> u64 {
        if self.requests.len() == REQUEST_LOG_LEN {
            self.requests.pop_front();
        }
        self.requests_logged += 1;
        record.seq = self.requests_logged;
        self.requests.push_back(record);
        self.requests_logged
    }

    /// Records the answer to request `seq` (if it is still in the log).
    pub fn log_answer(
        &mut self,
        seq: u64,
        status: u16,
        body_len: Option<u64>,
    ) -> Option<&RequestRecord> {
        let record = self.requests.iter_mut().rev().find(|r| r.seq == seq)?;
        record.status = Some(status);
        record.body_len = body_len;
        Some(record)
    }

    fn alloc_id(&mut self) -> u64 {
        self.next_id = self.next_id.max(1);
        let id = self.next_id;
        self.next_id += 1;
        id
    }

    // ---------------------------------------------------------------- management operations

    /// Creates a target; a token is generated when `token` is None. Returns the token.
    pub fn create_target(
        &mut self,
        controller_id: &str,
        token: Option<String>,
    ) -> Result<String, MgmtError> {
        if controller_id.is_empty()
            || controller_id.chars().count() > 256
            || controller_id.chars().any(char::is_whitespace)
            || controller_id.contains('/')
        {
            return Err(MgmtError::Invalid(format!(
                "invalid controller id {controller_id:?}: 1-256 characters, no whitespace or '/'"
            )));
        }
        if self.targets.contains_key(controller_id) {
            return Err(MgmtError::Conflict(format!(
                "target {controller_id} already exists"
            )));
        }
        let token = token.unwrap_or_else(random_token);
        self.insert_target(controller_id, Some(token.clone()));
        Ok(token)
    }

    fn insert_target(&mut self, controller_id: &str, token: Option<String>) {
        self.targets.insert(
            controller_id.to_string(),
            Target {
                controller_id: controller_id.to_string(),
                token,
                attributes: BTreeMap::new(),
                request_attributes: true,
                auto_confirm: None,
                installed_action: None,
                installation_date: None,
                last_poll_ms: None,
                poll_count: 0,
                polling_ms: None,
            },
        );
    }

    /// Creates a software module; returns its id.
    pub fn create_module(&mut self, part: &str, name: &str, version: &str) -> u64 {
        let id = self.alloc_id();
        self.modules.insert(
            id,
            SoftwareModule {
                id,
                part: part.to_string(),
                name: name.to_string(),
                version: version.to_string(),
                metadata: Vec::new(),
                encrypted: false,
                artifacts: Vec::new(),
            },
        );
        id
    }

    /// Adds (or replaces, by filename) an artifact of a module.
    pub fn add_artifact(&mut self, module: u64, artifact: Artifact) -> Result<(), MgmtError> {
        if artifact.filename.is_empty() || artifact.filename.contains('/') {
            return Err(MgmtError::Invalid(format!(
                "invalid artifact filename {:?}",
                artifact.filename
            )));
        }
        let m = self
            .modules
            .get_mut(&module)
            .ok_or_else(|| MgmtError::NotFound(format!("software module {module}")))?;
        m.artifacts.retain(|a| a.filename != artifact.filename);
        m.artifacts.push(artifact);
        Ok(())
    }

    /// Creates a distribution set of existing modules; returns its id.
    pub fn create_distribution(
        &mut self,
        name: &str,
        version: &str,
        modules: &[u64],
    ) -> Result<u64, MgmtError> {
        for m in modules {
            if !self.modules.contains_key(m) {
                return Err(MgmtError::NotFound(format!("software module {m}")));
            }
        }
        let id = self.alloc_id();
        self.distributions.insert(
            id,
            Distribution {
                id,
                name: name.to_string(),
                version: version.to_string(),
                modules: modules.to_vec(),
            },
        );
        Ok(id)
    }

    /// Assigns a distribution set: older active actions of the target are canceled (CANCELING)
    /// or, with `autoclose_obsolete`, closed as CANCELED. Returns the new action id.
    pub fn assign(
        &mut self,
        target: &str,
        distribution: u64,
        a: &Assignment,
        now: Millis,
    ) -> Result<u64, MgmtError> {
        if !self.targets.contains_key(target) {
            return Err(MgmtError::NotFound(format!("target {target}")));
        }
        if !self.distributions.contains_key(&distribution) {
            return Err(MgmtError::NotFound(format!(
                "distribution set {distribution}"
            )));
        }
        if a.action_type == ActionType::Downloadonly
            && !self.config.version.supports_download_only()
        {
            return Err(MgmtError::Invalid(format!(
                "hawkBit {} has no download-only actions (0.3.0M3+)",
                self.config.version
            )));
        }
        if a.action_type == ActionType::Timeforced && a.forced_at_ms.is_none() {
            return Err(MgmtError::Invalid(
                "a timeforced assignment needs forced_at_ms".into(),
            ));
        }
        if let Some(w) = a.maintenance {
            if w.duration_ms <= 0 {
                return Err(MgmtError::Invalid(
                    "maintenance window duration must be positive".into(),
                ));
            }
            if w.lapsed(now) {
                return Err(MgmtError::Invalid(
                    "maintenance schedule has no future window".into(),
                ));
            }
        }
        if a.weight.is_some_and(|w| w > WEIGHT_IF_ABSENT) {
            return Err(MgmtError::Invalid(format!(
                "weight must be 0..={WEIGHT_IF_ABSENT}"
            )));
        }
        let autoclose = self.config.autoclose_obsolete;
        let multi_assignment = a.weight.is_some();
        for old in self.actions.values_mut() {
            if !multi_assignment
                && old.target == target
                && old.active
                && old.status != ActionStatus::Canceling
            {
                if autoclose {
                    old.push_status(
                        now,
                        ActionStatus::Canceled,
                        vec![format!(
                            "{UPDATE_SERVER}close obsolete action due to new update"
                        )],
                        None,
                    );
                    old.set_status(ActionStatus::Canceled);
                } else {
                    old.push_status(
                        now,
                        ActionStatus::Canceling,
                        vec![format!(
                            "{UPDATE_SERVER}cancel obsolete action due to new update"
                        )],
                        None,
                    );
                    old.set_status(ActionStatus::Canceling);
                }
            }
        }
        let auto_confirm = self.targets[target].auto_confirm.clone();
        let id = self.alloc_id();
        let mut action = Action {
            id,
            target: target.to_string(),
            distribution,
            action_type: a.action_type,
            forced_at_ms: a.forced_at_ms,
            maintenance: a.maintenance,
            status: ActionStatus::Running,
            active: true,
            retrieved: false,
            weight: a.weight,
            created_ms: now,
            history: Vec::new(),
            feedback: Vec::new(),
        };
        action.push_status(
            now,
            ActionStatus::Running,
            vec![format!("Assignment initiated by user '{INITIATOR}'")],
            None,
        );
        if a.confirmation_required {
            match auto_confirm {
                Some(ac) => action.push_status(
                    now,
                    ActionStatus::Running,
                    vec![format!(
                        "Assignment automatically confirmed by initiator '{}'. \n\nAuto confirmation activated by system user: '{}' \n\nRemark: {}",
                        ac.initiator.clone().unwrap_or_default(),
                        INITIATOR,
                        ac.remark.clone().unwrap_or_default()
                    )],
                    None,
                ),
                None => {
                    action.push_status(
                        now,
                        ActionStatus::WaitForConfirmation,
                        vec!["Waiting for the confirmation by the device before processing with the deployment".into()],
                        None,
                    );
                    action.set_status(ActionStatus::WaitForConfirmation);
                }
            }
        }
        self.actions.insert(id, action);
        Ok(id)
    }

    /// Operator cancel: an active action becomes CANCELING; `force` quits a CANCELING action
    /// (closed as CANCELED without the device).
    pub fn cancel(&mut self, action: u64, force: bool, now: Millis) -> Result<(), MgmtError> {
        let a = self
            .actions
            .get_mut(&action)
            .ok_or_else(|| MgmtError::NotFound(format!("action {action}")))?;
        if !a.active {
            return Err(MgmtError::Conflict(format!(
                "action {action} is closed ({}) and cannot be canceled",
                a.status.name()
            )));
        }
        if force {
            if a.status != ActionStatus::Canceling {
                return Err(MgmtError::Conflict(format!(
                    "action {action} must be canceled before it can be force-quit"
                )));
            }
            a.push_status(
                now,
                ActionStatus::Canceled,
                vec![format!("{UPDATE_SERVER}A force quit has been performed.")],
                None,
            );
            a.set_status(ActionStatus::Canceled);
            return Ok(());
        }
        if a.status == ActionStatus::Canceling {
            return Ok(());
        }
        a.push_status(
            now,
            ActionStatus::Canceling,
            vec![format!(
                "{UPDATE_SERVER}cancel requested by user '{INITIATOR}'"
            )],
            None,
        );
        a.set_status(ActionStatus::Canceling);
        Ok(())
    }

    /// Operator switches auto-confirm (management side).
    pub fn set_auto_confirm(
        &mut self,
        target: &str,
        active: bool,
        initiator: Option<String>,
        remark: Option<String>,
        now: Millis,
    ) -> Result<(), MgmtError> {
        if !self.targets.contains_key(target) {
            return Err(MgmtError::NotFound(format!("target {target}")));
        }
        if active {
            self.activate_auto_confirm(target, initiator, remark, now);
        } else if let Some(t) = self.targets.get_mut(target) {
            t.auto_confirm = None;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- DDI operations

    /// Checks DDI credentials: `Ok(true)` authenticated; `Ok(false)` = 401. A GatewayToken (or
    /// anonymous access) for an unknown target on an auto-registering endpoint creates it.
    pub fn authenticate(
        &mut self,
        controller_id: &str,
        authorization: Option<&str>,
        headers: &BTreeMap<String, String>,
        register: bool,
    ) -> bool {
        let cfg = &self.config;
        let header_ok = self.proxy_headers_ok(controller_id, headers);
        let gateway_ok = authorization
            .and_then(|h| h.strip_prefix("GatewayToken "))
            .is_some_and(|k| cfg.gateway_token.as_deref() == Some(k));
        let anonymous_ok = cfg.anonymous && cfg.version.supports_anonymous();
        let target_ok = cfg.target_token_enabled
            && authorization
                .and_then(|h| h.strip_prefix("TargetToken "))
                .is_some_and(|tok| {
                    self.targets
                        .get(controller_id)
                        .and_then(|t| t.token.as_deref())
                        .is_some_and(|expected| expected == tok)
                });
        if target_ok {
            return true;
        }
        if header_ok || gateway_ok || anonymous_ok {
            if register && !self.targets.contains_key(controller_id) {
                self.insert_target(controller_id, None);
            }
            return true;
        }
        false
    }

    /// Client-certificate identity forwarded by a TLS-terminating proxy (spec §3.3): the
    /// controller-id header equals the path's id and an authority header is trusted. Header
    /// names changed in 1.0.0. `headers` has lower-case names.
    fn proxy_headers_ok(&self, controller_id: &str, headers: &BTreeMap<String, String>) -> bool {
        let Some(trusted) = &self.config.trusted_authorities else {
            return false;
        };
        let is_trusted = |v: &str| {
            let v = v.trim();
            trusted.iter().any(|t| t.trim().eq_ignore_ascii_case(v))
        };
        let new_names = self.config.version >= HawkbitVersion::release(1, 0, 0);
        let (id_header, indexed) = if new_names {
            ("x-controller-id", "x-authority-")
        } else {
            ("x-ssl-client-cn", "x-ssl-issuer-hash-")
        };
        if headers.get(id_header).map(String::as_str) != Some(controller_id) {
            return false;
        }
        if new_names {
            if let Some(list) = headers.get("x-authority") {
                if list.split([',', ';']).any(is_trusted) {
                    return true;
                }
            }
        }
        // Indexed headers start at 1 (<= 0.10.0) or 0 or 1 (1.0.0+); the first gap ends them.
        let starts: &[usize] = if new_names { &[0, 1] } else { &[1] };
        starts.iter().any(|start| {
            (*start..)
                .map_while(|i| headers.get(&format!("{indexed}{i}")))
                .any(|v| is_trusted(v))
        })
    }

    fn target_mut(&mut self, controller_id: &str) -> Result<&mut Target, DdiError> {
        self.targets
            .get_mut(controller_id)
            .ok_or(DdiError::EntityNotFound {
                kind: "Target",
                id: controller_id.to_string(),
            })
    }

    /// The action that decides the poll link: the active one with the highest weight, the oldest
    /// among equals (hawkBit's `findActiveActionWithHighestWeight`).
    pub fn current_action(&self, controller_id: &str) -> Option<&Action> {
        self.actions
            .values()
            .filter(|a| {
                a.target == controller_id && a.active && a.status != ActionStatus::Scheduled
            })
            .max_by_key(|a| {
                (
                    a.weight.unwrap_or(WEIGHT_IF_ABSENT),
                    std::cmp::Reverse(a.id),
                )
            })
    }

    /// Registers a poll (and cancels actions whose maintenance schedule lapsed).
    pub fn register_poll(&mut self, controller_id: &str, now: Millis) -> Result<(), DdiError> {
        let t = self.target_mut(controller_id)?;
        t.last_poll_ms = Some(now);
        t.poll_count += 1;
        let lapsed: Vec<u64> = self
            .actions
            .values()
            .filter(|a| {
                a.target == controller_id
                    && a.active
                    && a.status != ActionStatus::Canceling
                    && a.maintenance.is_some_and(|w| w.lapsed(now))
            })
            .map(|a| a.id)
            .collect();
        for id in lapsed {
            if let Some(a) = self.actions.get_mut(&id) {
                a.push_status(
                    now,
                    ActionStatus::Canceling,
                    vec![format!(
                        "{UPDATE_SERVER}maintenance window is expired, cancel action"
                    )],
                    None,
                );
                a.set_status(ActionStatus::Canceling);
            }
        }
        Ok(())
    }

    /// The polling interval suggested to this target now (spec §4.3 step 3).
    pub fn poll_sleep_ms(&self, controller_id: &str, now: Millis) -> i64 {
        let base = self
            .targets
            .get(controller_id)
            .and_then(|t| t.polling_ms)
            .unwrap_or(self.config.polling_ms);
        let normal = match self.config.polling_deviation_pct {
            0 => base,
            pct => {
                // Uniform in [-pct%, +pct%] with ms granularity, never below the minimum.
                let span = base * i64::from(pct.min(100)) / 100;
                let offset = (random_u64() % (2 * span as u64 + 1)) as i64 - span;
                (base + offset).max(self.config.min_polling_ms.min(base))
            }
        };
        let window_start = self
            .current_action(controller_id)
            .and_then(|a| a.maintenance)
            .and_then(|w| w.current_or_next(now))
            .map(|(s, _)| s);
        match window_start {
            Some(start) if now < start => {
                let count = self.config.maintenance_poll_count.max(1);
                ((start - now) / count)
                    .min(normal)
                    .max(self.config.min_polling_ms.min(normal))
            }
            _ => normal,
        }
    }

    /// Looks up an action of this target (404 otherwise).
    pub fn action_of(&self, controller_id: &str, action_id: u64) -> Result<&Action, DdiError> {
        if !self.targets.contains_key(controller_id) {
            return Err(DdiError::EntityNotFound {
                kind: "Target",
                id: controller_id.to_string(),
            });
        }
        match self.actions.get(&action_id) {
            Some(a) if a.target == controller_id => Ok(a),
            _ => Err(DdiError::EntityNotFound {
                kind: "Action",
                id: action_id.to_string(),
            }),
        }
    }

    fn action_of_mut(
        &mut self,
        controller_id: &str,
        action_id: u64,
    ) -> Result<&mut Action, DdiError> {
        self.action_of(controller_id, action_id)?;
        Ok(self.actions.get_mut(&action_id).expect("checked above"))
    }

    /// GET deploymentBase: 404 while canceling or waiting for confirmation; registers RETRIEVED
    /// once, closed actions too (hawkBit's `registerRetrieved` does not look at `active`: a closed
    /// action becomes RETRIEVED and so loses the target's `installedBase` link).
    pub fn retrieve_deployment(
        &mut self,
        controller_id: &str,
        action_id: u64,
        now: Millis,
    ) -> Result<&Action, DdiError> {
        let a = self.action_of_mut(controller_id, action_id)?;
        match a.status {
            ActionStatus::Canceling
            | ActionStatus::Canceled
            | ActionStatus::WaitForConfirmation => return Err(DdiError::NotFound),
            _ => {}
        }
        if !a.retrieved {
            a.push_status(now, ActionStatus::Retrieved, vec![format!("{UPDATE_SERVER}Target retrieved update action and should start now the download.")], None);
            a.status = ActionStatus::Retrieved;
            a.retrieved = true;
        }
        Ok(a)
    }

    fn check_status_quota(
        &self,
        a: &Action,
        messages: usize,
        is_final: bool,
    ) -> Result<(), DdiError> {
        if messages > self.config.max_messages_per_status {
            return Err(DdiError::Quota(format!(
                "Quota exceeded: Cannot assign {messages} more ActionStatus messages; maximum is {}",
                self.config.max_messages_per_status
            )));
        }
        if !is_final && a.intermediate_entries() >= self.config.max_status_entries_per_action {
            return Err(DdiError::Quota(format!(
                "Quota exceeded: Cannot add more ActionStatus entries for Action {}; maximum is {}",
                a.id, self.config.max_status_entries_per_action
            )));
        }
        Ok(())
    }

    fn check_feedback_id(&self, fb: &ActionFeedback, action_id: u64) -> Result<(), DdiError> {
        if !self.config.version.feedback_id_required() {
            return Ok(());
        }
        let id = match &fb.id {
            Some(serde_json::Value::String(s)) => s.trim().parse::<u64>().ok(),
            Some(serde_json::Value::Number(n)) => n.as_u64(),
            None => return Err(DdiError::NotReadable("feedback id is required".into())),
            _ => None,
        };
        if id != Some(action_id) {
            return Err(DdiError::NotFound);
        }
        Ok(())
    }

    fn entry_messages(
        &self,
        fb: &ActionFeedback,
        default: String,
    ) -> Result<Vec<String>, DdiError> {
        let mut messages = device_messages(fb.status.details.as_ref())?;
        if let (Some(code), true) = (fb.status.code, self.config.version.supports_status_code()) {
            messages.push(format!("Device reported status code: {code}"));
        }
        if messages.is_empty() {
            messages.push(default);
        }
        Ok(messages)
    }

    fn entry_time(&self, fb: &ActionFeedback, now: Millis) -> Millis {
        match fb.timestamp {
            Some(t) if self.config.version.uses_feedback_timestamp() => t,
            _ => now,
        }
    }

    /// POST deploymentBase feedback (spec §6.2/§14). `raw` is the body as received.
    pub fn deployment_feedback(
        &mut self,
        controller_id: &str,
        action_id: u64,
        fb: &ActionFeedback,
        raw: serde_json::Value,
        now: Millis,
    ) -> Result<(), DdiError> {
        let a = self.action_of(controller_id, action_id)?;
        self.check_feedback_id(fb, action_id)?;
        if !a.active {
            return Err(DdiError::Gone);
        }
        if a.status == ActionStatus::WaitForConfirmation {
            return Err(DdiError::NotFound);
        }
        let exec = fb.status.execution;
        let finished = fb.status.result.finished;
        let download_only = a.action_type == ActionType::Downloadonly;
        let (entry, default, closes) = match exec {
            Execution::Closed if finished == Finished::Failure => (
                ActionStatus::Error,
                "Target reported CLOSED with ERROR!",
                true,
            ),
            Execution::Closed => (
                ActionStatus::Finished,
                "Target reported CLOSED with OK!",
                true,
            ),
            Execution::Downloaded => (
                ActionStatus::Downloaded,
                "Target confirmed download finished.",
                download_only,
            ),
            Execution::Download => (
                ActionStatus::Download,
                "Target confirmed download start.",
                false,
            ),
            Execution::Proceeding => (ActionStatus::Running, "Target reported PROCEEDING.", false),
            Execution::Scheduled => (ActionStatus::Running, "Target reported SCHEDULED.", false),
            Execution::Resumed => (ActionStatus::Running, "Target reported RESUMED.", false),
            Execution::Rejected => (ActionStatus::Warning, "Target REJECTED update.", false),
            Execution::Canceled => (
                ActionStatus::Canceled,
                "Target confirmed cancellation.",
                false,
            ),
        };
        let messages = self.entry_messages(fb, format!("{UPDATE_SERVER}{default}"))?;
        self.check_status_quota(
            a,
            messages.len(),
            matches!(entry, ActionStatus::Finished | ActionStatus::Error),
        )?;
        let time = self.entry_time(fb, now);
        let a = self.actions.get_mut(&action_id).expect("checked");
        a.push_status(time, entry, messages, fb.status.code);
        a.feedback.push(FeedbackRecord {
            time_ms: now,
            channel: Channel::Deployment,
            body: raw,
        });
        if closes {
            a.set_status(entry);
            let t = self.targets.get_mut(controller_id).expect("checked");
            if entry != ActionStatus::Error {
                t.request_attributes = true;
            }
            if entry == ActionStatus::Finished {
                // hawkBit only moves the installed DS forward in (device) time (spec §6.4).
                let newer = match t.installation_date {
                    None => true,
                    Some(prev) => prev < time,
                };
                if newer {
                    t.installed_action = Some(action_id);
                    t.installation_date = Some(time);
                }
            }
        }
        Ok(())
    }

    /// GET cancelAction: 200 only while CANCELING/CANCELED.
    pub fn retrieve_cancel(
        &mut self,
        controller_id: &str,
        action_id: u64,
        now: Millis,
    ) -> Result<u64, DdiError> {
        let a = self.action_of_mut(controller_id, action_id)?;
        if !matches!(a.status, ActionStatus::Canceling | ActionStatus::Canceled) {
            return Err(DdiError::NotFound);
        }
        if !a.retrieved {
            a.push_status(now, ActionStatus::Retrieved, vec![format!("{UPDATE_SERVER}Target retrieved cancel action and should start now the cancellation.")], None);
            a.retrieved = true;
        }
        Ok(a.id)
    }

    /// POST cancelAction feedback (spec §7.2).
    pub fn cancel_feedback(
        &mut self,
        controller_id: &str,
        action_id: u64,
        fb: &ActionFeedback,
        raw: serde_json::Value,
        now: Millis,
    ) -> Result<(), DdiError> {
        let a = self.action_of(controller_id, action_id)?;
        self.check_feedback_id(fb, action_id)?;
        if !matches!(a.status, ActionStatus::Canceling | ActionStatus::Canceled) {
            return Err(DdiError::NotCancelable(action_id));
        }
        let finished = fb.status.result.finished;
        let (entry, default, new_status) = match fb.status.execution {
            Execution::Closed if finished == Finished::Failure => (
                ActionStatus::Error,
                "Cancellation failed, continuing with the update.",
                Some(ActionStatus::Running),
            ),
            Execution::Closed => (
                ActionStatus::Canceled,
                "Cancellation completion is finished successfully.",
                Some(ActionStatus::Canceled),
            ),
            Execution::Rejected => (
                ActionStatus::CancelRejected,
                "Target rejected the cancellation.",
                Some(ActionStatus::Running),
            ),
            Execution::Canceled => (
                ActionStatus::Warning,
                "Target reported cancel for a cancel which is not supported by the server.",
                None,
            ),
            _ => (
                ActionStatus::Running,
                "Target reported progress of the cancellation.",
                None,
            ),
        };
        let messages = self.entry_messages(fb, format!("{UPDATE_SERVER}{default}"))?;
        self.check_status_quota(a, messages.len(), new_status.is_some())?;
        let time = self.entry_time(fb, now);
        let a = self.actions.get_mut(&action_id).expect("checked");
        a.push_status(time, entry, messages, fb.status.code);
        a.feedback.push(FeedbackRecord {
            time_ms: now,
            channel: Channel::Cancel,
            body: raw,
        });
        if let Some(s) = new_status {
            a.set_status(s);
        }
        Ok(())
    }

    /// PUT configData.
    pub fn config_data(
        &mut self,
        controller_id: &str,
        data: BTreeMap<String, Option<String>>,
        mode: UpdateMode,
    ) -> Result<(), DdiError> {
        let max = self.config.max_attributes_per_target;
        let t = self.target_mut(controller_id)?;
        for (k, v) in &data {
            if !attribute_ok(k) || v.as_deref().is_some_and(|v| !attribute_ok(v)) {
                return Err(DdiError::InvalidAttributes(format!(
                    "Target attributes invalid: key {k:?} or its value is too long (max 128) or has characters outside the allowed set"
                )));
            }
        }
        let mut attrs = t.attributes.clone();
        match mode {
            UpdateMode::Merge => {
                for (k, v) in data {
                    match v {
                        Some(v) => {
                            attrs.insert(k, v);
                        }
                        None => {
                            attrs.remove(&k);
                        }
                    }
                }
            }
            UpdateMode::Replace => {
                attrs = data
                    .into_iter()
                    .filter_map(|(k, v)| v.map(|v| (k, v)))
                    .collect();
            }
            UpdateMode::Remove => {
                for k in data.keys() {
                    attrs.remove(k);
                }
            }
        }
        if attrs.len() > max {
            return Err(DdiError::Quota(format!(
                "Quota exceeded: Cannot assign {} more attributes to Target {controller_id}; maximum is {max}",
                attrs.len()
            )));
        }
        t.attributes = attrs;
        t.request_attributes = false;
        Ok(())
    }

    /// GET installedBase/{id}: only a closed, non-canceled action.
    pub fn installed_action(
        &self,
        controller_id: &str,
        action_id: u64,
    ) -> Result<&Action, DdiError> {
        let a = self.action_of(controller_id, action_id)?;
        if a.active || matches!(a.status, ActionStatus::Canceled | ActionStatus::Canceling) {
            return Err(DdiError::NotFound);
        }
        Ok(a)
    }

    /// PUT installedBase: returns true when a new (offline) assignment was created (201).
    pub fn put_installed_base(
        &mut self,
        controller_id: &str,
        name: &str,
        version: &str,
        now: Millis,
    ) -> Result<bool, DdiError> {
        self.target_mut(controller_id)?;
        let ds = self
            .distributions
            .values()
            .find(|d| d.name == name && d.version == version)
            .map(|d| d.id)
            .ok_or(DdiError::EntityNotFound {
                kind: "DistributionSet",
                id: format!("{name}:{version}"),
            })?;
        let installed_ds = self.targets[controller_id]
            .installed_action
            .and_then(|a| self.actions.get(&a))
            .map(|a| a.distribution);
        if installed_ds == Some(ds) {
            return Ok(false);
        }
        let id = self
            .assign(controller_id, ds, &Assignment::forced(), now)
            .map_err(|e| DdiError::ConstraintViolation(e.to_string()))?;
        let a = self.actions.get_mut(&id).expect("just created");
        a.push_status(
            now,
            ActionStatus::Finished,
            vec![format!(
                "{UPDATE_SERVER}Offline installed version {name}:{version}"
            )],
            None,
        );
        a.set_status(ActionStatus::Finished);
        let t = self.targets.get_mut(controller_id).expect("checked");
        t.installed_action = Some(id);
        t.installation_date = Some(now);
        Ok(true)
    }

    /// The action waiting for confirmation that the poll would show, if any.
    pub fn confirmation_action(&self, controller_id: &str) -> Option<u64> {
        self.current_action(controller_id)
            .filter(|a| a.status == ActionStatus::WaitForConfirmation)
            .map(|a| a.id)
    }

    /// GET confirmationBase/{id}: only while waiting for confirmation.
    pub fn confirmation_of(
        &self,
        controller_id: &str,
        action_id: u64,
    ) -> Result<&Action, DdiError> {
        let a = self.action_of(controller_id, action_id)?;
        if a.status != ActionStatus::WaitForConfirmation {
            return Err(DdiError::NotFound);
        }
        Ok(a)
    }

    /// POST confirmationBase/{id}/feedback (spec §10.3).
    pub fn confirmation_feedback(
        &mut self,
        controller_id: &str,
        action_id: u64,
        fb: &ConfirmationFeedback,
        raw: serde_json::Value,
        now: Millis,
    ) -> Result<(), DdiError> {
        let a = self.action_of(controller_id, action_id)?;
        if !a.active {
            return Err(DdiError::Gone);
        }
        let revoke = fb.confirmation == Confirmation::Denied
            && matches!(a.status, ActionStatus::Running | ActionStatus::Retrieved)
            && self.config.version.denied_revokes_confirmation();
        if a.status != ActionStatus::WaitForConfirmation && !revoke {
            return Err(DdiError::NotFound);
        }
        let mut messages = device_messages(fb.details.as_ref())?;
        if let Some(code) = fb.code {
            messages.push(format!("Confirmation status code: {code}"));
        }
        self.check_status_quota(a, messages.len(), false)?;
        let a = self.actions.get_mut(&action_id).expect("checked");
        a.feedback.push(FeedbackRecord {
            time_ms: now,
            channel: Channel::Confirmation,
            body: raw,
        });
        match fb.confirmation {
            Confirmation::Confirmed => {
                messages.insert(0, format!("{UPDATE_SERVER}Target confirmed the action."));
                a.push_status(now, ActionStatus::Running, messages, fb.code);
                a.set_status(ActionStatus::Running);
            }
            Confirmation::Denied => {
                messages.insert(0, format!("{UPDATE_SERVER}Target rejected action."));
                a.push_status(now, ActionStatus::WaitForConfirmation, messages, fb.code);
                if revoke {
                    a.set_status(ActionStatus::WaitForConfirmation);
                }
            }
        }
        Ok(())
    }

    fn activate_auto_confirm(
        &mut self,
        controller_id: &str,
        initiator: Option<String>,
        remark: Option<String>,
        now: Millis,
    ) {
        let remark = remark.or_else(|| {
            Some(
                "Initiated using the Device Direct Integration API without providing a remark."
                    .to_string(),
            )
        });
        if let Some(t) = self.targets.get_mut(controller_id) {
            t.auto_confirm = Some(AutoConfirm {
                initiator,
                remark,
                activated_at: now,
            });
        }
        for a in self.actions.values_mut() {
            if a.target == controller_id && a.status == ActionStatus::WaitForConfirmation {
                a.push_status(
                    now,
                    ActionStatus::Running,
                    vec![format!(
                        "{UPDATE_SERVER}Action confirmed by auto-confirmation."
                    )],
                    None,
                );
                a.set_status(ActionStatus::Running);
            }
        }
    }

    /// POST activateAutoConfirm: 409 when already active; confirms waiting actions.
    pub fn ddi_activate_auto_confirm(
        &mut self,
        controller_id: &str,
        initiator: Option<String>,
        remark: Option<String>,
        now: Millis,
    ) -> Result<(), DdiError> {
        let t = self.target_mut(controller_id)?;
        if t.auto_confirm.is_some() {
            return Err(DdiError::AutoConfirmActive(controller_id.to_string()));
        }
        self.activate_auto_confirm(controller_id, initiator, remark, now);
        Ok(())
    }

    /// POST deactivateAutoConfirm: always 200 for a known target.
    pub fn ddi_deactivate_auto_confirm(&mut self, controller_id: &str) -> Result<(), DdiError> {
        self.target_mut(controller_id)?.auto_confirm = None;
        Ok(())
    }

    /// `actionHistory` of an action: (status name, newest-first messages without server ones).
    pub fn action_history(&self, a: &Action, count: i64) -> Option<(String, Vec<String>)> {
        if count == 0 {
            return None;
        }
        let limit = if count < 0 {
            MAX_HISTORY
        } else {
            (count as usize).min(MAX_HISTORY)
        };
        // Newest first; entries with equal times keep "later stored = newer".
        let mut entries: Vec<&StatusEntry> = a.history.iter().rev().collect();
        entries.sort_by_key(|e| std::cmp::Reverse(e.time_ms));
        let messages: Vec<String> = entries
            .iter()
            .flat_map(|e| e.messages.iter())
            .filter(|m| !m.starts_with(UPDATE_SERVER))
            .take(limit)
            .cloned()
            .collect();
        Some((a.status.name().to_string(), messages))
    }

    /// Is a download of this module allowed for this target (spec §12.4)? `range` = Range request.
    pub fn download_allowed(&self, controller_id: &str, module: u64, range: bool) -> bool {
        use super::version::DownloadAccess;
        if self.config.skip_artifact_access_check {
            return true;
        }
        let holding = || {
            self.actions.values().filter(move |a| {
                a.target == controller_id
                    && self
                        .distributions
                        .get(&a.distribution)
                        .is_some_and(|d| d.modules.contains(&module))
            })
        };
        // An action waiting for confirmation is active and not canceling: its artifacts are
        // served (only deploymentBase is hidden).
        let active_ok = || holding().any(|a| a.active && a.status != ActionStatus::Canceling);
        match self.config.version.download_access() {
            DownloadAccess::NewestActionNotCanceling => {
                holding().max_by_key(|a| a.id).is_some_and(|a| {
                    !matches!(a.status, ActionStatus::Canceling | ActionStatus::Canceled)
                })
            }
            DownloadAccess::ActiveAction => active_ok(),
            DownloadAccess::ActiveActionFullOnly => range || active_ok(),
        }
    }

    /// Is the artifact list of this module visible (>= 1.0.4: active or installed action)?
    pub fn artifact_list_allowed(&self, controller_id: &str, module: u64) -> bool {
        if self.config.skip_artifact_access_check || !self.config.version.checks_artifact_list() {
            return true;
        }
        let installed = self
            .targets
            .get(controller_id)
            .and_then(|t| t.installed_action);
        self.actions.values().any(|a| {
            a.target == controller_id
                && (Some(a.id) == installed || (a.active && a.status != ActionStatus::Canceling))
                && self
                    .distributions
                    .get(&a.distribution)
                    .is_some_and(|d| d.modules.contains(&module))
        })
    }

    /// Logs a download as an informational DOWNLOAD status of the action that holds the module.
    pub fn log_download(
        &mut self,
        controller_id: &str,
        module: u64,
        uri: &str,
        now: Millis,
    ) -> Result<(), DdiError> {
        let dists = &self.distributions;
        let id = self
            .actions
            .values()
            .filter(|a| {
                a.target == controller_id
                    && a.active
                    && dists
                        .get(&a.distribution)
                        .is_some_and(|d| d.modules.contains(&module))
            })
            .map(|a| a.id)
            .min();
        let Some(id) = id else { return Ok(()) };
        self.check_status_quota(&self.actions[&id], 1, false)?;
        let a = self.actions.get_mut(&id).expect("found");
        a.push_status(
            now,
            ActionStatus::Download,
            vec![format!("{UPDATE_SERVER}Target downloads {uri}")],
            None,
        );
        Ok(())
    }

    /// Finds an artifact by module and filename.
    pub fn artifact(&self, module: u64, filename: &str) -> Option<&Artifact> {
        self.modules
            .get(&module)?
            .artifacts
            .iter()
            .find(|a| a.filename == filename)
    }
}

/// A random number from the std hasher's per-instance keys (good enough for a test server).
fn random_u64() -> u64 {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    let mut h = RandomState::new().build_hasher();
    h.write_i64(now_ms());
    h.finish()
}

/// 32 random alphanumerics, like hawkBit's generated target tokens.
pub fn random_token() -> String {
    use std::collections::hash_map::RandomState;
    use std::hash::{BuildHasher, Hasher};
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(32);
    while out.len() < 32 {
        let mut h = RandomState::new().build_hasher();
        h.write_u64(now_ms() as u64);
        h.write_usize(out.len());
        let mut v = h.finish();
        for _ in 0..8 {
            if out.len() == 32 {
                break;
            }
            out.push(ALPHABET[(v % ALPHABET.len() as u64) as usize] as char);
            v /= ALPHABET.len() as u64;
        }
    }
    out
}

/// Formats a polling interval like hawkBit: `HH:mm:ss`, or ISO-8601 (`PT36H30M`) for a day or
/// more when `iso` (>= 0.10.0); without `iso` the value is capped at `23:59:59`.
pub fn format_sleep(ms: i64, iso: bool) -> String {
    let ms = ms.max(0);
    const DAY: i64 = 24 * 3600 * 1000;
    if ms >= DAY && iso {
        let total_s = ms / 1000;
        let frac = ms % 1000;
        let (h, m, s) = (total_s / 3600, (total_s % 3600) / 60, total_s % 60);
        let mut out = String::from("PT");
        if h > 0 {
            out.push_str(&format!("{h}H"));
        }
        if m > 0 {
            out.push_str(&format!("{m}M"));
        }
        if s > 0 || frac > 0 {
            if frac > 0 {
                let f = format!("{frac:03}");
                out.push_str(&format!("{s}.{}S", f.trim_end_matches('0')));
            } else {
                out.push_str(&format!("{s}S"));
            }
        }
        return out;
    }
    let s = (ms / 1000).min(DAY / 1000 - 1);
    format!("{:02}:{:02}:{:02}", s / 3600, (s % 3600) / 60, s % 60)
}

/// For the management API: a polling interval given as seconds, `HH:MM:SS` or ISO `PT..`.
pub fn parse_interval(s: &str) -> Option<Duration> {
    let s = s.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    if let Some(rest) = s.strip_prefix("PT") {
        let mut total = 0f64;
        let mut num = String::new();
        for c in rest.chars() {
            match c {
                '0'..='9' | '.' => num.push(c),
                'H' | 'M' | 'S' => {
                    let v: f64 = num.parse().ok()?;
                    num.clear();
                    total += v * match c {
                        'H' => 3600.0,
                        'M' => 60.0,
                        _ => 1.0,
                    };
                }
                _ => return None,
            }
        }
        return if num.is_empty() {
            Some(Duration::from_secs_f64(total))
        } else {
            None
        };
    }
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() == 3 {
        let n: Vec<u64> = parts
            .iter()
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        return Some(Duration::from_secs(n[0] * 3600 + n[1] * 60 + n[2]));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (State, u64) {
        let mut s = State::new(Config::default());
        s.create_target("dev", Some("tok".into())).unwrap();
        let m = s.create_module("os", "fw", "1.0");
        s.add_artifact(
            m,
            Artifact::from_bytes("a.bin", bytes::Bytes::from_static(b"hello")),
        )
        .unwrap();
        let ds = s.create_distribution("fw", "1.0", &[m]).unwrap();
        (s, ds)
    }

    fn fb(json: &str) -> (ActionFeedback, serde_json::Value) {
        (
            serde_json::from_str(json).unwrap(),
            serde_json::from_str(json).unwrap(),
        )
    }

    #[test]
    fn formats_polling_like_hawkbit() {
        assert_eq!(format_sleep(300_000, true), "00:05:00");
        assert_eq!(format_sleep(24 * 3600 * 1000, true), "PT24H");
        assert_eq!(format_sleep((36 * 3600 + 30 * 60) * 1000, true), "PT36H30M");
        assert_eq!(
            format_sleep((25 * 3600 + 12 * 60 + 3) * 1000 + 456, true),
            "PT25H12M3.456S"
        );
        assert_eq!(format_sleep(48 * 3600 * 1000, false), "23:59:59");
        assert_eq!(
            parse_interval("PT36H30M"),
            Some(Duration::from_secs(36 * 3600 + 1800))
        );
        assert_eq!(parse_interval("00:01:05"), Some(Duration::from_secs(65)));
    }

    #[test]
    fn closed_success_finishes_and_later_feedback_is_gone() {
        let (mut s, ds) = setup();
        let id = s.assign("dev", ds, &Assignment::forced(), 0).unwrap();
        let (f, raw) = fb(r#"{"status":{"execution":"closed","result":{"finished":"success"}}}"#);
        s.deployment_feedback("dev", id, &f, raw.clone(), 1)
            .unwrap();
        assert_eq!(s.actions[&id].status, ActionStatus::Finished);
        assert_eq!(s.targets["dev"].installed_action, Some(id));
        assert_eq!(
            s.deployment_feedback("dev", id, &f, raw, 2),
            Err(DdiError::Gone)
        );
    }

    #[test]
    fn cancel_accept_needs_closed_not_canceled() {
        let (mut s, ds) = setup();
        let id = s.assign("dev", ds, &Assignment::soft(), 0).unwrap();
        s.cancel(id, false, 1).unwrap();
        assert_eq!(
            s.retrieve_deployment("dev", id, 2).err(),
            Some(DdiError::NotFound)
        );
        let (f, raw) = fb(r#"{"status":{"execution":"canceled","result":{"finished":"success"}}}"#);
        s.cancel_feedback("dev", id, &f, raw, 3).unwrap();
        assert_eq!(s.actions[&id].status, ActionStatus::Canceling);
        let (f, raw) = fb(r#"{"status":{"execution":"closed","result":{"finished":"success"}}}"#);
        s.cancel_feedback("dev", id, &f, raw, 4).unwrap();
        assert_eq!(s.actions[&id].status, ActionStatus::Canceled);
        assert!(!s.actions[&id].active);
    }

    #[test]
    fn maintenance_window_controls_update_mode() {
        let (mut s, ds) = setup();
        let w = MaintenanceWindow {
            start_ms: 10_000,
            duration_ms: 5_000,
            every_ms: None,
        };
        let id = s
            .assign("dev", ds, &Assignment::forced().with_maintenance(w), 0)
            .unwrap();
        assert_eq!(
            s.actions[&id].deployment_modes(0),
            ("forced", "skip", Some("unavailable"))
        );
        assert_eq!(
            s.actions[&id].deployment_modes(12_000),
            ("forced", "forced", Some("available"))
        );
        assert!(w.lapsed(15_000));
        s.config.min_polling_ms = 1000;
        assert_eq!(s.poll_sleep_ms("dev", 1000), 3000);
    }

    #[test]
    fn file_hashes_agree_with_and_without_coreutils() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![5u8; 3 << 20]).unwrap();
        let a = Artifact::from_file("f", &path).unwrap();
        let b = Artifact::hash_file("f", &path).unwrap();
        let c = Artifact::from_bytes("f", std::fs::read(&path).unwrap().into());
        assert_eq!(
            (&a.sha1, &a.md5, &a.sha256, a.size),
            (&b.sha1, &b.md5, &b.sha256, b.size)
        );
        assert_eq!(
            (&a.sha1, &a.md5, &a.sha256, a.size),
            (&c.sha1, &c.md5, &c.sha256, c.size)
        );
    }

    #[test]
    fn markup_in_details_is_rejected() {
        assert!(looks_like_markup("a <b>bold</b>"));
        assert!(!looks_like_markup("a < b and c > d"));
    }
}
