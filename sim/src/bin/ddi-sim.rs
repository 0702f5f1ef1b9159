//! `ddi-sim`: a hawkBit-compatible TEST server for the ddi agent (production uses Eclipse
//! hawkBit), and a command-line client of its management API.

use anyhow::{bail, Context, Result};
use axum::serve::ListenerExt;
use clap::{Parser, Subcommand};
use ddi_sim::client::MgmtClient;
use ddi_sim::model::{now_ms, parse_interval, ActionType, Assignment, MaintenanceWindow};
use ddi_sim::{ActionView, Endpoint, Fault, FaultKind, HawkbitVersion, ServerOptions};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

const ABOUT: &str = "hawkBit-compatible TEST server for the ddi agent, and a client of its management API.\n\
This is a test tool: it has no management authentication and keeps its state in memory (or a state file).\n\
Production deployments use Eclipse hawkBit.";

#[derive(Parser)]
#[command(name = "ddi-sim", version, about = ABOUT, long_about = ABOUT)]
struct Cli {
    /// URL of a running ddi-sim for the client commands (default: $DDI_SIM_URL or http://127.0.0.1:8080)
    #[arg(long, global = true)]
    server: Option<String>,
    /// Print JSON instead of text (client commands)
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the test server (binds 127.0.0.1 unless told otherwise)
    Serve(ServeArgs),
    /// Targets (devices)
    #[command(subcommand)]
    Target(TargetCmd),
    /// Create a software module
    Module {
        /// Module type key, sent as the chunk `part`
        #[arg(long, default_value = "os")]
        part: String,
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
    },
    /// Upload an artifact file; without --module, creates a module and a distribution set for it
    Upload {
        file: PathBuf,
        /// Add to this existing module
        #[arg(long)]
        module: Option<u64>,
        /// Version of the new module and distribution set
        #[arg(long, default_value = "1.0")]
        version: String,
        /// Name of the new module and distribution set
        #[arg(long, default_value = "firmware")]
        name: String,
        #[arg(long, default_value = "os")]
        part: String,
        /// Artifact file name (default: the file's name)
        #[arg(long)]
        filename: Option<String>,
        /// Register the file by path instead of uploading it (same machine; served from disk)
        #[arg(long)]
        link: bool,
    },
    /// Create a distribution set from modules
    Distribution {
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long = "module", required = true)]
        modules: Vec<u64>,
    },
    /// Assign a distribution set to a target (prints the action id)
    Assign(AssignArgs),
    /// Cancel an action (the device is asked to cancel); --force closes a canceling action
    Cancel {
        action: u64,
        #[arg(long)]
        force: bool,
    },
    /// Show an action's status and feedback history
    Action { action: u64 },
    /// List a target's actions
    Actions { target: String },
    /// Fault injection
    #[command(subcommand)]
    Fault(FaultCmd),
    /// Show or change tenant settings
    Config {
        /// Polling interval: seconds, HH:MM:SS or ISO-8601 (PT36H)
        #[arg(long)]
        polling: Option<String>,
        /// hawkBit version to imitate (e.g. 0.3.0M7, 0.9.0, 1.1.0, head)
        #[arg(long)]
        hawkbit_version: Option<HawkbitVersion>,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TCP port (0 = any free port)
    #[arg(long, default_value_t = 8080)]
    port: u16,
    /// Address to bind; loopback by default (this is a test server)
    #[arg(long, default_value = "127.0.0.1")]
    bind: IpAddr,
    #[arg(long, default_value = "DEFAULT")]
    tenant: String,
    /// hawkBit version to imitate (e.g. 0.3.0M7, 0.9.0, 1.1.0, head)
    #[arg(long, default_value = "head")]
    hawkbit_version: HawkbitVersion,
    /// Polling interval: seconds, HH:MM:SS or ISO-8601 (PT36H)
    #[arg(long, default_value = "00:05:00")]
    polling: String,
    /// Floor of the maintenance-window shortened interval, seconds
    #[arg(long, default_value_t = 30)]
    min_polling: u64,
    /// Random deviation of the polling interval, percent (hawkBit's `~N%`)
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=100))]
    polling_deviation: u8,
    /// Enable GatewayToken authentication with this key
    #[arg(long)]
    gateway_token: Option<String>,
    /// Disable TargetToken authentication
    #[arg(long)]
    no_target_token: bool,
    /// Trust certificate identities forwarded by a TLS proxy with this authority (issuer hash)
    /// in `X-Authority*` (or `X-Ssl-Issuer-Hash-N` up to 0.10.0); repeatable
    #[arg(long = "trusted-authority")]
    trusted_authorities: Vec<String>,
    /// Allow unauthenticated DDI access (only with --hawkbit-version 0.7.x or older, as hawkBit)
    #[arg(long)]
    anonymous: bool,
    /// Also advertise `download`/`md5sum` links under this host name
    #[arg(long)]
    download_link_host: Option<String>,
    /// Load state from and save it to this JSON file
    #[arg(long)]
    state_file: Option<PathBuf>,
    /// Directory for uploaded artifacts (default: next to the state file, else temporary)
    #[arg(long)]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum TargetCmd {
    /// Create a target (prints its token)
    Create {
        controller_id: String,
        /// TargetToken (default: 32 random characters)
        #[arg(long)]
        token: Option<String>,
    },
    List,
    Show {
        controller_id: String,
    },
    /// Ask the device for its attributes again (configData link)
    RequestAttributes {
        controller_id: String,
    },
    /// Polling interval of one target (seconds, HH:MM:SS, PT..), or `default` for the tenant's
    Polling {
        controller_id: String,
        interval: String,
    },
    /// Switch auto-confirm on or off
    AutoConfirm {
        controller_id: String,
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
}

