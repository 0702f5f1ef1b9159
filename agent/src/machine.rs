//! The update state machine. Pure: [`step`] maps (state, event) to (new state, actions) without
//! any I/O; the driver executes the actions in order and feeds results back as events.
//!
//! A job is a server action, or a local install (`ddi-agent install SOURCE`, [`Job::local`]):
//! the same phases, ordering and confirmation, but no action id, no feedback and no effect of
//! the server's polls on it; its end goes to [`Update::last_local`].
//!
//! The persisted [`State`] holds the phase of the current update, the last result, and the
//! feedback outbox (feedback that must reach the server, kept until delivered or refused with
//! 410). Ordering rules for power cuts live here:
//! - before writing a slot it is marked bad (and that is done before the state says Installing);
//! - the state says Installed (with the activation counted) before the environment save that
//!   activates the slot, and AwaitingReboot after it; the reboot comes after both. A power cut
//!   between the two leaves Installed with an activation in flight, which the next start
//!   resolves from the booted slot and the bootloader's next slot;
//! - the job's slot, once booted, is confirmed only through the health checks; and while the
//!   job's slot is running unconfirmed, the other slot (the only known-good image) is never
//!   written;
//! - after a reboot, the booted slot decides: the activated slot means confirm (health checks,
//!   mark good, `closed`/`success`); the old slot with the bootloader no longer pointing at the
//!   new one means the bootloader fell back (`closed`/`failure`).

use std::collections::BTreeMap;

use bootctl::Slot;

use crate::ddi::{
    Artifact, CancelRequest, Deployment, Execution, Feedback, Finished, Handling, Link,
};

/// One deployment being carried out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub action_id: String,
    /// The deploymentBase href; feedback goes to `{href}/feedback`.
    pub link: String,
    /// The slot being written: never the booted one.
    pub target: Slot,
    pub download_only: bool,
    /// The server allows activation (update not `skip`, window not `unavailable`).
    pub may_activate: bool,
    pub artifact: Artifact,
    /// Version of the chunk (for messages and status).
    pub version: String,
    /// Transient install failures so far.
    pub failed_tries: u32,
    /// Activating environment saves started for this job (counted before each save).
    pub activations: u32,
    /// The slot already holds this image (left by a download-only action of the same
    /// artifact): [`Action::Install`] reads it back and checks it instead of downloading.
    pub reuse: Option<SlotImage>,
    /// Download runs started for this job, counted durably before each: the progress feedback
    /// budget holds per action across restarts (see [`crate::feedback_budget`]).
    pub download_runs: u32,
    /// Set for a local install (`ddi-agent install SOURCE`): no server assigned this job, so its
    /// `action_id` and `link` are empty and nothing about it is ever sent to a server.
    pub local: Option<LocalOrigin>,
}

/// Where a local install's image came from, and when it started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalOrigin {
    /// The file path or http(s) URL given to `ddi-agent install`.
    pub source: String,
    /// Unix seconds.
    pub started_at: u64,
}

/// How the last local install ended (shown by `ddi-agent status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResult {
    pub origin: LocalOrigin,
    /// The slot it was written to.
    pub target: Slot,
    pub result: ResultKind,
    pub message: String,
}

impl Job {
    pub fn is_local(&self) -> bool {
        self.local.is_some()
    }
}

/// An image as it lies on a slot (after decompression or extraction): its length and the
/// sha256 of those bytes, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotImage {
    pub bytes: u64,
    pub sha256: String,
    /// The signature policy it was checked under ([`crate::install::BundlePolicy::fingerprint`]):
    /// a kept image is activated only under the same policy, else downloaded and checked again.
    pub policy: u64,
}

/// The image a download-only action (`update: skip`) left in the slot that is not booted. A
/// later action with the same artifact (same sha256) activates it after reading it back,
/// without a second download. Forgotten as soon as the slot may change hands: another job
/// starts, or the recorded slot is the booted one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Downloaded {
    /// The action last told `downloaded` for this image.
    pub action_id: String,
    pub slot: Slot,
    /// sha256 of the artifact as the server announced it: which artifact this is.
    pub artifact_sha256: String,
    pub version: String,
    pub image: SlotImage,
}

/// Where the current update is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Phase {
    #[default]
    Idle,
    /// Target slot marked bad; downloading and writing (resumable).
    Installing(Job),
    /// Written and verified; waiting for permission to activate (maintenance window), or
    /// being activated (`job.activations > 0`: the activating save may or may not have happened).
    Installed(Job),
    /// Target slot activated; a reboot was requested.
    AwaitingReboot(Job),
}

impl Phase {
    pub fn job(&self) -> Option<&Job> {
        match self {
            Phase::Idle => None,
            Phase::Installing(j) | Phase::Installed(j) | Phase::AwaitingReboot(j) => Some(j),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Installing(_) => "installing",
            Phase::Installed(_) => "installed",
            Phase::AwaitingReboot(_) => "awaiting_reboot",
        }
    }
}

/// How an action ended on this device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResultKind {
    Success,
    Failure,
    Canceled,
    Abandoned,
    /// Downloaded for a download-only action (`update: skip`): the action may come back to be
    /// activated (its maintenance window opened), so it does not count as finished here.
    Downloaded,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LastResult {
    pub action_id: String,
    pub result: ResultKind,
    pub message: String,
}

/// Which resource of the action a feedback goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channel {
    Deployment,
    Cancel,
}

/// Feedback owed to the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub seq: u64,
    pub channel: Channel,
    /// Action resource href; the body is POSTed to `{href}/feedback`.
    pub link: String,
    pub feedback: Feedback,
}

impl Outgoing {
    /// A `closed` with `failure` on the deployment channel: the update failed.
    pub fn is_failure(&self) -> bool {
        self.channel == Channel::Deployment
            && self.feedback.execution == Execution::Closed
            && self.feedback.finished == Finished::Failure
    }
}

/// Everything that survives restarts and reboots (stored by [`crate::state_file`], which maps
/// it to the file's own format). Only [`step`] changes it (and [`State::recovered`] makes one in
/// place of an unreadable file): the driver reads it and feeds events.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    update: Update,
    outbox: Outbox,
    caches: Caches,
}

/// What the update needs: where it is, how actions ended here, and which one waits for consent.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Update {
    phase: Phase,
    last_result: Option<LastResult>,
    /// Recently finished actions (newest last, bounded): never closed twice.
    finished_actions: Vec<String>,
    /// Action waiting for `ddi-agent consent accept|deny` (manual consent), and why.
    pending_consent: Option<PendingConsent>,
    /// The image a download-only action left in the slot that is not booted.
    downloaded: Option<Downloaded>,
    /// The last local install (`ddi-agent install SOURCE`); never an action of the server.
    last_local: Option<LocalResult>,
}

/// An action waiting for the user's `ddi-agent consent accept|deny` (`consent = "manual"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PendingConsent {
    pub action_id: String,
    pub reason: ConsentReason,
    /// What would be installed (version, artifact), when known; shown by `status`.
    pub what: String,
}

/// Why an action needs the user's consent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConsentReason {
    /// The server asks for confirmation (confirmationBase, hawkBit's user consent flow).
    Confirmation,
    /// A soft update (`download` or `update` is `attempt`): the device decides when.
    SoftUpdate,
}

impl ConsentReason {
    pub fn name(self) -> &'static str {
        match self {
            ConsentReason::Confirmation => "confirmation",
            ConsentReason::SoftUpdate => "soft_update",
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            ConsentReason::Confirmation => "the server asks to confirm it",
            ConsentReason::SoftUpdate => "a soft update (update: attempt) needs consent",
        }
    }
}

/// What the server was last told or showed. Saves requests and log lines; never decides
/// anything about the update.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Caches {
    /// Attributes last accepted by the server (configData).
    attributes_sent: Option<BTreeMap<String, String>>,
    /// The installedBase href last read (logged once per change).
    server_installed: Option<String>,
}

// Read access for the driver, the service and the CLI; `restore` rebuilds a stored state (for
// `crate::state_file`, inside this crate only). Every change goes through `step`.
impl State {
    pub(crate) fn restore(update: Update, outbox: Outbox, caches: Caches) -> State {
        State {
            update,
            outbox,
            caches,
        }
    }

    pub fn update(&self) -> &Update {
        &self.update
    }

    pub fn outbox(&self) -> &Outbox {
        &self.outbox
    }

    pub fn caches(&self) -> &Caches {
        &self.caches
    }
}

impl Update {
    pub(crate) fn restore(
        phase: Phase,
        last_result: Option<LastResult>,
        finished_actions: Vec<String>,
        pending_consent: Option<PendingConsent>,
        downloaded: Option<Downloaded>,
        last_local: Option<LocalResult>,
    ) -> Update {
        Update {
            phase,
            last_result,
            finished_actions,
            pending_consent,
            downloaded,
            last_local,
        }
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn last_result(&self) -> Option<&LastResult> {
        self.last_result.as_ref()
    }

    pub fn finished_actions(&self) -> &[String] {
        &self.finished_actions
    }

    pub fn pending_consent(&self) -> Option<&PendingConsent> {
        self.pending_consent.as_ref()
    }

    pub fn downloaded(&self) -> Option<&Downloaded> {
        self.downloaded.as_ref()
    }

    pub fn last_local(&self) -> Option<&LocalResult> {
        self.last_local.as_ref()
    }
}

impl Caches {
    pub(crate) fn restore(
        attributes_sent: Option<BTreeMap<String, String>>,
        server_installed: Option<String>,
    ) -> Caches {
        Caches {
            attributes_sent,
            server_installed,
        }
    }

    pub fn attributes_sent(&self) -> Option<&BTreeMap<String, String>> {
        self.attributes_sent.as_ref()
    }

    pub fn server_installed(&self) -> Option<&str> {
        self.server_installed.as_deref()
    }
}

/// Feedback owed to the server, oldest first, kept until delivered or refused for good. Reads
/// as a slice; entries are added by the machine and removed by [`Event::FeedbackDelivered`].
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Outbox {
    entries: Vec<Outgoing>,
    /// The sequence number of the next entry (never reused).
    next_seq: u64,
}

impl Outbox {
    /// The outbox as stored (entries and the next sequence number, exactly).
    pub(crate) fn restore(entries: Vec<Outgoing>, next_seq: u64) -> Outbox {
        Outbox { entries, next_seq }
    }

    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    fn queue(&mut self, channel: Channel, link: &str, feedback: Feedback) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.entries.push(Outgoing {
            seq,
            channel,
            link: link.to_string(),
            feedback,
        });
    }

    /// Drops the entry `seq`; false when there is none.
    fn remove(&mut self, seq: u64) -> bool {
        let before = self.entries.len();
        self.entries.retain(|o| o.seq != seq);
        self.entries.len() != before
    }
}

impl std::ops::Deref for Outbox {
    type Target = [Outgoing];
    fn deref(&self) -> &[Outgoing] {
        &self.entries
    }
}

impl<'a> IntoIterator for &'a Outbox {
    type Item = &'a Outgoing;
    type IntoIter = std::slice::Iter<'a, Outgoing>;
    fn into_iter(self) -> Self::IntoIter {
        self.entries.iter()
    }
}

/// How many finished action ids are remembered.
const FINISHED_MEMORY: usize = 32;

impl State {
    /// True when the action was finished here (result recorded or closing feedback owed). A
    /// download (`downloaded`) does not finish an action: it may come back to be activated.
    fn finished_locally(&self, action_id: &str) -> bool {
        self.update.last_result.as_ref().is_some_and(|r| {
            r.action_id == action_id
                && !matches!(r.result, ResultKind::Abandoned | ResultKind::Downloaded)
        }) || self.outbox.iter().any(|o| {
            o.feedback.action_id == action_id && o.feedback.execution != Execution::Downloaded
        }) || self.update.finished_actions.iter().any(|a| a == action_id)
    }

    /// True when the action's download-only image was written here, and its `downloaded` is
    /// owed or the result says so: offered again with `update: skip`, there is nothing to do.
    fn downloaded_here(&self, action_id: &str) -> bool {
        self.update
            .last_result
            .as_ref()
            .is_some_and(|r| r.action_id == action_id && r.result == ResultKind::Downloaded)
            || self.outbox.iter().any(|o| {
                o.feedback.action_id == action_id && o.feedback.execution == Execution::Downloaded
            })
            || self
                .update
                .downloaded
                .as_ref()
                .is_some_and(|d| d.action_id == action_id)
    }

    /// A fresh state in place of a state file that could not be read: the owed feedback and
    /// finished actions that could still be read, and for the action the file had open
    /// (`(id, deploymentBase href)`) a `closed`/`failure` naming `problem`, once, so the server
    /// does not wait for ever. Also returns that action's id when it was answered here.
    pub fn recovered(
        outbox: Outbox,
        finished_actions: Vec<String>,
        open_action: Option<(String, String)>,
        problem: &str,
    ) -> (State, Option<String>) {
        let mut s = State {
            update: Update {
                finished_actions,
                ..Update::default()
            },
            outbox,
            caches: Caches::default(),
        };
        let answered = open_action.filter(|(id, link)| {
            if s.finished_locally(id) {
                return false;
            }
            let message = format!("action {id} abandoned: {problem}");
            s.outbox.queue(
                Channel::Deployment,
                link,
                Feedback::new(id, Execution::Closed, Finished::Failure).detail(&message),
            );
            s.finish(id, ResultKind::Failure, message);
            true
        });
        (s, answered.map(|(id, _)| id))
    }

    fn finish(&mut self, action_id: &str, result: ResultKind, message: String) {
        let u = &mut self.update;
        u.phase = Phase::Idle;
        let finishes = !matches!(result, ResultKind::Abandoned | ResultKind::Downloaded);
        if finishes && !u.finished_actions.iter().any(|a| a == action_id) {
            u.finished_actions.push(action_id.to_string());
            if u.finished_actions.len() > FINISHED_MEMORY {
                u.finished_actions.remove(0);
            }
        }
        u.last_result = Some(LastResult {
            action_id: action_id.to_string(),
            result,
            message,
        });
    }

    /// Ends `job`: a server job as [`State::finish`], a local one in `last_local` (no action
    /// of the server is touched).
    fn finish_job(&mut self, job: &Job, result: ResultKind, message: String) {
        match &job.local {
            None => self.finish(&job.action_id, result, message),
            Some(origin) => {
                self.update.phase = Phase::Idle;
                self.update.last_local = Some(LocalResult {
                    origin: origin.clone(),
                    target: job.target,
                    result,
                    message,
                });
            }
        }
    }

    /// Queues `feedback` on the job's deployment channel; a local job has no server to tell.
    fn report(&mut self, job: &Job, feedback: Feedback) {
        if !job.is_local() {
            self.outbox.queue(Channel::Deployment, &job.link, feedback);
        }
    }
}

/// Delivery of the job's closing feedback; a local job has none (and may have no server).
fn deliver(job: &Job) -> Option<Action> {
    (!job.is_local()).then_some(Action::DeliverOutbox)
}

/// Progress feedback on the job's action, none for a local job.
fn notify(job: &Job, feedback: Feedback) -> Option<Action> {
    (!job.is_local()).then(|| Action::Notify {
        link: job.link.clone(),
        feedback,
    })
}
/// Fixed parameters of the machine (from the config).
#[derive(Debug, Clone)]
pub struct Params {
    /// Boot attempts the bootloader gives a new slot.
    pub attempts: u32,
    /// Chunk `part` holding the image.
    pub artifact_part: String,
    /// Consent is given without asking (`consent = "auto"`); otherwise the user answers.
    pub auto_consent: bool,
}

