//! Trees: a set of files, dirs and symlinks stored as a manifest blob.
//!
//! Tree invariants (checked on put, get and checkout): entries are sorted by
//! path and unique; paths are relative, '/'-separated, without empty, `.` or
//! `..` components; every ancestor of an entry is a `Dir` entry of the tree;
//! modes fit in 0o7777.

use std::fs::{self, File};
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use nix::fcntl::{OFlag, openat};
use nix::sys::stat::{Mode, UtimensatFlags, fchmod, futimens, mkdirat, utimensat};
use nix::sys::time::TimeSpec;
use serde::{Deserialize, Serialize};

use super::{Batch, Cas, CasError, Digest, IoContext, Result, read_error};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tree {
    pub entries: Vec<TreeEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeEntry {
    /// Relative, '/'-separated, normalized.
    pub path: String,
    /// Permission bits (0o7777).
    pub mode: u32,
    pub kind: EntryKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum EntryKind {
    File { digest: Digest, size: u64 },
    Dir,
    Symlink { target: String },
}

/// On-disk manifest: canonical JSON of sorted entries.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest<E> {
    kiln_tree: u32,
    entries: E,
}

const MANIFEST_VERSION: u32 = 1;

impl Tree {
    /// Sorts `entries`, adds missing parent dirs (mode 0o755) and validates.
    pub fn from_entries(mut entries: Vec<TreeEntry>) -> Result<Tree> {
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let mut missing = Vec::new();
        for e in &entries {
            check_path(&e.path)?;
            for p in ancestors(&e.path) {
                if entries
                    .binary_search_by(|x| x.path.as_str().cmp(p))
                    .is_err()
                {
                    missing.push(p.to_string());
                }
            }
        }
        missing.sort();
        missing.dedup();
        entries.extend(missing.into_iter().map(|path| TreeEntry {
            path,
            mode: 0o755,
            kind: EntryKind::Dir,
        }));
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        validate(&entries)?;
        Ok(Tree { entries })
    }

    /// Regular files as (path, digest, size).
    pub fn files(&self) -> impl Iterator<Item = (&str, &Digest, u64)> {
        self.entries.iter().filter_map(|e| match &e.kind {
            EntryKind::File { digest, size } => Some((e.path.as_str(), digest, *size)),
            _ => None,
        })
    }

    /// Look up an entry (entries must be sorted, as every tree this module
    /// returns is).
    pub fn get(&self, path: &str) -> Option<&TreeEntry> {
        self.entries
            .binary_search_by(|e| e.path.as_str().cmp(path))
            .ok()
            .map(|i| &self.entries[i])
    }

    /// Sum of file sizes.
    pub fn total_size(&self) -> u64 {
        self.files().map(|(_, _, s)| s).sum()
    }

    /// Canonical manifest bytes (validates).
    pub fn to_manifest(&self) -> Result<Vec<u8>> {
        let mut entries: Vec<&TreeEntry> = self.entries.iter().collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        validate(entries.iter().copied())?;
        serde_json::to_vec(&Manifest {
            kiln_tree: MANIFEST_VERSION,
            entries,
        })
        .map_err(|e| CasError::InvalidTree(format!("serialize manifest: {e}")))
    }

    /// Parse and validate manifest bytes.
    pub fn from_manifest(bytes: &[u8]) -> Result<Tree> {
        let m: Manifest<Vec<TreeEntry>> = serde_json::from_slice(bytes)
            .map_err(|e| CasError::InvalidTree(format!("bad manifest: {e}")))?;
        if m.kiln_tree != MANIFEST_VERSION {
            return Err(CasError::InvalidTree(format!(
                "unsupported manifest version {}",
                m.kiln_tree
            )));
        }
        validate(&m.entries)?;
        Ok(Tree { entries: m.entries })
    }
}

/// Strict ancestors of a (valid) path, shortest first.
pub(crate) fn ancestors(path: &str) -> impl Iterator<Item = &str> {
    path.match_indices('/').map(move |(i, _)| &path[..i])
}

/// Why `path` is not a valid tree path, if it is not.
pub(crate) fn path_problem(path: &str) -> Option<&'static str> {
    if path.is_empty() {
        return Some("path is empty");
    }
    if path.len() > 4096 {
        return Some("path is longer than 4096 bytes");
    }
    if path.contains('\0') {
        return Some("path contains a NUL byte");
    }
    if path.starts_with('/') {
        return Some("path is absolute");
    }
    for c in path.split('/') {
        match c {
            "" => return Some("path has an empty component"),
            "." => return Some("path contains a '.' component"),
            ".." => return Some("contains a '..' component"),
            c if c.len() > 255 => return Some("path component is longer than 255 bytes"),
            _ => {}
        }
    }
    None
}

