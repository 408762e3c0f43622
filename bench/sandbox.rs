//! Sandbox overhead benchmark: kiln's sandbox against running bare and
//! against bubblewrap, side by side in one run.
//!
//! `cargo bench --bench sandbox` (needs `bwrap`, `make` and `cc` on `PATH`;
//! as root, kiln maps the build to its subordinate id range). Env:
//! `KILN_BENCH_ROUNDS` (spawn rounds, default 50), `KILN_BENCH_COMPILE_ROUNDS`
//! (compile rounds, default 5), `KILN_BENCH_C_FILES` (default 300).
//!
//! 1. Spawn latency: `/bin/true` bare, through `kiln::sandbox::run`, and in
//!    `bwrap --unshare-all --die-with-parent --ro-bind / / --proc /proc --dev
//!    /dev --tmpfs /tmp`, interleaved.
//! 2. Compile: a generated tree of small C files (deterministic) built with
//!    `make -j2` bare, in kiln's sandbox (tree as `build_dir`, at `/build`),
//!    and in bwrap (tree bound onto its own path: `/build` cannot be created
//!    under bwrap's read-only `/`), interleaved, cleaned between rounds. Every
//!    build is checked: all objects present and the linked program prints the
//!    expected sum.
//!
//! Each case's time runs from spawn until the process is reaped and its
//! output pipe (stdout + stderr, drained by a thread) reaches EOF. The kiln
//! time includes `run`'s preparation (spec file, chown of the tree as root).
//! The compile also reports CPU time (user + sys of reaped descendants, via
//! `getrusage(RUSAGE_CHILDREN)`) for bare and kiln, steadier than wall time
//! on a busy machine; bwrap's cannot be measured that way (its outer process
//! does not reap its pid 1). Goals: kiln's spawn median at most bwrap's;
//! kiln's compile median under 2 % over bare.

#[path = "common.rs"]
mod common;
use common::{env_num, target_dir};

use std::fmt::Write as _;
use std::fs;
use std::io::Read as _;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln::sandbox::{self, IdMap, RootSpec, Spec};
use tokio_util::sync::CancellationToken;

const BWRAP: &[&str] = &[
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/",
    "/",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--tmpfs",
    "/tmp",
];

const MODES: [&str; 3] = ["bare", "kiln", "bwrap"];

/// A pipe whose read end a thread drains to EOF; the write end goes to the child.
fn drained_pipe() -> (OwnedFd, JoinHandle<String>) {
    let (mut reader, writer) = std::io::pipe().expect("pipe");
    let drain = std::thread::spawn(move || {
        let mut out = Vec::new();
        reader.read_to_end(&mut out).expect("reading log pipe");
        String::from_utf8_lossy(&out).into_owned()
    });
    (writer.into(), drain)
}

/// CPU time (user + system) of all reaped descendants so far.
fn children_cpu() -> Duration {
    use nix::sys::resource::{UsageWho, getrusage};
    let u = getrusage(UsageWho::RUSAGE_CHILDREN).expect("getrusage");
    let d =
        |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
    d(u.user_time()) + d(u.system_time())
}

/// One process run: wall and CPU time, whether it succeeded, its output.
struct Ran {
    time: Duration,
    cpu: Duration,
    ok: bool,
    log: String,
}

/// Run `argv` bare (`bwrap == None`) or under bwrap with the extra args,
/// with exactly `env`, in `cwd`.
fn run_host(
    argv: &[String],
    bwrap: Option<&[String]>,
    env: &[(String, String)],
    cwd: &Path,
) -> Ran {
    let (fd, drain) = drained_pipe();
    let cpu = children_cpu();
    let t = Instant::now();
    let mut cmd = match bwrap {
        None => Command::new(&argv[0]),
        Some(extra) => {
            let mut c = Command::new("bwrap");
            c.args(BWRAP).args(extra).arg("--").arg(&argv[0]);
            c
        }
    };
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(fd.try_clone().expect("dup")))
        .stderr(Stdio::from(fd));
    let status = cmd.status().expect("spawn");
    drop(cmd);
    let log = drain.join().expect("drain thread");
    Ran {
        time: t.elapsed(),
        cpu: children_cpu() - cpu,
        ok: status.success(),
        log,
    }
}

