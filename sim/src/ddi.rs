//! The DDI API v1 over HTTP: request parsing in hawkBit's order (auth, path, method, Accept,
//! Content-Type, body), JSON rendering with HAL links and ETag/304, and error bodies per version.
//! All paths go through [`handle`] (the router's fallback) so every DDI request shares one prelude.

use super::download;
use super::faults::{trigger, Endpoint, Triggered};
use super::model::{
    now_ms, Action, ActionFeedback, ConfirmationFeedback, DdiError, RequestRecord, State,
    UpdateMode,
};
use super::version::HawkbitVersion;
use super::Shared;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State as AxState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::Response;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Largest request body accepted (feedback, configData).
const MAX_BODY: usize = 4 << 20;

/// Which JSON media type the client accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Media {
    HalJson,
    Json,
    Cbor,
}

impl Media {
    fn content_type(self) -> &'static str {
        match self {
            Media::HalJson => "application/hal+json",
            Media::Json => "application/json",
            Media::Cbor => "application/cbor",
        }
    }
}

/// Parsed request path below `/{tenant}/controller/v1/{controllerId}`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Route {
    Poll,
    DeploymentBase(String),
    DeploymentFeedback(String),
    CancelAction(String),
    CancelFeedback(String),
    ConfigData,
    ArtifactList(String),
    Artifact(String, String),
    InstalledBase(String),
    PutInstalledBase,
    ConfirmationBase,
    ConfirmationAction(String),
    ConfirmationFeedback(String),
    ActivateAutoConfirm,
    DeactivateAutoConfirm,
}

impl Route {
    fn parse(rest: &[String]) -> Option<(Route, Method)> {
        let r: Vec<&str> = rest.iter().map(String::as_str).collect();
        let s = |i: usize| rest[i].clone();
        Some(match r.as_slice() {
            [] => (Route::Poll, Method::GET),
            ["deploymentBase", _] => (Route::DeploymentBase(s(1)), Method::GET),
            ["deploymentBase", _, "feedback"] => (Route::DeploymentFeedback(s(1)), Method::POST),
            ["cancelAction", _] => (Route::CancelAction(s(1)), Method::GET),
            ["cancelAction", _, "feedback"] => (Route::CancelFeedback(s(1)), Method::POST),
            ["configData"] => (Route::ConfigData, Method::PUT),
            ["softwaremodules", _, "artifacts"] => (Route::ArtifactList(s(1)), Method::GET),
            ["softwaremodules", _, "artifacts", _] => (Route::Artifact(s(1), s(3)), Method::GET),
            ["installedBase"] => (Route::PutInstalledBase, Method::PUT),
            ["installedBase", _] => (Route::InstalledBase(s(1)), Method::GET),
            ["confirmationBase"] => (Route::ConfirmationBase, Method::GET),
            ["confirmationBase", "activateAutoConfirm"] => {
                (Route::ActivateAutoConfirm, Method::POST)
            }
            ["confirmationBase", "deactivateAutoConfirm"] => {
                (Route::DeactivateAutoConfirm, Method::POST)
            }
            ["confirmationBase", _] => (Route::ConfirmationAction(s(1)), Method::GET),
            ["confirmationBase", _, "feedback"] => {
                (Route::ConfirmationFeedback(s(1)), Method::POST)
            }
            _ => return None,
        })
    }

    fn endpoint(&self) -> Endpoint {
        match self {
            Route::Poll => Endpoint::Poll,
            Route::DeploymentBase(_) => Endpoint::DeploymentBase,
            Route::DeploymentFeedback(_) => Endpoint::DeploymentFeedback,
            Route::CancelAction(_) => Endpoint::CancelAction,
            Route::CancelFeedback(_) => Endpoint::CancelFeedback,
            Route::ConfigData => Endpoint::ConfigData,
            Route::ArtifactList(_) => Endpoint::ArtifactList,
            Route::Artifact(..) => Endpoint::Download,
            Route::InstalledBase(_) | Route::PutInstalledBase => Endpoint::InstalledBase,
            Route::ConfirmationBase | Route::ConfirmationAction(_) => Endpoint::ConfirmationBase,
            Route::ConfirmationFeedback(_)
            | Route::ActivateAutoConfirm
            | Route::DeactivateAutoConfirm => Endpoint::ConfirmationFeedback,
        }
    }

    /// JSON GET resources (Accept negotiated, ETag filter).
    fn is_json_get(&self) -> bool {
        matches!(
            self,
            Route::Poll
                | Route::DeploymentBase(_)
                | Route::CancelAction(_)
                | Route::ArtifactList(_)
                | Route::InstalledBase(_)
                | Route::ConfirmationBase
                | Route::ConfirmationAction(_)
        )
    }

