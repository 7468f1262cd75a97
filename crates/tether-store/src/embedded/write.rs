//! One [`Store::append`](crate::Store::append) batch: messages, group messages and
//! membership changes, and receipt marks, computed into one [`Delta`] over the store's
//! layers (see [`layers`](super::layers)). The writer is deterministic: the same batch
//! over the same state writes the same rows, which is what journal replay relies on.
//!
//! Everything a batch writes lands in the same atomic record: the entries in every
//! target inbox, the inboxes' heads, the conversation rows that unread counts come
//! from, group membership and marks, and the dedup keys.
//!
//! Receipts (DESIGN §6) are entries like messages:
//! - *Delivered*: when a device ACKs seq N, the entries of the user's inbox between the
//!   user's delivered mark and N are scanned once; each 1:1 peer whose messages are
//!   among them gets one DELIVERED entry "up to message id M", each group the user's
//!   delivered mark. The mark is stored, so a repeated or older ACK writes nothing and
//!   a crash before the commit loses nothing (the next ACK covers the range again).
//! - *Read*: a RECEIPT moves the reader's read position in the conversation (its
//!   unread count), writes a READ entry into the reader's own inbox (its other devices
//!   follow) and one into the 1:1 peer's, or moves the reader's read mark in a group.
//! - *Groups, aggregated*: member marks never write into senders' inboxes one by one.
//!   A sender gets a DELIVERED / READ entry (by = "", "every other member") when the
//!   smallest mark among the *other* current members passes one of its messages; one
//!   entry covers all its messages up to that point. So a message costs its sender at
//!   most two receipt entries whatever the group's size. Per-member marks are queryable.
//!   The aggregate is computed once per group per batch (a pass over the members), not
//!   once per mark: a 500-member group ACKing in one batch costs one pass, not 500.

use super::layers::{DedupKey, Delta, View};
use super::{ConvValue, MemberValue, decode_entry, fnv1a};
use crate::{
    Action, AppendOutcome, AppendRequest, Committed, EntryKind, GroupChange, GroupOp, ReadMark,
    Refuse, StoreError,
};
use bytes::Bytes;
use prost::Message;
use std::collections::hash_map::Entry as MapEntry;
use std::collections::{BTreeMap, HashMap};
use tether_proto::{GROUP_PREFIX, conversation_group, group_conversation, pb, valid_group_id};

/// Content type of receipt entries.
pub const RECEIPT_CONTENT_TYPE: &str = "application/x-tether-receipt";
/// Content type of membership entries.
pub const GROUP_CONTENT_TYPE: &str = "application/x-tether-group";

/// Most inbox entries one delivered mark scans; the rest waits for the next batch
/// (the caller sees how far it got in `sender_seq`).
pub const DELIVERED_SCAN: u64 = 4096;

/// Head and low watermark of one inbox while a batch is being appended.
struct InboxHead {
    head: u64,
    low: u64,
    /// Message that last took a seq here: a user listed twice in `targets` gets one copy.
    last_message_id: u64,
}

/// A conversation row (`convs` table).
#[derive(Debug, Clone, Copy, Default)]
struct ConvRow {
    last_seq: u64,
    last_ts: u64,
    last_mid: u64,
    incoming: u64,
    read_seq: u64,
    read_incoming: u64,
}

impl ConvRow {
    fn from_value(v: ConvValue) -> Self {
        let (last_seq, last_ts, last_mid, incoming, read_seq, read_incoming) = v;
        Self {
            last_seq,
            last_ts,
            last_mid,
            incoming,
            read_seq,
            read_incoming,
        }
    }

    fn value(&self) -> ConvValue {
        (
            self.last_seq,
            self.last_ts,
            self.last_mid,
            self.incoming,
            self.read_seq,
            self.read_incoming,
        )
    }
}

/// A member row (`members` table): joined at, marks, and what its own messages were
/// last aggregated up to.
#[derive(Debug, Clone, Copy)]
pub(super) struct MemberRow {
    joined: u64,
    delivered: u64,
    read: u64,
    notified_delivered: u64,
    notified_read: u64,
}

impl MemberRow {
    fn joined(mid: u64) -> Self {
        Self {
            joined: mid,
            delivered: mid,
            read: mid,
            notified_delivered: mid,
            notified_read: mid,
        }
    }

