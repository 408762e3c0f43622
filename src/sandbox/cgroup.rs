//! Per-task cgroups: resource limits (memory, pids, cpu), OOM/pids-limit
//! accounting, and killing a task's whole process tree.
//!
//! This module owns the directories `kiln/<name>` that kiln creates in each
//! cgroup hierarchy it uses, behind one seam, [`CgroupBackend`]:
//! - [`V2Backend`]: a unified (cgroup2) host. The groups live under
//!   `<base>/kiln/<name>` where `<base>` is kiln's own cgroup (from
//!   `/proc/self/cgroup`, `0::/path`), which must be delegated to kiln (e.g.
//!   systemd `Delegate=yes`). [`V2Backend::prepare`] enables `memory`, `pids`
//!   (and `cpu` if offered) in `<base>` and `<base>/kiln`. Because of the
//!   "no internal processes" rule, `<base>` itself must then hold no process
//!   unless it is the root: run the hub in a leaf (e.g. `<base>/hub`).
//! - [`V1Backend`]: legacy/hybrid hosts, with `memory`, `pids` (required)
//!   and `cpu`, `freezer` (optional) hierarchies at `/sys/fs/cgroup/<c>`,
//!   each group made under kiln's own cgroup in that hierarchy, plus the
//!   empty v2 at `/sys/fs/cgroup/unified` (if present) used only for
//!   `cgroup.kill` and `cgroup.events`.
//!
//! Every path is taken from a root given by the caller, so tests run on a
//! temporary directory of plain files.
//!
//! What must stay true:
//! - A task's processes join every hierarchy ([`TaskCgroup::add`]) before the
//!   build is released (before exec), so no process escapes the limits.
//! - Names are one plain path component; nothing outside `kiln/` is created
//!   or removed, and `kiln/` itself is never removed.
//! - A [`TaskCgroup`] is removed (its processes killed first) when dropped.

use std::fs;
use std::io::{self, ErrorKind};
use std::path::{Path, PathBuf};
use std::thread::sleep;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The directory kiln creates under its base in each hierarchy.
pub const KILN_DIR: &str = "kiln";
/// CFS period used for CPU quotas (microseconds).
pub const CPU_PERIOD_US: u64 = 100_000;
/// How long [`TaskCgroup::kill_all`] and `remove` wait for processes to go.
const SETTLE: Duration = Duration::from_secs(5);

/// Resource limits of one task; `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// Memory limit in bytes (swap is disabled where the kernel allows).
    pub memory_bytes: Option<u64>,
    /// Maximum number of processes/threads.
    pub pids: Option<u64>,
    /// CPU time as a number of cores, e.g. `1.5`.
    pub cpus: Option<f64>,
}

/// What happened to a task's group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// The kernel OOM killer killed a process of the group.
    pub oom_killed: bool,
    /// A fork/clone failed because of the pids limit.
    pub pids_limit_hit: bool,
    /// Peak memory usage in bytes, if the kernel reports it.
    pub memory_peak: Option<u64>,
}

#[derive(Debug, Error)]
pub enum CgroupError {
    #[error("invalid cgroup name {0:?}: must be one component of [A-Za-z0-9._-], not . or ..")]
    InvalidName(String),
    #[error("invalid limit: {0}")]
    InvalidLimit(String),
    #[error("writing {value:?} to {}: {source}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("parsing {}: {detail}", path.display())]
    Parse { path: PathBuf, detail: String },
    #[error("creating cgroup {}: {source}", path.display())]
    Mkdir { path: PathBuf, source: io::Error },
    #[error("removing cgroup {}: {source}", path.display())]
    Rmdir { path: PathBuf, source: io::Error },
    #[error("cgroup {} still has processes after {SETTLE:?}", path.display())]
    NotEmpty { path: PathBuf },
    #[error("no usable cgroup setup: {0}")]
    Unsupported(String),
}

pub type Result<T, E = CgroupError> = std::result::Result<T, E>;

/// Creates per-task groups with limits. The seam between v1 and v2 hosts.
pub trait CgroupBackend: std::fmt::Debug + Send + Sync {
    /// Makes `kiln/<name>` in every hierarchy and writes `limits`.
    fn create(&self, name: &str, limits: &Limits) -> Result<TaskCgroup>;
}

