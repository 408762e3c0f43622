//! HTTPS for the hub: the certificate it serves, its SHA-256 fingerprint
//! that clients pin, and the TLS listener that feeds the same axum router as
//! the plain one.
//!
//! The certificate is either a PEM pair the admin supplies (`tls_cert`,
//! `tls_key`) or one the hub generates on first start and keeps in
//! `DATA/tls/` (`hub.crt`, `hub.key`, mode 0600). A generated certificate is
//! self-signed and nobody checks it against a CA: clients pin its
//! fingerprint instead (client.rs). So the files are written once,
//! crash-safely, and only read after that: a new certificate would break
//! every pinned worker.
//!
//! The crypto provider is aws-lc-rs, the one reqwest 0.13's `rustls`
//! feature builds in: one provider in the binary, and a `reqwest::Client`
//! built anywhere without set-up still works (with `rustls-no-provider`
//! every such client panics unless a process-wide default was installed).

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest as _, Sha256};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;

use crate::config::ServerConfig;
use crate::hub::Hub;

/// Under the data dir: the generated certificate and its key.
pub const TLS_DIR: &str = "tls";
pub const CERT_FILE: &str = "hub.crt";
pub const KEY_FILE: &str = "hub.key";

/// How long a client may take to finish its handshake before the
/// connection is dropped (it holds a task and a permit meanwhile).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in flight at once; past it the accept loop waits, so a flood
/// of idle connections queues in the kernel instead of in memory.
const MAX_HANDSHAKES: usize = 256;

// The causes are fields named `error`, not `source`: each message already
// holds its cause, and the CLI prints an error's source chain after it.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("[server] {given} is set but {missing} is not: give both PEM files or neither")]
    Incomplete {
        given: &'static str,
        missing: &'static str,
    },
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("{cert} and {key} do not make a TLS identity: {error}")]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        error: rustls::Error,
    },
    #[error(
        "{path} exists but {missing} does not: restore it, or remove {path} to have a new \
         certificate made (clients pinning the old fingerprint then need the new one)"
    )]
    Orphan { path: PathBuf, missing: PathBuf },
    #[error("[server] tls_names: {0}")]
    Name(String),
    #[error("generating the hub's certificate: {0}")]
    Generate(rcgen::Error),
}

/// The certificate the hub serves, ready for the TLS listener.
pub struct HubTls {
    /// [`fingerprint`] of the leaf certificate.
    pub fingerprint: String,
    /// The PEM file it came from.
    pub cert_path: PathBuf,
    pub config: Arc<rustls::ServerConfig>,
}

/// The crypto provider every rustls config of kiln's is built with.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Lowercase hex SHA-256 of a certificate's DER: what clients pin.
pub fn fingerprint(cert_der: &[u8]) -> String {
    hex::encode(Sha256::digest(cert_der))
}

/// A pinned fingerprint as given by a person: 64 hex digits, any case,
/// optionally colon-separated as `openssl x509 -fingerprint -sha256` prints
/// it. Returns the canonical form (lowercase, no colons).
pub fn parse_fingerprint(s: &str) -> Result<String, String> {
    let hex: String = s.trim().chars().filter(|c| *c != ':').collect();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "fingerprint {s:?} is not a SHA-256: it needs 64 hex digits (as `kiln serve` prints it)"
        ));
    }
    Ok(hex.to_ascii_lowercase())
}

/// The admin-supplied PEM pair, if any: both or neither.
pub fn supplied_files(server: &ServerConfig) -> Result<Option<(&Path, &Path)>, TlsError> {
    match (&server.tls_cert, &server.tls_key) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(TlsError::Incomplete {
            given: "tls_cert",
            missing: "tls_key",
        }),
        (None, Some(_)) => Err(TlsError::Incomplete {
            given: "tls_key",
            missing: "tls_cert",
        }),
    }
}

/// A name for the generated certificate: an IP address or a DNS name
/// (letters, digits, `-`, dots; `*.` in front for a wildcard).
pub fn check_name(name: &str) -> Result<(), String> {
    if name.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let host = name.strip_prefix("*.").unwrap_or(name);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.len() > 253 || !host.split('.').all(label_ok) {
        return Err(format!("{name:?} is neither an IP address nor a DNS name"));
    }
    Ok(())
}

