//! The crash-point suite ("never bricked, proven"): every durable step of a whole update cycle,
//! in every agent run of it, is cut off by a power failure right before it happens, and the
//! device must still end where it should, keeping every invariant on the way.
//!
//! **Steps are discovered, not listed.** A C shim (`crash_points/shim.c`, compiled here with
//! `cc` and loaded into `ddi-agent` with `LD_PRELOAD`) sees the agent's durable steps at the
//! libc boundary: every rename into the state directory (the commit of an atomic state-file
//! write, see `agent/src/persist.rs`; the download resume record commits the same way), every
//! unlink of an existing file there, and every write to the U-Boot environment file through a
//! descriptor opened for writing (one environment save is one `pwrite` of the copy being
//! replaced, see `bootctl/src/store.rs`). A counter file numbers the steps across all agent
//! processes of the cycle. A record run plays the cycle undisturbed and logs the steps; a new
//! step in the agent is therefore covered without touching this file. The shim was chosen over
//! failpoints compiled into test builds because it tests the shipped binary and sees every
//! path to the disk, including ones nobody thought to mark. Only the agent is counted: U-Boot's
//! boot script (`FileDevice::reboot`) and the invariant checks run in the test process, and the
//! shim removes itself from the environment of the programs the agent starts.
//!
//! **One trial per step.** For step `i` of the record, a fresh device, target and action run the
//! same cycle with the shim set to kill the agent (SIGKILL, nothing flushed or cleaned up) right
//! before step `i`; an environment save is cut a second time as a torn save: of the bytes the
//! save changes on the medium (from the copy's header to the last changed byte) only the first
//! half arrives. Half of the whole 16 KiB copy would mostly be a complete save (its second half
//! is unchanged padding), and a complete save followed by a cut is already the trial of the
//! next step. Then the power comes back: U-Boot boots from the environment as it is (a board
//! whose image hangs is reset by its watchdog, so the harness power-cycles again instead of
//! running the agent), and the agent runs, booting when it asks, until the action is closed and
//! one more run asks for no reboot (the invariants hold after it too).
//!
//! **Invariants after every agent run and every boot:** the environment reads with the real
//! `fw_printenv` and says what our decoder says; variables the scheme does not own are exactly
//! the board's; the slot U-Boot would boot holds a complete image (A the factory image, B the
//! new one), and so does slot B whenever the environment points at it (a trial); the booted
//! slot is never written; the factory slot A is never written at all (within one cycle it is
//! always either running or the fallback of the unconfirmed new image); the server accepted at
//! most one `closed`. **At the end:** exactly one `closed`; `success` exactly when the new image
//! runs from slot B and is confirmed, otherwise `failure` with the factory image running and
//! confirmed. A good image ends with `success` after any cut.
//!
//! Cases: good raw image, good gzip image, good signed bundle, an image failing its health check,
//! an image that never boots; each for the `bootcount` and `rauc` schemes; and a good signed bundle
//! holding its image raw (resumed by replay), a good signed bundle holding a gzip image (resumed
//! from a deflate block boundary in its image member), a good zstd image (`zstd -3`, resumed from a
//! block boundary), a good xz image (`xz --threads`, resumed from a block boundary) and a good
//! tar.gz (resumed from a deflate block boundary in its image member) for `bootcount`. The images
//! are 256 KiB, except the resumable cases': the server gzip, signed gzip bundle and tar.gz cases'
//! 1.5 MiB at gzip level 9 (deflate blocks every few dozen KiB), the zstd case's 1.5 MiB (made
//! compressible, blocks of up to 128 KiB), the xz case's 1.5 MiB (compressible, blocks of 256 KiB)
//! and the raw bundle's 1.5 MiB, with `[agent] checkpoint_interval = "256k"`, so that their install
//! commits its resume record (`download.resume`) at several checkpoints, each cut before like every
//! step, and the next run resumes from the record before it: their record run must hold at least
//! two such commits, and a trial cut before one with an older record on disk must see a Range
//! download from inside the artifact (not the 4-byte ISIZE fetch at its end). Local cases
//! (`-local`, issue 18) play the same cycle started by `ddi-agent install FILE` instead of a server
//! action: no feedback at all; at the end the state's `last_local` says `success` exactly when the
//! new image runs confirmed from slot B, else `failure` with slot A running confirmed, and a good
//! image fails only when the cut hit the install run before its image was verified (an interrupted
//! local install is not resumed). The cases run in `DDI_CRASH_THREADS` threads (default 2).
//! `DDI_CRASH_CASE=<part of a case name>` runs matching cases only, `DDI_CRASH_STEP=<i>` only the
//! trials of step `i`. Needs `cc`, `fw_printenv` (Debian `libubootenv-tool`) and `cargo build
//! --workspace --bins` first.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bootctl::scheme::{self, bootcount_vars, rauc_vars, SchemeKind, Slot};
use bytes::Bytes;
use ddi_sim::{Assignment, ServerOptions, TestServer};
use ddi_tests::demo::{closed_result, ended_as, summary};
use ddi_tests::device::{DeviceOptions, FileDevice, Health, Image};
use ddi_tests::harness::{env_number, run_with_timeout};
use ddi_tests::signing::Vendor;

