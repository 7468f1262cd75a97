//! The Tether gateway.
//!
//! Owns: accepting connections on every transport ([`Server::bind`] for TCP,
//! [`Server::connect_memory`] for the in-memory pipe), the per-connection loop
//! ([`connection::serve`]), the session registry, the single commit path, auth and
//! metrics. It does not own durability (tether-store) or the wire format
//! (tether-proto), and it never queues messages per connection: delivery is by
//! position in the recipient's inbox.
//!
//! Liveness deadlines beyond the login deadline, admission control and drain are the
//! next slice's (DESIGN §4).

pub mod admin;
pub mod auth;
pub mod commit;
pub mod config;
pub mod connection;
pub mod cores;
pub mod deadlines;
mod devices;
mod listeners;
pub use listeners::serve_tls;
pub mod metrics;
pub mod probe;
pub mod registry;
pub mod web;

use crate::auth::Authenticator;
use crate::commit::CommitPath;
use crate::metrics::Metrics;
use crate::registry::{Registry, SIG_GOAWAY, SIG_SHUTDOWN};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tether_store::{EmbeddedStore, Store, StoreError};
use tether_transport::memory::{self, MemoryTransport};
use tether_transport::tcp::TcpTransport;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

pub use config::{ServerConfig, StartPolicy, TlsFiles};

/// Directory under the data dir that holds the embedded store.
pub const STORE_DIR: &str = "store";

/// Why the server could not start.
#[derive(Debug, Error)]
pub enum ServerError {
    /// The store could not be opened.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// The token secret could not be loaded or created.
    #[error("{0}")]
    Auth(#[from] auth::AuthError),
    /// The TLS certificate or key is missing or unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The connection threads could not be started.
    #[error("cannot start the connection threads: {0}")]
    Threads(std::io::Error),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// State every connection shares.
pub struct Shared {
    /// Settings.
    pub config: ServerConfig,
    /// Durable inboxes.
    pub store: Arc<dyn Store>,
    /// Who is connected.
    pub registry: Arc<Registry>,
    /// The single commit path.
    pub commit: CommitPath,
    /// Counters.
    pub metrics: Arc<Metrics>,
    /// Token verification.
    pub auth: Authenticator,
    /// Session id counter.
    pub session_ids: AtomicU64,
    /// Random per process start, so session ids differ across restarts.
    pub boot_id: u32,
    /// The server's clock for deadlines: ms since this instant.
    pub clock: std::time::Instant,
    /// Admission control for logins.
    pub logins: parking_lot::Mutex<tether_core::admission::TokenBucket>,
    /// Set when the server drains: new logins are answered GOAWAY.
    pub draining: std::sync::atomic::AtomicBool,
    /// Every session's liveness deadline, and replays waiting for budget.
    pub deadlines: deadlines::DeadlineWheel,
    /// Pacing of backlog replays (entries per second across all connections).
    pub replays: parking_lot::Mutex<tether_core::admission::TokenBucket>,
    /// Probe sessions, one per device (DESIGN §5).
    pub probes: probe::Probes,
    /// The admin API's token.
    pub admin_token: admin::AdminToken,
    /// What kicked sessions are told.
    pub kicks: admin::Kicks,
    /// Devices whose tokens were revoked.
    pub revocations: admin::Revocations,
    /// The threads accepted TCP and TLS connections run on.
    pub threads: cores::ConnectionThreads,
    sweeper: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Milliseconds on the server's clock (deadlines are kept in these).
    pub fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// Starts the deadline sweeper once (needs a Tokio runtime). It holds only a weak
    /// reference, so it ends with the server.
    fn start_sweeper(self: &Arc<Self>) {
        if self.sweeper.swap(true, Ordering::AcqRel) {
            return;
        }
        let weak = Arc::downgrade(self);
        let every = self.config.deadline_sweep;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shared) = weak.upgrade() else { return };
                shared.deadlines.advance(shared.now_ms());
            }
        });
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("listen", &self.config.listen)
            .field("durability", &self.store.durability())
            .finish_non_exhaustive()
    }
}

/// With `simulate_power_loss`: the share of unsynced page writes that reach the file
/// before the next sync, as a kernel flushing dirty pages early would.
const POWER_LOSS_WRITEBACK: f64 = 0.3;

/// A configured server, not yet listening. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Server {
    shared: Arc<Shared>,
}

