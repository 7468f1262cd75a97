//! What can go wrong, for the person reading it: [`ClientError`] for calls that fail,
//! [`DisconnectReason`] for why a connection ended (DESIGN §4).

use std::fmt;
use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use tether_proto::pb::{ErrorCode, KickReason};
use thiserror::Error;

/// Why a client call failed, or why the client stopped for good.
#[derive(Debug, Clone, Error)]
pub enum ClientError {
    /// The server refused the token. The client does not reconnect.
    #[error("authentication failed: {0}")]
    AuthFailed(String),
    /// The server kicked this login (newer login of the device, operator, revoked
    /// token). The client does not reconnect.
    #[error("kicked by the server ({}){}", kick_name(*.reason), detail_suffix(.detail))]
    Kicked {
        /// Why.
        reason: KickReason,
        /// The server's explanation, if any.
        detail: String,
    },
    /// The server rejected this send; it was not committed.
    #[error("send rejected by the server: {} ({reason})", code.as_str_name())]
    Rejected {
        /// The server's error code.
        code: ErrorCode,
        /// The server's explanation.
        reason: String,
    },
    /// The server ended the session with an error that reconnecting cannot fix
    /// (stale device epoch, resume point ahead of head, unsupported version).
    #[error("refused by the server: {} ({reason})", code.as_str_name())]
    Refused {
        /// The server's error code.
        code: ErrorCode,
        /// The server's explanation.
        reason: String,
    },
    /// The body is larger than the server's frame limit allows (the frame limit minus
    /// the room its DELIVER needs, see `tether_proto::max_body`).
    #[error("message too large: a {len}-byte body exceeds the {limit}-byte limit")]
    TooLarge {
        /// Size of the body.
        len: usize,
        /// Limit in force.
        limit: usize,
    },
    /// The inbox epoch changed while a history sync was running; its result would
    /// mix two inboxes. Start again.
    #[error("the inbox epoch changed during the sync")]
    InboxReset,
    /// The SDK stopped trying to send this message (DESIGN §6): it may or may not have
    /// been committed, and the server delivers it at most once. Sending it again with
    /// the same client message id is safe within the server's dedup window.
    #[error("send {client_msg_id} unconfirmed: {}", give_up_text(.reason))]
    Unconfirmed {
        /// The send's client message id.
        client_msg_id: crate::state::ClientMsgId,
        /// Why the SDK gave up.
        reason: tether_core::outbox::GiveUp,
    },
    /// The TLS or QUIC handshake refused the server (an expired certificate, one for
    /// another host, an unknown issuer, a protocol the server does not offer). The
    /// client does not reconnect: retrying cannot fix it.
    #[error("TLS: {0}")]
    Tls(String),
    /// The client was closed (or its driver is gone).
    #[error("client closed")]
    Closed,
    /// A wait ran out of time.
    #[error("timed out")]
    Timeout,
    /// A local I/O operation failed.
    #[error("I/O error: {0}")]
    Io(Arc<io::Error>),
    /// The state file could not be read, parsed or written.
    #[error("state file {}: {detail}", path.display())]
    StateFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// The configuration is unusable.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// The request itself is unusable (e.g. an empty send target).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(Arc::new(e))
    }
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

/// Short name of a kick reason.
pub(crate) fn kick_name(reason: KickReason) -> &'static str {
    match reason {
        KickReason::Unspecified => "unspecified",
        KickReason::Replaced => "replaced by a newer login of this device",
        KickReason::Operator => "operator",
        KickReason::TokenRevoked => "token revoked",
    }
}

/// Why a connection ended, as the app sees it (DESIGN §4).
///
/// This version detects what it can without TCP_INFO: a heartbeat failure is always
/// [`DisconnectReason::UnknownTimeout`], a socket error [`DisconnectReason::NetworkDead`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The network path failed (socket error).
    NetworkDead,
    /// PINGs reached the server's kernel but no PONG came back.
    ServerUnresponsive,
    /// The heartbeat failed and the cause is unknown (no TCP_INFO diagnosis).
    UnknownTimeout,
    /// The server closed the connection, with the ERROR code it sent, if any.
    ClosedByServer {
        /// Code of the fatal ERROR that preceded the close; `None` for a bare close.
        code: Option<ErrorCode>,
    },
    /// The server sent KICK.
    Kicked {
        /// Why.
        reason: KickReason,
    },
    /// The server sent GOAWAY (draining).
    GoingAway,
    /// The token was refused.
    AuthFailed,
    /// The server broke the protocol (undecodable frame, gap in the delivery stream...).
    ProtocolError {
        /// What was wrong.
        detail: String,
    },
    /// The server's certificate or handshake was refused (see [`ClientError::Tls`]).
    TlsRefused {
        /// Why.
        detail: String,
    },
    /// The app closed the client.
    LocalClose,
}

impl fmt::Display for DisconnectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DisconnectReason::NetworkDead => f.write_str("network dead"),
            DisconnectReason::ServerUnresponsive => f.write_str("server unresponsive"),
            DisconnectReason::UnknownTimeout => f.write_str("heartbeat timeout (cause unknown)"),
            DisconnectReason::ClosedByServer { code: None } => f.write_str("closed by server"),
            DisconnectReason::ClosedByServer { code: Some(c) } => {
                write!(f, "closed by server ({})", c.as_str_name())
            }
            DisconnectReason::Kicked { reason } => write!(f, "kicked ({})", kick_name(*reason)),
            DisconnectReason::GoingAway => f.write_str("server going away"),
            DisconnectReason::AuthFailed => f.write_str("authentication failed"),
            DisconnectReason::ProtocolError { detail } => write!(f, "protocol error: {detail}"),
            DisconnectReason::TlsRefused { detail } => write!(f, "TLS refused: {detail}"),
            DisconnectReason::LocalClose => f.write_str("closed locally"),
        }
    }
}

fn give_up_text(reason: &tether_core::outbox::GiveUp) -> String {
    use tether_core::outbox::GiveUp;
    match reason {
        GiveUp::NoAck { tries } => format!("no answer on a live connection after {tries} tries"),
        GiveUp::Offline { waited } => format!("no session for {:.0} s", waited.as_secs_f64()),
        GiveUp::DedupWindow { age, window } => format!(
            "queued {:.0} s ago, too close to the server's {:.0} s dedup window to resend safely",
            age.as_secs_f64(),
            window.as_secs_f64()
        ),
    }
}
