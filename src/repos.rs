//! A project's apt repositories as kiln keeps them: which `.deb`s each repo
//! holds (changed in the same transaction as the task that built them), the
//! publisher that derives the signed `dists/` files from that and switches
//! what `/repos/<project>/<repo>/` serves, and the lines a client needs.
//!
//! What must stay true:
//! - A repo's served files are switched in one database transaction, after
//!   every blob they name is durable; by-hash objects and pool files of
//!   earlier publishes stay, so an apt client mid-update never meets a file
//!   whose hash differs from the Release it holds.
//! - One publish per repo at a time (a lock per repo); a publish that raced
//!   with new packages leaves the repo due, and runs again.
//! - A repo whose packages changed is published again after a restart
//!   (`revision > published_revision` is stored).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::cas::{Cas, CasError, Digest};
use crate::db::DbError;
use crate::hub::Hub;
use crate::model::{BuildId, Repo, RepoDeb, RepoFileRef};
use crate::publish::{self, IndexCache, PoolEntry, RepoKey, Stanza, SuiteConfig};

/// The one component kiln's repos publish.
pub const COMPONENT: &str = "main";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{path}: not a usable .deb: {why}")]
    BadDeb { path: String, why: String },
    #[error("repo {0}: {1}")]
    Publish(String, String),
    #[error(transparent)]
    Cas(#[from] CasError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("project {0} has no signing key")]
    NoKey(String),
}

/// Reads a built `.deb` from the store and renders its `Packages` paragraph.
pub fn deb_for_repo(
    cas: &Cas,
    path: &str,
    digest: &Digest,
    build: BuildId,
) -> Result<RepoDeb, RepoError> {
    let bad = |why: String| RepoError::BadDeb {
        path: path.to_string(),
        why,
    };
    let info = publish::deb::inspect(cas.open_blob(digest)?).map_err(|e| bad(e.to_string()))?;
    let pool_path =
        publish::apt::pool_filename(COMPONENT, &info.control).map_err(|e| bad(e.to_string()))?;
    let stanza = Stanza::new(&PoolEntry {
        control: info.control.clone(),
        filename: pool_path.clone(),
        size: info.size,
        sha256: info.sha256,
    })
    .map_err(|e| bad(e.to_string()))?;
    Ok(RepoDeb {
        package: info.control.package().to_string(),
        version: info.control.version().to_string(),
        arch: info.control.architecture().to_string(),
        pool_path,
        digest: *digest,
        size: info.size,
        stanza: stanza.text().to_string(),
        build,
    })
}

/// A repo's publish lock, holding its index cache.
type RepoSlot = Arc<tokio::sync::Mutex<IndexCache>>;

/// Per-repo publish locks and index caches, by (project, repo).
#[derive(Default)]
pub struct Publisher {
    repos: Mutex<HashMap<(String, String), RepoSlot>>,
}

impl Publisher {
    fn slot(&self, project: &str, repo: &str) -> RepoSlot {
        let mut m = self.repos.lock().unwrap_or_else(|e| e.into_inner());
        m.entry((project.to_string(), repo.to_string()))
            .or_default()
            .clone()
    }
}

/// Publishes `project/repo` until what it serves shows its newest revision.
pub async fn publish(hub: &Arc<Hub>, project: &str, repo: &str) -> Result<Repo, RepoError> {
    let slot = hub.publisher.slot(project, repo);
    let mut cache = slot.lock().await;
    loop {
        let (h, p, r) = (hub.clone(), project.to_string(), repo.to_string());
        let taken = std::mem::take(&mut *cache);
        let (done, back) = tokio::task::spawn_blocking(move || {
            let mut cache = taken;
            let res = publish_once(&h, &p, &r, &mut cache);
            (res, cache)
        })
        .await
        .map_err(|e| RepoError::Publish(format!("{project}/{repo}"), e.to_string()))?;
        *cache = back;
        let published = done?;
        if published.published_revision >= published.revision {
            hub.changed();
            return Ok(published);
        }
    }
}

