//! Ingest: compress + hash into staging files, then commit them into place.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashSet};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};

use sha2::{Digest as _, Sha256};

use super::pool::{Job, Pool};
use super::{Cas, CasError, Digest, IoContext, Result, fsync_dir};

const LEVEL: i32 = 3;
/// A lone input below this is hashed and compressed inline.
const SMALL: usize = 1 << 20;
/// Inputs below this are buffered whole and, once a batch has more than one
/// item, compressed on the batch's worker pool (parallel across files); at
/// or above it, one multithreaded stream.
const LARGE: usize = 32 << 20;
/// Chunk handed from the reader to the hasher thread and the encoder.
const CHUNK: usize = 1 << 20;
/// Chunks in flight to the hasher.
const DEPTH: usize = 4;
/// Start writeback every this many compressed bytes so the final fsync is short.
const WRITEBACK_STEP: u64 = 8 << 20;
/// At or above this many files (or dirs) to sync, one syncfs beats N fsyncs.
const SYNCFS_AT: usize = 16;

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
}

pub(crate) fn compress_small(data: &[u8]) -> io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            let mut z = zstd::bulk::Compressor::new(LEVEL)?;
            z.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))?;
            *c = Some(z);
        }
        // compress2 knows the size, so the frame records its content size.
        c.as_mut().expect("set above").compress(data)
    })
}

/// One staged temp file.
struct Staged {
    digest: Digest,
    tmp: PathBuf,
    /// Kept open for a per-file fsync while the batch is small.
    file: Option<File>,
}

/// Staged writes: blobs become visible only on [`Batch::commit`]; dropping an
/// uncommitted batch deletes its temp files.
pub struct Batch {
    cas: Cas,
    staged: Vec<Staged>,
    seen: HashSet<Digest>,
    /// Started on the second item; see `LARGE`.
    pool: Option<Pool>,
    /// First error of a pooled write, reported by the next call.
    failed: Option<CasError>,
}

impl Cas {
    pub fn batch(&self) -> Batch {
        Batch {
            cas: self.clone(),
            staged: Vec::new(),
            seen: HashSet::new(),
            pool: None,
            failed: None,
        }
    }

    /// Store `data`; durable when this returns.
    pub fn put_bytes(&self, data: &[u8]) -> Result<Digest> {
        let mut b = self.batch();
        let d = b.put_bytes(data)?;
        b.commit()?;
        Ok(d)
    }

    /// Store a stream of unknown length; returns its digest and length.
    pub fn put_reader(&self, r: impl Read) -> Result<(Digest, u64)> {
        let mut b = self.batch();
        let out = b.put_reader(r)?;
        b.commit()?;
        Ok(out)
    }

    /// Store a stream that must yield exactly `size` bytes (recorded in the
    /// zstd frame header).
    pub fn put_reader_sized(&self, r: impl Read, size: u64) -> Result<(Digest, u64)> {
        let mut b = self.batch();
        let out = b.put_reader_sized(r, size)?;
        b.commit()?;
        Ok(out)
    }

    pub fn put_file(&self, path: &Path) -> Result<(Digest, u64)> {
        let mut b = self.batch();
        let out = b.put_file(path)?;
        b.commit()?;
        Ok(out)
    }

