//! The embedded [`Store`]: one redb file in one directory, no server to install.
//!
//! Every [`Store::append`] is one redb write transaction committed with
//! `redb::Durability::Immediate`, i.e. one `sync_data` on the storage backend after all the
//! batch's pages are written (group commit: one fdatasync per batch, not per message).
//! Durability is decided *below* redb, in the backend: [`Durability::Fsync`] lets that
//! `sync_data` through to `fdatasync`; [`Durability::Relaxed`] wraps the backend in
//! `NoSync`, so commits still reach the kernel with write(2) (they survive a process
//! crash) but never wait for the disk. One mechanism serves the real file and the
//! simulated disk of the power-cut tests.
//!
//! Tables (redb typed keys; tuples compare element by element, so one inbox's entries
//! are contiguous and ordered by seq). Users get a numeric id on first use, so the hot
//! tables have fixed-size keys that compare without UTF-8 checks (measured: a third of
//! the commit thread's time went to comparing string keys):
//!
//! | table     | key                                             | value                                     |
//! |-----------|-------------------------------------------------|-------------------------------------------|
//! | `meta`    | `&str`: `"epoch"`, `"next_message_id"`, `"next_uid"` | `u64`                                |
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

mod write;

pub use write::{DELIVERED_SCAN, GROUP_CONTENT_TYPE, RECEIPT_CONTENT_TYPE};

use crate::{
    AppendOutcome, AppendRequest, CompactPolicy, CompactStats, DeviceCursor, Durability, EntryKind,
    InboxInfo, Store, StoreError, StoredEntry,
};
use prost::Message;
use rand::Rng;
use redb::{BackendError, ReadableDatabase, ReadableTable, StorageBackend, TableDefinition};
use std::collections::HashMap;
use std::fs::{self, File, OpenOptions, TryLockError};
use std::io;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::Path;
use tether_proto::pb;

const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
const USERS: TableDefinition<&str, u64> = TableDefinition::new("users");
const HEADS: TableDefinition<u64, (u64, u64)> = TableDefinition::new("heads");
const INBOX: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("inbox");
/// `(sender uid, fnv1a(sender_device), client_msg_id)`.
type DedupKey = (u64, u64, &'static [u8; 16]);
/// `(message_id, sender_seq, ts_ms)`: the original ack.
type DedupValue = (u64, u64, u64);
const DEDUP: TableDefinition<DedupKey, DedupValue> = TableDefinition::new("dedup");
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

/// File in the data directory whose advisory lock keeps a second process out.
const LOCK_FILE: &str = "LOCK";
/// The redb database file in the data directory.
const DB_FILE: &str = "inbox.redb";

/// Epochs stay below 2^53 so they survive a trip through JSON numbers.
const EPOCH_LIMIT: u64 = 1 << 53;

/// The embedded store: inboxes, dedup keys and cursors in one redb database.
#[derive(Debug)]
pub struct EmbeddedStore {
    db: redb::Database,
    epoch: u64,
    durability: Durability,
    /// user → uid, filled from the `users` table as users are met.
    uids: parking_lot::RwLock<HashMap<String, u64>>,
    /// Held (locked) for as long as the store is open; dropped after `db`.
    _dir_lock: Option<File>,
}

impl EmbeddedStore {
    /// Opens (or creates) the store in `dir`, holding `dir/LOCK` exclusively while open.
    pub fn open(dir: &Path, durability: Durability) -> Result<Self, StoreError> {
        Self::open_dir(dir, durability, |file| Ok(FileBackend { file }))
    }

    /// Like [`EmbeddedStore::open`], but the data file's unsynced writes live in process
    /// memory until fdatasync (a random `writeback` share goes through early), so
    /// killing the process is a power cut: see [`PowerLossFile`](crate::PowerLossFile).
    /// For chaos runs and tests only.
    pub fn open_power_loss(dir: &Path, seed: u64, writeback: f64) -> Result<Self, StoreError> {
        Self::open_dir(dir, Durability::Fsync, |file| {
            crate::PowerLossFile::new(file, seed, writeback)
        })
    }

    fn open_dir<B: StorageBackend>(
        dir: &Path,
        durability: Durability,
        backend: impl FnOnce(File) -> io::Result<B>,
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
        let path = dir.join(DB_FILE);
        let file_created = !path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let store = Self::with_backend(backend(file)?, durability, Some(lock))?;
        if durability == Durability::Fsync {
            // The new directory entries must survive a power cut, or the data would not.
            if file_created {
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

    /// Opens (or creates) the store on any redb storage backend, e.g. a
    /// [`SimulatedDisk`](crate::SimulatedDisk). The caller ensures exclusive access.
    pub fn open_with_backend(
        backend: impl StorageBackend,
        durability: Durability,
    ) -> Result<Self, StoreError> {
        Self::with_backend(backend, durability, None)
    }

    fn with_backend(
        backend: impl StorageBackend,
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
        let db = match durability {
            Durability::Fsync => builder.create_with_backend(backend)?,
            Durability::Relaxed => builder.create_with_backend(NoSync(backend))?,
        };
        let epoch = init_tables(&db)?;
        tracing::debug!(epoch, %durability, "inbox store open");
        Ok(Self {
            db,
            epoch,
            durability,
            uids: Default::default(),
            _dir_lock: dir_lock,
        })
    }

    /// The uid of `user`, if the user has ever had an inbox.
    fn uid(&self, user: &str) -> Result<Option<u64>, StoreError> {
        if let Some(uid) = self.uids.read().get(user) {
            return Ok(Some(*uid));
        }
        let txn = self.db.begin_read()?;
        let uid = txn.open_table(USERS)?.get(user)?.map(|g| g.value());
        if let Some(uid) = uid {
            self.uids.write().insert(user.to_owned(), uid);
        }
        Ok(uid)
    }

    fn begin_write(&self) -> Result<redb::WriteTransaction, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::Immediate)?;
        Ok(txn)
    }
}

/// Makes the entries of directory `dir` durable.
fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)?.sync_all()?;
    Ok(())
}

