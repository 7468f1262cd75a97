//! Server settings, with safe defaults.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tether_store::Durability;

/// Where a device that has never connected (and brings no resume point) starts.
///
/// The policy is announced to the device as `WELCOME.start_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartPolicy {
    /// From the oldest retained entry: a new device sees the whole retained inbox.
    Beginning,
    /// At most the last `n` entries.
    Last(u64),
    /// Only what arrives after it connects.
    Head,
}

impl std::str::FromStr for StartPolicy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "beginning" | "all" => Ok(Self::Beginning),
            "head" | "new" => Ok(Self::Head),
            _ => s
                .strip_prefix("last:")
                .and_then(|n| n.parse().ok())
                .map(Self::Last)
                .ok_or_else(|| format!("`{s}`: expected beginning, head or last:N")),
        }
    }
}

/// Heartbeat intervals the server accepts from clients.
#[derive(Debug, Clone, Copy)]
pub struct HeartbeatLimits {
    /// Used when the client asks for 0.
    pub default_interval: Duration,
    /// Smallest accepted interval.
    pub min_interval: Duration,
    /// Largest accepted interval.
    pub max_interval: Duration,
    /// `P`: how long the client waits for a PONG.
    pub pong_timeout: Duration,
    /// `m`: PINGs the client may miss before the link is dead.
    pub max_misses: u32,
    /// Added to the server's deadline for RTT and the client's timer slack.
    pub grace: Duration,
}

impl Default for HeartbeatLimits {
    fn default() -> Self {
        Self {
            default_interval: Duration::from_secs(30),
            min_interval: Duration::from_secs(5),
            max_interval: Duration::from_secs(30 * 60),
            pong_timeout: Duration::from_secs(5),
            max_misses: 2,
            grace: Duration::from_secs(5),
        }
    }
}

impl HeartbeatLimits {
    /// How long a session may stay silent (DESIGN §4): `I + m·P + grace`.
    pub fn deadline(&self, interval: Duration) -> Duration {
        interval + self.pong_timeout * self.max_misses + self.grace
    }

    /// Clamps a requested interval (0 = default) into the accepted range.
    pub fn accept(&self, requested_ms: u32) -> Duration {
        if requested_ms == 0 {
            return self.default_interval;
        }
        Duration::from_millis(u64::from(requested_ms)).clamp(self.min_interval, self.max_interval)
    }
}

