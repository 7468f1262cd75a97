//! The app-facing handles: [`Client`] (owns the entry stream) and [`ClientHandle`]
//! (cloneable: send, ack, sync, status, events). Both only talk to the driver task
//! through bounded channels; no protocol logic lives here.

use crate::config::ClientConfig;
use crate::driver::{Control, Driver, ReadJob, SendRequest};
use crate::error::{ClientError, DisconnectReason};
use crate::state::{ClientMsgId, GroupAction, GroupRequest, PendingSend, StateFile};
use bytes::Bytes;
use parking_lot::Mutex;
use std::ops::Deref;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tether_proto::pb::{self, ErrorCode, KickReason};
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// One inbox entry, as delivered by the server.
pub type Entry = pb::Entry;

/// What a receipt entry (`EntryType::Receipt`) says, if `entry` is one.
pub fn receipt_of(entry: &Entry) -> Option<pb::ReceiptBody> {
    (entry.r#type == pb::EntryType::Receipt as i32)
        .then(|| prost::Message::decode(entry.body.as_ref()).ok())
        .flatten()
}

/// What a membership entry (`EntryType::Membership`) says, if `entry` is one.
pub fn group_event_of(entry: &Entry) -> Option<pb::GroupEvent> {
    (entry.r#type == pb::EntryType::Membership as i32)
        .then(|| prost::Message::decode(entry.body.as_ref()).ok())
        .flatten()
}

/// Capacity of the event channel; a subscriber that lags further loses the oldest.
const EVENT_CAPACITY: usize = 1024;
/// Send requests queued towards the driver before `send` waits.
const SEND_QUEUE: usize = 1024;

/// The server's confirmation that a send is durably committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendAck {
    /// The client message id of the send.
    pub client_msg_id: ClientMsgId,
    /// Server-assigned message id.
    pub message_id: u64,
    /// Seq of the copy in the sender's own inbox.
    pub seq: u64,
    /// Server timestamp, ms since the Unix epoch.
    pub ts_ms: u64,
    /// The server already had this send (an earlier try was committed): nothing new
    /// was written.
    pub duplicate: bool,
}

/// Counters of what the SDK did, for monitoring and tests; see [`ClientHandle::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClientStats {
    /// Sessions established (WELCOME received).
    pub sessions: u64,
    /// SEND frames written, first tries and resends.
    pub sends_transmitted: u64,
    /// SEND_ACKs saying the send was a duplicate of a committed one.
    pub duplicate_acks: u64,
    /// Entries dropped because they were already handed to the app (replays after a
    /// reconnect).
    pub replays_dropped: u64,
}

/// The driver's side of [`ClientStats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub sessions: AtomicU64,
    pub sends_transmitted: AtomicU64,
    pub duplicate_acks: AtomicU64,
    pub replays_dropped: AtomicU64,
}

impl Counters {
    pub(crate) fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// A send accepted into the outbox; [`SendTicket::outcome`] waits for the server's answer.
/// Dropping it does not cancel the send.
#[derive(Debug)]
pub struct SendTicket {
    reply: oneshot::Receiver<Result<SendAck, ClientError>>,
    status: watch::Receiver<ConnState>,
}

impl SendTicket {
    /// The SEND_ACK, or why there is none (rejected, unconfirmed, client stopped).
    pub async fn outcome(self) -> Result<SendAck, ClientError> {
        match self.reply.await {
            Ok(outcome) => outcome,
            Err(_) => Err(match &*self.status.borrow() {
                ConnState::Stopped(e) => e.clone(),
                _ => ClientError::Closed,
            }),
        }
    }
}

/// What WELCOME announced about a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    /// The server address this session is on.
    pub server: String,
    /// Server-assigned session id.
    pub session_id: String,
    /// The authenticated user.
    pub user_id: String,
    /// Server clock at WELCOME, ms since the Unix epoch.
    pub server_time_ms: u64,
    /// Inbox epoch the cursor now belongs to.
    pub inbox_epoch: u64,
    /// First seq delivered on this session.
    pub start_seq: u64,
    /// Inbox head at WELCOME.
    pub head: u64,
    /// Heartbeat interval in force.
    pub heartbeat_interval: Duration,
    /// How long the server remembers client message ids.
    pub dedup_window: Duration,
    /// Largest frame either side may send.
    pub max_frame: usize,
}

