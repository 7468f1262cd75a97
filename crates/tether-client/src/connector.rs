//! How the driver opens a transport to a server: by URL (TCP, TLS, WebSocket, QUIC),
//! or in memory.
//!
//! The driver only sees a boxed [`Transport`], so the same SDK runs against a real
//! server, an in-process server over [`memory_connector`] (benchmarks holding far more
//! sessions than file descriptors), or a scripted fake peer in tests.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tether_proto::DEFAULT_MAX_FRAME;
use tether_transport::Transport;
use tether_transport::memory::{self, MemoryTransport};
use tether_transport::tcp::{StreamTransport, TcpTransport};
use tether_transport::ws::{self, Encoding};
use tether_transport::{TransportKind, quic, tls};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

/// A connected transport of any kind.
pub type BoxTransport = Box<dyn Transport>;

/// The future [`Connector::connect`] returns.
pub type ConnectFuture<'a> = Pin<Box<dyn Future<Output = io::Result<BoxTransport>> + Send + 'a>>;

/// Opens transports to servers named by the strings in `ClientConfig::servers`.
pub trait Connector: Send + Sync + 'static {
    /// Connects to `server`. For stream transports the preamble is queued already.
    fn connect<'a>(&'a self, server: &'a str) -> ConnectFuture<'a>;

    /// Connects a smart-heartbeat probe (DESIGN §5). Kernel keepalive must stay off on
    /// probes: it would refresh the NAT mapping and hide the interval under test.
    fn connect_probe<'a>(&'a self, server: &'a str) -> ConnectFuture<'a> {
        self.connect(server)
    }
}

/// Opens any network transport, chosen by the server URL's scheme:
///
/// | server | transport |
/// |---|---|
/// | `host:port`, `tcp://host:port` | plain TCP |
/// | `tls://host:port` | TLS over TCP, ALPN `tether/1` |
/// | `ws://host:port[/path]` | WebSocket, `tether.v1.proto` (path defaults to `/ws`) |
/// | `wss://host:port[/path]` | WebSocket over TLS |
/// | `quic://host:port` | one QUIC stream, ALPN `tether/1` |
///
/// A WebSocket URL ending in `?encoding=json` speaks `tether.v1.json` instead. TLS,
/// WSS and QUIC verify the server's certificate against `ca_file` if set, else the
/// system's roots.
#[derive(Debug, Default)]
pub struct NetConnector {
    /// Kernel keepalive idle time: a backstop only, set longer than the heartbeat's
    /// dead-link time so it never does the heartbeat's job (DESIGN §4). `None` = off.
    pub keepalive_idle: Option<Duration>,
    /// TCP_USER_TIMEOUT: the kernel aborts the connection when sent data stays
    /// unacknowledged this long. `None` = the kernel's default.
    pub user_timeout: Option<Duration>,
    /// The CA certificate (PEM) servers are verified against; `None` = system roots.
    pub ca_file: Option<PathBuf>,
    /// Local address TCP connections are bound to before connecting (a load generator
    /// spreads many connections over 127.0.0.x this way); `None` = the kernel chooses.
    pub source: Option<std::net::IpAddr>,
    /// TLS client configurations, built on first use: ALPN `tether/1`, and none (WSS).
    tls: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
    tls_http: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

/// What a server URL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerUrl {
    /// Which transport.
    pub scheme: Scheme,
    /// `host:port`.
    pub host_port: String,
    /// For WebSocket: the full URL to request (no query).
    pub ws_url: String,
    /// For WebSocket: the encoding.
    pub encoding: Encoding,
}

/// A server URL's transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `tcp://` or a bare `host:port`.
    Tcp,
    /// `tls://`.
    Tls,
    /// `ws://`.
    Ws,
    /// `wss://`.
    Wss,
    /// `quic://`.
    Quic,
}

impl Scheme {
    /// The name used in URLs and on the network key of the smart heartbeat.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Tcp => "tcp",
            Scheme::Tls => "tls",
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
            Scheme::Quic => "quic",
        }
    }
}

