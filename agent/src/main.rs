//! `ddi-agent`: the hawkBit DDI update agent. Parses the command line; the commands live in
//! `ddi_agent::service`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ddi_agent::service::{self, Command};

#[derive(Parser)]
#[command(
    name = "ddi-agent",
    version,
    about = "hawkBit DDI update agent with A/B slots"
)]
struct Cli {
    /// Configuration file.
    #[arg(short, long, value_name = "FILE", default_value = ddi_agent::config::DEFAULT_CONFIG_PATH)]
    config: PathBuf,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Daemon: poll forever at the server's interval (systemd Type=notify).
    Run,
    /// One cycle: confirm a pending reboot, poll once, carry out what the server asks.
    Once,
    /// What the agent knows: booted slot, pending action, last result.
    Status {
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Answer the action waiting for consent (`[agent] consent = "manual"`).
    Consent {
        #[arg(value_enum)]
        decision: Decision,
    },
    /// Install an image no server assigned, from a file or an http(s) URL; confirmed after the
    /// reboot by `once`/`run`.
    Install {
        /// Verify only (signature, compatible, size, hashes); write nothing.
        #[arg(long)]
        check: bool,
        /// Activate without rebooting (the reboot is left to you).
        #[arg(long)]
        no_reboot: bool,
        /// A file path or an http(s):// URL.
        source: String,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Decision {
    Accept,
    Deny,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let command = match cli.command {
        Cmd::Run => Command::Run,
        Cmd::Once => Command::Once,
        Cmd::Status { json } => {
            // `status | head -1` ends quietly as `cat` does (only here: the daemon keeps
            // EPIPE as an error on its pipes).
            // SAFETY: one thread so far; restoring a signal's default action is sound.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            Command::Status { json }
        }
        Cmd::Consent { decision } => Command::Consent {
            accept: matches!(decision, Decision::Accept),
        },
        Cmd::Install {
            check,
            no_reboot,
            source,
        } => Command::Install {
            source,
            check,
            reboot: !no_reboot,
        },
    };
    ExitCode::from(service::main(&cli.config, command))
}
