use super::*;
use sha2::{Digest, Sha256};

/// Text-like runs, bytes that do not compress, zeros and long repeats: every block kind,
/// literal mode and table mode turns up somewhere.
fn image(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let words: [&[u8]; 8] = [
        b"the ", b"quick ", b"brown ", b"fox ", b"jumps\n", b"over ", b"lazy ", b"dogs ",
    ];
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        let section = next() % 10;
        let n = (next() % 60_000) as usize + 1;
        match section {
            0 => out.extend((0..n).map(|_| next() as u8)),
            1 => out.extend(std::iter::repeat_n(0u8, n)),
            2 if out.len() > 1000 => {
                // An earlier part again (long matches, repeat offsets).
                let from = (next() as usize) % (out.len() - 500);
                let n = n.min(out.len() - from);
                let copy = out[from..from + n].to_vec();
                out.extend_from_slice(&copy);
            }
            3 => out.extend((0..n).map(|i| (i as u8).wrapping_mul(3))),
            _ => {
                while n > 0 && out.len() % 100_000 != 0 {
                    out.extend_from_slice(words[(next() % 8) as usize]);
                    if out.len() % 8192 == 0 {
                        break;
                    }
                }
                for _ in 0..n / 6 {
                    out.extend_from_slice(words[(next() % 8) as usize]);
                }
            }
        }
    }
    out.truncate(len);
    out
}

fn compress(data: &[u8], level: i32, checksum: bool) -> Vec<u8> {
    let mut c = zstd::bulk::Compressor::new(level).expect("compressor");
    c.include_checksum(checksum).expect("checksum flag");
    c.compress(data).expect("compress")
}

/// Streamed compression: no content size in the header, so not a single segment.
fn compress_streamed(data: &[u8], level: i32) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), level).expect("encoder");
    e.include_checksum(true).expect("checksum flag");
    io::Write::write_all(&mut e, data).expect("write");
    e.finish().expect("finish")
}

/// Decode `stream` asking for a point at every block; returns the output and the points.
fn decode_with_points(stream: &[u8], spacing: u64) -> (Vec<u8>, Vec<Boundary>) {
    let mut d = ZstdDecoder::new(stream, Some(Sha256State::new()));
    d.boundaries_from(0);
    let mut out = Vec::new();
    let mut points = Vec::new();
    let mut buf = vec![0u8; 7000];
    loop {
        let n = d.read(&mut buf).expect("decode");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(b) = d.take_boundary() {
            assert_eq!(b.out, out.len() as u64, "a point is where the output ends");
            d.boundaries_from(b.out + spacing);
            points.push(b);
        }
    }
    let hash = d.finish_hash().expect("hashing");
    assert_eq!(hash.finish(), <[u8; 32]>::from(Sha256::digest(stream)));
    (out, points)
}

/// Resume at `point` as a restart would: the slot's prefix is `image[..out]`.
fn resume(stream: &[u8], image: &[u8], point: &Boundary) -> io::Result<(Vec<u8>, [u8; 32])> {
    let at = ResumeAt {
        artifact_offset: point.artifact_offset,
        out: point.out,
        state: ZstdState::from_text(&point.state.to_text()).expect("state round trip"),
    };
    assert_eq!(at.state, point.state);
    let mut prefix = ResumePrefix::new(&at);
    for piece in image[..point.out as usize].chunks(100_000) {
        prefix.update(piece);
    }
    let rest = &stream[point.artifact_offset as usize..];
    let mut d = ZstdDecoder::resume(rest, &at, point.artifact_hash.clone(), prefix)?;
    let mut out = Vec::new();
    d.read_to_end(&mut out)?;
    let hash = d.finish_hash().expect("hashing").finish();
    Ok((out, hash))
}

/// Resumes at every point; returns how many there were, and how many of them had an RLE
/// table (which the resumed decoder sets again in the next block that repeats it).
fn check_every_point(stream: &[u8], image: &[u8], what: &str) -> (usize, usize) {
    let (out, points) = decode_with_points(stream, 0);
    assert!(out == image, "{what}: decoded with points");
    let whole = <[u8; 32]>::from(Sha256::digest(stream));
    for p in &points {
        let (rest, hash) = resume(stream, image, p)
            .unwrap_or_else(|e| panic!("{what}: resume at {} / {}: {e}", p.artifact_offset, p.out));
        assert!(
            rest == image[p.out as usize..],
            "{what}: resumed at {} / {} gives the rest",
            p.artifact_offset,
            p.out
        );
        assert_eq!(hash, whole, "{what}: artifact hash after a resume");
    }
    let rle = points
        .iter()
        .filter(|p| match &p.state {
            ZstdState::InFrame(f) => f.tables.iter().any(|t| matches!(t, Table::Rle(_))),
            ZstdState::Between => false,
        })
        .count();
    (points.len(), rle)
}

#[test]
fn every_point_of_every_level_resumes_to_the_same_image() {
    let data = image(3 << 20, 7);
    let mut with_rle = 0;
    for level in [-5, 1, 3, 9, 19] {
        for stream in [
            compress(&data, level, true),
            compress_streamed(&data, level),
        ] {
            let (points, rle) = check_every_point(&stream, &data, &format!("level {level}"));
            // Blocks hold 128 KiB of output at most: 24 blocks or more.
            assert!(points >= 20, "level {level}: only {points} points");
            with_rle += rle;
        }
    }
    assert!(with_rle > 0, "no point had an RLE table");
}

