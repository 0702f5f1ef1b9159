//! `ddi-bundle`: make keys, create signed bundles, verify and inspect them.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::collections::HashSet;

use sha2::{Digest, Sha256};

use ddi_bundle::{
    create_bundle, create_chunked_bundle, generate_keypair, BundleReader, ChunkDecoder,
    ChunkedOptions, Chunker, ChunkerParams, Compression, CreateOptions, DeltaPlan, Policy,
    PublicKey, SecretKey, UnverifiedBundle,
};

#[derive(Parser)]
#[command(
    name = "ddi-bundle",
    version,
    about = "Create and verify signed update bundles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an ed25519 key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Create a signed bundle from an image (format 1: raw, gzip, zstd or xz; format 2 with
    /// --chunked: a raw image cut into chunks that devices can reuse).
    Create {
        /// Secret key file; repeat to sign with several keys (key rotation).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long)]
        compatible: String,
        #[arg(long)]
        version: String,
        /// The image file to bundle.
        #[arg(long)]
        image: PathBuf,
        /// Member name of the image (default: the image's file name).
        #[arg(long)]
        image_name: Option<String>,
        /// Format 1: none, gzip, zstd or xz (default: detected from the image's magic bytes).
        #[arg(long)]
        compression: Option<String>,
        /// Write a chunked bundle (format 3, or --chunk-format 2) from the raw image, for delta
        /// updates. Devices whose agent does not read that format refuse it.
        #[arg(long)]
        chunked: bool,
        /// Chunked: 3 (each chunk compressed with the image before it as context, compact
        /// index) or 2 (for agents that read formats 1 and 2 only).
        #[arg(long, default_value_t = ddi_bundle::FORMAT_CHUNKED_CONTEXT)]
        chunk_format: u32,
        /// Chunked: average chunk size in KiB (a power of two; min = 1/4, max = 4 x).
        #[arg(long, default_value_t = ddi_bundle::DEFAULT_AVERAGE_CHUNK / 1024)]
        chunk_size_kib: u32,
        /// Format 3: KiB of the image before each chunk that its frame is compressed with,
        /// 1 to 1024 (what a device accepts) [default: 128]. Formats 1 and 2 have none.
        #[arg(long, value_parser = history_kib)]
        history_kib: Option<u32>,
        /// Chunked: zstd level of every chunk.
        #[arg(long, default_value_t = 19)]
        zstd_level: i32,
        /// Where to write the bundle.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Verify a bundle completely (signature, compatible, image size and hash).
    Verify {
        /// A trusted public key file; repeat for several.
        #[arg(long = "trusted-key", required = true)]
        trusted_keys: Vec<PathBuf>,
        /// The device's compatible string to check against.
        #[arg(long)]
        compatible: Option<String>,
        bundle: PathBuf,
    },
    /// Print a bundle's manifest (and chunk statistics) without verifying anything.
    Info { bundle: PathBuf },
    /// How many bytes a device running OLD downloads to install the chunked bundle NEW.
    Diff {
        /// What the device runs: a bundle, or the raw image on its slot.
        old: PathBuf,
        /// A chunked (format 2) bundle.
        new: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("ddi-bundle: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out } => keygen(&out),
        Command::Create {
            keys,
            compatible,
            version,
            image,
            image_name,
            compression,
            chunked,
            chunk_format,
            chunk_size_kib,
            history_kib,
            zstd_level,
            output,
        } => {
            let keys = keys
                .iter()
                .map(|p| SecretKey::load(p))
                .collect::<Result<Vec<_>, _>>()?;
            let compression = match compression.as_deref() {
                None => None,
                Some("none") => Some(Compression::None),
                Some("gzip") => Some(Compression::Gzip),
                Some("zstd") => Some(Compression::Zstd),
                Some("xz") => Some(Compression::Xz),
                Some(other) => bail!("--compression {other:?}: expected none, gzip, zstd or xz"),
            };
            let history_format = chunked && chunk_format == ddi_bundle::FORMAT_CHUNKED_CONTEXT;
            if let (Some(_), false) = (history_kib, history_format) {
                let format = if chunked { chunk_format } else { 1 };
                eprintln!(
                    "ddi-bundle: note: --history-kib is ignored: format {format} compresses \
                     no chunk with the image before it (only --chunked format 3 does)"
                );
            }
            if chunked && compression.is_some() {
                bail!("--compression is for format 1; a chunked bundle compresses each chunk with zstd");
            }
            let options = CreateOptions {
                compatible,
                version,
                image_name,
                compression,
                keys: &keys,
            };
            let tmp = output.with_extension("partial");
            let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let manifest = if chunked {
                let chunked = ChunkedOptions {
                    chunker: ChunkerParams::with_average(chunk_size_kib.saturating_mul(1024)),
                    zstd_level,
                    format: chunk_format,
                    history: history_kib.map_or(ddi_bundle::DEFAULT_HISTORY, |kib| kib * 1024),
                };
                create_chunked_bundle(&image, &options, &chunked, file)
            } else {
                create_bundle(&image, &options, file)
            }
            .with_context(|| format!("bundling {}", image.display()))?;
            std::fs::rename(&tmp, &output)
                .with_context(|| format!("renaming to {}", output.display()))?;
            println!(
                "{}: {} {} ({} bytes, sha256 {}, {:?}), signed by {}",
                output.display(),
                manifest.compatible,
                manifest.version,
                manifest.image.size,
                manifest.image.sha256,
                manifest.image.compression,
                keys.iter()
                    .map(|k| k.public_key().key_id())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Command::Verify {
            trusted_keys,
            compatible,
            bundle,
        } => {
            let policy = Policy {
                trusted_keys: trusted_keys
                    .iter()
                    .map(|p| PublicKey::load(p))
                    .collect::<Result<Vec<_>, _>>()?,
                compatible,
                max_image_size: None,
            };
            let file =
                File::open(&bundle).with_context(|| format!("opening {}", bundle.display()))?;
            let mut reader = BundleReader::open(io::BufReader::new(file), &policy)?;
            let copied = match reader.chunk_index().cloned() {
                Some(index) => {
                    let history = reader.manifest().chunked.as_ref().and_then(|c| c.history);
                    verify_chunks(&mut reader, &index, history.unwrap_or(0))?
                }
                None => io::copy(&mut reader, &mut io::sink()).map_err(|e| {
                    match ddi_bundle::BundleError::from_io(&e) {
                        Some(inner) => anyhow::anyhow!("{inner}"),
                        None => anyhow::anyhow!("reading {}: {e}", bundle.display()),
                    }
                })?,
            };
            let m = reader.manifest();
            println!(
                "OK: {} {} image {} ({copied} bytes) signed by trusted key {}",
                m.compatible,
                m.version,
                m.image.name,
                reader.verified_by()
            );
            Ok(())
        }
        Command::Info { bundle } => {
            let file =
                File::open(&bundle).with_context(|| format!("opening {}", bundle.display()))?;
            let read = ddi_bundle::read_unverified(io::BufReader::new(file))
                .with_context(|| format!("reading {}", bundle.display()))?;
            println!("{}", serde_json::to_string_pretty(&read.manifest)?);
            if let Some(index) = &read.index {
                print_chunk_statistics(index);
            }
            println!("(unverified: use `ddi-bundle verify` to check signature and image)");
            Ok(())
        }
        Command::Diff { old, new, json } => diff(&old, &new, json),
    }
}

/// Reads the image member chunk by chunk, checking each against the index; the reader checks
/// the member's size and sha256 at its end. Returns the decompressed size.
/// `--history-kib`: a whole number of KiB from 1 to [`ddi_bundle::MAX_HISTORY`] (1 MiB), the
/// range a device accepts in a format-3 manifest; checked here so that no bundle is written
/// that every device refuses.
fn history_kib(value: &str) -> Result<u32, String> {
    let max = ddi_bundle::MAX_HISTORY / 1024;
    match value.parse::<u32>() {
        Ok(kib) if (1..=max).contains(&kib) => Ok(kib),
        _ => Err(format!(
            "must be a whole number of KiB from 1 to {max} (a device accepts a format-3 \
             history of 1 byte to {} bytes)",
            ddi_bundle::MAX_HISTORY
        )),
    }
}

fn verify_chunks<R: io::Read>(
    reader: &mut BundleReader<R>,
    index: &ddi_bundle::ChunkIndex,
    history: u32,
) -> Result<u64> {
    let mut decoder = ChunkDecoder::for_index(index, history);
    let mut frame = Vec::new();
    let mut image_hash = Sha256::new();
    let mut total = 0u64;
    for (i, entry) in index.chunks.iter().enumerate() {
        frame.resize(entry.stored_len as usize, 0);
        io::Read::read_exact(reader, &mut frame).map_err(
            |e| match ddi_bundle::BundleError::from_io(&e) {
                Some(inner) => anyhow::anyhow!("{inner}"),
                None => anyhow::anyhow!("reading chunk {i}: {e}"),
            },
        )?;
        let raw = decoder.decode(i, entry, &frame)?;
        image_hash.update(raw);
        total += raw.len() as u64;
    }
    // The end of the member: the reader's size and sha256 check.
    let rest =
        io::copy(reader, &mut io::sink()).map_err(|e| {
            match ddi_bundle::BundleError::from_io(&e) {
                Some(inner) => anyhow::anyhow!("{inner}"),
                None => anyhow::anyhow!("reading the image: {e}"),
            }
        })?;
    if rest != 0 {
        bail!("{rest} bytes follow the last chunk");
    }
    let chunked = reader
        .manifest()
        .chunked
        .as_ref()
        .expect("an index comes with chunked info");
    let actual = hex::encode(image_hash.finalize());
    if actual != chunked.image_sha256 {
        bail!(
            "the decompressed image has sha256 {actual}, the manifest says {}",
            chunked.image_sha256
        );
    }
    Ok(total)
}

fn print_chunk_statistics(index: &ddi_bundle::ChunkIndex) {
    let n = index.chunks.len().max(1) as u64;
    let raw = index.raw_size();
    let stored = index.stored_size();
    let min = index.chunks.iter().map(|c| c.raw_len).min().unwrap_or(0);
    let max = index.chunks.iter().map(|c| c.raw_len).max().unwrap_or(0);
    let unique: HashSet<[u8; 32]> = index.chunks.iter().map(|c| c.sha256).collect();
    println!(
        "chunks: {} ({} distinct), raw {} bytes, stored {} bytes ({:.1} %), \
         chunk size min {min} / mean {} / max {max} bytes",
        index.chunks.len(),
        unique.len(),
        raw,
        stored,
        100.0 * stored as f64 / raw.max(1) as f64,
        raw / n,
    );
}

fn read_bundle(path: &Path) -> Result<UnverifiedBundle> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    ddi_bundle::read_unverified(io::BufReader::new(file))
        .with_context(|| format!("reading {}", path.display()))
}

fn diff(old: &Path, new: &Path, json: bool) -> Result<()> {
    let new_bundle = read_bundle(new)?;
    let (Some(index), Some(chunked)) = (&new_bundle.index, &new_bundle.manifest.chunked) else {
        bail!("{} is not a chunked (format 2) bundle", new.display());
    };
    let mut old_head = [0u8; 512];
    let got = io::Read::read(
        &mut File::open(old).with_context(|| format!("opening {}", old.display()))?,
        &mut old_head,
    )?;
    // What the device has: the chunks of OLD, cut as NEW is cut (a device cuts its slot with
    // the parameters of the bundle it installs).
    let have: HashSet<[u8; 32]> = if ddi_bundle::looks_like_bundle(&old_head[..got]) {
        let old_bundle = read_bundle(old)?;
        match (&old_bundle.index, &old_bundle.manifest.chunked) {
            (Some(old_index), Some(old_chunked))
                if old_chunked.chunker == chunked.chunker
                    && old_index.hash_len == index.hash_len =>
            {
                old_index.chunks.iter().map(|c| c.sha256).collect()
            }
            _ => bail!(
                "{} is not chunked like {}: pass the raw image the device runs instead",
                old.display(),
                new.display()
            ),
        }
    } else {
        let chunker = Chunker::new(chunked.chunker).map_err(anyhow::Error::msg)?;
        let mut set = HashSet::new();
        let file = File::open(old)?;
        chunker.for_each::<_, io::Error>(io::BufReader::new(file), |_, chunk| {
            set.insert(index.key_of(chunk));
            Ok(())
        })?;
        set
    };
    let plan = DeltaPlan::new(index, |c| have.contains(&c.sha256));
    let chunk_bytes = plan.download_bytes();
    // The device reads the metadata and index (everything before the image) with one request.
    let prefix = new_bundle.data_offset;
    let downloaded = prefix + chunk_bytes;
    let requests = plan.ranges.len() + 1;
    let needed_chunks = plan.needed.iter().filter(|n| **n).count();
    let needed_stored: u64 = index
        .chunks
        .iter()
        .zip(&plan.needed)
        .filter(|(_, n)| **n)
        .map(|(c, _)| u64::from(c.stored_len))
        .sum();
    let full = prefix + index.stored_size() + 1024;
    let reused = plan.reused_bytes(index);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "chunks": index.chunks.len(),
                "chunks_needed": needed_chunks,
                "image_bytes": chunked.image_size,
                "reused_bytes": reused,
                "prefix_bytes": prefix,
                "needed_chunk_bytes": needed_stored,
                "range_bytes": chunk_bytes,
                "downloaded_bytes": downloaded,
                "requests": requests,
                "full_bundle_bytes": full,
            })
        );
    } else {
        println!(
            "{} of {} chunks needed; {reused} of {} image bytes ({:.1} %) reused",
            needed_chunks,
            index.chunks.len(),
            chunked.image_size,
            100.0 * reused as f64 / chunked.image_size.max(1) as f64
        );
        println!(
            "download: {downloaded} bytes ({:.1} % of the {full}-byte bundle) in {requests} HTTP \
             requests: {prefix} bytes of metadata and index, {chunk_bytes} bytes in {} Range \
             requests ({} bytes of them gaps merged to bound the requests)",
            100.0 * downloaded as f64 / full as f64,
            plan.ranges.len(),
            chunk_bytes - needed_stored
        );
    }
    Ok(())
}

fn keygen(prefix: &Path) -> Result<()> {
    let secret = generate_keypair()?;
    let secret_path = prefix.with_extension("key");
    let public_path = prefix.with_extension("pub");
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret_path)
        .with_context(|| format!("creating {} (it must not exist yet)", secret_path.display()))?;
    file.write_all(secret.to_text().as_bytes())?;
    file.sync_all()?;
    std::fs::write(&public_path, secret.public_key().to_text())
        .with_context(|| format!("writing {}", public_path.display()))?;
    println!(
        "key {}: secret {}, public {}",
        secret.public_key().key_id(),
        secret_path.display(),
        public_path.display()
    );
    Ok(())
}