/// What the driver must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write the new state to disk now (ordering matters relative to the neighbours).
    Persist,
    MarkBad(Slot),
    /// Activate the slot for a trial boot; answered with [`Event::Activated`]. Always last.
    Activate(Slot),
    MarkGood,
    /// Keep the confirmed, running slot bootable when nothing of ours is on trial: what RAUC's
    /// mark-good does at every boot, so the `rauc` scheme's attempt counter of the running slot
    /// never runs out over ordinary reboots. Never confirms a trial (a no-op under `bootcount`).
    KeepBootedGood,
    /// Download and write; answered with [`Event::InstallDone`]. Always last.
    Install(Job),
    /// Answered with [`Event::HealthChecked`]. Always last.
    RunHealthChecks,
    /// Best-effort progress feedback (not owed: lost if the server is away).
    Notify {
        link: String,
        feedback: Feedback,
    },
    /// Try to deliver the outbox.
    DeliverOutbox,
    /// Nothing is written now, for this reason (logged); the action stays open.
    Defer(String),
    /// Run the reboot command. Always last.
    Reboot,
    /// Answer the server's consent request of `link` (confirmationBase); answered with
    /// [`Event::ConsentSent`]. Always last.
    SendConsent {
        link: Link,
        accept: bool,
        details: Vec<String>,
    },
    /// The user's recorded consent answer has been sent: remove it.
    ClearConsentAnswer,
}

/// An install failure as the machine needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallFailure {
    pub message: String,
    /// Transient (network) failure: worth another try later.
    pub retryable: bool,
}

/// How often a transient install failure is retried (on later polls) before failing the action.
pub const MAX_INSTALL_TRIES: u32 = 3;

/// How many activating saves a job gets. A second one is needed only when a power cut hit the
/// first activation and the next start cannot tell whether its save happened.
pub const MAX_ACTIVATIONS: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The agent started: which slot runs, which one the bootloader boots next.
    Started {
        booted: Slot,
        next: Slot,
    },
    /// The server offers a deployment (deploymentBase), with the bootloader's view.
    Deployment {
        link: Link,
        deployment: Deployment,
        booted: Slot,
        /// The slot the bootloader boots at the next power-on.
        next: Slot,
        /// The booted slot runs on trial (not confirmed); false when the scheme cannot tell.
        trial: bool,
        /// The user's recorded consent answer for this very action (`ddi-agent consent`), if
        /// any: a soft update waits for it under manual consent.
        consent: Option<bool>,
    },
    /// The server asks to cancel an action.
    Cancel {
        link: Link,
        request: CancelRequest,
    },
    /// A poll showed no action link at all.
    NoAction,
    /// The install (or, for a job that reuses a downloaded image, the read-back check) ended;
    /// success says what lies on the slot.
    InstallDone(Result<SlotImage, InstallFailure>),
    /// The environment save of [`Action::Activate`] is done.
    Activated,
    HealthChecked(Result<(), String>),
    /// The server offers the action of `link` and the agent refuses it before starting: its
    /// deploymentBase cannot be parsed, or the boot environment is unusable. Answered
    /// `closed`/`failure` with `reason`, once.
    DeploymentRefused {
        link: Link,
        reason: String,
    },
    /// The server asks for consent to the action of `link` (confirmationBase); `answer` is the
    /// user's recorded answer for this very action (`ddi-agent consent`), if any.
    ConfirmationAsked {
        link: Link,
        answer: Option<bool>,
        /// What is being confirmed (versions and artifacts of the action, as fetched).
        what: String,
    },
    /// The consent answer of [`Action::SendConsent`] reached the server.
    ConsentSent {
        action_id: String,
        accept: bool,
    },
    /// A poll showed no consent request.
    NoConfirmation,
    /// The server accepted these attributes (configData).
    AttributesSent(BTreeMap<String, String>),
    /// The installedBase of `href` was read (and logged).
    InstalledBaseRead {
        href: String,
    },
    /// `ddi-agent install SOURCE`: write the image of `origin` to the slot not booted and
    /// activate it. Nothing happens when [`local_install_refusal`] has a reason.
    LocalInstall {
        origin: LocalOrigin,
        booted: Slot,
        next: Slot,
        trial: bool,
    },
    /// The outbox entry `seq` is not owed any more: the server took it, or refused it for good
    /// (410 Gone, or a status saying it never will).
    FeedbackDelivered {
        seq: u64,
    },
}

/// The transition function.
pub fn step(params: &Params, state: State, event: Event) -> (State, Vec<Action>) {
    let mut s = state;
    let mut actions = Vec::new();
    match event {
        Event::Started { booted, next } => started(params, &mut s, &mut actions, booted, next),
        Event::Deployment {
            link,
            deployment,
            booted,
            next,
            trial,
            consent,
        } => {
            let boot = BootView {
                booted,
                next,
                trial,
            };
            let offer = Offer {
                link,
                d: deployment,
                consent,
            };
            on_deployment(params, &mut s, &mut actions, offer, boot)
        }
        Event::Cancel { link, request } => on_cancel(&mut s, &mut actions, link, request),
        Event::NoAction => {
            if s.update
                .pending_consent
                .as_ref()
                .is_some_and(|p| p.reason == ConsentReason::SoftUpdate)
            {
                // The soft update is gone: nothing waits any more.
                s.update.pending_consent = None;
                actions.push(Action::Persist);
            }
            if let Phase::Installing(job) | Phase::Installed(job) = s.update.phase.clone() {
                if job.is_local() {
                    // The server never had this job: its absence there says nothing.
                    return (s, actions);
                }
                // The server dropped the action (force quit, auto-close): stop, slot stays bad.
                s.finish(
                    &job.action_id,
                    ResultKind::Abandoned,
                    format!(
                        "action {} disappeared on the server; slot {} left marked bad",
                        job.action_id, job.target
                    ),
                );
                actions.extend([Action::MarkBad(job.target), Action::Persist]);
            }
        }
        Event::InstallDone(result) => on_install_done(&mut s, &mut actions, result),
        Event::Activated => on_activated(&mut s, &mut actions),
        Event::HealthChecked(result) => on_health(&mut s, &mut actions, result),
        Event::DeploymentRefused { link, reason } => on_refused(&mut s, &mut actions, link, reason),
        Event::ConfirmationAsked { link, answer, what } => {
            on_confirmation(params, &mut s, &mut actions, link, answer, what)
        }
        Event::ConsentSent { action_id, accept } => {
            // A denial keeps the action waiting on the server; it stays pending here too.
            let u = &mut s.update;
            u.pending_consent = match u.pending_consent.take() {
                _ if accept => None,
                Some(p) if p.action_id == action_id => Some(p),
                _ => Some(PendingConsent {
                    action_id,
                    reason: ConsentReason::Confirmation,
                    what: String::new(),
                }),
            };
            actions.extend([Action::ClearConsentAnswer, Action::Persist]);
        }
        Event::NoConfirmation => {
            if s.update
                .pending_consent
                .as_ref()
                .is_some_and(|p| p.reason == ConsentReason::Confirmation)
            {
                s.update.pending_consent = None;
                actions.push(Action::Persist);
            }
        }
        Event::AttributesSent(attributes) => {
            s.caches.attributes_sent = Some(attributes);
            actions.push(Action::Persist);
        }
        Event::InstalledBaseRead { href } => {
            s.caches.server_installed = Some(href);
            actions.push(Action::Persist);
        }
        Event::FeedbackDelivered { seq } => {
            if s.outbox.remove(seq) {
                actions.push(Action::Persist);
            }
        }
        Event::LocalInstall {
            origin,
            booted,
            next,
            trial,
        } => {
            let boot = BootView {
                booted,
                next,
                trial,
            };
            on_local_install(&mut s, &mut actions, origin, boot)
        }
    }
    (s, actions)
}

/// Why a local install may not start now, or `None`. A server action in progress keeps its
/// slot (the local install never abandons it); an activated slot is confirmed first; and the
/// bootloader's state must allow writing the other slot, as for a server action.
pub fn local_install_refusal(s: &State, booted: Slot, next: Slot, trial: bool) -> Option<String> {
    let busy = match &s.update.phase {
        Phase::Idle => None,
        // An interrupted local install (its slot is marked bad) is simply replaced.
        Phase::Installing(j) if j.is_local() => None,
        Phase::AwaitingReboot(j) | Phase::Installed(j) if j.activations > 0 => Some(format!(
            "slot {} is activated and waits for its reboot and confirmation{}; reboot first",
            j.target,
            if j.is_local() {
                String::new()
            } else {
                format!(" (server action {})", j.action_id)
            }
        )),
        Phase::Installing(j) | Phase::Installed(j) | Phase::AwaitingReboot(j) => Some(format!(
            "server action {} is in progress ({}, slot {}); let it finish or cancel it on the \
             server first",
            j.action_id,
            s.update.phase.name(),
            j.target
        )),
    };
    busy.or_else(|| {
        BootView {
            booted,
            next,
            trial,
        }
        .write_blocked()
        .map(|(reason, _)| reason)
    })
}

fn on_local_install(s: &mut State, actions: &mut Vec<Action>, origin: LocalOrigin, boot: BootView) {
    if local_install_refusal(s, boot.booted, boot.next, boot.trial).is_some() {
        return;
    }
    let filename = origin
        .source
        .rsplit('/')
        .find(|part| !part.is_empty())
        .unwrap_or(&origin.source)
        .to_string();
    let job = Job {
        action_id: String::new(),
        link: String::new(),
        target: boot.booted.other(),
        download_only: false,
        may_activate: true,
        artifact: Artifact {
            filename,
            hashes: Default::default(),
            size: None,
            download: Some(Link {
                href: origin.source.clone(),
            }),
        },
        version: String::new(),
        failed_tries: 0,
        activations: 0,
        reuse: None,
        download_runs: 0,
        local: Some(origin),
    };
    // The slot changes hands: an image a download-only action kept there is gone.
    s.update.downloaded = None;
    s.update.phase = Phase::Installing(job.clone());
    actions.extend([
        Action::MarkBad(job.target),
        Action::Persist,
        Action::Install(job),
    ]);
}

/// The confirmation flow: consent given automatically or by the user's answer is sent; without
/// an answer the action waits, and `ddi-agent consent` can see which one.
fn on_confirmation(
    params: &Params,
    s: &mut State,
    actions: &mut Vec<Action>,
    link: Link,
    answer: Option<bool>,
    what: String,
) {
    let action_id = link.action_id().unwrap_or_default();
    let (accept, detail) = match (params.auto_consent, answer) {
        (true, _) => (true, "confirmed automatically (consent = auto)"),
        (false, Some(true)) => (true, "accepted by the user"),
        (false, Some(false)) => (false, "denied by the user"),
        (false, None) => {
            wait_for_consent(s, actions, action_id, ConsentReason::Confirmation, what);
            return;
        }
    };
    let mut details = vec![detail.to_string()];
    if !what.is_empty() {
        details.push(format!("confirmation of {what}"));
    }
    actions.push(Action::SendConsent {
        link,
        accept,
        details,
    });
}

/// Records that `action_id` waits for the user's answer (once; `status` shows it).
fn wait_for_consent(
    s: &mut State,
    actions: &mut Vec<Action>,
    action_id: String,
    reason: ConsentReason,
    what: String,
) {
    let pending = PendingConsent {
        action_id,
        reason,
        what,
    };
    if s.update.pending_consent.as_ref() != Some(&pending) {
        s.update.pending_consent = Some(pending);
        actions.push(Action::Persist);
    }
}

/// A soft update (`attempt`) needs the user's consent under `consent = "manual"`; forced ones
/// do not.
fn needs_consent(params: &Params, d: &Deployment) -> bool {
    !params.auto_consent && (d.update == Handling::Attempt || d.download == Handling::Attempt)
}

/// Versions and artifacts of a deployment, for the user deciding on it.
pub fn describe_deployment(d: &Deployment) -> String {
    let chunks: Vec<String> = d
        .chunks
        .iter()
        .map(|c| {
            let files: Vec<&str> = c.artifacts.iter().map(|a| a.filename.as_str()).collect();
            format!("{} {} {} ({})", c.part, c.name, c.version, files.join(", "))
        })
        .collect();
    format!("action {}: {}", d.action_id, chunks.join("; "))
}

/// The downloaded image is forgotten once its slot is the booted one (booted by hand, or
/// after someone else's update): a running slot is nothing to activate.
fn forget_download_in(s: &mut State, actions: &mut Vec<Action>, booted: Slot) {
    if s.update
        .downloaded
        .as_ref()
        .is_some_and(|r| r.slot == booted)
    {
        s.update.downloaded = None;
        actions.push(Action::Persist);
    }
}

fn started(params: &Params, s: &mut State, actions: &mut Vec<Action>, booted: Slot, next: Slot) {
    forget_download_in(s, actions, booted);
    match s.update.phase.clone() {
        Phase::Idle => actions.push(Action::KeepBootedGood),
        Phase::Installing(job) if booted == job.target => {
            job_slot_running_unverified(s, actions, job);
        }
        Phase::Installing(job) if job.is_local() => {
            // Nobody carries an interrupted local install on: it ended here.
            let message = format!(
                "interrupted before the image was written and verified; slot {} left marked bad",
                job.target
            );
            s.finish_job(&job, ResultKind::Failure, message);
            actions.extend([Action::Persist, Action::KeepBootedGood]);
        }
        Phase::Installing(_) => actions.push(Action::KeepBootedGood),
        Phase::Installed(job) if job.activations == 0 => {
            // Waiting for the maintenance window; the next poll decides. Nothing of ours is on
            // trial, so the running slot is kept bootable; but should someone have booted the
            // waiting slot by hand, that trial is not ours to confirm.
            if booted != job.target {
                actions.push(Action::KeepBootedGood);
            }
        }
        Phase::Installed(job) if booted == job.target => {
            // Power cut between the activating save and persisting it: the new slot runs on
            // trial. It is confirmed by the health checks, never by this start alone.
            s.update.phase = Phase::AwaitingReboot(job);
            actions.extend([Action::Persist, Action::RunHealthChecks]);
        }
        Phase::Installed(job) if next == job.target => {
            // The activating save happened; the reboot did not.
            s.update.phase = Phase::AwaitingReboot(job);
            actions.extend([Action::Persist, Action::Reboot]);
        }
        Phase::Installed(job) if job.activations < MAX_ACTIVATIONS => {
            // The activation was cut: either its save never happened, or the slot was tried and
            // the bootloader fell back. Activating once more tells them apart safely.
            activate(s, actions, job);
        }
        Phase::Installed(job) | Phase::AwaitingReboot(job) => {
            if booted == job.target {
                actions.push(Action::RunHealthChecks);
            } else if next == job.target {
                // Activated, but the reboot has not happened yet.
                actions.push(Action::Reboot);
            } else {
                rolled_back(params, s, actions, job, booted);
            }
        }
    }
}

/// The bootloader fell back from the job's slot: report it and take the slot out of the list.
fn rolled_back(params: &Params, s: &mut State, actions: &mut Vec<Action>, job: Job, booted: Slot) {
    let message = format!(
        "rolled back to slot {booted} after {} attempts: slot {} did not boot",
        params.attempts, job.target
    );
    // The bootloader may still list the failed slot (rauc: in BOOT_ORDER, to be tried again once
    // the running slot's attempts run out): take it out.
    fail_job(s, actions, &job, message);
}

/// Ends the job `closed`/`failure` with `message`, its slot marked bad (one save, none when it
/// already is), the result durable and its delivery tried.
fn fail_job(s: &mut State, actions: &mut Vec<Action>, job: &Job, message: String) {
    s.report(
        job,
        Feedback::new(&job.action_id, Execution::Closed, Finished::Failure).detail(message.clone()),
    );
    s.finish_job(job, ResultKind::Failure, message);
    actions.extend([Action::MarkBad(job.target), Action::Persist]);
    actions.extend(deliver(job));
}

