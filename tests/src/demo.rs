//! The one-command demo (`./demo.sh`): an in-process test server, a file-backed device, and the
//! real `ddi-agent` and `ddi-bootctl` binaries playing three updates:
//!
//! 1. a good update: downloaded into slot B, U-Boot switched for a trial boot, the device reboots
//!    through the boot simulator, the agent confirms, the server shows `closed`/`success`;
//! 2. a broken update: it boots, its health check fails, the agent marks the slot bad and reboots
//!    back, the server shows `closed`/`failure` with the reason;
//! 3. an update that never comes up: it hangs at every boot, U-Boot falls back after `bootlimit`
//!    trial boots, the agent sees the rollback and the server shows `closed`/`failure`;
//! 4. everyday life (after the first update and at the end): more power cycles than a trial
//!    allows keep booting the confirmed slot.
//!
//! The story checks itself: [`run`] returns what the server saw so callers (the `ddi-demo`
//! binary, the `demo` integration test) can decide pass or fail from the server's API.

use std::fs;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bootctl::scheme::{SchemeKind, Slot};

use crate::device::{DeviceError, DeviceOptions, FileDevice, Health, Image};
use crate::harness::{Background, CommandOutput};
use ddi_sim::{
    ActionView, Assignment, Channel, FeedbackRecord, MgmtError, ServerOptions, TestServer,
};

/// Size of the demo's OS images (the slots are a bit larger).
const IMAGE_SIZE: usize = 3 * 1024 * 1024;
const SLOT_SIZE: u64 = 4 * 1024 * 1024;
/// Slow enough to watch the progress bar, fast enough for a short demo.
const DOWNLOAD_RATE: &str = "2M";
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
const CONTROLLER_ID: &str = "demo-device-0001";
const TARGET_TOKEN: &str = "demo-target-token";

/// How the demo prints.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Progress bars and colours (default: when stdout is a terminal).
    pub fancy: Option<bool>,
    /// Keep the device directory (it is kept anyway when the story fails).
    pub keep_dir: bool,
    /// Build the device here instead of a temporary directory.
    pub dir: Option<PathBuf>,
    /// Slot scheme of the device (default `bootcount`).
    pub scheme: Option<SchemeKind>,
}

/// What the demo did and what the server saw at the end.
pub struct DemoOutcome {
    /// The actions in story order with the server's final view of each.
    pub actions: Vec<StoryAction>,
    /// Problems found by the demo's own checks (empty when the story ended as expected).
    pub problems: Vec<String>,
    /// Where the device lives (removed when the outcome is dropped unless kept).
    pub device_dir: PathBuf,
    /// The server, still running, so callers can query it.
    pub server: TestServer,
    pub elapsed: Duration,
    _device: FileDevice,
}

impl DemoOutcome {
    pub fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// One update of the story.
#[derive(Debug, Clone)]
pub struct StoryAction {
    pub action_id: u64,
    /// `good`, `broken` (health check fails) or `hangs` (never boots).
    pub kind: &'static str,
    pub version: String,
    /// `success` or `failure`: how the device must close the action.
    pub expected_result: &'static str,
    /// The server's view at the end.
    pub view: Option<ActionView>,
}

/// Deployment feedback of an action (not cancel or confirmation feedback).
fn deployment_feedback(view: &ActionView) -> impl Iterator<Item = &FeedbackRecord> {
    view.feedback
        .iter()
        .filter(|f| f.channel == Channel::Deployment)
}

/// `finished` of the device's `closed` feedback (`success`/`failure`), if it closed the action.
pub fn closed_result(view: &ActionView) -> Option<String> {
    deployment_feedback(view)
        .find(|f| f.execution() == Some("closed"))
        .map(|f| f.finished().unwrap_or("?").to_string())
}

/// Did the device close the action exactly once with `closed`/`expected`, and does the server
/// show the matching final status (`FINISHED` for success, `ERROR` for failure)?
pub fn ended_as(view: &ActionView, expected: &str) -> bool {
    let closed = deployment_feedback(view)
        .filter(|f| f.execution() == Some("closed"))
        .count();
    closed == 1
        && closed_result(view).as_deref() == Some(expected)
        && !view.active
        && view.result() == Some(expected)
}

/// `closed/success (FINISHED)` style summary.
pub fn summary(view: &ActionView) -> String {
    match closed_result(view) {
        Some(result) => format!("closed/{result} ({})", view.status.name()),
        None => format!("not closed ({})", view.status.name()),
    }
}

/// The last `n` detail lines over all deployment feedback, oldest first.
pub fn last_details(view: &ActionView, n: usize) -> Vec<String> {
    let all: Vec<String> = deployment_feedback(view)
        .flat_map(|f| f.details())
        .collect();
    all[all.len().saturating_sub(n)..].to_vec()
}

/// Errors that stop the demo before the story can be judged.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("test server: {0}")]
    Server(String),
    #[error("{0}")]
    Story(String),
}

