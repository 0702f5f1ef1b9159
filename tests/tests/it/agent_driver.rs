//! The agent's driver (library) against the test server with fake bootloader, installer,
//! health checks and reboot: the order of effects (mark bad before writing, one activation,
//! persist before reboot), the install request it builds (never the booted slot, token only
//! for the server's own host), cancel after activation (`rejected`), failure paths, and a start
//! that could not read the environment holding the cycle back.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bootctl::Slot;
use ddi_agent::config::Config;
use ddi_agent::ddi::DdiClient;
use ddi_agent::driver::{
    BootError, Bootloader, Driver, DriverError, HealthChecker, Installer, Rebooter,
    UnfinishedInstall,
};
use ddi_agent::install::{InstallRequest, Progress};
use ddi_agent::machine::{InstallFailure, Phase};
use ddi_agent::persist::Store;
use ddi_sim::{ActionStatus, Assignment, ServerOptions, TestServer};

const TARGET: &str = "drv-1";
const TOKEN: &str = "driver-token";

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: String) {
        self.0.lock().unwrap().push(s);
    }
    fn take(&self) -> Vec<String> {
        std::mem::take(&mut *self.0.lock().unwrap())
    }
}

struct FakeBoot {
    booted: Slot,
    next: Slot,
    fail_mark_bad: bool,
    /// This many reads of the environment fail (then it reads again).
    unreadable_reads: Arc<AtomicU32>,
    /// The booted slot runs on a trial the agent did not start.
    trial: Arc<AtomicBool>,
    log: Log,
}

impl Bootloader for FakeBoot {
    fn booted(&self) -> Result<Slot, BootError> {
        Ok(self.booted)
    }
    fn booted_on_trial(&self) -> Result<bool, BootError> {
        Ok(self.trial.load(Ordering::SeqCst))
    }
    fn next(&self) -> Result<Slot, BootError> {
        let unreadable = self
            .unreadable_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if unreadable {
            return Err(BootError("environment locked by someone else".into()));
        }
        Ok(self.next)
    }
    fn activate(&mut self, slot: Slot) -> Result<(), BootError> {
        self.log.push(format!("activate {slot}"));
        self.next = slot;
        Ok(())
    }
    fn mark_good(&mut self) -> Result<(), BootError> {
        self.log.push("mark_good".into());
        Ok(())
    }
    fn mark_bad(&mut self, slot: Slot) -> Result<(), BootError> {
        if self.fail_mark_bad {
            return Err(BootError("environment is read-only".into()));
        }
        self.log.push(format!("mark_bad {slot}"));
        if self.next == slot {
            self.next = slot.other();
        }
        Ok(())
    }
}

struct FakeInstaller {
    log: Log,
    requests: Arc<Mutex<Vec<InstallRequest>>>,
    fail: Option<InstallFailure>,
}

impl Installer for FakeInstaller {
    async fn install(
        &self,
        _http: &reqwest::Client,
        req: &InstallRequest,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<(), InstallFailure> {
        self.log.push(format!(
            "install {}",
            req.slot_path.file_name().unwrap().to_string_lossy()
        ));
        progress(Progress::Downloading {
            done: 10,
            total: req.size,
        });
        self.requests.lock().unwrap().push(req.clone());
        match &self.fail {
            Some(f) => Err(f.clone()),
            None => Ok(()),
        }
    }
}

struct FakeHealth(Result<(), String>, Log);

impl HealthChecker for FakeHealth {
    async fn check(&self) -> Result<(), String> {
        self.1.push("health".into());
        self.0.clone()
    }
}

struct FakeReboot(Log);

impl Rebooter for FakeReboot {
    fn reboot(&self) -> Result<(), String> {
        self.0.push("reboot".into());
        Ok(())
    }
}

struct Setup {
    server: TestServer,
    dir: tempfile::TempDir,
    log: Log,
    requests: Arc<Mutex<Vec<InstallRequest>>>,
    unreadable_reads: Arc<AtomicU32>,
    trial: Arc<AtomicBool>,
}

impl Setup {
    fn new(opts: ServerOptions) -> Setup {
        let server = TestServer::start(opts);
        server.create_target(TARGET, Some(TOKEN)).unwrap();
        Setup {
            server,
            dir: tempfile::tempdir().unwrap(),
            log: Log::default(),
            requests: Arc::default(),
            unreadable_reads: Arc::default(),
            trial: Arc::default(),
        }
    }

