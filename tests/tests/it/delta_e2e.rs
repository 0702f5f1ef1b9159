//! Delta updates end to end (issue 20): the real `ddi-agent` installs a signed chunked bundle on
//! a file-backed device running the previous image, reusing the chunks slot A already holds and
//! fetching the others with Range requests from `ddi-sim`, whose download log shows what was
//! requested. Also: a tampered downloaded chunk is refused, a modified running slot still gives
//! the right image, a server without Range support gets a full download (and one that stops
//! honouring Range after the probe still gives the image), and a kill -9 in the middle resumes
//! without fetching the finished chunks again.

use std::path::Path;
use std::time::{Duration, Instant};

use bootctl::scheme::Slot;
use ddi_bundle::{
    create_chunked_bundle, generate_keypair, read_unverified, ChunkedOptions, ChunkerParams,
    CreateOptions, SecretKey, UnverifiedBundle,
};
use ddi_sim::{DownloadRequest, Fault, FaultKind, ServerOptions};
use ddi_tests::demo::{ended_as, summary};
use ddi_tests::device::Image;
use ddi_tests::harness::{Background, CommandOutput};

const CONTROLLER: &str = "delta-e2e";
const TOKEN: &str = "delta-e2e-token";
const COMPATIBLE: &str = "acme-gw-rev2";
const AGENT_TIMEOUT: Duration = Duration::from_secs(90);
const AVERAGE_CHUNK: u32 = 16 * 1024;

/// The common rig, its device running `v1` and trusting the vendor key.
struct Rig {
    rig: ddi_tests::rig::Rig,
    vendor: SecretKey,
    keys: tempfile::TempDir,
    /// What slot A holds (the version the device runs).
    v1: Vec<u8>,
}

impl std::ops::Deref for Rig {
    type Target = ddi_tests::rig::Rig;
    fn deref(&self) -> &Self::Target {
        &self.rig
    }
}

impl Rig {
    /// A device running `v1` (of `size` bytes) in slot A, slots of `slot_size` bytes.
    fn new(size: usize, slot_size: u64) -> Rig {
        let keys = tempfile::tempdir().unwrap();
        let vendor = generate_keypair().unwrap();
        let vendor_pub = keys.path().join("vendor.pub");
        std::fs::write(&vendor_pub, vendor.public_key().to_text()).unwrap();
        let v1 = Image::good("1.0", size).bytes;
        let rig = ddi_tests::rig::Rig::start(ServerOptions::default(), CONTROLLER, TOKEN, |o| {
            o.slot_size = slot_size;
            o.factory_image = v1.clone();
            o.config_extra = format!(
                "[bundle]\ntrusted_keys = [{:?}]\nrequire_signature = true\ncompatible = {COMPATIBLE:?}\n",
                vendor_pub.display().to_string()
            );
        });
        rig.dev.reboot().unwrap();
        Rig {
            rig,
            vendor,
            keys,
            v1,
        }
    }

    /// A format-3 bundle of `image`.
    fn bundle(&self, image: &[u8]) -> Vec<u8> {
        self.bundle_as(image, ddi_bundle::FORMAT_CHUNKED_CONTEXT)
    }

    fn bundle_as(&self, image: &[u8], format: u32) -> Vec<u8> {
        chunked_bundle(self.keys.path(), image, &self.vendor, format)
    }

    fn deploy(&self, artifact: Vec<u8>) -> u64 {
        self.deploy_artifact("2.0", "update.ddib", artifact)
    }

    fn assert_success(&self, action: u64, image: &[u8]) {
        let view = self.server.action(action).unwrap();
        assert!(ended_as(&view, "success"), "action: {}", summary(&view));
        assert_eq!(self.dev.booted().unwrap(), Slot::B);
        assert!(self.dev.slot_holds(Slot::B, image).unwrap());
    }

    fn details(&self, action: u64) -> Vec<String> {
        let view = self.server.action(action).unwrap();
        view.feedback.iter().flat_map(|f| f.details()).collect()
    }
}

