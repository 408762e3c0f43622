//! The worker directory: what each worker is (the configuration it
//! reports), what admins allow it (enabled, draining, disabled), what its
//! history says (QoS), and which tasks it can run (routing by a task's
//! needs). Also the join tokens that enrol workers. The hub's own slots
//! are the worker named `local`. See docs/workers.md.
//!
//! What must stay true: routing (`WorkerInfo::unmet`) and the why-waiting
//! text (`why_not_runnable`) use the same rules, so a reason shown for a
//! waiting task is the reason it is not leased.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// The directory name of the hub's own slots.
pub const LOCAL_WORKER: &str = "local";

/// What a worker reports about itself with every lease request.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct WorkerInfo {
    /// Debian architecture name of the machine (`amd64`, `arm64`, …).
    pub arch: String,
    /// The OS's `PRETTY_NAME`.
    pub os: String,
    /// `uname -r`.
    pub kernel: String,
    pub cores: u32,
    pub memory_bytes: u64,
    /// Free space where the worker keeps its store.
    pub disk_free_bytes: u64,
    /// kiln's version (and binary digest, see `self_version`).
    pub version: String,
    /// Sorted: `kvm` when /dev/kvm is usable, plus what the admin declares.
    pub features: Vec<String>,
    pub slots: u32,
    /// Whether it runs tasks that need a Debian buildroot.
    #[serde(default)]
    pub buildroots: bool,
}

/// What a task needs of the worker that runs it (from its target).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct Needs {
    /// None or `all`: any architecture.
    pub arch: Option<String>,
    pub features: Vec<String>,
    pub min_memory_bytes: u64,
    pub min_cores: u32,
    pub min_disk_bytes: u64,
    /// Runs in a Debian buildroot (not a `host` target).
    pub buildroot: bool,
}

/// Why one worker cannot run a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unmet {
    Arch(String),
    Feature(String),
    Memory(u64),
    Cores(u32),
    Disk(u64),
    Buildroot,
}

/// The Debian name of the architecture this binary runs on.
pub fn native_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "i386",
        "powerpc64" => "ppc64el",
        "arm" => "armhf",
        other => other,
    }
}

/// A size as admins write it: bytes, or a number with K, M, G or T
/// (binary multiples; an optional trailing `iB`/`B`).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("{s:?}: unknown size unit {c:?} (use K, M, G or T)")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 512M, 16G)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

fn gib(bytes: u64) -> String {
    let g = bytes as f64 / (1u64 << 30) as f64;
    if g >= 10.0 || g.fract() < 0.05 {
        format!("{g:.0} GiB")
    } else {
        format!("{g:.1} GiB")
    }
}

