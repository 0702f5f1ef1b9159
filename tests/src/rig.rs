//! The common start of the integration tests: a test server (`ddi_sim`) that knows one target,
//! a file-backed device configured for it, and the agent binary run against both. Test modules
//! wrap [`Rig`] with the views and checks of their own.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ddi_sim::{Assignment, ServerOptions, TestServer};

use crate::demo::{closed_result, summary};
use crate::device::{DeviceOptions, FileDevice, Image};
use crate::harness::{run_with_timeout, CommandOutput};

/// How long one `ddi-agent once` may take before the test calls it hung.
pub const ONCE_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Rig {
    pub server: TestServer,
    pub dev: FileDevice,
    /// The controller id the server knows the device by.
    pub target: String,
    /// The agent binary [`Rig::command`] runs: this workspace's, unless a test installs another
    /// one (an earlier release, for the state format across versions).
    pub agent: PathBuf,
    /// Text the agent's output must never hold (a secret), checked by [`Rig::once`].
    pub never_printed: Option<String>,
}

impl Rig {
    /// A server started with `opts` that knows `target` by `token`, and a device configured for
    /// it (`change` adjusts the device's options before it is created).
    pub fn start(
        opts: ServerOptions,
        target: &str,
        token: &str,
        change: impl FnOnce(&mut DeviceOptions),
    ) -> Rig {
        let server = TestServer::start(opts);
        server.create_target(target, Some(token)).unwrap();
        let mut options = DeviceOptions::new(&server.url(), target, token);
        change(&mut options);
        let dev = FileDevice::create_temp(options).unwrap();
        Rig {
            server,
            dev,
            target: target.to_string(),
            agent: crate::bin_path("ddi-agent"),
            never_printed: None,
        }
    }

    /// `ddi-agent -c CONFIG ARGS` of the installed agent binary.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.agent);
        cmd.arg("-c")
            .arg(self.dev.config_path())
            .args(args)
            .env("NO_COLOR", "1");
        cmd
    }

    /// Runs `ddi-agent once`; the test fails when it hangs or prints [`Rig::never_printed`].
    pub fn once(&self) -> CommandOutput {
        let out = run_with_timeout(self.command(&["once"]), ONCE_TIMEOUT).unwrap();
        assert!(!out.timed_out, "agent hung:\n{}", out.describe());
        if let Some(secret) = &self.never_printed {
            assert!(
                !out.stderr.contains(secret) && !out.stdout.contains(secret),
                "token leaked into the output:\n{}",
                out.describe()
            );
        }
        out
    }

    /// [`Rig::once`], which must exit with `code`.
    pub fn once_expect(&self, code: i32) -> CommandOutput {
        let out = self.once();
        assert_eq!(out.code, Some(code), "{}", out.describe());
        out
    }

    /// Deploys `image` (as `os.img`) to the target; returns the action id.
    pub fn deploy(&self, image: &Image, how: &Assignment) -> u64 {
        self.server
            .deploy(
                &self.target,
                &image.header.version,
                "os.img",
                image.bytes.clone(),
                how,
            )
            .unwrap()
    }

    /// Deploys `artifact` as `filename` of software version `version`, forced; returns the
    /// action id.
    pub fn deploy_artifact(&self, version: &str, filename: &str, artifact: Vec<u8>) -> u64 {
        self.server
            .deploy(
                &self.target,
                version,
                filename,
                artifact,
                &Assignment::forced(),
            )
            .unwrap()
    }

    /// Runs `ddi-agent once` with the device's own agent, rebooting the device whenever the
    /// agent asks, until `action` is closed (at most four runs).
    pub fn settle(&self, action: u64) {
        for _ in 0..4 {
            let out = self.dev.agent_once(ONCE_TIMEOUT).unwrap();
            assert!(!out.timed_out, "agent hung: {}", out.describe());
            if self.dev.take_reboot_requests().unwrap() > 0 {
                self.dev.reboot().unwrap();
                continue;
            }
            if closed_result(&self.server.action(action).unwrap()).is_some() {
                return;
            }
        }
        panic!(
            "action {action} never closed: {}",
            summary(&self.server.action(action).unwrap())
        );
    }

    /// Runs `ddi-agent once` (the rig's agent) and kills it (-9) as soon as it wrote a
    /// download resume record; returns the record.
    pub fn kill_at_the_first_resume_record(&self) -> serde_json::Value {
        self.kill_at_a_resume_record(|_| true)
    }

    /// Runs `ddi-agent once` (the rig's agent) and kills it (-9) as soon as the download
    /// resume record is one `wanted` accepts; returns that record.
    pub fn kill_at_a_resume_record(
        &self,
        wanted: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let record_path = self.dev.state_dir().join("download.resume");
        let mut agent = crate::harness::Background::spawn(self.command(&["once"])).unwrap();
        // A hang guard only: a debug-built agent decoding and hashing beside the suite's
        // other agents on two cores took more than 30 s to its first record.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            // Records are replaced by a rename: a read sees one whole record or none.
            let record = std::fs::read(&record_path)
                .ok()
                .and_then(|text| serde_json::from_slice::<serde_json::Value>(&text).ok());
            if let Some(record) = record.filter(|r| wanted(r)) {
                agent.stop().unwrap(); // kill -9
                                       // The record may have moved on between the read and the kill.
                return serde_json::from_slice(&std::fs::read(&record_path).unwrap())
                    .unwrap_or(record);
            }
            if let Some(code) = agent.try_exit().unwrap() {
                // Say how it ended: an install without resume points, or a failure.
                let (stdout, stderr) = agent.output_so_far();
                let tail = |text: &str| {
                    let lines: Vec<&str> = text.lines().collect();
                    lines[lines.len().saturating_sub(20)..].join("\n")
                };
                panic!(
                    "agent finished (exit {code:?}) before the resume record wanted \
                     (record now: {}); its last output:\n{}\n{}",
                    std::fs::read_to_string(&record_path).unwrap_or_else(|_| "none".into()),
                    tail(stdout),
                    tail(stderr)
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the resume record wanted never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A variable of the device's U-Boot environment.
    pub fn env(&self, name: &str) -> Option<String> {
        self.dev.env_map().unwrap().get(name).cloned()
    }
}
