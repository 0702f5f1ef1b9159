use super::*;
use lzma_rust2::{CheckType, FilterConfig, XzOptions};
use std::num::NonZeroU64;

fn xz_with(data: &[u8], options: XzOptions) -> Vec<u8> {
    let mut writer = lzma_rust2::XzWriter::new(Vec::new(), options).unwrap();
    io::Write::write_all(&mut writer, data).unwrap();
    writer.finish().unwrap()
}

fn xz(data: &[u8], dict_size: u32) -> Vec<u8> {
    let mut options = XzOptions::with_preset(1);
    options.lzma_options.dict_size = dict_size;
    xz_with(data, options)
}

/// `data` in blocks of `block` bytes (check CRC64, a small dictionary).
fn xz_blocks(data: &[u8], block: u64) -> Vec<u8> {
    let mut options = XzOptions::with_preset(1);
    options.lzma_options.dict_size = 1 << 16;
    options.block_size = NonZeroU64::new(block);
    xz_with(data, options)
}

/// Compressible text with stretches of noise (the encoder stores those uncompressed).
fn mixed(len: usize) -> Vec<u8> {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            if (i / 20_000) % 3 == 2 {
                state as u8
            } else {
                b"the quick brown fox\n"[(state % 20) as usize]
            }
        })
        .collect()
}

/// Several streams (every check type, filters before LZMA2, stream padding), many blocks
/// each, with stored chunks: every layout the decoder takes. Returns the file, its content
/// and its number of blocks.
fn layouts() -> (Vec<u8>, Vec<u8>, usize) {
    let data = mixed(300_000);
    let mut expected = Vec::new();
    let mut stream = Vec::new();
    let mut blocks = 0;
    let checks = [
        CheckType::None,
        CheckType::Crc32,
        CheckType::Crc64,
        CheckType::Sha256,
    ];
    for (i, check) in checks.into_iter().enumerate() {
        let mut options = XzOptions::with_preset(i as u32 * 2);
        options.check_type = check;
        options.lzma_options.dict_size = 1 << 16;
        options.block_size = NonZeroU64::new(50_000 + i as u64 * 30_000);
        if i == 1 {
            options.filters = vec![FilterConfig::new_delta(4)];
        }
        if i == 2 {
            options.filters = vec![FilterConfig::new_bcj_x86(0)];
        }
        let part = &data[i * 50_000..];
        let compressed = xz_with(part, options);
        blocks += block_offsets(&compressed).len();
        stream.extend(compressed);
        stream.extend_from_slice(&[0u8; 8]); // stream padding
        expected.extend_from_slice(part);
    }
    (stream, expected, blocks)
}

fn sha256(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Decode `stream` from its start, with reads of `buf` bytes; every block boundary from
/// output offset 1 on is reported. Returns the output and the boundaries.
fn decode_points(stream: &[u8], buf: usize) -> io::Result<(Vec<u8>, Vec<Boundary>)> {
    decode_points_with(stream, buf, false)
}

/// [`decode_points`], with points inside blocks too if `inside`.
fn decode_points_with(
    stream: &[u8],
    buf: usize,
    inside: bool,
) -> io::Result<(Vec<u8>, Vec<Boundary>)> {
    let mut decoder = XzDecoder::new(stream, Some(Sha256State::new()));
    decoder.boundaries_from(1);
    decoder.points_inside_blocks(inside);
    let mut out = Vec::new();
    let mut points = Vec::new();
    let mut chunk = vec![0u8; buf];
    loop {
        match decoder.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                let point = decoder.take_boundary().expect("stopped at a boundary");
                assert_eq!(point.out, out.len() as u64, "a point where the output is");
                points.push(point);
            }
            Err(e) => return Err(e),
        }
    }
    let hash = decoder.finish_hash().unwrap().finish_hex();
    assert_eq!(hash, sha256(stream), "the artifact hash covers every byte");
    Ok((out, points))
}

/// Decode `stream` as an install without resume points does.
fn unxz(stream: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    XzDecoder::new(stream, None).read_to_end(&mut out)?;
    Ok(out)
}

/// Continue decoding at `point` (the artifact from its byte); the rest of the output.
fn resume_at(stream: &[u8], point: &Boundary) -> io::Result<(Vec<u8>, String)> {
    let at = ResumeAt {
        artifact_offset: point.artifact_offset,
        out: point.out,
        state: point.state,
        in_block: None,
    };
    let source = &stream[point.artifact_offset as usize..];
    let mut decoder = XzDecoder::resume(source, &at, point.artifact_hash.clone())?;
    let mut out = Vec::new();
    decoder.read_to_end(&mut out)?;
    assert_eq!(decoder.output_offset(), point.out + out.len() as u64);
    Ok((out, decoder.finish_hash().unwrap().finish_hex()))
}

/// Offsets of the block headers of a one-stream xz file, from its index (not from the
/// block contents, which is what the decoder follows).
fn block_offsets(stream: &[u8]) -> Vec<usize> {
    let mut offsets = vec![12];
    for (unpadded, _) in records_of(stream) {
        offsets.push(offsets.last().unwrap() + unpadded.div_ceil(4) as usize * 4);
    }
    offsets.pop();
    offsets
}