/// Where the client stands.
#[derive(Debug, Clone)]
pub enum ConnState {
    /// Connecting, or waiting to reconnect.
    Connecting,
    /// A session is up.
    Connected(SessionInfo),
    /// The client stopped for good (kicked, auth failed, closed, ...).
    Stopped(ClientError),
}

/// Something the app may want to know; see [`ClientHandle::events`].
#[derive(Debug, Clone)]
pub enum ClientEvent {
    /// A session is up (after every reconnect too).
    Connected(SessionInfo),
    /// A connection attempt failed before reaching the server.
    ConnectFailed {
        /// The server tried.
        server: String,
        /// What failed.
        detail: String,
        /// When the next attempt starts.
        retry_in: Duration,
    },
    /// A connection ended.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
        /// When the next attempt starts; `None` if the client stops.
        retry_in: Option<Duration>,
    },
    /// The server kicked this login.
    Kicked {
        /// Why.
        reason: KickReason,
        /// The server's explanation.
        detail: String,
    },
    /// The inbox epoch changed: the cursor restarted at `start_seq` and entries of the
    /// old epoch not yet handed over were discarded.
    InboxReset {
        /// Previous epoch.
        old_epoch: u64,
        /// New epoch.
        new_epoch: u64,
        /// Where delivery restarts.
        start_seq: u64,
    },
    /// Entries `from..=to` were removed by the server's retention before this device
    /// fetched them; delivery continues after them.
    EntriesExpired {
        /// First entry lost.
        from: u64,
        /// Last entry lost.
        to: u64,
    },
    /// A send nobody waits for (restored from the state file) was confirmed.
    SendAcked(SendAck),
    /// A send nobody waits for (restored from the state file) was rejected.
    SendRejected {
        /// Which send.
        client_msg_id: ClientMsgId,
        /// The server's error code.
        code: ErrorCode,
        /// The server's explanation.
        reason: String,
    },
    /// A send nobody waits for (restored from the state file) was given up: it is
    /// *unconfirmed* (see [`ClientError::Unconfirmed`]).
    SendUnconfirmed {
        /// Which send.
        client_msg_id: ClientMsgId,
        /// Why.
        reason: tether_core::outbox::GiveUp,
    },
    /// A smart heartbeat decision (DESIGN §5): probes, their outcomes, interval changes,
    /// convergence, step-downs, network switches.
    Smart(crate::smart::SmartEvent),
    /// A heartbeat PING left, on the main connection or a side probe, after `idle` of
    /// silence on that connection.
    Ping {
        /// On a side probe connection.
        probe: bool,
        /// Silence before it.
        idle: Duration,
    },
    /// A PONG answered the PING that broke a silence of `idle`.
    Pong {
        /// On a side probe connection.
        probe: bool,
        /// Silence before the PING.
        idle: Duration,
        /// PING → PONG.
        rtt: Duration,
    },
    /// The client stopped for good.
    Stopped(ClientError),
}

/// A cloneable handle to a running client: everything but receiving entries.
#[derive(Debug, Clone)]
pub struct ClientHandle {
    sends: mpsc::Sender<SendRequest>,
    controls: mpsc::Sender<Control>,
    acks: Arc<watch::Sender<u64>>,
    status: watch::Receiver<ConnState>,
    events: broadcast::Sender<ClientEvent>,
    first_events: Arc<Mutex<Option<broadcast::Receiver<ClientEvent>>>>,
    counters: Arc<Counters>,
}

/// A running client: a background driver task plus this handle. Derefs to
/// [`ClientHandle`] for sending, acking and syncing.
#[derive(Debug)]
pub struct Client {
    handle: ClientHandle,
    entries: mpsc::Receiver<Entry>,
    auto_ack: bool,
    driver: JoinHandle<()>,
}

