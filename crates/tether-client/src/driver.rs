//! The background task: one per client. It owns the connection, the inbox cursor, the
//! outbox and the state file, and is the only place that does I/O.
//!
//! One loop, one `select!`: app requests (sends, acks, syncs, close), the link (a
//! handshake in progress, or frames of a live session), handing entries to the app,
//! and one timer (reconnect, heartbeat, deferred persistence). Before each wait the
//! loop *settles*: it persists the state if something durable changed, then lets
//! durable sends, ACKs and SYNCs leave. So a send is always in the state file before
//! its SEND leaves, and an ACK always follows the persisted cursor.

use crate::backoff::Backoff;
use crate::client::{ClientEvent, ConnState, Counters, Entry, SendAck, SessionInfo};
use crate::config::{ClientConfig, token_subject};
use crate::connector::{BoxTransport, Connector};
use crate::error::{ClientError, DisconnectReason};
use crate::heartbeat::{Heartbeat, HeartbeatAction};
use crate::inbox::{Handoff, InboxCursor, WelcomeCheck};
use crate::smart::{
    FULL_IDLE, NetworkKey, ProbeMode, ProbeOutcome, SideProbe, SideResult, SmartHeartbeat,
    side_probe,
};
use crate::state::{ClientMsgId, GroupAction, PendingSend, StateFile, write_atomic};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tether_core::diagnosis::Diagnosis;
use tether_core::heartbeat::{HeartbeatConfig, HeartbeatMode};
use tether_core::outbox::Outbox;
use tether_proto::frame::{self, kind_of};
use tether_proto::pb::{self, ErrorCode, KickReason};
use tether_proto::{DEFAULT_MAX_FRAME, DecodeError, Frame, PROTOCOL_VERSION, RawFrame, kind};
use tether_transport::{TransportError, flush, recv};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{Instrument, debug, error, info, trace, warn};

/// Frames handled per wake-up before the loop settles (persists, sends) again.
const FRAMES_PER_WAKE: usize = 256;
/// Stop queueing SENDs while this many bytes wait for the socket.
const MAX_QUEUED_BYTES: usize = 1 << 20;
/// Entries received but not yet taken by the app. The server's credit window keeps
/// this far lower; beyond it the server is misbehaving.
const MAX_PENDING_ENTRIES: usize = 65_536;
/// Entries asked for per SYNC.
const SYNC_BATCH: u32 = 500;
/// Most entries one `sync` call returns.
const MAX_SYNC_ENTRIES: usize = 100_000;
/// Confirmed sends are removed from the state file within this delay (a resend of a
/// confirmed send is harmless: the server answers it with the original SEND_ACK).
const DEFERRED_PERSIST: Duration = Duration::from_millis(200);
/// Retry delay after the state file could not be written.
const PERSIST_RETRY: Duration = Duration::from_secs(1);
/// How long `close` waits for queued frames to leave.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);

/// Who waits for a send's outcome.
pub(crate) type SendWaiter = oneshot::Sender<Result<SendAck, ClientError>>;

/// One send in the outbox and whoever waits for its outcome (`None` for sends restored
/// from the state file).
#[derive(Debug)]
pub(crate) struct Queued {
    send: PendingSend,
    waiter: Option<SendWaiter>,
}

/// The outbox at start-up: the state file's sends, oldest first, with their ages.
fn restored_outbox(config: &ClientConfig, sends: Vec<PendingSend>) -> Outbox<Queued> {
    let now_ms = unix_ms();
    let mut outbox = Outbox::new(config.outbox, now());
    outbox.restore(
        sends.into_iter().map(|mut send| {
            if send.queued_ms == 0 {
                send.queued_ms = now_ms;
            }
            let age = Duration::from_millis(now_ms.saturating_sub(send.queued_ms));
            (send.client_msg_id.0, Queued { send, waiter: None }, age)
        }),
        now(),
    );
    outbox
}

/// A send from the app.
#[derive(Debug)]
pub(crate) struct SendRequest {
    pub send: PendingSend,
    pub reply: SendWaiter,
}

/// Requests from the app other than sends and acks.
#[derive(Debug)]
pub(crate) enum Control {
    Sync {
        from: u64,
        to: u64,
        reply: oneshot::Sender<Result<Vec<Entry>, ClientError>>,
    },
    Close,
    /// Switch the heartbeat interval (foreground/background profiles).
    SetHeartbeat(Duration),
    /// The device changed networks (to the named one, if given): reconnect now
    /// instead of waiting.
    NetworkChanged(Option<String>),
    /// A read-only question (conversations, groups, a group's members).
    Query {
        what: pb::query::What,
        reply: oneshot::Sender<Result<pb::QueryResult, ClientError>>,
    },
    /// The user read a conversation up to an entry.
    Read(ReadJob),
}

/// A read receipt not yet confirmed: sent on every session until the server's echo
/// (a READ receipt by this user reaching this seq) comes back, at most [`READ_TRIES`]
/// times (a refused one is never echoed).
#[derive(Debug, Clone)]
pub(crate) struct ReadJob {
    pub conversation: String,
    pub seq: u64,
    pub message_id: u64,
    pub incoming: u64,
    /// Sessions it was sent on.
    pub tries: u32,
    /// Sent on the current session.
    pub sent: bool,
}

/// Sessions a read receipt is sent on before it is given up without an echo.
const READ_TRIES: u32 = 3;

/// Most read receipts waiting for their echo (one per conversation).
const MAX_PENDING_READS: usize = 1024;

/// One query in progress.
struct QueryJob {
    id: u32,
    what: pb::query::What,
    reply: oneshot::Sender<Result<pb::QueryResult, ClientError>>,
    /// On the wire on the current session.
    asked: bool,
}

/// The driver's ends of the channels to the handles.
pub(crate) struct Channels {
    pub sends: mpsc::Receiver<SendRequest>,
    pub controls: mpsc::Receiver<Control>,
    /// Highest seq the app acknowledged (coalescing, never grows a queue).
    pub acks: watch::Receiver<u64>,
    /// The same watch, so the driver can reset it when the inbox epoch changes.
    pub ack_requests: Arc<watch::Sender<u64>>,
    pub entries: mpsc::Sender<Entry>,
    pub events: broadcast::Sender<ClientEvent>,
    pub status: watch::Sender<ConnState>,
    pub counters: Arc<Counters>,
}

/// A live session.
struct Conn {
    transport: BoxTransport,
    heartbeat: Heartbeat,
    info: SessionInfo,
    /// Highest ACK this session knows of (the resume point counts).
    acked_sent: u64,
    /// When the client last sent or received anything on this connection: the NAT's
    /// idle clock restarts with traffic in either direction.
    last_tx: Instant,
    last_rx: Instant,
    last_pong: Option<Instant>,
    /// The PING that broke a silence: when it left, the silence before it, and the
    /// interval in force then.
    silence_ping: Option<(Instant, Duration, Duration)>,
}

impl Conn {
    fn sent(&mut self, now: Instant) {
        self.last_tx = now;
        self.heartbeat.on_sent(now);
    }
}

/// The smart heartbeat's run-time state (DESIGN §5).
struct Smart {
    engine: SmartHeartbeat,
    mode: ProbeMode,
    /// The side probe running now.
    side: Option<tokio::task::JoinHandle<()>>,
    /// Bumped on every network switch: results of older probes are dropped.
    generation: u64,
    results_tx: mpsc::Sender<(u64, SideResult)>,
    results_rx: mpsc::Receiver<(u64, SideResult)>,
    /// The main link died on its first PING after a full idle: counted only if the
    /// reconnect succeeds at once (else it was an outage). (idle, when, at the
    /// candidate under test in main mode).
    main_failure: Option<(Duration, Instant, bool)>,
}

