//! Fault injection over the whole update cycle: the real `ddi-agent` against the test server
//! and a file-backed device, one randomly chosen fault per trial:
//! connection drops at random artifact offsets, clean but short bodies, 5xx and 429 storms on
//! every endpoint, feedback refused for a while, a malformed poll answer, a slow download
//! killed with -9 at a random moment, wrong hashes, an image whose health check fails, and
//! clock jumps (each agent run sees the wall and monotonic clocks years ahead or behind, via
//! libfaketime: the Debian package `libfaketime` must be installed).
//!
//! After every agent run and every reboot the invariants hold: the environment reads, the
//! running factory slot is untouched, a slot U-Boot would boot holds exactly the expected
//! image (no activation of an unverified slot), and the server never saw two `closed`. At the
//! end each action is closed exactly once with the expected result: feedback owed during the
//! faults was not lost.
//!
//! `DDI_TRIALS` (default 20; a long run uses >= 500) and `DDI_SEED` (replay; the seed is
//! printed); `DDI_SCENARIO` runs one scenario only. Needs `cargo build --workspace --bins` first.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bootctl::scheme::Slot;
use ddi_sim::{Assignment, Endpoint, Fault, FaultKind, ServerOptions, TestServer};
use ddi_tests::demo::{closed_result, ended_as, summary};
use ddi_tests::device::{DeviceOptions, FileDevice, Image};
use ddi_tests::harness::{env_number, Rng};

const TOKEN: &str = "faults-token";
const AGENT_TIMEOUT: Duration = Duration::from_secs(90);
const IMAGE_SIZE: usize = 1 << 20;

/// The scenarios; each names the result the action must end with.
const SCENARIOS: &[&str] = &[
    "drop-during-download",
    "short-body",
    "5xx-storm",
    "429-storm",
    "feedback-refused",
    "malformed-poll",
    "kill-during-slow-download",
    "wrong-hash",
    "health-check-fails",
    "clock-jumps",
];

/// libfaketime (Debian package `libfaketime`): shifts the agent's clocks per run.
const FAKETIME_LIB: &str = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1";
/// Clock offsets between runs: years forward and back, as after an RTC reset or an NTP fix.
/// All are large, so the test can see that the fake clock reached the agent.
const CLOCK_OFFSETS: &[&str] = &["+3650d", "-3650d", "-400d", "+400d", "+20y"];

struct Trial<'a> {
    server: &'a TestServer,
    device: FileDevice,
    factory: Vec<u8>,
    image: Vec<u8>,
    action: u64,
    log: Vec<String>,
    /// Each run sees the clock at another offset (scenario `clock-jumps`).
    clock_jumps: Option<Rng>,
}

