//! The hub's worker API: the remote worker protocol (long-poll leases
//! routed by what the worker reports, heartbeats, blob upload by digest,
//! the fenced end of a task), the worker directory (list, show, drain,
//! enable, disable) and join tokens. Remote workers take the same leases
//! as local slots (`Db::lease_next_where`). See docs/workers.md.
//!
//! What must stay true: an end is recorded only with the task's current
//! fence, and only when every blob it names is already in the store; a
//! join token acts only for the worker it enrols.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{post, put};
use serde::{Deserialize, Serialize};

use crate::cas::Digest;
use crate::config::TaskLimits;
use crate::db::TaskEnd;
use crate::hub::Hub;
use crate::lock;
use crate::model::{Artifact, Build, Outcome, Task};
use crate::server::{
    ApiError, ApiResult, Caller, Reader, WorkerCaller, parse_task_id, require_admin,
};
use crate::workers::{
    AdminState, JoinToken, LOCAL_WORKER, Needs, WorkerInfo, WorkerToken, WorkerView,
};

/// Longest a lease request waits for work.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// The routes; blob uploads may be as large as a source upload.
pub(crate) fn routes(max_blob_bytes: u64) -> crate::web::Routes {
    use axum::http::Method;
    let blob_limit = usize::try_from(max_blob_bytes).unwrap_or(usize::MAX);
    crate::web::Routes::new()
        .post("/api/v1/worker/lease", lease)
        .get("/api/v1/worker/whoami", whoami)
        .get("/api/v1/worker/binary", binary)
        .post("/api/v1/worker/tasks/{id}/heartbeat", heartbeat)
        .post("/api/v1/worker/tasks/{id}/end", end)
        .route(
            "/api/v1/worker/tasks/{id}/log",
            &[Method::POST],
            post(live_log).layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .get("/api/v1/worker/tasks/{id}/repo", task_repo)
        .get("/api/v1/worker/tasks/{id}/rpms", task_repo_rpms)
        .get("/api/v1/worker/buildroots/{name}", buildroot_export)
        .get("/api/v1/worker/debs/{hex}", deb)
        .post("/api/v1/worker/blobs/missing", missing)
        .route(
            "/api/v1/worker/blobs/{hex}",
            &[Method::PUT],
            put(upload).layer(axum::extract::DefaultBodyLimit::max(blob_limit)),
        )
        .get("/api/v1/workers", list_workers)
        .get("/api/v1/workers/{name}", show_worker)
        .post("/api/v1/workers/{name}/{action}", set_worker)
        .get("/api/v1/worker-tokens", list_worker_tokens)
        .post("/api/v1/worker-tokens", create_worker_token)
        .delete("/api/v1/worker-tokens/{name}", revoke_worker_token)
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LeaseRequest {
    /// The worker's name, recorded on the task.
    pub worker: String,
    /// How long to wait for a task, in seconds (at most 30, and at most
    /// half a lease, so an idle worker stays online in the directory).
    #[serde(default)]
    pub wait_secs: u64,
    /// What the worker is; routing uses it. Without it, only tasks that
    /// need nothing particular (the `host` target) are handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<WorkerInfo>,
}

/// A task handed to a worker: what to build and under which limits.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct WorkerLease {
    pub task: Task,
    pub build: Build,
    pub fence: u64,
    /// Heartbeat well within this, or lose the task.
    pub lease_ms: i64,
    pub limits: TaskLimits,
    /// The task's project target (None: `host`).
    #[serde(default)]
    pub target: Option<crate::model::Target>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct Fence {
    pub fence: u64,
}

/// One output file, by digest.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct OutputFile {
    pub path: String,
    pub digest: Digest,
    pub size: u64,
    pub mode: u32,
}

/// The end of a task as a remote worker reports it.
#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct EndReport {
    pub fence: u64,
    pub outcome: Outcome,
    /// The log, uploaded first.
    pub log: Option<Digest>,
    /// The output tree's manifest, uploaded first.
    pub outputs: Option<Digest>,
    pub files: Vec<OutputFile>,
}

