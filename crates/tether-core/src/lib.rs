//! Tether's protocol rules as plain state machines (the quinn-proto model): every
//! input carries the time it happened, every timer is exposed as a deadline to poll,
//! and nothing here touches a socket, a clock or a runtime. The SDK and the server
//! drive these; tests drive them with fake instants.
//!
//! - [`heartbeat`]: when to PING and when the link is dead, idle or fixed mode, with
//!   run-time interval changes and late timers (DESIGN §4).
//! - [`admission`]: the login token bucket.
//! - [`diagnosis`]: why a heartbeat failed, from TCP_INFO.
//! - [`backoff`]: capped exponential reconnect backoff with full jitter.
//! - [`inbox`]: the client's cursor: each entry handed to the app once, in order.
//! - [`outbox`]: the send side of QoS: order, retransmission after `ack_timeout`, the
//!   offline window, the dedup-window limit, the bound (DESIGN §6).
//! - [`smart`]: the smart heartbeat: per network, the longest interval the NAT allows
//!   (DESIGN §5).
//! - [`window`]: the server's per-connection delivery window: position, credit of
//!   un-ACKed DELIVERs, backlog replay pacing, ACK validation (DESIGN §6).

pub mod admission;
pub mod backoff;
pub mod diagnosis;
pub mod heartbeat;
pub mod inbox;
pub mod outbox;
pub mod smart;
pub mod window;
