//! The management interface of the test server: HTTP (`/mgmt`, via `MgmtClient`), the `ddi-sim`
//! command line, and the state file.

use crate::common::*;
use ddi_sim::client::MgmtClient;
use ddi_sim::model::now_ms;
use ddi_sim::{
    ActionStatus, ActionType, ActionView, Assignment, Fault, FaultKind, MaintenanceWindow,
    ServerOptions, TestServer,
};
use std::io::BufRead;
use std::process::{Command, Stdio};

#[test]
fn management_over_http_covers_every_assignment_kind() {
    let e = env();
    let c = MgmtClient::new(&e.server.url());
    let t = c.create_target("dev-02", Some("tok-02")).unwrap();
    assert_eq!(t.target.token.as_deref(), Some("tok-02"));
    let generated = c
        .create_target("dev-03", None)
        .unwrap()
        .target
        .token
        .unwrap();
    assert_eq!(generated.len(), 32);
    assert!(generated.chars().all(|ch| ch.is_ascii_alphanumeric()));
    let err = c.create_target("dev-02", None).unwrap_err().to_string();
    assert!(
        err.contains("409") && err.contains("already exists"),
        "{err}"
    );

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("image.bin");
    std::fs::write(&file, vec![3u8; 300_000]).unwrap();
    let m = c.create_module("os", "fw", "2.0").unwrap();
    let uploaded = c.upload(m, "image.bin", &file).unwrap();
    assert_eq!(uploaded.size, 300_000);
    let m2 = c.create_module("os", "fw-linked", "2.0").unwrap();
    let linked = c.link_file(m2, "linked.bin", &file).unwrap();
    assert_eq!(linked.sha256, uploaded.sha256);
    let ds = c.create_distribution("fw", "2.0", &[m]).unwrap();

    let now = now_ms();
    let window = MaintenanceWindow {
        start_ms: now + 3_600_000,
        duration_ms: 60_000,
        every_ms: Some(86_400_000),
    };
    let kinds = [
        (
            Assignment::forced(),
            ActionType::Forced,
            ActionStatus::Running,
        ),
        (Assignment::soft(), ActionType::Soft, ActionStatus::Running),
        (
            Assignment::time_forced(now + 60_000),
            ActionType::Timeforced,
            ActionStatus::Running,
        ),
        (
            Assignment::download_only(),
            ActionType::Downloadonly,
            ActionStatus::Running,
        ),
        (
            Assignment::forced().with_maintenance(window),
            ActionType::Forced,
            ActionStatus::Running,
        ),
        (
            Assignment::soft().with_confirmation(),
            ActionType::Soft,
            ActionStatus::WaitForConfirmation,
        ),
    ];
    let mut ids = Vec::new();
    for (how, ty, status) in &kinds {
        let id = c.assign(CID, ds, how).unwrap();
        let a = c.action(id).unwrap();
        assert_eq!((a.action_type, a.status), (*ty, *status), "{how:?}");
        assert_eq!(a.maintenance, how.maintenance);
        ids.push(id);
    }
    // Each assignment canceled the previous one.
    let actions = c.target_actions(CID).unwrap();
    assert_eq!(
        actions
            .iter()
            .filter(|a| a.status == ActionStatus::Canceling)
            .count(),
        kinds.len() - 1
    );
    assert!(c
        .assign("nobody", ds, &Assignment::forced())
        .unwrap_err()
        .to_string()
        .contains("404"));
    assert!(c
        .assign(CID, 9999, &Assignment::forced())
        .unwrap_err()
        .to_string()
        .contains("404"));

    // The device downloads what was uploaded over HTTP.
    let last = *ids.last().unwrap();
    c.cancel(last, false).unwrap();
    assert_eq!(c.action(last).unwrap().status, ActionStatus::Canceling);
    c.cancel(last, true).unwrap();
    assert_eq!(c.action(last).unwrap().status, ActionStatus::Canceled);

    let fault = c
        .add_fault(
            &Fault::new(FaultKind::Status {
                code: 503,
                retry_after_secs: Some(1),
            })
            .once(),
        )
        .unwrap();
    assert_eq!(c.faults().unwrap()[0].id, fault);
    assert_eq!(e.get("").status(), 503);
    c.add_fault(&Fault::new(FaultKind::MalformedJson)).unwrap();
    c.clear_faults().unwrap();
    assert!(c.faults().unwrap().is_empty());

    let cfg = c
        .update_config(serde_json::json!({"polling_ms": 42_000}))
        .unwrap();
    assert_eq!(cfg.polling_ms, 42_000);
    assert_eq!(e.poll()["config"]["polling"]["sleep"], "00:00:42");
    assert!(c.update_config(serde_json::json!({"no_such": 1})).is_err());
    c.request_attributes(CID).unwrap();
    c.set_auto_confirm(CID, true).unwrap();
    assert!(c.target(CID).unwrap().target.auto_confirm.is_some());
}

