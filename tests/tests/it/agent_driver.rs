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
use ddi_agent::clock::{Clock, SystemClock};
use ddi_agent::config::Config;
use ddi_agent::ddi::DdiClient;
use ddi_agent::driver::{
    BootError, Bootloader, Driver, DriverError, HealthChecker, Installer, Pipeline, Rebooter,
    UnfinishedInstall,
};
use ddi_agent::install::{InstallRequest, Progress};
use ddi_agent::machine::{InstallFailure, Phase, SlotImage};
use ddi_agent::persist::Store;
use ddi_sim::{
    ActionStatus, Assignment, Endpoint, Fault, FaultKind, HawkbitVersion, ServerOptions, TestServer,
};

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
    ) -> Result<SlotImage, InstallFailure> {
        self.log.push(format!("install {}", slot_name(req)));
        progress(Progress::Downloading {
            done: 10,
            total: req.size,
        });
        self.requests.lock().unwrap().push(req.clone());
        match &self.fail {
            Some(f) => Err(f.clone()),
            None => Ok(SlotImage {
                bytes: req.size.unwrap_or(0),
                sha256: req.expected.sha256.clone().unwrap_or_default(),
                policy: 0,
            }),
        }
    }

    async fn verify(
        &self,
        req: &InstallRequest,
        image: &SlotImage,
    ) -> Result<SlotImage, InstallFailure> {
        self.log.push(format!("verify {}", slot_name(req)));
        Ok(image.clone())
    }
}

fn slot_name(req: &InstallRequest) -> String {
    req.slot_path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}

/// The real download pipeline (into file slots of the test's directory), logged like the fake.
struct RealInstaller(Log);

impl Installer for RealInstaller {
    async fn install(
        &self,
        http: &reqwest::Client,
        req: &InstallRequest,
        progress: &mut (dyn FnMut(Progress) + Send),
    ) -> Result<SlotImage, InstallFailure> {
        self.0.push(format!("install {}", slot_name(req)));
        Pipeline::default().install(http, req, progress).await
    }

    async fn verify(
        &self,
        req: &InstallRequest,
        image: &SlotImage,
    ) -> Result<SlotImage, InstallFailure> {
        let result = Pipeline::default().verify(req, image).await;
        let outcome = if result.is_ok() { "ok" } else { "mismatch" };
        self.0.push(format!("verify {} {outcome}", slot_name(req)));
        result
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
    /// The device clock of the drivers made from now on (None: the system clock).
    clock: Mutex<Option<Arc<dyn Clock>>>,
    trial: Arc<AtomicBool>,
}

/// A device clock at a fixed offset from the real one, synchronised or not.
struct FakeClock {
    offset_ms: i64,
    synchronized: bool,
}

impl Clock for FakeClock {
    fn now_ms(&self) -> u64 {
        SystemClock.now_ms().saturating_add_signed(self.offset_ms)
    }
    fn synchronized(&self) -> bool {
        self.synchronized
    }
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
            clock: Mutex::default(),
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
        let installer = FakeInstaller {
            log: self.log.clone(),
            requests: self.requests.clone(),
            fail: fail_install,
        };
        self.driver_with(cfg, (booted, next), installer, health, fail_mark_bad)
    }

    /// A driver with the real install pipeline; both slots are files of `slot_size` bytes.
    fn real_driver(
        &self,
        booted: Slot,
        slot_size: usize,
    ) -> Driver<FakeBoot, RealInstaller, FakeHealth, FakeReboot> {
        for slot in ["slot-a", "slot-b"] {
            let path = self.dir.path().join(slot);
            if !path.exists() {
                std::fs::write(path, vec![0u8; slot_size]).unwrap();
            }
        }
        let installer = RealInstaller(self.log.clone());
        self.driver_with(self.config(""), (booted, booted), installer, Ok(()), false)
    }

