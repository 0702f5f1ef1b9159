//! Artifact download as hawkBit's FileStreamingUtil does it (Range with 206/416 and multipart,
//! `If-Match` 412, `If-Range`, ETag per version, MD5SUM files), streamed from memory or disk in
//! chunks so that GiB artifacts never sit in memory; plus the body faults (drop after N bytes,
//! slow rate, truncation) for downloads and JSON bodies alike, and Range ignored as by a proxy
//! without Range support.

use super::ddi::{empty, error_response, percent_decode};
use super::faults::{Endpoint, Triggered};
use super::model::{now_ms, ArtifactSource, DdiError, RequestRecord};
use super::Shared;
use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncSeekExt};

const CHUNK: usize = 64 * 1024;
const BOUNDARY: &str = "THIS_STRING_SEPARATES_MULTIPART";

/// A piece of a response body.
#[derive(Clone, Debug)]
enum Piece {
    Literal(Bytes),
    /// `len` bytes of the artifact from `start`.
    Range {
        start: u64,
        len: u64,
    },
}

struct Streamer {
    pieces: VecDeque<Piece>,
    source: Option<ArtifactSource>,
    file: Option<tokio::fs::File>,
    sent: u64,
    /// Abort the connection once this many bytes went out.
    drop_after: Option<u64>,
    /// Stop cleanly after this many bytes.
    truncate: Option<u64>,
    rate: Option<u64>,
    started: Instant,
}

impl Streamer {
    async fn next_chunk(&mut self) -> Option<Result<Bytes, std::io::Error>> {
        // Slow links send about ten chunks a second instead of rare 64 KiB bursts.
        let mut budget = match self.rate {
            Some(rate) => (rate / 10).clamp(1, CHUNK as u64),
            None => CHUNK as u64,
        };
        if let Some(t) = self.truncate {
            budget = budget.min(t.saturating_sub(self.sent));
        }
        if let Some(d) = self.drop_after {
            if self.sent >= d {
                // Pause first so that hyper flushes what was sent; then abort the connection.
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Some(Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "fault injection: download dropped",
                )));
            }
            budget = budget.min(d - self.sent);
        }
        if budget == 0 {
            return None;
        }
        let chunk = loop {
            let piece = self.pieces.front_mut()?;
            match piece {
                Piece::Literal(b) if b.is_empty() => {
                    self.pieces.pop_front();
                }
                Piece::Literal(b) => {
                    let n = (b.len() as u64).min(budget) as usize;
                    break b.split_to(n);
                }
                Piece::Range { len: 0, .. } => {
                    self.pieces.pop_front();
                    self.file = None;
                }
                Piece::Range { start, len } => {
                    let n = (*len).min(budget);
                    let data = match &self.source {
                        Some(ArtifactSource::Memory(m)) => {
                            m.slice(*start as usize..(*start + n) as usize)
                        }
                        Some(ArtifactSource::File(path)) => {
                            if self.file.is_none() {
                                let mut f = match tokio::fs::File::open(path).await {
                                    Ok(f) => f,
                                    Err(e) => return Some(Err(e)),
                                };
                                if let Err(e) = f.seek(std::io::SeekFrom::Start(*start)).await {
                                    return Some(Err(e));
                                }
                                self.file = Some(f);
                            }
                            let f = self.file.as_mut().expect("opened above");
                            let mut buf = vec![0u8; n as usize];
                            if let Err(e) = f.read_exact(&mut buf).await {
                                return Some(Err(e));
                            }
                            Bytes::from(buf)
                        }
                        None => Bytes::new(),
                    };
                    *start += n;
                    *len -= n;
                    break data;
                }
            }
        };
        self.sent += chunk.len() as u64;
        if let Some(rate) = self.rate {
            let due = self.started + Duration::from_secs_f64(self.sent as f64 / rate as f64);
            tokio::time::sleep_until(due.into()).await;
        }
        Some(Ok(chunk))
    }
}

fn stream_body(pieces: Vec<Piece>, source: Option<ArtifactSource>, faults: &Triggered) -> Body {
    let streamer = Streamer {
        pieces: pieces.into(),
        source,
        file: None,
        sent: 0,
        drop_after: faults.drop_after,
        truncate: faults.truncate,
        rate: faults.slow,
        started: Instant::now(),
    };
    let stream = futures_util::stream::unfold(streamer, |mut s| async move {
        let item = s.next_chunk().await?;
        Some((item, s))
    });
    Body::from_stream(stream)
}

