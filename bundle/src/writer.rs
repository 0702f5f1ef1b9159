//! Creating bundles (the vendor side, also used by the Yocto layer and the tests).

use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::chunk::{Chunker, ChunkerParams};
use crate::chunked::{ChunkEntry, ChunkIndex};
use crate::manifest::{
    ChunkedInfo, Compression, ImageInfo, Manifest, Signatures, FORMAT_CHUNKED,
    FORMAT_CHUNKED_CONTEXT, MAX_HISTORY,
};
use crate::tar;
use crate::{BundleError, SecretKey, FORMAT_VERSION, MANIFEST_NAME, SIGNATURE_NAME};

pub struct CreateOptions<'a> {
    pub compatible: String,
    pub version: String,
    /// Member name for the image; defaults to the image file's name.
    pub image_name: Option<String>,
    /// Detected from the gzip, zstd or xz magic bytes when `None`.
    pub compression: Option<Compression>,
    /// Every key signs the manifest (one normally; two while rotating keys).
    pub keys: &'a [SecretKey],
}

/// Writes a bundle of the image at `image` to `out` and returns its manifest. The image is read
/// twice (hash, then copy) so that the manifest can come first without buffering the image.
pub fn create_bundle<W: Write>(
    image: &Path,
    options: &CreateOptions<'_>,
    out: W,
) -> Result<Manifest, BundleError> {
    require_keys(options)?;
    let (size, sha256, magic) = hash_file(image)?;
    let name = image_name(image, options, "");
    let manifest = Manifest {
        format: FORMAT_VERSION,
        compatible: options.compatible.clone(),
        version: options.version.clone(),
        image: ImageInfo {
            name,
            size,
            sha256,
            compression: options
                .compression
                .unwrap_or(magic.unwrap_or(Compression::None)),
        },
        chunked: None,
    };
    let mut out = io::BufWriter::new(out);
    write_signed_metadata(&mut out, &manifest, options.keys)?;
    let mut image_file = BufReader::with_capacity(1 << 20, File::open(image)?);
    write_member(
        &mut out,
        &manifest.image.name,
        &mut image_file,
        Some(manifest.image.size),
    )?;
    out.write_all(&[0u8; 2 * tar::BLOCK])?;
    out.flush()?;
    Ok(manifest)
}

/// How a chunked (format 2 or 3) bundle is cut and compressed.
#[derive(Debug, Clone, Copy)]
pub struct ChunkedOptions {
    pub chunker: ChunkerParams,
    /// zstd level of every chunk (1..=22).
    pub zstd_level: i32,
    /// [`FORMAT_CHUNKED_CONTEXT`] (3, the default) or [`FORMAT_CHUNKED`] (2, for agents
    /// that read only formats 1 and 2).
    pub format: u32,
    /// Format 3: bytes of the image before each chunk its frame is compressed with.
    pub history: u32,
}

impl Default for ChunkedOptions {
    fn default() -> Self {
        ChunkedOptions {
            chunker: ChunkerParams::with_average(DEFAULT_AVERAGE_CHUNK),
            zstd_level: 19,
            format: FORMAT_CHUNKED_CONTEXT,
            history: DEFAULT_HISTORY,
        }
    }
}

/// Default average chunk size (BENCHMARKS.md, "Delta updates", has the measurements).
pub const DEFAULT_AVERAGE_CHUNK: u32 = 16 << 10;

/// Default context of every format-3 frame: the 128 KiB of the image before its chunk.
pub const DEFAULT_HISTORY: u32 = 128 << 10;

/// Name of the chunk index member of bundles this tool writes.
pub const INDEX_NAME: &str = "chunks.idx";

