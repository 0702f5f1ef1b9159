//! `ddi-agent install [--check] SOURCE` on the file-backed device (issue 18).
//!
//! `--check`: a good image (raw, gzip, signed bundle) is reported installable with the image's
//! size and sha256; every bad input (missing file, truncated gzip, image larger than the slot,
//! unsigned where a signature is required, a bundle for another board) is refused with a
//! message naming the problem. Either way nothing is written: both slots and the boot
//! environment stay byte for byte what they were.
//!
//! `install SOURCE`: from a file and from the test server's artifact endpoint, activated,
//! rebooted and confirmed by `once` (or rolled back when the health check fails, with the
//! reason in `status`); each bad input fails with the booted slot untouched and the boot entry
//! unchanged; refused while a server action is in progress; kill -9 at random points never
//! leaves an activated slot with a partial image; no feedback ever reaches the server.

use std::time::Duration;

use bootctl::scheme::Slot;
use ddi_bundle::{generate_keypair, SecretKey};
use ddi_sim::{Assignment, Fault, FaultKind, ServerOptions, TestServer};
use ddi_tests::device::{sha256_hex, DeviceOptions, FileDevice, Image, DEFAULT_SLOT_SIZE};
use ddi_tests::harness::{env_number, run_with_timeout, Background, CommandOutput, Rng};

const TIMEOUT: Duration = Duration::from_secs(60);
const COMPATIBLE: &str = "acme-gw-rev2";
/// No server is contacted by a check; nothing listens here.
const NO_SERVER: &str = "http://127.0.0.1:9";

struct Rig {
    device: FileDevice,
    files: tempfile::TempDir,
    vendor: SecretKey,
}

impl Rig {
    fn new(require_signature: bool) -> Rig {
        let files = tempfile::tempdir().unwrap();
        let vendor = generate_keypair().unwrap();
        let vendor_pub = files.path().join("vendor.pub");
        std::fs::write(&vendor_pub, vendor.public_key().to_text()).unwrap();
        let mut options = DeviceOptions::new(NO_SERVER, "local-install", "token");
        options.config_extra = format!(
            "[bundle]\ntrusted_keys = [{:?}]\nrequire_signature = {require_signature}\ncompatible = {COMPATIBLE:?}\n",
            vendor_pub.display().to_string()
        );
        let device = FileDevice::create_temp(options).unwrap();
        device.reboot().unwrap();
        Rig {
            device,
            files,
            vendor,
        }
    }

    fn file(&self, name: &str, bytes: &[u8]) -> String {
        let path = self.files.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path.display().to_string()
    }

    fn bundle(&self, image: &[u8], compatible: &str) -> Vec<u8> {
        crate::bundle_e2e::bundle_of(self.files.path(), image, compatible, &self.vendor)
    }

    /// Runs `install --check SOURCE` and asserts that nothing on the device changed.
    fn check(&self, source: &str) -> CommandOutput {
        let before = self.snapshot();
        let mut cmd = self.device.agent_command();
        cmd.args(["install", "--check", source]);
        let out = run_with_timeout(cmd, TIMEOUT).unwrap();
        assert!(!out.timed_out, "agent hung: {}", out.describe());
        assert!(
            self.snapshot() == before,
            "a check changed the device: {}",
            out.describe()
        );
        out
    }

