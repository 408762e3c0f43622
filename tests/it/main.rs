//! kiln's integration tests: one binary, a small harness, real parts (the
//! real hub on a loopback port, real redb files, real sandboxes).

mod apt;
mod browser;
mod buildroots;
mod debian;
mod directory;
mod harness;
mod hostile;
mod hub;
mod netns;
mod publish;
mod repos;
mod restart;
mod rpm;
mod sandbox;
mod tls;
mod web;
mod workers;

use std::path::PathBuf;

/// The kiln binary built for this test run; re-executed as the sandbox init.
pub fn kiln_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kiln"))
}
