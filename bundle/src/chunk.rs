//! Content-defined chunking (FastCDC with normalised chunking, Xia et al., USENIX ATC 2016).
//!
//! The cut points are part of the bundle format: a device cuts its active slot with the same
//! parameters as the vendor tool cut the image, years apart and built by different versions of
//! this code, and only chunks cut identically can be reused. So the algorithm lives here, in
//! full, with its gear table derived from a documented generator (SplitMix64 from seed 0),
//! rather than behind a crate whose cut points could change with its version. It is short.
//!
//! A cut depends only on the bytes since the previous cut (the rolling gear hash forgets a byte
//! after 64 steps), so an insertion or deletion changes the chunks around it and the cuts
//! resynchronise after it: later chunks keep their bytes and hashes.

use std::io::{self, Read};

use serde::{Deserialize, Serialize};

/// Name of the chunking algorithm as written in manifests.
pub const ALGORITHM: &str = "fastcdc-ddi-1";

/// The chunk size limits. `min_size <= avg_size <= max_size`, `avg_size` a power of two.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkerParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl ChunkerParams {
    /// The vendor tool's default (see BENCHMARKS.md, "chunk size"): min = avg / 4,
    /// max = avg * 4.
    pub const fn with_average(avg_size: u32) -> Self {
        ChunkerParams {
            min_size: avg_size / 4,
            avg_size,
            max_size: avg_size * 4,
        }
    }

    /// Bounds that keep a device's memory small and its index sane.
    pub fn validate(&self) -> Result<(), String> {
        let ChunkerParams {
            min_size,
            avg_size,
            max_size,
        } = *self;
        if !avg_size.is_power_of_two() || !(256..=(1 << 22)).contains(&avg_size) {
            return Err(format!(
                "average chunk size {avg_size} must be a power of two from 256 to 4 MiB"
            ));
        }
        if min_size < 64 || min_size > avg_size || max_size < avg_size || max_size > (1 << 24) {
            return Err(format!(
                "chunk sizes min {min_size} / avg {avg_size} / max {max_size} must satisfy \
                 64 <= min <= avg <= max <= 16 MiB"
            ));
        }
        Ok(())
    }
}

/// SplitMix64 (Steele, Lea, Flood 2014): the gear table is its first 256 outputs from state 0.
const fn gear_table() -> [u64; 256] {
    let mut table = [0u64; 256];
    let mut state: u64 = 0;
    let mut i = 0;
    while i < 256 {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        table[i] = z ^ (z >> 31);
        i += 1;
    }
    table
}

static GEAR: [u64; 256] = gear_table();

/// Finds cut points. Masks take the top bits of the hash: the gear hash shifts left, so its top
/// bit depends on the last 64 bytes while its low bits depend on only the last few.
#[derive(Debug, Clone, Copy)]
pub struct Chunker {
    params: ChunkerParams,
    /// Harder condition before the average size (log2(avg) + 1 bits) ...
    mask_small: u64,
    /// ... easier after it (log2(avg) - 1 bits): chunk sizes cluster around the average.
    mask_large: u64,
}

impl Chunker {
    pub fn new(params: ChunkerParams) -> Result<Self, String> {
        params.validate()?;
        let bits = params.avg_size.ilog2();
        Ok(Chunker {
            params,
            mask_small: !0u64 << (64 - (bits + 1)),
            mask_large: !0u64 << (64 - (bits - 1)),
        })
    }

    pub fn params(&self) -> ChunkerParams {
        self.params
    }

    /// Length of the chunk that starts at `data[0]`. `data` must hold `max_size` bytes or end
    /// at the end of the stream (then its whole length may be the last chunk).
    pub fn cut(&self, data: &[u8]) -> usize {
        let min = self.params.min_size as usize;
        if data.len() <= min {
            return data.len();
        }
        let max = data.len().min(self.params.max_size as usize);
        let normal = max.min(self.params.avg_size as usize);
        let mut hash = 0u64;
        if let Some(n) = roll(&data[min..normal], &mut hash, self.mask_small) {
            return min + n;
        }
        if let Some(n) = roll(&data[normal..max], &mut hash, self.mask_large) {
            return normal + n;
        }
        max
    }

