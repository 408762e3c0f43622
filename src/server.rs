//! The HTTP face of the hub: the JSON API under `/api/v1`, blobs at
//! `/cas/sha256/<hex>`, the web pages, and the one place errors become HTTP
//! responses (`ApiError`).
//!
//! Every mutating route takes a `Caller` (a valid bearer token) — a route
//! without one is a bug. Reads take a `Reader`, which needs a token only when
//! `server.public_reads` is off.

use std::io::Read;
use std::sync::Arc;

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::accounts::Principal;
use crate::cas::{CasError, Digest};
use crate::db::DbError;
use crate::hub::{Hub, HubError};
use crate::model::{
    Artifact, Build, BuildDetail, BuildId, BuildState, DEFAULT_PROJECT, Repo, RepoDeb, Target,
};
use crate::scheduler::{Submission, SubmitError};

/// The one mapping from errors to HTTP responses: `{"error": "..."}` with a
/// status that says whose fault it was.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("missing or invalid token: send `Authorization: Bearer <token>`")]
    Unauthorized,
    /// A known credential that no longer counts (a revoked join token).
    #[error("{0}")]
    Revoked(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    /// Too many attempts (failed logins).
    #[error("{0}")]
    TooMany(String),
    /// Something the hub fetched for the caller failed (a mirror).
    #[error("{0}")]
    BadGateway(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized | ApiError::Revoked(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::TooMany(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let ApiError::Internal(m) = &self {
            tracing::error!(error = %m, "internal error");
        }
        let mut resp = (
            self.status(),
            Json(ErrorBody {
                error: self.to_string(),
            }),
        )
            .into_response();
        if matches!(self, ApiError::Unauthorized | ApiError::Revoked(_)) {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::BuildNotFound(_)
            | DbError::TaskNotFound(_)
            | DbError::ProjectNotFound(_)
            | DbError::NotFound(_) => ApiError::NotFound(e.to_string()),
            DbError::Exists(_) | DbError::Conflict(_) => ApiError::Conflict(e.to_string()),
            DbError::StaleLease { .. } => ApiError::Conflict(e.to_string()),
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<CasError> for ApiError {
    fn from(e: CasError) -> Self {
        match e {
            CasError::UnsafePath { .. } | CasError::BadArchive(_) => {
                ApiError::BadRequest(e.to_string())
            }
            CasError::TooLarge { .. } => ApiError::TooLarge(e.to_string()),
            CasError::NotFound(_) => ApiError::NotFound(e.to_string()),
            _ => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<HubError> for ApiError {
    fn from(e: HubError) -> Self {
        match e {
            HubError::Db(d) => d.into(),
            HubError::Cas(c) => c.into(),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::Recipe(r) => ApiError::BadRequest(r.to_string()),
            SubmitError::BadName(m) => ApiError::BadRequest(m),
            SubmitError::Cas(c) => c.into(),
            SubmitError::Db(d) => d.into(),
            SubmitError::Git(crate::gitsrc::GitError::Io(e)) => ApiError::Internal(e.to_string()),
            SubmitError::Git(g) => ApiError::BadRequest(g.to_string()),
        }
    }
}

impl From<crate::buildroot::BuildrootError> for ApiError {
    fn from(e: crate::buildroot::BuildrootError) -> Self {
        use crate::buildroot::BuildrootError as E;
        match e {
            E::BadRequest(m) => ApiError::BadRequest(m),
            E::Db(d) => d.into(),
            E::Io { .. } => ApiError::Internal(e.to_string()),
        }
    }
}

impl From<tokio::task::JoinError> for ApiError {
    fn from(e: tokio::task::JoinError) -> Self {
        ApiError::Internal(format!("worker thread: {e}"))
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

pub(crate) fn bearer(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
        .map(str::trim)
}

/// A request carrying a valid token (a service or admin token, or a
/// user's): required by every mutating API route.
pub struct Caller(pub Principal);

impl FromRequestParts<Arc<Hub>> for Caller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, hub: &Arc<Hub>) -> ApiResult<Self> {
        let secret = bearer(parts).ok_or(ApiError::Unauthorized)?;
        crate::accounts::principal_of_token(hub, secret)?
            .map(Caller)
            .ok_or(ApiError::Unauthorized)
    }
}

/// A request from a worker: a live join token (bound to one worker name)
/// or an admin token (may act as any worker).
pub struct WorkerCaller {
    /// The worker the join token enrols; None for an admin token.
    pub bound: Option<String>,
}

impl WorkerCaller {
    /// Refuses a join token acting for another worker.
    pub fn check(&self, worker: &str) -> ApiResult<()> {
        match &self.bound {
            Some(n) if n != worker => Err(ApiError::Forbidden(format!(
                "this join token enrols worker {n:?}, not {worker:?}"
            ))),
            _ => Ok(()),
        }
    }
}

impl FromRequestParts<Arc<Hub>> for WorkerCaller {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, hub: &Arc<Hub>) -> ApiResult<Self> {
        let secret = bearer(parts).ok_or(ApiError::Unauthorized)?;
        let hash = crate::hub::token_hash(secret);
        if let Some(t) = hub.db.worker_token(&hash)? {
            if t.revoked.is_some() {
                return Err(ApiError::Revoked(format!(
                    "the join token of worker {:?} was revoked",
                    t.name
                )));
            }
            return Ok(WorkerCaller {
                bound: Some(t.name),
            });
        }
        let Caller(token) = Caller::from_request_parts(parts, hub).await?;
        require_admin(&token, "act as a worker").map(|_| WorkerCaller { bound: None })
    }
}

/// A request allowed to read: anyone when reads are public, else a token.
pub struct Reader;

impl FromRequestParts<Arc<Hub>> for Reader {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, hub: &Arc<Hub>) -> ApiResult<Self> {
        if hub.config.server.public_reads {
            return Ok(Reader);
        }
        Caller::from_request_parts(parts, hub).await.map(|_| Reader)
    }
}

pub fn router(hub: Arc<Hub>) -> axum::Router {
    let (router, _) = routes(hub.config.server.max_upload_bytes).into_parts();
    router
        .layer(axum::middleware::from_fn_with_state(
            hub.clone(),
            crate::web::audit,
        ))
        .with_state(hub)
}

/// Every route: the API, the repos and blobs, the pages and forms, the
/// worker protocol.
pub(crate) fn routes(max_upload_bytes: u64) -> crate::web::Routes {
    crate::web::Routes::new()
        .get("/api/v1/health", health)
        .get("/api/v1/builds", list_builds)
        .post("/api/v1/builds", submit_build)
        .get("/api/v1/builds/{id}", get_build)
        .get("/api/v1/builds/{id}/log", build_log)
        .get("/api/v1/builds/{id}/artifacts", list_artifacts)
        .get("/api/v1/builds/{id}/artifacts/{*path}", get_artifact)
        .post("/api/v1/builds/{id}/cancel", cancel_build)
        .post("/api/v1/builds/{id}/priority", set_priority)
        .post("/api/v1/tasks/{id}/cancel", cancel_task)
        .post("/api/v1/tasks/{id}/requeue", requeue_task)
        .post("/api/v1/tokens", create_token)
        .get("/api/v1/users", list_users)
        .post("/api/v1/users", add_user)
        .get("/api/v1/projects/{project}/targets", list_targets)
        .post("/api/v1/projects/{project}/targets", add_target)
        .get("/api/v1/projects/{project}/repos/{repo}", get_repo)
        .get("/api/v1/buildroots", list_buildroots)
        .post("/api/v1/buildroots", create_buildroot)
        .get("/api/v1/buildroots/{name}", get_buildroot)
        .delete("/api/v1/buildroots/{name}", delete_buildroot)
        .get("/api/v1/buildroots/{name}/log", buildroot_log)
        .post("/api/v1/buildroots/{name}/refresh", refresh_buildroot)
        .put("/api/v1/buildroots/{name}/import", import_buildroot)
        .get("/repos/{project}/key.asc", repo_key)
        .get("/repos/{project}/{repo}/{*path}", repo_file)
        .get("/cas/sha256/{hex}", get_blob)
        .merge(crate::web::routes())
        .merge(crate::remote::routes(max_upload_bytes))
}

#[derive(Serialize, Deserialize)]
pub struct Health {
    pub version: String,
    pub schema_version: u64,
}

async fn health(State(hub): State<Arc<Hub>>) -> ApiResult<Json<Health>> {
    Ok(Json(Health {
        version: env!("CARGO_PKG_VERSION").to_string(),
        schema_version: hub.db.schema_version()?,
    }))
}

pub(crate) fn parse_id(s: &str) -> ApiResult<BuildId> {
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("build id {s:?} is not a number")))
}

#[derive(Deserialize)]
pub struct ListQuery {
    pub before: Option<BuildId>,
    pub limit: Option<usize>,
}

async fn list_builds(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Query(q): Query<ListQuery>,
) -> ApiResult<Json<Vec<Build>>> {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    Ok(Json(hub.db.list_builds(q.before, limit)?))
}

#[derive(Serialize, Deserialize, Debug, Clone)]
pub struct BuildView {
    #[serde(flatten)]
    pub detail: BuildDetail,
    /// For a queued build: why it is not running yet.
    pub waiting: Option<String>,
}

async fn get_build(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> ApiResult<Json<BuildView>> {
    let detail = hub.db.build_detail(parse_id(&id)?)?;
    let mut waiting = None;
    for t in &detail.task_list {
        if t.state == BuildState::Queued {
            waiting = crate::scheduler::why_waiting(&hub, t.id)?;
            break;
        }
    }
    Ok(Json(BuildView { detail, waiting }))
}

pub(crate) fn parse_task_id(s: &str) -> ApiResult<crate::model::TaskId> {
    s.parse()
        .map_err(|_| ApiError::BadRequest(format!("task id {s:?} is not a number")))
}

/// `POST /api/v1/tasks/ID/cancel` (admin): a queued task leaves the queue,
/// a running one's sandbox is killed; the task ends `cancelled`.
async fn cancel_task(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Build>> {
    let id = parse_task_id(&id)?;
    let project = hub.db.build(hub.db.task(id)?.build)?.project;
    require_steer(&hub, &caller, &project, "cancel tasks")?;
    Ok(Json(crate::worker::stop_task(&hub, id, false)?))
}

/// `POST /api/v1/tasks/ID/requeue` (admin): a running task is stopped and
/// queued again, an ended one runs again, as a new attempt.
async fn requeue_task(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Build>> {
    let id = parse_task_id(&id)?;
    let project = hub.db.build(hub.db.task(id)?.build)?.project;
    require_steer(&hub, &caller, &project, "re-queue tasks")?;
    Ok(Json(crate::worker::stop_task(&hub, id, true)?))
}

/// `POST /api/v1/builds/ID/cancel` (admin): cancels every task of the build
/// that has not ended.
async fn cancel_build(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Build>> {
    let detail = hub.db.build_detail(parse_id(&id)?)?;
    require_steer(&hub, &caller, &detail.build.project, "cancel builds")?;
    Ok(Json(cancel_all(&hub, &detail)?))
}

/// Cancels every task of a build that has not ended.
pub(crate) fn cancel_all(hub: &Hub, detail: &crate::model::BuildDetail) -> ApiResult<Build> {
    let mut build = detail.build.clone();
    for t in detail.task_list.iter().filter(|t| !t.state.is_finished()) {
        build = crate::worker::stop_task(hub, t.id, false)?;
    }
    Ok(build)
}

#[derive(Serialize, Deserialize)]
pub struct PriorityRequest {
    /// -100..=100; higher runs first, before fair share; default 0.
    pub priority: i64,
}

/// `POST /api/v1/builds/ID/priority` `{"priority": N}` (admin): moves the
/// build's queued tasks (and any it re-queues later) ahead of or behind
/// other work.
async fn set_priority(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Build>> {
    require_admin(&caller, "set build priorities")?;
    let req: PriorityRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("priority request: {e}")))?;
    let max = crate::db::MAX_PRIORITY;
    if !(-max..=max).contains(&req.priority) {
        return Err(ApiError::BadRequest(format!(
            "priority {} is outside -{max}..={max}",
            req.priority
        )));
    }
    let id = parse_id(&id)?;
    hub.db.set_build_priority(id, req.priority)?;
    hub.queued.notify_waiters();
    hub.changed();
    Ok(Json(hub.db.build(id)?))
}

#[derive(Deserialize)]
pub struct SubmitQuery {
    /// Comma-separated target names of the project; default `host`.
    pub targets: Option<String>,
    pub project: Option<String>,
    pub package: Option<String>,
    /// Fetch the source from this git URL (https, http, git) instead of
    /// the body.
    pub git: Option<String>,
    /// The branch, tag or commit to fetch with `git` (default `HEAD`).
    #[serde(rename = "ref")]
    pub git_ref: Option<String>,
}

/// `POST /api/v1/builds?project=P&package=N` with a tar stream of the source
/// tree as the body, or `?git=URL&ref=REF` and no body.
async fn submit_build(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    Query(q): Query<SubmitQuery>,
    body: Body,
) -> ApiResult<(StatusCode, Json<Build>)> {
    use futures_util::TryStreamExt;
    let targets = q
        .targets
        .as_deref()
        .map(|t| {
            t.split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(String::from)
                .collect()
        })
        .unwrap_or_default();
    let source = match q.git {
        Some(url) => SourceIn::Git {
            url,
            git_ref: q.git_ref,
        },
        None => SourceIn::Tar(Box::new(tokio_util::io::StreamReader::new(
            body.into_data_stream().map_err(std::io::Error::other),
        ))),
    };
    let project = q.project.unwrap_or_else(|| DEFAULT_PROJECT.to_string());
    let build = submit_source(&hub, &caller, project, q.package, targets, source).await?;
    Ok((StatusCode::CREATED, Json(build)))
}

/// Where a submission's source comes from.
pub(crate) enum SourceIn {
    /// A tar stream of the tree (plain, or gzip-compressed).
    Tar(Box<dyn tokio::io::AsyncRead + Send + Unpin>),
    /// A git URL and ref (default `HEAD`), pinned to its commit now.
    Git {
        url: String,
        git_ref: Option<String>,
    },
}

/// A submission from the API or a web form: checks the caller may build in
/// `project`, stores the source, queues the build; a user who creates a
/// project by submitting to it becomes its owner.
pub(crate) async fn submit_source(
    hub: &Arc<Hub>,
    caller: &Principal,
    project: String,
    package: Option<String>,
    targets: Vec<String>,
    source: SourceIn,
) -> ApiResult<Build> {
    require_build(hub, caller, &project)?;
    let max = hub.config.server.max_upload_bytes;
    let mut sub = Submission {
        project,
        package,
        submitted_by: caller.name(),
        targets,
        origin: None,
    };
    let h = hub.clone();
    let build = match source {
        SourceIn::Git { url, git_ref } => {
            // The source is the commit the ref names now.
            let git_ref = git_ref.unwrap_or_else(|| "HEAD".into());
            let fetched = crate::gitsrc::fetch(&url, &git_ref, &hub.work_dir())
                .await
                .map_err(SubmitError::from)?;
            if sub.package.is_none() {
                sub.package = url
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .map(|n| n.trim_end_matches(".git").to_string());
            }
            sub.origin = Some(fetched.origin.clone());
            tokio::task::spawn_blocking(move || {
                let mut f =
                    std::fs::File::open(&fetched.tar).map_err(crate::gitsrc::GitError::Io)?;
                let pending = h.cas.ingest_tar(&mut f, max)?;
                crate::scheduler::submit(&h, sub, pending)
            })
            .await??
        }
        SourceIn::Tar(stream) => {
            let mut reader = tokio_util::io::SyncIoBridge::new(stream);
            tokio::task::spawn_blocking(move || {
                let mut head = std::io::BufReader::new(&mut reader);
                let gzip = std::io::BufRead::fill_buf(&mut head)
                    .map(|b| b.starts_with(&[0x1f, 0x8b]))
                    .unwrap_or(false);
                let res = if gzip {
                    h.cas
                        .ingest_tar(flate2::read::GzDecoder::new(&mut head), max)
                } else {
                    h.cas.ingest_tar(&mut head, max)
                };
                // Read what the client still sends (bounded) so it sees our
                // answer rather than a reset connection.
                let _ = std::io::copy(&mut (&mut head).take(64 << 20), &mut std::io::sink());
                crate::scheduler::submit(&h, sub, res?)
            })
            .await??
        }
    };
    if let Principal::User(u) = caller
        && !u.admin
        && hub.db.members(&build.project)?.is_empty()
    {
        hub.db.set_member(
            &build.project,
            &u.name,
            Some(crate::model::ProjectRole::Owner),
        )?;
    }
    Ok(build)
}

#[derive(Deserialize)]
pub struct LogQuery {
    pub follow: Option<String>,
}

async fn build_log(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
    Query(q): Query<LogQuery>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    let build = hub.db.build(id)?;
    let follow = matches!(q.follow.as_deref(), Some("1" | "true" | "yes"));
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(crate::web::stream_build_log(hub, build, follow, tx));
    let mut resp = Body::from_stream(ReceiverStream::new(rx)).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    Ok(resp)
}

async fn list_artifacts(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<Artifact>>> {
    let id = parse_id(&id)?;
    hub.db.build(id)?;
    Ok(Json(hub.db.artifacts(id)?))
}

async fn get_artifact(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Path((id, path)): Path<(String, String)>,
) -> ApiResult<Response> {
    let id = parse_id(&id)?;
    hub.db.build(id)?;
    let a = hub
        .db
        .artifact(id, &path)?
        .ok_or_else(|| ApiError::NotFound(format!("build {id} has no artifact {path:?}")))?;
    let mut resp = blob_response(&hub, a.digest, false).await?;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(a.size));
    Ok(resp)
}

async fn get_blob(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Path(hex): Path<String>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let digest: Digest = hex.parse().map_err(|_| {
        ApiError::BadRequest(format!("{hex:?} is not a sha256 digest (64 lowercase hex)"))
    })?;
    let accepts_zstd = headers
        .get_all(header::ACCEPT_ENCODING)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|e| e.split(';').next().map(str::trim) == Some("zstd"));
    let mut resp = blob_response(&hub, digest, accepts_zstd).await?;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    if accepts_zstd {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static("zstd"));
    }
    h.insert(header::VARY, HeaderValue::from_static("accept-encoding"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000, immutable"),
    );
    Ok(resp)
}

/// Streams a blob, verified while read. An error before the first chunk (a
/// missing or small corrupt blob) becomes an error response; a later one
/// aborts the body, so a client never receives a complete corrupt blob.
pub async fn blob_response(hub: &Arc<Hub>, digest: Digest, raw: bool) -> ApiResult<Response> {
    let mut rx = blob_chunks(hub, digest, raw)?;
    let first = rx.recv().await;
    let head = match first {
        Some(Ok(b)) => Some(b),
        Some(Err(e)) => {
            return Err(ApiError::Internal(format!("blob {digest}: {e}")));
        }
        None => None,
    };
    let stream = futures_util::stream::iter(head.map(Ok)).chain(ReceiverStream::new(rx));
    let mut resp = Body::from_stream(stream).into_response();
    resp.headers_mut().insert(
        "x-kiln-digest",
        HeaderValue::from_str(&digest.to_string()).expect("hex is a valid header"),
    );
    Ok(resp)
}

/// Reads a blob on a blocking thread into a channel of chunks.
pub fn blob_chunks(
    hub: &Arc<Hub>,
    digest: Digest,
    raw: bool,
) -> ApiResult<mpsc::Receiver<std::io::Result<Bytes>>> {
    let mut reader: Box<dyn Read + Send> = if raw {
        Box::new(hub.cas.open_raw(&digest)?)
    } else {
        Box::new(hub.cas.open_blob(&digest)?)
    };
    let (tx, rx) = mpsc::channel(8);
    tokio::task::spawn_blocking(move || {
        loop {
            let mut buf = vec![0u8; 256 * 1024];
            match reader.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    Ok(rx)
}

#[derive(Serialize, Deserialize)]
pub struct TokenRequest {
    pub name: String,
    #[serde(default)]
    pub admin: bool,
}

#[derive(Serialize, Deserialize)]
pub struct TokenCreated {
    pub name: String,
    pub token: String,
}

/// Hub-wide changes (tokens, buildroots, workers) need an admin.
pub(crate) fn require_admin(caller: &Principal, what: &str) -> ApiResult<()> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!("only an admin can {what}")))
    }
}

/// Cancelling, re-queueing and prioritising a project's builds: admins,
/// and users who are the project's members.
pub(crate) fn require_steer(
    hub: &Hub,
    caller: &Principal,
    project: &str,
    what: &str,
) -> ApiResult<()> {
    let ok = match caller {
        Principal::User(u) => u.admin || hub.db.member_role(project, &u.name)?.is_some(),
        p => p.is_admin(),
    };
    if ok {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "only an admin or a member of project {project} can {what}"
        )))
    }
}

/// Submitting to a project: see `Principal::can_build`.
pub(crate) fn require_build(hub: &Hub, caller: &Principal, project: &str) -> ApiResult<()> {
    if caller.can_build(hub, project)? {
        Ok(())
    } else {
        Err(ApiError::Forbidden(format!(
            "only an admin or a member of project {project} can build in it"
        )))
    }
}

async fn create_token(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<TokenCreated>)> {
    require_admin(&caller, "create tokens")?;
    let req: TokenRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("token request: {e}")))?;
    crate::kinds::validate_name(&req.name)
        .map_err(|m| ApiError::BadRequest(format!("name {m}")))?;
    let token = hub.create_token(&req.name, req.admin)?;
    Ok((
        StatusCode::CREATED,
        Json(TokenCreated {
            name: req.name,
            token,
        }),
    ))
}

