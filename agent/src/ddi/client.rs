//! The DDI HTTP client: authentication, TLS, timeouts, retries and the conditional poll.
//!
//! The token goes only to the server's own origin (scheme, host and port of `[server] url`),
//! whatever link the server's JSON names, unless `send_token_to_other_hosts` allows more: one
//! rule ([`DdiClient::auth_header_for`]) for DDI links and artifact downloads alike. The shared
//! `reqwest::Client` itself carries no token. Transient failures (connect errors, timeouts,
//! and the statuses [`crate::http_policy`] names) are retried with its backoff, honouring
//! `Retry-After`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE};
use reqwest::{Method, StatusCode};
use tracing::{debug, warn};

use super::{
    config_data_json, confirmation_json, CancelRequest, ConfirmationState, Deployment, Feedback,
    Link, ModelError, PollReply,
};
use crate::clock::{Clock, SystemClock};
use crate::config::ServerConfig;
use crate::http_policy::{self, Backoff};

/// What went wrong talking to the server.
#[derive(Debug, thiserror::Error)]
pub enum DdiError {
    #[error("cannot read {what} {path}: {source}")]
    File {
        what: &'static str,
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("{method} {url}: {message}")]
    Transport {
        method: Method,
        url: String,
        message: String,
    },
    #[error("{method} {url}: authentication failed (HTTP {status}); check the token or client certificate")]
    Auth {
        method: Method,
        url: String,
        status: u16,
    },
    #[error("{method} {url}: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        method: Method,
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: {source}")]
    Model { url: String, source: ModelError },
    #[error("{url}: refusing plain http:// because the server URL is https://")]
    Insecure { url: String },
    #[error("{method} {url}: answer body is larger than {limit} bytes; refusing it")]
    BodyTooLarge {
        method: Method,
        url: String,
        limit: usize,
    },
}

/// Largest DDI answer body read (poll, deploymentBase, cancel, confirmation): real ones are a
/// few KiB; artifacts are downloaded by the install pipeline, not here.
pub const MAX_DDI_BODY: usize = 1 << 20;

impl DdiError {
    /// HTTP status, when the server answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            DdiError::Auth { status, .. } | DdiError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Why an answer that arrived is refused for good (it does not parse, breaks a limit), or
    /// `None` when asking again may help (transport, HTTP status, a body for another action).
    pub fn refused_answer(&self) -> Option<String> {
        match self {
            DdiError::Model { source, .. } if !matches!(source, ModelError::IdMismatch { .. }) => {
                Some(source.to_string())
            }
            DdiError::BodyTooLarge { limit, .. } => {
                Some(format!("answer body is larger than {limit} bytes"))
            }
            _ => None,
        }
    }
}

/// The outcome of posting feedback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Accepted,
    /// 410: the action is closed on the server; the message is done with.
    Gone,
    /// 404/405: the server no longer wants this (action gone, not canceling any more).
    NotApplicable(u16),
    /// A permanent refusal of this very message (the entry quota of the action is full, or a
    /// 4xx such as 400 or 409): sending it again never helps, so it is dropped (logged here).
    Refused(u16),
}

/// A DDI client for one controller.
#[derive(Clone)]
pub struct DdiClient {
    http: reqwest::Client,
    base: String,
    auth: Option<HeaderValue>,
    /// The server URL: links on its origin get the token.
    origin: reqwest::Url,
    /// `[agent] send_token_to_other_hosts`: links on other origins get it too.
    token_to_other_hosts: bool,
    https_only: bool,
    retries: u32,
    backoff: Backoff,
    /// Deadline for one attempt of one DDI request, body included.
    request_deadline: Duration,
    etag: Option<(String, Vec<u8>)>,
    /// The device clock (feedback `timestamp` only when it is synchronised).
    clock: Arc<dyn Clock>,
}

impl std::fmt::Debug for DdiClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DdiClient")
            .field("base", &self.base)
            .finish()
    }
}

