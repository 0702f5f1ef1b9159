//! Signed bundles end to end: the real `ddi-agent` installs a bundle signed by a trusted key and
//! confirms it after the reboot; every bad bundle (tampered image or manifest, unknown key,
//! another device's `compatible`, no signature where one is required, manifest not first, an
//! image too large for the slot) closes the action with `failure`, says why, and activates
//! nothing.

use std::path::{Path, PathBuf};

use bootctl::scheme::Slot;
use ddi_bundle::{generate_keypair, CreateOptions, SecretKey};
use ddi_sim::ServerOptions;
use ddi_tests::demo::{ended_as, summary};
use ddi_tests::device::{DeviceOptions, Image};
use ddi_tests::signing::{bundle_config, image_offset, signed_bundle};

const CONTROLLER: &str = "bundle-e2e";
const TOKEN: &str = "bundle-e2e-token";
const COMPATIBLE: &str = "acme-gw-rev2";

/// The common rig, its device trusting the vendor key, with the key pair and this module's
/// deploy, settle and checks.
struct Rig {
    rig: ddi_tests::rig::Rig,
    vendor: SecretKey,
    keys: tempfile::TempDir,
}

impl std::ops::Deref for Rig {
    type Target = ddi_tests::rig::Rig;
    fn deref(&self) -> &Self::Target {
        &self.rig
    }
}

impl Rig {
    fn new(require_signature: bool) -> Rig {
        Rig::with(require_signature, |_| {})
    }

    /// [`Rig::new`] with the device options `change` makes.
    fn with(require_signature: bool, change: impl FnOnce(&mut DeviceOptions)) -> Rig {
        let keys = tempfile::tempdir().unwrap();
        let vendor = generate_keypair().unwrap();
        let vendor_pub = keys.path().join("vendor.pub");
        std::fs::write(&vendor_pub, vendor.public_key().to_text()).unwrap();

        let rig = ddi_tests::rig::Rig::start(ServerOptions::default(), CONTROLLER, TOKEN, |o| {
            o.config_extra = bundle_config(&vendor_pub, require_signature, COMPATIBLE);
            change(o);
        });
        rig.dev.reboot().unwrap();
        Rig { rig, vendor, keys }
    }

    fn bundle(&self, image: &[u8], compatible: &str, key: &SecretKey) -> Vec<u8> {
        bundle_of(self.keys.path(), image, compatible, key)
    }

    fn deploy(&self, version: &str, artifact: Vec<u8>) -> u64 {
        self.deploy_artifact(version, "update.ddib", artifact)
    }

    fn assert_refused(&self, action: u64, needle: &str) {
        let view = self.server.action(action).unwrap();
        assert!(ended_as(&view, "failure"), "action: {}", summary(&view));
        let details: Vec<String> = view.feedback.iter().flat_map(|f| f.details()).collect();
        assert!(
            details
                .iter()
                .any(|d| d.to_lowercase().contains(&needle.to_lowercase())),
            "no detail mentions {needle:?}: {details:#?}"
        );
        // Nothing was activated: the device stays on A with its factory image.
        let env = self.dev.env_map().unwrap();
        assert_eq!(env.get("bootctl_slot").map(String::as_str), Some("A"));
        assert_ne!(env.get("upgrade_available").map(String::as_str), Some("1"));
        assert_eq!(self.dev.reboot().unwrap(), Slot::A);
        let factory = self.dev.options().factory_image.clone();
        assert!(self.dev.slot_holds(Slot::A, &factory).unwrap());
    }
}

/// A bundle of `image` signed by `key` (the image file is written in `dir`).
pub(crate) fn bundle_of(dir: &Path, image: &[u8], compatible: &str, key: &SecretKey) -> Vec<u8> {
    signed_bundle(dir, "rootfs.img.gz", image, compatible, key)
}

#[test]
fn a_signed_gzip_bundle_installs_and_is_confirmed_after_the_reboot() {
    let rig = Rig::new(true);
    let image = Image::good("2.0", 1024 * 1024);
    let action = rig.deploy("2.0", rig.bundle(&image.gzip(), COMPATIBLE, &rig.vendor));
    rig.settle(action);
    let view = rig.server.action(action).unwrap();
    assert!(ended_as(&view, "success"), "action: {}", summary(&view));
    assert_eq!(rig.dev.booted().unwrap(), Slot::B);
    assert!(rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());
}

