//! The hub's shared state and its data directory: the database, the store,
//! live logs, the admin token, and the signals slots and followers wait on.
//!
//! Data directory layout (must stay stable across versions):
//! - `kiln.redb`      metadata (db)
//! - `cas/`           blobs by sha256 (cas)
//! - `admin.token`    the first admin token, mode 0600, for the CLI on this machine
//! - `logs/`          live logs of running tasks
//! - `work/`          per-task scratch (source checkout, outputs); emptied at start
//! - `tls/`           the generated HTTPS certificate `hub.crt` and its key `hub.key`
//!   (0600), made once and kept because clients pin its fingerprint (tls)

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest as _, Sha256};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;

use crate::cas::{Cas, CasError};
use crate::config::Config;
use crate::db::{Db, DbError};
use crate::lock;
use crate::logs::LiveLogs;
use crate::model::{Token, now_ms};
use crate::workers::{AdminState, LOCAL_WORKER, Speeds, WorkerInfo, WorkerRecord, WorkerView};

pub const ADMIN_TOKEN_FILE: &str = "admin.token";

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("data directory {path}: {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Cas(#[from] CasError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

pub struct Hub {
    pub config: Config,
    pub db: Db,
    pub cas: Cas,
    pub logs: Arc<LiveLogs>,
    /// The kiln binary, re-executed as the sandbox's init.
    pub kiln_exe: PathBuf,
    /// Woken when a task is queued.
    pub queued: Notify,
    /// Bumped on every task state change; followers wait on it.
    pub changes: watch::Sender<u64>,
    /// Cancelled when the hub shuts down: slots stop, sandboxes are killed
    /// and their tasks stay `running`, to be re-queued at the next start.
    pub shutdown: CancellationToken,
    /// One publish per repo at a time, and each repo's index cache.
    pub publisher: crate::repos::Publisher,
    /// The cancel token of each task a local slot runs: cancelling or
    /// re-queueing a running task fires it, killing the sandbox at once.
    pub running:
        std::sync::Mutex<std::collections::HashMap<crate::model::TaskId, CancellationToken>>,
    /// What the hub's own slots are, as a worker (`local`).
    pub local_info: WorkerInfo,
    /// Workers heard from lately: their entry (refreshed at most every
    /// `PRESENCE_WRITE_MS`) and how many lease requests of theirs wait.
    pub presence: std::sync::Mutex<std::collections::HashMap<String, Presence>>,
    /// `recent_speeds`: when read, and what.
    speeds: std::sync::Mutex<Option<(i64, Arc<Speeds>)>>,
    /// `version()`, computed on first use (it hashes the binary).
    version: std::sync::Mutex<Option<String>>,
    /// Lowercase hex SHA-256 of the certificate served on `tls_listen`
    /// (`None` without HTTPS): what workers and join tokens pin.
    pub tls_fingerprint: Option<String>,
    /// The rustls config the TLS listener serves with (`start` binds it).
    pub(crate) tls_config: Option<Arc<rustls::ServerConfig>>,
    /// Held by a buildroot export (hub) or a copy's download and unpack
    /// (remote worker): one at a time, and a second asker reuses the first's.
    pub(crate) root_jobs: tokio::sync::Mutex<()>,
    /// Failed web logins per address.
    pub logins: crate::accounts::LoginLimiter,
}

/// A worker as the hub knows it between directory writes.
#[derive(Debug, Clone)]
pub struct Presence {
    pub rec: WorkerRecord,
    /// When `rec` was last written.
    pub written: i64,
    /// Its QoS rating when last written.
    pub rating: f64,
    /// Lease requests of its waiting now.
    pub waiting: u32,
}

/// A contact refreshes the stored directory entry at most this often
/// (unless what the worker reports changed).
const PRESENCE_WRITE_MS: i64 = 2_000;

/// How stale the speed factors behind a contact's rating may be.
const SPEEDS_TTL_MS: i64 = 10_000;

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> HubError + '_ {
    move |source| HubError::DataDir {
        path: path.to_owned(),
        source,
    }
}

/// sha256 of a token's secret: what the database stores.
pub fn token_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// A new random token secret.
pub fn new_secret() -> String {
    let bytes: [u8; 32] = rand::random();
    format!("kiln_{}", hex::encode(bytes))
}

