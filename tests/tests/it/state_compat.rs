//! The persisted state across agent versions (see "State files" in `docs/interface.md`).
//!
//! Fixtures: `tests/fixtures/state/<release>/<phase>/` hold the files an agent release left in
//! `state_dir` in each phase of an update, with the server URL and the device directory
//! replaced by `{{server}}` and `{{device}}`. Each phase has a scenario that brings a fresh
//! server and device to that phase (run by the current agent), swaps the device's state files
//! for the fixture's, and drives the update to its end with the current agent: every state a
//! released agent wrote must still finish correctly.
//!
//! `write_fixtures` (run by hand at a release, see its doc) records a new set.
//!
//! Needs `cargo build --workspace --bins` first.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bootctl::scheme::Slot;
use ddi_sim::{
    ActionStatus, Assignment, Endpoint, Fault, FaultKind, MaintenanceWindow, ServerOptions,
};
use ddi_tests::device::{DeviceOptions, Image};
use ddi_tests::harness::{run_with_timeout, Background};
use ddi_tests::signing::Vendor;

const TARGET: &str = "dev-1";
const TOKEN: &str = "s3cret-target-token";
const IMAGE_SIZE: usize = 300 * 1024;
/// Files of `state_dir` that belong to the persisted state.
const STATE_FILES: [&str; 3] = ["state.json", "download.resume", "consent.json"];

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/state")
}

/// The common rig (server, device, the agent binary installed on it, which changes across an
/// update) with the state files and `closed` feedback views of this module.
struct Rig(ddi_tests::rig::Rig);

