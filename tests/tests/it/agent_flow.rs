//! The real `ddi-agent` binary against the test server on a file-backed device: every action
//! type, cancel, consent, configData, reboot/confirm/rollback, and hawkBit version differences.
//! Needs `cargo build --workspace --bins` first.

use std::time::Duration;

use bootctl::scheme::Slot;
use ddi_sim::{
    ActionStatus, Assignment, Endpoint, Fault, FaultKind, HawkbitVersion, MaintenanceWindow,
    ServerOptions,
};
use ddi_tests::device::{DeviceOptions, Image};
use ddi_tests::harness::{Background, CommandOutput};

const TARGET: &str = "dev-1";
const TOKEN: &str = "s3cret-target-token";
const IMAGE_SIZE: usize = 300 * 1024;

/// The common rig with this module's views; the agent must never print the token.
struct Rig(ddi_tests::rig::Rig);

impl std::ops::Deref for Rig {
    type Target = ddi_tests::rig::Rig;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Rig {
    fn new() -> Rig {
        Rig::with(ServerOptions::default(), |_| {})
    }

    fn with(opts: ServerOptions, change: impl FnOnce(&mut DeviceOptions)) -> Rig {
        let opts = opts.polling(Duration::from_secs(1));
        let mut rig = ddi_tests::rig::Rig::start(opts, TARGET, TOKEN, change);
        rig.never_printed = Some(TOKEN.to_string());
        Rig(rig)
    }

    fn status(&self, action: u64) -> ActionStatus {
        self.server.action(action).unwrap().status
    }

    /// (execution, finished) of every feedback the server accepted for the action.
    fn feedback(&self, action: u64) -> Vec<(String, String)> {
        self.server
            .feedback(action)
            .iter()
            .map(|f| {
                (
                    f.execution().unwrap_or_default().to_string(),
                    f.finished().unwrap_or_default().to_string(),
                )
            })
            .collect()
    }

    fn closed(&self, action: u64) -> Vec<(String, Vec<String>)> {
        self.server
            .feedback(action)
            .iter()
            .filter(|f| f.execution() == Some("closed"))
            .map(|f| (f.finished().unwrap_or_default().to_string(), f.details()))
            .collect()
    }

    fn status_json(&self) -> serde_json::Value {
        let mut cmd = self.dev.agent_command();
        cmd.args(["status", "--json"]);
        let out = ddi_tests::harness::run_with_timeout(cmd, Duration::from_secs(20)).unwrap();
        assert_eq!(out.code, Some(0), "{}", out.describe());
        serde_json::from_str(&out.stdout).unwrap()
    }

    /// `ddi-agent run` in the background.
    fn spawn_run(&self) -> Background {
        let mut cmd = self.dev.agent_command();
        cmd.arg("run");
        Background::spawn(cmd).unwrap()
    }

    fn poll_count(&self) -> u64 {
        self.server.target(TARGET).unwrap().target.poll_count
    }
}

/// SIGTERM to a `run` daemon: it must stop cleanly (exit 0) within 10 s, token not leaked.
fn stop_run(daemon: Background) -> CommandOutput {
    let pid = daemon.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let out = daemon.stop_after(Duration::from_secs(10)).unwrap();
    assert!(
        !out.timed_out,
        "daemon ignored SIGTERM:\n{}",
        out.describe()
    );
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(!out.stderr.contains(TOKEN));
    out
}

/// Install, reboot, confirm: the full happy path of one action type.
fn full_update(rig: &Rig, how: &Assignment) -> u64 {
    let image = Image::good("2.0", IMAGE_SIZE);
    let action = rig.deploy(&image, how);
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert!(rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());
    assert!(rig.closed(action).is_empty(), "closed before the reboot");
    assert!(rig.server.action(action).unwrap().active);
    assert_eq!(rig.env("bootctl_slot").as_deref(), Some("B"));
    assert_eq!(rig.env("upgrade_available").as_deref(), Some("1"));

    assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
    rig.once_expect(0);
    assert_eq!(rig.status(action), ActionStatus::Finished);
    let closed = rig.closed(action);
    assert_eq!(closed.len(), 1, "{closed:?}");
    assert_eq!(closed[0].0, "success");
    assert_eq!(rig.env("upgrade_available").as_deref(), Some("0"));
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
    // Nothing more happens, nothing is sent twice.
    rig.once_expect(0);
    assert_eq!(rig.closed(action).len(), 1);
    action
}

#[test]
fn forced_update_installs_reboots_confirms_and_reports_once() {
    let rig = Rig::new();
    full_update(&rig, &Assignment::forced());
    // Variables the agent does not own are untouched.
    assert_eq!(rig.env("bootcmd").as_deref(), Some("run ddi_boot"));
    assert_eq!(rig.env("board_serial").as_deref(), Some("DDI-DEMO-0001"));
    // configData: configured attributes plus booted slot and running version.
    let attrs = rig.server.target(TARGET).unwrap().target.attributes;
    assert_eq!(attrs.get("hw_revision").map(String::as_str), Some("sim-1"));
    assert_eq!(attrs.get("booted_slot").map(String::as_str), Some("B"));
    assert_eq!(
        attrs.get("running_version").map(String::as_str),
        Some("2.0")
    );
    let status = rig.status_json();
    assert_eq!(status["booted"], "B");
    assert_eq!(status["phase"], "idle");
    assert_eq!(status["last_result"]["result"], "success");
    assert_eq!(status["feedback_owed"], 0);
}

#[test]
fn soft_and_timeforced_updates_complete() {
    let rig = Rig::new();
    full_update(&rig, &Assignment::soft());
    let rig = Rig::new();
    let mut how = Assignment::new(ddi_sim::ActionType::Timeforced);
    how.forced_at_ms = Some(ddi_sim::model::now_ms() + 3_600_000);
    full_update(&rig, &how);
}

#[test]
fn download_only_is_closed_by_downloaded_and_never_activated() {
    let rig = Rig::new();
    let image = Image::good("3.0", IMAGE_SIZE);
    let action = rig.deploy(&image, &Assignment::download_only());
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
    assert_eq!(rig.status(action), ActionStatus::Downloaded);
    assert!(rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());
    assert_eq!(rig.env("bootctl_slot").as_deref(), Some("A"));
    assert_ne!(rig.env("upgrade_available").as_deref(), Some("1"));
    assert!(rig.feedback(action).iter().any(|(e, _)| e == "downloaded"));
    assert!(rig.closed(action).is_empty());
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
}

#[test]
fn maintenance_window_writes_now_and_activates_when_open() {
    let rig = Rig::new();
    let image = Image::good("4.0", IMAGE_SIZE);
    let mut how = Assignment::forced();
    let opens = ddi_sim::model::now_ms() + 4_000;
    how.maintenance = Some(MaintenanceWindow {
        start_ms: opens,
        duration_ms: 600_000,
        every_ms: None,
    });
    let action = rig.deploy(&image, &how);
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
    assert!(rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());
    assert_eq!(rig.env("bootctl_slot").as_deref(), Some("A"));
    assert!(rig.server.action(action).unwrap().active);
    // Downloaded (and reported so) while the window is closed; the action stays open.
    assert!(rig.feedback(action).iter().any(|(e, _)| e == "downloaded"));
    let status = rig.status_json();
    assert_eq!(status["phase"], "idle");
    assert_eq!(status["downloaded"]["slot"], "B");
    assert_eq!(status["downloaded"]["action_id"], action.to_string());
    let mut cmd = rig.dev.agent_command();
    cmd.arg("status");
    let out = ddi_tests::harness::run_with_timeout(cmd, Duration::from_secs(20)).unwrap();
    assert!(
        out.stdout.contains("booted slot:    A"),
        "{}",
        out.describe()
    );
    assert!(
        out.stdout.contains("downloaded:     version 4.0 in slot B"),
        "{}",
        out.describe()
    );
    while ddi_sim::model::now_ms() < opens + 200 {
        std::thread::sleep(Duration::from_millis(200));
    }
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert_eq!(rig.env("bootctl_slot").as_deref(), Some("B"));
    rig.dev.reboot().unwrap();
    rig.once_expect(0);
    assert_eq!(rig.status(action), ActionStatus::Finished);
}

#[test]
fn failed_health_check_marks_bad_reports_output_and_returns_to_old_slot() {
    let rig = Rig::new();
    let image = Image::broken("5.0", IMAGE_SIZE);
    let action = rig.deploy(&image, &Assignment::forced());
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
    rig.once_expect(1);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert_eq!(rig.status(action), ActionStatus::Error);
    let closed = rig.closed(action);
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].0, "failure");
    let details = closed[0].1.join("\n");
    assert!(details.contains("self-test failed"), "{details}");
    assert_eq!(rig.dev.reboot().unwrap(), Slot::A);
    rig.once_expect(0);
    assert_eq!(rig.closed(action).len(), 1);
    assert_eq!(rig.status_json()["last_result"]["result"], "failure");
}