impl Client {
    /// Loads the state file (if configured), spawns the driver task and returns at once;
    /// connecting happens in the background. Must be called inside a tokio runtime.
    pub fn start(config: ClientConfig) -> Result<Client, ClientError> {
        config.validate()?;
        if tokio::runtime::Handle::try_current().is_err() {
            return Err(ClientError::InvalidConfig(
                "Client::start must be called inside a tokio runtime".into(),
            ));
        }
        let state = match &config.state_path {
            Some(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| ClientError::StateFile {
                        path: path.clone(),
                        detail: format!("cannot create its directory: {e}"),
                    })?;
                }
                StateFile::load(path)
                    .map_err(|e| ClientError::StateFile {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?
                    .unwrap_or_default()
            }
            None => StateFile::default(),
        };
        let (sends_tx, sends_rx) = mpsc::channel(SEND_QUEUE);
        let (controls_tx, controls_rx) = mpsc::channel(64);
        let acks = Arc::new(watch::Sender::new(0u64));
        let (status_tx, status_rx) = watch::channel(ConnState::Connecting);
        let (events_tx, first_events) = broadcast::channel(EVENT_CAPACITY);
        let (entries_tx, entries_rx) = mpsc::channel(config.entry_buffer);
        let auto_ack = config.auto_ack;
        let counters = Arc::new(Counters::default());
        let driver = Driver::new(
            config,
            state,
            crate::driver::Channels {
                sends: sends_rx,
                controls: controls_rx,
                acks: acks.subscribe(),
                ack_requests: acks.clone(),
                entries: entries_tx,
                events: events_tx.clone(),
                status: status_tx,
                counters: counters.clone(),
            },
        );
        let driver = tokio::spawn(driver.run());
        Ok(Client {
            handle: ClientHandle {
                sends: sends_tx,
                controls: controls_tx,
                acks,
                status: status_rx,
                events: events_tx,
                first_events: Arc::new(Mutex::new(Some(first_events))),
                counters,
            },
            entries: entries_rx,
            auto_ack,
            driver,
        })
    }

    /// The next inbox entry, exactly once and in seq order; `None` once the client
    /// has stopped and every entry was taken. Cancel-safe. With `auto_ack` the entry
    /// is acknowledged as it is returned; otherwise call [`ClientHandle::ack`].
    pub async fn recv(&mut self) -> Option<Entry> {
        let entry = self.entries.recv().await?;
        if self.auto_ack {
            self.handle.ack(entry.seq);
        }
        Some(entry)
    }

    /// A cloneable handle, e.g. to send from another task while this one receives.
    pub fn handle(&self) -> ClientHandle {
        self.handle.clone()
    }

    /// Closes gracefully: persists the state, flushes pending ACKs, closes the
    /// connection and waits for the driver to finish. Unconfirmed sends stay in the
    /// state file and are resent by the next start.
    pub async fn close(self) {
        let _ = self.handle.controls.send(Control::Close).await;
        drop(self.entries);
        let _ = self.driver.await;
    }
}

impl Deref for Client {
    type Target = ClientHandle;

    fn deref(&self) -> &ClientHandle {
        &self.handle
    }
}

impl ClientHandle {
    /// Sends `body` to user `to` with a fresh client message id and no content type;
    /// resolves once the server confirms it durably committed.
    pub async fn send(&self, to: &str, body: Bytes) -> Result<SendAck, ClientError> {
        self.send_with_id(ClientMsgId::generate(), to, body, "")
            .await
    }