impl std::ops::Deref for Rig {
    type Target = ddi_tests::rig::Rig;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Rig {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Rig {
    fn new(agent: &Path, change: impl FnOnce(&mut DeviceOptions)) -> Rig {
        let opts = ServerOptions::default().polling(Duration::from_secs(1));
        let mut rig = ddi_tests::rig::Rig::start(opts, TARGET, TOKEN, change);
        rig.agent = agent.to_path_buf();
        Rig(rig)
    }

    /// (finished, details) of every `closed` feedback the server accepted for the action.
    fn closed(&self, action: u64) -> Vec<(String, String)> {
        self.server
            .feedback(action)
            .iter()
            .filter(|f| f.execution() == Some("closed"))
            .map(|f| {
                (
                    f.finished().unwrap_or_default().to_string(),
                    f.details().join("\n"),
                )
            })
            .collect()
    }

    fn assert_closed_once(&self, action: u64, finished: &str) -> String {
        let closed = self.closed(action);
        assert_eq!(closed.len(), 1, "action {action}: {closed:?}");
        assert_eq!(closed[0].0, finished, "action {action}: {closed:?}");
        closed[0].1.clone()
    }

    /// The state files in `state_dir`, machine-specific parts replaced by placeholders.
    fn capture(&self) -> Vec<(String, String)> {
        let dir = self.dev.state_dir();
        STATE_FILES
            .iter()
            .filter_map(|name| {
                let text = fs::read_to_string(dir.join(name)).ok()?;
                let text = text
                    .replace(&self.server.url(), "{{server}}")
                    .replace(&self.dev.dir().to_string_lossy().into_owned(), "{{device}}");
                Some((name.to_string(), text))
            })
            .collect()
    }

    /// Replaces the device's state files with a fixture's.
    fn restore(&self, files: &[(String, String)]) {
        let dir = self.dev.state_dir();
        for name in STATE_FILES {
            let _ = fs::remove_file(dir.join(name));
        }
        for (name, text) in files {
            let text = text
                .replace("{{server}}", &self.server.url())
                .replace("{{device}}", &self.dev.dir().to_string_lossy());
            fs::write(dir.join(name), text).unwrap();
        }
    }
}

/// The phases a fixture set covers. `setup` brings a fresh rig to the phase with the rig's
/// agent, `finish` drives it to the end with the current agent.
#[derive(Debug, Clone, Copy)]
enum Phase {
    /// After a completed update: last result and finished actions remembered.
    Idle,
    /// Killed in the middle of a download, with a resume record.
    Installing,
    /// Written, waiting for the maintenance window.
    Installed,
    /// Activated, the reboot not yet done.
    AwaitingReboot,
    /// Rebooted into the new slot, not yet confirmed.
    AwaitingConfirmation,
    /// Confirmed, the `closed`/`success` still owed to the server.
    FeedbackOwed,
    /// Manual consent: the action waits for `ddi-agent consent`.
    ConsentPending,
}

const PHASES: [Phase; 7] = [
    Phase::Idle,
    Phase::Installing,
    Phase::Installed,
    Phase::AwaitingReboot,
    Phase::AwaitingConfirmation,
    Phase::FeedbackOwed,
    Phase::ConsentPending,
];

/// Slots and image size of the `installing` phase: a resume record is written at 16 MiB
/// checkpoints, so the image must be bigger than that.
const BIG_SLOT: u64 = 24 << 20;
const BIG_IMAGE: usize = 20 << 20;

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Installing => "installing",
            Phase::Installed => "installed",
            Phase::AwaitingReboot => "awaiting_reboot",
            Phase::AwaitingConfirmation => "awaiting_confirmation",
            Phase::FeedbackOwed => "feedback_owed",
            Phase::ConsentPending => "consent_pending",
        }
    }

    fn rig(self, agent: &Path) -> Rig {
        Rig::new(agent, |o| match self {
            Phase::Installing => o.slot_size = BIG_SLOT,
            Phase::ConsentPending => o.agent_extra = "consent = \"manual\"\n".into(),
            _ => {}
        })
    }

    /// Brings `rig` to this phase; returns the open action (for `Idle`: the finished one).
    fn setup(self, rig: &Rig) -> u64 {
        match self {
            Phase::Idle => {
                let action = rig.deploy(&Image::good("2.0", IMAGE_SIZE), &Assignment::forced());
                rig.once_expect(0);
                assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
                assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
                rig.once_expect(0);
                rig.assert_closed_once(action, "success");
                action
            }
            Phase::Installing => {
                rig.server.add_fault(
                    Fault::new(FaultKind::Slow {
                        bytes_per_sec: 8 << 20,
                    })
                    .on(Endpoint::Download),
                );
                let action = rig.deploy(&Image::good("2.0", BIG_IMAGE), &Assignment::forced());
                let agent = Background::spawn(rig.command(&["once"])).unwrap();
                let record = rig.dev.state_dir().join("download.resume");
                let written = ddi_tests::harness::wait_until(
                    Duration::from_secs(60),
                    Duration::from_millis(20),
                    || record.is_file(),
                );
                let out = agent.stop().unwrap();
                assert!(written, "no resume record was written:\n{}", out.describe());
                rig.server.clear_faults();
                action
            }
            Phase::Installed => {
                let mut how = Assignment::forced();
                how.maintenance = Some(MaintenanceWindow {
                    start_ms: ddi_sim::model::now_ms() + 3_000,
                    duration_ms: 600_000,
                    every_ms: None,
                });
                let action = rig.deploy(&Image::good("2.0", IMAGE_SIZE), &how);
                rig.once_expect(0);
                assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
                action
            }
            Phase::AwaitingReboot | Phase::AwaitingConfirmation => {
                let action = rig.deploy(&Image::good("2.0", IMAGE_SIZE), &Assignment::forced());
                rig.once_expect(0);
                assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
                if matches!(self, Phase::AwaitingConfirmation) {
                    assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
                }
                action
            }
            Phase::FeedbackOwed => {
                let action = rig.deploy(&Image::good("2.0", IMAGE_SIZE), &Assignment::forced());
                rig.once_expect(0);
                assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
                assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
                rig.server.add_fault(
                    Fault::new(FaultKind::Status {
                        code: 503,
                        retry_after_secs: Some(0),
                    })
                    .on(Endpoint::DeploymentFeedback),
                );
                rig.once_expect(2);
                assert!(rig.closed(action).is_empty());
                rig.server.clear_faults();
                action
            }
            Phase::ConsentPending => {
                let mut how = Assignment::forced();
                how.confirmation_required = true;
                let action = rig.deploy(&Image::good("2.0", IMAGE_SIZE), &how);
                rig.once_expect(0);
                assert_eq!(
                    rig.server.action(action).unwrap().status,
                    ActionStatus::WaitForConfirmation
                );
                action
            }
        }
    }

    /// Drives the rig from this phase to the end of the update with the rig's agent.
    fn finish(self, rig: &Rig, action: u64) {
        let image = |size| Image::good("2.0", size);
        match self {
            Phase::Idle => {
                // The finished action stays finished; the next one goes all the way.
                let next = rig.deploy(&Image::good("3.0", IMAGE_SIZE), &Assignment::forced());
                rig.once_expect(0);
                assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
                assert_eq!(rig.dev.reboot().unwrap(), Slot::A);
                rig.once_expect(0);
                rig.assert_closed_once(action, "success");
                rig.assert_closed_once(next, "success");
                assert_eq!(rig.env("upgrade_available").as_deref(), Some("0"));
                return;
            }
            Phase::Installing => {
                let out = rig.once_expect(0);
                let log = format!("{}{}", out.stdout, out.stderr);
                assert!(log.contains("resuming download"), "{}", out.describe());
                assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
                assert!(rig
                    .dev
                    .slot_holds(Slot::B, &image(BIG_IMAGE).bytes)
                    .unwrap());
                assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
                rig.once_expect(0);
            }
            Phase::Installed => {
                let opens = rig.server.action(action).unwrap();
                assert!(opens.active);
                let out = rig.once_expect(0);
                if rig.dev.take_reboot_requests().unwrap() == 0 {
                    // Still before the window: wait for it.
                    assert_eq!(rig.env("bootctl_slot").as_deref(), Some("A"));
                    std::thread::sleep(Duration::from_secs(3));
                    rig.once_expect(0);
                    assert_eq!(
                        rig.dev.take_reboot_requests().unwrap(),
                        1,
                        "{}",
                        out.describe()
                    );
                }
                assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
                rig.once_expect(0);
            }
            Phase::AwaitingReboot => {
                assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
                rig.once_expect(0);
            }
            Phase::AwaitingConfirmation | Phase::FeedbackOwed => {
                rig.once_expect(0);
            }
            Phase::ConsentPending => {
                let out =
                    run_with_timeout(rig.command(&["consent", "accept"]), Duration::from_secs(20))
                        .unwrap();
                assert_eq!(out.code, Some(0), "{}", out.describe());
                rig.once_expect(0);
                rig.once_expect(0);
                assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
                assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
                rig.once_expect(0);
            }
        }
        rig.assert_closed_once(action, "success");
        assert_eq!(
            rig.server.action(action).unwrap().status,
            ActionStatus::Finished
        );
        assert_eq!(rig.dev.booted().unwrap(), Slot::B);
        assert_eq!(rig.env("upgrade_available").as_deref(), Some("0"));
        // Nothing is sent twice.
        rig.once_expect(0);
        assert_eq!(rig.closed(action).len(), 1);
        assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
    }
}

