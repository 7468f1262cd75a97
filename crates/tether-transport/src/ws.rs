//! WebSocket: one frame per message (DESIGN §3).
//!
//! - Sub-protocol [`PROTO`] (`tether.v1.proto`): binary messages of `kind + payload`,
//!   the stream encoding without its length prefix (the message has a length).
//! - Sub-protocol [`JSON`] (`tether.v1.json`): text messages holding the proto3 JSON
//!   mapping of the same `Envelope` (e.g. `{"ping":{}}`).
//!
//! The frame limit in force is applied to every message (for JSON, to the frame it
//! decodes to); the WebSocket library's own message limit bounds what is read at all.
//! A message of the wrong type for the sub-protocol is a protocol error. On a failure
//! the transport closes with the WebSocket close code that names it (1003, 1007, 1009).
//!
//! The WebSocket library sits behind [`WsSocket`], so the server (axum) and the client
//! (tokio-tungstenite) share this framing.

use crate::{Transport, TransportError, TransportKind};
use bytes::Bytes;
use std::collections::VecDeque;
use std::io;
use std::task::{Context, Poll, ready};
use tether_proto::{Frame, FrameError, RawFrame, frame};

/// The binary sub-protocol.
pub const PROTO: &str = "tether.v1.proto";
/// The JSON text sub-protocol.
pub const JSON: &str = "tether.v1.json";
/// The path WebSocket sessions are served on.
pub const PATH: &str = "/ws";

/// Close code: the message type does not fit the sub-protocol.
pub const CLOSE_UNSUPPORTED: u16 = 1003;
/// Close code: the message did not decode.
pub const CLOSE_INVALID: u16 = 1007;
/// Close code: the message was too big.
pub const CLOSE_TOO_BIG: u16 = 1009;

/// How frames are encoded in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Binary messages, `tether.v1.proto`.
    Proto,
    /// Text messages, `tether.v1.json`.
    Json,
}

impl Encoding {
    /// The sub-protocol name.
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Proto => PROTO,
            Encoding::Json => JSON,
        }
    }

    /// The encoding a sub-protocol name selects.
    pub fn from_subprotocol(name: &str) -> Option<Self> {
        match name {
            PROTO => Some(Encoding::Proto),
            JSON => Some(Encoding::Json),
            _ => None,
        }
    }
}

/// A WebSocket message, as far as this transport cares.
#[derive(Debug)]
pub enum WsMessage {
    /// A binary message.
    Binary(Bytes),
    /// A text message.
    Text(String),
    /// A close, with its code and reason if any.
    Close(Option<(u16, String)>),
    /// A WebSocket-level ping or pong (answered by the library).
    Control,
}

/// Why the WebSocket library failed.
#[derive(Debug)]
pub enum WsFailure {
    /// The peer sent a message above the library's limit.
    TooBig {
        /// Its size, if known.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// Anything else (I/O, protocol).
    Other(String),
}

/// The WebSocket library underneath: a stream and a sink of messages.
pub trait WsSocket: Send + Unpin + 'static {
    /// The next message; `None` at the end.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<WsMessage, WsFailure>>>;
    /// Ready to take a message.
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
    /// Takes a message.
    fn start_send(&mut self, message: WsMessage) -> io::Result<()>;
    /// Writes what was taken.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// Whole frames over a WebSocket.
pub struct WsTransport<W> {
    socket: W,
    encoding: Encoding,
    kind: TransportKind,
    peer: String,
    max_frame: usize,
    /// Messages not yet taken by the socket; empty when idle.
    out: VecDeque<WsMessage>,
    out_bytes: usize,
    /// Messages handed to the socket that it has not flushed yet.
    unflushed: bool,
    /// The close code and reason to send on shutdown, after a receive failure.
    close: Option<(u16, String)>,
}

impl<W> std::fmt::Debug for WsTransport<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WsTransport")
            .field("encoding", &self.encoding)
            .field("peer", &self.peer)
            .finish_non_exhaustive()
    }
}

impl<W: WsSocket> WsTransport<W> {
    /// Frames over `socket`, encoded as `encoding`, accepting frames up to `max_frame`.
    pub fn new(
        socket: W,
        encoding: Encoding,
        kind: TransportKind,
        peer: String,
        max_frame: usize,
    ) -> Self {
        Self {
            socket,
            encoding,
            kind,
            peer,
            max_frame,
            out: VecDeque::new(),
            out_bytes: 0,
            unflushed: false,
            close: None,
        }
    }

    /// The encoding in use.
    pub fn encoding(&self) -> Encoding {
        self.encoding
    }

