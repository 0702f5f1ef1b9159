//! The commands of the `ddi-agent` binary and their plumbing: logging (journald under systemd,
//! stderr otherwise), systemd notify (READY, STATUS, WATCHDOG), SIGTERM, the single-instance
//! lock, and the exit statuses of the contract (0 ok, 1 update failed and reported, 2 cycle
//! not completed, 3 configuration error).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use sd_notify::NotifyState;
use serde_json::json;
use tracing::{debug, error, info, warn};
use tracing_subscriber::filter::LevelFilter;

use crate::config::Config;
use crate::ddi::DdiClient;
use crate::driver::{
    BootCtl, Bootloader, Checks, CycleReport, Driver, DriverError, Pipeline, RebootCommand,
};
use crate::machine::{Phase, ResultKind, State};
use crate::persist::{ConsentDecision, Store, UNREADABLE_FILE};

/// Exit statuses of the contract.
pub mod exit {
    pub const OK: u8 = 0;
    pub const UPDATE_FAILED: u8 = 1;
    pub const INCOMPLETE: u8 = 2;
    pub const CONFIG: u8 = 3;
}

/// Shortest wait between two polls of `run`, whatever the server's `sleep` says: `00:00:00` (or
/// a few milliseconds) must not make a device poll in a tight loop.
pub const MIN_POLL_INTERVAL: Duration = Duration::from_secs(5);

/// Longest wait between two polls of `run`: one broken answer must not silence a device for
/// longer (hawkBit's own maximum polling time defaults to a day).
pub const MAX_POLL_INTERVAL: Duration = Duration::from_secs(7 * 86_400);

/// The wait before the next poll: the server's `sleep`, but never less than
/// [`MIN_POLL_INTERVAL`] nor more than [`MAX_POLL_INTERVAL`]; held at the floor, up to half of
/// it again is added (`jitter` in 0.0..=1.0) so that a fleet told to poll at once spreads out.
pub fn poll_interval(server_sleep: Duration, jitter: f64) -> Duration {
    if server_sleep >= MIN_POLL_INTERVAL {
        return server_sleep.min(MAX_POLL_INTERVAL);
    }
    MIN_POLL_INTERVAL + MIN_POLL_INTERVAL.mul_f64(0.5 * jitter.clamp(0.0, 1.0))
}

/// A subcommand.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Run,
    Once,
    Status {
        json: bool,
    },
    Consent {
        accept: bool,
    },
    /// `install [--check] [--no-reboot] SOURCE`: an image no server assigned (file or http(s)
    /// URL).
    Install {
        source: String,
        check: bool,
        /// Reboot after activating (the default); `--no-reboot` leaves it to the user.
        reboot: bool,
    },
}

/// Runs `command` with the config at `config_path`; returns the exit status.
pub fn main(config_path: &Path, command: Command) -> u8 {
    let cfg = match Config::load(config_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ddi-agent: {e}");
            return exit::CONFIG;
        }
    };
    match command {
        Command::Status { json } => status(&cfg, json),
        Command::Consent { accept } => consent(&cfg, accept),
        Command::Install {
            source,
            check,
            reboot,
        } => {
            init_logging();
            match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) if check => runtime.block_on(check_source(&cfg, &source)),
                Ok(runtime) => runtime.block_on(install_source(cfg, &source, reboot)),
                Err(e) => {
                    eprintln!("ddi-agent: cannot start the async runtime: {e}");
                    exit::INCOMPLETE
                }
            }
        }
        Command::Once | Command::Run => {
            init_logging();
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("ddi-agent: cannot start the async runtime: {e}");
                    return exit::INCOMPLETE;
                }
            };
            runtime.block_on(agent(cfg, command == Command::Run))
        }
    }
}

