//! The worker directory, routing, join tokens and priority against the
//! real hub, with light workers speaking the real protocol.

use kiln::client::Client;
use kiln::model::{BuildState, Outcome};
use kiln::remote::EndReport;
use kiln::server::TargetRequest;
use kiln::workers::{AdminState, WorkerInfo, WorkerState};

use crate::harness::*;

fn info(arch: &str, memory_gib: u64) -> WorkerInfo {
    WorkerInfo {
        arch: arch.into(),
        os: "Debian GNU/Linux 12 (bookworm)".into(),
        kernel: "6.1.0".into(),
        cores: 4,
        memory_bytes: memory_gib << 30,
        disk_free_bytes: 100 << 30,
        version: kiln::workers::self_version(),
        features: vec![],
        slots: 1,
        buildroots: false,
    }
}

fn end(fence: u64, outcome: Outcome) -> EndReport {
    EndReport {
        fence,
        outcome,
        log: None,
        outputs: None,
        files: vec![],
    }
}

/// A join token enrols exactly one worker, is stored hashed, and stops
/// working the moment it is revoked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_tokens_enrol_one_worker_and_can_be_revoked() {
    let mut h = hub(0).await;
    let created = h.client.create_worker_token("builder1").await.unwrap();
    let join = kiln::workers::JoinToken::parse(&created.token)
        .unwrap()
        .expect("a join token");
    // No TLS on this hub: nothing to pin.
    assert_eq!(join.fingerprint, None);
    // Only its hash is stored: the secret is nowhere in the database file.
    let db = std::fs::read(h.data().join("kiln.redb")).unwrap();
    assert!(
        !db.windows(join.secret.len())
            .any(|w| w == join.secret.as_bytes())
    );
    // A second live token for the same worker is refused.
    let err = h.client.create_worker_token("builder1").await.unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    let w = kiln::cli::worker_client(&h.url(), &created.token).unwrap();
    let who = w.worker_whoami().await.unwrap();
    assert_eq!(who.worker.as_deref(), Some("builder1"));
    // It leases as its own worker only.
    let src = script_tree("tok", "true", &[]);
    let b = h.client.submit_dir(src.path(), None, None).await.unwrap();
    let err = w.worker_lease("other", 0, None).await.unwrap_err();
    assert_eq!(err.status(), Some(403), "{err}");
    assert!(
        err.to_string().contains("enrols worker \"builder1\""),
        "{err}"
    );
    let l = w
        .worker_lease("builder1", 5, None)
        .await
        .unwrap()
        .expect("the task");
    assert_eq!(l.build.id, b.id);
    // A join token is not an API token: it cannot submit or administer.
    let as_user = Client::new(&h.url(), Some(join.secret.clone()));
    assert_eq!(
        as_user
            .submit_dir(src.path(), None, None)
            .await
            .unwrap_err()
            .status(),
        Some(401)
    );
    // Revoked: the very next request is refused, naming why.
    h.client.revoke_worker_token("builder1").await.unwrap();
    let err = w.worker_heartbeat(l.task.id, l.fence).await.unwrap_err();
    assert_eq!(err.status(), Some(401), "{err}");
    assert!(err.to_string().contains("revoked"), "{err}");
    let tokens = h.client.worker_tokens().await.unwrap();
    assert_eq!(tokens.len(), 1);
    assert!(tokens[0].revoked.is_some());
    // Bad input: unknown worker, reserved name, ordinary token.
    assert_eq!(
        h.client
            .revoke_worker_token("nobody")
            .await
            .unwrap_err()
            .status(),
        Some(404)
    );
    assert_eq!(
        h.client
            .create_worker_token("local")
            .await
            .unwrap_err()
            .status(),
        Some(400)
    );
    let user = h.client.create_token("eve", false).await.unwrap();
    let eve = Client::new(&h.url(), Some(user.token));
    assert_eq!(
        eve.create_worker_token("sneaky")
            .await
            .unwrap_err()
            .status(),
        Some(403)
    );
    h.stop().await;
}

