//! A gzip decoder (RFC 1952, multi-member like `flate2::read::MultiGzDecoder`) that reports
//! deflate block boundaries, so a plain gzip image can resume after a restart or power cut
//! (zran-style, see [`super::resume`]).
//!
//! At a block boundary the inflater's whole state is the last 32 KiB of output (on the slot)
//! and the few input bits it has read but not used. So a boundary is remembered as the
//! artifact byte holding its first unused bit, how many bits of that byte are still unused,
//! the output offset, the CRC-32 of the member's output so far and the artifact hash state
//! at that byte. Resuming sets the 32 KiB window as dictionary, primes the unused bits and
//! continues with the next artifact byte.
//!
//! The deflate decoder is zlib-rs (flate2's backend): its stable API has no `data_type` (the
//! block-boundary flag and the bit count) and no `prime`, so this uses its internal API
//! (`zlib_rs::inflate`), pinned to one version in Cargo.toml.
//!
//! The decoder hashes the artifact bytes itself as it consumes them (when given a hash state),
//! a few bytes behind, so that the state at a boundary's byte can be taken without hashing
//! anything twice.

use std::io::{self, Read};

use zlib_rs::c_api::z_stream;
use zlib_rs::inflate::{self, InflateStream};
use zlib_rs::{InflateConfig, InflateFlush, ReturnCode};

use super::sha256_state::Sha256State;

/// The deflate window: the output a resumed decoder needs before its resume point.
pub const WINDOW: usize = 32 << 10;

/// Input buffer.
const INPUT: usize = 64 << 10;

/// The inflater's bit buffer holds at most 63 bits: consumed bytes are hashed this far behind.
const HASH_LAG: usize = 8;

/// A deflate block boundary in the first gzip member (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Boundary {
    /// The artifact byte that holds the boundary: a resume downloads from here.
    pub artifact_offset: u64,
    /// Bits of that byte not used yet (its high bits), 0..=7; 0 = the boundary is at its start.
    pub bits: u8,
    /// Output bytes before the boundary.
    pub out: u64,
    /// CRC-32 of those output bytes.
    pub crc: u32,
    /// The artifact hash over bytes `0..artifact_offset` (None when not hashing).
    pub artifact_hash: Option<Sha256State>,
}

/// A raw-deflate zlib-rs inflater.
struct Inflater {
    stream: InflateStream<'static>,
}

impl Inflater {
    fn new() -> Self {
        Inflater {
            stream: InflateStream::new(InflateConfig { window_bits: -15 }),
        }
    }

    fn z(&mut self) -> &mut z_stream {
        // SAFETY: `InflateStream` has the layout of `z_stream` (zlib-rs checks it, and casts
        // the same way in its own API).
        unsafe { &mut *(&mut self.stream as *mut InflateStream<'static>).cast::<z_stream>() }
    }

    /// One `inflate`: returns the code, input bytes consumed, output bytes produced and
    /// `data_type`. `InflateFlush::Block` stops at the next block boundary.
    fn run(
        &mut self,
        input: &[u8],
        output: &mut [u8],
        flush: InflateFlush,
    ) -> (ReturnCode, usize, usize, i32) {
        let avail_in = input.len().min(u32::MAX as usize);
        let avail_out = output.len().min(u32::MAX as usize);
        {
            let z = self.z();
            z.next_in = input.as_ptr();
            z.avail_in = avail_in as u32;
            z.next_out = output.as_mut_ptr();
            z.avail_out = avail_out as u32;
        }
        // SAFETY: the pointers set above are valid for the lengths given, for this call.
        let ret = unsafe { inflate::inflate(&mut self.stream, flush) };
        let z = self.z();
        let consumed = avail_in - z.avail_in as usize;
        let produced = avail_out - z.avail_out as usize;
        let data_type = z.data_type;
        z.next_in = std::ptr::null();
        z.avail_in = 0;
        z.next_out = std::ptr::null_mut();
        z.avail_out = 0;
        (ret, consumed, produced, data_type)
    }

    fn error(&mut self, ret: ReturnCode) -> io::Error {
        let msg = self.z().msg;
        let text = if msg.is_null() {
            format!("{ret:?}")
        } else {
            // SAFETY: zlib-rs sets `msg` to a static NUL-terminated string.
            unsafe { std::ffi::CStr::from_ptr(msg) }
                .to_string_lossy()
                .into_owned()
        };
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("corrupt deflate stream: {text}"),
        )
    }
}

impl Drop for Inflater {
    fn drop(&mut self) {
        inflate::end(&mut self.stream);
    }
}

enum Stage {
    Header,
    Body,
    Trailer,
    /// A member ended: another one follows, or the input ends.
    NextMember,
    Done,
}

/// Where a resumed decoder continues (from a resume record).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumeAt {
    pub artifact_offset: u64,
    pub bits: u8,
    pub out: u64,
    pub crc: u32,
}

