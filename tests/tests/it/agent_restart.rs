//! kill -9 of the real `ddi-agent` at random points of an update (download, write, activation,
//! reboot request, confirmation, feedback), sometimes followed by a power cut, then restart:
//! the update must still end exactly once and correctly. Invariants checked after every kill:
//! the environment reads, the running slot is never written, an activated slot holds exactly
//! the image, and the server never sees two `closed`.
//!
//! `DDI_KILL_TRIALS` (default 8) sets the number of randomized updates; `DDI_KILL_SEED` replays
//! one run. Needs `cargo build --workspace --bins` first.

use std::time::{Duration, Instant};

use bootctl::scheme::Slot;
use ddi_sim::{ActionStatus, Assignment, Endpoint, Fault, FaultKind, ServerOptions, TestServer};
use ddi_tests::device::{DeviceOptions, FileDevice, Image};
use ddi_tests::harness::Background;
use ddi_tests::harness::Rng;

const TARGET: &str = "dev-kill";
const TOKEN: &str = "kill-token";

fn closed_count(server: &TestServer, action: u64) -> usize {
    server
        .feedback(action)
        .iter()
        .filter(|f| f.execution() == Some("closed"))
        .count()
}

fn check_invariants(
    dev: &FileDevice,
    factory: &[u8],
    image: &[u8],
    server: &TestServer,
    action: u64,
    ctx: &str,
) {
    let env = dev
        .env_map()
        .unwrap_or_else(|e| panic!("{ctx}: environment unreadable: {e}"));
    let booted = dev.booted().unwrap();
    if booted == Slot::A {
        assert!(
            dev.slot_holds(Slot::A, factory).unwrap(),
            "{ctx}: the running slot A was written"
        );
    } else {
        assert!(
            dev.slot_holds(Slot::B, image).unwrap(),
            "{ctx}: running slot B does not hold the image"
        );
    }
    if env.get("bootctl_slot").map(String::as_str) == Some("B") {
        assert!(
            dev.slot_holds(Slot::B, image).unwrap(),
            "{ctx}: slot B is activated but does not hold the exact image"
        );
    }
    assert!(
        closed_count(server, action) <= 1,
        "{ctx}: server saw two closed feedbacks"
    );
}

#[test]
fn kill_at_random_points_resumes_correctly() {
    let trials: u64 = std::env::var("DDI_KILL_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let seed: u64 = std::env::var("DDI_KILL_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("kill test: DDI_KILL_SEED={seed} DDI_KILL_TRIALS={trials}");
    let mut rng = Rng(seed);
    let mut total_kills = 0;
    for trial in 0..trials {
        let server = TestServer::start(ServerOptions::default().polling(Duration::from_secs(1)));
        server.create_target(TARGET, Some(TOKEN)).unwrap();
        let dev =
            FileDevice::create_temp(DeviceOptions::new(&server.url(), TARGET, TOKEN)).unwrap();
        let factory = dev.options().factory_image.clone();
        let image = Image::good(&format!("2.{trial}"), 1024 * 1024);
        // A slowed download leaves room for kills in the middle of it.
        server.add_fault(
            Fault::new(FaultKind::Slow {
                bytes_per_sec: 4 * 1024 * 1024,
            })
            .on(Endpoint::Download),
        );
        let action = server
            .deploy(
                TARGET,
                "2.0",
                "os.img",
                image.bytes.clone(),
                &Assignment::forced(),
            )
            .unwrap();
        let mut power_cut_done = false;
        let started = Instant::now();
        let mut iteration = 0u32;
        loop {
            iteration += 1;
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "trial {trial} (seed {seed}) did not converge"
            );
            let ctx = format!("trial {trial} iteration {iteration} (seed {seed})");
            let mut cmd = dev.agent_command();
            cmd.arg("once");
            let agent = Background::spawn(cmd).unwrap();
            // Every fifth run goes undisturbed so the update always makes progress.
            let limit = if iteration.is_multiple_of(5) {
                Duration::from_secs(60)
            } else {
                Duration::from_millis(rng.below(500))
            };
            let out = agent.stop_after(limit).unwrap();
            let killed = out.code.is_none();
            if killed {
                total_kills += 1;
            } else {
                assert!(
                    matches!(out.code, Some(0) | Some(2)),
                    "{ctx}: {}",
                    out.describe()
                );
            }
            check_invariants(&dev, &factory, &image.bytes, &server, action, &ctx);
            let reboot_requested = dev.take_reboot_requests().unwrap() > 0;
            // Sometimes the power goes too (at most once per trial: more could use up the
            // trial boots and make U-Boot fall back, which is correct but another test).
            let power_cut = killed && !power_cut_done && rng.below(5) == 0;
            if reboot_requested || power_cut {
                power_cut_done |= power_cut && !reboot_requested;
                dev.reboot().unwrap();
                check_invariants(&dev, &factory, &image.bytes, &server, action, &ctx);
            }
            let finished = server.action(action).unwrap().status == ActionStatus::Finished;
            if finished && !killed && !reboot_requested {
                break;
            }
        }
        assert_eq!(
            closed_count(&server, action),
            1,
            "trial {trial} (seed {seed})"
        );
        let fb = server.feedback(action);
        let closed = fb.iter().find(|f| f.execution() == Some("closed")).unwrap();
        assert_eq!(
            closed.finished(),
            Some("success"),
            "trial {trial} (seed {seed})"
        );
        assert_eq!(dev.booted().unwrap(), Slot::B);
        let env = dev.env_map().unwrap();
        assert_eq!(env.get("bootctl_slot").map(String::as_str), Some("B"));
        assert_eq!(env.get("upgrade_available").map(String::as_str), Some("0"));
        assert_eq!(env.get("bootcmd").map(String::as_str), Some("run ddi_boot"));
        assert!(dev.slot_holds(Slot::A, &factory).unwrap());
    }
    eprintln!("kill test: {total_kills} kills over {trials} trials");
    assert!(
        total_kills > 0,
        "no run was ever killed: the test tested nothing"
    );
}
