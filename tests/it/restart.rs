//! The `kiln` binary itself: kill -9 and restart, graceful shutdown, the CLI
//! against a hub, and `kiln build DIR` with no hub.

use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kiln::client::Client;
use kiln::model::BuildState;

use crate::harness::*;
use crate::kiln_exe;

/// Starts `kiln serve` on port 0 and returns it with its URL, read from the
/// line it prints.
fn spawn_hub(data: &Path, slots: usize) -> (Child, String) {
    spawn_serve(
        data,
        &["--slots", &slots.to_string()],
        "kiln: listening on ",
    )
}

fn token(data: &Path) -> String {
    std::fs::read_to_string(data.join("admin.token"))
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_build_then_restart_finishes_the_build() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (mut hub, url) = spawn_hub(&data, 1);
    let client = Client::new(&url, Some(token(&data)));

    // A finished build first: it must survive the crash untouched.
    let quick = script_tree("quick", "echo kept > $KILN_OUT/kept.txt", &["*"]);
    let done = client.submit_dir(quick.path(), None, None).await.unwrap();
    let done_v = client.wait(done.id, BUILD_TIMEOUT).await.unwrap();
    assert_eq!(done_v.detail.build.state, BuildState::Succeeded);

    // A slow build, killed with the hub while it runs.
    let slow = script_tree(
        "slow",
        "echo started; sleep 3; echo finished > $KILN_OUT/result.txt",
        &["*"],
    );
    let b = client.submit_dir(slow.path(), None, None).await.unwrap();
    let t0 = Instant::now();
    loop {
        let log = client.log_text(b.id).await.unwrap();
        if log.contains("started") {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "build never started: {log}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    hub.kill().unwrap(); // SIGKILL
    hub.wait().unwrap();

    // No sandbox outlives the hub.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let left: Vec<_> = host_processes_with(data.to_str().unwrap())
        .into_iter()
        .filter(|l| l.contains("__sandbox-init"))
        .collect();
    assert!(left.is_empty(), "a sandbox survived the hub: {left:?}");

    let (mut hub2, url2) = spawn_hub(&data, 1);
    let client = Client::new(&url2, Some(token(&data)));
    let v = client.wait(b.id, BUILD_TIMEOUT).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Succeeded);
    // Leases are committed without a sync: the interrupted attempt is
    // counted only if a later synced commit carried it to disk.
    assert!(
        matches!(v.detail.task_list[0].attempt, 1 | 2),
        "{:?}",
        v.detail.task_list[0]
    );
    let arts = client.artifacts(b.id).await.unwrap();
    assert_eq!(arts[0].path, "result.txt");
    let body = client
        .artifact(b.id, "result.txt")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "finished\n");
    // The earlier build is all there.
    assert_eq!(client.build(done.id).await.unwrap().detail, done_v.detail);
    let kept = client
        .artifact(done.id, "kept.txt")
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(kept, "kept\n");
    hub2.kill().unwrap();
    hub2.wait().unwrap();
}

