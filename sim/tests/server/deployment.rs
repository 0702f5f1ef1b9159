//! deploymentBase and its feedback on the test server (spec §5, §6, §13, §14).

use crate::common::*;
use ddi_sim::model::now_ms;
use ddi_sim::{ActionStatus, Assignment, HawkbitVersion, MaintenanceWindow, ServerOptions};
use serde_json::Value;

fn modes(e: &Env, id: u64) -> (String, String, Option<String>) {
    let d = e.get_json(&format!("/deploymentBase/{id}"));
    let dep = &d["deployment"];
    (
        dep["download"].as_str().unwrap().into(),
        dep["update"].as_str().unwrap().into(),
        dep["maintenanceWindow"].as_str().map(str::to_string),
    )
}

#[test]
fn deployment_base_describes_chunks_artifacts_hashes_and_links() {
    let e = env();
    let data = b"hello firmware".to_vec();
    let id = e.deploy(&data, &Assignment::forced());
    let d = e.get_json(&format!("/deploymentBase/{id}?c=123"));
    assert_eq!(d["id"], Value::String(id.to_string()), "ids are strings");
    let chunk = &d["deployment"]["chunks"][0];
    assert_eq!(chunk["part"], "os");
    assert_eq!(chunk["version"], "1.0");
    assert_eq!(chunk["name"], "firmware");
    let a = &chunk["artifacts"][0];
    assert_eq!(a["filename"], "fw.bin");
    assert_eq!(a["size"], data.len());
    use sha2::Digest;
    assert_eq!(
        a["hashes"]["sha256"],
        hex::encode(sha2::Sha256::digest(&data))
    );
    assert_eq!(a["hashes"]["sha1"], hex::encode(sha1::Sha1::digest(&data)));
    assert_eq!(a["hashes"]["md5"], hex::encode(md5::Md5::digest(&data)));
    let href = a["_links"]["download-http"]["href"].as_str().unwrap();
    assert!(
        href.starts_with(&e.server.url()) && href.ends_with("/artifacts/fw.bin"),
        "{href}"
    );
    assert!(a["_links"]["md5sum-http"]["href"]
        .as_str()
        .unwrap()
        .ends_with("fw.bin.MD5SUM"));
    assert!(
        a["_links"].get("download").is_none(),
        "download rel only when configured"
    );
    assert!(d["deployment"].get("maintenanceWindow").is_none());
    assert!(d.get("actionHistory").is_none(), "no history unless asked");
    assert!(d.get("_links").is_none());
}

#[test]
fn download_link_is_advertised_under_the_configured_host() {
    let e = env();
    e.server
        .configure(|c| c.download_link_host = Some("localhost".into()));
    let id = e.deploy(b"abc", &Assignment::forced());
    let d = e.get_json(&format!("/deploymentBase/{id}"));
    let links = &d["deployment"]["chunks"][0]["artifacts"][0]["_links"];
    let href = links["download"]["href"].as_str().unwrap();
    let port = e.server.addr().port();
    assert!(
        href.starts_with(&format!("http://localhost:{port}/DEFAULT/")),
        "{href}"
    );
    assert!(links["download-http"]["href"]
        .as_str()
        .unwrap()
        .starts_with("http://127.0.0.1:"));
    // Same server: the link works.
    let r = e.auth(e.http.get(href)).send().unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().unwrap().as_ref(), b"abc");
}

#[test]
fn action_types_map_to_download_and_update_modes() {
    let e = env();
    let f = e.deploy(b"x", &Assignment::forced());
    assert_eq!(modes(&e, f), ("forced".into(), "forced".into(), None));
    let s = e.deploy(b"x", &Assignment::soft());
    assert_eq!(modes(&e, s), ("attempt".into(), "attempt".into(), None));
    let later = e.deploy(b"x", &Assignment::time_forced(now_ms() + 3_600_000));
    assert_eq!(modes(&e, later), ("attempt".into(), "attempt".into(), None));
    let past = e.deploy(b"x", &Assignment::time_forced(now_ms() - 1));
    assert_eq!(modes(&e, past), ("forced".into(), "forced".into(), None));
    let d = e.deploy(b"x", &Assignment::download_only());
    assert_eq!(modes(&e, d), ("forced".into(), "skip".into(), None));
    let closed = MaintenanceWindow {
        start_ms: now_ms() + 3_600_000,
        duration_ms: 60_000,
        every_ms: None,
    };
    let m = e.deploy(b"x", &Assignment::forced().with_maintenance(closed));
    assert_eq!(
        modes(&e, m),
        ("forced".into(), "skip".into(), Some("unavailable".into()))
    );
    let open = MaintenanceWindow {
        start_ms: now_ms() - 1000,
        duration_ms: 3_600_000,
        every_ms: None,
    };
    let m = e.deploy(b"x", &Assignment::soft().with_maintenance(open));
    assert_eq!(
        modes(&e, m),
        ("attempt".into(), "attempt".into(), Some("available".into()))
    );
}

