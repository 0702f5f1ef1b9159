//! End-to-end installs with the real `ddi-agent` against the test server and a file-backed
//! device: raw, gzip, tar and tar.gz artifacts, dropped connections, resume after a kill and a
//! power cut (raw, gzip, zstd, xz, tar, and gzip or zstd inside a signed bundle), and the
//! failures that must
//! close the action with `failure` and activate nothing (wrong hash, oversize image, corrupt
//! gzip, ambiguous tar, disk full while writing).

use std::time::Duration;

use bootctl::scheme::Slot;
use ddi_sim::{Assignment, Fault, FaultKind, ServerOptions};
use ddi_tests::demo::{closed_result, ended_as, summary};
use ddi_tests::device::{self, DeviceOptions, Image};
use ddi_tests::signing::{image_offset, Vendor};

const CONTROLLER: &str = "install-e2e";
const TOKEN: &str = "install-e2e-token";
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// The board name of the signed bundles (the device's `[bundle] compatible`).
const COMPATIBLE: &str = "acme-gw-rev2";

/// The common rig, its device powered on, with this module's deploy, settle and checks.
struct Rig(ddi_tests::rig::Rig);

impl std::ops::Deref for Rig {
    type Target = ddi_tests::rig::Rig;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl Rig {
    fn new(change: impl FnOnce(&mut DeviceOptions)) -> Rig {
        let rig = ddi_tests::rig::Rig::start(ServerOptions::default(), CONTROLLER, TOKEN, change);
        rig.dev.reboot().unwrap();
        Rig(rig)
    }

    fn deploy(&self, version: &str, filename: &str, artifact: Vec<u8>) -> u64 {
        self.server
            .deploy(
                CONTROLLER,
                version,
                filename,
                artifact,
                &Assignment::forced(),
            )
            .unwrap()
    }

    /// Run `ddi-agent once`, follow reboot requests, until the action is closed (at most
    /// `cycles` runs). Returns the exit codes.
    fn settle(&self, action: u64, cycles: usize) -> Vec<Option<i32>> {
        let mut codes = Vec::new();
        for _ in 0..cycles {
            let out = self.dev.agent_once(AGENT_TIMEOUT).unwrap();
            assert!(!out.timed_out, "agent hung: {}", out.describe());
            codes.push(out.code);
            if self.dev.take_reboot_requests().unwrap() > 0 {
                self.dev.reboot().unwrap();
                continue;
            }
            let view = self.server.action(action).unwrap();
            if closed_result(&view).is_some() {
                break;
            }
        }
        codes
    }

    /// The run after the kill resumes; the update ends installed, without a record.
    fn resume_to_the_end(&self, action: u64, image: &[u8]) {
        let out = self.dev.agent_once(AGENT_TIMEOUT).unwrap();
        assert!(
            out.stderr.contains("resuming download") || out.stdout.contains("resuming download"),
            "{}",
            out.describe()
        );
        self.dev.take_reboot_requests().unwrap();
        self.dev.reboot().unwrap();
        self.settle(action, 3);
        assert_installed(self, action, image);
        let record_path = self.dev.state_dir().join("download.resume");
        assert!(!record_path.exists(), "resume record left behind");
    }

    fn factory(&self) -> Vec<u8> {
        self.dev.options().factory_image.clone()
    }

    /// Nothing was activated: the device runs A with A's factory image, U-Boot boots A next.
    fn assert_nothing_activated(&self) {
        let env = self.dev.env_map().unwrap();
        assert_eq!(
            env.get("bootctl_slot").map(String::as_str),
            Some("A"),
            "{env:?}"
        );
        assert_ne!(
            env.get("upgrade_available").map(String::as_str),
            Some("1"),
            "{env:?}"
        );
        assert_eq!(self.dev.booted().unwrap(), Slot::A);
        assert!(
            self.dev.slot_holds(Slot::A, &self.factory()).unwrap(),
            "slot A changed"
        );
        assert_eq!(self.dev.reboot().unwrap(), Slot::A);
    }

    fn assert_failed_with(&self, action: u64, needle: &str) {
        let view = self.server.action(action).unwrap();
        assert!(ended_as(&view, "failure"), "action: {}", summary(&view));
        let details: Vec<String> = view.feedback.iter().flat_map(|f| f.details()).collect();
        assert!(
            details.iter().any(|d| d.to_lowercase().contains(needle)),
            "no detail mentions {needle:?}: {details:#?}"
        );
    }
}

fn assert_installed(rig: &Rig, action: u64, image: &[u8]) {
    let view = rig.server.action(action).unwrap();
    assert!(ended_as(&view, "success"), "action: {}", summary(&view));
    assert_eq!(rig.dev.booted().unwrap(), Slot::B);
    assert!(
        rig.dev.slot_holds(Slot::B, image).unwrap(),
        "slot B lacks the image"
    );
    let slot_b = rig.dev.slot_bytes(Slot::B).unwrap();
    assert_eq!(
        slot_b.len() as u64,
        rig.dev.options().slot_size,
        "slot size changed"
    );
    assert!(
        rig.dev.slot_holds(Slot::A, &rig.factory()).unwrap(),
        "slot A changed"
    );
}

#[test]
fn raw_gzip_tar_and_tar_gz_artifacts_install() {
    let image = Image::good("2.0", 1536 * 1024);
    for (name, artifact) in [
        ("os.img", image.bytes.clone()),
        ("os.img.gz", image.gzip()),
        ("os.tar", image.tar("rootfs.img")),
        ("os.tar.gz", image.tar_gz("rootfs.img")),
    ] {
        let rig = Rig::new(|_| {});
        let action = rig.deploy("2.0", name, artifact);
        rig.settle(action, 4);
        assert_installed(&rig, action, &image.bytes);
    }
}

#[test]
fn dropped_connections_are_resumed() {
    let rig = Rig::new(|_| {});
    let image = Image::good("2.1", 2 << 20);
    rig.server
        .add_fault(Fault::new(FaultKind::DropAfter { bytes: 300_000 }).times(3));
    let action = rig.deploy("2.1", "os.img", image.bytes.clone());
    rig.settle(action, 4);
    assert_installed(&rig, action, &image.bytes);
}

#[test]
fn wrong_hash_fails_without_activation() {
    let rig = Rig::new(|_| {});
    rig.server.add_fault(Fault::new(FaultKind::WrongHash));
    let image = Image::good("2.2", 1 << 20);
    let action = rig.deploy("2.2", "os.img", image.bytes.clone());
    rig.settle(action, 3);
    rig.assert_failed_with(action, "mismatch");
    rig.assert_nothing_activated();
}

#[test]
fn oversize_image_fails_before_writing() {
    let rig = Rig::new(|o| o.slot_size = 1 << 20);
    let before = rig.dev.slot_bytes(Slot::B).unwrap();
    let image = Image::good("2.3", (1 << 20) + 1);
    let action = rig.deploy("2.3", "os.img", image.bytes.clone());
    rig.settle(action, 3);
    rig.assert_failed_with(action, "does not fit");
    rig.assert_nothing_activated();
    assert_eq!(
        rig.dev.slot_bytes(Slot::B).unwrap(),
        before,
        "slot B was written"
    );
}

#[test]
fn oversize_gzip_image_fails_before_writing() {
    let rig = Rig::new(|o| o.slot_size = 1 << 20);
    let before = rig.dev.slot_bytes(Slot::B).unwrap();
    let image = Image::good("2.8", (1 << 20) + 1);
    let action = rig.deploy("2.8", "os.img.gz", image.gzip());
    rig.settle(action, 3);
    rig.assert_failed_with(action, "does not fit");
    rig.assert_nothing_activated();
    assert_eq!(
        rig.dev.slot_bytes(Slot::B).unwrap(),
        before,
        "slot B was written"
    );
}

#[test]
fn responses_cut_short_are_resumed_to_the_end() {
    let rig = Rig::new(|_| {});
    // Every response is clean but holds only 100 kB: the agent continues with Range requests.
    rig.server
        .add_fault(Fault::new(FaultKind::Truncate { bytes: 100_000 }));
    let image = Image::good("2.4", 1 << 20);
    let action = rig.deploy("2.4", "os.img", image.bytes.clone());
    rig.settle(action, 4);
    assert_installed(&rig, action, &image.bytes);
}

/// A tmpfs of `size` bytes mounted for the test (needs root, which CI has).
struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: u64) -> SmallFs {
        let dir = tempfile::tempdir().unwrap();
        let status = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "ddi-test-full",
            ])
            .arg(dir.path())
            .status()
            .expect("run mount");
        assert!(
            status.success(),
            "mounting a tmpfs failed: this test needs root (as in CI)"
        );
        SmallFs { dir }
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
    }
}

