//! The tamper suite of "never bricked, proven": one genuine signed bundle made with `ddi-bundle`,
//! and every way of tampering with it (or replacing it) that the signature must stop, each
//! installed by the real `ddi-agent` on a device with `require_signature = true`.
//!
//! The test server serves every artifact with its own sha256, so the outer hash always matches
//! and only the signed manifest can refuse the bytes. For every case, under both slot schemes:
//! the action ends `closed`/`failure` exactly once with a detail naming the problem; after every
//! agent run and every reboot the slot U-Boot would boot holds the factory image or the signed
//! image, never other bytes; at the end the factory slot is the one U-Boot boots, it is booted
//! and confirmed (not on trial), the slot the agent wrote is marked bad, and the factory slot's
//! bytes are untouched. A positive control installs the genuine bundle and ends
//! `closed`/`success`, so the suite can fail.
//!
//! Needs `cargo build --workspace --bins` first (the agent binary).

use std::ops::Range;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use bootctl::scheme::{rauc_vars, SchemeKind, Slot};
use ddi_bundle::{create_bundle, generate_keypair, BundleReader, CreateOptions, Policy, SecretKey};
use ddi_sim::{ActionView, Assignment, ServerOptions, TestServer};
use ddi_tests::demo::{closed_result, ended_as, summary};
use ddi_tests::device::{tar_member_ranges, tar_of, DeviceOptions, FileDevice, Health, Image};

const TOKEN: &str = "tamper-token";
const COMPATIBLE: &str = "acme-gw-rev2";
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Small slots keep the suite fast; the signed image leaves room for the swapped-in ones.
const SLOT_SIZE: u64 = 512 * 1024;
const FACTORY_SIZE: usize = 128 * 1024;
const SIGNED_SIZE: usize = 256 * 1024;
/// The image an attacker wants on the device: a good one, so it would pass the health check
/// and be confirmed if it ever got activated.
const INTRUDER_SIZE: usize = 64 * 1024;
const SCHEMES: [SchemeKind; 2] = [SchemeKind::Bootcount, SchemeKind::Rauc];
/// Agent runs allowed for one action to close.
const MAX_RUNS: usize = 6;

/// The genuine bundle and what the tampers are made of.
struct Genuine {
    keys: tempfile::TempDir,
    /// The image the vendor signed.
    image: Image,
    /// The signed bundle of `image`, made by `ddi-bundle`.
    bundle: Vec<u8>,
    /// Where the image member's data is in `bundle`.
    image_range: Range<usize>,
    /// Where `manifest.json`'s data is in `bundle`.
    manifest_range: Range<usize>,
    intruder: Image,
    /// A key the device does not trust.
    stranger: SecretKey,
}

impl Genuine {
    fn get() -> &'static Genuine {
        static GENUINE: OnceLock<Genuine> = OnceLock::new();
        GENUINE.get_or_init(|| {
            let keys = tempfile::tempdir().unwrap();
            let vendor = generate_keypair().unwrap();
            std::fs::write(
                keys.path().join("vendor.pub"),
                vendor.public_key().to_text(),
            )
            .unwrap();
            let image = Image::good("2.0", SIGNED_SIZE);
            let bundle = bundle_of(keys.path(), &image.bytes, &vendor);
            let members = tar_member_ranges(&bundle);
            assert_eq!(members.len(), 3, "a bundle has three members");
            let image_range = members[2].clone();
            assert_eq!(bundle[image_range.clone()], image.bytes[..]);
            // The genuine bundle verifies with the vendor key: the tampers start from good bytes.
            let policy = Policy {
                trusted_keys: vec![vendor.public_key()],
                compatible: Some(COMPATIBLE.into()),
                max_image_size: None,
            };
            let mut reader = BundleReader::open(&bundle[..], &policy).unwrap();
            std::io::copy(&mut reader, &mut std::io::sink()).unwrap();
            Genuine {
                image,
                image_range,
                manifest_range: members[0].clone(),
                bundle,
                keys,
                intruder: Image::new("intruder", "6.6", Health::Good, INTRUDER_SIZE),
                stranger: generate_keypair().unwrap(),
            }
        })
    }

    fn trusted_key_path(&self) -> std::path::PathBuf {
        self.keys.path().join("vendor.pub")
    }

    /// The genuine bundle with its image member's bytes replaced by `replacement`, zero-padded
    /// to the signed size (headers, manifest and signature untouched).
    fn image_swapped_for(&self, replacement: &[u8]) -> Vec<u8> {
        let range = self.image_range.clone();
        assert!(replacement.len() <= range.len(), "replacement too large");
        let mut bundle = self.bundle.clone();
        let member = &mut bundle[range];
        member.fill(0);
        member[..replacement.len()].copy_from_slice(replacement);
        bundle
    }

    fn flipped_at(&self, at: usize) -> Vec<u8> {
        let mut bundle = self.bundle.clone();
        bundle[at] ^= 0x01;
        bundle
    }
}

