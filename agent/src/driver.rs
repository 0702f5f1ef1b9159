//! The driver: runs [`crate::machine`] against the world. It turns polls and server answers into
//! events, executes the machine's actions (HTTP, bootloader, installer, health checks, reboot)
//! in order, and persists the state where the machine says so.
//!
//! Every effect goes through a small trait ([`Bootloader`], [`Installer`], [`HealthChecker`],
//! [`Rebooter`]) so the driver can be tested with fakes; the real implementations are here too.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tracing::{info, warn};

use crate::config::Config;
use crate::ddi::client::Delivery;
use crate::ddi::{
    CancelRequest, DdiClient, DdiError, Execution, Feedback, Finished, Link, PollReply,
};
use crate::feedback_budget::{ProgressBudget, Stage};
use crate::install::{BundlePolicy, ExpectedHash, InstallRequest, Progress};
use bootctl::Slot;

use crate::local_install::Source;
use crate::machine::{
    self, Action, Event, InstallFailure, Job, LocalOrigin, Params, Phase, ResultKind, SlotImage,
    State,
};
use crate::persist::{PersistError, Store};

/// A bootloader operation failed.
#[derive(Debug, thiserror::Error)]
#[error("bootloader: {0}")]
pub struct BootError(pub String);

/// The slot control the driver needs (one environment save per call).
pub trait Bootloader: Send {
    fn booted(&self) -> Result<Slot, BootError>;
    fn next(&self) -> Result<Slot, BootError>;
    /// The booted slot runs on trial (activated, not confirmed); false when the scheme cannot
    /// tell (`rauc`).
    fn booted_on_trial(&self) -> Result<bool, BootError> {
        Ok(false)
    }
    fn activate(&mut self, slot: Slot) -> Result<(), BootError>;
    fn mark_good(&mut self) -> Result<(), BootError>;
    fn mark_bad(&mut self, slot: Slot) -> Result<(), BootError>;
    /// Refreshes the running slot's standing when no trial is on (see
    /// [`Action::KeepBootedGood`]); one save at most, none when nothing changes.
    fn keep_booted_good(&mut self) -> Result<(), BootError> {
        Ok(())
    }
}

/// Downloads and writes one image, or checks one written earlier.
pub trait Installer: Send + Sync {
    fn install(
        &self,
        http: &reqwest::Client,
        req: &InstallRequest,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> impl Future<Output = Result<SlotImage, InstallFailure>> + Send;

    /// Reads `image` back from the slot of `req` (never downloads, never writes): the slot
    /// still holds it byte for byte, or an error says what differs.
    fn verify(
        &self,
        req: &InstallRequest,
        image: &SlotImage,
    ) -> impl Future<Output = Result<SlotImage, InstallFailure>> + Send;
}

/// Runs the configured health checks; `Err` carries the report.
pub trait HealthChecker: Send + Sync {
    fn check(&self) -> impl Future<Output = Result<(), String>> + Send;
}

/// Asks the system to reboot.
pub trait Rebooter: Send + Sync {
    fn reboot(&self) -> Result<(), String>;
}

/// Why a cycle could not complete.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error(transparent)]
    Ddi(#[from] DdiError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Persist(#[from] PersistError),
    #[error("reboot command failed: {0}")]
    Reboot(String),
    #[error("{0} feedback message(s) still owed to the server")]
    FeedbackOwed(usize),
    #[error("boot environment unusable, so nothing is installed, activated or confirmed: {0}")]
    BootEnv(BootError),
}

/// The saved state; an unreadable file is kept aside and reported (see
/// [`Store::load_or_recover`]), never a reason to stop.
fn load_state(store: &Store) -> Result<State, PersistError> {
    let (state, recovery) = store.load_or_recover()?;
    if let Some(r) = recovery {
        match &r.failed_action {
            Some(action) => {
                warn!(problem = %r.problem, action_id = %action, "state file unreadable; started over and answered its open action closed/failure")
            }
            None => warn!(problem = %r.problem, "state file unreadable; started over"),
        }
    }
    Ok(state)
}

/// What one cycle did.
#[derive(Debug, Default)]
pub struct CycleReport {
    /// The reboot command ran: stop and let the system go down.
    pub rebooting: bool,
    /// A `closed`/`failure` for an update was delivered in this cycle.
    pub failure_reported: bool,
    /// The server's suggested sleep until the next poll.
    pub sleep: Option<Duration>,
    /// The install of an action is under way and did not finish in this cycle: it goes on at
    /// the next poll.
    pub unfinished_install: Option<UnfinishedInstall>,
}

/// An install that did not finish in a cycle, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnfinishedInstall {
    pub action_id: String,
    /// A transient (network) failure stopped it in this cycle: `run` retries after the
    /// failed-cycle backoff. Otherwise it waits (the bootloader's state, a maintenance window)
    /// and `run` polls at the normal interval.
    pub transient_failure: bool,
}