#[test]
fn disk_full_while_writing_fails_without_activation() {
    let rig = Rig::new(|_| {});
    // Slot B becomes a sparse file of the full slot size on a 1 MiB filesystem: writing past
    // 1 MiB fails with ENOSPC, as a failing or full disk would.
    let fs = SmallFs::mount(1 << 20);
    let sparse = fs.dir.path().join("slot-b.img");
    let file = std::fs::File::create(&sparse).unwrap();
    file.set_len(rig.dev.options().slot_size).unwrap();
    drop(file);
    let slot_b = rig.dev.slot_path(Slot::B);
    std::fs::remove_file(&slot_b).unwrap();
    std::os::unix::fs::symlink(&sparse, &slot_b).unwrap();

    let image = Image::good("2.7", 3 << 20);
    let action = rig.deploy("2.7", "os.img", image.bytes.clone());
    rig.settle(action, 3);
    rig.assert_failed_with(action, "no space left");
    rig.assert_nothing_activated();
    assert_eq!(
        std::fs::metadata(&sparse).unwrap().len(),
        rig.dev.options().slot_size,
        "slot size changed"
    );
}

#[test]
fn broken_gzip_fails_without_activation() {
    let rig = Rig::new(|_| {});
    let image = Image::good("2.5", 1 << 20);
    let mut gz = device::gzip(&image.bytes);
    let middle = gz.len() / 2;
    gz[middle] ^= 0x55;
    let action = rig.deploy("2.5", "os.img.gz", gz);
    rig.settle(action, 3);
    let view = rig.server.action(action).unwrap();
    assert!(ended_as(&view, "failure"), "action: {}", summary(&view));
    rig.assert_nothing_activated();
}

