//! The boot simulator: whole update cycles (activate → trial boots → confirm or fallback) for
//! both schemes, and the boot script's edge cases. Pure, no I/O.

use bootctl::boot_script::{self, BootEvent};
use bootctl::scheme::{self, SchemeError, SchemeKind, Slot};
use bootctl::{ChangeSet, Env};
use proptest::prelude::*;

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs.iter().copied().collect()
}

fn changes(pairs: &[(&str, Option<&str>)]) -> ChangeSet {
    pairs.iter().copied().collect()
}

/// One power-on: what the script decides, saved into `env`.
fn boot(env: &mut Env, kind: SchemeKind) -> Slot {
    let (slot, change) = boot_script::power_on(env, kind);
    env.apply(&change)
        .expect("the script saves a valid change set");
    slot
}

/// One transition of the scheme, computed on `env` and applied to it.
fn step(env: &mut Env, transition: impl FnOnce(&Env) -> Result<ChangeSet, SchemeError>) {
    let change = transition(env).expect("transition allowed");
    env.apply(&change).expect("valid change set");
}

fn transition(env: &mut Env, change: ChangeSet) {
    env.apply(&change).expect("valid change set");
}

// ---------------------------------------------------------------- bootcount

#[test]
fn bootcount_normal_boot_saves_nothing() {
    let base = env(&[("bootctl_slot", "B"), ("upgrade_available", "0")]);
    let decision = boot_script::decide(&base, SchemeKind::Bootcount, 3);
    assert_eq!(decision.slot, Slot::B);
    assert!(decision.changes.is_empty());
    assert_eq!(decision.event, BootEvent::Normal);
    assert_eq!(
        boot_script::power_on(&Env::new(), SchemeKind::Bootcount).0,
        Slot::A
    );
}

#[test]
fn bootcount_activate_trial_boot_confirm() {
    let s = scheme::for_kind(SchemeKind::Bootcount, 3);
    let mut e = env(&[("bootcmd", "run ddi_boot")]);
    assert_eq!(boot(&mut e, SchemeKind::Bootcount), Slot::A);
    step(&mut e, |e| s.activate(e, Slot::B));

    let decision = boot_script::decide(&e, SchemeKind::Bootcount, 3);
    assert_eq!(decision.slot, Slot::B);
    assert_eq!(decision.changes, changes(&[("bootcount", Some("1"))]));
    assert_eq!(decision.event, BootEvent::Trial { count: 1, limit: 3 });
    assert_eq!(boot(&mut e, SchemeKind::Bootcount), Slot::B);

    let confirm = s.mark_good(&e, Slot::B).unwrap();
    assert_eq!(
        confirm,
        changes(&[("upgrade_available", Some("0")), ("bootcount", Some("0"))])
    );
    transition(&mut e, confirm);
    // Confirmed: B on every later boot, and U-Boot saves nothing any more.
    for _ in 0..5 {
        let (slot, change) = boot_script::power_on(&e, SchemeKind::Bootcount);
        assert_eq!(slot, Slot::B);
        assert!(change.is_empty());
    }
    assert_eq!(e.get("bootcmd"), Some("run ddi_boot"));
}

#[test]
fn bootcount_no_confirm_falls_back_after_bootlimit() {
    for attempts in [1u32, 2, 3, 9, 10, 12] {
        let s = scheme::for_kind(SchemeKind::Bootcount, attempts);
        let mut e = Env::new();
        step(&mut e, |e| s.activate(e, Slot::B));
        for trial in 1..=attempts {
            assert_eq!(
                boot(&mut e, SchemeKind::Bootcount),
                Slot::B,
                "trial {trial} of {attempts}"
            );
            assert_eq!(e.get("bootcount"), Some(trial.to_string().as_str()));
            assert_eq!(s.trial(&e), Some(true));
        }
        assert_eq!(s.next(&e), Slot::A, "next after {attempts} trials");
        let decision = boot_script::decide(&e, SchemeKind::Bootcount, 3);
        assert_eq!(
            decision.event,
            BootEvent::Fallback {
                from: Slot::B,
                count: u64::from(attempts) + 1,
                limit: u64::from(attempts),
            }
        );
        assert_eq!(
            decision.changes,
            changes(&[
                ("bootctl_slot", Some("A")),
                ("upgrade_available", Some("0")),
                ("bootcount", Some("0")),
            ])
        );
        assert_eq!(boot(&mut e, SchemeKind::Bootcount), Slot::A);
        // Rolled back: booted A != activated B, nothing on trial, A stays.
        assert_eq!(s.trial(&e), Some(false));
        assert!(s.mark_good(&e, Slot::A).unwrap().is_empty());
        assert_eq!(boot(&mut e, SchemeKind::Bootcount), Slot::A);
    }
}