#[test]
fn other_images_resume_too() {
    for seed in [1, 2, 3] {
        let data = image(1 << 20, seed);
        check_every_point(&compress(&data, 3, true), &data, &format!("seed {seed}"));
    }
    // Nothing but text, and nothing but noise (raw blocks).
    let text: Vec<u8> = (0..800_000u32)
        .map(|i| b"abcdefgh\n"[(i.wrapping_mul(i) % 9) as usize])
        .collect();
    check_every_point(&compress(&text, 3, true), &text, "text");
    let noise = image(0, 1)
        .into_iter()
        .chain((0..600_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8))
        .collect::<Vec<_>>();
    check_every_point(&compress(&noise, 3, true), &noise, "noise");
}

#[test]
fn frames_skippable_frames_and_points_between_them() {
    let a = image(700_000, 11);
    let b = image(500_000, 12);
    let mut stream = compress(&a, 3, true);
    // A skippable frame between the two.
    stream.extend_from_slice(&[0x50, 0x2a, 0x4d, 0x18, 3, 0, 0, 0, 9, 9, 9]);
    stream.extend_from_slice(&compress(&b, 5, true));
    let both = [a.clone(), b].concat();
    let (out, points) = decode_with_points(&stream, 0);
    assert!(out == both);
    assert!(
        points
            .iter()
            .any(|p| p.state == ZstdState::Between && p.out == a.len() as u64),
        "a point between the frames"
    );
    check_every_point(&stream, &both, "two frames");
}

#[test]
fn a_frame_without_a_checksum_has_no_points_inside() {
    let data = image(1 << 20, 5);
    let (out, points) = decode_with_points(&compress(&data, 3, false), 0);
    assert!(out == data);
    // The one at its end, between it and the next frame, is not inside.
    assert_eq!(points.len(), 1);
    assert_eq!(points[0].state, ZstdState::Between);
    assert_eq!(points[0].out, data.len() as u64);
}

#[test]
fn points_follow_the_requested_spacing() {
    let data = image(4 << 20, 9);
    let stream = compress(&data, 3, true);
    let (_, points) = decode_with_points(&stream, 1 << 20);
    assert!((3..=5).contains(&points.len()), "{} points", points.len());
    for pair in points.windows(2) {
        assert!(pair[1].out >= pair[0].out + (1 << 20));
    }
}

#[test]
fn a_wrong_state_or_prefix_never_gives_a_wrong_image() {
    let data = image(2 << 20, 21);
    let stream = compress(&data, 3, true);
    let (_, points) = decode_with_points(&stream, 256 << 10);
    let p = points
        .iter()
        .find(|p| matches!(p.state, ZstdState::InFrame(_)) && p.out > 1 << 20)
        .expect("a point inside the frame");
    let ZstdState::InFrame(state) = &p.state else {
        unreachable!()
    };
    let mut wrong_states = Vec::new();
    let mut s = state.clone();
    s.reps = [s.reps[1], s.reps[0], s.reps[2]];
    wrong_states.push(s);
    let mut s = state.clone();
    s.reps[0] = s.reps[0].saturating_sub(1).max(1) + 2;
    wrong_states.push(s);
    let mut s = state.clone();
    s.tables[LL] = Table::Predefined;
    s.tables[ML] = Table::Rle(3);
    wrong_states.push(s);
    let mut s = state.clone();
    s.huffman = None;
    wrong_states.push(s);
    let mut s = state.clone();
    s.window = 1 << 20;
    wrong_states.push(s);
    for (i, wrong) in wrong_states.into_iter().enumerate() {
        if wrong == *state {
            continue;
        }
        let point = Boundary {
            state: ZstdState::InFrame(wrong),
            ..p.clone()
        };
        match resume(&stream, &data, &point) {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData, "case {i}: {e}"),
            Ok((rest, _)) => assert!(rest == data[p.out as usize..], "case {i}: a wrong image"),
        }
    }
    // A slot prefix that is not what was written: the frame's checksum does not match.
    let mut changed = data.clone();
    changed[1000] ^= 1;
    let err = resume(&stream, &changed, p).expect_err("a changed prefix");
    assert!(err.to_string().contains("checksum"), "{err}");
    // A point moved off its block boundary.
    for delta in [1i64, -1, 3] {
        let moved = Boundary {
            artifact_offset: (p.artifact_offset as i64 + delta) as u64,
            ..p.clone()
        };
        match resume(&stream, &data, &moved) {
            Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData),
            Ok((rest, _)) => panic!("moved by {delta}: {} bytes decoded", rest.len()),
        }
    }
}

#[test]
fn state_texts_that_do_not_parse_are_refused() {
    for text in [
        "",
        "frame",
        "frame:0:131072:-:8010:p:p:p:1,4",
        "frame:0:131072:-:8010:p:p:p:0,4,8",
        "frame:0:999999999:-:8010:p:p:p:1,4,8",
        "frame:0:131072:-:zz:p:p:p:1,4,8",
        "frame:0:131072:-:8010:q:p:p:1,4,8",
        "frame:0:131072:-:8010:f00:p:p:1,4,8",
        "frame:0:131072:-:8010:p:p:r:1,4,8",
        "frame:0:131072:0:8010:p:p:p:1,4,8",
        "frame:0:131072:x:8010:p:p:p:1,4,8",
        "frame:0:131072:8010:p:p:p:1,4,8",
        "betweenx",
    ] {
        assert_eq!(ZstdState::from_text(text), None, "{text}");
    }
    for ok in [
        "frame:5:131072:-:8010:p:r1f:p:1,4,8",
        "frame:0:131072:400000:8010:p:p:p:1,4,8",
        "frame:0:131072:-:-:p:p:p:1,4,8",
        "frame:0:131072:-:8010:-:-:-:1,4,8",
        "between",
    ] {
        assert_eq!(ZstdState::from_text(ok).expect("parses").to_text(), ok);
    }
}

