//! Typed frames: [`Frame`] is the generated `Envelope.frame` oneof, whose field numbers
//! are the kind bytes. This module maps between it, [`RawFrame`] and JSON text.

use crate::codec::RawFrame;
use crate::kind::{self, KindClass};
use crate::pb;
use prost::Message;

/// Longest user id, device id, group id or content type, in bytes. Bounding these keeps
/// a DELIVER within `max_body + BODY_RESERVE` and every id cheap to hold.
pub const MAX_ID_LEN: usize = 128;
use thiserror::Error;

/// A decoded frame: one variant per kind.
pub type Frame = pb::envelope::Frame;

/// Why a whole frame could not become a [`Frame`]. `UnknownIgnorable` is not an error
/// to the connection: the receiver skips the frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// An unknown kind in the critical range (0x00-0x3F) or the invalid range.
    #[error("unknown critical frame kind 0x{0:02x}")]
    UnknownCritical(u8),
    /// An unknown kind in the ignorable range (0x40-0x7F): skip it.
    #[error("unknown ignorable frame kind 0x{0:02x}")]
    UnknownIgnorable(u8),
    /// The payload is not a valid protobuf encoding of the kind's message.
    #[error("{kind} payload is not valid protobuf: {reason}")]
    BadPayload {
        /// Kind name.
        kind: &'static str,
        /// The protobuf decoder's explanation.
        reason: String,
    },
    /// A field the kind requires is absent or has the wrong shape.
    #[error("{kind}: required field `{field}` is missing or invalid")]
    MissingField {
        /// Kind name.
        kind: &'static str,
        /// Field name as in the schema.
        field: &'static str,
    },
    /// A JSON text frame that is not an Envelope with exactly one frame.
    #[error("bad JSON frame: {0}")]
    BadJson(String),
}

fn payload<M: Message + Default>(kind: u8, bytes: &[u8]) -> Result<M, DecodeError> {
    M::decode(bytes).map_err(|e| DecodeError::BadPayload {
        kind: kind::name(kind),
        reason: e.to_string(),
    })
}

/// The kind byte of a frame.
pub fn kind_of(frame: &Frame) -> u8 {
    match frame {
        Frame::Hello(_) => kind::HELLO,
        Frame::Welcome(_) => kind::WELCOME,
        Frame::Ping(_) => kind::PING,
        Frame::Pong(_) => kind::PONG,
        Frame::Send(_) => kind::SEND,
        Frame::SendAck(_) => kind::SEND_ACK,
        Frame::Deliver(_) => kind::DELIVER,
        Frame::Ack(_) => kind::ACK,
        Frame::Sync(_) => kind::SYNC,
        Frame::SyncDone(_) => kind::SYNC_DONE,
        Frame::Receipt(_) => kind::RECEIPT,
        Frame::Kick(_) => kind::KICK,
        Frame::GoAway(_) => kind::GO_AWAY,
        Frame::Error(_) => kind::ERROR,
        Frame::GroupChange(_) => kind::GROUP,
        Frame::Query(_) => kind::QUERY,
        Frame::QueryResult(_) => kind::QUERY_RESULT,
    }
}

/// Encodes the frame's payload (without kind or length).
pub fn encode_payload(frame: &Frame) -> Vec<u8> {
    match frame {
        Frame::Hello(m) => m.encode_to_vec(),
        Frame::Welcome(m) => m.encode_to_vec(),
        Frame::Ping(m) => m.encode_to_vec(),
        Frame::Pong(m) => m.encode_to_vec(),
        Frame::Send(m) => m.encode_to_vec(),
        Frame::SendAck(m) => m.encode_to_vec(),
        Frame::Deliver(m) => m.encode_to_vec(),
        Frame::Ack(m) => m.encode_to_vec(),
        Frame::Sync(m) => m.encode_to_vec(),
        Frame::SyncDone(m) => m.encode_to_vec(),
        Frame::Receipt(m) => m.encode_to_vec(),
        Frame::Kick(m) => m.encode_to_vec(),
        Frame::GoAway(m) => m.encode_to_vec(),
        Frame::Error(m) => m.encode_to_vec(),
        Frame::GroupChange(m) => m.encode_to_vec(),
        Frame::Query(m) => m.encode_to_vec(),
        Frame::QueryResult(m) => m.encode_to_vec(),
    }
}

