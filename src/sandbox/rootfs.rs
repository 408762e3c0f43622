//! The sandbox's root filesystem, assembled by pid 1 in its own mount
//! namespace, on one "work" tmpfs: the root (the host's system dirs bound
//! read-only, or an overlay of a stored buildroot), `/build` and `/out`
//! (host dirs, or parts of the work tmpfs when the disk is limited), fresh
//! `/tmp`, `/dev/shm`, `/proc`, a minimal `/dev`, and the spec's extra binds.
//!
//! What must stay true:
//! - Nothing of the host is visible but the dirs in [`SYSTEM_DIRS`] (read-only,
//!   recursively) or the overlay's lower dir (never written: writes go to the
//!   upper layer on the work tmpfs), the spec's build/out dirs and its binds.
//!   In particular no /home, /root, /var, /run, /sys, /work or the hub's data.
//! - Host paths are opened ([`open_sources`]) while pid 1 still has the host
//!   identity it was cloned with, because the mapped root may be unable to
//!   search the hub's private dirs (e.g. a 0700 temp dir); the binds then use
//!   those fds, not paths.
//! - The old root is detached before the build runs. A host root is made
//!   read-only; an overlay root stays writable (package installs), and what
//!   is written dies with the task.

use std::ffi::OsString;
use std::os::fd::{AsRawFd as _, OwnedFd};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;

use super::sys::{Context as _, SetupError, make_readonly};
use super::{RootSpec, Spec};

/// Host dirs shared read-only with builds, if they exist. Symlinks among them
/// (merged /usr: /bin -> usr/bin) are recreated as symlinks.
const SYSTEM_DIRS: &[&str] = &[
    "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "opt",
];

/// Host device nodes bound into /dev.
const DEV_NODES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Where the new root is assembled: any existing host dir works, since the
/// tmpfs covers it only inside our private mount namespace and is pivoted away.
const STAGE: &str = "/tmp";

/// The dir of the work tmpfs the new root is assembled in.
const ROOT_DIR: &str = "root";

/// A host system dir: bound, or recreated as a symlink.
enum SystemEntry {
    Dir(&'static str, OwnedFd),
    Link(&'static str, OsString),
}

/// Host objects the root is built from, opened with the host identity.
pub(super) struct Sources {
    root: RootSource,
    build: OwnedFd,
    out: OwnedFd,
    dev: Vec<(&'static str, OwnedFd)>,
    binds: Vec<OwnedFd>,
}

enum RootSource {
    Host(Vec<SystemEntry>),
    Overlay(OwnedFd),
}

fn open_path(path: &Path, dir: bool) -> nix::Result<OwnedFd> {
    let mut flags = OFlag::O_PATH | OFlag::O_CLOEXEC;
    if dir {
        flags |= OFlag::O_DIRECTORY;
    }
    open(path, flags, Mode::empty())
}

/// Open every host path the root needs. Call before switching to the mapped ids.
pub(super) fn open_sources(spec: &Spec) -> Result<Sources, SetupError> {
    let root = match &spec.root {
        RootSpec::Host => RootSource::Host(open_system_dirs()?),
        RootSpec::Overlay { lower } => RootSource::Overlay(
            open_path(lower, true).ctx(|| format!("open buildroot {}", lower.display()))?,
        ),
    };
    let build = open_path(&spec.build_dir, true)
        .ctx(|| format!("open build dir {}", spec.build_dir.display()))?;
    let out = open_path(&spec.out_dir, true)
        .ctx(|| format!("open out dir {}", spec.out_dir.display()))?;
    let mut dev = Vec::new();
    for &name in DEV_NODES {
        let host = Path::new("/dev").join(name);
        match open_path(&host, false) {
            Ok(fd) => dev.push((name, fd)),
            Err(nix::errno::Errno::ENOENT) => {}
            Err(e) => return Err(e).ctx(|| format!("open {}", host.display())),
        }
    }
    let mut binds = Vec::new();
    for b in &spec.binds {
        if !b.path.starts_with('/') || b.path.split('/').any(|c| c == "..") {
            return Err(SetupError::Other(format!(
                "bind target {:?} must be an absolute path without ..",
                b.path
            )));
        }
        let meta = std::fs::metadata(&b.host).ctx(|| format!("stat {}", b.host.display()))?;
        binds.push(open_path(&b.host, meta.is_dir()).ctx(|| format!("open {}", b.host.display()))?);
    }
    Ok(Sources {
        root,
        build,
        out,
        dev,
        binds,
    })
}

fn open_system_dirs() -> Result<Vec<SystemEntry>, SetupError> {
    let mut system = Vec::new();
    for &name in SYSTEM_DIRS {
        let host = Path::new("/").join(name);
        match std::fs::symlink_metadata(&host) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e).ctx(|| format!("stat {}", host.display())),
            Ok(m) if m.file_type().is_symlink() => {
                let target =
                    std::fs::read_link(&host).ctx(|| format!("readlink {}", host.display()))?;
                system.push(SystemEntry::Link(name, target.into_os_string()));
            }
            Ok(m) if m.is_dir() => {
                let fd = open_path(&host, true).ctx(|| format!("open {}", host.display()))?;
                system.push(SystemEntry::Dir(name, fd));
            }
            Ok(_) => continue,
        }
    }
    Ok(system)
}

/// Paths under the staged root, named in messages as the build will see them.
struct Root(PathBuf);

impl Root {
    fn at(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }

