use super::*;
use lzma_rust2::{Lzma2Options, Lzma2Writer};

/// Compressible text, runs, stretches of noise (stored chunks) and repeats far back.
fn sample(len: usize) -> Vec<u8> {
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        match state % 5 {
            0 => out.extend((0..3000).map(|i| (i * 7 + (state >> 32) as usize) as u8)),
            1 => {
                for _ in 0..2000 {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    out.push(b"lorem ipsum dolor sit amet\n"[(state % 27) as usize]);
                }
            }
            2 => out.extend(std::iter::repeat_n(state as u8, 700)),
            3 if out.len() > 10_000 => {
                let from = (state >> 8) as usize % (out.len() - 5000);
                out.extend_from_within(from..from + 5000);
            }
            _ => out.extend((0..2500).map(|i| (state >> (i % 57)) as u8 ^ i as u8)),
        }
    }
    out.truncate(len);
    out
}

fn lzma2(data: &[u8], options: Lzma2Options) -> Vec<u8> {
    let mut writer = Lzma2Writer::new(Vec::new(), options);
    io::Write::write_all(&mut writer, data).unwrap();
    writer.finish().unwrap()
}

fn options(preset: u32, dict_size: u32, (lc, lp, pb): (u32, u32, u32)) -> Lzma2Options {
    let mut options = Lzma2Options::with_preset(preset);
    options.lzma_options.dict_size = dict_size;
    (
        options.lzma_options.lc,
        options.lzma_options.lp,
        options.lzma_options.pb,
    ) = (lc, lp, pb);
    options
}

/// Decode `data` with reads of `buf` bytes; checks the counters at the end.
fn unlzma2(data: &[u8], dict_size: u64, buf: usize) -> io::Result<Vec<u8>> {
    let mut reader = Lzma2Reader::new(data, dict_size);
    let mut out = Vec::new();
    let mut chunk = vec![0u8; buf];
    loop {
        let n = reader.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&chunk[..n]);
    }
    assert!(reader.ended());
    assert_eq!(
        reader.compressed(),
        data.len() as u64,
        "the data's every byte"
    );
    assert_eq!(reader.uncompressed(), out.len() as u64);
    Ok(out)
}

#[test]
fn lzma2_decodes_what_lzma_rust2_encodes_at_presets_and_properties() {
    let data = sample(300_000);
    for preset in [0, 1, 6, 9] {
        for props in [
            (3, 0, 2),
            (0, 0, 0),
            (0, 4, 0),
            (4, 0, 4),
            (1, 3, 1),
            (2, 2, 3),
        ] {
            // A dictionary smaller than the data: distances across its wrap-around.
            for dict in [4096u32, 1 << 16, 1 << 20] {
                let packed = lzma2(&data, options(preset, dict, props));
                let out = unlzma2(&packed, u64::from(dict), 1 << 16).unwrap();
                assert!(out == data, "preset {preset} props {props:?} dict {dict}");
            }
        }
    }
}

#[test]
fn lzma2_any_read_size_gives_the_same_bytes() {
    let data = sample(200_000);
    let packed = lzma2(&data, options(6, 1 << 14, (3, 0, 2)));
    for buf in [1, 2, 7, 273, 4095, 4096, 100_000, 3 << 20] {
        assert!(
            unlzma2(&packed, 1 << 14, buf).unwrap() == data,
            "buffer {buf}"
        );
    }
}

