//! Helpers shared by the benchmarks (included with `#[path]`): settings,
//! the target dir, and the hub as its own process with its CPU and memory.

#![allow(dead_code)] // Each benchmark uses some of these.

use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A numeric setting from the environment, or `default`.
pub fn env_num<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Cargo's target dir, where benchmarks keep their corpora.
pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
}

/// `kiln serve --slots 0` on loopback as its own process (so its CPU time
/// and memory are its own), stopped on drop.
pub struct HubProc {
    pub child: Child,
    pub pid: i32,
    pub url: String,
    pub token: String,
}

impl HubProc {
    /// Starts the hub on `data`, its stderr to `log`; returns once it listens.
    pub fn start(data: &Path, log: &Path) -> HubProc {
        let exe = kiln_exe();
        let child = Command::new(&exe)
            .args(["serve", "--listen", "127.0.0.1:0", "--slots", "0", "--data"])
            .arg(data)
            .env("NO_COLOR", "1")
            .env_remove("KILN_CONFIG")
            .env_remove("KILN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", exe.display()));
        let pid = child.id() as i32;
        let mut hub = HubProc {
            child,
            pid,
            url: String::new(),
            token: String::new(),
        };
        // `kiln serve` prints "kiln: listening on http://ADDR" once bound.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            if let Some(url) = text
                .lines()
                .find_map(|l| l.strip_prefix("kiln: listening on "))
            {
                hub.url = url.trim().to_string();
                break;
            }
            if let Some(st) = hub.child.try_wait().unwrap() {
                panic!("the hub exited ({st}) before listening:\n{text}");
            }
            assert!(
                Instant::now() < deadline,
                "the hub did not listen within 60 s:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        hub.token = std::fs::read_to_string(data.join("admin.token"))
            .unwrap()
            .trim()
            .to_string();
        hub
    }

    /// SIGTERM, then SIGKILL if it has not ended within 10 s.
    pub fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.pid);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for HubProc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// The release binary (`cargo bench` builds it; built here if missing).
pub fn kiln_exe() -> PathBuf {
    let exe = target_dir().join("release/kiln");
    if !exe.exists() {
        let st = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .args(["build", "--release", "--bin", "kiln", "--manifest-path"])
            .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .status()
            .unwrap();
        assert!(st.success(), "cargo build --release --bin kiln: {st}");
    }
    exe
}

/// utime + stime of `pid`, in seconds.
pub fn cpu_secs(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces): state is 3rd,
    // utime the 14th, stime the 15th.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    ticks as f64 / hz
}

/// A `/proc/PID/status` field as a number (kB for memory fields).
pub fn status_field(pid: i32, name: &str) -> u64 {
    let mut s = String::new();
    std::fs::File::open(format!("/proc/{pid}/status"))
        .unwrap()
        .read_to_string(&mut s)
        .unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}
