//! The task's work tmpfs: the new root is assembled on it, and it holds
//! `/tmp`, `/dev/shm`, an overlay root's upper layer and, with a size limit
//! ([`super::Spec::disk_bytes`]), `/build` and `/out` too; the source is
//! then copied in before the build and `/out` copied back to the host after.
//!
//! What must stay true:
//! - Every place the build can write is a part of this one tmpfs (the root,
//!   /dev and /proc are read-only), so its size bounds all that a build
//!   writes. Its pages are also charged to the task's memory cgroup.
//! - Copies never follow a symlink: links are recreated as links, files are
//!   opened with `O_NOFOLLOW`, and the copy out runs only once every build
//!   process is dead, so nothing changes under it.
//! - Setuid/setgid bits are not copied.

use std::fs::{DirBuilder, FileTimes, OpenOptions};
use std::io;
use std::os::unix::fs::{
    DirBuilderExt as _, FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _,
};
use std::path::Path;

use nix::mount::{MsFlags, mount};

use super::sys::{Context as _, SetupError};

/// The parts of the work tmpfs and their modes.
const PARTS: [(&str, u32); 4] = [
    ("build", 0o755),
    ("out", 0o755),
    ("tmp", 0o1777),
    ("shm", 0o1777),
];

/// Below this many free bytes (or with no free inode) the space counts as
/// full: writers get ENOSPC before the last block is used.
const FULL_SLACK: u64 = 64 << 10;

/// Mount the work tmpfs at `at` (of `bytes`, or the kernel's default size
/// when unlimited) and make its parts. Runs in pid 1 with umask 0, so the
/// modes are exact.
pub(super) fn mount_at(at: &Path, bytes: Option<u64>) -> Result<(), SetupError> {
    let opts = match bytes {
        Some(b) => format!("size={b},mode=0755"),
        None => "mode=0755".to_string(),
    };
    mount(
        Some("kiln-work"),
        at,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .ctx(|| format!("mount the work tmpfs ({opts})"))?;
    for (name, mode) in PARTS {
        DirBuilder::new()
            .mode(mode)
            .create(at.join(name))
            .ctx(|| format!("mkdir work part {name}"))?;
    }
    Ok(())
}

/// True when the filesystem holding `path` has no room left.
pub(super) fn is_full(path: &Path) -> bool {
    match nix::sys::statvfs::statvfs(path) {
        Ok(s) => {
            let free = s.blocks_available() * s.fragment_size();
            free < FULL_SLACK || s.files_available() == 0
        }
        Err(_) => false,
    }
}

/// Copy the contents of dir `from` into the existing dir `to`: dirs, files,
/// symlinks (as links) and fifos, with permission bits and mtimes.
/// Sockets and device nodes are skipped (a build cannot make devices).
pub(super) fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let meta = std::fs::symlink_metadata(&src)?;
        let mode = meta.mode() & 0o1777;
        let ft = meta.file_type();
        if ft.is_dir() {
            DirBuilder::new().mode(mode).create(&dst)?;
            copy_tree(&src, &dst)?;
            // After the children: creating them moved the dir's mtime.
            set_mtime(&dst, &meta)?;
        } else if ft.is_file() {
            let mut r = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&src)?;
            let mut w = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode & 0o777)
                .open(&dst)?;
            io::copy(&mut r, &mut w)?;
            w.set_times(FileTimes::new().set_modified(meta.modified()?))?;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
            set_mtime(&dst, &meta)?;
        } else if ft.is_fifo() {
            nix::unistd::mkfifo(&dst, nix::sys::stat::Mode::from_bits_truncate(mode & 0o777))?;
        }
    }
    Ok(())
}

/// mtime of a dir or symlink itself (never its target).
fn set_mtime(path: &Path, meta: &std::fs::Metadata) -> io::Result<()> {
    use nix::sys::stat::{UtimensatFlags, utimensat};
    use nix::sys::time::TimeSpec;
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &TimeSpec::UTIME_OMIT,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_links_as_links_and_keeps_mtimes() {
        let t = tempfile::tempdir().unwrap();
        let (a, b) = (t.path().join("a"), t.path().join("b"));
        std::fs::create_dir_all(a.join("sub")).unwrap();
        std::fs::write(a.join("sub/f"), b"data").unwrap();
        std::fs::set_permissions(
            a.join("sub/f"),
            std::os::unix::fs::PermissionsExt::from_mode(0o4755),
        )
        .unwrap();
        std::os::unix::fs::symlink("/etc/passwd", a.join("link")).unwrap();
        nix::unistd::mkfifo(
            &a.join("pipe"),
            nix::sys::stat::Mode::from_bits_truncate(0o644),
        )
        .unwrap();
        let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        std::fs::File::options()
            .write(true)
            .open(a.join("sub/f"))
            .unwrap()
            .set_modified(old)
            .unwrap();
        std::fs::create_dir(&b).unwrap();
        copy_tree(&a, &b).unwrap();
        assert_eq!(std::fs::read(b.join("sub/f")).unwrap(), b"data");
        let m = std::fs::metadata(b.join("sub/f")).unwrap();
        assert_eq!(m.mode() & 0o7777, 0o755, "setuid dropped");
        assert_eq!(m.modified().unwrap(), old);
        assert_eq!(
            std::fs::read_link(b.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert!(
            std::fs::symlink_metadata(b.join("pipe"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
    }
}
