//! `ddi-bootctl`: U-Boot environment and A/B slot control from the command line (the
//! contract's CLI). Global options come before the command; errors are one line on stderr and
//! a non-zero exit status (1: the operation failed, 2: bad usage).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use bootctl::control::{DEFAULT_ATTEMPTS, DEFAULT_CMDLINE, DEFAULT_ENV_CONFIG};
use bootctl::{BootControl, BootOptions, SchemeKind, Slot, Status};
use clap::{Parser, Subcommand};

/// U-Boot environment and A/B slot control.
#[derive(Debug, Parser)]
#[command(name = "ddi-bootctl", version, about)]
struct Cli {
    /// fw_env.config naming the environment copies
    #[arg(long, value_name = "FILE", default_value = DEFAULT_ENV_CONFIG)]
    env_config: PathBuf,
    /// Slot scheme: bootcount or rauc
    #[arg(long, value_name = "SCHEME", default_value = "bootcount")]
    scheme: SchemeKind,
    /// File holding the kernel command line (bootctl.slot= or rauc.slot=)
    #[arg(long, value_name = "FILE", default_value = DEFAULT_CMDLINE)]
    cmdline: PathBuf,
    /// Trial boots of a newly activated slot
    #[arg(long, value_name = "N", default_value_t = DEFAULT_ATTEMPTS)]
    attempts: u32,
    /// Lock file held around every read-modify-write (libubootenv's by default)
    #[arg(long, value_name = "FILE")]
    lock_file: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Scheme, booted slot, slot to boot next, trial state, raw variables
    Status {
        /// One JSON object instead of text
        #[arg(long)]
        json: bool,
    },
    /// Print the booted slot (A or B)
    Booted,
    /// Activate a slot for a trial boot
    SetNext {
        /// A or B
        slot: Slot,
    },
    /// Confirm the booted slot
    MarkGood,
    /// Mark a slot as not bootable
    MarkBad {
        /// A or B
        slot: Slot,
    },
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so `ddi-bootctl status | head -1` would panic on the closed
    // stdout; end quietly as `fw_printenv` and `cat` do.
    // SAFETY: nothing else runs yet; restoring a signal's default action is always sound.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) if !err.use_stderr() => {
            // --help, --version
            print!("{err}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            // clap's first paragraph, on one line: the message, and the names of missing
            // arguments that it puts on the lines below it.
            let rendered = err.to_string();
            let first = rendered
                .trim_start()
                .split("\n\n")
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .collect::<Vec<_>>()
                .join(" ");
            let first = first.strip_prefix("error: ").unwrap_or(&first);
            let first = match err.kind() {
                // clap shows the whole help for a missing command.
                clap::error::ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
                    "a command is required (status, booted, set-next, mark-good, mark-bad)"
                }
                _ if first.is_empty() => "invalid usage",
                _ => first,
            };
            eprintln!("ddi-bootctl: error: {first} (see ddi-bootctl --help)");
            return ExitCode::from(2);
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ddi-bootctl: error: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line; a cause already spelled out by the message above it
/// (many error types print their source) is not repeated.
fn one_line(err: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if line.contains(&text) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&text);
    }
    line.replace('\n', " ")
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Booted = cli.command {
        // Needs only the command line, not the environment.
        let slot = bootctl::booted::booted_slot(&cli.cmdline, None)?;
        println!("{slot}");
        return Ok(());
    }
    let mut control = BootControl::open(BootOptions {
        env_config: cli.env_config.clone(),
        scheme: cli.scheme,
        cmdline: cli.cmdline.clone(),
        attempts: cli.attempts,
    })?;
    if let Some(lock) = &cli.lock_file {
        control = control.with_lock_path(lock);
    }
    match cli.command {
        Command::Booted => unreachable!("handled above"),
        Command::Status { json } => {
            let status = control.status()?;
            if json {
                println!("{}", serde_json::to_string(&status)?);
            } else {
                print_status(&status, &control, &cli.cmdline);
            }
        }
        Command::SetNext { slot } => {
            let done = control
                .activate(slot)
                .with_context(|| format!("cannot activate slot {slot}"))?;
            if done.saved {
                println!("slot {slot} activated for a trial boot ({})", done.changes);
            } else {
                println!("slot {slot} is already activated; nothing written");
            }
        }
        Command::MarkGood => {
            let booted = control.booted()?;
            let done = control.mark_good()?;
            if done.saved {
                println!("slot {booted} marked good ({})", done.changes);
            } else {
                println!("slot {booted} is already good; nothing written");
            }
        }
        Command::MarkBad { slot } => {
            let done = control
                .mark_bad(slot)
                .with_context(|| format!("cannot mark slot {slot} bad"))?;
            if done.saved {
                println!("slot {slot} marked bad ({})", done.changes);
            } else {
                println!("slot {slot} is already marked bad; nothing written");
            }
        }
    }
    Ok(())
}

fn print_status(status: &Status, control: &BootControl, cmdline: &Path) {
    println!("scheme:    {}", status.scheme);
    match status.booted {
        Some(slot) => println!("booted:    {slot}"),
        None => {
            let why = control
                .booted()
                .err()
                .map_or_else(|| cmdline.display().to_string(), |e| e.to_string());
            println!("booted:    unknown ({why})");
        }
    }
    println!("next:      {}", status.next);
    let trial = match status.trial {
        Some(true) => format!("yes (slot {} on trial, not confirmed)", status.next),
        Some(false) => "no".to_string(),
        None => "unknown (the rauc scheme cannot tell a trial from a confirmed slot)".to_string(),
    };
    println!("trial:     {trial}");
    println!(
        "redundant: {}",
        if status.redundant {
            "yes"
        } else {
            "no (single copy: a power cut during a save can lose the environment)"
        }
    );
    println!("variables:");
    if status.variables.is_empty() {
        println!("  (none set; the boot script's defaults apply)");
    }
    for (name, value) in &status.variables {
        println!("  {name}={value}");
    }
}
