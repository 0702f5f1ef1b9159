//! The decoders' own speed, for the benchmarks (bench/bench.py; not shipped, not a test):
//! decodes a gzip, zstd or xz image from memory with the decoder the agent uses (flate2 on
//! zlib-rs, `MultiGzDecoder`; the C zstd library through the agent's `ZstdReader`; the
//! agent's own `XzDecoder`) into a buffer the size of the slot writer's, and once more with
//! the two hashes the blocking stage computes (sha256 of the artifact as served and of the
//! decoded image). An xz image is also decoded with lzma-rust2's `XzReader`, the agent's
//! decoder before its own, for comparison. Prints one JSON object.
//!
//! ```sh
//! cargo build --release -p ddi-agent --example decode_speed
//! target/release/examples/decode_speed IMAGE.gz [RUNS]
//! ```

use std::io::{self, Read};
use std::time::Instant;

use ddi_agent::install::compress::ZstdReader;
use ddi_agent::install::unxz::XzDecoder;
use flate2::read::MultiGzDecoder;
use sha2::{Digest, Sha256};

/// What the agent decodes into (the free part of the slot writer's buffer).
const OUT_BUFFER: usize = 512 << 10;

/// CPU seconds of this process (user + system).
fn cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass and nothing else.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// A reader that hashes what passes through it (the artifact hash of the agent).
struct Hashing<'a, R> {
    inner: R,
    hash: &'a mut Option<Sha256>,
}

impl<R: Read> Read for Hashing<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if let Some(h) = self.hash.as_mut() {
            h.update(&buf[..n]);
        }
        Ok(n)
    }
}

/// Decode `data` once; returns (decoded bytes, wall s, CPU s).
fn decode(data: &[u8], format: Format, hashes: bool) -> io::Result<(u64, f64, f64)> {
    let (wall, cpu) = (Instant::now(), cpu_seconds());
    let mut artifact_hash = hashes.then(Sha256::new);
    let mut image_hash = hashes.then(Sha256::new);
    let source = Hashing {
        inner: data,
        hash: &mut artifact_hash,
    };
    let mut decoder: Box<dyn Read + '_> = match format {
        Format::Zstd => Box::new(ZstdReader::new(source)),
        Format::Gzip => Box::new(MultiGzDecoder::new(source)),
        Format::Xz => Box::new(XzDecoder::new(source, None)),
        Format::XzLzmaRust2 => Box::new(lzma_rust2::XzReader::new(source, true)),
    };
    let mut buf = vec![0u8; OUT_BUFFER];
    let mut total = 0u64;
    loop {
        let n = decoder.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if let Some(h) = image_hash.as_mut() {
            h.update(&buf[..n]);
        }
        total += n as u64;
    }
    drop(decoder);
    // Keep the hashes from being optimised away.
    let digest: Vec<u8> = [artifact_hash, image_hash]
        .into_iter()
        .flatten()
        .flat_map(|h| h.finalize().to_vec())
        .collect();
    std::hint::black_box(digest);
    Ok((total, wall.elapsed().as_secs_f64(), cpu_seconds() - cpu))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Gzip,
    Zstd,
    Xz,
    /// xz with lzma-rust2's decoder.
    XzLzmaRust2,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> io::Result<()> {
    let mut args = std::env::args().skip(1);
    let Some(path) = args.next() else {
        eprintln!("usage: decode_speed IMAGE.gz|IMAGE.zst|IMAGE.xz [RUNS]");
        std::process::exit(2);
    };
    let runs: usize = args.next().and_then(|r| r.parse().ok()).unwrap_or(3).max(1);
    let data = std::fs::read(&path)?;
    let format = if data.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Format::Zstd
    } else if data.starts_with(b"\xfd7zXZ\0") {
        Format::Xz
    } else {
        Format::Gzip
    };
    let mut out = Vec::new();
    let mut cases = vec![(format, false), (format, true)];
    if format == Format::Xz {
        cases.push((Format::XzLzmaRust2, false));
    }
    for (format, hashes) in cases {
        let mut walls = Vec::new();
        let mut cpus = Vec::new();
        let mut decoded = 0;
        for _ in 0..runs {
            let (n, wall, cpu) = decode(&data, format, hashes)?;
            decoded = n;
            walls.push(wall);
            cpus.push(cpu);
        }
        let cpu = median(cpus);
        out.push(format!(
            "\"{}\": {{\"decoded_bytes\": {decoded}, \"wall_s\": {:.4}, \"cpu_s\": {cpu:.4}, \"decoded_mib_per_cpu_s\": {:.1}}}",
            match (format, hashes) {
                (Format::XzLzmaRust2, _) => "lzma_rust2_decoder",
                (_, true) => "with_hashes",
                (_, false) => "decoder",
            },
            median(walls),
            decoded as f64 / (1 << 20) as f64 / cpu,
        ));
    }
    println!(
        "{{\"format\": \"{}\", \"compressed_bytes\": {}, \"runs\": {runs}, {}}}",
        format!("{format:?}").to_lowercase(),
        data.len(),
        out.join(", ")
    );
    Ok(())
}
