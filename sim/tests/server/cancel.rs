//! Cancellation with hawkBit's real semantics on the test server (spec §7, §12.4, §14).

use crate::common::*;
use ddi_sim::{ActionStatus, Assignment};
use serde_json::Value;

#[test]
fn cancel_link_replaces_deployment_and_blocks_deployment_and_artifacts() {
    let e = env();
    let id = e.deploy(b"payload", &Assignment::forced());
    let href = e.download_href(id);
    assert_eq!(e.auth(e.http.get(&href)).send().unwrap().status(), 200);
    e.server.cancel(id).unwrap();
    let body = e.poll();
    assert!(link(&body, "deploymentBase").is_none());
    assert_eq!(
        link(&body, "cancelAction").unwrap(),
        e.url(&format!("/cancelAction/{id}"))
    );
    let c = e.get_json(&format!("/cancelAction/{id}"));
    assert_eq!(
        c,
        serde_json::json!({"id": id.to_string(), "cancelAction": {"stopId": id.to_string()}})
    );
    assert_eq!(e.get(&format!("/deploymentBase/{id}")).status(), 404);
    let r = e.auth(e.http.get(&href)).send().unwrap();
    assert_eq!(
        r.status(),
        404,
        "artifacts of a canceling action are not served"
    );
    let r = e
        .auth(e.http.get(&href))
        .header("Range", "bytes=0-1")
        .send()
        .unwrap();
    assert_eq!(r.status(), 404, "hawkBit 1.1.0+ checks Range requests too");
    assert_eq!(e.server.action(id).unwrap().status, ActionStatus::Canceling);
}

#[test]
fn canceled_does_not_accept_the_cancel_but_closed_success_does() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::soft());
    e.server.cancel(id).unwrap();
    assert_eq!(e.cancel_feedback(id, "canceled", "success").status(), 200);
    assert_eq!(
        e.server.action(id).unwrap().status,
        ActionStatus::Canceling,
        "#952: canceled is not an accept"
    );
    assert!(link(&e.poll(), "cancelAction").is_some());
    assert_eq!(e.cancel_feedback(id, "proceeding", "none").status(), 200);
    assert_eq!(e.cancel_feedback(id, "closed", "success").status(), 200);
    let a = e.server.action(id).unwrap();
    assert_eq!((a.status, a.active), (ActionStatus::Canceled, false));
    assert_eq!(a.feedback.len(), 3);
    assert!(link(&e.poll(), "cancelAction").is_none());
    // Canceled is still "canceling or canceled": accepted again; deployment feedback is gone.
    assert_eq!(e.cancel_feedback(id, "closed", "success").status(), 200);
    assert_eq!(e.feedback(id, "closed", "success").status(), 410);
    assert_eq!(e.get(&format!("/installedBase/{id}")).status(), 404);
}

#[test]
fn rejected_cancel_continues_the_deployment() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    e.server.cancel(id).unwrap();
    assert_eq!(e.cancel_feedback(id, "rejected", "none").status(), 200);
    assert_eq!(e.server.action(id).unwrap().status, ActionStatus::Running);
    assert!(link(&e.poll(), "deploymentBase").is_some());
    assert_eq!(e.get(&format!("/deploymentBase/{id}")).status(), 200);
    let r = e.cancel_feedback(id, "closed", "success");
    assert_eq!(r.status(), 405, "no longer canceling");
    let v: Value = r.json().unwrap();
    assert_eq!(v["errorCode"], "hawkbit.server.error.action.notCancelable");
    assert_eq!(e.feedback(id, "closed", "success").status(), 200);
}

#[test]
fn failed_cancel_goes_back_to_running() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    e.server.cancel(id).unwrap();
    assert_eq!(e.cancel_feedback(id, "closed", "failure").status(), 200);
    let a = e.server.action(id).unwrap();
    assert_eq!((a.status, a.active), (ActionStatus::Running, true));
}

#[test]
fn cancel_endpoints_404_and_405_when_not_canceling() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    assert_eq!(e.get(&format!("/cancelAction/{id}")).status(), 404);
    assert_eq!(e.get("/cancelAction/999").status(), 404);
    assert_eq!(e.cancel_feedback(id, "closed", "success").status(), 405);
    assert_eq!(e.cancel_feedback(999, "closed", "success").status(), 404);
    e.server.cancel(id).unwrap();
    let r = e.post(
        &format!("/cancelAction/{id}/feedback"),
        r#"{"status":{"execution":"Closed","result":{"finished":"success"}}}"#,
    );
    assert_eq!(r.status(), 400);
    let r = e
        .auth(e.http.post(e.url(&format!("/cancelAction/{id}/feedback"))))
        .header("Content-Type", "text/plain")
        .body("x")
        .send()
        .unwrap();
    assert_eq!(r.status(), 415);
    let r = e
        .auth(e.http.put(e.url(&format!("/cancelAction/{id}"))))
        .send()
        .unwrap();
    assert_eq!(r.status(), 405);
}

#[test]
fn closed_deployment_feedback_wins_the_race_against_cancel() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    e.server.cancel(id).unwrap();
    assert_eq!(e.feedback(id, "closed", "success").status(), 200);
    assert_eq!(e.server.action(id).unwrap().status, ActionStatus::Finished);
}

#[test]
fn a_new_assignment_cancels_the_old_one_first() {
    let e = env();
    let old = e.deploy(b"old", &Assignment::forced());
    let new = e.deploy(b"new", &Assignment::forced());
    let body = e.poll();
    assert!(link(&body, "cancelAction")
        .unwrap()
        .ends_with(&format!("/cancelAction/{old}")));
    assert_eq!(e.cancel_feedback(old, "closed", "success").status(), 200);
    assert!(link(&e.poll(), "deploymentBase")
        .unwrap()
        .contains(&format!("/deploymentBase/{new}?")));
}

#[test]
fn force_quit_closes_without_the_device() {
    let e = env();
    let id = e.deploy(b"x", &Assignment::forced());
    assert!(e.server.force_quit(id).is_err(), "must be canceling first");
    e.server.cancel(id).unwrap();
    e.server.force_quit(id).unwrap();
    assert_eq!(e.server.action(id).unwrap().status, ActionStatus::Canceled);
    assert!(e
        .poll()
        .get("_links")
        .and_then(|l| l.get("cancelAction"))
        .is_none());
}
