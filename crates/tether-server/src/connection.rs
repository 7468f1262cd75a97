//! One connection, from preamble to close: [`serve`] is the whole per-connection loop.
//!
//! Shape (DESIGN §6, §10): a login phase bounded by the login deadline, then one loop
//! that waits on three things at once without allocating per wait: a frame from the
//! transport, signals from the rest of the server (new head, commit replies, kick),
//! and room in the transport's send buffer. Delivery is by position: the connection
//! holds `next` and streams `next..=head` from the store within a credit window of
//! un-ACKed DELIVERs. Nothing is queued per connection, so a slow consumer simply
//! falls behind.

use crate::Shared;
use crate::commit::CommitRequest;
use crate::config::StartPolicy;
use crate::registry::{
    Registered, SIG_DEADLINE, SIG_GOAWAY, SIG_HEAD, SIG_KICKED, SIG_REPLACED, SIG_REPLIES,
    SIG_REVOKED, SIG_SHUTDOWN, Session,
};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tether_core::window::{DeliveryWindow, Grant, WindowLimits};
use tether_proto::frame::{self, DecodeError};
use tether_proto::pb::{self, ErrorCode};
use tether_proto::{Frame, FrameError, RawFrame};
use tether_store::{
    Action, AppendRequest, DeviceCursor, EntryKind, GroupChange, GroupOp, InboxInfo, InboxTarget,
    ReadMark, StoreError, StoredEntry,
};
use tether_transport::{Transport, TransportError};
use tracing::{debug, info, warn};

/// Stop reading and streaming while this many bytes wait for the socket.
const OUT_HIGH_WATER: usize = 64 * 1024;
/// Stop reading SENDs while this many body bytes of one connection wait for commit.
const MAX_INFLIGHT_BYTES: u32 = 1024 * 1024;
/// Entries read from the store per step of streaming.
const READ_BATCH: u64 = 64;
/// Entries per SYNC_DONE at most.
const SYNC_BATCH: u32 = 64;

/// Most conversations one QUERY_RESULT lists (continue with `after`).
const QUERY_PAGE: usize = 200;
/// One PING in this many samples the connection's TCP RTT (`tether_tcp_rtt_seconds`).
const RTT_SAMPLE: u64 = 8;
/// Time allowed to flush a final ERROR or KICK before closing.
const CLOSE_FLUSH: Duration = Duration::from_secs(2);
/// Frames read, at most, for their ACKs once the server has decided to close.
const LAST_FRAMES: usize = 256;

/// Why a connection ended, for logs.
#[derive(Debug)]
pub(crate) enum Close {
    /// We sent a fatal ERROR.
    Fatal(ErrorCode, String),
    /// The peer closed or the transport failed.
    Transport(String),
    /// A newer login of the device took over.
    Replaced,
    /// Server shutdown.
    Shutdown,
    /// The peer sent a fatal ERROR.
    PeerError(String),
    /// The server drains: the client is told to come back later.
    GoingAway,
    /// Admission control refused the login for now.
    Overloaded {
        /// When to try again, at the earliest.
        retry_after: Duration,
    },
    /// An operator kicked the device (admin API); what the device is told.
    Kicked(String),
    /// An operator revoked the device's tokens (admin API); what the device is told.
    /// (Two variants rather than a reason field keep `Close`, which every connection
    /// future holds, at 32 bytes.)
    Revoked(String),
    /// Nothing arrived within the liveness deadline.
    Expired {
        /// How long the session was silent, ms.
        silent_ms: u64,
        /// What TCP_INFO says about the path (seen from the server, "server
        /// unresponsive" means the *client* application is stuck).
        diagnosis: tether_core::diagnosis::Diagnosis,
    },
}

impl std::fmt::Display for Close {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Close::Fatal(code, reason) => {
                write!(f, "sent fatal ERROR {}: {reason}", code.as_str_name())
            }
            Close::Transport(why) => write!(f, "transport: {why}"),
            Close::Replaced => f.write_str("replaced by a newer login of the device"),
            Close::Shutdown => f.write_str("server shutdown"),
            Close::PeerError(why) => write!(f, "peer sent fatal ERROR: {why}"),
            Close::Expired {
                silent_ms,
                diagnosis,
            } => {
                let why = match diagnosis {
                    tether_core::diagnosis::Diagnosis::ServerUnresponsive => {
                        "the client's kernel ACKs but its application is silent"
                    }
                    tether_core::diagnosis::Diagnosis::NetworkDead => {
                        "our bytes are unacknowledged and retransmitted: the path is dead"
                    }
                    tether_core::diagnosis::Diagnosis::Unknown => "no TCP_INFO verdict",
                };
                write!(
                    f,
                    "liveness deadline passed: nothing received for {silent_ms} ms ({why})"
                )
            }
            Close::Overloaded { retry_after } => {
                write!(
                    f,
                    "login refused by admission control; retry after {retry_after:?}"
                )
            }
            Close::GoingAway => f.write_str("server draining: sent GOAWAY"),
            Close::Kicked(detail) => write!(f, "kicked by an operator: {detail}"),
            Close::Revoked(detail) => write!(f, "tokens revoked by an operator: {detail}"),
        }
    }
}

impl Close {
    pub(crate) fn fatal(code: ErrorCode, reason: impl Into<String>) -> Self {
        Close::Fatal(code, reason.into())
    }

    /// A short, stable name for metrics (`tether_disconnects_total{reason}`).
    pub(crate) fn label(&self) -> &'static str {
        match self {
            Close::Fatal(ErrorCode::AuthFailed, _) => "auth_failed",
            Close::Fatal(ErrorCode::LoginTimeout, _) => "login_timeout",
            Close::Fatal(..) => "protocol_error",
            Close::Transport(_) => "transport_closed",
            Close::Replaced => "replaced",
            Close::Shutdown => "shutdown",
            Close::PeerError(_) => "peer_error",
            Close::GoingAway => "going_away",
            Close::Overloaded { .. } => "overloaded",
            Close::Revoked(_) => "token_revoked",
            Close::Kicked(_) => "kicked",
            Close::Expired { .. } => "deadline_expired",
        }
    }
}

impl From<StoreError> for Close {
    fn from(e: StoreError) -> Self {
        Close::fatal(ErrorCode::Internal, format!("store: {e}"))
    }
}