fn io_context(context: impl Into<String>) -> impl FnOnce(io::Error) -> DemoError {
    let context = context.into();
    move |source| DemoError::Io { context, source }
}

/// Play the whole story, printing it to `out`.
pub fn run(out: &mut dyn Write, options: &DemoOptions) -> Result<DemoOutcome, DemoError> {
    let started = Instant::now();
    let fancy = options.fancy.unwrap_or_else(|| {
        io::stdout().is_terminal() && std::env::var_os("TERM").is_some_and(|t| t != "dumb")
    });
    let mut say = Narrator { out, fancy };

    say.title("ddi demo: an A/B firmware update with confirm-after-reboot, on a simulated board");
    for binary in ["ddi-agent", "ddi-bootctl"] {
        if crate::try_bin_path(binary).is_none() {
            return Err(DemoError::Story(format!(
                "`{binary}` is not built next to this program: run `cargo build --workspace --bins` \
                 first (./demo.sh does)"
            )));
        }
    }
    let server = Backend::start()?;
    say.line(&format!(
        "server   hawkBit-compatible test server at {} (in this process; production uses Eclipse hawkBit)",
        server.url()
    ));
    server.create_target(CONTROLLER_ID, TARGET_TOKEN)?;

    let mut device_options = DeviceOptions::new(&server.url(), CONTROLLER_ID, TARGET_TOKEN);
    device_options.slot_size = SLOT_SIZE;
    device_options.factory_image = Image::new("demo-os", "1.0", Health::Good, IMAGE_SIZE).bytes;
    device_options.max_download_rate = Some(DOWNLOAD_RATE.to_string());
    device_options.health_check_timeout = 20;
    device_options.scheme = options.scheme.unwrap_or(SchemeKind::Bootcount);
    let device = match &options.dir {
        Some(dir) => FileDevice::create(dir, device_options)?,
        None => FileDevice::create_temp(device_options)?,
    };
    say.line(&format!(
        "device   {}: slot-A.img and slot-B.img ({} MiB each), redundant U-Boot env uboot.env + fw_env.config, cmdline, config.toml",
        device.dir().display(),
        SLOT_SIZE >> 20
    ));
    say.line(&format!(
        "scheme   {} ({} trial boots before U-Boot falls back)",
        device.options().scheme.as_str(),
        device.options().attempts
    ));

    let mut story = Story {
        say,
        device: &device,
        server: &server,
        agent_runs: 0,
        problems: Vec::new(),
    };
    let played = story.play();
    let problems = std::mem::take(&mut story.problems);
    let mut say = story.say;
    let actions = match played {
        Ok(actions) => actions,
        Err(err) => {
            let dir = device.keep().dir().to_path_buf();
            say.bad(&format!("{err}"));
            say.line(&format!(
                "Device files and agent logs kept in {}",
                dir.display()
            ));
            return Err(err);
        }
    };

    let mut final_actions = Vec::new();
    for mut action in actions {
        action.view = Some(server.action(action.action_id)?);
        final_actions.push(action);
    }
    let mut problems = problems;
    for action in &final_actions {
        let view = action.view.as_ref().expect("filled above");
        if !ended_as(view, action.expected_result) {
            problems.push(format!(
                "action {} ({} update {}): server shows {}, expected closed/{} once",
                action.action_id,
                action.kind,
                action.version,
                summary(view),
                action.expected_result
            ));
        }
    }
    say.table(&final_actions);

    let elapsed = started.elapsed();
    let keep = options.keep_dir || !problems.is_empty();
    if problems.is_empty() {
        say.good(&format!(
            "The story ended as expected in {:.1} s: one update confirmed, two rolled back and reported.",
            elapsed.as_secs_f64()
        ));
    } else {
        say.bad("The story did NOT end as expected:");
        for problem in &problems {
            say.line(&format!("  - {problem}"));
        }
    }
    let device_dir = device.dir().to_path_buf();
    let device = if keep { device.keep() } else { device };
    if keep {
        say.line(&format!(
            "Device files and agent logs (agent-run-N.log) kept in {}",
            device_dir.display()
        ));
    } else {
        say.line("(--keep keeps the device files and the agent logs)");
    }
    Ok(DemoOutcome {
        actions: final_actions,
        problems,
        device_dir,
        server: server.into_inner(),
        elapsed,
        _device: device,
    })
}

