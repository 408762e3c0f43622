//! Signed apt repositories: from `.deb` files to the bytes of every file under
//! `dists/<suite>/`, signed with a per-project OpenPGP key, without external tools.
//!
//! Owns the glue ([`publish`]) and the shared parallel helper; the parts live in
//! [`deb`] (reading `.deb`s), [`apt`] (indexes and `Release`) and [`sign`] (OpenPGP).
//! The dnf side is [`rpm`](self::rpm): `rpm::inspect` on upload (keep its
//! `Fragments`), `rpm::sign`, and `rpm::build_repodata` on publish.
//!
//! Typical use from a server that stores blobs by SHA-256:
//! 1. On upload: `deb::inspect(reader)` → `apt::pool_filename` → `apt::Stanza::new`;
//!    keep the `Stanza` (keyed by the `.deb`'s SHA-256).
//! 2. On publish: `publish(&cfg, &stanzas, now, &key, &mut cache)` and write the files
//!    in the returned order (by-hash objects first, `InRelease` last), which makes a
//!    publish atomic for apt clients that use `Acquire-By-Hash`.

pub mod apt;
pub mod deb;
pub mod rpm;
pub mod sign;

use time::OffsetDateTime;

pub use self::rpm::{Fragments, RepodataCache, RpmError, RpmInfo};
pub use apt::{AptError, Index, IndexCache, PoolEntry, RepoFile, Stanza, SuiteConfig};
pub use deb::{Control, DebError, DebInfo};
pub use sign::{RepoKey, SignError};

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error(transparent)]
    Apt(#[from] AptError),
    #[error("signing: {0}")]
    Sign(#[from] SignError),
}

/// Builds and signs a suite. Returns every file to write, in a safe write order:
/// `by-hash` objects, `Packages*`, `Release`, `Release.gpg`, then `InRelease`.
pub fn publish<'a>(
    cfg: &SuiteConfig,
    stanzas: impl IntoIterator<Item = &'a Stanza>,
    date: OffsetDateTime,
    key: &RepoKey,
    cache: &mut IndexCache,
) -> Result<Vec<RepoFile>, PublishError> {
    let index = apt::build_index(cfg, stanzas, date, cache)?;
    let in_release = key.clearsign(&index.release)?;
    let release_gpg = key.detached_sign(index.release.as_bytes())?;
    let dir = format!("dists/{}", cfg.suite);
    let mut files = index.files;
    for (name, data) in [
        ("Release", index.release),
        ("Release.gpg", release_gpg),
        ("InRelease", in_release),
    ] {
        let data = bytes::Bytes::from(data.into_bytes());
        files.push(RepoFile::new(format!("{dir}/{name}"), data));
    }
    Ok(files)
}

/// Maps `f` over `items` on all cores, keeping order. Plain scoped std threads with an
/// atomic work index: the loops here are embarrassingly parallel, which does not
/// justify a dependency on rayon.
pub fn par_map<T: Sync, U: Send>(items: &[T], f: impl Fn(&T) -> U + Sync) -> Vec<U> {
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(items.len());
    if threads <= 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Option<U>>> = Mutex::new((0..items.len()).map(|_| None).collect());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut local = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { break };
                    local.push((i, f(item)));
                }
                let mut all = results.lock().unwrap_or_else(|e| e.into_inner());
                for (i, r) in local {
                    all[i] = Some(r);
                }
            });
        }
    });
    results
        .into_inner()
        .unwrap_or_else(|e| e.into_inner())
        .into_iter()
        .map(|r| r.expect("every index is visited once"))
        .collect()
}
