//! The last steps before exec in the build process: rlimits, capabilities
//! and the seccomp filter. The build is root only inside its own user
//! namespace; this takes away what a build root never needs there.
//!
//! What must stay true: `apply` runs after every other set-up step (the
//! filter forbids mount and friends), `no_new_privs` is set before the filter,
//! and the lists below match docs/sandbox.md.

use std::collections::BTreeMap;

use caps::{CapSet, Capability};
use nix::sys::resource::{Resource, setrlimit};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::Hardening;
use super::sys::{Context, SetupError};

/// Capabilities a build root keeps (within its user namespace): enough for
/// package tools that chown files and drop to other users (dpkg, apt,
/// rpmbuild), the set container engines give by default. Everything else —
/// CAP_SYS_ADMIN (mount, namespaces), CAP_NET_ADMIN, CAP_SYS_PTRACE,
/// CAP_SYS_MODULE, … — leaves the bounding set for good.
pub const KEEP_CAPS: &[Capability] = &[
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_KILL,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_SETFCAP,
    Capability::CAP_NET_BIND_SERVICE,
    Capability::CAP_SYS_CHROOT,
    Capability::CAP_AUDIT_WRITE,
];

/// System calls a build never needs; they fail with EPERM.
pub const DENIED_SYSCALLS: &[(&str, i64)] = &[
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("mount", libc::SYS_mount),
    ("umount2", libc::SYS_umount2),
    ("pivot_root", libc::SYS_pivot_root),
    ("fsopen", libc::SYS_fsopen),
    ("fsconfig", libc::SYS_fsconfig),
    ("fsmount", libc::SYS_fsmount),
    ("fspick", libc::SYS_fspick),
    ("move_mount", libc::SYS_move_mount),
    ("open_tree", libc::SYS_open_tree),
    ("mount_setattr", libc::SYS_mount_setattr),
    ("setns", libc::SYS_setns),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("reboot", libc::SYS_reboot),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("name_to_handle_at", libc::SYS_name_to_handle_at),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("syslog", libc::SYS_syslog),
    ("quotactl", libc::SYS_quotactl),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("uselib", libc::SYS_uselib),
    ("vhangup", libc::SYS_vhangup),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("io_uring_enter", libc::SYS_io_uring_enter),
    ("io_uring_register", libc::SYS_io_uring_register),
];

fn seccomp_err(e: impl std::fmt::Display) -> SetupError {
    SetupError::Other(format!("seccomp: {e}"))
}

fn arch() -> Result<TargetArch, SetupError> {
    TargetArch::try_from(std::env::consts::ARCH).map_err(seccomp_err)
}

/// Filter 1: the denied calls, and clone/unshare asking for a new user
/// namespace (which would hand the build a fresh set of capabilities), fail
/// with EPERM.
fn deny_filter(profile: Hardening) -> Result<BpfProgram, SetupError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = DENIED_SYSCALLS
        .iter()
        .filter(|(name, _)| profile == Hardening::Build || !BOOTSTRAP_ALLOWS.contains(name))
        .map(|(_, nr)| (*nr, vec![]))
        .collect();
    let new_user = |arg: u8| -> Result<Vec<SeccompRule>, SetupError> {
        let flag = libc::CLONE_NEWUSER as u64;
        let cond = SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(flag),
            flag,
        )
        .map_err(seccomp_err)?;
        Ok(vec![SeccompRule::new(vec![cond]).map_err(seccomp_err)?])
    };
    rules.insert(libc::SYS_clone, new_user(0)?);
    rules.insert(libc::SYS_unshare, new_user(0)?);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch()?,
    )
    .map_err(seccomp_err)?;
    f.try_into().map_err(seccomp_err)
}

/// Filter 2: clone3 passes its flags in memory a filter cannot read, so it
/// answers ENOSYS and libc falls back to clone, which filter 1 checks.
fn clone3_filter() -> Result<BpfProgram, SetupError> {
    let rules = BTreeMap::from([(libc::SYS_clone3, vec![])]);
    let f = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch()?,
    )
    .map_err(seccomp_err)?;
    f.try_into().map_err(seccomp_err)
}

fn caps_err(what: &'static str) -> impl FnOnce(caps::errors::CapsError) -> SetupError {
    move |e| SetupError::Other(format!("{what}: {e}"))
}

/// The mount family, allowed to a bootstrap (mmdebstrap's root mode mounts
/// /proc and binds /dev inside the root it makes).
const BOOTSTRAP_ALLOWS: &[&str] = &[
    "mount",
    "umount2",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "move_mount",
    "open_tree",
    "mount_setattr",
];

/// Applies rlimits, the capability sets and the seccomp filters to the
/// calling (build) process. Last step before exec. A bootstrap keeps
/// CAP_SYS_ADMIN (within its user namespace) and the mount family; new user
/// namespaces stay refused for it too.
pub(super) fn apply(profile: Hardening) -> Result<(), SetupError> {
    // No core dumps: they would land in /build and can hold secrets.
    setrlimit(Resource::RLIMIT_CORE, 0, 0).ctx(|| "setrlimit RLIMIT_CORE".into())?;

    let mut keep: caps::CapsHashSet = KEEP_CAPS.iter().copied().collect();
    if profile == Hardening::Bootstrap {
        keep.insert(Capability::CAP_SYS_ADMIN);
    }
    for cap in caps::all() {
        if !keep.contains(&cap) {
            caps::drop(None, CapSet::Bounding, cap).map_err(caps_err("drop bounding"))?;
        }
    }
    caps::clear(None, CapSet::Ambient).map_err(caps_err("clear ambient"))?;
    caps::set(None, CapSet::Inheritable, &caps::CapsHashSet::new())
        .map_err(caps_err("set inheritable"))?;
    caps::set(None, CapSet::Effective, &keep).map_err(caps_err("set effective"))?;
    caps::set(None, CapSet::Permitted, &keep).map_err(caps_err("set permitted"))?;

    nix::sys::prctl::set_no_new_privs().ctx(|| "prctl PR_SET_NO_NEW_PRIVS".into())?;
    let deny = deny_filter(profile)?;
    let clone3 = clone3_filter()?;
    seccompiler::apply_filter(&deny).map_err(seccomp_err)?;
    seccompiler::apply_filter(&clone3).map_err(seccomp_err)?;
    Ok(())
}
