//! TLS of the DDI connection, with certificates generated per test (rcgen): a rustls front on
//! loopback proxies to the plain test server. The agent's client must accept only a server
//! certificate that chains to its configured CA, is valid now and names the host it dialled;
//! mutual TLS works when the server requires a client certificate; and `https://` never falls
//! back to plain HTTP (neither by talking HTTP to the port nor by following a redirect).

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ddi_agent::config::{Auth, ServerConfig};
use ddi_agent::ddi::DdiClient;
use ddi_sim::{ServerOptions, TestServer};
use rcgen::{
    date_time_ymd, BasicConstraints, Certificate, CertificateParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{
    self,
    pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer},
    RootCertStore,
};
use tokio_rustls::TlsAcceptor;

const CONTROLLER: &str = "tls-dev";
const TOKEN: &str = "tls-token";

struct Ca {
    cert: Certificate,
    key: KeyPair,
}

fn new_ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let cert = params.self_signed(&key).unwrap();
    Ca { cert, key }
}

struct Leaf {
    cert: Certificate,
    key: KeyPair,
}

/// A certificate for `names` (DNS) and, with `ip`, 127.0.0.1; `expired` puts its validity in
/// the past.
fn leaf(ca: &Ca, names: &[&str], ip: bool, expired: bool, client: bool) -> Leaf {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    if ip {
        params
            .subject_alt_names
            .push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
    }
    params.distinguished_name.push(DnType::CommonName, "leaf");
    params.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    if expired {
        params.not_before = date_time_ymd(2019, 1, 1);
        params.not_after = date_time_ymd(2020, 1, 1);
    } else {
        params.not_before = date_time_ymd(2020, 1, 1);
        params.not_after = date_time_ymd(2090, 1, 1);
    }
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    Leaf { cert, key }
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// What the TLS front does with a connection after the handshake.
#[derive(Clone)]
enum Behind {
    /// Relay bytes to this plain HTTP server.
    Proxy(std::net::SocketAddr),
    /// Answer every request with these bytes.
    Raw(&'static [u8]),
}

/// A TLS listener on 127.0.0.1 with `server` as its certificate; with `client_ca`, clients
/// must present a certificate issued by it.
async fn tls_front(server: &Leaf, client_ca: Option<&Ca>, behind: Behind) -> u16 {
    let chain = vec![CertificateDer::from(server.cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server.key.serialize_der()));
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap();
    let config = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            roots
                .add(CertificateDer::from(ca.cert.der().to_vec()))
                .unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    }
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let behind = behind.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return; // the handshake failed: what several tests expect
                };
                match behind {
                    Behind::Proxy(addr) => {
                        if let Ok(mut plain) = TcpStream::connect(addr).await {
                            let _ = tokio::io::copy_bidirectional(&mut tls, &mut plain).await;
                        }
                    }
                    Behind::Raw(bytes) => {
                        let mut buf = [0u8; 4096];
                        let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut buf).await;
                        let _ = tls.write_all(bytes).await;
                        let _ = tls.shutdown().await;
                    }
                }
            });
        }
    });
    port
}

fn write_pem(dir: &Path, name: &str, pem: String) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, pem).unwrap();
    path
}

struct Rig {
    _server: TestServer,
    plain: std::net::SocketAddr,
    dir: tempfile::TempDir,
}