#[test]
fn bootloader_fallback_is_reported_as_rollback() {
    let rig = Rig::new();
    let image = Image::good("6.0", IMAGE_SIZE);
    let action = rig.deploy(&image, &Assignment::forced());
    rig.once_expect(0);
    rig.dev.take_reboot_requests().unwrap();
    // The new system never comes up far enough to run the agent: U-Boot counts and falls back.
    let mut booted = Slot::B;
    for _ in 0..10 {
        booted = rig.dev.reboot().unwrap();
        if booted == Slot::A {
            break;
        }
    }
    assert_eq!(booted, Slot::A, "the boot script never fell back");
    rig.once_expect(1);
    let closed = rig.closed(action);
    assert_eq!(closed.len(), 1);
    assert_eq!(closed[0].0, "failure");
    assert!(
        closed[0]
            .1
            .join(" ")
            .contains("rolled back to slot A after 3 attempts"),
        "{closed:?}"
    );
    assert_eq!(rig.status(action), ActionStatus::Error);
}

#[test]
fn cancel_before_activation_stops_and_leaves_slot_bad() {
    // Canceled before the agent ever saw it.
    let rig = Rig::new();
    let image = Image::good("7.0", IMAGE_SIZE);
    let action = rig.deploy(&image, &Assignment::forced());
    rig.server.cancel(action).unwrap();
    rig.once_expect(0);
    assert_eq!(rig.status(action), ActionStatus::Canceled);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);

    // Canceled after writing, while waiting for the maintenance window.
    let rig = Rig::new();
    let mut how = Assignment::forced();
    how.maintenance = Some(MaintenanceWindow {
        start_ms: ddi_sim::model::now_ms() + 3_600_000,
        duration_ms: 60_000,
        every_ms: None,
    });
    let action = rig.deploy(&image, &how);
    rig.once_expect(0);
    assert!(rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());
    rig.server.cancel(action).unwrap();
    rig.once_expect(0);
    assert_eq!(rig.status(action), ActionStatus::Canceled);
    assert_eq!(rig.env("bootctl_slot").as_deref(), Some("A"));
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
    let status = rig.status_json();
    assert_eq!(status["phase"], "idle");
    assert_eq!(status["last_result"]["result"], "canceled");
    // A new deployment afterwards works normally.
    full_update(&rig, &Assignment::forced());
}

