//! Fault injection of the test server: status codes with Retry-After, dropped and truncated
//! downloads, slow links, wrong hashes, malformed JSON; per target or global, counted.

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
