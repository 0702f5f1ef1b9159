//! Fault injection: what can go wrong on the wire, where (endpoint, target), from which request
//! on and how often. Faults live in the server state; each matching request consumes one use of
//! a counted fault.

use serde::{Deserialize, Serialize};

/// The DDI endpoint a request hit (for fault matching).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Endpoint {
    /// Any DDI endpoint.
    Any,
    Poll,
    DeploymentBase,
    DeploymentFeedback,
    CancelAction,
    CancelFeedback,
    ConfigData,
    ArtifactList,
    /// Artifact (and MD5SUM) downloads.
    Download,
    InstalledBase,
    ConfirmationBase,
    ConfirmationFeedback,
}

impl Endpoint {
    fn matches(self, actual: Endpoint) -> bool {
        self == Endpoint::Any || self == actual
    }
}

/// What goes wrong.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FaultKind {
    /// Answer with this status (e.g. 503 or 429) and an empty body, with `Retry-After` if set.
    Status {
        code: u16,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_secs: Option<u64>,
    },
    /// Abort the connection after this many body bytes (the response promised more).
    DropAfter { bytes: u64 },
    /// Send the body at this rate.
    Slow { bytes_per_sec: u64 },
    /// Advertise wrong sha1/md5/sha256 for every artifact (deploymentBase and artifact list).
    WrongHash,
    /// The JSON body is syntactically broken.
    MalformedJson,
    /// Only the first `bytes` of the body, with a Content-Length that matches the cut (a clean
    /// but short response).
    Truncate { bytes: u64 },
    /// Answer Range requests with `200` and the whole body, as a proxy or server without
    /// Range support does.
    IgnoreRange,
    /// Well-formed JSON the agent must refuse: the value at `pointer` (RFC 6901) of the answer
    /// becomes `value` (a key missing in an existing object is added), e.g. a negative artifact
    /// size, an unknown enum value, too many chunks, or padding past the body limit.
    SetJson {
        pointer: String,
        value: serde_json::Value,
    },
}

impl FaultKind {
    /// Where a fault of this kind applies when the caller does not say.
    pub fn default_endpoint(&self) -> Endpoint {
        match self {
            FaultKind::Status { .. } => Endpoint::Any,
            FaultKind::DropAfter { .. }
            | FaultKind::Slow { .. }
            | FaultKind::Truncate { .. }
            | FaultKind::IgnoreRange => Endpoint::Download,
            FaultKind::WrongHash | FaultKind::SetJson { .. } => Endpoint::DeploymentBase,
            FaultKind::MalformedJson => Endpoint::Poll,
        }
    }
}

/// One injected fault.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fault {
    /// Assigned by the server.
    #[serde(default)]
    pub id: u64,
    #[serde(flatten)]
    pub kind: FaultKind,
    /// Only this target's requests (None = all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Only this endpoint (None = the kind's default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<Endpoint>,
    /// Remaining uses (None = until cleared; 1 = one-shot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub times: Option<u32>,
    /// Requests it lets through untouched before it starts (counting only the requests of its
    /// endpoint and target): 2 = from the third on.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub after: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl Fault {
    /// A fault of this kind, everywhere its kind applies, until cleared.
    pub fn new(kind: FaultKind) -> Fault {
        Fault {
            id: 0,
            kind,
            target: None,
            endpoint: None,
            times: None,
            after: 0,
        }
    }
    /// Only for this controller id.
    pub fn for_target(mut self, controller_id: &str) -> Fault {
        self.target = Some(controller_id.to_string());
        self
    }
    /// Only on this endpoint.
    pub fn on(mut self, endpoint: Endpoint) -> Fault {
        self.endpoint = Some(endpoint);
        self
    }
    /// Only this many times.
    pub fn times(mut self, n: u32) -> Fault {
        self.times = Some(n);
        self
    }
    /// Only once.
    pub fn once(self) -> Fault {
        self.times(1)
    }
    /// Only from the `n+1`-th request it applies to on (the first `n` go through untouched).
    pub fn after(mut self, n: u32) -> Fault {
        self.after = n;
        self
    }

    fn applies(&self, endpoint: Endpoint, controller_id: &str) -> bool {
        self.times != Some(0)
            && self
                .endpoint
                .unwrap_or_else(|| self.kind.default_endpoint())
                .matches(endpoint)
            && self.target.as_deref().is_none_or_eq(controller_id)
    }
}

trait OptionEq {
    fn is_none_or_eq(&self, v: &str) -> bool;
}

impl OptionEq for Option<&str> {
    fn is_none_or_eq(&self, v: &str) -> bool {
        match self {
            None => true,
            Some(s) => *s == v,
        }
    }
}

/// The faults that hit one request, consumed from the list.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Triggered {
    pub status: Option<(u16, Option<u64>)>,
    pub drop_after: Option<u64>,
    pub slow: Option<u64>,
    pub wrong_hash: bool,
    pub malformed_json: bool,
    pub truncate: Option<u64>,
    pub ignore_range: bool,
    /// (pointer, value) of a [`FaultKind::SetJson`].
    pub set_json: Option<(String, serde_json::Value)>,
}