    fn fail(&mut self, code: u16, e: TransportError) -> TransportError {
        let mut reason = e.to_string();
        // A close reason must fit a control frame (123 bytes).
        reason.truncate(reason.floor_char_boundary(120));
        self.close = Some((code, reason));
        e
    }

    fn frame_of(&mut self, message: WsMessage) -> Result<Option<RawFrame>, TransportError> {
        let too_big = |len: usize, limit: usize| {
            TransportError::Frame(FrameError::TooLarge {
                len: len as u64,
                limit,
            })
        };
        match (message, self.encoding) {
            (WsMessage::Binary(b), Encoding::Proto) => {
                if b.len() > self.max_frame {
                    return Err(self.fail(CLOSE_TOO_BIG, too_big(b.len(), self.max_frame)));
                }
                if b.is_empty() {
                    return Err(self.fail(CLOSE_INVALID, FrameError::Empty.into()));
                }
                Ok(Some(RawFrame {
                    kind: b[0],
                    payload: b.slice(1..),
                }))
            }
            (WsMessage::Text(t), Encoding::Json) => {
                let decoded = match frame::from_json(&t) {
                    Ok(f) => f,
                    Err(e) => return Err(self.fail(CLOSE_INVALID, e.into())),
                };
                let raw = frame::to_raw(&decoded);
                let len = 1 + raw.payload.len();
                if len > self.max_frame {
                    return Err(self.fail(CLOSE_TOO_BIG, too_big(len, self.max_frame)));
                }
                Ok(Some(raw))
            }
            (WsMessage::Text(_), Encoding::Proto) => Err(self.fail(
                CLOSE_UNSUPPORTED,
                TransportError::WrongMessageType(format!(
                    "a text message on the binary sub-protocol {PROTO}"
                )),
            )),
            (WsMessage::Binary(_), Encoding::Json) => Err(self.fail(
                CLOSE_UNSUPPORTED,
                TransportError::WrongMessageType(format!(
                    "a binary message on the text sub-protocol {JSON}"
                )),
            )),
            (WsMessage::Close(_), _) => Ok(None),
            (WsMessage::Control, _) => Err(TransportError::Closed), // not returned, see poll_recv
        }
    }
}

impl<W: WsSocket> Transport for WsTransport<W> {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<RawFrame>, TransportError>> {
        loop {
            let message = match ready!(self.socket.poll_next(cx)) {
                None => return Poll::Ready(Ok(None)),
                Some(Ok(WsMessage::Control)) => continue,
                Some(Ok(m)) => m,
                Some(Err(WsFailure::TooBig { size, limit })) => {
                    let e = TransportError::Frame(FrameError::TooLarge {
                        len: size as u64,
                        limit,
                    });
                    return Poll::Ready(Err(self.fail(CLOSE_TOO_BIG, e)));
                }
                Some(Err(WsFailure::Other(e))) => {
                    return Poll::Ready(Err(TransportError::Io(io::Error::other(e))));
                }
            };
            return Poll::Ready(self.frame_of(message));
        }
    }

    fn set_max_frame(&mut self, limit: usize) {
        self.max_frame = limit;
    }

