//! Tar upload (validated, staged through a [`Batch`]) and `tar_dir`.
//!
//! `ingest_tar` never touches the filesystem outside the store: entries are
//! checked as names and link texts only. Setuid/setgid bits of uploaded
//! entries are cleared.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{self, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::rc::Rc;

use tar::{EntryType, Header};

use super::tree::{EntryKind, Tree, TreeEntry, ancestors};
use super::{Batch, Cas, CasError, Digest, Result};

/// A validated upload whose blobs are staged but not yet visible.
pub struct PendingTree {
    pub tree: Tree,
    /// Largest mtime among the archive's entries (0 if none).
    pub max_mtime: i64,
    batch: Batch,
}

impl PendingTree {
    /// Verified content of file `path` of the upload (before commit); `None`
    /// if the tree has no regular file there.
    pub fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>> {
        match self.tree.get(path) {
            Some(TreeEntry {
                kind: EntryKind::File { digest, .. },
                ..
            }) => self.batch.read_blob(digest).map(Some),
            _ => Ok(None),
        }
    }

    /// Commit the blobs, then store the manifest; returns the tree digest.
    pub fn commit(self) -> Result<Digest> {
        let cas = self.batch.cas().clone();
        self.batch.commit()?;
        cas.put_tree(&self.tree)
    }
}

#[derive(Clone, Copy, PartialEq)]
enum ReadState {
    Ok,
    TooLarge,
    Failed,
}

/// Counts raw bytes and refuses to go past `limit`.
struct Limited<R> {
    inner: R,
    count: u64,
    limit: u64,
    state: Rc<Cell<ReadState>>,
}

impl<R: Read> Read for Limited<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Allow one byte past the limit so "exactly at the limit" is fine.
        let room = (self.limit - self.count.min(self.limit)).saturating_add(1);
        let max = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
        let n = match self.inner.read(&mut buf[..max]) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() != io::ErrorKind::Interrupted {
                    self.state.set(ReadState::Failed);
                }
                return Err(e);
            }
        };
        self.count += n as u64;
        if self.count > self.limit {
            self.state.set(ReadState::TooLarge);
            return Err(io::Error::other("archive too large"));
        }
        Ok(n)
    }
}

struct Node {
    mode: u32,
    kind: EntryKind,
    /// Dir added only as the parent of another entry.
    implicit: bool,
}

fn unsafe_path(path: &str, reason: impl Into<String>) -> CasError {
    CasError::UnsafePath {
        path: path.to_string(),
        reason: reason.into(),
    }
}