#[test]
fn every_block_boundary_is_a_point_and_resumes_to_the_same_image() {
    let (stream, expected, blocks) = layouts();
    assert!(blocks >= 8, "{blocks}");
    for buf in [1, 7, 4096, 1 << 17] {
        let (out, points) = decode_points(&stream, buf).unwrap();
        assert!(out == expected, "buffer {buf}");
        // Every block but the first of the first stream.
        assert_eq!(points.len(), blocks - 1, "buffer {buf}");
        if buf != 4096 {
            continue;
        }
        for point in &points {
            let (rest, hash) = resume_at(&stream, point).unwrap();
            assert!(
                rest == expected[point.out as usize..],
                "resumed at {point:?}"
            );
            assert_eq!(hash, sha256(&stream));
        }
    }
    // Points of a later stream start at its first block.
    let (_, points) = decode_points(&stream, 4096).unwrap();
    assert!(points
        .iter()
        .any(|p| p.state.blocks == 0 && p.state.stream_start > 0));
    let checks: Vec<u8> = points.iter().map(|p| p.state.check).collect();
    for check in [0, 1, 4, 10] {
        assert!(checks.contains(&check), "{checks:?}");
    }
}

#[test]
fn points_are_where_the_index_puts_the_blocks() {
    let data = mixed(500_000);
    let stream = xz_blocks(&data, 64 << 10);
    let (out, points) = decode_points(&stream, 65536).unwrap();
    assert!(out == data);
    let offsets: Vec<u64> = points.iter().map(|p| p.artifact_offset).collect();
    let from_index: Vec<u64> = block_offsets(&stream)[1..]
        .iter()
        .map(|&o| o as u64)
        .collect();
    assert_eq!(offsets, from_index);
    for (i, p) in points.iter().enumerate() {
        assert_eq!(p.out, (i as u64 + 1) * (64 << 10));
        assert_eq!(p.state.blocks, i as u64 + 1);
        assert_eq!((p.state.stream_start, p.state.stream_out), (0, 0));
    }
    // Asked from a later offset, only the points from there are reported.
    let mut decoder = XzDecoder::new(stream.as_slice(), None);
    decoder.boundaries_from(200_000);
    let mut chunk = vec![0u8; 4096];
    let mut first = None;
    loop {
        match decoder.read(&mut chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                first = first.or(decoder.take_boundary());
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(first.map(|p| p.out), Some(4 * (64 << 10)));
}

#[test]
fn state_text_round_trips_and_odd_text_is_refused() {
    let state = XzState {
        stream_start: 1234,
        stream_out: 99,
        check: 10,
        blocks: 7,
    };
    assert_eq!(state.to_text(), "1234:99:10:7");
    assert_eq!(XzState::from_text(&state.to_text()), Some(state));
    for odd in ["", "1:2:3", "1:2:3:4:5", "1:2:300:4", "a:2:3:4", "-1:2:3:4"] {
        assert_eq!(XzState::from_text(odd), None, "{odd}");
    }
}

#[test]
fn points_the_decoder_cannot_make_are_refused_before_decoding() {
    let at = |artifact_offset, out, stream_start, blocks, check| ResumeAt {
        artifact_offset,
        out,
        state: XzState {
            stream_start,
            stream_out: 0,
            check,
            blocks,
        },
        in_block: None,
    };
    assert!(at(12 + 4000, 5000, 0, 1, 4).plausible());
    assert!(
        at(100 + 12, 5000, 100, 0, 1).plausible(),
        "a later stream's first block"
    );
    assert!(
        !at(12, 5000, 0, 0, 4).plausible(),
        "the artifact's first block"
    );
    assert!(
        !at(12 + 4000, 0, 0, 1, 4).plausible(),
        "no output before it"
    );
    assert!(
        !at(12 + 4001, 5000, 0, 1, 4).plausible(),
        "blocks are 4-aligned"
    );
    assert!(
        !at(12 + 4000, 5000, 0, 1, 2).plausible(),
        "an unsupported check"
    );
    assert!(
        !at(12 + 4000, 5000, 0, 400, 4).plausible(),
        "more blocks than bytes"
    );
    assert!(
        !at(8, 5000, 0, 1, 4).plausible(),
        "inside the stream header"
    );
    assert!(!at(112, 5000, 100, 1, 4).plausible(), "blocks in no bytes");
    let mut first_stream_after_output = at(12 + 4000, 5000, 0, 1, 4);
    first_stream_after_output.state.stream_out = 1000;
    assert!(
        !first_stream_after_output.plausible(),
        "the artifact's first stream starts the image"
    );
    let mut stream_out_after = at(12 + 4000, 5000, 0, 1, 4);
    stream_out_after.state.stream_out = 6000;
    assert!(!stream_out_after.plausible());
    let err = XzDecoder::resume(&b""[..], &at(12, 5000, 0, 0, 4), None)
        .err()
        .unwrap();
    assert!(err.to_string().contains("not a block boundary"), "{err}");
}

/// A point moved to another block, or with offsets that do not fit the stream, fails at the
/// stream's index at the latest: it never makes a wrong image pass.
#[test]
fn a_forged_point_fails_at_the_index() {
    let data = mixed(400_000);
    let stream = xz_blocks(&data, 50_000);
    let (_, points) = decode_points(&stream, 8192).unwrap();
    assert!(points.len() >= 6);
    let genuine = &points[2];
    let forged = [
        // Another block's offsets, this one's block count.
        Boundary {
            artifact_offset: points[3].artifact_offset,
            out: points[3].out,
            ..genuine.clone()
        },
        // This block, another output offset (the slot prefix would be a different length).
        Boundary {
            out: genuine.out + 50_000,
            ..genuine.clone()
        },
        // This block, one block fewer before it.
        Boundary {
            state: XzState {
                blocks: genuine.state.blocks - 1,
                ..genuine.state
            },
            ..genuine.clone()
        },
    ];
    for point in &forged {
        let hash = point.artifact_hash.clone().map(|_| {
            let mut h = Sha256State::new();
            h.update(&stream[..point.artifact_offset as usize]);
            h
        });
        let point = Boundary {
            artifact_hash: hash,
            ..point.clone()
        };
        let err = resume_at(&stream, &point).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{point:?}");
        assert!(err.to_string().contains("index"), "{err}");
    }
    // The stream moved in the output, alone or with the point (then the index's sums still
    // fit): the artifact's first stream has no output before it.
    for (out, stream_out) in [(genuine.out, 4), (genuine.out + 4096, 4096)] {
        let moved = Boundary {
            out,
            state: XzState {
                stream_out,
                ..genuine.state
            },
            ..genuine.clone()
        };
        let err = resume_at(&stream, &moved).map(|r| r.0.len()).unwrap_err();
        assert!(err.to_string().contains("not a block boundary"), "{err}");
    }
    // Not at a block header at all: the first block's header is somewhere else.
    let inside = Boundary {
        artifact_offset: genuine.artifact_offset + 4,
        ..genuine.clone()
    };
    assert!(resume_at(&stream, &inside).is_err());
}

/// Every single-byte change of a file with block checks is refused (or, where a byte does
/// not matter, decodes to the same image): never a different image.
#[test]
fn damaged_files_never_give_a_wrong_image() {
    let data = mixed(12_000);
    let mut options = XzOptions::with_preset(1);
    options.lzma_options.dict_size = 1 << 16;
    options.block_size = NonZeroU64::new(4_000);
    options.check_type = CheckType::Crc32;
    let stream = xz_with(&data, options);
    for at in 0..stream.len() {
        for flip in [0x01u8, 0x80] {
            let mut damaged = stream.clone();
            damaged[at] ^= flip;
            if let Ok(out) = unxz(&damaged) {
                assert!(out == data, "byte {at} ^ {flip:#x} gave a different image");
            }
        }
    }
    // Cut short anywhere: an error, never a shorter image.
    for len in 0..stream.len() {
        assert!(unxz(&stream[..len]).is_err(), "cut at {len}");
    }
    // Garbage after the last stream, and padding that is not four zeros.
    let mut more = stream.clone();
    more.extend_from_slice(b"junk");
    assert!(unxz(&more)
        .unwrap_err()
        .to_string()
        .contains("not an xz stream"));
    let mut odd = stream.clone();
    odd.extend_from_slice(&[0, 0]);
    assert!(unxz(&odd)
        .unwrap_err()
        .to_string()
        .contains("multiple of four"));
}

/// What `xz` writes for no input (CRC64): a stream of no blocks.
const EMPTY_STREAM: [u8; 32] = [
    0xfd, 0x37, 0x7a, 0x58, 0x5a, 0x00, 0x00, 0x04, 0xe6, 0xd6, 0xb4, 0x46, 0x00, 0x00, 0x00, 0x00,
    0x1c, 0xdf, 0x44, 0x21, 0x1f, 0xb6, 0xf3, 0x7d, 0x01, 0x00, 0x00, 0x00, 0x00, 0x04, 0x59, 0x5a,
];

#[test]
fn an_empty_stream_and_an_empty_artifact() {
    let empty = EMPTY_STREAM;
    assert_eq!(unxz(&empty).unwrap(), b"");
    let (out, points) = decode_points(&empty, 4096).unwrap();
    assert!(out.is_empty() && points.is_empty());
    let err = unxz(&[]).unwrap_err();
    assert!(
        err.to_string().contains("ends inside a stream header"),
        "{err}"
    );
}

#[test]
fn an_xz_dictionary_above_the_cap_is_refused() {
    let data = vec![7u8; 10_000];
    for ok in [4096, 8 << 20, 64 << 20] {
        assert_eq!(unxz(&xz(&data, ok)).unwrap(), data);
    }
    let err = unxz(&xz(&data, 96 << 20)).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(
        err.to_string()
            .contains("block 1 asks for a 100663296-byte dictionary"),
        "{err}"
    );
    // A hostile header: 4 GiB - 1 (property byte 40), as a forger would write it.
    let mut hostile = xz(&data, 4096);
    let props_at = (12..24)
        .find(|&i| hostile[i] == 0x21 && hostile[i + 1] == 1)
        .unwrap()
        + 2;
    hostile[props_at] = 40;
    let err = unxz(&hostile).unwrap_err();
    assert!(err.to_string().contains("4294967295-byte"), "{err}");
}

/// A later block's header is checked too (lzma-rust2 would allocate what it asks for as
/// soon as it reaches it): here the second block of a genuine multi-block stream asks for
/// 96 MiB, with a correct header CRC, so the decoder alone would take it.
#[test]
fn a_huge_dictionary_in_a_later_block_is_refused_before_it_is_allocated() {
    let data = mixed(200_000);
    let mut options = XzOptions::with_preset(1);
    options.lzma_options.dict_size = 4096;
    options.block_size = NonZeroU64::new(64 << 10);
    let mut stream = xz_with(&data, options);
    let blocks = block_offsets(&stream);
    assert!(blocks.len() >= 3, "{blocks:?}");
    let second = blocks[1];
    let header_len = (usize::from(stream[second]) + 1) * 4;
    let props_at = (second + 2..second + header_len)
        .find(|&i| stream[i] == 0x21 && stream[i + 1] == 1)
        .unwrap()
        + 2;
    stream[props_at] = 29; // 3 << 25: 96 MiB
    let crc_at = second + header_len - 4;
    let crc = crc32(0, &stream[second..crc_at]);
    stream[crc_at..crc_at + 4].copy_from_slice(&crc.to_le_bytes());
    // The crafted stream is valid: lzma-rust2 alone decodes it (allocating 96 MiB).
    let mut plain = Vec::new();
    lzma_rust2::XzReader::new(stream.as_slice(), true)
        .read_to_end(&mut plain)
        .unwrap();
    assert!(plain == data);

    let err = unxz(&stream).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    assert!(
        err.to_string()
            .contains("block 2 asks for a 100663296-byte dictionary"),
        "{err}"
    );
}

#[test]
fn an_index_that_does_not_list_the_blocks_is_refused() {
    let stream = xz_blocks(&mixed(100_000), 30_000);
    assert!(unxz(&stream).is_ok());
    let blocks = block_offsets(&stream).len();
    assert!((2..5).contains(&blocks), "{blocks}");
    // The index starts `backward size` bytes before the 12-byte stream footer: its
    // indicator (0), then the record count (one byte).
    let footer = stream.len() - 12;
    let backward = u32::from_le_bytes(stream[footer + 4..footer + 8].try_into().unwrap());
    let index = footer - (backward as usize + 1) * 4;
    assert_eq!(&stream[index..index + 2], &[0, blocks as u8]);
    let mut more = stream.clone();
    more[index + 1] = 5;
    let err = unxz(&more).unwrap_err();
    let wanted = format!("lists 5 records for {blocks} blocks");
    assert!(err.to_string().contains(&wanted), "{err}");
    // A count the decoder would reserve hundreds of GiB for never reaches it.
    let mut huge = stream.clone();
    huge.splice(index + 1..index + 2, [0xff, 0xff, 0xff, 0xff, 0x7f]);
    let err = unxz(&huge).unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("34359738367 records for {blocks} blocks")),
        "{err}"
    );
    // A record's sizes changed, with the index's CRC made right again: the records no
    // longer match the blocks decoded.
    let mut sizes = stream.clone();
    let first_record = index + 2;
    sizes[first_record] ^= 4; // the unpadded size's low byte
    let crc_at = footer - 4;
    let crc = crc32(0, &sizes[index..crc_at]);
    sizes[crc_at..footer].copy_from_slice(&crc.to_le_bytes());
    let err = unxz(&sizes).unwrap_err();
    assert!(
        err.to_string()
            .contains("does not match the stream's blocks"),
        "{err}"
    );
}

