//! Bundles made by `create_bundle` verify; every kind of tampering is refused with its reason.

use std::io::{self, Read, Write};
use std::path::PathBuf;
use std::process::Command;

use ddi_bundle::{
    create_bundle, generate_keypair, looks_like_bundle, BundleError, BundleReader, Compression,
    CreateOptions, Policy, PublicKey, SecretKey, MANIFEST_NAME,
};

struct Fixture {
    dir: tempfile::TempDir,
    key: SecretKey,
    image: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        // Not a multiple of 512, so tar padding is exercised.
        let image: Vec<u8> = (0..70_001u32).map(|i| (i * 7 % 251) as u8).collect();
        Fixture {
            dir,
            key: generate_keypair().unwrap(),
            image,
        }
    }

    fn bundle_with(&self, keys: &[SecretKey], compatible: &str) -> Vec<u8> {
        let path = self.dir.path().join("rootfs.img");
        std::fs::write(&path, &self.image).unwrap();
        let mut out = Vec::new();
        create_bundle(
            &path,
            &CreateOptions {
                compatible: compatible.into(),
                version: "2.0".into(),
                image_name: None,
                compression: None,
                keys,
            },
            &mut out,
        )
        .unwrap();
        out
    }

    fn bundle(&self) -> Vec<u8> {
        self.bundle_with(std::slice::from_ref(&self.key), "acme-gw")
    }

    fn policy(&self) -> Policy {
        Policy {
            trusted_keys: vec![self.key.public_key()],
            compatible: Some("acme-gw".into()),
            max_image_size: None,
        }
    }
}

/// Reads the whole image; returns the bytes or the typed error that stopped it.
fn read_image(bundle: &[u8], policy: &Policy) -> Result<Vec<u8>, String> {
    let mut reader = BundleReader::open(bundle, policy).map_err(|e| e.to_string())?;
    let mut image = Vec::new();
    match reader.read_to_end(&mut image) {
        Ok(_) => Ok(image),
        Err(e) => Err(BundleError::from_io(&e)
            .map(|b| b.to_string())
            .unwrap_or_else(|| e.to_string())),
    }
}

/// Offset of the first byte of member `index` (0 = manifest) in a bundle we made.
fn member_data_offset(bundle: &[u8], index: usize) -> usize {
    let mut offset = 0;
    for _ in 0..index {
        let size_field = std::str::from_utf8(&bundle[offset + 124..offset + 135]).unwrap();
        let size = usize::from_str_radix(size_field, 8).unwrap();
        offset += 512 + size.div_ceil(512) * 512;
    }
    offset + 512
}

#[test]
fn a_good_bundle_streams_its_exact_image() {
    let f = Fixture::new();
    let bundle = f.bundle();
    assert!(looks_like_bundle(&bundle));
    let mut reader = BundleReader::open(bundle.as_slice(), &f.policy()).unwrap();
    assert_eq!(reader.manifest().version, "2.0");
    assert_eq!(reader.manifest().image.compression, Compression::None);
    assert_eq!(reader.verified_by(), f.key.public_key().key_id());
    let mut image = Vec::new();
    reader.read_to_end(&mut image).unwrap();
    assert_eq!(image, f.image);
}

#[test]
fn a_tampered_image_fails_on_the_read_that_completes_it() {
    let f = Fixture::new();
    let mut bundle = f.bundle();
    let image_at = member_data_offset(&bundle, 2);
    bundle[image_at + 1000] ^= 0x40;
    let err = read_image(&bundle, &f.policy()).unwrap_err();
    assert!(err.contains("sha256"), "{err}");
}

#[test]
fn a_failed_end_check_is_never_followed_by_a_clean_end() {
    let f = Fixture::new();
    let mut bundle = f.bundle();
    let image_at = member_data_offset(&bundle, 2);
    bundle[image_at + 10] ^= 0x40;
    let mut reader = BundleReader::open(bundle.as_slice(), &f.policy()).unwrap();
    let mut buf = vec![0u8; 4096];
    let first = loop {
        match reader.read(&mut buf) {
            Ok(0) => panic!("a tampered image ended cleanly"),
            Ok(_) => {}
            Err(e) => break e,
        }
    };
    assert!(first.to_string().contains("sha256"), "{first}");
    // A caller that ignores the error and reads again still gets an error, never Ok(0).
    for _ in 0..3 {
        let again = reader.read(&mut buf).unwrap_err();
        assert!(BundleError::from_io(&again).is_some(), "{again}");
        assert!(again.to_string().contains("sha256"), "{again}");
    }
}

