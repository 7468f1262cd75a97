//! Durable inboxes: the [`Store`] trait (batch-first) and its embedded backend.
//!
//! This crate owns what must survive a crash: every user's inbox (entries by seq),
//! the dedup keys of sends, device cursors, and the inbox epoch. It does not own
//! sessions, notifications or batching policy: the server's single commit path
//! collects concurrent sends into one [`Store::append`] call (group commit).
//!
//! The embedded backend is [redb](https://docs.rs/redb): a pure-Rust, crash-safe
//! B-tree store that compiles in seconds and lets us plug in our own storage layer,
//! which is how `relaxed` durability (write(2) without fdatasync) and the power-cut
//! tests (a simulated disk that drops unsynced bytes) are built. See [`embedded`].

pub mod embedded;
pub mod power_loss;
pub mod sim_disk;

use bytes::Bytes;
use std::fmt;
use tether_proto::pb;
use thiserror::Error;

pub use embedded::EmbeddedStore;
pub use power_loss::PowerLossFile;
pub use sim_disk::SimulatedDisk;

/// What a commit waits for before it returns (and so before SEND_ACK is sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// After fdatasync of the record: survives a power cut. The default.
    #[default]
    Fsync,
    /// After write(2): survives a process crash, not a power cut. Always labelled.
    Relaxed,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fsync" => Ok(Durability::Fsync),
            "relaxed" => Ok(Durability::Relaxed),
            _ => Err(format!("`{s}`: expected fsync or relaxed")),
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Durability::Fsync => "fsync",
            Durability::Relaxed => "relaxed",
        })
    }
}

/// The kind of an inbox entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    /// A message someone sent.
    Message,
    /// A delivered or read receipt (body: `tether.v1.ReceiptBody`).
    Receipt,
    /// A group membership change (body: `tether.v1.GroupEvent`).
    Membership,
}

/// One inbox an appended message lands in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxTarget {
    /// Owner of the inbox.
    pub user: String,
    /// The conversation as seen from this inbox (the other user, or `g:<group>`).
    pub conversation: String,
}

/// What an [`AppendRequest`] does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// A message into these inboxes. For 1:1 the recipient's and the sender's own (the
    /// sender's other devices see what it sent); `sender_seq` is the seq there.
    Message(Vec<InboxTarget>),
    /// A message into the inbox of every current member of the group, the sender's
    /// included; the sender must be a member.
    GroupMessage(String),
    /// A membership change, recorded as an [`EntryKind::Membership`] entry in the inbox
    /// of every member before and after it. `body` is ignored.
    Group(GroupChange),
    /// The sender read its inbox up to `up_to_seq` in `conversation`: moves its unread
    /// count, echoes a read receipt to its own devices and sends one to the peer (or
    /// moves its read mark in the group). Not deduplicated: marks only move forward.
    Read(ReadMark),
    /// A device of the sender holds its inbox up to `up_to_seq`: delivered receipts go
    /// to the senders of what it newly covers (or group marks move). Not deduplicated.
    Delivered {
        /// Highest seq held.
        up_to_seq: u64,
    },
}

/// A read position, as the reader's device saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadMark {
    /// The conversation, as seen from the reader's inbox.
    pub conversation: String,
    /// Seq, in the reader's inbox, of the last entry of the conversation read.
    pub up_to_seq: u64,
    /// That entry's message id and `incoming` count, as delivered. Used only when the
    /// entry was compacted away (the stored entry wins otherwise), and clamped.
    pub message_id: u64,
    /// See `message_id`.
    pub incoming: u64,
}

/// A group membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupChange {
    /// Group id ([`tether_proto::valid_group_id`]).
    pub group: String,
    /// What changes.
    pub op: GroupOp,
    /// Users created with, added or removed (empty for leave).
    pub members: Vec<String>,
    /// Display name (create).
    pub name: String,
    /// Most members the group may have.
    pub max_members: u32,
}

/// Membership operations. Policy: any member adds; only the owner removes; anyone
/// leaves; an owner who leaves passes ownership to the longest-standing member; a
/// group whose last member left stays as a tombstone (its id is not reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupOp {
    /// Create with the sender as owner.
    Create,
    /// Add members.
    Add,
    /// Remove members (owner only).
    Remove,
    /// The sender leaves.
    Leave,
}

