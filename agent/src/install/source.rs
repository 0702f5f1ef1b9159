//! The download side: HTTP GET of the artifact, resumed with `Range` requests after network
//! faults (bounded tries with the backoff and `Retry-After` handling of [`crate::http_policy`],
//! and at most [`MAX_REQUESTS_PER_INSTALL`] requests in all),
//! paced by an optional rate limit, feeding the bounded channel to the blocking stage; the
//! ranges of a delta with the next range's request sent when the current one begins
//! ([`fetch_ranges`]); and a local file (`ddi-agent install FILE`) fed the same way.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::{self, BoxFuture, Either, FutureExt};
use reqwest::header::{CONTENT_RANGE, RANGE};
use tokio::time::{sleep, sleep_until, timeout, Instant};

use super::pipeline::{ChunkSender, Counters};
use super::{InstallError, RetryPolicy};
use crate::http_policy;

/// What to download and how.
#[derive(Debug, Clone)]
pub struct SourceSpec {
    pub url: String,
    pub auth_header: Option<(String, String)>,
    /// Artifact size from the server's metadata, if any.
    pub size: Option<u64>,
    pub max_rate: Option<u64>,
    pub retry: RetryPolicy,
    /// A connection that delivers nothing for this long is a network fault.
    pub stall_timeout: Duration,
    /// The install's requests so far (shared by the clones of one install's spec).
    pub requests: RequestBudget,
}

/// HTTP requests one install may make for its artifact (head probe, ranges, resumes, the
/// re-download of seed chunks): the retry budget of [`fetch`] resets whenever a connection
/// delivers a byte, so without this a server that ends every answer after a few bytes is asked
/// again forever, and hawkBit up to 0.7 records every Range request as an action status (at
/// most 1000 per action, the agent's own feedback included). A delta plans at most ~90.
pub const MAX_REQUESTS_PER_INSTALL: u32 = 500;

/// A connection that delivered at least this many new bytes before it ended does not count
/// against [`MAX_REQUESTS_PER_INSTALL`]: a flaky link that keeps making progress (a large image
/// over a link that drops every few MiB) must finish, while a server that ends every answer
/// after a few bytes still runs out of requests.
pub const PRODUCTIVE_CONNECTION_BYTES: u64 = 64 * 1024;

/// Counts an install's requests against [`MAX_REQUESTS_PER_INSTALL`], and the bytes it read
/// and threw away because the server answered a Range request with the whole artifact (200);
/// clones share the counts.
#[derive(Debug, Clone, Default)]
pub struct RequestBudget(Arc<(AtomicU32, AtomicU64)>);

impl RequestBudget {
    /// Take one request; false once the budget is spent.
    fn take(&self) -> bool {
        self.0 .0.fetch_add(1, Ordering::Relaxed) < MAX_REQUESTS_PER_INSTALL
    }

    /// Give back the request of a connection that delivered [`PRODUCTIVE_CONNECTION_BYTES`].
    fn refund(&self) {
        let _ = self
            .0
             .0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// Requests made (or refused) so far.
    pub fn used(&self) -> u32 {
        self.0
             .0
            .load(Ordering::Relaxed)
            .min(MAX_REQUESTS_PER_INSTALL)
    }

    /// Count `n` bytes read only to be skipped; false once the install would have thrown away
    /// more than `limit` (the artifact's size) in all.
    fn discard(&self, n: u64, limit: u64) -> bool {
        self.0 .1.fetch_add(n, Ordering::Relaxed).saturating_add(n) <= limit
    }
}

/// One failed attempt.
enum Fault {
    Permanent(InstallError),
    Transient {
        message: String,
        truncated: bool,
        /// The server's `Retry-After`.
        retry_after: Option<Duration>,
    },
}

enum Done {
    Complete,
    /// The blocking stage stopped reading (it failed; its error is the one that counts).
    ReceiverGone,
}

/// Paces the download to `rate` bytes/s (per connection, so a retry does not burst).
struct RateLimiter {
    rate: Option<u64>,
    since: Instant,
    bytes: u64,
}

impl RateLimiter {
    fn new(rate: Option<u64>) -> Self {
        RateLimiter {
            rate: rate.filter(|&r| r > 0),
            since: Instant::now(),
            bytes: 0,
        }
    }