/// Maps a transport failure to what the peer is told (if it can still hear us).
pub(crate) fn transport_close(e: TransportError) -> Close {
    match e {
        TransportError::BadPreamble => Close::fatal(
            ErrorCode::BadPreamble,
            "expected the preamble \"TTH\\x01\" (Tether protocol version 1)",
        ),
        TransportError::Frame(FrameError::TooLarge { len, limit }) => Close::fatal(
            ErrorCode::FrameTooLarge,
            format!("frame of {len} bytes exceeds the limit of {limit} bytes"),
        ),
        TransportError::Frame(e) => Close::fatal(ErrorCode::MalformedFrame, e.to_string()),
        TransportError::Decode(e) => Close::fatal(ErrorCode::MalformedFrame, e.to_string()),
        TransportError::WrongMessageType(why) => Close::fatal(ErrorCode::MalformedFrame, why),
        // The peer may only have shut its write side: tell it, if it still listens.
        TransportError::Truncated(n) => Close::fatal(
            ErrorCode::MalformedFrame,
            format!("stream ended inside a frame ({n} bytes of it received)"),
        ),
        other => Close::Transport(other.to_string()),
    }
}

/// Maps a frame that did not decode to a fatal error; `None` means skip it.
pub(crate) fn decode_close(e: DecodeError) -> Option<Close> {
    match e {
        DecodeError::UnknownIgnorable(_) => None,
        DecodeError::UnknownCritical(k) => Some(Close::fatal(
            ErrorCode::UnknownKind,
            format!("unknown critical frame kind 0x{k:02x}"),
        )),
        DecodeError::MissingField { .. } => {
            Some(Close::fatal(ErrorCode::MissingField, e.to_string()))
        }
        DecodeError::BadPayload { .. } | DecodeError::BadJson(_) => {
            Some(Close::fatal(ErrorCode::MalformedFrame, e.to_string()))
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Serves one connection until it closes. Generic over the transport: TCP and the
/// in-memory pipe take exactly this path.
pub fn serve<T: Transport>(shared: Arc<Shared>, t: T) -> impl Future<Output = ()> + Send {
    serve_after(shared, std::future::ready(Some(t)))
}

/// Serves the connection `handshake` yields (`None`: it failed, and said so), in the
/// same task: the handshake runs in the login phase's box and is freed with it, so a
/// TLS or QUIC session's task is no larger than a TCP one's.
pub fn serve_after<T, H>(shared: Arc<Shared>, handshake: H) -> impl Future<Output = ()> + Send
where
    T: Transport,
    H: Future<Output = Option<T>> + Send + 'static,
{
    Serve::<T> {
        stage: Stage::Login(Box::pin(async move {
            let t = handshake.await?;
            shared.metrics.connections_accepted.inc();
            shared.metrics.connections_open.inc();
            let outcome = login(&shared, t).await;
            Some((shared, outcome))
        })),
    }
}

/// A connection's task: a state machine written out by hand, so that through the long
/// idle phase it holds the connection's state ([`Conn`]) and nothing else. The login
/// and closing phases, with their timers, are boxed and live only while they run.
///
/// As one `async fn` the task was 256 B over TCP: an `async fn` keeps room for its
/// arguments all its life, for the borrows of its `match`, and for the inner `run`
/// future beside the state it borrows. tokio allocates a task in 128-byte steps on
/// x86_64 (its cells are cache-line aligned), so that made every session's task
/// 384 B; this is 256 B (test `connection_future_stays_small`).
struct Serve<T: Transport> {
    stage: Stage<T>,
}

type Boxed<O> = Pin<Box<dyn Future<Output = O> + Send>>;

enum Stage<T: Transport> {
    Login(Boxed<Option<(Arc<Shared>, Login<T>)>>),
    Running(Conn<T>),
    Closing(Boxed<()>),
    Done,
}

impl<T: Transport> Future for Serve<T> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let stage = &mut self.get_mut().stage;
        loop {
            match stage {
                Stage::Login(login) => {
                    let Some((shared, outcome)) = ready!(login.as_mut().poll(cx)) else {
                        *stage = Stage::Done;
                        continue;
                    };
                    *stage = match outcome {
                        Login::Admitted(conn) => Stage::Running(conn),
                        Login::Probe(t, ticket) => {
                            Stage::Closing(Box::pin(probe(shared, t, ticket)))
                        }
                        Login::Refused(t, close) => {
                            shared.metrics.login_failures.inc();
                            info!(transport = t.kind().as_str(), peer = %t.peer(), reason = %close, "login refused");
                            Stage::Closing(Box::pin(closing(shared, t, close)))
                        }
                    };
                }
                Stage::Running(conn) => {
                    let close = ready!(conn.poll_run(cx));
                    let Stage::Running(conn) = std::mem::replace(stage, Stage::Done) else {
                        unreachable!("matched above")
                    };
                    *stage = Stage::Closing(Box::pin(conn.closed(close)));
                }
                Stage::Closing(closing) => {
                    ready!(closing.as_mut().poll(cx));
                    *stage = Stage::Done;
                }
                Stage::Done => return Poll::Ready(()),
            }
        }
    }
}

/// A probe session (DESIGN §5), then its close.
async fn probe<T: Transport>(shared: Arc<Shared>, mut t: T, ticket: crate::probe::ProbeTicket) {
    let close = crate::probe::run(&shared, &mut t, &ticket).await;
    debug!(transport = t.kind().as_str(), peer = %t.peer(), reason = %close, "probe session closed");
    closing(shared, t, close).await;
}

/// The last words on a connection, then it is no longer counted as open.
async fn closing<T: Transport>(shared: Arc<Shared>, mut t: T, close: Close) {
    finish(&shared, &mut t, close).await;
    shared.metrics.connections_open.dec();
}

/// How the login phase ended.
enum Login<T> {
    /// WELCOME was queued; the session is registered.
    Admitted(Conn<T>),
    /// Refused: the transport, and why.
    Refused(T, Close),
    /// A probe session (DESIGN §5): not registered, served by [`crate::probe::run`].
    Probe(T, crate::probe::ProbeTicket),
}

/// Reads HELLO within the login deadline, admits the session and queues WELCOME.
async fn login<T: Transport>(shared: &Arc<Shared>, mut t: T) -> Login<T> {
    let deadline = shared.config.login_deadline;
    let admitted = match tokio::time::timeout(deadline, read_hello(&mut t)).await {
        Ok(Ok(hello)) if hello.probe => {
            return match admit_probe(shared, hello) {
                Ok(ticket) => Login::Probe(t, ticket),
                Err(close) => Login::Refused(t, close),
            };
        }
        Ok(Ok(hello)) => admit(shared, hello),
        Ok(Err(close)) => Err(close),
        Err(_) => Err(Close::fatal(
            ErrorCode::LoginTimeout,
            format!("no HELLO within {} ms", deadline.as_millis()),
        )),
    };
    let admission = match admitted {
        Ok(a) => a,
        Err(close) => return Login::Refused(t, close),
    };
    shared.metrics.logins.inc();
    let mut conn = Conn::new(t, shared.clone(), &admission);
    match conn.welcome(&admission) {
        Ok(()) => Login::Admitted(conn),
        Err(close) => {
            shared.registry.unregister(&conn.session);
            Login::Refused(conn.t, close)
        }
    }
}

/// Sends the closing frame, if any, and shuts the transport down.
async fn finish<T: Transport>(shared: &Shared, t: &mut T, close: Close) {
    // Counted here, in the boxed closing phase: borrowing `close` in `serve` itself
    // made every connection's future 32 bytes larger.
    shared.metrics.disconnected(close.label());
    let last = match close {
        Close::Fatal(code, reason) => {
            shared.metrics.protocol_errors.inc();
            Some(frame::error(code, reason, true))
        }
        Close::Replaced => Some(Frame::Kick(pb::Kick {
            reason: pb::KickReason::Replaced as i32,
            detail: "a newer login of this device took over".into(),
        })),
        Close::Kicked(detail) => Some(Frame::Kick(pb::Kick {
            reason: pb::KickReason::Operator as i32,
            detail,
        })),
        Close::Revoked(detail) => Some(Frame::Kick(pb::Kick {
            reason: pb::KickReason::TokenRevoked as i32,
            detail,
        })),
        Close::GoingAway => Some(Frame::GoAway(pb::GoAway {
            min_delay_ms: 0,
            max_delay_ms: shared
                .config
                .drain_window
                .as_millis()
                .min(u128::from(u32::MAX)) as u32,
            alternate_address: shared.config.drain_to.clone().unwrap_or_default(),
        })),
        Close::Overloaded { retry_after } => {
            shared.metrics.logins_throttled.inc();
            let mut e = frame::error(
                ErrorCode::Overloaded,
                "too many logins right now; retry after retry_after_ms",
                true,
            );
            if let Frame::Error(ref mut inner) = e {
                inner.retry_after_ms =
                    retry_after.as_millis().clamp(1, u128::from(u32::MAX)) as u32;
            }
            Some(e)
        }
        Close::Expired { silent_ms, .. } => {
            shared.metrics.sessions_expired.inc();
            Some(frame::error(
                ErrorCode::IdleTimeout,
                format!("nothing received for {silent_ms} ms"),
                true,
            ))
        }
        Close::Transport(_) | Close::Shutdown | Close::PeerError(_) => None,
    };
    if let Some(last) = last {
        let _ = t.send(&last);
    }
    let _ = tokio::time::timeout(CLOSE_FLUSH, tether_transport::flush(t)).await;
    t.shutdown();
}

/// Waits for HELLO: the first frame that is not an unknown ignorable kind.
async fn read_hello<T: Transport>(t: &mut T) -> Result<pb::Hello, Close> {
    loop {
        let raw = match tether_transport::recv(t).await {
            Ok(Some(raw)) => raw,
            Ok(None) => return Err(Close::Transport("closed before HELLO".into())),
            Err(e) => return Err(transport_close(e)),
        };
        match frame::from_raw(&raw) {
            Ok(Frame::Hello(hello)) => return Ok(hello),
            Ok(other) => {
                return Err(Close::fatal(
                    ErrorCode::UnexpectedKind,
                    format!(
                        "{} before HELLO: the first frame must be HELLO",
                        tether_proto::kind::name(frame::kind_of(&other))
                    ),
                ));
            }
            Err(e) => {
                if let Some(close) = decode_close(e) {
                    return Err(close);
                }
            }
        }
    }
}

/// What a successful login decided.
struct Admission {
    session: Arc<Session>,
    info: InboxInfo,
    start: u64,
    resumed: Resumed,
    interval: Duration,
}

/// How the device's own resume point was honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resumed {
    /// As given (or the device brought none).
    AsGiven,
    /// It was from another inbox epoch: the device restarts by the start policy.
    EpochChanged,
    /// Entries after it were removed by retention: delivery resumes at the oldest kept.
    Compacted,
}

