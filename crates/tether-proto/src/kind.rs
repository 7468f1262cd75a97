//! Frame kinds and their ranges.
//!
//! The numbers equal the field numbers of `Envelope.frame` in the schema; a unit test
//! checks that every [`crate::Frame`] variant round-trips through its kind.

/// Kinds below this are critical: an unknown one is a protocol error.
pub const IGNORABLE_START: u8 = 0x40;
/// Kinds at or above this are invalid (the top bit is reserved).
pub const INVALID_START: u8 = 0x80;

pub const HELLO: u8 = 0x01;
pub const WELCOME: u8 = 0x02;
pub const PING: u8 = 0x03;
pub const PONG: u8 = 0x04;
pub const SEND: u8 = 0x05;
pub const SEND_ACK: u8 = 0x06;
pub const DELIVER: u8 = 0x07;
pub const ACK: u8 = 0x08;
pub const SYNC: u8 = 0x09;
pub const SYNC_DONE: u8 = 0x0A;
pub const RECEIPT: u8 = 0x0B;
pub const KICK: u8 = 0x0C;
pub const GO_AWAY: u8 = 0x0D;
pub const ERROR: u8 = 0x0E;
pub const GROUP: u8 = 0x0F;
pub const QUERY: u8 = 0x10;
pub const QUERY_RESULT: u8 = 0x11;

/// What a receiver must do with a kind it does not know.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KindClass {
    /// 0x00-0x3F: unknown ⇒ ERROR and close.
    Critical,
    /// 0x40-0x7F: unknown ⇒ skip the frame.
    Ignorable,
    /// 0x80-0xFF: never valid.
    Invalid,
}

/// Classifies a kind byte by range.
pub fn class(kind: u8) -> KindClass {
    if kind < IGNORABLE_START {
        KindClass::Critical
    } else if kind < INVALID_START {
        KindClass::Ignorable
    } else {
        KindClass::Invalid
    }
}

/// Human-readable name of a known kind, for logs and errors.
pub fn name(kind: u8) -> &'static str {
    match kind {
        HELLO => "HELLO",
        WELCOME => "WELCOME",
        PING => "PING",
        PONG => "PONG",
        SEND => "SEND",
        SEND_ACK => "SEND_ACK",
        DELIVER => "DELIVER",
        ACK => "ACK",
        SYNC => "SYNC",
        SYNC_DONE => "SYNC_DONE",
        RECEIPT => "RECEIPT",
        KICK => "KICK",
        GO_AWAY => "GOAWAY",
        ERROR => "ERROR",
        GROUP => "GROUP",
        QUERY => "QUERY",
        QUERY_RESULT => "QUERY_RESULT",
        _ => "UNKNOWN",
    }
}