#[test]
fn sigterm_shuts_the_hub_down_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut hub, _url) = spawn_hub(&dir.path().join("data"), 1);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(hub.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let t0 = Instant::now();
    loop {
        if let Some(status) = hub.try_wait().unwrap() {
            assert!(status.success(), "{status}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "hub ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn kiln(args: &[&str], url: &str, tok: Option<&str>, cwd: &Path) -> std::process::Output {
    let mut c = Command::new(kiln_exe());
    c.args(args)
        .current_dir(cwd)
        .env("KILN_URL", url)
        .env_remove("KILN_TOKEN");
    if let Some(t) = tok {
        c.env("KILN_TOKEN", t);
    }
    c.output().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_submits_watches_and_fetches() {
    let mut h = hub(1).await;
    let url = h.url();
    let tok = h.token.clone();
    let cwd = h.dir.path().to_owned();
    let hello = examples_hello();
    let ok = tokio::task::spawn_blocking(move || {
        let out = kiln(
            &["build", "submit", hello.to_str().unwrap()],
            &url,
            Some(&tok),
            &cwd,
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let watch = kiln(&["build", "watch", &id], &url, None, &cwd);
        assert_eq!(
            watch.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&watch.stderr)
        );
        assert!(String::from_utf8_lossy(&watch.stdout).contains("task ended: succeeded"));
        let list = kiln(&["artifact", "list", &id], &url, None, &cwd);
        assert!(String::from_utf8_lossy(&list.stdout).contains("usr/bin/hello"));
        // By file name, as the quick start shows it.
        let get = kiln(
            &["artifact", "get", &id, "hello", "-o", "./hello"],
            &url,
            None,
            &cwd,
        );
        assert!(
            get.status.success(),
            "{}",
            String::from_utf8_lossy(&get.stderr)
        );
        let run = Command::new(cwd.join("hello")).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&run.stdout), "Hello from kiln!\n");
        let show = kiln(&["build", "show", &id], &url, None, &cwd);
        assert!(String::from_utf8_lossy(&show.stdout).contains("succeeded"));
        let list = kiln(&["build", "list"], &url, None, &cwd);
        assert!(String::from_utf8_lossy(&list.stdout).contains("hello"));

        // A failing build: watch exits 1.
        let bad = script_tree("bad", "echo nope; exit 3", &["*"]);
        let out = kiln(
            &["build", "submit", bad.path().to_str().unwrap(), "--watch"],
            &url,
            Some(&tok),
            &cwd,
        );
        assert_eq!(out.status.code(), Some(1));
        assert!(String::from_utf8_lossy(&out.stdout).contains("exit code 3"));

        // Errors are one line and exit non-zero.
        let out = kiln(&["build", "show", "424242"], &url, None, &cwd);
        assert_eq!(out.status.code(), Some(2));
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains("424242") && err.contains("404"), "{err}");
        let out = kiln(
            &["build", "submit", "/nonexistent-dir"],
            &url,
            Some(&tok),
            &cwd,
        );
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent-dir"));
        let out = kiln(
            &["build", "submit", bad.path().to_str().unwrap()],
            &url,
            None,
            &cwd,
        );
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
    })
    .await;
    h.stop().await;
    ok.unwrap();
}

#[test]
fn kiln_build_dir_works_without_a_hub() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(kiln_exe())
        .args(["build"])
        .arg(examples_hello())
        .arg("-o")
        .arg(dir.path().join("out"))
        .env("XDG_DATA_HOME", dir.path().join("xdg"))
        .env("KILN_URL", "http://127.0.0.1:1") // nothing listens there
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("cc -O2"));
    let run = Command::new(dir.path().join("out/usr/bin/hello"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "Hello from kiln!\n");
    // Its store is the local one.
    assert!(dir.path().join("xdg/kiln/kiln.redb").exists());

    // A failing local build exits 1.
    let bad = script_tree("bad", "exit 4", &["*"]);
    let out = Command::new(kiln_exe())
        .args(["build"])
        .arg(bad.path())
        .arg("-o")
        .arg(dir.path().join("out2"))
        .env("XDG_DATA_HOME", dir.path().join("xdg"))
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn check_config_prints_the_effective_config_and_names_bad_fields() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(&good, "[build]\nslots = 5\n").unwrap();
    let out = Command::new(kiln_exe())
        .args(["check-config", "--config"])
        .arg(&good)
        .env("KILN_LISTEN", "127.0.0.1:9999")
        .env_remove("KILN_SLOTS")
        .env_remove("KILN_DATA")
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("slots = 5"), "{text}");
    assert!(text.contains("listen = \"127.0.0.1:9999\""), "{text}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[server]\npublic_reads = true\nlisen = \"x\"\n").unwrap();
    let out = Command::new(kiln_exe())
        .args(["check-config", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("line 3") && err.contains("lisen"), "{err}");
}
