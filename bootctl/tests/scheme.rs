//! Transitions of both slot schemes, pure (no I/O): exact change sets, defaults, errors.

use bootctl::scheme::{self, Bootcount, Rauc, Scheme, SchemeError, SchemeKind, Slot};
use bootctl::{ChangeSet, Env};

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs.iter().copied().collect()
}

fn changes(pairs: &[(&str, Option<&str>)]) -> ChangeSet {
    pairs.iter().copied().collect()
}

fn applied(env: &Env, change: &ChangeSet) -> Env {
    let mut next = env.clone();
    next.apply(change).expect("valid change set");
    next
}

// ---------------------------------------------------------------- Slot / SchemeKind

#[test]
fn slot_names_round_trip_and_other() {
    assert_eq!("A".parse::<Slot>().unwrap(), Slot::A);
    assert_eq!("B".parse::<Slot>().unwrap(), Slot::B);
    assert_eq!(Slot::A.to_string(), "A");
    assert_eq!(Slot::B.to_string(), "B");
    assert_eq!(Slot::A.other(), Slot::B);
    assert_eq!(Slot::B.other(), Slot::A);
    for bad in ["a", "C", "", " A", "AB"] {
        let err = bad.parse::<Slot>().unwrap_err();
        assert!(err.to_string().contains("expected A or B"), "{err}");
    }
    assert_eq!(serde_json::to_string(&Slot::B).unwrap(), "\"B\"");
}

#[test]
fn scheme_kind_names() {
    assert_eq!(
        "bootcount".parse::<SchemeKind>().unwrap(),
        SchemeKind::Bootcount
    );
    assert_eq!("rauc".parse::<SchemeKind>().unwrap(), SchemeKind::Rauc);
    assert!("RAUC".parse::<SchemeKind>().is_err());
    assert!("barebox".parse::<SchemeKind>().is_err());
    assert_eq!(SchemeKind::default(), SchemeKind::Bootcount);
    assert_eq!(SchemeKind::Rauc.to_string(), "rauc");
    assert_eq!(
        serde_json::to_string(&SchemeKind::Bootcount).unwrap(),
        "\"bootcount\""
    );
    assert_eq!(
        scheme::for_kind(SchemeKind::Rauc, 5).kind(),
        SchemeKind::Rauc
    );
    assert_eq!(scheme::for_kind(SchemeKind::Rauc, 5).attempts(), 5);
    assert_eq!(
        scheme::for_kind(SchemeKind::Bootcount, 2).kind(),
        SchemeKind::Bootcount
    );
}

// ---------------------------------------------------------------- bootcount

#[test]
fn bootcount_missing_variables_read_as_defaults() {
    let s = Bootcount::new(3);
    let empty = Env::new();
    assert_eq!(s.next(&empty), Slot::A);
    assert_eq!(s.trial(&empty), Some(false));
    assert!(s.variables(&empty).is_empty());
    assert_eq!(Bootcount::configured_slot(&empty).unwrap(), Slot::A);
}

#[test]
fn bootcount_activate_writes_all_four_in_one_change_set() {
    let s = Bootcount::new(3);
    let base = env(&[("bootcmd", "run ddi"), ("bootctl_slot", "A")]);
    let change = s.activate(&base, Slot::B).unwrap();
    assert_eq!(
        change,
        changes(&[
            ("bootctl_slot", Some("B")),
            ("upgrade_available", Some("1")),
            ("bootcount", Some("0")),
            ("bootlimit", Some("3")),
        ])
    );
    let after = applied(&base, &change);
    assert_eq!(s.next(&after), Slot::B);
    assert_eq!(s.trial(&after), Some(true));
    assert_eq!(after.get("bootcmd"), Some("run ddi"));
}

#[test]
fn bootcount_activate_keeps_the_integrators_bootlimit() {
    let s = Bootcount::new(3);
    let base = env(&[("bootlimit", "5"), ("bootcount", "7")]);
    assert_eq!(
        s.activate(&base, Slot::B).unwrap(),
        changes(&[
            ("bootctl_slot", Some("B")),
            ("upgrade_available", Some("1")),
            ("bootcount", Some("0")),
        ])
    );
    // An empty bootlimit is no bootlimit for U-Boot: the configured attempts are written.
    let empty_limit = env(&[("bootlimit", "")]);
    let change = s.activate(&empty_limit, Slot::A).unwrap();
    assert!(
        change.iter().any(|c| c == ("bootlimit", Some("3"))),
        "{change}"
    );
}