fn check_path(path: &str) -> Result<()> {
    match path_problem(path) {
        None => Ok(()),
        Some(reason) => Err(CasError::UnsafePath {
            path: path.to_string(),
            reason: reason.to_string(),
        }),
    }
}

/// Check the tree invariants on entries already in path order.
fn validate<'a>(entries: impl IntoIterator<Item = &'a TreeEntry>) -> Result<()> {
    // Stack of open directories along the current path, to check ancestry
    // in one pass: sorted order puts a dir before everything below it.
    let mut prev: Option<&str> = None;
    let mut dirs: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for e in entries {
        check_path(&e.path)?;
        if let Some(p) = prev
            && p >= e.path.as_str()
        {
            return Err(CasError::InvalidTree(if p == e.path {
                format!("duplicate path {:?}", e.path)
            } else {
                format!("entries not sorted at {:?}", e.path)
            }));
        }
        prev = Some(&e.path);
        if e.mode & !0o7777 != 0 {
            return Err(CasError::InvalidTree(format!(
                "{:?}: mode {:o} has bits outside 0o7777",
                e.path, e.mode
            )));
        }
        if let Some(parent) = e.path.rfind('/').map(|i| &e.path[..i])
            && !dirs.contains(parent)
        {
            return Err(CasError::InvalidTree(format!(
                "{:?}: parent {parent:?} is not a directory entry of the tree",
                e.path
            )));
        }
        match &e.kind {
            EntryKind::Dir => {
                dirs.insert(&e.path);
            }
            EntryKind::Symlink { target } => {
                if target.is_empty() || target.contains('\0') {
                    return Err(CasError::InvalidTree(format!(
                        "{:?}: symlink target is empty or contains NUL",
                        e.path
                    )));
                }
            }
            EntryKind::File { .. } => {}
        }
    }
    Ok(())
}

fn at_mode(bits: u32) -> Mode {
    Mode::from_bits_truncate(bits as libc::mode_t)
}