/// The certificate to serve: the admin's pair, else `DATA/tls/`'s, made on
/// first use. `None` when HTTPS is not configured (`tls_listen` unset).
pub fn load_or_create(server: &ServerConfig, data: &Path) -> Result<Option<HubTls>, TlsError> {
    // A half-given pair is an error even without tls_listen: the admin
    // meant something by it.
    let supplied = supplied_files(server)?;
    let Some(listen) = server.tls_listen else {
        return Ok(None);
    };
    let (cert, key) = match supplied {
        Some((c, k)) => (c.to_owned(), k.to_owned()),
        None => {
            let dir = data.join(TLS_DIR);
            let (cert, key) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
            match (cert.exists(), key.exists()) {
                (true, true) => {}
                (true, false) => {
                    return Err(TlsError::Orphan {
                        path: cert,
                        missing: key,
                    });
                }
                // Nothing yet, or a key alone: a crash between the two
                // renames below (the key goes first). No fingerprint was
                // shown for it, so making a new pair loses nothing.
                (false, _) => {
                    let names = san_names(listen, &server.tls_names)?;
                    generate(&dir, &cert, &key, names.clone())?;
                    tracing::info!(cert = %cert.display(), ?names, "generated the hub's TLS certificate");
                }
            }
            (cert, key)
        }
    };
    let (chain, key_der) = read_pair(&cert, &key)?;
    let fingerprint = fingerprint(&chain[0]);
    let mut config = rustls::ServerConfig::builder_with_provider(crypto_provider())
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(chain, key_der))
        .map_err(|error| TlsError::Identity {
            cert: cert.clone(),
            key: key.clone(),
            error,
        })?;
    // The router speaks HTTP/1.1 only (axum's http2 feature is off).
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(HubTls {
        fingerprint,
        cert_path: cert,
        config: Arc::new(config),
    }))
}

/// What the generated certificate names: loopback, this host, the TLS
/// address when it is a specific one, and the admin's extra names.
fn san_names(listen: SocketAddr, extra: &[String]) -> Result<Vec<String>, TlsError> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    if let Ok(h) = nix::unistd::gethostname()
        && let Some(h) = h.to_str()
        // A host name a certificate cannot hold is left out, not fatal.
        && check_name(h).is_ok()
    {
        names.push(h.to_string());
    }
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    for n in extra {
        check_name(n).map_err(TlsError::Name)?;
        names.push(n.clone());
    }
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    Ok(names)
}

/// Makes a self-signed ECDSA P-256 certificate for `names` and writes it
/// and its key (key first; see [`load_or_create`]).
fn generate(dir: &Path, cert: &Path, key: &Path, names: Vec<String>) -> Result<(), TlsError> {
    let key_pair =
        rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(TlsError::Generate)?;
    let mut params = rcgen::CertificateParams::new(names).map_err(TlsError::Generate)?;
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, "kiln hub");
    params.distinguished_name = dn;
    // rcgen's default validity (1975 to 4096) stands: pinning clients do
    // not look at dates, and a certificate that expired would change the
    // fingerprint when renewed.
    let generated = params.self_signed(&key_pair).map_err(TlsError::Generate)?;
    std::fs::create_dir_all(dir).map_err(|error| TlsError::Write {
        path: dir.to_owned(),
        error,
    })?;
    if let Some(parent) = dir.parent() {
        crate::durable::sync_dir(parent).map_err(|error| TlsError::Write {
            path: parent.to_owned(),
            error,
        })?;
    }
    write_durably(key, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_durably(cert, generated.pem().as_bytes(), 0o644)?;
    Ok(())
}

fn write_durably(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsError> {
    crate::durable::write(path, bytes, mode).map_err(|error| TlsError::Write {
        path: path.to_owned(),
        error,
    })
}

/// Reads a PEM certificate chain (leaf first) and its private key.
fn read_pair(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let read = |p: &Path| {
        std::fs::read(p).map_err(|error| TlsError::Read {
            path: p.to_owned(),
            error,
        })
    };
    let pem_err = |p: &Path, message: String| TlsError::Pem {
        path: p.to_owned(),
        message,
    };
    let chain = CertificateDer::pem_slice_iter(&read(cert)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(cert, format!("not a PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err(pem_err(
            cert,
            "holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?)
        .map_err(|e| pem_err(key, format!("holds no PEM private key: {e}")))?;
    Ok((chain, key_der))
}

/// Serves the hub's router over TLS on `listener` until `hub.shutdown`
/// fires, with the plain server's graceful shutdown (server::serve).
pub async fn serve(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    hub: Arc<Hub>,
) -> std::io::Result<()> {
    let shutdown = hub.shutdown.clone();
    let listener = TlsListener::start(listener, TlsAcceptor::from(config), shutdown.clone())?;
    axum::serve(
        listener,
        crate::server::router(hub).into_make_service_with_connect_info::<crate::server::Peer>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

/// An axum listener yielding finished TLS streams. Handshakes run in their
/// own tasks, so one slow or hostile client never holds up the others; the
/// streams come through a channel.
struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    fn start(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        shutdown: CancellationToken,
    ) -> std::io::Result<TlsListener> {
        let local = listener.local_addr()?;
        let (tx, ready) = mpsc::channel(64);
        tokio::spawn(accept_loop(listener, acceptor, tx, shutdown));
        Ok(TlsListener { ready, local })
    }
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, TlsListener>>
    for crate::server::Peer
{
    fn connect_info(s: axum::serve::IncomingStream<'_, TlsListener>) -> Self {
        crate::server::Peer(*s.remote_addr())
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept loop ended because the hub is shutting down; the
            // same token ends axum's loop, which stops calling accept.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

/// Accepts TCP connections until `shutdown`, handshaking each in its own
/// task. The socket closes when this returns.
async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    ready: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
    shutdown: CancellationToken,
) {
    let permits = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = permits.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return, // never closed
            },
        };
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    accept_error(e).await;
                    continue;
                }
            },
        };
        let (acceptor, ready, shutdown) = (acceptor.clone(), ready.clone(), shutdown.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let stream = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    // Scanners, plain HTTP on the TLS port, clients that
                    // do not trust the certificate: their problem, not the
                    // hub's, so only at debug level.
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
            };
            drop(permit);
            // Fails only once the server stopped: the connection is dropped.
            let _ = ready.send((stream, peer)).await;
        });
    }
}