    pub(super) fn from_value(v: MemberValue) -> Self {
        let (joined, delivered, read, notified_delivered, notified_read) = v;
        Self {
            joined,
            delivered,
            read,
            notified_delivered,
            notified_read,
        }
    }

    fn value(&self) -> MemberValue {
        (
            self.joined,
            self.delivered,
            self.read,
            self.notified_delivered,
            self.notified_read,
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    Delivered,
    Read,
}

fn refused(code: Refuse, reason: impl Into<String>) -> AppendOutcome {
    AppendOutcome::Refused {
        code,
        reason: reason.into(),
    }
}

/// A user id a group may hold: what a login may carry.
fn valid_user_id(user: &str) -> bool {
    !user.is_empty()
        && user.len() <= tether_proto::frame::MAX_ID_LEN
        && !user.starts_with(GROUP_PREFIX)
}

/// The state a batch reads, what it writes, and what it has learnt so far.
pub(super) struct Writer<'t> {
    /// The store as of the batch's start.
    view: &'t View<'t>,
    /// What the batch writes (read first: it is the newest layer).
    pending: Delta,
    /// Users known before the batch (the store's cache).
    cached: &'t HashMap<String, u64>,
    /// uids met or assigned in this batch (`true`: new, cached after the commit).
    batch_uids: HashMap<String, (u64, bool)>,
    next_uid: u64,
    next_message_id: u64,
    /// Heads are read once per batch and written back once at the end.
    touched: HashMap<u64, InboxHead>,
    /// Conversation rows, likewise.
    conv_rows: HashMap<(u64, String), ConvRow>,
    /// Member lists of groups messaged in this batch.
    member_lists: HashMap<String, Vec<String>>,
    /// One entry and one buffer reused for every copy: strings keep their capacity.
    entry: pb::Entry,
    encoded: Vec<u8>,
    /// Inboxes the current request appended to, with their new heads.
    new_heads: Vec<(String, u64)>,
    /// Groups whose member marks moved in this batch → the last request that moved
    /// them. Aggregation runs once per group at the end of the batch: per mark it
    /// would cost every ACK of a large group a pass over all members.
    deferred: BTreeMap<String, usize>,
    /// Index of the request being applied.
    current: usize,
}

impl<'t> Writer<'t> {
    /// A batch over `view`, with the store's counters `(next_message_id, next_uid)`.
    pub(super) fn new(
        view: &'t View<'t>,
        cached: &'t HashMap<String, u64>,
        (next_message_id, next_uid): (u64, u64),
    ) -> Self {
        Self {
            view,
            pending: Delta::default(),
            cached,
            batch_uids: HashMap::new(),
            next_uid,
            next_message_id,
            touched: HashMap::new(),
            conv_rows: HashMap::new(),
            member_lists: HashMap::new(),
            entry: pb::Entry::default(),
            encoded: Vec::new(),
            new_heads: Vec::new(),
            deferred: BTreeMap::new(),
            current: 0,
        }
    }

    /// Applies request `index` of the batch.
    pub(super) fn apply(
        &mut self,
        index: usize,
        req: &AppendRequest,
    ) -> Result<AppendOutcome, StoreError> {
        self.current = index;
        self.new_heads.clear();
        match &req.action {
            Action::Message(targets) => {
                if let Some(dup) = self.duplicate(req)? {
                    return Ok(dup);
                }
                let message_id = self.take_message_id();
                self.set_entry(
                    req,
                    message_id,
                    EntryKind::Message,
                    &req.body,
                    &req.content_type,
                );
                let mut sender_seq = 0;
                for target in targets {
                    let seq = self.put_copy(&target.user, &target.conversation)?;
                    if target.user == req.sender && seq > 0 {
                        sender_seq = seq;
                    }
                }
                self.committed(req, message_id, sender_seq)
            }
            Action::GroupMessage(group) => self.group_message(req, group),
            Action::Group(change) => self.group_change(req, change),
            Action::Read(mark) => self.read(req, mark),
            Action::Delivered { up_to_seq } => self.delivered_mark(req, *up_to_seq),
        }
    }

    /// Runs the aggregation of every group whose marks moved in this batch; the heads
    /// it moves join the outcome of the last request that moved the group's marks.
    pub(super) fn aggregate_deferred(
        &mut self,
        batch: &[AppendRequest],
        outcomes: &mut [AppendOutcome],
    ) -> Result<(), StoreError> {
        for (group, index) in std::mem::take(&mut self.deferred) {
            self.new_heads.clear();
            self.aggregate(&batch[index], &group)?;
            if let AppendOutcome::New { heads, .. } = &mut outcomes[index] {
                heads.append(&mut self.new_heads);
            }
        }
        Ok(())
    }

