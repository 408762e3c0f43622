//! Sandbox tests against real namespaces and the real `kiln` binary: each
//! test runs a shell script through `kiln::sandbox::run` and checks what a
//! user would check, from the build log and from the host.
//!
//! Tests are independent and parallel-safe: own temp dirs, unique markers,
//! and host-side process checks match only their own marker.

use std::io::{BufRead as _, BufReader};
use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kiln::sandbox::{self, IdMap, Outcome, RootSpec, SandboxError, Spec};
use tokio_util::sync::CancellationToken;

use super::kiln_exe;
use crate::harness::{assert_no_process_with, host_processes_with};

/// A task's dirs on the host: build, out and work under one temp dir.
pub(crate) struct Task {
    tmp: tempfile::TempDir,
    build: PathBuf,
    out: PathBuf,
    work: PathBuf,
}

impl Task {
    fn new() -> Task {
        let tmp = tempfile::tempdir().expect("tempdir");
        let [build, out, work] = ["build", "out", "work"].map(|d| tmp.path().join(d));
        for d in [&build, &out, &work] {
            std::fs::create_dir(d).expect("mkdir");
        }
        Task {
            tmp,
            build,
            out,
            work,
        }
    }

    fn spec(&self, argv: &[&str]) -> Spec {
        Spec {
            root: RootSpec::Host,
            build_dir: self.build.clone(),
            out_dir: self.out.clone(),
            argv: argv.iter().map(|s| s.to_string()).collect(),
            env: Spec::base_env(),
            cwd: "/build".into(),
            hostname: "kiln".into(),
            ids: IdMap::for_slot(0),
            limits: Default::default(),
            cgroup_name: String::new(),
            disk_bytes: None,
            network: Default::default(),
            setup: None,
            binds: vec![],
            hardening: Default::default(),
        }
    }

    fn sh(&self, script: &str) -> Spec {
        self.spec(&["/bin/sh", "-c", script])
    }
}

/// A string no other test (or earlier run) uses.
fn marker() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!(
        "{}{:09}{}",
        std::process::id(),
        nanos,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The read side of the build log, drained by a thread line by line.
struct Log {
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
}

impl Log {
    fn pipe() -> (Log, OwnedFd) {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(reader).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        (
            Log {
                lines: rx,
                seen: Vec::new(),
            },
            writer.into(),
        )
    }

    /// Wait until a line containing `needle` arrives.
    fn wait_for(&mut self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.seen.iter().any(|l| l.contains(needle)) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(e) => panic!(
                    "no log line with {needle:?} ({e}); log so far: {:?}",
                    self.seen
                ),
            }
        }
    }

    /// Read to EOF, which comes once every sandbox process is gone.
    fn finish(mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    panic!("log not closed in {timeout:?}: {:?}", self.seen)
                }
            }
        }
        self.seen.iter().map(|l| format!("{l}\n")).collect()
    }
}

/// Run `spec` to completion; the outcome and the whole log.
async fn run(task: &Task, spec: &Spec) -> (Outcome, String) {
    let (log, fd) = Log::pipe();
    let outcome = sandbox::run(&kiln_exe(), spec, &task.work, fd, CancellationToken::new())
        .await
        .expect("sandbox run");
    (outcome, log.finish(Duration::from_secs(10)))
}

pub(crate) async fn run_sh(script: &str) -> (Outcome, String, Task) {
    let task = Task::new();
    let (outcome, log) = run(&task, &task.sh(script)).await;
    (outcome, log, task)
}

#[tokio::test]
async fn stdout_and_stderr_reach_the_log_interleaved_in_order() {
    let m = marker();
    let (outcome, log, _t) = run_sh(&format!(
        "echo {m}-1; echo {m}-2 >&2; echo {m}-3; echo {m}-4 >&2"
    ))
    .await;
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(log, format!("{m}-1\n{m}-2\n{m}-3\n{m}-4\n"));
}

