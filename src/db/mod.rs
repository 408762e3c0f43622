//! Metadata in one redb file: typed reads and writes of projects, packages,
//! builds, tasks, the queue, artifacts and tokens.
//!
//! What must stay true:
//! - every state change that belongs together (a build and its tasks and queue
//!   entries; a task's end, its artifacts and its build's state) is one write
//!   transaction, so a crash leaves either all of it or none;
//! - a digest is written here only after its blob is durable in the store;
//! - build and task ids and lease fences only grow (counters in `META`).

use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Serialize, de::DeserializeOwned};

use crate::cas::Digest;
use crate::lock;
use crate::model::{
    Artifact, Build, BuildDetail, BuildId, BuildState, Buildroot, BuildrootState, HOST_TARGET,
    Lease, Outcome, Package, PackageKind, Project, Repo, RepoAdd, RepoDeb, RepoFileRef, RepoRpm,
    Target, Task, TaskId, Token, now_ms,
};
use crate::workers::{AdminState, Needs, Speeds, WorkerInfo, WorkerRecord, WorkerToken};

mod accounts;
pub use accounts::Page;

/// Bumped whenever a stored type changes shape; `Db::open` refuses files from
/// a newer kiln and upgrades older ones.
pub const SCHEMA_VERSION: u64 = 1;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const PROJECTS: TableDefinition<&str, &[u8]> = TableDefinition::new("projects");
const PACKAGES: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("packages");
const BUILDS: TableDefinition<u64, &[u8]> = TableDefinition::new("builds");
const TASKS: TableDefinition<u64, &[u8]> = TableDefinition::new("tasks");
/// Queued tasks in order: (sequence, task id). The sequence is the order of
/// queueing; re-queued tasks go to the back.
const QUEUE: TableDefinition<u64, u64> = TableDefinition::new("queue");
/// The same queue split into one lane per project, `(project, seq) → task`:
/// leasing takes the head of the lane whose project runs the fewest tasks.
const QUEUE_LANES: TableDefinition<(&str, u64), u64> = TableDefinition::new("queue_lanes");
/// How many tasks each project's lane holds (kept with every lane change),
/// so "position N of M" needs no count of the lane.
const LANE_LEN: TableDefinition<&str, u64> = TableDefinition::new("lane_len");
/// Running tasks and their projects (few rows: one per busy slot).
const RUNNING: TableDefinition<u64, &str> = TableDefinition::new("running");
/// Project → the fence of its latest lease: among projects running equally
/// many tasks, the one served longest ago goes first (round robin).
const LAST_SERVED: TableDefinition<&str, u64> = TableDefinition::new("last_served");
const ARTIFACTS: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("artifacts");
const TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("tokens");
/// (project, target name) → Target.
const TARGETS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("targets");
/// (project, repo name) → Repo.
const REPOS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("repos");
/// (project, repo, "package/arch") → RepoDeb: the repo's packages.
const REPO_DEBS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("repo_debs");
/// (project, repo, "name/arch") → RepoRpm: the repo's RPMs (signed).
const REPO_RPMS: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("repo_rpms");
/// (project, repo, path) → RepoFileRef: what `/repos/<project>/<repo>/<path>` serves.
const REPO_FILES: TableDefinition<(&str, &str, &str), &[u8]> = TableDefinition::new("repo_files");
/// name → Buildroot.
const BUILDROOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("buildroots");
/// Build id → where its source came from (git URL, ref, commit), for builds
/// whose source was not an upload.
const BUILD_ORIGINS: TableDefinition<u64, &[u8]> = TableDefinition::new("build_origins");
/// project → its OpenPGP signing key (armored secret key).
const PROJECT_KEYS: TableDefinition<&str, &str> = TableDefinition::new("project_keys");
/// The worker directory: name → `WorkerRecord`.
const WORKERS: TableDefinition<&str, &[u8]> = TableDefinition::new("workers");
/// Join tokens: sha256(secret) → `WorkerToken`.
const WORKER_TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("worker_tokens");
/// Succeeded tasks' durations: (project/package/target, worker) → (count, total ms).
const WORKER_SPEEDS: TableDefinition<(&str, &str), (u64, u64)> =
    TableDefinition::new("worker_speeds");
/// What a target's tasks need of a worker beyond its arch: `Needs`.
const TARGET_NEEDS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("target_needs");
/// Tasks re-queued after an infrastructure failure on a remote worker:
/// task → (that worker, until when it should not get the task back).
const TASK_AVOID: TableDefinition<u64, &[u8]> = TableDefinition::new("task_avoid");
/// How long a remote worker that lost a task to infrastructure is passed
/// over for it ("retried elsewhere if possible").
const AVOID_MS: i64 = 60_000;
/// Builds an admin gave a priority other than 0.
const BUILD_PRIORITY: TableDefinition<u64, i64> = TableDefinition::new("build_priority");
/// Builds by project and by package, for pages that list them newest
/// first without scanning every build.
const PROJECT_BUILDS: TableDefinition<(&str, u64), ()> = TableDefinition::new("project_builds");
const PACKAGE_BUILDS: TableDefinition<(&str, &str, u64), ()> =
    TableDefinition::new("package_builds");
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// session cookie hash → Session.
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
/// (project, user) → ProjectRole.
const MEMBERS: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("members");
/// token hash → UserToken; (user, label) → token hash.
const USER_TOKENS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("user_tokens");
const USER_TOKEN_LABELS: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("user_token_labels");
/// seq → AuditEntry.
const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// Build priorities run from -100 to 100; a lane key is
/// `(100 - priority) << 48 | queue seq`, so a lane is ordered by priority,
/// then by submission.
pub const MAX_PRIORITY: i64 = 100;
const SEQ_BITS: u32 = 48;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;

fn lane_rank(priority: i64, seq: u64) -> u64 {
    ((MAX_PRIORITY - priority.clamp(-MAX_PRIORITY, MAX_PRIORITY)) as u64) << SEQ_BITS
        | (seq & SEQ_MASK)
}

const K_SCHEMA: &str = "schema_version";
const K_NEXT_BUILD: &str = "next_build";
const K_NEXT_TASK: &str = "next_task";
const K_NEXT_FENCE: &str = "next_fence";
const K_QUEUE_SEQ: &str = "queue_seq";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("database: {0}")]
    Redb(String),
    #[error(
        "database file has schema version {found}, this kiln understands up to {SCHEMA_VERSION}; upgrade kiln"
    )]
    TooNew { found: u64 },
    #[error("stored record is unreadable: {0}")]
    Decode(String),
    #[error("build {0} not found")]
    BuildNotFound(BuildId),
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    #[error("task {task}: lease fence {given} is stale (current {current:?})")]
    StaleLease {
        task: TaskId,
        given: u64,
        current: Option<u64>,
    },
    #[error("project {0:?} not found")]
    ProjectNotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for DbError {
            fn from(e: $t) -> Self { DbError::Redb(e.to_string()) }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

pub type Result<T, E = DbError> = std::result::Result<T, E>;

fn enc<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_stdvec(v).expect("postcard encoding of an in-memory value cannot fail")
}

fn dec<T: DeserializeOwned>(b: &[u8]) -> Result<T> {
    postcard::from_bytes(b).map_err(|e| DbError::Decode(e.to_string()))
}

/// A write transaction whose commit is not synced to disk: for state a
/// crash may lose because the next start rebuilds it (leases, heartbeats,
/// last-seen times; running tasks are re-queued at start and fences jump
/// past anything handed out before). The next durable commit persists it.
fn begin_volatile(db: &Db) -> Result<redb::WriteTransaction> {
    db.volatile
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut tx = db.db.begin_write()?;
    tx.set_durability(redb::Durability::None)
        .map_err(|e| DbError::Redb(e.to_string()))?;
    Ok(tx)
}

/// Fences handed out by non-durable lease commits may be lost in a crash;
/// each start moves the counter this far ahead so none is issued twice.
const FENCE_EPOCH: u64 = 1 << 32;

/// Reads a counter, returns its value and stores value + 1.
fn bump(meta: &mut redb::Table<&str, u64>, key: &str, first: u64) -> Result<u64> {
    let v = meta.get(key)?.map(|g| g.value()).unwrap_or(first);
    meta.insert(key, v + 1)?;
    Ok(v)
}

fn get_rec<K, T>(
    table: &impl ReadableTable<K, &'static [u8]>,
    key: K::SelfType<'_>,
) -> Result<Option<T>>
where
    K: redb::Key + 'static,
    T: DeserializeOwned,
{
    match table.get(key)? {
        Some(g) => Ok(Some(dec(g.value())?)),
        None => Ok(None),
    }
}