    fn restart(&mut self) {
        self.since = Instant::now();
        self.bytes = 0;
    }

    async fn consumed(&mut self, n: usize) {
        if let Some(rate) = self.rate {
            self.bytes += n as u64;
            let due = self.since + Duration::from_secs_f64(self.bytes as f64 / rate as f64);
            sleep_until(due).await;
        }
    }
}

/// `Content-Range: bytes START-END/TOTAL` -> (START, TOTAL if given).
fn parse_content_range(value: &str) -> Option<(u64, Option<u64>)> {
    let rest = value.trim().strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse().ok()?),
    };
    Some((start.trim().parse().ok()?, total))
}

/// Download from `start` to the end of the artifact into `tx`, resuming after faults.
/// Returns Ok also when the receiver went away (the blocking stage reports why).
pub async fn fetch(
    client: &reqwest::Client,
    spec: &SourceSpec,
    start: u64,
    tx: ChunkSender,
    counters: &Counters,
) -> Result<(), InstallError> {
    let mut out = Out::Channel(&tx);
    let span = Span {
        start,
        end: None,
        probed: start > 0,
    };
    if let Done::Complete = fetch_alone(client, spec, span, &mut out, counters).await? {
        tx.send_end().await;
    }
    Ok(())
}

/// Download the byte ranges `ranges` (`start..end` of the artifact, in this order) into `tx`,
/// one after the other, each resumed after faults where it broke off. The request of each
/// range goes out when the range before it begins, so that its body can be read the moment
/// the one before ends (see [`Pipeline`]): on a link with a long round trip, a delta of ~90
/// ranges would otherwise spend 90 round trips (and the server's time to the first byte)
/// idle.
pub async fn fetch_ranges(
    client: &reqwest::Client,
    spec: &SourceSpec,
    ranges: &[(u64, u64)],
    tx: ChunkSender,
    counters: &Counters,
) -> Result<(), InstallError> {
    let mut out = Out::Channel(&tx);
    let mut limiter = RateLimiter::new(spec.max_rate);
    let mut pipeline = Pipeline::new();
    // The request of the range after the current one, sent ahead (at most one).
    let mut ahead: Option<Ahead<'_>> = None;
    for (i, &(start, end)) in ranges.iter().enumerate() {
        let span = Span {
            start,
            end: Some(end),
            probed: true,
        };
        let next = ranges
            .get(i + 1)
            .copied()
            .filter(|_| pipeline.may_send_ahead());
        let mut handoff = Handoff {
            first: ahead.take(),
            ..Handoff::default()
        };
        let done = {
            let fetching = std::pin::pin!(fetch_span(
                client,
                spec,
                span,
                &mut out,
                counters,
                &mut limiter,
                &mut handoff,
            ));
            match next {
                Some((next_start, next_end)) => {
                    let range = format!("bytes={next_start}-{}", next_end - 1);
                    let send_ahead = send(client, spec, Some(range), next_start).boxed();
                    match future::select(fetching, send_ahead).await {
                        Either::Left((done, pending)) => {
                            ahead = Some(Ahead::Pending(pending));
                            done?
                        }
                        Either::Right((sent, fetching)) => {
                            ahead = Some(Ahead::Answered(sent));
                            fetching.await?
                        }
                    }
                }
                None => fetching.await?,
            }
        };
        if let Done::ReceiverGone = done {
            // A request sent ahead is dropped here: hyper closes its connection.
            return Ok(());
        }
        pipeline.finished(&handoff);
    }
    tx.send_end().await;
    Ok(())
}

/// The answer to one request: the response once its headers are in (the body not read yet),
/// or the fault.
type Sent = Result<reqwest::Response, Fault>;

/// A range's request sent ahead by [`fetch_ranges`] while the range before it was fetched.
///
/// Memory: its body is not read into the agent before its turn. hyper reads a body from the
/// connection only as it is polled for it, so what the server sends ahead stays in hyper's
/// read buffer of that connection (what came with the headers, at most ~400 KiB) and the
/// kernel's socket receive buffer (net.ipv4.tcp_rmem; TCP flow control stops the server
/// there); the channel to the blocking stage stays the only place where downloaded bytes
/// queue up.
enum Ahead<'a> {
    /// Sent, no answer yet.
    Pending(BoxFuture<'a, Sent>),
    Answered(Sent),
}

