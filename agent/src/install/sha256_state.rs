//! A SHA-256 whose running state can be written down and read back: a resumed gzip or zstd
//! install continues the artifact hash where the interrupted one stopped (the compressed bytes
//! before the resume point are not on the slot, so they cannot be hashed again).
//!
//! `sha2::Sha256` cannot be serialised; its compression function can be called directly
//! ([`sha2::compress256`], with the same hardware acceleration), so this keeps the eight state
//! words, the byte count and the partial block itself.

use sha2::digest::consts::U64;
use sha2::digest::generic_array::GenericArray;

const BLOCK: usize = 64;

const H0: [u32; 8] = [
    0x6a09_e667,
    0xbb67_ae85,
    0x3c6e_f372,
    0xa54f_f53a,
    0x510e_527f,
    0x9b05_688c,
    0x1f83_d9ab,
    0x5be0_cd19,
];

/// A running SHA-256 (FIPS 180-4) with a text form ([`Sha256State::to_text`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Sha256State {
    h: [u32; 8],
    /// Bytes hashed so far.
    len: u64,
    /// The partial block: its first `len % 64` bytes.
    partial: [u8; BLOCK],
}

impl std::fmt::Debug for Sha256State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sha256State({})", self.to_text())
    }
}

impl Default for Sha256State {
    fn default() -> Self {
        Self::new()
    }
}

impl Sha256State {
    pub fn new() -> Self {
        Sha256State {
            h: H0,
            len: 0,
            partial: [0; BLOCK],
        }
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn update(&mut self, mut data: &[u8]) {
        let fill = (self.len % BLOCK as u64) as usize;
        self.len += data.len() as u64;
        if fill > 0 {
            let n = (BLOCK - fill).min(data.len());
            self.partial[fill..fill + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            if fill + n < BLOCK {
                return;
            }
            let block = self.partial;
            compress_blocks(&mut self.h, &block);
        }
        let whole = data.len() - data.len() % BLOCK;
        compress_blocks(&mut self.h, &data[..whole]);
        let rest = &data[whole..];
        self.partial[..rest.len()].copy_from_slice(rest);
    }

    /// The digest of what was hashed.
    pub fn finish(&self) -> [u8; 32] {
        let mut h = self.h;
        let fill = (self.len % BLOCK as u64) as usize;
        let mut tail = [0u8; 2 * BLOCK];
        tail[..fill].copy_from_slice(&self.partial[..fill]);
        tail[fill] = 0x80;
        let end = if fill + 1 + 8 <= BLOCK {
            BLOCK
        } else {
            2 * BLOCK
        };
        tail[end - 8..end].copy_from_slice(&(self.len.wrapping_mul(8)).to_be_bytes());
        compress_blocks(&mut h, &tail[..end]);
        let mut out = [0u8; 32];
        for (o, w) in out.chunks_exact_mut(4).zip(h) {
            o.copy_from_slice(&w.to_be_bytes());
        }
        out
    }

    pub fn finish_hex(&self) -> String {
        hex::encode(self.finish())
    }

    /// `<64 hex digits: the state words>:<byte count>:<hex of the partial block>`.
    pub fn to_text(&self) -> String {
        let words: String = self.h.iter().map(|w| format!("{w:08x}")).collect();
        let fill = (self.len % BLOCK as u64) as usize;
        format!(
            "{words}:{}:{}",
            self.len,
            hex::encode(&self.partial[..fill])
        )
    }

    /// The state [`Sha256State::to_text`] wrote; None for anything else.
    pub fn from_text(text: &str) -> Option<Self> {
        let mut parts = text.split(':');
        let (words, len, partial) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || words.len() != 64
            || !words.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return None;
        }
        let mut h = [0u32; 8];
        for (i, w) in h.iter_mut().enumerate() {
            *w = u32::from_str_radix(&words[8 * i..8 * i + 8], 16).ok()?;
        }
        if !len.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let len: u64 = len.parse().ok()?;
        let partial = hex::decode(partial).ok()?;
        if partial.len() as u64 != len % BLOCK as u64 {
            return None;
        }
        let mut state = Sha256State {
            h,
            len,
            partial: [0; BLOCK],
        };
        state.partial[..partial.len()].copy_from_slice(&partial);
        Some(state)
    }
}

type Block = GenericArray<u8, U64>;

const _: () = assert!(std::mem::size_of::<Block>() == BLOCK && std::mem::align_of::<Block>() == 1);

/// Run the compression function over whole 64-byte blocks (one call for all of them: the
/// accelerated implementations loop inside).
fn compress_blocks(h: &mut [u32; 8], data: &[u8]) {
    debug_assert_eq!(data.len() % BLOCK, 0);
    // SAFETY: `Block` is 64 bytes with alignment 1 (checked above; `GenericArray::from_slice`
    // casts the same way), and `data` holds `data.len() / 64` of them.
    let blocks =
        unsafe { std::slice::from_raw_parts(data.as_ptr().cast::<Block>(), data.len() / BLOCK) };
    sha2::compress256(h, blocks);
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    fn data(n: usize) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect()
    }

    #[test]
    fn equals_sha256_for_every_length_and_split() {
        let all = data(700);
        for len in 0..all.len() {
            let d = &all[..len];
            let want = Sha256::digest(d);
            let mut one = Sha256State::new();
            one.update(d);
            assert_eq!(one.finish()[..], want[..], "length {len}");
            assert_eq!(one.len(), len as u64);
            // Split in three at varying points, through the text form in the middle.
            let (a, b) = (len / 3, len * 2 / 3 + (len % 7).min(len - len * 2 / 3));
            let mut split = Sha256State::new();
            split.update(&d[..a]);
            let mut split = Sha256State::from_text(&split.to_text()).unwrap();
            split.update(&d[a..b]);
            split.update(&d[b..]);
            assert_eq!(split.finish()[..], want[..], "length {len} split {a} {b}");
        }
        let big = data(1 << 20);
        let mut s = Sha256State::new();
        for piece in big.chunks(4099) {
            s.update(piece);
        }
        assert_eq!(s.finish_hex(), hex::encode(Sha256::digest(&big)));
    }

    #[test]
    fn text_form_round_trips_and_rejects_garbage() {
        let mut s = Sha256State::new();
        s.update(&data(100));
        let text = s.to_text();
        assert_eq!(Sha256State::from_text(&text), Some(s.clone()));
        // The partial block must match the byte count.
        let (head, _) = text.rsplit_once(':').unwrap();
        assert_eq!(Sha256State::from_text(&format!("{head}:00")), None);
        let words = &text[..64];
        assert_eq!(
            Sha256State::from_text(&format!("{words}:64:")).map(|s| s.len()),
            Some(64)
        );
        for bad in [
            "",
            "x",
            &format!("{words}:-1:"),
            &format!("{words}:+0:"),
            &format!("{}:0:", &words[..63]),
            &format!("{words}:0::"),
        ] {
            assert_eq!(Sha256State::from_text(bad), None, "{bad:?}");
        }
    }
}