/// The address a request came from (for the login rate limit), on both
/// the plain and the TLS listener.
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub std::net::SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for Peer
{
    fn connect_info(s: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Peer {
        Peer(*s.remote_addr())
    }
}

#[derive(Serialize, Deserialize)]
pub struct UserRequest {
    pub name: String,
    pub password: String,
    #[serde(default)]
    pub admin: bool,
}

/// A user as the API shows it (never the password hash).
#[derive(Serialize, Deserialize, Debug)]
pub struct UserView {
    pub name: String,
    pub admin: bool,
    pub created: i64,
}

/// `POST /api/v1/users` (admin): adds a web user.
async fn add_user(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<UserView>)> {
    require_admin(&caller, "add users")?;
    let req: UserRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("user request: {e}")))?;
    let h = hub.clone();
    let u = tokio::task::spawn_blocking(move || {
        crate::accounts::add_user(&h, &req.name, &req.password, req.admin)
    })
    .await??;
    Ok((
        StatusCode::CREATED,
        Json(UserView {
            name: u.name,
            admin: u.admin,
            created: u.created,
        }),
    ))
}

/// `GET /api/v1/users` (admin).
async fn list_users(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
) -> ApiResult<Json<Vec<UserView>>> {
    require_admin(&caller, "list users")?;
    Ok(Json(
        hub.db
            .users()?
            .into_iter()
            .map(|u| UserView {
                name: u.name,
                admin: u.admin,
                created: u.created,
            })
            .collect(),
    ))
}