#[test]
fn hostile_tar_fails_without_activation() {
    let rig = Rig::new(|_| {});
    let image = Image::good("2.6", 100_000);
    let tar = device::tar_of(&[("README", b"two files"), ("rootfs.img", &image.bytes)]);
    let action = rig.deploy("2.6", "os.tar", tar);
    rig.settle(action, 3);
    rig.assert_failed_with(action, "archive");
    rig.assert_nothing_activated();
}

#[test]
fn restart_mid_download_resumes_from_the_last_checkpoint() {
    let rig = Rig::new(|o| {
        o.slot_size = 24 << 20;
        // ~2 s for the image: time to kill the agent after the first checkpoint (16 MiB).
        o.max_download_rate = Some("10M".into());
    });
    let image = Image::good("2.9", 20 << 20);
    let action = rig.deploy("2.9", "os.img", image.bytes.clone());

    let record = rig.kill_at_the_first_resume_record();
    assert_eq!(record["slot_offset"], 16 << 20, "{record}");
    assert!(rig
        .dev
        .slot_holds(Slot::B, &image.bytes[..16 << 20])
        .unwrap());

    rig.resume_to_the_end(action, &image.bytes);
}

/// A plain gzip image (the common `.wic.gz`) killed after its first checkpoint, then a power
/// cut: the next run continues from the deflate block boundary the record names, downloading
/// only the rest of the artifact.
#[test]
fn a_gzip_image_resumes_after_kill_and_power_cut_from_a_block_boundary() {
    let rig = Rig::new(|o| {
        o.slot_size = 24 << 20;
        // ~2 s for the image: time to kill the agent after the first checkpoint (16 MiB).
        o.max_download_rate = Some("10M".into());
    });
    let image = Image::good("2.9", 20 << 20);
    let gz = image.gzip_best();
    let action = rig.deploy("2.9", "os.img.gz", gz.clone());

    let record = rig.kill_at_the_first_resume_record();
    assert_eq!(rig.dev.reboot().unwrap(), Slot::A); // and a power cut
    assert_eq!(record["format"], "gzip", "{record}");
    let resume_at = record["slot_offset"].as_u64().unwrap();
    let artifact_offset = record["artifact_offset"].as_u64().unwrap();
    // The latest block boundary before the first checkpoint (16 MiB).
    assert!((12 << 20..=16 << 20).contains(&resume_at), "{record}");
    assert!(rig
        .dev
        .slot_holds(Slot::B, &image.bytes[..resume_at as usize])
        .unwrap());

    let before = rig.server.download_log().len();
    rig.resume_to_the_end(action, &image.bytes);
    let resumed = &rig.server.download_log()[before..];
    assert_eq!(
        resumed.first().and_then(|r| r.range.clone()),
        Some(format!("bytes={artifact_offset}-")),
        "{resumed:#?}"
    );
    let served: u64 = resumed.iter().filter_map(|r| r.body_len).sum();
    assert_eq!(served, gz.len() as u64 - artifact_offset, "{resumed:#?}");
    assert!(served < gz.len() as u64 / 3, "{served} of {}", gz.len());
}