fn read_fixture(dir: &Path) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                STATE_FILES.contains(&name.as_str()),
                "{}: not a state file",
                path.display()
            );
            (name, fs::read_to_string(&path).unwrap())
        })
        .collect();
    files.sort();
    assert!(
        files.iter().any(|(name, _)| name == "state.json"),
        "{}: no state.json",
        dir.display()
    );
    files
}

/// Every committed fixture set, every phase: the current agent finishes the update.
#[test]
fn every_released_state_file_finishes_with_the_current_agent() {
    let releases: Vec<PathBuf> = fs::read_dir(fixtures_root())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert!(!releases.is_empty(), "no fixture sets");
    let agent = ddi_tests::bin_path("ddi-agent");
    for release in &releases {
        for phase in PHASES {
            let dir = release.join(phase.name());
            eprintln!("fixture {}", dir.display());
            let files = read_fixture(&dir);
            let rig = phase.rig(&agent);
            let action = phase.setup(&rig);
            rig.restore(&files);
            phase.finish(&rig, action);
        }
    }
}

/// Records the state files of every phase as the current agent writes them, into
/// `tests/fixtures/state/$DDI_STATE_FIXTURES/`. Run at each release:
/// `DDI_STATE_FIXTURES=<version> cargo test -p ddi-tests --test it state_compat:: -- --ignored`.
#[test]
#[ignore = "records fixtures: run by hand at a release"]
fn write_fixtures() {
    let label = std::env::var("DDI_STATE_FIXTURES")
        .expect("set DDI_STATE_FIXTURES to the release the fixtures are recorded for");
    let agent = ddi_tests::bin_path("ddi-agent");
    for phase in PHASES {
        let rig = phase.rig(&agent);
        phase.setup(&rig);
        let dir = fixtures_root().join(&label).join(phase.name());
        fs::create_dir_all(&dir).unwrap();
        for (name, text) in rig.capture() {
            fs::write(dir.join(name), text).unwrap();
        }
    }
}

