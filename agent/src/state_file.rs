//! The format of `state.json`: serde types of their own, separate from the machine's types and
//! from the DDI wire model, so that neither can change the file by accident.
//!
//! The file is read by other agent versions: the new agent after an update reads what the old
//! one wrote, and after a rollback the old agent reads what the new one wrote. So the format
//! evolves additively only (the guarantees are in `docs/interface.md`, "State file"):
//! - new fields are optional with a default, and readers ignore fields they do not know (no
//!   `deny_unknown_fields` here, ever);
//! - [`FORMAT`] is bumped only for a change an older reader would misread, together with a
//!   migration from every earlier format in [`decode`].
//!
//! Format 1 is the layout agents wrote before the `format` field existed; a file without the
//! field is format 1. The committed fixtures in `tests/fixtures/state/` hold real files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::ddi::{Artifact, Execution, Feedback, Finished, Hashes, Link};
use bootctl::Slot;

use crate::machine::{
    Caches, Channel, ConsentReason, Downloaded, Job, LastResult, LocalOrigin, LocalResult, Outbox,
    Outgoing, PendingConsent, Phase, ResultKind, SlotImage, State, Update,
};

/// The format this agent writes, and the newest it reads.
pub const FORMAT: u32 = 1;

/// Why a state file cannot be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FormatError {
    #[error("not a state file: {0}")]
    Json(String),
    #[error("state format {found} is newer than this agent reads (up to {FORMAT})")]
    Newer { found: u32 },
}

/// Parses a state file of any format this agent knows.
pub fn decode(bytes: &[u8]) -> Result<State, FormatError> {
    let file: StateFile =
        serde_json::from_slice(bytes).map_err(|e| FormatError::Json(e.to_string()))?;
    if file.format > FORMAT {
        return Err(FormatError::Newer { found: file.format });
    }
    // Format 1 is the only one so far: nothing to migrate.
    Ok(file.into())
}

/// The state file for `state`, in [`FORMAT`].
pub fn encode(state: &State) -> Vec<u8> {
    serde_json::to_vec_pretty(&StateFile::from(state)).expect("state serializes")
}

/// What can still be read from a state file that [`decode`] refused.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Salvage {
    /// The action the file had open (id and deploymentBase href), when both are readable.
    pub open_action: Option<(String, String)>,
    /// Outbox entries that still parse one by one, and a next sequence number above them all.
    pub outbox: Outbox,
    pub finished_actions: Vec<String>,
}

/// Reads what it can from an unreadable file, looking where format 1 keeps things.
pub fn salvage(bytes: &[u8]) -> Salvage {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Salvage::default();
    };
    let job = &value["phase"]["job"];
    let open_action = match (job["action_id"].as_str(), job["link"].as_str()) {
        (Some(id), Some(link)) => Some((id.to_string(), link.to_string())),
        _ => None,
    };
    let outbox: Vec<Outgoing> = value["outbox"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|entry| OutgoingFile::deserialize(entry).ok())
        .map(Outgoing::from)
        .collect();
    let next_seq = value["next_seq"].as_u64().unwrap_or(0).max(
        outbox
            .iter()
            .map(|o| o.seq.saturating_add(1))
            .max()
            .unwrap_or(0),
    );
    let finished_actions = value["finished_actions"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| id.as_str().map(str::to_string))
        .collect();
    Salvage {
        open_action,
        outbox: Outbox::restore(outbox, next_seq),
        finished_actions,
    }
}

fn format_1() -> u32 {
    1
}