#[test]
fn cancel_after_activation_lets_the_update_finish() {
    let rig = Rig::new();
    let image = Image::good("8.0", IMAGE_SIZE);
    let action = rig.deploy(&image, &Assignment::forced());
    rig.once_expect(0);
    rig.dev.take_reboot_requests().unwrap();
    rig.server.cancel(action).unwrap();
    rig.dev.reboot().unwrap();
    rig.once_expect(0);
    // The update won the race: closed/success on the deployment, the action is finished.
    assert_eq!(rig.status(action), ActionStatus::Finished);
    assert_eq!(rig.closed(action).len(), 1);
}

#[test]
fn manual_consent_waits_for_the_user() {
    let rig = Rig::with(ServerOptions::default(), |o| {
        o.agent_extra = "consent = \"manual\"\n".into();
    });
    let image = Image::good("9.0", IMAGE_SIZE);
    let mut how = Assignment::forced();
    how.confirmation_required = true;
    let action = rig.deploy(&image, &how);
    rig.once_expect(0);
    assert_eq!(rig.status(action), ActionStatus::WaitForConfirmation);
    let status = rig.status_json();
    assert_eq!(status["pending_consent"], action.to_string());
    // Why it waits, and what would be confirmed (fetched from its confirmationBase).
    assert_eq!(status["pending_consent_reason"], "confirmation");
    let details = status["pending_consent_details"].as_str().unwrap();
    assert!(
        details.contains("9.0") && details.contains("os.img"),
        "{details}"
    );

    let consent = |what: &str| {
        let mut cmd = rig.dev.agent_command();
        cmd.args(["consent", what]);
        let out = ddi_tests::harness::run_with_timeout(cmd, Duration::from_secs(20)).unwrap();
        assert_eq!(out.code, Some(0), "{}", out.describe());
    };
    consent("deny");
    rig.once_expect(0);
    assert_eq!(rig.status(action), ActionStatus::WaitForConfirmation);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);

    consent("accept");
    rig.once_expect(0);
    assert_ne!(rig.status(action), ActionStatus::WaitForConfirmation);
    // The answer names what it confirms.
    let confirmed = rig.server.feedback(action).iter().any(|f| {
        f.body["confirmation"] == "confirmed"
            && f.body["details"].as_array().is_some_and(|d| {
                d.iter().any(|line| {
                    line.as_str().is_some_and(|l| {
                        l.starts_with(&format!("confirmation of action {action}"))
                            && l.contains("9.0")
                    })
                })
            })
    });
    assert!(confirmed, "{:?}", rig.server.feedback(action));
    // The next cycle gets the deployment (forced: no second consent).
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    rig.dev.reboot().unwrap();
    rig.once_expect(0);
    assert_eq!(rig.status(action), ActionStatus::Finished);
}

