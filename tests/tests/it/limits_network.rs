//! Limits on everything a hostile server can send: oversized and endless headers, oversized
//! and endless JSON bodies, stalled and trickled connections, deployments with absurd numbers
//! of chunks and artifacts, decompression bombs and artifacts larger than the slot.
//!
//! The server here is a raw TCP listener on loopback that answers with hand-written bytes, so
//! it can break HTTP in ways a well-behaved server library never would. Every test is bounded
//! in time and in bytes sent.
//!

use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ddi_agent::config::{Auth, ServerConfig};
use ddi_agent::ddi::{DdiClient, Link};
use ddi_agent::install::{self, ExpectedHash, InstallError, InstallOptions, InstallRequest};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Most bytes any hostile answer writes, so a test that fails cannot fill memory or run long.
const SEND_CAP: u64 = 256 * 1024 * 1024;

/// What the hostile server does after reading a request's head.
type Behaviour =
    Arc<dyn Fn(TcpStream) -> futures_util::future::BoxFuture<'static, ()> + Send + Sync>;

struct Hostile {
    addr: std::net::SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Hostile {
    async fn start(behaviour: Behaviour) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    return;
                };
                let behaviour = behaviour.clone();
                tokio::spawn(async move {
                    if read_request_head(&mut stream).await {
                        behaviour(stream).await;
                    }
                });
            }
        });
        Hostile { addr, task }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Hostile {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads up to the blank line that ends a request head (bounded); false when the client left.
async fn read_request_head(stream: &mut TcpStream) -> bool {
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
        if head.len() > 1 << 20 {
            return false;
        }
    }
    true
}

/// Writes `head`, then `body_piece` repeatedly (up to `total` bytes, capped), then `tail`.
fn repeat_body(
    head: String,
    body_piece: &'static [u8],
    total: u64,
    tail: &'static [u8],
) -> Behaviour {
    Arc::new(move |mut s: TcpStream| {
        let head = head.clone();
        Box::pin(async move {
            if s.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let mut sent = 0u64;
            // Whole pieces only, so a repeated header line stays a header line.
            let block: Vec<u8> = body_piece.repeat((64 * 1024 / body_piece.len().max(1)).max(1));
            while sent < total.min(SEND_CAP) {
                let n = (total - sent).min(block.len() as u64) as usize;
                if s.write_all(&block[..n]).await.is_err() {
                    return;
                }
                sent += n as u64;
            }
            let _ = s.write_all(tail).await;
            let _ = s.shutdown().await;
        })
    })
}

fn server_config(url: &str) -> ServerConfig {
    ServerConfig {
        url: url.parse().unwrap(),
        tenant: "DEFAULT".into(),
        controller_id: "hostile".into(),
        auth: Auth::TargetToken("limits-token".into()),
        ca_file: None,
        client_cert: None,
        client_key: None,
        retries: 1,
        connect_timeout: Duration::from_secs(2),
        low_speed_timeout: Duration::from_secs(2),
    }
}

async fn poll(
    url: &str,
) -> (
    Result<ddi_agent::ddi::PollReply, ddi_agent::ddi::DdiError>,
    Duration,
) {
    let mut client = DdiClient::new(&server_config(url)).unwrap();
    let started = Instant::now();
    // The outer bound only keeps a broken test from hanging CI; the limits under test are
    // far below it.
    let result = tokio::time::timeout(Duration::from_secs(60), client.poll())
        .await
        .expect("poll did not return within 60 s");
    (result, started.elapsed())
}

const POLL_JSON_HEAD: &[u8] = br#"{"config":{"polling":{"sleep":"00:01:00"}},"_links":{},"pad":""#;

#[tokio::test]
async fn a_sane_poll_answer_is_accepted() {
    // The control case: the same raw server with a normal body works, so the refusals below
    // are about the limits and not about the server.
    let body = br#"{"config":{"polling":{"sleep":"00:01:00"}},"_links":{}}"#;
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let server = Hostile::start(repeat_body(head, body, body.len() as u64, b"")).await;
    let (result, _) = poll(&server.url()).await;
    let reply = result.expect("a normal poll answer must parse");
    assert_eq!(reply.sleep, Some(Duration::from_secs(60)));
}