    /// Both slots, the environment, and the names in the state dir.
    fn snapshot(&self) -> (Vec<u8>, Vec<u8>, Vec<u8>, Vec<String>) {
        let mut state: Vec<String> = std::fs::read_dir(self.device.state_dir())
            .map(|d| {
                d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        state.sort();
        (
            self.device.slot_bytes(Slot::A).unwrap(),
            self.device.slot_bytes(Slot::B).unwrap(),
            std::fs::read(self.device.env_file_path()).unwrap(),
            state,
        )
    }
}

fn assert_installable(out: &CommandOutput, image: &[u8]) {
    assert!(out.success(), "{}", out.describe());
    let expected = format!(
        "image of {} bytes, sha256 {}",
        image.len(),
        sha256_hex(image)
    );
    assert!(out.stdout.contains(&expected), "{}", out.describe());
    assert!(out.stdout.contains("slot B"), "{}", out.describe());
}

fn assert_refused(out: &CommandOutput, needle: &str) {
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.to_lowercase().contains(&needle.to_lowercase()),
        "stderr does not mention {needle:?}: {}",
        out.describe()
    );
}

#[test]
fn good_images_are_installable_and_nothing_is_written() {
    let rig = Rig::new(false);
    let image = Image::good("2.0", 1024 * 1024);
    assert_installable(&rig.check(&rig.file("raw.img", &image.bytes)), &image.bytes);
    assert_installable(&rig.check(&rig.file("img.gz", &image.gzip())), &image.bytes);
    let bundle = rig.bundle(&image.bytes, COMPATIBLE);
    assert_installable(&rig.check(&rig.file("update.ddib", &bundle)), &image.bytes);
}

#[test]
fn bad_inputs_are_refused_with_the_reason() {
    let rig = Rig::new(false);
    let image = Image::good("2.0", 1024 * 1024);

    let missing = rig.files.path().join("no-such.img");
    assert_refused(&rig.check(&missing.display().to_string()), "cannot open");

    let gz = image.gzip();
    let truncated = rig.file("truncated.gz", &gz[..gz.len() / 2]);
    assert_refused(&rig.check(&truncated), "gzip");

    let too_large = Image::good("3.0", DEFAULT_SLOT_SIZE as usize + 4096);
    assert_refused(
        &rig.check(&rig.file("big.img", &too_large.bytes)),
        "does not fit",
    );

    let other_board = rig.bundle(&image.bytes, "someone-elses-board");
    assert_refused(
        &rig.check(&rig.file("other.ddib", &other_board)),
        "someone-elses-board",
    );

    // A directory is not an image.
    assert_refused(
        &rig.check(&rig.files.path().display().to_string()),
        "not a regular file",
    );
}

/// A usage error (the contract: exit 2, one line on stderr) writes nothing either.
#[test]
fn usage_errors_exit_2_with_one_line_and_write_nothing() {
    let rig = Rig::new(false);
    let image = rig.file("raw.img", &Image::good("2.0", 64 * 1024).bytes);
    let before = rig.snapshot();
    for args in [
        &["install"][..],
        &["install", "--bogus", &image],
        &["install", &image, "extra"],
        &["consent", "maybe"],
        &["bogus"],
    ] {
        let out = run_agent(&rig.device, args);
        assert_eq!(out.code, Some(2), "{args:?}: {}", out.describe());
        assert_eq!(
            out.stderr.lines().count(),
            1,
            "{args:?}: {}",
            out.describe()
        );
        assert!(
            out.stderr.starts_with("ddi-agent: error: "),
            "{args:?}: {}",
            out.describe()
        );
    }
    assert!(rig.snapshot() == before, "a usage error changed the device");
}

#[test]
fn an_unsigned_image_is_refused_when_signatures_are_required() {
    let rig = Rig::new(true);
    let image = Image::good("2.0", 256 * 1024);
    assert_refused(
        &rig.check(&rig.file("raw.img", &image.bytes)),
        "not a signed bundle",
    );
    let bundle = rig.bundle(&image.bytes, COMPATIBLE);
    assert_installable(&rig.check(&rig.file("update.ddib", &bundle)), &image.bytes);
}

/// A test server with an image (gzip) assigned to the device (the test server serves a target
/// only the artifacts of its assigned modules), and the device: (server, device, image, the
/// artifact's URL, the action).
fn url_rig() -> (TestServer, FileDevice, Image, String, u64) {
    let server = TestServer::start(ServerOptions::default());
    server
        .create_target("local-url", Some("url-token"))
        .unwrap();
    let image = Image::good("2.0", 1024 * 1024);
    let module = server.create_module("os", "firmware", "2.0");
    server.upload_bytes(module, "img.gz", image.gzip()).unwrap();
    let ds = server
        .create_distribution("firmware", "2.0", &[module])
        .unwrap();
    let action = server
        .assign("local-url", ds, &Assignment::forced())
        .unwrap();
    let device =
        FileDevice::create_temp(DeviceOptions::new(&server.url(), "local-url", "url-token"))
            .unwrap();
    device.reboot().unwrap();
    let url = format!(
        "{}/DEFAULT/controller/v1/local-url/softwaremodules/{module}/artifacts/img.gz",
        server.url()
    );
    (server, device, image, url, action)
}

#[test]
fn a_url_on_the_server_is_checked_with_the_devices_token() {
    let (server, device, image, url, action) = url_rig();
    let mut cmd = device.agent_command();
    cmd.args(["install", "--check", &url]);
    let out = run_with_timeout(cmd, TIMEOUT).unwrap();
    assert_installable(&out, &image.bytes);
    // A check is no answer to the server's action: it got no feedback.
    assert!(server.action(action).unwrap().feedback.is_empty());

    // A connection dropped twice halfway is resumed (Range), as for server downloads.
    server.add_fault(Fault::new(FaultKind::DropAfter { bytes: 200_000 }).times(2));
    let mut cmd = device.agent_command();
    cmd.args(["install", "--check", &url]);
    let out = run_with_timeout(cmd, TIMEOUT).unwrap();
    assert_installable(&out, &image.bytes);
    assert!(
        server.faults().iter().all(|f| f.times == Some(0)) || server.faults().is_empty(),
        "the faults did not trigger: {:?}",
        server.faults()
    );
    let missing = url.replace("img.gz", "nope.gz");
    let mut cmd = device.agent_command();
    cmd.args(["install", "--check", &missing]);
    assert_refused(&run_with_timeout(cmd, TIMEOUT).unwrap(), "404");
}

// ---- install SOURCE ---------------------------------------------------------------------------

impl Rig {
    /// Runs `ddi-agent ARGS` for the device.
    fn agent(&self, args: &[&str]) -> CommandOutput {
        run_agent(&self.device, args)
    }