/// The steps of the story and the checks between them.
struct Story<'a, 'o> {
    say: Narrator<'o>,
    device: &'a FileDevice,
    server: &'a Backend,
    agent_runs: usize,
    problems: Vec<String>,
}

impl Story<'_, '_> {
    fn play(&mut self) -> Result<Vec<StoryAction>, DemoError> {
        let mut actions = Vec::new();

        self.say.step("Power on");
        let slot = self.boot()?;
        self.expect(
            slot == Slot::A,
            format!("first boot should start slot A, started {slot}"),
        );
        self.show_env("u-boot   env:")?;
        let before_story = self.device.env_map()?;

        // 1. A good update.
        let good = Image::good("2.0", IMAGE_SIZE);
        self.say
            .step("Update 2.0 is published and assigned to the device");
        let action = self.assign("demo-os", "2.0", "demo-os-2.0.img", &good.bytes)?;
        self.say.line(&format!(
            "server   action {action}: forced update to demo-os 2.0 (raw image, {} MiB)",
            IMAGE_SIZE >> 20
        ));
        self.say
            .step("ddi-agent once: poll, download and write the inactive slot");
        let run = self.agent_cycle(Some((Slot::B, &good)), action)?;
        self.expect_exit(&run, 0);
        self.expect(
            self.device.slot_holds(Slot::B, &good.bytes)?,
            "slot B should hold image 2.0 after the download".to_string(),
        );
        self.expect_reboot_requested()?;
        self.say.step("Reboot: U-Boot boots the new slot on trial");
        let slot = self.boot()?;
        self.expect(
            slot == Slot::B,
            format!("trial boot should start slot B, started {slot}"),
        );
        self.say
            .step("ddi-agent once: health check on the new system, confirm, report");
        let run = self.agent_cycle(None, action)?;
        self.expect_exit(&run, 0);
        self.expect_closed(action, "success")?;
        let env = self.device.env_map()?;
        let attempts = self.device.options().attempts.to_string();
        let confirmed = match self.device.options().scheme {
            SchemeKind::Bootcount => env.get("upgrade_available").map(String::as_str) == Some("0"),
            SchemeKind::Rauc => {
                env.get("BOOT_B_LEFT") == Some(&attempts)
                    && env
                        .get("BOOT_ORDER")
                        .is_some_and(|order| order.starts_with('B'))
            }
        };
        self.expect(
            confirmed,
            format!("slot B should be confirmed in the U-Boot env: {env:?}"),
        );
        for name in ["bootcmd", "ddi_boot", "bootargs", "board_serial", "ethaddr"] {
            self.expect(
                env.get(name) == before_story.get(name),
                format!(
                    "U-Boot variable {name} must be preserved, was {:?}, is {:?}",
                    before_story.get(name),
                    env.get(name)
                ),
            );
        }
        self.say.good(
            "Update 2.0 is confirmed: the device runs slot B, the server shows closed/success.",
        );
        self.show_bootctl_status()?;
        actions.push(story_action(action, "good", "2.0", "success"));
        self.everyday_life(action, Slot::B)?;
        if !self.problems.is_empty() {
            self.say
                .bad("Story stopped: the rest assumes the device runs the confirmed update 2.0.");
            return Ok(actions);
        }

        // 2. A broken update: it boots, but its health check fails.
        let broken = Image::broken("2.1", IMAGE_SIZE);
        let broken_gz = broken.gzip();
        self.say
            .step("Update 2.1 is published: it boots, but its service crashes");
        let action = self.assign("demo-os", "2.1", "demo-os-2.1.img.gz", &broken_gz)?;
        self.say.line(&format!(
            "server   action {action}: forced update to demo-os 2.1 (gzip-compressed, {:.1} MiB)",
            broken_gz.len() as f64 / 1048576.0
        ));
        self.say
            .step("ddi-agent once: download, decompress and write slot A");
        let run = self.agent_cycle(Some((Slot::A, &broken)), action)?;
        self.expect_exit(&run, 0);
        self.expect(
            self.device.slot_holds(Slot::A, &broken.bytes)?,
            "slot A should hold image 2.1 after the download".to_string(),
        );
        self.expect_reboot_requested()?;
        self.say.step("Reboot: U-Boot boots slot A on trial");
        let slot = self.boot()?;
        self.expect(
            slot == Slot::A,
            format!("trial boot should start slot A, started {slot}"),
        );
        self.say
            .step("ddi-agent once: the health check fails on the new system");
        self.agent_cycle(None, action)?;
        // The agent marks the slot bad and reboots back (and may report before or after that).
        self.settle(action, Slot::B)?;
        self.expect_closed(action, "failure")?;
        self.say.good("Update 2.1 was rolled back: the device runs slot B again, the server shows closed/failure.");
        actions.push(story_action(action, "broken", "2.1", "failure"));

        // 3. An update that never comes up: U-Boot's boot counter falls back.
        let hangs = Image::new("demo-os", "2.2", Health::Hangs, IMAGE_SIZE);
        self.say
            .step("Update 2.2 is published: its kernel hangs before userspace");
        let action = self.assign("demo-os", "2.2", "demo-os-2.2.img", &hangs.bytes)?;
        self.say.line(&format!(
            "server   action {action}: forced update to demo-os 2.2"
        ));
        self.say.step("ddi-agent once: download and write slot A");
        let run = self.agent_cycle(Some((Slot::A, &hangs)), action)?;
        self.expect_exit(&run, 0);
        self.expect_reboot_requested()?;
        self.say
            .step("Reboot: the new system hangs, the watchdog resets the board, again and again");
        let slot = self.boot()?;
        self.expect(
            slot == Slot::B,
            format!("U-Boot should fall back to slot B, started {slot}"),
        );
        self.say
            .step("ddi-agent once: the agent sees the rollback and reports it");
        self.agent_cycle(None, action)?;
        self.settle(action, Slot::B)?;
        self.expect_closed(action, "failure")?;
        self.say.good("Update 2.2 was rolled back by U-Boot: the device runs slot B, the server shows closed/failure.");
        actions.push(story_action(action, "hangs", "2.2", "failure"));

        // 4. Everyday life: the confirmed slot must stay the one that boots.
        self.everyday_life(action, Slot::B)?;
        self.show_bootctl_status()?;

        Ok(actions)
    }