    /// Writes back heads, conversation rows and counters; returns what the batch
    /// writes and the uids it assigned.
    pub(super) fn finish(mut self) -> (Delta, Vec<(String, u64)>) {
        for (uid, inbox_head) in &self.touched {
            self.pending
                .heads
                .insert(*uid, (inbox_head.head, inbox_head.low));
        }
        for ((uid, conversation), row) in self.conv_rows {
            self.pending.convs.insert((uid, conversation), row.value());
        }
        self.pending.counters = Some((self.next_message_id, self.next_uid));
        let assigned = self
            .batch_uids
            .into_iter()
            .filter(|(_, (_, new))| *new)
            .map(|(user, (uid, _))| (user, uid))
            .collect();
        (self.pending, assigned)
    }

    fn take_message_id(&mut self) -> u64 {
        let id = self.next_message_id;
        self.next_message_id += 1;
        id
    }

    /// The uid of `user`: from this batch, the cache, the table, or newly assigned.
    fn uid(&mut self, user: &str) -> Result<u64, StoreError> {
        if let Some(uid) = self.existing_uid(user)? {
            return Ok(uid);
        }
        let uid = self.next_uid;
        self.next_uid += 1;
        self.pending.users.insert(user.to_owned(), uid);
        self.batch_uids.insert(user.to_owned(), (uid, true));
        Ok(uid)
    }

    /// The uid of `user` if the user ever had an inbox.
    fn existing_uid(&mut self, user: &str) -> Result<Option<u64>, StoreError> {
        if let Some((uid, _)) = self.batch_uids.get(user) {
            return Ok(Some(*uid));
        }
        let found = match self.cached.get(user) {
            Some(uid) => Some(*uid),
            None => self.view.user(Some(&self.pending), user)?,
        };
        if let Some(uid) = found {
            self.batch_uids.insert(user.to_owned(), (uid, false));
        }
        Ok(found)
    }

    fn dedup_key(&mut self, req: &AppendRequest) -> Result<DedupKey, StoreError> {
        Ok((
            self.uid(&req.sender)?,
            fnv1a(req.sender_device.as_bytes()),
            req.client_msg_id,
        ))
    }

    /// The original ack if this request's dedup key is known. Keys inserted earlier in
    /// this batch are visible too, so duplicates inside a batch are caught.
    fn duplicate(&mut self, req: &AppendRequest) -> Result<Option<AppendOutcome>, StoreError> {
        let key = self.dedup_key(req)?;
        Ok(self.view.dedup(Some(&self.pending), &key)?.map(|original| {
            let (message_id, sender_seq, ts_ms) = original;
            AppendOutcome::Duplicate(Committed {
                message_id,
                sender_seq,
                ts_ms,
            })
        }))
    }

    /// Records the dedup key and returns the outcome of a new commit.
    fn committed(
        &mut self,
        req: &AppendRequest,
        message_id: u64,
        sender_seq: u64,
    ) -> Result<AppendOutcome, StoreError> {
        let key = self.dedup_key(req)?;
        self.pending
            .dedup
            .insert(key, (message_id, sender_seq, req.ts_ms));
        Ok(self.outcome(message_id, sender_seq, req.ts_ms))
    }

    fn outcome(&mut self, message_id: u64, sender_seq: u64, ts_ms: u64) -> AppendOutcome {
        AppendOutcome::New {
            ack: Committed {
                message_id,
                sender_seq,
                ts_ms,
            },
            heads: std::mem::take(&mut self.new_heads),
        }
    }

    /// Fills the per-message fields of the reused entry (seq and conversation are set
    /// per inbox).
    fn set_entry(
        &mut self,
        req: &AppendRequest,
        message_id: u64,
        kind: EntryKind,
        body: &bytes::Bytes,
        content_type: &str,
    ) {
        let entry = &mut self.entry;
        entry.message_id = message_id;
        entry.from.clear();
        entry.from.push_str(&req.sender);
        entry.from_device.clear();
        entry.from_device.push_str(&req.sender_device);
        entry.body = body.clone();
        entry.content_type.clear();
        entry.content_type.push_str(content_type);
        entry.ts_ms = req.ts_ms;
        entry.r#type = match kind {
            EntryKind::Message => pb::EntryType::Message,
            EntryKind::Receipt => pb::EntryType::Receipt,
            EntryKind::Membership => pb::EntryType::Membership,
        } as i32;
    }

