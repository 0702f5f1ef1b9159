//! Signed bundles through the agent's real install stage (`install::pipeline::run`, the code
//! the agent runs on a blocking thread), with `require_signature` on and a matching artifact
//! sha256, so only the signature can refuse the bytes. Each input makes a genuine bundle of an
//! image (raw or gzip), then tampers with it: the image member swapped for a tar, a gzip or other
//! raw bytes (zero-padded to the signed size), a cut, a member or bytes after the image, and
//! fuzzed byte overwrites anywhere. The bytes arrive in chunks, with or without the end marker
//! of a complete download.
//!
//! Asserts what activation relies on: whenever the stage returns Ok (the slot would be
//! activated) the slot holds exactly the signed image, decoded as the manifest says; so any
//! other slot content comes with an Err. And the untouched genuine bundle installs.
//!
//! The signed images never look like a tar themselves: the pipeline unpacks a tar wherever it
//! finds one (even in a bundle whose manifest says `compression: none`), so for a signed tar
//! "decoded as the manifest says" would not be what the slot receives.
#![no_main]

use std::io::Write;
use std::path::PathBuf;
use std::sync::OnceLock;

use bytes::Bytes;
use ddi_agent::install::decode;
use ddi_agent::install::hash::HashAlgorithm;
use ddi_agent::install::pipeline::{self, Chunk, Counters, SinkPlan};
use ddi_agent::install::BundlePolicy;
use ddi_bundle::{create_bundle, CreateOptions, SecretKey};
use ddi_fuzz::{sha256_hex, MemSlot};
use libfuzzer_sys::fuzz_target;
use tokio::sync::mpsc;

const COMPATIBLE: &str = "fuzz-board";
/// Slot capacity: room for every image the input can describe.
const CAPACITY: usize = 256 * 1024;
/// Length of the end-of-archive marker (two zero blocks) of a bundle.
const END_MARKER: usize = 1024;
/// How much shorter the swapped-in image is than the signed one: room for a tar's header,
/// padding and end marker, or gzip's overhead.
const SWAP_ROOM: usize = 2048;

/// The vendor key, and a folder holding its public half (the agent loads keys from files).
struct Vendor {
    key: SecretKey,
    dir: PathBuf,
}

fn vendor() -> &'static Vendor {
    static VENDOR: OnceLock<Vendor> = OnceLock::new();
    VENDOR.get_or_init(|| {
        let key = ddi_bundle::generate_keypair().expect("keypair");
        let dir =
            std::env::temp_dir().join(format!("ddi-fuzz-bundle-install-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create key folder");
        std::fs::write(dir.join("vendor.pub"), key.public_key().to_text()).expect("write key");
        Vendor { key, dir }
    })
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    encoder.write_all(data).expect("write to memory");
    encoder.finish().expect("write to memory")
}

/// A ustar archive of one file, without the end-of-archive marker when `open_ended`.
fn tar_of(name: &str, data: &[u8], open_ended: bool) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    builder
        .append_data(&mut header, name, data)
        .expect("write to memory");
    let mut archive = builder.into_inner().expect("write to memory");
    if open_ended {
        archive.truncate(archive.len() - END_MARKER);
    }
    archive
}

/// An image that is neither gzip (fixed first line) nor tar.
fn image_of(first_line: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut image = first_line.to_vec();
    image.extend_from_slice(payload);
    if decode::is_tar(&image) {
        image[257] ^= 0x20;
    }
    image
}

/// Data range of the third member (the image) of a bundle made by `create_bundle`.
fn image_member(bundle: &[u8]) -> std::ops::Range<usize> {
    let mut at = 0;
    let mut size = 0usize;
    for _ in 0..3 {
        at += size.div_ceil(512) * 512;
        let field = std::str::from_utf8(&bundle[at + 124..at + 135]).expect("octal size");
        size = usize::from_str_radix(field, 8).expect("octal size");
        at += 512;
    }
    at..at + size
}