/// Everything the server needs to run.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Data directory: the store and the token secret live here.
    pub data_dir: PathBuf,
    /// TCP listen address for clients.
    pub listen: SocketAddr,
    /// HTTP address for /metrics and /healthz.
    pub http: Option<SocketAddr>,
    /// Store durability.
    pub durability: Durability,
    /// Time a new connection has to complete HELLO.
    pub login_deadline: Duration,
    /// Largest frame after WELCOME.
    pub max_frame: usize,
    /// Most un-ACKed DELIVERs in flight per connection.
    pub credit_window: u32,
    /// Most SENDs of one connection waiting for their commit.
    pub max_inflight_sends: u32,
    /// Where devices without a cursor start.
    pub start_policy: StartPolicy,
    /// How long messages (and their dedup keys) are kept at most. It is the dedup
    /// window announced in WELCOME: a resend is recognised for this long, even after
    /// its message was compacted because every device had it.
    pub retention: Duration,
    /// Devices not seen for this long lose their server cursor (and stop counting
    /// towards [`ServerConfig::max_devices`] and holding messages back).
    pub device_expiry: Duration,
    /// Remove a message as soon as every live device of the inbox's user has
    /// acknowledged it, as WhatsApp- or WeChat-style servers do, instead of keeping it
    /// until retention for SYNC history. An inbox whose user has no live device keeps
    /// everything until retention, so the user's first device gets it.
    pub compact_acked: bool,
    /// How often compaction runs (on the commit thread).
    pub compact_interval: Duration,
    /// Most devices per user. A device the server does not know yet, logging in beyond
    /// it, evicts the least recently seen device that is not connected (its server
    /// cursor is removed); if every one is connected, the login is refused with
    /// `DEVICE_LIMIT`.
    pub max_devices: u32,
    /// Most members a group may have (creating or adding beyond it is refused with
    /// `GROUP_FULL`). Every group message is one copy per member in one commit, so
    /// this bounds the cost of one send.
    pub max_group_members: u32,
    /// Heartbeat limits.
    pub heartbeat: HeartbeatLimits,
    /// Most messages in one group commit.
    pub max_commit_batch: usize,
    /// How often session deadlines are checked (deadlines are exact to this much).
    pub deadline_sweep: Duration,
    /// TCP_USER_TIMEOUT on accepted sockets: the kernel gives up on data unacknowledged
    /// this long. Kernel keepalive stays off on server sockets (DESIGN §4: the
    /// heartbeat decides liveness; keepalive must never do its job).
    pub tcp_user_timeout: Option<Duration>,
    /// Logins admitted per second (token bucket); beyond it ERROR{OVERLOADED}.
    pub login_rate: f64,
    /// Logins admitted at once before the rate applies.
    pub login_burst: u32,
    /// On drain, clients are told to reconnect after a random delay within this window,
    /// so a restart does not bring them all back at once.
    pub drain_window: Duration,
    /// On drain, the address clients should use instead, if any.
    pub drain_to: Option<String>,
    /// Backlog entries replayed per second across all connections (entries more than
    /// [`ServerConfig::credit_window`] behind the head); live entries are never paced,
    /// so a reconnect storm's replays cannot starve live traffic.
    pub replay_rate: f64,
    /// Backlog entries replayed at once before the rate applies.
    pub replay_burst: u32,
    /// Probe sessions (side connections testing a heartbeat interval).
    pub probes: crate::probe::ProbeLimits,
    /// TLS certificate chain and key (PEM); needed by `tls_listen`, `quic_listen` and
    /// `https`.
    pub tls: Option<TlsFiles>,
    /// TLS over TCP listener.
    pub tls_listen: Option<SocketAddr>,
    /// QUIC (UDP) listener, ALPN `tether/1`.
    pub quic_listen: Option<SocketAddr>,
    /// HTTPS listener: the HTTP routes, `/ws` as `wss://`.
    pub https: Option<SocketAddr>,
    /// Development only: `POST /dev/token {"user": ...}` on the HTTP port mints a login
    /// token for any user, so the chat page can log in without an identity provider.
    /// Off by default: with it on, anyone who reaches the HTTP port is anyone.
    pub dev_login: bool,
    /// Chaos runs and tests only: the store's unsynced writes live in process memory
    /// (see `tether_store::PowerLossFile`, seeded with this), so killing the process is
    /// a power cut. `None` in production.
    pub simulate_power_loss: Option<u64>,
    /// Threads with a single-threaded runtime each that accepted TCP and TLS
    /// connections are dealt out to (see [`crate::cores`]); 0 runs them on the
    /// caller's runtime (the default). `tether serve --per-core-runtimes` starts one
    /// per worker.
    pub connection_threads: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("tether-data"),
            listen: ([127, 0, 0, 1], 7400).into(),
            http: Some(([127, 0, 0, 1], 7401).into()),
            durability: Durability::Fsync,
            login_deadline: Duration::from_secs(10),
            max_frame: tether_proto::DEFAULT_MAX_FRAME,
            credit_window: 256,
            max_inflight_sends: 1024,
            start_policy: StartPolicy::Beginning,
            retention: Duration::from_secs(30 * 24 * 3600),
            device_expiry: Duration::from_secs(90 * 24 * 3600),
            compact_acked: true,
            compact_interval: Duration::from_secs(3600),
            max_devices: 16,
            max_group_members: 500,
            heartbeat: HeartbeatLimits::default(),
            max_commit_batch: 2048,
            deadline_sweep: Duration::from_millis(250),
            tcp_user_timeout: Some(Duration::from_secs(60)),
            // Measured on 2 vCPUs: 19,000 clients back 5.5 s after a SIGKILL at
            // these (SCALE.md); 2,000/s + 500 would take ~9.5 s, at the budget's edge.
            login_rate: 4000.0,
            login_burst: 2000,
            drain_window: Duration::from_secs(10),
            drain_to: None,
            replay_rate: 200_000.0,
            replay_burst: 20_000,
            probes: Default::default(),
            simulate_power_loss: None,
            connection_threads: 0,
            dev_login: false,
            tls: None,
            tls_listen: None,
            quic_listen: None,
            https: None,
        }
    }
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The private key.
    pub key: PathBuf,
}