    /// Appends the current entry to `user`'s inbox under `conversation`; returns its
    /// seq, or 0 if this message already has a copy there. Messages and membership
    /// changes move the conversation row (receipts do not); messages from others count
    /// as incoming.
    fn put_copy(&mut self, user: &str, conversation: &str) -> Result<u64, StoreError> {
        let uid = self.uid(user)?;
        let inbox_head = match self.touched.entry(uid) {
            MapEntry::Occupied(slot) => slot.into_mut(),
            MapEntry::Vacant(slot) => {
                let (head, low) = self.view.head(Some(&self.pending), uid)?.unwrap_or((0, 1));
                slot.insert(InboxHead {
                    head,
                    low,
                    last_message_id: 0,
                })
            }
        };
        if inbox_head.last_message_id == self.entry.message_id {
            return Ok(0);
        }
        inbox_head.last_message_id = self.entry.message_id;
        inbox_head.head += 1;
        let seq = inbox_head.head;

        let is_receipt = self.entry.r#type == pb::EntryType::Receipt as i32;
        let key = (uid, conversation.to_owned());
        let row = match self.conv_rows.entry(key) {
            MapEntry::Occupied(slot) => Some(slot.into_mut()),
            MapEntry::Vacant(slot) => {
                let stored = self
                    .view
                    .conv(Some(&self.pending), uid, conversation)?
                    .map(ConvRow::from_value);
                match (stored, is_receipt) {
                    (Some(row), _) => Some(slot.insert(row)),
                    (None, false) => Some(slot.insert(ConvRow::default())),
                    (None, true) => None,
                }
            }
        };
        let mut incoming = 0;
        if let Some(row) = row {
            if !is_receipt {
                row.last_seq = seq;
                row.last_ts = self.entry.ts_ms;
                row.last_mid = self.entry.message_id;
                if self.entry.r#type == pb::EntryType::Message as i32 && self.entry.from != user {
                    row.incoming += 1;
                }
            }
            incoming = row.incoming;
        }