#[test]
fn bootcount_missing_bootlimit_is_the_script_default() {
    let mut e = env(&[("bootctl_slot", "B"), ("upgrade_available", "1")]);
    for _ in 0..boot_script::SCRIPT_DEFAULT_ATTEMPTS {
        assert_eq!(boot(&mut e, SchemeKind::Bootcount), Slot::B);
    }
    assert_eq!(boot(&mut e, SchemeKind::Bootcount), Slot::A);
    // A scheme with other attempts says the same as the script with those defaults.
    let e = env(&[
        ("bootctl_slot", "B"),
        ("upgrade_available", "1"),
        ("bootcount", "4"),
    ]);
    assert_eq!(
        boot_script::decide(&e, SchemeKind::Bootcount, 5).slot,
        Slot::B
    );
    assert_eq!(
        boot_script::decide(&e, SchemeKind::Bootcount, 4).slot,
        Slot::A
    );
    assert_eq!(scheme::for_kind(SchemeKind::Bootcount, 5).next(&e), Slot::B);
}

#[test]
fn bootcount_bootlimit_zero_disables_the_fallback() {
    let mut e = env(&[
        ("bootctl_slot", "B"),
        ("upgrade_available", "1"),
        ("bootlimit", "0"),
    ]);
    for _ in 0..120 {
        assert_eq!(boot(&mut e, SchemeKind::Bootcount), Slot::B);
    }
    assert_eq!(e.get("bootcount"), Some("100"));
}

#[test]
fn bootcount_increment_is_the_scripts_lookup() {
    assert_eq!(boot_script::script_increment(None), 1);
    assert_eq!(boot_script::script_increment(Some("0")), 1);
    assert_eq!(boot_script::script_increment(Some("9")), 10);
    assert_eq!(boot_script::script_increment(Some("98")), 99);
    for beyond in ["99", "100", "250", "007", "3x", "abc", "-1", " 1"] {
        assert_eq!(
            boot_script::script_increment(Some(beyond)),
            100,
            "{beyond:?}"
        );
    }
    // 99 is still enforced: 100 > 99.
    let e = env(&[
        ("bootctl_slot", "A"),
        ("upgrade_available", "1"),
        ("bootcount", "99"),
        ("bootlimit", "99"),
    ]);
    assert_eq!(
        boot_script::decide(&e, SchemeKind::Bootcount, 3).slot,
        Slot::B
    );
    // Garbage in bootcount counts as exhausted.
    let e = env(&[
        ("bootctl_slot", "A"),
        ("upgrade_available", "1"),
        ("bootcount", "junk"),
    ]);
    assert_eq!(
        boot_script::decide(&e, SchemeKind::Bootcount, 3).slot,
        Slot::B
    );
}

#[test]
fn bootcount_reads_like_the_script() {
    // Anything but "B" boots A; only "1" is a trial.
    for (slot, expected) in [
        ("B", Slot::B),
        ("A", Slot::A),
        ("b", Slot::A),
        ("", Slot::A),
    ] {
        let e = env(&[("bootctl_slot", slot)]);
        assert_eq!(
            boot_script::decide(&e, SchemeKind::Bootcount, 3).slot,
            expected
        );
    }
    let e = env(&[
        ("bootctl_slot", "B"),
        ("upgrade_available", "yes"),
        ("bootcount", "50"),
    ]);
    assert_eq!(
        boot_script::decide(&e, SchemeKind::Bootcount, 3).event,
        BootEvent::Normal
    );
}

#[test]
fn bootcount_mark_bad_during_trial_goes_back() {
    let s = scheme::for_kind(SchemeKind::Bootcount, 3);
    let mut e = Env::new();
    step(&mut e, |e| s.activate(e, Slot::B));
    assert_eq!(boot(&mut e, SchemeKind::Bootcount), Slot::B);
    // Health check failed on B: the agent marks it bad.
    step(&mut e, |e| s.mark_bad(e, Slot::B));
    assert_eq!(s.next(&e), Slot::A);
    assert_eq!(boot(&mut e, SchemeKind::Bootcount), Slot::A);
    assert_eq!(s.trial(&e), Some(false));
}

