//! Every image in `tests/vectors/` (made with mkenvimage, libubootenv's fw_setenv and real
//! U-Boot 2025.04; see `tests/vectors/README.md`) read by the codec, and the write path of the
//! store applied to each two-copy image.

use std::path::{Path, PathBuf};

use bootctl::env::{
    decode_copy, decode_copy_with, decode_image, encode, encode_copy, ByteOrder, Env, EnvError,
    Layout,
};
use bootctl::fw_env_config::FwEnvConfig;
use bootctl::store::{EnvStore, StoreError};
use bootctl::ChangeSet;

fn vector(name: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn vars(env: &Env) -> Vec<(String, String)> {
    env.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

const BASIC: &[(&str, &str)] = &[
    ("bootcmd", "run distro_bootcmd"),
    ("bootdelay", "2"),
    ("foo", "bar"),
];
const SLOT_A: &[(&str, &str)] = &[
    ("BOOT_ORDER", "A B"),
    ("BOOT_A_LEFT", "3"),
    ("BOOT_B_LEFT", "3"),
    ("bootslot", "A"),
];
const SLOT_B: &[(&str, &str)] = &[
    ("BOOT_ORDER", "B A"),
    ("BOOT_A_LEFT", "3"),
    ("BOOT_B_LEFT", "3"),
    ("bootslot", "B"),
];
const BASIC_DATA: &[u8] = b"bootcmd=run distro_bootcmd\0bootdelay=2\0foo=bar\0\0";

#[test]
fn single_basic_ff_padding() {
    let bytes = vector("single-basic-4k.bin");
    assert_eq!(bytes.len(), 0x1000);
    assert_eq!(&bytes[..4], &[0xe1, 0x78, 0xa6, 0x4c]);
    let copy = decode_copy(&bytes, Layout::Single).unwrap();
    assert_eq!(copy.crc, 0x4ca6_78e1);
    assert_eq!(copy.flag, None);
    assert_eq!(vars(&copy.env), pairs(BASIC));
    assert_eq!(&bytes[4..4 + BASIC_DATA.len()], BASIC_DATA);
    assert!(bytes[4 + BASIC_DATA.len()..].iter().all(|&b| b == 0xff));
    assert_eq!(copy.env.to_data(), BASIC_DATA);
}

#[test]
fn single_basic_zero_padding_is_what_we_write() {
    let bytes = vector("single-basic-4k-pad00.bin");
    assert_eq!(&bytes[..4], &[0xd9, 0x11, 0x84, 0x32]);
    let copy = decode_copy(&bytes, Layout::Single).unwrap();
    assert_eq!(copy.crc, 0x3284_11d9);
    assert_eq!(vars(&copy.env), pairs(BASIC));
    // We pad with 0x00, so our encoding is byte-identical to `mkenvimage -p 0`.
    assert_eq!(encode(&copy.env, 0x1000, Layout::Single).unwrap(), bytes);
}

#[test]
fn single_basic_big_endian_crc_needs_big_endian_reader() {
    let bytes = vector("single-basic-4k-be.bin");
    assert_eq!(&bytes[..4], &[0x4c, 0xa6, 0x78, 0xe1]);
    // A little-endian target (ARM/x86/RISC-V) must not accept it.
    assert_eq!(
        decode_copy(&bytes, Layout::Single),
        Err(EnvError::BadCrc {
            stored: 0xe178_a64c,
            computed: 0x4ca6_78e1
        })
    );
    let copy = decode_copy_with(&bytes, Layout::Single, ByteOrder::Big).unwrap();
    assert_eq!(copy.crc, 0x4ca6_78e1);
    assert_eq!(vars(&copy.env), pairs(BASIC));
    // Same data area as the little-endian image; only the CRC bytes differ.
    assert_eq!(bytes[4..], vector("single-basic-4k.bin")[4..]);
}

#[test]
fn single_empty_is_a_lone_nul() {
    let bytes = vector("single-empty-256.bin");
    assert_eq!(bytes.len(), 0x100);
    assert_eq!(&bytes[..6], &[0x4f, 0x81, 0x45, 0x2a, 0x00, 0xff]);
    let copy = decode_copy(&bytes, Layout::Single).unwrap();
    assert_eq!(copy.crc, 0x2a45_814f);
    assert!(copy.env.is_empty());
    assert_eq!(copy.env.to_data(), vec![0]);
}

#[test]
fn single_tricky_values() {
    let bytes = vector("single-tricky-256.bin");
    assert_eq!(&bytes[..5], &[0x4c, 0xef, 0x8b, 0x20, b'b']);
    let copy = decode_copy(&bytes, Layout::Single).unwrap();
    let env = &copy.env;
    assert_eq!(
        env.get("bootargs"),
        Some("console=ttyS0,115200 root=PARTUUID=11111111-2222-3333-4444-555555555555 rootwait")
    );
    assert_eq!(env.get("spaces"), Some("  two leading, two trailing  "));
    assert_eq!(env.get("empty"), Some(""));
    assert_eq!(env.get("dup"), Some("second"), "the last duplicate wins");
    assert_eq!(env.get("utf8"), Some("café"));
    assert_eq!(env.get_bytes("utf8"), Some(&b"caf\xc3\xa9"[..]));
    let names: Vec<&str> = env.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["bootargs", "spaces", "empty", "dup", "utf8"]);
    // Comment and empty lines of the input were not stored.
    assert!(!env.iter().any(|(n, _)| n.starts_with('#') || n.is_empty()));
}

#[test]
fn redundant_single_copy_has_flag_one_and_crc_without_flag() {
    let bytes = vector("redund-basic-4k.bin");
    assert_eq!(&bytes[..6], &[0xf8, 0xcf, 0x02, 0xc0, 0x01, b'b']);
    let copy = decode_copy(&bytes, Layout::Redundant).unwrap();
    assert_eq!(copy.crc, 0xc002_cff8);
    assert_eq!(copy.flag, Some(1));
    assert_eq!(vars(&copy.env), pairs(BASIC));
    assert_eq!(crc32fast::hash(&bytes[5..]), 0xc002_cff8);
    // Read as a single copy it is invalid: the header sizes differ.
    assert!(decode_copy(&bytes, Layout::Single).is_err());
}

type Vars = &'static [(&'static str, &'static str)];

/// (file, expected current copy index, expected variables, flags of both copies)
const PAIRS: &[(&str, usize, Vars, [u8; 2])] = &[
    ("redund-pair-erased2-8k.bin", 0, SLOT_A, [0x01, 0xff]),
    ("redund-pair-newer2-8k.bin", 1, SLOT_B, [0x01, 0x02]),
    ("redund-pair-wrap-8k.bin", 1, SLOT_B, [0xff, 0x00]),
    ("redund-pair-equal-8k.bin", 0, SLOT_A, [0x05, 0x05]),
    ("redund-pair-newer1-8k.bin", 0, SLOT_A, [0x09, 0x08]),
    ("redund-pair-torn2-8k.bin", 0, SLOT_A, [0x07, 0x08]),
];

#[test]
fn pairs_select_the_current_copy() {
    for &(name, current, expected, flags) in PAIRS {
        let bytes = vector(name);
        assert_eq!(bytes[4], flags[0], "{name} flag 1");
        assert_eq!(bytes[0x1004], flags[1], "{name} flag 2");
        let sel = decode_image(&bytes, 0x1000, Layout::Redundant).unwrap();
        assert_eq!(sel.current, current, "{name}");
        assert_eq!(vars(sel.env()), pairs(expected), "{name}");
        assert_eq!(sel.copy.flag, Some(flags[current]), "{name}");
        // Header bytes as the README lists them (CRC stored little-endian).
        let expected_crc = if expected == SLOT_A {
            [0xa0, 0x75, 0xab, 0xb9]
        } else {
            [0xd1, 0x85, 0xa1, 0x7b]
        };
        assert_eq!(sel.copy.crc.to_le_bytes(), expected_crc, "{name}");
    }
}

#[test]
fn erased_and_torn_copies_are_reported_invalid() {
    let sel = decode_image(
        &vector("redund-pair-erased2-8k.bin"),
        0x1000,
        Layout::Redundant,
    )
    .unwrap();
    assert!(sel.problems[0].is_none());
    assert!(matches!(sel.problems[1], Some(EnvError::BadCrc { .. })));
    let sel = decode_image(
        &vector("redund-pair-torn2-8k.bin"),
        0x1000,
        Layout::Redundant,
    )
    .unwrap();
    assert!(matches!(sel.problems[1], Some(EnvError::BadCrc { .. })));
}

#[test]
fn both_bad_is_no_valid_copy() {
    let err = decode_image(
        &vector("redund-pair-bothbad-8k.bin"),
        0x1000,
        Layout::Redundant,
    )
    .unwrap_err();
    match err {
        EnvError::NoValidCopy { failures } => {
            assert_eq!(failures.len(), 2);
            assert!(failures
                .iter()
                .all(|(_, e)| matches!(e, EnvError::BadCrc { .. })));
        }
        other => panic!("expected NoValidCopy, got {other}"),
    }
}

#[test]
fn libubootenv_written_pair() {
    let bytes = vector("libubootenv032-setenv-pair-8k.bin");
    assert_eq!(&bytes[0x1000..0x1005], &[0x66, 0xcf, 0xeb, 0x5d, 0x02]);
    // Copy 1 is the untouched erased2 copy.
    assert_eq!(
        bytes[..0x1000],
        vector("redund-pair-erased2-8k.bin")[..0x1000]
    );
    let sel = decode_image(&bytes, 0x1000, Layout::Redundant).unwrap();
    assert_eq!(sel.current, 1);
    assert_eq!(sel.copy.flag, Some(2));
    assert_eq!(
        vars(sel.env()),
        pairs(&[
            ("BOOT_A_LEFT", "3"),
            ("BOOT_B_LEFT", "3"),
            ("BOOT_ORDER", "B A"),
            ("bootslot", "B"),
        ])
    );
}

const UBOOT_VARS: &[(&str, &str)] = &[
    ("BOOT_A_LEFT", "2"),
    ("BOOT_B_LEFT", "2"),
    ("BOOT_ORDER", "B A"),
    (
        "bootcmd",
        "mmc dev 0; mmc read ${scriptaddr} 0x1000 0x20; source ${scriptaddr}",
    ),
    ("bootcount", "1"),
    ("bootctl_part", "3"),
    ("bootctl_slot", "B"),
    ("bootdelay", "0"),
    ("fdtcontroladdr", "5e5abdf0"),
    ("scriptaddr", "0x40200000"),
];

#[test]
fn real_uboot_pair_and_byte_identical_reencoding() {
    let bytes = vector("uboot2025.04-saveenv-pair-32k.bin");
    assert_eq!(bytes.len(), 0x8000);
    assert_eq!(&bytes[..5], &[0x0a, 0x9d, 0x44, 0xab, 0x0b]);
    assert_eq!(&bytes[0x4000..0x4005], &[0x21, 0xa9, 0x71, 0xcb, 0x0c]);
    let sel = decode_image(&bytes, 0x4000, Layout::Redundant).unwrap();
    assert_eq!(sel.current, 1);
    assert_eq!(sel.copy.flag, Some(0x0c));
    assert!(
        sel.problems.iter().all(Option::is_none),
        "both copies valid"
    );
    assert_eq!(vars(sel.env()), pairs(UBOOT_VARS));
    // Our encoder writes what U-Boot's saveenv writes: same order, 0x00 padding.
    let ours = encode_copy(sel.env(), 0x4000, Layout::Redundant, 0x0c).unwrap();
    assert_eq!(ours, bytes[0x4000..]);
    // Copy 1 (flag 0x0b, libubootenv) is valid too.
    let copy1 = decode_copy(&bytes[..0x4000], Layout::Redundant).unwrap();
    assert_eq!(copy1.flag, Some(0x0b));
}

/// A writable copy of a two-copy vector with its fw_env.config, in a temp dir.
struct Fixture {
    _dir: tempfile::TempDir,
    image: PathBuf,
    store: EnvStore,
}

fn fixture(name: &str, env_size: u64) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(name);
    std::fs::write(&image, vector(name)).unwrap();
    let config = FwEnvConfig::parse(
        &format!("{name} 0x0 {env_size:#x}\n{name} {env_size:#x} {env_size:#x}\n"),
        dir.path(),
    )
    .unwrap();
    let store = EnvStore::open(&config)
        .unwrap()
        .with_lock_path(dir.path().join("fw_printenv.lock"));
    Fixture {
        _dir: dir,
        image,
        store,
    }
}