/// Every record of a table, in key order.
fn all_recs<K, T>(table: &impl ReadableTable<K, &'static [u8]>) -> Result<Vec<T>>
where
    K: redb::Key + 'static,
    T: DeserializeOwned,
{
    let mut out = Vec::new();
    for row in table.iter()? {
        out.push(dec(row?.1.value())?);
    }
    Ok(out)
}

/// What a worker gets when it leases a task.
#[derive(Debug, Clone)]
pub struct Leased {
    pub task: Task,
    pub build: Build,
    pub fence: u64,
}

/// The end of a task as a worker reports it.
#[derive(Debug, Clone)]
pub struct TaskEnd {
    pub outcome: Outcome,
    pub log: Option<Digest>,
    pub outputs: Option<Digest>,
    pub artifacts: Vec<Artifact>,
    /// Packages to put into a repo, if the task succeeded.
    pub publish: Option<RepoAdd>,
}

impl TaskEnd {
    /// An end for a task that failed outside its build (set-up, lost
    /// lease): no log or outputs; re-queued while attempts remain.
    pub fn infrastructure(why: String) -> TaskEnd {
        TaskEnd {
            outcome: Outcome::Infrastructure(why),
            log: None,
            outputs: None,
            artifacts: vec![],
            publish: None,
        }
    }
}

pub struct Db {
    db: Database,
    /// Ends waiting for the next group commit, and who commits them.
    ends: std::sync::Mutex<Vec<PendingEnd>>,
    end_leader: std::sync::Mutex<()>,
    /// Lease requests waiting for the next grant batch, and who grants them.
    leases: std::sync::Mutex<Vec<PendingLease>>,
    lease_leader: std::sync::Mutex<()>,
    /// Set by commits made without a sync since the last `sync`.
    volatile: std::sync::atomic::AtomicBool,
}

impl Db {
    /// Opens (or creates) the database file and checks its schema version.
    pub fn open(path: &Path) -> Result<Db> {
        let db = Database::create(path)?;
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(META)?;
            let found = meta.get(K_SCHEMA)?.map(|g| g.value());
            match found {
                None => {
                    meta.insert(K_SCHEMA, SCHEMA_VERSION)?;
                }
                Some(v) if v > SCHEMA_VERSION => return Err(DbError::TooNew { found: v }),
                Some(_) => {} // older versions: upgrades go here
            }
            // Create every table so readers never meet a missing one.
            tx.open_table(PROJECTS)?;
            tx.open_table(PACKAGES)?;
            tx.open_table(BUILDS)?;
            tx.open_table(TASKS)?;
            tx.open_table(QUEUE)?;
            tx.open_table(ARTIFACTS)?;
            tx.open_table(TOKENS)?;
            tx.open_table(TARGETS)?;
            tx.open_table(REPOS)?;
            tx.open_table(REPO_DEBS)?;
            tx.open_table(REPO_RPMS)?;
            tx.open_table(REPO_FILES)?;
            tx.open_table(PROJECT_KEYS)?;
            tx.open_table(BUILDROOTS)?;
            tx.open_table(BUILD_ORIGINS)?;
            tx.open_table(RUNNING)?;
            tx.open_table(LAST_SERVED)?;
            tx.open_table(WORKERS)?;
            tx.open_table(WORKER_TOKENS)?;
            tx.open_table(WORKER_SPEEDS)?;
            tx.open_table(TARGET_NEEDS)?;
            tx.open_table(BUILD_PRIORITY)?;
            tx.open_table(LANE_LEN)?;
            tx.open_table(USERS)?;
            tx.open_table(SESSIONS)?;
            tx.open_table(MEMBERS)?;
            tx.open_table(USER_TOKENS)?;
            tx.open_table(USER_TOKEN_LABELS)?;
            tx.open_table(AUDIT)?;
            let next_fence = meta.get(K_NEXT_FENCE)?.map_or(1, |g| g.value());
            meta.insert(K_NEXT_FENCE, next_fence + FENCE_EPOCH)?;
            drop(meta);
            // Lanes came after the queue: rebuild them when they disagree.
            let lanes = tx.open_table(QUEUE_LANES)?.len()?;
            if lanes != tx.open_table(QUEUE)?.len()? {
                rebuild_lanes(&tx)?;
            }
            let counted: u64 = tx
                .open_table(LANE_LEN)?
                .iter()?
                .map(|r| r.map(|(_, v)| v.value()).unwrap_or(0))
                .sum();
            if counted != tx.open_table(QUEUE_LANES)?.len()? {
                recount_lanes(&tx)?;
            }
            // The build indexes came after builds: fill them when they disagree.
            let indexed = tx.open_table(PROJECT_BUILDS)?.len()?;
            if indexed != tx.open_table(BUILDS)?.len()? {
                rebuild_build_indexes(&tx)?;
            }
        }
        tx.commit()?;
        Ok(Db {
            db,
            ends: Default::default(),
            end_leader: Default::default(),
            leases: Default::default(),
            lease_leader: Default::default(),
            volatile: Default::default(),
        })
    }

    /// Makes commits done without a sync durable (an empty synced commit),
    /// if there were any: bounds what a crash can lose of them and lets
    /// redb reuse the pages they freed.
    pub fn sync(&self) -> Result<()> {
        if self
            .volatile
            .swap(false, std::sync::atomic::Ordering::Relaxed)
        {
            self.db.begin_write()?.commit()?;
        }
        Ok(())
    }

    pub fn schema_version(&self) -> Result<u64> {
        let tx = self.db.begin_read()?;
        let meta = tx.open_table(META)?;
        Ok(meta.get(K_SCHEMA)?.map(|g| g.value()).unwrap_or(0))
    }

    // ---- tokens ----

    pub fn token_count(&self) -> Result<u64> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(TOKENS)?.len()?)
    }

    pub fn insert_token(&self, hash: &[u8; 32], token: &Token) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(TOKENS)?
            .insert(hash.as_slice(), enc(token).as_slice())?;
        tx.commit()?;
        Ok(())
    }

    pub fn token(&self, hash: &[u8; 32]) -> Result<Option<Token>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(TOKENS)?, hash.as_slice())
    }

    // ---- projects and packages ----

    pub fn project(&self, name: &str) -> Result<Option<Project>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(PROJECTS)?, name)
    }

    pub fn package(&self, project: &str, name: &str) -> Result<Option<Package>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(PACKAGES)?, (project, name))
    }

    // ---- builds ----

    /// Records a new build with one queued task per target, creating its
    /// project and package on first use. One transaction.
    #[allow(clippy::too_many_arguments)]
    pub fn create_build(
        &self,
        project: &str,
        package: &str,
        kind: PackageKind,
        source: Digest,
        source_date_epoch: i64,
        submitted_by: &str,
        targets: &[&str],
        origin: Option<&crate::gitsrc::GitOrigin>,
    ) -> Result<Build> {
        let now = now_ms();
        let tx = self.db.begin_write()?;
        let build = {
            let mut meta = tx.open_table(META)?;
            let mut projects = tx.open_table(PROJECTS)?;
            if projects.get(project)?.is_none() {
                let p = Project {
                    name: project.to_string(),
                    created: now,
                };
                projects.insert(project, enc(&p).as_slice())?;
            }
            let mut packages = tx.open_table(PACKAGES)?;
            if packages.get((project, package))?.is_none() {
                let p = Package {
                    project: project.to_string(),
                    name: package.to_string(),
                    kind,
                    created: now,
                };
                packages.insert((project, package), enc(&p).as_slice())?;
            }
            let id = bump(&mut meta, K_NEXT_BUILD, 1)?;
            let mut tasks = tx.open_table(TASKS)?;
            let mut task_ids = Vec::new();
            for target in targets {
                let tid = bump(&mut meta, K_NEXT_TASK, 1)?;
                let task = Task {
                    id: tid,
                    build: id,
                    target: target.to_string(),
                    state: BuildState::Queued,
                    attempt: 1,
                    lease: None,
                    worker: None,
                    outcome: None,
                    log: None,
                    outputs: None,
                    created: now,
                    started: None,
                    finished: None,
                };
                tasks.insert(tid, enc(&task).as_slice())?;
                task_ids.push(tid);
            }
            let build = Build {
                id,
                project: project.to_string(),
                package: package.to_string(),
                kind,
                source,
                source_date_epoch,
                submitted_by: submitted_by.to_string(),
                state: BuildState::Queued,
                created: now,
                started: None,
                finished: None,
                tasks: task_ids,
            };
            tx.open_table(BUILDS)?.insert(id, enc(&build).as_slice())?;
            tx.open_table(PROJECT_BUILDS)?.insert((project, id), ())?;
            tx.open_table(PACKAGE_BUILDS)?
                .insert((project, package, id), ())?;
            for tid in &build.tasks {
                enqueue(&tx, &mut meta, project, id, *tid)?;
            }
            if let Some(o) = origin {
                tx.open_table(BUILD_ORIGINS)?
                    .insert(id, enc(o).as_slice())?;
            }
            build
        };
        tx.commit()?;
        Ok(build)
    }

    pub fn build(&self, id: BuildId) -> Result<Build> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(BUILDS)?, id)?.ok_or(DbError::BuildNotFound(id))
    }

    pub fn build_detail(&self, id: BuildId) -> Result<BuildDetail> {
        let tx = self.db.begin_read()?;
        let build: Build =
            get_rec(&tx.open_table(BUILDS)?, id)?.ok_or(DbError::BuildNotFound(id))?;
        let tasks = tx.open_table(TASKS)?;
        let mut task_list = Vec::with_capacity(build.tasks.len());
        for t in &build.tasks {
            task_list.push(get_rec(&tasks, *t)?.ok_or(DbError::TaskNotFound(*t))?);
        }
        let origin = get_rec(&tx.open_table(BUILD_ORIGINS)?, id)?;
        Ok(BuildDetail {
            build,
            task_list,
            origin,
        })
    }

    /// Builds newest first, starting below `before` (exclusive), at most
    /// `limit`. Walks the id index backwards: no full scan.
    pub fn list_builds(&self, before: Option<BuildId>, limit: usize) -> Result<Vec<Build>> {
        let tx = self.db.begin_read()?;
        let builds = tx.open_table(BUILDS)?;
        let upper = before.unwrap_or(u64::MAX);
        let mut out = Vec::new();
        for row in builds.range(..upper)?.rev().take(limit) {
            let (_, v) = row?;
            out.push(dec(v.value())?);
        }
        Ok(out)
    }

    pub fn task(&self, id: TaskId) -> Result<Task> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(TASKS)?, id)?.ok_or(DbError::TaskNotFound(id))
    }

    pub fn artifacts(&self, build: BuildId) -> Result<Vec<Artifact>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(ARTIFACTS)?;
        let mut out = Vec::new();
        for row in t.range((build, "")..(build + 1, ""))? {
            let (_, v) = row?;
            out.push(dec(v.value())?);
        }
        Ok(out)
    }

    pub fn artifact(&self, build: BuildId, path: &str) -> Result<Option<Artifact>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(ARTIFACTS)?, (build, path))
    }

    pub fn queue_len(&self) -> Result<u64> {
        let tx = self.db.begin_read()?;
        Ok(tx.open_table(QUEUE)?.len()?)
    }

    /// Where a queued task stands in its project's lane, and how many
    /// projects' lanes share the slots in turn.
    pub fn queue_position(&self, task: TaskId) -> Result<Option<QueuePosition>> {
        let tx = self.db.begin_read()?;
        let t: Task = get_rec(&tx.open_table(TASKS)?, task)?.ok_or(DbError::TaskNotFound(task))?;
        if t.state != BuildState::Queued {
            return Ok(None);
        }
        let b: Build =
            get_rec(&tx.open_table(BUILDS)?, t.build)?.ok_or(DbError::BuildNotFound(t.build))?;
        let lanes = tx.open_table(QUEUE_LANES)?;
        let lane_len = tx
            .open_table(LANE_LEN)?
            .get(b.project.as_str())?
            .map_or(0, |g| g.value());
        // Tasks near the head (the ones people look at) are found at once.
        let mut position = None;
        for (i, row) in lanes
            .range((b.project.as_str(), 0)..=(b.project.as_str(), u64::MAX))?
            .enumerate()
        {
            if row?.1.value() == task {
                position = Some(i as u64 + 1);
                break;
            }
        }
        let projects = lane_heads(&lanes)?.len();
        Ok(position.map(|position| QueuePosition {
            project: b.project,
            position,
            lane_len,
            projects,
        }))
    }

    // ---- leases ----

    /// Hands the first queued task to `worker` under a fresh lease. One
    /// transaction: the queue entry, the task and its build change together.
    pub fn lease_next(&self, worker: &str, lease_ms: i64) -> Result<Option<Leased>> {
        self.lease_next_where(worker, lease_ms, None)
    }

    /// [`Db::lease_next`] among the tasks whose needs `runs` accepts (the
    /// worker's arch, features and resources).
    ///
    /// Group grant: requests that arrive while a batch is being granted
    /// wait, and the next caller grants them all in one transaction (in
    /// arrival order, each seeing the grants before it, so fair share holds
    /// within a batch). With many workers asking at once this is one commit
    /// and one wait for the writer per batch instead of per lease.
    pub fn lease_next_where(
        &self,
        worker: &str,
        lease_ms: i64,
        runs: Option<Runs>,
    ) -> Result<Option<Leased>> {
        // Idle workers all wake on every change: an empty queue must not
        // make them queue up for the one writer.
        if self.queue_len()? == 0 {
            return Ok(None);
        }
        let (reply, answer) = std::sync::mpsc::channel();
        lock(&self.leases).push(PendingLease {
            worker: worker.to_string(),
            lease_ms,
            runs,
            reply,
        });
        let leader = lock(&self.lease_leader);
        if let Ok(r) = answer.try_recv() {
            return r;
        }
        let batch = std::mem::take(&mut *lock(&self.leases));
        self.grant_leases(batch);
        drop(leader);
        answer
            .recv()
            .unwrap_or_else(|_| Err(DbError::Redb("the lease request was dropped".into())))
    }

    /// Grants a batch of lease requests in one transaction without a sync.
    /// An error fails the whole batch (nothing of it is committed).
    fn grant_leases(&self, batch: Vec<PendingLease>) {
        if batch.is_empty() {
            return;
        }
        let granted = (|| -> Result<Vec<Option<Leased>>> {
            let now = now_ms();
            let tx = begin_volatile(self)?;
            let mut running: std::collections::HashMap<String, usize> = Default::default();
            for row in tx.open_table(RUNNING)?.iter()? {
                let (_, p) = row?;
                *running.entry(p.value().to_string()).or_default() += 1;
            }
            let mut out = Vec::with_capacity(batch.len());
            for p in &batch {
                let l = grant_one(
                    &tx,
                    &mut running,
                    &p.worker,
                    now,
                    p.lease_ms,
                    p.runs.as_deref(),
                )?;
                out.push(l);
            }
            tx.commit()?;
            Ok(out)
        })();
        match granted {
            Ok(out) => {
                for (p, l) in batch.into_iter().zip(out) {
                    let _ = p.reply.send(Ok(l));
                }
            }
            Err(e) => {
                let why = e.to_string();
                for p in batch {
                    let _ = p.reply.send(Err(DbError::Redb(why.clone())));
                }
            }
        }
    }

    /// Running tasks whose lease ran out before `now`: `(task, fence, worker)`.
    /// Reads only the running set (one row per busy slot).
    pub fn expired_leases(&self, now: i64) -> Result<Vec<(TaskId, u64, String)>> {
        let tx = self.db.begin_read()?;
        let tasks = tx.open_table(TASKS)?;
        let mut out = Vec::new();
        for row in tx.open_table(RUNNING)?.iter()? {
            let (id, _) = row?;
            let t: Task = get_rec(&tasks, id.value())?.ok_or(DbError::TaskNotFound(id.value()))?;
            if let Some(l) = t.lease.filter(|l| l.expires < now) {
                out.push((t.id, l.fence, l.worker));
            }
        }
        Ok(out)
    }

    /// Extends a lease. Fails with `StaleLease` when the task was given to
    /// someone else (or ended) meanwhile: the worker must stop.
    pub fn heartbeat(&self, task: TaskId, fence: u64, lease_ms: i64) -> Result<()> {
        let tx = begin_volatile(self)?;
        {
            let mut tasks = tx.open_table(TASKS)?;
            let mut t: Task = get_rec(&tasks, task)?.ok_or(DbError::TaskNotFound(task))?;
            check_fence(&t, fence)?;
            if let Some(l) = t.lease.as_mut() {
                l.expires = now_ms() + lease_ms;
            }
            tasks.insert(task, enc(&t).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    /// Records a task's end, its artifacts and its build's new state in one
    /// transaction; refuses a stale fence. An infrastructure outcome re-queues
    /// the task while attempts remain.
    ///
    /// Group commit: ends that arrive while another batch is being synced
    /// wait, and the next caller records them all in one transaction with
    /// one sync. Each end's changes still commit together, and each caller
    /// returns only once its end is durable.
    pub fn finish_task(
        &self,
        task: TaskId,
        fence: u64,
        end: TaskEnd,
        max_attempts: u32,
    ) -> Result<Build> {
        let (reply, answer) = std::sync::mpsc::channel();
        lock(&self.ends).push(PendingEnd {
            task,
            fence,
            end,
            max_attempts,
            reply,
        });
        let leader = lock(&self.end_leader);
        // A previous leader may have recorded this end already.
        if let Ok(r) = answer.try_recv() {
            return r;
        }
        let batch = std::mem::take(&mut *lock(&self.ends));
        self.record_ends(batch);
        drop(leader);
        answer
            .recv()
            .unwrap_or_else(|_| Err(DbError::Redb("the end was dropped unrecorded".into())))
    }

    /// Records a batch of ends in one transaction. An end refused before it
    /// writes anything (stale fence, unknown task) is answered and skipped;
    /// any other failure abandons the batch and records each end alone.
    fn record_ends(&self, batch: Vec<PendingEnd>) {
        if batch.is_empty() {
            return;
        }
        let now = now_ms();
        let together = (|| -> Result<Vec<Result<Build>>> {
            let tx = self.db.begin_write()?;
            let mut results = Vec::with_capacity(batch.len());
            for e in &batch {
                match finish_in(&tx, e.task, e.fence, e.end.clone(), e.max_attempts, now) {
                    Ok(b) => results.push(Ok(b)),
                    Err(err @ (DbError::StaleLease { .. } | DbError::TaskNotFound(_))) => {
                        results.push(Err(err))
                    }
                    Err(other) => return Err(other),
                }
            }
            tx.commit()?;
            Ok(results)
        })();
        match together {
            Ok(results) => {
                for (e, r) in batch.into_iter().zip(results) {
                    let _ = e.reply.send(r);
                }
            }
            Err(_) => {
                for e in batch {
                    let r = (|| {
                        let tx = self.db.begin_write()?;
                        let b = finish_in(&tx, e.task, e.fence, e.end, e.max_attempts, now)?;
                        tx.commit()?;
                        Ok(b)
                    })();
                    let _ = e.reply.send(r);
                }
            }
        }
    }

    /// Cancels a queued or running task (a running one's worker finds its
    /// lease gone and kills the sandbox). One transaction with its build's
    /// new state.
    pub fn cancel_task(&self, task: TaskId) -> Result<Build> {
        self.stop_task(task, false)
    }

    /// Puts a task back in the queue as a new attempt: a running one is
    /// stopped first, an ended one (failed, cancelled or succeeded) runs
    /// again.
    pub fn requeue_task(&self, task: TaskId) -> Result<Build> {
        self.stop_task(task, true)
    }

    fn stop_task(&self, task: TaskId, requeue: bool) -> Result<Build> {
        let now = now_ms();
        let tx = self.db.begin_write()?;
        let build = {
            let mut t: Task =
                get_rec(&tx.open_table(TASKS)?, task)?.ok_or(DbError::TaskNotFound(task))?;
            let b: Build = get_rec(&tx.open_table(BUILDS)?, t.build)?
                .ok_or(DbError::BuildNotFound(t.build))?;
            match (t.state, requeue) {
                (BuildState::Queued, true) => {
                    return Err(DbError::Conflict(format!("task {task} is already queued")));
                }
                (s, false) if s.is_finished() => {
                    return Err(DbError::Conflict(format!(
                        "task {task} has already ended ({s})"
                    )));
                }
                (BuildState::Queued, false) => {
                    let mut lanes = tx.open_table(QUEUE_LANES)?;
                    let mut seq = None;
                    for row in
                        lanes.range((b.project.as_str(), 0)..=(b.project.as_str(), u64::MAX))?
                    {
                        let (k, v) = row?;
                        if v.value() == task {
                            seq = Some(k.value().1);
                        }
                    }
                    if let Some(rank) = seq {
                        lanes.remove((b.project.as_str(), rank))?;
                        tx.open_table(QUEUE)?.remove(rank & SEQ_MASK)?;
                        lane_add(&tx, &b.project, -1)?;
                    }
                }
                _ => {}
            }
            tx.open_table(RUNNING)?.remove(task)?;
            t.lease = None;
            if requeue {
                t.state = BuildState::Queued;
                t.attempt += 1;
                t.finished = None;
                enqueue(&tx, &mut tx.open_table(META)?, &b.project, b.id, task)?;
            } else {
                t.state = BuildState::Cancelled;
                t.outcome = Some(Outcome::Cancelled);
                t.finished = Some(now);
            }
            tx.open_table(TASKS)?.insert(task, enc(&t).as_slice())?;
            settle_build(&tx, t.build, now)?
        };
        tx.commit()?;
        Ok(build)
    }

    // ---- workers ----

    /// Records a contact from `name` at `now` (creating its entry), with
    /// the configuration it reports; returns the entry.
    pub fn touch_worker(
        &self,
        name: &str,
        info: Option<&WorkerInfo>,
        now: i64,
        gap_ms: i64,
    ) -> Result<WorkerRecord> {
        let tx = begin_volatile(self)?;
        let rec = {
            let mut t = tx.open_table(WORKERS)?;
            let mut rec: WorkerRecord =
                get_rec(&t, name)?.unwrap_or_else(|| WorkerRecord::new(name, now));
            rec.seen(now, gap_ms);
            if let Some(i) = info {
                rec.info = Some(i.clone());
            }
            t.insert(name, enc(&rec).as_slice())?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    pub fn workers(&self) -> Result<Vec<WorkerRecord>> {
        let tx = self.db.begin_read()?;
        all_recs(&tx.open_table(WORKERS)?)
    }

    /// How many tasks each worker runs now.
    pub fn running_by_worker(&self) -> Result<std::collections::HashMap<String, u32>> {
        let tx = self.db.begin_read()?;
        let tasks = tx.open_table(TASKS)?;
        let mut out = std::collections::HashMap::new();
        for row in tx.open_table(RUNNING)?.iter()? {
            let id = row?.0.value();
            let t: Task = get_rec(&tasks, id)?.ok_or(DbError::TaskNotFound(id))?;
            if let Some(l) = t.lease {
                *out.entry(l.worker).or_insert(0) += 1;
            }
        }
        Ok(out)
    }

    /// The tasks `worker` runs now, with their fences.
    pub fn running_on(&self, worker: &str) -> Result<Vec<TaskId>> {
        let tx = self.db.begin_read()?;
        let tasks = tx.open_table(TASKS)?;
        let mut out = Vec::new();
        for row in tx.open_table(RUNNING)?.iter()? {
            let id = row?.0.value();
            let t: Task = get_rec(&tasks, id)?.ok_or(DbError::TaskNotFound(id))?;
            if t.lease.is_some_and(|l| l.worker == worker) {
                out.push(id);
            }
        }
        Ok(out)
    }

    pub fn worker_speeds(&self) -> Result<Speeds> {
        let tx = self.db.begin_read()?;
        let mut out = Speeds::new();
        for row in tx.open_table(WORKER_SPEEDS)?.iter()? {
            let (k, v) = row?;
            let (pkg, w) = k.value();
            out.insert((pkg.to_string(), w.to_string()), v.value());
        }
        Ok(out)
    }

    /// Sets what admins allow a worker; `NotFound` for a worker never seen.
    pub fn set_worker_admin(&self, name: &str, admin: AdminState) -> Result<WorkerRecord> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut t = tx.open_table(WORKERS)?;
            let mut rec: WorkerRecord =
                get_rec(&t, name)?.ok_or_else(|| DbError::NotFound(format!("worker {name:?}")))?;
            rec.admin = admin;
            t.insert(name, enc(&rec).as_slice())?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// Stores a join token for worker `token.name`; refused while a live
    /// one exists for that name.
    pub fn insert_worker_token(&self, hash: &[u8; 32], token: &WorkerToken) -> Result<()> {
        let tx = self.db.begin_write()?;
        {
            let mut t = tx.open_table(WORKER_TOKENS)?;
            for row in t.iter()? {
                let old: WorkerToken = dec(row?.1.value())?;
                if old.name == token.name && old.revoked.is_none() {
                    return Err(DbError::Exists(format!(
                        "a join token for worker {:?} (revoke it first)",
                        token.name
                    )));
                }
            }
            t.insert(hash.as_slice(), enc(token).as_slice())?;
        }
        tx.commit()?;
        Ok(())
    }

    pub fn worker_token(&self, hash: &[u8; 32]) -> Result<Option<WorkerToken>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(WORKER_TOKENS)?, hash.as_slice())
    }

    pub fn worker_tokens(&self) -> Result<Vec<WorkerToken>> {
        let tx = self.db.begin_read()?;
        let mut out: Vec<WorkerToken> = all_recs(&tx.open_table(WORKER_TOKENS)?)?;
        out.sort_by_key(|t| t.created);
        Ok(out)
    }

    /// Revokes the live join token of worker `name`.
    pub fn revoke_worker_token(&self, name: &str) -> Result<WorkerToken> {
        let tx = self.db.begin_write()?;
        let tok = {
            let mut t = tx.open_table(WORKER_TOKENS)?;
            let mut found = None;
            for row in t.iter()? {
                let (k, v) = row?;
                let tok: WorkerToken = dec(v.value())?;
                if tok.name == name && tok.revoked.is_none() {
                    found = Some((k.value().to_vec(), tok));
                }
            }
            let (key, mut tok) = found.ok_or_else(|| {
                DbError::NotFound(format!("a live join token for worker {name:?}"))
            })?;
            tok.revoked = Some(now_ms());
            t.insert(key.as_slice(), enc(&tok).as_slice())?;
            tok
        };
        tx.commit()?;
        Ok(tok)
    }

    // ---- routing and priority ----

    /// What a task needs of the worker that runs it.
    pub fn task_needs(&self, task: TaskId) -> Result<Needs> {
        let tx = self.db.begin_read()?;
        let t: Task = get_rec(&tx.open_table(TASKS)?, task)?.ok_or(DbError::TaskNotFound(task))?;
        let b: Build =
            get_rec(&tx.open_table(BUILDS)?, t.build)?.ok_or(DbError::BuildNotFound(t.build))?;
        needs_of(
            &tx.open_table(TARGETS)?,
            &tx.open_table(TARGET_NEEDS)?,
            &b.project,
            &t.target,
        )
    }

    /// Sets a build's priority (-100..=100) and moves its queued tasks to
    /// their new place in the lane, in one transaction.
    pub fn set_build_priority(&self, build: BuildId, priority: i64) -> Result<()> {
        if !(-MAX_PRIORITY..=MAX_PRIORITY).contains(&priority) {
            return Err(DbError::Conflict(format!(
                "priority {priority} is outside -{MAX_PRIORITY}..={MAX_PRIORITY}"
            )));
        }
        let tx = self.db.begin_write()?;
        {
            let b: Build =
                get_rec(&tx.open_table(BUILDS)?, build)?.ok_or(DbError::BuildNotFound(build))?;
            let mut prio = tx.open_table(BUILD_PRIORITY)?;
            if priority == 0 {
                prio.remove(build)?;
            } else {
                prio.insert(build, priority)?;
            }
            let mut lanes = tx.open_table(QUEUE_LANES)?;
            let p = b.project.as_str();
            let mut moved = Vec::new();
            for row in lanes.range((p, 0)..=(p, u64::MAX))? {
                let (k, v) = row?;
                if b.tasks.contains(&v.value()) {
                    moved.push((k.value().1, v.value()));
                }
            }
            for (rank, task) in moved {
                lanes.remove((p, rank))?;
                lanes.insert((p, lane_rank(priority, rank & SEQ_MASK)), task)?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    // ---- buildroots ----

    /// Records a buildroot about to be made. Refused while one of that name
    /// exists, unless its last attempt failed (it is replaced).
    pub fn begin_buildroot(&self, br: &Buildroot) -> Result<Buildroot> {
        let tx = self.db.begin_write()?;
        let rec = {
            let mut t = tx.open_table(BUILDROOTS)?;
            let mut rec = br.clone();
            if let Some(old) = get_rec::<_, Buildroot>(&t, br.name.as_str())? {
                if !matches!(old.state, BuildrootState::Failed(_)) {
                    return Err(DbError::Exists(format!("buildroot {}", br.name)));
                }
                rec.generation = old.generation;
            }
            t.insert(br.name.as_str(), enc(&rec).as_slice())?;
            rec
        };
        tx.commit()?;
        Ok(rec)
    }

    /// Replaces a buildroot's record (state changes of a create or refresh).
    pub fn put_buildroot(&self, br: &Buildroot) -> Result<()> {
        let tx = self.db.begin_write()?;
        tx.open_table(BUILDROOTS)?
            .insert(br.name.as_str(), enc(br).as_slice())?;
        tx.commit()?;
        Ok(())
    }

    pub fn buildroot(&self, name: &str) -> Result<Option<Buildroot>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(BUILDROOTS)?, name)
    }

    pub fn buildroots(&self) -> Result<Vec<Buildroot>> {
        let tx = self.db.begin_read()?;
        all_recs(&tx.open_table(BUILDROOTS)?)
    }

    /// Removes a buildroot's record; refused while a target names it.
    pub fn delete_buildroot(&self, name: &str) -> Result<Buildroot> {
        let tx = self.db.begin_write()?;
        let br = {
            for row in tx.open_table(TARGETS)?.iter()? {
                let t: Target = dec(row?.1.value())?;
                if t.buildroot == name {
                    return Err(DbError::Exists(format!(
                        "target {}/{} on buildroot {name}",
                        t.project, t.name
                    )));
                }
            }
            let mut t = tx.open_table(BUILDROOTS)?;
            let br: Buildroot =
                get_rec(&t, name)?.ok_or_else(|| DbError::NotFound(format!("buildroot {name}")))?;
            t.remove(name)?;
            br
        };
        tx.commit()?;
        Ok(br)
    }

    // ---- targets, repos, keys ----

    /// Adds a target, creating its project, its repo (or adding the arch to
    /// the repo's list) and storing `key` as the project's signing key if it
    /// has none yet. One transaction.
    pub fn add_target(&self, target: &Target, needs: &Needs, key: &str) -> Result<Repo> {
        let now = now_ms();
        let tx = self.db.begin_write()?;
        let repo = {
            let p = target.project.as_str();
            let mut projects = tx.open_table(PROJECTS)?;
            if projects.get(p)?.is_none() {
                let proj = Project {
                    name: p.to_string(),
                    created: now,
                };
                projects.insert(p, enc(&proj).as_slice())?;
            }
            let mut targets = tx.open_table(TARGETS)?;
            if targets.get((p, target.name.as_str()))?.is_some() {
                return Err(DbError::Exists(format!("target {p}/{}", target.name)));
            }
            targets.insert((p, target.name.as_str()), enc(target).as_slice())?;
            if *needs != Needs::default() {
                tx.open_table(TARGET_NEEDS)?
                    .insert((p, target.name.as_str()), enc(needs).as_slice())?;
            }
            let mut repos = tx.open_table(REPOS)?;
            let mut repo: Repo =
                get_rec(&repos, (p, target.repo.as_str()))?.unwrap_or_else(|| Repo {
                    project: p.to_string(),
                    name: target.repo.clone(),
                    architectures: vec![],
                    created: now,
                    // Revision 1 unpublished: even an empty repo gets its
                    // signed Release at once.
                    revision: 1,
                    published_revision: 0,
                    published: None,
                });
            if !repo.architectures.contains(&target.arch) && target.arch != "all" {
                repo.architectures.push(target.arch.clone());
                repo.architectures.sort();
                repo.revision += 1;
            }
            repos.insert((p, target.repo.as_str()), enc(&repo).as_slice())?;
            let mut keys = tx.open_table(PROJECT_KEYS)?;
            if keys.get(p)?.is_none() {
                keys.insert(p, key)?;
            }
            repo
        };
        tx.commit()?;
        Ok(repo)
    }

    pub fn targets(&self, project: &str) -> Result<Vec<Target>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(TARGETS)?;
        let mut out = Vec::new();
        for row in t.range((project, "")..)? {
            let (k, v) = row?;
            if k.value().0 != project {
                break;
            }
            out.push(dec(v.value())?);
        }
        Ok(out)
    }

    pub fn target(&self, project: &str, name: &str) -> Result<Option<Target>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(TARGETS)?, (project, name))
    }

    pub fn repo(&self, project: &str, name: &str) -> Result<Option<Repo>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(REPOS)?, (project, name))
    }

    /// Every repo of every project (small: a few per project).
    pub fn all_repos(&self) -> Result<Vec<Repo>> {
        let tx = self.db.begin_read()?;
        all_recs(&tx.open_table(REPOS)?)
    }

    pub fn repo_debs(&self, project: &str, repo: &str) -> Result<Vec<RepoDeb>> {
        self.repo_members(REPO_DEBS, project, repo)
    }

    pub fn repo_rpms(&self, project: &str, repo: &str) -> Result<Vec<RepoRpm>> {
        self.repo_members(REPO_RPMS, project, repo)
    }

    /// Every record of a (project, repo, key) table under one repo.
    fn repo_members<T: serde::de::DeserializeOwned>(
        &self,
        table: TableDefinition<(&str, &str, &str), &[u8]>,
        project: &str,
        repo: &str,
    ) -> Result<Vec<T>> {
        let tx = self.db.begin_read()?;
        let t = tx.open_table(table)?;
        let mut out = Vec::new();
        for row in t.range((project, repo, "")..)? {
            let (k, v) = row?;
            let (kp, kr, _) = k.value();
            if kp != project || kr != repo {
                break;
            }
            out.push(dec(v.value())?);
        }
        Ok(out)
    }

    pub fn project_key(&self, project: &str) -> Result<Option<String>> {
        let tx = self.db.begin_read()?;
        Ok(tx
            .open_table(PROJECT_KEYS)?
            .get(project)?
            .map(|g| g.value().to_string()))
    }

    pub fn repo_file(&self, project: &str, repo: &str, path: &str) -> Result<Option<RepoFileRef>> {
        let tx = self.db.begin_read()?;
        get_rec(&tx.open_table(REPO_FILES)?, (project, repo, path))
    }

    /// Switches what a repo serves: every file in `files` (by-hash objects,
    /// indexes, pool entries, and the signed Release files) in one
    /// transaction, marking `revision` published. Files of earlier publishes
    /// stay (clients mid-update may still ask for them by hash).
    pub fn record_publish(
        &self,
        project: &str,
        repo: &str,
        revision: u64,
        files: &[(String, RepoFileRef)],
    ) -> Result<Repo> {
        let tx = self.db.begin_write()?;
        let r = {
            let mut repos = tx.open_table(REPOS)?;
            let mut r: Repo = get_rec(&repos, (project, repo))?
                .ok_or_else(|| DbError::NotFound(format!("repo {project}/{repo}")))?;
            let mut t = tx.open_table(REPO_FILES)?;
            for (path, f) in files {
                t.insert((project, repo, path.as_str()), enc(f).as_slice())?;
            }
            r.published_revision = r.published_revision.max(revision);
            r.published = Some(now_ms());
            repos.insert((project, repo), enc(&r).as_slice())?;
            r
        };
        tx.commit()?;
        Ok(r)
    }

    /// After a restart: every task still marked running was interrupted (its
    /// worker is gone with the old process); put it back in the queue. Returns
    /// the re-queued task ids.
    pub fn requeue_interrupted(&self) -> Result<Vec<TaskId>> {
        let tx = self.db.begin_write()?;
        let mut requeued = Vec::new();
        {
            let mut tasks = tx.open_table(TASKS)?;
            let mut running = Vec::new();
            for row in tasks.iter()? {
                let (_, v) = row?;
                let t: Task = dec(v.value())?;
                if t.state == BuildState::Running {
                    running.push(t);
                }
            }
            let mut meta = tx.open_table(META)?;
            tx.open_table(RUNNING)?.retain(|_, _| false)?;
            for mut t in running {
                t.state = BuildState::Queued;
                t.lease = None;
                t.attempt += 1;
                let b: Build = get_rec(&tx.open_table(BUILDS)?, t.build)?
                    .ok_or(DbError::BuildNotFound(t.build))?;
                enqueue(&tx, &mut meta, &b.project, b.id, t.id)?;
                tasks.insert(t.id, enc(&t).as_slice())?;
                requeued.push(t.id);
            }
        }
        tx.commit()?;
        Ok(requeued)
    }
}

