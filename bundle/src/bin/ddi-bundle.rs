//! `ddi-bundle`: make keys, create signed bundles, verify and inspect them.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ddi_bundle::{
    create_bundle, generate_keypair, BundleReader, Compression, CreateOptions, Policy, PublicKey,
    SecretKey,
};

#[derive(Parser)]
#[command(
    name = "ddi-bundle",
    version,
    about = "Create and verify signed update bundles"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate an ed25519 key pair: PREFIX.key (secret, mode 0600) and PREFIX.pub.
    Keygen {
        /// Path prefix of the two files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Create a signed bundle from an image (raw or gzip).
    Create {
        /// Secret key file; repeat to sign with several keys (key rotation).
        #[arg(long = "key", required = true)]
        keys: Vec<PathBuf>,
        #[arg(long)]
        compatible: String,
        #[arg(long)]
        version: String,
        /// The image file to bundle.
        #[arg(long)]
        image: PathBuf,
        /// Member name of the image (default: the image's file name).
        #[arg(long)]
        image_name: Option<String>,
        /// none or gzip (default: detected from the image's magic bytes).
        #[arg(long)]
        compression: Option<String>,
        /// Where to write the bundle.
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Verify a bundle completely (signature, compatible, image size and hash).
    Verify {
        /// A trusted public key file; repeat for several.
        #[arg(long = "trusted-key", required = true)]
        trusted_keys: Vec<PathBuf>,
        /// The device's compatible string to check against.
        #[arg(long)]
        compatible: Option<String>,
        bundle: PathBuf,
    },
    /// Print a bundle's manifest without verifying anything.
    Info { bundle: PathBuf },
}

fn main() {
    if let Err(err) = run(Cli::parse()) {
        eprintln!("ddi-bundle: {err:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { out } => keygen(&out),
        Command::Create {
            keys,
            compatible,
            version,
            image,
            image_name,
            compression,
            output,
        } => {
            let keys = keys
                .iter()
                .map(|p| SecretKey::load(p))
                .collect::<Result<Vec<_>, _>>()?;
            let compression = match compression.as_deref() {
                None => None,
                Some("none") => Some(Compression::None),
                Some("gzip") => Some(Compression::Gzip),
                Some(other) => bail!("--compression {other:?}: expected none or gzip"),
            };
            let options = CreateOptions {
                compatible,
                version,
                image_name,
                compression,
                keys: &keys,
            };
            let tmp = output.with_extension("partial");
            let file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let manifest = create_bundle(&image, &options, file)
                .with_context(|| format!("bundling {}", image.display()))?;
            std::fs::rename(&tmp, &output)
                .with_context(|| format!("renaming to {}", output.display()))?;
            println!(
                "{}: {} {} ({} bytes, sha256 {}, {:?}), signed by {}",
                output.display(),
                manifest.compatible,
                manifest.version,
                manifest.image.size,
                manifest.image.sha256,
                manifest.image.compression,
                keys.iter()
                    .map(|k| k.public_key().key_id())
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            Ok(())
        }
        Command::Verify {
            trusted_keys,
            compatible,
            bundle,
        } => {
            let policy = Policy {
                trusted_keys: trusted_keys
                    .iter()
                    .map(|p| PublicKey::load(p))
                    .collect::<Result<Vec<_>, _>>()?,
                compatible,
                max_image_size: None,
            };
            let file =
                File::open(&bundle).with_context(|| format!("opening {}", bundle.display()))?;
            let mut reader = BundleReader::open(io::BufReader::new(file), &policy)?;
            let copied = io::copy(&mut reader, &mut io::sink()).map_err(|e| {
                match ddi_bundle::BundleError::from_io(&e) {
                    Some(inner) => anyhow::anyhow!("{inner}"),
                    None => anyhow::anyhow!("reading {}: {e}", bundle.display()),
                }
            })?;
            let m = reader.manifest();
            println!(
                "OK: {} {} image {} ({copied} bytes) signed by trusted key {}",
                m.compatible,
                m.version,
                m.image.name,
                reader.verified_by()
            );
            Ok(())
        }
        Command::Info { bundle } => {
            let file =
                File::open(&bundle).with_context(|| format!("opening {}", bundle.display()))?;
            let manifest = ddi_bundle::read_manifest_unverified(io::BufReader::new(file))
                .with_context(|| format!("reading {}", bundle.display()))?;
            println!("{}", serde_json::to_string_pretty(&manifest)?);
            println!("(unverified: use `ddi-bundle verify` to check signature and image)");
            Ok(())
        }
    }
}

fn keygen(prefix: &Path) -> Result<()> {
    let secret = generate_keypair()?;
    let secret_path = prefix.with_extension("key");
    let public_path = prefix.with_extension("pub");
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&secret_path)
        .with_context(|| format!("creating {} (it must not exist yet)", secret_path.display()))?;
    file.write_all(secret.to_text().as_bytes())?;
    file.sync_all()?;
    std::fs::write(&public_path, secret.public_key().to_text())
        .with_context(|| format!("writing {}", public_path.display()))?;
    println!(
        "key {}: secret {}, public {}",
        secret.public_key().key_id(),
        secret_path.display(),
        public_path.display()
    );
    Ok(())
}
