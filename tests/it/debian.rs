//! Debian end to end, with real parts: a bookworm buildroot bootstrapped by
//! mmdebstrap through the hub, `hello` fetched with `apt-get source` and
//! built with its Build-Depends, published into a signed repo, installed
//! with real apt in a fresh sandboxed bookworm root and run; a second build
//! downloads no dependency again. Mirror traffic goes through a counting
//! proxy on 127.0.0.1.

use std::time::{Duration, Instant};

use kiln::model::{BuildState, BuildrootState};
use kiln::sandbox::{self, Bind, Hardening, Network, RootSpec, Spec};
use kiln::server::TargetRequest;
use tokio_util::sync::CancellationToken;

use crate::apt::{Apt, counting_proxy, text};
use crate::harness::*;

const MIRROR: &str = "http://deb.debian.org";

async fn wait_ready(h: &TestHub, name: &str) -> kiln::server::BuildrootView {
    let deadline = Instant::now() + Duration::from_secs(900);
    loop {
        let b = h.client.buildroot(name).await.unwrap();
        match &b.buildroot.state {
            BuildrootState::Ready => return b,
            BuildrootState::Failed(why) => {
                let log = h.client.buildroot_log(name).await.unwrap_or_default();
                panic!("bootstrap failed: {why}\n{log}");
            }
            BuildrootState::Creating => {}
        }
        assert!(Instant::now() < deadline, "bootstrap too slow");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `hello`'s source tree, unpacked with dpkg-source from `apt-get source`.
fn hello_source(mirror: &str, dir: &std::path::Path) -> std::path::PathBuf {
    let apt = Apt::new(
        &dir.join("apt"),
        &format!(
            "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror}/debian bookworm main"
        ),
        "",
    );
    let o = apt.run("apt-get", &["update"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = apt.run("apt-get", &["source", "--download-only", "hello"]);
    assert!(o.status.success(), "{}", text(&o));
    let dsc = std::fs::read_dir(&apt.dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "dsc"))
        .expect("hello .dsc");
    let src = dir.join("hello-src");
    let o = std::process::Command::new("dpkg-source")
        .args(["--no-check", "-x"])
        .arg(&dsc)
        .arg(&src)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    src
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_builds_publishes_and_installs_with_real_apt() {
    let (mirror, requests) = counting_proxy(MIRROR).await;
    let mut h = hub(1).await;
    let tmp = tempfile::tempdir().unwrap();

    // Bootstrap (the hub's sandbox, host network for this step only).
    let b = h
        .client
        .create_buildroot(&kiln::buildroot::CreateRequest {
            name: "bookworm".into(),
            bootstrap: "debian".into(),
            suite: "bookworm".into(),
            mirror: Some(format!("{mirror}/debian")),
            include: vec![],
        })
        .await
        .unwrap();
    assert_eq!(b.buildroot.state, BuildrootState::Creating);
    // A second create of the same name is refused while the first runs.
    let err = h
        .client
        .create_buildroot(&kiln::buildroot::CreateRequest {
            name: "bookworm".into(),
            bootstrap: "debian".into(),
            suite: "bookworm".into(),
            mirror: None,
            include: vec![],
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let br = wait_ready(&h, "bookworm").await;
    assert!(br.path.join("usr/bin/dpkg-buildpackage").exists());
    let log = h.client.buildroot_log("bookworm").await.unwrap();
    assert!(log.contains("mmdebstrap") || log.contains("I:"), "{log}");

    h.client
        .add_target(
            "deb",
            &TargetRequest {
                name: "bookworm-amd64".into(),
                buildroot: "bookworm".into(),
                arch: "amd64".into(),
                repo: Some("bookworm".into()),
            },
        )
        .await
        .unwrap();

    // hello, as `apt-get source` gives it.
    let src = hello_source(&mirror, tmp.path());
    let build = |h: &TestHub| {
        let (client, src) = (h.client.clone(), src.clone());
        async move {
            let b = client.submit_dir(&src, Some("deb"), None).await.unwrap();
            client.wait(b.id, Duration::from_secs(900)).await.unwrap()
        }
    };
    let v = build(&h).await;
    let log = h.client.log_text(v.detail.build.id).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Succeeded, "{log}");
    assert_eq!(v.detail.build.package, "hello");
    let arts = h.client.artifacts(v.detail.build.id).await.unwrap();
    for ext in [".deb", ".buildinfo", ".changes"] {
        assert!(
            arts.iter().any(|a| a.path.ends_with(ext)),
            "no {ext}: {arts:?}"
        );
    }
    assert!(log.contains("downloaded"), "{log}");

    // Published and signed; real apt in a fresh bookworm root installs it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = h.client.repo("deb", "bookworm").await.unwrap();
        if r.packages.iter().any(|p| p.package == "hello")
            && r.repo.published_revision == r.repo.revision
        {
            break;
        }
        assert!(Instant::now() < deadline, "hello never published: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let key = tmp.path().join("kiln.asc");
    std::fs::write(&key, get_text(&h, "/repos/deb/key.asc").await).unwrap();
    let task = tmp.path().join("install");
    for d in ["build", "out", "work"] {
        std::fs::create_dir_all(task.join(d)).unwrap();
    }
    let script = format!(
        "echo 'deb [signed-by=/etc/apt/keyrings/kiln.asc] {}/repos/deb/bookworm bookworm main' \
           > /etc/apt/sources.list.d/kiln.list\n\
         apt-get update -o Dir::Etc::sourcelist=/dev/null\n\
         apt-get install -y --no-install-recommends hello\n\
         hello",
        h.url()
    );
    let spec = Spec {
        root: RootSpec::Overlay {
            lower: br.path.clone(),
        },
        build_dir: task.join("build"),
        out_dir: task.join("out"),
        argv: vec!["/bin/sh".into(), "-e".into(), "-c".into(), script],
        env: Spec::base_env(),
        cwd: "/build".into(),
        hostname: "kiln".into(),
        ids: kiln::buildroot::ids(),
        limits: Default::default(),
        cgroup_name: String::new(),
        disk_bytes: None,
        network: Network::Host,
        setup: None,
        binds: vec![Bind {
            host: key.clone(),
            path: "/etc/apt/keyrings/kiln.asc".into(),
            writable: false,
        }],
        hardening: Hardening::Build,
    };
    let (reader, writer) = std::io::pipe().unwrap();
    let out = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut { reader }, &mut s).unwrap();
        s
    });
    let o = sandbox::run(
        &crate::kiln_exe(),
        &spec,
        &task.join("work"),
        writer.into(),
        CancellationToken::new(),
    )
    .await
    .unwrap();
    let out = out.join().unwrap();
    assert!(o.success(), "{o}: {out}");
    assert!(out.contains("Hello, world!"), "{out}");
    // The stored buildroot did not change.
    assert!(!br.path.join("usr/bin/hello").exists());

    // The same Build-Depends again: nothing downloaded.
    let debs_before = requests
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.ends_with(".deb"))
        .count();
    let v2 = build(&h).await;
    let log2 = h.client.log_text(v2.detail.build.id).await.unwrap();
    assert_eq!(v2.detail.build.state, BuildState::Succeeded, "{log2}");
    assert!(log2.contains(", 0 downloaded (0 bytes)"), "{log2}");
    let debs_after = requests
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.ends_with(".deb"))
        .count();
    assert_eq!(debs_after, debs_before, "the second build downloaded .debs");
    h.stop().await;
}