    fn status(&self) -> serde_json::Value {
        status_json(&self.device)
    }
}

fn run_agent(device: &FileDevice, args: &[&str]) -> CommandOutput {
    let mut cmd = device.agent_command();
    cmd.args(args);
    let out = run_with_timeout(cmd, TIMEOUT).unwrap();
    assert!(!out.timed_out, "agent hung: {}", out.describe());
    out
}

fn status_json(device: &FileDevice) -> serde_json::Value {
    let out = run_agent(device, &["status", "--json"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    serde_json::from_str(&out.stdout).unwrap()
}

/// What must never change when an install fails: the booted slot, and which slot U-Boot boots.
fn boot_entry(device: &FileDevice) -> (Vec<u8>, Option<String>) {
    let env = device.env_map().unwrap();
    (
        device.slot_bytes(Slot::A).unwrap(),
        env.get("bootctl_slot").cloned(),
    )
}

/// Installs `source`, reboots the device as asked and lets `once` confirm; returns the status.
fn install_reboot_confirm(device: &FileDevice, source: &str) -> serde_json::Value {
    let out = run_agent(device, &["install", source]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("activated in slot B"),
        "{}",
        out.describe()
    );
    assert_eq!(device.take_reboot_requests().unwrap(), 1, "no reboot asked");
    let status = status_json(device);
    assert_eq!(status["phase"], "awaiting_reboot");
    assert_eq!(status["action"], serde_json::Value::Null, "{status}");
    assert_eq!(status["local_install"]["target_slot"], "B", "{status}");
    assert_eq!(device.reboot().unwrap(), Slot::B);
    // `once` confirms in its post-reboot step (its poll may fail without a server).
    let out = run_agent(device, &["once"]);
    assert_ne!(out.code, Some(1), "{}", out.describe());
    status_json(device)
}

#[test]
fn a_file_is_installed_activated_and_confirmed_after_the_reboot() {
    let rig = Rig::new(false);
    let factory = rig.device.slot_bytes(Slot::A).unwrap();
    let image = Image::good("2.0", 1024 * 1024);
    let source = rig.file("update.img.gz", &image.gzip());
    let status = install_reboot_confirm(&rig.device, &source);
    assert!(rig.device.slot_holds(Slot::B, &image.bytes).unwrap());
    assert_eq!(rig.device.slot_bytes(Slot::A).unwrap(), factory);
    assert_eq!(status["booted"], "B");
    assert_eq!(status["trial"], false, "not confirmed: {status}");
    assert_eq!(status["phase"], "idle");
    let last = &status["last_local"];
    assert_eq!(last["result"], "success", "{status}");
    assert_eq!(last["source"], source.as_str());
    assert_eq!(last["target_slot"], "B");
    assert!(last["started_at"].as_u64().unwrap() > 1_600_000_000);
    assert_eq!(
        status["last_result"],
        serde_json::Value::Null,
        "no action invented"
    );
    // The human status tells the same.
    let out = rig.agent(&["status"]);
    assert!(
        out.stdout
            .contains(&format!("last local:     {source} into slot B")),
        "{}",
        out.describe()
    );
    assert!(out.stdout.contains("success"), "{}", out.describe());
}

#[test]
fn an_image_failing_its_health_check_is_rolled_back_and_status_says_why() {
    let rig = Rig::new(false);
    let image = Image::broken("2.1", 512 * 1024);
    let source = rig.file("broken.img", &image.bytes);
    let out = rig.agent(&["install", &source]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    rig.device.take_reboot_requests().unwrap();
    assert_eq!(rig.device.reboot().unwrap(), Slot::B);
    rig.agent(&["once"]);
    assert_eq!(
        rig.device.take_reboot_requests().unwrap(),
        1,
        "no reboot back"
    );
    assert_eq!(rig.device.reboot().unwrap(), Slot::A, "not rolled back");
    let status = rig.status();
    let last = &status["last_local"];
    assert_eq!(last["result"], "failure", "{status}");
    let message = last["message"].as_str().unwrap();
    assert!(
        message.contains("health check failed in slot B"),
        "{message}"
    );
    // A later `once` leaves it there.
    rig.agent(&["once"]);
    assert_eq!(rig.device.booted().unwrap(), Slot::A);
    assert_eq!(rig.device.take_reboot_requests().unwrap(), 0);
}

#[test]
fn no_reboot_activates_and_a_second_install_waits_for_the_reboot() {
    let rig = Rig::new(false);
    let image = Image::good("2.0", 256 * 1024);
    let source = rig.file("raw.img", &image.bytes);
    let out = rig.agent(&["install", "--no-reboot", &source]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stdout.contains("reboot to try it"),
        "{}",
        out.describe()
    );
    assert_eq!(rig.device.take_reboot_requests().unwrap(), 0);
    assert_eq!(rig.status()["next"], "B");
    let out = rig.agent(&["install", &source]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr.contains("waits for its reboot"),
        "{}",
        out.describe()
    );
    assert_eq!(rig.device.reboot().unwrap(), Slot::B);
    rig.agent(&["once"]);
    assert_eq!(rig.status()["last_local"]["result"], "success");
}

#[test]
fn bad_inputs_fail_with_the_reason_and_the_booted_slot_untouched() {
    let rig = Rig::new(false);
    let image = Image::good("2.0", 1024 * 1024);
    let gz = image.gzip();
    let missing = rig.files.path().join("no-such.img").display().to_string();
    let too_large = Image::good("3.0", DEFAULT_SLOT_SIZE as usize + 4096);
    let other_board = rig.bundle(&image.bytes, "someone-elses-board");
    let cases = [
        (missing, "cannot open"),
        (rig.file("truncated.gz", &gz[..gz.len() / 2]), "gzip"),
        (rig.file("big.img", &too_large.bytes), "does not fit"),
        (rig.file("other.ddib", &other_board), "someone-elses-board"),
    ];
    for (source, needle) in cases {
        let before = boot_entry(&rig.device);
        let env_before = rig.device.env_vars().unwrap();
        let out = rig.agent(&["install", &source]);
        assert_refused(&out, needle);
        assert_eq!(boot_entry(&rig.device), before, "{}", out.describe());
        if needle == "cannot open" {
            // Refused before the target slot is marked bad: not one variable changed.
            assert_eq!(rig.device.env_vars().unwrap(), env_before);
        }
        assert_eq!(rig.device.take_reboot_requests().unwrap(), 0);
        let status = rig.status();
        assert_eq!(status["phase"], "idle");
        if needle != "cannot open" {
            assert_eq!(status["last_local"]["result"], "failure", "{status}");
        }
    }
    // After all that, a good image still installs.
    install_reboot_confirm(&rig.device, &rig.file("good.img.gz", &gz));
    assert!(rig.device.slot_holds(Slot::B, &image.bytes).unwrap());
}

/// The result lines name SOURCE as it was given (docs/interface.md: `SOURCE: written, …`,
/// `ddi-agent: SOURCE: not installed: …`), as `--check` does; `status` keeps the full path.
#[test]
fn the_result_lines_name_a_relative_source_as_given() {
    let rig = Rig::new(false);
    let image = Image::good("2.0", 256 * 1024);
    let gz = image.gzip();
    rig.file("truncated.gz", &gz[..gz.len() / 2]);
    let full = rig.file("good.img.gz", &gz);
    let in_files = |args: &[&str]| {
        let mut cmd = rig.device.agent_command();
        cmd.args(args).current_dir(rig.files.path());
        let out = run_with_timeout(cmd, TIMEOUT).unwrap();
        assert!(!out.timed_out, "agent hung: {}", out.describe());
        out
    };
    let out = in_files(&["install", "truncated.gz"]);
    assert_eq!(out.code, Some(1), "{}", out.describe());
    assert!(
        out.stderr
            .lines()
            .any(|l| l.starts_with("ddi-agent: truncated.gz: not installed: ")),
        "{}",
        out.describe()
    );
    let out = in_files(&["install", "--no-reboot", "good.img.gz"]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        out.stdout
            .starts_with("good.img.gz: written, verified and activated in slot B; "),
        "{}",
        out.describe()
    );
    let status = rig.status();
    let canonical = std::fs::canonicalize(&full).unwrap();
    assert_eq!(
        status["local_install"]["source"],
        canonical.display().to_string().as_str(),
        "{status}"
    );
}

/// `ddi-agent status | head -1`: a reader that is gone ends `status` as it ends `cat`
/// (SIGPIPE), not with a panic on stderr and status 101.
#[test]
fn status_into_a_closed_pipe_ends_quietly() {
    use std::os::unix::process::ExitStatusExt;
    const SIGPIPE: i32 = 13;
    let rig = Rig::new(false);
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let mut cmd = rig.device.agent_command();
    cmd.arg("status").stdout(writer);
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.signal(), Some(SIGPIPE), "{:?}", out.status);
}

#[test]
fn an_unsigned_image_is_not_installed_when_signatures_are_required() {
    let rig = Rig::new(true);
    let image = Image::good("2.0", 256 * 1024);
    let before = boot_entry(&rig.device);
    let out = rig.agent(&["install", &rig.file("raw.img", &image.bytes)]);
    assert_refused(&out, "not a signed bundle");
    assert_eq!(boot_entry(&rig.device), before);
    let bundle = rig.bundle(&image.bytes, COMPATIBLE);
    install_reboot_confirm(&rig.device, &rig.file("update.ddib", &bundle));
    assert!(rig.device.slot_holds(Slot::B, &image.bytes).unwrap());
}

#[test]
fn a_url_is_installed_resumed_after_drops_and_the_server_hears_nothing() {
    let (server, device, image, url, action) = url_rig();
    // A missing artifact fails, nothing activated.
    let before = boot_entry(&device);
    let out = run_agent(&device, &["install", &format!("{url}.nope")]);
    assert_refused(&out, "404");
    assert_eq!(boot_entry(&device), before);
    // Dropped twice halfway: resumed with Range requests.
    server.add_fault(Fault::new(FaultKind::DropAfter { bytes: 200_000 }).times(2));
    let out = run_agent(&device, &["install", &url]);
    assert_eq!(out.code, Some(0), "{}", out.describe());
    assert!(
        server.faults().iter().all(|f| f.times == Some(0)) || server.faults().is_empty(),
        "the faults did not trigger: {:?}",
        server.faults()
    );
    assert!(device.slot_holds(Slot::B, &image.bytes).unwrap());
    // The local install never answered the server's action, nor made one up.
    assert!(server.action(action).unwrap().feedback.is_empty());
    assert_eq!(server.actions("local-url").len(), 1);
    assert_eq!(device.take_reboot_requests().unwrap(), 1);
    assert_eq!(device.reboot().unwrap(), Slot::B);
    // `once` confirms first, then goes on with the server's action (into slot A).
    run_agent(&device, &["once"]);
    let status = status_json(&device);
    assert_eq!(status["last_local"]["result"], "success", "{status}");
    assert_eq!(status["last_local"]["source"], url.as_str());
}

#[test]
fn a_local_install_is_refused_while_a_server_action_is_in_progress() {
    let server = TestServer::start(ServerOptions::default());
    server.create_target("busy", Some("busy-token")).unwrap();
    let image = Image::good("2.0", 1024 * 1024);
    let module = server.create_module("os", "firmware", "2.0");
    server
        .upload_bytes(module, "img", image.bytes.clone())
        .unwrap();
    let ds = server
        .create_distribution("firmware", "2.0", &[module])
        .unwrap();
    let action = server.assign("busy", ds, &Assignment::forced()).unwrap();
    let device =
        FileDevice::create_temp(DeviceOptions::new(&server.url(), "busy", "busy-token")).unwrap();
    device.reboot().unwrap();
    let files = tempfile::tempdir().unwrap();
    let other = files.path().join("other.img");
    std::fs::write(&other, Image::good("9.9", 256 * 1024).bytes).unwrap();
    let other = other.display().to_string();
    let untouched = |what: &str| {
        let before = (
            device.slot_bytes(Slot::B).unwrap(),
            device.env_vars().unwrap(),
        );
        let out = run_agent(&device, &["install", &other]);
        assert_refused(&out, what);
        assert_eq!(
            (
                device.slot_bytes(Slot::B).unwrap(),
                device.env_vars().unwrap()
            ),
            before,
            "the server's slot was touched"
        );
    };
    // The server's install interrupted halfway (a slow download, the agent killed): in progress.
    server.add_fault(Fault::new(FaultKind::Slow {
        bytes_per_sec: 100_000,
    }));
    let mut cmd = device.agent_command();
    cmd.arg("once");
    let agent = Background::spawn(cmd).unwrap();
    let state = device.state_dir().join("state.json");
    assert!(
        ddi_tests::harness::wait_until(TIMEOUT, Duration::from_millis(50), || {
            std::fs::read_to_string(&state).is_ok_and(|s| s.contains("\"installing\""))
        }),
        "the server's install never started"
    );
    agent.stop().unwrap();
    assert_eq!(status_json(&device)["phase"], "installing");
    untouched(&format!("server action {action} is in progress"));
    // The server's install done and activated: its reboot and confirmation come first.
    server.clear_faults();
    assert_eq!(run_agent(&device, &["once"]).code, Some(0));
    assert_eq!(device.take_reboot_requests().unwrap(), 1);
    untouched(&format!(
        "waits for its reboot and confirmation (server action {action})"
    ));
    assert!(server
        .action(action)
        .unwrap()
        .feedback
        .iter()
        .all(|f| f.execution() != Some("closed")));
}

/// kill -9 at random points of a local install: the slot U-Boot boots never holds a partial
/// image, the booted slot is never touched, and whatever was left is settled by the next start.
/// `DDI_TRIALS` sets the number of trials (default 4), `DDI_SEED` replays a run.
#[test]
fn kill_9_during_a_local_install_never_leaves_a_partial_bootable_slot() {
    let trials = env_number("DDI_TRIALS").unwrap_or(4);
    let seed = env_number("DDI_SEED").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
            | 1
    });
    println!("DDI_SEED={seed} DDI_TRIALS={trials}");
    let mut rng = Rng(seed);
    let rig = Rig::new(false);
    let image = Image::good("2.0", 3 * 1024 * 1024);
    let source = rig.file("update.img.gz", &image.gzip());
    for trial in 0..trials {
        let booted = rig.device.booted().unwrap();
        let target = booted.other();
        let running = rig.device.slot_bytes(booted).unwrap();
        let delay = Duration::from_millis(rng.below(1500));
        let mut cmd = rig.device.agent_command();
        cmd.args(["install", "--no-reboot", &source]);
        let mut agent = Background::spawn(cmd).unwrap();
        let deadline = std::time::Instant::now() + delay;
        while std::time::Instant::now() < deadline && agent.try_exit().unwrap().is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        let out = agent.stop().unwrap();
        let context = format!("trial {trial}, killed after {delay:?}: {}", out.describe());
        let env = rig.device.env_map().expect("environment valid");
        assert_eq!(
            rig.device.slot_bytes(booted).unwrap(),
            running,
            "booted slot changed; {context}"
        );
        if env.get("bootctl_slot").map(String::as_str) == Some(&target.to_string()) {
            assert!(
                rig.device.slot_holds(target, &image.bytes).unwrap(),
                "slot {target} activated with a partial image; {context}"
            );
        }
        // Power cut, then the agent's post-reboot step settles whatever was left (an activation
        // the cut interrupted is done again and rebooted into).
        let mut now = rig.device.reboot().unwrap();
        for _ in 0..3 {
            rig.agent(&["once"]);
            if rig.device.take_reboot_requests().unwrap() == 0 {
                break;
            }
            now = rig.device.reboot().unwrap();
        }
        let status = rig.status();
        assert_eq!(status["phase"], "idle", "{status}; {context}");
        if now == target {
            assert_eq!(status["last_local"]["result"], "success", "{context}");
            assert!(rig.device.slot_holds(target, &image.bytes).unwrap());
        }
    }
}

/// With the agent service running (it holds the agent lock), `install` changes nothing and says
/// to stop the service first (docs/interface.md).
#[test]
fn an_install_while_the_agent_service_runs_is_refused() {
    let rig = Rig::new(false);
    let lock = std::fs::File::create(rig.device.dir().join("agent.lock")).unwrap();
    bootctl::fsutil::flock_exclusive(&lock, false).unwrap();
    let image = Image::good("2.0", 256 * 1024);
    let source = rig.file("raw.img", &image.bytes);
    let before = rig.snapshot();
    let out = rig.agent(&["install", &source]);
    assert_eq!(out.code, Some(2), "{}", out.describe());
    assert!(
        out.stderr.contains("another ddi-agent is running"),
        "{}",
        out.describe()
    );
    assert!(rig.snapshot() == before, "{}", out.describe());
    drop(lock);
    install_reboot_confirm(&rig.device, &source);
}
