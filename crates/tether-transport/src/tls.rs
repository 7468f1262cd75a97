//! TLS (rustls, ring provider): the same framing as plain TCP inside TLS, plus what
//! every TLS-speaking part of Tether shares: loading certificates and keys, server and
//! client configurations (TLS over TCP, WSS and QUIC differ only in ALPN), and a
//! self-signed development certificate.
//!
//! Clients verify the server against a CA file when one is given, else the system's
//! roots. There is no switch to skip verification.

use crate::TransportKind;
use crate::records::OwnRecords;
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
    // A TLS 1.3 session over TCP leaves rustls's record layer for Tether's smaller one
    // (`LeanTlsStream`), which needs its traffic secrets.
    config.enable_secret_extraction = true;
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

/// The server side of TLS over TCP, holding no buffer while idle (DESIGN §10):
/// ciphertext is read into the caller's buffer (the per-thread scratch of
/// [`StreamTransport`]) and the plaintext is put back in its place; only the tail of a
/// partial record is kept, and only until it completes; outgoing records exist only
/// until the socket takes them.
///
/// rustls runs the handshake on its unbuffered API. A TLS 1.3 session then moves to
/// Tether's own record layer over rustls's kernel-TLS interface ([`crate::records`]),
/// so what stays per session is its traffic keys, sequence numbers and rustls's key
/// schedule; a TLS 1.2 session stays on rustls's connection.
///
/// rustls's buffered connection keeps a read buffer of at least 4 KiB for the life of
/// the connection, which alone is the whole DESIGN §8 budget for a TLS session.
pub struct LeanTlsStream {
    tcp: TcpStream,
    records: Records,
    /// Ciphertext not yet processed (a partial record); empty when idle.
    tls_in: Vec<u8>,
    /// Plaintext that came with the handshake's last flight, not yet read.
    early: Vec<u8>,
    /// Ciphertext waiting for the socket; empty when idle.
    out: Vec<u8>,
    outpos: usize,
    /// The peer sent close_notify (or the socket ended): reads return end of stream.
    eof: bool,
    /// This side sealed its close_notify.
    closing: bool,
}

/// Ciphertext this side may hold for a peer that does not read before it stops
/// reading (and so stops sealing KeyUpdate answers) or writing.
const MAX_OUT: usize = 64 * 1024;

/// Who seals and opens a session's records.
enum Records {
    /// TLS 1.3: Tether's record layer; rustls keeps the key schedule.
    Own(Box<OwnRecords>),
    /// TLS 1.2: rustls's connection (about 1.2 KB, and its keys beside it).
    Rustls(Box<rustls::server::UnbufferedServerConnection>),
}

impl std::fmt::Debug for LeanTlsStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LeanTlsStream")
            .field("peer", &self.tcp.peer())
            .field("own_records", &matches!(self.records, Records::Own(_)))
            .finish_non_exhaustive()
    }
}

/// Whole frames over TLS, server side. The stream is boxed, so that a session's
/// future holds one pointer to it, not the stream in several places.
pub type TlsServerTransport = StreamTransport<Box<LeanTlsStream>>;

fn tls_io(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("TLS: {e}"))
}

/// The length of the first complete TLS record in `buf`, if there is one.
fn first_record(buf: &[u8]) -> Option<usize> {
    let header = buf.get(..5)?;
    let len = 5 + usize::from(u16::from_be_bytes([header[3], header[4]]));
    (buf.len() >= len).then_some(len)
}

/// Appends what `encode` writes to `out`, growing it as rustls asks.
fn encode_into(
    out: &mut Vec<u8>,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, usize>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = 1024;
    loop {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(required) if required > room => room = required,
            Err(_) => {
                out.truncate(start);
                return Err(tls_io("encoder refused a large enough buffer"));
            }
        }
    }
}

fn encode_size(e: rustls::unbuffered::EncodeError) -> usize {
    match e {
        rustls::unbuffered::EncodeError::InsufficientSize(i) => i.required_size,
        _ => 0,
    }
}

fn encrypt_size(e: rustls::unbuffered::EncryptError) -> usize {
    match e {
        rustls::unbuffered::EncryptError::InsufficientSize(i) => i.required_size,
        _ => 0,
    }
}

