//! A hawkBit-compatible **test** server: the DDI API v1 as Eclipse hawkBit serves it (including
//! the quirks of older releases, selectable with [`HawkbitVersion`]), a small management interface,
//! and fault injection. It exists to test the `ddi-agent` and to run the demo; **production uses
//! Eclipse hawkBit**. It binds 127.0.0.1 by default, keeps its state in memory (optionally in a
//! `--state-file`), and has no authentication on the management side.
//!
//! Layout: [`model`] (state and the action state machine), [`ddi`] (the device API; [`cbor`] for
//! `application/cbor`), [`download`]
//! (artifact streaming with Range/ETag and faults), [`mgmt`] (management HTTP API and its JSON
//! views), [`client`] (a blocking client of the management API, used by `ddi-sim`), [`faults`],
//! [`version`].
//!
//! # DDI API (`/{tenant}/controller/v1/{controllerId}/...`)
//! Poll, deploymentBase (+feedback), cancelAction (+feedback), configData, installedBase (GET and
//! PUT), confirmationBase (+feedback, activate/deactivateAutoConfirm), artifact list, artifact and
//! `.MD5SUM` download, with TargetToken / GatewayToken / proxy-certificate-header auth (401, empty
//! body), ETag/304 on JSON,
//! 405/406/415, Range (206/416), `If-Match` (412), `If-Range`; JSON, HAL+JSON and CBOR bodies.
//! The latest DDI requests are logged with their headers and their answer's status and body
//! length ([`TestServer::requests`]); [`TestServer::download_log`] is its view of the artifact
//! requests (each also written to the server's log as a `download ...` line).
//!
//! # Management API (JSON, no auth, prefix `/mgmt`)
//! | method and path | body | answer |
//! |---|---|---|
//! | `POST /mgmt/targets` | `{"controller_id","token"?}` | 201 target view (with token) |
//! | `GET /mgmt/targets`, `GET /mgmt/targets/{id}` | | target view(s) |
//! | `GET /mgmt/targets/{id}/actions` | | action views, oldest first |
//! | `POST /mgmt/targets/{id}/request-attributes` | | 204; poll shows `configData` again |
//! | `PUT /mgmt/targets/{id}/auto-confirm` | `{"active",initiator?,remark?}` | 204 |
//! | `PUT /mgmt/targets/{id}/polling` | `{"polling_ms": n \| null}` (this target only) | 204 |
//! | `POST /mgmt/targets/{id}/assign` | `{"distribution", "type": forced\|soft\|timeforced\|downloadonly, "forced_at_ms"?, "maintenance"?: {"start_ms","duration_ms","every_ms"?}, "confirmation_required"?}` | 201 `{"action": id}` |
//! | `POST /mgmt/modules` | `{"part"?: "os", "name", "version", "metadata"?: {k: v}, "encrypted"?}` | 201 `{"id"}` |
//! | `PUT /mgmt/modules/{id}/artifacts/{filename}` | raw bytes (streamed to disk) | 201 artifact view |
//! | `POST /mgmt/modules/{id}/artifacts` | `{"filename","path"}` (server-local file, served from disk) | 201 artifact view |
//! | `GET /mgmt/modules/{id}` | | module view |
//! | `POST /mgmt/distributions` | `{"name","version","modules":[id]}` | 201 `{"id"}` |
//! | `GET /mgmt/actions/{id}` | | action view: status, history, raw feedback |
//! | `POST /mgmt/actions/{id}/cancel` | `{"force"?: bool}` | 204 |
//! | `GET/POST/DELETE /mgmt/faults` | [`Fault`] JSON, e.g. `{"kind":"status","code":503,"retry_after_secs":5,"times":1,"after":2}` | list / 201 `{"id"}` / 204 |
//! | `GET/PUT /mgmt/config` | [`model::Config`] fields (partial PUT) | config |
//!
//! Errors are `{"error": "..."}` with 400/404/409.
//!
//! # Rust API (for tests)
//! ```no_run
//! use ddi_sim::{Assignment, Fault, FaultKind, ServerOptions, TestServer};
//! use std::time::Duration;
//!
//! let server = TestServer::start(ServerOptions::default().polling(Duration::from_secs(1)));
//! let token = server.create_target("device-0001", None).unwrap();
//! let action = server
//!     .deploy("device-0001", "2.0", "rootfs.img", vec![0u8; 4096], &Assignment::forced())
//!     .unwrap();
//! server.add_fault(Fault::new(FaultKind::DropAfter { bytes: 1000 }).once());
//! // ... run the agent against server.url() with `token` ...
//! let view = server
//!     .wait_for_action(action, Duration::from_secs(30), |a| !a.active)
//!     .unwrap();
//! assert_eq!(view.result(), Some("success"));
//! # let _ = token;
//! ```