#[test]
fn table_descriptions_round_trip_through_the_writer() {
    for t in [LL, OF, ML] {
        let (counts, log) = follow::table_counts(t, &Table::Predefined).unwrap();
        let bytes = follow::write_ncount(&counts, log);
        let (back, back_log, len) = follow::read_ncount(&bytes, t).expect("reads");
        assert_eq!((back, back_log, len), (counts, log, bytes.len()));
        for symbol in [0u8, 1, 7, 31] {
            let (counts, log) = follow::rle_counts(symbol);
            let bytes = follow::write_ncount(&counts, log);
            let (back, _, len) = follow::read_ncount(&bytes, t).expect("reads");
            assert_eq!((back, len), (counts, bytes.len()));
        }
    }
}

// ---- Review tests (adversarial review of the zstd resume decoder) ----

/// Decode `stream` with a read buffer of `buf_len` bytes, asking for a point at every block.
fn decode_points_buf(stream: &[u8], buf_len: usize) -> (Vec<u8>, Vec<Boundary>) {
    let mut d = ZstdDecoder::new(stream, Some(Sha256State::new()));
    d.boundaries_from(0);
    let mut out = Vec::new();
    let mut points = Vec::new();
    let mut buf = vec![0u8; buf_len];
    loop {
        let n = d.read(&mut buf).expect("decode");
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(b) = d.take_boundary() {
            assert_eq!(b.out, out.len() as u64, "a point is where the output ends");
            d.boundaries_from(b.out);
            points.push(b);
        }
    }
    (out, points)
}

/// Decode until the end or the first error: output, points, and the error.
fn decode_until_error(stream: &[u8]) -> (Vec<u8>, Vec<Boundary>, Option<io::Error>) {
    let mut d = ZstdDecoder::new(stream, Some(Sha256State::new()));
    d.boundaries_from(0);
    let mut out = Vec::new();
    let mut points = Vec::new();
    let mut buf = vec![0u8; 7000];
    loop {
        match d.read(&mut buf) {
            Ok(0) => return (out, points, None),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => return (out, points, Some(e)),
        }
        if let Some(b) = d.take_boundary() {
            points.push(b);
        }
    }
}

fn reader_decode(stream: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    super::super::compress::ZstdReader::new(stream).read_to_end(&mut out)?;
    Ok(out)
}

fn xxh64_of(parts: &[&[u8]]) -> u32 {
    let mut x = Xxh64::default();
    for p in parts {
        x.update(p);
    }
    x.digest() as u32
}

/// A reader that yields at most one byte per read.
struct OneByte<'a>(&'a [u8]);

impl Read for OneByte<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.0.is_empty() || buf.is_empty() {
            return Ok(0);
        }
        buf[0] = self.0[0];
        self.0 = &self.0[1..];
        Ok(1)
    }
}

fn streamed_with(data: &[u8], level: i32, window_log: u32) -> Vec<u8> {
    let mut e = zstd::stream::Encoder::new(Vec::new(), level).expect("encoder");
    e.include_checksum(true).expect("checksum flag");
    e.set_parameter(zstd::zstd_safe::CParameter::WindowLog(window_log))
        .expect("window log");
    io::Write::write_all(&mut e, data).expect("write");
    e.finish().expect("finish")
}

#[test]
fn review_xxh64_matches_the_frame_checksums_of_libzstd() {
    let data = image(5000, 3);
    for len in (0..100).chain([255, 256, 257, 1000, 4999]) {
        let stream = compress(&data[..len], 3, true);
        let stored = u32::from_le_bytes(stream[stream.len() - 4..].try_into().unwrap());
        // In one piece and in odd pieces.
        assert_eq!(xxh64_of(&[&data[..len]]), stored, "len {len}");
        let pieces: Vec<&[u8]> = data[..len].chunks(7).collect();
        assert_eq!(xxh64_of(&pieces), stored, "len {len} in pieces");
    }
}

/// Points must not depend on the caller's read buffer size: 128 KiB blocks end exactly at
/// the end of a power-of-two buffer, and a point pending then is dropped
/// (`in_frame`: `made == 0` after the flush drops `pending` without a boundary).
#[test]
fn review_bug_power_of_two_read_buffers_get_points() {
    let data = image(2 << 20, 7);
    let stream = compress(&data, 3, true);
    let (_, reference) = decode_points_buf(&stream, 7000);
    assert!(reference.len() >= 12, "{} points", reference.len());
    for len in [4096, 65536, 128 << 10] {
        let (out, points) = decode_points_buf(&stream, len);
        assert!(out == data);
        assert!(
            points.len() * 2 >= reference.len(),
            "buffer {len}: {} points, {} with a 7000-byte buffer",
            points.len(),
            reference.len()
        );
    }
}

