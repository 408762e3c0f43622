//! The remote worker protocol against the real hub, spoken by the typed
//! client as a light worker: long-poll lease, source blobs by digest,
//! heartbeat, upload of what the hub lacks, and a fenced end.

use std::time::{Duration, Instant};

use kiln::cas::Digest;
use kiln::model::{BuildState, Outcome};
use kiln::remote::{EndReport, OutputFile};

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_light_worker_leases_runs_and_ends_a_task_under_its_fence() {
    // No local slots: only the remote protocol runs tasks.
    let mut h = hub(0).await;
    let src = script_tree("remote", "true", &["*"]);
    let b = h.client.submit_dir(src.path(), None, None).await.unwrap();

    let lease = h
        .client
        .worker_lease("w1", 5, None)
        .await
        .unwrap()
        .expect("a task");
    assert_eq!(lease.build.id, b.id);
    assert_eq!(lease.task.state, BuildState::Running);
    assert_eq!(lease.task.worker.as_deref(), Some("w1"));
    // The source tree is fetched by digest.
    let manifest = reqwest::get(format!("{}/cas/sha256/{}", h.url(), lease.build.source))
        .await
        .unwrap();
    assert!(manifest.status().is_success());
    assert_eq!(
        Digest::of(&manifest.bytes().await.unwrap()),
        lease.build.source
    );
    // Nothing else queued: the long poll ends empty after its wait.
    let t = Instant::now();
    assert!(
        h.client
            .worker_lease("w2", 1, None)
            .await
            .unwrap()
            .is_none()
    );
    assert!(t.elapsed() >= Duration::from_millis(900));

    h.client
        .worker_heartbeat(lease.task.id, lease.fence)
        .await
        .unwrap();
    // Outputs: only what the hub lacks is uploaded, and it must hash right.
    let out = b"built remotely\n".to_vec();
    let log = b"remote log\n".to_vec();
    let (od, ld) = (Digest::of(&out), Digest::of(&log));
    assert_eq!(
        h.client.worker_missing(&[od, ld]).await.unwrap(),
        vec![od, ld]
    );
    let err = h
        .client
        .worker_upload(&od, b"forged".to_vec())
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    let report = |fence| EndReport {
        fence,
        outcome: Outcome::Succeeded,
        log: Some(ld),
        outputs: None,
        files: vec![OutputFile {
            path: "out.txt".into(),
            digest: od,
            size: out.len() as u64,
            mode: 0o644,
        }],
    };
    // An end naming blobs the hub lacks is refused and changes nothing.
    let err = h
        .client
        .worker_end(lease.task.id, &report(lease.fence))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("upload it first"), "{err}");
    h.client.worker_upload(&od, out.clone()).await.unwrap();
    h.client.worker_upload(&ld, log.clone()).await.unwrap();
    assert!(h.client.worker_missing(&[od, ld]).await.unwrap().is_empty());

    // The task is re-queued (as if the lease had been lost); the late
    // worker's end is refused by the fence, the new lease's accepted.
    h.client.requeue_task(lease.task.id).await.unwrap();
    let err = h
        .client
        .worker_heartbeat(lease.task.id, lease.fence)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    let again = h
        .client
        .worker_lease("w2", 5, None)
        .await
        .unwrap()
        .expect("re-queued");
    assert!(again.fence > lease.fence);
    let err = h
        .client
        .worker_end(lease.task.id, &report(lease.fence))
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    let done = h
        .client
        .worker_end(again.task.id, &report(again.fence))
        .await
        .unwrap();
    assert_eq!(done.state, BuildState::Succeeded);
    let v = h.client.build(b.id).await.unwrap();
    assert_eq!(v.detail.task_list[0].worker.as_deref(), Some("w2"));
    assert_eq!(v.detail.task_list[0].attempt, 2);
    let got = reqwest::get(format!(
        "{}/api/v1/builds/{}/artifacts/out.txt",
        h.url(),
        b.id
    ))
    .await
    .unwrap()
    .bytes()
    .await
    .unwrap();
    assert_eq!(&got[..], &out[..]);
    assert_eq!(h.client.log_text(b.id).await.unwrap(), "remote log\n");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_worker_gets_a_task_as_soon_as_it_is_queued() {
    let mut h = hub(0).await;
    let c = h.client.clone();
    let waiter = tokio::spawn(async move { c.worker_lease("w1", 20, None).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let src = script_tree("late", "true", &["*"]);
    let b = h.client.submit_dir(src.path(), None, None).await.unwrap();
    let t = Instant::now();
    let lease = waiter.await.unwrap().unwrap().expect("the new task");
    assert_eq!(lease.build.id, b.id);
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    // An ordinary token is not a worker.
    let user = h.client.create_token("eve", false).await.unwrap();
    let eve = kiln::client::Client::new(&h.url(), Some(user.token));
    assert_eq!(
        eve.worker_lease("w9", 0, None).await.unwrap_err().status(),
        Some(403)
    );
    h.stop().await;
}

fn start_worker(h: &TestHub, name: &str, data: &std::path::Path) -> std::process::Child {
    std::process::Command::new(crate::kiln_exe())
        .args([
            "worker",
            "--hub",
            &h.url(),
            "--token",
            &h.token,
            "--slots",
            "1",
        ])
        .args(["--name", name, "--data"])
        .arg(data)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(data.with_extension("log")).unwrap())
        .spawn()
        .unwrap()
}

/// `kiln worker` as its own process runs the hub's tasks in its sandboxes
/// and reports them; the hub has no local slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kiln_worker_process_runs_the_hubs_builds() {
    let mut h = hub(0).await;
    let data = tempfile::tempdir().unwrap();
    let mut worker = start_worker(&h, "w-remote", &data.path().join("w"));
    let src = script_tree(
        "far",
        "echo \"built on $(hostname)\" > $KILN_OUT/where.txt; echo remote-output-line",
        &["*.txt"],
    );
    let ids = submit_n(&h, src.path(), 2).await;
    for id in ids {
        let v = h.client.wait(id, BUILD_TIMEOUT).await.unwrap();
        let log = h.client.log_text(id).await.unwrap_or_default();
        let wlog = std::fs::read_to_string(data.path().join("w.log")).unwrap_or_default();
        assert_eq!(v.detail.build.state, BuildState::Succeeded, "{log}\n{wlog}");
        assert_eq!(v.detail.task_list[0].worker.as_deref(), Some("w-remote"));
        assert!(log.contains("remote-output-line"), "{log}");
        let got = reqwest::get(format!(
            "{}/api/v1/builds/{id}/artifacts/where.txt",
            h.url()
        ))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
        assert_eq!(got, "built on kiln\n");
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = worker.wait().unwrap();
    assert!(status.success(), "{status}");
    h.stop().await;
}

/// A worker killed mid-task: its lease runs out, the task is re-queued as
/// an infrastructure failure and finishes on another worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_of_a_killed_worker_finishes_on_another() {
    let mut h = hub_with(0, |c| c.build.lease_secs = 2).await;
    let data = tempfile::tempdir().unwrap();
    let mut first = start_worker(&h, "w-first", &data.path().join("a"));
    let src = script_tree(
        "moved",
        "sleep 3; echo finished > $KILN_OUT/x.txt",
        &["*.txt"],
    );
    let b = h.client.submit_dir(src.path(), None, None).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let v = h.client.build(b.id).await.unwrap();
        if v.detail.task_list[0].worker.as_deref() == Some("w-first") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the first worker never took it: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let mut second = start_worker(&h, "w-second", &data.path().join("b"));
    let v = h.client.wait(b.id, BUILD_TIMEOUT).await.unwrap();
    let wlog = std::fs::read_to_string(data.path().join("b.log")).unwrap_or_default();
    assert_eq!(v.detail.build.state, BuildState::Succeeded, "{v:?}\n{wlog}");
    let t = &v.detail.task_list[0];
    assert_eq!(t.worker.as_deref(), Some("w-second"));
    assert_eq!(t.attempt, 2);
    // The directory: the first worker is offline with the loss counted.
    let first = h.client.worker("w-first").await.unwrap();
    assert_eq!(
        first.state,
        kiln::workers::WorkerState::Offline,
        "{first:?}"
    );
    assert_eq!(first.stats.infra, 1, "{first:?}");
    assert_eq!(first.qos.infra_failures, 1);
    let second_view = h.client.worker("w-second").await.unwrap();
    assert_eq!(second_view.stats.succeeded, 1, "{second_view:?}");
    assert!(
        second_view.qos.rating > first.qos.rating,
        "{second_view:?} {first:?}"
    );
    second.kill().unwrap();
    second.wait().unwrap();
    h.stop().await;
}