fn run_kiln(rt: &tokio::runtime::Runtime, spec: &Spec, work: &Path) -> Ran {
    let exe = Path::new(env!("CARGO_BIN_EXE_kiln"));
    let (fd, drain) = drained_pipe();
    let cpu = children_cpu();
    let t = Instant::now();
    let outcome = rt
        .block_on(sandbox::run(exe, spec, work, fd, CancellationToken::new()))
        .expect("sandbox run");
    let log = drain.join().expect("drain thread");
    Ran {
        time: t.elapsed(),
        cpu: children_cpu() - cpu,
        ok: outcome.success(),
        log: format!("{log}[{outcome}]"),
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Deterministic C tree: `n` units with a few loop-heavy functions each, a
/// `main.c` that calls every unit, and a Makefile. Returns the expected output
/// of the program.
fn generate(dir: &Path, n: usize) -> String {
    let _ = fs::remove_dir_all(dir);
    fs::create_dir_all(dir).expect("mkdir tree");
    for i in 0..n {
        let mut c = String::from("#include <stdint.h>\n#include <string.h>\n\n");
        for f in 0..2 {
            let (a, b) = (i * 7 + f * 13 + 3, i * 11 + f * 5 + 1);
            writeln!(
                c,
                "static uint32_t table_{f}[64] = {{{}}};\n\
                 static uint32_t mix_{f}(uint32_t x) {{\n\
                 \tfor (int k = 0; k < 8; k++) {{\n\
                 \t\tx ^= x << {s1}; x ^= x >> {s2}; x ^= x << {s3};\n\
                 \t\tx += table_{f}[(x + k) & 63] * {a}u;\n\
                 \t\tswitch (x % 5) {{\n\
                 \t\tcase 0: x = x * {b}u + 1; break;\n\
                 \t\tcase 1: x = (x >> 3) | (x << 29); break;\n\
                 \t\tcase 2: x -= table_{f}[k & 63]; break;\n\
                 \t\tcase 3: x ^= 0x9e3779b9u; break;\n\
                 \t\tdefault: x += {a}u; break;\n\
                 \t\t}}\n\
                 \t}}\n\
                 \treturn x;\n\
                 }}\n\
                 struct rec_{f} {{ uint32_t v[8]; char name[16]; }};\n\
                 static uint32_t sort_{f}(uint32_t seed) {{\n\
                 \tstruct rec_{f} r[16];\n\
                 \tfor (int k = 0; k < 16; k++) {{\n\
                 \t\tfor (int j = 0; j < 8; j++) r[k].v[j] = mix_{f}(seed + k * 8 + j);\n\
                 \t\tmemset(r[k].name, 'a' + k, sizeof r[k].name);\n\
                 \t}}\n\
                 \tfor (int k = 1; k < 16; k++)\n\
                 \t\tfor (int j = k; j > 0 && r[j - 1].v[0] > r[j].v[0]; j--) {{\n\
                 \t\t\tstruct rec_{f} t = r[j]; r[j] = r[j - 1]; r[j - 1] = t;\n\
                 \t\t}}\n\
                 \tuint32_t acc = 0;\n\
                 \tfor (int k = 0; k < 16; k++) acc = acc * 31 + r[k].v[k & 7] + (uint32_t)r[k].name[k];\n\
                 \treturn acc;\n\
                 }}",
                (0..64)
                    .map(|k| ((i * 64 + f * 4096 + k) * 2_654_435_761 % 1_000_003).to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                s1 = 13 - f,
                s2 = 17 - f,
                s3 = 5 + f,
            )
            .unwrap();
        }
        writeln!(
            c,
            "uint32_t unit_{i}(uint32_t seed) {{\n\
             \treturn sort_0(seed) ^ sort_1(seed + 1);\n\
             }}"
        )
        .unwrap();
        fs::write(dir.join(format!("u{i}.c")), c).expect("write unit");
    }
    let mut main = String::from("#include <stdint.h>\n#include <stdio.h>\n\n");
    for i in 0..n {
        writeln!(main, "uint32_t unit_{i}(uint32_t);").unwrap();
    }
    main.push_str("int main(void) {\n\tuint32_t sum = 0;\n");
    for i in 0..n {
        writeln!(main, "\tsum = sum * 3 + unit_{i}({i}u);").unwrap();
    }
    main.push_str("\tprintf(\"%u units, sum %u\\n\", ");
    writeln!(main, "{n}u, sum);\n\treturn 0;\n}}").unwrap();
    fs::write(dir.join("main.c"), main).expect("write main.c");
    let objs: Vec<String> = (0..n).map(|i| format!("u{i}.o")).collect();
    fs::write(
        dir.join("Makefile"),
        format!(
            "CC = cc\nCFLAGS = -O2 -Wall\nOBJS = main.o {}\n\n\
             app: $(OBJS)\n\t$(CC) -o $@ $(OBJS)\n\n\
             %.o: %.c\n\t$(CC) $(CFLAGS) -c -o $@ $<\n\n\
             clean:\n\trm -f app *.o\n",
            objs.join(" ")
        ),
    )
    .expect("write Makefile");
    // The reference output: one bare build, checked by every later build.
    let ran = run_host(&["make".into(), "-j2".into()], None, &Spec::base_env(), dir);
    assert!(ran.ok, "reference build failed:\n{}", ran.log);
    let out = Command::new(dir.join("app")).output().expect("run app");
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).expect("utf-8");
    assert!(text.starts_with(&format!("{n} units, sum ")), "{text}");
    text
}

/// Remove build outputs (outside the timing).
fn clean(dir: &Path) {
    for e in fs::read_dir(dir).expect("read tree").flatten() {
        let name = e.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".o") || name == "app" {
            fs::remove_file(e.path()).expect("clean");
        }
    }
}

/// Give the tree back to us (outside the timing): as root, kiln's `run` chowns
/// it to the sandbox's mapped root, and bwrap's root (no capabilities) could
/// then not write it. Every kiln round thus pays the chown a fresh checkout
/// would cost.
fn reown(path: &Path) {
    use std::os::unix::fs::MetadataExt as _;
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    let meta = fs::symlink_metadata(path).expect("stat");
    if meta.uid() != uid || meta.gid() != gid {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).expect("lchown");
    }
    if meta.is_dir() {
        for e in fs::read_dir(path).expect("read dir").flatten() {
            reown(&e.path());
        }
    }
}

