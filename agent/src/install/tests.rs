//! Pipeline tests against the simulator `ddi-sim` (its artifact download with Range support,
//! its faults and its request log) and regular-file slots.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ddi_sim::{Endpoint, Fault, FaultKind, ServerOptions, TestServer};
use sha2::{Digest, Sha256};

use super::*;

const CONTROLLER: &str = "device";
const TOKEN: &str = "secret";

/// One artifact served by the simulator to one device (token [`TOKEN`]).
struct ArtifactServer {
    sim: TestServer,
    url: String,
}

impl ArtifactServer {
    fn start(body: Vec<u8>) -> Self {
        let sim = TestServer::start(ServerOptions::default());
        // Served without an assignment: these tests are about the download, not the action.
        sim.configure(|c| c.skip_artifact_access_check = true);
        sim.create_target(CONTROLLER, Some(TOKEN)).unwrap();
        let module = sim.create_module("os", "image", "1.0");
        sim.upload_bytes(module, "artifact.bin", body).unwrap();
        let url = format!(
            "{}/softwaremodules/{module}/artifacts/artifact.bin",
            sim.controller_url(CONTROLLER)
        );
        ArtifactServer { sim, url }
    }

    /// The i-th download request meets the i-th fault; later ones are served normally.
    fn in_turn(&self, faults: Vec<FaultKind>) {
        for (i, kind) in faults.into_iter().enumerate() {
            let fault = Fault::new(kind).on(Endpoint::Download);
            self.sim.add_fault(fault.after(i as u32).once());
        }
    }

    /// Every download request from now on meets `kind`, until [`ArtifactServer::clear`].
    fn always(&self, kind: FaultKind) {
        self.sim.add_fault(Fault::new(kind).on(Endpoint::Download));
    }

    fn clear(&self) {
        self.sim.clear_faults();
    }

    /// (Range start, Authorization header) of each download request.
    fn requests(&self) -> Vec<(Option<u64>, Option<String>)> {
        let range_start = |range: &str| {
            let (start, _) = range.strip_prefix("bytes=")?.split_once('-')?;
            start.parse().ok()
        };
        self.sim
            .requests()
            .iter()
            .filter(|r| r.endpoint == Endpoint::Download)
            .map(|r| {
                (
                    r.header("range").and_then(range_start),
                    r.header("authorization").map(str::to_string),
                )
            })
            .collect()
    }
}

fn status(code: u16) -> FaultKind {
    FaultKind::Status {
        code,
        retry_after_secs: None,
    }
}

/// The response announces the whole body and the connection breaks after `bytes`.
fn drop_after(bytes: u64) -> FaultKind {
    FaultKind::DropAfter { bytes }
}

/// A clean response whose Content-Length matches the first `bytes` it holds.
fn short(bytes: u64) -> FaultKind {
    FaultKind::Truncate { bytes }
}

/// Deterministic incompressible-ish bytes.
pub(super) fn image(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 7) as u8
        })
        .collect()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// zstd with a frame checksum, as the zstd tool writes it.
fn zstd(data: &[u8]) -> Vec<u8> {
    let mut c = zstd::bulk::Compressor::new(3).unwrap();
    c.include_checksum(true).unwrap();
    c.compress(data).unwrap()
}

fn xz(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut w =
        lzma_rust2::XzWriter::new(Vec::new(), lzma_rust2::XzOptions::with_preset(1)).unwrap();
    w.write_all(data).unwrap();
    w.finish().unwrap()
}

/// A tar archive of `members` (also the bundle tests' hand-made bundles).
pub(super) fn tar_of(members: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, data) in members {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    b.into_inner().unwrap()
}

const FILL: u8 = 0xEE;

struct Fixture {
    dir: tempfile::TempDir,
    slot: PathBuf,
    booted: PathBuf,
    capacity: usize,
}

impl Fixture {
    fn new(capacity: usize) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot-b.img");
        let booted = dir.path().join("slot-a.img");
        std::fs::write(&slot, vec![FILL; capacity]).unwrap();
        std::fs::write(&booted, vec![0xAA; capacity]).unwrap();
        Fixture {
            dir,
            slot,
            booted,
            capacity,
        }
    }

    fn request(&self, url: &str, artifact: &[u8]) -> InstallRequest {
        InstallRequest {
            url: url.to_string(),
            auth_header: Some(("Authorization".into(), "TargetToken secret".into())),
            expected: ExpectedHash {
                sha256: Some(sha256_hex(artifact)),
                sha1: None,
                md5: None,
            },
            size: Some(artifact.len() as u64),
            filename: "artifact.bin".into(),
            // A bundle is uploaded as its own version, as an integrator would.
            version: ddi_bundle::read_manifest_unverified(artifact)
                .map(|m| m.version)
                .unwrap_or_default(),
            slot_path: self.slot.clone(),
            booted_slot_path: Some(self.booted.clone()),
            resume_path: self.resume_path(),
            max_rate: None,
            bundle: None,
            local: false,
            local_file: None,
        }
    }

    fn resume_path(&self) -> PathBuf {
        self.dir.path().join("resume.json")
    }

    /// Slot byte `at` becomes `img`'s with one bit flipped (changed behind the agent's back).
    fn flip_slot_byte(&self, img: &[u8], at: u64) {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.slot)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[img[at as usize] ^ 1], at).unwrap();
    }

    fn slot_bytes(&self) -> Vec<u8> {
        std::fs::read(&self.slot).unwrap()
    }

    /// The slot holds `image` followed by untouched bytes, has its original size, and the
    /// booted slot was not touched.
    fn assert_installed(&self, image: &[u8]) {
        let bytes = self.slot_bytes();
        assert_eq!(bytes.len(), self.capacity, "slot size changed");
        assert!(
            bytes[..image.len()] == *image,
            "slot does not hold the image"
        );
        assert!(
            bytes[image.len()..].iter().all(|&b| b == FILL),
            "bytes after the image changed"
        );
        self.assert_booted_untouched();
    }

    fn assert_slot_untouched(&self) {
        let bytes = self.slot_bytes();
        assert_eq!(bytes.len(), self.capacity, "slot size changed");
        assert!(bytes.iter().all(|&b| b == FILL), "slot was written");
        self.assert_booted_untouched();
    }

    fn assert_booted_untouched(&self) {
        let booted = std::fs::read(&self.booted).unwrap();
        assert_eq!(booted.len(), self.capacity);
        assert!(booted.iter().all(|&b| b == 0xAA), "booted slot changed");
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

fn fast_options() -> InstallOptions {
    InstallOptions {
        retry: RetryPolicy {
            attempts: 3,
            first_backoff: Duration::from_millis(5),
            max_backoff: Duration::from_millis(20),
        },
        stall_timeout: Duration::from_secs(5),
        mountinfo: PathBuf::from("/nonexistent/mountinfo"),
        progress_interval: Duration::from_millis(1),
        checkpoint_interval: 1 << 20,
        ..InstallOptions::default()
    }
}

async fn run(
    req: &InstallRequest,
    options: &InstallOptions,
) -> (Result<Installed, InstallError>, Vec<Progress>) {
    let mut seen = Vec::new();
    let result = install_with(&client(), req, options, &mut |p| seen.push(p)).await;
    (result, seen)
}

#[tokio::test]
async fn raw_image_is_written_verified_and_reported() {
    let img = image(3 << 20, 1);
    let server = ArtifactServer::start(img.clone());
    let fx = Fixture::new(4 << 20);
    let (result, progress) = run(&fx.request(&server.url, &img), &fast_options()).await;
    let installed = result.unwrap();
    assert_eq!(installed.bytes_written, img.len() as u64);
    assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img));
    fx.assert_installed(&img);
    assert_eq!(
        server.requests(),
        vec![(None, Some("TargetToken secret".into()))]
    );
    assert!(!fx.resume_path().exists(), "resume record left behind");
    // Progress: downloading counts only go up and never pass the total.
    let mut last = 0;
    for p in &progress {
        if let Progress::Downloading { done, total } = p {
            assert!(*done >= last);
            assert!(*done <= img.len() as u64);
            assert_eq!(*total, Some(img.len() as u64));
            last = *done;
        }
    }
    assert!(!progress.is_empty());
}

#[tokio::test]
async fn progress_is_rate_limited() {
    let img = image(1 << 20, 2);
    let server = ArtifactServer::start(img.clone());
    let fx = Fixture::new(1 << 20);
    let mut req = fx.request(&server.url, &img);
    req.max_rate = Some(2 << 20); // ~0.5 s
    let options = InstallOptions {
        progress_interval: Duration::from_millis(200),
        ..fast_options()
    };
    let begin = Instant::now();
    let (result, progress) = run(&req, &options).await;
    result.unwrap();
    let elapsed = begin.elapsed();
    assert!(
        elapsed >= Duration::from_millis(450),
        "rate limit ignored: {elapsed:?}"
    );
    let max_calls = (elapsed.as_millis() / 200 + 2) as usize;
    assert!(
        progress.len() <= max_calls,
        "{} callbacks in {elapsed:?}",
        progress.len()
    );
    fx.assert_installed(&img);
}

#[tokio::test]
async fn gzip_image_is_decoded() {
    let img = image(2 << 20, 3);
    let mut img_compressible = img.clone();
    img_compressible.extend(vec![0u8; 1 << 20]);
    let gz = gzip(&img_compressible);
    let server = ArtifactServer::start(gz.clone());
    let fx = Fixture::new(4 << 20);
    let (result, _) = run(&fx.request(&server.url, &gz), &fast_options()).await;
    let installed = result.unwrap();
    assert_eq!(installed.bytes_written, img_compressible.len() as u64);
    assert_eq!(
        installed.sha256_of_slot_image,
        sha256_hex(&img_compressible)
    );
    fx.assert_installed(&img_compressible);
}

#[tokio::test]
async fn zstd_and_xz_images_and_tars_in_them_are_decoded() {
    let mut img = image(1 << 20, 40);
    img.extend(vec![0u8; (1 << 20) + 77]);
    // Several zstd frames with a skippable frame between them decode to their concatenation
    // (what multi-threaded compressors write).
    let half = img.len() / 2;
    let mut frames = zstd(&img[..half]);
    frames.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 1, 2, 3]);
    frames.extend(zstd(&img[half..]));
    let tar = tar_of(&[("./rootfs.ext4", &img)]);
    for (name, artifact) in [
        ("zstd", zstd(&img)),
        ("zstd frames", frames),
        ("xz", xz(&img)),
        ("tar.zst", zstd(&tar)),
        ("tar.xz", xz(&tar)),
    ] {
        assert!(artifact.len() < img.len(), "{name} compresses");
        let server = ArtifactServer::start(artifact.clone());
        let fx = Fixture::new(3 << 20);
        let (result, _) = run(&fx.request(&server.url, &artifact), &fast_options()).await;
        let installed = result.unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(installed.bytes_written, img.len() as u64, "{name}");
        assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img), "{name}");
        fx.assert_installed(&img);
    }
}

#[test]
fn corrupt_or_truncated_zstd_and_xz_are_decode_errors() {
    let img = image(256 * 1024, 41);
    for (name, good) in [("zstd", zstd(&img)), ("xz", xz(&img))] {
        let mut flipped = good.clone();
        let n = flipped.len();
        flipped[n / 2] ^= 0xff;
        let truncated = good[..good.len() - 20].to_vec();
        for artifact in [flipped, truncated] {
            let (result, _) = run_pipeline_chunked(&artifact, &[4096], 512 * 1024);
            let err = result.expect_err(name);
            assert!(
                matches!(err, InstallError::Decode { format, .. } if format == name),
                "{name}: {err}"
            );
        }
    }
}

#[test]
fn a_zstd_frame_asking_for_a_window_above_100_mib_is_refused() {
    // Window descriptor 0x86: 112 MiB (RFC 8878, 3.1.1.1.2), behind a genuine frame (every
    // frame's header is checked); then empty raw blocks, which would decode.
    let mut hostile = zstd(&image(4096, 42));
    hostile.extend_from_slice(&[0x28, 0xb5, 0x2f, 0xfd, 0x00, 0x86]);
    hostile.extend_from_slice(&[0u8; 64]);
    // With a sha256 (the decoder with resume points) and a sha1 (`compress::ZstdReader`).
    for sha256 in [true, false] {
        let result = if sha256 {
            run_pipeline_chunked(&hostile, &[4096], 1 << 20).0
        } else {
            let mut dev = FailingSlot {
                data: vec![FILL; 1 << 20],
                fail_from: u64::MAX,
            };
            let sha1 = hex::encode(<sha1::Sha1 as Digest>::digest(&hostile));
            let hash = (hash::HashAlgorithm::Sha1, sha1);
            run_pipeline_hashed(&hostile, &[4096], None, hash, &mut dev)
        };
        let err = result.unwrap_err();
        assert!(
            matches!(&err, InstallError::Decode { format: "zstd", .. }),
            "{sha256}: {err}"
        );
        assert!(err.to_string().contains("window"), "{sha256}: {err}");
    }
}

#[tokio::test]
async fn tar_and_tar_gz_images_are_extracted() {
    let img = image((1 << 20) + 333, 4);
    let tar = tar_of(&[("./rootfs.ext4", &img)]);
    for artifact in [tar.clone(), gzip(&tar)] {
        let server = ArtifactServer::start(artifact.clone());
        let fx = Fixture::new(2 << 20);
        let (result, _) = run(&fx.request(&server.url, &artifact), &fast_options()).await;
        let installed = result.unwrap();
        assert_eq!(installed.bytes_written, img.len() as u64);
        fx.assert_installed(&img);
    }
}

#[tokio::test]
async fn tar_with_named_member_among_others() {
    let img = image(100_000, 5);
    let tar = tar_of(&[("manifest.json", b"{}"), ("rootfs.ext4", &img)]);
    let server = ArtifactServer::start(tar.clone());
    let fx = Fixture::new(1 << 20);
    let options = InstallOptions {
        archive_member: Some("rootfs.ext4".into()),
        ..fast_options()
    };
    run(&fx.request(&server.url, &tar), &options)
        .await
        .0
        .unwrap();
    fx.assert_installed(&img);
    // Without the name the archive is ambiguous.
    let fx = Fixture::new(1 << 20);
    let err = run(&fx.request(&server.url, &tar), &fast_options())
        .await
        .0
        .unwrap_err();
    assert!(matches!(err, InstallError::ArchiveRejected(_)), "{err}");
    assert!(!err.is_retryable());
}

#[tokio::test]
async fn hostile_tar_members_are_rejected_before_writing() {
    let mut hostile = Vec::new();
    let mut h = tar::Header::new_gnu();
    h.as_old_mut().name[..9].copy_from_slice(b"../escape");
    h.set_size(4);
    h.set_mode(0o644);
    h.set_cksum();
    hostile.extend_from_slice(h.as_bytes());
    hostile.extend_from_slice(&[1, 2, 3, 4]);
    hostile.resize(512 * 4, 0);
    let mut link = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    link.append_link(&mut h, "image", "/dev/mmcblk0").unwrap();
    let link = link.into_inner().unwrap();
    for artifact in [hostile, link.clone(), gzip(&link)] {
        let server = ArtifactServer::start(artifact.clone());
        let fx = Fixture::new(1 << 20);
        let err = run(&fx.request(&server.url, &artifact), &fast_options())
            .await
            .0
            .unwrap_err();
        assert!(matches!(err, InstallError::ArchiveRejected(_)), "{err}");
        fx.assert_slot_untouched();
    }
}

#[tokio::test]
async fn dropped_connections_are_resumed_with_range() {
    let img = image(3 << 20, 6);
    let server = ArtifactServer::start(img.clone());
    server.in_turn(vec![drop_after(700_000), drop_after(900_000), status(503)]);
    let fx = Fixture::new(4 << 20);
    run(&fx.request(&server.url, &img), &fast_options())
        .await
        .0
        .unwrap();
    fx.assert_installed(&img);
    let starts: Vec<Option<u64>> = server.requests().into_iter().map(|r| r.0).collect();
    assert_eq!(starts.len(), 4, "{starts:?}");
    assert_eq!(starts[0], None);
    assert_eq!(starts[1], Some(700_000));
    assert_eq!(starts[2], Some(1_600_000));
    assert_eq!(starts[3], Some(1_600_000));
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let img = image(100_000, 23);
    let server = ArtifactServer::start(img.clone());
    server.in_turn(vec![FaultKind::Status {
        code: 503,
        retry_after_secs: Some(1),
    }]);
    let fx = Fixture::new(1 << 20);
    let begin = Instant::now();
    run(&fx.request(&server.url, &img), &fast_options())
        .await
        .0
        .unwrap();
    assert!(
        begin.elapsed() >= Duration::from_secs(1),
        "retried after {:?}",
        begin.elapsed()
    );
    fx.assert_installed(&img);
}

#[tokio::test]
async fn server_ignoring_range_is_handled() {
    let img = image(2 << 20, 7);
    let gz = gzip(&img);
    let server = ArtifactServer::start(gz.clone());
    server.always(FaultKind::IgnoreRange);
    server.in_turn(vec![drop_after(500_000), drop_after(1_000_000)]);
    let fx = Fixture::new(3 << 20);
    run(&fx.request(&server.url, &gz), &fast_options())
        .await
        .0
        .unwrap();
    fx.assert_installed(&img);
}

#[tokio::test]
async fn exhausted_retries_are_retryable_errors() {
    let img = image(1 << 20, 8);
    let server = ArtifactServer::start(img.clone());
    server.always(status(503));
    let fx = Fixture::new(2 << 20);
    let err = run(&fx.request(&server.url, &img), &fast_options())
        .await
        .0
        .unwrap_err();
    assert!(
        matches!(err, InstallError::Network { attempts: 4, .. }),
        "{err}"
    );
    assert!(err.is_retryable());
    assert_eq!(server.requests().len(), 4);
    fx.assert_slot_untouched();
}

#[tokio::test]
async fn truncated_body_fails_retryable() {
    let img = image(1 << 20, 9);
    let server = ArtifactServer::start(img.clone());
    // Every connection announces the whole body and stops short of its end.
    server.always(drop_after(0));
    let fx = Fixture::new(2 << 20);
    let mut req = fx.request(&server.url, &img);
    let err = run(&req, &fast_options()).await.0.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    // A clean but short response is resumed like a dropped connection...
    let server = ArtifactServer::start(img.clone());
    server.in_turn(vec![short(300_000)]);
    req.url = server.url.clone();
    run(&req, &fast_options()).await.0.unwrap();
    fx.assert_installed(&img);
    assert_eq!(server.requests()[1].0, Some(300_000));
    // ...and fails as truncated when it keeps happening (every answer the same first bytes).
    server.always(FaultKind::IgnoreRange);
    server.always(short(300_000));
    let err = run(&req, &fast_options()).await.0.unwrap_err();
    assert!(
        matches!(
            err,
            InstallError::Truncated {
                received: 300_000,
                ..
            }
        ),
        "{err}"
    );
    assert!(err.is_retryable());
    // Without a declared size a complete-looking short body is caught by the hash.
    let server = ArtifactServer::start(img[..1000].to_vec());
    req.url = server.url.clone();
    req.size = None;
    let err = run(&req, &fast_options()).await.0.unwrap_err();
    assert!(matches!(err, InstallError::HashMismatch { .. }), "{err}");
}

