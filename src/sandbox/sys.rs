//! Thin wrappers for the few system calls nix does not cover (mount_setattr,
//! close_range, bringing up `lo`), plus the typed setup error of the init.
//!
//! Every `unsafe` block of the sandbox that is not a fork/clone lives here.

use std::ffi::CString;
use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
use std::os::unix::ffi::OsStrExt as _;
use std::path::Path;

use nix::errno::Errno;

/// A failed setup step inside the init: what was being done, and why it failed.
/// Its Display is the one-line reason in `Outcome::Infra` and the log.
#[derive(Debug, thiserror::Error)]
pub(super) enum SetupError {
    #[error("{what}: {errno}")]
    Sys { what: String, errno: Errno },
    #[error("{0}")]
    Other(String),
}

/// Attach a description to a nix result.
pub(super) trait Context<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, SetupError>;
}

impl<T> Context<T> for nix::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, SetupError> {
        self.map_err(|errno| SetupError::Sys {
            what: what(),
            errno,
        })
    }
}

impl<T> Context<T> for std::io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T, SetupError> {
        self.map_err(|e| match e.raw_os_error() {
            Some(n) => SetupError::Sys {
                what: what(),
                errno: Errno::from_raw(n),
            },
            None => SetupError::Other(format!("{}: {e}", what())),
        })
    }
}

fn cpath(path: &Path) -> nix::Result<CString> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Errno::EINVAL)
}

/// `struct mount_attr` of <linux/mount.h>.
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}
const MOUNT_ATTR_RDONLY: u64 = 0x1;

/// Make the mount at `path` read-only, with `recursive` all mounts below it too.
///
/// mount_setattr only adds MOUNT_ATTR_RDONLY and leaves every other flag alone,
/// so it works on binds whose nosuid/nodev/noexec are locked in a user
/// namespace (a plain MS_REMOUNT would have to repeat them or get EPERM).
pub(super) fn make_readonly(path: &Path, recursive: bool) -> nix::Result<()> {
    let c = cpath(path)?;
    let attr = MountAttr {
        attr_set: MOUNT_ATTR_RDONLY,
        attr_clr: 0,
        propagation: 0,
        userns_fd: 0,
    };
    let flags = if recursive { libc::AT_RECURSIVE } else { 0 };
    // SAFETY: `c` is NUL-terminated and `attr` is a mount_attr of the size we
    // pass; both outlive the call, and the kernel only reads them.
    let res = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            c.as_ptr(),
            flags,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        )
    };
    Errno::result(res).map(drop)
}

/// Close every fd from `first` up (`cloexec`: only mark them close-on-exec,
/// so they stay usable until a successful exec).
pub(super) fn close_from(first: u32, cloexec: bool) -> nix::Result<()> {
    let flags = if cloexec {
        libc::CLOSE_RANGE_CLOEXEC
    } else {
        0
    };
    // SAFETY: close_range takes plain integers. Callers own no Rust object
    // wrapping these fds that would be used (or double-closed) afterwards:
    // the init calls it first thing, and the build child right before exec.
    let res = unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, flags) };
    Errno::result(res).map(drop)
}

/// Bring the loopback interface of the current network namespace up.
pub(super) fn loopback_up() -> nix::Result<()> {
    // SAFETY: plain socket(2); the returned fd is owned by the OwnedFd below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    let raw = Errno::result(raw)?;
    // SAFETY: `raw` is a fresh fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS reads ifr_name and writes ifr_flags of the ifreq we own.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) })?;
    // SAFETY: the kernel just filled the flags member of the union.
    unsafe { req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    // SAFETY: SIOCSIFFLAGS only reads the ifreq we own.
    Errno::result(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) })?;
    Ok(())
}

/// Leave the process now: no atexit handlers, no unwinding. Used by the
/// cloned and forked children, which share copied state with their parent.
pub(super) fn exit_now(code: i32) -> ! {
    // SAFETY: _exit has no preconditions; it never returns.
    unsafe { libc::_exit(code) }
}
