//! Length-prefixed framing: `varint(len) kind:u8 payload`, `len` = 1 + payload length.
//!
//! Stream transports (TCP, TLS) need this; message transports (WebSocket, in-memory)
//! carry [`RawFrame`]s directly. The length is validated against the caller's limit
//! as soon as the varint is complete, before any buffer is reserved for the body.

use bytes::{Buf, Bytes, BytesMut};
use thiserror::Error;

/// A whole frame: its kind byte and its (still encoded) protobuf payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The kind byte.
    pub kind: u8,
    /// The protobuf encoding of that kind's message.
    pub payload: Bytes,
}

impl RawFrame {
    /// Bytes this frame occupies on a stream transport (varint + kind + payload).
    pub fn wire_len(&self) -> usize {
        let len = 1 + self.payload.len();
        varint_len(len as u64) + len
    }
}

/// Why a byte stream could not be split into frames. All are fatal to the connection.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The length prefix is not a valid varint (more than 10 bytes, or overflows).
    #[error("malformed frame length prefix")]
    BadLength,
    /// A frame of length 0 has no kind byte.
    #[error("empty frame (length 0, no kind byte)")]
    Empty,
    /// The announced length exceeds the limit in force.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Announced length (kind + payload).
        len: u64,
        /// Limit in force.
        limit: usize,
    },
}

/// Number of bytes `value` takes as a varint.
pub fn varint_len(value: u64) -> usize {
    prost::encoding::encoded_len_varint(value)
}

/// Parses the length prefix at the start of `buf`.
///
/// Returns `Ok(None)` if more bytes are needed, else `(prefix_len, frame_len)`.
/// The limit is enforced here, so callers never reserve more than `limit` bytes.
pub fn parse_header(buf: &[u8], limit: usize) -> Result<Option<(usize, usize)>, FrameError> {
    let mut value: u64 = 0;
    for (i, &byte) in buf.iter().enumerate().take(10) {
        let bits = u64::from(byte & 0x7F);
        if i == 9 && byte > 1 {
            return Err(FrameError::BadLength);
        }
        value |= bits << (7 * i);
        if byte & 0x80 == 0 {
            if value == 0 {
                return Err(FrameError::Empty);
            }
            if value > limit as u64 {
                return Err(FrameError::TooLarge { len: value, limit });
            }
            return Ok(Some((i + 1, value as usize)));
        }
        // A prefix that is already longer than any allowed length is rejected early.
        if value > limit as u64 {
            return Err(FrameError::TooLarge { len: value, limit });
        }
    }
    if buf.len() >= 10 {
        return Err(FrameError::BadLength);
    }
    Ok(None)
}

/// Decodes one frame from the start of `buf`, copying its payload.
///
/// Returns `Ok(None)` when `buf` holds only part of a frame, else the frame and the
/// number of bytes consumed.
pub fn decode_frame(buf: &[u8], limit: usize) -> Result<Option<(RawFrame, usize)>, FrameError> {
    let Some((prefix, len)) = parse_header(buf, limit)? else {
        return Ok(None);
    };
    let Some(body) = buf.get(prefix..prefix + len) else {
        return Ok(None);
    };
    let (kind, payload) = body.split_first().ok_or(FrameError::Empty)?;
    Ok(Some((
        RawFrame {
            kind: *kind,
            payload: Bytes::copy_from_slice(payload),
        },
        prefix + len,
    )))
}

/// Appends the encoding of a frame with the given kind and payload to `out`.
pub fn encode_raw(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    let len = 1 + payload.len();
    out.reserve(varint_len(len as u64) + len);
    prost::encoding::encode_varint(len as u64, out);
    out.push(kind);
    out.extend_from_slice(payload);
}

/// Appends the encoding of `frame` to `out`.
pub fn encode_frame(frame: &RawFrame, out: &mut Vec<u8>) {
    encode_raw(frame.kind, &frame.payload, out);
}

/// Incremental splitter for a byte stream into frames, for clients and tests.
///
/// (The server's connection loop keeps no buffer while idle and splits frames out of a
/// shared scratch buffer instead; see tether-transport.)
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    limit: usize,
}

impl FrameDecoder {
    /// A decoder enforcing `limit` on every frame.
    pub fn new(limit: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            limit,
        }
    }

    /// Changes the limit (e.g. from the pre-auth to the negotiated one after WELCOME).
    pub fn set_limit(&mut self, limit: usize) {
        self.limit = limit;
    }

    /// Appends received bytes.
    pub fn extend(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes held that do not yet form a whole frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next whole frame, if one is buffered.
    pub fn next_frame(&mut self) -> Result<Option<RawFrame>, FrameError> {
        let Some((prefix, len)) = parse_header(&self.buf, self.limit)? else {
            return Ok(None);
        };
        if self.buf.len() < prefix + len {
            return Ok(None);
        }
        self.buf.advance(prefix);
        let mut body = self.buf.split_to(len).freeze();
        let kind = body.get_u8();
        Ok(Some(RawFrame {
            kind,
            payload: body,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ping_is_two_bytes_on_the_wire() {
        let mut out = Vec::new();
        encode_raw(crate::kind::PING, &[], &mut out);
        assert_eq!(out, vec![0x01, crate::kind::PING]);
    }

    #[test]
    fn length_over_limit_is_rejected_before_the_body_arrives() {
        let mut out = Vec::new();
        prost::encoding::encode_varint(5000, &mut out);
        assert_eq!(
            parse_header(&out, 4096),
            Err(FrameError::TooLarge {
                len: 5000,
                limit: 4096
            })
        );
    }

    #[test]
    fn huge_varint_prefix_is_rejected_without_waiting_for_the_end() {
        // 0xFF 0xFF 0xFF ... claims a gigantic length: rejected after a few bytes.
        assert!(matches!(
            parse_header(&[0xFF, 0xFF, 0xFF], 65536),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn eleven_byte_varint_is_malformed() {
        let buf = [0x80u8; 11];
        assert!(parse_header(&buf, usize::MAX).is_err());
    }

    #[test]
    fn zero_length_frame_is_an_error() {
        assert_eq!(parse_header(&[0x00], 4096), Err(FrameError::Empty));
    }

    #[test]
    fn decoder_splits_stuck_and_split_frames() {
        let mut wire = Vec::new();
        encode_raw(3, &[], &mut wire);
        encode_raw(5, b"hello", &mut wire);
        encode_raw(4, &[1, 2, 3], &mut wire);
        let mut dec = FrameDecoder::new(4096);
        let mut got = Vec::new();
        for chunk in wire.chunks(3) {
            dec.extend(chunk);
            while let Some(f) = dec.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got.len(), 3);
        assert_eq!(got[1].kind, 5);
        assert_eq!(&got[1].payload[..], b"hello");
        assert_eq!(dec.buffered(), 0);
    }

    #[test]
    fn every_truncation_is_incomplete_never_an_error_or_panic() {
        let mut wire = Vec::new();
        encode_raw(5, &[7u8; 300], &mut wire);
        for cut in 0..wire.len() {
            assert_eq!(decode_frame(&wire[..cut], 4096), Ok(None), "cut at {cut}");
        }
        assert!(decode_frame(&wire, 4096).unwrap().is_some());
    }
}
