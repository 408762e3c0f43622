//! The one typed HTTP client of the hub's API, used by the CLI, (later) the
//! remote worker, and the tests.

use std::path::{Path, PathBuf};

use axum::body::Bytes;
use futures_util::{Stream, StreamExt};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::cas::Digest;
use crate::model::{Artifact, Build, Target};
use crate::server::{
    BuildView, BuildrootView, ErrorBody, Health, RepoView, TargetRequest, TokenCreated,
    TokenRequest,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The hub answered with an error status.
    #[error("{message} (HTTP {status})")]
    Api { status: u16, message: String },
    #[error("cannot reach the hub at {url}: {source}")]
    Transport { url: String, source: reqwest::Error },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("unexpected answer from the hub: {0}")]
    Decode(String),
}

impl ClientError {
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

pub type Result<T, E = ClientError> = std::result::Result<T, E>;

#[derive(Clone)]
pub struct Client {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// The hub's URL this client talks to.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    pub fn new(base: &str, token: Option<String>) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .build()
                .expect("reqwest client builds"),
        }
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.http.request(method, self.url(path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = rb.send().await.map_err(|source| ClientError::Transport {
            url: self.base.clone(),
            source,
        })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<ErrorBody>(&text)
            .map(|b| b.error)
            .unwrap_or(text);
        Err(ClientError::Api { status, message })
    }

    async fn json<T: DeserializeOwned>(&self, rb: reqwest::RequestBuilder) -> Result<T> {
        let resp = self.send(rb).await?;
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: self.base.clone(),
                source,
            })?;
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode(e.to_string()))
    }

    pub async fn health(&self) -> Result<Health> {
        self.json(self.req(reqwest::Method::GET, "/api/v1/health"))
            .await
    }

    /// Submits a tar stream as a new build.
    pub async fn submit_tar(
        &self,
        project: Option<&str>,
        package: Option<&str>,
        body: reqwest::Body,
    ) -> Result<Build> {
        self.submit_tar_to(project, package, &[], body).await
    }

    /// Submits a tar for the given targets of the project (none: `host`).
    pub async fn submit_tar_to(
        &self,
        project: Option<&str>,
        package: Option<&str>,
        targets: &[&str],
        body: reqwest::Body,
    ) -> Result<Build> {
        self.submit_query(project, package, targets, vec![], body)
            .await
    }

    /// Has the hub fetch `git_ref` (default: HEAD) of the git `url` and
    /// build the commit it names now.
    pub async fn submit_git(
        &self,
        url: &str,
        git_ref: Option<&str>,
        project: Option<&str>,
        package: Option<&str>,
        targets: &[&str],
    ) -> Result<Build> {
        let mut q = vec![("git", url.to_string())];
        if let Some(r) = git_ref {
            q.push(("ref", r.to_string()));
        }
        self.submit_query(project, package, targets, q, reqwest::Body::from(""))
            .await
    }

    async fn submit_query(
        &self,
        project: Option<&str>,
        package: Option<&str>,
        targets: &[&str],
        mut q: Vec<(&str, String)>,
        body: reqwest::Body,
    ) -> Result<Build> {
        if let Some(p) = project {
            q.push(("project", p.to_string()));
        }
        if let Some(p) = package {
            q.push(("package", p.to_string()));
        }
        if !targets.is_empty() {
            q.push(("targets", targets.join(",")));
        }
        let rb = self
            .req(reqwest::Method::POST, "/api/v1/builds")
            .query(&q)
            .header("content-type", "application/x-tar")
            .body(body);
        self.json(rb).await
    }

    /// Tars `dir` (streamed, never whole in memory) and submits it. The
    /// package name defaults to the directory's name.
    pub async fn submit_dir(
        &self,
        dir: &Path,
        project: Option<&str>,
        package: Option<&str>,
    ) -> Result<Build> {
        self.submit_dir_to(dir, project, package, &[]).await
    }

    /// [`Client::submit_dir`] for the given targets of the project.
    pub async fn submit_dir_to(
        &self,
        dir: &Path,
        project: Option<&str>,
        package: Option<&str>,
        targets: &[&str],
    ) -> Result<Build> {
        let meta = std::fs::metadata(dir).map_err(|e| {
            ClientError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", dir.display()),
            ))
        })?;
        if meta.is_file() && dir.extension().is_some_and(|e| e == "dsc") {
            return self.submit_dsc_to(dir, project, targets).await;
        }
        if !meta.is_dir() {
            return Err(ClientError::Io(std::io::Error::other(format!(
                "{} is not a directory",
                dir.display()
            ))));
        }
        let default_name = dir_name(dir);
        let package = package.or(default_name.as_deref());
        let body = reqwest::Body::wrap_stream(tar_stream(dir.to_owned()));
        self.submit_tar_to(project, package, targets, body).await
    }

    /// Submits a Debian source package: the `.dsc` and the files it names,
    /// from the same directory. The hub checks their checksums.
    pub async fn submit_dsc_to(
        &self,
        dsc: &Path,
        project: Option<&str>,
        targets: &[&str],
    ) -> Result<Build> {
        let io = |e: std::io::Error| {
            ClientError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", dsc.display()),
            ))
        };
        let text = std::fs::read(dsc).map_err(io)?;
        let dir = dsc
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let mut names = vec![dsc.file_name().unwrap_or_default().to_owned()];
        for f in crate::kinds::dsc_files(&text).map_err(|e| io(std::io::Error::other(e)))? {
            if !dir.join(&f).is_file() {
                return Err(io(std::io::Error::other(format!(
                    "{f}, which it names, is not beside it"
                ))));
            }
            names.push(f.into());
        }
        let body = reqwest::Body::wrap_stream(tar_stream_of(dir.to_owned(), Some(names)));
        self.submit_tar_to(project, None, targets, body).await
    }

    /// Asks for a task as worker `worker`, waiting up to `wait_secs`;
    /// `None` when none came.
    pub async fn worker_lease(
        &self,
        worker: &str,
        wait_secs: u64,
        info: Option<&crate::workers::WorkerInfo>,
    ) -> Result<Option<crate::remote::WorkerLease>> {
        let rb = self
            .req(reqwest::Method::POST, "/api/v1/worker/lease")
            .json(&crate::remote::LeaseRequest {
                worker: worker.to_string(),
                wait_secs,
                info: info.cloned(),
            });
        let resp = self.send(rb).await?;
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(None);
        }
        let bytes = resp
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: self.base.clone(),
                source,
            })?;
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ClientError::Decode(e.to_string()))
    }

    /// Extends a lease; an error (409) means the task is no longer ours.
    /// Which worker this client's token speaks for.
    pub async fn worker_whoami(&self) -> Result<crate::remote::WhoAmI> {
        self.json(self.req(reqwest::Method::GET, "/api/v1/worker/whoami"))
            .await
    }

    /// Streams a running task's log to the hub as it is written.
    pub async fn worker_log(&self, task: u64, fence: u64, body: reqwest::Body) -> Result<()> {
        let rb = self
            .req(
                reqwest::Method::POST,
                &format!("/api/v1/worker/tasks/{task}/log"),
            )
            .query(&[("fence", fence)])
            .body(body);
        self.send(rb).await.map(|_| ())
    }

    /// The worker directory.
    pub async fn workers(&self) -> Result<Vec<crate::workers::WorkerView>> {
        self.json(self.req(reqwest::Method::GET, "/api/v1/workers"))
            .await
    }

    pub async fn worker(&self, name: &str) -> Result<crate::workers::WorkerView> {
        self.json(self.req(reqwest::Method::GET, &format!("/api/v1/workers/{name}")))
            .await
    }

    /// `action`: drain, enable or disable.
    pub async fn set_worker(&self, name: &str, action: &str) -> Result<crate::workers::WorkerView> {
        self.json(self.req(
            reqwest::Method::POST,
            &format!("/api/v1/workers/{name}/{action}"),
        ))
        .await
    }

    /// A join token for worker `name` (shown once).
    pub async fn create_worker_token(
        &self,
        name: &str,
    ) -> Result<crate::remote::WorkerTokenCreated> {
        self.json(
            self.req(reqwest::Method::POST, "/api/v1/worker-tokens")
                .json(&crate::remote::WorkerTokenRequest {
                    name: name.to_string(),
                }),
        )
        .await
    }

    pub async fn worker_tokens(&self) -> Result<Vec<crate::workers::WorkerToken>> {
        self.json(self.req(reqwest::Method::GET, "/api/v1/worker-tokens"))
            .await
    }

    pub async fn revoke_worker_token(&self, name: &str) -> Result<crate::workers::WorkerToken> {
        self.json(self.req(
            reqwest::Method::DELETE,
            &format!("/api/v1/worker-tokens/{name}"),
        ))
        .await
    }

    /// Sets a build's priority (admin; -100..=100, default 0).
    pub async fn set_priority(&self, build: u64, priority: i64) -> Result<Build> {
        self.json(
            self.req(
                reqwest::Method::POST,
                &format!("/api/v1/builds/{build}/priority"),
            )
            .json(&crate::server::PriorityRequest { priority }),
        )
        .await
    }

    pub async fn worker_heartbeat(&self, task: u64, fence: u64) -> Result<()> {
        let rb = self
            .req(
                reqwest::Method::POST,
                &format!("/api/v1/worker/tasks/{task}/heartbeat"),
            )
            .json(&crate::remote::Fence { fence });
        self.send(rb).await.map(|_| ())
    }

    /// The digests among `digests` the hub lacks.
    pub async fn worker_missing(
        &self,
        digests: &[crate::cas::Digest],
    ) -> Result<Vec<crate::cas::Digest>> {
        self.json(
            self.req(reqwest::Method::POST, "/api/v1/worker/blobs/missing")
                .json(digests),
        )
        .await
    }

    /// Uploads one blob (the hub checks it hashes to `digest`).
    pub async fn worker_upload(&self, digest: &crate::cas::Digest, data: Vec<u8>) -> Result<()> {
        let rb = self
            .req(
                reqwest::Method::PUT,
                &format!("/api/v1/worker/blobs/{digest}"),
            )
            .body(data);
        self.send(rb).await.map(|_| ())
    }

    /// Reports a task's end under its fence.
    pub async fn worker_end(&self, task: u64, report: &crate::remote::EndReport) -> Result<Build> {
        self.json(
            self.req(
                reqwest::Method::POST,
                &format!("/api/v1/worker/tasks/{task}/end"),
            )
            .json(report),
        )
        .await
    }

    /// Cancels every unfinished task of a build (admin).
    pub async fn cancel_build(&self, id: u64) -> Result<Build> {
        self.json(self.req(
            reqwest::Method::POST,
            &format!("/api/v1/builds/{id}/cancel"),
        ))
        .await
    }

    /// Cancels a queued or running task (admin).
    pub async fn cancel_task(&self, id: u64) -> Result<Build> {
        self.json(self.req(reqwest::Method::POST, &format!("/api/v1/tasks/{id}/cancel")))
            .await
    }

    /// Queues a task again as a new attempt (admin).
    pub async fn requeue_task(&self, id: u64) -> Result<Build> {
        self.json(self.req(
            reqwest::Method::POST,
            &format!("/api/v1/tasks/{id}/requeue"),
        ))
        .await
    }

    pub async fn create_buildroot(
        &self,
        req: &crate::buildroot::CreateRequest,
    ) -> Result<BuildrootView> {
        let rb = self
            .req(reqwest::Method::POST, "/api/v1/buildroots")
            .json(req);
        self.json(rb).await
    }

    /// Uploads a root filesystem tarball (`.tar`, `.tar.zst`, `.tar.gz`, ...).
    pub async fn import_buildroot(&self, name: &str, tarball: &Path) -> Result<BuildrootView> {
        let f = tokio::fs::File::open(tarball).await.map_err(|e| {
            ClientError::Io(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", tarball.display()),
            ))
        })?;
        let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(f));
        let rb = self
            .req(
                reqwest::Method::PUT,
                &format!("/api/v1/buildroots/{name}/import"),
            )
            .body(body);
        self.json(rb).await
    }

    pub async fn buildroots(&self) -> Result<Vec<BuildrootView>> {
        let rb = self.req(reqwest::Method::GET, "/api/v1/buildroots");
        self.json(rb).await
    }

    pub async fn buildroot(&self, name: &str) -> Result<BuildrootView> {
        let rb = self.req(reqwest::Method::GET, &format!("/api/v1/buildroots/{name}"));
        self.json(rb).await
    }

    pub async fn refresh_buildroot(&self, name: &str) -> Result<BuildrootView> {
        let rb = self.req(
            reqwest::Method::POST,
            &format!("/api/v1/buildroots/{name}/refresh"),
        );
        self.json(rb).await
    }

    pub async fn delete_buildroot(&self, name: &str) -> Result<crate::model::Buildroot> {
        let rb = self.req(
            reqwest::Method::DELETE,
            &format!("/api/v1/buildroots/{name}"),
        );
        self.json(rb).await
    }

    /// The log of a buildroot's last create, import or refresh.
    pub async fn buildroot_log(&self, name: &str) -> Result<String> {
        let rb = self.req(
            reqwest::Method::GET,
            &format!("/api/v1/buildroots/{name}/log"),
        );
        let resp = self.send(rb).await?;
        resp.text().await.map_err(|source| ClientError::Transport {
            url: self.base.clone(),
            source,
        })
    }

    /// Adds a target to a project (its repo and signing key come with it).
    pub async fn add_target(&self, project: &str, req: &TargetRequest) -> Result<Target> {
        let rb = self
            .req(
                reqwest::Method::POST,
                &format!("/api/v1/projects/{project}/targets"),
            )
            .json(req);
        self.json(rb).await
    }

    pub async fn targets(&self, project: &str) -> Result<Vec<Target>> {
        let rb = self.req(
            reqwest::Method::GET,
            &format!("/api/v1/projects/{project}/targets"),
        );
        self.json(rb).await
    }

    pub async fn repo(&self, project: &str, repo: &str) -> Result<RepoView> {
        let rb = self.req(
            reqwest::Method::GET,
            &format!("/api/v1/projects/{project}/repos/{repo}"),
        );
        self.json(rb).await
    }

    pub async fn list_builds(&self, before: Option<u64>, limit: usize) -> Result<Vec<Build>> {
        let mut q = vec![("limit", limit.to_string())];
        if let Some(b) = before {
            q.push(("before", b.to_string()));
        }
        self.json(self.req(reqwest::Method::GET, "/api/v1/builds").query(&q))
            .await
    }

    pub async fn build(&self, id: u64) -> Result<BuildView> {
        self.json(self.req(reqwest::Method::GET, &format!("/api/v1/builds/{id}")))
            .await
    }

    /// The build's log as a stream of chunks; with `follow`, the stream ends
    /// when the build has ended.
    pub async fn log(
        &self,
        id: u64,
        follow: bool,
    ) -> Result<impl Stream<Item = Result<Bytes>> + use<>> {
        let mut rb = self.req(reqwest::Method::GET, &format!("/api/v1/builds/{id}/log"));
        if follow {
            rb = rb.query(&[("follow", "1")]);
        }
        let resp = self.send(rb).await?;
        let url = self.base.clone();
        Ok(resp.bytes_stream().map(move |r| {
            r.map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })
        }))
    }

    pub async fn log_text(&self, id: u64) -> Result<String> {
        let mut s = Box::pin(self.log(id, false).await?);
        let mut out = Vec::new();
        while let Some(c) = s.next().await {
            out.extend_from_slice(&c?);
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }

    pub async fn artifacts(&self, id: u64) -> Result<Vec<Artifact>> {
        self.json(self.req(
            reqwest::Method::GET,
            &format!("/api/v1/builds/{id}/artifacts"),
        ))
        .await
    }

    /// An artifact's content as a response to stream from.
    pub async fn artifact(&self, id: u64, path: &str) -> Result<reqwest::Response> {
        self.send(self.req(
            reqwest::Method::GET,
            &format!("/api/v1/builds/{id}/artifacts/{path}"),
        ))
        .await
    }

    /// A blob by digest; with `zstd`, asks for the stored compressed form.
    pub async fn blob(&self, digest: &Digest, zstd: bool) -> Result<reqwest::Response> {
        let mut rb = self.req(reqwest::Method::GET, &format!("/cas/sha256/{digest}"));
        if zstd {
            rb = rb.header("accept-encoding", "zstd");
        }
        self.send(rb).await
    }

    pub async fn create_token(&self, name: &str, admin: bool) -> Result<TokenCreated> {
        let rb = self
            .req(reqwest::Method::POST, "/api/v1/tokens")
            .json(&TokenRequest {
                name: name.to_string(),
                admin,
            });
        self.json(rb).await
    }

    /// Waits until a build has ended and returns it.
    pub async fn wait(&self, id: u64, timeout: std::time::Duration) -> Result<BuildView> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let b = self.build(id).await?;
            if b.detail.build.state.is_finished() {
                return Ok(b);
            }
            if tokio::time::Instant::now() > deadline {
                return Err(ClientError::Decode(format!(
                    "build {id} still {} after {timeout:?}",
                    b.detail.build.state
                )));
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }
}