/// One operation to commit: a message (with its dedup key `(sender, sender_device,
/// client_msg_id)`, one seq in every target inbox, in one atomic record), a membership
/// change (deduplicated the same way), or a receipt mark.
#[derive(Debug, Clone)]
pub struct AppendRequest {
    /// Sending user.
    pub sender: String,
    /// Sending device.
    pub sender_device: String,
    /// Client message id, unique per sender device (ignored by marks).
    pub client_msg_id: [u8; 16],
    /// What to do.
    pub action: Action,
    /// Opaque body.
    pub body: Bytes,
    /// MIME-like content type, may be empty.
    pub content_type: String,
    /// Server timestamp, ms since the Unix epoch.
    pub ts_ms: u64,
}

/// Why an operation was refused (nothing was written for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refuse {
    /// Not a member, not the owner, not a conversation of the sender's inbox.
    Forbidden,
    /// The group would exceed its member cap.
    GroupFull,
    /// No such group.
    NotFound,
    /// Contradicts the state (exists already, already a member, not a member).
    Conflict,
    /// Malformed (a bad id, a seq outside the inbox or the conversation).
    BadRequest,
}

/// What the sender is told: the SEND_ACK content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Committed {
    /// Server message id, unique in the store.
    pub message_id: u64,
    /// Seq of the copy in the sender's own inbox (0 if the sender's inbox was not a target).
    pub sender_seq: u64,
    /// Timestamp stored with the message.
    pub ts_ms: u64,
}

/// Result of one [`AppendRequest`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppendOutcome {
    /// Newly committed; `heads` lists every target inbox with its new head.
    New {
        /// SEND_ACK content.
        ack: Committed,
        /// (user, new head) for each target inbox.
        heads: Vec<(String, u64)>,
    },
    /// The dedup key was already known: nothing was written; this is the original ack.
    Duplicate(Committed),
    /// Refused: nothing was written.
    Refused {
        /// The category (maps to a protocol error code).
        code: Refuse,
        /// For the peer.
        reason: String,
    },
}

/// A stored inbox entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntry {
    /// Position in the inbox, from 1.
    pub seq: u64,
    /// Server message id.
    pub message_id: u64,
    /// Sending user.
    pub from: String,
    /// Sending device.
    pub from_device: String,
    /// The other party from this inbox's point of view.
    pub conversation: String,
    /// Opaque body.
    pub body: Bytes,
    /// Content type.
    pub content_type: String,
    /// Server timestamp, ms.
    pub ts_ms: u64,
    /// Entry kind.
    pub kind: EntryKind,
    /// Messages from others in this conversation in this inbox up to this entry.
    pub incoming: u64,
}

/// Where an inbox stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboxInfo {
    /// Epoch of the inbox: cursors from another epoch do not apply.
    pub epoch: u64,
    /// Highest seq assigned (0 if empty).
    pub head: u64,
    /// Lowest seq still retained (head + 1 if everything was compacted or nothing exists).
    pub low: u64,
}

/// A device's cursor, as the server last recorded it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCursor {
    /// Epoch the cursor refers to.
    pub inbox_epoch: u64,
    /// The device holds everything up to and including this seq.
    pub acked_seq: u64,
    /// Last time the device was seen, ms since the Unix epoch.
    pub last_seen_ms: u64,
}

impl DeviceCursor {
    /// Whether this is a live device's cursor: of the store's `epoch`, and seen at or
    /// after `seen_since_ms` (the device expiry). Only live cursors hold entries back
    /// from acked compaction and count towards a user's devices.
    pub fn is_live(&self, epoch: u64, seen_since_ms: u64) -> bool {
        self.inbox_epoch == epoch && self.last_seen_ms >= seen_since_ms
    }
}

/// What one [`Store::compact`] run removes. Times are ms since the Unix epoch.
///
/// Dedup keys go by age only, never with their entries: the dedup window announced to
/// clients is the retention, so a resend of a message whose inbox copies were removed
/// because every device had them is still answered with its original ack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactPolicy {
    /// Retention: entries and dedup keys stamped before this are removed.
    pub entries_before_ms: u64,
    /// Device expiry: cursors of devices last seen before this are removed; only
    /// cursors seen since (and of the store's epoch) are live.
    pub devices_before_ms: u64,
    /// Also remove each inbox's entries at or below the smallest `acked_seq` of its
    /// user's live devices. An inbox whose user has no live device keeps its entries
    /// until retention, so the user's first device gets them.
    pub remove_acked: bool,
}

