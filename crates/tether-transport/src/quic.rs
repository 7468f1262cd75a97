//! QUIC (quinn): one bidirectional stream per session carrying the same frames as TCP,
//! preamble included, under ALPN `tether/1`.
//!
//! Liveness is the application heartbeat's job (DESIGN §4): QUIC keep-alive is off,
//! and QUIC's own idle timeout is set above the heartbeat's deadline so it never fires
//! first on a healthy session. A client whose local address changes keeps its session
//! ([`StreamIo::rebind`] moves the endpoint to a fresh UDP socket); the server follows
//! the new path, logs it and counts it ([`migrations`]).

use crate::TransportKind;
use crate::tcp::{StreamIo, StreamTransport};
use crate::tls::ALPN;
use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub use quinn::{Connection, Endpoint, Incoming};

/// How long a closing stream may take to have its last bytes acknowledged.
const LINGER: Duration = Duration::from_secs(2);

static MIGRATIONS: AtomicU64 = AtomicU64::new(0);

/// Server-side sessions whose client moved to a new address, since the process started.
pub fn migrations() -> u64 {
    MIGRATIONS.load(Ordering::Relaxed)
}

/// Whole frames over one QUIC stream.
pub type QuicTransport = StreamTransport<QuicStream>;

/// One bidirectional stream of a QUIC connection, as a byte stream.
pub struct QuicStream {
    send: Option<quinn::SendStream>,
    recv: quinn::RecvStream,
    conn: quinn::Connection,
    /// The client's own endpoint (its UDP socket); `None` on the server.
    endpoint: Option<quinn::Endpoint>,
    /// The peer address last seen, to notice migrations.
    remote: SocketAddr,
}

impl std::fmt::Debug for QuicStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicStream")
            .field("remote", &self.remote)
            .finish_non_exhaustive()
    }
}

impl QuicStream {
    /// The connection this stream belongs to.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    fn send(&mut self) -> io::Result<&mut quinn::SendStream> {
        self.send
            .as_mut()
            .ok_or_else(|| io::Error::new(io::ErrorKind::BrokenPipe, "stream closed"))
    }

    fn note_path(&mut self) {
        let now = self.conn.remote_address();
        if now != self.remote && self.endpoint.is_none() {
            MIGRATIONS.fetch_add(1, Ordering::Relaxed);
            tracing::info!(from = %self.remote, to = %now, "QUIC client migrated to a new address");
        }
        self.remote = now;
    }
}

impl AsyncRead for QuicStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let result = Pin::new(&mut self.recv).poll_read(cx, buf);
        if result.is_ready() {
            self.note_path();
        }
        result
    }
}

impl AsyncWrite for QuicStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.send() {
            Ok(send) => Pin::new(send).poll_write(cx, buf).map_err(io::Error::from),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.send() {
            Ok(send) => Pin::new(send).poll_flush(cx),
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(send) = self.send.as_mut() {
            let _ = send.finish();
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for QuicStream {
    /// Keeps the connection open until the peer has acknowledged the last bytes (an
    /// ERROR or GOAWAY written just before the close), then closes it; bounded by
    /// [`LINGER`]. Dropping a quinn connection outright would abandon them.
    fn drop(&mut self) {
        let (Some(mut send), Ok(rt)) = (self.send.take(), tokio::runtime::Handle::try_current())
        else {
            return;
        };
        let conn = self.conn.clone();
        let endpoint = self.endpoint.take();
        rt.spawn(async move {
            let _ = send.finish();
            let _ = tokio::time::timeout(LINGER, send.stopped()).await;
            conn.close(0u32.into(), b"closed");
            if let Some(endpoint) = endpoint {
                let _ = tokio::time::timeout(LINGER, endpoint.wait_idle()).await;
            }
        });
    }
}

impl StreamIo for QuicStream {
    fn kind(&self) -> TransportKind {
        TransportKind::Quic
    }

    fn peer(&self) -> String {
        self.conn.remote_address().to_string()
    }

    fn rebind(&mut self) -> Option<io::Result<SocketAddr>> {
        let endpoint = self.endpoint.as_ref()?;
        Some((|| {
            let old = endpoint.local_addr()?;
            let unspecified: SocketAddr = match old {
                SocketAddr::V4(_) => ([0, 0, 0, 0], 0).into(),
                SocketAddr::V6(_) => ([0u16; 8], 0).into(),
            };
            let socket = UdpSocket::bind(SocketAddr::new(
                if old.ip().is_unspecified() {
                    unspecified.ip()
                } else {
                    old.ip()
                },
                0,
            ))?;
            endpoint.rebind(socket)?;
            let new = endpoint.local_addr()?;
            tracing::info!(from = %old, to = %new, "QUIC endpoint moved to a new UDP socket");
            Ok(new)
        })())
    }
}

/// Transport settings shared by both ends: no keep-alive (the heartbeat decides
/// liveness), an idle timeout of `idle`, one bidirectional stream.
fn transport_config(idle: Duration) -> io::Result<Arc<quinn::TransportConfig>> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(None);
    t.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(idle).map_err(io::Error::other)?,
    ));
    t.max_concurrent_bidi_streams(1u32.into());
    t.max_concurrent_uni_streams(0u32.into());
    Ok(Arc::new(t))
}