fn chunked_bundle(dir: &Path, image: &[u8], key: &SecretKey, format: u32) -> Vec<u8> {
    let path = dir.join("rootfs.ext4");
    std::fs::write(&path, image).unwrap();
    let mut out = Vec::new();
    create_chunked_bundle(
        &path,
        &CreateOptions {
            compatible: COMPATIBLE.into(),
            version: "2.0".into(),
            image_name: None,
            compression: None,
            keys: std::slice::from_ref(key),
        },
        &ChunkedOptions {
            chunker: ChunkerParams::with_average(AVERAGE_CHUNK),
            zstd_level: 3,
            format,
            history: 64 << 10,
        },
        &mut out,
    )
    .unwrap();
    out
}

/// Version 2: `v1` with a new header line and `changes` stretches of 8 KiB rewritten, spread
/// evenly (the rest stays byte for byte).
fn version_2(v1: &[u8], changes: usize) -> Vec<u8> {
    let mut v2 = Image::good("2.0", v1.len()).bytes;
    let header = v2.iter().position(|&b| b == b'\n').unwrap() + 1;
    v2[header..].copy_from_slice(&v1[header..]);
    let step = v1.len() / (changes + 1);
    for n in 1..=changes {
        let at = n * step;
        for (i, b) in v2[at..at + 8192].iter_mut().enumerate() {
            *b = b.wrapping_add(1 + (i % 7) as u8);
        }
    }
    v2
}

/// (start, end exclusive) of a `Range: bytes=A-B` header.
fn range_of(request: &DownloadRequest) -> Option<(u64, u64)> {
    let spec = request.range.as_deref()?.strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    Some((a.parse().ok()?, b.parse::<u64>().ok()? + 1))
}

/// Body bytes the server sent for `requests`.
fn bytes_of(requests: &[DownloadRequest]) -> u64 {
    requests.iter().filter_map(|r| r.body_len).sum()
}

#[test]
fn a_delta_update_downloads_only_what_changed_and_is_confirmed_after_the_reboot() {
    let rig = Rig::new(2 << 20, 4 << 20);
    let v2 = version_2(&rig.v1, 4);
    let bundle = rig.bundle(&v2);
    let action = rig.deploy(bundle.clone());
    rig.settle(action);
    rig.assert_success(action, &v2);

    let log = rig.server.download_log();
    assert!(
        log.iter().all(|r| r.status == 206 && r.range.is_some()),
        "every request is a Range request: {log:#?}"
    );
    assert!(log.len() <= 100, "{} requests", log.len());
    let downloaded = bytes_of(&log);
    // 5 changed places of 8 KiB in 16 KiB chunks: some 10 chunks of 128, plus the head.
    assert!(
        downloaded < bundle.len() as u64 / 5,
        "downloaded {downloaded} of a {}-byte bundle: {log:#?}",
        bundle.len()
    );
    let details = rig.details(action);
    assert!(
        details.iter().any(|d| d.contains("% reused from slot A")),
        "no feedback says what was reused: {details:#?}"
    );
}

/// A delta install never sees the whole artifact, so it needs the signed bundle's version to be
/// the one the server deployed (the software module's): a bundle deployed under another version
/// is downloaded whole and checked against the server's hash, and still installs.
#[test]
fn a_bundle_deployed_under_another_version_is_downloaded_whole() {
    let rig = Rig::new(1 << 20, 2 << 20);
    let v2 = version_2(&rig.v1, 2);
    let bundle = rig.bundle(&v2);
    let action = rig.deploy_artifact("2.0-r1", "update.ddib", bundle.clone());
    rig.settle(action);
    rig.assert_success(action, &v2);
    let log = rig.server.download_log();
    assert!(
        log.iter().any(|r| r.range.is_none() && r.status == 200),
        "no full download: {log:#?}"
    );
    assert!(bytes_of(&log) >= bundle.len() as u64, "{log:#?}");
    let details = rig.details(action);
    assert!(
        !details.iter().any(|d| d.contains("% reused from slot A")),
        "a delta install: {details:#?}"
    );
}

