//! The hawkBit DDI API: a typed model (parsed from private wire structs, see `wire`) and an HTTP
//! client ([`client::DdiClient`]) that follows the server's links.
//!
//! Parsing checks invariants once (sleep intervals parse, action ids are present and agree with
//! their links), so the rest of the agent never sees half-valid data.

pub mod client;
mod wire;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use client::{DdiClient, DdiError};

/// A link the server handed out; followed as is, never rebuilt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Link {
    pub href: String,
}

impl Link {
    /// The action id: the last path segment without query (the reference client's rule).
    pub fn action_id(&self) -> Option<String> {
        let no_query = self.href.split(['?', '#']).next().unwrap_or("");
        let last = no_query.trim_end_matches('/').rsplit('/').next()?;
        if last.is_empty() || !last.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(last.to_string())
    }

    /// The href with `suffix` appended to its path (e.g. `/feedback`), query dropped.
    pub fn join(&self, suffix: &str) -> String {
        let no_query = self.href.split(['?', '#']).next().unwrap_or("");
        format!("{}{}", no_query.trim_end_matches('/'), suffix)
    }
}

/// A DDI model error: the body did not make sense.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    #[error("malformed {what} body: {message}")]
    Json { what: &'static str, message: String },
    #[error("polling sleep \"{0}\" is neither HH:mm:ss nor an ISO-8601 duration")]
    Sleep(String),
    #[error("{what} link \"{href}\" has no numeric action id")]
    LinkId { what: &'static str, href: String },
    #[error("deployment has {count} {what}, more than the {limit} a device update can have")]
    TooMany {
        what: &'static str,
        count: usize,
        limit: usize,
    },
    #[error("{what} body is for action {body} but was fetched for action {expected}")]
    IdMismatch {
        what: &'static str,
        body: String,
        expected: String,
    },
}

/// Parses `HH:mm:ss` (hawkBit <= 0.9) or an ISO-8601 `PT..H..M..S` duration (>= 0.10).
pub fn parse_sleep(text: &str) -> Result<Duration, ModelError> {
    let bad = || ModelError::Sleep(text.to_string());
    let t = text.trim();
    if let Some(rest) = t.strip_prefix("PT").or_else(|| t.strip_prefix("pt")) {
        if rest.is_empty() {
            return Err(bad());
        }
        let mut total = 0f64;
        let mut number = String::new();
        let mut last_unit = 0u8;
        for c in rest.chars() {
            if c.is_ascii_digit() || c == '.' {
                number.push(c);
                continue;
            }
            let (unit, rank) = match c.to_ascii_uppercase() {
                'H' => (3600.0, 1),
                'M' => (60.0, 2),
                'S' => (1.0, 3),
                _ => return Err(bad()),
            };
            if number.is_empty() || rank <= last_unit || (c != 'S' && number.contains('.')) {
                return Err(bad());
            }
            let n: f64 = number.parse().map_err(|_| bad())?;
            total += n * unit;
            number.clear();
            last_unit = rank;
        }
        if !number.is_empty() || !total.is_finite() || total > 1e9 {
            return Err(bad());
        }
        return Ok(Duration::from_millis((total * 1000.0).round() as u64));
    }
    let parts: Vec<&str> = t.split(':').collect();
    if parts.len() != 3 {
        return Err(bad());
    }
    let mut secs = 0u64;
    for (i, p) in parts.iter().enumerate() {
        if p.is_empty() || p.len() > 2 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad());
        }
        let n: u64 = p.parse().map_err(|_| bad())?;
        if i > 0 && n > 59 {
            return Err(bad());
        }
        secs = secs * 60 + n;
    }
    Ok(Duration::from_secs(secs))
}

/// The answer to a poll of the controller base.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PollReply {
    /// The server's polling `sleep`; None when it cannot be parsed (`raw_sleep` has it), so the
    /// rest of the answer is still used and the caller keeps its last good interval.
    pub sleep: Option<Duration>,
    pub raw_sleep: String,
    pub deployment: Option<Link>,
    pub confirmation: Option<Link>,
    pub cancel: Option<Link>,
    pub installed: Option<Link>,
    pub config_data: Option<Link>,
}

