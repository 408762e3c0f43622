//! Buildroots through the hub: importing a root tarball (unpacked inside
//! the sandbox), builds on a copy-on-write view of it, and the bad inputs
//! (an unreachable mirror, names, a hostile tarball) that must fail clearly
//! and leave nothing behind.

use std::time::{Duration, Instant};

use kiln::buildroot::CreateRequest;
use kiln::model::{BuildState, BuildrootState};
use kiln::server::TargetRequest;

use crate::harness::*;

pub(crate) async fn wait_done(h: &TestHub, name: &str) -> kiln::server::BuildrootView {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let b = h.client.buildroot(name).await.unwrap();
        if b.buildroot.state != BuildrootState::Creating {
            return b;
        }
        assert!(Instant::now() < deadline, "buildroot job too slow");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A tiny root: the host's dash and the two libraries it needs, merged-/usr
/// style; with `escape`, plus a hostile member that tries to climb out.
fn tiny_root_tar(escape: Option<&str>) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    let dir = |b: &mut tar::Builder<Vec<u8>>, p: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        b.append_data(&mut h, p, std::io::empty()).unwrap();
    };
    let link = |b: &mut tar::Builder<Vec<u8>>, p: &str, to: &str| {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        b.append_link(&mut h, p, to).unwrap();
    };
    for d in [
        "usr",
        "usr/bin",
        "usr/lib",
        "usr/lib/x86_64-linux-gnu",
        "etc",
        "tmp",
        "lib64",
    ] {
        dir(&mut b, d);
    }
    link(&mut b, "bin", "usr/bin");
    link(&mut b, "lib", "usr/lib");
    for (host, inside) in [
        ("/usr/bin/dash", "usr/bin/dash"),
        (
            "/lib/x86_64-linux-gnu/libc.so.6",
            "usr/lib/x86_64-linux-gnu/libc.so.6",
        ),
        (
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
            "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        ),
    ] {
        let mut f = std::fs::File::open(host).unwrap();
        b.append_file(inside, &mut f).unwrap();
    }
    link(&mut b, "usr/bin/sh", "dash");
    link(
        &mut b,
        "lib64/ld-linux-x86-64.so.2",
        "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    );
    let mut out = b.into_inner().unwrap();
    if let Some(escape) = escape {
        // Replace the end-of-archive blocks with a member named ../../…
        out.truncate(out.len() - 1024);
        out.extend(raw_tar(&[(
            escape,
            tar::EntryType::Regular,
            b"escaped",
            None,
        )]));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_imported_root_runs_builds_and_its_hostile_member_stays_inside() {
    let mut h = hub(1).await;
    let tmp = tempfile::tempdir().unwrap();
    let escaped = format!("/tmp/kiln-escaped-{}", std::process::id());

    // A member climbing out: the import fails naming it, and leaves nothing.
    let evil = tmp.path().join("evil.tar");
    std::fs::write(&evil, tiny_root_tar(Some(&format!("../../../..{escaped}")))).unwrap();
    h.client.import_buildroot("evil", &evil).await.unwrap();
    let b = wait_done(&h, "evil").await;
    let log = h.client.buildroot_log("evil").await.unwrap();
    assert!(
        matches!(b.buildroot.state, BuildrootState::Failed(_)),
        "{b:?}"
    );
    assert!(log.contains("Member name contains '..'"), "{log}");
    let left: Vec<_> = std::fs::read_dir(h.data().join("buildroots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("evil") && !n.ends_with(".log"))
        .collect();
    assert!(left.is_empty(), "a failed import left {left:?}");
    assert!(
        !std::path::Path::new(&escaped).exists(),
        "a tar member escaped the root"
    );

    // The same root without it, zstd-compressed, imports.
    let tar_path = tmp.path().join("root.tar");
    std::fs::write(&tar_path, tiny_root_tar(None)).unwrap();
    let o = std::process::Command::new("zstd")
        .args(["-q", "-f"])
        .arg(&tar_path)
        .output()
        .unwrap();
    assert!(o.status.success());
    let zst = tmp.path().join("root.tar.zst");
    h.client.import_buildroot("tiny", &zst).await.unwrap();
    let b = wait_done(&h, "tiny").await;
    let log = h.client.buildroot_log("tiny").await.unwrap();
    assert_eq!(b.buildroot.state, BuildrootState::Ready, "{log}");
    assert!(b.path.join("usr/bin/dash").is_file());

    h.client
        .add_target(
            "imp",
            &TargetRequest {
                name: "tiny".into(),
                buildroot: "tiny".into(),
                arch: "amd64".into(),
                repo: None,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let src = script_tree(
        "inside",
        "echo *; cd /usr/bin; echo *; echo written > /usr/bin/new; echo ok > $KILN_OUT/ok",
        &["*"],
    );
    let run = |h: &TestHub| {
        let (c, p) = (h.client.clone(), src.path().to_owned());
        async move {
            let b = c
                .submit_dir_to(&p, Some("imp"), None, &["tiny"])
                .await
                .unwrap();
            c.wait(b.id, BUILD_TIMEOUT).await.unwrap()
        }
    };
    let v = run(&h).await;
    let log = h.client.log_text(v.detail.build.id).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Succeeded, "{log}");
    // The imported root, not the host's: only dash and sh in /usr/bin.
    assert!(log.contains("\ndash sh\n"), "{log}");
    // The write went to the task's own layer: neither the stored root nor
    // the next build sees it.
    assert!(!b.path.join("usr/bin/new").exists());
    let v = run(&h).await;
    let log = h.client.log_text(v.detail.build.id).await.unwrap();
    assert!(log.contains("\ndash sh\n"), "{log}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bootstrap_from_an_unreachable_mirror_fails_and_leaves_nothing() {
    let mut h = hub(1).await;
    let req = CreateRequest {
        name: "broken".into(),
        bootstrap: "debian".into(),
        suite: "bookworm".into(),
        // Nothing listens on port 1 of loopback.
        mirror: Some("http://127.0.0.1:1/debian".into()),
        include: vec![],
        ..Default::default()
    };
    h.client.create_buildroot(&req).await.unwrap();
    let b = wait_done(&h, "broken").await;
    let BuildrootState::Failed(why) = &b.buildroot.state else {
        panic!("{b:?}");
    };
    assert!(why.contains("mmdebstrap"), "{why}");
    let log = h.client.buildroot_log("broken").await.unwrap();
    assert!(log.contains("kiln: failed"), "{log}");
    let dir = h.data().join("buildroots");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.ends_with(".log"))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    // A failed name can be tried again, and deleted.
    h.client.delete_buildroot("broken").await.unwrap();
    assert!(h.client.buildroot("broken").await.is_err());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_buildroot_target_and_source_requests_name_what_is_wrong() {
    let mut h = hub(1).await;
    let create = |name: &str, bootstrap: &str, mirror: Option<&str>| CreateRequest {
        name: name.into(),
        bootstrap: bootstrap.into(),
        suite: "bookworm".into(),
        mirror: mirror.map(String::from),
        include: vec![],
        ..Default::default()
    };
    for (req, want) in [
        (create("host", "debian", None), "built in"),
        (create("x", "arch", None), "bootstrap \"arch\""),
        (create("x", "debian", Some("ftp://m/debian")), "mirror"),
        (create("../x", "debian", None), "not a valid name"),
    ] {
        let err = h.client.create_buildroot(&req).await.unwrap_err();
        assert!(err.to_string().contains(want), "{err}");
    }
    // Buildroots are hub-wide: an ordinary token may not make or remove them.
    let user = h.client.create_token("alice", false).await.unwrap();
    let alice = kiln::client::Client::new(&h.url(), Some(user.token));
    let err = alice
        .create_buildroot(&create("mine", "debian", None))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(err.to_string().contains("only an admin can"), "{err}");
    assert_eq!(
        alice.delete_buildroot("mine").await.unwrap_err().status(),
        Some(403)
    );
    assert!(h.client.buildroot("mine").await.is_err());
    let target = |buildroot: &str, arch: &str| TargetRequest {
        name: "t".into(),
        buildroot: buildroot.into(),
        arch: arch.into(),
        repo: None,
        ..Default::default()
    };
    let err = h
        .client
        .add_target("p", &target("nope", "amd64"))
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("buildroot \"nope\" does not exist"),
        "{err}"
    );
    let err = h
        .client
        .add_target("p", &target("host", "vax"))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("arch \"vax\""), "{err}");
    // A tree with neither kiln.toml nor debian/.
    let empty = tempfile::tempdir().unwrap();
    write_tree(empty.path(), &[("README", "nothing to build\n", 0o644)]);
    let err = h
        .client
        .submit_dir(empty.path(), None, None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("no kiln.toml, debian/control, .spec, .src.rpm or .dsc"),
        "{err}"
    );
    // A Debian tree in a project without a buildroot target.
    let deb = tempfile::tempdir().unwrap();
    write_tree(
        deb.path(),
        &[("debian/control", "Source: demo\n\nPackage: demo\n", 0o644)],
    );
    let err = h
        .client
        .submit_dir(deb.path(), Some("p"), None)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("no target with a buildroot"),
        "{err}"
    );
    write_tree(deb.path(), &[("debian/control", "Package: demo\n", 0o644)]);
    let err = h
        .client
        .submit_dir(deb.path(), Some("p"), None)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no Source: field"), "{err}");

    // A .dsc whose file differs from its checksum, or lacks a file.
    let dsc_dir = tempfile::tempdir().unwrap();
    let orig = b"not really a tarball\n";
    let sha = kiln::cas::Digest::of(orig).to_string();
    let dsc = |name: &str, size: usize| {
        format!(
            "Format: 3.0 (quilt)\nSource: demo\nVersion: 1.0-1\nChecksums-Sha256:\n {sha} {size} {name}\n"
        )
    };
    write_tree(
        dsc_dir.path(),
        &[
            (
                "demo_1.0-1.dsc",
                &dsc("demo_1.0.orig.tar.gz", orig.len()),
                0o644,
            ),
            ("demo_1.0.orig.tar.gz", "not really a tarbalX\n", 0o644),
        ],
    );
    let dsc_path = dsc_dir.path().join("demo_1.0-1.dsc");
    let err = h
        .client
        .submit_dir(&dsc_path, Some("p"), None)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(
        err.to_string().contains("demo_1.0.orig.tar.gz")
            && err.to_string().contains("does not match"),
        "{err}"
    );
    write_tree(
        dsc_dir.path(),
        &[("demo_1.0-1.dsc", &dsc("demo_1.0.debian.tar.xz", 3), 0o644)],
    );
    let err = h
        .client
        .submit_dir(&dsc_path, Some("p"), None)
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("demo_1.0.debian.tar.xz, which it names, is not beside it"),
        "{err}"
    );

    // A git ref that does not exist; a URL that is not a network one.
    let repos = tempfile::tempdir().unwrap();
    let repo = repos.path().join("demo");
    write_tree(
        &repo,
        &[("kiln.toml", "[build]\nscript = \"true\"\n", 0o644)],
    );
    git_commit_all(&repo, "v1");
    let server = GitServer::start(repos.path());
    let err = h
        .client
        .submit_git(
            &format!("{}/demo", server.url),
            Some("no-such-tag"),
            None,
            None,
            &[],
        )
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(
        err.to_string()
            .contains("git ref \"no-such-tag\" does not exist"),
        "{err}"
    );
    for url in ["file:///etc", repo.to_str().unwrap(), "ext::sh -c id"] {
        let err = h
            .client
            .submit_git(url, None, None, None, &[])
            .await
            .unwrap_err();
        assert!(err.to_string().contains("only https://"), "{url}: {err}");
    }
    // None of it left a build behind.
    assert!(h.client.list_builds(None, 10).await.unwrap().is_empty());
    h.stop().await;
}