    fn driver_with<I: Installer>(
        &self,
        cfg: Config,
        (booted, next): (Slot, Slot),
        installer: I,
        health: Result<(), String>,
        fail_mark_bad: bool,
    ) -> Driver<FakeBoot, I, FakeHealth, FakeReboot> {
        let mut client = DdiClient::new(&cfg.server).unwrap();
        client.set_backoff_base(Duration::from_millis(10));
        if let Some(clock) = self.clock.lock().unwrap().clone() {
            client.set_clock(clock);
        }
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
            installer,
            FakeHealth(health, self.log.clone()),
            FakeReboot(self.log.clone()),
        )
        .unwrap()
    }

    /// A forced update to `version` with this image.
    fn deploy_image(&self, version: &str, image: Vec<u8>) -> u64 {
        self.deploy_image_as(version, image, &Assignment::forced())
    }

    fn deploy_image_as(&self, version: &str, image: Vec<u8>, how: &Assignment) -> u64 {
        self.server
            .deploy(TARGET, version, "os.img", image, how)
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
    Store::at(dir).load().unwrap().update().phase().clone()
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

/// `send_token_to_other_hosts` is for the links the server's JSON names (a CDN it points to),
/// not for a URL typed into `ddi-agent install`: that gets the token only on the server's own
/// origin, as `install --check` does (docs/interface.md).
#[tokio::test]
async fn a_local_install_url_on_another_host_never_gets_the_token() {
    let s = Setup::new(ServerOptions::default());
    let cfg = s.config("send_token_to_other_hosts = true\n");
    let mut d = s.driver(cfg, Slot::A, Slot::A, Ok(()), None, false);
    let origin = ddi_agent::machine::LocalOrigin {
        source: "https://mirror.invalid/update.ddib".into(),
        started_at: 1,
    };
    d.local_install(origin, false).await.unwrap();
    let req = s
        .requests
        .lock()
        .unwrap()
        .pop()
        .expect("the local install ran");
    assert_eq!(req.url, "https://mirror.invalid/update.ddib");
    assert_eq!(
        req.auth_header, None,
        "the device's token went to another host"
    );
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

/// A feedback refused for good at the head of the outbox (here the cancel channel's
/// `rejected`) is dropped so the closing feedback after the reboot still reaches the server.
async fn refused_rejected_does_not_block_the_final_feedback(
    opts: ServerOptions,
    refuse: impl Fn(&TestServer),
) {
    let s = Setup::new(opts);
    let action = s.deploy(&Assignment::forced());
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    assert!(d.cycle().await.unwrap().rebooting);
    s.server.cancel(action).unwrap();
    refuse(&s.server);
    // The cancel comes after the activation: answered `rejected`, which the server refuses.
    d.cycle().await.unwrap();
    assert!(d.state().outbox().is_empty(), "{:?}", d.state().outbox());
    // After the reboot into B the update is confirmed and closed.
    let mut d = s.driver(s.config(""), Slot::B, Slot::B, Ok(()), None, false);
    d.startup().await.unwrap();
    assert_eq!(
        s.server.action(action).unwrap().status,
        ActionStatus::Finished,
        "{:?}",
        s.server.feedback(action)
    );
}

#[tokio::test]
async fn status_quota_refusal_never_blocks_the_outbox() {
    // 403 up to 0.9.x, 429 since 0.10.0. A download-only action's `downloaded` counts toward
    // the quota (only closing statuses do not): refused, it must not stay owed for ever.
    for version in ["0.9.0", "0.10.0", "1.1.0"] {
        let s = Setup::new(ServerOptions::default().version(version.parse().unwrap()));
        let action = s.deploy(&Assignment::download_only());
        s.server.configure(|c| c.max_status_entries_per_action = 1);
        let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
        let report = d.cycle().await;
        assert!(report.is_ok(), "{version}: {report:?}");
        assert!(
            d.state().outbox().is_empty(),
            "{version}: {:?}",
            d.state().outbox()
        );
        assert!(
            s.server
                .feedback(action)
                .iter()
                .all(|f| f.execution() != Some("downloaded")),
            "{version}: the quota was not hit"
        );
    }
}

#[tokio::test]
async fn permanent_4xx_at_the_head_of_the_outbox_is_dropped() {
    refused_rejected_does_not_block_the_final_feedback(ServerOptions::default(), |server| {
        server.add_fault(
            Fault::new(FaultKind::Status {
                code: 400,
                retry_after_secs: None,
            })
            .on(Endpoint::CancelFeedback),
        );
    })
    .await;
}

#[tokio::test]
async fn unparseable_sleep_keeps_the_last_good_interval() {
    let s = Setup::new(ServerOptions::default().polling(Duration::from_secs(42)));
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    assert_eq!(
        d.cycle().await.unwrap().sleep,
        Some(Duration::from_secs(42))
    );
    s.server.add_fault(
        Fault::new(FaultKind::SetJson {
            pointer: "/config/polling/sleep".into(),
            value: "soon".into(),
        })
        .on(Endpoint::Poll),
    );
    s.deploy(&Assignment::forced());
    // The rest of the answer is used: the deployment goes ahead.
    let report = d.cycle().await.unwrap();
    assert_eq!(report.sleep, Some(Duration::from_secs(42)));
    assert!(report.rebooting);
}

const RESUME_IMAGE: usize = 256 * 1024;

/// The first download stalls slowly and drops after 64 KiB, so the agent resumes with a Range.
fn slow_then_drop(server: &TestServer) {
    server.add_fault(
        Fault::new(FaultKind::Slow {
            bytes_per_sec: 64 * 1024,
        })
        .once(),
    );
    server.add_fault(Fault::new(FaultKind::DropAfter { bytes: 64 * 1024 }).once());
}

#[tokio::test]
async fn resume_answered_416_restarts_from_byte_zero_once() {
    let s = Setup::new(ServerOptions::default());
    let image: Vec<u8> = (0..RESUME_IMAGE).map(|i| (i * 7 % 251) as u8).collect();
    let action = s.deploy_image("2.0", image.clone());
    slow_then_drop(&s.server);
    let server = s.server.shared().clone();
    let refuse_resume = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut fault = Fault::new(FaultKind::Status {
            code: 416,
            retry_after_secs: None,
        })
        .on(Endpoint::Download)
        .once();
        fault.id = 1000;
        server.update(|st| st.faults.push(fault));
    });
    let mut d = s.real_driver(Slot::A, RESUME_IMAGE);
    let report = d.cycle().await.unwrap();
    refuse_resume.await.unwrap();
    assert!(report.rebooting, "{:?}", s.server.feedback(action));
    let slot_b = std::fs::read(s.dir.path().join("slot-b")).unwrap();
    assert_eq!(&slot_b[..RESUME_IMAGE], &image[..]);
}

