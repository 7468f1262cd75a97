//! The embedded [`Store`]: a journal and one redb file in one directory, no server to
//! install.
//!
//! A commit never waits for the B-tree. [`Store::append`] computes the batch's rows
//! over the in-memory layers ([`layers`]), appends the batch to the [`journal`] with one
//! write and (in [`Durability::Fsync`]) one fdatasync — group commit: one per batch, not
//! per message — and only then lays the rows over the live layer, where readers see
//! them. About once a second (or when the live layer grows large) the live layer is
//! frozen and a checkpoint thread writes it into redb in one transaction, which also
//! records how much of the journal it covers. At open, the journal's later batches are
//! replayed through the same deterministic writer.
//!
//! Only every [`DURABLE_EVERY`]th checkpoint (and any made while the store is idle) is
//! a durable redb commit; the others are `Durability::None` commits, which readers see at
//! once and the disk gets with the next durable one. A durable commit flushes megabytes
//! of B-tree pages, and the journal's fdatasyncs issued meanwhile wait behind that
//! flush: with a durable checkpoint every second, every second's first messages waited
//! 5–20 ms (measured, DESIGN §9's fsync p99). The journal moves to its next generation
//! (and file) only at a durable checkpoint, so everything since the last one stays in
//! the journal, whatever redb keeps of the commits in between.
//!
//! [`Durability::Relaxed`] writes the journal and the checkpoints with write(2) and
//! never waits for the disk: they survive a process crash, not a power cut.
//!
//! Durability is decided *below* redb and the journal, in the storage backend, so one
//! mechanism serves the real files, the simulated disk of the power-cut tests and the
//! power-loss file of chaos runs.
//!
//! Tables (redb typed keys; tuples compare element by element, so one inbox's entries
//! are contiguous and ordered by seq). Users get a numeric id on first use, so the hot
//! tables have fixed-size keys that compare without UTF-8 checks:
//!
//! | table     | key                                             | value                                     |
//! |-----------|-------------------------------------------------|-------------------------------------------|
//! | `meta`    | `&str`: `"epoch"`, `"next_message_id"`, `"next_uid"`, `"journal_generation"`, `"journal_records"` | `u64` |
//! | `users`   | user                                            | uid                                       |
//! | `heads`   | uid                                             | `(head, low)`: last seq, lowest retained  |
//! | `inbox`   | `(uid, seq)`                                    | protobuf `tether.v1.Entry` (seq included) |
//! | `dedup`   | `(sender uid, fnv1a(sender_device), client_msg_id)` | `(message_id, sender_seq, ts_ms)`     |
//! | `cursors` | `(user, device)`                                | `(inbox_epoch, acked_seq, last_seen_ms)`  |
//! | `convs`   | `(uid, conversation)`                           | `(last_seq, last_ts, last_message_id, incoming, read_seq, read_incoming)` |
//! | `groups`  | group                                           | protobuf `tether.v1.GroupSummary`         |
//! | `members` | `(group, user)`                                 | `(joined, delivered, read, notified_delivered, notified_read)` (message ids) |
//! | `user_groups` | `(uid, group)`                              | joined message id                         |
//! | `group_sent`  | `(group, sender uid, message_id)`           | `ts_ms` (what the aggregated receipts look up) |
//! | `delivered`   | uid                                         | seq up to which delivered receipts were written |
//!
//! What a batch writes is in [`write`]; the receipt and group rules are documented there.

mod journal;
mod layers;
mod write;

pub use write::{DELIVERED_SCAN, GROUP_CONTENT_TYPE, RECEIPT_CONTENT_TYPE};