    fn exists_in(&self, v: HawkbitVersion) -> bool {
        match self {
            Route::InstalledBase(_)
            | Route::ConfirmationBase
            | Route::ConfirmationAction(_)
            | Route::ConfirmationFeedback(_)
            | Route::ActivateAutoConfirm
            | Route::DeactivateAutoConfirm => v.supports_confirmation_and_installed_base(),
            Route::PutInstalledBase => v.supports_put_installed_base(),
            _ => true,
        }
    }
}

/// The headers that are text, by lower-case name (repeated ones joined with `, `).
fn header_texts(headers: &HeaderMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::<String, String>::new();
    for (name, value) in headers {
        let Ok(value) = value.to_str() else { continue };
        out.entry(name.as_str().to_string())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(value);
            })
            .or_insert_with(|| value.to_string());
    }
    out
}

/// Decodes `%XX` escapes of one path segment.
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok();
            if let Some(v) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes a path segment (filenames in links).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An empty response with this status.
pub fn empty(status: StatusCode) -> Response {
    let mut r = Response::new(Body::empty());
    *r.status_mut() = status;
    r
}

fn json_error(
    status: StatusCode,
    class: &str,
    code: &str,
    message: &str,
    info: Option<Value>,
    v: HawkbitVersion,
) -> Response {
    let mut body = Map::new();
    body.insert("exceptionClass".into(), json!(class));
    body.insert("errorCode".into(), json!(code));
    body.insert("message".into(), json!(message));
    if let Some(info) = info {
        if v.error_body_has_info() {
            body.insert("info".into(), info);
        } else {
            let params: Vec<Value> = info
                .as_object()
                .map(|m| m.values().cloned().collect())
                .unwrap_or_default();
            body.insert("parameters".into(), Value::Array(params));
        }
    }
    let mut r = Response::new(Body::from(Value::Object(body).to_string()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// hawkBit's answer to a refused DDI request.
pub fn error_response(e: &DdiError, v: HawkbitVersion) -> Response {
    let msg = e.to_string();
    match e {
        DdiError::NotFound => empty(StatusCode::NOT_FOUND),
        DdiError::EntityNotFound { kind, id } => json_error(
            StatusCode::NOT_FOUND,
            "org.eclipse.hawkbit.repository.exception.EntityNotFoundException",
            "hawkbit.server.error.repo.entityNotFound",
            &msg,
            Some(json!({"type": kind, "entityId": id})),
            v,
        ),
        DdiError::Gone => empty(StatusCode::GONE),
        DdiError::NotReadable(_) => json_error(
            StatusCode::BAD_REQUEST,
            "org.eclipse.hawkbit.rest.exception.MessageNotReadableException",
            "hawkbit.server.error.rest.body.notReadable",
            &msg,
            None,
            v,
        ),
        DdiError::ConstraintViolation(_) => json_error(
            StatusCode::BAD_REQUEST,
            "jakarta.validation.ConstraintViolationException",
            "hawkbit.server.error.repo.constraintViolation",
            &msg,
            None,
            v,
        ),
        DdiError::InvalidAttributes(_) => json_error(
            StatusCode::BAD_REQUEST,
            "org.eclipse.hawkbit.repository.exception.InvalidTargetAttributeException",
            "hawkbit.server.error.repo.invalidTargetAttributes",
            &msg,
            None,
            v,
        ),
        DdiError::Quota(_) => json_error(
            StatusCode::from_u16(v.quota_status()).unwrap_or(StatusCode::TOO_MANY_REQUESTS),
            "org.eclipse.hawkbit.repository.exception.AssignmentQuotaExceededException",
            "hawkbit.server.error.quota.tooManyEntries",
            &msg,
            None,
            v,
        ),
        DdiError::NotCancelable(_) => json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "org.eclipse.hawkbit.repository.exception.CancelActionNotAllowedException",
            "hawkbit.server.error.action.notCancelable",
            &msg,
            None,
            v,
        ),
        DdiError::AutoConfirmActive(_) => json_error(
            StatusCode::CONFLICT,
            "org.eclipse.hawkbit.repository.exception.AutoConfirmationAlreadyActiveException",
            "hawkbit.server.error.repo.autoConfAlreadyActive",
            &msg,
            None,
            v,
        ),
    }
}

/// Picks the response media type from `Accept`; None = 406.
fn negotiate(headers: &HeaderMap) -> Option<Media> {
    let Some(accept) = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) else {
        return Some(Media::HalJson);
    };
    if accept.trim().is_empty() {
        return Some(Media::HalJson);
    }
    for item in accept.split(',') {
        let mt = item
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        match mt.as_str() {
            "application/hal+json" | "*/*" | "application/*" => return Some(Media::HalJson),
            "application/json" => return Some(Media::Json),
            "application/cbor" => return Some(Media::Cbor),
            _ => {}
        }
    }
    None
}

/// The request body's format from `Content-Type`: JSON or CBOR; None = 415.
fn body_format(headers: &HeaderMap) -> Option<Media> {
    let ct = headers.get(header::CONTENT_TYPE)?.to_str().ok()?;
    let mt = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mt.as_str() {
        "application/json" => Some(Media::Json),
        "application/cbor" => Some(Media::Cbor),
        _ => None,
    }
}

/// `ETag` of a JSON body as Spring's ShallowEtagHeaderFilter makes it: `"0<md5 hex>"`.
pub fn json_etag(body: &[u8]) -> String {
    use md5::Digest;
    format!("\"0{}\"", hex::encode(md5::Md5::digest(body)))
}

/// Renders a JSON GET answer: ETag and 304, media type, and the body faults.
fn json_response(value: &Value, media: Media, headers: &HeaderMap, faults: &Triggered) -> Response {
    let edited;
    let value = match &faults.set_json {
        Some((pointer, new)) => {
            let mut v = value.clone();
            super::faults::set_json(&mut v, pointer, new.clone());
            edited = v;
            &edited
        }
        None => value,
    };
    let body = match media {
        Media::Cbor => super::cbor::encode(value),
        Media::HalJson | Media::Json => value.to_string().into_bytes(),
    };
    let etag = json_etag(&body);
    let not_modified = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if not_modified {
        let mut r = empty(StatusCode::NOT_MODIFIED);
        r.headers_mut()
            .insert(header::ETAG, HeaderValue::from_str(&etag).expect("ascii"));
        return r;
    }
    let body = if faults.malformed_json {
        // Cut before the final brace and add junk: no JSON parser accepts this.
        let mut b = body[..body.len().saturating_sub(1)].to_vec();
        b.extend_from_slice(b",\"<garbage");
        b
    } else {
        body
    };
    let mut r = download::body_response(Bytes::from(body), faults);
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(media.content_type()),
    );
    r.headers_mut()
        .insert(header::ETAG, HeaderValue::from_str(&etag).expect("ascii"));
    r
}