/// A queued task's place: `position` of `lane_len` in `project`'s lane;
/// `projects` lanes are waiting in all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePosition {
    pub project: String,
    pub position: u64,
    pub lane_len: u64,
    pub projects: usize,
}

/// Derives a build's state from its tasks' (inside the caller's
/// transaction) and stores it.
fn settle_build(tx: &redb::WriteTransaction, id: BuildId, now: i64) -> Result<Build> {
    let tasks = tx.open_table(TASKS)?;
    let mut builds = tx.open_table(BUILDS)?;
    let mut b: Build = get_rec(&builds, id)?.ok_or(DbError::BuildNotFound(id))?;
    let mut states = Vec::new();
    for t in &b.tasks {
        let s: Task = get_rec(&tasks, *t)?.ok_or(DbError::TaskNotFound(*t))?;
        states.push(s.state);
    }
    if states.iter().all(|s| s.is_finished()) {
        b.state = if states.iter().all(|s| *s == BuildState::Succeeded) {
            BuildState::Succeeded
        } else if states.contains(&BuildState::Cancelled) {
            BuildState::Cancelled
        } else {
            BuildState::Failed
        };
        b.finished = Some(now);
    } else {
        b.finished = None;
        b.state = if states.contains(&BuildState::Running) || states.iter().any(|s| s.is_finished())
        {
            BuildState::Running
        } else {
            BuildState::Queued
        };
    }
    builds.insert(b.id, enc(&b).as_slice())?;
    Ok(b)
}

