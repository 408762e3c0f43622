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

pub(crate) async fn wait_ready(h: &TestHub, name: &str) -> kiln::server::BuildrootView {
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

/// A bookworm buildroot named `bookworm` from `mirror` (a proxy's URL).
pub(crate) fn bookworm(mirror: &str) -> kiln::buildroot::CreateRequest {
    kiln::buildroot::CreateRequest {
        name: "bookworm".into(),
        bootstrap: "debian".into(),
        suite: "bookworm".into(),
        mirror: Some(format!("{mirror}/debian")),
        include: vec![],
        ..Default::default()
    }
}

/// Target `deb/bookworm-amd64`: buildroot `bookworm`, repo `bookworm`.
pub(crate) async fn add_bookworm_target(h: &TestHub) {
    h.client
        .add_target(
            "deb",
            &TargetRequest {
                name: "bookworm-amd64".into(),
                buildroot: "bookworm".into(),
                arch: "amd64".into(),
                repo: Some("bookworm".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}

/// `hello`'s source tree, unpacked with dpkg-source from `apt-get source`,
/// and its `.dsc` (beside the files it names).
fn hello_source(mirror: &str, dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
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
    (src, dsc)
}

/// A tiny debhelper package `name` (version 1.0, arch all) shipping the
/// files `install` names; `extra_rules` is appended to debian/rules.
fn chain_package(
    dir: &std::path::Path,
    name: &str,
    build_depends: &str,
    files: &[(&str, &str)],
    install: &str,
    extra_rules: &str,
) {
    let control = format!(
        "Source: {name}\nSection: misc\nPriority: optional\nMaintainer: Kiln Tests <t@kiln.invalid>\n\
         Build-Depends: debhelper-compat (= 13){build_depends}\nStandards-Version: 4.6.2\nRules-Requires-Root: no\n\n\
         Package: {name}\nArchitecture: all\nDescription: a link of kiln's test chain\n A test package.\n"
    );
    let changelog = format!(
        "{name} (1.0) unstable; urgency=medium\n\n  * Test package.\n\n -- Kiln Tests <t@kiln.invalid>  Mon, 02 Nov 2026 00:00:00 +0000\n"
    );
    let rules = format!("#!/usr/bin/make -f\n%:\n\tdh $@\n{extra_rules}");
    let mut tree = vec![
        ("debian/control", control.as_str(), 0o644),
        ("debian/changelog", changelog.as_str(), 0o644),
        ("debian/rules", rules.as_str(), 0o755),
        ("debian/source/format", "3.0 (native)\n", 0o644),
        ("debian/install", install, 0o644),
    ];
    tree.extend(files.iter().map(|(p, c)| (*p, *c, 0o644)));
    write_tree(dir, &tree);
}

/// `kiln-chain-a` 1.0: ships `greeting` ("greeting v1").
pub(crate) fn chain_a(dir: &std::path::Path) {
    chain_package(
        dir,
        "kiln-chain-a",
        "",
        &[("greeting", "greeting v1\n")],
        "greeting usr/share/kiln-chain-a/\n",
        "",
    );
}

/// `kiln-chain-b`: build-depends on kiln-chain-a and ships its greeting
/// as `/usr/share/kiln-chain-b/from-a`.
pub(crate) fn chain_b(dir: &std::path::Path) {
    chain_package(
        dir,
        "kiln-chain-b",
        ", kiln-chain-a",
        &[],
        "from-a usr/share/kiln-chain-b/\n",
        "override_dh_auto_build:\n\tcp /usr/share/kiln-chain-a/greeting from-a\n",
    );
}

/// Installs `packages` from the hub's `deb/bookworm` repo with real apt in
/// a fresh sandboxed view of the buildroot, then runs `then`; its output.
async fn install_and_run(
    h: &TestHub,
    br: &std::path::Path,
    dir: &std::path::Path,
    packages: &str,
    then: &str,
) -> String {
    let key = dir.join("kiln.asc");
    std::fs::write(&key, get_text(h, "/repos/deb/key.asc").await).unwrap();
    let task = dir.join("install");
    let _ = std::fs::remove_dir_all(&task);
    for d in ["build", "out", "work"] {
        std::fs::create_dir_all(task.join(d)).unwrap();
    }
    let script = format!(
        "echo 'deb [signed-by=/etc/apt/keyrings/kiln.asc] {}/repos/deb/bookworm bookworm main' \
           > /etc/apt/sources.list.d/kiln.list\n\
         apt-get update -o Dir::Etc::sourcelist=/dev/null\n\
         apt-get install -y --no-install-recommends {packages}\n\
         {then}",
        h.url()
    );
    let spec = Spec {
        root: RootSpec::Overlay {
            lower: br.to_owned(),
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
    out
}

/// Waits until `deb/bookworm` serves `package`, published.
pub(crate) async fn wait_published(h: &TestHub, package: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let r = h.client.repo("deb", "bookworm").await.unwrap();
        if r.packages.iter().any(|p| p.package == package)
            && r.repo.published_revision == r.repo.revision
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{package} never published: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn debian_packages_build_publish_and_install_with_real_apt() {
    let (mirror, requests) = counting_proxy(MIRROR).await;
    let mut h = hub(1).await;
    let tmp = tempfile::tempdir().unwrap();

    // Bootstrap (the hub's sandbox, host network for this step only).
    let b = h.client.create_buildroot(&bookworm(&mirror)).await.unwrap();
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
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("already exists"), "{err}");
    let br = wait_ready(&h, "bookworm").await;
    assert!(br.path.join("usr/bin/dpkg-buildpackage").exists());
    let log = h.client.buildroot_log("bookworm").await.unwrap();
    assert!(log.contains("mmdebstrap") || log.contains("I:"), "{log}");

    add_bookworm_target(&h).await;

    // hello, as `apt-get source` gives it.
    let (src, dsc) = hello_source(&mirror, tmp.path());
    let b = h.client.submit_dir(&src, Some("deb"), None).await.unwrap();
    let v = h.client.wait(b.id, Duration::from_secs(900)).await.unwrap();
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
    wait_published(&h, "hello").await;
    let out = install_and_run(&h, &br.path, tmp.path(), "hello", "hello").await;
    assert!(out.contains("Hello, world!"), "{out}");
    // The stored buildroot did not change.
    assert!(!br.path.join("usr/bin/hello").exists());

    // The same package as a .dsc with its files: the same Build-Depends,
    // so nothing is downloaded again.
    let debs_before = requests
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.ends_with(".deb"))
        .count();
    let b2 = h.client.submit_dir(&dsc, Some("deb"), None).await.unwrap();
    let v2 = h
        .client
        .wait(b2.id, Duration::from_secs(900))
        .await
        .unwrap();
    let log2 = h.client.log_text(v2.detail.build.id).await.unwrap();
    assert_eq!(v2.detail.build.state, BuildState::Succeeded, "{log2}");
    assert_eq!(v2.detail.build.package, "hello");
    assert!(
        log2.contains("dpkg-source: info: extracting hello"),
        "{log2}"
    );
    assert!(log2.contains(", 0 downloaded (0 bytes)"), "{log2}");
    let debs_after = requests
        .lock()
        .unwrap()
        .iter()
        .filter(|p| p.ends_with(".deb"))
        .count();
    assert_eq!(debs_after, debs_before, "the second build downloaded .debs");

    // A chain: kiln-chain-a from a git ref (pinned at submission), then
    // kiln-chain-b, which build-depends on it and can only get it from the
    // project's repo.
    let repos = tmp.path().join("git");
    let a_dir = repos.join("kiln-chain-a");
    chain_a(&a_dir);
    let v1 = git_commit_all(&a_dir, "v1");
    let server = GitServer::start(&repos);
    let a = h
        .client
        .submit_git(
            &format!("{}/kiln-chain-a", server.url),
            Some("main"),
            Some("deb"),
            None,
            &[],
        )
        .await
        .unwrap();
    // main moves on after the submission; the build keeps v1.
    write_tree(&a_dir, &[("greeting", "greeting v2\n", 0o644)]);
    git_commit_all(&a_dir, "v2");
    let va = h.client.wait(a.id, Duration::from_secs(900)).await.unwrap();
    let loga = h.client.log_text(a.id).await.unwrap();
    assert_eq!(va.detail.build.state, BuildState::Succeeded, "{loga}");
    assert_eq!(va.detail.build.package, "kiln-chain-a");
    let origin = va.detail.origin.clone().expect("a git origin");
    assert_eq!(
        (origin.git_ref.as_str(), origin.commit.as_str()),
        ("main", v1.as_str())
    );
    wait_published(&h, "kiln-chain-a").await;

    let b_dir = tmp.path().join("kiln-chain-b");
    chain_b(&b_dir);
    let b = h
        .client
        .submit_dir(&b_dir, Some("deb"), None)
        .await
        .unwrap();
    let vb = h.client.wait(b.id, Duration::from_secs(900)).await.unwrap();
    let logb = h.client.log_text(b.id).await.unwrap();
    assert_eq!(vb.detail.build.state, BuildState::Succeeded, "{logb}");
    assert!(logb.contains("1 from the project's repo"), "{logb}");
    assert!(logb.contains("Setting up kiln-chain-a (1.0)"), "{logb}");
    wait_published(&h, "kiln-chain-b").await;
    let out = install_and_run(
        &h,
        &br.path,
        tmp.path(),
        "kiln-chain-b",
        "cat /usr/share/kiln-chain-b/from-a",
    )
    .await;
    assert!(out.contains("greeting v1"), "{out}");
    assert!(!out.contains("greeting v2"), "{out}");
    h.stop().await;
}
