//! The management interface over HTTP (`/mgmt/...`, JSON, documented in the module doc of
//! [`crate`]) and the JSON views it shares with the Rust API and the `ddi-sim` client.

use super::model::{
    now_ms, Action, ActionStatus, ActionType, Artifact, Assignment, Config, FeedbackRecord,
    MaintenanceWindow, MgmtError, State, StatusEntry, Target,
};
use super::{Fault, Shared};
use axum::body::Body;
use axum::extract::{Path, Request, State as AxState};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::io::AsyncWriteExt;

/// An action as the management side shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ActionView {
    pub id: u64,
    pub target: String,
    pub distribution: u64,
    pub distribution_name: String,
    pub distribution_version: String,
    #[serde(rename = "type")]
    pub action_type: ActionType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<MaintenanceWindow>,
    pub status: ActionStatus,
    pub active: bool,
    pub created_ms: i64,
    /// Status entries, oldest first (server messages included).
    pub history: Vec<StatusEntry>,
    /// Feedback bodies as the device sent them, oldest first.
    pub feedback: Vec<FeedbackRecord>,
}

impl ActionView {
    pub fn new(st: &State, a: &Action) -> ActionView {
        let ds = st.distributions.get(&a.distribution);
        ActionView {
            id: a.id,
            target: a.target.clone(),
            distribution: a.distribution,
            distribution_name: ds.map(|d| d.name.clone()).unwrap_or_default(),
            distribution_version: ds.map(|d| d.version.clone()).unwrap_or_default(),
            action_type: a.action_type,
            forced_at_ms: a.forced_at_ms,
            maintenance: a.maintenance,
            status: a.status,
            active: a.active,
            created_ms: a.created_ms,
            history: a.history.clone(),
            feedback: a.feedback.clone(),
        }
    }
    /// `Some("success")` for FINISHED, `Some("failure")` for ERROR, None otherwise.
    pub fn result(&self) -> Option<&'static str> {
        match self.status {
            ActionStatus::Finished => Some("success"),
            ActionStatus::Error => Some("failure"),
            _ => None,
        }
    }
    /// The newest feedback.
    pub fn last_feedback(&self) -> Option<&FeedbackRecord> {
        self.feedback.last()
    }
    /// All `details` lines of all feedback, oldest first.
    pub fn details(&self) -> Vec<String> {
        self.feedback.iter().flat_map(|f| f.details()).collect()
    }
}

/// A target as the management side shows it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TargetView {
    #[serde(flatten)]
    pub target: Target,
    /// Name and version of the installed distribution set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub installed_version: Option<String>,
    pub actions: Vec<u64>,
    /// hawkBit's target update status: `UNKNOWN` (never polled), `REGISTERED`, `PENDING` (an
    /// action is active), `IN_SYNC` (installed, nothing pending), `ERROR` (last action failed).
    pub update_status: String,
}

impl TargetView {
    pub fn new(st: &State, t: &Target) -> TargetView {
        let installed_version = t
            .installed_action
            .and_then(|a| st.actions.get(&a))
            .and_then(|a| st.distributions.get(&a.distribution))
            .map(|d| format!("{} {}", d.name, d.version));
        let actions: Vec<&Action> = st
            .actions
            .values()
            .filter(|a| a.target == t.controller_id)
            .collect();
        let last_closed = actions
            .iter()
            .filter(|a| !a.active && a.status != ActionStatus::Canceled)
            .max_by_key(|a| a.id);
        let update_status = if actions.iter().any(|a| a.active) {
            "PENDING"
        } else if last_closed.is_some_and(|a| a.status == ActionStatus::Error) {
            "ERROR"
        } else if t.installed_action.is_some() {
            "IN_SYNC"
        } else if t.last_poll_ms.is_some() {
            "REGISTERED"
        } else {
            "UNKNOWN"
        };
        TargetView {
            target: t.clone(),
            installed_version,
            actions: actions.iter().map(|a| a.id).collect(),
            update_status: update_status.to_string(),
        }
    }
}

/// An artifact's metadata.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactView {
    pub filename: String,
    pub size: u64,
    pub sha1: String,
    pub md5: String,
    pub sha256: String,
}