impl Ahead<'_> {
    /// The answer of the request sent ahead.
    async fn answer(self) -> Sent {
        match self {
            Ahead::Pending(pending) => pending.await,
            Ahead::Answered(sent) => sent,
        }
    }
}

/// One range's part in the pipeline of [`fetch_ranges`] (empty for every other download).
#[derive(Default)]
struct Handoff<'a> {
    /// The request sent ahead for this range: its first attempt.
    first: Option<Ahead<'a>>,
    /// Faulted attempts (any kind).
    faults: u32,
    /// The attempt on the request sent ahead faulted.
    ahead_faulted: bool,
    /// An attempt was answered with the whole artifact (200): the server ignores Range.
    whole_body: bool,
}

/// When [`fetch_ranges`] sends a range's request ahead (depth one: the request of range i+1
/// goes out when range i's turn begins, on a second keep-alive connection of the same client,
/// so that while range i streams, range i+1's answer is on its way or in; with ranges shorter
/// than a round trip two go per round trip, with longer ones the round trip is hidden).
///
/// Requests are counted against [`SourceSpec::requests`] when they are sent, so a request
/// sent ahead that turns out wasted costs one of the install's requests (and one of hawkBit's
/// action statuses): one that fails (its fault is the first failed attempt of its range,
/// retried with the backoff as any), one whose connection the server closed while it waited,
/// and the one dropped when the fetch ends early (the current range failed for good, or the
/// blocking stage went away). To keep that bounded:
///
/// - after a range that met any fault, or that a server answered with the whole artifact
///   (200: it ignores Range), the next range sends nothing ahead: nothing goes ahead again
///   until a range completed with 206 answers and without a fault. A server that ignores
///   Range is then asked one range at a time as before (at most one request was already on
///   its way when the first 200 came; its answer is read as any 200 for a range, from its
///   place in the whole body), and the bytes thrown away for it are bounded as before;
/// - a request sent ahead that fails while the range it overlapped went without a fault (the
///   server or a proxy does not take a second connection, or closes one that waits) turns
///   sending ahead off for the rest of the fetch.
///
/// So every wasted request sent ahead but one follows a fault of the range before it, and the
/// pipeline adds at most one request per fault of the serial fetch, plus one; the budget's
/// cap holds as before (a request sent ahead takes from it like any other). The first range's
/// successor goes with it: the delta probe's Range requests were just answered with 206.
struct Pipeline {
    on: bool,
    /// The last range completed without a fault.
    last_clean: bool,
}

impl Pipeline {
    fn new() -> Self {
        Pipeline {
            on: true,
            last_clean: true,
        }
    }

    fn may_send_ahead(&self) -> bool {
        self.on && self.last_clean
    }

    /// A range completed.
    fn finished(&mut self, handoff: &Handoff<'_>) {
        if handoff.ahead_faulted && self.last_clean {
            tracing::info!("a request sent ahead failed alone; fetching one range at a time");
            self.on = false;
        }
        self.last_clean = handoff.faults == 0 && !handoff.whole_body;
    }
}

/// Bytes `start..end` of the artifact, in memory, with the retries of [`fetch`].
pub struct RangeBytes {
    pub bytes: Vec<u8>,
    /// The server ignored the Range and answered with the whole artifact (200): the body was
    /// read up to `end`, the bytes before `start` skipped as they arrived, the rest dropped.
    pub range_ignored: bool,
}

/// Bytes `start..end` of the artifact, in memory (see [`RangeBytes`]).
pub async fn fetch_bytes(
    client: &reqwest::Client,
    spec: &SourceSpec,
    start: u64,
    end: u64,
    counters: &Counters,
) -> Result<RangeBytes, InstallError> {
    let mut out = Out::Buffer {
        bytes: Vec::with_capacity((end - start).min(1 << 20) as usize),
        whole_body: false,
    };
    let span = Span {
        start,
        end: Some(end),
        probed: true,
    };
    fetch_alone(client, spec, span, &mut out, counters).await?;
    match out {
        Out::Buffer { bytes, whole_body } => Ok(RangeBytes {
            bytes,
            range_ignored: whole_body,
        }),
        Out::Channel(_) => unreachable!("a buffer was passed"),
    }
}