#[test]
fn bootcount_activate_same_state_again_changes_nothing() {
    let s = Bootcount::new(3);
    let base = env(&[
        ("bootctl_slot", "B"),
        ("upgrade_available", "1"),
        ("bootcount", "0"),
        ("bootlimit", "3"),
    ]);
    assert!(s.activate(&base, Slot::B).unwrap().is_empty());
}

#[test]
fn bootcount_activate_refuses_a_bootlimit_the_script_cannot_enforce() {
    let s = Bootcount::new(3);
    let err = s
        .activate(&env(&[("bootlimit", "three")]), Slot::B)
        .unwrap_err();
    assert!(
        matches!(
            err,
            SchemeError::InvalidVariable {
                name: "bootlimit",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("bootlimit=\"three\""), "{err}");
    // The script reads "00" as not-zero (string compare) and U-Boot as 0: refused.
    for ambiguous in ["00", "03", "+3", "-1", " 3"] {
        let err = s
            .activate(&env(&[("bootlimit", ambiguous)]), Slot::B)
            .unwrap_err();
        assert!(err.to_string().contains("without leading zeros"), "{err}");
    }
    let err = s
        .activate(&env(&[("bootlimit", "100")]), Slot::B)
        .unwrap_err();
    assert!(
        matches!(err, SchemeError::BootlimitTooHigh { .. }),
        "{err:?}"
    );
    // 99 is still enforced (bootcount 100 > 99).
    assert!(s.activate(&env(&[("bootlimit", "99")]), Slot::B).is_ok());
}

#[test]
fn attempts_are_validated_per_scheme() {
    for kind in [SchemeKind::Bootcount, SchemeKind::Rauc] {
        let err = scheme::for_kind(kind, 0)
            .activate(&Env::new(), Slot::B)
            .unwrap_err();
        assert!(err.to_string().contains("at least 1"), "{err}");
    }
    let err = Bootcount::new(100)
        .activate(&Env::new(), Slot::B)
        .unwrap_err();
    assert!(err.to_string().contains("at most 99"), "{err}");
    assert!(Bootcount::new(99).activate(&Env::new(), Slot::B).is_ok());
    assert!(Rauc::new(300).activate(&Env::new(), Slot::B).is_ok());
    assert!(scheme::validate_attempts(SchemeKind::Rauc, 1).is_ok());
}

#[test]
fn bootcount_mark_good_on_trial_clears_it() {
    let s = Bootcount::new(3);
    let base = env(&[
        ("bootctl_slot", "B"),
        ("upgrade_available", "1"),
        ("bootcount", "2"),
        ("bootlimit", "3"),
    ]);
    let change = s.mark_good(&base, Slot::B).unwrap();
    assert_eq!(
        change,
        changes(&[("upgrade_available", Some("0")), ("bootcount", Some("0"))])
    );
    let after = applied(&base, &change);
    assert_eq!(s.trial(&after), Some(false));
    assert_eq!(s.next(&after), Slot::B);
    // Confirming again writes nothing.
    assert!(s.mark_good(&after, Slot::B).unwrap().is_empty());
}

#[test]
fn bootcount_mark_good_without_trial_writes_nothing() {
    let s = Bootcount::new(3);
    assert!(s.mark_good(&Env::new(), Slot::A).unwrap().is_empty());
    let leftover = env(&[
        ("bootctl_slot", "B"),
        ("upgrade_available", "0"),
        ("bootcount", "3"),
    ]);
    assert!(s.mark_good(&leftover, Slot::B).unwrap().is_empty());
}

#[test]
fn bootcount_mark_good_on_the_wrong_slot_is_an_error() {
    let s = Bootcount::new(3);
    // Rolled back: U-Boot boots A, but the caller believes B runs.
    let base = env(&[("bootctl_slot", "A"), ("upgrade_available", "0")]);
    let err = s.mark_good(&base, Slot::B).unwrap_err();
    assert_eq!(
        err,
        SchemeError::NotTheBootSlot {
            booted: Slot::B,
            variable: "bootctl_slot",
            configured: Slot::A,
        }
    );
    assert!(err.to_string().contains("cannot mark slot B good"), "{err}");
    // Missing bootctl_slot is A.
    assert!(s.mark_good(&Env::new(), Slot::B).is_err());
}

#[test]
fn bootcount_invalid_slot_variable_is_an_error() {
    let s = Bootcount::new(3);
    let base = env(&[("bootctl_slot", "C"), ("upgrade_available", "1")]);
    for result in [s.mark_good(&base, Slot::A), s.mark_bad(&base, Slot::A)] {
        let err = result.unwrap_err();
        assert!(
            matches!(
                err,
                SchemeError::InvalidVariable {
                    name: "bootctl_slot",
                    ..
                }
            ),
            "{err:?}"
        );
    }
    // Activation overwrites it and works.
    assert!(s.activate(&base, Slot::A).is_ok());
}

#[test]
fn bootcount_mark_bad_switches_only_when_it_is_the_boot_slot() {
    let s = Bootcount::new(3);
    let base = env(&[
        ("bootctl_slot", "B"),
        ("upgrade_available", "1"),
        ("bootcount", "1"),
    ]);
    assert_eq!(
        s.mark_bad(&base, Slot::B).unwrap(),
        changes(&[
            ("bootctl_slot", Some("A")),
            ("upgrade_available", Some("0")),
            ("bootcount", Some("0")),
        ])
    );
    assert!(s.mark_bad(&base, Slot::A).unwrap().is_empty());
    // Defaults: slot A is configured, marking it bad moves to B.
    assert_eq!(
        s.mark_bad(&Env::new(), Slot::A).unwrap(),
        changes(&[
            ("bootctl_slot", Some("B")),
            ("upgrade_available", Some("0")),
            ("bootcount", Some("0")),
        ])
    );
}

#[test]
fn bootcount_variables_are_the_stored_ones() {
    let s = Bootcount::new(3);
    let base = env(&[("bootcmd", "x"), ("bootctl_slot", "B"), ("bootlimit", "4")]);
    let vars = s.variables(&base);
    assert_eq!(vars.len(), 2);
    assert_eq!(vars["bootctl_slot"], "B");
    assert_eq!(vars["bootlimit"], "4");
}

// ---------------------------------------------------------------- rauc

#[test]
fn rauc_missing_variables_read_as_defaults() {
    let s = Rauc::new(3);
    let empty = Env::new();
    assert_eq!(s.next(&empty), Slot::A);
    assert_eq!(s.trial(&empty), None);
    assert_eq!(Rauc::boot_order(&empty).unwrap(), vec![Slot::A, Slot::B]);
    assert_eq!(
        Rauc::boot_order(&env(&[("BOOT_ORDER", "")])).unwrap(),
        vec![Slot::A, Slot::B]
    );
}

#[test]
fn rauc_activate_puts_the_slot_first_with_fresh_attempts() {
    let s = Rauc::new(3);
    let base = env(&[
        ("BOOT_ORDER", "A B"),
        ("BOOT_A_LEFT", "3"),
        ("BOOT_B_LEFT", "0"),
    ]);
    let change = s.activate(&base, Slot::B).unwrap();
    assert_eq!(
        change,
        changes(&[("BOOT_B_LEFT", Some("3")), ("BOOT_ORDER", Some("B A"))])
    );
    let after = applied(&base, &change);
    assert_eq!(s.next(&after), Slot::B);
    assert_eq!(s.trial(&after), None);
}

#[test]
fn rauc_activate_adds_a_removed_slot_back() {
    let s = Rauc::new(3);
    // After `mark-bad A` RAUC leaves "B".
    let base = env(&[("BOOT_ORDER", "B"), ("BOOT_A_LEFT", "0")]);
    assert_eq!(
        s.activate(&base, Slot::A).unwrap(),
        changes(&[("BOOT_A_LEFT", Some("3")), ("BOOT_ORDER", Some("A B"))])
    );
    // Only the other slot left in the order: X goes first, the other one stays.
    let base = env(&[("BOOT_ORDER", "A"), ("BOOT_B_LEFT", "0")]);
    assert_eq!(
        s.activate(&base, Slot::A).unwrap(),
        changes(&[("BOOT_A_LEFT", Some("3")), ("BOOT_ORDER", Some("A B"))])
    );
}

#[test]
fn rauc_counters_are_written_in_hex() {
    let s = Rauc::new(12);
    assert_eq!(
        s.activate(&Env::new(), Slot::B).unwrap(),
        changes(&[("BOOT_B_LEFT", Some("c")), ("BOOT_ORDER", Some("B A"))])
    );
    assert_eq!(
        Rauc::new(16).mark_good(&Env::new(), Slot::A).unwrap(),
        changes(&[("BOOT_A_LEFT", Some("10"))])
    );
    assert_eq!(
        Rauc::new(255).mark_good(&Env::new(), Slot::A).unwrap(),
        changes(&[("BOOT_A_LEFT", Some("ff"))])
    );
}

#[test]
fn rauc_mark_good_resets_the_booted_counter_only() {
    let s = Rauc::new(3);
    let base = env(&[
        ("BOOT_ORDER", "B A"),
        ("BOOT_A_LEFT", "3"),
        ("BOOT_B_LEFT", "2"),
    ]);
    assert_eq!(
        s.mark_good(&base, Slot::B).unwrap(),
        changes(&[("BOOT_B_LEFT", Some("3"))])
    );
    assert!(s.mark_good(&base, Slot::A).unwrap().is_empty());
}

#[test]
fn rauc_mark_bad_zeroes_and_removes_like_rauc() {
    let s = Rauc::new(3);
    let base = env(&[
        ("BOOT_ORDER", "B A"),
        ("BOOT_A_LEFT", "3"),
        ("BOOT_B_LEFT", "1"),
    ]);
    let change = s.mark_bad(&base, Slot::B).unwrap();
    assert_eq!(
        change,
        changes(&[("BOOT_B_LEFT", Some("0")), ("BOOT_ORDER", Some("A"))])
    );
    let after = applied(&base, &change);
    assert_eq!(Rauc::boot_order(&after).unwrap(), vec![Slot::A]);
    assert_eq!(s.next(&after), Slot::A);
    // Marking it bad again changes nothing.
    assert!(s.mark_bad(&after, Slot::B).unwrap().is_empty());
    // Marking the last slot bad: the order cannot be stored empty, so it is unset.
    let change = s.mark_bad(&after, Slot::A).unwrap();
    assert_eq!(
        change,
        changes(&[("BOOT_A_LEFT", Some("0")), ("BOOT_ORDER", None)])
    );
    // Missing order reads as "A B": mark-bad B leaves "A".
    assert_eq!(
        s.mark_bad(&Env::new(), Slot::B).unwrap(),
        changes(&[("BOOT_B_LEFT", Some("0")), ("BOOT_ORDER", Some("A"))])
    );
}

#[test]
fn rauc_invalid_boot_order_is_refused() {
    let s = Rauc::new(3);
    let base = env(&[("BOOT_ORDER", "system0 system1")]);
    for err in [
        s.activate(&base, Slot::A).unwrap_err(),
        s.mark_bad(&base, Slot::A).unwrap_err(),
    ] {
        assert!(
            matches!(
                err,
                SchemeError::InvalidVariable {
                    name: "BOOT_ORDER",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("system0 system1"), "{err}");
    }
}

#[test]
fn rauc_next_compares_counters_as_hex() {
    let s = Rauc::new(3);
    // "a" is 10 attempts, not 0 (RAUC's example script got this wrong with `test -gt`).
    let base = env(&[("BOOT_ORDER", "B A"), ("BOOT_B_LEFT", "a")]);
    assert_eq!(s.next(&base), Slot::B);
    let base = env(&[("BOOT_ORDER", "B A"), ("BOOT_B_LEFT", "0")]);
    assert_eq!(s.next(&base), Slot::A);
}

#[test]
fn rauc_variables_are_the_stored_ones() {
    let s = Rauc::new(3);
    let base = env(&[
        ("BOOT_ORDER", "B"),
        ("BOOT_B_LEFT", "0"),
        ("bootctl_slot", "A"),
    ]);
    let vars = s.variables(&base);
    assert_eq!(vars.len(), 2);
    assert_eq!(vars["BOOT_ORDER"], "B");
    assert_eq!(vars["BOOT_B_LEFT"], "0");
}

#[test]
fn every_change_set_is_valid_for_the_codec() {
    let envs = [
        Env::new(),
        env(&[("BOOT_ORDER", "B A"), ("BOOT_B_LEFT", "0")]),
        env(&[("bootctl_slot", "B"), ("upgrade_available", "1")]),
    ];
    for kind in [SchemeKind::Bootcount, SchemeKind::Rauc] {
        let s = scheme::for_kind(kind, 3);
        for base in &envs {
            for slot in Slot::ALL {
                for change in [
                    s.activate(base, slot),
                    s.mark_good(base, slot),
                    s.mark_bad(base, slot),
                ]
                .into_iter()
                .flatten()
                {
                    change.validate().unwrap();
                }
            }
        }
    }
}

/// Review: `bootlimit=0` turns the boot script's fallback off, so a trial activated under it
/// has no way back: an image that does not come up hangs or reboot-loops in the new slot for
/// ever. A limit above 99 is refused at activation for exactly that reason; 0 must be too.
#[test]
fn bootcount_activate_refuses_a_bootlimit_that_turns_the_fallback_off() {
    let s = Bootcount::new(3);
    let base = env(&[("bootlimit", "0")]);
    let result = s.activate(&base, Slot::B);
    assert!(result.is_err(), "activated with no fallback: {result:?}");
}