/// Normalize an archive path: `./a//b/` → `a/b`; `Ok(None)` if it is empty
/// (the archive root).
fn normalize(raw: &[u8]) -> Result<Option<String>> {
    let shown = String::from_utf8_lossy(raw);
    let Ok(s) = std::str::from_utf8(raw) else {
        return Err(unsafe_path(&shown, "path is not valid UTF-8"));
    };
    if s.starts_with('/') {
        return Err(unsafe_path(s, "is an absolute path"));
    }
    if s.contains('\0') {
        return Err(unsafe_path(s, "path contains a NUL byte"));
    }
    let mut parts = Vec::new();
    for c in s.split('/') {
        match c {
            "" | "." => {}
            ".." => return Err(unsafe_path(s, "contains a '..' component")),
            c => parts.push(c),
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    let norm = parts.join("/");
    if let Some(reason) = super::tree::path_problem(&norm) {
        return Err(unsafe_path(s, reason));
    }
    Ok(Some(norm))
}

/// Lexically resolve `target` from the directory containing `link`; false
/// if it climbs above the root.
fn stays_inside(link: &str, target: &str) -> bool {
    let mut depth = link.matches('/').count() as i64;
    for c in target.split('/') {
        match c {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => depth += 1,
        }
    }
    true
}

/// Resolve `link` through the tree's own symlinks the way the kernel would;
/// false if any step climbs above the root. Dangling components are taken
/// as plain names; a chain longer than the kernel's limit cannot be followed
/// at all and so cannot escape.
fn resolves_inside(nodes: &BTreeMap<String, Node>, link: &str) -> bool {
    let mut stack: Vec<String> = ancestors(link)
        .last()
        .map(|p| p.split('/').map(String::from).collect())
        .unwrap_or_default();
    let Some(Node {
        kind: EntryKind::Symlink { target },
        ..
    }) = nodes.get(link)
    else {
        return true;
    };
    let mut pending: Vec<String> = target.split('/').rev().map(String::from).collect();
    let mut hops = 0;
    while let Some(c) = pending.pop() {
        match c.as_str() {
            "" | "." => {}
            ".." => {
                if stack.pop().is_none() {
                    return false;
                }
            }
            _ => {
                stack.push(c);
                let here = stack.join("/");
                if let Some(Node {
                    kind: EntryKind::Symlink { target },
                    ..
                }) = nodes.get(&here)
                {
                    hops += 1;
                    if hops > 40 {
                        return true;
                    }
                    if target.starts_with('/') {
                        return false;
                    }
                    stack.pop();
                    pending.extend(target.split('/').rev().map(String::from));
                }
            }
        }
    }
    true
}

/// Add `path` to `nodes`, creating implicit parent dirs.
fn insert(
    nodes: &mut BTreeMap<String, Node>,
    path: String,
    mode: u32,
    kind: EntryKind,
) -> Result<()> {
    for p in ancestors(&path) {
        match nodes.get(p) {
            Some(Node {
                kind: EntryKind::Dir,
                ..
            }) => {}
            Some(_) => {
                return Err(unsafe_path(
                    &path,
                    format!("parent '{p}' is not a directory"),
                ));
            }
            None => {
                nodes.insert(
                    p.to_string(),
                    Node {
                        mode: 0o755,
                        kind: EntryKind::Dir,
                        implicit: true,
                    },
                );
            }
        }
    }
    match nodes.get_mut(&path) {
        None => {
            nodes.insert(
                path,
                Node {
                    mode,
                    kind,
                    implicit: false,
                },
            );
        }
        Some(n) if n.kind == EntryKind::Dir && kind == EntryKind::Dir => {
            n.mode = mode;
            n.implicit = false;
        }
        Some(n) if n.kind == kind && n.mode == mode => {}
        Some(_) => {
            return Err(unsafe_path(
                &path,
                "conflicts with an earlier entry of the same path",
            ));
        }
    }
    Ok(())
}

impl Cas {
    /// Validate and stage a tar upload (ustar/gnu/pax). Nothing becomes
    /// visible until [`PendingTree::commit`]; on error, everything staged is
    /// deleted. `max_bytes` limits the raw bytes read from `reader`.
    pub fn ingest_tar(&self, reader: impl Read, max_bytes: u64) -> Result<PendingTree> {
        let state = Rc::new(Cell::new(ReadState::Ok));
        let limited = Limited {
            inner: reader,
            count: 0,
            limit: max_bytes,
            state: state.clone(),
        };
        let mut batch = self.batch();
        let res = ingest_entries(&mut batch, BufReader::with_capacity(256 << 10, limited));
        match (res, state.get()) {
            (_, ReadState::TooLarge) => Err(CasError::TooLarge { limit: max_bytes }),
            (Err(e), ReadState::Failed) => Err(CasError::Io {
                context: "read archive".into(),
                source: io::Error::other(e.to_string()),
            }),
            (Err(e), _) => Err(e),
            (Ok((tree, max_mtime)), _) => Ok(PendingTree {
                tree,
                max_mtime,
                batch,
            }),
        }
    }
}

fn ingest_entries(batch: &mut Batch, reader: impl Read) -> Result<(Tree, i64)> {
    let bad = |e: io::Error| CasError::BadArchive(e.to_string());
    let mut archive = tar::Archive::new(reader);
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    let mut max_mtime = 0i64;
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        let et = entry.header().entry_type();
        if matches!(et, EntryType::XGlobalHeader) {
            continue;
        }
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let mtime = entry.header().mtime().map_err(bad)?;
        max_mtime = max_mtime.max(i64::try_from(mtime).unwrap_or(i64::MAX));
        let mode = entry.header().mode().map_err(bad)? & 0o7777 & !0o6000;

        let path = normalize(&raw_path)?;
        let Some(path) = path else {
            if et.is_dir() {
                continue; // the archive root, "." or "./"
            }
            return Err(unsafe_path(&shown, "normalizes to an empty path"));
        };
        match et {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size = entry.size();
                let mut ex = Exact {
                    inner: &mut entry,
                    left: size,
                    short: false,
                };
                let res = if et == EntryType::GNUSparse {
                    // The header size is the stored size, not the expanded one.
                    batch.put_reader(&mut ex.inner)
                } else {
                    batch.put_reader_sized(&mut ex, size)
                };
                let (digest, size) = match res {
                    Err(_) if ex.short => {
                        return Err(CasError::BadArchive(format!(
                            "archive ends inside the data of {shown:?}"
                        )));
                    }
                    r => r?,
                };
                insert(&mut nodes, path, mode, EntryKind::File { digest, size })?;
            }
            EntryType::Directory => insert(&mut nodes, path, mode, EntryKind::Dir)?,
            EntryType::Symlink => {
                let raw = entry.link_name_bytes().unwrap_or_default();
                let Ok(target) = std::str::from_utf8(&raw) else {
                    return Err(unsafe_path(&path, "symlink target is not valid UTF-8"));
                };
                if target.is_empty() || target.contains('\0') {
                    return Err(unsafe_path(
                        &path,
                        "symlink target is empty or contains NUL",
                    ));
                }
                if target.starts_with('/') {
                    return Err(unsafe_path(
                        &path,
                        format!("symlink target '{target}' is absolute"),
                    ));
                }
                if !stays_inside(&path, target) {
                    return Err(unsafe_path(
                        &path,
                        format!("symlink target '{target}' escapes the archive root"),
                    ));
                }
                let kind = EntryKind::Symlink {
                    target: target.to_string(),
                };
                insert(&mut nodes, path, 0o777, kind)?;
            }
            EntryType::Link => {
                let raw = entry.link_name_bytes().unwrap_or_default();
                let target = match normalize(&raw) {
                    Ok(Some(t)) => t,
                    _ => {
                        return Err(unsafe_path(
                            &path,
                            format!(
                                "hard link target '{}' is not a valid path",
                                String::from_utf8_lossy(&raw)
                            ),
                        ));
                    }
                };
                let (kind, mode) = match nodes.get(&target) {
                    Some(
                        n @ Node {
                            kind: EntryKind::File { .. },
                            ..
                        },
                    ) => (n.kind.clone(), n.mode),
                    _ => {
                        return Err(unsafe_path(
                            &path,
                            format!(
                                "hard link target '{target}' is not an earlier file in the archive"
                            ),
                        ));
                    }
                };
                insert(&mut nodes, path, mode, kind)?;
            }
            EntryType::Char => {
                return Err(unsafe_path(
                    &path,
                    "character device entries are not allowed",
                ));
            }
            EntryType::Block => {
                return Err(unsafe_path(&path, "block device entries are not allowed"));
            }
            EntryType::Fifo => return Err(unsafe_path(&path, "fifo entries are not allowed")),
            other => {
                return Err(unsafe_path(
                    &path,
                    format!("unsupported tar entry type {:?}", other.as_byte() as char),
                ));
            }
        }
    }
    batch.flush()?;
    // Lexical checks passed per entry; now follow the tree's own symlinks.
    for (path, n) in &nodes {
        if let EntryKind::Symlink { target } = &n.kind
            && !resolves_inside(&nodes, path)
        {
            return Err(unsafe_path(
                path,
                format!(
                    "symlink target '{target}' escapes the archive root through other symlinks"
                ),
            ));
        }
    }
    let entries = nodes
        .into_iter()
        .map(|(path, n)| TreeEntry {
            path,
            mode: n.mode,
            kind: n.kind,
        })
        .collect();
    Ok((Tree { entries }, max_mtime))
}