/// A 200 response of `body` with Content-Length, subject to the body faults.
pub fn body_response(body: Bytes, faults: &Triggered) -> Response {
    let len = body.len() as u64;
    response_of(
        StatusCode::OK,
        vec![Piece::Literal(body)],
        Some(len),
        None,
        faults,
    )
}

fn response_of(
    status: StatusCode,
    pieces: Vec<Piece>,
    len: Option<u64>,
    source: Option<ArtifactSource>,
    faults: &Triggered,
) -> Response {
    let mut r = Response::new(stream_body(pieces, source, faults));
    *r.status_mut() = status;
    // A truncation fault sends a clean, shorter response: its Content-Length matches the cut.
    let len = match (len, faults.truncate) {
        (Some(l), Some(t)) => Some(l.min(t)),
        (l, _) => l,
    };
    if let Some(l) = len {
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(l));
    }
    r
}

/// A parsed `Range` header: sorted, inclusive ranges; Err = 416.
fn parse_ranges(header: &str, size: u64) -> Result<Vec<(u64, u64)>, ()> {
    let spec = header.strip_prefix("bytes=").ok_or(())?;
    let mut out = Vec::new();
    for part in spec.split(',') {
        let (a, b) = part.split_once('-').ok_or(())?;
        if !a.chars().all(|c| c.is_ascii_digit()) || !b.chars().all(|c| c.is_ascii_digit()) {
            return Err(());
        }
        let (start, end) = match (a.is_empty(), b.is_empty()) {
            (true, true) => return Err(()),
            (true, false) => {
                let n: u64 = b.parse().map_err(|_| ())?;
                (size.saturating_sub(n), size.saturating_sub(1))
            }
            (false, true) => (a.parse().map_err(|_| ())?, size.saturating_sub(1)),
            (false, false) => {
                let e: u64 = b.parse().map_err(|_| ())?;
                (a.parse().map_err(|_| ())?, e.min(size.saturating_sub(1)))
            }
        };
        if size == 0 || start >= size || start > end {
            return Err(());
        }
        out.push((start, end));
    }
    out.sort();
    for w in out.windows(2) {
        if w[1].0 <= w[0].1 {
            return Err(());
        }
    }
    Ok(out)
}

/// RFC 1123 date (`Sun, 06 Nov 1994 08:49:37 GMT`) of epoch milliseconds.
pub fn http_date(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    const WD: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        WD[days.rem_euclid(7) as usize],
        d,
        MON[(m - 1) as usize],
        y,
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Parses an RFC 1123 date to epoch seconds.
pub fn parse_http_date(s: &str) -> Option<i64> {
    let p: Vec<&str> = s.split_whitespace().collect();
    if p.len() != 6 || p[5] != "GMT" {
        return None;
    }
    const MON: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let d: i64 = p[1].parse().ok()?;
    let m = MON.iter().position(|x| *x == p[2])? as i64 + 1;
    let y: i64 = p[3].parse().ok()?;
    let t: Vec<i64> = p[4]
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if t.len() != 3 {
        return None;
    }
    Some(days_from_civil(y, m, d) * 86400 + t[0] * 3600 + t[1] * 60 + t[2])
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// `attachment;filename=...` per version (quoted and truncated to 78 chars since 0.10.0).
fn content_disposition(filename: &str, quoted: bool) -> String {
    if !quoted {
        return format!("attachment;filename={filename}");
    }
    let name: String = filename.chars().take(78).collect();
    let special = name
        .chars()
        .any(|c| "()<>@,;:\\\"/[]?=".contains(c) || c.is_whitespace() || c.is_control());
    if special {
        let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
        format!("attachment;filename=\"{escaped}\"")
    } else {
        format!("attachment;filename={name}")
    }
}

fn header_str(h: &HeaderMap, name: header::HeaderName) -> Option<&str> {
    h.get(name).and_then(|v| v.to_str().ok())
}

fn set(r: &mut Response, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        r.headers_mut().insert(name, v);
    }
}

/// One artifact request as the server answered it: a view of a [`RequestRecord`] of the
/// download endpoint (see [`crate::TestServer::download_log`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DownloadRequest {
    pub controller_id: String,
    pub filename: String,
    /// The request's `Range` header.
    pub range: Option<String>,
    pub status: u16,
    /// The body's announced length (`Content-Length`; none for multipart bodies).
    pub body_len: Option<u64>,
}

