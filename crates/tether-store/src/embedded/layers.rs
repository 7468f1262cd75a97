//! What was committed since the last checkpoint, in memory, over the database.
//!
//! A commit never touches the B-tree file: [`write`](super::write) computes a batch's
//! changes into a [`Delta`], the log makes the batch durable, and the delta joins the
//! *live* layer. A checkpoint freezes the live layer and writes it into redb on its own
//! thread; readers see `live → frozen → database`, newest first, so a row is found in
//! the newest layer that has it. Rows that can disappear (members, a user's groups,
//! device cursors) are kept as `None` (removed) in a layer. Inbox entries and dedup keys
//! are only removed by compaction, which runs on the database with empty layers.

use super::{
    CONVS, CURSORS, ConvValue, DEDUP, DELIVERED, GROUP_SENT, GROUPS, HEADS, INBOX, MEMBERS,
    MemberValue, USER_GROUPS, USERS,
};
use crate::StoreError;
use bytes::Bytes;
use std::collections::BTreeMap;

/// A dedup key with its client message id owned.
pub(super) type DedupKey = (u64, u64, [u8; 16]);
/// `(message_id, sender_seq, ts_ms)`: the original ack.
pub(super) type DedupValue = (u64, u64, u64);
/// `(inbox_epoch, acked_seq, last_seen_ms)`.
pub(super) type CursorValue = (u64, u64, u64);

/// Rows written by one batch, or by every batch since a checkpoint. Same tables as the
/// database (see [`embedded`](super)), with owned keys; ordered maps, so a checkpoint
/// inserts in key order.
#[derive(Debug, Default)]
pub(super) struct Delta {
    pub users: BTreeMap<String, u64>,
    pub heads: BTreeMap<u64, (u64, u64)>,
    pub inbox: BTreeMap<(u64, u64), Bytes>,
    pub dedup: BTreeMap<DedupKey, DedupValue>,
    pub convs: BTreeMap<(u64, String), ConvValue>,
    pub groups: BTreeMap<String, Bytes>,
    pub members: BTreeMap<(String, String), Option<MemberValue>>,
    pub user_groups: BTreeMap<(u64, String), Option<u64>>,
    pub group_sent: BTreeMap<(String, u64, u64), u64>,
    pub delivered: BTreeMap<u64, u64>,
    pub cursors: BTreeMap<(String, String), Option<CursorValue>>,
    /// `(next_message_id, next_uid)` after the batch.
    pub counters: Option<(u64, u64)>,
}

impl Delta {
    /// Lays `newer` over this delta.
    pub fn merge(&mut self, newer: Delta) {
        self.users.extend(newer.users);
        self.heads.extend(newer.heads);
        self.inbox.extend(newer.inbox);
        self.dedup.extend(newer.dedup);
        self.convs.extend(newer.convs);
        self.groups.extend(newer.groups);
        self.members.extend(newer.members);
        self.user_groups.extend(newer.user_groups);
        self.group_sent.extend(newer.group_sent);
        self.delivered.extend(newer.delivered);
        self.cursors.extend(newer.cursors);
        if newer.counters.is_some() {
            self.counters = newer.counters;
        }
    }

    /// Rows held: what decides when a checkpoint is due.
    pub fn rows(&self) -> usize {
        self.users.len()
            + self.heads.len()
            + self.inbox.len()
            + self.dedup.len()
            + self.convs.len()
            + self.groups.len()
            + self.members.len()
            + self.user_groups.len()
            + self.group_sent.len()
            + self.delivered.len()
            + self.cursors.len()
    }