/// Converts a typed frame into a whole raw frame.
pub fn to_raw(frame: &Frame) -> RawFrame {
    RawFrame {
        kind: kind_of(frame),
        payload: encode_payload(frame).into(),
    }
}

/// Appends the stream encoding (length, kind, payload) of `frame` to `out`.
pub fn encode_to(frame: &Frame, out: &mut Vec<u8>) {
    crate::codec::encode_raw(kind_of(frame), &encode_payload(frame), out);
}

/// Decodes and validates a raw frame.
pub fn from_raw(raw: &RawFrame) -> Result<Frame, DecodeError> {
    let k = raw.kind;
    let p = &raw.payload[..];
    let frame = match k {
        kind::HELLO => Frame::Hello(payload(k, p)?),
        kind::WELCOME => Frame::Welcome(payload(k, p)?),
        kind::PING => Frame::Ping(payload(k, p)?),
        kind::PONG => Frame::Pong(payload(k, p)?),
        kind::SEND => Frame::Send(payload(k, p)?),
        kind::SEND_ACK => Frame::SendAck(payload(k, p)?),
        kind::DELIVER => Frame::Deliver(payload(k, p)?),
        kind::ACK => Frame::Ack(payload(k, p)?),
        kind::SYNC => Frame::Sync(payload(k, p)?),
        kind::SYNC_DONE => Frame::SyncDone(payload(k, p)?),
        kind::RECEIPT => Frame::Receipt(payload(k, p)?),
        kind::KICK => Frame::Kick(payload(k, p)?),
        kind::GO_AWAY => Frame::GoAway(payload(k, p)?),
        kind::ERROR => Frame::Error(payload(k, p)?),
        kind::GROUP => Frame::GroupChange(payload(k, p)?),
        kind::QUERY => Frame::Query(payload(k, p)?),
        kind::QUERY_RESULT => Frame::QueryResult(payload(k, p)?),
        other => {
            return Err(match kind::class(other) {
                KindClass::Ignorable => DecodeError::UnknownIgnorable(other),
                KindClass::Critical | KindClass::Invalid => DecodeError::UnknownCritical(other),
            });
        }
    };
    validate(&frame)?;
    Ok(frame)
}

