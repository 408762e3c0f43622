//! Signed apt repositories served by a real hub, checked with real apt.

use std::time::{Duration, Instant};

use kiln::model::BuildState;
use kiln::server::TargetRequest;

use crate::apt::{Apt, tampering_proxy, text};
use crate::harness::*;

/// A script that makes `kiln-hello_VERSION_amd64.deb` with dpkg-deb.
fn deb_script(version: &str) -> String {
    format!(
        "mkdir -p pkg/DEBIAN pkg/usr/bin\n\
         printf 'Package: kiln-hello\\nVersion: {version}\\nArchitecture: amd64\\nMaintainer: Kiln Tests <t@kiln.invalid>\\nDescription: hello from kiln\\n A test package.\\n' > pkg/DEBIAN/control\n\
         printf '#!/bin/sh\\necho hello from kiln {version}\\n' > pkg/usr/bin/kiln-hello\n\
         chmod 755 pkg/usr/bin/kiln-hello\n\
         dpkg-deb --root-owner-group --build pkg $KILN_OUT/kiln-hello_{version}_amd64.deb"
    )
}

async fn hub_with_repo() -> TestHub {
    with_demo_repo(hub(1).await).await
}

/// Adds project demo's target `debs` (host, amd64) publishing into `stable`.
async fn with_demo_repo(h: TestHub) -> TestHub {
    let t = h
        .client
        .add_target(
            "demo",
            &TargetRequest {
                name: "debs".into(),
                buildroot: "host".into(),
                arch: "amd64".into(),
                repo: Some("stable".into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((t.repo.as_str(), t.arch.as_str()), ("stable", "amd64"));
    h
}

async fn build_deb(h: &TestHub, version: &str) -> kiln::server::BuildView {
    let src = script_tree("kiln-hello", &deb_script(version), &["*.deb"]);
    let b = h
        .client
        .submit_dir_to(src.path(), Some("demo"), None, &["debs"])
        .await
        .unwrap();
    h.client.wait(b.id, BUILD_TIMEOUT).await.unwrap()
}

/// Waits until the repo serves `version` of kiln-hello.
async fn wait_published(h: &TestHub, version: &str) -> kiln::server::RepoView {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = h.client.repo("demo", "stable").await.unwrap();
        if r.repo.published_revision == r.repo.revision
            && r.packages.iter().any(|p| p.version == version)
        {
            return r;
        }
        assert!(Instant::now() < deadline, "not published: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An apt client for the hub's (or a proxy's) `demo/stable`, with the
/// served key as its `signed-by`.
async fn apt_for(h: &TestHub, base: &str, dir: &std::path::Path) -> Apt {
    let key = get_text(h, "/repos/demo/key.asc").await;
    assert!(
        key.starts_with("-----BEGIN PGP PUBLIC KEY BLOCK-----"),
        "{key}"
    );
    let key_path = dir.join("kiln-demo.asc");
    std::fs::write(&key_path, key).unwrap();
    Apt::new(
        &dir.join("apt"),
        &format!(
            "deb [signed-by={}] {base}/repos/demo/stable stable main",
            key_path.display()
        ),
        "",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_built_deb_is_installable_with_real_apt_from_the_signed_repo() {
    let mut h = hub_with_repo().await;
    let v = build_deb(&h, "1.0").await;
    assert_eq!(v.detail.build.state, BuildState::Succeeded);
    let repo = wait_published(&h, "1.0").await;
    assert_eq!(repo.packages.len(), 1);
    assert!(
        repo.sources
            .list_line
            .ends_with("/repos/demo/stable stable main"),
        "{:?}",
        repo.sources
    );
    // The build page says how to use the repo.
    let page = get_text(&h, &format!("/builds/{}", v.detail.build.id)).await;
    for line in [&repo.sources.list_line, &repo.sources.key_url] {
        assert!(
            page.contains(line.as_str()),
            "{line} not on the page:\n{page}"
        );
    }
    assert!(page.contains("Types: deb"), "{page}");

    let tmp = tempfile::tempdir().unwrap();
    let apt = apt_for(&h, &h.url(), tmp.path()).await;
    let o = apt.run("apt-get", &["update"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("W:"),
        "{}",
        text(&o)
    );
    let o = apt.run("apt-cache", &["policy", "kiln-hello"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Candidate: 1.0"),
        "{}",
        text(&o)
    );
    let o = apt.run("apt-get", &["download", "kiln-hello"]);
    assert!(o.status.success(), "{}", text(&o));
    let deb = apt.dir.join("kiln-hello_1.0_amd64.deb");
    let x = tmp.path().join("x");
    let o = std::process::Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(&x)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let o = std::process::Command::new(x.join("usr/bin/kiln-hello"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hello from kiln 1.0\n");

    // A new version replaces it; apt sees the upgrade.
    let v = build_deb(&h, "1.1").await;
    assert_eq!(v.detail.build.state, BuildState::Succeeded);
    wait_published(&h, "1.1").await;
    let o = apt.run("apt-get", &["update"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = apt.run("apt-cache", &["policy", "kiln-hello"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Candidate: 1.1"),
        "{}",
        text(&o)
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_release_or_index_is_refused_by_real_apt() {
    let mut h = hub_with_repo().await;
    let v = build_deb(&h, "2.0").await;
    assert_eq!(v.detail.build.state, BuildState::Succeeded);
    wait_published(&h, "2.0").await;
    for (suffix, hide, expect) in [
        ("/InRelease", None, "NOSPLIT|BADSIG|not signed|invalid"),
        // No InRelease: apt falls back to Release + Release.gpg.
        ("/Release", Some("/InRelease"), "BADSIG|not signed|invalid"),
        // apt takes the indexes by hash (Acquire-By-Hash).
        (
            "/by-hash/",
            None,
            "Hash Sum mismatch|File has unexpected size|Bad header|mismatch",
        ),
    ] {
        let proxy = tampering_proxy(h.url(), suffix, hide).await;
        let tmp = tempfile::tempdir().unwrap();
        let apt = apt_for(&h, &proxy, tmp.path()).await;
        let o = apt.run("apt-get", &["update"]);
        let all = text(&o);
        let refused = !o.status.success() || all.contains("W:") || all.contains("E:");
        assert!(refused, "tampered {suffix} accepted:\n{all}");
        assert!(
            expect.split('|').any(|e| all.contains(e)),
            "tampered {suffix}: {all}"
        );
        let o = apt.run("apt-cache", &["policy", "kiln-hello"]);
        assert!(
            !String::from_utf8_lossy(&o.stdout).contains("Candidate: 2.0"),
            "tampered {suffix}: apt took the package\n{}",
            text(&o)
        );
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_build_publishes_nothing() {
    let mut h = hub_with_repo().await;
    let before = wait_published_empty(&h).await;
    let src = script_tree(
        "kiln-hello",
        &format!("{}\nexit 3", deb_script("9.9")),
        &["*.deb"],
    );
    let b = h
        .client
        .submit_dir_to(src.path(), Some("demo"), None, &["debs"])
        .await
        .unwrap();
    let v = h.client.wait(b.id, BUILD_TIMEOUT).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Failed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = h.client.repo("demo", "stable").await.unwrap();
    assert!(after.packages.is_empty(), "{after:?}");
    assert_eq!(after.repo.revision, before.repo.revision);
    // A target the project lacks is a clear 400.
    let err = h
        .client
        .submit_dir_to(src.path(), Some("demo"), None, &["nope"])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no target \"nope\""), "{err}");
    h.stop().await;
}

async fn wait_published_empty(h: &TestHub) -> kiln::server::RepoView {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = h.client.repo("demo", "stable").await.unwrap();
        if r.repo.published.is_some() && r.repo.published_revision == r.repo.revision {
            return r;
        }
        assert!(Instant::now() < deadline, "never published: {r:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client looping on `apt-get update` while new versions are published
/// never sees a hash mismatch: new by-hash files go first, InRelease is
/// switched last, and what an earlier InRelease names stays served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apt_updating_during_publishes_never_sees_a_mismatch() {
    let mut h = hub_with_repo().await;
    build_deb(&h, "3.0").await;
    wait_published(&h, "3.0").await;
    let tmp = tempfile::tempdir().unwrap();
    let apt = apt_for(&h, &h.url(), tmp.path()).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Bounded: at most 200 updates and 5 minutes.
    let looper = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(300);
            let mut runs = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst)
                && runs.len() < 200
                && Instant::now() < deadline
            {
                let o = apt.run("apt-get", &["update"]);
                runs.push((o.status.success(), text(&o)));
            }
            (runs, apt)
        })
    };
    let versions: Vec<String> = (1..=12).map(|i| format!("3.{i}")).collect();
    for v in &versions {
        let b = build_deb(&h, v).await;
        assert_eq!(b.detail.build.state, BuildState::Succeeded);
    }
    let last = wait_published(&h, &versions[versions.len() - 1]).await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (runs, apt) = looper.join().unwrap();
    // Not vacuous: several updates fetched a changed index mid-stream.
    let fetched = runs
        .iter()
        .filter(|(_, out)| out.contains("Get:") && out.contains("Packages"))
        .count();
    assert!(
        fetched >= 3,
        "only {fetched} of {} updates fetched indexes",
        runs.len()
    );
    for (ok, out) in &runs {
        assert!(
            *ok && !out.contains("mismatch") && !out.contains("unexpected size"),
            "an update during publishing failed:\n{out}"
        );
    }
    // The looping client ends up with the newest version.
    let o = apt.run("apt-get", &["update"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = apt.run("apt-cache", &["policy", "kiln-hello"]);
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("Candidate: 3.12"),
        "{}",
        text(&o)
    );
    assert!(last.repo.revision >= 13, "{:?}", last.repo);
    h.stop().await;
}

/// Behind a TLS proxy the hub hands out its public address, not the Host
/// it was reached by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repo_lines_use_the_configured_public_url() {
    let mut h = with_demo_repo(
        hub_with(0, |c| {
            c.server.public_url = Some("https://pkgs.example.org".into());
        })
        .await,
    )
    .await;
    let r = h.client.repo("demo", "stable").await.unwrap();
    assert_eq!(
        r.sources.list_line,
        "deb [signed-by=/etc/apt/keyrings/kiln-demo.asc] https://pkgs.example.org/repos/demo/stable stable main"
    );
    assert_eq!(
        r.sources.key_url,
        "https://pkgs.example.org/repos/demo/key.asc"
    );
    h.stop().await;
}