impl DdiClient {
    pub fn new(server: &ServerConfig) -> Result<DdiClient, DdiError> {
        let https_only = server.url.scheme() == "https";
        let mut builder = reqwest::Client::builder()
            .user_agent(concat!("ddi-agent/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(server.connect_timeout)
            .read_timeout(server.low_speed_timeout)
            .https_only(https_only)
            .redirect(reqwest::redirect::Policy::limited(5));
        if let Some(ca) = &server.ca_file {
            let pem = std::fs::read(ca).map_err(|source| DdiError::File {
                what: "CA file",
                path: ca.clone(),
                source,
            })?;
            for cert in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| DdiError::Tls(format!("{}: {e}", ca.display())))?
            {
                builder = builder.add_root_certificate(cert);
            }
        }
        if let (Some(cert), Some(key)) = (&server.client_cert, &server.client_key) {
            let mut pem = std::fs::read(cert).map_err(|source| DdiError::File {
                what: "client certificate",
                path: cert.clone(),
                source,
            })?;
            pem.push(b'\n');
            pem.extend(std::fs::read(key).map_err(|source| DdiError::File {
                what: "client key",
                path: key.clone(),
                source,
            })?);
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| DdiError::Tls(format!("client certificate/key: {e}")))?;
            builder = builder.identity(id);
        }
        let http = builder
            .build()
            .map_err(|e| DdiError::Tls(format!("HTTP client: {e}")))?;
        let auth = match server.auth.header_value() {
            Some(v) => {
                let mut v = HeaderValue::from_str(&v)
                    .map_err(|_| DdiError::Tls("token is not a valid header value".into()))?;
                v.set_sensitive(true);
                Some(v)
            }
            None => None,
        };
        Ok(DdiClient {
            http,
            base: server.base_url(),
            auth,
            origin: server.url.clone(),
            token_to_other_hosts: false,
            https_only,
            retries: server.retries.max(1),
            backoff: Backoff {
                first: Duration::from_secs(1),
                max: Duration::from_secs(300),
            },
            request_deadline: server.connect_timeout + server.low_speed_timeout,
            etag: None,
            clock: Arc::new(SystemClock),
        })
    }

    /// Uses `clock` for feedback times (tests fake the device clock through it).
    pub fn set_clock(&mut self, clock: Arc<dyn Clock>) {
        self.clock = clock;
    }

    /// The HTTP client for artifact downloads (no token attached by itself).
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// Lets links on other origins than the server's get the token too
    /// (`[agent] send_token_to_other_hosts`).
    pub fn set_token_to_other_hosts(&mut self, allow: bool) {
        self.token_to_other_hosts = allow;
    }

    /// The token header for a request to `url`: only on the server's origin, unless allowed
    /// for other hosts.
    fn token_for(&self, url: &str) -> Option<&HeaderValue> {
        self.auth
            .as_ref()
            .filter(|_| self.token_to_other_hosts || same_origin(&self.origin, url))
    }

    /// `("Authorization", value)` for a request to `url` (artifact downloads), by the same rule
    /// as every DDI request.
    pub fn auth_header_for(&self, url: &str) -> Option<(String, String)> {
        self.token_for(url).map(|v| {
            (
                AUTHORIZATION.as_str().to_string(),
                v.to_str().unwrap_or_default().to_string(),
            )
        })
    }

    /// The controller base URL (poll resource).
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// Shorter backoff for tests.
    pub fn set_backoff_base(&mut self, base: Duration) {
        self.backoff.first = base;
    }