/// Serves `router` on an already-bound listener until the hub shuts down.
pub async fn serve(listener: tokio::net::TcpListener, hub: Arc<Hub>) -> std::io::Result<()> {
    let shutdown = hub.shutdown.clone();
    axum::serve(
        listener,
        router(hub).into_make_service_with_connect_info::<Peer>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

#[derive(Serialize, Deserialize, Default)]
pub struct TargetRequest {
    pub name: String,
    /// A buildroot's name, or `host`.
    pub buildroot: String,
    pub arch: String,
    /// Defaults to the target's name.
    pub repo: Option<String>,
    /// Features a worker must have to run this target's tasks (e.g. `kvm`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub features: Vec<String>,
    /// Least memory, cores and free disk a worker must have.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_memory_bytes: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_cores: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub min_disk_bytes: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Debian architecture names a target may name.
const ARCHES: &[&str] = &[
    "amd64", "arm64", "armel", "armhf", "i386", "mips64el", "ppc64el", "riscv64", "s390x", "all",
];

async fn add_target(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    Path(project): Path<String>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<Target>)> {
    // A project's configuration: its owners (and service tokens, as before
    // accounts existed).
    if matches!(caller, Principal::User(_)) && !caller.owns(&hub, &project)? {
        return Err(ApiError::Forbidden(format!(
            "only an owner of project {project} or an admin can add targets"
        )));
    }
    let req: TargetRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("target request: {e}")))?;
    let name_ok = |what: &str, v: &str| {
        crate::kinds::validate_name(v).map_err(|m| ApiError::BadRequest(format!("{what} {m}")))
    };
    name_ok("project", &project)?;
    name_ok("target", &req.name)?;
    name_ok("buildroot", &req.buildroot)?;
    let repo = req.repo.unwrap_or_else(|| req.name.clone());
    name_ok("repo", &repo)?;
    if !ARCHES.contains(&req.arch.as_str()) {
        return Err(ApiError::BadRequest(format!(
            "arch {:?} is not one of {}",
            req.arch,
            ARCHES.join(", ")
        )));
    }
    if req.buildroot != crate::model::HOST_TARGET && hub.db.buildroot(&req.buildroot)?.is_none() {
        return Err(ApiError::BadRequest(format!(
            "buildroot {:?} does not exist (kiln buildroot list)",
            req.buildroot
        )));
    }
    let mut features = req.features.clone();
    for f in &features {
        name_ok("feature", f)?;
    }
    features.sort();
    features.dedup();
    let needs = crate::workers::Needs {
        features,
        min_memory_bytes: req.min_memory_bytes,
        min_cores: u32::try_from(req.min_cores).map_err(|_| {
            ApiError::BadRequest(format!("min_cores {} is too large", req.min_cores))
        })?,
        min_disk_bytes: req.min_disk_bytes,
        ..Default::default()
    };
    let target = Target {
        project: project.clone(),
        name: req.name,
        buildroot: req.buildroot,
        arch: req.arch,
        repo: repo.clone(),
        created: crate::model::now_ms(),
    };
    let h = hub.clone();
    let t = target.clone();
    tokio::task::spawn_blocking(move || -> ApiResult<()> {
        let key = crate::publish::RepoKey::generate(&format!(
            "kiln project {} <kiln@localhost>",
            t.project
        ))
        .and_then(|k| k.to_armored_secret())
        .map_err(|e| ApiError::Internal(format!("signing key: {e}")))?;
        h.db.add_target(&t, &needs, &key)?;
        Ok(())
    })
    .await??;
    // The repo exists now: its (possibly empty) signed index follows at once.
    crate::repos::publish(&hub, &project, &repo)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok((StatusCode::CREATED, Json(target)))
}

async fn list_targets(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Path(project): Path<String>,
) -> ApiResult<Json<Vec<Target>>> {
    Ok(Json(hub.db.targets(&project)?))
}

/// A repo as the API shows it: its state, its packages and how to use it.
#[derive(Serialize, Deserialize, Debug)]
pub struct RepoView {
    #[serde(flatten)]
    pub repo: Repo,
    pub packages: Vec<RepoDeb>,
    /// Its RPMs (binary and source).
    #[serde(default)]
    pub rpms: Vec<RpmView>,
    pub sources: crate::repos::RepoSources,
}

/// An RPM in a repo, as the API lists it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct RpmView {
    pub name: String,
    pub epoch: u32,
    pub version: String,
    pub release: String,
    pub arch: String,
    pub location: String,
    pub digest: crate::cas::Digest,
    pub size: u64,
    pub build: BuildId,
}

