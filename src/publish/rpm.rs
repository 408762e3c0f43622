//! STUB (replaced by the rpm branch): the agreed API of the RPM publisher.
#![allow(unused)]
use crate::publish::{RepoFile, RepoKey};

#[derive(Debug, thiserror::Error)]
pub enum RpmError {
    #[error("{0}")]
    Bad(String),
}

#[derive(serde::Serialize, serde::Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Fragments {
    pub primary: String,
    pub filelists: String,
    pub other: String,
}

#[derive(Clone, Debug)]
pub struct RpmInfo {
    pub name: String,
    pub epoch: u32,
    pub version: String,
    pub release: String,
    pub arch: String,
    pub location: String,
    pub sha256: [u8; 32],
    pub size: u64,
    pub provides: Vec<String>,
    pub requires: Vec<String>,
    pub fragments: Fragments,
}

pub fn inspect(bytes: &[u8]) -> Result<RpmInfo, RpmError> {
    unimplemented!()
}
pub fn sign(bytes: &[u8], key: &RepoKey) -> Result<Vec<u8>, RpmError> {
    unimplemented!()
}
#[derive(Debug, Default, Clone)]
pub struct RepodataCache {}
pub fn build_repodata<'a>(
    packages: impl IntoIterator<Item = &'a Fragments>,
    revision: u64,
    timestamp: i64,
    key: &RepoKey,
    cache: &mut RepodataCache,
) -> Result<Vec<RepoFile>, RpmError> {
    unimplemented!()
}