/// A server that ends every answer after 3 bytes: each connection makes progress, so the
/// retries in a row never run out, but the install's request budget does; the install then
/// fails for good (hawkBit up to 0.7 would record every one of those Range requests), saying
/// why, with the booted slot untouched.
#[tokio::test]
async fn a_server_that_cuts_every_answer_short_gets_a_bounded_number_of_requests() {
    let img = image(64 << 10, 70);
    let server = ArtifactServer::start(img.clone());
    server.always(short(3));
    let fx = Fixture::new(1 << 20);
    let err = run(&fx.request(&server.url, &img), &fast_options())
        .await
        .0
        .unwrap_err();
    let budget = source::MAX_REQUESTS_PER_INSTALL;
    assert!(
        matches!(err, InstallError::TooManyRequests { requests, .. } if requests == budget),
        "{err}"
    );
    assert!(!err.is_retryable(), "{err}");
    assert!(
        err.to_string().contains("ending its answers early"),
        "{err}"
    );
    assert_eq!(server.requests().len(), budget as usize);
    fx.assert_booted_untouched();
}

/// A flaky link that keeps making progress (every answer cut at 64 KiB of a 36 MiB image: more
/// connections than the request budget) still completes: connections that deliver
/// [`source::PRODUCTIVE_CONNECTION_BYTES`] are not counted.
#[tokio::test]
async fn a_flaky_but_progressing_link_completes_a_large_download() {
    let img = image(36 << 20, 71);
    let server = ArtifactServer::start(img.clone());
    server.always(short(source::PRODUCTIVE_CONNECTION_BYTES));
    let fx = Fixture::new(40 << 20);
    let result = run(&fx.request(&server.url, &img), &fast_options()).await.0;
    assert!(result.is_ok(), "{:?}", result.err().map(|e| e.to_string()));
    assert!(server.requests().len() > source::MAX_REQUESTS_PER_INSTALL as usize);
}

#[tokio::test]
async fn hash_mismatch_fails_permanently() {
    let img = image(2 << 20, 10);
    let server = ArtifactServer::start(img.clone());
    let fx = Fixture::new(4 << 20);
    for expected in [
        ExpectedHash {
            sha256: Some("0".repeat(64)),
            sha1: None,
            md5: None,
        },
        ExpectedHash {
            sha256: None,
            sha1: Some("1".repeat(40)),
            md5: None,
        },
        ExpectedHash {
            sha256: None,
            sha1: None,
            md5: Some("2".repeat(32)),
        },
    ] {
        let mut req = fx.request(&server.url, &img);
        req.expected = expected;
        let err = run(&req, &fast_options()).await.0.unwrap_err();
        assert!(matches!(err, InstallError::HashMismatch { .. }), "{err}");
        assert!(!err.is_retryable());
        assert!(!fx.resume_path().exists());
        fx.assert_booted_untouched();
    }
    // md5 alone is accepted when right.
    let mut req = fx.request(&server.url, &img);
    req.expected = ExpectedHash {
        sha256: None,
        sha1: None,
        md5: Some(hex::encode(md5::Md5::digest(&img))),
    };
    run(&req, &fast_options()).await.0.unwrap();
}

#[tokio::test]
async fn oversize_raw_image_fails_before_writing() {
    let img = image(1 << 20, 11);
    let server = ArtifactServer::start(img.clone());
    let fx = Fixture::new((1 << 20) - 1);
    let err = run(&fx.request(&server.url, &img), &fast_options())
        .await
        .0
        .unwrap_err();
    assert!(
        matches!(err, InstallError::TooLarge { image_size, at_least: false, .. } if image_size == img.len() as u64),
        "{err}"
    );
    fx.assert_slot_untouched();
}

#[tokio::test]
async fn oversize_gzip_fails_before_writing() {
    let img = vec![0x55u8; 3 << 20];
    let gz = gzip(&img);
    let server = ArtifactServer::start(gz.clone());
    let fx = Fixture::new(2 << 20);
    let err = run(&fx.request(&server.url, &gz), &fast_options())
        .await
        .0
        .unwrap_err();
    // The trailer (fetched with a Range request) tells the decoded size up front.
    assert!(
        matches!(err, InstallError::TooLarge { at_least: true, image_size, .. } if image_size == 3 << 20),
        "{err}"
    );
    fx.assert_slot_untouched();
    let probe = (
        Some(gz.len() as u64 - 4),
        Some("TargetToken secret".to_string()),
    );
    assert!(
        server.requests().contains(&probe),
        "{:?}",
        server.requests()
    );
}

#[tokio::test]
async fn oversize_gzip_without_range_support_stops_at_the_slot_end() {
    let img = vec![0x55u8; 3 << 20];
    let gz = gzip(&img);
    let server = ArtifactServer::start(gz.clone());
    server.always(FaultKind::IgnoreRange);
    let fx = Fixture::new(2 << 20);
    let err = run(&fx.request(&server.url, &gz), &fast_options())
        .await
        .0
        .unwrap_err();
    assert!(
        matches!(err, InstallError::TooLarge { at_least: true, image_size, .. } if image_size > 2 << 20),
        "{err}"
    );
    assert_eq!(fx.slot_bytes().len(), 2 << 20, "slot grew");
    fx.assert_booted_untouched();
}

#[tokio::test]
async fn corrupt_gzip_is_a_decode_error() {
    let img = image(1 << 20, 12);
    let mut gz = gzip(&img);
    let n = gz.len();
    gz[n / 2] ^= 0xff;
    let server = ArtifactServer::start(gz.clone());
    let fx = Fixture::new(2 << 20);
    let err = run(&fx.request(&server.url, &gz), &fast_options())
        .await
        .0
        .unwrap_err();
    assert!(matches!(err, InstallError::Decode { .. }), "{err}");
    fx.assert_booted_untouched();
}

#[tokio::test]
async fn http_errors_and_bad_requests() {
    let img = image(1000, 13);
    let server = ArtifactServer::start(img.clone());
    server.always(status(404));
    let fx = Fixture::new(4096);
    let err = run(&fx.request(&server.url, &img), &fast_options())
        .await
        .0
        .unwrap_err();
    assert!(
        matches!(err, InstallError::HttpStatus { status: 404, .. }),
        "{err}"
    );
    assert!(!err.is_retryable());
    assert_eq!(server.requests().len(), 1, "a 404 is not retried");

    // Also when a signature policy reads the stream first.
    let mut req = fx.request(&server.url, &img);
    req.bundle = Some(BundlePolicy::default());
    let err = run(&req, &fast_options()).await.0.unwrap_err();
    assert!(
        matches!(err, InstallError::HttpStatus { status: 404, .. }),
        "{err}"
    );

    let mut req = fx.request(&server.url, &img);
    req.expected = ExpectedHash::default();
    assert!(matches!(
        run(&req, &fast_options()).await.0,
        Err(InstallError::InvalidRequest(_))
    ));

    // The server sends more than the artifact's declared size.
    server.clear();
    let mut req = fx.request(&server.url, &img);
    req.size = Some(999);
    let err = run(&req, &fast_options()).await.0.unwrap_err();
    assert!(matches!(err, InstallError::SizeMismatch { .. }), "{err}");
}

#[tokio::test]
async fn booted_slot_is_never_written() {
    let img = image(1000, 14);
    let server = ArtifactServer::start(img.clone());
    let fx = Fixture::new(4096);
    let mut req = fx.request(&server.url, &img);
    req.slot_path = fx.booted.clone();
    let err = run(&req, &fast_options()).await.0.unwrap_err();
    assert!(matches!(err, InstallError::SlotInUse { .. }), "{err}");
    // Through a symlink too.
    let link = fx.dir.path().join("by-partlabel-b");
    std::os::unix::fs::symlink(&fx.booted, &link).unwrap();
    req.slot_path = link;
    let err = run(&req, &fast_options()).await.0.unwrap_err();
    assert!(matches!(err, InstallError::SlotInUse { .. }), "{err}");
    assert!(
        server.requests().is_empty(),
        "downloaded although the slot is refused"
    );
    fx.assert_booted_untouched();
}

/// Install that stops (retryable) after `limit` bytes, like a power cut mid-download.
async fn interrupted_install(fx: &Fixture, img: &[u8], limit: usize) -> InstallError {
    interrupted_install_with(fx, img, limit, &|_, _| {}).await
}

/// Changes a test's request and options.
type Adjust<'a> = &'a dyn Fn(&mut InstallRequest, &mut InstallOptions);

/// [`interrupted_install`] with the request and options `adjust` makes.
async fn interrupted_install_with(
    fx: &Fixture,
    artifact: &[u8],
    limit: usize,
    adjust: Adjust<'_>,
) -> InstallError {
    let server = ArtifactServer::start(artifact.to_vec());
    server.always(drop_after(limit as u64));
    let mut options = fast_options();
    options.retry.attempts = 0;
    let mut req = fx.request(&server.url, artifact);
    adjust(&mut req, &mut options);
    run(&req, &options).await.0.unwrap_err()
}

#[tokio::test]
async fn restart_resumes_raw_image_from_checkpoint() {
    let img = image(5 << 20, 15);
    let fx = Fixture::new(6 << 20);
    let err = interrupted_install(&fx, &img, (3 << 20) + 12345).await;
    assert!(err.is_retryable(), "{err}");
    let record = resume::load(&fx.resume_path()).expect("resume record kept");
    assert_eq!(record.slot_offset, 3 << 20);

    // "After the restart": a new install of the same artifact continues at the checkpoint.
    let server = ArtifactServer::start(img.clone());
    let installed = run(&fx.request(&server.url, &img), &fast_options())
        .await
        .0
        .unwrap();
    assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img));
    fx.assert_installed(&img);
    assert_eq!(server.requests()[0].0, Some(3 << 20));
    assert!(!fx.resume_path().exists());
}

#[tokio::test]
async fn resumed_prefix_is_reverified() {
    let img = image(4 << 20, 16);
    let fx = Fixture::new(4 << 20);
    interrupted_install(&fx, &img, (2 << 20) + 1).await;
    assert_eq!(
        resume::load(&fx.resume_path()).unwrap().slot_offset,
        2 << 20
    );
    // Damage a byte the previous run wrote: the resumed install must not accept it.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.slot)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[img[1000] ^ 1], 1000).unwrap();
    let server = ArtifactServer::start(img.clone());
    let err = run(&fx.request(&server.url, &img), &fast_options())
        .await
        .0
        .unwrap_err();
    assert!(matches!(err, InstallError::HashMismatch { .. }), "{err}");
    assert!(
        !fx.resume_path().exists(),
        "a record that led to a bad image must go"
    );
    // The next attempt starts over and succeeds.
    run(&fx.request(&server.url, &img), &fast_options())
        .await
        .0
        .unwrap();
    fx.assert_installed(&img);
}

#[tokio::test]
async fn resume_record_of_another_artifact_is_ignored() {
    let img = image(3 << 20, 17);
    let fx = Fixture::new(4 << 20);
    interrupted_install(&fx, &img, (2 << 20) + 1).await;
    let other = image(3 << 20, 18);
    let server = ArtifactServer::start(other.clone());
    run(&fx.request(&server.url, &other), &fast_options())
        .await
        .0
        .unwrap();
    assert_eq!(server.requests()[0].0, None, "resumed a different artifact");
    fx.assert_installed(&other);
}

/// A gzip image of 8 MiB (level 6: blocks of ~150 KiB) interrupted after 60% of its
/// artifact: the record is a gzip resume point at least 1 MiB into the image.
async fn interrupted_gzip_install(fx: &Fixture) -> (Vec<u8>, Vec<u8>, resume::ResumeRecord) {
    let img = gunzip::tests::image(8 << 20, 21);
    let gz = gunzip::tests::gzip(&img, 6);
    let err = interrupted_install(fx, &gz, gz.len() * 6 / 10).await;
    assert!(err.is_retryable(), "{err}");
    let record = resume::load(&fx.resume_path()).expect("resume record kept");
    assert_eq!(record.format, "gzip", "{record:?}");
    assert!(record.slot_offset >= 1 << 20, "{record:?}");
    assert!(record.artifact_offset > 0 && record.artifact_offset < gz.len() as u64);
    // The slot holds the image up to the resume point.
    let slot = fx.slot_bytes();
    let out = record.slot_offset as usize;
    assert!(
        slot[..out] == img[..out],
        "the slot's prefix is not the image"
    );
    (img, gz, record)
}

#[tokio::test]
async fn a_small_checkpoint_interval_keeps_gzip_points_before_its_first_checkpoint() {
    // 256 KiB (the config's minimum): boundaries kept at most half an interval apart, so the
    // first checkpoints (well before 1 MiB of output) already give a resume record.
    let fx = Fixture::new(2 << 20);
    let img = gunzip::tests::image(3 << 19, 22);
    let gz = gunzip::tests::gzip(&img, 6);
    let server = ArtifactServer::start(gz.clone());
    server.always(drop_after(gz.len() as u64 * 45 / 100));
    let mut options = fast_options();
    options.retry.attempts = 0;
    options.checkpoint_interval = 256 << 10;
    let err = run(&fx.request(&server.url, &gz), &options)
        .await
        .0
        .unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let record = resume::load(&fx.resume_path()).expect("resume record kept");
    assert_eq!(record.format, "gzip", "{record:?}");
    assert!(
        record.slot_offset > 0 && record.slot_offset < 1 << 20,
        "{record:?}"
    );
    let server = ArtifactServer::start(gz.clone());
    let installed = run(&fx.request(&server.url, &gz), &options)
        .await
        .0
        .unwrap();
    assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img));
    fx.assert_installed(&img);
    assert_eq!(server.requests()[0].0, Some(record.artifact_offset));
}

#[tokio::test]
async fn restart_resumes_gzip_image_from_a_block_boundary() {
    let fx = Fixture::new(9 << 20);
    let (img, gz, record) = interrupted_gzip_install(&fx).await;
    // "After the restart": the download continues at the boundary's byte.
    let server = ArtifactServer::start(gz.clone());
    let installed = run(&fx.request(&server.url, &gz), &fast_options())
        .await
        .0
        .unwrap();
    assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img));
    assert_eq!(installed.bytes_written, img.len() as u64);
    fx.assert_installed(&img);
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].0, Some(record.artifact_offset));
    assert!(!fx.resume_path().exists());
}

#[tokio::test]
async fn gzip_resume_over_a_changed_slot_starts_over() {
    let fx = Fixture::new(9 << 20);
    let (img, gz, record) = interrupted_gzip_install(&fx).await;
    // A byte of the prefix changed behind the agent's back (in the window, and before it).
    for at in [1000, record.slot_offset - 10] {
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fx.slot)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[img[at as usize] ^ 1], at).unwrap();
        let server = ArtifactServer::start(gz.clone());
        resume::save(&fx.resume_path(), &record).unwrap();
        run(&fx.request(&server.url, &gz), &fast_options())
            .await
            .0
            .unwrap();
        assert_eq!(server.requests()[0].0, None, "resumed over a changed slot");
        fx.assert_installed(&img);
    }
}

#[tokio::test]
async fn a_gzip_record_whose_crc32_is_off_starts_over_before_any_range_download() {
    let fx = Fixture::new(9 << 20);
    let (img, gz, record) = interrupted_gzip_install(&fx).await;
    // Like a slot sha256 mismatch: the prefix check drops the record before downloading.
    for (what, bad) in [
        (
            "crc32",
            resume::ResumeRecord {
                crc32: record.crc32.map(|c| c ^ 4),
                ..record.clone()
            },
        ),
        (
            "slot sha256",
            resume::ResumeRecord {
                slot_sha256: Some("0".repeat(64)),
                ..record.clone()
            },
        ),
    ] {
        let requests = install_over_record(&fx, &img, &gz, &record, &bad, what).await;
        // One download from byte 0 (plus the 4-byte ISIZE fetch a fresh gzip install makes),
        // never the resume's Range request.
        let tail = gz.len() as u64 - 4;
        assert_eq!(
            requests.iter().filter(|r| r.0.is_none()).count(),
            1,
            "{what}: {requests:?}"
        );
        assert!(
            requests.iter().all(|r| r.0.is_none() || r.0 == Some(tail)),
            "{what}: a wasted Range download: {requests:?}"
        );
    }
}

/// The slot as an interrupted gzip install left it (the image up to `record`'s slot offset),
/// with `bad` as its resume record: install `gz` again, check that the image is installed and
/// the record gone, and return the requests the server saw.
async fn install_over_record(
    fx: &Fixture,
    img: &[u8],
    gz: &[u8],
    record: &resume::ResumeRecord,
    bad: &resume::ResumeRecord,
    what: &str,
) -> Vec<(Option<u64>, Option<String>)> {
    install_over_record_with(fx, (img, gz), record, bad, what, &|_, _| {}).await
}

/// [`install_over_record`] of `artifact` holding `img`, with the request and options `adjust`
/// makes.
async fn install_over_record_with(
    fx: &Fixture,
    (img, artifact): (&[u8], &[u8]),
    record: &resume::ResumeRecord,
    bad: &resume::ResumeRecord,
    what: &str,
    adjust: Adjust<'_>,
) -> Vec<(Option<u64>, Option<String>)> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.slot)
        .unwrap();
    let out = record.slot_offset as usize;
    std::os::unix::fs::FileExt::write_all_at(&f, &img[..out], 0).unwrap();
    resume::save(&fx.resume_path(), bad).unwrap();
    resumed_over_record(fx, img, artifact, what, adjust).await
}

#[tokio::test]
async fn a_tampered_gzip_record_never_gives_a_wrong_image() {
    let fx = Fixture::new(9 << 20);
    let (img, gz, record) = interrupted_gzip_install(&fx).await;
    let mut other_state = sha256_state::Sha256State::new();
    other_state.update(&vec![1u8; record.artifact_offset as usize]);
    let mut tampered: Vec<(&str, resume::ResumeRecord)> = vec![
        (
            "crc32",
            resume::ResumeRecord {
                crc32: record.crc32.map(|c| c ^ 4),
                ..record.clone()
            },
        ),
        (
            "bits",
            resume::ResumeRecord {
                bits: record.bits.map(|b| (b + 3) % 8),
                ..record.clone()
            },
        ),
        (
            "no state",
            resume::ResumeRecord {
                artifact_sha256_state: None,
                ..record.clone()
            },
        ),
        (
            "version",
            resume::ResumeRecord {
                version: 2,
                ..record.clone()
            },
        ),
    ];
    tampered.extend(moved_offsets_and_hashes(&record, &other_state, 1));
    install_over_tampered_records(&fx, &img, &gz, &record, tampered).await;
}

/// The tampered records a decoder's resume record is tried with besides its own fields: another
/// artifact hash state, the slot and artifact offsets moved by `step` bytes, another slot sha256.
fn moved_offsets_and_hashes(
    record: &resume::ResumeRecord,
    other_hash: &sha256_state::Sha256State,
    step: u64,
) -> Vec<(&'static str, resume::ResumeRecord)> {
    let with = |change: &dyn Fn(&mut resume::ResumeRecord)| {
        let mut tampered = record.clone();
        change(&mut tampered);
        tampered
    };
    vec![
        (
            "artifact hash state",
            with(&|r| r.artifact_sha256_state = Some(other_hash.to_text())),
        ),
        ("slot offset", with(&|r| r.slot_offset -= step)),
        ("artifact offset", with(&|r| r.artifact_offset += step)),
        (
            "slot sha256",
            with(&|r| r.slot_sha256 = Some("0".repeat(64))),
        ),
    ]
}

