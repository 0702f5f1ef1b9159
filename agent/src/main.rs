//! `ddi-agent`: the hawkBit DDI update agent. Reads the command line ([`ddi_agent::cli`]); the
//! commands live in `ddi_agent::service`.

use std::process::ExitCode;

use ddi_agent::cli::{self, Invocation};
use ddi_agent::service::{self, Command};

/// Exit status of a usage error (as clap's, which the host tools use).
const USAGE: u8 = 2;

fn main() -> ExitCode {
    let (config, command) = match cli::parse(std::env::args_os().skip(1)) {
        Ok(Invocation::Command { config, command }) => (config, command),
        Ok(Invocation::Help(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            println!("ddi-agent {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("ddi-agent: {e}");
            return ExitCode::from(USAGE);
        }
    };
    if let Command::Status { .. } = command {
        // `status | head -1` ends quietly as `cat` does (only here: the daemon keeps EPIPE as
        // an error on its pipes).
        // SAFETY: one thread so far; restoring a signal's default action is sound.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    }
    ExitCode::from(service::main(&config, command))
}
