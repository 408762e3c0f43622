//! The hub's cache of downloaded Build-Depends: `.deb` files fetched from
//! the URLs apt resolved inside a build's sandbox (which has no network),
//! verified by the SHA256 apt gave, and handed to the next phase read-only.
//! A second build with the same Build-Depends downloads nothing.
//!
//! What must stay true: a file appears under its name in the cache only
//! after its size and SHA256 matched (temp file, fsync, rename), so the
//! cache never holds a partial or forged .deb; names never leave the dir.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};

use crate::hub::Hub;

/// Downloads at once.
const PARALLEL: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DepsError {
    #[error("apt's list has a line kiln cannot read: {0:?}")]
    BadLine(String),
    #[error("{url}: {why}")]
    Fetch { url: String, why: String },
    #[error("{0}: {1}")]
    Io(String, std::io::Error),
}

/// One .deb apt wants: `'URI' FILE SIZE SHA256:hex`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wanted {
    pub url: String,
    pub file: String,
    pub size: u64,
    pub sha256: [u8; 32],
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
        if !name_ok || !(url.starts_with("http://") || url.starts_with("https://")) {
            return Err(bad());
        }
        out.push(Wanted {
            url: url.to_string(),
            file: file.to_string(),
            size: size.parse().map_err(|_| bad())?,
            sha256,
        });
    }
    Ok(out)
}

/// The cache dir, with the `partial/` apt insists on (readable by builds).
pub fn cache_dir(hub: &Hub) -> PathBuf {
    let dir = hub.data_dir().join("debcache");
    let _ = std::fs::create_dir_all(dir.join("partial"));
    dir
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct FetchStats {
    pub total: usize,
    pub downloaded: usize,
    pub downloaded_bytes: u64,
    pub cached: usize,
}

/// Makes every .deb of `list` present in `cache`, downloading what is missing.
pub async fn fetch(cache: &Path, list: &str) -> Result<FetchStats, DepsError> {
    let wanted = parse(list)?;
    let mut stats = FetchStats {
        total: wanted.len(),
        ..Default::default()
    };
    let missing: Vec<Wanted> = wanted
        .into_iter()
        .filter(|w| std::fs::metadata(cache.join(&w.file)).map(|m| m.len()).ok() != Some(w.size))
        .collect();
    stats.cached = stats.total - missing.len();
    let client = reqwest::Client::new();
    let mut pending = missing.iter();
    loop {
        let batch: Vec<&Wanted> = pending.by_ref().take(PARALLEL).collect();
        if batch.is_empty() {
            break;
        }
        let results =
            futures_util::future::join_all(batch.iter().map(|w| download(&client, cache, w))).await;
        for (w, r) in batch.iter().zip(results) {
            r?;
            stats.downloaded += 1;
            stats.downloaded_bytes += w.size;
        }
    }
    Ok(stats)
}

async fn download(client: &reqwest::Client, cache: &Path, w: &Wanted) -> Result<(), DepsError> {
    use tokio::io::AsyncWriteExt as _;
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let fail = |why: String| DepsError::Fetch {
        url: w.url.clone(),
        why,
    };
    let tmp = cache.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let mut resp = client
        .get(&w.url)
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| fail(e.to_string()))?;
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
        tokio::fs::rename(&tmp, cache.join(&w.file))
            .await
            .map_err(io)
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
            "'http://deb.debian.org/debian/pool/main/a/autoconf/autoconf_2.71-3_all.deb' autoconf_2.71-3_all.deb 313420 SHA256:{h}\n"
        );
        let w = parse(&list).unwrap();
        assert_eq!(w.len(), 1);
        assert_eq!(w[0].file, "autoconf_2.71-3_all.deb");
        assert_eq!(w[0].size, 313420);
        for bad in [
            format!("'http://x/a.deb' ../a.deb 1 SHA256:{h}"),
            format!("'file:/etc/a.deb' a.deb 1 SHA256:{h}"),
            "'http://x/a.deb' a.deb 1 MD5Sum:00".to_string(),
            format!("'http://x/a.deb' a.deb nope SHA256:{h}"),
        ] {
            assert!(parse(&bad).is_err(), "{bad}");
        }
    }
}