impl ServerUrl {
    /// Parses a server URL (see [`NetConnector`]).
    pub fn parse(server: &str) -> io::Result<Self> {
        let bad = |why: &str| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("server {server:?}: {why}"),
            )
        };
        let (scheme, rest) = match server.split_once("://") {
            None => (Scheme::Tcp, server),
            Some(("tcp", rest)) => (Scheme::Tcp, rest),
            Some(("tls", rest)) => (Scheme::Tls, rest),
            Some(("ws", rest)) => (Scheme::Ws, rest),
            Some(("wss", rest)) => (Scheme::Wss, rest),
            Some(("quic", rest)) => (Scheme::Quic, rest),
            Some((other, _)) => {
                return Err(bad(&format!(
                    "unknown scheme {other}:// (use tcp, tls, ws, wss or quic)"
                )));
            }
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        let (host_port, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if host_port.is_empty() || !host_port.contains(':') {
            return Err(bad("expected host:port"));
        }
        let is_ws = matches!(scheme, Scheme::Ws | Scheme::Wss);
        if !is_ws && (!path.is_empty() || query.is_some()) {
            return Err(bad("only WebSocket URLs take a path or query"));
        }
        let encoding = match query {
            None | Some("encoding=proto") => Encoding::Proto,
            Some("encoding=json") => Encoding::Json,
            Some(q) => {
                return Err(bad(&format!(
                    "unknown query {q:?} (encoding=json or encoding=proto)"
                )));
            }
        };
        let path = if path.is_empty() {
            tether_transport::ws::PATH
        } else {
            path
        };
        Ok(Self {
            scheme,
            host_port: host_port.to_string(),
            ws_url: format!("{}://{host_port}{path}", scheme.as_str()),
            encoding,
        })
    }
}

impl Connector for NetConnector {
    fn connect<'a>(&'a self, server: &'a str) -> ConnectFuture<'a> {
        Box::pin(self.open(server, self.keepalive_idle))
    }

    fn connect_probe<'a>(&'a self, server: &'a str) -> ConnectFuture<'a> {
        Box::pin(self.open(server, None))
    }
}

impl NetConnector {
    /// A connector with these socket settings, verifying against the system's roots.
    pub fn new(keepalive_idle: Option<Duration>, user_timeout: Option<Duration>) -> Self {
        Self {
            keepalive_idle,
            user_timeout,
            ..Self::default()
        }
    }

    /// Verifies servers against `ca` (PEM) instead of the system's roots.
    pub fn with_ca_file(mut self, ca: Option<PathBuf>) -> Self {
        self.ca_file = ca;
        self
    }

    /// Binds TCP connections to `source` (any port) before connecting.
    pub fn with_source(mut self, source: Option<std::net::IpAddr>) -> Self {
        self.source = source;
        self
    }

