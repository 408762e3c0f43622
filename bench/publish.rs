//! Publishing 10,000 `.deb`s: kiln vs apt-ftparchive, reprepro and aptly.
//!
//! Run: `cargo bench --bench publish` (rounds: `KILN_BENCH_ROUNDS`, default 3).
//! The corpus is generated once into `/tmp/kiln-bench-debs-v1` (ar + tar written
//! directly, one sample checked with `dpkg-deb`) and reused between runs.
//!
//! Work compared, per tool:
//! - full: read + hash every .deb, write Packages, .gz, .xz and Release. kiln also
//!   builds by-hash copies and signs (InRelease + Release.gpg); the peers run
//!   unsigned (reprepro without SignWith, aptly with -skip-signing, apt-ftparchive
//!   without gpg), so kiln does strictly more work. reprepro and aptly also copy
//!   the .debs into their pool and keep a database: that is part of their
//!   "publish", so it is timed.
//! - add-one: publish the 10,000 plus one new .deb, starting from each tool's warm
//!   state (kiln: cached stanzas + IndexCache; apt-ftparchive: its --db cache;
//!   reprepro/aptly: their existing repo). State is reset untimed between rounds.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln::publish as pubapt;
use kiln::publish::{IndexCache, PoolEntry, RepoKey, Stanza, SuiteConfig, apt, deb};
use time::OffsetDateTime;

const N: usize = 10_000;
const CORPUS: &str = "/tmp/kiln-bench-debs-v1";
const EXTRA: &str = "pkg05000b";

