//! Content-addressed artifact store.
//!
//! Owns everything under a store root: blobs in `sha256/<2 hex>/<64 hex>`,
//! staging files in `tmp/`, and tree manifests (which are blobs too).
//!
//! Invariants:
//! - A blob's name is the sha256 of its *uncompressed* content; the file is
//!   exactly one standard zstd frame (level 3), servable unchanged as
//!   `Content-Encoding: zstd`.
//! - A final blob path only ever holds complete, durable content: temp file
//!   in `tmp/` → fsync → rename (no-replace) → fsync of the fan-out dir.
//! - Nothing a [`Batch`] staged is visible under `sha256/` before
//!   [`Batch::commit`]; a dropped batch deletes its temp files.
//! - Readers verify: the last chunk of a blob is only released once its hash
//!   has matched, so a streaming consumer never sees all of a corrupt blob.
//! - Tree paths are relative, normalized and never escape the tree; tar
//!   uploads are validated without touching the filesystem outside the store.

mod archive;
mod pool;
mod read;
mod tree;
mod write;

#[cfg(test)]
mod tests;

use std::fmt;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::{Digest as _, Sha256};

pub use self::archive::{PendingTree, tar_dir, tar_entries};
pub use self::read::{BlobReader, RawReader};
pub use self::tree::{EntryKind, Tree, TreeEntry};
pub use self::write::Batch;

pub type Result<T, E = CasError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error("blob {0} not found")]
    NotFound(Digest),
    #[error("blob {digest} is corrupt: {reason}")]
    Corrupt { digest: Digest, reason: String },
    #[error("invalid digest {input:?}: {reason}")]
    InvalidDigest { input: String, reason: &'static str },
    #[error("unsafe path {path:?}: {reason}")]
    UnsafePath { path: String, reason: String },
    #[error("invalid tree: {0}")]
    InvalidTree(String),
    #[error("unsupported file type at {path}: {kind}")]
    UnsupportedFileType { path: PathBuf, kind: &'static str },
    #[error("checkout destination {0} exists and is not an empty directory")]
    DestNotEmpty(PathBuf),
    #[error("archive exceeds the limit of {limit} bytes")]
    TooLarge { limit: u64 },
    #[error("malformed tar archive: {0}")]
    BadArchive(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
}

impl From<io::Error> for CasError {
    fn from(source: io::Error) -> CasError {
        CasError::Io {
            context: "I/O error".into(),
            source,
        }
    }
}

/// Attach a context string to io errors.
pub(crate) trait IoContext<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, f: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|source| CasError::Io {
            context: f(),
            source,
        })
    }
}

/// sha256 of a blob's uncompressed content.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Digest(pub [u8; 32]);

impl Digest {
    pub fn of(data: &[u8]) -> Digest {
        Digest(Sha256::digest(data).into())
    }

    pub fn to_hex(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut buf = [0u8; 64];
        hex::encode_to_slice(self.0, &mut buf).expect("64-byte buffer");
        f.write_str(std::str::from_utf8(&buf).expect("hex is ascii"))
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = CasError;

    fn from_str(s: &str) -> Result<Digest> {
        let bad = |reason| CasError::InvalidDigest {
            input: s.chars().take(80).collect(),
            reason,
        };
        if s.len() != 64 {
            return Err(bad("expected exactly 64 hex characters"));
        }
        if !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad("expected only lowercase hex characters [0-9a-f]"));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad("invalid hex"))?;
        Ok(Digest(out))
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Digest, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Digest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sha256 digest as 64 lowercase hex characters")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Digest, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// Handle to a store. Cheap to clone; all clones share one staging dir.
#[derive(Clone)]
pub struct Cas {
    inner: Arc<Inner>,
}

struct Inner {
    root: PathBuf,
    /// `root/sha256`
    blobs: PathBuf,
    /// `root/tmp`: staging files, named `<prefix>-<seq>`.
    tmp: PathBuf,
    tmp_dir: File,
    /// Temp name prefix unique to this handle.
    prefix: String,
    /// `root/tmp.lock`, held shared for the handle's lifetime: `open` only
    /// cleans `tmp/` when it can take it exclusively, i.e. no live handle
    /// (in any process) can own a file there.
    _lock: File,
    fanout_ready: [AtomicBool; 256],
    seq: AtomicU64,
    workers: u32,
}

static INSTANCE_SEQ: AtomicU64 = AtomicU64::new(0);

fn flock(f: &File, op: libc::c_int) -> io::Result<()> {
    // SAFETY: plain syscall on a valid fd.
    if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

pub(crate) fn fsync_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("fsync directory {}", path.display()))
}

