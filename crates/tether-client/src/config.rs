//! Client configuration: a plain struct with safe defaults from [`ClientConfig::new`].

use crate::backoff::{DEFAULT_BASE, DEFAULT_CAP};
use crate::connector::{Connector, NetConnector};
use crate::error::ClientError;
use crate::heartbeat::{DEFAULT_PONG_TIMEOUT, MAX_MISSES};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Default server address.
pub const DEFAULT_SERVER: &str = "127.0.0.1:7400";

/// Everything [`crate::Client::start`] needs. Build with [`ClientConfig::new`], then set
/// fields.
#[derive(Clone)]
pub struct ClientConfig {
    /// Servers as `host:port`, tried in turn (failover on connect failure or heartbeat
    /// timeout).
    pub servers: Vec<String>,
    /// HS256 JWT; its `sub` is the user id. Never logged.
    pub token: String,
    /// Stable id of this device (installation), unique per user, at most 128 bytes.
    pub device_id: String,
    /// Where the state file lives; `None` keeps state in memory only (a restart then
    /// starts from the server's cursor and forgets unconfirmed sends).
    pub state_path: Option<PathBuf>,
    /// PING after this long without sending anything (the server may clamp it).
    pub heartbeat_interval: Duration,
    /// Idle (PING after `heartbeat_interval` without sending) or fixed (every interval).
    pub heartbeat_mode: tether_core::heartbeat::HeartbeatMode,
    /// How long to wait for a PONG (the server's WELCOME may override it).
    pub pong_timeout: Duration,
    /// Platform name sent in HELLO.
    pub platform: String,
    /// App version sent in HELLO.
    pub app_version: String,
    /// Acknowledge each entry as soon as `Client::recv` returns it.
    pub auto_ack: bool,
    /// Limit for TCP connect and for the HELLO → WELCOME exchange.
    pub connect_timeout: Duration,
    /// First backoff ceiling after a failure.
    pub backoff_base: Duration,
    /// Largest backoff ceiling.
    pub backoff_cap: Duration,
    /// Most sends on the wire without a SEND_ACK; later ones wait, in order.
    pub max_in_flight: usize,
    /// Outbox timing and bound (DESIGN §6): a send unanswered for `ack_timeout` on a
    /// live connection goes again, up to `max_tries` times; without a session it waits
    /// `offline_window` (checked every `check_every`); past the server's dedup window it
    /// is never resent. Each of these ends in [`crate::ClientError::Unconfirmed`]. At
    /// most `capacity` sends are kept; `send` waits while the outbox is full.
    pub outbox: tether_core::outbox::OutboxConfig,
    /// Entries buffered between the driver and the app (beyond it the server's credit
    /// window stalls delivery).
    pub entry_buffer: usize,
    /// How transports are opened (TCP by default).
    pub connector: Arc<dyn Connector>,
    /// App-supplied id of the network the device is on (sent in HELLO; the smart
    /// heartbeat learns per network). Change it with `ClientHandle::switch_network`.
    pub network_id: String,
    /// Learn the longest interval the network's NAT allows (DESIGN §5) instead of
    /// using `heartbeat_interval`; `None` = fixed interval.
    pub smart_heartbeat: Option<crate::smart::SmartSettings>,
}

impl ClientConfig {
    /// A configuration for one server with safe defaults: 30 s heartbeat, 10 s pong
    /// timeout, backoff 200 ms → 30 s, no state file, manual acks.
    pub fn new(
        server: impl Into<String>,
        token: impl Into<String>,
        device_id: impl Into<String>,
    ) -> Self {
        let heartbeat_interval = Duration::from_secs(30);
        let pong_timeout = DEFAULT_PONG_TIMEOUT;
        Self {
            servers: vec![server.into()],
            token: token.into(),
            device_id: device_id.into(),
            state_path: None,
            heartbeat_interval,
            heartbeat_mode: Default::default(),
            pong_timeout,
            platform: std::env::consts::OS.to_string(),
            app_version: concat!("tether-client/", env!("CARGO_PKG_VERSION")).to_string(),
            auto_ack: false,
            connect_timeout: Duration::from_secs(10),
            backoff_base: DEFAULT_BASE,
            backoff_cap: DEFAULT_CAP,
            max_in_flight: 1024,
            outbox: tether_core::outbox::OutboxConfig::default(),
            entry_buffer: 256,
            network_id: "default".into(),
            smart_heartbeat: None,
            connector: Arc::new(NetConnector::new(
                // Backstop only: well past the heartbeat's own dead-link time.
                Some(heartbeat_interval + pong_timeout * MAX_MISSES + Duration::from_secs(60)),
                Some(Duration::from_secs(60)),
            )),
        }
    }

    /// Checks the fields that would make the client useless.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |what: &str| Err(ClientError::InvalidConfig(what.to_string()));
        if self.servers.is_empty() || self.servers.iter().any(|s| s.is_empty()) {
            return bad("at least one server address is required");
        }
        if self.token.is_empty() {
            return bad("token is empty");
        }
        if self.device_id.is_empty() || self.device_id.len() > 128 {
            return bad("device_id must be 1 to 128 bytes");
        }
        if self.heartbeat_interval.is_zero() || self.pong_timeout.is_zero() {
            return bad("heartbeat interval and pong timeout must be positive");
        }
        if self.max_in_flight == 0 || self.outbox.capacity == 0 || self.entry_buffer == 0 {
            return bad("max_in_flight, outbox.capacity and entry_buffer must be positive");
        }
        let o = &self.outbox;
        if o.ack_timeout.is_zero() || o.max_tries == 0 || o.check_every.is_zero() {
            return bad("outbox ack_timeout, max_tries and check_every must be positive");
        }
        Ok(())
    }
}

impl fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientConfig")
            .field("servers", &self.servers)
            .field("token", &"<redacted>")
            .field("device_id", &self.device_id)
            .field("state_path", &self.state_path)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("pong_timeout", &self.pong_timeout)
            .field("platform", &self.platform)
            .field("app_version", &self.app_version)
            .field("auto_ack", &self.auto_ack)
            .field("connect_timeout", &self.connect_timeout)
            .field("backoff_base", &self.backoff_base)
            .field("backoff_cap", &self.backoff_cap)
            .field("max_in_flight", &self.max_in_flight)
            .field("outbox", &self.outbox)
            .field("entry_buffer", &self.entry_buffer)
            .field("network_id", &self.network_id)
            .field("smart_heartbeat", &self.smart_heartbeat)
            .finish_non_exhaustive()
    }
}

/// The user id in a token's `sub` claim, decoded without verifying the signature
/// (for naming state files; the server is the one that verifies).
pub fn token_subject(token: &str) -> Option<String> {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let payload = token.split('.').nth(1)?;
    let json = URL_SAFE_NO_PAD.decode(payload.trim_end_matches('=')).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&json).ok()?;
    claims.get("sub")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_subject_is_read_from_the_unverified_payload() {
        // {"alg":"HS256","typ":"JWT"} . {"sub":"alice","exp":1} . signature
        let token = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MX0.sig";
        assert_eq!(token_subject(token).as_deref(), Some("alice"));
        assert_eq!(token_subject("garbage"), None);
    }

    #[test]
    fn config_debug_never_shows_the_token() {
        let cfg = ClientConfig::new(DEFAULT_SERVER, "secret-token", "d");
        assert!(!format!("{cfg:?}").contains("secret-token"));
        assert!(cfg.validate().is_ok());
    }
}