/// The log level from `DDI_AGENT_LOG`, else `RUST_LOG`, else `info`.
///
/// Accepted: a level (`off`, `error`, `warn`, `info`, `debug`, `trace`, any case) or a
/// comma-separated list of `target=level` directives, of which only the levels count: the
/// most verbose one applies to every target (`ddi_agent=trace,hyper=info` logs everything at
/// trace). A full `EnvFilter` would pull a regex engine into the binary (~0.3 MiB). A value
/// with no valid level is ignored (the next variable, or `info`).
pub fn log_level(ddi_agent_log: Option<&str>, rust_log: Option<&str>) -> LevelFilter {
    [ddi_agent_log, rust_log]
        .into_iter()
        .flatten()
        .find_map(parse_log_level)
        .unwrap_or(LevelFilter::INFO)
}

fn parse_log_level(spec: &str) -> Option<LevelFilter> {
    spec.split(',')
        .filter_map(|directive| {
            let level = directive.rsplit('=').next().unwrap_or(directive).trim();
            // tracing reads "" as `error`; here an empty value means "not set".
            (!level.is_empty()).then(|| level.parse::<LevelFilter>().ok())?
        })
        .max()
}

/// Logging: journald with structured fields under systemd (JOURNAL_STREAM), else stderr.
pub fn init_logging() {
    use tracing_subscriber::prelude::*;
    let var = |name: &str| std::env::var(name).ok();
    let filter = log_level(var("DDI_AGENT_LOG").as_deref(), var("RUST_LOG").as_deref());
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            let _ = tracing_subscriber::registry()
                .with(filter)
                .with(
                    journald
                        .with_syslog_identifier("ddi-agent".into())
                        // ACTION_ID=, STATE= as journal fields (`journalctl ACTION_ID=42`).
                        .with_field_prefix(None),
                )
                .try_init();
            return;
        }
    }
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_target(false),
        )
        .try_init();
}

/// Holds the single-instance lock while alive.
#[derive(Debug)]
pub struct InstanceLock {
    _file: File,
}

/// Takes the agent lock (flock, non-blocking) so that two agents never run at once.
pub fn lock(path: &Path) -> Result<InstanceLock, String> {
    bootctl::fsutil::create_parent_dir(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| format!("lock file {}: {e}", path.display()))?;
    bootctl::fsutil::flock_exclusive(&file, false).map_err(|e| {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            format!(
                "another ddi-agent is running (lock {} is held)",
                path.display()
            )
        } else {
            format!("lock file {}: {e}", path.display())
        }
    })?;
    Ok(InstanceLock { _file: file })
}

async fn agent(cfg: Config, daemon: bool) -> u8 {
    let reboot_timeout = cfg.boot.reboot_timeout;
    let (driver, _lock) = match open_driver(cfg) {
        Ok(d) => d,
        Err(status) => return status,
    };
    if daemon {
        run(driver, reboot_timeout).await
    } else {
        once(driver).await
    }
}

/// The real driver, with the single-instance lock held; `Err` is the exit status (the
/// problem is logged).
fn open_driver(cfg: Config) -> Result<(RealDriver, InstanceLock), u8> {
    let store = logged(Store::open(&cfg.agent.state_dir), exit::INCOMPLETE)?;
    let lock = logged(lock(&cfg.agent.lock_file), exit::INCOMPLETE)?;
    let client = logged(DdiClient::new(&cfg.server), exit::CONFIG)?;
    let boot = logged(BootCtl::open(&cfg), exit::INCOMPLETE)?;
    let health = Checks {
        checks: cfg.agent.health_checks.clone(),
        timeout: cfg.agent.health_check_timeout,
    };
    let reboot = RebootCommand(cfg.boot.reboot_command.clone());
    let pipeline = Pipeline {
        options: crate::install::InstallOptions {
            checkpoint_interval: cfg.agent.checkpoint_interval,
            ..Default::default()
        },
    };
    let driver = logged(
        Driver::new(cfg, client, store, boot, pipeline, health, reboot),
        exit::INCOMPLETE,
    )?;
    Ok((driver, lock))
}

/// `r`, or its error logged and `status` in its place.
fn logged<T, E: std::fmt::Display>(r: Result<T, E>, status: u8) -> Result<T, u8> {
    r.map_err(|e| {
        error!("{e}");
        status
    })
}

