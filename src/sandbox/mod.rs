//! TEMPORARY STUB (replaced by the real module).
#![allow(unused)]
use std::path::{Path, PathBuf};
pub enum RootSpec { Host }
pub struct IdMap { pub host_uid: u32, pub host_gid: u32, pub count: u32 }
impl IdMap { pub fn for_slot(s: u32) -> IdMap { todo!() } }
pub struct Spec { pub root: RootSpec, pub build_dir: PathBuf, pub out_dir: PathBuf, pub argv: Vec<String>, pub env: Vec<(String, String)>, pub cwd: String, pub hostname: String, pub ids: IdMap }
pub enum Outcome { Exited(i32), Signaled(i32), Cancelled, Infra(String) }
#[derive(Debug, thiserror::Error)] #[error("x")] pub struct SandboxError;
pub async fn run(exe: &Path, spec: &Spec, work: &Path, log: std::os::fd::OwnedFd, cancel: tokio_util::sync::CancellationToken) -> Result<Outcome, SandboxError> { todo!() }
pub fn init_main(spec: &Path, result: &Path) -> i32 { todo!() }