impl PollReply {
    pub fn parse(body: &[u8]) -> Result<PollReply, ModelError> {
        let raw: wire::ControllerBase = json("poll", body)?;
        let sleep = parse_sleep(&raw.config.polling.sleep).ok();
        let raw_sleep = raw.config.polling.sleep;
        let mut links = raw.links;
        let mut take = |rel: &str| links.remove(rel).map(|h| Link { href: h.href });
        let reply = PollReply {
            sleep,
            raw_sleep,
            deployment: take("deploymentBase"),
            confirmation: take("confirmationBase"),
            cancel: take("cancelAction"),
            installed: take("installedBase"),
            config_data: take("configData"),
        };
        for (what, link) in [
            ("deploymentBase", &reply.deployment),
            ("confirmationBase", &reply.confirmation),
            ("cancelAction", &reply.cancel),
        ] {
            if let Some(l) = link {
                if l.action_id().is_none() {
                    return Err(ModelError::LinkId {
                        what,
                        href: l.href.clone(),
                    });
                }
            }
        }
        Ok(reply)
    }
}

/// `skip` / `attempt` / `forced` of a deployment's download and update steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Handling {
    Skip,
    Attempt,
    Forced,
}

/// Maintenance window state, when the action has a schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MaintenanceWindow {
    Available,
    Unavailable,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hashes {
    pub sha256: Option<String>,
    pub sha1: Option<String>,
    pub md5: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub filename: String,
    pub hashes: Hashes,
    pub size: Option<u64>,
    /// `download` (preferred, may be another host) else `download-http`.
    pub download: Option<Link>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub part: String,
    pub name: String,
    pub version: String,
    pub encrypted: bool,
    pub artifacts: Vec<Artifact>,
    pub metadata: BTreeMap<String, String>,
}

/// A deployment (deploymentBase, installedBase or confirmationBase action).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Deployment {
    pub action_id: String,
    pub download: Handling,
    pub update: Handling,
    pub maintenance_window: Option<MaintenanceWindow>,
    pub chunks: Vec<Chunk>,
    pub history_status: Option<String>,
    pub history_messages: Vec<String>,
}

/// Most chunks (software modules) a deployment may have.
pub const MAX_CHUNKS: usize = 64;
/// Most artifacts one chunk may have.
pub const MAX_ARTIFACTS_PER_CHUNK: usize = 64;

impl Deployment {
    /// Parses a body fetched through `link`; the body's id must match the link's.
    pub fn parse(body: &[u8], link: &Link) -> Result<Deployment, ModelError> {
        let raw: wire::DeploymentBase = json("deployment", body)?;
        let action_id = raw.id.into_string();
        if let Some(expected) = link.action_id() {
            if expected != action_id {
                return Err(ModelError::IdMismatch {
                    what: "deployment",
                    body: action_id,
                    expected,
                });
            }
        }
        let handling = |h: wire::Handling| match h {
            wire::Handling::Skip => Handling::Skip,
            wire::Handling::Attempt => Handling::Attempt,
            wire::Handling::Forced => Handling::Forced,
        };
        let d = raw.deployment;
        // A hostile server must not make the device hold or walk arbitrarily large lists.
        let too_many = |what, count, limit| ModelError::TooMany { what, count, limit };
        if d.chunks.len() > MAX_CHUNKS {
            return Err(too_many("chunks", d.chunks.len(), MAX_CHUNKS));
        }
        if let Some(c) = d
            .chunks
            .iter()
            .find(|c| c.artifacts.len() > MAX_ARTIFACTS_PER_CHUNK)
        {
            return Err(too_many(
                "artifacts in one chunk",
                c.artifacts.len(),
                MAX_ARTIFACTS_PER_CHUNK,
            ));
        }
        let chunks = d
            .chunks
            .into_iter()
            .map(|c| Chunk {
                part: c.part,
                name: c.name,
                version: c.version,
                encrypted: c.encrypted,
                metadata: c.metadata.into_iter().map(|m| (m.key, m.value)).collect(),
                artifacts: c
                    .artifacts
                    .into_iter()
                    .map(|mut a| {
                        let download = a
                            .links
                            .remove("download")
                            .or_else(|| a.links.remove("download-http"))
                            .map(|h| Link { href: h.href });
                        Artifact {
                            filename: a.filename,
                            hashes: Hashes {
                                sha256: a.hashes.sha256.map(|h| h.to_ascii_lowercase()),
                                sha1: a.hashes.sha1.map(|h| h.to_ascii_lowercase()),
                                md5: a.hashes.md5.map(|h| h.to_ascii_lowercase()),
                            },
                            size: a.size,
                            download,
                        }
                    })
                    .collect(),
            })
            .collect();
        let (history_status, history_messages) = match raw.action_history {
            Some(h) => (h.status, h.messages),
            None => (None, Vec::new()),
        };
        Ok(Deployment {
            action_id,
            download: handling(d.download),
            update: handling(d.update),
            maintenance_window: d.maintenance_window.map(|w| match w {
                wire::Window::Available => MaintenanceWindow::Available,
                wire::Window::Unavailable => MaintenanceWindow::Unavailable,
            }),
            chunks,
            history_status,
            history_messages,
        })
    }