#[derive(Debug, Serialize, Deserialize)]
struct StateFile {
    #[serde(default = "format_1")]
    format: u32,
    #[serde(default)]
    phase: PhaseFile,
    #[serde(default)]
    last_result: Option<LastResultFile>,
    #[serde(default)]
    outbox: Vec<OutgoingFile>,
    #[serde(default)]
    next_seq: u64,
    #[serde(default)]
    attributes_sent: Option<BTreeMap<String, String>>,
    #[serde(default)]
    pending_consent: Option<String>,
    #[serde(default)]
    server_installed: Option<String>,
    #[serde(default)]
    finished_actions: Vec<String>,
    /// The image a download-only action left in the slot that is not booted (added after
    /// format 1 began; optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    downloaded: Option<DownloadedFile>,
    /// Why `pending_consent` waits (added later; absent: a confirmation, the only reason
    /// before).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending_consent_reason: Option<ConsentReasonFile>,
    /// What the action waiting for consent would install (added later; optional).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending_consent_what: Option<String>,
    /// The phase of a local install (`ddi-agent install`). Kept out of `phase`, which then
    /// says `idle`: an agent that predates local installs must not take it for a server
    /// action (it would report to an empty link for ever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    local_job: Option<PhaseFile>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_local: Option<LocalResultFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LocalOriginFile {
    source: String,
    started_at: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct LocalResultFile {
    source: String,
    started_at: u64,
    target: SlotFile,
    result: ResultFile,
    message: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ConsentReasonFile {
    Confirmation,
    SoftUpdate,
}

#[derive(Debug, Serialize, Deserialize)]
struct DownloadedFile {
    action_id: String,
    slot: SlotFile,
    artifact_sha256: String,
    version: String,
    image: SlotImageFile,
}

#[derive(Debug, Serialize, Deserialize)]
struct SlotImageFile {
    bytes: u64,
    sha256: String,
    /// Added later; absent: no policy (an older agent's image is not reused under one).
    #[serde(default, skip_serializing_if = "is_zero")]
    policy: u64,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(tag = "phase", content = "job", rename_all = "snake_case")]
enum PhaseFile {
    #[default]
    Idle,
    Installing(JobFile),
    Installed(JobFile),
    AwaitingReboot(JobFile),
}

#[derive(Debug, Serialize, Deserialize)]
struct JobFile {
    action_id: String,
    link: String,
    target: SlotFile,
    download_only: bool,
    may_activate: bool,
    artifact: ArtifactFile,
    version: String,
    failed_tries: u32,
    #[serde(default)]
    activations: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    local: Option<LocalOriginFile>,
    /// The slot holds this image already (downloaded earlier): read back, not downloaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reuse: Option<SlotImageFile>,
    /// Download runs started (added later; absent: none counted).
    #[serde(default, skip_serializing_if = "is_zero")]
    download_runs: u32,
}

fn is_zero<T: Default + PartialEq>(n: &T) -> bool {
    *n == T::default()
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum SlotFile {
    A,
    B,
}

#[derive(Debug, Serialize, Deserialize)]
struct ArtifactFile {
    filename: String,
    hashes: HashesFile,
    size: Option<u64>,
    download: Option<LinkFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct HashesFile {
    sha256: Option<String>,
    sha1: Option<String>,
    md5: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct LinkFile {
    href: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct LastResultFile {
    action_id: String,
    result: ResultFile,
    message: String,
    /// With `result: success`: a download-only action's image was downloaded, not installed.
    /// A flag beside the result rather than a new result value, so older agents read it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    downloaded: bool,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ResultFile {
    Success,
    Failure,
    Canceled,
    Abandoned,
}

#[derive(Debug, Serialize, Deserialize)]
struct OutgoingFile {
    seq: u64,
    channel: ChannelFile,
    link: String,
    feedback: FeedbackFile,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum ChannelFile {
    Deployment,
    Cancel,
}

#[derive(Debug, Serialize, Deserialize)]
struct FeedbackFile {
    action_id: String,
    execution: ExecutionFile,
    finished: FinishedFile,
    progress: Option<(u64, u64)>,
    details: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ExecutionFile {
    Closed,
    Proceeding,
    Canceled,
    Scheduled,
    Rejected,
    Resumed,
    Downloaded,
    Download,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum FinishedFile {
    Success,
    Failure,
    None,
}

// ---- conversions ------------------------------------------------------------------------------

impl From<&State> for StateFile {
    fn from(s: &State) -> StateFile {
        let (u, c) = (s.update(), s.caches());
        let phase = match u.phase() {
            Phase::Idle => PhaseFile::Idle,
            Phase::Installing(j) => PhaseFile::Installing(j.into()),
            Phase::Installed(j) => PhaseFile::Installed(j.into()),
            Phase::AwaitingReboot(j) => PhaseFile::AwaitingReboot(j.into()),
        };
        let local = u.phase().job().is_some_and(Job::is_local);
        let (phase, local_job) = if local {
            (PhaseFile::Idle, Some(phase))
        } else {
            (phase, None)
        };
        StateFile {
            format: FORMAT,
            phase,
            local_job,
            last_local: u.last_local().map(|r| LocalResultFile {
                source: r.origin.source.clone(),
                started_at: r.origin.started_at,
                target: (&r.target).into(),
                result: (&r.result).into(),
                message: r.message.clone(),
            }),
            last_result: u.last_result().map(|r| LastResultFile {
                action_id: r.action_id.clone(),
                result: (&r.result).into(),
                message: r.message.clone(),
                downloaded: r.result == ResultKind::Downloaded,
            }),
            outbox: s.outbox().iter().map(OutgoingFile::from).collect(),
            next_seq: s.outbox().next_seq(),
            attributes_sent: c.attributes_sent().cloned(),
            pending_consent: u.pending_consent().map(|p| p.action_id.clone()),
            // Absent for a confirmation, as agents before the field wrote it.
            pending_consent_reason: u.pending_consent().and_then(|p| match p.reason {
                ConsentReason::Confirmation => None,
                ConsentReason::SoftUpdate => Some(ConsentReasonFile::SoftUpdate),
            }),
            pending_consent_what: u
                .pending_consent()
                .map(|p| p.what.clone())
                .filter(|w| !w.is_empty()),
            server_installed: c.server_installed().map(str::to_string),
            finished_actions: u.finished_actions().to_vec(),
            downloaded: u.downloaded().map(|d| DownloadedFile {
                action_id: d.action_id.clone(),
                slot: (&d.slot).into(),
                artifact_sha256: d.artifact_sha256.clone(),
                version: d.version.clone(),
                image: (&d.image).into(),
            }),
        }
    }
}

impl From<StateFile> for State {
    fn from(f: StateFile) -> State {
        let phase = match (f.phase, f.local_job) {
            (PhaseFile::Idle, Some(local)) => local,
            (phase, _) => phase,
        };
        let update = Update::restore(
            match phase {
                PhaseFile::Idle => Phase::Idle,
                PhaseFile::Installing(j) => Phase::Installing(j.into()),
                PhaseFile::Installed(j) => Phase::Installed(j.into()),
                PhaseFile::AwaitingReboot(j) => Phase::AwaitingReboot(j.into()),
            },
            f.last_result.map(|r| LastResult {
                action_id: r.action_id,
                result: match r.result {
                    ResultFile::Success if r.downloaded => ResultKind::Downloaded,
                    ResultFile::Success => ResultKind::Success,
                    ResultFile::Failure => ResultKind::Failure,
                    ResultFile::Canceled => ResultKind::Canceled,
                    ResultFile::Abandoned => ResultKind::Abandoned,
                },
                message: r.message,
            }),
            f.finished_actions,
            f.pending_consent.map(|action_id| PendingConsent {
                action_id,
                reason: match f.pending_consent_reason {
                    None | Some(ConsentReasonFile::Confirmation) => ConsentReason::Confirmation,
                    Some(ConsentReasonFile::SoftUpdate) => ConsentReason::SoftUpdate,
                },
                what: f.pending_consent_what.unwrap_or_default(),
            }),
            f.downloaded.map(|d| Downloaded {
                action_id: d.action_id,
                slot: d.slot.into(),
                artifact_sha256: d.artifact_sha256,
                version: d.version,
                image: d.image.into(),
            }),
            f.last_local.map(|r| LocalResult {
                origin: LocalOrigin {
                    source: r.source,
                    started_at: r.started_at,
                },
                target: r.target.into(),
                result: r.result.into(),
                message: r.message,
            }),
        );
        State::restore(
            update,
            Outbox::restore(
                f.outbox.into_iter().map(Outgoing::from).collect(),
                f.next_seq,
            ),
            Caches::restore(f.attributes_sent, f.server_installed),
        )
    }
}

impl From<&Job> for JobFile {
    fn from(j: &Job) -> JobFile {
        let a = &j.artifact;
        JobFile {
            action_id: j.action_id.clone(),
            link: j.link.clone(),
            target: (&j.target).into(),
            download_only: j.download_only,
            may_activate: j.may_activate,
            artifact: ArtifactFile {
                filename: a.filename.clone(),
                hashes: HashesFile {
                    sha256: a.hashes.sha256.clone(),
                    sha1: a.hashes.sha1.clone(),
                    md5: a.hashes.md5.clone(),
                },
                size: a.size,
                download: a.download.as_ref().map(|l| LinkFile {
                    href: l.href.clone(),
                }),
            },
            version: j.version.clone(),
            failed_tries: j.failed_tries,
            activations: j.activations,
            local: j.local.as_ref().map(|o| LocalOriginFile {
                source: o.source.clone(),
                started_at: o.started_at,
            }),
            reuse: j.reuse.as_ref().map(SlotImageFile::from),
            download_runs: j.download_runs,
        }
    }
}

impl From<&Slot> for SlotFile {
    fn from(s: &Slot) -> SlotFile {
        match s {
            Slot::A => SlotFile::A,
            Slot::B => SlotFile::B,
        }
    }
}

impl From<SlotFile> for Slot {
    fn from(s: SlotFile) -> Slot {
        match s {
            SlotFile::A => Slot::A,
            SlotFile::B => Slot::B,
        }
    }
}

impl From<&SlotImage> for SlotImageFile {
    fn from(i: &SlotImage) -> SlotImageFile {
        SlotImageFile {
            bytes: i.bytes,
            sha256: i.sha256.clone(),
            policy: i.policy,
        }
    }
}

impl From<SlotImageFile> for SlotImage {
    fn from(i: SlotImageFile) -> SlotImage {
        SlotImage {
            bytes: i.bytes,
            sha256: i.sha256,
            policy: i.policy,
        }
    }
}

impl From<JobFile> for Job {
    fn from(j: JobFile) -> Job {
        let a = j.artifact;
        Job {
            action_id: j.action_id,
            link: j.link,
            target: j.target.into(),
            download_only: j.download_only,
            may_activate: j.may_activate,
            artifact: Artifact {
                filename: a.filename,
                hashes: Hashes {
                    sha256: a.hashes.sha256,
                    sha1: a.hashes.sha1,
                    md5: a.hashes.md5,
                },
                size: a.size,
                download: a.download.map(|l| Link { href: l.href }),
            },
            version: j.version,
            failed_tries: j.failed_tries,
            activations: j.activations,
            reuse: j.reuse.map(SlotImage::from),
            download_runs: j.download_runs,
            local: j.local.map(|o| LocalOrigin {
                source: o.source,
                started_at: o.started_at,
            }),
        }
    }
}

impl From<&ResultKind> for ResultFile {
    fn from(r: &ResultKind) -> ResultFile {
        match r {
            // `downloaded` tells the two apart in `last_result`.
            ResultKind::Success | ResultKind::Downloaded => ResultFile::Success,
            ResultKind::Failure => ResultFile::Failure,
            ResultKind::Canceled => ResultFile::Canceled,
            ResultKind::Abandoned => ResultFile::Abandoned,
        }
    }
}

impl From<ResultFile> for ResultKind {
    fn from(r: ResultFile) -> ResultKind {
        match r {
            ResultFile::Success => ResultKind::Success,
            ResultFile::Failure => ResultKind::Failure,
            ResultFile::Canceled => ResultKind::Canceled,
            ResultFile::Abandoned => ResultKind::Abandoned,
        }
    }
}

impl From<&Outgoing> for OutgoingFile {
    fn from(o: &Outgoing) -> OutgoingFile {
        let f = &o.feedback;
        OutgoingFile {
            seq: o.seq,
            channel: match o.channel {
                Channel::Deployment => ChannelFile::Deployment,
                Channel::Cancel => ChannelFile::Cancel,
            },
            link: o.link.clone(),
            feedback: FeedbackFile {
                action_id: f.action_id.clone(),
                execution: match f.execution {
                    Execution::Closed => ExecutionFile::Closed,
                    Execution::Proceeding => ExecutionFile::Proceeding,
                    Execution::Canceled => ExecutionFile::Canceled,
                    Execution::Scheduled => ExecutionFile::Scheduled,
                    Execution::Rejected => ExecutionFile::Rejected,
                    Execution::Resumed => ExecutionFile::Resumed,
                    Execution::Downloaded => ExecutionFile::Downloaded,
                    Execution::Download => ExecutionFile::Download,
                },
                finished: match f.finished {
                    Finished::Success => FinishedFile::Success,
                    Finished::Failure => FinishedFile::Failure,
                    Finished::None => FinishedFile::None,
                },
                progress: f.progress,
                details: f.details.clone(),
            },
        }
    }
}

impl From<OutgoingFile> for Outgoing {
    fn from(o: OutgoingFile) -> Outgoing {
        let f = o.feedback;
        Outgoing {
            seq: o.seq,
            channel: match o.channel {
                ChannelFile::Deployment => Channel::Deployment,
                ChannelFile::Cancel => Channel::Cancel,
            },
            link: o.link,
            feedback: Feedback {
                action_id: f.action_id,
                execution: match f.execution {
                    ExecutionFile::Closed => Execution::Closed,
                    ExecutionFile::Proceeding => Execution::Proceeding,
                    ExecutionFile::Canceled => Execution::Canceled,
                    ExecutionFile::Scheduled => Execution::Scheduled,
                    ExecutionFile::Rejected => Execution::Rejected,
                    ExecutionFile::Resumed => Execution::Resumed,
                    ExecutionFile::Downloaded => Execution::Downloaded,
                    ExecutionFile::Download => Execution::Download,
                },
                finished: match f.finished {
                    FinishedFile::Success => Finished::Success,
                    FinishedFile::Failure => Finished::Failure,
                    FinishedFile::None => Finished::None,
                },
                progress: f.progress,
                details: f.details,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/state");

    /// Every committed fixture reads, and writing it back gives the same JSON plus `format`:
    /// no field is lost or renamed, so an older agent reads what this one writes.
    #[test]
    fn fixtures_read_and_write_back_unchanged() {
        let mut seen = 0;
        for release in std::fs::read_dir(FIXTURES).unwrap() {
            for phase in std::fs::read_dir(release.unwrap().path()).unwrap() {
                let path = phase.unwrap().path().join("state.json");
                let bytes = std::fs::read(&path).unwrap();
                let state = decode(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let mut original: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                let written: serde_json::Value = serde_json::from_slice(&encode(&state)).unwrap();
                original
                    .as_object_mut()
                    .unwrap()
                    .entry("format")
                    .or_insert(FORMAT.into());
                assert_eq!(written, original, "{}", path.display());
                seen += 1;
            }
        }
        assert!(seen >= 7, "only {seen} fixtures");
    }

    #[test]
    fn unknown_fields_are_ignored_and_missing_new_fields_default() {
        let text =
            br#"{"format": 1, "added_later": {"x": 1}, "phase": {"phase": "idle", "extra": 2},
            "outbox": [{"seq": 3, "channel": "cancel", "link": "l", "future": true,
              "feedback": {"action_id": "9", "execution": "closed", "finished": "success",
                           "progress": null, "details": []}}]}"#;
        let s = decode(text).unwrap();
        assert_eq!(s.update().phase(), &Phase::Idle);
        assert_eq!(s.outbox().len(), 1);
        assert_eq!(s.outbox()[0].seq, 3);
        assert_eq!(s.outbox().next_seq(), 0);
        assert_eq!(decode(b"{}").unwrap(), State::default());
    }

    /// A kept download, a job reusing it and a download result are new fields beside the old
    /// ones, and old values in old fields: what an older agent reads of the file (the fields it
    /// knows) is the same state without them.
    #[test]
    fn a_kept_download_is_written_so_older_agents_read_the_file() {
        let text = std::fs::read(format!("{FIXTURES}/main-3e7abd1/installing/state.json")).unwrap();
        let fixture = decode(&text).unwrap();
        let image = SlotImage {
            bytes: 4096,
            sha256: "cd".repeat(32),
            policy: 7,
        };
        let Phase::Installing(job) = fixture.update().phase() else {
            panic!("fixture not installing")
        };
        // The state as the new agent has it, and as an older one reads it back.
        let state = |new: bool| {
            let mut job = job.clone();
            job.reuse = new.then(|| image.clone());
            let downloaded = new.then(|| Downloaded {
                action_id: "4".into(),
                slot: Slot::B,
                artifact_sha256: "ab".repeat(32),
                version: "2.0".into(),
                image: image.clone(),
            });
            let result = LastResult {
                action_id: "4".into(),
                result: if new {
                    ResultKind::Downloaded
                } else {
                    ResultKind::Success
                },
                message: "downloaded".into(),
            };
            let update = Update::restore(
                Phase::Installing(job),
                Some(result),
                fixture.update().finished_actions().to_vec(),
                None,
                downloaded,
                None,
            );
            State::restore(update, fixture.outbox().clone(), fixture.caches().clone())
        };
        let written = encode(&state(true));
        assert_eq!(decode(&written).unwrap(), state(true));
        let mut json: serde_json::Value = serde_json::from_slice(&written).unwrap();
        assert_eq!(json["last_result"]["result"], "success");
        assert_eq!(json["last_result"]["downloaded"], true);
        // An older reader ignores what it does not know.
        json.as_object_mut().unwrap().remove("downloaded");
        json["last_result"]
            .as_object_mut()
            .unwrap()
            .remove("downloaded");
        json["phase"]["job"]
            .as_object_mut()
            .unwrap()
            .remove("reuse");
        assert_eq!(decode(json.to_string().as_bytes()).unwrap(), state(false));
    }

    proptest::proptest! {
        /// Damaged files (bytes changed, cut short) never panic the reader or the salvage, and
        /// whatever still decodes writes back to the same state.
        #[test]
        fn damaged_files_never_panic(
            cut in 0usize..2000,
            changes in proptest::collection::vec((0usize..2000, proptest::num::u8::ANY), 0..6),
        ) {
            let path = format!("{FIXTURES}/main-3e7abd1/feedback_owed/state.json");
            let mut bytes = std::fs::read(path).unwrap();
            for (at, byte) in changes {
                let at = at % bytes.len();
                bytes[at] = byte;
            }
            bytes.truncate(cut.max(1));
            if let Ok(state) = decode(&bytes) {
                proptest::prop_assert_eq!(decode(&encode(&state)).unwrap(), state);
            }
            let s = salvage(&bytes);
            let next = s.outbox.next_seq();
            proptest::prop_assert!(s.outbox.iter().all(|o| o.seq < next || o.seq == u64::MAX));
        }
    }

    #[test]
    fn salvage_of_the_largest_sequence_number_does_not_overflow() {
        let text = br#"{"outbox": [{"seq": 18446744073709551615, "channel": "cancel",
            "link": "l", "feedback": {"action_id": "1", "execution": "closed",
            "finished": "success", "progress": null, "details": []}}]}"#;
        assert_eq!(salvage(text).outbox.next_seq(), u64::MAX);
    }

    #[test]
    fn a_newer_format_is_refused_by_number() {
        let e = decode(br#"{"format": 2}"#).unwrap_err();
        assert_eq!(e, FormatError::Newer { found: 2 });
        assert!(e.to_string().contains("format 2 is newer"), "{e}");
    }

    #[test]
    fn salvage_takes_the_open_action_and_every_readable_outbox_entry() {
        let text = br#"{"phase": {"phase": "awaiting_reboot", "job": {"action_id": "5",
              "link": "http://h/deploymentBase/5", "target": "C"}},
            "outbox": [{"seq": 7, "channel": "deployment", "link": "http://h/deploymentBase/4",
              "feedback": {"action_id": "4", "execution": "closed", "finished": "failure",
                           "progress": null, "details": ["x"]}},
              {"seq": 8, "channel": "nowhere"}],
            "next_seq": 2, "finished_actions": ["4", 3]}"#;
        assert!(decode(text).is_err());
        let s = salvage(text);
        assert_eq!(
            s.open_action,
            Some(("5".into(), "http://h/deploymentBase/5".into()))
        );
        assert_eq!(s.outbox.len(), 1);
        assert_eq!(s.outbox[0].feedback.action_id, "4");
        assert_eq!(s.outbox.next_seq(), 8);
        assert_eq!(s.finished_actions, vec!["4".to_string()]);
        assert_eq!(salvage(b"{not json"), Salvage::default());
    }
}
