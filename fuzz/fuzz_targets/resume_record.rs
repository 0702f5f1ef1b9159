//! Download resume records as a restart reads them from `state_dir` (bit rot, a forged file,
//! a record of another agent version): the JSON, the checks that make a point of it (raw,
//! member, chunks, and the gzip, zstd and xz points with their states: deflate bits and CRC,
//! zstd tables and repeat offsets, xz stream and in-block LZMA state), and for a point that
//! passes them, its decoder continuing from it over the output before the point (made up: a
//! restart would have checked the slot's sha256 first) and the artifact's bytes after it.
//! Whatever the record says, nothing may panic, loop or allocate without bound: the decoder
//! gives bytes or an error.
//!
//! Input: the record's JSON, then a NUL and the artifact's bytes from the point on. The seeds
//! are records the release agent wrote, killed at its first checkpoint (`checkpoint_interval
//! = "256k"`), each followed by its artifact's next 16 KiB.
#![no_main]

use std::io::Read;
use std::path::Path;

use ddi_agent::install::gunzip::GzDecoder;
use ddi_agent::install::resume::{ResumeRecord, Target};
use ddi_agent::install::unxz::XzDecoder;
use ddi_agent::install::unzstd::{ResumePrefix, ZstdDecoder};
use libfuzzer_sys::fuzz_target;

/// The largest output before a point that is made up and fed to a decoder (larger points are
/// checked but not decoded from).
const MAX_PREFIX: u64 = 1 << 20;

/// Output read from a resumed decoder before it is left (the artifact's rest is at most 64
/// KiB, but one byte of it may stand for much more output).
const MAX_OUTPUT: usize = 4 << 20;

/// The output before a point: any bytes do (the decoder cannot tell), these vary.
fn prefix(out: u64) -> Vec<u8> {
    (0..out).map(|i| (i.wrapping_mul(31) % 251) as u8).collect()
}

fn drain(mut decoder: impl Read) {
    let mut buf = vec![0u8; 64 << 10];
    let mut total = 0;
    while total < MAX_OUTPUT {
        match decoder.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => total += n,
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let (json, rest) = match input.iter().position(|&b| b == 0) {
        Some(i) => (&input[..i], &input[i + 1..]),
        None => (input, &[][..]),
    };
    let Ok(record) = serde_json::from_slice::<ResumeRecord>(json) else {
        return;
    };
    // The download the record says it belongs to, and a slot that holds it.
    let slot: &Path = &record.slot;
    let capacity = record.slot_offset.max(record.size.unwrap_or(0));
    let target = Target {
        slot,
        algorithm: &record.algorithm,
        expected_hash: &record.expected_hash,
        size: record.size,
        capacity,
    };
    let _ = record.resume_offset(
        slot,
        &record.algorithm,
        &record.expected_hash,
        record.size,
        capacity,
    );
    if let Some(image) = record.image_sha256.as_deref() {
        let _ = record.chunks_offset(slot, &record.expected_hash, image, capacity);
    }
    for bundle_policy in [false, true] {
        let _ = record.member_point(&target, bundle_policy);
        if let Some(p) = record.gzip_point(&target, bundle_policy) {
            if p.at.out <= MAX_PREFIX {
                let before = prefix(p.at.out);
                let window = &before[before.len() - before.len().min(32 << 10)..];
                if let Ok(d) = GzDecoder::resume(rest, &p.at, Some(p.artifact_hash), window) {
                    drain(d);
                }
            }
        }
        if let Some(p) = record.zstd_point(&target, bundle_policy) {
            if p.at.out <= MAX_PREFIX {
                let mut window = ResumePrefix::new(&p.at);
                window.update(&prefix(p.at.out));
                if let Ok(d) = ZstdDecoder::resume(rest, &p.at, Some(p.artifact_hash), window) {
                    drain(d);
                }
            }
        }
        if let Some(p) = record.xz_point(&target, bundle_policy) {
            if p.at.out <= MAX_PREFIX {
                let mut window = p.at.window();
                if let Some(w) = &mut window {
                    w.update(&prefix(p.at.out));
                }
                let hash = Some(p.artifact_hash);
                if let Ok(d) = XzDecoder::resume_with_window(rest, &p.at, hash, window) {
                    drain(d);
                }
            }
        }
    }
});
