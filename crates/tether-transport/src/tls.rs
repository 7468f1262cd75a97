//! TLS (rustls, ring provider): the same framing as plain TCP inside TLS, plus what
//! every TLS-speaking part of Tether shares: loading certificates and keys, server and
//! client configurations (TLS over TCP, WSS and QUIC differ only in ALPN), and a
//! self-signed development certificate.
//!
//! Clients verify the server against a CA file when one is given, else the system's
//! roots. There is no switch to skip verification.

use crate::TransportKind;
use crate::tcp::{StreamIo, StreamTransport, tcp_info};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use tokio::net::TcpStream;

pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// ALPN of Tether over TLS and QUIC.
pub const ALPN: &[u8] = b"tether/1";

/// Whole frames over TLS, server side.
pub type TlsServerTransport = StreamTransport<tokio_rustls::server::TlsStream<TcpStream>>;
/// Whole frames over TLS, client side.
pub type TlsClientTransport = StreamTransport<tokio_rustls::client::TlsStream<TcpStream>>;

impl StreamIo for tokio_rustls::server::TlsStream<TcpStream> {
    fn kind(&self) -> TransportKind {
        TransportKind::Tls
    }
    fn peer(&self) -> String {
        self.get_ref().0.peer()
    }
    fn tcp_snapshot(&self) -> Option<tether_core::diagnosis::TcpSnapshot> {
        tcp_info(self.get_ref().0)
    }
}

impl StreamIo for tokio_rustls::client::TlsStream<TcpStream> {
    fn kind(&self) -> TransportKind {
        TransportKind::Tls
    }
    fn peer(&self) -> String {
        self.get_ref().0.peer()
    }
    fn tcp_snapshot(&self) -> Option<tether_core::diagnosis::TcpSnapshot> {
        tcp_info(self.get_ref().0)
    }
}

/// The crypto provider every configuration here uses.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn invalid(path: &Path, what: &str, e: impl std::fmt::Display) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("{}: {what}: {e}", path.display()),
    )
}

/// Every certificate in a PEM file, leaf first.
pub fn load_certs(path: &Path) -> io::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| invalid(path, "cannot read certificates", e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(path, "bad PEM certificate", e))?;
    if certs.is_empty() {
        return Err(invalid(
            path,
            "no certificate",
            "the file holds no CERTIFICATE block",
        ));
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> io::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| invalid(path, "no usable private key", e))
}

/// A server configuration for `cert` (chain PEM) and `key` (PEM), offering `alpn`.
pub fn server_config(
    cert: &Path,
    key: &Path,
    alpn: &[&[u8]],
) -> io::Result<Arc<rustls::ServerConfig>> {
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| invalid(cert, "certificate and key do not form a usable pair", e))?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // No session tickets or cache held per connection: resumption is not worth its
    // memory for connections that live for hours.
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client configuration trusting `ca` (PEM) if given, else the system's roots,
/// offering `alpn`.
pub fn client_config(ca: Option<&Path>, alpn: &[&[u8]]) -> io::Result<Arc<rustls::ClientConfig>> {
    let mut roots = rustls::RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in load_certs(path)? {
                roots
                    .add(cert)
                    .map_err(|e| invalid(path, "unusable CA certificate", e))?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "no system root certificates found ({} errors); give a CA file",
                        found.errors.len()
                    ),
                ));
            }
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// The name a client checks the server's certificate against: the host part of
/// `host:port` (brackets of an IPv6 literal removed).
pub fn server_name(host_port: &str) -> io::Result<ServerName<'static>> {
    let host = match host_port.rsplit_once(':') {
        Some((host, port)) if port.parse::<u16>().is_ok() => host,
        _ => host_port,
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{host}: not a valid TLS server name: {e}"),
        )
    })
}

/// Connects TLS over an already connected TCP stream.
pub async fn connect(
    config: Arc<rustls::ClientConfig>,
    host_port: &str,
    tcp: TcpStream,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let name = server_name(host_port)?;
    TlsConnector::from(config).connect(name, tcp).await
}

/// The client side of TLS over TCP, with the preamble queued.
pub async fn connect_transport(
    config: Arc<rustls::ClientConfig>,
    host_port: &str,
    addr: SocketAddr,
    max_frame: usize,
) -> io::Result<TlsClientTransport> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let tls = connect(config, host_port, tcp).await?;
    Ok(StreamTransport::client(tls, max_frame))
}

/// The rustls error inside an I/O error from a TLS handshake, if that is what it is.
pub fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// Whether an error means the peer's certificate was refused: not something retrying
/// will fix.
pub fn is_certificate_error(e: &io::Error) -> bool {
    matches!(
        rustls_error(e),
        Some(
            rustls::Error::InvalidCertificate(_)
                | rustls::Error::NoCertificatesPresented
                | rustls::Error::UnsupportedNameType
        )
    )
}

/// A self-signed development certificate and its key, both PEM, valid for `hosts`
/// (DNS names or IP addresses) for `days` days from now.
pub fn self_signed(hosts: &[String], days: u32) -> io::Result<(String, String)> {
    let mut params = rcgen::CertificateParams::new(hosts.to_vec()).map_err(io::Error::other)?;
    let start = time::OffsetDateTime::now_utc();
    params.not_before = start - time::Duration::seconds(60);
    params.not_after = start + time::Duration::days(i64::from(days));
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Tether development certificate");
    let key = rcgen::KeyPair::generate().map_err(io::Error::other)?;
    let cert = params.self_signed(&key).map_err(io::Error::other)?;
    Ok((cert.pem(), key.serialize_pem()))
}