    fn new_temp(&self) -> Result<(PathBuf, File)> {
        let n = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let path = self.inner.tmp.join(format!("{}-{n}", self.inner.prefix));
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o444)
            .custom_flags(libc::O_CLOEXEC)
            .open(&path)
            .ctx(|| format!("create temp file {}", path.display()))?;
        Ok((path, f))
    }

    /// Compress `reader` (whose first bytes are `first`) into `out` with zstd
    /// multithreading while a second thread hashes the same chunks.
    fn compress_stream(
        &self,
        out: &File,
        first: Vec<u8>,
        reader: &mut dyn Read,
        size: Option<u64>,
    ) -> io::Result<(Digest, u64)> {
        let mut enc = zstd::stream::write::Encoder::new(Writeback::new(out), LEVEL)?;
        enc.multithread(self.inner.workers)?;
        enc.include_checksum(true)?;
        enc.include_contentsize(true)?;
        enc.set_pledged_src_size(size)?;

        std::thread::scope(|s| {
            let (to_hash, hash_rx) = mpsc::sync_channel::<Arc<Vec<u8>>>(DEPTH);
            let (back_tx, back_rx) = mpsc::channel::<Arc<Vec<u8>>>();
            let hasher = s.spawn(move || {
                let mut h = Sha256::new();
                for buf in hash_rx {
                    h.update(&buf[..]);
                    let _ = back_tx.send(buf);
                }
                Digest(h.finalize().into())
            });

            let mut total = 0u64;
            let mut free: Vec<Vec<u8>> = Vec::new();
            let mut next = Some(first);
            let res: io::Result<()> = (|| {
                loop {
                    let buf = match next.take() {
                        Some(b) => b,
                        None => {
                            while let Ok(a) = back_rx.try_recv() {
                                if let Ok(v) = Arc::try_unwrap(a) {
                                    free.push(v);
                                }
                            }
                            let mut b = free.pop().unwrap_or_else(|| Vec::with_capacity(CHUNK));
                            b.clear();
                            fill(reader, &mut b, CHUNK)?;
                            b
                        }
                    };
                    if buf.is_empty() {
                        return match size {
                            Some(s) if s != total => Err(short_input(s, total)),
                            _ => Ok(()),
                        };
                    }
                    total += buf.len() as u64;
                    if let Some(s) = size
                        && total > s
                    {
                        return Err(short_input(s, total));
                    }
                    let buf = Arc::new(buf);
                    to_hash
                        .send(buf.clone())
                        .map_err(|_| io::Error::other("hasher thread stopped"))?;
                    enc.write_all(&buf)?;
                }
            })();
            drop(to_hash);
            let digest = hasher.join().expect("hasher thread panicked");
            res?;
            let w = enc.finish()?;
            w.flush_tail();
            Ok((digest, total))
        })
    }
}