impl Server {
    /// Opens the embedded store and the token secret under `config.data_dir`.
    pub fn open(config: ServerConfig) -> Result<Self, ServerError> {
        let dir = config.data_dir.join(STORE_DIR);
        let store = match config.simulate_power_loss {
            Some(seed) => {
                tracing::warn!(
                    seed,
                    "simulating power loss: unsynced store writes die with this process (chaos runs only)"
                );
                EmbeddedStore::open_power_loss(&dir, seed, POWER_LOSS_WRITEBACK)?
            }
            None => EmbeddedStore::open(&dir, config.durability)?,
        };
        Self::with_store(config, Arc::new(store))
    }

    /// A server over an already opened store (tests: simulated disks).
    pub fn with_store(config: ServerConfig, store: Arc<dyn Store>) -> Result<Self, ServerError> {
        let auth = Authenticator::open(&config.data_dir)?;
        let admin_token =
            admin::AdminToken::open(&config.data_dir).map_err(auth::AuthError::from)?;
        let revocations =
            admin::Revocations::open(&config.data_dir).map_err(auth::AuthError::from)?;
        let logins = parking_lot::Mutex::new(tether_core::admission::TokenBucket::new(
            std::time::Instant::now(),
            config.login_rate,
            config.login_burst,
        ));
        let deadlines = deadlines::DeadlineWheel::new(config.deadline_sweep, 0);
        let replays = parking_lot::Mutex::new(tether_core::admission::TokenBucket::new(
            std::time::Instant::now(),
            config.replay_rate,
            config.replay_burst,
        ));
        let threads = cores::ConnectionThreads::start(config.connection_threads)
            .map_err(ServerError::Threads)?;
        let registry = Arc::new(Registry::default());
        let metrics = Arc::new(Metrics::default());
        let commit = CommitPath::start(
            store.clone(),
            registry.clone(),
            metrics.clone(),
            config.max_commit_batch,
            commit::Retention {
                messages: config.retention,
                devices: config.device_expiry,
                acked: config.compact_acked,
                interval: config.compact_interval,
            },
        );
        Ok(Self {
            shared: Arc::new(Shared {
                config,
                store,
                registry,
                commit,
                metrics,
                auth,
                session_ids: AtomicU64::new(1),
                boot_id: rand::random(),
                clock: std::time::Instant::now(),
                logins,
                replays,
                deadlines,
                probes: Default::default(),
                admin_token,
                kicks: Default::default(),
                revocations,
                threads,
                draining: Default::default(),
                sweeper: Default::default(),
            }),
        })
    }

    /// The shared state (registry, metrics, store, auth).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Opens an in-memory connection served by this server; returns the client end.
    /// Must be called inside a Tokio runtime.
    pub fn connect_memory(&self) -> MemoryTransport {
        self.shared.start_sweeper();
        let (client, server) = memory::pair(tether_proto::PRE_AUTH_MAX_FRAME);
        tokio::spawn(connection::serve(self.shared.clone(), server));
        client
    }

