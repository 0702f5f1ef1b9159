//! Interoperability with Debian's real tools, both ways: `fw_printenv`/`fw_setenv` from
//! `libubootenv-tool` (with `-c CONFIG`) and `mkenvimage` from `u-boot-tools`. What we write
//! they read, what they write we read, on single and redundant environments, and saves by
//! both sides taking turns on the same pair of copies.
//!
//! The tools are required: a missing tool fails these tests. Set `DDI_SKIP_INTEROP=1` to skip
//! them on a machine without the packages (CI installs them).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use bootctl::env::{create_image, decode_copy, decode_image, Env, Layout};
use bootctl::fw_env_config::FwEnvConfig;
use bootctl::store::EnvStore;
use bootctl::ChangeSet;

const SIZE: usize = 0x1000;

/// Whether to run; panics when a tool is missing unless skipping was asked for.
fn tools_present() -> bool {
    let missing: Vec<&str> = ["fw_printenv", "fw_setenv", "mkenvimage"]
        .into_iter()
        .filter(|tool| !on_path(tool))
        .collect();
    if missing.is_empty() {
        return true;
    }
    if std::env::var("DDI_SKIP_INTEROP").as_deref() == Ok("1") {
        eprintln!("DDI_SKIP_INTEROP=1: skipping, missing {missing:?}");
        return false;
    }
    panic!(
        "interop tools missing: {missing:?} (apt install libubootenv-tool u-boot-tools, \
         or set DDI_SKIP_INTEROP=1 to skip)"
    );
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(tool).is_file()))
        .unwrap_or(false)
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("tool output is UTF-8")
}

/// An environment file with its fw_env.config and our store on it, in a temp dir.
struct Device {
    dir: tempfile::TempDir,
    image: PathBuf,
    config: PathBuf,
    store: EnvStore,
}

impl Device {
    /// `image_bytes` is written to `env.bin`; the config has one line per copy.
    fn new(image_bytes: &[u8], layout: Layout) -> Device {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("env.bin");
        std::fs::write(&image, image_bytes).unwrap();
        let config = dir.path().join("fw_env.config");
        // Absolute paths for the C tools; our parser resolves relative ones itself.
        let mut text = format!("{} 0x0 {SIZE:#x}\n", image.display());
        if layout == Layout::Redundant {
            text.push_str(&format!("{} {SIZE:#x} {SIZE:#x}\n", image.display()));
        }
        std::fs::write(&config, text).unwrap();
        let store = EnvStore::open(&FwEnvConfig::load(&config).unwrap())
            .unwrap()
            .with_lock_path(dir.path().join("fw_printenv.lock"));
        Device {
            dir,
            image,
            config,
            store,
        }
    }

    /// `fw_printenv -c CONFIG` as a map.
    fn fw_printenv(&self) -> BTreeMap<String, String> {
        let out = run(Command::new("fw_printenv").arg("-c").arg(&self.config));
        out.lines()
            .map(|line| {
                let (name, value) = line
                    .split_once('=')
                    .unwrap_or_else(|| panic!("fw_printenv line without '=': {line:?}"));
                (name.to_string(), value.to_string())
            })
            .collect()
    }

    /// `fw_setenv -c CONFIG -s SCRIPT` with `name=value` lines (`name=` deletes).
    fn fw_setenv_script(&self, lines: &[&str]) {
        let script = self.dir.path().join("script.txt");
        std::fs::write(&script, lines.join("\n") + "\n").unwrap();
        run(Command::new("fw_setenv")
            .arg("-c")
            .arg(&self.config)
            .arg("-s")
            .arg(&script));
    }

    fn ours(&self) -> BTreeMap<String, String> {
        as_map(&self.store.read().unwrap())
    }

    fn flags(&self) -> [u8; 2] {
        let bytes = std::fs::read(&self.image).unwrap();
        [bytes[4], bytes[SIZE + 4]]
    }
}

