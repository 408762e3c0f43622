//! Build sandboxes: namespaces, a private root filesystem, and the init
//! process that runs one task.
//!
//! This module owns everything between "the hub decided to run this task" and
//! "the task's processes are all gone": the [`Spec`] handed to the sandbox,
//! the hidden `kiln __sandbox-init` role ([`init_main`]) that builds the
//! sandbox in a fresh single-threaded process, and [`run`], the hub-side
//! async driver.
//!
//! Process tree of one task:
//!
//! ```text
//! hub (tokio, multi-threaded; never forks to keep running Rust)
//!  └─ kiln __sandbox-init result.json (spec on stdin)   "outer": host namespaces
//!      └─ pid 1 of new user/mnt/pid/net/uts/ipc namespaces (+ cgroup ns once placed)  "kiln-init"
//!          └─ the build (argv of the spec), session leader, no_new_privs
//! ```
//!
//! What must stay true:
//! - The build never holds host privilege. When the hub runs as root, the
//!   build's root (uid/gid 0 inside) is host id `SUBID_BASE + slot *
//!   SUBID_COUNT` (see [`SUBID_BASE`]), the start of a range of
//!   [`SUBID_COUNT`] ids reserved for kiln (not taken from /etc/subuid).
//!   Rootless hubs map inside 0 to their own uid/gid only. See
//!   [`IdMap::for_slot`].
//! - No sandbox process outlives its task or the hub: the outer dies with the
//!   hub (PDEATHSIG), pid 1 dies with the outer (PDEATHSIG), and when pid 1
//!   dies the kernel kills the whole pid namespace. Pid 1 itself kills
//!   everything left once the build process exits.
//! - The build sees only: the host's system dirs read-only, `/build` and
//!   `/out` read-write, fresh `/tmp`, `/proc`, minimal `/dev`. Nothing else of
//!   the host (no /home, /root, /var, /run, the hub's data).
//! - The environment of the build is exactly [`Spec::env`]; fds other than
//!   0, 1, 2 are closed; stdout and stderr are the one log pipe.
//! - Setup failures inside the sandbox become [`Outcome::Infra`] and one
//!   `kiln-sandbox: ...` line in the build log; hub-side failures are
//!   [`SandboxError`].
//!
//! Limits (cgroups in [`cgroup`], the disk's tmpfs in `work`) and the
//! hardening (`harden`) are described in docs/sandbox.md. Seam for the
//! Debian buildroots issue: a `RootSpec` variant for overlay roots.

pub mod cgroup;
mod harden;
mod init;
mod rootfs;
mod sys;
mod work;

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use harden::{DENIED_SYSCALLS, KEEP_CAPS};
pub use init::init_main;

/// The hidden `argv[1]` that selects the init role: `kiln __sandbox-init <result.json>`,
/// with the [`Spec`] as JSON on stdin.
pub const INIT_ROLE: &str = "__sandbox-init";

/// First host uid/gid of kiln's subordinate id range (used when the hub runs as root).
/// Slot `n` owns host ids `SUBID_BASE + n * SUBID_COUNT .. + SUBID_COUNT`.
/// Later configurable; it must not overlap real users or other tools' ranges
/// (note: systemd-nspawn's `--private-users=pick` also draws from 0x80000–0x6FFFFFFF).
pub const SUBID_BASE: u32 = 1_000_000_000;
/// Number of ids mapped into one sandbox when the hub runs as root.
pub const SUBID_COUNT: u32 = 65_536;

/// File name `run` uses inside the task's work dir for the init's result.
pub const RESULT_FILE: &str = "result.json";

/// Set by `run` on the init process: the hub's pid, so the init can tell
/// whether the hub died before PDEATHSIG was armed.
pub(crate) const HUB_PID_ENV: &str = "KILN_SANDBOX_HUB_PID";