/// Appends a task to the queue and its project's lane, in the caller's
/// transaction.
fn enqueue(
    tx: &redb::WriteTransaction,
    meta: &mut redb::Table<&str, u64>,
    project: &str,
    build: BuildId,
    task: TaskId,
) -> Result<()> {
    let seq = bump(meta, K_QUEUE_SEQ, 0)?;
    let priority = tx
        .open_table(BUILD_PRIORITY)?
        .get(build)?
        .map_or(0, |g| g.value());
    tx.open_table(QUEUE)?.insert(seq, task)?;
    tx.open_table(QUEUE_LANES)?
        .insert((project, lane_rank(priority, seq)), task)?;
    lane_add(tx, project, 1)
}

/// Changes the count of `project`'s lane by `delta` (an empty lane has no row).
fn lane_add(tx: &redb::WriteTransaction, project: &str, delta: i64) -> Result<()> {
    let mut t = tx.open_table(LANE_LEN)?;
    let n = t
        .get(project)?
        .map_or(0, |g| g.value())
        .saturating_add_signed(delta);
    if n == 0 {
        t.remove(project)?;
    } else {
        t.insert(project, n)?;
    }
    Ok(())
}

/// Counts every lane again (databases made before the counts existed).
fn recount_lanes(tx: &redb::WriteTransaction) -> Result<()> {
    let mut counts: std::collections::BTreeMap<String, u64> = Default::default();
    for row in tx.open_table(QUEUE_LANES)?.iter()? {
        *counts.entry(row?.0.value().0.to_string()).or_default() += 1;
    }
    let mut t = tx.open_table(LANE_LEN)?;
    t.retain(|_, _| false)?;
    for (p, n) in counts {
        t.insert(p.as_str(), n)?;
    }
    Ok(())
}

