//! Delta installs of chunked (format 2 and 3) bundles: download only the chunks the device lacks.
//!
//! ```text
//!  probe: Range 0..64 KiB (+ the rest of the index) ─► signature, chunk index (BundleReader)
//!  seed:  active slot, read-only ─► cut with the bundle's chunker ─► chunks the index lists
//!  plan:  chunks neither in the seed nor durably on the slot (resume) ─► ≤ 90 coalesced ranges
//!  async: Range GET per range (the next one sent when this one begins), resumed after
//!         faults ─► channel ─► blocking: for every chunk in
//!         order: frame from the stream, or bytes from the seed (checked again), or one Range
//!         request for a seed chunk that no longer matches ─► sha256 against the signed index
//!         ─► slot writer ─► read back: its sha256 against the signed image hash
//! ```
//!
//! Only for bundles whose signature a trusted key verifies (the chunk index is trusted through
//! it; without the whole artifact the server's hash cannot be checked). Anything else (no
//! trusted key, not a chunked bundle, a server that answers a Range with the whole artifact, a
//! probe that fails) goes the full-download way ([`Probe::Full`]) and is judged there.
//! A seed that cannot be read or a seed chunk whose bytes changed is downloaded instead, never
//! a failure (a server that answers that Range with the whole artifact is read up to the
//! chunks' end, the bytes before them skipped as they arrive). Resume across restarts: at
//! every durable checkpoint of the slot writer a `chunks` record ([`super::resume`]) says how
//! far the image is on the slot; a resumed prefix that is not the signed chunks any more is
//! [`InstallError::ResumedPrefixMismatch`], and the caller starts over from byte 0 once.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Cursor, Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use ddi_bundle::chunked::{plan_ranges, MAX_RANGE_REQUESTS, NEAR_GAP};
use ddi_bundle::{
    key_from_digest, looks_like_bundle, read_prefix_verified, BundleReader, ChunkDecoder,
    ChunkEntry, ChunkIndex, Chunker, ChunkerParams, DeltaPlan, FetchRange, MAX_METADATA_SIZE,
};
use sha2::{Digest, Sha256};

use super::bundle::BundlePolicy;
use super::chunked;
use super::decode::{self, Format};
use super::pipeline::{self, ChunkReceiver, Counters};
use super::resume::{self, ResumeRecord};
use super::slot::{self, SlotDevice, SlotWriter};
use super::source::{self, SourceSpec};
use super::{InstallError, Installed};

/// Bytes of the artifact's head fetched first: enough for any manifest (the cost of the probe
/// for a bundle that is not chunked); the signatures and the chunk index follow in one more
/// request.
const HEAD_PROBE: u64 = 64 << 10;

/// A seed chunk that no longer matches is fetched with the chunks after it that are not
/// planned for download anyway, up to this many stored bytes in one request.
const SIDE_FETCH: u64 = 1 << 20;

/// What the signature vouches for, and where the chunks are in the artifact.
#[derive(Debug)]
pub struct SignedBundle {
    pub index: ChunkIndex,
    pub params: ChunkerParams,
    pub image_size: u64,
    pub image_sha256: String,
    /// Format 3: image bytes before each chunk its frame is compressed with (0: format 2).
    pub history: u32,
    /// Offset of the image member's data in the artifact.
    pub data_offset: u64,
    /// Bytes of the artifact read to learn all this.
    pub probe_bytes: u64,
}

/// How to install a bundle.
#[derive(Debug)]
pub enum Probe {
    Delta(SignedBundle),
    /// Download the whole artifact, for this reason.
    Full(String),
}

/// Read the head of the artifact with Range requests and verify it: a chunked bundle signed by
/// a trusted key whose signed `version` is `announced` (the software module's version the
/// server gave for the artifact) installs as a delta, on a device that sets `compatible`.
///
/// The version binds what the download host serves to what the server deployed: a delta
/// install never sees the whole artifact, so the server's hash of it cannot be checked, and
/// without this any other chunked bundle a trusted key signed (an older release) would
/// install in its place. A bundle of another version goes the full-download way, where the
/// artifact's hash decides.
pub async fn probe(
    client: &reqwest::Client,
    spec: &SourceSpec,
    policy: &BundlePolicy,
    capacity: u64,
    announced: &str,
) -> Probe {
    match probe_inner(client, spec, policy, capacity, announced).await {
        Ok(signed) => Probe::Delta(signed),
        Err(why) => Probe::Full(why),
    }
}