/// Where received bytes go.
enum Out<'a> {
    Channel(&'a ChunkSender),
    Buffer {
        bytes: Vec<u8>,
        /// A request with a Range was answered with the whole artifact (200).
        whole_body: bool,
    },
}

impl Out<'_> {
    /// False when the blocking stage is gone.
    async fn send(&mut self, data: Bytes) -> bool {
        match self {
            Out::Channel(tx) => tx.send_data(data).await,
            Out::Buffer { bytes, .. } => {
                bytes.extend_from_slice(&data);
                true
            }
        }
    }

    fn saw_whole_body(&mut self) {
        if let Out::Buffer { whole_body, .. } = self {
            *whole_body = true;
        }
    }
}

/// The bytes one [`fetch_span`] downloads: from `start` to `end` (the artifact's end when
/// `None`).
#[derive(Clone, Copy)]
struct Span {
    start: u64,
    end: Option<u64>,
    /// The gzip trailer probe was done (or is not needed).
    probed: bool,
}

/// [`fetch_span`] of a download that is not part of a pipeline of ranges, at its own rate.
async fn fetch_alone(
    client: &reqwest::Client,
    spec: &SourceSpec,
    span: Span,
    out: &mut Out<'_>,
    counters: &Counters,
) -> Result<Done, InstallError> {
    let mut limiter = RateLimiter::new(spec.max_rate);
    let mut handoff = Handoff::default();
    fetch_span(
        client,
        spec,
        span,
        out,
        counters,
        &mut limiter,
        &mut handoff,
    )
    .await
}

async fn fetch_span(
    client: &reqwest::Client,
    spec: &SourceSpec,
    span: Span,
    out: &mut Out<'_>,
    counters: &Counters,
    limiter: &mut RateLimiter,
    handoff: &mut Handoff<'_>,
) -> Result<Done, InstallError> {
    let mut offset = span.start;
    let mut total = spec.size;
    let mut failures = 0u32;
    let mut probed = span.probed;
    let mut range_refused = RangeRefused::No;
    loop {
        let before = offset;
        let on_ahead = handoff.first.is_some();
        let mut link = Link {
            out: &mut *out,
            counters,
            limiter: &mut *limiter,
            probed: &mut probed,
            range_refused: &mut range_refused,
            end: span.end,
            handoff: &mut *handoff,
        };
        let result = fetch_once(client, spec, &mut offset, &mut total, &mut link).await;
        if result.is_err() {
            handoff.faults += 1;
            handoff.ahead_faulted |= on_ahead;
        }
        match result {
            Ok(done) => return Ok(done),
            Err(Fault::Permanent(e)) => return Err(e),
            Err(Fault::Transient {
                message,
                truncated,
                retry_after,
            }) => {
                if offset > before {
                    failures = 0; // progress: the fault budget is per stretch without progress
                }
                if offset - before >= PRODUCTIVE_CONNECTION_BYTES {
                    spec.requests.refund();
                }
                failures += 1;
                if failures > spec.retry.attempts {
                    return Err(match (truncated, total) {
                        (true, Some(expected)) => InstallError::Truncated {
                            url: spec.url.clone(),
                            received: offset,
                            expected,
                            attempts: failures,
                        },
                        _ => InstallError::Network {
                            url: spec.url.clone(),
                            offset,
                            attempts: failures,
                            message,
                        },
                    });
                }
                let backoff = spec.retry.schedule().wait(failures, retry_after);
                tracing::warn!(url = %spec.url, offset, attempt = failures, ?backoff, %message, "download interrupted; resuming");
                sleep(backoff).await;
            }
        }
    }
}