/// The heads of the projects' lanes, `(project, seq, task)`, in project
/// order: one range lookup per project, however long the lanes are.
fn lane_heads(
    lanes: &impl ReadableTable<(&'static str, u64), u64>,
) -> Result<Vec<(String, u64, u64)>> {
    use std::ops::Bound;
    let mut heads = Vec::new();
    let mut next = lanes.first()?.map(|(k, v)| {
        let (p, s) = k.value();
        (p.to_string(), s, v.value())
    });
    while let Some((p, s, t)) = next {
        next = lanes
            .range::<(&str, u64)>((Bound::Excluded((p.as_str(), u64::MAX)), Bound::Unbounded))?
            .next()
            .transpose()?
            .map(|(k, v)| {
                let (p, s) = k.value();
                (p.to_string(), s, v.value())
            });
        heads.push((p, s, t));
    }
    Ok(heads)
}

/// Fair share: among the lanes' heads of the highest priority, the one
/// whose project has the fewest running tasks; among equals, the project
/// served longest ago (never first), then the task queued first.
/// A worker's test of a task's needs.
pub type Runs = std::sync::Arc<dyn Fn(&Needs) -> bool + Send + Sync>;

/// A lease request waiting for its batch.
struct PendingLease {
    worker: String,
    lease_ms: i64,
    runs: Option<Runs>,
    reply: std::sync::mpsc::Sender<Result<Option<Leased>>>,
}

/// Leases the fair-share head `worker` can run, within `tx`; `running`
/// (tasks running per project) is kept up to date for the next grant.
fn grant_one(
    tx: &redb::WriteTransaction,
    running: &mut std::collections::HashMap<String, usize>,
    worker: &str,
    now: i64,
    lease_ms: i64,
    runs: Option<&(dyn Fn(&Needs) -> bool + Send + Sync)>,
) -> Result<Option<Leased>> {
    let Some((project, rank, tid)) = fair_head(tx, running, worker, now, runs)? else {
        return Ok(None);
    };
    tx.open_table(TASK_AVOID)?.remove(tid)?;
    tx.open_table(QUEUE)?.remove(rank & SEQ_MASK)?;
    tx.open_table(QUEUE_LANES)?
        .remove((project.as_str(), rank))?;
    lane_add(tx, &project, -1)?;
    tx.open_table(RUNNING)?.insert(tid, project.as_str())?;
    *running.entry(project.clone()).or_default() += 1;
    let mut meta = tx.open_table(META)?;
    let mut tasks = tx.open_table(TASKS)?;
    let mut builds = tx.open_table(BUILDS)?;
    let mut task: Task = get_rec(&tasks, tid)?.ok_or(DbError::TaskNotFound(tid))?;
    let fence = bump(&mut meta, K_NEXT_FENCE, 1)?;
    tx.open_table(LAST_SERVED)?
        .insert(project.as_str(), fence)?;
    task.state = BuildState::Running;
    task.lease = Some(Lease {
        worker: worker.to_string(),
        fence,
        expires: now + lease_ms,
    });
    task.worker = Some(worker.to_string());
    task.started = Some(now);
    tasks.insert(tid, enc(&task).as_slice())?;
    let mut build: Build =
        get_rec(&builds, task.build)?.ok_or(DbError::BuildNotFound(task.build))?;
    if build.state == BuildState::Queued {
        build.state = BuildState::Running;
        build.started.get_or_insert(now);
        builds.insert(build.id, enc(&build).as_slice())?;
    }
    Ok(Some(Leased { task, build, fence }))
}

fn fair_head(
    tx: &redb::WriteTransaction,
    running: &std::collections::HashMap<String, usize>,
    worker: &str,
    now: i64,
    runs: Option<&(dyn Fn(&Needs) -> bool + Send + Sync)>,
) -> Result<Option<(String, u64, u64)>> {
    let lanes = tx.open_table(QUEUE_LANES)?;
    let mut heads = lane_heads(&lanes)?;
    let avoid = tx.open_table(TASK_AVOID)?;
    let avoiding = !avoid.is_empty()?;
    if runs.is_some() || avoiding {
        // Each lane's first task this worker can run (and did not just
        // lose); a lane holds few targets, so needs are resolved once per
        // (project, target).
        let tasks = tx.open_table(TASKS)?;
        let (targets, extra) = (tx.open_table(TARGETS)?, tx.open_table(TARGET_NEEDS)?);
        let mut verdicts: std::collections::HashMap<String, bool> = Default::default();
        let mut eligible = Vec::new();
        for (p, _, _) in heads {
            for row in lanes.range((p.as_str(), 0)..=(p.as_str(), u64::MAX))? {
                let (k, v) = row?;
                if avoiding
                    && let Some((w, until)) = get_rec::<_, (String, i64)>(&avoid, v.value())?
                    && w == worker
                    && now < until
                {
                    continue;
                }
                let Some(runs) = runs else {
                    eligible.push((p.clone(), k.value().1, v.value()));
                    break;
                };
                let t: Task =
                    get_rec(&tasks, v.value())?.ok_or(DbError::TaskNotFound(v.value()))?;
                let ok = match verdicts.get(&t.target) {
                    Some(ok) => *ok,
                    None => {
                        let ok = runs(&needs_of(&targets, &extra, &p, &t.target)?);
                        verdicts.insert(t.target.clone(), ok);
                        ok
                    }
                };
                if ok {
                    eligible.push((p.clone(), k.value().1, t.id));
                    break;
                }
            }
            verdicts.clear();
        }
        heads = eligible;
    }
    let served = tx.open_table(LAST_SERVED)?;
    let mut best = None;
    for (p, s, t) in heads {
        // Priority first (admins' knob), then fair share, then age.
        let key = (
            s >> SEQ_BITS,
            running.get(&p).copied().unwrap_or(0),
            served.get(p.as_str())?.map(|v| v.value()).unwrap_or(0),
            s & SEQ_MASK,
        );
        if best.as_ref().is_none_or(|(k, _)| key < *k) {
            best = Some((key, (p, s, t)));
        }
    }
    Ok(best.map(|(_, head)| head))
}

/// Fills the per-project and per-package build indexes from the builds.
fn rebuild_build_indexes(tx: &redb::WriteTransaction) -> Result<()> {
    let mut by_project = tx.open_table(PROJECT_BUILDS)?;
    let mut by_package = tx.open_table(PACKAGE_BUILDS)?;
    by_project.retain(|_, _| false)?;
    by_package.retain(|_, _| false)?;
    for row in tx.open_table(BUILDS)?.iter()? {
        let (id, v) = row?;
        let b: Build = dec(v.value())?;
        by_project.insert((b.project.as_str(), id.value()), ())?;
        by_package.insert((b.project.as_str(), b.package.as_str(), id.value()), ())?;
    }
    Ok(())
}

/// Rebuilds the lanes from the queue (databases made before lanes existed).
fn rebuild_lanes(tx: &redb::WriteTransaction) -> Result<()> {
    let mut entries = Vec::new();
    {
        let queue = tx.open_table(QUEUE)?;
        let tasks = tx.open_table(TASKS)?;
        let builds = tx.open_table(BUILDS)?;
        for row in queue.iter()? {
            let (seq, tid) = row?;
            let t: Task =
                get_rec(&tasks, tid.value())?.ok_or(DbError::TaskNotFound(tid.value()))?;
            let b: Build = get_rec(&builds, t.build)?.ok_or(DbError::BuildNotFound(t.build))?;
            let priority = tx
                .open_table(BUILD_PRIORITY)?
                .get(b.id)?
                .map_or(0, |g| g.value());
            entries.push((b.project, lane_rank(priority, seq.value()), t.id));
        }
    }
    let mut lanes = tx.open_table(QUEUE_LANES)?;
    lanes.retain(|_, _| false)?;
    for (p, seq, tid) in entries {
        lanes.insert((p.as_str(), seq), tid)?;
    }
    drop(lanes);
    recount_lanes(tx)
}

/// What the tasks of `project`'s target `target` need of a worker: the
/// `host` target runs anywhere; a target's arch (unless `all`), its
/// buildroot and its declared extras.
fn needs_of(
    targets: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    extra: &impl ReadableTable<(&'static str, &'static str), &'static [u8]>,
    project: &str,
    target: &str,
) -> Result<Needs> {
    let Some(t) = get_rec::<_, Target>(targets, (project, target))? else {
        return Ok(Needs::default());
    };
    let mut needs: Needs = get_rec(extra, (project, target))?.unwrap_or_default();
    needs.arch = (t.arch != "all").then_some(t.arch);
    needs.buildroot = t.buildroot != HOST_TARGET;
    Ok(needs)
}

/// Counts a task's end against the worker that ran it (and, for a success,
/// its duration against the package), in the caller's transaction.
fn record_worker_end(
    tx: &redb::WriteTransaction,
    worker: &str,
    t: &Task,
    b: &Build,
    outcome: &Outcome,
    now: i64,
) -> Result<()> {
    let mut workers = tx.open_table(WORKERS)?;
    let mut rec: WorkerRecord =
        get_rec(&workers, worker)?.unwrap_or_else(|| WorkerRecord::new(worker, now));
    match outcome {
        Outcome::Succeeded => rec.stats.succeeded += 1,
        Outcome::Infrastructure(_) => rec.stats.infra += 1,
        Outcome::Cancelled => rec.stats.cancelled += 1,
        _ => rec.stats.failed += 1,
    }
    workers.insert(worker, enc(&rec).as_slice())?;
    if let (Outcome::Succeeded, Some(started)) = (outcome, t.started) {
        let key = format!("{}/{}/{}", b.project, b.package, t.target);
        let mut speeds = tx.open_table(WORKER_SPEEDS)?;
        let (n, total) = speeds
            .get((key.as_str(), worker))?
            .map_or((0, 0), |g| g.value());
        speeds.insert(
            (key.as_str(), worker),
            (n + 1, total + (now - started).max(0) as u64),
        )?;
    }
    Ok(())
}

/// One task's end inside the caller's transaction (see `Db::finish_task`).
/// Refusals (unknown task, stale fence) come before anything is written.
fn finish_in(
    tx: &redb::WriteTransaction,
    task: TaskId,
    fence: u64,
    end: TaskEnd,
    max_attempts: u32,
    now: i64,
) -> Result<Build> {
    Ok({
        let mut tasks = tx.open_table(TASKS)?;
        let mut t: Task = get_rec(&tasks, task)?.ok_or(DbError::TaskNotFound(task))?;
        check_fence(&t, fence)?;
        let lost_on = t.lease.take().map(|l| l.worker);
        if let Some(w) = &lost_on {
            let b: Build = get_rec(&tx.open_table(BUILDS)?, t.build)?
                .ok_or(DbError::BuildNotFound(t.build))?;
            record_worker_end(tx, w, &t, &b, &end.outcome, now)?;
        }
        tx.open_table(RUNNING)?.remove(task)?;
        if matches!(end.outcome, Outcome::Infrastructure(_)) && t.attempt < max_attempts {
            t.attempt += 1;
            t.state = BuildState::Queued;
            t.outcome = Some(end.outcome);
            t.log = end.log;
            let b: Build = get_rec(&tx.open_table(BUILDS)?, t.build)?
                .ok_or(DbError::BuildNotFound(t.build))?;
            enqueue(tx, &mut tx.open_table(META)?, &b.project, b.id, task)?;
            tasks.insert(task, enc(&t).as_slice())?;
            // Another worker should get it first; the hub's own slots
            // are one machine with nowhere else to go.
            if let Some(w) = lost_on.filter(|w| w != crate::workers::LOCAL_WORKER) {
                tx.open_table(TASK_AVOID)?
                    .insert(task, enc(&(w, now + AVOID_MS)).as_slice())?;
            }
            b
        } else {
            t.state = match end.outcome {
                Outcome::Succeeded => BuildState::Succeeded,
                Outcome::Cancelled => BuildState::Cancelled,
                _ => BuildState::Failed,
            };
            t.outcome = Some(end.outcome);
            t.log = end.log;
            t.outputs = end.outputs;
            t.finished = Some(now);
            tasks.insert(task, enc(&t).as_slice())?;
            let mut arts = tx.open_table(ARTIFACTS)?;
            for a in &end.artifacts {
                arts.insert((a.build, a.path.as_str()), enc(a).as_slice())?;
            }
            // The repo's membership changes with the task's end, in this
            // transaction; the publisher derives the served files later.
            if let (BuildState::Succeeded, Some(add)) = (t.state, &end.publish) {
                add_repo_packages(tx, add)?;
            }
            drop(tasks);
            settle_build(tx, t.build, now)?
        }
    })
}

/// An end waiting for its group commit.
struct PendingEnd {
    task: TaskId,
    fence: u64,
    end: TaskEnd,
    max_attempts: u32,
    reply: std::sync::mpsc::Sender<Result<Build>>,
}

/// Refuses `fence` unless it is the task's current lease's (StaleLease).
pub fn check_fence(t: &Task, fence: u64) -> Result<()> {
    let current = t.lease.as_ref().map(|l| l.fence);
    if current != Some(fence) {
        return Err(DbError::StaleLease {
            task: t.id,
            given: fence,
            current,
        });
    }
    Ok(())
}

/// Puts a task's packages into its repo (the newest build of each
/// package and arch wins) and bumps its revision, inside the caller's
/// transaction.
fn add_repo_packages(tx: &redb::WriteTransaction, add: &RepoAdd) -> Result<()> {
    let (project, repo) = (add.project.as_str(), add.repo.as_str());
    let mut repos = tx.open_table(REPOS)?;
    let mut r: Repo = get_rec(&repos, (project, repo))?
        .ok_or_else(|| DbError::NotFound(format!("repo {project}/{repo}")))?;
    let mut t = tx.open_table(REPO_DEBS)?;
    for d in &add.debs {
        let key = format!("{}/{}", d.package, d.arch);
        t.insert((project, repo, key.as_str()), enc(d).as_slice())?;
    }
    let mut t = tx.open_table(REPO_RPMS)?;
    for p in &add.rpms {
        let key = format!("{}/{}", p.name, p.arch);
        t.insert((project, repo, key.as_str()), enc(p).as_slice())?;
    }
    r.revision += 1;
    repos.insert((project, repo), enc(&r).as_slice())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Db) {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("kiln.redb")).unwrap();
        (dir, db)
    }

    fn submit(db: &Db) -> Build {
        submit_to(db, "p")
    }

    fn submit_to(db: &Db, project: &str) -> Build {
        db.create_build(
            project,
            "hello",
            PackageKind::Script,
            Digest::of(b"tree"),
            0,
            "admin",
            &["host"],
            None,
        )
        .unwrap()
    }

    #[test]
    fn concurrent_lease_requests_each_get_their_own_task_and_fence() {
        let (_dir, db) = db();
        let db = std::sync::Arc::new(db);
        let mut want: Vec<TaskId> = (0..48)
            .map(|i| submit_to(&db, if i % 4 == 0 { "b" } else { "a" }).tasks[0])
            .collect();
        // 12 threads ask at once, 5 times each: grants are batched, yet
        // every task goes to exactly one of them, once.
        let got: Vec<Leased> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..12)
                .map(|w| {
                    let db = db.clone();
                    s.spawn(move || {
                        (0..5)
                            .filter_map(|_| db.lease_next(&format!("w{w}"), 60_000).unwrap())
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(got.len(), 48);
        let mut tasks: Vec<TaskId> = got.iter().map(|l| l.task.id).collect();
        tasks.sort();
        want.sort();
        assert_eq!(tasks, want);
        let fences: std::collections::BTreeSet<u64> = got.iter().map(|l| l.fence).collect();
        assert_eq!(fences.len(), 48);
        for l in &got {
            let t = db.task(l.task.id).unwrap();
            assert_eq!(t.state, BuildState::Running);
            assert_eq!(t.lease.unwrap().fence, l.fence);
        }
        assert_eq!(db.queue_len().unwrap(), 0);
    }

    #[test]
    fn lane_counts_follow_enqueue_lease_cancel_and_requeue() {
        let (dir, db) = db();
        let a: Vec<Build> = (0..5).map(|_| submit_to(&db, "a")).collect();
        let pos = |db: &Db, b: &Build| {
            let p = db.queue_position(b.tasks[0]).unwrap().unwrap();
            (p.position, p.lane_len)
        };
        assert_eq!(pos(&db, &a[4]), (5, 5));
        let l = db.lease_next("w", 60_000).unwrap().unwrap();
        assert_eq!(l.build.id, a[0].id);
        db.cancel_task(a[2].tasks[0]).unwrap();
        assert_eq!(pos(&db, &a[1]), (1, 3));
        assert_eq!(pos(&db, &a[4]), (3, 3));
        // The leased one comes back at the end of the lane.
        db.requeue_task(a[0].tasks[0]).unwrap();
        assert_eq!(pos(&db, &a[0]), (4, 4));
        // Counts survive a reopen and are rebuilt if they ever disagree.
        drop(db);
        let db = Db::open(&dir.path().join("kiln.redb")).unwrap();
        assert_eq!(pos(&db, &a[4]), (3, 4));
    }

    #[test]
    fn a_mass_rebuild_does_not_starve_another_project() {
        let (dir, db) = db();
        let a: Vec<Build> = (0..200).map(|_| submit_to(&db, "a")).collect();
        let first = db.lease_next("w1", 60_000).unwrap().unwrap();
        assert_eq!(first.build.id, a[0].id);
        let b = submit_to(&db, "b");
        let pos = db.queue_position(b.tasks[0]).unwrap().unwrap();
        assert_eq!((pos.position, pos.lane_len, pos.projects), (1, 1, 2));
        // b runs nothing, a runs one: b's task is next, ahead of 199 of a's.
        let next = db.lease_next("w2", 60_000).unwrap().unwrap();
        assert_eq!(next.build.id, b.id);
        // Both run one now: the older queued task (a's) goes first.
        let third = db.lease_next("w3", 60_000).unwrap().unwrap();
        assert_eq!(third.build.id, a[1].id);
        // Ending a task frees its project's share; lanes survive a reopen.
        db.finish_task(
            next.task.id,
            next.fence,
            TaskEnd {
                outcome: Outcome::Succeeded,
                log: None,
                outputs: None,
                artifacts: vec![],
                publish: None,
            },
            3,
        )
        .unwrap();
        let c = submit_to(&db, "c");
        drop(db);
        let db = Db::open(&dir.path().join("kiln.redb")).unwrap();
        assert_eq!(db.lease_next("w4", 60_000).unwrap().unwrap().build.id, c.id);
        assert_eq!(db.queue_len().unwrap(), 198);
    }

    #[test]
    fn ids_grow_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.redb");
        {
            let db = Db::open(&path).unwrap();
            assert_eq!(submit(&db).id, 1);
            assert_eq!(submit(&db).id, 2);
        }
        let db = Db::open(&path).unwrap();
        assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
        assert_eq!(submit(&db).id, 3);
        let list = db.list_builds(None, 10).unwrap();
        assert_eq!(list.iter().map(|b| b.id).collect::<Vec<_>>(), [3, 2, 1]);
        let page = db.list_builds(Some(3), 1).unwrap();
        assert_eq!(page[0].id, 2);
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.redb");
        {
            let raw = Database::create(&path).unwrap();
            let tx = raw.begin_write().unwrap();
            tx.open_table(META)
                .unwrap()
                .insert(K_SCHEMA, SCHEMA_VERSION + 1)
                .unwrap();
            tx.commit().unwrap();
        }
        let err = Db::open(&path).err().expect("must refuse");
        assert!(matches!(err, DbError::TooNew { .. }), "{err}");
    }

    /// Ends from many threads at once are recorded in shared commits; a
    /// stale one among them is refused without holding the others back.
    #[test]
    fn concurrent_ends_commit_together_and_alone_fail_alone() {
        let (_d, db) = db();
        let db = std::sync::Arc::new(db);
        let leases: Vec<Leased> = (0..40)
            .map(|_| {
                submit(&db);
                db.lease_next("w", 60_000).unwrap().unwrap()
            })
            .collect();
        let threads: Vec<_> = leases
            .iter()
            .enumerate()
            .map(|(i, l)| {
                let (db, task) = (db.clone(), l.task.id);
                // Every fifth end carries a wrong fence.
                let fence = if i % 5 == 0 { l.fence + 1000 } else { l.fence };
                std::thread::spawn(move || {
                    let end = TaskEnd {
                        outcome: Outcome::Succeeded,
                        ..TaskEnd::infrastructure(String::new())
                    };
                    db.finish_task(task, fence, end, 3)
                })
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            let r = t.join().unwrap();
            if i % 5 == 0 {
                assert!(matches!(r, Err(DbError::StaleLease { .. })), "{r:?}");
            } else {
                assert_eq!(r.unwrap().state, BuildState::Succeeded);
            }
        }
        for (i, l) in leases.iter().enumerate() {
            let want = if i % 5 == 0 {
                BuildState::Running
            } else {
                BuildState::Succeeded
            };
            assert_eq!(db.build(l.build.id).unwrap().state, want);
        }
    }

    /// Leases are committed without a sync; whether or not the last one
    /// survived a restart, no fence is ever handed out twice.
    #[test]
    fn fences_never_repeat_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kiln.redb");
        let (b, first) = {
            let db = Db::open(&path).unwrap();
            let b = submit(&db);
            (b, db.lease_next("w1", 60_000).unwrap().unwrap())
        };
        let db = Db::open(&path).unwrap();
        db.requeue_interrupted().unwrap();
        let again = db.lease_next("w2", 60_000).unwrap().unwrap();
        assert_eq!(again.task.build, b.id);
        assert!(again.fence >= first.fence + FENCE_EPOCH, "{again:?}");
        let end = TaskEnd::infrastructure("x".into());
        assert!(matches!(
            db.finish_task(first.task.id, first.fence, end, 3),
            Err(DbError::StaleLease { .. })
        ));
    }

    #[test]
    fn lease_finish_and_stale_fence() {
        let (_d, db) = db();
        let b = submit(&db);
        let l = db.lease_next("w1", 60_000).unwrap().unwrap();
        assert_eq!(l.task.build, b.id);
        assert!(db.lease_next("w2", 60_000).unwrap().is_none());
        assert_eq!(db.build(b.id).unwrap().state, BuildState::Running);
        // crash → requeue → a new lease with a larger fence
        assert_eq!(db.requeue_interrupted().unwrap(), vec![l.task.id]);
        let l2 = db.lease_next("w2", 60_000).unwrap().unwrap();
        assert!(l2.fence > l.fence);
        assert_eq!(l2.task.attempt, 2);
        let end = |o| TaskEnd {
            outcome: o,
            log: None,
            outputs: None,
            artifacts: vec![],
            publish: None,
        };
        let stale = db.finish_task(l.task.id, l.fence, end(Outcome::Succeeded), 3);
        assert!(matches!(stale, Err(DbError::StaleLease { .. })));
        let b2 = db
            .finish_task(l2.task.id, l2.fence, end(Outcome::ExitCode(2)), 3)
            .unwrap();
        assert_eq!(b2.state, BuildState::Failed);
        assert!(b2.finished.is_some());
    }

    #[test]
    fn infrastructure_failures_retry_then_fail() {
        let (_d, db) = db();
        let b = submit(&db);
        for attempt in 1..=2 {
            if attempt > 1 {
                // The worker that lost it is passed over for a while.
                assert!(db.lease_next("w1", 1000).unwrap().is_none());
            }
            let l = db
                .lease_next(&format!("w{attempt}"), 1000)
                .unwrap()
                .unwrap();
            assert_eq!(l.task.attempt, attempt);
            let end = TaskEnd {
                outcome: Outcome::Infrastructure("disk gone".into()),
                log: None,
                outputs: None,
                artifacts: vec![],
                publish: None,
            };
            let after = db.finish_task(l.task.id, l.fence, end, 2).unwrap();
            let expect = if attempt < 2 {
                BuildState::Running
            } else {
                BuildState::Failed
            };
            assert_eq!(after.state, expect);
        }
        assert_eq!(db.queue_len().unwrap(), 0);
        assert_eq!(db.build(b.id).unwrap().state, BuildState::Failed);
    }
}