async fn probe_inner(
    client: &reqwest::Client,
    spec: &SourceSpec,
    policy: &BundlePolicy,
    capacity: u64,
    announced: &str,
) -> Result<SignedBundle, String> {
    if policy.trusted_keys.is_empty() {
        return Err("no trusted key".into());
    }
    if announced.is_empty() {
        return Err("the server gives no version for the artifact's software module".into());
    }
    // The version names a release, not the board: another board's bundle of it must not pass.
    if policy.compatible.is_none() {
        return Err("no [bundle] compatible to bind the bundle to this board".into());
    }
    let size = spec.size.ok_or("the server gives no artifact size")?;
    let counters = Counters::new(0, None);
    let fetch = |start: u64, end: u64| {
        let counters = &counters;
        async move {
            match source::fetch_bytes(client, spec, start, end, counters).await {
                Ok(got) if got.range_ignored => Err("the server ignores Range requests".into()),
                Ok(got) => Ok(got.bytes),
                Err(e) => Err(format!("reading the artifact's head: {e}")),
            }
        }
    };
    let verifier = policy.verifier(capacity).map_err(|e| e.to_string())?;
    let mut head = fetch(0, size.min(HEAD_PROBE)).await?;
    if !looks_like_bundle(&head) {
        return Err("not a bundle".into());
    }
    // The manifest and its signature first (two metadata members, ~130 KiB at most): nothing
    // the manifest says, such as the index size, decides what is fetched before the signature
    // checks out.
    let metadata_end = (2 * (512 + MAX_METADATA_SIZE)).min(size);
    let (manifest, bound) = match read_prefix_verified(head.as_slice(), &verifier.trusted_keys) {
        Ok(read) => read,
        Err(_) if (head.len() as u64) < metadata_end => {
            let rest = fetch(head.len() as u64, metadata_end).await?;
            head.extend_from_slice(&rest);
            read_prefix_verified(head.as_slice(), &verifier.trusted_keys)
                .map_err(|e| e.to_string())?
        }
        Err(e) => return Err(e.to_string()),
    };
    if manifest.chunked.is_none() {
        return Err(format!("a format-{} bundle (not chunked)", manifest.format));
    }
    if manifest.version != announced {
        return Err(format!(
            "the signed bundle is version {:?}, the server deployed version {announced:?} \
             (only a full download checks the artifact's hash)",
            manifest.version
        ));
    }
    // Everything before the image's data, as the signed manifest gives it.
    let bound = bound.min(size);
    if bound > head.len() as u64 {
        let rest = fetch(head.len() as u64, bound).await?;
        head.reserve_exact(rest.len());
        head.extend_from_slice(&rest);
    }
    let probe_bytes = head.len() as u64;
    let mut reader = BundleReader::open(Cursor::new(head), &verifier).map_err(|e| e.to_string())?;
    let info = reader
        .manifest()
        .chunked
        .clone()
        .ok_or("the signed manifest is not chunked")?;
    let data_offset = reader.data_offset();
    // Moved out of the reader, not copied: one index lives on (the head's bytes go).
    let index = reader.take_chunk_index().ok_or("no chunk index")?;
    Ok(SignedBundle {
        index,
        params: info.chunker,
        image_size: info.image_size,
        image_sha256: info.image_sha256,
        history: info.history.unwrap_or(0),
        data_offset,
        probe_bytes,
    })
}

/// How much a delta install downloads and reuses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeltaSummary {
    /// Artifact bytes the plan downloads (head probe and ranges).
    pub download: u64,
    pub requests: usize,
    /// Image bytes taken from the seed.
    pub reused: u64,
    /// Image bytes already on the slot (resumed).
    pub resumed: u64,
    pub image_size: u64,
}

impl DeltaSummary {
    /// "delta: downloading 14.2 of 212.0 MiB in 12 requests, 93 % reused from slot A"
    /// (`seed` names the slot).
    pub fn describe(&self, seed: &str) -> String {
        let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
        let reused = self.reused * 100 / self.image_size.max(1);
        let mut text = format!(
            "delta: downloading {:.1} of {:.1} MiB in {} requests, {reused} % reused from {seed}",
            mib(self.download),
            mib(self.image_size),
            self.requests,
        );
        if self.resumed > 0 {
            text.push_str(&format!(
                ", {:.1} MiB already on the slot",
                mib(self.resumed)
            ));
        }
        text
    }
}