/// Checks what every login must pass (version, drain, admission, token); returns the
/// user id.
fn check_login(shared: &Arc<Shared>, hello: &pb::Hello) -> Result<String, Close> {
    if hello.version != tether_proto::PROTOCOL_VERSION {
        return Err(Close::fatal(
            ErrorCode::UnsupportedVersion,
            format!("protocol version {} is not supported (1 is)", hello.version),
        ));
    }
    if shared.draining.load(Ordering::Acquire) {
        return Err(Close::GoingAway);
    }
    // Admission control first: the cheapest refusal, before any crypto or store work.
    if let Err(retry_after) = shared.logins.lock().try_take(Instant::now()) {
        return Err(Close::Overloaded { retry_after });
    }
    let (user, issued_s) = shared
        .auth
        .verify_issued(&hello.token)
        .map_err(|e| Close::fatal(ErrorCode::AuthFailed, e.to_string()))?;
    if let Some(at) = shared
        .revocations
        .refuses(&user, &hello.device_id, issued_s)
    {
        return Err(Close::fatal(
            ErrorCode::AuthFailed,
            format!(
                "tokens of this device issued up to {at} (s since the epoch) were revoked; log in again for a new token"
            ),
        ));
    }
    if user.starts_with(tether_proto::GROUP_PREFIX) {
        return Err(Close::fatal(
            ErrorCode::AuthFailed,
            format!(
                "user ids starting with {:?} name groups",
                tether_proto::GROUP_PREFIX
            ),
        ));
    }
    Ok(user)
}

/// Admits a probe session: the login checks, then the device's probe slot.
fn admit_probe(shared: &Arc<Shared>, hello: pb::Hello) -> Result<crate::probe::ProbeTicket, Close> {
    let user = check_login(shared, &hello)?;
    let interval = shared.config.heartbeat.accept(hello.heartbeat_interval_ms);
    crate::probe::Probes::admit(shared, &user, &hello.device_id, interval)
}

