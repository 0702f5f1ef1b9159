//! The demo runs in CI and its outcome is asserted from the server's side: the good update is
//! closed with success, the broken and the hanging updates are closed with failure and say why,
//! and the device ends on the confirmed slot. Needs `cargo build --workspace --bins` first.

use std::process::Command;
use std::time::Duration;

use bootctl::SchemeKind;
use ddi_sim::{ActionStatus, Channel, FeedbackRecord};
use ddi_tests::demo::{self, DemoOptions};
use ddi_tests::harness::run_with_timeout;

fn closing_feedback(feedback: &[FeedbackRecord]) -> Vec<&FeedbackRecord> {
    feedback
        .iter()
        .filter(|f| f.channel == Channel::Deployment && f.execution() == Some("closed"))
        .collect()
}

#[test]
fn demo_story_ends_as_described_on_the_server() {
    assert_story_on_server(SchemeKind::Bootcount);
}

/// The same story on a board whose boot script uses RAUC's variables.
#[test]
fn demo_story_with_rauc_scheme_ends_as_described_on_the_server() {
    assert_story_on_server(SchemeKind::Rauc);
}

fn assert_story_on_server(scheme: SchemeKind) {
    let mut transcript = Vec::new();
    let outcome = demo::run(
        &mut transcript,
        &DemoOptions {
            fancy: Some(false),
            scheme: Some(scheme),
            ..DemoOptions::default()
        },
    )
    .unwrap_or_else(|err| {
        panic!(
            "demo could not be played: {err}\n{}",
            String::from_utf8_lossy(&transcript)
        )
    });
    let transcript = String::from_utf8_lossy(&transcript).into_owned();
    assert!(outcome.passed(), "{:?}\n{transcript}", outcome.problems);
    assert!(
        outcome.elapsed < Duration::from_secs(60),
        "demo took {:?}",
        outcome.elapsed
    );

    // Ask the server directly, not the demo's own summary.
    let server = &outcome.server;
    let actions = server.actions("demo-device-0001");
    assert_eq!(actions.len(), 3, "{transcript}");
    let ids: Vec<u64> = outcome.actions.iter().map(|a| a.action_id).collect();
    assert_eq!(ids, actions.iter().map(|a| a.id).collect::<Vec<_>>());

    let good = &actions[0];
    assert_eq!(good.distribution_version, "2.0");
    assert_eq!(good.status, ActionStatus::Finished, "{good:?}");
    assert!(!good.active);
    let closed = closing_feedback(&good.feedback);
    assert_eq!(closed.len(), 1, "exactly one closed feedback: {good:?}");
    assert_eq!(closed[0].finished(), Some("success"));

    for (action, version, reason) in [(&actions[1], "2.1", "health"), (&actions[2], "2.2", "roll")]
    {
        assert_eq!(action.distribution_version, version);
        assert_eq!(action.status, ActionStatus::Error, "{action:?}");
        assert!(!action.active);
        let closed = closing_feedback(&action.feedback);
        assert_eq!(closed.len(), 1, "exactly one closed feedback: {action:?}");
        assert_eq!(closed[0].finished(), Some("failure"));
        let details = closed[0].details().join("\n").to_lowercase();
        assert!(
            details.contains(reason),
            "the failure of {version} should say why ({reason}): {details}"
        );
    }
    // The closed feedback of the broken update carries the health check's own output.
    let broken_details = closing_feedback(&actions[1].feedback)[0]
        .details()
        .join("\n");
    assert!(
        broken_details.contains("self-test failed on slot"),
        "{broken_details}"
    );
}

#[test]
fn demo_binary_exits_zero_and_prints_the_server_table() {
    let mut cmd = Command::new(ddi_tests::bin_path("ddi-demo"));
    cmd.arg("--plain");
    let output = run_with_timeout(cmd, Duration::from_secs(120)).unwrap();
    assert!(output.success(), "{}", output.describe());
    assert!(
        output.stdout.contains("What the server shows"),
        "{}",
        output.describe()
    );
    assert!(
        !output.stdout.contains('\x1b'),
        "plain output has no escape codes"
    );
}