#[test]
fn write_path_on_every_pair() {
    // (file, copy expected to be written, its new flag)
    let cases: &[(&str, usize, u8)] = &[
        ("redund-pair-erased2-8k.bin", 1, 0x02),
        ("redund-pair-newer2-8k.bin", 0, 0x03),
        ("redund-pair-wrap-8k.bin", 0, 0x01),
        ("redund-pair-equal-8k.bin", 1, 0x06),
        ("redund-pair-newer1-8k.bin", 1, 0x0a),
        ("redund-pair-torn2-8k.bin", 1, 0x08),
        ("libubootenv032-setenv-pair-8k.bin", 0, 0x03),
    ];
    for &(name, target, flag) in cases {
        let f = fixture(name, 0x1000);
        let before = std::fs::read(&f.image).unwrap();
        let old = f.store.read().unwrap();
        let applied = f
            .store
            .apply(
                &ChangeSet::new()
                    .with("BOOT_B_LEFT", "2")
                    .with("new_var", "x"),
            )
            .unwrap();
        let saved = applied.saved.expect("a change was saved");
        assert_eq!((saved.copy, saved.flag), (target, Some(flag)), "{name}");
        let after = std::fs::read(&f.image).unwrap();
        let current = 1 - target;
        let range = |i: usize| i * 0x1000..(i + 1) * 0x1000;
        assert_eq!(
            after[range(current)],
            before[range(current)],
            "{name}: the current copy is never touched"
        );
        let sel = decode_image(&after, 0x1000, Layout::Redundant).unwrap();
        assert_eq!(sel.current, target, "{name}");
        assert_eq!(sel.copy.flag, Some(flag), "{name}");
        // Foreign variables kept in order, the change applied, the new one appended.
        let mut expected = vars(&old);
        for (n, v) in expected.iter_mut() {
            if n == "BOOT_B_LEFT" {
                *v = "2".to_string();
            }
        }
        expected.push(("new_var".to_string(), "x".to_string()));
        assert_eq!(vars(sel.env()), expected, "{name}");
    }
}

