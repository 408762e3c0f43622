//! The one configuration struct: TOML file, then `KILN_*` environment
//! variables, then command-line flags, each overriding the one before.
//! Every field is documented here and in docs/config.md; `kiln check-config`
//! prints the effective result.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {name}={value:?}: {message}")]
    Env {
        name: &'static str,
        value: String,
        message: String,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub build: BuildConfig,
    /// Per-target overrides of the `[build]` limits: `[targets.NAME]`.
    /// A task takes `[build]`'s value for every limit its target leaves out.
    pub targets: BTreeMap<String, TargetLimits>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address the hub listens on (`KILN_LISTEN`, `--listen`). Port 0 picks a
    /// free port; the bound address is printed at start.
    pub listen: SocketAddr,
    /// Data directory: `kiln.redb`, the blob store `cas/`, `admin.token`,
    /// task work dirs (`KILN_DATA`, `--data`).
    pub data: PathBuf,
    /// Largest accepted source upload in bytes (larger → 413).
    pub max_upload_bytes: u64,
    /// Whether reads (lists, logs, artifacts, pages) need no token.
    pub public_reads: bool,
    /// The hub's address as clients reach it (`KILN_PUBLIC_URL`), e.g.
    /// `https://pkgs.example.org` behind a TLS proxy; used in the apt lines
    /// kiln hands out. Unset: `http://` + the request's Host header.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Where the hub also serves HTTPS (`KILN_TLS_LISTEN`, `--tls-listen`),
    /// in addition to `listen`, which stays plain HTTP for the CLI on
    /// loopback. Port 0 picks a free port. Unset: no HTTPS.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_listen: Option<SocketAddr>,
    /// PEM certificate chain (leaf first) to serve on `tls_listen`, with
    /// `tls_key`: both or neither. Unset: the hub generates a self-signed
    /// certificate on first start, keeps it in `DATA/tls/` and reuses it,
    /// so the fingerprint clients pin stays the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<PathBuf>,
    /// Extra DNS names and IP addresses for the generated certificate,
    /// besides `localhost`, `127.0.0.1`, `::1`, the host name and the
    /// `tls_listen` address. Only read when the certificate is made: remove
    /// `DATA/tls/` to make a new one (pinned clients need its fingerprint).
    pub tls_names: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BuildConfig {
    /// Local build slots (`KILN_SLOTS`, `--slots`); 0 means only remote
    /// workers run tasks. Default: the number of cores.
    pub slots: usize,
    /// Log bytes kept per task; output past this is dropped (the build goes
    /// on) and a marker line is appended.
    pub log_limit_bytes: u64,
    /// Output bytes (kept or dropped) past which a runaway task is killed;
    /// it ends `log limit`.
    pub output_limit_bytes: u64,
    /// How long a lease lasts without a heartbeat, in seconds.
    pub lease_secs: u64,
    /// Runs of a task lost to infrastructure before it is failed.
    pub max_attempts: u32,
    /// Wall-clock limit of one task, in seconds; past it the whole sandbox
    /// is killed and the task ends `timed out`.
    pub timeout_secs: u64,
    /// Memory limit of one task in bytes (cgroup, swap included where the
    /// host accounts it); unset = no limit. Hitting it ends the task
    /// `out of memory`.
    pub memory_limit_bytes: Option<u64>,
    /// Most processes/threads one task may run at once; unset = no limit.
    /// Hitting it ends the task `pid limit reached`.
    pub pids_limit: Option<u64>,
    /// CPU time of one task, in cores (e.g. 1.5); unset = no limit.
    pub cpus: Option<f64>,
    /// Size of the task's writable space in bytes: `/build`, `/out`, `/tmp`
    /// and `/dev/shm` share one tmpfs of this size (its pages count as the
    /// task's memory too). Filling it ends the task `disk limit`. Unset:
    /// `/build` and `/out` are plain dirs on the hub's disk, unlimited.
    pub disk_limit_bytes: Option<u64>,
    /// Features the hub's own slots offer to targets that require them
    /// (`kvm` is detected); see docs/workers.md.
    pub features: Vec<String>,
}

/// `[targets.NAME]`: limits for tasks of one target; each overrides the
/// `[build]` value of the same name.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TargetLimits {
    pub timeout_secs: Option<u64>,
    pub log_limit_bytes: Option<u64>,
    pub output_limit_bytes: Option<u64>,
    pub memory_limit_bytes: Option<u64>,
    pub pids_limit: Option<u64>,
    pub cpus: Option<f64>,
    pub disk_limit_bytes: Option<u64>,
}

/// The limits one task runs under, resolved for its target.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TaskLimits {
    pub timeout_secs: u64,
    pub log_limit_bytes: u64,
    pub output_limit_bytes: u64,
    pub memory_limit_bytes: Option<u64>,
    pub pids_limit: Option<u64>,
    pub cpus: Option<f64>,
    pub disk_limit_bytes: Option<u64>,
}