    /// Binds the TCP listener (and the HTTP endpoint, if configured) and starts serving.
    pub async fn bind(&self) -> Result<RunningServer, ServerError> {
        let cfg = &self.shared.config;
        let listener = bind_listener(cfg.listen).map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        let addr = listener.local_addr().map_err(|source| ServerError::Bind {
            addr: cfg.listen,
            source,
        })?;
        if !addr.ip().is_loopback() {
            warn!(%addr, "plain TCP listener on a non-loopback address: tokens and messages cross the network unencrypted; use --tls-listen");
        }
        let tls = self.tls_config(&[tether_transport::tls::ALPN])?;
        let https_tls = self.tls_config(&[b"http/1.1"])?;
        let needs_tls =
            cfg.tls_listen.is_some() || cfg.quic_listen.is_some() || cfg.https.is_some();
        if needs_tls && tls.is_none() {
            return Err(ServerError::Tls(
                "a TLS, QUIC or HTTPS listener needs a certificate and key (--tls-cert, --tls-key)"
                    .into(),
            ));
        }
        let mut tasks = Vec::new();
        let http = match cfg.http {
            Some(http) => {
                if !http.ip().is_loopback() {
                    warn!(addr = %http, "plain HTTP (and ws://) on a non-loopback address: use --https-listen for wss://");
                }
                Some(
                    metrics::serve_http(http, self.shared.clone(), None)
                        .await
                        .map_err(|source| ServerError::Bind { addr: http, source })?,
                )
            }
            None => None,
        };
        let https = match (cfg.https, https_tls) {
            (Some(addr), Some(tls)) => Some(
                metrics::serve_http(addr, self.shared.clone(), Some(tls.into()))
                    .await
                    .map_err(|source| ServerError::Bind { addr, source })?,
            ),
            _ => None,
        };
        let tls_addr = match (cfg.tls_listen, &tls) {
            (Some(at), Some(tls)) => {
                let listener =
                    bind_listener(at).map_err(|source| ServerError::Bind { addr: at, source })?;
                let local = listener
                    .local_addr()
                    .map_err(|source| ServerError::Bind { addr: at, source })?;
                tasks.push(tokio::spawn(listeners::tls_accept_loop(
                    listener,
                    tls.clone(),
                    self.shared.clone(),
                )));
                Some(local)
            }
            _ => None,
        };
        let quic_addr = match (cfg.quic_listen, tls) {
            (Some(at), Some(tls)) => {
                // QUIC's own idle timeout stays above the longest heartbeat deadline:
                // the heartbeat decides liveness (DESIGN §4).
                let idle =
                    cfg.heartbeat.deadline(cfg.heartbeat.max_interval) + Duration::from_secs(30);
                let endpoint = tether_transport::quic::server_endpoint(at, tls, idle)
                    .map_err(|source| ServerError::Bind { addr: at, source })?;
                let local = endpoint
                    .local_addr()
                    .map_err(|source| ServerError::Bind { addr: at, source })?;
                tasks.push(tokio::spawn(listeners::quic_accept_loop(
                    endpoint,
                    self.shared.clone(),
                )));
                Some(local)
            }
            _ => None,
        };
        self.shared.start_sweeper();
        let accept = tokio::spawn(accept_loop(listener, self.shared.clone()));
        if let Some(at) = http.as_ref().map(|h| h.0).or(https.as_ref().map(|h| h.0)) {
            info!(
                admin = %format!("{at}/admin/v1"),
                token = %cfg.data_dir.join(admin::ADMIN_TOKEN_FILE).display(),
                "admin API (bearer token in the file named here)"
            );
        }
        info!(
            %addr,
            tls = ?tls_addr,
            quic = ?quic_addr,
            http = ?http.as_ref().map(|h| h.0),
            https = ?https.as_ref().map(|h| h.0),
            durability = %self.shared.store.durability(),
            data = %cfg.data_dir.display(),
            "tether server listening"
        );
        Ok(RunningServer {
            server: self.clone(),
            addr,
            http_addr: http.as_ref().map(|h| h.0),
            https_addr: https.as_ref().map(|h| h.0),
            tls_addr,
            quic_addr,
            accept,
            http: http
                .map(|h| h.1)
                .into_iter()
                .chain(https.map(|h| h.1))
                .chain(tasks)
                .collect(),
        })
    }

    /// Closes every session, commits what was submitted and stops the commit path.
    pub async fn shutdown(&self) {
        self.shared.registry.signal_all(SIG_SHUTDOWN);
        // Give connections a moment to hand their last sends to the commit path.
        for _ in 0..50 {
            if self.shared.registry.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || shared.commit.stop()).await;
    }
}

/// A server that is accepting connections.
#[derive(Debug)]
pub struct RunningServer {
    server: Server,
    /// Where clients connect.
    pub addr: SocketAddr,
    /// Where /metrics (and `ws://…/ws`) is served.
    pub http_addr: Option<SocketAddr>,
    /// Where HTTPS (and `wss://…/ws`) is served.
    pub https_addr: Option<SocketAddr>,
    /// Where TLS over TCP is served.
    pub tls_addr: Option<SocketAddr>,
    /// Where QUIC is served (UDP).
    pub quic_addr: Option<SocketAddr>,
    accept: JoinHandle<()>,
    /// Every other listener's task.
    http: Vec<JoinHandle<()>>,
}

