//! The single commit path (DESIGN §6): the only place seqs are assigned.
//!
//! Connections submit sends; one commit thread drains everything submitted while the
//! previous batch was being made durable and commits it as one store transaction
//! (group commit). Only then does it answer each sender (SEND_ACK, or the original
//! SEND_ACK for a duplicate) and notify the heads of the inboxes it touched; DELIVER
//! follows from those notifications (position streaming), so nothing is acknowledged
//! or delivered before it is durable.
//!
//! Device cursors (moved by ACKs and logins) are coalesced here too and written in the
//! same thread at most every [`CURSOR_FLUSH_INTERVAL`]: a lost cursor only means a
//! redelivery, which clients drop by seq.
//!
//! Compaction ([`Retention`]) runs on this thread as well, every
//! [`Retention::interval`], after writing every pending cursor: entries held back by a
//! device that just logged in must not be removed under it.

use crate::metrics::Metrics;
use crate::registry::{Registry, Session};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tether_proto::{Frame, frame, pb};
use tether_store::{
    Action, AppendOutcome, AppendRequest, CompactPolicy, DeviceCursor, Refuse, Store,
};
use tracing::{error, info};

/// How often pending cursor moves are written (in chunks, see [`CURSOR_CHUNK`]).
pub const CURSOR_FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Most cursors written per turn of the commit loop: the loop is the single writer, so
/// one big cursor write would stall every send behind it (measured: 1,000 cursors at
/// once put 40 ms into the p99.9 of message latency). Chunks keep each stall short.
pub const CURSOR_CHUNK: usize = 128;

/// A send (or group change, or read receipt) waiting for its commit.
#[derive(Debug)]
pub struct CommitRequest {
    /// What to store.
    pub append: AppendRequest,
    /// Whom to answer: SEND_ACK or ERROR for messages and group changes; for a read
    /// receipt only an ERROR if it was refused (every request gets one reply, maybe
    /// empty, which releases its in-flight slot).
    pub reply_to: Arc<Session>,
    /// When the connection submitted it (commit latency is measured from here).
    pub submitted: Instant,
}

/// The protocol error code for a refused operation.
pub fn refusal_code(code: Refuse) -> pb::ErrorCode {
    match code {
        Refuse::Forbidden => pb::ErrorCode::Forbidden,
        Refuse::GroupFull => pb::ErrorCode::GroupFull,
        Refuse::NotFound => pb::ErrorCode::NotFound,
        Refuse::Conflict => pb::ErrorCode::Conflict,
        Refuse::BadRequest => pb::ErrorCode::BadRequest,
    }
}

// `Stop` is sent once; boxing every request to shrink it would cost an allocation per
// send.
#[allow(clippy::large_enum_variant)]
enum Command {
    Append(CommitRequest),
    Stop,
}

type CursorKey = (Arc<str>, Box<str>);

/// Handle to the commit thread.
pub struct CommitPath {
    tx: Mutex<mpsc::Sender<Command>>,
    cursors: Arc<Mutex<HashMap<CursorKey, DeviceCursor>>>,
    delivered: Arc<Mutex<HashMap<Arc<str>, u64>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for CommitPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommitPath")
    }
}

impl CommitPath {
    /// Starts the commit thread.
    pub fn start(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        max_batch: usize,
        retention: Retention,
    ) -> Self {
        let (tx, rx) = mpsc::channel();
        let cursors: Arc<Mutex<HashMap<CursorKey, DeviceCursor>>> = Default::default();
        let delivered: Arc<Mutex<HashMap<Arc<str>, u64>>> = Default::default();
        let worker = CommitWorker {
            store,
            registry,
            metrics,
            cursors: cursors.clone(),
            delivered: delivered.clone(),
            max_batch: max_batch.max(1),
            retention,
        };
        let thread = std::thread::Builder::new()
            .name("tether-commit".into())
            .spawn(move || worker.run(rx))
            .ok();
        Self {
            tx: Mutex::new(tx),
            cursors,
            delivered,
            thread: Mutex::new(thread),
        }
    }

    /// Queues a send for the next group commit. The answer arrives as a reply frame
    /// on `reply_to`. Returns false if the commit path has stopped.
    pub fn submit(&self, request: CommitRequest) -> bool {
        self.tx.lock().send(Command::Append(request)).is_ok()
    }

    /// Records that a device holds everything up to `cursor.acked_seq`.
    pub fn move_cursor(&self, user: &Arc<str>, device: &str, cursor: DeviceCursor) {
        let mut map = self.cursors.lock();
        let slot = map.entry((user.clone(), device.into())).or_insert(cursor);
        if cursor.inbox_epoch != slot.inbox_epoch || cursor.acked_seq >= slot.acked_seq {
            *slot = cursor;
        }
    }

    /// Records that a device of `user` holds its inbox up to `seq`: delivered receipts
    /// for what that newly covers are committed with the next batch (coalesced per
    /// user; the store keeps the user's delivered mark, so nothing is written twice).
    pub fn delivered(&self, user: &Arc<str>, seq: u64) {
        if seq == 0 {
            return;
        }
        let mut map = self.delivered.lock();
        let slot = map.entry(user.clone()).or_default();
        *slot = (*slot).max(seq);
    }

