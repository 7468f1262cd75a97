//! Transports move whole frames; what is above them never knows which one it is.
//!
//! - [`tcp::TcpTransport`]: a byte stream, so it owns the preamble and the length
//!   prefix. It keeps **no buffer while idle**: bytes are read into a per-thread
//!   scratch buffer and only the tail of a partial frame (or frames not yet taken) is
//!   kept; the send buffer exists only while bytes wait for the socket.
//! - [`memory`]: an in-memory pipe of [`RawFrame`]s with a bounded capacity, so one
//!   process can hold far more sessions than it has file descriptors, and the cost of
//!   a session can be measured without the kernel's socket memory.
//!
//! - [`tls`]: the same framing over TLS (rustls); certificates, server and client
//!   configurations, and a self-signed development certificate.
//! - [`ws`]: one frame per WebSocket message, binary (`tether.v1.proto`) or the proto3
//!   JSON mapping as text (`tether.v1.json`).
//! - [`quic`]: the same framing over one bidirectional QUIC stream (quinn, ALPN
//!   `tether/1`), with connection migration.
//!
//! This crate knows frames, not the protocol: it never interprets kinds.

pub mod memory;
pub mod quic;
mod records;
pub mod tcp;
pub mod tls;
pub mod ws;

use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll};
use tether_proto::{DecodeError, Frame, FrameError, RawFrame};
use thiserror::Error;

/// Why a transport failed. All are fatal to the connection.
#[derive(Debug, Error)]
pub enum TransportError {
    /// The socket failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The byte stream does not split into valid frames.
    #[error("{0}")]
    Frame(#[from] FrameError),
    /// The first 4 bytes were not the Tether preamble.
    #[error("no Tether preamble (expected \"TTH\\x01\")")]
    BadPreamble,
    /// The peer closed the stream in the middle of a frame.
    #[error("stream ended inside a frame ({0} bytes of it received)")]
    Truncated(usize),
    /// Sending on a transport whose peer is gone.
    #[error("transport closed")]
    Closed,
    /// A message-based transport carried something that is not a frame (a JSON text
    /// that does not decode).
    #[error("{0}")]
    Decode(#[from] DecodeError),
    /// A message of the wrong type for the negotiated encoding (text on the binary
    /// WebSocket sub-protocol, or binary on the JSON one).
    #[error("{0}")]
    WrongMessageType(String),
}

/// Which transport a connection uses, for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportKind {
    /// Plain TCP.
    Tcp,
    /// TLS over TCP.
    Tls,
    /// WebSocket over plain HTTP.
    Ws,
    /// WebSocket over HTTPS.
    Wss,
    /// One bidirectional QUIC stream.
    Quic,
    /// In-process pipe.
    Memory,
}

impl TransportKind {
    /// Every kind, in declaration order (`kind as usize` indexes it).
    pub const ALL: [TransportKind; 6] = [
        TransportKind::Tcp,
        TransportKind::Tls,
        TransportKind::Ws,
        TransportKind::Wss,
        TransportKind::Quic,
        TransportKind::Memory,
    ];

    /// Short lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::Tcp => "tcp",
            TransportKind::Tls => "tls",
            TransportKind::Ws => "ws",
            TransportKind::Wss => "wss",
            TransportKind::Quic => "quic",
            TransportKind::Memory => "memory",
        }
    }
}

/// A bidirectional channel of whole frames.
///
/// Receiving is poll-based so the connection loop can wait on it together with its
/// session's signals without allocating a future per wait. Sending queues a frame;
/// [`Transport::poll_flush`] pushes queued frames out and is how backpressure is felt.
pub trait Transport: Send + Unpin + 'static {
    /// The next whole frame; `Ok(None)` on an orderly end of stream.
    fn poll_recv(&mut self, cx: &mut Context<'_>)
    -> Poll<Result<Option<RawFrame>, TransportError>>;

    /// Sets the largest frame (kind + payload) accepted from the peer from now on.
    fn set_max_frame(&mut self, limit: usize);

    /// Queues a frame to send. Call [`Transport::poll_flush`] to push it out.
    fn send(&mut self, frame: &Frame) -> Result<(), TransportError>;

    /// Writes queued frames; `Ready(Ok(()))` once nothing is queued.
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>>;

    /// Bytes queued locally and not yet accepted by the peer or the kernel.
    fn queued_bytes(&self) -> usize;

    /// True while flushing is not done: bytes are queued here, or a layer below took
    /// them without writing them to the socket yet (TLS records waiting for room, a
    /// WebSocket's write buffer). Callers keep calling [`Transport::poll_flush`] while
    /// this holds; one that flushed only while [`Transport::queued_bytes`] was non-zero
    /// left such a tail waiting for the next frame sent, up to a heartbeat later.
    fn flush_pending(&self) -> bool {
        self.queued_bytes() > 0
    }

    /// Shuts the write side down after queued frames (best effort).
    fn shutdown(&mut self);

    /// Which transport this is.
    fn kind(&self) -> TransportKind;

    /// The peer's address, for logs.
    fn peer(&self) -> String;

    /// The kernel's view of the connection (TCP_INFO), where there is one; used to
    /// diagnose a failed heartbeat.
    fn tcp_snapshot(&self) -> Option<tether_core::diagnosis::TcpSnapshot> {
        None
    }

    /// Moves the local end to a fresh socket while keeping the session, where the
    /// transport can (QUIC connection migration); returns the new local address.
    /// `None` when the transport cannot migrate.
    fn rebind(&mut self) -> Option<io::Result<SocketAddr>> {
        None
    }
}

/// Flushes then returns, for code outside a poll loop.
pub async fn flush<T: Transport + ?Sized>(t: &mut T) -> Result<(), TransportError> {
    std::future::poll_fn(|cx| t.poll_flush(cx)).await
}

/// Receives one frame, for code outside a poll loop.
pub async fn recv<T: Transport + ?Sized>(t: &mut T) -> Result<Option<RawFrame>, TransportError> {
    std::future::poll_fn(|cx| t.poll_recv(cx)).await
}

/// Boxed transports are transports.
impl<T: Transport + ?Sized> Transport for Box<T> {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<RawFrame>, TransportError>> {
        (**self).poll_recv(cx)
    }
    fn set_max_frame(&mut self, limit: usize) {
        (**self).set_max_frame(limit)
    }
    fn send(&mut self, frame: &Frame) -> Result<(), TransportError> {
        (**self).send(frame)
    }
    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        (**self).poll_flush(cx)
    }
    fn queued_bytes(&self) -> usize {
        (**self).queued_bytes()
    }
    fn flush_pending(&self) -> bool {
        (**self).flush_pending()
    }
    fn shutdown(&mut self) {
        (**self).shutdown()
    }
    fn kind(&self) -> TransportKind {
        (**self).kind()
    }
    fn peer(&self) -> String {
        (**self).peer()
    }
    fn tcp_snapshot(&self) -> Option<tether_core::diagnosis::TcpSnapshot> {
        (**self).tcp_snapshot()
    }
    fn rebind(&mut self) -> Option<io::Result<SocketAddr>> {
        (**self).rebind()
    }
}