    /// Writes every row into the database tables of `txn`.
    pub fn write_to(&self, txn: &redb::WriteTransaction) -> Result<(), StoreError> {
        if let Some((next_message_id, next_uid)) = self.counters {
            let mut meta = txn.open_table(super::META)?;
            meta.insert(super::NEXT_MESSAGE_ID_KEY, next_message_id)?;
            meta.insert(super::NEXT_UID_KEY, next_uid)?;
        }
        let mut t = txn.open_table(USERS)?;
        for (user, uid) in &self.users {
            t.insert(user.as_str(), *uid)?;
        }
        let mut t = txn.open_table(HEADS)?;
        for (uid, head) in &self.heads {
            t.insert(*uid, *head)?;
        }
        let mut t = txn.open_table(INBOX)?;
        for (key, entry) in &self.inbox {
            t.insert(*key, entry.as_ref())?;
        }
        let mut t = txn.open_table(DEDUP)?;
        for ((uid, device, id), value) in &self.dedup {
            t.insert((*uid, *device, id), *value)?;
        }
        let mut t = txn.open_table(CONVS)?;
        for ((uid, conversation), value) in &self.convs {
            t.insert((*uid, conversation.as_str()), *value)?;
        }
        let mut t = txn.open_table(GROUPS)?;
        for (group, summary) in &self.groups {
            t.insert(group.as_str(), summary.as_ref())?;
        }
        let mut t = txn.open_table(MEMBERS)?;
        for ((group, user), row) in &self.members {
            match row {
                Some(row) => t.insert((group.as_str(), user.as_str()), *row)?,
                None => t.remove((group.as_str(), user.as_str()))?,
            };
        }
        let mut t = txn.open_table(USER_GROUPS)?;
        for ((uid, group), joined) in &self.user_groups {
            match joined {
                Some(joined) => t.insert((*uid, group.as_str()), *joined)?,
                None => t.remove((*uid, group.as_str()))?,
            };
        }
        let mut t = txn.open_table(GROUP_SENT)?;
        for ((group, uid, message_id), ts_ms) in &self.group_sent {
            t.insert((group.as_str(), *uid, *message_id), *ts_ms)?;
        }
        let mut t = txn.open_table(DELIVERED)?;
        for (uid, seq) in &self.delivered {
            t.insert(*uid, *seq)?;
        }
        let mut t = txn.open_table(CURSORS)?;
        for ((user, device), cursor) in &self.cursors {
            match cursor {
                Some(cursor) => t.insert((user.as_str(), device.as_str()), *cursor)?,
                None => t.remove((user.as_str(), device.as_str()))?,
            };
        }
        Ok(())
    }
}

/// The database as of one read transaction.
pub(super) struct Base {
    txn: redb::ReadTransaction,
}

impl Base {
    pub fn new(txn: redb::ReadTransaction) -> Self {
        Self { txn }
    }
}

/// The layers a reader sees, newest first: an optional private layer (the batch being
/// written), the live layer, the frozen layer being checkpointed, the database.
pub(super) struct View<'a> {
    pub live: &'a Delta,
    pub frozen: Option<&'a Delta>,
    pub base: &'a Base,
}

impl<'a> View<'a> {
    /// The in-memory layers, newest first.
    fn layers<'s>(&'s self, newest: Option<&'s Delta>) -> impl Iterator<Item = &'s Delta> {
        newest
            .into_iter()
            .chain(std::iter::once(self.live))
            .chain(self.frozen)
    }

    /// The in-memory layers, oldest first (to lay ranges over the database's rows).
    fn layers_rev<'s>(&'s self, newest: Option<&'s Delta>) -> impl Iterator<Item = &'s Delta> {
        let mut all: Vec<&Delta> = self.layers(newest).collect();
        all.reverse();
        all.into_iter()
    }

    pub fn user(&self, newest: Option<&Delta>, user: &str) -> Result<Option<u64>, StoreError> {
        if let Some(uid) = self.layers(newest).find_map(|d| d.users.get(user)) {
            return Ok(Some(*uid));
        }
        let t = self.base.txn.open_table(USERS)?;
        Ok(t.get(user)?.map(|g| g.value()))
    }

    pub fn head(&self, newest: Option<&Delta>, uid: u64) -> Result<Option<(u64, u64)>, StoreError> {
        if let Some(head) = self.layers(newest).find_map(|d| d.heads.get(&uid)) {
            return Ok(Some(*head));
        }
        let t = self.base.txn.open_table(HEADS)?;
        Ok(t.get(uid)?.map(|g| g.value()))
    }

    /// The encoded entry at `(uid, seq)`.
    pub fn entry(
        &self,
        newest: Option<&Delta>,
        uid: u64,
        seq: u64,
    ) -> Result<Option<Bytes>, StoreError> {
        if let Some(entry) = self.layers(newest).find_map(|d| d.inbox.get(&(uid, seq))) {
            return Ok(Some(entry.clone()));
        }
        let t = self.base.txn.open_table(INBOX)?;
        Ok(t.get((uid, seq))?
            .map(|g| Bytes::copy_from_slice(g.value())))
    }

