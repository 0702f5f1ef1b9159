//! The hawkBit release the test server imitates, and every wire-visible quirk that depends on it
//! (see the version table of the DDI spec). Pure: no I/O.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Release stage used for ordering: milestones sort before the final release, `head` (master after
/// the newest tag) after it.
const STAGE_FINAL: u8 = 100;
const STAGE_HEAD: u8 = 200;

/// A hawkBit server version such as `0.3.0M7`, `0.9.0`, `1.1.0` or `head` (master after 1.1.0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct HawkbitVersion {
    major: u8,
    minor: u8,
    patch: u8,
    /// 1..=9 for milestones `M1`..`M9`, [`STAGE_FINAL`], or [`STAGE_HEAD`].
    stage: u8,
}

/// A version string that is not `X.Y.Z`, `X.Y.ZMn` or `head`.
#[derive(Debug, thiserror::Error)]
#[error("invalid hawkBit version {0:?}: expected X.Y.Z, X.Y.ZMn (e.g. 0.3.0M7) or head")]
pub struct VersionParseError(pub String);

impl HawkbitVersion {
    /// Master after the 1.1.0 tag: the snapshot the spec describes (default).
    pub const HEAD: HawkbitVersion = HawkbitVersion::new(1, 1, 0, STAGE_HEAD);

    const fn new(major: u8, minor: u8, patch: u8, stage: u8) -> Self {
        HawkbitVersion {
            major,
            minor,
            patch,
            stage,
        }
    }

    /// A final release `major.minor.patch`.
    pub const fn release(major: u8, minor: u8, patch: u8) -> Self {
        Self::new(major, minor, patch, STAGE_FINAL)
    }

    /// A milestone `major.minor.patchMn`.
    pub const fn milestone(major: u8, minor: u8, patch: u8, milestone: u8) -> Self {
        Self::new(major, minor, patch, milestone)
    }

    fn at_least(&self, other: HawkbitVersion) -> bool {
        *self >= other
    }

    /// Feedback bodies must carry `"id"` equal to the path action id (404 otherwise) (<= 0.3.0M7).
    pub fn feedback_id_required(&self) -> bool {
        !self.at_least(Self::milestone(0, 3, 0, 8))
    }
    /// The feedback `timestamp` is used as the status time (0.7.0+); before, server time.
    pub fn uses_feedback_timestamp(&self) -> bool {
        self.at_least(Self::release(0, 7, 0))
    }
    /// `status.code` is stored and logged (0.3.0M8+).
    pub fn supports_status_code(&self) -> bool {
        self.at_least(Self::milestone(0, 3, 0, 8))
    }
    /// configData bodies must carry a feedback-style `status` (<= 0.3.0M6).
    pub fn config_data_requires_status(&self) -> bool {
        !self.at_least(Self::milestone(0, 3, 0, 7))
    }
    /// `application/cbor` bodies are understood (0.3.0M2+).
    pub fn supports_cbor(&self) -> bool {
        self.at_least(Self::milestone(0, 3, 0, 2))
    }
    /// DOWNLOAD_ONLY actions exist (0.3.0M3+).
    pub fn supports_download_only(&self) -> bool {
        self.at_least(Self::milestone(0, 3, 0, 3))
    }
    /// `hashes.sha256` is advertised (0.3.0M5+).
    pub fn advertises_sha256(&self) -> bool {
        self.at_least(Self::milestone(0, 3, 0, 5))
    }
    /// `installedBase` GET, `confirmationBase*` and auto-confirm exist (0.3.0M8+).
    pub fn supports_confirmation_and_installed_base(&self) -> bool {
        self.at_least(Self::milestone(0, 3, 0, 8))
    }
    /// `PUT installedBase` exists (0.6.0+).
    pub fn supports_put_installed_base(&self) -> bool {
        self.at_least(Self::release(0, 6, 0))
    }
    /// HTTP status for an exceeded quota: 429 since 0.10.0, 403 before.
    pub fn quota_status(&self) -> u16 {
        if self.at_least(Self::release(0, 10, 0)) {
            429
        } else {
            403
        }
    }
    /// Intervals of a day or more are sent as ISO-8601 (0.10.0+); before, `HH:mm:ss` capped at 23:59:59.
    pub fn iso_polling(&self) -> bool {
        self.at_least(Self::release(0, 10, 0))
    }
    /// `autoConfirm.activatedAt` is `0` when inactive (0.8.0+); absent before.
    pub fn activated_at_zero_when_inactive(&self) -> bool {
        self.at_least(Self::release(0, 8, 0))
    }
    /// Artifact ETag is the quoted sha1 (0.10.0+); bare hex before.
    pub fn quoted_artifact_etag(&self) -> bool {
        self.at_least(Self::release(0, 10, 0))
    }
    /// Content-Disposition filename quoted/truncated to 78 chars (0.10.0+); raw before.
    pub fn quoted_content_disposition(&self) -> bool {
        self.at_least(Self::release(0, 10, 0))
    }
    /// Anonymous controller access can exist at all (<= 0.7.x).
    pub fn supports_anonymous(&self) -> bool {
        !self.at_least(Self::release(0, 8, 0))
    }
    /// Every range request is logged as an action status (counts toward the quota) (<= 0.7.x).
    pub fn logs_range_downloads(&self) -> bool {
        !self.at_least(Self::release(0, 8, 0))
    }
    /// Which artifact download access check applies.
    pub fn download_access(&self) -> DownloadAccess {
        if !self.at_least(Self::release(0, 4, 0)) {
            DownloadAccess::NewestActionNotCanceling
        } else if !self.at_least(Self::release(0, 8, 0)) || self.at_least(Self::release(1, 1, 0)) {
            DownloadAccess::ActiveAction
        } else {
            DownloadAccess::ActiveActionFullOnly
        }
    }
    /// The artifact *list* is access-checked (1.0.4+).
    pub fn checks_artifact_list(&self) -> bool {
        self.at_least(Self::release(1, 0, 4))
    }
    /// `denied` on a confirmed (RUNNING) action reverts it to WAIT_FOR_CONFIRMATION (master after 1.1.0).
    pub fn denied_revokes_confirmation(&self) -> bool {
        self.stage == STAGE_HEAD && self.at_least(Self::HEAD)
    }
    /// Error bodies carry `info{}` (0.7.0+) instead of `parameters[]`.
    pub fn error_body_has_info(&self) -> bool {
        self.at_least(Self::release(0, 7, 0))
    }
}