#[tokio::test]
async fn cancel_during_a_resumed_download_is_a_cancel_not_a_failure() {
    // Since 1.1.0 a CANCELING action's artifacts are 404 for Range requests too.
    let s = Setup::new(ServerOptions::default().version(HawkbitVersion::HEAD));
    let action = s.deploy_image("2.0", vec![5u8; RESUME_IMAGE]);
    slow_then_drop(&s.server);
    let server = s.server.shared().clone();
    let cancel = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.update(|st| st.cancel(action, false, 0)).unwrap();
    });
    let mut d = s.real_driver(Slot::A, RESUME_IMAGE);
    let report = d.cycle().await.unwrap();
    cancel.await.unwrap();
    assert!(!report.rebooting && !report.failure_reported);
    let view = s.server.action(action).unwrap();
    assert_eq!(view.status, ActionStatus::Canceled, "{:?}", view.feedback);
    assert!(view
        .feedback
        .iter()
        .all(|f| f.finished() != Some("failure")));
    assert_eq!(persisted_phase(&s.state_dir()), Phase::Idle);
}

#[tokio::test]
async fn a_device_clock_far_in_the_past_never_decides_the_installed_version() {
    // hawkBit >= 0.7.0 moves the installed version only forward in feedback time.
    let s = Setup::new(ServerOptions::default().version("0.7.0".parse().unwrap()));
    let first = s.deploy(&Assignment::forced());
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    assert!(d.cycle().await.unwrap().rebooting);
    let mut d = s.driver(s.config(""), Slot::B, Slot::B, Ok(()), None, false);
    d.startup().await.unwrap();
    assert_eq!(
        s.server.action(first).unwrap().status,
        ActionStatus::Finished
    );

    // No RTC: after the next reboot the clock reads ~3 years back (after 2020, so it looks
    // plausible) and NTP has not synchronised it yet.
    *s.clock.lock().unwrap() = Some(Arc::new(FakeClock {
        offset_ms: -3 * 365 * 86_400_000,
        synchronized: false,
    }));
    let second = s.deploy_image("3.0", vec![9u8; 4096]);
    let mut d = s.driver(s.config(""), Slot::B, Slot::B, Ok(()), None, false);
    assert!(d.cycle().await.unwrap().rebooting);
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    d.startup().await.unwrap();
    let fb = s.server.feedback(second);
    assert_eq!(
        s.server.action(second).unwrap().status,
        ActionStatus::Finished
    );
    assert!(
        fb.iter().all(|f| f.body.get("timestamp").is_none()),
        "{fb:?}"
    );
    let target = s.server.target(TARGET).unwrap();
    assert_eq!(
        target.installed_version.as_deref(),
        Some("firmware 3.0"),
        "{fb:?}"
    );
}

