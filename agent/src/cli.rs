//! The `ddi-agent` command line (see `docs/interface.md`): what the arguments ask for, the help
//! texts, and usage errors as one line.
//!
//! Parsed with lexopt rather than clap (which the host tools use): the agent ships on devices
//! within a 4 MiB budget, and clap's parser, help renderer and derived code made 185 KB of the
//! stripped binary for five commands.

use std::ffi::OsString;
use std::path::PathBuf;

use crate::config::DEFAULT_CONFIG_PATH;
use crate::service::Command;

/// What the command line asks for.
#[derive(Debug, PartialEq, Eq)]
pub enum Invocation {
    /// Run `command` with the config file `config`.
    Command { config: PathBuf, command: Command },
    /// Print this text on stdout and exit 0 (`--help`, `help [COMMAND]`).
    Help(String),
    /// Print the version on stdout and exit 0 (`--version`).
    Version,
}

/// A command line that asks for nothing the agent does: exit 2, this message on one line.
#[derive(Debug, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error: {} (see ddi-agent --help)", self.0)
    }
}

const ABOUT: &str = "hawkBit DDI update agent with A/B slots";

/// An option of the help texts: its flags, what it does.
type OptionHelp = (&'static str, &'static str);

/// The commands: name, one-line description, own options.
const COMMANDS: [(&str, &str, &[OptionHelp]); 5] = [
    (
        "run",
        "Daemon: poll forever at the server's interval (systemd Type=notify)",
        &[],
    ),
    (
        "once",
        "One cycle: confirm a pending reboot, poll once, carry out what the server asks",
        &[],
    ),
    (
        "status",
        "What the agent knows: booted slot, pending action, last result",
        &[("    --json", "One JSON object instead of text")],
    ),
    (
        "consent",
        "Answer the action waiting for consent (`[agent] consent = \"manual\"`)",
        &[],
    ),
    (
        "install",
        "Install an image no server assigned, from a file or an http(s) URL; confirmed after \
         the reboot by `once`/`run`",
        &[
            (
                "    --check",
                "Verify only (signature, compatible, size, hashes); write nothing",
            ),
            (
                "    --no-reboot",
                "Activate without rebooting (the reboot is left to you)",
            ),
        ],
    ),
];

/// The options every command takes, and `-V` (main help only).
const CONFIG_OPTION: OptionHelp = ("-c, --config <FILE>", "Configuration file");
const HELP_OPTION: OptionHelp = ("-h, --help", "Print help");
const VERSION_OPTION: OptionHelp = ("-V, --version", "Print version");

/// `Options:` and one aligned line per option.
fn options_text(options: &[OptionHelp]) -> String {
    let width = options
        .iter()
        .map(|(flag, _)| flag.len())
        .max()
        .unwrap_or(0);
    let mut text = String::from("\nOptions:\n");
    for (flag, about) in options {
        text += &format!("  {flag:<width$}  {about}");
        if *flag == CONFIG_OPTION.0 {
            text += &format!(" [default: {DEFAULT_CONFIG_PATH}]");
        }
        text.push('\n');
    }
    text
}

fn main_help() -> String {
    let mut text = format!("{ABOUT}\n\nUsage: ddi-agent [OPTIONS] <COMMAND>\n\nCommands:\n");
    for (name, about, _) in COMMANDS {
        text += &format!("  {name:<8} {about}\n");
    }
    text += "  help     Print this message or the help of the given command\n";
    text + &options_text(&[CONFIG_OPTION, HELP_OPTION, VERSION_OPTION])
}

fn command_help(name: &str) -> Option<String> {
    let (_, about, own) = COMMANDS.iter().find(|(n, ..)| *n == name)?;
    let usage = match name {
        "consent" => "ddi-agent consent <accept|deny>".to_string(),
        "install" => "ddi-agent install [OPTIONS] <SOURCE>".to_string(),
        _ => format!("ddi-agent {name} [OPTIONS]"),
    };
    let arguments = match name {
        "consent" => "\nArguments:\n  <accept|deny>  Accept or deny the action\n",
        "install" => "\nArguments:\n  <SOURCE>  A file path or an http(s):// URL\n",
        _ => "",
    };
    let options: Vec<_> = own
        .iter()
        .copied()
        .chain([CONFIG_OPTION, HELP_OPTION])
        .collect();
    Some(format!(
        "{about}\n\nUsage: {usage}\n{arguments}{}",
        options_text(&options)
    ))
}