/// Where received bytes go, and state kept across connections.
struct Link<'a, 'o, 'h> {
    out: &'a mut Out<'o>,
    /// End of the span (exclusive); `None`: the artifact's end.
    end: Option<u64>,
    counters: &'a Counters,
    limiter: &'a mut RateLimiter,
    /// The gzip trailer probe was done (or is not needed).
    probed: &'a mut bool,
    /// A resume was answered 416 (the server's idea of the artifact and ours differ, or it
    /// dropped what the Range referred to): the next request asks for the whole body, once.
    range_refused: &'a mut RangeRefused,
    /// This range's part in the pipeline of [`fetch_ranges`].
    handoff: &'a mut Handoff<'h>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum RangeRefused {
    No,
    /// The next request goes without a Range (from byte 0, skipping what we have).
    RestartNext,
    /// The one restart has been used; another 416 is final.
    Restarted,
}

/// The ISIZE field (last 4 bytes) of a gzip artifact of `total` bytes, fetched with a Range
/// request; None when the server cannot tell (no Range support, error, timeout).
async fn probe_gzip_isize(client: &reqwest::Client, spec: &SourceSpec, total: u64) -> Option<u64> {
    if total < 18 || !spec.requests.take() {
        return None; // smaller than any gzip member, or no request left
    }
    let mut request = client
        .get(&spec.url)
        .header(RANGE, format!("bytes={}-{}", total - 4, total - 1));
    if let Some((name, value)) = &spec.auth_header {
        request = request.header(name.as_str(), value.as_str());
    }
    let wait = spec.stall_timeout.min(Duration::from_secs(10));
    let response = timeout(wait, request.send()).await.ok()?.ok()?;
    if response.status().as_u16() != 206 {
        return None;
    }
    let range = response
        .headers()
        .get(CONTENT_RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_content_range)?;
    if range != (total - 4, Some(total)) {
        return None;
    }
    let body = timeout(wait, response.bytes()).await.ok()?.ok()?;
    let bytes: [u8; 4] = body.as_ref().try_into().ok()?;
    Some(u64::from(u32::from_le_bytes(bytes)))
}

/// A fault worth another try, without `Retry-After`, before the end of a body.
fn transient(message: String) -> Fault {
    Fault::Transient {
        message,
        truncated: false,
        retry_after: None,
    }
}

/// Take a request from the install's budget and send it: GET of the artifact, with `range`
/// as its Range header if any; its answer once the headers are in (`offset`: where the
/// download stands, for the error).
async fn send(
    client: &reqwest::Client,
    spec: &SourceSpec,
    range: Option<String>,
    offset: u64,
) -> Sent {
    if !spec.requests.take() {
        return Err(Fault::Permanent(InstallError::TooManyRequests {
            url: spec.url.clone(),
            requests: spec.requests.used(),
            offset,
        }));
    }
    let mut request = client.get(&spec.url);
    if let Some((name, value)) = &spec.auth_header {
        request = request.header(name.as_str(), value.as_str());
    }
    if let Some(range) = range {
        request = request.header(RANGE, range);
    }
    match timeout(spec.stall_timeout, request.send()).await {
        Err(_) => Err(transient("no response".into())),
        Ok(Err(e)) => Err(transient(http_policy::describe(&e))),
        Ok(Ok(r)) => Ok(r),
    }
}