// ---------------------------------------------------------------- rauc

#[test]
fn rauc_first_boot_saves_only_the_decremented_counter() {
    let decision = boot_script::decide(&Env::new(), SchemeKind::Rauc, 3);
    assert_eq!(decision.slot, Slot::A);
    assert_eq!(decision.event, BootEvent::Attempt { left: 2 });
    assert_eq!(decision.changes, changes(&[("BOOT_A_LEFT", Some("2"))]));
}

#[test]
fn a_save_drops_empty_variables_like_uboot_import() {
    // libubootenv keeps "BOOT_ORDER=" (RAUC marked both bad); U-Boot's import drops it, so the
    // script's save does not contain it.
    let e = env(&[
        ("BOOT_ORDER", ""),
        ("BOOT_A_LEFT", "0"),
        ("BOOT_B_LEFT", "2"),
        ("vendor", ""),
    ]);
    let decision = boot_script::decide(&e, SchemeKind::Rauc, 3);
    assert_eq!(decision.slot, Slot::B);
    assert_eq!(
        decision.changes,
        changes(&[
            ("BOOT_ORDER", None),
            ("vendor", None),
            ("BOOT_B_LEFT", Some("1")),
        ])
    );
    // bootcount: only when the script saves (a trial boot).
    let e = env(&[("empty", ""), ("upgrade_available", "0")]);
    assert!(boot_script::decide(&e, SchemeKind::Bootcount, 3)
        .changes
        .is_empty());
    let e = env(&[("empty", ""), ("upgrade_available", "1")]);
    assert_eq!(
        boot_script::decide(&e, SchemeKind::Bootcount, 3).changes,
        changes(&[("empty", None), ("bootcount", Some("1"))])
    );
}

#[test]
fn rauc_counters_above_ff_count_down_from_ff() {
    for (value, after) in [
        ("100", "ff"),
        ("1ff", "ff"),
        ("ff", "fe"),
        ("10", "f"),
        ("03", "2"),
    ] {
        let e = env(&[("BOOT_ORDER", "B A"), ("BOOT_B_LEFT", value)]);
        assert_eq!(
            boot_script::decide(&e, SchemeKind::Rauc, 3).changes,
            changes(&[("BOOT_B_LEFT", Some(after))]),
            "{value}"
        );
    }
}

#[test]
fn rauc_order_is_walked_like_the_script() {
    assert_eq!(boot_script::script_boot_order(None), [Slot::A, Slot::B]);
    assert_eq!(boot_script::script_boot_order(Some("")), [Slot::A, Slot::B]);
    assert_eq!(
        boot_script::script_boot_order(Some("X Y")),
        [Slot::A, Slot::B]
    );
    assert_eq!(boot_script::script_boot_order(Some("X B")), [Slot::B]);
    assert_eq!(
        boot_script::script_boot_order(Some("B A")),
        [Slot::B, Slot::A]
    );
    // Only B in the order and nothing left: reset, then B again.
    let e = env(&[
        ("BOOT_ORDER", "B"),
        ("BOOT_B_LEFT", "0"),
        ("BOOT_A_LEFT", "3"),
    ]);
    let decision = boot_script::decide(&e, SchemeKind::Rauc, 3);
    assert_eq!(decision.slot, Slot::B);
    assert_eq!(decision.event, BootEvent::CountersReset { left: 2 });
}

#[test]
fn rauc_activate_trial_boot_confirm() {
    let s = scheme::for_kind(SchemeKind::Rauc, 3);
    let mut e = env(&[
        ("BOOT_ORDER", "A B"),
        ("BOOT_A_LEFT", "3"),
        ("BOOT_B_LEFT", "3"),
    ]);
    assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::A);
    step(&mut e, |e| s.mark_good(e, Slot::A));
    step(&mut e, |e| s.activate(e, Slot::B));
    assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::B);
    assert_eq!(e.get("BOOT_B_LEFT"), Some("2"));
    step(&mut e, |e| s.mark_good(e, Slot::B));
    assert_eq!(e.get("BOOT_B_LEFT"), Some("3"));
    // Confirmed each boot: B forever.
    for _ in 0..10 {
        assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::B);
        step(&mut e, |e| s.mark_good(e, Slot::B));
    }
}

