//! The `kiln __sandbox-init <result.json>` role (the spec comes on stdin): a fresh,
//! single-threaded process (spawned by [`super::run`]) that builds one
//! sandbox, supervises it and writes its [`Outcome`].
//!
//! Three stages, three processes:
//! - **outer** (host namespaces): dies with the hub, clones pid 1 into new
//!   namespaces, writes its uid/gid maps (a process inside a new user
//!   namespace cannot map a range for itself), releases it through a pipe,
//!   waits for it and writes `result.json`.
//! - **pid 1** ("kiln-init", new namespaces): dies with the outer, takes the
//!   mapped root identity, sets hostname and `lo`, assembles the root
//!   ([`super::rootfs`]), forks the build, reaps every process, and once the
//!   build exits kills all that is left and reports the build's status.
//! - **build**: own session, umask 022, cwd, no_new_privs, fds ≥ 3 closed,
//!   exactly the spec's environment; execs argv.
//!
//! What must stay true:
//! - No thread is ever started in this role (we clone and fork freely).
//! - pid 1 reports exactly one [`Outcome`] line on the report pipe; the
//!   build process may report an `Infra` line first if it fails before exec,
//!   and the first line wins.
//! - pid 1 stays non-dumpable, and its mm belongs to the host user namespace,
//!   so the build cannot ptrace it and forge the report.
//!
//! Where things plug in: `outer::before_release` (cgroup placement while
//! pid 1 is still parked), `build::harden` (capabilities, seccomp,
//! rlimits), `rootfs::open_sources` (overlay buildroots, next).

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::{AsRawFd as _, OwnedFd, RawFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::signal::{Signal, kill};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{Pid, pipe2};

use super::sys::{self, Context as _, SetupError};
use super::{HUB_PID_ENV, IdMap, Network, Outcome, Spec};

/// Exit code of pid 1 / the build child when setup fails inside the sandbox.
const SETUP_FAILED: i32 = 125;
/// Exit code of the build child when exec fails (shell convention).
const EXEC_FAILED: i32 = 127;
/// Stack of the cloned pid 1 (only touched pages are ever allocated).
const PID1_STACK: usize = 8 << 20;

/// Entry point of the init role; returns the process exit code:
/// 0 when `result.json` was written (whatever the build did), 1 when the
/// outer itself failed (an `Infra` result is still written), 2 when no
/// result could be written.
///
/// Must run before any thread is started in this process.
pub fn init_main(result_path: &Path) -> i32 {
    // Drop anything the hub leaked to us; nothing of ours is open yet.
    let _ = sys::close_from(3, false);

    let (outcome, code) = match outer::run() {
        Ok(outcome) => (outcome, 0),
        Err(e) => {
            report_line(&e);
            (Outcome::Infra(e.to_string()), 1)
        }
    };
    match write_result(result_path, &outcome) {
        Ok(()) => code,
        Err(e) => {
            report_line(&e);
            2
        }
    }
}

/// One `kiln-sandbox: ...` line into the build log (our stderr).
fn report_line(e: &SetupError) {
    eprintln!("kiln-sandbox: {e}");
}

/// Write `result.json` atomically (temp file + rename in the same dir).
fn write_result(path: &Path, outcome: &Outcome) -> Result<(), SetupError> {
    let tmp = path.with_extension("json.tmp");
    let json = serde_json::to_vec(outcome).expect("Outcome serialises");
    std::fs::write(&tmp, json).ctx(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).ctx(|| format!("rename {} to {}", tmp.display(), path.display()))
}

/// Kill (SIGKILL) and reap a child unless disarmed: no pid 1 is left parked
/// or running when the outer bails out.
struct KillOnDrop(Option<Pid>);

impl KillOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
        }
    }
}

mod outer {
    use super::*;