/// [`install_over_record`] for each of `tampered` on a slot that holds nothing of the image
/// after `record`'s slot offset: the record does not fit and is ignored, or the resume fails
/// and the install starts over from byte 0 once; either way a clean download installs the
/// image, with one request from byte 0.
async fn install_over_tampered_records(
    fx: &Fixture,
    img: &[u8],
    artifact: &[u8],
    record: &resume::ResumeRecord,
    tampered: Vec<(&str, resume::ResumeRecord)>,
) {
    for (what, bad) in tampered {
        std::fs::write(&fx.slot, vec![FILL; fx.capacity]).unwrap();
        let requests = install_over_record(fx, img, artifact, record, &bad, what).await;
        assert!(
            requests.iter().any(|r| r.0.is_none()),
            "{what}: never started over: {requests:?}"
        );
    }
}

#[tokio::test]
async fn gzip_without_sha256_restarts_from_zero() {
    let fx = Fixture::new(9 << 20);
    let img = gunzip::tests::image(8 << 20, 22);
    let gz = gunzip::tests::gzip(&img, 6);
    let server = ArtifactServer::start(gz.clone());
    server.always(drop_after((gz.len() * 6 / 10) as u64));
    let mut options = fast_options();
    options.retry.attempts = 0;
    let mut req = fx.request(&server.url, &gz);
    req.expected = ExpectedHash {
        sha256: None,
        sha1: Some(hex::encode(<sha1::Sha1 as Digest>::digest(&gz))),
        md5: None,
    };
    run(&req, &options).await.0.unwrap_err();
    assert!(
        resume::load(&fx.resume_path()).is_none(),
        "a sha1 gzip left a record"
    );
    server.clear();
    run(&req, &fast_options()).await.0.unwrap();
    fx.assert_installed(&img);
}

/// zstd at `level` with a content checksum, one frame per `frame` bytes of `data`.
fn zstd_frames(data: &[u8], frame: usize, level: i32) -> Vec<u8> {
    let mut c = zstd::bulk::Compressor::new(level).unwrap();
    c.include_checksum(true).unwrap();
    data.chunks(frame)
        .flat_map(|part| c.compress(part).unwrap())
        .collect()
}

/// An install of the zstd artifact `zst` (holding `img`) interrupted after 60 % of it: see
/// [`interrupted_decoder_install`].
async fn interrupted_zstd_install(fx: &Fixture, img: &[u8], zst: &[u8]) -> resume::ResumeRecord {
    let record = interrupted_decoder_install(fx, img, zst, "zstd").await;
    assert!(record.zstd_state.is_some(), "{record:?}");
    record
}

/// An install of the compressed `artifact` (holding `img`) interrupted after 60 % of it: the
/// record is a `format` resume point at least 1 MiB into the image, the slot holds the image
/// up to it.
async fn interrupted_decoder_install(
    fx: &Fixture,
    img: &[u8],
    artifact: &[u8],
    format: &str,
) -> resume::ResumeRecord {
    interrupted_decoder_install_with(fx, img, artifact, format, &|_, _| {}).await
}

/// [`interrupted_decoder_install`] with the request and options `adjust` makes.
async fn interrupted_decoder_install_with(
    fx: &Fixture,
    img: &[u8],
    artifact: &[u8],
    format: &str,
    adjust: Adjust<'_>,
) -> resume::ResumeRecord {
    let limit = artifact.len() * 6 / 10;
    let err = interrupted_install_with(fx, artifact, limit, adjust).await;
    assert!(err.is_retryable(), "{err}");
    let record = resume::load(&fx.resume_path()).expect("resume record kept");
    assert_eq!(record.format, format, "{record:?}");
    assert!(record.slot_offset >= 1 << 20, "{record:?}");
    assert!(record.artifact_offset > 0 && record.artifact_offset < artifact.len() as u64);
    let out = record.slot_offset as usize;
    assert!(
        fx.slot_bytes()[..out] == img[..out],
        "the slot's prefix is not the image"
    );
    record
}

/// An 8 MiB image at zstd level 3 (blocks of up to 128 KiB of output), interrupted: see
/// [`interrupted_zstd_install`].
async fn interrupted_zstd_image(fx: &Fixture) -> (Vec<u8>, Vec<u8>, resume::ResumeRecord) {
    let img = gunzip::tests::image(8 << 20, 23);
    let zst = zstd(&img);
    let record = interrupted_zstd_install(fx, &img, &zst).await;
    (img, zst, record)
}

/// "After the restart": an install of `artifact` (holding `img`) over `record` downloads
/// once, from the record's artifact offset, and ends with the image, the record gone.
async fn resumes_from_the_record(
    fx: &Fixture,
    img: &[u8],
    artifact: &[u8],
    record: &resume::ResumeRecord,
    what: &str,
) {
    let requests = resumed_over_record(fx, img, artifact, what, &|_, _| {}).await;
    assert_eq!(requests.len(), 1, "{what}: {requests:?}");
    assert_eq!(requests[0].0, Some(record.artifact_offset), "{what}");
}

/// An install of `artifact` (holding `img`) with the request and options `adjust` makes ends
/// with the image, the record gone; the requests the server saw.
async fn resumed_over_record(
    fx: &Fixture,
    img: &[u8],
    artifact: &[u8],
    what: &str,
    adjust: Adjust<'_>,
) -> Vec<(Option<u64>, Option<String>)> {
    let server = ArtifactServer::start(artifact.to_vec());
    let mut req = fx.request(&server.url, artifact);
    let mut options = fast_options();
    adjust(&mut req, &mut options);
    let installed = run(&req, &options)
        .await
        .0
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(installed.sha256_of_slot_image, sha256_hex(img), "{what}");
    assert_eq!(installed.bytes_written, img.len() as u64, "{what}");
    fx.assert_installed(img);
    assert!(!fx.resume_path().exists(), "{what}");
    server.requests()
}

#[tokio::test]
async fn restart_resumes_zstd_image_from_a_block_boundary() {
    let img = gunzip::tests::image(8 << 20, 23);
    // One frame; frames of 3 MiB (the resume point in a later frame, whose window starts
    // with it); and a frame at level 19 (a window of 8 MiB, the largest resumed).
    for (what, zst) in [
        ("one frame", zstd(&img)),
        ("frames", zstd_frames(&img, 3 << 20, 3)),
        ("level 19", zstd_frames(&img, img.len(), 19)),
    ] {
        let fx = Fixture::new(9 << 20);
        let record = interrupted_zstd_install(&fx, &img, &zst).await;
        resumes_from_the_record(&fx, &img, &zst, &record, what).await;
    }
}

#[tokio::test]
async fn zstd_resume_over_a_changed_slot_starts_over() {
    let fx = Fixture::new(9 << 20);
    let (img, zst, record) = interrupted_zstd_image(&fx).await;
    // A byte of the prefix changed behind the agent's back (before the window, and in it).
    for at in [1000, record.slot_offset - 10] {
        starts_over_after_a_changed_byte(&fx, &img, &zst, &record, at).await;
    }
}

/// Byte `at` of the slot's prefix changed behind the agent's back: an install of `artifact`
/// (holding `img`) over `record` downloads once, from byte 0 (the record was dropped before
/// any Range download), and ends with the image.
async fn starts_over_after_a_changed_byte(
    fx: &Fixture,
    img: &[u8],
    artifact: &[u8],
    record: &resume::ResumeRecord,
    at: u64,
) {
    fx.flip_slot_byte(img, at);
    let server = ArtifactServer::start(artifact.to_vec());
    resume::save(&fx.resume_path(), record).unwrap();
    run(&fx.request(&server.url, artifact), &fast_options())
        .await
        .0
        .unwrap();
    assert_eq!(
        server.requests(),
        vec![(None, Some("TargetToken secret".into()))]
    );
    fx.assert_installed(img);
}

#[tokio::test]
async fn a_tampered_zstd_record_never_gives_a_wrong_image() {
    let fx = Fixture::new(9 << 20);
    let (img, zst, record) = interrupted_zstd_image(&fx).await;
    let mut other_hash = sha256_state::Sha256State::new();
    other_hash.update(&vec![1u8; record.artifact_offset as usize]);
    // A well-formed state of another boundary of the same frame: it parses, but the tables
    // and offsets are not the ones at this point.
    let other_state = {
        let mut decoder = unzstd::ZstdDecoder::new(&zst[..], None);
        decoder.boundaries_from(0);
        let mut buf = vec![0u8; 1 << 16];
        let mut states = Vec::new();
        while states.len() < 8 {
            if decoder.read(&mut buf).unwrap() == 0 {
                break;
            }
            if let Some(b) = decoder.take_boundary() {
                states.push(b.state.to_text());
            }
        }
        let mine = record.zstd_state.clone();
        states
            .into_iter()
            .find(|s| Some(s) != mine.as_ref())
            .unwrap()
    };
    // The state of another boundary may still decode the rest of the frame right (when the
    // blocks after the point set their own tables and new offsets before they repeat one):
    // then the resume succeeds, else it fails the frame and starts over. Either way the image
    // is the right one.
    let other = resume::ResumeRecord {
        zstd_state: Some(other_state),
        ..record.clone()
    };
    std::fs::write(&fx.slot, vec![FILL; fx.capacity]).unwrap();
    let what = "zstd state of another boundary";
    let requests = install_over_record(&fx, &img, &zst, &record, &other, what).await;
    assert_eq!(requests[0].0, Some(record.artifact_offset), "{requests:?}");
    // The record's state with repeat offsets (its last field) beyond the window.
    let far_offsets = {
        let state = record.zstd_state.clone().unwrap();
        let (rest, _reps) = state.rsplit_once(':').unwrap();
        format!("{rest}:99999999,1,1")
    };
    let mut tampered: Vec<(&str, resume::ResumeRecord)> = vec![
        (
            "repeat offsets beyond the window",
            resume::ResumeRecord {
                zstd_state: Some(far_offsets),
                ..record.clone()
            },
        ),
        (
            "zstd state garbage",
            resume::ResumeRecord {
                zstd_state: Some("not a state".into()),
                ..record.clone()
            },
        ),
        (
            "no zstd state",
            resume::ResumeRecord {
                zstd_state: None,
                ..record.clone()
            },
        ),
        (
            "gzip format",
            resume::ResumeRecord {
                format: "gzip".into(),
                bits: Some(0),
                crc32: Some(0),
                ..record.clone()
            },
        ),
    ];
    tampered.extend(moved_offsets_and_hashes(&record, &other_hash, 1));
    install_over_tampered_records(&fx, &img, &zst, &record, tampered).await;
}

#[tokio::test]
async fn zstd_images_without_resume_points_restart_from_zero() {
    let img = gunzip::tests::image(9 << 20, 24);
    let fx = Fixture::new(10 << 20);
    let no_checksum = zstd::bulk::compress(&img, 3).unwrap();
    let large_window = {
        let mut c = zstd::bulk::Compressor::new(3).unwrap();
        c.include_checksum(true).unwrap();
        c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(24))
            .unwrap();
        c.compress(&img).unwrap()
    };
    let tar_zst = zstd::bulk::compress(&tar_of(&[("rootfs.img", &img)]), 3).unwrap();
    for (what, artifact) in [
        ("no content checksum", no_checksum),
        ("a window above 8 MiB", large_window),
        ("tar.zst without a content checksum", tar_zst),
    ] {
        let err = interrupted_install(&fx, &artifact, artifact.len() * 6 / 10).await;
        assert!(err.is_retryable(), "{what}: {err}");
        assert!(
            resume::load(&fx.resume_path()).is_none(),
            "{what} left a record"
        );
    }
    let zst = zstd(&img);
    let server = ArtifactServer::start(zst.clone());
    server.always(drop_after((zst.len() * 6 / 10) as u64));
    let mut options = fast_options();
    options.retry.attempts = 0;
    let mut req = fx.request(&server.url, &zst);
    req.expected = ExpectedHash {
        sha256: None,
        sha1: Some(hex::encode(<sha1::Sha1 as Digest>::digest(&zst))),
        md5: None,
    };
    run(&req, &options).await.0.unwrap_err();
    assert!(
        resume::load(&fx.resume_path()).is_none(),
        "a sha1 zstd left a record"
    );
    server.clear();
    run(&req, &fast_options()).await.0.unwrap();
    fx.assert_installed(&img);
}

/// The request and options of the replay tests: the artifact of `server`, adjusted.
fn replay_request(
    fx: &Fixture,
    server: &ArtifactServer,
    artifact: &[u8],
    adjust: Adjust<'_>,
) -> (InstallRequest, InstallOptions) {
    let mut req = fx.request(&server.url, artifact);
    let mut options = fast_options();
    adjust(&mut req, &mut options);
    (req, options)
}

/// An install of `artifact` (a tar or signed bundle holding `img` raw) interrupted after 60 %
/// of it: the record is a `member` one at a checkpoint, the slot holds the image up to it.
async fn interrupted_member_install(
    fx: &Fixture,
    img: &[u8],
    artifact: &[u8],
    adjust: Adjust<'_>,
) -> resume::ResumeRecord {
    let err = interrupted_install_with(fx, artifact, artifact.len() * 6 / 10, adjust).await;
    assert!(err.is_retryable(), "{err}");
    let record = resume::load(&fx.resume_path()).expect("resume record kept");
    assert_eq!(record.format, "member", "{record:?}");
    assert!(record.slot_offset >= 1 << 20, "{record:?}");
    assert_eq!(
        record.slot_offset % (1 << 20),
        0,
        "not a checkpoint: {record:?}"
    );
    let out = record.slot_offset as usize;
    assert!(
        fx.slot_bytes()[..out] == img[..out],
        "the slot's prefix is not the image"
    );
    record
}

/// Names the image member of a tar holding several files.
fn named_rootfs(_: &mut InstallRequest, options: &mut InstallOptions) {
    options.archive_member = Some("rootfs.img".into());
}

#[tokio::test]
async fn restart_resumes_a_raw_image_in_a_tar_by_replaying_its_head_and_the_slot() {
    let img = image(5 << 20, 31);
    let tar = tar_of(&[("README", b"read me"), ("rootfs.img", &img)]);
    let fx = Fixture::new(6 << 20);
    let first = interrupted_member_install(&fx, &img, &tar, &named_rootfs).await;
    // README's header and data block, then the image's header.
    assert_eq!(first.member_offset, Some(1536), "{first:?}");
    assert_eq!(first.member_of.as_deref(), Some("tar"), "{first:?}");
    assert_eq!(first.artifact_offset, 1536 + first.slot_offset);

    // The resumed run is cut again: it leaves its own record, further on.
    let server = ArtifactServer::start(tar.clone());
    server.always(drop_after(3 << 19));
    let (req, mut options) = replay_request(&fx, &server, &tar, &named_rootfs);
    options.retry.attempts = 0;
    let err = run(&req, &options).await.0.unwrap_err();
    assert!(err.is_retryable(), "{err}");
    let second = resume::load(&fx.resume_path()).expect("resume record kept");
    assert_eq!(second.format, "member", "{second:?}");
    assert_eq!(second.member_offset, Some(1536));
    assert!(second.slot_offset > first.slot_offset, "{second:?}");
    let requests: Vec<_> = server.requests().into_iter().map(|r| r.0).collect();
    assert_eq!(requests, [Some(0), Some(first.artifact_offset)]);

    let server = ArtifactServer::start(tar.clone());
    let (req, options) = replay_request(&fx, &server, &tar, &named_rootfs);
    let installed = run(&req, &options).await.0.unwrap();
    assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img));
    assert_eq!(installed.bytes_written, img.len() as u64);
    fx.assert_installed(&img);
    // The head (one Range request from 0), then only what follows the resume point.
    let requests: Vec<_> = server.requests().into_iter().map(|r| r.0).collect();
    assert_eq!(requests, [Some(0), Some(second.artifact_offset)]);
    let log = server.sim.download_log();
    assert_eq!(log[0].range.as_deref(), Some("bytes=0-1535"), "{log:#?}");
    let served: u64 = log.iter().filter_map(|r| r.body_len).sum();
    assert_eq!(served, tar.len() as u64 - second.slot_offset, "{log:#?}");
    assert!(!fx.resume_path().exists());
}

/// A replay needs no saved hash state: a tar announced with only an md5 resumes too, the md5
/// covering the replayed head and slot bytes.
#[tokio::test]
async fn a_tar_with_only_an_md5_resumes_by_replay() {
    let img = image(3 << 20, 38);
    let tar = tar_of(&[("rootfs.img", &img)]);
    let md5_only = |req: &mut InstallRequest, _: &mut InstallOptions| {
        req.expected = ExpectedHash {
            sha256: None,
            sha1: None,
            md5: Some(hex::encode(<md5::Md5 as Digest>::digest(&tar))),
        };
    };
    let fx = Fixture::new(4 << 20);
    let record = interrupted_member_install(&fx, &img, &tar, &md5_only).await;
    assert_eq!(record.algorithm, "md5", "{record:?}");
    let server = ArtifactServer::start(tar.clone());
    let (req, options) = replay_request(&fx, &server, &tar, &md5_only);
    let installed = run(&req, &options).await.0.unwrap();
    assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img));
    fx.assert_installed(&img);
    let requests: Vec<_> = server.requests().into_iter().map(|r| r.0).collect();
    assert_eq!(requests, [Some(0), Some(record.artifact_offset)]);
    // A wrong md5 is caught over the replayed bytes as well: the resume starts over once,
    // then the install fails for good.
    std::fs::write(&fx.slot, vec![FILL; fx.capacity]).unwrap();
    let record = interrupted_member_install(&fx, &img, &tar, &md5_only).await;
    let bad_md5 = |req: &mut InstallRequest, o: &mut InstallOptions| {
        md5_only(req, o);
        req.expected.md5 = Some("0".repeat(32));
    };
    let forged = resume::ResumeRecord {
        expected_hash: "0".repeat(32),
        ..record
    };
    resume::save(&fx.resume_path(), &forged).unwrap();
    let server = ArtifactServer::start(tar.clone());
    let (req, options) = replay_request(&fx, &server, &tar, &bad_md5);
    let err = run(&req, &options).await.0.unwrap_err();
    assert!(matches!(err, InstallError::HashMismatch { .. }), "{err}");
    let requests: Vec<_> = server.requests().into_iter().map(|r| r.0).collect();
    assert_eq!(requests, [Some(0), Some(forged.artifact_offset), None]);
    assert!(!fx.resume_path().exists());
}

