//! The real `ddi-bootctl` binary on file-backed environments: the contract's commands, JSON,
//! exit statuses and one-line errors, one save per transition, and whole update cycles with
//! the boot simulator playing U-Boot.

use std::fs;
use std::path::PathBuf;
use std::process::{Command, Output};

mod common;

use bootctl::env::{self, Layout};
use bootctl::{Env, SchemeKind, Slot};
use serde_json::Value;

const ENV_SIZE: usize = 0x4000;

/// A device in a temp folder: `env.bin` (+ `fw_env.config`), `cmdline`, a private lock file.
struct Device {
    dir: tempfile::TempDir,
}

impl Device {
    fn new(vars: &[(&str, &str)], layout: Layout) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let env: Env = vars.iter().copied().collect();
        fs::write(
            dir.path().join("env.bin"),
            env::create_image(&env, ENV_SIZE, layout).unwrap(),
        )
        .unwrap();
        let config = match layout {
            Layout::Single => "env.bin 0x0 0x4000\n".to_string(),
            Layout::Redundant => {
                "# two copies\nenv.bin 0x0 0x4000\nenv.bin 0x4000 0x4000\n".to_string()
            }
        };
        fs::write(dir.path().join("fw_env.config"), config).unwrap();
        fs::write(dir.path().join("cmdline"), "console=ttyS0 bootctl.slot=A\n").unwrap();
        Device { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn image(&self) -> Vec<u8> {
        fs::read(self.path("env.bin")).unwrap()
    }

    fn run(&self, args: &[&str]) -> Output {
        self.run_scheme("bootcount", args)
    }

    fn run_scheme(&self, scheme: &str, args: &[&str]) -> Output {
        self.command(scheme).args(args).output().unwrap()
    }

    /// `ddi-bootctl` on this device's files under `scheme`, its command still to add.
    fn command(&self, scheme: &str) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ddi-bootctl"));
        cmd.arg("--env-config")
            .arg(self.path("fw_env.config"))
            .arg("--cmdline")
            .arg(self.path("cmdline"))
            .arg("--lock-file")
            .arg(self.path("lock"))
            .arg("--scheme")
            .arg(scheme);
        cmd
    }

    fn ok(&self, scheme: &str, args: &[&str]) -> String {
        let out = self.run_scheme(scheme, args);
        assert!(
            out.status.success(),
            "ddi-bootctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn status(&self, scheme: &str) -> Value {
        serde_json::from_str(&self.ok(scheme, &["status", "--json"])).unwrap()
    }

    /// Power-on with the boot simulator, as the device fixture does.
    fn boot(&self, kind: SchemeKind) -> Slot {
        let store = bootctl::store::EnvStore::open_config_file(&self.path("fw_env.config"))
            .unwrap()
            .with_lock_path(self.path("lock"));
        common::power_on(&store, kind, &self.path("cmdline"))
    }

    fn env(&self) -> Env {
        bootctl::store::EnvStore::open_config_file(&self.path("fw_env.config"))
            .unwrap()
            .with_lock_path(self.path("lock"))
            .read()
            .unwrap()
    }
}

/// Asserts a failure with exactly one line on stderr and returns it.
fn one_line_error(out: &Output) -> String {
    assert!(!out.status.success(), "expected failure");
    let stderr = String::from_utf8(out.stderr.clone()).unwrap();
    assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr:?}");
    assert!(stderr.starts_with("ddi-bootctl: error: "), "{stderr:?}");
    stderr
}

/// Which copies differ between two images of a redundant pair, and the new flags.
fn copies_changed(before: &[u8], after: &[u8]) -> Vec<usize> {
    (0..2)
        .filter(|i| {
            before[i * ENV_SIZE..(i + 1) * ENV_SIZE] != after[i * ENV_SIZE..(i + 1) * ENV_SIZE]
        })
        .collect()
}