    /// Sends with an explicit client message id and content type. The send is
    /// persisted in the outbox before it leaves, and resent with the same id after
    /// every reconnect until confirmed. Dropping the future does not cancel the send.
    pub async fn send_with_id(
        &self,
        client_msg_id: ClientMsgId,
        to: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<SendAck, ClientError> {
        self.enqueue(client_msg_id, to, body, content_type)
            .await?
            .outcome()
            .await
    }

    /// Puts a send into the outbox and returns once it is queued (waiting while the
    /// outbox is full), before the server answers: sends enqueued one after another
    /// leave, and are committed, in that order. Await [`SendTicket::outcome`] for the
    /// answer.
    pub async fn enqueue(
        &self,
        client_msg_id: ClientMsgId,
        to: &str,
        body: Bytes,
        content_type: &str,
    ) -> Result<SendTicket, ClientError> {
        if to.is_empty() {
            return Err(ClientError::InvalidRequest("send target is empty".into()));
        }
        let (reply, outcome) = oneshot::channel();
        let request = SendRequest {
            send: PendingSend {
                client_msg_id,
                to: to.to_string(),
                body,
                content_type: content_type.to_string(),
                queued_ms: 0,
                group: None,
            },
            reply,
        };
        if self.sends.send(request).await.is_err() {
            return Err(self.stop_error());
        }
        Ok(SendTicket {
            reply: outcome,
            status: self.status.clone(),
        })
    }

    /// Sends `body` to every member of `group` (the sender must be one); resolves once
    /// committed into every member's inbox. Same outbox rules as [`ClientHandle::send`].
    pub async fn send_to_group(&self, group: &str, body: Bytes) -> Result<SendAck, ClientError> {
        self.send(&tether_proto::group_conversation(group), body)
            .await
    }

    /// Creates `group` owned by this user, with `members` besides; `name` is shown to
    /// members. Resolves when committed (the membership entry is in every member's
    /// inbox). Refusals: `CONFLICT` (exists), `GROUP_FULL` (over the server's cap).
    pub async fn group_create(
        &self,
        group: &str,
        name: &str,
        members: &[&str],
    ) -> Result<SendAck, ClientError> {
        self.group_change(group, GroupAction::Create, members, name)
            .await
    }

    /// Adds `members` (any member may). They receive the group from this change on.
    pub async fn group_add(&self, group: &str, members: &[&str]) -> Result<SendAck, ClientError> {
        self.group_change(group, GroupAction::Add, members, "")
            .await
    }

    /// Removes `members` (the owner only). They receive nothing of the group after
    /// the membership entry that removes them.
    pub async fn group_remove(
        &self,
        group: &str,
        members: &[&str],
    ) -> Result<SendAck, ClientError> {
        self.group_change(group, GroupAction::Remove, members, "")
            .await
    }

    /// Leaves `group`; an owner who leaves passes ownership on.
    pub async fn group_leave(&self, group: &str) -> Result<SendAck, ClientError> {
        self.group_change(group, GroupAction::Leave, &[], "").await
    }

    async fn group_change(
        &self,
        group: &str,
        op: GroupAction,
        members: &[&str],
        name: &str,
    ) -> Result<SendAck, ClientError> {
        if !tether_proto::valid_group_id(group) {
            return Err(ClientError::InvalidRequest(format!(
                "{group:?} is not a group id (1 to 64 ASCII letters, digits, '.', '_', '-')"
            )));
        }
        let (reply, outcome) = oneshot::channel();
        let request = SendRequest {
            send: PendingSend {
                client_msg_id: ClientMsgId::generate(),
                to: group.to_string(),
                body: Bytes::new(),
                content_type: String::new(),
                queued_ms: 0,
                group: Some(GroupRequest {
                    op,
                    members: members.iter().map(|m| m.to_string()).collect(),
                    name: name.to_string(),
                }),
            },
            reply,
        };
        if self.sends.send(request).await.is_err() {
            return Err(self.stop_error());
        }
        SendTicket {
            reply: outcome,
            status: self.status.clone(),
        }
        .outcome()
        .await
    }

    /// The user has read `entry` and everything before it in its conversation: the
    /// server moves the unread count (for every device of the user), tells the user's
    /// other devices, and sends the peer a READ receipt (in a group, moves the user's
    /// read mark). Returns at once; the receipt is resent after a reconnect until the
    /// server's echo arrives. Only the newest read per conversation is kept.
    pub async fn mark_read(&self, entry: &Entry) {
        let job = ReadJob {
            conversation: entry.conversation.clone(),
            seq: entry.seq,
            message_id: entry.message_id,
            incoming: entry.incoming,
            tries: 0,
            sent: false,
        };
        let _ = self.controls.send(Control::Read(job)).await;
    }

    /// The conversations of this user's inbox (1:1 and group) with their last seq and
    /// unread count, as the server keeps them for all the user's devices.
    pub async fn conversations(&self) -> Result<Vec<pb::Conversation>, ClientError> {
        let mut all = Vec::new();
        let mut after = String::new();
        loop {
            let what = pb::query::What::Conversations(pb::ListConversations { after });
            let result = self.query(what).await?;
            let more = result.more && !result.conversations.is_empty();
            all.extend(result.conversations);
            if !more {
                return Ok(all);
            }
            after = all.last().map(|c| c.id.clone()).unwrap_or_default();
        }
    }

    /// The groups this user is a member of.
    pub async fn groups(&self) -> Result<Vec<pb::GroupSummary>, ClientError> {
        Ok(self
            .query(pb::query::What::Groups(pb::ListGroups {}))
            .await?
            .groups)
    }

    /// A group's members with their delivered and read marks (members only; others
    /// get `FORBIDDEN`). A message `m` of the group reached member `x` iff
    /// `x.delivered_up_to >= m.message_id`, and was read by it iff `x.read_up_to >= ..`.
    pub async fn group_info(&self, group: &str) -> Result<pb::GroupInfo, ClientError> {
        let what = pb::query::What::Group(pb::GetGroup {
            group: group.to_string(),
        });
        self.query(what)
            .await?
            .group
            .ok_or_else(|| ClientError::InvalidRequest("the server sent no group".into()))
    }

    /// Asks the server once connected (again after a reconnect) and waits.
    async fn query(&self, what: pb::query::What) -> Result<pb::QueryResult, ClientError> {
        let (reply, outcome) = oneshot::channel();
        if self
            .controls
            .send(Control::Query { what, reply })
            .await
            .is_err()
        {
            return Err(self.stop_error());
        }
        outcome.await.unwrap_or_else(|_| Err(self.stop_error()))
    }

    /// What the SDK has done so far.
    pub fn stats(&self) -> ClientStats {
        let c = &self.counters;
        ClientStats {
            sessions: c.sessions.load(Ordering::Relaxed),
            sends_transmitted: c.sends_transmitted.load(Ordering::Relaxed),
            duplicate_acks: c.duplicate_acks.load(Ordering::Relaxed),
            replays_dropped: c.replays_dropped.load(Ordering::Relaxed),
        }
    }

    /// The app has processed every entry up to `seq`: the driver persists the cursor
    /// and sends a cumulative ACK (coalesced; returns at once). Seqs beyond what was
    /// handed over are clamped.
    pub fn ack(&self, seq: u64) {
        self.acks.send_if_modified(|requested| {
            if seq > *requested {
                *requested = seq;
                true
            } else {
                false
            }
        });
    }

    /// Reads inbox history `[from, to)` (`to` = 0: up to the head) in bounded batches.
    /// Waits for a connection; a batch cut by a reconnect is asked again. Returns at
    /// most 100,000 entries: continue from the last seq + 1 for more.
    pub async fn sync(&self, from: u64, to: u64) -> Result<Vec<Entry>, ClientError> {
        let (reply, outcome) = oneshot::channel();
        let request = Control::Sync {
            from: from.max(1),
            to,
            reply,
        };
        if self.controls.send(request).await.is_err() {
            return Err(self.stop_error());
        }
        outcome.await.unwrap_or_else(|_| Err(self.stop_error()))
    }

    /// Switches the heartbeat interval at run time (e.g. foreground 30 s, background
    /// 5 min). A shorter one applies at once; a longer one is asked of the server with
    /// PING{next} and applies when its PONG echoes the accepted (clamped) value.
    pub async fn set_heartbeat_interval(&self, interval: Duration) {
        let _ = self.controls.send(Control::SetHeartbeat(interval)).await;
    }

    /// Tells the client the device changed networks (Wi-Fi ↔ cellular): it drops the
    /// current connection, whose path is likely gone, and reconnects at once, without
    /// waiting for the heartbeat to notice or for the backoff.
    pub async fn network_changed(&self) {
        let _ = self.controls.send(Control::NetworkChanged(None)).await;
    }

    /// Tells the client the device moved to the network `id` (an app-chosen name, e.g.
    /// a hash of the Wi-Fi SSID or the carrier): like [`Self::network_changed`], and the
    /// smart heartbeat switches to that network's learned interval at once. Over QUIC
    /// the session migrates to a fresh local socket instead of reconnecting.
    pub async fn switch_network(&self, id: impl Into<String>) {
        let _ = self
            .controls
            .send(Control::NetworkChanged(Some(id.into())))
            .await;
    }

    /// Waits until a session is up; fails at once if the client stopped.
    pub async fn wait_connected(&self, timeout: Duration) -> Result<SessionInfo, ClientError> {
        let mut status = self.status.clone();
        let wait = async {
            loop {
                match status.borrow_and_update().clone() {
                    ConnState::Connected(info) => return Ok(info),
                    ConnState::Stopped(e) => return Err(e),
                    ConnState::Connecting => {}
                }
                if status.changed().await.is_err() {
                    return Err(self.stop_error());
                }
            }
        };
        tokio::time::timeout(timeout, wait)
            .await
            .unwrap_or(Err(ClientError::Timeout))
    }

    /// Where the client stands now.
    pub fn state(&self) -> ConnState {
        self.status.borrow().clone()
    }

    /// Subscribes to events. The first call returns a receiver that has seen every
    /// event since start (nothing is missed between `start` and subscribing); later
    /// calls see events from then on. Events are advisory: a lagging receiver loses
    /// the oldest.
    pub fn events(&self) -> broadcast::Receiver<ClientEvent> {
        self.first_events
            .lock()
            .take()
            .unwrap_or_else(|| self.events.subscribe())
    }

    /// The error the client stopped with, or `Closed`.
    fn stop_error(&self) -> ClientError {
        match &*self.status.borrow() {
            ConnState::Stopped(e) => e.clone(),
            _ => ClientError::Closed,
        }
    }
}
