//! Seeding for delta installs of format-2 bundles: which chunks of the new image the active
//! slot already holds.
//!
//! The active slot is opened read-only (it is never written) and cut with the chunker
//! parameters of the new bundle; a chunk of the slot whose sha256 is one the signed index lists
//! is a candidate. Candidates are checked again when they are used ([`SeedSlot::take`]): the
//! slot may have changed since the scan, or the hash collided; a chunk that does not match is
//! downloaded instead, never fails the update.
//!
//! Not yet wired into the download (see BENCHMARKS.md, "Delta updates", for what is left): the
//! Range requests for the missing chunks are planned by [`ddi_bundle::DeltaPlan`].

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::Path;

use ddi_bundle::{ChunkEntry, ChunkIndex, Chunker, ChunkerParams, DeltaPlan};
use sha2::{Digest, Sha256};

/// Where the active slot holds a chunk the new image needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeedChunk {
    pub offset: u64,
    pub len: u32,
}

/// The active slot, read-only, with the chunks of the new image found in it.
#[derive(Debug)]
pub struct SeedSlot {
    file: File,
    found: HashMap<[u8; 32], SeedChunk>,
}

impl SeedSlot {
    /// Cut the first `limit` bytes of the slot at `path` with `params` and keep the chunks
    /// `index` lists. Reads the slot once, sequentially; memory is the chunker's buffer and
    /// one entry per wanted chunk.
    pub fn scan(
        path: &Path,
        params: ChunkerParams,
        index: &ChunkIndex,
        limit: u64,
    ) -> io::Result<SeedSlot> {
        let chunker = Chunker::new(params).map_err(io::Error::other)?;
        let wanted: std::collections::HashSet<[u8; 32]> =
            index.chunks.iter().map(|c| c.sha256).collect();
        let file = File::open(path)?;
        let mut found = HashMap::new();
        let reader = io::BufReader::with_capacity(1 << 20, (&file).take(limit));
        chunker.for_each::<_, io::Error>(reader, |offset, chunk| {
            let hash: [u8; 32] = Sha256::digest(chunk).into();
            if wanted.contains(&hash) {
                found.entry(hash).or_insert(SeedChunk {
                    offset,
                    len: chunk.len() as u32,
                });
            }
            Ok(())
        })?;
        Ok(SeedSlot { file, found })
    }

    /// Chunks of the new image that the slot holds (by the scan).
    pub fn has(&self, entry: &ChunkEntry) -> bool {
        self.found
            .get(&entry.sha256)
            .is_some_and(|s| s.len == entry.raw_len)
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
        let at = self.found.get(&entry.sha256)?;
        buf.resize(entry.raw_len as usize, 0);
        if let Err(e) = self.file.read_exact_at(buf, at.offset) {
            tracing::warn!(chunk = index_no, offset = at.offset, error = %e, "seed slot unreadable; downloading the chunk");
            return None;
        }
        match ddi_bundle::chunked::check_chunk(index_no, entry, buf) {
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
    fn an_unreadable_seed_is_an_error_the_caller_can_fall_back_from() {
        let params = ChunkerParams::with_average(4096);
        let index = index_of(&text(10_000, 4), params);
        let dir = tempfile::tempdir().unwrap();
        let err =
            SeedSlot::scan(&dir.path().join("missing"), params, &index, u64::MAX).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::NotFound);
    }
}
