//! Remote workers over a real network: the hub on HTTPS, two `kiln worker`
//! processes each in its own network namespace joined to the hub by a veth
//! pair. Traffic goes only to the addresses this test gives those pairs.
//! Needs root (ip netns); skipped with a message otherwise.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::model::BuildState;
use kiln::workers::WorkerState;

use crate::harness::*;

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A network namespace with a veth pair to the host: host side `HOST_IP`,
/// namespace side `.2`. Removed on drop (with the pair).
struct Netns {
    name: String,
    host_if: String,
    host_ip: String,
}

impl Netns {
    fn new(n: u8) -> Netns {
        let tag = std::process::id() % 100_000;
        let name = format!("kiln-t{tag}-{n}");
        let (host_if, ns_if) = (format!("kh{tag}x{n}"), format!("kw{tag}x{n}"));
        let net = format!("10.213.{}", 10 + n);
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        ip(&[
            "link", "add", &host_if, "type", "veth", "peer", "name", &ns_if,
        ]);
        ip(&["link", "set", &ns_if, "netns", &name]);
        ip(&["addr", "add", &format!("{net}.1/24"), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ip(&[
            "-n",
            &name,
            "addr",
            "add",
            &format!("{net}.2/24"),
            "dev",
            &ns_if,
        ]);
        ip(&["-n", &name, "link", "set", &ns_if, "up"]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        Netns {
            name,
            host_if,
            host_ip: format!("{net}.1"),
        }
    }

    fn link(&self, up: bool) {
        ip(&["link", "set", &self.host_if, if up { "up" } else { "down" }]);
    }

    /// `kiln worker` inside this namespace, talking to the hub's HTTPS
    /// port on this pair's host address; stderr goes to `log`.
    fn worker(&self, port: u16, token: &str, name: &str, data: &Path, log: &Path) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.name])
            .arg(crate::kiln_exe())
            .args(["worker", "--slots", "1", "--name", name, "--token", token])
            .args(["--hub", &format!("https://{}:{port}", self.host_ip)])
            .arg("--data")
            .arg(data)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// Submits `dir` to `project`, waits for the build and checks it
/// succeeded (the worker's log at `worker_log` shown if not); returns the
/// build and its log.
async fn built(
    h: &TestHub,
    dir: &std::path::Path,
    project: &str,
    worker_log: &PathBuf,
) -> (kiln::server::BuildView, String) {
    let b = h.client.submit_dir(dir, Some(project), None).await.unwrap();
    let v = h.client.wait(b.id, Duration::from_secs(900)).await.unwrap();
    let build_log = h.client.log_text(b.id).await.unwrap();
    assert_eq!(
        v.detail.build.state,
        BuildState::Succeeded,
        "{build_log}\nworker:\n{}",
        read(worker_log)
    );
    (v, build_log)
}

fn read(p: &PathBuf) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Waits until `what` holds, polling; panics after `secs` with `ctx()`.
async fn until<F, Fut>(secs: u64, mut what: F, ctx: impl Fn() -> String)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !what().await {
        assert!(Instant::now() < deadline, "timed out: {}", ctx());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits for a build's (only) task to run and returns its worker.
async fn running_on(h: &TestHub, build: u64, ctx: impl Fn() -> String) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = h.client.build(build).await.unwrap();
        let t = &v.detail.task_list[0];
        if t.state == BuildState::Running
            && let Some(w) = &t.worker
        {
            return w.clone();
        }
        assert!(Instant::now() < deadline, "never ran: {}", ctx());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_in_their_own_network_namespaces() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let mut h = hub_with(0, |c| {
        c.server.tls_listen = Some("0.0.0.0:0".parse().unwrap());
        c.build.lease_secs = 3;
    })
    .await;
    let port = h.running.as_ref().unwrap().tls_addr.unwrap().port();
    let (ns1, ns2) = (Netns::new(1), Netns::new(2));
    let dir = tempfile::tempdir().unwrap();
    let (log1, log2) = (dir.path().join("w1.log"), dir.path().join("w2.log"));
    let t1 = h.client.create_worker_token("w1").await.unwrap().token;
    let t2 = h.client.create_worker_token("w2").await.unwrap().token;

    // A worker pinning another certificate refuses the hub.
    let j = kiln::workers::JoinToken::parse(&t1).unwrap().unwrap();
    let wrong = kiln::workers::JoinToken {
        fingerprint: Some("0".repeat(64)),
        secret: j.secret.clone(),
    };
    let bad_log = dir.path().join("bad.log");
    let status = ns1
        .worker(
            port,
            &wrong.to_string(),
            "w1",
            &dir.path().join("bad"),
            &bad_log,
        )
        .wait()
        .unwrap();
    assert!(!status.success());
    assert!(read(&bad_log).contains("was pinned"), "{}", read(&bad_log));

    let mut w1 = ns1.worker(port, &t1, "w1", &dir.path().join("d1"), &log1);
    let mut w2 = ns2.worker(port, &t2, "w2", &dir.path().join("d2"), &log2);
    let logs = || format!("w1:\n{}\nw2:\n{}", read(&log1), read(&log2));
    until(
        60,
        || async {
            let d = h.client.workers().await.unwrap();
            d.iter().filter(|w| w.state == WorkerState::Idle).count() == 2
        },
        logs,
    )
    .await;

    // Builds spread over both workers and succeed.
    let src = script_tree("spread", "sleep 1; echo ok > $KILN_OUT/ok.txt", &["*.txt"]);
    let ids = submit_n(&h, src.path(), 4).await;
    let mut used = std::collections::BTreeSet::new();
    for id in &ids {
        let v = h.client.wait(*id, BUILD_TIMEOUT).await.unwrap();
        assert_eq!(v.detail.build.state, BuildState::Succeeded, "{}", logs());
        used.insert(v.detail.task_list[0].worker.clone().unwrap());
    }
    assert_eq!(used.into_iter().collect::<Vec<_>>(), ["w1", "w2"]);

    // Link down mid-task: the lease runs out, the task re-runs on the
    // other worker; when the link is back the old worker's late end is
    // refused by the fence.
    let cut = script_tree("cut", "sleep 2; echo done > $KILN_OUT/x.txt", &["*.txt"]);
    let b = h.client.submit_dir(cut.path(), None, None).await.unwrap();
    let first = running_on(&h, b.id, logs).await;
    let (ns_cut, cut_log) = if first == "w1" {
        (&ns1, &log1)
    } else {
        (&ns2, &log2)
    };
    ns_cut.link(false);
    let v = h.client.wait(b.id, BUILD_TIMEOUT).await.unwrap();
    let t = &v.detail.task_list[0];
    assert_eq!(v.detail.build.state, BuildState::Succeeded, "{}", logs());
    assert_ne!(t.worker.as_deref(), Some(first.as_str()));
    assert_eq!(t.attempt, 2);
    ns_cut.link(true);
    until(40, || async { read(cut_log).contains("is stale") }, logs).await;
    // Still the re-run's result.
    let again = h.client.build(b.id).await.unwrap();
    assert_eq!(again.detail.task_list[0].worker, t.worker);
    assert_eq!(again.detail.task_list[0].attempt, 2);

    // kill -9 mid-task: the task finishes on the other worker, and the
    // directory shows the killed one offline with a failure counted.
    let slow = script_tree("killed", "sleep 3", &[]);
    let b = h.client.submit_dir(slow.path(), None, None).await.unwrap();
    let victim = running_on(&h, b.id, logs).await;
    let infra_before = h.client.worker(&victim).await.unwrap().stats.infra;
    let (killed, survivor, survivor_name) = if victim == "w1" {
        (&mut w1, &mut w2, "w2")
    } else {
        (&mut w2, &mut w1, "w1")
    };
    // `ip netns exec` execs the worker: this pid is the worker.
    killed.kill().unwrap();
    killed.wait().unwrap();
    let v = h.client.wait(b.id, BUILD_TIMEOUT).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Succeeded, "{}", logs());
    assert_eq!(v.detail.task_list[0].worker.as_deref(), Some(survivor_name));
    let gone = h.client.worker(&victim).await.unwrap();
    assert_eq!(gone.state, WorkerState::Offline, "{gone:?}");
    assert_eq!(gone.stats.infra, infra_before + 1, "{gone:?}");

    // A revoked token is refused: the survivor stops at its next request.
    h.client.revoke_worker_token(survivor_name).await.unwrap();
    let status = survivor.wait().unwrap();
    assert!(!status.success(), "{}", logs());
    let survivor_log = if survivor_name == "w1" { &log1 } else { &log2 };
    assert!(read(survivor_log).contains("revoked"), "{}", logs());
    h.stop().await;
}

/// A Debian package built on a remote worker whose namespace reaches
/// nothing but the hub: the buildroot comes down as one blob (unpacked once
/// and kept), Build-Depends come through the hub's cache, and a package of
/// the project's repo is available to the next build's Build-Depends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_debian_package_builds_on_a_worker_that_reaches_only_the_hub() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: network namespaces need root");
        return;
    }
    let (mirror, requests) = crate::apt::counting_proxy("http://deb.debian.org").await;
    let mut h = hub_with(0, |c| {
        c.server.tls_listen = Some("0.0.0.0:0".parse().unwrap());
    })
    .await;
    let port = h.running.as_ref().unwrap().tls_addr.unwrap().port();
    use crate::debian::{add_bookworm_target, bookworm, chain_a, chain_b};
    // With Debian's rpm too, for the RPM builds at the end.
    let mut root = bookworm(&mirror);
    root.include = vec!["rpm".into()];
    h.client.create_buildroot(&root).await.unwrap();
    crate::debian::wait_ready(&h, "bookworm").await;
    add_bookworm_target(&h).await;

    let ns = Netns::new(3);
    // Nothing but the pair: no default route out of the namespace.
    let routes = Command::new("ip")
        .args(["-n", &ns.name, "route"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&routes.stdout).contains("default"));
    let dir = tempfile::tempdir().unwrap();
    let (data, log) = (dir.path().join("d3"), dir.path().join("w3.log"));
    let token = h.client.create_worker_token("w3").await.unwrap().token;
    let mut worker = ns.worker(port, &token, "w3", &data, &log);

    let src = dir.path().join("src");
    chain_a(&src.join("a"));
    let (v, build_log) = built(&h, &src.join("a"), "deb", &log).await;
    assert_eq!(v.detail.task_list[0].worker.as_deref(), Some("w3"));
    assert!(
        build_log.contains("buildroot bookworm (generation 1): downloaded from the hub"),
        "{build_log}"
    );
    assert!(build_log.contains("downloaded ("), "{build_log}");
    let arts = h.client.artifacts(v.detail.build.id).await.unwrap();
    assert!(
        arts.iter()
            .any(|a| a.path.ends_with("kiln-chain-a_1.0_all.deb")),
        "{arts:?}"
    );
    let copies = || {
        std::fs::read_dir(data.join("buildroots"))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("bookworm@"))
            .count()
    };
    assert_eq!(copies(), 1);

    // kiln-chain-b build-depends on kiln-chain-a, which only the project's
    // repo has; its Build-Depends are otherwise the same, so the worker's
    // cache and its copy of the buildroot serve, and no mirror is asked
    // for a .deb again.
    let mirror_debs = || {
        requests
            .lock()
            .unwrap()
            .iter()
            .filter(|p| p.ends_with(".deb"))
            .count()
    };
    let debs_before = mirror_debs();
    crate::debian::wait_published(&h, "kiln-chain-a").await;
    chain_b(&src.join("b"));
    let (_, build_log) = built(&h, &src.join("b"), "deb", &log).await;
    assert!(
        build_log.contains("buildroot bookworm (generation 1): this worker's copy"),
        "{build_log}"
    );
    assert!(
        build_log.contains("0 downloaded (0 bytes)")
            && build_log.contains("1 from the project's repo")
            && build_log.contains("Setting up kiln-chain-a (1.0)"),
        "{build_log}"
    );
    assert_eq!(mirror_debs(), debs_before);
    assert_eq!(copies(), 1);

    // RPMs on the worker: kiln-greeter build-requires kiln-hello, which
    // the worker gets from the hub's list of the project's RPMs, by digest.
    h.client
        .add_target(
            "rpm",
            &kiln::server::TargetRequest {
                name: "el".into(),
                buildroot: "bookworm".into(),
                arch: "amd64".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    use crate::rpm::{GREETER_SPEC, HELLO_C, HELLO_SPEC, spec_tree};
    let hello = spec_tree(
        &src.join("hello"),
        "kiln-hello.spec",
        HELLO_SPEC,
        &[("hello.c", HELLO_C)],
    );
    let greeter = spec_tree(&src.join("greeter"), "kiln-greeter.spec", GREETER_SPEC, &[]);
    for (dir, name, expect) in [
        (hello, "kiln-hello", "kiln-test: check passed"),
        (
            greeter,
            "kiln-greeter",
            "BuildRequires: kiln-hello-1.0-1.x86_64 from repo rpm/el",
        ),
    ] {
        let (v, build_log) = built(&h, &dir, "rpm", &log).await;
        assert_eq!(v.detail.task_list[0].worker.as_deref(), Some("w3"));
        assert!(build_log.contains(expect), "{build_log}");
        // Published (and signed on the hub: the worker holds no key).
        crate::rpm::wait_published(&h, name).await;
    }
    assert_eq!(mirror_debs(), debs_before);
    let _ = worker.kill();
    let _ = worker.wait();
    h.stop().await;
}