const TOKEN: &str = "crash-token";
const COMPATIBLE: &str = "acme-gw-rev2";
const SHIM_SOURCE: &str = include_str!("crash_points/shim.c");
const IMAGE_SIZE: usize = 256 * 1024;
const FACTORY_SIZE: usize = 64 * 1024;
const SLOT_SIZE: u64 = 512 * 1024;
/// The resumable cases' image (server gzip and zstd, raw or gzip image in a signed bundle): large
/// enough for several checkpoints at
/// [`RESUMABLE_CHECKPOINT_INTERVAL`], so that the download's resume record is written (and cut
/// before) several times and the cycle resumes from it.
const RESUMABLE_IMAGE_SIZE: usize = 1536 * 1024;
const RESUMABLE_SLOT_SIZE: u64 = 2 << 20;
/// `[agent] checkpoint_interval` of the resumable cases: the minimum.
const RESUMABLE_CHECKPOINT_INTERVAL: &str = "256k";
/// The resume record's file in the state directory.
const RESUME_FILE: &str = "download.resume";
/// Trial boots U-Boot gives the new slot.
const ATTEMPTS: u32 = 3;
const AGENT_TIMEOUT: Duration = Duration::from_secs(60);
/// Agent runs after which a trial that has not settled fails.
const MAX_AGENT_RUNS: usize = 12;
/// Power-ons in a row a hanging image may cost before the device must reach userspace.
const MAX_BOOTS: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Payload {
    Raw,
    Gzip,
    /// `zstd -3` (content checksum on): resumed from a block boundary.
    Zstd,
    /// `xz --threads` in blocks of 256 KiB: resumed from a block boundary.
    Xz,
    /// A tar of the image at `gzip -9`: resumed from a deflate block boundary in the image
    /// member (the tar's head in the record).
    TarGzip,
    Bundle,
    /// A signed bundle holding the image raw: resumed by replay.
    RawBundle,
    /// A signed bundle holding the image at `gzip -9`: resumed from a deflate block boundary
    /// in the image member (the bundle's head fetched again).
    GzipBundle,
}

#[derive(Debug, Clone, Copy)]
struct Case {
    scheme: SchemeKind,
    payload: Payload,
    health: Health,
    /// Started by `ddi-agent install FILE` (issue 18), not by a server action.
    local: bool,
}

impl Case {
    fn all() -> Vec<Case> {
        let mut cases = Vec::new();
        for scheme in [SchemeKind::Bootcount, SchemeKind::Rauc] {
            for (payload, health) in [
                (Payload::Raw, Health::Good),
                (Payload::Gzip, Health::Good),
                (Payload::Bundle, Health::Good),
                (Payload::Raw, Health::Broken),
                (Payload::Raw, Health::Hangs),
            ] {
                cases.push(Case {
                    scheme,
                    payload,
                    health,
                    local: false,
                });
            }
        }
        for payload in [
            Payload::RawBundle,
            Payload::GzipBundle,
            Payload::Zstd,
            Payload::Xz,
            Payload::TarGzip,
        ] {
            cases.push(Case {
                scheme: SchemeKind::Bootcount,
                payload,
                health: Health::Good,
                local: false,
            });
        }
        for (scheme, payload, health) in [
            (SchemeKind::Bootcount, Payload::Gzip, Health::Good),
            (SchemeKind::Bootcount, Payload::Raw, Health::Broken),
            (SchemeKind::Rauc, Payload::Raw, Health::Good),
            (SchemeKind::Rauc, Payload::Raw, Health::Hangs),
        ] {
            cases.push(Case {
                scheme,
                payload,
                health,
                local: true,
            });
        }
        cases
    }

    fn name(&self) -> String {
        let health = match self.health {
            Health::Good => "good",
            Health::Broken => "health-check-fails",
            Health::Hangs => "never-boots",
        };
        let payload = match self.payload {
            Payload::Raw => "raw",
            Payload::Gzip => "gzip",
            Payload::Zstd => "zstd",
            Payload::Xz => "xz",
            Payload::TarGzip => "tar-gzip",
            Payload::Bundle => "signed-bundle",
            Payload::RawBundle => "signed-raw-bundle",
            Payload::GzipBundle => "signed-gzip-bundle",
        };
        let local = if self.local { "-local" } else { "" };
        format!("{}/{health}-{payload}{local}", self.scheme.as_str())
    }

    /// How the action must close and which slot must run, confirmed, at the end.
    fn expected(&self) -> (&'static str, Slot) {
        match self.health {
            Health::Good => ("success", Slot::B),
            Health::Broken | Health::Hangs => ("failure", Slot::A),
        }
    }
}

/// One durable step as the shim logged it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Step {
    index: usize,
    /// `state` (a commit into the state directory), `state-remove` or `env` (a save).
    kind: String,
    file: String,
    /// The agent run of the cycle it happened in (`run-1`, ...).
    run: String,
}

impl Step {
    fn describe(&self) -> String {
        format!(
            "step {} ({} {}, {})",
            self.index, self.kind, self.file, self.run
        )
    }
}

/// What the shim logged.
#[derive(Debug, Default)]
struct ShimLog {
    steps: Vec<Step>,
    /// The index it cut before.
    cut: Option<usize>,
    /// A torn save: (bytes written, bytes the whole save would have changed).
    torn: Option<(usize, usize)>,
}

