//! Hostile builds: each tries to break out of or abuse the sandbox and must
//! be contained, with the reason it ended recorded.

use kiln::sandbox::{DENIED_SYSCALLS, KEEP_CAPS, Outcome};

use crate::sandbox::run_sh;

/// Runs `script`, which must fail in the sandbox, and returns its log.
async fn refused(script: &str) -> String {
    let (outcome, log, _t) = run_sh(script).await;
    assert!(
        matches!(outcome, Outcome::Exited(c) if c != 0),
        "{script:?} was not refused: {outcome:?}\n{log}"
    );
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_denied_syscall_fails_with_eperm() {
    // perl's syscall() reaches the raw numbers; each must come back EPERM.
    let calls: Vec<String> = DENIED_SYSCALLS
        .iter()
        .map(|(name, nr)| format!("[\"{name}\",{nr}]"))
        .collect();
    let script = format!(
        "perl -e 'for $c ({}) {{ $! = 0; $r = syscall($$c[1], 0, 0, 0, 0, 0); printf(\"%s %d %d\\n\", $$c[0], $r, $!+0); }}'",
        calls.join(",")
    );
    let (outcome, log, _t) = run_sh(&script).await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    for (name, _) in DENIED_SYSCALLS {
        let line = log
            .lines()
            .find(|l| l.split(' ').next() == Some(name))
            .unwrap_or_else(|| panic!("{name} not tried:\n{log}"));
        assert_eq!(line, format!("{name} -1 {}", libc::EPERM), "{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_bounding_set_holds_only_the_kept_capabilities() {
    let (outcome, log, _t) = run_sh("grep -E '^Cap(Bnd|Eff|Prm|Inh|Amb)' /proc/self/status").await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    let want: u64 = KEEP_CAPS.iter().map(|c| 1u64 << c.index()).sum();
    let field = |name: &str| {
        let line = log.lines().find(|l| l.starts_with(name)).expect(name);
        u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
    };
    assert_eq!(field("CapBnd:"), want, "{log}");
    assert_eq!(field("CapEff:"), want, "{log}");
    assert_eq!(field("CapInh:"), 0, "{log}");
    assert_eq!(field("CapAmb:"), 0, "{log}");
    // CAP_SYS_ADMIN (21) is gone for good.
    assert_eq!(field("CapBnd:") & (1 << 21), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mounting_anything_is_refused() {
    let log = refused("mkdir -p /tmp/m && mount -t tmpfs none /tmp/m").await;
    assert!(
        log.contains("permission denied") || log.contains("not permitted"),
        "{log}"
    );
    refused("mount --bind /build /tmp").await;
    refused("umount /proc").await;
    refused("mkdir -p /tmp/new/old && pivot_root /tmp/new /tmp/new/old").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_user_namespaces_are_refused() {
    let log = refused("unshare -U true").await;
    assert!(log.contains("not permitted"), "{log}");
    refused("unshare -Ur true").await;
    refused("unshare -m true").await;
    refused("unshare -n true").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_secrets_stay_unreadable() {
    refused("cat /etc/shadow").await;
    refused("ls /root").await;
    refused("cat /proc/1/environ | grep -a KILN_SANDBOX_HUB_PID").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_nodes_cannot_be_made_or_opened() {
    refused("mknod /tmp/mem c 1 1").await;
    refused("head -c1 /dev/mem").await;
    refused("mknod /build/sda b 8 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_setuid_copy_made_in_build_gains_nothing() {
    // With no_new_privs the setuid bit of a copy owned by another user is
    // ignored: it runs as us (root inside, an unprivileged id outside).
    let (outcome, log, _t) = run_sh(
        "cp /usr/bin/id /build/id && chown 1000:1000 /build/id && chmod 4755 /build/id && \
         setpriv --reuid=2000 --regid=2000 --clear-groups /build/id -u",
    )
    .await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert!(
        log.lines().any(|l| l.trim() == "2000"),
        "setuid took effect:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_core_dumps() {
    let (outcome, log, _t) = run_sh("ulimit -c; ulimit -c unlimited").await;
    assert!(log.lines().next() == Some("0"), "{log}");
    assert!(
        matches!(outcome, Outcome::Exited(c) if c != 0),
        "raising the core limit worked: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proc_sys_and_sys_cannot_be_written() {
    // net.* sysctls belong to the build's own network namespace, so only a
    // read-only /proc/sys stops this write.
    let log = refused("echo 1 > /proc/sys/net/ipv4/ip_forward").await;
    assert!(log.contains("Read-only file system"), "{log}");
    refused("echo kiln-evil > /proc/sys/kernel/hostname").await;
    refused("echo b > /proc/sysrq-trigger").await;
    refused("ls /sys/fs/cgroup").await;
    refused("echo x > /sys/kernel/uevent_helper").await;
    // Kernel internals read as empty (kallsyms is megabytes on the host).
    assert!(std::fs::metadata("/proc/kallsyms").is_ok());
    let (outcome, log, _t) = run_sh("wc -c < /proc/kallsyms; ls /proc/acpi | wc -l").await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert_eq!(
        log.split_whitespace().collect::<Vec<_>>(),
        ["0", "0"],
        "{log}"
    );
}

mod through_the_hub {
    use kiln::model::{BuildState, Outcome};

    use crate::harness::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_flood_of_log_output_is_capped_and_the_build_goes_on() {
        let mut h = hub_with(1, |c| c.build.log_limit_bytes = 1 << 20).await;
        // 300 MB of output, then real work that must still happen.
        let v = run_script(
            &h,
            "flood",
            "yes 'kiln log flood line' | head -c 300000000; echo done > $KILN_OUT/after.txt",
            &["*"],
        )
        .await;
        assert_eq!(v.detail.build.state, BuildState::Succeeded);
        let log = h.client.log_text(v.detail.build.id).await.unwrap();
        assert!(log.len() < (1 << 20) + 4096, "log is {} bytes", log.len());
        assert!(
            log.contains("log limit of 1048576 bytes reached"),
            "{}",
            &log[log.len() - 500..]
        );
        let arts = h.client.artifacts(v.detail.build.id).await.unwrap();
        assert_eq!(arts[0].path, "after.txt");
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_output_symlink_to_etc_passwd_is_kept_as_a_link_never_followed() {
        let mut h = hub(1).await;
        let v = run_script(
            &h,
            "passwd-link",
            "ln -s /etc/passwd $KILN_OUT/passwd; echo real > $KILN_OUT/real.txt",
            &["*"],
        )
        .await;
        assert_eq!(v.detail.build.state, BuildState::Succeeded);
        let task = &v.detail.task_list[0];
        // The link is in the output tree as a link; only real files are artifacts.
        let tree = h
            .running
            .as_ref()
            .unwrap()
            .hub
            .cas
            .get_tree(&task.outputs.unwrap())
            .unwrap();
        let link = tree.get("passwd").expect("link kept in the output tree");
        assert!(
            matches!(&link.kind, kiln::cas::EntryKind::Symlink { target } if target == "/etc/passwd"),
            "{:?}",
            link.kind
        );
        let arts = h.client.artifacts(v.detail.build.id).await.unwrap();
        assert_eq!(
            arts.iter().map(|a| a.path.as_str()).collect::<Vec<_>>(),
            ["real.txt"]
        );
        let passwd = std::fs::read("/etc/passwd").unwrap();
        assert!(
            h.client
                .artifact(v.detail.build.id, "passwd")
                .await
                .is_err()
        );
        assert!(
            !arts
                .iter()
                .any(|a| a.size == passwd.len() as u64 && a.path == "passwd")
        );
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_hub_its_data_and_the_network_are_out_of_reach() {
        let mut h = hub(1).await;
        let port = h.running.as_ref().unwrap().addr.port();
        let data = h.data();
        let script = format!(
            "fail=0\n\
             bash -c 'exec 3<>/dev/tcp/127.0.0.1/{port}' && {{ echo reached-hub; fail=1; }}\n\
             getent hosts deb.debian.org && {{ echo resolved; fail=1; }}\n\
             ls {data} 2>/dev/null && {{ echo saw-data; fail=1; }}\n\
             cat {data}/admin.token 2>/dev/null && {{ echo read-token; fail=1; }}\n\
             exit $fail",
            data = data.display()
        );
        let v = run_script(&h, "reach", &script, &["*"]).await;
        let log = h.client.log_text(v.detail.build.id).await.unwrap();
        assert_eq!(
            v.detail.task_list[0].outcome,
            Some(Outcome::Succeeded),
            "{log}"
        );
        // The connect was really tried, and refused (bash says why).
        assert!(log.contains("Connection refused"), "{log}");
        // From the host the same port answers.
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("hub reachable from the host");
        h.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_that_sleeps_past_its_timeout_is_killed_and_says_so() {
    use kiln::model::{BuildState, Outcome as End};
    let mut h = crate::harness::hub_with(1, |c| c.build.timeout_secs = 2).await;
    let marker = format!("kiln-timeout-{}", std::process::id());
    let t0 = std::time::Instant::now();
    let v = crate::harness::run_script(
        &h,
        "sleepy",
        &format!("setsid sh -c 'sleep 1000; : {marker}' & sh -c 'sleep 1000; : {marker}-main'"),
        &["*"],
    )
    .await;
    assert!(t0.elapsed() < std::time::Duration::from_secs(30));
    assert_eq!(v.detail.build.state, BuildState::Failed);
    assert_eq!(v.detail.task_list[0].outcome, Some(End::Timeout(2)));
    let log = h.client.log_text(v.detail.build.id).await.unwrap();
    assert!(log.contains("timed out after 2 s"), "{log}");
    // Nothing of it survives.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let left = crate::harness::host_processes_with(&marker);
    assert!(left.is_empty(), "{left:?}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_ends_out_of_memory() {
    use kiln::model::{BuildState, Outcome as End};
    let mut h = crate::harness::hub_with(1, |c| c.build.memory_limit_bytes = Some(64 << 20)).await;
    // sort holds all of its input in memory: 400 MB of it.
    let v = crate::harness::run_script(
        &h,
        "hog",
        "head -c 400000000 /dev/zero | tr '\\0' x | fold -w 1000 | sort > /dev/null",
        &["*"],
    )
    .await;
    let log = h.client.log_text(v.detail.build.id).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Failed, "{log}");
    assert_eq!(
        v.detail.task_list[0].outcome,
        Some(End::OutOfMemory),
        "{log}"
    );
    assert!(log.contains("task ended: out of memory"), "{log}");
    // The host is fine, and the next build on the slot runs normally.
    let ok = crate::harness::run_script(&h, "after-hog", "echo fine", &["*"]).await;
    assert_eq!(ok.detail.build.state, BuildState::Succeeded);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_bomb_ends_at_the_pid_limit_and_leaves_nothing() {
    use kiln::model::{BuildState, Outcome as End};
    let mut h = crate::harness::hub_with(1, |c| c.build.pids_limit = Some(64)).await;
    let marker = format!("kilnbomb{}", std::process::id());
    let v = crate::harness::run_script(
        &h,
        "bomb",
        &format!("{marker}() {{ {marker} | {marker} & }}; {marker}; sleep 2"),
        &["*"],
    )
    .await;
    let log = h.client.log_text(v.detail.build.id).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Failed, "{log}");
    assert_eq!(v.detail.task_list[0].outcome, Some(End::PidLimit), "{log}");
    let n = crate::harness::host_processes_with(&marker).len();
    assert_eq!(n, 0, "fork bomb processes survived");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_processes_cannot_be_signalled() {
    let me = std::process::id();
    // The host pid does not exist in the build's pid namespace, and kill -1
    // reaches only the build's own processes (here: none but the caller).
    let (outcome, log, _t) = run_sh(&format!("kill -9 {me} 2>&1; kill -9 -1; echo survived")).await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert_eq!(log.matches("No such process").count(), 2, "{log}");
    assert!(log.contains("survived"), "{log}");
    // We are still here, and so is our parent.
    assert!(
        std::path::Path::new(&format!("/proc/{}", std::os::unix::process::parent_id())).exists()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_chroot_escape_trick_only_reaches_the_sandbox_root() {
    // The classic: chroot into a subdir, walk up past it, chroot to ".".
    let (outcome, log, _t) = run_sh(
        "mkdir -p /tmp/jail && perl -e 'chroot(\"/tmp/jail\") or die \"chroot: $!\"; \
         chdir(\"../../../../..\") for 1..3; chroot(\".\") or die \"chroot2: $!\"; \
         opendir(D, \"/\"); print join(\" \", sort grep { !/^\\./ } readdir(D)), \"\\n\"; \
         print((-e \"/work\" || -e \"/root\" || -e \"/home\") ? \"HOST\\n\" : \"contained\\n\");'",
    )
    .await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert!(log.contains("contained"), "{log}");
    assert!(
        log.contains("build") && log.contains("out"),
        "walked to the sandbox root: {log}"
    );
}

/// Calls syscall `nr` with `args` from perl and asserts it failed with
/// EPERM (and that the build then went on to exit 0).
async fn syscall_refused(name: &str, nr: i64, args: &str) {
    let (outcome, log, _t) = run_sh(&format!(
        // Copies in @a: perl passes strings as pointers and may write to them.
        "perl -e 'my @a = ({args}); $! = 0; $r = syscall({nr}, @a); printf(\"{name} %d %d\\n\", $r, $!+0)'"
    ))
    .await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert_eq!(log.trim(), format!("{name} -1 {}", libc::EPERM), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyctl_cannot_reach_the_kernel_keyrings() {
    // KEYCTL_GET_KEYRING_ID of the session keyring, and add_key of a user key.
    syscall_refused("keyctl", libc::SYS_keyctl, "0, -3, 1").await;
    syscall_refused(
        "add_key",
        libc::SYS_add_key,
        "\"user\", \"kiln\", \"x\", 1, -3",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bpf_programs_cannot_be_loaded() {
    // BPF_PROG_LOAD with an empty attr.
    syscall_refused("bpf", libc::SYS_bpf, "5, 0, 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kernel_modules_and_kexec_are_refused() {
    syscall_refused("init_module", libc::SYS_init_module, "0, 0, \"\"").await;
    syscall_refused("finit_module", libc::SYS_finit_module, "0, \"\", 0").await;
    syscall_refused("kexec_load", libc::SYS_kexec_load, "0, 0, 0, 0").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_cannot_kill_the_sandbox_init() {
    // In a child pid namespace, reboot(RESTART) with CAP_SYS_BOOT would kill
    // pid 1; the build must simply get EPERM and carry on.
    syscall_refused(
        "reboot",
        libc::SYS_reboot,
        "0xfee1dead, 672274793, 0x01234567, 0",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ptrace_of_the_sandbox_init_is_refused() {
    // PTRACE_ATTACH (16) to pid 1, and strace of it.
    syscall_refused("ptrace", libc::SYS_ptrace, "16, 1, 0, 0").await;
    let log =
        refused("strace -p 1 -e trace=none 2>&1 & sleep 1; kill %1 2>/dev/null; wait %1").await;
    assert!(log.contains("Operation not permitted"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shocker_file_handle_escape_is_refused() {
    // open_by_handle_at on a guessed handle is how early Docker was escaped.
    syscall_refused(
        "open_by_handle_at",
        libc::SYS_open_by_handle_at,
        "-100, 0, 0",
    )
    .await;
    syscall_refused(
        "name_to_handle_at",
        libc::SYS_name_to_handle_at,
        "-100, \"/\", 0, 0, 0",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clock_cannot_be_set() {
    let log = refused("date -s '2001-01-01 00:00:00'").await;
    assert!(log.contains("not permitted"), "{log}");
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert!(t.as_secs() > 1_700_000_000, "host clock moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hostname_and_network_devices_cannot_be_changed() {
    let before = nix::unistd::gethostname().unwrap();
    refused("hostname kiln-evil").await;
    refused("ip link add kilnevil0 type dummy").await;
    refused("ip link set lo down").await;
    assert_eq!(nix::unistd::gethostname().unwrap(), before);
    assert!(!std::path::Path::new("/sys/class/net/kilnevil0").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_only_root_and_system_dirs_cannot_be_written() {
    let name = format!("kiln-evil-{}", std::process::id());
    for script in [
        format!("touch /usr/bin/{name}"),
        format!("echo x >> /etc/{name}"),
        format!("mkdir /{name}"),
        "chmod 4755 /usr/bin/env".to_string(),
        "echo 'evil::0:0::/:/bin/sh' >> /etc/passwd".to_string(),
    ] {
        // Host-owned files are refused before the mount is even asked.
        let log = refused(&script).await;
        assert!(
            log.contains("Read-only file system") || log.contains("Permission denied"),
            "{script}: {log}"
        );
    }
    assert!(!std::path::Path::new(&format!("/usr/bin/{name}")).exists());
    assert!(
        !std::fs::read_to_string("/etc/passwd")
            .unwrap()
            .contains("evil:")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_link_to_a_host_file_cannot_be_made() {
    // /build is another mount than /etc: linking across is refused, so no
    // host file can be reached through the build's writable dirs.
    let log = refused("ln /etc/passwd /build/passwd").await;
    assert!(log.contains("Invalid cross-device link"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn su_to_root_gains_nothing() {
    // As an ordinary user inside, su is setuid root on the host's /usr; with
    // no_new_privs the bit is ignored and su cannot become anyone.
    let (outcome, log, _t) = run_sh(
        "setpriv --reuid=2000 --regid=2000 --clear-groups su -c 'id -u' root </dev/null 2>&1; \
         echo \"su=$?\"; setpriv --reuid=2000 --regid=2000 --clear-groups id -u",
    )
    .await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert!(
        !log.lines().any(|l| l.trim() == "0"),
        "su became root:\n{log}"
    );
    assert!(!log.contains("su=0"), "{log}");
    assert_eq!(log.lines().last(), Some("2000"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hard_rlimits_cannot_be_raised() {
    let (outcome, log, _t) = run_sh("h=$(ulimit -Hn); echo hard=$h; ulimit -n $((h + 1))").await;
    assert!(
        matches!(outcome, Outcome::Exited(c) if c != 0),
        "raised the hard limit: {log}"
    );
    assert!(log.contains("hard="), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_terminal_to_inject_keystrokes_into() {
    // TIOCSTI (0x5412) into stdin: there is no terminal (stdin is /dev/null,
    // own session), so nothing can be typed into the hub's terminal.
    let (outcome, log, _t) = run_sh(
        "perl -e 'my $c = \"x\"; $r = ioctl(STDIN, 0x5412, $c); print(defined $r ? \"injected\\n\" : \"refused: $!\\n\")'; tty; true",
    )
    .await;
    assert_eq!(outcome, Outcome::Exited(0), "{log}");
    assert!(log.contains("refused"), "{log}");
    assert!(log.contains("not a tty"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dns_lookups_fail() {
    let log = refused("getent hosts deb.debian.org || { echo lookup-failed; exit 2; }").await;
    assert!(log.contains("lookup-failed"), "{log}");
    refused("exec 3<>/dev/tcp/1.1.1.1/53").await;
}

mod with_limits {
    use kiln::model::{BuildState, Outcome};

    use crate::harness::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn filling_build_ends_at_the_disk_limit() {
        let limit = 32u64 << 20;
        let mut h = hub_with(1, |c| c.build.disk_limit_bytes = Some(limit)).await;
        let v = run_script(
            &h,
            "fill-build",
            "dd if=/dev/zero of=/build/fill bs=1M count=200",
            &["*"],
        )
        .await;
        let log = h.client.log_text(v.detail.build.id).await.unwrap();
        assert_eq!(v.detail.build.state, BuildState::Failed, "{log}");
        assert_eq!(
            v.detail.task_list[0].outcome,
            Some(Outcome::DiskLimit(limit)),
            "{log}"
        );
        assert!(log.contains("No space left on device"), "{log}");
        assert!(
            log.contains("task ended: disk limit of 33554432 bytes reached"),
            "{log}"
        );
        // The next build on the slot has all its space again and keeps its outputs.
        let ok = run_script(
            &h,
            "after-fill",
            "dd if=/dev/zero of=/build/f bs=1M count=20 && ln -s /etc/passwd $KILN_OUT/link && \
             mkdir -p $KILN_OUT/d && head -c 1000 /build/f > $KILN_OUT/d/part",
            &["**"],
        )
        .await;
        assert_eq!(ok.detail.build.state, BuildState::Succeeded);
        let arts = h.client.artifacts(ok.detail.build.id).await.unwrap();
        assert_eq!(
            arts.iter()
                .map(|a| (a.path.as_str(), a.size))
                .collect::<Vec<_>>(),
            [("d/part", 1000)]
        );
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn tmp_shm_and_out_share_the_disk_limit() {
        let limit = 32u64 << 20;
        let mut h = hub_with(1, |c| c.build.disk_limit_bytes = Some(limit)).await;
        let v = run_script(
            &h,
            "fill-tmp",
            "df -k /build /tmp /dev/shm /out; \
             dd if=/dev/zero of=/tmp/a bs=1M count=12 && dd if=/dev/zero of=/dev/shm/b bs=1M count=12 && \
             dd if=/dev/zero of=$KILN_OUT/c bs=1M count=12",
            &["*"],
        )
        .await;
        let log = h.client.log_text(v.detail.build.id).await.unwrap();
        assert_eq!(
            v.detail.task_list[0].outcome,
            Some(Outcome::DiskLimit(limit)),
            "{log}"
        );
        // The four mounts report the one 32 MiB filesystem.
        assert_eq!(log.matches(" 32768 ").count(), 4, "{log}");
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runaway_log_is_killed_at_the_output_limit() {
        let mut h = hub_with(1, |c| {
            c.build.log_limit_bytes = 1 << 20;
            c.build.output_limit_bytes = 16 << 20;
        })
        .await;
        let marker = format!("kilnflood{}", std::process::id());
        let v = run_script(&h, "runaway", &format!("yes {marker}"), &["*"]).await;
        let log = h.client.log_text(v.detail.build.id).await.unwrap();
        assert_eq!(v.detail.build.state, BuildState::Failed);
        assert_eq!(
            v.detail.task_list[0].outcome,
            Some(Outcome::LogLimit(16 << 20))
        );
        assert!(log.len() < (1 << 20) + 4096, "log is {} bytes", log.len());
        assert!(
            log.contains("log limit of 1048576 bytes reached"),
            "{}",
            &log[log.len() - 400..]
        );
        assert!(
            log.contains("task ended: log limit"),
            "{}",
            &log[log.len() - 400..]
        );
        assert_no_process_with(&marker);
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_cgroup_and_its_limits_are_out_of_reach() {
        let mut h = hub_with(1, |c| c.build.pids_limit = Some(64)).await;
        let marker = format!("kilncg{}", std::process::id());
        // Try every way at the cgroup tree, then fork-bomb: the limit must hold.
        let script = format!(
            "cat /proc/self/cgroup\n\
             ls /sys/fs/cgroup 2>&1 && echo SAW-CGROUPS\n\
             mkdir -p /tmp/cg\n\
             mount -t cgroup2 none /tmp/cg 2>&1 && echo MOUNTED-V2\n\
             mount -t cgroup -o pids none /tmp/cg 2>&1 && echo MOUNTED-V1\n\
             echo max > /tmp/cg/pids.max 2>&1\n\
             {marker}() {{ {marker} | {marker} & }}; {marker}; sleep 2"
        );
        let v = run_script(&h, "cgroup-escape", &script, &["*"]).await;
        let log = h.client.log_text(v.detail.build.id).await.unwrap();
        assert_eq!(
            v.detail.task_list[0].outcome,
            Some(Outcome::PidLimit),
            "{log}"
        );
        assert!(
            !log.contains("SAW-CGROUPS") && !log.contains("MOUNTED"),
            "{log}"
        );
        // The cgroup namespace is rooted at the task's own cgroup.
        let cg_lines: Vec<&str> = log
            .lines()
            .filter(|l| {
                l.split(':').count() == 3 && l.chars().next().is_some_and(|c| c.is_ascii_digit())
            })
            .collect();
        assert!(!cg_lines.is_empty(), "{log}");
        for l in &cg_lines {
            let path = l.rsplit(':').next().unwrap();
            assert!(path == "/" || !path.starts_with("/.."), "{l}\n{log}");
            assert!(!path.contains("kiln") && !path.contains("task-"), "{l}");
        }
        assert_eq!(host_processes_with(&marker).len(), 0);
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_double_forked_setsid_daemon_is_gone_when_the_task_ends() {
        let mut h = hub(1).await;
        let marker = format!("kilndaemon{}", std::process::id());
        let v = run_script(
            &h,
            "daemon",
            &format!(
                "( setsid sh -c 'trap \"\" TERM HUP; sleep 1000; : {marker}' </dev/null >/dev/null 2>&1 & ) ; echo forked"
            ),
            &["*"],
        )
        .await;
        assert_eq!(v.detail.task_list[0].outcome, Some(Outcome::Succeeded));
        assert_no_process_with(&marker);
        h.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_concurrent_build_cannot_see_or_touch_another() {
        let mut h = hub(2).await;
        let pid = std::process::id();
        let secret = format!("kilnsecret{pid}");
        // A holds a secret in its /build and /tmp while B looks for it.
        let a_src = script_tree(
            "holder",
            &format!("echo {secret} > /build/s; echo {secret} > /tmp/s; sleep 4; cat /build/s"),
            &["*"],
        );
        let a = h.client.submit_dir(a_src.path(), None, None).await.unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let b = run_script(
            &h,
            "seeker",
            &format!(
                // Built at run time, so B's own kiln.toml does not hold it.
                "found=0; s=kilnsec; s=\"${{s}}ret{pid}\"\n\
                 grep -rs \"$s\" /build /tmp /out /dev/shm /proc/*/cwd/ 2>/dev/null && found=1\n\
                 kill -9 -1 || true\n\
                 exit $found"
            ),
            &["*"],
        )
        .await;
        let b_log = h.client.log_text(b.detail.build.id).await.unwrap();
        assert_eq!(
            b.detail.task_list[0].outcome,
            Some(Outcome::Succeeded),
            "{b_log}"
        );
        let a = h.client.wait(a.id, BUILD_TIMEOUT).await.unwrap();
        let a_log = h.client.log_text(a.detail.build.id).await.unwrap();
        assert_eq!(
            a.detail.task_list[0].outcome,
            Some(Outcome::Succeeded),
            "{a_log}"
        );
        assert!(a_log.contains(&secret));
        h.stop().await;
    }
}
