//! Root poll, authentication, content negotiation and ETag of the test server (spec §2-§4).

use crate::common::*;
use ddi_sim::{Assignment, HawkbitVersion, MaintenanceWindow, ServerOptions};
use std::time::Duration;

#[test]
fn idle_poll_has_only_the_sleep_and_configdata_until_attributes_are_sent() {
    let e = env();
    let body = e.poll();
    assert_eq!(body["config"]["polling"]["sleep"], "00:05:00");
    // A new target is asked for its attributes, nothing else.
    assert!(link(&body, "configData")
        .unwrap()
        .ends_with("/DEFAULT/controller/v1/dev-01/configData"));
    assert!(link(&body, "deploymentBase").is_none());
    let r = e.put("/configData", r#"{"data":{"hw":"2"}}"#);
    assert_eq!(r.status(), 200);
    let body = e.poll();
    assert!(body.get("_links").is_none(), "no work, no _links: {body}");
    assert_eq!(
        body,
        serde_json::json!({"config":{"polling":{"sleep":"00:05:00"}}})
    );
    assert!(e.server.target(CID).unwrap().target.last_poll_ms.is_some());
}

#[test]
fn links_are_absolute_urls_of_the_request_host() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    let body = e.poll();
    let href = link(&body, "deploymentBase").unwrap();
    let expected = format!(
        "{}/DEFAULT/controller/v1/dev-01/deploymentBase/{id}?c=",
        e.server.url()
    );
    assert!(href.starts_with(&expected), "{href}");
    assert!(href[expected.len()..].parse::<i32>().is_ok(), "{href}");
}

#[test]
fn missing_or_wrong_credentials_get_401_with_empty_body() {
    let e = env();
    let cases: Vec<Option<String>> = vec![
        None,
        Some("TargetToken wrong".into()),
        Some(format!("targettoken {TOKEN}")),
        Some(format!("TargetToken  {TOKEN}")),
        Some(format!("GatewayToken {TOKEN}")),
    ];
    for auth in cases {
        let mut rb = e.http.get(e.url(""));
        if let Some(a) = &auth {
            rb = rb.header("Authorization", a);
        }
        let r = rb.send().unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        assert!(r.headers().get("www-authenticate").is_none());
        assert_eq!(r.text().unwrap(), "", "{auth:?}");
    }
    // Unknown target with a TargetToken, other tenant, unknown sub-path: all 401 first.
    let r = e
        .http
        .get(e.server.controller_url("nobody"))
        .header("Authorization", format!("TargetToken {TOKEN}"))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    let url = format!("{}/OTHER/controller/v1/{CID}", e.server.url());
    assert_eq!(e.auth(e.http.get(url)).send().unwrap().status(), 401);
    assert_eq!(e.http.get(e.url("/nonsense")).send().unwrap().status(), 401);
    assert_eq!(e.get("/nonsense").status(), 404);
}