#[test]
fn later_streams_are_checked_like_the_first() {
    let (mut stream, expected, _) = layouts();
    assert!(unxz(&stream).unwrap() == expected);
    // Still checking in the last stream: its first block asks for too much.
    stream.extend(xz(b"more", 96 << 20));
    let err = unxz(&stream).unwrap_err();
    assert!(err.to_string().contains("100663296-byte"), "{err}");
}

/// The LZMA2 data (chunks and end marker) of `data` compressed as one xz block.
fn lzma2_of(data: &[u8]) -> Vec<u8> {
    let mut options = XzOptions::with_preset(1);
    options.check_type = CheckType::None;
    let stream = xz_with(data, options);
    assert_eq!(block_offsets(&stream), [12], "one block");
    let header = (usize::from(stream[12]) + 1) * 4;
    // The index's one record: unpadded size (header and data, no check).
    let unpadded = records_of(&stream)[0].0 as usize;
    stream[12 + header..12 + unpadded].to_vec()
}

/// A stream (check CRC32) of one block made by hand: block header flags `flags` (its filter
/// count and size bits), then `fields` (sizes and filter flags as they go in the header),
/// `lzma2` as the block's data, `content` what it decodes to (for the check and the index).
fn hand_made(flags: u8, fields: &[u8], lzma2: &[u8], content: &[u8]) -> Vec<u8> {
    let mut header = vec![0, flags];
    header.extend_from_slice(fields);
    while !header.len().is_multiple_of(4) {
        header.push(0);
    }
    header[0] = ((header.len() + 4) / 4 - 1) as u8;
    header.extend_from_slice(&crc32(0, &header).to_le_bytes());
    let mut stream = MAGIC.to_vec();
    stream.extend_from_slice(&[0, 1]);
    stream.extend_from_slice(&crc32(0, &[0, 1]).to_le_bytes());
    let unpadded = (header.len() + lzma2.len() + 4) as u64;
    stream.extend(header);
    stream.extend_from_slice(lzma2);
    while !stream.len().is_multiple_of(4) {
        stream.push(0);
    }
    stream.extend_from_slice(&crc32(0, content).to_le_bytes());
    let mut index = vec![0];
    for value in [1, unpadded, content.len() as u64] {
        put_varint(&mut index, value);
    }
    while !index.len().is_multiple_of(4) {
        index.push(0);
    }
    index.extend_from_slice(&crc32(0, &index).to_le_bytes());
    let mut footer = ((index.len() / 4 - 1) as u32).to_le_bytes().to_vec();
    footer.extend_from_slice(&[0, 1]);
    stream.extend(index);
    stream.extend_from_slice(&crc32(0, &footer).to_le_bytes());
    stream.extend(footer);
    stream.extend_from_slice(&FOOTER_MAGIC);
    stream
}

