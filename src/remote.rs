//! The hub's side of the remote worker protocol: long-poll leases,
//! heartbeats, blob upload by digest, and the fenced end of a task. Remote
//! workers take the same leases as local slots (`Db::lease_next_where`);
//! for now they run `host`-target tasks only (buildroots are not shipped
//! to workers yet). See docs/workers.md.
//!
//! What must stay true: an end is recorded only with the task's current
//! fence, and only when every blob it names is already in the store.

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
use crate::model::{Artifact, Build, HOST_TARGET, Outcome, Task};
use crate::server::{ApiError, ApiResult, WorkerCaller, parse_task_id};

/// Longest a lease request waits for work.
const MAX_WAIT: Duration = Duration::from_secs(30);

/// The routes; blob uploads may be as large as a source upload.
pub fn routes(max_blob_bytes: u64) -> axum::Router<Arc<Hub>> {
    let blob_limit = usize::try_from(max_blob_bytes).unwrap_or(usize::MAX);
    axum::Router::new()
        .route("/api/v1/worker/lease", post(lease))
        .route("/api/v1/worker/tasks/{id}/heartbeat", post(heartbeat))
        .route("/api/v1/worker/tasks/{id}/end", post(end))
        .route("/api/v1/worker/blobs/missing", post(missing))
        .route(
            "/api/v1/worker/blobs/{hex}",
            put(upload).layer(axum::extract::DefaultBodyLimit::max(blob_limit)),
        )
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct LeaseRequest {
    /// The worker's name, recorded on the task.
    pub worker: String,
    /// How long to wait for a task, in seconds (at most 30).
    #[serde(default)]
    pub wait_secs: u64,
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

/// `POST /api/v1/worker/lease`: a task under a fresh lease (200), or 204
/// when none came within `wait_secs`.
async fn lease(_: WorkerCaller, State(hub): State<Arc<Hub>>, body: Bytes) -> ApiResult<Response> {
    let req: LeaseRequest = json(&body, "lease request")?;
    crate::kinds::validate_name(&req.worker)
        .map_err(|m| ApiError::BadRequest(format!("worker {m}")))?;
    let lease_ms = hub.config.build.lease_ms();
    let deadline = tokio::time::Instant::now() + MAX_WAIT.min(Duration::from_secs(req.wait_secs));
    loop {
        let notified = hub.queued.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let (h, name) = (hub.clone(), req.worker.clone());
        let leased = tokio::task::spawn_blocking(move || {
            let runs = |target: &str| target == HOST_TARGET;
            h.db.lease_next_where(&name, lease_ms, Some(&runs))
        })
        .await??;
        if let Some(l) = leased {
            hub.changed();
            let limits = hub.config.limits(&l.task.target);
            return Ok(Json(WorkerLease {
                task: l.task,
                build: l.build,
                fence: l.fence,
                lease_ms,
                limits,
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
    _: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<StatusCode> {
    let f: Fence = json(&body, "heartbeat")?;
    let lease_ms = hub.config.build.lease_ms();
    hub.db.heartbeat(parse_task_id(&id)?, f.fence, lease_ms)?;
    Ok(StatusCode::NO_CONTENT)
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
    _: WorkerCaller,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Build>> {
    let id = parse_task_id(&id)?;
    let r: EndReport = json(&body, "end report")?;
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
    let task = hub.db.task(id)?;
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
        match crate::worker::debs_for_repo(&hub, &end.artifacts, build.id).await {
            Ok(debs) => end.publish = Some((t.project.clone(), t.repo.clone(), debs)),
            Err(e) => end.outcome = Outcome::Outputs(e.to_string()),
        }
    }
    let publish_to = crate::worker::publish_target(&end);
    let (h, max) = (hub.clone(), hub.config.build.max_attempts);
    let build =
        tokio::task::spawn_blocking(move || h.db.finish_task(id, r.fence, end, max)).await??;
    if let Some((project, repo)) = publish_to {
        crate::worker::spawn_publish(&hub, project, repo);
    }
    hub.queued.notify_waiters();
    hub.changed();
    Ok(Json(build))
}