fn main() {
    let rounds: usize = std::env::var("KILN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3)
        .max(1);
    let corpus = Path::new(CORPUS);
    make_corpus(corpus);
    let debs: Vec<PathBuf> = (0..N)
        .map(|i| corpus.join(format!("all/pkg{i:05}_1.0_amd64.deb")))
        .collect();
    let extra = corpus.join(format!("extra/{EXTRA}_1.0_amd64.deb"));
    let work = tempfile::Builder::new()
        .prefix("kiln-bench-")
        .tempdir()
        .unwrap();
    let w = work.path();
    let key = RepoKey::generate("kiln bench <bench@localhost>").unwrap();

    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // KILN_BENCH_PEERS=reprepro,aptly picks peers (empty: kiln alone).
    let wanted = std::env::var("KILN_BENCH_PEERS")
        .unwrap_or_else(|_| "apt-ftparchive,reprepro,aptly".into());
    let peers: Vec<&str> = ["apt-ftparchive", "reprepro", "aptly"]
        .into_iter()
        .filter(|t| wanted.split(',').any(|w| w.trim() == *t))
        .filter(|t| {
            let ok = have(t);
            if !ok {
                println!("skipping {t}: not installed");
            }
            ok
        })
        .collect();

    let mut times: HashMap<String, Vec<Duration>> = HashMap::new();
    let mut record = |name: &str, d: Duration| {
        println!("  {name:<28} {:>9.1} ms", d.as_secs_f64() * 1e3);
        times.entry(name.to_string()).or_default().push(d);
    };

    for round in 0..rounds {
        println!("round {}/{rounds}", round + 1);
        // --- full index ---
        let out = w.join(format!("kiln-full-{round}"));
        let t = Instant::now();
        let (stanzas, cache) = kiln_full(&debs, &key, &out);
        record("kiln full", t.elapsed());

        for &peer in &peers {
            let dir = w.join(format!("{peer}-{round}"));
            std::fs::create_dir_all(&dir).unwrap();
            let t = match peer {
                "apt-ftparchive" => ftparchive_full(corpus, &dir),
                "reprepro" => reprepro_full(&debs, &dir),
                _ => aptly_full(corpus, &dir),
            };
            record(&format!("{peer} full"), t);
        }

        // --- add one to the 10,000 ---
        let mut stanza_cache: HashMap<[u8; 32], Stanza> = stanzas
            .iter()
            .map(|s| (*s.deb_sha256(), s.clone()))
            .collect();
        let mut idx_cache = cache.clone();
        let out = w.join(format!("kiln-add-{round}"));
        let t = Instant::now();
        let files = kiln_add_one(&extra, &mut stanza_cache, &mut idx_cache, &key, &out);
        record("kiln add-one", t.elapsed());
        // Checked outside the timed part: the new package is in the index.
        let packages = files
            .iter()
            .find(|f| f.path.ends_with("binary-amd64/Packages"))
            .unwrap();
        assert!(
            std::str::from_utf8(&packages.data)
                .unwrap()
                .contains(&format!("Package: {EXTRA}\n"))
        );

        for &peer in &peers {
            let dir = w.join(format!("{peer}-{round}"));
            let t = match peer {
                "apt-ftparchive" => ftparchive_add_one(&dir, &extra),
                "reprepro" => reprepro_add_one(&dir, &extra),
                _ => aptly_add_one(&dir, &extra),
            };
            record(&format!("{peer} add-one"), t);
            // Free disk between rounds; the timed part is over.
            let _ = std::fs::remove_dir_all(&dir);
        }
        let _ = std::fs::remove_dir_all(w.join(format!("kiln-full-{round}")));
        let _ = std::fs::remove_dir_all(w.join(format!("kiln-add-{round}")));
    }

    let median = |name: &str| -> Option<f64> {
        let mut v: Vec<f64> = times
            .get(name)?
            .iter()
            .map(|d| d.as_secs_f64() * 1e3)
            .collect();
        v.sort_by(f64::total_cmp);
        Some(v[v.len() / 2])
    };
    println!("\nmedians over {rounds} rounds, {N} packages (ms):");
    let kf = median("kiln full").unwrap();
    let ka = median("kiln add-one").unwrap();
    println!("  {:<16} {:>10} {:>10}", "", "full", "add-one");
    println!("  {:<16} {:>10.1} {:>10.1}", "kiln", kf, ka);
    for &peer in &peers {
        let (f, a) = (
            median(&format!("{peer} full")).unwrap(),
            median(&format!("{peer} add-one")).unwrap(),
        );
        println!(
            "  {peer:<16} {f:>10.1} {a:>10.1}   kiln/peer: full {:.3}, add-one {:.3}",
            kf / f,
            ka / a
        );
    }
    println!("  kiln add-one / kiln full = {:.4} (goal < 0.05)", ka / kf);
}

fn cfg() -> SuiteConfig {
    SuiteConfig {
        origin: "kiln".into(),
        label: "bench".into(),
        suite: "stable".into(),
        codename: "stable".into(),
        component: "main".into(),
        architectures: vec!["amd64".into()],
        description: None,
    }
}

fn stanza_of(info: deb::DebInfo) -> Stanza {
    let filename = apt::pool_filename("main", &info.control).unwrap();
    Stanza::new(&PoolEntry {
        control: info.control,
        filename,
        size: info.size,
        sha256: info.sha256,
    })
    .unwrap()
}

/// Writes the repo's files; a file with the same content as one already
/// written (a by-hash copy and its index) is a hard link, as the hub stores
/// one blob for both.
fn write_files(out: &Path, files: &[pubapt::RepoFile]) {
    let mut written: HashMap<[u8; 32], PathBuf> = HashMap::new();
    for f in files {
        let p = out.join(&f.path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        match written.get(&f.sha256) {
            Some(first) => std::fs::hard_link(first, &p).unwrap(),
            None => {
                std::fs::write(&p, &f.data).unwrap();
                written.insert(f.sha256, p);
            }
        }
    }
}

fn kiln_full(debs: &[PathBuf], key: &RepoKey, out: &Path) -> (Vec<Stanza>, IndexCache) {
    let t = Instant::now();
    let stanzas: Vec<Stanza> = deb::inspect_many(debs, |p| std::fs::File::open(p))
        .into_iter()
        .map(|r| stanza_of(r.unwrap()))
        .collect();
    println!(
        "    (kiln scan of {} debs: {:.1} ms)",
        debs.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let mut cache = IndexCache::new();
    let files =
        pubapt::publish(&cfg(), &stanzas, OffsetDateTime::now_utc(), key, &mut cache).unwrap();
    write_files(out, &files);
    (stanzas, cache)
}

fn kiln_add_one(
    extra: &Path,
    stanzas: &mut HashMap<[u8; 32], Stanza>,
    cache: &mut IndexCache,
    key: &RepoKey,
    out: &Path,
) -> Vec<pubapt::RepoFile> {
    let info = deb::inspect(std::io::BufReader::new(std::fs::File::open(extra).unwrap())).unwrap();
    let s = stanza_of(info);
    stanzas.insert(*s.deb_sha256(), s);
    let files = pubapt::publish(
        &cfg(),
        stanzas.values(),
        OffsetDateTime::now_utc(),
        key,
        cache,
    )
    .unwrap();
    write_files(out, &files);
    files
}

fn run(cmd: &mut Command) {
    let o = cmd.output().unwrap();
    assert!(
        o.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

fn sh(dir: &Path, script: &str) {
    run(Command::new("sh").args(["-ec", script]).current_dir(dir));
}

/// apt-ftparchive packages + gzip + xz + release, the same files kiln writes.
const FTP_SCRIPT: &str = r#"
mkdir -p dists/stable/main/binary-amd64
apt-ftparchive $DB packages pool > dists/stable/main/binary-amd64/Packages
gzip -6 -k -f dists/stable/main/binary-amd64/Packages
xz -6 -k -f dists/stable/main/binary-amd64/Packages
apt-ftparchive -o APT::FTPArchive::Release::Suite=stable -o APT::FTPArchive::Release::Codename=stable \
  -o APT::FTPArchive::Release::Architectures=amd64 -o APT::FTPArchive::Release::Components=main \
  release dists/stable > Release.tmp
mv Release.tmp dists/stable/Release
"#;

fn ftparchive_full(corpus: &Path, dir: &Path) -> Duration {
    // Hard links: apt-ftparchive walks a real directory, no copy cost.
    sh(dir, &format!("cp -al {}/all pool", corpus.display()));
    let t = Instant::now();
    sh(dir, &FTP_SCRIPT.replace("$DB", ""));
    let d = t.elapsed();
    // Untimed: warm a --db cache for the add-one case, and keep a pristine copy.
    sh(dir, &FTP_SCRIPT.replace("$DB", "--db cache.db"));
    sh(dir, "cp cache.db cache.pristine.db");
    d
}

fn ftparchive_add_one(dir: &Path, extra: &Path) -> Duration {
    // A pool with the 10,000 (links) plus the new one; the db knows the 10,000.
    sh(
        dir,
        &format!(
            "ln {} pool/ && cp cache.pristine.db cache.db",
            extra.display()
        ),
    );
    let t = Instant::now();
    sh(dir, &FTP_SCRIPT.replace("$DB", "--db cache.db"));
    let d = t.elapsed();
    assert!(
        std::fs::read_to_string(dir.join("dists/stable/main/binary-amd64/Packages"))
            .unwrap()
            .contains(&format!("Package: {EXTRA}\n"))
    );
    d
}

fn reprepro_full(debs: &[PathBuf], dir: &Path) -> Duration {
    std::fs::create_dir_all(dir.join("conf")).unwrap();
    std::fs::write(
        dir.join("conf/distributions"),
        "Origin: bench\nLabel: bench\nSuite: stable\nCodename: stable\nArchitectures: amd64\n\
         Components: main\nDebIndices: Packages Release . .gz .xz\n",
    )
    .unwrap();
    let t = Instant::now();
    run(Command::new("reprepro")
        .args(["-b"])
        .arg(dir)
        .args(["--silent", "includedeb", "stable"])
        .args(debs));
    t.elapsed()
}

fn reprepro_add_one(dir: &Path, extra: &Path) -> Duration {
    let t = Instant::now();
    run(Command::new("reprepro")
        .arg("-b")
        .arg(dir)
        .args(["--silent", "includedeb", "stable"])
        .arg(extra));
    let d = t.elapsed();
    assert!(
        std::fs::read_to_string(dir.join("dists/stable/main/binary-amd64/Packages"))
            .unwrap()
            .contains(&format!("Package: {EXTRA}\n"))
    );
    d
}

fn aptly_conf(dir: &Path) -> PathBuf {
    let conf = dir.join("aptly.conf");
    std::fs::write(
        &conf,
        format!(
            r#"{{"rootDir": "{}", "architectures": ["amd64"], "gpgDisableSign": true, "gpgDisableVerify": true, "skipContentsPublishing": true}}"#,
            dir.join("root").display()
        ),
    )
    .unwrap();
    conf
}

fn aptly(conf: &Path, args: &[&str]) {
    run(Command::new("aptly")
        .arg(format!("-config={}", conf.display()))
        .args(args));
}

fn aptly_full(corpus: &Path, dir: &Path) -> Duration {
    let conf = aptly_conf(dir);
    let all = corpus.join("all");
    let t = Instant::now();
    aptly(
        &conf,
        &[
            "repo",
            "create",
            "-distribution=stable",
            "-component=main",
            "bench",
        ],
    );
    aptly(&conf, &["repo", "add", "bench", all.to_str().unwrap()]);
    aptly(
        &conf,
        &[
            "publish",
            "repo",
            "-skip-signing",
            "-skip-contents",
            "bench",
        ],
    );
    t.elapsed()
}

fn aptly_add_one(dir: &Path, extra: &Path) -> Duration {
    let conf = dir.join("aptly.conf");
    let t = Instant::now();
    aptly(&conf, &["repo", "add", "bench", extra.to_str().unwrap()]);
    aptly(
        &conf,
        &[
            "publish",
            "update",
            "-skip-signing",
            "-skip-contents",
            "stable",
        ],
    );
    let d = t.elapsed();
    assert!(
        std::fs::read_to_string(dir.join("root/public/dists/stable/main/binary-amd64/Packages"))
            .unwrap()
            .contains(&format!("Package: {EXTRA}\n"))
    );
    d
}

// ---------- corpus ----------

fn make_corpus(dir: &Path) {
    if dir.join("complete").exists() {
        return;
    }
    let t = Instant::now();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("all")).unwrap();
    std::fs::create_dir_all(dir.join("extra")).unwrap();
    for i in 0..N {
        let name = format!("pkg{i:05}");
        std::fs::write(
            dir.join(format!("all/{name}_1.0_amd64.deb")),
            make_deb(&name, i),
        )
        .unwrap();
    }
    std::fs::write(
        dir.join(format!("extra/{EXTRA}_1.0_amd64.deb")),
        make_deb(EXTRA, N),
    )
    .unwrap();
    // Sanity: dpkg-deb agrees these are packages.
    let o = Command::new("dpkg-deb")
        .args(["-f"])
        .arg(dir.join("all/pkg00042_1.0_amd64.deb"))
        .arg("Package")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "pkg00042\n");
    std::fs::write(dir.join("complete"), "").unwrap();
    println!("generated {N} debs in {:?}", t.elapsed());
}

fn targz(entries: &[(&str, Option<&[u8]>)]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
    let mut b = tar::Builder::new(gz);
    for (path, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_path(path).unwrap();
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        match data {
            Some(d) => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(0o644);
                h.set_size(d.len() as u64);
                h.set_cksum();
                b.append(&h, *d).unwrap();
            }
            None => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(0o755);
                h.set_size(0);
                h.set_cksum();
                b.append(&h, std::io::empty()).unwrap();
            }
        }
    }
    b.into_inner().unwrap().finish().unwrap()
}

fn make_deb(name: &str, i: usize) -> Vec<u8> {
    let control = format!(
        "Package: {name}\nVersion: 1.0\nArchitecture: amd64\nMaintainer: Kiln Bench <bench@kiln.invalid>\n\
         Installed-Size: 1\nDepends: libc6 (>= 2.36)\nSection: misc\nPriority: optional\n\
         Description: benchmark package number {i}\n This package exists to measure repository publishing.\n \
         It carries one small file.\n"
    );
    let readme = format!("benchmark payload {i}\n");
    let docdir = format!("./usr/share/doc/{name}/");
    let file = format!("{docdir}README");
    let ctl = targz(&[("./", None), ("./control", Some(control.as_bytes()))]);
    let data = targz(&[
        ("./", None),
        ("./usr/", None),
        ("./usr/share/", None),
        ("./usr/share/doc/", None),
        (&docdir, None),
        (&file, Some(readme.as_bytes())),
    ]);
    let mut out = b"!<arch>\n".to_vec();
    for (member, body) in [
        ("debian-binary", b"2.0\n".as_slice()),
        ("control.tar.gz", &ctl),
        ("data.tar.gz", &data),
    ] {
        writeln!(
            out,
            "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`",
            member,
            1_700_000_000,
            0,
            0,
            "100644",
            body.len()
        )
        .unwrap();
        out.extend_from_slice(body);
        if body.len() % 2 == 1 {
            out.push(b'\n');
        }
    }
    out
}