    pub(super) fn run() -> Result<Outcome, SetupError> {
        die_with_hub()?;
        let spec = load_spec()?;
        let rootless = !nix::unistd::geteuid().is_root();
        // Root inside must own the dirs it writes; a rootless outer cannot
        // chown, and its dirs already belong to the one mapped uid.
        if !rootless {
            for dir in [&spec.build_dir, &spec.out_dir] {
                chown_tree(dir, spec.ids.host_uid, spec.ids.host_gid)
                    .ctx(|| format!("chown -R {} {}", spec.ids.host_uid, dir.display()))?;
            }
        }

        let (release_r, release_w) = pipe2(OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
        let (report_r, report_w) = pipe2(OFlag::O_CLOEXEC).ctx(|| "pipe".into())?;
        let child = clone_pid1(
            &spec,
            rootless,
            release_r,
            report_w,
            [release_w.as_raw_fd(), report_r.as_raw_fd()],
        )?;
        let mut guard = KillOnDrop(Some(child));

        write_id_maps(child, &spec.ids, rootless)?;
        let cgroup = before_release(child, &spec)?;
        nix::unistd::write(&release_w, b"r").ctx(|| "release sandbox pid 1".into())?;
        let outcome = wait_pid1(child, &mut guard, release_w, report_r)?;
        Ok(match cgroup {
            Some(cg) => with_limits(outcome, cg),
            None => outcome,
        })
    }

    /// A limit the build ran into is the reason it ended, whatever its exit
    /// code: a killed or refused child makes its results unreliable.
    fn with_limits(outcome: Outcome, cg: super::super::cgroup::TaskCgroup) -> Outcome {
        let stats = cg.stats();
        if let Err(e) = cg.remove() {
            report_line(&SetupError::Other(format!(
                "removing the task's cgroup: {e}"
            )));
        }
        match (stats, &outcome) {
            (_, Outcome::Cancelled | Outcome::Infra(_)) => outcome,
            (Ok(s), _) if s.oom_killed => Outcome::OutOfMemory,
            (Ok(s), _) if s.pids_limit_hit => Outcome::PidLimit,
            (Err(e), _) => Outcome::Infra(format!("reading the task's cgroup: {e}")),
            _ => outcome,
        }
    }

    fn wait_pid1(
        child: Pid,
        guard: &mut KillOnDrop,
        release_w: OwnedFd,
        report_r: OwnedFd,
    ) -> Result<Outcome, SetupError> {
        let status = loop {
            match waitpid(child, None) {
                Err(nix::errno::Errno::EINTR) => continue,
                other => break other.ctx(|| "wait for sandbox pid 1".into())?,
            }
        };
        guard.disarm();
        // release_w stays open until here: pid 1 reads it to tell whether we are alive.
        drop(release_w);

        // All writers are gone (pid 1 reaped, and with it its namespace).
        let mut report = Vec::new();
        File::from(report_r)
            .read_to_end(&mut report)
            .ctx(|| "read sandbox report".into())?;
        let first = report.split(|&b| b == b'\n').next().unwrap_or_default();
        if let Ok(outcome) = serde_json::from_slice::<Outcome>(first) {
            return Ok(outcome);
        }
        let why = match status {
            WaitStatus::Exited(_, code) => {
                format!("sandbox pid 1 exited with code {code} without a report")
            }
            WaitStatus::Signaled(_, sig, _) => format!("sandbox pid 1 killed by {sig}"),
            other => format!("sandbox pid 1 ended oddly: {other:?}"),
        };
        let e = SetupError::Other(why);
        report_line(&e);
        Ok(Outcome::Infra(e.to_string()))
    }

    /// Arm PDEATHSIG, then make sure the hub did not die before it was armed.
    fn die_with_hub() -> Result<(), SetupError> {
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).ctx(|| "prctl PR_SET_PDEATHSIG".into())?;
        let hub = std::env::var(HUB_PID_ENV)
            .ok()
            .and_then(|v| v.parse::<i32>().ok());
        if let Some(hub) = hub
            && nix::unistd::getppid() != Pid::from_raw(hub)
        {
            return Err(SetupError::Other(format!(
                "hub (pid {hub}) exited before the sandbox started"
            )));
        }
        Ok(())
    }

    /// Recursive lchown that never follows symlinks.
    fn chown_tree(path: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        let meta = std::fs::symlink_metadata(path)?;
        if meta.uid() != uid || meta.gid() != gid {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        }
        if meta.is_dir() {
            for entry in std::fs::read_dir(path)? {
                chown_tree(&entry?.path(), uid, gid)?;
            }
        }
        Ok(())
    }

    /// The spec is JSON on stdin (a pipe the hub filled and closed); stdin
    /// then becomes /dev/null, which the build inherits.
    fn load_spec() -> Result<Spec, SetupError> {
        let mut bytes = Vec::new();
        std::io::stdin()
            .lock()
            .read_to_end(&mut bytes)
            .ctx(|| "read the spec from stdin".into())?;
        let null = File::open("/dev/null").ctx(|| "open /dev/null".into())?;
        nix::unistd::dup2_stdin(&null).ctx(|| "dup2 /dev/null to stdin".into())?;
        serde_json::from_slice(&bytes)
            .map_err(|e| SetupError::Other(format!("parse the spec on stdin: {e}")))
    }