/// A remote task's log reaches followers on the hub while it runs, and the
/// stored log is the same text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_tasks_log_streams_live_to_the_hub() {
    use futures_util::StreamExt;
    let mut h = hub(0).await;
    let data = tempfile::tempdir().unwrap();
    let mut worker = start_worker(&h, "w-live", &data.path().join("w"));
    let src = script_tree(
        "livefar",
        "echo first-line; n=0; while [ $n -lt 40 ]; do sleep 0.1; n=$((n+1)); done; echo last-line",
        &[],
    );
    let b = h.client.submit_dir(src.path(), None, None).await.unwrap();
    let mut s = Box::pin(h.client.log(b.id, true).await.unwrap());
    let mut seen = read_until(&mut s, "first-line").await;
    let v = h.client.build(b.id).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Running, "{seen}");
    assert!(!seen.contains("last-line"), "{seen}");
    while let Some(c) = s.next().await {
        seen.push_str(&String::from_utf8_lossy(&c.unwrap()));
    }
    assert!(seen.contains("last-line"), "{seen}");
    let v = h.client.wait(b.id, BUILD_TIMEOUT).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Succeeded);
    assert_eq!(h.client.log_text(b.id).await.unwrap(), seen);
    worker.kill().unwrap();
    worker.wait().unwrap();
    h.stop().await;
}

