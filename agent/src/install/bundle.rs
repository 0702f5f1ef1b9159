//! Seam for signed bundles (owned by the bundle work, issue 10): [`open`] receives the
//! artifact stream (already being hashed) and returns the stream of the payload to install,
//! failing (at the latest at the end of the stream) when the signature policy is not met.
//!
//! Until the `ddi-bundle` verification is plugged in here, a policy that requires a
//! signature refuses every artifact, and one that does not passes artifacts through
//! unchanged.

use std::io::Read;
use std::path::PathBuf;

use super::InstallError;

/// The signature policy from the `[bundle]` configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BundlePolicy {
    /// Public keys accepted for bundle signatures.
    pub trusted_keys: Vec<PathBuf>,
    /// Refuse artifacts that are not signed bundles.
    pub require_signature: bool,
    /// The `compatible` string a bundle must name.
    pub compatible: Option<String>,
}

/// Wrap the artifact stream; what comes out is what gets decoded and written.
pub fn open<'a>(
    policy: &BundlePolicy,
    artifact: Box<dyn Read + 'a>,
) -> Result<Box<dyn Read + 'a>, InstallError> {
    if policy.require_signature {
        return Err(InstallError::Signature(
            "a signed bundle is required, and bundle verification is not available".into(),
        ));
    }
    Ok(artifact)
}