#[tokio::test]
async fn restart_resumes_a_raw_image_in_a_signed_bundle_by_replay() {
    let img = image(5 << 20, 32);
    let (bundle, policy, _keys) = signed_bundle(&img);
    let at = bundle_image_offset(&bundle) as u64;
    let signed = move |req: &mut InstallRequest, _: &mut InstallOptions| {
        req.bundle = Some(policy.clone());
    };
    let fx = Fixture::new(6 << 20);
    let record = interrupted_member_install(&fx, &img, &bundle, &signed).await;
    assert_eq!(record.member_offset, Some(at), "{record:?}");
    assert_eq!(record.member_of.as_deref(), Some("bundle"), "{record:?}");

    // Without a signature policy the bundle's record is not used: it starts over (as a tar
    // of three files it then needs the image named).
    let server = ArtifactServer::start(bundle.clone());
    let (req, options) = replay_request(&fx, &server, &bundle, &|_, o| {
        o.archive_member = Some("rootfs.img".into());
    });
    resume::save(&fx.resume_path(), &record).unwrap();
    run(&req, &options).await.0.unwrap();
    fx.assert_installed(&img);
    assert_eq!(server.requests()[0].0, None, "resumed without the policy");

    // Under the policy it resumes, the bundle's signature and signed hash checked over the
    // replayed bytes.
    std::fs::write(&fx.slot, vec![FILL; fx.capacity]).unwrap();
    let record = interrupted_member_install(&fx, &img, &bundle, &signed).await;
    let server = ArtifactServer::start(bundle.clone());
    let (req, options) = replay_request(&fx, &server, &bundle, &signed);
    let installed = run(&req, &options).await.0.unwrap();
    assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img));
    fx.assert_installed(&img);
    // The delta probe's and the replay's head requests, then the rest.
    let requests: Vec<_> = server.requests().into_iter().map(|r| r.0).collect();
    assert_eq!(
        requests.last(),
        Some(&Some(record.artifact_offset)),
        "{requests:?}"
    );
    assert!(
        requests[..requests.len() - 1].iter().all(|r| *r == Some(0)),
        "{requests:?}"
    );
    assert!(!fx.resume_path().exists());
}

#[tokio::test]
async fn a_replay_over_a_changed_slot_starts_over_once() {
    let img = image(4 << 20, 33);
    let tar = tar_of(&[("rootfs.img", &img)]);
    let (bundle, policy, _keys) = signed_bundle(&img);
    let signed = move |req: &mut InstallRequest, _: &mut InstallOptions| {
        req.bundle = Some(policy.clone());
    };
    let none = |_: &mut InstallRequest, _: &mut InstallOptions| {};
    let cases: [(&str, &[u8], Adjust<'_>); 2] =
        [("tar", &tar, &none), ("bundle", &bundle, &signed)];
    for (what, artifact, adjust) in cases {
        let fx = Fixture::new(5 << 20);
        interrupted_member_install(&fx, &img, artifact, adjust).await;
        // A byte of the prefix changed behind the agent's back.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&fx.slot)
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, &[img[1000] ^ 1], 1000).unwrap();
        let server = ArtifactServer::start(artifact.to_vec());
        let (req, options) = replay_request(&fx, &server, artifact, adjust);
        let installed = run(&req, &options)
            .await
            .0
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img), "{what}");
        fx.assert_installed(&img);
        let requests: Vec<_> = server.requests().into_iter().map(|r| r.0).collect();
        assert_eq!(
            requests.last(),
            Some(&None),
            "{what}: never started over: {requests:?}"
        );
        assert!(!fx.resume_path().exists(), "{what}");
    }
}

#[tokio::test]
async fn a_server_that_ignores_the_range_of_the_head_gets_a_fresh_install() {
    let img = image(4 << 20, 34);
    let tar = tar_of(&[("rootfs.img", &img)]);
    let fx = Fixture::new(5 << 20);
    let record = interrupted_member_install(&fx, &img, &tar, &|_, _| {}).await;
    let server = ArtifactServer::start(tar.clone());
    server.always(FaultKind::IgnoreRange);
    run(&fx.request(&server.url, &tar), &fast_options())
        .await
        .0
        .unwrap();
    fx.assert_installed(&img);
    let requests: Vec<_> = server.requests().into_iter().map(|r| r.0).collect();
    assert!(
        !requests.contains(&Some(record.artifact_offset)),
        "resumed without the head: {requests:?}"
    );
    assert!(!fx.resume_path().exists());
}

#[tokio::test]
async fn a_tampered_member_record_never_gives_a_wrong_image() {
    let img = image(4 << 20, 35);
    let tar = tar_of(&[("rootfs.img", &img)]);
    let fx = Fixture::new(5 << 20);
    let record = interrupted_member_install(&fx, &img, &tar, &|_, _| {}).await;
    let n = record.slot_offset;
    let with = |member_offset: u64, slot_offset: u64| resume::ResumeRecord {
        member_offset: Some(member_offset),
        slot_offset,
        artifact_offset: member_offset + slot_offset,
        ..record.clone()
    };
    let image_len = img.len() as u64;
    let tampered: Vec<(&str, resume::ResumeRecord)> = vec![
        ("head one block longer", with(1024, n)),
        (
            "head one block longer, slot one shorter",
            with(1024, n - 512),
        ),
        ("slot offset past the checkpoint", with(512, n + (1 << 20))),
        ("slot offset past the image", with(512, image_len + 512)),
        ("slot offset past the slot", with(512, (5 << 20) + 4096)),
        (
            "artifact offset",
            resume::ResumeRecord {
                artifact_offset: record.artifact_offset + 1,
                ..record.clone()
            },
        ),
        (
            "hash",
            resume::ResumeRecord {
                expected_hash: "0".repeat(64),
                ..record.clone()
            },
        ),
        (
            "a bundle's without a policy",
            resume::ResumeRecord {
                member_of: Some("bundle".into()),
                ..record.clone()
            },
        ),
    ];
    install_over_tampered_records(&fx, &img, &tar, &record, tampered).await;
}

/// A record naming another member whose bytes the slot holds: the replayed stream is the
/// artifact byte for byte (its hash passes), but the image member is elsewhere. It must not
/// leave the other member's bytes at the start of the slot.
#[tokio::test]
async fn a_member_record_pointing_at_another_member_never_gives_a_wrong_image() {
    let img = image(3 << 20, 36);
    let other = image(3 << 20, 37);
    let tar = tar_of(&[("other.bin", &other), ("rootfs.img", &img)]);
    let fx = Fixture::new(4 << 20);
    let n = 2u64 << 20;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&fx.slot)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &other[..n as usize], 0).unwrap();
    let server = ArtifactServer::start(tar.clone());
    let (req, options) = replay_request(&fx, &server, &tar, &named_rootfs);
    let point = resume::MemberPoint {
        member_offset: 512,
        slot_offset: n,
        in_bundle: false,
    };
    let capacity_record = resume::ResumeRecord::member(
        &req.url,
        &fx.slot,
        "sha256",
        &sha256_hex(&tar),
        Some(tar.len() as u64),
        &point,
    );
    resume::save(&fx.resume_path(), &capacity_record).unwrap();
    let installed = run(&req, &options).await.0.unwrap();
    assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img));
    fx.assert_installed(&img);
    let requests: Vec<_> = server.requests().into_iter().map(|r| r.0).collect();
    assert_eq!(requests, [Some(0), Some(512 + n), None], "{requests:?}");
}

/// A slot whose writes fail past a given offset (disk full, I/O error).
struct FailingSlot {
    data: Vec<u8>,
    fail_from: u64,
}

