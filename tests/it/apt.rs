//! Test helpers for apt repositories: real `.deb`s from `dpkg-deb`, a
//! loopback static HTTP server, a throwaway apt client configured through
//! `APT_CONFIG` (the host's apt is never touched), and a tampering proxy in
//! front of a hub.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, Mutex};

use kiln::publish::{RepoFile, RepoKey};

/// Builds a `.deb` with `dpkg-deb --build -Z<compression>` from a control text and a
/// single payload file; returns its path.
pub fn build_deb(dir: &Path, name: &str, control: &str, compression: &str) -> PathBuf {
    let root = dir.join(format!("{name}.root"));
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/share/doc").join(name)).unwrap();
    std::fs::write(root.join("DEBIAN/control"), control).unwrap();
    std::fs::write(
        root.join("usr/share/doc").join(name).join("README"),
        format!("payload of {name}\n"),
    )
    .unwrap();
    let out = dir.join(format!("{name}.deb"));
    let o = Command::new("dpkg-deb")
        .arg(format!("-Z{compression}"))
        .args(["--root-owner-group", "--build"])
        .arg(&root)
        .arg(&out)
        .output()
        .expect("dpkg-deb runs");
    assert!(
        o.status.success(),
        "dpkg-deb: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    out
}

pub fn control(package: &str, version: &str, arch: &str) -> String {
    format!(
        "Package: {package}\nVersion: {version}\nArchitecture: {arch}\n\
         Maintainer: Kiln Tests <tests@kiln.invalid>\nInstalled-Size: 1\n\
         Section: misc\nPriority: optional\n\
         Description: test package {package}\n A package built by kiln's tests.\n .\n  Indented.\n"
    )
}

/// Writes published files under `root`.
pub fn write_repo(root: &Path, files: &[RepoFile]) {
    for f in files {
        let p = root.join(&f.path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, &f.data).unwrap();
    }
}

/// The key in binary form, as `gpgv --keyring` wants it.
pub fn dearmored_public(key: &RepoKey, path: &Path) {
    use pgp::composed::{Deserializable, SignedPublicKey};
    use pgp::ser::Serialize;
    let (public, _) = SignedPublicKey::from_string(&key.public_key_armored().unwrap()).unwrap();
    std::fs::write(path, public.to_bytes().unwrap()).unwrap();
}

/// A minimal static HTTP/1.0 server on 127.0.0.1 (loopback only), serving `root` and
/// logging request paths, so tests can see what apt fetched.
pub struct Server {
    pub port: u16,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    pub fn start(root: PathBuf) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { continue };
                let root = root.clone();
                let log = log2.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut first = String::new();
                    if reader.read_line(&mut first).is_err() {
                        return;
                    }
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                            break;
                        }
                    }
                    let mut parts = first.split_whitespace();
                    let method = parts.next().unwrap_or("");
                    let path = parts.next().unwrap_or("/").to_string();
                    log.lock().unwrap().push(path.clone());
                    let decoded = percent_decode(&path);
                    let rel = decoded.trim_start_matches('/');
                    let safe = !rel.split('/').any(|s| s == "..");
                    let file = root.join(rel);
                    let body = if safe && file.is_file() {
                        std::fs::read(&file).ok()
                    } else {
                        None
                    };
                    let _ = match body {
                        Some(b) => {
                            let head = format!(
                                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                                b.len()
                            );
                            conn.write_all(head.as_bytes()).and_then(|_| {
                                if method == "HEAD" {
                                    Ok(())
                                } else {
                                    conn.write_all(&b)
                                }
                            })
                        }
                        None => conn.write_all(
                            b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                        ),
                    };
                    let mut sink = Vec::new();
                    let _ = conn.flush();
                    let _ = conn.shutdown(std::net::Shutdown::Write);
                    let _ = reader.read_to_end(&mut sink);
                });
            }
        });
        Server { port, log }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<String> {
        self.log.lock().unwrap().clone()
    }
}

/// A throwaway apt client: its own state, cache, lists and sources under `dir`.
pub struct Apt {
    pub dir: PathBuf,
    config: PathBuf,
}

