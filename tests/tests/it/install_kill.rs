//! kill -9 at random points of download, write, switch and confirm, with power cuts: the real
//! `ddi-agent` against the test server and a file-backed device. After every kill (and
//! every simulated power cut) the invariants hold:
//! - the U-Boot environment is valid,
//! - the booted slot (A) was never touched,
//! - a slot U-Boot would boot holds exactly the expected image (never an activated slot with
//!   a wrong hash).
//!
//! In the end the action is closed exactly once, with `success`, running the new image.
//!
//! `DDI_TRIALS` sets the number of trials (default 10; use >= 100 for a thorough run),
//! `DDI_SEED` replays a run (the seed is printed).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bootctl::scheme::Slot;
use ddi_sim::{Assignment, ServerOptions, TestServer};
use ddi_tests::demo::{closed_result, ended_as, summary};
use ddi_tests::device::{DeviceOptions, FileDevice, Image};
use ddi_tests::harness::{env_number, Rng};

const TOKEN: &str = "kill-token";
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);

struct Trial<'a> {
    server: &'a TestServer,
    device: FileDevice,
    factory: Vec<u8>,
    image: Vec<u8>,
    action: u64,
    log: Vec<String>,
}

impl Trial<'_> {
    /// The invariants that must hold at any instant.
    fn check(&self, when: &str) {
        let context = || format!("{when}; steps: {:?}", self.log);
        let env = self
            .device
            .env_map()
            .unwrap_or_else(|e| panic!("environment unreadable ({e}) {}", context()));
        assert!(
            self.device.slot_holds(Slot::A, &self.factory).unwrap(),
            "slot A (booted) changed {}",
            context()
        );
        if env.get("bootctl_slot").map(String::as_str) == Some("B") {
            assert!(
                self.device.slot_holds(Slot::B, &self.image).unwrap(),
                "slot B is activated but does not hold the image {}",
                context()
            );
        }
        let slot_size = self.device.options().slot_size;
        for slot in [Slot::A, Slot::B] {
            assert_eq!(
                self.device.slot_bytes(slot).unwrap().len() as u64,
                slot_size,
                "slot {slot} changed size {}",
                context()
            );
        }
    }

    /// Run `ddi-agent once` and kill -9 it after `delay` (if it is still running).
    fn killed_run(&mut self, delay: Duration) {
        let out = self.device.agent_once_killed_after(delay).unwrap();
        self.log
            .push(format!("once killed after {delay:?} (exit {:?})", out.code));
        self.check("after kill -9");
    }

    fn power_cycle(&mut self) {
        let slot = self.device.reboot().unwrap();
        // A reboot the agent asked for before dying is now done.
        self.device.take_reboot_requests().unwrap();
        self.log.push(format!("power cut, booted {slot}"));
        self.check("after power cut");
    }

    fn follow_reboot_request(&mut self) {
        if self.device.take_reboot_requests().unwrap() > 0 {
            let slot = self.device.reboot().unwrap();
            self.log.push(format!("reboot into {slot}"));
            self.check("after a requested reboot");
        }
    }

    /// Let the agent run undisturbed until the action is closed and the device settled.
    fn settle(&mut self) {
        for _ in 0..10 {
            let out = self.device.agent_once(AGENT_TIMEOUT).unwrap();
            assert!(!out.timed_out, "agent hung: {}", out.describe());
            self.log.push(format!("once exit {:?}", out.code));
            self.check("after an agent run");
            if self.device.take_reboot_requests().unwrap() > 0 {
                let slot = self.device.reboot().unwrap();
                self.log.push(format!("reboot into {slot}"));
                self.check("after a requested reboot");
                continue;
            }
            let view = self.server.action(self.action).unwrap();
            if closed_result(&view).is_some() && !view.active {
                return;
            }
        }
        panic!("the action did not close; steps: {:?}", self.log);
    }
}

#[test]
fn kill_at_random_points_keeps_the_device_consistent() {
    let trials = env_number("DDI_TRIALS").unwrap_or(10);
    let seed = env_number("DDI_SEED").unwrap_or_else(|| {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    println!("DDI_SEED={seed} DDI_TRIALS={trials}");
    let mut rng = Rng(seed);
    let server = TestServer::start(ServerOptions::default().polling(Duration::from_secs(1)));
    let image = Image::good("3.0", 2 << 20);
    let gz = image.gzip();
    let tar_gz = image.tar_gz("rootfs.img");

    for trial in 0..trials {
        let controller = format!("kill-{trial}");
        server.create_target(&controller, Some(TOKEN)).unwrap();
        let mut options = DeviceOptions::new(&server.url(), &controller, TOKEN);
        // Slow enough that kills land inside the download and the write.
        options.max_download_rate = Some("4M".into());
        let device = FileDevice::create_temp(options).unwrap();
        device.reboot().unwrap();
        let factory = device.options().factory_image.clone();
        let (name, artifact) = match trial % 3 {
            0 => ("os.img", image.bytes.clone()),
            1 => ("os.img.gz", gz.clone()),
            _ => ("os.tar.gz", tar_gz.clone()),
        };
        let action = server
            .deploy(&controller, "3.0", name, artifact, &Assignment::forced())
            .unwrap();
        let mut t = Trial {
            server: &server,
            device,
            factory,
            image: image.bytes.clone(),
            action,
            log: vec![format!("trial {trial}: {name}")],
        };
        t.check("at start");
        for _ in 0..1 + rng.below(4) {
            let delay = Duration::from_millis(rng.below(1200));
            t.killed_run(delay);
            match rng.below(3) {
                0 => t.power_cycle(),
                // Do the reboot the agent asked for, so later kills hit the confirmation.
                1 => t.follow_reboot_request(),
                _ => {}
            }
        }
        t.settle();
        let view = server.action(action).unwrap();
        assert!(
            ended_as(&view, "success"),
            "trial {trial} (seed {seed}): {}; steps: {:?}",
            summary(&view),
            t.log
        );
        assert_eq!(t.device.booted().unwrap(), Slot::B, "steps: {:?}", t.log);
        assert!(t.device.slot_holds(Slot::B, &t.image).unwrap());
        println!("{}", t.log.join(" -> "));
    }
}