/// Checks the HELLO, registers the session and decides where delivery starts.
fn admit(shared: &Arc<Shared>, hello: pb::Hello) -> Result<Admission, Close> {
    let user = check_login(shared, &hello)?;
    let session = Arc::new(Session::new(
        user.into(),
        hello.device_id.into_boxed_str(),
        hello.device_epoch,
    ));
    session.set_mode(hello.heartbeat_mode);
    // Register before reading the head: a commit after this point notifies us, one
    // before it is covered by the head we read next.
    let replaced = match shared.registry.register(&session) {
        Ok(Registered::Fresh) => None,
        Ok(Registered::Replaced(old)) => Some(old),
        Err(stale) => {
            return Err(Close::fatal(
                ErrorCode::StaleDeviceEpoch,
                format!(
                    "device epoch {} is older than the active login's {}",
                    session.device_epoch, stale.active
                ),
            ));
        }
    };
    let resume = hello.resume;
    let decided = (|| {
        let info = shared.store.inbox_info(&session.user)?;
        let cursor = shared.store.cursor(&session.user, &session.device)?;
        let (start, resumed) = start_seq(info, resume, cursor, shared.config.start_policy)?;
        // A device neither connected nor known by a live cursor is new to its user:
        // it must fit within the device cap.
        let live_since = crate::commit::unix_ms_before(shared.config.device_expiry);
        if replaced.is_none() && !cursor.is_some_and(|c| c.is_live(info.epoch, live_since)) {
            crate::devices::make_room(shared, &session, info.epoch, live_since)?;
        }
        Ok::<_, Close>((info, start, resumed))
    })();
    let (info, start, resumed) = match decided {
        Ok(d) => d,
        Err(close) => {
            // A refused login never costs the device its working session.
            shared.registry.restore(&session, replaced);
            return Err(close);
        }
    };
    if let Some(old) = replaced {
        info!(
            user = &*old.user,
            device = &*old.device,
            old_epoch = old.device_epoch,
            new_epoch = session.device_epoch,
            "newer login replaces older"
        );
        old.signal(SIG_REPLACED);
    }
    session.notify_head(info.head);
    // The device is seen now, and what it has not received yet is held back from acked
    // compaction: its cursor exists from its first login, not from its first ACK.
    shared.commit.move_cursor(
        &session.user,
        &session.device,
        DeviceCursor {
            inbox_epoch: info.epoch,
            acked_seq: start.saturating_sub(1),
            last_seen_ms: now_ms(),
        },
    );
    // The device holds its resume point: delivered receipts for what no device had
    // acknowledged before (e.g. ACKs lost in a crash) follow.
    if let (Resumed::AsGiven, Some(r)) = (resumed, resume) {
        shared.commit.delivered(&session.user, r.last_seq);
    }
    Ok(Admission {
        session,
        info,
        start,
        resumed,
        interval: shared.config.heartbeat.accept(hello.heartbeat_interval_ms),
    })
}

/// Where delivery starts for a device (DESIGN §6 resume rules). Returns the first seq
/// to deliver and whether the device's resume point was from another inbox epoch.
fn start_seq(
    info: InboxInfo,
    resume: Option<pb::ResumePoint>,
    cursor: Option<DeviceCursor>,
    policy: StartPolicy,
) -> Result<(u64, Resumed), Close> {
    let low = info.low.max(1);
    let mut epoch_changed = false;
    if let Some(r) = resume {
        if r.inbox_epoch == info.epoch {
            if r.last_seq > info.head {
                return Err(Close::fatal(
                    ErrorCode::ResumeAheadOfHead,
                    format!(
                        "resume point {} is above the inbox head {}",
                        r.last_seq, info.head
                    ),
                ));
            }
            if r.last_seq + 1 < low {
                return Ok((low, Resumed::Compacted));
            }
            return Ok((r.last_seq + 1, Resumed::AsGiven));
        }
        // Another epoch: the device restarts cleanly, as one the server never saw.
        epoch_changed = true;
    }
    if let Some(c) = cursor.filter(|c| c.inbox_epoch == info.epoch && !epoch_changed) {
        return Ok((
            (c.acked_seq + 1).clamp(low, info.head + 1),
            Resumed::AsGiven,
        ));
    }
    let start = match policy {
        StartPolicy::Beginning => low,
        StartPolicy::Last(n) => (info.head + 1).saturating_sub(n).max(low),
        StartPolicy::Head => info.head + 1,
    };
    let resumed = if epoch_changed {
        Resumed::EpochChanged
    } else {
        Resumed::AsGiven
    };
    Ok((start, resumed))
}

/// A logged-in connection's state (kept small: it lives as long as the session).
struct Conn<T> {
    t: T,
    shared: Arc<Shared>,
    session: Arc<Session>,
    inbox_epoch: u64,
    /// Position in the inbox and the credit window of un-ACKed DELIVERs.
    window: DeliveryWindow,
    /// SENDs submitted and not yet answered.
    inflight_sends: u32,
    /// Their body bytes, bounded by [`MAX_INFLIGHT_BYTES`].
    inflight_bytes: u32,
    /// The heartbeat interval accepted for this session, ms.
    interval_ms: u32,
    /// The loop has streamed and waits for an event (see [`Conn::poll_run`]).
    waiting: bool,
    /// Operations were queued for commit since the last [`CommitPath::flush`].
    ///
    /// [`CommitPath::flush`]: crate::commit::CommitPath::flush
    unflushed: bool,
}

/// What woke the connection loop.
enum Event {
    Frame(RawFrame),
    Signals(u8),
    /// The send buffer drained below the high-water mark: streaming may continue.
    Writable,
    Closed(Close),
}

impl<T: Transport> Conn<T> {
    fn new(t: T, shared: Arc<Shared>, a: &Admission) -> Self {
        Self {
            t,
            shared,
            session: a.session.clone(),
            inbox_epoch: a.info.epoch,
            window: DeliveryWindow::new(a.start, a.info.head),
            inflight_sends: 0,
            inflight_bytes: 0,
            interval_ms: a.interval.as_millis().min(u128::from(u32::MAX)) as u32,
            waiting: false,
            unflushed: false,
        }
    }