fn read_log(path: &Path) -> Result<ShimLog, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(format!("cannot read the shim log {}: {e}", path.display())),
    };
    let mut log = ShimLog::default();
    for line in text.lines() {
        let words: Vec<&str> = line.split(' ').collect();
        match words.as_slice() {
            ["CUT", index] => log.cut = index.parse().ok(),
            ["TORN", written, "of", changed, ..] => {
                log.torn = written.parse().ok().zip(changed.parse().ok())
            }
            [index, kind, file, run] => log.steps.push(Step {
                index: index
                    .parse()
                    .map_err(|_| format!("bad shim log line {line:?}"))?,
                kind: kind.to_string(),
                file: file.to_string(),
                run: run.to_string(),
            }),
            _ => return Err(format!("bad shim log line {line:?}")),
        }
    }
    Ok(log)
}

/// Where a trial cuts the power.
#[derive(Debug, Clone, Copy)]
struct Cut {
    at: usize,
    /// An env save first writes half of the bytes it changes (a torn save).
    torn: bool,
}

/// What a case shares between its trials.
struct CaseContext {
    case: Case,
    shim: PathBuf,
    server: TestServer,
    /// What slot B must hold once written.
    image: Vec<u8>,
    factory: Vec<u8>,
    filename: &'static str,
    artifact: Bytes,
    /// Capacity of each slot.
    slot_size: u64,
    /// `[agent] checkpoint_interval`, when not the default.
    checkpoint_interval: Option<&'static str>,
    config_extra: String,
    /// Keeps the bundle's public key file alive.
    _vendor: Option<Vendor>,
}

impl CaseContext {
    fn new(case: Case, shim: &Path) -> CaseContext {
        // A server gzip image resumes from a deflate block boundary: big enough for several
        // checkpoints, compressed at level 9 (deflate blocks every few dozen KiB). A zstd image
        // resumes from a block boundary (blocks of up to 128 KiB), a raw image in a signed bundle
        // by replay, a gzip image in one from a deflate block boundary, as large.
        let resumable = matches!(
            case.payload,
            Payload::Gzip
                | Payload::Zstd
                | Payload::Xz
                | Payload::TarGzip
                | Payload::RawBundle
                | Payload::GzipBundle
        ) && !case.local;
        let size = if resumable {
            RESUMABLE_IMAGE_SIZE
        } else {
            IMAGE_SIZE
        };
        let mut image = Image::new("demo-os", "2.0", case.health, size);
        if matches!(case.payload, Payload::Zstd | Payload::Xz) {
            // Compressed blocks (tables, matches, repeat offsets), not stored ones.
            image = image.compressible();
        }
        let factory = Image::new("factory", "1.0", Health::Good, FACTORY_SIZE).bytes;
        let mut vendor = None;
        let mut config_extra = String::new();
        let (filename, artifact) = match case.payload {
            Payload::Raw => ("os.img", image.bytes.clone()),
            Payload::Gzip if resumable => ("os.img.gz", image.gzip_best()),
            Payload::Gzip => ("os.img.gz", image.gzip()),
            Payload::Zstd => ("os.img.zst", image.zstd()),
            Payload::Xz => ("os.img.xz", image.xz_threaded(256 << 10)),
            Payload::TarGzip => ("os.tar.gz", image.tar_gz_best("rootfs.img")),
            Payload::Bundle | Payload::RawBundle | Payload::GzipBundle => {
                let signer = Vendor::new();
                config_extra = signer.config(true, COMPATIBLE);
                let (name, content) = match case.payload {
                    Payload::RawBundle => ("rootfs.img", image.bytes.clone()),
                    Payload::GzipBundle => ("rootfs.img.gz", image.gzip_best()),
                    _ => ("rootfs.img.gz", image.gzip()),
                };
                let bundle = signer.bundle(name, &content, COMPATIBLE);
                vendor = Some(signer);
                ("update.ddib", bundle)
            }
        };
        CaseContext {
            case,
            shim: shim.to_path_buf(),
            server: TestServer::start(ServerOptions::default().polling(Duration::from_secs(1))),
            image: image.bytes,
            factory,
            filename,
            artifact: Bytes::from(artifact),
            slot_size: if resumable {
                RESUMABLE_SLOT_SIZE
            } else {
                SLOT_SIZE
            },
            checkpoint_interval: resumable.then_some(RESUMABLE_CHECKPOINT_INTERVAL),
            config_extra,
            _vendor: vendor,
        }
    }
}

/// A cut before `step` leaves an earlier commit of the resume record on disk (no removal of it
/// after that commit): the next run must resume from it.
fn resumes_before(steps: &[Step], step: &Step) -> bool {
    step.kind == "state"
        && step.file == RESUME_FILE
        && steps[..step.index]
            .iter()
            .rev()
            .find(|s| s.file == RESUME_FILE)
            .is_some_and(|s| s.kind == "state")
}

impl CaseContext {
    /// The trial `label`'s agent downloaded the artifact with a Range request from inside it
    /// (not the 4-byte ISIZE fetch at its end): it resumed.
    fn resumed(&self, label: &str) -> bool {
        let controller = format!("crash-{label}");
        let isize_at = self.artifact.len().saturating_sub(4) as u64;
        self.server.requests().iter().any(|r| {
            r.controller_id == controller
                && r.endpoint == ddi_sim::Endpoint::Download
                && r.header("range")
                    .and_then(|v| v.strip_prefix("bytes="))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|start| start > 0 && start != isize_at)
        })
    }
}

