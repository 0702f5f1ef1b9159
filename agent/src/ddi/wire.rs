//! Private serde mirrors of the DDI JSON bodies (hawkBit 0.3 .. 1.x).
//!
//! Unknown fields are ignored everywhere (servers add fields over time); required fields are
//! required so that nonsense is rejected at parse time.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
pub(crate) struct Href {
    pub href: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ControllerBase {
    pub config: ControllerConfig,
    #[serde(rename = "_links", default)]
    pub links: BTreeMap<String, Href>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ControllerConfig {
    pub polling: Polling,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Polling {
    pub sleep: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct DeploymentBase {
    pub id: IdValue,
    /// `deployment` on deploymentBase/installedBase, `confirmation` on confirmationBase.
    #[serde(alias = "confirmation")]
    pub deployment: Deployment,
    #[serde(rename = "actionHistory")]
    pub action_history: Option<ActionHistory>,
}

/// Action ids are strings in JSON bodies, but accept numbers from odd servers.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum IdValue {
    Text(String),
    Number(u64),
}

impl IdValue {
    pub fn into_string(self) -> String {
        match self {
            IdValue::Text(s) => s,
            IdValue::Number(n) => n.to_string(),
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct Deployment {
    pub download: Handling,
    pub update: Handling,
    #[serde(rename = "maintenanceWindow")]
    pub maintenance_window: Option<Window>,
    #[serde(default)]
    pub chunks: Vec<Chunk>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Handling {
    Skip,
    Attempt,
    Forced,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Window {
    Available,
    Unavailable,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Chunk {
    pub part: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub encrypted: bool,
    #[serde(default)]
    pub artifacts: Vec<Artifact>,
    #[serde(default)]
    pub metadata: Vec<Metadata>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Metadata {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Artifact {
    pub filename: String,
    #[serde(default)]
    pub hashes: Hashes,
    pub size: Option<u64>,
    #[serde(rename = "_links", default)]
    pub links: BTreeMap<String, Href>,
}

#[derive(Debug, Default, Deserialize)]
pub(crate) struct Hashes {
    pub sha1: Option<String>,
    pub md5: Option<String>,
    pub sha256: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ActionHistory {
    pub status: Option<String>,
    #[serde(default)]
    pub messages: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct Cancel {
    pub id: IdValue,
    #[serde(rename = "cancelAction")]
    pub cancel_action: CancelStop,
}

#[derive(Debug, Deserialize)]
pub(crate) struct CancelStop {
    #[serde(rename = "stopId")]
    pub stop_id: IdValue,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ConfirmationBase {
    #[serde(rename = "autoConfirm")]
    pub auto_confirm: AutoConfirm,
    #[serde(rename = "_links", default)]
    pub links: BTreeMap<String, Href>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct AutoConfirm {
    pub active: bool,
}

// ---- request bodies ---------------------------------------------------------------------------

/// Feedback body; `id` and `time` keep hawkBit <= 0.3.0M7 / <= 0.6 happy, newer ones ignore them.
#[derive(Debug, Serialize)]
pub(crate) struct ActionFeedback<'a> {
    pub id: &'a str,
    pub time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub timestamp: Option<u64>,
    pub status: FeedbackStatus<'a>,
}

#[derive(Debug, Serialize)]
pub(crate) struct FeedbackStatus<'a> {
    pub execution: &'a str,
    pub result: FeedbackResult<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub details: &'a [String],
}

#[derive(Debug, Serialize)]
pub(crate) struct FeedbackResult<'a> {
    pub finished: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
}

#[derive(Debug, Serialize)]
pub(crate) struct Progress {
    pub cnt: u64,
    pub of: u64,
}

/// configData body; `status` makes it acceptable to hawkBit <= 0.3.0M6.
#[derive(Debug, Serialize)]
pub(crate) struct ConfigData<'a> {
    pub mode: &'static str,
    pub data: &'a BTreeMap<String, String>,
    pub time: String,
    pub status: FeedbackStatus<'a>,
}

#[derive(Debug, Serialize)]
pub(crate) struct ConfirmationFeedback<'a> {
    pub confirmation: &'a str,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    pub details: &'a [String],
}