impl DownloadRequest {
    /// The view of an answered artifact (or `.MD5SUM`) request; None for anything else.
    pub fn of(record: &RequestRecord) -> Option<DownloadRequest> {
        if record.endpoint != Endpoint::Download {
            return None;
        }
        let path = record.uri.split('?').next().unwrap_or_default();
        Some(DownloadRequest {
            controller_id: record.controller_id.clone(),
            filename: percent_decode(path.rsplit('/').next().unwrap_or_default()),
            range: record.header("range").map(str::to_string),
            status: record.status?,
            body_len: record.body_len,
        })
    }

    /// The server log line a benchmark counts bytes and requests by (bench/delta_install.py).
    pub fn log_line(&self) -> String {
        format!(
            "download {} {} range={} status={} body_len={}",
            self.controller_id,
            self.filename,
            self.range.as_deref().unwrap_or("-"),
            self.status,
            self.body_len.map_or("-".to_string(), |n| n.to_string()),
        )
    }
}

/// GET `softwaremodules/{module}/artifacts/{filename}` (or `{filename}.MD5SUM`).
pub async fn artifact(
    shared: &Arc<Shared>,
    controller_id: &str,
    module: u64,
    filename: &str,
    headers: &HeaderMap,
    uri: &str,
    faults: &Triggered,
) -> Response {
    // A proxy without Range support (the IgnoreRange fault) forwards the request without it.
    let range_header = header_str(headers, header::RANGE)
        .filter(|_| !faults.ignore_range)
        .map(str::to_string);
    let now = now_ms();
    let (artifact, md5sum, version) = {
        let st = shared.lock();
        let version = st.config.version;
        let not_found = |kind: &'static str, id: String| {
            error_response(&DdiError::EntityNotFound { kind, id }, version)
        };
        if !st.targets.contains_key(controller_id) {
            return not_found("Target", controller_id.to_string());
        }
        if !st.modules.contains_key(&module) {
            return not_found("SoftwareModule", module.to_string());
        }
        let (artifact, md5sum) = match st.artifact(module, filename) {
            Some(a) => (a.clone(), false),
            None => match filename
                .strip_suffix(".MD5SUM")
                .and_then(|f| st.artifact(module, f))
            {
                Some(a) => (a.clone(), true),
                // hawkBit answers a module without this file with a bare `notFound()`.
                None => return error_response(&DdiError::NotFound, version),
            },
        };
        let is_range = range_header.is_some() && !md5sum;
        if !st.download_allowed(controller_id, module, is_range) {
            return not_found("SoftwareModule", module.to_string());
        }
        (artifact, md5sum, version)
    };

    let log =
        |shared: &Arc<Shared>| shared.update(|st| st.log_download(controller_id, module, uri, now));

    if md5sum {
        if let Err(e) = log(shared) {
            return error_response(&e, version);
        }
        let body = format!("{}  {}", artifact.md5, artifact.filename);
        let mut r = body_response(Bytes::from(body), faults);
        set(&mut r, header::CONTENT_TYPE, "text/plain");
        set(
            &mut r,
            header::CONTENT_DISPOSITION,
            &format!("attachment;filename={}.MD5SUM", artifact.filename),
        );
        return r;
    }

    let etag = if version.quoted_artifact_etag() {
        format!("\"{}\"", artifact.sha1)
    } else {
        artifact.sha1.clone()
    };
    if let Some(if_match) = header_str(headers, header::IF_MATCH) {
        // hawkBit compares against the *bare* sha1 (a quoted value never matches).
        let ok = if_match
            .split(',')
            .map(str::trim)
            .any(|v| v == "*" || v == artifact.sha1);
        if !ok {
            return empty(StatusCode::PRECONDITION_FAILED);
        }
    }
    let size = artifact.size;
    let mut ranges = match &range_header {
        Some(h) => match parse_ranges(h.trim(), size) {
            Ok(r) => Some(r),
            Err(()) => {
                let mut r = empty(StatusCode::RANGE_NOT_SATISFIABLE);
                set(&mut r, header::CONTENT_RANGE, &format!("bytes */{size}"));
                return r;
            }
        },
        None => None,
    };
    if let (Some(if_range), Some(_)) = (header_str(headers, header::IF_RANGE), &ranges) {
        let fresh = if_range == etag
            || parse_http_date(if_range).is_some_and(|t| t >= artifact.created_ms.div_euclid(1000));
        if !fresh {
            ranges = None;
        }
    }
    if ranges.is_none() || version.logs_range_downloads() {
        if let Err(e) = log(shared) {
            return error_response(&e, version);
        }
    }
    let source = Some(artifact.source.clone());
    let mut r = match ranges {
        None => response_of(
            StatusCode::OK,
            vec![Piece::Range {
                start: 0,
                len: size,
            }],
            Some(size),
            source,
            faults,
        ),
        Some(rs) if rs.len() == 1 => {
            let (a, b) = rs[0];
            let mut r = response_of(
                StatusCode::PARTIAL_CONTENT,
                vec![Piece::Range {
                    start: a,
                    len: b - a + 1,
                }],
                Some(b - a + 1),
                source,
                faults,
            );
            set(
                &mut r,
                header::CONTENT_RANGE,
                &format!("bytes {a}-{b}/{size}"),
            );
            r
        }
        Some(rs) => {
            let mut pieces = Vec::new();
            for (i, (a, b)) in rs.iter().enumerate() {
                let sep = if i == 0 { "" } else { "\r\n" };
                pieces.push(Piece::Literal(Bytes::from(format!(
                    "{sep}--{BOUNDARY}\r\nContent-Type: application/octet-stream\r\nContent-Range: bytes {a}-{b}/{size}\r\n\r\n"
                ))));
                pieces.push(Piece::Range {
                    start: *a,
                    len: b - a + 1,
                });
            }
            pieces.push(Piece::Literal(Bytes::from(format!("\r\n--{BOUNDARY}--"))));
            let mut r = response_of(StatusCode::PARTIAL_CONTENT, pieces, None, source, faults);
            set(
                &mut r,
                header::CONTENT_TYPE,
                &format!("multipart/byteranges; boundary={BOUNDARY}"),
            );
            r
        }
    };
    if !r.headers().contains_key(header::CONTENT_TYPE) {
        set(&mut r, header::CONTENT_TYPE, "application/octet-stream");
    }
    set(&mut r, header::ACCEPT_RANGES, "bytes");
    set(&mut r, header::ETAG, &etag);
    set(
        &mut r,
        header::LAST_MODIFIED,
        &http_date(artifact.created_ms),
    );
    set(
        &mut r,
        header::CONTENT_DISPOSITION,
        &content_disposition(&artifact.filename, version.quoted_content_disposition()),
    );
    set(
        &mut r,
        header::HeaderName::from_static("x-content-type-options"),
        "nosniff",
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_like_hawkbit() {
        assert_eq!(parse_ranges("bytes=0-9", 100), Ok(vec![(0, 9)]));
        assert_eq!(parse_ranges("bytes=90-", 100), Ok(vec![(90, 99)]));
        assert_eq!(parse_ranges("bytes=-10", 100), Ok(vec![(90, 99)]));
        assert_eq!(parse_ranges("bytes=95-200", 100), Ok(vec![(95, 99)]));
        assert_eq!(
            parse_ranges("bytes=50-59,0-9", 100),
            Ok(vec![(0, 9), (50, 59)])
        );
        assert!(parse_ranges("bytes=100-", 100).is_err());
        assert!(parse_ranges("bytes=9-5", 100).is_err());
        assert!(parse_ranges("bytes=0-10,5-20", 100).is_err());
        assert!(parse_ranges("items=0-1", 100).is_err());
    }

    #[test]
    fn http_dates_round_trip() {
        assert_eq!(http_date(784_111_777_000), "Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777)
        );
    }

    #[test]
    fn content_disposition_quotes_since_0_10() {
        assert_eq!(
            content_disposition("a b.bin", false),
            "attachment;filename=a b.bin"
        );
        assert_eq!(
            content_disposition("a b.bin", true),
            "attachment;filename=\"a b.bin\""
        );
        assert_eq!(
            content_disposition("plain.bin", true),
            "attachment;filename=plain.bin"
        );
    }
}