/// `install SOURCE`: a local job (see [`Driver::local_install`]). Exit 0 = activated (and
/// rebooting unless `--no-reboot`), 1 = refused or failed (nothing activated), 2 = not
/// completed (the agent lock, the state or the bootloader).
async fn install_source(cfg: Config, source: &str, reboot: bool) -> u8 {
    use crate::driver::LocalOutcome;
    let (mut driver, _lock) = match open_driver(cfg) {
        Ok(d) => d,
        Err(status) => return status,
    };
    // The path as the status shows it later: absolute when the file exists. The result lines
    // name SOURCE as given.
    let given = source;
    let source = match crate::local_install::Source::parse(source) {
        crate::local_install::Source::File(path) => std::fs::canonicalize(&path)
            .unwrap_or(path)
            .display()
            .to_string(),
        crate::local_install::Source::Url(url) => url,
    };
    let started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let origin = crate::machine::LocalOrigin { source, started_at };
    match driver.local_install(origin, reboot).await {
        Ok(LocalOutcome::Activated { target, rebooting }) => {
            let next = if rebooting {
                "rebooting; after the reboot `ddi-agent once` or `run` confirms it (health checks)"
            } else {
                "reboot to try it; after the reboot `ddi-agent once` or `run` confirms it \
                 (health checks)"
            };
            println!("{given}: written, verified and activated in slot {target}; {next}");
            exit::OK
        }
        Ok(LocalOutcome::Refused(reason)) => {
            eprintln!("ddi-agent: {given}: not installed: {reason}");
            exit::UPDATE_FAILED
        }
        Ok(LocalOutcome::Failed(message)) => {
            eprintln!("ddi-agent: {given}: not installed: {message}");
            exit::UPDATE_FAILED
        }
        Err(e) => {
            eprintln!("ddi-agent: {given}: {e}");
            exit::INCOMPLETE
        }
    }
}

type RealDriver = Driver<BootCtl, Pipeline, Checks, RebootCommand>;