    /// The boot counters after a boot, for the narration.
    fn boot_counters(&self) -> Result<String, DemoError> {
        let env = self.device.env_map()?;
        let var = |name: &str| env.get(name).map_or("?", String::as_str).to_string();
        Ok(match self.device.options().scheme {
            SchemeKind::Bootcount if var("upgrade_available") == "1" => {
                format!(", trial boot {} of {}", var("bootcount"), var("bootlimit"))
            }
            SchemeKind::Bootcount => String::new(),
            SchemeKind::Rauc => format!(
                "; BOOT_ORDER=\"{}\" BOOT_A_LEFT={} BOOT_B_LEFT={}",
                var("BOOT_ORDER"),
                var("BOOT_A_LEFT"),
                var("BOOT_B_LEFT")
            ),
        })
    }

    /// More power cycles than a trial allows, the agent running after each boot: the
    /// confirmed slot `home` must keep booting (no counter may run out on it).
    fn everyday_life(&mut self, last_action: u64, home: Slot) -> Result<(), DemoError> {
        let cycles = self.device.options().attempts + 1;
        self.say.step(&format!(
            "Everyday life: {cycles} power cycles, the agent runs after each boot"
        ));
        for cycle in 1..=cycles {
            self.device.take_reboot_requests()?;
            let slot = self.device.reboot()?;
            let version = self
                .device
                .slot_image(slot)
                .map_or_else(|| "?".to_string(), |h| h.version);
            let counter = self.boot_counters()?;
            self.say.line(&format!(
                "u-boot   power cycle {cycle}: boots slot {slot} (demo-os {version}{counter})"
            ));
            self.expect(
                slot == home,
                format!("power cycle {cycle} should boot the confirmed slot {home}, booted {slot}"),
            );
            if slot != home {
                break;
            }
            let run = self.agent_cycle(None, last_action)?;
            self.expect_exit(&run, 0);
        }
        Ok(())
    }

