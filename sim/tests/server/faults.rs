//! Fault injection of the test server: status codes with Retry-After, dropped and truncated
//! downloads, slow links, wrong hashes, malformed JSON, Range ignored; per target or global,
//! counted, from the Nth request on; and the request log.

use crate::common::*;
use ddi_sim::{Assignment, Endpoint, Fault, FaultKind};
use std::time::{Duration, Instant};

#[test]
fn one_shot_503_with_retry_after_then_normal() {
    let e = env();
    e.server.add_fault(
        Fault::new(FaultKind::Status {
            code: 503,
            retry_after_secs: Some(7),
        })
        .once(),
    );
    let r = e.get("");
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "7");
    assert_eq!(r.text().unwrap(), "");
    assert_eq!(e.get("").status(), 200);
    assert!(
        e.server.faults().is_empty(),
        "a used one-shot fault is gone"
    );
}

#[test]
fn counted_429_only_for_one_target_and_endpoint() {
    let e = env();
    e.server.create_target("other", Some("o")).unwrap();
    e.server.add_fault(
        Fault::new(FaultKind::Status {
            code: 429,
            retry_after_secs: None,
        })
        .for_target(CID)
        .on(Endpoint::Poll)
        .times(2),
    );
    let other = || {
        e.http
            .get(e.server.controller_url("other"))
            .header("Authorization", "TargetToken o")
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(other(), 200);
    let id = e.deploy(b"x", &Assignment::forced());
    assert_eq!(
        e.get(&format!("/deploymentBase/{id}")).status(),
        200,
        "other endpoint unaffected"
    );
    assert_eq!(e.get("").status(), 429);
    assert_eq!(e.get("").status(), 429);
    assert_eq!(e.get("").status(), 200);
}

#[test]
fn dropped_download_breaks_the_body_after_n_bytes() {
    let e = env();
    let d = vec![7u8; 200_000];
    let id = e.deploy(&d, &Assignment::forced());
    let href = e.download_href(id);
    e.server
        .add_fault(Fault::new(FaultKind::DropAfter { bytes: 100_000 }).once());
    let mut r = e.auth(e.http.get(&href)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.headers()["content-length"],
        "200000",
        "the response promised everything"
    );
    let mut got = Vec::new();
    let res = std::io::Read::read_to_end(&mut r, &mut got);
    assert!(res.is_err(), "body must fail, got {} bytes", got.len());
    assert!(got.len() <= 100_000, "{}", got.len());
    // Resume works afterwards (on a fresh connection, as a client would after an error).
    let fresh = reqwest::blocking::Client::new();
    let r = e
        .auth(fresh.get(&href))
        .header("Range", format!("bytes={}-", got.len()))
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().unwrap().len(), d.len() - got.len());
}

#[test]
fn truncated_download_is_a_clean_short_response() {
    let e = env();
    let id = e.deploy(&[1u8; 5000], &Assignment::forced());
    let href = e.download_href(id);
    e.server
        .add_fault(Fault::new(FaultKind::Truncate { bytes: 1234 }).once());
    let r = e.auth(e.http.get(&href)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], "1234");
    assert_eq!(r.bytes().unwrap().len(), 1234);
    assert_eq!(
        e.auth(e.http.get(&href))
            .send()
            .unwrap()
            .bytes()
            .unwrap()
            .len(),
        5000
    );
}

