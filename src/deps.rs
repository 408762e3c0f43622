//! The Build-Depends of a `deb` task, gathered by the hub: apt resolves
//! them inside the build's sandbox (which has no network) to a list of
//! `.deb`s; the hub downloads what its cache lacks, verified by the SHA256
//! apt gave, takes the project's own packages from the store, and lays them
//! out for the install phase, which sees them read-only.
//! A second build with the same Build-Depends downloads nothing.
//!
//! What must stay true: the cache is content-addressed
//! (`debcache/sha256/<hex>`), a file appears there only after its size and
//! SHA256 matched (temp file, fsync, rename), so it never holds a partial or
//! forged .deb, and two builds wanting different files of the same name
//! never meet; the names apt wants exist only in the task's own directory.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::cas::{Cas, Digest};

/// Downloads at once.
const PARALLEL: usize = 4;
/// Where a task sees its project's repo (a flat apt repo, index only).
pub const PROJECT_REPO_DIR: &str = "/var/lib/kiln-project";

#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    #[error("apt's list has a line kiln cannot read: {0:?}")]
    BadLine(String),
    #[error("{url}: {why}")]
    Fetch { url: String, why: String },
    #[error("{0} is not in the project's repo any more")]
    NotInRepo(String),
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
    #[error(transparent)]
    Cas(#[from] crate::cas::CasError),
}

/// One .deb apt wants: `'URI' FILE SIZE SHA256:hex`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub from: From,
    pub file: String,
    pub size: u64,
    pub sha256: [u8; 32],
}

/// Where a wanted .deb comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum From {
    /// A mirror of the buildroot's apt sources.
    Url(String),
    /// The project's repo: the pool path of one of its packages.
    Project(String),
}

/// Parses `apt-get --print-uris` output (other lines are ignored).
pub fn parse(list: &str) -> Result<Vec<Wanted>, DepsError> {
    let mut out = Vec::new();
    for line in list.lines().filter(|l| l.starts_with('\'')) {
        let bad = || DepsError::BadLine(line.to_string());
        let (url, rest) = line[1..].split_once('\'').ok_or_else(bad)?;
        let mut it = rest.split_whitespace();
        let (file, size, hash) = (
            it.next().ok_or_else(bad)?,
            it.next().ok_or_else(bad)?,
            it.next().ok_or_else(bad)?,
        );
        let hex = hash.strip_prefix("SHA256:").ok_or_else(bad)?;
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(hex, &mut sha256).map_err(|_| bad())?;
        let name_ok = file.ends_with(".deb")
            && !file.starts_with('.')
            && file
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._+-~%".contains(&b));
        let from = if url.starts_with("http://") || url.starts_with("https://") {
            From::Url(url.to_string())
        } else {
            let pool = url
                .strip_prefix("file:")
                .and_then(|p| p.strip_prefix(PROJECT_REPO_DIR))
                .and_then(|p| p.strip_prefix('/'))
                .map(unescape)
                .filter(|p| p.starts_with("pool/") && !p.split('/').any(|c| c == ".." || c == "."))
                .ok_or_else(bad)?;
            From::Project(pool)
        };
        if !name_ok {
            return Err(bad());
        }
        out.push(Wanted {
            from,
            file: file.to_string(),
            size: size.parse().map_err(|_| bad())?,
            sha256,
        });
    }
    Ok(out)
}

/// Undoes apt's `%xx` quoting of URIs.
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (
            b[i],
            b.get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok()),
        ) {
            (b'%', Some(h)) if u8::from_str_radix(h, 16).is_ok() => {
                out.push(u8::from_str_radix(h, 16).unwrap_or(b'%'));
                i += 3;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The hub's content-addressed cache of downloaded .debs.
pub fn cache_dir(data: &Path) -> PathBuf {
    data.join("debcache").join("sha256")
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FetchStats {
    pub total: usize,
    pub downloaded: usize,
    pub downloaded_bytes: u64,
    pub cached: usize,
    pub from_project: usize,
}

impl std::fmt::Display for FetchStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} .deb(s), {} downloaded ({} bytes), {} from the cache, {} from the project's repo",
            self.total, self.downloaded, self.downloaded_bytes, self.cached, self.from_project
        )
    }
}