fn dir_name(dir: &Path) -> Option<String> {
    std::fs::canonicalize(dir)
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
}

/// A writer that hands its bytes to an async stream in chunks.
struct ChannelWriter {
    tx: mpsc::Sender<std::io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= 256 * 1024 {
            self.flush()?;
        }
        Ok(data.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = Bytes::from(std::mem::take(&mut self.buf));
            self.tx
                .blocking_send(Ok(chunk))
                .map_err(|_| std::io::Error::other("upload cancelled"))?;
        }
        Ok(())
    }
}

/// A tar of `dir` as a stream, made on a blocking thread.
pub fn tar_stream(dir: PathBuf) -> impl Stream<Item = std::io::Result<Bytes>> {
    tar_stream_of(dir, None)
}

/// [`tar_stream`] of only the named top-level entries of `dir`.
fn tar_stream_of(
    dir: PathBuf,
    only: Option<Vec<std::ffi::OsString>>,
) -> impl Stream<Item = std::io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let mut w = ChannelWriter {
            tx: tx.clone(),
            buf: Vec::new(),
        };
        let res =
            crate::cas::tar_entries(&dir, only, &mut w).and_then(|_| std::io::Write::flush(&mut w));
        if let Err(e) = res {
            let _ = tx.blocking_send(Err(e));
        }
    });
    ReceiverStream::new(rx)
}