/// A state file the agent cannot read is kept aside; the action it had open is answered
/// `closed`/`failure` naming the problem, and the agent goes on with the next update.
#[test]
fn unreadable_state_is_kept_aside_reported_and_the_agent_goes_on() {
    let agent = ddi_tests::bin_path("ddi-agent");
    let phase = Phase::AwaitingConfirmation;
    let rig = phase.rig(&agent);
    let action = phase.setup(&rig);
    let state_path = rig.dev.state_dir().join("state.json");
    let text = fs::read_to_string(&state_path).unwrap();
    let broken = text.replace("\"target\": \"B\"", "\"target\": \"slot-b\"");
    assert_ne!(broken, text);
    fs::write(&state_path, &broken).unwrap();

    let out = rig.once_expect(1);
    let details = rig.assert_closed_once(action, "failure");
    assert!(
        details.contains("unreadable") && details.contains("state.json.unreadable"),
        "{details}\n{}",
        out.describe()
    );
    let kept = rig.dev.state_dir().join("state.json.unreadable");
    assert_eq!(fs::read_to_string(&kept).unwrap(), broken);
    let status =
        run_with_timeout(rig.command(&["status", "--json"]), Duration::from_secs(20)).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["last_result"]["result"], "failure");
    assert_eq!(status["state_error"], serde_json::Value::Null);
    assert_eq!(
        status["unreadable_state_kept"].as_str(),
        Some(kept.to_str().unwrap())
    );

    // The agent goes on: nothing is answered twice, and the next update completes. Slot B
    // still runs on a trial nobody confirms: the agent leaves its fallback alone until the
    // device restarts (power cycles here) and U-Boot falls back to A.
    let next = rig.deploy(&Image::good("3.0", IMAGE_SIZE), &Assignment::forced());
    for _ in 0..12 {
        let out = rig.once();
        assert_eq!(out.code, Some(0), "{}", out.describe());
        if rig.server.action(next).unwrap().status == ActionStatus::Finished {
            break;
        }
        rig.dev.take_reboot_requests().unwrap();
        rig.dev.reboot().unwrap();
    }
    rig.assert_closed_once(next, "success");
    rig.assert_closed_once(action, "failure");
    assert_eq!(rig.env("upgrade_available").as_deref(), Some("0"));
}