#[test]
fn rauc_no_confirm_falls_back_after_attempts() {
    // The transcript of real U-Boot in uboot.md §7.1: B_LEFT 2, 1, 0, then A with A_LEFT=2.
    let s = scheme::for_kind(SchemeKind::Rauc, 3);
    let mut e = env(&[
        ("BOOT_ORDER", "A B"),
        ("BOOT_A_LEFT", "3"),
        ("BOOT_B_LEFT", "3"),
    ]);
    step(&mut e, |e| s.activate(e, Slot::B));
    for left in ["2", "1", "0"] {
        assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::B);
        assert_eq!(e.get("BOOT_B_LEFT"), Some(left));
    }
    assert_eq!(s.next(&e), Slot::A);
    assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::A);
    assert_eq!(e.get("BOOT_A_LEFT"), Some("2"));
    assert_eq!(e.get("BOOT_B_LEFT"), Some("0"));
    assert_eq!(e.get("BOOT_ORDER"), Some("B A"));
}

#[test]
fn rauc_hex_counters_of_ten_and_more() {
    let attempts = 12u32;
    let s = scheme::for_kind(SchemeKind::Rauc, attempts);
    let mut e = Env::new();
    step(&mut e, |e| s.activate(e, Slot::B));
    assert_eq!(e.get("BOOT_B_LEFT"), Some("c"));
    let mut seen = Vec::new();
    for _ in 0..attempts {
        assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::B);
        seen.push(e.get("BOOT_B_LEFT").unwrap().to_string());
    }
    assert_eq!(
        seen,
        ["b", "a", "9", "8", "7", "6", "5", "4", "3", "2", "1", "0"]
    );
    assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::A);
    // 16 attempts: "10" is sixteen, not ten.
    let mut e = env(&[("BOOT_ORDER", "B A"), ("BOOT_B_LEFT", "10")]);
    for _ in 0..16 {
        assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::B);
    }
    assert_eq!(e.get("BOOT_B_LEFT"), Some("0"));
    assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::A);
}

#[test]
fn rauc_nothing_bootable_resets_counters_like_raucs_script() {
    let e = env(&[
        ("BOOT_ORDER", "B A"),
        ("BOOT_A_LEFT", "0"),
        ("BOOT_B_LEFT", "0"),
    ]);
    let decision = boot_script::decide(&e, SchemeKind::Rauc, 3);
    assert_eq!(decision.slot, Slot::B);
    assert_eq!(decision.event, BootEvent::CountersReset { left: 2 });
    assert_eq!(
        decision.changes,
        changes(&[("BOOT_A_LEFT", Some("3")), ("BOOT_B_LEFT", Some("2"))])
    );
    // Both marked bad by RAUC: the order is gone, U-Boot reads "A B".
    let e = env(&[("BOOT_A_LEFT", "0"), ("BOOT_B_LEFT", "0")]);
    let decision = boot_script::decide(&e, SchemeKind::Rauc, 3);
    assert_eq!(decision.slot, Slot::A);
    assert_eq!(
        decision.changes,
        changes(&[("BOOT_B_LEFT", Some("3")), ("BOOT_A_LEFT", Some("2"))])
    );
}

#[test]
fn rauc_mark_bad_skips_the_slot() {
    let s = scheme::for_kind(SchemeKind::Rauc, 3);
    let mut e = Env::new();
    step(&mut e, |e| s.activate(e, Slot::B));
    assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::B);
    step(&mut e, |e| s.mark_bad(e, Slot::B));
    assert_eq!(e.get("BOOT_ORDER"), Some("A"));
    for _ in 0..3 {
        assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::A);
        step(&mut e, |e| s.mark_good(e, Slot::A));
    }
    // Activating B again brings it back.
    step(&mut e, |e| s.activate(e, Slot::B));
    assert_eq!(boot(&mut e, SchemeKind::Rauc), Slot::B);
}

#[test]
fn rauc_reads_like_the_script() {
    // Unknown names are skipped; RAUC 1.8 decimal "12" is read as hex 0x12.
    let e = env(&[("BOOT_ORDER", "X B A"), ("BOOT_B_LEFT", "12")]);
    let decision = boot_script::decide(&e, SchemeKind::Rauc, 3);
    assert_eq!(decision.slot, Slot::B);
    assert_eq!(decision.event, BootEvent::Attempt { left: 0x11 });
    // An order that names no slot boots A after the reset.
    let e = env(&[
        ("BOOT_ORDER", "X"),
        ("BOOT_A_LEFT", "3"),
        ("BOOT_B_LEFT", "3"),
    ]);
    assert_eq!(boot_script::decide(&e, SchemeKind::Rauc, 3).slot, Slot::A);
}