/// Everything the blocking stage of a delta install needs.
pub struct DeltaJob {
    pub signed: Arc<SignedBundle>,
    /// The planned requests (offsets in the image member).
    pub ranges: Vec<FetchRange>,
    /// Image bytes durably on the slot already.
    pub resume_at: u64,
    pub checkpoint_interval: u64,
    /// For resume records.
    pub url: String,
    pub resume_path: PathBuf,
    pub expected_hash: String,
    pub artifact_size: Option<u64>,
    /// For the Range requests that replace seed chunks that no longer match.
    pub side: SideFetch,
}

/// Fetches a few chunks from the blocking stage (a seed chunk that no longer matches).
pub struct SideFetch {
    pub runtime: tokio::runtime::Handle,
    pub client: reqwest::Client,
    pub spec: SourceSpec,
}

impl SideFetch {
    fn fetch(&self, start: u64, end: u64, counters: &Counters) -> Result<Vec<u8>, InstallError> {
        let got = self.runtime.block_on(source::fetch_bytes(
            &self.client,
            &self.spec,
            start,
            end,
            counters,
        ))?;
        if got.range_ignored {
            // The whole body was streamed up to `end` and only these bytes kept: the same.
            tracing::info!(
                start,
                end,
                "the server ignored the Range; took the chunks from the whole artifact"
            );
        }
        Ok(got.bytes)
    }
}

/// Which chunks to download: those neither durably on the slot before `resume_at` nor in the
/// seed; and the coalesced requests.
pub fn plan(index: &ChunkIndex, seed: Option<&SeedSlot>, resume_at: u64) -> DeltaPlan {
    let mut image_end = 0u64;
    let needed: Vec<bool> = index
        .chunks
        .iter()
        .map(|c| {
            image_end += u64::from(c.raw_len);
            image_end > resume_at && !seed.is_some_and(|s| s.has(c))
        })
        .collect();
    let ranges = plan_ranges(index, &needed, NEAR_GAP, MAX_RANGE_REQUESTS);
    DeltaPlan { needed, ranges }
}

/// The summary of `plan` for `signed`.
pub fn summarize(signed: &SignedBundle, plan: &DeltaPlan, resume_at: u64) -> DeltaSummary {
    let mut image_end = 0u64;
    let mut reused = 0u64;
    for (c, needed) in signed.index.chunks.iter().zip(&plan.needed) {
        let start = image_end;
        image_end += u64::from(c.raw_len);
        if !needed && image_end > resume_at {
            reused += image_end - start.max(resume_at);
        }
    }
    DeltaSummary {
        download: signed.probe_bytes + plan.download_bytes(),
        requests: plan.ranges.len(),
        reused,
        resumed: resume_at,
        image_size: signed.image_size,
    }
}