/// `consent = "manual"`: a soft update (`update: attempt`) waits for `ddi-agent consent
/// accept`; `status` says which action waits and why; a forced one does not wait.
#[test]
fn manual_consent_holds_a_soft_update_until_accepted() {
    let rig = Rig::with(ServerOptions::default(), |o| {
        o.agent_extra = "consent = \"manual\"\n".into();
    });
    let image = Image::good("9.2", IMAGE_SIZE);
    let action = rig.deploy(&image, &Assignment::soft());
    rig.once_expect(0);
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
    assert!(!rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());
    let status = rig.status_json();
    assert_eq!(status["phase"], "idle");
    assert_eq!(status["pending_consent"], action.to_string());
    assert_eq!(status["pending_consent_reason"], "soft_update");
    assert!(status["pending_consent_details"]
        .as_str()
        .unwrap()
        .contains("9.2"));
    let mut cmd = rig.dev.agent_command();
    cmd.arg("status");
    let out = ddi_tests::harness::run_with_timeout(cmd, Duration::from_secs(20)).unwrap();
    assert!(
        out.stdout
            .contains(&format!("consent:        action {action} waits"))
            && out.stdout.contains("soft update"),
        "{}",
        out.describe()
    );

    let mut cmd = rig.dev.agent_command();
    cmd.args(["consent", "accept"]);
    let out = ddi_tests::harness::run_with_timeout(cmd, Duration::from_secs(20)).unwrap();
    assert_eq!(out.code, Some(0), "{}", out.describe());
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert!(rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());
    assert!(rig.status_json()["pending_consent"].is_null());
    rig.dev.reboot().unwrap();
    rig.once_expect(0);
    assert_eq!(rig.status(action), ActionStatus::Finished);

    // A forced update does not wait.
    let forced = rig.deploy(&Image::good("9.3", IMAGE_SIZE), &Assignment::forced());
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert!(rig.server.action(forced).unwrap().active);
}

#[test]
fn consent_without_a_waiting_action_is_refused() {
    let rig = Rig::new();
    let mut cmd = rig.dev.agent_command();
    cmd.args(["consent", "accept"]);
    let out = ddi_tests::harness::run_with_timeout(cmd, Duration::from_secs(20)).unwrap();
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("no action is waiting"),
        "{}",
        out.describe()
    );
}

#[test]
fn auto_consent_confirms_on_its_own() {
    let rig = Rig::new();
    let image = Image::good("9.1", IMAGE_SIZE);
    let mut how = Assignment::forced();
    how.confirmation_required = true;
    let action = rig.deploy(&image, &how);
    rig.once_expect(0);
    assert_ne!(rig.status(action), ActionStatus::WaitForConfirmation);
}

#[test]
fn config_data_is_sent_when_requested() {
    let rig = Rig::new();
    rig.once_expect(0);
    let t = rig.server.target(TARGET).unwrap().target;
    assert_eq!(
        t.attributes.get("booted_slot").map(String::as_str),
        Some("A")
    );
    assert_eq!(
        t.attributes.get("running_version").map(String::as_str),
        Some("1.0")
    );
    assert!(!t.request_attributes);
    // Asked again by the operator: sent again.
    rig.server
        .shared()
        .update(|s| s.targets.get_mut(TARGET).unwrap().attributes.clear());
    rig.server.request_attributes(TARGET).unwrap();
    rig.once_expect(0);
    let t = rig.server.target(TARGET).unwrap().target;
    assert_eq!(
        t.attributes.get("hw_revision").map(String::as_str),
        Some("sim-1")
    );
}

#[test]
fn a_version_id_hawkbit_would_refuse_is_sent_sanitised() {
    let rig = Rig::new();
    // `~` is common in Debian-style versions and outside hawkBit's attribute pattern: sent as is,
    // the whole configData PUT is refused (400) on every poll.
    std::fs::write(rig.dev.os_release_path(), "ID=x\nVERSION_ID=\"1.0~rc1\"\n").unwrap();
    rig.once_expect(0);
    let t = rig.server.target(TARGET).unwrap().target;
    assert_eq!(
        t.attributes.get("running_version").map(String::as_str),
        Some("1.0_rc1")
    );
    assert!(!t.request_attributes, "attributes accepted");
}

#[test]
fn wrong_token_fails_the_cycle_without_leaking_it() {
    let rig = Rig::with(ServerOptions::default(), |o| {
        o.target_token = format!("{TOKEN}-wrong");
    });
    let out = rig.once_expect(2);
    assert!(
        out.stderr.contains("authentication failed"),
        "{}",
        out.describe()
    );
    assert!(!out.stderr.contains("wrong"), "{}", out.describe());
}

#[test]
fn unknown_config_key_exits_3() {
    let rig = Rig::with(ServerOptions::default(), |o| {
        o.agent_extra = "no_such_key = 1\n".into();
    });
    let out = rig.once_expect(3);
    assert!(out.stderr.contains("no_such_key"), "{}", out.describe());
}

#[test]
fn overload_answers_are_retried_after_retry_after() {
    let rig = Rig::new();
    for code in [429, 503] {
        rig.server.add_fault(
            Fault::new(FaultKind::Status {
                code,
                retry_after_secs: Some(1),
            })
            .on(Endpoint::Poll)
            .times(2),
        );
        let out = rig.once_expect(0);
        assert!(
            out.elapsed >= Duration::from_secs(2),
            "Retry-After not honoured: {:?}",
            out.elapsed
        );
    }
}

