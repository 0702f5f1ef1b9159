//! Interop with Debian's real `rauc` (1.8) sharing one U-Boot environment with `ddi-bootctl`
//! (`--scheme rauc`): what RAUC marks, `ddi-bootctl` reads; what `ddi-bootctl` activates or
//! marks, RAUC reports.
//!
//! RAUC 1.8 has no option for the `fw_env.config` path, so wrapper scripts named `fw_printenv`
//! and `fw_setenv` come first on its `PATH` and call the real tools with `-c`. `rauc service`
//! runs on a private session bus (`dbus-daemon --session`) with `--override-boot-slot` and a
//! `system.conf` of `bootloader=uboot` and file-backed slots. Both sides take libubootenv's lock
//! `/var/lock/fw_printenv.lock`, as on a device.
//!
//! Needs `rauc`, `dbus-daemon` (apt: rauc, dbus) and `fw_printenv`/`fw_setenv` (apt:
//! libubootenv-tool). A missing tool fails the test unless `DDI_SKIP_INTEROP=1`.

use std::fs;
use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

mod common;

use bootctl::env::{self, Layout};
use bootctl::store::EnvStore;
use bootctl::{Env, SchemeKind, Slot};
use serde_json::Value;

const ENV_SIZE: usize = 0x4000;

/// The tools this test needs; `false` (skip) only when they are missing and
/// `DDI_SKIP_INTEROP=1`, otherwise a missing tool panics.
fn tools_present() -> bool {
    let missing: Vec<&str> = ["rauc", "dbus-daemon", "fw_printenv", "fw_setenv"]
        .into_iter()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .stdout(Stdio::null())
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("DDI_SKIP_INTEROP").as_deref() == Ok("1") {
        eprintln!("skipping RAUC interop: {missing:?} missing and DDI_SKIP_INTEROP=1");
        return false;
    }
    panic!(
        "RAUC interop needs {missing:?} (apt: rauc dbus libubootenv-tool); \
         set DDI_SKIP_INTEROP=1 to skip"
    );
}