impl std::fmt::Display for TaskLimits {
    /// One line for the task's log: what this task may use.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let opt = |v: Option<u64>| v.map_or("none".to_string(), |v| v.to_string());
        write!(
            f,
            "timeout {} s, log {} bytes (kill at {}), memory {}, pids {}, cpus {}, disk {}",
            self.timeout_secs,
            self.log_limit_bytes,
            self.output_limit_bytes,
            opt(self.memory_limit_bytes),
            opt(self.pids_limit),
            self.cpus.map_or("none".to_string(), |c| c.to_string()),
            opt(self.disk_limit_bytes),
        )
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "127.0.0.1:8080".parse().expect("valid literal"),
            data: PathBuf::from("kiln-data"),
            max_upload_bytes: 1 << 30,
            public_reads: true,
            public_url: None,
            tls_listen: None,
            tls_cert: None,
            tls_key: None,
            tls_names: Vec::new(),
        }
    }
}

impl BuildConfig {
    /// A lease's length in milliseconds, as the database keeps it.
    pub fn lease_ms(&self) -> i64 {
        self.lease_secs as i64 * 1000
    }
}

impl Default for BuildConfig {
    fn default() -> Self {
        BuildConfig {
            slots: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            log_limit_bytes: 64 << 20,
            lease_secs: 60,
            max_attempts: 3,
            timeout_secs: 3 * 3600,
            output_limit_bytes: 1 << 30,
            memory_limit_bytes: None,
            pids_limit: None,
            cpus: None,
            disk_limit_bytes: None,
            features: Vec::new(),
        }
    }
}