/// A gzip image killed at its first and again at a later resume record: the second run
/// resumes from the first record and writes its own (its artifact hash continued from the
/// saved state), the third resumes from that; the image ends intact and each run downloads
/// only from its resume point on.
#[test]
fn a_gzip_image_resumes_twice() {
    let rig = Rig::new(|o| {
        o.slot_size = 40 << 20;
        o.max_download_rate = Some("12M".into());
    });
    let image = Image::good("3.3", 36 << 20);
    let gz = image.gzip_best();
    let action = rig.deploy("3.3", "os.img.gz", gz.clone());
    let first = rig.kill_at_the_first_resume_record();
    assert_eq!(first["format"], "gzip", "{first}");
    let log_len = || rig.server.download_log().len();
    let before_second = log_len();
    let second =
        rig.kill_at_a_resume_record(|r| r["slot_offset"].as_u64() > first["slot_offset"].as_u64());
    assert_eq!(second["format"], "gzip", "{second}");
    assert_eq!(rig.dev.reboot().unwrap(), Slot::A); // a power cut on top
    let before_third = log_len();
    rig.resume_to_the_end(action, &image.bytes);
    let log = rig.server.download_log();
    let range_of = |i: usize| log[i].range.clone();
    assert_eq!(
        range_of(before_second),
        Some(format!("bytes={}-", first["artifact_offset"])),
        "{log:#?}"
    );
    assert_eq!(
        range_of(before_third),
        Some(format!("bytes={}-", second["artifact_offset"])),
        "{log:#?}"
    );
    assert_eq!(log.len(), before_third + 1, "{log:#?}");
}

/// A plain zstd image (`zstd -3`: one frame with a content checksum, blocks of up to 128 KiB)
/// killed after its first checkpoint, then a power cut: the next run continues from the block
/// boundary the record names, downloading only the rest of the artifact.
#[test]
fn a_zstd_image_resumes_after_kill_and_power_cut_from_a_block_boundary() {
    resumes_downloading_only_the_rest("3.6", Packed::Zstd);
}

