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
        "frame:0:131072:-:-:p:p:p:1,4,8",
        "frame:0:131072:-:8010:-:p:p:1,4,8",
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