/// Check that a build produced every object and a program with the expected output.
fn check_build(dir: &Path, n: usize, expected: &str, mode: &str) {
    let objs = fs::read_dir(dir)
        .expect("read tree")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".o"))
        .count();
    assert_eq!(objs, n + 1, "{mode}: wrong object count");
    let out = Command::new(dir.join("app")).output().expect("run app");
    assert!(out.status.success(), "{mode}: app failed");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        expected,
        "{mode}: wrong output"
    );
}

fn main() {
    let rounds = env_num("KILN_BENCH_ROUNDS", 50).max(1);
    let compile_rounds = env_num("KILN_BENCH_COMPILE_ROUNDS", 5).max(1);
    let n_files = env_num("KILN_BENCH_C_FILES", 300).max(1);
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);

    let status = Command::new("bwrap").arg("--version").output();
    assert!(
        status.is_ok_and(|o| o.status.success()),
        "bwrap not found (apt-get install bubblewrap)"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let base = target_dir().join("bench-sandbox");
    let _ = fs::remove_dir_all(&base);
    let [tree, out, work, empty] = ["tree", "out", "work", "empty"].map(|d| base.join(d));
    for d in [&out, &work, &empty] {
        fs::create_dir_all(d).expect("mkdir");
    }
    let env = Spec::base_env();
    let spec = |build_dir: &Path, argv: &[&str]| Spec {
        root: RootSpec::Host,
        build_dir: build_dir.to_owned(),
        out_dir: out.clone(),
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: env.clone(),
        cwd: "/build".into(),
        hostname: "kiln".into(),
        ids: IdMap::for_slot(0),
        limits: Default::default(),
        cgroup_name: String::new(),
        disk_bytes: None,
        network: Default::default(),
        setup: None,
        binds: vec![],
        hardening: Default::default(),
    };

    // Runs `argv` once in `mode` with `build_dir` as the working tree.
    let run_case = |mode: &str, build_dir: &Path, argv: &[&str]| -> Ran {
        let argv_s: Vec<String> = argv.iter().map(|s| s.to_string()).collect();
        match mode {
            "bare" => run_host(&argv_s, None, &env, build_dir),
            "kiln" => run_kiln(&rt, &spec(build_dir, argv), &work),
            _ => {
                let d = build_dir.display().to_string();
                let extra = ["--bind", &d, &d, "--chdir", &d].map(String::from);
                run_host(&argv_s, Some(&extra), &env, build_dir)
            }
        }
    };

    // 1. Spawn latency.
    eprintln!("spawn: {rounds} rounds of /bin/true ...");
    for mode in MODES {
        // Warm-up: page cache, first-use costs.
        let r = run_case(mode, &empty, &["/bin/true"]);
        assert!(r.ok, "{mode} /bin/true failed: {}", r.log);
        reown(&empty);
    }
    let mut spawn: [Vec<Duration>; 3] = Default::default();
    for _ in 0..rounds {
        for (i, mode) in MODES.iter().enumerate() {
            let r = run_case(mode, &empty, &["/bin/true"]);
            assert!(r.ok, "{mode} /bin/true failed: {}", r.log);
            reown(&empty);
            spawn[i].push(r.time);
        }
    }

    // 2. Compile.
    eprintln!("compile: generating {n_files} C files and a reference build ...");
    let expected = generate(&tree, n_files);
    clean(&tree);
    let mut compile: [Vec<Duration>; 3] = Default::default();
    let mut compile_cpu: [Vec<Duration>; 3] = Default::default();
    for round in 0..compile_rounds {
        for (i, mode) in MODES.iter().enumerate() {
            let r = run_case(mode, &tree, &["/usr/bin/make", "-j2"]);
            assert!(r.ok, "{mode} make failed:\n{}", r.log);
            check_build(&tree, n_files, &expected, mode);
            clean(&tree);
            reown(&tree);
            eprintln!(
                "compile round {round} {mode}: {:.3}s wall, {:.3}s cpu",
                r.time.as_secs_f64(),
                r.cpu.as_secs_f64()
            );
            compile[i].push(r.time);
            compile_cpu[i].push(r.cpu);
        }
    }

    // Report.
    let sp: Vec<Duration> = spawn.iter().map(|v| median(v)).collect();
    let co: Vec<Duration> = compile.iter().map(|v| median(v)).collect();
    let cc: Vec<Duration> = compile_cpu.iter().map(|v| median(v)).collect();
    let min = |v: &[Duration]| v.iter().min().copied().unwrap_or_default();
    println!();
    println!(
        "{cores} cores; spawn: {rounds} rounds; compile: {} C files, make -j2, {compile_rounds} rounds; medians (min)",
        n_files + 1
    );
    println!("| case | bare | kiln | bwrap |");
    println!("|---|---:|---:|---:|");
    println!(
        "| /bin/true, ms | {:.2} ({:.2}) | {:.2} ({:.2}) | {:.2} ({:.2}) |",
        ms(sp[0]),
        ms(min(&spawn[0])),
        ms(sp[1]),
        ms(min(&spawn[1])),
        ms(sp[2]),
        ms(min(&spawn[2])),
    );
    println!(
        "| make -j2, s | {:.3} ({:.3}) | {:.3} ({:.3}) | {:.3} ({:.3}) |",
        co[0].as_secs_f64(),
        min(&compile[0]).as_secs_f64(),
        co[1].as_secs_f64(),
        min(&compile[1]).as_secs_f64(),
        co[2].as_secs_f64(),
        min(&compile[2]).as_secs_f64(),
    );
    // bwrap's CPU time is not measurable this way: its outer process exits
    // with the command's status without reaping its pid 1, so the
    // descendants' rusage never reaches us.
    println!(
        "| make -j2 CPU (user+sys), s | {:.3} ({:.3}) | {:.3} ({:.3}) | n/a |",
        cc[0].as_secs_f64(),
        min(&compile_cpu[0]).as_secs_f64(),
        cc[1].as_secs_f64(),
        min(&compile_cpu[1]).as_secs_f64(),
    );
    println!();
    let spawn_ratio = sp[1].as_secs_f64() / sp[2].as_secs_f64();
    let over = |d: Duration| (d.as_secs_f64() / co[0].as_secs_f64() - 1.0) * 100.0;
    println!("spawn kiln/bwrap:        {spawn_ratio:.2}x");
    println!(
        "spawn kiln/bare:         {:.2}x",
        sp[1].as_secs_f64() / sp[0].as_secs_f64()
    );
    println!("compile overhead kiln:   {:+.2} % of bare", over(co[1]));
    println!("compile overhead bwrap:  {:+.2} % of bare", over(co[2]));
    let cpu_over = |d: Duration| (d.as_secs_f64() / cc[0].as_secs_f64() - 1.0) * 100.0;
    println!(
        "compile CPU overhead kiln:  {:+.2} % of bare (bwrap: not measurable)",
        cpu_over(cc[1])
    );
    println!();
    // The spread of the bare rounds: differences below it are noise.
    let spread = |v: &[Duration], m: Duration| {
        let max = v.iter().max().copied().unwrap_or_default();
        (max.as_secs_f64() - min(v).as_secs_f64()) / m.as_secs_f64() * 100.0
    };
    let (sp_noise, co_noise) = (spread(&spawn[0], sp[0]), spread(&compile[0], co[0]));
    println!("noise (bare max-min, % of median): spawn {sp_noise:.0} %, compile {co_noise:.1} %");
    println!();
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    println!(
        "goal spawn <= bwrap:         {} (kiln/bwrap {spawn_ratio:.3})",
        verdict(spawn_ratio <= 1.0)
    );
    println!(
        "goal compile overhead < 2 %: {} ({:+.2} %, noise {co_noise:.1} %)",
        verdict(over(co[1]) < 2.0),
        over(co[1])
    );
    let _ = fs::remove_dir_all(&base);
}