impl Trial<'_> {
    fn check(&self, ctx: &str) {
        let ctx = format!("{ctx}; steps {:?}", self.log);
        let env = self
            .device
            .env_map()
            .unwrap_or_else(|e| panic!("{ctx}: environment unreadable: {e}"));
        let booted = self.device.booted().unwrap();
        if booted == Slot::A {
            assert!(
                self.device.slot_holds(Slot::A, &self.factory).unwrap(),
                "{ctx}: the running slot A was written"
            );
        } else {
            assert!(
                self.device.slot_holds(Slot::B, &self.image).unwrap(),
                "{ctx}: running slot B does not hold the image"
            );
        }
        if env.get("bootctl_slot").map(String::as_str) == Some("B") {
            assert!(
                self.device.slot_holds(Slot::B, &self.image).unwrap(),
                "{ctx}: slot B is activated but does not hold the exact image"
            );
        }
        let closed = self
            .server
            .feedback(self.action)
            .iter()
            .filter(|f| f.execution() == Some("closed"))
            .count();
        assert!(
            closed <= 1,
            "{ctx}: the server saw {closed} closed feedbacks"
        );
    }

    fn once(&mut self) {
        let out = match &mut self.clock_jumps {
            None => self.device.agent_once(AGENT_TIMEOUT).unwrap(),
            Some(rng) => {
                let offset = CLOCK_OFFSETS[rng.below(CLOCK_OFFSETS.len() as u64) as usize];
                self.log.push(format!("clock {offset}"));
                let mut cmd = self.device.agent_command();
                cmd.arg("once")
                    .env("LD_PRELOAD", FAKETIME_LIB)
                    .env("FAKETIME", offset);
                ddi_tests::harness::run_with_timeout(cmd, AGENT_TIMEOUT).unwrap()
            }
        };
        assert!(!out.timed_out, "agent hung: {}", out.describe());
        self.log.push(format!("once exit {:?}", out.code));
        self.check("after an agent run");
        self.follow_reboot();
    }

    fn follow_reboot(&mut self) {
        if self.device.take_reboot_requests().unwrap() > 0 {
            let slot = self.device.reboot().unwrap();
            self.log.push(format!("reboot into {slot}"));
            self.check("after a reboot");
        }
    }

    fn killed_run(&mut self, delay: Duration) {
        let out = self.device.agent_once_killed_after(delay).unwrap();
        self.log
            .push(format!("killed after {delay:?} (exit {:?})", out.code));
        self.check("after kill -9");
        self.follow_reboot();
    }

    /// Runs the agent until the action is closed (and no longer active) or `runs` are used.
    fn settle(&mut self, runs: usize) -> bool {
        for _ in 0..runs {
            self.once();
            let view = self.server.action(self.action).unwrap();
            if closed_result(&view).is_some() && !view.active {
                // One more run delivers nothing new and must not close twice.
                self.once();
                return true;
            }
        }
        false
    }
}