#[test]
fn malformed_poll_answer_fails_the_cycle() {
    let rig = Rig::new();
    rig.server
        .add_fault(Fault::new(FaultKind::MalformedJson).on(Endpoint::Poll));
    let out = rig.once_expect(2);
    assert!(out.stderr.contains("malformed"), "{}", out.describe());
    rig.server.clear_faults();
    rig.once_expect(0);
    // A broken deployment body is refused for good: see `refused_deployment`.
}

#[test]
fn hash_mismatch_fails_without_activation() {
    use ddi_sim::{Fault, FaultKind};
    let rig = Rig::new();
    rig.server.add_fault(Fault::new(FaultKind::WrongHash));
    let action = rig.deploy(&Image::good("10.0", IMAGE_SIZE), &Assignment::forced());
    rig.once_expect(1);
    assert_eq!(rig.status(action), ActionStatus::Error);
    assert_eq!(rig.env("bootctl_slot").as_deref(), Some("A"));
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
}

#[test]
fn owed_feedback_survives_an_outage_and_410_ends_it() {
    let rig = Rig::new();
    let action = rig.deploy(&Image::good("11.0", IMAGE_SIZE), &Assignment::forced());
    rig.once_expect(0);
    rig.dev.take_reboot_requests().unwrap();
    rig.dev.reboot().unwrap();
    // The server is down for feedback: the slot is confirmed locally, the closed is owed.
    rig.server.add_fault(
        Fault::new(FaultKind::Status {
            code: 503,
            retry_after_secs: Some(0),
        })
        .on(Endpoint::DeploymentFeedback),
    );
    rig.once_expect(2);
    assert_eq!(rig.env("upgrade_available").as_deref(), Some("0"));
    assert_eq!(rig.status_json()["feedback_owed"], 1);
    assert!(rig.closed(action).is_empty());
    rig.server.clear_faults();
    rig.once_expect(0);
    assert_eq!(rig.closed(action).len(), 1);
    assert_eq!(rig.status(action), ActionStatus::Finished);

    // Closed on the server meanwhile (force quit): 410 ends the owed feedback.
    let rig = Rig::new();
    let action = rig.deploy(&Image::good("12.0", IMAGE_SIZE), &Assignment::forced());
    rig.once_expect(0);
    rig.dev.take_reboot_requests().unwrap();
    rig.server.cancel(action).unwrap();
    rig.server.force_quit(action).unwrap();
    rig.dev.reboot().unwrap();
    rig.once_expect(0);
    assert_eq!(rig.status_json()["feedback_owed"], 0);
    assert_eq!(rig.status(action), ActionStatus::Canceled);
}

#[test]
fn works_with_old_and_new_hawkbit_versions() {
    for version in ["0.3.0M7", "0.3.0", "0.9.0", "0.10.0", "1.0.0", "head"] {
        let v: HawkbitVersion = version.parse().unwrap();
        let rig = Rig::with(ServerOptions::default().version(v), |_| {});
        let action = full_update(&rig, &Assignment::forced());
        assert_eq!(rig.status(action), ActionStatus::Finished, "{version}");
    }
}

#[test]
fn a_second_agent_is_refused_while_one_runs() {
    let rig = Rig::new();
    let daemon = rig.spawn_run();
    // Wait until the daemon holds the lock (it polls right away).
    assert!(ddi_tests::harness::wait_until(
        Duration::from_secs(20),
        Duration::from_millis(100),
        || rig.poll_count() > 0
    ));
    let out = rig.once_expect(2);
    assert!(
        out.stderr.contains("another ddi-agent"),
        "{}",
        out.describe()
    );
    // SIGTERM stops the daemon cleanly.
    stop_run(daemon);
}

#[test]
fn gateway_token_authenticates_and_registers_the_device() {
    let rig = Rig::with(ServerOptions::default().gateway_token("gw-key"), |_| {});
    let text = rig.dev.config_text().replace(
        &format!("target_token = \"{TOKEN}\""),
        "gateway_token = \"gw-key\"",
    );
    std::fs::write(rig.dev.config_path(), text).unwrap();
    let action = full_update(&rig, &Assignment::forced());
    assert_eq!(rig.status(action), ActionStatus::Finished);
}

#[test]
fn both_tokens_in_the_config_exit_3() {
    let rig = Rig::new();
    let text = rig.dev.config_text().replace(
        &format!("target_token = \"{TOKEN}\""),
        &format!("target_token = \"{TOKEN}\"\ngateway_token = \"other\""),
    );
    std::fs::write(rig.dev.config_path(), text).unwrap();
    let out = rig.once_expect(3);
    assert!(out.stderr.contains("gateway_token"), "{}", out.describe());
}

#[test]
fn daemon_polls_installs_and_confirms_across_a_restart() {
    let rig = Rig::new();
    let image = Image::good("13.0", IMAGE_SIZE);
    let action = rig.deploy(&image, &Assignment::forced());
    let daemon = rig.spawn_run();
    assert!(
        ddi_tests::harness::wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
            rig.dev.reboot_marker_path().exists()
        }),
        "the daemon never asked for a reboot"
    );
    stop_run(daemon);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
    let daemon = rig.spawn_run();
    let done =
        ddi_tests::harness::wait_until(Duration::from_secs(60), Duration::from_millis(100), || {
            rig.status(action) == ActionStatus::Finished
        });
    stop_run(daemon);
    assert!(done, "the daemon never confirmed the update");
    assert_eq!(rig.closed(action).len(), 1);
}