#[tokio::test]
async fn exit_code_is_reported() {
    let (outcome, _, _t) = run_sh("exit 3").await;
    assert_eq!(outcome, Outcome::Exited(3));
    assert_eq!(outcome.to_string(), "exit code 3");
}

#[tokio::test]
async fn death_by_signal_is_reported() {
    let (outcome, _, _t) = run_sh("kill -9 $$").await;
    assert_eq!(outcome, Outcome::Signaled(9));
    assert_eq!(outcome.to_string(), "killed by signal 9 (SIGKILL)");
}

#[tokio::test]
async fn root_inside_is_an_unprivileged_id_on_the_host() {
    let (outcome, log, t) =
        run_sh("id -u; id -g; echo data > /out/made-inside; mkdir /build/subdir").await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert_eq!(log, "0\n0\n");
    let ids = IdMap::for_slot(0);
    for path in [t.out.join("made-inside"), t.build.join("subdir")] {
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(
            (meta.uid(), meta.gid()),
            (ids.host_uid, ids.host_gid),
            "{}",
            path.display()
        );
    }
    if nix::unistd::geteuid().is_root() {
        assert_eq!(ids.host_uid, sandbox::SUBID_BASE);
        assert_ne!(
            std::fs::metadata(t.out.join("made-inside")).unwrap().uid(),
            0
        );
    }
}

#[tokio::test]
async fn hostname_is_fixed() {
    let (outcome, log, _t) = run_sh("uname -n").await;
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(log, "kiln\n");
}

#[tokio::test]
async fn host_paths_are_invisible() {
    let task = Task::new();
    let tmp = task.tmp.path().display().to_string();
    let work = task.work.display().to_string();
    let script = format!(
        "for p in /root /home /work /run /srv /mnt /media /var/lib /var/cache /sys {tmp} {work}; do \
           test -e $p && echo VISIBLE $p; done; ls -1A /"
    );
    let (outcome, log) = run(&task, &task.sh(&script)).await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert!(!log.contains("VISIBLE"), "{log}");
    let allowed = [
        "bin", "build", "dev", "etc", "lib", "lib32", "lib64", "libx32", "opt", "out", "proc",
        "sbin", "tmp", "usr", "var",
    ];
    for entry in log.lines() {
        assert!(
            allowed.contains(&entry),
            "unexpected /{entry} in the sandbox root"
        );
    }
}

#[tokio::test]
async fn only_build_out_and_tmp_are_writable() {
    let script = "for p in /usr /etc / /dev /var /build /out /tmp /var/tmp /dev/shm; do \
                    if touch $p/kiln-probe 2>/dev/null; then echo RW $p; else echo RO $p; fi; done";
    let (outcome, log, t) = run_sh(script).await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert_eq!(
        log,
        "RO /usr\nRO /etc\nRO /\nRO /dev\nRO /var\nRW /build\nRW /out\nRW /tmp\nRW /var/tmp\nRW /dev/shm\n"
    );
    assert!(t.build.join("kiln-probe").exists() && t.out.join("kiln-probe").exists());
}

#[tokio::test]
async fn root_and_system_dirs_are_read_only_mounts() {
    // Permissions alone already stop writes to host-owned files; the mounts
    // themselves must be read-only too, recursively.
    let (outcome, log, _t) = run_sh("cut -d' ' -f5,6 /proc/self/mountinfo").await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    let mounts: Vec<(&str, &str)> = log.lines().filter_map(|l| l.split_once(' ')).collect();
    for want in ["/", "/usr", "/etc", "/dev", "/proc"] {
        assert!(
            mounts.iter().any(|(m, _)| *m == want),
            "{want} not mounted: {log}"
        );
    }
    for (mountpoint, opts) in &mounts {
        let system = [
            "/usr", "/etc", "/opt", "/lib", "/lib32", "/lib64", "/libx32", "/bin", "/sbin",
        ]
        .iter()
        .any(|d| mountpoint == d || mountpoint.starts_with(&format!("{d}/")));
        if system || *mountpoint == "/" || *mountpoint == "/dev" {
            assert!(opts.split(',').any(|o| o == "ro"), "{mountpoint} is {opts}");
        }
    }
}