    /// Drops a cursor move not yet written, so it cannot bring back the cursor of a
    /// device being evicted.
    pub fn forget_cursor(&self, user: &Arc<str>, device: &str) {
        self.cursors.lock().remove(&(user.clone(), device.into()));
    }

    /// Commits what was submitted so far, writes pending cursors and stops the thread.
    pub fn stop(&self) {
        let _ = self.tx.lock().send(Command::Stop);
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

struct CommitWorker {
    store: Arc<dyn Store>,
    registry: Arc<Registry>,
    metrics: Arc<Metrics>,
    cursors: Arc<Mutex<HashMap<CursorKey, DeviceCursor>>>,
    delivered: Arc<Mutex<HashMap<Arc<str>, u64>>>,
    max_batch: usize,
    retention: Retention,
}

/// What compaction keeps, run by the commit thread every [`Retention::interval`].
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// Messages and their dedup keys older than this are removed (the dedup window).
    pub messages: Duration,
    /// Device cursors not seen for this long are removed.
    pub devices: Duration,
    /// Messages every live device of the inbox's user has acknowledged are removed
    /// too, before retention (see [`CompactPolicy::remove_acked`]).
    pub acked: bool,
    /// How often compaction runs.
    pub interval: Duration,
}

/// Wall-clock ms since the Unix epoch, `age` ago (cursor and entry times are in these).
pub(crate) fn unix_ms_before(age: Duration) -> u64 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    now.saturating_sub(age.as_millis() as u64)
}

impl CommitWorker {
    fn run(self, rx: mpsc::Receiver<Command>) {
        let mut appends = Vec::with_capacity(self.max_batch);
        let mut waiting = Vec::with_capacity(self.max_batch);
        let mut last_cursor_flush = Instant::now();
        let mut flushing: Vec<(CursorKey, DeviceCursor)> = Vec::new();
        let mut last_compaction = Instant::now();
        let mut stopping = false;
        while !stopping {
            let mut idle = false;
            match rx.recv_timeout(CURSOR_FLUSH_INTERVAL) {
                Ok(Command::Append(r)) => {
                    appends.push(r.append);
                    waiting.push((r.reply_to, r.submitted));
                }
                Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => stopping = true,
                Err(RecvTimeoutError::Timeout) => idle = true,
            }
            // Everything that arrived while the previous commit was syncing joins this one.
            while !stopping && appends.len() < self.max_batch {
                match rx.try_recv() {
                    Ok(Command::Append(r)) => {
                        appends.push(r.append);
                        waiting.push((r.reply_to, r.submitted));
                    }
                    Ok(Command::Stop) => stopping = true,
                    Err(_) => break,
                }
            }
            let marks = self.take_delivered(&mut appends);
            if !appends.is_empty() {
                self.commit(&appends, &mut waiting, marks);
                appends.clear();
                waiting.clear();
            }
            // A round takes every cursor moved since the last one, then writes it a
            // chunk per turn of the loop; moves arriving meanwhile wait for the next round.
            if flushing.is_empty()
                && (stopping || last_cursor_flush.elapsed() >= CURSOR_FLUSH_INTERVAL)
            {
                flushing.extend(std::mem::take(&mut *self.cursors.lock()));
                last_cursor_flush = Instant::now();
            }
            let chunk = if stopping { usize::MAX } else { CURSOR_CHUNK };
            self.write_cursors(&mut flushing, chunk);
            if flushing.is_empty() && flushing.capacity() > CURSOR_CHUNK {
                // A login storm's round held a cursor per device (56 B each): kept, its
                // capacity would be billed to every idle session from then on.
                flushing = Vec::new();
            }
            let pending = flushing.len() + self.cursors.lock().len();
            self.metrics.cursor_writes_pending.set(pending as i64);
            if idle
                && pending == 0
                && let Err(e) = self.store.idle()
            {
                error!(error = %e, "store housekeeping failed");
            }
            if !stopping && last_compaction.elapsed() >= self.retention.interval {
                // Compaction must see where every device is, including one that just
                // logged in and holds entries back: write every pending cursor first.
                self.write_cursors(&mut flushing, usize::MAX);
                flushing.extend(std::mem::take(&mut *self.cursors.lock()));
                self.write_cursors(&mut flushing, usize::MAX);
                last_cursor_flush = Instant::now();
                // Compaction never passes a delivered mark: write the pending ones.
                let marks = self.take_delivered(&mut appends);
                if marks > 0 {
                    self.commit(&appends, &mut waiting, marks);
                    appends.clear();
                    waiting.clear();
                }
                self.compact();
                last_compaction = Instant::now();
            }
        }
        if let Err(e) = self.store.sync() {
            error!(error = %e, "final store sync failed");
        }
        info!("commit path stopped");
    }