#[tokio::test]
async fn an_oversized_response_header_is_refused() {
    // One header line of 1 MiB.
    let head = format!(
        "HTTP/1.1 200 OK\r\nX-Big: {}\r\nContent-Length: 2\r\n\r\n{{}}",
        "a".repeat(1 << 20)
    );
    let server = Hostile::start(repeat_body(head, b"", 0, b"")).await;
    let (result, took) = poll(&server.url()).await;
    let err = result.expect_err("a 1 MiB header must be refused");
    assert!(took < Duration::from_secs(20), "took {took:?}: {err}");
}

#[tokio::test]
async fn endless_response_headers_are_refused() {
    // Header lines that never end (up to the send cap).
    let head = "HTTP/1.1 200 OK\r\n".to_string();
    let server = Hostile::start(repeat_body(head, b"X-More: yes\r\n", SEND_CAP, b"")).await;
    let (result, took) = poll(&server.url()).await;
    let err = result.expect_err("endless headers must be refused");
    assert!(took < Duration::from_secs(20), "took {took:?}: {err}");
}

#[tokio::test]
async fn too_many_response_headers_are_refused() {
    let mut head = "HTTP/1.1 200 OK\r\n".to_string();
    for i in 0..5000 {
        head.push_str(&format!("X-H{i}: v\r\n"));
    }
    head.push_str("Content-Length: 2\r\n\r\n{}");
    let server = Hostile::start(repeat_body(head, b"", 0, b"")).await;
    let (result, _) = poll(&server.url()).await;
    result.expect_err("5000 headers must be refused");
}

#[tokio::test]
async fn a_server_that_never_answers_times_out() {
    let stall: Behaviour = Arc::new(|s: TcpStream| {
        Box::pin(async move {
            tokio::time::sleep(Duration::from_secs(120)).await;
            drop(s);
        })
    });
    let server = Hostile::start(stall).await;
    let (result, took) = poll(&server.url()).await;
    let err = result.expect_err("a silent server must time out");
    // low_speed_timeout is 2 s and one attempt is made.
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
}

#[tokio::test]
async fn a_body_that_stalls_halfway_times_out() {
    let head = "HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n".to_string();
    let stall: Behaviour = Arc::new(move |mut s: TcpStream| {
        let head = head.clone();
        Box::pin(async move {
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(POLL_JSON_HEAD).await;
            tokio::time::sleep(Duration::from_secs(120)).await;
        })
    });
    let server = Hostile::start(stall).await;
    let (result, took) = poll(&server.url()).await;
    let err = result.expect_err("a stalled body must time out");
    assert!(took < Duration::from_secs(15), "took {took:?}: {err}");
}

#[tokio::test]
async fn an_oversized_json_body_is_refused() {
    // 64 MiB of padding inside a valid poll answer, announced by Content-Length.
    let total = 64u64 << 20;
    let len = POLL_JSON_HEAD.len() as u64 + total + 2;
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    );
    let server = Hostile::start(prefixed(head, POLL_JSON_HEAD, b" ", total, b"\"}")).await;
    let (result, _) = poll(&server.url()).await;
    result.expect_err("a 64 MiB poll answer must be refused (a DDI body is a few KiB)");
}

#[tokio::test]
async fn a_trickled_body_is_bounded_in_time() {
    // One byte every 500 ms: never slow enough for the low-speed timeout, never finished.
    let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n".to_string();
    let trickle: Behaviour = Arc::new(move |mut s: TcpStream| {
        let head = head.clone();
        Box::pin(async move {
            let _ = s.write_all(head.as_bytes()).await;
            let _ = s.write_all(POLL_JSON_HEAD).await;
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_millis(500)).await;
                if s.write_all(b" ").await.is_err() {
                    return;
                }
            }
        })
    });
    let server = Hostile::start(trickle).await;
    let (result, took) = poll(&server.url()).await;
    assert!(result.is_err(), "a body that never ends must fail");
    assert!(took < Duration::from_secs(45), "took {took:?}");
}