use crate::{
    AppendOutcome, AppendRequest, CompactPolicy, CompactStats, DeviceCursor, Durability, EntryKind,
    InboxInfo, SimulatedDisk, Store, StoreError, StoredEntry,
};
use journal::Journal;
use layers::{Base, CursorValue, Delta, View};
use parking_lot::{Condvar, Mutex, RwLock};
use prost::Message;
use rand::Rng;
use redb::{BackendError, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use tether_proto::pb;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const USERS: TableDefinition<&str, u64> = TableDefinition::new("users");
const HEADS: TableDefinition<u64, (u64, u64)> = TableDefinition::new("heads");
const INBOX: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("inbox");
/// `(sender uid, fnv1a(sender_device), client_msg_id)`.
type DedupKey = (u64, u64, &'static [u8; 16]);
/// `(message_id, sender_seq, ts_ms)`: the original ack.
const DEDUP: TableDefinition<DedupKey, layers::DedupValue> = TableDefinition::new("dedup");
const CURSORS: TableDefinition<(&str, &str), (u64, u64, u64)> = TableDefinition::new("cursors");
/// `(last_seq, last_ts, last_message_id, incoming, read_seq, read_incoming)`.
type ConvValue = (u64, u64, u64, u64, u64, u64);
const CONVS: TableDefinition<(u64, &str), ConvValue> = TableDefinition::new("convs");
const GROUPS: TableDefinition<&str, &[u8]> = TableDefinition::new("groups");
/// `(joined, delivered, read, notified_delivered, notified_read)`, all message ids.
type MemberValue = (u64, u64, u64, u64, u64);
const MEMBERS: TableDefinition<(&str, &str), MemberValue> = TableDefinition::new("members");
const USER_GROUPS: TableDefinition<(u64, &str), u64> = TableDefinition::new("user_groups");
const GROUP_SENT: TableDefinition<(&str, u64, u64), u64> = TableDefinition::new("group_sent");
const DELIVERED: TableDefinition<u64, u64> = TableDefinition::new("delivered");

const EPOCH_KEY: &str = "epoch";
const NEXT_MESSAGE_ID_KEY: &str = "next_message_id";
const NEXT_UID_KEY: &str = "next_uid";
/// The last journal generation the database holds whole.
const JOURNAL_GENERATION_KEY: &str = "journal_generation";
/// How many records of the generation after that one the database holds (absent: 0).
const JOURNAL_RECORDS_KEY: &str = "journal_records";

/// File in the data directory whose advisory lock keeps a second process out.
const LOCK_FILE: &str = "LOCK";
/// The redb database file in the data directory.
const DB_FILE: &str = "inbox.redb";
/// The journal's two files in the data directory.
const JOURNAL_FILES: [&str; 2] = ["journal.0", "journal.1"];

/// Epochs stay below 2^53 so they survive a trip through JSON numbers.
const EPOCH_LIMIT: u64 = 1 << 53;

/// A checkpoint is due this long after the last one began...
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);
/// ...or once the live layer holds this many rows.
pub const CHECKPOINT_ROWS: usize = 65_536;
/// Every this many checkpoints one is durable (the others reach the disk with it).
/// Replay at open is bounded by what the journal holds since the last durable one: at
/// most this many checkpoints' worth of rows.
pub const DURABLE_EVERY: u32 = 8;
/// While a checkpoint runs, commits go on until the live layer holds this many times
/// [`CHECKPOINT_ROWS`]; then they wait for it (memory stays bounded if the disk is slow).
const CHECKPOINT_BACKLOG: usize = 8;

type Backend = Box<dyn StorageBackend>;

/// The embedded store: a journal, in-memory layers, and one redb database.
pub struct EmbeddedStore {
    db: Arc<redb::Database>,
    epoch: u64,
    durability: Durability,
    /// user → uid, for users whose first batch is committed.
    uids: RwLock<HashMap<String, u64>>,
    layers: Arc<RwLock<Layers>>,
    /// The single writer: journal and counters. Every mutation holds it.
    writer: Mutex<WriterState>,
    checkpoints: Arc<Checkpoints>,
    checkpointer: Option<JoinHandle<()>>,
    /// Journal records replayed at open.
    replayed: usize,
    /// Held (locked) for as long as the store is open; dropped after `db`.
    _dir_lock: Option<File>,
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore")
            .field("epoch", &self.epoch)
            .field("durability", &self.durability)
            .finish_non_exhaustive()
    }
}

/// What readers see: two layers in memory over one shared read transaction.
///
/// Only the writer (under [`EmbeddedStore::writer`], at normal priority) changes this.
/// The checkpoint thread runs at idle priority and never takes this lock: if it were
/// preempted holding it, or parked waiting for it, every reader and commit would wait
/// until the machine had a core to spare for it.
struct Layers {
    /// Committed since the last freeze.
    live: Delta,
    /// Frozen, being written (or just written) by the checkpoint thread.
    frozen: Option<Arc<Delta>>,
    /// The database as of the last checkpoint the writer took notice of: readers share
    /// it rather than each beginning a transaction (which takes redb's locks).
    base: Arc<Base>,
}

struct WriterState {
    journal: Journal,
    /// `(next_message_id, next_uid)`.
    counters: (u64, u64),
    /// Set when the journal or a checkpoint failed: nothing more is committed, since
    /// what is on disk may no longer match memory. Reopening recovers.
    failed: Option<String>,
    last_freeze: Instant,
    interval: Duration,
    rows: usize,
    /// Checkpoints queued since the last durable one.
    undurable: u32,
}

/// How much of the journal a checkpoint covers, and whether it is durable.
#[derive(Debug, Clone, Copy)]
struct Cover {
    /// Every generation up to this one, whole...
    generation: u64,
    /// ...and this many records of the next.
    records: u64,
    durable: bool,
}

/// Hands frozen layers to the checkpoint thread.
#[derive(Default)]
struct Checkpoints {
    state: Mutex<CheckpointState>,
    changed: Condvar,
}

#[derive(Default)]
struct CheckpointState {
    /// A frozen layer and what it covers, waiting for the thread.
    queued: Option<(Arc<Delta>, Cover)>,
    /// A checkpoint is queued or running.
    busy: bool,
    /// A checkpoint was written and the writer has not yet dropped its frozen layer.
    written: bool,
    /// Frozen layers the writer let go of, freed here rather than on the commit path.
    garbage: Vec<Arc<Delta>>,
    failed: Option<String>,
    stop: bool,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, holding `dir/LOCK` exclusively while open.
    pub fn open(dir: &Path, durability: Durability) -> Result<Self, StoreError> {
        // File 0 is the database: its syncs write back in chunks (see FileBackend).
        // Relaxed never syncs, so nothing is tracked.
        let chunked = durability == Durability::Fsync;
        Self::open_dir(dir, durability, |file, index| {
            Ok(FileBackend {
                file,
                dirty: (chunked && index == 0).then(Default::default),
            })
        })
    }

    /// Like [`EmbeddedStore::open`], but the files' unsynced writes live in process
    /// memory until fdatasync (a random `writeback` share goes through early), so
    /// killing the process is a power cut: see [`PowerLossFile`](crate::PowerLossFile).
    /// For chaos runs and tests only.
    pub fn open_power_loss(dir: &Path, seed: u64, writeback: f64) -> Result<Self, StoreError> {
        Self::open_dir(dir, Durability::Fsync, |file, index| {
            crate::PowerLossFile::new(file, seed.wrapping_add(index), writeback)
        })
    }