/// The slot being written (marked bad, never verified) is running: someone switched to it by
/// hand, or the bootloader had no other choice. Its image may be partial, and the other slot is
/// the only known-good one, so nothing is written: the action fails, the slot stays marked bad
/// and the device reboots into the other slot.
fn job_slot_running_unverified(s: &mut State, actions: &mut Vec<Action>, job: Job) {
    let message = format!(
        "slot {} was booted before its image was written and verified; nothing else is \
         written while it runs; slot marked bad, rebooting into slot {}",
        job.target,
        job.target.other()
    );
    fail_job(s, actions, &job, message);
    actions.push(Action::Reboot);
}

/// Picks the artifact to install, or says why the layout cannot be honoured.
pub fn choose_artifact(part: &str, d: &Deployment) -> Result<(Artifact, String), String> {
    let chunks: Vec<_> = d.chunks.iter().filter(|c| c.part == part).collect();
    let chunk = match chunks.as_slice() {
        [one] => *one,
        [] => {
            let parts: Vec<&str> = d.chunks.iter().map(|c| c.part.as_str()).collect();
            return Err(format!(
                "no chunk with part \"{part}\" in the deployment (parts: {})",
                if parts.is_empty() {
                    "none".to_string()
                } else {
                    parts.join(", ")
                }
            ));
        }
        _ => {
            return Err(format!(
                "{} chunks with part \"{part}\"; expected one",
                chunks.len()
            ))
        }
    };
    if chunk.encrypted {
        return Err(format!(
            "chunk \"{}\" is encrypted; encrypted artifacts are not supported",
            chunk.name
        ));
    }
    let artifact = match chunk.artifacts.as_slice() {
        [one] => one.clone(),
        [] => return Err(format!("chunk \"{}\" has no artifact", chunk.name)),
        many => {
            return Err(format!(
                "chunk \"{}\" has {} artifacts; expected exactly one image",
                chunk.name,
                many.len()
            ))
        }
    };
    if artifact.download.is_none() {
        return Err(format!(
            "artifact \"{}\" has no download link",
            artifact.filename
        ));
    }
    if artifact.hashes.sha256.is_none()
        && artifact.hashes.sha1.is_none()
        && artifact.hashes.md5.is_none()
    {
        return Err(format!(
            "artifact \"{}\" comes without any hash; refusing to install unverified data",
            artifact.filename
        ));
    }
    Ok((artifact, chunk.version.clone()))
}

/// What the bootloader says when a deployment is offered.
#[derive(Debug, Clone, Copy)]
struct BootView {
    booted: Slot,
    next: Slot,
    trial: bool,
}

impl BootView {
    /// Why no slot may be written now, and whether a reboot resolves it. Writing the other slot
    /// is safe only while the booted slot is confirmed and is the one the bootloader boots next:
    /// otherwise the other slot is the fallback, or about to be booted.
    fn write_blocked(&self) -> Option<(String, bool)> {
        if self.next != self.booted {
            Some((
                format!(
                    "the bootloader boots slot {} next, not the running slot {}; rebooting \
                     before anything is written",
                    self.next, self.booted
                ),
                true,
            ))
        } else if self.trial {
            Some((
                format!(
                    "slot {} runs on trial, not confirmed; slot {} is its fallback and is not \
                     written until the trial ends",
                    self.booted,
                    self.booted.other()
                ),
                false,
            ))
        } else {
            None
        }
    }
}

/// Defers an install the bootloader's state forbids; true when deferred.
fn defer_install(boot: &BootView, actions: &mut Vec<Action>) -> bool {
    let Some((reason, reboot)) = boot.write_blocked() else {
        return false;
    };
    actions.push(Action::Defer(reason));
    if reboot {
        actions.push(Action::Reboot);
    }
    true
}

/// A deployment as offered, with the user's recorded consent answer for it.
struct Offer {
    link: Link,
    d: Deployment,
    consent: Option<bool>,
}

fn on_deployment(
    params: &Params,
    s: &mut State,
    actions: &mut Vec<Action>,
    offer: Offer,
    boot: BootView,
) {
    let Offer { link, d, consent } = offer;
    let booted = boot.booted;
    let id = d.action_id.clone();
    if let Phase::Installing(job) = s.update.phase.clone() {
        if job.target == booted {
            // Normally resolved at start; never write either slot while this holds.
            job_slot_running_unverified(s, actions, job);
            return;
        }
    }
    if let Some(job) = s.update.phase.job() {
        if job.action_id == id {
            let mut job = job.clone();
            job.may_activate = d.may_activate();
            job.link = link.href.clone();
            match s.update.phase.clone() {
                Phase::Installing(_) => {
                    if defer_install(&boot, actions) {
                        return;
                    }
                    if job.reuse.is_none() {
                        job.download_runs += 1;
                    }
                    s.update.phase = Phase::Installing(job.clone());
                    actions.extend([
                        Action::MarkBad(job.target),
                        Action::Persist,
                        Action::Install(job),
                    ]);
                }
                Phase::Installed(_) if job.may_activate && job.activations >= MAX_ACTIVATIONS => {
                    // The activating save kept failing (the bootloader errors are in the log).
                    let message = format!(
                        "slot {} could not be activated ({} tries); slot marked bad",
                        job.target, job.activations
                    );
                    fail_job(s, actions, &job, message);
                }
                Phase::Installed(_) => {
                    s.update.phase = Phase::Installed(job.clone());
                    // Activating while another slot is set to boot, or on someone else's trial
                    // (possibly of this very slot), would take over a trial that is not ours.
                    if job.may_activate && !defer_install(&boot, actions) {
                        activate(s, actions, job);
                    }
                }
                Phase::AwaitingReboot(_) => reboot_if_pending(&job, boot, actions),
                Phase::Idle => {}
            }
            return;
        }
        if let Phase::AwaitingReboot(job) = &s.update.phase {
            // A new slot is already activated; its confirmation comes first.
            reboot_if_pending(job, boot, actions);
            return;
        }
        if let Phase::Installed(job) = &s.update.phase {
            if job.activations > 0 && boot.next == job.target && boot.booted != job.target {
                // Its activating save took effect though `awaiting_reboot` was not recorded:
                // the slot is set to boot, so its confirmation comes first, as above.
                let job = job.clone();
                s.update.phase = Phase::AwaitingReboot(job.clone());
                actions.push(Action::Persist);
                reboot_if_pending(&job, boot, actions);
                return;
            }
        }
        // Replaced without a cancel (auto-close on the server): the old one is dropped.
        let old = job.clone();
        s.finish_job(&old, ResultKind::Abandoned, replaced_message(&old, &id));
    }
    forget_download_in(s, actions, booted);
    let download_only = d.is_download_only();
    if s.finished_locally(&id) || (download_only && s.downloaded_here(&id)) {
        // Our closing feedback is on its way, the server has not seen it yet; or the image
        // is downloaded and the action waits for its maintenance window.
        actions.push(Action::DeliverOutbox);
        return;
    }
    let consented = needs_consent(params, &d);
    if consented {
        match consent {
            Some(true) => {}
            Some(false) => {
                // Declined: the action stays open on the server (hawkBit has no refusal of a
                // deployment); it waits here until the user accepts it after all.
                let what = format!("{}; declined by the user", describe_deployment(&d));
                wait_for_consent(s, actions, id.clone(), ConsentReason::SoftUpdate, what);
                actions.extend([
                    Action::Notify {
                        link: link.href.clone(),
                        feedback: Feedback::new(&id, Execution::Rejected, Finished::None)
                            .detail("soft update declined by the user (consent = manual)"),
                    },
                    Action::ClearConsentAnswer,
                ]);
                return;
            }
            None => {
                let what = describe_deployment(&d);
                wait_for_consent(s, actions, id, ConsentReason::SoftUpdate, what);
                return;
            }
        }
    }
    if defer_install(&boot, actions) {
        return;
    }
    match choose_artifact(&params.artifact_part, &d) {
        Err(reason) => {
            s.outbox.queue(
                Channel::Deployment,
                &link.href,
                Feedback::new(&id, Execution::Closed, Finished::Failure).detail(reason.clone()),
            );
            s.finish(&id, ResultKind::Failure, reason);
            actions.extend([Action::Persist, Action::DeliverOutbox]);
        }
        Ok((artifact, version)) => {
            let recorded = s.update.downloaded.clone().filter(|r| {
                r.slot == booted.other()
                    && artifact.hashes.sha256.as_deref() == Some(r.artifact_sha256.as_str())
            });
            if let (true, Some(record)) = (download_only, &recorded) {
                already_downloaded(s, actions, &link, &id, record);
                return;
            }
            let job = Job {
                action_id: id.clone(),
                link: link.href.clone(),
                target: booted.other(),
                download_only,
                may_activate: d.may_activate(),
                artifact,
                version,
                failed_tries: 0,
                activations: 0,
                local: None,
                download_runs: u32::from(recorded.is_none()),
                reuse: recorded.map(|r| r.image),
            };
            // The slot is this job's now: whatever was downloaded there is not kept.
            s.update.downloaded = None;
            if s.update
                .pending_consent
                .as_ref()
                .is_some_and(|p| p.action_id == id)
            {
                s.update.pending_consent = None;
            }
            s.update.phase = Phase::Installing(job.clone());
            let what = match (job.download_only, &job.reuse) {
                (true, _) => "download only: writing",
                (false, None) => "install: writing",
                (false, Some(_)) => "install: reading back the image downloaded earlier,",
            };
            actions.extend([
                Action::Notify {
                    link: link.href.clone(),
                    feedback: Feedback::new(&id, Execution::Proceeding, Finished::None).detail(
                        format!(
                            "{what} {} (version {}) in slot {}",
                            job.artifact.filename, job.version, job.target
                        ),
                    ),
                },
                Action::MarkBad(job.target),
                Action::Persist,
            ]);
            if consented {
                // Used: the job is durable, so the answer is not needed again.
                actions.push(Action::ClearConsentAnswer);
            }
            actions.push(Action::Install(job));
        }
    }
}

fn replaced_message(old: &Job, new_action_id: &str) -> String {
    if old.is_local() {
        format!("local install replaced by server action {new_action_id}")
    } else {
        format!(
            "action {} replaced by action {new_action_id}",
            old.action_id
        )
    }
}

/// A download-only action for the image a download-only action already left in the slot:
/// nothing to download; the action hears `downloaded` (durably, through the outbox).
fn already_downloaded(
    s: &mut State,
    actions: &mut Vec<Action>,
    link: &Link,
    action_id: &str,
    record: &Downloaded,
) {
    let message = format!(
        "version {} is already downloaded in slot {}; not activated (download only)",
        record.version, record.slot
    );
    s.outbox.queue(
        Channel::Deployment,
        &link.href,
        Feedback::new(action_id, Execution::Downloaded, Finished::Success).detail(message.clone()),
    );
    s.update.downloaded = Some(Downloaded {
        action_id: action_id.to_string(),
        ..record.clone()
    });
    s.finish(action_id, ResultKind::Downloaded, message);
    actions.extend([Action::Persist, Action::DeliverOutbox]);
}

/// The activated slot is still waiting for its reboot (a reboot command that failed, or that the
/// system did not follow): ask again.
fn reboot_if_pending(job: &Job, boot: BootView, actions: &mut Vec<Action>) {
    if boot.booted != job.target && boot.next == job.target {
        actions.push(Action::Reboot);
    }
}

/// Count the activation and make it durable, then activate (one environment save); the rest
/// follows on [`Event::Activated`].
fn activate(s: &mut State, actions: &mut Vec<Action>, mut job: Job) {
    job.activations += 1;
    let target = job.target;
    s.update.phase = Phase::Installed(job);
    actions.extend([Action::Persist, Action::Activate(target)]);
}

fn on_activated(s: &mut State, actions: &mut Vec<Action>) {
    let Phase::Installed(job) = s.update.phase.clone() else {
        return;
    };
    if job.activations == 0 {
        return;
    }
    s.update.phase = Phase::AwaitingReboot(job.clone());
    actions.push(Action::Persist);
    actions.extend(notify(
        &job,
        Feedback::new(&job.action_id, Execution::Proceeding, Finished::None)
            .detail(format!("slot {} activated; rebooting", job.target)),
    ));
    actions.push(Action::Reboot);
}

fn on_install_done(
    s: &mut State,
    actions: &mut Vec<Action>,
    result: Result<SlotImage, InstallFailure>,
) {
    let Phase::Installing(mut job) = s.update.phase.clone() else {
        return;
    };
    match result {
        Ok(image) if job.download_only => {
            let message = format!(
                "downloaded {} (version {}) to slot {}; not activated (download only)",
                job.artifact.filename, job.version, job.target
            );
            s.outbox.queue(
                Channel::Deployment,
                &job.link,
                Feedback::new(&job.action_id, Execution::Downloaded, Finished::Success)
                    .detail(message.clone()),
            );
            // Kept for a later action of the same artifact (identified by its sha256).
            s.update.downloaded = job.artifact.hashes.sha256.clone().map(|sha256| Downloaded {
                action_id: job.action_id.clone(),
                slot: job.target,
                artifact_sha256: sha256,
                version: job.version.clone(),
                image,
            });
            s.finish(&job.action_id, ResultKind::Downloaded, message);
            actions.extend([Action::Persist, Action::DeliverOutbox]);
        }
        Err(f) if job.reuse.is_some() => {
            // The downloaded image is not (all) there any more: download it after all.
            job.reuse = None;
            job.download_runs += 1;
            s.update.phase = Phase::Installing(job.clone());
            actions.extend([
                Action::Notify {
                    link: job.link.clone(),
                    feedback: Feedback::new(&job.action_id, Execution::Proceeding, Finished::None)
                        .detail(format!(
                            "the image downloaded earlier to slot {} does not check out ({}); \
                             downloading it again",
                            job.target, f.message
                        )),
                },
                Action::MarkBad(job.target),
                Action::Persist,
                Action::Install(job),
            ]);
        }
        Ok(_) => {
            s.update.phase = Phase::Installed(job.clone());
            actions.extend(notify(
                &job,
                Feedback::new(&job.action_id, Execution::Downloaded, Finished::None)
                    .detail(format!("written and verified in slot {}", job.target)),
            ));
            if job.may_activate {
                activate(s, actions, job);
            } else {
                actions.extend([
                    Action::Persist,
                    Action::Notify {
                        link: job.link.clone(),
                        feedback: Feedback::new(
                            &job.action_id,
                            Execution::Scheduled,
                            Finished::None,
                        )
                        .detail("waiting for the maintenance window to activate"),
                    },
                ]);
            }
        }
        // A local install is not polled again: the pipeline's own retries were its chances.
        Err(f) if f.retryable && !job.is_local() && job.failed_tries + 1 < MAX_INSTALL_TRIES => {
            job.failed_tries += 1;
            s.update.phase = Phase::Installing(job);
            actions.push(Action::Persist);
        }
        Err(f) => {
            let left = format!("slot {} left marked bad; nothing activated", job.target);
            s.report(
                &job,
                Feedback::new(&job.action_id, Execution::Closed, Finished::Failure)
                    .detail(f.message.clone())
                    .detail(left.clone()),
            );
            let message = if job.is_local() {
                format!("{}; {left}", f.message)
            } else {
                f.message
            };
            s.finish_job(&job, ResultKind::Failure, message);
            actions.push(Action::Persist);
            actions.extend(deliver(&job));
        }
    }
}