/// The blocking stage: write every chunk in order from the stream of planned ranges or the
/// seed, each checked against the signed index first; then the whole image as for every
/// install.
pub fn write_delta(
    job: &DeltaJob,
    dev: &mut dyn SlotDevice,
    rx: ChunkReceiver,
    counters: &Counters,
    seed: Option<&SeedSlot>,
) -> Result<Installed, InstallError> {
    let began = Instant::now();
    let signed = &*job.signed;
    let mut decoder = ChunkDecoder::for_index(&signed.index, signed.history);
    let mut prefix_hash = Sha256::new();
    let mut tail = slot::PrefixTail::default();
    // The resumed prefix's part of the chunk that straddles `resume_at`: (chunk, sha256 of
    // those bytes), compared with the chunk's signed bytes once they are known.
    let mut straddling: Option<(usize, [u8; 32])> = None;
    if job.resume_at > 0 {
        // The hasher cannot be saved: hash the bytes already on the slot again, and check
        // them against the signed chunks (the slot may have been written since). Format 3:
        // keep the image bytes before the first chunk written again (its frame's context).
        let (first, first_start) = first_unfinished(&signed.index, job.resume_at);
        let keep_from = first_start.saturating_sub(u64::from(signed.history));
        let mut context = Vec::new();
        let mut check = PrefixCheck::new(&signed.index);
        let mut at = 0u64;
        slot::read_range(
            dev,
            job.resume_at,
            |b| {
                prefix_hash.update(b);
                tail.update(b);
                check.update(b);
                let end = at + b.len() as u64;
                if signed.history > 0 && end > keep_from && at < first_start {
                    let from = keep_from.saturating_sub(at) as usize;
                    let to = (first_start.min(end) - at) as usize;
                    context.extend_from_slice(&b[from..to]);
                }
                at = end;
            },
            |_| {},
        )?;
        let (partial, mismatch) = check.finish();
        if let Some((chunk, offset)) = mismatch {
            return Err(prefix_mismatch(dev.path(), job.resume_at, chunk, offset));
        }
        if job.resume_at > first_start {
            straddling = Some((first, partial));
        }
        decoder.set_context(first, &context);
    }
    let mut stream = pipeline::channel_reader(rx, counters);
    let interval = job.checkpoint_interval;
    let mut writer = SlotWriter::resume(dev, job.resume_at, prefix_hash, tail.bytes(), interval);
    chunked::leave_hash_to_read_back(&mut writer);
    writer.expect_size(signed.image_size)?;
    let offset = || counters.consumed.load(Ordering::Relaxed);
    let mut frame = Vec::new();
    let mut seed_buf = Vec::new();
    // Chunks fetched to replace seed chunks that no longer match: (first, last, their frames).
    let mut side: Option<(usize, usize, Vec<u8>)> = None;
    let mut ranges = job.ranges.iter().peekable();
    let mut image_end = 0u64;
    // Record a checkpoint the slot writer made durable: a restart continues from its chunk.
    let record = |writer: &mut SlotWriter<'_>| {
        while let Some(at) = writer.take_checkpoint() {
            let record = ResumeRecord::chunks(
                &job.url,
                writer.slot_path(),
                &job.expected_hash,
                job.artifact_size,
                &signed.image_sha256,
                at,
            );
            // Resuming is an optimisation: without a record the next try starts over.
            if let Err(e) = resume::save(&job.resume_path, &record) {
                tracing::warn!(error = %e, "cannot save the resume record");
            }
        }
    };
    let streamed = (|| -> Result<(), InstallError> {
        for (i, entry) in signed.index.chunks.iter().enumerate() {
            if counters.stopped.load(Ordering::Acquire) {
                return Err(InstallError::Aborted);
            }
            let start = image_end;
            image_end += u64::from(entry.raw_len);
            while ranges.peek().is_some_and(|r| r.last < i) {
                ranges.next();
            }
            let downloaded = ranges.peek().is_some_and(|r| r.first <= i);
            if !downloaded && image_end <= job.resume_at {
                continue;
            }
            let raw: &[u8] = if downloaded {
                frame.resize(entry.stored_len as usize, 0);
                chunked::read_frame(&mut stream, &mut frame)
                    .map_err(|e| decode::read_error(e, Format::ZstdChunks, offset()))?;
                decoder
                    .decode(i, entry, &frame)
                    .map_err(chunked::chunk_refused)?
            } else if let Some(bytes) = seed.and_then(|s| s.take(i, entry, &mut seed_buf)) {
                decoder.remember(i, bytes);
                bytes
            } else {
                if !side.as_ref().is_some_and(|s| s.0 <= i && i <= s.1) {
                    let next_planned = ranges.peek().map_or(usize::MAX, |r| r.first);
                    let chunks = &signed.index.chunks;
                    let mut last = i;
                    while last + 1 < next_planned.min(chunks.len())
                        && chunks[last + 1].end() - entry.offset <= SIDE_FETCH
                    {
                        last += 1;
                    }
                    tracing::info!(first = i, last, "seed chunks unusable; downloading them");
                    let base = signed.data_offset;
                    let bytes =
                        job.side
                            .fetch(base + entry.offset, base + chunks[last].end(), counters)?;
                    side = Some((i, last, bytes));
                }
                // By position, not by a cursor: chunks between `first` and `i` may have come from
                // the seed after all, and their frames are still in the buffer.
                let (first, _, bytes) = side.as_ref().expect("fetched above");
                let at = (entry.offset - signed.index.chunks[*first].offset) as usize;
                let stored = entry.stored_len as usize;
                let frame = bytes.get(at..at + stored).ok_or_else(|| {
                    InstallError::Internal("the side fetch returned too few bytes".into())
                })?;
                decoder
                    .decode(i, entry, frame)
                    .map_err(chunked::chunk_refused)?
            };
            // The part of the chunk before `resume_at` is on the slot already.
            let skip = job.resume_at.saturating_sub(start) as usize;
            if let Some((chunk, on_slot)) = straddling.filter(|(chunk, _)| *chunk == i) {
                if Sha256::digest(&raw[..skip.min(raw.len())]).as_slice() != on_slot {
                    return Err(prefix_mismatch(
                        writer.slot_path(),
                        job.resume_at,
                        chunk,
                        start,
                    ));
                }
            }
            if skip < raw.len() {
                writer.write(&raw[skip..])?;
            }
            record(&mut writer);
        }
        Ok(())
    })();
    // The writer thread may have made a checkpoint durable that was not taken yet: after an
    // error here, or one of `finish` (the last sync, the read-back), a restart resumes from it.
    writer.settle();
    record(&mut writer);
    streamed?;
    let mut rest = [0u8; 1];
    match stream.read(&mut rest) {
        Ok(0) => {}
        Ok(_) => {
            return Err(InstallError::Internal(
                "the download delivered more than the planned chunks".into(),
            ))
        }
        Err(e) => return Err(decode::read_error(e, Format::ZstdChunks, offset())),
    }
    let image_sha256 = Some(signed.image_sha256.clone());
    pipeline::finish(
        writer,
        counters,
        image_sha256,
        Some(&signed.image_sha256),
        began,
    )
}