fn bundle_of(dir: &Path, image: &[u8], key: &SecretKey) -> Vec<u8> {
    // A file of its own: cases run in parallel threads.
    let file = tempfile::NamedTempFile::new_in(dir).unwrap();
    std::fs::write(file.path(), image).unwrap();
    let mut out = Vec::new();
    create_bundle(
        file.path(),
        &CreateOptions {
            compatible: COMPATIBLE.into(),
            version: "2.0".into(),
            image_name: Some("rootfs.img".into()),
            compression: None,
            keys: std::slice::from_ref(key),
        },
        &mut out,
    )
    .unwrap();
    out
}

/// One way of tampering: the artifact served, and what the failure detail must mention.
struct Case {
    name: &'static str,
    artifact: fn(&Genuine) -> Vec<u8>,
    needle: fn(&Genuine) -> String,
}

fn signed_hash_mismatch(_: &Genuine) -> String {
    "sha256".into()
}

fn signature_does_not_verify(_: &Genuine) -> String {
    "does not verify with any trusted key".into()
}

fn not_a_bundle(_: &Genuine) -> String {
    "not a signed bundle".into()
}

const CASES: &[Case] = &[
    Case {
        name: "image swapped for a tar of another image",
        artifact: |g| g.image_swapped_for(&g.intruder.tar("rootfs.img")),
        needle: signed_hash_mismatch,
    },
    Case {
        name: "image swapped for a gzip of another image",
        artifact: |g| g.image_swapped_for(&g.intruder.gzip()),
        needle: signed_hash_mismatch,
    },
    Case {
        name: "image swapped for a tar.gz of another image",
        artifact: |g| g.image_swapped_for(&g.intruder.tar_gz("rootfs.img")),
        needle: signed_hash_mismatch,
    },
    Case {
        name: "image swapped for other raw bytes",
        artifact: |g| g.image_swapped_for(&g.intruder.bytes),
        needle: signed_hash_mismatch,
    },
    Case {
        name: "byte flipped at the start of the image",
        artifact: |g| g.flipped_at(g.image_range.start),
        needle: signed_hash_mismatch,
    },
    Case {
        name: "byte flipped in the middle of the image",
        artifact: |g| g.flipped_at(g.image_range.start + g.image_range.len() / 2),
        needle: signed_hash_mismatch,
    },
    Case {
        name: "byte flipped at the end of the image",
        artifact: |g| g.flipped_at(g.image_range.end - 1),
        needle: signed_hash_mismatch,
    },
    Case {
        name: "byte flipped in the manifest",
        artifact: |g| g.flipped_at(g.manifest_range.start + g.manifest_range.len() / 2),
        needle: signature_does_not_verify,
    },
    Case {
        name: "bundle truncated in the middle of the image",
        artifact: |g| g.bundle[..g.image_range.start + g.image_range.len() / 2].to_vec(),
        needle: |g| format!("the signed manifest says {}", g.image.bytes.len()),
    },
    Case {
        name: "a member after the image",
        artifact: |g| {
            let extra = tar_of(&[("payload.sh", b"#!/bin/sh\necho owned\n".as_slice())]);
            // The extra member goes where the end-of-archive marker (two zero blocks) was.
            let end_marker = g.bundle.len() - 1024;
            let mut bundle = g.bundle[..end_marker].to_vec();
            bundle.extend_from_slice(&extra);
            bundle
        },
        needle: |_| "\"payload.sh\" follows the image".into(),
    },
    Case {
        name: "the manifest's compatible edited",
        artifact: |g| {
            let manifest = &g.bundle[g.manifest_range.clone()];
            let at = manifest
                .windows(COMPATIBLE.len())
                .position(|w| w == COMPATIBLE.as_bytes())
                .expect("the manifest names the compatible");
            let mut bundle = g.bundle.clone();
            let end = g.manifest_range.start + at + COMPATIBLE.len();
            // Same length, so the archive stays well-formed: another board's bundle.
            bundle[end - 1] = b'9';
            bundle
        },
        needle: signature_does_not_verify,
    },
    Case {
        name: "signed by another key",
        artifact: |g| bundle_of(g.keys.path(), &g.image.bytes, &g.stranger),
        needle: |g| {
            format!(
                "signed by key(s) {} (ed25519)",
                g.stranger.public_key().key_id()
            )
        },
    },
    Case {
        name: "unsigned raw image",
        artifact: |g| g.intruder.bytes.clone(),
        needle: not_a_bundle,
    },
    Case {
        name: "unsigned gzip image",
        artifact: |g| g.intruder.gzip(),
        needle: not_a_bundle,
    },
    Case {
        name: "unsigned tar of an image",
        artifact: |g| g.intruder.tar("rootfs.img"),
        needle: not_a_bundle,
    },
];