    fn mkdir(&self, rel: &str, mode: u32) -> Result<PathBuf, SetupError> {
        let p = self.at(rel);
        std::fs::DirBuilder::new()
            .mode(mode)
            .create(&p)
            .ctx(|| format!("mkdir /{rel}"))?;
        Ok(p)
    }

    /// A dir that may already be there (an overlay root has most).
    fn ensure_dir(&self, rel: &str, mode: u32) -> Result<PathBuf, SetupError> {
        let p = self.at(rel);
        if !p.is_dir() {
            std::fs::DirBuilder::new()
                .mode(mode)
                .recursive(true)
                .create(&p)
                .ctx(|| format!("mkdir /{rel}"))?;
        }
        Ok(p)
    }

    fn touch(&self, rel: &str) -> Result<PathBuf, SetupError> {
        let p = self.at(rel);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(&p)
            .ctx(|| format!("create /{rel}"))?;
        Ok(p)
    }

    fn symlink(&self, target: impl AsRef<Path>, rel: &str) -> Result<(), SetupError> {
        std::os::unix::fs::symlink(target.as_ref(), self.at(rel)).ctx(|| format!("symlink /{rel}"))
    }

    fn mount_fs(
        &self,
        fstype: &str,
        rel: &str,
        flags: MsFlags,
        data: &str,
    ) -> Result<(), SetupError> {
        let target = self.at(rel);
        mount(Some(fstype), &target, Some(fstype), flags, Some(data))
            .ctx(|| format!("mount {fstype} on /{rel}"))
    }

    /// Recursive bind of an fd opened by `open_sources`.
    fn bind(&self, src: &OwnedFd, rel: &str, what: &str) -> Result<(), SetupError> {
        self.bind_path(&fd_path(src), rel, what)
    }

