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
use crate::model::{BuildId, Repo, RepoAdd, RepoDeb, RepoFileRef, RepoRpm};
use crate::publish::{self, IndexCache, PoolEntry, RepoKey, Stanza, SuiteConfig};

/// The one component kiln's repos publish.
pub const COMPONENT: &str = "main";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("{path}: not a usable .deb: {why}")]
    BadDeb { path: String, why: String },
    #[error("{path}: not a usable RPM: {why}")]
    BadRpm { path: String, why: String },
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

/// Reads a built RPM from the store; when `key` is given, signs it (a v4
/// header signature, so `gpgcheck=1` passes), stores the signed file and
/// renders its repodata fragments from it. Without a key (a remote worker
/// checking its own outputs) the file is only read and checked.
pub fn rpm_for_repo(
    cas: &Cas,
    path: &str,
    digest: &Digest,
    build: BuildId,
    key: Option<&RepoKey>,
) -> Result<RepoRpm, RepoError> {
    let bad = |why: String| RepoError::BadRpm {
        path: path.to_string(),
        why,
    };
    let mut bytes = cas.get_bytes(digest)?;
    let mut stored = *digest;
    if let Some(key) = key {
        bytes = publish::rpm::sign(&bytes, key).map_err(|e| bad(e.to_string()))?;
        stored = cas.put_bytes(&bytes)?;
    }
    let info = publish::rpm::inspect(&bytes).map_err(|e| bad(e.to_string()))?;
    if path.ends_with(".src.rpm") != (info.arch == "src") {
        return Err(bad(format!(
            "its name and its header disagree on whether it is a source RPM (arch {})",
            info.arch
        )));
    }
    Ok(RepoRpm {
        name: info.name,
        epoch: info.epoch,
        version: info.version,
        release: info.release,
        arch: info.arch,
        location: info.location,
        digest: stored,
        size: info.size,
        provides: info.provides,
        requires: info.requires,
        fragments: info.fragments,
        build,
    })
}

/// What a successful task's artifacts add to its target's repo: its
/// `.deb`s and RPMs (source RPMs too), read, checked and (RPMs, on the hub)
/// signed with the project's key. `sign` is false where the key is not
/// (a remote worker checking its outputs before it reports them).
pub async fn packages_for_repo(
    hub: &Arc<Hub>,
    artifacts: &[crate::model::Artifact],
    build: BuildId,
    target: &crate::model::Target,
    sign: bool,
) -> Result<RepoAdd, RepoError> {
    let pick = |ext: &str| -> Vec<(String, Digest)> {
        artifacts
            .iter()
            .filter(|a| a.path.ends_with(ext))
            .map(|a| (a.path.clone(), a.digest))
            .collect()
    };
    let (debs, rpms) = (pick(".deb"), pick(".rpm"));
    let (h, project, repo) = (hub.clone(), target.project.clone(), target.repo.clone());
    tokio::task::spawn_blocking(move || {
        let key = match (sign, rpms.is_empty()) {
            (true, false) => Some(project_key(&h, &project)?),
            _ => None,
        };
        Ok(RepoAdd {
            debs: debs
                .iter()
                .map(|(path, digest)| deb_for_repo(&h.cas, path, digest, build))
                .collect::<Result<_, _>>()?,
            rpms: rpms
                .iter()
                .map(|(path, digest)| rpm_for_repo(&h.cas, path, digest, build, key.as_ref()))
                .collect::<Result<_, _>>()?,
            project,
            repo,
        })
    })
    .await
    .map_err(|e| RepoError::Publish("task".into(), e.to_string()))?
}

/// The project's signing key.
fn project_key(hub: &Hub, project: &str) -> Result<RepoKey, RepoError> {
    let key = hub
        .db
        .project_key(project)?
        .ok_or_else(|| RepoError::NoKey(project.to_string()))?;
    RepoKey::from_armored_secret(&key)
        .map_err(|e| RepoError::Publish(project.into(), e.to_string()))
}

/// What a repo's publishes keep for the next one: compressed chunks of
/// its apt indexes and of its repodata.
#[derive(Default)]
struct Caches {
    apt: IndexCache,
    rpm: publish::rpm::RepodataCache,
}

/// The RPMs of `repo` that satisfy `requires` (capability names), with
/// what they require from the same repo, each once. Names the repo does
/// not provide are left to the buildroot.
pub fn build_requires<'a>(repo: &'a [RepoRpm], requires: &[String]) -> Vec<&'a RepoRpm> {
    let mut picked: Vec<&RepoRpm> = Vec::new();
    let mut wanted: Vec<&str> = requires.iter().map(String::as_str).collect();
    let mut seen = std::collections::HashSet::new();
    while let Some(cap) = wanted.pop() {
        if !seen.insert(cap) {
            continue;
        }
        // The newest build among the providers (a repo keeps one per name and arch).
        let Some(p) = repo
            .iter()
            .filter(|p| p.arch != "src" && p.provides.iter().any(|n| n == cap))
            .max_by_key(|p| p.build)
        else {
            continue;
        };
        if !picked.iter().any(|q| std::ptr::eq(*q, p)) {
            picked.push(p);
            wanted.extend(p.requires.iter().map(String::as_str));
        }
    }
    picked
}