    /// Encoded entries of inbox `uid` with `from <= seq <= to`, ascending, at most `limit`.
    pub fn entries(
        &self,
        newest: Option<&Delta>,
        uid: u64,
        from: u64,
        to: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Bytes)>, StoreError> {
        if from > to || limit == 0 {
            return Ok(Vec::new());
        }
        // Entries are never removed in a layer, so the first `limit` of the union are
        // among the first `limit` of each source.
        let mut merged: BTreeMap<u64, Bytes> = BTreeMap::new();
        for delta in self.layers_rev(newest) {
            for ((_, seq), entry) in delta.inbox.range((uid, from)..=(uid, to)).take(limit) {
                merged.insert(*seq, entry.clone());
            }
        }
        // Seqs only grow and the layers are newer than the database, so the database
        // holds nothing above a seq a layer has (but copies of what was checkpointed):
        // when the layers have `from`, they have the whole answer. That is the hot path,
        // a connection streaming what was just committed.
        if merged.contains_key(&from) {
            return Ok(merged.into_iter().take(limit).collect());
        }
        let t = self.base.txn.open_table(INBOX)?;
        for item in t.range((uid, from)..=(uid, to))?.take(limit) {
            let (key, value) = item?;
            let seq = key.value().1;
            merged
                .entry(seq)
                .or_insert_with(|| Bytes::copy_from_slice(value.value()));
        }
        Ok(merged.into_iter().take(limit).collect())
    }

    pub fn dedup(
        &self,
        newest: Option<&Delta>,
        key: &DedupKey,
    ) -> Result<Option<DedupValue>, StoreError> {
        if let Some(value) = self.layers(newest).find_map(|d| d.dedup.get(key)) {
            return Ok(Some(*value));
        }
        let t = self.base.txn.open_table(DEDUP)?;
        Ok(t.get((key.0, key.1, &key.2))?.map(|g| g.value()))
    }

    pub fn conv(
        &self,
        newest: Option<&Delta>,
        uid: u64,
        conversation: &str,
    ) -> Result<Option<ConvValue>, StoreError> {
        let key = (uid, conversation.to_owned());
        if let Some(value) = self.layers(newest).find_map(|d| d.convs.get(&key)) {
            return Ok(Some(*value));
        }
        let t = self.base.txn.open_table(CONVS)?;
        Ok(t.get((uid, conversation))?.map(|g| g.value()))
    }

    /// Conversation rows of `uid` ordered by id, after `after`, at most `limit`.
    pub fn convs_after(
        &self,
        uid: u64,
        after: &str,
        limit: usize,
    ) -> Result<Vec<(String, ConvValue)>, StoreError> {
        let mut merged: BTreeMap<String, ConvValue> = BTreeMap::new();
        let t = self.base.txn.open_table(CONVS)?;
        for item in t.range((uid, after)..)? {
            let (key, value) = item?;
            let (owner, conversation) = key.value();
            if owner != uid || merged.len() > limit {
                break;
            }
            merged.insert(conversation.to_owned(), value.value());
        }
        for delta in self.layers_rev(None) {
            let rows = delta
                .convs
                .range((uid, after.to_owned())..)
                .take_while(|((owner, _), _)| *owner == uid)
                .take(limit.saturating_add(1));
            for ((_, conversation), value) in rows {
                merged.insert(conversation.clone(), *value);
            }
        }
        Ok(merged
            .into_iter()
            .filter(|(conversation, _)| conversation != after)
            .take(limit)
            .collect())
    }

    /// A group's encoded summary.
    pub fn group(&self, newest: Option<&Delta>, group: &str) -> Result<Option<Bytes>, StoreError> {
        if let Some(summary) = self.layers(newest).find_map(|d| d.groups.get(group)) {
            return Ok(Some(summary.clone()));
        }
        let t = self.base.txn.open_table(GROUPS)?;
        Ok(t.get(group)?.map(|g| Bytes::copy_from_slice(g.value())))
    }

    pub fn member(
        &self,
        newest: Option<&Delta>,
        group: &str,
        user: &str,
    ) -> Result<Option<MemberValue>, StoreError> {
        let key = (group.to_owned(), user.to_owned());
        if let Some(row) = self.layers(newest).find_map(|d| d.members.get(&key)) {
            return Ok(*row);
        }
        let t = self.base.txn.open_table(MEMBERS)?;
        Ok(t.get((group, user))?.map(|g| g.value()))
    }