    fn open_dir<B: StorageBackend>(
        dir: &Path,
        durability: Durability,
        backend: impl Fn(File, u64) -> io::Result<B>,
    ) -> Result<Self, StoreError> {
        let dir_created = !dir.exists();
        fs::create_dir_all(dir)?;
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(dir.join(LOCK_FILE))?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(StoreError::Locked(dir.display().to_string()));
            }
            Err(TryLockError::Error(e)) => return Err(e.into()),
        }
        let mut created = false;
        let mut open = |name: &str| -> io::Result<File> {
            let path = dir.join(name);
            created |= !path.exists();
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
        };
        let db_file = open(DB_FILE)?;
        let journal: [Backend; 2] = [
            Box::new(backend(open(JOURNAL_FILES[0])?, 1)?),
            Box::new(backend(open(JOURNAL_FILES[1])?, 2)?),
        ];
        let store = Self::with_backends(backend(db_file, 0)?, journal, durability, Some(lock))?;
        if durability == Durability::Fsync {
            // The new directory entries must survive a power cut, or the data would not.
            if created {
                sync_dir(dir)?;
            }
            if dir_created {
                sync_dir(
                    dir.parent()
                        .filter(|p| !p.as_os_str().is_empty())
                        .unwrap_or(Path::new(".")),
                )?;
            }
        }
        Ok(store)
    }

    /// Opens (or creates) the store on a [`SimulatedDisk`]: the database is its file 0,
    /// the journal its files 1 and 2. The caller ensures exclusive access.
    pub fn open_with_backend(
        disk: SimulatedDisk,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        let journal: [Backend; 2] = [Box::new(disk.file(1)), Box::new(disk.file(2))];
        Self::with_backends(disk.file(0), journal, durability, None)
    }

    pub(crate) fn with_backends(
        backend: impl StorageBackend,
        journal: [Backend; 2],
        durability: Durability,
        dir_lock: Option<File>,
    ) -> Result<Self, StoreError> {
        let mut builder = redb::Builder::new();
        // After an unclean shutdown redb rebuilds its allocator state before opening.
        builder.set_repair_callback(|session| {
            tracing::info!(
                progress = session.progress(),
                "repairing inbox store after an unclean shutdown"
            );
        });
        // The journal syncs only in `Fsync` (see `Store::append`).
        let db = match durability {
            Durability::Fsync => builder.create_with_backend(backend)?,
            Durability::Relaxed => builder.create_with_backend(NoSync(backend))?,
        };
        let db = Arc::new(db);
        let opened = init_tables(&db)?;
        // The records after what the database covers are replayed; the journal goes on
        // with the last generation found (or the next one), which the durable
        // checkpoint after the replay closes unwritten: no record is ever written over
        // one the database may count as covered.
        let mut found = Vec::new();
        for file in &journal {
            if let Some((generation, mut batches)) = journal::read_file(file.as_ref())?
                && generation > opened.generation
            {
                if generation == opened.generation + 1 {
                    let covered = usize::try_from(opened.records).unwrap_or(usize::MAX);
                    batches.drain(..covered.min(batches.len()));
                }
                found.push((generation, batches));
            }
        }
        found.sort_by_key(|(generation, _)| *generation);
        let start = found
            .last()
            .map_or(opened.generation + 1, |(generation, _)| *generation);
        let reopen = !found.is_empty() || opened.records > 0;
        let layers = Arc::new(RwLock::new(Layers {
            live: Delta::default(),
            frozen: None,
            base: Arc::new(Base::new(db.begin_read()?)),
        }));
        let checkpoints: Arc<Checkpoints> = Default::default();
        let checkpointer = {
            let (db, checkpoints) = (db.clone(), checkpoints.clone());
            std::thread::Builder::new()
                .name("tether-checkpoint".into())
                .spawn(move || run_checkpoints(&db, &checkpoints))?
        };
        let mut store = Self {
            db,
            epoch: opened.epoch,
            durability,
            uids: Default::default(),
            layers,
            writer: Mutex::new(WriterState {
                journal: Journal::new(journal, start)?,
                counters: opened.counters,
                failed: None,
                last_freeze: Instant::now(),
                interval: CHECKPOINT_INTERVAL,
                rows: CHECKPOINT_ROWS,
                undurable: 0,
            }),
            checkpoints,
            checkpointer: None,
            replayed: 0,
            _dir_lock: dir_lock,
        };
        store.checkpointer = Some(checkpointer);
        if reopen {
            store.replayed = found.iter().map(|(_, records)| records.len()).sum();
            store.replay(found)?;
        }
        tracing::debug!(epoch = store.epoch, %durability, "inbox store open");
        Ok(store)
    }

    /// Re-applies journaled batches, oldest first, and checkpoints the result.
    fn replay(&self, generations: Vec<(u64, Vec<Vec<u8>>)>) -> Result<(), StoreError> {
        let mut writer = self.writer.lock();
        let mut batches = 0;
        for (generation, payloads) in generations {
            for payload in payloads {
                match journal::decode(&payload)? {
                    journal::Record::Batch(batch) => {
                        let (_, delta, assigned) = self.apply(&batch, writer.counters)?;
                        self.publish(&mut writer, delta, assigned);
                        batches += 1;
                    }
                    journal::Record::Cursors(rows) => {
                        self.layers.write().live.cursors.extend(rows);
                    }
                }
            }
            tracing::info!(generation, batches, "replayed the journal");
        }
        self.checkpoint_now(&mut writer, true)
    }

    /// How many journal records the open replayed (what the database did not cover).
    #[doc(hidden)]
    pub fn replayed_at_open(&self) -> usize {
        self.replayed
    }

    /// Freezes and writes a checkpoint on this thread, durable or not; for tests of
    /// what each kind leaves on disk.
    #[doc(hidden)]
    pub fn checkpoint_on_this_thread(&self, durable: bool) -> Result<(), StoreError> {
        let mut writer = self.writer.lock();
        self.checkpoint_now(&mut writer, durable)
    }

    /// Stops the checkpoint thread and leaves everything else as a dying process would:
    /// nothing is synced or closed. The files stay locked. For crash tests.
    #[doc(hidden)]
    pub fn abandon(mut self) {
        self.stop_checkpoints();
        std::mem::forget(self);
    }

    fn stop_checkpoints(&mut self) {
        self.checkpoints.state.lock().stop = true;
        self.checkpoints.changed.notify_all();
        if let Some(thread) = self.checkpointer.take() {
            let _ = thread.join();
        }
    }

    /// Sets when checkpoints are due: `interval` after the last one, or at `rows` rows in
    /// memory. Small values make the power-cut tests cut inside checkpoints too.
    pub fn set_checkpoint_policy(&self, interval: Duration, rows: usize) {
        let mut writer = self.writer.lock();
        writer.interval = interval;
        writer.rows = rows.max(1);
    }

    /// The uid of `user`, if the user has ever had an inbox.
    fn uid(&self, user: &str) -> Result<Option<u64>, StoreError> {
        if let Some(uid) = self.uids.read().get(user) {
            return Ok(Some(*uid));
        }
        let uid = self.read(|view| view.user(None, user))?;
        if let Some(uid) = uid {
            self.uids.write().insert(user.to_owned(), uid);
        }
        Ok(uid)
    }

    /// Runs `f` over the current layers and the shared read transaction. A frozen
    /// layer is dropped only together with a base that contains it (see
    /// [`Self::retire_checkpoint`]), so a reader sees every row in one place or the other.
    fn read<T>(&self, f: impl FnOnce(&View) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let layers = self.layers.read();
        let view = View {
            live: &layers.live,
            frozen: layers.frozen.as_deref(),
            base: &layers.base,
        };
        f(&view)
    }

    /// After a checkpoint (or any write to the database): readers move to a new read
    /// transaction, and the frozen layer it now contains is dropped. Called by the writer.
    fn retire_checkpoint(&self, drop_frozen: bool) -> Result<(), StoreError> {
        let base = Arc::new(Base::new(self.db.begin_read()?));
        let (old, frozen) = {
            let mut layers = self.layers.write();
            let frozen = if drop_frozen {
                layers.frozen.take()
            } else {
                None
            };
            (std::mem::replace(&mut layers.base, base), frozen)
        };
        // The old transaction ends outside the lock (it takes redb's), and freeing a
        // second of rows is the checkpoint thread's work.
        drop(old);
        if let Some(frozen) = frozen {
            self.checkpoints.state.lock().garbage.push(frozen);
            self.checkpoints.changed.notify_all();
        }
        Ok(())
    }

    /// Drops the frozen layer if the checkpoint thread has written it since the last look.
    fn take_written_checkpoint(&self) -> Result<(), StoreError> {
        let written = std::mem::take(&mut self.checkpoints.state.lock().written);
        if written {
            self.retire_checkpoint(true)?;
        }
        Ok(())
    }

    /// Computes what `batch` writes over the current state; writes nothing.
    #[allow(clippy::type_complexity)]
    fn apply(
        &self,
        batch: &[AppendRequest],
        counters: (u64, u64),
    ) -> Result<(Vec<AppendOutcome>, Delta, Vec<(String, u64)>), StoreError> {
        let cached = self.uids.read();
        self.read(|view| {
            let mut writer = write::Writer::new(view, &cached, counters);
            let mut outcomes = Vec::with_capacity(batch.len());
            for (index, req) in batch.iter().enumerate() {
                outcomes.push(writer.apply(index, req)?);
            }
            writer.aggregate_deferred(batch, &mut outcomes)?;
            let (delta, assigned) = writer.finish();
            Ok((outcomes, delta, assigned))
        })
    }

    /// Lays a durable batch's rows over the live layer.
    fn publish(&self, writer: &mut WriterState, delta: Delta, assigned: Vec<(String, u64)>) {
        if let Some(counters) = delta.counters {
            writer.counters = counters;
        }
        self.layers.write().live.merge(delta);
        if !assigned.is_empty() {
            self.uids.write().extend(assigned);
        }
    }

    /// Journals cursor rows (without a sync) and lays them over the live layer.
    fn journal_cursors(
        &self,
        writer: &mut WriterState,
        rows: Vec<((String, String), Option<CursorValue>)>,
    ) -> Result<(), StoreError> {
        if let Err(e) = writer
            .journal
            .append(&journal::encode_cursors(&rows), false)
        {
            writer.failed = Some(e.to_string());
            return Err(e.into());
        }
        self.layers.write().live.cursors.extend(rows);
        Ok(())
    }

    /// Freezes the live layer for a checkpoint. A durable one covers the journal's
    /// generation whole, and the journal moves to the next; any other covers the records
    /// written so far, and the generation goes on.
    fn freeze(&self, writer: &mut WriterState, durable: bool) -> (Arc<Delta>, Cover) {
        let mut layers = self.layers.write();
        let delta = Arc::new(std::mem::take(&mut layers.live));
        layers.frozen = Some(delta.clone());
        drop(layers);
        let generation = writer.journal.generation();
        let cover = if durable {
            writer.journal.next_generation();
            writer.undurable = 0;
            Cover {
                generation,
                records: 0,
                durable,
            }
        } else {
            writer.undurable += 1;
            Cover {
                generation: generation - 1,
                records: writer.journal.records(),
                durable,
            }
        };
        writer.last_freeze = Instant::now();
        (delta, cover)
    }

    /// Hands the live layer to the checkpoint thread if a checkpoint is due.
    /// `idle`: no writes are coming (the commit loop's housekeeping), so a checkpoint is
    /// made durable: its flush delays nobody's sync.
    fn maybe_checkpoint(&self, writer: &mut WriterState, idle: bool) {
        if let Err(e) = self.take_written_checkpoint() {
            writer.failed = Some(e.to_string());
            return;
        }
        let rows = self.layers.read().live.rows();
        let quiet = writer.last_freeze.elapsed() >= writer.interval;
        // Once traffic stops, the rows of the checkpoints that were not durable are
        // made durable by an empty one.
        let due = rows >= writer.rows || (quiet && (rows > 0 || writer.undurable > 0));
        if !due {
            return;
        }
        let durable = idle || rows == 0 || writer.undurable + 1 >= DURABLE_EVERY;
        let mut state = self.checkpoints.state.lock();
        if state.busy && rows < writer.rows.saturating_mul(CHECKPOINT_BACKLOG) {
            return;
        }
        while state.busy {
            self.checkpoints.changed.wait(&mut state);
        }
        if let Some(reason) = &state.failed {
            writer.failed = Some(reason.clone());
            return;
        }
        if std::mem::take(&mut state.written) {
            drop(state);
            if let Err(e) = self.retire_checkpoint(true) {
                writer.failed = Some(e.to_string());
                return;
            }
            state = self.checkpoints.state.lock();
        }
        state.queued = Some(self.freeze(writer, durable));
        state.busy = true;
        self.checkpoints.changed.notify_all();
    }

    /// Writes everything in memory into the database, on this thread.
    fn checkpoint_now(&self, writer: &mut WriterState, durable: bool) -> Result<(), StoreError> {
        {
            let mut state = self.checkpoints.state.lock();
            while state.busy {
                self.checkpoints.changed.wait(&mut state);
            }
            if let Some(reason) = &state.failed {
                return Err(StoreError::Engine(format!(
                    "an earlier checkpoint failed: {reason}"
                )));
            }
        }
        self.take_written_checkpoint()?;
        let (delta, cover) = self.freeze(writer, durable);
        if let Err(e) = checkpoint(&self.db, &delta, cover) {
            writer.failed = Some(e.to_string());
            return Err(e);
        }
        self.retire_checkpoint(true)
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        Ok(txn)
    }
}