/// Takes (one use of) every fault that applies to this request; at most one per kind.
pub fn trigger(faults: &mut Vec<Fault>, endpoint: Endpoint, controller_id: &str) -> Triggered {
    let mut t = Triggered::default();
    for f in faults.iter_mut() {
        if !f.applies(endpoint, controller_id) {
            continue;
        }
        if f.after > 0 {
            f.after -= 1;
            continue;
        }
        let taken = match f.kind {
            FaultKind::Status {
                code,
                retry_after_secs,
            } if t.status.is_none() => {
                t.status = Some((code, retry_after_secs));
                true
            }
            FaultKind::DropAfter { bytes } if t.drop_after.is_none() => {
                t.drop_after = Some(bytes);
                true
            }
            FaultKind::Slow { bytes_per_sec } if t.slow.is_none() => {
                t.slow = Some(bytes_per_sec.max(1));
                true
            }
            FaultKind::WrongHash if !t.wrong_hash => {
                t.wrong_hash = true;
                true
            }
            FaultKind::MalformedJson if !t.malformed_json => {
                t.malformed_json = true;
                true
            }
            FaultKind::Truncate { bytes } if t.truncate.is_none() => {
                t.truncate = Some(bytes);
                true
            }
            FaultKind::IgnoreRange if !t.ignore_range => {
                t.ignore_range = true;
                true
            }
            FaultKind::SetJson {
                ref pointer,
                ref value,
            } if t.set_json.is_none() => {
                t.set_json = Some((pointer.clone(), value.clone()));
                true
            }
            _ => false,
        };
        if taken {
            if let Some(n) = f.times.as_mut() {
                *n -= 1;
            }
        }
    }
    faults.retain(|f| f.times != Some(0));
    t
}

/// Sets the value at `pointer` of `doc`; a missing last key of an existing object is added.
/// Nothing happens when the parent does not exist.
pub fn set_json(doc: &mut serde_json::Value, pointer: &str, value: serde_json::Value) {
    use serde_json::Value;
    let (parent, key) = pointer.rsplit_once('/').unwrap_or(("", pointer));
    let key = key.replace("~1", "/").replace("~0", "~");
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(key, value);
        }
        Some(Value::Array(items)) => {
            if let Some(slot) = key.parse::<usize>().ok().and_then(|i| items.get_mut(i)) {
                *slot = value;
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_json_replaces_and_adds() {
        let mut doc = serde_json::json!({"a": {"b": [1, 2]}, "c": "x"});
        set_json(&mut doc, "/a/b/1", serde_json::json!(-1));
        set_json(&mut doc, "/c", serde_json::json!("y"));
        set_json(&mut doc, "/new", serde_json::json!(true));
        set_json(&mut doc, "/missing/deep", serde_json::json!(0));
        assert_eq!(
            doc,
            serde_json::json!({"a": {"b": [1, -1]}, "c": "y", "new": true})
        );
    }

    #[test]
    fn one_shot_fault_is_consumed_and_scoped() {
        let mut faults = vec![
            Fault::new(FaultKind::Status {
                code: 503,
                retry_after_secs: Some(2),
            })
            .for_target("a")
            .once(),
            Fault::new(FaultKind::DropAfter { bytes: 10 }).times(2),
        ];
        assert_eq!(
            trigger(&mut faults, Endpoint::Poll, "b"),
            Triggered::default()
        );
        assert_eq!(
            trigger(&mut faults, Endpoint::Poll, "a").status,
            Some((503, Some(2)))
        );
        assert_eq!(trigger(&mut faults, Endpoint::Poll, "a").status, None);
        assert_eq!(
            trigger(&mut faults, Endpoint::Download, "a").drop_after,
            Some(10)
        );
        assert_eq!(
            trigger(&mut faults, Endpoint::Download, "a").drop_after,
            Some(10)
        );
        assert_eq!(
            trigger(&mut faults, Endpoint::Download, "a").drop_after,
            None
        );
        assert!(faults.is_empty());
    }

    #[test]
    fn a_fault_after_n_requests_counts_only_the_requests_it_applies_to() {
        let mut faults = vec![Fault::new(FaultKind::Status {
            code: 503,
            retry_after_secs: None,
        })
        .on(Endpoint::Download)
        .after(2)
        .once()];
        let status = |faults: &mut Vec<Fault>, e| trigger(faults, e, "a").status;
        assert_eq!(status(&mut faults, Endpoint::Poll), None);
        assert_eq!(status(&mut faults, Endpoint::Download), None);
        assert_eq!(status(&mut faults, Endpoint::Poll), None);
        assert_eq!(status(&mut faults, Endpoint::Download), None);
        assert_eq!(status(&mut faults, Endpoint::Download), Some((503, None)));
        assert_eq!(status(&mut faults, Endpoint::Download), None);
        assert!(faults.is_empty());
    }
}
