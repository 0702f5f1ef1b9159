//! The DDI JSON model: every body the server can send (controller base, deploymentBase,
//! cancelAction, confirmationBase) and the polling `sleep` value, through the agent's public
//! parse functions.
#![no_main]

use ddi_agent::ddi::{parse_sleep, CancelRequest, ConfirmationState, Deployment, Link, PollReply};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let link = Link {
        href: "http://127.0.0.1/DEFAULT/controller/v1/dev/deploymentBase/7".to_string(),
    };
    let any_id = Link {
        href: "http://127.0.0.1/DEFAULT/controller/v1/dev/deploymentBase".to_string(),
    };
    if let Ok(reply) = PollReply::parse(input) {
        for l in [
            &reply.deployment,
            &reply.cancel,
            &reply.confirmation,
            &reply.installed,
        ]
        .into_iter()
        .flatten()
        {
            let _ = l.action_id();
            let _ = l.join("/feedback");
        }
    }
    if let Ok(d) = Deployment::parse(input, &link) {
        assert_eq!(d.action_id, "7", "id must match the link");
        let _ = d.is_download_only();
        let _ = d.may_activate();
    }
    let _ = Deployment::parse(input, &any_id);
    let _ = CancelRequest::parse(input, &link);
    let _ = ConfirmationState::parse(input);
    if let Ok(text) = std::str::from_utf8(input) {
        let _ = parse_sleep(text);
    }
});
