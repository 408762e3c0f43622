//! The one typed HTTP client of the hub's API, used by the CLI, the remote
//! worker, and the tests. Over `https://` it either trusts the usual CAs or,
//! given the hub's certificate fingerprint, that one certificate alone.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

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
    /// The hub's certificate is not the pinned one: the connection was
    /// refused in the handshake, before any request was sent.
    #[error(
        "refused the hub at {url}: the hub's certificate has fingerprint {actual} \
         but {pinned} was pinned"
    )]
    Pin {
        url: String,
        actual: String,
        pinned: String,
    },
    /// The client cannot be made as asked (a malformed fingerprint, a pin
    /// on a plain-HTTP URL).
    #[error("{0}")]
    Setup(String),
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
    /// Set for a pinned `https://` client: the handshake's verdicts.
    pin: Option<Arc<PinVerifier>>,
}

impl Client {
    /// The hub's URL this client talks to.
    pub fn base_url(&self) -> &str {
        &self.base
    }

    /// A client trusting what reqwest trusts: for `https://`, certificates
    /// issued by a CA the platform trusts (a self-signed hub fails).
    pub fn new(base: &str, token: Option<String>) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .build()
                .expect("reqwest client builds"),
            pin: None,
        }
    }

    /// A client that, with a `fingerprint`, trusts exactly the `https://`
    /// hub whose certificate has that SHA-256 (as `kiln serve` prints it):
    /// no CA and no host-name check, the pin is the trust. Handshake
    /// signatures are still verified, so only the holder of that
    /// certificate's key gets through. Without a fingerprint, as
    /// [`Client::new`].
    pub fn pinned(base: &str, token: Option<String>, fingerprint: Option<&str>) -> Result<Client> {
        let Some(fingerprint) = fingerprint else {
            return Ok(Client::new(base, token));
        };
        let pinned = crate::tls::parse_fingerprint(fingerprint).map_err(ClientError::Setup)?;
        if !base.starts_with("https://") {
            // Over plain HTTP a pin would protect nothing; saying so beats
            // silently sending the token in the clear.
            return Err(ClientError::Setup(format!(
                "a certificate fingerprint was given, but {base} is not an https:// URL"
            )));
        }
        let provider = crate::tls::crypto_provider();
        let verifier = Arc::new(PinVerifier {
            pinned,
            provider: provider.clone(),
            refused: Mutex::new(None),
        });
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| ClientError::Setup(format!("TLS set-up: {e}")))?
            .dangerous()
            .with_custom_certificate_verifier(verifier.clone())
            .with_no_client_auth();
        // reqwest takes the config as `dyn Any` and only recognises its own
        // rustls version's ClientConfig; with another it errors here
        // ("Unknown TLS backend"). Cargo.toml keeps the two on one 0.23.
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(config)
            .build()
            .map_err(|e| ClientError::Setup(format!("TLS set-up: {e}")))?;
        Ok(Client {
            base: base.trim_end_matches('/').to_string(),
            token,
            http,
            pin: Some(verifier),
        })
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

    /// A failed request as an error: a refused pin when the handshake
    /// refused the hub's certificate, else a transport error.
    fn transport(&self, source: reqwest::Error) -> ClientError {
        // reqwest's error keeps the rustls error only as an opaque source
        // chain, so the verifier leaves what it saw on the side. Taking it
        // means a concurrent failure on the same client may report the
        // plain transport error instead; never the wrong fingerprint.
        let refused = self.pin.as_ref().and_then(|p| {
            let actual = p.refused.lock().unwrap_or_else(|e| e.into_inner()).take()?;
            Some((actual, p.pinned.clone()))
        });
        match refused {
            Some((actual, pinned)) => ClientError::Pin {
                url: self.base.clone(),
                actual,
                pinned,
            },
            None => ClientError::Transport {
                url: self.base.clone(),
                source,
            },
        }
    }

    async fn send(&self, rb: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let resp = rb.send().await.map_err(|e| self.transport(e))?;
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
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
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
        // A source RPM goes alone; the hub reads its name from its header.
        if meta.is_file() && dir.to_string_lossy().ends_with(".src.rpm") {
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            let names = vec![dir.file_name().unwrap_or_default().to_owned()];
            let body = reqwest::Body::wrap_stream(tar_stream_of(parent.to_owned(), Some(names)));
            return self.submit_tar_to(project, None, targets, body).await;
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
        let bytes = resp.bytes().await.map_err(|e| self.transport(e))?;
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

    /// The hub's kiln binary (for self-update): the response, whose
    /// `x-kiln-sha256` header names its digest.
    pub async fn worker_binary(&self) -> Result<reqwest::Response> {
        self.send(self.req(reqwest::Method::GET, "/api/v1/worker/binary"))
            .await
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

    /// The export of the hub's buildroot `name` (made on the hub's first
    /// ask, which may take a while).
    pub async fn worker_buildroot(&self, name: &str) -> Result<crate::buildroot::Export> {
        self.json(self.req(
            reqwest::Method::GET,
            &format!("/api/v1/worker/buildroots/{name}"),
        ))
        .await
    }

    /// The packages of task `task`'s target repo (its arch and `all`) that
    /// its Build-Depends may use.
    pub async fn worker_repo(&self, task: u64, fence: u64) -> Result<Vec<crate::model::RepoDeb>> {
        self.json(
            self.req(
                reqwest::Method::GET,
                &format!("/api/v1/worker/tasks/{task}/repo"),
            )
            .query(&[("fence", fence)]),
        )
        .await
    }

    /// The RPMs of task `task`'s target repo (its arch and `noarch`) that
    /// its BuildRequires may use.
    pub async fn worker_repo_rpms(
        &self,
        task: u64,
        fence: u64,
    ) -> Result<Vec<crate::model::RepoRpm>> {
        self.json(
            self.req(
                reqwest::Method::GET,
                &format!("/api/v1/worker/tasks/{task}/rpms"),
            )
            .query(&[("fence", fence)]),
        )
        .await
    }

    /// A mirror's `.deb` through the hub's cache: the hub downloads `url`
    /// unless it holds the file already; the caller verifies what comes.
    pub async fn worker_deb(
        &self,
        sha256: &[u8; 32],
        url: &str,
        size: u64,
    ) -> Result<reqwest::Response> {
        let rb = self
            .req(
                reqwest::Method::GET,
                &format!("/api/v1/worker/debs/{}", hex::encode(sha256)),
            )
            .query(&[("url", url), ("size", &size.to_string())]);
        self.send(rb).await
    }

    /// Makes blob `d` present in `cas`, fetching it unless it is there
    /// (verified against its digest).
    pub async fn fetch_blob(&self, cas: &crate::cas::Cas, d: &Digest) -> Result<()> {
        if cas.contains(d) {
            return Ok(());
        }
        let bytes = self
            .blob(d, false)
            .await?
            .bytes()
            .await
            .map_err(|e| self.transport(e))?;
        if Digest::of(&bytes) != *d {
            return Err(ClientError::Decode(format!(
                "blob {d} does not match its digest"
            )));
        }
        cas.put_bytes(&bytes)
            .map_err(|e| ClientError::Io(std::io::Error::other(e.to_string())))?;
        Ok(())
    }

    /// Downloads blob `d` into the file `dest`, compressed in transit and
    /// verified against its digest (a mismatch leaves no file); its size.
    pub async fn worker_download(&self, d: &Digest, dest: &Path) -> Result<u64> {
        use sha2::Digest as _;
        use std::io::Write;
        struct Hashing {
            file: std::fs::File,
            hash: sha2::Sha256,
            len: u64,
        }
        impl Write for Hashing {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.file.write_all(buf)?;
                self.hash.update(buf);
                self.len += buf.len() as u64;
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                self.file.flush()
            }
        }
        let mut resp = self.blob(d, true).await?;
        let out = Hashing {
            file: std::fs::File::create(dest)?,
            hash: sha2::Sha256::new(),
            len: 0,
        };
        let result = async {
            let mut dec = zstd::stream::write::Decoder::new(out)?;
            while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(e))? {
                dec.write_all(&chunk)?;
            }
            dec.flush()?;
            let out = dec.into_inner();
            out.file.sync_all()?;
            if Digest(out.hash.finalize().into()) != *d {
                return Err(ClientError::Decode(format!(
                    "blob {d} does not match its digest"
                )));
            }
            Ok(out.len)
        }
        .await;
        if result.is_err() {
            let _ = std::fs::remove_file(dest);
        }
        result
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
        resp.text().await.map_err(|e| self.transport(e))
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

    /// Adds a web user (admin).
    pub async fn add_user(
        &self,
        name: &str,
        password: &str,
        admin: bool,
    ) -> Result<crate::server::UserView> {
        self.json(self.req(reqwest::Method::POST, "/api/v1/users").json(
            &crate::server::UserRequest {
                name: name.to_string(),
                password: password.to_string(),
                admin,
            },
        ))
        .await
    }

    pub async fn users(&self) -> Result<Vec<crate::server::UserView>> {
        self.json(self.req(reqwest::Method::GET, "/api/v1/users"))
            .await
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

/// Accepts the server exactly when its end-entity certificate hashes to the
/// pin. Chain, names and dates are not looked at: the pin says which
/// certificate, and the signature checks say the server holds its key.
#[derive(Debug)]
struct PinVerifier {
    pinned: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
    /// The fingerprint of the last certificate refused, for the error.
    refused: Mutex<Option<String>>,
}

/// The handshake's error (rustls keeps it as the reason).
#[derive(Debug, thiserror::Error)]
#[error("certificate fingerprint {actual} is not the pinned {pinned}")]
struct PinMismatch {
    actual: String,
    pinned: String,
}

impl rustls::client::danger::ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &rustls::pki_types::CertificateDer<'_>,
        _intermediates: &[rustls::pki_types::CertificateDer<'_>],
        _server_name: &rustls::pki_types::ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        let actual = crate::tls::fingerprint(end_entity);
        if actual == self.pinned {
            return Ok(rustls::client::danger::ServerCertVerified::assertion());
        }
        *self.refused.lock().unwrap_or_else(|e| e.into_inner()) = Some(actual.clone());
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::Other(rustls::OtherError(Arc::new(PinMismatch {
                actual,
                pinned: self.pinned.clone(),
            }))),
        ))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_checked_before_any_request() {
        let fp = "ab".repeat(32);
        // Builds: reqwest accepted the rustls config (same rustls version).
        let c = Client::pinned("https://127.0.0.1:1/", None, Some(&fp)).unwrap();
        assert_eq!(c.base_url(), "https://127.0.0.1:1");
        let e = Client::pinned("https://h", None, Some("abc"))
            .err()
            .unwrap();
        assert!(e.to_string().contains("64 hex digits"), "{e}");
        let e = Client::pinned("http://h", None, Some(&fp)).err().unwrap();
        assert!(e.to_string().contains("not an https:// URL"), "{e}");
        assert!(
            Client::pinned("http://h", None, None)
                .unwrap()
                .pin
                .is_none()
        );
    }
}