/// Decodes a gzip stream read from `inner` (the artifact from `artifact offset` 0, or from a
/// resume point).
pub struct GzDecoder<R> {
    inner: R,
    buf: Box<[u8]>,
    /// `buf[..hashed]` is hashed, `buf[..pos]` consumed, `buf[..len]` read.
    hashed: usize,
    pos: usize,
    len: usize,
    /// Artifact offset of `buf[0]`.
    base: u64,
    eof: bool,
    hash: Option<Sha256State>,
    stage: Stage,
    inflater: Inflater,
    /// Bits to prime from the first byte (a resume at a boundary inside a byte).
    prime: u8,
    crc: u32,
    member_out: u64,
    out: u64,
    member: u32,
    boundary: Option<Boundary>,
    /// Stop at block boundaries once the output reaches this offset.
    boundaries_from: u64,
}

fn corrupt(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}

impl<R: Read> GzDecoder<R> {
    /// A decoder from the start of the artifact; `hash` (usually empty) hashes every byte read.
    pub fn new(inner: R, hash: Option<Sha256State>) -> Self {
        GzDecoder {
            inner,
            buf: vec![0u8; INPUT].into_boxed_slice(),
            hashed: 0,
            pos: 0,
            len: 0,
            base: 0,
            eof: false,
            hash,
            stage: Stage::Header,
            inflater: Inflater::new(),
            prime: 0,
            crc: 0,
            member_out: 0,
            out: 0,
            member: 0,
            boundary: None,
            boundaries_from: 0,
        }
    }

    /// A decoder continuing the first member at `at`: `inner` yields the artifact from
    /// `at.artifact_offset`, `hash` covers the bytes before it, `window` is the output before
    /// `at.out` (its last [`WINDOW`] bytes, or all of it when shorter).
    pub fn resume(
        inner: R,
        at: &ResumeAt,
        hash: Option<Sha256State>,
        window: &[u8],
    ) -> io::Result<Self> {
        let expected_window = at.out.min(WINDOW as u64);
        if at.bits > 7 || window.len() as u64 != expected_window || at.out == 0 {
            return Err(corrupt("invalid gzip resume point"));
        }
        let mut d = GzDecoder::new(inner, hash);
        d.base = at.artifact_offset;
        d.stage = Stage::Body;
        d.prime = at.bits;
        d.crc = at.crc;
        d.member_out = at.out;
        d.out = at.out;
        if inflate::set_dictionary(&mut d.inflater.stream, window) != ReturnCode::Ok {
            return Err(corrupt("cannot set the gzip window"));
        }
        Ok(d)
    }

    /// Output bytes so far (including a resumed prefix).
    pub fn output_offset(&self) -> u64 {
        self.out
    }

    /// Look for block boundaries only from output offset `out` on (from 0 by default). Stopping
    /// at every block costs ~5% more CPU (zlib-rs then copies all output into its window),
    /// so a caller that wants a boundary per MiB asks for the next one when it needs it.
    pub fn boundaries_from(&mut self, out: u64) {
        self.boundaries_from = out;
    }

    /// The boundary the last `read` stopped at (its output ends there), if any.
    pub fn take_boundary(&mut self) -> Option<Boundary> {
        self.boundary.take()
    }

    /// The artifact hash after the whole input (call after `read` returned 0).
    pub fn finish_hash(mut self) -> Option<Sha256State> {
        let len = self.len;
        self.hash_to(len);
        self.hash
    }