#[tokio::test]
async fn network_is_loopback_only() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let task = Task::new();
    let script = format!(
        "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; ip -o link | cut -d' ' -f2,3; \
         if echo hi > /dev/tcp/127.0.0.1/{port}; then echo CONNECTED; else echo REFUSED; fi"
    );
    let (outcome, log) = run(&task, &task.spec(&["/bin/bash", "-c", &script])).await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| !l.contains("Connection refused"))
        .collect();
    assert_eq!(
        lines,
        ["lo", "lo: <LOOPBACK,UP,LOWER_UP>", "REFUSED"],
        "{log}"
    );
    assert_eq!(
        listener.accept().unwrap_err().kind(),
        std::io::ErrorKind::WouldBlock
    );
}

#[tokio::test]
async fn environment_is_exactly_the_specs() {
    let task = Task::new();
    let m = marker();
    let mut spec = task.spec(&["/usr/bin/env"]);
    spec.env = vec![
        ("PATH".into(), "/usr/bin:/bin".into()),
        ("KILN_MARKER".into(), m.clone()),
        ("HOME".into(), "/build".into()),
    ];
    let (outcome, log) = run(&task, &spec).await;
    assert_eq!(outcome, Outcome::Exited(0));
    assert_eq!(
        log,
        format!("PATH=/usr/bin:/bin\nKILN_MARKER={m}\nHOME=/build\n")
    );
}

#[tokio::test]
async fn only_the_sandbox_processes_are_visible() {
    let (outcome, log, _t) =
        run_sh("echo pid=$$; for d in /proc/[0-9]*; do echo \"${d#/proc/} $(cat $d/comm)\"; done")
            .await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    let mut lines = log.lines();
    assert_eq!(lines.next(), Some("pid=2"), "{log}");
    let procs: Vec<&str> = lines.collect();
    assert!(procs.contains(&"1 kiln-init"), "{log}");
    assert!(procs.contains(&"2 sh"), "{log}");
    // pid 1, the shell, and at most the short-lived $(cat) subshell/cat.
    assert!(procs.len() <= 4, "{log}");
}

