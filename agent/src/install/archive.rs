//! Taking the image out of a tar archive as it streams by: exactly one regular file (or the
//! one named in the options), with every member checked: no absolute paths or `..`, no hard
//! or symbolic links, no device nodes or fifos, no sparse files, no member larger than the
//! slot.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use super::decode::{self, Format};
use super::InstallError;

/// Where the image bytes go (the slot writer, or a buffer in tests).
pub trait ImageSink {
    /// The image's size is known before its first byte: fail now if it cannot fit.
    fn expect_size(&mut self, size: u64) -> Result<(), InstallError>;
    fn write(&mut self, data: &[u8]) -> Result<(), InstallError>;
    /// The image member's data starts at `data_offset` of the archive (called before
    /// [`ImageSink::expect_size`]): where resume records place it.
    fn image_member(&mut self, _data_offset: u64) -> Result<(), InstallError> {
        Ok(())
    }
}

fn rejected(msg: String) -> InstallError {
    InstallError::ArchiveRejected(msg)
}

/// The member's path without `.` components; refuses absolute paths and `..`.
fn safe_path(path: &Path) -> Result<PathBuf, InstallError> {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::CurDir => {}
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => {
                return Err(rejected(format!(
                    "member {} escapes the archive (absolute path or `..`)",
                    path.display()
                )))
            }
        }
    }
    Ok(out)
}

/// Stream the archive from `reader`, writing the image member into `sink`. `member` names
/// the image when the archive holds several files. `max_member` is the slot capacity.
/// `offset` tells where in the artifact the reader is (for error messages).
/// Returns the image size.
pub fn extract_image<R: Read>(
    mut reader: R,
    format: Format,
    member: Option<&str>,
    max_member: u64,
    offset: &dyn Fn() -> u64,
    sink: &mut dyn ImageSink,
) -> Result<u64, InstallError> {
    // One copy of the tar reader in the binary for all the readers it is used with.
    extract(&mut reader, format, member, max_member, offset, sink)
}

