//! configData, confirmationBase, auto-confirm and installedBase on the test server
//! (spec §8, §9, §10).

use crate::common::*;
use ddi_sim::{ActionStatus, Assignment, HawkbitVersion, ServerOptions};
use serde_json::{json, Value};
use std::collections::BTreeMap;

fn attrs(e: &Env) -> BTreeMap<String, String> {
    e.server.target(CID).unwrap().target.attributes
}

#[test]
fn config_data_merge_replace_remove() {
    let e = env();
    assert_eq!(
        e.put(
            "/configData",
            r#"{"mode":"merge","data":{"a":"1","b":"2"}}"#
        )
        .status(),
        200
    );
    assert_eq!(
        e.put("/configData", r#"{"data":{"b":"3","c":"4"}}"#)
            .status(),
        200,
        "merge is the default"
    );
    assert_eq!(
        attrs(&e),
        [("a", "1"), ("b", "3"), ("c", "4")]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    );
    assert_eq!(
        e.put("/configData", r#"{"mode":"merge","data":{"a":null}}"#)
            .status(),
        200
    );
    assert!(!attrs(&e).contains_key("a"), "null removes in merge mode");
    assert_eq!(
        e.put("/configData", r#"{"mode":"remove","data":{"b":"ignored"}}"#)
            .status(),
        200
    );
    assert_eq!(
        attrs(&e).keys().cloned().collect::<Vec<_>>(),
        vec!["c".to_string()]
    );
    assert_eq!(
        e.put("/configData", r#"{"mode":"replace","data":{"x":"y"}}"#)
            .status(),
        200
    );
    assert_eq!(
        attrs(&e).keys().cloned().collect::<Vec<_>>(),
        vec!["x".to_string()]
    );
}

#[test]
fn config_data_errors() {
    let e = env();
    for body in [
        r#"{"id":"51659181"}"#,
        r#"{"data":{}}"#,
        r#"{"mode":"MERGE","data":{"a":"b"}}"#,
        r#"{"data":"#,
    ] {
        assert_eq!(e.put("/configData", body).status(), 400, "{body}");
    }
    let long = "v".repeat(129);
    let r = e.put("/configData", &format!(r#"{{"data":{{"k":"{long}"}}}}"#));
    assert_eq!(r.status(), 400);
    let v: Value = r.json().unwrap();
    assert_eq!(
        v["errorCode"],
        "hawkbit.server.error.repo.invalidTargetAttributes"
    );
    assert_eq!(
        e.put("/configData", r#"{"data":{"k":"ünïcode"}}"#).status(),
        400
    );
    let r = e
        .auth(e.http.put(e.url("/configData")))
        .header("Content-Type", "application/hal+json")
        .body(r#"{"data":{"a":"b"}}"#)
        .send()
        .unwrap();
    assert_eq!(r.status(), 415);
    assert_eq!(
        e.auth(e.http.get(e.url("/configData")))
            .send()
            .unwrap()
            .status(),
        405
    );
    e.server.configure(|c| c.max_attributes_per_target = 2);
    assert_eq!(
        e.put("/configData", r#"{"data":{"a":"1","b":"2","c":"3"}}"#)
            .status(),
        429
    );
    assert!(attrs(&e).is_empty(), "nothing stored by refused requests");
    assert!(link(&e.poll(), "configData").is_some(), "still requested");
}

#[test]
fn old_servers_require_a_status_in_config_data() {
    let e =
        env_with(ServerOptions::default().version("0.3.0M6".parse::<HawkbitVersion>().unwrap()));
    assert_eq!(e.put("/configData", r#"{"data":{"a":"1"}}"#).status(), 400);
    let body = r#"{"status":{"execution":"closed","result":{"finished":"success"}},"mode":"merge","data":{"a":"1"}}"#;
    assert_eq!(e.put("/configData", body).status(), 200);
}

#[test]
fn operator_can_request_attributes_again() {
    let e = env();
    e.put("/configData", r#"{"data":{"a":"1"}}"#);
    assert!(link(&e.poll(), "configData").is_none());
    e.server.request_attributes(CID).unwrap();
    assert!(link(&e.poll(), "configData").is_some());
}

#[test]
fn confirmation_flow_confirm_and_deny() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced().with_confirmation());
    let body = e.poll();
    let href = link(&body, "confirmationBase").unwrap();
    assert!(
        href.contains(&format!("/confirmationBase/{id}?c=")),
        "{href}"
    );
    assert!(link(&body, "deploymentBase").is_none());
    assert_eq!(e.get(&format!("/deploymentBase/{id}")).status(), 404);
    assert_eq!(e.feedback(id, "proceeding", "none").status(), 404);

    let base = e.get_json("/confirmationBase");
    assert_eq!(
        base["autoConfirm"],
        json!({"active": false, "activatedAt": 0})
    );
    assert!(base["_links"]["activateAutoConfirm"]["href"].is_string());
    assert!(base["_links"]["confirmationBase"]["href"]
        .as_str()
        .unwrap()
        .contains(&format!("/confirmationBase/{id}")));

    let c = e.get_json(&format!("/confirmationBase/{id}?actionHistory=5"));
    assert_eq!(c["id"], id.to_string());
    assert_eq!(c["confirmation"]["download"], "forced");
    assert_eq!(c["actionHistory"]["status"], "WAIT_FOR_CONFIRMATION");
    // Waiting is active and not canceling: the artifacts are already served.
    let href = c["confirmation"]["chunks"][0]["artifacts"][0]["_links"]["download-http"]["href"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(e.auth(e.http.get(&href)).send().unwrap().status(), 200);

    let path = format!("/confirmationBase/{id}/feedback");
    assert_eq!(e.post(&path, r#"{"confirmation":"DENIED"}"#).status(), 400);
    assert_eq!(e.post(&path, r#"{"code":1}"#).status(), 400);
    assert_eq!(
        e.post(
            &path,
            r#"{"confirmation":"denied","details":["user said no"]}"#
        )
        .status(),
        200
    );
    assert_eq!(
        e.server.action(id).unwrap().status,
        ActionStatus::WaitForConfirmation
    );
    assert!(
        link(&e.poll(), "confirmationBase").is_some(),
        "denied keeps the action pending"
    );
    assert_eq!(
        e.post(
            &path,
            r#"{"confirmation":"confirmed","code":10,"details":["ok on HMI"]}"#
        )
        .status(),
        200
    );
    assert_eq!(e.server.action(id).unwrap().status, ActionStatus::Running);
    assert!(link(&e.poll(), "deploymentBase").is_some());
    assert_eq!(
        e.get(&format!("/confirmationBase/{id}")).status(),
        404,
        "no longer waiting"
    );
    // Head revokes a confirmation with `denied`; 1.1.0 answers 404.
    assert_eq!(e.post(&path, r#"{"confirmation":"denied"}"#).status(), 200);
    assert_eq!(
        e.server.action(id).unwrap().status,
        ActionStatus::WaitForConfirmation
    );
    assert_eq!(
        e.post(&path, r#"{"confirmation":"confirmed"}"#).status(),
        200
    );
    assert_eq!(e.feedback(id, "closed", "success").status(), 200);
    assert_eq!(
        e.post(&path, r#"{"confirmation":"confirmed"}"#).status(),
        410
    );
    let feedback = e.server.feedback(id);
    assert_eq!(
        feedback
            .iter()
            .filter(|f| f.channel == ddi_sim::Channel::Confirmation)
            .count(),
        4
    );

    let e = env_with(ServerOptions::default().version("1.1.0".parse::<HawkbitVersion>().unwrap()));
    let id = e.deploy(b"x", &Assignment::forced().with_confirmation());
    let path = format!("/confirmationBase/{id}/feedback");
    assert_eq!(
        e.post(&path, r#"{"confirmation":"confirmed"}"#).status(),
        200
    );
    assert_eq!(e.post(&path, r#"{"confirmation":"denied"}"#).status(), 404);
}

#[test]
fn auto_confirm_activation_confirms_waiting_actions_and_409_when_active() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced().with_confirmation());
    let r = e
        .auth(e.http.post(e.url("/confirmationBase/activateAutoConfirm")))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200, "body is optional");
    assert_eq!(e.server.action(id).unwrap().status, ActionStatus::Running);
    let r = e.post(
        "/confirmationBase/activateAutoConfirm",
        r#"{"initiator":"me","remark":"why"}"#,
    );
    assert_eq!(r.status(), 409);
    let v: Value = r.json().unwrap();
    assert_eq!(
        v["errorCode"],
        "hawkbit.server.error.repo.autoConfAlreadyActive"
    );
    let base = e.get_json("/confirmationBase");
    assert_eq!(base["autoConfirm"]["active"], true);
    assert!(base["autoConfirm"]["activatedAt"].as_i64().unwrap() > 0);
    assert!(base["_links"]["deactivateAutoConfirm"].is_object());
    // New assignments needing confirmation run straight away.
    let id2 = e.deploy(b"y", &Assignment::forced().with_confirmation());
    assert_eq!(e.server.action(id2).unwrap().status, ActionStatus::Running);
    assert_eq!(
        e.auth(
            e.http
                .post(e.url("/confirmationBase/deactivateAutoConfirm"))
        )
        .send()
        .unwrap()
        .status(),
        200
    );
    assert_eq!(
        e.auth(
            e.http
                .post(e.url("/confirmationBase/deactivateAutoConfirm"))
        )
        .send()
        .unwrap()
        .status(),
        200
    );
    assert_eq!(
        e.get_json("/confirmationBase")["autoConfirm"]["active"],
        false
    );
    e.post(
        "/confirmationBase/activateAutoConfirm",
        r#"{"initiator":"me","remark":"why"}"#,
    );
    let base = e.get_json("/confirmationBase");
    assert_eq!(
        (
            base["autoConfirm"]["initiator"].as_str(),
            base["autoConfirm"]["remark"].as_str()
        ),
        (Some("me"), Some("why"))
    );
}

#[test]
fn installed_base_serves_only_finished_actions() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    assert_eq!(
        e.get(&format!("/installedBase/{id}")).status(),
        404,
        "pending"
    );
    e.feedback(id, "closed", "success");
    let d = e.get_json(&format!("/installedBase/{id}"));
    assert_eq!(d["id"], id.to_string());
    assert_eq!(d["deployment"]["download"], "forced");
    assert_eq!(
        d["deployment"]["chunks"][0]["artifacts"][0]["filename"],
        "fw.bin"
    );
    assert_eq!(e.get("/installedBase/999").status(), 404);
    // Artifacts of the installed action are listed (>= 1.0.4) but not downloadable (>= 0.4.0).
    let href = d["deployment"]["chunks"][0]["artifacts"][0]["_links"]["download-http"]["href"]
        .as_str()
        .unwrap()
        .to_string();
    let list = href.rsplit_once('/').unwrap().0.to_string();
    assert_eq!(e.auth(e.http.get(&list)).send().unwrap().status(), 200);
    assert_eq!(e.auth(e.http.get(&href)).send().unwrap().status(), 404);
}

#[test]
fn fetching_a_closed_deployment_again_records_retrieved_and_drops_installed_base() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    e.get_json(&format!("/deploymentBase/{id}"));
    e.feedback(id, "closed", "success");
    assert_eq!(
        link(&e.poll(), "installedBase"),
        Some(e.url(&format!("/installedBase/{id}")))
    );
    e.get_json(&format!("/deploymentBase/{id}"));
    let a = e.server.action(id).unwrap();
    assert_eq!(a.status, ddi_sim::ActionStatus::Retrieved);
    assert!(!a.active, "still closed");
    assert_eq!(
        link(&e.poll(), "installedBase"),
        None,
        "hawkBit links only a FINISHED installed action"
    );
}

#[test]
fn put_installed_base_declares_an_offline_install() {
    let e = env();
    let m = e.server.create_module("os", "fw", "7");
    e.server.upload_bytes(m, "f", b"x".to_vec()).unwrap();
    e.server.create_distribution("fw", "7", &[m]).unwrap();
    assert_eq!(
        e.put("/installedBase", r#"{"name":"fw","version":"7"}"#)
            .status(),
        201
    );
    assert_eq!(
        e.put("/installedBase", r#"{"name":"fw","version":"7"}"#)
            .status(),
        200
    );
    assert_eq!(
        e.put("/installedBase", r#"{"name":"fw","version":"8"}"#)
            .status(),
        404
    );
    assert_eq!(e.put("/installedBase", r#"{"name":"fw"}"#).status(), 400);
    assert_eq!(
        e.server.target(CID).unwrap().installed_version.as_deref(),
        Some("fw 7")
    );
    assert!(link(&e.poll(), "installedBase").is_some());
}

#[test]
fn endpoints_of_newer_versions_do_not_exist_on_old_servers() {
    let e =
        env_with(ServerOptions::default().version("0.3.0M7".parse::<HawkbitVersion>().unwrap()));
    assert_eq!(e.get("/confirmationBase").status(), 404);
    assert_eq!(e.get("/installedBase/1").status(), 404);
    let e = env_with(ServerOptions::default().version("0.5.0".parse::<HawkbitVersion>().unwrap()));
    assert_eq!(
        e.put("/installedBase", r#"{"name":"a","version":"b"}"#)
            .status(),
        404
    );
    let e = env_with(ServerOptions::default().version("0.6.0".parse::<HawkbitVersion>().unwrap()));
    assert_eq!(
        e.put("/installedBase", r#"{"name":"a","version":"b"}"#)
            .status(),
        404,
        "PUT installedBase exists since 0.6.0: an unknown set is a 404 with a body"
    );
    assert!(!e
        .put("/installedBase", r#"{"name":"a","version":"b"}"#)
        .text()
        .unwrap()
        .is_empty());
    let base = e.get_json("/confirmationBase");
    assert_eq!(
        base["autoConfirm"],
        json!({"active": false}),
        "no activatedAt before 0.8.0"
    );
    let e =
        env_with(ServerOptions::default().version("0.3.0M1".parse::<HawkbitVersion>().unwrap()));
    let r = e
        .auth(e.http.get(e.url("")))
        .header("Accept", "application/cbor")
        .send()
        .unwrap();
    assert_eq!(r.status(), 406, "CBOR came with 0.3.0M2");
}