/// Tiny read buffers: every point is where the output of the blocks before it ends, and
/// resumes (also through a source that yields one byte per read).
#[test]
fn review_points_with_tiny_read_buffers_resume() {
    let data = image(400_000, 13);
    let stream = compress_streamed(&data, 3);
    let whole = <[u8; 32]>::from(Sha256::digest(&stream));
    for len in [1usize, 7, 4095] {
        let (out, points) = decode_points_buf(&stream, len);
        assert!(out == data, "buffer {len}");
        assert!(points.len() >= 2, "buffer {len}: {} points", points.len());
        for p in &points {
            let (rest, hash) = resume(&stream, &data, p).expect("resume");
            assert!(rest == data[p.out as usize..], "buffer {len}: at {}", p.out);
            assert_eq!(hash, whole);
        }
    }
    let p = decode_points_buf(&stream, 7).1.pop().expect("a point");
    let at = ResumeAt {
        artifact_offset: p.artifact_offset,
        out: p.out,
        state: p.state.clone(),
    };
    let mut prefix = ResumePrefix::new(&at);
    for b in data[..p.out as usize].chunks(1) {
        prefix.update(b);
    }
    let rest = OneByte(&stream[p.artifact_offset as usize..]);
    let mut d = ZstdDecoder::resume(rest, &at, None, prefix).expect("resume");
    let mut out = Vec::new();
    d.read_to_end(&mut out).expect("decode");
    assert!(out == data[p.out as usize..]);
}

#[test]
fn review_levels_small_windows_and_empty_frames() {
    let data = image(300_000, 17);
    for level in [-7, -1, 22] {
        check_every_point(
            &compress(&data, level, true),
            &data,
            &format!("level {level}"),
        );
    }
    // A 1 KiB window: blocks of 1 KiB at most, points every block.
    let small = streamed_with(&data[..60_000], 3, 10);
    let (points, _) = check_every_point(&small, &data[..60_000], "window 1 KiB");
    assert!(points >= 50, "{points} points");
    // Empty frames around one with data.
    let mut stream = compress(&[], 3, true);
    stream.extend_from_slice(&compress_streamed(&data, 5));
    stream.extend_from_slice(&compress(&[], 3, true));
    stream.extend_from_slice(&compress_streamed(&[], 3));
    check_every_point(&stream, &data, "empty frames");
}

/// A window above 8 MiB: no point inside the frame (the one at its end is between frames).
#[test]
fn review_large_windows_give_no_points_inside() {
    let data = image(600_000, 19);
    let stream = streamed_with(&data, 3, 24);
    let (out, points) = decode_with_points(&stream, 0);
    assert!(out == data);
    assert!(
        points.iter().all(|p| p.state == ZstdState::Between),
        "{points:?}"
    );
    // 8 MiB exactly still has them.
    let stream = streamed_with(&data, 3, 23);
    let (n, _) = check_every_point(&stream, &data, "window 8 MiB");
    assert!(n > 2);
}

/// A point right after a block of fewer than 8 bytes (the frame's first, after a flush):
/// the initial repeat offsets 4 and 8 reach before the frame, so `resume` refuses the state
/// (a dictionary's repeat offsets must be within its content); the decoder should not report
/// such a point (or the resume should accept it).
#[test]
fn review_bug_a_point_after_a_tiny_first_block_is_resumable() {
    let data = image(300_000, 23);
    let mut e = zstd::stream::Encoder::new(Vec::new(), 3).expect("encoder");
    e.include_checksum(true).expect("checksum");
    io::Write::write_all(&mut e, &data[..5]).expect("write");
    io::Write::flush(&mut e).expect("flush");
    io::Write::write_all(&mut e, &data[5..]).expect("write");
    let stream = e.finish().expect("finish");
    // The frame's first block (after magic, descriptor and window) holds the 5 bytes.
    assert_eq!(stream[4] & 0xe3, 0);
    let h = u32::from(stream[6]) | (u32::from(stream[7]) << 8) | (u32::from(stream[8]) << 16);
    assert!(h >> 3 <= 8 && h & 1 == 0, "a tiny first block");
    check_every_point(&stream, &data, "a 5-byte first block");
}

/// A frame (window 1 KiB, checksum) of a raw block of 100 bytes and a last compressed block
/// whose literals repeat a Huffman table that the frame never set (treeless, 8 literals,
/// one stream), no sequences; `checksum` closes it.
fn treeless_without_a_tree(checksum: u32) -> Vec<u8> {
    let mut s = vec![0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x00];
    s.extend_from_slice(&[0x20, 0x03, 0x00]);
    s.extend_from_slice(&[b'a'; 100]);
    s.extend_from_slice(&[0x35, 0x00, 0x00]);
    s.extend_from_slice(&[0x83, 0x80, 0x00, 0xa5, 0x01, 0x00]);
    s.extend_from_slice(&checksum.to_le_bytes());
    s
}