    fn tls_config(&self, http: bool) -> io::Result<Arc<rustls::ClientConfig>> {
        let (cell, alpn): (_, &[&[u8]]) = if http {
            (&self.tls_http, &[])
        } else {
            (&self.tls, &[tls::ALPN])
        };
        cell.get_or_init(|| {
            tls::client_config(self.ca_file.as_deref(), alpn).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    async fn open(
        &self,
        server: &str,
        keepalive_idle: Option<Duration>,
    ) -> io::Result<BoxTransport> {
        let url = ServerUrl::parse(server)?;
        let mut last_error = None;
        for addr in tokio::net::lookup_host(&url.host_port).await? {
            match self.open_at(&url, addr, keepalive_idle).await {
                Ok(t) => return Ok(t),
                // A refused certificate is the same at every address.
                Err(e) if certificate_refused(&e) => return Err(e),
                Err(e) => last_error = Some(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("{server}: no address"))
        }))
    }

    async fn open_at(
        &self,
        url: &ServerUrl,
        addr: SocketAddr,
        keepalive_idle: Option<Duration>,
    ) -> io::Result<BoxTransport> {
        if url.scheme == Scheme::Quic {
            let t = quic::connect(
                self.tls_config(false)?,
                &url.host_port,
                addr,
                QUIC_IDLE,
                DEFAULT_MAX_FRAME,
            )
            .await?;
            return Ok(Box::new(t));
        }
        let tcp = match self.source {
            None => TcpStream::connect(addr).await?,
            Some(source) => {
                let socket = if source.is_ipv4() {
                    tokio::net::TcpSocket::new_v4()?
                } else {
                    tokio::net::TcpSocket::new_v6()?
                };
                bind_port_at_connect(&socket);
                socket.bind(SocketAddr::new(source, 0))?;
                socket.connect(addr).await?
            }
        };
        tcp.set_nodelay(true)?;
        let socket = socket2::SockRef::from(&tcp);
        if let Some(timeout) = self.user_timeout
            && let Err(e) = socket.set_tcp_user_timeout(Some(timeout))
        {
            tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
        }
        // Linear retransmission timeouts for a thin stream: a PING sent into a short
        // outage is retried within an RTO of the link's return, not seconds later
        // after exponential backoff (see the server's `tune_accepted`).
        if let Err(e) = socket.set_tcp_thin_linear_timeouts(true) {
            tracing::debug!(error = %e, "could not set TCP_THIN_LINEAR_TIMEOUTS");
        }
        if let Some(idle) = keepalive_idle {
            let keepalive = socket2::TcpKeepalive::new()
                .with_time(idle)
                .with_interval(Duration::from_secs(10))
                .with_retries(3);
            if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
                tracing::debug!(error = %e, "could not set TCP keepalive");
            }
        }
        Ok(match url.scheme {
            Scheme::Tcp => Box::new(TcpTransport::client(tcp, DEFAULT_MAX_FRAME)),
            Scheme::Tls => {
                let stream = tls::connect(self.tls_config(false)?, &url.host_port, tcp).await?;
                Box::new(StreamTransport::client(stream, DEFAULT_MAX_FRAME))
            }
            Scheme::Ws => Box::new(
                ws::connect(
                    tcp,
                    &url.ws_url,
                    url.encoding,
                    TransportKind::Ws,
                    DEFAULT_MAX_FRAME,
                )
                .await?,
            ),
            Scheme::Wss => {
                let stream = tls::connect(self.tls_config(true)?, &url.host_port, tcp).await?;
                Box::new(
                    ws::connect(
                        stream,
                        &url.ws_url,
                        url.encoding,
                        TransportKind::Wss,
                        DEFAULT_MAX_FRAME,
                    )
                    .await?,
                )
            }
            Scheme::Quic => unreachable!("handled above"),
        })
    }
}

/// QUIC's idle timeout on the client: long, so the server's (set above its longest
/// heartbeat deadline) is the one in force; the heartbeat decides liveness.
const QUIC_IDLE: Duration = Duration::from_secs(3600);

/// Whether a connect error means the server's certificate (or the TLS/QUIC handshake
/// parameters) were refused: retrying cannot fix it.
pub fn certificate_refused(e: &io::Error) -> bool {
    tls::is_certificate_error(e)
        || (e.kind() == io::ErrorKind::InvalidData && e.to_string().starts_with("QUIC:"))
}

/// Connects over in-memory pipes; the server ends come out of the paired
/// [`MemoryListener`]. The server address is ignored.
#[derive(Debug, Clone)]
pub struct MemoryConnector {
    accepted: mpsc::Sender<MemoryTransport>,
    server_max_frame: usize,
}

/// The server side of a [`MemoryConnector`]: yields one transport per connection.
#[derive(Debug)]
pub struct MemoryListener {
    incoming: mpsc::Receiver<MemoryTransport>,
}

impl MemoryListener {
    /// The server end of the next connection; `None` once every connector is gone.
    pub async fn accept(&mut self) -> Option<MemoryTransport> {
        self.incoming.recv().await
    }
}

/// A connector/listener pair; the server ends enforce `server_max_frame` until changed.
pub fn memory_connector(server_max_frame: usize) -> (MemoryConnector, MemoryListener) {
    let (accepted, incoming) = mpsc::channel(1024);
    (
        MemoryConnector {
            accepted,
            server_max_frame,
        },
        MemoryListener { incoming },
    )
}

impl Connector for MemoryConnector {
    fn connect<'a>(&'a self, _server: &'a str) -> ConnectFuture<'a> {
        Box::pin(async move {
            let (client, server) = memory::pair(self.server_max_frame);
            self.accepted.send(server).await.map_err(|_| {
                io::Error::new(io::ErrorKind::ConnectionRefused, "memory listener is gone")
            })?;
            Ok(Box::new(client) as BoxTransport)
        })
    }
}

/// `IP_BIND_ADDRESS_NO_PORT` on a socket about to bind to a source address: the port is
/// then chosen at connect time, for the whole address 4-tuple. Without it `bind` picks
/// a port unused by every socket of that address, TIME_WAIT ones included: after one
/// run of 9,500 connections from an address, the next run's binds searched the port
/// range each time and connected at 600-1,000/s instead of 2,500/s.
pub fn bind_port_at_connect(socket: &impl std::os::fd::AsRawFd) {
    #[cfg(target_os = "linux")]
    {
        let one: libc::c_int = 1;
        // SAFETY: a valid descriptor and an int option, by pointer and length.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(error = %std::io::Error::last_os_error(), "could not set IP_BIND_ADDRESS_NO_PORT");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = socket;
}