fn open_dir_at(dir: BorrowedFd<'_>, name: &str) -> io::Result<OwnedFd> {
    Ok(openat(
        dir,
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?)
}

/// Open `rel` below `root` one component at a time, never following symlinks.
fn open_dir_beneath(root: BorrowedFd<'_>, rel: &str) -> io::Result<OwnedFd> {
    let mut parts = rel.split('/');
    let mut cur = open_dir_at(root, parts.next().unwrap_or("."))?;
    for p in parts {
        cur = open_dir_at(cur.as_fd(), p)?;
    }
    Ok(cur)
}

impl Cas {
    /// Store the tree's canonical manifest; returns the tree digest.
    pub fn put_tree(&self, tree: &Tree) -> Result<Digest> {
        self.put_bytes(&tree.to_manifest()?)
    }

    /// Load a manifest (verified) and re-validate every entry.
    pub fn get_tree(&self, d: &Digest) -> Result<Tree> {
        Tree::from_manifest(&self.get_bytes(d)?)
    }

    /// Store a directory tree without following symlinks. `filter(rel_path)`
    /// selects files and symlinks (and dirs to record even when empty);
    /// parents of kept entries are always recorded. The blobs are committed;
    /// the caller stores the tree with `put_tree`.
    pub fn ingest_dir(&self, dir: &Path, filter: impl Fn(&str) -> bool) -> Result<Tree> {
        let mut batch = self.batch();
        let mut entries = Vec::new();
        walk(&mut batch, dir, "", &filter, &mut entries)?;
        batch.commit()?;
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        validate(&entries)?;
        Ok(Tree { entries })
    }

    /// Materialize `tree` into `dest` (absent, or an empty dir). Paths are
    /// created with `openat`/`O_NOFOLLOW`/`O_EXCL` below `dest`, so nothing is
    /// written outside it. `mtime` (seconds) is applied to every entry.
    pub fn checkout(&self, tree: &Tree, dest: &Path, mtime: Option<i64>) -> Result<()> {
        let mut entries: Vec<&TreeEntry> = tree.entries.iter().collect();
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        validate(entries.iter().copied())?;

        match fs::symlink_metadata(dest) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                fs::create_dir_all(dest).ctx(|| format!("create {}", dest.display()))?;
            }
            Err(e) => return Err(e).ctx(|| format!("stat {}", dest.display())),
            Ok(m) => {
                let empty = m.is_dir()
                    && fs::read_dir(dest)
                        .ctx(|| format!("read {}", dest.display()))?
                        .next()
                        .is_none();
                if !empty {
                    return Err(CasError::DestNotEmpty(dest.to_path_buf()));
                }
            }
        }
        let root: OwnedFd = File::open(dest)
            .ctx(|| format!("open {}", dest.display()))?
            .into();
        let times = mtime.map(|t| {
            let ts = TimeSpec::new(t, 0);
            (ts, ts)
        });
        let in_dest = |rel: &str| format!("{}/{rel}", dest.display());

        // Dirs are created 0o700 and get their mode (and mtime) at the end,
        // deepest first, so read-only dirs can still be filled.
        let mut dirs: Vec<&TreeEntry> = Vec::new();
        let mut cached: Option<(&str, OwnedFd)> = None;
        for e in entries {
            let (parent, name) = match e.path.rfind('/') {
                Some(i) => (&e.path[..i], &e.path[i + 1..]),
                None => ("", e.path.as_str()),
            };
            let pfd: BorrowedFd<'_> = if parent.is_empty() {
                root.as_fd()
            } else {
                if cached.as_ref().is_none_or(|(p, _)| *p != parent) {
                    let fd = open_dir_beneath(root.as_fd(), parent)
                        .ctx(|| format!("open {}", in_dest(parent)))?;
                    cached = Some((parent, fd));
                }
                cached.as_ref().expect("set above").1.as_fd()
            };
            match &e.kind {
                EntryKind::Dir => {
                    mkdirat(pfd, name, at_mode(0o700))
                        .map_err(io::Error::from)
                        .ctx(|| format!("mkdir {}", in_dest(&e.path)))?;
                    dirs.push(e);
                }
                EntryKind::File { digest, size } => {
                    let fd = openat(
                        pfd,
                        name,
                        OFlag::O_WRONLY
                            | OFlag::O_CREAT
                            | OFlag::O_EXCL
                            | OFlag::O_NOFOLLOW
                            | OFlag::O_CLOEXEC,
                        at_mode(0o600),
                    )
                    .map_err(io::Error::from)
                    .ctx(|| format!("create {}", in_dest(&e.path)))?;
                    let mut f = File::from(fd);
                    let mut blob = self.open_blob(digest)?;
                    let n = io::copy(&mut blob, &mut f).map_err(|err| match err.kind() {
                        io::ErrorKind::InvalidData => read_error(digest, err),
                        _ => CasError::Io {
                            context: format!("write {}", in_dest(&e.path)),
                            source: err,
                        },
                    })?;
                    if n != *size {
                        return Err(CasError::InvalidTree(format!(
                            "{:?}: blob {digest} has {n} bytes, tree says {size}",
                            e.path
                        )));
                    }
                    fchmod(&f, at_mode(e.mode))
                        .map_err(io::Error::from)
                        .ctx(|| format!("chmod {}", in_dest(&e.path)))?;
                    if let Some((a, m)) = &times {
                        futimens(&f, a, m)
                            .map_err(io::Error::from)
                            .ctx(|| format!("set mtime of {}", in_dest(&e.path)))?;
                    }
                }
                EntryKind::Symlink { target } => {
                    nix::unistd::symlinkat(target.as_str(), pfd, name)
                        .map_err(io::Error::from)
                        .ctx(|| format!("symlink {}", in_dest(&e.path)))?;
                    if let Some((a, m)) = &times {
                        utimensat(pfd, name, a, m, UtimensatFlags::NoFollowSymlink)
                            .map_err(io::Error::from)
                            .ctx(|| format!("set mtime of {}", in_dest(&e.path)))?;
                    }
                }
            }
        }
        drop(cached);
        for e in dirs.iter().rev() {
            let fd = open_dir_beneath(root.as_fd(), &e.path)
                .ctx(|| format!("open {}", in_dest(&e.path)))?;
            fchmod(&fd, at_mode(e.mode))
                .map_err(io::Error::from)
                .ctx(|| format!("chmod {}", in_dest(&e.path)))?;
            if let Some((a, m)) = &times {
                futimens(&fd, a, m)
                    .map_err(io::Error::from)
                    .ctx(|| format!("set mtime of {}", in_dest(&e.path)))?;
            }
        }
        if let Some((a, m)) = &times {
            futimens(&root, a, m)
                .map_err(io::Error::from)
                .ctx(|| format!("set mtime of {}", dest.display()))?;
        }
        Ok(())
    }
}