/// As above, but a byte of slot B's prefix changes between the runs: the prefix's sha256 is
/// not the record's, so the next run drops the record and downloads the whole artifact once,
/// and ends with the right image.
#[test]
fn a_zstd_image_over_a_changed_slot_starts_over() {
    let (resumed, zst_len, _) = compressed_resumed("3.7", true, Packed::Zstd);
    assert_eq!(resumed.len(), 1, "{resumed:#?}");
    assert_eq!(resumed[0].range, None, "{resumed:#?}");
    assert_eq!(resumed[0].body_len, Some(zst_len), "{resumed:#?}");
}

/// A plain xz image as `xz --threads` writes it (blocks of 2 MiB) killed after its first
/// checkpoint, then a power cut: the next run continues from the block the record names,
/// downloading only the rest of the artifact.
#[test]
fn a_threaded_xz_image_resumes_after_kill_and_power_cut_from_a_block_boundary() {
    resumes_downloading_only_the_rest("3.8", Packed::XzThreaded);
}

/// A plain xz image as single-threaded `xz -6` writes it (one block, CRC64, an 8 MiB
/// dictionary) killed after its first checkpoint, then a power cut: the next run continues
/// inside the block, at the LZMA2 chunk boundary the record names (the dictionary read back
/// from slot B), downloading only the rest of the artifact (before, such an image restarted
/// from byte 0).
#[test]
fn a_single_block_xz_image_resumes_after_kill_and_power_cut_inside_its_block() {
    resumes_downloading_only_the_rest("4.3", Packed::XzSingleBlock);
}

/// A tar.gz (`gzip -9`) killed after its first checkpoint, then a power cut: the next run
/// continues from the deflate block boundary in the image member the record names (with the
/// tar's head from the record), downloading only the rest of the artifact.
#[test]
fn a_tar_gz_image_resumes_after_kill_and_power_cut_from_a_point_in_its_image() {
    resumes_downloading_only_the_rest("3.9", Packed::TarGzip);
}

/// A `.wic.gz` (`gzip -9`) as the image member of a signed format-1 bundle, killed after its
/// first checkpoint, then a power cut: the record (`bundle-gzip`) names where the image member
/// starts and a deflate block boundary in it; the next run fetches the bundle's head (manifest,
/// signature, the member's header) again with one Range request to check the signature, and
/// downloads only the rest of the artifact from the boundary's byte.
#[test]
fn a_gzip_image_in_a_signed_bundle_resumes_after_kill_and_power_cut() {
    resumes_downloading_only_the_rest("4.0", Packed::GzipBundle);
}

/// As above for a `zstd -3` image member (`bundle-zstd`): resumed from a block boundary.
#[test]
fn a_zstd_image_in_a_signed_bundle_resumes_after_kill_and_power_cut() {
    resumes_downloading_only_the_rest("4.1", Packed::ZstdBundle);
}

/// A gzip image in a signed bundle killed at its first resume record, and a byte of slot B's
/// prefix changed before the next run: the prefix's sha256 is not the record's, so that run
/// drops the record and downloads the whole bundle once (no download from the resume point),
/// and ends with the right image.
#[test]
fn a_gzip_image_in_a_signed_bundle_over_a_changed_slot_starts_over() {
    let (resumed, len, _) = compressed_resumed("4.2", true, Packed::GzipBundle);
    // The delta probe's look at the head (the bundle is not chunked) comes first; the resume
    // may have fetched the bundle's head again before it read the slot.
    assert_eq!(
        resumed.first().and_then(|r| r.range.clone()),
        Some(DELTA_PROBE.to_string()),
        "{resumed:#?}"
    );
    let whole: Vec<_> = resumed.iter().filter(|r| r.range.is_none()).collect();
    assert_eq!(whole.len(), 1, "{resumed:#?}");
    assert_eq!(whole[0].body_len, Some(len), "{resumed:#?}");
    assert!(
        resumed.last().is_some_and(|r| r.range.is_none()),
        "{resumed:#?}"
    );
    assert!(
        resumed[1..resumed.len() - 1].iter().all(|r| r
            .range
            .as_deref()
            .is_some_and(|r| r.starts_with("bytes=0-"))),
        "a download from inside the artifact: {resumed:#?}"
    );
}

