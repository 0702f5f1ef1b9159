//! The real `ddi-agent` never writes the fallback slot while the running slot is not the
//! confirmed one U-Boot boots next: a trial someone else started, or a reboot into the other
//! slot that was asked for and did not happen. The action waits instead of failing, and goes on
//! once the bootloader's state allows it. Needs `cargo build --workspace --bins` first.

use std::time::Duration;

use bootctl::scheme::Slot;
use ddi_sim::{ActionStatus, Assignment, ServerOptions, TestServer};
use ddi_tests::device::{FileDevice, Image};
use ddi_tests::rig::Rig;

const TARGET: &str = "guard-1";
const TOKEN: &str = "guard-token";

fn rig() -> (TestServer, FileDevice, Vec<u8>) {
    let opts = ServerOptions::default().polling(Duration::from_secs(1));
    let Rig { server, dev, .. } = Rig::start(opts, TARGET, TOKEN, |_| {});
    let factory = dev.options().factory_image.clone();
    (server, dev, factory)
}

fn once(dev: &FileDevice) -> String {
    let out = dev.agent_once(Duration::from_secs(60)).unwrap();
    assert!(!out.timed_out, "agent hung:\n{}", out.describe());
    out.describe()
}

fn deploy(server: &TestServer, image: &Image) -> u64 {
    server
        .deploy(
            TARGET,
            &image.header.version,
            "os.img",
            image.bytes.clone(),
            &Assignment::forced(),
        )
        .unwrap()
}

/// The action was retrieved but nothing closed it.
fn assert_still_open(server: &TestServer, action: u64) {
    let status = server.action(action).unwrap().status;
    assert!(
        matches!(status, ActionStatus::Running | ActionStatus::Retrieved),
        "{status:?}"
    );
    assert!(server
        .feedback(action)
        .iter()
        .all(|f| f.execution() != Some("closed")));
}

#[test]
fn a_trial_the_agent_did_not_start_keeps_its_fallback() {
    let (server, dev, factory) = rig();
    // Someone put B (holding a copy of the factory image) on trial and booted it.
    std::fs::write(dev.slot_path(Slot::B), &factory).unwrap();
    dev.boot_control().unwrap().activate(Slot::B).unwrap();
    assert_eq!(dev.reboot().unwrap(), Slot::B);
    let action = deploy(&server, &Image::good("2.0", 256 * 1024));

    let log = once(&dev);
    assert!(
        dev.slot_holds(Slot::A, &factory).unwrap(),
        "fallback slot A written:\n{log}"
    );
    assert!(log.contains("runs on trial"), "{log}");
    assert_still_open(&server, action);
    assert_eq!(dev.take_reboot_requests().unwrap(), 0, "{log}");
    assert_eq!(
        dev.env_map().unwrap()["upgrade_available"],
        "1",
        "trial confirmed:\n{log}"
    );

    // Whoever started the trial confirms it: now A may be written.
    dev.boot_control().unwrap().mark_good().unwrap();
    let log = once(&dev);
    assert_eq!(dev.take_reboot_requests().unwrap(), 1, "{log}");
    assert!(!dev.slot_holds(Slot::A, &factory).unwrap(), "{log}");
}

#[test]
fn a_reboot_that_did_not_happen_comes_before_any_write() {
    let (server, dev, factory) = rig();
    // B ran on trial and was given up (marked bad), but the reboot back into A never happened.
    std::fs::write(dev.slot_path(Slot::B), &factory).unwrap();
    dev.boot_control().unwrap().activate(Slot::B).unwrap();
    assert_eq!(dev.reboot().unwrap(), Slot::B);
    dev.boot_control().unwrap().mark_bad(Slot::B).unwrap();
    let image = Image::good("2.0", 256 * 1024);
    let action = deploy(&server, &image);

    let log = once(&dev);
    assert!(
        dev.slot_holds(Slot::A, &factory).unwrap(),
        "slot A written:\n{log}"
    );
    assert_eq!(
        dev.take_reboot_requests().unwrap(),
        1,
        "no reboot asked for:\n{log}"
    );
    assert_still_open(&server, action);

    // After the reboot into A the update goes on into B and is confirmed there.
    assert_eq!(dev.reboot().unwrap(), Slot::A);
    for _ in 0..4 {
        let log = once(&dev);
        if dev.take_reboot_requests().unwrap() > 0 {
            dev.reboot().unwrap();
        }
        if server.action(action).unwrap().status == ActionStatus::Finished {
            break;
        }
        assert!(dev.slot_holds(Slot::A, &factory).unwrap(), "{log}");
    }
    assert_eq!(
        server.action(action).unwrap().status,
        ActionStatus::Finished
    );
    assert_eq!(dev.booted().unwrap(), Slot::B);
    assert!(dev.slot_holds(Slot::B, &image.bytes).unwrap());
    assert!(dev.slot_holds(Slot::A, &factory).unwrap());
}