/// Where the files a cache lacks come from.
#[derive(Clone, Copy)]
pub enum Source<'a> {
    /// The hub: mirror files from the mirrors; project packages are in its
    /// store.
    Mirrors,
    /// A remote worker: both through its hub (which keeps the farm's one
    /// cache of mirror files), so a worker needs no way to the mirrors.
    Hub(&'a crate::client::Client),
}

/// Makes every .deb of `list` present under its apt name in `into` (with
/// the `partial/` apt insists on): mirror files from `cache`, downloading
/// what is missing; the project's packages from the store, by pool path.
pub async fn fetch(
    cache: &Path,
    into: &Path,
    list: &str,
    cas: &Cas,
    project: &HashMap<String, Digest>,
    source: Source<'_>,
) -> Result<FetchStats, DepsError> {
    let io = |p: &Path| {
        let p = p.display().to_string();
        move |e| DepsError::Io(p, e)
    };
    for d in [cache, &into.join("partial")] {
        std::fs::create_dir_all(d).map_err(io(d))?;
    }
    let wanted = parse(list)?;
    let mut stats = FetchStats {
        total: wanted.len(),
        ..Default::default()
    };
    let mut missing = Vec::new();
    for w in &wanted {
        match &w.from {
            From::Project(pool) => {
                let digest = project
                    .get(pool)
                    .ok_or_else(|| DepsError::NotInRepo(pool.clone()))?;
                if let Source::Hub(hub) = source {
                    hub.fetch_blob(cas, digest)
                        .await
                        .map_err(|e| DepsError::Fetch {
                            url: pool.clone(),
                            why: e.to_string(),
                        })?;
                }
                let (cas, w2, dest) = (cas.clone(), w.clone(), into.join(&w.file));
                let digest = *digest;
                tokio::task::spawn_blocking(move || from_store(&cas, &digest, &w2, &dest))
                    .await
                    .map_err(|e| DepsError::Io(w.file.clone(), std::io::Error::other(e)))??;
                stats.from_project += 1;
            }
            From::Url(url) => {
                let have = std::fs::metadata(cache.join(hex::encode(w.sha256))).map(|m| m.len());
                if have.ok() == Some(w.size) {
                    stats.cached += 1;
                } else {
                    missing.push((url.clone(), w));
                }
            }
        }
    }
    let client = reqwest::Client::new();
    let mut pending = missing.iter();
    loop {
        let batch: Vec<_> = pending.by_ref().take(PARALLEL).collect();
        if batch.is_empty() {
            break;
        }
        let results = futures_util::future::join_all(
            batch
                .iter()
                .map(|(url, w)| download(source, &client, cache, url, w)),
        )
        .await;
        for ((_, w), r) in batch.iter().zip(results) {
            r?;
            stats.downloaded += 1;
            stats.downloaded_bytes += w.size;
        }
    }
    // The names apt looks for, linked to the cache's content.
    for w in wanted.iter().filter(|w| matches!(w.from, From::Url(_))) {
        let (src, dest) = (cache.join(hex::encode(w.sha256)), into.join(&w.file));
        let _ = std::fs::remove_file(&dest);
        if std::fs::hard_link(&src, &dest).is_err() {
            std::fs::copy(&src, &dest).map_err(io(&dest))?;
        }
    }
    Ok(stats)
}

/// Copies a project package out of the store. The store's digest is the
/// file's SHA256 (and reading verifies it), so apt's expectation is checked
/// without hashing again.
fn from_store(cas: &Cas, digest: &Digest, w: &Wanted, dest: &Path) -> Result<(), DepsError> {
    if digest.0 != w.sha256 {
        return Err(DepsError::Fetch {
            url: w.file.clone(),
            why: "the project's copy differs from what apt expects".into(),
        });
    }
    let io = |e| DepsError::Io(dest.display().to_string(), e);
    let mut f = std::fs::File::create(dest).map_err(io)?;
    let copied = std::io::copy(&mut cas.open_blob(digest)?, &mut f);
    if copied.is_err() {
        let _ = std::fs::remove_file(dest);
    }
    copied.map_err(io)?;
    Ok(())
}

