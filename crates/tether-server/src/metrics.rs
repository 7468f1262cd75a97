//! Prometheus metrics and the HTTP endpoint that serves them (`/metrics`, `/healthz`).

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The server's counters.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Connections accepted (all transports).
    pub connections_accepted: Counter,
    /// Connections open now.
    pub connections_open: Gauge,
    /// Successful logins.
    pub logins: Counter,
    /// Refused logins (bad token, stale epoch, bad resume point, ...).
    pub login_failures: Counter,
    /// Messages newly committed.
    pub messages_committed: Counter,
    /// Resends answered from the dedup table.
    pub duplicates: Counter,
    /// DELIVER frames sent.
    pub messages_delivered: Counter,
    /// Protocol errors sent to peers.
    pub protocol_errors: Counter,
    /// Sessions closed because nothing arrived within their deadline.
    pub sessions_expired: Counter,
    /// PINGs answered with a PONG on authenticated sessions (probes not included).
    pub heartbeats: Counter,
    /// Logins refused by admission control (ERROR OVERLOADED).
    pub logins_throttled: Counter,
    /// Probe sessions admitted (side connections testing a heartbeat interval).
    pub probe_sessions: Counter,
    /// Offline devices evicted to keep a user within the device cap.
    pub devices_evicted: Counter,
    /// TLS and QUIC handshakes that failed or timed out.
    pub tls_handshake_failures: Counter,
    /// WebSocket upgrades refused (unknown or missing sub-protocol).
    pub ws_upgrades_refused: Counter,
    /// QUIC sessions whose client moved to a new address (kept in step at scrape time).
    pub quic_migrations: Counter,
    /// Device cursor moves not yet written to the store (set by the commit thread).
    pub cursor_writes_pending: Gauge,
    /// Group commits made on a connection's thread (relaxed durability).
    pub commits_inline: Counter,
    /// Group commits made on the commit thread.
    pub commits_by_thread: Counter,
    /// Connections closed, by reason (`Close::label`).
    disconnects: Family<Labels, Counter>,
    /// Logged-in sessions now, by transport.
    sessions: Family<Labels, Gauge>,
    /// Logged-in sessions now, by the heartbeat mode their HELLO announced.
    sessions_by_mode: Family<Labels, Gauge>,
    /// Heartbeat intervals granted: at each login and each change.
    heartbeat_intervals: Histogram,
    /// TCP round-trip times (kernel's smoothed RTT), sampled at PINGs.
    tcp_rtt: Histogram,
    /// How far behind its inbox head a connection is when it streams, entries.
    streaming_lag: Histogram,
    /// Time one read of the store takes on the delivery path.
    store_read: Histogram,
    /// Time from a SEND's arrival to its durable commit.
    commit_latency: Histogram,
    /// Messages per group commit.
    commit_batch: Histogram,
    /// Time one group commit takes in the store (write + sync).
    commit_duration: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("tether");
        let m = Self {
            connections_accepted: Counter::default(),
            connections_open: Gauge::default(),
            logins: Counter::default(),
            login_failures: Counter::default(),
            messages_committed: Counter::default(),
            duplicates: Counter::default(),
            messages_delivered: Counter::default(),
            protocol_errors: Counter::default(),
            sessions_expired: Counter::default(),
            heartbeats: Counter::default(),
            logins_throttled: Counter::default(),
            probe_sessions: Counter::default(),
            devices_evicted: Counter::default(),
            tls_handshake_failures: Counter::default(),
            ws_upgrades_refused: Counter::default(),
            quic_migrations: Counter::default(),
            cursor_writes_pending: Gauge::default(),
            commits_inline: Counter::default(),
            commits_by_thread: Counter::default(),
            disconnects: Family::default(),
            sessions: Family::default(),
            sessions_by_mode: Family::default(),
            heartbeat_intervals: Histogram::new([
                5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 240.0, 300.0, 420.0, 600.0, 900.0,
            ]),
            tcp_rtt: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0,
            ]),
            streaming_lag: Histogram::new([0.0, 1.0, 2.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0]),
            store_read: Histogram::new([
                0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.01, 0.1,
            ]),
            commit_latency: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025, 0.1, 1.0,
            ]),
            commit_batch: Histogram::new([1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0]),
            commit_duration: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0,
            ]),
            registry: Registry::default(),
        };
        registry.register(
            "connections_accepted",
            "Connections accepted",
            m.connections_accepted.clone(),
        );
        registry.register(
            "connections_open",
            "Connections open",
            m.connections_open.clone(),
        );
        registry.register("logins", "Successful logins", m.logins.clone());
        registry.register("login_failures", "Refused logins", m.login_failures.clone());
        registry.register(
            "messages_committed",
            "Messages durably committed",
            m.messages_committed.clone(),
        );
        registry.register(
            "duplicate_sends",
            "Resends answered with the original SEND_ACK",
            m.duplicates.clone(),
        );
        registry.register(
            "messages_delivered",
            "DELIVER frames sent",
            m.messages_delivered.clone(),
        );
        registry.register(
            "protocol_errors",
            "ERROR frames sent to peers",
            m.protocol_errors.clone(),
        );
        registry.register(
            "logins_throttled",
            "Logins refused by admission control (ERROR OVERLOADED with retry_after_ms)",
            m.logins_throttled.clone(),
        );
        registry.register(
            "probe_sessions",
            "Probe sessions admitted (side connections testing a heartbeat interval)",
            m.probe_sessions.clone(),
        );
        registry.register(
            "devices_evicted",
            "Offline devices evicted (server cursor removed) to keep a user within the device cap",
            m.devices_evicted.clone(),
        );
        registry.register(
            "tls_handshake_failures",
            "TLS and QUIC handshakes that failed or did not finish within the login deadline",
            m.tls_handshake_failures.clone(),
        );
        registry.register(
            "ws_upgrades_refused",
            "WebSocket upgrades refused for an unknown or missing sub-protocol",
            m.ws_upgrades_refused.clone(),
        );
        registry.register(
            "quic_migrations",
            "QUIC sessions whose client moved to a new address without reconnecting",
            m.quic_migrations.clone(),
        );
        registry.register(
            "cursor_writes_pending",
            "Device cursor moves (logins, ACKs) not yet written to the store",
            m.cursor_writes_pending.clone(),
        );
        registry.register(
            "sessions_expired",
            "Sessions closed because nothing arrived within their liveness deadline",
            m.sessions_expired.clone(),
        );
        registry.register(
            "heartbeats",
            "PINGs answered with a PONG on authenticated sessions",
            m.heartbeats.clone(),
        );
        registry.register(
            "disconnects",
            "Connections closed, by reason",
            m.disconnects.clone(),
        );
        registry.register(
            "sessions",
            "Logged-in sessions, by transport",
            m.sessions.clone(),
        );
        registry.register(
            "sessions_by_heartbeat_mode",
            "Logged-in sessions, by heartbeat mode (idle, fixed, smart)",
            m.sessions_by_mode.clone(),
        );
        registry.register(
            "heartbeat_interval_seconds",
            "Heartbeat intervals granted, at login and at each change",
            m.heartbeat_intervals.clone(),
        );
        registry.register(
            "tcp_rtt_seconds",
            "Round-trip time of TCP sessions (the kernel's smoothed RTT), sampled at one PING in 8",
            m.tcp_rtt.clone(),
        );
        registry.register(
            "streaming_lag_entries",
            "Entries between a connection's delivery position and its inbox head when it streams",
            m.streaming_lag.clone(),
        );
        registry.register(
            "store_read_seconds",
            "Time one read of the store takes on the delivery path",
            m.store_read.clone(),
        );
        registry.register(
            "commit_latency_seconds",
            "Time from SEND arrival to durable commit",
            m.commit_latency.clone(),
        );
        registry.register(
            "commits_inline",
            "Group commits made on a connection's thread",
            m.commits_inline.clone(),
        );
        registry.register(
            "commits_by_thread",
            "Group commits made on the commit thread",
            m.commits_by_thread.clone(),
        );
        registry.register(
            "commit_batch_messages",
            "Messages per group commit",
            m.commit_batch.clone(),
        );
        registry.register(
            "commit_duration_seconds",
            "Time one group commit takes in the store (write and sync)",
            m.commit_duration.clone(),
        );
        Self { registry, ..m }
    }
}