impl From<&Artifact> for ArtifactView {
    fn from(a: &Artifact) -> Self {
        ArtifactView {
            filename: a.filename.clone(),
            size: a.size,
            sha1: a.sha1.clone(),
            md5: a.md5.clone(),
            sha256: a.sha256.clone(),
        }
    }
}

/// A management error as HTTP.
struct ApiError(StatusCode, String);

impl From<MgmtError> for ApiError {
    fn from(e: MgmtError) -> Self {
        let code = match e {
            MgmtError::NotFound(_) => StatusCode::NOT_FOUND,
            MgmtError::Invalid(_) => StatusCode::BAD_REQUEST,
            MgmtError::Conflict(_) => StatusCode::CONFLICT,
        };
        ApiError(code, e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

type ApiResult<T> = Result<T, ApiError>;
type Sh = AxState<Arc<Shared>>;

fn created(v: Value) -> Response {
    (StatusCode::CREATED, Json(v)).into_response()
}

fn bad(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

/// Parses a JSON request body with a clear 400 on failure.
fn body<T: serde::de::DeserializeOwned>(b: &[u8]) -> ApiResult<T> {
    serde_json::from_slice(b).map_err(|e| bad(format!("invalid request body: {e}")))
}

/// The `/mgmt` routes.
pub fn routes() -> Router<Arc<Shared>> {
    Router::new()
        .route("/mgmt/targets", post(create_target).get(list_targets))
        .route("/mgmt/targets/{id}", get(show_target))
        .route("/mgmt/targets/{id}/actions", get(target_actions))
        .route(
            "/mgmt/targets/{id}/request-attributes",
            post(request_attributes),
        )
        .route("/mgmt/targets/{id}/auto-confirm", put(auto_confirm))
        .route("/mgmt/targets/{id}/assign", post(assign))
        .route("/mgmt/targets/{id}/polling", put(target_polling))
        .route("/mgmt/modules", post(create_module))
        .route("/mgmt/modules/{id}", get(show_module))
        .route("/mgmt/modules/{id}/artifacts", post(register_artifact_file))
        .route(
            "/mgmt/modules/{id}/artifacts/{filename}",
            put(upload_artifact),
        )
        .route("/mgmt/distributions", post(create_distribution))
        .route("/mgmt/actions/{id}", get(show_action))
        .route("/mgmt/actions/{id}/cancel", post(cancel))
        .route(
            "/mgmt/faults",
            get(list_faults).post(add_fault).delete(clear_faults),
        )
        .route("/mgmt/config", get(show_config).put(update_config))
}

#[derive(Deserialize)]
struct NewTarget {
    controller_id: String,
    #[serde(default)]
    token: Option<String>,
}

async fn create_target(AxState(sh): Sh, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: NewTarget = body(&b)?;
    let view = sh.update(|st| -> Result<TargetView, MgmtError> {
        st.create_target(&req.controller_id, req.token)?;
        Ok(TargetView::new(st, &st.targets[&req.controller_id]))
    })?;
    Ok(created(serde_json::to_value(view).unwrap_or_default()))
}

async fn list_targets(AxState(sh): Sh) -> Json<Vec<TargetView>> {
    let st = sh.lock();
    Json(
        st.targets
            .values()
            .map(|t| TargetView::new(&st, t))
            .collect(),
    )
}

async fn show_target(AxState(sh): Sh, Path(id): Path<String>) -> ApiResult<Json<TargetView>> {
    let st = sh.lock();
    let t = st
        .targets
        .get(&id)
        .ok_or_else(|| MgmtError::NotFound(format!("target {id}")))?;
    Ok(Json(TargetView::new(&st, t)))
}

async fn target_actions(
    AxState(sh): Sh,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<ActionView>>> {
    let st = sh.lock();
    if !st.targets.contains_key(&id) {
        return Err(MgmtError::NotFound(format!("target {id}")).into());
    }
    Ok(Json(
        st.actions
            .values()
            .filter(|a| a.target == id)
            .map(|a| ActionView::new(&st, a))
            .collect(),
    ))
}

async fn request_attributes(AxState(sh): Sh, Path(id): Path<String>) -> ApiResult<StatusCode> {
    sh.update(|st| match st.targets.get_mut(&id) {
        Some(t) => {
            t.request_attributes = true;
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(MgmtError::NotFound(format!("target {id}")).into()),
    })
}

#[derive(Deserialize)]
struct AutoConfirmReq {
    active: bool,
    #[serde(default)]
    initiator: Option<String>,
    #[serde(default)]
    remark: Option<String>,
}

async fn auto_confirm(
    AxState(sh): Sh,
    Path(id): Path<String>,
    b: axum::body::Bytes,
) -> ApiResult<StatusCode> {
    let req: AutoConfirmReq = body(&b)?;
    sh.update(|st| st.set_auto_confirm(&id, req.active, req.initiator, req.remark, now_ms()))?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
struct PollingReq {
    polling_ms: Option<i64>,
}

async fn target_polling(
    AxState(sh): Sh,
    Path(id): Path<String>,
    b: axum::body::Bytes,
) -> ApiResult<StatusCode> {
    let req: PollingReq = body(&b)?;
    if req.polling_ms.is_some_and(|ms| ms < 0) {
        return Err(bad("polling_ms must not be negative"));
    }
    sh.update(|st| match st.targets.get_mut(&id) {
        Some(t) => {
            t.polling_ms = req.polling_ms;
            Ok(StatusCode::NO_CONTENT)
        }
        None => Err(MgmtError::NotFound(format!("target {id}")).into()),
    })
}

#[derive(Deserialize)]
struct AssignReq {
    distribution: u64,
    #[serde(flatten)]
    assignment: Assignment,
}

async fn assign(
    AxState(sh): Sh,
    Path(id): Path<String>,
    b: axum::body::Bytes,
) -> ApiResult<Response> {
    let req: AssignReq = body(&b)?;
    let action = sh.update(|st| st.assign(&id, req.distribution, &req.assignment, now_ms()))?;
    Ok(created(json!({ "action": action })))
}

#[derive(Deserialize)]
struct NewModule {
    #[serde(default = "default_part")]
    part: String,
    name: String,
    version: String,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
    #[serde(default)]
    encrypted: bool,
}

fn default_part() -> String {
    "os".into()
}

async fn create_module(AxState(sh): Sh, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: NewModule = body(&b)?;
    let id = sh.update(|st| {
        let id = st.create_module(&req.part, &req.name, &req.version);
        if let Some(m) = st.modules.get_mut(&id) {
            m.metadata = req.metadata.into_iter().collect();
            m.encrypted = req.encrypted;
        }
        id
    });
    Ok(created(json!({ "id": id })))
}

async fn show_module(AxState(sh): Sh, Path(id): Path<u64>) -> ApiResult<Json<Value>> {
    let st = sh.lock();
    let m = st
        .modules
        .get(&id)
        .ok_or_else(|| MgmtError::NotFound(format!("software module {id}")))?;
    Ok(Json(json!({
        "id": m.id, "part": m.part, "name": m.name, "version": m.version,
        "artifacts": m.artifacts.iter().map(ArtifactView::from).collect::<Vec<_>>(),
    })))
}

#[derive(Deserialize)]
struct FileArtifact {
    filename: Option<String>,
    path: std::path::PathBuf,
}

async fn register_artifact_file(
    AxState(sh): Sh,
    Path(id): Path<u64>,
    b: axum::body::Bytes,
) -> ApiResult<Response> {
    let req: FileArtifact = body(&b)?;
    let filename = match req.filename {
        Some(f) => f,
        None => req
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .map(str::to_string)
            .ok_or_else(|| bad("path has no file name"))?,
    };
    let path = req.path.clone();
    let artifact = tokio::task::spawn_blocking(move || Artifact::from_file(&filename, &path))
        .await
        .map_err(|e| bad(e.to_string()))?
        .map_err(|e| bad(format!("cannot read {}: {e}", req.path.display())))?;
    let view = ArtifactView::from(&artifact);
    sh.update(|st| st.add_artifact(id, artifact))?;
    Ok(created(serde_json::to_value(view).unwrap_or_default()))
}

/// Streams the request body into the data directory, then registers it as a file artifact.
async fn upload_artifact(
    AxState(sh): Sh,
    Path((id, filename)): Path<(u64, String)>,
    req: Request,
) -> ApiResult<Response> {
    if !sh.lock().modules.contains_key(&id) {
        return Err(MgmtError::NotFound(format!("software module {id}")).into());
    }
    if filename.is_empty() || filename.contains('/') || filename.starts_with('.') {
        return Err(bad(format!("invalid artifact filename {filename:?}")));
    }
    let dir = sh.data_dir().join(format!("module-{id}"));
    let path = dir.join(&filename);
    let io = |e: std::io::Error| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("{}: {e}", path.display()),
        )
    };
    tokio::fs::create_dir_all(&dir).await.map_err(io)?;
    let mut file = tokio::fs::File::create(&path).await.map_err(io)?;
    let mut stream = Body::new(req.into_body()).into_data_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| bad(format!("upload interrupted: {e}")))?;
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.sync_all().await.map_err(io)?;
    drop(file);
    let p = path.clone();
    let f = filename.clone();
    let artifact = tokio::task::spawn_blocking(move || Artifact::from_file(&f, &p))
        .await
        .map_err(|e| bad(e.to_string()))?
        .map_err(io)?;
    let view = ArtifactView::from(&artifact);
    sh.update(|st| st.add_artifact(id, artifact))?;
    Ok(created(serde_json::to_value(view).unwrap_or_default()))
}

#[derive(Deserialize)]
struct NewDistribution {
    name: String,
    version: String,
    modules: Vec<u64>,
}

async fn create_distribution(AxState(sh): Sh, b: axum::body::Bytes) -> ApiResult<Response> {
    let req: NewDistribution = body(&b)?;
    let id = sh.update(|st| st.create_distribution(&req.name, &req.version, &req.modules))?;
    Ok(created(json!({ "id": id })))
}

async fn show_action(AxState(sh): Sh, Path(id): Path<u64>) -> ApiResult<Json<ActionView>> {
    let st = sh.lock();
    let a = st
        .actions
        .get(&id)
        .ok_or_else(|| MgmtError::NotFound(format!("action {id}")))?;
    Ok(Json(ActionView::new(&st, a)))
}

#[derive(Deserialize, Default)]
struct CancelReq {
    #[serde(default)]
    force: bool,
}

async fn cancel(
    AxState(sh): Sh,
    Path(id): Path<u64>,
    b: axum::body::Bytes,
) -> ApiResult<StatusCode> {
    let req: CancelReq = if b.is_empty() {
        CancelReq::default()
    } else {
        body(&b)?
    };
    sh.update(|st| st.cancel(id, req.force, now_ms()))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_faults(AxState(sh): Sh) -> Json<Vec<Fault>> {
    Json(sh.lock().faults.clone())
}

async fn add_fault(AxState(sh): Sh, b: axum::body::Bytes) -> ApiResult<Response> {
    let mut fault: Fault = body(&b)?;
    let id = sh.update(|st| {
        let id = st.faults.iter().map(|f| f.id).max().unwrap_or(0) + 1;
        fault.id = id;
        st.faults.push(fault);
        id
    });
    Ok(created(json!({ "id": id })))
}

async fn clear_faults(AxState(sh): Sh) -> StatusCode {
    sh.update(|st| st.faults.clear());
    StatusCode::NO_CONTENT
}

async fn show_config(AxState(sh): Sh) -> Json<Config> {
    Json(sh.lock().config.clone())
}

/// Partial update: given fields replace the current ones.
async fn update_config(AxState(sh): Sh, b: axum::body::Bytes) -> ApiResult<Json<Config>> {
    let patch: Value = body(&b)?;
    let Value::Object(patch) = patch else {
        return Err(bad("config update must be a JSON object"));
    };
    sh.update(|st| {
        let mut current = serde_json::to_value(&st.config).unwrap_or_default();
        for (k, v) in patch {
            if current.get(&k).is_none() {
                return Err(bad(format!("unknown config field {k:?}")));
            }
            current[k] = v;
        }
        let cfg: Config =
            serde_json::from_value(current).map_err(|e| bad(format!("invalid config: {e}")))?;
        st.config = cfg.clone();
        Ok(Json(cfg))
    })
}