/// A signed format-1 bundle holding a raw image, the agent killed (-9) at its first resume
/// record and the power cut: the next run fetches the bundle's head again (manifest, signature,
/// the image's header) with one Range request, checks the signature, the signed image hash and
/// the artifact hash over the head, the slot's bytes and the rest, which alone is downloaded
/// again. With slot B's first bytes changed between the runs the signed hash fails, and the
/// install starts over from byte 0, once, and ends with the right image.
#[test]
fn a_signed_raw_image_resumes_after_kill_and_power_cut_by_replay() {
    for changed in [false, true] {
        let rig = Rig::with(true, |o| {
            o.slot_size = 10 << 20;
            // ~2 s for the image: time to kill the agent after the first checkpoint (2 MiB).
            o.max_download_rate = Some("4M".into());
            o.checkpoint_interval = Some("2M".into());
        });
        let image = Image::good("2.0", 8 << 20);
        let bundle = rig.bundle(&image.bytes, COMPATIBLE, &rig.vendor);
        let head = image_offset(&bundle) as u64;
        let action = rig.deploy("2.0", bundle.clone());
        let record = rig.kill_at_the_first_resume_record();
        assert_eq!(rig.dev.reboot().unwrap(), Slot::A);
        assert_eq!(record["format"], "member", "{record}");
        assert_eq!(record["member_of"], "bundle", "{record}");
        assert_eq!(record["member_offset"], head, "{record}");
        let resume_at = record["slot_offset"].as_u64().unwrap();
        assert_eq!(resume_at % (2 << 20), 0, "{record}");
        assert!(rig
            .dev
            .slot_holds(Slot::B, &image.bytes[..resume_at as usize])
            .unwrap());
        if changed {
            rig.dev.flip_slot_byte(Slot::B, 100).unwrap();
        }
        let before = rig.server.download_log().len();
        rig.settle(action);
        let view = rig.server.action(action).unwrap();
        assert!(ended_as(&view, "success"), "action: {}", summary(&view));
        assert_eq!(rig.dev.booted().unwrap(), Slot::B);
        assert!(rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());

        let resumed = &rig.server.download_log()[before..];
        let ranges: Vec<Option<String>> = resumed.iter().map(|r| r.range.clone()).collect();
        // The delta probe's look at the head (the bundle is not chunked), the replay's head,
        // the rest from the resume point; after a changed slot, the whole bundle.
        let mut expected = vec![
            Some(format!("bytes=0-{}", (64 << 10) - 1)),
            Some(format!("bytes=0-{}", head - 1)),
            Some(format!("bytes={}-", head + resume_at)),
        ];
        if changed {
            expected.push(None);
        }
        assert_eq!(ranges, expected, "changed: {changed}, {resumed:#?}");
        let rest = bundle.len() as u64 - head - resume_at;
        assert_eq!(resumed[2].body_len, Some(rest), "{resumed:#?}");
    }
}

#[test]
fn a_tampered_image_is_refused() {
    let rig = Rig::new(true);
    let image = Image::good("2.0", 256 * 1024);
    let mut bundle = rig.bundle(&image.bytes, COMPATIBLE, &rig.vendor);
    let at = image_offset(&bundle) + 1000;
    bundle[at] ^= 0x20;
    // The server hashes what it serves, so only the signed manifest can catch this.
    let action = rig.deploy("2.0", bundle);
    rig.settle(action);
    rig.assert_refused(action, "sha256");
}

#[test]
fn a_tampered_manifest_is_refused() {
    let rig = Rig::new(true);
    let image = Image::good("2.0", 64 * 1024);
    let mut bundle = rig.bundle(&image.bytes, COMPATIBLE, &rig.vendor);
    let pos = bundle
        .windows(COMPATIBLE.len())
        .position(|w| w == COMPATIBLE.as_bytes())
        .unwrap();
    bundle[pos] = b'b';
    let action = rig.deploy("2.0", bundle);
    rig.settle(action);
    rig.assert_refused(action, "does not verify with any trusted key");
}

#[test]
fn a_bundle_signed_by_an_unknown_key_is_refused() {
    let rig = Rig::new(true);
    let stranger = generate_keypair().unwrap();
    let image = Image::good("2.0", 64 * 1024);
    let action = rig.deploy("2.0", rig.bundle(&image.bytes, COMPATIBLE, &stranger));
    rig.settle(action);
    rig.assert_refused(action, &stranger.public_key().key_id());
}

#[test]
fn a_bundle_for_another_board_is_refused_even_when_signatures_are_optional() {
    let rig = Rig::new(false);
    let image = Image::good("2.0", 64 * 1024);
    let action = rig.deploy("2.0", rig.bundle(&image.bytes, "other-board", &rig.vendor));
    rig.settle(action);
    rig.assert_refused(action, "other-board");
}