/// A repo's publish lock, holding its caches.
type RepoSlot = Arc<tokio::sync::Mutex<Caches>>;

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
    cache: &mut Caches,
) -> Result<Repo, RepoError> {
    let name = format!("{project}/{repo}");
    let r = hub
        .db
        .repo(project, repo)?
        .ok_or_else(|| DbError::NotFound(format!("repo {name}")))?;
    let debs = hub.db.repo_debs(project, repo)?;
    let rpms = hub.db.repo_rpms(project, repo)?;
    let key = project_key(hub, project)?;
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
    let mut files = publish::publish(&cfg, &stanzas, now, &key, &mut cache.apt)
        .map_err(|e| RepoError::Publish(name.clone(), e.to_string()))?;
    // dnf's repodata, for a repo that holds RPMs (repomd.xml comes last).
    if !rpms.is_empty() {
        let repodata = publish::rpm::build_repodata(
            rpms.iter().map(|p| &p.fragments),
            r.revision,
            now.unix_timestamp(),
            &key,
            &mut cache.rpm,
        )
        .map_err(|e| RepoError::Publish(name.clone(), e.to_string()))?;
        files.extend(repodata);
    }
    // Blobs first, durable; the database switch names only stored blobs.
    let mut batch = hub.cas.batch();
    let mut refs = Vec::with_capacity(files.len() + debs.len() + rpms.len());
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
    for p in &rpms {
        refs.push((
            p.location.clone(),
            RepoFileRef {
                digest: p.digest,
                size: p.size,
            },
        ));
    }
    let published = hub.db.record_publish(project, repo, r.revision, &refs)?;
    tracing::info!(repo = %name, revision = r.revision, debs = debs.len(), rpms = rpms.len(), "published");
    Ok(published)
}

/// The lines that make apt use a repo (one-line and deb822 forms) and
/// dnf's `.repo` file.
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
        dnf_repo_url: format!("{base_url}/repos/{project}/{repo}.repo"),
        dnf_repo: dnf_repo_file(&url, &key_url, project, repo),
        url,
        key_url,
    }
}

/// The `.repo` file that makes dnf use a repo: packages and repodata both
/// signature-checked against the project's key.
pub fn dnf_repo_file(url: &str, key_url: &str, project: &str, repo: &str) -> String {
    format!(
        "[kiln-{project}-{repo}]\nname=kiln {project} {repo}\nbaseurl={url}/\nenabled=1\n\
         gpgcheck=1\nrepo_gpgcheck=1\ngpgkey={key_url}\nmetadata_expire=60\n"
    )
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
    /// Where dnf users fetch the `.repo` file (into /etc/yum.repos.d/).
    pub dnf_repo_url: String,
    /// The `.repo` file itself.
    pub dnf_repo: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rpm(
        name: &str,
        arch: &str,
        build: BuildId,
        provides: &[&str],
        requires: &[&str],
    ) -> RepoRpm {
        RepoRpm {
            name: name.into(),
            epoch: 0,
            version: "1".into(),
            release: "1".into(),
            arch: arch.into(),
            location: format!("Packages/x/{name}-1-1.{arch}.rpm"),
            digest: Digest::of(name.as_bytes()),
            size: 1,
            provides: provides.iter().map(|s| s.to_string()).collect(),
            requires: requires.iter().map(|s| s.to_string()).collect(),
            fragments: publish::rpm::Fragments {
                primary: String::new(),
                filelists: String::new(),
                other: String::new(),
            },
            build,
        }
    }

    #[test]
    fn build_requires_follow_the_repo_and_leave_the_rest_to_the_root() {
        let repo = [
            rpm(
                "liba",
                "x86_64",
                1,
                &["liba", "liba.so.1()(64bit)"],
                &["libc.so.6()(64bit)"],
            ),
            rpm(
                "liba-devel",
                "x86_64",
                2,
                &["liba-devel", "pkgconfig(a)"],
                &["liba.so.1()(64bit)"],
            ),
            rpm(
                "tool",
                "noarch",
                3,
                &["tool", "/usr/bin/tool"],
                &["tool-data"],
            ),
            rpm("tool-data", "noarch", 4, &["tool-data"], &[]),
            // A source package provides nothing installable.
            rpm("unrelated", "src", 5, &["gcc"], &[]),
        ];
        let want = |reqs: &[&str]| {
            let reqs: Vec<String> = reqs.iter().map(|s| s.to_string()).collect();
            let mut names: Vec<&str> = build_requires(&repo, &reqs)
                .iter()
                .map(|p| p.name.as_str())
                .collect();
            names.sort();
            names
        };
        assert_eq!(want(&["pkgconfig(a)", "gcc"]), ["liba", "liba-devel"]);
        assert_eq!(want(&["/usr/bin/tool"]), ["tool", "tool-data"]);
        assert!(want(&["gcc", "make"]).is_empty());
        // Each package once, however many requirements name it.
        assert_eq!(
            want(&["liba", "liba.so.1()(64bit)", "liba-devel"]),
            ["liba", "liba-devel"]
        );
    }
}