/// The Range of the delta probe, the first request of every install under a signature policy:
/// a look at the artifact's first 64 KiB for a chunked bundle's index.
const DELTA_PROBE: &str = "bytes=0-65535";

/// [`compressed_resumed`] (the slot unchanged); the downloads after the restart: one Range
/// request from the resume point's artifact byte, then only the rest of the artifact (less than
/// a third of it). A signed bundle's record (with a `member_offset`) first has the delta probe's
/// look at the head and one Range request for the head (the bytes before the image member's
/// data), whose signature is checked again.
fn resumes_downloading_only_the_rest(version: &str, packed: Packed) {
    let (resumed, artifact_len, record) = compressed_resumed(version, false, packed);
    let artifact_offset = record["artifact_offset"].as_u64().unwrap();
    let ranges: Vec<Option<String>> = resumed.iter().map(|r| r.range.clone()).collect();
    let rest = Some(format!("bytes={artifact_offset}-"));
    // The bytes served before the rest: the delta probe's 64 KiB and the head.
    let (expected, before_rest) = match record["member_offset"].as_u64() {
        Some(head) => (
            vec![
                Some(DELTA_PROBE.to_string()),
                Some(format!("bytes=0-{}", head - 1)),
                rest,
            ],
            (64 << 10) + head,
        ),
        None => (vec![rest], 0),
    };
    assert_eq!(
        ranges[..expected.len().min(ranges.len())],
        expected,
        "{resumed:#?}"
    );
    let served: u64 = resumed.iter().filter_map(|r| r.body_len).sum();
    assert_eq!(
        served,
        before_rest + artifact_len - artifact_offset,
        "{resumed:#?}"
    );
    assert!(served < artifact_len / 3, "{served} of {artifact_len}");
}

/// How [`compressed_resumed`] compresses its image.
#[derive(Clone, Copy)]
enum Packed {
    /// `zstd -3` (one frame, blocks of up to 128 KiB).
    Zstd,
    /// `xz -3 --threads=2 --block-size=2MiB`.
    XzThreaded,
    /// `xz -6 -T1`: one block.
    XzSingleBlock,
    /// A tar of the image at `gzip -9`.
    TarGzip,
    /// The image at `gzip -9` as the image member of a signed format-1 bundle.
    GzipBundle,
    /// The image at `zstd -3` as the image member of a signed format-1 bundle.
    ZstdBundle,
}

impl Packed {
    fn in_bundle(self) -> bool {
        matches!(self, Packed::GzipBundle | Packed::ZstdBundle)
    }
}