/// `kiln worker --self-update` running another build of kiln fetches the
/// hub's binary (digest-checked), restarts into it when idle, and goes on
/// building.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_self_updating_worker_restarts_into_the_hubs_binary() {
    let mut h = hub(0).await;
    let dir = tempfile::tempdir().unwrap();
    // An "older" kiln: the same program with other bytes, so its digest
    // (and version) differs from the hub's.
    let old = dir.path().join("kiln-old");
    let mut bytes = std::fs::read(crate::kiln_exe()).unwrap();
    bytes.extend_from_slice(b"\0an older kiln\0");
    std::fs::write(&old, &bytes).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&old, std::fs::Permissions::from_mode(0o755)).unwrap();
    let hub_version = kiln::workers::version_of(&crate::kiln_exe());
    assert_ne!(kiln::workers::version_of(&old), hub_version);
    let log = dir.path().join("w.log");
    let mut worker = std::process::Command::new(&old)
        .args(["worker", "--self-update", "--slots", "1", "--name", "w-upd"])
        .args(["--hub", &h.url(), "--token", &h.token, "--data"])
        .arg(dir.path().join("data"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let reported = h
            .client
            .worker("w-upd")
            .await
            .ok()
            .and_then(|w| w.info)
            .map(|i| i.version);
        if reported.as_deref() == Some(hub_version.as_str()) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never updated: {reported:?}\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The file on disk is now the hub's binary, and the same process (it
    // exec'd) builds.
    assert_eq!(
        kiln::workers::file_digest(&old).unwrap(),
        kiln::workers::file_digest(&crate::kiln_exe()).unwrap()
    );
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains("restarting into")
    );
    let src = script_tree("after-update", "echo fresh", &[]);
    let b = h.client.submit_dir(src.path(), None, None).await.unwrap();
    let v = h.client.wait(b.id, BUILD_TIMEOUT).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Succeeded);
    assert_eq!(v.detail.task_list[0].worker.as_deref(), Some("w-upd"));
    worker.kill().unwrap();
    worker.wait().unwrap();
    h.stop().await;
}