impl Drop for EmbeddedStore {
    fn drop(&mut self) {
        // What is not checkpointed is in the journal: the next open replays it.
        self.stop_checkpoints();
    }
}

/// Writes `delta` into the database in one transaction, with how much of the journal
/// it covers.
fn checkpoint(db: &redb::Database, delta: &Delta, cover: Cover) -> Result<(), StoreError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(if cover.durable {
        redb::Durability::Immediate
    } else {
        redb::Durability::None
    })?;
    delta.write_to(&txn)?;
    {
        let mut meta = txn.open_table(META)?;
        meta.insert(JOURNAL_GENERATION_KEY, cover.generation)?;
        meta.insert(JOURNAL_RECORDS_KEY, cover.records)?;
    }
    txn.commit()?;
    Ok(())
}

/// The checkpoint thread: writes each frozen layer; the writer then lets readers forget
/// it (this thread takes no lock a reader or a commit waits for, but its own state's).
fn run_checkpoints(db: &redb::Database, checkpoints: &Checkpoints) {
    background_priority();
    loop {
        let (delta, cover) = {
            let mut state = checkpoints.state.lock();
            loop {
                if !state.garbage.is_empty() {
                    let garbage = std::mem::take(&mut state.garbage);
                    drop(state);
                    drop(garbage);
                    state = checkpoints.state.lock();
                    continue;
                }
                if let Some(job) = state.queued.take() {
                    break job;
                }
                if state.stop {
                    return;
                }
                checkpoints.changed.wait(&mut state);
            }
        };
        let started = Instant::now();
        let result = checkpoint(db, &delta, cover);
        drop(delta);
        let mut state = checkpoints.state.lock();
        state.written = result.is_ok();
        match result {
            Ok(()) => tracing::debug!(
                generation = cover.generation,
                records = cover.records,
                durable = cover.durable,
                took = ?started.elapsed(),
                "checkpoint written"
            ),
            Err(e) => {
                tracing::error!(error = %e, generation = cover.generation, "checkpoint failed; the store stops committing");
                state.failed = Some(e.to_string());
            }
        }
        state.busy = false;
        checkpoints.changed.notify_all();
    }
}