    /// Polls the controller base; a 304 answer re-uses the previous body.
    pub async fn poll(&mut self) -> Result<PollReply, DdiError> {
        let url = self.base.clone();
        let mut headers = HeaderMap::new();
        if let Some((etag, _)) = &self.etag {
            if let Ok(v) = HeaderValue::from_str(etag) {
                headers.insert(reqwest::header::IF_NONE_MATCH, v);
            }
        }
        let resp = self.send(Method::GET, &url, headers, None).await?;
        let mut fresh_etag = None;
        let body = if resp.status == StatusCode::NOT_MODIFIED {
            match &self.etag {
                Some((_, body)) => body.clone(),
                None => {
                    return Err(DdiError::Status {
                        method: Method::GET,
                        url,
                        status: 304,
                        body: "Not Modified without a conditional request".into(),
                    })
                }
            }
        } else {
            fresh_etag = resp.etag.clone();
            let body = expect_ok(Method::GET, &url, resp)?;
            self.etag = None;
            body
        };
        let reply = PollReply::parse(&body).map_err(|source| DdiError::Model {
            url: url.clone(),
            source,
        })?;
        if let Some(e) = fresh_etag {
            self.etag = Some((e, body));
        }
        Ok(reply)
    }

    pub async fn deployment(&self, link: &Link) -> Result<Deployment, DdiError> {
        let body = self.get_json(&link.href).await?;
        Deployment::parse(&body, link).map_err(|source| DdiError::Model {
            url: link.href.clone(),
            source,
        })
    }

    pub async fn cancel_request(&self, link: &Link) -> Result<CancelRequest, DdiError> {
        let body = self.get_json(&link.href).await?;
        CancelRequest::parse(&body, link).map_err(|source| DdiError::Model {
            url: link.href.clone(),
            source,
        })
    }

    /// GET `{base}/confirmationBase`.
    pub async fn confirmation_state(&self) -> Result<ConfirmationState, DdiError> {
        let url = format!("{}/confirmationBase", self.base);
        let body = self.get_json(&url).await?;
        ConfirmationState::parse(&body).map_err(|source| DdiError::Model { url, source })
    }

    /// POSTs `{href}/feedback` (deploymentBase, cancelAction or confirmationBase link).
    pub async fn post_feedback_to(&self, href: &str, body: Vec<u8>) -> Result<Delivery, DdiError> {
        let url = Link {
            href: href.to_string(),
        }
        .join("/feedback");
        self.post_json(&url, body).await
    }

    pub async fn send_feedback(
        &self,
        action_link: &str,
        fb: &Feedback,
    ) -> Result<Delivery, DdiError> {
        let body = fb.to_json(self.clock.now_ms(), self.clock.synchronized());
        self.post_feedback_to(action_link, body).await
    }

    pub async fn send_confirmation(
        &self,
        link: &Link,
        confirmed: bool,
        details: &[String],
    ) -> Result<Delivery, DdiError> {
        self.post_feedback_to(&link.href, confirmation_json(confirmed, details))
            .await
    }

    /// PUT configData (mode merge) at the server's link, or `{base}/configData`.
    pub async fn put_config_data(
        &self,
        link: Option<&Link>,
        data: &BTreeMap<String, String>,
    ) -> Result<(), DdiError> {
        let url = link
            .map(|l| l.href.clone())
            .unwrap_or_else(|| format!("{}/configData", self.base));
        let resp = self
            .send(
                Method::PUT,
                &url,
                json_headers(),
                Some(config_data_json(data, now_ms())),
            )
            .await?;
        expect_ok(Method::PUT, &url, resp).map(|_| ())
    }

    async fn get_json(&self, url: &str) -> Result<Vec<u8>, DdiError> {
        let resp = self.send(Method::GET, url, HeaderMap::new(), None).await?;
        expect_ok(Method::GET, url, resp)
    }

    async fn post_json(&self, url: &str, body: Vec<u8>) -> Result<Delivery, DdiError> {
        let resp = self
            .send(Method::POST, url, json_headers(), Some(body))
            .await?;
        let status = resp.status.as_u16();
        match status {
            410 => Ok(Delivery::Gone),
            404 | 405 => Ok(Delivery::NotApplicable(status)),
            _ if refused_for_good(status, &resp.body) => {
                warn!(%url, status, body = %snippet(&resp.body), "feedback refused for good");
                Ok(Delivery::Refused(status))
            }
            _ => expect_ok(Method::POST, url, resp).map(|_| Delivery::Accepted),
        }
    }