/// Read until `buf` holds `want` bytes or EOF.
fn fill(r: &mut dyn Read, buf: &mut Vec<u8>, want: usize) -> io::Result<()> {
    while buf.len() < want {
        match (&mut *r).take((want - buf.len()) as u64).read_to_end(buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// File writer that starts asynchronous writeback as it goes.
struct Writeback<'a> {
    file: &'a File,
    written: u64,
    started: u64,
}

impl<'a> Writeback<'a> {
    fn new(file: &'a File) -> Self {
        Writeback {
            file,
            written: 0,
            started: 0,
        }
    }

    fn start(&mut self) {
        let len = self.written - self.started;
        if len > 0 {
            // Advisory; errors surface at fsync.
            // SAFETY: plain syscall on a valid fd.
            unsafe {
                libc::sync_file_range(
                    self.file.as_raw_fd(),
                    self.started as i64,
                    len as i64,
                    libc::SYNC_FILE_RANGE_WRITE,
                );
            }
            self.started = self.written;
        }
    }

    fn flush_tail(mut self) {
        self.start();
    }
}

impl Write for Writeback<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (&mut self.file).write(buf)?;
        self.written += n as u64;
        if self.written - self.started >= WRITEBACK_STEP {
            self.start();
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Batch {
    pub fn cas(&self) -> &Cas {
        &self.cas
    }

    /// Number of temp files staged (deduplicated).
    pub fn len(&self) -> usize {
        self.staged.len()
    }

    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    pub fn put_bytes(&mut self, data: &[u8]) -> Result<Digest> {
        self.check_failed()?;
        if data.len() < SMALL && !self.batching() {
            return self.put_small(data);
        }
        if data.len() < LARGE {
            return self.put_pooled(data.to_vec());
        }
        Ok(self.put_stream(data, Some(data.len() as u64))?.0)
    }

    /// Whether this batch already holds something (then parallelize).
    fn batching(&self) -> bool {
        !self.seen.is_empty() || self.pool.is_some()
    }

    fn check_failed(&mut self) -> Result<()> {
        match self.failed.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Hash and compress inline.
    fn put_small(&mut self, data: &[u8]) -> Result<Digest> {
        let d = Digest::of(data);
        if self.seen.contains(&d) || self.cas.contains(&d) {
            return Ok(d);
        }
        let z = compress_small(data).ctx(|| "zstd compress".into())?;
        let (tmp, mut f) = self.cas.new_temp()?;
        f.write_all(&z).ctx(|| format!("write {}", tmp.display()))?;
        let staged = Staged {
            digest: d,
            tmp,
            file: None,
        };
        self.push(staged, f);
        Ok(d)
    }

    /// Hash here, compress and write on the pool.
    fn put_pooled(&mut self, data: Vec<u8>) -> Result<Digest> {
        let d = Digest::of(&data);
        if self.seen.contains(&d) || self.cas.contains(&d) {
            return Ok(d);
        }
        let (tmp, file) = self.cas.new_temp()?;
        let idx = self.staged.len();
        self.seen.insert(d);
        self.staged.push(Staged {
            digest: d,
            tmp,
            file: None,
        });
        let workers = self.cas.inner.workers as usize;
        let pool = self.pool.get_or_insert_with(|| Pool::new(workers));
        pool.submit(Job { idx, data, file });
        self.harvest(false);
        Ok(d)
    }

    /// Record finished pooled writes (all of them if `wait`).
    fn harvest(&mut self, wait: bool) {
        let Some(pool) = &mut self.pool else { return };
        let keep_fds = self.staged.len() < SYNCFS_AT;
        for (idx, res) in pool.collect(wait) {
            match res {
                Ok(f) => {
                    if keep_fds {
                        self.staged[idx].file = Some(f);
                    }
                }
                Err(e) => {
                    let tmp = &self.staged[idx].tmp;
                    self.failed.get_or_insert(CasError::Io {
                        context: format!("compress into {}", tmp.display()),
                        source: e,
                    });
                }
            }
        }
    }

    /// Verified content of a blob this batch staged, or of one already in
    /// the store. Call after `flush` (pooled writes must be complete).
    pub(crate) fn read_blob(&self, d: &Digest) -> Result<Vec<u8>> {
        let Some(s) = self.staged.iter().find(|s| s.digest == *d) else {
            return self.cas.get_bytes(d);
        };
        let f = File::open(&s.tmp).ctx(|| format!("open {}", s.tmp.display()))?;
        let mut r = super::BlobReader::new(*d, f)?;
        let mut out = Vec::new();
        r.read_to_end(&mut out)
            .map_err(|e| super::read_error(d, e))?;
        Ok(out)
    }

    /// Wait for background writes; reports the first failure.
    pub fn flush(&mut self) -> Result<()> {
        self.harvest(true);
        self.check_failed()
    }

    pub fn put_reader(&mut self, r: impl Read) -> Result<(Digest, u64)> {
        self.put_stream(r, None)
    }

    /// Like `put_reader` but the stream must yield exactly `size` bytes.
    pub fn put_reader_sized(&mut self, r: impl Read, size: u64) -> Result<(Digest, u64)> {
        self.put_stream(r, Some(size))
    }

    /// Store a regular file (symlinks are not followed).
    pub fn put_file(&mut self, path: &Path) -> Result<(Digest, u64)> {
        let f = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .ctx(|| format!("open {}", path.display()))?;
        let meta = f.metadata().ctx(|| format!("stat {}", path.display()))?;
        if !meta.is_file() {
            return Err(CasError::Io {
                context: format!("store {}", path.display()),
                source: io::Error::new(io::ErrorKind::InvalidInput, "not a regular file"),
            });
        }
        // SAFETY: advisory syscall on a valid fd.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        self.put_stream(f, Some(meta.len())).map_err(|e| match e {
            CasError::Io { context, source } => CasError::Io {
                context: format!("{context} (storing {})", path.display()),
                source,
            },
            e => e,
        })
    }

    fn put_stream(&mut self, mut r: impl Read, size: Option<u64>) -> Result<(Digest, u64)> {
        self.check_failed()?;
        let limit = if self.batching() { LARGE } else { SMALL };
        let want = match size {
            Some(s) if s < limit as u64 => s as usize + 1,
            _ => limit,
        };
        let mut first = Vec::with_capacity(want.min(limit));
        fill(&mut r, &mut first, want).ctx(|| "read input".into())?;
        let n = first.len() as u64;
        if size.is_some_and(|s| n > s || (n < limit as u64 && n != s)) {
            return Err(size_mismatch(size.unwrap_or(0)));
        }
        if first.len() < limit {
            let d = if first.len() < SMALL && !self.batching() {
                self.put_small(&first)?
            } else {
                self.put_pooled(first)?
            };
            return Ok((d, n));
        }
        let (tmp, f) = self.cas.new_temp()?;
        let res = self.cas.compress_stream(&f, first, &mut r, size);
        let (d, n) = match res {
            Ok(v) => v,
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                return Err(e).ctx(|| format!("compress into {}", tmp.display()));
            }
        };
        if self.seen.contains(&d) || self.cas.contains(&d) {
            let _ = fs::remove_file(&tmp);
        } else {
            let staged = Staged {
                digest: d,
                tmp,
                file: None,
            };
            self.push(staged, f);
        }
        Ok((d, n))
    }

    fn push(&mut self, mut s: Staged, f: File) {
        self.seen.insert(s.digest);
        if self.staged.len() + 1 < SYNCFS_AT {
            s.file = Some(f);
        } else {
            // Commit will syncfs; don't hold many fds open.
            for old in &mut self.staged {
                old.file = None;
            }
        }
        self.staged.push(s);
    }

    /// Make every staged blob durable and visible. On error, blobs not yet
    /// renamed are deleted with the batch; renamed ones are complete anyway.
    pub fn commit(mut self) -> Result<()> {
        self.flush()?;
        self.pool = None;
        if self.staged.is_empty() {
            return Ok(());
        }
        let inner = &self.cas.inner;
        // 1. temps durable before any rename
        if self.staged.iter().all(|s| s.file.is_some()) {
            for s in &self.staged {
                let f = s.file.as_ref().expect("checked");
                f.sync_all().ctx(|| format!("fsync {}", s.tmp.display()))?;
            }
        } else {
            nix::unistd::syncfs(&inner.tmp_dir)
                .map_err(io::Error::from)
                .ctx(|| format!("syncfs {}", inner.tmp.display()))?;
        }
        // 2. rename into place (never replacing an existing blob)
        let mut dirs = BTreeSet::new();
        while let Some(s) = self.staged.pop() {
            let fan = s.digest.0[0];
            self.cas.ensure_fanout(fan)?;
            let dest = self.cas.blob_path(&s.digest);
            match rename_noreplace(&s.tmp, &dest) {
                Ok(true) => {
                    dirs.insert(fan);
                }
                Ok(false) => {
                    let _ = fs::remove_file(&s.tmp);
                }
                Err(e) => {
                    let _ = fs::remove_file(&s.tmp);
                    return Err(e).ctx(|| format!("rename into {}", dest.display()));
                }
            }
        }
        // 3. renames durable before returning
        if dirs.len() >= SYNCFS_AT {
            let blobs =
                File::open(&inner.blobs).ctx(|| format!("open {}", inner.blobs.display()))?;
            nix::unistd::syncfs(&blobs)
                .map_err(io::Error::from)
                .ctx(|| format!("syncfs {}", inner.blobs.display()))?;
        } else {
            for fan in dirs {
                fsync_dir(&inner.blobs.join(format!("{fan:02x}")))?;
            }
        }
        Ok(())
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Stop the workers first so none writes a temp after it is deleted.
        self.pool = None;
        for s in self.staged.drain(..) {
            let _ = fs::remove_file(&s.tmp);
        }
    }
}

impl Cas {
    /// Create (and make durable) fan-out dir `sha256/<fan>` once per handle.
    fn ensure_fanout(&self, fan: u8) -> Result<()> {
        let ready = &self.inner.fanout_ready[fan as usize];
        if ready.load(Ordering::Acquire) {
            return Ok(());
        }
        let dir = self.inner.blobs.join(format!("{fan:02x}"));
        match fs::create_dir(&dir) {
            Ok(()) => {
                let _ = fs::set_permissions(&dir, fs::Permissions::from_mode(0o755));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).ctx(|| format!("create {}", dir.display())),
        }
        // Also when it already existed: its creator may not have synced yet.
        fsync_dir(&self.inner.blobs)?;
        ready.store(true, Ordering::Release);
        Ok(())
    }
}

/// Rename without replacing. Ok(false): destination already exists.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<bool> {
    use nix::errno::Errno;
    use nix::fcntl::{AT_FDCWD, RenameFlags, renameat2};
    match renameat2(AT_FDCWD, from, AT_FDCWD, to, RenameFlags::RENAME_NOREPLACE) {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(Errno::EINVAL | Errno::ENOSYS) => {
            // Filesystem without RENAME_NOREPLACE: racy check, still safe
            // since a replacing rename swaps in identical complete content.
            if fs::symlink_metadata(to).is_ok() {
                return Ok(false);
            }
            fs::rename(from, to).map(|()| true)
        }
        Err(e) => Err(e.into()),
    }
}

fn short_input(expected: u64, got: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("input length differs from the expected {expected} bytes (got {got})"),
    )
}

fn size_mismatch(expected: u64) -> CasError {
    CasError::Io {
        context: "read input".into(),
        source: io::Error::new(
            io::ErrorKind::InvalidData,
            format!("input length differs from the expected {expected} bytes"),
        ),
    }
}