#[test]
fn cancel_during_a_slow_download_stops_it() {
    let rig = Rig::new();
    rig.server.add_fault(
        Fault::new(FaultKind::Slow {
            bytes_per_sec: 50 * 1024,
        })
        .on(Endpoint::Download),
    );
    let image = Image::good("14.0", IMAGE_SIZE);
    let action = rig.deploy(&image, &Assignment::forced());
    let mut cmd = rig.dev.agent_command();
    cmd.arg("once");
    let agent = ddi_tests::harness::Background::spawn(cmd).unwrap();
    assert!(ddi_tests::harness::wait_until(
        Duration::from_secs(20),
        Duration::from_millis(50),
        || rig.status(action) == ActionStatus::Retrieved
    ));
    std::thread::sleep(Duration::from_millis(500));
    rig.server.cancel(action).unwrap();
    let out = agent.stop_after(Duration::from_secs(30)).unwrap();
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.elapsed < Duration::from_secs(5),
        "the download was not stopped: {:?}",
        out.elapsed
    );
    assert_eq!(rig.status(action), ActionStatus::Canceled);
    assert_eq!(rig.env("bootctl_slot").as_deref(), Some("A"));
    assert!(!rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
    assert_eq!(rig.status_json()["last_result"]["result"], "canceled");
}

#[test]
fn unreachable_server_exits_2() {
    let rig = Rig::new();
    // A port nobody listens on (bound, then released).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = rig
        .dev
        .config_text()
        .replace(&rig.server.url(), &format!("http://127.0.0.1:{port}"))
        .replace("[server]\n", "[server]\nretries = 2\n");
    std::fs::write(rig.dev.config_path(), text).unwrap();
    let out = rig.once_expect(2);
    assert!(out.stderr.contains("cannot connect"), "{}", out.describe());
}

#[test]
fn proxy_from_the_environment_is_used() {
    let rig = Rig::new();
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let text = rig
        .dev
        .config_text()
        .replace("[server]\n", "[server]\nretries = 1\n");
    std::fs::write(rig.dev.config_path(), text).unwrap();
    // Through a proxy that is down, the cycle fails; without it, it works.
    let mut cmd = rig.dev.agent_command();
    cmd.arg("once")
        .env("http_proxy", format!("http://127.0.0.1:{closed_port}"))
        .env("HTTP_PROXY", format!("http://127.0.0.1:{closed_port}"))
        .env_remove("NO_PROXY")
        .env_remove("no_proxy");
    let out = ddi_tests::harness::run_with_timeout(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(out.code, Some(2), "{}", out.describe());
    let mut cmd = rig.dev.agent_command();
    cmd.arg("once")
        .env_remove("http_proxy")
        .env_remove("HTTP_PROXY")
        .env_remove("ALL_PROXY")
        .env_remove("all_proxy");
    let out = ddi_tests::harness::run_with_timeout(cmd, Duration::from_secs(30)).unwrap();
    assert_eq!(out.code, Some(0), "{}", out.describe());
}

#[test]
fn trace_logs_never_contain_the_token() {
    let rig = Rig::new();
    let action = rig.deploy(&Image::good("16.0", IMAGE_SIZE), &Assignment::forced());
    let run = || {
        let mut cmd = rig.dev.agent_command();
        cmd.arg("once").env("DDI_AGENT_LOG", "trace");
        let out = ddi_tests::harness::run_with_timeout(cmd, Duration::from_secs(60)).unwrap();
        assert_eq!(out.code, Some(0), "{}", out.describe());
        assert!(out.stderr.contains("TRACE") || out.stderr.contains("DEBUG"));
        assert!(!out.stderr.contains(TOKEN), "token in the trace log");
    };
    run();
    rig.dev.take_reboot_requests().unwrap();
    rig.dev.reboot().unwrap();
    run();
    assert_eq!(rig.status(action), ActionStatus::Finished);
}

#[test]
fn long_polling_intervals_parse_in_both_formats() {
    for version in ["0.9.0", "0.10.0", "head"] {
        let v: HawkbitVersion = version.parse().unwrap();
        let rig = Rig::with(ServerOptions::default().version(v), |_| {});
        // 25 h 30 min: ISO-8601 since 0.10.0, capped HH:mm:ss before.
        rig.server
            .set_polling(Duration::from_secs(25 * 3600 + 1800));
        let action = rig.deploy(&Image::good("17.0", IMAGE_SIZE), &Assignment::forced());
        rig.once_expect(0);
        assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1, "{version}");
        assert!(rig.server.action(action).unwrap().active);
    }
}