/// One device running one artifact through the whole cycle, checking the invariants after every
/// agent run and every reboot.
struct Run<'a> {
    ctx: String,
    server: &'a TestServer,
    device: FileDevice,
    action: u64,
    factory_slot: Vec<u8>,
    signed: &'a [u8],
    log: Vec<String>,
}

impl<'a> Run<'a> {
    fn start(
        server: &'a TestServer,
        name: &str,
        scheme: SchemeKind,
        artifact: Vec<u8>,
        signed: &'a [u8],
    ) -> Run<'a> {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let controller = format!("tamper-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let genuine = Genuine::get();
        server.create_target(&controller, Some(TOKEN)).unwrap();
        let mut options = DeviceOptions::new(&server.url(), &controller, TOKEN);
        options.scheme = scheme;
        options.slot_size = SLOT_SIZE;
        options.factory_image = Image::new("factory", "1.0", Health::Good, FACTORY_SIZE).bytes;
        options.config_extra = format!(
            "[bundle]\ntrusted_keys = [{:?}]\nrequire_signature = true\ncompatible = {COMPATIBLE:?}\n",
            genuine.trusted_key_path().display().to_string()
        );
        let device = FileDevice::create_temp(options).unwrap();
        device.reboot().unwrap();
        let factory_slot = device.slot_bytes(Slot::A).unwrap();
        let action = server
            .deploy(
                &controller,
                "2.0",
                "update.ddib",
                artifact,
                &Assignment::forced(),
            )
            .unwrap();
        let run = Run {
            ctx: format!("case {name:?} ({})", scheme.as_str()),
            server,
            device,
            action,
            factory_slot,
            signed,
            log: Vec::new(),
        };
        run.check_bootable("at start");
        run
    }

    fn view(&self) -> ActionView {
        self.server.action(self.action).unwrap()
    }

    fn slot_holds_exactly(&self, slot: Slot, image: &[u8]) -> bool {
        self.device.slot_holds(slot, image).unwrap()
    }

    /// Unsigned bytes are never in a slot U-Boot would boot (or in the running one): that slot
    /// holds the untouched factory slot or exactly the signed image.
    fn check_bootable(&self, when: &str) {
        let status = self.device.boot_control().unwrap().status().unwrap();
        let booted = self.device.booted().unwrap();
        for (role, slot) in [("would boot next", status.next), ("is running", booted)] {
            let ok = match slot {
                Slot::A => self.device.slot_bytes(Slot::A).unwrap() == self.factory_slot,
                Slot::B => self.slot_holds_exactly(Slot::B, self.signed),
            };
            assert!(
                ok,
                "{}: {when}: slot {slot} {role} but holds neither the factory slot nor the signed \
                 image (it starts {:?}); U-Boot variables {:?}; steps {:?}",
                self.ctx,
                self.slot_header(slot),
                status.variables,
                self.log
            );
        }
    }

    fn slot_header(&self, slot: Slot) -> String {
        let bytes = self.device.slot_bytes(slot).unwrap();
        String::from_utf8_lossy(&bytes[..64]).into_owned()
    }

    fn agent_once(&mut self) {
        let out = self.device.agent_once(AGENT_TIMEOUT).unwrap();
        assert!(
            !out.timed_out,
            "{}: agent hung: {}",
            self.ctx,
            out.describe()
        );
        self.log.push(format!("agent once (exit {:?})", out.code));
        self.check_bootable("after an agent run");
        if self.device.take_reboot_requests().unwrap() > 0 {
            self.reboot();
        }
    }

    fn reboot(&mut self) {
        let slot = self.device.reboot().unwrap();
        self.log.push(format!("reboot into {slot}"));
        self.check_bootable("after a reboot");
    }

    /// Run the agent (following reboot requests) until the action is closed, then once more:
    /// nothing is closed twice.
    fn settle(&mut self) {
        for _ in 0..MAX_RUNS {
            self.agent_once();
            let view = self.view();
            if closed_result(&view).is_some() && !view.active {
                self.agent_once();
                return;
            }
        }
        panic!(
            "{}: the action never closed: {}; steps {:?}",
            self.ctx,
            summary(&self.view()),
            self.log
        );
    }

    /// `slot` is what U-Boot boots, it is running and confirmed (no trial).
    fn assert_confirmed(&self, slot: Slot, when: &str) {
        let control = self.device.boot_control().unwrap();
        let status = control.status().unwrap();
        let ctx = format!(
            "{}: {when}: variables {:?}; steps {:?}",
            self.ctx, status.variables, self.log
        );
        assert_eq!(status.next, slot, "{ctx}: U-Boot's next slot");
        assert_eq!(self.device.booted().unwrap(), slot, "{ctx}: running slot");
        match status.scheme {
            SchemeKind::Bootcount => {
                assert_eq!(status.trial, Some(false), "{ctx}: a trial is on")
            }
            SchemeKind::Rauc => {
                // Confirmed = its attempts counter is full again (a trial counts down).
                let attempts = format!("{:x}", self.device.options().attempts);
                assert_eq!(
                    status.variables.get(rauc_vars::left(slot)),
                    Some(&attempts),
                    "{ctx}: slot {slot} not confirmed"
                );
            }
        }
    }

    /// U-Boot can never boot `slot`.
    fn assert_marked_bad(&self, slot: Slot, when: &str) {
        let status = self.device.boot_control().unwrap().status().unwrap();
        let vars = &status.variables;
        let ctx = format!(
            "{}: {when}: variables {vars:?}; steps {:?}",
            self.ctx, self.log
        );
        assert_ne!(status.next, slot, "{ctx}: U-Boot would boot slot {slot}");
        match status.scheme {
            SchemeKind::Bootcount => {
                assert_ne!(
                    vars.get("bootctl_slot").map(String::as_str),
                    Some(slot.as_str()),
                    "{ctx}"
                );
                assert_ne!(
                    vars.get("upgrade_available").map(String::as_str),
                    Some("1"),
                    "{ctx}"
                );
            }
            SchemeKind::Rauc => {
                assert_eq!(
                    vars.get(rauc_vars::left(slot)).map(String::as_str),
                    Some("0"),
                    "{ctx}: slot {slot} has attempts left"
                );
                let order = vars
                    .get(rauc_vars::BOOT_ORDER)
                    .map(String::as_str)
                    .unwrap_or("");
                assert!(
                    !order.split_whitespace().any(|s| s == slot.as_str()),
                    "{ctx}: slot {slot} is in BOOT_ORDER"
                );
            }
        }
    }
}