/// Format-2 bundles (made before format 3) still install as deltas.
#[test]
fn a_format_2_bundle_still_installs_as_a_delta() {
    let rig = Rig::new(1 << 20, 2 << 20);
    let v2 = version_2(&rig.v1, 2);
    let bundle = rig.bundle_as(&v2, ddi_bundle::FORMAT_CHUNKED);
    assert_eq!(
        read_unverified(bundle.as_slice()).unwrap().manifest.format,
        2
    );
    let action = rig.deploy(bundle.clone());
    rig.settle(action);
    rig.assert_success(action, &v2);
    let log = rig.server.download_log();
    assert!(log.iter().all(|r| r.status == 206), "{log:#?}");
    assert!(bytes_of(&log) < bundle.len() as u64 / 4, "{log:#?}");
}

#[test]
fn a_tampered_downloaded_chunk_is_refused() {
    let rig = Rig::new(1 << 20, 2 << 20);
    let v2 = version_2(&rig.v1, 2);
    let mut bundle = rig.bundle(&v2);
    let read: UnverifiedBundle = read_unverified(bundle.as_slice()).unwrap();
    let index = read.index.unwrap();
    // The last chunk of the changed middle: downloaded, not in the seed.
    let mut image_at = 0u64;
    let middle = v2.len() as u64 / 3;
    let (victim, entry) = index
        .chunks
        .iter()
        .enumerate()
        .find(|(_, c)| {
            image_at += u64::from(c.raw_len);
            image_at > middle + 8192
        })
        .unwrap();
    bundle[(read.data_offset + entry.offset + entry.stored_len as u64 / 2) as usize] ^= 0x10;
    let action = rig.deploy(bundle);
    rig.settle(action);
    let view = rig.server.action(action).unwrap();
    assert!(ended_as(&view, "failure"), "action: {}", summary(&view));
    let details = rig.details(action);
    assert!(
        details
            .iter()
            .any(|d| d.contains(&format!("chunk {victim}"))),
        "no detail names chunk {victim}: {details:#?}"
    );
    // Nothing was activated: slot B is marked bad, the device stays on A.
    let env = rig.dev.env_map().unwrap();
    assert_eq!(env.get("bootctl_slot").map(String::as_str), Some("A"));
    assert_eq!(rig.dev.reboot().unwrap(), Slot::A);
    assert!(rig.dev.slot_holds(Slot::A, &rig.v1).unwrap());
}

#[test]
fn a_running_slot_that_differs_from_its_image_still_gives_the_signed_image() {
    let rig = Rig::new(1 << 20, 2 << 20);
    let v2 = version_2(&rig.v1, 2);
    // Slot A no longer holds exactly v1 (a writable rootfs, a bit flip): 20 KiB scribbled over.
    let slot_a = rig.dev.slot_path(Slot::A);
    let mut a = std::fs::read(&slot_a).unwrap();
    for b in &mut a[600_000..620_000] {
        *b ^= 0x5a;
    }
    std::fs::write(&slot_a, &a).unwrap();
    let action = rig.deploy(rig.bundle(&v2));
    rig.settle(action);
    rig.assert_success(action, &v2);
    // Slot A was only read.
    assert_eq!(std::fs::read(&slot_a).unwrap(), a);
}

#[test]
fn a_server_without_range_support_gets_a_full_download() {
    let rig = Rig::new(1 << 20, 2 << 20);
    let v2 = version_2(&rig.v1, 2);
    let bundle = rig.bundle(&v2);
    rig.server.add_fault(Fault::new(FaultKind::IgnoreRange));
    let action = rig.deploy(bundle.clone());
    rig.settle(action);
    rig.assert_success(action, &v2);
    let log = rig.server.download_log();
    assert!(
        log.iter().all(|r| r.status == 200),
        "the fault answers every request whole: {log:#?}"
    );
    // The probe's Range was answered whole (and dropped early), then one full download.
    assert_eq!(log.len(), 2, "{log:#?}");
    assert_eq!(log[1].range, None, "{log:#?}");
    assert_eq!(log[1].body_len, Some(bundle.len() as u64));
}