        let entry = &mut self.entry;
        entry.seq = seq;
        entry.incoming = incoming;
        entry.conversation.clear();
        entry.conversation.push_str(conversation);
        self.encoded.clear();
        entry
            .encode(&mut self.encoded)
            .map_err(|e| StoreError::Engine(format!("encoding inbox entry failed: {e}")))?;
        self.pending
            .inbox
            .insert((uid, seq), Bytes::copy_from_slice(&self.encoded));
        self.new_heads.push((user.to_owned(), seq));
        Ok(seq)
    }

    fn head(&mut self, uid: u64) -> Result<(u64, u64), StoreError> {
        if let Some(h) = self.touched.get(&uid) {
            return Ok((h.head, h.low));
        }
        Ok(self.view.head(Some(&self.pending), uid)?.unwrap_or((0, 1)))
    }

    /// Writes a receipt entry (a new message id) into `to`'s inbox under `conversation`.
    fn receipt(
        &mut self,
        req: &AppendRequest,
        from: &str,
        to: &str,
        conversation: &str,
        body: &pb::ReceiptBody,
    ) -> Result<u64, StoreError> {
        let message_id = self.take_message_id();
        let body = bytes::Bytes::from(body.encode_to_vec());
        self.set_entry(
            req,
            message_id,
            EntryKind::Receipt,
            &body,
            RECEIPT_CONTENT_TYPE,
        );
        self.entry.from.clear();
        self.entry.from.push_str(from);
        if from != req.sender {
            self.entry.from_device.clear();
        }
        self.put_copy(to, conversation)
    }

    // ---- groups -------------------------------------------------------------------

    fn group_summary(&mut self, group: &str) -> Result<Option<pb::GroupSummary>, StoreError> {
        match self.view.group(Some(&self.pending), group)? {
            None => Ok(None),
            Some(bytes) => pb::GroupSummary::decode(bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("group {group:?}: {e}"))),
        }
    }

    fn member_rows(&mut self, group: &str) -> Result<Vec<(String, MemberRow)>, StoreError> {
        Ok(self
            .view
            .members(Some(&self.pending), group)?
            .into_iter()
            .map(|(user, row)| (user, MemberRow::from_value(row)))
            .collect())
    }

    fn group_message(
        &mut self,
        req: &AppendRequest,
        group: &str,
    ) -> Result<AppendOutcome, StoreError> {
        if let Some(dup) = self.duplicate(req)? {
            return Ok(dup);
        }
        let members = match self.member_lists.remove(group) {
            Some(list) => list,
            None => self
                .member_rows(group)?
                .into_iter()
                .map(|(user, _)| user)
                .collect(),
        };
        if !members.contains(&req.sender) {
            let outcome = if members.is_empty() {
                refused(Refuse::NotFound, format!("no group {group:?}"))
            } else {
                refused(
                    Refuse::Forbidden,
                    format!("{} is not a member of group {group:?}", req.sender),
                )
            };
            self.member_lists.insert(group.to_owned(), members);
            return Ok(outcome);
        }
        let message_id = self.take_message_id();
        self.set_entry(
            req,
            message_id,
            EntryKind::Message,
            &req.body,
            &req.content_type,
        );
        let conversation = group_conversation(group);
        let mut sender_seq = 0;
        let mut result = Ok(());
        for member in &members {
            match self.put_copy(member, &conversation) {
                Ok(seq) if *member == req.sender => sender_seq = seq,
                Ok(_) => {}
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.member_lists.insert(group.to_owned(), members);
        result?;
        let sender_uid = self.uid(&req.sender)?;
        self.pending
            .group_sent
            .insert((group.to_owned(), sender_uid, message_id), req.ts_ms);
        self.committed(req, message_id, sender_seq)
    }

    fn group_change(
        &mut self,
        req: &AppendRequest,
        change: &GroupChange,
    ) -> Result<AppendOutcome, StoreError> {
        if let Some(dup) = self.duplicate(req)? {
            return Ok(dup);
        }
        let group = change.group.as_str();
        if !valid_group_id(group) {
            return Ok(refused(
                Refuse::BadRequest,
                "a group id is 1 to 64 ASCII letters, digits, '.', '_' or '-'",
            ));
        }
        if let Some(bad) = change.members.iter().find(|m| !valid_user_id(m)) {
            return Ok(refused(
                Refuse::BadRequest,
                format!("{bad:?} is not a user id"),
            ));
        }
        let summary = self.group_summary(group)?;
        let rows = self.member_rows(group)?;
        let is_member = |user: &str| rows.iter().any(|(m, _)| m == user);
        let mut named: Vec<String> = Vec::new();
        for m in &change.members {
            if !named.contains(m) {
                named.push(m.clone());
            }
        }
        let max = change.max_members as usize;
        if change.op != GroupOp::Create {
            if summary.as_ref().is_none_or(|s| s.size == 0) {
                return Ok(refused(Refuse::NotFound, format!("no group {group:?}")));
            }
            if !is_member(&req.sender) {
                return Ok(refused(
                    Refuse::Forbidden,
                    format!("{} is not a member of group {group:?}", req.sender),
                ));
            }
        }
        let owner_now = summary
            .as_ref()
            .map(|s| s.owner.clone())
            .unwrap_or_default();
        // (event kind, whom it is about, who gets the entry, who is in afterwards)
        let (kind, about, recipients, after): (_, Vec<String>, Vec<String>, Vec<String>) =
            match change.op {
                GroupOp::Create => {
                    if summary.is_some() {
                        return Ok(refused(
                            Refuse::Conflict,
                            format!("group {group:?} exists (or existed)"),
                        ));
                    }
                    let mut all = vec![req.sender.clone()];
                    all.extend(named.into_iter().filter(|m| *m != req.sender));
                    if all.len() > max {
                        return Ok(refused(
                            Refuse::GroupFull,
                            format!("{} members exceed the cap of {max}", all.len()),
                        ));
                    }
                    (pb::GroupEventKind::Created, all.clone(), all.clone(), all)
                }
                GroupOp::Add => {
                    let new: Vec<String> = named.into_iter().filter(|m| !is_member(m)).collect();
                    if new.is_empty() {
                        return Ok(refused(
                            Refuse::Conflict,
                            "every one named is a member already",
                        ));
                    }
                    if rows.len() + new.len() > max {
                        return Ok(refused(
                            Refuse::GroupFull,
                            format!(
                                "{} members would exceed the cap of {max}",
                                rows.len() + new.len()
                            ),
                        ));
                    }
                    let mut all: Vec<String> = rows.iter().map(|(m, _)| m.clone()).collect();
                    all.extend(new.iter().cloned());
                    (pb::GroupEventKind::Added, new, all.clone(), all)
                }
                GroupOp::Remove => {
                    if req.sender != owner_now {
                        return Ok(refused(
                            Refuse::Forbidden,
                            format!("only the owner ({owner_now}) removes members; others leave"),
                        ));
                    }
                    if named.is_empty() {
                        return Ok(refused(Refuse::BadRequest, "name the members to remove"));
                    }
                    if named.contains(&req.sender) {
                        return Ok(refused(Refuse::BadRequest, "the owner leaves instead"));
                    }
                    if let Some(m) = named.iter().find(|m| !is_member(m)) {
                        return Ok(refused(
                            Refuse::Conflict,
                            format!("{m} is not a member of group {group:?}"),
                        ));
                    }
                    let all: Vec<String> = rows.iter().map(|(m, _)| m.clone()).collect();
                    let after = all.iter().filter(|m| !named.contains(m)).cloned().collect();
                    (pb::GroupEventKind::Removed, named, all, after)
                }
                GroupOp::Leave => {
                    let all: Vec<String> = rows.iter().map(|(m, _)| m.clone()).collect();
                    let after = all.iter().filter(|m| **m != req.sender).cloned().collect();
                    (
                        pb::GroupEventKind::Left,
                        vec![req.sender.clone()],
                        all,
                        after,
                    )
                }
            };
        let owner = if change.op == GroupOp::Create {
            req.sender.clone()
        } else if after.contains(&owner_now) {
            owner_now
        } else {
            // The longest-standing member (smallest join id, then by name) takes over.
            rows.iter()
                .filter(|(m, _)| after.contains(m))
                .min_by_key(|(m, row)| (row.joined, m.clone()))
                .map(|(m, _)| m.clone())
                .unwrap_or_default()
        };
        let name = match &summary {
            Some(s) => s.name.clone(),
            None => change.name.clone(),
        };
        let message_id = self.take_message_id();
        let event = pb::GroupEvent {
            kind: kind as i32,
            group: group.to_owned(),
            actor: req.sender.clone(),
            members: about.clone(),
            name: name.clone(),
            owner: owner.clone(),
            size: after.len() as u32,
        };
        let body = bytes::Bytes::from(event.encode_to_vec());
        self.set_entry(
            req,
            message_id,
            EntryKind::Membership,
            &body,
            GROUP_CONTENT_TYPE,
        );
        let conversation = group_conversation(group);
        let mut sender_seq = 0;
        for user in &recipients {
            let seq = self.put_copy(user, &conversation)?;
            if *user == req.sender {
                sender_seq = seq;
            }
        }
        match change.op {
            GroupOp::Create | GroupOp::Add => {
                for user in &about {
                    self.pending.members.insert(
                        (group.to_owned(), user.clone()),
                        Some(MemberRow::joined(message_id).value()),
                    );
                    let uid = self.uid(user)?;
                    self.pending
                        .user_groups
                        .insert((uid, group.to_owned()), Some(message_id));
                }
            }
            GroupOp::Remove | GroupOp::Leave => {
                for user in &about {
                    self.pending
                        .members
                        .insert((group.to_owned(), user.clone()), None);
                    let uid = self.uid(user)?;
                    self.pending
                        .user_groups
                        .insert((uid, group.to_owned()), None);
                }
            }
        }
        let summary = pb::GroupSummary {
            group: group.to_owned(),
            name,
            owner,
            size: after.len() as u32,
        };
        self.pending
            .groups
            .insert(group.to_owned(), Bytes::from(summary.encode_to_vec()));
        self.member_lists.remove(group);
        if matches!(change.op, GroupOp::Remove | GroupOp::Leave) {
            // A member who held the others back may be gone.
            self.aggregate(req, group)?;
        }
        self.committed(req, message_id, sender_seq)
    }

    /// Sends aggregated group receipts: for each member as a sender, when the smallest
    /// mark among the other current members passed what it was last told, and it sent
    /// something in between, one entry "every other member has everything up to M".
    fn aggregate(&mut self, req: &AppendRequest, group: &str) -> Result<(), StoreError> {
        let mut rows = self.member_rows(group)?;
        if rows.len() < 2 {
            return Ok(());
        }
        let conversation = group_conversation(group);
        for mark in [Mark::Delivered, Mark::Read] {
            let value = |row: &MemberRow| match mark {
                Mark::Delivered => row.delivered,
                Mark::Read => row.read,
            };
            // The two smallest marks: the smallest among the others is the second for
            // the member holding the first, the first for everyone else.
            let mut first = (u64::MAX, usize::MAX);
            let mut second = u64::MAX;
            for (i, (_, row)) in rows.iter().enumerate() {
                let v = value(row);
                if v < first.0 {
                    second = first.0;
                    first = (v, i);
                } else if v < second {
                    second = v;
                }
            }
            // Marks are settled first (the rows are written as they change), then the
            // receipts, which need `self` again.
            let mut owed = Vec::new();
            for (i, (user, row)) in rows.iter_mut().enumerate() {
                let others = if i == first.1 { second } else { first.0 };
                let notified = match mark {
                    Mark::Delivered => &mut row.notified_delivered,
                    Mark::Read => &mut row.notified_read,
                };
                if others <= *notified {
                    continue;
                }
                let from = *notified + 1;
                *notified = others;
                self.pending
                    .members
                    .insert((group.to_owned(), user.clone()), Some(row.value()));
                owed.push((user.clone(), from, others));
            }
            for (user, from, others) in owed {
                let uid = self.uid(&user)?;
                let sent_any = self
                    .view
                    .sent_any(Some(&self.pending), group, uid, from, others)?;
                if sent_any {
                    let body = pb::ReceiptBody {
                        kind: match mark {
                            Mark::Delivered => pb::ReceiptKind::Delivered,
                            Mark::Read => pb::ReceiptKind::Read,
                        } as i32,
                        conversation: conversation.clone(),
                        by: String::new(),
                        up_to_message_id: others,
                        up_to_seq: 0,
                        unread: 0,
                    };
                    self.receipt(req, "", &user, &conversation, &body)?;
                }
            }
        }
        Ok(())
    }

    /// Moves `user`'s mark in `group` to at least `message_id`; false if the user is
    /// not a member (any more) or the mark did not move.
    fn move_member_mark(
        &mut self,
        group: &str,
        user: &str,
        mark: Mark,
        message_id: u64,
    ) -> Result<bool, StoreError> {
        let Some(mut row) = self
            .view
            .member(Some(&self.pending), group, user)?
            .map(MemberRow::from_value)
        else {
            return Ok(false);
        };
        let slot = match mark {
            Mark::Delivered => &mut row.delivered,
            Mark::Read => &mut row.read,
        };
        if message_id <= *slot {
            return Ok(false);
        }
        *slot = message_id;
        self.pending
            .members
            .insert((group.to_owned(), user.to_owned()), Some(row.value()));
        Ok(true)
    }

    // ---- receipts -----------------------------------------------------------------

    fn delivered_mark(
        &mut self,
        req: &AppendRequest,
        up_to_seq: u64,
    ) -> Result<AppendOutcome, StoreError> {
        let user = req.sender.as_str();
        let Some(uid) = self.existing_uid(user)? else {
            return Ok(self.outcome(0, 0, req.ts_ms));
        };
        let (head, low) = self.head(uid)?;
        let done = self.view.delivered(Some(&self.pending), uid)?.unwrap_or(0);
        let target = up_to_seq.min(head);
        if target <= done {
            return Ok(self.outcome(0, done, req.ts_ms));
        }
        let end = target.min(done + DELIVERED_SCAN);
        // conversation → newest message id from the peer / in the group.
        let mut peers: BTreeMap<String, u64> = BTreeMap::new();
        let mut groups: BTreeMap<String, u64> = BTreeMap::new();
        let scanned = self.view.entries(
            Some(&self.pending),
            uid,
            (done + 1).max(low),
            end,
            usize::MAX,
        )?;
        for (seq, bytes) in scanned {
            let e = decode_entry(user, seq, &bytes)?;
            if e.from == user || e.kind == EntryKind::Receipt {
                continue;
            }
            match conversation_group(&e.conversation) {
                Some(group) => {
                    let slot = groups.entry(group.to_owned()).or_default();
                    *slot = (*slot).max(e.message_id);
                }
                None if e.kind == EntryKind::Message => {
                    let slot = peers.entry(e.conversation).or_default();
                    *slot = (*slot).max(e.message_id);
                }
                None => {}
            }
        }
        self.pending.delivered.insert(uid, end);
        for (peer, message_id) in peers {
            let body = pb::ReceiptBody {
                kind: pb::ReceiptKind::Delivered as i32,
                conversation: user.to_owned(),
                by: user.to_owned(),
                up_to_message_id: message_id,
                up_to_seq: 0,
                unread: 0,
            };
            self.receipt(req, user, &peer, user, &body)?;
        }
        for (group, message_id) in groups {
            if self.move_member_mark(&group, user, Mark::Delivered, message_id)? {
                self.deferred.insert(group, self.current);
            }
        }
        Ok(self.outcome(0, end, req.ts_ms))
    }

    fn read(&mut self, req: &AppendRequest, mark: &ReadMark) -> Result<AppendOutcome, StoreError> {
        let user = req.sender.as_str();
        let conversation = mark.conversation.as_str();
        let not_yours = || {
            refused(
                Refuse::Forbidden,
                format!("there is no conversation {conversation:?} in your inbox"),
            )
        };
        let Some(uid) = self.existing_uid(user)? else {
            return Ok(not_yours());
        };
        let key = (uid, conversation.to_owned());
        let mut row = match self.conv_rows.get(&key) {
            Some(row) => *row,
            None => match self.view.conv(Some(&self.pending), uid, conversation)? {
                Some(value) => ConvRow::from_value(value),
                None => return Ok(not_yours()),
            },
        };
        let (head, _) = self.head(uid)?;
        if mark.up_to_seq == 0 || mark.up_to_seq > head {
            return Ok(refused(
                Refuse::BadRequest,
                format!(
                    "read_up_to {} is outside the inbox 1..={head}",
                    mark.up_to_seq
                ),
            ));
        }
        if mark.up_to_seq <= row.read_seq {
            return Ok(self.outcome(0, 0, req.ts_ms));
        }
        let (message_id, incoming) =
            match self.view.entry(Some(&self.pending), uid, mark.up_to_seq)? {
                Some(bytes) => {
                    let e = decode_entry(user, mark.up_to_seq, &bytes)?;
                    if e.conversation != conversation {
                        return Ok(refused(
                            Refuse::BadRequest,
                            format!(
                                "seq {} is in conversation {:?}, not {conversation:?}",
                                mark.up_to_seq, e.conversation
                            ),
                        ));
                    }
                    (e.message_id, e.incoming)
                }
                // Compacted: the device's word, within what the conversation holds.
                None => (
                    mark.message_id.min(row.last_mid),
                    mark.incoming.min(row.incoming),
                ),
            };
        let newly_read = incoming > row.read_incoming;
        row.read_seq = mark.up_to_seq;
        row.read_incoming = row.read_incoming.max(incoming);
        self.conv_rows.insert(key, row);
        let echo = pb::ReceiptBody {
            kind: pb::ReceiptKind::Read as i32,
            conversation: conversation.to_owned(),
            by: user.to_owned(),
            up_to_message_id: message_id,
            up_to_seq: mark.up_to_seq,
            unread: row.incoming - row.read_incoming,
        };
        self.receipt(req, user, user, conversation, &echo)?;
        match conversation_group(conversation) {
            Some(group) if self.move_member_mark(group, user, Mark::Read, message_id)? => {
                self.deferred.insert(group.to_owned(), self.current);
            }
            Some(_) => {}
            None if newly_read => {
                let body = pb::ReceiptBody {
                    kind: pb::ReceiptKind::Read as i32,
                    conversation: user.to_owned(),
                    by: user.to_owned(),
                    up_to_message_id: message_id,
                    up_to_seq: 0,
                    unread: 0,
                };
                self.receipt(req, user, conversation, user, &body)?;
            }
            None => {}
        }
        Ok(self.outcome(0, 0, req.ts_ms))
    }
}

/// A member row as the protocol shows it.
pub(super) fn member_pb(user: String, row: &MemberRow) -> pb::GroupMember {
    pb::GroupMember {
        user,
        joined_message_id: row.joined,
        delivered_up_to: row.delivered,
        read_up_to: row.read,
    }
}

/// A conversation row as the protocol shows it.
pub(super) fn conversation_pb(id: String, value: ConvValue) -> pb::Conversation {
    let row = ConvRow::from_value(value);
    pb::Conversation {
        id,
        last_seq: row.last_seq,
        last_ts_ms: row.last_ts,
        unread: row.incoming.saturating_sub(row.read_incoming),
        read_up_to: row.read_seq,
        incoming: row.incoming,
    }
}