impl WorkerInfo {
    /// This machine, as a worker with `slots` slots keeping its store in
    /// `data`; `features` adds to what is detected.
    pub fn probe(data: &Path, slots: u32, features: &[String], buildroots: bool) -> WorkerInfo {
        let uname = nix::sys::utsname::uname().ok();
        let os = std::fs::read_to_string("/etc/os-release")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PRETTY_NAME="))
                    .map(|v| v.trim_matches('"').to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let memory_bytes = nix::sys::sysinfo::sysinfo()
            .map(|s| s.ram_total())
            .unwrap_or(0);
        let disk_free_bytes = nix::sys::statvfs::statvfs(data)
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0);
        let mut feats: Vec<String> = features.to_vec();
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        {
            feats.push("kvm".into());
        }
        feats.sort();
        feats.dedup();
        WorkerInfo {
            arch: native_arch().to_string(),
            os,
            kernel: uname
                .map(|u| u.release().to_string_lossy().into_owned())
                .unwrap_or_default(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
            memory_bytes,
            disk_free_bytes,
            version: self_version(),
            features: feats,
            slots,
            buildroots,
        }
    }

    /// Whether this machine builds for `arch`: its own, `all`, and i386 on
    /// amd64 (the kernel runs 32-bit x86 binaries).
    pub fn builds_for(&self, arch: &str) -> bool {
        arch == "all" || arch == self.arch || (self.arch == "amd64" && arch == "i386")
    }

    /// The first need this worker does not meet, if any.
    pub fn unmet(&self, needs: &Needs) -> Option<Unmet> {
        if let Some(a) = &needs.arch
            && !self.builds_for(a)
        {
            return Some(Unmet::Arch(a.clone()));
        }
        if needs.buildroot && !self.buildroots {
            return Some(Unmet::Buildroot);
        }
        if let Some(f) = needs.features.iter().find(|f| !self.features.contains(f)) {
            return Some(Unmet::Feature(f.clone()));
        }
        if self.memory_bytes < needs.min_memory_bytes {
            return Some(Unmet::Memory(needs.min_memory_bytes));
        }
        if self.cores < needs.min_cores {
            return Some(Unmet::Cores(needs.min_cores));
        }
        if self.disk_free_bytes < needs.min_disk_bytes {
            return Some(Unmet::Disk(needs.min_disk_bytes));
        }
        None
    }
}

/// kiln's version as workers compare it: the crate version and the first
/// 12 hex digits of the binary's sha256, so two builds of one version
/// differ (self-update replaces a worker's binary when they differ).
pub fn version_of(exe: &Path) -> String {
    let digest = file_digest(exe)
        .map(|d| d.to_hex()[..12].to_string())
        .unwrap_or_else(|_| "unknown".into());
    format!("{}+{digest}", env!("CARGO_PKG_VERSION"))
}

/// [`version_of`] the running binary.
pub fn self_version() -> String {
    static V: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    V.get_or_init(|| {
        std::env::current_exe()
            .map(|p| version_of(&p))
            .unwrap_or_else(|_| "unknown".into())
    })
    .clone()
}

/// sha256 of a file, streamed.
pub fn file_digest(path: &Path) -> std::io::Result<crate::cas::Digest> {
    use sha2::Digest as _;
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut std::fs::File::open(path)?, &mut h)?;
    Ok(crate::cas::Digest(h.finalize().into()))
}

/// Why no worker in `candidates` (enabled and online) can run a task that
/// needs `needs`, in words; None when one can.
pub fn why_not_runnable(needs: &Needs, candidates: &[&WorkerInfo]) -> Option<String> {
    if candidates.is_empty() {
        return Some("no enabled worker is online".into());
    }
    if candidates.iter().any(|w| w.unmet(needs).is_none()) {
        return None;
    }
    // Name the first need that rules out every worker, in routing order.
    let arch_ok: Vec<&&WorkerInfo> = candidates
        .iter()
        .filter(|w| needs.arch.as_deref().is_none_or(|a| w.builds_for(a)))
        .collect();
    if arch_ok.is_empty() {
        return Some(format!(
            "no enabled worker with arch {}",
            needs.arch.as_deref().unwrap_or("?")
        ));
    }
    let arch = needs.arch.as_deref().unwrap_or("any arch");
    if needs.buildroot && arch_ok.iter().all(|w| !w.buildroots) {
        return Some(format!(
            "needs a Debian buildroot; no enabled worker for {arch} runs buildroot tasks"
        ));
    }
    for f in &needs.features {
        if arch_ok.iter().all(|w| !w.features.contains(f)) {
            return Some(format!(
                "needs feature {f}; no enabled worker for {arch} has it"
            ));
        }
    }
    let most = |get: fn(&WorkerInfo) -> u64| arch_ok.iter().map(|w| get(w)).max().unwrap_or(0);
    let mem = most(|w| w.memory_bytes);
    if mem < needs.min_memory_bytes {
        return Some(format!(
            "needs {} memory; the largest worker has {}",
            gib(needs.min_memory_bytes),
            gib(mem)
        ));
    }
    let cores = most(|w| w.cores as u64);
    if cores < needs.min_cores as u64 {
        return Some(format!(
            "needs {} cores; the largest worker has {cores}",
            needs.min_cores
        ));
    }
    let disk = most(|w| w.disk_free_bytes);
    if disk < needs.min_disk_bytes {
        return Some(format!(
            "needs {} free disk; the most any worker has is {}",
            gib(needs.min_disk_bytes),
            gib(disk)
        ));
    }
    Some("no single enabled worker meets all of its needs at once".into())
}

/// What an admin allows a worker.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdminState {
    #[default]
    Enabled,
    /// Takes no new tasks; running ones finish.
    Draining,
    /// Takes no new tasks; running ones were re-queued.
    Disabled,
}