fn as_map(env: &Env) -> BTreeMap<String, String> {
    env.iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

fn factory_env() -> Env {
    [
        ("bootcmd", "run distro_bootcmd"),
        (
            "bootargs",
            "console=ttyS0,115200 root=PARTUUID=1111-2 rootwait",
        ),
        ("bootdelay", "2"),
        ("vendor_serial", "SN 0042 é"),
    ]
    .into_iter()
    .collect()
}

#[test]
fn redundant_we_write_they_read() {
    if !tools_present() {
        return;
    }
    let image = create_image(&factory_env(), SIZE, Layout::Redundant).unwrap();
    let dev = Device::new(&image, Layout::Redundant);
    assert_eq!(dev.fw_printenv(), as_map(&factory_env()));

    let applied = dev
        .store
        .apply(
            &ChangeSet::new()
                .with("bootctl_slot", "B")
                .with("upgrade_available", "1")
                .with("bootcount", "0")
                .without("bootdelay"),
        )
        .unwrap();
    assert_eq!(applied.saved.unwrap().copy, 1);
    assert_eq!(dev.flags(), [1, 2]);
    let mut expected = as_map(&factory_env());
    expected.remove("bootdelay");
    expected.extend(map(&[
        ("bootctl_slot", "B"),
        ("upgrade_available", "1"),
        ("bootcount", "0"),
    ]));
    assert_eq!(dev.fw_printenv(), expected);
    let value = run(Command::new("fw_printenv")
        .arg("-c")
        .arg(&dev.config)
        .arg("-n")
        .arg("bootctl_slot"));
    assert_eq!(value, "B\n");
}

#[test]
fn redundant_they_write_we_read() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("env.txt");
    std::fs::write(
        &input,
        "bootcmd=run distro_bootcmd\nbootctl_slot=A\nspaces=  two  \nutf8=café\n",
    )
    .unwrap();
    let copy1 = dir.path().join("copy1.bin");
    run(Command::new("mkenvimage")
        .args(["-r", "-s", &format!("{SIZE:#x}"), "-o"])
        .arg(&copy1)
        .arg(&input));
    let mut image = std::fs::read(&copy1).unwrap();
    assert_eq!(image.len(), SIZE);
    image.extend(vec![0xff; SIZE]); // copy 2 erased: a freshly provisioned device
    let dev = Device::new(&image, Layout::Redundant);
    let base = map(&[
        ("bootcmd", "run distro_bootcmd"),
        ("bootctl_slot", "A"),
        ("spaces", "  two  "),
        ("utf8", "café"),
    ]);
    assert_eq!(dev.ours(), base);
    let sel = dev.store.read_selected().unwrap();
    assert_eq!((sel.current, sel.copy.flag), (0, Some(1)));

    dev.fw_setenv_script(&["bootctl_slot=B", "upgrade_available=1", "utf8="]);
    assert_eq!(dev.flags(), [1, 2], "fw_setenv wrote copy 2 with flag 2");
    let mut expected = base.clone();
    expected.insert("bootctl_slot".into(), "B".into());
    expected.insert("upgrade_available".into(), "1".into());
    expected.remove("utf8");
    assert_eq!(dev.ours(), expected);
    assert_eq!(dev.store.read_selected().unwrap().current, 1);

    // Plain `fw_setenv NAME VALUE` too.
    run(Command::new("fw_setenv")
        .arg("-c")
        .arg(&dev.config)
        .args(["bootcount", "3"]));
    assert_eq!(dev.flags(), [3, 2]);
    expected.insert("bootcount".into(), "3".into());
    assert_eq!(dev.ours(), expected);
}

/// Saves by us and by fw_setenv alternate on the same pair: each continues the other's flag
/// counter, writes the other copy, and both always see the same environment.
#[test]
fn redundant_turns_with_fw_setenv() {
    if !tools_present() {
        return;
    }
    let image = create_image(&factory_env(), SIZE, Layout::Redundant).unwrap();
    let dev = Device::new(&image, Layout::Redundant);
    let mut flag = 1u8;
    for round in 0..6 {
        let ours = round % 2 == 0;
        let value = format!("round{round}");
        if ours {
            dev.store
                .apply(&ChangeSet::new().with("turn", value.as_str()))
                .unwrap();
        } else {
            dev.fw_setenv_script(&[&format!("turn={value}")]);
        }
        flag += 1;
        let flags = dev.flags();
        let written = if round % 2 == 0 { 1 } else { 0 };
        assert_eq!(flags[written], flag, "round {round}: flags {flags:?}");
        let theirs = dev.fw_printenv();
        assert_eq!(theirs.get("turn"), Some(&value), "round {round}");
        assert_eq!(dev.ours(), theirs, "round {round}");
    }
}

#[test]
fn single_both_ways() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("env.txt");
    std::fs::write(&input, "bootcmd=boot it\nfoo=bar\n").unwrap();
    let out = dir.path().join("single.bin");
    run(Command::new("mkenvimage")
        .args(["-s", &format!("{SIZE:#x}"), "-o"])
        .arg(&out)
        .arg(&input));
    let dev = Device::new(&std::fs::read(&out).unwrap(), Layout::Single);
    assert!(!dev.store.is_redundant());
    assert_eq!(dev.ours(), map(&[("bootcmd", "boot it"), ("foo", "bar")]));

    dev.store
        .apply(
            &ChangeSet::new()
                .with("foo", "baz")
                .with("BOOT_ORDER", "B A"),
        )
        .unwrap();
    assert_eq!(
        dev.fw_printenv(),
        map(&[
            ("bootcmd", "boot it"),
            ("foo", "baz"),
            ("BOOT_ORDER", "B A")
        ])
    );

    dev.fw_setenv_script(&["BOOT_B_LEFT=2", "foo="]);
    assert_eq!(
        dev.ours(),
        map(&[
            ("bootcmd", "boot it"),
            ("BOOT_ORDER", "B A"),
            ("BOOT_B_LEFT", "2")
        ])
    );
    assert_eq!(std::fs::metadata(&dev.image).unwrap().len(), SIZE as u64);
}