#[test]
fn gateway_token_authenticates_any_device_and_registers_it_on_poll() {
    let e = env_with(ServerOptions::default().gateway_token("gw-key"));
    let url = e.server.controller_url("new-device");
    // configData does not auto-register: unknown target is 404 there.
    let r = e
        .http
        .put(format!("{url}/configData"))
        .header("Authorization", "GatewayToken gw-key")
        .header("Content-Type", "application/json")
        .body(r#"{"data":{"a":"b"}}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(e.server.target("new-device").is_none());
    let r = e
        .http
        .get(&url)
        .header("Authorization", "GatewayToken gw-key")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(e.server.target("new-device").is_some());
    // The gateway key also works for a target that has its own token.
    let r = e
        .http
        .get(e.url(""))
        .header("Authorization", "GatewayToken gw-key")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = e
        .http
        .get(&url)
        .header("Authorization", "GatewayToken bad")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[test]
fn etag_and_if_none_match_give_304() {
    let e = env();
    let r = e.get("");
    let etag = r.headers()["etag"].to_str().unwrap().to_string();
    assert!(
        etag.starts_with("\"0") && etag.ends_with('"') && etag.len() == 35,
        "{etag}"
    );
    let r = e
        .auth(e.http.get(e.url("")))
        .header("If-None-Match", &etag)
        .send()
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(r.text().unwrap(), "");
    e.deploy(b"x", &Assignment::forced());
    let r = e
        .auth(e.http.get(e.url("")))
        .header("If-None-Match", &etag)
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "new work changes the body and the ETag");
}

#[test]
fn accept_header_selects_media_type_or_406() {
    let e = env();
    let ct = |accept: Option<&str>| {
        let mut rb = e.auth(e.http.get(e.url("")));
        if let Some(a) = accept {
            rb = rb.header("Accept", a);
        }
        let r = rb.send().unwrap();
        (
            r.status().as_u16(),
            r.headers()
                .get("content-type")
                .map(|v| v.to_str().unwrap().to_string()),
        )
    };
    assert_eq!(ct(None), (200, Some("application/hal+json".into())));
    assert_eq!(
        ct(Some("application/json")),
        (200, Some("application/json".into()))
    );
    assert_eq!(ct(Some("application/atom+xml")).0, 406);
}

#[test]
fn wrong_method_is_405_and_overlong_controller_id_is_400() {
    let e = env();
    let r = e.auth(e.http.delete(e.url(""))).send().unwrap();
    assert_eq!(r.status(), 405);
    let r = e.post("", "{}");
    assert_eq!(r.status(), 405);
    let long = "x".repeat(257);
    let r = e
        .http
        .get(e.server.controller_url(&long))
        .header("Authorization", "TargetToken t")
        .send()
        .unwrap();
    assert_eq!(r.status(), 400);
}

#[test]
fn long_intervals_are_iso_8601_since_0_10_and_capped_before() {
    let e = env_with(ServerOptions::default().polling(Duration::from_secs(36 * 3600 + 1800)));
    assert_eq!(e.poll()["config"]["polling"]["sleep"], "PT36H30M");
    let e = env_with(
        ServerOptions::default()
            .polling(Duration::from_secs(36 * 3600))
            .version("0.9.0".parse::<HawkbitVersion>().unwrap()),
    );
    assert_eq!(e.poll()["config"]["polling"]["sleep"], "23:59:59");
    e.server.set_polling(Duration::from_secs(65));
    assert_eq!(e.poll()["config"]["polling"]["sleep"], "00:01:05");
}

#[test]
fn sleep_shortens_before_a_maintenance_window() {
    let e = env();
    e.server.configure(|c| c.min_polling_ms = 1000);
    let start = ddi_sim::model::now_ms() + 600_000;
    let w = MaintenanceWindow {
        start_ms: start,
        duration_ms: 60_000,
        every_ms: None,
    };
    e.deploy(b"x", &Assignment::forced().with_maintenance(w));
    // 10 minutes to the window / 3 polls = ~3:20, capped by the normal 5 min.
    let sleep = e.poll()["config"]["polling"]["sleep"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        sleep.as_str() >= "00:03:19" && sleep.as_str() <= "00:03:20",
        "{sleep}"
    );
}

#[test]
fn lapsed_maintenance_schedule_cancels_the_action() {
    let e = env();
    let now = ddi_sim::model::now_ms();
    let w = MaintenanceWindow {
        start_ms: now,
        duration_ms: 300,
        every_ms: None,
    };
    let id = e.deploy(b"x", &Assignment::forced().with_maintenance(w));
    std::thread::sleep(Duration::from_millis(400));
    let body = e.poll();
    assert!(
        link(&body, "cancelAction")
            .unwrap()
            .ends_with(&format!("/cancelAction/{id}")),
        "{body}"
    );
}

#[test]
fn anonymous_access_exists_only_up_to_0_7() {
    let mut opts = ServerOptions::default().version("0.7.0".parse::<HawkbitVersion>().unwrap());
    opts.config.anonymous = true;
    let e = env_with(opts.clone());
    assert_eq!(e.http.get(e.url("")).send().unwrap().status(), 200);
    let e = env_with(opts.version(HawkbitVersion::HEAD));
    assert_eq!(e.http.get(e.url("")).send().unwrap().status(), 401);
}

#[test]
fn cbor_is_a_one_to_one_re_encoding_of_json() {
    use ddi_sim::cbor;
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    let r = e
        .auth(e.http.get(e.url("")))
        .header("Accept", "application/cbor")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/cbor");
    let body = cbor::decode(&r.bytes().unwrap()).unwrap();
    assert_eq!(body, e.poll());
    let feedback =
        serde_json::json!({"status": {"execution": "closed", "result": {"finished": "success"}}});
    let r = e
        .auth(
            e.http
                .post(e.url(&format!("/deploymentBase/{id}/feedback"))),
        )
        .header("Content-Type", "application/cbor")
        .body(cbor::encode(&feedback))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(e.server.feedback(id)[0].body, feedback);
    let r = e
        .auth(e.http.put(e.url("/configData")))
        .header("Content-Type", "application/cbor")
        .body(vec![0xa1, 0x61])
        .send()
        .unwrap();
    assert_eq!(r.status(), 400, "broken CBOR");
}

#[test]
fn proxy_certificate_headers_authenticate_per_version() {
    let mut opts = ServerOptions::default();
    opts.config.trusted_authorities = Some(vec!["Hawkbit".into(), "abc123".into()]);
    let e = env_with(opts.clone());
    let get = |headers: &[(&str, &str)], cid: &str| {
        let mut rb = e.http.get(e.server.controller_url(cid));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        rb.send().unwrap().status().as_u16()
    };
    assert_eq!(
        get(
            &[("X-Controller-Id", "proxied"), ("X-Authority-1", "hawkbit")],
            "proxied"
        ),
        200
    );
    assert!(e.server.target("proxied").is_some(), "plug and play");
    assert_eq!(
        get(
            &[("X-Controller-Id", "proxied"), ("X-Authority", "x; abc123")],
            "proxied"
        ),
        200
    );
    assert_eq!(
        get(
            &[("X-Controller-Id", "other"), ("X-Authority-1", "Hawkbit")],
            "proxied"
        ),
        401,
        "CN mismatch"
    );
    assert_eq!(
        get(
            &[("X-Controller-Id", "proxied"), ("X-Authority-1", "evil")],
            "proxied"
        ),
        401
    );
    assert_eq!(
        get(
            &[
                ("X-Ssl-Client-Cn", "proxied"),
                ("X-Ssl-Issuer-Hash-1", "Hawkbit")
            ],
            "proxied"
        ),
        401,
        "old names on 1.x"
    );
    let e = env_with(opts.version("0.10.0".parse::<HawkbitVersion>().unwrap()));
    let r = e
        .http
        .get(e.server.controller_url("old"))
        .header("X-Ssl-Client-Cn", "old")
        .header("X-Ssl-Issuer-Hash-1", "abc123")
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = e
        .http
        .get(e.server.controller_url("old"))
        .header("X-Ssl-Client-Cn", "old")
        .header("X-Ssl-Issuer-Hash-2", "abc123")
        .send()
        .unwrap();
    assert_eq!(
        r.status(),
        401,
        "indexes start at 1 and stop at the first gap"
    );
}

#[test]
fn one_target_can_poll_at_its_own_interval() {
    let e = env();
    e.server.create_target("fast", Some("f")).unwrap();
    e.server
        .set_target_polling("fast", Some(Duration::from_secs(2)))
        .unwrap();
    let poll_fast = || -> serde_json::Value {
        e.http
            .get(e.server.controller_url("fast"))
            .header("Authorization", "TargetToken f")
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    assert_eq!(poll_fast()["config"]["polling"]["sleep"], "00:00:02");
    assert_eq!(e.poll()["config"]["polling"]["sleep"], "00:05:00");
    e.server.set_target_polling("fast", None).unwrap();
    assert_eq!(poll_fast()["config"]["polling"]["sleep"], "00:05:00");
    assert!(e.server.set_target_polling("nobody", None).is_err());
}

#[test]
fn polling_deviation_gives_fractional_iso_intervals() {
    let e = env_with(ServerOptions::default().polling(Duration::from_secs(48 * 3600)));
    e.server.configure(|c| c.polling_deviation_pct = 10);
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let sleep = e.poll()["config"]["polling"]["sleep"]
            .as_str()
            .unwrap()
            .to_string();
        let d = ddi_sim::model::parse_interval(&sleep).unwrap();
        assert!(sleep.starts_with("PT"), "{sleep}");
        let secs = d.as_secs_f64();
        assert!(
            (48.0 * 3600.0 * 0.9..=48.0 * 3600.0 * 1.1).contains(&secs),
            "{sleep}"
        );
        seen.insert(sleep);
    }
    assert!(seen.len() > 1, "the interval varies: {seen:?}");
    assert!(
        seen.iter().any(|s| s.contains('.')),
        "ms granularity: {seen:?}"
    );
}

#[test]
fn the_poll_links_the_heaviest_active_action_then_the_oldest() {
    let e = env();
    let light = e.deploy(b"a", &Assignment::forced().with_weight(10));
    let heavy = e.deploy(b"b", &Assignment::forced().with_weight(500));
    let heavy_too = e.deploy(b"c", &Assignment::forced().with_weight(500));
    let href = link(&e.poll(), "deploymentBase").unwrap();
    assert!(
        href.contains(&format!("/deploymentBase/{heavy}?")),
        "weight first, then the lower id: {href}"
    );
    for (id, state) in [(light, true), (heavy_too, true)] {
        assert_eq!(
            e.server.action(id).unwrap().active,
            state,
            "multi-assignment keeps {id}"
        );
    }
    e.feedback(heavy, "closed", "success");
    let href = link(&e.poll(), "deploymentBase").unwrap();
    assert!(
        href.contains(&format!("/deploymentBase/{heavy_too}?")),
        "{href}"
    );
}