pub mod cbor;
pub mod client;
pub mod ddi;
pub mod download;
pub mod faults;
pub mod mgmt;
pub mod model;
pub mod version;

pub use download::DownloadRequest;
pub use faults::{Endpoint, Fault, FaultKind};
pub use mgmt::{ActionView, ArtifactView, TargetView};
pub use model::{
    ActionStatus, ActionType, Assignment, Channel, Config, FeedbackRecord, MaintenanceWindow,
    MgmtError, RequestRecord,
};
pub use version::HawkbitVersion;

use axum::serve::ListenerExt;
use model::{now_ms, Artifact, State};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Errors of starting or persisting the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start the server runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot read state file {path}: {source}")]
    ReadState {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("state file {path} is not valid: {source}")]
    ParseState {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("cannot write state file {path}: {source}")]
    WriteState {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read artifact {path}: {source}")]
    Artifact {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Mgmt(#[from] MgmtError),
}

/// How to start a [`TestServer`].
#[derive(Clone, Debug)]
pub struct ServerOptions {
    /// Default `127.0.0.1:0` (a free port).
    pub bind: SocketAddr,
    /// Tenant settings and hawkBit version to imitate.
    pub config: Config,
    /// Load state from here at start (if it exists) and save it after every change; the tenant
    /// settings always come from `config`.
    pub state_file: Option<PathBuf>,
    /// Where artifacts uploaded over HTTP are stored (default: next to the state file, else a
    /// temporary directory removed with the server).
    pub data_dir: Option<PathBuf>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        ServerOptions {
            bind: SocketAddr::from(([127, 0, 0, 1], 0)),
            config: Config::default(),
            state_file: None,
            data_dir: None,
        }
    }
}

impl ServerOptions {
    /// Imitate this hawkBit version.
    pub fn version(mut self, v: HawkbitVersion) -> Self {
        self.config.version = v;
        self
    }
    /// Normal polling interval.
    pub fn polling(mut self, d: Duration) -> Self {
        self.config.polling_ms = d.as_millis() as i64;
        self
    }
    /// Enable GatewayToken authentication with this key.
    pub fn gateway_token(mut self, key: &str) -> Self {
        self.config.gateway_token = Some(key.to_string());
        self
    }
    /// Tenant name (default `DEFAULT`).
    pub fn tenant(mut self, t: &str) -> Self {
        self.config.tenant = t.to_string();
        self
    }
    /// Bind address.
    pub fn bind(mut self, addr: SocketAddr) -> Self {
        self.bind = addr;
        self
    }
}

/// What the HTTP layers share: the state behind one mutex (never held across an await).
pub struct Shared {
    state: Mutex<State>,
    state_file: Option<PathBuf>,
    data_dir: PathBuf,
    _temp: Option<tempfile::TempDir>,
}

impl Shared {
    /// Locks the state.
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records the answer to logged request `seq`.
    pub fn log_answer(&self, seq: u64, status: u16, body_len: Option<u64>) {
        let mut st = self.lock();
        let download = st
            .log_answer(seq, status, body_len)
            .and_then(download::DownloadRequest::of);
        drop(st);
        if let Some(download) = download {
            // On the server's log too, so that a benchmark of the `serve` binary can count the
            // bytes and requests of a download (bench/delta_install.py).
            tracing::info!("{}", download.log_line());
        }
    }

    /// The answered artifact requests of the request log, in order.
    pub fn download_log(&self) -> Vec<download::DownloadRequest> {
        self.lock()
            .requests
            .iter()
            .filter_map(download::DownloadRequest::of)
            .collect()
    }

    /// Runs `f` on the state and saves it (when a state file is configured).
    pub fn update<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let mut st = self.lock();
        let out = f(&mut st);
        if let Err(e) = self.save(&st) {
            tracing::warn!("{e}");
        }
        out
    }

    fn save(&self, st: &State) -> Result<(), ServerError> {
        let Some(path) = &self.state_file else {
            return Ok(());
        };
        let err = |source| ServerError::WriteState {
            path: path.clone(),
            source,
        };
        let json = serde_json::to_vec_pretty(st).map_err(|e| err(std::io::Error::other(e)))?;
        // The state file survives a crash mid-write.
        bootctl::fsutil::write_atomic(path, &json, 0o666).map_err(|e| err(e.into()))
    }

    /// Directory for uploaded artifact files.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }
}