/// Tasks go only to workers that meet their target's needs; a task no
/// worker can run says why it waits, in the words routing uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_by_arch_and_resources_and_why_waiting_says_why() {
    let mut h = hub(0).await;
    let target = |name: &str, arch: &str, mem: u64| TargetRequest {
        name: name.into(),
        buildroot: "host".into(),
        arch: arch.into(),
        min_memory_bytes: mem << 30,
        ..Default::default()
    };
    h.client
        .add_target("z", &target("s390x", "s390x", 0))
        .await
        .unwrap();
    h.client
        .add_target("z", &target("huge", "amd64", 64))
        .await
        .unwrap();
    let src = script_tree("routed", "true", &[]);
    let on_z = h
        .client
        .submit_dir_to(src.path(), Some("z"), None, &["s390x"])
        .await
        .unwrap();
    let huge = h
        .client
        .submit_dir_to(src.path(), Some("z"), None, &["huge"])
        .await
        .unwrap();
    // An amd64 worker with 24 GiB shows up and asks: it gets neither.
    let amd = info("amd64", 24);
    assert!(
        h.client
            .worker_lease("amd", 1, Some(&amd))
            .await
            .unwrap()
            .is_none()
    );
    let why = h.client.build(on_z.id).await.unwrap().waiting.unwrap();
    assert!(
        why.starts_with("no enabled worker with arch s390x"),
        "{why}"
    );
    let why = h.client.build(huge.id).await.unwrap().waiting.unwrap();
    assert!(
        why.starts_with("needs 64 GiB memory; the largest worker has 24 GiB"),
        "{why}"
    );
    // An s390x worker gets the s390x task, and only that one.
    let z = info("s390x", 8);
    let l = h
        .client
        .worker_lease("zbox", 2, Some(&z))
        .await
        .unwrap()
        .expect("the s390x task");
    assert_eq!(l.build.id, on_z.id);
    h.client
        .worker_end(l.task.id, &end(l.fence, Outcome::Succeeded))
        .await
        .unwrap();
    assert!(
        h.client
            .worker_lease("zbox", 1, Some(&z))
            .await
            .unwrap()
            .is_none()
    );
    // A big enough amd64 worker takes the big task.
    let big = info("amd64", 128);
    let l = h
        .client
        .worker_lease("bigbox", 2, Some(&big))
        .await
        .unwrap()
        .expect("the 64 GiB task");
    assert_eq!(l.build.id, huge.id);
    // The directory shows all three with what they reported.
    let dir = h.client.workers().await.unwrap();
    let names: Vec<&str> = dir.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["amd", "bigbox", "zbox"]);
    let zbox = h.client.worker("zbox").await.unwrap();
    assert_eq!(zbox.info.as_ref().unwrap().arch, "s390x");
    assert_eq!(zbox.stats.succeeded, 1);
    assert_eq!(zbox.qos.success_rate, Some(1.0));
    assert_eq!(
        h.client.worker("bigbox").await.unwrap().state,
        WorkerState::Busy
    );
    // Bad input.
    let bad = TargetRequest {
        features: vec!["no spaces".into()],
        ..target("f", "amd64", 0)
    };
    assert_eq!(
        h.client.add_target("z", &bad).await.unwrap_err().status(),
        Some(400)
    );
    assert_eq!(
        h.client.worker("ghost").await.unwrap_err().status(),
        Some(404)
    );
    h.stop().await;
}

/// Drain stops new leases and lets the running task finish; disable
/// re-queues what the worker runs (its heartbeat gets 409); enable
/// restores it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_disable_and_enable_a_worker() {
    let mut h = hub(0).await;
    let me = info("amd64", 8);
    let src = script_tree("drained", "true", &[]);
    let a = h.client.submit_dir(src.path(), None, None).await.unwrap();
    let b = h.client.submit_dir(src.path(), None, None).await.unwrap();
    let la = h
        .client
        .worker_lease("w", 2, Some(&me))
        .await
        .unwrap()
        .expect("a");
    assert_eq!(la.build.id, a.id);
    let v = h.client.set_worker("w", "drain").await.unwrap();
    assert_eq!(v.state, WorkerState::Draining);
    assert_eq!(v.running, 1);
    // Draining: no new task, but the running one's end is accepted.
    assert!(
        h.client
            .worker_lease("w", 1, Some(&me))
            .await
            .unwrap()
            .is_none()
    );
    h.client
        .worker_heartbeat(la.task.id, la.fence)
        .await
        .unwrap();
    h.client
        .worker_end(la.task.id, &end(la.fence, Outcome::Succeeded))
        .await
        .unwrap();
    h.client.set_worker("w", "enable").await.unwrap();
    let lb = h
        .client
        .worker_lease("w", 2, Some(&me))
        .await
        .unwrap()
        .expect("b");
    assert_eq!(lb.build.id, b.id);
    // Disabled mid-task: the task goes back to the queue for someone else.
    let v = h.client.set_worker("w", "disable").await.unwrap();
    assert_eq!(
        (v.state, v.admin),
        (WorkerState::Disabled, AdminState::Disabled)
    );
    let err = h
        .client
        .worker_heartbeat(lb.task.id, lb.fence)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert_eq!(
        h.client.build(b.id).await.unwrap().detail.build.state,
        BuildState::Queued
    );
    let other = h
        .client
        .worker_lease("w2", 2, Some(&me))
        .await
        .unwrap()
        .expect("b again");
    assert_eq!(other.build.id, b.id);
    assert_eq!(other.task.attempt, 2);
    let err = h.client.set_worker("w", "explode").await.unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");
    h.stop().await;
}