// ---------------------------------------------------------------- properties

fn bootcount_env() -> impl Strategy<Value = Env> {
    let slot = prop::option::of(prop_oneof!["A", "B", "C", ""]);
    let flag = prop::option::of(prop_oneof!["0", "1", "2"]);
    let number = prop::option::of(prop_oneof!["[0-9]{1,3}", "[a-z]{1,2}"]);
    (slot, flag, number.clone(), number).prop_map(|(slot, flag, count, limit)| {
        let mut e = Env::new();
        for (name, value) in [
            ("bootctl_slot", slot),
            ("upgrade_available", flag),
            ("bootcount", count),
            ("bootlimit", limit),
        ] {
            if let Some(value) = value {
                if !value.is_empty() {
                    e.set(name, &value).unwrap();
                }
            }
        }
        e
    })
}

fn rauc_env() -> impl Strategy<Value = Env> {
    let order = prop::option::of(prop_oneof!["A B", "B A", "A", "B", "B A X"]);
    let left = prop::option::of(prop_oneof!["[0-9a-f]{1,2}", "zz"]);
    (order, left.clone(), left).prop_map(|(order, a, b)| {
        let mut e = Env::new();
        for (name, value) in [
            ("BOOT_ORDER", order),
            ("BOOT_A_LEFT", a),
            ("BOOT_B_LEFT", b),
        ] {
            if let Some(value) = value {
                e.set(name, &value).unwrap();
            }
        }
        e
    })
}

fn check_cycle(kind: SchemeKind, base: &Env, attempts: u32, target: Slot) {
    let s = scheme::for_kind(kind, attempts);
    // `next` is the simulator's decision.
    assert_eq!(s.next(base), boot_script::decide(base, kind, attempts).slot);
    let Ok(activate) = s.activate(base, target) else {
        return; // refused (invalid variables): nothing to simulate
    };
    let mut e = base.clone();
    transition(&mut e, activate);
    assert_eq!(s.next(&e), target);
    // The first trial boot runs the target; confirming keeps it.
    let (slot, change) = boot_script::power_on(&e, kind);
    assert_eq!(slot, target);
    transition(&mut e, change);
    step(&mut e, |e| s.mark_good(e, target));
    for _ in 0..3 {
        assert_eq!(boot(&mut e, kind), target);
        step(&mut e, |e| s.mark_good(e, target));
    }
}

proptest! {
    #[test]
    fn bootcount_activate_then_confirm_always_sticks(
        base in bootcount_env(), attempts in 1u32..20, target in prop_oneof![Just(Slot::A), Just(Slot::B)]
    ) {
        check_cycle(SchemeKind::Bootcount, &base, attempts, target);
    }

    #[test]
    fn rauc_activate_then_confirm_always_sticks(
        base in rauc_env(), attempts in 1u32..40, target in prop_oneof![Just(Slot::A), Just(Slot::B)]
    ) {
        check_cycle(SchemeKind::Rauc, &base, attempts, target);
    }

    #[test]
    fn unconfirmed_trial_always_returns_to_the_other_slot(
        attempts in 1u32..20, target in prop_oneof![Just(Slot::A), Just(Slot::B)],
        rauc in any::<bool>()
    ) {
        let kind = if rauc { SchemeKind::Rauc } else { SchemeKind::Bootcount };
        let s = scheme::for_kind(kind, attempts);
        let mut e = Env::new();
        // Start confirmed on the other slot.
        step(&mut e, |e| s.activate(e, target.other()));
        boot(&mut e, kind);
        step(&mut e, |e| s.mark_good(e, target.other()));
        step(&mut e, |e| s.activate(e, target));
        for _ in 0..attempts {
            prop_assert_eq!(boot(&mut e, kind), target);
        }
        prop_assert_eq!(boot(&mut e, kind), target.other());
        // The agent on the old slot confirms it (rauc: its counter was used up by this boot).
        step(&mut e, |e| s.mark_good(e, target.other()));
        prop_assert_eq!(boot(&mut e, kind), target.other());
    }
}
