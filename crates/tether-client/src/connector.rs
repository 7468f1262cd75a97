//! How the driver opens a transport to a server: by TCP address, or in memory.
//!
//! The driver only sees a boxed [`Transport`], so the same SDK runs against a real
//! server, an in-process server over [`memory_connector`] (benchmarks holding far more
//! sessions than file descriptors), or a scripted fake peer in tests.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;
use tether_proto::DEFAULT_MAX_FRAME;
use tether_transport::Transport;
use tether_transport::memory::{self, MemoryTransport};
use tether_transport::tcp::TcpTransport;
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

/// Plain TCP to `host:port`, trying each resolved address in turn.
#[derive(Debug, Clone, Default)]
pub struct TcpConnector {
    /// Kernel keepalive idle time: a backstop only, set longer than the heartbeat's
    /// dead-link time so it never does the heartbeat's job (DESIGN §4). `None` = off.
    pub keepalive_idle: Option<Duration>,
    /// TCP_USER_TIMEOUT: the kernel aborts the connection when sent data stays
    /// unacknowledged this long. `None` = the kernel's default.
    pub user_timeout: Option<Duration>,
}

impl Connector for TcpConnector {
    fn connect<'a>(&'a self, server: &'a str) -> ConnectFuture<'a> {
        Box::pin(self.open(server, self.keepalive_idle))
    }

    fn connect_probe<'a>(&'a self, server: &'a str) -> ConnectFuture<'a> {
        Box::pin(self.open(server, None))
    }
}

impl TcpConnector {
    async fn open(
        &self,
        server: &str,
        keepalive_idle: Option<Duration>,
    ) -> io::Result<BoxTransport> {
        {
            let mut last_error = None;
            for addr in tokio::net::lookup_host(server).await? {
                match TcpTransport::connect(addr, DEFAULT_MAX_FRAME).await {
                    Ok(transport) => {
                        if let Some(timeout) = self.user_timeout {
                            let socket = socket2::SockRef::from(transport.stream());
                            if let Err(e) = socket.set_tcp_user_timeout(Some(timeout)) {
                                tracing::debug!(error = %e, "could not set TCP_USER_TIMEOUT");
                            }
                        }
                        if let Some(idle) = keepalive_idle {
                            let keepalive = socket2::TcpKeepalive::new()
                                .with_time(idle)
                                .with_interval(Duration::from_secs(10))
                                .with_retries(3);
                            let socket = socket2::SockRef::from(transport.stream());
                            if let Err(e) = socket.set_tcp_keepalive(&keepalive) {
                                tracing::debug!(error = %e, "could not set TCP keepalive");
                            }
                        }
                        return Ok(Box::new(transport) as BoxTransport);
                    }
                    Err(e) => last_error = Some(e),
                }
            }
            Err(last_error.unwrap_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, format!("{server}: no address"))
            }))
        }
    }
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
