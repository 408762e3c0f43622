//! Test harness: start a real hub on port 0 with a temp data dir, make
//! source trees and tar streams, count blobs in the store.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kiln::client::Client;
use kiln::config::Config;

pub struct TestHub {
    pub running: Option<kiln::Running>,
    pub dir: tempfile::TempDir,
    pub client: Client,
    pub anon: Client,
    pub token: String,
}

impl TestHub {
    pub fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }
    pub fn url(&self) -> String {
        self.running.as_ref().expect("running").url()
    }
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

pub fn config(data: &Path, slots: usize) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.data = data.to_owned();
    c.build.slots = slots;
    c
}

pub async fn hub_with(slots: usize, tweak: impl FnOnce(&mut Config)) -> TestHub {
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(&dir.path().join("data"), slots);
    tweak(&mut c);
    let running = kiln::start(c, crate::kiln_exe()).await.expect("hub starts");
    let token = std::fs::read_to_string(dir.path().join("data/admin.token"))
        .unwrap()
        .trim()
        .to_string();
    let client = Client::new(&running.url(), Some(token.clone()));
    let anon = Client::new(&running.url(), None);
    TestHub {
        running: Some(running),
        dir,
        client,
        anon,
        token,
    }
}

pub async fn hub(slots: usize) -> TestHub {
    hub_with(slots, |_| {}).await
}

/// Writes files (path, content, mode) under `dir`.
pub fn write_tree(dir: &Path, files: &[(&str, &str, u32)]) {
    use std::os::unix::fs::PermissionsExt;
    for (path, content, mode) in files {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode)).unwrap();
    }
}

/// A source tree with a kiln.toml running `script` and keeping `outputs`.
pub fn script_tree(name: &str, script: &str, outputs: &[&str]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let outs: Vec<String> = outputs.iter().map(|o| format!("{o:?}")).collect();
    let toml = format!(
        "[package]\nname = {name:?}\n\n[build]\nscript = '''\n{script}\n'''\n\n[outputs]\nfiles = [{}]\n",
        outs.join(", ")
    );
    write_tree(dir.path(), &[("kiln.toml", &toml, 0o644)]);
    dir
}

/// A tar stream of `files`, with raw header names so tests can make
/// hostile archives.
pub fn raw_tar(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        {
            let gnu = h.as_gnu_mut().unwrap();
            gnu.name[..name.len()].copy_from_slice(name.as_bytes());
        }
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_mtime(1_700_000_000);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        out.extend(std::iter::repeat_n(0u8, pad));
    }
    out.extend(std::iter::repeat_n(0u8, 1024));
    out
}

/// Number of blobs in a data dir's store.
pub fn blob_count(data: &Path) -> usize {
    fn walk(p: &Path) -> usize {
        let Ok(rd) = std::fs::read_dir(p) else {
            return 0;
        };
        rd.flatten()
            .map(|e| {
                if e.file_type().unwrap().is_dir() {
                    walk(&e.path())
                } else {
                    1
                }
            })
            .sum()
    }
    walk(&data.join("cas/sha256"))
}

pub const BUILD_TIMEOUT: Duration = Duration::from_secs(120);

pub fn examples_hello() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/hello")
}

/// Submits a script tree to `h` and waits for the build to end.
pub async fn run_script(
    h: &TestHub,
    name: &str,
    script: &str,
    outputs: &[&str],
) -> kiln::server::BuildView {
    let src = script_tree(name, script, outputs);
    let b = h.client.submit_dir(src.path(), None, None).await.unwrap();
    h.client.wait(b.id, BUILD_TIMEOUT).await.unwrap()
}

/// Host processes whose command line contains `needle` (other than us).
pub fn host_processes_with(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) || name == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{name}: {cmdline}"));
            }
        }
    }
    found
}

/// Wait (briefly) until no host process mentions `needle`.
pub fn assert_no_process_with(needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let left = host_processes_with(needle);
        if left.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "processes survived the sandbox: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The text of a page (or any GET) at `path` on the hub.
pub async fn get_text(h: &TestHub, path: &str) -> String {
    reqwest::get(format!("{}{path}", h.url()))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `git daemon` serving `base`'s repositories on 127.0.0.1 (killed on drop).
pub struct GitServer {
    child: std::process::Child,
    pub url: String,
}

impl GitServer {
    pub fn start(base: &Path) -> GitServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // git-daemon itself, not the `git daemon` wrapper, so that killing
        // the child stops the server.
        let exec_path = git(Path::new("/"), &["--exec-path"]);
        let child = std::process::Command::new(Path::new(&exec_path).join("git-daemon"))
            .arg("--reuseaddr")
            .arg("--export-all")
            .arg("--listen=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--base-path={}", base.display()))
            .arg(base)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("git daemon (apt install git)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "git daemon did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
        GitServer {
            child,
            url: format!("git://127.0.0.1:{port}"),
        }
    }
}

impl Drop for GitServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs git in `dir` with a fixed identity; panics on failure; stdout.
pub fn git(dir: &Path, args: &[&str]) -> String {
    let o = std::process::Command::new("git")
        .args([
            "-c",
            "user.name=Kiln Tests",
            "-c",
            "user.email=t@kiln.invalid",
        ])
        .args(["-c", "init.defaultBranch=main"])
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Makes `dir` a git repo holding its current files as one commit, tagged.
pub fn git_commit_all(dir: &Path, tag: &str) -> String {
    if !dir.join(".git").exists() {
        git(dir, &["init", "-q"]);
    }
    git(dir, &["add", "-A"]);
    git(dir, &["commit", "-q", "-m", tag]);
    git(dir, &["tag", tag]);
    git(dir, &["rev-parse", "HEAD"])
}

/// Submits the tree in `dir` `n` times to the default project; the build ids.
pub async fn submit_n(h: &TestHub, dir: &Path, n: usize) -> Vec<u64> {
    let mut ids = Vec::new();
    for _ in 0..n {
        ids.push(h.client.submit_dir(dir, None, None).await.unwrap().id);
    }
    ids
}

/// Reads a followed log until `needle` appears (60 s per chunk at most);
/// returns what was read.
pub async fn read_until<S, E>(s: &mut S, needle: &str) -> String
where
    S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
    E: std::fmt::Debug,
{
    use futures_util::StreamExt;
    let mut seen = String::new();
    while !seen.contains(needle) {
        let c = tokio::time::timeout(Duration::from_secs(60), s.next())
            .await
            .expect("log chunk in time")
            .expect("stream open")
            .unwrap();
        seen.push_str(&String::from_utf8_lossy(&c));
    }
    seen
}

/// Starts `kiln serve` on port 0 with `args` and data in `data`, and
/// returns it with what follows `prefix` on the first line of its stderr
/// that starts with it; stderr is drained from then on so the hub never
/// blocks on it.
pub fn spawn_serve(data: &Path, args: &[&str], prefix: &str) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let mut child = Command::new(crate::kiln_exe())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .args(args)
        .arg("--data")
        .arg(data)
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let rest = loop {
        let line = lines.next().expect("the hub printed its line").unwrap();
        if let Some(rest) = line.strip_prefix(prefix) {
            break rest.to_string();
        }
    };
    std::thread::spawn(move || for _ in lines {});
    (child, rest)
}