/// A reader opened on the bundle's head followed by the image from byte `offset` on (what a
/// resumed download feeds it) continues there: the rest of the image, then the archive's end
/// checks; the image's sha256 is left to the caller, so a tampered byte before or after the
/// offset is not its error, but a wrong size or a member after the image still is.
#[test]
fn a_continued_image_yields_the_rest_and_checks_all_but_the_hash() {
    let f = Fixture::new();
    let bundle = f.bundle();
    let image_at = member_data_offset(&bundle, 2);
    let offset = 40_000;
    let continued = |bundle: &[u8], offset: usize| -> Result<Vec<u8>, String> {
        let stream = bundle[..image_at].chain(&bundle[image_at + offset..]);
        let mut reader = BundleReader::open(stream, &f.policy()).map_err(|e| e.to_string())?;
        assert_eq!(reader.data_offset(), image_at as u64);
        assert_eq!(reader.image_sha256(), reader.manifest().image.sha256);
        reader
            .continue_unhashed(offset as u64)
            .map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        reader
            .read_to_end(&mut rest)
            .map_err(|e| e.to_string())
            .map(|_| rest)
    };
    assert_eq!(continued(&bundle, offset).unwrap(), &f.image[offset..]);
    assert_eq!(continued(&bundle, f.image.len()).unwrap(), b"");

    let mut tampered = bundle.clone();
    tampered[image_at + offset + 10] ^= 1;
    let rest = continued(&tampered, offset).unwrap();
    assert_ne!(rest, &f.image[offset..]);

    // Cut a byte before the image's end: the size check still holds.
    let err = continued(&bundle[..image_at + f.image.len() - 1], offset).unwrap_err();
    assert!(err.contains("70001"), "{err}");
    // Beyond the image: refused before a byte is read.
    let err = continued(&bundle, f.image.len() + 1).unwrap_err();
    assert!(err.contains("70001"), "{err}");

    // A member after the image is still refused.
    let mut extra = bundle[..bundle.len() - 1024].to_vec();
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(3);
    header.set_cksum();
    builder
        .append_data(&mut header, "extra", &b"abc"[..])
        .unwrap();
    extra.extend_from_slice(&builder.into_inner().unwrap());
    let err = continued(&extra, offset).unwrap_err();
    assert!(err.contains("extra"), "{err}");
}

#[test]
fn a_tampered_manifest_fails_the_signature_before_any_image_byte() {
    let f = Fixture::new();
    let mut bundle = f.bundle();
    // Change the version text inside the signed manifest ("2.0" -> "2.1"), fixing the tar
    // checksum is not needed: the member data is not covered by the header checksum.
    let at = member_data_offset(&bundle, 0);
    let manifest_len = 400.min(bundle.len() - at);
    let pos = bundle[at..at + manifest_len]
        .windows(5)
        .position(|w| w == b"\"2.0\"")
        .unwrap();
    bundle[at + pos + 3] = b'1';
    let err = BundleReader::open(bundle.as_slice(), &f.policy())
        .err()
        .unwrap();
    assert!(matches!(err, BundleError::Untrusted { .. }), "{err}");
}

#[test]
fn a_bundle_signed_by_another_key_is_untrusted_and_the_error_names_both_keys() {
    let f = Fixture::new();
    let stranger = generate_keypair().unwrap();
    let bundle = f.bundle_with(std::slice::from_ref(&stranger), "acme-gw");
    let err = BundleReader::open(bundle.as_slice(), &f.policy())
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(text.contains(&stranger.public_key().key_id()), "{text}");
    assert!(text.contains(&f.key.public_key().key_id()), "{text}");
}

#[test]
fn key_rotation_any_trusted_key_and_multi_signed_bundles_verify() {
    let f = Fixture::new();
    let new_key = generate_keypair().unwrap();
    let both = f.bundle_with(&[f.key_clone(), new_key_clone(&new_key)], "acme-gw");
    // A device that already moved to the new key only.
    let new_only = Policy {
        trusted_keys: vec![new_key.public_key()],
        ..f.policy()
    };
    assert_eq!(read_image(&both, &new_only).unwrap(), f.image);
    // A device that trusts old and new accepts a bundle signed by the new key alone.
    let only_new_signed = f.bundle_with(std::slice::from_ref(&new_key), "acme-gw");
    let rotating = Policy {
        trusted_keys: vec![f.key.public_key(), new_key.public_key()],
        ..f.policy()
    };
    assert_eq!(read_image(&only_new_signed, &rotating).unwrap(), f.image);
}

impl Fixture {
    fn key_clone(&self) -> SecretKey {
        SecretKey::parse(&self.key.to_text(), "clone").unwrap()
    }
}

fn new_key_clone(key: &SecretKey) -> SecretKey {
    SecretKey::parse(&key.to_text(), "clone").unwrap()
}

#[test]
fn a_bundle_for_another_device_is_refused() {
    let f = Fixture::new();
    let bundle = f.bundle_with(std::slice::from_ref(&f.key), "other-board");
    let err = BundleReader::open(bundle.as_slice(), &f.policy())
        .err()
        .unwrap();
    assert!(matches!(err, BundleError::Incompatible { .. }), "{err}");
    assert!(err.to_string().contains("other-board"));
}

#[test]
fn a_missing_signature_member_is_refused() {
    let f = Fixture::new();
    let bundle = f.bundle();
    // Drop the signature member: manifest, then directly the image.
    let sig_header = member_data_offset(&bundle, 1) - 512;
    let image_header = member_data_offset(&bundle, 2) - 512;
    let mut without = bundle[..sig_header].to_vec();
    without.extend_from_slice(&bundle[image_header..]);
    let err = BundleReader::open(without.as_slice(), &f.policy())
        .err()
        .unwrap();
    assert!(matches!(err, BundleError::UnexpectedMember { .. }), "{err}");
    assert!(err.to_string().contains("manifest.json.sig"), "{err}");
}