    fn config(&self, agent_extra: &str) -> Config {
        let text = format!(
            "[server]\nurl = \"{}\"\ntenant = \"DEFAULT\"\ncontroller_id = \"{TARGET}\"\n\
             target_token = \"{TOKEN}\"\nretries = 2\n\
             [slots]\nA = \"slot-a\"\nB = \"slot-b\"\n\
             [agent]\nstate_dir = \"state\"\nversion_file = \"os-release\"\n{agent_extra}",
            self.server.url()
        );
        Config::from_toml(&text, &self.dir.path().join("config.toml")).unwrap()
    }

    fn driver(
        &self,
        cfg: Config,
        booted: Slot,
        next: Slot,
        health: Result<(), String>,
        fail_install: Option<InstallFailure>,
        fail_mark_bad: bool,
    ) -> Driver<FakeBoot, FakeInstaller, FakeHealth, FakeReboot> {
        let mut client = DdiClient::new(&cfg.server).unwrap();
        client.set_backoff_base(Duration::from_millis(10));
        let store = Store::open(&cfg.agent.state_dir).unwrap();
        Driver::new(
            cfg,
            client,
            store,
            FakeBoot {
                booted,
                next,
                fail_mark_bad,
                unreadable_reads: self.unreadable_reads.clone(),
                trial: self.trial.clone(),
                log: self.log.clone(),
            },
            FakeInstaller {
                log: self.log.clone(),
                requests: self.requests.clone(),
                fail: fail_install,
            },
            FakeHealth(health, self.log.clone()),
            FakeReboot(self.log.clone()),
        )
        .unwrap()
    }