#[derive(clap::Args)]
struct AssignArgs {
    target: String,
    distribution: u64,
    /// forced, soft, timeforced or downloadonly
    #[arg(long = "type", default_value = "forced")]
    action_type: ActionType,
    /// timeforced: seconds until the action becomes forced
    #[arg(long)]
    forced_in: Option<u64>,
    /// Maintenance window: seconds until it opens
    #[arg(long, requires = "maintenance_duration")]
    maintenance_start_in: Option<i64>,
    /// Maintenance window length, seconds
    #[arg(long, requires = "maintenance_start_in")]
    maintenance_duration: Option<i64>,
    /// Maintenance window repeats every this many seconds
    #[arg(long, requires = "maintenance_start_in")]
    maintenance_every: Option<i64>,
    /// The device must confirm before the deployment starts
    #[arg(long)]
    confirmation_required: bool,
}

#[derive(Subcommand)]
enum FaultCmd {
    /// Inject a fault
    Add {
        #[command(subcommand)]
        kind: FaultSpec,
        /// Only for this controller id
        #[arg(long, global = true)]
        target: Option<String>,
        /// Only on this endpoint (poll, deployment_base, deployment_feedback, cancel_action,
        /// cancel_feedback, config_data, artifact_list, download, installed_base,
        /// confirmation_base, confirmation_feedback, any)
        #[arg(long, global = true)]
        endpoint: Option<String>,
        /// Only this many times (default: until cleared)
        #[arg(long, global = true)]
        times: Option<u32>,
        /// Let this many requests through first (it starts at the next one)
        #[arg(long, global = true, default_value_t = 0)]
        after: u32,
    },
    List,
    Clear,
}

#[derive(Subcommand)]
enum FaultSpec {
    /// Answer with this HTTP status (e.g. 503, 429)
    Status {
        code: u16,
        #[arg(long)]
        retry_after: Option<u64>,
    },
    /// Drop the connection after N body bytes
    DropAfter { bytes: u64 },
    /// Send bodies at this many bytes per second
    Slow { bytes_per_sec: u64 },
    /// Advertise wrong hashes
    WrongHash,
    /// Send broken JSON
    MalformedJson,
    /// Send only the first N bytes (with a matching Content-Length)
    Truncate { bytes: u64 },
    /// Answer Range requests with 200 and the whole body
    IgnoreRange,
}

fn print_action(a: &ActionView) {
    println!(
        "action {} target {} {} {} ({:?}): {}{}",
        a.id,
        a.target,
        a.distribution_name,
        a.distribution_version,
        a.action_type,
        a.status.name(),
        if a.active { " (active)" } else { "" }
    );
    for e in &a.history {
        let code = e.code.map(|c| format!(" code {c}")).unwrap_or_default();
        println!(
            "  {} {}{}: {}",
            e.time_ms,
            e.status.name(),
            code,
            e.messages.join(" | ")
        );
    }
    for f in &a.feedback {
        println!("  feedback {:?} at {}: {}", f.channel, f.time_ms, f.body);
    }
}