/// Detects the host's cgroup setup under `/sys/fs/cgroup`.
pub fn detect() -> Result<Box<dyn CgroupBackend>> {
    let own = read(Path::new("/proc/self/cgroup"))?;
    detect_at(Path::new("/sys/fs/cgroup"), &own)
}

/// [`detect`] with an explicit mount root and `/proc/self/cgroup` contents.
/// v2 when `<root>/cgroup.controllers` exists, else v1.
pub fn detect_at(root: &Path, proc_self_cgroup: &str) -> Result<Box<dyn CgroupBackend>> {
    if root.join("cgroup.controllers").is_file() {
        let rel = own_path(proc_self_cgroup, "").ok_or_else(|| {
            CgroupError::Unsupported(
                "cgroup2 mounted but no `0::` line in /proc/self/cgroup".into(),
            )
        })?;
        return Ok(Box::new(V2Backend::prepare(under(
            root.to_path_buf(),
            Some(rel),
        ))?));
    }
    Ok(Box::new(V1Backend::detect_at(root, proc_self_cgroup)?))
}

/// kiln's own cgroup path in the hierarchy of `controller` ("" = the v2 one).
fn own_path<'a>(proc_self_cgroup: &'a str, controller: &str) -> Option<&'a str> {
    proc_self_cgroup.lines().find_map(|l| {
        let mut it = l.splitn(3, ':');
        let (_, ctrls, path) = (it.next()?, it.next()?, it.next()?);
        let hit = if controller.is_empty() {
            ctrls.is_empty()
        } else {
            ctrls.split(',').any(|c| c == controller)
        };
        hit.then_some(path)
    })
}

fn under(mount: PathBuf, rel: Option<&str>) -> PathBuf {
    mount.join(rel.unwrap_or("/").trim_start_matches('/'))
}

impl V1Backend {
    /// The v1 half of [`detect_at`]; creates `kiln/` in every hierarchy found.
    pub fn detect_at(root: &Path, proc_self_cgroup: &str) -> Result<Self> {
        let mounted = |c: &str| {
            let m = root.join(c);
            m.join("cgroup.procs")
                .is_file()
                .then(|| under(m, own_path(proc_self_cgroup, c)))
        };
        let (Some(memory), Some(pids)) = (mounted("memory"), mounted("pids")) else {
            return Err(CgroupError::Unsupported(format!(
                "{} is neither cgroup2 nor has v1 memory and pids hierarchies",
                root.display()
            )));
        };
        let unified = {
            let m = root.join("unified");
            m.join("cgroup.procs")
                .is_file()
                .then(|| under(m, own_path(proc_self_cgroup, "")))
        };
        let b = V1Backend {
            memory,
            pids,
            cpu: mounted("cpu"),
            freezer: mounted("freezer"),
            unified,
        };
        for dir in b.bases() {
            mkdir_p(&dir.join(KILN_DIR))?;
        }
        Ok(b)
    }
}

/// cgroup v2: groups at `<base>/kiln/<name>`.
#[derive(Debug, Clone)]
pub struct V2Backend {
    /// kiln's delegated cgroup directory.
    pub base: PathBuf,
}

impl V2Backend {
    /// Creates `<base>/kiln` and enables memory, pids (required) and cpu
    /// (if available) for it and its children.
    pub fn prepare(base: PathBuf) -> Result<Self> {
        let avail_path = base.join("cgroup.controllers");
        let avail = read(&avail_path)?;
        let has = |c: &str| avail.split_whitespace().any(|x| x == c);
        for c in ["memory", "pids"] {
            if !has(c) {
                return Err(CgroupError::Unsupported(format!(
                    "controller {c} not delegated to {} (it offers {:?}); delegate it \
                     (e.g. systemd Delegate=yes) to kiln's cgroup",
                    base.display(),
                    avail.trim()
                )));
            }
        }
        let mut enable = String::from("+memory +pids");
        if has("cpu") {
            enable.push_str(" +cpu");
        }
        let kiln = base.join(KILN_DIR);
        mkdir_p(&kiln)?;
        for dir in [&base, &kiln] {
            write(&dir.join("cgroup.subtree_control"), &enable).map_err(|e| match e {
                CgroupError::Write { path, value, source } if source.raw_os_error() == Some(libc::EBUSY) => {
                    CgroupError::Unsupported(format!(
                        "cannot enable controllers ({value}) in {}: the group holds processes \
                         (cgroup v2 \"no internal processes\" rule); run kiln in a leaf below it: {source}",
                        path.display()
                    ))
                }
                e => e,
            })?;
        }
        Ok(V2Backend { base })
    }
}

