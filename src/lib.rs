//! kiln: a package build service in one binary. Takes source trees, builds
//! them in sandboxes, keeps every artifact content-addressed, and serves the
//! results over HTTP.
//!
//! `start` builds the hub and returns its bound address; `main.rs` only
//! parses arguments and dispatches to `cli`.

pub mod accounts;
pub mod buildroot;
pub mod cas;
pub mod cli;
pub mod client;
pub mod config;
pub mod db;
pub mod deps;
pub mod durable;
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
pub mod tls;
pub mod web;
pub mod worker;
pub mod workers;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::task::JoinHandle;

use crate::config::Config;
use crate::hub::{Hub, HubError};

/// Locks a mutex whose data stays valid if a holder panicked.
pub fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A hub serving HTTP (and HTTPS when configured) and running its local slots.
pub struct Running {
    pub addr: SocketAddr,
    /// The bound HTTPS address, when `tls_listen` is set.
    pub tls_addr: Option<SocketAddr>,
    pub hub: Arc<Hub>,
    server: JoinHandle<std::io::Result<()>>,
    tls_server: Option<JoinHandle<std::io::Result<()>>>,
    slots: Vec<JoinHandle<()>>,
}

impl Running {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `https://ADDR` of the TLS listener, when there is one.
    pub fn tls_url(&self) -> Option<String> {
        self.tls_addr.map(|a| format!("https://{a}"))
    }

    /// Stops accepting requests, kills running sandboxes (their tasks are
    /// re-queued at the next start) and waits for everything to end.
    pub async fn shutdown(self) {
        self.hub.shutdown.cancel();
        for s in self.slots {
            let _ = s.await;
        }
        for server in std::iter::once(self.server).chain(self.tls_server) {
            match server.await {
                Ok(Err(e)) => tracing::error!(error = %e, "server ended with an error"),
                Err(e) => tracing::error!(error = %e, "server task failed"),
                Ok(Ok(())) => {}
            }
        }
    }
}

/// Opens the data dir, binds `config.server.listen` (port 0 picks one) and
/// `tls_listen` if set, and starts serving and building. `kiln_exe` is the
/// binary re-executed as the sandbox init (the running `kiln`, or the test's
/// built binary).
pub async fn start(config: Config, kiln_exe: PathBuf) -> Result<Running, HubError> {
    let listen = config.server.listen;
    let tls_listen = config.server.tls_listen;
    let slots = config.build.slots;
    let hub = tokio::task::spawn_blocking(move || Hub::open(config, kiln_exe))
        .await
        .expect("hub open panicked")?;
    let (listener, addr) = bind(listen).await?;
    // Both addresses are bound before anything runs, so a taken TLS port
    // fails the start as a taken plain port does.
    let tls = match (tls_listen, &hub.tls_config) {
        (Some(l), Some(config)) => Some((bind(l).await?, config.clone())),
        _ => None,
    };
    let server = tokio::spawn(server::serve(listener, hub.clone()));
    let tls_addr = tls.as_ref().map(|((_, a), _)| *a);
    let tls_server = tls.map(|((listener, tls_addr), config)| {
        tracing::info!(
            addr = %tls_addr,
            fingerprint = hub.tls_fingerprint.as_deref().unwrap_or_default(),
            "kiln hub serving HTTPS; clients pin this SHA-256 fingerprint"
        );
        tokio::spawn(tls::serve(listener, config, hub.clone()))
    });
    // Repos whose packages changed before a crash or restart.
    tokio::spawn({
        let hub = hub.clone();
        async move { repos::publish_due(&hub).await }
    });
    // The reaper ends with the hub; `shutdown` waits for it like a slot, so
    // nothing holds the database once it returns.
    let slots = std::iter::once(tokio::spawn(scheduler::reap_expired_leases(hub.clone())))
        .chain((0..slots as u32).map(|i| tokio::spawn(worker::run_slot(hub.clone(), i))))
        .collect();
    tracing::info!(%addr, "kiln hub listening");
    Ok(Running {
        addr,
        tls_addr,
        hub,
        server,
        tls_server,
        slots,
    })
}

async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), HubError> {
    let bind_err = |source| HubError::Bind { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_err)?;
    let bound = listener.local_addr().map_err(bind_err)?;
    Ok((listener, bound))
}