#[test]
fn status_json_has_the_contract_fields() {
    let dev = Device::new(&[("bootcmd", "run ddi")], Layout::Redundant);
    let status = dev.status("bootcount");
    assert_eq!(status["scheme"], "bootcount");
    assert_eq!(status["booted"], "A");
    assert_eq!(status["next"], "A");
    assert_eq!(status["trial"], false);
    assert_eq!(status["redundant"], true);
    assert_eq!(status["variables"], serde_json::json!({}));
    let text = dev.ok("bootcount", &["status"]);
    assert!(text.contains("scheme:    bootcount"), "{text}");
    assert!(text.contains("booted:    A"), "{text}");
    assert!(text.contains("redundant: yes"), "{text}");
    // rauc: trial is null.
    let status = dev.status("rauc");
    assert_eq!(status["scheme"], "rauc");
    assert_eq!(status["trial"], Value::Null);
}

#[test]
fn status_without_slot_token_reports_null_and_booted_fails() {
    let dev = Device::new(&[], Layout::Redundant);
    fs::write(dev.path("cmdline"), "console=ttyS0 root=/dev/vda2\n").unwrap();
    assert_eq!(dev.status("bootcount")["booted"], Value::Null);
    let err = one_line_error(&dev.run(&["booted"]));
    assert!(err.contains("no slot token"), "{err}");
    let err = one_line_error(&dev.run(&["mark-good"]));
    assert!(err.contains("no slot token"), "{err}");
}

#[test]
fn booted_prints_the_slot() {
    let dev = Device::new(&[], Layout::Redundant);
    assert_eq!(dev.ok("bootcount", &["booted"]), "A\n");
    fs::write(dev.path("cmdline"), "quiet rauc.slot=B\n").unwrap();
    assert_eq!(dev.ok("bootcount", &["booted"]), "B\n");
    // `booted` does not need the environment.
    fs::remove_file(dev.path("env.bin")).unwrap();
    assert_eq!(dev.ok("bootcount", &["booted"]), "B\n");
}

#[test]
fn bootcount_update_cycle_confirmed() {
    let dev = Device::new(
        &[("bootcmd", "run ddi"), ("vendor_x", "keep me")],
        Layout::Redundant,
    );
    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::A);

    let before = dev.image();
    dev.ok("bootcount", &["set-next", "B"]);
    assert_eq!(copies_changed(&before, &dev.image()).len(), 1, "one save");
    let status = dev.status("bootcount");
    assert_eq!(
        (status["next"].as_str(), status["trial"].as_bool()),
        (Some("B"), Some(true))
    );
    assert_eq!(status["booted"], "A");

    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::B);
    assert_eq!(
        fs::read_to_string(dev.path("cmdline")).unwrap(),
        "console=ttyS0 bootctl.slot=B\n"
    );
    assert_eq!(dev.status("bootcount")["variables"]["bootcount"], "1");

    let before = dev.image();
    let out = dev.ok("bootcount", &["mark-good"]);
    assert!(out.contains("slot B marked good"), "{out}");
    assert_eq!(copies_changed(&before, &dev.image()).len(), 1, "one save");
    let status = dev.status("bootcount");
    assert_eq!(status["trial"], false);
    assert_eq!(status["next"], "B");

    // Confirming again, and later boots, write nothing.
    let before = dev.image();
    dev.ok("bootcount", &["mark-good"]);
    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::B);
    assert_eq!(dev.image(), before);
    let env = dev.env();
    assert_eq!(env.get("bootcmd"), Some("run ddi"));
    assert_eq!(env.get("vendor_x"), Some("keep me"));
}

#[test]
fn bootcount_update_cycle_rolled_back() {
    let dev = Device::new(&[("bootlimit", "2")], Layout::Redundant);
    dev.ok("bootcount", &["set-next", "B"]);
    assert_eq!(
        dev.env().get("bootlimit"),
        Some("2"),
        "integrator's limit kept"
    );
    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::B);
    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::B);
    assert_eq!(dev.boot(SchemeKind::Bootcount), Slot::A);
    let status = dev.status("bootcount");
    assert_eq!(status["booted"], "A");
    assert_eq!(status["next"], "A");
    assert_eq!(status["trial"], false);
    // Confirming the old slot is fine and writes nothing.
    let before = dev.image();
    dev.ok("bootcount", &["mark-good"]);
    assert_eq!(dev.image(), before);
}