    /// Download only, now: `update: skip`, whatever `maintenanceWindow` says. hawkBit sends
    /// that for a DOWNLOAD_ONLY action (with or without a schedule) and for a scheduled action
    /// outside its window; either way the image is downloaded and reported `downloaded`, and an
    /// action that comes back with `update` forced or attempt reuses it.
    pub fn is_download_only(&self) -> bool {
        self.update == Handling::Skip
    }

    /// May the new slot be activated now?
    pub fn may_activate(&self) -> bool {
        self.update != Handling::Skip
            && self.maintenance_window != Some(MaintenanceWindow::Unavailable)
    }
}

/// A cancel request for an action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CancelRequest {
    pub action_id: String,
    pub stop_id: String,
}

impl CancelRequest {
    pub fn parse(body: &[u8], link: &Link) -> Result<CancelRequest, ModelError> {
        let raw: wire::Cancel = json("cancelAction", body)?;
        let req = CancelRequest {
            action_id: raw.id.into_string(),
            stop_id: raw.cancel_action.stop_id.into_string(),
        };
        if let Some(expected) = link.action_id() {
            if expected != req.action_id {
                return Err(ModelError::IdMismatch {
                    what: "cancelAction",
                    body: req.action_id,
                    expected,
                });
            }
        }
        Ok(req)
    }
}

/// The confirmationBase root: auto-confirm state and the pending action link, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmationState {
    pub auto_confirm: bool,
    pub pending: Option<Link>,
}

impl ConfirmationState {
    pub fn parse(body: &[u8]) -> Result<ConfirmationState, ModelError> {
        let mut raw: wire::ConfirmationBase = json("confirmationBase", body)?;
        Ok(ConfirmationState {
            auto_confirm: raw.auto_confirm.active,
            pending: raw
                .links
                .remove("confirmationBase")
                .map(|h| Link { href: h.href }),
        })
    }
}

/// `status.execution` of a feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

impl Execution {
    pub fn as_str(self) -> &'static str {
        match self {
            Execution::Closed => "closed",
            Execution::Proceeding => "proceeding",
            Execution::Canceled => "canceled",
            Execution::Scheduled => "scheduled",
            Execution::Rejected => "rejected",
            Execution::Resumed => "resumed",
            Execution::Downloaded => "downloaded",
            Execution::Download => "download",
        }
    }
}

/// `status.result.finished` of a feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Finished {
    Success,
    Failure,
    None,
}

impl Finished {
    pub fn as_str(self) -> &'static str {
        match self {
            Finished::Success => "success",
            Finished::Failure => "failure",
            Finished::None => "none",
        }
    }
}

/// One feedback message for an action (deployment or cancel channel).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Feedback {
    pub action_id: String,
    pub execution: Execution,
    pub finished: Finished,
    pub progress: Option<(u64, u64)>,
    pub details: Vec<String>,
}

impl Feedback {
    pub fn new(action_id: &str, execution: Execution, finished: Finished) -> Feedback {
        Feedback {
            action_id: action_id.to_string(),
            execution,
            finished,
            progress: None,
            details: Vec::new(),
        }
    }