/// A 20 MiB image about as compressible as a file system, deployed `packed` (a bundle signed
/// by a key the device trusts, which requires signatures), the agent killed (-9) at its first
/// resume record and the power cut; with `changed`, a byte of slot B's prefix changes. The next
/// run resumes (or, `changed`, starts over) and the update ends installed. Returns the
/// downloads of that run, the artifact's size and the record.
fn compressed_resumed(
    version: &str,
    changed: bool,
    packed: Packed,
) -> (Vec<ddi_sim::DownloadRequest>, u64, serde_json::Value) {
    let vendor = packed.in_bundle().then(Vendor::new);
    let rig = Rig::new(|o| {
        o.slot_size = 24 << 20;
        // ~2 s for the artifact: time to kill the agent after the first checkpoint (16 MiB).
        o.max_download_rate = Some("6M".into());
        if let Some(vendor) = &vendor {
            o.config_extra = vendor.config(true, COMPATIBLE);
        }
    });
    let image = Image::good(version, 20 << 20).compressible();
    let signed = |name: &str, member: Vec<u8>| {
        let vendor = vendor.as_ref().expect("a bundle's vendor key");
        vendor.bundle(name, &member, COMPATIBLE)
    };
    let (artifact, name, format) = match packed {
        Packed::Zstd => (image.zstd(), "os.img.zst", "zstd"),
        Packed::XzThreaded => (image.xz_threaded(2 << 20), "os.img.xz", "xz"),
        Packed::XzSingleBlock => (image.xz_single_block(), "os.img.xz", "xz"),
        Packed::TarGzip => (image.tar_gz_best("rootfs.img"), "os.tar.gz", "tar-gzip"),
        Packed::GzipBundle => (
            signed("rootfs.img.gz", image.gzip_best()),
            "update.ddib",
            "bundle-gzip",
        ),
        Packed::ZstdBundle => (
            signed("rootfs.img.zst", image.zstd()),
            "update.ddib",
            "bundle-zstd",
        ),
    };
    assert!(
        artifact.len() < image.bytes.len() * 4 / 5,
        "{} bytes",
        artifact.len()
    );
    let action = rig.deploy(version, name, artifact.clone());
    let record = rig.kill_at_the_first_resume_record();
    assert_eq!(rig.dev.reboot().unwrap(), Slot::A); // and a power cut
    assert_eq!(record["format"], format, "{record}");
    let state = match packed {
        Packed::TarGzip => "tar_head",
        Packed::Zstd | Packed::ZstdBundle => "zstd_state",
        Packed::XzThreaded | Packed::XzSingleBlock => "xz_state",
        Packed::GzipBundle => "artifact_sha256_state",
    };
    assert!(record[state].is_string(), "{record}");
    let resume_at = record["slot_offset"].as_u64().unwrap();
    let artifact_offset = record["artifact_offset"].as_u64().unwrap();
    if packed.in_bundle() {
        // The point is in the image member's data, after the head the resume fetches again.
        assert_eq!(record["member_of"], "bundle", "{record}");
        let head = image_offset(&artifact) as u64;
        assert_eq!(record["member_offset"], head, "{record}");
        assert!(head < artifact_offset, "{record}");
    }
    // The latest block boundary before the first checkpoint (16 MiB).
    assert!((12 << 20..=16 << 20).contains(&resume_at), "{record}");
    assert!(artifact_offset < artifact.len() as u64, "{record}");
    assert!(rig
        .dev
        .slot_holds(Slot::B, &image.bytes[..resume_at as usize])
        .unwrap());
    let before = rig.server.download_log().len();
    if changed {
        rig.dev.flip_slot_byte(Slot::B, 4096).unwrap();
        let out = rig.dev.agent_once(AGENT_TIMEOUT).unwrap();
        assert!(
            out.describe()
                .contains("the slot no longer holds what the interrupted install wrote"),
            "{}",
            out.describe()
        );
        rig.dev.take_reboot_requests().unwrap();
        rig.dev.reboot().unwrap();
        rig.settle(action, 3);
        assert_installed(&rig, action, &image.bytes);
        assert!(!rig.dev.state_dir().join("download.resume").exists());
    } else {
        rig.resume_to_the_end(action, &image.bytes);
    }
    let resumed = rig.server.download_log().split_off(before);
    (resumed, artifact.len() as u64, record)
}

/// A raw image in a plain tar killed after its first checkpoint, then a power cut: the next run
/// fetches the tar's head again with one Range request, reads it and the slot's bytes through
/// the tar rules and the artifact hash again, and downloads only from the resume point on.
#[test]
fn a_tar_image_resumes_after_kill_and_power_cut_by_replay() {
    let (resumed, tar_len, resume_at) = tar_resumed_by_replay("3.4", false);
    assert_eq!(resumed.len(), 2, "{resumed:#?}");
    // The image bytes before the resume point were not downloaded again.
    let served: u64 = resumed.iter().filter_map(|r| r.body_len).sum();
    assert_eq!(served, tar_len - resume_at, "{resumed:#?}");
}