    fn hash_to(&mut self, idx: usize) {
        if idx > self.hashed {
            if let Some(h) = &mut self.hash {
                h.update(&self.buf[self.hashed..idx]);
            }
            self.hashed = idx;
        }
    }

    /// Make at least one unconsumed byte available; false at the end of the input.
    fn fill(&mut self) -> io::Result<bool> {
        if self.pos < self.len {
            return Ok(true);
        }
        if self.eof {
            return Ok(false);
        }
        // Keep the bytes not hashed yet: at most the few the inflater may still give back.
        let lagging = self.pos.saturating_sub(HASH_LAG);
        self.hash_to(lagging);
        let keep = self.hashed;
        self.buf.copy_within(keep..self.len, 0);
        self.base += keep as u64;
        self.len -= keep;
        self.pos -= keep;
        self.hashed = 0;
        loop {
            match self.inner.read(&mut self.buf[self.len..]) {
                Ok(0) => {
                    self.eof = true;
                    return Ok(false);
                }
                Ok(n) => {
                    self.len += n;
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    fn byte(&mut self, what: &str) -> io::Result<u8> {
        if !self.fill()? {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("gzip stream cut short in its {what}"),
            ));
        }
        self.pos += 1;
        Ok(self.buf[self.pos - 1])
    }

    fn header(&mut self) -> io::Result<()> {
        let mut fixed = [0u8; 10];
        for b in &mut fixed {
            *b = self.byte("header")?;
        }
        if fixed[0] != 0x1f || fixed[1] != 0x8b || fixed[2] != 8 {
            return Err(corrupt("invalid gzip header"));
        }
        let flags = fixed[3];
        if flags & 0xe0 != 0 {
            return Err(corrupt("invalid gzip header"));
        }
        let check = flags & 0x02 != 0;
        let mut hcrc = zlib_rs::crc32::crc32(0, &fixed);
        if flags & 0x04 != 0 {
            let xlen = [self.byte("header")?, self.byte("header")?];
            hcrc = zlib_rs::crc32::crc32(hcrc, &xlen);
            for _ in 0..u16::from_le_bytes(xlen) {
                let b = self.byte("header")?;
                if check {
                    hcrc = zlib_rs::crc32::crc32(hcrc, &[b]);
                }
            }
        }
        for flag in [0x08, 0x10] {
            if flags & flag != 0 {
                loop {
                    let b = self.byte("header")?;
                    if check {
                        hcrc = zlib_rs::crc32::crc32(hcrc, &[b]);
                    }
                    if b == 0 {
                        break;
                    }
                }
            }
        }
        if check {
            let stored = u16::from_le_bytes([self.byte("header")?, self.byte("header")?]);
            if stored != hcrc as u16 {
                return Err(corrupt(
                    "corrupt gzip stream does not have a matching checksum",
                ));
            }
        }
        let pos = self.pos;
        self.hash_to(pos);
        Ok(())
    }

    fn trailer(&mut self) -> io::Result<()> {
        let mut t = [0u8; 8];
        for b in &mut t {
            *b = self.byte("trailer")?;
        }
        let crc = u32::from_le_bytes([t[0], t[1], t[2], t[3]]);
        let isize = u32::from_le_bytes([t[4], t[5], t[6], t[7]]);
        if crc != self.crc || isize != self.member_out as u32 {
            return Err(corrupt(
                "corrupt gzip stream does not have a matching checksum",
            ));
        }
        let pos = self.pos;
        self.hash_to(pos);
        Ok(())
    }

    /// Inflate into `out`; returns bytes produced, stopping at a block boundary.
    fn body(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.prime > 0 {
            let bits = self.prime;
            let byte = self.byte("deflate stream")?;
            // The high `bits` bits of this byte are the first unused ones.
            if inflate::prime(
                &mut self.inflater.stream,
                i32::from(bits),
                i32::from(byte >> (8 - bits)),
            ) != ReturnCode::Ok
            {
                return Err(corrupt("cannot prime the gzip resume point"));
            }
            self.prime = 0;
        }
        loop {
            if self.pos == self.len && !self.fill()? {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "gzip stream cut short in its deflate data",
                ));
            }
            let flush = if self.member == 0 && self.out >= self.boundaries_from {
                InflateFlush::Block
            } else {
                InflateFlush::NoFlush
            };
            let (ret, consumed, produced, data_type) =
                self.inflater.run(&self.buf[self.pos..self.len], out, flush);
            self.pos += consumed;
            if produced > 0 {
                self.crc = zlib_rs::crc32::crc32(self.crc, &out[..produced]);
                self.member_out += produced as u64;
                self.out += produced as u64;
            }
            match ret {
                ReturnCode::StreamEnd => {
                    let pos = self.pos;
                    self.hash_to(pos);
                    self.stage = Stage::Trailer;
                    return Ok(produced);
                }
                ReturnCode::Ok | ReturnCode::BufError => {}
                other => return Err(self.inflater.error(other)),
            }
            let lagging = self.pos.saturating_sub(HASH_LAG);
            self.hash_to(lagging);
            // At the start of a block that is not the last one's end: a boundary.
            if data_type & 128 != 0 && data_type & 64 == 0 && self.member == 0 {
                self.note_boundary(data_type);
            }
            if produced > 0 || out.is_empty() {
                return Ok(produced);
            }
            if ret == ReturnCode::BufError && self.pos < self.len {
                // Neither input consumed nor output produced with both available.
                return Err(corrupt("gzip decoder made no progress"));
            }
        }
    }