impl CgroupBackend for V2Backend {
    fn create(&self, name: &str, limits: &Limits) -> Result<TaskCgroup> {
        check_name(name)?;
        let dir = self.base.join(KILN_DIR).join(name);
        mkdir(&dir)?;
        let cg = TaskCgroup {
            dirs: vec![dir.clone()],
            memory: dir.clone(),
            pids: dir.clone(),
            kill: Some(dir.clone()),
            freezer: None,
            v2: true,
            removed: false,
        };
        if let Some(m) = limits.memory_bytes {
            write(&dir.join("memory.max"), &m.to_string())?;
            write_if_present(&dir.join("memory.swap.max"), "0");
        }
        if let Some(p) = limits.pids {
            write(&dir.join("pids.max"), &p.to_string())?;
        }
        if let Some(c) = limits.cpus {
            write(
                &dir.join("cpu.max"),
                &format!("{} {CPU_PERIOD_US}", quota_us(c)?),
            )?;
        }
        Ok(cg)
    }
}

/// cgroup v1: one group per hierarchy, each at `<hierarchy base>/kiln/<name>`.
#[derive(Debug, Clone)]
pub struct V1Backend {
    pub memory: PathBuf,
    pub pids: PathBuf,
    pub cpu: Option<PathBuf>,
    pub freezer: Option<PathBuf>,
    /// kiln's group in the (controller-less) v2 hierarchy, for kill/populated.
    pub unified: Option<PathBuf>,
}

impl V1Backend {
    fn bases(&self) -> Vec<&PathBuf> {
        let mut v = vec![&self.memory, &self.pids];
        v.extend(self.cpu.iter().chain(&self.freezer).chain(&self.unified));
        v
    }
}

impl CgroupBackend for V1Backend {
    fn create(&self, name: &str, limits: &Limits) -> Result<TaskCgroup> {
        check_name(name)?;
        if limits.cpus.is_some() && self.cpu.is_none() {
            return Err(CgroupError::Unsupported(
                "cpu limit requested but no v1 cpu hierarchy".into(),
            ));
        }
        let g = |base: &PathBuf| base.join(KILN_DIR).join(name);
        let mut cg = TaskCgroup {
            dirs: Vec::new(),
            memory: g(&self.memory),
            pids: g(&self.pids),
            kill: self.unified.as_ref().map(g),
            freezer: self.freezer.as_ref().map(g),
            v2: false,
            removed: false,
        };
        // Record each dir as soon as it exists so Drop cleans up on error.
        for base in self.bases() {
            let d = g(base);
            mkdir(&d)?;
            cg.dirs.push(d);
        }
        if let Some(m) = limits.memory_bytes {
            write(&cg.memory.join("memory.limit_in_bytes"), &m.to_string())?;
            // Must be >= memory.limit_in_bytes; absent without swap accounting.
            write_if_present(
                &cg.memory.join("memory.memsw.limit_in_bytes"),
                &m.to_string(),
            );
        }
        if let Some(p) = limits.pids {
            write(&cg.pids.join("pids.max"), &p.to_string())?;
        }
        if let (Some(c), Some(cpu)) = (limits.cpus, &self.cpu) {
            let d = g(cpu);
            write(&d.join("cpu.cfs_period_us"), &CPU_PERIOD_US.to_string())?;
            write(&d.join("cpu.cfs_quota_us"), &quota_us(c)?.to_string())?;
        }
        Ok(cg)
    }
}