#[test]
fn timeforced_switch_changes_the_poll_link() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::time_forced(now_ms() + 300));
    let before = link(&e.poll(), "deploymentBase").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(400));
    let after = link(&e.poll(), "deploymentBase").unwrap();
    assert_ne!(before, after, "c= changes when the action becomes forced");
    assert!(after.contains(&format!("/deploymentBase/{id}?c=")));
}

#[test]
fn retrieval_is_registered_once_and_history_is_newest_first() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    e.get(&format!("/deploymentBase/{id}"));
    e.get(&format!("/deploymentBase/{id}"));
    let a = e.server.action(id).unwrap();
    assert_eq!(a.status, ActionStatus::Retrieved);
    assert_eq!(
        a.history
            .iter()
            .filter(|h| h.status == ActionStatus::Retrieved)
            .count(),
        1
    );
    for msg in ["one", "two", "three"] {
        let r = e.post(
            &format!("/deploymentBase/{id}/feedback"),
            &format!(r#"{{"status":{{"execution":"proceeding","result":{{"finished":"none"}},"details":["{msg}"]}}}}"#),
        );
        assert_eq!(r.status(), 200);
    }
    let d = e.get_json(&format!("/deploymentBase/{id}?actionHistory=2"));
    // Intermediate feedback leaves the action status unchanged (spec §14).
    assert_eq!(d["actionHistory"]["status"], "RETRIEVED");
    assert_eq!(
        d["actionHistory"]["messages"],
        serde_json::json!(["three", "two"])
    );
    let d = e.get_json(&format!("/deploymentBase/{id}?actionHistory=-1"));
    let all: Vec<String> = serde_json::from_value(d["actionHistory"]["messages"].clone()).unwrap();
    assert_eq!(all.len(), 4, "{all:?}");
    assert!(all.iter().all(|m| !m.starts_with("Update Server: ")));
    assert_eq!(all[3], "Assignment initiated by user 'ddi-sim'");
}

#[test]
fn closed_success_finishes_and_further_feedback_is_410() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    assert_eq!(e.feedback(id, "proceeding", "none").status(), 200);
    assert_eq!(e.feedback(id, "rejected", "none").status(), 200);
    assert_eq!(e.feedback(id, "canceled", "none").status(), 200);
    assert!(e.server.action(id).unwrap().active, "only closed closes");
    let r = e.feedback(id, "closed", "success");
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().unwrap(), "");
    let a = e.server.action(id).unwrap();
    assert_eq!(
        (a.status, a.active, a.result()),
        (ActionStatus::Finished, false, Some("success"))
    );
    assert_eq!(a.feedback.len(), 4);
    let r = e.feedback(id, "closed", "success");
    assert_eq!(r.status(), 410);
    assert_eq!(r.text().unwrap(), "");
    assert_eq!(e.feedback(id, "proceeding", "none").status(), 410);
    // Shown as installedBase, and still readable after closing (hawkBit does not check; see
    // config::fetching_a_closed_deployment_again_records_retrieved_and_drops_installed_base).
    let body = e.poll();
    assert_eq!(e.get(&format!("/deploymentBase/{id}")).status(), 200);
    assert!(link(&body, "installedBase")
        .unwrap()
        .ends_with(&format!("/installedBase/{id}")));
    assert!(link(&body, "deploymentBase").is_none());
    assert!(
        link(&body, "configData").is_some(),
        "attributes are requested after a success"
    );
}