#[tokio::test]
async fn a_slow_download_that_fills_the_status_quota_still_finishes() {
    // The quota fills up while the throttled download runs (a small quota stands in for
    // hawkBit's 1000 over hours): progress is refused, the update is not.
    let s = Setup::new(ServerOptions::default().version("0.9.0".parse().unwrap()));
    let image = vec![3u8; RESUME_IMAGE];
    let action = s.deploy_image("2.0", image.clone());
    s.server.add_fault(
        Fault::new(FaultKind::Slow {
            bytes_per_sec: 128 * 1024,
        })
        .once(),
    );
    let server = s.server.shared().clone();
    let fill_quota = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.update(|st| st.config.max_status_entries_per_action = 1);
    });
    let mut d = s.real_driver(Slot::A, RESUME_IMAGE);
    assert!(d.cycle().await.unwrap().rebooting);
    fill_quota.await.unwrap();
    let mut d = s.real_driver(Slot::B, RESUME_IMAGE);
    d.startup().await.unwrap();
    assert_eq!(
        s.server.action(action).unwrap().status,
        ActionStatus::Finished,
        "{:?}",
        s.server.feedback(action)
    );
    assert!(d.state().outbox().is_empty());
}

/// A DOWNLOAD_ONLY action with a maintenance schedule: hawkBit shows `update: skip` and a
/// window. It is download only whatever the window says: `downloaded` is owed (retried until
/// delivered, which closes the action), and the slot is kept, not given up as abandoned.
#[tokio::test]
async fn download_only_with_a_window_closes_with_downloaded_retried_and_keeps_the_slot() {
    let s = Setup::new(ServerOptions::default());
    let window = ddi_sim::MaintenanceWindow {
        start_ms: ddi_sim::model::now_ms() + 3_600_000,
        duration_ms: 600_000,
        every_ms: None,
    };
    let action = s.deploy(&Assignment::download_only().with_maintenance(window));
    // No feedback gets through in the first cycle, `downloaded` included.
    s.server.add_fault(
        Fault::new(FaultKind::Status {
            code: 503,
            retry_after_secs: Some(0),
        })
        .on(Endpoint::DeploymentFeedback),
    );
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    let _ = d.cycle().await;
    assert_ne!(
        s.server.action(action).unwrap().status,
        ActionStatus::Downloaded
    );
    s.server.clear_faults();
    for _ in 0..3 {
        let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
        let report = d.cycle().await.unwrap();
        assert!(!report.rebooting);
    }
    let view = s.server.action(action).unwrap();
    assert_eq!(view.status, ActionStatus::Downloaded, "{:?}", view.feedback);
    assert!(!view.active);
    let log = s.log.take();
    assert_eq!(
        log,
        ["mark_bad B", "install slot-b"],
        "one download, nothing after it"
    );
    let state = Store::at(&s.state_dir()).load().unwrap();
    let kept = state
        .update()
        .downloaded()
        .cloned()
        .expect("downloaded image kept");
    assert_eq!((kept.slot, kept.action_id), (Slot::B, action.to_string()));
    assert!(state.outbox().is_empty());
}