/// Recursive part of `ingest_dir`; returns whether anything below was kept.
fn walk(
    batch: &mut Batch,
    abs: &Path,
    rel: &str,
    filter: &dyn Fn(&str) -> bool,
    out: &mut Vec<TreeEntry>,
) -> Result<bool> {
    let mut names = Vec::new();
    for e in fs::read_dir(abs).ctx(|| format!("read {}", abs.display()))? {
        names.push(e.ctx(|| format!("read {}", abs.display()))?.file_name());
    }
    names.sort();
    let mut kept_any = false;
    for name in names {
        let child = abs.join(&name);
        let Some(name) = name.to_str() else {
            return Err(CasError::UnsafePath {
                path: child.display().to_string(),
                reason: "file name is not valid UTF-8".into(),
            });
        };
        let rel_child = if rel.is_empty() {
            name.to_string()
        } else {
            format!("{rel}/{name}")
        };
        let meta = fs::symlink_metadata(&child).ctx(|| format!("stat {}", child.display()))?;
        let ft = meta.file_type();
        let mode = meta.mode() & 0o7777;
        if ft.is_dir() {
            let at = out.len();
            out.push(TreeEntry {
                path: rel_child.clone(),
                mode,
                kind: EntryKind::Dir,
            });
            let kept = walk(batch, &child, &rel_child, filter, out)?;
            if kept || filter(&rel_child) {
                kept_any = true;
            } else {
                out.truncate(at);
            }
            continue;
        }
        if !filter(&rel_child) {
            continue;
        }
        let kind = if ft.is_file() {
            let (digest, size) = batch.put_file(&child)?;
            EntryKind::File { digest, size }
        } else if ft.is_symlink() {
            let target = fs::read_link(&child).ctx(|| format!("readlink {}", child.display()))?;
            let Some(target) = target.to_str() else {
                return Err(CasError::UnsafePath {
                    path: rel_child,
                    reason: "symlink target is not valid UTF-8".into(),
                });
            };
            EntryKind::Symlink {
                target: target.to_string(),
            }
        } else {
            use std::os::unix::fs::FileTypeExt;
            let kind = if ft.is_fifo() {
                "fifo"
            } else if ft.is_socket() {
                "socket"
            } else if ft.is_block_device() {
                "block device"
            } else if ft.is_char_device() {
                "character device"
            } else {
                "unknown file type"
            };
            return Err(CasError::UnsupportedFileType { path: child, kind });
        };
        out.push(TreeEntry {
            path: rel_child,
            mode,
            kind,
        });
        kept_any = true;
    }
    Ok(kept_any)
}