/// Puts the calling thread in `SCHED_IDLE`: it runs only when nothing else wants the
/// CPU. A checkpoint is a burst of B-tree work (tens of ms for a second of traffic);
/// at normal priority it took a core from connections and the commit path and tripled
/// the p99 of message latency. If the machine is saturated checkpoints fall behind and
/// commits wait for them ([`CHECKPOINT_BACKLOG`]), so memory stays bounded.
fn background_priority() {
    // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid parameter.
    let param = libc::sched_param { sched_priority: 0 };
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
    if rc != 0 {
        tracing::debug!(error = %io::Error::last_os_error(), "checkpoint thread keeps normal priority");
    }
}

/// Makes the entries of directory `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// What the database holds about itself.
struct Opened {
    epoch: u64,
    /// `(next_message_id, next_uid)`.
    counters: (u64, u64),
    /// The last journal generation checkpointed whole (0: none)...
    generation: u64,
    /// ...and how many records of the next one.
    records: u64,
}

/// Creates the tables if missing; chooses the store epoch on first open.
fn init_tables(db: &redb::Database) -> Result<Opened, StoreError> {
    let txn = db.begin_write()?;
    let opened = {
        let mut meta = txn.open_table(META)?;
        txn.open_table(USERS)?;
        txn.open_table(HEADS)?;
        txn.open_table(INBOX)?;
        txn.open_table(DEDUP)?;
        txn.open_table(CURSORS)?;
        txn.open_table(CONVS)?;
        txn.open_table(GROUPS)?;
        txn.open_table(MEMBERS)?;
        txn.open_table(USER_GROUPS)?;
        txn.open_table(GROUP_SENT)?;
        txn.open_table(DELIVERED)?;
        fn get(meta: &redb::Table<&str, u64>, key: &str) -> Result<Option<u64>, StoreError> {
            Ok(meta.get(key)?.map(|guard| guard.value()))
        }
        let epoch = match get(&meta, EPOCH_KEY)? {
            Some(0) => return Err(StoreError::Corrupt("store epoch is 0".into())),
            Some(epoch) => epoch,
            None => {
                let epoch = rand::rng().random_range(1..EPOCH_LIMIT);
                meta.insert(EPOCH_KEY, epoch)?;
                meta.insert(NEXT_MESSAGE_ID_KEY, 1)?;
                meta.insert(NEXT_UID_KEY, 1)?;
                epoch
            }
        };
        let counter = |key: &str| {
            get(&meta, key)?.ok_or_else(|| StoreError::Corrupt(format!("{key} missing")))
        };
        Opened {
            epoch,
            counters: (counter(NEXT_MESSAGE_ID_KEY)?, counter(NEXT_UID_KEY)?),
            generation: get(&meta, JOURNAL_GENERATION_KEY)?.unwrap_or(0),
            records: get(&meta, JOURNAL_RECORDS_KEY)?.unwrap_or(0),
        }
    };
    txn.commit()?;
    Ok(opened)
}