    fn expect(&mut self, ok: bool, problem: String) {
        if !ok {
            self.say.bad(&problem);
            self.problems.push(problem);
        }
    }

    fn expect_exit(&mut self, run: &CommandOutput, code: i32) {
        if run.code != Some(code) {
            let log = self.log_path(self.agent_runs);
            self.expect(
                false,
                format!(
                    "ddi-agent once exited with {:?}, expected {code} (log: {})",
                    run.code,
                    log.display()
                ),
            );
        }
    }

    fn expect_reboot_requested(&mut self) -> Result<(), DemoError> {
        let pending = self.device.reboot_marker_path().exists();
        self.expect(
            pending,
            "the agent should have run its reboot_command".to_string(),
        );
        Ok(())
    }

    fn expect_closed(&mut self, action: u64, result: &str) -> Result<(), DemoError> {
        let view = self.server.action(action)?;
        self.say.line(&format!(
            "server   action {action}: {}{}",
            summary(&view),
            last_details(&view, 1)
                .first()
                .map(|d| format!(" - \"{d}\""))
                .unwrap_or_default()
        ));
        self.expect(
            ended_as(&view, result),
            format!(
                "action {action} should be closed/{result}, is {}",
                summary(&view)
            ),
        );
        Ok(())
    }

    fn assign(
        &self,
        name: &str,
        version: &str,
        file: &str,
        bytes: &[u8],
    ) -> Result<u64, DemoError> {
        self.server
            .assign_update(CONTROLLER_ID, name, version, file, bytes)
    }

    /// Power-cycle until the system reaches userspace (the agent can run), as a board with a
    /// watchdog would: a system that hangs is reset, and U-Boot counts the attempts.
    fn boot(&mut self) -> Result<Slot, DemoError> {
        // This reset answers any reboot the agent asked for.
        self.device.take_reboot_requests()?;
        for attempt in 1..=10 {
            let slot = self.device.reboot()?;
            let header = self.device.slot_image(slot);
            let version = header.as_ref().map_or("?", |h| h.version.as_str());
            let counter = self.boot_counters()?;
            self.say.line(&format!(
                "u-boot   boots slot {slot} (demo-os {version}{counter})"
            ));
            if header.as_ref().is_some_and(|h| h.health == Health::Hangs) {
                self.say.line(
                    "linux    ... kernel hangs before userspace; the watchdog resets the board",
                );
                continue;
            }
            if attempt > 1 || header.is_none() {
                self.say.line(&format!("linux    up on slot {slot}"));
            }
            return Ok(slot);
        }
        Err(DemoError::Story(
            "the device never reached userspace in 10 boots".to_string(),
        ))
    }

    /// After the agent ran: follow its reboot requests (running the agent after each boot, as
    /// the device would) until the device runs `home` and the server has the closing feedback.
    fn settle(&mut self, action: u64, home: Slot) -> Result<(), DemoError> {
        for _ in 0..4 {
            if self.device.take_reboot_requests()? > 0 {
                self.say.step("Reboot requested by the agent");
                self.boot()?;
                self.say.step("ddi-agent once on the rebooted system");
                self.agent_cycle(None, action)?;
                continue;
            }
            let view = self.server.action(action)?;
            if closed_result(&view).is_some() && self.device.booted()? == home {
                return Ok(());
            }
            self.say.step("ddi-agent once: deliver what is still owed");
            self.agent_cycle(None, action)?;
        }
        Ok(())
    }

    fn log_path(&self, run: usize) -> PathBuf {
        self.device.dir().join(format!("agent-run-{run}.log"))
    }