#[test]
fn write_path_on_real_uboot_pair() {
    let f = fixture("uboot2025.04-saveenv-pair-32k.bin", 0x4000);
    let saved = f
        .store
        .apply(
            &ChangeSet::new()
                .with("upgrade_available", "0")
                .with("bootcount", "0"),
        )
        .unwrap()
        .saved
        .unwrap();
    assert_eq!((saved.copy, saved.flag), (0, Some(0x0d)));
    let env = f.store.read().unwrap();
    assert_eq!(env.get("bootcount"), Some("0"));
    assert_eq!(env.get("fdtcontroladdr"), Some("5e5abdf0"));
}

#[test]
fn both_bad_refuses_to_write_and_names_device_and_offsets() {
    let f = fixture("redund-pair-bothbad-8k.bin", 0x1000);
    let before = std::fs::read(&f.image).unwrap();
    let err = f
        .store
        .apply(&ChangeSet::new().with("bootctl_slot", "B"))
        .unwrap_err();
    assert!(matches!(err, StoreError::NoValidCopy { .. }), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("redund-pair-bothbad-8k.bin@0x0: bad CRC"),
        "{text}"
    );
    assert!(
        text.contains("redund-pair-bothbad-8k.bin@0x1000: bad CRC"),
        "{text}"
    );
    assert_eq!(std::fs::read(&f.image).unwrap(), before, "nothing written");
    assert!(f.store.read().is_err());
}

#[test]
fn single_copy_vectors_through_the_store() {
    for name in ["single-basic-4k.bin", "single-basic-4k-pad00.bin"] {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join(name);
        std::fs::write(&image, vector(name)).unwrap();
        let config = FwEnvConfig::parse(&format!("{name} 0 1000\n"), dir.path()).unwrap();
        let store = EnvStore::open(&config)
            .unwrap()
            .with_lock_path(dir.path().join("lock"));
        assert!(!store.is_redundant());
        assert_eq!(vars(&store.read().unwrap()), pairs(BASIC));
        store
            .apply(&ChangeSet::new().with("foo", "baz").without("bootdelay"))
            .unwrap();
        let copy = decode_copy(&std::fs::read(&image).unwrap(), Layout::Single).unwrap();
        assert_eq!(
            vars(&copy.env),
            pairs(&[("bootcmd", "run distro_bootcmd"), ("foo", "baz")])
        );
    }
}