/// 64-bit FNV-1a: a stable hash of a device id for dedup keys (stable across builds,
/// unlike std's hasher).
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

impl Store for EmbeddedStore {
    fn append(&self, batch: &[AppendRequest]) -> Result<Vec<AppendOutcome>, StoreError> {
        if batch.is_empty() {
            return Ok(Vec::new());
        }
        let mut writer = self.writer.lock();
        if let Some(reason) = &writer.failed {
            return Err(StoreError::Engine(format!(
                "the store stopped committing after a failed write ({reason}); reopen it to recover from its journal"
            )));
        }
        let (outcomes, delta, assigned) = self.apply(batch, writer.counters)?;
        let payload = journal::encode_batch(batch);
        let sync = self.durability == Durability::Fsync;
        if let Err(e) = writer.journal.append(&payload, sync) {
            // The record may or may not be on disk: memory can no longer follow it.
            writer.failed = Some(e.to_string());
            return Err(e.into());
        }
        self.publish(&mut writer, delta, assigned);
        self.maybe_checkpoint(&mut writer, false);
        Ok(outcomes)
    }

    fn read_range(
        &self,
        user: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError> {
        if from > to || limit == 0 {
            return Ok(Vec::new());
        }
        let Some(uid) = self.uid(user)? else {
            return Ok(Vec::new());
        };
        let raw = self.read(|view| view.entries(None, uid, from, to, limit))?;
        raw.iter()
            .map(|(seq, bytes)| decode_entry(user, *seq, bytes))
            .collect()
    }

    fn inbox_info(&self, user: &str) -> Result<InboxInfo, StoreError> {
        let (head, low) = match self.uid(user)? {
            Some(uid) => self.read(|view| view.head(None, uid))?.unwrap_or((0, 1)),
            None => (0, 1),
        };
        Ok(InboxInfo {
            epoch: self.epoch,
            head,
            low,
        })
    }

    fn cursor(&self, user: &str, device: &str) -> Result<Option<DeviceCursor>, StoreError> {
        Ok(self
            .read(|view| view.cursor(user, device))?
            .map(device_cursor))
    }

    fn sync(&self) -> Result<(), StoreError> {
        let mut writer = self.writer.lock();
        self.checkpoint_now(&mut writer, true)
    }

    fn idle(&self) -> Result<(), StoreError> {
        let mut writer = self.writer.lock();
        if writer.failed.is_none() {
            self.maybe_checkpoint(&mut writer, true);
        }
        Ok(())
    }

    fn set_cursors(&self, updates: &[(String, String, DeviceCursor)]) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        // Cursors are advisory (a device's own resume point wins; a lost cursor only
        // means redelivery, which clients drop by seq), so their journal record is not
        // synced: it survives a crash, and a power cut once the next batch's fdatasync
        // covers it.
        let mut writer = self.writer.lock();
        if let Some(reason) = &writer.failed {
            return Err(StoreError::Engine(format!(
                "the store stopped writing after a failed write ({reason})"
            )));
        }
        let rows = self.read(|view| {
            let mut rows: HashMap<(String, String), CursorValue> = HashMap::new();
            for (user, device, cursor) in updates {
                let key = (user.clone(), device.clone());
                let old = match rows.get(&key) {
                    Some(row) => Some(*row),
                    None => view.cursor(user, device)?,
                };
                let acked_seq = match old {
                    Some((epoch, acked, _)) if epoch == cursor.inbox_epoch => {
                        acked.max(cursor.acked_seq)
                    }
                    _ => cursor.acked_seq,
                };
                rows.insert(key, (cursor.inbox_epoch, acked_seq, cursor.last_seen_ms));
            }
            Ok(rows)
        })?;
        let rows: Vec<_> = rows
            .into_iter()
            .map(|(key, row)| (key, Some(row)))
            .collect();
        self.journal_cursors(&mut writer, rows)?;
        self.maybe_checkpoint(&mut writer, false);
        Ok(())
    }