#[test]
fn mark_good_on_the_wrong_slot_fails_and_writes_nothing() {
    let dev = Device::new(&[("bootctl_slot", "A")], Layout::Redundant);
    dev.ok("bootcount", &["set-next", "B"]);
    // Still running A (no reboot yet): confirming is refused.
    let before = dev.image();
    let err = one_line_error(&dev.run(&["mark-good"]));
    assert!(err.contains("cannot mark slot A good"), "{err}");
    assert_eq!(dev.image(), before);
}

#[test]
fn mark_bad_moves_away_only_from_the_boot_slot() {
    let dev = Device::new(&[], Layout::Redundant);
    dev.ok("bootcount", &["set-next", "B"]);
    let before = dev.image();
    let out = dev.ok("bootcount", &["mark-bad", "A"]);
    assert!(out.contains("nothing written"), "{out}");
    assert_eq!(dev.image(), before);
    dev.ok("bootcount", &["mark-bad", "B"]);
    let status = dev.status("bootcount");
    assert_eq!(
        (status["next"].as_str(), status["trial"].as_bool()),
        (Some("A"), Some(false))
    );
}

#[test]
fn rauc_cycle_through_the_cli() {
    let dev = Device::new(
        &[
            ("BOOT_ORDER", "A B"),
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "3"),
        ],
        Layout::Redundant,
    );
    dev.ok("rauc", &["--attempts", "12", "set-next", "B"]);
    let vars = dev.status("rauc")["variables"].clone();
    assert_eq!(vars["BOOT_ORDER"], "B A");
    assert_eq!(vars["BOOT_B_LEFT"], "c");
    for _ in 0..12 {
        assert_eq!(dev.boot(SchemeKind::Rauc), Slot::B);
    }
    assert_eq!(dev.status("rauc")["next"], "A");
    assert_eq!(dev.boot(SchemeKind::Rauc), Slot::A);
    assert_eq!(dev.ok("rauc", &["booted"]), "A\n");
    dev.ok("rauc", &["mark-good"]);
    assert_eq!(dev.env().get("BOOT_A_LEFT"), Some("3"));
    dev.ok("rauc", &["mark-bad", "B"]);
    let vars = dev.status("rauc")["variables"].clone();
    assert_eq!(vars["BOOT_ORDER"], "A");
    assert_eq!(vars["BOOT_B_LEFT"], "0");
}

#[test]
fn no_valid_copy_is_a_one_line_error_and_nothing_is_written() {
    let dev = Device::new(&[("bootctl_slot", "A")], Layout::Redundant);
    let mut image = dev.image();
    image[10] ^= 0xff;
    image[ENV_SIZE + 10] ^= 0xff;
    fs::write(dev.path("env.bin"), &image).unwrap();
    for args in [
        &["status", "--json"][..],
        &["set-next", "B"],
        &["mark-bad", "A"],
    ] {
        let err = one_line_error(&dev.run(args));
        assert!(err.contains("no valid"), "{err}");
        assert_eq!(dev.image(), image);
    }
}

#[test]
fn single_copy_environment_is_reported() {
    let dev = Device::new(&[("bootctl_slot", "B")], Layout::Single);
    fs::write(dev.path("cmdline"), "bootctl.slot=B").unwrap();
    let status = dev.status("bootcount");
    assert_eq!(status["redundant"], false);
    assert_eq!(status["next"], "B");
    let text = dev.ok("bootcount", &["status"]);
    assert!(text.contains("redundant: no (single copy"), "{text}");
    dev.ok("bootcount", &["set-next", "A"]);
    assert_eq!(dev.status("bootcount")["next"], "A");
}