/// A server endpoint on `addr` for `tls` (whose ALPN must be `tether/1`); QUIC's idle
/// timeout is `idle` (set it above the longest heartbeat deadline).
pub fn server_endpoint(
    addr: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    idle: Duration,
) -> io::Result<Endpoint> {
    let crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(io::Error::other)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport_config(idle)?);
    config.migration(true);
    Endpoint::server(config, addr)
}

/// Completes an incoming connection and accepts its stream: the server side of a
/// session. The caller bounds it with the login deadline.
pub async fn accept(incoming: Incoming, max_frame: usize) -> io::Result<QuicTransport> {
    let conn = incoming.await.map_err(io::Error::other)?;
    let (send, recv) = conn.accept_bi().await.map_err(io::Error::other)?;
    let remote = conn.remote_address();
    Ok(StreamTransport::server(
        QuicStream {
            send: Some(send),
            recv,
            conn,
            endpoint: None,
            remote,
        },
        max_frame,
    ))
}

/// Connects to `addr`, checking its certificate against `host_port`'s host, with its
/// own UDP socket; opens the session's stream and queues the preamble.
pub async fn connect(
    tls: Arc<rustls::ClientConfig>,
    host_port: &str,
    addr: SocketAddr,
    idle: Duration,
    max_frame: usize,
) -> io::Result<QuicTransport> {
    let name = crate::tls::server_name(host_port)?;
    let name = match &name {
        rustls::pki_types::ServerName::DnsName(d) => d.as_ref().to_string(),
        rustls::pki_types::ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        _ => host_port.to_string(),
    };
    let bind: SocketAddr = if addr.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        ([0u16; 8], 0).into()
    };
    let endpoint = Endpoint::client(bind)?;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(io::Error::other)?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport_config(idle)?);
    let conn = endpoint
        .connect_with(config, addr, &name)
        .map_err(io::Error::other)?
        .await
        .map_err(connection_error)?;
    let (send, recv) = conn.open_bi().await.map_err(connection_error)?;
    let remote = conn.remote_address();
    Ok(StreamTransport::client(
        QuicStream {
            send: Some(send),
            recv,
            conn,
            endpoint: Some(endpoint),
            remote,
        },
        max_frame,
    ))
}

/// Keeps a handshake's TLS error visible: certificate problems come back as an
/// `io::Error` wrapping the rustls error's text, marked [`io::ErrorKind::InvalidData`].
fn connection_error(e: quinn::ConnectionError) -> io::Error {
    let kind = match &e {
        quinn::ConnectionError::TransportError(t) if t.code.to_string().contains("crypto") => {
            io::ErrorKind::InvalidData
        }
        quinn::ConnectionError::ConnectionClosed(c)
            if c.error_code.to_string().contains("crypto") =>
        {
            io::ErrorKind::InvalidData
        }
        _ => io::ErrorKind::ConnectionAborted,
    };
    io::Error::new(kind, format!("QUIC: {e}"))
}

/// The ALPN list QUIC uses.
pub fn alpn() -> [&'static [u8]; 1] {
    [ALPN]
}