/// What compaction removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactStats {
    /// Inbox entries removed.
    pub entries: u64,
    /// Of `entries`, those at or below every live device's cursor (the rest were past
    /// retention).
    pub acked_entries: u64,
    /// Dedup keys removed.
    pub dedup_keys: u64,
    /// Device cursors removed (devices not seen within the expiry).
    pub devices: u64,
}

/// Errors from a store. Any error from [`Store::append`] means nothing in the batch
/// was committed.
#[derive(Debug, Error)]
pub enum StoreError {
    /// I/O on the underlying files.
    #[error("store I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The engine reported an error.
    #[error("store engine error: {0}")]
    Engine(String),
    /// Stored bytes could not be decoded.
    #[error("corrupt store record: {0}")]
    Corrupt(String),
    /// The data directory is held by another process.
    #[error("data directory {0} is locked by another process")]
    Locked(String),
}

/// Durable inbox storage. Batch-first: one call commits many messages atomically.
///
/// Methods are blocking; the server calls `append` from its commit thread and reads
/// from its connection tasks (reads are short and mostly served from cache).
pub trait Store: Send + Sync + 'static {
    /// Atomically commits a batch: per request, a new message id, one seq per target
    /// inbox, and the dedup key; duplicates (also duplicates within the batch) get the
    /// original ack. Returns only when the batch is durable under the store's
    /// [`Durability`]. Outcomes are in request order.
    fn append(&self, batch: &[AppendRequest]) -> Result<Vec<AppendOutcome>, StoreError>;

    /// Entries of `user`'s inbox with `from <= seq <= to`, ascending, at most `limit`.
    fn read_range(
        &self,
        user: &str,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<StoredEntry>, StoreError>;

    /// Epoch, head and low watermark of `user`'s inbox (an empty inbox has head 0).
    fn inbox_info(&self, user: &str) -> Result<InboxInfo, StoreError>;

    /// The recorded cursor of a device, if the device is known.
    fn cursor(&self, user: &str, device: &str) -> Result<Option<DeviceCursor>, StoreError>;

    /// Records device cursors (coalesced by the caller). Cursors only move forward
    /// within an epoch; a smaller `acked_seq` of the same epoch is ignored. Cursors are
    /// advisory, so they need not be durable at once: they survive a crash, and they
    /// are durable after the next successful [`Store::append`] or [`Store::sync`].
    fn set_cursors(&self, cursors: &[(String, String, DeviceCursor)]) -> Result<(), StoreError>;

    /// Makes everything recorded so far durable (used at shutdown).
    fn sync(&self) -> Result<(), StoreError>;

    /// Housekeeping while no writes come (the commit loop calls it when idle): work
    /// that writes normally trigger, such as a due checkpoint, runs anyway, so memory
    /// held for rows already journaled is released.
    fn idle(&self) -> Result<(), StoreError> {
        Ok(())
    }

    /// Every recorded cursor of `user`'s devices, by device id, whatever its epoch or
    /// age (check [`DeviceCursor::is_live`]).
    fn devices(&self, user: &str) -> Result<Vec<(String, DeviceCursor)>, StoreError>;

    /// Forgets a device's cursor (the device cap evicts a device this way). Returns
    /// whether there was one. Durable like [`Store::set_cursors`].
    fn remove_device(&self, user: &str, device: &str) -> Result<bool, StoreError>;

    /// Removes what `policy` says: entries past retention or (with
    /// [`CompactPolicy::remove_acked`]) held by every live device, dedup keys past
    /// retention, cursors of expired devices. Each inbox loses a prefix only, so it
    /// stays the contiguous range `low..=head`; `low` only moves up, `head` never moves.
    fn compact(&self, policy: &CompactPolicy) -> Result<CompactStats, StoreError>;

    /// The durability this store commits with.
    fn durability(&self) -> Durability;

    /// The conversations of `user`'s inbox ordered by id, after `after`, at most `limit`.
    fn conversations(
        &self,
        user: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<pb::Conversation>, StoreError>;

    /// The groups `user` is a member of, by group id.
    fn groups_of(&self, user: &str) -> Result<Vec<pb::GroupSummary>, StoreError>;

    /// A group with its members and their marks; `None` if it does not exist (a group
    /// every member left has no members).
    fn group(&self, group: &str) -> Result<Option<pb::GroupInfo>, StoreError>;
}