/// The driver with its collaborators.
pub struct Driver<B, I, H, R> {
    cfg: Config,
    client: DdiClient,
    store: Store,
    boot: B,
    installer: I,
    health: H,
    rebooter: R,
    params: Params,
    state: State,
    /// The state as last read from or written to the state file.
    saved: State,
    failure_reported: bool,
    /// An install failed transiently (retryable) in the current cycle.
    install_failed_transiently: bool,
    /// The server's last polling interval (paces the cancel watch during installs).
    last_sleep: Duration,
    /// Why the last [`Driver::startup`] could not read the boot environment: until a start
    /// succeeds, a cycle does nothing the post-reboot step should have decided first.
    startup_skipped: Option<String>,
    /// `ddi-agent install --no-reboot`: a reboot the machine asks for is left to the user.
    hold_reboot: bool,
}

/// How `ddi-agent install SOURCE` ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalOutcome {
    /// Not started, for this reason; nothing was written.
    Refused(String),
    /// Written, verified and activated in `target`; `rebooting` when the reboot command ran.
    Activated { target: Slot, rebooting: bool },
    /// Failed; the message names the problem (the booted slot and its boot entry untouched).
    Failed(String),
}

impl<B: Bootloader, I: Installer, H: HealthChecker, R: Rebooter> Driver<B, I, H, R> {
    pub fn new(
        cfg: Config,
        mut client: DdiClient,
        store: Store,
        boot: B,
        installer: I,
        health: H,
        rebooter: R,
    ) -> Result<Self, DriverError> {
        let state = load_state(&store)?;
        client.set_token_to_other_hosts(cfg.agent.send_token_to_other_hosts);
        let params = Params {
            attempts: cfg.boot.attempts,
            artifact_part: cfg.agent.artifact_part.clone(),
            auto_consent: cfg.agent.consent == crate::config::Consent::Auto,
        };
        Ok(Driver {
            cfg,
            client,
            store,
            boot,
            installer,
            health,
            rebooter,
            params,
            saved: state.clone(),
            state,
            failure_reported: false,
            install_failed_transiently: false,
            last_sleep: Duration::from_secs(30),
            startup_skipped: None,
            hold_reboot: false,
        })
    }