    /// One request with retries for transient failures. Returns any final HTTP answer.
    async fn send(
        &self,
        method: Method,
        url: &str,
        mut headers: HeaderMap,
        body: Option<Vec<u8>>,
    ) -> Result<Answer, DdiError> {
        if self.https_only && url.starts_with("http://") {
            return Err(DdiError::Insecure {
                url: url.to_string(),
            });
        }
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        match self.token_for(url) {
            Some(auth) => {
                headers.insert(AUTHORIZATION, auth.clone());
            }
            None if self.auth.is_some() => {
                debug!(%url, "link on another origin than the server's: sent without the token");
            }
            None => {}
        }
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let mut req = self
                .http
                .request(method.clone(), url)
                .headers(headers.clone());
            if let Some(b) = &body {
                req = req.body(b.clone());
            }
            // One deadline over connect, headers and body: the low-speed timeout alone lets a
            // server trickle a body forever.
            let deadline = self.request_deadline;
            let attempt_result = tokio::time::timeout(deadline, async {
                match req.send().await {
                    Ok(mut resp) => {
                        let status = resp.status();
                        let retry_after = http_policy::retry_after(resp.headers());
                        let etag = resp
                            .headers()
                            .get(reqwest::header::ETAG)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        if resp
                            .content_length()
                            .is_some_and(|n| n > MAX_DDI_BODY as u64)
                        {
                            return Err(None);
                        }
                        let mut body = Vec::new();
                        loop {
                            match resp.chunk().await {
                                Ok(Some(chunk)) => {
                                    if body.len() + chunk.len() > MAX_DDI_BODY {
                                        return Err(None);
                                    }
                                    body.extend_from_slice(&chunk);
                                }
                                Ok(None) => break,
                                Err(e) => return Err(Some(e.to_string())),
                            }
                        }
                        Ok((status, retry_after, etag, body))
                    }
                    Err(e) => Err(Some(http_policy::describe(&e))),
                }
            })
            .await;
            let outcome = match attempt_result {
                Ok(Ok(answer)) => Ok(answer),
                Ok(Err(Some(message))) => Err(message),
                Ok(Err(None)) => {
                    return Err(DdiError::BodyTooLarge {
                        method: method.clone(),
                        url: url.to_string(),
                        limit: MAX_DDI_BODY,
                    })
                }
                Err(_) => Err(format!(
                    "no complete answer within {} s",
                    deadline.as_secs()
                )),
            };
            let (retry_after, failure) = match outcome {
                Ok((status, retry_after, etag, body)) => {
                    // A full entry quota stays full: a feedback POST is not retried.
                    let quota = method == Method::POST
                        && http_policy::is_quota_exceeded(status.as_u16(), &body);
                    if quota || !http_policy::is_transient_answer(status.as_u16(), &body) {
                        return Ok(Answer { status, etag, body });
                    }
                    (
                        retry_after,
                        DdiError::Status {
                            method: method.clone(),
                            url: url.to_string(),
                            status: status.as_u16(),
                            body: snippet(&body),
                        },
                    )
                }
                Err(message) => (
                    None,
                    DdiError::Transport {
                        method: method.clone(),
                        url: url.to_string(),
                        message,
                    },
                ),
            };
            if attempt >= self.retries {
                return Err(failure);
            }
            let wait = self.backoff.wait(attempt, retry_after);
            warn!(%failure, attempt, wait_ms = wait.as_millis() as u64, "transient failure, retrying");
            tokio::time::sleep(wait).await;
        }
    }
}

/// Same scheme, host and port (default ports filled in) as `server`; unparsable is not.
pub fn same_origin(server: &reqwest::Url, url: &str) -> bool {
    reqwest::Url::parse(url).is_ok_and(|u| {
        u.scheme() == server.scheme()
            && u.host_str() == server.host_str()
            && u.port_or_known_default() == server.port_or_known_default()
    })
}

