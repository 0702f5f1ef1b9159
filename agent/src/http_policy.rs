//! When an HTTP failure is worth another try, and how long to wait first: one policy for the
//! DDI client ([`crate::ddi::client`]), the artifact downloads ([`crate::install::source`]) and
//! the service's cycle retries.
//!
//! - Transient: 408, 429, 500, 502, 503, 504, and hawkBit <= 0.9's 403 for an exceeded quota.
//!   Every other status is an answer (501 Not Implemented, 505, ... do not change on retry).
//! - `Retry-After` is read in both forms (delta-seconds and HTTP date) and honoured up to
//!   [`MAX_RETRY_AFTER`]; the wait is never shorter than the backoff, so `Retry-After: 0`
//!   does not make a tight loop.
//! - Backoff is exponential, capped, with +-25% jitter so that many devices behind one outage
//!   do not come back in step.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, RETRY_AFTER};

/// The longest `Retry-After` honoured for one retry.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// A status that says "try again later" rather than "no".
pub fn is_transient_status(status: u16) -> bool {
    matches!(status, 408 | 429 | 500 | 502 | 503 | 504)
}

/// [`is_transient_status`], or hawkBit <= 0.9's answer to an exceeded quota (403 naming the
/// quota; 429 since 0.10).
pub fn is_transient_answer(status: u16, body: &[u8]) -> bool {
    is_transient_status(status)
        || (status == 403 && String::from_utf8_lossy(body).contains("quota"))
}

/// hawkBit's answer to an exceeded entry quota (403 up to 0.9.x, 429 since 0.10.0, errorCode
/// `hawkbit.server.error.quota.tooManyEntries`): posting the same entry again never helps,
/// because the per-action status count only grows.
pub fn is_quota_exceeded(status: u16, body: &[u8]) -> bool {
    matches!(status, 403 | 429) && String::from_utf8_lossy(body).contains("quota.tooManyEntries")
}

/// The `Retry-After` of an answer, if it has a readable one.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    parse_retry_after(value, SystemTime::now())
}

/// `Retry-After`: delta-seconds, or an HTTP date (a past date is zero).
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = parse_http_date(value)?;
    let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
    Some(Duration::from_secs(when.saturating_sub(now)))
}

/// IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`) to seconds since the epoch.
fn parse_http_date(v: &str) -> Option<u64> {
    let parts: Vec<&str> = v.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: u64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as u64
        + 1;
    // An HTTP-date's year has four digits; anything else is garbage (and would overflow below).
    let year: i64 = parts[3].parse().ok().filter(|y| (0..=9999).contains(y))?;
    let hms: Vec<u64> = parts[4]
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    if hms.len() != 3 || !(1..=31).contains(&day) || hms[0] > 23 || hms[1] > 59 || hms[2] > 60 {
        return None;
    }
    // days from civil (H. Hinnant)
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400) as u64;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe as i64 - 719_468;
    let secs = days * 86400 + (hms[0] * 3600 + hms[1] * 60 + hms[2]) as i64;
    u64::try_from(secs).ok()
}

/// Exponential backoff: `first * 2^(attempt-1)`, capped at `max`, with +-25% jitter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    /// The delay before retrying after the `attempt`-th failure in a row (1-based), without
    /// jitter.
    pub fn nominal(&self, attempt: u32) -> Duration {
        let factor = 1u32 << attempt.saturating_sub(1).min(16);
        self.first.saturating_mul(factor).min(self.max)
    }

    /// [`Backoff::nominal`] with +-25% jitter.
    pub fn delay(&self, attempt: u32) -> Duration {
        self.delay_at(attempt, jitter_unit())
    }

    /// The delay for a jitter draw `unit` in `0.0..=1.0` (0 = -25%, 1 = +25%).
    fn delay_at(&self, attempt: u32, unit: f64) -> Duration {
        self.nominal(attempt)
            .mul_f64(0.75 + 0.5 * unit.clamp(0.0, 1.0))
    }

    /// How long to wait before the next try: the backoff, or the server's `Retry-After`
    /// (capped at [`MAX_RETRY_AFTER`]) when that is longer.
    pub fn wait(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let asked = retry_after.unwrap_or_default().min(MAX_RETRY_AFTER);
        self.delay(attempt).max(asked)
    }
}

/// A uniform draw from `0.0..=1.0`, good enough for jitter without another dependency.
pub fn jitter_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() % 1_000_001) as f64 / 1_000_000.0
}

