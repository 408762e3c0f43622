//! Publishing 10,000 `.deb`s: kiln vs apt-ftparchive, reprepro and aptly; and
//! 10,000 `.rpm`s: kiln vs createrepo_c.
//!
//! Run: `cargo bench --bench publish` (rounds: `KILN_BENCH_ROUNDS`, default 3;
//! cases: `KILN_BENCH_CASES=deb,rpm`, the default, or one of them).
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
//!
//! The rpm case (corpus: `/tmp/kiln-bench-rpms-v1`, made with rpm-rs's
//! PackageBuilder, one sample checked with `rpm -qpi`):
//! - full: kiln reads every .rpm from disk, `rpm::inspect`s it (sha256 included, on
//!   2 threads) and builds signed repodata; createrepo_c `--workers 2` runs unsigned,
//!   once with its default sqlite databases and once with `--no-database`.
//! - add-one: the 10,000 plus one: kiln inspects the new file and rebuilds with the
//!   warm `RepodataCache`; createrepo_c `--update` (both variants) on its repo.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln::publish as pubapt;
use kiln::publish::{
    Fragments, IndexCache, PoolEntry, RepoKey, RepodataCache, RpmInfo, Stanza, SuiteConfig, apt,
    deb, rpm,
};
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
    let cases = std::env::var("KILN_BENCH_CASES").unwrap_or_else(|_| "deb,rpm".into());
    let case = |c: &str| cases.split(',').any(|w| w.trim() == c);
    if case("deb") {
        deb_case(rounds);
    }
    if case("rpm") {
        rpm_case(rounds);
    }
}

fn deb_case(rounds: usize) {
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

    let median = |name: &str| median_ms(&times, name);
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

// ---------- rpm ----------

const RPM_CORPUS: &str = "/tmp/kiln-bench-rpms-v1";
const RPM_EXTRA: &str = "pkg05000b";

fn rpm_case(rounds: usize) {
    let corpus = Path::new(RPM_CORPUS);
    make_rpm_corpus(corpus);
    let rpms: Vec<PathBuf> = (0..N)
        .map(|i| corpus.join(format!("all/pkg{i:05}-1.0-1.x86_64.rpm")))
        .collect();
    let extra = corpus.join(format!("extra/{RPM_EXTRA}-1.0-1.x86_64.rpm"));
    let work = tempfile::Builder::new()
        .prefix("kiln-bench-rpm-")
        .tempdir()
        .unwrap();
    let w = work.path();
    let key = RepoKey::generate("kiln bench <bench@localhost>").unwrap();
    let have_createrepo = have("createrepo_c");
    if !have_createrepo {
        println!("skipping createrepo_c: not installed");
    }
    // (name, extra createrepo_c arguments)
    let variants: &[(&str, &[&str])] = if have_createrepo {
        &[
            ("createrepo_c", &[]),
            ("createrepo_c --no-database", &["--no-database"]),
        ]
    } else {
        &[]
    };

    let mut times: HashMap<String, Vec<Duration>> = HashMap::new();
    let mut record = |name: &str, d: Duration| {
        println!("  {name:<36} {:>9.1} ms", d.as_secs_f64() * 1e3);
        times.entry(name.to_string()).or_default().push(d);
    };
    for round in 0..rounds {
        println!("rpm round {}/{rounds}", round + 1);
        let out = w.join(format!("kiln-full-{round}"));
        let t = Instant::now();
        let (mut frags, mut cache) = kiln_rpm_full(&rpms, &key, &out);
        record("kiln full", t.elapsed());

        for (name, args) in variants {
            let dir = w.join(format!("cr-{}-{round}", args.len()));
            std::fs::create_dir_all(&dir).unwrap();
            // Hard links: createrepo_c reads a real directory, no copy cost.
            sh(&dir, &format!("cp -al {}/all Packages", corpus.display()));
            let t = Instant::now();
            run(Command::new("createrepo_c")
                .args(["-q", "--workers", "2"])
                .args(*args)
                .arg(&dir));
            record(&format!("{name} full"), t.elapsed());
        }

        let out = w.join(format!("kiln-add-{round}"));
        let t = Instant::now();
        let files = kiln_rpm_add_one(&extra, &mut frags, &mut cache, &key, &out);
        record("kiln add-one", t.elapsed());
        let primary = files
            .iter()
            .find(|f| f.path.ends_with("-primary.xml.gz"))
            .unwrap();
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut flate2::read::MultiGzDecoder::new(&primary.data[..]),
            &mut text,
        )
        .unwrap();
        assert!(text.contains(&format!("<name>{RPM_EXTRA}</name>")));
        assert!(text.contains(&format!("packages=\"{}\"", N + 1)));
        assert_eq!(cache.compressed(), 1, "one chunk recompressed");

        for (name, args) in variants {
            let dir = w.join(format!("cr-{}-{round}", args.len()));
            std::fs::hard_link(
                &extra,
                dir.join(format!("Packages/{RPM_EXTRA}-1.0-1.x86_64.rpm")),
            )
            .unwrap();
            let t = Instant::now();
            run(Command::new("createrepo_c")
                .args(["-q", "--update", "--workers", "2"])
                .args(*args)
                .arg(&dir));
            record(&format!("{name} add-one"), t.elapsed());
            let _ = std::fs::remove_dir_all(&dir);
        }
        let _ = std::fs::remove_dir_all(w.join(format!("kiln-full-{round}")));
        let _ = std::fs::remove_dir_all(w.join(format!("kiln-add-{round}")));
    }

    let median = |name: &str| median_ms(&times, name);
    println!("\nrpm: medians over {rounds} rounds, {N} packages (ms):");
    let kf = median("kiln full").unwrap();
    let ka = median("kiln add-one").unwrap();
    println!("  {:<28} {:>10} {:>10}", "", "full", "add-one");
    println!("  {:<28} {:>10.1} {:>10.1}", "kiln (signed)", kf, ka);
    for (name, _) in variants {
        let (f, a) = (
            median(&format!("{name} full")).unwrap(),
            median(&format!("{name} add-one")).unwrap(),
        );
        println!(
            "  {name:<28} {f:>10.1} {a:>10.1}   peer/kiln: full {:.2}x, add-one {:.1}x",
            f / kf,
            a / ka
        );
    }
    println!("  goals: full >= 1x, add-one >= 20x");
}