#[test]
fn rauc_scheme_updates_and_confirms() {
    let rig = Rig::with(ServerOptions::default(), |o| {
        o.scheme = bootctl::scheme::SchemeKind::Rauc;
        o.initial_env.retain(|(name, _)| name != "bootctl_slot");
    });
    let image = Image::good("18.0", IMAGE_SIZE);
    let action = rig.deploy(&image, &Assignment::forced());
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert_eq!(rig.env("BOOT_ORDER").as_deref(), Some("B A"));
    assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
    rig.once_expect(0);
    assert_eq!(rig.status(action), ActionStatus::Finished);
    assert_eq!(rig.env("BOOT_B_LEFT").as_deref(), Some("3"));

    // A broken image on the rauc scheme: marked bad (removed from BOOT_ORDER), back to B.
    let broken = Image::broken("19.0", IMAGE_SIZE);
    let action = rig.deploy(&broken, &Assignment::forced());
    rig.once_expect(0);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
    assert_eq!(rig.dev.reboot().unwrap(), Slot::A);
    rig.once_expect(1);
    assert_eq!(rig.env("BOOT_ORDER").as_deref(), Some("B"));
    assert_eq!(rig.dev.reboot().unwrap(), Slot::B);
    assert_eq!(rig.status(action), ActionStatus::Error);
}

#[test]
fn refused_attributes_do_not_block_an_update() {
    let rig = Rig::new();
    rig.server.add_fault(
        Fault::new(FaultKind::Status {
            code: 400,
            retry_after_secs: None,
        })
        .on(Endpoint::ConfigData),
    );
    rig.deploy(&Image::good("20.0", IMAGE_SIZE), &Assignment::forced());
    let out = rig.once_expect(0);
    assert!(out.stderr.contains("configData"), "{}", out.describe());
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 1);
}

#[test]
fn run_keeps_a_floor_between_polls_when_the_server_says_sleep_zero() {
    let rig = Rig::new();
    rig.server.set_polling(Duration::ZERO);
    let daemon = rig.spawn_run();
    assert!(ddi_tests::harness::wait_until(
        Duration::from_secs(20),
        Duration::from_millis(20),
        || rig.poll_count() > 0
    ));
    let first = rig.poll_count();
    // The floor is 5 s plus up to 2.5 s of jitter: in 9 s after the first poll exactly one
    // more comes (a tight loop would make hundreds).
    std::thread::sleep(Duration::from_secs(9));
    let polls = rig.poll_count() - first;
    let out = stop_run(daemon);
    assert_eq!(
        polls,
        1,
        "polls in 9 s after the first:\n{}",
        out.describe()
    );
}

/// A deployment whose deploymentBase the agent must refuse: answered `closed`/`failure` naming
/// the reason, nothing written or activated, never answered twice.
fn refused_deployment(fault: FaultKind, reason: &str) {
    let rig = Rig::new();
    rig.server
        .add_fault(Fault::new(fault).on(Endpoint::DeploymentBase));
    let image = Image::good("2.0", IMAGE_SIZE);
    let action = rig.deploy(&image, &Assignment::forced());
    let env_before = std::fs::read(rig.dev.env_file_path()).unwrap();
    let slot_before = rig.dev.slot_bytes(Slot::B).unwrap();
    let out = rig.once_expect(1);
    let closed = rig.closed(action);
    assert_eq!(closed.len(), 1, "{closed:?}\n{}", out.describe());
    assert_eq!(closed[0].0, "failure");
    let details = closed[0].1.join("\n");
    assert!(
        details.contains("deployment refused") && details.contains(reason),
        "{details}"
    );
    assert_eq!(rig.status(action), ActionStatus::Error);
    assert_eq!(std::fs::read(rig.dev.env_file_path()).unwrap(), env_before);
    assert_eq!(rig.dev.slot_bytes(Slot::B).unwrap(), slot_before);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
    // The next cycle has nothing left to answer.
    rig.once_expect(0);
    assert_eq!(rig.closed(action).len(), 1);
}

#[test]
fn a_deployment_with_broken_json_is_answered_failure_once() {
    refused_deployment(FaultKind::MalformedJson, "malformed deployment body");
}

#[test]
fn a_deployment_with_a_negative_size_is_answered_failure_once() {
    refused_deployment(
        FaultKind::SetJson {
            pointer: "/deployment/chunks/0/artifacts/0/size".into(),
            value: serde_json::json!(-1),
        },
        "invalid value: integer `-1`",
    );
}

#[test]
fn a_deployment_with_an_unknown_handling_is_answered_failure_once() {
    refused_deployment(
        FaultKind::SetJson {
            pointer: "/deployment/update".into(),
            value: serde_json::json!("sometimes"),
        },
        "unknown variant `sometimes`",
    );
}

#[test]
fn a_deployment_with_too_many_chunks_is_answered_failure_once() {
    let chunk = serde_json::json!({"part": "app", "version": "1", "name": "x", "artifacts": []});
    refused_deployment(
        FaultKind::SetJson {
            pointer: "/deployment/chunks".into(),
            value: serde_json::Value::Array(vec![chunk; 65]),
        },
        "65 chunks",
    );
}

