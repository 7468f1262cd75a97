//! Tether's Rust client SDK.
//!
//! **Owns** the client half of the long connection:
//! - *connection lifecycle*: connect, HELLO/WELCOME, resume, heartbeat, reconnect with
//!   capped exponential backoff and full jitter, server failover, GOAWAY, KICK;
//! - *client-side QoS*: an [`Outbox`] that keeps every send, with its client message id,
//!   until SEND_ACK, resends all of them in order after each reconnect, retransmits after
//!   `ack_timeout`, and reports a send *unconfirmed* after `max_tries`, after the offline
//!   window, or before it would outlive the server's dedup window; an
//!   [`InboxCursor`] that hands each inbox entry to the app exactly once and in order,
//!   and never skips one (a gap restarts the connection from the resume point);
//! - *state persistence*: the [`StateFile`] `(inbox_epoch, last_seq, device_epoch,
//!   outbox)`, written atomically, so a restarted process resumes where it left off.
//!
//! **Must not**: verify tokens (the server does), reorder or drop sends, skip inbox
//! entries, grow memory without bound (sends in flight, the outbox, entries waiting for
//! the app are all capped; a slow app stalls the server's credit window instead), or
//! print anything (it logs with `tracing`).
//!
//! Architecture: [`Client::start`] spawns one driver task that does all I/O; the app
//! talks to it through bounded channels via [`Client`] and [`ClientHandle`]. The rules
//! themselves ([`InboxCursor`], [`Backoff`], [`Heartbeat`], [`Outbox`] from tether-core)
//! are plain state machines with time passed in, unit-tested without sockets or sleeps.
//! Transports come
//! from a [`Connector`]: TCP by address, or in-memory pipes ([`memory_connector`]) for
//! tests and benchmarks.
//!
//! ```no_run
//! # async fn demo() -> Result<(), tether_client::ClientError> {
//! use tether_client::{Client, ClientConfig};
//! let mut config = ClientConfig::new("127.0.0.1:7400", "<jwt>", "phone");
//! config.state_path = Some("alice@phone.json".into());
//! let mut client = Client::start(config)?;
//! client.send("bob", "hi".into()).await?;
//! while let Some(entry) = client.recv().await {
//!     // ... process ...
//!     client.ack(entry.seq);
//! }
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

mod client;
pub mod config;
pub mod connector;
mod driver;
pub mod error;
pub mod smart;
pub mod state;

pub use backoff::Backoff;
pub use client::{
    Client, ClientEvent, ClientHandle, ClientStats, ConnState, Entry, SendAck, SendTicket,
    SessionInfo, group_event_of, receipt_of,
};
pub use config::{ClientConfig, DEFAULT_SERVER, token_subject};
pub use connector::{
    BoxTransport, Connector, MemoryConnector, MemoryListener, NetConnector, Scheme, ServerUrl,
    certificate_refused, memory_connector,
};
pub use error::{ClientError, DisconnectReason};
pub use heartbeat::Heartbeat;
pub use inbox::InboxCursor;
pub use state::{ClientMsgId, GroupAction, GroupRequest, PendingSend, StateFile};
pub use tether_core::outbox::{GiveUp, Outbox, OutboxConfig};
pub use tether_core::{backoff, heartbeat, inbox};
pub use tether_proto::pb::{
    Conversation, EntryType, ErrorCode, GroupEvent, GroupEventKind, GroupInfo, GroupMember,
    GroupSummary, KickReason, ReceiptBody, ReceiptKind,
};
pub use tether_proto::{conversation_group, group_conversation};
