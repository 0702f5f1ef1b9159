//! The update state machine. Pure: [`step`] maps (state, event) to (new state, actions) without
//! any I/O; the driver executes the actions in order and feeds results back as events.
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
use std::fmt;

use crate::ddi::{
    Artifact, CancelRequest, Deployment, Execution, Feedback, Finished, Handling, Link,
};

/// A/B slot name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Slot {
    A,
    B,
}

impl Slot {
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }
}

impl fmt::Display for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Slot::A => "A",
            Slot::B => "B",
        })
    }
}

impl std::str::FromStr for Slot {
    type Err = String;
    fn from_str(s: &str) -> Result<Slot, String> {
        match s {
            "A" | "a" => Ok(Slot::A),
            "B" | "b" => Ok(Slot::B),
            other => Err(format!("slot must be A or B, got \"{other}\"")),
        }
    }
}

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

/// Everything that survives restarts and reboots (stored by [`crate::state_file`]).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct State {
    pub phase: Phase,
    pub last_result: Option<LastResult>,
    pub outbox: Vec<Outgoing>,
    pub next_seq: u64,
    /// Attributes last accepted by the server (configData).
    pub attributes_sent: Option<BTreeMap<String, String>>,
    /// Action waiting for `ddi-agent consent accept|deny` (manual consent).
    pub pending_consent: Option<String>,
    /// The installedBase href last read (logged once per change).
    pub server_installed: Option<String>,
    /// Recently finished actions (newest last, bounded): never closed twice.
    pub finished_actions: Vec<String>,
}

/// How many finished action ids are remembered.
const FINISHED_MEMORY: usize = 32;

impl State {
    fn queue(&mut self, channel: Channel, link: &str, feedback: Feedback) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.outbox.push(Outgoing {
            seq,
            channel,
            link: link.to_string(),
            feedback,
        });
    }

    /// Drops a delivered (or refused for good) outbox entry.
    pub fn delivered(&mut self, seq: u64) {
        self.outbox.retain(|o| o.seq != seq);
    }

    /// True when the action was finished here (result recorded or closing feedback owed).
    fn finished_locally(&self, action_id: &str) -> bool {
        self.last_result
            .as_ref()
            .is_some_and(|r| r.action_id == action_id && r.result != ResultKind::Abandoned)
            || self
                .outbox
                .iter()
                .any(|o| o.feedback.action_id == action_id)
            || self.finished_actions.iter().any(|a| a == action_id)
    }

    /// The state file could not be read and `action_id` was open in it: answer the action
    /// `closed`/`failure` naming `problem` (once), so the server does not wait for ever.
    /// False when the action was already finished here.
    pub fn fail_unreadable(&mut self, action_id: &str, link: &str, problem: &str) -> bool {
        if self.finished_locally(action_id) {
            return false;
        }
        let message = format!("action {action_id} abandoned: {problem}");
        self.queue(
            Channel::Deployment,
            link,
            Feedback::new(action_id, Execution::Closed, Finished::Failure).detail(&message),
        );
        self.finish(action_id, ResultKind::Failure, message);
        true
    }

    fn finish(&mut self, action_id: &str, result: ResultKind, message: String) {
        self.phase = Phase::Idle;
        if result != ResultKind::Abandoned && !self.finished_actions.iter().any(|a| a == action_id)
        {
            self.finished_actions.push(action_id.to_string());
            if self.finished_actions.len() > FINISHED_MEMORY {
                self.finished_actions.remove(0);
            }
        }
        self.last_result = Some(LastResult {
            action_id: action_id.to_string(),
            result,
            message,
        });
    }
}

/// Fixed parameters of the machine (from the config).
#[derive(Debug, Clone)]
pub struct Params {
    /// Boot attempts the bootloader gives a new slot.
    pub attempts: u32,
    /// Chunk `part` holding the image.
    pub artifact_part: String,
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
    },
    /// The server asks to cancel an action.
    Cancel {
        link: Link,
        request: CancelRequest,
    },
    /// A poll showed no action link at all.
    NoAction,
    InstallDone(Result<(), InstallFailure>),
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
        } => {
            let boot = BootView {
                booted,
                next,
                trial,
            };
            on_deployment(params, &mut s, &mut actions, link, deployment, boot)
        }
        Event::Cancel { link, request } => on_cancel(&mut s, &mut actions, link, request),
        Event::NoAction => {
            if let Phase::Installing(job) | Phase::Installed(job) = s.phase.clone() {
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
    }
    (s, actions)
}

