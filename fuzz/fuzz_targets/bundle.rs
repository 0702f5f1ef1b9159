//! The signed-bundle reader on arbitrary bytes: `looks_like_bundle`, the unverified manifest
//! reader, and `BundleReader::open` + reading to the end with a fixed trusted key. No input
//! the fuzzer makes carries a valid signature, so every open must fail before the image.
#![no_main]

use std::io::Read;
use std::sync::OnceLock;

use ddi_bundle::{looks_like_bundle, read_manifest_unverified, BundleReader, Policy, SecretKey};
use libfuzzer_sys::fuzz_target;

fn policy() -> &'static Policy {
    static POLICY: OnceLock<Policy> = OnceLock::new();
    POLICY.get_or_init(|| {
        let key = ddi_bundle::generate_keypair().expect("keypair");
        Policy {
            trusted_keys: vec![SecretKey::public_key(&key)],
            compatible: Some("fuzz-board".into()),
            max_image_size: Some(1 << 20),
        }
    })
}

fuzz_target!(|input: &[u8]| {
    let _ = looks_like_bundle(input);
    let _ = read_manifest_unverified(input);
    if let Ok(mut reader) = BundleReader::open(input, policy()) {
        // Only reachable with a forged signature: a real finding.
        let mut sink = Vec::new();
        let _ = reader.read_to_end(&mut sink);
        panic!("bundle verified with a key the fuzzer cannot know");
    }
});