/// The post-reboot step, or `None` when the boot environment is unusable: the cycle still
/// polls then, so that the server hears why nothing happens, and the step is tried again.
async fn startup(driver: &mut RealDriver) -> Result<Option<CycleReport>, DriverError> {
    match driver.startup().await {
        Ok(r) => Ok(Some(r)),
        Err(e @ DriverError::BootEnv(_)) => {
            warn!(error = %e, "post-reboot step skipped; polling to report the problem");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// `once`: finish what waited for a reboot, then one poll cycle.
async fn once(mut driver: RealDriver) -> u8 {
    let started = match startup(&mut driver).await {
        Ok(r) => r.unwrap_or_default(),
        Err(e) => {
            error!("cycle not completed: {e}");
            return exit::INCOMPLETE;
        }
    };
    if started.rebooting {
        return if started.failure_reported {
            exit::UPDATE_FAILED
        } else {
            exit::OK
        };
    }
    match driver.cycle().await {
        Err(e) => {
            error!("cycle not completed: {e}");
            exit::INCOMPLETE
        }
        Ok(r) if r.failure_reported || started.failure_reported => exit::UPDATE_FAILED,
        Ok(CycleReport {
            unfinished_install: Some(u),
            ..
        }) => {
            // Not an error, but the update did not get as far as a cycle takes it.
            warn!(action_id = %u.action_id, transient_failure = u.transient_failure, "install not finished; it goes on at the next poll");
            exit::INCOMPLETE
        }
        Ok(_) => exit::OK,
    }
}

/// `run`'s wait after `failures` failed cycles in a row (an error, or an install a transient
/// failure interrupted): 30 s doubling up to 5 min, with jitter.
fn failed_cycle_backoff(failures: u32) -> Duration {
    crate::http_policy::Backoff {
        first: Duration::from_secs(30),
        max: Duration::from_secs(300),
    }
    .delay(failures)
}

fn notify(states: &[NotifyState]) {
    let _ = sd_notify::notify(false, states);
}

/// `run`: the daemon loop. A reboot the system does not follow within `reboot_timeout` is
/// reported and asked for again.
async fn run(mut driver: RealDriver, reboot_timeout: Duration) -> u8 {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int) = match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(t), Ok(i)) => (t, i),
        _ => {
            error!("cannot install signal handlers");
            return exit::INCOMPLETE;
        }
    };
    let mut watchdog_usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut watchdog_usec) && watchdog_usec > 0 {
        let period = Duration::from_micros(watchdog_usec / 2);
        tokio::spawn(async move {
            loop {
                notify(&[NotifyState::Watchdog]);
                tokio::time::sleep(period).await;
            }
        });
    }
    notify(&[NotifyState::Ready, NotifyState::Status("starting")]);
    let mut first = true;
    let mut failures = 0u32;
    // Reboot commands run (successfully) that the system has not followed yet.
    let mut reboots_requested = 0u32;
    loop {
        let work = async {
            if reboots_requested > 0 {
                driver
                    .reboot_overdue(reboot_timeout, reboots_requested)
                    .await?;
                return Ok(CycleReport {
                    rebooting: true,
                    ..CycleReport::default()
                });
            }
            if first {
                // Until the post-reboot step has run once, every attempt starts with it.
                if let Some(r) = startup(&mut driver).await? {
                    first = false;
                    if r.rebooting {
                        return Ok(r);
                    }
                }
            }
            driver.cycle().await
        };
        let outcome = tokio::select! {
            r = work => r,
            _ = term.recv() => break,
            _ = int.recv() => break,
        };
        let sleep = match outcome {
            Ok(r) if r.rebooting => {
                reboots_requested += 1;
                notify(&[NotifyState::Status("rebooting")]);
                info!(
                    timeout_s = reboot_timeout.as_secs(),
                    "reboot requested; waiting to be stopped"
                );
                reboot_timeout
            }
            Ok(CycleReport {
                unfinished_install: Some(u),
                ..
            }) if u.transient_failure => {
                // A network failure: retry sooner than the polling interval, backing off.
                failures += 1;
                let wait = failed_cycle_backoff(failures);
                info!(
                    action_id = %u.action_id,
                    failures,
                    wait_ms = wait.as_millis() as u64,
                    "install interrupted by a transient failure; retrying after the backoff"
                );
                notify(&[NotifyState::Status(&format!(
                    "installing: action {} interrupted, retrying",
                    u.action_id
                ))]);
                wait
            }
            Ok(r) => {
                failures = 0;
                if let Some(u) = &r.unfinished_install {
                    info!(action_id = %u.action_id, "install waits; it goes on at the next poll");
                }
                let phase = driver.state().update().phase().name();
                let status = match driver.state().update().phase().job() {
                    Some(j) if j.is_local() => format!("{phase}: local install slot {}", j.target),
                    Some(j) => format!("{phase}: action {} slot {}", j.action_id, j.target),
                    None => phase.to_string(),
                };
                notify(&[NotifyState::Status(&status)]);
                let server_sleep = r.sleep.unwrap_or(Duration::from_secs(300));
                let jitter = crate::http_policy::jitter_unit();
                let sleep = poll_interval(server_sleep, jitter);
                if sleep != server_sleep {
                    debug!(
                        server_ms = server_sleep.as_millis() as u64,
                        sleep_ms = sleep.as_millis() as u64,
                        "server's polling sleep is below the floor; waiting longer"
                    );
                }
                sleep
            }
            Err(e) => {
                failures += 1;
                warn!(error = %e, failures, "cycle not completed");
                notify(&[NotifyState::Status(&format!("cycle not completed: {e}"))]);
                failed_cycle_backoff(failures)
            }
        };
        release_free_memory();
        tokio::select! {
            _ = tokio::time::sleep(sleep) => {}
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    notify(&[NotifyState::Stopping]);
    info!("stopping");
    exit::OK
}

/// Before the agent sleeps until the next poll: give the heap's free pages back to the system.
/// glibc's malloc keeps freed memory for reuse, and pages that startup and installs left free
/// between live blocks stay resident otherwise (about 56 KiB of the idle daemon's heap, issue
/// 19, BENCHMARKS.md). It takes microseconds once per poll.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims malloc's own arenas; it takes their locks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `status`: what the agent knows.
fn status(cfg: &Config, as_json: bool) -> u8 {
    let store = Store::at(&cfg.agent.state_dir);
    let (state, state_error) = match store.load() {
        Ok(s) => (s, None),
        Err(e) => (State::default(), Some(e.to_string())),
    };
    let boot = BootCtl::open(cfg).and_then(|b| {
        let status =
            b.0.status()
                .map_err(|e| crate::driver::BootError(e.to_string()))?;
        Ok((b.booted().ok(), status))
    });
    let (booted, next, trial, boot_error) = match &boot {
        Ok((booted, s)) => (
            booted.map(|b| b.to_string()),
            Some(s.next.to_string()),
            s.trial,
            None,
        ),
        Err(e) => (None, None, None, Some(e.0.clone())),
    };
    let (job, local_job) = match state.update().phase().job() {
        Some(j) if j.is_local() => (None, Some(j)),
        j => (j, None),
    };
    let consent = store.load_consent().ok().flatten();
    let unreadable_kept = Some(store.path(UNREADABLE_FILE)).filter(|p| p.exists());
    if as_json {
        let v = json!({
            "booted": booted,
            "next": next,
            "trial": trial,
            "phase": state.update().phase().name(),
            "action": job.map(|j| json!({
                "id": j.action_id,
                "target_slot": j.target.to_string(),
                "version": j.version,
                "artifact": j.artifact.filename,
                "download_only": j.download_only,
                "may_activate": j.may_activate,
            })),
            "last_result": state.update().last_result().map(|r| json!({
                "action_id": r.action_id,
                // A download is a success in the documented set of results.
                "result": match r.result {
                    ResultKind::Downloaded => "success",
                    _ => result_name(&r.result),
                },
                "message": r.message,
            })),
            "local_install": local_job.and_then(|j| j.local.as_ref().map(|o| json!({
                "source": o.source,
                "started_at": o.started_at,
                "target_slot": j.target.to_string(),
                "phase": state.update().phase().name(),
            }))),
            "last_local": state.update().last_local().map(|r| json!({
                "source": r.origin.source,
                "started_at": r.origin.started_at,
                "target_slot": r.target.to_string(),
                "result": result_name(&r.result),
                "message": r.message,
            })),
            "downloaded": state.update().downloaded().map(|d| json!({
                "action_id": d.action_id,
                "slot": d.slot.to_string(),
                "version": d.version,
            })),
            "feedback_owed": state.outbox().len(),
            "pending_consent": state.update().pending_consent().map(|p| &p.action_id),
            "pending_consent_reason": state.update().pending_consent().map(|p| p.reason.name()),
            "pending_consent_details": state.update().pending_consent().map(|p| &p.what),
            "consent_decision": consent.map(|d| json!({"action_id": d.action_id, "accept": d.accept})),
            "state_dir": cfg.agent.state_dir,
            "boot_error": boot_error,
            "state_error": state_error,
            "unreadable_state_kept": unreadable_kept,
        });
        println!("{v}");
    } else {
        let dash = || "-".to_string();
        println!("booted slot:    {}", booted.clone().unwrap_or_else(dash));
        println!(
            "next boot:      {}{}",
            next.unwrap_or_else(dash),
            match trial {
                Some(true) => " (on trial)",
                Some(false) => " (confirmed)",
                None => "",
            }
        );
        match &state.update().phase() {
            Phase::Idle => println!("pending action: none"),
            p if local_job.is_some() => {
                let j = local_job.expect("checked");
                let origin = j.local.as_ref().expect("a local job has its origin");
                let note = match p {
                    Phase::AwaitingReboot(_) => ", waiting for the reboot",
                    _ => "",
                };
                println!("pending action: none");
                println!(
                    "local install:  {} ({}{note}) into slot {}, started {}",
                    origin.source,
                    p.name(),
                    j.target,
                    crate::local_install::utc_time(origin.started_at)
                );
            }
            p => {
                let j = p.job().expect("non-idle phase has a job");
                let note = match p {
                    Phase::Installed(j) if !j.may_activate => {
                        ", waiting for the maintenance window"
                    }
                    Phase::Installed(_) => ", ready to activate",
                    Phase::AwaitingReboot(_) => ", waiting for the reboot",
                    _ if j.download_only => ", download only",
                    _ => "",
                };
                println!(
                    "pending action: {} ({}{note}), version {} into slot {}",
                    j.action_id,
                    p.name(),
                    j.version,
                    j.target
                );
            }
        }
        match state.update().last_result() {
            Some(r) => println!(
                "last result:    action {} {}: {}",
                r.action_id,
                result_name(&r.result),
                r.message
            ),
            None => println!("last result:    none"),
        }
        if let Some(r) = state.update().last_local() {
            println!(
                "last local:     {} into slot {} (started {}) {}: {}",
                r.origin.source,
                r.target,
                crate::local_install::utc_time(r.origin.started_at),
                result_name(&r.result),
                r.message
            );
        }
        if let Some(d) = state.update().downloaded() {
            println!(
                "downloaded:     version {} in slot {} (action {}), activated when an action \
                 of the same artifact allows it",
                d.version, d.slot, d.action_id
            );
        }
        println!("feedback owed:  {}", state.outbox().len());
        if let Some(p) = state.update().pending_consent() {
            println!(
                "consent:        action {} waits for `ddi-agent consent accept|deny`: {}",
                p.action_id,
                p.reason.describe()
            );
            if !p.what.is_empty() {
                println!("                {}", p.what);
            }
        }
        if let Some(e) = boot_error {
            println!("bootloader:     {e}");
        }
        if let Some(e) = state_error {
            println!("state:          {e}");
        }
        if let Some(path) = &unreadable_kept {
            println!(
                "state:          an unreadable state file was kept as {}",
                path.display()
            );
        }
    }
    exit::OK
}

/// `install --check SOURCE`: the dry run of [`crate::local_install::check`] against the slot
/// an install would write (the one not booted). Exit 0 = installable, 1 = refused.
async fn check_source(cfg: &Config, source: &str) -> u8 {
    use crate::local_install::{self, CheckRequest, Source};
    let source = Source::parse(source);
    let target = match BootCtl::open(cfg).and_then(|b| b.booted()) {
        Ok(booted) => booted.other(),
        Err(e) => {
            eprintln!("ddi-agent: cannot tell the booted slot: {}", e.0);
            return exit::INCOMPLETE;
        }
    };
    let slot_path = match target {
        bootctl::Slot::A => cfg.slot_a.clone(),
        bootctl::Slot::B => cfg.slot_b.clone(),
    };
    let slot_capacity = match local_install::slot_capacity(&slot_path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ddi-agent: slot {}: {e}", slot_path.display());
            return exit::INCOMPLETE;
        }
    };
    let client = match DdiClient::new(&cfg.server) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ddi-agent: {e}");
            return exit::CONFIG;
        }
    };
    let auth_header = match &source {
        Source::Url(url) => client.auth_header_for(url),
        Source::File(_) => None,
    };
    let req = CheckRequest {
        source: source.clone(),
        auth_header,
        slot_path,
        slot_capacity,
        bundle: cfg.bundle.for_install(),
        max_rate: cfg.agent.max_download_rate,
        retry: crate::install::RetryPolicy::default(),
        stall_timeout: crate::install::InstallOptions::default().stall_timeout,
        progress_interval: Duration::from_secs(5),
    };
    let mut progress = |p: crate::install::Progress| {
        if let crate::install::Progress::Downloading { done, total } = p {
            info!(done, total, "checking");
        }
    };
    match local_install::check(client.http(), &req, &mut progress).await {
        Ok(image) => {
            println!(
                "{source}: installable into slot {target}: image of {} bytes, sha256 {}",
                image.bytes_written, image.sha256_of_slot_image
            );
            exit::OK
        }
        Err(e) => {
            eprintln!("ddi-agent: {source}: not installable: {e}");
            exit::UPDATE_FAILED
        }
    }
}

