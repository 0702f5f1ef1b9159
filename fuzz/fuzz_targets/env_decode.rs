//! The U-Boot environment codec on arbitrary medium contents: single and redundant images,
//! both CRC byte orders. The first input byte picks the layout and whether the CRC(s) are
//! made valid first (so the fuzzer reaches the data-area parser instead of failing on the
//! CRC). Whatever decodes must encode again and read back as the same environment.
#![no_main]

use bootctl::env::{self, ByteOrder, Layout};
use libfuzzer_sys::fuzz_target;

fn fix_crc(copy: &mut [u8], layout: Layout, order: ByteOrder) {
    let header = layout.header_size();
    if copy.len() < header {
        return;
    }
    let crc = crc32(&copy[header..]);
    let bytes = match order {
        ByteOrder::Little => crc.to_le_bytes(),
        ByteOrder::Big => crc.to_be_bytes(),
    };
    copy[..4].copy_from_slice(&bytes);
}

/// Plain CRC-32 (IEEE), so the target needs no extra dependency.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fuzz_target!(|input: &[u8]| {
    let Some((&mode, rest)) = input.split_first() else {
        return;
    };
    let layout = if mode & 1 == 0 {
        Layout::Single
    } else {
        Layout::Redundant
    };
    let order = if mode & 2 == 0 {
        ByteOrder::Little
    } else {
        ByteOrder::Big
    };
    let mut image = rest.to_vec();
    let copies = layout.copies();
    let env_size = image.len() / copies;
    image.truncate(env_size * copies);
    if mode & 4 != 0 && env_size > 0 {
        for copy in image.chunks_mut(env_size) {
            fix_crc(copy, layout, order);
        }
    }

    // Every entry point must return, never panic.
    let _ = env::decode_copy_with(&image, layout, order);
    let _ = env::Env::from_data(rest);
    let selected = if order == ByteOrder::Little {
        env::decode_image(&image, env_size, layout)
    } else {
        let parts: Vec<&[u8]> = if env_size == 0 {
            Vec::new()
        } else {
            image.chunks(env_size).collect()
        };
        env::select_with(&parts, layout, order)
    };
    let Ok(selected) = selected else {
        return;
    };
    let decoded = selected.env().clone();
    // Every listed name can be looked up (names that are not UTF-8 are listed with U+FFFD
    // replacement characters and cannot be: they are kept byte for byte, not addressable).
    for (name, _) in decoded.iter() {
        if !name.contains('\u{FFFD}') && !name.is_empty() {
            assert!(decoded.get(name).is_some(), "{name:?} listed but not found");
        }
    }
    // Round trip: what was read can be written (unless it was cut off at the end of the
    // area, which makes it one byte too long) and reads back the same.
    if let Ok(copy) = env::encode_copy_with(&decoded, env_size, layout, selected.next_flag(), order)
    {
        let again = env::decode_copy_with(&copy, layout, order).expect("own encoding must decode");
        assert_eq!(again.env, decoded, "round trip changed the environment");
        assert_eq!(
            again.flag,
            (layout == Layout::Redundant).then(|| selected.next_flag())
        );
    }
});