    fn deploy(&self, how: &Assignment) -> u64 {
        self.server
            .deploy(TARGET, "2.0", "os.img", vec![7u8; 4096], how)
            .unwrap()
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

fn persisted_phase(dir: &Path) -> Phase {
    Store::at(dir).load().unwrap().update.phase
}

#[tokio::test]
async fn effects_happen_in_crash_safe_order_and_confirm_after_reboot() {
    let s = Setup::new(ServerOptions::default());
    let action = s.deploy(&Assignment::forced());
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    d.startup().await.unwrap();
    let report = d.cycle().await.unwrap();
    assert!(report.rebooting);
    assert_eq!(
        s.log.take(),
        ["mark_bad B", "install slot-b", "activate B", "reboot"]
    );
    assert!(
        matches!(persisted_phase(&s.state_dir()), Phase::AwaitingReboot(ref j) if j.target == Slot::B)
    );

    let req = s.requests.lock().unwrap()[0].clone();
    assert_eq!(req.slot_path, s.dir.path().join("slot-b"));
    assert_eq!(req.booted_slot_path, Some(s.dir.path().join("slot-a")));
    assert_eq!(req.size, Some(4096));
    assert!(req.expected.sha256.is_some());
    let (name, value) = req.auth_header.expect("same host gets the token");
    assert_eq!(name.to_ascii_lowercase(), "authorization");
    assert_eq!(value, format!("TargetToken {TOKEN}"));
    assert!(req.resume_path.starts_with(s.state_dir()));

    // After the reboot into B.
    let mut d = s.driver(s.config(""), Slot::B, Slot::B, Ok(()), None, false);
    let report = d.startup().await.unwrap();
    assert!(!report.rebooting);
    assert_eq!(s.log.take(), ["health", "mark_good"]);
    assert_eq!(
        s.server.action(action).unwrap().status,
        ActionStatus::Finished
    );
    assert_eq!(persisted_phase(&s.state_dir()), Phase::Idle);
}

#[tokio::test]
async fn cancel_after_activation_is_rejected() {
    let s = Setup::new(ServerOptions::default());
    let action = s.deploy(&Assignment::forced());
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    assert!(d.cycle().await.unwrap().rebooting);
    s.server.cancel(action).unwrap();
    // The reboot did not happen yet; the next cycle sees the cancel.
    d.cycle().await.unwrap();
    let fb = s.server.feedback(action);
    let last = fb.last().unwrap();
    assert_eq!(last.execution(), Some("rejected"), "{fb:?}");
    assert!(s.server.action(action).unwrap().active);
    assert_ne!(
        s.server.action(action).unwrap().status,
        ActionStatus::Canceling
    );
    assert!(matches!(
        persisted_phase(&s.state_dir()),
        Phase::AwaitingReboot(_)
    ));
}

#[tokio::test]
async fn failing_mark_bad_prevents_any_write() {
    let s = Setup::new(ServerOptions::default());
    s.deploy(&Assignment::forced());
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, true);
    let err = d.cycle().await.unwrap_err();
    assert!(err.to_string().contains("read-only"), "{err}");
    assert!(s.log.take().iter().all(|e| !e.starts_with("install")));
    assert_eq!(persisted_phase(&s.state_dir()), Phase::Idle);
}

#[tokio::test]
async fn permanent_install_failure_is_reported_and_nothing_activated() {
    let s = Setup::new(ServerOptions::default());
    let action = s.deploy(&Assignment::forced());
    let failure = InstallFailure {
        message: "image of 9 MiB does not fit slot B (4 MiB)".into(),
        retryable: false,
    };
    let mut d = s.driver(s.config(""), Slot::B, Slot::B, Ok(()), Some(failure), false);
    let report = d.cycle().await.unwrap();
    assert!(report.failure_reported);
    assert_eq!(s.log.take(), ["mark_bad A", "install slot-a"]);
    let fb = s.server.feedback(action);
    let closed = fb.iter().find(|f| f.execution() == Some("closed")).unwrap();
    assert_eq!(closed.finished(), Some("failure"));
    assert!(closed.details().join(" ").contains("does not fit"));
}

#[tokio::test]
async fn transient_install_failure_is_retried_on_the_next_cycle() {
    let s = Setup::new(ServerOptions::default());
    let action = s.deploy(&Assignment::forced());
    let failure = InstallFailure {
        message: "connection reset".into(),
        retryable: true,
    };
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), Some(failure), false);
    // A normal outcome, not an error: the install goes on at the next poll.
    let report = d.cycle().await.unwrap();
    assert!(!report.rebooting && !report.failure_reported);
    // A transient failure: `run` retries after the failed-cycle backoff, not the poll interval.
    assert_eq!(
        report.unfinished_install,
        Some(UnfinishedInstall {
            action_id: action.to_string(),
            transient_failure: true,
        })
    );
    assert!(matches!(
        persisted_phase(&s.state_dir()),
        Phase::Installing(_)
    ));
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    assert!(d.cycle().await.unwrap().rebooting);
    assert_eq!(
        s.log.take(),
        [
            "mark_bad B",
            "install slot-b",
            "mark_bad B",
            "install slot-b",
            "activate B",
            "reboot"
        ]
    );
    assert!(s.server.action(action).unwrap().active);
}

#[tokio::test]
async fn an_install_waiting_for_the_bootloader_is_not_a_transient_failure() {
    let s = Setup::new(ServerOptions::default());
    let action = s.deploy(&Assignment::forced());
    let failure = InstallFailure {
        message: "connection reset".into(),
        retryable: true,
    };
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), Some(failure), false);
    assert!(d.cycle().await.unwrap().unfinished_install.is_some());
    s.log.take();
    // Someone else's trial of the booted slot: nothing is written, `run` waits the poll interval.
    s.trial.store(true, Ordering::SeqCst);
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    let report = d.cycle().await.unwrap();
    assert_eq!(
        report.unfinished_install,
        Some(UnfinishedInstall {
            action_id: action.to_string(),
            transient_failure: false,
        })
    );
    assert!(s.log.take().is_empty());
}

