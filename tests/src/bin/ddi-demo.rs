//! `ddi-demo`: plays the whole update story (good update confirmed, broken update rolled back,
//! hanging update rolled back by U-Boot) with the real `ddi-agent` and `ddi-bootctl` against an
//! in-process test server and a file-backed device. Run through `./demo.sh`, which builds the
//! binaries first. Exit status: 0 when the story ended as expected, 1 when it did not, 2 when it
//! could not be played.

use std::path::PathBuf;
use std::process::ExitCode;

use bootctl::SchemeKind;
use clap::Parser;

use ddi_tests::demo::{self, DemoOptions};

#[derive(Parser)]
#[command(
    name = "ddi-demo",
    about = "Play an A/B update story with the real ddi-agent against a simulated board (no root, no network)"
)]
struct Args {
    /// Plain lines, no progress bars or colours (default when stdout is not a terminal).
    #[arg(long)]
    plain: bool,
    /// Keep the device directory (slot files, env, agent logs) after the demo.
    #[arg(long)]
    keep: bool,
    /// Build the simulated device in this directory instead of a temporary one.
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Slot scheme of the simulated board: bootcount (U-Boot's boot counter) or rauc.
    #[arg(long, value_name = "SCHEME", default_value = "bootcount")]
    scheme: SchemeKind,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let options = DemoOptions {
        fancy: if args.plain { Some(false) } else { None },
        keep_dir: args.keep,
        dir: args.dir,
        scheme: Some(args.scheme),
    };
    let mut stdout = std::io::stdout();
    match demo::run(&mut stdout, &options) {
        Ok(outcome) if outcome.passed() => ExitCode::SUCCESS,
        Ok(_) => ExitCode::from(1),
        Err(err) => {
            eprintln!("ddi-demo: the demo could not be played: {err}");
            ExitCode::from(2)
        }
    }
}