/// Everything the init needs to build and run one sandbox. [`run`] hands it
/// to the init as JSON on a pipe (its stdin): no file to write per task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spec {
    /// What `/` is made of.
    pub root: RootSpec,
    /// Host dir mounted read-write at `/build` (the checked-out source).
    pub build_dir: PathBuf,
    /// Host dir mounted read-write at `/out`; the build's `$KILN_OUT`.
    pub out_dir: PathBuf,
    /// The build command; `argv[0]` is a path inside the sandbox (no `$PATH` search).
    pub argv: Vec<String>,
    /// The complete environment of the build; nothing else is inherited.
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox, usually `/build`.
    pub cwd: String,
    /// Hostname inside the sandbox, usually `kiln`.
    pub hostname: String,
    /// How the build's ids map to the host.
    pub ids: IdMap,
    /// cgroup limits; with none set, no cgroup is made (rootless hubs
    /// without a delegated cgroup still build).
    #[serde(default)]
    pub limits: cgroup::Limits,
    /// Name of the task's cgroup (one path component, unique per run).
    #[serde(default)]
    pub cgroup_name: String,
    /// Size of the writable space in bytes. Set: `/build`, `/out`, `/tmp`
    /// and `/dev/shm` are parts of one tmpfs of this size; the source is
    /// copied in and, after a successful build, `/out` is copied back to
    /// `out_dir`. Unset: `build_dir` and `out_dir` are bound directly.
    #[serde(default)]
    pub disk_bytes: Option<u64>,
    #[serde(default)]
    pub network: Network,
    /// A command run before `argv`, in the same root (e.g. installing build
    /// dependencies); `argv` runs only if it exits 0. Every process it left
    /// is killed first.
    #[serde(default)]
    pub setup: Option<Vec<String>>,
    /// Extra host paths, bound after the root is assembled.
    #[serde(default)]
    pub binds: Vec<Bind>,
    #[serde(default)]
    pub hardening: Hardening,
}

impl Spec {
    /// A conventional environment for builds: a fixed `PATH`, `HOME`, locale,
    /// `TMPDIR` and `KILN_OUT=/out`. Callers add to it; nothing of the hub's
    /// environment is included.
    pub fn base_env() -> Vec<(String, String)> {
        [
            (
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            ),
            ("HOME", "/build"),
            ("LANG", "C.UTF-8"),
            ("TMPDIR", "/tmp"),
            ("KILN_OUT", "/out"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }
}

/// The root filesystem of a sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RootSpec {
    /// The host's system dirs (`/usr`, `/etc`, `/lib*`, ...) bound read-only.
    Host,
    /// A copy-on-write view of a stored root filesystem: the host dir
    /// `lower` is never written; the task writes into a fresh upper layer on
    /// its own tmpfs, gone when the task ends.
    Overlay { lower: PathBuf },
}

/// Which network the sandbox's processes get.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Network {
    /// A network namespace of its own with only `lo`.
    #[default]
    Loopback,
    /// The host's network for [`Spec::setup`]; `argv` then runs in a fresh
    /// namespace with only `lo` (no way back).
    SetupOnly,
    /// The host's network throughout (bootstrapping a buildroot).
    Host,
}

/// How much the build process is held back (src/sandbox/harden.rs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Hardening {
    /// Every build: the kept capabilities, the full seccomp deny list.
    #[default]
    Build,
    /// An admin's buildroot bootstrap: also CAP_SYS_ADMIN in its user
    /// namespace and the mount family of system calls.
    Bootstrap,
}

/// A host path made visible inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    /// File or directory on the host.
    pub host: PathBuf,
    /// Absolute path inside the sandbox (made if missing).
    pub path: String,
    pub writable: bool,
}

/// Inside ids `0..count` map to host ids `host_uid..host_uid+count` (and the same for gids).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub host_uid: u32,
    pub host_gid: u32,
    pub count: u32,
}

impl IdMap {
    /// The id range of local build slot `slot`.
    ///
    /// As root: host ids `SUBID_BASE + slot * SUBID_COUNT`, count `SUBID_COUNT`
    /// (uids and gids alike). As an ordinary user: the current euid/egid,
    /// count 1 (the kernel allows an unprivileged process to map only itself).
    ///
    /// # Panics
    /// If the range would pass the top of the 32-bit id space (slot > 49_515).
    pub fn for_slot(slot: u32) -> IdMap {
        let euid = nix::unistd::geteuid();
        if !euid.is_root() {
            return IdMap {
                host_uid: euid.as_raw(),
                host_gid: nix::unistd::getegid().as_raw(),
                count: 1,
            };
        }
        let base = slot
            .checked_mul(SUBID_COUNT)
            .and_then(|off| off.checked_add(SUBID_BASE))
            // u32::MAX is the invalid id (-1); the range must end below it.
            .filter(|base| {
                base.checked_add(SUBID_COUNT)
                    .is_some_and(|end| end < u32::MAX)
            })
            .expect("sandbox slot out of the subordinate id space");
        IdMap {
            host_uid: base,
            host_gid: base,
            count: SUBID_COUNT,
        }
    }
}