/// An admin's priority puts a build ahead of older ones in its project and
/// ahead of fair share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn priority_moves_a_build_to_the_front() {
    let mut h = hub(0).await;
    let src = script_tree("prio", "true", &[]);
    let ids = submit_n(&h, src.path(), 3).await;
    let other = h
        .client
        .submit_dir(src.path(), Some("other"), None)
        .await
        .unwrap();
    h.client.set_priority(ids[2], 50).await.unwrap();
    h.client.set_priority(other.id, -10).await.unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        let l = h
            .client
            .worker_lease("w", 2, None)
            .await
            .unwrap()
            .expect("a task");
        order.push(l.build.id);
        h.client
            .worker_end(l.task.id, &end(l.fence, Outcome::Succeeded))
            .await
            .unwrap();
    }
    assert_eq!(order, [ids[2], ids[0], ids[1], other.id]);
    let err = h.client.set_priority(ids[0], 1000).await.unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
    let user = h.client.create_token("eve", false).await.unwrap();
    let eve = Client::new(&h.url(), Some(user.token));
    assert_eq!(
        eve.set_priority(ids[0], 5).await.unwrap_err().status(),
        Some(403)
    );
    h.stop().await;
}

/// A task lost to infrastructure (here: its worker stopped heartbeating)
/// is retried elsewhere: the worker that lost it is passed over while
/// another can take it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_task_is_retried_on_another_worker() {
    let mut h = hub_with(0, |c| c.build.lease_secs = 2).await;
    let src = script_tree("lost", "true", &[]);
    let b = h.client.submit_dir(src.path(), None, None).await.unwrap();
    let first = h
        .client
        .worker_lease("w1", 2, None)
        .await
        .unwrap()
        .expect("the task");
    // No heartbeat: the reaper ends the lease and re-queues the task.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v = h.client.build(b.id).await.unwrap();
        let t = &v.detail.task_list[0];
        if t.state == BuildState::Queued && t.attempt == 2 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never re-queued: {t:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        h.client
            .worker_lease("w1", 1, None)
            .await
            .unwrap()
            .is_none(),
        "the worker that lost it should not get it straight back"
    );
    let again = h
        .client
        .worker_lease("w2", 2, None)
        .await
        .unwrap()
        .expect("another worker gets it");
    assert_eq!((again.task.id, again.task.attempt), (first.task.id, 2));
    assert_eq!(h.client.worker("w1").await.unwrap().stats.infra, 1);
    h.client
        .worker_end(again.task.id, &end(again.fence, Outcome::Succeeded))
        .await
        .unwrap();
    h.stop().await;
}

/// What workers fetch besides blobs — a buildroot's export, a mirror file
/// through the hub, a task's project repo — needs a worker credential and
/// names what is wrong with a bad request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_inputs_need_a_credential_and_refuse_bad_requests() {
    let mut h = hub(0).await;
    let anon = Client::new(&h.url(), None);
    let e = anon.worker_buildroot("bookworm").await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    let e = anon
        .worker_deb(&[7; 32], "http://127.0.0.1:9/x.deb", 1)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");

    let e = h.client.worker_buildroot("nope").await.unwrap_err();
    assert_eq!(e.status(), Some(404), "{e}");
    assert!(e.to_string().contains("buildroot nope"), "{e}");
    let e = h
        .client
        .worker_deb(&[7; 32], "file:///etc/passwd", 1)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(400), "{e}");
    assert!(e.to_string().contains("not an http(s) URL"), "{e}");
    // A mirror that does not answer: the hub says so, and caches nothing.
    let e = h
        .client
        .worker_deb(&[7; 32], "http://127.0.0.1:9/x.deb", 1)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(502), "{e}");
    assert!(e.to_string().contains("127.0.0.1:9/x.deb"), "{e}");
    let cache = kiln::deps::cache_dir(&h.data());
    assert!(!cache.join(hex::encode([7u8; 32])).exists());

    // A task's repo needs its current fence.
    let src = script_tree("repo", "true", &[]);
    h.client.submit_dir(src.path(), None, None).await.unwrap();
    let l = h
        .client
        .worker_lease("w", 5, Some(&info("amd64", 8)))
        .await
        .unwrap()
        .expect("a task");
    assert!(
        h.client
            .worker_repo(l.task.id, l.fence)
            .await
            .unwrap()
            .is_empty()
    );
    let e = h
        .client
        .worker_repo(l.task.id, l.fence + 1)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    // So does the list of its repo's RPMs (for BuildRequires).
    assert!(
        h.client
            .worker_repo_rpms(l.task.id, l.fence)
            .await
            .unwrap()
            .is_empty()
    );
    let e = h
        .client
        .worker_repo_rpms(l.task.id, l.fence + 1)
        .await
        .unwrap_err();
    assert_eq!(e.status(), Some(409), "{e}");
    let e = anon.worker_repo_rpms(l.task.id, l.fence).await.unwrap_err();
    assert_eq!(e.status(), Some(401), "{e}");
    h.stop().await;
}