async fn fetch_once(
    client: &reqwest::Client,
    spec: &SourceSpec,
    offset: &mut u64,
    total: &mut Option<u64>,
    link: &mut Link<'_, '_, '_>,
) -> Result<Done, Fault> {
    let counters = link.counters;
    let size_mismatch = |expected: u64, actual: u64| {
        Fault::Permanent(InstallError::SizeMismatch {
            url: spec.url.clone(),
            expected,
            actual,
        })
    };
    if let Some(t) = link.end.or(*total) {
        if *offset >= t {
            return Ok(Done::Complete);
        }
    }
    let restart = *link.range_refused == RangeRefused::RestartNext;
    let range = if restart {
        *link.range_refused = RangeRefused::Restarted;
        None
    } else if let Some(end) = link.end {
        Some(format!("bytes={}-{}", *offset, end - 1))
    } else if *offset > 0 {
        Some(format!("bytes={}-", *offset))
    } else {
        None
    };
    // The first attempt of a range whose request went ahead (the same Range: it asked for
    // the whole range) takes its answer.
    let mut response = match link.handoff.first.take() {
        Some(ahead) => ahead.answer().await?,
        None => send(client, spec, range, *offset).await?,
    };
    let status = response.status().as_u16();
    // Bytes at the start of this body that we already have.
    let mut skip: u64;
    match status {
        206 => {
            let range = response
                .headers()
                .get(CONTENT_RANGE)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_content_range);
            let Some((range_start, range_total)) = range else {
                return Err(transient("206 without a usable Content-Range".into()));
            };
            if range_start > *offset {
                return Err(transient(format!(
                    "asked for bytes from {}, got from {range_start}",
                    *offset
                )));
            }
            skip = *offset - range_start;
            match (*total, range_total) {
                (Some(t), Some(rt)) if t != rt => return Err(size_mismatch(t, rt)),
                (None, Some(rt)) => *total = Some(rt),
                _ => {}
            }
        }
        200 => {
            // A full body (the server ignored or was not sent a Range).
            skip = *offset;
            if link.end.is_some() && !restart {
                link.out.saw_whole_body();
                link.handoff.whole_body = true;
                // A delta's ranges read that way each re-read the artifact from byte 0: at
                // most one artifact's worth of such bytes, then a retryable failure (the next
                // attempt's probe sees the 200 and downloads the whole artifact once).
                let limit = spec.size.or(*total).unwrap_or(u64::MAX);
                if !spec.requests.discard(skip, limit) {
                    return Err(Fault::Permanent(InstallError::Network {
                        url: spec.url.clone(),
                        offset: *offset,
                        attempts: 1,
                        message: "the server answers Range requests with the whole artifact; \
                                  reading each range from byte 0 would download it many times"
                            .into(),
                    }));
                }
            }
            match (*total, response.content_length()) {
                // A shorter body is handled like a dropped connection (resumed with Range).
                (Some(t), Some(cl)) if cl > t => return Err(size_mismatch(t, cl)),
                (None, Some(cl)) => *total = Some(cl),
                _ => {}
            }
        }
        416 if total.is_some_and(|t| *offset >= t) => return Ok(Done::Complete),
        416 if *link.range_refused == RangeRefused::No => {
            tracing::warn!(url = %spec.url, offset = *offset, "resume refused (416); restarting from byte 0 once");
            *link.range_refused = RangeRefused::RestartNext;
            return Err(transient(format!(
                "HTTP status 416 for bytes from {}",
                *offset
            )));
        }
        s if http_policy::is_transient_status(s) => {
            let retry_after = http_policy::retry_after(response.headers());
            return Err(Fault::Transient {
                message: format!("HTTP status {s}"),
                truncated: false,
                retry_after,
            });
        }
        s => {
            return Err(Fault::Permanent(InstallError::HttpStatus {
                url: spec.url.clone(),
                status: s,
            }))
        }
    }
    if let (Some(t), None) = (*total, link.end) {
        counters.total.store(t, Ordering::Release);
    }
    link.limiter.restart();
    loop {
        let mut chunk: Bytes = match timeout(spec.stall_timeout, response.chunk()).await {
            Err(_) => return Err(transient("the connection stalled".into())),
            Ok(Err(e)) => return Err(transient(http_policy::describe(&e))),
            Ok(Ok(None)) => break,
            Ok(Ok(Some(c))) => c,
        };
        if skip > 0 {
            let n = skip.min(chunk.len() as u64);
            chunk = chunk.slice(n as usize..);
            skip -= n;
        }
        if let Some(span_end) = link.end {
            // A server that ignored the Range sends more than the span.
            let room = span_end.saturating_sub(*offset);
            if (chunk.len() as u64) > room {
                chunk.truncate(room as usize);
            }
        }
        if chunk.is_empty() {
            if link.end.is_some_and(|e| *offset >= e) {
                return Ok(Done::Complete);
            }
            continue;
        }
        let end = *offset + chunk.len() as u64;
        if let Some(t) = *total {
            if end > t {
                return Err(size_mismatch(t, end));
            }
        }
        if !*link.probed {
            *link.probed = true;
            // A gzip image's decoded size is unknown before the end; its trailer gives a
            // lower bound, so an image that cannot fit fails before the first byte.
            if let (true, Some(t)) = (super::decode::is_gzip(&chunk), *total) {
                if let Some(isize) = probe_gzip_isize(client, spec, t).await {
                    counters.gzip_isize.store(isize, Ordering::Release);
                }
            }
        }
        let n = chunk.len();
        if !link.out.send(chunk).await {
            return Ok(Done::ReceiverGone);
        }
        *offset = end;
        counters.downloaded.fetch_add(n as u64, Ordering::Relaxed);
        link.limiter.consumed(n).await;
        if link.end == Some(end) {
            return Ok(Done::Complete);
        }
    }
    match link.end.or(*total) {
        Some(t) if *offset < t => Err(Fault::Transient {
            message: format!("body ended at byte {} of {t}", *offset),
            truncated: true,
            retry_after: None,
        }),
        _ => Ok(Done::Complete),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range() {
        assert_eq!(
            parse_content_range("bytes 10-99/100"),
            Some((10, Some(100)))
        );
        assert_eq!(parse_content_range("bytes 0-0/*"), Some((0, None)));
        assert_eq!(parse_content_range("items 0-1/2"), None);
        assert_eq!(parse_content_range("bytes x-1/2"), None);
    }
}

