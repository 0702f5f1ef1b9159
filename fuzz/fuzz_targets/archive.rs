//! The install pipeline's blocking stage (format sniffing, gzip, zstd, xz, tar and a tar in each
//! compression, the slot size guard, the hash check) on arbitrary artifact bytes, written into a
//! slot in memory. Whatever happens, the pipeline must return (error or success), never write
//! past the slot, and a success must mean the slot holds exactly the image it reports.
#![no_main]

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use ddi_agent::install::hash::HashAlgorithm;
use ddi_agent::install::pipeline::{self, Chunk, Counters, SinkPlan};
use ddi_fuzz::{sha256_hex, MemSlot};
use libfuzzer_sys::fuzz_target;
use tokio::sync::mpsc;

/// Slot capacity: small so that oversized images and decompression bombs hit the guard.
const CAPACITY: usize = 256 * 1024;

static RUNS: AtomicU64 = AtomicU64::new(0);

fuzz_target!(|input: &[u8]| {
    let Some((&mode, artifact)) = input.split_first() else {
        return;
    };
    // Half the runs expect the artifact's real hash, so successes are reachable.
    let expected = if mode & 1 == 0 {
        sha256_hex(artifact)
    } else {
        "00".repeat(32)
    };
    let plan = SinkPlan {
        url: "http://127.0.0.1/artifact".into(),
        algorithm: HashAlgorithm::Sha256,
        expected,
        size: (mode & 2 != 0).then_some(artifact.len() as u64),
        start: 0,
        resume_path: PathBuf::from("/nonexistent/ddi-fuzz/resume.json"),
        archive_member: (mode & 4 != 0).then(|| "image.ext4".to_string()),
        bundle: None,
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
    let split = usize::from(mode >> 3).min(artifact.len());
    let (tx, rx) = mpsc::channel(4);
    tx.try_send(Chunk::Data(Bytes::copy_from_slice(&artifact[..split])))
        .expect("channel has room");
    tx.try_send(Chunk::Data(Bytes::copy_from_slice(&artifact[split..])))
        .expect("channel has room");
    if mode & 0x80 == 0 {
        tx.try_send(Chunk::End).expect("channel has room");
    } // else: the download side vanished without End (an aborted download)
    drop(tx);
    let counters = Counters::new(0, plan.size);
    let result = pipeline::run(plan, &mut slot, rx.into(), &counters);
    RUNS.fetch_add(1, Ordering::Relaxed);
    if let Ok(installed) = result {
        assert!(mode & 0x80 == 0, "an aborted download must not succeed");
        assert!(mode & 1 == 0, "a wrong hash must not succeed");
        let n = installed.bytes_written as usize;
        assert!(n <= CAPACITY);
        assert_eq!(
            sha256_hex(&slot.data[..n]),
            installed.sha256_of_slot_image,
            "slot does not hold the image reported"
        );
    }
});