    fn note_boundary(&mut self, data_type: i32) {
        let held = (data_type & 63) as u64;
        let consumed = self.base + self.pos as u64;
        let Some(bit) = (consumed * 8).checked_sub(held) else {
            return;
        };
        let byte = bit / 8;
        let used = (bit % 8) as u8;
        let Some(idx) = byte
            .checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i >= self.hashed && i <= self.pos)
        else {
            return;
        };
        self.hash_to(idx);
        self.boundary = Some(Boundary {
            artifact_offset: byte,
            bits: if used == 0 { 0 } else { 8 - used },
            out: self.out,
            crc: self.crc,
            artifact_hash: self.hash.clone(),
        });
    }
}

impl<R: Read> Read for GzDecoder<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        self.boundary = None;
        loop {
            match self.stage {
                Stage::Header => {
                    self.header()?;
                    if self.member > 0 {
                        self.inflater = Inflater::new();
                    }
                    self.crc = 0;
                    self.member_out = 0;
                    self.stage = Stage::Body;
                }
                Stage::Body => {
                    if out.is_empty() {
                        return Ok(0);
                    }
                    let n = self.body(out)?;
                    if n > 0 {
                        return Ok(n);
                    }
                }
                Stage::Trailer => {
                    self.trailer()?;
                    self.stage = Stage::NextMember;
                }
                Stage::NextMember => {
                    if self.fill()? {
                        self.member += 1;
                        self.stage = Stage::Header;
                    } else {
                        let len = self.len;
                        self.hash_to(len);
                        self.stage = Stage::Done;
                    }
                }
                Stage::Done => return Ok(0),
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use flate2::{Compression, GzBuilder};
    use sha2::{Digest, Sha256};
    use std::io::Write;

    /// Compressible but not trivial: words from a small vocabulary, some random bytes.
    pub(crate) fn image(len: usize, seed: u32) -> Vec<u8> {
        let words: [&[u8]; 8] = [
            b"boot ",
            b"rootfs ",
            b"\0\0\0\0\0\0\0\0",
            b"ext4 ",
            b"yocto ",
            b"slot ",
            b"\n",
            b"kernel ",
        ];
        let mut x = seed.wrapping_mul(2_654_435_761) | 1;
        let mut out = Vec::with_capacity(len + 16);
        while out.len() < len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if x.is_multiple_of(5) {
                out.push((x >> 8) as u8);
            } else {
                out.extend_from_slice(words[(x >> 3) as usize % words.len()]);
            }
        }
        out.truncate(len);
        out
    }

    pub(crate) fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn flate2_decode(gz: &[u8]) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(gz).read_to_end(&mut out)?;
        Ok(out)
    }

    /// Decode with reads of `step` bytes; returns the output, the boundaries (with the
    /// output's sha256 up to each) and the final artifact hash.
    fn decode(gz: &[u8], step: usize) -> io::Result<(Vec<u8>, Vec<Boundary>, String)> {
        let d = GzDecoder::new(Trickle(gz, 7000), Some(Sha256State::new()));
        drain(d, Vec::new(), step)
    }

    /// Read `d` to its end in reads of `step` bytes, after `out`.
    fn drain<R: Read>(
        mut d: GzDecoder<R>,
        mut out: Vec<u8>,
        step: usize,
    ) -> io::Result<(Vec<u8>, Vec<Boundary>, String)> {
        let mut boundaries = Vec::new();
        let mut buf = vec![0u8; step];
        loop {
            let n = d.read(&mut buf)?;
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            if let Some(b) = d.take_boundary() {
                assert_eq!(b.out, out.len() as u64);
                boundaries.push(b);
            }
        }
        Ok((out, boundaries, d.finish_hash().unwrap().finish_hex()))
    }

    /// A reader giving at most `.1` bytes per read.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = buf.len().min(self.1).min(self.0.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn resume_from(
        gz: &[u8],
        full: &[u8],
        b: &Boundary,
        step: usize,
    ) -> io::Result<(Vec<u8>, String)> {
        let out = b.out as usize;
        let window = &full[out.saturating_sub(WINDOW)..out];
        let at = ResumeAt {
            artifact_offset: b.artifact_offset,
            bits: b.bits,
            out: b.out,
            crc: b.crc,
        };
        let state = Sha256State::from_text(&b.artifact_hash.as_ref().unwrap().to_text()).unwrap();
        let input = Trickle(&gz[b.artifact_offset as usize..], 5000);
        let d = GzDecoder::resume(input, &at, Some(state), window)?;
        let (all, _, hash) = drain(d, full[..out].to_vec(), step)?;
        Ok((all, hash))
    }

    #[test]
    fn decodes_what_flate2_decodes() {
        for (len, level) in [
            (0, 6),
            (1, 6),
            (1000, 1),
            (300_000, 0),
            (700_000, 6),
            (1_500_000, 9),
        ] {
            let data = image(len, len as u32);
            let gz = gzip(&data, level);
            let (out, _, hash) = decode(&gz, 100_000).unwrap();
            assert!(out == data, "len {len} level {level}");
            assert_eq!(out, flate2_decode(&gz).unwrap());
            assert_eq!(hash, hex::encode(Sha256::digest(&gz)));
        }
    }

    #[test]
    fn header_fields_and_members() {
        let data = image(200_000, 3);
        let mut named = GzBuilder::new()
            .filename("core-image.wic")
            .comment("a comment")
            .extra(vec![7u8; 3000])
            .write(Vec::new(), Compression::default());
        named.write_all(&data).unwrap();
        let named = named.finish().unwrap();
        // FHCRC: the plain header with the flag and the CRC-16 of the header.
        let plain = gzip(&data, 6);
        let mut header = plain[..10].to_vec();
        header[3] |= 0x02;
        let crc16 = zlib_rs::crc32::crc32(0, &header) as u16;
        let mut checked = header.clone();
        checked.extend_from_slice(&crc16.to_le_bytes());
        checked.extend_from_slice(&plain[10..]);
        let mut multi = named.clone();
        multi.extend_from_slice(&gzip(b"second member", 6));
        multi.extend_from_slice(&gzip(b"", 6));
        multi.extend_from_slice(&checked);
        for gz in [&named, &checked, &multi] {
            let (out, _, hash) = decode(gz, 65_536).unwrap();
            assert_eq!(out, flate2_decode(gz).unwrap());
            assert_eq!(hash, hex::encode(Sha256::digest(gz)));
        }
        // What flate2 refuses, this refuses.
        let mut bad_hcrc = checked.clone();
        bad_hcrc[10] ^= 1;
        let mut garbage_after = plain.clone();
        garbage_after.extend_from_slice(b"trailing");
        let mut bad_crc = plain.clone();
        let at = bad_crc.len() - 6;
        bad_crc[at] ^= 1;
        let mut bad_size = plain.clone();
        let at = bad_size.len() - 2;
        bad_size[at] ^= 1;
        let cut = &plain[..plain.len() - 3];
        let mut reserved = plain.clone();
        reserved[3] |= 0x20;
        for gz in [
            &bad_hcrc[..],
            &garbage_after,
            &bad_crc,
            &bad_size,
            cut,
            &reserved,
        ] {
            assert!(flate2_decode(gz).is_err());
            assert!(decode(gz, 65_536).is_err());
        }
    }

    #[test]
    fn resuming_from_every_boundary_gives_the_same_image_and_hash() {
        for (len, level, seed) in [
            (900_000, 6, 1),
            (600_000, 1, 2),
            (400_000, 9, 3),
            (300_000, 0, 4),
        ] {
            let data = image(len, seed);
            let gz = gzip(&data, level);
            let want_hash = hex::encode(Sha256::digest(&gz));
            let (out, boundaries, _) = decode(&gz, 40_000).unwrap();
            assert!(out == data);
            // zlib-rs's fastest levels make few, large blocks.
            let least = if level == 6 { 3 } else { 1 };
            assert!(
                boundaries.len() >= least,
                "level {level}: {} boundaries",
                boundaries.len()
            );
            let mut bits_seen = [false; 8];
            for b in &boundaries {
                bits_seen[b.bits as usize] = true;
                let (again, hash) = resume_from(&gz, &data, b, 30_000).unwrap();
                assert!(again == data, "level {level} boundary {b:?}");
                assert_eq!(hash, want_hash, "level {level} boundary {b:?}");
            }
            if level == 6 {
                assert!(
                    bits_seen.iter().filter(|s| **s).count() > 2,
                    "{bits_seen:?}"
                );
            }
        }
    }

    #[test]
    fn corrupt_input_is_an_error_never_a_panic_or_a_wrong_image() {
        let data = image(200_000, 11);
        let gz = gzip(&data, 6);
        let mut x = 0x9e37_79b9u32;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as usize
        };
        for round in 0..400 {
            let mut bad = gz.clone();
            for _ in 0..1 + round % 3 {
                let at = next() % bad.len();
                bad[at] ^= 1 << (next() % 8);
            }
            if round % 5 == 0 {
                bad.truncate(next() % bad.len());
            }
            if let Ok((out, _, _)) = decode(&bad, 10_000 + round) {
                // Only a flip the format does not cover (the header's mtime, OS, ...).
                assert!(
                    out == data,
                    "round {round}: a wrong image decoded without an error"
                );
            }
        }
    }

    #[test]
    fn a_wrong_resume_point_never_gives_a_wrong_image_silently() {
        let data = image(500_000, 9);
        let gz = gzip(&data, 6);
        let want_hash = hex::encode(Sha256::digest(&gz));
        let (_, boundaries, _) = decode(&gz, 50_000).unwrap();
        let b = &boundaries[boundaries.len() / 2];
        let tampered = [
            Boundary {
                bits: (b.bits + 1) % 8,
                ..b.clone()
            },
            Boundary {
                artifact_offset: b.artifact_offset + 1,
                ..b.clone()
            },
            Boundary {
                artifact_offset: b.artifact_offset - 1,
                ..b.clone()
            },
            Boundary {
                crc: b.crc ^ 1,
                ..b.clone()
            },
            Boundary {
                out: b.out - 1,
                ..b.clone()
            },
        ];
        for t in &tampered {
            // The stream does not decode, or a check (CRC-32, length) fails, or the artifact
            // hash differs: a wrong image never passes (these points all decode wrongly).
            if let Ok((out, hash)) = resume_from(&gz, &data, t, 30_000) {
                assert!(hash != want_hash, "passed: {t:?}");
                assert!(out != data, "{t:?}");
            }
        }
        // A window of the wrong size is refused outright.
        let at = ResumeAt {
            artifact_offset: b.artifact_offset,
            bits: b.bits,
            out: b.out,
            crc: b.crc,
        };
        assert!(GzDecoder::resume(&gz[..], &at, None, &data[..10]).is_err());
    }
}