#[test]
fn a_delta_killed_in_the_middle_resumes_without_fetching_finished_chunks_again() {
    // Large enough for durable checkpoints (every 16 MiB of the slot).
    const SIZE: usize = 40 << 20;
    let rig = Rig::new(SIZE, 48 << 20);
    let v2 = version_2(&rig.v1, 24);
    let bundle = rig.bundle(&v2);
    let read = read_unverified(bundle.as_slice()).unwrap();
    let index = read.index.unwrap();
    let action = rig.deploy(bundle);
    let (killed, durable) = kill_after_the_first_checkpoint(&rig);
    let first_run = rig.server.download_log();

    rig.server.clear_faults();
    rig.settle(action);
    rig.assert_success(action, &v2);

    // No request of the second run fetches a chunk that was durably on the slot.
    let second_run = &rig.server.download_log()[first_run.len()..];
    let mut image_end = 0u64;
    let finished: Vec<(u64, u64)> = index
        .chunks
        .iter()
        .filter_map(|c| {
            image_end += u64::from(c.raw_len);
            (image_end <= durable)
                .then_some((read.data_offset + c.offset, read.data_offset + c.end()))
        })
        .collect();
    let data_ranges: Vec<(u64, u64)> = second_run
        .iter()
        .filter_map(range_of)
        .filter(|&(start, _)| start >= read.data_offset)
        .collect();
    assert!(!data_ranges.is_empty(), "{second_run:#?}");
    for (start, end) in &data_ranges {
        assert!(
            !finished.iter().any(|(a, b)| a < end && start < b),
            "bytes {start}..{end} were fetched again although on the slot up to {durable}:\n\
             first run: {first_run:#?}\nkilled agent: {}",
            killed.describe()
        );
    }
}

/// Run the agent on the deployed delta, slowed down, and kill it (-9) once its first durable
/// checkpoint has a resume record; returns what it did and the durable slot offset.
fn kill_after_the_first_checkpoint(rig: &Rig) -> (CommandOutput, u64) {
    // Slow enough that the delta takes some seconds.
    rig.server.add_fault(Fault::new(FaultKind::Slow {
        bytes_per_sec: 300_000,
    }));
    let record = rig.dev.state_dir().join("download.resume");
    let mut agent = Background::spawn({
        let mut cmd = rig.dev.agent_command();
        cmd.arg("once");
        cmd
    })
    .unwrap();
    let deadline = Instant::now() + AGENT_TIMEOUT;
    while !record.exists() {
        assert!(
            agent.try_exit().unwrap().is_none(),
            "the agent ended before a resume record was written: {:?}",
            agent.output_so_far()
        );
        assert!(Instant::now() < deadline, "no resume record");
        std::thread::sleep(Duration::from_millis(20));
    }
    let killed = agent.stop().unwrap(); // kill -9
    let resume: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(resume["format"], "chunks", "{resume}");
    let durable = resume["slot_offset"].as_u64().unwrap();
    assert!(durable >= 16 << 20, "{resume}");
    (killed, durable)
}