#[test]
fn closed_failure_is_error_with_details_and_not_installed() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    let r = e.post(
        &format!("/deploymentBase/{id}/feedback"),
        r#"{"id":"1","time":"20240511T121314","status":{"execution":"closed","result":{"finished":"failure"},"code":4711,"details":["Signature check failed"]},"unknownField":true}"#,
    );
    assert_eq!(r.status(), 200);
    let a = e.server.action(id).unwrap();
    assert_eq!(a.result(), Some("failure"));
    assert_eq!(a.details(), vec!["Signature check failed".to_string()]);
    let last = a.history.last().unwrap();
    assert_eq!(last.code, Some(4711));
    assert!(last
        .messages
        .contains(&"Device reported status code: 4711".to_string()));
    assert!(link(&e.poll(), "installedBase").is_none());
}

#[test]
fn download_only_closes_on_downloaded_and_then_rejects_closed() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::download_only());
    assert_eq!(e.feedback(id, "download", "none").status(), 200);
    assert!(e.server.action(id).unwrap().active);
    assert_eq!(e.feedback(id, "downloaded", "none").status(), 200);
    let a = e.server.action(id).unwrap();
    assert_eq!((a.status, a.active), (ActionStatus::Downloaded, false));
    assert_eq!(e.feedback(id, "closed", "success").status(), 410);
    // `downloaded` on a normal action is informational.
    let id = e.deploy(b"x", &Assignment::forced());
    assert_eq!(e.feedback(id, "downloaded", "none").status(), 200);
    assert!(e.server.action(id).unwrap().active);
}