/// What a finished trial saw.
struct TrialOutcome {
    steps: Vec<Step>,
    agent_runs: usize,
    /// Per agent run of the record: did `state.json` / the environment file change?
    changes: Vec<(String, bool, bool)>,
}

/// One update cycle on a fresh device, optionally cut before one step.
struct Trial<'a> {
    ctx: &'a CaseContext,
    cut: Option<Cut>,
    device: FileDevice,
    action: u64,
    counter: PathBuf,
    log_path: PathBuf,
    /// Variables the scheme does not own, as the board shipped them.
    foreign: BTreeMap<String, String>,
    /// The image file of a local case (`install FILE` is its first agent run).
    local_source: Option<PathBuf>,
    /// The slot running now and its content when it booted.
    booted: (Slot, Vec<u8>),
    agent_runs: usize,
    /// A torn save left its copy invalid (not just its header rewritten).
    torn_invalid: bool,
    events: Vec<String>,
}

impl<'a> Trial<'a> {
    fn new(ctx: &'a CaseContext, label: &str, cut: Option<Cut>) -> Result<Trial<'a>, String> {
        let controller = format!("crash-{label}");
        ctx.server
            .create_target(&controller, Some(TOKEN))
            .map_err(|e| format!("create target: {e}"))?;
        let mut options = DeviceOptions::new(&ctx.server.url(), &controller, TOKEN);
        options.slot_size = ctx.slot_size;
        options.checkpoint_interval = ctx.checkpoint_interval.map(str::to_string);
        options.factory_image = ctx.factory.clone();
        options.scheme = ctx.case.scheme;
        options.attempts = ATTEMPTS;
        options.config_extra = ctx.config_extra.clone();
        let device = FileDevice::create_temp(options).map_err(|e| format!("device: {e}"))?;
        let env = device.env().map_err(|e| format!("env: {e}"))?;
        let foreign = foreign_variables(ctx.case.scheme, &env);
        let counter = device.dir().join("crash-counter");
        let log_path = device.dir().join("crash-steps.log");
        let mut local_source = None;
        let action = if ctx.case.local {
            let path = device.dir().join(ctx.filename);
            std::fs::write(&path, &ctx.artifact).map_err(|e| format!("write image: {e}"))?;
            local_source = Some(path);
            0
        } else {
            ctx.server
                .deploy(
                    &controller,
                    "2.0",
                    ctx.filename,
                    ctx.artifact.clone(),
                    &Assignment::forced(),
                )
                .map_err(|e| format!("deploy: {e}"))?
        };
        Ok(Trial {
            ctx,
            cut,
            device,
            action,
            counter,
            log_path,
            foreign,
            local_source,
            booted: (Slot::A, Vec::new()),
            agent_runs: 0,
            torn_invalid: false,
            events: Vec::new(),
        })
    }

    fn slot(&self, slot: Slot) -> Result<Vec<u8>, String> {
        self.device
            .slot_bytes(slot)
            .map_err(|e| format!("read slot {slot}: {e}"))
    }

    /// The complete image a slot must hold whenever U-Boot may boot it.
    fn expected_image(&self, slot: Slot) -> &[u8] {
        match slot {
            Slot::A => &self.ctx.factory,
            Slot::B => &self.ctx.image,
        }
    }

    fn holds(&self, slot: Slot) -> Result<bool, String> {
        let bytes = self.slot(slot)?;
        let image = self.expected_image(slot);
        Ok(bytes.len() >= image.len() && &bytes[..image.len()] == image)
    }

    /// The invariants that hold at every instant the device is observable.
    fn check(&self, when: &str) -> Result<(), String> {
        let fail = |what: String| Err(format!("{when}: {what}"));
        let printed = match fw_printenv(&self.device) {
            Ok(vars) => vars,
            Err(e) => return fail(e),
        };
        let env = match self.device.env() {
            Ok(env) => env,
            Err(e) => return fail(format!("environment unreadable: {e}")),
        };
        let decoded: BTreeMap<String, String> = env
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        if printed != decoded {
            return fail(format!(
                "fw_printenv reads {printed:?}, the agent's decoder {decoded:?}"
            ));
        }
        let foreign = foreign_variables(self.ctx.case.scheme, &env);
        if foreign != self.foreign {
            return fail(format!(
                "variables the scheme does not own changed: {foreign:?}, shipped {:?}",
                self.foreign
            ));
        }
        for slot in [Slot::A, Slot::B] {
            let len = self.slot(slot)?.len() as u64;
            if len != self.ctx.slot_size {
                return fail(format!(
                    "slot {slot} is {len} bytes, not {}",
                    self.ctx.slot_size
                ));
            }
        }
        if !self.holds(Slot::A)? {
            return fail("slot A no longer holds the factory image".into());
        }
        let (booted, content) = &self.booted;
        if &self.slot(*booted)? != content {
            return fail(format!("the booted slot {booted} was written"));
        }
        let (next, _) = bootctl::boot_script::power_on(&env, self.ctx.case.scheme);
        if !self.holds(next)? {
            return fail(format!(
                "U-Boot would boot slot {next}, which does not hold its complete image"
            ));
        }
        if points_at_b(self.ctx.case.scheme, &env) && !self.holds(Slot::B)? {
            return fail(format!(
                "the environment points at slot B ({:?}) but B does not hold the complete new image",
                scheme::for_kind(self.ctx.case.scheme, ATTEMPTS).variables(&env)
            ));
        }
        if self.ctx.case.local {
            return Ok(());
        }
        let closed = self
            .ctx
            .server
            .feedback(self.action)
            .iter()
            .filter(|f| f.execution() == Some("closed"))
            .count();
        if closed > 1 {
            return fail(format!("the server accepted {closed} closed feedbacks"));
        }
        Ok(())
    }

    /// Power on (or reset): U-Boot boots from the environment as it is; an image that hangs
    /// gets the board reset by its watchdog, again and again, until userspace comes up.
    fn power_on(&mut self) -> Result<Slot, String> {
        for _ in 0..MAX_BOOTS {
            let slot = self
                .device
                .reboot()
                .map_err(|e| format!("U-Boot could not boot: {e}"))?;
            self.booted = (slot, self.slot(slot)?);
            let hangs = self
                .device
                .slot_image(slot)
                .is_some_and(|h| h.health == Health::Hangs);
            self.events.push(format!(
                "power on: U-Boot boots slot {slot}{}",
                if hangs {
                    " (hangs; watchdog reset)"
                } else {
                    ""
                }
            ));
            self.check(&format!("after booting slot {slot}"))?;
            if !hangs {
                return Ok(slot);
            }
        }
        Err(format!(
            "the device did not reach userspace in {MAX_BOOTS} power-ons"
        ))
    }

    fn agent_run(&mut self) -> Result<ddi_tests::harness::CommandOutput, String> {
        self.agent_runs += 1;
        let mut cmd = self.device.agent_command();
        match &self.local_source {
            Some(source) if self.agent_runs == 1 => cmd.arg("install").arg(source),
            _ => cmd.arg("once"),
        };
        cmd.env("LD_PRELOAD", &self.ctx.shim)
            .env("DDI_CRASH_COUNTER", &self.counter)
            .env("DDI_CRASH_LOG", &self.log_path)
            .env("DDI_CRASH_ENV_FILE", self.device.env_file_path())
            .env("DDI_CRASH_STATE_DIR", self.device.state_dir())
            .env("DDI_CRASH_RUN", format!("run-{}", self.agent_runs));
        if let Some(cut) = self.cut {
            cmd.env("DDI_CRASH_AT", cut.at.to_string())
                .env("DDI_CRASH_TORN", if cut.torn { "1" } else { "0" });
        }
        let out = run_with_timeout(cmd, AGENT_TIMEOUT)
            .map_err(|e| format!("cannot run the agent: {e}"))?;
        self.events.push(format!(
            "agent run-{} exited with {} after {:.2?}\n{}",
            self.agent_runs,
            out.code
                .map_or_else(|| "a signal".to_string(), |c| c.to_string()),
            out.elapsed,
            indent(&format!("{}{}", out.stdout, out.stderr))
        ));
        if out.timed_out {
            return Err(format!(
                "agent run-{} hung (killed after {AGENT_TIMEOUT:?})",
                self.agent_runs
            ));
        }
        Ok(out)
    }

    /// The whole cycle: boot, agent runs (cut where asked), boots, until the action is closed
    /// and a further run asks for no reboot; then the end state.
    fn play(&mut self) -> Result<TrialOutcome, String> {
        self.power_on()?;
        let mut cut_seen = false;
        let mut quiet_runs = 0;
        let mut changes = Vec::new();
        while quiet_runs < 2 {
            if self.agent_runs == MAX_AGENT_RUNS {
                return Err(format!(
                    "the action did not settle in {MAX_AGENT_RUNS} agent runs: {}",
                    self.view_summary()
                ));
            }
            let state_before = std::fs::read(self.device.state_dir().join("state.json")).ok();
            let env_before = std::fs::read(self.device.env_file_path()).ok();
            self.agent_run()?;
            let state_after = std::fs::read(self.device.state_dir().join("state.json")).ok();
            let env_after = std::fs::read(self.device.env_file_path()).ok();
            changes.push((
                format!("run-{}", self.agent_runs),
                state_before != state_after,
                env_before != env_after,
            ));
            let log = read_log(&self.log_path)?;
            let cut_now = log.cut.is_some() && !cut_seen;
            if cut_now && self.cut.is_some_and(|c| c.torn) {
                self.check_torn(log.torn)?;
            }
            self.check(&format!("after agent run-{}", self.agent_runs))?;
            let reboot_requested = self
                .device
                .take_reboot_requests()
                .map_err(|e| format!("reboot marker: {e}"))?
                > 0;
            if cut_now {
                cut_seen = true;
                self.events.push("power cut".into());
                self.power_on()?;
                quiet_runs = 0;
                continue;
            }
            if reboot_requested {
                self.events.push("reboot requested".into());
                self.power_on()?;
                quiet_runs = 0;
                continue;
            }
            if self.settled()? {
                quiet_runs += 1;
            } else {
                quiet_runs = 0;
            }
        }
        if let Some(cut) = self.cut {
            if !cut_seen {
                return Err(format!(
                    "the cycle never reached step {} (the record had it)",
                    cut.at
                ));
            }
        }
        self.check_end()?;
        Ok(TrialOutcome {
            steps: read_log(&self.log_path)?.steps,
            agent_runs: self.agent_runs,
            changes,
        })
    }

    /// A torn save must really be partial: of the bytes the save changes, only the first half
    /// arrived. Usually that leaves the written copy with a bad CRC; when the save changes
    /// only the header (its variables equal the older copy's), the copy stays valid and the
    /// save is simply lost.
    fn check_torn(&mut self, torn: Option<(usize, usize)>) -> Result<(), String> {
        let Some((written, changed)) = torn else {
            return Err("the shim cut an env save without tearing it".into());
        };
        if written >= changed {
            return Err(format!(
                "the torn save wrote {written} of {changed} changed bytes: not torn"
            ));
        }
        let selected = self
            .device
            .env_store()
            .and_then(|store| {
                store
                    .read_selected()
                    .map_err(|e| bootctl::Error::from(e).into())
            })
            .map_err(|e| format!("after the torn save: environment unreadable: {e}"))?;
        let invalid = selected.problems.iter().filter(|p| p.is_some()).count();
        self.torn_invalid = invalid > 0;
        self.events.push(format!(
            "torn save: {written} of {changed} changed bytes written, {invalid} invalid copies"
        ));
        Ok(())
    }

    fn view_summary(&self) -> String {
        self.ctx
            .server
            .action(self.action)
            .map_or_else(|| "no action".to_string(), |v| summary(&v))
    }

    /// The update has ended: the action is closed, or a local install's result is recorded.
    fn settled(&self) -> Result<bool, String> {
        if self.ctx.case.local {
            // No local job left (a cut before its first commit leaves none, nor a result).
            return Ok(self.local_state()?.get("local_job").is_none());
        }
        let view = self
            .ctx
            .server
            .action(self.action)
            .ok_or("the action vanished")?;
        Ok(closed_result(&view).is_some() && !view.active)
    }

    fn local_state(&self) -> Result<serde_json::Value, String> {
        let path = self.device.state_dir().join("state.json");
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(serde_json::json!({})),
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// A local case's end: `last_local` says `success` iff the new image runs confirmed; a good
    /// image fails only when the cut interrupted the install run before its image was verified.
    /// Returns the result as `check_end` names it, the slot that must run, and whether the
    /// install was recorded at all.
    fn local_result(&self) -> Result<(&'static str, Slot, bool), String> {
        let state = self.local_state()?;
        let last = &state["last_local"];
        let result = last["result"].as_str().unwrap_or_default().to_string();
        let message = last["message"].as_str().unwrap_or_default();
        let cut_in_install = self.cut.is_some_and(|c| {
            read_log(&self.log_path)
                .ok()
                .and_then(|log| log.steps.into_iter().find(|s| s.index == c.at))
                .is_some_and(|step| step.run == "run-1")
        });
        let (expected, _) = self.ctx.case.expected();
        let ok = result == expected
            || (result == "failure" && cut_in_install && message.contains("interrupted"))
            // Cut before the install's first commit: it never started, as far as anyone knows.
            || (last.is_null() && cut_in_install);
        if !ok {
            return Err(format!(
                "the local install ended {result:?} ({message}), expected {expected}"
            ));
        }
        Ok(if result == "success" {
            ("success", Slot::B, true)
        } else {
            ("failure", Slot::A, !last.is_null())
        })
    }

    /// Exactly one `closed`, with `success` iff the new image runs and is confirmed.
    fn check_end(&self) -> Result<(), String> {
        let mut recorded = true;
        let (result, home) = if self.ctx.case.local {
            let (result, home, was_recorded) = self.local_result()?;
            recorded = was_recorded;
            (result, home)
        } else {
            let (result, home) = self.ctx.case.expected();
            let view = self
                .ctx
                .server
                .action(self.action)
                .ok_or("the action vanished")?;
            if !ended_as(&view, result) {
                return Err(format!(
                    "the action ended {}, expected exactly one closed/{result}",
                    summary(&view)
                ));
            }
            (result, home)
        };
        let booted = self.device.booted().map_err(|e| e.to_string())?;
        if booted != home {
            return Err(format!(
                "closed/{result} but slot {booted} runs, expected {home}"
            ));
        }
        if !self.holds(home)? {
            return Err(format!("slot {home} does not hold its image at the end"));
        }
        let env = self.device.env().map_err(|e| e.to_string())?;
        if !recorded {
            // Cut before the local install's first commit: the board's environment may still be
            // as shipped (under `rauc` without `BOOT_ORDER`); U-Boot must keep booting A.
            let (next, _) = bootctl::boot_script::power_on(&env, self.ctx.case.scheme);
            return match next {
                Slot::A => Ok(()),
                other => Err(format!(
                    "nothing installed, yet U-Boot would boot slot {other}"
                )),
            };
        }
        if let Some(problem) = unconfirmed(self.ctx.case.scheme, &env, home) {
            return Err(format!("slot {home} runs but is not confirmed: {problem}"));
        }
        Ok(())
    }
}

/// The environment's variables that the scheme does not own.
fn foreign_variables(kind: SchemeKind, env: &bootctl::Env) -> BTreeMap<String, String> {
    let owned = scheme::for_kind(kind, ATTEMPTS).variables(env);
    env.iter()
        .filter(|(name, _)| !owned.contains_key(*name))
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
}

/// Does the environment make slot B a boot target (the slot the scheme runs or tries)?
fn points_at_b(kind: SchemeKind, env: &bootctl::Env) -> bool {
    match kind {
        SchemeKind::Bootcount => env.get(bootcount_vars::SLOT) == Some("B"),
        // Until the agent sets `BOOT_ORDER` the board's default order lists an empty B; once it
        // does, B is only in it while activated.
        SchemeKind::Rauc => env
            .get(rauc_vars::BOOT_ORDER)
            .is_some_and(|order| order.split_whitespace().any(|s| s == "B")),
    }
}

/// Why `home` is not the confirmed slot U-Boot keeps booting, if it is not.
fn unconfirmed(kind: SchemeKind, env: &bootctl::Env, home: Slot) -> Option<String> {
    let (next, _) = bootctl::boot_script::power_on(env, kind);
    if next != home {
        return Some(format!("U-Boot would boot slot {next}"));
    }
    match kind {
        SchemeKind::Bootcount => (env.get(bootcount_vars::UPGRADE_AVAILABLE) == Some("1"))
            .then(|| "upgrade_available=1 (still on trial)".to_string()),
        SchemeKind::Rauc => {
            let first = env
                .get(rauc_vars::BOOT_ORDER)
                .and_then(|order| order.split_whitespace().next());
            let left = env.get(rauc_vars::left(home));
            let full = format!("{ATTEMPTS:x}");
            (first != Some(home.as_str()) || left != Some(full.as_str())).then(|| {
                format!(
                    "BOOT_ORDER starts with {first:?}, {}={left:?} (confirmed: first, {full} left)",
                    rauc_vars::left(home)
                )
            })
        }
    }
}

/// `fw_printenv` (libubootenv) on the device's environment, as a map.
fn fw_printenv(device: &FileDevice) -> Result<BTreeMap<String, String>, String> {
    let out = Command::new("fw_printenv")
        .arg("-c")
        .arg(device.env_config_path())
        .current_dir(device.dir())
        .output()
        .map_err(|e| format!("cannot run fw_printenv: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "fw_printenv cannot read the environment ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|line| {
            line.split_once('=')
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .ok_or_else(|| format!("fw_printenv printed {line:?}"))
        })
        .collect()
}

/// `run-1: state state env ... | run-2: ...`: the record's steps by agent run (`rm:` a removal).
fn step_sequence(steps: &[Step]) -> String {
    let mut text = String::new();
    let mut run = "";
    for step in steps {
        if step.run != run {
            if !run.is_empty() {
                text.push_str(" | ");
            }
            run = &step.run;
            text.push_str(run);
            text.push(':');
        }
        text.push(' ');
        if step.kind == "state-remove" {
            text.push_str("rm:");
        }
        text.push_str(if step.file == "state.json" || step.kind == "env" {
            &step.kind
        } else {
            &step.file
        });
    }
    text
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("    {l}\n")).collect()
}

/// Compiles the shim with the system C compiler into `dir`.
fn build_shim(dir: &Path) -> PathBuf {
    let source = dir.join("shim.c");
    let lib = dir.join("libddi_crash_shim.so");
    std::fs::write(&source, SHIM_SOURCE).expect("write shim source");
    let out = Command::new("cc")
        .args([
            "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
        ])
        .arg(&lib)
        .arg(&source)
        .arg("-ldl")
        .output()
        .unwrap_or_else(|e| {
            panic!("the crash-point suite needs a C compiler: cannot run `cc` ({e}); install gcc")
        });
    assert!(
        out.status.success(),
        "compiling the crash shim failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    lib
}

/// A crash point that broke an invariant or the end state.
struct Failure {
    case: String,
    point: String,
    message: String,
    events: Vec<String>,
}

/// Counts and timing of one case.
struct CaseReport {
    name: String,
    steps: Vec<Step>,
    trials: usize,
    /// Torn-save trials, and how many of them left the written copy invalid.
    torn: usize,
    torn_invalid: usize,
    agent_runs: usize,
    elapsed: Duration,
    failures: Vec<Failure>,
}

fn run_case(case: Case, shim: &Path, only_step: Option<usize>) -> CaseReport {
    let started = Instant::now();
    let name = case.name();
    let ctx = CaseContext::new(case, shim);
    let label = name.replace('/', "-");
    let mut failures = Vec::new();

    let mut record = match Trial::new(&ctx, &format!("{label}-record"), None) {
        Ok(trial) => trial,
        Err(e) => panic!("{name}: {e}"),
    };
    let outcome = match record.play() {
        Ok(outcome) => outcome,
        Err(message) => {
            return CaseReport {
                name: name.clone(),
                steps: Vec::new(),
                trials: 1,
                torn: 0,
                torn_invalid: 0,
                agent_runs: record.agent_runs,
                elapsed: started.elapsed(),
                failures: vec![Failure {
                    case: name,
                    point: "record run (no cut)".into(),
                    message,
                    events: record.events,
                }],
            }
        }
    };
    let steps = outcome.steps;
    let mut agent_runs = outcome.agent_runs;
    // The shim must see every durable change: a run that changed the state file or the
    // environment has a logged step of that kind.
    for (run, state_changed, env_changed) in &outcome.changes {
        let has = |kind: &str| steps.iter().any(|s| &s.run == run && s.kind == kind);
        assert!(
            !state_changed || has("state"),
            "{name}: {run} changed state.json but the shim logged no state commit: {steps:?}"
        );
        assert!(
            !env_changed || has("env"),
            "{name}: {run} changed the environment but the shim logged no env save: {steps:?}"
        );
    }
    assert!(
        steps.iter().any(|s| s.kind == "env") && steps.iter().any(|s| s.kind == "state"),
        "{name}: implausible record, no env save or no state commit: {steps:?}"
    );
    // A small checkpoint interval must put resume-record commits into the cycle (each is then
    // cut before, and the next run resumes from the one before it).
    if ctx.checkpoint_interval.is_some() {
        let resume_commits = steps
            .iter()
            .filter(|s| s.kind == "state" && s.file == RESUME_FILE)
            .count();
        assert!(
            resume_commits >= 2,
            "{name}: {resume_commits} commits of {RESUME_FILE} in the record: {steps:?}"
        );
    }

    let mut trials = 1;
    let mut torn_trials = 0;
    let mut torn_invalid = 0;
    for step in &steps {
        if only_step.is_some_and(|only| only != step.index) {
            continue;
        }
        let tears: &[bool] = if step.kind == "env" {
            &[false, true]
        } else {
            &[false]
        };
        for &torn in tears {
            trials += 1;
            let point = format!(
                "{}{}",
                if torn { "torn save at " } else { "cut before " },
                step.describe()
            );
            let cut = Cut {
                at: step.index,
                torn,
            };
            let trial_label = format!("{label}-{}{}", step.index, if torn { "t" } else { "" });
            let mut trial = match Trial::new(&ctx, &trial_label, Some(cut)) {
                Ok(trial) => trial,
                Err(e) => panic!("{name}: {e}"),
            };
            let result = trial.play().and_then(|outcome| {
                // Up to the cut the trial replays the record: the same steps in the same runs.
                let seen = &outcome.steps[..outcome.steps.len().min(step.index + 1)];
                if seen != &steps[..step.index + 1] {
                    Err(format!(
                        "the cycle is not deterministic: up to the cut it logged {seen:?}, the record {:?}",
                        &steps[..step.index + 1]
                    ))
                } else if resumes_before(&steps, step) && !ctx.resumed(&trial_label) {
                    Err(format!(
                        "cut before a commit of {RESUME_FILE} with an older one on disk, but no \
                         run resumed the download with a Range request"
                    ))
                } else {
                    Ok(outcome.agent_runs)
                }
            });
            agent_runs += trial.agent_runs;
            torn_trials += usize::from(torn);
            torn_invalid += usize::from(trial.torn_invalid);
            if let Err(message) = result {
                failures.push(Failure {
                    case: name.clone(),
                    point,
                    message,
                    events: trial.events,
                });
            }
        }
    }
    CaseReport {
        name,
        steps,
        trials,
        torn: torn_trials,
        torn_invalid,
        agent_runs,
        elapsed: started.elapsed(),
        failures,
    }
}

#[test]
fn every_durable_step_of_an_update_cycle_survives_a_power_cut() {
    let started = Instant::now();
    assert!(
        Command::new("fw_printenv").arg("-V").output().is_ok(),
        "fw_printenv is missing: install the Debian package libubootenv-tool"
    );
    let shim_dir = tempfile::tempdir().expect("temporary directory");
    let shim = build_shim(shim_dir.path());
    let only = std::env::var("DDI_CRASH_CASE").ok();
    let only_step = env_number("DDI_CRASH_STEP").map(|n| n as usize);
    let cases: Vec<Case> = Case::all()
        .into_iter()
        .filter(|c| only.as_deref().is_none_or(|o| c.name().contains(o)))
        .collect();
    assert!(!cases.is_empty(), "DDI_CRASH_CASE={only:?} matches no case");
    let threads = env_number("DDI_CRASH_THREADS").unwrap_or(2).max(1) as usize;
    let queue = Mutex::new(cases.clone());
    let reports = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| loop {
                let next = queue.lock().unwrap().pop();
                let Some(case) = next else { break };
                let report = run_case(case, &shim, only_step);
                reports.lock().unwrap().push(report);
            });
        }
    });
    let mut reports = reports.into_inner().unwrap();
    assert_eq!(reports.len(), cases.len(), "a case thread died");
    reports.sort_by_key(|r| r.name.clone());

    let mut table = String::new();
    let mut failures = Vec::new();
    for r in &mut reports {
        let env = r.steps.iter().filter(|s| s.kind == "env").count();
        let _ = writeln!(
            table,
            "{:34} {:3} steps ({:2} state, {:2} env) {:3} trials ({:2} torn, {:2} invalid copy) {:4} agent runs {:6.1?}  {}",
            r.name,
            r.steps.len(),
            r.steps.len() - env,
            env,
            r.trials,
            r.torn,
            r.torn_invalid,
            r.agent_runs,
            r.elapsed,
            if r.failures.is_empty() {
                "ok".to_string()
            } else {
                format!("{} FAILED", r.failures.len())
            }
        );
        let _ = writeln!(table, "    {}", step_sequence(&r.steps));
        failures.append(&mut r.failures);
    }
    println!(
        "crash points ({:.1?} in {threads} threads):\n{table}",
        started.elapsed()
    );
    if !failures.is_empty() {
        let mut message = format!("{} crash points failed:\n", failures.len());
        for f in &failures {
            let _ = writeln!(message, "  {}: {}: {}", f.case, f.point, f.message);
        }
        let first = &failures[0];
        let _ = writeln!(
            message,
            "\nlog of the first failure ({}: {}):\n{}",
            first.case,
            first.point,
            first.events.join("\n")
        );
        panic!("{message}");
    }
}