/// A stream that a fresh decode refuses (treeless literals with no Huffman table) must not
/// be accepted by a resume either: the dictionary's stand-in tree (`NO_HUFFMAN`) decodes it.
#[test]
fn review_bug_resume_accepts_treeless_literals_without_a_tree() {
    let draft = treeless_without_a_tree(0);
    let (out, points, err) = decode_until_error(&draft);
    assert!(err.is_some(), "a fresh decode refuses it");
    assert_eq!(out.len(), 100);
    let p = points
        .iter()
        .find(|p| p.out == 100)
        .expect("the decoder reports a point after the raw block");
    assert!(matches!(&p.state, ZstdState::InFrame(f) if f.huffman.is_none()));
    // What the resumed decoder makes of the rest: put its checksum in the frame.
    let at = ResumeAt {
        artifact_offset: p.artifact_offset,
        out: p.out,
        state: p.state.clone(),
    };
    let decode_rest = |stream: &[u8]| {
        let mut prefix = ResumePrefix::new(&at);
        prefix.update(&[b'a'; 100]);
        let mut d = ZstdDecoder::resume(&stream[p.artifact_offset as usize..], &at, None, prefix)?;
        let mut rest = Vec::new();
        let r = d.read_to_end(&mut rest);
        r.map(|_| rest.clone())
            .map_err(|e| (e, rest))
            .map_err(|(e, rest)| io::Error::new(e.kind(), format!("{e} after {rest:?}")))
    };
    // The 8 literals are 0 or 1 each: try every checksum they can have.
    for bits in 0..=255u8 {
        let rest: Vec<u8> = (0..8).map(|i| (bits >> i) & 1).collect();
        let stream = treeless_without_a_tree(xxh64_of(&[&[b'a'; 100], &rest]));
        assert!(reader_decode(&stream).is_err(), "ZstdReader refuses it");
        assert!(
            decode_until_error(&stream).2.is_some(),
            "a fresh decode refuses it"
        );
        if let Ok(rest) = decode_rest(&stream) {
            panic!("a resume decodes what a fresh decode refuses: {rest:?}");
        }
    }
}

/// Set a content size (4 bytes) in the header of a frame made without one.
fn with_content_size(frame: &[u8], size: u32) -> Vec<u8> {
    assert_eq!(
        frame[4] & 0xe3,
        0x00,
        "no content size, single segment or dictionary"
    );
    let mut s = frame[..6].to_vec();
    s[4] |= 0x80;
    s.extend_from_slice(&size.to_le_bytes());
    s.extend_from_slice(&frame[6..]);
    s
}

/// A frame whose content size does not match its content: a fresh decode refuses it, a
/// resumed one must too (the synthetic header has no content size, so libzstd cannot).
#[test]
fn review_bug_resume_ignores_a_wrong_content_size() {
    let data = image(600_000, 29);
    let stream = with_content_size(&compress_streamed(&data, 3), data.len() as u32 - 1);
    assert!(reader_decode(&stream).is_err(), "ZstdReader refuses it");
    let (_, points, err) = decode_until_error(&stream);
    assert!(err.is_some(), "a fresh decode refuses it");
    let p = points
        .iter()
        .find(|p| matches!(p.state, ZstdState::InFrame(_)))
        .expect("a point inside the frame before the error");
    match resume(&stream, &data, p) {
        Err(_) => {}
        Ok((rest, _)) => panic!(
            "resumed at {}: {} bytes, a frame with a wrong content size passes",
            p.out,
            rest.len()
        ),
    }
}

/// A frame with a dictionary id after a resumed frame: refused as by a fresh decode (the
/// resume's own dictionary, id 1, must not stay loaded).
#[test]
fn review_a_dictionary_frame_after_a_resumed_one_is_refused() {
    let a = image(500_000, 31);
    let b = image(100_000, 32);
    let fb = compress_streamed(&b, 3);
    assert_eq!(fb[4] & 3, 0);
    let mut fb_dict = fb[..6].to_vec();
    fb_dict[4] |= 1;
    fb_dict.push(1);
    fb_dict.extend_from_slice(&fb[6..]);
    let mut stream = compress_streamed(&a, 3);
    stream.extend_from_slice(&fb_dict);
    assert!(reader_decode(&stream).is_err());
    let (_, points, err) = decode_until_error(&stream);
    assert!(err.is_some());
    let both = [a.clone(), b].concat();
    let inside: Vec<_> = points
        .iter()
        .filter(|p| matches!(p.state, ZstdState::InFrame(_)))
        .collect();
    assert!(!inside.is_empty());
    for p in inside {
        assert!(resume(&stream, &both, p).is_err(), "resumed at {}", p.out);
    }
}

/// A prefix made for another state (here: between frames) leaves the resumed frame without
/// its checksum check (`resumed` is None). It fails today only by accident: the frame's 4
/// checksum bytes, not read by `end_frame`, are then taken for the next frame's header.
#[test]
fn review_a_prefix_made_for_another_state_is_refused() {
    let data = image(200_000, 37);
    let stream = streamed_with(&data, 3, 10);
    let (_, points) = decode_with_points(&stream, 0);
    let mut wrong_passed = 0;
    for p in points
        .iter()
        .filter(|p| matches!(p.state, ZstdState::InFrame(_)) && p.out > 8192)
        .take(20)
    {
        let at = ResumeAt {
            artifact_offset: p.artifact_offset,
            out: p.out,
            state: p.state.clone(),
        };
        let between = ResumeAt {
            state: ZstdState::Between,
            ..at.clone()
        };
        let mut changed = data[..p.out as usize].to_vec();
        for i in 1..=64 {
            let at = changed.len() - i;
            changed[at] ^= 0x5a;
        }
        let mut prefix = ResumePrefix::new(&between);
        prefix.update(&changed);
        let Ok(mut d) =
            ZstdDecoder::resume(&stream[p.artifact_offset as usize..], &at, None, prefix)
        else {
            continue;
        };
        let mut rest = Vec::new();
        if d.read_to_end(&mut rest).is_ok() && rest != data[p.out as usize..] {
            wrong_passed += 1;
        }
    }
    assert_eq!(
        wrong_passed, 0,
        "resumes that gave a wrong image without an error"
    );
}