fn json<T: serde::de::DeserializeOwned>(body: &Bytes, what: &str) -> ApiResult<T> {
    serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("{what}: {e}")))
}

#[derive(Serialize, Deserialize, Debug)]
pub struct WhoAmI {
    /// The worker a join token enrols; None for an admin token.
    pub worker: Option<String>,
    /// The hub's kiln version (`workers::self_version`).
    pub hub_version: String,
}

/// `GET /api/v1/worker/whoami`: which worker this credential speaks for.
async fn whoami(caller: WorkerCaller, State(hub): State<Arc<Hub>>) -> ApiResult<Json<WhoAmI>> {
    let h = hub.clone();
    let hub_version = tokio::task::spawn_blocking(move || h.version()).await?;
    Ok(Json(WhoAmI {
        worker: caller.bound,
        hub_version,
    }))
}

/// The header carrying the binary's sha256 on `GET /api/v1/worker/binary`.
pub const BINARY_DIGEST_HEADER: &str = "x-kiln-sha256";

/// `GET /api/v1/worker/binary`: the kiln binary the hub runs, for workers
/// that update themselves; its sha256 in `x-kiln-sha256`.
async fn binary(_: WorkerCaller, State(hub): State<Arc<Hub>>) -> ApiResult<Response> {
    let path = hub.kiln_exe.clone();
    let p = path.clone();
    let digest = tokio::task::spawn_blocking(move || crate::workers::file_digest(&p))
        .await?
        .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [
            (BINARY_DIGEST_HEADER, digest.to_hex()),
            ("content-type", "application/octet-stream".to_string()),
        ],
        body,
    )
        .into_response())
}

/// Counts a worker's waiting lease requests while one is open, so the
/// directory shows it online and better-rated workers get first pick.
struct Waiting<'a>(&'a Hub, &'a str);

impl<'a> Waiting<'a> {
    fn new(hub: &'a Hub, name: &'a str) -> Self {
        if let Some(p) = lock(&hub.presence).get_mut(name) {
            p.waiting += 1;
        }
        Waiting(hub, name)
    }

    /// Whether another waiting worker is rated clearly better (it gets the
    /// first try at a new task; this one asks again a moment later).
    fn better_waiting(&self) -> bool {
        let p = lock(&self.0.presence);
        let mine = p.get(self.1).map_or(0.0, |p| p.rating);
        p.iter()
            .any(|(n, o)| n != self.1 && o.waiting > 0 && o.rating > mine + QOS_MARGIN)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if let Some(p) = lock(&self.0.presence).get_mut(self.1) {
            p.waiting = p.waiting.saturating_sub(1);
        }
    }
}

/// Rating points by which a waiting worker must beat another to go first.
const QOS_MARGIN: f64 = 10.0;
/// How long a lesser worker lets a better one try first.
/// (The better one was woken by the same signal; its lease takes well
/// under a millisecond.)
const DEFER: Duration = Duration::from_millis(10);

