//! Property tests of the environment codec and store: encode/decode round trips, byte-for-byte
//! preservation of foreign entries, torn writes never losing the previous state, flag wrap.

use bootctl::env::{
    decode_copy, encode_copy, newer_copy, select, validate_name, validate_value, Env, EnvError,
    Layout,
};
use bootctl::store::{EnvStore, MemMedium, Tear};
use bootctl::ChangeSet;
use proptest::prelude::*;

/// Names and values U-Boot can store and read back identically.
fn name() -> impl Strategy<Value = String> {
    "[A-Za-z_.][A-Za-z0-9_.:-]{0,15}"
}

fn value() -> impl Strategy<Value = String> {
    // Printable ASCII without backslash, plus a little UTF-8; never empty.
    "[ -\\[\\]-~é€]{1,40}"
}

/// An environment with unique names in random order.
fn env_strategy(max: usize) -> impl Strategy<Value = Env> {
    prop::collection::vec((name(), value()), 0..max).prop_map(|pairs| {
        let mut env = Env::new();
        for (n, v) in pairs {
            env.set(&n, &v).expect("generated pairs are valid");
        }
        env
    })
}

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![Just(Layout::Single), Just(Layout::Redundant)]
}

fn changes() -> impl Strategy<Value = ChangeSet> {
    prop::collection::vec((name(), prop::option::of(value())), 1..6)
        .prop_map(|list| list.into_iter().collect())
}

proptest! {
    // Failures print their minimal input; no regression files are written into the tree.
    #![proptest_config(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn encode_decode_round_trip(env in env_strategy(20), layout in layout(), flag in any::<u8>(),
                                slack in 0usize..64) {
        let env_size = layout.header_size() + env.data_len() + slack;
        let bytes = encode_copy(&env, env_size, layout, flag).unwrap();
        prop_assert_eq!(bytes.len(), env_size);
        let copy = decode_copy(&bytes, layout).unwrap();
        prop_assert_eq!(&copy.env, &env);
        prop_assert_eq!(copy.flag, (layout == Layout::Redundant).then_some(flag));
        prop_assert_eq!(copy.crc, crc32fast::hash(&bytes[layout.header_size()..]));
        // One byte less than needed is an error, never a truncated environment.
        let too_small = layout.header_size() + env.data_len() - 1;
        if too_small > layout.header_size() {
            let is_too_large = matches!(
                encode_copy(&env, too_small, layout, flag),
                Err(EnvError::TooLarge { .. })
            );
            prop_assert!(is_too_large);
        }
    }

    /// Whatever entries a foreign writer stored (any bytes but NUL, unique names, entries
    /// without `=`), reading and re-encoding reproduces them byte for byte, and a change to
    /// one variable leaves every other entry's bytes alone.
    #[test]
    fn foreign_entries_preserved_byte_for_byte(
        entries in prop::collection::btree_map(
            prop::collection::vec(1u8..=255, 1..12).prop_filter("no = in names", |n| !n.contains(&b'=')),
            prop::option::of(prop::collection::vec(1u8..=255, 0..24)),
            0..12),
        padding in any::<u8>(),
    ) {
        let mut data = Vec::new();
        for (name, value) in &entries {
            data.extend_from_slice(name);
            if let Some(value) = value {
                data.push(b'=');
                data.extend_from_slice(value);
            }
            data.push(0);
        }
        data.push(0);
        let stored = data.clone();
        data.extend(std::iter::repeat_n(padding, 7));
        let mut env = Env::from_data(&data);
        prop_assert_eq!(env.to_data(), stored.clone());
        prop_assume!(!env.contains("zz_new"));
        env.set("zz_new", "1").unwrap();
        let mut expected = stored[..stored.len() - 1].to_vec();
        expected.extend_from_slice(b"zz_new=1\0\0");
        prop_assert_eq!(env.to_data(), expected);
    }

    /// Names and values our validation accepts are the ones that survive encode/decode.
    #[test]
    fn validation_matches_round_trip(name in "\\PC{0,8}", value in "\\PC{0,8}") {
        let ok = validate_name(&name).is_ok() && validate_value(&name, &value).is_ok();
        let mut env = Env::new();
        prop_assert_eq!(env.set(&name, &value).is_ok(), ok);
        if ok {
            let decoded = Env::from_data(&env.to_data());
            prop_assert_eq!(decoded.get(&name), Some(value.as_str()));
        }
    }

    /// A power cut while a save writes its copy (any prefix written, or any byte damaged)
    /// leaves a readable environment that is the previous state or, when the damage missed
    /// everything the CRC covers, the complete new state; never an error, never a mix. The next
    /// save then succeeds.
    #[test]
    fn torn_write_leaves_previous_state_readable(
        start in env_strategy(8),
        first in changes(),
        change in changes(),
        start_flag in any::<u8>(),
        tear in prop_oneof![
            (0usize..1100).prop_map(Tear::Truncate),
            (0usize..1024, 1u8..=255).prop_map(|(at, mask)| Tear::Corrupt { at, mask }),
        ],
    ) {
        let env_size = 1024;
        let (store, medium) = EnvStore::in_memory(&start, env_size, Layout::Redundant).unwrap();
        // Begin from an arbitrary flag, and sometimes from a history of one save.
        let mut copy1 = medium.copies()[0].clone();
        copy1[4] = start_flag;
        medium.set_copy(0, copy1);
        medium.set_copy(1, vec![0xff; env_size]);
        let _ = store.apply(&first);
        let before = store.read().unwrap();
        let mut after = before.clone();
        prop_assume!(after.apply(&change).unwrap());

        medium.tear_next_write(tear);
        prop_assert!(store.apply(&change).is_err());
        let read = store.read().unwrap();
        prop_assert!(read == before || read == after, "mixed state after a torn write");
        if read == after {
            // Only possible if the torn copy is complete in every byte the CRC covers.
            let sel = select(&medium.copies(), Layout::Redundant).unwrap();
            prop_assert_eq!(sel.env(), &after);
        }
        // Saving the change again works on whatever was read: the previous state gives `after`;
        // a torn copy that happened to be complete is changed once more (a change set that
        // unsets and sets a name again moves it to the end, so that is not always `after`).
        let mut expected = read.clone();
        expected.apply(&change).unwrap();
        let applied = store.apply(&change).unwrap();
        prop_assert_eq!(&store.read().unwrap(), &expected);
        prop_assert_eq!(applied.env, expected);
    }

    /// Saves alternate between the copies, the flag increments modulo 256 through the wrap,
    /// and the last save is always what reads back.
    #[test]
    fn flags_wrap_and_saves_alternate(start_flag in any::<u8>(), saves in 1usize..520) {
        let env: Env = [("bootcmd", "run x")].into_iter().collect();
        let (store, medium) = EnvStore::in_memory(&env, 64, Layout::Redundant).unwrap();
        let mut copy1 = medium.copies()[0].clone();
        copy1[4] = start_flag;
        medium.set_copy(0, copy1);
        medium.set_copy(1, vec![0; 64]);
        let mut flag = start_flag;
        let mut target = 1;
        for i in 0..saves {
            let saved = store
                .apply(&ChangeSet::new().with("counter", i.to_string()))
                .unwrap()
                .saved
                .unwrap();
            flag = flag.wrapping_add(1);
            prop_assert_eq!((saved.copy, saved.flag), (target, Some(flag)));
            target = 1 - target;
        }
        let last = (saves - 1).to_string();
        let read = store.read().unwrap();
        prop_assert_eq!(read.get("counter"), Some(last.as_str()));
        prop_assert_eq!(medium.writes(), saves);
    }

    /// The copy picked does not depend on which of the two positions holds which flag, except
    /// for equal flags (copy 1 wins).
    #[test]
    fn newer_copy_is_order_independent(a in any::<u8>(), b in any::<u8>()) {
        let pick = |f1: u8, f2: u8| if newer_copy(f1, f2) == 0 { f1 } else { f2 };
        prop_assert_eq!(pick(a, b), pick(b, a));
        if a == b {
            prop_assert_eq!(newer_copy(a, b), 0);
        }
        prop_assert_eq!(newer_copy(a, a.wrapping_add(1)), 1, "flag + 1 always wins");
    }
}