    fn clone_pid1(
        spec: &Spec,
        rootless: bool,
        release_r: OwnedFd,
        report_w: OwnedFd,
        parent_ends: [RawFd; 2],
    ) -> Result<Pid, SetupError> {
        let mut flags = CloneFlags::CLONE_NEWUSER
            | CloneFlags::CLONE_NEWNS
            | CloneFlags::CLONE_NEWPID
            | CloneFlags::CLONE_NEWUTS
            | CloneFlags::CLONE_NEWIPC;
        // With the host's network for some step, pid 1 stays in the host's
        // network namespace and the offline steps leave it (build::prepare).
        if spec.network == Network::Loopback {
            flags |= CloneFlags::CLONE_NEWNET;
        }
        // No CLONE_NEWCGROUP here: pid 1 unshares it once the outer has
        // placed it in the task's cgroup, so that cgroup is its root.
        let mut stack = vec![0u8; PID1_STACK];
        let mut ends = Some((release_r, report_w));
        let cb = Box::new(|| -> isize {
            let (release, report) = ends.take().expect("clone callback runs once");
            super::pid1::main(spec, rootless, release, report, parent_ends)
        });
        // SAFETY: this process is single-threaded (the init role starts no
        // thread), so the child's copy of the address space is consistent;
        // the callback never returns (pid1::main diverges) and `stack` lives
        // in the child's copy for as long as the child runs.
        let pid = unsafe { nix::sched::clone(cb, &mut stack, flags, Some(libc::SIGCHLD)) };
        // Our copies of the child's ends are closed here, so EOF means the child is gone.
        drop(ends);
        pid.ctx(|| "clone into new namespaces".into())
    }

    /// Map the build's ids. Root maps the spec's range; an ordinary user may
    /// map only itself and must deny setgroups before writing gid_map.
    fn write_id_maps(child: Pid, ids: &IdMap, rootless: bool) -> Result<(), SetupError> {
        let proc = format!("/proc/{child}");
        let write = |file: &str, content: String| {
            let path = format!("{proc}/{file}");
            std::fs::write(&path, content).ctx(|| format!("write {path}"))
        };
        if rootless {
            write("setgroups", "deny".into())?;
        }
        write("uid_map", format!("0 {} {}\n", ids.host_uid, ids.count))?;
        write("gid_map", format!("0 {} {}\n", ids.host_gid, ids.count))?;
        Ok(())
    }

    /// With limits, put pid 1 in a fresh cgroup carrying them, while it is
    /// still parked on the release pipe and has run nothing of the build.
    fn before_release(
        child: Pid,
        spec: &Spec,
    ) -> Result<Option<super::super::cgroup::TaskCgroup>, SetupError> {
        use super::super::cgroup;
        if spec.limits == cgroup::Limits::default() {
            return Ok(None);
        }
        let cg_err = |e: cgroup::CgroupError| SetupError::Other(format!("cgroup: {e}"));
        let backend = cgroup::detect().map_err(cg_err)?;
        let cg = backend
            .create(&spec.cgroup_name, &spec.limits)
            .map_err(cg_err)?;
        cg.add(child.as_raw() as u32).map_err(cg_err)?;
        Ok(Some(cg))
    }
}

mod pid1 {
    use super::*;
    use nix::unistd::{Gid, Uid};

    /// Body of pid 1. Never returns: its exit code is the build's status
    /// (code, or 128 + signal), the precise outcome goes on the report pipe.
    pub(super) fn main(
        spec: &Spec,
        rootless: bool,
        release: OwnedFd,
        report: OwnedFd,
        parent_ends: [RawFd; 2],
    ) -> ! {
        let mut report = File::from(report);
        let outcome = match setup(spec, rootless, release, parent_ends) {
            Ok(host_out) => supervise(spec, &report, host_out),
            Err(e) => {
                report_line(&e);
                Outcome::Infra(e.to_string())
            }
        };
        let mut line = serde_json::to_vec(&outcome).expect("Outcome serialises");
        line.push(b'\n');
        let _ = report.write_all(&line);
        sys::exit_now(match outcome {
            Outcome::Exited(code) => code,
            Outcome::Signaled(sig) => 128 + sig,
            Outcome::Cancelled
            | Outcome::Infra(_)
            | Outcome::OutOfMemory
            | Outcome::PidLimit
            | Outcome::DiskLimit => SETUP_FAILED,
        })
    }