    fn bind_path(&self, source: &Path, rel: &str, what: &str) -> Result<(), SetupError> {
        mount(
            Some(source),
            &self.at(rel),
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .ctx(|| format!("bind {what} on /{rel}"))
    }
}

/// The magic link of an fd: it resolves to exactly the object we opened,
/// whatever the path's permissions are for the ids we run as now.
pub(super) fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Build the root and pivot into it. Runs in pid 1, as the mapped root, in
/// the new mount namespace; afterwards the host's tree is gone from view.
///
/// With [`Spec::disk_bytes`] the work tmpfs has that size and holds
/// `/build` and `/out` too (the source is copied in); the host out dir is
/// then returned, for pid 1 to copy `/out` into once the build is over.
pub(super) fn assemble(src: Sources, spec: &Spec) -> Result<Option<OwnedFd>, SetupError> {
    // Nothing we mount may propagate back to the host (or in from it).
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .ctx(|| "make / rprivate".into())?;

    let work = Path::new(STAGE);
    super::work::mount_at(work, spec.disk_bytes)?;
    let root = Root(work.join(ROOT_DIR));
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&root.0)
        .ctx(|| "mkdir the new root".into())?;
    match &src.root {
        RootSource::Host(system) => {
            // A bind of the dir onto itself: pivot_root needs a mount point.
            root.bind_path(&root.0, "", "the new root")?;
            for entry in system {
                match entry {
                    SystemEntry::Dir(name, fd) => {
                        let target = root.mkdir(name, 0o755)?;
                        root.bind(fd, name, &format!("/{name}"))?;
                        make_readonly(&target, true).ctx(|| format!("make /{name} read-only"))?;
                    }
                    SystemEntry::Link(name, dest) => root.symlink(dest, name)?,
                }
            }
        }
        RootSource::Overlay(lower) => {
            for d in ["upper", "ovl-work"] {
                std::fs::DirBuilder::new()
                    .mode(0o755)
                    .create(work.join(d))
                    .ctx(|| format!("mkdir overlay {d}"))?;
            }
            // userxattr: an overlay mounted in a user namespace keeps its
            // whiteouts in user.* xattrs (the work tmpfs has them).
            let opts = format!(
                "lowerdir={},upperdir={},workdir={},userxattr",
                fd_path(lower).display(),
                work.join("upper").display(),
                work.join("ovl-work").display()
            );
            mount(
                Some("kiln-buildroot"),
                &root.0,
                Some("overlay"),
                MsFlags::MS_NODEV,
                Some(opts.as_str()),
            )
            .ctx(|| "mount the buildroot overlay".into())?;
        }
    }

    root.ensure_dir("build", 0o755)?;
    root.ensure_dir("out", 0o755)?;
    root.ensure_dir("tmp", 0o1777)?;
    if spec.disk_bytes.is_some() {
        super::work::copy_tree(&fd_path(&src.build), &work.join("build"))
            .ctx(|| format!("copy the source {} into /build", spec.build_dir.display()))?;
        root.bind_path(&work.join("build"), "build", "the work tmpfs")?;
        root.bind_path(&work.join("out"), "out", "the work tmpfs")?;
    } else {
        root.bind(&src.build, "build", &spec.build_dir.display().to_string())?;
        root.bind(&src.out, "out", &spec.out_dir.display().to_string())?;
    }
    root.bind_path(&work.join("tmp"), "tmp", "the work tmpfs")?;
    if matches!(src.root, RootSource::Host(_)) {
        root.mkdir("var", 0o755)?;
        root.symlink("/tmp", "var/tmp")?;
    }

    // proc must be mounted while the host's /proc is still visible: the
    // kernel refuses a new proc in a user namespace that would reveal more
    // than an existing fully visible one.
    root.ensure_dir("proc", 0o555)?;
    root.mount_fs(
        "proc",
        "proc",
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        "",
    )?;

    populate_dev(&root, &src.dev, &work.join("shm"))?;
    mask_proc(&root)?;
    for (b, fd) in spec.binds.iter().zip(&src.binds) {
        bind_extra(&root, b, fd)?;
    }