/// An unreadable consent decision is removed and the action waits for a new answer.
#[test]
fn unreadable_consent_decision_is_dropped_and_asked_again() {
    let agent = ddi_tests::bin_path("ddi-agent");
    let phase = Phase::ConsentPending;
    let rig = phase.rig(&agent);
    let action = phase.setup(&rig);
    let consent = rig.dev.state_dir().join("consent.json");
    fs::write(&consent, b"{\"action_id\": ").unwrap();
    let out = rig.once_expect(0);
    assert!(
        out.stderr.contains("consent decision unreadable"),
        "{}",
        out.describe()
    );
    assert!(!consent.exists());
    assert_eq!(
        rig.server.action(action).unwrap().status,
        ActionStatus::WaitForConfirmation
    );
    phase.finish(&rig, action);
}

// ---- two agent versions ------------------------------------------------------------------------

/// The old agent of the two-version tests: the last main commit before the state file got its
/// own versioned format (issue 15). Its state files are the fixture set `main-3e7abd1`. Move it
/// forward only to a commit whose state files are committed as fixtures.
const OLD_AGENT_COMMIT: &str = "3e7abd16707134d9708c96e7742f7c9555db1689";

/// `ddi-agent` built from [`OLD_AGENT_COMMIT`] (once per test run; cargo skips it when built):
/// the commit's tree is exported with `git archive` and built into its own target directory
/// under this workspace's `target/old-agent/`. Needs the commit in the git history (CI has a
/// full clone): without it the tests fail, they are not skipped.
fn old_agent() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT.get_or_init(build_old_agent).clone()
}

fn build_old_agent() -> PathBuf {
    use std::process::Command;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let root = ddi_tests::target_profile_dir()
        .parent()
        .unwrap()
        .join("old-agent")
        .join(&OLD_AGENT_COMMIT[..12]);
    let src = root.join("src");
    if !src.join("Cargo.toml").is_file() {
        let found = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["cat-file", "-e", &format!("{OLD_AGENT_COMMIT}^{{commit}}")])
            .status()
            .expect("git must be installed for the two-version tests");
        assert!(
            found.success(),
            "commit {OLD_AGENT_COMMIT} (the old agent of the two-version tests) is not in the \
             git history of {}: these tests need a full clone (`git fetch --unshallow`)",
            repo.display()
        );
        let partial = root.join("src.partial");
        let _ = fs::remove_dir_all(&partial);
        fs::create_dir_all(&partial).unwrap();
        let tar = root.join("src.tar");
        let archived = Command::new("git")
            .arg("-C")
            .arg(repo)
            .args(["archive", "--format=tar", "-o"])
            .arg(&tar)
            .arg(OLD_AGENT_COMMIT)
            .status()
            .unwrap();
        assert!(archived.success(), "git archive {OLD_AGENT_COMMIT} failed");
        let unpacked = Command::new("tar")
            .arg("-xf")
            .arg(&tar)
            .arg("-C")
            .arg(&partial)
            .status()
            .unwrap();
        assert!(unpacked.success(), "cannot unpack {}", tar.display());
        fs::remove_file(&tar).unwrap();
        fs::rename(&partial, &src).unwrap();
    }
    let started = std::time::Instant::now();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "-p", "ddi-agent", "--bin", "ddi-agent", "--locked"])
        .current_dir(&src)
        .env("CARGO_TARGET_DIR", root.join("target"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "building the old agent ({OLD_AGENT_COMMIT}) failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "old agent {} built (or found up to date) in {:.1?}",
        &OLD_AGENT_COMMIT[..12],
        started.elapsed()
    );
    root.join("target/debug/ddi-agent")
}