    /// Everything up to the build: ids, namespaces' contents, the root.
    /// Returns the host out dir when `/out` must be copied back (see
    /// [`super::super::work`]).
    fn setup(
        spec: &Spec,
        rootless: bool,
        release: OwnedFd,
        parent_ends: [RawFd; 2],
    ) -> Result<Option<OwnedFd>, SetupError> {
        // First thing: if the outer dies, so do we (and with us the namespace).
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).ctx(|| "prctl PR_SET_PDEATHSIG".into())?;
        for fd in parent_ends {
            let _ = nix::unistd::close(fd);
        }
        // Parked until the outer has written our id maps. EOF: the outer died.
        let mut byte = [0u8; 1];
        match nix::unistd::read(&release, &mut byte) {
            Ok(1) => {}
            Ok(_) => return Err(SetupError::Other("outer init exited before release".into())),
            Err(e) => return Err(e).ctx(|| "wait for release".into()),
        }
        // Quiet ptrace/core-dump access to pid 1, and name it for `ps`.
        nix::sys::prctl::set_dumpable(false).ctx(|| "prctl PR_SET_DUMPABLE".into())?;
        let _ = nix::sys::prctl::set_name(c"kiln-init");
        nix::sys::stat::umask(nix::sys::stat::Mode::empty());

        // Host paths are opened with the identity we were cloned with (see rootfs).
        let sources = super::super::rootfs::open_sources(spec)?;

        become_root(rootless)?;
        // Changing ids cleared PDEATHSIG: arm it again, then check the outer
        // did not die in between: a non-blocking read of the release pipe
        // gives EAGAIN while the outer holds its end, EOF once it is gone.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).ctx(|| "prctl PR_SET_PDEATHSIG".into())?;
        nix::fcntl::fcntl(&release, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
            .ctx(|| "fcntl release pipe".into())?;
        match nix::unistd::read(&release, &mut byte) {
            Err(nix::errno::Errno::EAGAIN) => {}
            _ => return Err(SetupError::Other("outer init exited during setup".into())),
        }
        drop(release);

        // The outer has put us in the task's cgroup (if any) before release:
        // that cgroup becomes the root the build sees.
        nix::sched::unshare(CloneFlags::CLONE_NEWCGROUP)
            .ctx(|| "unshare cgroup namespace".into())?;
        nix::unistd::sethostname(&spec.hostname)
            .ctx(|| format!("sethostname {}", spec.hostname))?;
        if spec.network == Network::Loopback {
            sys::loopback_up().ctx(|| "bring up lo".into())?;
        }
        super::super::rootfs::assemble(sources, spec)
    }

    /// Become uid/gid 0 of the new user namespace (the mapped host ids).
    fn become_root(rootless: bool) -> Result<(), SetupError> {
        // Rootless maps deny setgroups; the inherited groups show as nogroup.
        if !rootless {
            nix::unistd::setgroups(&[]).ctx(|| "setgroups []".into())?;
        }
        let (g, u) = (Gid::from_raw(0), Uid::from_raw(0));
        nix::unistd::setresgid(g, g, g).ctx(|| "setresgid 0".into())?;
        nix::unistd::setresuid(u, u, u).ctx(|| "setresuid 0".into())?;
        Ok(())
    }

    /// Fork the build, reap everything until it exits, then kill and reap
    /// whatever is left in the namespace.
    fn supervise(spec: &Spec, report: &File, host_out: Option<OwnedFd>) -> Outcome {
        if let Some(setup) = &spec.setup {
            let online = spec.network != Network::Loopback;
            let outcome = run_step(spec, setup, online, report);
            if outcome != Outcome::Exited(0) {
                report_line(&SetupError::Other(format!(
                    "the setup step ended with {outcome}; the build did not run"
                )));
                return outcome;
            }
        }
        let outcome = run_step(spec, &spec.argv, spec.network == Network::Host, report);
        match host_out {
            Some(out) => finish_work(outcome, &out),
            None => outcome,
        }
    }

