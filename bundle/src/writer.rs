//! Creating bundles (the vendor side, also used by the Yocto layer and the tests).

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::Path;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::manifest::{Compression, ImageInfo, Manifest, SignatureEntry, Signatures};
use crate::tar;
use crate::{BundleError, SecretKey, FORMAT_VERSION, MANIFEST_NAME, SIGNATURE_NAME};

pub struct CreateOptions<'a> {
    pub compatible: String,
    pub version: String,
    /// Member name for the image; defaults to the image file's name.
    pub image_name: Option<String>,
    /// Detected from the gzip magic bytes when `None`.
    pub compression: Option<Compression>,
    /// Every key signs the manifest (one normally; two while rotating keys).
    pub keys: &'a [SecretKey],
}

/// Writes a bundle of the image at `image` to `out` and returns its manifest. The image is read
/// twice (hash, then copy) so that the manifest can come first without buffering the image.
pub fn create_bundle<W: Write>(
    image: &Path,
    options: &CreateOptions<'_>,
    out: W,
) -> Result<Manifest, BundleError> {
    if options.keys.is_empty() {
        return Err(BundleError::Manifest(
            "no signing key given: a bundle must be signed".into(),
        ));
    }
    let (size, sha256, gzip_magic) = hash_file(image)?;
    let name = match &options.image_name {
        Some(name) => name.clone(),
        None => image
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "image".into()),
    };
    let manifest = Manifest {
        format: FORMAT_VERSION,
        compatible: options.compatible.clone(),
        version: options.version.clone(),
        image: ImageInfo {
            name,
            size,
            sha256,
            compression: options.compression.unwrap_or(if gzip_magic {
                Compression::Gzip
            } else {
                Compression::None
            }),
        },
    };
    manifest.validate()?;
    let manifest_bytes = manifest.to_bytes();
    let signatures = Signatures {
        signatures: options
            .keys
            .iter()
            .map(|key| SignatureEntry {
                algorithm: "ed25519".into(),
                key_id: key.public_key().key_id(),
                signature: BASE64.encode(key.sign(&manifest_bytes)),
            })
            .collect(),
    };
    let mut signature_bytes = serde_json::to_vec_pretty(&signatures).expect("serializes");
    signature_bytes.push(b'\n');

    let mut out = io::BufWriter::new(out);
    write_member(
        &mut out,
        MANIFEST_NAME,
        &mut manifest_bytes.as_slice(),
        None,
    )?;
    write_member(
        &mut out,
        SIGNATURE_NAME,
        &mut signature_bytes.as_slice(),
        None,
    )?;
    let mut image_file = BufReader::with_capacity(1 << 20, File::open(image)?);
    write_member(
        &mut out,
        &manifest.image.name,
        &mut image_file,
        Some(manifest.image.size),
    )?;
    out.write_all(&[0u8; 2 * tar::BLOCK])?;
    out.flush()?;
    Ok(manifest)
}

fn write_member<W: Write, R: Read>(
    out: &mut W,
    name: &str,
    body: &mut R,
    known_size: Option<u64>,
) -> Result<(), BundleError> {
    let size = match known_size {
        Some(size) => size,
        None => {
            // Metadata members are small: buffer them to learn the size.
            let mut bytes = Vec::new();
            body.read_to_end(&mut bytes)?;
            return write_member(out, name, &mut bytes.as_slice(), Some(bytes.len() as u64));
        }
    };
    tar::write_header(out, name, size)?;
    let copied = io::copy(&mut body.take(size), out)?;
    if copied != size {
        return Err(BundleError::ImageSizeMismatch {
            manifest: size,
            actual: copied,
        });
    }
    out.write_all(&vec![0u8; tar::padding(size) as usize])?;
    Ok(())
}

fn hash_file(path: &Path) -> Result<(u64, String, bool), BundleError> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    let mut first = [0u8; 2];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if size == 0 && n >= 2 {
            first.copy_from_slice(&buf[..2]);
        }
        hasher.update(&buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize()), first == [0x1f, 0x8b]))
}