/// Runs one tamper case on a fresh device; panics with the case named on any violation.
fn run_tamper(server: &TestServer, case: &Case, scheme: SchemeKind) {
    let genuine = Genuine::get();
    let mut run = Run::start(
        server,
        case.name,
        scheme,
        (case.artifact)(genuine),
        &genuine.image.bytes,
    );
    run.settle();
    let view = run.view();
    assert!(
        ended_as(&view, "failure"),
        "{}: expected closed/failure exactly once, got {}; details {:?}; steps {:?}",
        run.ctx,
        summary(&view),
        view.details(),
        run.log
    );
    let needle = (case.needle)(genuine);
    let closed_details: Vec<String> = view
        .feedback
        .iter()
        .filter(|f| f.execution() == Some("closed"))
        .flat_map(|f| f.details())
        .collect();
    assert!(
        closed_details
            .iter()
            .any(|d| d.to_lowercase().contains(&needle.to_lowercase())),
        "{}: no detail of the closed feedback names the problem ({needle:?}): {closed_details:#?}",
        run.ctx
    );
    run.assert_confirmed(Slot::A, "after the cycle");
    run.assert_marked_bad(Slot::B, "after the cycle");
    run.reboot();
    run.agent_once();
    run.assert_confirmed(Slot::A, "after a reboot");
    run.assert_marked_bad(Slot::B, "after a reboot");
    assert!(
        ended_as(&run.view(), "failure"),
        "{}: after a reboot: {}",
        run.ctx,
        summary(&run.view())
    );
    assert!(
        run.device.slot_bytes(Slot::A).unwrap() == run.factory_slot,
        "{}: the factory slot's bytes changed",
        run.ctx
    );
}