/// A later action of the same artifact (same sha256) finds it in the slot: read back, not
/// downloaded again, and activated. A slot that no longer holds it is downloaded normally.
#[tokio::test]
async fn a_later_action_of_a_downloaded_artifact_is_read_back_not_downloaded() {
    let s = Setup::new(ServerOptions::default());
    let image: Vec<u8> = (0..64 * 1024).map(|i| (i * 13 % 251) as u8).collect();
    let first = s.deploy_image_as("2.0", image.clone(), &Assignment::download_only());
    let mut d = s.real_driver(Slot::A, 128 * 1024);
    assert!(!d.cycle().await.unwrap().rebooting);
    assert_eq!(
        s.server.action(first).unwrap().status,
        ActionStatus::Downloaded
    );
    assert_eq!(s.log.take(), ["mark_bad B", "install slot-b"]);

    // The agent restarts (a power cut, say), then the same image comes as a forced update.
    let second = s.deploy_image_as("2.0-rollout", image.clone(), &Assignment::forced());
    let mut d = s.real_driver(Slot::A, 128 * 1024);
    d.startup().await.unwrap();
    assert!(d.cycle().await.unwrap().rebooting);
    assert_eq!(
        s.log.take(),
        ["mark_bad B", "verify slot-b ok", "activate B", "reboot"]
    );
    let mut d = s.real_driver(Slot::B, 128 * 1024);
    d.startup().await.unwrap();
    assert_eq!(
        s.server.action(second).unwrap().status,
        ActionStatus::Finished
    );

    // Downloaded into A, then A overwritten before the forced update comes: downloaded again.
    let third_image: Vec<u8> = image.iter().map(|b| b ^ 0x5a).collect();
    s.deploy_image_as("3.0", third_image.clone(), &Assignment::download_only());
    let mut d = s.real_driver(Slot::B, 128 * 1024);
    d.cycle().await.unwrap();
    s.log.take();
    let slot_a = s.dir.path().join("slot-a");
    let mut bytes = std::fs::read(&slot_a).unwrap();
    bytes[1000] ^= 0xff;
    std::fs::write(&slot_a, bytes).unwrap();
    let fourth = s.deploy_image_as("3.0-rollout", third_image.clone(), &Assignment::forced());
    let mut d = s.real_driver(Slot::B, 128 * 1024);
    assert!(d.cycle().await.unwrap().rebooting);
    assert_eq!(
        s.log.take(),
        [
            "mark_bad A",
            "verify slot-a mismatch",
            "mark_bad A",
            "install slot-a",
            "activate A",
            "reboot"
        ]
    );
    assert_eq!(
        &std::fs::read(&slot_a).unwrap()[..third_image.len()],
        &third_image[..]
    );
    assert!(s.server.action(fourth).unwrap().active);
}

/// A download-only action keeps a plain image while the device has no signature policy; then
/// the device gets one (`require_signature`, a vendor key) and the same artifact comes as a
/// forced update. The kept image was never checked under this policy (the read-back only
/// proves the bytes are still the ones downloaded), so it must not be activated: downloaded
/// again, it is refused. The same holds for a revoked key or another `compatible`.
#[tokio::test]
async fn a_downloaded_image_is_not_activated_under_another_signature_policy() {
    let s = Setup::new(ServerOptions::default());
    let image: Vec<u8> = (0..64 * 1024).map(|i| (i * 13 % 251) as u8).collect();
    s.deploy_image_as("2.0", image.clone(), &Assignment::download_only());
    let mut d = s.real_driver(Slot::A, 128 * 1024);
    assert!(!d.cycle().await.unwrap().rebooting);
    assert_eq!(s.log.take(), ["mark_bad B", "install slot-b"]);

    let vendor = ddi_bundle::generate_keypair().unwrap();
    let key = s.dir.path().join("vendor.pub");
    std::fs::write(&key, vendor.public_key().to_text()).unwrap();
    let signed_only = format!(
        "[bundle]\ntrusted_keys = [{:?}]\nrequire_signature = true\n",
        key.to_str().unwrap()
    );
    let signed_driver = || {
        let installer = RealInstaller(s.log.clone());
        let cfg = s.config(&signed_only);
        s.driver_with(cfg, (Slot::A, Slot::A), installer, Ok(()), false)
    };
    let second = s.deploy_image_as("2.0-rollout", image.clone(), &Assignment::forced());
    let mut d = signed_driver();
    d.startup().await.unwrap();
    let report = d.cycle().await.unwrap();
    let log = s.log.take();
    assert!(
        !report.rebooting && !log.iter().any(|l| l.starts_with("activate")),
        "an unsigned image activated under require_signature: {log:?}"
    );
    assert_eq!(s.server.action(second).unwrap().status, ActionStatus::Error);

    // A signed bundle kept under this very policy is read back, not downloaded again.
    let bundle = ddi_tests::signing::signed_bundle(s.dir.path(), "os.raw", &image, "x", &vendor);
    s.deploy_image_as("3.0", bundle.clone(), &Assignment::download_only());
    let mut d = signed_driver();
    assert!(!d.cycle().await.unwrap().rebooting);
    assert_eq!(s.log.take(), ["mark_bad B", "install slot-b"]);
    s.deploy_image_as("3.0-rollout", bundle, &Assignment::forced());
    let mut d = signed_driver();
    assert!(d.cycle().await.unwrap().rebooting);
    assert_eq!(
        s.log.take(),
        ["mark_bad B", "verify slot-b ok", "activate B", "reboot"]
    );
}