#[test]
fn medium_clones_share_state() {
    let medium = MemMedium::new(vec![vec![1, 2, 3]]);
    let other = medium.clone();
    other.set_copy(0, vec![9]);
    assert_eq!(medium.copies(), vec![vec![9]]);
}

/// The case CI's proptest run found: a write torn after 16 bytes whose missing tail equalled the
/// old bytes there, so the "torn" copy is complete and valid; saving the same change again must
/// then apply it to that state.
#[test]
fn a_torn_write_that_happens_to_be_complete_is_the_new_state() {
    let (store, medium) = EnvStore::in_memory(&Env::new(), 1024, Layout::Redundant).unwrap();
    let mut copy1 = medium.copies()[0].clone();
    copy1[4] = 0;
    medium.set_copy(0, copy1);
    medium.set_copy(1, vec![0xff; 1024]);
    let first: ChangeSet = [("A", Some("a"))].into_iter().collect();
    store.apply(&first).unwrap();
    let change: ChangeSet = [("_", None), ("_", Some("0")), ("a", Some(" "))]
        .into_iter()
        .collect();
    medium.tear_next_write(Tear::Truncate(16));
    assert!(store.apply(&change).is_err());
    let read = store.read().unwrap();
    let names: Vec<&str> = read.iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["A", "_", "a"]);
    store.apply(&change).unwrap();
    let names: Vec<String> = store
        .read()
        .unwrap()
        .iter()
        .map(|(n, _)| n.to_string())
        .collect();
    assert_eq!(names, ["A", "a", "_"]);
}