    /// Fork one step, reap everything until it exits, then kill and reap
    /// whatever it left in the namespace.
    fn run_step(spec: &Spec, argv: &[String], online: bool, report: &File) -> Outcome {
        // SAFETY: single-threaded process; the child only runs our own code up to exec.
        let step = match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => super::build::exec(spec, argv, online, report),
            Ok(nix::unistd::ForkResult::Parent { child }) => child,
            Err(e) => {
                let e = SetupError::Sys {
                    what: "fork build process".into(),
                    errno: e,
                };
                report_line(&e);
                return Outcome::Infra(e.to_string());
            }
        };
        let outcome = loop {
            match waitpid(None::<Pid>, None) {
                Ok(WaitStatus::Exited(pid, code)) if pid == step => break Outcome::Exited(code),
                Ok(WaitStatus::Signaled(pid, sig, _)) if pid == step => {
                    break Outcome::Signaled(sig as i32);
                }
                Ok(_) | Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => {
                    let e = SetupError::Sys {
                        what: "wait for build process".into(),
                        errno: e,
                    };
                    report_line(&e);
                    break Outcome::Infra(e.to_string());
                }
            }
        };
        // kill(-1) as pid 1 of the namespace reaches every process in it but us.
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        // Reap until ECHILD: nothing is left.
        while let Ok(_) | Err(nix::errno::Errno::EINTR) = waitpid(None::<Pid>, None) {}
        outcome
    }

    /// With a work tmpfs: a failure on a full disk is the disk limit's; a
    /// success gets its `/out` copied to the host. Nothing of the build runs
    /// any more.
    fn finish_work(outcome: Outcome, host_out: &OwnedFd) -> Outcome {
        use super::super::{rootfs::fd_path, work};
        match outcome {
            Outcome::Exited(0) => match work::copy_tree(Path::new("/out"), &fd_path(host_out)) {
                Ok(()) => outcome,
                Err(e) => {
                    let e = SetupError::Other(format!("copy /out to the host: {e}"));
                    report_line(&e);
                    Outcome::Infra(e.to_string())
                }
            },
            Outcome::Exited(_) | Outcome::Signaled(_) if work::is_full(Path::new("/build")) => {
                Outcome::DiskLimit
            }
            other => other,
        }
    }
}

mod build {
    use super::*;
    use nix::sys::signal::{
        SaFlags, SigAction, SigHandler, SigSet, SigmaskHow, sigaction, sigprocmask,
    };
    use std::ffi::CString;

    /// In the forked build process: prepare and exec. On failure report an
    /// `Infra` line (it precedes pid 1's own report) and exit 127.
    pub(super) fn exec(spec: &Spec, argv: &[String], online: bool, report: &File) -> ! {
        let e = match prepare(spec, argv, online) {
            Ok((path, cargv, env)) => {
                let errno = nix::unistd::execve(&path, &cargv, &env).unwrap_err();
                SetupError::Sys {
                    what: format!("exec {}", argv[0]),
                    errno,
                }
            }
            Err(e) => e,
        };
        report_line(&e);
        let mut line =
            serde_json::to_vec(&Outcome::Infra(e.to_string())).expect("Outcome serialises");
        line.push(b'\n');
        let _ = (&*report).write_all(&line);
        sys::exit_now(EXEC_FAILED)
    }

    type Exec = (CString, Vec<CString>, Vec<CString>);

    fn prepare(spec: &Spec, argv: &[String], online: bool) -> Result<Exec, SetupError> {
        let cstr = |s: String| {
            CString::new(s).map_err(|_| SetupError::Other("NUL byte in argv or env".into()))
        };
        // pid 1 kept the host's network for another step: this one leaves it
        // for a namespace of its own with only lo (while it still may).
        if !online && spec.network != Network::Loopback {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).ctx(|| "unshare network".into())?;
            sys::loopback_up().ctx(|| "bring up lo".into())?;
        }
        let argv = argv
            .iter()
            .cloned()
            .map(cstr)
            .collect::<Result<Vec<_>, _>>()?;
        let env = spec
            .env
            .iter()
            .map(|(k, v)| cstr(format!("{k}={v}")))
            .collect::<Result<Vec<_>, _>>()?;
        let path = argv
            .first()
            .cloned()
            .ok_or_else(|| SetupError::Other("empty argv".into()))?;

        // Own session: no controlling terminal, no TIOCSTI into the hub's.
        nix::unistd::setsid().ctx(|| "setsid".into())?;
        nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o022));
        nix::unistd::chdir(spec.cwd.as_str()).ctx(|| format!("chdir {}", spec.cwd))?;
        reset_signals()?;
        super::super::harden::apply(spec.hardening)?;
        // Marked close-on-exec rather than closed, so the report pipe still
        // works if exec fails.
        sys::close_from(3, true).ctx(|| "close_range".into())?;
        Ok((path, argv, env))
    }

    /// Ignored signals survive exec (the Rust runtime ignores SIGPIPE), so
    /// give the build default dispositions and an empty signal mask.
    fn reset_signals() -> Result<(), SetupError> {
        let dfl = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
        for sig in Signal::iterator().filter(|s| !matches!(s, Signal::SIGKILL | Signal::SIGSTOP)) {
            // SAFETY: installing SIG_DFL runs no handler code of ours.
            unsafe { sigaction(sig, &dfl) }.ctx(|| format!("reset {sig}"))?;
        }
        sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
            .ctx(|| "sigprocmask".into())
    }
}