/// A forced action with a maintenance schedule, outside its window, is `update: skip`: the
/// image is downloaded now (`downloaded` reported, the action stays open), and when the window
/// opens the same action activates it without a second download.
#[tokio::test]
async fn a_scheduled_action_downloads_first_and_activates_without_a_second_download() {
    let s = Setup::new(ServerOptions::default());
    let opens = ddi_sim::model::now_ms() + 3_000;
    let window = ddi_sim::MaintenanceWindow {
        start_ms: opens,
        duration_ms: 600_000,
        every_ms: None,
    };
    let action = s.deploy(&Assignment::forced().with_maintenance(window));
    let mut d = s.driver(s.config(""), Slot::A, Slot::A, Ok(()), None, false);
    assert!(!d.cycle().await.unwrap().rebooting);
    assert!(!d.cycle().await.unwrap().rebooting);
    let view = s.server.action(action).unwrap();
    assert!(view.active);
    let downloaded = view
        .feedback
        .iter()
        .filter(|f| f.execution() == Some("downloaded"))
        .count();
    assert_eq!(downloaded, 1, "{:?}", view.feedback);
    while ddi_sim::model::now_ms() < opens + 200 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(d.cycle().await.unwrap().rebooting);
    assert_eq!(
        s.log.take(),
        [
            "mark_bad B",
            "install slot-b",
            "mark_bad B",
            "verify slot-b",
            "activate B",
            "reboot"
        ]
    );
    let mut d = s.driver(s.config(""), Slot::B, Slot::B, Ok(()), None, false);
    d.startup().await.unwrap();
    assert_eq!(
        s.server.action(action).unwrap().status,
        ActionStatus::Finished
    );
}

/// Restarts during a slow download (a crash loop, power cuts) do not multiply its progress
/// feedback: the action's runs share one budget, counted in the state file.
#[tokio::test]
async fn restarts_during_a_slow_download_share_one_progress_budget() {
    let s = Setup::new(ServerOptions::default());
    let action = s.deploy_image("2.0", vec![4u8; RESUME_IMAGE]);
    s.server.add_fault(
        Fault::new(FaultKind::Slow {
            bytes_per_sec: 8 * 1024,
        })
        .on(Endpoint::Download),
    );
    let progress = || {
        s.server
            .feedback(action)
            .iter()
            .filter(|f| f.execution() == Some("download"))
            .count()
    };
    let mut after_run = Vec::new();
    for _ in 0..4 {
        // The agent dies 2.2 s into the download (longer than one progress interval).
        let mut d = s.real_driver(Slot::A, RESUME_IMAGE);
        let cut = tokio::time::timeout(Duration::from_millis(2200), d.cycle()).await;
        assert!(cut.is_err(), "the download finished: {cut:?}");
        drop(d);
        tokio::time::sleep(Duration::from_millis(300)).await;
        after_run.push(progress());
    }
    // The first runs each report; the fourth finds the action's budget used up.
    assert!(
        after_run[0] >= 1 && after_run[2] > after_run[1],
        "{after_run:?}"
    );
    assert_eq!(after_run[3], after_run[2], "{after_run:?}");
    assert!(matches!(
        persisted_phase(&s.state_dir()),
        Phase::Installing(ref j) if j.download_runs == 4
    ));
}