fn result_name(r: &ResultKind) -> &'static str {
    match r {
        ResultKind::Success => "success",
        ResultKind::Failure => "failure",
        ResultKind::Canceled => "canceled",
        ResultKind::Abandoned => "abandoned",
        ResultKind::Downloaded => "downloaded",
    }
}

/// `consent accept|deny`: records the answer for the action waiting for consent.
fn consent(cfg: &Config, accept: bool) -> u8 {
    let store = Store::at(&cfg.agent.state_dir);
    let state = match store.load() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ddi-agent: {e}");
            return exit::INCOMPLETE;
        }
    };
    let Some(action_id) = state
        .update()
        .pending_consent()
        .map(|p| p.action_id.clone())
    else {
        eprintln!("ddi-agent: no action is waiting for consent");
        return exit::UPDATE_FAILED;
    };
    let decision = ConsentDecision {
        action_id: action_id.clone(),
        accept,
    };
    if let Err(e) = store.save_consent(&decision) {
        eprintln!("ddi-agent: {e}");
        return exit::INCOMPLETE;
    }
    println!(
        "action {action_id}: consent {}; sent to the server at the next poll",
        if accept { "accepted" } else { "denied" }
    );
    exit::OK
}

#[cfg(test)]
mod poll_interval_tests {
    use super::*;