/// Puts the mirror file `url`, which must be `w`, into `cache` unless it
/// is there; the cached file's path. The hub does this for its workers.
pub async fn cached(cache: &Path, url: &str, w: &Wanted) -> Result<PathBuf, DepsError> {
    let path = cache.join(hex::encode(w.sha256));
    if std::fs::metadata(&path).map(|m| m.len()).ok() != Some(w.size) {
        std::fs::create_dir_all(cache)
            .map_err(|e| DepsError::Io(cache.display().to_string(), e))?;
        download(Source::Mirrors, &reqwest::Client::new(), cache, url, w).await?;
    }
    Ok(path)
}

/// Downloads `url` (from `source`) into `cache` under its SHA256, after
/// checking its size and SHA256 are `w`'s.
async fn download(
    source: Source<'_>,
    client: &reqwest::Client,
    cache: &Path,
    url: &str,
    w: &Wanted,
) -> Result<(), DepsError> {
    use tokio::io::AsyncWriteExt as _;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let fail = |why: String| DepsError::Fetch {
        url: url.to_string(),
        why,
    };
    let tmp = cache.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut resp = match source {
        Source::Mirrors => client
            .get(url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| fail(e.to_string()))?,
        Source::Hub(hub) => hub
            .worker_deb(&w.sha256, url, w.size)
            .await
            .map_err(|e| fail(format!("through the hub: {e}")))?,
    };
    let io = |e: std::io::Error| DepsError::Io(tmp.display().to_string(), e);
    let mut f = tokio::fs::File::create(&tmp).await.map_err(io)?;
    let (mut hasher, mut n) = (Sha256::new(), 0u64);
    let result = async {
        while let Some(chunk) = resp.chunk().await.map_err(|e| fail(e.to_string()))? {
            n += chunk.len() as u64;
            if n > w.size {
                return Err(fail(format!("more than the {} bytes apt expects", w.size)));
            }
            hasher.update(&chunk);
            f.write_all(&chunk).await.map_err(io)?;
        }
        if n != w.size || <[u8; 32]>::from(hasher.finalize()) != w.sha256 {
            return Err(fail("size or SHA256 differs from what apt expects".into()));
        }
        f.sync_all().await.map_err(io)?;
        tokio::fs::rename(&tmp, cache.join(hex::encode(w.sha256)))
            .await
            .map_err(io)?;
        crate::cas::fsync_dir(cache)?;
        Ok(())
    }
    .await;
    if result.is_err() {
        let _ = tokio::fs::remove_file(&tmp).await;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_apt_print_uris_and_refuses_odd_lines() {
        let h = "ab".repeat(32);
        let list = format!(
            "'http://deb.debian.org/debian/pool/main/a/autoconf/autoconf_2.71-3_all.deb' autoconf_2.71-3_all.deb 313420 SHA256:{h}\n\
             'file:/var/lib/kiln-project/pool/main/k/kiln-a/kiln-a_1.0%2b1_all.deb' kiln-a_1.0+1_all.deb 7 SHA256:{h}\n"
        );
        let w = parse(&list).unwrap();
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].file, "autoconf_2.71-3_all.deb");
        assert_eq!(w[0].size, 313420);
        assert_eq!(
            w[1].from,
            From::Project("pool/main/k/kiln-a/kiln-a_1.0+1_all.deb".into())
        );
        for bad in [
            format!("'http://x/a.deb' ../a.deb 1 SHA256:{h}"),
            format!("'file:/etc/a.deb' a.deb 1 SHA256:{h}"),
            format!("'file:/var/lib/kiln-project/pool/../../etc/a.deb' a.deb 1 SHA256:{h}"),
            "'http://x/a.deb' a.deb 1 MD5Sum:00".to_string(),
            format!("'http://x/a.deb' a.deb nope SHA256:{h}"),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
    }
}