/// Creates the tables if missing and returns the store epoch, choosing it on first open.
fn init_tables(db: &redb::Database) -> Result<u64, StoreError> {
    let txn = db.begin_write()?;
    let epoch = {
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
        let stored = meta.get(EPOCH_KEY)?.map(|guard| guard.value());
        match stored {
            Some(0) => return Err(StoreError::Corrupt("store epoch is 0".into())),
            Some(epoch) => epoch,
            None => {
                let epoch = rand::rng().random_range(1..EPOCH_LIMIT);
                meta.insert(EPOCH_KEY, epoch)?;
                meta.insert(NEXT_MESSAGE_ID_KEY, 1)?;
                meta.insert(NEXT_UID_KEY, 1)?;
                epoch
            }
        }
    };
    txn.commit()?;
    Ok(epoch)
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
        let txn = self.begin_write()?;
        let cached = self.uids.read();
        let (outcomes, assigned) = {
            let mut writer = write::Writer::open(&txn, &cached)?;
            let mut outcomes = Vec::with_capacity(batch.len());
            for (index, req) in batch.iter().enumerate() {
                outcomes.push(writer.apply(index, req)?);
            }
            writer.aggregate_deferred(batch, &mut outcomes)?;
            (outcomes, writer.finish()?)
        };
        drop(cached);
        // An early return above drops `txn`, which aborts it: nothing is committed.
        txn.commit()?;
        if !assigned.is_empty() {
            self.uids.write().extend(assigned);
        }
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
        let txn = self.db.begin_read()?;
        let inbox = txn.open_table(INBOX)?;
        let span = usize::try_from(to - from).unwrap_or(usize::MAX);
        let mut entries = Vec::with_capacity(limit.min(span.saturating_add(1)).min(1024));
        for item in inbox.range((uid, from)..=(uid, to))?.take(limit) {
            let (key, value) = item?;
            entries.push(decode_entry(user, key.value().1, value.value())?);
        }
        Ok(entries)
    }

    fn inbox_info(&self, user: &str) -> Result<InboxInfo, StoreError> {
        let (head, low) = match self.uid(user)? {
            Some(uid) => {
                let txn = self.db.begin_read()?;
                let heads = txn.open_table(HEADS)?;
                heads.get(uid)?.map(|guard| guard.value()).unwrap_or((0, 1))
            }
            None => (0, 1),
        };
        Ok(InboxInfo {
            epoch: self.epoch,
            head,
            low,
        })
    }

    fn cursor(&self, user: &str, device: &str) -> Result<Option<DeviceCursor>, StoreError> {
        let txn = self.db.begin_read()?;
        let cursors = txn.open_table(CURSORS)?;
        Ok(cursors
            .get((user, device))?
            .map(|guard| device_cursor(guard.value())))
    }

    fn sync(&self) -> Result<(), StoreError> {
        // An empty durable commit makes the non-durable ones before it durable.
        self.begin_write()?.commit()?;
        Ok(())
    }

    fn set_cursors(&self, updates: &[(String, String, DeviceCursor)]) -> Result<(), StoreError> {
        if updates.is_empty() {
            return Ok(());
        }
        // Cursors are advisory (a device's own resume point wins; a lost cursor only
        // means redelivery, which clients drop by seq), so they do not pay for a sync
        // of their own: redb keeps this commit in memory and makes it durable with the
        // next durable commit, i.e. the next batch of messages.
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        {
            let mut cursors = txn.open_table(CURSORS)?;
            for (user, device, cursor) in updates {
                let key = (user.as_str(), device.as_str());
                let old = cursors.get(key)?.map(|guard| guard.value());
                let acked_seq = match old {
                    Some((epoch, acked, _)) if epoch == cursor.inbox_epoch => {
                        acked.max(cursor.acked_seq)
                    }
                    _ => cursor.acked_seq,
                };
                cursors.insert(key, (cursor.inbox_epoch, acked_seq, cursor.last_seen_ms))?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    fn devices(&self, user: &str) -> Result<Vec<(String, DeviceCursor)>, StoreError> {
        let txn = self.db.begin_read()?;
        let cursors = txn.open_table(CURSORS)?;
        let mut devices = Vec::new();
        // Keys sort by user first, so one user's devices are one contiguous run.
        for item in cursors.range((user, "")..)? {
            let (key, value) = item?;
            let (owner, device) = key.value();
            if owner != user {
                break;
            }
            devices.push((device.to_owned(), device_cursor(value.value())));
        }
        Ok(devices)
    }

    fn remove_device(&self, user: &str, device: &str) -> Result<bool, StoreError> {
        // Advisory like every cursor write: durable with the next durable commit.
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)?;
        let removed = txn.open_table(CURSORS)?.remove((user, device))?.is_some();
        txn.commit()?;
        Ok(removed)
    }

    /// Per inbox, the new low watermark is the larger of two floors: just above the
    /// smallest `acked_seq` of the user's live devices (with `remove_acked`, and only if
    /// the user has one), and past the oldest entries while their `ts_ms` is below
    /// retention. Only the prefix below it goes, so an inbox stays the contiguous range
    /// `low..=head` that streaming relies on (an old entry behind a newer one, after a
    /// clock step back, waits for the next run).
    fn compact(&self, policy: &CompactPolicy) -> Result<CompactStats, StoreError> {
        let mut stats = CompactStats::default();
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
        let txn = self.db.begin_read()?;
        let convs = txn.open_table(CONVS)?;
        let mut out = Vec::new();
        for item in convs.range((uid, after)..)? {
            let (key, value) = item?;
            let (owner, conversation) = key.value();
            if owner != uid || out.len() >= limit {
                break;
            }
            if conversation == after {
                continue;
            }
            out.push(write::conversation_pb(
                conversation.to_owned(),
                value.value(),
            ));
        }
        Ok(out)
    }

    fn groups_of(&self, user: &str) -> Result<Vec<pb::GroupSummary>, StoreError> {
        let Some(uid) = self.uid(user)? else {
            return Ok(Vec::new());
        };
        let txn = self.db.begin_read()?;
        let user_groups = txn.open_table(USER_GROUPS)?;
        let groups = txn.open_table(GROUPS)?;
        let mut out = Vec::new();
        for item in user_groups.range((uid, "")..)? {
            let (key, _) = item?;
            let (owner, group) = key.value();
            if owner != uid {
                break;
            }
            if let Some(summary) = groups.get(group)? {
                out.push(
                    pb::GroupSummary::decode(summary.value())
                        .map_err(|e| StoreError::Corrupt(format!("group {group:?}: {e}")))?,
                );
            }
        }
        Ok(out)
    }

    fn group(&self, group: &str) -> Result<Option<pb::GroupInfo>, StoreError> {
        let txn = self.db.begin_read()?;
        let groups = txn.open_table(GROUPS)?;
        let Some(summary) = groups.get(group)? else {
            return Ok(None);
        };
        let summary = pb::GroupSummary::decode(summary.value())
            .map_err(|e| StoreError::Corrupt(format!("group {group:?}: {e}")))?;
        let members = txn.open_table(MEMBERS)?;
        let members = write::member_rows(&members, group)?
            .into_iter()
            .map(|(user, row)| write::member_pb(user, &row))
            .collect();
        Ok(Some(pb::GroupInfo {
            summary: Some(summary),
            members,
        }))
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

/// The data file, read and written with positioned I/O; `sync_data` is fdatasync.
#[derive(Debug)]
struct FileBackend {
    file: File,
}

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
        self.file.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }
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