/// Base URL for links, from the request's Host (scheme http: this server has no TLS).
fn request_base(headers: &HeaderMap) -> String {
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("127.0.0.1");
    format!("http://{host}")
}

/// `base` (`http://host[:port]`) with another host name, same port.
fn on_host(base: &str, host: &str) -> String {
    let port = base
        .rsplit_once(':')
        .map(|(_, p)| p)
        .filter(|p| p.chars().all(|c| c.is_ascii_digit()));
    match port {
        Some(p) => format!("http://{host}:{p}"),
        None => format!("http://{host}"),
    }
}

/// Everything a handler needs about the request.
struct Ctx<'a> {
    shared: &'a Arc<Shared>,
    tenant: String,
    controller_id: String,
    base: String,
    headers: HeaderMap,
    query: BTreeMap<String, String>,
    faults: Triggered,
    media: Media,
}

impl Ctx<'_> {
    fn controller_base(&self) -> String {
        self.controller_base_at(&self.base)
    }
    /// The controller base on `base` (`http://host[:port]`) instead of the request's.
    fn controller_base_at(&self, base: &str) -> String {
        format!(
            "{base}/{}/controller/v1/{}",
            self.tenant, self.controller_id
        )
    }
    fn version(&self) -> HawkbitVersion {
        self.shared.lock().config.version
    }
    fn query_int(&self, name: &str) -> i64 {
        self.query
            .get(name)
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }
}

fn parse_query(q: Option<&str>) -> BTreeMap<String, String> {
    q.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (percent_decode(k), percent_decode(v)),
            None => (percent_decode(p), String::new()),
        })
        .collect()
}

fn parse_id(s: &str) -> Result<u64, DdiError> {
    s.parse::<u64>()
        .map_err(|_| DdiError::NotReadable(format!("Failed to convert value {s:?} to a number")))
}

/// The router fallback: every `/{tenant}/controller/v1/{controllerId}/...` request (logged at
/// info level with its status, for test and demo logs, and in the request log with its answer).
pub async fn handle(state: AxState<Arc<Shared>>, req: Request) -> Response {
    let line = format!("{} {}", req.method(), req.uri());
    let shared = Arc::clone(&state.0);
    let mut logged = None;
    let response = handle_request(state, req, &mut logged).await;
    let status = response.status().as_u16();
    tracing::info!("{line} -> {status}");
    if let Some(seq) = logged {
        let body_len = response
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok());
        shared.log_answer(seq, status, body_len);
    }
    response
}

