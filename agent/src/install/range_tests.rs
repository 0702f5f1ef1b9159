//! The ranges of a delta ([`source::fetch_ranges`]) against a small HTTP/1.1 server that logs
//! when each request arrived, when the bytes it asked for were sent and when each connection
//! closed: the request of a range goes out while the range before it streams, and faults,
//! a server that ignores Range and a receiver that goes away are handled as before.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::pipeline::{self, Counters};
use super::source::{self, RequestBudget, SourceSpec};
use super::tests::image;
use super::RetryPolicy;

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Logged {
    conn: usize,
    /// The Range asked for (`start..end`), if any.
    range: Option<(u64, u64)>,
    arrived: Instant,
    /// When the write of the last byte the Range asked for began (none if it never did).
    range_sent: Option<Instant>,
}

#[derive(Default)]
struct Log {
    requests: Vec<Logged>,
    /// (connection, when the server saw it closed).
    closed: Vec<(usize, Instant)>,
}

/// How the server answers.
#[derive(Clone)]
struct Behaviour {
    /// Body bytes per write, and the pause after each (a slow link).
    piece: usize,
    pause: Duration,
    /// Answer every request with 200 and the whole artifact.
    ignore_range: bool,
    /// Close the connection of the first request for the range that starts here after this
    /// many body bytes.
    cut: Option<(u64, u64)>,
}

struct RangeServer {
    url: String,
    log: Arc<Mutex<Log>>,
}

impl RangeServer {
    fn start(body: Vec<u8>, behaviour: Behaviour) -> RangeServer {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/artifact", listener.local_addr().unwrap());
        let log = Arc::new(Mutex::new(Log::default()));
        let body = Arc::new(body);
        let shared = Arc::clone(&log);
        std::thread::spawn(move || {
            for (conn, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                small_send_buffer(&stream);
                let (log, body, behaviour) =
                    (Arc::clone(&shared), Arc::clone(&body), behaviour.clone());
                std::thread::spawn(move || serve(conn, stream, &body, &behaviour, &log));
            }
        });
        RangeServer { url, log }
    }

    fn requests(&self) -> Vec<Logged> {
        self.log.lock().unwrap().requests.clone()
    }

    fn closed(&self, conn: usize) -> bool {
        self.log.lock().unwrap().closed.iter().any(|c| c.0 == conn)
    }
}