#[test]
fn random_faults_over_the_whole_cycle_keep_every_invariant() {
    let trials = env_number("DDI_TRIALS").unwrap_or(20);
    let seed = env_number("DDI_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    // DDI_SCENARIO=<name> runs only that scenario (to chase one failure).
    let only = std::env::var("DDI_SCENARIO").ok();
    println!("DDI_SEED={seed} DDI_TRIALS={trials} DDI_SCENARIO={only:?}");
    let mut rng = Rng(seed);
    let server = TestServer::start(ServerOptions::default().polling(Duration::from_secs(1)));
    let good = Image::good("4.0", IMAGE_SIZE);
    let broken = Image::broken("4.0-broken", IMAGE_SIZE);
    let mut survived = vec![0u32; SCENARIOS.len()];
    let started = Instant::now();

    for trial in 0..trials {
        let mut scenario = rng.below(SCENARIOS.len() as u64) as usize;
        if let Some(only) = &only {
            scenario = SCENARIOS
                .iter()
                .position(|s| s == only)
                .expect("DDI_SCENARIO names a scenario");
        }
        let name = SCENARIOS[scenario];
        let controller = format!("faults-{trial}");
        server.create_target(&controller, Some(TOKEN)).unwrap();
        let mut options = DeviceOptions::new(&server.url(), &controller, TOKEN);
        if name == "kill-during-slow-download" {
            options.max_download_rate = Some("2M".into());
        }
        let device = FileDevice::create_temp(options).unwrap();
        device.reboot().unwrap();
        let factory = device.options().factory_image.clone();
        let image = if name == "health-check-fails" {
            &broken
        } else {
            &good
        };
        let (filename, artifact) = match rng.below(3) {
            0 => ("os.img", image.bytes.clone()),
            1 => ("os.img.gz", image.gzip()),
            _ => ("os.tar.gz", image.tar_gz("rootfs.img")),
        };
        let artifact_len = artifact.len() as u64;
        let fault = |kind: FaultKind| Fault::new(kind).for_target(&controller);
        let mut expected = "success";
        match name {
            "drop-during-download" => {
                let at = 1 + rng.below(artifact_len - 1);
                server.add_fault(
                    fault(FaultKind::DropAfter { bytes: at }).times(1 + rng.below(3) as u32),
                );
            }
            "short-body" => {
                let at = rng.below(artifact_len);
                server.add_fault(fault(FaultKind::Truncate { bytes: at }).once());
            }
            "5xx-storm" => {
                let code = [500, 502, 503, 504][rng.below(4) as usize];
                server.add_fault(
                    fault(FaultKind::Status {
                        code,
                        retry_after_secs: None,
                    })
                    .on(Endpoint::Any)
                    .times(2 + rng.below(10) as u32),
                );
            }
            "429-storm" => {
                server.add_fault(
                    fault(FaultKind::Status {
                        code: 429,
                        retry_after_secs: Some(1),
                    })
                    .on(Endpoint::Any)
                    .times(1 + rng.below(5) as u32),
                );
            }
            "feedback-refused" => {
                server.add_fault(
                    fault(FaultKind::Status {
                        code: 503,
                        retry_after_secs: None,
                    })
                    .on(Endpoint::DeploymentFeedback)
                    .times(2 + rng.below(8) as u32),
                );
            }
            "malformed-poll" => {
                server.add_fault(
                    fault(FaultKind::MalformedJson)
                        .on(Endpoint::Poll)
                        .times(1 + rng.below(2) as u32),
                );
            }
            "kill-during-slow-download" => {}
            "wrong-hash" => {
                server.add_fault(fault(FaultKind::WrongHash));
                expected = "failure";
            }
            "health-check-fails" => expected = "failure",
            "clock-jumps" => assert!(
                std::path::Path::new(FAKETIME_LIB).exists(),
                "{FAKETIME_LIB} is missing: install the Debian package libfaketime"
            ),
            other => unreachable!("{other}"),
        }
        let action = server
            .deploy(
                &controller,
                "4.0",
                filename,
                artifact,
                &Assignment::forced(),
            )
            .unwrap();
        let mut t = Trial {
            server: &server,
            device,
            factory,
            image: image.bytes.clone(),
            action,
            log: vec![format!("trial {trial}: {name} with {filename}")],
            clock_jumps: (name == "clock-jumps").then(|| Rng(rng.next_u64() | 1)),
        };
        t.check("at start");
        if name == "kill-during-slow-download" {
            // The artifact takes about half a second at 2 MB/s.
            for _ in 0..1 + rng.below(3) {
                let delay = Duration::from_millis(rng.below(900));
                t.killed_run(delay);
            }
        }
        let closed = t.settle(20);
        let view = server.action(action).unwrap();
        assert!(
            closed && ended_as(&view, expected),
            "trial {trial} ({name}, seed {seed}): expected closed/{expected}, got {}; steps {:?}",
            summary(&view),
            t.log
        );
        let booted = t.device.booted().unwrap();
        let want = if expected == "success" {
            Slot::B
        } else {
            Slot::A
        };
        assert_eq!(
            booted, want,
            "trial {trial} ({name}, seed {seed}): steps {:?}",
            t.log
        );
        if name == "clock-jumps" {
            // Every feedback was stamped by a shifted clock: no timestamp (clock before 2020 or
            // not synchronised) or one far from the real time, and a `time` in another year.
            // Proves libfaketime reached the agent.
            let now_ms = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64;
            let feedback = server.feedback(action);
            assert!(!feedback.is_empty(), "trial {trial}: no feedback at all");
            // `timestamp` goes only from a synchronised clock; the legacy `time` always goes.
            let real_year = 1970 + now_ms / 31_556_952_000;
            for f in feedback {
                let year = f.body["time"]
                    .as_str()
                    .and_then(|t| t.get(..4)?.parse::<i64>().ok());
                assert!(
                    year.is_some_and(|y| y != real_year),
                    "trial {trial}: feedback time from the real clock: {}",
                    f.body
                );
                if let Some(ts) = f.body.get("timestamp").and_then(|t| t.as_i64()) {
                    let days_off = (ts - now_ms).abs() / 86_400_000;
                    assert!(
                        days_off > 300,
                        "trial {trial}: feedback stamped with the real clock: {}",
                        f.body
                    );
                }
            }
        }
        server.clear_faults();
        survived[scenario] += 1;
    }
    println!(
        "fault trials: {trials} in {:?}, seed {seed}; survived per scenario:",
        started.elapsed()
    );
    for (name, n) in SCENARIOS.iter().zip(&survived) {
        println!("  {name:28} {n}");
    }
}