#[test]
fn feedback_validation_is_strict() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    let path = format!("/deploymentBase/{id}/feedback");
    let bad = [
        r#"{"status":{"execution":"CLOSED","result":{"finished":"success"}}}"#,
        r#"{"status":{"execution":"closed","result":{"finished":"SUCCESS"}}}"#,
        r#"{"status":{"execution":"closed"}}"#,
        r#"{"status":{"execution":"closed","result":{}}}"#,
        r#"{"status":{"result":{"finished":"success"}}}"#,
        r#"{}"#,
        r#"{"status":{"execution":"done","result":{"finished":"success"}}}"#,
        r#"{"status": "#,
    ];
    for body in bad {
        let r = e.post(&path, body);
        assert_eq!(r.status(), 400, "{body}");
        let v: Value = r.json().unwrap();
        assert_eq!(
            v["errorCode"], "hawkbit.server.error.rest.body.notReadable",
            "{body}"
        );
        assert_eq!(
            v["exceptionClass"],
            "org.eclipse.hawkbit.rest.exception.MessageNotReadableException"
        );
        assert!(v["message"].is_string());
    }
    let r = e.post(&path, r#"{"status":{"execution":"proceeding","result":{"finished":"none"},"details":["<b>x</b>"]}}"#);
    assert_eq!(r.status(), 400, "markup in details");
    let r = e
        .auth(e.http.post(e.url(&path)))
        .header("Content-Type", "application/hal+json")
        .body(r#"{"status":{"execution":"closed","result":{"finished":"success"}}}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = e.auth(e.http.get(e.url(&path))).send().unwrap();
    assert_eq!(r.status(), 405);
    assert!(
        e.server.action(id).unwrap().active,
        "nothing above closed the action"
    );
    assert!(e.server.feedback(id).is_empty());
}

#[test]
fn unknown_or_foreign_actions_are_404() {
    let e = env();
    e.server.create_target("other", Some("other-tok")).unwrap();
    let foreign = e
        .server
        .deploy("other", "1", "f", b"x".to_vec(), &Assignment::forced())
        .unwrap();
    assert_eq!(e.get("/deploymentBase/999").status(), 404);
    assert_eq!(e.get(&format!("/deploymentBase/{foreign}")).status(), 404);
    assert_eq!(e.feedback(999, "closed", "success").status(), 404);
    assert_eq!(e.feedback(foreign, "closed", "success").status(), 404);
    assert!(e.server.action(foreign).unwrap().active);
}

#[test]
fn quota_of_status_entries_is_429_since_0_10_and_403_before() {
    for (version, code) in [("head", 429), ("0.9.0", 403)] {
        let e =
            env_with(ServerOptions::default().version(version.parse::<HawkbitVersion>().unwrap()));
        e.server.configure(|c| c.max_status_entries_per_action = 5);
        let id = e.deploy(b"x", &Assignment::forced());
        let mut statuses = Vec::new();
        for _ in 0..6 {
            statuses.push(e.feedback(id, "proceeding", "none").status().as_u16());
        }
        assert_eq!(statuses.last(), Some(&code), "{version}: {statuses:?}");
        let r = e.feedback(id, "proceeding", "none");
        let v: Value = r.json().unwrap();
        assert_eq!(v["errorCode"], "hawkbit.server.error.quota.tooManyEntries");
        // Final feedback is not quota-checked.
        assert_eq!(e.feedback(id, "closed", "success").status(), 200);
    }
}

#[test]
fn old_servers_require_the_feedback_id() {
    let e =
        env_with(ServerOptions::default().version("0.3.0M7".parse::<HawkbitVersion>().unwrap()));
    let id = e.deploy(b"x", &Assignment::forced());
    let path = format!("/deploymentBase/{id}/feedback");
    let body = |idv: &str| {
        format!(r#"{{{idv}"status":{{"execution":"closed","result":{{"finished":"success"}}}}}}"#)
    };
    assert_eq!(e.post(&path, &body("")).status(), 400);
    assert_eq!(e.post(&path, &body(r#""id":"999","#)).status(), 404);
    assert_eq!(
        e.post(&path, &body(&format!(r#""id":"{id}","#))).status(),
        200
    );
    // sha256 came with 0.3.0M5: still there in M7.
    let id = e.deploy(b"x", &Assignment::forced());
    let d = e.get_json(&format!("/deploymentBase/{id}"));
    assert!(d["deployment"]["chunks"][0]["artifacts"][0]["hashes"]["sha256"].is_string());
    let e =
        env_with(ServerOptions::default().version("0.3.0M4".parse::<HawkbitVersion>().unwrap()));
    let id = e.deploy(b"x", &Assignment::forced());
    let d = e.get_json(&format!("/deploymentBase/{id}"));
    assert!(d["deployment"]["chunks"][0]["artifacts"][0]["hashes"]
        .get("sha256")
        .is_none());
}

#[test]
fn device_timestamp_decides_the_installed_version_since_0_7() {
    let e = env();
    let first = e.deploy(b"x", &Assignment::forced());
    let fb = |id: u64, ts: i64| {
        e.post(
            &format!("/deploymentBase/{id}/feedback"),
            &format!(r#"{{"timestamp":{ts},"status":{{"execution":"closed","result":{{"finished":"success"}}}}}}"#),
        )
    };
    assert_eq!(fb(first, 2_000_000).status(), 200);
    let second = e.deploy(b"y", &Assignment::forced());
    // A device clock in 1970 after the first install: FINISHED, but installedBase stays.
    assert_eq!(fb(second, 1000).status(), 200);
    assert_eq!(
        e.server.action(second).unwrap().status,
        ActionStatus::Finished
    );
    assert_eq!(
        e.server.target(CID).unwrap().target.installed_action,
        Some(first)
    );
}

#[test]
fn too_many_details_in_one_feedback_hit_the_message_quota() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    let details: Vec<String> = (0..51).map(|i| format!("line {i}")).collect();
    let body = serde_json::json!({"status": {"execution": "proceeding", "result": {"finished": "none"}, "details": details}});
    let r = e.post(&format!("/deploymentBase/{id}/feedback"), &body.to_string());
    assert_eq!(r.status(), 429);
    // Long details are split into 512-character messages.
    let long = "x".repeat(1100);
    let body = serde_json::json!({"status": {"execution": "proceeding", "result": {"finished": "none"}, "details": [long]}});
    assert_eq!(
        e.post(&format!("/deploymentBase/{id}/feedback"), &body.to_string())
            .status(),
        200
    );
    let last = e
        .server
        .action(id)
        .unwrap()
        .history
        .last()
        .unwrap()
        .messages
        .clone();
    assert_eq!(
        last.iter().map(String::len).collect::<Vec<_>>(),
        vec![512, 512, 76]
    );
}