fn serve(args: ServeArgs) -> Result<()> {
    let mut opts = ServerOptions::default()
        .bind(SocketAddr::new(args.bind, args.port))
        .tenant(&args.tenant)
        .version(args.hawkbit_version);
    let polling = parse_interval(&args.polling)
        .with_context(|| format!("invalid --polling {:?}", args.polling))?;
    opts = opts.polling(polling);
    opts.config.min_polling_ms = (args.min_polling * 1000) as i64;
    opts.config.polling_deviation_pct = args.polling_deviation;
    opts.config.gateway_token = args.gateway_token;
    opts.config.target_token_enabled = !args.no_target_token;
    if args.anonymous && !args.hawkbit_version.supports_anonymous() {
        bail!("--anonymous needs --hawkbit-version 0.7.x or older (hawkBit removed it in 0.8.0)");
    }
    opts.config.anonymous = args.anonymous;
    if !args.trusted_authorities.is_empty() {
        opts.config.trusted_authorities = Some(args.trusted_authorities);
    }
    opts.config.download_link_host = args.download_link_host;
    opts.state_file = args.state_file;
    opts.data_dir = args.data_dir;
    let shared = ddi_sim::shared_from_options(&opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.bind)
            .await
            .with_context(|| format!("cannot bind {}", opts.bind))?;
        let addr = listener.local_addr()?;
        if !addr.ip().is_loopback() {
            eprintln!(
                "ddi-sim: WARNING: listening on {addr}, not loopback; the management API has no authentication"
            );
        }
        // Announce the address; a closed stdout must not stop the server.
        let banner = format!(
            "ddi-sim: hawkBit-compatible TEST server (production uses Eclipse hawkBit) on http://{addr}, tenant {}, imitating hawkBit {}\n\
             DDI: http://{addr}/{}/controller/v1/<controllerId>   management: http://{addr}/mgmt/\n",
            opts.config.tenant, opts.config.version, opts.config.tenant
        );
        {
            use std::io::Write;
            let mut out = std::io::stdout();
            let _ = out.write_all(banner.as_bytes()).and_then(|_| out.flush());
        }
        // Nagle's algorithm off, as in hawkBit's Tomcat (see `ddi_sim::TestServer`).
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, ddi_sim::router(shared))
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("server failed")
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    if let Command::Serve(args) = cli.command {
        tracing_subscriber::fmt()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info".into()),
            )
            .init();
        return serve(args);
    }
    let url = cli
        .server
        .or_else(|| std::env::var("DDI_SIM_URL").ok())
        .unwrap_or_else(|| "http://127.0.0.1:8080".into());
    let c = MgmtClient::new(&url);
    let json = cli.json;
    let out = |v: &dyn listing::Show| v.show(json);
    match cli.command {
        Command::Serve(_) => unreachable!("handled above"),
        Command::Target(cmd) => match cmd {
            TargetCmd::Create {
                controller_id,
                token,
            } => {
                let t = c.create_target(&controller_id, token.as_deref())?;
                if json {
                    println!("{}", serde_json::to_string_pretty(&t)?);
                } else {
                    println!("{}", t.target.token.unwrap_or_default());
                }
            }
            TargetCmd::List => out(&c.targets()?),
            TargetCmd::Show { controller_id } => out(&vec![c.target(&controller_id)?]),
            TargetCmd::RequestAttributes { controller_id } => {
                c.request_attributes(&controller_id)?
            }
            TargetCmd::Polling {
                controller_id,
                interval,
            } => {
                let ms = if interval == "default" {
                    None
                } else {
                    let d = parse_interval(&interval)
                        .with_context(|| format!("invalid interval {interval:?}"))?;
                    Some(d.as_millis() as u64)
                };
                c.set_target_polling(&controller_id, ms)?
            }
            TargetCmd::AutoConfirm {
                controller_id,
                state,
            } => c.set_auto_confirm(&controller_id, state == "on")?,
        },
        Command::Module {
            part,
            name,
            version,
        } => println!("{}", c.create_module(&part, &name, &version)?),
        Command::Upload {
            file,
            module,
            version,
            name,
            part,
            filename,
            link,
        } => {
            let filename = match filename {
                Some(f) => f,
                None => file
                    .file_name()
                    .and_then(|n| n.to_str())
                    .map(str::to_string)
                    .with_context(|| format!("{} has no file name", file.display()))?,
            };
            let (m, new) = match module {
                Some(m) => (m, false),
                None => (c.create_module(&part, &name, &version)?, true),
            };
            let path = if link {
                std::fs::canonicalize(&file).with_context(|| file.display().to_string())?
            } else {
                file.clone()
            };
            let a = if link {
                c.link_file(m, &filename, &path)?
            } else {
                c.upload(m, &filename, &path)?
            };
            let ds = if new {
                Some(c.create_distribution(&name, &version, &[m])?)
            } else {
                None
            };
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "module": m, "distribution": ds, "artifact": a })
                );
            } else {
                println!(
                    "module {m}: {} ({} bytes, sha256 {})",
                    a.filename, a.size, a.sha256
                );
                if let Some(ds) = ds {
                    println!("distribution {ds}: {name} {version}");
                }
            }
        }
        Command::Distribution {
            name,
            version,
            modules,
        } => println!("{}", c.create_distribution(&name, &version, &modules)?),
        Command::Assign(a) => {
            let now = now_ms();
            let mut how = Assignment::new(a.action_type);
            if a.action_type == ActionType::Timeforced {
                let secs = a
                    .forced_in
                    .context("--type timeforced needs --forced-in SECS")?;
                how.forced_at_ms = Some(now + secs as i64 * 1000);
            }
            if let (Some(start), Some(duration)) = (a.maintenance_start_in, a.maintenance_duration)
            {
                how.maintenance = Some(MaintenanceWindow {
                    start_ms: now + start * 1000,
                    duration_ms: duration * 1000,
                    every_ms: a.maintenance_every.map(|e| e * 1000),
                });
            }
            how.confirmation_required = a.confirmation_required;
            println!("{}", c.assign(&a.target, a.distribution, &how)?);
        }
        Command::Cancel { action, force } => c.cancel(action, force)?,
        Command::Action { action } => {
            let a = c.action(action)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&a)?);
            } else {
                print_action(&a);
            }
        }
        Command::Actions { target } => {
            let list = c.target_actions(&target)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                for a in &list {
                    println!(
                        "{} {} {} {}",
                        a.id,
                        a.distribution_version,
                        a.status.name(),
                        a.result().unwrap_or("-")
                    );
                }
            }
        }
        Command::Fault(cmd) => match cmd {
            FaultCmd::Add {
                kind,
                target,
                endpoint,
                times,
                after,
            } => {
                let kind = match kind {
                    FaultSpec::Status { code, retry_after } => FaultKind::Status {
                        code,
                        retry_after_secs: retry_after,
                    },
                    FaultSpec::DropAfter { bytes } => FaultKind::DropAfter { bytes },
                    FaultSpec::Slow { bytes_per_sec } => FaultKind::Slow { bytes_per_sec },
                    FaultSpec::WrongHash => FaultKind::WrongHash,
                    FaultSpec::MalformedJson => FaultKind::MalformedJson,
                    FaultSpec::Truncate { bytes } => FaultKind::Truncate { bytes },
                    FaultSpec::IgnoreRange => FaultKind::IgnoreRange,
                };
                let mut f = Fault::new(kind).after(after);
                f.target = target;
                f.times = times;
                if let Some(e) = endpoint {
                    let e: Endpoint = serde_json::from_value(serde_json::Value::String(e.clone()))
                        .with_context(|| format!("unknown endpoint {e:?}"))?;
                    f.endpoint = Some(e);
                }
                println!("{}", c.add_fault(&f)?);
            }
            FaultCmd::List => println!("{}", serde_json::to_string_pretty(&c.faults()?)?),
            FaultCmd::Clear => c.clear_faults()?,
        },
        Command::Config {
            polling,
            hawkbit_version,
        } => {
            let mut patch = serde_json::Map::new();
            if let Some(p) = polling {
                let d = parse_interval(&p).with_context(|| format!("invalid --polling {p:?}"))?;
                patch.insert("polling_ms".into(), serde_json::json!(d.as_millis() as u64));
            }
            if let Some(v) = hawkbit_version {
                patch.insert("version".into(), serde_json::json!(v.to_string()));
            }
            let cfg = if patch.is_empty() {
                c.config()?
            } else {
                c.update_config(serde_json::Value::Object(patch))?
            };
            println!("{}", serde_json::to_string_pretty(&cfg)?);
        }
    }
    Ok(())
}

/// Text or JSON output of target lists.
mod listing {
    use ddi_sim::TargetView;

    pub trait Show {
        fn show(&self, json: bool);
    }

    impl Show for Vec<TargetView> {
        fn show(&self, json: bool) {
            if json {
                println!("{}", serde_json::to_string_pretty(self).unwrap_or_default());
                return;
            }
            for t in self {
                println!(
                    "{} {} installed={} actions={:?} attributes={:?} last_poll={}",
                    t.target.controller_id,
                    t.update_status,
                    t.installed_version.as_deref().unwrap_or("-"),
                    t.actions,
                    t.target.attributes,
                    t.target
                        .last_poll_ms
                        .map(|m| m.to_string())
                        .unwrap_or_else(|| "never".into())
                );
            }
        }
    }
}