impl slot::SlotDevice for FailingSlot {
    fn path(&self) -> &Path {
        Path::new("failing-slot")
    }
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }
    fn write_all_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        if offset + data.len() as u64 > self.fail_from {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.data[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        Ok(())
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let from = (offset as usize).min(self.data.len());
        let n = buf.len().min(self.data.len() - from);
        buf[..n].copy_from_slice(&self.data[from..from + n]);
        Ok(n)
    }
    fn sync_range(&mut self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn sync_data(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn write_error_on_the_slot_is_reported() {
    let img = image(3 << 20, 19);
    let plan = pipeline::SinkPlan {
        url: "http://127.0.0.1/x".into(),
        algorithm: hash::HashAlgorithm::Sha256,
        expected: sha256_hex(&img),
        size: Some(img.len() as u64),
        start: 0,
        resume_path: PathBuf::from("/nonexistent/resume.json"),
        archive_member: None,
        bundle: None,
        checkpoint_interval: 64 << 20,
        gzip_resume: None,
        zstd_resume: None,
        xz_resume: None,
        replay: None,
        bundle_image_at: None,
        bundle_head: None,
        artifact_sha256: None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    for chunk in img.chunks(100_000) {
        tx.try_send(pipeline::Chunk::Data(bytes::Bytes::copy_from_slice(chunk)))
            .unwrap();
    }
    tx.try_send(pipeline::Chunk::End).unwrap();
    let counters = pipeline::Counters::new(0, Some(img.len() as u64));
    let mut dev = FailingSlot {
        data: vec![FILL; 4 << 20],
        fail_from: 2 << 20,
    };
    let err = pipeline::run(plan, &mut dev, rx.into(), &counters).unwrap_err();
    match &err {
        InstallError::SlotIo {
            op, offset, source, ..
        } => {
            assert_eq!(*op, "write");
            assert_eq!(*offset, 2 << 20);
            assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
        }
        other => panic!("unexpected {other}"),
    }
    assert!(!err.is_retryable());
    assert!(
        dev.data[3 << 20..].iter().all(|&b| b == FILL),
        "wrote past the failure"
    );
}

#[test]
fn aborted_download_is_not_mistaken_for_the_end() {
    let img = image(1000, 20);
    let plan = pipeline::SinkPlan {
        url: "http://127.0.0.1/x".into(),
        algorithm: hash::HashAlgorithm::Sha256,
        expected: sha256_hex(&img),
        size: Some(img.len() as u64),
        start: 0,
        resume_path: PathBuf::from("/nonexistent/resume.json"),
        archive_member: None,
        bundle: None,
        checkpoint_interval: 64 << 20,
        gzip_resume: None,
        zstd_resume: None,
        xz_resume: None,
        replay: None,
        bundle_image_at: None,
        bundle_head: None,
        artifact_sha256: None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    tx.try_send(pipeline::Chunk::Data(bytes::Bytes::copy_from_slice(
        &img[..500],
    )))
    .unwrap();
    drop(tx);
    let counters = pipeline::Counters::new(0, None);
    let mut dev = FailingSlot {
        data: vec![FILL; 4096],
        fail_from: u64::MAX,
    };
    let err = pipeline::run(plan, &mut dev, rx.into(), &counters).unwrap_err();
    assert!(matches!(err, InstallError::Aborted), "{err}");
}

#[tokio::test]
async fn required_signature_without_verifier_refuses() {
    let img = image(1000, 21);
    let server = ArtifactServer::start(img.clone());
    let fx = Fixture::new(4096);
    let mut req = fx.request(&server.url, &img);
    req.bundle = Some(BundlePolicy {
        require_signature: true,
        ..BundlePolicy::default()
    });
    let err = run(&req, &fast_options()).await.0.unwrap_err();
    assert!(matches!(err, InstallError::Signature(_)), "{err}");
    fx.assert_slot_untouched();
}

#[tokio::test]
async fn empty_images_are_refused() {
    for artifact in [Vec::new(), gzip(b""), tar_of(&[("rootfs.img", b"")])] {
        let server = ArtifactServer::start(artifact.clone());
        let fx = Fixture::new(4096);
        let err = run(&fx.request(&server.url, &artifact), &fast_options())
            .await
            .0
            .unwrap_err();
        assert!(matches!(err, InstallError::EmptyImage), "{err}");
        fx.assert_slot_untouched();
    }
}

#[test]
fn stopped_install_stops_reading_and_writing() {
    let img = image(1 << 20, 22);
    let plan = pipeline::SinkPlan {
        url: "http://127.0.0.1/x".into(),
        algorithm: hash::HashAlgorithm::Sha256,
        expected: sha256_hex(&img),
        size: Some(img.len() as u64),
        start: 0,
        resume_path: PathBuf::from("/nonexistent/resume.json"),
        archive_member: None,
        bundle: None,
        checkpoint_interval: 64 << 20,
        gzip_resume: None,
        zstd_resume: None,
        xz_resume: None,
        replay: None,
        bundle_image_at: None,
        bundle_head: None,
        artifact_sha256: None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    for chunk in img.chunks(4096) {
        tx.try_send(pipeline::Chunk::Data(bytes::Bytes::copy_from_slice(chunk)))
            .unwrap();
    }
    tx.try_send(pipeline::Chunk::End).unwrap();
    let counters = pipeline::Counters::new(0, Some(img.len() as u64));
    counters
        .stopped
        .store(true, std::sync::atomic::Ordering::Release);
    let mut dev = FailingSlot {
        data: vec![FILL; 2 << 20],
        fail_from: u64::MAX,
    };
    let err = pipeline::run(plan, &mut dev, rx.into(), &counters).unwrap_err();
    assert!(matches!(err, InstallError::Aborted), "{err}");
    assert!(dev.data.iter().all(|&b| b == FILL), "wrote after the stop");
}

/// Feed `artifact` to the blocking stage in chunks of the given sizes (cycled).
fn run_pipeline_chunked(
    artifact: &[u8],
    chunk_sizes: &[usize],
    capacity: usize,
) -> (Result<Installed, InstallError>, Vec<u8>) {
    run_pipeline_with_policy(artifact, chunk_sizes, capacity, None)
}

/// [`run_pipeline_chunked`] with a signature policy.
fn run_pipeline_with_policy(
    artifact: &[u8],
    chunk_sizes: &[usize],
    capacity: usize,
    bundle: Option<BundlePolicy>,
) -> (Result<Installed, InstallError>, Vec<u8>) {
    let mut dev = FailingSlot {
        data: vec![FILL; capacity],
        fail_from: u64::MAX,
    };
    let result = run_pipeline_on(artifact, chunk_sizes, bundle, &mut dev);
    (result, dev.data)
}

/// The blocking stage on `artifact`, sent in chunks of the given sizes (cycled), onto `dev`.
fn run_pipeline_on(
    artifact: &[u8],
    chunk_sizes: &[usize],
    bundle: Option<BundlePolicy>,
    dev: &mut dyn slot::SlotDevice,
) -> Result<Installed, InstallError> {
    let sha256 = (hash::HashAlgorithm::Sha256, sha256_hex(artifact));
    run_pipeline_hashed(artifact, chunk_sizes, bundle, sha256, dev)
}

/// [`run_pipeline_on`] with the artifact hash `(algorithm, expected)`.
fn run_pipeline_hashed(
    artifact: &[u8],
    chunk_sizes: &[usize],
    bundle: Option<BundlePolicy>,
    (algorithm, expected): (hash::HashAlgorithm, String),
    dev: &mut dyn slot::SlotDevice,
) -> Result<Installed, InstallError> {
    let plan = pipeline::SinkPlan {
        url: "http://127.0.0.1/x".into(),
        algorithm,
        expected,
        size: Some(artifact.len() as u64),
        start: 0,
        resume_path: PathBuf::from("/nonexistent/resume.json"),
        archive_member: None,
        bundle,
        checkpoint_interval: 64 << 20,
        gzip_resume: None,
        zstd_resume: None,
        xz_resume: None,
        replay: None,
        bundle_image_at: None,
        bundle_head: None,
        artifact_sha256: None,
    };
    let (tx, rx) = tokio::sync::mpsc::channel(artifact.len() + 2);
    let mut rest = artifact;
    for size in chunk_sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let n = (*size).clamp(1, rest.len());
        tx.try_send(pipeline::Chunk::Data(bytes::Bytes::copy_from_slice(
            &rest[..n],
        )))
        .unwrap();
        rest = &rest[n..];
    }
    tx.try_send(pipeline::Chunk::End).unwrap();
    let counters = pipeline::Counters::new(0, Some(artifact.len() as u64));
    pipeline::run(plan, dev, rx.into(), &counters)
}

/// A slot that reads back one byte different from what was written (a bad medium).
struct FlippingSlot(FailingSlot);

impl slot::SlotDevice for FlippingSlot {
    fn path(&self) -> &Path {
        self.0.path()
    }
    fn capacity(&self) -> u64 {
        self.0.capacity()
    }
    fn write_all_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.0.write_all_at(offset, data)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.read_at(offset, buf)?;
        if offset == 0 && n > 100 {
            buf[100] ^= 1;
        }
        Ok(n)
    }
    fn sync_range(&mut self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn sync_data(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The blocking stage on `artifact`, all of it in the channel at once, onto `dev`.
fn run_whole(
    artifact: &[u8],
    bundle: Option<BundlePolicy>,
    dev: &mut dyn slot::SlotDevice,
) -> Result<Installed, InstallError> {
    run_pipeline_on(artifact, &[artifact.len()], bundle, dev)
}

/// The read-back is compared with the sha256 of the bytes written, whether the writer hashed
/// them (gzip, tar) or the artifact hash stands for them (raw image with a sha256).
#[test]
fn read_back_mismatch_is_detected_for_every_format() {
    let img = image(200_000, 23);
    for artifact in [img.clone(), gzip(&img), tar_of(&[("rootfs.img", &img)])] {
        let mut dev = FlippingSlot(FailingSlot {
            data: vec![FILL; 256 << 10],
            fail_from: u64::MAX,
        });
        let err = run_whole(&artifact, None, &mut dev).unwrap_err();
        match err {
            InstallError::ReadBackMismatch { written, read, .. } => {
                assert_eq!(written, sha256_hex(&img));
                let mut bad = img.clone();
                bad[100] ^= 1;
                assert_eq!(read, sha256_hex(&bad));
            }
            other => panic!("unexpected {other}"),
        }
    }
}

/// A real file slot whose read-back handle (the read-back thread's) sees one byte flipped at
/// `at`: a medium that returns something else than what was written, late in the image.
struct FlippingReadBack {
    slot: slot::FileSlot,
    at: u64,
}

impl slot::SlotDevice for FlippingReadBack {
    fn path(&self) -> &Path {
        self.slot.path()
    }
    fn capacity(&self) -> u64 {
        self.slot.capacity()
    }
    fn write_all_at(&mut self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        self.slot.write_all_at(offset, data)
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.slot.read_at(offset, buf)?;
        if (offset..offset + n as u64).contains(&self.at) {
            buf[(self.at - offset) as usize] ^= 1;
        }
        Ok(n)
    }
    fn sync_range(&mut self, offset: u64, len: u64, wait: bool) -> std::io::Result<()> {
        self.slot.sync_range(offset, len, wait)
    }
    fn sync_data(&mut self) -> std::io::Result<()> {
        self.slot.sync_data()
    }
    fn reader(&self) -> Option<Box<dyn slot::SlotDevice>> {
        let inner = self.slot.reader()?;
        Some(Box::new(FlippingReader { inner, at: self.at }))
    }
}

struct FlippingReader {
    inner: Box<dyn slot::SlotDevice>,
    at: u64,
}

impl slot::SlotDevice for FlippingReader {
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn capacity(&self) -> u64 {
        self.inner.capacity()
    }
    fn write_all_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
        unreachable!("the read-back never writes")
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read_at(offset, buf)?;
        if (offset..offset + n as u64).contains(&self.at) {
            buf[(self.at - offset) as usize] ^= 1;
        }
        Ok(n)
    }
    fn sync_range(&mut self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        unreachable!("the read-back never syncs")
    }
    fn sync_data(&mut self) -> std::io::Result<()> {
        unreachable!("the read-back never syncs")
    }
}

/// The read-back that overlaps the write (on its own thread, while later windows are still
/// written) still catches a byte the device returns wrong, both in a window read back early
/// and in the tail read back after the last sync.
#[test]
fn read_back_thread_detects_a_mismatch() {
    let img = image(20 << 20, 29);
    for at in [3 << 20, (19 << 20) + 5] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("slot.img");
        std::fs::write(&path, vec![FILL; 24 << 20]).unwrap();
        let file_slot = slot::open(&path, None, &dir.path().join("no-mountinfo")).unwrap();
        assert!(slot::SlotDevice::reader(&file_slot).is_some());
        let mut dev = FlippingReadBack {
            slot: file_slot,
            at,
        };
        let plan = pipeline::SinkPlan {
            url: "http://127.0.0.1/x".into(),
            algorithm: hash::HashAlgorithm::Sha256,
            expected: sha256_hex(&img),
            size: Some(img.len() as u64),
            start: 0,
            resume_path: dir.path().join("resume.json"),
            archive_member: None,
            bundle: None,
            checkpoint_interval: 64 << 20,
            gzip_resume: None,
            zstd_resume: None,
            xz_resume: None,
            replay: None,
            bundle_image_at: None,
            bundle_head: None,
            artifact_sha256: None,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        for chunk in img.chunks(1 << 20) {
            tx.try_send(pipeline::Chunk::Data(bytes::Bytes::copy_from_slice(chunk)))
                .unwrap();
        }
        tx.try_send(pipeline::Chunk::End).unwrap();
        let counters = pipeline::Counters::new(0, Some(img.len() as u64));
        let err = pipeline::run(plan, &mut dev, rx.into(), &counters).unwrap_err();
        match err {
            InstallError::ReadBackMismatch { written, read, .. } => {
                assert_eq!(written, sha256_hex(&img));
                let mut bad = img.clone();
                bad[at as usize] ^= 1;
                assert_eq!(read, sha256_hex(&bad), "flipped at {at}");
            }
            other => panic!("unexpected {other}"),
        }
        // The slot itself holds the image: only the read-back was wrong.
        assert_eq!(&std::fs::read(&path).unwrap()[..img.len()], &img[..]);
    }
}

mod chunking {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// However the bytes arrive (1-byte chunks, odd sizes), every format installs the
        /// same image.
        #[test]
        fn any_chunking_installs_the_image(
            len in 1usize..40_000,
            seed in any::<u32>(),
            format in 0u8..4,
            chunk_sizes in proptest::collection::vec(1usize..3000, 1..8),
        ) {
            let img = image(len, seed);
            let artifact = match format {
                0 => img.clone(),
                1 => gzip(&img),
                2 => tar_of(&[("rootfs.img", &img)]),
                _ => gzip(&tar_of(&[("rootfs.img", &img)])),
            };
            let (result, slot) = run_pipeline_chunked(&artifact, &chunk_sizes, 64 << 10);
            let installed = result.unwrap();
            prop_assert_eq!(installed.bytes_written, len as u64);
            prop_assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img));
            prop_assert!(slot[..len] == img[..]);
            prop_assert!(slot[len..].iter().all(|&b| b == FILL));
        }
    }
}

#[test]
fn backoff_grows_and_is_capped() {
    let p = RetryPolicy {
        attempts: 5,
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(350),
    };
    assert_eq!(p.backoff(1), Duration::from_millis(100));
    assert_eq!(p.backoff(2), Duration::from_millis(200));
    assert_eq!(p.backoff(3), Duration::from_millis(350));
    assert_eq!(p.backoff(40), Duration::from_millis(350));
}

/// Slots on real block devices (loop devices): these need root and util-linux, as in CI.
mod block {
    use super::*;
    use std::process::Command;

    fn run_tool(cmd: &mut Command) -> String {
        let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
        assert!(
            out.status.success(),
            "{cmd:?} failed (these tests need root, as in CI): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A loop device over a file; detached on drop.
    struct Loop {
        dev: PathBuf,
    }

    impl Loop {
        fn attach(file: &Path) -> Loop {
            let dev = run_tool(Command::new("losetup").args(["--find", "--show"]).arg(file));
            Loop { dev: dev.into() }
        }

        /// With partition scanning (`/dev/loopNpM` nodes).
        fn attach_partitioned(file: &Path) -> Loop {
            let dev = run_tool(
                Command::new("losetup")
                    .args(["--find", "--show", "--partscan"])
                    .arg(file),
            );
            Loop { dev: dev.into() }
        }
    }

    impl Drop for Loop {
        fn drop(&mut self) {
            let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
        }
    }

    /// A mounted filesystem; unmounted on drop.
    struct Mounted {
        at: PathBuf,
    }

    impl Mounted {
        fn ext4(dev: &Path, at: &Path) -> Mounted {
            run_tool(Command::new("mkfs.ext4").args(["-q", "-F"]).arg(dev));
            run_tool(Command::new("mount").arg(dev).arg(at));
            Mounted { at: at.into() }
        }
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.at).status();
        }
    }

    fn real_mounts() -> InstallOptions {
        InstallOptions {
            mountinfo: PathBuf::from("/proc/self/mountinfo"),
            ..fast_options()
        }
    }

    #[tokio::test]
    async fn installs_into_a_block_device_of_its_own_size() {
        let img = image((2 << 20) + 4096, 30);
        let server = ArtifactServer::start(img.clone());
        let fx = Fixture::new(4 << 20);
        let dev = Loop::attach(&fx.slot);
        let mut req = fx.request(&server.url, &img);
        req.slot_path = dev.dev.clone();
        let installed = run(&req, &real_mounts()).await.0.unwrap();
        assert_eq!(installed.bytes_written, img.len() as u64);
        drop(dev);
        fx.assert_installed(&img);

        // Too large for the device: refused before writing.
        let big = image((4 << 20) + 1, 31);
        let server = ArtifactServer::start(big.clone());
        let fx = Fixture::new(4 << 20);
        let dev = Loop::attach(&fx.slot);
        let mut req = fx.request(&server.url, &big);
        req.slot_path = dev.dev.clone();
        let err = run(&req, &real_mounts()).await.0.unwrap_err();
        assert!(
            matches!(err, InstallError::TooLarge { capacity, .. } if capacity == 4 << 20),
            "{err}"
        );
        drop(dev);
        fx.assert_slot_untouched();
    }

    #[tokio::test]
    async fn refuses_mounted_devices_and_the_booted_device_by_number() {
        let img = image(4096, 32);
        let server = ArtifactServer::start(img.clone());
        let fx = Fixture::new(8 << 20);
        let dev = Loop::attach(&fx.slot);
        let mut req = fx.request(&server.url, &img);
        req.slot_path = dev.dev.clone();

        // Another node with the same major:minor as the booted device is the booted device.
        let alias = fx.dir.path().join("root-alias");
        let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&dev.dev).unwrap());
        run_tool(
            Command::new("mknod")
                .arg(&alias)
                .arg("b")
                .arg(libc::major(rdev).to_string())
                .arg(libc::minor(rdev).to_string()),
        );
        req.booted_slot_path = Some(alias);
        let err = run(&req, &real_mounts()).await.0.unwrap_err();
        assert!(matches!(err, InstallError::SlotInUse { .. }), "{err}");

        // A mounted filesystem on the slot.
        req.booted_slot_path = None;
        let mnt = tempfile::tempdir().unwrap();
        let mounted = Mounted::ext4(&dev.dev, mnt.path());
        let err = run(&req, &real_mounts()).await.0.unwrap_err();
        assert!(
            matches!(&err, InstallError::SlotInUse { reason, .. } if reason.contains("mounted")),
            "{err}"
        );
        drop(mounted);
        drop(dev);
        assert!(server.requests().is_empty());
    }

    #[tokio::test]
    async fn refuses_a_slot_file_mounted_through_a_loop_device() {
        let img = image(4096, 33);
        let server = ArtifactServer::start(img.clone());
        let fx = Fixture::new(8 << 20);
        let dev = Loop::attach(&fx.slot);
        let mnt = tempfile::tempdir().unwrap();
        let mounted = Mounted::ext4(&dev.dev, mnt.path());
        let err = run(&fx.request(&server.url, &img), &real_mounts())
            .await
            .0
            .unwrap_err();
        assert!(
            matches!(&err, InstallError::SlotInUse { reason, .. } if reason.contains("mounted")),
            "{err}"
        );
        drop(mounted);
        drop(dev);
    }

    #[tokio::test]
    async fn refuses_a_disk_whose_partition_is_mounted() {
        let img = image(4096, 34);
        let server = ArtifactServer::start(img.clone());
        let fx = Fixture::new(16 << 20);
        let mut sfdisk = Command::new("sfdisk")
            .args(["--quiet", "--no-reread"])
            .arg(&fx.slot)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("run sfdisk");
        sfdisk
            .stdin
            .take()
            .unwrap()
            .write_all(b"label: dos\nstart=2048, type=83\n")
            .unwrap();
        assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
        let disk = Loop::attach_partitioned(&fx.slot);
        // The partition's device node, made from sysfs (no udev needed).
        let name = disk.dev.file_name().unwrap().to_string_lossy().to_string();
        let sys_dev = PathBuf::from(format!("/sys/class/block/{name}p1/dev"));
        // Some kernels only scan on request (it fails harmlessly if the scan already ran).
        let _ = Command::new("partx").arg("-a").arg(&disk.dev).output();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !sys_dev.exists() {
            assert!(
                Instant::now() < deadline,
                "{} did not appear",
                sys_dev.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let numbers = std::fs::read_to_string(&sys_dev).unwrap();
        let (major, minor) = numbers.trim().split_once(':').unwrap();
        let part = fx.dir.path().join("part1");
        run_tool(Command::new("mknod").arg(&part).args(["b", major, minor]));
        let mnt = tempfile::tempdir().unwrap();
        let mounted = Mounted::ext4(&part, mnt.path());
        let mut req = fx.request(&server.url, &img);
        req.slot_path = disk.dev.clone();
        let err = run(&req, &real_mounts()).await.0.unwrap_err();
        assert!(
            matches!(&err, InstallError::SlotInUse { reason, .. } if reason.contains("partition of it")),
            "{err}"
        );
        drop(mounted);
        drop(disk);
        assert!(server.requests().is_empty());
    }
}

/// A genuine signed bundle of `image` for compatible `acme-gw`, and the policy that trusts it.
fn signed_bundle(image: &[u8]) -> (Vec<u8>, BundlePolicy, tempfile::TempDir) {
    let (bundle, policy, dir, _) = signed_bundle_and_key(image);
    (bundle, policy, dir)
}

/// [`signed_bundle`], and the key that signed it.
fn signed_bundle_and_key(
    image: &[u8],
) -> (
    Vec<u8>,
    BundlePolicy,
    tempfile::TempDir,
    ddi_bundle::SecretKey,
) {
    let dir = tempfile::tempdir().unwrap();
    let key = ddi_bundle::generate_keypair().unwrap();
    std::fs::write(dir.path().join("vendor.pub"), key.public_key().to_text()).unwrap();
    let bundle = bundle_signed_by(image, &key, dir.path());
    let policy = BundlePolicy {
        trusted_keys: vec![dir.path().join("vendor.pub")],
        require_signature: true,
        compatible: Some("acme-gw".into()),
    };
    (bundle, policy, dir, key)
}

/// A format-1 bundle of `image` for `acme-gw`, signed by `key` (the image file in `dir`).
fn bundle_signed_by(image: &[u8], key: &ddi_bundle::SecretKey, dir: &Path) -> Vec<u8> {
    let path = dir.join("rootfs.img");
    std::fs::write(&path, image).unwrap();
    let mut bundle = Vec::new();
    ddi_bundle::create_bundle(
        &path,
        &ddi_bundle::CreateOptions {
            compatible: "acme-gw".into(),
            version: "2".into(),
            image_name: None,
            compression: None,
            keys: std::slice::from_ref(key),
        },
        &mut bundle,
    )
    .unwrap();
    bundle
}

/// Offset of the image member's data in a bundle: after the manifest and signature members
/// (each a header and padded data) and the image's own header.
fn bundle_image_offset(bundle: &[u8]) -> usize {
    let mut at = 0;
    for _ in 0..2 {
        let header = tar::Header::from_byte_slice(&bundle[at..at + 512]);
        let size = header.size().unwrap() as usize;
        at += 512 + size.div_ceil(512) * 512;
    }
    at + 512
}

#[test]
fn a_signed_image_swapped_for_another_format_is_refused() {
    let signed = image(64 * 1024, 31);
    let (bundle, policy, _keys) = signed_bundle(&signed);
    let (ok, slot) = run_pipeline_with_policy(&bundle, &[4096], 256 * 1024, Some(policy.clone()));
    assert_eq!(ok.unwrap().bytes_written, signed.len() as u64);
    assert_eq!(&slot[..signed.len()], &signed[..]);

    // The image member keeps its signed size; its bytes are another image in another format,
    // zero-padded. Only the signed hash can tell: the decoders stop at their own end.
    let other = image(16 * 1024, 32);
    let start = bundle_image_offset(&bundle);
    for (name, replacement) in [
        ("tar", tar_of(&[("rootfs.img", &other)])),
        ("gzip", gzip(&other)),
        ("tar.gz", gzip(&tar_of(&[("rootfs.img", &other)]))),
        ("zstd", zstd(&other)),
        ("xz", xz(&other)),
    ] {
        assert!(
            replacement.len() <= signed.len(),
            "{name}: replacement too large"
        );
        let mut tampered = bundle.clone();
        let member = &mut tampered[start..start + signed.len()];
        member.fill(0);
        member[..replacement.len()].copy_from_slice(&replacement);
        let (result, _) =
            run_pipeline_with_policy(&tampered, &[4096], 256 * 1024, Some(policy.clone()));
        let err = result.expect_err(name);
        assert!(matches!(err, InstallError::Signature(_)), "{name}: {err}");
        assert!(err.to_string().contains("sha256"), "{name}: {err}");
    }
}

#[test]
fn signed_zstd_and_xz_images_are_decoded_inside_bundles() {
    let img = image(200 * 1024, 42);
    for artifact in [zstd(&img), xz(&img)] {
        let (bundle, policy, _keys) = signed_bundle(&artifact);
        let (result, slot) = run_pipeline_with_policy(&bundle, &[4096], 256 * 1024, Some(policy));
        assert_eq!(result.unwrap().bytes_written, img.len() as u64);
        assert_eq!(&slot[..img.len()], &img[..]);
    }
}

/// A genuine signed chunked (format 3) bundle of `image` with 4 KiB average chunks.
fn chunked_bundle(image: &[u8]) -> (Vec<u8>, BundlePolicy, tempfile::TempDir) {
    chunked_bundle_as(image, ddi_bundle::FORMAT_CHUNKED_CONTEXT)
}

/// [`chunked_bundle`] of format 2 or 3.
fn chunked_bundle_as(image: &[u8], format: u32) -> (Vec<u8>, BundlePolicy, tempfile::TempDir) {
    let (_, policy, dir) = signed_bundle(b"unused");
    let key = ddi_bundle::generate_keypair().unwrap();
    std::fs::write(dir.path().join("vendor.pub"), key.public_key().to_text()).unwrap();
    let bundle = chunked_bundle_for("acme-gw", image, "3", format, &key, dir.path());
    (bundle, policy, dir)
}

/// A chunked bundle of `image` for the board `compatible` at `version` in `format`, signed by
/// `key` (the image file in `dir`).
fn chunked_bundle_for(
    compatible: &str,
    image: &[u8],
    version: &str,
    format: u32,
    key: &ddi_bundle::SecretKey,
    dir: &Path,
) -> Vec<u8> {
    let path = dir.join("rootfs.ext4");
    std::fs::write(&path, image).unwrap();
    let mut bundle = Vec::new();
    ddi_bundle::create_chunked_bundle(
        &path,
        &ddi_bundle::CreateOptions {
            compatible: compatible.into(),
            version: version.into(),
            image_name: None,
            compression: None,
            keys: std::slice::from_ref(key),
        },
        &ddi_bundle::ChunkedOptions {
            chunker: ddi_bundle::ChunkerParams::with_average(4096),
            zstd_level: 3,
            format,
            history: 16 << 10,
        },
        &mut bundle,
    )
    .unwrap();
    bundle
}

/// Half random, half zeros: chunks of both kinds.
fn chunky_image(len: usize, seed: u32) -> Vec<u8> {
    let mut img = image(len / 2, seed);
    img.resize(len, 0);
    img
}

#[test]
fn a_chunked_bundle_installs_chunk_by_chunk() {
    let img = chunky_image(300_000, 50);
    for format in [
        ddi_bundle::FORMAT_CHUNKED_CONTEXT,
        ddi_bundle::FORMAT_CHUNKED,
    ] {
        let (bundle, policy, _keys) = chunked_bundle_as(&img, format);
        install_in_pieces(&bundle, &policy, &img);
    }
}

/// The pipeline writes `img` from `bundle` whatever the sizes of the pieces that arrive.
fn install_in_pieces(bundle: &[u8], policy: &BundlePolicy, img: &[u8]) {
    for sizes in [&[4096usize][..], &[1, 7000, 65536]] {
        let (result, slot) =
            run_pipeline_with_policy(bundle, sizes, 512 * 1024, Some(policy.clone()));
        let installed = result.unwrap();
        assert_eq!(installed.bytes_written, img.len() as u64);
        assert_eq!(installed.sha256_of_slot_image, sha256_hex(img));
        assert_eq!(&slot[..img.len()], img);
    }
}

#[test]
fn a_tampered_chunk_is_refused_before_it_is_written() {
    let img = chunky_image(300_000, 51);
    let (bundle, policy, _keys) = chunked_bundle(&img);
    let read = ddi_bundle::read_unverified(bundle.as_slice()).unwrap();
    let index = read.index.unwrap();
    let victim = index.chunks[3];
    let mut tampered = bundle.clone();
    tampered[(read.data_offset + victim.offset + 20) as usize] ^= 0x01;
    // The artifact hash the server gives is the tampered artifact's: only the chunk's signed
    // sha256 can tell.
    let (result, _) = run_pipeline_with_policy(&tampered, &[4096], 512 * 1024, Some(policy));
    let err = result.unwrap_err();
    assert!(matches!(err, InstallError::Signature(_)), "{err}");
    // Refused by the chunk's own check (which runs before the chunk is written), not only by
    // the member's hash at the end.
    assert!(err.to_string().contains("chunk 3 "), "{err}");
}

/// A seed chunk that no longer matches when it is used (the running slot changed after the
/// scan) is downloaded with one Range request, and the image is still the signed one.
#[tokio::test]
async fn a_seed_chunk_that_changed_after_the_scan_is_downloaded() {
    seed_changed_after_the_scan(&[0], false).await;
}

/// The same when the server answers that Range with the whole artifact (200, e.g. a proxy
/// that drops Range headers after a while): the chunks come from their place in the body.
#[tokio::test]
async fn a_seed_chunk_fetched_from_a_server_that_ignores_range_installs() {
    seed_changed_after_the_scan(&[0, 2], true).await;
}

/// A server that stops honouring Range after the probe: each planned range answered with the
/// whole artifact would be read from byte 0. At most one artifact's worth of bytes is thrown
/// away; then the attempt fails as retryable, and the next one downloads the bundle once.
#[tokio::test]
async fn ranges_answered_with_the_whole_artifact_are_not_read_from_the_start_each_time() {
    let old = image(2 << 20, 90);
    let mut new = old.clone();
    for at in (0..new.len()).step_by(64 << 10) {
        new[at + 100] ^= 0xff;
    }
    let (bundle, policy, _keys) = chunked_bundle(&new);
    let server = ArtifactServer::start(bundle.clone());
    server.sim.add_fault(
        Fault::new(FaultKind::IgnoreRange)
            .on(Endpoint::Download)
            .after(2),
    );
    let fx = Fixture::new(4 << 20);
    let mut booted = old.clone();
    booted.resize(4 << 20, 0);
    std::fs::write(&fx.booted, &booted).unwrap();
    let mut req = fx.request(&server.url, &bundle);
    req.bundle = Some(policy);
    let first = run(&req, &fast_options()).await.0;
    let read_for_200 = |server: &ArtifactServer| -> u64 {
        let mut total = 0;
        for r in server.sim.requests().iter() {
            if r.endpoint != Endpoint::Download || r.status != Some(200) {
                continue;
            }
            let end = r
                .header("range")
                .and_then(|v| v.strip_prefix("bytes="))
                .and_then(|v| v.split_once('-'))
                .and_then(|(_, e)| e.parse::<u64>().ok());
            total += end.map_or(bundle.len() as u64, |e| e + 1);
        }
        total
    };
    let after_first = read_for_200(&server);
    assert!(
        after_first <= 2 * bundle.len() as u64,
        "{after_first} bytes read for a {}-byte artifact",
        bundle.len()
    );
    if let Err(e) = first {
        assert!(e.is_retryable(), "{e}");
        assert!(e.to_string().contains("whole artifact"), "{e}");
        run(&req, &fast_options()).await.0.unwrap();
    }
    assert!(read_for_200(&server) <= 3 * bundle.len() as u64);
    let slot = std::fs::read(&fx.slot).unwrap();
    assert_eq!(&slot[..new.len()], new.as_slice());
}

/// Chunks 0 and 2 changed, chunk 1 still good: the one download covers 0..=2, chunk 1 comes
/// from the seed, and chunk 2's frame is taken from its own place in the downloaded bytes.
#[tokio::test]
async fn seed_chunks_changed_around_a_good_one_are_taken_from_the_right_place() {
    seed_changed_after_the_scan(&[0, 2], false).await;
}

/// Installs a delta whose seed chunks `changed` no longer match after the scan; asserts the
/// signed image lands and one Range request fetched the replacements (answered with the whole
/// artifact when `range_ignored`).
/// A delta job from byte 0 of the artifact `spec` names (also for its side fetches).
fn delta_job(
    signed: delta::SignedBundle,
    ranges: Vec<ddi_bundle::FetchRange>,
    spec: source::SourceSpec,
    resume_path: PathBuf,
) -> delta::DeltaJob {
    delta::DeltaJob {
        signed: Arc::new(signed),
        ranges,
        resume_at: 0,
        checkpoint_interval: slot::CHECKPOINT_INTERVAL,
        url: spec.url.clone(),
        resume_path,
        expected_hash: String::new(),
        artifact_size: spec.size,
        side: delta::SideFetch {
            runtime: tokio::runtime::Handle::current(),
            client: reqwest::Client::new(),
            spec,
        },
    }
}

async fn seed_changed_after_the_scan(changed_chunks: &[usize], range_ignored: bool) {
    let old = chunky_image(300_000, 60);
    let mut new = old.clone();
    for b in &mut new[100_000..100_100] {
        *b ^= 0x33;
    }
    let (bundle, _policy, _keys) = chunked_bundle(&new);
    let read = ddi_bundle::read_unverified(bundle.as_slice()).unwrap();
    let index = read.index.unwrap();
    let base = read.data_offset;
    let server = ArtifactServer::start(bundle.clone());
    if range_ignored {
        server.always(FaultKind::IgnoreRange);
    }
    let dir = tempfile::tempdir().unwrap();
    let (seed_path, slot_path) = (dir.path().join("slot-a"), dir.path().join("slot-b"));
    std::fs::write(&seed_path, &old).unwrap();
    std::fs::write(&slot_path, vec![0u8; 400_000]).unwrap();
    let params = ddi_bundle::ChunkerParams::with_average(4096);
    let seed = delta::SeedSlot::scan(&seed_path, params, &index, u64::MAX).unwrap();
    let plan = delta::plan(&index, Some(&seed), 0);
    let last_changed = *changed_chunks.iter().max().unwrap();
    assert!(!plan.needed[..=last_changed].iter().any(|n| *n) && plan.needed.iter().any(|n| *n));
    // The running slot changes after the scan: these chunks, planned from the seed, are gone.
    let mut changed = old.clone();
    for &c in changed_chunks {
        let raw_offset: usize = index.chunks[..c].iter().map(|e| e.raw_len as usize).sum();
        changed[raw_offset + 10] ^= 1;
    }
    std::fs::write(&seed_path, &changed).unwrap();

    let (tx, rx) = pipeline::channel(1024, 4 << 20);
    for r in &plan.ranges {
        let bytes = &bundle[(base + r.start) as usize..(base + r.end) as usize];
        assert!(tx.send_data(bytes::Bytes::copy_from_slice(bytes)).await);
    }
    tx.send_end().await;
    let spec = source::SourceSpec {
        url: server.url.clone(),
        auth_header: Some(("Authorization".into(), format!("TargetToken {TOKEN}"))),
        size: Some(bundle.len() as u64),
        max_rate: None,
        retry: RetryPolicy::default(),
        stall_timeout: Duration::from_secs(10),
        requests: source::RequestBudget::default(),
    };
    let signed = delta::SignedBundle {
        image_size: index.raw_size(),
        index,
        params,
        image_sha256: sha256_hex(&new),
        history: read.manifest.chunked.as_ref().unwrap().history.unwrap_or(0),
        data_offset: base,
        probe_bytes: 0,
    };
    let first_planned = plan.ranges[0].first;
    let job = delta_job(
        signed,
        plan.ranges,
        spec,
        dir.path().join("download.resume"),
    );
    let mountinfo = dir.path().join("no-mountinfo");
    let written_to = slot_path.clone();
    let installed = tokio::task::spawn_blocking(move || {
        let mut slot = slot::open(&written_to, None, &mountinfo).unwrap();
        let counters = pipeline::Counters::new(0, None);
        delta::write_delta(&job, &mut slot, rx, &counters, Some(&seed))
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(installed.sha256_of_slot_image, sha256_hex(&new));
    assert_eq!(&std::fs::read(&slot_path).unwrap()[..new.len()], &new[..]);
    // One request: chunk 0 and the seed chunks after it, up to the first planned range.
    let requests = server.requests();
    assert_eq!(requests.len(), 1, "{requests:?}");
    assert_eq!(requests[0].0, Some(base));
    assert!(first_planned > 0);
    let answered = server.sim.download_log()[0].status;
    assert_eq!(answered, if range_ignored { 200 } else { 206 });
}

/// A sink that keeps nothing (as the dry run's): nothing is read back.
struct KeepsNothing(u64);

impl slot::SlotDevice for KeepsNothing {
    fn path(&self) -> &Path {
        Path::new("dry-run")
    }
    fn capacity(&self) -> u64 {
        self.0
    }
    fn write_all_at(&mut self, _: u64, _: &[u8]) -> std::io::Result<()> {
        Ok(())
    }
    fn read_at(&mut self, _: u64, _: &mut [u8]) -> std::io::Result<usize> {
        unreachable!("nothing is read back from a sink that keeps nothing")
    }
    fn sync_range(&mut self, _: u64, _: u64, _: bool) -> std::io::Result<()> {
        Ok(())
    }
    fn sync_data(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn keeps_data(&self) -> bool {
        false
    }
}

/// The image of a chunked bundle is the signed hash's only through the read-back (the slot
/// writer does not hash it again): a device that returns other bytes fails the install with
/// the read-back mismatch, the signed hash as what was written.
#[test]
fn a_chunked_image_read_back_wrong_is_refused() {
    let img = chunky_image(300_000, 52);
    let (bundle, policy, _keys) = chunked_bundle(&img);
    let mut dev = FlippingSlot(FailingSlot {
        data: vec![FILL; 512 << 10],
        fail_from: u64::MAX,
    });
    let err = run_whole(&bundle, Some(policy), &mut dev).unwrap_err();
    let mut bad = img.clone();
    bad[100] ^= 1;
    match err {
        InstallError::ReadBackMismatch { written, read, .. } => {
            assert_eq!(written, sha256_hex(&img));
            assert_eq!(read, sha256_hex(&bad));
        }
        other => panic!("unexpected {other}"),
    }
    // The slot itself holds the image: only the read-back was wrong.
    assert_eq!(&dev.0.data[..img.len()], &img[..]);
}

/// A dry run of a chunked bundle reads nothing back, so there the writer still hashes the
/// chunks and reports the sha256 the slot would hold.
#[test]
fn a_dry_run_of_a_chunked_bundle_still_hashes_the_image() {
    let img = chunky_image(300_000, 53);
    let (bundle, policy, _keys) = chunked_bundle(&img);
    let installed =
        run_whole(&bundle, Some(policy), &mut KeepsNothing(512 << 10)).expect("the dry run");
    assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img));
}

/// [`delta::write_delta`] of `bundle` (a chunked bundle of `img`) without a seed, every chunk
/// downloaded, onto `dev`, with `signed_sha256` as the signed image hash.
async fn delta_without_seed<D: slot::SlotDevice + 'static>(
    bundle: &[u8],
    signed_sha256: String,
    mut dev: D,
) -> (Result<Installed, InstallError>, D) {
    let read = ddi_bundle::read_unverified(bundle).unwrap();
    let index = read.index.unwrap();
    let base = read.data_offset;
    let plan = delta::plan(&index, None, 0);
    let (tx, rx) = pipeline::channel(1024, 4 << 20);
    for r in &plan.ranges {
        let bytes = &bundle[(base + r.start) as usize..(base + r.end) as usize];
        assert!(tx.send_data(bytes::Bytes::copy_from_slice(bytes)).await);
    }
    tx.send_end().await;
    let dir = tempfile::tempdir().unwrap();
    let signed = delta::SignedBundle {
        image_size: index.raw_size(),
        index,
        params: ddi_bundle::ChunkerParams::with_average(4096),
        image_sha256: signed_sha256,
        history: read.manifest.chunked.as_ref().unwrap().history.unwrap_or(0),
        data_offset: base,
        probe_bytes: 0,
    };
    let spec = source::SourceSpec {
        url: "http://127.0.0.1:9/unused".into(),
        auth_header: None,
        size: Some(bundle.len() as u64),
        max_rate: None,
        retry: RetryPolicy::default(),
        stall_timeout: Duration::from_secs(10),
        requests: source::RequestBudget::default(),
    };
    let job = delta_job(
        signed,
        plan.ranges,
        spec,
        dir.path().join("download.resume"),
    );
    tokio::task::spawn_blocking(move || {
        let counters = pipeline::Counters::new(0, None);
        let result = delta::write_delta(&job, &mut dev, rx, &counters, None);
        (result, dev)
    })
    .await
    .unwrap()
}

/// The delta path compares the read-back with the signed image hash too: a device that returns
/// other bytes, and chunks that are each the signed ones but do not make the signed image (a
/// signer's bug: both are under one signature), fail the install; a dry run (nothing read
/// back) still catches the latter through the writer's own hash.
#[tokio::test]
async fn a_delta_install_checks_the_read_back_against_the_signed_image_hash() {
    let img = chunky_image(300_000, 54);
    let (bundle, _policy, _keys) = chunked_bundle(&img);
    let slot = || FailingSlot {
        data: vec![FILL; 512 << 10],
        fail_from: u64::MAX,
    };

    let (result, dev) = delta_without_seed(&bundle, sha256_hex(&img), slot()).await;
    assert_eq!(result.unwrap().sha256_of_slot_image, sha256_hex(&img));
    assert_eq!(&dev.data[..img.len()], &img[..]);
    // A manifest may give the hash in capitals (any 64 hex digits): the same image.
    let upper = sha256_hex(&img).to_ascii_uppercase();
    let (result, _) = delta_without_seed(&bundle, upper, slot()).await;
    assert_eq!(result.unwrap().sha256_of_slot_image, sha256_hex(&img));

    let (result, _) = delta_without_seed(&bundle, sha256_hex(&img), FlippingSlot(slot())).await;
    let mut bad = img.clone();
    bad[100] ^= 1;
    match result.unwrap_err() {
        InstallError::ReadBackMismatch { written, read, .. } => {
            assert_eq!(written, sha256_hex(&img));
            assert_eq!(read, sha256_hex(&bad));
        }
        other => panic!("unexpected {other}"),
    }

    let claimed = sha256_hex(b"not this image");
    let (result, _) = delta_without_seed(&bundle, claimed.clone(), slot()).await;
    match result.unwrap_err() {
        InstallError::ReadBackMismatch { written, read, .. } => {
            assert_eq!(written, claimed);
            assert_eq!(read, sha256_hex(&img));
        }
        other => panic!("unexpected {other}"),
    }

    let (result, _) = delta_without_seed(&bundle, claimed, KeepsNothing(512 << 10)).await;
    let err = result.unwrap_err();
    assert!(
        matches!(&err, InstallError::Signature(m) if m.contains("signed manifest says")),
        "{err}"
    );
}

/// Installs `deployed` (version "2") as the server announces it, under `policy`, while the
/// download host serves `served` zero-padded to its size: the result, the slot's bytes and the
/// server.
async fn install_served_in_place_of(
    deployed: &[u8],
    mut served: Vec<u8>,
    policy: BundlePolicy,
) -> (Result<Installed, InstallError>, Vec<u8>, ArtifactServer) {
    assert!(served.len() < deployed.len());
    served.resize(deployed.len(), 0);
    let server = ArtifactServer::start(served);
    let fx = Fixture::new(512 << 10);
    let mut req = fx.request(&server.url, deployed);
    assert_eq!(req.version, "2");
    req.bundle = Some(policy);
    let result = run(&req, &fast_options()).await.0;
    (result, fx.slot_bytes(), server)
}

/// hawkBit announces the new release's bundle (its sha256, size and version); the download host
/// serves an older release's chunked bundle, signed by the same trusted key, padded to the
/// announced size. A delta install would never see the whole artifact, so its hash cannot
/// refuse it: the signed version, not the announced one, sends it the full-download way, where
/// the artifact's hash does. Else a host that serves artifacts (a CDN) could roll a fleet back
/// to any older signed release.
#[tokio::test]
async fn a_delta_install_refuses_a_signed_bundle_that_is_not_the_announced_artifact() {
    const FORMAT_3: u32 = ddi_bundle::FORMAT_CHUNKED_CONTEXT;
    let (_, policy, keys, key) = signed_bundle_and_key(b"unused");
    let old_img = chunky_image(200_000, 70);
    let new_img = chunky_image(300_000, 71);
    let old = chunked_bundle_for("acme-gw", &old_img, "1", FORMAT_3, &key, keys.path());
    let new = chunked_bundle_for("acme-gw", &new_img, "2", FORMAT_3, &key, keys.path());
    let (result, slot, server) = install_served_in_place_of(&new, old, policy).await;
    assert!(
        matches!(result, Err(InstallError::HashMismatch { .. })),
        "installed a bundle other than the announced one: {result:?}; the slot holds the old \
         image: {}",
        slot[..old_img.len()] == old_img[..]
    );
    // Past the 64 KiB head probe, one request for the whole artifact: no delta was tried.
    let requests = server.requests();
    assert_eq!(requests.last().unwrap().0, None, "{requests:?}");
}

/// One vendor key signs a release for two boards under the same version ("2"); the device sets
/// no `compatible`. The download host serves the other board's bundle (padded to the announced
/// size) in place of the deployed one: a full download refuses it (the artifact's hash), and
/// so must a delta install, or the signed version binds the release but not the board.
#[tokio::test]
async fn a_delta_install_refuses_another_boards_bundle_of_the_same_version() {
    const FORMAT_3: u32 = ddi_bundle::FORMAT_CHUNKED_CONTEXT;
    let (_, mut policy, keys, key) = signed_bundle_and_key(b"unused");
    policy.compatible = None;
    let ours = chunky_image(300_000, 73);
    let theirs = chunky_image(240_000, 74);
    let deployed = chunked_bundle_for("acme-gw", &ours, "2", FORMAT_3, &key, keys.path());
    let served = chunked_bundle_for("other-board", &theirs, "2", FORMAT_3, &key, keys.path());
    let (result, slot, _) = install_served_in_place_of(&deployed, served, policy).await;
    assert!(
        matches!(result, Err(InstallError::HashMismatch { .. })),
        "installed another board's bundle: {result:?}; the slot holds it: {}",
        slot[..theirs.len()] == theirs[..]
    );
}

/// A genuine chunked bundle deployed under another version than the one it was signed with
/// (the software module named differently): installed as a full download, checked against the
/// artifact's hash, never as a delta.
#[tokio::test]
async fn a_chunked_bundle_of_another_version_than_announced_installs_by_full_download() {
    let img = chunky_image(300_000, 72);
    let (bundle, policy, _keys) = chunked_bundle(&img);
    let server = ArtifactServer::start(bundle.clone());
    let fx = Fixture::new(512 << 10);
    for announced in ["3.0", ""] {
        let mut req = fx.request(&server.url, &bundle);
        req.version = announced.into();
        req.bundle = Some(policy.clone());
        let (result, progress) = run(&req, &fast_options()).await;
        result.unwrap();
        assert_eq!(&fx.slot_bytes()[..img.len()], &img[..]);
        assert!(
            !progress.iter().any(|p| matches!(p, Progress::Delta(_))),
            "a delta install under version {announced:?}: {progress:?}"
        );
    }
    let whole = server.requests().iter().filter(|r| r.0.is_none()).count();
    assert_eq!(whole, 2, "{:?}", server.requests());
}

/// A hostile server's manifest that claims a huge chunk index (not signed as such): the probe
/// verifies the manifest before it believes the index size, so it fetches the two metadata
/// members at most and falls back to a full download.
#[tokio::test]
async fn an_unsigned_index_size_never_decides_what_the_probe_fetches() {
    let (genuine, policy, _keys) = chunked_bundle(&chunky_image(100_000, 61));
    let mut members = tar::Archive::new(genuine.as_slice());
    let mut manifest = String::new();
    let mut signature = Vec::new();
    for member in members.entries().unwrap() {
        let mut member = member.unwrap();
        let name = member.path().unwrap().to_string_lossy().into_owned();
        if name == ddi_bundle::MANIFEST_NAME {
            member.read_to_string(&mut manifest).unwrap();
        } else if name == ddi_bundle::SIGNATURE_NAME {
            member.read_to_end(&mut signature).unwrap();
        }
    }
    let mut json: serde_json::Value = serde_json::from_str(&manifest).unwrap();
    let records = (30u64 << 20) / ddi_bundle::chunked::RECORD_LEN as u64;
    json["chunked"]["chunks"] = serde_json::json!(records);
    json["chunked"]["index_size"] =
        serde_json::json!(records * ddi_bundle::chunked::RECORD_LEN as u64);
    let mut hostile = tar::Builder::new(Vec::new());
    for (name, bytes) in [
        (
            ddi_bundle::MANIFEST_NAME,
            serde_json::to_vec(&json).unwrap(),
        ),
        (ddi_bundle::SIGNATURE_NAME, signature),
        ("rootfs.ext4.idx", vec![0u8; 8 << 20]),
    ] {
        let mut header = tar::Header::new_ustar();
        header.set_size(bytes.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        hostile
            .append_data(&mut header, name, bytes.as_slice())
            .unwrap();
    }
    let hostile = hostile.into_inner().unwrap();
    let server = ArtifactServer::start(hostile.clone());
    let spec = source::SourceSpec {
        url: server.url.clone(),
        auth_header: Some(("Authorization".into(), format!("TargetToken {TOKEN}"))),
        size: Some(hostile.len() as u64),
        max_rate: None,
        retry: RetryPolicy::default(),
        stall_timeout: Duration::from_secs(10),
        requests: source::RequestBudget::default(),
    };
    let probe = delta::probe(&reqwest::Client::new(), &spec, &policy, 64 << 20, "3").await;
    assert!(matches!(probe, delta::Probe::Full(_)), "{probe:?}");
    let fetched: u64 = server
        .sim
        .download_log()
        .iter()
        .map(|r| r.body_len.unwrap_or(u64::MAX))
        .sum();
    assert!(
        fetched <= 2 * (512 + ddi_bundle::MAX_METADATA_SIZE),
        "the probe fetched {fetched} bytes before the signature was checked"
    );
}

/// xz at preset 1 in blocks of `block` bytes of `data`, with `check`.
fn xz_blocks(data: &[u8], block: u64, check: lzma_rust2::CheckType) -> Vec<u8> {
    use std::io::Write;
    let mut options = lzma_rust2::XzOptions::with_preset(1);
    options.block_size = std::num::NonZeroU64::new(block);
    options.check_type = check;
    let mut w = lzma_rust2::XzWriter::new(Vec::new(), options).unwrap();
    w.write_all(data).unwrap();
    w.finish().unwrap()
}

/// An 8 MiB image in xz blocks of 512 KiB, interrupted: see [`interrupted_decoder_install`].
async fn interrupted_xz_image(fx: &Fixture) -> (Vec<u8>, Vec<u8>, resume::ResumeRecord) {
    let img = gunzip::tests::image(8 << 20, 25);
    let xz = xz_blocks(&img, 512 << 10, lzma_rust2::CheckType::Crc64);
    let record = interrupted_decoder_install(fx, &img, &xz, "xz").await;
    assert!(record.xz_state.is_some(), "{record:?}");
    (img, xz, record)
}

#[tokio::test]
async fn restart_resumes_xz_image_from_a_block_boundary() {
    let img = gunzip::tests::image(8 << 20, 25);
    // Blocks of one stream; and two streams (the point in the second one, whose blocks the
    // index checks from its own start) with stream padding between them.
    let two_streams = {
        let mut two = xz_blocks(&img[..3 << 20], 1 << 20, lzma_rust2::CheckType::Crc32);
        two.extend_from_slice(&[0u8; 4]);
        two.extend(xz_blocks(
            &img[3 << 20..],
            1 << 20,
            lzma_rust2::CheckType::Sha256,
        ));
        two
    };
    for (what, xz) in [
        (
            "blocks",
            xz_blocks(&img, 512 << 10, lzma_rust2::CheckType::Crc64),
        ),
        ("streams", two_streams),
    ] {
        let fx = Fixture::new(9 << 20);
        let record = interrupted_decoder_install(&fx, &img, &xz, "xz").await;
        resumes_from_the_record(&fx, &img, &xz, &record, what).await;
    }
}

#[tokio::test]
async fn xz_resume_over_a_changed_slot_starts_over() {
    let fx = Fixture::new(9 << 20);
    let (img, xz, record) = interrupted_xz_image(&fx).await;
    starts_over_after_a_changed_byte(&fx, &img, &xz, &record, record.slot_offset - 10).await;
}

#[tokio::test]
async fn a_tampered_xz_record_never_gives_a_wrong_image() {
    let fx = Fixture::new(9 << 20);
    let (img, xz, record) = interrupted_xz_image(&fx).await;
    let mut other_hash = sha256_state::Sha256State::new();
    other_hash.update(&vec![1u8; record.artifact_offset as usize]);
    // A point inside a block (512 KiB blocks of LZMA2 chunks, a CRC64 check).
    let (state, in_block) = unxz::state_from_text(record.xz_state.as_deref().unwrap()).unwrap();
    let in_block = in_block.expect("a point inside a block");
    let with = |change: &dyn Fn(&mut unxz::XzState)| {
        let mut state = state;
        change(&mut state);
        Some(unxz::state_text(&state, Some(&in_block)))
    };
    let inside = |change: &dyn Fn(&mut unxz::InBlock)| {
        let mut b = (*in_block).clone();
        change(&mut b);
        Some(unxz::state_text(&state, Some(&b)))
    };
    let mut tampered: Vec<(&str, resume::ResumeRecord)> = vec![
        (
            "one block fewer before the point",
            resume::ResumeRecord {
                xz_state: with(&|s| s.blocks -= 1),
                ..record.clone()
            },
        ),
        (
            "the stream's output moved",
            resume::ResumeRecord {
                xz_state: with(&|s| s.stream_out += 4),
                ..record.clone()
            },
        ),
        (
            "another check type",
            resume::ResumeRecord {
                xz_state: with(&|s| s.check = 1),
                ..record.clone()
            },
        ),
        (
            "xz state garbage",
            resume::ResumeRecord {
                xz_state: Some("not a state".into()),
                ..record.clone()
            },
        ),
        (
            "the block's check so far",
            resume::ResumeRecord {
                xz_state: inside(&|b| {
                    if let unxz::Check::Crc64(crc) = &mut b.check {
                        *crc ^= 1 << 40;
                    }
                }),
                ..record.clone()
            },
        ),
        (
            "the block's start",
            resume::ResumeRecord {
                xz_state: inside(&|b| b.block_out += 4),
                ..record.clone()
            },
        ),
        (
            "as the previous agent reads it: the block boundary state alone",
            resume::ResumeRecord {
                xz_state: Some(state.to_text()),
                ..record.clone()
            },
        ),
        (
            "no xz state",
            resume::ResumeRecord {
                xz_state: None,
                ..record.clone()
            },
        ),
        (
            "zstd format",
            resume::ResumeRecord {
                format: "zstd".into(),
                zstd_state: Some("between".into()),
                ..record.clone()
            },
        ),
    ];
    // The point moved in the image together with its stream (both output offsets), with the
    // sha256 of what the slot holds before it then: the index's sums still fit.
    let moved = 4096;
    let mut prefix = img[..record.slot_offset as usize].to_vec();
    prefix.resize((record.slot_offset + moved) as usize, FILL);
    tampered.push((
        "the point moved in the image with its stream",
        resume::ResumeRecord {
            slot_offset: record.slot_offset + moved,
            slot_sha256: Some(sha256_hex(&prefix)),
            xz_state: with(&|s| s.stream_out += moved),
            ..record.clone()
        },
    ));
    tampered.extend(moved_offsets_and_hashes(&record, &other_hash, 4));
    install_over_tampered_records(&fx, &img, &xz, &record, tampered).await;
    // The LZMA state: a change the rest of the block never reads back decodes the same image;
    // any other fails the block's check (or a distance, a chunk's end) and starts over. The
    // image is the right one either way.
    let lzma_state: Vec<(&str, resume::ResumeRecord)> = vec![
        (
            "a probability of the LZMA state",
            resume::ResumeRecord {
                // "Is a match" after a literal at position 0 mod 4: the next symbol's.
                xz_state: inside(&|b| b.lzma.probs[0] ^= 0x10),
                ..record.clone()
            },
        ),
        (
            "a repeated distance",
            resume::ResumeRecord {
                xz_state: inside(&|b| b.lzma.reps[0] ^= 1),
                ..record.clone()
            },
        ),
        (
            "the LZMA state machine's state",
            resume::ResumeRecord {
                xz_state: inside(&|b| b.lzma.state = (b.lzma.state + 3) % 12),
                ..record.clone()
            },
        ),
    ];
    let mut started_over = 0;
    for (what, bad) in lzma_state {
        std::fs::write(&fx.slot, vec![FILL; fx.capacity]).unwrap();
        let requests = install_over_record(&fx, &img, &xz, &record, &bad, what).await;
        started_over += usize::from(requests.iter().any(|r| r.0.is_none()));
    }
    assert!(started_over >= 1, "no change to the LZMA state was noticed");
}

#[tokio::test]
async fn xz_images_without_resume_points_restart_from_zero() {
    let img = gunzip::tests::image(8 << 20, 26);
    let fx = Fixture::new(9 << 20);
    // One block without a check (`xz -C none`): no point after its start, where a wrong
    // state could write a wrong image unnoticed (in a tar too).
    let none = lzma_rust2::CheckType::None;
    let one_block = xz_blocks(&img, 1 << 40, none);
    let tar_xz = xz_blocks(&tar_of(&[("rootfs.img", &img)]), 1 << 40, none);
    for (what, artifact) in [("one block", one_block), ("tar.xz", tar_xz)] {
        let err = interrupted_install(&fx, &artifact, artifact.len() * 6 / 10).await;
        assert!(err.is_retryable(), "{what}: {err}");
        assert!(
            resume::load(&fx.resume_path()).is_none(),
            "{what} left a record"
        );
        let server = ArtifactServer::start(artifact.clone());
        run(&fx.request(&server.url, &artifact), &fast_options())
            .await
            .0
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(server.requests()[0].0, None, "{what}");
        fx.assert_installed(&img);
    }
}

#[tokio::test]
async fn restart_resumes_a_single_block_xz_inside_the_block() {
    let img = gunzip::tests::image(8 << 20, 26);
    // What plain single-threaded `xz` writes: one block per stream (CRC64 by default), in
    // a tar too; the check types the point's state carries.
    for (what, artifact, format, check) in [
        ("one block", xz(&img), "xz", 4),
        ("tar.xz", xz(&tar_of(&[("rootfs.img", &img)])), "tar-xz", 4),
        (
            "crc32",
            xz_blocks(&img, 1 << 40, lzma_rust2::CheckType::Crc32),
            "xz",
            1,
        ),
        (
            "sha256",
            xz_blocks(&img, 1 << 40, lzma_rust2::CheckType::Sha256),
            "xz",
            10,
        ),
    ] {
        let fx = Fixture::new(9 << 20);
        let record = interrupted_decoder_install(&fx, &img, &artifact, format).await;
        let (state, in_block) = unxz::state_from_text(record.xz_state.as_deref().unwrap())
            .unwrap_or_else(|| panic!("{what}: {record:?}"));
        assert_eq!((state.check, state.blocks), (check, 0), "{what}");
        assert!(in_block.is_some(), "{what}: a point inside the block");
        // The previous agent reads no point there (it starts over).
        assert_eq!(
            unxz::XzState::from_text(record.xz_state.as_deref().unwrap()),
            None
        );
        resumes_from_the_record(&fx, &img, &artifact, &record, what).await;
        // Interrupted after 60 % of the artifact: the rest, and what came after the last
        // durable point, not the whole.
        let fetched = artifact.len() as u64 - record.artifact_offset;
        assert!(
            fetched * 3 < artifact.len() as u64 * 2,
            "{what}: the restart fetched {fetched} of {} bytes",
            artifact.len()
        );
    }
}

/// A tar inside gzip, zstd or xz: resume points in the image member's data, with the tar's
/// head in the record.
mod tar_inside {
    use super::*;

    /// A tar whose image member follows a directory and has a name longer than a tar header
    /// holds (a GNU long-name member before its header): a head of four blocks.
    fn tar_with_long_name(img: &[u8]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut dir = tar::Header::new_gnu();
        dir.set_entry_type(tar::EntryType::Directory);
        dir.set_size(0);
        dir.set_mode(0o755);
        dir.set_cksum();
        b.append_data(&mut dir, "images/", std::io::empty())
            .unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_size(img.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        let name = format!("images/{}/rootfs.img", "n".repeat(120));
        b.append_data(&mut h, name, img).unwrap();
        b.into_inner().unwrap()
    }

    /// A test artifact: what it is, its record format, its bytes.
    type Artifact = (&'static str, &'static str, Vec<u8>);

    /// The image, and its tar compressed each way.
    fn artifacts() -> (Vec<u8>, Vec<Artifact>) {
        let img = gunzip::tests::image(8 << 20, 27);
        let tar = tar_of(&[("rootfs.img", &img)]);
        let crc64 = lzma_rust2::CheckType::Crc64;
        let artifacts = vec![
            ("tar.gz", "tar-gzip", gunzip::tests::gzip(&tar, 6)),
            ("tar.zst", "tar-zstd", zstd(&tar)),
            ("tar.xz", "tar-xz", xz_blocks(&tar, 512 << 10, crc64)),
            (
                "tar.gz, long name",
                "tar-gzip",
                gunzip::tests::gzip(&tar_with_long_name(&img), 6),
            ),
            (
                "tar.xz, long name",
                "tar-xz",
                xz_blocks(&tar_with_long_name(&img), 512 << 10, crc64),
            ),
        ];
        (img, artifacts)
    }

    #[tokio::test]
    async fn restart_resumes_a_tar_inside_gzip_zstd_or_xz_from_a_point_in_its_image() {
        let (img, artifacts) = artifacts();
        for (what, format, artifact) in artifacts {
            let fx = Fixture::new(9 << 20);
            let record = interrupted_decoder_install(&fx, &img, &artifact, format).await;
            let head = hex::decode(record.tar_head.as_deref().unwrap()).unwrap();
            let blocks = if what.contains("long name") { 4 } else { 1 };
            assert_eq!(head.len(), blocks * 512, "{what}");
            resumes_from_the_record(&fx, &img, &artifact, &record, what).await;
        }
    }

    #[tokio::test]
    async fn a_tar_resume_over_a_changed_slot_starts_over() {
        let (img, artifacts) = artifacts();
        for (what, format, artifact) in artifacts.into_iter().take(3) {
            let fx = Fixture::new(9 << 20);
            let record = interrupted_decoder_install(&fx, &img, &artifact, format).await;
            fx.flip_slot_byte(&img, record.slot_offset - 10);
            let server = ArtifactServer::start(artifact.clone());
            run(&fx.request(&server.url, &artifact), &fast_options())
                .await
                .0
                .unwrap();
            fx.assert_installed(&img);
            // One download from byte 0 (and a fresh gzip install's 4-byte fetch of its ISIZE),
            // never the resume's Range request.
            let isize_at = artifact.len() as u64 - 4;
            let requests = server.requests();
            let ranges: Vec<_> = requests.iter().map(|r| r.0).collect();
            assert_eq!(ranges[0], None, "{what}: {requests:?}");
            assert!(
                ranges[1..].is_empty() || (ranges[1..] == [Some(isize_at)] && format == "tar-gzip"),
                "{what}: {requests:?}"
            );
        }
    }

    /// `head` with its first header's size field set to `size` (checksum made to fit).
    fn with_size(head: &[u8], size: u64) -> Vec<u8> {
        let mut head = head.to_vec();
        let mut header = tar::Header::new_old();
        header.as_mut_bytes().copy_from_slice(&head[..512]);
        header.set_size(size);
        header.set_cksum();
        head[..512].copy_from_slice(header.as_bytes());
        head
    }

    #[tokio::test]
    async fn a_tampered_tar_record_never_gives_a_wrong_image() {
        let (img, artifacts) = artifacts();
        for (what, format, artifact) in artifacts.into_iter().take(3) {
            let fx = Fixture::new(9 << 20);
            let record = interrupted_decoder_install(&fx, &img, &artifact, format).await;
            let head = hex::decode(record.tar_head.as_deref().unwrap()).unwrap();
            // The head's sha256 made to fit (else the record is only refused at once): the
            // checks after it must catch each of these.
            let with_head = |head: Vec<u8>| resume::ResumeRecord {
                tar_head_sha256: Some(sha256_hex(&head)),
                tar_head: Some(hex::encode(head)),
                ..record.clone()
            };
            let mut flipped = head.clone();
            flipped[3] ^= 0x20;
            let mut longer = head.clone();
            longer.extend_from_slice(&[0u8; 512]);
            let plain = format.strip_prefix("tar-").unwrap();
            let mut tampered: Vec<(&str, resume::ResumeRecord)> = vec![
                ("a byte of the head", with_head(flipped)),
                ("a block more in the head", with_head(longer)),
                ("a head of half a block", with_head(head[..256].to_vec())),
                (
                    "the image shorter than the point",
                    with_head(with_size(&head, 4096)),
                ),
                (
                    "the image longer",
                    with_head(with_size(&head, img.len() as u64 + 4096)),
                ),
                (
                    "no head",
                    resume::ResumeRecord {
                        tar_head: None,
                        ..record.clone()
                    },
                ),
                (
                    "head not hex",
                    resume::ResumeRecord {
                        tar_head: Some("zz".repeat(512)),
                        ..record.clone()
                    },
                ),
                (
                    "the plain format",
                    resume::ResumeRecord {
                        format: plain.into(),
                        ..record.clone()
                    },
                ),
            ];
            let mut other_hash = sha256_state::Sha256State::new();
            other_hash.update(&vec![1u8; record.artifact_offset as usize]);
            tampered.extend(moved_offsets_and_hashes(&record, &other_hash, 4));
            let names: Vec<String> = tampered
                .iter()
                .map(|(c, _)| format!("{what}: {c}"))
                .collect();
            let tampered = names
                .iter()
                .map(String::as_str)
                .zip(tampered.into_iter().map(|t| t.1));
            install_over_tampered_records(&fx, &img, &artifact, &record, tampered.collect()).await;
        }
    }

    /// The image member ends at an xz block boundary and another member follows it (the image
    /// named): the slot is durable up to the image's end once its last buffer is written, so an
    /// install interrupted in the member after it keeps the point at the image's end (as
    /// `extract_points` means to), and a restart continues there, writing nothing more.
    #[tokio::test]
    async fn a_point_at_the_image_members_end_is_kept_and_resumed() {
        let img = gunzip::tests::image(4 << 20, 28);
        // Incompressible: the interruption lands in it.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let extra: Vec<u8> = (0..4 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let tar = tar_of(&[("rootfs.img", &img), ("extra.bin", &extra)]);
        // Without a check: no points inside the blocks, the image's end is the first point
        // after the one before.
        let none = lzma_rust2::CheckType::None;
        let xz = xz_blocks(&tar, 512 + img.len() as u64, none);
        let fx = Fixture::new(9 << 20);
        let named = |_: &mut InstallRequest, o: &mut InstallOptions| {
            o.archive_member = Some("rootfs.img".into());
        };
        let err = interrupted_install_with(&fx, &xz, xz.len() * 8 / 10, &named).await;
        assert!(err.is_retryable(), "{err}");
        let record = resume::load(&fx.resume_path()).expect("resume record kept");
        assert_eq!(record.format, "tar-xz", "{record:?}");
        assert_eq!(record.slot_offset, img.len() as u64, "{record:?}");
        let server = ArtifactServer::start(xz.clone());
        let mut options = fast_options();
        options.archive_member = Some("rootfs.img".into());
        let installed = run(&fx.request(&server.url, &xz), &options)
            .await
            .0
            .unwrap();
        assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img));
        assert_eq!(installed.bytes_written, img.len() as u64);
        fx.assert_installed(&img);
        let requests = server.requests();
        assert_eq!(requests.len(), 1, "{requests:?}");
        assert_eq!(requests[0].0, Some(record.artifact_offset));
        assert!(!fx.resume_path().exists());
    }

    /// The image named, after a member with data (in the head) and before another: each way
    /// compressed, the restart continues at the point and installs the image.
    #[tokio::test]
    async fn a_named_image_between_other_members_resumes() {
        let img = gunzip::tests::image(8 << 20, 30);
        let before = gunzip::tests::image(3000, 31);
        let after = gunzip::tests::image(100_000, 32);
        let tar = tar_of(&[
            ("boot/config.txt", &before),
            ("rootfs.img", &img),
            ("boot/extra.bin", &after),
        ]);
        let crc64 = lzma_rust2::CheckType::Crc64;
        let named = |_: &mut InstallRequest, o: &mut InstallOptions| {
            o.archive_member = Some("rootfs.img".into());
        };
        for (what, format, artifact) in [
            ("tar.gz", "tar-gzip", gunzip::tests::gzip(&tar, 6)),
            ("tar.zst", "tar-zstd", zstd(&tar)),
            ("tar.zst, frames", "tar-zstd", zstd_frames(&tar, 3 << 20, 3)),
            ("tar.xz", "tar-xz", xz_blocks(&tar, 512 << 10, crc64)),
        ] {
            let fx = Fixture::new(9 << 20);
            let limit = artifact.len() * 6 / 10;
            let err = interrupted_install_with(&fx, &artifact, limit, &named).await;
            assert!(err.is_retryable(), "{what}: {err}");
            let record = resume::load(&fx.resume_path()).expect("resume record kept");
            assert_eq!(record.format, format, "{what}");
            let head = hex::decode(record.tar_head.as_deref().unwrap()).unwrap();
            assert_eq!(head.len(), 512 + 3072 + 512, "{what}");
            let out = record.slot_offset as usize;
            assert!(
                out >= 1 << 20 && fx.slot_bytes()[..out] == img[..out],
                "{what}"
            );
            let server = ArtifactServer::start(artifact.clone());
            let mut options = fast_options();
            options.archive_member = Some("rootfs.img".into());
            let installed = run(&fx.request(&server.url, &artifact), &options)
                .await
                .0
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(installed.sha256_of_slot_image, sha256_hex(&img), "{what}");
            fx.assert_installed(&img);
            let requests = server.requests();
            assert_eq!(requests.len(), 1, "{what}: {requests:?}");
            assert_eq!(requests[0].0, Some(record.artifact_offset), "{what}");
        }
    }

    /// A tar whose image member `rootfs.img` has a PAX extended header holding its size (as
    /// GNU tar, bsdtar and Python write for an image of 8 GiB or more, and `--format=pax`).
    fn tar_with_pax_size(img: &[u8]) -> Vec<u8> {
        let body = format!(" size={}\n", img.len());
        let len = (1..)
            .map(|digits| body.len() + digits)
            .find(|len| len.to_string().len() + body.len() == *len)
            .unwrap();
        let record = format!("{len}{body}");
        assert_eq!(record.len(), len, "{record:?}");
        let mut b = tar::Builder::new(Vec::new());
        let mut x = tar::Header::new_ustar();
        x.set_entry_type(tar::EntryType::XHeader);
        x.set_size(record.len() as u64);
        x.set_mode(0o644);
        x.set_cksum();
        b.append_data(&mut x, "PaxHeaders/rootfs.img", record.as_bytes())
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(img.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "rootfs.img", img).unwrap();
        b.into_inner().unwrap()
    }

    /// Random damage to a record (one flipped bit of one digit of the head's PAX `size`, which
    /// no tar header checksum covers) must not install a wrong image: the head of a point in a
    /// later xz block or zstd frame is checked by nothing of the decoder's.
    #[tokio::test]
    async fn a_damaged_pax_size_in_the_head_never_gives_a_wrong_image() {
        let img = gunzip::tests::image(8 << 20, 27);
        let tar = tar_with_pax_size(&img);
        let crc64 = lzma_rust2::CheckType::Crc64;
        let size = format!("size={}\n", img.len());
        for (what, format, artifact) in [
            ("tar.gz", "tar-gzip", gunzip::tests::gzip(&tar, 6)),
            ("tar.zst, frames", "tar-zstd", zstd_frames(&tar, 3 << 20, 3)),
            ("tar.xz", "tar-xz", xz_blocks(&tar, 512 << 10, crc64)),
        ] {
            let fx = Fixture::new(9 << 20);
            let record = interrupted_decoder_install(&fx, &img, &artifact, format).await;
            let head = hex::decode(record.tar_head.as_deref().unwrap()).unwrap();
            let at = head
                .windows(size.len())
                .position(|w| w == size.as_bytes())
                .unwrap_or_else(|| panic!("{what}: no PAX size in the head"));
            // The size's last digit, one bit flipped: a byte more (the image a multiple of 512
            // bytes, the next header is still where it was); and a byte less.
            let last = at + size.len() - 2;
            let damaged = |digit: u8| {
                let mut head = head.clone();
                head[last] = digit;
                resume::ResumeRecord {
                    tar_head: Some(hex::encode(head)),
                    ..record.clone()
                }
            };
            let tampered = vec![
                ("PAX size + 1", damaged(head[last] ^ 0x01)),
                ("PAX size - 1", damaged(head[last] - 1)),
            ];
            let names: Vec<String> = tampered
                .iter()
                .map(|(c, _)| format!("{what}: {c}"))
                .collect();
            let tampered = names
                .iter()
                .map(String::as_str)
                .zip(tampered.into_iter().map(|t| t.1));
            install_over_tampered_records(&fx, &img, &artifact, &record, tampered.collect()).await;
        }
    }
}

/// A gzip, zstd or xz image (or a tar inside one) in a signed bundle (format 1) resumes after a
/// restart: the bundle's head is fetched again and its signature checked, the decoder continues
/// at the record's point, and the member's signed sha256 continues from the record's state.
mod bundle_inside {
    use super::*;

    /// A test artifact: what it is, its record format, the signed bundle, its policy (and the
    /// key's folder, kept while the test runs).
    struct Signed {
        what: &'static str,
        format: &'static str,
        bundle: Vec<u8>,
        policy: BundlePolicy,
        key: ddi_bundle::SecretKey,
        keys: tempfile::TempDir,
    }

    impl Signed {
        fn new(what: &'static str, format: &'static str, member: &[u8]) -> Signed {
            let (bundle, policy, keys, key) = signed_bundle_and_key(member);
            Signed {
                what,
                format,
                bundle,
                policy,
                key,
                keys,
            }
        }

        /// Installs of this bundle are under its signature policy.
        fn adjust(&self) -> impl Fn(&mut InstallRequest, &mut InstallOptions) + '_ {
            |req, _| req.bundle = Some(self.policy.clone())
        }
    }

    /// The image, and signed bundles of it compressed each way.
    fn artifacts() -> (Vec<u8>, Vec<Signed>) {
        let img = gunzip::tests::image(8 << 20, 29);
        let crc64 = lzma_rust2::CheckType::Crc64;
        let tar = tar_of(&[("rootfs.img", &img)]);
        let artifacts = vec![
            Signed::new("gzip", "bundle-gzip", &gunzip::tests::gzip(&img, 6)),
            Signed::new("zstd", "bundle-zstd", &zstd(&img)),
            Signed::new("xz", "bundle-xz", &xz_blocks(&img, 512 << 10, crc64)),
            Signed::new("tar.gz", "bundle-tar-gzip", &gunzip::tests::gzip(&tar, 6)),
            // One block, as single-threaded `xz` writes: its points are inside the block.
            Signed::new("xz, one block", "bundle-xz", &xz(&img)),
        ];
        (img, artifacts)
    }

    /// An install of `signed` interrupted after 60 % of it: its record is a point in the
    /// bundle's image member.
    async fn interrupted(fx: &Fixture, img: &[u8], signed: &Signed) -> resume::ResumeRecord {
        let adjust = signed.adjust();
        let record =
            interrupted_decoder_install_with(fx, img, &signed.bundle, signed.format, &adjust).await;
        let data_offset = bundle_image_offset(&signed.bundle) as u64;
        assert_eq!(record.member_offset, Some(data_offset), "{record:?}");
        assert_eq!(record.member_of.as_deref(), Some("bundle"), "{record:?}");
        assert!(record.artifact_offset > data_offset, "{record:?}");
        record
    }

    #[tokio::test]
    async fn restart_resumes_a_compressed_image_in_a_signed_bundle_from_its_point() {
        let (img, artifacts) = artifacts();
        for signed in &artifacts {
            let what = signed.what;
            let fx = Fixture::new(9 << 20);
            let record = interrupted(&fx, &img, signed).await;
            let head = record.member_offset.unwrap();
            let adjust = signed.adjust();
            let requests = resumed_over_record(&fx, &img, &signed.bundle, what, &adjust).await;
            // The bundle's head (and before it the delta probe's look at it), then the rest
            // of the artifact from the point: never the whole artifact, nothing else in the
            // image member.
            let starts: Vec<_> = requests.iter().map(|r| r.0).collect();
            assert_eq!(
                starts.last(),
                Some(&Some(record.artifact_offset)),
                "{what}: {requests:?}"
            );
            assert!(
                starts[..starts.len() - 1].iter().all(|&s| s == Some(0)),
                "{what}: {requests:?}"
            );
            assert!(head < record.artifact_offset, "{what}");
        }
    }

    #[tokio::test]
    async fn a_resume_in_a_bundle_over_a_changed_slot_starts_over() {
        let (img, artifacts) = artifacts();
        for signed in artifacts.iter().take(2) {
            let fx = Fixture::new(9 << 20);
            let record = interrupted(&fx, &img, signed).await;
            fx.flip_slot_byte(&img, record.slot_offset - 10);
            let adjust = signed.adjust();
            let requests =
                resumed_over_record(&fx, &img, &signed.bundle, signed.what, &adjust).await;
            // The whole artifact once, never from the point.
            assert!(
                requests.iter().any(|r| r.0.is_none()),
                "{}: {requests:?}",
                signed.what
            );
            assert!(
                requests.iter().all(|r| r.0 != Some(record.artifact_offset)),
                "{}: {requests:?}",
                signed.what
            );
        }
    }

    /// A record damaged anywhere, or pointing elsewhere, never installs a wrong image: it is
    /// refused, or the resumed install fails a check and starts over from byte 0.
    #[tokio::test]
    async fn a_tampered_bundle_record_never_gives_a_wrong_image() {
        let (img, artifacts) = artifacts();
        let signed = &artifacts[0];
        let fx = Fixture::new(9 << 20);
        let record = interrupted(&fx, &img, signed).await;
        let member_offset = record.member_offset.unwrap();
        let input = record.artifact_offset - member_offset;
        let state_of = |bytes: &[u8]| {
            let mut state = sha256_state::Sha256State::new();
            state.update(bytes);
            Some(state.to_text())
        };
        let ahead =
            sha256_state::Sha256State::from_text(record.artifact_sha256_state.as_deref().unwrap())
                .unwrap()
                .len();
        assert!(ahead >= record.artifact_offset, "{record:?}");
        let member = &signed.bundle[member_offset as usize..];
        let tampered: Vec<(&str, resume::ResumeRecord)> = vec![
            (
                "the member's state of other bytes",
                resume::ResumeRecord {
                    member_sha256_state: state_of(&vec![1u8; input as usize]),
                    ..record.clone()
                },
            ),
            (
                "the artifact's state of other bytes",
                resume::ResumeRecord {
                    artifact_sha256_state: state_of(&vec![1u8; ahead as usize]),
                    ..record.clone()
                },
            ),
            (
                "the states swapped",
                resume::ResumeRecord {
                    member_sha256_state: state_of(&member[..input as usize]),
                    artifact_sha256_state: state_of(&member[..ahead as usize]),
                    ..record.clone()
                },
            ),
            (
                "the member a block later",
                resume::ResumeRecord {
                    member_offset: Some(member_offset + 512),
                    artifact_offset: record.artifact_offset + 512,
                    ..record.clone()
                },
            ),
            (
                "the member a block earlier, the point where it was",
                resume::ResumeRecord {
                    member_offset: Some(member_offset - 512),
                    ..record.clone()
                },
            ),
            (
                "crc32",
                resume::ResumeRecord {
                    crc32: record.crc32.map(|c| c ^ 4),
                    ..record.clone()
                },
            ),
            (
                "a plain gzip record",
                resume::ResumeRecord {
                    format: "gzip".into(),
                    member_offset: None,
                    member_of: None,
                    ..record.clone()
                },
            ),
        ];
        let adjust = signed.adjust();
        for (what, bad) in tampered {
            std::fs::write(&fx.slot, vec![FILL; fx.capacity]).unwrap();
            let artifact = (&img[..], &signed.bundle[..]);
            let requests =
                install_over_record_with(&fx, artifact, &record, &bad, what, &adjust).await;
            assert!(
                requests.iter().any(|r| r.0.is_none()),
                "{what}: never started over: {requests:?}"
            );
        }
    }

    /// A download host that serves another bundle signed by the same vendor (padded to the
    /// deployed artifact's size) and cuts the download: the restart resumes in it, as its
    /// signature and member hash are fine, but the artifact's hash (continued from the record)
    /// is not the deployment's, so the resume fails, the install from byte 0 fails that hash
    /// too, and the other image is never installed.
    #[tokio::test]
    async fn another_signed_bundle_from_the_download_host_fails_the_artifact_hash_after_a_resume() {
        let (img, artifacts) = artifacts();
        let deployed = &artifacts[0];
        let other_img = gunzip::tests::image(6 << 20, 30);
        let other_gz = gunzip::tests::gzip(&other_img, 6);
        let mut other = bundle_signed_by(&other_gz, &deployed.key, deployed.keys.path());
        assert!(other.len() <= deployed.bundle.len());
        other.resize(deployed.bundle.len(), 0);
        let fx = Fixture::new(9 << 20);
        let server = ArtifactServer::start(other.clone());
        server.always(drop_after((other.len() * 6 / 10) as u64));
        let mut options = fast_options();
        options.retry.attempts = 0;
        // The deployment names the deployed bundle: its hash and size.
        let mut req = fx.request(&server.url, &deployed.bundle);
        req.bundle = Some(deployed.policy.clone());
        let err = run(&req, &options).await.0.unwrap_err();
        assert!(err.is_retryable(), "{err}");
        let record = resume::load(&fx.resume_path()).expect("resume record kept");
        assert_eq!(record.format, "bundle-gzip", "{record:?}");

        server.clear();
        let err = run(&req, &fast_options()).await.0.unwrap_err();
        assert!(matches!(err, InstallError::HashMismatch { .. }), "{err}");
        assert!(!fx.resume_path().exists());
        let requests = server.requests();
        assert!(
            requests.iter().any(|r| r.0 == Some(record.artifact_offset)),
            "never resumed: {requests:?}"
        );
        assert!(requests.iter().any(|r| r.0.is_none()), "{requests:?}");
        // Whatever the slot holds, it is not the deployed image, and nothing activates it (the
        // install failed); the other image may be there, unverified.
        assert_ne!(fx.slot_bytes()[..img.len()], img[..]);
    }

    /// A bundle's record under a policy that no longer trusts the bundle's key: the resume
    /// fails the signature on the head fetched again, so does the install from byte 0, and
    /// nothing is written over the slot. (Without any policy the record is not used at all:
    /// `resume::tests`.)
    #[tokio::test]
    async fn a_bundle_record_needs_the_policy_that_made_it() {
        let (img, artifacts) = artifacts();
        let signed = &artifacts[1];
        let fx = Fixture::new(9 << 20);
        let record = interrupted(&fx, &img, signed).await;
        let (_, stranger, _other_keys) = signed_bundle(b"another vendor");
        let server = ArtifactServer::start(signed.bundle.clone());
        let mut req = fx.request(&server.url, &signed.bundle);
        req.bundle = Some(stranger);
        let err = run(&req, &fast_options()).await.0.unwrap_err();
        assert!(matches!(err, InstallError::Signature(_)), "{err}");
        // Nothing was written over the interrupted install's prefix.
        let out = record.slot_offset as usize;
        assert_eq!(&fx.slot_bytes()[..out], &img[..out]);
    }

    /// After the restart the server serves the bundle's head as it was but another rest (a
    /// byte of the image member after the point changed): the resume never passes, the
    /// install starts over from byte 0, fails the signature there (naming the member's
    /// sha256), and the record is gone.
    #[tokio::test]
    async fn a_resume_in_a_bundle_over_a_changed_rest_fails_the_signature() {
        let (img, artifacts) = artifacts();
        for signed in &artifacts {
            let what = signed.what;
            let fx = Fixture::new(9 << 20);
            let record = interrupted(&fx, &img, signed).await;
            let mut changed = signed.bundle.clone();
            changed[record.artifact_offset as usize + 4000] ^= 0x10;
            let server = ArtifactServer::start(changed);
            // The request of the artifact the record was made for.
            let mut req = fx.request(&server.url, &signed.bundle);
            req.bundle = Some(signed.policy.clone());
            let err = run(&req, &fast_options()).await.0.unwrap_err();
            assert!(
                matches!(&err, InstallError::Signature(why) if why.contains("sha256")),
                "{what}: {err}"
            );
            let starts: Vec<_> = server.requests().iter().map(|r| r.0).collect();
            assert!(
                starts.contains(&Some(record.artifact_offset)),
                "{what}: {starts:?}"
            );
            assert!(
                starts.contains(&None),
                "{what}: never started over: {starts:?}"
            );
            assert!(!fx.resume_path().exists(), "{what}");
        }
    }

    /// A byte of a compressed signed image member changed anywhere (its header, its data, its
    /// last bytes): the install fails the signature, naming the member's sha256, whatever the
    /// decoder made of it first.
    #[test]
    fn a_changed_byte_of_a_compressed_signed_member_fails_the_signature() {
        let img = image(300 * 1024, 33);
        let crc64 = lzma_rust2::CheckType::Crc64;
        for (what, member) in [
            ("gzip", gzip(&img)),
            ("zstd", zstd(&img)),
            ("xz", xz_blocks(&img, 64 << 10, crc64)),
            ("tar.gz", gzip(&tar_of(&[("rootfs.img", &img)]))),
        ] {
            let (bundle, policy, _keys) = signed_bundle(&member);
            let start = bundle_image_offset(&bundle);
            let len = member.len();
            for at in [0, 3, 12, len / 3, len / 2, len - 9, len - 4, len - 1] {
                let mut changed = bundle.clone();
                changed[start + at] ^= 0x20;
                let (result, _) =
                    run_pipeline_with_policy(&changed, &[4096], 512 * 1024, Some(policy.clone()));
                let err = result.expect_err(what);
                assert!(
                    matches!(&err, InstallError::Signature(why) if why.contains("sha256")),
                    "{what} at {at}: {err}"
                );
            }
        }
    }
}