/// Writes a chunked (format 2 or 3) bundle of the raw image at `image` to `out`. The compressed
/// chunks go to an unlinked temporary file first, because the manifest that comes first names
/// their sizes and hashes.
pub fn create_chunked_bundle<W: Write>(
    image: &Path,
    options: &CreateOptions<'_>,
    chunked: &ChunkedOptions,
    out: W,
) -> Result<Manifest, BundleError> {
    require_keys(options)?;
    let chunker = Chunker::new(chunked.chunker).map_err(BundleError::Manifest)?;
    let mut source = File::open(image)?;
    let mut head = [0u8; 6];
    let got = tar::read_full(&mut source, &mut head)?;
    if let Some(found) = compression_of(&head[..got]) {
        return Err(BundleError::Manifest(format!(
            "{} is {found:?}-compressed: a chunked bundle is made from the raw image",
            image.display()
        )));
    }
    source.seek(SeekFrom::Start(0))?;

    let mut frames = unlinked_temp_file()?;
    let mut frames_out = io::BufWriter::with_capacity(1 << 20, &mut frames);
    let history = match chunked.format {
        FORMAT_CHUNKED => 0,
        // Checked before any chunk is compressed: a device refuses any other history.
        FORMAT_CHUNKED_CONTEXT if !(1..=MAX_HISTORY).contains(&chunked.history) => {
            return Err(BundleError::Manifest(format!(
                "a format-{FORMAT_CHUNKED_CONTEXT} history of {} bytes: it must be 1 to \
                 {MAX_HISTORY} bytes",
                chunked.history
            )))
        }
        FORMAT_CHUNKED_CONTEXT => chunked.history as usize,
        other => {
            return Err(BundleError::Manifest(format!(
            "chunked bundles are format {FORMAT_CHUNKED} or {FORMAT_CHUNKED_CONTEXT}, not {other}"
        )))
        }
    };
    // The image bytes before the next chunk: up to twice `history`, trimmed to `history`.
    let mut recent: Vec<u8> = Vec::new();
    let mut compress = |chunk: &[u8]| -> Result<Vec<u8>, BundleError> {
        let mut cctx = zstd::zstd_safe::CCtx::create();
        let zstd_error =
            |code| io::Error::other(format!("zstd: {}", zstd::zstd_safe::get_error_name(code)));
        cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(
            chunked.zstd_level,
        ))
        .map_err(zstd_error)?;
        let context = &recent[recent.len().saturating_sub(history)..];
        if !context.is_empty() {
            cctx.ref_prefix(context).map_err(zstd_error)?;
        }
        let mut frame = Vec::with_capacity(chunk.len() + chunk.len() / 128 + 1024);
        cctx.compress2(&mut frame, chunk).map_err(zstd_error)?;
        drop(cctx);
        if history > 0 {
            if recent.len() + chunk.len() > 2 * history {
                let keep = history.saturating_sub(chunk.len()).min(recent.len());
                recent.drain(..recent.len() - keep);
            }
            recent.extend_from_slice(chunk);
        }
        Ok(frame)
    };
    let (mut image_hash, mut stored_hash) = (Sha256::new(), Sha256::new());
    let mut index = ChunkIndex::default();
    let mut stored = 0u64;
    let raw_size = chunker.for_each::<_, BundleError>(
        BufReader::with_capacity(1 << 20, source),
        |_, chunk| {
            // A device refuses a manifest with more chunks: stop before compressing them all.
            crate::chunked::check_chunk_count(index.chunks.len() as u64 + 1)?;
            image_hash.update(chunk);
            let frame = compress(chunk)?;
            stored_hash.update(&frame);
            frames_out.write_all(&frame)?;
            index.chunks.push(ChunkEntry {
                offset: stored,
                stored_len: frame.len() as u32,
                raw_len: chunk.len() as u32,
                sha256: Sha256::digest(chunk).into(),
            });
            stored += frame.len() as u64;
            Ok(())
        },
    )?;
    frames_out.flush()?;
    drop(frames_out);
    if raw_size == 0 {
        return Err(BundleError::Manifest(format!(
            "{} is empty",
            image.display()
        )));
    }
    let index_bytes = if history == 0 {
        index.to_bytes()
    } else {
        zstd::bulk::compress(&index.to_compact_bytes(), 19)?
    };
    let manifest = Manifest {
        format: chunked.format,
        compatible: options.compatible.clone(),
        version: options.version.clone(),
        image: ImageInfo {
            name: image_name(image, options, ".chunks"),
            size: stored,
            sha256: hex::encode(stored_hash.finalize()),
            compression: Compression::ZstdChunks,
        },
        chunked: Some(ChunkedInfo {
            algorithm: crate::chunk::ALGORITHM.into(),
            chunker: chunked.chunker,
            image_size: raw_size,
            image_sha256: hex::encode(image_hash.finalize()),
            chunks: index.chunks.len() as u64,
            index_name: INDEX_NAME.into(),
            index_size: index_bytes.len() as u64,
            index_sha256: hex::encode(Sha256::digest(&index_bytes)),
            history: (history > 0).then_some(chunked.history),
        }),
    };
    let mut out = io::BufWriter::new(out);
    write_signed_metadata(&mut out, &manifest, options.keys)?;
    write_member(&mut out, INDEX_NAME, &mut index_bytes.as_slice(), None)?;
    frames.seek(SeekFrom::Start(0))?;
    write_member(
        &mut out,
        &manifest.image.name,
        &mut BufReader::with_capacity(1 << 20, frames),
        Some(stored),
    )?;
    out.write_all(&[0u8; 2 * tar::BLOCK])?;
    out.flush()?;
    Ok(manifest)
}