    /// The session's loop: stream what the window allows, then wait for the next
    /// event and handle it. Ready with the reason once the session ends.
    ///
    /// Sends are queued as they are read and committed together once there is nothing
    /// more to read: one commit for what one read brought in.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<Close> {
        loop {
            if !self.waiting {
                if let Err(close) = self.stream() {
                    self.flush();
                    return Poll::Ready(close);
                }
                self.waiting = true;
            }
            let event = match self.poll_event(cx) {
                Poll::Ready(event) => event,
                Poll::Pending if self.unflushed => {
                    // The answers raise our signals: the next poll sees them.
                    self.flush();
                    continue;
                }
                Poll::Pending => return Poll::Pending,
            };
            self.waiting = false;
            let step = match event {
                Event::Frame(raw) => {
                    self.extend_deadline();
                    self.on_frame(raw)
                }
                Event::Signals(bits) => self.on_signals(bits),
                Event::Writable => Ok(()),
                Event::Closed(close) => Err(close),
            };
            if let Err(close) = step {
                self.flush();
                return Poll::Ready(close);
            }
        }
    }

    /// Commits the operations queued since the last flush (see [`CommitPath::flush`]).
    ///
    /// [`CommitPath::flush`]: crate::commit::CommitPath::flush
    fn flush(&mut self) {
        if std::mem::take(&mut self.unflushed) {
            self.shared.commit.flush();
        }
    }

    /// After the loop: the session leaves the registry, then the closing phase.
    async fn closed(mut self, close: Close) {
        let shared = self.shared.clone();
        if matches!(
            close,
            Close::Replaced
                | Close::Kicked(_)
                | Close::Revoked(_)
                | Close::GoingAway
                | Close::Shutdown
        ) {
            self.keep_last_acks();
        }
        shared.registry.unregister(&self.session);
        shared
            .metrics
            .session_closed(self.t.kind().as_str(), self.session.mode());
        self.span()
            .in_scope(|| info!(reason = %close, "session closed"));
        finish(&shared, &mut self.t, close).await;
        shared.metrics.connections_open.dec();
    }

    /// The server closes a session whose peer is still talking: ACKs it sent before
    /// that (already received, not yet read) still move the device's cursor, since the
    /// device holds those entries. A bounded look, without waiting.
    fn keep_last_acks(&mut self) {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        for _ in 0..LAST_FRAMES {
            let Poll::Ready(Ok(Some(raw))) = self.t.poll_recv(&mut cx) else {
                return;
            };
            if let Ok(Frame::Ack(ack)) = frame::from_raw(&raw) {
                let _ = self.on_ack(ack);
            }
        }
    }

    /// Sends WELCOME (preceded by a non-fatal ERROR if the device's resume point was
    /// from another inbox epoch) and switches to the post-auth frame limit.
    fn welcome(&mut self, a: &Admission) -> Result<(), Close> {
        let shared = self.shared.clone();
        let cfg = &shared.config;
        match a.resumed {
            Resumed::AsGiven => {}
            Resumed::EpochChanged => self.send(frame::error(
                ErrorCode::InboxEpochChanged,
                format!(
                    "resume point is from another inbox epoch; restarting at seq {} of epoch {}",
                    a.start, a.info.epoch
                ),
                false,
            ))?,
            Resumed::Compacted => self.send(frame::error(
                ErrorCode::ResumeCompacted,
                format!(
                    "entries before seq {} were removed by retention; resuming there",
                    a.start
                ),
                false,
            ))?,
        }
        let session_id = self.shared.session_ids.fetch_add(1, Ordering::Relaxed);
        self.send(Frame::Welcome(pb::Welcome {
            session_id: format!("{:x}-{session_id:x}", self.shared.boot_id),
            user_id: self.session.user.to_string(),
            server_time_ms: now_ms(),
            inbox_epoch: a.info.epoch,
            start_seq: a.start,
            heartbeat: Some(pb::HeartbeatLimits {
                interval_ms: a.interval.as_millis() as u32,
                min_interval_ms: cfg.heartbeat.min_interval.as_millis() as u32,
                max_interval_ms: cfg.heartbeat.max_interval.as_millis() as u32,
                pong_timeout_ms: cfg.heartbeat.pong_timeout.as_millis() as u32,
                max_misses: cfg.heartbeat.max_misses,
            }),
            dedup_window_ms: cfg.retention.as_millis() as u64,
            max_frame: cfg.max_frame as u32,
            head: a.info.head,
            probe: false,
        }))?;
        self.t.set_max_frame(cfg.max_frame);
        self.extend_deadline();
        shared.deadlines.schedule(&self.session);
        self.session.set_link(self.t.kind(), self.interval_ms);
        shared.metrics.session_opened(
            self.t.kind().as_str(),
            self.session.mode(),
            self.interval_ms,
        );
        self.span().in_scope(|| {
            info!(
                device_epoch = self.session.device_epoch,
                start_seq = a.start,
                head = a.info.head,
                "session opened"
            )
        });
        Ok(())
    }

    /// The connection's tracing span (user, device, transport, peer). Built when there
    /// is something to log rather than held: a span kept open costs every idle session
    /// memory in the subscriber (DESIGN §10).
    fn span(&self) -> tracing::Span {
        tracing::info_span!(
            "conn",
            user = &*self.session.user,
            device = &*self.session.device,
            transport = self.t.kind().as_str(),
            peer = %self.t.peer(),
        )
    }

    /// `I + m·P + grace` for this session, ms.
    fn deadline_ms(&self) -> u64 {
        let interval = Duration::from_millis(u64::from(self.interval_ms));
        self.shared.config.heartbeat.deadline(interval).as_millis() as u64
    }

    /// Something arrived: the session may stay silent for another deadline.
    fn extend_deadline(&self) {
        self.session
            .set_deadline(self.shared.now_ms() + self.deadline_ms());
    }

    fn send(&mut self, f: Frame) -> Result<(), Close> {
        self.t.send(&f).map_err(transport_close)
    }

    /// Streams `next..=head` within the credit window, the replay pacing and the send
    /// buffer's room (the rules are [`DeliveryWindow`]'s).
    fn stream(&mut self) -> Result<(), Close> {
        let head = self.session.head();
        // The commit queues a SEND's answer before it publishes the head holding the
        // sender's own copy; answering first keeps SEND_ACK ahead of that DELIVER.
        if self.session.take_signal(SIG_REPLIES) {
            self.answer()?;
        }
        self.window.on_head(head);
        let limits = WindowLimits {
            credit: u64::from(self.shared.config.credit_window),
            batch: READ_BATCH,
        };
        while self.t.queued_bytes() < OUT_HIGH_WATER {
            // The shared replay bucket is locked only for a backlog batch.
            let grant = self
                .window
                .grant(Instant::now(), limits, || self.shared.replays.lock());
            let room = match grant {
                Grant::Send(n) => n,
                Grant::Paced { .. } => {
                    // The deadline sweep wakes us (within one sweep period).
                    self.shared.deadlines.wake_later(&self.session);
                    break;
                }
                Grant::CaughtUp | Grant::WindowFull => break,
            };
            let next = self.window.next();
            self.shared
                .metrics
                .observe_lag(self.window.head().saturating_sub(next) + 1);
            let started = Instant::now();
            let entries = self.shared.store.read_range(
                &self.session.user,
                next,
                next + room - 1,
                room as usize,
            )?;
            self.shared.metrics.observe_store_read(started.elapsed());
            if entries.is_empty() {
                // Nothing stored in the range: compacted away. Continue from what is left.
                let info = self.shared.store.inbox_info(&self.session.user)?;
                if info.low > next {
                    self.window.skip_to(info.low);
                    continue;
                }
                break;
            }
            let mut sent = 0u64;
            for e in entries {
                // Checked per entry: a batch of large entries must not overshoot.
                if self.t.queued_bytes() >= OUT_HIGH_WATER {
                    break;
                }
                let seq = e.seq;
                self.t
                    .send(&Frame::Deliver(pb::Deliver {
                        entry: Some(to_pb(e)),
                    }))
                    .map_err(transport_close)?;
                self.window.on_sent(seq);
                sent += 1;
            }
            self.shared.metrics.messages_delivered.inc_by(sent);
        }
        Ok(())
    }

    fn on_signals(&mut self, bits: u8) -> Result<(), Close> {
        if bits & SIG_REPLACED != 0 {
            return Err(Close::Replaced);
        }
        if bits & SIG_SHUTDOWN != 0 {
            return Err(Close::Shutdown);
        }
        if bits & SIG_GOAWAY != 0 {
            return Err(Close::GoingAway);
        }
        if bits & (SIG_KICKED | SIG_REVOKED) != 0 {
            let detail = self
                .shared
                .kicks
                .take(&self.session.user, &self.session.device)
                .unwrap_or_else(|| "disconnected by an operator".into());
            return Err(if bits & SIG_REVOKED != 0 {
                Close::Revoked(detail)
            } else {
                Close::Kicked(detail)
            });
        }
        if bits & SIG_DEADLINE != 0 {
            // The sweep saw an old value; a frame may have arrived since.
            let now = self.shared.now_ms();
            let deadline = self.session.deadline();
            if deadline != 0 && deadline <= now {
                // We may have stopped reading (backpressure) while the peer kept
                // talking: look once before declaring it silent. (The noop waker is
                // replaced by the task's own at the next regular poll.)
                let mut cx = Context::from_waker(std::task::Waker::noop());
                if let Poll::Ready(Ok(Some(raw))) = self.t.poll_recv(&mut cx) {
                    self.extend_deadline();
                    return self.on_frame(raw);
                }
                let allowed = self.deadline_ms();
                let silent_ms = now - deadline + allowed;
                return Err(Close::Expired {
                    silent_ms,
                    diagnosis: tether_core::diagnosis::classify_silent_peer(
                        self.t.tcp_snapshot(),
                        silent_ms,
                    ),
                });
            }
        }
        if bits & SIG_REPLIES != 0 {
            self.answer()?;
        }
        // SIG_HEAD needs nothing here: the loop streams before it waits again.
        let _ = bits & SIG_HEAD;
        Ok(())
    }

    /// Sends the queued answers to submitted operations (SEND_ACKs, refusals).
    fn answer(&mut self) -> Result<(), Close> {
        for reply in self.session.take_replies() {
            // Replies come back in submission order; sizes are not kept, so each
            // reply releases the average, and the last one releases the rest.
            let share = self.inflight_bytes / self.inflight_sends.max(1);
            self.inflight_sends = self.inflight_sends.saturating_sub(1);
            self.inflight_bytes = if self.inflight_sends == 0 {
                0
            } else {
                self.inflight_bytes.saturating_sub(share)
            };
            if let Some(reply) = reply {
                self.send(reply)?;
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, raw: RawFrame) -> Result<(), Close> {
        let f = match frame::from_raw(&raw) {
            Ok(f) => f,
            Err(e) => return decode_close(e).map_or(Ok(()), Err),
        };
        match f {
            Frame::Ping(ping) => self.on_ping(ping),
            Frame::Send(send) => self.on_send(send),
            Frame::Ack(ack) => self.on_ack(ack),
            Frame::Sync(sync) => self.on_sync(sync),
            Frame::Receipt(receipt) => self.on_receipt(receipt),
            Frame::GroupChange(change) => self.on_group_change(change),
            Frame::Query(query) => self.on_query(query),
            Frame::Pong(_) => Ok(()),
            Frame::Error(e) => {
                warn!(user = &*self.session.user, code = e.code, reason = %e.reason, "peer sent ERROR");
                if e.fatal {
                    Err(Close::PeerError(e.reason))
                } else {
                    Ok(())
                }
            }
            Frame::Hello(_) => Err(Close::fatal(
                ErrorCode::UnexpectedKind,
                "second HELLO on a logged-in connection",
            )),
            other => Err(Close::fatal(
                ErrorCode::UnexpectedKind,
                format!(
                    "{} is sent by servers, not clients",
                    tether_proto::kind::name(frame::kind_of(&other))
                ),
            )),
        }
    }

    fn on_ping(&mut self, ping: pb::Ping) -> Result<(), Close> {
        let interval_ms = if ping.next_interval_ms > 0 {
            // The client switches when it sees the echo; the deadline follows at once.
            let accepted = self
                .shared
                .config
                .heartbeat
                .accept(ping.next_interval_ms)
                .as_millis() as u32;
            let shorter = accepted < self.interval_ms;
            self.interval_ms = accepted;
            self.session.set_interval(accepted);
            self.shared.metrics.interval_changed(accepted);
            self.extend_deadline();
            if shorter {
                // Filed under the old, later deadline: file again under the new one.
                self.shared.deadlines.schedule(&self.session);
            }
            accepted
        } else {
            0
        };
        // A lost head notification is harmless: PONG tells a lagging connection.
        self.window.on_head(self.session.head());
        let head = if self.window.is_behind() {
            self.window.head()
        } else {
            0
        };
        let answered = self.shared.metrics.heartbeats.inc();
        // The path's RTT as the kernel sees it, for one PING in RTT_SAMPLE (a getsockopt
        // each would cost every PING a syscall).
        if (answered.is_multiple_of(RTT_SAMPLE) || self.session.rtt_us().is_none())
            && let Some(tcp) = self.t.tcp_snapshot()
            && tcp.rtt_us > 0
        {
            self.shared.metrics.observe_rtt(tcp.rtt_us);
            self.session.set_rtt(tcp.rtt_us);
        }
        self.send(Frame::Pong(pb::Pong { interval_ms, head }))
    }

    fn on_send(&mut self, send: pb::Send) -> Result<(), Close> {
        let (to, group) = match send.target {
            Some(pb::send::Target::User(user)) => (user, false),
            Some(pb::send::Target::Group(group)) => (group, true),
            None => return Err(Close::fatal(ErrorCode::MissingField, "SEND without target")),
        };
        if to.len() > 128 {
            return self.reject_send(
                &send.client_msg_id,
                ErrorCode::BadRequest,
                "target id longer than 128 bytes",
            );
        }
        if !group && to.starts_with(tether_proto::GROUP_PREFIX) {
            return self.reject_send(
                &send.client_msg_id,
                ErrorCode::BadRequest,
                "user ids never start with \"g:\": send to a group with the group target",
            );
        }
        let max_body = tether_proto::max_body(self.shared.config.max_frame);
        if send.body.len() > max_body {
            // The DELIVER carrying it would not fit the recipient's frame limit.
            return self.reject_send(
                &send.client_msg_id,
                ErrorCode::FrameTooLarge,
                &format!(
                    "body of {} bytes exceeds the {max_body}-byte limit",
                    send.body.len()
                ),
            );
        }
        let me = self.session.user.to_string();
        let action = if group {
            Action::GroupMessage(to)
        } else {
            Action::Message(vec![
                InboxTarget {
                    user: to.clone(),
                    conversation: me.clone(),
                },
                InboxTarget {
                    user: me.clone(),
                    conversation: to,
                },
            ])
        };
        let append = AppendRequest {
            client_msg_id: client_msg_id(&send.client_msg_id)?,
            action,
            sender: me,
            sender_device: self.session.device.to_string(),
            body: send.body,
            content_type: send.content_type,
            ts_ms: now_ms(),
        };
        self.submit(append)
    }

    /// A membership change: committed like a send, answered like one.
    fn on_group_change(&mut self, change: pb::GroupChange) -> Result<(), Close> {
        let op = match pb::GroupOp::try_from(change.op) {
            Ok(pb::GroupOp::Create) => GroupOp::Create,
            Ok(pb::GroupOp::Add) => GroupOp::Add,
            Ok(pb::GroupOp::Remove) => GroupOp::Remove,
            Ok(pb::GroupOp::Leave) => GroupOp::Leave,
            // Rejected by frame validation already.
            Ok(pb::GroupOp::Unspecified) | Err(_) => {
                return Err(Close::fatal(ErrorCode::MissingField, "GROUP without op"));
            }
        };
        let max = self.shared.config.max_group_members as usize;
        if change.members.len() > max {
            return self.reject_send(
                &change.client_msg_id,
                ErrorCode::GroupFull,
                &format!(
                    "{} members named; a group holds at most {max}",
                    change.members.len()
                ),
            );
        }
        let append = AppendRequest {
            client_msg_id: client_msg_id(&change.client_msg_id)?,
            action: Action::Group(GroupChange {
                group: change.group,
                op,
                members: change.members,
                name: change.name,
                max_members: self.shared.config.max_group_members,
            }),
            sender: self.session.user.to_string(),
            sender_device: self.session.device.to_string(),
            body: Default::default(),
            content_type: String::new(),
            ts_ms: now_ms(),
        };
        self.submit(append)
    }

    /// Read-only questions about the user's own conversations and groups.
    fn on_query(&mut self, query: pb::Query) -> Result<(), Close> {
        let id = query.id;
        let mut result = pb::QueryResult {
            id,
            ..Default::default()
        };
        let refuse = |code: ErrorCode, reason: String| {
            let mut e = frame::error(code, reason, false);
            if let Frame::Error(ref mut inner) = e {
                inner.query_id = id;
            }
            e
        };
        let user = self.session.user.clone();
        match query.what {
            Some(pb::query::What::Conversations(list)) => {
                let mut conversations =
                    self.shared
                        .store
                        .conversations(&user, &list.after, QUERY_PAGE + 1)?;
                result.more = conversations.len() > QUERY_PAGE;
                conversations.truncate(QUERY_PAGE);
                result.conversations = conversations;
            }
            Some(pb::query::What::Groups(_)) => {
                result.groups = self.shared.store.groups_of(&user)?;
            }
            Some(pb::query::What::Group(get)) => {
                // Members only: the same answer whether or not the group exists.
                let info = self.shared.store.group(&get.group)?;
                match info.filter(|g| g.members.iter().any(|m| *m.user == *user)) {
                    Some(info) => result.group = Some(info),
                    None => {
                        self.shared.metrics.protocol_errors.inc();
                        return self.send(refuse(
                            ErrorCode::Forbidden,
                            format!("{user} is not a member of group {:?}", get.group),
                        ));
                    }
                }
            }
            None => return Err(Close::fatal(ErrorCode::MissingField, "QUERY without what")),
        }
        self.send(Frame::QueryResult(result))
    }

    fn submit(&mut self, append: AppendRequest) -> Result<(), Close> {
        let bytes = append.body.len() as u32;
        let request = CommitRequest {
            append,
            reply_to: self.session.clone(),
            submitted: Instant::now(),
        };
        if !self.shared.commit.submit(request) {
            return Err(Close::Shutdown);
        }
        self.unflushed = true;
        self.inflight_sends += 1;
        self.inflight_bytes = self.inflight_bytes.saturating_add(bytes);
        Ok(())
    }

    fn reject_send(
        &mut self,
        id: &bytes::Bytes,
        code: ErrorCode,
        reason: &str,
    ) -> Result<(), Close> {
        self.shared.metrics.protocol_errors.inc();
        let mut e = frame::error(code, reason, false);
        if let Frame::Error(ref mut inner) = e {
            inner.client_msg_id = id.clone();
        }
        self.send(e)
    }

    fn on_ack(&mut self, ack: pb::Ack) -> Result<(), Close> {
        match self.window.on_ack(ack.seq) {
            Err(beyond) => {
                self.shared.metrics.protocol_errors.inc();
                self.send(frame::error(
                    ErrorCode::BadRequest,
                    beyond.to_string(),
                    false,
                ))
            }
            // At or below the last ACK: nothing new.
            Ok(0) => Ok(()),
            Ok(_) => {
                self.shared
                    .commit
                    .delivered(&self.session.user, self.window.acked());
                self.shared.commit.move_cursor(
                    &self.session.user,
                    &self.session.device,
                    DeviceCursor {
                        inbox_epoch: self.inbox_epoch,
                        acked_seq: self.window.acked(),
                        last_seen_ms: now_ms(),
                    },
                );
                Ok(())
            }
        }
    }

    fn on_sync(&mut self, sync: pb::Sync) -> Result<(), Close> {
        self.window.on_head(self.session.head());
        let head = self.window.head();
        let to_excl = if sync.to_seq == 0 {
            head + 1
        } else {
            sync.to_seq.min(head + 1)
        };
        let limit = match sync.limit {
            0 => SYNC_BATCH,
            n => n.min(SYNC_BATCH),
        };
        let mut done = pb::SyncDone {
            entries: Vec::new(),
            next_seq: to_excl.max(sync.from_seq),
            head,
        };
        if sync.from_seq < to_excl {
            let entries = self.shared.store.read_range(
                &self.session.user,
                sync.from_seq,
                to_excl - 1,
                limit as usize,
            )?;
            // Stay within the frame limit: stop before the batch would exceed it.
            let budget = self.shared.config.max_frame.saturating_sub(64);
            let returned = entries.len();
            let mut size = 0usize;
            let mut truncated = false;
            for e in entries {
                let entry = to_pb(e);
                let len = prost::Message::encoded_len(&entry) + 8;
                if size + len > budget && !done.entries.is_empty() {
                    truncated = true;
                    break;
                }
                size += len;
                done.next_seq = entry.seq + 1;
                done.entries.push(entry);
            }
            if !truncated && returned < limit as usize {
                // Fewer than asked: nothing else is stored in the range.
                done.next_seq = to_excl;
            }
        }
        self.send(Frame::SyncDone(done))
    }

    fn on_receipt(&mut self, receipt: pb::Receipt) -> Result<(), Close> {
        // Read receipts are entries in the peer's inbox and the reader's own (its other
        // devices follow), committed on the same path as messages; the store keeps the
        // read position, so a repeated receipt writes nothing. Only a refusal answers.
        let append = AppendRequest {
            client_msg_id: [0; 16],
            action: Action::Read(ReadMark {
                conversation: receipt.conversation,
                up_to_seq: receipt.read_up_to,
                message_id: receipt.message_id,
                incoming: receipt.incoming,
            }),
            sender: self.session.user.to_string(),
            sender_device: self.session.device.to_string(),
            body: Default::default(),
            content_type: String::new(),
            ts_ms: now_ms(),
        };
        self.submit(append)
    }
    /// Waits for the next thing to do, flushing queued bytes meanwhile.
    fn poll_event(&mut self, cx: &mut Context<'_>) -> Poll<Event> {
        let queued = self.t.queued_bytes();
        if self.t.flush_pending() {
            if let Poll::Ready(Err(e)) = self.t.poll_flush(cx) {
                return Poll::Ready(Event::Closed(transport_close(e)));
            }
            // Streaming stopped at the high-water mark: resume once there is room.
            if queued >= OUT_HIGH_WATER
                && self.t.queued_bytes() < OUT_HIGH_WATER
                && self.window.next() <= self.window.head().max(self.session.head())
            {
                return Poll::Ready(Event::Writable);
            }
        }
        let bits = self.session.poll_signals(cx);
        if bits != 0 {
            return Poll::Ready(Event::Signals(bits));
        }
        // Backpressure: a peer that does not read, or floods sends, is not read from.
        let max_inflight = self.shared.config.max_inflight_sends;
        if self.t.queued_bytes() < OUT_HIGH_WATER
            && self.inflight_sends < max_inflight
            && self.inflight_bytes < MAX_INFLIGHT_BYTES
        {
            match self.t.poll_recv(cx) {
                Poll::Ready(Ok(Some(raw))) => return Poll::Ready(Event::Frame(raw)),
                Poll::Ready(Ok(None)) => {
                    return Poll::Ready(Event::Closed(Close::Transport("peer closed".into())));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Event::Closed(transport_close(e))),
                Poll::Pending => {}
            }
        }
        Poll::Pending
    }
}

fn client_msg_id(bytes: &[u8]) -> Result<[u8; 16], Close> {
    bytes
        .try_into()
        .map_err(|_| Close::fatal(ErrorCode::MissingField, "client_msg_id must be 16 bytes"))
}

/// The wire form of a stored entry.
pub fn to_pb(e: StoredEntry) -> pb::Entry {
    pb::Entry {
        seq: e.seq,
        message_id: e.message_id,
        from: e.from,
        from_device: e.from_device,
        conversation: e.conversation,
        body: e.body,
        content_type: e.content_type,
        ts_ms: e.ts_ms,
        r#type: match e.kind {
            EntryKind::Message => pb::EntryType::Message as i32,
            EntryKind::Receipt => pb::EntryType::Receipt as i32,
            EntryKind::Membership => pb::EntryType::Membership as i32,
        },
        incoming: e.incoming,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(head: u64) -> InboxInfo {
        InboxInfo {
            epoch: 9,
            head,
            low: 1,
        }
    }
    fn resume(inbox_epoch: u64, last_seq: u64) -> Option<pb::ResumePoint> {
        Some(pb::ResumePoint {
            inbox_epoch,
            last_seq,
        })
    }
    fn cursor(inbox_epoch: u64, acked_seq: u64) -> Option<DeviceCursor> {
        Some(DeviceCursor {
            inbox_epoch,
            acked_seq,
            last_seen_ms: 0,
        })
    }

    #[test]
    fn the_devices_own_resume_point_wins_over_the_server_cursor() {
        let (start, changed) = start_seq(
            info(50),
            resume(9, 40),
            cursor(9, 10),
            StartPolicy::Beginning,
        )
        .unwrap();
        assert_eq!((start, changed), (41, Resumed::AsGiven));
    }

    #[test]
    fn without_a_resume_point_the_server_cursor_is_used() {
        let (start, _) = start_seq(info(50), None, cursor(9, 10), StartPolicy::Head).unwrap();
        assert_eq!(start, 11);
    }

    #[test]
    fn resume_point_above_head_is_an_error_not_a_skip() {
        assert!(matches!(
            start_seq(info(50), resume(9, 51), None, StartPolicy::Beginning),
            Err(Close::Fatal(ErrorCode::ResumeAheadOfHead, _))
        ));
    }

    #[test]
    fn resume_point_from_another_epoch_restarts_by_policy_and_says_so() {
        let (start, changed) =
            start_seq(info(50), resume(8, 45), cursor(9, 30), StartPolicy::Last(5)).unwrap();
        assert_eq!((start, changed), (46, Resumed::EpochChanged));
    }

    #[test]
    fn unknown_devices_start_by_policy() {
        assert_eq!(
            start_seq(info(50), None, None, StartPolicy::Beginning)
                .unwrap()
                .0,
            1
        );
        assert_eq!(
            start_seq(info(50), None, None, StartPolicy::Head)
                .unwrap()
                .0,
            51
        );
        assert_eq!(
            start_seq(info(50), None, None, StartPolicy::Last(10))
                .unwrap()
                .0,
            41
        );
        assert_eq!(
            start_seq(info(5), None, None, StartPolicy::Last(10))
                .unwrap()
                .0,
            1
        );
        // A cursor from another epoch is ignored.
        assert_eq!(
            start_seq(info(50), None, cursor(3, 20), StartPolicy::Head)
                .unwrap()
                .0,
            51
        );
    }

    #[test]
    fn a_resume_point_below_the_retained_entries_resumes_at_the_oldest_and_says_so() {
        let compacted = InboxInfo {
            epoch: 9,
            head: 50,
            low: 30,
        };
        assert_eq!(
            start_seq(compacted, resume(9, 10), None, StartPolicy::Beginning).unwrap(),
            (30, Resumed::Compacted),
            "said so, not silently"
        );
    }
}