impl From<&crate::model::RepoRpm> for RpmView {
    fn from(p: &crate::model::RepoRpm) -> RpmView {
        RpmView {
            name: p.name.clone(),
            epoch: p.epoch,
            version: p.version.clone(),
            release: p.release.clone(),
            arch: p.arch.clone(),
            location: p.location.clone(),
            digest: p.digest,
            size: p.size,
            build: p.build,
        }
    }
}

/// The hub's address for the lines we hand out: `server.public_url`, else
/// `http://host` as the client reached us.
pub(crate) fn base_url(hub: &Hub, headers: &HeaderMap) -> String {
    if let Some(u) = &hub.config.server.public_url {
        return u.clone();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("http://{host}")
}

async fn get_repo(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Path((project, repo)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Json<RepoView>> {
    let r = hub
        .db
        .repo(&project, &repo)?
        .ok_or_else(|| ApiError::NotFound(format!("repo {project}/{repo} not found")))?;
    let packages = hub.db.repo_debs(&project, &repo)?;
    let rpms = hub.db.repo_rpms(&project, &repo)?;
    Ok(Json(RepoView {
        repo: r,
        packages,
        rpms: rpms.iter().map(RpmView::from).collect(),
        sources: crate::repos::sources(&base_url(&hub, &headers), &project, &repo),
    }))
}

/// The project's public signing key. Repos are public (apt has no bearer
/// tokens), whatever `public_reads` says.
async fn repo_key(State(hub): State<Arc<Hub>>, Path(project): Path<String>) -> ApiResult<Response> {
    let secret = hub
        .db
        .project_key(&project)?
        .ok_or_else(|| ApiError::NotFound(format!("project {project} has no repos")))?;
    let public = crate::publish::RepoKey::from_armored_secret(&secret)
        .and_then(|k| k.public_key_armored())
        .map_err(|e| ApiError::Internal(format!("signing key of {project}: {e}")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/pgp-keys"),
        )],
        public,
    )
        .into_response())
}

/// `/repos/P/R.repo` (it shares its path with the repo's web page, which
/// hands it here): the `.repo` file dnf users drop into
/// /etc/yum.repos.d/. Public, like the repo. None when `file` names no
/// repo that way (a repo named `x.repo` keeps its page).
pub(crate) fn dnf_repo_file(
    hub: &Hub,
    project: &str,
    file: &str,
    headers: &HeaderMap,
) -> Result<Option<Response>, DbError> {
    let Some(repo) = file.strip_suffix(".repo") else {
        return Ok(None);
    };
    if hub.db.repo(project, file)?.is_some() || hub.db.repo(project, repo)?.is_none() {
        return Ok(None);
    }
    let s = crate::repos::sources(&base_url(hub, headers), project, repo);
    Ok(Some(
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; charset=utf-8"),
            )],
            s.dnf_repo,
        )
            .into_response(),
    ))
}