/// Counts from a worker's history (task ends recorded against it).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
pub struct WorkerStats {
    pub succeeded: u64,
    /// Build failures (the package's fault as far as kiln can tell).
    pub failed: u64,
    /// Lost to infrastructure: lease expired, set-up failed, sandbox error.
    pub infra: u64,
    pub cancelled: u64,
    /// Time online (seen within a lease length), summed.
    pub online_ms: u64,
}

/// A worker's directory entry as stored.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WorkerRecord {
    pub name: String,
    pub first_seen: i64,
    pub last_seen: i64,
    pub admin: AdminState,
    pub info: Option<WorkerInfo>,
    pub stats: WorkerStats,
}

impl WorkerRecord {
    pub fn new(name: &str, now: i64) -> WorkerRecord {
        WorkerRecord {
            name: name.to_string(),
            first_seen: now,
            last_seen: now,
            admin: AdminState::Enabled,
            info: None,
            stats: WorkerStats::default(),
        }
    }

    /// Records a contact at `now`: the time since the last one counts as
    /// online when it is shorter than `gap_ms` (a lease length).
    pub fn seen(&mut self, now: i64, gap_ms: i64) {
        let since = now - self.last_seen;
        if since > 0 && since <= gap_ms {
            self.stats.online_ms += since as u64;
        }
        self.last_seen = self.last_seen.max(now);
    }

    pub fn online(&self, now: i64, gap_ms: i64) -> bool {
        self.name == LOCAL_WORKER || now - self.last_seen <= gap_ms
    }
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Idle,
    Busy,
    Offline,
    Draining,
    Disabled,
}

impl std::fmt::Display for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WorkerState::Idle => "idle",
            WorkerState::Busy => "busy",
            WorkerState::Offline => "offline",
            WorkerState::Draining => "draining",
            WorkerState::Disabled => "disabled",
        })
    }
}

/// A worker's quality of service, from its history.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct Qos {
    /// Succeeded / all ended tasks (None before its first).
    pub success_rate: Option<f64>,
    pub infra_failures: u64,
    /// Its mean duration for a package over the other workers' mean for
    /// the same package, median over packages both built (1.0 = average,
    /// 2.0 = twice as slow; None until comparable).
    pub speed_factor: Option<f64>,
    /// Fraction of the time since first seen that it was online.
    pub uptime: f64,
    /// Online time per infrastructure failure (None without failures).
    pub mtbf_secs: Option<f64>,
    /// 0–100: 100 × (1 − infra share) × min(1, 1.25 / speed) × (½ + ½ uptime).
    pub rating: f64,
}

const UPTIME_GRACE_MS: f64 = 60_000.0;
/// Up to this much slower than the others costs a worker no rating: build
/// times vary by that much on one machine, and the preference should pick
/// clearly faster workers, not lucky ones.
const SPEED_TOLERANCE: f64 = 1.25;
/// Builds of one package a worker needs before its mean counts.
const MIN_SPEED_SAMPLES: u64 = 5;

/// Mean durations of succeeded tasks: (package key, worker) → (count, total ms).
pub type Speeds = HashMap<(String, String), (u64, u64)>;

impl Qos {
    pub fn of(rec: &WorkerRecord, speeds: &Speeds, now: i64) -> Qos {
        let s = &rec.stats;
        let ended = s.succeeded + s.failed + s.infra;
        let success_rate = (ended > 0).then(|| s.succeeded as f64 / ended as f64);
        let infra_share = if ended > 0 {
            s.infra as f64 / ended as f64
        } else {
            0.0
        };
        let lifetime = (now - rec.first_seen).max(1) as f64;
        // The first minute counts as up, so a worker that just joined is
        // not rated below old ones for having no history yet.
        let uptime = if rec.name == LOCAL_WORKER {
            1.0
        } else {
            ((s.online_ms as f64 + UPTIME_GRACE_MS) / (lifetime + UPTIME_GRACE_MS)).clamp(0.0, 1.0)
        };
        let speed_factor = speed_factor(&rec.name, speeds);
        let speed_term = speed_factor.map_or(1.0, |f| (SPEED_TOLERANCE / f).min(1.0));
        let mtbf_secs = (s.infra > 0).then(|| s.online_ms as f64 / 1000.0 / s.infra as f64);
        let rating = 100.0 * (1.0 - infra_share) * speed_term * (0.5 + 0.5 * uptime);
        Qos {
            success_rate,
            infra_failures: s.infra,
            speed_factor,
            uptime,
            mtbf_secs,
            rating: (rating * 10.0).round() / 10.0,
        }
    }
}