impl Hub {
    /// Opens the data directory, creating it on first use; re-queues tasks
    /// interrupted by a previous crash; creates the admin token on first start.
    pub fn open(config: Config, kiln_exe: PathBuf) -> Result<Arc<Hub>, HubError> {
        let data = config.server.data.clone();
        std::fs::create_dir_all(&data).map_err(io_at(&data))?;
        // Before the database: a bad certificate or key fails the start
        // without touching anything.
        let tls = crate::tls::load_or_create(&config.server, &data)?;
        let db = Db::open(&data.join("kiln.redb"))?;
        let cas = Cas::open(&data.join("cas"))?;
        let logs = Arc::new(LiveLogs::open(data.join("logs")).map_err(io_at(&data))?);
        let work = data.join("work");
        if work.exists() {
            crate::worker::remove_tree(&work).map_err(io_at(&work))?;
        }
        std::fs::create_dir_all(&work).map_err(io_at(&work))?;
        let requeued = db.requeue_interrupted()?;
        if !requeued.is_empty() {
            tracing::info!(tasks = ?requeued, "re-queued tasks interrupted by the last shutdown");
        }
        let local_info = WorkerInfo::probe(
            &data,
            config.build.slots as u32,
            &config.build.features,
            true,
        );
        let hub = Arc::new(Hub {
            config,
            db,
            cas,
            logs,
            kiln_exe,
            queued: Notify::new(),
            changes: watch::channel(0).0,
            shutdown: CancellationToken::new(),
            publisher: Default::default(),
            running: Default::default(),
            local_info,
            presence: Default::default(),
            speeds: Default::default(),
            version: Default::default(),
            tls_fingerprint: tls.as_ref().map(|t| t.fingerprint.clone()),
            tls_config: tls.map(|t| t.config),
            root_jobs: Default::default(),
            logins: Default::default(),
        });
        hub.ensure_admin_token()?;
        if hub.config.build.slots > 0 {
            hub.worker_contact(LOCAL_WORKER, Some(&hub.local_info))?;
        }
        Ok(hub)
    }

    pub fn data_dir(&self) -> &Path {
        &self.config.server.data
    }

    pub fn work_dir(&self) -> PathBuf {
        self.data_dir().join("work")
    }

    /// On first start, make an admin token and leave it, mode 0600, in the
    /// data dir for the CLI on this machine.
    fn ensure_admin_token(&self) -> Result<(), HubError> {
        if self.db.token_count()? > 0 {
            return Ok(());
        }
        let secret = new_secret();
        let path = self.data_dir().join(ADMIN_TOKEN_FILE);
        crate::durable::write(&path, format!("{secret}\n").as_bytes(), 0o600)
            .map_err(io_at(&path))?;
        // The token is written before the db knows it: a crash between leaves
        // a file with a token the db lacks, and the next start makes a new one.
        self.db.insert_token(
            &token_hash(&secret),
            &Token {
                name: "admin".into(),
                admin: true,
                created: now_ms(),
            },
        )?;
        tracing::info!(path = %path.display(), "created the admin token");
        Ok(())
    }

    /// Makes a new token and returns its secret (shown once).
    pub fn create_token(&self, name: &str, admin: bool) -> Result<String, HubError> {
        let secret = new_secret();
        self.db.insert_token(
            &token_hash(&secret),
            &Token {
                name: name.to_string(),
                admin,
                created: now_ms(),
            },
        )?;
        Ok(secret)
    }

    /// The version of the kiln binary this hub runs tasks with (and hands
    /// to self-updating workers).
    pub fn version(&self) -> String {
        lock(&self.version)
            .get_or_insert_with(|| crate::workers::version_of(&self.kiln_exe))
            .clone()
    }

    /// A worker unseen for this long is offline (a lease length: idle
    /// workers ask at least twice per lease, busy ones heartbeat thrice).
    pub fn worker_gap_ms(&self) -> i64 {
        self.config.build.lease_ms()
    }

