//! Tether's wire format, and nothing else: no I/O, no clocks.
//!
//! - [`PREAMBLE`]: the 4 bytes a client writes first on a stream transport.
//! - [`codec`]: `frame = varint(len) kind:u8 payload`, with the length checked against
//!   the limit in force *before* anything is allocated (check-then-parse: a partial
//!   frame costs nothing).
//! - [`Frame`]: the typed frame, one variant per kind. Kinds are the field numbers of
//!   `Envelope.frame` in `proto/tether.proto`, the single source of truth; the prost
//!   types and the proto3 JSON mapping (pbjson) are generated from it at build time.
//! - [`kind`]: kind ranges. 0x00-0x3F critical (unknown ⇒ protocol error),
//!   0x40-0x7F ignorable (unknown ⇒ skipped).
//!
//! Every decoder here returns an error on bad input; none panics.

pub mod codec;
pub mod frame;
pub mod kind;

/// Generated protobuf messages of package `tether.v1` (prost + pbjson serde impls).
#[allow(clippy::all, missing_docs)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/tether.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/tether.v1.serde.rs"));
}

pub use codec::{FrameDecoder, FrameError, RawFrame, decode_frame, encode_frame, encode_raw};
pub use frame::{DecodeError, Frame};

/// Written by the client as the first 4 bytes of every stream connection: `T T H <version>`.
pub const PREAMBLE: [u8; 4] = [b'T', b'T', b'H', PROTOCOL_VERSION as u8];

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest frame (kind + payload) accepted before WELCOME.
pub const PRE_AUTH_MAX_FRAME: usize = 4 * 1024;

/// Largest frame (kind + payload) accepted after WELCOME unless negotiated otherwise.
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// Room a SEND body must leave within the frame limit: the DELIVER that carries the body
/// adds seq, ids, sender, device and conversation (each id at most 128 bytes), and must
/// itself fit the limit. So a body may be at most `max_frame - BODY_RESERVE` bytes.
pub const BODY_RESERVE: usize = 1024;

/// Largest body a SEND may carry under the frame limit `max_frame`.
pub fn max_body(max_frame: usize) -> usize {
    max_frame.saturating_sub(BODY_RESERVE)
}

/// Length of a client message id, in bytes.
pub const CLIENT_MSG_ID_LEN: usize = 16;

/// Conversations with a group are named `g:<group>`; user ids may not start with it.
pub const GROUP_PREFIX: &str = "g:";

/// Longest group id, in bytes.
pub const MAX_GROUP_ID_LEN: usize = 64;

/// The conversation id of group `group`.
pub fn group_conversation(group: &str) -> String {
    format!("{GROUP_PREFIX}{group}")
}

/// The group a conversation id names, if it names one.
pub fn conversation_group(conversation: &str) -> Option<&str> {
    conversation.strip_prefix(GROUP_PREFIX)
}

/// Whether `group` is a valid group id: 1 to [`MAX_GROUP_ID_LEN`] bytes of ASCII
/// letters, digits, `.`, `_` and `-`.
pub fn valid_group_id(group: &str) -> bool {
    !group.is_empty()
        && group.len() <= MAX_GROUP_ID_LEN
        && group
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