/// The error decoding `stream` gives (it must give one).
fn refused(stream: &[u8]) -> io::Error {
    unxz(stream).map(|out| out.len()).unwrap_err()
}

/// LZMA2 with a 64 KiB dictionary, as a block header's filter flags.
const LZMA2_FILTER: [u8; 3] = [0x21, 1, 8];

/// The sizes a block header declares are the block's (liblzma refuses a block whose data
/// does not match them, and `xz -T` writes them in every block header).
#[test]
fn a_block_header_whose_sizes_lie_is_refused() {
    let content = mixed(30_000);
    let lzma2 = lzma2_of(&content);
    let with_sizes = |compressed: u64, uncompressed: u64| {
        let mut fields = Vec::new();
        put_varint(&mut fields, compressed);
        put_varint(&mut fields, uncompressed);
        fields.extend_from_slice(&LZMA2_FILTER);
        hand_made(0xc0, &fields, &lzma2, &content)
    };
    let (compressed, len) = (lzma2.len() as u64, content.len() as u64);
    assert!(unxz(&with_sizes(compressed, len)).unwrap() == content);
    for (c, u) in [
        (compressed + 4, len),
        (compressed - 1, len),
        (compressed, len + 1),
        (compressed, len - 1),
    ] {
        let err = refused(&with_sizes(c, u));
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{c} {u}");
        assert!(
            err.to_string().contains("its header declares"),
            "{c} {u}: {err}"
        );
    }
    // Only one of them given.
    let mut fields = Vec::new();
    put_varint(&mut fields, len + 7);
    fields.extend_from_slice(&LZMA2_FILTER);
    refused(&hand_made(0x80, &fields, &lzma2, &content));
}