/// A send buffer of a few KiB: a body the agent does not read stays mostly on this side (TCP
/// flow control), so "sent" means about "received" rather than "queued in socket buffers".
fn small_send_buffer(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let size: libc::c_int = 16 << 10;
    // SAFETY: a valid socket and an int option of the right size.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_SNDBUF,
            (&size as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
}

/// Answers the requests of one keep-alive connection until it closes.
fn serve(conn: usize, stream: TcpStream, body: &[u8], b: &Behaviour, log: &Mutex<Log>) {
    let closed = || log.lock().unwrap().closed.push((conn, Instant::now()));
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut stream = stream;
    loop {
        let mut range = None;
        let mut line = String::new();
        loop {
            line.clear();
            match reader.read_line(&mut line) {
                Ok(0) | Err(_) => return closed(),
                Ok(_) if line == "\r\n" => break,
                Ok(_) => {}
            }
            let lower = line.to_ascii_lowercase();
            if let Some(spec) = lower.strip_prefix("range: bytes=") {
                let (a, z) = spec.trim().split_once('-').unwrap();
                range = Some((a.parse::<u64>().unwrap(), z.parse::<u64>().unwrap() + 1));
            }
        }
        let index = {
            let mut log = log.lock().unwrap();
            log.requests.push(Logged {
                conn,
                range,
                arrived: Instant::now(),
                range_sent: None,
            });
            log.requests.len() - 1
        };
        let total = body.len() as u64;
        let (from, to, head) = match range {
            Some((a, z)) if !b.ignore_range => (
                a,
                z,
                format!(
                    "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{}/{total}\r\n",
                    z - 1
                ),
            ),
            _ => (0, total, "HTTP/1.1 200 OK\r\n".to_string()),
        };
        let head = format!("{head}Content-Length: {}\r\n\r\n", to - from);
        if stream.write_all(head.as_bytes()).is_err() {
            return closed();
        }
        let asked_end = range.map_or(total, |r| r.1);
        let first_ask = |log: &Log| log.requests.iter().position(|r| r.range == range);
        let cut = b
            .cut
            .filter(|c| range.map(|r| r.0) == Some(c.0))
            .filter(|_| first_ask(&log.lock().unwrap()) == Some(index))
            .map(|c| from + c.1);
        let mut at = from;
        while at < to {
            let mut next = (at + b.piece as u64).min(to);
            if let Some(cut) = cut {
                next = next.min(cut);
            }
            // Taken before the write that completes the range: the client cannot have its
            // last byte (and send its next request) before this instant, whatever the load.
            if at < asked_end && next >= asked_end {
                log.lock().unwrap().requests[index].range_sent = Some(Instant::now());
            }
            if stream.write_all(&body[at as usize..next as usize]).is_err() {
                return closed();
            }
            at = next;
            if cut == Some(at) {
                let _ = stream.shutdown(Shutdown::Both);
                return closed();
            }
            std::thread::sleep(b.pause);
        }
    }
}

fn spec(url: &str, size: u64) -> SourceSpec {
    SourceSpec {
        url: url.to_string(),
        auth_header: None,
        size: Some(size),
        max_rate: None,
        retry: RetryPolicy {
            attempts: 3,
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(50),
        },
        stall_timeout: Duration::from_secs(10),
        requests: RequestBudget::default(),
    }
}

/// Runs [`source::fetch_ranges`] of `ranges` to its end and returns what reached the channel.
async fn fetch(spec: &SourceSpec, ranges: &[(u64, u64)]) -> Vec<u8> {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let counters = Counters::new(0, None);
    let (tx, rx) = pipeline::channel(64, 256 << 10);
    let reading = tokio::task::spawn_blocking(move || {
        let counters = Counters::new(0, None);
        let mut got = Vec::new();
        let mut reader = pipeline::channel_reader(rx, &counters);
        reader.read_to_end(&mut got).map(|_| got)
    });
    source::fetch_ranges(&client, spec, ranges, tx, &counters)
        .await
        .unwrap();
    let got = reading.await.unwrap().unwrap();
    assert_eq!(
        counters
            .downloaded
            .load(std::sync::atomic::Ordering::Relaxed),
        got.len() as u64
    );
    got
}

fn expected(body: &[u8], ranges: &[(u64, u64)]) -> Vec<u8> {
    ranges
        .iter()
        .flat_map(|&(a, z)| body[a as usize..z as usize].iter().copied())
        .collect()
}

fn slow() -> Behaviour {
    Behaviour {
        piece: 16 << 10,
        pause: Duration::from_millis(10),
        ignore_range: false,
        cut: None,
    }
}

/// Four ranges of 640 KiB: each takes 400 ms to send, far more than the socket buffers of a
/// connection that is not read hold (the server's 16 KiB and the agent's receive buffer,
/// 128 KiB by default).
const RANGES: [(u64, u64); 4] = [
    (0, 640 << 10),
    (1 << 20, (1 << 20) + (640 << 10)),
    (2 << 20, (2 << 20) + (640 << 10)),
    (3 << 20, (3 << 20) + (640 << 10)),
];

/// The request of range i+1 reaches the server before the bytes of range i were all sent (one
/// round trip and the server's time to the first byte hidden behind each range), on a second
/// connection; the bytes are the same, in the same order, in one request per range.
#[tokio::test]
async fn the_next_range_is_requested_while_the_current_one_streams() {
    let body = image(4 << 20, 7);
    let server = RangeServer::start(body.clone(), slow());
    let spec = spec(&server.url, body.len() as u64);
    let got = fetch(&spec, &RANGES).await;
    assert_eq!(got, expected(&body, &RANGES));
    let log = by_range(server.requests());
    assert_eq!(log.len(), RANGES.len(), "{log:?}");
    assert_eq!(spec.requests.used(), RANGES.len() as u32);
    for (i, r) in log.iter().enumerate() {
        assert_eq!(r.range, Some(RANGES[i]), "{log:?}");
    }
    for pair in log.windows(2) {
        let before = pair[0].range_sent.expect("every range was sent");
        assert!(
            pair[1].arrived < before,
            "range {:?} was requested only after range {:?} was sent",
            pair[1].range,
            pair[0].range
        );
        assert_ne!(pair[0].conn, pair[1].conn, "{log:?}");
    }
}

/// The requests sorted by the start of their Range (two may arrive in either order).
fn by_range(mut log: Vec<Logged>) -> Vec<Logged> {
    log.sort_by_key(|r| (r.range, r.arrived));
    log
}

/// A server that ignores Range (200 with the whole artifact) gets no more requests ahead once
/// it answered one with 200: the second range's request was already on its way with the
/// first, the third waits until the second is done; the bytes of each range are taken from
/// their place in the whole body.
#[tokio::test]
async fn a_server_that_ignores_range_gets_no_more_requests_ahead() {
    let body = image(400 << 10, 7);
    let ranges = [(0, 16 << 10), (64 << 10, 80 << 10), (128 << 10, 144 << 10)];
    let behaviour = Behaviour {
        ignore_range: true,
        ..slow()
    };
    let server = RangeServer::start(body.clone(), behaviour);
    let spec = spec(&server.url, body.len() as u64);
    let got = fetch(&spec, &ranges).await;
    assert_eq!(got, expected(&body, &ranges));
    let log = by_range(server.requests());
    assert_eq!(log.len(), ranges.len(), "{log:?}");
    assert_eq!(log[2].range, Some(ranges[2]), "{log:?}");
    let second_sent = log[1].range_sent.expect("the second range was sent");
    assert!(log[2].arrived > second_sent, "{log:?}");
}

/// A connection cut in the middle of a range whose successor was requested ahead, or the cut
/// of the request sent ahead itself: the range resumes where it broke off, the bytes are
/// right, and the requests are one per range plus the resume.
#[tokio::test]
async fn a_cut_with_a_request_ahead_resumes_within_the_budget() {
    // The first range's connection; the request sent ahead for the second range.
    for cut in [0usize, 1] {
        let body = image(4 << 20, 7);
        let behaviour = Behaviour {
            cut: Some((RANGES[cut].0, 20 << 10)),
            ..slow()
        };
        let server = RangeServer::start(body.clone(), behaviour);
        let spec = spec(&server.url, body.len() as u64);
        let got = fetch(&spec, &RANGES).await;
        assert_eq!(got, expected(&body, &RANGES), "cut {cut}");
        let log = server.requests();
        assert_eq!(log.len(), RANGES.len() + 1, "cut {cut}: {log:?}");
        assert_eq!(spec.requests.used(), log.len() as u32, "cut {cut}");
        // The resume asked for the rest of the cut range.
        let resumed = (RANGES[cut].0 + (20 << 10), RANGES[cut].1);
        let at = |range| log.iter().position(|r| r.range == Some(range));
        let resume = at(resumed).unwrap_or_else(|| panic!("cut {cut}: {log:?}"));
        // The second range was asked for ahead: before the first one's resume, or before the
        // first range was all sent.
        let second = at(RANGES[1]).unwrap();
        match cut {
            0 => assert!(second < resume, "{log:?}"),
            _ => assert!(log[second].arrived < log[at(RANGES[0]).unwrap()].range_sent.unwrap()),
        }
    }
}

/// The blocking stage goes away in the middle of the first range: the fetch ends at once and
/// both connections (the range's and the one of the request sent ahead) are closed; nothing
/// more is asked.
#[tokio::test]
async fn a_receiver_that_goes_away_stops_both_requests() {
    let body = image(1 << 20, 7);
    let ranges = [
        (0, 256 << 10),
        (300 << 10, 556 << 10),
        (600 << 10, 856 << 10),
    ];
    let behaviour = Behaviour {
        pause: Duration::from_millis(50),
        ..slow()
    };
    let server = RangeServer::start(body.clone(), behaviour);
    let spec = spec(&server.url, body.len() as u64);
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let counters = Counters::new(0, None);
    let (tx, rx) = pipeline::channel(64, 256 << 10);
    let began = Instant::now();
    let log = Arc::clone(&server.log);
    let reading = tokio::task::spawn_blocking(move || {
        let counters = Counters::new(0, None);
        let mut first = [0u8; 1];
        let mut reader = pipeline::channel_reader(rx, &counters);
        reader.read_exact(&mut first).unwrap();
        // Once the request of the next range is in, the channel goes.
        let deadline = Instant::now() + Duration::from_secs(2);
        while log.lock().unwrap().requests.len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        first[0]
    });
    let watch = async {
        let first = reading.await.unwrap();
        assert_eq!(first, body[0]);
    };
    let (fetched, ()) = tokio::join!(
        source::fetch_ranges(&client, &spec, &ranges, tx, &counters),
        watch
    );
    fetched.unwrap();
    // A whole range takes 32 pieces of 50 ms.
    assert!(
        began.elapsed() < Duration::from_secs(1),
        "{:?}",
        began.elapsed()
    );
    assert_eq!(server.requests().len(), 2, "no request was sent ahead");
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = server.requests();
    let conns: Vec<usize> = log.iter().map(|r| r.conn).collect();
    while !conns.iter().all(|&c| server.closed(c)) {
        assert!(Instant::now() < deadline, "connections left open: {log:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let log = server.requests();
    assert_eq!(log.len(), 2, "{log:?}");
    assert_eq!(spec.requests.used(), 2);
}