/// Answers a request; `logged` gets its sequence number in the request log.
async fn handle_request(
    AxState(shared): AxState<Arc<Shared>>,
    req: Request,
    logged: &mut Option<u64>,
) -> Response {
    let (parts, body) = req.into_parts();
    let segments: Vec<String> = parts
        .uri
        .path()
        .split('/')
        .skip(1)
        .map(percent_decode)
        .collect();
    let segments: Vec<String> = match segments.last() {
        Some(last) if last.is_empty() && segments.len() > 4 => {
            segments[..segments.len() - 1].to_vec()
        }
        _ => segments,
    };
    if segments.len() < 4
        || segments[1] != "controller"
        || segments[2] != "v1"
        || segments[3].is_empty()
    {
        return empty(StatusCode::NOT_FOUND);
    }
    let tenant = segments[0].clone();
    let controller_id = segments[3].clone();
    let route = Route::parse(&segments[4..]);
    let endpoint = route
        .as_ref()
        .map(|(r, _)| r.endpoint())
        .unwrap_or(Endpoint::Any);
    let method = parts.method.clone();

    let record = RequestRecord {
        seq: 0, // assigned by the log
        method: method.to_string(),
        uri: parts.uri.to_string(),
        endpoint,
        controller_id: controller_id.clone(),
        headers: header_texts(&parts.headers),
        status: None,
        body_len: None,
    };
    // Faults act like a proxy in front of the server: before anything else.
    let (faults, version) = {
        let mut st = shared.lock();
        *logged = Some(st.log_request(record));
        let t = trigger(&mut st.faults, endpoint, &controller_id);
        (t, st.config.version)
    };
    if let Some((code, retry_after)) = faults.status {
        let mut r = empty(StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE));
        if let Some(secs) = retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        return r;
    }

    if controller_id.chars().count() > 256 {
        return error_response(
            &DdiError::ConstraintViolation(
                "controllerId must not be longer than 256 characters".into(),
            ),
            version,
        );
    }

    // Authentication (Spring Security runs before dispatch: 401 even for unknown paths).
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let registers = matches!(
        route,
        Some((Route::Poll, _)) | Some((Route::ConfirmationBase, _))
    ) && method == Method::GET;
    let proxy_headers: BTreeMap<String, String> = parts
        .headers
        .iter()
        .filter(|(name, _)| {
            let n = name.as_str();
            n.starts_with("x-ssl-") || n.starts_with("x-authority") || n == "x-controller-id"
        })
        .filter_map(|(name, v)| Some((name.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    let authenticated = {
        let mut st = shared.lock();
        let known = st.targets.len();
        let ok = st.config.tenant.eq_ignore_ascii_case(&tenant)
            && st.authenticate(&controller_id, authorization, &proxy_headers, registers);
        // Only a plug-and-play registration changes the state.
        if st.targets.len() != known {
            if let Err(e) = shared.save(&st) {
                tracing::warn!("{e}");
            }
        }
        ok
    };
    if !authenticated {
        return empty(StatusCode::UNAUTHORIZED);
    }

    let Some((route, allowed)) = route else {
        return empty(StatusCode::NOT_FOUND);
    };
    let is_get = method == Method::GET || method == Method::HEAD;
    if !(method == allowed || (allowed == Method::GET && is_get)) {
        let mut r = empty(StatusCode::METHOD_NOT_ALLOWED);
        r.headers_mut().insert(
            header::ALLOW,
            HeaderValue::from_str(allowed.as_str()).expect("ascii"),
        );
        return r;
    }
    if !route.exists_in(version) {
        return empty(StatusCode::NOT_FOUND);
    }
    let media = if route.is_json_get() {
        match negotiate(&parts.headers) {
            Some(Media::Cbor) if !version.supports_cbor() => {
                return empty(StatusCode::NOT_ACCEPTABLE)
            }
            Some(m) => m,
            None => return empty(StatusCode::NOT_ACCEPTABLE),
        }
    } else {
        Media::Json
    };
    let body = if allowed == Method::GET {
        Bytes::new()
    } else {
        match axum::body::to_bytes(body, MAX_BODY).await {
            Ok(b) => b,
            Err(_) => {
                return error_response(
                    &DdiError::NotReadable("request body too large or unreadable".into()),
                    version,
                )
            }
        }
    };
    // activateAutoConfirm takes an optional body; every other body endpoint requires JSON or
    // CBOR (CBOR is re-encoded as JSON here, so handlers see one format).
    let body_optional = route == Route::ActivateAutoConfirm && body.is_empty();
    let body = if allowed == Method::GET || body_optional || route == Route::DeactivateAutoConfirm {
        body
    } else {
        match body_format(&parts.headers) {
            None => return empty(StatusCode::UNSUPPORTED_MEDIA_TYPE),
            Some(Media::Cbor) if !version.supports_cbor() => {
                return empty(StatusCode::UNSUPPORTED_MEDIA_TYPE)
            }
            Some(Media::Cbor) => match super::cbor::decode(&body) {
                Ok(v) => Bytes::from(v.to_string()),
                Err(e) => return error_response(&DdiError::NotReadable(e.to_string()), version),
            },
            Some(_) => body,
        }
    };

    let ctx = Ctx {
        shared: &shared,
        tenant,
        controller_id,
        base: request_base(&parts.headers),
        headers: parts.headers.clone(),
        query: parse_query(parts.uri.query()),
        faults,
        media,
    };
    let result = match &route {
        Route::Poll => poll(&ctx),
        Route::DeploymentBase(id) => deployment_base(&ctx, id),
        Route::DeploymentFeedback(id) => deployment_feedback(&ctx, id, &body),
        Route::CancelAction(id) => cancel_action(&ctx, id),
        Route::CancelFeedback(id) => cancel_feedback(&ctx, id, &body),
        Route::ConfigData => config_data(&ctx, &body),
        Route::ArtifactList(m) => artifact_list(&ctx, m),
        Route::Artifact(m, f) => {
            let uri = format!("{}{}", ctx.base, parts.uri);
            return match parse_id(m) {
                Ok(m) => {
                    download::artifact(
                        &shared,
                        &ctx.controller_id,
                        m,
                        f,
                        &ctx.headers,
                        &uri,
                        &ctx.faults,
                    )
                    .await
                }
                Err(e) => error_response(&e, version),
            };
        }
        Route::InstalledBase(id) => installed_base(&ctx, id),
        Route::PutInstalledBase => put_installed_base(&ctx, &body),
        Route::ConfirmationBase => confirmation_base(&ctx),
        Route::ConfirmationAction(id) => confirmation_action(&ctx, id),
        Route::ConfirmationFeedback(id) => confirmation_feedback(&ctx, id, &body),
        Route::ActivateAutoConfirm => activate_auto_confirm(&ctx, &body),
        Route::DeactivateAutoConfirm => ctx
            .shared
            .update(|st| st.ddi_deactivate_auto_confirm(&ctx.controller_id))
            .map(|_| empty(StatusCode::OK)),
    };
    match result {
        Ok(r) => r,
        Err(e) => error_response(&e, version),
    }
}

fn link(href: String) -> Value {
    json!({ "href": href })
}

fn poll(ctx: &Ctx) -> Result<Response, DdiError> {
    let now = now_ms();
    let cid = &ctx.controller_id;
    let value = ctx.shared.update(|st| -> Result<Value, DdiError> {
        st.register_poll(cid, now)?;
        let base = match &st.config.action_link_host {
            Some(host) => ctx.controller_base_at(&on_host(&ctx.base, host)),
            None => ctx.controller_base(),
        };
        let sleep =
            super::model::format_sleep(st.poll_sleep_ms(cid, now), st.config.version.iso_polling());
        use super::model::ActionStatus as S;
        let mut links = Map::new();
        if let Some(a) = st.current_action(cid) {
            match a.status {
                S::WaitForConfirmation => {
                    links.insert(
                        "confirmationBase".into(),
                        link(format!(
                            "{base}/confirmationBase/{}?c={}",
                            a.id,
                            a.cache_buster(now)
                        )),
                    );
                }
                S::Canceling | S::Canceled => {
                    links.insert(
                        "cancelAction".into(),
                        link(format!("{base}/cancelAction/{}", a.id)),
                    );
                }
                _ => {
                    links.insert(
                        "deploymentBase".into(),
                        link(format!(
                            "{base}/deploymentBase/{}?c={}",
                            a.id,
                            a.cache_buster(now)
                        )),
                    );
                }
            }
        }
        let t = &st.targets[cid];
        // hawkBit links the newest FINISHED action of the installed set: a closed action whose
        // deploymentBase was fetched again is RETRIEVED and no longer linked.
        if let Some(installed) = t
            .installed_action
            .filter(|id| st.actions.get(id).is_some_and(|a| a.status == S::Finished))
        {
            links.insert(
                "installedBase".into(),
                link(format!("{base}/installedBase/{installed}")),
            );
        }
        if t.request_attributes {
            links.insert("configData".into(), link(format!("{base}/configData")));
        }
        let mut body = json!({ "config": { "polling": { "sleep": sleep } } });
        if !links.is_empty() {
            body["_links"] = Value::Object(links);
        }
        Ok(body)
    })?;
    Ok(json_response(&value, ctx.media, &ctx.headers, &ctx.faults))
}

/// The chunks of an action's distribution set, with artifact links.
fn chunks_json(st: &State, a: &Action, ctx: &Ctx) -> Vec<Value> {
    let Some(ds) = st.distributions.get(&a.distribution) else {
        return Vec::new();
    };
    ds.modules
        .iter()
        .filter_map(|m| st.modules.get(m))
        .map(|m| {
            let part = match m.part.as_str() {
                "application" => "bApp",
                "runtime" => "jvm",
                p => p,
            };
            let mut chunk = json!({
                "part": part,
                "version": m.version,
                "name": m.name,
                "artifacts": m.artifacts.iter().map(|art| artifact_json(st, m.id, art, ctx)).collect::<Vec<_>>(),
            });
            if m.encrypted {
                chunk["encrypted"] = json!(true);
            }
            if !m.metadata.is_empty() {
                chunk["metadata"] = Value::Array(m.metadata.iter().map(|(k, v)| json!({"key": k, "value": v})).collect());
            }
            chunk
        })
        .collect()
}

fn wrong(hash: &str) -> String {
    // Same length, different value: flip every hex digit.
    hash.chars()
        .map(|c| if c == '0' { 'f' } else { '0' })
        .collect()
}

fn artifact_json(st: &State, module: u64, a: &super::model::Artifact, ctx: &Ctx) -> Value {
    let (sha1, md5, sha256) = if ctx.faults.wrong_hash {
        (wrong(&a.sha1), wrong(&a.md5), wrong(&a.sha256))
    } else {
        (a.sha1.clone(), a.md5.clone(), a.sha256.clone())
    };
    let mut hashes = json!({ "sha1": sha1, "md5": md5 });
    if st.config.version.advertises_sha256() {
        hashes["sha256"] = json!(sha256);
    }
    let path = format!(
        "/{}/controller/v1/{}/softwaremodules/{module}/artifacts/{}",
        ctx.tenant,
        ctx.controller_id,
        percent_encode(&a.filename)
    );
    let mut links = Map::new();
    links.insert("download-http".into(), link(format!("{}{path}", ctx.base)));
    links.insert(
        "md5sum-http".into(),
        link(format!("{}{path}.MD5SUM", ctx.base)),
    );
    if let Some(host) = &st.config.download_link_host {
        let base = on_host(&ctx.base, host);
        links.insert("download".into(), link(format!("{base}{path}")));
        links.insert("md5sum".into(), link(format!("{base}{path}.MD5SUM")));
    }
    json!({ "filename": a.filename, "hashes": hashes, "size": a.size, "_links": links })
}

/// `DdiDeploymentBase` (key `deployment`) or `DdiConfirmationBaseAction` (key `confirmation`).
fn action_json(st: &State, a: &Action, key: &str, ctx: &Ctx, history: i64, now: i64) -> Value {
    let (download, update, window) = a.deployment_modes(now);
    let mut dep =
        json!({ "download": download, "update": update, "chunks": chunks_json(st, a, ctx) });
    if let Some(w) = window {
        dep["maintenanceWindow"] = json!(w);
    }
    let mut body = json!({ "id": a.id.to_string() });
    body[key] = dep;
    if let Some((status, messages)) = st.action_history(a, history) {
        if !messages.is_empty() {
            body["actionHistory"] = json!({ "status": status, "messages": messages });
        }
    }
    body
}

fn deployment_base(ctx: &Ctx, id: &str) -> Result<Response, DdiError> {
    let id = parse_id(id)?;
    let now = now_ms();
    let history = ctx.query_int("actionHistory");
    let value = ctx.shared.update(|st| -> Result<Value, DdiError> {
        st.retrieve_deployment(&ctx.controller_id, id, now)?;
        let a = st.actions[&id].clone();
        Ok(action_json(st, &a, "deployment", ctx, history, now))
    })?;
    Ok(json_response(&value, ctx.media, &ctx.headers, &ctx.faults))
}

fn parse_json(body: &[u8]) -> Result<Value, DdiError> {
    serde_json::from_slice(body)
        .map_err(|e| DdiError::NotReadable(format!("Failed to read request body: {e}")))
}

fn parse_feedback(body: &[u8]) -> Result<(ActionFeedback, Value), DdiError> {
    let raw = parse_json(body)?;
    let fb: ActionFeedback = serde_json::from_value(raw.clone())
        .map_err(|e| DdiError::NotReadable(format!("Invalid feedback body: {e}")))?;
    Ok((fb, raw))
}

fn deployment_feedback(ctx: &Ctx, id: &str, body: &[u8]) -> Result<Response, DdiError> {
    let id = parse_id(id)?;
    // Unknown target/action answers 404 before the body is judged, as hawkBit does.
    ctx.shared.lock().action_of(&ctx.controller_id, id)?;
    let (fb, raw) = parse_feedback(body)?;
    ctx.shared
        .update(|st| st.deployment_feedback(&ctx.controller_id, id, &fb, raw, now_ms()))?;
    Ok(empty(StatusCode::OK))
}

fn cancel_action(ctx: &Ctx, id: &str) -> Result<Response, DdiError> {
    let id = parse_id(id)?;
    let id = ctx
        .shared
        .update(|st| st.retrieve_cancel(&ctx.controller_id, id, now_ms()))?;
    let value = json!({ "id": id.to_string(), "cancelAction": { "stopId": id.to_string() } });
    Ok(json_response(&value, ctx.media, &ctx.headers, &ctx.faults))
}

fn cancel_feedback(ctx: &Ctx, id: &str, body: &[u8]) -> Result<Response, DdiError> {
    let id = parse_id(id)?;
    ctx.shared.lock().action_of(&ctx.controller_id, id)?;
    let (fb, raw) = parse_feedback(body)?;
    ctx.shared
        .update(|st| st.cancel_feedback(&ctx.controller_id, id, &fb, raw, now_ms()))?;
    Ok(empty(StatusCode::OK))
}

#[derive(serde::Deserialize)]
struct ConfigDataBody {
    #[serde(default)]
    data: Option<BTreeMap<String, Option<String>>>,
    #[serde(default)]
    mode: Option<UpdateMode>,
    #[serde(default)]
    status: Option<Value>,
}

fn config_data(ctx: &Ctx, body: &[u8]) -> Result<Response, DdiError> {
    let raw = parse_json(body)?;
    let cd: ConfigDataBody = serde_json::from_value(raw)
        .map_err(|e| DdiError::NotReadable(format!("Invalid configData body: {e}")))?;
    if ctx.version().config_data_requires_status() && cd.status.is_none() {
        return Err(DdiError::NotReadable(
            "configData needs a status object on this server version".into(),
        ));
    }
    let data = match cd.data {
        Some(d) if !d.is_empty() => d,
        _ => {
            return Err(DdiError::ConstraintViolation(
                "data must not be empty".into(),
            ))
        }
    };
    ctx.shared
        .update(|st| st.config_data(&ctx.controller_id, data, cd.mode.unwrap_or_default()))?;
    Ok(empty(StatusCode::OK))
}

fn artifact_list(ctx: &Ctx, module: &str) -> Result<Response, DdiError> {
    let module = parse_id(module)?;
    let value = {
        let st = ctx.shared.lock();
        if !st.targets.contains_key(&ctx.controller_id) {
            return Err(DdiError::EntityNotFound {
                kind: "Target",
                id: ctx.controller_id.clone(),
            });
        }
        let m = st.modules.get(&module).ok_or(DdiError::EntityNotFound {
            kind: "SoftwareModule",
            id: module.to_string(),
        })?;
        if !st.artifact_list_allowed(&ctx.controller_id, module) {
            return Err(DdiError::EntityNotFound {
                kind: "SoftwareModule",
                id: module.to_string(),
            });
        }
        Value::Array(
            m.artifacts
                .iter()
                .map(|a| artifact_json(&st, module, a, ctx))
                .collect(),
        )
    };
    Ok(json_response(&value, ctx.media, &ctx.headers, &ctx.faults))
}

fn installed_base(ctx: &Ctx, id: &str) -> Result<Response, DdiError> {
    let id = parse_id(id)?;
    let history = ctx.query_int("actionHistory");
    let value = {
        let st = ctx.shared.lock();
        let a = st.installed_action(&ctx.controller_id, id)?.clone();
        action_json(&st, &a, "deployment", ctx, history, now_ms())
    };
    Ok(json_response(&value, ctx.media, &ctx.headers, &ctx.faults))
}

#[derive(serde::Deserialize)]
struct AssignedVersion {
    name: String,
    version: String,
}

fn put_installed_base(ctx: &Ctx, body: &[u8]) -> Result<Response, DdiError> {
    let raw = parse_json(body)?;
    let v: AssignedVersion = serde_json::from_value(raw)
        .map_err(|e| DdiError::NotReadable(format!("Invalid installedBase body: {e}")))?;
    let created = ctx
        .shared
        .update(|st| st.put_installed_base(&ctx.controller_id, &v.name, &v.version, now_ms()))?;
    Ok(empty(if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    }))
}

fn confirmation_base(ctx: &Ctx) -> Result<Response, DdiError> {
    let now = now_ms();
    let base = ctx.controller_base();
    let value = {
        let st = ctx.shared.lock();
        let t = st
            .targets
            .get(&ctx.controller_id)
            .ok_or(DdiError::EntityNotFound {
                kind: "Target",
                id: ctx.controller_id.clone(),
            })?;
        let mut links = Map::new();
        let auto = match &t.auto_confirm {
            Some(ac) => {
                links.insert(
                    "deactivateAutoConfirm".into(),
                    link(format!("{base}/confirmationBase/deactivateAutoConfirm")),
                );
                let mut v = json!({ "active": true, "activatedAt": ac.activated_at });
                if let Some(i) = &ac.initiator {
                    v["initiator"] = json!(i);
                }
                if let Some(r) = &ac.remark {
                    v["remark"] = json!(r);
                }
                v
            }
            None => {
                links.insert(
                    "activateAutoConfirm".into(),
                    link(format!("{base}/confirmationBase/activateAutoConfirm")),
                );
                if st.config.version.activated_at_zero_when_inactive() {
                    json!({ "active": false, "activatedAt": 0 })
                } else {
                    json!({ "active": false })
                }
            }
        };
        if let Some(id) = st.confirmation_action(&ctx.controller_id) {
            let c = st.actions[&id].cache_buster(now);
            links.insert(
                "confirmationBase".into(),
                link(format!("{base}/confirmationBase/{id}?c={c}")),
            );
        }
        json!({ "autoConfirm": auto, "_links": links })
    };
    Ok(json_response(&value, ctx.media, &ctx.headers, &ctx.faults))
}

fn confirmation_action(ctx: &Ctx, id: &str) -> Result<Response, DdiError> {
    let id = parse_id(id)?;
    let history = ctx.query_int("actionHistory");
    let value = {
        let st = ctx.shared.lock();
        let a = st.confirmation_of(&ctx.controller_id, id)?.clone();
        action_json(&st, &a, "confirmation", ctx, history, now_ms())
    };
    Ok(json_response(&value, ctx.media, &ctx.headers, &ctx.faults))
}

fn confirmation_feedback(ctx: &Ctx, id: &str, body: &[u8]) -> Result<Response, DdiError> {
    let id = parse_id(id)?;
    ctx.shared.lock().action_of(&ctx.controller_id, id)?;
    let raw = parse_json(body)?;
    let fb: ConfirmationFeedback = serde_json::from_value(raw.clone())
        .map_err(|e| DdiError::NotReadable(format!("Invalid confirmation body: {e}")))?;
    ctx.shared
        .update(|st| st.confirmation_feedback(&ctx.controller_id, id, &fb, raw, now_ms()))?;
    Ok(empty(StatusCode::OK))
}

#[derive(serde::Deserialize, Default)]
struct AutoConfirmBody {
    #[serde(default)]
    initiator: Option<String>,
    #[serde(default)]
    remark: Option<String>,
}

fn activate_auto_confirm(ctx: &Ctx, body: &[u8]) -> Result<Response, DdiError> {
    let b: AutoConfirmBody = if body.is_empty() {
        AutoConfirmBody::default()
    } else {
        serde_json::from_value(parse_json(body)?)
            .map_err(|e| DdiError::NotReadable(format!("Invalid autoConfirm body: {e}")))?
    };
    ctx.shared.update(|st| {
        st.ddi_activate_auto_confirm(&ctx.controller_id, b.initiator, b.remark, now_ms())
    })?;
    Ok(empty(StatusCode::OK))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_and_encodes_segments() {
        assert_eq!(percent_decode("a%20b%2Bc"), "a b+c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(percent_encode("my file+1.bin"), "my%20file%2B1.bin");
    }

    #[test]
    fn negotiates_like_spring() {
        let mut h = HeaderMap::new();
        assert_eq!(negotiate(&h), Some(Media::HalJson));
        h.insert(header::ACCEPT, HeaderValue::from_static("application/json"));
        assert_eq!(negotiate(&h), Some(Media::Json));
        h.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/atom+xml"),
        );
        assert_eq!(negotiate(&h), None);
    }
}