/// liblzma refuses a block header with a reserved flag bit set, and an LZMA2 filter that is
/// not the last (lzma-rust2 would chain two LZMA2 decoders).
#[test]
fn block_headers_liblzma_refuses_are_refused() {
    let content = mixed(20_000);
    let lzma2 = lzma2_of(&content);
    assert!(unxz(&hand_made(0, &LZMA2_FILTER, &lzma2, &content)).unwrap() == content);
    // LZMA2 twice: the block's data is an LZMA2 stream of an LZMA2 stream of `image`, made
    // to be as long as `image` so that the sizes the block's chunks add up to are its
    // output's. An LZMA chunk of zeros, then `k` stored one-byte chunks, then the end.
    let (image, inner) = (1..200)
        .find_map(|zeros| {
            let zeros_lzma2 = lzma2_of(&vec![0u8; zeros]);
            let packed = &zeros_lzma2[..zeros_lzma2.len() - 1];
            (packed[0] >= 0xe0)
                .then(|| (zeros + 1).checked_sub(packed.len() + 2))
                .flatten()
                .filter(|gap| gap % 3 == 0)
                .map(|gap| {
                    let k = gap / 3;
                    let mut image = vec![0u8; zeros];
                    let mut inner = packed.to_vec();
                    for i in 0..k {
                        image.push(i as u8 | 1);
                        inner.extend_from_slice(&[2, 0, 0, i as u8 | 1]);
                    }
                    inner.push(0);
                    (image, inner)
                })
        })
        .unwrap();
    assert_eq!(inner.len(), image.len());
    // lzma-rust2 takes the outer end marker for block padding: it decodes such a block only
    // when the outer chunks end 3 bytes after a multiple of four (the header is one).
    let pieces = (1..=4).find(|j| (3 * j + inner.len()) % 4 == 3).unwrap();
    let mut outer = Vec::new();
    for (i, piece) in inner.chunks(inner.len().div_ceil(pieces)).enumerate() {
        outer.push(if i == 0 { 1 } else { 2 });
        outer.extend_from_slice(&((piece.len() - 1) as u16).to_be_bytes());
        outer.extend_from_slice(piece);
    }
    assert_eq!(outer.len() % 4, 3);
    outer.push(0);
    let mut filters = LZMA2_FILTER.to_vec();
    filters.extend_from_slice(&LZMA2_FILTER);
    let twice = hand_made(1, &filters, &outer, &image);
    let err = refused(&twice);
    assert!(err.to_string().contains("not the last filter"), "{err}");
    for reserved in [0x04, 0x08, 0x10, 0x20] {
        let err = refused(&hand_made(reserved, &LZMA2_FILTER, &lzma2, &content));
        assert!(err.to_string().contains("reserved"), "{reserved:#x}: {err}");
    }
}

/// `stream` (one stream) with its index and footer made of `records` (unpadded and
/// uncompressed sizes) instead.
fn with_records(stream: &[u8], records: &[(u64, u64)]) -> Vec<u8> {
    let footer = stream.len() - 12;
    let backward = u32::from_le_bytes(stream[footer + 4..footer + 8].try_into().unwrap());
    let mut out = stream[..footer - (backward as usize + 1) * 4].to_vec();
    let mut index = vec![0];
    put_varint(&mut index, records.len() as u64);
    for &(unpadded, uncompressed) in records {
        put_varint(&mut index, unpadded);
        put_varint(&mut index, uncompressed);
    }
    while !index.len().is_multiple_of(4) {
        index.push(0);
    }
    index.extend_from_slice(&crc32(0, &index).to_le_bytes());
    let mut flags = ((index.len() / 4 - 1) as u32).to_le_bytes().to_vec();
    flags.extend_from_slice(&stream[footer + 8..footer + 10]);
    out.extend(index);
    out.extend_from_slice(&crc32(0, &flags).to_le_bytes());
    out.extend(flags);
    out.extend_from_slice(&FOOTER_MAGIC);
    out
}