/// `POST /api/v1/worker/lease`: a task under a fresh lease (200), or 204
/// when none came within `wait_secs`. The task is the fair-share choice
/// among those whose needs this worker meets; none while it is drained or
/// disabled.
async fn lease(
    caller: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    body: Bytes,
) -> ApiResult<Response> {
    let req: LeaseRequest = json(&body, "lease request")?;
    crate::kinds::validate_name(&req.worker)
        .map_err(|m| ApiError::BadRequest(format!("worker {m}")))?;
    if req.worker == LOCAL_WORKER {
        return Err(ApiError::BadRequest(format!(
            "worker name {LOCAL_WORKER:?} is reserved for the hub's own slots"
        )));
    }
    caller.check(&req.worker)?;
    let lease_ms = hub.config.build.lease_ms();
    let wait = MAX_WAIT
        .min(Duration::from_secs(req.wait_secs))
        .min(Duration::from_millis(lease_ms as u64 / 2));
    let deadline = tokio::time::Instant::now() + wait;
    let (h, name, info) = (hub.clone(), req.worker.clone(), req.info.clone());
    tokio::task::spawn_blocking(move || h.worker_contact(&name, info.as_ref())).await??;
    let waiting = Waiting::new(&hub, &req.worker);
    let mut deferred = false;
    loop {
        let notified = hub.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (h, name, info) = (hub.clone(), req.worker.clone(), req.info.clone());
        let enabled = lock(&hub.presence)
            .get(&req.worker)
            .is_some_and(|p| p.rec.admin == AdminState::Enabled);
        if enabled && !deferred && waiting.better_waiting() {
            deferred = true;
            tokio::time::sleep(DEFER).await;
            continue;
        }
        deferred = false;
        let leased = if enabled {
            tokio::task::spawn_blocking(move || {
                let runs: crate::db::Runs = std::sync::Arc::new(move |n: &Needs| match &info {
                    Some(i) => i.unmet(n).is_none(),
                    None => *n == Needs::default(),
                });
                Ok::<_, ApiError>(h.db.lease_next_where(&name, lease_ms, Some(runs))?)
            })
            .await??
        } else {
            None
        };
        if let Some(l) = leased {
            hub.changed();
            let limits = hub.config.limits(&l.task.target);
            let target = hub.db.target(&l.build.project, &l.task.target)?;
            return Ok(Json(WorkerLease {
                task: l.task,
                build: l.build,
                fence: l.fence,
                lease_ms,
                limits,
                target,
            })
            .into_response());
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep_until(deadline) => return Ok(StatusCode::NO_CONTENT.into_response()),
            _ = hub.shutdown.cancelled() => return Ok(StatusCode::NO_CONTENT.into_response()),
        }
    }
}

