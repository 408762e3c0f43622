//! kiln: a package build service in one binary. Takes source trees, builds
//! them in sandboxes, keeps every artifact content-addressed, and serves the
//! results over HTTP.
//!
//! `start` builds the hub and returns its bound address; `main.rs` only
//! parses arguments and dispatches to `cli`.

pub mod buildroot;
pub mod cas;
pub mod cli;
pub mod client;
pub mod config;
pub mod db;
pub mod deps;
pub mod gitsrc;
pub mod hub;
pub mod kinds;
pub mod logs;
pub mod model;
pub mod publish;
pub mod remote;
pub mod repos;
pub mod sandbox;
pub mod scheduler;
pub mod server;
pub mod web;
pub mod worker;
pub mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::config::Config;
use crate::hub::{Hub, HubError};

/// A hub serving HTTP and running its local slots.
pub struct Running {
    pub addr: SocketAddr,
    pub hub: Arc<Hub>,
    server: JoinHandle<std::io::Result<()>>,
    slots: Vec<JoinHandle<()>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting requests, kills running sandboxes (their tasks are
    /// re-queued at the next start) and waits for everything to end.
    pub async fn shutdown(self) {
        self.hub.shutdown.cancel();
        for s in self.slots {
            let _ = s.await;
        }
        match self.server.await {
            Ok(Err(e)) => tracing::error!(error = %e, "server ended with an error"),
            Err(e) => tracing::error!(error = %e, "server task failed"),
            Ok(Ok(())) => {}
        }
    }
}

/// Opens the data dir, binds `config.server.listen` (port 0 picks one) and
/// starts serving and building. `kiln_exe` is the binary re-executed as the
/// sandbox init (the running `kiln`, or the test's built binary).
pub async fn start(config: Config, kiln_exe: PathBuf) -> Result<Running, HubError> {
    let listen = config.server.listen;
    let slots = config.build.slots;
    let hub = tokio::task::spawn_blocking(move || Hub::open(config, kiln_exe))
        .await
        .expect("hub open panicked")?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| HubError::Bind {
            addr: listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| HubError::Bind {
        addr: listen,
        source,
    })?;
    let server = tokio::spawn(server::serve(listener, hub.clone()));
    // Repos whose packages changed before a crash or restart.
    tokio::spawn({
        let hub = hub.clone();
        async move { repos::publish_due(&hub).await }
    });
    tokio::spawn(scheduler::reap_expired_leases(hub.clone()));
    let slots = (0..slots as u32)
        .map(|i| tokio::spawn(worker::run_slot(hub.clone(), i)))
        .collect();
    tracing::info!(%addr, "kiln hub listening");
    Ok(Running {
        addr,
        hub,
        server,
        slots,
    })
}