/// A resumed stream's index whose records before the point add up past 2^64 (a hostile
/// artifact's) is refused, not summed with an overflow.
#[test]
fn records_before_a_point_that_add_up_past_any_offset_are_refused() {
    let data = mixed(200_000);
    let stream = xz_blocks(&data, 50_000);
    let (_, points) = decode_points(&stream, 8192).unwrap();
    let point = points.iter().find(|p| p.state.blocks == 2).unwrap();
    let mut records = records_of(&stream);
    assert!(records.len() >= 3);
    assert!(resume_at(&with_records(&stream, &records), point).is_ok());
    for record in &mut records[..2] {
        record.0 = u64::MAX >> 1;
    }
    let err = resume_at(&with_records(&stream, &records), point)
        .map(|r| r.0.len())
        .unwrap_err();
    assert!(
        err.to_string().contains("does not put a block boundary"),
        "{err}"
    );
}

/// The records (unpadded and uncompressed sizes) of the index of a one-stream file.
fn records_of(stream: &[u8]) -> Vec<(u64, u64)> {
    let footer = stream.len() - 12;
    let backward = u32::from_le_bytes(stream[footer + 4..footer + 8].try_into().unwrap());
    let mut at = footer - (backward as usize + 1) * 4 + 1;
    let mut varint = || {
        let mut value = 0u64;
        for shift in (0..).step_by(7) {
            let byte = stream[at];
            at += 1;
            value |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                break;
            }
        }
        value
    };
    let count = varint();
    (0..count).map(|_| (varint(), varint())).collect()
}

/// A number written with more bytes than it needs (a last byte 0) is refused, in an index
/// and in a block header, as liblzma does.
#[test]
fn overlong_numbers_are_refused() {
    let content = mixed(5_000);
    let lzma2 = lzma2_of(&content);
    assert!(unxz(&hand_made(0, &LZMA2_FILTER, &lzma2, &content)).unwrap() == content);
    // The filter id 0x21 in two bytes.
    let err = refused(&hand_made(0, &[0xa1, 0, 1, 8], &lzma2, &content));
    assert!(err.to_string().contains("overlong"), "{err}");
    // An empty stream whose index counts its 0 records in two bytes (the padding is one
    // byte shorter).
    let mut overlong = EMPTY_STREAM;
    overlong[13..16].copy_from_slice(&[0x80, 0, 0]);
    let crc = crc32(0, &overlong[12..16]);
    overlong[16..20].copy_from_slice(&crc.to_le_bytes());
    let err = refused(&overlong);
    assert!(err.to_string().contains("overlong"), "{err}");
}

/// A source that is interrupted before every read (as a read of a pipe may be by a signal):
/// the decoder retries it, it never takes it for one of its own stops at a boundary.
#[test]
fn an_interrupted_source_is_read_again() {
    struct Interrupting<'a>(&'a [u8], bool);
    impl Read for Interrupting<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.1 = !self.1;
            if self.1 {
                return Err(io::ErrorKind::Interrupted.into());
            }
            self.0.read(buf)
        }
    }
    let (stream, expected, _) = layouts();
    let mut out = Vec::new();
    XzDecoder::new(Interrupting(&stream, false), None)
        .read_to_end(&mut out)
        .unwrap();
    assert!(out == expected);
}

/// A file of tiny blocks each asking for a large dictionary (which lzma-rust2 allocates and
/// zeroes per block) is refused once the blocks' dictionaries exceed 64 bytes per byte of
/// output; the same data in blocks of 1 MiB with the largest dictionary decodes.
#[test]
fn tiny_blocks_with_large_dictionaries_are_refused() {
    // lzma-rust2 makes blocks at least as large as the dictionary: tiny blocks as streams of
    // one block each (the budget counts the blocks of all streams).
    let data = mixed(200_000);
    let tiny: Vec<u8> = data
        .chunks(4096)
        .flat_map(|piece| {
            let mut options = XzOptions::with_preset(1);
            options.lzma_options.dict_size = 16 << 20;
            xz_with(piece, options)
        })
        .collect();
    let err = unxz(&tiny).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    // 4 blocks of 16 MiB take the first 64 MiB; the fifth has 64 x its output before it.
    assert!(
        err.to_string()
            .contains("block 5 asks for a 16777216-byte dictionary, more than the blocks"),
        "{err}"
    );
    // Blocks of 1 MiB at the largest dictionary: exactly within the budget.
    let data = mixed(4 << 20);
    let large: Vec<u8> = data
        .chunks(1 << 20)
        .flat_map(|piece| {
            let mut options = XzOptions::with_preset(1);
            options.lzma_options.dict_size = 64 << 20;
            xz_with(piece, options)
        })
        .collect();
    assert!(unxz(&large).unwrap() == data);
}

#[test]
fn crc64_is_xz_s_in_any_pieces() {
    assert_eq!(crc64(0, b"123456789"), 0x995d_c9bb_df19_39fa);
    assert_eq!(crc64(0, b""), 0);
    let data = mixed(1000);
    let whole = crc64(0, &data);
    for cut in [0, 1, 7, 8, 9, 500, 999, 1000] {
        assert_eq!(crc64(crc64(0, &data[..cut]), &data[cut..]), whole, "{cut}");
    }
}