fn speed_factor(worker: &str, speeds: &Speeds) -> Option<f64> {
    let mut per_pkg: HashMap<&str, (Option<f64>, Vec<f64>)> = HashMap::new();
    for ((pkg, w), (n, total)) in speeds {
        // A few builds say little: durations vary from run to run.
        if *n < MIN_SPEED_SAMPLES {
            continue;
        }
        let mean = *total as f64 / *n as f64;
        let e = per_pkg.entry(pkg.as_str()).or_default();
        if w == worker {
            e.0 = Some(mean);
        } else {
            e.1.push(mean);
        }
    }
    let mut ratios: Vec<f64> = per_pkg
        .values()
        .filter_map(|(mine, others)| {
            let mine = (*mine)?;
            if others.is_empty() {
                return None;
            }
            let theirs = others.iter().sum::<f64>() / others.len() as f64;
            Some(mine.max(1.0) / theirs.max(1.0))
        })
        .collect();
    if ratios.is_empty() {
        return None;
    }
    ratios.sort_by(f64::total_cmp);
    let m = ratios[ratios.len() / 2];
    Some((m * 100.0).round() / 100.0)
}

/// A worker as the directory shows it.
#[derive(Serialize, Deserialize, Clone, Debug)]
pub struct WorkerView {
    pub name: String,
    pub state: WorkerState,
    pub admin: AdminState,
    pub first_seen: i64,
    pub last_seen: i64,
    /// Tasks it runs now.
    pub running: u32,
    pub info: Option<WorkerInfo>,
    pub stats: WorkerStats,
    pub qos: Qos,
}

impl WorkerView {
    pub fn of(rec: WorkerRecord, running: u32, speeds: &Speeds, now: i64, gap_ms: i64) -> Self {
        let state = match rec.admin {
            AdminState::Disabled => WorkerState::Disabled,
            AdminState::Draining => WorkerState::Draining,
            AdminState::Enabled if !rec.online(now, gap_ms) => WorkerState::Offline,
            AdminState::Enabled if running > 0 => WorkerState::Busy,
            AdminState::Enabled => WorkerState::Idle,
        };
        WorkerView {
            qos: Qos::of(&rec, speeds, now),
            name: rec.name,
            state,
            admin: rec.admin,
            first_seen: rec.first_seen,
            last_seen: rec.last_seen,
            running,
            info: rec.info,
            stats: rec.stats,
        }
    }
}

/// A join token as stored (by the hash of its secret).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct WorkerToken {
    /// The worker it enrols.
    pub name: String,
    pub created: i64,
    pub revoked: Option<i64>,
}

/// `kwj1.<certificate fingerprint or "none">.<secret>`: what
/// `kiln worker token create` prints and `kiln worker --token` takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinToken {
    /// sha256 of the hub's TLS certificate (hex), pinned by the worker.
    pub fingerprint: Option<String>,
    pub secret: String,
}

const JOIN_PREFIX: &str = "kwj1";

impl std::fmt::Display for JoinToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{JOIN_PREFIX}.{}.{}",
            self.fingerprint.as_deref().unwrap_or("none"),
            self.secret
        )
    }
}