impl Apt {
    /// `source` is the `deb ...` line; `extra` more apt.conf lines.
    pub fn new(dir: &Path, source: &str, extra: &str) -> Apt {
        let d = dir.to_path_buf();
        for sub in [
            "state/lists/partial",
            "cache/archives/partial",
            "etc/apt.conf.d",
            "etc/preferences.d",
            "etc/sources.list.d",
            "etc/trusted.gpg.d",
            "log",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        std::fs::write(d.join("state/status"), "").unwrap();
        std::fs::write(d.join("etc/sources.list"), format!("{source}\n")).unwrap();
        let p = |s: &str| d.join(s).display().to_string();
        let config = d.join("apt.conf");
        std::fs::write(
            &config,
            format!(
                r#"Dir::State "{state}";
Dir::State::status "{status}";
Dir::Cache "{cache}";
Dir::Etc "{etc}";
Dir::Etc::sourcelist "{etc}/sources.list";
Dir::Etc::sourceparts "{etc}/sources.list.d";
Dir::Etc::trustedparts "{etc}/trusted.gpg.d";
Dir::Etc::trusted "{etc}/trusted.gpg";
Dir::Etc::parts "{etc}/apt.conf.d";
Dir::Etc::preferences "{etc}/preferences";
Dir::Etc::preferencesparts "{etc}/preferences.d";
Dir::Log "{log}";
APT::Architecture "amd64";
APT::Architectures {{ "amd64"; }};
APT::Sandbox::User "root";
Debug::NoLocking "true";
Acquire::Languages "none";
Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled "false";
Acquire::Retries "0";
{extra}
"#,
                state = p("state"),
                status = p("state/status"),
                cache = p("cache"),
                etc = p("etc"),
                log = p("log"),
            ),
        )
        .unwrap();
        Apt { dir: d, config }
    }

    pub fn run(&self, tool: &str, args: &[&str]) -> Output {
        Command::new(tool)
            .args(args)
            .env("APT_CONFIG", &self.config)
            .env("LC_ALL", "C.UTF-8")
            .current_dir(&self.dir)
            .output()
            .expect("apt tool runs")
    }
}

pub fn text(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}--- stderr\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `%7e` → `~` etc.; apt escapes `~` and `:` in pool URLs.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && i + 2 < b.len()
            && let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16)
        {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// An HTTP proxy on 127.0.0.1 in front of `upstream` that flips one byte
/// in the body of every response whose path ends with `pattern` (contains
/// it, for a `pattern` ending in `/`), and answers
/// 404 for paths ending with `hide` (to make apt fall back to another file).
pub async fn tampering_proxy(
    upstream: String,
    pattern: &'static str,
    hide: Option<&'static str>,
) -> String {
    use axum::body::Bytes;
    use axum::http::Uri;
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let upstream = upstream.clone();
        async move {
            if hide.is_some_and(|h| uri.path().ends_with(h)) {
                return (axum::http::StatusCode::NOT_FOUND, Bytes::new());
            }
            let resp = reqwest::get(format!("{upstream}{uri}")).await.unwrap();
            let status = resp.status().as_u16();
            let mut body = resp.bytes().await.unwrap().to_vec();
            let hit = match pattern.ends_with('/') {
                true => uri.path().contains(pattern),
                false => uri.path().ends_with(pattern),
            };
            if hit && !body.is_empty() {
                // Inside the signed text (past the armor header), not in whitespace.
                let i = body.len() / 3;
                body[i] = if body[i] == b'x' { b'y' } else { b'x' };
            }
            (
                axum::http::StatusCode::from_u16(status).unwrap(),
                Bytes::from(body),
            )
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// An HTTP proxy on 127.0.0.1 that forwards every GET to `upstream` (a
/// mirror URL prefix) and records the paths asked for.
pub async fn counting_proxy(upstream: &'static str) -> (String, Arc<Mutex<Vec<String>>>) {
    use axum::body::Bytes;
    use axum::http::Uri;
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    let client = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let (client, log) = (client.clone(), log.clone());
        async move {
            log.lock().unwrap().push(uri.path().to_string());
            let resp = client.get(format!("{upstream}{uri}")).send().await;
            match resp {
                Ok(r) => {
                    let status = axum::http::StatusCode::from_u16(r.status().as_u16()).unwrap();
                    (status, r.bytes().await.unwrap_or_default())
                }
                Err(_) => (axum::http::StatusCode::BAD_GATEWAY, Bytes::new()),
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}