async fn repo_file(
    State(hub): State<Arc<Hub>>,
    Path((project, repo, path)): Path<(String, String, String)>,
) -> ApiResult<Response> {
    let f = hub
        .db
        .repo_file(&project, &repo, &path)?
        .ok_or_else(|| ApiError::NotFound(format!("{path} not found in repo {project}/{repo}")))?;
    let mut resp = blob_response(&hub, f.digest, false).await?;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(f.size));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // Names under by-hash/, pool/ and Packages/, and repodata files named
    // by their hash, never change content; the rest does.
    let cache = if path.contains("/by-hash/")
        || path.starts_with("pool/")
        || path.starts_with("Packages/")
        || (path.starts_with("repodata/") && !path.starts_with("repodata/repomd.xml"))
    {
        "public, max-age=31536000, immutable"
    } else {
        "no-cache"
    };
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    Ok(resp)
}

/// A buildroot as the API shows it.
#[derive(Serialize, Deserialize, Debug)]
pub struct BuildrootView {
    #[serde(flatten)]
    pub buildroot: crate::model::Buildroot,
    /// Its files on the hub (current generation).
    pub path: std::path::PathBuf,
}

fn buildroot_view(hub: &Hub, b: crate::model::Buildroot) -> BuildrootView {
    BuildrootView {
        path: crate::buildroot::root_path(hub, &b),
        buildroot: b,
    }
}