/// How a task ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// The build process exited with this code.
    Exited(i32),
    /// The build process was killed by this signal.
    Signaled(i32),
    /// The hub cancelled the task.
    Cancelled,
    /// The sandbox could not be set up or supervised; the reason.
    Infra(String),
    /// The kernel's OOM killer killed a process of the build (memory limit).
    OutOfMemory,
    /// The build tried to run more processes than its pid limit allows.
    PidLimit,
    /// The build failed with its writable space ([`Spec::disk_bytes`]) full.
    DiskLimit,
}

impl Outcome {
    /// True for a build that exited with code 0.
    pub fn success(&self) -> bool {
        *self == Outcome::Exited(0)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Exited(code) => write!(f, "exit code {code}"),
            Outcome::Signaled(sig) => match nix::sys::signal::Signal::try_from(*sig) {
                Ok(s) => write!(f, "killed by signal {sig} ({})", s.as_str()),
                Err(_) => write!(f, "killed by signal {sig}"),
            },
            Outcome::Cancelled => f.write_str("cancelled"),
            Outcome::Infra(why) => write!(f, "sandbox failure: {why}"),
            Outcome::OutOfMemory => f.write_str("out of memory"),
            Outcome::PidLimit => f.write_str("pid limit reached"),
            Outcome::DiskLimit => f.write_str("disk limit reached"),
        }
    }
}

/// Hub-side failures of [`run`]: the sandbox could not be started or its
/// result could not be read.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("preparing sandbox: {what}: {source}")]
    Prepare {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("spawning sandbox init {}: {source}", exe.display())]
    Spawn {
        exe: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for sandbox init: {0}")]
    Wait(#[source] std::io::Error),
    #[error("sandbox init left no result at {} (init {status})", path.display())]
    ResultMissing {
        path: PathBuf,
        status: std::process::ExitStatus,
    },
    #[error("sandbox result {} is garbled: {source}", path.display())]
    ResultGarbled {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Run one task in a fresh sandbox and return how it ended.
///
/// Creates `work_dir` if missing, spawns `exe __sandbox-init` with the spec
/// as JSON on its stdin and stdout+stderr both `log`, waits, and reads
/// `result.json` from `work_dir`. (The init hands `build_dir`/`out_dir` to
/// the mapped root.)
///
/// On `cancel` the init is SIGKILLed, which takes the whole sandbox down
/// (PDEATHSIG of pid 1, then the pid namespace); `Cancelled` is returned once
/// the init is reaped. The last processes of the namespace finish dying
/// asynchronously within milliseconds; a reader of `log` sees EOF when they
/// are gone. Dropping the returned future also kills the init.
///
/// The init's PDEATHSIG fires when the *thread* that spawned it exits, so call
/// this from an async task (tokio worker threads live as long as the runtime),
/// not from a `spawn_blocking` closure.
pub async fn run(
    exe: &Path,
    spec: &Spec,
    work_dir: &Path,
    log: OwnedFd,
    cancel: CancellationToken,
) -> Result<Outcome, SandboxError> {
    let result_path = work_dir.join(RESULT_FILE);

    // Two cheap metadata calls: not worth a blocking-pool hop on the spawn path.
    prepare(work_dir, &result_path)?;
    let spec_in = spec_pipe(spec)?;
    let log_out = log.try_clone().map_err(|source| SandboxError::Prepare {
        what: "duplicating the log fd".into(),
        source,
    })?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg(INIT_ROLE)
        .arg(&result_path)
        // The init needs no environment; the build gets exactly spec.env.
        .env_clear()
        .env(HUB_PID_ENV, std::process::id().to_string())
        .stdin(Stdio::from(spec_in))
        .stdout(Stdio::from(log_out))
        .stderr(Stdio::from(log))
        .kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| SandboxError::Spawn {
        exe: exe.to_owned(),
        source,
    })?;
    // Close our copies of the log fd now, so the reader sees EOF when the sandbox ends.
    drop(cmd);

    let status = tokio::select! {
        biased;
        status = child.wait() => status.map_err(SandboxError::Wait)?,
        () = cancel.cancelled() => {
            // SIGKILL of the init: PDEATHSIG kills pid 1, which tears down the pid namespace.
            let _ = child.start_kill();
            child.wait().await.map_err(SandboxError::Wait)?;
            return Ok(Outcome::Cancelled);
        }
    };

    // A few bytes in a file just written: not worth a blocking-pool hop.
    let bytes = match std::fs::read(&result_path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SandboxError::ResultMissing {
                path: result_path,
                status,
            });
        }
        Err(source) => {
            return Err(SandboxError::Prepare {
                what: format!("reading {}", result_path.display()),
                source,
            });
        }
    };
    serde_json::from_slice(&bytes).map_err(|source| SandboxError::ResultGarbled {
        path: result_path,
        source,
    })
}