impl JoinToken {
    /// Parses a join token; None when `s` is not one (it may be a plain
    /// API token); Err when it looks like one but is malformed.
    pub fn parse(s: &str) -> Result<Option<JoinToken>, String> {
        let Some(rest) = s
            .strip_prefix(JOIN_PREFIX)
            .and_then(|r| r.strip_prefix('.'))
        else {
            return Ok(None);
        };
        let (fp, secret) = rest
            .split_once('.')
            .ok_or("join token: expected kwj1.FINGERPRINT.SECRET")?;
        let fingerprint = match fp {
            "none" => None,
            fp if fp.len() == 64 && fp.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Some(fp.to_ascii_lowercase())
            }
            _ => return Err("join token: the fingerprint is not 64 hex digits".into()),
        };
        if secret.is_empty() {
            return Err("join token: the secret is missing".into());
        }
        Ok(Some(JoinToken {
            fingerprint,
            secret: secret.to_string(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn amd64() -> WorkerInfo {
        WorkerInfo {
            arch: "amd64".into(),
            cores: 8,
            memory_bytes: 24 << 30,
            disk_free_bytes: 100 << 30,
            features: vec!["kvm".into()],
            slots: 2,
            ..Default::default()
        }
    }

    #[test]
    fn routing_and_reasons_agree() {
        let w = amd64();
        let any = Needs::default();
        assert_eq!(w.unmet(&any), None);
        assert_eq!(why_not_runnable(&any, &[&w]), None);
        let s390 = Needs {
            arch: Some("s390x".into()),
            ..Default::default()
        };
        assert_eq!(w.unmet(&s390), Some(Unmet::Arch("s390x".into())));
        assert_eq!(
            why_not_runnable(&s390, &[&w]).unwrap(),
            "no enabled worker with arch s390x"
        );
        let i386 = Needs {
            arch: Some("i386".into()),
            ..Default::default()
        };
        assert_eq!(w.unmet(&i386), None);
        let big = Needs {
            min_memory_bytes: 64 << 30,
            ..Default::default()
        };
        assert_eq!(w.unmet(&big), Some(Unmet::Memory(64 << 30)));
        assert_eq!(
            why_not_runnable(&big, &[&w]).unwrap(),
            "needs 64 GiB memory; the largest worker has 24 GiB"
        );
        let feat = Needs {
            features: vec!["kvm".into(), "gpu".into()],
            ..Default::default()
        };
        assert_eq!(w.unmet(&feat), Some(Unmet::Feature("gpu".into())));
        assert!(
            why_not_runnable(&feat, &[&w])
                .unwrap()
                .contains("needs feature gpu")
        );
        assert_eq!(
            why_not_runnable(&any, &[]).unwrap(),
            "no enabled worker is online"
        );
    }

    #[test]
    fn qos_prefers_reliable_fast_workers() {
        let now = 1_000_000;
        let mut good = WorkerRecord::new("good", 0);
        good.stats.succeeded = 10;
        good.stats.online_ms = 1_000_000;
        let mut flaky = WorkerRecord::new("flaky", 0);
        flaky.stats.succeeded = 5;
        flaky.stats.infra = 5;
        flaky.stats.online_ms = 500_000;
        let mut speeds = Speeds::new();
        speeds.insert(("p/a/host".into(), "good".into()), (5, 5_000));
        speeds.insert(("p/a/host".into(), "flaky".into()), (5, 15_000));
        // Too few to count.
        speeds.insert(("p/a/host".into(), "new".into()), (4, 400));
        let g = Qos::of(&good, &speeds, now);
        let f = Qos::of(&flaky, &speeds, now);
        assert_eq!(g.speed_factor, Some(0.33));
        assert_eq!(f.speed_factor, Some(3.0));
        assert_eq!(f.infra_failures, 5);
        assert_eq!(f.mtbf_secs, Some(100.0));
        assert_eq!(g.rating, 100.0);
        assert!(f.rating < 20.0, "{f:?}");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("64G"), Ok(64 << 30));
        assert_eq!(parse_size("512MiB"), Ok(512 << 20));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("12X").unwrap_err().contains("unknown size unit"));
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn join_tokens_round_trip_and_reject_garbage() {
        let t = JoinToken {
            fingerprint: Some("ab".repeat(32)),
            secret: "kiln_0123".into(),
        };
        assert_eq!(JoinToken::parse(&t.to_string()).unwrap(), Some(t));
        assert_eq!(JoinToken::parse("kiln_abc").unwrap(), None);
        let none = JoinToken::parse("kwj1.none.kiln_x").unwrap().unwrap();
        assert_eq!(none.fingerprint, None);
        assert!(JoinToken::parse("kwj1.zz.kiln_x").is_err());
        assert!(JoinToken::parse("kwj1.none.").is_err());
    }
}
