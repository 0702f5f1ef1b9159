//! Shared setup of the server tests: a test server with one target and a raw DDI client.
#![allow(dead_code)]

use ddi_sim::{Assignment, ServerOptions, TestServer};
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::Value;

pub const CID: &str = "dev-01";
pub const TOKEN: &str = "tok-01";

pub struct Env {
    pub server: TestServer,
    pub http: Client,
}

pub fn env() -> Env {
    env_with(ServerOptions::default())
}

pub fn env_with(opts: ServerOptions) -> Env {
    let server = TestServer::start(opts);
    server.create_target(CID, Some(TOKEN)).unwrap();
    Env {
        server,
        http: Client::builder().build().unwrap(),
    }
}

impl Env {
    /// `{controller base}{path}` of the default target.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.controller_url(CID))
    }
    pub fn auth(&self, rb: RequestBuilder) -> RequestBuilder {
        rb.header("Authorization", format!("TargetToken {TOKEN}"))
    }
    pub fn get(&self, path: &str) -> Response {
        self.auth(self.http.get(self.url(path))).send().unwrap()
    }
    pub fn get_json(&self, path: &str) -> Value {
        let r = self.get(path);
        assert_eq!(r.status(), 200, "GET {path}");
        r.json().unwrap()
    }
    pub fn post(&self, path: &str, body: &str) -> Response {
        self.auth(self.http.post(self.url(path)))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap()
    }
    pub fn put(&self, path: &str, body: &str) -> Response {
        self.auth(self.http.put(self.url(path)))
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .unwrap()
    }
    /// Poll and return the body.
    pub fn poll(&self) -> Value {
        self.get_json("")
    }
    /// Assigns an in-memory artifact `data` as `fw.bin` in a new distribution set.
    pub fn deploy(&self, data: &[u8], how: &Assignment) -> u64 {
        self.server
            .deploy(CID, "1.0", "fw.bin", data.to_vec(), how)
            .unwrap()
    }
    /// Module id of the first chunk's artifact download link.
    pub fn download_href(&self, action: u64) -> String {
        let d = self.get_json(&format!("/deploymentBase/{action}"));
        d["deployment"]["chunks"][0]["artifacts"][0]["_links"]["download-http"]["href"]
            .as_str()
            .unwrap()
            .to_string()
    }
    pub fn feedback(&self, action: u64, execution: &str, finished: &str) -> Response {
        self.post(
            &format!("/deploymentBase/{action}/feedback"),
            &format!(
                r#"{{"status":{{"execution":"{execution}","result":{{"finished":"{finished}"}}}}}}"#
            ),
        )
    }
    pub fn cancel_feedback(&self, action: u64, execution: &str, finished: &str) -> Response {
        self.post(
            &format!("/cancelAction/{action}/feedback"),
            &format!(
                r#"{{"status":{{"execution":"{execution}","result":{{"finished":"{finished}"}}}}}}"#
            ),
        )
    }
}

/// The value of a `_links` relation of a poll body.
pub fn link(body: &Value, rel: &str) -> Option<String> {
    body["_links"][rel]["href"].as_str().map(str::to_string)
}