/// Our image encoder and mkenvimage agree on what an environment is: same variables, same
/// order, and with the same padding, the same bytes.
#[test]
fn mkenvimage_matches_our_encoder() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("env.txt");
    std::fs::write(
        &input,
        "bootcmd=run distro_bootcmd\nbootargs=console=ttyS0 root=/dev/mmcblk0p2\nz=1\na=2\n",
    )
    .unwrap();
    for (flags, layout) in [
        (&["-p", "0"][..], Layout::Single),
        (&["-r", "-p", "0"][..], Layout::Redundant),
    ] {
        let out = dir.path().join("img.bin");
        run(Command::new("mkenvimage")
            .args(flags)
            .args(["-s", &format!("{SIZE:#x}"), "-o"])
            .arg(&out)
            .arg(&input));
        let theirs = std::fs::read(&out).unwrap();
        let copy = decode_copy(&theirs, layout).unwrap();
        let names: Vec<&str> = copy.env.iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["bootcmd", "bootargs", "z", "a"], "{layout}");
        let ours = bootctl::env::encode(&copy.env, SIZE, layout).unwrap();
        assert_eq!(ours, theirs, "{layout}: same bytes as mkenvimage -p 0");
    }
}

/// A fresh redundant image from `create_image` reads in fw_printenv from either copy alone.
#[test]
fn created_image_copies_are_each_valid_for_fw_printenv() {
    if !tools_present() {
        return;
    }
    let image = create_image(&factory_env(), SIZE, Layout::Redundant).unwrap();
    for broken in 0..2 {
        let mut damaged = image.clone();
        damaged[broken * SIZE + 100] ^= 0xff;
        let dev = Device::new(&damaged, Layout::Redundant);
        assert_eq!(
            dev.fw_printenv(),
            as_map(&factory_env()),
            "copy {broken} broken"
        );
        assert_eq!(dev.ours(), as_map(&factory_env()));
        let sel =
            decode_image(&std::fs::read(&dev.image).unwrap(), SIZE, Layout::Redundant).unwrap();
        assert_eq!(sel.current, 1 - broken);
    }
}

/// Both copies bad: fw_printenv fails (no default env file given) and we refuse, writing
/// nothing.
#[test]
fn both_bad_fails_in_both() {
    if !tools_present() {
        return;
    }
    let mut image = create_image(&factory_env(), SIZE, Layout::Redundant).unwrap();
    image[100] ^= 1;
    image[SIZE + 100] ^= 1;
    let dev = Device::new(&image, Layout::Redundant);
    let missing_default: &Path = &dev.dir.path().join("no-default-env");
    let out = Command::new("fw_printenv")
        .arg("-c")
        .arg(&dev.config)
        .arg("-f")
        .arg(missing_default)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(dev
        .store
        .apply(&ChangeSet::new().with("bootctl_slot", "B"))
        .is_err());
    assert_eq!(std::fs::read(&dev.image).unwrap(), image);
}

/// Offsets in octal and decimal, sizes in hex without `0x`: our parser finds the copies where
/// libubootenv finds them.
#[test]
fn config_numbers_read_like_libubootenv() {
    if !tools_present() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.img");
    // 8 bytes of something else, then copy 1 at 8 (octal 010), copy 2 at 4104 (decimal).
    let mut bytes = vec![0xa5; 8];
    bytes.extend(create_image(&factory_env(), SIZE, Layout::Redundant).unwrap());
    std::fs::write(&image, &bytes).unwrap();
    let config = dir.path().join("fw_env.config");
    std::fs::write(
        &config,
        format!(
            "# octal and decimal offsets\n{img} 010 1000\n{img}\t4104\t0x1000 # copy 2\n",
            img = image.display()
        ),
    )
    .unwrap();
    let store = EnvStore::open(&FwEnvConfig::load(&config).unwrap())
        .unwrap()
        .with_lock_path(dir.path().join("lock"));
    store
        .apply(&ChangeSet::new().with("where", "copy2"))
        .unwrap();
    let out = run(Command::new("fw_printenv")
        .arg("-c")
        .arg(&config)
        .args(["-n", "where"]));
    assert_eq!(out, "copy2\n");
    assert_eq!(&std::fs::read(&image).unwrap()[..8], &[0xa5; 8]);
}

/// We take the same lock as libubootenv: fw_setenv waits while we hold it.
#[test]
fn fw_setenv_waits_for_our_lock() {
    if !tools_present() {
        return;
    }
    let image = create_image(&factory_env(), SIZE, Layout::Redundant).unwrap();
    let dev = Device::new(&image, Layout::Redundant);
    let lock = bootctl::lock::EnvLock::acquire(Path::new(bootctl::lock::DEFAULT_LOCK_PATH))
        .expect("lock the libubootenv lock file");
    let mut child = Command::new("fw_setenv")
        .arg("-c")
        .arg(&dev.config)
        .args(["locked", "1"])
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        child.try_wait().unwrap().is_none(),
        "fw_setenv finished while we held the lock"
    );
    assert_eq!(dev.ours().get("locked"), None);
    drop(lock);
    assert!(child.wait().unwrap().success());
    assert_eq!(dev.ours().get("locked").map(String::as_str), Some("1"));
}
