//! The single commit path (DESIGN §6): the only place seqs are assigned.
//!
//! Connections queue their sends here; whoever commits drains everything queued and
//! commits it as one store transaction (group commit). Only then does it answer each
//! sender (SEND_ACK, or the original SEND_ACK for a duplicate) and notify the heads of
//! the inboxes it touched; DELIVER follows from those notifications (position
//! streaming), so nothing is acknowledged or delivered before it is durable.
//!
//! Who commits: a connection that queued something commits on its own thread when it
//! has read all its input ([`CommitPath::flush`]), unless another thread is committing
//! already, which then takes the request with its next round. One committer at a time
//! (the `committer` lock), so batches still commit in queue order. A thread hop per
//! message costs more than the commit itself: on two busy cores a woken thread can
//! wait a scheduler slice (milliseconds) for a CPU, which was most of the 1:1 latency
//! tail. A connection commits at most [`LEAD_ROUNDS`] rounds, then hands over to the
//! commit thread, so its own thread goes back to its other connections; a queue longer
//! than [`INLINE_BATCH`] is handed over at once. In `fsync`
//! mode a round waits for the disk, which must not stall a connection thread: the
//! commit thread does every round ([`CommitPath::start`]).
//!
//! The commit thread also writes device cursors (moved by ACKs and logins), coalesced
//! and at most every [`CURSOR_FLUSH_INTERVAL`]: a lost cursor only means a
//! redelivery, which clients drop by seq.
//!
//! Compaction ([`Retention`]) runs on the commit thread as well, every
//! [`Retention::interval`], after writing every pending cursor: entries held back by a
//! device that just logged in must not be removed under it.

use crate::metrics::Metrics;
use crate::registry::{Registry, Session};
use parking_lot::{Condvar, Mutex};
use std::collections::HashMap;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tether_proto::{Frame, frame, pb};
use tether_store::{
    Action, AppendOutcome, AppendRequest, CompactPolicy, DeviceCursor, Durability, Refuse, Store,
};
use tracing::{error, info};

/// How often pending cursor moves are written (in chunks, see [`CURSOR_CHUNK`]).
pub const CURSOR_FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// Most cursors written per turn of the commit loop: the loop is the single writer, so
/// one big cursor write would stall every send behind it (measured: 1,000 cursors at
/// once put 40 ms into the p99.9 of message latency). Chunks keep each stall short.
pub const CURSOR_CHUNK: usize = 128;

/// Most rounds a connection's thread commits in one [`CommitPath::flush`] before it
/// hands the rest to the commit thread.
pub const LEAD_ROUNDS: usize = 2;

/// A longer queue goes to the commit thread at once: so many sends at a time are a
/// throughput load, where committing beside the connections (on another core) is worth
/// the hop, and one connection's thread would otherwise do all the reading and all the
/// committing in turn (measured: one-pair throughput 100k msg/s inline, 157k+ handed
/// over).
pub const INLINE_BATCH: usize = 32;

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

type CursorKey = (Arc<str>, Box<str>);

/// Requests waiting for a committer.
#[derive(Default)]
struct Queue {
    requests: Vec<CommitRequest>,
    /// A connection's thread gave up committing with requests left: the commit thread
    /// takes over.
    handoff: bool,
    stopped: bool,
}

struct Inner {
    queue: Mutex<Queue>,
    /// Wakes the commit thread (hand-over, stop); waited on with `queue`.
    wake: Condvar,
    /// Held by whoever commits.
    committer: Mutex<CommitWorker>,
    /// Connection threads may commit (relaxed durability; see the module doc).
    inline: bool,
}

/// Handle to the commit path.
pub struct CommitPath {
    inner: Arc<Inner>,
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
    /// Starts the commit thread. Connection threads commit too unless the store
    /// waits for the disk (`fsync`).
    pub fn start(
        store: Arc<dyn Store>,
        registry: Arc<Registry>,
        metrics: Arc<Metrics>,
        max_batch: usize,
        retention: Retention,
    ) -> Self {
        let cursors: Arc<Mutex<HashMap<CursorKey, DeviceCursor>>> = Default::default();
        let delivered: Arc<Mutex<HashMap<Arc<str>, u64>>> = Default::default();
        let inline = store.durability() == Durability::Relaxed;
        let worker = CommitWorker {
            store,
            registry,
            metrics,
            cursors: cursors.clone(),
            delivered: delivered.clone(),
            max_batch: max_batch.max(1),
            retention,
            taken: Vec::new(),
            appends: Vec::new(),
            waiting: Vec::new(),
            flushing: Vec::new(),
            last_cursor_flush: Instant::now(),
            last_compaction: Instant::now(),
        };
        let inner = Arc::new(Inner {
            queue: Mutex::new(Queue::default()),
            wake: Condvar::new(),
            committer: Mutex::new(worker),
            inline,
        });
        let thread = {
            let inner = inner.clone();
            std::thread::Builder::new()
                .name("tether-commit".into())
                .spawn(move || run(&inner))
                .ok()
        };
        Self {
            inner,
            cursors,
            delivered,
            thread: Mutex::new(thread),
        }
    }

    /// Queues a send for the next group commit; [`CommitPath::flush`] commits it. The
    /// answer arrives as a reply frame on `reply_to`. Returns false if the commit path
    /// has stopped.
    pub fn submit(&self, request: CommitRequest) -> bool {
        let mut queue = self.inner.queue.lock();
        if queue.stopped {
            return false;
        }
        queue.requests.push(request);
        if !self.inner.inline {
            self.inner.wake.notify_one();
        }
        true
    }