fn started(params: &Params, s: &mut State, actions: &mut Vec<Action>, booted: Slot, next: Slot) {
    match s.phase.clone() {
        Phase::Idle => actions.push(Action::KeepBootedGood),
        Phase::Installing(job) if booted == job.target => {
            job_slot_running_unverified(s, actions, job);
        }
        Phase::Installing(_) => actions.push(Action::KeepBootedGood),
        Phase::Installed(job) if job.activations == 0 => {
            // Waiting for the maintenance window; the next poll decides. Should someone have
            // booted the waiting slot by hand, that trial is not ours to confirm.
        }
        Phase::Installed(job) if booted == job.target => {
            // Power cut between the activating save and persisting it: the new slot runs on
            // trial. It is confirmed by the health checks, never by this start alone.
            s.phase = Phase::AwaitingReboot(job);
            actions.extend([Action::Persist, Action::RunHealthChecks]);
        }
        Phase::Installed(job) if next == job.target => {
            // The activating save happened; the reboot did not.
            s.phase = Phase::AwaitingReboot(job);
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
    s.queue(
        Channel::Deployment,
        &job.link,
        Feedback::new(&job.action_id, Execution::Closed, Finished::Failure).detail(message.clone()),
    );
    s.finish(&job.action_id, ResultKind::Failure, message);
    actions.extend([
        Action::MarkBad(job.target),
        Action::Persist,
        Action::DeliverOutbox,
    ]);
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

fn on_deployment(
    params: &Params,
    s: &mut State,
    actions: &mut Vec<Action>,
    link: Link,
    d: Deployment,
    boot: BootView,
) {
    let booted = boot.booted;
    let id = d.action_id.clone();
    if let Phase::Installing(job) = s.phase.clone() {
        if job.target == booted {
            // Normally resolved at start; never write either slot while this holds.
            job_slot_running_unverified(s, actions, job);
            return;
        }
    }
    if let Some(job) = s.phase.job() {
        if job.action_id == id {
            let mut job = job.clone();
            job.may_activate = d.may_activate();
            job.link = link.href.clone();
            match s.phase.clone() {
                Phase::Installing(_) => {
                    if defer_install(&boot, actions) {
                        return;
                    }
                    s.phase = Phase::Installing(job.clone());
                    actions.extend([Action::MarkBad(job.target), Action::Install(job)]);
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
                    s.phase = Phase::Installed(job.clone());
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
        if let Phase::AwaitingReboot(job) = &s.phase {
            // A new slot is already activated; its confirmation comes first.
            reboot_if_pending(job, boot, actions);
            return;
        }
        // Replaced without a cancel (auto-close on the server): the old one is dropped.
        let old = job.clone();
        s.finish(
            &old.action_id,
            ResultKind::Abandoned,
            format!("action {} replaced by action {id}", old.action_id),
        );
    }
    if s.finished_locally(&id) {
        // Our closing feedback is on its way; the server has not seen it yet.
        actions.push(Action::DeliverOutbox);
        return;
    }
    if defer_install(&boot, actions) {
        return;
    }
    match choose_artifact(&params.artifact_part, &d) {
        Err(reason) => {
            s.queue(
                Channel::Deployment,
                &link.href,
                Feedback::new(&id, Execution::Closed, Finished::Failure).detail(reason.clone()),
            );
            s.finish(&id, ResultKind::Failure, reason);
            actions.extend([Action::Persist, Action::DeliverOutbox]);
        }
        Ok((artifact, version)) => {
            let job = Job {
                action_id: id.clone(),
                link: link.href.clone(),
                target: booted.other(),
                download_only: d.is_download_only(),
                may_activate: d.may_activate(),
                artifact,
                version,
                failed_tries: 0,
                activations: 0,
            };
            s.phase = Phase::Installing(job.clone());
            let what = if job.download_only {
                "download only"
            } else if d.update == Handling::Skip {
                "install now, activate in the maintenance window"
            } else {
                "install"
            };
            actions.extend([
                Action::Notify {
                    link: link.href.clone(),
                    feedback: Feedback::new(&id, Execution::Proceeding, Finished::None).detail(
                        format!(
                            "{what}: writing {} (version {}) to slot {}",
                            job.artifact.filename, job.version, job.target
                        ),
                    ),
                },
                Action::MarkBad(job.target),
                Action::Persist,
                Action::Install(job),
            ]);
        }
    }
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
    s.phase = Phase::Installed(job);
    actions.extend([Action::Persist, Action::Activate(target)]);
}

fn on_activated(s: &mut State, actions: &mut Vec<Action>) {
    let Phase::Installed(job) = s.phase.clone() else {
        return;
    };
    if job.activations == 0 {
        return;
    }
    s.phase = Phase::AwaitingReboot(job.clone());
    actions.extend([
        Action::Persist,
        Action::Notify {
            link: job.link.clone(),
            feedback: Feedback::new(&job.action_id, Execution::Proceeding, Finished::None)
                .detail(format!("slot {} activated; rebooting", job.target)),
        },
        Action::Reboot,
    ]);
}

fn on_install_done(s: &mut State, actions: &mut Vec<Action>, result: Result<(), InstallFailure>) {
    let Phase::Installing(mut job) = s.phase.clone() else {
        return;
    };
    match result {
        Ok(()) if job.download_only => {
            let message = format!(
                "downloaded {} (version {}) to slot {}; not activated (download only)",
                job.artifact.filename, job.version, job.target
            );
            s.queue(
                Channel::Deployment,
                &job.link,
                Feedback::new(&job.action_id, Execution::Downloaded, Finished::Success)
                    .detail(message.clone()),
            );
            s.finish(&job.action_id, ResultKind::Success, message);
            actions.extend([Action::Persist, Action::DeliverOutbox]);
        }
        Ok(()) => {
            s.phase = Phase::Installed(job.clone());
            actions.push(Action::Notify {
                link: job.link.clone(),
                feedback: Feedback::new(&job.action_id, Execution::Downloaded, Finished::None)
                    .detail(format!("written and verified in slot {}", job.target)),
            });
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
        Err(f) if f.retryable && job.failed_tries + 1 < MAX_INSTALL_TRIES => {
            job.failed_tries += 1;
            s.phase = Phase::Installing(job);
            actions.push(Action::Persist);
        }
        Err(f) => {
            s.queue(
                Channel::Deployment,
                &job.link,
                Feedback::new(&job.action_id, Execution::Closed, Finished::Failure)
                    .detail(f.message.clone())
                    .detail(format!(
                        "slot {} left marked bad; nothing activated",
                        job.target
                    )),
            );
            s.finish(&job.action_id, ResultKind::Failure, f.message);
            actions.extend([Action::Persist, Action::DeliverOutbox]);
        }
    }
}

fn on_health(s: &mut State, actions: &mut Vec<Action>, result: Result<(), String>) {
    let Phase::AwaitingReboot(job) = s.phase.clone() else {
        return;
    };
    match result {
        Ok(()) => {
            let message = format!(
                "version {} running from slot {} and confirmed",
                job.version, job.target
            );
            s.queue(
                Channel::Deployment,
                &job.link,
                Feedback::new(&job.action_id, Execution::Closed, Finished::Success)
                    .detail(message.clone()),
            );
            s.finish(&job.action_id, ResultKind::Success, message);
            actions.extend([Action::MarkGood, Action::Persist, Action::DeliverOutbox]);
        }
        Err(output) => {
            let message = format!(
                "health check failed in slot {}; slot marked bad, rebooting into slot {}",
                job.target,
                job.target.other()
            );
            let mut fb = Feedback::new(&job.action_id, Execution::Closed, Finished::Failure)
                .detail(message.clone());
            for line in output.lines().filter(|l| !l.trim().is_empty()).take(20) {
                fb = fb.detail(line);
            }
            s.queue(Channel::Deployment, &job.link, fb);
            s.finish(&job.action_id, ResultKind::Failure, message);
            actions.extend([
                Action::MarkBad(job.target),
                Action::Persist,
                Action::DeliverOutbox,
                Action::Reboot,
            ]);
        }
    }
}

fn on_cancel(s: &mut State, actions: &mut Vec<Action>, link: Link, req: CancelRequest) {
    let id = req.action_id.clone();
    if s.outbox
        .iter()
        .any(|o| o.channel == Channel::Cancel && o.feedback.action_id == id)
    {
        actions.push(Action::DeliverOutbox);
        return;
    }
    match s.phase.clone() {
        Phase::Installing(job) | Phase::Installed(job) if job.action_id == id => {
            let message = format!(
                "canceled before activation; slot {} left marked bad",
                job.target
            );
            s.queue(
                Channel::Cancel,
                &link.href,
                Feedback::new(&id, Execution::Closed, Finished::Success).detail(message.clone()),
            );
            s.finish(&id, ResultKind::Canceled, message);
            actions.extend([
                Action::MarkBad(job.target),
                Action::Persist,
                Action::DeliverOutbox,
            ]);
        }
        Phase::AwaitingReboot(job) if job.action_id == id => {
            s.queue(
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
            s.queue(
                Channel::Cancel,
                &link.href,
                Feedback::new(&id, Execution::Closed, Finished::Success)
                    .detail("nothing in progress for this action; canceled"),
            );
            if s.phase.job().is_none() && !s.finished_locally_result(&id) {
                s.last_result = Some(LastResult {
                    action_id: id.clone(),
                    result: ResultKind::Canceled,
                    message: "canceled before it started".into(),
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
    match s.phase.clone() {
        // A slot is (or may be) activated: its confirmation or rollback decides the action.
        Phase::AwaitingReboot(_) => return,
        Phase::Installed(job) if job.activations > 0 => return,
        Phase::Installing(job) | Phase::Installed(job) if job.action_id == id => {
            message = format!("{message}; slot {} left marked bad", job.target);
        }
        Phase::Installing(job) | Phase::Installed(job) => s.finish(
            &job.action_id,
            ResultKind::Abandoned,
            format!("action {} replaced by action {id}", job.action_id),
        ),
        Phase::Idle => {}
    }
    if s.finished_locally(&id) {
        // Already answered (or the answer is on its way): never closed twice.
        actions.push(Action::DeliverOutbox);
        return;
    }
    s.queue(
        Channel::Deployment,
        &link.href,
        Feedback::new(&id, Execution::Closed, Finished::Failure).detail(message.clone()),
    );
    s.finish(&id, ResultKind::Failure, message);
    actions.extend([Action::Persist, Action::DeliverOutbox]);
}

impl State {
    fn finished_locally_result(&self, action_id: &str) -> bool {
        self.last_result
            .as_ref()
            .is_some_and(|r| r.action_id == action_id)
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
            })
            .collect()
    }

    /// Runs a forced update up to the reboot; returns the state at AwaitingReboot.
    fn through_activation(d: Deployment) -> State {
        let (s, a) = offer(State::default(), d, Slot::A);
        assert_eq!(kinds(&a), ["notify", "mark_bad", "persist", "install"]);
        assert_eq!(a[1], Action::MarkBad(Slot::B));
        let (s, a) = ev(s, Event::InstallDone(Ok(())));
        // Installed, with the activation counted, is durable before the activating save.
        assert_eq!(kinds(&a), ["notify", "persist", "activate"]);
        assert_eq!(a[2], Action::Activate(Slot::B));
        assert!(
            matches!(s.phase, Phase::Installed(ref j) if j.target == Slot::B && j.activations == 1)
        );
        let (s, a) = ev(s, Event::Activated);
        assert_eq!(kinds(&a), ["persist", "notify", "reboot"]);
        assert!(matches!(s.phase, Phase::AwaitingReboot(ref j) if j.target == Slot::B));
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
        assert_eq!(s.phase, Phase::Idle);
        assert_eq!(s.last_result.as_ref().unwrap().result, ResultKind::Success);
        assert_eq!(
            s.outbox[0].link,
            "http://h/T/controller/v1/d/deploymentBase/7?c=1"
        );
    }

    #[test]
    fn soft_and_timeforced_install_like_forced() {
        through_activation(deployment("7", Handling::Attempt, None));
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
        assert_eq!(s.phase, Phase::Idle);
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
        let (s, a) = ev(s, Event::InstallDone(Ok(())));
        assert_eq!(a.last(), Some(&Action::Activate(Slot::B)));
        assert!(matches!(&s.phase, Phase::Installed(j) if j.activations == 1));
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
        assert!(matches!(s.phase, Phase::AwaitingReboot(_)));
        let (_, a) = ev(s.clone(), Event::HealthChecked(Err("bad".into())));
        assert_eq!(a[0], Action::MarkBad(Slot::B));
        let (s, a) = ev(s, Event::HealthChecked(Ok(())));
        assert_eq!(kinds(&a), ["mark_good", "persist", "deliver"]);
        assert_eq!(s.last_result.unwrap().result, ResultKind::Success);
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
        assert!(matches!(s.phase, Phase::AwaitingReboot(_)));
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
        assert!(matches!(&s.phase, Phase::Installed(j) if j.activations == 2));
        let (s, a) = ev(s, Event::Activated);
        assert_eq!(kinds(&a), ["persist", "notify", "reboot"]);
        // Cut again and still not booted: no third try, the fallback is reported.
        let Phase::AwaitingReboot(job) = s.phase.clone() else {
            panic!("{:?}", s.phase)
        };
        let again = State {
            phase: Phase::Installed(job),
            ..s
        };
        let (s, a) = ev(
            again,
            Event::Started {
                booted: Slot::A,
                next: Slot::A,
            },
        );
        assert_eq!(kinds(&a), ["mark_bad", "persist", "deliver"]);
        assert!(s.outbox[0].feedback.details[0].contains("rolled back to slot A"));
        assert_eq!(s.phase, Phase::Idle);
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
        assert_eq!(s.phase, Phase::Idle);
        // The same holds when the offer comes first.
        let (s, a) = offer(installing, deployment("7", Handling::Forced, None), Slot::B);
        assert!(!a.iter().any(|a| matches!(a, Action::Install(_))), "{a:?}");
        assert_eq!(a[0], Action::MarkBad(Slot::B));
        assert_eq!(s.last_result.unwrap().result, ResultKind::Failure);
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
        assert_eq!(s.phase, Phase::Idle);
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
        let d = deployment("8", Handling::Skip, None);
        let (s, a) = offer(State::default(), d, Slot::B);
        assert!(matches!(&a[3], Action::Install(j) if j.download_only && j.target == Slot::A));
        let (s, a) = ev(s, Event::InstallDone(Ok(())));
        assert_eq!(kinds(&a), ["persist", "deliver"]);
        assert_eq!(
            only_outbox(&s),
            [(
                Channel::Deployment,
                Execution::Downloaded,
                Finished::Success
            )]
        );
        assert_eq!(s.phase, Phase::Idle);
        // The same action offered again (server not yet updated): no second download.
        let (s2, a) = offer(s.clone(), deployment("8", Handling::Skip, None), Slot::B);
        assert_eq!(kinds(&a), ["deliver"]);
        assert_eq!(s2, s);
    }

    #[test]
    fn maintenance_window_installs_now_activates_later() {
        let unavailable = deployment("9", Handling::Skip, Some(MaintenanceWindow::Unavailable));
        let (s, a) = offer(State::default(), unavailable.clone(), Slot::A);
        assert!(matches!(&a[3], Action::Install(j) if !j.download_only && !j.may_activate));
        let (s, a) = ev(s, Event::InstallDone(Ok(())));
        assert_eq!(kinds(&a), ["notify", "persist", "notify"]);
        assert!(matches!(s.phase, Phase::Installed(_)));
        // Still unavailable: nothing.
        let (s, a) = offer(s, unavailable, Slot::A);
        assert!(a.is_empty());
        assert!(matches!(s.phase, Phase::Installed(_)));
        // Window opens: activate and reboot, without reinstalling.
        let (s, a) = offer(
            s,
            deployment("9", Handling::Forced, Some(MaintenanceWindow::Available)),
            Slot::A,
        );
        assert_eq!(kinds(&a), ["persist", "activate"]);
        let (s, a) = ev(s, Event::Activated);
        assert_eq!(kinds(&a), ["persist", "notify", "reboot"]);
        assert!(matches!(s.phase, Phase::AwaitingReboot(_)));
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
        assert!(matches!(&s.phase, Phase::Installing(j) if j.failed_tries == 1));
        // Resumed on the next offer without a new "started" message.
        let (s, a) = offer(s, deployment("7", Handling::Forced, None), Slot::A);
        assert_eq!(kinds(&a), ["mark_bad", "install"]);
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
        assert_eq!(s.last_result.unwrap().result, ResultKind::Failure);
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
        assert_eq!(s.last_result.as_ref().unwrap().result, ResultKind::Canceled);
        assert_eq!(s.phase, Phase::Idle);
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
        let (s, _) = offer(
            State::default(),
            deployment("7", Handling::Skip, Some(MaintenanceWindow::Unavailable)),
            Slot::A,
        );
        let (s, _) = ev(s, Event::InstallDone(Ok(())));
        let cancel = Event::Cancel {
            link: clink("7"),
            request: CancelRequest {
                action_id: "7".into(),
                stop_id: "7".into(),
            },
        };
        let (s, a) = ev(s, cancel.clone());
        assert_eq!(a[0], Action::MarkBad(Slot::B));
        assert_eq!(s.phase, Phase::Idle);

        // After activation: rejected, the update goes on.
        let s = through_activation(d());
        let (s, a) = ev(s, cancel.clone());
        assert_eq!(kinds(&a), ["persist", "deliver"]);
        assert_eq!(
            only_outbox(&s),
            [(Channel::Cancel, Execution::Rejected, Finished::None)]
        );
        assert!(matches!(s.phase, Phase::AwaitingReboot(_)));

        // Nothing in progress: accept.
        let (s, _) = ev(State::default(), cancel);
        assert_eq!(
            only_outbox(&s),
            [(Channel::Cancel, Execution::Closed, Finished::Success)]
        );
        assert_eq!(s.phase, Phase::Idle);
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
        assert!(matches!(&s.phase, Phase::Installing(j) if j.action_id == "7"));
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
        assert_eq!(s2.phase, Phase::Idle);
        assert_eq!(s2.last_result.unwrap().result, ResultKind::Abandoned);
        let (s3, a) = offer(s, deployment("8", Handling::Forced, None), Slot::A);
        assert!(matches!(a.last(), Some(Action::Install(j)) if j.action_id == "8"));
        assert!(matches!(&s3.phase, Phase::Installing(j) if j.action_id == "8"));
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
        let window = || deployment("9", Handling::Skip, Some(MaintenanceWindow::Unavailable));
        let (s, _) = offer(State::default(), window(), Slot::A);
        let (s, _) = ev(s, Event::InstallDone(Ok(())));
        // Someone booted the waiting slot B on a trial of their own; the window opens.
        let open = deployment("9", Handling::Forced, Some(MaintenanceWindow::Available));
        let (s2, a) = offer_with(s.clone(), open.clone(), Slot::B, Slot::B, true);
        assert_eq!(kinds(&a), ["defer"]);
        assert!(!a.contains(&Action::Activate(Slot::B)));
        assert!(matches!(&s2.phase, Phase::Installed(j) if j.activations == 0));
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
        let (mut s, _) = ev(s, Event::InstallDone(Ok(())));
        for _ in 1..MAX_ACTIVATIONS {
            let (next, a) = offer(s, deployment("7", Handling::Forced, None), Slot::A);
            assert_eq!(kinds(&a), ["persist", "activate"]);
            s = next;
        }
        let (s, a) = offer(s, deployment("7", Handling::Forced, None), Slot::A);
        assert_eq!(kinds(&a), ["mark_bad", "persist", "deliver"]);
        assert!(s.outbox[0].feedback.details[0].contains("could not be activated"));
        assert_eq!(s.phase, Phase::Idle);
    }

    #[test]
    fn a_waiting_slot_booted_by_hand_is_not_confirmed() {
        let window = deployment("9", Handling::Skip, Some(MaintenanceWindow::Unavailable));
        let (s, _) = offer(State::default(), window, Slot::A);
        let (s, _) = ev(s, Event::InstallDone(Ok(())));
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
            Event::InstallDone(Ok(())),
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
        let mut s = State::default();
        s.queue(
            Channel::Deployment,
            "l",
            Feedback::new("1", Execution::Closed, Finished::Success),
        );
        s.queue(
            Channel::Cancel,
            "m",
            Feedback::new("2", Execution::Closed, Finished::Success),
        );
        assert_eq!(s.outbox[1].seq, 1);
        s.delivered(0);
        assert_eq!(s.outbox.len(), 1);
        assert_eq!(s.outbox[0].seq, 1);
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
        assert_eq!(s.last_result.as_ref().unwrap().result, ResultKind::Failure);
        // Offered again, answer still owed or delivered: never a second answer.
        let (again, a) = ev(s.clone(), refused("5"));
        assert_eq!(kinds(&a), ["deliver"]);
        assert_eq!(again, s);
        let mut delivered = s.clone();
        delivered.delivered(s.outbox[0].seq);
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
        assert_eq!(s.phase, Phase::Idle);
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
        assert_eq!(s.phase, Phase::Idle);
        // A slot is (or may be: the activating save was asked for) activated: the reboot
        // decides; nothing changes.
        let (s, _) = offer(
            State::default(),
            deployment("7", Handling::Forced, None),
            Slot::A,
        );
        let (activating, _) = ev(s, Event::InstallDone(Ok(())));
        assert!(matches!(&activating.phase, Phase::Installed(j) if j.activations == 1));
        let activated = through_activation(deployment("7", Handling::Forced, None));
        for s in [activating, activated] {
            for id in ["7", "9"] {
                assert_eq!(ev(s.clone(), refused(id)), (s.clone(), vec![]));
            }
        }
    }

    #[test]
    fn every_state_survives_serialization() {
        let s = through_activation(deployment("7", Handling::Forced, None));
        let back = crate::state_file::decode(&crate::state_file::encode(&s)).unwrap();
        assert_eq!(back, s);
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
        }

        fn ev() -> impl Strategy<Value = Ev> {
            prop_oneof![
                (1u8..4, 0u8..4).prop_map(|(id, kind)| Ev::Offer { id, kind }),
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
                    let is_install_ok = matches!(event, Event::InstallDone(Ok(())));
                    let health_ok = matches!(event, Event::HealthChecked(Ok(())));
                    let installing_job = match (&self.s.phase, is_install_ok) {
                        (Phase::Installing(j), true) => Some(j.clone()),
                        _ => None,
                    };
                    if let Some(j) = installing_job {
                        self.slots
                            .insert(j.target, Content::Verified(j.action_id.clone()));
                    }
                    let (ns, actions) = step(&params(), self.s.clone(), event);
                    self.s = ns;
                    for (i, a) in actions.iter().enumerate() {
                        if matches!(
                            a,
                            Action::Install(_)
                                | Action::RunHealthChecks
                                | Action::Reboot
                                | Action::Activate(_)
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
                                let job = self.s.phase.job().expect("activation without a job");
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
                            Action::Notify { .. } | Action::DeliverOutbox | Action::Defer(_) => {}
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

            fn check(&mut self) -> Result<(), TestCaseError> {
                for o in &self.disk.outbox {
                    let closes = o.channel == Channel::Deployment
                        && (o.feedback.execution == Execution::Closed
                            || (o.feedback.execution == Execution::Downloaded
                                && o.feedback.finished != Finished::None));
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
                let back = crate::state_file::decode(&crate::state_file::encode(&self.s)).unwrap();
                prop_assert_eq!(&back, &self.s);
                Ok(())
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(3000))]
            #[test]
            fn invariants_hold(events in proptest::collection::vec((ev(), proptest::option::weighted(0.2, 0u8..6)), 1..40)) {
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
                        Ev::Offer { id, kind } => {
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
                            }
                        }
                        Ev::Cancel { id } => Event::Cancel {
                            link: clink(&id.to_string()),
                            request: CancelRequest { action_id: id.to_string(), stop_id: id.to_string() },
                        },
                        Ev::InstallOk => Event::InstallDone(Ok(())),
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
                            }
                            continue;
                        }
                        Ev::NoAction => Event::NoAction,
                        Ev::Refused { id } => refused(&id.to_string()),
                    };
                    if matches!(event, Event::Started { .. }) {
                        prop_assert!(m.bootable(m.booted), "booted an unverified slot {}", m.booted);
                    }
                    m.awaiting = None;
                    let mut cut = cut;
                    if !m.run(event, &mut cut)? {
                        // Power cut: the memory is gone, U-Boot boots from the env as it is.
                        let started = m.power_on(false);
                        prop_assert!(m.bootable(m.booted), "booted an unverified slot {} after a cut", m.booted);
                        let mut no_cut = None;
                        m.run(started, &mut no_cut)?;
                    }
                    m.check()?;
                    // Delivery happens at some point; model it as immediate half of the time.
                    if m.seen_seq.len() % 2 == 0 {
                        let seqs: Vec<u64> = m.s.outbox.iter().map(|o| o.seq).collect();
                        for q in seqs { m.s.delivered(q); }
                        m.disk = m.s.clone();
                    }
                }
            }
        }
    }
}