    /// One `ddi-agent once`. While it runs, a progress bar follows the bytes of `image` that have
    /// arrived in the target slot. Afterwards: what changed in the U-Boot env, what the server got,
    /// and whether a reboot was requested.
    fn agent_cycle(
        &mut self,
        watch: Option<(Slot, &Image)>,
        action: u64,
    ) -> Result<CommandOutput, DemoError> {
        self.agent_runs += 1;
        let env_before = self.device.env_vars()?;
        let feedback_before = self.server.action(action)?.feedback.len();
        let mut cmd = self.device.agent_command();
        cmd.arg("once");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        let mut agent = Background::spawn(cmd).map_err(io_context("start ddi-agent"))?;
        let started = Instant::now();
        let mut shown = None;
        loop {
            let exited = agent
                .try_exit()
                .map_err(io_context("wait for ddi-agent"))?
                .is_some();
            if let Some((slot, image)) = watch {
                let done = written_prefix(&self.device.slot_path(slot), &image.bytes);
                if shown != Some(done) {
                    self.say.progress(
                        &format!("write slot {slot}"),
                        done as u64,
                        image.bytes.len() as u64,
                    );
                    shown = Some(done);
                }
            }
            if exited || started.elapsed() > AGENT_TIMEOUT {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Some((slot, image)) = watch {
            let done = written_prefix(&self.device.slot_path(slot), &image.bytes);
            self.say.progress_done(
                &format!("write slot {slot}"),
                done as u64,
                image.bytes.len() as u64,
            );
        }
        let run = agent
            .stop_after(Duration::ZERO)
            .map_err(io_context("stop ddi-agent"))?;
        let log = self.log_path(self.agent_runs);
        fs::write(&log, format!("{}\n", run.describe()))
            .map_err(io_context(format!("write {}", log.display())))?;

        let outcome = match run.code {
            Some(0) => "exit 0".to_string(),
            Some(1) => "exit 1 (an update failed and was reported)".to_string(),
            Some(2) => "exit 2 (cycle not complete, feedback still owed)".to_string(),
            Some(code) => format!("exit {code}"),
            None if run.timed_out => format!("killed after {} s", AGENT_TIMEOUT.as_secs()),
            None => "killed by a signal".to_string(),
        };
        self.say.line(&format!(
            "agent    {outcome} after {:.1} s",
            run.elapsed.as_secs_f64()
        ));
        if !matches!(run.code, Some(0) | Some(1)) {
            for line in tail(&run.stderr, 5) {
                self.say.line(&format!("         | {line}"));
            }
        }

        let env_after = self.device.env_vars()?;
        let changes = env_diff(&env_before, &env_after);
        if !changes.is_empty() {
            self.say.line(&format!("u-boot   env saved: {changes}"));
        }
        let view = self.server.action(action)?;
        for feedback in view.feedback.iter().skip(feedback_before) {
            let detail = feedback
                .details()
                .last()
                .map(|d| format!(": {d}"))
                .unwrap_or_default();
            let channel = match feedback.channel {
                Channel::Deployment => "",
                Channel::Cancel => "cancel ",
                Channel::Confirmation => "confirmation ",
            };
            let status = match (feedback.execution(), feedback.finished()) {
                (Some(execution), Some("none") | None) => execution.to_string(),
                (Some(execution), Some(finished)) => format!("{execution}/{finished}"),
                (None, _) => "?".to_string(),
            };
            self.say
                .line(&format!("server   <- {channel}{status}{detail}"));
        }
        if self.device.reboot_marker_path().exists() {
            self.say.line("agent    runs reboot_command");
        }
        Ok(run)
    }

    fn show_env(&mut self, label: &str) -> Result<(), DemoError> {
        let vars = self.device.env_vars()?;
        let text: Vec<String> = vars.iter().map(|(n, v)| format!("{n}={v}")).collect();
        self.say.line(&format!("{label} {}", text.join("  ")));
        Ok(())
    }

    fn show_bootctl_status(&mut self) -> Result<(), DemoError> {
        let mut cmd = self.device.bootctl_command();
        cmd.arg("status");
        let out = crate::harness::run_with_timeout(cmd, Duration::from_secs(20))
            .map_err(io_context("run ddi-bootctl status"))?;
        self.say.line("$ ddi-bootctl status");
        for line in out.stdout.lines().chain(out.stderr.lines()) {
            self.say.line(&format!("  {line}"));
        }
        self.expect(
            out.success(),
            format!("ddi-bootctl status failed:\n{}", out.describe()),
        );
        Ok(())
    }
}

fn story_action(
    action_id: u64,
    kind: &'static str,
    version: &str,
    expected_result: &'static str,
) -> StoryAction {
    StoryAction {
        action_id,
        kind,
        version: version.to_string(),
        expected_result,
        view: None,
    }
}

/// How many leading bytes of the slot file already equal `image`.
fn written_prefix(slot: &Path, image: &[u8]) -> usize {
    let Ok(bytes) = fs::read(slot) else {
        return 0;
    };
    const CHUNK: usize = 64 * 1024;
    let mut done = 0;
    while done < image.len() && done < bytes.len() {
        let end = (done + CHUNK).min(image.len()).min(bytes.len());
        if bytes[done..end] == image[done..end] {
            done = end;
        } else {
            let same = bytes[done..end]
                .iter()
                .zip(&image[done..end])
                .take_while(|(a, b)| a == b)
                .count();
            return done + same;
        }
    }
    done
}

/// `name: old -> new` for each changed variable, in order.
fn env_diff(before: &[(String, String)], after: &[(String, String)]) -> String {
    let lookup = |vars: &[(String, String)], name: &str| {
        vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone())
    };
    let mut changes = Vec::new();
    for (name, value) in after {
        match lookup(before, name) {
            Some(old) if &old == value => {}
            Some(old) => changes.push(format!("{name}={value} (was {old})")),
            None => changes.push(format!("{name}={value} (new)")),
        }
    }
    for (name, _) in before {
        if lookup(after, name).is_none() {
            changes.push(format!("{name} removed"));
        }
    }
    changes.join(", ")
}

fn tail(text: &str, n: usize) -> Vec<&str> {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].to_vec()
}