/// One task's group(s). Removed (after killing its processes) on drop.
#[derive(Debug)]
pub struct TaskCgroup {
    /// Every directory made, in creation order.
    dirs: Vec<PathBuf>,
    memory: PathBuf,
    pids: PathBuf,
    /// A v2 directory offering `cgroup.kill`/`cgroup.events`, if any.
    kill: Option<PathBuf>,
    freezer: Option<PathBuf>,
    v2: bool,
    removed: bool,
}

impl TaskCgroup {
    /// The directories of this group, one per hierarchy.
    pub fn dirs(&self) -> &[PathBuf] {
        &self.dirs
    }

    /// Moves `pid` (0 = the writing process) into every hierarchy.
    pub fn add(&self, pid: u32) -> Result<()> {
        for d in &self.dirs {
            write(&d.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    pub fn stats(&self) -> Result<Stats> {
        let (oom_file, peak_file) = if self.v2 {
            ("memory.events", "memory.peak")
        } else {
            ("memory.oom_control", "memory.max_usage_in_bytes")
        };
        let oom = keyed(&self.memory.join(oom_file), "oom_kill")?.unwrap_or(0);
        let max = keyed(&self.pids.join("pids.events"), "max")?.unwrap_or(0);
        let peak_path = self.memory.join(peak_file);
        let memory_peak = match fs::read_to_string(&peak_path) {
            Ok(s) => Some(s.trim().parse().map_err(|e| parse_err(&peak_path, e))?),
            Err(e) if e.kind() == ErrorKind::NotFound => None,
            Err(source) => {
                return Err(CgroupError::Read {
                    path: peak_path,
                    source,
                });
            }
        };
        Ok(Stats {
            oom_killed: oom > 0,
            pids_limit_hit: max > 0,
            memory_peak,
        })
    }

    /// True when no process is left in any hierarchy.
    pub fn is_empty(&self) -> Result<bool> {
        for d in &self.dirs {
            let events = d.join("cgroup.events");
            let populated = if events.is_file() {
                keyed(&events, "populated")?.unwrap_or(0) != 0
            } else {
                !procs(d)?.is_empty()
            };
            if populated {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Kills every process of the group and waits until it is empty.
    pub fn kill_all(&self) -> Result<()> {
        if self.is_empty()? {
            return Ok(());
        }
        let kill_file = self
            .kill
            .as_ref()
            .map(|d| d.join("cgroup.kill"))
            .filter(|f| f.is_file());
        if let Some(f) = &kill_file {
            write(f, "1")?;
        } else if let Some(fz) = &self.freezer {
            // Frozen tasks cannot fork, so one SIGKILL sweep reaches them all.
            let state = fz.join("freezer.state");
            write(&state, "FROZEN")?;
            let r = self.sigkill_sweep();
            write(&state, "THAWED")?;
            r?;
        }
        let deadline = Instant::now() + SETTLE;
        loop {
            if self.is_empty()? {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(CgroupError::NotEmpty {
                    path: self.dirs[0].clone(),
                });
            }
            if kill_file.is_none() {
                self.sigkill_sweep()?;
            }
            sleep(Duration::from_millis(10));
        }
    }

    fn sigkill_sweep(&self) -> Result<()> {
        use nix::sys::signal::{Signal, kill};
        for d in &self.dirs {
            for pid in procs(d)? {
                // ESRCH: already gone.
                let _ = kill(nix::unistd::Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
        Ok(())
    }

    /// Kills the processes and removes every directory.
    pub fn remove(mut self) -> Result<()> {
        self.removed = true;
        self.remove_inner()
    }

    fn remove_inner(&self) -> Result<()> {
        let killed = self.kill_all();
        for d in self.dirs.iter().rev() {
            let deadline = Instant::now() + SETTLE;
            loop {
                match fs::remove_dir(d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        sleep(Duration::from_millis(10))
                    }
                    Err(source) => {
                        return Err(CgroupError::Rmdir {
                            path: d.clone(),
                            source,
                        });
                    }
                }
            }
        }
        killed
    }
}

impl Drop for TaskCgroup {
    fn drop(&mut self) {
        if !self.removed {
            let _ = self.remove_inner();
        }
    }
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name != "."
        && name != ".."
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(CgroupError::InvalidName(name.into()))
    }
}

fn quota_us(cpus: f64) -> Result<u64> {
    if !(cpus.is_finite() && cpus > 0.0) {
        return Err(CgroupError::InvalidLimit(format!(
            "cpus must be > 0, got {cpus}"
        )));
    }
    // The kernel refuses quotas below 1 ms.
    Ok(((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000))
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| CgroupError::Read {
        path: path.into(),
        source,
    })
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).map_err(|source| CgroupError::Write {
        path: path.into(),
        value: value.into(),
        source,
    })
}

/// Best effort: files that only exist with some kernel options (swap accounting).
fn write_if_present(path: &Path, value: &str) {
    if path.is_file() {
        let _ = write(path, value);
    }
}

fn mkdir(path: &Path) -> Result<()> {
    fs::create_dir(path).map_err(|source| CgroupError::Mkdir {
        path: path.into(),
        source,
    })
}

fn mkdir_p(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|source| CgroupError::Mkdir {
        path: path.into(),
        source,
    })
}

fn parse_err(path: &Path, e: impl std::fmt::Display) -> CgroupError {
    CgroupError::Parse {
        path: path.into(),
        detail: e.to_string(),
    }
}

/// The value of `key` in a flat-keyed file (`key value` per line).
fn keyed(path: &Path, key: &str) -> Result<Option<u64>> {
    let s = match fs::read_to_string(path) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(CgroupError::Read {
                path: path.into(),
                source,
            });
        }
    };
    for line in s.lines() {
        let mut it = line.split_whitespace();
        if it.next() == Some(key) {
            let v = it.next().unwrap_or("");
            return v
                .parse()
                .map(Some)
                .map_err(|e| parse_err(path, format!("{key} {v:?}: {e}")));
        }
    }
    Ok(None)
}

fn procs(dir: &Path) -> Result<Vec<i32>> {
    let path = dir.join("cgroup.procs");
    let s = match fs::read_to_string(&path) {
        Ok(s) => s,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(CgroupError::Read { path, source }),
    };
    s.lines()
        .map(|l| l.trim().parse().map_err(|e| parse_err(&path, e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    fn rd(p: &Path) -> String {
        fs::read_to_string(p).unwrap()
    }

    fn fake_v1(root: &Path) -> V1Backend {
        for c in ["memory", "pids", "cpu"] {
            fs::create_dir_all(root.join(c).join(KILN_DIR)).unwrap();
        }
        V1Backend {
            memory: root.join("memory"),
            pids: root.join("pids"),
            cpu: Some(root.join("cpu")),
            freezer: None,
            unified: None,
        }
    }

    #[test]
    fn v1_create_writes_limits() {
        let t = tempfile::tempdir().unwrap();
        let b = fake_v1(t.path());
        let lim = Limits {
            memory_bytes: Some(32 << 20),
            pids: Some(20),
            cpus: Some(1.5),
        };
        let cg = b.create("t1", &lim).unwrap();
        let g = |c: &str| t.path().join(c).join("kiln/t1");
        assert_eq!(rd(&g("memory").join("memory.limit_in_bytes")), "33554432");
        assert!(!g("memory").join("memory.memsw.limit_in_bytes").exists());
        assert_eq!(rd(&g("pids").join("pids.max")), "20");
        assert_eq!(rd(&g("cpu").join("cpu.cfs_period_us")), "100000");
        assert_eq!(rd(&g("cpu").join("cpu.cfs_quota_us")), "150000");
        cg.add(4242).unwrap();
        assert_eq!(rd(&g("pids").join("cgroup.procs")), "4242");
        // Not a real member: clear it so Drop's SIGKILL sweep cannot hit a host pid.
        for d in cg.dirs() {
            fs::write(d.join("cgroup.procs"), "").unwrap();
        }
        assert_eq!(cg.dirs().len(), 3);
    }

    #[test]
    fn v2_create_writes_limits_and_stats() {
        let t = tempfile::tempdir().unwrap();
        fs::create_dir(t.path().join(KILN_DIR)).unwrap();
        let b = V2Backend {
            base: t.path().into(),
        };
        let lim = Limits {
            memory_bytes: Some(1 << 30),
            pids: Some(64),
            cpus: Some(0.5),
        };
        let cg = b.create("job-7.a", &lim).unwrap();
        let d = t.path().join("kiln/job-7.a");
        assert_eq!(rd(&d.join("memory.max")), "1073741824");
        assert_eq!(rd(&d.join("pids.max")), "64");
        assert_eq!(rd(&d.join("cpu.max")), "50000 100000");
        assert_eq!(cg.stats().unwrap(), Stats::default());
        fs::write(
            d.join("memory.events"),
            "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\noom_group_kill 0\n",
        )
        .unwrap();
        fs::write(d.join("pids.events"), "max 3\n").unwrap();
        fs::write(d.join("memory.peak"), "123456\n").unwrap();
        let s = cg.stats().unwrap();
        assert_eq!(
            s,
            Stats {
                oom_killed: true,
                pids_limit_hit: true,
                memory_peak: Some(123456)
            }
        );
        fs::write(d.join("cgroup.events"), "populated 0\nfrozen 0\n").unwrap();
        assert!(cg.is_empty().unwrap());
    }

    #[test]
    fn v1_stats_parse() {
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v1(t.path()).create("s", &Limits::default()).unwrap();
        let m = t.path().join("memory/kiln/s");
        fs::write(
            m.join("memory.oom_control"),
            "oom_kill_disable 0\nunder_oom 0\noom_kill 1\n",
        )
        .unwrap();
        fs::write(m.join("memory.max_usage_in_bytes"), "33554432\n").unwrap();
        fs::write(t.path().join("pids/kiln/s/pids.events"), "max 0\n").unwrap();
        let s = cg.stats().unwrap();
        assert!(s.oom_killed && !s.pids_limit_hit);
        assert_eq!(s.memory_peak, Some(32 << 20));
        fs::write(m.join("memory.oom_control"), "oom_kill x\n").unwrap();
        assert!(matches!(cg.stats(), Err(CgroupError::Parse { .. })));
    }

    #[test]
    fn bad_names_refused() {
        let t = tempfile::tempdir().unwrap();
        let b = fake_v1(t.path());
        for n in ["", ".", "..", "a/b", "../x", "a\0b", "a b"] {
            assert!(
                matches!(
                    b.create(n, &Limits::default()),
                    Err(CgroupError::InvalidName(_))
                ),
                "{n:?}"
            );
        }
        assert!(matches!(
            b.create(
                "c",
                &Limits {
                    cpus: Some(-1.0),
                    ..Limits::default()
                }
            ),
            Err(CgroupError::InvalidLimit(_))
        ));
    }

    #[test]
    fn drop_removes_dirs() {
        let t = tempfile::tempdir().unwrap();
        let cg = fake_v1(t.path()).create("d", &Limits::default()).unwrap();
        let dirs = cg.dirs().to_vec();
        drop(cg);
        assert!(dirs.iter().all(|d| !d.exists()));
    }

    #[test]
    fn detect_fake_v1_and_v2() {
        let t = tempfile::tempdir().unwrap();
        for c in ["memory", "pids", "unified"] {
            fs::create_dir_all(t.path().join(c).join("x")).unwrap();
            fs::write(t.path().join(c).join("cgroup.procs"), "").unwrap();
        }
        let own = "8:pids:/\n4:memory:/x\n0::/x\n";
        let b = format!("{:?}", detect_at(t.path(), own).unwrap());
        assert!(b.contains("V1Backend") && b.contains("memory/x"), "{b}");
        assert!(
            t.path().join("memory/x/kiln").is_dir() && t.path().join("unified/x/kiln").is_dir()
        );

        let t = tempfile::tempdir().unwrap();
        fs::create_dir_all(t.path().join("svc")).unwrap();
        fs::write(t.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        fs::write(t.path().join("svc/cgroup.controllers"), "cpu io\n").unwrap();
        let e = detect_at(t.path(), "0::/svc\n").unwrap_err();
        assert!(e.to_string().contains("memory not delegated"), "{e}");
        fs::write(t.path().join("svc/cgroup.controllers"), "cpu memory pids\n").unwrap();
        detect_at(t.path(), "0::/svc\n").unwrap();
        assert_eq!(
            rd(&t.path().join("svc/kiln/cgroup.subtree_control")),
            "+memory +pids +cpu"
        );
    }

    // ---- real cgroups (root on a v1/hybrid host) ----

    fn real() -> Option<Box<dyn CgroupBackend>> {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: not root");
            return None;
        }
        match detect() {
            Ok(b) => Some(b),
            Err(e) => {
                eprintln!("skipping: {e}");
                None
            }
        }
    }

    fn uniq(tag: &str) -> String {
        format!("test-{tag}-{}", std::process::id())
    }

    /// Spawns `sh -c 'read x; <script>'`, moves it into `cg`, then releases it.
    fn spawn_in(cg: &TaskCgroup, script: &str) -> std::process::Child {
        let mut c = Command::new("sh")
            .arg("-c")
            .arg(format!("read x; {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        cg.add(c.id()).unwrap();
        c.stdin.take().unwrap().write_all(b"go\n").unwrap();
        c
    }

    fn wait_for(mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            if f() {
                return true;
            }
            sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn real_pids_limit_kill_remove() {
        let Some(b) = real() else { return };
        let cg = b
            .create(
                &uniq("pids"),
                &Limits {
                    pids: Some(20),
                    ..Limits::default()
                },
            )
            .unwrap();
        let dirs = cg.dirs().to_vec();
        let mut child = spawn_in(&cg, "for i in $(seq 100); do sleep 5 & done; wait");
        assert!(
            wait_for(|| cg.stats().unwrap().pids_limit_hit),
            "pids limit never hit"
        );
        assert!(!cg.is_empty().unwrap());
        cg.kill_all().unwrap();
        assert!(cg.is_empty().unwrap());
        let _ = child.wait();
        cg.remove().unwrap();
        assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
    }

    #[test]
    fn real_memory_limit_oom() {
        let Some(b) = real() else { return };
        let cg = b
            .create(
                &uniq("mem"),
                &Limits {
                    memory_bytes: Some(32 << 20),
                    ..Limits::default()
                },
            )
            .unwrap();
        let mut child = spawn_in(&cg, "head -c 200M /dev/zero | tail > /dev/null");
        let st = child.wait().unwrap();
        assert!(!st.success());
        assert!(
            wait_for(|| cg.stats().unwrap().oom_killed),
            "no oom_kill recorded"
        );
        let dirs = cg.dirs().to_vec();
        cg.remove().unwrap();
        assert!(dirs.iter().all(|d| !d.exists()));
    }

    /// v1 without cgroup.kill: the freezer path and the plain SIGKILL sweep.
    #[test]
    fn real_v1_kill_fallbacks() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipping: not root");
            return;
        }
        let own = fs::read_to_string("/proc/self/cgroup").unwrap();
        let b = match V1Backend::detect_at(Path::new("/sys/fs/cgroup"), &own) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("skipping: {e}");
                return;
            }
        };
        let mut variants = vec![(
            "sweep",
            V1Backend {
                unified: None,
                freezer: None,
                ..b.clone()
            },
        )];
        if b.freezer.is_some() {
            variants.push((
                "freezer",
                V1Backend {
                    unified: None,
                    ..b.clone()
                },
            ));
        }
        for (tag, b) in variants {
            let cg = b.create(&uniq(tag), &Limits::default()).unwrap();
            // A tree that keeps forking: the sweep must still empty it.
            let mut child = spawn_in(&cg, "while :; do sleep 5 & done");
            assert!(
                wait_for(|| procs(&cg.dirs()[0]).unwrap().len() > 10),
                "{tag}"
            );
            cg.kill_all().unwrap();
            assert!(cg.is_empty().unwrap(), "{tag}");
            let _ = child.wait();
            let dirs = cg.dirs().to_vec();
            cg.remove().unwrap();
            assert!(dirs.iter().all(|d| !d.exists()), "{tag}");
        }
    }
}