    /// `ddi-agent install SOURCE`: a local job through the machine, as far as the activating
    /// save and (unless `reboot` is false) the reboot. Its confirmation after the reboot is the
    /// post-reboot step of `once`/`run`, as for a server action.
    pub async fn local_install(
        &mut self,
        origin: LocalOrigin,
        reboot: bool,
    ) -> Result<LocalOutcome, DriverError> {
        self.load()?;
        let booted = self.boot.booted()?;
        let next = self.boot.next().map_err(DriverError::BootEnv)?;
        let trial = self.boot.booted_on_trial()?;
        if let Some(reason) = machine::local_install_refusal(&self.state, booted, next, trial) {
            return Ok(LocalOutcome::Refused(reason));
        }
        if let Source::File(path) = Source::parse(&origin.source) {
            // Checked before the slot is marked bad: a mistyped path changes nothing at all.
            match std::fs::metadata(&path) {
                Ok(m) if m.is_file() => {}
                Ok(_) => {
                    return Ok(LocalOutcome::Refused(format!(
                        "{} is not a regular file",
                        path.display()
                    )))
                }
                Err(e) => {
                    return Ok(LocalOutcome::Refused(format!(
                        "cannot open {}: {e}",
                        path.display()
                    )))
                }
            }
        }
        info!(source = %origin.source, slot = %booted.other(), "local install");
        self.hold_reboot = !reboot;
        let rebooting = self.apply(Event::LocalInstall {
            origin: origin.clone(),
            booted,
            next,
            trial,
        });
        let rebooting = rebooting.await;
        self.hold_reboot = false;
        let rebooting = rebooting?;
        Ok(
            match (
                self.state.update().phase(),
                self.state.update().last_local(),
            ) {
                (Phase::AwaitingReboot(job), _) if job.local.as_ref() == Some(&origin) => {
                    LocalOutcome::Activated {
                        target: job.target,
                        rebooting,
                    }
                }
                (Phase::Idle, Some(r)) if r.origin == origin && r.result != ResultKind::Success => {
                    LocalOutcome::Failed(r.message.clone())
                }
                (phase, _) => LocalOutcome::Failed(format!(
                    "the install stopped in phase {} (see the log)",
                    phase.name()
                )),
            },
        )
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    /// Step (1) of `once` and the start of `run`: finish what was waiting for a reboot.
    pub async fn startup(&mut self) -> Result<CycleReport, DriverError> {
        self.failure_reported = false;
        self.load()?;
        let booted = self.boot.booted()?;
        let next = match self.boot.next() {
            Ok(next) => next,
            Err(e) => {
                self.startup_skipped = Some(e.0.clone());
                return Err(DriverError::BootEnv(e));
            }
        };
        self.startup_skipped = None;
        info!(booted = %booted, next = %next, phase = self.state.update().phase().name(), "agent started");
        let rebooting = self.apply(Event::Started { booted, next }).await?;
        if let Err(e) = self.deliver().await {
            // Not fatal here: the cycle delivers first and reports what is still owed.
            warn!(error = %e, "feedback still owed after start");
        }
        Ok(CycleReport {
            rebooting,
            failure_reported: self.failure_reported,
            ..CycleReport::default()
        })
    }

    /// Step (2): deliver what is owed, poll once and carry out what the server asks.
    pub async fn cycle(&mut self) -> Result<CycleReport, DriverError> {
        self.failure_reported = false;
        self.install_failed_transiently = false;
        // Whatever an aborted previous cycle left in memory is replaced by what is on disk.
        self.load()?;
        self.deliver().await?;
        let poll = self.client.poll().await?;
        self.last_sleep = match poll.sleep {
            Some(sleep) => sleep,
            None => {
                warn!(sleep = %poll.raw_sleep, kept_s = self.last_sleep.as_secs(), "server's polling sleep unparseable; keeping the last good interval");
                self.last_sleep
            }
        };
        let booted = self.boot.booted()?;
        let mut report = CycleReport {
            sleep: Some(self.last_sleep),
            ..CycleReport::default()
        };
        // Attributes the server refuses must not block updates: log and go on.
        if let Err(e) = self.config_data(&poll, booted).await {
            warn!(error = %e, "attributes (configData) not accepted; retried next cycle");
        }
        self.installed_base(&poll).await;
        if poll.confirmation.is_none() {
            self.apply(Event::NoConfirmation).await?;
        }
        // Without the environment nothing can be installed or decided; the server hears why.
        if let Err(problem) = self.boot.next() {
            return self.refuse_for_boot_env(&poll, problem).await;
        }
        if let Some(problem) = &self.startup_skipped {
            // Readable again (it was locked?), but the post-reboot step comes first: next time.
            return Err(DriverError::BootEnv(BootError(problem.clone())));
        }
        let rebooting = if let Some(link) = &poll.cancel {
            match self.client.cancel_request(link).await {
                Ok(request) => {
                    info!(action_id = %request.stop_id, cancel_id = %request.action_id, "server asks to cancel");
                    self.apply(Event::Cancel {
                        link: link.clone(),
                        request,
                    })
                    .await?
                }
                Err(e) if e.status() == Some(404) => false,
                Err(e) => return Err(e.into()),
            }
        } else if let Some(link) = &poll.confirmation {
            self.consent(link).await?
        } else if let Some(link) = &poll.deployment {
            match self.client.deployment(link).await {
                Ok(deployment) => {
                    info!(
                        action_id = %deployment.action_id,
                        download = ?deployment.download,
                        update = ?deployment.update,
                        window = ?deployment.maintenance_window,
                        "deployment offered"
                    );
                    let next = self.boot.next()?;
                    let trial = self.boot.booted_on_trial()?;
                    let consent = self.recorded_answer(&deployment.action_id)?;
                    self.apply(Event::Deployment {
                        link: link.clone(),
                        deployment,
                        booted,
                        next,
                        trial,
                        consent,
                    })
                    .await?
                }
                // Canceling or waiting for confirmation since the poll: look again next time.
                Err(e) if e.status() == Some(404) => false,
                Err(e) => match e.refused_answer() {
                    Some(reason) => {
                        self.refuse(link, format!("deployment refused: {reason}"))
                            .await?
                    }
                    None => return Err(e.into()),
                },
            }
        } else {
            self.apply(Event::NoAction).await?
        };
        report.rebooting = rebooting;
        if !rebooting {
            self.deliver().await?;
            if let Phase::Installing(job) = &self.state.update().phase() {
                report.unfinished_install = Some(UnfinishedInstall {
                    action_id: job.action_id.clone(),
                    transient_failure: self.install_failed_transiently,
                });
            }
        }
        report.failure_reported = self.failure_reported;
        Ok(report)
    }

    /// `run`: the system is still up `waited` after `reboot_command` succeeded (`runs` times so
    /// far). Reports it (log, and progress feedback on the action waiting for the reboot) and
    /// runs the reboot command again.
    pub async fn reboot_overdue(&mut self, waited: Duration, runs: u32) -> Result<(), DriverError> {
        let message = format!(
            "the system did not reboot within {} s after reboot_command (run {runs} time(s)); \
             running it again",
            waited.as_secs()
        );
        warn!("{message}");
        if let Phase::AwaitingReboot(job) = &self.state.update().phase() {
            let feedback = Feedback::new(&job.action_id, Execution::Proceeding, Finished::None)
                .detail(message);
            if let Err(e) = self.client.send_feedback(&job.link, &feedback).await {
                warn!(error = %e, "report of the missing reboot not delivered (not retried)");
            }
        }
        info!(command = ?self.cfg.boot.reboot_command, "rebooting");
        self.rebooter.reboot().map_err(DriverError::Reboot)
    }

    /// Answers the action of `link` `closed`/`failure` with `reason` (once) without starting it.
    async fn refuse(&mut self, link: &Link, reason: String) -> Result<bool, DriverError> {
        warn!(action_id = link.action_id().unwrap_or_default(), %reason, "action refused");
        self.apply(Event::DeploymentRefused {
            link: link.clone(),
            reason,
        })
        .await
    }

    /// With the boot environment unreadable: a pending deployment is refused naming the
    /// problem, nothing else is done (the environment and the slots stay untouched), and the
    /// cycle fails with the problem.
    async fn refuse_for_boot_env(
        &mut self,
        poll: &PollReply,
        problem: BootError,
    ) -> Result<CycleReport, DriverError> {
        if let Some(link) = &poll.deployment {
            let reason = format!("boot environment unusable, nothing installed: {problem}");
            self.refuse(link, reason).await?;
            self.deliver().await?;
        }
        Err(DriverError::BootEnv(problem))
    }

    /// The state file's state, in memory and as the last saved.
    fn load(&mut self) -> Result<(), DriverError> {
        self.state = load_state(&self.store)?;
        self.saved = self.state.clone();
        Ok(())
    }

    fn save(&mut self) -> Result<(), DriverError> {
        self.store.save(&self.state)?;
        self.saved = self.state.clone();
        Ok(())
    }

    /// Feeds one event (and the events its actions produce) through the machine; every step
    /// ends with its state saved (nothing is written when it did not change).
    async fn apply(&mut self, event: Event) -> Result<bool, DriverError> {
        let mut next = Some(event);
        while let Some(event) = next.take() {
            let before = self.state.update().clone();
            let (state, actions) = machine::step(&self.params, self.state.clone(), event);
            self.state = state;
            log_update_change(&before, self.state.update());
            let job = self
                .state
                .update()
                .phase()
                .job()
                .map(|j| j.action_id.clone());
            for action in actions {
                tracing::debug!(action_id = job.as_deref().unwrap_or(""), ?action, "action");
                match action {
                    Action::Persist => self.save()?,
                    Action::MarkBad(slot) => {
                        info!(slot = %slot, "marking slot bad");
                        self.boot.mark_bad(slot)?
                    }
                    Action::Activate(slot) => {
                        info!(slot = %slot, "activating slot for a trial boot");
                        self.boot.activate(slot)?;
                        next = Some(Event::Activated);
                    }
                    Action::MarkGood => {
                        info!("marking the booted slot good");
                        self.boot.mark_good()?
                    }
                    Action::KeepBootedGood => self.boot.keep_booted_good()?,
                    Action::Install(job) => {
                        let done = self.install(&job).await;
                        if let Event::InstallDone(Err(f)) = &done {
                            self.install_failed_transiently |= f.retryable;
                        }
                        next = Some(done);
                    }
                    Action::RunHealthChecks => {
                        info!(
                            checks = self.cfg.agent.health_checks.len(),
                            "running health checks"
                        );
                        let result = self.health.check().await;
                        if let Err(e) = &result {
                            warn!(report = %e, "health check failed");
                        }
                        next = Some(Event::HealthChecked(result));
                    }
                    Action::Notify { link, feedback } => {
                        if let Err(e) = self.client.send_feedback(&link, &feedback).await {
                            warn!(error = %e, "progress feedback not delivered (not retried)");
                        }
                    }
                    Action::DeliverOutbox => {
                        if let Err(e) = self.deliver().await {
                            warn!(error = %e, "feedback kept for later");
                        }
                    }
                    Action::Defer(reason) => {
                        warn!(action_id = job.as_deref().unwrap_or(""), %reason, "not installing now");
                    }
                    Action::Reboot if self.hold_reboot => {
                        self.save()?;
                        info!("reboot needed; not rebooting (--no-reboot)");
                        return Ok(false);
                    }
                    Action::Reboot => {
                        self.save()?;
                        info!(command = ?self.cfg.boot.reboot_command, "rebooting");
                        self.rebooter.reboot().map_err(DriverError::Reboot)?;
                        return Ok(true);
                    }
                    Action::SendConsent {
                        link,
                        accept,
                        details,
                    } => {
                        let delivery = self
                            .client
                            .send_confirmation(&link, accept, &details)
                            .await?;
                        let action_id = link.action_id().unwrap_or_default();
                        info!(action_id = %action_id, accept, ?delivery, "consent sent");
                        next = Some(Event::ConsentSent { action_id, accept });
                    }
                    Action::ClearConsentAnswer => self.store.clear_consent()?,
                }
            }
            if self.state != self.saved {
                self.save()?;
            }
        }
        Ok(false)
    }

    /// Delivers the outbox in order; 200 and 410 both end an entry.
    async fn deliver(&mut self) -> Result<(), DriverError> {
        while let Some(entry) = self.state.outbox().first().cloned() {
            let result = self
                .client
                .send_feedback(&entry.link, &entry.feedback)
                .await;
            match result {
                Ok(Delivery::Accepted) => {
                    info!(
                        action_id = %entry.feedback.action_id,
                        execution = entry.feedback.execution.as_str(),
                        finished = entry.feedback.finished.as_str(),
                        "feedback delivered"
                    );
                    if entry.is_failure() {
                        self.failure_reported = true;
                    }
                }
                Ok(Delivery::Gone) => {
                    info!(action_id = %entry.feedback.action_id, "action already closed on the server (410); feedback dropped");
                }
                Ok(Delivery::NotApplicable(status)) => {
                    warn!(action_id = %entry.feedback.action_id, status, "server no longer takes this feedback; dropped");
                }
                Ok(Delivery::Refused(status)) => {
                    warn!(action_id = %entry.feedback.action_id, status, execution = entry.feedback.execution.as_str(), "server refuses this feedback for good; dropped so later feedback goes on");
                }
                Err(e) => {
                    warn!(error = %e, "feedback delivery failed");
                    return Err(DriverError::FeedbackOwed(self.state.outbox().len()));
                }
            }
            // Boxed: applying an event may deliver the outbox again.
            Box::pin(self.apply(Event::FeedbackDelivered { seq: entry.seq })).await?;
        }
        Ok(())
    }

    /// Installs `job` while watching the server for a cancel of it; returns the next event.
    /// A job that reuses a downloaded image only has it read back.
    async fn install(&mut self, job: &Job) -> Event {
        let req = self.install_request(job);
        if job.is_local() {
            return self.install_local(&req).await;
        }
        if let Some(image) = &job.reuse {
            info!(action_id = %job.action_id, slot = %job.target, bytes = image.bytes, "reading back the image downloaded earlier");
            let result = self.installer.verify(&req, image).await;
            match &result {
                Ok(_) => {
                    info!(action_id = %job.action_id, slot = %job.target, "downloaded image intact; no download needed")
                }
                Err(f) => {
                    warn!(action_id = %job.action_id, error = %f.message, "downloaded image not usable; downloading again")
                }
            }
            return Event::InstallDone(result);
        }
        info!(action_id = %job.action_id, slot = %job.target, url = %req.url, "installing");
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
        let client = self.client.clone();
        let link = job.link.clone();
        let action_id = job.action_id.clone();
        let seed_slot = job.target.other();
        let runs = job.download_runs;
        // Progress feedback goes out from its own task, within the run's budget (status quota).
        let reporter = tokio::spawn(async move {
            let run_start = tokio::time::Instant::now();
            let mut budget = ProgressBudget::for_run(runs);
            while let Some(p) = rx.recv().await {
                let (stage, done, total) = match p {
                    Progress::Downloading { done, total } => (Stage::Downloading, done, total),
                    Progress::Verifying { done, total } => (Stage::Verifying, done, Some(total)),
                    Progress::Delta(summary) => {
                        // Once per install: what a delta install downloads and reuses.
                        let fb = Feedback::new(&action_id, Execution::Download, Finished::None)
                            .detail(summary.describe(&format!("slot {seed_slot}")));
                        let _ = client.send_feedback(&link, &fb).await;
                        continue;
                    }
                };
                if !budget.admit(stage, done, total, run_start.elapsed()) {
                    continue;
                }
                let (execution, done, total, what) = match p {
                    Progress::Downloading { done, total } => {
                        (Execution::Download, done, total, "downloading")
                    }
                    Progress::Verifying { done, total } => {
                        (Execution::Proceeding, done, Some(total), "verifying")
                    }
                    Progress::Delta(_) => continue,
                };
                let amount = match total.filter(|t| *t > 0) {
                    Some(total) => format!("{done} of {total} bytes"),
                    None => format!("{done} bytes"),
                };
                let mut fb = Feedback::new(&action_id, execution, Finished::None)
                    .detail(format!("{what}: {amount}"));
                if let Some(total) = total.filter(|t| *t > 0) {
                    fb.progress = Some((done.min(total) * 100 / total, 100));
                }
                let _ = client.send_feedback(&link, &fb).await;
            }
        });
        let mut progress = move |p: Progress| {
            let _ = tx.send(p);
        };
        let mut watcher = self.client.clone();
        let interval = self
            .last_sleep
            .clamp(Duration::from_secs(1), Duration::from_secs(30));
        let watched_id = job.action_id.clone();
        // The server may cancel while a long download runs: look every poll interval.
        let watch = async move {
            loop {
                tokio::time::sleep(interval).await;
                if let Some(canceled) = cancel_of(&mut watcher, &watched_id).await {
                    return canceled;
                }
            }
        };
        let outcome = tokio::select! {
            r = self.installer.install(self.client.http(), &req, &mut progress) => Ok(r),
            canceled = watch => Err(canceled),
        };
        drop(progress);
        reporter.abort();
        let result = match outcome {
            Ok(r) => r,
            Err((link, request)) => {
                info!(action_id = %job.action_id, "canceled by the server during the install; stopped");
                return Event::Cancel { link, request };
            }
        };
        if result.is_err() {
            // hawkBit answers 404 for the artifacts of a CANCELING action: a failed download
            // may be a cancel the watch has not seen yet. Look before calling it a failure.
            let mut client = self.client.clone();
            if let Some((link, request)) = cancel_of(&mut client, &job.action_id).await {
                info!(action_id = %job.action_id, "install failed while the server cancels the action; handled as the cancel");
                return Event::Cancel { link, request };
            }
        }
        match &result {
            Ok(_) => {
                info!(action_id = %job.action_id, slot = %job.target, "image written and verified")
            }
            Err(f) => {
                warn!(action_id = %job.action_id, error = %f.message, retryable = f.retryable, "install failed")
            }
        }
        Event::InstallDone(result)
    }

    /// A local job's install: no server to watch or tell; progress goes to the terminal or
    /// the log.
    async fn install_local(&self, req: &InstallRequest) -> Event {
        use std::io::IsTerminal;
        info!(source = %req.url, slot = %req.slot_path.display(), "installing");
        let mut display =
            crate::local_install::ProgressDisplay::new(std::io::stderr().is_terminal());
        let mut progress = |p: Progress| display.show(p);
        let result = self
            .installer
            .install(self.client.http(), req, &mut progress)
            .await;
        display.finish();
        match &result {
            Ok(_) => info!(source = %req.url, "image written and verified"),
            Err(f) => warn!(source = %req.url, error = %f.message, "local install failed"),
        }
        Event::InstallDone(result)
    }

    fn install_request(&self, job: &Job) -> InstallRequest {
        let url = job
            .artifact
            .download
            .as_ref()
            .map(|l| l.href.clone())
            .unwrap_or_default();
        // `send_token_to_other_hosts` is for the server's links, not a URL typed for a local job.
        let auth_header = self.client.auth_header_for(&url).filter(|_| {
            !job.is_local() || crate::ddi::client::same_origin(&self.cfg.server.url, &url)
        });
        InstallRequest {
            url,
            auth_header,
            expected: ExpectedHash {
                sha256: job.artifact.hashes.sha256.clone(),
                sha1: job.artifact.hashes.sha1.clone(),
                md5: job.artifact.hashes.md5.clone(),
            },
            size: job.artifact.size,
            filename: job.artifact.filename.clone(),
            version: job.version.clone(),
            slot_path: self.slot_path(job.target),
            booted_slot_path: Some(self.slot_path(job.target.other())),
            resume_path: self.store.path("download.resume"),
            max_rate: self.cfg.agent.max_download_rate,
            bundle: self.cfg.bundle.for_install(),
            local: job.is_local(),
            local_file: match job.local.as_ref().map(|o| Source::parse(&o.source)) {
                Some(Source::File(path)) => Some(path),
                _ => None,
            },
        }
    }

    fn slot_path(&self, slot: Slot) -> PathBuf {
        match slot {
            Slot::A => self.cfg.slot_a.clone(),
            Slot::B => self.cfg.slot_b.clone(),
        }
    }

    /// configData (merge) when the server asks or the attributes changed since last accepted.
    async fn config_data(&mut self, poll: &PollReply, booted: Slot) -> Result<(), DriverError> {
        let attrs = attributes(&self.cfg, Some(booted));
        if poll.config_data.is_none() && self.state.caches().attributes_sent() == Some(&attrs) {
            return Ok(());
        }
        self.client
            .put_config_data(poll.config_data.as_ref(), &attrs)
            .await?;
        info!(count = attrs.len(), "attributes sent (configData)");
        self.apply(Event::AttributesSent(attrs)).await?;
        Ok(())
    }

    /// Logs what the server considers installed (validates the body); never fatal.
    async fn installed_base(&mut self, poll: &PollReply) {
        let Some(link) = &poll.installed else { return };
        if self.state.caches().server_installed() == Some(link.href.as_str()) {
            return;
        }
        match self.client.deployment(link).await {
            Ok(d) => {
                let version: Vec<String> = d
                    .chunks
                    .iter()
                    .map(|c| format!("{} {}", c.part, c.version))
                    .collect();
                info!(action_id = %d.action_id, modules = %version.join(", "), "server reports installed base");
                let read = Event::InstalledBaseRead {
                    href: link.href.clone(),
                };
                if let Err(e) = self.apply(read).await {
                    warn!(error = %e, "installedBase read, not saved; read again next cycle");
                }
            }
            Err(e) => warn!(error = %e, "installedBase not readable"),
        }
    }

    /// The confirmation flow: the machine decides with the user's recorded answer for this
    /// action (`ddi-agent consent accept|deny`), if any.
    /// Before anything is confirmed, the action's details are fetched: what is confirmed is
    /// logged, shown by `status` while it waits, and named in the confirmation's details.
    async fn consent(&mut self, link: &Link) -> Result<bool, DriverError> {
        let action_id = link.action_id().unwrap_or_default();
        let what = match self.client.deployment(link).await {
            Ok(d) => machine::describe_deployment(&d),
            Err(e) => {
                // Never confirm blind: asked again at the next poll.
                warn!(error = %e, action_id = %action_id, "details of the action to confirm not readable; not confirmed now");
                return Ok(false);
            }
        };
        info!(action_id = %action_id, what = %what, "server asks for confirmation");
        let answer = self.recorded_answer(&action_id)?;
        self.apply(Event::ConfirmationAsked {
            link: link.clone(),
            answer,
            what,
        })
        .await
    }

    /// The user's recorded answer (`ddi-agent consent accept|deny`) for `action_id`; none
    /// under automatic consent.
    fn recorded_answer(&mut self, action_id: &str) -> Result<Option<bool>, DriverError> {
        if self.params.auto_consent {
            return Ok(None);
        }
        match self.store.load_consent() {
            Ok(Some(d)) if d.action_id == action_id => Ok(Some(d.accept)),
            Ok(_) => Ok(None),
            Err(e @ PersistError::Corrupt { .. }) => {
                // Not a dead end: the user answers again.
                warn!(error = %e, action_id = %action_id, "consent decision unreadable; removed, the action waits for a new answer");
                self.store.clear_consent()?;
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// Polls once: the server's cancel request for `action_id`, if it has one.
async fn cancel_of(client: &mut DdiClient, action_id: &str) -> Option<(Link, CancelRequest)> {
    let link = client.poll().await.ok()?.cancel?;
    // The action a cancel stops is its `stopId`, not necessarily the cancel's own id.
    let request = client.cancel_request(&link).await.ok()?;
    (request.stop_id == action_id).then_some((link, request))
}

/// Logs what changed in the update's state: its phase, or the action waiting for consent.
fn log_update_change(before: &machine::Update, after: &machine::Update) {
    if before.phase().name() != after.phase().name() {
        let action_id = after
            .phase()
            .job()
            .map(|j| j.action_id.as_str())
            .or_else(|| after.last_result().map(|r| r.action_id.as_str()))
            .unwrap_or_default();
        info!(action_id = %action_id, state = after.phase().name(), from = before.phase().name(), "state changed");
    }
    if before.pending_consent() != after.pending_consent() {
        if let Some(p) = after.pending_consent() {
            info!(action_id = %p.action_id, why = p.reason.describe(), what = %p.what, "action waits for consent: run `ddi-agent consent accept` or `deny`");
        }
    }
}

/// The configured attributes plus the agent's own: booted slot and running version.
pub fn attributes(cfg: &Config, booted: Option<Slot>) -> BTreeMap<String, String> {
    let mut attrs = cfg.attributes.clone();
    if let Some(b) = booted {
        attrs.insert("booted_slot".into(), b.to_string());
    }
    if let Some(v) = running_version(&cfg.agent.version_file) {
        attrs.insert("running_version".into(), v);
    }
    attrs
}

/// `VERSION_ID` (else `VERSION`) of an os-release file, or the first line of a plain file.
pub fn running_version(path: &std::path::Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let value = |key: &str| {
        text.lines().find_map(|l| {
            let (k, v) = l.split_once('=')?;
            (k.trim() == key).then(|| v.trim().trim_matches(['"', '\'']).to_string())
        })
    };
    let v = value("VERSION_ID")
        .or_else(|| value("VERSION"))
        .or_else(|| {
            let first = text.lines().next()?.trim();
            (!first.contains('=')).then(|| first.to_string())
        })?;
    let v = crate::ddi::sanitise_attribute(&v);
    (!v.is_empty()).then_some(v)
}

// ---- real implementations ---------------------------------------------------------------------

/// [`Bootloader`] over `bootctl::BootControl`.
pub struct BootCtl(pub bootctl::BootControl);

impl BootCtl {
    pub fn open(cfg: &Config) -> Result<BootCtl, BootError> {
        bootctl::BootControl::open(bootctl::BootOptions {
            env_config: cfg.boot.env_config.clone(),
            scheme: cfg.boot.scheme,
            cmdline: cfg.boot.cmdline.clone(),
            attempts: cfg.boot.attempts,
        })
        .map(|b| BootCtl(b.with_lock_path(&cfg.boot.env_lock_file)))
        .map_err(|e| BootError(e.to_string()))
    }
}

impl Bootloader for BootCtl {
    fn booted(&self) -> Result<Slot, BootError> {
        self.0.booted().map_err(|e| BootError(e.to_string()))
    }
    fn next(&self) -> Result<Slot, BootError> {
        self.0
            .status()
            .map(|s| s.next)
            .map_err(|e| BootError(e.to_string()))
    }
    fn activate(&mut self, slot: Slot) -> Result<(), BootError> {
        self.0
            .activate(slot)
            .map(|_| ())
            .map_err(|e| BootError(e.to_string()))
    }
    fn mark_good(&mut self) -> Result<(), BootError> {
        self.0
            .mark_good()
            .map(|_| ())
            .map_err(|e| BootError(e.to_string()))
    }
    fn mark_bad(&mut self, slot: Slot) -> Result<(), BootError> {
        self.0
            .mark_bad(slot)
            .map(|_| ())
            .map_err(|e| BootError(e.to_string()))
    }
    fn booted_on_trial(&self) -> Result<bool, BootError> {
        let status = self.0.status().map_err(|e| BootError(e.to_string()))?;
        Ok(status.trial == Some(true) && status.booted == Some(status.next))
    }
    fn keep_booted_good(&mut self) -> Result<(), BootError> {
        let status = self.0.status().map_err(|e| BootError(e.to_string()))?;
        // A trial we do not know of (someone ran `ddi-bootctl set-next`) is not ours to confirm;
        // U-Boot falls back unless whoever started it confirms it.
        if status.trial == Some(true) || status.booted != Some(status.next) {
            return Ok(());
        }
        self.mark_good()
    }
}

/// [`Installer`] over `crate::install::install_with` with these options (`Pipeline::default()`:
/// the defaults).
#[derive(Default)]
pub struct Pipeline {
    pub options: crate::install::InstallOptions,
}

impl Installer for Pipeline {
    async fn install(
        &self,
        http: &reqwest::Client,
        req: &InstallRequest,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<SlotImage, InstallFailure> {
        crate::install::install_with(http, req, &self.options, progress)
            .await
            .map(|i| SlotImage {
                bytes: i.bytes_written,
                sha256: i.sha256_of_slot_image,
                policy: BundlePolicy::fingerprint(req.bundle.as_ref()),
            })
            .map_err(install_failure)
    }

    async fn verify(
        &self,
        req: &InstallRequest,
        image: &SlotImage,
    ) -> Result<SlotImage, InstallFailure> {
        if image.policy != BundlePolicy::fingerprint(req.bundle.as_ref()) {
            return Err(InstallFailure {
                message: "the image was checked under another [bundle] policy".into(),
                retryable: false,
            });
        }
        let req = req.clone();
        let image = image.clone();
        tokio::task::spawn_blocking(move || {
            crate::install::verify_slot_image(
                &req.slot_path,
                req.booted_slot_path.as_deref(),
                image.bytes,
                &image.sha256,
            )
            .map(|()| image)
            .map_err(install_failure)
        })
        .await
        .unwrap_or_else(|e| {
            Err(InstallFailure {
                message: format!("read-back of the slot died: {e}"),
                retryable: false,
            })
        })
    }
}

fn install_failure(e: crate::install::InstallError) -> InstallFailure {
    InstallFailure {
        message: e.to_string(),
        retryable: e.is_retryable(),
    }
}

/// [`HealthChecker`] over `crate::health`.
pub struct Checks {
    pub checks: Vec<crate::health::HealthCheck>,
    pub timeout: Duration,
}

impl HealthChecker for Checks {
    async fn check(&self) -> Result<(), String> {
        crate::health::run_checks(&self.checks, self.timeout)
            .await
            .map_err(|f| f.to_string())
    }
}

/// [`Rebooter`] running `reboot_command`.
pub struct RebootCommand(pub Vec<String>);

impl Rebooter for RebootCommand {
    fn reboot(&self) -> Result<(), String> {
        let (prog, args) = self
            .0
            .split_first()
            .ok_or_else(|| "empty reboot_command".to_string())?;
        let status = std::process::Command::new(prog)
            .args(args)
            .status()
            .map_err(|e| format!("{prog}: {e}"))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{:?} {status}", self.0))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bootctl::env::{Env, Layout};
    use bootctl::store::EnvStore;

    /// The real bootloader adapter over an in-memory environment, booted from `slot`.
    fn bootctl_on(
        dir: &std::path::Path,
        scheme: bootctl::SchemeKind,
        vars: &[(&str, &str)],
        slot: &str,
    ) -> (BootCtl, bootctl::store::MemMedium) {
        let mut env = Env::new();
        for (name, value) in vars {
            env.set(name, value).unwrap();
        }
        let (store, medium) = EnvStore::in_memory(&env, 4096, Layout::Redundant).unwrap();
        let cmdline = dir.join("cmdline");
        std::fs::write(&cmdline, format!("root=/dev/vda bootctl.slot={slot}\n")).unwrap();
        let control = bootctl::BootControl::with_store(store, scheme, cmdline, 3);
        (BootCtl(control), medium)
    }

    #[test]
    fn keeping_the_booted_slot_good_refreshes_rauc_counters_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut boot, medium) = bootctl_on(
            dir.path(),
            bootctl::SchemeKind::Rauc,
            &[
                ("BOOT_ORDER", "A B"),
                ("BOOT_A_LEFT", "1"),
                ("BOOT_B_LEFT", "3"),
            ],
            "A",
        );
        boot.keep_booted_good().unwrap();
        assert_eq!(medium.writes(), 1);
        let env = boot.0.env().unwrap();
        assert_eq!(env.get("BOOT_A_LEFT"), Some("3"));
        // Already fresh: nothing is written.
        boot.keep_booted_good().unwrap();
        assert_eq!(medium.writes(), 1);
    }

    #[test]
    fn keeping_the_booted_slot_good_never_confirms_a_trial() {
        let dir = tempfile::tempdir().unwrap();
        // bootcount: a trial of A that the agent did not start.
        let (mut boot, medium) = bootctl_on(
            dir.path(),
            bootctl::SchemeKind::Bootcount,
            &[
                ("bootctl_slot", "A"),
                ("upgrade_available", "1"),
                ("bootcount", "1"),
            ],
            "A",
        );
        boot.keep_booted_good().unwrap();
        assert_eq!(medium.writes(), 0);
        // rauc: B was made primary by someone else while A runs.
        let (mut boot, medium) = bootctl_on(
            dir.path(),
            bootctl::SchemeKind::Rauc,
            &[
                ("BOOT_ORDER", "B A"),
                ("BOOT_A_LEFT", "1"),
                ("BOOT_B_LEFT", "3"),
            ],
            "A",
        );
        boot.keep_booted_good().unwrap();
        assert_eq!(medium.writes(), 0);
    }
}