    #[test]
    fn the_servers_sleep_is_kept_above_the_floor() {
        for secs in [5, 6, 300, 86_400] {
            let d = Duration::from_secs(secs);
            assert_eq!(poll_interval(d, 0.0), d);
            assert_eq!(poll_interval(d, 1.0), d);
        }
    }

    /// Review: an ISO-8601 `sleep` parses up to 10^9 s (`PT277777H`, 31 years). One such
    /// answer from a broken or hostile server must not silence the device until its next
    /// reboot, long after the server is fixed.
    #[test]
    fn a_huge_sleep_is_capped() {
        let huge = crate::ddi::parse_sleep("PT277777H").unwrap();
        for jitter in [0.0, 0.5, 1.0] {
            let wait = poll_interval(huge, jitter);
            assert!(wait <= Duration::from_secs(7 * 86_400), "{wait:?}");
        }
    }

    #[test]
    fn a_tiny_sleep_is_raised_to_the_floor_with_bounded_jitter() {
        let ceiling = MIN_POLL_INTERVAL.mul_f64(1.5);
        for server in [0, 1, 999, 4_999] {
            let server = Duration::from_millis(server);
            assert_eq!(poll_interval(server, 0.0), MIN_POLL_INTERVAL);
            assert_eq!(poll_interval(server, 1.0), ceiling);
            let mid = poll_interval(server, 0.5);
            assert!(mid > MIN_POLL_INTERVAL && mid < ceiling, "{mid:?}");
            // Out-of-range jitter stays within the bounds.
            assert_eq!(poll_interval(server, -3.0), MIN_POLL_INTERVAL);
            assert_eq!(poll_interval(server, 7.0), ceiling);
        }
    }
}

#[cfg(test)]
mod log_level_tests {
    use super::*;

    #[test]
    fn levels_and_directives() {
        assert_eq!(log_level(Some("debug"), None), LevelFilter::DEBUG);
        assert_eq!(log_level(Some("TRACE"), Some("error")), LevelFilter::TRACE);
        assert_eq!(log_level(Some("off"), None), LevelFilter::OFF);
        // Directives: the most verbose level counts, for every target.
        assert_eq!(
            log_level(Some("ddi_agent=trace,hyper=info"), None),
            LevelFilter::TRACE
        );
        assert_eq!(
            log_level(Some("warn,ddi_agent=debug"), None),
            LevelFilter::DEBUG
        );
    }

    #[test]
    fn falls_back_to_rust_log_then_info() {
        assert_eq!(log_level(None, Some("warn")), LevelFilter::WARN);
        assert_eq!(
            log_level(Some("nonsense"), Some("error")),
            LevelFilter::ERROR
        );
        assert_eq!(log_level(Some(""), None), LevelFilter::INFO);
        assert_eq!(log_level(Some(" "), Some("debug")), LevelFilter::DEBUG);
        assert_eq!(log_level(None, None), LevelFilter::INFO);
    }
}