/// `out` of a point between frames moved: nothing in the module can tell (no checksum covers
/// a whole stream), the image comes out shifted. The caller binds `out` to the slot's prefix:
/// a resume record holds the sha256 of the slot's first `out` bytes, and a prefix of another
/// length does not match it (the pipeline's tests cover that).
#[test]
fn a_moved_point_between_frames_is_not_caught_here() {
    let a = image(300_000, 41);
    let b = image(300_000, 42);
    let mut stream = compress(&a, 3, true);
    stream.extend_from_slice(&compress(&b, 3, true));
    let both = [a.clone(), b.clone()].concat();
    let (_, points) = decode_with_points(&stream, 0);
    let p = points
        .iter()
        .find(|p| p.state == ZstdState::Between && p.out == a.len() as u64)
        .expect("a point between the frames");
    let moved = Boundary {
        out: p.out - 1000,
        ..p.clone()
    };
    let (rest, _) = resume(&stream, &both, &moved).expect("decodes");
    assert!(rest == b, "the next frame, whatever `out` says");
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Random damage to a valid stream: a fresh decode (with and without points, any buffer)
/// fails or gives ZstdReader's output, with the same error; never a panic.
#[test]
fn review_fuzz_damaged_streams_decode_like_zstd_reader() {
    let data = image(200_000, 43);
    let mut base = compress(&data, 3, true);
    base.extend_from_slice(&[0x51, 0x2a, 0x4d, 0x18, 2, 0, 0, 0, 7, 7]);
    base.extend_from_slice(&streamed_with(&data[..50_000], 1, 12));
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut differ = Vec::new();
    for round in 0..300 {
        let mut s = base.clone();
        match rng.below(4) {
            0 => {
                let i = rng.below(s.len());
                s[i] ^= 1 << rng.below(8);
            }
            1 => {
                for _ in 0..1 + rng.below(8) {
                    let i = rng.below(s.len());
                    s[i] = rng.next() as u8;
                }
            }
            2 => s.truncate(rng.below(s.len())),
            _ => {
                // Damage near the start, where headers and tables are.
                let i = rng.below(s.len().min(400));
                s[i] = rng.next() as u8;
            }
        }
        let expected = reader_decode(&s).map_err(|e| e.to_string());
        for (buf_len, points) in [(7000usize, false), (7000, true), (4096, true), (13, true)] {
            let mut d = ZstdDecoder::new(&s[..], None);
            if points {
                d.boundaries_from(0);
            }
            let mut out = Vec::new();
            let mut buf = vec![0u8; buf_len];
            let got = loop {
                match d.read(&mut buf) {
                    Ok(0) => break Ok(out),
                    Ok(n) => out.extend_from_slice(&buf[..n]),
                    Err(e) => break Err(e.to_string()),
                }
                if let Some(b) = d.take_boundary() {
                    d.boundaries_from(b.out);
                }
            };
            if got != expected {
                differ.push(format!(
                    "round {round} buf {buf_len} points {points}: {:?} vs {:?}",
                    got.as_ref().map(Vec::len),
                    expected.as_ref().map(Vec::len)
                ));
            }
        }
    }
    assert!(differ.is_empty(), "{differ:#?}");
}

/// Random changes to a point's state text, offset or output offset: an error, or exactly the
/// right image; never a wrong one that passes.
#[test]
fn review_fuzz_damaged_states_never_give_a_wrong_image() {
    let data = image(1 << 20, 47);
    let stream = compress(&data, 3, true);
    let whole = <[u8; 32]>::from(Sha256::digest(&stream));
    let (_, points) = decode_with_points(&stream, 128 << 10);
    let inside: Vec<_> = points
        .iter()
        .filter(|p| matches!(p.state, ZstdState::InFrame(_)))
        .collect();
    assert!(inside.len() >= 3);
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut parsed, mut wrong) = (0, Vec::new());
    for round in 0..400 {
        let p = inside[rng.below(inside.len())];
        let mut text = p.state.to_text().into_bytes();
        let mut point = p.clone();
        match rng.below(4) {
            0 | 1 => {
                let i = rng.below(text.len());
                text[i] = b"0123456789abcdef:,-prf"[rng.below(22)];
            }
            2 => point.out = (p.out as i64 + rng.below(64) as i64 - 32).max(1) as u64,
            _ => {
                point.artifact_offset = (p.artifact_offset as i64 + rng.below(16) as i64 - 8) as u64
            }
        }
        let Some(state) = ZstdState::from_text(std::str::from_utf8(&text).unwrap()) else {
            continue;
        };
        parsed += 1;
        point.state = state;
        if point.out as usize > data.len() || point.artifact_offset as usize > stream.len() {
            continue;
        }
        if let Ok((rest, hash)) = resume(&stream, &data, &point) {
            let image = [&data[..point.out as usize], &rest[..]].concat();
            if image != data && hash == whole {
                wrong.push(format!("round {round}: {}", point.state.to_text()));
            }
        }
    }
    assert!(parsed > 50, "{parsed} states parsed");
    assert!(wrong.is_empty(), "{wrong:#?}");
}

/// A slot prefix fed in pieces of every size keeps exactly its last window bytes (a ring of
/// the window's size: no quadratic moving of an 8 MiB tail, no second copy of it).
#[test]
fn a_resume_prefix_keeps_exactly_the_window_whatever_the_pieces() {
    let out = 20u64 << 20;
    let at = ResumeAt {
        artifact_offset: 1,
        out,
        state: ZstdState::from_text("frame:1000:8388608:-:8010:p:p:p:1,4,8").expect("parses"),
    };
    let data: Vec<u8> = (0..out as usize + 5000).map(|i| (i % 251) as u8).collect();
    let mut prefix = ResumePrefix::new(&at);
    let mut fed = 0usize;
    for size in [1usize, 4095, 4096, 100_000, 9 << 20].into_iter().cycle() {
        if fed >= data.len() {
            break;
        }
        let end = (fed + size).min(data.len());
        // Bytes past the point are ignored.
        prefix.update(&data[fed..end]);
        fed = end;
    }
    assert_eq!(
        prefix.window(),
        &data[out as usize - (8 << 20)..out as usize]
    );
    assert!(
        prefix.tail.capacity() < (9 << 20),
        "{}",
        prefix.tail.capacity()
    );
}