/// The spec as JSON in a pipe, written and closed: the read end becomes
/// the init's stdin. The pipe is grown to hold it all (the kernel allows up
/// to /proc/sys/fs/pipe-max-size, 1 MiB by default), so nothing blocks.
fn spec_pipe(spec: &Spec) -> Result<OwnedFd, SandboxError> {
    use std::io::Write as _;
    let io = |what: &str| {
        let what = what.to_string();
        move |source| SandboxError::Prepare { what, source }
    };
    let json = serde_json::to_vec(spec).expect("Spec serialises");
    let (r, mut w) = std::io::pipe().map_err(io("spec pipe"))?;
    if json.len() > 60 << 10 {
        nix::fcntl::fcntl(
            &w,
            nix::fcntl::FcntlArg::F_SETPIPE_SZ(json.len() as i32 + 4096),
        )
        .map_err(|e| io("growing the spec pipe")(e.into()))?;
    }
    w.write_all(&json).map_err(io("writing the spec pipe"))?;
    Ok(r.into())
}

/// Work dir, and no stale result (never read one from an earlier attempt).
fn prepare(work_dir: &Path, result_path: &Path) -> Result<(), SandboxError> {
    let io = |what: String| move |source| SandboxError::Prepare { what, source };
    std::fs::create_dir_all(work_dir).map_err(io(format!("creating {}", work_dir.display())))?;
    match std::fs::remove_file(result_path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(format!("removing stale {}", result_path.display()))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_reads_like_a_reason() {
        assert_eq!(Outcome::Exited(2).to_string(), "exit code 2");
        assert_eq!(
            Outcome::Signaled(9).to_string(),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(Outcome::Signaled(99).to_string(), "killed by signal 99");
        assert_eq!(Outcome::Cancelled.to_string(), "cancelled");
        assert_eq!(
            Outcome::Infra("mount /proc: EPERM".into()).to_string(),
            "sandbox failure: mount /proc: EPERM"
        );
        assert!(Outcome::Exited(0).success() && !Outcome::Exited(1).success());
    }

    #[test]
    fn outcome_and_spec_round_trip_through_json() {
        for o in [
            Outcome::Exited(3),
            Outcome::Signaled(9),
            Outcome::Cancelled,
            Outcome::Infra("x".into()),
        ] {
            assert_eq!(
                serde_json::from_str::<Outcome>(&serde_json::to_string(&o).unwrap()).unwrap(),
                o
            );
        }
        let spec = Spec {
            root: RootSpec::Host,
            build_dir: "/b".into(),
            out_dir: "/o".into(),
            argv: vec!["/bin/true".into()],
            env: Spec::base_env(),
            cwd: "/build".into(),
            hostname: "kiln".into(),
            limits: Default::default(),
            cgroup_name: String::new(),
            disk_bytes: Some(1 << 30),
            network: Network::SetupOnly,
            setup: Some(vec!["/bin/true".into()]),
            binds: vec![],
            hardening: Default::default(),
            ids: IdMap {
                host_uid: SUBID_BASE,
                host_gid: SUBID_BASE,
                count: SUBID_COUNT,
            },
        };
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["root"], serde_json::json!({"kind": "host"}));
        assert_eq!(serde_json::from_value::<Spec>(json).unwrap(), spec);
    }

    #[test]
    fn slots_get_disjoint_ranges() {
        let (a, b) = (IdMap::for_slot(0), IdMap::for_slot(1));
        if nix::unistd::geteuid().is_root() {
            assert_eq!((a.host_uid, a.count), (SUBID_BASE, SUBID_COUNT));
            assert_eq!(b.host_uid, SUBID_BASE + SUBID_COUNT);
            let _ = IdMap::for_slot(49_515); // the last slot that fits
        } else {
            assert_eq!(a, b);
            assert_eq!(a.count, 1);
        }
    }
}