    /// Records a contact from worker `name` (with what it reports) and
    /// returns its directory entry. Writes at most every couple of seconds
    /// per worker, or when its report changed.
    pub fn worker_contact(
        &self,
        name: &str,
        info: Option<&WorkerInfo>,
    ) -> Result<WorkerRecord, HubError> {
        let now = now_ms();
        {
            let mut p = lock(&self.presence);
            if let Some(pr) = p.get_mut(name)
                && now - pr.written < PRESENCE_WRITE_MS
                && info.is_none_or(|i| pr.rec.info.as_ref() == Some(i))
            {
                pr.rec.last_seen = now;
                return Ok(pr.rec.clone());
            }
        }
        let rec = self
            .db
            .touch_worker(name, info, now, self.worker_gap_ms())?;
        let rating = crate::workers::Qos::of(&rec, &*self.recent_speeds(now)?, now).rating;
        let mut p = lock(&self.presence);
        let e = p.entry(name.to_string()).or_insert_with(|| Presence {
            rec: rec.clone(),
            written: now,
            rating,
            waiting: 0,
        });
        e.rec = rec.clone();
        e.written = now;
        e.rating = rating;
        Ok(rec)
    }

    /// Sets what admins allow a worker. Disabling re-queues the tasks it
    /// runs (their sandboxes are killed: locally at once, remotely at the
    /// next heartbeat); draining lets them finish.
    pub fn set_worker_admin(
        &self,
        name: &str,
        admin: AdminState,
    ) -> Result<WorkerRecord, HubError> {
        let rec = self.db.set_worker_admin(name, admin)?;
        if let Some(pr) = lock(&self.presence).get_mut(name) {
            pr.rec.admin = admin;
        }
        if admin == AdminState::Disabled {
            for task in self.db.running_on(name)? {
                match crate::worker::stop_task(self, task, true) {
                    Ok(_) | Err(crate::db::DbError::Conflict(_)) => {}
                    Err(e) => return Err(e.into()),
                }
            }
        }
        self.queued.notify_waiters();
        self.changed();
        Ok(rec)
    }

    /// The durations table behind speed factors, re-read at most every
    /// `SPEEDS_TTL_MS`: contacts re-rate workers often, and the table
    /// grows with packages × workers.
    fn recent_speeds(&self, now: i64) -> Result<Arc<Speeds>, HubError> {
        let mut cached = lock(&self.speeds);
        match &*cached {
            Some((at, s)) if now - at < SPEEDS_TTL_MS => Ok(s.clone()),
            _ => {
                let s = Arc::new(self.db.worker_speeds()?);
                *cached = Some((now, s.clone()));
                Ok(s)
            }
        }
    }

    /// Every worker's entry as of now: contacts since the last write (and
    /// a lease request waiting now) count as seen, and as online time, as
    /// they will at the next write.
    fn workers_now(&self, now: i64) -> Result<Vec<WorkerRecord>, HubError> {
        let mut recs = self.db.workers()?;
        let presence = lock(&self.presence);
        for rec in &mut recs {
            if let Some(p) = presence.get(&rec.name) {
                let seen = if p.waiting > 0 { now } else { p.rec.last_seen };
                rec.seen(seen, self.worker_gap_ms());
            }
        }
        Ok(recs)
    }

    /// The worker directory as shown: every worker with its state and QoS.
    pub fn directory(&self) -> Result<Vec<WorkerView>, HubError> {
        let now = now_ms();
        let running = self.db.running_by_worker()?;
        let speeds = self.db.worker_speeds()?;
        Ok(self
            .workers_now(now)?
            .into_iter()
            .map(|rec| {
                let n = running.get(&rec.name).copied().unwrap_or(0);
                WorkerView::of(rec, n, &speeds, now, self.worker_gap_ms())
            })
            .collect())
    }

    /// Configurations of the workers that may take tasks now (enabled and
    /// online), the hub's own slots included.
    pub fn candidate_workers(&self) -> Result<Vec<WorkerInfo>, HubError> {
        let now = now_ms();
        Ok(self
            .workers_now(now)?
            .into_iter()
            .filter(|r| r.admin == AdminState::Enabled && r.online(now, self.worker_gap_ms()))
            .filter_map(|r| r.info)
            .collect())
    }

    /// Tells slots and followers that something changed.
    pub fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }
}