fn deployment_with(chunks: usize, artifacts_per_chunk: usize) -> Vec<u8> {
    let artifact = serde_json::json!({
        "filename": "a.img", "size": 1, "hashes": {"sha256": "00".repeat(32)},
        "_links": {"download-http": {"href": "http://127.0.0.1:1/a"}}
    });
    let chunk = serde_json::json!({
        "part": "os", "version": "1", "name": "n",
        "artifacts": vec![artifact; artifacts_per_chunk]
    });
    serde_json::to_vec(&serde_json::json!({
        "id": "7",
        "deployment": {"download": "forced", "update": "forced", "chunks": vec![chunk; chunks]}
    }))
    .unwrap()
}

async fn fetch_deployment(
    body: Vec<u8>,
) -> Result<ddi_agent::ddi::Deployment, ddi_agent::ddi::DdiError> {
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let body: &'static [u8] = Box::leak(body.into_boxed_slice());
    let server = Hostile::start(repeat_body(head, body, body.len() as u64, b"")).await;
    let client = DdiClient::new(&server_config(&server.url())).unwrap();
    let link = Link {
        href: format!(
            "{}/DEFAULT/controller/v1/hostile/deploymentBase/7",
            server.url()
        ),
    };
    tokio::time::timeout(Duration::from_secs(60), client.deployment(&link))
        .await
        .expect("deployment fetch did not return within 60 s")
}

#[tokio::test]
async fn a_deployment_with_a_few_chunks_is_accepted() {
    let d = fetch_deployment(deployment_with(3, 2))
        .await
        .expect("a normal deployment parses");
    assert_eq!(d.chunks.len(), 3);
    assert_eq!(d.chunks[0].artifacts.len(), 2);
}

#[tokio::test]
async fn a_deployment_with_absurd_numbers_of_chunks_is_refused() {
    let result = fetch_deployment(deployment_with(20_000, 1)).await;
    assert!(result.is_err(), "20000 chunks must be refused");
    let result = fetch_deployment(deployment_with(1, 20_000)).await;
    assert!(
        result.is_err(),
        "20000 artifacts in one chunk must be refused"
    );
}

/// `head`, then `first`, then `piece` repeated to `total` bytes, then `tail`.
fn prefixed(
    head: String,
    first: &'static [u8],
    piece: &'static [u8],
    total: u64,
    tail: &'static [u8],
) -> Behaviour {
    let mut head_bytes = head.into_bytes();
    head_bytes.extend_from_slice(first);
    let head = String::from_utf8(head_bytes).expect("ascii head");
    repeat_body(head, piece, total, tail)
}

// ---- artifacts: decompressed size and slot capacity ----

const SLOT_SIZE: usize = 1 << 20;

struct SlotFixture {
    _dir: tempfile::TempDir,
    slot: PathBuf,
    resume: PathBuf,
}