    fn devices(&self, user: &str) -> Result<Vec<(String, DeviceCursor)>, StoreError> {
        Ok(self
            .read(|view| view.devices(user))?
            .into_iter()
            .map(|(device, cursor)| (device, device_cursor(cursor)))
            .collect())
    }

    fn remove_device(&self, user: &str, device: &str) -> Result<bool, StoreError> {
        // Advisory like every cursor write: journaled, not synced.
        let mut writer = self.writer.lock();
        if let Some(reason) = &writer.failed {
            return Err(StoreError::Engine(format!(
                "the store stopped writing after a failed write ({reason})"
            )));
        }
        let existed = self.read(|view| view.cursor(user, device))?.is_some();
        if existed {
            let key = (user.to_owned(), device.to_owned());
            self.journal_cursors(&mut writer, vec![(key, None)])?;
        }
        Ok(existed)
    }

    /// Per inbox, the new low watermark is the larger of two floors: just above the
    /// smallest `acked_seq` of the user's live devices (with `remove_acked`, and only if
    /// the user has one), and past the oldest entries while their `ts_ms` is below
    /// retention. Only the prefix below it goes, so an inbox stays the contiguous range
    /// `low..=head` that streaming relies on (an old entry behind a newer one, after a
    /// clock step back, waits for the next run).
    fn compact(&self, policy: &CompactPolicy) -> Result<CompactStats, StoreError> {
        let mut stats = CompactStats::default();
        // Compaction works on the database alone: everything in memory goes there
        // first, and no batch runs until it is done.
        let mut writer = self.writer.lock();
        self.checkpoint_now(&mut writer, true)?;
        let txn = self.begin_write()?;
        {
            let users = txn.open_table(USERS)?;
            let mut heads = txn.open_table(HEADS)?;
            let mut inbox = txn.open_table(INBOX)?;
            let mut dedup = txn.open_table(DEDUP)?;
            let mut cursors = txn.open_table(CURSORS)?;
            let delivered = txn.open_table(DELIVERED)?;
            let mut group_sent = txn.open_table(GROUP_SENT)?;

            // uid → smallest acked seq over the user's live devices.
            let mut acked_floors: HashMap<u64, u64> = HashMap::new();
            if policy.remove_acked {
                let mut by_user: HashMap<String, u64> = HashMap::new();
                for item in cursors.iter()? {
                    let (key, value) = item?;
                    let cursor = device_cursor(value.value());
                    if !cursor.is_live(self.epoch, policy.devices_before_ms) {
                        continue;
                    }
                    let user = key.value().0;
                    match by_user.get_mut(user) {
                        Some(floor) => *floor = (*floor).min(cursor.acked_seq),
                        None => {
                            by_user.insert(user.to_owned(), cursor.acked_seq);
                        }
                    }
                }
                for (user, floor) in by_user {
                    if let Some(uid) = users.get(user.as_str())?.map(|g| g.value()) {
                        acked_floors.insert(uid, floor);
                    }
                }
            }

            let mut inboxes = Vec::new();
            for item in heads.iter()? {
                let (uid, head_low) = item?;
                inboxes.push((uid.value(), head_low.value()));
            }
            for (uid, (head, low)) in inboxes {
                if low > head {
                    continue; // already empty
                }
                // Everything at or below every live device's cursor may go (a cursor
                // can never be above head, but a corrupt one must not move low past it).
                // Nothing goes before its delivered receipts were written.
                let delivered_up_to = delivered.get(uid)?.map_or(0, |g| g.value());
                let acked_low = acked_floors.get(&uid).map_or(low, |floor| {
                    (*floor)
                        .min(delivered_up_to)
                        .saturating_add(1)
                        .clamp(low, head + 1)
                });
                let mut new_low = acked_low;
                if new_low <= head {
                    for item in inbox.range((uid, new_low)..=(uid, head))? {
                        let (key, value) = item?;
                        let seq = key.value().1;
                        let entry = decode_entry(&format!("uid {uid}"), seq, value.value())?;
                        if entry.ts_ms >= policy.entries_before_ms {
                            break;
                        }
                        new_low = seq + 1;
                    }
                }
                if new_low == low {
                    continue;
                }
                let range = (Bound::Included((uid, low)), Bound::Excluded((uid, new_low)));
                inbox.retain_in(range, |key, _| {
                    stats.entries += 1;
                    stats.acked_entries += u64::from(key.1 < acked_low);
                    false
                })?;
                heads.insert(uid, (head, new_low))?;
            }

            // By age only, never with their entries: the dedup window is the retention.
            dedup.retain(|_, (_, _, ts_ms)| {
                let keep = ts_ms >= policy.entries_before_ms;
                stats.dedup_keys += u64::from(!keep);
                keep
            })?;
            // What aggregated group receipts look up goes with retention too.
            group_sent.retain(|_, ts_ms| ts_ms >= policy.entries_before_ms)?;
            cursors.retain(|_, (_, _, last_seen_ms)| {
                let keep = last_seen_ms >= policy.devices_before_ms;
                stats.devices += u64::from(!keep);
                keep
            })?;
        }
        txn.commit()?;
        self.retire_checkpoint(false)?;
        tracing::debug!(?stats, ?policy, "inbox store compacted");
        Ok(stats)
    }

    fn durability(&self) -> Durability {
        self.durability
    }