impl LeanTlsStream {
    /// Runs the server handshake on `tcp` (bound the call with a deadline). The
    /// configuration must allow secret extraction ([`server_config`] does) for a TLS
    /// 1.3 session to move to Tether's record layer; otherwise it stays on rustls's.
    pub async fn accept(tcp: TcpStream, config: Arc<rustls::ServerConfig>) -> io::Result<Self> {
        use rustls::unbuffered::ConnectionState;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Half-RTT data would reach the write state before the client's Finished.
        let extract = config.enable_secret_extraction && !config.send_half_rtt_data;
        let mut conn = rustls::server::UnbufferedServerConnection::new(config).map_err(tls_io)?;
        let mut incoming: Vec<u8> = Vec::new();
        let mut used = 0;
        let mut outgoing: Vec<u8> = Vec::new();
        let mut early: Vec<u8> = Vec::new();
        let mut tcp = tcp;
        // rustls is given one more complete record only when it holds nothing or asks
        // for more, so it stops right after the client's Finished: what follows in the
        // same read (application data, a KeyUpdate) is left to the record layer that
        // takes over, not half-handled inside rustls (a KeyUpdate's answer would stay
        // queued there, unsent). `fed`: bytes at the front rustls has been given.
        let mut fed = 0;
        let mut blocked = false;
        loop {
            // Known from the ServerHello on, long before the write state.
            let tls13 = conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
            let next = if fed == 0 || blocked {
                first_record(&incoming[fed..used]).unwrap_or(0)
            } else {
                0
            };
            // With no complete record to give, rustls sees the partial one, so that it
            // refuses a bad header (not TLS at all) before waiting for the rest.
            let complete = fed + next;
            let limit = if next == 0 { used } else { complete };
            let status = conn.process_tls_records(&mut incoming[..limit]);
            let mut discard = status.discard;
            blocked = false;
            let mut need_read = false;
            let mut done = false;
            match status.state.map_err(tls_io)? {
                ConnectionState::EncodeTlsData(mut s) => {
                    encode_into(&mut outgoing, |buf| s.encode(buf).map_err(encode_size))?;
                }
                ConnectionState::TransmitTlsData(s) => {
                    tcp.write_all(&outgoing).await?;
                    outgoing = Vec::new();
                    s.done();
                }
                ConnectionState::BlockedHandshake => {
                    blocked = true;
                    need_read = first_record(&incoming[limit..used]).is_none();
                }
                // Application data that came with the client's Finished: taken out,
                // so that nothing is left inside rustls when the session leaves it.
                ConnectionState::ReadTraffic(mut r) => {
                    let mut any = false;
                    while let Some(record) = r.next_record() {
                        let record = record.map_err(tls_io)?;
                        discard += record.discard;
                        early.extend_from_slice(record.payload);
                        any = true;
                    }
                    done = !any;
                }
                ConnectionState::WriteTraffic(_) => done = true,
                ConnectionState::PeerClosed | ConnectionState::Closed => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS: the peer closed during the handshake",
                    ));
                }
                _ => return Err(tls_io("unexpected state during the handshake")),
            }
            if discard > 0 {
                incoming.copy_within(discard..used, 0);
                used -= discard;
            }
            fed = complete.saturating_sub(discard);
            if done {
                incoming.truncate(used);
                let tls_in = if incoming.is_empty() {
                    Vec::new()
                } else {
                    incoming
                };
                // Own records only from a clean cut: rustls holds no bytes of a record.
                let records = if tls13 && extract && fed == 0 {
                    Records::Own(Box::new(OwnRecords::new(conn)?))
                } else {
                    Records::Rustls(Box::new(conn))
                };
                early.shrink_to_fit();
                return Ok(Self {
                    tcp,
                    records,
                    tls_in,
                    early,
                    out: Vec::new(),
                    outpos: 0,
                    eof: false,
                    closing: false,
                });
            }
            if need_read {
                if incoming.len() < used + 4096 {
                    incoming.resize(used + 4096, 0);
                }
                if used >= 64 * 1024 {
                    return Err(tls_io("handshake message too large"));
                }
                let n = tcp.read(&mut incoming[used..]).await?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "TLS: the peer closed during the handshake",
                    ));
                }
                used += n;
            }
        }
    }

    /// Whether the session runs on Tether's own record layer (TLS 1.3).
    pub fn own_records(&self) -> bool {
        matches!(self.records, Records::Own(_))
    }

    /// Decrypts the complete records at the front of `buf[..have]` in place and moves
    /// their plaintext to the front; returns (plaintext length, bytes consumed).
    fn decrypt_in_place(&mut self, buf: &mut [u8], have: usize) -> io::Result<(usize, usize)> {
        match &mut self.records {
            Records::Own(own) => own.open(buf, have, &mut self.out, &mut self.eof),
            Records::Rustls(conn) => rustls_decrypt(conn, buf, have, &mut self.out, &mut self.eof),
        }
    }

    /// Seals `data` into `out`.
    fn encrypt(&mut self, data: &[u8]) -> io::Result<()> {
        match &mut self.records {
            Records::Own(own) => own.seal(data, &mut self.out),
            Records::Rustls(conn) => rustls_write(conn, &mut self.out, |w, out| {
                encode_into(out, |buf| w.encrypt(data, buf).map_err(encrypt_size))
            }),
        }
    }

    /// Queues a close_notify alert into `out`.
    fn close_notify(&mut self) -> io::Result<()> {
        match &mut self.records {
            Records::Own(own) => own.close_notify(&mut self.out),
            Records::Rustls(conn) => rustls_write(conn, &mut self.out, |w, out| {
                encode_into(out, |buf| w.queue_close_notify(buf).map_err(encrypt_size))
            }),
        }
    }

    fn poll_write_out(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        while self.outpos < self.out.len() {
            match std::pin::Pin::new(&mut self.tcp).poll_write(cx, &self.out[self.outpos..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => self.outpos += n,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out = Vec::new();
        self.outpos = 0;
        Poll::Ready(Ok(()))
    }
}

/// Brings a rustls connection to its write state, encoding anything it must send
/// first (a key update answer) into `out`; then runs `f` on it.
fn rustls_write<R>(
    conn: &mut rustls::server::UnbufferedServerConnection,
    out: &mut Vec<u8>,
    mut f: impl FnMut(
        &mut rustls::unbuffered::WriteTraffic<'_, rustls::server::ServerConnectionData>,
        &mut Vec<u8>,
    ) -> io::Result<R>,
) -> io::Result<R> {
    use rustls::unbuffered::ConnectionState;
    loop {
        let status = conn.process_tls_records(&mut []);
        match status.state.map_err(tls_io)? {
            ConnectionState::WriteTraffic(mut w) => return f(&mut w, out),
            ConnectionState::EncodeTlsData(mut s) => {
                encode_into(out, |buf| s.encode(buf).map_err(encode_size))?
            }
            ConnectionState::TransmitTlsData(s) => s.done(),
            ConnectionState::Closed | ConnectionState::PeerClosed => {
                return Err(io::Error::new(io::ErrorKind::BrokenPipe, "TLS: closed"));
            }
            _ => return Err(tls_io("not ready to send")),
        }
    }
}

/// [`LeanTlsStream::decrypt_in_place`] on a rustls connection.
fn rustls_decrypt(
    conn: &mut rustls::server::UnbufferedServerConnection,
    buf: &mut [u8],
    have: usize,
    out: &mut Vec<u8>,
    eof: &mut bool,
) -> io::Result<(usize, usize)> {
    use rustls::unbuffered::ConnectionState;
    let mut consumed = 0;
    let mut plain = 0;
    loop {
        // This rustls hands out each record's plaintext in a buffer of its own.
        let mut pieces: Vec<Vec<u8>> = Vec::new();
        let status = conn.process_tls_records(&mut buf[consumed..have]);
        let mut discard = status.discard;
        let mut more = false;
        match status.state.map_err(tls_io)? {
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(record) = r.next_record() {
                    let record = record.map_err(tls_io)?;
                    discard += record.discard;
                    pieces.push(record.payload.to_vec());
                }
                more = true;
            }
            ConnectionState::EncodeTlsData(mut s) => {
                encode_into(out, |b| s.encode(b).map_err(encode_size))?;
                more = true;
            }
            ConnectionState::TransmitTlsData(s) => {
                s.done();
                more = true;
            }
            ConnectionState::PeerClosed | ConnectionState::Closed => *eof = true,
            ConnectionState::WriteTraffic(_) | ConnectionState::BlockedHandshake => {}
            _ => return Err(tls_io("unexpected state")),
        }
        for piece in pieces {
            // Plaintext is never longer than the record it came in, so it lands
            // below `consumed + discard`, on bytes already processed.
            buf[plain..plain + piece.len()].copy_from_slice(&piece);
            plain += piece.len();
        }
        consumed += discard;
        if !more {
            return Ok((plain, consumed));
        }
    }
}

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

impl AsyncRead for LeanTlsStream {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if !this.early.is_empty() {
            let n = this.early.len().min(buf.remaining());
            buf.put_slice(&this.early[..n]);
            this.early.drain(..n);
            if this.early.is_empty() {
                this.early = Vec::new();
            }
            return Poll::Ready(Ok(()));
        }
        if this.eof {
            return Poll::Ready(Ok(()));
        }
        // A peer that does not read its socket gets nothing more read from it either:
        // what reading seals for it (KeyUpdate answers) would pile up here.
        if this.out.len() - this.outpos >= MAX_OUT {
            match this.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let dst = buf.initialize_unfilled();
        let mut have = this.tls_in.len();
        if have >= dst.len() {
            return Poll::Ready(Err(tls_io("record larger than the read buffer")));
        }
        dst[..have].copy_from_slice(&this.tls_in);
        this.tls_in = Vec::new();
        loop {
            // Even with no new bytes: rustls may hold plaintext it decrypted already
            // (records that came with the last handshake flight).
            {
                let (plain, consumed) = match this.decrypt_in_place(dst, have) {
                    Ok(done) => done,
                    Err(e) => {
                        // The alert owed to the peer goes if the socket takes it now.
                        let _ = this.poll_write_out(cx);
                        return Poll::Ready(Err(e));
                    }
                };
                // Anything owed to the peer (a key update answer) leaves now if it
                // can; otherwise with the next flush.
                if !this.out.is_empty() {
                    let _ = this.poll_write_out(cx)?;
                }
                if plain > 0 {
                    if consumed < have && !this.eof {
                        this.tls_in = dst[consumed..have].to_vec();
                    }
                    buf.advance(plain);
                    return Poll::Ready(Ok(()));
                }
                if consumed > 0 {
                    dst.copy_within(consumed..have, 0);
                    have -= consumed;
                }
                if this.eof {
                    return Poll::Ready(Ok(()));
                }
            }
            if have >= dst.len() {
                return Poll::Ready(Err(tls_io("record larger than the read buffer")));
            }
            let mut rb = ReadBuf::new(&mut dst[have..]);
            match std::pin::Pin::new(&mut this.tcp).poll_read(cx, &mut rb) {
                Poll::Pending => {
                    if have > 0 {
                        this.tls_in = dst[..have].to_vec();
                    }
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        // The socket ended without close_notify.
                        this.eof = true;
                        return Poll::Ready(if have > 0 {
                            Err(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "TLS: stream ended inside a record",
                            ))
                        } else {
                            Ok(())
                        });
                    }
                    have += n;
                }
            }
        }
    }
}

