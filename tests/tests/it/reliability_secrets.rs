//! Credentials stay secret: the real `ddi-agent`, with trace logging of every module, runs a
//! whole update against the test server and its output never contains the target token; and an
//! artifact link or a DDI link (deploymentBase, ...) on another host gets no token unless
//! `send_token_to_other_hosts` says so.
//!
//! Needs `cargo build --workspace --bins` first.

use std::time::Duration;

use ddi_sim::{Assignment, ServerOptions, TestServer};
use ddi_tests::demo::{closed_result, ended_as, summary};
use ddi_tests::device::{DeviceOptions, FileDevice, Image};

/// Long and unusual, so that any leak (even a substring of it) is unmistakable.
const TOKEN: &str = "s3cr3t-T0KEN-7f4e9a1c0b2d8e6f5a3c";
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `once` (following reboot requests) until the action closes; returns all output.
fn run_to_close(device: &FileDevice, server: &TestServer, action: u64) -> String {
    let mut output = String::new();
    for _ in 0..6 {
        let mut cmd = device.agent_command();
        cmd.arg("once")
            .env("DDI_AGENT_LOG", "trace")
            .env("RUST_LOG", "trace");
        let out = ddi_tests::harness::run_with_timeout(cmd, AGENT_TIMEOUT).unwrap();
        assert!(!out.timed_out, "agent hung: {}", out.describe());
        output.push_str(&out.stdout);
        output.push_str(&out.stderr);
        if device.take_reboot_requests().unwrap() > 0 {
            device.reboot().unwrap();
            continue;
        }
        let view = server.action(action).unwrap();
        if closed_result(&view).is_some() && !view.active {
            break;
        }
    }
    output
}

fn device_for(server: &TestServer, controller: &str, extra: &str) -> FileDevice {
    server.create_target(controller, Some(TOKEN)).unwrap();
    let mut options = DeviceOptions::new(&server.url(), controller, TOKEN);
    options.agent_extra = extra.to_string();
    let device = FileDevice::create_temp(options).unwrap();
    device.reboot().unwrap();
    device
}

#[test]
fn the_token_never_appears_in_trace_logs() {
    let server = TestServer::start(ServerOptions::default().polling(Duration::from_secs(1)));
    let device = device_for(&server, "secret-logs", "");
    let image = Image::good("2.0", 256 * 1024);
    let action = server
        .deploy(
            "secret-logs",
            "2.0",
            "os.img",
            image.bytes.clone(),
            &Assignment::forced(),
        )
        .unwrap();
    let output = run_to_close(&device, &server, action);
    let view = server.action(action).unwrap();
    assert!(ended_as(&view, "success"), "{}", summary(&view));
    // The run logged something substantial, so the absence of the token means something.
    assert!(
        output.lines().count() > 10,
        "trace logging produced almost nothing:\n{output}"
    );
    for probe in [TOKEN, &TOKEN[..12], &TOKEN[TOKEN.len() - 12..]] {
        assert!(
            !output.contains(probe),
            "the token (or part of it: {probe:?}) appears in the agent's output:\n{output}"
        );
    }
    // The token is on disk only in the config; nothing the agent writes holds it.
    for entry in walk(&device.state_dir()) {
        let bytes = std::fs::read(&entry).unwrap();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(TOKEN),
            "{} holds the token",
            entry.display()
        );
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The artifact link points at `localhost` while the agent talks to `127.0.0.1`: another
/// host. The test server refuses downloads without the target's token, so the outcome shows
/// whether the agent sent it.
fn other_host_update(controller: &str, extra: &str) -> (String, String) {
    let server = TestServer::start(ServerOptions::default().polling(Duration::from_secs(1)));
    server.configure(|c| c.download_link_host = Some("localhost".into()));
    let device = device_for(&server, controller, extra);
    let image = Image::good("2.0", 128 * 1024);
    let action = server
        .deploy(
            controller,
            "2.0",
            "os.img",
            image.bytes.clone(),
            &Assignment::forced(),
        )
        .unwrap();
    let output = run_to_close(&device, &server, action);
    let view = server.action(action).unwrap();
    (closed_result(&view).unwrap_or_default(), output)
}

#[test]
fn an_artifact_on_another_host_gets_no_token_by_default() {
    let (result, output) = other_host_update("other-host-default", "");
    assert_eq!(
        result, "failure",
        "the download on another host must have gone without the token (and been refused):\n{output}"
    );
    assert!(
        output.contains("401"),
        "the failure must be the server's refusal (401), not something else:\n{output}"
    );
}

#[test]
fn an_artifact_on_another_host_gets_the_token_when_configured() {
    let (result, output) =
        other_host_update("other-host-allowed", "send_token_to_other_hosts = true\n");
    assert_eq!(
        result, "success",
        "with send_token_to_other_hosts the download must be authorised:\n{output}"
    );
}

/// The poll answer names the action's links on `localhost` while the agent talks to
/// `127.0.0.1`: the same server under another origin, which refuses requests without the
/// target's token. Returns the action's closing result and the agent's output.
fn other_host_action_links(controller: &str, extra: &str) -> (Option<String>, String) {
    let server = TestServer::start(ServerOptions::default().polling(Duration::from_secs(1)));
    server.configure(|c| c.action_link_host = Some("localhost".into()));
    let device = device_for(&server, controller, extra);
    let image = Image::good("2.0", 128 * 1024);
    let action = server
        .deploy(
            controller,
            "2.0",
            "os.img",
            image.bytes.clone(),
            &Assignment::forced(),
        )
        .unwrap();
    let output = run_to_close(&device, &server, action);
    (closed_result(&server.action(action).unwrap()), output)
}

#[test]
fn a_deployment_link_on_another_host_gets_no_token_by_default() {
    let (result, output) = other_host_action_links("other-host-links-default", "");
    assert_eq!(
        result, None,
        "the deploymentBase on another host must have been asked without the token (and \
         refused), so the action never started:\n{output}"
    );
    assert!(
        output.contains("deploymentBase") && output.contains("401"),
        "the failure must be the server's refusal (401) of the deploymentBase request:\n{output}"
    );
}

#[test]
fn a_deployment_link_on_another_host_gets_the_token_when_configured() {
    let (result, output) = other_host_action_links(
        "other-host-links-allowed",
        "send_token_to_other_hosts = true\n",
    );
    assert_eq!(
        result.as_deref(),
        Some("success"),
        "with send_token_to_other_hosts the DDI links must be authorised:\n{output}"
    );
}