/// The point between two frames when the first one's last block fits in one read: the
/// decoder hands out the block, and the call that takes the checksum (limited to it, a point
/// being wanted) ends the frame with no output, so no boundary is reported there.
#[test]
fn review_bug_a_point_between_frames_after_a_short_last_block() {
    let a = image(2 * 131_072 + 100, 51);
    let b = image(300_000, 52);
    let mut stream = compress_streamed(&a, 3);
    stream.extend_from_slice(&compress_streamed(&b, 3));
    let (out, points) = decode_with_points(&stream, 0);
    assert!(out == [a.clone(), b].concat());
    assert!(
        points
            .iter()
            .any(|p| p.state == ZstdState::Between && p.out == a.len() as u64),
        "no point between the frames: {:?}",
        points.iter().map(|p| p.out).collect::<Vec<_>>()
    );
}

/// A long periodic run (a fill pattern) in the middle of an image: its blocks use only
/// repeat offsets, so the captured ones never learn all three, the follower gives up after
/// MAX_TRIES blocks and the rest of the frame (the image after the run) has no points. (A run
/// of one byte is fine: those are RLE blocks.)
#[test]
fn review_bug_points_after_a_long_fill_pattern() {
    let head = image(1 << 20, 53);
    let tail = image(2 << 20, 54);
    let fill: Vec<u8> = b"\xde\xad\xbe\xef\x00\x00\x01"
        .iter()
        .copied()
        .cycle()
        .take(4 << 20)
        .collect();
    let data = [head, fill, tail].concat();
    let stream = compress_streamed(&data, 3);
    let (out, points) = decode_with_points(&stream, 256 << 10);
    assert!(out == data);
    let after = points
        .iter()
        .filter(|p| p.out > (5 << 20) + (128 << 10))
        .count();
    assert!(
        after >= 4,
        "{after} points in the 2 MiB after the fill; all at {:?}",
        points.iter().map(|p| p.out).collect::<Vec<_>>()
    );
}

/// Random damage to the stream after a point: a resume fails, or gives what a fresh decode
/// of the damaged stream gives (never a panic, a hang, or an image a fresh decode refuses).
#[test]
fn review_fuzz_damage_after_a_point_resumes_like_a_fresh_decode() {
    let data = image(600_000, 59);
    let mut base = compress(&data, 3, true);
    base.extend_from_slice(&compress_streamed(&data[..100_000], 1));
    // A skippable frame last: damage in it changes nothing.
    base.extend_from_slice(&[0x5f, 0x2a, 0x4d, 0x18, 200, 0, 0, 0]);
    base.extend_from_slice(&[0x33; 200]);
    let data = [&data[..], &data[..100_000]].concat();
    let (_, points) = decode_with_points(&base, 0);
    let inside: Vec<_> = points
        .iter()
        .filter(|p| matches!(p.state, ZstdState::InFrame(_)))
        .collect();
    let mut rng = Rng(0x0123_4567_89ab_cdef);
    let mut bad = Vec::new();
    let mut resumed_ok = 0;
    for round in 0..300 {
        let p = inside[rng.below(inside.len())];
        let mut s = base.clone();
        let from = p.artifact_offset as usize;
        match rng.below(4) {
            3 => {
                let i = s.len() - 1 - rng.below(200);
                s[i] = rng.next() as u8;
            }
            0 => {
                // Near the point: the next block's header and tables.
                let i = from + rng.below(64);
                s[i] = rng.next() as u8;
            }
            1 => {
                let i = from + rng.below(s.len() - from);
                s[i] ^= 1 << rng.below(8);
            }
            _ => s.truncate(from + rng.below(s.len() - from)),
        }
        let Ok((rest, _)) = resume(&s, &data, p) else {
            continue;
        };
        resumed_ok += 1;
        match reader_decode(&s) {
            Ok(fresh) if fresh[p.out as usize..] == rest[..] => {}
            other => bad.push(format!(
                "round {round} at {}: resumed {} bytes, fresh {:?}",
                p.out,
                rest.len(),
                other.map(|f| f.len())
            )),
        }
    }
    assert!(resumed_ok > 20, "{resumed_ok} damaged streams resumed");
    assert!(bad.is_empty(), "{bad:#?}");
}