/// Builds the shared state from options (loading the state file if present).
pub fn shared_from_options(opts: &ServerOptions) -> Result<Arc<Shared>, ServerError> {
    let mut state = match &opts.state_file {
        Some(p) if p.exists() => {
            let text = std::fs::read(p).map_err(|source| ServerError::ReadState {
                path: p.clone(),
                source,
            })?;
            let mut st: State =
                serde_json::from_slice(&text).map_err(|source| ServerError::ParseState {
                    path: p.clone(),
                    source,
                })?;
            st.config = opts.config.clone();
            st
        }
        _ => State::new(opts.config.clone()),
    };
    state.next_id = state.next_id.max(1);
    let (data_dir, temp) = match (&opts.data_dir, &opts.state_file) {
        (Some(d), _) => (d.clone(), None),
        (None, Some(f)) => (PathBuf::from(format!("{}.d", f.display())), None),
        (None, None) => {
            let t = tempfile::tempdir().map_err(|source| ServerError::DataDir {
                path: std::env::temp_dir(),
                source,
            })?;
            (t.path().to_path_buf(), Some(t))
        }
    };
    std::fs::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let shared = Arc::new(Shared {
        state: Mutex::new(state),
        state_file: opts.state_file.clone(),
        data_dir,
        _temp: temp,
    });
    shared.save(&shared.lock())?;
    Ok(shared)
}

/// The whole HTTP application: DDI (fallback router) and `/mgmt`.
pub fn router(shared: Arc<Shared>) -> axum::Router {
    mgmt::routes().fallback(ddi::handle).with_state(shared)
}