#[test]
fn lzma2_decodes_what_the_xz_tool_writes() {
    use std::process::{Command, Stdio};
    let data = sample(3 << 20);
    for (filter, dict) in [
        ("preset=6,dict=1MiB", 1 << 20),
        ("preset=0,dict=64KiB,lc=0,lp=2,pb=0", 64 << 10),
        ("preset=9e,dict=8MiB,lc=4,lp=0,pb=4", 8 << 20),
        ("preset=3,dict=4KiB,lc=1,lp=1,pb=1", 4 << 10),
    ] {
        let child = Command::new("xz")
            .args(["--format=raw", &format!("--lzma2={filter}"), "-c"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            eprintln!("no xz tool: skipped");
            return;
        };
        let mut stdin = child.stdin.take().unwrap();
        let input = data.clone();
        let writer = std::thread::spawn(move || io::Write::write_all(&mut stdin, &input));
        let packed = child.wait_with_output().unwrap();
        writer.join().unwrap().unwrap();
        assert!(packed.status.success());
        let out = unlzma2(&packed.stdout, dict, 1 << 16).expect(filter);
        assert!(out == data, "{filter}");
    }
}

/// The first chunk of `packed` (an LZMA chunk with properties): its control byte and sizes.
fn first_chunk(packed: &[u8]) -> (u8, usize, usize) {
    let control = packed[0];
    assert!(control >= 0xe0, "{control:#x}");
    let unpacked = (usize::from(control & 0x1f) << 16)
        + usize::from(u16::from_be_bytes([packed[1], packed[2]]))
        + 1;
    let compressed = usize::from(u16::from_be_bytes([packed[3], packed[4]])) + 1;
    (control, unpacked, compressed)
}

fn refused(packed: &[u8], dict: u64) -> String {
    let err = unlzma2(packed, dict, 1 << 16).expect_err("refused");
    assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
    err.to_string()
}

#[test]
fn lzma2_truncated_data_is_refused_everywhere() {
    let data = sample(30_000);
    let packed = lzma2(&data, options(6, 1 << 16, (3, 0, 2)));
    for len in 0..packed.len() {
        refused(&packed[..len], 1 << 16);
    }
}

#[test]
fn lzma2_flipped_bytes_give_an_error_or_bytes_never_a_panic() {
    let data = sample(12_000);
    for (props, dict) in [((3, 0, 2), 4096u32), ((0, 4, 0), 1 << 16)] {
        let packed = lzma2(&data, options(6, dict, props));
        let mut refusals = 0;
        for at in 0..packed.len() {
            for flip in [0x01u8, 0x80, 0xff] {
                let mut bad = packed.clone();
                bad[at] ^= flip;
                let mut reader = Lzma2Reader::new(&bad[..], u64::from(dict));
                let mut out = Vec::new();
                match reader.read_to_end(&mut out) {
                    Err(e) => {
                        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
                        refusals += 1;
                    }
                    Ok(_) => assert!(out.len() <= bad.len() * 300),
                }
            }
        }
        // The range coder's final code and the chunks' sizes catch nearly every flip.
        assert!(
            refusals * 10 > packed.len() * 3 * 9,
            "{refusals} of {}",
            packed.len() * 3
        );
    }
}

#[test]
fn lzma2_chunks_liblzma_refuses_are_refused() {
    let data = sample(50_000);
    let packed = lzma2(&data, options(6, 1 << 16, (3, 0, 2)));
    let (control, unpacked, compressed) = first_chunk(&packed);
    assert!(unlzma2(&packed, 1 << 16, 4096).unwrap() == data);
    let with = |at: usize, byte: u8| {
        let mut bad = packed.clone();
        bad[at] = byte;
        bad
    };
    assert!(refused(&with(0, 3), 1 << 16).contains("control byte 0x03"));
    // No dictionary reset first: a state reset with properties, one without, stored bytes.
    for first in [0xc0 | (control & 0x1f), 0xa0 | (control & 0x1f), 0x02] {
        assert!(refused(&with(0, first), 1 << 16).contains("does not reset"));
    }
    // lc + lp above 4, pb above 4, no such byte.
    for props in [(2 * 9 + 3) as u8, (5 * 5 * 9) as u8, 0xff] {
        assert!(refused(&with(5, props), 1 << 16).contains("properties"));
    }
    // The range coder's first byte.
    assert!(refused(&with(6, 1), 1 << 16).contains("non-zero"));
    // Fewer than 5 compressed bytes.
    assert!(refused(&[0xe0, 0, 0, 0, 3, 0x5d, 0, 0, 0, 0, 0], 1 << 16).contains("4 compressed"));
    // Sizes that lie: one compressed byte more (an extra byte) or less, one output byte more
    // or less.
    let sized = |unpacked: usize, compressed_len: usize, body: &[u8]| {
        let mut bad = vec![
            control & 0xe0 | ((unpacked - 1) >> 16) as u8,
            ((unpacked - 1) >> 8) as u8,
            (unpacked - 1) as u8,
            ((compressed_len - 1) >> 8) as u8,
            (compressed_len - 1) as u8,
            packed[5],
        ];
        bad.extend_from_slice(body);
        bad.extend_from_slice(&packed[6 + compressed..]);
        bad
    };
    let body = &packed[6..6 + compressed];
    assert!(unlzma2(&sized(unpacked, compressed, body), 1 << 16, 4096).unwrap() == data);
    let mut longer = body.to_vec();
    longer.push(0);
    refused(&sized(unpacked, compressed + 1, &longer), 1 << 16);
    refused(
        &sized(unpacked, compressed - 1, &body[..compressed - 1]),
        1 << 16,
    );
    refused(&sized(unpacked + 1, compressed, body), 1 << 16);
    refused(&sized(unpacked - 1, compressed, body), 1 << 16);
    // After a stored chunk with a dictionary reset, an LZMA chunk must bring properties.
    let stored_first = [
        &[1u8, 0, 1, b'a', b'b', 0x80, 0, 0, 0, 4][..],
        &[0, 0, 0, 0, 0, 0],
    ]
    .concat();
    assert!(refused(&stored_first, 4096).contains("without properties"));
    // An empty block, stored chunks alone.
    assert_eq!(unlzma2(&[0], 4096, 10).unwrap(), b"");
    assert_eq!(
        unlzma2(&[1, 0, 1, b'a', b'b', 2, 0, 0, b'c', 0], 4096, 1).unwrap(),
        b"abc"
    );
}

/// A match whose distance reaches before the block's first byte, or past the dictionary.
#[test]
fn lzma2_distances_beyond_the_bytes_decoded_are_refused() {
    // 8 KiB, then its first 4 KiB again: a match 8 KiB back, beyond a 4 KiB dictionary.
    let mut data = sample(8192);
    data.extend_from_within(..4096);
    let packed = lzma2(&data, options(6, 1 << 16, (3, 0, 2)));
    assert!(unlzma2(&packed, 1 << 16, 4096).unwrap() == data);
    assert!(refused(&packed, 4096).contains("distance beyond"));
}

/// A [`ResumeWindow`] given the output in any pieces holds what a decoder's dictionary holds
/// after decoding it: the bytes since the last reset, each at its offset since the reset
/// modulo the dictionary's length (the rest zero), wrapped around or not.
#[test]
fn resume_window_holds_the_decoders_dictionary_for_any_pieces() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = |n: u64| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state % n
    };
    for dict_size in [0u64, 4096, 5000] {
        let len = dict_len(dict_size) as u64;
        let wraps = [len - 1, len, len + 1, 2 * len - 1, 2 * len, 3 * len + 7];
        for since_reset in [1, 100].into_iter().chain(wraps) {
            for before_reset in [0, 1, 3000, len, 5 * len + 3] {
                let total = since_reset + before_reset;
                let out: Vec<u8> = (0..total).map(|i| (i * 31 + i / 251) as u8).collect();
                let mut expected = vec![0u8; len as usize];
                for k in 0..since_reset {
                    expected[(k % len) as usize] = out[(before_reset + k) as usize];
                }
                for round in 0..6 {
                    let mut window = ResumeWindow::new(dict_size, since_reset, total);
                    let mut rest = &out[..];
                    while !rest.is_empty() {
                        let n = match round {
                            0 => rest.len(),
                            1 => 1,
                            _ => next(rest.len() as u64 + 1) as usize,
                        };
                        window.update(&rest[..n]);
                        rest = &rest[n..];
                    }
                    window.update(&[]);
                    assert_eq!(window.given(), total);
                    assert!(
                        window.dict == expected,
                        "dict {dict_size}, since_reset {since_reset}, total {total}, round {round}"
                    );
                }
            }
        }
    }
}