/// As above, but slot B's first bytes change between the runs: the replayed bytes fail the
/// artifact hash, and the install starts over from byte 0, once, and ends with the right image.
#[test]
fn a_tar_image_replayed_over_a_changed_slot_starts_over() {
    let (resumed, tar_len, _) = tar_resumed_by_replay("3.5", true);
    assert_eq!(resumed.len(), 3, "{resumed:#?}");
    assert_eq!(resumed[2].range, None, "{resumed:#?}");
    assert_eq!(resumed[2].body_len, Some(tar_len), "{resumed:#?}");
}

/// A 20 MiB image deployed as a plain tar, the agent killed (-9) at its first resume record
/// (the first checkpoint, 16 MiB) and the power cut; with `changed`, a byte of slot B's prefix
/// changes. The next run resumes (the head with one Range request, then from the resume point)
/// and the update ends installed. Returns the downloads of that run, the tar's size and the
/// resume point.
fn tar_resumed_by_replay(
    version: &str,
    changed: bool,
) -> (Vec<ddi_sim::DownloadRequest>, u64, u64) {
    let rig = Rig::new(|o| {
        o.slot_size = 24 << 20;
        // ~2 s for the image: time to kill the agent after the first checkpoint (16 MiB).
        o.max_download_rate = Some("10M".into());
    });
    let image = Image::good(version, 20 << 20);
    let tar = image.tar("rootfs.img");
    let action = rig.deploy(version, "os.tar", tar.clone());
    let record = rig.kill_at_the_first_resume_record();
    assert_eq!(rig.dev.reboot().unwrap(), Slot::A); // and a power cut
    assert_eq!(record["format"], "member", "{record}");
    assert_eq!(record["member_of"], "tar", "{record}");
    assert_eq!(record["member_offset"], 512, "{record}");
    assert_eq!(record["slot_offset"], 16 << 20, "{record}");
    assert_eq!(record["artifact_offset"], 512 + (16 << 20), "{record}");
    assert!(rig
        .dev
        .slot_holds(Slot::B, &image.bytes[..16 << 20])
        .unwrap());
    if changed {
        rig.dev.flip_slot_byte(Slot::B, 4096).unwrap();
    }
    let before = rig.server.download_log().len();
    rig.resume_to_the_end(action, &image.bytes);
    let resumed = rig.server.download_log().split_off(before);
    assert_eq!(
        resumed[0].range.as_deref(),
        Some("bytes=0-511"),
        "{resumed:#?}"
    );
    let rest = format!("bytes={}-", 512 + (16 << 20));
    assert_eq!(resumed[1].range, Some(rest), "{resumed:#?}");
    (resumed, tar.len() as u64, 16 << 20)
}

#[test]
fn download_rate_is_limited() {
    let rig = Rig::new(|o| o.max_download_rate = Some("1M".into()));
    let image = Image::good("3.1", 2 << 20);
    let action = rig.deploy("3.1", "os.img", image.bytes.clone());
    let begin = std::time::Instant::now();
    let out = rig.dev.agent_once(AGENT_TIMEOUT).unwrap();
    let elapsed = begin.elapsed();
    assert_eq!(
        rig.dev.take_reboot_requests().unwrap(),
        1,
        "{}",
        out.describe()
    );
    // 2 MiB at 1 MiB/s.
    assert!(
        elapsed >= Duration::from_millis(1900),
        "took only {elapsed:?}"
    );
    rig.dev.reboot().unwrap();
    rig.settle(action, 3);
    assert_installed(&rig, action, &image.bytes);
}