fn on_health(s: &mut State, actions: &mut Vec<Action>, result: Result<(), String>) {
    let Phase::AwaitingReboot(job) = s.update.phase.clone() else {
        return;
    };
    match result {
        Ok(_) => {
            let message = if job.is_local() {
                format!("running from slot {} and confirmed", job.target)
            } else {
                format!(
                    "version {} running from slot {} and confirmed",
                    job.version, job.target
                )
            };
            s.report(
                &job,
                Feedback::new(&job.action_id, Execution::Closed, Finished::Success)
                    .detail(message.clone()),
            );
            s.finish_job(&job, ResultKind::Success, message);
            actions.extend([Action::MarkGood, Action::Persist]);
            actions.extend(deliver(&job));
        }
        Err(output) => {
            let message = format!(
                "health check failed in slot {}; slot marked bad, rebooting into slot {}",
                job.target,
                job.target.other()
            );
            let report: Vec<&str> = output
                .lines()
                .filter(|l| !l.trim().is_empty())
                .take(20)
                .collect();
            let mut fb = Feedback::new(&job.action_id, Execution::Closed, Finished::Failure)
                .detail(message.clone());
            for line in &report {
                fb = fb.detail(*line);
            }
            s.report(&job, fb);
            let message = if job.is_local() && !report.is_empty() {
                // No server keeps the check's report: the local result does.
                format!("{message}: {}", report.join(" | "))
            } else {
                message
            };
            s.finish_job(&job, ResultKind::Failure, message);
            actions.extend([Action::MarkBad(job.target), Action::Persist]);
            actions.extend(deliver(&job));
            actions.push(Action::Reboot);
        }
    }
}

fn on_cancel(s: &mut State, actions: &mut Vec<Action>, link: Link, req: CancelRequest) {
    // The cancel action's own id names its feedback; `stopId` names the action it stops.
    let id = req.action_id.clone();
    let stop = req.stop_id.clone();
    if s.outbox
        .iter()
        .any(|o| o.channel == Channel::Cancel && o.feedback.action_id == id)
    {
        actions.push(Action::DeliverOutbox);
        return;
    }
    match s.update.phase.clone() {
        Phase::Installing(job) | Phase::Installed(job) if job.action_id == stop => {
            let message = format!(
                "canceled before activation; slot {} left marked bad",
                job.target
            );
            s.outbox.queue(
                Channel::Cancel,
                &link.href,
                Feedback::new(&id, Execution::Closed, Finished::Success).detail(message.clone()),
            );
            s.finish(&stop, ResultKind::Canceled, message);
            actions.extend([
                Action::MarkBad(job.target),
                Action::Persist,
                Action::DeliverOutbox,
            ]);
        }
        Phase::AwaitingReboot(job) if job.action_id == stop => {
            s.outbox.queue(
                Channel::Cancel,
                &link.href,
                Feedback::new(&id, Execution::Rejected, Finished::None).detail(format!(
                    "slot {} is already activated; the update completes",
                    job.target
                )),
            );
            actions.extend([Action::Persist, Action::DeliverOutbox]);
        }
        _ => {
            // Nothing of this action is in progress here: accept.
            s.outbox.queue(
                Channel::Cancel,
                &link.href,
                Feedback::new(&id, Execution::Closed, Finished::Success)
                    .detail("nothing in progress for this action; canceled"),
            );
            if s.update.phase.job().is_none() && !s.finished_locally_result(&stop) {
                s.update.last_result = Some(LastResult {
                    action_id: stop.clone(),
                    result: ResultKind::Canceled,
                    // A downloaded image stays kept for a later action of its artifact.
                    message: match &s.update.downloaded {
                        Some(d) if d.action_id == stop => format!(
                            "canceled after its download; the image stays in slot {}",
                            d.slot
                        ),
                        _ => "canceled before it started".into(),
                    },
                });
            }
            actions.extend([Action::Persist, Action::DeliverOutbox]);
        }
    }
}

fn on_refused(s: &mut State, actions: &mut Vec<Action>, link: Link, reason: String) {
    let Some(id) = link.action_id() else {
        return;
    };
    let mut message = reason;
    match s.update.phase.clone() {
        // A slot is (or may be) activated: its confirmation or rollback decides the action.
        Phase::AwaitingReboot(_) => return,
        Phase::Installed(job) if job.activations > 0 => return,
        Phase::Installing(job) | Phase::Installed(job) if job.action_id == id => {
            message = format!("{message}; slot {} left marked bad", job.target);
        }
        Phase::Installing(job) | Phase::Installed(job) => {
            s.finish_job(&job, ResultKind::Abandoned, replaced_message(&job, &id))
        }
        Phase::Idle => {}
    }
    if s.finished_locally(&id) {
        // Already answered (or the answer is on its way): never closed twice.
        actions.push(Action::DeliverOutbox);
        return;
    }
    s.outbox.queue(
        Channel::Deployment,
        &link.href,
        Feedback::new(&id, Execution::Closed, Finished::Failure).detail(message.clone()),
    );
    s.finish(&id, ResultKind::Failure, message);
    actions.extend([Action::Persist, Action::DeliverOutbox]);
}

impl State {
    fn finished_locally_result(&self, action_id: &str) -> bool {
        self.update
            .last_result
            .as_ref()
            .is_some_and(|r| r.action_id == action_id && r.result != ResultKind::Downloaded)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ddi::{Chunk, Hashes, MaintenanceWindow};

    fn params() -> Params {
        Params {
            attempts: 3,
            artifact_part: "os".into(),
            auto_consent: false,
        }
    }

    fn artifact() -> Artifact {
        Artifact {
            filename: "rootfs.img".into(),
            hashes: Hashes {
                sha256: Some("ab".repeat(32)),
                sha1: None,
                md5: None,
            },
            size: Some(1024),
            download: Some(Link {
                href: "http://h/art/rootfs.img".into(),
            }),
        }
    }

    fn image() -> SlotImage {
        SlotImage {
            policy: 0,
            bytes: 1024,
            sha256: "cd".repeat(32),
        }
    }

    fn deployment(id: &str, update: Handling, window: Option<MaintenanceWindow>) -> Deployment {
        Deployment {
            action_id: id.into(),
            download: Handling::Forced,
            update,
            maintenance_window: window,
            chunks: vec![Chunk {
                part: "os".into(),
                name: "fw".into(),
                version: "2.0".into(),
                encrypted: false,
                artifacts: vec![artifact()],
                metadata: BTreeMap::new(),
            }],
            history_status: None,
            history_messages: vec![],
        }
    }

    fn dlink(id: &str) -> Link {
        Link {
            href: format!("http://h/T/controller/v1/d/deploymentBase/{id}?c=1"),
        }
    }

    fn clink(id: &str) -> Link {
        Link {
            href: format!("http://h/T/controller/v1/d/cancelAction/{id}"),
        }
    }

    /// An offer while `booted` runs confirmed and is the bootloader's next slot.
    fn offer(s: State, d: Deployment, booted: Slot) -> (State, Vec<Action>) {
        offer_with(s, d, booted, booted, false)
    }

    fn offer_with(
        s: State,
        d: Deployment,
        booted: Slot,
        next: Slot,
        trial: bool,
    ) -> (State, Vec<Action>) {
        let link = dlink(&d.action_id);
        step(
            &params(),
            s,
            Event::Deployment {
                link,
                deployment: d,
                booted,
                next,
                trial,
                consent: None,
            },
        )
    }

    fn ev(s: State, e: Event) -> (State, Vec<Action>) {
        step(&params(), s, e)
    }

    fn only_outbox(s: &State) -> Vec<(Channel, Execution, Finished)> {
        s.outbox
            .iter()
            .map(|o| (o.channel, o.feedback.execution, o.feedback.finished))
            .collect()
    }

    fn kinds(actions: &[Action]) -> Vec<&'static str> {
        actions
            .iter()
            .map(|a| match a {
                Action::Persist => "persist",
                Action::MarkBad(_) => "mark_bad",
                Action::Activate(_) => "activate",
                Action::MarkGood => "mark_good",
                Action::KeepBootedGood => "keep_booted_good",
                Action::Install(_) => "install",
                Action::RunHealthChecks => "health",
                Action::Notify { .. } => "notify",
                Action::DeliverOutbox => "deliver",
                Action::Defer(_) => "defer",
                Action::Reboot => "reboot",
                Action::SendConsent { .. } => "send_consent",
                Action::ClearConsentAnswer => "clear_consent",
            })
            .collect()
    }

    /// Runs a forced update up to the reboot; returns the state at AwaitingReboot.
    fn through_activation(d: Deployment) -> State {
        let (s, a) = offer(State::default(), d, Slot::A);
        assert_eq!(kinds(&a), ["notify", "mark_bad", "persist", "install"]);
        assert_eq!(a[1], Action::MarkBad(Slot::B));
        let (s, a) = ev(s, Event::InstallDone(Ok(image())));
        // Installed, with the activation counted, is durable before the activating save.
        assert_eq!(kinds(&a), ["notify", "persist", "activate"]);
        assert_eq!(a[2], Action::Activate(Slot::B));
        assert!(
            matches!(s.update.phase, Phase::Installed(ref j) if j.target == Slot::B && j.activations == 1)
        );
        let (s, a) = ev(s, Event::Activated);
        assert_eq!(kinds(&a), ["persist", "notify", "reboot"]);
        assert!(matches!(s.update.phase, Phase::AwaitingReboot(ref j) if j.target == Slot::B));
        assert!(s.outbox.is_empty(), "nothing closed before the reboot");
        s
    }

    #[test]
    fn forced_update_confirms_after_reboot() {
        let s = through_activation(deployment("7", Handling::Forced, None));
        let (s, a) = ev(
            s,
            Event::Started {
                booted: Slot::B,
                next: Slot::B,
            },
        );
        assert_eq!(a, vec![Action::RunHealthChecks]);
        let (s, a) = ev(s, Event::HealthChecked(Ok(())));
        assert_eq!(kinds(&a), ["mark_good", "persist", "deliver"]);
        assert_eq!(
            only_outbox(&s),
            [(Channel::Deployment, Execution::Closed, Finished::Success)]
        );
        assert_eq!(s.update.phase, Phase::Idle);
        assert_eq!(
            s.update.last_result.as_ref().unwrap().result,
            ResultKind::Success
        );
        assert_eq!(
            s.outbox[0].link,
            "http://h/T/controller/v1/d/deploymentBase/7?c=1"
        );
    }

    #[test]
    fn soft_and_timeforced_install_like_forced_once_consented() {
        // Automatic consent (the default): as forced.
        let auto = Params {
            auto_consent: true,
            ..params()
        };
        let (_, a) = step(
            &auto,
            State::default(),
            Event::Deployment {
                link: dlink("7"),
                deployment: deployment("7", Handling::Attempt, None),
                booted: Slot::A,
                next: Slot::A,
                trial: false,
                consent: None,
            },
        );
        assert_eq!(kinds(&a), ["notify", "mark_bad", "persist", "install"]);
        // Manual consent, accepted: the same, and the answer is used up.
        let soft = deployment("7", Handling::Attempt, None);
        let (s, a) = offer_answered(State::default(), soft, Some(true));
        assert_eq!(
            kinds(&a),
            ["notify", "mark_bad", "persist", "clear_consent", "install"]
        );
        let (_, a) = ev(s, Event::InstallDone(Ok(image())));
        assert_eq!(kinds(&a), ["notify", "persist", "activate"]);
    }

    #[test]
    fn rollback_is_reported_with_slot_and_attempts() {
        let s = through_activation(deployment("7", Handling::Forced, None));
        let (s, a) = ev(
            s,
            Event::Started {
                booted: Slot::A,
                next: Slot::A,
            },
        );
        // The failed slot is taken out of the bootloader's list before the report.
        assert_eq!(kinds(&a), ["mark_bad", "persist", "deliver"]);
        assert_eq!(a[0], Action::MarkBad(Slot::B));
        assert_eq!(
            only_outbox(&s),
            [(Channel::Deployment, Execution::Closed, Finished::Failure)]
        );
        assert!(s.outbox[0].feedback.details[0].contains("rolled back to slot A after 3 attempts"));
        assert!(s.outbox[0].is_failure());
        assert_eq!(s.update.phase, Phase::Idle);
    }

    #[test]
    fn restart_before_reboot_reboots_again() {
        let s = through_activation(deployment("7", Handling::Forced, None));
        let (s2, a) = ev(
            s.clone(),
            Event::Started {
                booted: Slot::A,
                next: Slot::B,
            },
        );
        assert_eq!(a, vec![Action::Reboot]);
        assert_eq!(s2, s);
    }