    /// Appends the pending delivered marks to the batch (after the requests that have
    /// a waiter); returns how many.
    fn take_delivered(&self, appends: &mut Vec<AppendRequest>) -> usize {
        let marks = std::mem::take(&mut *self.delivered.lock());
        let n = marks.len();
        let ts_ms = unix_ms_before(Duration::ZERO);
        appends.extend(marks.into_iter().map(|(user, seq)| AppendRequest {
            sender: user.to_string(),
            sender_device: String::new(),
            client_msg_id: [0; 16],
            action: Action::Delivered { up_to_seq: seq },
            body: bytes::Bytes::new(),
            content_type: String::new(),
            ts_ms,
        }));
        n
    }

    /// Commits `appends`: the first `waiting.len()` have a session to answer, the last
    /// `marks` are delivered marks.
    fn commit(
        &self,
        appends: &[AppendRequest],
        waiting: &mut [(Arc<Session>, Instant)],
        marks: usize,
    ) {
        let started = Instant::now();
        let outcomes = match self.store.append(appends) {
            Ok(outcomes) => outcomes,
            Err(e) => {
                error!(error = %e, batch = appends.len(), "commit failed; senders will retry");
                for (append, (session, _)) in appends.iter().zip(waiting.iter()) {
                    let mut err = frame::error(
                        pb::ErrorCode::Internal,
                        format!("commit failed: {e}"),
                        false,
                    );
                    if let Frame::Error(ref mut inner) = err {
                        inner.client_msg_id = bytes::Bytes::copy_from_slice(&append.client_msg_id);
                    }
                    session.push_reply(Some(err));
                }
                // The marks are not lost: the store still has the old ones, and the
                // next ACK (or login) of each user covers the range again.
                return;
            }
        };
        let done = Instant::now();
        self.metrics
            .observe_batch(appends.len() - marks, done - started);
        let mut heads: HashMap<&str, u64> = HashMap::new();
        let mut new = 0u64;
        let mut answers = waiting.iter();
        for (append, outcome) in appends.iter().zip(&outcomes) {
            if let AppendOutcome::New { heads: h, .. } = outcome {
                for (user, head) in h {
                    let slot = heads.entry(user.as_str()).or_default();
                    *slot = (*slot).max(*head);
                }
            }
            let Some((session, submitted)) = answers.next() else {
                // A delivered mark; one that stopped short (a long range is scanned a
                // bounded piece per batch) goes on with the next batch.
                if let (Action::Delivered { up_to_seq }, AppendOutcome::New { ack, .. }) =
                    (&append.action, outcome)
                    && ack.sender_seq < *up_to_seq
                {
                    let mut map = self.delivered.lock();
                    let slot = map.entry(Arc::from(append.sender.as_str())).or_default();
                    *slot = (*slot).max(*up_to_seq);
                }
                continue;
            };
            let answers_a_send = !matches!(append.action, Action::Read(_));
            let (ack, duplicate) = match outcome {
                AppendOutcome::New { ack, .. } => {
                    new += u64::from(answers_a_send);
                    (ack, false)
                }
                AppendOutcome::Duplicate(ack) => {
                    self.metrics.duplicates.inc();
                    (ack, true)
                }
                AppendOutcome::Refused { code, reason } => {
                    self.metrics.protocol_errors.inc();
                    let mut err = frame::error(refusal_code(*code), reason.clone(), false);
                    if let Frame::Error(ref mut inner) = err
                        && answers_a_send
                    {
                        inner.client_msg_id = bytes::Bytes::copy_from_slice(&append.client_msg_id);
                    }
                    session.push_reply(Some(err));
                    continue;
                }
            };
            if !answers_a_send {
                session.push_reply(None);
                continue;
            }
            self.metrics.observe_commit_latency(done - *submitted);
            session.push_reply(Some(Frame::SendAck(pb::SendAck {
                client_msg_id: bytes::Bytes::copy_from_slice(&append.client_msg_id),
                message_id: ack.message_id,
                seq: ack.sender_seq,
                ts_ms: ack.ts_ms,
                duplicate,
            })));
        }
        self.metrics.messages_committed.inc_by(new);
        for (user, head) in heads {
            self.registry.notify_head(user, head);
        }
    }

    fn compact(&self) {
        let policy = CompactPolicy {
            entries_before_ms: unix_ms_before(self.retention.messages),
            devices_before_ms: unix_ms_before(self.retention.devices),
            remove_acked: self.retention.acked,
        };
        match self.store.compact(&policy) {
            Ok(stats) => info!(
                ?stats,
                acked = policy.remove_acked,
                "compacted messages past retention or held by every device, and idle devices"
            ),
            Err(e) => error!(error = %e, "compaction failed"),
        }
    }

    /// Writes up to `max` cursors of the current round.
    fn write_cursors(&self, round: &mut Vec<(CursorKey, DeviceCursor)>, max: usize) {
        if round.is_empty() {
            return;
        }
        let take = round.len().min(max);
        let batch: Vec<(String, String, DeviceCursor)> = round
            .drain(round.len() - take..)
            .map(|((u, d), c)| (u.to_string(), d.into_string(), c))
            .collect();
        if let Err(e) = self.store.set_cursors(&batch) {
            error!(error = %e, "writing device cursors failed; devices may see redeliveries");
        }
    }
}