async fn create_buildroot(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    body: Bytes,
) -> ApiResult<(StatusCode, Json<BuildrootView>)> {
    require_admin(&caller, "create buildroots")?;
    let req: crate::buildroot::CreateRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("buildroot request: {e}")))?;
    let h = hub.clone();
    let br =
        tokio::task::spawn_blocking(move || crate::buildroot::begin_create(&h, &req)).await??;
    tokio::spawn(crate::buildroot::run_job(hub.clone(), br.clone(), None));
    Ok((StatusCode::ACCEPTED, Json(buildroot_view(&hub, br))))
}

async fn refresh_buildroot(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> ApiResult<(StatusCode, Json<BuildrootView>)> {
    require_admin(&caller, "refresh buildroots")?;
    let mut br = crate::buildroot::begin_refresh(&hub, &name)?;
    br.state = crate::model::BuildrootState::Creating;
    hub.db.put_buildroot(&br)?;
    let mut job = br.clone();
    // The job keeps `ready` so a failed refresh falls back to the current generation.
    job.state = crate::model::BuildrootState::Ready;
    tokio::spawn(crate::buildroot::run_job(hub.clone(), job, None));
    Ok((StatusCode::ACCEPTED, Json(buildroot_view(&hub, br))))
}

async fn import_buildroot(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult<(StatusCode, Json<BuildrootView>)> {
    require_admin(&caller, "import buildroots")?;
    use futures_util::TryStreamExt;
    use tokio::io::AsyncWriteExt;
    crate::kinds::validate_name(&name)
        .map_err(|m| ApiError::BadRequest(format!("buildroot {m}")))?;
    let dir = crate::buildroot::dir(&hub);
    tokio::fs::create_dir_all(&dir)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let upload = dir.join(format!("{name}.upload"));
    let max = hub.config.server.max_upload_bytes;
    let mut f = tokio::fs::File::create(&upload)
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut stream = body.into_data_stream();
    let mut n = 0u64;
    let fail = |e: ApiError, upload: std::path::PathBuf| async move {
        let _ = tokio::fs::remove_file(upload).await;
        Err(e)
    };
    loop {
        match stream.try_next().await {
            Ok(Some(chunk)) => {
                n += chunk.len() as u64;
                if n > max {
                    return fail(
                        ApiError::TooLarge(format!("upload larger than {max} bytes")),
                        upload,
                    )
                    .await;
                }
                if let Err(e) = f.write_all(&chunk).await {
                    return fail(ApiError::Internal(e.to_string()), upload).await;
                }
            }
            Ok(None) => break,
            Err(e) => return fail(ApiError::BadRequest(format!("upload: {e}")), upload).await,
        }
    }
    drop(f);
    let h = hub.clone();
    let n2 = name.clone();
    let br =
        match tokio::task::spawn_blocking(move || crate::buildroot::begin_import(&h, &n2)).await? {
            Ok(b) => b,
            Err(e) => return fail(e.into(), upload).await,
        };
    tokio::spawn(crate::buildroot::run_job(
        hub.clone(),
        br.clone(),
        Some(upload),
    ));
    Ok((StatusCode::ACCEPTED, Json(buildroot_view(&hub, br))))
}

async fn list_buildroots(
    _: Reader,
    State(hub): State<Arc<Hub>>,
) -> ApiResult<Json<Vec<BuildrootView>>> {
    let all = hub.db.buildroots()?;
    Ok(Json(
        all.into_iter().map(|b| buildroot_view(&hub, b)).collect(),
    ))
}

async fn get_buildroot(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> ApiResult<Json<BuildrootView>> {
    let b = hub
        .db
        .buildroot(&name)?
        .ok_or_else(|| ApiError::NotFound(format!("buildroot {name} not found")))?;
    Ok(Json(buildroot_view(&hub, b)))
}

async fn buildroot_log(
    _: Reader,
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> ApiResult<Response> {
    crate::kinds::validate_name(&name)
        .map_err(|m| ApiError::BadRequest(format!("buildroot {m}")))?;
    let text = tokio::fs::read(crate::buildroot::log_path(&hub, &name))
        .await
        .map_err(|_| ApiError::NotFound(format!("buildroot {name} has no log")))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        )],
        text,
    )
        .into_response())
}

async fn delete_buildroot(
    Caller(caller): Caller,
    State(hub): State<Arc<Hub>>,
    Path(name): Path<String>,
) -> ApiResult<Json<crate::model::Buildroot>> {
    require_admin(&caller, "delete buildroots")?;
    Ok(Json(crate::buildroot::delete(&hub, &name).await?))
}