    fn conversations(
        &self,
        user: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<pb::Conversation>, StoreError> {
        let Some(uid) = self.uid(user)? else {
            return Ok(Vec::new());
        };
        Ok(self
            .read(|view| view.convs_after(uid, after, limit))?
            .into_iter()
            .map(|(conversation, row)| write::conversation_pb(conversation, row))
            .collect())
    }

    fn groups_of(&self, user: &str) -> Result<Vec<pb::GroupSummary>, StoreError> {
        let Some(uid) = self.uid(user)? else {
            return Ok(Vec::new());
        };
        self.read(|view| {
            let mut out = Vec::new();
            for group in view.groups_of(uid)? {
                if let Some(summary) = view.group(None, &group)? {
                    out.push(
                        pb::GroupSummary::decode(summary)
                            .map_err(|e| StoreError::Corrupt(format!("group {group:?}: {e}")))?,
                    );
                }
            }
            Ok(out)
        })
    }

    fn group(&self, group: &str) -> Result<Option<pb::GroupInfo>, StoreError> {
        self.read(|view| {
            let Some(summary) = view.group(None, group)? else {
                return Ok(None);
            };
            let summary = pb::GroupSummary::decode(summary)
                .map_err(|e| StoreError::Corrupt(format!("group {group:?}: {e}")))?;
            let members = view
                .members(None, group)?
                .into_iter()
                .map(|(user, row)| write::member_pb(user, &write::MemberRow::from_value(row)))
                .collect();
            Ok(Some(pb::GroupInfo {
                summary: Some(summary),
                members,
            }))
        })
    }
}

/// A `cursors` table value as a [`DeviceCursor`].
fn device_cursor((inbox_epoch, acked_seq, last_seen_ms): (u64, u64, u64)) -> DeviceCursor {
    DeviceCursor {
        inbox_epoch,
        acked_seq,
        last_seen_ms,
    }
}

/// Decodes the stored entry at `(user, seq)`; anything unexpected is [`StoreError::Corrupt`].
fn decode_entry(user: &str, seq: u64, bytes: &[u8]) -> Result<StoredEntry, StoreError> {
    let corrupt = |what: String| StoreError::Corrupt(format!("inbox {user:?} seq {seq}: {what}"));
    let entry = pb::Entry::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    if entry.seq != seq {
        return Err(corrupt(format!("entry says seq {}", entry.seq)));
    }
    let kind = match pb::EntryType::try_from(entry.r#type) {
        Ok(pb::EntryType::Message) => EntryKind::Message,
        Ok(pb::EntryType::Receipt) => EntryKind::Receipt,
        Ok(pb::EntryType::Membership) => EntryKind::Membership,
        _ => return Err(corrupt(format!("unknown entry type {}", entry.r#type))),
    };
    Ok(StoredEntry {
        seq,
        message_id: entry.message_id,
        from: entry.from,
        from_device: entry.from_device,
        conversation: entry.conversation,
        body: entry.body,
        content_type: entry.content_type,
        ts_ms: entry.ts_ms,
        kind,
        incoming: entry.incoming,
    })
}

macro_rules! engine_errors {
    ($($error:ty),* $(,)?) => {$(
        impl From<$error> for StoreError {
            fn from(e: $error) -> Self {
                StoreError::Engine(e.to_string())
            }
        }
    )*};
}

engine_errors!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError,
);

/// A file read and written with positioned I/O; `sync_data` is fdatasync.
///
/// For the database file, `sync_data` first writes the dirty pages back a
/// [`WRITEBACK_CHUNK`] at a time, waiting for each, and only then calls fdatasync. A
/// durable checkpoint dirties megabytes of B-tree pages; flushed in one go, they sat in
/// front of every journal fdatasync issued meanwhile (a virtual disk's flush takes all
/// the data written before it), which is where the 1:1 `fsync` p99 went: 3.8–7.1 ms
/// with one go, 2.0–2.4 ms in chunks (1,000 pairs at 5k msg/s, session 16). In
/// chunks, each journal sync waits for at most one chunk.
#[derive(Debug)]
struct FileBackend {
    file: File,
    /// The database file's dirty chunks (by index), written back in order on sync;
    /// `None` for the journal's files, whose syncs follow one small write each.
    dirty: Option<Mutex<std::collections::BTreeSet<u64>>>,
}

/// How much of the database file one writeback step takes (see [`FileBackend`]):
/// 64 KiB to 256 KiB measured alike, 1 MiB had a 34 ms p999.
const WRITEBACK_CHUNK: u64 = 256 << 10;

impl StorageBackend for FileBackend {
    fn len(&self) -> io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(out, offset)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        if let Some(dirty) = &self.dirty {
            let chunks = std::mem::take(&mut *dirty.lock());
            for chunk in chunks {
                write_back(&self.file, chunk * WRITEBACK_CHUNK, WRITEBACK_CHUNK)?;
            }
        }
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if let Some(dirty) = &self.dirty
            && let Some(last) = (data.len() as u64).checked_sub(1)
        {
            dirty
                .lock()
                .extend(offset / WRITEBACK_CHUNK..=(offset + last) / WRITEBACK_CHUNK);
        }
        self.file.write_all_at(data, offset)
    }
}

/// Starts writeback of `len` bytes of `file` at `offset` and waits for it (not a
/// flush of the disk's cache: the fdatasync after it does that).
fn write_back(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = libc::SYNC_FILE_RANGE_WAIT_BEFORE
        | libc::SYNC_FILE_RANGE_WRITE
        | libc::SYNC_FILE_RANGE_WAIT_AFTER;
    let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: sync_file_range on an open file descriptor; it reads no memory of ours.
    let rc = unsafe { libc::sync_file_range(file.as_raw_fd(), offset, len, flags) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// [`Durability::Relaxed`]: forwards everything to the wrapped backend except `sync_data`,
/// which returns at once. Commits reach the kernel (write(2)) but never wait for the disk.
#[derive(Debug)]
struct NoSync<B>(B);

impl<B: StorageBackend> StorageBackend for NoSync<B> {
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.0.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.0.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        self.0.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.0.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.0.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.0.query_lock_range(start, end)
    }
}