type Attempt = Pin<Box<dyn Future<Output = Result<Handshake, AttemptError>> + Send>>;

enum Link {
    /// Waiting to (re)connect.
    Down {
        retry_at: Instant,
    },
    /// Connect + HELLO → WELCOME in progress.
    Connecting {
        server: String,
        attempt: Attempt,
        /// `last_seq` of the resume point sent in HELLO.
        resumed_at: u64,
    },
    Up(Box<Conn>),
    /// The client is done.
    Stopped,
}

struct Handshake {
    transport: BoxTransport,
    welcome: pb::Welcome,
}

enum AttemptError {
    /// The transport could not be opened.
    Connect(String),
    /// The server was reached, and the exchange ended.
    Ended(Ending),
}

/// Why a connection ended and what happens next.
struct Ending {
    reason: DisconnectReason,
    next: Next,
}

enum Next {
    Retry {
        floor: Duration,
    },
    GoAway {
        delay: (Duration, Duration),
        alternate: Option<String>,
    },
    Stop(ClientError),
}

enum LinkEvent {
    Handshake(Result<Handshake, AttemptError>),
    Frame(RawFrame),
    /// Queued frames all left: more may be queued.
    Drained,
    Ended(Ending),
}

/// One `sync` call in progress.
struct SyncJob {
    next: u64,
    to: u64,
    entries: Vec<Entry>,
    reply: oneshot::Sender<Result<Vec<Entry>, ClientError>>,
    /// A SYNC for `next` is on the wire.
    asked: bool,
}