/// (a) The old agent installs; the update brings the new agent, which confirms after the reboot.
#[test]
fn old_agent_installs_and_the_new_agent_confirms_once() {
    let old = old_agent();
    let mut rig = Rig::new(&old, |_| {});
    let action = rig.deploy(&Image::good("2.0", IMAGE_SIZE), &Assignment::forced());
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert!(rig.closed(action).is_empty(), "closed before the reboot");
    // Slot B runs the new agent.
    rig.agent = ddi_tests::bin_path("ddi-agent");
    assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
    rig.once_expect(0);
    rig.assert_closed_once(action, "success");
    assert_eq!(
        rig.server.action(action).unwrap().status,
        ActionStatus::Finished
    );
    assert_eq!(rig.env("upgrade_available").as_deref(), Some("0"));
    rig.once_expect(0);
    assert_eq!(rig.closed(action).len(), 1);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
}

/// (b) The new agent installs; the new image never comes up (U-Boot falls back), and the old
/// agent in the old slot reads the new agent's state and reports the rollback once.
#[test]
fn new_agent_installs_u_boot_falls_back_and_the_old_agent_reports_once() {
    let mut rig = Rig::new(&ddi_tests::bin_path("ddi-agent"), |_| {});
    let action = rig.deploy(&Image::good("2.0", IMAGE_SIZE), &Assignment::forced());
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    let state = fs::read_to_string(rig.dev.state_dir().join("state.json")).unwrap();
    assert!(state.contains("\"format\": 1"), "{state}");
    let mut booted = Slot::B;
    for _ in 0..10 {
        booted = rig.dev.reboot().unwrap();
        if booted == Slot::A {
            break;
        }
    }
    assert_eq!(booted, Slot::A, "the boot script never fell back");
    rig.agent = old_agent();
    rig.once_expect(1);
    let details = rig.assert_closed_once(action, "failure");
    assert!(details.contains("rolled back"), "{details}");
    rig.once_expect(0);
    assert_eq!(rig.closed(action).len(), 1);
}

/// (b) The new agent installs, the new image fails its health check and the failure cannot be
/// delivered before the fallback reboot: the old agent in the old slot delivers it, once.
#[test]
fn new_image_fails_its_health_check_and_the_old_agent_delivers_the_failure_once() {
    let mut rig = Rig::new(&ddi_tests::bin_path("ddi-agent"), |_| {});
    let action = rig.deploy(&Image::broken("2.0", IMAGE_SIZE), &Assignment::forced());
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
    rig.server.add_fault(
        Fault::new(FaultKind::Status {
            code: 503,
            retry_after_secs: Some(0),
        })
        .on(Endpoint::DeploymentFeedback),
    );
    // The check fails: slot B marked bad, the failure owed, a reboot asked for at once.
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert!(rig.closed(action).is_empty());
    let status =
        run_with_timeout(rig.command(&["status", "--json"]), Duration::from_secs(20)).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["feedback_owed"], 1, "{status}");
    rig.server.clear_faults();
    assert_eq!(rig.dev.reboot().unwrap(), Slot::A);
    rig.agent = old_agent();
    rig.once_expect(1);
    let details = rig.assert_closed_once(action, "failure");
    assert!(details.contains("self-test failed"), "{details}");
    rig.once_expect(0);
    assert_eq!(rig.closed(action).len(), 1);
}

