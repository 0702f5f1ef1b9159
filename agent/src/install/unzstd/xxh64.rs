//! XXH64 with seed 0, the content checksum of a zstd frame (its low 32 bits): computed here
//! for a resumed frame, whose checksum the C decoder cannot check because it did not see the
//! frame's first part.

const P1: u64 = 11_400_714_785_074_694_791;
const P2: u64 = 14_029_467_366_897_019_727;
const P3: u64 = 1_609_587_929_392_839_161;
const P4: u64 = 9_650_029_242_287_828_579;
const P5: u64 = 2_870_177_450_012_600_261;

fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

fn merge(acc: u64, value: u64) -> u64 {
    (acc ^ round(0, value)).wrapping_mul(P1).wrapping_add(P4)
}

fn le64(b: &[u8]) -> u64 {
    u64::from_le_bytes(b[..8].try_into().expect("8 bytes"))
}

#[derive(Debug, Clone)]
pub struct Xxh64 {
    acc: [u64; 4],
    total: u64,
    buffer: [u8; 32],
    buffered: usize,
}

impl Default for Xxh64 {
    fn default() -> Self {
        Xxh64 {
            acc: [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)],
            total: 0,
            buffer: [0; 32],
            buffered: 0,
        }
    }
}

impl Xxh64 {
    fn stripe(acc: &mut [u64; 4], stripe: &[u8]) {
        for (i, a) in acc.iter_mut().enumerate() {
            *a = round(*a, le64(&stripe[8 * i..]));
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        if self.buffered > 0 {
            let take = (32 - self.buffered).min(data.len());
            self.buffer[self.buffered..self.buffered + take].copy_from_slice(&data[..take]);
            self.buffered += take;
            data = &data[take..];
            if self.buffered < 32 {
                return;
            }
            let buffer = self.buffer;
            Self::stripe(&mut self.acc, &buffer);
            self.buffered = 0;
        }
        let mut stripes = data.chunks_exact(32);
        for stripe in &mut stripes {
            Self::stripe(&mut self.acc, stripe);
        }
        let rest = stripes.remainder();
        self.buffer[..rest.len()].copy_from_slice(rest);
        self.buffered = rest.len();
    }

    pub fn digest(&self) -> u64 {
        let [a1, a2, a3, a4] = self.acc;
        let mut h = if self.total >= 32 {
            let mut h = a1
                .rotate_left(1)
                .wrapping_add(a2.rotate_left(7))
                .wrapping_add(a3.rotate_left(12))
                .wrapping_add(a4.rotate_left(18));
            for a in self.acc {
                h = merge(h, a);
            }
            h
        } else {
            P5
        };
        h = h.wrapping_add(self.total);
        let mut rest = &self.buffer[..self.buffered];
        while rest.len() >= 8 {
            h ^= round(0, le64(rest));
            h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            let word = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes"));
            h ^= u64::from(word).wrapping_mul(P1);
            h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            h ^= u64::from(b).wrapping_mul(P5);
            h = h.rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The low 32 bits are what a zstd frame with a checksum ends with.
    #[test]
    fn matches_the_checksums_zstd_writes_for_every_length_and_split() {
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + i / 13) as u8).collect();
        for len in [0, 1, 3, 4, 7, 8, 31, 32, 33, 63, 64, 100, 300] {
            let frame = zstd::bulk::Compressor::new(1)
                .and_then(|mut c| {
                    c.include_checksum(true)?;
                    c.compress(&data[..len])
                })
                .expect("compress");
            let expected = u32::from_le_bytes(frame[frame.len() - 4..].try_into().unwrap());
            for split in [0, 1, 5, 31, 32, 33, len / 2] {
                let split = split.min(len);
                let mut h = Xxh64::default();
                h.update(&data[..split]);
                h.update(&data[split..len]);
                assert_eq!(h.digest() as u32, expected, "len {len} split {split}");
            }
        }
        // The reference value of the empty input.
        assert_eq!(Xxh64::default().digest(), 0xEF46_DB37_51D8_E999);
    }
}