#[test]
fn uploaded_artifact_is_downloadable_by_the_device() {
    let e = env();
    let c = MgmtClient::new(&e.server.url());
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("image.bin");
    let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    std::fs::write(&file, &data).unwrap();
    let m = c.create_module("os", "fw", "3").unwrap();
    c.upload(m, "image.bin", &file).unwrap();
    let ds = c.create_distribution("fw", "3", &[m]).unwrap();
    let id = c.assign(CID, ds, &Assignment::forced()).unwrap();
    let body = e
        .auth(e.http.get(e.download_href(id)))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert!(body.as_ref() == &data[..]);
    assert_eq!(e.feedback(id, "closed", "success").status(), 200);
    let a: ActionView = c.action(id).unwrap();
    assert_eq!(a.result(), Some("success"));
    assert_eq!(a.feedback[0].execution(), Some("closed"));
    assert_eq!(
        c.target(CID).unwrap().installed_version.as_deref(),
        Some("fw 3")
    );
}

#[test]
fn state_file_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let opts = ServerOptions {
        state_file: Some(state.clone()),
        ..ServerOptions::default()
    };
    let id = {
        let s = TestServer::start(opts.clone());
        s.create_target(CID, Some(TOKEN)).unwrap();
        s.deploy(
            CID,
            "1.0",
            "fw.bin",
            b"persisted".to_vec(),
            &Assignment::forced(),
        )
        .unwrap()
    };
    assert!(state.is_file());
    let s = TestServer::start(opts);
    let a = s.action(id).unwrap();
    assert_eq!((a.status, a.target.as_str()), (ActionStatus::Running, CID));
    let http = reqwest::blocking::Client::new();
    let auth = format!("TargetToken {TOKEN}");
    let d: serde_json::Value = http
        .get(format!("{}/deploymentBase/{id}", s.controller_url(CID)))
        .header("Authorization", &auth)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let href = d["deployment"]["chunks"][0]["artifacts"][0]["_links"]["download-http"]["href"]
        .as_str()
        .unwrap();
    assert_eq!(
        http.get(href)
            .header("Authorization", &auth)
            .send()
            .unwrap()
            .bytes()
            .unwrap()
            .as_ref(),
        b"persisted"
    );
    // A new id does not collide with the restored ones.
    let next = s
        .deploy(CID, "2.0", "fw.bin", b"x".to_vec(), &Assignment::forced())
        .unwrap();
    assert!(next > id);
}

struct Sim {
    child: std::process::Child,
    url: String,
    /// Kept open: the server must not get EPIPE on its stdout.
    _stdout: std::io::BufReader<std::process::ChildStdout>,
}

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sim_bin() -> &'static str {
    env!("CARGO_BIN_EXE_ddi-sim")
}