/// Reader that must yield exactly `left` more bytes.
struct Exact<R> {
    inner: R,
    left: u64,
    /// Set when the input ended early.
    short: bool,
}

impl<R: Read> Read for Exact<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let max = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..max])?;
        if n == 0 {
            self.short = true;
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "input ended before its declared size",
            ));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Write `dir` as a tar stream: depth-first in byte order of names, paths
/// relative to `dir`, symlinks stored (not followed), modes and mtimes kept,
/// owners zeroed. Special files are written as such (ingest rejects them).
pub fn tar_dir(dir: &Path, writer: impl Write) -> io::Result<()> {
    tar_entries(dir, None, writer)
}

/// Like [`tar_dir`], but only the named entries of `dir`'s top level (all
/// when `None`).
pub fn tar_entries(
    dir: &Path,
    only: Option<Vec<std::ffi::OsString>>,
    writer: impl Write,
) -> io::Result<()> {
    let mut b = tar::Builder::new(writer);
    b.follow_symlinks(false);
    tar_walk(&mut b, dir, Path::new(""), only)?;
    b.into_inner()?.flush()
}

fn tar_walk<W: Write>(
    b: &mut tar::Builder<W>,
    abs: &Path,
    rel: &Path,
    only: Option<Vec<std::ffi::OsString>>,
) -> io::Result<()> {
    let mut names: Vec<_> = match only {
        Some(names) => names,
        None => fs::read_dir(abs)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?,
    };
    names.sort_by(|a, c| a.as_bytes().cmp(c.as_bytes()));
    for name in names {
        let child = abs.join(&name);
        let rel_child = rel.join(&name);
        let meta = fs::symlink_metadata(&child)?;
        let ft = meta.file_type();
        let mut h = Header::new_gnu();
        h.set_mode(meta.mode() & 0o7777);
        h.set_mtime(meta.mtime().max(0) as u64);
        h.set_uid(0);
        h.set_gid(0);
        h.set_size(0);
        if ft.is_dir() {
            h.set_entry_type(EntryType::Directory);
            b.append_data(&mut h, &rel_child, io::empty())?;
            tar_walk(b, &child, &rel_child, None)?;
        } else if ft.is_file() {
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&child)?;
            let len = f.metadata()?.len();
            h.set_entry_type(EntryType::Regular);
            h.set_size(len);
            b.append_data(
                &mut h,
                &rel_child,
                Exact {
                    inner: f,
                    left: len,
                    short: false,
                },
            )?;
        } else if ft.is_symlink() {
            h.set_entry_type(EntryType::Symlink);
            let target = fs::read_link(&child)?;
            b.append_link(&mut h, &rel_child, target)?;
        } else if ft.is_fifo() || ft.is_char_device() || ft.is_block_device() {
            h.set_entry_type(if ft.is_fifo() {
                EntryType::Fifo
            } else if ft.is_char_device() {
                EntryType::Char
            } else {
                EntryType::Block
            });
            let rdev = meta.rdev();
            h.set_device_major(libc::major(rdev))?;
            h.set_device_minor(libc::minor(rdev))?;
            b.append_data(&mut h, &rel_child, io::empty())?;
        } else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{}: sockets cannot be archived", child.display()),
            ));
        }
    }
    Ok(())
}