/// [`decode_points`] with points inside blocks too.
fn decode_points_inside(stream: &[u8], buf: usize) -> (Vec<u8>, Vec<Boundary>) {
    decode_points_with(stream, buf, true).unwrap()
}

/// Continue at `at` with the window the decoder needs from `before` (the output before the
/// point); the rest of the output and the artifact hash.
fn resume_inside(
    stream: &[u8],
    at: &ResumeAt,
    hash: Option<Sha256State>,
    before: &[u8],
) -> io::Result<(Vec<u8>, String)> {
    // None at a block boundary, or for a state whose header does not parse (the resume is
    // refused then).
    let mut window = at.window();
    if let Some(window) = &mut window {
        // In pieces, as the slot is read back.
        for piece in before.chunks(100_000) {
            window.update(piece);
        }
    }
    let source = &stream[at.artifact_offset as usize..];
    let mut decoder = XzDecoder::resume_with_window(source, at, hash, window)?;
    let mut out = Vec::new();
    decoder.read_to_end(&mut out)?;
    let hash = decoder.finish_hash().map(|h| h.finish_hex());
    Ok((out, hash.unwrap_or_default()))
}

/// One block (as `xz -6` writes one per stream) of ~1.5 MiB, dictionary 256 KiB.
fn one_block(check: CheckType) -> (Vec<u8>, Vec<u8>) {
    let data = mixed(1_500_000);
    let mut options = XzOptions::with_preset(6);
    options.check_type = check;
    options.lzma_options.dict_size = 256 << 10;
    let stream = xz_with(&data, options);
    assert_eq!(block_offsets(&stream).len(), 1);
    (stream, data)
}

#[test]
fn a_single_block_resumes_at_every_chunk_boundary_to_the_same_image() {
    for check in [CheckType::Crc32, CheckType::Crc64, CheckType::Sha256] {
        let (stream, data) = one_block(check);
        let (out, points) = decode_points_inside(&stream, 1 << 16);
        assert!(out == data);
        let inside: Vec<_> = points.iter().filter(|p| p.in_block.is_some()).collect();
        assert!(inside.len() >= 8, "{check:?}: {} points", inside.len());
        assert_eq!(
            inside.len(),
            points.len(),
            "one block: no boundary between blocks"
        );
        for point in inside {
            let at = point.resume_at();
            assert!(at.plausible(), "{at:?}");
            // Through the record's text, as a restart reads it.
            let text = state_text(&at.state, at.in_block.as_deref());
            assert_eq!(
                XzState::from_text(&text),
                None,
                "the previous agent refuses it"
            );
            let (state, in_block) = state_from_text(&text).unwrap();
            assert_eq!(state_text(&state, in_block.as_deref()), text);
            let b = in_block.unwrap();
            assert_eq!(b.lzma.probs, at.in_block.as_ref().unwrap().lzma.probs);
            let before = &data[..point.out as usize];
            let (rest, hash) =
                resume_inside(&stream, &at, point.artifact_hash.clone(), before).unwrap();
            assert!(
                rest == data[point.out as usize..],
                "{check:?} at {}",
                point.out
            );
            assert_eq!(hash, sha256(&stream));
        }
    }
}

#[test]
fn a_window_given_other_bytes_than_the_output_before_the_point_is_refused() {
    let (stream, data) = one_block(CheckType::Crc64);
    let (_, points) = decode_points_inside(&stream, 1 << 16);
    // A point past the dictionary's length: the window wraps around the dictionary's end.
    let point = points
        .iter()
        .find(|p| p.out > 300 << 10)
        .expect("a point past 300 KiB");
    let at = point.resume_at();
    let out = point.out as usize;
    let resume = |given: &[u8], window| {
        let mut window: Option<ResumeWindow> = window;
        if let Some(w) = &mut window {
            w.update(given);
        }
        let source = &stream[at.artifact_offset as usize..];
        XzDecoder::resume_with_window(source, &at, point.artifact_hash.clone(), window).map(|_| ())
    };
    let refused = |r: io::Result<()>| r.unwrap_err().kind() == io::ErrorKind::InvalidData;
    assert!(resume(&data[..out], at.window()).is_ok());
    assert!(
        refused(resume(&data[..out - 1], at.window())),
        "a byte short"
    );
    assert!(
        refused(resume(&data[..out + 1], at.window())),
        "a byte over"
    );
    assert!(refused(resume(&[], None)), "no window inside a block");
    // A window made for another point of the block, given all of that point's output.
    let other = points.iter().find(|p| p.out > point.out).unwrap();
    let given = &data[..other.out as usize];
    assert!(refused(resume(given, other.resume_at().window())));
    // One made for the same block state a byte further on.
    let mut further = at.clone();
    further.out += 1;
    assert!(refused(resume(&data[..out + 1], further.window())));
    // Given in odd pieces, the dictionary holds the same bytes: the same image.
    let mut window = at.window();
    for piece in data[..out].chunks(4093) {
        window.as_mut().unwrap().update(piece);
    }
    let source = &stream[at.artifact_offset as usize..];
    let mut decoder =
        XzDecoder::resume_with_window(source, &at, point.artifact_hash.clone(), window).unwrap();
    let mut rest = Vec::new();
    decoder.read_to_end(&mut rest).unwrap();
    assert!(rest == data[out..]);
}