/// (c) A local install (issue 18) brings the old agent (a downgrade from a USB stick): the old
/// agent reads the state the local job left as no action at all. It reports nothing (the
/// server never had an action), never confirms the trial it knows nothing of, so U-Boot falls
/// back; the new agent there goes on, and a server action afterwards completes as usual.
#[test]
fn old_agent_reads_a_pending_local_install_as_no_action() {
    let new = ddi_tests::bin_path("ddi-agent");
    let mut rig = Rig::new(&new, |_| {});
    let file = rig.dev.dir().join("local.img");
    fs::write(&file, Image::good("1.9", IMAGE_SIZE).bytes).unwrap();
    let out = run_with_timeout(
        rig.command(&["install", &file.display().to_string()]),
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    let state = fs::read_to_string(rig.dev.state_dir().join("state.json")).unwrap();
    assert!(state.contains("local_job"), "{state}");
    assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
    rig.agent = old_agent();
    rig.once_expect(0);
    let status =
        run_with_timeout(rig.command(&["status", "--json"]), Duration::from_secs(20)).unwrap();
    assert_eq!(status.code, Some(0), "{}", status.describe());
    let status: serde_json::Value = serde_json::from_str(&status.stdout).unwrap();
    assert_eq!(status["phase"], "idle", "{status}");
    assert!(rig.server.actions(TARGET).is_empty());
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
    let mut booted = Slot::B;
    for _ in 0..10 {
        booted = rig.dev.reboot().unwrap();
        if booted == Slot::A {
            break;
        }
        rig.once_expect(0);
    }
    assert_eq!(booted, Slot::A, "the unconfirmed trial never fell back");
    rig.agent = new;
    rig.once_expect(0);
    let action = rig.deploy(&Image::good("2.0", IMAGE_SIZE), &Assignment::forced());
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
    rig.once_expect(0);
    rig.assert_closed_once(action, "success");
}

/// The new agent is killed in the middle of a raw image in a plain tar, leaving a `member`
/// resume record; the device then runs the old agent (which knows only `raw` records): it
/// starts the download over from byte 0 and installs the right image, never misreading the
/// record.
#[test]
fn old_agent_starts_over_from_a_member_resume_record() {
    let image = Image::good("2.0", 20 << 20);
    let tar = image.tar("rootfs.img");
    let ranges = old_agent_after_a_kill(&image, "os.tar", tar, "member", None);
    // The whole artifact, once.
    assert_eq!(ranges, vec![None]);
}

/// The new agent is killed in the middle of a plain gzip image, leaving a `gzip` resume
/// record; the device then runs the old agent (which knows only `raw` records): it starts the
/// download over from byte 0 and installs the right image, never misreading the record.
#[test]
fn old_agent_starts_over_from_a_gzip_resume_record() {
    let image = Image::good("2.0", 20 << 20);
    let gz = image.gzip_best();
    let total = gz.len();
    let ranges = old_agent_after_a_kill(&image, "os.img.gz", gz, "gzip", None);
    // The whole artifact, and the trailer probe (4 bytes) once its first bytes showed gzip.
    assert_eq!(
        ranges,
        vec![None, Some(format!("bytes={}-{}", total - 4, total - 1))]
    );
}

/// The new agent is killed in the middle of a plain zstd image, leaving a `zstd` resume
/// record; the device then runs the old agent (which knows only `raw` records, and no zstd at
/// all: it writes a zstd artifact to the slot as it is): it starts the download over from byte
/// 0, once, and writes the whole artifact from the slot's first byte, never misreading the
/// record (a misread one would keep the new agent's decoded prefix).
#[test]
fn old_agent_starts_over_from_a_zstd_resume_record() {
    let image = Image::good("2.0", 20 << 20).compressible();
    let zst = image.zstd();
    let (rig, _, ranges) = old_agent_run_after_a_kill("os.img.zst", zst.clone(), "zstd", None);
    assert_eq!(ranges, vec![None]);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert!(rig.dev.slot_holds(Slot::B, &zst).unwrap());
}

/// The new agent is killed in the middle of a tar.gz's image member, leaving a `tar-gzip`
/// record (the tar's head in it); the old agent, which resumed no tar inside gzip, starts the
/// download over from byte 0 and installs the right image.
#[test]
fn old_agent_starts_over_from_a_tar_gzip_resume_record() {
    let image = Image::good("2.0", 20 << 20).compressible();
    let tgz = image.tar_gz_best("rootfs.img");
    let total = tgz.len();
    let ranges = old_agent_after_a_kill(&image, "os.tar.gz", tgz, "tar-gzip", None);
    // The whole artifact, and the trailer probe (4 bytes) once its first bytes showed gzip.
    assert_eq!(
        ranges,
        vec![None, Some(format!("bytes={}-{}", total - 4, total - 1))]
    );
}

/// As above for an `xz` record left in the middle of an image as `xz --threads` writes it
/// (the old agent knows no xz either).
#[test]
fn old_agent_starts_over_from_an_xz_resume_record() {
    let image = Image::good("2.0", 20 << 20).compressible();
    let xz = image.xz_threaded(2 << 20);
    let (rig, _, ranges) = old_agent_run_after_a_kill("os.img.xz", xz.clone(), "xz", None);
    assert_eq!(ranges, vec![None]);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert!(rig.dev.slot_holds(Slot::B, &xz).unwrap());
}

/// The new agent killed in the middle of a gzip image in a signed format-1 bundle leaves a
/// `bundle-gzip` record; the old agent (which resumed nothing under a signature policy, and
/// knows no such format) starts the download over from byte 0 and installs the right image.
#[test]
fn old_agent_starts_over_from_a_bundle_gzip_resume_record() {
    let image = Image::good("2.0", 20 << 20).compressible();
    let (vendor, compatible) = (Vendor::new(), "acme-gw-rev2");
    let bundle = vendor.bundle("rootfs.img.gz", &image.gzip_best(), compatible);
    let signed = Some((&vendor, compatible));
    let ranges = old_agent_after_a_kill(&image, "update.ddib", bundle, "bundle-gzip", signed);
    // The whole artifact, once (the old agent has no delta probe; the artifact's first bytes
    // are a tar's, so no gzip trailer probe either).
    assert_eq!(ranges, vec![None]);
}

/// The new agent installs `artifact` (holding `image`) and is killed (-9) at its first resume
/// record, whose format must be `format`; the old agent then runs: it must install the image
/// (the record gone) and confirm it after the reboot. Returns the Range headers of the old
/// agent's downloads. With `signed`, the device trusts the vendor's key and requires signed
/// bundles for that `compatible`.
fn old_agent_after_a_kill(
    image: &Image,
    filename: &str,
    artifact: Vec<u8>,
    format: &str,
    signed: Option<(&Vendor, &str)>,
) -> Vec<Option<String>> {
    let (rig, action, ranges) = old_agent_run_after_a_kill(filename, artifact, format, signed);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
    assert!(rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());
    rig.once_expect(0);
    rig.assert_closed_once(action, "success");
    ranges
}

/// The first part of [`old_agent_after_a_kill`]: the new agent killed at its first resume
/// record (of `format`), then one run of the old agent, which must leave no record. Returns the
/// rig (its agent the old one), the action and the Range headers of the old agent's downloads.
fn old_agent_run_after_a_kill(
    filename: &str,
    artifact: Vec<u8>,
    format: &str,
    signed: Option<(&Vendor, &str)>,
) -> (Rig, u64, Vec<Option<String>>) {
    let mut rig = Rig::new(&ddi_tests::bin_path("ddi-agent"), |o| {
        o.slot_size = 24 << 20;
        // ~2 s for the image: time to kill the agent after the first checkpoint (16 MiB).
        o.max_download_rate = Some("10M".into());
        if let Some((vendor, compatible)) = signed {
            o.config_extra = vendor.config(true, compatible);
        }
    });
    let action = rig.deploy_artifact("2.0", filename, artifact);
    let record_path = rig.dev.state_dir().join("download.resume");
    let record = rig.kill_at_the_first_resume_record();
    assert_eq!(record["format"], format, "{record}");
    let before = rig.server.download_log().len();

    rig.agent = old_agent();
    rig.once_expect(0);
    let log = rig.server.download_log();
    let ranges = log[before..].iter().map(|r| r.range.clone()).collect();
    assert!(!record_path.exists(), "the old agent left the record");
    (rig, action, ranges)
}