#[test]
fn a_deployment_body_over_the_limit_is_answered_failure_once() {
    refused_deployment(
        FaultKind::SetJson {
            pointer: "/padding".into(),
            value: serde_json::json!("x".repeat(1 << 20)),
        },
        "larger than 1048576 bytes",
    );
}

/// Both environment copies overwritten with garbage (CRCs fail): U-Boot would use its built-in
/// default environment. Returns the garbage written.
fn corrupt_both_env_copies(rig: &Rig) -> Vec<u8> {
    let garbage = vec![0xA5u8; 2 * ddi_tests::device::ENV_SIZE];
    std::fs::write(rig.dev.env_file_path(), &garbage).unwrap();
    garbage
}

#[test]
fn with_no_valid_environment_a_pending_action_is_refused_and_nothing_is_written() {
    let rig = Rig::new();
    let image = Image::good("2.0", IMAGE_SIZE);
    let action = rig.deploy(&image, &Assignment::forced());
    let garbage = corrupt_both_env_copies(&rig);
    let slot_before = rig.dev.slot_bytes(Slot::B).unwrap();
    let out = rig.once_expect(2);
    assert!(
        out.stderr.contains("boot environment unusable")
            && out.stderr.contains("no valid U-Boot environment copy"),
        "{}",
        out.describe()
    );
    let closed = rig.closed(action);
    assert_eq!(closed.len(), 1, "{closed:?}\n{}", out.describe());
    assert_eq!(closed[0].0, "failure");
    let details = closed[0].1.join("\n");
    assert!(
        details.contains("boot environment unusable, nothing installed")
            && details.contains("no valid U-Boot environment copy"),
        "{details}"
    );
    assert_eq!(rig.status(action), ActionStatus::Error);
    // Every later cycle polls and fails the same way; nothing is answered twice.
    rig.once_expect(2);
    assert_eq!(rig.closed(action).len(), 1);
    assert_eq!(std::fs::read(rig.dev.env_file_path()).unwrap(), garbage);
    assert_eq!(rig.dev.slot_bytes(Slot::B).unwrap(), slot_before);
    assert_eq!(rig.dev.take_reboot_requests().unwrap(), 0);
}

#[test]
fn with_no_valid_environment_and_no_action_the_agent_still_polls_and_says_why() {
    let rig = Rig::new();
    let garbage = corrupt_both_env_copies(&rig);
    let out = rig.once_expect(2);
    assert!(
        out.stderr
            .contains("cycle not completed: boot environment unusable")
            && out.stderr.contains("no valid U-Boot environment copy"),
        "{}",
        out.describe()
    );
    assert_eq!(rig.poll_count(), 1);
    // `run` polls too instead of retrying its start silently.
    let daemon = rig.spawn_run();
    let polled =
        ddi_tests::harness::wait_until(Duration::from_secs(20), Duration::from_millis(50), || {
            rig.poll_count() > 1
        });
    let out = stop_run(daemon);
    assert!(polled, "run never polled:\n{}", out.describe());
    assert!(
        out.stderr.contains("boot environment unusable"),
        "{}",
        out.describe()
    );
    assert_eq!(std::fs::read(rig.dev.env_file_path()).unwrap(), garbage);
}

#[test]
fn run_reports_and_retries_a_reboot_that_does_not_happen() {
    let rig = Rig::new();
    // The device's reboot_command exits 0 and only leaves a marker line: the system stays up.
    let text = rig
        .dev
        .config_text()
        .replace("\n[agent]\n", "reboot_timeout = 2\n\n[agent]\n");
    std::fs::write(rig.dev.config_path(), text).unwrap();
    let action = rig.deploy(&Image::good("2.0", IMAGE_SIZE), &Assignment::forced());
    let reboots = || {
        std::fs::read_to_string(rig.dev.reboot_marker_path())
            .map(|t| t.lines().count())
            .unwrap_or(0)
    };
    let daemon = rig.spawn_run();
    let retried =
        ddi_tests::harness::wait_until(Duration::from_secs(60), Duration::from_millis(50), || {
            reboots() >= 2
        });
    let out = stop_run(daemon);
    assert!(
        retried,
        "reboot_command ran {} time(s):\n{}",
        reboots(),
        out.describe()
    );
    let report = "did not reboot within 2 s after reboot_command";
    assert!(out.stderr.contains(report), "{}", out.describe());
    let reported = rig
        .server
        .feedback(action)
        .iter()
        .any(|f| f.details().iter().any(|d| d.contains(report)));
    assert!(reported, "{:?}", rig.feedback(action));
    // Still waiting for the reboot into the activated slot: nothing closed.
    assert!(rig.closed(action).is_empty());
    assert_eq!(rig.env("bootctl_slot").as_deref(), Some("B"));
    assert_eq!(rig.status_json()["phase"], "awaiting_reboot");
}
