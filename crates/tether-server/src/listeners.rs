//! Accepting sessions on every transport besides plain TCP: TLS over TCP, QUIC, and
//! WebSocket on the HTTP port (`/ws`, plain or over TLS). Each ends in the same
//! connection task ([`connection::serve`]). The TLS and QUIC handshakes run in the
//! session's own task, in its boxed login phase ([`connection::serve_after`]), bounded
//! by the login deadline, so a slow or hostile peer holds up no one else and an idle
//! session keeps nothing of its handshake; the WebSocket upgrade runs in axum's.

use crate::Shared;
use crate::connection;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{Sink, Stream};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tether_proto::PRE_AUTH_MAX_FRAME;
use tether_transport::TransportKind;
use tether_transport::quic;
use tether_transport::tcp::StreamTransport;
use tether_transport::tls::{LeanTlsStream, TlsAcceptor, TlsServerTransport};
use tether_transport::ws::{self, Encoding, WsFailure, WsMessage, WsSocket, WsTransport};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

/// Accepts TLS connections and serves each as a Tether session.
pub(crate) async fn tls_accept_loop(
    listener: TcpListener,
    config: Arc<rustls::ServerConfig>,
    shared: Arc<Shared>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let _ = stream.set_nodelay(true);
                crate::tune_accepted(&stream, shared.config.tcp_user_timeout);
                let config = config.clone();
                crate::cores::hand_over(&shared.threads, stream, |stream| {
                    serve_tls(shared.clone(), config, stream, peer)
                });
            }
            Err(e) => {
                warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// Completes the TLS handshake of an accepted connection, then serves it as a session.
///
/// This is the connection's task for its whole life, so what it holds through the idle
/// phase counts per session: the handshake runs in the login phase's box (its state is
/// freed when it ends) and the TLS stream is boxed (see [`TlsServerTransport`]), so the
/// task is the size of a plain TCP one (test `connection_future_stays_small`).
pub fn serve_tls(
    shared: Arc<Shared>,
    config: Arc<rustls::ServerConfig>,
    stream: std::net::TcpStream,
    peer: SocketAddr,
) -> impl Future<Output = ()> + Send {
    let deadline = shared.config.login_deadline;
    let handshake_shared = shared.clone();
    connection::serve_after(shared, async move {
        let stream = crate::cores::register(stream)?;
        let handshake = LeanTlsStream::accept(stream, config);
        let outcome = tokio::time::timeout(deadline, handshake).await;
        let tls = handshake_outcome(&handshake_shared, peer, outcome)?;
        let t: TlsServerTransport = StreamTransport::server(Box::new(tls), PRE_AUTH_MAX_FRAME);
        Some(t)
    })
}

/// Completes a TLS handshake within the login deadline; failures are logged and counted.
async fn handshake(
    shared: &Shared,
    acceptor: &TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let handshake = acceptor.accept(stream);
    handshake_outcome(
        shared,
        peer,
        tokio::time::timeout(shared.config.login_deadline, handshake).await,
    )
}

/// Logs and counts a failed or late handshake.
fn handshake_outcome<S>(
    shared: &Shared,
    peer: SocketAddr,
    outcome: Result<io::Result<S>, tokio::time::error::Elapsed>,
) -> Option<S> {
    match outcome {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            shared.metrics.tls_handshake_failures.inc();
            warn!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            shared.metrics.tls_handshake_failures.inc();
            warn!(%peer, "TLS handshake did not finish within the login deadline");
            None
        }
    }
}

/// Accepts QUIC connections; each connection's first bidirectional stream is a session.
pub(crate) async fn quic_accept_loop(endpoint: quic::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let shared = shared.clone();
        let deadline = shared.config.login_deadline;
        let handshake_shared = shared.clone();
        tokio::spawn(connection::serve_after(shared, async move {
            let peer = incoming.remote_address();
            match tokio::time::timeout(deadline, quic::accept(incoming, PRE_AUTH_MAX_FRAME)).await {
                Ok(Ok(t)) => Some(t),
                Ok(Err(e)) => {
                    handshake_shared.metrics.tls_handshake_failures.inc();
                    warn!(%peer, error = %e, "QUIC handshake failed");
                    None
                }
                Err(_) => {
                    handshake_shared.metrics.tls_handshake_failures.inc();
                    warn!(%peer, "QUIC handshake did not finish within the login deadline");
                    None
                }
            }
        }));
    }
}