fn usage(message: impl Into<String>) -> UsageError {
    UsageError(message.into())
}

fn text(value: OsString, what: &str) -> Result<String, UsageError> {
    value.into_string().map_err(|v| {
        usage(format!(
            "{what} is not valid UTF-8: {}",
            v.to_string_lossy()
        ))
    })
}

/// Parses the arguments after the program name. `-c`/`--config` may come before or after the
/// command; a command's options after it.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Invocation, UsageError> {
    use lexopt::prelude::*;

    let mut parser = lexopt::Parser::from_args(args);
    let mut config: Option<PathBuf> = None;
    let mut command: Option<String> = None;
    let mut help = false;
    let (mut json, mut check, mut no_reboot) = (false, false, false);
    let mut operands: Vec<OsString> = Vec::new();
    let unexpected = |e: lexopt::Error| usage(e.to_string());
    while let Some(arg) = parser.next().map_err(unexpected)? {
        let cmd = command.as_deref();
        match arg {
            Short('c') | Long("config") => {
                if config.is_some() {
                    return Err(usage("the option '--config' was given more than once"));
                }
                config = Some(parser.value().map_err(unexpected)?.into());
            }
            Short('h') | Long("help") => help = true,
            Short('V') | Long("version") if cmd.is_none() => return Ok(Invocation::Version),
            Long("json") if cmd == Some("status") => json = true,
            Long("check") if cmd == Some("install") => check = true,
            Long("no-reboot") if cmd == Some("install") => no_reboot = true,
            Value(value) if cmd.is_none() => command = Some(text(value, "the command")?),
            Value(value) => operands.push(value),
            _ => {
                let option = arg.unexpected().to_string();
                return Err(usage(match cmd {
                    Some(cmd) => format!("{option} for `{cmd}`"),
                    None => option,
                }));
            }
        }
    }
    let Some(name) = command else {
        return if help {
            Ok(Invocation::Help(main_help()))
        } else {
            Err(usage(
                "a command is required (run, once, status, consent or install)",
            ))
        };
    };
    if name == "help" {
        return match operands.as_slice() {
            [] => Ok(Invocation::Help(main_help())),
            [one] if one == "help" => Ok(Invocation::Help(main_help())),
            [one] => {
                let one = one.to_string_lossy();
                command_help(&one)
                    .map(Invocation::Help)
                    .ok_or_else(|| usage(format!("unrecognized command '{one}'")))
            }
            _ => Err(usage("`help` takes one command")),
        };
    }
    let Some(text_of_help) = command_help(&name) else {
        return Err(usage(format!("unrecognized command '{name}'")));
    };
    if help {
        return Ok(Invocation::Help(text_of_help));
    }
    let mut operands = operands.into_iter();
    let command = match name.as_str() {
        "run" => Command::Run,
        "once" => Command::Once,
        "status" => Command::Status { json },
        "consent" => {
            let decision = operands
                .next()
                .ok_or_else(|| usage("`consent` needs <accept|deny>"))?;
            let accept = match decision.to_str() {
                Some("accept") => true,
                Some("deny") => false,
                _ => {
                    return Err(usage(format!(
                        "invalid value '{}' for `consent` (possible values: accept, deny)",
                        decision.to_string_lossy()
                    )))
                }
            };
            Command::Consent { accept }
        }
        "install" => {
            let source = operands
                .next()
                .ok_or_else(|| usage("`install` needs <SOURCE>"))?;
            Command::Install {
                source: text(source, "SOURCE")?,
                check,
                reboot: !no_reboot,
            }
        }
        _ => unreachable!("command_help knows exactly the commands matched here"),
    };
    if let Some(extra) = operands.next() {
        return Err(usage(format!(
            "unexpected argument '{}' for `{name}`",
            extra.to_string_lossy()
        )));
    }
    Ok(Invocation::Command {
        config: config.unwrap_or_else(|| DEFAULT_CONFIG_PATH.into()),
        command,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(args: &[&str]) -> Result<Invocation, UsageError> {
        parse(args.iter().map(OsString::from))
    }

    fn command(args: &[&str]) -> (PathBuf, Command) {
        match parse_str(args) {
            Ok(Invocation::Command { config, command }) => (config, command),
            other => panic!("{args:?}: {other:?}"),
        }
    }

    fn error(args: &[&str]) -> String {
        match parse_str(args) {
            Err(e) => e.to_string(),
            Ok(other) => panic!("{args:?} parsed: {other:?}"),
        }
    }

    #[test]
    fn commands_and_their_options_parse() {
        let default = PathBuf::from(DEFAULT_CONFIG_PATH);
        assert_eq!(command(&["run"]), (default.clone(), Command::Run));
        assert_eq!(command(&["once"]).1, Command::Once);
        assert_eq!(command(&["status"]).1, Command::Status { json: false });
        assert_eq!(
            command(&["status", "--json"]).1,
            Command::Status { json: true }
        );
        assert_eq!(
            command(&["consent", "accept"]).1,
            Command::Consent { accept: true }
        );
        assert_eq!(
            command(&["consent", "deny"]).1,
            Command::Consent { accept: false }
        );
        let install = |source: &str, check, reboot| Command::Install {
            source: source.into(),
            check,
            reboot,
        };
        assert_eq!(
            command(&["install", "a.img"]).1,
            install("a.img", false, true)
        );
        assert_eq!(
            command(&["install", "--check", "--no-reboot", "b"]).1,
            install("b", true, false)
        );
        assert_eq!(
            command(&["install", "b", "--check"]).1,
            install("b", true, true)
        );
        // A source that looks like an option, after `--`.
        assert_eq!(
            command(&["install", "--", "-x.img"]).1,
            install("-x.img", false, true)
        );
    }

    #[test]
    fn the_config_file_takes_every_usual_form_before_or_after_the_command() {
        for args in [
            &["-c", "/x.toml", "once"][..],
            &["-c/x.toml", "once"],
            &["--config", "/x.toml", "once"],
            &["--config=/x.toml", "once"],
            &["once", "-c", "/x.toml"],
        ] {
            assert_eq!(
                command(args),
                (PathBuf::from("/x.toml"), Command::Once),
                "{args:?}"
            );
        }
    }

    #[test]
    fn usage_errors_are_one_line_naming_the_problem() {
        for (args, names) in [
            (&[][..], "a command is required"),
            (&["bogus"], "unrecognized command 'bogus'"),
            (&["install"], "`install` needs <SOURCE>"),
            (&["consent"], "`consent` needs <accept|deny>"),
            (&["consent", "maybe"], "invalid value 'maybe' for `consent`"),
            (&["run", "extra"], "unexpected argument 'extra' for `run`"),
            (&["status", "--check"], "--check"),
            (&["once", "--json"], "--json"),
            (&["--json", "status"], "--json"),
            (&["-c"], "missing argument for option '-c'"),
            (&["-c", "a", "-c", "b", "once"], "more than once"),
            (&["help", "bogus"], "unrecognized command 'bogus'"),
        ] {
            let message = error(args);
            assert!(message.contains(names), "{args:?}: {message}");
            assert!(!message.contains('\n'), "{args:?}: {message}");
            assert!(message.ends_with("(see ddi-agent --help)"), "{message}");
        }
    }

    #[test]
    fn help_and_version_name_every_command_and_option() {
        let Ok(Invocation::Help(main)) = parse_str(&["--help"]) else {
            panic!("no help")
        };
        for word in [
            "run",
            "once",
            "status",
            "consent",
            "install",
            "--config",
            "--version",
        ] {
            assert!(main.contains(word), "{word} missing from {main}");
        }
        assert_eq!(parse_str(&["help"]), Ok(Invocation::Help(main.clone())));
        assert_eq!(parse_str(&["help", "help"]), Ok(Invocation::Help(main)));
        for (cmd, word) in [
            ("status", "--json"),
            ("install", "--no-reboot"),
            ("consent", "deny"),
        ] {
            for args in [&[cmd, "--help"][..], &["help", cmd], &["-h", cmd]] {
                let Ok(Invocation::Help(text)) = parse_str(args) else {
                    panic!("{args:?}: no help")
                };
                assert!(text.contains(word), "{args:?}: {text}");
            }
        }
        assert_eq!(parse_str(&["-V"]), Ok(Invocation::Version));
        assert_eq!(parse_str(&["--version", "once"]), Ok(Invocation::Version));
    }
}
