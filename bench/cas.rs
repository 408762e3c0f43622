//! Ingest benchmark: `Cas::put_file` and `ingest_tar` against the CLI tools
//! doing the same work (`sha256sum`, `zstd -3 -T0`, and both in a pipeline).
//!
//! `cargo bench --bench cas`. Env: `KILN_BENCH_MB` (corpus size, default
//! 500), `KILN_BENCH_ROUNDS` (default 5). The corpus is a tar of files from
//! /usr/lib (made with `tar`, a whole number of files up to the size), cached
//! under `target/bench-corpus/`.

#[path = "common.rs"]
mod common;
use common::{env_num, target_dir};

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use kiln::cas::Cas;

/// A named benchmark case.
type Case<'a> = (&'static str, Box<dyn Fn() + 'a>);

/// Paths under `dir` (relative to /) in sorted depth-first order until the
/// regular files add up to `budget` bytes.
fn collect(dir: &Path, budget: &mut u64, out: &mut Vec<PathBuf>) -> io::Result<()> {
    let mut names: Vec<_> = fs::read_dir(dir)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .collect();
    names.sort();
    for p in names {
        if *budget == 0 {
            return Ok(());
        }
        let Ok(meta) = fs::symlink_metadata(&p) else {
            continue;
        };
        let ft = meta.file_type();
        let rel = p.strip_prefix("/").expect("absolute").to_path_buf();
        if ft.is_dir() {
            out.push(rel);
            collect(&p, budget, out)?;
        } else if ft.is_symlink() {
            // Uploads refuse links that may leave the tree; leave them out.
            let target = fs::read_link(&p)?;
            let t = target.to_string_lossy();
            if !t.starts_with('/') && !t.contains("..") {
                out.push(rel);
            }
        } else if ft.is_file() && File::open(&p).is_ok() {
            *budget = budget.saturating_sub(meta.len());
            out.push(rel);
        }
    }
    Ok(())
}

fn corpus(mb: u64) -> PathBuf {
    let dir = target_dir().join("bench-corpus");
    fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("usr-lib-{mb}MB-v2.tar"));
    if path.exists() {
        return path;
    }
    eprintln!("building corpus {} ...", path.display());
    let mut budget = mb << 20;
    let mut list = Vec::new();
    collect(Path::new("/usr/lib"), &mut budget, &mut list).unwrap();
    let list_path = dir.join("list.txt");
    let mut text = Vec::new();
    for p in &list {
        use std::os::unix::ffi::OsStrExt;
        text.extend_from_slice(p.as_os_str().as_bytes());
        text.push(0);
    }
    fs::write(&list_path, text).unwrap();
    let partial = dir.join("corpus.partial");
    let status = Command::new("tar")
        .args(["--null", "--no-recursion", "-C", "/", "-cf"])
        .arg(&partial)
        .arg("-T")
        .arg(&list_path)
        .status()
        .unwrap();
    assert!(status.success(), "tar failed");
    fs::rename(&partial, &path).unwrap();
    path
}

fn sh(script: &str) {
    let st = Command::new("bash").args(["-c", script]).status().unwrap();
    assert!(st.success(), "{script} failed");
}

fn time(f: impl FnOnce()) -> Duration {
    let t = Instant::now();
    f();
    t.elapsed()
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    let mb = env_num("KILN_BENCH_MB", 500);
    let rounds = env_num("KILN_BENCH_ROUNDS", 5) as usize;
    let corpus = corpus(mb);
    let size = fs::metadata(&corpus).unwrap().len();
    let work = target_dir().join("bench-work");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).unwrap();

    // Into the page cache; repeated before every case because the host may
    // reclaim cold page cache between runs.
    let warm = || {
        let mut f = File::open(&corpus).unwrap();
        io::copy(&mut f, &mut io::sink()).unwrap();
    };

    let c = corpus.display().to_string();
    let out = work.join("out.zst").display().to_string();
    let cases: [Case; 5] = [
        (
            "kiln put_file (incl. fsync)",
            Box::new(|| {
                let root = work.join("store");
                let cas = Cas::open(&root).unwrap();
                let t = time(|| {
                    cas.put_file(&corpus).unwrap();
                });
                drop(cas);
                fs::remove_dir_all(&root).unwrap();
                LAST.with(|l| l.set(Some(t)));
            }),
        ),
        (
            "sha256sum",
            Box::new(|| sh(&format!("sha256sum '{c}' > /dev/null"))),
        ),
        (
            "zstd -3 -T0 (to file, no fsync)",
            Box::new(|| sh(&format!("zstd -3 -T0 -q -f '{c}' -o '{out}'"))),
        ),
        (
            "tee | sha256sum + zstd -3 -T0",
            Box::new(|| {
                sh(&format!(
                    "tee >(sha256sum > /dev/null) < '{c}' | zstd -3 -T0 -q -f -o '{out}'; wait $!"
                ))
            }),
        ),
        (
            "kiln ingest_tar + commit",
            Box::new(|| {
                let root = work.join("store");
                let cas = Cas::open(&root).unwrap();
                let t = time(|| {
                    let f = File::open(&corpus).unwrap();
                    cas.ingest_tar(io::BufReader::new(f), u64::MAX)
                        .unwrap()
                        .commit()
                        .unwrap();
                });
                drop(cas);
                fs::remove_dir_all(&root).unwrap();
                LAST.with(|l| l.set(Some(t)));
            }),
        ),
    ];

    let mut times: Vec<Vec<Duration>> = vec![Vec::new(); cases.len()];
    for round in 0..rounds {
        for (i, (name, run)) in cases.iter().enumerate() {
            warm();
            LAST.with(|l| l.set(None));
            let wall = time(run);
            let _ = fs::remove_file(&out);
            // Kiln cases time only the store operation, not setup/cleanup.
            let t = LAST.with(|l| l.get()).unwrap_or(wall);
            eprintln!("round {round} {name}: {:.3}s", t.as_secs_f64());
            times[i].push(t);
        }
    }

    let mbps = |d: Duration| size as f64 / 1e6 / d.as_secs_f64();
    let med: Vec<Duration> = times.iter_mut().map(|t| median(t)).collect();
    println!();
    println!(
        "corpus: {} ({:.0} MB), {rounds} rounds, medians, {} cores",
        corpus.display(),
        size as f64 / 1e6,
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!("| case | median s | MB/s |");
    println!("|---|---:|---:|");
    for ((name, _), d) in cases.iter().zip(&med) {
        println!("| {name} | {:.3} | {:.0} |", d.as_secs_f64(), mbps(*d));
    }
    println!();
    println!(
        "kiln put_file / zstd -T0:   {:.2}x throughput",
        mbps(med[0]) / mbps(med[2])
    );
    println!(
        "kiln put_file / pipeline:   {:.2}x throughput",
        mbps(med[0]) / mbps(med[3])
    );
    println!(
        "kiln ingest_tar / pipeline: {:.2}x throughput",
        mbps(med[4]) / mbps(med[3])
    );
    let _ = fs::remove_dir_all(&work);
}

thread_local! {
    static LAST: std::cell::Cell<Option<Duration>> = const { std::cell::Cell::new(None) };
}