/// Checks the fields each kind requires (proto3 has no `required`, so this is where
/// "a valid frame missing a required field" is caught).
pub fn validate(frame: &Frame) -> Result<(), DecodeError> {
    let missing = |field| {
        Err(DecodeError::MissingField {
            kind: kind::name(kind_of(frame)),
            field,
        })
    };
    match frame {
        Frame::Hello(h) => {
            if h.version == 0 {
                return missing("version");
            }
            if h.token.is_empty() {
                return missing("token");
            }
            if h.device_id.is_empty() || h.device_id.len() > MAX_ID_LEN {
                return missing("device_id");
            }
        }
        Frame::Send(s) => {
            if s.client_msg_id.len() != crate::CLIENT_MSG_ID_LEN {
                return missing("client_msg_id");
            }
            match &s.target {
                None => return missing("target"),
                Some(pb::send::Target::User(u)) | Some(pb::send::Target::Group(u))
                    if u.is_empty() || u.len() > MAX_ID_LEN =>
                {
                    return missing("target");
                }
                Some(_) => {}
            }
            if s.content_type.len() > MAX_ID_LEN {
                return missing("content_type");
            }
        }
        Frame::SendAck(a) => {
            if a.client_msg_id.len() != crate::CLIENT_MSG_ID_LEN {
                return missing("client_msg_id");
            }
        }
        Frame::Deliver(d) => match &d.entry {
            Some(e) if e.seq > 0 => {}
            _ => return missing("entry"),
        },
        Frame::Receipt(r) => {
            if r.conversation.is_empty() || r.conversation.len() > MAX_ID_LEN {
                return missing("conversation");
            }
        }
        Frame::GroupChange(g) => {
            if g.client_msg_id.len() != crate::CLIENT_MSG_ID_LEN {
                return missing("client_msg_id");
            }
            if g.group.is_empty() || g.group.len() > MAX_ID_LEN {
                return missing("group");
            }
            if g.members
                .iter()
                .any(|m| m.is_empty() || m.len() > MAX_ID_LEN)
                || g.name.len() > MAX_ID_LEN
            {
                return missing("members");
            }
            match pb::GroupOp::try_from(g.op) {
                Ok(pb::GroupOp::Unspecified) | Err(_) => return missing("op"),
                Ok(_) => {}
            }
        }
        Frame::Query(q) => match &q.what {
            None => return missing("what"),
            Some(pb::query::What::Group(g)) if g.group.is_empty() || g.group.len() > MAX_ID_LEN => {
                return missing("group");
            }
            Some(pb::query::What::Conversations(c)) if c.after.len() > MAX_ID_LEN + 2 => {
                return missing("after");
            }
            Some(_) => {}
        },
        Frame::Sync(s) => {
            if s.from_seq == 0 {
                return missing("from_seq");
            }
        }
        Frame::Welcome(w) => {
            if w.inbox_epoch == 0 && !w.probe {
                return missing("inbox_epoch");
            }
        }
        Frame::Ping(_)
        | Frame::Pong(_)
        | Frame::Ack(_)
        | Frame::SyncDone(_)
        | Frame::Kick(_)
        | Frame::GoAway(_)
        | Frame::Error(_)
        | Frame::QueryResult(_) => {}
    }
    Ok(())
}

/// The proto3 JSON mapping of a frame, as carried by WebSocket text messages
/// (an `Envelope`, e.g. `{"ping":{}}`).
pub fn to_json(frame: &Frame) -> String {
    let envelope = pb::Envelope {
        frame: Some(frame.clone()),
    };
    // Serializing generated types to a String cannot fail (no maps with non-string keys).
    serde_json::to_string(&envelope).unwrap_or_default()
}

/// Parses and validates a JSON text frame.
pub fn from_json(text: &str) -> Result<Frame, DecodeError> {
    let envelope: pb::Envelope =
        serde_json::from_str(text).map_err(|e| DecodeError::BadJson(e.to_string()))?;
    let frame = envelope
        .frame
        .ok_or_else(|| DecodeError::BadJson("envelope holds no frame".into()))?;
    validate(&frame)?;
    Ok(frame)
}