/// A transport error for a log or a report: what kind of failure, then its causes (the
/// request's URL is left to the caller, which names it once).
pub fn describe(e: &reqwest::Error) -> String {
    use std::error::Error;
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else if e.is_body() || e.is_decode() {
        "reading the body failed".to_string()
    } else {
        "request failed".to_string()
    };
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_quota_answers_of_both_eras() {
        let body = br#"{"errorCode":"hawkbit.server.error.quota.tooManyEntries"}"#;
        assert!(is_quota_exceeded(403, body));
        assert!(is_quota_exceeded(429, body));
        assert!(!is_quota_exceeded(429, b""), "a plain 429 is rate limiting");
        assert!(!is_quota_exceeded(500, body));
    }

    #[test]
    fn transient_statuses() {
        for status in [408, 429, 500, 502, 503, 504] {
            assert!(is_transient_status(status), "{status}");
            assert!(is_transient_answer(status, b""), "{status}");
        }
        for status in [200, 301, 400, 401, 403, 404, 410, 416, 501, 505, 511] {
            assert!(!is_transient_status(status), "{status}");
        }
        assert!(!is_transient_answer(501, b"quota"));
        assert!(is_transient_answer(
            403,
            br#"{"errorCode":"hawkbit.server.error.quota.tooManyEntries"}"#
        ));
        assert!(!is_transient_answer(403, b"forbidden"));
        assert!(!is_transient_status(403));
    }

    /// Review: a server's Retry-After with an absurd year must be ignored, not overflow the
    /// date arithmetic (a panic in builds with overflow checks, a wrapped wait otherwise).
    #[test]
    fn retry_after_with_an_absurd_year_is_ignored() {
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        for value in [
            "Mon, 01 Jan 9223372036854775807 00:00:00 GMT",
            "Mon, 01 Feb -9223372036854775808 00:00:00 GMT",
            "Mon, 01 Jan 100000000000000 00:00:00 GMT",
        ] {
            assert_eq!(parse_retry_after(value, now), None, "{value}");
        }
    }

    #[test]
    fn retry_after_in_seconds_and_as_http_date() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:50:07 GMT", now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            parse_retry_after("Mon, 07 Nov 1994 08:49:37 GMT", now),
            Some(Duration::from_secs(86_400))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:36 GMT", now),
            Some(Duration::ZERO),
            "a past date means now"
        );
        assert_eq!(parse_http_date("Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(
            parse_http_date("Tue, 29 Feb 2000 12:00:00 GMT"),
            Some(951_825_600)
        );
        for bad in [
            "soon",
            "-1",
            "Sun, 06 Nov 1994 08:49:37 CET",
            "Sun, 06 Foo 1994 08:49:37 GMT",
            "Sun, 06 Nov 1994 08:49 GMT",
            "Sun, 06 Nov 1994 25:00:00 GMT",
        ] {
            assert_eq!(parse_retry_after(bad, now), None, "{bad}");
        }
        let mut headers = HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert(RETRY_AFTER, "7".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(7)));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap_with_a_quarter_of_jitter() {
        let b = Backoff {
            first: Duration::from_millis(100),
            max: Duration::from_millis(350),
        };
        assert_eq!(b.nominal(1), Duration::from_millis(100));
        assert_eq!(b.nominal(2), Duration::from_millis(200));
        assert_eq!(b.nominal(3), Duration::from_millis(350));
        assert_eq!(b.nominal(u32::MAX), Duration::from_millis(350));
        assert_eq!(b.delay_at(2, 0.0), Duration::from_millis(150));
        assert_eq!(b.delay_at(2, 0.5), Duration::from_millis(200));
        assert_eq!(b.delay_at(2, 1.0), Duration::from_millis(250));
        let draws: Vec<Duration> = (0..50).map(|_| b.delay(2)).collect();
        assert!(draws
            .iter()
            .all(|d| (150..=250).contains(&(d.as_millis() as u64))));
        assert!(
            draws.iter().any(|d| *d != draws[0]),
            "no jitter in {draws:?}"
        );
    }

    #[test]
    fn the_wait_honours_retry_after_within_the_cap_and_never_undercuts_the_backoff() {
        let b = Backoff {
            first: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        let w = b.wait(1, None);
        assert!(w >= Duration::from_millis(750) && w <= Duration::from_millis(1250));
        assert_eq!(
            b.wait(1, Some(Duration::from_secs(20))),
            Duration::from_secs(20)
        );
        assert_eq!(b.wait(1, Some(Duration::from_secs(3600))), MAX_RETRY_AFTER);
        assert!(b.wait(1, Some(Duration::ZERO)) >= Duration::from_millis(750));
    }

    #[test]
    fn jitter_draws_stay_in_the_unit_interval() {
        for _ in 0..100 {
            assert!((0.0..=1.0).contains(&jitter_unit()));
        }
    }
}