impl Cas {
    /// Open (creating if needed) the store at `root`, and delete staging
    /// files left behind by crashed processes.
    pub fn open(root: &Path) -> Result<Cas> {
        let blobs = root.join("sha256");
        let tmp = root.join("tmp");
        for d in [&blobs, &tmp] {
            fs::create_dir_all(d).ctx(|| format!("create {}", d.display()))?;
        }
        fsync_dir(root)?;

        let lock_path = root.join("tmp.lock");
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .ctx(|| format!("open {}", lock_path.display()))?;
        if flock(&lock, libc::LOCK_EX | libc::LOCK_NB).is_ok() {
            // No other live handle: anything in tmp/ was left by a crash.
            clean_stale(&tmp)?;
        }
        flock(&lock, libc::LOCK_SH).ctx(|| format!("lock {}", lock_path.display()))?;
        let tmp_dir = File::open(&tmp).ctx(|| format!("open {}", tmp.display()))?;

        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let prefix = format!(
            "{}.{}.{nanos:x}",
            std::process::id(),
            INSTANCE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let workers = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);

        Ok(Cas {
            inner: Arc::new(Inner {
                root: root.to_path_buf(),
                blobs,
                tmp,
                tmp_dir,
                prefix,
                _lock: lock,
                fanout_ready: std::array::from_fn(|_| AtomicBool::new(false)),
                seq: AtomicU64::new(0),
                workers,
            }),
        })
    }

    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    fn blob_path(&self, d: &Digest) -> PathBuf {
        let hex = d.to_string();
        self.inner.blobs.join(&hex[..2]).join(hex)
    }

    pub fn contains(&self, d: &Digest) -> bool {
        fs::symlink_metadata(self.blob_path(d)).is_ok_and(|m| m.is_file())
    }

    /// Size of the compressed blob on disk.
    pub fn stored_size(&self, d: &Digest) -> Result<u64> {
        match fs::metadata(self.blob_path(d)) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(CasError::NotFound(*d)),
            Err(e) => Err(e).ctx(|| format!("stat blob {d}")),
        }
    }

    fn open_blob_file(&self, d: &Digest) -> Result<File> {
        match File::open(self.blob_path(d)) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Err(CasError::NotFound(*d)),
            Err(e) => Err(e).ctx(|| format!("open blob {d}")),
        }
    }

    /// Whole content, verified against the digest.
    pub fn get_bytes(&self, d: &Digest) -> Result<Vec<u8>> {
        let mut r = self.open_blob(d)?;
        // The header's size is untrusted until verified: cap the reservation.
        let mut out = Vec::with_capacity(r.len_hint().unwrap_or(0).min(64 << 20) as usize);
        r.read_to_end(&mut out).map_err(|e| read_error(d, e))?;
        Ok(out)
    }

    /// Decompress and hash the whole blob.
    pub fn verify(&self, d: &Digest) -> Result<()> {
        let mut r = self.open_blob(d)?;
        io::copy(&mut r, &mut io::sink()).map_err(|e| read_error(d, e))?;
        Ok(())
    }

    /// All blobs in the store, sorted.
    pub fn list(&self) -> Result<Vec<Digest>> {
        let mut out = Vec::new();
        let blobs = &self.inner.blobs;
        for fan in fs::read_dir(blobs).ctx(|| format!("read {}", blobs.display()))? {
            let fan = fan.ctx(|| format!("read {}", blobs.display()))?;
            let fan_name = fan.file_name();
            let Some(prefix) = fan_name.to_str().filter(|n| n.len() == 2) else {
                continue;
            };
            let dir = fan.path();
            for f in fs::read_dir(&dir).ctx(|| format!("read {}", dir.display()))? {
                let f = f.ctx(|| format!("read {}", dir.display()))?;
                if let Some(d) = f
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<Digest>().ok())
                    && d.to_string().starts_with(prefix)
                {
                    out.push(d);
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// Delete a blob (for GC). Returns whether it existed. Not fsync'd: a
    /// removal lost in a crash only leaves garbage behind.
    pub fn remove(&self, d: &Digest) -> Result<bool> {
        match fs::remove_file(self.blob_path(d)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e).ctx(|| format!("remove blob {d}")),
        }
    }
}

/// Map a reader error for blob `d` to a typed error.
fn read_error(d: &Digest, e: io::Error) -> CasError {
    if e.kind() == io::ErrorKind::InvalidData {
        CasError::Corrupt {
            digest: *d,
            reason: e.to_string(),
        }
    } else {
        CasError::Io {
            context: format!("read blob {d}"),
            source: e,
        }
    }
}

/// Remove everything in `tmp` (caller holds the exclusive lock).
fn clean_stale(tmp: &Path) -> Result<()> {
    for e in fs::read_dir(tmp).ctx(|| format!("read {}", tmp.display()))? {
        let path = e.ctx(|| format!("read {}", tmp.display()))?.path();
        let res = match fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => fs::remove_dir_all(&path),
            Ok(_) => fs::remove_file(&path),
            Err(e) => Err(e),
        };
        match res {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(e).ctx(|| format!("remove stale {}", path.display()));
            }
            _ => {}
        }
    }
    Ok(())
}