/// The artifact download access rule of a version (spec §12.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownloadAccess {
    /// <= 0.3.x: the newest action holding the module must not be canceling/canceled.
    NewestActionNotCanceling,
    /// 0.4.0–0.7.x and 1.1.0+: an active, non-canceling action must hold the module.
    ActiveAction,
    /// 0.8.0–1.0.x: as `ActiveAction`, but Range requests are not checked.
    ActiveActionFullOnly,
}

impl Default for HawkbitVersion {
    fn default() -> Self {
        Self::HEAD
    }
}

impl fmt::Display for HawkbitVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.stage {
            STAGE_HEAD => write!(f, "head"),
            STAGE_FINAL => write!(f, "{}.{}.{}", self.major, self.minor, self.patch),
            m => write!(f, "{}.{}.{}M{}", self.major, self.minor, self.patch, m),
        }
    }
}

impl FromStr for HawkbitVersion {
    type Err = VersionParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || VersionParseError(s.to_string());
        let t = s.trim();
        if t.eq_ignore_ascii_case("head") || t.eq_ignore_ascii_case("master") {
            return Ok(Self::HEAD);
        }
        let (numbers, stage) = match t.find(['M', 'm']) {
            Some(i) => {
                let m: u8 = t[i + 1..].parse().map_err(|_| err())?;
                if !(1..=9).contains(&m) {
                    return Err(err());
                }
                (&t[..i], m)
            }
            None => (t, STAGE_FINAL),
        };
        let parts: Vec<&str> = numbers.split('.').collect();
        if parts.len() != 3 {
            return Err(err());
        }
        let n = |p: &str| p.parse::<u8>().map_err(|_| err());
        Ok(Self::new(n(parts[0])?, n(parts[1])?, n(parts[2])?, stage))
    }
}

impl TryFrom<String> for HawkbitVersion {
    type Error = VersionParseError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<HawkbitVersion> for String {
    fn from(v: HawkbitVersion) -> String {
        v.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders_versions() {
        let m7: HawkbitVersion = "0.3.0M7".parse().unwrap();
        let m8: HawkbitVersion = "0.3.0M8".parse().unwrap();
        let r030: HawkbitVersion = "0.3.0".parse().unwrap();
        assert!(m7 < m8 && m8 < r030);
        assert!(HawkbitVersion::release(1, 1, 0) < HawkbitVersion::HEAD);
        assert_eq!(m7.to_string(), "0.3.0M7");
        assert_eq!(
            "head".parse::<HawkbitVersion>().unwrap(),
            HawkbitVersion::HEAD
        );
        assert!("1.2".parse::<HawkbitVersion>().is_err());
        assert!("0.3.0M0".parse::<HawkbitVersion>().is_err());
    }

    #[test]
    fn quirks_follow_the_version_table() {
        let v = |s: &str| s.parse::<HawkbitVersion>().unwrap();
        assert!(v("0.3.0M7").feedback_id_required());
        assert!(!v("0.3.0M8").feedback_id_required());
        assert_eq!(v("0.9.0").quota_status(), 403);
        assert_eq!(v("0.10.0").quota_status(), 429);
        assert!(!v("0.9.0").quoted_artifact_etag());
        assert!(v("1.0.0").quoted_artifact_etag());
        assert_eq!(
            v("0.3.0").download_access(),
            DownloadAccess::NewestActionNotCanceling
        );
        assert_eq!(
            v("0.9.0").download_access(),
            DownloadAccess::ActiveActionFullOnly
        );
        assert_eq!(v("1.1.0").download_access(), DownloadAccess::ActiveAction);
        assert!(!v("1.1.0").denied_revokes_confirmation());
        assert!(!v("0.5.0").supports_put_installed_base());
        assert!(v("0.6.0").supports_put_installed_base());
        assert!(HawkbitVersion::HEAD.denied_revokes_confirmation());
    }
}