/// Writes the story: numbered steps, indented lines, progress bars on a terminal.
struct Narrator<'o> {
    out: &'o mut dyn Write,
    fancy: bool,
}

impl Narrator<'_> {
    fn emit(&mut self, text: &str) {
        // The demo's output is best effort: a closed pipe must not abort the story.
        let _ = writeln!(self.out, "{text}");
        let _ = self.out.flush();
    }

    fn paint(&self, code: &str, text: &str) -> String {
        if self.fancy {
            format!("\x1b[{code}m{text}\x1b[0m")
        } else {
            text.to_string()
        }
    }

    fn title(&mut self, text: &str) {
        let text = self.paint("1", text);
        self.emit(&text);
    }

    fn step(&mut self, text: &str) {
        let text = self.paint("1;36", &format!("==> {text}"));
        self.emit("");
        self.emit(&text);
    }

    fn line(&mut self, text: &str) {
        self.emit(&format!("    {text}"));
    }

    fn good(&mut self, text: &str) {
        let text = self.paint("1;32", &format!("OK  {text}"));
        self.emit(&format!("    {text}"));
    }

    fn bad(&mut self, text: &str) {
        let text = self.paint("1;31", &format!("FAIL {text}"));
        self.emit(&format!("    {text}"));
    }

    fn bar(done: u64, total: u64) -> String {
        const WIDTH: u64 = 30;
        // An empty download is complete.
        let done = done.min(total);
        let filled = (done * WIDTH).checked_div(total).unwrap_or(WIDTH);
        let percent = (done * 100).checked_div(total).unwrap_or(100);
        format!(
            "[{}{}] {percent:>3}%  {:.1}/{:.1} MiB",
            "#".repeat(filled as usize),
            ".".repeat((WIDTH - filled) as usize),
            done as f64 / 1048576.0,
            total as f64 / 1048576.0
        )
    }

    /// Redraw the progress bar in place (terminal only).
    fn progress(&mut self, label: &str, done: u64, total: u64) {
        if self.fancy {
            let _ = write!(
                self.out,
                "\r    {label:<12} {}\x1b[K",
                Self::bar(done, total)
            );
            let _ = self.out.flush();
        }
    }

    /// Final state of a progress bar (a plain line when not on a terminal).
    fn progress_done(&mut self, label: &str, done: u64, total: u64) {
        if self.fancy {
            let _ = writeln!(
                self.out,
                "\r    {label:<12} {}\x1b[K",
                Self::bar(done, total)
            );
            let _ = self.out.flush();
        } else {
            self.line(&format!("{label:<8} {}", Self::bar(done, total)));
        }
    }

    fn table(&mut self, actions: &[StoryAction]) {
        self.step("What the server shows");
        self.line(&format!(
            "{:<7} {:<8} {:<7} {:<9} {:<16} {}",
            "action", "update", "kind", "status", "device said", "last feedback"
        ));
        for action in actions {
            let Some(view) = &action.view else { continue };
            let details = last_details(view, 3);
            let first = details.first().cloned().unwrap_or_default();
            let said = closed_result(view)
                .map_or_else(|| "(not closed)".to_string(), |r| format!("closed/{r}"));
            self.line(&format!(
                "{:<7} {:<8} {:<7} {:<9} {:<16} {}",
                action.action_id,
                action.version,
                action.kind,
                view.status.name(),
                said,
                first
            ));
            for detail in details.iter().skip(1) {
                self.line(&format!("{:<52}{detail}", ""));
            }
        }
    }
}