fn prefix_mismatch(slot: &Path, resume_at: u64, chunk: usize, offset: u64) -> InstallError {
    InstallError::ResumedPrefixMismatch {
        slot: slot.to_path_buf(),
        resume_at,
        chunk,
        offset,
    }
}

/// Checks a resumed prefix of the slot, as it is read, against the signed chunks: every chunk
/// wholly in it must have its signed hash; of the chunk that straddles its end, the sha256 of
/// the bytes read is kept (the caller compares it with the chunk's signed bytes when it has
/// them). Costs one more sha256 pass over the prefix, no buffer.
struct PrefixCheck<'a> {
    index: &'a ChunkIndex,
    /// The chunk being read, where it starts, and its bytes hashed so far.
    chunk: usize,
    start: u64,
    read: u64,
    hash: Sha256,
    /// The first chunk that is not the signed one, and where it starts.
    mismatch: Option<(usize, u64)>,
}

impl<'a> PrefixCheck<'a> {
    fn new(index: &'a ChunkIndex) -> Self {
        PrefixCheck {
            index,
            chunk: 0,
            start: 0,
            read: 0,
            hash: Sha256::new(),
            mismatch: None,
        }
    }

    fn update(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.mismatch.is_none() {
            let Some(entry) = self.index.chunks.get(self.chunk) else {
                return; // past the image: the caller never reads that far
            };
            let n = (u64::from(entry.raw_len) - self.read).min(bytes.len() as u64) as usize;
            self.hash.update(&bytes[..n]);
            self.read += n as u64;
            bytes = &bytes[n..];
            if self.read == u64::from(entry.raw_len) {
                let digest = std::mem::take(&mut self.hash).finalize().into();
                if key_from_digest(digest, self.index.hash_len) != entry.sha256 {
                    self.mismatch = Some((self.chunk, self.start));
                }
                self.start += u64::from(entry.raw_len);
                self.chunk += 1;
                self.read = 0;
            }
        }
    }

    /// The sha256 of the straddling chunk's bytes read, and the first chunk that did not match.
    fn finish(self) -> ([u8; 32], Option<(usize, u64)>) {
        (self.hash.finalize().into(), self.mismatch)
    }
}

/// The first chunk that ends after `resume_at`, and where it starts in the image.
fn first_unfinished(index: &ChunkIndex, resume_at: u64) -> (usize, u64) {
    let mut start = 0u64;
    for (i, c) in index.chunks.iter().enumerate() {
        if start + u64::from(c.raw_len) > resume_at {
            return (i, start);
        }
        start += u64::from(c.raw_len);
    }
    (index.chunks.len(), start)
}

/// The active slot, read-only, with the chunks of the new image found in it.
#[derive(Debug)]
pub struct SeedSlot {
    file: File,
    found: HashMap<[u8; 32], SeedChunk>,
    /// Bytes of each chunk's sha256 the index holds.
    hash_len: usize,
}

/// Slots smaller than this are cut on one thread (a thread is not worth it).
const SPLIT_SCAN_FROM: u64 = 16 << 20;

/// Cuts of the second half kept to find where the two halves' cuts meet (normally within a few
/// chunks of the middle).
const MEET_CUTS: usize = 4096;

/// What the second half's cutter found: the wanted chunks, and where its first cuts are.
#[derive(Debug, Default)]
struct SecondHalf {
    hits: Vec<([u8; 32], SeedChunk)>,
    cuts: Vec<u64>,
}

/// Why the first half's cutter stopped before the end.
enum ScanStop {
    /// Its cuts met the second half's.
    Met,
    Io(io::Error),
}

impl From<io::Error> for ScanStop {
    fn from(e: io::Error) -> Self {
        ScanStop::Io(e)
    }
}

