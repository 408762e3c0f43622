//! TEMPORARY STUB (replaced by the real module).
#![allow(unused)]
use std::io::{Read, Write};
use std::path::Path;
use serde::{Deserialize, Serialize};
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Debug)]
pub struct Digest(pub [u8; 32]);
impl Digest { pub fn of(b: &[u8]) -> Digest { todo!() } }
impl std::fmt::Display for Digest { fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { todo!() } }
impl std::str::FromStr for Digest { type Err = CasError; fn from_str(s: &str) -> Result<Self, CasError> { todo!() } }
impl Serialize for Digest { fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> { todo!() } }
impl<'de> Deserialize<'de> for Digest { fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> { todo!() } }
#[derive(Debug, thiserror::Error)]
pub enum CasError {
    #[error("io {0}")] Io(#[from] std::io::Error),
    #[error("nf {0}")] NotFound(Digest),
    #[error("unsafe {path} {reason}")] UnsafePath { path: String, reason: String },
    #[error("big {limit}")] TooLarge { limit: u64 },
    #[error("bad {0}")] BadArchive(String),
}
#[derive(Clone)] pub struct Cas;
pub enum EntryKind { File { digest: Digest, size: u64 }, Dir, Symlink { target: String } }
pub struct TreeEntry { pub path: String, pub mode: u32, pub kind: EntryKind }
pub struct Tree { pub entries: Vec<TreeEntry> }
pub struct PendingTree { pub tree: Tree, pub max_mtime: i64 }
impl PendingTree { pub fn commit(self) -> Result<Digest, CasError> { todo!() } pub fn read_file(&self, p: &str) -> Result<Option<Vec<u8>>, CasError> { todo!() } }
pub struct BlobReader; impl Read for BlobReader { fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> { todo!() } }
pub struct RawReader; impl Read for RawReader { fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> { todo!() } }
impl Cas {
    pub fn open(root: &Path) -> Result<Cas, CasError> { todo!() }
    pub fn put_file(&self, p: &Path) -> Result<(Digest, u64), CasError> { todo!() }
    pub fn put_bytes(&self, p: &[u8]) -> Result<Digest, CasError> { todo!() }
    pub fn get_bytes(&self, d: &Digest) -> Result<Vec<u8>, CasError> { todo!() }
    pub fn open_blob(&self, d: &Digest) -> Result<BlobReader, CasError> { todo!() }
    pub fn open_raw(&self, d: &Digest) -> Result<RawReader, CasError> { todo!() }
    pub fn get_tree(&self, d: &Digest) -> Result<Tree, CasError> { todo!() }
    pub fn put_tree(&self, t: &Tree) -> Result<Digest, CasError> { todo!() }
    pub fn checkout(&self, t: &Tree, dest: &Path, mtime: Option<i64>) -> Result<(), CasError> { todo!() }
    pub fn ingest_dir(&self, dir: &Path, f: impl Fn(&str) -> bool) -> Result<Tree, CasError> { todo!() }
    pub fn ingest_tar(&self, r: impl Read, max: u64) -> Result<PendingTree, CasError> { todo!() }
}
pub fn tar_dir(dir: &Path, w: impl Write) -> std::io::Result<()> { todo!() }