    // pivot_root(".", ".") stacks the old root on the new one; the detach
    // unmount then drops it, with all host mounts below it (the work tmpfs
    // lives on in its binds).
    std::env::set_current_dir(&root.0).ctx(|| "chdir to new root".into())?;
    nix::unistd::pivot_root(".", ".").ctx(|| "pivot_root".into())?;
    umount2(".", MntFlags::MNT_DETACH).ctx(|| "detach old root".into())?;
    std::env::set_current_dir("/").ctx(|| "chdir /".into())?;
    if matches!(src.root, RootSource::Host(_)) {
        make_readonly(Path::new("/"), false).ctx(|| "make / read-only".into())?;
    }
    Ok(spec.disk_bytes.map(|_| src.out))
}

/// One of the spec's extra binds: target made if missing, read-only unless
/// asked otherwise.
fn bind_extra(root: &Root, b: &super::Bind, fd: &OwnedFd) -> Result<(), SetupError> {
    let rel = b.path.trim_start_matches('/');
    let is_dir = std::fs::metadata(fd_path(fd))
        .map(|m| m.is_dir())
        .unwrap_or(true);
    if is_dir {
        root.ensure_dir(rel, 0o755)?;
    } else {
        if let Some(parent) = Path::new(rel).parent().and_then(|p| p.to_str())
            && !parent.is_empty()
        {
            root.ensure_dir(parent, 0o755)?;
        }
        if !root.at(rel).exists() {
            root.touch(rel)?;
        }
    }
    root.bind(fd, rel, &b.host.display().to_string())?;
    if !b.writable {
        make_readonly(&root.at(rel), true).ctx(|| format!("make {} read-only", b.path))?;
    }
    Ok(())
}

/// Kernel knobs under /proc become read-only and kernel internals are
/// hidden (/dev/null over files, an empty read-only tmpfs over dirs), as
/// container runtimes do. Entries this kernel lacks are skipped.
const PROC_READ_ONLY: &[&str] = &[
    "proc/sys",
    "proc/sysrq-trigger",
    "proc/irq",
    "proc/bus",
    "proc/fs",
];
const PROC_MASKED_FILES: &[&str] = &[
    "proc/kcore",
    "proc/keys",
    "proc/timer_list",
    "proc/sched_debug",
    "proc/kallsyms",
];
const PROC_MASKED_DIRS: &[&str] = &["proc/acpi", "proc/scsi", "proc/driver"];

fn mask_proc(root: &Root) -> Result<(), SetupError> {
    let bind = MsFlags::MS_BIND | MsFlags::MS_REC;
    for rel in PROC_READ_ONLY {
        let p = root.at(rel);
        if p.exists() {
            mount(Some(&p), &p, None::<&str>, bind, None::<&str>).ctx(|| format!("bind /{rel}"))?;
            make_readonly(&p, true).ctx(|| format!("make /{rel} read-only"))?;
        }
    }
    let null = root.at("dev/null");
    for rel in PROC_MASKED_FILES {
        let p = root.at(rel);
        if p.exists() {
            mount(
                Some(&null),
                &p,
                None::<&str>,
                MsFlags::MS_BIND,
                None::<&str>,
            )
            .ctx(|| format!("mask /{rel}"))?;
        }
    }
    for rel in PROC_MASKED_DIRS {
        let p = root.at(rel);
        if p.exists() {
            mount(
                Some("kiln-masked"),
                &p,
                Some("tmpfs"),
                MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
                Some("size=0,mode=0555"),
            )
            .ctx(|| format!("mask /{rel}"))?;
        }
    }
    Ok(())
}

/// A tmpfs /dev with host nodes bound in, its own devpts, /dev/shm and the
/// usual symlinks; read-only once populated.
fn populate_dev(
    root: &Root,
    nodes: &[(&'static str, OwnedFd)],
    shm: &Path,
) -> Result<(), SetupError> {
    let dev = root.ensure_dir("dev", 0o755)?;
    root.mount_fs(
        "tmpfs",
        "dev",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "mode=0755",
    )?;
    for (name, fd) in nodes {
        let rel = format!("dev/{name}");
        root.touch(&rel)?;
        root.bind(fd, &rel, &format!("host /dev/{name}"))?;
    }
    root.mkdir("dev/pts", 0o755)?;
    // No gid= option: gid 5 (tty) need not be mapped (rootless maps only 0).
    root.mount_fs(
        "devpts",
        "dev/pts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        "newinstance,ptmxmode=0666,mode=0620",
    )?;
    root.symlink("pts/ptmx", "dev/ptmx")?;
    root.mkdir("dev/shm", 0o1777)?;
    root.bind_path(shm, "dev/shm", "the work tmpfs")?;
    for (link, target) in [
        ("dev/fd", "/proc/self/fd"),
        ("dev/stdin", "/proc/self/fd/0"),
        ("dev/stdout", "/proc/self/fd/1"),
        ("dev/stderr", "/proc/self/fd/2"),
    ] {
        root.symlink(target, link)?;
    }
    make_readonly(&dev, false).ctx(|| "make /dev read-only".into())?;
    Ok(())
}