    /// Commits what is queued on this thread, unless another thread is committing: that
    /// one takes the queue with its next round (each committer looks at the queue again
    /// after it lets go). In `fsync` mode the commit thread was woken by `submit`.
    pub fn flush(&self) {
        if !self.inner.inline {
            return;
        }
        for _ in 0..LEAD_ROUNDS {
            if self.inner.queue.lock().requests.len() > INLINE_BATCH {
                break;
            }
            let Some(mut committer) = self.inner.committer.try_lock() else {
                return;
            };
            if committer.commit_round(&self.inner.queue) {
                committer.metrics.commits_inline.inc();
            }
            drop(committer);
            if self.inner.queue.lock().requests.is_empty() {
                return;
            }
        }
        let mut queue = self.inner.queue.lock();
        queue.handoff = true;
        self.inner.wake.notify_one();
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
        self.inner.queue.lock().stopped = true;
        self.inner.wake.notify_one();
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

/// The commit thread: takes over from connection threads, commits everything in
/// `fsync` mode and when idle, and writes cursors and compacts.
fn run(inner: &Inner) {
    loop {
        let (stopping, idle) = {
            let mut queue = inner.queue.lock();
            let mut idle = false;
            if queue.requests.is_empty() && !queue.handoff && !queue.stopped {
                idle = inner
                    .wake
                    .wait_for(&mut queue, CURSOR_FLUSH_INTERVAL)
                    .timed_out()
                    && queue.requests.is_empty();
            }
            queue.handoff = false;
            (queue.stopped, idle)
        };
        let mut committer = inner.committer.lock();
        // Everything that arrived while the previous commit was syncing joins this one.
        if committer.commit_round(&inner.queue) {
            committer.metrics.commits_by_thread.inc();
        }
        committer.housekeeping(stopping, idle);
        if stopping {
            while !inner.queue.lock().requests.is_empty() {
                committer.commit_round(&inner.queue);
            }
            committer.housekeeping(true, false);
            if let Err(e) = committer.store.sync() {
                error!(error = %e, "final store sync failed");
            }
            info!("commit path stopped");
            return;
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
    /// The round's requests, then their appends and whom to answer (kept for reuse).
    taken: Vec<CommitRequest>,
    appends: Vec<AppendRequest>,
    waiting: Vec<(Arc<Session>, Instant)>,
    /// The current round of cursor writes, written a chunk per turn.
    flushing: Vec<(CursorKey, DeviceCursor)>,
    last_cursor_flush: Instant,
    last_compaction: Instant,
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
    /// Commits up to `max_batch` queued requests, with the pending delivered marks;
    /// false if there was nothing to commit.
    fn commit_round(&mut self, queue: &Mutex<Queue>) -> bool {
        {
            let mut queue = queue.lock();
            if queue.requests.len() <= self.max_batch {
                std::mem::swap(&mut self.taken, &mut queue.requests);
            } else {
                self.taken.extend(queue.requests.drain(..self.max_batch));
            }
        }
        let mut appends = std::mem::take(&mut self.appends);
        let mut waiting = std::mem::take(&mut self.waiting);
        for r in self.taken.drain(..) {
            appends.push(r.append);
            waiting.push((r.reply_to, r.submitted));
        }
        let marks = self.take_delivered(&mut appends);
        let any = !appends.is_empty();
        if any {
            self.commit(&appends, &mut waiting, marks);
        }
        appends.clear();
        waiting.clear();
        self.appends = appends;
        self.waiting = waiting;
        any
    }

    /// The commit thread's turn after its round: cursors, idle store work, compaction.
    fn housekeeping(&mut self, stopping: bool, idle: bool) {
        // A round takes every cursor moved since the last one, then writes it a
        // chunk per turn of the loop; moves arriving meanwhile wait for the next round.
        if self.flushing.is_empty()
            && (stopping || self.last_cursor_flush.elapsed() >= CURSOR_FLUSH_INTERVAL)
        {
            let moved = std::mem::take(&mut *self.cursors.lock());
            self.flushing.extend(moved);
            self.last_cursor_flush = Instant::now();
        }
        let chunk = if stopping { usize::MAX } else { CURSOR_CHUNK };
        self.write_cursors(chunk);
        if self.flushing.is_empty() && self.flushing.capacity() > CURSOR_CHUNK {
            // A login storm's round held a cursor per device (56 B each): kept, its
            // capacity would be billed to every idle session from then on.
            self.flushing = Vec::new();
        }
        let pending = self.flushing.len() + self.cursors.lock().len();
        self.metrics.cursor_writes_pending.set(pending as i64);
        if idle
            && pending == 0
            && let Err(e) = self.store.idle()
        {
            error!(error = %e, "store housekeeping failed");
        }
        if !stopping && self.last_compaction.elapsed() >= self.retention.interval {
            // Compaction must see where every device is, including one that just
            // logged in and holds entries back: write every pending cursor first.
            self.write_cursors(usize::MAX);
            let moved = std::mem::take(&mut *self.cursors.lock());
            self.flushing.extend(moved);
            self.write_cursors(usize::MAX);
            self.last_cursor_flush = Instant::now();
            // Compaction never passes a delivered mark: write the pending ones.
            let mut appends = std::mem::take(&mut self.appends);
            let marks = self.take_delivered(&mut appends);
            if marks > 0 {
                self.commit(&appends, &mut [], marks);
            }
            appends.clear();
            self.appends = appends;
            self.compact();
            self.last_compaction = Instant::now();
        }
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
    fn write_cursors(&mut self, max: usize) {
        let round = &mut self.flushing;
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