/// Reads `file` from `pos` to `end` at explicit offsets (two cutters share the file).
struct At<'a> {
    file: &'a File,
    pos: u64,
    end: u64,
}

impl<'a> At<'a> {
    fn new(file: &'a File, pos: u64, end: u64) -> Self {
        At { file, pos, end }
    }
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let left = usize::try_from(self.end.saturating_sub(self.pos)).unwrap_or(usize::MAX);
        let n = buf.len().min(left);
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        Ok(got)
    }
}

/// Chunk lengths, as a bitmap (the index's lengths are bounded by the chunker's maximum).
#[derive(Debug, Default)]
struct LengthSet(Vec<u64>);

impl LengthSet {
    fn insert(&mut self, len: u32) {
        let (word, bit) = (len as usize / 64, len % 64);
        if self.0.len() <= word {
            self.0.resize(word + 1, 0);
        }
        self.0[word] |= 1 << bit;
    }

    fn contains(&self, len: usize) -> bool {
        self.0
            .get(len / 64)
            .is_some_and(|w| w & (1 << (len % 64)) != 0)
    }
}

/// Where the active slot holds a chunk the new image needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedChunk {
    pub offset: u64,
    pub len: u32,
}

impl SeedSlot {
    /// Cut the first `limit` bytes of the slot at `path` with `params` and keep the chunks
    /// `index` lists. Reads the slot once; memory is the chunker's buffer (two with two
    /// threads) and one entry per wanted chunk. With two cores or more, the second half of a
    /// large slot is cut on a thread of its own ([`SeedSlot::scan_split`]): the same chunks,
    /// found in about half the time.
    pub fn scan(
        path: &Path,
        params: ChunkerParams,
        index: &ChunkIndex,
        limit: u64,
    ) -> io::Result<SeedSlot> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let min_split = if cores > 1 { SPLIT_SCAN_FROM } else { u64::MAX };
        Self::scan_split(path, params, index, limit, min_split)
    }

    /// [`SeedSlot::scan`], the slot cut in two halves at once when it holds at least
    /// `min_split` bytes, with the result of cutting it from the start: a cut depends only on
    /// the bytes since the previous one, so once the first half's cutter, run on past the
    /// middle, cuts where the second half's did, every later cut is the same. The second
    /// half's chunks before that point (cut from an arbitrary start) are dropped; should the
    /// two never meet, the first half's cutter goes on to the end alone.
    fn scan_split(
        path: &Path,
        params: ChunkerParams,
        index: &ChunkIndex,
        limit: u64,
        min_split: u64,
    ) -> io::Result<SeedSlot> {
        let chunker = Chunker::new(params).map_err(io::Error::other)?;
        // One map for "wanted" and "found": a wanted chunk not (yet) found has length 0.
        let mut found: HashMap<[u8; 32], SeedChunk> = index
            .chunks
            .iter()
            .map(|c| (c.sha256, SeedChunk { offset: 0, len: 0 }))
            .collect();
        // A seed chunk can only stand for an entry of its length: the others are not hashed
        // (most of the scan's sha256 work when the seed shares little with the new image).
        let mut lengths = LengthSet::default();
        for c in &index.chunks {
            lengths.insert(c.raw_len);
        }
        let mut file = File::open(path)?;
        // A block device's metadata has no length: its end does.
        let end = file.seek(io::SeekFrom::End(0))?.min(limit);
        let middle = if end >= min_split { end / 2 } else { end };
        let (first, second) = {
            let wanted = |offset: u64, chunk: &[u8]| {
                let hash = lengths.contains(chunk.len()).then(|| index.key_of(chunk))?;
                let seed = SeedChunk {
                    offset,
                    len: chunk.len() as u32,
                };
                found.contains_key(&hash).then_some((hash, seed))
            };
            let (chunker, file) = (&chunker, &file);
            std::thread::scope(|scope| -> io::Result<_> {
                let mut second = (middle < end).then(|| {
                    scope.spawn(|| -> io::Result<SecondHalf> {
                        let mut half = SecondHalf::default();
                        // The chunker reads in blocks of a MiB or more itself: no buffer.
                        chunker.for_each::<_, io::Error>(
                            At::new(file, middle, end),
                            |offset, chunk| {
                                let offset = middle + offset;
                                if half.cuts.len() < MEET_CUTS {
                                    half.cuts.push(offset);
                                }
                                half.hits.extend(wanted(offset, chunk));
                                Ok(())
                            },
                        )?;
                        Ok(half)
                    })
                });
                let mut joined: Option<SecondHalf> = None;
                let mut met = None;
                let mut hits = Vec::new();
                let read =
                    chunker.for_each::<_, ScanStop>(At::new(file, 0, end), |offset, chunk| {
                        if offset >= middle {
                            if let Some(thread) = second.take() {
                                let half = thread.join().expect("the seed scan thread panicked");
                                joined = Some(half?);
                            }
                            let cuts = joined.as_ref().map_or(&[][..], |h| &h.cuts[..]);
                            if cuts.binary_search(&offset).is_ok() {
                                met = Some(offset);
                                return Err(ScanStop::Met);
                            }
                        }
                        hits.extend(wanted(offset, chunk));
                        Ok(())
                    });
                match read {
                    Ok(_) | Err(ScanStop::Met) => {}
                    Err(ScanStop::Io(e)) => return Err(e),
                }
                let second = match (met, joined) {
                    (Some(met), Some(half)) => {
                        let from = half.hits.partition_point(|(_, s)| s.offset < met);
                        half.hits[from..].to_vec()
                    }
                    _ => Vec::new(),
                };
                Ok((hits, second))
            })?
        };
        // In slot order, the first place a chunk is found is the one kept.
        for (hash, seed) in first.into_iter().chain(second) {
            if let Some(slot) = found.get_mut(&hash).filter(|s| s.len == 0) {
                *slot = seed;
            }
        }
        Ok(SeedSlot {
            file,
            found,
            hash_len: index.hash_len,
        })
    }

    /// Where the scan found `entry`'s bytes.
    fn find(&self, entry: &ChunkEntry) -> Option<&SeedChunk> {
        self.found
            .get(&entry.sha256)
            .filter(|s| s.len == entry.raw_len)
    }

    /// Chunks of the new image that the slot holds (by the scan).
    pub fn has(&self, entry: &ChunkEntry) -> bool {
        self.find(entry).is_some()
    }

    /// The download plan: every chunk the slot does not hold, in coalesced Range requests.
    pub fn plan(&self, index: &ChunkIndex) -> DeltaPlan {
        DeltaPlan::new(index, |c| self.has(c))
    }

    /// The bytes of chunk `index_no` read from the slot into `buf`, checked against the signed
    /// entry; `None` when the slot does not hold it (any more): the caller downloads it.
    pub fn take<'b>(
        &self,
        index_no: usize,
        entry: &ChunkEntry,
        buf: &'b mut Vec<u8>,
    ) -> Option<&'b [u8]> {
        let at = self.find(entry)?;
        buf.resize(entry.raw_len as usize, 0);
        if let Err(e) = self.file.read_exact_at(buf, at.offset) {
            tracing::warn!(chunk = index_no, offset = at.offset, error = %e, "seed slot unreadable; downloading the chunk");
            return None;
        }
        match ddi_bundle::chunked::check_chunk(index_no, entry, buf, self.hash_len) {
            Ok(()) => Some(buf),
            Err(e) => {
                tracing::warn!(error = %e, "seed chunk changed since the scan; downloading it");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                b"abcdefgh ijklmnop\n"[(state % 18) as usize]
            })
            .collect()
    }

    /// The index of `image` as the vendor tool would write it (frames not needed here).
    fn index_of(image: &[u8], params: ChunkerParams) -> ChunkIndex {
        let chunker = Chunker::new(params).unwrap();
        let mut index = ChunkIndex::default();
        chunker
            .for_each::<_, io::Error>(image, |offset, chunk| {
                index.chunks.push(ChunkEntry {
                    offset,
                    stored_len: chunk.len() as u32,
                    raw_len: chunk.len() as u32,
                    sha256: Sha256::digest(chunk).into(),
                });
                Ok(())
            })
            .unwrap();
        index
    }

    #[test]
    fn the_slot_supplies_the_unchanged_chunks_and_only_those() {
        let params = ChunkerParams::with_average(4096);
        let old = text(400_000, 1);
        let mut new = old.clone();
        new.splice(200_000..200_000, text(5_000, 2)); // inserted: shifts the rest
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot-a");
        // The slot is larger than the image: what follows it is not part of any chunk.
        let mut on_slot = old.clone();
        on_slot.resize(600_000, 0xEE);
        std::fs::write(&slot, &on_slot).unwrap();

        let index = index_of(&new, params);
        let seed = SeedSlot::scan(&slot, params, &index, on_slot.len() as u64).unwrap();
        let plan = seed.plan(&index);
        let needed = plan.needed.iter().filter(|n| **n).count();
        assert!(
            (1..=6).contains(&needed),
            "{needed} of {}",
            index.chunks.len()
        );
        assert!(plan.reused_bytes(&index) > new.len() as u64 * 9 / 10);

        // Every reused chunk comes back from the slot with its signed bytes.
        let mut buf = Vec::new();
        let mut rebuilt = Vec::new();
        for (i, c) in index.chunks.iter().enumerate() {
            match seed.take(i, c, &mut buf) {
                Some(bytes) => rebuilt.extend_from_slice(bytes),
                None => {
                    assert!(
                        plan.needed[i],
                        "chunk {i} planned from the seed but not there"
                    );
                    let start = rebuilt.len();
                    rebuilt.extend_from_slice(&new[start..start + c.raw_len as usize]);
                }
            }
        }
        assert_eq!(rebuilt, new);
        // The slot was only read.
        assert_eq!(std::fs::read(&slot).unwrap(), on_slot);
    }

    #[test]
    fn a_slot_changed_after_the_scan_is_not_trusted() {
        let params = ChunkerParams::with_average(4096);
        let image = text(100_000, 3);
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot-a");
        std::fs::write(&slot, &image).unwrap();
        let index = index_of(&image, params);
        let seed = SeedSlot::scan(&slot, params, &index, u64::MAX).unwrap();
        assert!(index.chunks.iter().all(|c| seed.has(c)));
        // Someone writes to the slot after the scan (or the device is not what it believes).
        let mut changed = image.clone();
        let victim = index.chunks[2];
        changed[victim.offset as usize + 7] ^= 1;
        std::fs::write(&slot, &changed).unwrap();
        let mut buf = Vec::new();
        assert!(seed.take(2, &victim, &mut buf).is_none());
        assert!(seed.take(1, &index.chunks[1], &mut buf).is_some());
    }

    #[test]
    fn a_scan_in_two_halves_finds_what_one_from_the_start_finds() {
        let params = ChunkerParams::with_average(1024);
        let dir = tempfile::tempdir().unwrap();
        let slot = dir.path().join("slot-a");
        // Text, a zero run across the middle (max-size cuts, in a phase of their own in each
        // half: the halves meet only after it), and a slot that is one long zero run (they
        // never meet: the first half goes on alone).
        let text_slot = text(300_001, 5);
        let mut zero_middle = text(200_000, 6);
        zero_middle[80_000..130_000].fill(0);
        let mut cases = vec![text_slot, zero_middle, vec![0; 50_000]];
        // Chunks found twice in the slot: the first place is kept either way.
        let mut twice = text(60_000, 7);
        twice.extend_from_within(..60_000);
        cases.push(twice);
        for (n, on_slot) in cases.iter().enumerate() {
            std::fs::write(&slot, on_slot).unwrap();
            // The new image: the slot's bytes with some changed, and a few chunks of its end.
            let mut image = on_slot.clone();
            image[1000..1100].fill(7);
            image.truncate(on_slot.len() * 3 / 4);
            image.extend_from_slice(&on_slot[on_slot.len() - 20_000..]);
            let index = index_of(&image, params);
            for limit in [u64::MAX, on_slot.len() as u64 - 999] {
                let one = SeedSlot::scan_split(&slot, params, &index, limit, u64::MAX).unwrap();
                let two = SeedSlot::scan_split(&slot, params, &index, limit, 0).unwrap();
                assert_eq!(one.found, two.found, "case {n}, limit {limit}");
                assert!(one.found.values().any(|s| s.len > 0), "case {n}");
            }
        }
    }

    #[test]
    fn the_length_set_holds_what_was_inserted_and_nothing_else() {
        let mut set = LengthSet::default();
        for len in [1, 63, 64, 4096, 65_536] {
            set.insert(len);
        }
        for len in [1, 63, 64, 4096, 65_536] {
            assert!(set.contains(len as usize), "{len}");
        }
        for len in [0, 2, 62, 65, 4095, 4097, 65_535, 65_537, 1 << 24] {
            assert!(!set.contains(len), "{len}");
        }
    }

    #[test]
    fn an_unreadable_seed_is_an_error_the_caller_can_fall_back_from() {
        let params = ChunkerParams::with_average(4096);
        let index = index_of(&text(10_000, 4), params);
        let dir = tempfile::tempdir().unwrap();
        let err =
            SeedSlot::scan(&dir.path().join("missing"), params, &index, u64::MAX).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