fn rig() -> Rig {
    let server = TestServer::start(ServerOptions::default());
    server.create_target(CONTROLLER, Some(TOKEN)).unwrap();
    let plain = server.addr();
    Rig {
        _server: server,
        plain,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn config(url: String, ca_file: Option<PathBuf>) -> ServerConfig {
    ServerConfig {
        url: url.parse().unwrap(),
        tenant: "DEFAULT".into(),
        controller_id: CONTROLLER.into(),
        auth: Auth::TargetToken(TOKEN.into()),
        ca_file,
        client_cert: None,
        client_key: None,
        retries: 1,
        connect_timeout: Duration::from_secs(5),
        low_speed_timeout: Duration::from_secs(5),
    }
}

/// The poll must fail, and its error must say why (`needle`), so that a refusal for another
/// reason does not pass.
async fn refused(cfg: &ServerConfig, why: &str, needle: &str) {
    let err = poll(cfg).await.expect_err(why);
    assert!(err.contains(needle), "{why}; expected {needle:?} in: {err}");
}

async fn poll(cfg: &ServerConfig) -> Result<(), String> {
    let mut client = DdiClient::new(cfg).map_err(|e| e.to_string())?;
    tokio::time::timeout(Duration::from_secs(30), client.poll())
        .await
        .expect("poll did not return in 30 s")
        .map(|_| ())
        .map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_certificate_from_the_configured_ca_is_accepted() {
    let rig = rig();
    let ca = new_ca("ddi test CA");
    let port = tls_front(
        &leaf(&ca, &["localhost"], true, false, false),
        None,
        Behind::Proxy(rig.plain),
    )
    .await;
    let ca_file = write_pem(rig.dir.path(), "ca.pem", ca.cert.pem());
    for host in ["127.0.0.1", "localhost"] {
        poll(&config(
            format!("https://{host}:{port}"),
            Some(ca_file.clone()),
        ))
        .await
        .unwrap_or_else(|e| panic!("the right CA must be accepted for {host}: {e}"));
    }
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let rig = rig();
    let server_ca = new_ca("server CA");
    let other_ca = new_ca("some other CA");
    let port = tls_front(
        &leaf(&server_ca, &["localhost"], true, false, false),
        None,
        Behind::Proxy(rig.plain),
    )
    .await;
    let ca_file = write_pem(rig.dir.path(), "ca.pem", other_ca.cert.pem());
    refused(
        &config(format!("https://127.0.0.1:{port}"), Some(ca_file)),
        "a certificate from an untrusted CA must be refused",
        "UnknownIssuer",
    )
    .await;
    // Without any configured CA (system roots only) it is refused too.
    refused(
        &config(format!("https://127.0.0.1:{port}"), None),
        "a private CA is not a system root",
        "UnknownIssuer",
    )
    .await;
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let rig = rig();
    let ca = new_ca("ddi test CA");
    let port = tls_front(
        &leaf(&ca, &["localhost"], true, true, false),
        None,
        Behind::Proxy(rig.plain),
    )
    .await;
    let ca_file = write_pem(rig.dir.path(), "ca.pem", ca.cert.pem());
    refused(
        &config(format!("https://127.0.0.1:{port}"), Some(ca_file)),
        "an expired certificate must be refused",
        "expired",
    )
    .await;
}

#[tokio::test]
async fn a_certificate_for_another_host_is_refused() {
    let rig = rig();
    let ca = new_ca("ddi test CA");
    let port = tls_front(
        &leaf(&ca, &["update.example.invalid"], false, false, false),
        None,
        Behind::Proxy(rig.plain),
    )
    .await;
    let ca_file = write_pem(rig.dir.path(), "ca.pem", ca.cert.pem());
    for host in ["127.0.0.1", "localhost"] {
        refused(
            &config(format!("https://{host}:{port}"), Some(ca_file.clone())),
            "a certificate that does not name the host must be refused",
            "not valid for name",
        )
        .await;
    }
}

#[tokio::test]
async fn mutual_tls_requires_and_accepts_the_client_certificate() {
    let rig = rig();
    let ca = new_ca("ddi test CA");
    let client_ca = ca_for_clients();
    let port = tls_front(
        &leaf(&ca, &["localhost"], true, false, false),
        Some(&client_ca),
        Behind::Proxy(rig.plain),
    )
    .await;
    let ca_file = write_pem(rig.dir.path(), "ca.pem", ca.cert.pem());
    let url = format!("https://127.0.0.1:{port}");

    refused(
        &config(url.clone(), Some(ca_file.clone())),
        "without a client certificate the server must refuse",
        "CertificateRequired",
    )
    .await;

    let client = leaf(&client_ca, &["device-0001"], false, false, true);
    let mut cfg = config(url.clone(), Some(ca_file.clone()));
    cfg.client_cert = Some(write_pem(rig.dir.path(), "client.pem", client.cert.pem()));
    cfg.client_key = Some(write_pem(
        rig.dir.path(),
        "client.key",
        client.key.serialize_pem(),
    ));
    // The token stays: the test server behind the TLS front still checks it.
    poll(&cfg)
        .await
        .expect("mutual TLS with the right client certificate must work");

    // A client certificate from a CA the server does not trust is refused.
    let stranger = leaf(&new_ca("stranger CA"), &["device-0001"], false, false, true);
    cfg.client_cert = Some(write_pem(
        rig.dir.path(),
        "stranger.pem",
        stranger.cert.pem(),
    ));
    cfg.client_key = Some(write_pem(
        rig.dir.path(),
        "stranger.key",
        stranger.key.serialize_pem(),
    ));
    refused(
        &cfg,
        "a client certificate from an untrusted CA must be refused",
        "UnknownCA",
    )
    .await;
}

fn ca_for_clients() -> Ca {
    new_ca("device CA")
}

#[tokio::test]
async fn https_never_falls_back_to_plain_http() {
    let rig = rig();
    // An https URL pointing at the plain HTTP server: the handshake fails, no HTTP is sent.
    refused(
        &config(format!("https://{}", rig.plain), None),
        "https:// must not talk plain HTTP",
        "corrupt message",
    )
    .await;
    // A TLS server that redirects to http://: not followed.
    let ca = new_ca("ddi test CA");
    let redirect: &'static [u8] = Box::leak(
        format!(
            "HTTP/1.1 302 Found\r\nLocation: http://{}/DEFAULT/controller/v1/{CONTROLLER}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            rig.plain
        )
        .into_bytes()
        .into_boxed_slice(),
    );
    let port = tls_front(
        &leaf(&ca, &["localhost"], true, false, false),
        None,
        Behind::Raw(redirect),
    )
    .await;
    let ca_file = write_pem(rig.dir.path(), "ca.pem", ca.cert.pem());
    refused(
        &config(format!("https://127.0.0.1:{port}"), Some(ca_file)),
        "a redirect from https to http must not be followed",
        "scheme is not allowed",
    )
    .await;
    // Plain HTTP works when the URL says http:// (the control case).
    poll(&config(format!("http://{}", rig.plain), None))
        .await
        .expect("http:// is allowed when configured");
}