#[test]
fn slow_link_limits_the_rate() {
    let e = env();
    let id = e.deploy(&[0u8; 40_000], &Assignment::forced());
    let href = e.download_href(id);
    e.server.add_fault(Fault::new(FaultKind::Slow {
        bytes_per_sec: 50_000,
    }));
    let t = Instant::now();
    let body = e.auth(e.http.get(&href)).send().unwrap().bytes().unwrap();
    assert_eq!(body.len(), 40_000);
    assert!(
        t.elapsed() >= Duration::from_millis(700),
        "{:?}",
        t.elapsed()
    );
    e.server.clear_faults();
    let t = Instant::now();
    e.auth(e.http.get(&href)).send().unwrap().bytes().unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn wrong_hash_is_advertised_once() {
    let e = env();
    let id = e.deploy(b"abc", &Assignment::forced());
    e.server.add_fault(Fault::new(FaultKind::WrongHash).once());
    let sha = |v: &serde_json::Value| {
        v["deployment"]["chunks"][0]["artifacts"][0]["hashes"]["sha256"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let wrong = sha(&e.get_json(&format!("/deploymentBase/{id}")));
    let right = sha(&e.get_json(&format!("/deploymentBase/{id}")));
    assert_eq!(
        right,
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_ne!(wrong, right);
    assert_eq!(wrong.len(), right.len());
}

#[test]
fn malformed_json_on_poll() {
    let e = env();
    e.server
        .add_fault(Fault::new(FaultKind::MalformedJson).once());
    let r = e.get("");
    assert_eq!(r.status(), 200);
    let text = r.text().unwrap();
    assert!(
        serde_json::from_str::<serde_json::Value>(&text).is_err(),
        "{text}"
    );
    assert!(e.poll().is_object());
}

#[test]
fn truncated_json_and_download_faults_on_chosen_endpoints() {
    let e = env();
    let id = e.deploy(b"abc", &Assignment::forced());
    e.server.add_fault(
        Fault::new(FaultKind::Truncate { bytes: 10 })
            .on(Endpoint::DeploymentBase)
            .once(),
    );
    let r = e.get(&format!("/deploymentBase/{id}"));
    assert_eq!(r.text().unwrap().len(), 10);
    e.server.add_fault(
        Fault::new(FaultKind::Status {
            code: 500,
            retry_after_secs: None,
        })
        .on(Endpoint::Download)
        .once(),
    );
    assert_eq!(e.get("").status(), 200);
    assert_eq!(
        e.auth(e.http.get(e.download_href(id)))
            .send()
            .unwrap()
            .status(),
        500
    );
}

#[test]
fn ignore_range_answers_200_with_the_whole_body() {
    let e = env();
    let d: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    let id = e.deploy(&d, &Assignment::forced());
    let href = e.download_href(id);
    let ranged = || {
        e.auth(e.http.get(&href))
            .header("Range", "bytes=4000-")
            .send()
            .unwrap()
    };
    e.server
        .add_fault(Fault::new(FaultKind::IgnoreRange).once());
    let r = ranged();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("content-range").is_none());
    assert_eq!(r.bytes().unwrap(), d, "the whole body from byte 0");
    // The mode ends with its uses: Range is honoured again.
    let r = ranged();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().unwrap(), d[4000..]);
}

#[test]
fn request_log_records_each_request_with_its_headers() {
    let e = env();
    let id = e.deploy(b"0123456789", &Assignment::forced());
    let href = e.download_href(id);
    // Logged before faults and authentication act: a refused request is there too.
    e.server.add_fault(
        Fault::new(FaultKind::Status {
            code: 503,
            retry_after_secs: None,
        })
        .on(Endpoint::Download)
        .once(),
    );
    assert_eq!(e.auth(e.http.get(&href)).send().unwrap().status(), 503);
    let r = e
        .auth(e.http.get(&href))
        .header("Range", "bytes=4-")
        .send()
        .unwrap();
    assert_eq!(r.status(), 206);
    let unauthenticated = e.http.get(e.url("")).send().unwrap();
    assert_eq!(unauthenticated.status(), 401);

    let log = e.server.requests();
    let downloads: Vec<_> = log
        .iter()
        .filter(|r| r.endpoint == Endpoint::Download)
        .collect();
    assert_eq!(downloads.len(), 2, "{log:?}");
    assert_eq!(downloads[0].header("Range"), None);
    assert_eq!(downloads[1].header("Range"), Some("bytes=4-"));
    for d in &downloads {
        assert_eq!(d.method, "GET");
        assert_eq!(d.controller_id, CID);
        assert_eq!(
            d.header("authorization"),
            Some(&*format!("TargetToken {TOKEN}"))
        );
        assert!(href.ends_with(&d.uri), "{} vs {href}", d.uri);
    }
    let last = log.last().unwrap();
    assert_eq!(last.endpoint, Endpoint::Poll);
    assert_eq!(last.header("Authorization"), None);
}

#[test]
fn a_fault_starts_at_the_request_after_the_ones_it_lets_through() {
    let e = env();
    e.server.add_fault(
        Fault::new(FaultKind::Status {
            code: 503,
            retry_after_secs: None,
        })
        .on(Endpoint::Poll)
        .after(2)
        .once(),
    );
    let id = e.deploy(b"x", &Assignment::forced());
    // Requests to other endpoints do not count.
    assert_eq!(e.get(&format!("/deploymentBase/{id}")).status(), 200);
    let polls: Vec<u16> = (0..4).map(|_| e.get("").status().as_u16()).collect();
    assert_eq!(polls, [200, 200, 503, 200]);
    assert!(e.server.faults().is_empty());
}

/// A truncation fault without a count cuts every answer, Range answers too (a server that ends
/// each answer after a few bytes); the request log holds each request with its answer's status
/// and announced length, and the download log is its view of the artifact requests.
#[test]
fn every_answer_is_cut_and_logged_with_its_status_and_length() {
    let e = env();
    let id = e.deploy(&[9u8; 5000], &Assignment::forced());
    let href = e.download_href(id);
    e.server
        .add_fault(Fault::new(FaultKind::Truncate { bytes: 3 }));
    let ranges = [None, Some("bytes=100-"), Some("bytes=4000-4999")];
    for range in ranges {
        let mut request = e.auth(e.http.get(&href));
        if let Some(range) = range {
            request = request.header("Range", range);
        }
        let r = request.send().unwrap();
        assert_eq!(r.status(), if range.is_some() { 206 } else { 200 });
        assert_eq!(r.headers()["content-length"], "3");
        assert_eq!(r.bytes().unwrap().len(), 3);
    }
    e.server.clear_faults();
    let r = e
        .auth(e.http.get(&href))
        .header("Range", "bytes=10-19")
        .send()
        .unwrap();
    assert_eq!(r.bytes().unwrap().len(), 10);
    assert_eq!(e.get("").status(), 200);

    let log = e.server.requests();
    let answered: Vec<_> = log
        .iter()
        .filter(|r| r.endpoint == Endpoint::Download)
        .map(|r| (r.status, r.body_len))
        .collect();
    assert_eq!(
        answered,
        [
            (Some(200), Some(3)),
            (Some(206), Some(3)),
            (Some(206), Some(3)),
            (Some(206), Some(10))
        ]
    );
    assert!(log.windows(2).all(|w| w[0].seq < w[1].seq), "{log:?}");
    let last = log.last().unwrap();
    assert_eq!((last.endpoint, last.status), (Endpoint::Poll, Some(200)));

    let downloads = e.server.download_log();
    let view: Vec<_> = downloads
        .iter()
        .map(|d| {
            (
                d.filename.as_str(),
                d.range.as_deref(),
                d.status,
                d.body_len,
            )
        })
        .collect();
    assert_eq!(
        view,
        [
            ("fw.bin", None, 200, Some(3)),
            ("fw.bin", Some("bytes=100-"), 206, Some(3)),
            ("fw.bin", Some("bytes=4000-4999"), 206, Some(3)),
            ("fw.bin", Some("bytes=10-19"), 206, Some(10)),
        ]
    );
    assert!(downloads.iter().all(|d| d.controller_id == CID));
    assert_eq!(
        downloads[1].log_line(),
        format!("download {CID} fw.bin range=bytes=100- status=206 body_len=3")
    );
}