    /// Cut everything `reader` yields, calling `each` with the offset and bytes of every
    /// chunk in order. Reads in large blocks; holds at most a few `max_size` of data.
    pub fn for_each<R: Read, E: From<io::Error>>(
        &self,
        mut reader: R,
        mut each: impl FnMut(u64, &[u8]) -> Result<(), E>,
    ) -> Result<u64, E> {
        let max = self.params.max_size as usize;
        let mut buf = vec![0u8; (4 * max).max(1 << 20)];
        let (mut start, mut end) = (0usize, 0usize);
        let mut offset = 0u64;
        let mut eof = false;
        loop {
            if !eof && end - start < max {
                buf.copy_within(start..end, 0);
                end -= start;
                start = 0;
                while end < buf.len() {
                    match reader.read(&mut buf[end..]) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => end += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            if start == end {
                return Ok(offset);
            }
            let len = self.cut(&buf[start..end]);
            each(offset, &buf[start..start + len])?;
            offset += len as u64;
            start += len;
        }
    }
}

/// Roll the gear hash over `data` from `hash`: the number of bytes up to and including the
/// first after which the hash has none of `mask`'s bits set, or `None` (then `hash` is the hash
/// after all of `data`). Four bytes a step, the same hashes as one at a time (wrapping
/// arithmetic distributes): `h(k+1) = 2 h(k) + g`, so after four bytes
/// `h + 4 = 16 h + (8 g0 + 4 g1 + 2 g2 + g3)`; the four bytes' part does not depend on `h`,
/// so the chain from one step to the next is one shift and one add instead of four of each,
/// and every byte's hash is still tested. The seed scan of a delta install cuts the whole
/// active slot with this (~15 % faster than a byte at a time).
#[inline(always)]
fn roll(data: &[u8], hash: &mut u64, mask: u64) -> Option<usize> {
    let step = |h: u64, b: u8| (h << 1).wrapping_add(GEAR[b as usize]);
    let mut h = *hash;
    let mut quads = data.chunks_exact(4);
    let mut done = 0usize;
    for q in &mut quads {
        let g0 = GEAR[q[0] as usize];
        let p1 = step(g0, q[1]);
        let p2 = step(p1, q[2]);
        let p3 = step(p2, q[3]);
        let h0 = (h << 1).wrapping_add(g0);
        let h1 = (h << 2).wrapping_add(p1);
        let h2 = (h << 3).wrapping_add(p2);
        let h3 = (h << 4).wrapping_add(p3);
        if (h0 & mask == 0) | (h1 & mask == 0) | (h2 & mask == 0) | (h3 & mask == 0) {
            let first = [h0, h1, h2, h3].iter().position(|h| h & mask == 0);
            let k = first.expect("one of the four is a cut");
            return Some(done + k + 1);
        }
        h = h3;
        done += 4;
    }
    for &b in quads.remainder() {
        h = step(h, b);
        done += 1;
        if h & mask == 0 {
            return Some(done);
        }
    }
    *hash = h;
    None
}

/// All chunk lengths of `data` (tests and tools).
pub fn chunk_lengths(chunker: &Chunker, data: &[u8]) -> Vec<usize> {
    let mut out = Vec::new();
    chunker
        .for_each::<_, io::Error>(data, |_, c| {
            out.push(c.len());
            Ok(())
        })
        .expect("reading a slice cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Deterministic, non-repeating test data (a repeated pattern has no cut points).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed;
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 24) as u8
            })
            .collect()
    }

    fn small() -> Chunker {
        Chunker::new(ChunkerParams::with_average(1024)).unwrap()
    }

    #[test]
    fn the_gear_table_is_splitmix64_from_zero() {
        // First output of SplitMix64 seeded with 0 (reference value of the generator).
        assert_eq!(GEAR[0], 0xe220_a839_7b1d_cdaf);
        assert_ne!(GEAR[1], GEAR[0]);
    }

    #[test]
    fn chunks_cover_the_input_and_respect_the_limits() {
        let chunker = small();
        let data = noise(300_000, 7);
        let lengths = chunk_lengths(&chunker, &data);
        assert_eq!(lengths.iter().sum::<usize>(), data.len());
        let (last, rest) = lengths.split_last().unwrap();
        assert!(rest.iter().all(|&l| (256..=4096).contains(&l)), "{rest:?}");
        assert!(*last <= 4096);
        let avg = data.len() / lengths.len();
        assert!((700..=1600).contains(&avg), "average chunk {avg}");
    }

    #[test]
    fn a_zero_filled_region_is_cut_at_the_maximum() {
        let lengths = chunk_lengths(&small(), &vec![0u8; 10_000]);
        assert_eq!(lengths, vec![4096, 4096, 1808]);
    }

    #[test]
    fn streaming_cuts_equal_whole_buffer_cuts() {
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let n = buf.len().min(self.0.len()).min(777);
                buf[..n].copy_from_slice(&self.0[..n]);
                self.0 = &self.0[n..];
                Ok(n)
            }
        }
        let chunker = small();
        let data = noise(3_000_000, 3);
        let mut streamed = Vec::new();
        chunker
            .for_each::<_, io::Error>(Trickle(&data), |_, c| {
                streamed.push(c.len());
                Ok(())
            })
            .unwrap();
        let mut whole = Vec::new();
        let mut rest = &data[..];
        while !rest.is_empty() {
            let n = chunker.cut(rest);
            whole.push(n);
            rest = &rest[n..];
        }
        assert_eq!(streamed, whole);
    }

    /// The cut as first written, a byte a step: the format's definition.
    fn reference_cut(chunker: &Chunker, data: &[u8]) -> usize {
        let p = chunker.params;
        let min = p.min_size as usize;
        if data.len() <= min {
            return data.len();
        }
        let max = data.len().min(p.max_size as usize);
        let normal = max.min(p.avg_size as usize);
        let mut hash = 0u64;
        let mut i = min;
        while i < normal {
            hash = (hash << 1).wrapping_add(GEAR[data[i] as usize]);
            if hash & chunker.mask_small == 0 {
                return i + 1;
            }
            i += 1;
        }
        while i < max {
            hash = (hash << 1).wrapping_add(GEAR[data[i] as usize]);
            if hash & chunker.mask_large == 0 {
                return i + 1;
            }
            i += 1;
        }
        max
    }

    #[test]
    fn cuts_are_those_of_the_byte_at_a_time_definition() {
        // Noise, text-like bytes (few symbols) and runs: every kind of cut (min-adjacent,
        // before and after the average, at the maximum), and sizes that are no multiple of 4.
        let mut text = noise(400_000, 11);
        text.iter_mut()
            .for_each(|b| *b = b"ab \n"[(*b % 4) as usize]);
        let mut runs = noise(200_000, 5);
        runs[50_000..90_000].fill(0);
        for params in [
            ChunkerParams::with_average(1024),
            ChunkerParams::with_average(16 << 10),
            ChunkerParams {
                min_size: 65,
                avg_size: 256,
                max_size: 259,
            },
        ] {
            let chunker = Chunker::new(params).unwrap();
            for data in [noise(500_003, 9), text.clone(), runs.clone()] {
                let mut rest = &data[..];
                let mut cuts = 0;
                while !rest.is_empty() {
                    let n = chunker.cut(rest);
                    assert_eq!(n, reference_cut(&chunker, rest), "{params:?}");
                    // And a short tail (the end of a stream) at every cut.
                    let tail = &rest[..rest.len().min(n + 3)];
                    assert_eq!(chunker.cut(tail), reference_cut(&chunker, tail));
                    rest = &rest[n..];
                    cuts += 1;
                }
                assert!(cuts >= data.len() / params.max_size as usize);
            }
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(Chunker::new(ChunkerParams::with_average(1000)).is_err());
        assert!(Chunker::new(ChunkerParams {
            min_size: 4096,
            avg_size: 1024,
            max_size: 8192
        })
        .is_err());
    }

    fn chunk_set(chunker: &Chunker, data: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        chunker
            .for_each::<_, io::Error>(data, |_, c| {
                out.push(c.to_vec());
                Ok(())
            })
            .unwrap();
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Inserting or deleting bytes changes only chunks near the edit: the chunks of the
        /// tail after it are the same bytes as before.
        #[test]
        fn an_edit_does_not_change_later_chunks(
            seed in any::<u64>(),
            at in 0usize..60_000,
            insert in proptest::collection::vec(any::<u8>(), 0..3000),
            delete in 0usize..3000,
        ) {
            let chunker = small();
            let old = noise(120_000, seed | 1);
            let mut new = old[..at].to_vec();
            new.extend_from_slice(&insert);
            new.extend_from_slice(&old[(at + delete).min(old.len())..]);
            let before = chunk_set(&chunker, &old);
            let after = chunk_set(&chunker, &new);
            // Everything from 3 max-size chunks past the edit on is shared.
            let tail_start = at + insert.len() + 3 * 4096;
            let mut pos = 0usize;
            let mut checked = 0usize;
            let old_set: std::collections::HashSet<&Vec<u8>> = before.iter().collect();
            for (i, c) in after.iter().enumerate() {
                if pos >= tail_start && i + 1 < after.len() {
                    prop_assert!(old_set.contains(c), "chunk at {pos} of {} is new", new.len());
                    checked += 1;
                }
                pos += c.len();
            }
            if new.len() > tail_start + 20_000 {
                prop_assert!(checked > 0);
            }
        }
    }
}