fn slot_fixture() -> SlotFixture {
    let dir = tempfile::tempdir().unwrap();
    let slot = dir.path().join("slot-b.img");
    std::fs::write(&slot, vec![0x5Au8; SLOT_SIZE]).unwrap();
    let resume = dir.path().join("resume.json");
    SlotFixture {
        _dir: dir,
        slot,
        resume,
    }
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

async fn install_from(
    server: &Hostile,
    fixture: &SlotFixture,
    sha256: String,
    size: Option<u64>,
) -> Result<install::Installed, InstallError> {
    let req = InstallRequest {
        url: format!("{}/artifact", server.url()),
        expected: ExpectedHash {
            sha256: Some(sha256),
            ..ExpectedHash::default()
        },
        size,
        filename: "artifact".into(),
        slot_path: fixture.slot.clone(),
        resume_path: fixture.resume.clone(),
        ..InstallRequest::default()
    };
    let options = InstallOptions {
        stall_timeout: Duration::from_secs(3),
        retry: install::RetryPolicy {
            attempts: 2,
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(100),
        },
        ..InstallOptions::default()
    };
    let client = reqwest::Client::new();
    tokio::time::timeout(
        Duration::from_secs(60),
        install::install_with(&client, &req, &options, &mut |_| {}),
    )
    .await
    .expect("install did not return within 60 s")
}

fn serve_bytes(body: Vec<u8>, content_length: bool) -> Behaviour {
    let head = if content_length {
        format!(
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
    } else {
        "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_string()
    };
    let body: &'static [u8] = Box::leak(body.into_boxed_slice());
    repeat_body(head, body, body.len() as u64, b"")
}

fn slot_untouched_past(fixture: &SlotFixture, from: usize) {
    let data = std::fs::read(&fixture.slot).unwrap();
    assert_eq!(
        data.len(),
        SLOT_SIZE,
        "the slot file must never change size"
    );
    assert!(
        data[from..].iter().all(|&b| b == 0x5A),
        "bytes past {from} were written"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gzip_bomb_stops_at_the_slot_capacity() {
    // 1 MiB of zeros compresses to about 1 KiB; 256 such gzip members back to back (valid:
    // gzip allows several members) inflate to 256 MiB. The slot holds 1 MiB.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![0u8; 1 << 20]).unwrap();
    let member = gz.finish().unwrap();
    let bomb = member.repeat(256);
    assert!(bomb.len() < 2 << 20);
    let fixture = slot_fixture();
    let sha = sha256_hex(&bomb);
    let len = bomb.len() as u64;
    let server = Hostile::start(serve_bytes(bomb, true)).await;
    let started = Instant::now();
    let err = install_from(&server, &fixture, sha, Some(len))
        .await
        .expect_err("a bomb must fail");
    assert!(matches!(err, InstallError::TooLarge { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30));
    slot_untouched_past(&fixture, SLOT_SIZE); // size unchanged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tar_member_larger_than_the_slot_is_refused_before_writing() {
    // A header that claims 8 GiB, followed by only a little data.
    let mut header = tar::Header::new_ustar();
    header.set_path("image.ext4").unwrap();
    header.set_size(8 << 30);
    header.set_mode(0o644);
    header.set_cksum();
    let mut artifact = header.as_bytes().to_vec();
    artifact.extend(vec![1u8; 64 * 1024]);
    let fixture = slot_fixture();
    let sha = sha256_hex(&artifact);
    let len = artifact.len() as u64;
    let server = Hostile::start(serve_bytes(artifact, true)).await;
    let err = install_from(&server, &fixture, sha, Some(len))
        .await
        .expect_err("must be refused");
    assert!(
        matches!(
            err,
            InstallError::TooLarge { .. } | InstallError::ArchiveRejected(_)
        ),
        "{err}"
    );
    slot_untouched_past(&fixture, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_raw_artifact_stops_at_the_slot_capacity() {
    // No Content-Length, no announced size: the body goes on (up to 64 MiB) past the slot.
    let head = "HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n".to_string();
    let server = Hostile::start(repeat_body(head, b"\x01\x02\x03\x04", 64 << 20, b"")).await;
    let fixture = slot_fixture();
    let err = install_from(&server, &fixture, "00".repeat(32), None)
        .await
        .expect_err("an endless artifact must fail");
    assert!(
        matches!(err, InstallError::TooLarge { at_least: true, .. }),
        "{err}"
    );
    slot_untouched_past(&fixture, SLOT_SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_longer_than_the_announced_size_is_refused() {
    let body = vec![7u8; 4096];
    let fixture = slot_fixture();
    let sha = sha256_hex(&body[..1000]);
    let server = Hostile::start(serve_bytes(body, true)).await;
    let err = install_from(&server, &fixture, sha, Some(1000))
        .await
        .expect_err("more bytes than announced must fail");
    assert!(matches!(err, InstallError::SizeMismatch { .. }), "{err}");
    // Nothing past the announced size reached the slot.
    slot_untouched_past(&fixture, 1000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_image_announced_larger_than_the_slot_writes_nothing() {
    let body = vec![9u8; SLOT_SIZE + 4096];
    let fixture = slot_fixture();
    let sha = sha256_hex(&body);
    let len = body.len() as u64;
    let server = Hostile::start(serve_bytes(body, true)).await;
    let err = install_from(&server, &fixture, sha, Some(len))
        .await
        .expect_err("an image larger than the slot must fail");
    assert!(matches!(err, InstallError::TooLarge { .. }), "{err}");
    slot_untouched_past(&fixture, 0);
}