fn extract(
    reader: &mut dyn Read,
    format: Format,
    member: Option<&str>,
    max_member: u64,
    offset: &dyn Fn() -> u64,
    sink: &mut dyn ImageSink,
) -> Result<u64, InstallError> {
    let wanted = member.map(|m| safe_path(Path::new(m))).transpose()?;
    let read_err = |e| decode::read_error(e, format, offset());
    let mut archive = tar::Archive::new(reader);
    let mut image: Option<(PathBuf, u64)> = None;
    // Small: the bytes are copied on into the slot writer's buffer (peak RSS, issue 19).
    let mut buf = vec![0u8; 64 * 1024];
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let raw_path = entry.path().map_err(read_err)?.into_owned();
        let path = safe_path(&raw_path)?;
        let size = entry.size();
        let kind = entry.header().entry_type();
        let shown = raw_path.display();
        match kind {
            EntryType::Regular | EntryType::Continuous => {}
            EntryType::Directory | EntryType::XGlobalHeader | EntryType::XHeader => continue,
            EntryType::Link | EntryType::Symlink => {
                return Err(rejected(format!("member {shown} is a link")))
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                return Err(rejected(format!("member {shown} is a device node or fifo")))
            }
            EntryType::GNUSparse => return Err(rejected(format!("member {shown} is sparse"))),
            other => {
                return Err(rejected(format!(
                    "member {shown} has unsupported type {:?}",
                    other.as_byte() as char
                )))
            }
        }
        let is_image = match &wanted {
            Some(w) => *w == path,
            None => true,
        };
        if !is_image {
            if size > max_member {
                return Err(rejected(format!(
                    "member {shown} is {size} bytes, more than the slot holds ({max_member})"
                )));
            }
            continue; // the archive reader skips its data
        }
        if let Some((first, _)) = &image {
            return Err(rejected(match &wanted {
                Some(_) => format!("image member {shown} appears twice"),
                None => format!(
                    "more than one regular file ({} and {shown}); name the image member in the configuration",
                    first.display()
                ),
            }));
        }
        if path.as_os_str().is_empty() {
            return Err(rejected("a regular file without a name".into()));
        }
        sink.image_member(entry.raw_file_position())?;
        sink.expect_size(size)?;
        let mut written = 0u64;
        loop {
            let n = entry.read(&mut buf).map_err(read_err)?;
            if n == 0 {
                break;
            }
            sink.write(&buf[..n])?;
            written += n as u64;
        }
        if written != size {
            return Err(InstallError::Decode {
                format: format.name(),
                offset: offset(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("archive ends inside {shown} ({written} of {size} bytes)"),
                ),
            });
        }
        image = Some((path, size));
    }
    match image {
        Some((_, size)) => Ok(size),
        None => Err(rejected(match member {
            Some(m) => format!("no member named {m}"),
            None => "no regular file in the archive".into(),
        })),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct VecSink {
        data: Vec<u8>,
        capacity: u64,
    }

    impl ImageSink for VecSink {
        fn expect_size(&mut self, size: u64) -> Result<(), InstallError> {
            if size > self.capacity {
                return Err(InstallError::TooLarge {
                    slot: "mem".into(),
                    image_size: size,
                    at_least: false,
                    capacity: self.capacity,
                });
            }
            Ok(())
        }
        fn write(&mut self, data: &[u8]) -> Result<(), InstallError> {
            self.data.extend_from_slice(data);
            Ok(())
        }
    }

    enum Member<'a> {
        File(&'a str, &'a [u8]),
        Dir(&'a str),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
        Device(&'a str),
    }

    /// Build a tar by hand-setting names so even hostile paths can be produced.
    fn build(members: &[Member]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in members {
            let mut h = tar::Header::new_gnu();
            let (name, data): (&str, &[u8]) = match m {
                Member::File(n, d) => {
                    h.set_entry_type(EntryType::Regular);
                    (n, d)
                }
                Member::Dir(n) => {
                    h.set_entry_type(EntryType::Directory);
                    (n, &[])
                }
                Member::Symlink(n, t) | Member::HardLink(n, t) => {
                    h.set_entry_type(if matches!(m, Member::Symlink(..)) {
                        EntryType::Symlink
                    } else {
                        EntryType::Link
                    });
                    h.as_old_mut().linkname[..t.len()].copy_from_slice(t.as_bytes());
                    (n, &[])
                }
                Member::Device(n) => {
                    h.set_entry_type(EntryType::Block);
                    (n, &[])
                }
            };
            h.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    fn run(tar: &[u8], member: Option<&str>, capacity: u64) -> Result<Vec<u8>, InstallError> {
        let mut sink = VecSink {
            capacity,
            ..Default::default()
        };
        extract_image(tar, Format::Tar, member, capacity, &|| 0, &mut sink)?;
        Ok(sink.data)
    }

    #[test]
    fn takes_the_single_regular_file() {
        let t = build(&[Member::Dir("./"), Member::File("./rootfs.ext4", b"IMAGE")]);
        assert_eq!(run(&t, None, 100).unwrap(), b"IMAGE");
    }

    #[test]
    fn named_member_among_several() {
        let t = build(&[
            Member::File("README", b"read me"),
            Member::File("rootfs.ext4", b"IMAGE"),
        ]);
        assert_eq!(run(&t, Some("./rootfs.ext4"), 100).unwrap(), b"IMAGE");
        let err = run(&t, None, 100).unwrap_err();
        assert!(
            err.to_string().contains("more than one regular file"),
            "{err}"
        );
        let err = run(&t, Some("other"), 100).unwrap_err();
        assert!(err.to_string().contains("no member named other"), "{err}");
    }

    #[test]
    fn rejects_traversal_links_and_devices() {
        for (t, want) in [
            (build(&[Member::File("../evil", b"x")]), "escapes"),
            (build(&[Member::File("/etc/passwd", b"x")]), "escapes"),
            (build(&[Member::Symlink("img", "/dev/sda")]), "is a link"),
            (build(&[Member::HardLink("img", "../x")]), "is a link"),
            (build(&[Member::Device("sda")]), "device node"),
        ] {
            let err = run(&t, None, 100).unwrap_err();
            assert!(matches!(err, InstallError::ArchiveRejected(_)), "{err}");
            assert!(err.to_string().contains(want), "{err} lacks {want}");
        }
    }

    #[test]
    fn rejects_oversize_members_before_writing() {
        let t = build(&[Member::File("img", &[1u8; 600])]);
        let mut sink = VecSink {
            capacity: 500,
            ..Default::default()
        };
        let err = extract_image(&t[..], Format::Tar, None, 500, &|| 0, &mut sink).unwrap_err();
        assert!(
            matches!(
                err,
                InstallError::TooLarge {
                    at_least: false,
                    ..
                }
            ),
            "{err}"
        );
        assert!(sink.data.is_empty());
        let t = build(&[
            Member::File("junk", &[1u8; 600]),
            Member::File("img", b"ok"),
        ]);
        let err = run(&t, Some("img"), 500).unwrap_err();
        assert!(matches!(err, InstallError::ArchiveRejected(_)), "{err}");
    }

    #[test]
    fn truncated_archive_is_an_error() {
        let t = build(&[Member::File("img", &[1u8; 2000])]);
        let err = run(&t[..1500], None, 5000).unwrap_err();
        assert!(matches!(err, InstallError::Decode { .. }), "{err}");
        let err = run(&[], None, 5000).unwrap_err();
        assert!(matches!(err, InstallError::ArchiveRejected(_)), "{err}");
    }
}