    pub fn detail(mut self, line: impl Into<String>) -> Feedback {
        self.details.push(line.into());
        self
    }

    /// JSON body, compatible with hawkBit 0.3 .. 1.x. `now_ms` is sent as `timestamp` only when
    /// the clock is known `synchronized` and looks trustworthy (after 2020), because hawkBit
    /// moves the installed version only forward in that time (see [`crate::clock`]).
    pub fn to_json(&self, now_ms: u64, synchronized: bool) -> Vec<u8> {
        let details = sanitize_details(&self.details);
        let body = wire::ActionFeedback {
            id: &self.action_id,
            time: legacy_time(now_ms),
            timestamp: (synchronized && trustworthy(now_ms)).then_some(now_ms),
            status: wire::FeedbackStatus {
                execution: self.execution.as_str(),
                result: wire::FeedbackResult {
                    finished: self.finished.as_str(),
                    progress: self.progress.map(|(cnt, of)| wire::Progress { cnt, of }),
                },
                code: None,
                details: &details,
            },
        };
        serde_json::to_vec(&body).expect("feedback serializes")
    }
}

/// configData body (mode merge).
pub fn config_data_json(data: &BTreeMap<String, String>, now_ms: u64) -> Vec<u8> {
    let body = wire::ConfigData {
        mode: "merge",
        data,
        time: legacy_time(now_ms),
        status: wire::FeedbackStatus {
            execution: "closed",
            result: wire::FeedbackResult {
                finished: "success",
                progress: None,
            },
            code: None,
            details: &[],
        },
    };
    serde_json::to_vec(&body).expect("config data serializes")
}

/// confirmationBase feedback body.
pub fn confirmation_json(confirmed: bool, details: &[String]) -> Vec<u8> {
    let details = sanitize_details(details);
    let body = wire::ConfirmationFeedback {
        confirmation: if confirmed { "confirmed" } else { "denied" },
        details: &details,
    };
    serde_json::to_vec(&body).expect("confirmation serializes")
}

/// hawkBit rejects markup in details and splits long lines; keep them short and plain.
fn sanitize_details(details: &[String]) -> Vec<String> {
    details
        .iter()
        .take(40)
        .map(|d| {
            let plain: String = d
                .chars()
                .map(|c| match c {
                    '<' => '(',
                    '>' => ')',
                    c if c.is_control() && c != '\n' => ' ',
                    c => c,
                })
                .collect();
            match plain.char_indices().nth(500) {
                Some((i, _)) => format!("{}...", &plain[..i]),
                None => plain,
            }
        })
        .collect()
}

fn trustworthy(now_ms: u64) -> bool {
    now_ms > 1_577_836_800_000 // 2020-01-01
}