fn start_sim(extra: &[&str]) -> Sim {
    let mut child = Command::new(sim_bin())
        .args(["serve", "--port", "0"])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    stdout.read_line(&mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://127.0.0.1:"))
        .unwrap()
        .trim_end_matches(',')
        .to_string();
    assert!(
        line.contains("TEST server") && line.contains("Eclipse hawkBit"),
        "{line}"
    );
    Sim {
        child,
        url,
        _stdout: stdout,
    }
}

fn sim(url: &str, args: &[&str]) -> String {
    let out = Command::new(sim_bin())
        .arg("--server")
        .arg(url)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ddi-sim {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_says_it_is_a_test_server() {
    let out = Command::new(sim_bin()).arg("--help").output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("TEST server") && text.contains("Production deployments use Eclipse hawkBit"),
        "{text}"
    );
    let out = Command::new(sim_bin())
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(String::from_utf8(out.stdout).unwrap().contains("127.0.0.1"));
}

#[test]
fn cli_drives_a_running_server() {
    let s = start_sim(&["--polling", "00:00:10", "--hawkbit-version", "1.1.0"]);
    assert_eq!(
        sim(&s.url, &["target", "create", "dev-9", "--token", "t9"]).trim(),
        "t9"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("fw.img");
    std::fs::write(&file, b"cli firmware").unwrap();
    let out = sim(
        &s.url,
        &["upload", file.to_str().unwrap(), "--version", "9.0"],
    );
    let ds = out
        .lines()
        .find_map(|l| l.strip_prefix("distribution "))
        .unwrap()
        .split(':')
        .next()
        .unwrap()
        .to_string();
    let mut ids = Vec::new();
    for args in [
        vec!["--type", "forced"],
        vec!["--type", "soft"],
        vec!["--type", "timeforced", "--forced-in", "60"],
        vec!["--type", "downloadonly"],
        vec![
            "--maintenance-start-in",
            "3600",
            "--maintenance-duration",
            "600",
        ],
        vec!["--confirmation-required"],
    ] {
        let mut cmd = vec!["assign", "dev-9", ds.as_str()];
        cmd.extend(args.iter());
        ids.push(sim(&s.url, &cmd).trim().parse::<u64>().unwrap());
    }
    let c = MgmtClient::new(&s.url);
    let types: Vec<ActionType> = ids
        .iter()
        .map(|id| c.action(*id).unwrap().action_type)
        .collect();
    assert_eq!(
        types,
        [
            ActionType::Forced,
            ActionType::Soft,
            ActionType::Timeforced,
            ActionType::Downloadonly,
            ActionType::Forced,
            ActionType::Forced
        ]
    );
    let last = ids.last().unwrap().to_string();
    assert_eq!(
        c.action(ids[5]).unwrap().status,
        ActionStatus::WaitForConfirmation
    );

    // The device polls and sends feedback; the CLI shows it.
    let http = reqwest::blocking::Client::new();
    let base = format!("{}/DEFAULT/controller/v1/dev-9", s.url);
    let poll: serde_json::Value = http
        .get(&base)
        .header("Authorization", "TargetToken t9")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(poll["config"]["polling"]["sleep"], "00:00:10");
    let r = http
        .post(format!("{base}/confirmationBase/{last}/feedback"))
        .header("Authorization", "TargetToken t9")
        .header("Content-Type", "application/json")
        .body(r#"{"confirmation":"denied","details":["not now"]}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = sim(&s.url, &["action", &last]);
    assert!(
        text.contains("WAIT_FOR_CONFIRMATION") && text.contains("not now"),
        "{text}"
    );
    let json: ActionView =
        serde_json::from_str(&sim(&s.url, &["--json", "action", &last])).unwrap();
    assert_eq!(json.feedback.len(), 1);

    sim(&s.url, &["cancel", &last]);
    assert_eq!(c.action(ids[5]).unwrap().status, ActionStatus::Canceling);
    let listing = sim(&s.url, &["actions", "dev-9"]);
    assert_eq!(listing.lines().count(), 6, "{listing}");

    sim(
        &s.url,
        &[
            "fault",
            "add",
            "status",
            "503",
            "--retry-after",
            "3",
            "--times",
            "1",
        ],
    );
    let r = http
        .get(&base)
        .header("Authorization", "TargetToken t9")
        .send()
        .unwrap();
    assert_eq!(
        (
            r.status().as_u16(),
            r.headers()["retry-after"].to_str().unwrap()
        ),
        (503, "3")
    );
    sim(
        &s.url,
        &["fault", "add", "drop-after", "5", "--target", "dev-9"],
    );
    assert!(sim(&s.url, &["fault", "list"]).contains("drop_after"));
    sim(&s.url, &["fault", "clear"]);
    assert!(sim(&s.url, &["config", "--polling", "PT36H"]).contains("129600000"));
    assert!(sim(&s.url, &["target", "list"]).contains("dev-9"));
    sim(&s.url, &["target", "polling", "dev-9", "00:00:03"]);
    let poll: serde_json::Value = http
        .get(&base)
        .header("Authorization", "TargetToken t9")
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(poll["config"]["polling"]["sleep"], "00:00:03");
}

#[test]
fn target_update_status_follows_the_actions() {
    let e = env();
    let status = || e.server.target(CID).unwrap().update_status;
    assert_eq!(status(), "UNKNOWN");
    e.poll();
    assert_eq!(status(), "REGISTERED");
    let id = e.deploy(b"x", &Assignment::forced());
    assert_eq!(status(), "PENDING");
    e.feedback(id, "closed", "success");
    assert_eq!(status(), "IN_SYNC");
    let id = e.deploy(b"y", &Assignment::forced());
    e.feedback(id, "closed", "failure");
    assert_eq!(status(), "ERROR");
}

#[test]
fn uploads_over_http_are_kept_next_to_the_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sim.json");
    let opts = ServerOptions {
        state_file: Some(state.clone()),
        ..ServerOptions::default()
    };
    let file = dir.path().join("upload.bin");
    std::fs::write(&file, b"uploaded bytes").unwrap();
    let action = {
        let s = TestServer::start(opts.clone());
        s.create_target(CID, Some(TOKEN)).unwrap();
        let c = MgmtClient::new(&s.url());
        let m = c.create_module("os", "fw", "1").unwrap();
        c.upload(m, "upload.bin", &file).unwrap();
        let ds = c.create_distribution("fw", "1", &[m]).unwrap();
        c.assign(CID, ds, &Assignment::forced()).unwrap()
    };
    std::fs::remove_file(&file).unwrap();
    assert!(dir.path().join("sim.json.d").is_dir());
    let s = TestServer::start(opts);
    let http = reqwest::blocking::Client::new();
    let auth = format!("TargetToken {TOKEN}");
    let d: serde_json::Value = http
        .get(format!("{}/deploymentBase/{action}", s.controller_url(CID)))
        .header("Authorization", &auth)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let href = d["deployment"]["chunks"][0]["artifacts"][0]["_links"]["download-http"]["href"]
        .as_str()
        .unwrap();
    let body = http
        .get(href)
        .header("Authorization", &auth)
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(body.as_ref(), b"uploaded bytes");
}