/// What the `/ws` handler needs.
#[derive(Clone)]
pub(crate) struct WsState {
    pub shared: Arc<Shared>,
    /// `Ws` on the plain HTTP port, `Wss` on the HTTPS one.
    pub kind: TransportKind,
}

/// `GET /ws`: upgrades to a WebSocket session speaking the sub-protocol the client
/// asked for; an unknown or missing sub-protocol is refused with 400 and the reason.
pub(crate) async fn ws_handler(
    State(state): State<WsState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let upgrade = upgrade.protocols([ws::PROTO, ws::JSON]);
    let chosen = upgrade
        .selected_protocol()
        .and_then(|v| v.to_str().ok())
        .and_then(Encoding::from_subprotocol);
    let Some(encoding) = chosen else {
        let offered = headers
            .get(header::SEC_WEBSOCKET_PROTOCOL)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none");
        state.shared.metrics.ws_upgrades_refused.inc();
        debug!(%peer, offered, "WebSocket upgrade refused: unknown sub-protocol");
        return (
            StatusCode::BAD_REQUEST,
            format!(
                "unsupported WebSocket sub-protocol ({offered}): this server speaks {} (binary protobuf) and {} (JSON text)\n",
                ws::PROTO,
                ws::JSON
            ),
        )
            .into_response();
    };
    let limit = ws::message_limit(state.shared.config.max_frame);
    upgrade
        .read_buffer_size(4096)
        .write_buffer_size(0)
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            let t = WsTransport::new(
                AxumSocket(socket),
                encoding,
                state.kind,
                peer.to_string(),
                PRE_AUTH_MAX_FRAME,
            );
            connection::serve(state.shared, t)
        })
}

/// axum's WebSocket as a [`WsSocket`].
struct AxumSocket(WebSocket);

fn io_err(e: axum::Error) -> io::Error {
    io::Error::other(e.to_string())
}

impl WsSocket for AxumSocket {
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<WsMessage, WsFailure>>> {
        use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
        Pin::new(&mut self.0).poll_next(cx).map(|m| {
            m.map(|m| match m {
                Ok(Message::Binary(b)) => Ok(WsMessage::Binary(b)),
                Ok(Message::Text(t)) => Ok(WsMessage::Text(t.as_str().to_owned())),
                Ok(Message::Close(c)) => Ok(WsMessage::Close(
                    c.map(|c| (c.code, c.reason.as_str().to_owned())),
                )),
                Ok(Message::Ping(_) | Message::Pong(_)) => Ok(WsMessage::Control),
                Err(e) => {
                    let inner = e.into_inner();
                    match inner.downcast_ref::<Error>() {
                        Some(Error::Capacity(CapacityError::MessageTooLong { size, max_size })) => {
                            Err(WsFailure::TooBig {
                                size: *size,
                                limit: *max_size,
                            })
                        }
                        _ => Err(WsFailure::Other(inner.to_string())),
                    }
                }
            })
        })
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_ready(cx).map_err(io_err)
    }

    fn start_send(&mut self, message: WsMessage) -> io::Result<()> {
        let m = match message {
            WsMessage::Binary(b) => Message::Binary(b),
            WsMessage::Text(t) => Message::Text(t.into()),
            WsMessage::Close(c) => {
                Message::Close(c.map(|(code, reason)| axum::extract::ws::CloseFrame {
                    code,
                    reason: reason.into(),
                }))
            }
            WsMessage::Control => return Ok(()),
        };
        Pin::new(&mut self.0).start_send(m).map_err(io_err)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx).map_err(io_err)
    }
}

/// A TCP listener whose connections come out already through the TLS handshake, for
/// serving HTTP (and `wss://`) over TLS with axum. Handshakes run concurrently.
pub(crate) struct TlsListener {
    incoming: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub(crate) fn start(
        listener: TcpListener,
        acceptor: TlsAcceptor,
        shared: Arc<Shared>,
    ) -> io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, incoming) = tokio::sync::mpsc::channel(256);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(x) => x,
                    Err(e) => {
                        warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(20)).await;
                        continue;
                    }
                };
                let (out, acceptor, shared) = (tx.clone(), acceptor.clone(), shared.clone());
                tokio::spawn(async move {
                    if let Some(tls) = handshake(&shared, &acceptor, stream, peer).await {
                        let _ = out.send((tls, peer)).await;
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        Ok(Self { incoming, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.incoming.recv().await {
            Some(x) => x,
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}
