//! Web: how fast the hub serves its pages and its JSON API over a store of
//! 100,000 builds, with `wrk` on loopback, against a static file server
//! serving the same bytes.
//!
//! Run: `cargo bench --bench web` (needs `wrk` on `PATH`: `apt-get install
//! wrk`; the peer needs `python3`). Env: `KILN_BENCH_BUILDS` (builds in the
//! store, default 100000), `KILN_BENCH_SECS` (length of each wrk run, default
//! 10), `KILN_BENCH_THREADS` / `KILN_BENCH_CONNS` (wrk's `-t` and `-c` for the
//! loaded runs, defaults 2 and 32), `KILN_BENCH_RUNS` (runs of each
//! measurement, medians reported, default 3), `KILN_BENCH_LOG_KIB` (log size
//! of the measured build page: 4, 8, 16, 32, 64, 128, 256 or 512; default
//! 64), `KILN_BENCH_PEER` (0 skips the peer; default 1).
//!
//! 1. Fill: `KILN_BENCH_BUILDS` builds through `kiln::db::Db` and
//!    `kiln::cas::Cas` directly (no hub running), as the hub records them:
//!    `create_build`, then for an ended build `lease_next` and `finish_task`
//!    at once. Four projects (50/25/15/10 %, the last of `deb` kind) of 25
//!    packages each; 90 % of the ended builds succeed, 10 % fail (exit code
//!    2); one in four of the newest 2 % stays queued (with priority -1, so the
//!    fill's own leases pass them by). Every ended task has a log in the
//!    store (16 distinct blobs, 4 to 512 KiB, shared as the store dedupes),
//!    and every succeeded build two artifacts. The fill runs in a staging dir
//!    on `/dev/shm` when there is one (redb's fsyncs cost nothing there: the
//!    fill is set-up, not what is measured), and the filled data dir is kept
//!    in `target/bench-web/` keyed by the schema version and the build count,
//!    so a re-run skips it (delete that dir to fill again).
//! 2. Hub: the cached data dir is copied to a temp dir (same disk as `/tmp`)
//!    and the release `kiln` binary serves it as its own process (`kiln serve
//!    --listen 127.0.0.1:0 --slots 0 --data DIR`), so its CPU time
//!    (`/proc/PID/stat`) and peak RSS (`VmHWM`) are its own. Reads are public
//!    by default; were they not, wrk would send the admin token the hub wrote
//!    to `DIR/admin.token`.
//! 3. Pages: `/` (the dashboard: the newest 50 builds), `/builds/ID` (the
//!    newest succeeded build whose log is `KILN_BENCH_LOG_KIB`) and
//!    `/api/v1/builds/ID` (the same build as JSON) are fetched once and
//!    checked (HTTP 200, the log on the page, the build's state), and their
//!    bytes written to files for the peer.
//! 4. Load: `wrk -tTHREADS -cCONNS -dSECS --latency URL` (after a 1 s
//!    warm-up) gives requests/s and p50/p99 latency under load; `wrk -t1 -c1`
//!    gives the latency of one request at a time, i.e. the render without
//!    queueing. Each is run `KILN_BENCH_RUNS` times, interleaved with the same
//!    run against the peer: `python3 -m http.server`'s handler (threading
//!    server, HTTP/1.1 keep-alive, `TCP_NODELAY` — without it every answer
//!    waits 40 ms for a delayed ACK —, request logging and the tracebacks of
//!    connections wrk resets off) serving the very bytes kiln served, so the
//!    numbers have a reference on a noisy shared machine. A non-2xx answer
//!    fails the bench. The load average before and after the runs is
//!    printed: p99s on a busy 2-core box are mostly other processes' time.
//!
//! Prints the fill (its time, or that it was reused), the data dir's size,
//! the page sizes, for each URL the medians of requests/s, p50 and p99 (kiln,
//! peer and kiln/peer) loaded and single-connection, the hub's CPU per
//! request, its peak RSS, and the goals of issue 6: API ≥ 20,000 req/s (on
//! the loaded runs) and p99 page render < 20 ms (single connection; the
//! loaded p99 is printed as a second line). wrk shares the machine (and its
//! cores) with the hub.