struct Answer {
    status: StatusCode,
    etag: Option<String>,
    body: Vec<u8>,
}

fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h
}

fn expect_ok(method: Method, url: &str, a: Answer) -> Result<Vec<u8>, DdiError> {
    match a.status.as_u16() {
        200..=299 => Ok(a.body),
        401 | 403 => Err(DdiError::Auth {
            method,
            url: url.to_string(),
            status: a.status.as_u16(),
        }),
        s => Err(DdiError::Status {
            method,
            url: url.to_string(),
            status: s,
            body: snippet(&a.body),
        }),
    }
}

/// A 4xx answer to a feedback POST that says "never" for this message: the entry quota, or a
/// client error other than the ones with their own meaning (401/403 credentials, which an
/// operator fixes; 404/405/410; 408/429 "later").
fn refused_for_good(status: u16, body: &[u8]) -> bool {
    http_policy::is_quota_exceeded(status, body)
        || ((400..500).contains(&status)
            && !matches!(status, 401 | 403 | 404 | 405 | 408 | 410 | 429))
}

fn snippet(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let t = text.trim();
    match t.char_indices().nth(200) {
        Some((i, _)) => format!("{}...", &t[..i]),
        None => t.to_string(),
    }
}

/// Milliseconds since the epoch (device clock).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(extra: &str) -> ServerConfig {
        let text = format!(
            "[server]\nurl = \"https://hawkbit.example.com\"\ntenant = \"T\"\n\
             controller_id = \"d\"\ntarget_token = \"tok\"\n{extra}\n\
             [slots]\nA = \"a\"\nB = \"b\"\n"
        );
        crate::config::Config::from_toml(&text, std::path::Path::new("/nonexistent/c.toml"))
            .unwrap()
            .server
    }

    #[test]
    fn missing_tls_files_are_named() {
        let e = DdiClient::new(&server("ca_file = \"ca.pem\"")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"), "{e}");
        let e =
            DdiClient::new(&server("client_cert = \"c.pem\"\nclient_key = \"k.pem\"")).unwrap_err();
        assert!(e.to_string().contains("client certificate"), "{e}");
    }

    #[test]
    fn garbage_ca_file_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let e = DdiClient::new(&server(&format!("ca_file = \"{}\"", ca.display())));
        assert!(e.is_err());
    }

    #[tokio::test]
    async fn plain_http_links_are_refused_for_an_https_server() {
        let client = DdiClient::new(&server("")).unwrap();
        let e = client
            .post_feedback_to("http://evil.example.com/deploymentBase/1", b"{}".to_vec())
            .await
            .unwrap_err();
        assert!(matches!(e, DdiError::Insecure { .. }), "{e}");
        assert_eq!(
            client.auth_header_for("https://hawkbit.example.com/T/controller/v1/d"),
            Some(("authorization".to_string(), "TargetToken tok".to_string()))
        );
        assert!(!format!("{client:?}").contains("tok\""));
    }

    #[test]
    fn the_token_goes_only_to_the_servers_origin() {
        let mut client = DdiClient::new(&server("")).unwrap();
        let on = |c: &DdiClient, url: &str| c.token_for(url).is_some();
        for same in [
            "https://hawkbit.example.com/T/controller/v1/d/deploymentBase/1?c=2",
            "https://hawkbit.example.com:443/T/controller/v1/d/cancelAction/1",
        ] {
            assert!(on(&client, same), "{same}");
        }
        for other in [
            "https://evil.example.com/T/controller/v1/d/deploymentBase/1",
            "https://hawkbit.example.com:8443/T/controller/v1/d/configData",
            "http://hawkbit.example.com/T/controller/v1/d/feedback",
            "not a url",
        ] {
            assert!(!on(&client, other), "{other}");
            assert_eq!(client.auth_header_for(other), None, "{other}");
        }
        client.set_token_to_other_hosts(true);
        assert!(on(&client, "https://evil.example.com/x"));
    }
}