/// `yyyyMMddTHHmmss` (UTC) as hawkBit <= 0.6 logged it.
fn legacy_time(now_ms: u64) -> String {
    let secs = now_ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian (H. Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

fn json<T: serde::de::DeserializeOwned>(what: &'static str, body: &[u8]) -> Result<T, ModelError> {
    serde_json::from_slice(body).map_err(|e| ModelError::Json {
        what,
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn sleep_parses_both_forms() {
        assert_eq!(parse_sleep("00:05:00"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_sleep("23:59:59"), Ok(Duration::from_secs(86399)));
        assert_eq!(parse_sleep("PT24H"), Ok(Duration::from_secs(86400)));
        assert_eq!(
            parse_sleep("PT36H30M"),
            Ok(Duration::from_secs(36 * 3600 + 1800))
        );
        assert_eq!(
            parse_sleep("PT25H12M3.456S"),
            Ok(Duration::from_millis(
                (25 * 3600 + 12 * 60 + 3) * 1000 + 456
            ))
        );
        assert_eq!(parse_sleep("PT30S"), Ok(Duration::from_secs(30)));
        for bad in [
            "",
            "5",
            "00:05",
            "00:60:00",
            "aa:bb:cc",
            "-1:00:00",
            "PT",
            "PTxS",
            "PT5",
            "P1D",
            "PT1S5M",
            "PT1.5H",
            "00:05:00:00",
        ] {
            assert!(parse_sleep(bad).is_err(), "{bad:?} parsed");
        }
    }

    #[test]
    fn poll_reply_with_all_links_and_unknown_fields() {
        let body = json!({
            "config": {"polling": {"sleep": "00:01:00"}, "extra": 1},
            "_links": {
                "deploymentBase": {"href": "https://h/T/controller/v1/d/deploymentBase/42?c=-2127183556"},
                "installedBase": {"href": "https://h/T/controller/v1/d/installedBase/41"},
                "configData": {"href": "https://h/T/controller/v1/d/configData"},
                "somethingNew": {"href": "https://h/x"}
            },
            "newField": [1, 2]
        });
        let r = PollReply::parse(body.to_string().as_bytes()).unwrap();
        assert_eq!(r.sleep, Some(Duration::from_secs(60)));
        let d = r.deployment.unwrap();
        assert_eq!(d.action_id().as_deref(), Some("42"));
        assert_eq!(
            d.join("/feedback"),
            "https://h/T/controller/v1/d/deploymentBase/42/feedback"
        );
        assert!(r.config_data.is_some());
        assert!(r.cancel.is_none() && r.confirmation.is_none());
    }

    #[test]
    fn poll_reply_nonsense_is_rejected() {
        let r = PollReply::parse(br#"{"config": {"polling": {"sleep": "soon"}}}"#).unwrap();
        assert_eq!((r.sleep, r.raw_sleep.as_str()), (None, "soon"));
        for body in [
            json!({"config": {"polling": {}}}),
            json!({}),
            json!({"config": {"polling": {"sleep": "00:01:00"}},
                   "_links": {"cancelAction": {"href": "https://h/cancelAction/abc"}}}),
        ] {
            assert!(
                PollReply::parse(body.to_string().as_bytes()).is_err(),
                "{body}"
            );
        }
        assert!(PollReply::parse(b"<html>").is_err());
    }

    fn deployment_body() -> Value {
        json!({
            "id": "8",
            "deployment": {
                "download": "forced", "update": "attempt", "maintenanceWindow": "available",
                "chunks": [{
                    "part": "os", "version": "1.0.79", "name": "fw",
                    "artifacts": [{
                        "filename": "binary.tgz",
                        "hashes": {"sha1": "AB", "md5": "cd", "sha256": "EF"},
                        "size": 13,
                        "_links": {
                            "download-http": {"href": "http://h/a/binary.tgz"},
                            "md5sum-http": {"href": "http://h/a/binary.tgz.MD5SUM"}
                        }
                    }]
                }, {
                    "part": "bApp", "version": "1", "name": "app", "artifacts": [],
                    "metadata": [{"key": "k", "value": "v"}]
                }]
            },
            "actionHistory": {"status": "RUNNING", "messages": ["Reboot"]}
        })
    }

    #[test]
    fn deployment_parses_and_prefers_download_link() {
        let link = Link {
            href: "https://h/d/deploymentBase/8?c=1".into(),
        };
        let d = Deployment::parse(deployment_body().to_string().as_bytes(), &link).unwrap();
        assert_eq!(d.action_id, "8");
        assert_eq!(d.download, Handling::Forced);
        assert_eq!(d.update, Handling::Attempt);
        assert_eq!(d.maintenance_window, Some(MaintenanceWindow::Available));
        assert!(d.may_activate() && !d.is_download_only());
        let a = &d.chunks[0].artifacts[0];
        assert_eq!(a.hashes.sha256.as_deref(), Some("ef"));
        assert_eq!(a.hashes.sha1.as_deref(), Some("ab"));
        assert_eq!(a.download.as_ref().unwrap().href, "http://h/a/binary.tgz");
        assert_eq!(d.chunks[1].metadata["k"], "v");
        assert_eq!(d.history_status.as_deref(), Some("RUNNING"));

        let mut both = deployment_body();
        both["deployment"]["chunks"][0]["artifacts"][0]["_links"]["download"] =
            json!({"href": "https://cdn/a"});
        let d = Deployment::parse(both.to_string().as_bytes(), &link).unwrap();
        assert_eq!(
            d.chunks[0].artifacts[0].download.as_ref().unwrap().href,
            "https://cdn/a"
        );
    }

    #[test]
    fn deployments_with_too_many_chunks_or_artifacts_are_refused() {
        let link = Link {
            href: "https://h/d/deploymentBase/8".into(),
        };
        let chunk = deployment_body()["deployment"]["chunks"][1].clone();
        let mut b = deployment_body();
        b["deployment"]["chunks"] = json!(vec![chunk.clone(); MAX_CHUNKS]);
        assert!(Deployment::parse(b.to_string().as_bytes(), &link).is_ok());
        b["deployment"]["chunks"] = json!(vec![chunk; MAX_CHUNKS + 1]);
        let err = Deployment::parse(b.to_string().as_bytes(), &link).unwrap_err();
        assert!(err.to_string().contains("65 chunks"), "{err}");

        let artifact = deployment_body()["deployment"]["chunks"][0]["artifacts"][0].clone();
        let mut b = deployment_body();
        b["deployment"]["chunks"][0]["artifacts"] =
            json!(vec![artifact; MAX_ARTIFACTS_PER_CHUNK + 1]);
        let err = Deployment::parse(b.to_string().as_bytes(), &link).unwrap_err();
        assert!(err.to_string().contains("artifacts in one chunk"), "{err}");
    }

    #[test]
    fn deployment_kinds() {
        let link = Link {
            href: "https://h/d/deploymentBase/8".into(),
        };
        let kind = |download: &str, update: &str, window: Option<&str>| {
            let mut b = deployment_body();
            b["deployment"]["download"] = json!(download);
            b["deployment"]["update"] = json!(update);
            match window {
                Some(w) => b["deployment"]["maintenanceWindow"] = json!(w),
                None => {
                    b["deployment"]
                        .as_object_mut()
                        .unwrap()
                        .remove("maintenanceWindow");
                }
            }
            let d = Deployment::parse(b.to_string().as_bytes(), &link).unwrap();
            (d.is_download_only(), d.may_activate())
        };
        assert_eq!(kind("forced", "forced", None), (false, true));
        assert_eq!(kind("attempt", "attempt", None), (false, true));
        assert_eq!(kind("forced", "skip", None), (true, false));
        assert_eq!(kind("forced", "skip", Some("unavailable")), (true, false));
        assert_eq!(kind("forced", "skip", Some("available")), (true, false));
        assert_eq!(kind("forced", "forced", Some("available")), (false, true));
    }

    #[test]
    fn deployment_nonsense_is_rejected() {
        let link = Link {
            href: "https://h/d/deploymentBase/8".into(),
        };
        let mut b = deployment_body();
        b["deployment"]["update"] = json!("FORCED");
        assert!(Deployment::parse(b.to_string().as_bytes(), &link).is_err());
        let mut b = deployment_body();
        b["deployment"]["chunks"][0]["artifacts"][0]["size"] = json!(-1);
        assert!(Deployment::parse(b.to_string().as_bytes(), &link).is_err());
        let other = Link {
            href: "https://h/d/deploymentBase/9".into(),
        };
        assert!(matches!(
            Deployment::parse(deployment_body().to_string().as_bytes(), &other),
            Err(ModelError::IdMismatch { .. })
        ));
        let confirmation = deployment_body()
            .to_string()
            .replace("\"deployment\"", "\"confirmation\"");
        assert!(Deployment::parse(confirmation.as_bytes(), &link).is_ok());
    }

    #[test]
    fn cancel_and_confirmation_parse() {
        let link = Link {
            href: "https://h/d/cancelAction/11".into(),
        };
        let c =
            CancelRequest::parse(br#"{"id":"11","cancelAction":{"stopId":"11"}}"#, &link).unwrap();
        assert_eq!(c.stop_id, "11");
        assert!(CancelRequest::parse(br#"{"id":"11"}"#, &link).is_err());
        let s = ConfirmationState::parse(
            br#"{"autoConfirm":{"active":false},"_links":{"confirmationBase":{"href":"https://h/confirmationBase/43?c=1"}}}"#,
        )
        .unwrap();
        assert!(!s.auto_confirm);
        assert_eq!(s.pending.unwrap().action_id().as_deref(), Some("43"));
    }

    #[test]
    fn feedback_body_is_compatible_with_all_versions() {
        let f = Feedback::new("42", Execution::Closed, Finished::Failure).detail("hash <mismatch>");
        let v: Value = serde_json::from_slice(&f.to_json(1_733_218_554_123, true)).unwrap();
        assert_eq!(v["id"], "42");
        assert_eq!(v["timestamp"], 1_733_218_554_123u64);
        assert_eq!(v["time"], "20241203T093554");
        assert_eq!(v["status"]["execution"], "closed");
        assert_eq!(v["status"]["result"]["finished"], "failure");
        assert_eq!(v["status"]["details"][0], "hash (mismatch)");
        let v: Value = serde_json::from_slice(&f.to_json(5_000, true)).unwrap();
        assert!(
            v.get("timestamp").is_none(),
            "1970 clock must not send timestamp"
        );
        let v: Value = serde_json::from_slice(&f.to_json(1_733_218_554_123, false)).unwrap();
        assert!(
            v.get("timestamp").is_none(),
            "an unsynchronised clock must not send timestamp"
        );
        assert_eq!(v["time"], "20241203T093554");
        let mut data = BTreeMap::new();
        data.insert("k".to_string(), "v".to_string());
        let v: Value = serde_json::from_slice(&config_data_json(&data, 0)).unwrap();
        assert_eq!(v["mode"], "merge");
        assert_eq!(v["data"]["k"], "v");
        assert_eq!(v["status"]["result"]["finished"], "success");
        let v: Value = serde_json::from_slice(&confirmation_json(false, &[])).unwrap();
        assert_eq!(v["confirmation"], "denied");
    }
}

/// hawkBit's limit for a configData key or value (`Target.CONTROLLER_ATTRIBUTE_*_SIZE`).
pub const ATTRIBUTE_MAX_CHARS: usize = 128;

/// Punctuation hawkBit's controller attribute pattern allows besides ASCII letters, digits and
/// whitespace; everything else (`~`, a backtick, non-ASCII) makes it reject the whole PUT with 400.
const ATTRIBUTE_PUNCTUATION: &str = "_-!@#$%^&*()+=[]{}|;:'\",.<>/\\?";

fn attribute_char_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == ' ' || ATTRIBUTE_PUNCTUATION.contains(c)
}

/// Why hawkBit would refuse this attribute key or value, if it would.
pub fn attribute_problem(s: &str) -> Option<String> {
    if s.chars().count() > ATTRIBUTE_MAX_CHARS {
        return Some(format!("longer than {ATTRIBUTE_MAX_CHARS} characters"));
    }
    s.chars()
        .find(|c| !attribute_char_ok(*c))
        .map(|c| format!("character {c:?} is not accepted by hawkBit (allowed: ASCII letters, digits, space and {ATTRIBUTE_PUNCTUATION})"))
}

/// A derived value (e.g. `VERSION_ID`) made acceptable to hawkBit: other characters become `_`,
/// and it is cut to [`ATTRIBUTE_MAX_CHARS`]. A configured value is validated instead.
pub fn sanitise_attribute(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control())
        .map(|c| if attribute_char_ok(c) { c } else { '_' })
        .take(ATTRIBUTE_MAX_CHARS)
        .collect()
}

#[cfg(test)]
mod attribute_tests {
    use super::*;

    #[test]
    fn attributes_follow_hawkbits_pattern() {
        assert_eq!(attribute_problem("hw rev-2 (A/B) [x]"), None);
        assert!(attribute_problem("1.0~rc1").unwrap().contains("'~'"));
        assert!(attribute_problem("a`b").is_some());
        assert!(attribute_problem("\u{e9}").is_some());
        assert!(attribute_problem("a\tb").is_some());
        assert_eq!(attribute_problem(&"x".repeat(128)), None);
        assert!(attribute_problem(&"x".repeat(129)).unwrap().contains("128"));
        assert_eq!(sanitise_attribute("1.0~rc1`\u{e9}\n"), "1.0_rc1__");
        assert_eq!(sanitise_attribute(&"x".repeat(200)).len(), 128);
    }
}