// ---- server adapter ---------------------------------------------------------------------------

/// The test server as the demo uses it: a few management calls with errors the demo can report.
struct Backend {
    server: TestServer,
}

impl Backend {
    fn start() -> Result<Backend, DemoError> {
        let server = TestServer::try_start(ServerOptions::default())
            .map_err(|err| DemoError::Server(format!("cannot start: {err}")))?;
        Ok(Backend { server })
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn create_target(&self, controller_id: &str, token: &str) -> Result<(), DemoError> {
        self.server
            .create_target(controller_id, Some(token))
            .map(drop)
            .map_err(|err| DemoError::Server(format!("create target {controller_id}: {err}")))
    }

    /// Software module (part `os`) with one artifact, a distribution set, and a forced
    /// assignment to the device. Returns the action id.
    fn assign_update(
        &self,
        controller_id: &str,
        name: &str,
        version: &str,
        file_name: &str,
        bytes: &[u8],
    ) -> Result<u64, DemoError> {
        let server_err =
            |err: MgmtError| DemoError::Server(format!("publish {name} {version}: {err}"));
        let module = self.server.create_module("os", name, version);
        self.server
            .upload_bytes(module, file_name, bytes.to_vec())
            .map_err(server_err)?;
        let distribution = self
            .server
            .create_distribution(name, version, &[module])
            .map_err(server_err)?;
        self.server
            .assign(controller_id, distribution, &Assignment::forced())
            .map_err(server_err)
    }

    fn action(&self, action_id: u64) -> Result<ActionView, DemoError> {
        self.server
            .action(action_id)
            .ok_or_else(|| DemoError::Server(format!("action {action_id} does not exist")))
    }

    fn into_inner(self) -> TestServer {
        self.server
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_prefix_counts_matching_leading_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot");
        let image: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8 + 1).collect();
        let mut content = vec![0u8; 300_000];
        content[..150_001].copy_from_slice(&image[..150_001]);
        fs::write(&slot, &content).unwrap();
        assert_eq!(written_prefix(&slot, &image), 150_001);
        fs::write(&slot, [&image[..], &[0u8; 10]].concat()).unwrap();
        assert_eq!(written_prefix(&slot, &image), image.len());
        assert_eq!(written_prefix(&dir.path().join("missing"), &image), 0);
    }

    #[test]
    fn env_diff_lists_changes_in_order() {
        let before = vec![
            ("bootctl_slot".to_string(), "A".to_string()),
            ("bootcmd".to_string(), "run x".to_string()),
            ("gone".to_string(), "1".to_string()),
        ];
        let after = vec![
            ("bootctl_slot".to_string(), "B".to_string()),
            ("bootcmd".to_string(), "run x".to_string()),
            ("upgrade_available".to_string(), "1".to_string()),
        ];
        assert_eq!(
            env_diff(&before, &after),
            "bootctl_slot=B (was A), upgrade_available=1 (new), gone removed"
        );
    }

    #[test]
    fn progress_bar_is_proportional() {
        assert_eq!(
            Narrator::bar(1048576, 2 * 1048576),
            "[###############...............]  50%  1.0/2.0 MiB"
        );
    }
}