#[tokio::test]
async fn token_goes_to_other_hosts_only_when_configured() {
    let mut opts = ServerOptions::default();
    opts.config.download_link_host = Some("localhost".into());
    let s = Setup::new(opts);
    s.deploy(&Assignment::forced());
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    d.cycle().await.unwrap();
    let req = s.requests.lock().unwrap().pop().unwrap();
    assert!(req.url.contains("//localhost:"), "{}", req.url);
    assert_eq!(req.auth_header, None);

    let s = Setup::new({
        let mut o = ServerOptions::default();
        o.config.download_link_host = Some("localhost".into());
        o
    });
    s.deploy(&Assignment::forced());
    let mut d = s.driver(
        s.config("send_token_to_other_hosts = true\n"),
        Slot::A,
        Slot::A,
        Ok(()),
        None,
        false,
    );
    d.cycle().await.unwrap();
    let req = s.requests.lock().unwrap().pop().unwrap();
    assert!(req.auth_header.is_some());
}

#[tokio::test]
async fn failed_health_check_marks_bad_and_reboots_back() {
    let s = Setup::new(ServerOptions::default());
    let action = s.deploy(&Assignment::forced());
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    d.cycle().await.unwrap();
    s.log.take();
    let mut d = s.driver(
        s.config(""),
        Slot::B,
        Slot::B,
        Err("health check `app --selftest` exited with status 3; output: db corrupt".into()),
        None,
        false,
    );
    let report = d.startup().await.unwrap();
    assert!(report.rebooting);
    assert!(report.failure_reported);
    assert_eq!(s.log.take(), ["health", "mark_bad B", "reboot"]);
    let fb = s.server.feedback(action);
    let closed = fb.iter().find(|f| f.execution() == Some("closed")).unwrap();
    assert_eq!(closed.finished(), Some("failure"));
    assert!(closed.details().join("\n").contains("db corrupt"));
}

#[tokio::test]
async fn conditional_poll_reuses_the_previous_answer() {
    let s = Setup::new(ServerOptions::default());
    let action = s.deploy(&Assignment::forced());
    let cfg = s.config("");
    let mut client = DdiClient::new(&cfg.server).unwrap();
    let first = client.poll().await.unwrap();
    // Same body again: answered 304 by the server, served from the cache here.
    let second = client.poll().await.unwrap();
    assert_eq!(first, second);
    assert_eq!(
        second.deployment.unwrap().action_id(),
        Some(action.to_string())
    );
    // A change on the server shows through.
    s.server.cancel(action).unwrap();
    let third = client.poll().await.unwrap();
    assert!(third.deployment.is_none());
    assert!(third.cancel.is_some());
}

#[tokio::test]
async fn a_start_that_could_not_read_the_environment_holds_the_cycle_back() {
    let s = Setup::new(ServerOptions::default());
    let action = s.deploy(&Assignment::forced());
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    s.unreadable_reads.store(1, Ordering::SeqCst);
    let e = d.startup().await.unwrap_err();
    assert!(matches!(e, DriverError::BootEnv(_)), "{e}");
    // Readable again, but the post-reboot step has not run: the cycle decides nothing.
    let e = d.cycle().await.unwrap_err();
    assert!(
        matches!(e, DriverError::BootEnv(_)) && e.to_string().contains("locked"),
        "{e}"
    );
    assert!(s.log.take().is_empty());
    assert!(s.server.feedback(action).is_empty());
    // A start that reads the environment lets the cycle go on.
    d.startup().await.unwrap();
    assert!(d.cycle().await.unwrap().rebooting);
    assert!(s.log.take().contains(&"activate B".to_string()));
}
