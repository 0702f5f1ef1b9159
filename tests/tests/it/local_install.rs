//! `ddi-agent install --check SOURCE` on the file-backed device: a good image (raw, gzip, signed
//! bundle) is reported installable with the image's size and sha256; every bad input (missing
//! file, truncated gzip, image larger than the slot, unsigned where a signature is required, a
//! bundle for another board) is refused with a message naming the problem. Either way nothing
//! is written: both slots and the boot environment stay byte for byte what they were.

use std::time::Duration;

use bootctl::scheme::Slot;
use ddi_bundle::{generate_keypair, SecretKey};
use ddi_sim::{Assignment, Fault, FaultKind, ServerOptions, TestServer};
use ddi_tests::device::{sha256_hex, DeviceOptions, FileDevice, Image, DEFAULT_SLOT_SIZE};
use ddi_tests::harness::{run_with_timeout, CommandOutput};

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

#[test]
fn a_url_on_the_server_is_checked_with_the_devices_token() {
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
    let missing = format!(
        "{}/DEFAULT/controller/v1/local-url/softwaremodules/{module}/artifacts/nope.gz",
        server.url()
    );
    let mut cmd = device.agent_command();
    cmd.args(["install", "--check", &missing]);
    assert_refused(&run_with_timeout(cmd, TIMEOUT).unwrap(), "404");
}