// ---- local files (`ddi-agent install FILE`) ---------------------------------------------------

/// A local image file, opened, with what the size guard needs before the first byte.
#[derive(Debug)]
pub struct LocalFile {
    pub file: tokio::fs::File,
    /// The file's length (the artifact size, as for a server's artifact).
    pub size: u64,
    /// A gzip file's trailer ISIZE (a lower bound of its decoded size).
    pub gzip_isize: Option<u64>,
}

/// Opens `path` for reading; a missing file, a directory or a device is refused by name.
pub async fn open_file(path: &std::path::Path) -> Result<LocalFile, InstallError> {
    let mut file = tokio::fs::File::open(path).await.map_err(|e| {
        InstallError::InvalidRequest(format!("cannot open {}: {e}", path.display()))
    })?;
    let meta = file.metadata().await.map_err(|e| {
        InstallError::InvalidRequest(format!("cannot read {}: {e}", path.display()))
    })?;
    if !meta.is_file() {
        return Err(InstallError::InvalidRequest(format!(
            "{} is not a regular file",
            path.display()
        )));
    }
    let gzip_isize = gzip_isize(&mut file).await?;
    Ok(LocalFile {
        file,
        size: meta.len(),
        gzip_isize,
    })
}

/// The ISIZE of a gzip file's trailer (a lower bound of its decoded size), so that an image
/// that cannot fit fails before the first byte, as for a download.
async fn gzip_isize(f: &mut tokio::fs::File) -> Result<Option<u64>, InstallError> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut head = [0u8; 2];
    let mut trailer = [0u8; 4];
    let found = f.read_exact(&mut head).await.is_ok()
        && crate::install::decode::is_gzip(&head)
        && f.seek(std::io::SeekFrom::End(-4)).await.is_ok()
        && f.read_exact(&mut trailer).await.is_ok();
    f.seek(std::io::SeekFrom::Start(0))
        .await
        .map_err(|e| InstallError::InvalidRequest(format!("reading the source: {e}")))?;
    Ok(found.then(|| u64::from(u32::from_le_bytes(trailer))))
}

const FILE_CHUNK: usize = 256 * 1024;

/// Streams a local file into the pipeline. Returns Ok also when the receiver went away (the
/// blocking stage reports why).
pub async fn feed_file(
    mut f: tokio::fs::File,
    tx: ChunkSender,
    counters: &Counters,
) -> Result<(), InstallError> {
    use tokio::io::AsyncReadExt;
    let mut done = 0u64;
    loop {
        let mut buf = vec![0u8; FILE_CHUNK];
        let n = f
            .read(&mut buf)
            .await
            .map_err(|e| InstallError::InvalidRequest(format!("reading the source: {e}")))?;
        if n == 0 {
            break;
        }
        buf.truncate(n);
        if !tx.send_data(Bytes::from(buf)).await {
            return Ok(());
        }
        done += n as u64;
        counters.downloaded.store(done, Ordering::Relaxed);
    }
    tx.send_end().await;
    Ok(())
}