/// As axum does for its own listener: connection-level errors are the
/// client's; anything else (out of file descriptors) is logged and waited
/// out rather than ending the listener.
async fn accept_error(e: std::io::Error) {
    use std::io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    ) {
        return;
    }
    tracing::error!(error = %e, "TLS listener: accept failed");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_parsed_strictly() {
        let fp = fingerprint(b"x");
        assert_eq!(fp.len(), 64);
        assert_eq!(parse_fingerprint(&fp).unwrap(), fp);
        assert_eq!(parse_fingerprint(&fp.to_uppercase()).unwrap(), fp);
        let colons: Vec<String> = fp
            .as_bytes()
            .chunks(2)
            .map(|c| String::from_utf8_lossy(c).to_uppercase())
            .collect();
        assert_eq!(parse_fingerprint(&colons.join(":")).unwrap(), fp);
        for bad in [
            "",
            "abc",
            &fp[..63],
            &format!("{}g", &fp[..63]),
            &format!("{fp}0"),
        ] {
            let e = parse_fingerprint(bad).unwrap_err();
            assert!(e.contains("64 hex digits"), "{bad}: {e}");
        }
    }

    #[test]
    fn names() {
        for ok in [
            "localhost",
            "hub.example.org",
            "*.example.org",
            "10.0.0.1",
            "fe80::1",
        ] {
            check_name(ok).unwrap();
        }
        for bad in ["", "a..b", "-a.b", "a b", "hub_1", "exämple.org", "*"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn generated_pair_is_kept_and_reread() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = ServerConfig {
            tls_listen: Some("0.0.0.0:0".parse().unwrap()),
            tls_names: vec!["hub.example.org".into()],
            ..Default::default()
        };
        let a = load_or_create(&server, dir.path()).unwrap().unwrap();
        let b = load_or_create(&server, dir.path()).unwrap().unwrap();
        assert_eq!(a.fingerprint, b.fingerprint);
        // A key alone (a crash between the renames) is replaced.
        std::fs::remove_file(dir.path().join("tls/hub.crt")).unwrap();
        let c = load_or_create(&server, dir.path()).unwrap().unwrap();
        assert_ne!(c.fingerprint, a.fingerprint);
        // A certificate alone is not: its fingerprint may be pinned.
        std::fs::remove_file(dir.path().join("tls/hub.key")).unwrap();
        let e = load_or_create(&server, dir.path()).err().unwrap();
        assert!(e.to_string().contains("hub.key"), "{e}");
        server.tls_listen = None;
        assert!(load_or_create(&server, dir.path()).unwrap().is_none());
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "not pem").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let server = ServerConfig {
            tls_listen: Some("127.0.0.1:0".parse().unwrap()),
            tls_cert: Some(cert.clone()),
            tls_key: Some(key.clone()),
            ..Default::default()
        };
        let e = load_or_create(&server, dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("c.pem") && e.contains("no PEM certificate"),
            "{e}"
        );
        // Two valid files that do not belong together.
        let one = rcgen::generate_simple_self_signed(vec!["a".into()]).unwrap();
        let two = rcgen::generate_simple_self_signed(vec!["b".into()]).unwrap();
        std::fs::write(&cert, one.cert.pem()).unwrap();
        std::fs::write(&key, two.signing_key.serialize_pem()).unwrap();
        let e = load_or_create(&server, dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("c.pem") && e.contains("k.pem"), "{e}");
        std::fs::remove_file(&key).unwrap();
        let e = load_or_create(&server, dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot read") && e.contains("k.pem"), "{e}");
    }
}
