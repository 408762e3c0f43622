//! HTTPS: the hub's generated (or supplied) certificate over real TLS on
//! loopback, clients pinning its fingerprint, and what happens to clients
//! that pin the wrong one or none.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use kiln::client::{Client, ClientError};
use kiln::config::Config;
use kiln::model::BuildState;

use crate::harness::*;
use crate::kiln_exe;

fn loopback() -> Option<SocketAddr> {
    Some("127.0.0.1:0".parse().unwrap())
}

async fn tls_hub(slots: usize) -> TestHub {
    hub_with(slots, |c| c.server.tls_listen = loopback()).await
}

fn tls_url(h: &TestHub) -> String {
    h.running
        .as_ref()
        .unwrap()
        .tls_url()
        .expect("tls_listen set")
}

fn hub_fingerprint(h: &TestHub) -> String {
    let fp = h.running.as_ref().unwrap().hub.tls_fingerprint.clone();
    fp.expect("a fingerprint with tls_listen set")
}

/// The fingerprint of the first certificate in a PEM file.
fn pem_fingerprint(path: &Path) -> String {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let der = CertificateDer::from_pem_file(path).unwrap();
    kiln::tls::fingerprint(&der)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_client_builds_over_https_with_the_generated_certificate() {
    let mut h = tls_hub(1).await;
    let fp = hub_fingerprint(&h);
    assert_eq!(fp.len(), 64);
    assert_eq!(fp, pem_fingerprint(&h.data().join("tls/hub.crt")));
    let url = tls_url(&h);
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");

    let c = Client::pinned(&url, Some(h.token.clone()), Some(&fp)).unwrap();
    assert!(!c.health().await.unwrap().version.is_empty());
    let src = script_tree("over-tls", "echo secure > $KILN_OUT/out.txt", &["out.txt"]);
    let b = c.submit_dir(src.path(), None, None).await.unwrap();
    let v = c.wait(b.id, BUILD_TIMEOUT).await.unwrap();
    assert_eq!(v.detail.build.state, BuildState::Succeeded);
    let listed = c.list_builds(None, 10).await.unwrap();
    assert_eq!(listed.iter().map(|b| b.id).collect::<Vec<_>>(), [b.id]);
    let out = c.artifact(b.id, "out.txt").await.unwrap();
    assert_eq!(out.text().await.unwrap(), "secure\n");
    // The fingerprint as openssl prints it pins the same certificate.
    let openssl_style: Vec<String> = fp
        .as_bytes()
        .chunks(2)
        .map(|p| String::from_utf8_lossy(p).to_uppercase())
        .collect();
    let c2 = Client::pinned(&url, None, Some(&openssl_style.join(":"))).unwrap();
    c2.health().await.unwrap();
    // Plain HTTP on `listen` goes on as before.
    assert_eq!(h.client.list_builds(None, 10).await.unwrap().len(), 1);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_pin_or_no_pin_is_refused_before_any_request() {
    let mut h = tls_hub(0).await;
    let fp = hub_fingerprint(&h);
    let url = tls_url(&h);
    let wrong = "0f".repeat(32);

    let c = Client::pinned(&url, Some(h.token.clone()), Some(&wrong)).unwrap();
    let e = c.list_builds(None, 10).await.unwrap_err();
    match &e {
        ClientError::Pin { actual, pinned, .. } => {
            assert_eq!(actual, &fp);
            assert_eq!(pinned, &wrong);
        }
        other => panic!("expected a pin error, got {other:?}"),
    }
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("the hub's certificate has fingerprint {fp}"))
            && msg.contains(&format!("but {wrong} was pinned")),
        "{msg}"
    );
    // Nothing got through: a submission made no build.
    let src = script_tree("never", "true", &[]);
    let e = c.submit_dir(src.path(), None, None).await.unwrap_err();
    assert!(matches!(e, ClientError::Pin { .. }), "{e:?}");
    assert!(h.client.list_builds(None, 10).await.unwrap().is_empty());

    // No pin: the usual CA check, which a self-signed hub fails.
    let c = Client::new(&url, Some(h.token.clone()));
    let e = c.health().await.err().expect("refused");
    assert!(matches!(e, ClientError::Transport { .. }), "{e:?}");
    let chain = format!("{:?}", anyhow::Error::from(e));
    assert!(chain.contains("UnknownIssuer"), "{chain}");
    let c = Client::pinned(&url, None, None).unwrap();
    let e = c.health().await.err().expect("refused");
    assert!(matches!(e, ClientError::Transport { .. }), "{e:?}");

    // Plain HTTP and garbage on the TLS port fail their handshake; the
    // listener serves on.
    let plain = url.replace("https://", "http://");
    assert!(
        reqwest::get(format!("{plain}/api/v1/health"))
            .await
            .is_err()
    );
    {
        use tokio::io::AsyncWriteExt;
        let addr = h.running.as_ref().unwrap().tls_addr.unwrap();
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(&[0x16, 0x03, 0x01, 0xff, 0xff, 0, 0, 0])
            .await
            .unwrap();
    }
    let good = Client::pinned(&url, Some(h.token.clone()), Some(&fp)).unwrap();
    good.health().await.unwrap();
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_is_kept_across_restarts() {
    let mut h = tls_hub(0).await;
    let fp = hub_fingerprint(&h);
    let tls_addr = h.running.as_ref().unwrap().tls_addr.unwrap();
    h.stop().await;
    // Stopped means the TLS port is closed too.
    assert!(tokio::net::TcpStream::connect(tls_addr).await.is_err());

    let key = h.data().join("tls/hub.key");
    let mode = std::fs::metadata(&key).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", key.display());
    let mut c = config(&h.data(), 0);
    c.server.tls_listen = loopback();
    let again = kiln::start(c, kiln_exe()).await.unwrap();
    assert_eq!(again.hub.tls_fingerprint.as_deref(), Some(fp.as_str()));
    let client = Client::pinned(&again.tls_url().unwrap(), None, Some(&fp)).unwrap();
    client.health().await.unwrap();
    again.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_supplied_certificate_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["hub.example.org".into()]).unwrap();
    let (cert, key) = (dir.path().join("hub.pem"), dir.path().join("hub-key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    let fp = kiln::tls::fingerprint(generated.cert.der());

    let mut h = hub_with(0, |c| {
        c.server.tls_listen = loopback();
        c.server.tls_cert = Some(cert.clone());
        c.server.tls_key = Some(key.clone());
    })
    .await;
    assert_eq!(hub_fingerprint(&h), fp);
    // The pin ignores names: this certificate names hub.example.org only.
    let c = Client::pinned(&tls_url(&h), None, Some(&fp)).unwrap();
    c.health().await.unwrap();
    assert!(!h.data().join("tls").exists(), "nothing generated");
    h.stop().await;

    // Half a pair is refused at start, naming the missing key.
    let mut c: Config = config(&dir.path().join("data2"), 0);
    c.server.tls_listen = loopback();
    c.server.tls_cert = Some(cert);
    let e = kiln::start(c, kiln_exe()).await.err().expect("start fails");
    let msg = e.to_string();
    assert!(msg.contains("tls_key") && !msg.contains('\n'), "{msg}");
}

#[test]
fn kiln_serve_prints_the_https_address_and_fingerprint() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, line) = spawn_serve(
        dir.path(),
        &["--slots", "0", "--tls-listen", "127.0.0.1:0"],
        "kiln: HTTPS on ",
    );
    let (url, fp) = line
        .split_once(", certificate fingerprint (SHA-256) ")
        .unwrap();
    let (url, fp) = (url.to_string(), fp.to_string());
    assert_eq!(fp, pem_fingerprint(&dir.path().join("tls/hub.crt")));
    let rt = tokio::runtime::Runtime::new().unwrap();
    let health = rt.block_on(async {
        Client::pinned(&url, None, Some(&fp))
            .unwrap()
            .health()
            .await
    });
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = child.wait().unwrap();
    health.unwrap();
    assert!(status.success(), "{status}");
}