#[test]
fn usage_errors_are_one_line_with_status_2() {
    let dev = Device::new(&[], Layout::Redundant);
    for args in [
        &["set-next", "C"][..],
        &["status", "--scheme", "rauc"], // global options go before the command
        &["frobnicate"],
        &[],
    ] {
        let out = dev.run(args);
        one_line_error(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_ddi-bootctl"))
        .args(["--scheme", "grub", "status"])
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("grub"), "{err}");
    // The line names what is missing.
    let err = one_line_error(&dev.run(&["set-next"]));
    assert!(err.contains("<SLOT>"), "{err}");
    let err = one_line_error(&dev.run(&[]));
    assert!(err.contains("subcommand"), "{err}");
    let bare = Command::new(env!("CARGO_BIN_EXE_ddi-bootctl"))
        .output()
        .unwrap();
    let err = one_line_error(&bare);
    assert!(err.contains("a command is required"), "{err}");
    let err = one_line_error(&dev.run(&["--attempts", "0", "set-next", "B"]));
    assert!(err.contains("at least 1"), "{err}");
    assert_eq!(dev.run(&["--help"]).status.code(), Some(0));
}

/// `ddi-bootctl status | head -1`: a reader that is gone ends the command the way it ends
/// `fw_printenv` or `cat` (SIGPIPE), not with a panic's lines on stderr and status 101.
#[test]
fn a_closed_stdout_ends_it_quietly() {
    use std::os::unix::process::ExitStatusExt;
    let dev = Device::new(&[("bootctl_slot", "A")], Layout::Redundant);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = dev
        .command("bootcount")
        .arg("status")
        .stdout(writer)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}", out.status);
}

#[test]
fn missing_config_is_a_one_line_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_ddi-bootctl"))
        .args(["--env-config", "/nonexistent/fw_env.config", "status"])
        .output()
        .unwrap();
    let err = one_line_error(&out);
    assert!(err.contains("/nonexistent/fw_env.config"), "{err}");
}

/// An environment made by U-Boot's `mkenvimage -r`, one copy plus an erased second one.
#[test]
fn works_on_an_image_made_by_mkenvimage() {
    let dir = tempfile::tempdir().unwrap();
    let Some(()) = tool_available("mkenvimage") else {
        return;
    };
    let input = dir.path().join("env.txt");
    fs::write(
        &input,
        "bootcmd=run distro_bootcmd\nBOOT_ORDER=B A\nBOOT_B_LEFT=0\n",
    )
    .unwrap();
    let copy = dir.path().join("copy1.bin");
    let status = Command::new("mkenvimage")
        .args(["-r", "-s", "0x4000", "-o"])
        .arg(&copy)
        .arg(&input)
        .status()
        .unwrap();
    assert!(status.success());
    let mut image = fs::read(&copy).unwrap();
    image.extend(std::iter::repeat_n(0xffu8, ENV_SIZE));
    fs::write(dir.path().join("env.bin"), image).unwrap();
    fs::write(
        dir.path().join("fw_env.config"),
        "env.bin 0x0 0x4000\nenv.bin 0x4000 0x4000\n",
    )
    .unwrap();
    fs::write(dir.path().join("cmdline"), "rauc.slot=A\n").unwrap();
    let dev = Device { dir };
    let status = dev.status("rauc");
    assert_eq!(status["next"], "A");
    assert_eq!(status["variables"]["BOOT_ORDER"], "B A");
    dev.ok("rauc", &["set-next", "B"]);
    assert_eq!(dev.status("rauc")["next"], "B");
    assert_eq!(dev.env().get("bootcmd"), Some("run distro_bootcmd"));
}

/// `Some(())` when `tool` runs; a missing tool fails the test unless `DDI_SKIP_INTEROP=1`.
fn tool_available(tool: &str) -> Option<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if found {
        return Some(());
    }
    if std::env::var("DDI_SKIP_INTEROP").as_deref() == Ok("1") {
        eprintln!("skipping: {tool} not installed and DDI_SKIP_INTEROP=1");
        return None;
    }
    panic!("{tool} is not installed (apt: u-boot-tools); set DDI_SKIP_INTEROP=1 to skip");
}