/// A running test server on its own thread and runtime; usable from sync and async tests.
/// Management methods act on the state directly (no HTTP). Stops when dropped.
pub struct TestServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Starts a server; panics with the reason if it cannot (test-support convenience).
    pub fn start(opts: ServerOptions) -> TestServer {
        Self::try_start(opts).unwrap_or_else(|e| panic!("test server: {e}"))
    }

    /// Starts a server.
    pub fn try_start(opts: ServerOptions) -> Result<TestServer, ServerError> {
        let shared = shared_from_options(&opts)?;
        let listener =
            std::net::TcpListener::bind(opts.bind).map_err(|source| ServerError::Bind {
                addr: opts.bind,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: opts.bind,
            source,
        })?;
        listener
            .set_nonblocking(true)
            .map_err(ServerError::Runtime)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .thread_name("ddi-sim")
            .build()
            .map_err(ServerError::Runtime)?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let app = router(shared.clone());
        let thread = std::thread::Builder::new()
            .name("ddi-sim-server".into())
            .spawn(move || {
                rt.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            tracing::error!("test server listener: {e}");
                            return;
                        }
                    };
                    // As hawkBit's Tomcat does (tcpNoDelay is its default): with Nagle's
                    // algorithm a response's body waits behind its headers for the client's
                    // delayed ACK, 40 ms a request (each Range request of a delta install).
                    let listener = listener.tap_io(|tcp| {
                        let _ = tcp.set_nodelay(true);
                    });
                    tokio::select! {
                        r = axum::serve(listener, app) => if let Err(e) = r { tracing::error!("test server: {e}") },
                        _ = stopped => {}
                    }
                });
                // Kills open connections (e.g. a slow download) instead of waiting for them.
                rt.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(ServerError::Runtime)?;
        Ok(TestServer {
            shared,
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// Base URL, e.g. `http://127.0.0.1:41234` (what the agent's `server.url` gets).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// Socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
    /// Tenant name.
    pub fn tenant(&self) -> String {
        self.shared.lock().config.tenant.clone()
    }
    /// DDI base URL of one device: `{url}/{tenant}/controller/v1/{controller_id}`.
    pub fn controller_url(&self, controller_id: &str) -> String {
        format!(
            "{}/{}/controller/v1/{}",
            self.url(),
            self.tenant(),
            controller_id
        )
    }
    /// Shared state (for advanced tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Creates a target with this token (or a generated one); returns the token.
    pub fn create_target(
        &self,
        controller_id: &str,
        token: Option<&str>,
    ) -> Result<String, MgmtError> {
        self.shared
            .update(|s| s.create_target(controller_id, token.map(str::to_string)))
    }
    /// Creates a software module (`part` e.g. "os"); returns its id.
    pub fn create_module(&self, part: &str, name: &str, version: &str) -> u64 {
        self.shared.update(|s| s.create_module(part, name, version))
    }
    /// Adds an artifact held in memory.
    pub fn upload_bytes(
        &self,
        module: u64,
        filename: &str,
        data: impl Into<bytes::Bytes>,
    ) -> Result<ArtifactView, MgmtError> {
        let a = Artifact::from_bytes(filename, data.into());
        let view = ArtifactView::from(&a);
        self.shared.update(|s| s.add_artifact(module, a))?;
        Ok(view)
    }
    /// Adds an artifact served from a file (hashed now, streamed on download; never loaded whole).
    pub fn upload_file(
        &self,
        module: u64,
        filename: &str,
        path: &Path,
    ) -> Result<ArtifactView, ServerError> {
        let a = Artifact::from_file(filename, path).map_err(|source| ServerError::Artifact {
            path: path.to_path_buf(),
            source,
        })?;
        let view = ArtifactView::from(&a);
        self.shared.update(|s| s.add_artifact(module, a))?;
        Ok(view)
    }
    /// Creates a distribution set of modules; returns its id.
    pub fn create_distribution(
        &self,
        name: &str,
        version: &str,
        modules: &[u64],
    ) -> Result<u64, MgmtError> {
        self.shared
            .update(|s| s.create_distribution(name, version, modules))
    }
    /// Assigns a distribution set to a target; returns the action id.
    pub fn assign(
        &self,
        controller_id: &str,
        distribution: u64,
        how: &Assignment,
    ) -> Result<u64, MgmtError> {
        self.shared
            .update(|s| s.assign(controller_id, distribution, how, now_ms()))
    }
    /// One call for the common case: module (`part` "os") + in-memory artifact + distribution
    /// `name`/`version` + assignment. Returns the action id.
    pub fn deploy(
        &self,
        controller_id: &str,
        version: &str,
        filename: &str,
        data: impl Into<bytes::Bytes>,
        how: &Assignment,
    ) -> Result<u64, MgmtError> {
        let m = self.create_module("os", "firmware", version);
        self.upload_bytes(m, filename, data)?;
        let ds = self.create_distribution("firmware", version, &[m])?;
        self.assign(controller_id, ds, how)
    }
    /// Like [`TestServer::deploy`] with the artifact served from a file.
    pub fn deploy_file(
        &self,
        controller_id: &str,
        version: &str,
        filename: &str,
        path: &Path,
        how: &Assignment,
    ) -> Result<u64, ServerError> {
        let m = self.create_module("os", "firmware", version);
        self.upload_file(m, filename, path)?;
        let ds = self.create_distribution("firmware", version, &[m])?;
        Ok(self.assign(controller_id, ds, how)?)
    }
    /// Operator cancel (the action becomes CANCELING).
    pub fn cancel(&self, action: u64) -> Result<(), MgmtError> {
        self.shared.update(|s| s.cancel(action, false, now_ms()))
    }
    /// Force-quit a CANCELING action (closed as CANCELED without the device).
    pub fn force_quit(&self, action: u64) -> Result<(), MgmtError> {
        self.shared.update(|s| s.cancel(action, true, now_ms()))
    }
    /// Status, status history and raw feedback of an action.
    pub fn action(&self, action: u64) -> Option<ActionView> {
        let st = self.shared.lock();
        st.actions.get(&action).map(|a| ActionView::new(&st, a))
    }
    /// All actions of a target, oldest first.
    pub fn actions(&self, controller_id: &str) -> Vec<ActionView> {
        let st = self.shared.lock();
        st.actions
            .values()
            .filter(|a| a.target == controller_id)
            .map(|a| ActionView::new(&st, a))
            .collect()
    }
    /// Feedback bodies of an action as received, oldest first (empty for an unknown action).
    pub fn feedback(&self, action: u64) -> Vec<FeedbackRecord> {
        self.action(action).map(|a| a.feedback).unwrap_or_default()
    }
    /// The target as the server sees it (attributes, installed action, auto-confirm, last poll).
    pub fn target(&self, controller_id: &str) -> Option<TargetView> {
        let st = self.shared.lock();
        st.targets
            .get(controller_id)
            .map(|t| TargetView::new(&st, t))
    }
    /// Ask the target for its attributes again (configData link).
    pub fn request_attributes(&self, controller_id: &str) -> Result<(), MgmtError> {
        self.shared
            .update(|s| match s.targets.get_mut(controller_id) {
                Some(t) => {
                    t.request_attributes = true;
                    Ok(())
                }
                None => Err(MgmtError::NotFound(format!("target {controller_id}"))),
            })
    }
    /// Switch auto-confirm of a target.
    pub fn set_auto_confirm(&self, controller_id: &str, active: bool) -> Result<(), MgmtError> {
        self.shared.update(|s| {
            s.set_auto_confirm(
                controller_id,
                active,
                Some(model::INITIATOR.into()),
                None,
                now_ms(),
            )
        })
    }
    /// Injects a fault; returns its id.
    pub fn add_fault(&self, mut fault: Fault) -> u64 {
        self.shared.update(|s| {
            let id = s.faults.iter().map(|f| f.id).max().unwrap_or(0) + 1;
            fault.id = id;
            s.faults.push(fault);
            id
        })
    }
    /// The artifact requests of the request log ([`TestServer::requests`], the latest
    /// [`model::REQUEST_LOG_LEN`] requests) that were answered, in order: their `Range`, status
    /// and body length (how many bytes and requests a download cost).
    pub fn download_log(&self) -> Vec<download::DownloadRequest> {
        self.shared.download_log()
    }

    /// Faults still armed.
    pub fn faults(&self) -> Vec<Fault> {
        self.shared.lock().faults.clone()
    }
    /// Removes all faults.
    pub fn clear_faults(&self) {
        self.shared.update(|s| s.faults.clear())
    }
    /// The latest DDI requests with their headers and answers, oldest first (see
    /// [`RequestRecord`]).
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.lock().requests.iter().cloned().collect()
    }
    /// Changes tenant settings at run time (polling interval, version, quotas, ...).
    pub fn configure(&self, f: impl FnOnce(&mut Config)) {
        self.shared.update(|s| f(&mut s.config))
    }
    /// Sets (or with None, removes) a polling interval for one target only.
    pub fn set_target_polling(
        &self,
        controller_id: &str,
        d: Option<Duration>,
    ) -> Result<(), MgmtError> {
        self.shared
            .update(|s| match s.targets.get_mut(controller_id) {
                Some(t) => {
                    t.polling_ms = d.map(|d| d.as_millis() as i64);
                    Ok(())
                }
                None => Err(MgmtError::NotFound(format!("target {controller_id}"))),
            })
    }
    /// Sets the normal polling interval.
    pub fn set_polling(&self, d: Duration) {
        self.configure(|c| c.polling_ms = d.as_millis() as i64)
    }
    /// Waits until `pred` holds for the action (checked every 50 ms); returns the view, or on
    /// timeout an error that shows the last state seen.
    pub fn wait_for_action(
        &self,
        action: u64,
        timeout: Duration,
        pred: impl Fn(&ActionView) -> bool,
    ) -> Result<ActionView, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let view = self.action(action);
            if let Some(v) = &view {
                if pred(v) {
                    return Ok(v.clone());
                }
            }
            if Instant::now() >= deadline {
                return Err(match view {
                    Some(v) => format!(
                        "action {action} still {} after {timeout:?}; history: {:?}",
                        v.status.name(),
                        v.history
                    ),
                    None => format!("action {action} does not exist"),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