#[path = "common.rs"]
mod common;
use common::{HubProc, cpu_secs, env_num, status_field, target_dir};

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kiln::cas::Cas;
use kiln::client::Client;
use kiln::db::{Db, TaskEnd};
use kiln::model::{Artifact, BuildState, Outcome, PackageKind};

/// (name, share of builds in %, kind, target).
const PROJECTS: [(&str, u64, PackageKind, &str); 4] = [
    ("core", 50, PackageKind::Script, "host"),
    ("desktop", 25, PackageKind::Script, "host"),
    ("games", 15, PackageKind::Script, "host"),
    ("debian", 10, PackageKind::Deb, "bookworm-amd64"),
];
const PACKAGES_PER_PROJECT: u64 = 25;
/// Log sizes in KiB; each ended task gets one, by its build's hash.
const LOG_KIB: [u64; 8] = [4, 8, 16, 32, 64, 128, 256, 512];
const WORKERS: u64 = 4;
/// Bump when the fill changes: the cache key.
const FILL_VERSION: u32 = 1;

fn main() {
    let builds: u64 = env_num("KILN_BENCH_BUILDS", 100_000).max(100);
    let secs: u64 = env_num("KILN_BENCH_SECS", 10).max(1);
    let threads: u32 = env_num("KILN_BENCH_THREADS", 2).max(1);
    let conns: u32 = env_num("KILN_BENCH_CONNS", 32).max(threads);
    let runs: usize = env_num("KILN_BENCH_RUNS", 3).max(1);
    let log_kib: u64 = env_num("KILN_BENCH_LOG_KIB", 64);
    let peer: bool = env_num("KILN_BENCH_PEER", 1) != 0;
    assert!(
        LOG_KIB.contains(&log_kib),
        "KILN_BENCH_LOG_KIB must be one of {LOG_KIB:?}"
    );
    let wrk_ok = Command::new("wrk")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(wrk_ok, "wrk not found (apt-get install wrk)");
    run(&Opts {
        builds,
        secs,
        threads,
        conns,
        runs,
        log_kib,
        peer,
    });
}

struct Opts {
    builds: u64,
    secs: u64,
    threads: u32,
    conns: u32,
    runs: usize,
    log_kib: u64,
    peer: bool,
}

// ---- the fill ----