#[test]
fn a_manifest_that_is_not_first_is_refused() {
    let f = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.bin");
    std::fs::write(&image, &f.image).unwrap();
    // A tar made by the tar crate with the image first and the manifest after it.
    let mut builder = tar::Builder::new(Vec::new());
    builder.append_path_with_name(&image, "image.bin").unwrap();
    builder
        .append_path_with_name(&image, MANIFEST_NAME)
        .unwrap();
    let archive = builder.into_inner().unwrap();
    assert!(!looks_like_bundle(&archive));
    let err = BundleReader::open(archive.as_slice(), &f.policy())
        .err()
        .unwrap();
    assert!(err.to_string().contains("manifest.json"), "{err}");
}

#[test]
fn an_image_larger_than_the_slot_is_refused_before_reading_it() {
    let f = Fixture::new();
    let bundle = f.bundle();
    let policy = Policy {
        max_image_size: Some(f.image.len() as u64 - 1),
        ..f.policy()
    };
    let err = BundleReader::open(bundle.as_slice(), &policy)
        .err()
        .unwrap();
    assert!(matches!(err, BundleError::ImageTooLarge { .. }), "{err}");
}

#[test]
fn a_truncated_bundle_is_an_error_not_a_short_image() {
    let f = Fixture::new();
    let bundle = f.bundle();
    let cut = member_data_offset(&bundle, 2) + 100;
    let err = read_image(&bundle[..cut], &f.policy()).unwrap_err();
    assert!(err.contains("70001"), "{err}");
}

#[test]
fn members_after_the_image_are_refused() {
    let f = Fixture::new();
    let mut bundle = f.bundle();
    let end = bundle.len() - 1024;
    bundle.truncate(end);
    let mut extra = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(3);
    header.set_cksum();
    extra
        .append_data(&mut header, "extra", &b"abc"[..])
        .unwrap();
    bundle.extend_from_slice(&extra.into_inner().unwrap());
    let err = read_image(&bundle, &f.policy()).unwrap_err();
    assert!(err.contains("extra"), "{err}");
}

#[test]
fn no_trusted_keys_means_nothing_verifies() {
    let f = Fixture::new();
    let bundle = f.bundle();
    let err = BundleReader::open(bundle.as_slice(), &Policy::default())
        .err()
        .unwrap();
    assert!(matches!(err, BundleError::NoTrustedKeys));
}

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ddi-bundle"))
}

#[test]
fn the_cli_makes_keys_creates_verifies_and_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let run = |args: &[&str]| {
        Command::new(bin())
            .args(args)
            .current_dir(d)
            .output()
            .unwrap()
    };

    let out = run(&["keygen", "--out", "vendor"]);
    assert!(out.status.success(), "{out:?}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.join("vendor.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
    PublicKey::load(&d.join("vendor.pub")).unwrap();
    assert!(run(&["keygen", "--out", "other"]).status.success());

    let mut gz = flate2_like_gzip_header();
    gz.extend_from_slice(&[0u8; 100]);
    std::fs::File::create(d.join("rootfs.img.gz"))
        .unwrap()
        .write_all(&gz)
        .unwrap();
    let out = run(&[
        "create",
        "--key",
        "vendor.key",
        "--compatible",
        "acme-gw",
        "--version",
        "3.1",
        "--image",
        "rootfs.img.gz",
        "-o",
        "update.ddib",
    ]);
    assert!(out.status.success(), "{out:?}");

    let out = run(&[
        "verify",
        "--trusted-key",
        "vendor.pub",
        "--compatible",
        "acme-gw",
        "update.ddib",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("OK: acme-gw 3.1"));

    let out = run(&["verify", "--trusted-key", "other.pub", "update.ddib"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("does not verify with any trusted key"),
        "{err}"
    );
    assert_eq!(err.lines().count(), 1, "{err}");

    // A key file that cannot be read: one line naming it, the cause said once.
    let out = run(&["verify", "--trusted-key", "missing.pub", "update.ddib"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read key file missing.pub"), "{err}");
    assert_eq!(err.matches("No such file").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");

    let out = run(&["info", "update.ddib"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"gzip\""), "{text}");
    assert!(text.contains("unverified"), "{text}");
}

/// The two magic bytes and method byte of a gzip member: enough for compression detection.
fn flate2_like_gzip_header() -> Vec<u8> {
    vec![0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff]
}

#[test]
fn reading_through_a_slow_reader_still_verifies() {
    // A reader that hands out at most 7 bytes per call, as a network stream might.
    struct Trickle<'a>(&'a [u8]);
    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(7).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    let f = Fixture::new();
    let bundle = f.bundle();
    let mut reader = BundleReader::open(Trickle(&bundle), &f.policy()).unwrap();
    let mut image = Vec::new();
    reader.read_to_end(&mut image).unwrap();
    assert_eq!(image, f.image);
}