/// Label pairs of a metric family.
type Labels = Vec<(&'static str, &'static str)>;

impl Metrics {
    /// A connection ended for `reason`.
    pub fn disconnected(&self, reason: &'static str) {
        self.disconnects
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    /// A session was admitted on `transport`, in heartbeat `mode`, with an interval of
    /// `interval_ms`.
    pub fn session_opened(&self, transport: &'static str, mode: &'static str, interval_ms: u32) {
        self.sessions
            .get_or_create(&vec![("transport", transport)])
            .inc();
        self.sessions_by_mode
            .get_or_create(&vec![("mode", mode)])
            .inc();
        self.interval_changed(interval_ms);
    }

    /// An admitted session on `transport`, in heartbeat `mode`, closed.
    pub fn session_closed(&self, transport: &'static str, mode: &'static str) {
        self.sessions
            .get_or_create(&vec![("transport", transport)])
            .dec();
        self.sessions_by_mode
            .get_or_create(&vec![("mode", mode)])
            .dec();
    }

    /// A session's heartbeat interval is now `interval_ms`.
    pub fn interval_changed(&self, interval_ms: u32) {
        self.heartbeat_intervals
            .observe(f64::from(interval_ms) / 1000.0);
    }

    /// Records one TCP RTT sample.
    pub fn observe_rtt(&self, rtt_us: u32) {
        self.tcp_rtt.observe(f64::from(rtt_us) / 1e6);
    }

    /// Records how far behind its head a connection was when it streamed.
    pub fn observe_lag(&self, entries: u64) {
        self.streaming_lag.observe(entries as f64);
    }

    /// Records one store read on the delivery path.
    pub fn observe_store_read(&self, took: Duration) {
        self.store_read.observe(took.as_secs_f64());
    }

    /// Connections closed for `reason` so far.
    pub fn disconnects(&self, reason: &'static str) -> u64 {
        self.disconnects
            .get_or_create(&vec![("reason", reason)])
            .get()
    }

    /// Records one send's commit latency.
    pub fn observe_commit_latency(&self, d: Duration) {
        self.commit_latency.observe(d.as_secs_f64());
    }

    /// Records a group commit of `n` messages.
    pub fn observe_batch(&self, n: usize, took: Duration) {
        self.commit_batch.observe(n as f64);
        self.commit_duration.observe(took.as_secs_f64());
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let seen = tether_transport::quic::migrations();
        let counted = self.quic_migrations.get();
        if seen > counted {
            self.quic_migrations.inc_by(seen - counted);
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

async fn metrics_handler(State(metrics): State<Arc<Metrics>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        metrics.render(),
    )
}

/// The routes of the HTTP port: `/metrics`, `/healthz`, and `/ws` (WebSocket sessions).
pub(crate) fn router(shared: Arc<crate::Shared>, kind: tether_transport::TransportKind) -> Router {
    let ws = Router::new()
        .route(
            tether_transport::ws::PATH,
            get(crate::listeners::ws_handler),
        )
        .with_state(crate::listeners::WsState {
            shared: shared.clone(),
            kind,
        });
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(shared.metrics.clone())
        .merge(crate::admin::router(shared.clone()))
        .merge(crate::web::router(shared.clone()))
        .merge(ws)
}

/// Binds the HTTP endpoint (plain, or TLS when `tls` is given); returns its address and
/// the task serving it.
pub(crate) async fn serve_http(
    addr: SocketAddr,
    shared: Arc<crate::Shared>,
    tls: Option<tether_transport::tls::TlsAcceptor>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let task = match tls {
        None => {
            let app = router(shared, tether_transport::TransportKind::Ws)
                .into_make_service_with_connect_info::<SocketAddr>();
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "HTTP endpoint failed");
                }
            })
        }
        Some(acceptor) => {
            use axum::serve::ListenerExt;
            // `tap_io` only so axum hands the peer address to `ConnectInfo`.
            let listener =
                crate::listeners::TlsListener::start(listener, acceptor, shared.clone())?
                    .tap_io(|_| {});
            let app = router(shared, tether_transport::TransportKind::Wss)
                .into_make_service_with_connect_info::<SocketAddr>();
            tokio::spawn(async move {
                if let Err(e) = axum::serve(listener, app).await {
                    tracing::error!(error = %e, "HTTPS endpoint failed");
                }
            })
        }
    };
    Ok((local, task))
}
