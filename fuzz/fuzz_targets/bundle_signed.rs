//! The bundle reader past signature verification: a correctly signed bundle of a fuzzed image,
//! then fuzzed byte overwrites, a cut or extra bytes anywhere in it. Reading must either fail or
//! give back exactly the signed image: no byte the signature does not cover gets through.
#![no_main]

use std::io::Read;
use std::sync::OnceLock;

use ddi_bundle::{create_bundle, BundleReader, CreateOptions, Policy, SecretKey};
use libfuzzer_sys::fuzz_target;

fn key() -> &'static SecretKey {
    static KEY: OnceLock<SecretKey> = OnceLock::new();
    KEY.get_or_init(|| ddi_bundle::generate_keypair().expect("keypair"))
}

fuzz_target!(|input: &[u8]| {
    // [image_len: u16][image][edits: (offset u16, value u8)*][mode]
    if input.len() < 3 {
        return;
    }
    let image_len = usize::from(u16::from_le_bytes([input[0], input[1]])).min(input.len() - 2);
    let image = &input[2..2 + image_len];
    let rest = &input[2 + image_len..];
    let (mode, edits) = rest.split_last().map_or((0, &[][..]), |(m, e)| (*m, e));

    let path = std::env::temp_dir().join(format!("ddi-fuzz-image-{}", std::process::id()));
    std::fs::write(&path, image).expect("write temp image");
    let mut bundle = Vec::new();
    let keys = [SecretKey::parse(&key().to_text(), "key").expect("key round trip")];
    let options = CreateOptions {
        compatible: "fuzz-board".into(),
        version: "1".into(),
        image_name: Some("image.bin".into()),
        compression: None,
        keys: &keys,
    };
    create_bundle(&path, &options, &mut bundle).expect("create bundle");

    let pristine = bundle.clone();
    for e in edits.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([e[0], e[1]]));
        if at < bundle.len() {
            bundle[at] = e[2];
        }
    }
    match mode % 4 {
        1 => bundle.truncate(bundle.len().saturating_sub(usize::from(mode))),
        2 => bundle.extend_from_slice(&[mode; 512]),
        _ => {}
    }

    let policy = Policy {
        trusted_keys: vec![key().public_key()],
        compatible: Some("fuzz-board".into()),
        max_image_size: None,
    };
    let Ok(mut reader) = BundleReader::open(&bundle[..], &policy) else {
        return;
    };
    let mut out = Vec::new();
    if reader.read_to_end(&mut out).is_ok() {
        assert_eq!(
            out, image,
            "a verified bundle gave back other bytes than the signed image"
        );
    } else if bundle == pristine {
        panic!("an untouched signed bundle failed to read");
    }
});