/// Runs `job` for every item on a few threads; returns the panic message of each failed item.
fn in_parallel<T: Sync>(items: &[T], job: impl Fn(&T) + Sync) -> Vec<String> {
    let next = AtomicUsize::new(0);
    let failures = Mutex::new(Vec::new());
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(2)
        .clamp(2, 4);
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(item) = items.get(i) else { return };
                let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(item)));
                if let Err(panic) = result {
                    let message = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panic without a message".into());
                    failures.lock().unwrap().push(message);
                }
            });
        }
    });
    failures.into_inner().unwrap()
}

#[test]
fn every_tamper_ends_in_failure_on_the_confirmed_factory_slot() {
    let started = Instant::now();
    let server = TestServer::start(ServerOptions::default());
    let jobs: Vec<(&Case, SchemeKind)> = CASES
        .iter()
        .flat_map(|case| SCHEMES.iter().map(move |&scheme| (case, scheme)))
        .collect();
    let failures = in_parallel(&jobs, |&(case, scheme)| run_tamper(&server, case, scheme));
    println!(
        "tamper suite: {} cases x {} schemes in {:?}, {} failed",
        CASES.len(),
        SCHEMES.len(),
        started.elapsed(),
        failures.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} tamper runs got through:\n{}",
        failures.len(),
        jobs.len(),
        failures.join("\n\n")
    );
}

#[test]
fn the_genuine_bundle_installs_and_is_confirmed() {
    let genuine = Genuine::get();
    let server = TestServer::start(ServerOptions::default());
    let failures = in_parallel(&SCHEMES, |&scheme| {
        let mut run = Run::start(
            &server,
            "genuine bundle",
            scheme,
            genuine.bundle.clone(),
            &genuine.image.bytes,
        );
        run.settle();
        let view = run.view();
        assert!(
            ended_as(&view, "success"),
            "{}: expected closed/success, got {}; details {:?}; steps {:?}",
            run.ctx,
            summary(&view),
            view.details(),
            run.log
        );
        run.assert_confirmed(Slot::B, "after the cycle");
        assert!(
            run.slot_holds_exactly(Slot::B, &genuine.image.bytes),
            "{}: slot B does not hold the signed image",
            run.ctx
        );
        run.reboot();
        run.agent_once();
        run.assert_confirmed(Slot::B, "after a reboot");
        assert!(
            run.device.slot_bytes(Slot::A).unwrap() == run.factory_slot,
            "{}: the factory slot's bytes changed",
            run.ctx
        );
    });
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