    /// The state on disk when power is cut right after the activating save (or right before
    /// it): Installed, with one activation counted.
    fn cut_during_activation() -> State {
        let (s, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        let (s, a) = ev(s, Event::InstallDone(Ok(image())));
        assert_eq!(a.last(), Some(&Action::Activate(Slot::B)));
        assert!(matches!(&s.update.phase, Phase::Installed(j) if j.activations == 1));
        s
    }

    #[test]
    fn power_cut_after_the_activating_save_confirms_only_through_health_checks() {
        let installed = cut_during_activation();
        let (s, a) = ev(
            installed.clone(),
            Event::Started {
                booted: Slot::B,
                next: Slot::B,
            },
        );
        assert_eq!(kinds(&a), ["persist", "health"]);
        assert!(matches!(s.update.phase, Phase::AwaitingReboot(_)));
        let (_, a) = ev(s.clone(), Event::HealthChecked(Err("bad".into())));
        assert_eq!(a[0], Action::MarkBad(Slot::B));
        let (s, a) = ev(s, Event::HealthChecked(Ok(())));
        assert_eq!(kinds(&a), ["mark_good", "persist", "deliver"]);
        assert_eq!(s.update.last_result.unwrap().result, ResultKind::Success);
    }

    #[test]
    fn power_cut_around_the_activating_save_without_reboot() {
        let installed = cut_during_activation();
        // The save happened, the reboot did not (a crash, not a power cut): reboot.
        let (s, a) = ev(
            installed.clone(),
            Event::Started {
                booted: Slot::A,
                next: Slot::B,
            },
        );
        assert_eq!(kinds(&a), ["persist", "reboot"]);
        assert!(matches!(s.update.phase, Phase::AwaitingReboot(_)));
        // The save did not happen (or B was tried and the bootloader fell back): activate once
        // more, durably counted first.
        let (s, a) = ev(
            installed.clone(),
            Event::Started {
                booted: Slot::A,
                next: Slot::A,
            },
        );
        assert_eq!(kinds(&a), ["persist", "activate"]);
        assert!(matches!(&s.update.phase, Phase::Installed(j) if j.activations == 2));
        let (s, a) = ev(s, Event::Activated);
        assert_eq!(kinds(&a), ["persist", "notify", "reboot"]);
        // Cut again and still not booted: no third try, the fallback is reported.
        let Phase::AwaitingReboot(job) = s.update.phase.clone() else {
            panic!("{:?}", s.update.phase)
        };
        let mut again = s;
        again.update.phase = Phase::Installed(job);
        let (s, a) = ev(
            again,
            Event::Started {
                booted: Slot::A,
                next: Slot::A,
            },
        );
        assert_eq!(kinds(&a), ["mark_bad", "persist", "deliver"]);
        assert!(s.outbox[0].feedback.details[0].contains("rolled back to slot A"));
        assert_eq!(s.update.phase, Phase::Idle);
    }

    #[test]
    fn a_booted_job_slot_that_was_never_verified_fails_the_action_without_writing() {
        // Installing B (marked bad, half written), yet B runs: never confirm it, never write A.
        let (installing, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        let started = Event::Started {
            booted: Slot::B,
            next: Slot::B,
        };
        let (s, a) = ev(installing.clone(), started);
        assert_eq!(kinds(&a), ["mark_bad", "persist", "deliver", "reboot"]);
        assert_eq!(a[0], Action::MarkBad(Slot::B));
        assert_eq!(
            only_outbox(&s),
            [(Channel::Deployment, Execution::Closed, Finished::Failure)]
        );
        assert_eq!(s.update.phase, Phase::Idle);
        // The same holds when the offer comes first.
        let (s, a) = offer(installing, deployment("7", Handling::Forced, None), Slot::B);
        assert!(!a.iter().any(|a| matches!(a, Action::Install(_))), "{a:?}");
        assert_eq!(a[0], Action::MarkBad(Slot::B));
        assert_eq!(s.update.last_result.unwrap().result, ResultKind::Failure);
    }

    #[test]
    fn health_failure_marks_bad_reports_output_and_reboots_back() {
        let s = through_activation(deployment("7", Handling::Forced, None));
        let (s, _) = ev(
            s,
            Event::Started {
                booted: Slot::B,
                next: Slot::B,
            },
        );
        let (s, a) = ev(
            s,
            Event::HealthChecked(Err("check `false` exited with 1\nlast line".into())),
        );
        assert_eq!(kinds(&a), ["mark_bad", "persist", "deliver", "reboot"]);
        assert_eq!(a[0], Action::MarkBad(Slot::B));
        let fb = &s.outbox[0].feedback;
        assert_eq!(
            (fb.execution, fb.finished),
            (Execution::Closed, Finished::Failure)
        );
        assert!(fb.details.iter().any(|d| d.contains("exited with 1")));
        assert!(fb.details.iter().any(|d| d == "last line"));
        assert_eq!(s.update.phase, Phase::Idle);
        // After the reboot into A nothing more happens but keeping A bootable.
        let (s2, a) = ev(
            s.clone(),
            Event::Started {
                booted: Slot::A,
                next: Slot::A,
            },
        );
        assert_eq!(a, [Action::KeepBootedGood]);
        assert_eq!(s2, s);
    }

    #[test]
    fn download_only_closes_with_downloaded_and_never_activates() {
        let s = downloaded(deployment("8", Handling::Skip, None), Slot::B);
        // The same action offered again (server not yet updated): no second download.
        let (s2, a) = offer(s.clone(), deployment("8", Handling::Skip, None), Slot::B);
        assert_eq!(kinds(&a), ["deliver"]);
        assert_eq!(s2, s);
    }

    /// An image installed for a maintenance window, waiting for it: the phase agents before
    /// "`update: skip` is download only" wrote, still found in their state files.
    fn waiting_for_window(id: &str) -> State {
        let (mut s, _) = offer(
            State::default(),
            deployment(id, Handling::Forced, None),
            Slot::A,
        );
        let Phase::Installing(mut job) = s.update.phase.clone() else {
            panic!("not installing: {:?}", s.update.phase)
        };
        job.may_activate = false;
        s.update.phase = Phase::Installed(job);
        s
    }

    /// A scheduled action outside its window, as hawkBit shows it.
    fn window_closed(id: &str) -> Deployment {
        deployment(id, Handling::Skip, Some(MaintenanceWindow::Unavailable))
    }

    /// The same action once its window opened.
    fn window_open(id: &str) -> Deployment {
        deployment(id, Handling::Forced, Some(MaintenanceWindow::Available))
    }

    /// Offers the download-only `d` with `booted` running and completes its download: checks
    /// that `downloaded` is owed (outbox, not best effort) and the image kept.
    fn downloaded(d: Deployment, booted: Slot) -> State {
        let id = d.action_id.clone();
        let (s, a) = offer(State::default(), d, booted);
        assert!(
            matches!(&a[3], Action::Install(j) if j.download_only && !j.may_activate && j.target == booted.other())
        );
        let (s, a) = ev(s, Event::InstallDone(Ok(image())));
        assert_eq!(kinds(&a), ["persist", "deliver"]);
        assert_eq!(
            only_outbox(&s),
            [(
                Channel::Deployment,
                Execution::Downloaded,
                Finished::Success
            )]
        );
        assert_eq!(s.update.phase, Phase::Idle);
        assert_eq!(
            s.update.downloaded.as_ref().map(|r| r.action_id.as_str()),
            Some(id.as_str())
        );
        s
    }

    #[test]
    fn maintenance_window_downloads_now_and_activates_the_same_image_later() {
        let s = downloaded(window_closed("9"), Slot::A);
        let record = s.update.downloaded.clone().expect("download kept");
        assert_eq!((record.slot, record.action_id.as_str()), (Slot::B, "9"));
        assert_eq!(record.image, image());
        // Still unavailable: nothing, not even a second `downloaded`.
        let (s2, a) = offer(s.clone(), window_closed("9"), Slot::A);
        assert_eq!(kinds(&a), ["deliver"]);
        assert_eq!(s2, s);
        // Window opens (the `downloaded` already delivered or not): the slot is read back, not
        // downloaded, then activated.
        let (s, a) = offer(s, window_open("9"), Slot::A);
        assert_eq!(kinds(&a), ["notify", "mark_bad", "persist", "install"]);
        assert!(
            matches!(a.last(), Some(Action::Install(j)) if j.reuse == Some(image()) && j.target == Slot::B)
        );
        assert_eq!(s.update.downloaded, None, "the slot belongs to the job now");
        let (s, a) = ev(s, Event::InstallDone(Ok(image())));
        assert_eq!(kinds(&a), ["notify", "persist", "activate"]);
        let (s, a) = ev(s, Event::Activated);
        assert_eq!(kinds(&a), ["persist", "notify", "reboot"]);
        let (s, _) = ev(
            s,
            Event::Started {
                booted: Slot::B,
                next: Slot::B,
            },
        );
        let (s, _) = ev(s, Event::HealthChecked(Ok(())));
        let closed: Vec<_> = s
            .outbox
            .iter()
            .filter(|o| o.feedback.execution == Execution::Closed)
            .map(|o| (o.feedback.action_id.as_str(), o.feedback.finished))
            .collect();
        assert_eq!(closed, [("9", Finished::Success)]);
    }

    #[test]
    fn a_new_action_of_a_downloaded_artifact_reuses_it() {
        let s = downloaded(deployment("8", Handling::Skip, None), Slot::A);
        let delivered = |mut s: State| {
            let seqs: Vec<u64> = s.outbox.iter().map(|o| o.seq).collect();
            for seq in seqs {
                s = ev(s, Event::FeedbackDelivered { seq }).0;
            }
            s
        };
        let s = delivered(s);
        // Another download-only action of the same artifact: nothing downloaded, `downloaded`.
        let (s, a) = offer(s, deployment("10", Handling::Skip, None), Slot::A);
        assert_eq!(kinds(&a), ["persist", "deliver"]);
        assert_eq!(
            only_outbox(&s),
            [(
                Channel::Deployment,
                Execution::Downloaded,
                Finished::Success
            )]
        );
        assert_eq!(s.update.downloaded.as_ref().unwrap().action_id, "10");
        let s = delivered(s);
        // A forced action of the same artifact: read back and activated, no download.
        let (s, a) = offer(s, deployment("11", Handling::Forced, None), Slot::A);
        assert!(matches!(a.last(), Some(Action::Install(j)) if j.reuse.is_some()));
        // The slot no longer holds it (overwritten meanwhile): downloaded after all.
        let (s, a) = ev(
            s,
            Event::InstallDone(Err(InstallFailure {
                message: "sha256 of the slot image mismatch".into(),
                retryable: false,
            })),
        );
        assert_eq!(kinds(&a), ["notify", "mark_bad", "persist", "install"]);
        assert!(matches!(a.last(), Some(Action::Install(j)) if j.reuse.is_none()));
        assert!(s.outbox.is_empty(), "no failure reported: {:?}", s.outbox);
        let (_, a) = ev(s, Event::InstallDone(Ok(image())));
        assert_eq!(kinds(&a), ["notify", "persist", "activate"]);
    }

    #[test]
    fn a_downloaded_image_is_not_reused_for_another_artifact_or_once_its_slot_booted() {
        let downloaded = || downloaded(window_closed("9"), Slot::A);
        // Another artifact: a normal download, and the record is gone (the slot is rewritten).
        let mut other = deployment("12", Handling::Forced, None);
        other.chunks[0].artifacts[0].hashes.sha256 = Some("ef".repeat(32));
        let (s, a) = offer(downloaded(), other, Slot::A);
        assert!(matches!(a.last(), Some(Action::Install(j)) if j.reuse.is_none()));
        assert_eq!(s.update.downloaded, None);
        // The downloaded slot was booted (by hand) meanwhile: forgotten at start ...
        let (s, a) = ev(
            downloaded(),
            Event::Started {
                booted: Slot::B,
                next: Slot::B,
            },
        );
        assert_eq!(s.update.downloaded, None);
        assert_eq!(kinds(&a), ["persist", "keep_booted_good"]);
        // ... and when the window opens the image is downloaded into slot A.
        let (_, a) = offer(s, window_open("9"), Slot::B);
        assert!(
            matches!(a.last(), Some(Action::Install(j)) if j.reuse.is_none() && j.target == Slot::A)
        );
        // Found booted at an offer (no start in between): the same.
        let (s, a) = offer(downloaded(), window_open("9"), Slot::B);
        assert_eq!(s.update.downloaded, None);
        assert!(
            matches!(a.last(), Some(Action::Install(j)) if j.reuse.is_none() && j.target == Slot::A)
        );
    }

    #[test]
    fn a_downloaded_image_survives_the_action_going_away() {
        let d = deployment("8", Handling::Skip, Some(MaintenanceWindow::Available));
        let s = downloaded(d, Slot::A);
        // hawkBit closed the DOWNLOAD_ONLY action on `downloaded`: no action any more. The
        // slot is not given up as abandoned.
        let (s2, a) = ev(s.clone(), Event::NoAction);
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(s2, s);
        assert!(s.update.downloaded.is_some());
        assert_eq!(
            s.update.last_result.as_ref().unwrap().result,
            ResultKind::Downloaded
        );
        // Canceled on the server (a scheduled action): the result says so, the image stays.
        let (s, _) = ev(
            s,
            Event::Cancel {
                link: clink("8"),
                request: CancelRequest {
                    action_id: "8".into(),
                    stop_id: "8".into(),
                },
            },
        );
        let result = s.update.last_result.as_ref().unwrap();
        assert_eq!(result.result, ResultKind::Canceled);
        assert!(result.message.contains("stays in slot B"), "{result:?}");
        assert!(s.update.downloaded.is_some());
    }

    #[test]
    fn install_failures() {
        let (s, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        let transient = || {
            Event::InstallDone(Err(InstallFailure {
                message: "connection reset".into(),
                retryable: true,
            }))
        };
        let (s, a) = ev(s, transient());
        assert_eq!(kinds(&a), ["persist"]);
        assert!(matches!(&s.update.phase, Phase::Installing(j) if j.failed_tries == 1));
        // Resumed on the next offer without a new "started" message; the run is counted
        // durably first (the progress budget holds per action).
        assert!(matches!(&s.update.phase, Phase::Installing(j) if j.download_runs == 1));
        let (s, a) = offer(s, deployment("7", Handling::Forced, None), Slot::A);
        assert_eq!(kinds(&a), ["mark_bad", "persist", "install"]);
        assert!(matches!(a.last(), Some(Action::Install(j)) if j.download_runs == 2));
        let (s, _) = ev(s, transient());
        let (s, a) = ev(s, transient());
        assert_eq!(kinds(&a), ["persist", "deliver"]);
        assert_eq!(
            only_outbox(&s),
            [(Channel::Deployment, Execution::Closed, Finished::Failure)]
        );
        let (s, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        let (s, _) = ev(
            s,
            Event::InstallDone(Err(InstallFailure {
                message: "sha256 mismatch".into(),
                retryable: false,
            })),
        );
        assert!(s.outbox[0].feedback.details[0].contains("sha256 mismatch"));
        assert_eq!(s.update.last_result.unwrap().result, ResultKind::Failure);
    }

    #[test]
    fn unusable_layouts_are_refused_with_a_reason() {
        let mut no_os = deployment("5", Handling::Forced, None);
        no_os.chunks[0].part = "bApp".into();
        let mut two = deployment("5", Handling::Forced, None);
        two.chunks[0].artifacts.push(artifact());
        let mut encrypted = deployment("5", Handling::Forced, None);
        encrypted.chunks[0].encrypted = true;
        let mut unhashed = deployment("5", Handling::Forced, None);
        unhashed.chunks[0].artifacts[0].hashes = Hashes::default();
        let mut nolink = deployment("5", Handling::Forced, None);
        nolink.chunks[0].artifacts[0].download = None;
        for (d, needle) in [
            (no_os, "no chunk with part \"os\""),
            (two, "2 artifacts"),
            (encrypted, "encrypted"),
            (unhashed, "without any hash"),
            (nolink, "no download link"),
        ] {
            let (s, a) = offer(State::default(), d, Slot::A);
            assert_eq!(kinds(&a), ["persist", "deliver"], "{needle}");
            assert!(
                s.outbox[0].feedback.details[0].contains(needle),
                "{:?}",
                s.outbox[0].feedback.details
            );
            assert_eq!(s.outbox[0].feedback.finished, Finished::Failure);
        }
    }

    #[test]
    fn cancel_at_each_stage() {
        let d = || deployment("7", Handling::Forced, None);
        // While installing (e.g. after a restart mid-download).
        let (s, _) = offer(State::default(), d(), Slot::A);
        let (s, a) = ev(
            s,
            Event::Cancel {
                link: clink("7"),
                request: CancelRequest {
                    action_id: "7".into(),
                    stop_id: "7".into(),
                },
            },
        );
        assert_eq!(kinds(&a), ["mark_bad", "persist", "deliver"]);
        assert_eq!(
            only_outbox(&s),
            [(Channel::Cancel, Execution::Closed, Finished::Success)]
        );
        assert_eq!(s.outbox[0].link, clink("7").href);
        assert_eq!(
            s.update.last_result.as_ref().unwrap().result,
            ResultKind::Canceled
        );
        assert_eq!(s.update.phase, Phase::Idle);
        // Asked again before the answer is delivered: not queued twice.
        let (s2, a) = ev(
            s.clone(),
            Event::Cancel {
                link: clink("7"),
                request: CancelRequest {
                    action_id: "7".into(),
                    stop_id: "7".into(),
                },
            },
        );
        assert_eq!(kinds(&a), ["deliver"]);
        assert_eq!(s2.outbox.len(), 1);

        // Installed, waiting for the window.
        let s = waiting_for_window("7");
        let cancel = Event::Cancel {
            link: clink("7"),
            request: CancelRequest {
                action_id: "7".into(),
                stop_id: "7".into(),
            },
        };
        let (s, a) = ev(s, cancel.clone());
        assert_eq!(a[0], Action::MarkBad(Slot::B));
        assert_eq!(s.update.phase, Phase::Idle);

        // After activation: rejected, the update goes on.
        let s = through_activation(d());
        let (s, a) = ev(s, cancel.clone());
        assert_eq!(kinds(&a), ["persist", "deliver"]);
        assert_eq!(
            only_outbox(&s),
            [(Channel::Cancel, Execution::Rejected, Finished::None)]
        );
        assert!(matches!(s.update.phase, Phase::AwaitingReboot(_)));

        // Nothing in progress: accept.
        let (s, _) = ev(State::default(), cancel);
        assert_eq!(
            only_outbox(&s),
            [(Channel::Cancel, Execution::Closed, Finished::Success)]
        );
        assert_eq!(s.update.phase, Phase::Idle);
    }

    #[test]
    fn cancel_of_another_action_leaves_the_job_alone() {
        let (s, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        let (s, _) = ev(
            s,
            Event::Cancel {
                link: clink("6"),
                request: CancelRequest {
                    action_id: "6".into(),
                    stop_id: "6".into(),
                },
            },
        );
        assert!(matches!(&s.update.phase, Phase::Installing(j) if j.action_id == "7"));
        assert_eq!(s.outbox[0].feedback.action_id, "6");
    }

    #[test]
    fn vanished_or_replaced_actions_are_abandoned() {
        let (s, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        let (s2, a) = ev(s.clone(), Event::NoAction);
        assert_eq!(a, vec![Action::MarkBad(Slot::B), Action::Persist]);
        assert_eq!(s2.update.phase, Phase::Idle);
        assert_eq!(s2.update.last_result.unwrap().result, ResultKind::Abandoned);
        let (s3, a) = offer(s, deployment("8", Handling::Forced, None), Slot::A);
        assert!(matches!(a.last(), Some(Action::Install(j)) if j.action_id == "8"));
        assert!(matches!(&s3.update.phase, Phase::Installing(j) if j.action_id == "8"));
        // While awaiting a reboot, a new action waits.
        let s = through_activation(deployment("7", Handling::Forced, None));
        let (s2, a) = offer(s.clone(), deployment("8", Handling::Forced, None), Slot::A);
        assert!(a.is_empty());
        assert_eq!(s2, s);
        let (s2, a) = ev(s.clone(), Event::NoAction);
        assert!(a.is_empty());
        assert_eq!(s2, s);
    }

    #[test]
    fn nothing_is_written_while_the_fallback_is_needed() {
        let d = || deployment("7", Handling::Forced, None);
        // A reboot into A is pending (a health-failed or unverified B runs, and the reboot did
        // not happen): no install; reboot first.
        let (s, a) = offer_with(State::default(), d(), Slot::B, Slot::A, false);
        assert_eq!(kinds(&a), ["defer", "reboot"]);
        assert_eq!(s, State::default());
        // Someone else's trial of the booted slot: wait, never write its fallback.
        let (s, a) = offer_with(State::default(), d(), Slot::B, Slot::B, true);
        assert_eq!(kinds(&a), ["defer"]);
        assert_eq!(s, State::default());
        // The same when resuming an install.
        let (installing, _) = offer(State::default(), d(), Slot::A);
        let (s, a) = offer_with(installing.clone(), d(), Slot::A, Slot::A, true);
        assert_eq!(kinds(&a), ["defer"]);
        assert_eq!(s, installing);
        // Once confirmed, the install starts.
        let (_, a) = offer_with(State::default(), d(), Slot::B, Slot::B, false);
        assert!(matches!(a.last(), Some(Action::Install(j)) if j.target == Slot::A));
    }

    #[test]
    fn a_waiting_slot_is_not_activated_during_a_foreign_trial() {
        let s = waiting_for_window("9");
        // Someone booted the waiting slot B on a trial of their own; the window opens.
        let open = deployment("9", Handling::Forced, Some(MaintenanceWindow::Available));
        let (s2, a) = offer_with(s.clone(), open.clone(), Slot::B, Slot::B, true);
        assert_eq!(kinds(&a), ["defer"]);
        assert!(!a.contains(&Action::Activate(Slot::B)));
        assert!(matches!(&s2.update.phase, Phase::Installed(j) if j.activations == 0));
        // Booted A, but B set to boot next by someone else: reboot first, no activation.
        let (_, a) = offer_with(s.clone(), open.clone(), Slot::A, Slot::B, false);
        assert_eq!(kinds(&a), ["defer", "reboot"]);
        // Back on a confirmed A booted next: activate.
        let (_, a) = offer_with(s, open, Slot::A, Slot::A, false);
        assert_eq!(kinds(&a), ["persist", "activate"]);
    }

    #[test]
    fn a_reboot_that_did_not_happen_is_asked_for_again() {
        let s = through_activation(deployment("7", Handling::Forced, None));
        for id in ["7", "8"] {
            let (s2, a) = offer_with(
                s.clone(),
                deployment(id, Handling::Forced, None),
                Slot::A,
                Slot::B,
                false,
            );
            assert_eq!(a, [Action::Reboot], "{id}");
            assert_eq!(s2, s);
        }
    }

    #[test]
    fn an_activation_that_keeps_failing_ends_the_action() {
        let (s, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        // The activating save fails twice (an error, the state stays Installed): each offer
        // tries again, then gives up with a failure instead of counting on.
        let (mut s, _) = ev(s, Event::InstallDone(Ok(image())));
        for _ in 1..MAX_ACTIVATIONS {
            let (next, a) = offer(s, deployment("7", Handling::Forced, None), Slot::A);
            assert_eq!(kinds(&a), ["persist", "activate"]);
            s = next;
        }
        let (s, a) = offer(s, deployment("7", Handling::Forced, None), Slot::A);
        assert_eq!(kinds(&a), ["mark_bad", "persist", "deliver"]);
        assert!(s.outbox[0].feedback.details[0].contains("could not be activated"));
        assert_eq!(s.update.phase, Phase::Idle);
    }

    #[test]
    fn a_waiting_slot_booted_by_hand_is_not_confirmed() {
        let s = waiting_for_window("9");
        let (s2, a) = ev(
            s.clone(),
            Event::Started {
                booted: Slot::B,
                next: Slot::B,
            },
        );
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(s2, s);
    }

    #[test]
    fn stray_events_change_nothing() {
        for e in [
            Event::InstallDone(Ok(image())),
            Event::Activated,
            Event::HealthChecked(Ok(())),
            Event::HealthChecked(Err("x".into())),
            Event::NoAction,
        ] {
            let (s, a) = ev(State::default(), e.clone());
            assert_eq!(s, State::default(), "{e:?}");
            assert!(a.is_empty(), "{e:?}");
        }
        // A start with nothing of ours pending only keeps the running slot bootable (the
        // bootloader side decides whether that writes anything).
        let started = Event::Started {
            booted: Slot::A,
            next: Slot::B,
        };
        let (s, a) = ev(State::default(), started);
        assert_eq!(s, State::default());
        assert_eq!(a, [Action::KeepBootedGood]);
    }

    #[test]
    fn repeated_offer_while_awaiting_reboot_does_nothing() {
        let s = through_activation(deployment("7", Handling::Forced, None));
        let (s2, a) = offer(s.clone(), deployment("7", Handling::Forced, None), Slot::A);
        assert!(a.is_empty());
        assert_eq!(s2, s);
    }

    #[test]
    fn outbox_sequence_and_delivery() {
        // Two answers owed: a failed install and a cancel of another action.
        let (s, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        let (s, _) = ev(
            s,
            Event::InstallDone(Err(InstallFailure {
                message: "hash".into(),
                retryable: false,
            })),
        );
        let (s, _) = ev(
            s,
            Event::Cancel {
                link: clink("6"),
                request: CancelRequest {
                    action_id: "6".into(),
                    stop_id: "6".into(),
                },
            },
        );
        assert_eq!(s.outbox.iter().map(|o| o.seq).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(s.outbox.next_seq(), 2);
        // The first is delivered (or refused for good): it is not owed any more, durably.
        let (s, a) = ev(s, Event::FeedbackDelivered { seq: 0 });
        assert_eq!(kinds(&a), ["persist"]);
        assert_eq!(s.outbox.len(), 1);
        assert_eq!(s.outbox[0].seq, 1);
        // The same answer again (a retried request): nothing changes, nothing is written.
        let (s2, a) = ev(s.clone(), Event::FeedbackDelivered { seq: 0 });
        assert!(a.is_empty());
        assert_eq!(s2, s);
        // Sequence numbers are never reused, also after the outbox runs empty.
        let (s, _) = ev(s, Event::FeedbackDelivered { seq: 1 });
        assert!(s.outbox.is_empty());
        let (s, _) = ev(s, refused("9"));
        assert_eq!(s.outbox[0].seq, 2);
        // Delivery changes nothing else.
        assert_eq!(s.update.last_result.as_ref().unwrap().action_id, "9");
        let back = crate::state_file::decode(&crate::state_file::encode(&s)).unwrap();
        assert_eq!(back, s);
    }

    fn confirmation(id: &str, answer: Option<bool>) -> Event {
        Event::ConfirmationAsked {
            link: Link {
                href: format!("http://h/T/controller/v1/d/confirmationBase/{id}?c=1"),
            },
            answer,
            what: String::new(),
        }
    }

    #[test]
    fn consent_waits_for_the_users_answer_and_sends_it() {
        // No answer yet: the action waits, durably, once.
        let (s, a) = ev(State::default(), confirmation("4", None));
        assert_eq!(kinds(&a), ["persist"]);
        assert_eq!(pending(&s), Some(("4", ConsentReason::Confirmation)));
        let (s2, a) = ev(s.clone(), confirmation("4", None));
        assert!(a.is_empty());
        assert_eq!(s2, s);
        // Accepted: sent first; only once the server has it is the answer forgotten.
        let (s2, a) = ev(s.clone(), confirmation("4", Some(true)));
        assert_eq!(
            a,
            [Action::SendConsent {
                link: Link {
                    href: "http://h/T/controller/v1/d/confirmationBase/4?c=1".into()
                },
                accept: true,
                details: vec!["accepted by the user".into()],
            }]
        );
        assert_eq!(s2, s, "nothing changes before the server has the answer");
        let (s2, a) = ev(
            s.clone(),
            Event::ConsentSent {
                action_id: "4".into(),
                accept: true,
            },
        );
        assert_eq!(kinds(&a), ["clear_consent", "persist"]);
        assert_eq!(s2.update.pending_consent, None);
        // Denied: the action keeps waiting on the server, and here.
        let (_, a) = ev(s.clone(), confirmation("4", Some(false)));
        assert!(
            matches!(&a[..], [Action::SendConsent { accept: false, details, .. }]
            if details == &["denied by the user"])
        );
        let (s2, a) = ev(
            s.clone(),
            Event::ConsentSent {
                action_id: "4".into(),
                accept: false,
            },
        );
        assert_eq!(kinds(&a), ["clear_consent", "persist"]);
        assert_eq!(pending(&s2), Some(("4", ConsentReason::Confirmation)));
        // The server no longer asks: nothing waits.
        let (s2, a) = ev(s, Event::NoConfirmation);
        assert_eq!(kinds(&a), ["persist"]);
        assert_eq!(s2, State::default());
        let (s2, a) = ev(State::default(), Event::NoConfirmation);
        assert!(a.is_empty());
        assert_eq!(s2, State::default());
    }

    fn pending(s: &State) -> Option<(&str, ConsentReason)> {
        s.update
            .pending_consent
            .as_ref()
            .map(|p| (p.action_id.as_str(), p.reason))
    }

    #[test]
    fn what_is_confirmed_is_shown_and_sent() {
        let mut asked = confirmation("4", None);
        if let Event::ConfirmationAsked { what, .. } = &mut asked {
            *what = "action 4: os fw 2.0 (rootfs.img)".into();
        }
        let (s, _) = ev(State::default(), asked.clone());
        assert_eq!(
            s.update.pending_consent.as_ref().unwrap().what,
            "action 4: os fw 2.0 (rootfs.img)"
        );
        if let Event::ConfirmationAsked { answer, .. } = &mut asked {
            *answer = Some(true);
        }
        let (_, a) = ev(s, asked);
        assert!(
            matches!(&a[..], [Action::SendConsent { details, .. }]
            if details == &["accepted by the user", "confirmation of action 4: os fw 2.0 (rootfs.img)"]),
            "{a:?}"
        );
    }

    fn offer_answered(s: State, d: Deployment, consent: Option<bool>) -> (State, Vec<Action>) {
        let link = dlink(&d.action_id);
        ev(
            s,
            Event::Deployment {
                link,
                deployment: d,
                booted: Slot::A,
                next: Slot::A,
                trial: false,
                consent,
            },
        )
    }

    #[test]
    fn a_soft_update_waits_for_manual_consent_and_a_forced_one_does_not() {
        let soft = || deployment("5", Handling::Attempt, None);
        // Manual consent, no answer: nothing is written; the action waits, once, durably.
        let (s, a) = offer_answered(State::default(), soft(), None);
        assert_eq!(kinds(&a), ["persist"]);
        assert_eq!(pending(&s), Some(("5", ConsentReason::SoftUpdate)));
        assert_eq!(s.update.phase, Phase::Idle);
        assert_eq!(
            s.update.pending_consent.as_ref().unwrap().what,
            "action 5: os fw 2.0 (rootfs.img)"
        );
        let (s2, a) = offer_answered(s.clone(), soft(), None);
        assert!(a.is_empty(), "{a:?}");
        assert_eq!(s2, s);
        // A poll without a confirmationBase does not end a soft update's wait ...
        let (s2, a) = ev(s.clone(), Event::NoConfirmation);
        assert!(a.is_empty());
        assert_eq!(s2, s);
        // ... the action going away does.
        let (s2, _) = ev(s.clone(), Event::NoAction);
        assert_eq!(s2.update.pending_consent, None);
        // Declined: told to the server (best effort), still waiting for an accept.
        let (s2, a) = offer_answered(s.clone(), soft(), Some(false));
        assert_eq!(kinds(&a), ["persist", "notify", "clear_consent"]);
        assert!(
            matches!(&a[1], Action::Notify { feedback, .. } if feedback.execution == Execution::Rejected)
        );
        assert_eq!(pending(&s2), Some(("5", ConsentReason::SoftUpdate)));
        assert_eq!(s2.update.phase, Phase::Idle);
        // Accepted: installed; the answer is cleared once the job is durable.
        let (s2, a) = offer_answered(s.clone(), soft(), Some(true));
        assert_eq!(
            kinds(&a),
            ["notify", "mark_bad", "persist", "clear_consent", "install"]
        );
        assert_eq!(s2.update.pending_consent, None);
        // A forced update never waits.
        let (_, a) = offer_answered(
            State::default(),
            deployment("6", Handling::Forced, None),
            None,
        );
        assert!(matches!(a.last(), Some(Action::Install(_))));
    }

    #[test]
    fn automatic_consent_never_waits() {
        let auto = Params {
            auto_consent: true,
            ..params()
        };
        for answer in [None, Some(false)] {
            let (s, a) = step(&auto, State::default(), confirmation("4", answer));
            assert_eq!(s, State::default());
            assert!(
                matches!(&a[..], [Action::SendConsent { accept: true, details, .. }]
                if details == &["confirmed automatically (consent = auto)"])
            );
        }
    }

    #[test]
    fn caches_record_what_the_server_took_and_showed() {
        let attributes = BTreeMap::from([("booted_slot".to_string(), "A".to_string())]);
        let (s, a) = ev(State::default(), Event::AttributesSent(attributes.clone()));
        assert_eq!(kinds(&a), ["persist"]);
        assert_eq!(s.caches.attributes_sent, Some(attributes));
        let (s, a) = ev(
            s,
            Event::InstalledBaseRead {
                href: "http://h/T/controller/v1/d/installedBase/3".into(),
            },
        );
        assert_eq!(kinds(&a), ["persist"]);
        assert_eq!(
            s.caches.server_installed.as_deref(),
            Some("http://h/T/controller/v1/d/installedBase/3")
        );
        // Caches never touch the update.
        assert_eq!(s.update, Update::default());
        assert!(s.outbox.is_empty());
        let back = crate::state_file::decode(&crate::state_file::encode(&s)).unwrap();
        assert_eq!(back, s);
    }

    fn refused(id: &str) -> Event {
        Event::DeploymentRefused {
            link: dlink(id),
            reason: "malformed deployment body: invalid value: integer `-1`".into(),
        }
    }

    #[test]
    fn a_refused_deployment_is_answered_failure_once() {
        let (s, a) = ev(State::default(), refused("5"));
        assert_eq!(kinds(&a), ["persist", "deliver"]);
        assert_eq!(
            only_outbox(&s),
            [(Channel::Deployment, Execution::Closed, Finished::Failure)]
        );
        assert!(s.outbox[0].feedback.details[0].contains("integer `-1`"));
        assert_eq!(s.outbox[0].link, dlink("5").href);
        assert_eq!(
            s.update.last_result.as_ref().unwrap().result,
            ResultKind::Failure
        );
        // Offered again, answer still owed or delivered: never a second answer.
        let (again, a) = ev(s.clone(), refused("5"));
        assert_eq!(kinds(&a), ["deliver"]);
        assert_eq!(again, s);
        let (delivered, _) = ev(
            s.clone(),
            Event::FeedbackDelivered {
                seq: s.outbox[0].seq,
            },
        );
        let (again, a) = ev(delivered.clone(), refused("5"));
        assert_eq!(kinds(&a), ["deliver"]);
        assert_eq!(again, delivered);
        // ... also after other actions ended since (the finished memory covers it).
        let (later, _) = ev(delivered, refused("6"));
        let (again, a) = ev(later.clone(), refused("5"));
        assert_eq!(kinds(&a), ["deliver"]);
        assert_eq!(again, later);
        // A link without an action id: nothing to answer.
        let no_id = Event::DeploymentRefused {
            link: Link {
                href: "http://h/T/controller/v1/d/deploymentBase/x".into(),
            },
            reason: "r".into(),
        };
        assert_eq!(ev(State::default(), no_id), (State::default(), vec![]));
    }

    #[test]
    fn a_refusal_during_an_install_never_touches_the_bootloader() {
        // The action being installed: failed, its slot stays marked bad.
        let (s, _) = offer(
            State::default(),
            deployment("6", Handling::Forced, None),
            Slot::A,
        );
        let (s, a) = ev(s, refused("6"));
        assert_eq!(kinds(&a), ["persist", "deliver"]);
        assert_eq!(s.update.phase, Phase::Idle);
        assert!(s.outbox[0].feedback.details[0].ends_with("slot B left marked bad"));
        // Another action in progress: abandoned, the refused one answered.
        let (s, _) = offer(
            State::default(),
            deployment("6", Handling::Forced, None),
            Slot::A,
        );
        let (s, a) = ev(s, refused("8"));
        assert_eq!(kinds(&a), ["persist", "deliver"]);
        assert_eq!(s.outbox.len(), 1);
        assert_eq!(s.outbox[0].feedback.action_id, "8");
        assert_eq!(s.update.phase, Phase::Idle);
        // A slot is (or may be: the activating save was asked for) activated: the reboot
        // decides; nothing changes.
        let (s, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        let (activating, _) = ev(s, Event::InstallDone(Ok(image())));
        assert!(matches!(&activating.update.phase, Phase::Installed(j) if j.activations == 1));
        let activated = through_activation(deployment("7", Handling::Forced, None));
        for s in [activating, activated] {
            for id in ["7", "9"] {
                assert_eq!(ev(s.clone(), refused(id)), (s.clone(), vec![]));
            }
        }
    }

    fn origin() -> LocalOrigin {
        LocalOrigin {
            source: "/data/update.img.gz".into(),
            started_at: 1_800_000_000,
        }
    }

    fn local(s: State, booted: Slot, next: Slot, trial: bool) -> (State, Vec<Action>) {
        ev(
            s,
            Event::LocalInstall {
                origin: origin(),
                booted,
                next,
                trial,
            },
        )
    }

    /// A local install up to its reboot: no feedback, no notify, the same durable order.
    fn local_through_activation() -> State {
        let (s, a) = local(State::default(), Slot::A, Slot::A, false);
        assert_eq!(kinds(&a), ["mark_bad", "persist", "install"]);
        assert_eq!(a[0], Action::MarkBad(Slot::B));
        let job = s.update.phase.job().unwrap();
        assert!(job.is_local() && job.action_id.is_empty() && job.target == Slot::B);
        assert_eq!(job.artifact.filename, "update.img.gz");
        let (s, a) = ev(s, Event::InstallDone(Ok(image())));
        assert_eq!(kinds(&a), ["persist", "activate"]);
        assert!(matches!(&s.update.phase, Phase::Installed(j) if j.activations == 1));
        let (s, a) = ev(s, Event::Activated);
        assert_eq!(kinds(&a), ["persist", "reboot"]);
        assert!(matches!(s.update.phase, Phase::AwaitingReboot(_)));
        assert!(s.outbox.is_empty());
        s
    }

    #[test]
    fn a_local_install_confirms_after_reboot_and_never_reports_to_a_server() {
        let s = local_through_activation();
        let (s, a) = ev(
            s,
            Event::Started {
                booted: Slot::B,
                next: Slot::B,
            },
        );
        assert_eq!(kinds(&a), ["health"]);
        let (s, a) = ev(s, Event::HealthChecked(Ok(())));
        assert_eq!(kinds(&a), ["mark_good", "persist"]);
        assert_eq!(s.update.phase, Phase::Idle);
        assert!(s.outbox.is_empty());
        assert_eq!(s.update.last_result, None, "no server action was invented");
        assert!(s.update.finished_actions.is_empty());
        let r = s.update.last_local.as_ref().unwrap();
        assert_eq!((r.result.clone(), r.target), (ResultKind::Success, Slot::B));
        assert_eq!(r.origin, origin());
    }

    #[test]
    fn a_local_install_failing_its_health_check_rolls_back_and_keeps_why() {
        let s = local_through_activation();
        let (s, _) = ev(
            s,
            Event::Started {
                booted: Slot::B,
                next: Slot::B,
            },
        );
        let (s, a) = ev(s, Event::HealthChecked(Err("check-app: exit 3\n".into())));
        assert_eq!(kinds(&a), ["mark_bad", "persist", "reboot"]);
        assert_eq!(a[0], Action::MarkBad(Slot::B));
        let r = s.update.last_local.as_ref().unwrap();
        assert_eq!(r.result, ResultKind::Failure);
        assert!(r.message.contains("health check failed"), "{}", r.message);
        assert!(r.message.contains("check-app: exit 3"), "{}", r.message);
        assert!(s.outbox.is_empty());
        // The bootloader falling back instead (the slot did not boot) is recorded the same way.
        let s = local_through_activation();
        let (s, a) = ev(
            s,
            Event::Started {
                booted: Slot::A,
                next: Slot::A,
            },
        );
        assert_eq!(kinds(&a), ["mark_bad", "persist"]);
        assert!(s.update.last_local.unwrap().message.contains("rolled back"));
        assert!(s.outbox.is_empty());
    }

    #[test]
    fn a_local_install_fails_at_once_and_never_retries_on_a_poll() {
        let (s, _) = local(State::default(), Slot::A, Slot::A, false);
        let failure = InstallFailure {
            message: "connection reset".into(),
            retryable: true,
        };
        let (s, a) = ev(s, Event::InstallDone(Err(failure)));
        assert_eq!(kinds(&a), ["persist"]);
        assert_eq!(s.update.phase, Phase::Idle);
        let r = s.update.last_local.unwrap();
        assert_eq!(r.result, ResultKind::Failure);
        assert!(r.message.contains("connection reset") && r.message.contains("marked bad"));
        assert!(s.outbox.is_empty());
    }

    #[test]
    fn a_local_install_is_refused_while_anything_else_is_in_progress() {
        // A server action installing: refused, nothing changes.
        let (busy, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        let reason = local_install_refusal(&busy, Slot::A, Slot::A, false).unwrap();
        assert!(reason.contains("server action 7"), "{reason}");
        assert_eq!(local(busy.clone(), Slot::A, Slot::A, false), (busy, vec![]));
        // Activated and waiting for its reboot (server or local).
        for s in [
            through_activation(deployment("7", Handling::Forced, None)),
            local_through_activation(),
        ] {
            let reason = local_install_refusal(&s, Slot::A, Slot::B, false).unwrap();
            assert!(reason.contains("waits for its reboot"), "{reason}");
        }
        // The bootloader's state forbids writing the other slot.
        let reason = local_install_refusal(&State::default(), Slot::A, Slot::A, true).unwrap();
        assert!(reason.contains("on trial"), "{reason}");
        assert!(local_install_refusal(&State::default(), Slot::A, Slot::B, false).is_some());
        // An interrupted local install is replaced.
        let (interrupted, _) = local(State::default(), Slot::A, Slot::A, false);
        assert_eq!(
            local_install_refusal(&interrupted, Slot::A, Slot::A, false),
            None
        );
    }

    #[test]
    fn the_server_never_sees_nor_abandons_a_local_job() {
        let (installing, _) = local(State::default(), Slot::A, Slot::A, false);
        assert_eq!(
            ev(installing.clone(), Event::NoAction),
            (installing.clone(), vec![])
        );
        let waiting = local_through_activation();
        assert_eq!(
            ev(waiting.clone(), Event::NoAction),
            (waiting.clone(), vec![])
        );
        // A server deployment waits for the local slot's confirmation (reboots if pending).
        let (s, a) = offer_with(
            waiting.clone(),
            deployment("8", Handling::Forced, None),
            Slot::A,
            Slot::B,
            false,
        );
        assert_eq!(kinds(&a), ["reboot"]);
        assert_eq!(s, waiting);
        // An interrupted local install is ended at start, not resumed, and reported nowhere.
        let (s, a) = ev(
            installing,
            Event::Started {
                booted: Slot::A,
                next: Slot::A,
            },
        );
        assert_eq!(kinds(&a), ["persist", "keep_booted_good"]);
        assert_eq!(s.update.phase, Phase::Idle);
        assert!(s.update.last_local.unwrap().message.contains("interrupted"));
        assert!(s.outbox.is_empty());
    }

    #[test]
    fn a_local_job_is_stored_where_an_older_agent_sees_no_action() {
        let (installing, _) = local(State::default(), Slot::A, Slot::A, false);
        for s in [installing, local_through_activation()] {
            let bytes = crate::state_file::encode(&s);
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            assert_eq!(value["phase"]["phase"], "idle", "{value}");
            assert!(value["phase"].get("job").is_none());
            assert_eq!(crate::state_file::salvage(&bytes).open_action, None);
            assert_eq!(crate::state_file::decode(&bytes).unwrap(), s);
        }
        let (s, _) = ev(local_through_activation(), Event::HealthChecked(Ok(())));
        assert_eq!(
            crate::state_file::decode(&crate::state_file::encode(&s)).unwrap(),
            s
        );
    }

    #[test]
    fn every_state_survives_serialization() {
        let s = through_activation(deployment("7", Handling::Forced, None));
        let back = crate::state_file::decode(&crate::state_file::encode(&s)).unwrap();
        assert_eq!(back, s);
    }

    /// Review: the activating save of action 7 took effect (B is set to boot) but persisting
    /// `awaiting_reboot` failed, so the next cycle reloads `installed` with the activation
    /// counted. The server meanwhile replaced 7 by 8. The agent must not reboot into B while
    /// forgetting B's trial: after the reboot nothing would health-check or confirm B (under
    /// `bootcount` every later action waits for ever on the foreign trial; under `rauc` the
    /// unchecked slot is kept good as a slot booted by hand).
    #[test]
    fn a_replaced_action_whose_activation_took_effect_is_not_forgotten_before_the_reboot() {
        let installed = cut_during_activation();
        let (s, a) = offer_with(
            installed,
            deployment("8", Handling::Forced, None),
            Slot::A,
            Slot::B,
            false,
        );
        if a.contains(&Action::Reboot) {
            assert!(
                matches!(&s.update.phase, Phase::AwaitingReboot(j) if j.target == Slot::B),
                "rebooting into slot B's trial with phase {:?} ({:?})",
                s.update.phase,
                kinds(&a)
            );
        }
        // After that reboot B runs on trial: it is health-checked, never left unconfirmed.
        let (_, a) = ev(
            s,
            Event::Started {
                booted: Slot::B,
                next: Slot::B,
            },
        );
        assert_eq!(a, [Action::RunHealthChecks]);
    }

    /// Review: under `rauc` the boot script decrements the running slot's counter at every
    /// boot; the contract keeps it refreshed "at every start with nothing of the agent's on
    /// trial". A slot written for a maintenance window and not activated is not on trial, yet
    /// starts while waiting for the window never refresh the running slot.
    #[test]
    fn starts_while_waiting_for_a_window_keep_the_running_slot_bootable() {
        let s = waiting_for_window("9");
        let (_, a) = ev(
            s,
            Event::Started {
                booted: Slot::A,
                next: Slot::A,
            },
        );
        assert_eq!(a, [Action::KeepBootedGood]);
    }

    /// Review: DDI's cancelAction names the action to stop in `cancelAction.stopId` ("typically
    /// identical to the id field on the cancel action itself", not necessarily;
    /// rauc-hawkbit-updater and SWUpdate act on `stopId`). A cancel action 12 that stops action
    /// 7 must stop the install of 7, not answer "nothing in progress" and go on to activate it.
    #[test]
    fn a_cancel_stops_the_action_its_stop_id_names() {
        let (installing, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        let (s, a) = ev(
            installing,
            Event::Cancel {
                link: clink("12"),
                request: CancelRequest {
                    action_id: "12".into(),
                    stop_id: "7".into(),
                },
            },
        );
        assert_eq!(kinds(&a), ["mark_bad", "persist", "deliver"]);
        assert_eq!(s.update.phase, Phase::Idle);
        assert_eq!(
            only_outbox(&s),
            [(Channel::Cancel, Execution::Closed, Finished::Success)]
        );
        assert_eq!(s.outbox[0].link, clink("12").href);
    }

    mod random_sequences {
        //! Random event sequences against invariants that must hold in every reachable state,
        //! with power cuts between any two actions: the driver executes actions in order, so a
        //! cut leaves the bootloader changed by the actions before it and the state file as the
        //! last `Persist` (or the end of an earlier step) left it.
        use super::*;
        use proptest::prelude::*;
        use std::collections::{BTreeSet, HashMap};

        #[derive(Debug, Clone)]
        enum Ev {
            Offer {
                id: u8,
                kind: u8,
                /// The user's recorded answer (manual consent of soft updates).
                consent: Option<bool>,
            },
            Cancel {
                id: u8,
            },
            InstallOk,
            InstallTransient,
            InstallFatal,
            HealthOk,
            HealthBad,
            /// Power-on: boots `next`, or falls back when a trial slot does not come up.
            Restart {
                fall_back: bool,
            },
            /// The reboot command failed or the system did not follow it: the agent goes on.
            RebootFails,
            /// The agent process restarts (crash, service restart) without a power-on.
            Crash,
            /// Someone else starts a trial of the other slot (`ddi-bootctl set-next`).
            ForeignTrial,
            NoAction,
            Refused {
                id: u8,
            },
            /// The server asks for consent; the user's answer, if any.
            Confirm {
                id: u8,
                answer: Option<bool>,
            },
            NoConfirmation,
            AttributesSent,
            InstalledBaseRead {
                id: u8,
            },
            /// `ddi-agent install SOURCE` (the `n`-th source).
            Local {
                n: u8,
            },
        }

        fn ev() -> impl Strategy<Value = Ev> {
            prop_oneof![
                (1u8..4, 0u8..4, proptest::option::of(any::<bool>()))
                    .prop_map(|(id, kind, consent)| Ev::Offer { id, kind, consent }),
                (1u8..4).prop_map(|id| Ev::Cancel { id }),
                Just(Ev::InstallOk),
                Just(Ev::InstallTransient),
                Just(Ev::InstallFatal),
                Just(Ev::HealthOk),
                Just(Ev::HealthBad),
                any::<bool>().prop_map(|fall_back| Ev::Restart { fall_back }),
                Just(Ev::RebootFails),
                Just(Ev::Crash),
                Just(Ev::ForeignTrial),
                Just(Ev::NoAction),
                (1u8..4).prop_map(|id| Ev::Refused { id }),
                (1u8..4, proptest::option::of(any::<bool>()))
                    .prop_map(|(id, answer)| Ev::Confirm { id, answer }),
                Just(Ev::NoConfirmation),
                Just(Ev::AttributesSent),
                (1u8..4).prop_map(|id| Ev::InstalledBaseRead { id }),
                (0u8..3).prop_map(|n| Ev::Local { n }),
            ]
        }

        /// What a slot holds.
        #[derive(Debug, Clone, PartialEq)]
        enum Content {
            Factory,
            /// Written, possibly partially, not verified.
            Unverified,
            /// The verified image of this action.
            Verified(String),
        }

        /// The device: slots, bootloader, the state file, and the agent's memory.
        struct Model {
            s: State,
            disk: State,
            booted: Slot,
            next: Slot,
            /// `next` is on trial (activated, not confirmed).
            trial: bool,
            slots: HashMap<Slot, Content>,
            /// Slots whose image was confirmed after booting (the factory slot from the start).
            confirmed: BTreeSet<Slot>,
            /// An answer the driver owes the machine (install or health result), or a reboot.
            awaiting: Option<&'static str>,
            closing: HashMap<String, usize>,
            seen_seq: BTreeSet<u64>,
            /// The last local result checked.
            last_local_seen: Option<LocalResult>,
            /// The trial on is someone else's (`ddi-bootctl set-next`), not the agent's.
            foreign: bool,
        }

        impl Model {
            fn new() -> Model {
                Model {
                    s: State::default(),
                    disk: State::default(),
                    booted: Slot::A,
                    next: Slot::A,
                    trial: false,
                    slots: HashMap::from([
                        (Slot::A, Content::Factory),
                        (Slot::B, Content::Unverified),
                    ]),
                    confirmed: BTreeSet::from([Slot::A]),
                    awaiting: None,
                    closing: HashMap::new(),
                    seen_seq: BTreeSet::new(),
                    last_local_seen: None,
                    foreign: false,
                }
            }

            fn bootable(&self, slot: Slot) -> bool {
                self.slots[&slot] != Content::Unverified
            }

            /// Power-on after a reboot or a cut.
            fn power_on(&mut self, fall_back: bool) -> Event {
                if self.trial && fall_back {
                    self.next = self.next.other();
                    self.trial = false;
                }
                self.booted = self.next;
                self.s = self.disk.clone();
                self.awaiting = None;
                Event::Started {
                    booted: self.booted,
                    next: self.next,
                }
            }

            /// Runs one event and the events its actions produce; `cut` counts actions down to a
            /// power cut (`Some(0)` cuts before the next action). Returns false on a cut.
            fn run(&mut self, event: Event, cut: &mut Option<u8>) -> Result<bool, TestCaseError> {
                let mut queue = vec![event];
                while let Some(event) = queue.pop() {
                    let is_install_ok = matches!(event, Event::InstallDone(Ok(_)));
                    let health_ok = matches!(event, Event::HealthChecked(Ok(())));
                    let installing_job = match (&self.s.update.phase, is_install_ok) {
                        (Phase::Installing(j), true) => Some(j.clone()),
                        _ => None,
                    };
                    if let Some(j) = installing_job {
                        self.slots
                            .insert(j.target, Content::Verified(j.action_id.clone()));
                    }
                    let bookkeeping = matches!(
                        event,
                        Event::ConfirmationAsked { .. }
                            | Event::ConsentSent { .. }
                            | Event::NoConfirmation
                            | Event::AttributesSent(_)
                            | Event::InstalledBaseRead { .. }
                            | Event::FeedbackDelivered { .. }
                    );
                    let delivery = matches!(event, Event::FeedbackDelivered { .. });
                    let (ns, actions) = step(&params(), self.s.clone(), event);
                    if bookkeeping {
                        // Consent, caches and delivery never move the update or touch the
                        // bootloader; delivery only takes entries out of the outbox.
                        prop_assert_eq!(&ns.update.phase, &self.s.update.phase);
                        prop_assert_eq!(&ns.update.last_result, &self.s.update.last_result);
                        prop_assert_eq!(
                            &ns.update.finished_actions,
                            &self.s.update.finished_actions
                        );
                        if delivery {
                            prop_assert!(ns.outbox.iter().all(|o| self.s.outbox.contains(o)));
                        } else {
                            prop_assert_eq!(&ns.outbox, &self.s.outbox);
                        }
                        prop_assert!(
                            actions.iter().all(|a| matches!(
                                a,
                                Action::Persist
                                    | Action::SendConsent { .. }
                                    | Action::ClearConsentAnswer
                            )),
                            "{:?}",
                            actions
                        );
                    }
                    self.s = ns;
                    for (i, a) in actions.iter().enumerate() {
                        if matches!(
                            a,
                            Action::Install(_)
                                | Action::RunHealthChecks
                                | Action::Reboot
                                | Action::Activate(_)
                                | Action::SendConsent { .. }
                        ) {
                            prop_assert_eq!(
                                i,
                                actions.len() - 1,
                                "{:?} not last in {:?}",
                                a,
                                actions
                            );
                        }
                    }
                    for a in actions {
                        if let Some(n) = cut.as_mut() {
                            if *n == 0 {
                                *cut = None;
                                return Ok(false);
                            }
                            *n -= 1;
                        }
                        match a {
                            Action::Persist => self.disk = self.s.clone(),
                            Action::Install(job) if job.reuse.is_some() => {
                                // Only reads the slot back.
                                prop_assert_ne!(job.target, self.booted, "reuses the running slot");
                                self.awaiting = Some("install");
                            }
                            Action::Install(job) => {
                                prop_assert_ne!(job.target, self.booted, "writes the running slot");
                                prop_assert!(
                                    !(self.trial && self.next == self.booted),
                                    "writes slot {} while the booted slot is on trial",
                                    job.target
                                );
                                prop_assert!(
                                    self.confirmed.contains(&self.booted),
                                    "writes slot {} while slot {} ({:?}) runs unconfirmed",
                                    job.target,
                                    self.booted,
                                    self.slots[&self.booted]
                                );
                                prop_assert_eq!(
                                    self.next,
                                    self.booted,
                                    "writes while the bootloader is set to boot another slot"
                                );
                                self.slots.insert(job.target, Content::Unverified);
                                self.confirmed.remove(&job.target);
                                self.awaiting = Some("install");
                            }
                            Action::MarkBad(slot) => {
                                if self.next == slot {
                                    self.next = slot.other();
                                    self.trial = false;
                                }
                            }
                            Action::MarkGood => {
                                if self.trial && self.booted == self.next {
                                    prop_assert!(
                                        health_ok,
                                        "a trial confirmed without health checks"
                                    );
                                    self.trial = false;
                                }
                                if self.booted == self.next {
                                    self.confirmed.insert(self.booted);
                                }
                            }
                            Action::KeepBootedGood => {}
                            Action::RunHealthChecks => self.awaiting = Some("health"),
                            Action::Activate(slot) => {
                                prop_assert_ne!(slot, self.booted, "activates the running slot");
                                let job =
                                    self.s.update.phase.job().expect("activation without a job");
                                prop_assert_eq!(
                                    &self.slots[&slot],
                                    &Content::Verified(job.action_id.clone()),
                                    "activates an unverified slot"
                                );
                                self.next = slot;
                                self.trial = true;
                                queue.push(Event::Activated);
                            }
                            Action::Reboot => self.awaiting = Some("reboot"),
                            Action::SendConsent { link, accept, .. } => {
                                queue.push(Event::ConsentSent {
                                    action_id: link.action_id().unwrap_or_default(),
                                    accept,
                                });
                            }
                            Action::ClearConsentAnswer => {}
                            Action::Notify { link, .. } => {
                                prop_assert!(!link.is_empty(), "progress of a local job sent");
                            }
                            Action::DeliverOutbox | Action::Defer(_) => {}
                        }
                        prop_assert!(
                            self.bootable(self.next),
                            "U-Boot would boot an unverified slot {}",
                            self.next
                        );
                    }
                    // The driver saves at the end of every step.
                    self.disk = self.s.clone();
                }
                Ok(true)
            }

            /// After a power-on into a trial the agent started, the state on disk still has
            /// the job of that slot: otherwise nothing health-checks, confirms or reports it.
            fn no_orphaned_trial(&mut self) -> Result<(), TestCaseError> {
                if !self.trial {
                    self.foreign = false;
                }
                if self.trial && !self.foreign && self.booted == self.next {
                    prop_assert!(
                        self.disk
                            .update
                            .phase
                            .job()
                            .is_some_and(|j| j.target == self.booted),
                        "booted slot {} on a trial no job owns ({:?})",
                        self.booted,
                        self.disk.update.phase
                    );
                }
                Ok(())
            }

            fn check(&mut self) -> Result<(), TestCaseError> {
                for o in &self.disk.outbox {
                    // `downloaded` closes only a DOWNLOAD_ONLY action on the server; a
                    // scheduled one comes back to be activated and closed.
                    let closes = o.channel == Channel::Deployment
                        && o.feedback.execution == Execution::Closed;
                    if self.seen_seq.insert(o.seq) && closes {
                        *self
                            .closing
                            .entry(o.feedback.action_id.clone())
                            .or_default() += 1;
                        if o.feedback.execution == Execution::Closed
                            && o.feedback.finished == Finished::Success
                        {
                            prop_assert_eq!(
                                &self.slots[&self.booted],
                                &Content::Verified(o.feedback.action_id.clone()),
                                "success without the new image running"
                            );
                            prop_assert!(
                                !self.trial || self.next != self.booted,
                                "success while still on trial"
                            );
                        }
                    }
                }
                for (id, n) in &self.closing {
                    prop_assert!(*n <= 1, "action {} closed {} times", id, n);
                }
                prop_assert!(
                    self.s
                        .outbox
                        .iter()
                        .all(|o| !o.feedback.action_id.is_empty() && !o.link.is_empty()),
                    "feedback for a local job: {:?}",
                    self.s.outbox
                );
                if self.s.update.last_local != self.last_local_seen {
                    if let Some(r) = &self.s.update.last_local {
                        if r.result == ResultKind::Success {
                            prop_assert_eq!(
                                &self.slots[&self.booted],
                                &Content::Verified(String::new()),
                                "local success without its image running"
                            );
                            prop_assert!(
                                !self.trial || self.next != self.booted,
                                "local success while still on trial"
                            );
                        }
                    }
                    self.last_local_seen = self.s.update.last_local.clone();
                }
                if let Some(r) = &self.s.update.downloaded {
                    prop_assert_ne!(
                        r.slot,
                        self.booted,
                        "a downloaded image in the running slot"
                    );
                    prop_assert!(
                        matches!(self.slots[&r.slot], Content::Verified(_)),
                        "a downloaded image recorded for slot {} holding {:?}",
                        r.slot,
                        self.slots[&r.slot]
                    );
                }
                let back = crate::state_file::decode(&crate::state_file::encode(&self.s)).unwrap();
                prop_assert_eq!(&back, &self.s);
                Ok(())
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]
            #[test]
            fn invariants_hold(events in proptest::collection::vec((ev(), proptest::option::weighted(0.2, 0u8..12)), 1..40)) {
                let mut m = Model::new();
                for (e, cut) in events {
                    let answer = match e {
                        Ev::InstallOk | Ev::InstallTransient | Ev::InstallFatal => Some("install"),
                        Ev::HealthOk | Ev::HealthBad => Some("health"),
                        Ev::RebootFails => Some("reboot"),
                        _ => None,
                    };
                    if answer.is_some() && answer != m.awaiting {
                        continue;
                    }
                    if answer.is_none() && m.awaiting.is_some() && !matches!(e, Ev::Restart { .. } | Ev::Crash) {
                        // The driver answers before anything else happens, and a reboot comes
                        // before anything else (or the process dies: then a restart follows).
                        continue;
                    }
                    let event = match e {
                        Ev::Offer { id, kind, consent } => {
                            let (update, window) = match kind {
                                0 => (Handling::Forced, None),
                                1 => (Handling::Attempt, None),
                                2 => (Handling::Skip, None),
                                _ => (Handling::Skip, Some(MaintenanceWindow::Unavailable)),
                            };
                            Event::Deployment {
                                link: dlink(&id.to_string()),
                                deployment: deployment(&id.to_string(), update, window),
                                booted: m.booted,
                                next: m.next,
                                trial: m.trial && m.next == m.booted,
                                consent,
                            }
                        }
                        Ev::Cancel { id } => Event::Cancel {
                            link: clink(&id.to_string()),
                            request: CancelRequest { action_id: id.to_string(), stop_id: id.to_string() },
                        },
                        Ev::InstallOk => match m.s.update.phase.job().and_then(|j| j.reuse.as_ref().map(|_| j.target)) {
                            // The driver reads the slot back: only an image still there passes.
                            Some(slot) if !matches!(m.slots[&slot], Content::Verified(_)) => {
                                Event::InstallDone(Err(InstallFailure { message: "sha256 mismatch".into(), retryable: false }))
                            }
                            _ => Event::InstallDone(Ok(image())),
                        },
                        Ev::InstallTransient => Event::InstallDone(Err(InstallFailure { message: "net".into(), retryable: true })),
                        Ev::InstallFatal => Event::InstallDone(Err(InstallFailure { message: "hash".into(), retryable: false })),
                        Ev::HealthOk => Event::HealthChecked(Ok(())),
                        Ev::HealthBad => Event::HealthChecked(Err("bad".into())),
                        Ev::Restart { fall_back } => m.power_on(fall_back),
                        Ev::RebootFails => {
                            if m.awaiting == Some("reboot") {
                                m.awaiting = None;
                            }
                            continue;
                        }
                        Ev::Crash => {
                            m.s = m.disk.clone();
                            Event::Started { booted: m.booted, next: m.next }
                        }
                        Ev::ForeignTrial => {
                            let other = m.booted.other();
                            if !m.trial && m.next == m.booted && m.bootable(other) {
                                m.next = other;
                                m.trial = true;
                                m.foreign = true;
                            }
                            continue;
                        }
                        Ev::NoAction => Event::NoAction,
                        Ev::Refused { id } => refused(&id.to_string()),
                        Ev::Confirm { id, answer } => confirmation(&id.to_string(), answer),
                        Ev::NoConfirmation => Event::NoConfirmation,
                        Ev::AttributesSent => Event::AttributesSent(BTreeMap::from([(
                            "booted_slot".to_string(),
                            m.booted.to_string(),
                        )])),
                        Ev::InstalledBaseRead { id } => Event::InstalledBaseRead {
                            href: format!("http://h/T/controller/v1/d/installedBase/{id}"),
                        },
                        Ev::Local { n } => Event::LocalInstall {
                            origin: LocalOrigin {
                                source: format!("/data/update-{n}.img"),
                                started_at: u64::from(n),
                            },
                            booted: m.booted,
                            next: m.next,
                            trial: m.trial && m.next == m.booted,
                        },
                    };
                    if matches!(event, Event::Started { .. }) {
                        prop_assert!(m.bootable(m.booted), "booted an unverified slot {}", m.booted);
                    }
                    m.awaiting = None;
                    if matches!(event, Event::Started { .. }) {
                        m.no_orphaned_trial()?;
                    }
                    // A cut of 6 or more is a driver error there instead of a power cut: the
                    // action fails, the rest is skipped, the next cycle starts from the state
                    // file without a restart (a failed start is tried again first).
                    let abort = cut.is_some_and(|c| c >= 6);
                    let mut cut = cut.map(|c| c % 6);
                    let starting = matches!(event, Event::Started { .. });
                    if !m.run(event, &mut cut)? {
                        if abort {
                            m.s = m.disk.clone();
                            m.awaiting = None;
                            if starting {
                                let again = Event::Started { booted: m.booted, next: m.next };
                                m.run(again, &mut None)?;
                            }
                        } else {
                            // Power cut: the memory is gone, U-Boot boots from the env as it is.
                            let started = m.power_on(false);
                            prop_assert!(m.bootable(m.booted), "booted an unverified slot {} after a cut", m.booted);
                            m.no_orphaned_trial()?;
                            let mut no_cut = None;
                            m.run(started, &mut no_cut)?;
                        }
                    }
                    m.check()?;
                    // Delivery happens at some point; model it as immediate half of the time.
                    if m.seen_seq.len().is_multiple_of(2) {
                        let seqs: Vec<u64> = m.s.outbox.iter().map(|o| o.seq).collect();
                        for seq in seqs {
                            m.run(Event::FeedbackDelivered { seq }, &mut None)?;
                        }
                        prop_assert!(m.disk.outbox.is_empty());
                    }
                }
            }
        }
    }
}