fn require_keys(options: &CreateOptions<'_>) -> Result<(), BundleError> {
    if options.keys.is_empty() {
        return Err(BundleError::Manifest(
            "no signing key given: a bundle must be signed".into(),
        ));
    }
    Ok(())
}

fn image_name(image: &Path, options: &CreateOptions<'_>, suffix: &str) -> String {
    match &options.image_name {
        Some(name) => name.clone(),
        None => image
            .file_name()
            .map(|n| format!("{}{suffix}", n.to_string_lossy()))
            .unwrap_or_else(|| format!("image{suffix}")),
    }
}

/// A temporary file that has no name: nothing is left behind whatever happens.
fn unlinked_temp_file() -> io::Result<File> {
    let dir = std::env::temp_dir();
    for attempt in 0..100u32 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path: PathBuf = dir.join(format!(
            ".ddi-bundle-{}-{nanos}-{attempt}",
            std::process::id()
        ));
        match OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(file) => {
                std::fs::remove_file(&path)?;
                return Ok(file);
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other("cannot create a temporary file"))
}

/// Writes the manifest and signature members (every key signs the manifest's exact bytes).
fn write_signed_metadata<W: Write>(
    out: &mut W,
    manifest: &Manifest,
    keys: &[SecretKey],
) -> Result<(), BundleError> {
    manifest.validate()?;
    let manifest_bytes = manifest.to_bytes();
    let signatures = Signatures {
        signatures: keys
            .iter()
            .map(|key| key.signature_entry(&manifest_bytes))
            .collect(),
    };
    let mut signature_bytes = serde_json::to_vec_pretty(&signatures).expect("serializes");
    signature_bytes.push(b'\n');

    write_member(out, MANIFEST_NAME, &mut manifest_bytes.as_slice(), None)?;
    write_member(out, SIGNATURE_NAME, &mut signature_bytes.as_slice(), None)
}

fn write_member<W: Write, R: Read>(
    out: &mut W,
    name: &str,
    body: &mut R,
    known_size: Option<u64>,
) -> Result<(), BundleError> {
    let size = match known_size {
        Some(size) => size,
        None => {
            // Metadata members are small: buffer them to learn the size.
            let mut bytes = Vec::new();
            body.read_to_end(&mut bytes)?;
            return write_member(out, name, &mut bytes.as_slice(), Some(bytes.len() as u64));
        }
    };
    tar::write_header(out, name, size)?;
    let copied = io::copy(&mut body.take(size), out)?;
    if copied != size {
        return Err(BundleError::ImageSizeMismatch {
            manifest: size,
            actual: copied,
        });
    }
    out.write_all(&vec![0u8; tar::padding(size) as usize])?;
    Ok(())
}

/// The compression a file's first bytes show (gzip, zstd or xz magic), if any.
pub fn compression_of(head: &[u8]) -> Option<Compression> {
    if head.starts_with(&[0x1f, 0x8b]) {
        Some(Compression::Gzip)
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Some(Compression::Zstd)
    } else if head.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0]) {
        Some(Compression::Xz)
    } else {
        None
    }
}

/// Size, sha256 and the compression the first bytes show.
fn hash_file(path: &Path) -> Result<(u64, String, Option<Compression>), BundleError> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    let mut magic = None;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if size == 0 {
            magic = compression_of(&buf[..n]);
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize()), magic))
}