pub(crate) struct Driver {
    config: ClientConfig,
    ch: Channels,
    cursor: InboxCursor,
    outbox: Outbox<Queued>,
    device_epoch: u64,
    /// The ACK that may leave: the cursor as last persisted.
    persisted_acked: u64,
    /// Something durable changed: persist before anything leaves.
    persist_now: bool,
    /// Something changed that may be persisted later.
    persist_by: Option<Instant>,
    backoff: Backoff,
    rng: StdRng,
    server_index: usize,
    /// The heartbeat interval the last HELLO asked for.
    hello_interval: Duration,
    /// GOAWAY's alternate address, used for the next attempt only.
    alternate: Option<String>,
    link: Link,
    /// Entries handed over by the cursor but not yet taken by the channel.
    pending: VecDeque<Entry>,
    /// The app dropped its entry receiver.
    app_gone: bool,
    syncs: VecDeque<SyncJob>,
    queries: Vec<QueryJob>,
    next_query_id: u32,
    /// Read receipts waiting for their echo, by conversation.
    reads: std::collections::HashMap<String, ReadJob>,
    /// The user this client logs in as (from the last WELCOME).
    user_id: String,
    max_frame: usize,
    /// Why the client stops, once it does.
    stop: Option<ClientError>,
    smart: Option<Box<Smart>>,
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Driver {
    pub(crate) fn new(mut config: ClientConfig, state: StateFile, ch: Channels) -> Self {
        let smart = config.smart_heartbeat.clone().map(|settings| {
            let mut engine = SmartHeartbeat::new(settings.config);
            engine.restore(
                state
                    .networks
                    .iter()
                    .map(|n| (n.key.clone(), n.state.clone()))
                    .collect(),
            );
            config.heartbeat_interval =
                engine.switch_network(network_key(&config.network_id, &config.servers), now());
            let (results_tx, results_rx) = mpsc::channel(4);
            Box::new(Smart {
                engine,
                mode: settings.probe,
                side: None,
                generation: 0,
                results_tx,
                results_rx,
                main_failure: None,
            })
        });
        let cursor = InboxCursor::new(state.inbox_epoch, state.last_seq);
        if !state.outbox.is_empty() {
            info!(
                count = state.outbox.len(),
                "unconfirmed sends restored from the state file"
            );
        }
        Self {
            backoff: Backoff::new(config.backoff_base, config.backoff_cap),
            persisted_acked: cursor.acked(),
            cursor,
            outbox: restored_outbox(&config, state.outbox),
            device_epoch: state.device_epoch,
            persist_now: false,
            persist_by: None,
            rng: StdRng::from_os_rng(),
            server_index: 0,
            hello_interval: Duration::ZERO,
            alternate: None,
            link: Link::Down { retry_at: now() },
            pending: VecDeque::new(),
            app_gone: false,
            syncs: VecDeque::new(),
            queries: Vec::new(),
            next_query_id: 1,
            reads: Default::default(),
            user_id: String::new(),
            max_frame: DEFAULT_MAX_FRAME,
            stop: None,
            smart,
            config,
            ch,
        }
    }

    /// Runs until the client is closed, kicked, refused, or every handle is dropped.
    pub(crate) async fn run(self) {
        let user = token_subject(&self.config.token).unwrap_or_default();
        let span = tracing::info_span!("tether_client", %user, device = %self.config.device_id);
        self.run_loop().instrument(span).await
    }

    async fn run_loop(mut self) {
        loop {
            self.settle().await;
            if matches!(self.link, Link::Stopped) {
                break;
            }
            let deadline = self.next_deadline();
            let outbox_has_room = self.outbox.has_room();
            let wants_permit = !self.pending.is_empty() && !self.app_gone;
            tokio::select! {
                control = self.ch.controls.recv() => match control {
                    Some(control) => self.on_control(control).await,
                    None => self.close().await,
                },
                Ok(()) = self.ch.acks.changed() => self.on_ack_request(),
                event = poll_fn(|cx| poll_link(&mut self.link, cx)) => self.on_link_event(event).await,
                Some(request) = self.ch.sends.recv(), if outbox_has_room => self.on_send_requests(request),
                permit = self.ch.entries.clone().reserve_owned(), if wants_permit => match permit {
                    Ok(permit) => {
                        if let Some(entry) = self.pending.pop_front() {
                            permit.send(entry);
                        }
                    }
                    Err(_) => self.on_app_gone(),
                },
                () = sleep_until(deadline) => self.on_timer().await,
                (generation, result) = smart_result(&mut self.smart) => self.on_side_result(generation, result),
            }
        }
        if let Some(side) = self.smart.as_mut().and_then(|s| s.side.take()) {
            side.abort();
        }
        self.finish().await;
    }

    /// Persists if needed, then lets whatever may leave leave.
    async fn settle(&mut self) {
        if self.persist_now || self.persist_by.is_some_and(|t| t <= now()) {
            self.persist().await;
        }
        self.hand_over();
        self.pump();
        self.report_unconfirmed();
    }

    /// Tells the app about every send the outbox gave up on.
    fn report_unconfirmed(&mut self) {
        let mut any = false;
        while let Some(u) = self.outbox.pop_unconfirmed() {
            any = true;
            let id = ClientMsgId(u.id);
            let error = ClientError::Unconfirmed {
                client_msg_id: id,
                reason: u.reason,
            };
            warn!(%error, "send given up");
            match u.value.waiter {
                Some(waiter) => {
                    let _ = waiter.send(Err(error));
                }
                None => self.emit(ClientEvent::SendUnconfirmed {
                    client_msg_id: id,
                    reason: u.reason,
                }),
            }
        }
        if any {
            self.persist_later();
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let link = match &self.link {
            Link::Down { retry_at } => Some(*retry_at),
            Link::Up(conn) => Some(conn.heartbeat.poll_timeout()),
            Link::Connecting { .. } | Link::Stopped => None,
        };
        [
            link,
            self.persist_by,
            self.smart_deadline(),
            self.outbox.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn emit(&self, event: ClientEvent) {
        // No subscriber is fine: events are advisory.
        let _ = self.ch.events.send(event);
    }

    // ----- state file -----

    async fn persist(&mut self) {
        self.persist_now = false;
        self.persist_by = None;
        let acked = self.cursor.acked();
        let Some(path) = self.config.state_path.clone() else {
            self.outbox.mark_all_durable();
            self.persisted_acked = acked;
            return;
        };
        let snapshot = StateFile {
            inbox_epoch: self.cursor.epoch(),
            last_seq: acked,
            device_epoch: self.device_epoch,
            outbox: self.outbox.iter().map(|(_, q)| q.send.clone()).collect(),
            networks: self
                .smart
                .as_ref()
                .map(|s| {
                    s.engine
                        .snapshot()
                        .into_iter()
                        .map(|(key, state)| crate::state::SavedNetwork { key, state })
                        .collect()
                })
                .unwrap_or_default(),
        };
        let bytes = snapshot.to_json();
        let target = path.clone();
        let written = tokio::task::spawn_blocking(move || write_atomic(&target, &bytes))
            .await
            .unwrap_or_else(|e| Err(io::Error::other(e.to_string())));
        // An ACK may leave either way: without the file a crash only replays entries.
        self.persisted_acked = acked;
        match written {
            Ok(()) => self.outbox.mark_all_durable(),
            Err(e) => {
                error!(path = %path.display(), error = %e, "cannot write the state file");
                let failure = ClientError::StateFile {
                    path,
                    detail: e.to_string(),
                };
                for (_, item) in self.outbox.take_non_durable() {
                    if let Some(waiter) = item.waiter {
                        let _ = waiter.send(Err(failure.clone()));
                    }
                }
                self.persist_by = Some(now() + PERSIST_RETRY);
            }
        }
    }

    fn persist_later(&mut self) {
        if self.config.state_path.is_some() && self.persist_by.is_none() {
            self.persist_by = Some(now() + DEFERRED_PERSIST);
        }
    }

    // ----- app requests -----

    fn on_send_requests(&mut self, first: SendRequest) {
        self.accept_send(first);
        while self.outbox.has_room() {
            match self.ch.sends.try_recv() {
                Ok(request) => self.accept_send(request),
                Err(_) => break,
            }
        }
    }

    fn accept_send(&mut self, request: SendRequest) {
        // The body must leave room for what the DELIVER carrying it adds.
        let len = request.send.body.len();
        let limit = tether_proto::max_body(self.max_frame);
        if len > limit {
            let _ = request
                .reply
                .send(Err(ClientError::TooLarge { len, limit }));
            return;
        }
        trace!(id = %request.send.client_msg_id, to = %request.send.to, "send queued");
        let mut send = request.send;
        send.queued_ms = unix_ms();
        let id = send.client_msg_id.0;
        let queued = Queued {
            send,
            waiter: Some(request.reply),
        };
        if let Err(queued) = self.outbox.push(id, queued, now()) {
            // Callers only accept sends while there is room; answer rather than drop.
            if let Some(waiter) = queued.waiter {
                let _ = waiter.send(Err(ClientError::InvalidRequest(
                    "the outbox is full".into(),
                )));
            }
            return;
        }
        self.persist_now = true;
    }

    fn on_ack_request(&mut self) {
        let requested = *self.ch.acks.borrow_and_update();
        if self.cursor.ack(requested).is_some() {
            self.persist_now = true;
        }
    }

    async fn on_control(&mut self, control: Control) {
        match control {
            Control::Sync { from, to, reply } => self.syncs.push_back(SyncJob {
                next: from,
                to,
                entries: Vec::new(),
                reply,
                asked: false,
            }),
            Control::Close => self.close().await,
            Control::SetHeartbeat(interval) => {
                self.config.heartbeat_interval = interval;
                if let Link::Up(conn) = &mut self.link {
                    // Shorter applies at once; longer waits for the server's PONG echo.
                    conn.heartbeat.set_interval(now(), interval);
                }
            }
            Control::NetworkChanged(network) => {
                if let Some(id) = network {
                    self.switch_network(id);
                }
                if !self.migrate() {
                    self.network_changed();
                }
            }
            Control::Query { what, reply } => {
                let id = self.next_query_id;
                self.next_query_id = self.next_query_id.wrapping_add(1).max(1);
                self.queries.push(QueryJob {
                    id,
                    what,
                    reply,
                    asked: false,
                });
            }
            Control::Read(job) => {
                let newer = self
                    .reads
                    .get(&job.conversation)
                    .is_none_or(|old| old.seq < job.seq);
                if newer
                    && (self.reads.len() < MAX_PENDING_READS
                        || self.reads.contains_key(&job.conversation))
                {
                    self.reads.insert(job.conversation.clone(), job);
                }
            }
        }
    }

    /// The device changed networks and the transport can migrate (QUIC): move it to a
    /// fresh local socket and keep the session. False when it cannot.
    fn migrate(&mut self) -> bool {
        let Link::Up(conn) = &mut self.link else {
            return false;
        };
        match conn.transport.rebind() {
            Some(Ok(local)) => {
                info!(%local, "session migrated to a new local address");
                true
            }
            Some(Err(e)) => {
                warn!(error = %e, "could not migrate the session; reconnecting");
                false
            }
            None => false,
        }
    }

    /// The device changed networks: drop the link, whose path is likely gone, and
    /// reconnect at once.
    fn network_changed(&mut self) {
        match &self.link {
            // The old path is probably gone: drop it and try at once.
            Link::Up(_) => {
                self.end_link(Ending {
                    reason: DisconnectReason::NetworkDead,
                    next: Next::Retry {
                        floor: Duration::ZERO,
                    },
                });
                self.backoff.reset();
                self.link = Link::Down { retry_at: now() };
            }
            // An attempt under way may be on the old path too.
            Link::Down { .. } | Link::Connecting { .. } => {
                self.backoff.reset();
                self.link = Link::Down { retry_at: now() };
            }
            Link::Stopped => {}
        }
    }

    // ----- smart heartbeat (DESIGN §5; see crate::smart) -----

    /// Switches to another network's learned interval at once.
    fn switch_network(&mut self, id: String) {
        if id == self.config.network_id {
            return;
        }
        info!(from = %self.config.network_id, to = %id, "network switched");
        self.config.network_id = id;
        let Some(smart) = self.smart.as_mut() else {
            return;
        };
        if let Some(side) = smart.side.take() {
            side.abort();
        }
        smart.generation += 1;
        smart.main_failure = None;
        smart.engine.switch_network(
            network_key(&self.config.network_id, &self.config.servers),
            now(),
        );
        self.smart_apply();
    }

    /// When the smart heartbeat next needs the timer.
    fn smart_deadline(&self) -> Option<Instant> {
        let smart = self.smart.as_ref()?;
        if !matches!(self.link, Link::Up(_)) || smart.side.is_some() {
            return None;
        }
        smart.engine.next_probe_at()
    }

    /// Starts the next probe when one is due.
    fn smart_tick(&mut self, now: Instant) {
        let Some(smart) = self.smart.as_mut() else {
            return;
        };
        let Link::Up(conn) = &self.link else {
            return;
        };
        if smart.side.is_some() || smart.engine.next_probe_at().is_none_or(|t| t > now) {
            return;
        }
        let Some(candidate) = smart.engine.next_probe(now) else {
            return;
        };
        if smart.mode == ProbeMode::Side {
            let hello = pb::Hello {
                version: PROTOCOL_VERSION,
                token: self.config.token.clone(),
                device_id: self.config.device_id.clone(),
                device_epoch: self.device_epoch,
                platform: self.config.platform.clone(),
                app_version: self.config.app_version.clone(),
                network: Some(pb::Network {
                    id: self.config.network_id.clone(),
                    r#type: 0,
                }),
                heartbeat_mode: pb::HeartbeatMode::Idle as i32,
                heartbeat_interval_ms: duration_ms_u32(candidate),
                resume: None,
                probe: true,
            };
            debug!(candidate = ?candidate, "side probe starts");
            let probe = side_probe(SideProbe {
                report: smart.results_tx.clone(),
                generation: smart.generation,
                connector: self.config.connector.clone(),
                server: conn.info.server.clone(),
                hello,
                candidate,
                pong_timeout: self.config.pong_timeout,
                connect_timeout: self.config.connect_timeout,
            });
            let results = smart.results_tx.clone();
            let generation = smart.generation;
            smart.side = Some(tokio::spawn(async move {
                let result = probe.await;
                let _ = results.send((generation, result)).await;
            }));
        }
        self.smart_apply();
    }

    /// A side probe reports: its PING leaves now (the main link PINGs along, so the
    /// two face the same network in the same period), or it finished: apply the
    /// attribution rule, then learn.
    fn on_side_result(&mut self, generation: u64, result: SideResult) {
        let at = now();
        let Some(smart) = self.smart.as_mut() else {
            return;
        };
        if generation != smart.generation {
            return;
        }
        if let SideResult::PingLeaving = result {
            if let Link::Up(conn) = &mut self.link {
                let next_interval_ms = conn
                    .heartbeat
                    .pending_next_interval()
                    .map_or(0, duration_ms_u32);
                if conn.silence_ping.is_none() {
                    let silent = at.saturating_duration_since(conn.last_tx.max(conn.last_rx));
                    conn.silence_ping = Some((at, silent, conn.heartbeat.interval()));
                }
                self.send_frame(&Frame::Ping(pb::Ping { next_interval_ms }));
            }
            return;
        }
        smart.side = None;
        let period = self.config.pong_timeout;
        let mut pinged = None;
        let outcome = match result {
            SideResult::Answered { idle, rtt } => {
                pinged = Some((idle, Some(rtt)));
                ProbeOutcome::Success { idle }
            }
            SideResult::Unacked { idle, ping_at } => {
                pinged = Some((idle, None));
                // The main link's companion PING left with the probe's; it must
                // have been answered within the probe's own pong timeout.
                let main_answered = matches!(&self.link, Link::Up(conn)
                    if conn.last_pong.is_some_and(|t| t > ping_at && t <= ping_at + period));
                if main_answered {
                    ProbeOutcome::Failure { idle }
                } else {
                    ProbeOutcome::Discarded {
                        reason: "probe PING unacknowledged, but the main link did not answer \
                                 in the same period either"
                            .into(),
                    }
                }
            }
            SideResult::Inconclusive(reason) => ProbeOutcome::Discarded { reason },
            SideResult::PingLeaving => return,
        };
        smart.engine.on_probe_result(at, outcome);
        if let Some((idle, rtt)) = pinged {
            self.emit(ClientEvent::Ping { probe: true, idle });
            if let Some(rtt) = rtt {
                self.emit(ClientEvent::Pong {
                    probe: true,
                    idle,
                    rtt,
                });
            }
        }
        self.smart_apply();
    }

    /// The main link answered a PING after a full idle: in main mode, a probe success.
    fn smart_main_answered(&mut self, idle: Duration) {
        let Some(smart) = self.smart.as_mut() else {
            return;
        };
        if smart.mode == ProbeMode::Main
            && smart
                .engine
                .probe_in_flight()
                .is_some_and(|c| idle >= c.mul_f64(FULL_IDLE))
        {
            smart
                .engine
                .on_probe_result(now(), ProbeOutcome::Success { idle });
            self.smart_apply();
        }
    }

    /// A session is up: a link death just before it, followed by this reconnect at
    /// once, was the NAT (DESIGN §5 stable state); learn from it.
    fn smart_connected(&mut self) {
        let at = now();
        let window = self.config.connect_timeout;
        let Some(smart) = self.smart.as_mut() else {
            return;
        };
        if let Some((idle, died, at_candidate)) = smart.main_failure.take() {
            if at.saturating_duration_since(died) <= window {
                if at_candidate {
                    smart
                        .engine
                        .on_probe_result(at, ProbeOutcome::Failure { idle });
                } else {
                    smart.engine.on_main_failure(at, idle);
                }
            } else if at_candidate {
                smart.engine.on_probe_result(
                    at,
                    ProbeOutcome::Discarded {
                        reason: "the reconnect after the link died took too long".into(),
                    },
                );
            }
        }
        self.smart_apply();
    }

    /// Reports the engine's decisions and runs the main link at its interval (the
    /// candidate itself while a main-mode probe is under way).
    fn smart_apply(&mut self) {
        let Some(smart) = self.smart.as_mut() else {
            return;
        };
        let mut events = Vec::new();
        while let Some(e) = smart.engine.poll_event() {
            events.push(e);
        }
        let interval = match (smart.mode, smart.engine.probe_in_flight()) {
            (ProbeMode::Main, Some(candidate)) => candidate,
            _ => smart.engine.run_interval(),
        };
        if !events.is_empty() {
            self.persist_later();
        }
        for e in events {
            info!(network = %e.network, event = ?e.kind, "smart heartbeat");
            self.emit(ClientEvent::Smart(e));
        }
        if interval != self.config.heartbeat_interval {
            self.config.heartbeat_interval = interval;
            if let Link::Up(conn) = &mut self.link {
                conn.heartbeat.set_interval(now(), interval);
            }
        }
    }

    fn on_app_gone(&mut self) {
        debug!("the app dropped its entry receiver; entries are no longer handed over");
        self.app_gone = true;
        self.pending.clear();
    }

    fn hand_over(&mut self) {
        while let Some(entry) = self.pending.pop_front() {
            match self.ch.entries.try_send(entry) {
                Ok(()) => {}
                Err(TrySendError::Full(entry)) => {
                    self.pending.push_front(entry);
                    return;
                }
                Err(TrySendError::Closed(_)) => return self.on_app_gone(),
            }
        }
    }

    /// Queues what may leave on a live session: the persisted ACK, durable sends in
    /// order (capped in flight and by queued bytes), the next SYNC batch.
    fn pump(&mut self) {
        let Link::Up(conn) = &mut self.link else {
            return;
        };
        let mut frames = Vec::new();
        if self.persisted_acked > conn.acked_sent {
            conn.acked_sent = self.persisted_acked;
            frames.push(Frame::Ack(pb::Ack {
                seq: self.persisted_acked,
            }));
        }
        while conn.transport.queued_bytes() < MAX_QUEUED_BYTES {
            let Some((_, queued)) = self.outbox.next_to_send(now(), self.config.max_in_flight)
            else {
                break;
            };
            Counters::bump(&self.ch.counters.sends_transmitted);
            if let Err(e) = conn.transport.send(&send_frame(&queued.send)) {
                return self.end_link(transport_ending(e));
            }
            conn.sent(now());
        }
        for job in self.queries.iter_mut().filter(|job| !job.asked) {
            job.asked = true;
            frames.push(Frame::Query(pb::Query {
                id: job.id,
                what: Some(job.what.clone()),
            }));
        }
        for job in self.reads.values_mut().filter(|job| !job.sent) {
            job.sent = true;
            job.tries += 1;
            frames.push(Frame::Receipt(pb::Receipt {
                conversation: job.conversation.clone(),
                read_up_to: job.seq,
                message_id: job.message_id,
                incoming: job.incoming,
            }));
        }
        if let Some(job) = self.syncs.front_mut().filter(|job| !job.asked) {
            job.asked = true;
            frames.push(Frame::Sync(pb::Sync {
                from_seq: job.next,
                to_seq: job.to,
                limit: SYNC_BATCH,
            }));
        }
        for frame in frames {
            self.send_frame(&frame);
        }
    }

    /// Queues one frame on the live session.
    fn send_frame(&mut self, frame: &Frame) {
        let Link::Up(conn) = &mut self.link else {
            return;
        };
        match conn.transport.send(frame) {
            Ok(()) => conn.sent(now()),
            Err(e) => self.end_link(transport_ending(e)),
        }
    }

    // ----- the link -----

    async fn on_timer(&mut self) {
        let now = now();
        self.smart_tick(now);
        self.outbox.handle_timeout(now);
        self.report_unconfirmed();
        match &mut self.link {
            Link::Down { retry_at } if *retry_at <= now => self.start_attempt().await,
            Link::Up(conn) => match conn.heartbeat.handle_timeout(now) {
                HeartbeatAction::Ping => {
                    if conn.silence_ping.is_none() {
                        let idle = now.saturating_duration_since(conn.last_tx.max(conn.last_rx));
                        conn.silence_ping = Some((now, idle, conn.heartbeat.interval()));
                    }
                    let idle = conn.silence_ping.map_or(Duration::ZERO, |p| p.1);
                    self.emit(ClientEvent::Ping { probe: false, idle });
                    let Link::Up(conn) = &mut self.link else {
                        return;
                    };
                    // A pending interval change rides on every PING until echoed.
                    let next_interval_ms = conn
                        .heartbeat
                        .pending_next_interval()
                        .map_or(0, |d| d.as_millis().min(u128::from(u32::MAX)) as u32);
                    self.send_frame(&Frame::Ping(pb::Ping { next_interval_ms }))
                }
                HeartbeatAction::Dead => {
                    // TCP_INFO tells a stalled server from a dead path (DESIGN §4).
                    let reason =
                        match tether_core::diagnosis::classify(conn.transport.tcp_snapshot()) {
                            Diagnosis::ServerUnresponsive => DisconnectReason::ServerUnresponsive,
                            Diagnosis::NetworkDead => DisconnectReason::NetworkDead,
                            Diagnosis::Unknown => DisconnectReason::UnknownTimeout,
                        };
                    if reason == DisconnectReason::NetworkDead
                        && let Some((_, idle, interval)) = conn.silence_ping
                        && idle >= interval.mul_f64(FULL_IDLE)
                        && let Some(smart) = self.smart.as_mut()
                    {
                        let at_candidate = smart.mode == ProbeMode::Main
                            && smart.engine.probe_in_flight().is_some();
                        smart.main_failure = Some((idle, now, at_candidate));
                    }
                    self.end_link(Ending {
                        reason,
                        next: Next::Retry {
                            floor: Duration::ZERO,
                        },
                    })
                }
                HeartbeatAction::Idle => {}
            },
            _ => {}
        }
    }

    async fn start_attempt(&mut self) {
        // A newer epoch than any earlier attempt, persisted before HELLO leaves; the
        // clock keeps it newer even if the state file was lost.
        self.device_epoch = (self.device_epoch + 1).max(unix_ms());
        self.persist().await;
        let server = self.alternate.take().unwrap_or_else(|| {
            let servers = &self.config.servers;
            servers[self.server_index % servers.len()].clone()
        });
        let resume = self.cursor.resume_point();
        let resumed_at = resume.map_or(0, |r| r.last_seq);
        let hello = pb::Hello {
            version: PROTOCOL_VERSION,
            token: self.config.token.clone(),
            device_id: self.config.device_id.clone(),
            device_epoch: self.device_epoch,
            platform: self.config.platform.clone(),
            app_version: self.config.app_version.clone(),
            network: Some(pb::Network {
                id: self.config.network_id.clone(),
                r#type: 0,
            }),
            heartbeat_mode: match self.config.heartbeat_mode {
                HeartbeatMode::Idle => pb::HeartbeatMode::Idle,
                HeartbeatMode::Fixed => pb::HeartbeatMode::Fixed,
            } as i32,
            heartbeat_interval_ms: {
                self.hello_interval = self.config.heartbeat_interval;
                duration_ms_u32(self.config.heartbeat_interval)
            },
            resume,
            probe: false,
        };
        debug!(%server, device_epoch = self.device_epoch, ?resume, "connecting");
        let attempt = Box::pin(handshake(
            self.config.connector.clone(),
            server.clone(),
            hello,
            self.config.connect_timeout,
        ));
        self.link = Link::Connecting {
            server,
            attempt,
            resumed_at,
        };
    }

    async fn on_link_event(&mut self, event: LinkEvent) {
        match event {
            LinkEvent::Handshake(Ok(handshake)) => self.on_welcome(handshake),
            LinkEvent::Handshake(Err(AttemptError::Connect(detail))) => {
                self.on_connect_failed(detail)
            }
            LinkEvent::Handshake(Err(AttemptError::Ended(ending))) => self.end_link(ending),
            LinkEvent::Ended(ending) => self.end_link(ending),
            LinkEvent::Drained => {}
            LinkEvent::Frame(raw) => {
                self.on_frame(raw);
                // Take what else is already there, so one persist covers a batch.
                for _ in 1..FRAMES_PER_WAKE {
                    let Link::Up(conn) = &mut self.link else {
                        break;
                    };
                    let polled = poll_fn(|cx| Poll::Ready(conn.transport.poll_recv(cx))).await;
                    match polled {
                        Poll::Pending => break,
                        Poll::Ready(Ok(Some(raw))) => self.on_frame(raw),
                        Poll::Ready(Ok(None)) => self.end_link(closed_by_server()),
                        Poll::Ready(Err(e)) => self.end_link(transport_ending(e)),
                    }
                }
            }
        }
    }

    fn on_connect_failed(&mut self, detail: String) {
        let server = match &self.link {
            Link::Connecting { server, .. } => server.clone(),
            _ => String::new(),
        };
        self.server_index = self.server_index.wrapping_add(1);
        if let Some(smart) = self.smart.as_mut()
            && let Some((_, _, at_candidate)) = smart.main_failure.take()
        {
            debug!("link death followed by a failed reconnect: an outage, not the NAT");
            if at_candidate {
                smart.engine.on_probe_result(
                    now(),
                    ProbeOutcome::Discarded {
                        reason: "the link died and the reconnect failed: an outage".into(),
                    },
                );
                self.smart_apply();
            }
        }
        let delay = self.backoff.next_delay(&mut self.rng);
        warn!(%server, %detail, retry_in = ?delay, "connect failed");
        self.emit(ClientEvent::ConnectFailed {
            server,
            detail,
            retry_in: delay,
        });
        self.link = Link::Down {
            retry_at: now() + delay,
        };
    }

    fn on_welcome(&mut self, handshake: Handshake) {
        let (server, resumed_at) = match &self.link {
            Link::Connecting {
                server, resumed_at, ..
            } => (server.clone(), *resumed_at),
            _ => (String::new(), 0),
        };
        let Handshake {
            mut transport,
            welcome: w,
        } = handshake;
        let acked_sent = match self.cursor.on_welcome(w.inbox_epoch, w.start_seq) {
            WelcomeCheck::Continue => resumed_at,
            WelcomeCheck::Expired { from, to } => {
                warn!(
                    from,
                    to, "entries expired on the server before this device got them"
                );
                self.persist_now = true;
                self.emit(ClientEvent::EntriesExpired { from, to });
                self.cursor.acked()
            }
            WelcomeCheck::Reset { old_epoch } => {
                self.persist_now = true;
                self.persisted_acked = self.cursor.acked();
                self.ch.ack_requests.send_replace(0);
                if old_epoch != 0 {
                    warn!(
                        old_epoch,
                        new_epoch = w.inbox_epoch,
                        start_seq = w.start_seq,
                        "inbox epoch changed: cursor restarts"
                    );
                    self.pending.clear();
                    for job in self.syncs.drain(..) {
                        let _ = job.reply.send(Err(ClientError::InboxReset));
                    }
                    self.emit(ClientEvent::InboxReset {
                        old_epoch,
                        new_epoch: w.inbox_epoch,
                        start_seq: w.start_seq,
                    });
                }
                self.cursor.acked()
            }
        };
        // The backoff resets only if this session stays up (see Backoff::on_disconnected).
        self.backoff.on_connected(now());
        self.max_frame = if w.max_frame > 0 {
            w.max_frame as usize
        } else {
            DEFAULT_MAX_FRAME
        };
        transport.set_max_frame(self.max_frame);
        let limits = w.heartbeat.unwrap_or_default();
        let interval = ms_or(limits.interval_ms, self.config.heartbeat_interval);
        let pong_timeout = ms_or(limits.pong_timeout_ms, self.config.pong_timeout);
        self.user_id.clone_from(&w.user_id);
        let info = SessionInfo {
            server,
            session_id: w.session_id,
            user_id: w.user_id,
            server_time_ms: w.server_time_ms,
            inbox_epoch: w.inbox_epoch,
            start_seq: w.start_seq,
            head: w.head,
            heartbeat_interval: interval,
            dedup_window: Duration::from_millis(w.dedup_window_ms),
            max_frame: self.max_frame,
        };
        info!(
            server = %info.server,
            session = %info.session_id,
            inbox_epoch = info.inbox_epoch,
            start_seq = info.start_seq,
            head = info.head,
            unconfirmed_sends = self.outbox.len(),
            "connected"
        );
        // Every unconfirmed send goes again, oldest first, before anything newer (but
        // none past the dedup window this server announced).
        self.outbox.connected(info.dedup_window);
        self.link = Link::Up(Box::new(Conn {
            transport,
            heartbeat: Heartbeat::with_config(
                now(),
                HeartbeatConfig {
                    mode: self.config.heartbeat_mode,
                    interval,
                    pong_timeout,
                    // 0 = not announced: the default m.
                    max_misses: match limits.max_misses {
                        0 => tether_core::heartbeat::MAX_MISSES,
                        m => m,
                    },
                },
            ),
            info: info.clone(),
            acked_sent,
            last_tx: now(),
            last_rx: now(),
            last_pong: None,
            silence_ping: None,
        }));
        // The app switched profiles while this connection was being made: apply it now.
        if self.config.heartbeat_interval != self.hello_interval
            && let Link::Up(conn) = &mut self.link
        {
            conn.heartbeat
                .set_interval(now(), self.config.heartbeat_interval);
        }
        self.ch
            .status
            .send_replace(ConnState::Connected(info.clone()));
        Counters::bump(&self.ch.counters.sessions);
        self.emit(ClientEvent::Connected(info));
        self.smart_connected();
    }

    fn on_frame(&mut self, raw: RawFrame) {
        let Link::Up(conn) = &mut self.link else {
            return;
        };
        let at = now();
        conn.heartbeat.on_received(at);
        conn.last_rx = at;
        let silence_ping = conn.silence_ping.take();
        let frame = match frame::from_raw(&raw) {
            Ok(frame) => frame,
            Err(DecodeError::UnknownIgnorable(kind)) => {
                trace!(kind, "ignorable frame skipped");
                return;
            }
            Err(e) => return self.end_link(protocol_error(e.to_string())),
        };
        match frame {
            Frame::Deliver(d) => self.on_deliver(d),
            Frame::SendAck(a) => self.on_send_ack(a),
            Frame::Error(e) => self.on_error(e),
            Frame::Ping(_) => self.send_frame(&Frame::Pong(pb::Pong::default())),
            Frame::Pong(pong) => {
                let echoed = (pong.interval_ms > 0)
                    .then(|| Duration::from_millis(u64::from(pong.interval_ms)));
                conn.heartbeat.on_pong(at, echoed);
                conn.last_pong = Some(at);
                if let Some((sent, idle, interval)) = silence_ping {
                    self.emit(ClientEvent::Pong {
                        probe: false,
                        idle,
                        rtt: at - sent,
                    });
                    if idle >= interval.mul_f64(FULL_IDLE) {
                        self.smart_main_answered(idle);
                    }
                }
            }
            Frame::SyncDone(s) => self.on_sync_done(s),
            Frame::QueryResult(r) => self.on_query_result(r),
            Frame::Kick(k) => self.on_kick(k),
            Frame::GoAway(g) => self.end_link(go_away_ending(g)),
            other => self.end_link(protocol_error(format!(
                "unexpected {} from the server",
                kind::name(kind_of(&other))
            ))),
        }
    }

    fn on_deliver(&mut self, deliver: pb::Deliver) {
        let Some(entry) = deliver.entry else {
            return;
        };
        // The server's echo of our own read receipt confirms it.
        if entry.r#type == pb::EntryType::Receipt as i32
            && entry.from == self.user_id
            && let Some(receipt) = crate::client::receipt_of(&entry)
            && receipt.by == self.user_id
            && self
                .reads
                .get(&receipt.conversation)
                .is_some_and(|job| job.seq <= receipt.up_to_seq)
        {
            self.reads.remove(&receipt.conversation);
        }
        match self.cursor.on_deliver(entry.seq) {
            Handoff::Hand => {
                if self.app_gone {
                    return;
                }
                self.pending.push_back(entry);
                if self.pending.len() > MAX_PENDING_ENTRIES {
                    self.end_link(protocol_error(
                        "the server ignores the credit window".to_string(),
                    ));
                }
            }
            Handoff::Duplicate => {
                Counters::bump(&self.ch.counters.replays_dropped);
                trace!(seq = entry.seq, "replayed entry dropped");
            }
            Handoff::Gap { expected, got } => self.end_link(protocol_error(format!(
                "gap in delivery: expected seq {expected}, got {got}"
            ))),
        }
    }

    fn on_send_ack(&mut self, a: pb::SendAck) {
        let Some(id) = ClientMsgId::from_slice(&a.client_msg_id) else {
            return;
        };
        let Some(item) = self.outbox.remove(&id.0) else {
            debug!(%id, "SEND_ACK for a send no longer pending");
            return;
        };
        let ack = SendAck {
            client_msg_id: id,
            message_id: a.message_id,
            seq: a.seq,
            ts_ms: a.ts_ms,
            duplicate: a.duplicate,
        };
        if a.duplicate {
            Counters::bump(&self.ch.counters.duplicate_acks);
        }
        trace!(%id, message_id = a.message_id, "send confirmed");
        match item.waiter {
            Some(waiter) => {
                let _ = waiter.send(Ok(ack));
            }
            None => self.emit(ClientEvent::SendAcked(ack)),
        }
        self.persist_later();
    }

    fn on_query_result(&mut self, result: pb::QueryResult) {
        let Some(i) = self.queries.iter().position(|job| job.id == result.id) else {
            debug!(id = result.id, "QUERY_RESULT nobody asked for");
            return;
        };
        let job = self.queries.swap_remove(i);
        let _ = job.reply.send(Ok(result));
    }

    fn on_error(&mut self, e: pb::Error) {
        let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
        if e.query_id != 0
            && let Some(i) = self.queries.iter().position(|job| job.id == e.query_id)
        {
            let job = self.queries.swap_remove(i);
            let _ = job.reply.send(Err(ClientError::Rejected {
                code,
                reason: e.reason.clone(),
            }));
        }
        if let Some(id) = ClientMsgId::from_slice(&e.client_msg_id)
            && let Some(item) = self.outbox.remove(&id.0)
        {
            warn!(%id, code = code.as_str_name(), reason = %e.reason, "send rejected");
            match item.waiter {
                Some(waiter) => {
                    let _ = waiter.send(Err(ClientError::Rejected {
                        code,
                        reason: e.reason.clone(),
                    }));
                }
                None => self.emit(ClientEvent::SendRejected {
                    client_msg_id: id,
                    code,
                    reason: e.reason.clone(),
                }),
            }
            self.persist_later();
        }
        if e.fatal {
            self.end_link(ending_for_error(&e));
        } else if e.client_msg_id.is_empty() {
            warn!(code = code.as_str_name(), reason = %e.reason, "server reported an error");
        }
    }

    fn on_kick(&mut self, k: pb::Kick) {
        let reason = KickReason::try_from(k.reason).unwrap_or(KickReason::Unspecified);
        warn!(reason = reason.as_str_name(), detail = %k.detail, "kicked");
        self.emit(ClientEvent::Kicked {
            reason,
            detail: k.detail.clone(),
        });
        let next = match reason {
            KickReason::Replaced | KickReason::Operator | KickReason::TokenRevoked => {
                Next::Stop(ClientError::Kicked {
                    reason,
                    detail: k.detail,
                })
            }
            KickReason::Unspecified => Next::Retry {
                floor: Duration::ZERO,
            },
        };
        self.end_link(Ending {
            reason: DisconnectReason::Kicked { reason },
            next,
        });
    }

    fn on_sync_done(&mut self, done: pb::SyncDone) {
        let Some(job) = self.syncs.front_mut().filter(|job| job.asked) else {
            debug!("SYNC_DONE nobody asked for");
            return;
        };
        job.asked = false;
        let progressed = done.next_seq > job.next;
        job.entries.extend(done.entries);
        job.next = job.next.max(done.next_seq);
        let finished = !progressed
            || (job.to != 0 && job.next >= job.to)
            // Nothing exists past the head (to = 0 means up to it).
            || job.next > done.head
            || job.entries.len() >= MAX_SYNC_ENTRIES;
        if finished && let Some(job) = self.syncs.pop_front() {
            let _ = job.reply.send(Ok(job.entries));
        }
    }

    /// The connection (or attempt) is over: schedule what comes next.
    fn end_link(&mut self, ending: Ending) {
        if matches!(self.link, Link::Stopped) {
            return;
        }
        let mut session = None;
        if let Link::Up(conn) = &mut self.link {
            conn.transport.shutdown();
            session = Some(conn.info.session_id.clone());
        }
        let was_up = session.is_some();
        self.outbox.disconnected(now());
        for job in &mut self.syncs {
            job.asked = false;
        }
        for job in &mut self.queries {
            job.asked = false;
        }
        self.reads.retain(|_, job| job.tries < READ_TRIES);
        for job in self.reads.values_mut() {
            job.sent = false;
        }
        if matches!(
            ending.reason,
            DisconnectReason::UnknownTimeout | DisconnectReason::ServerUnresponsive
        ) {
            // Prefer another server next time (not after "network dead": the path, not
            // the server, failed).
            self.server_index = self.server_index.wrapping_add(1);
        }
        self.backoff.on_disconnected(now());
        let retry_in = match ending.next {
            Next::Retry { floor } => {
                if !floor.is_zero() {
                    // A live server that names a wait (admission control's queue slot)
                    // has scheduled this client: its wait replaces the growth of the
                    // backoff, which would otherwise add seconds of jitter on top and
                    // leave a tail of stragglers long after the server has room.
                    self.backoff.reset();
                }
                let delay = self.backoff.next_delay(&mut self.rng).max(floor);
                self.link = Link::Down {
                    retry_at: now() + delay,
                };
                Some(delay)
            }
            Next::GoAway {
                delay: (min, max),
                alternate,
            } => {
                let delay = if max > min {
                    self.rng.random_range(min..=max)
                } else {
                    min
                };
                self.alternate = alternate;
                self.link = Link::Down {
                    retry_at: now() + delay,
                };
                Some(delay)
            }
            Next::Stop(error) => {
                self.link = Link::Stopped;
                self.stop = Some(error);
                None
            }
        };
        if was_up {
            self.ch.status.send_replace(ConnState::Connecting);
        }
        warn!(reason = %ending.reason, ?session, ?retry_in, "disconnected");
        self.emit(ClientEvent::Disconnected {
            reason: ending.reason,
            retry_in,
        });
    }

    /// Graceful close: persist, let the last ACK leave, close the connection.
    async fn close(&mut self) {
        if matches!(self.link, Link::Stopped) {
            return;
        }
        self.on_ack_request();
        self.persist().await;
        self.pump_ack_only();
        let was_up = matches!(self.link, Link::Up(_));
        if let Link::Up(conn) = &mut self.link {
            let _ = tokio::time::timeout(CLOSE_FLUSH, flush(&mut conn.transport)).await;
            conn.transport.shutdown();
        }
        self.link = Link::Stopped;
        self.stop = Some(ClientError::Closed);
        if was_up {
            info!("closed");
            self.emit(ClientEvent::Disconnected {
                reason: DisconnectReason::LocalClose,
                retry_in: None,
            });
        }
    }

    fn pump_ack_only(&mut self) {
        if let Link::Up(conn) = &mut self.link
            && self.persisted_acked > conn.acked_sent
        {
            conn.acked_sent = self.persisted_acked;
            let ack = Frame::Ack(pb::Ack {
                seq: self.persisted_acked,
            });
            self.send_frame(&ack);
        }
        // Read receipts are not kept across runs: the last chance is now.
        let reads: Vec<Frame> = self
            .reads
            .values_mut()
            .filter(|job| !job.sent)
            .map(|job| {
                job.sent = true;
                Frame::Receipt(pb::Receipt {
                    conversation: job.conversation.clone(),
                    read_up_to: job.seq,
                    message_id: job.message_id,
                    incoming: job.incoming,
                })
            })
            .collect();
        for frame in reads {
            self.send_frame(&frame);
        }
    }

    /// The client is done: final persist, then every waiter learns why.
    async fn finish(&mut self) {
        let error = self.stop.take().unwrap_or(ClientError::Closed);
        self.on_ack_request();
        self.persist().await;
        // The sends stay in the state file; their callers learn they are unconfirmed.
        for (_, item) in self.outbox.drain() {
            if let Some(waiter) = item.waiter {
                let _ = waiter.send(Err(error.clone()));
            }
        }
        for job in self.syncs.drain(..) {
            let _ = job.reply.send(Err(error.clone()));
        }
        for job in self.queries.drain(..) {
            let _ = job.reply.send(Err(error.clone()));
        }
        self.hand_over();
        info!(%error, "client stopped");
        self.ch
            .status
            .send_replace(ConnState::Stopped(error.clone()));
        self.emit(ClientEvent::Stopped(error));
    }
}

/// Polls the link without borrowing the rest of the driver.
fn poll_link(link: &mut Link, cx: &mut Context<'_>) -> Poll<LinkEvent> {
    match link {
        Link::Connecting { attempt, .. } => attempt.as_mut().poll(cx).map(LinkEvent::Handshake),
        Link::Up(conn) => {
            if conn.transport.flush_pending() {
                match conn.transport.poll_flush(cx) {
                    Poll::Ready(Err(e)) => {
                        return Poll::Ready(LinkEvent::Ended(transport_ending(e)));
                    }
                    Poll::Ready(Ok(())) => return Poll::Ready(LinkEvent::Drained),
                    Poll::Pending => {}
                }
            }
            match conn.transport.poll_recv(cx) {
                Poll::Ready(Ok(Some(raw))) => Poll::Ready(LinkEvent::Frame(raw)),
                Poll::Ready(Ok(None)) => Poll::Ready(LinkEvent::Ended(closed_by_server())),
                Poll::Ready(Err(e)) => Poll::Ready(LinkEvent::Ended(transport_ending(e))),
                Poll::Pending => Poll::Pending,
            }
        }
        Link::Down { .. } | Link::Stopped => Poll::Pending,
    }
}

/// The next side-probe result; pending forever without a smart heartbeat.
async fn smart_result(smart: &mut Option<Box<Smart>>) -> (u64, SideResult) {
    match smart {
        Some(s) => match s.results_rx.recv().await {
            Some(r) => r,
            None => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// The smart heartbeat's key for a network id: NATs time UDP mappings (QUIC) apart from
/// TCP ones (TCP, TLS, WebSocket), so each path kind learns its own interval.
fn network_key(id: &str, servers: &[String]) -> NetworkKey {
    let udp = servers.first().is_some_and(|s| s.starts_with("quic://"));
    NetworkKey::new(id, if udp { "udp" } else { "tcp" })
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// Connect, HELLO, and wait for WELCOME, all within `timeout` each.
async fn handshake(
    connector: Arc<dyn Connector>,
    server: String,
    hello: pb::Hello,
    timeout: Duration,
) -> Result<Handshake, AttemptError> {
    let mut transport = match tokio::time::timeout(timeout, connector.connect(&server)).await {
        Ok(Ok(transport)) => transport,
        Ok(Err(e)) if crate::connector::certificate_refused(&e) => {
            let detail = e.to_string();
            return Err(AttemptError::Ended(Ending {
                reason: DisconnectReason::TlsRefused {
                    detail: detail.clone(),
                },
                next: Next::Stop(ClientError::Tls(detail)),
            }));
        }
        Ok(Err(e)) => return Err(AttemptError::Connect(e.to_string())),
        Err(_) => {
            return Err(AttemptError::Connect(format!(
                "connect timed out after {timeout:?}"
            )));
        }
    };
    match tokio::time::timeout(timeout, exchange_hello(&mut transport, hello)).await {
        Ok(Ok(welcome)) => Ok(Handshake { transport, welcome }),
        Ok(Err(ending)) => Err(AttemptError::Ended(ending)),
        Err(_) => Err(AttemptError::Ended(Ending {
            reason: DisconnectReason::UnknownTimeout,
            next: Next::Retry {
                floor: Duration::ZERO,
            },
        })),
    }
}

async fn exchange_hello(
    transport: &mut BoxTransport,
    hello: pb::Hello,
) -> Result<pb::Welcome, Ending> {
    transport
        .send(&Frame::Hello(hello))
        .map_err(transport_ending)?;
    flush(transport).await.map_err(transport_ending)?;
    loop {
        let raw = match recv(transport).await {
            Ok(Some(raw)) => raw,
            Ok(None) => return Err(closed_by_server()),
            Err(e) => return Err(transport_ending(e)),
        };
        let frame = match frame::from_raw(&raw) {
            Ok(frame) => frame,
            Err(DecodeError::UnknownIgnorable(_)) => continue,
            Err(e) => return Err(protocol_error(e.to_string())),
        };
        match frame {
            Frame::Welcome(welcome) => return Ok(welcome),
            Frame::Error(e) if e.fatal => return Err(ending_for_error(&e)),
            Frame::Error(e) => {
                let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
                if code == ErrorCode::InboxEpochChanged || code == ErrorCode::ResumeCompacted {
                    info!(code = code.as_str_name(), reason = %e.reason, "resuming at WELCOME.start_seq");
                } else {
                    warn!(code = code.as_str_name(), reason = %e.reason, "server error before WELCOME");
                }
            }
            Frame::Ping(_) => {
                transport
                    .send(&Frame::Pong(pb::Pong::default()))
                    .map_err(transport_ending)?;
                flush(transport).await.map_err(transport_ending)?;
            }
            Frame::Pong(_) => {}
            Frame::GoAway(g) => return Err(go_away_ending(g)),
            Frame::Kick(k) => {
                let reason = KickReason::try_from(k.reason).unwrap_or(KickReason::Unspecified);
                return Err(Ending {
                    reason: DisconnectReason::Kicked { reason },
                    next: Next::Stop(ClientError::Kicked {
                        reason,
                        detail: k.detail,
                    }),
                });
            }
            other => {
                return Err(protocol_error(format!(
                    "unexpected {} before WELCOME",
                    kind::name(kind_of(&other))
                )));
            }
        }
    }
}

/// The SEND frame of a pending send.
/// The frame an outbox item goes out as: a GROUP for a membership change, else a SEND
/// to a user or (for `g:<group>`) to a group.
fn send_frame(send: &PendingSend) -> Frame {
    let client_msg_id = bytes::Bytes::copy_from_slice(&send.client_msg_id.0);
    if let Some(group) = &send.group {
        return Frame::GroupChange(pb::GroupChange {
            client_msg_id,
            group: send.to.clone(),
            op: match group.op {
                GroupAction::Create => pb::GroupOp::Create,
                GroupAction::Add => pb::GroupOp::Add,
                GroupAction::Remove => pb::GroupOp::Remove,
                GroupAction::Leave => pb::GroupOp::Leave,
            } as i32,
            members: group.members.clone(),
            name: group.name.clone(),
        });
    }
    let target = match tether_proto::conversation_group(&send.to) {
        Some(group) => pb::send::Target::Group(group.to_owned()),
        None => pb::send::Target::User(send.to.clone()),
    };
    Frame::Send(pb::Send {
        client_msg_id,
        target: Some(target),
        body: send.body.clone(),
        content_type: send.content_type.clone(),
    })
}

/// What a fatal ERROR means for the client.
fn ending_for_error(e: &pb::Error) -> Ending {
    let code = ErrorCode::try_from(e.code).unwrap_or(ErrorCode::Unspecified);
    let reason = e.reason.clone();
    match code {
        ErrorCode::AuthFailed => Ending {
            reason: DisconnectReason::AuthFailed,
            next: Next::Stop(ClientError::AuthFailed(reason)),
        },
        // Reconnecting would be refused the same way.
        ErrorCode::UnsupportedVersion
        | ErrorCode::StaleDeviceEpoch
        | ErrorCode::ResumeAheadOfHead => Ending {
            reason: DisconnectReason::ClosedByServer { code: Some(code) },
            next: Next::Stop(ClientError::Refused { code, reason }),
        },
        _ => Ending {
            reason: DisconnectReason::ClosedByServer { code: Some(code) },
            next: Next::Retry {
                floor: Duration::from_millis(e.retry_after_ms.into()),
            },
        },
    }
}

fn go_away_ending(g: pb::GoAway) -> Ending {
    let min = Duration::from_millis(g.min_delay_ms.into());
    let max = Duration::from_millis(g.max_delay_ms.into()).max(min);
    Ending {
        reason: DisconnectReason::GoingAway,
        next: Next::GoAway {
            delay: (min, max),
            alternate: (!g.alternate_address.is_empty()).then_some(g.alternate_address),
        },
    }
}

fn closed_by_server() -> Ending {
    Ending {
        reason: DisconnectReason::ClosedByServer { code: None },
        next: Next::Retry {
            floor: Duration::ZERO,
        },
    }
}

fn protocol_error(detail: String) -> Ending {
    warn!(%detail, "protocol error");
    Ending {
        reason: DisconnectReason::ProtocolError { detail },
        next: Next::Retry {
            floor: Duration::ZERO,
        },
    }
}

fn transport_ending(e: TransportError) -> Ending {
    let reason = match e {
        TransportError::Io(_) | TransportError::Closed | TransportError::Truncated(_) => {
            DisconnectReason::NetworkDead
        }
        TransportError::Frame(_)
        | TransportError::BadPreamble
        | TransportError::Decode(_)
        | TransportError::WrongMessageType(_) => DisconnectReason::ProtocolError {
            detail: e.to_string(),
        },
    };
    Ending {
        reason,
        next: Next::Retry {
            floor: Duration::ZERO,
        },
    }
}

fn ms_or(ms: u32, default: Duration) -> Duration {
    if ms > 0 {
        Duration::from_millis(ms.into())
    } else {
        default
    }
}

fn duration_ms_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}