/// Publishes every repo that is due (at start, after a crash mid-publish).
pub async fn publish_due(hub: &Arc<Hub>) {
    let repos = match hub.db.all_repos() {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot list repos");
            return;
        }
    };
    for r in repos {
        if r.published_revision < r.revision
            && let Err(e) = publish(hub, &r.project, &r.name).await
        {
            tracing::error!(repo = %format!("{}/{}", r.project, r.name), error = %e, "publish failed");
        }
    }
}

/// One publish of the repo's current revision.
fn publish_once(
    hub: &Hub,
    project: &str,
    repo: &str,
    cache: &mut IndexCache,
) -> Result<Repo, RepoError> {
    let name = format!("{project}/{repo}");
    let r = hub
        .db
        .repo(project, repo)?
        .ok_or_else(|| DbError::NotFound(format!("repo {name}")))?;
    let debs = hub.db.repo_debs(project, repo)?;
    let key = hub
        .db
        .project_key(project)?
        .ok_or_else(|| RepoError::NoKey(project.to_string()))?;
    let key = RepoKey::from_armored_secret(&key)
        .map_err(|e| RepoError::Publish(name.clone(), e.to_string()))?;
    let stanzas = debs
        .iter()
        .map(|d| Stanza::from_cached(d.stanza.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| RepoError::Publish(name.clone(), e.to_string()))?;
    let cfg = SuiteConfig {
        origin: format!("kiln {project}"),
        label: format!("{project} {repo}"),
        suite: repo.to_string(),
        codename: repo.to_string(),
        component: COMPONENT.to_string(),
        architectures: r.architectures.clone(),
        description: Some(format!("Packages of {project}, built by kiln")),
    };
    let now = time::OffsetDateTime::now_utc();
    let files = publish::publish(&cfg, &stanzas, now, &key, cache)
        .map_err(|e| RepoError::Publish(name.clone(), e.to_string()))?;
    // Blobs first, durable; the database switch names only stored blobs.
    let mut batch = hub.cas.batch();
    let mut refs = Vec::with_capacity(files.len() + debs.len());
    for f in &files {
        let digest = batch.put_bytes(&f.data)?;
        refs.push((
            f.path.clone(),
            RepoFileRef {
                digest,
                size: f.data.len() as u64,
            },
        ));
    }
    batch.commit()?;
    for d in &debs {
        refs.push((
            d.pool_path.clone(),
            RepoFileRef {
                digest: d.digest,
                size: d.size,
            },
        ));
    }
    let published = hub.db.record_publish(project, repo, r.revision, &refs)?;
    tracing::info!(repo = %name, revision = r.revision, packages = debs.len(), "published");
    Ok(published)
}

/// The lines that make apt use a repo: one-line and deb822 forms.
pub fn sources(base_url: &str, project: &str, repo: &str) -> RepoSources {
    let url = format!("{base_url}/repos/{project}/{repo}");
    let key_url = format!("{base_url}/repos/{project}/key.asc");
    let key_path = format!("/etc/apt/keyrings/kiln-{project}.asc");
    RepoSources {
        list_line: format!("deb [signed-by={key_path}] {url} {repo} {COMPONENT}"),
        deb822: format!(
            "Types: deb\nURIs: {url}\nSuites: {repo}\nComponents: {COMPONENT}\nSigned-By: {key_path}\n"
        ),
        key_install: format!("curl -fsSL {key_url} -o {key_path}"),
        url,
        key_url,
    }
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct RepoSources {
    pub url: String,
    pub key_url: String,
    /// `deb [signed-by=...] URL SUITE main` for /etc/apt/sources.list.d/*.list
    pub list_line: String,
    /// The same as a deb822 `.sources` paragraph.
    pub deb822: String,
    /// How to fetch the key to where `signed-by` points.
    pub key_install: String,
}
