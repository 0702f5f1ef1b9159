//! A blocking client of the management HTTP API (`/mgmt/...`), used by the `ddi-sim` client
//! subcommands and usable from tests that drive a server in another process.

use super::mgmt::{ActionView, ArtifactView, TargetView};
use super::model::{Assignment, Config};
use super::Fault;
use serde::de::DeserializeOwned;
use serde_json::{json, Value};
use std::path::Path;

/// A failed management call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the test server at {url}: {source}")]
    Http { url: String, source: reqwest::Error },
    #[error("{url}: HTTP {status}: {message}")]
    Status {
        url: String,
        status: u16,
        message: String,
    },
    #[error("{url}: unexpected answer: {source}")]
    Decode {
        url: String,
        source: serde_json::Error,
    },
    #[error("cannot read {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// Client of one test server's management API.
pub struct MgmtClient {
    base: String,
    http: reqwest::blocking::Client,
}

impl MgmtClient {
    /// `base` is the server URL, e.g. `http://127.0.0.1:8080`.
    pub fn new(base: &str) -> MgmtClient {
        MgmtClient {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::blocking::Client::builder()
                .timeout(None)
                .build()
                .unwrap_or_else(|_| reqwest::blocking::Client::new()),
        }
    }

    fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<reqwest::blocking::Body>,
        json_body: bool,
    ) -> Result<Value, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut req = self.http.request(method, &url);
        if let Some(b) = body {
            req = req.body(b);
            if json_body {
                req = req.header("Content-Type", "application/json");
            }
        }
        let resp = req.send().map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })?;
        let status = resp.status();
        let text = resp.text().map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })?;
        if !status.is_success() {
            let message = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or(text);
            return Err(ClientError::Status {
                url,
                status: status.as_u16(),
                message,
            });
        }
        if text.is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|source| ClientError::Decode { url, source })
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<T, ClientError> {
        let v = self.send(method, path, body.map(|b| b.to_string().into()), true)?;
        serde_json::from_value(v).map_err(|source| ClientError::Decode {
            url: format!("{}{path}", self.base),
            source,
        })
    }

    fn id(v: Value, key: &str) -> u64 {
        v.get(key).and_then(Value::as_u64).unwrap_or(0)
    }

    /// Creates a target; returns it (with its token).
    pub fn create_target(
        &self,
        controller_id: &str,
        token: Option<&str>,
    ) -> Result<TargetView, ClientError> {
        self.call(
            reqwest::Method::POST,
            "/mgmt/targets",
            Some(json!({ "controller_id": controller_id, "token": token })),
        )
    }
    pub fn targets(&self) -> Result<Vec<TargetView>, ClientError> {
        self.call(reqwest::Method::GET, "/mgmt/targets", None)
    }
    pub fn target(&self, controller_id: &str) -> Result<TargetView, ClientError> {
        self.call(
            reqwest::Method::GET,
            &format!("/mgmt/targets/{controller_id}"),
            None,
        )
    }
    pub fn target_actions(&self, controller_id: &str) -> Result<Vec<ActionView>, ClientError> {
        self.call(
            reqwest::Method::GET,
            &format!("/mgmt/targets/{controller_id}/actions"),
            None,
        )
    }
    pub fn request_attributes(&self, controller_id: &str) -> Result<(), ClientError> {
        self.send(
            reqwest::Method::POST,
            &format!("/mgmt/targets/{controller_id}/request-attributes"),
            None,
            false,
        )
        .map(drop)
    }
    pub fn set_auto_confirm(&self, controller_id: &str, active: bool) -> Result<(), ClientError> {
        self.send(
            reqwest::Method::PUT,
            &format!("/mgmt/targets/{controller_id}/auto-confirm"),
            Some(json!({ "active": active }).to_string().into()),
            true,
        )
        .map(drop)
    }
    /// Sets (or with None, removes) a polling interval for one target.
    pub fn set_target_polling(
        &self,
        controller_id: &str,
        polling_ms: Option<u64>,
    ) -> Result<(), ClientError> {
        self.send(
            reqwest::Method::PUT,
            &format!("/mgmt/targets/{controller_id}/polling"),
            Some(json!({ "polling_ms": polling_ms }).to_string().into()),
            true,
        )
        .map(drop)
    }
    /// Creates a software module; returns its id.
    pub fn create_module(&self, part: &str, name: &str, version: &str) -> Result<u64, ClientError> {
        let v: Value = self.call(
            reqwest::Method::POST,
            "/mgmt/modules",
            Some(json!({ "part": part, "name": name, "version": version })),
        )?;
        Ok(Self::id(v, "id"))
    }
    /// Uploads a file's bytes (streamed) as an artifact of a module.
    pub fn upload(
        &self,
        module: u64,
        filename: &str,
        path: &Path,
    ) -> Result<ArtifactView, ClientError> {
        let file = std::fs::File::open(path).map_err(|source| ClientError::File {
            path: path.to_path_buf(),
            source,
        })?;
        let v = self.send(
            reqwest::Method::PUT,
            &format!(
                "/mgmt/modules/{module}/artifacts/{}",
                super::ddi::percent_encode(filename)
            ),
            Some(reqwest::blocking::Body::new(file)),
            false,
        )?;
        serde_json::from_value(v).map_err(|source| ClientError::Decode {
            url: self.base.clone(),
            source,
        })
    }
    /// Registers a file on the server's machine by path (served from there, not copied).
    pub fn link_file(
        &self,
        module: u64,
        filename: &str,
        path: &Path,
    ) -> Result<ArtifactView, ClientError> {
        self.call(
            reqwest::Method::POST,
            &format!("/mgmt/modules/{module}/artifacts"),
            Some(json!({ "filename": filename, "path": path })),
        )
    }
    /// Creates a distribution set; returns its id.
    pub fn create_distribution(
        &self,
        name: &str,
        version: &str,
        modules: &[u64],
    ) -> Result<u64, ClientError> {
        let v: Value = self.call(
            reqwest::Method::POST,
            "/mgmt/distributions",
            Some(json!({ "name": name, "version": version, "modules": modules })),
        )?;
        Ok(Self::id(v, "id"))
    }
    /// Assigns a distribution set; returns the action id.
    pub fn assign(
        &self,
        controller_id: &str,
        distribution: u64,
        how: &Assignment,
    ) -> Result<u64, ClientError> {
        let mut body = serde_json::to_value(how).unwrap_or_default();
        body["distribution"] = json!(distribution);
        let v: Value = self.call(
            reqwest::Method::POST,
            &format!("/mgmt/targets/{controller_id}/assign"),
            Some(body),
        )?;
        Ok(Self::id(v, "action"))
    }
    /// Cancels (or with `force`, force-quits) an action.
    pub fn cancel(&self, action: u64, force: bool) -> Result<(), ClientError> {
        self.send(
            reqwest::Method::POST,
            &format!("/mgmt/actions/{action}/cancel"),
            Some(json!({ "force": force }).to_string().into()),
            true,
        )
        .map(drop)
    }
    pub fn action(&self, action: u64) -> Result<ActionView, ClientError> {
        self.call(
            reqwest::Method::GET,
            &format!("/mgmt/actions/{action}"),
            None,
        )
    }
    /// Injects a fault; returns its id.
    pub fn add_fault(&self, fault: &Fault) -> Result<u64, ClientError> {
        let v: Value = self.call(
            reqwest::Method::POST,
            "/mgmt/faults",
            Some(serde_json::to_value(fault).unwrap_or_default()),
        )?;
        Ok(Self::id(v, "id"))
    }
    pub fn faults(&self) -> Result<Vec<Fault>, ClientError> {
        self.call(reqwest::Method::GET, "/mgmt/faults", None)
    }
    pub fn clear_faults(&self) -> Result<(), ClientError> {
        self.send(reqwest::Method::DELETE, "/mgmt/faults", None, false)
            .map(drop)
    }
    pub fn config(&self) -> Result<Config, ClientError> {
        self.call(reqwest::Method::GET, "/mgmt/config", None)
    }
    /// Partial config update, e.g. `{"polling_ms": 1000}`.
    pub fn update_config(&self, patch: Value) -> Result<Config, ClientError> {
        self.call(reqwest::Method::PUT, "/mgmt/config", Some(patch))
    }
}