/// Blocks with a dictionary above 8 MiB (`xz -7` to `-9`) have points inside too: a resume
/// reads the window into the dictionary the decoder takes over, as for a small one.
#[test]
fn blocks_with_dictionaries_above_8_mib_get_points_inside_too() {
    let data = mixed(1_500_000);
    let mut options = XzOptions::with_preset(1);
    options.lzma_options.dict_size = 9 << 20;
    let stream = xz_with(&data, options);
    let (out, points) = decode_points_inside(&stream, 1 << 16);
    assert!(out == data);
    let inside: Vec<_> = points.iter().filter(|p| p.in_block.is_some()).collect();
    assert!(inside.len() >= 4, "{} points inside", inside.len());
    for point in inside.iter().step_by(2) {
        let at = point.resume_at();
        assert!(at.plausible(), "{at:?}");
        let before = &data[..point.out as usize];
        let (rest, hash) =
            resume_inside(&stream, &at, point.artifact_hash.clone(), before).unwrap();
        assert!(rest == data[point.out as usize..], "at {}", point.out);
        assert_eq!(hash, sha256(&stream));
    }
}

#[test]
fn blocks_without_a_check_or_with_filters_get_no_points_inside() {
    let (stream, data) = one_block(CheckType::None);
    let (out, points) = decode_points_inside(&stream, 1 << 16);
    assert!(out == data);
    assert!(points.is_empty(), "{}", points.len());
    // Every layout: points inside blocks only where LZMA2 is alone and a check covers them,
    // and resuming at each gives the same image.
    let (stream, expected, _) = layouts();
    let (out, points) = decode_points_inside(&stream, 50_000);
    assert!(out == expected);
    assert!(points.iter().any(|p| p.in_block.is_some()));
    for point in &points {
        if let Some(b) = &point.in_block {
            assert_ne!(b.check, Check::None);
            assert_eq!(check_block_header(&b.header, 1).unwrap().filters, [None; 3]);
        }
    }
    for point in points.iter().step_by(3) {
        let before = &expected[..point.out as usize];
        let (rest, _) = resume_inside(
            &stream,
            &point.resume_at(),
            point.artifact_hash.clone(),
            before,
        )
        .unwrap();
        assert!(rest == expected[point.out as usize..]);
    }
}

#[test]
fn a_tampered_state_inside_a_block_fails_or_is_refused() {
    let (stream, data) = one_block(CheckType::Crc64);
    let (_, points) = decode_points_inside(&stream, 1 << 16);
    let point = &points[points.len() / 2];
    let before = &data[..point.out as usize];
    let expected = &data[point.out as usize..];
    let genuine = point.resume_at();
    let tampered = |change: &dyn Fn(&mut InBlock)| {
        let mut at = genuine.clone();
        change(at.in_block.as_mut().unwrap());
        at
    };
    // The check's state: the block's check fails at its end.
    let at = tampered(&|b| {
        if let Check::Crc64(crc) = &mut b.check {
            *crc ^= 1;
        }
    });
    let err = resume_inside(&stream, &at, None, before).unwrap_err();
    assert!(err.to_string().contains("check does not match"), "{err}");
    // The LZMA state: a wrong image never comes out as a success.
    let mut failed = 0;
    let changes: [&dyn Fn(&mut InBlock); 6] = [
        &|b| b.lzma.probs[0] = 1,
        &|b| b.lzma.probs[2000] ^= 0x40,
        &|b| b.lzma.reps[0] = b.lzma.reps[0].wrapping_add(1),
        &|b| b.lzma.reps[1] ^= 1,
        &|b| b.lzma.state = (b.lzma.state + 1) % 12,
        &|b| b.since_reset -= 1,
    ];
    for change in changes {
        let at = tampered(change);
        match resume_inside(&stream, &at, None, before) {
            Ok((rest, _)) => assert!(rest == expected, "a wrong image"),
            Err(_) => failed += 1,
        }
    }
    assert!(failed >= 4, "{failed}");
    // States the decoder cannot have made: refused before anything is read.
    let refusals: [&dyn Fn(&mut InBlock); 12] = [
        // A header too short to be one (a record's text may say anything): no panic.
        &|b| b.header = vec![0],
        &|b| b.header = vec![1, 0, 0],
        &|b| b.header.clear(),
        // Offsets at the end of the number range: no overflow.
        &|b| b.block_start = u64::MAX - 3,
        &|b| b.lzma.probs[5] = 0,
        &|b| b.lzma.probs[5] = 2048,
        &|b| b.lzma.state = 12,
        &|b| b.lzma.reps[2] = 1 << 30,
        &|b| b.since_reset = 1 << 40,
        &|b| b.block_start += 4,
        &|b| b.header[2] ^= 1,
        &|b| b.check = Check::Crc32(0),
    ];
    for change in refusals {
        let at = tampered(change);
        assert!(!at.plausible(), "{at:?}");
        let err = resume_inside(&stream, &at, None, before);
        assert!(err.is_err());
    }
    // A point moved to the next chunk's start with this one's state.
    let next = &points[points.len() / 2 + 1];
    let mut moved = genuine.clone();
    (moved.artifact_offset, moved.out) = (next.artifact_offset, next.out);
    let before_next = &data[..next.out as usize];
    match resume_inside(&stream, &moved, None, before_next) {
        Ok((rest, _)) => assert!(rest == data[next.out as usize..]),
        Err(e) => assert_eq!(e.kind(), io::ErrorKind::InvalidData),
    }
}