#[test]
fn a_resume_whose_slot_prefix_was_changed_starts_over_and_gives_the_signed_image() {
    // Someone writes into what the killed agent had durably written (a tool, bit rot): 4 KiB
    // in the middle of the resumed prefix (whole chunks, checked as the prefix is read again),
    // or the byte right before the checkpoint (the chunk that straddles it, checked when its
    // signed bytes are known).
    let in_the_middle = |_: u64| (5usize << 20)..(5 << 20) + 4096;
    let before_the_checkpoint = |durable: u64| durable as usize - 1..durable as usize;
    for corrupted in [
        &in_the_middle as &dyn Fn(u64) -> std::ops::Range<usize>,
        &before_the_checkpoint,
    ] {
        let rig = Rig::new(24 << 20, 32 << 20);
        let v2 = version_2(&rig.v1, 24);
        let action = rig.deploy(rig.bundle(&v2));
        let (_, durable) = kill_after_the_first_checkpoint(&rig);
        let slot_b = rig.dev.slot_path(Slot::B);
        let mut b = std::fs::read(&slot_b).unwrap();
        assert!(b[..durable as usize] == v2[..durable as usize]);
        let range = corrupted(durable);
        for byte in &mut b[range.clone()] {
            *byte ^= 0xa5;
        }
        std::fs::write(&slot_b, &b).unwrap();

        rig.server.clear_faults();
        rig.settle(action);
        // Not a failure at the whole-image check: the resumed prefix was refused, the install
        // started over from byte 0 and wrote the signed image.
        let view = rig.server.action(action).unwrap();
        assert!(
            ended_as(&view, "success"),
            "bytes {range:?} changed: {}",
            summary(&view)
        );
        rig.assert_success(action, &v2);
        let b = std::fs::read(&slot_b).unwrap();
        assert!(
            b[..v2.len()] == v2[..],
            "slot B is not exactly the signed image"
        );
    }
}

#[test]
fn dropped_connections_resume_inside_their_range() {
    let rig = Rig::new(2 << 20, 4 << 20);
    let v2 = version_2(&rig.v1, 4);
    let bundle = rig.bundle(&v2);
    // The first five requests (the head and the first chunk ranges) break off after 3000 bytes.
    rig.server
        .add_fault(Fault::new(FaultKind::DropAfter { bytes: 3000 }).times(5));
    let action = rig.deploy(bundle.clone());
    rig.settle(action);
    rig.assert_success(action, &v2);
    let log = rig.server.download_log();
    assert!(
        log.iter().all(|r| r.status == 206),
        "no full download: {log:#?}"
    );
    // A broken request is continued where it broke off, not from its start.
    let ranges: Vec<(u64, u64)> = log.iter().filter_map(range_of).collect();
    for pair in ranges.windows(2).take(5) {
        assert_eq!(
            pair[1],
            (pair[0].0 + 3000, pair[0].1),
            "not resumed inside the range: {log:#?}"
        );
    }
}

#[test]
fn a_server_that_stops_honouring_range_after_the_probe_still_gives_the_image() {
    let rig = Rig::new(1 << 20, 2 << 20);
    let v2 = version_2(&rig.v1, 2);
    let bundle = rig.bundle(&v2);
    // The head's two requests get their ranges; every later one the whole artifact (200), as
    // from a proxy that starts dropping Range headers (`ddi-sim fault ignore-range --after 2`).
    rig.server
        .add_fault(Fault::new(FaultKind::IgnoreRange).after(2));
    let action = rig.deploy(bundle.clone());
    rig.settle(action);
    rig.assert_success(action, &v2);
    let log = rig.server.download_log();
    assert_eq!(log[0].status, 206, "{log:#?}");
    assert!(log[2..].iter().all(|r| r.status == 200), "{log:#?}");
    // Each range answered with 200 is read from byte 0 to its end, but at most one artifact's
    // worth of such bytes per attempt; then the next attempt downloads the bundle once. (Counted
    // here to each range's end, the request refused before its body is read included; before
    // the bound every range re-read the bundle from byte 0.)
    let read: u64 = log[2..]
        .iter()
        .map(|r| range_of(r).map_or(bundle.len() as u64, |(_, end)| end))
        .sum();
    assert!(
        read <= 4 * bundle.len() as u64,
        "{read} bytes read for a {}-byte bundle: {log:#?}",
        bundle.len()
    );
}