/// A block that repeats a sequence table the frame never set: a fresh decode refuses it
/// (libzstd: no previous table), a resume after a block without sequences takes the
/// dictionary's stand-in (`Table::Unset` becomes the predefined table) and decodes it.
#[test]
fn review_bug_resume_accepts_a_repeated_table_the_frame_never_set() {
    let mut rng = Rng(0x5851_f42d_4c95_7f2d);
    let noise: Vec<u8> = (0..131_072).map(|_| (rng.next() >> 24) as u8).collect();
    // Few sequences: the encoder takes a predefined table for at least one of them.
    let (data, mut stream, second, lit, seq, t) = [200usize, 500, 1000, 3000, 10_000]
        .into_iter()
        .find_map(|len| {
            let data = [&noise[..], &image(len, 61)[..]].concat();
            let stream = compress_streamed(&data, 3);
            // Frame header: magic, descriptor, window (no content size, no dictionary).
            assert_eq!(stream[4] & 0xe3, 0);
            let h = |at: usize| {
                u32::from(stream[at])
                    | (u32::from(stream[at + 1]) << 8)
                    | (u32::from(stream[at + 2]) << 16)
            };
            let first = 6;
            assert_eq!((h(first) >> 1) & 3, 0, "the noise is a raw block");
            let second = first + 3 + (h(first) >> 3) as usize;
            assert_eq!((h(second) >> 1) & 3, 2, "the text is a compressed block");
            let body = &stream[second + 3..second + 3 + (h(second) >> 3) as usize];
            let lit = follow::literals(body).expect("literals");
            let seq = follow::sequences(&body[lit.len..]).expect("sequences");
            let t = (0..3).find(|&t| seq.tables[t] == Some(Table::Predefined))?;
            (seq.count > 0).then_some((data, stream.clone(), second, lit, seq, t))
        })
        .expect("a second block with a predefined table");
    let modes_at = second + 3 + lit.len + seq.modes_at;
    stream[modes_at] |= 3 << (6 - 2 * t);
    assert!(reader_decode(&stream).is_err(), "ZstdReader refuses it");
    let (_, points, err) = decode_until_error(&stream);
    assert!(err.is_some(), "a fresh decode refuses it");
    let p = points
        .iter()
        .find(|p| p.out == 131_072)
        .expect("a point after the raw block");
    match resume(&stream, &data, p) {
        Err(_) => {}
        Ok((rest, _)) => panic!(
            "a resume decodes what a fresh decode refuses ({} bytes)",
            rest.len()
        ),
    }
}

/// Matches 6 MiB back in an 8 MiB window (long distance matching): repeat offsets of
/// millions, dictionaries of the whole 8 MiB window.
#[test]
fn review_long_offsets_in_an_8_mib_window_resume() {
    let mut rng = Rng(0x6a09_e667_f3bc_c909);
    let noise: Vec<u8> = (0..6 << 20).map(|_| (rng.next() >> 32) as u8).collect();
    let data = [
        &noise[..],
        &noise[..1 << 20],
        &image(300_000, 67)[..],
        &noise[2 << 20..3 << 20],
    ]
    .concat();
    let mut e = zstd::stream::Encoder::new(Vec::new(), 3).expect("encoder");
    e.include_checksum(true).expect("checksum");
    e.set_parameter(zstd::zstd_safe::CParameter::WindowLog(23))
        .expect("window log");
    e.set_parameter(zstd::zstd_safe::CParameter::EnableLongDistanceMatching(
        true,
    ))
    .expect("ldm");
    io::Write::write_all(&mut e, &data).expect("write");
    let stream = e.finish().expect("finish");
    assert!(
        stream.len() < data.len() - (1 << 20),
        "the copies were found"
    );
    let (out, points) = decode_with_points(&stream, 0);
    assert!(out == data);
    let whole = <[u8; 32]>::from(Sha256::digest(&stream));
    let far: Vec<_> = points
        .iter()
        .filter(|p| p.out > 6 << 20)
        .filter(|p| matches!(&p.state, ZstdState::InFrame(f) if f.reps[0] > 1 << 20))
        .collect();
    assert!(!far.is_empty(), "no point with a repeat offset above 1 MiB");
    for p in far.iter().step_by(3) {
        let (rest, hash) = resume(&stream, &data, p).expect("resume");
        assert!(rest == data[p.out as usize..], "at {}", p.out);
        assert_eq!(hash, whole);
    }
}

/// The blocks right after points do repeat the Huffman table (treeless literals) and
/// sequence tables (repeat mode) from the dictionary, and those points resume.
#[test]
fn review_points_before_treeless_literals_and_repeated_tables_resume() {
    // Homogeneous text: the encoder keeps its Huffman table from block to block.
    let data: Vec<u8> = (0..1_500_000u32)
        .map(|i| b"abcdefgh\n"[(i.wrapping_mul(i) % 9) as usize])
        .collect();
    let (mut treeless, mut repeated) = (0, 0);
    for level in [1, 3, 12, 19] {
        let stream = compress_streamed(&data, level);
        let (_, points) = decode_with_points(&stream, 0);
        let whole = <[u8; 32]>::from(Sha256::digest(&stream));
        for p in points
            .iter()
            .filter(|p| matches!(p.state, ZstdState::InFrame(_)))
        {
            let at = p.artifact_offset as usize;
            let h = u32::from(stream[at])
                | (u32::from(stream[at + 1]) << 8)
                | (u32::from(stream[at + 2]) << 16);
            if (h >> 1) & 3 != 2 {
                continue;
            }
            let body = &stream[at + 3..at + 3 + (h >> 3) as usize];
            let lit = follow::literals(body).expect("literals");
            let seq = follow::sequences(&body[lit.len..]).expect("sequences");
            let t = body[0] & 3 == 3;
            let r = seq.count > 0 && seq.tables.iter().any(Option::is_none);
            if !(t || r) {
                continue;
            }
            treeless += usize::from(t);
            repeated += usize::from(r);
            let (rest, hash) = resume(&stream, &data, p).expect("resume");
            assert!(rest == data[p.out as usize..], "level {level} at {}", p.out);
            assert_eq!(hash, whole);
        }
    }
    assert!(
        treeless > 0 && repeated > 0,
        "{treeless} treeless, {repeated} repeated"
    );
}