    fn send(&mut self, f: &Frame) -> Result<(), TransportError> {
        let message = match self.encoding {
            Encoding::Proto => {
                let raw = frame::to_raw(f);
                let mut b = Vec::with_capacity(1 + raw.payload.len());
                b.push(raw.kind);
                b.extend_from_slice(&raw.payload);
                self.out_bytes += b.len();
                WsMessage::Binary(b.into())
            }
            Encoding::Json => {
                let t = frame::to_json(f);
                self.out_bytes += t.len();
                WsMessage::Text(t)
            }
        };
        self.out.push_back(message);
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        while !self.out.is_empty() {
            ready!(self.socket.poll_ready(cx))?;
            let message = self.out.pop_front().expect("checked non-empty");
            self.out_bytes -= match &message {
                WsMessage::Binary(b) => b.len(),
                WsMessage::Text(t) => t.len(),
                _ => 0,
            };
            self.socket.start_send(message)?;
            self.unflushed = true;
        }
        if self.out.capacity() > 0 {
            self.out = VecDeque::new();
        }
        if self.unflushed {
            ready!(self.socket.poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    fn queued_bytes(&self) -> usize {
        self.out_bytes
    }

    fn flush_pending(&self) -> bool {
        self.out_bytes > 0 || self.unflushed
    }

    fn shutdown(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let close = self.close.take().unwrap_or((1000, String::new()));
        if self.socket.poll_ready(&mut cx).is_ready()
            && self
                .socket
                .start_send(WsMessage::Close(Some(close)))
                .is_ok()
        {
            // What the socket could not write now is flushed by a later `poll_flush`.
            self.unflushed = self.socket.poll_flush(&mut cx).is_pending();
        }
    }

    fn kind(&self) -> TransportKind {
        self.kind
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }
}

/// tokio-tungstenite's WebSocket stream as a [`WsSocket`] (the client side).
pub mod tungstenite {
    use super::{WsFailure, WsMessage, WsSocket};
    use futures_util::{Sink, Stream};
    use std::io;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::io::{AsyncRead, AsyncWrite};
    use tokio_tungstenite::WebSocketStream;
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
    use tokio_tungstenite::tungstenite::protocol::CloseFrame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
    use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

    /// A tokio-tungstenite stream.
    pub struct Tungstenite<S>(pub WebSocketStream<S>);

    fn io_err(e: Error) -> io::Error {
        match e {
            Error::Io(e) => e,
            other => io::Error::other(other.to_string()),
        }
    }

    impl<S: AsyncRead + AsyncWrite + Unpin + Send + 'static> WsSocket for Tungstenite<S> {
        fn poll_next(
            &mut self,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<WsMessage, WsFailure>>> {
            Pin::new(&mut self.0).poll_next(cx).map(|m| {
                m.map(|m| match m {
                    Ok(Message::Binary(b)) => Ok(WsMessage::Binary(b)),
                    Ok(Message::Text(t)) => Ok(WsMessage::Text(t.as_str().to_owned())),
                    Ok(Message::Close(c)) => {
                        Ok(WsMessage::Close(c.map(|c| {
                            (u16::from(c.code), c.reason.as_str().to_owned())
                        })))
                    }
                    Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {
                        Ok(WsMessage::Control)
                    }
                    Err(Error::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                        Err(WsFailure::TooBig {
                            size,
                            limit: max_size,
                        })
                    }
                    Err(e) => Err(WsFailure::Other(e.to_string())),
                })
            })
        }

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_ready(cx).map_err(io_err)
        }

        fn start_send(&mut self, message: WsMessage) -> io::Result<()> {
            let m = match message {
                WsMessage::Binary(b) => Message::Binary(b),
                WsMessage::Text(t) => Message::Text(Utf8Bytes::from(t)),
                WsMessage::Close(c) => Message::Close(c.map(|(code, reason)| CloseFrame {
                    code: CloseCode::from(code),
                    reason: Utf8Bytes::from(reason),
                })),
                WsMessage::Control => return Ok(()),
            };
            Pin::new(&mut self.0).start_send(m).map_err(io_err)
        }

        fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Pin::new(&mut self.0).poll_flush(cx).map_err(io_err)
        }
    }
}

/// Largest WebSocket message the library reads at all, for a frame limit of
/// `max_frame` (JSON text is larger than the frame it carries).
pub fn message_limit(max_frame: usize) -> usize {
    max_frame * 2 + 1024
}

/// Opens a WebSocket session over `stream` (plain TCP or TLS) to `url`
/// (`ws://host:port/ws`), asking for `encoding`'s sub-protocol and failing unless the
/// server chose it.
pub async fn connect<S>(
    stream: S,
    url: &str,
    encoding: Encoding,
    kind: TransportKind,
    max_frame: usize,
) -> io::Result<WsTransport<tungstenite::Tungstenite<S>>>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::http::HeaderValue;
    let mut request = url
        .into_client_request()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{url}: {e}")))?;
    request.headers_mut().insert(
        "Sec-WebSocket-Protocol",
        HeaderValue::from_static(encoding.subprotocol()),
    );
    let limit = message_limit(max_frame.max(tether_proto::DEFAULT_MAX_FRAME));
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(Some(limit))
        .max_frame_size(Some(limit));
    let (socket, response) =
        tokio_tungstenite::client_async_with_config(request, stream, Some(config))
            .await
            .map_err(|e| match e {
                tokio_tungstenite::tungstenite::Error::Io(e) => e,
                tokio_tungstenite::tungstenite::Error::Http(r) => {
                    let body = r
                        .body()
                        .as_ref()
                        .map(|b| String::from_utf8_lossy(b).into_owned())
                        .unwrap_or_default();
                    io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!(
                            "WebSocket upgrade refused: HTTP {}: {}",
                            r.status(),
                            body.trim()
                        ),
                    )
                }
                other => io::Error::other(format!("WebSocket: {other}")),
            })?;
    let chosen = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok());
    if chosen != Some(encoding.subprotocol()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the server chose sub-protocol {chosen:?}, not {}",
                encoding.subprotocol()
            ),
        ));
    }
    Ok(WsTransport::new(
        tungstenite::Tungstenite(socket),
        encoding,
        kind,
        url.to_string(),
        max_frame,
    ))
}