/// `POST /api/v1/worker/tasks/ID/heartbeat` `{"fence"}`: 204, or 409 when
/// the lease is gone (the worker must stop the task).
async fn heartbeat(
    caller: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let f: Fence = json(&body, "heartbeat")?;
    let id = parse_task_id(&id)?;
    let (_, worker) = leased_task(&hub, &caller, id, None)?;
    let lease_ms = hub.config.build.lease_ms();
    let h = hub.clone();
    tokio::task::spawn_blocking(move || {
        h.worker_contact(&worker, None)?;
        Ok::<_, ApiError>(h.db.heartbeat(id, f.fence, lease_ms)?)
    })
    .await??;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
pub struct FenceQuery {
    pub fence: u64,
}

/// `POST /api/v1/worker/tasks/ID/log?fence=F` with the task's output as a
/// streaming body: followers on the hub see a remote task's log as it is
/// written. The worker still uploads the complete log at the end; that is
/// the one recorded.
async fn live_log(
    caller: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<FenceQuery>,
    body: axum::body::Body,
) -> ApiResult<StatusCode> {
    use futures_util::StreamExt;
    let id = parse_task_id(&id)?;
    let (t, _) = leased_task(&hub, &caller, id, Some(q.fence))?;
    // Room for the worker's own notes past the build's limit.
    let limit = hub.config.limits(&t.target).log_limit_bytes + (64 << 10);
    let io = |e: std::io::Error| ApiError::Internal(format!("live log of task {id}: {e}"));
    let mut log = hub.logs.create(id, limit).map_err(io)?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else { break };
        log.write(&chunk).map_err(io)?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Task `id` and the worker holding its lease. A task without a lease, or
/// (when `fence` is given) under another fence, is stale (409); a join
/// token may only speak for its own worker's tasks (403).
fn leased_task(
    hub: &Hub,
    caller: &WorkerCaller,
    id: crate::model::TaskId,
    fence: Option<u64>,
) -> ApiResult<(Task, String)> {
    let t = hub.db.task(id)?;
    let worker = t.lease.as_ref().map(|l| l.worker.clone());
    // Without a fence to check, only that there is a lease (fence 0 is
    // never handed out).
    let current = t.lease.as_ref().map(|l| l.fence);
    crate::db::check_fence(&t, fence.or(current).unwrap_or(0))?;
    let worker = worker.unwrap_or_default();
    caller.check(&worker)?;
    Ok((t, worker))
}

/// `GET /api/v1/worker/tasks/ID/repo?fence=F`: the packages of the task's
/// target repo its Build-Depends may use (the target's arch and `all`).
async fn task_repo(
    caller: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<FenceQuery>,
) -> ApiResult<Json<Vec<crate::model::RepoDeb>>> {
    let id = parse_task_id(&id)?;
    let (t, _) = leased_task(&hub, &caller, id, Some(q.fence))?;
    let build = hub.db.build(t.build)?;
    let Some(target) = hub.db.target(&build.project, &t.target)? else {
        return Ok(Json(vec![]));
    };
    Ok(Json(crate::worker::target_repo_debs(&hub, &target)?))
}

/// `GET /api/v1/worker/tasks/ID/rpms?fence=F`: the RPMs of the task's
/// target repo its BuildRequires may use (the target's arch and `noarch`).
async fn task_repo_rpms(
    caller: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<FenceQuery>,
) -> ApiResult<Json<Vec<crate::model::RepoRpm>>> {
    let id = parse_task_id(&id)?;
    let (t, _) = leased_task(&hub, &caller, id, Some(q.fence))?;
    let build = hub.db.build(t.build)?;
    let Some(target) = hub.db.target(&build.project, &t.target)? else {
        return Ok(Json(vec![]));
    };
    Ok(Json(crate::worker::target_repo_rpms(&hub, &target)?))
}

/// `GET /api/v1/worker/buildroots/NAME`: the export of the buildroot's
/// current generation (made on the first ask), whose blob the worker then
/// downloads from `/cas/sha256/`.
async fn buildroot_export(
    _: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> ApiResult<Json<crate::buildroot::Export>> {
    crate::kinds::validate_name(&name)
        .map_err(|m| ApiError::BadRequest(format!("buildroot {m}")))?;
    Ok(Json(crate::buildroot::export(&hub, &name).await?))
}

#[derive(Deserialize)]
pub struct DebQuery {
    /// Where the mirror serves it (http or https).
    pub url: String,
    pub size: u64,
}

/// `GET /api/v1/worker/debs/SHA256?url=U&size=N`: a Build-Depends `.deb`
/// from the hub's cache, which downloads it from `url` first if it lacks
/// it (checked against size and SHA256, as for its own tasks). One cache
/// serves the farm, and workers need no way to the mirrors.
async fn deb(
    _: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    Path(hex): Path<String>,
    axum::extract::Query(q): axum::extract::Query<DebQuery>,
) -> ApiResult<Response> {
    let mut sha256 = [0u8; 32];
    if hex.len() != 64 || hex::decode_to_slice(&hex, &mut sha256).is_err() {
        return Err(ApiError::BadRequest(format!(
            "{hex:?} is not a sha256 (64 hex digits)"
        )));
    }
    if !(q.url.starts_with("http://") || q.url.starts_with("https://")) {
        return Err(ApiError::BadRequest(format!(
            "url {:?} is not an http(s) URL",
            q.url
        )));
    }
    let wanted = crate::deps::Wanted {
        from: crate::deps::From::Url(q.url.clone()),
        file: String::new(),
        size: q.size,
        sha256,
    };
    let cache = crate::deps::cache_dir(hub.data_dir());
    let path = crate::deps::cached(&cache, &q.url, &wanted)
        .await
        .map_err(|e| ApiError::BadGateway(e.to_string()))?;
    let file = tokio::fs::File::open(&path)
        .await
        .map_err(|e| ApiError::Internal(format!("{}: {e}", path.display())))?;
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    Ok((
        [(axum::http::header::CONTENT_LENGTH, q.size.to_string())],
        body,
    )
        .into_response())
}

/// `POST /api/v1/worker/blobs/missing` `[digest, …]`: the ones the hub
/// lacks, so a worker uploads nothing twice.
async fn missing(
    _: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    body: Bytes,
) -> ApiResult<Json<Vec<Digest>>> {
    let wanted: Vec<Digest> = json(&body, "digest list")?;
    Ok(Json(
        wanted
            .into_iter()
            .filter(|d| !hub.cas.contains(d))
            .collect(),
    ))
}

/// `PUT /api/v1/worker/blobs/HEX`: stores the body if its sha256 is HEX.
async fn upload(
    _: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    Path(hex): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let want: Digest = hex
        .parse()
        .map_err(|_| ApiError::BadRequest(format!("{hex:?} is not a sha256 digest")))?;
    if Digest::of(&body) != want {
        return Err(ApiError::BadRequest(format!(
            "the uploaded bytes do not hash to {want}"
        )));
    }
    let cas = hub.cas.clone();
    tokio::task::spawn_blocking(move || cas.put_bytes(&body)).await??;
    Ok(StatusCode::CREATED)
}

/// `POST /api/v1/worker/tasks/ID/end`: records the end with its fence
/// (409 if stale) once every blob it names is in the store (400 naming the
/// first that is not).
async fn end(
    caller: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Build>> {
    let id = parse_task_id(&id)?;
    let r: EndReport = json(&body, "end report")?;
    let (task, _) = leased_task(&hub, &caller, id, None)?;
    let mut named = r
        .log
        .iter()
        .chain(r.outputs.iter())
        .chain(r.files.iter().map(|f| &f.digest));
    if let Some(d) = named.find(|d| !hub.cas.contains(d)) {
        return Err(ApiError::BadRequest(format!(
            "blob {d} is not on the hub: upload it first"
        )));
    }
    let build = hub.db.build(task.build)?;
    let artifacts: Vec<Artifact> = r
        .files
        .iter()
        .map(|f| Artifact {
            build: build.id,
            task: id,
            path: crate::worker::artifact_path(&build, &task.target, &f.path),
            digest: f.digest,
            size: f.size,
            mode: f.mode,
        })
        .collect();
    let mut end = TaskEnd {
        outcome: r.outcome,
        log: r.log,
        outputs: r.outputs,
        artifacts,
        publish: None,
    };
    if end.outcome.succeeded()
        && let Some(t) = hub.db.target(&build.project, &task.target)?
    {
        match crate::repos::packages_for_repo(&hub, &end.artifacts, build.id, &t, true).await {
            Ok(add) => end.publish = Some(add),
            Err(e) => end.outcome = Outcome::Outputs(e.to_string()),
        }
    }
    let publish_to = crate::worker::publish_target(&end);
    let requeues = matches!(end.outcome, Outcome::Infrastructure(_));
    let (h, max) = (hub.clone(), hub.config.build.max_attempts);
    let build =
        tokio::task::spawn_blocking(move || h.db.finish_task(id, r.fence, end, max)).await??;
    if let Some((project, repo)) = publish_to {
        crate::worker::spawn_publish(&hub, project, repo);
    }
    // Only a re-queued task is new work for waiting workers; waking them
    // all on every end would have each take the writer for nothing.
    if requeues {
        hub.queued.notify_waiters();
    }
    hub.changed();
    Ok(Json(build))
}

/// `GET /api/v1/workers`: the directory, each worker with its state,
/// configuration, counts and QoS.
async fn list_workers(_: Reader, State(hub): State<Arc<Hub>>) -> ApiResult<Json<Vec<WorkerView>>> {
    let h = hub.clone();
    Ok(Json(
        tokio::task::spawn_blocking(move || h.directory()).await??,
    ))
}

fn find_worker(hub: &Hub, name: &str) -> ApiResult<WorkerView> {
    hub.directory()?
        .into_iter()
        .find(|w| w.name == name)
        .ok_or_else(|| ApiError::NotFound(format!("worker {name:?} not found (kiln worker list)")))
}

/// `GET /api/v1/workers/NAME`.
async fn show_worker(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> ApiResult<Json<WorkerView>> {
    let h = hub.clone();
    Ok(Json(
        tokio::task::spawn_blocking(move || find_worker(&h, &name)).await??,
    ))
}

/// The admin state a worker action (`drain`, `enable`, `disable`) sets.
pub(crate) fn admin_action(action: &str) -> ApiResult<AdminState> {
    match action {
        "drain" => Ok(AdminState::Draining),
        "enable" => Ok(AdminState::Enabled),
        "disable" => Ok(AdminState::Disabled),
        other => Err(ApiError::NotFound(format!(
            "no worker action {other:?}: use drain, enable or disable"
        ))),
    }
}

/// `POST /api/v1/workers/NAME/drain|enable|disable` (admin).
async fn set_worker(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    Path((name, action)): Path<(String, String)>,
) -> ApiResult<Json<WorkerView>> {
    let admin = admin_action(&action)?;
    require_admin(&caller, &format!("{action} workers"))?;
    let h = hub.clone();
    Ok(Json(
        tokio::task::spawn_blocking(move || {
            h.set_worker_admin(&name, admin)?;
            find_worker(&h, &name)
        })
        .await??,
    ))
}

#[derive(Serialize, Deserialize, Debug)]
pub struct WorkerTokenRequest {
    /// The worker it enrols (its name in the directory).
    pub name: String,
}

#[derive(Serialize, Deserialize, Debug)]
pub struct WorkerTokenCreated {
    pub name: String,
    /// `kwj1.<fingerprint>.<secret>`, shown once.
    pub token: String,
}

/// `POST /api/v1/worker-tokens` `{"name"}` (admin): a join token for one
/// worker, holding the hub's certificate fingerprint (when it serves TLS).
async fn create_worker_token(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<WorkerTokenCreated>)> {
    require_admin(&caller, "create worker tokens")?;
    let req: WorkerTokenRequest = json(&body, "worker token request")?;
    crate::kinds::validate_name(&req.name)
        .map_err(|m| ApiError::BadRequest(format!("worker {m}")))?;
    if req.name == LOCAL_WORKER {
        return Err(ApiError::BadRequest(format!(
            "worker name {LOCAL_WORKER:?} is reserved for the hub's own slots"
        )));
    }
    let secret = crate::hub::new_secret();
    hub.db.insert_worker_token(
        &crate::hub::token_hash(&secret),
        &WorkerToken {
            name: req.name.clone(),
            created: crate::model::now_ms(),
            revoked: None,
        },
    )?;
    let token = JoinToken {
        fingerprint: hub.tls_fingerprint.clone(),
        secret,
    };
    Ok((
        StatusCode::CREATED,
        Json(WorkerTokenCreated {
            name: req.name,
            token: token.to_string(),
        }),
    ))
}

/// `GET /api/v1/worker-tokens` (admin): names and dates, never secrets.
async fn list_worker_tokens(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
) -> ApiResult<Json<Vec<WorkerToken>>> {
    require_admin(&caller, "list worker tokens")?;
    Ok(Json(hub.db.worker_tokens()?))
}

/// `DELETE /api/v1/worker-tokens/NAME` (admin): revokes the worker's join
/// token; its next request is refused (401).
async fn revoke_worker_token(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> ApiResult<Json<WorkerToken>> {
    require_admin(&caller, "revoke worker tokens")?;
    Ok(Json(hub.db.revoke_worker_token(&name)?))
}