fuzz_target!(|input: &[u8]| {
    // [mode][chunking][payload_len: u16][payload][edits: (offset u16, value u8)*]
    if input.len() < 4 {
        return;
    }
    let (mode, chunking) = (input[0], input[1]);
    let payload_len = usize::from(u16::from_le_bytes([input[2], input[3]])).min(input.len() - 4);
    let payload = &input[4..4 + payload_len];
    let edits = &input[4 + payload_len..];

    let image = image_of(b"DDI-FUZZ-IMAGE\n", payload);
    let reversed: Vec<u8> = payload.iter().rev().copied().collect();
    // Another image, small enough that its tar or gzip fits into the signed image's member.
    let other_len = payload.len().saturating_sub(SWAP_ROOM);
    let other = image_of(b"DDI-FUZZ-OTHER\n", &reversed[..other_len]);
    // What the vendor signs: the image itself or its gzip (`compression: gzip`, detected).
    let member = if mode & 1 != 0 {
        gzip(&image)
    } else {
        image.clone()
    };

    let vendor = vendor();
    let member_path = vendor
        .dir
        .join(format!("member-{:?}", std::thread::current().id()));
    std::fs::write(&member_path, &member).expect("write member");
    let mut bundle = Vec::new();
    create_bundle(
        &member_path,
        &CreateOptions {
            compatible: COMPATIBLE.into(),
            version: "1".into(),
            image_name: Some("rootfs.img".into()),
            compression: None,
            keys: std::slice::from_ref(&vendor.key),
        },
        &mut bundle,
    )
    .expect("create bundle");
    let pristine = bundle.clone();

    // The image member's bytes swapped for another image, zero-padded to the signed size.
    let replacement = match (mode >> 1) & 3 {
        1 => Some(tar_of("rootfs.img", &other, false)),
        2 => Some(gzip(&other)),
        3 => Some(other.clone()),
        _ => None,
    };
    if let Some(mut replacement) = replacement {
        let range = image_member(&bundle);
        replacement.truncate(range.len());
        let slot = &mut bundle[range];
        slot.fill(0);
        slot[..replacement.len()].copy_from_slice(&replacement);
    }
    match (mode >> 3) & 3 {
        1 => bundle.truncate(bundle.len().saturating_sub(1 + usize::from(chunking) * 16)),
        2 => {
            let extra = tar_of("payload.sh", &reversed[..reversed.len().min(600)], true);
            let end = bundle.len() - END_MARKER;
            bundle.splice(end..end, extra);
        }
        3 => bundle.extend_from_slice(&other[..other.len().min(usize::from(chunking) + 1)]),
        _ => {}
    }
    for edit in edits.chunks_exact(3) {
        let at = usize::from(u16::from_le_bytes([edit[0], edit[1]]));
        if at < bundle.len() {
            bundle[at] = edit[2];
        }
    }
    let complete = mode & 0x20 == 0;

    let plan = SinkPlan {
        url: "http://127.0.0.1/update.ddib".into(),
        algorithm: HashAlgorithm::Sha256,
        // The server's hash matches what it serves: only the signature can refuse the bytes.
        expected: sha256_hex(&bundle),
        size: Some(bundle.len() as u64),
        start: 0,
        resume_path: PathBuf::from("/nonexistent/ddi-fuzz/resume.json"),
        archive_member: None,
        bundle: Some(BundlePolicy {
            trusted_keys: vec![vendor.dir.join("vendor.pub")],
            require_signature: true,
            compatible: Some(COMPATIBLE.into()),
        }),
        // Never checkpoint: the resume file is not the subject here.
        checkpoint_interval: u64::MAX / 2,
        gzip_resume: None,
        zstd_resume: None,
        xz_resume: None,
        replay: None,
        bundle_image_at: None,
        bundle_head: None,
        artifact_sha256: None,
    };
    let mut slot = MemSlot::new(CAPACITY, 0xA5);
    let chunk_len = 64 + usize::from(chunking) * 257;
    let chunks: Vec<&[u8]> = bundle.chunks(chunk_len).collect();
    let (tx, rx) = mpsc::channel(chunks.len() + 1);
    for chunk in chunks {
        tx.try_send(Chunk::Data(Bytes::copy_from_slice(chunk)))
            .expect("channel has room");
    }
    if complete {
        tx.try_send(Chunk::End).expect("channel has room");
    } // else: the download side vanished without End (an aborted download)
    drop(tx);
    let counters = Counters::new(0, plan.size);
    let result = pipeline::run(plan, &mut slot, rx.into(), &counters);

    match result {
        Ok(installed) => {
            let written = installed.bytes_written as usize;
            assert!(
                written == image.len() && slot.data[..written] == image[..],
                "the slot would be activated holding {written} bytes that are not the signed \
                 {}-byte image (mode {mode:#04x})",
                image.len()
            );
            assert!(complete, "an aborted download was installed");
        }
        Err(err) => {
            assert!(
                !(bundle == pristine && complete),
                "the genuine bundle was refused: {err}"
            );
        }
    }
});