impl RunningServer {
    /// The server behind the listener.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// Drains: stops accepting, tells every session GOAWAY (reconnect after a random
    /// delay within the drain window, possibly elsewhere) and closes it, then commits
    /// what was submitted and flushes the store.
    pub async fn drain(self) {
        self.accept.abort();
        let shared = self.server.shared.clone();
        let sessions = shared.registry.len();
        info!(sessions, window = ?shared.config.drain_window, "draining: sending GOAWAY");
        shared.draining.store(true, Ordering::Release);
        shared.registry.signal_all(SIG_GOAWAY);
        // Wait until every connection has written its GOAWAY and closed (the gauge drops
        // only after that): at most the close-flush time (2 s) plus a margin.
        for _ in 0..300 {
            if shared.metrics.connections_open.get() <= 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.shutdown().await;
    }

    /// Stops accepting, closes sessions, flushes the store.
    pub async fn shutdown(self) {
        self.accept.abort();
        for task in &self.http {
            task.abort();
        }
        self.server.shutdown().await;
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _peer)) => {
                tune_accepted(&stream, shared.config.tcp_user_timeout);
                cores::hand_over(&shared.threads, stream, |stream| {
                    serve_tcp(shared.clone(), stream)
                });
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The task of an accepted plain TCP connection, handed over from the accepting
/// runtime ([`cores::hand_over`]): it registers the stream with the runtime it runs
/// on, in its login phase, so the task stays the size of [`connection::serve`]'s.
pub fn serve_tcp(
    shared: Arc<Shared>,
    stream: std::net::TcpStream,
) -> impl Future<Output = ()> + Send {
    connection::serve_after(shared, async move {
        let stream = cores::register(stream)?;
        Some(TcpTransport::accepted(
            stream,
            tether_proto::PRE_AUTH_MAX_FRAME,
        ))
    })
}

/// Tunes an accepted socket for a long-lived, mostly idle ("thin") stream: the
/// configured TCP_USER_TIMEOUT, and linear retransmission timeouts.
///
/// A heartbeat or ACK sent into a short outage is retransmitted with exponential
/// backoff (0.2, 0.4, 0.8, 1.6, 3.2 s…): after a 4 s outage the next try can come 3 s
/// after the link is back, and one lost retry doubles that, past the peer's liveness
/// deadline (seen in the lab: 5 % loss plus a 4 s outage closed a healthy session).
/// `TCP_THIN_LINEAR_TIMEOUTS` keeps the first six retries of a stream with fewer than
/// four segments in flight at one RTO each, so the link recovers within an RTO.
pub(crate) fn tune_accepted(stream: &tokio::net::TcpStream, user_timeout: Option<Duration>) {
    let socket = socket2::SockRef::from(stream);
    if let Some(timeout) = user_timeout
        && let Err(e) = socket.set_tcp_user_timeout(Some(timeout))
    {
        warn!(error = %e, "cannot set TCP_USER_TIMEOUT");
    }
    if let Err(e) = socket.set_tcp_thin_linear_timeouts(true) {
        debug!(error = %e, "cannot set TCP_THIN_LINEAR_TIMEOUTS");
    }
}

impl Server {
    /// The server's TLS configuration offering `alpn`, if a certificate is configured.
    fn tls_config(&self, alpn: &[&[u8]]) -> Result<Option<Arc<rustls::ServerConfig>>, ServerError> {
        let Some(files) = &self.shared.config.tls else {
            return Ok(None);
        };
        tether_transport::tls::server_config(&files.cert, &files.key, alpn)
            .map(Some)
            .map_err(|e| ServerError::Tls(e.to_string()))
    }
}

/// Connections the kernel may hold ready for `accept` (capped by `net.core.somaxconn`,
/// 4096 here). tokio's default of 1024 overflows in a reconnect storm: SYNs beyond it
/// are dropped and those clients retry only after TCP's 1, 3, 7 s SYN timeouts (seen:
/// 110 of 19,000 clients back 5 s after the rest).
pub const LISTEN_BACKLOG: u32 = 65_535;

/// A TCP listener with `SO_REUSEADDR` (a restarted server rebinds at once) and
/// [`LISTEN_BACKLOG`].
pub(crate) fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_get_linear_retransmission_timeouts_and_the_user_timeout() {
        let listener = bind_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = listener.local_addr().unwrap();
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let socket = socket2::SockRef::from(&accepted);
        assert!(!socket.tcp_thin_linear_timeouts().unwrap());
        tune_accepted(&accepted, Some(Duration::from_secs(60)));
        assert!(socket.tcp_thin_linear_timeouts().unwrap());
        assert_eq!(
            socket.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(60))
        );
    }
}