    /// Every member row of `group`, by user.
    pub fn members(
        &self,
        newest: Option<&Delta>,
        group: &str,
    ) -> Result<Vec<(String, MemberValue)>, StoreError> {
        let mut merged: BTreeMap<String, MemberValue> = BTreeMap::new();
        let t = self.base.txn.open_table(MEMBERS)?;
        // Keys sort by group first, so one group's members are one contiguous run.
        for item in t.range((group, "")..)? {
            let (key, value) = item?;
            let (g, user) = key.value();
            if g != group {
                break;
            }
            merged.insert(user.to_owned(), value.value());
        }
        for delta in self.layers_rev(newest) {
            let rows = delta
                .members
                .range((group.to_owned(), String::new())..)
                .take_while(|((g, _), _)| g == group);
            for ((_, user), row) in rows {
                match row {
                    Some(row) => merged.insert(user.clone(), *row),
                    None => merged.remove(user),
                };
            }
        }
        Ok(merged.into_iter().collect())
    }

    /// The groups `uid` is a member of, by group id.
    pub fn groups_of(&self, uid: u64) -> Result<Vec<String>, StoreError> {
        let mut merged: BTreeMap<String, ()> = BTreeMap::new();
        let t = self.base.txn.open_table(USER_GROUPS)?;
        for item in t.range((uid, "")..)? {
            let (key, _) = item?;
            let (owner, group) = key.value();
            if owner != uid {
                break;
            }
            merged.insert(group.to_owned(), ());
        }
        for delta in self.layers_rev(None) {
            let rows = delta
                .user_groups
                .range((uid, String::new())..)
                .take_while(|((owner, _), _)| *owner == uid);
            for ((_, group), joined) in rows {
                match joined {
                    Some(_) => merged.insert(group.clone(), ()),
                    None => merged.remove(group),
                };
            }
        }
        Ok(merged.into_keys().collect())
    }

    /// Whether `uid` sent anything to `group` with a message id in `from..=to`.
    pub fn sent_any(
        &self,
        newest: Option<&Delta>,
        group: &str,
        uid: u64,
        from: u64,
        to: u64,
    ) -> Result<bool, StoreError> {
        if from > to {
            return Ok(false);
        }
        let (lo, hi) = ((group.to_owned(), uid, from), (group.to_owned(), uid, to));
        if self
            .layers(newest)
            .any(|d| d.group_sent.range(lo.clone()..=hi.clone()).next().is_some())
        {
            return Ok(true);
        }
        let t = self.base.txn.open_table(GROUP_SENT)?;
        Ok(t.range((group, uid, from)..=(group, uid, to))?
            .next()
            .is_some())
    }

    pub fn delivered(&self, newest: Option<&Delta>, uid: u64) -> Result<Option<u64>, StoreError> {
        if let Some(seq) = self.layers(newest).find_map(|d| d.delivered.get(&uid)) {
            return Ok(Some(*seq));
        }
        let t = self.base.txn.open_table(DELIVERED)?;
        Ok(t.get(uid)?.map(|g| g.value()))
    }

    pub fn cursor(&self, user: &str, device: &str) -> Result<Option<CursorValue>, StoreError> {
        let key = (user.to_owned(), device.to_owned());
        if let Some(cursor) = self.layers(None).find_map(|d| d.cursors.get(&key)) {
            return Ok(*cursor);
        }
        let t = self.base.txn.open_table(CURSORS)?;
        Ok(t.get((user, device))?.map(|g| g.value()))
    }

    /// Every recorded cursor of `user`'s devices, by device.
    pub fn devices(&self, user: &str) -> Result<Vec<(String, CursorValue)>, StoreError> {
        let mut merged: BTreeMap<String, CursorValue> = BTreeMap::new();
        let t = self.base.txn.open_table(CURSORS)?;
        // Keys sort by user first, so one user's devices are one contiguous run.
        for item in t.range((user, "")..)? {
            let (key, value) = item?;
            let (owner, device) = key.value();
            if owner != user {
                break;
            }
            merged.insert(device.to_owned(), value.value());
        }
        for delta in self.layers_rev(None) {
            let rows = delta
                .cursors
                .range((user.to_owned(), String::new())..)
                .take_while(|((owner, _), _)| owner == user);
            for ((_, device), cursor) in rows {
                match cursor {
                    Some(cursor) => merged.insert(device.clone(), *cursor),
                    None => merged.remove(device),
                };
            }
        }
        Ok(merged.into_iter().collect())
    }
}
