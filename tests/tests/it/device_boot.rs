//! `device::boot_file_device`: the boot script's decision on a file-backed device (env file +
//! `fw_env.config` + cmdline file), as the device fixture and the demo use it.

use std::fs;

use bootctl::env::{self, Layout};
use bootctl::scheme::{self, SchemeKind, Slot};
use bootctl::store::EnvStore;
use bootctl::{boot_script, Env};
use ddi_tests::device::boot_file_device;

struct FileDevice {
    dir: tempfile::TempDir,
}

impl FileDevice {
    fn new(vars: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let env: Env = vars.iter().copied().collect();
        fs::write(
            dir.path().join("env.bin"),
            env::create_image(&env, 0x2000, Layout::Redundant).unwrap(),
        )
        .unwrap();
        // Relative device paths are resolved against the config's folder.
        fs::write(
            dir.path().join("fw_env.config"),
            "env.bin 0x0000 0x2000\nenv.bin 0x2000 0x2000\n",
        )
        .unwrap();
        FileDevice { dir }
    }

    fn boot(&self, kind: SchemeKind) -> Slot {
        boot_file_device(
            &self.dir.path().join("fw_env.config"),
            kind,
            &self.dir.path().join("cmdline"),
        )
        .unwrap()
    }

    fn cmdline(&self) -> String {
        fs::read_to_string(self.dir.path().join("cmdline")).unwrap()
    }

    fn store(&self) -> EnvStore {
        EnvStore::open_config_file(&self.dir.path().join("fw_env.config")).unwrap()
    }
}

#[test]
fn boots_and_writes_the_cmdline() {
    let dev = FileDevice::new(&[("bootcmd", "run ddi")]);
    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::A);
    assert_eq!(dev.cmdline(), "bootctl.slot=A\n");
    assert_eq!(
        bootctl::booted::booted_slot(&dev.dir.path().join("cmdline"), None).unwrap(),
        Slot::A
    );
    // No leftover temp files next to the cmdline.
    let names: Vec<String> = fs::read_dir(dev.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "{names:?}");
}

#[test]
fn bootcount_trial_and_fallback_on_files_one_save_per_boot() {
    let dev = FileDevice::new(&[("bootcmd", "run ddi")]);
    let store = dev.store();
    let s = scheme::for_kind(SchemeKind::Bootcount, 2);
    let activate = s.activate(&store.read().unwrap(), Slot::B).unwrap();
    store.apply(&activate).unwrap();
    let flag = || store.read_selected().unwrap().copy.flag.unwrap();
    let before = flag();
    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::B);
    assert_eq!(
        flag(),
        before.wrapping_add(1),
        "one save for the trial boot"
    );
    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::B);
    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::A);
    assert_eq!(
        flag(),
        before.wrapping_add(3),
        "the fallback is one save too"
    );
    assert!(dev.cmdline().contains("bootctl.slot=A"));
    // Not on trial: later boots write nothing.
    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::A);
    assert_eq!(flag(), before.wrapping_add(3));
    assert_eq!(store.read().unwrap().get("bootcmd"), Some("run ddi"));
}

#[test]
fn rauc_boot_on_files() {
    let dev = FileDevice::new(&[]);
    assert_eq!(dev.boot(SchemeKind::Rauc), Slot::A);
    // The script saves only the counter it decremented, not its defaults.
    let env = dev.store().read().unwrap();
    assert_eq!(env.get("BOOT_ORDER"), None);
    assert_eq!(env.get("BOOT_A_LEFT"), Some("2"));
    assert_eq!(env.get("BOOT_B_LEFT"), None);
    assert_eq!(dev.cmdline(), "bootctl.slot=A rauc.slot=A\n");
}

#[test]
fn keeps_other_parameters_and_replaces_slot_tokens() {
    assert_eq!(
        boot_script::cmdline_for(
            "console=ttyS0 rauc.slot=A foo=\"a b\" bootctl.slot=A\n",
            SchemeKind::Bootcount,
            Slot::B
        ),
        "console=ttyS0 foo=\"a b\" bootctl.slot=B\n"
    );
    assert_eq!(
        boot_script::cmdline_for("", SchemeKind::Bootcount, Slot::A),
        "bootctl.slot=A\n"
    );
    // The rauc script also passes RAUC's own token.
    assert_eq!(
        boot_script::cmdline_for(
            "quiet bootctl.slot=A rauc.slot=A",
            SchemeKind::Rauc,
            Slot::B
        ),
        "quiet bootctl.slot=B rauc.slot=B\n"
    );
    let dev = FileDevice::new(&[("bootctl_slot", "B")]);
    fs::write(
        dev.dir.path().join("cmdline"),
        "root=/dev/vda2 bootctl.slot=A\n",
    )
    .unwrap();
    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::B);
    assert_eq!(dev.cmdline(), "root=/dev/vda2 bootctl.slot=B\n");
}

#[test]
fn no_valid_environment_boots_a_on_defaults_and_saves_nothing() {
    let dev = FileDevice::new(&[("bootctl_slot", "B"), ("upgrade_available", "1")]);
    let path = dev.dir.path().join("env.bin");
    let mut image = fs::read(&path).unwrap();
    image[20] ^= 1;
    image[0x2000 + 20] ^= 1;
    fs::write(&path, &image).unwrap();
    for kind in [SchemeKind::Bootcount, SchemeKind::Rauc] {
        assert_eq!(dev.boot(kind), Slot::A);
        assert_eq!(fs::read(&path).unwrap(), image, "nothing written");
        assert!(dev.cmdline().starts_with("bootctl.slot=A"));
    }
}

#[test]
fn missing_config_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = boot_file_device(
        &dir.path().join("fw_env.config"),
        SchemeKind::Bootcount,
        &dir.path().join("cmdline"),
    )
    .unwrap_err();
    assert!(err.to_string().contains("fw_env.config"), "{err}");
    assert!(!dir.path().join("cmdline").exists());
}