/// A fixed pseudo-random number per build index (splitmix64).
fn mix(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What build index `i` (id `i + 1`) of `n` becomes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fate {
    Queued,
    Succeeded,
    Failed,
}

struct Plan {
    project: usize,
    package: u64,
    fate: Fate,
    /// Index into `LOG_KIB`.
    log: usize,
}

fn plan(i: u64, n: u64) -> Plan {
    let h = mix(i);
    let mut pick = h % 100;
    let mut project = 0;
    for (k, p) in PROJECTS.iter().enumerate() {
        if pick < p.1 {
            project = k;
            break;
        }
        pick -= p.1;
    }
    let fate = if i >= n - n / 50 && i.is_multiple_of(4) {
        Fate::Queued
    } else if (h >> 8).is_multiple_of(10) {
        Fate::Failed
    } else {
        Fate::Succeeded
    };
    Plan {
        project,
        package: (h >> 16) % PACKAGES_PER_PROJECT,
        fate,
        log: ((h >> 24) % LOG_KIB.len() as u64) as usize,
    }
}

fn package_name(project: usize, package: u64) -> String {
    format!("{}-pkg{package:02}", PROJECTS[project].0)
}

/// A build log of about `kib` KiB: compiler lines with a warning now and
/// then; a failed one ends in make's error.
fn log_text(variant: usize, kib: u64, failed: bool) -> Vec<u8> {
    let mut s = format!("kiln: task started (log variant {variant})\n+ make -j2\nmkdir -p build\n");
    let want = (kib * 1024) as usize;
    let mut n = 0u64;
    let tail = if failed {
        "src/module0999.c:17:1: error: expected ';' before '}' token\nmake: *** [Makefile:12: all] Error 2\nkiln: the build exited with code 2\n"
    } else {
        "+ make install DESTDIR=/kiln/out\ninstall -D -m 0755 build/prog /kiln/out/usr/bin/prog\nkiln: the build exited with code 0\n"
    };
    while s.len() + tail.len() < want {
        n += 1;
        let line = if n.is_multiple_of(17) {
            format!(
                "src/module{:04}.c:{}:9: warning: unused variable 'tmp{}' [-Wunused-variable]\n",
                n % 1000,
                n % 400 + 10,
                n % 7
            )
        } else {
            format!(
                "cc -O2 -g -Wall -Wextra -fstack-protector-strong -D_FORTIFY_SOURCE=2 -Iinclude -c src/module{:04}.c -o build/module{:04}.o\n",
                n % 1000,
                n % 1000
            )
        };
        s.push_str(&line);
    }
    s.push_str(tail);
    s.into_bytes()
}

/// A source tree with a kiln.toml, as a tar.
fn source_tar(package: &str) -> Vec<u8> {
    let toml = format!(
        "[package]\nname = {package:?}\n\n[build]\nscript = '''\nmake -j2 && make install DESTDIR=$KILN_OUT\n'''\n\n[outputs]\nfiles = [\"usr/bin/*\"]\n"
    );
    let mut b = tar::Builder::new(Vec::new());
    let mut h = tar::Header::new_gnu();
    h.set_path("kiln.toml").unwrap();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_mtime(1_700_000_000);
    h.set_size(toml.len() as u64);
    h.set_cksum();
    b.append(&h, toml.as_bytes()).unwrap();
    b.into_inner().unwrap()
}

/// Fills `data` (a fresh data dir) with `n` builds; returns the wall time.
fn fill(data: &Path, n: u64) -> Duration {
    std::fs::create_dir_all(data).unwrap();
    let cas = Cas::open(&data.join("cas")).unwrap();
    let db = Db::open(&data.join("kiln.redb")).unwrap();
    let t0 = Instant::now();
    // Logs: one blob per (size, outcome).
    let logs: Vec<[kiln::cas::Digest; 2]> = (0..LOG_KIB.len())
        .map(|v| {
            [false, true].map(|failed| {
                cas.put_bytes(&log_text(v * 2 + usize::from(failed), LOG_KIB[v], failed))
                    .unwrap()
            })
        })
        .collect();
    // Per package: its source tree, and the two files a success outputs.
    struct Pkg {
        name: String,
        source: kiln::cas::Digest,
        epoch: i64,
        files: Vec<(String, kiln::cas::Digest, u64, u32)>,
    }
    let mut pkgs: Vec<Vec<Pkg>> = Vec::new();
    for (p, (project, _, kind, _)) in PROJECTS.iter().enumerate() {
        let mut v = Vec::new();
        for k in 0..PACKAGES_PER_PROJECT {
            let name = package_name(p, k);
            let pending = cas.ingest_tar(&source_tar(&name)[..], 1 << 20).unwrap();
            let epoch = pending.max_mtime;
            let source = pending.commit().unwrap();
            // A binary that compresses like one: 48 KiB of noise.
            let bin: Vec<u8> = (0..48 * 1024 / 8)
                .flat_map(|j| mix((p as u64) << 32 | k << 16 | j).to_le_bytes())
                .collect();
            let doc =
                format!("{name} ({project}) 1.0-1\n\n  * Built by kiln's web bench.\n").repeat(20);
            let (bin_path, doc_path) = match kind {
                PackageKind::Deb => (
                    format!("{name}_1.0-1_amd64.deb"),
                    format!("{name}_1.0-1_amd64.buildinfo"),
                ),
                _ => (
                    format!("usr/bin/{name}"),
                    format!("usr/share/doc/{name}/changelog"),
                ),
            };
            let files = vec![
                (
                    bin_path,
                    cas.put_bytes(&bin).unwrap(),
                    bin.len() as u64,
                    0o755,
                ),
                (
                    doc_path,
                    cas.put_bytes(doc.as_bytes()).unwrap(),
                    doc.len() as u64,
                    0o644,
                ),
            ];
            v.push(Pkg {
                name,
                source,
                epoch,
                files,
            });
        }
        pkgs.push(v);
    }
    let mut last_report = Instant::now();
    for i in 0..n {
        let pl = plan(i, n);
        let (project, _, kind, target) = PROJECTS[pl.project];
        let pkg = &pkgs[pl.project][pl.package as usize];
        let b = db
            .create_build(
                project,
                &pkg.name,
                kind,
                pkg.source,
                pkg.epoch,
                "admin",
                &[target],
                None,
            )
            .unwrap();
        assert_eq!(b.id, i + 1, "the fill needs a fresh database");
        if pl.fate == Fate::Queued {
            db.set_build_priority(b.id, -1).unwrap();
            continue;
        }
        let worker = format!("builder{}", i % WORKERS + 1);
        let l = db
            .lease_next(&worker, 3_600_000)
            .unwrap()
            .expect("a queued task");
        assert_eq!(l.build.id, b.id, "the fill leased another build");
        let failed = pl.fate == Fate::Failed;
        let artifacts = if failed {
            vec![]
        } else {
            pkg.files
                .iter()
                .map(|(path, digest, size, mode)| Artifact {
                    build: b.id,
                    task: l.task.id,
                    path: path.clone(),
                    digest: *digest,
                    size: *size,
                    mode: *mode,
                })
                .collect()
        };
        let end = TaskEnd {
            outcome: if failed {
                Outcome::ExitCode(2)
            } else {
                Outcome::Succeeded
            },
            log: Some(logs[pl.log][usize::from(failed)]),
            outputs: None,
            artifacts,
            publish: None,
        };
        let built = db.finish_task(l.task.id, l.fence, end, 3).unwrap();
        assert!(built.state.is_finished(), "{built:?}");
        if last_report.elapsed() > Duration::from_secs(10) {
            last_report = Instant::now();
            eprintln!("fill: {} of {n} builds", i + 1);
        }
    }
    db.sync().unwrap();
    t0.elapsed()
}

/// The filled data dir for `n` builds, from the cache or filled now.
fn filled(n: u64) -> PathBuf {
    let root = target_dir().join("bench-web");
    let key = format!(
        "v{FILL_VERSION}-schema{}-builds{n}",
        kiln::db::SCHEMA_VERSION
    );
    let cached = root.join(&key);
    if cached.exists() {
        println!(
            "fill: reused {} (delete it to fill again)",
            cached.display()
        );
        return cached;
    }
    std::fs::create_dir_all(&root).unwrap();
    let shm = Path::new("/dev/shm");
    let stage_in = if shm.is_dir() { shm } else { root.as_path() };
    let stage = tempfile::Builder::new()
        .prefix("kiln-bench-web-fill-")
        .tempdir_in(stage_in)
        .unwrap();
    let data = stage.path().join("data");
    let took = fill(&data, n);
    println!(
        "fill: {n} builds in {:.1} s ({:.0} builds/s: create_build, lease_next, finish_task each; staged in {})",
        took.as_secs_f64(),
        n as f64 / took.as_secs_f64(),
        stage_in.display()
    );
    // Copy, then rename: an interrupted copy leaves no half cache behind.
    let tmp = root.join(format!("{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    copy_dir(&data, &tmp);
    std::fs::rename(&tmp, &cached).unwrap();
    cached
}

fn copy_dir(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .args(["-a", "--reflink=auto"])
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "cp -a {} {}: {st}",
        from.display(),
        to.display()
    );
}

/// Apparent size of the files under `p`, and how many there are.
fn dir_size(p: &Path) -> (u64, u64) {
    let md = std::fs::symlink_metadata(p).unwrap();
    if !md.is_dir() {
        return (md.len(), 1);
    }
    let mut total = (0, 0);
    for e in std::fs::read_dir(p).unwrap() {
        let (b, f) = dir_size(&e.unwrap().path());
        total.0 += b;
        total.1 += f;
    }
    total
}

// ---- the hub ----

/// The hub as a child process on a given data dir.
/// The 1, 5 and 15 minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

// ---- the peer ----

/// `python3 -m http.server`'s handler on loopback, serving `dir`.
struct Peer {
    child: Child,
    url: String,
}

const PEER_PY: &str = r#"
import functools, http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    def log_message(self, *args):
        pass
class S(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        pass
srv = S(("127.0.0.1", 0), functools.partial(H, directory=sys.argv[1]))
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

impl Peer {
    fn start(dir: &Path) -> Peer {
        let mut child = Command::new("python3")
            .args(["-c", PEER_PY])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("python3 http.server printed {line:?}"));
        Peer {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- wrk ----

#[derive(Clone, Copy, Default)]
struct Wrk {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    /// Hub CPU seconds over the run (kiln only).
    cpu: f64,
}

/// wrk's durations: `812.00us`, `1.23ms`, `2.01s`, `1.10m`.
fn wrk_ms(s: &str) -> f64 {
    let (num, unit) = s
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| s.split_at(i))
        .unwrap_or((s, "s"));
    let v: f64 = num.parse().unwrap_or(f64::NAN);
    match unit {
        "us" => v / 1e3,
        "ms" => v,
        "s" => v * 1e3,
        "m" => v * 60e3,
        "h" => v * 3600e3,
        _ => f64::NAN,
    }
}

/// One wrk run; panics on non-2xx answers or a failed wrk.
fn wrk(url: &str, threads: u32, conns: u32, secs: u64, auth: Option<&str>) -> (Wrk, String) {
    let mut cmd = Command::new("wrk");
    cmd.arg(format!("-t{threads}"))
        .arg(format!("-c{conns}"))
        .arg(format!("-d{secs}s"))
        .arg("--latency");
    if let Some(token) = auth {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = cmd.arg(url).output().expect("wrk");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "wrk {url}: {}\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("Non-2xx or 3xx responses"),
        "wrk {url}: non-2xx answers:\n{text}"
    );
    let mut r = Wrk::default();
    let mut socket_errors = String::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            r.rps = v.trim().parse().unwrap_or(f64::NAN);
        } else if let Some(v) = l.strip_prefix("50%") {
            r.p50_ms = wrk_ms(v.trim());
        } else if let Some(v) = l.strip_prefix("99%") {
            r.p99_ms = wrk_ms(v.trim());
        } else if l.contains(" requests in ") {
            r.requests = l.split_whitespace().next().unwrap().parse().unwrap_or(0);
        } else if l.starts_with("Socket errors:") {
            socket_errors = l.to_string();
        }
    }
    assert!(
        r.requests > 0 && r.rps > 0.0,
        "wrk {url}: no requests:\n{text}"
    );
    (r, socket_errors)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Medians of each figure over runs.
fn medians(v: &[Wrk]) -> Wrk {
    let f = |g: fn(&Wrk) -> f64| median(v.iter().map(g).collect());
    Wrk {
        rps: f(|w| w.rps),
        p50_ms: f(|w| w.p50_ms),
        p99_ms: f(|w| w.p99_ms),
        requests: median(v.iter().map(|w| w.requests as f64).collect()) as u64,
        cpu: f(|w| w.cpu),
    }
}

struct Target {
    label: &'static str,
    path: String,
    /// The file the peer serves the same bytes from.
    file: &'static str,
    bytes: usize,
    /// [loaded, single connection] runs, kiln's and the peer's.
    kiln: [Vec<Wrk>; 2],
    peer: [Vec<Wrk>; 2],
}

fn run(o: &Opts) {
    let cache = filled(o.builds);
    let (db_bytes, _) = dir_size(&cache.join("kiln.redb"));
    let (cas_bytes, blobs) = dir_size(&cache.join("cas"));
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let plans: Vec<Plan> = (0..o.builds).map(|i| plan(i, o.builds)).collect();
    let count = |f: Fate| plans.iter().filter(|p| p.fate == f).count();
    println!(
        "store: {} builds ({} succeeded, {} failed, {} queued) in {} projects of {PACKAGES_PER_PROJECT} packages; data dir {:.1} MiB (kiln.redb {:.1} MiB, cas {:.1} MiB in {blobs} files)",
        o.builds,
        count(Fate::Succeeded),
        count(Fate::Failed),
        count(Fate::Queued),
        PROJECTS.len(),
        mib(db_bytes + cas_bytes),
        mib(db_bytes),
        mib(cas_bytes),
    );

    // ---- the hub on a copy of the store ----
    let dir = tempfile::Builder::new()
        .prefix("kiln-bench-web-")
        .tempdir()
        .unwrap();
    let data = dir.path().join("data");
    copy_dir(&cache, &data);
    let mut hub = HubProc::start(&data, &dir.path().join("hub.log"));
    let pid = hub.pid;
    let rss_start = status_field(pid, "VmRSS");
    println!("hub pid {pid} at {}", hub.url);

    // The measured build: the newest succeeded one with a log of that size.
    let wanted = LOG_KIB.iter().position(|k| *k == o.log_kib).unwrap();
    let id = (0..o.builds)
        .rev()
        .find(|i| {
            let p = &plans[*i as usize];
            p.fate == Fate::Succeeded && p.log == wanted
        })
        .expect("a succeeded build with that log size")
        + 1;

    let rt = tokio::runtime::Runtime::new().unwrap();
    let http = reqwest::Client::new();
    let get = |path: &str, token: Option<&str>| {
        let mut req = http.get(format!("{}{path}", hub.url));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        rt.block_on(async {
            let resp = req.send().await.expect("GET");
            let status = resp.status().as_u16();
            (status, resp.bytes().await.expect("body"))
        })
    };
    // Public reads (the default) need no token; otherwise send the admin's.
    let auth = match get("/", None).0 {
        200 => None,
        401 => Some(hub.token.clone()),
        s => panic!("GET / answered {s}"),
    };
    let client = Client::new(&hub.url, Some(hub.token.clone()));
    let newest = rt
        .block_on(client.list_builds(None, 1))
        .expect("list builds");
    assert_eq!(
        newest.first().map(|b| b.id),
        Some(o.builds),
        "the hub does not see the filled store"
    );
    let view = rt.block_on(client.build(id)).expect("the measured build");
    assert_eq!(view.detail.build.state, BuildState::Succeeded);
    assert!(view.detail.task_list.iter().all(|t| t.log.is_some()));

    let peer_dir = dir.path().join("peer");
    std::fs::create_dir_all(&peer_dir).unwrap();
    let mut targets: Vec<Target> = [
        ("dashboard /", "/".to_string(), "index.html"),
        ("build page", format!("/builds/{id}"), "build.html"),
        ("API build", format!("/api/v1/builds/{id}"), "build.json"),
    ]
    .into_iter()
    .map(|(label, path, file)| {
        let (status, body) = get(&path, auth.as_deref());
        assert_eq!(status, 200, "GET {path}");
        std::fs::write(peer_dir.join(file), &body).unwrap();
        Target {
            label,
            path,
            file,
            bytes: body.len(),
            kiln: Default::default(),
            peer: Default::default(),
        }
    })
    .collect();
    let page = std::fs::read_to_string(peer_dir.join("build.html")).unwrap();
    assert!(
        page.contains("kiln: the build exited with code 0"),
        "the build page shows no log"
    );
    println!(
        "pages: {}",
        targets
            .iter()
            .map(|t| format!("{} {:.1} KiB", t.path, t.bytes as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  (build {id}: succeeded, one task, a {} KiB log shown inline, 2 artifacts)",
        o.log_kib
    );

    let peer = o.peer.then(|| Peer::start(&peer_dir));
    let peer_url = |t: &Target| format!("{}/{}", peer.as_ref().unwrap().url, t.file);

    // ---- load ----
    for t in &targets {
        wrk(&format!("{}{}", hub.url, t.path), 1, 4, 1, auth.as_deref());
        if peer.is_some() {
            wrk(&peer_url(t), 1, 4, 1, None);
        }
    }
    let load_before = loadavg();
    let modes = [(o.threads, o.conns), (1, 1)];
    let mut socket_notes: Vec<String> = Vec::new();
    let t0 = Instant::now();
    for round in 0..o.runs {
        for t in targets.iter_mut() {
            for (m, (th, c)) in modes.iter().enumerate() {
                let cpu0 = cpu_secs(pid);
                let (mut r, se) = wrk(
                    &format!("{}{}", hub.url, t.path),
                    *th,
                    *c,
                    o.secs,
                    auth.as_deref(),
                );
                r.cpu = cpu_secs(pid) - cpu0;
                if !se.is_empty() {
                    socket_notes.push(format!("kiln {} -c{c}: {se}", t.path));
                }
                t.kiln[m].push(r);
                if peer.is_some() {
                    let (r, se) = wrk(&peer_url(t), *th, *c, o.secs, None);
                    if !se.is_empty() {
                        socket_notes.push(format!("peer {} -c{c}: {se}", t.file));
                    }
                    t.peer[m].push(r);
                }
            }
        }
        eprintln!(
            "round {} of {} done ({:.0} s)",
            round + 1,
            o.runs,
            t0.elapsed().as_secs_f64()
        );
    }
    let load_after = loadavg();
    let hwm_kib = status_field(pid, "VmHWM");
    let rss_end = status_field(pid, "VmRSS");
    hub.stop();
    drop(peer);

    // ---- report ----
    let peer_name = if o.peer {
        "; peer: python3 http.server, same bytes"
    } else {
        ""
    };
    for (m, (th, c)) in modes.iter().enumerate() {
        println!(
            "{} (wrk -t{th} -c{c} -d{}s --latency; medians of {} runs{peer_name}):",
            if m == 0 {
                "under load"
            } else {
                "one request at a time"
            },
            o.secs,
            o.runs
        );
        for t in &targets {
            let k = medians(&t.kiln[m]);
            let mut line = format!(
                "  {:<12} kiln {:>8.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms  hub CPU {:>5.0} µs/req",
                t.label,
                k.rps,
                k.p50_ms,
                k.p99_ms,
                k.cpu / k.requests.max(1) as f64 * 1e6
            );
            if !t.peer[m].is_empty() {
                let p = medians(&t.peer[m]);
                line.push_str(&format!(
                    " | peer {:>7.0} req/s  p50 {:>7.2} ms  p99 {:>7.2} ms | kiln/peer {:.2}x req/s, {:.2}x p99",
                    p.rps,
                    p.p50_ms,
                    p.p99_ms,
                    k.rps / p.rps,
                    k.p99_ms / p.p99_ms
                ));
            }
            println!("{line}");
        }
    }
    println!(
        "machine: load average {load_before} before the runs, {load_after} after ({} cores; wrk runs on them too)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    for n in &socket_notes {
        println!("note: wrk reported {n}");
    }
    println!(
        "hub memory: peak RSS {:.1} MiB (VmHWM); {:.1} MiB after start, {:.1} MiB at the end",
        hwm_kib as f64 / 1024.0,
        rss_start as f64 / 1024.0,
        rss_end as f64 / 1024.0
    );
    let (data_bytes, _) = dir_size(&data);
    println!(
        "data dir: {:.1} MiB after the runs ({} builds)",
        mib(data_bytes),
        o.builds
    );

    let goal = |name: &str, met: bool, what: String| {
        let met = if met { "MET" } else { "MISSED" };
        println!("goal {name}: {met} ({what})");
    };
    let api = medians(&targets[2].kiln[0]);
    goal(
        "API ≥ 20,000 req/s",
        api.rps >= 20_000.0,
        format!(
            "GET /api/v1/builds/{id}: {:.0} req/s with {} connections",
            api.rps, o.conns
        ),
    );
    for (m, how) in [(1, "one request at a time"), (0, "under load")] {
        let d = medians(&targets[0].kiln[m]);
        let b = medians(&targets[1].kiln[m]);
        let conns = if m == 0 { o.conns } else { 1 };
        goal(
            &format!("p99 page render < 20 ms ({how})"),
            d.p99_ms < 20.0 && b.p99_ms < 20.0,
            format!(
                "{conns} connection(s): dashboard p99 {:.2} ms, build page p99 {:.2} ms",
                d.p99_ms, b.p99_ms
            ),
        );
    }
}