impl Config {
    /// Embedded defaults, then the file (if given), then the environment.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut cfg = match file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(&text).map_err(|message| ConfigError::Parse {
                    path: path.to_owned(),
                    message,
                })?
            }
            None => Config::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    pub fn parse(text: &str) -> Result<Config, String> {
        let cfg: Config =
            toml::from_str(text).map_err(|e| crate::kinds::describe_toml_error(text, &e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Values serde accepts but a task could not run with.
    fn validate(&self) -> Result<(), String> {
        if let Some(u) = &self.server.public_url {
            check_public_url(u).map_err(|m| format!("[server] public_url: {m}"))?;
        }
        crate::tls::supplied_files(&self.server).map_err(|e| e.to_string())?;
        for n in &self.server.tls_names {
            crate::tls::check_name(n).map_err(|m| format!("[server] tls_names: {m}"))?;
        }
        let all = std::iter::once((
            "[build]".to_string(),
            self.limits_of(&TargetLimits::default()),
        ))
        .chain(
            self.targets
                .iter()
                .map(|(name, t)| (format!("[targets.{name}]"), self.limits_of(t))),
        );
        for (table, l) in all {
            if let Some(c) = l.cpus
                && !(c.is_finite() && c > 0.0)
            {
                return Err(format!("{table}: cpus must be a number above 0, got {c}"));
            }
            if l.timeout_secs == 0 {
                return Err(format!("{table}: timeout_secs must be at least 1"));
            }
            if l.disk_limit_bytes.is_some_and(|d| d < 1 << 20) {
                return Err(format!("{table}: disk_limit_bytes must be at least 1 MiB"));
            }
        }
        Ok(())
    }

    /// The limits of a task of `target`: `[targets.NAME]` over `[build]`.
    pub fn limits(&self, target: &str) -> TaskLimits {
        self.limits_of(self.targets.get(target).unwrap_or(&TargetLimits::default()))
    }

    fn limits_of(&self, t: &TargetLimits) -> TaskLimits {
        let b = &self.build;
        TaskLimits {
            timeout_secs: t.timeout_secs.unwrap_or(b.timeout_secs),
            log_limit_bytes: t.log_limit_bytes.unwrap_or(b.log_limit_bytes),
            output_limit_bytes: t.output_limit_bytes.unwrap_or(b.output_limit_bytes),
            memory_limit_bytes: t.memory_limit_bytes.or(b.memory_limit_bytes),
            pids_limit: t.pids_limit.or(b.pids_limit),
            cpus: t.cpus.or(b.cpus),
            disk_limit_bytes: t.disk_limit_bytes.or(b.disk_limit_bytes),
        }
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn bad(name: &'static str, value: String, e: impl std::fmt::Display) -> ConfigError {
            ConfigError::Env {
                name,
                value,
                message: e.to_string(),
            }
        }
        if let Some(v) = get("KILN_LISTEN") {
            self.server.listen = v.parse().map_err(|e| bad("KILN_LISTEN", v.clone(), e))?;
        }
        if let Some(v) = get("KILN_TLS_LISTEN") {
            let addr = v
                .parse()
                .map_err(|e| bad("KILN_TLS_LISTEN", v.clone(), e))?;
            self.server.tls_listen = Some(addr);
        }
        if let Some(v) = get("KILN_DATA") {
            self.server.data = PathBuf::from(v);
        }
        if let Some(v) = get("KILN_PUBLIC_URL") {
            check_public_url(&v).map_err(|m| bad("KILN_PUBLIC_URL", v.clone(), m))?;
            self.server.public_url = Some(v);
        }
        if let Some(v) = get("KILN_SLOTS") {
            self.build.slots = v.parse().map_err(|e| bad("KILN_SLOTS", v.clone(), e))?;
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }
}

/// `http(s)://host[:port][/path]`, no trailing slash, nothing to escape.
fn check_public_url(u: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or("must start with http:// or https://")?;
    if rest.is_empty() || u.ends_with('/') {
        return Err("needs a host and no trailing slash".into());
    }
    if !u.bytes().all(|b| b.is_ascii_graphic()) || u.contains(['"', '\'', '<', '>']) {
        return Err("has characters a URL cannot hold".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_env() {
        let mut c =
            Config::parse("[server]\nlisten = \"127.0.0.1:9000\"\n[build]\nslots = 3\n").unwrap();
        assert_eq!(c.server.listen.port(), 9000);
        assert_eq!(c.build.slots, 3);
        c.apply_env(|k| (k == "KILN_SLOTS").then(|| "0".to_string()))
            .unwrap();
        assert_eq!(c.build.slots, 0);
        let err = c
            .apply_env(|k| (k == "KILN_LISTEN").then(|| "nope".to_string()))
            .unwrap_err();
        assert!(err.to_string().contains("KILN_LISTEN"), "{err}");
        c.apply_env(|k| (k == "KILN_PUBLIC_URL").then(|| "https://pkgs.example.org".into()))
            .unwrap();
        assert_eq!(
            c.server.public_url.as_deref(),
            Some("https://pkgs.example.org")
        );
        for bad in ["pkgs.example.org", "https://x/", "https://x/<y>", "ftp://x"] {
            let err = c
                .apply_env(|k| (k == "KILN_PUBLIC_URL").then(|| bad.to_string()))
                .unwrap_err();
            assert!(err.to_string().contains("KILN_PUBLIC_URL"), "{bad}: {err}");
        }
        let err = Config::parse("[server]\npublic_url = \"example.org\"\n").unwrap_err();
        assert!(err.to_string().contains("public_url"), "{err}");
    }

    #[test]
    fn unknown_field_names_line_and_field() {
        let err = Config::parse("[server]\nlisten = \"127.0.0.1:1\"\nslotz = 2\n").unwrap_err();
        assert!(err.contains("line 3"), "{err}");
        assert!(err.contains("slotz"), "{err}");
    }

    #[test]
    fn a_target_overrides_build_limits_one_by_one() {
        let c = Config::parse(
            "[build]\ntimeout_secs = 100\nmemory_limit_bytes = 1000\n\
             [targets.big]\nmemory_limit_bytes = 5000\ndisk_limit_bytes = 2097152\n",
        )
        .unwrap();
        let big = c.limits("big");
        assert_eq!(big.memory_limit_bytes, Some(5000));
        assert_eq!(big.disk_limit_bytes, Some(2 << 20));
        assert_eq!(big.timeout_secs, 100, "not overridden: [build]'s value");
        let other = c.limits("host");
        assert_eq!(other.memory_limit_bytes, Some(1000));
        assert_eq!(other.disk_limit_bytes, None);
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn impossible_limits_are_named() {
        let err = Config::parse("[targets.x]\ncpus = 0.0\n").unwrap_err();
        assert!(err.contains("[targets.x]") && err.contains("cpus"), "{err}");
        let err = Config::parse("[build]\ntimeout_secs = 0\n").unwrap_err();
        assert!(
            err.contains("[build]") && err.contains("timeout_secs"),
            "{err}"
        );
        let err = Config::parse("[targets.y]\ndisk_limit_bytes = 10\n").unwrap_err();
        assert!(err.contains("disk_limit_bytes"), "{err}");
        let err = Config::parse("[targets.y]\nmemory = 10\n").unwrap_err();
        assert!(err.contains("line 2") && err.contains("memory"), "{err}");
    }

    #[test]
    fn tls_keys() {
        let c = Config::parse(
            "[server]\ntls_listen = \"0.0.0.0:8443\"\ntls_names = [\"hub.example.org\", \"10.1.2.3\"]\n",
        )
        .unwrap();
        assert_eq!(c.server.tls_listen.unwrap().port(), 8443);
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
        let err = Config::parse("[server]\ntls_cert = \"/etc/kiln/hub.crt\"\n").unwrap_err();
        assert!(err.contains("tls_key"), "{err}");
        let err = Config::parse("[server]\ntls_key = \"/etc/kiln/hub.key\"\n").unwrap_err();
        assert!(err.contains("tls_cert"), "{err}");
        let err = Config::parse("[server]\ntls_names = [\"a b\"]\n").unwrap_err();
        assert!(err.contains("tls_names") && err.contains("a b"), "{err}");
        let mut c = Config::default();
        c.apply_env(|k| (k == "KILN_TLS_LISTEN").then(|| "127.0.0.1:0".into()))
            .unwrap();
        assert!(c.server.tls_listen.is_some());
        let err = c
            .apply_env(|k| (k == "KILN_TLS_LISTEN").then(|| "nope".into()))
            .unwrap_err();
        assert!(err.to_string().contains("KILN_TLS_LISTEN"), "{err}");
    }

    #[test]
    fn round_trips() {
        let c = Config::default();
        assert_eq!(Config::parse(&c.to_toml()).unwrap(), c);
    }
}