#[tokio::test]
async fn build_process_hygiene() {
    // A non-CLOEXEC fd in the hub (as a careless library might leave) must not reach the build.
    // The shell's fds are listed by a subshell while the shell only waits
    // (a pipeline or a fresh exec would show transient fds of their own).
    let leaked = nix::fcntl::open(
        "/dev/null",
        nix::fcntl::OFlag::O_RDONLY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let script = "p=$$; (ls /proc/$p/fd > /tmp/fds); tr '\\n' ' ' < /tmp/fds; echo; umask; grep NoNewPrivs /proc/self/status; \
                  ps -o sid= -p $$ | tr -d ' '; echo $$; yes | head -n 1; pwd";
    let (outcome, log, _t) = run_sh(script).await;
    drop(leaked);
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    // fds 0-2 only; session leader; SIGPIPE back to default (no "Broken pipe" from yes).
    assert_eq!(log, "0 1 2 \n0022\nNoNewPrivs:\t1\n2\n2\ny\n/build\n");
}

#[tokio::test]
async fn daemons_do_not_survive_the_task() {
    let m = marker();
    let sleep = format!("1000.{m}");
    let script = format!(
        "setsid sh -c 'sleep {sleep}; echo never' >/dev/null 2>&1 </dev/null & \
         ( setsid sleep {sleep} & ) ; sleep 0.2; echo started"
    );
    let (outcome, log, _t) = run_sh(&script).await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert_eq!(log, "started\n");
    assert!(
        host_processes_with(&sleep).is_empty(),
        "{:?}",
        host_processes_with(&sleep)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_kills_the_build_promptly() {
    let m = marker();
    let sleep = format!("1000.{m}");
    let task = Task::new();
    let spec = task.sh(&format!("echo started; sleep {sleep}"));
    let (mut log, fd) = Log::pipe();
    let cancel = CancellationToken::new();
    let handle = {
        let (work, cancel) = (task.work.clone(), cancel.clone());
        tokio::spawn(async move { sandbox::run(&kiln_exe(), &spec, &work, fd, cancel).await })
    };
    log = tokio::task::spawn_blocking(move || {
        log.wait_for("started", Duration::from_secs(10));
        log
    })
    .await
    .unwrap();
    assert!(
        !host_processes_with(&sleep).is_empty(),
        "the build should be running"
    );

    let start = Instant::now();
    cancel.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("prompt")
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::Cancelled);
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "cancel took {:?}",
        start.elapsed()
    );
    tokio::task::spawn_blocking(move || log.finish(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_no_process_with(&sleep);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_outer_init_takes_the_sandbox_down() {
    let m = marker();
    let sleep = format!("1000.{m}");
    let task = Task::new();
    let spec = task.sh(&format!(
        "setsid sleep {sleep} & echo started; sleep {sleep}"
    ));
    let (mut log, fd) = Log::pipe();
    let handle = {
        let work = task.work.clone();
        tokio::spawn(async move {
            sandbox::run(&kiln_exe(), &spec, &work, fd, CancellationToken::new()).await
        })
    };
    log = tokio::task::spawn_blocking(move || {
        log.wait_for("started", Duration::from_secs(10));
        log
    })
    .await
    .unwrap();

    // The outer is our child; pid 1 carries the same command line but another parent.
    let me = std::process::id();
    let needle = format!(
        "__sandbox-init {}",
        task.work.join(sandbox::RESULT_FILE).display()
    );
    let outer: Vec<i32> = host_processes_with(&needle)
        .iter()
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .filter(|pid| parent_of(*pid) == Some(me))
        .collect();
    assert_eq!(outer.len(), 1, "{:?}", host_processes_with(&needle));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(outer[0]),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();

    let result = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("prompt")
        .unwrap();
    assert!(
        matches!(result, Err(SandboxError::ResultMissing { .. })),
        "{result:?}"
    );
    tokio::task::spawn_blocking(move || log.finish(Duration::from_secs(5)))
        .await
        .unwrap();
    assert_no_process_with(&sleep);
}

/// A hub killed with SIGKILL takes its sandboxes along (PDEATHSIG of the
/// outer, then of pid 1). A shell plays the hub here, since killing the test
/// process itself is not an option.
#[test]
fn killing_the_hub_takes_the_sandbox_down() {
    let m = marker();
    let sleep = format!("1000.{m}");
    let task = Task::new();
    let spec = task.sh(&format!(
        "( setsid sleep {sleep} & ); echo started; sleep {sleep}"
    ));
    let spec_path = task.work.join("spec.json");
    std::fs::write(&spec_path, serde_json::to_vec(&spec).unwrap()).unwrap();
    if nix::unistd::geteuid().is_root() {
        for dir in [&task.build, &task.out] {
            std::os::unix::fs::chown(dir, Some(spec.ids.host_uid), Some(spec.ids.host_gid))
                .unwrap();
        }
    }
    let (mut log, fd) = Log::pipe();
    let mut hub = std::process::Command::new("/bin/sh")
        .args(["-c", "\"$0\" __sandbox-init \"$2\" < \"$1\" & wait"])
        .arg(kiln_exe())
        .arg(&spec_path)
        .arg(task.work.join(sandbox::RESULT_FILE))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::from(fd.try_clone().unwrap()))
        .stderr(std::process::Stdio::from(fd))
        .spawn()
        .unwrap();
    log.wait_for("started", Duration::from_secs(10));
    hub.kill().unwrap();
    hub.wait().unwrap();
    log.finish(Duration::from_secs(5));
    assert_no_process_with(&sleep);
    assert!(!task.work.join(sandbox::RESULT_FILE).exists());
}

fn parent_of(pid: i32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'.
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

#[tokio::test]
async fn exec_failure_is_an_infra_outcome_named_in_the_log() {
    let task = Task::new();
    let missing = format!("/nonexistent-{}", marker());
    let (outcome, log) = run(&task, &task.spec(&[&missing])).await;
    let Outcome::Infra(why) = &outcome else {
        panic!("{outcome:?}")
    };
    assert!(why.starts_with(&format!("exec {missing}: ENOENT")), "{why}");
    assert_eq!(log, format!("kiln-sandbox: {why}\n"));
}

#[tokio::test]
async fn missing_cwd_is_an_infra_outcome() {
    let task = Task::new();
    let mut spec = task.sh("true");
    spec.cwd = "/no-such-dir".into();
    let (outcome, log) = run(&task, &spec).await;
    assert_eq!(
        outcome,
        Outcome::Infra("chdir /no-such-dir: ENOENT: No such file or directory".into())
    );
    assert!(log.starts_with("kiln-sandbox: chdir /no-such-dir"), "{log}");
}

#[tokio::test]
async fn an_init_that_writes_no_result_is_a_hub_error() {
    let task = Task::new();
    let (log, fd) = Log::pipe();
    let result = sandbox::run(
        Path::new("/bin/true"),
        &task.sh("true"),
        &task.work,
        fd,
        CancellationToken::new(),
    )
    .await;
    log.finish(Duration::from_secs(5));
    let err = result.unwrap_err();
    assert!(matches!(err, SandboxError::ResultMissing { .. }), "{err:?}");
    assert!(err.to_string().contains("result.json"), "{err}");
}

/// The rootless path: the init runs as `nobody` (as a hub run by an ordinary
/// user would), mapping inside 0 to that uid only. A wrapper drops to nobody
/// around the real binary. Run as a non-root user, every other test already
/// takes this path.
#[tokio::test]
async fn rootless_init_maps_root_to_the_calling_user() {
    if !nix::unistd::geteuid().is_root() {
        return;
    }
    const NOBODY: u32 = 65534;
    let task = Task::new();
    // nobody must reach the work dir and the binary.
    std::fs::set_permissions(
        task.tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // As under a rootless hub, the task's dirs belong to the hub's user.
    for dir in [&task.work, &task.build, &task.out] {
        std::os::unix::fs::chown(dir, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    let wrapper = task.tmp.path().join("as-nobody");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\n# argv: __sandbox-init RESULT, the spec on stdin\n\
             [ \"$1\" = probe ] && exit 0\n\
             exec /usr/bin/setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups {} \"$@\"\n",
            kiln_exe().display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &wrapper,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    // A child forked by another test while our write fd was open holds a copy
    // until it execs (ETXTBSY meanwhile); once one exec succeeds, none is left.
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = std::process::Command::new(&wrapper).arg("probe").status() {
        assert!(
            e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < deadline,
            "{e}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }

    let mut spec = task.sh(
        "id -u; id -g; cat /proc/self/uid_map | tr -s ' '; echo x > /out/made-inside; uname -n",
    );
    spec.ids = IdMap {
        host_uid: NOBODY,
        host_gid: NOBODY,
        count: 1,
    };
    let (log, fd) = Log::pipe();
    let outcome = sandbox::run(&wrapper, &spec, &task.work, fd, CancellationToken::new())
        .await
        .unwrap();
    let log = log.finish(Duration::from_secs(10));
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert_eq!(log, format!("0\n0\n 0 {NOBODY} 1\nkiln\n"));
    let meta = std::fs::metadata(task.out.join("made-inside")).unwrap();
    assert_eq!((meta.uid(), meta.gid()), (NOBODY, NOBODY));
}