impl AsyncWrite for LeanTlsStream {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        use std::task::Poll;
        let this = self.get_mut();
        // Keep what waits for the socket bounded: push it out first.
        if this.out.len() - this.outpos >= MAX_OUT {
            match this.poll_write_out(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        let take = data.len().min(64 * 1024);
        this.encrypt(&data[..take])?;
        Poll::Ready(Ok(take))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.get_mut().poll_write_out(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        use std::task::Poll;
        let this = self.get_mut();
        if !this.closing {
            this.closing = true;
            // Best effort: a session that failed may not be able to seal any more.
            let _ = this.close_notify();
        }
        // What is queued, close_notify last, goes before the FIN.
        match this.poll_write_out(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
            Poll::Ready(Ok(())) => {}
        }
        std::pin::Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

impl StreamIo for LeanTlsStream {
    fn kind(&self) -> TransportKind {
        TransportKind::Tls
    }
    fn peer(&self) -> String {
        self.tcp.peer()
    }
    fn tcp_snapshot(&self) -> Option<tether_core::diagnosis::TcpSnapshot> {
        tcp_info(&self.tcp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Transport, flush, recv};
    use tether_proto::{Frame, frame, pb};

    /// A server and a client config trusting it, for 127.0.0.1.
    fn configs(dir: &Path) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let (cert, key) = self_signed(&["127.0.0.1".into()], 1).unwrap();
        std::fs::write(dir.join("c.pem"), cert).unwrap();
        std::fs::write(dir.join("k.pem"), key).unwrap();
        (
            server_config(&dir.join("c.pem"), &dir.join("k.pem"), &[ALPN]).unwrap(),
            client_config(Some(&dir.join("c.pem")), &[ALPN]).unwrap(),
        )
    }

    async fn pair() -> (TlsServerTransport, TlsClientTransport) {
        pair_with(|_, c| c).await
    }

    /// A session whose client configuration `tweak` changed.
    async fn pair_with(
        tweak: impl FnOnce(&Path, Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig>,
    ) -> (TlsServerTransport, TlsClientTransport) {
        let dir = std::env::temp_dir().join(format!("tether-tls-{}", rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let (server, client) = configs(&dir);
        let client = tweak(&dir, client);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            LeanTlsStream::accept(tcp, server).await.unwrap()
        };
        let host = addr.to_string();
        let connect = connect_transport(client, &host, addr, 1 << 20);
        let (s, c) = tokio::join!(accept, connect);
        (StreamTransport::server(Box::new(s), 1 << 20), c.unwrap())
    }

    fn rand_suffix() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    }

    #[tokio::test]
    async fn frames_cross_both_ways_and_the_idle_server_keeps_no_buffers() {
        let (mut s, mut c) = pair().await;
        for round in 0..3u64 {
            // Many small frames, then one larger than a TLS record (16 KiB).
            for i in 0..200u64 {
                c.send(&Frame::Ack(pb::Ack {
                    seq: round * 1000 + i,
                }))
                .unwrap();
            }
            let big = Frame::Send(pb::Send {
                client_msg_id: vec![1u8; 16].into(),
                target: Some(pb::send::Target::User("bob".into())),
                body: vec![b'x'; 40_000].into(),
                ..Default::default()
            });
            c.send(&big).unwrap();
            flush(&mut c).await.unwrap();
            for i in 0..200u64 {
                let raw = recv(&mut s).await.unwrap().unwrap();
                assert_eq!(
                    frame::from_raw(&raw).unwrap(),
                    Frame::Ack(pb::Ack {
                        seq: round * 1000 + i
                    })
                );
            }
            assert_eq!(
                frame::from_raw(&recv(&mut s).await.unwrap().unwrap()).unwrap(),
                big
            );
            s.send(&Frame::Pong(pb::Pong::default())).unwrap();
            flush(&mut s).await.unwrap();
            let raw = recv(&mut c).await.unwrap().unwrap();
            assert_eq!(
                frame::from_raw(&raw).unwrap(),
                Frame::Pong(pb::Pong::default())
            );
            let io = s.io();
            assert_eq!(
                (io.tls_in.capacity(), io.out.capacity()),
                (0, 0),
                "an idle TLS session holds no buffer"
            );
        }
        // close_notify from the client is an orderly end of stream.
        c.shutdown();
        flush(&mut c).await.unwrap();
        assert!(recv(&mut s).await.unwrap().is_none());
    }

    fn ack(seq: u64) -> Frame {
        Frame::Ack(pb::Ack { seq })
    }

    /// Sends `n` ACKs from `from` and checks that `to` gets them, in order.
    async fn exchange<A: Transport, B: Transport>(from: &mut A, to: &mut B, base: u64, n: u64) {
        for i in 0..n {
            from.send(&ack(base + i)).unwrap();
        }
        flush(from).await.unwrap();
        for i in 0..n {
            let raw = recv(to).await.unwrap().expect("a frame");
            assert_eq!(frame::from_raw(&raw).unwrap(), ack(base + i));
        }
    }

    /// Records the TLS layer took but the socket had no room for are reported as a
    /// pending flush even when nothing is queued above them. The connection loops
    /// flushed only while `queued_bytes` was non-zero: woken when the socket drained,
    /// they left those records waiting for the next frame sent, up to a heartbeat later.
    #[tokio::test]
    async fn records_waiting_in_the_tls_layer_keep_the_flush_pending() {
        let (mut s, mut c) = pair().await;
        socket2::SockRef::from(&s.io().tcp)
            .set_send_buffer_size(16 * 1024)
            .unwrap();
        let message = |i: u64| {
            Frame::Send(pb::Send {
                client_msg_id: [i.to_be_bytes(), [0; 8]].concat().into(),
                target: Some(pb::send::Target::User("bob".into())),
                body: vec![b'x'; 1000].into(),
                content_type: String::new(),
            })
        };
        // The client reads nothing: send one frame at a time until a flush cannot
        // finish. Every flush before it finished, so the layer took that last frame.
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut sent = 0u64;
        loop {
            s.send(&message(sent)).unwrap();
            sent += 1;
            match s.poll_flush(&mut cx) {
                std::task::Poll::Ready(r) => r.unwrap(),
                std::task::Poll::Pending => break,
            }
            assert!(sent < 100_000, "the socket never filled");
        }
        assert_eq!(s.queued_bytes(), 0, "the TLS layer took the last frame");
        assert!(s.flush_pending(), "its records still wait for the socket");
        // Without another flush the client cannot get the last frame whole.
        let mut got = 0u64;
        while let Ok(raw) =
            tokio::time::timeout(std::time::Duration::from_millis(300), recv(&mut c)).await
        {
            let Frame::Send(m) = frame::from_raw(&raw.unwrap().unwrap()).unwrap() else {
                panic!("not a SEND")
            };
            assert_eq!(&m.client_msg_id[..8], got.to_be_bytes());
            got += 1;
        }
        assert!(
            got < sent,
            "all {sent} frames arrived without the last flush"
        );
        // The flush the loop now makes when the socket drains delivers the rest.
        let rest = async {
            while got < sent {
                recv(&mut c).await.unwrap().unwrap();
                got += 1;
            }
        };
        let (flushed, ()) = tokio::join!(flush(&mut s), rest);
        flushed.unwrap();
        assert!(!s.flush_pending());
    }

    #[tokio::test]
    async fn a_tls13_session_runs_on_tethers_record_layer_through_key_updates_both_ways() {
        let (mut s, mut c) = pair().await;
        assert!(s.io().own_records(), "TLS 1.3 leaves rustls's record layer");
        exchange(&mut c, &mut s, 0, 50).await;
        exchange(&mut s, &mut c, 100, 50).await;
        // The client changes its key and asks for ours (KeyUpdate, update_requested):
        // the server must open the client's records under the new key, and the client
        // the server's under the server's new one.
        for round in 0..3u64 {
            c.io_mut().get_mut().1.refresh_traffic_keys().unwrap();
            exchange(&mut c, &mut s, 1000 * round, 20).await;
            exchange(&mut s, &mut c, 1000 * round + 500, 20).await;
        }
        // The server changes its own key before its confidentiality limit.
        let Records::Own(own) = &mut s.io_mut().records else {
            unreachable!()
        };
        own.set_tx_limit(7);
        exchange(&mut s, &mut c, 5000, 40).await;
        let Records::Own(own) = &s.io().records else {
            unreachable!()
        };
        assert!(own.tx_seq() < 7, "sealed {} under one key", own.tx_seq());
        exchange(&mut c, &mut s, 6000, 5).await;
        let io = s.io();
        assert_eq!((io.tls_in.capacity(), io.out.capacity()), (0, 0));
    }

    #[tokio::test]
    async fn a_tls12_session_stays_on_rustls() {
        let (mut s, mut c) = pair_with(|dir, _| {
            let mut roots = rustls::RootCertStore::empty();
            roots.add_parsable_certificates(load_certs(&dir.join("c.pem")).unwrap());
            let mut config = rustls::ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(&[&rustls::version::TLS12])
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth();
            config.alpn_protocols = vec![ALPN.to_vec()];
            Arc::new(config)
        })
        .await;
        assert!(!s.io().own_records());
        exchange(&mut c, &mut s, 0, 30).await;
        exchange(&mut s, &mut c, 100, 30).await;
    }

    #[tokio::test]
    async fn bad_records_after_the_handshake_are_errors_not_panics() {
        use tokio::io::AsyncWriteExt;
        let cases: [(&str, Vec<u8>); 5] = [
            (
                "failed authentication",
                [&[23u8, 3, 3, 0, 40][..], &[7u8; 40]].concat(),
            ),
            ("record of type 20", vec![20, 3, 3, 0, 1, 1]),
            (
                "record of type 22",
                [&[22u8, 3, 3, 0, 20][..], &[0u8; 20]].concat(),
            ),
            ("a record of 65535 bytes", vec![23, 3, 3, 0xff, 0xff]),
            ("a record of 5 bytes", vec![23, 3, 3, 0, 5, 1, 2, 3, 4, 5]),
        ];
        for (expected, bytes) in cases {
            let dir = std::env::temp_dir().join(format!("tether-tls-{}", rand_suffix()));
            std::fs::create_dir_all(&dir).unwrap();
            let (server, client) = configs(&dir);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let accept = async {
                let (tcp, _) = listener.accept().await.unwrap();
                LeanTlsStream::accept(tcp, server).await.unwrap()
            };
            let host = addr.to_string();
            let connect = async {
                let tcp = TcpStream::connect(addr).await.unwrap();
                connect(client, &host, tcp).await.unwrap()
            };
            let (s, c) = tokio::join!(accept, connect);
            let mut s = StreamTransport::server(Box::new(s), 1 << 20);
            // Past TLS, the client's socket writes whatever it is given.
            let (mut tcp, _) = c.into_inner();
            tcp.write_all(&bytes).await.unwrap();
            let err = recv(&mut s).await.expect_err(expected);
            assert!(err.to_string().contains(expected), "{expected}: got {err}");
        }
    }

    #[tokio::test]
    async fn a_flood_of_key_updates_ends_the_session() {
        let (mut s, mut c) = pair().await;
        // Each KeyUpdate asks for the server's too. Up to 32 in a row are fine.
        for round in 0..3 {
            for _ in 0..30 {
                c.io_mut().get_mut().1.refresh_traffic_keys().unwrap();
            }
            exchange(&mut c, &mut s, round * 10, 3).await;
            exchange(&mut s, &mut c, round * 10 + 5, 3).await;
        }
        // More is a peer making the server seal answers it may never read.
        for _ in 0..40 {
            c.io_mut().get_mut().1.refresh_traffic_keys().unwrap();
        }
        c.send(&ack(2)).unwrap();
        flush(&mut c).await.unwrap();
        let err = recv(&mut s).await.expect_err("too many empty records");
        assert!(
            err.to_string().contains("records in a row without data"),
            "{err}"
        );
    }

    /// OpenSSL's `s_client` sends a KeyUpdate as soon as it is asked, which can reach
    /// the server in the same read as the client's Finished. A proxy holds the client's
    /// second flight back for 300 ms so that it always does here.
    #[tokio::test]
    async fn a_key_update_in_the_same_read_as_the_clients_finished_is_answered() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("tether-tls-{}", rand_suffix()));
        std::fs::create_dir_all(&dir).unwrap();
        let (server, client) = configs(&dir);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy_addr = front.local_addr().unwrap();
        tokio::spawn(async move {
            let (c, _) = front.accept().await.unwrap();
            let s = TcpStream::connect(addr).await.unwrap();
            let (mut cr, mut cw) = c.into_split();
            let (mut sr, mut sw) = s.into_split();
            tokio::spawn(async move { tokio::io::copy(&mut sr, &mut cw).await });
            let mut buf = vec![0u8; 65536];
            let n = cr.read(&mut buf).await.unwrap(); // the ClientHello
            sw.write_all(&buf[..n]).await.unwrap();
            let n = cr.read(&mut buf).await.unwrap(); // Finished, and what follows it
            let mut held = buf[..n].to_vec();
            let until = tokio::time::Instant::now() + std::time::Duration::from_millis(300);
            while let Ok(Ok(n)) = tokio::time::timeout_at(until, cr.read(&mut buf)).await {
                if n == 0 {
                    break;
                }
                held.extend_from_slice(&buf[..n]);
            }
            sw.write_all(&held).await.unwrap();
            let _ = tokio::io::copy(&mut cr, &mut sw).await;
        });
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            LeanTlsStream::accept(tcp, server).await.unwrap()
        };
        let connect = async {
            let mut c = connect_transport(client, &addr.to_string(), proxy_addr, 1 << 20)
                .await
                .unwrap();
            // Straight after the handshake: a KeyUpdate asking for the server's, and data.
            c.io_mut().get_mut().1.refresh_traffic_keys().unwrap();
            c.send(&ack(7)).unwrap();
            flush(&mut c).await.unwrap();
            c
        };
        let (s, mut c) = tokio::join!(accept, connect);
        let mut s = StreamTransport::server(Box::new(s), 1 << 20);
        assert!(s.io().own_records());
        let raw = recv(&mut s).await.unwrap().expect("a frame");
        assert_eq!(frame::from_raw(&raw).unwrap(), ack(7));
        // The client reads the server only if the answer went out before the new key.
        exchange(&mut s, &mut c, 100, 10).await;
        exchange(&mut c, &mut s, 200, 10).await;
    }
}