/// Reads and inspects every RPM on all cores (createrepo_c gets `--workers 2`),
/// then builds and writes signed repodata.
fn kiln_rpm_full(
    rpms: &[PathBuf],
    key: &RepoKey,
    out: &Path,
) -> (HashMap<[u8; 32], Fragments>, RepodataCache) {
    let t = Instant::now();
    let infos: Vec<RpmInfo> =
        pubapt::par_map(rpms, |p| rpm::inspect(&std::fs::read(p).unwrap()).unwrap());
    println!(
        "    (kiln scan of {} rpms: {:.1} ms)",
        rpms.len(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let frags: HashMap<[u8; 32], Fragments> =
        infos.into_iter().map(|i| (i.sha256, i.fragments)).collect();
    let mut cache = RepodataCache::new();
    let files = rpm::build_repodata(frags.values(), 1, unix_now(), key, &mut cache).unwrap();
    write_files(out, &files);
    (frags, cache)
}

fn kiln_rpm_add_one(
    extra: &Path,
    frags: &mut HashMap<[u8; 32], Fragments>,
    cache: &mut RepodataCache,
    key: &RepoKey,
    out: &Path,
) -> Vec<pubapt::RepoFile> {
    let info = rpm::inspect(&std::fs::read(extra).unwrap()).unwrap();
    frags.insert(info.sha256, info.fragments);
    let files = rpm::build_repodata(frags.values(), 2, unix_now(), key, cache).unwrap();
    write_files(out, &files);
    files
}

fn unix_now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn make_rpm_corpus(dir: &Path) {
    if dir.join("complete").exists() {
        return;
    }
    let t = Instant::now();
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("all")).unwrap();
    std::fs::create_dir_all(dir.join("extra")).unwrap();
    for i in 0..N {
        let name = format!("pkg{i:05}");
        let p = dir.join(format!("all/{name}-1.0-1.x86_64.rpm"));
        std::fs::write(p, make_rpm(&name, i)).unwrap();
    }
    let p = dir.join(format!("extra/{RPM_EXTRA}-1.0-1.x86_64.rpm"));
    std::fs::write(p, make_rpm(RPM_EXTRA, N)).unwrap();
    // Sanity: rpm agrees these are packages.
    let o = Command::new("rpm")
        .args([
            "--dbpath",
            "/nonexistent-kiln-bench",
            "-qp",
            "--qf",
            "%{NAME} %{SUMMARY}\n",
        ])
        .arg(dir.join("all/pkg00042-1.0-1.x86_64.rpm"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "pkg00042 Package pkg00042 for the kiln benchmark\n",
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(dir.join("complete"), "").unwrap();
    println!("generated {N} rpms in {:?}", t.elapsed());
}

/// A small package: a script in /usr/bin and a data file, one requirement on the
/// previous package, a changelog entry. Uncompressed payload (rpm-rs's codecs are
/// not enabled); the repodata work does not read payloads.
fn make_rpm(name: &str, i: usize) -> Vec<u8> {
    use ::rpm::{Dependency, FileOptions, PackageBuilder};
    let summary = format!("Package {name} for the kiln benchmark");
    let mut b = PackageBuilder::new(name, "1.0", "MIT", "x86_64", &summary);
    b.release("1")
        .description(format!(
            "{name} is number {i} of the generated corpus.\nIt does nothing."
        ))
        .url("https://example.org/kiln")
        .vendor("kiln")
        .build_host("bench")
        .add_changelog_entry(
            "Kiln Bench <bench@example.org> - 1.0-1",
            "- Generated",
            1_700_000_000u32,
        );
    b.with_file_contents(
        format!("#!/bin/sh\necho {name}\n").into_bytes(),
        FileOptions::new(format!("/usr/bin/{name}")).mode(0o100755),
    )
    .unwrap()
    .with_file_contents(
        format!("data of {name}\n").into_bytes(),
        FileOptions::new(format!("/usr/share/{name}/data.txt")),
    )
    .unwrap();
    if i > 0 {
        b.requires(Dependency::greater_eq(format!("pkg{:05}", i - 1), "1.0"));
    }
    let pkg = b.build().unwrap();
    let mut out = Vec::new();
    pkg.write(&mut out).unwrap();
    out
}

/// The median of `name`'s recorded times, in milliseconds.
fn median_ms(times: &HashMap<String, Vec<Duration>>, name: &str) -> Option<f64> {
    let mut v: Vec<f64> = times
        .get(name)?
        .iter()
        .map(|d| d.as_secs_f64() * 1e3)
        .collect();
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// Whether `tool` is on PATH.
fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}