#[test]
fn an_unsigned_image_is_refused_when_signatures_are_required() {
    let rig = Rig::new(true);
    let image = Image::good("2.0", 64 * 1024);
    let action = rig.deploy("2.0", image.gzip());
    rig.settle(action);
    rig.assert_refused(action, "not a signed bundle");
}

#[test]
fn a_bundle_whose_manifest_is_not_first_is_refused() {
    let rig = Rig::new(true);
    let image = Image::good("2.0", 64 * 1024);
    let bundle = rig.bundle(&image.bytes, COMPATIBLE, &rig.vendor);
    // Same members, image first: a tar that is not a bundle.
    let manifest_len = image_offset(&bundle) - 512;
    let image_member = &bundle[manifest_len..bundle.len() - 1024];
    let mut reordered = image_member.to_vec();
    reordered.extend_from_slice(&bundle[..manifest_len]);
    reordered.extend_from_slice(&[0u8; 1024]);
    let action = rig.deploy("2.0", reordered);
    rig.settle(action);
    rig.assert_refused(action, "not a signed bundle");
}

#[test]
fn a_bundle_image_larger_than_the_slot_is_refused() {
    let rig = Rig::new(true);
    let slot = rig.dev.options().slot_size as usize;
    let image = Image::good("2.0", slot + 4096);
    let slot_b_before = rig.dev.slot_bytes(Slot::B).unwrap();
    let action = rig.deploy("2.0", rig.bundle(&image.bytes, COMPATIBLE, &rig.vendor));
    rig.settle(action);
    rig.assert_refused(action, "bytes that fit");
    // Refused from the signed manifest, before the first image byte reached the slot.
    assert!(rig.dev.slot_bytes(Slot::B).unwrap() == slot_b_before);
}

fn chunked_bundle_of(dir: &Path, image: &[u8], key: &SecretKey) -> Vec<u8> {
    chunked_bundle_as(dir, image, key, ddi_bundle::FORMAT_CHUNKED_CONTEXT)
}

fn chunked_bundle_as(dir: &Path, image: &[u8], key: &SecretKey, format: u32) -> Vec<u8> {
    let path: PathBuf = dir.join("rootfs.ext4");
    std::fs::write(&path, image).unwrap();
    let mut out = Vec::new();
    ddi_bundle::create_chunked_bundle(
        &path,
        &CreateOptions {
            compatible: COMPATIBLE.into(),
            version: "3.0".into(),
            image_name: None,
            compression: None,
            keys: std::slice::from_ref(key),
        },
        &ddi_bundle::ChunkedOptions {
            chunker: ddi_bundle::ChunkerParams::with_average(16 * 1024),
            zstd_level: 3,
            format,
            history: 64 << 10,
        },
        &mut out,
    )
    .unwrap();
    out
}

#[test]
fn a_chunked_bundle_installs_and_is_confirmed_after_the_reboot() {
    let rig = Rig::new(true);
    let image = Image::good("3.0", 1024 * 1024);
    let bundle = chunked_bundle_of(rig.keys.path(), &image.bytes, &rig.vendor);
    let action = rig.deploy("3.0", bundle);
    rig.settle(action);
    let view = rig.server.action(action).unwrap();
    assert!(ended_as(&view, "success"), "action: {}", summary(&view));
    assert_eq!(rig.dev.booted().unwrap(), Slot::B);
    assert!(rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());
}

/// A format-2 bundle (made before format 3) still installs as a full download.
#[test]
fn a_format_2_chunked_bundle_still_installs() {
    let rig = Rig::new(true);
    let image = Image::good("3.0", 512 * 1024);
    let bundle = chunked_bundle_as(
        rig.keys.path(),
        &image.bytes,
        &rig.vendor,
        ddi_bundle::FORMAT_CHUNKED,
    );
    let action = rig.deploy("3.0", bundle);
    rig.settle(action);
    let view = rig.server.action(action).unwrap();
    assert!(ended_as(&view, "success"), "action: {}", summary(&view));
    assert!(rig.dev.slot_holds(Slot::B, &image.bytes).unwrap());
}

#[test]
fn a_tampered_chunk_is_refused() {
    let rig = Rig::new(true);
    let image = Image::good("3.0", 512 * 1024);
    let mut bundle = chunked_bundle_of(rig.keys.path(), &image.bytes, &rig.vendor);
    let read = ddi_bundle::read_unverified(bundle.as_slice()).unwrap();
    let chunk = read.index.unwrap().chunks[2];
    bundle[(read.data_offset + chunk.offset + 10) as usize] ^= 0x08;
    let action = rig.deploy("3.0", bundle);
    rig.settle(action);
    rig.assert_refused(action, "chunk 2");
}