/// A protocol ERROR frame.
pub fn error(code: pb::ErrorCode, reason: impl Into<String>, fatal: bool) -> Frame {
    Frame::Error(pb::Error {
        code: code as i32,
        reason: reason.into(),
        retry_after_ms: 0,
        fatal,
        client_msg_id: Default::default(),
        query_id: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{decode_frame, encode_raw};
    use rand::{Rng, SeedableRng, rngs::StdRng};

    fn samples() -> Vec<Frame> {
        let entry = pb::Entry {
            seq: 7,
            message_id: 99,
            from: "alice".into(),
            from_device: "phone".into(),
            conversation: "alice".into(),
            body: bytes::Bytes::from_static(b"hi bob"),
            content_type: "text/plain".into(),
            ts_ms: 1_700_000_000_000,
            r#type: pb::EntryType::Message as i32,
            incoming: 3,
        };
        vec![
            Frame::Hello(pb::Hello {
                version: 1,
                token: "t.o.k".into(),
                device_id: "d1".into(),
                device_epoch: 3,
                resume: Some(pb::ResumePoint {
                    inbox_epoch: 5,
                    last_seq: 10,
                }),
                ..Default::default()
            }),
            Frame::Welcome(pb::Welcome {
                session_id: "s".into(),
                inbox_epoch: 5,
                start_seq: 11,
                ..Default::default()
            }),
            Frame::Ping(pb::Ping::default()),
            Frame::Pong(pb::Pong::default()),
            Frame::Send(pb::Send {
                client_msg_id: vec![1u8; 16].into(),
                target: Some(pb::send::Target::User("bob".into())),
                body: bytes::Bytes::from_static(b"hello"),
                content_type: String::new(),
            }),
            Frame::SendAck(pb::SendAck {
                client_msg_id: vec![1u8; 16].into(),
                message_id: 4,
                seq: 2,
                ts_ms: 1,
                duplicate: true,
            }),
            Frame::Deliver(pb::Deliver {
                entry: Some(entry.clone()),
            }),
            Frame::Ack(pb::Ack { seq: 7 }),
            Frame::Sync(pb::Sync {
                from_seq: 1,
                to_seq: 9,
                limit: 5,
            }),
            Frame::SyncDone(pb::SyncDone {
                entries: vec![entry],
                next_seq: 8,
                head: 9,
            }),
            Frame::Receipt(pb::Receipt {
                conversation: "bob".into(),
                read_up_to: 3,
                message_id: 9,
                incoming: 2,
            }),
            Frame::Kick(pb::Kick {
                reason: pb::KickReason::Replaced as i32,
                detail: String::new(),
            }),
            Frame::GoAway(pb::GoAway {
                min_delay_ms: 1,
                max_delay_ms: 2,
                alternate_address: String::new(),
            }),
            error(pb::ErrorCode::AuthFailed, "bad token", true),
            Frame::GroupChange(pb::GroupChange {
                client_msg_id: vec![2u8; 16].into(),
                group: "family".into(),
                op: pb::GroupOp::Add as i32,
                members: vec!["carol".into()],
                name: String::new(),
            }),
            Frame::Query(pb::Query {
                id: 3,
                what: Some(pb::query::What::Group(pb::GetGroup {
                    group: "family".into(),
                })),
            }),
            Frame::QueryResult(pb::QueryResult {
                id: 3,
                conversations: vec![pb::Conversation {
                    id: "g:family".into(),
                    last_seq: 4,
                    last_ts_ms: 5,
                    unread: 1,
                    read_up_to: 3,
                    incoming: 2,
                }],
                more: false,
                groups: Vec::new(),
                group: None,
            }),
        ]
    }

    #[test]
    fn every_kind_round_trips_through_binary_and_json() {
        for frame in samples() {
            let raw = to_raw(&frame);
            assert_eq!(from_raw(&raw).unwrap(), frame);
            let json = to_json(&frame);
            assert_eq!(from_json(&json).unwrap(), frame, "{json}");
        }
    }

    #[test]
    fn kind_bytes_equal_envelope_field_numbers() {
        // The envelope's binary encoding starts with the tag (field << 3 | 2).
        for frame in samples() {
            let env = pb::Envelope {
                frame: Some(frame.clone()),
            };
            let bytes = env.encode_to_vec();
            assert_eq!(bytes[0] >> 3, kind_of(&frame), "{frame:?}");
        }
    }

    #[test]
    fn empty_ping_and_pong_are_two_bytes() {
        let mut out = Vec::new();
        encode_to(&Frame::Ping(pb::Ping::default()), &mut out);
        assert_eq!(out.len(), 2);
        out.clear();
        encode_to(&Frame::Pong(pb::Pong::default()), &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn unknown_kinds_are_classified_by_range() {
        let raw = |kind| RawFrame {
            kind,
            payload: Default::default(),
        };
        assert_eq!(
            from_raw(&raw(0x3F)),
            Err(DecodeError::UnknownCritical(0x3F))
        );
        assert_eq!(
            from_raw(&raw(0x40)),
            Err(DecodeError::UnknownIgnorable(0x40))
        );
        assert_eq!(
            from_raw(&raw(0x90)),
            Err(DecodeError::UnknownCritical(0x90))
        );
    }

    #[test]
    fn send_without_client_msg_id_or_target_is_missing_a_field() {
        let send = pb::Send {
            client_msg_id: vec![1u8; 16].into(),
            target: None,
            body: Default::default(),
            content_type: String::new(),
        };
        assert!(matches!(
            from_raw(&to_raw(&Frame::Send(send.clone()))),
            Err(DecodeError::MissingField {
                field: "target",
                ..
            })
        ));
        let short_id = pb::Send {
            client_msg_id: vec![1u8; 3].into(),
            target: Some(pb::send::Target::User("bob".into())),
            ..send
        };
        assert!(matches!(
            from_raw(&to_raw(&Frame::Send(short_id))),
            Err(DecodeError::MissingField {
                field: "client_msg_id",
                ..
            })
        ));
    }

    #[test]
    fn every_truncation_of_every_frame_is_an_error_or_incomplete_never_a_panic() {
        for frame in samples() {
            let mut wire = Vec::new();
            encode_to(&frame, &mut wire);
            for cut in 0..wire.len() {
                // The stream decoder waits for more bytes ...
                assert_eq!(decode_frame(&wire[..cut], 4096), Ok(None));
                // ... and a message transport handing over a cut payload gets an error
                // or (for messages whose prefix is itself valid) a frame, never a panic.
                if cut >= 2 {
                    let (kind, body) = (wire[1], &wire[2..cut]);
                    let _ = from_raw(&RawFrame {
                        kind,
                        payload: bytes::Bytes::copy_from_slice(body),
                    });
                }
            }
        }
    }

    #[test]
    fn random_corruption_of_valid_frames_never_panics() {
        let mut rng = StdRng::seed_from_u64(0x7e7e);
        let frames = samples();
        let mut decoded_errors = 0usize;
        for _ in 0..20_000 {
            let frame = &frames[rng.random_range(0..frames.len())];
            let mut wire = Vec::new();
            encode_to(frame, &mut wire);
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..wire.len());
                wire[i] = rng.random();
            }
            let mut rest = &wire[..];
            loop {
                match decode_frame(rest, 4096) {
                    Ok(Some((raw, used))) => {
                        if from_raw(&raw).is_err() {
                            decoded_errors += 1;
                        }
                        rest = &rest[used..];
                    }
                    Ok(None) => break,
                    Err(_) => {
                        decoded_errors += 1;
                        break;
                    }
                }
            }
        }
        // Corruption must actually be detected some of the time, or this tests nothing.
        assert!(decoded_errors > 1000, "only {decoded_errors} errors");
    }

    #[test]
    fn ids_and_content_types_over_128_bytes_are_refused() {
        let long = "x".repeat(MAX_ID_LEN + 1);
        let send = pb::Send {
            client_msg_id: vec![1u8; 16].into(),
            target: Some(pb::send::Target::User("bob".into())),
            body: Default::default(),
            content_type: long.clone(),
        };
        assert!(matches!(
            from_raw(&to_raw(&Frame::Send(send))),
            Err(DecodeError::MissingField {
                field: "content_type",
                ..
            })
        ));
        let receipt = pb::Receipt {
            conversation: long,
            read_up_to: 1,
            ..Default::default()
        };
        assert!(from_raw(&to_raw(&Frame::Receipt(receipt))).is_err());
    }

    #[test]
    fn garbage_payload_is_bad_payload() {
        let mut wire = Vec::new();
        encode_raw(kind::SEND, &[0xFF, 0xFF, 0xFF], &mut wire);
        let (raw, _) = decode_frame(&wire, 4096).unwrap().unwrap();
        assert!(matches!(
            from_raw(&raw),
            Err(DecodeError::BadPayload { .. })
        ));
    }
}
