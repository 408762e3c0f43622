//! The hub end to end through the typed client: builds, logs, artifacts,
//! dedup, verification, credentials and bad input.

use std::time::Duration;

use futures_util::StreamExt;
use kiln::model::{BuildState, Outcome};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn c_program_builds_and_its_artifact_runs() {
    let mut h = hub(1).await;
    let b = h
        .client
        .submit_dir(&examples_hello(), None, None)
        .await
        .unwrap();
    assert_eq!(b.package, "hello");
    assert_eq!(b.project, "default");
    let v = h.client.wait(b.id, BUILD_TIMEOUT).await.unwrap();
    let log = h.client.log_text(b.id).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Succeeded, "log:\n{log}");
    assert_eq!(v.detail.task_list[0].outcome, Some(Outcome::Succeeded));
    assert!(log.contains("cc -O2 -Wall -o hello hello.c"), "{log}");

    let arts = h.client.artifacts(b.id).await.unwrap();
    assert_eq!(arts.len(), 1, "{arts:?}");
    assert_eq!(arts[0].path, "usr/bin/hello");
    assert_eq!(arts[0].mode & 0o777, 0o755);

    // Download it and run it on the host.
    let bytes = h
        .client
        .artifact(b.id, "usr/bin/hello")
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(bytes.len() as u64, arts[0].size);
    let exe = h.dir.path().join("hello");
    std::fs::write(&exe, &bytes).unwrap();
    std::fs::set_permissions(&exe, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(&exe).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "Hello from kiln!\n");

    // The same bytes by digest, plain and as the stored zstd frame.
    let plain = h.client.blob(&arts[0].digest, false).await.unwrap();
    assert_eq!(plain.bytes().await.unwrap(), bytes);
    let z = h.client.blob(&arts[0].digest, true).await.unwrap();
    assert_eq!(
        z.headers()
            .get("content-encoding")
            .unwrap()
            .to_str()
            .unwrap(),
        "zstd"
    );
    let raw = z.bytes().await.unwrap();
    assert_eq!(zstd::decode_all(&raw[..]).unwrap(), bytes.to_vec());

    // The pages show it.
    let page = get_text(&h, &format!("/builds/{}", b.id)).await;
    assert!(
        page.contains("usr/bin/hello") && page.contains("succeeded"),
        "{page}"
    );
    let index = get_text(&h, "/").await;
    assert!(index.contains(&format!("/builds/{}", b.id)), "{index}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_build_ends_failed_with_the_compiler_error_in_its_log() {
    let mut h = hub(1).await;
    let src = script_tree("broken", "cc -o broken broken.c", &["broken"]);
    write_tree(
        src.path(),
        &[(
            "broken.c",
            "int main(void) { return undefined_thing; }\n",
            0o644,
        )],
    );
    let b = h.client.submit_dir(src.path(), None, None).await.unwrap();
    let v = h.client.wait(b.id, BUILD_TIMEOUT).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Failed);
    assert_eq!(v.detail.task_list[0].outcome, Some(Outcome::ExitCode(1)));
    let log = h.client.log_text(b.id).await.unwrap();
    assert!(log.contains("undefined_thing"), "{log}");
    assert!(log.contains("error"), "{log}");
    assert!(h.client.artifacts(b.id).await.unwrap().is_empty());
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_tree_twice_stores_its_blobs_once() {
    // No slots: nothing runs, so only the uploads write to the store.
    let mut h = hub(0).await;
    let src = script_tree("dedup", "true", &["*"]);
    let big: String = (0..50_000).map(|i| format!("line {i}\n")).collect();
    write_tree(
        src.path(),
        &[("data/big.txt", &big, 0o644), ("a.sh", "echo a\n", 0o755)],
    );
    let b1 = h.client.submit_dir(src.path(), None, None).await.unwrap();
    let after_first = blob_count(&h.data());
    assert!(
        after_first >= 4,
        "kiln.toml, big.txt, a.sh and the manifest: {after_first}"
    );
    let b2 = h.client.submit_dir(src.path(), None, None).await.unwrap();
    assert_ne!(b1.id, b2.id);
    assert_eq!(b1.source, b2.source);
    assert_eq!(blob_count(&h.data()), after_first);
    let v = h.client.build(b2.id).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Queued);
    let why = v.waiting.expect("a queued build says why");
    assert!(
        why.starts_with("no enabled worker is online; position 2 of 2"),
        "{why}"
    );
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blob_corrupted_on_disk_is_refused() {
    let mut h = hub(1).await;
    let v = run_script(
        &h,
        "corrupt",
        "head -c 3000000 /dev/urandom > $KILN_OUT/big.bin; echo small > $KILN_OUT/small.txt",
        &["*"],
    )
    .await;
    assert_eq!(v.detail.build.state, BuildState::Succeeded);
    let b = &v.detail.build;
    let arts = h.client.artifacts(b.id).await.unwrap();
    assert_eq!(arts.len(), 2);
    for a in &arts {
        // Replace the stored frame with a valid frame of other content.
        let hex = a.digest.to_string();
        let path = h.data().join("cas/sha256").join(&hex[..2]).join(&hex);
        assert!(path.exists(), "blob at {}", path.display());
        let mut evil = vec![b'x'; a.size as usize];
        evil[0] = b'y';
        std::fs::write(&path, zstd::encode_all(&evil[..], 3).unwrap()).unwrap();

        for zstd_wanted in [false, true] {
            let got = match h.client.blob(&a.digest, zstd_wanted).await {
                Err(e) => {
                    assert_eq!(e.status(), Some(500), "{e}");
                    continue;
                }
                Ok(r) => r.bytes().await,
            };
            assert!(got.is_err(), "{} served complete although corrupt", a.path);
        }
        let got = match h.client.artifact(b.id, &a.path).await {
            Err(e) => {
                assert_eq!(e.status(), Some(500));
                continue;
            }
            Ok(r) => r.bytes().await,
        };
        assert!(got.is_err(), "artifact {} served although corrupt", a.path);
    }
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_streams_live_while_the_build_runs() {
    let mut h = hub(1).await;
    let src = script_tree(
        "live",
        "echo first-line; echo to-stderr >&2; while [ ! -e /tmp/never ]; do sleep 0.1; n=$((n+1)); [ $n -ge 30 ] && break; done; echo last-line",
        &["*"],
    );
    let b = h.client.submit_dir(src.path(), None, None).await.unwrap();
    let mut s = Box::pin(h.client.log(b.id, true).await.unwrap());
    let mut seen = read_until(&mut s, "first-line").await;
    // The build is still running when its first line arrives.
    let v = h.client.build(b.id).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Running, "{seen}");
    while let Some(c) = s.next().await {
        seen.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    assert!(
        seen.contains("to-stderr") && seen.contains("last-line"),
        "{seen}"
    );
    assert!(seen.find("first-line") < seen.find("to-stderr"));
    assert!(seen.contains("task ended: succeeded"), "{seen}");
    // The stored log is the same text.
    assert_eq!(h.client.log_text(b.id).await.unwrap(), seen);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_that_looks_like_html_is_escaped_on_the_page() {
    let mut h = hub(1).await;
    let v = run_script(&h, "xss", "echo '<script>alert(1)</script>'", &["*"]).await;
    let b = &v.detail.build;
    let page = get_text(&h, &format!("/builds/{}", b.id)).await;
    assert!(
        page.contains("&lt;script&gt;alert(1)&lt;/script&gt;"),
        "{page}"
    );
    assert!(!page.contains("<script>alert(1)"), "{page}");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_error_and_leaves_nothing_behind() {
    let mut h = hub_with(0, |c| c.server.max_upload_bytes = 1 << 20).await;
    let before = blob_count(&h.data());
    let submit_raw = |tar: Vec<u8>| {
        let c = h.client.clone();
        async move {
            c.submit_tar(None, Some("bad"), tar.into())
                .await
                .map(|_| ())
        }
    };
    let expect = |r: Result<(), kiln::client::ClientError>, status: u16, needles: &[&str]| {
        let e = r.expect_err("must be refused");
        assert_eq!(e.status(), Some(status), "{e}");
        for n in needles {
            assert!(e.to_string().contains(n), "{e} lacks {n:?}");
        }
    };
    use tar::EntryType as T;

    // Malformed kiln.toml: 400 naming line and field.
    let toml = b"[build]\nscript = \"true\"\nsrcipt = \"x\"\n";
    expect(
        submit_raw(raw_tar(&[("kiln.toml", T::Regular, toml, None)])).await,
        400,
        &["line 3", "srcipt"],
    );
    let toml = b"[build]\nscript = \"true\"\n[outputs]\nfiles = \"usr/bin/*\"\n";
    expect(
        submit_raw(raw_tar(&[("kiln.toml", T::Regular, toml, None)])).await,
        400,
        &["line 4", "files"],
    );
    expect(
        submit_raw(raw_tar(&[("README", T::Regular, b"hi", None)])).await,
        400,
        &["no kiln.toml, debian/control, .spec, .src.rpm or .dsc"],
    );
    let ok_toml: &[u8] = b"[build]\nscript = \"true\"\n";
    // Unsafe paths: 400 naming the path.
    for (entries, needle) in [
        (
            vec![
                ("kiln.toml", T::Regular, ok_toml, None),
                ("../escape", T::Regular, &b"x"[..], None),
            ],
            "../escape",
        ),
        (
            vec![
                ("kiln.toml", T::Regular, ok_toml, None),
                ("/etc/evil", T::Regular, &b"x"[..], None),
            ],
            "/etc/evil",
        ),
        (
            vec![
                ("kiln.toml", T::Regular, ok_toml, None),
                ("link", T::Symlink, &b""[..], Some("../../etc/passwd")),
            ],
            "link",
        ),
        (
            vec![
                ("kiln.toml", T::Regular, ok_toml, None),
                ("abs", T::Symlink, &b""[..], Some("/etc/passwd")),
            ],
            "abs",
        ),
    ] {
        expect(submit_raw(raw_tar(&entries)).await, 400, &[needle]);
    }
    // Over the size limit: 413.
    let big = vec![7u8; 2 << 20];
    expect(
        submit_raw(raw_tar(&[
            ("kiln.toml", T::Regular, ok_toml, None),
            ("big", T::Regular, &big, None),
        ]))
        .await,
        413,
        &["limit"],
    );
    // Unknown build: 404.
    expect(h.client.build(999).await.map(|_| ()), 404, &["999"]);
    expect(h.client.log_text(999).await.map(|_| ()), 404, &["999"]);
    expect(h.client.artifacts(999).await.map(|_| ()), 404, &["999"]);
    // Missing and invalid tokens: 401.
    let src = script_tree("auth", "true", &["*"]);
    expect(
        h.anon.submit_dir(src.path(), None, None).await.map(|_| ()),
        401,
        &["token"],
    );
    let wrong = kiln::client::Client::new(&h.url(), Some("kiln_wrong".into()));
    expect(
        wrong.submit_dir(src.path(), None, None).await.map(|_| ()),
        401,
        &["token"],
    );
    expect(
        h.anon.create_token("x", false).await.map(|_| ()),
        401,
        &["token"],
    );
    // A bad project name.
    expect(
        h.client
            .submit_dir(src.path(), Some("../p"), None)
            .await
            .map(|_| ()),
        400,
        &["project"],
    );

    // Nothing was stored, nothing was recorded.
    assert_eq!(blob_count(&h.data()), before);
    assert!(h.client.list_builds(None, 10).await.unwrap().is_empty());
    let tmp = std::fs::read_dir(h.data().join("cas/tmp")).unwrap().count();
    assert_eq!(tmp, 0, "temp files left in the store");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_made_by_the_admin_work_and_reads_can_be_private() {
    let mut h = hub_with(0, |c| c.server.public_reads = false).await;
    let t = h.client.create_token("alice", false).await.unwrap();
    let alice = kiln::client::Client::new(&h.url(), Some(t.token));
    let src = script_tree("tok", "true", &["*"]);
    let b = alice.submit_dir(src.path(), None, None).await.unwrap();
    assert_eq!(b.submitted_by, "alice");
    // A non-admin cannot make tokens.
    assert_eq!(
        alice
            .create_token("bob", false)
            .await
            .err()
            .unwrap()
            .status(),
        Some(403)
    );
    // Reads need a token now.
    assert_eq!(h.anon.build(b.id).await.err().unwrap().status(), Some(401));
    assert_eq!(alice.build(b.id).await.unwrap().detail.build.id, b.id);
    h.stop().await;
}

/// Fair share: a 200-build mass rebuild in one project does not hold back a
/// single build of another project by more than one task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mass_rebuild_does_not_starve_another_project() {
    let mut h = hub(1).await;
    let slow = script_tree("mass", "sleep 2", &[]);
    let mut mass = Vec::new();
    for _ in 0..200 {
        mass.push(
            h.client
                .submit_dir(slow.path(), Some("mass"), None)
                .await
                .unwrap(),
        );
    }
    // The mass rebuild holds the only slot.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while h.client.build(mass[0].id).await.unwrap().detail.build.state != BuildState::Running {
        assert!(
            std::time::Instant::now() < deadline,
            "the first build never ran"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let quick = script_tree("one", "true", &[]);
    let one = h
        .client
        .submit_dir(quick.path(), Some("small"), None)
        .await
        .unwrap();
    let why = h.client.build(one.id).await.unwrap().waiting.unwrap();
    assert!(
        why.contains("position 1 of 1 in project small's queue") && why.contains("2 projects"),
        "{why}"
    );
    let done = h
        .client
        .wait(one.id, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(done.detail.build.state, BuildState::Succeeded);
    // It ran right after the first mass build: the second had not started.
    let second = h.client.build(mass[1].id).await.unwrap();
    let started_one = done.detail.build.started.unwrap();
    assert!(
        second.detail.build.started.is_none_or(|s| s >= started_one),
        "a second mass build started before the small project's: {second:?}"
    );
    h.stop().await;
}

/// Admins cancel and re-queue tasks: a running sandbox is killed at once,
/// an ended task runs again as a new attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admins_cancel_and_requeue_tasks() {
    let mut h = hub(1).await;
    let long = script_tree("long", "sleep 307", &[]);
    let b = h.client.submit_dir(long.path(), None, None).await.unwrap();
    let task = b.tasks[0];
    let wait_state = |want: BuildState| {
        let c = h.client.clone();
        async move {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                let v = c.build(b.id).await.unwrap();
                if v.detail.task_list[0].state == want {
                    return v;
                }
                assert!(std::time::Instant::now() < deadline, "never {want}: {v:?}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    wait_state(BuildState::Running).await;
    // Running in the database comes before the sandbox's process exists.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while host_processes_with("sleep 307").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the build never started"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Ordinary tokens may not.
    let user = h.client.create_token("bob", false).await.unwrap();
    let bob = kiln::client::Client::new(&h.url(), Some(user.token));
    assert_eq!(bob.cancel_task(task).await.unwrap_err().status(), Some(403));

    let cancelled = h.client.cancel_task(task).await.unwrap();
    assert_eq!(cancelled.state, BuildState::Cancelled);
    assert_no_process_with("sleep 307");
    let v = h.client.build(b.id).await.unwrap();
    assert_eq!(v.detail.task_list[0].outcome, Some(Outcome::Cancelled));
    let err = h.client.cancel_task(task).await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("already ended"), "{err}");

    // Re-queued: it runs again as attempt 2; cancelling the build stops it.
    h.client.requeue_task(task).await.unwrap();
    let v = wait_state(BuildState::Running).await;
    assert_eq!(v.detail.task_list[0].attempt, 2);
    let again = h.client.cancel_build(b.id).await.unwrap();
    assert_eq!(again.state, BuildState::Cancelled);
    assert_no_process_with("sleep 307");

    // A failed task re-queued runs again and fails again.
    let bad = script_tree("bad", "exit 3", &[]);
    let fb = h.client.submit_dir(bad.path(), None, None).await.unwrap();
    let v = h.client.wait(fb.id, BUILD_TIMEOUT).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Failed);
    let q = h.client.requeue_task(fb.tasks[0]).await.unwrap();
    assert!(
        matches!(q.state, BuildState::Queued | BuildState::Running),
        "{q:?}"
    );
    let v = h.client.wait(fb.id, BUILD_TIMEOUT).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Failed);
    assert_eq!(v.detail.task_list[0].attempt, 2);
    assert_eq!(v.detail.task_list[0].outcome, Some(Outcome::ExitCode(3)));
    assert_eq!(
        h.client.cancel_task(999_999).await.unwrap_err().status(),
        Some(404)
    );
    h.stop().await;
}