fn which(tool: &str) -> String {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A private D-Bus session, `rauc service`, and a shared file-backed environment.
struct Rig {
    dir: tempfile::TempDir,
    bus: String,
    dbus: Child,
    service: Option<Child>,
}

impl Rig {
    /// `boot_attempts` is RAUC's `boot-attempts` (mark-good); `boot-attempts-primary`
    /// (mark-active) is 3, as `ddi-bootctl --attempts 3`.
    fn new(vars: &[(&str, &str)], boot_attempts: u32) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let env: Env = vars.iter().copied().collect();
        fs::write(
            root.join("env.bin"),
            env::create_image(&env, ENV_SIZE, Layout::Redundant).unwrap(),
        )
        .unwrap();
        let config = root.join("fw_env.config");
        fs::write(
            &config,
            format!(
                "{0} 0x0 0x4000\n{0} 0x4000 0x4000\n",
                root.join("env.bin").display()
            ),
        )
        .unwrap();
        fs::create_dir(root.join("bin")).unwrap();
        for tool in ["fw_printenv", "fw_setenv"] {
            let wrapper = root.join("bin").join(tool);
            fs::write(
                &wrapper,
                format!(
                    "#!/bin/sh\nexec {} -c '{}' \"$@\"\n",
                    which(tool),
                    config.display()
                ),
            )
            .unwrap();
            fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();
        }
        fs::create_dir(root.join("data")).unwrap();
        for slot in ["slotA.img", "slotB.img"] {
            fs::write(root.join(slot), vec![0u8; 4096]).unwrap();
        }
        fs::write(
            root.join("system.conf"),
            format!(
                "[system]\ncompatible=ddi-interop\nbootloader=uboot\ndata-directory={data}\n\
                 boot-attempts={boot_attempts}\nboot-attempts-primary=3\n\n\
                 [slot.rootfs.0]\ndevice={a}\ntype=raw\nbootname=A\n\n\
                 [slot.rootfs.1]\ndevice={b}\ntype=raw\nbootname=B\n",
                data = root.join("data").display(),
                a = root.join("slotA.img").display(),
                b = root.join("slotB.img").display(),
            ),
        )
        .unwrap();
        fs::write(root.join("cmdline"), "console=ttyS0 bootctl.slot=A\n").unwrap();

        let mut dbus = Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--print-address=1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start dbus-daemon");
        let mut line = String::new();
        BufReader::new(dbus.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let bus = line.trim().to_string();
        assert!(!bus.is_empty(), "dbus-daemon printed no address");
        Rig {
            dir,
            bus,
            dbus,
            service: None,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn rauc_command(&self) -> Command {
        let mut cmd = Command::new("rauc");
        let path = format!(
            "{}:{}",
            self.path("bin").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        cmd.env("PATH", path)
            .env("DBUS_SESSION_BUS_ADDRESS", &self.bus)
            .env("DBUS_STARTER_BUS_TYPE", "session");
        cmd
    }

    /// (Re)starts `rauc service` as if `booted` were running, and waits until it answers.
    fn start_service(&mut self, booted: Slot) {
        self.stop_service();
        let log = fs::File::create(self.path(&format!("service-{booted}.log"))).unwrap();
        let child = self
            .rauc_command()
            .arg("service")
            .arg(format!("--conf={}", self.path("system.conf").display()))
            .arg(format!("--override-boot-slot={booted}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start rauc service");
        self.service = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = self
                .rauc_command()
                .args(["status", "--output-format=json"])
                .output()
                .unwrap();
            if out.status.success() {
                let status: Value = serde_json::from_slice(&out.stdout).unwrap();
                if status["booted"] == booted.as_str() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "rauc service did not come up: {}",
                fs::read_to_string(self.path(&format!("service-{booted}.log"))).unwrap_or_default()
            );
            sleep(Duration::from_millis(100));
        }
    }

    fn stop_service(&mut self) {
        if let Some(mut child) = self.service.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn rauc(&self, args: &[&str]) -> Output {
        let out = self.rauc_command().args(args).output().unwrap();
        assert!(
            out.status.success(),
            "rauc {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// `rauc status` as JSON: (`boot_primary`, boot_status of A, boot_status of B).
    fn rauc_view(&self) -> (Value, String, String) {
        let out = self.rauc(&["status", "--output-format=json"]);
        let status: Value = serde_json::from_slice(&out.stdout).unwrap();
        let state = |name: &str| -> String {
            status["slots"]
                .as_array()
                .unwrap()
                .iter()
                .find_map(|s| s.get(name))
                .map(|s| s["boot_status"].as_str().unwrap().to_string())
                .unwrap()
        };
        let a = state("rootfs.0");
        let b = state("rootfs.1");
        (status["boot_primary"].clone(), a, b)
    }

    fn bootctl(&self, args: &[&str]) -> String {
        let out = Command::new(env!("CARGO_BIN_EXE_ddi-bootctl"))
            .arg("--env-config")
            .arg(self.path("fw_env.config"))
            .arg("--cmdline")
            .arg(self.path("cmdline"))
            .args(["--scheme", "rauc", "--attempts", "3"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ddi-bootctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn bootctl_status(&self) -> Value {
        serde_json::from_str(&self.bootctl(&["status", "--json"])).unwrap()
    }

    /// Power-on with the boot script's decision (the environment's own lock is used).
    fn boot(&self) -> Slot {
        let store = EnvStore::open_config_file(&self.path("fw_env.config")).unwrap();
        common::power_on(&store, SchemeKind::Rauc, &self.path("cmdline"))
    }

    fn printenv(&self, name: &str) -> String {
        let out = Command::new(self.path("bin").join("fw_printenv"))
            .args(["-n", name])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim_end()
            .to_string()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.stop_service();
        let _ = self.dbus.kill();
        let _ = self.dbus.wait();
    }
}

#[test]
fn what_rauc_marks_ddi_bootctl_reads() {
    if !tools_present() {
        return;
    }
    let mut rig = Rig::new(
        &[
            ("bootcmd", "run ddi_boot"),
            ("BOOT_ORDER", "A B"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "3"),
        ],
        12,
    );
    rig.start_service(Slot::A);
    // RAUC reads the environment our codec wrote.
    assert_eq!(rig.rauc_view().0, "rootfs.0");

    rig.rauc(&["status", "mark-bad", "other"]);
    let status = rig.bootctl_status();
    assert_eq!(status["variables"]["BOOT_ORDER"], "A");
    assert_eq!(status["variables"]["BOOT_B_LEFT"], "0");
    assert_eq!(status["next"], "A");
    assert_eq!(status["booted"], "A");

    rig.rauc(&["status", "mark-active", "other"]);
    let status = rig.bootctl_status();
    assert_eq!(status["variables"]["BOOT_ORDER"], "B A");
    assert_eq!(status["variables"]["BOOT_B_LEFT"], "3");
    assert_eq!(status["next"], "B");

    // The boot script boots B; RAUC, told B runs, confirms it with boot-attempts=12: hex "c".
    assert_eq!(rig.boot(), Slot::B);
    assert_eq!(rig.bootctl(&["booted"]), "B\n");
    rig.start_service(Slot::B);
    rig.rauc(&["status", "mark-good"]);
    let status = rig.bootctl_status();
    assert_eq!(status["variables"]["BOOT_B_LEFT"], "c");
    assert_eq!(status["next"], "B");
    // Twelve boots on B without another confirmation, then the fallback to A.
    for _ in 0..12 {
        assert_eq!(rig.boot(), Slot::B);
    }
    assert_eq!(rig.bootctl_status()["next"], "A");
    assert_eq!(rig.boot(), Slot::A);

    // Foreign variables survived every writer.
    assert_eq!(rig.printenv("bootcmd"), "run ddi_boot");
}

#[test]
fn what_ddi_bootctl_activates_rauc_reports() {
    if !tools_present() {
        return;
    }
    let mut rig = Rig::new(&[("bootcmd", "run ddi_boot")], 3);
    rig.start_service(Slot::A);
    // Missing variables: RAUC finds no primary; ddi-bootctl reads the defaults.
    assert_eq!(rig.bootctl_status()["next"], "A");

    rig.bootctl(&["set-next", "B"]);
    let (primary, _, b) = rig.rauc_view();
    assert_eq!(primary, "rootfs.1");
    assert_eq!(b, "good");

    rig.bootctl(&["mark-bad", "B"]);
    let (primary, _, b) = rig.rauc_view();
    assert_eq!(b, "bad");
    assert_ne!(primary, "rootfs.1");

    rig.bootctl(&["set-next", "A"]);
    assert_eq!(rig.rauc_view().0, "rootfs.0");
    rig.bootctl(&["set-next", "B"]);
    let (primary, _, b) = rig.rauc_view();
    assert_eq!((primary.as_str(), b.as_str()), (Some("rootfs.1"), "good"));

    // Reboot into B, confirm with ddi-bootctl: RAUC sees B primary and good.
    assert_eq!(rig.boot(), Slot::B);
    assert_eq!(rig.printenv("BOOT_B_LEFT"), "2");
    rig.bootctl(&["mark-good"]);
    assert_eq!(rig.printenv("BOOT_B_LEFT"), "3");
    rig.start_service(Slot::B);
    let (primary, a, b) = rig.rauc_view();
    assert_eq!(primary, "rootfs.1");
    assert_eq!(b, "good");
    // A was never confirmed after the defaults, but has attempts left.
    assert_eq!(a, "good");
    assert_eq!(rig.printenv("bootcmd"), "run ddi_boot");
}

#[test]
fn both_marked_bad_by_rauc_is_still_readable_and_recoverable() {
    if !tools_present() {
        return;
    }
    let mut rig = Rig::new(
        &[
            ("BOOT_ORDER", "A B"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "3"),
        ],
        3,
    );
    rig.start_service(Slot::A);
    rig.rauc(&["status", "mark-bad", "other"]);
    rig.rauc(&["status", "mark-bad", "booted"]);
    // libubootenv stores "BOOT_ORDER=" (empty); U-Boot drops empty variables on import.
    let status = rig.bootctl_status();
    assert_eq!(status["variables"]["BOOT_ORDER"], "");
    assert_eq!(status["variables"]["BOOT_A_LEFT"], "0");
    assert_eq!(
        status["next"], "A",
        "the script resets the counters and boots A"
    );

    // ddi-bootctl can still activate a slot on top of it, and RAUC agrees.
    rig.bootctl(&["set-next", "B"]);
    assert_eq!(rig.rauc_view().0, "rootfs.1");
    assert_eq!(rig.boot(), Slot::B);
}
