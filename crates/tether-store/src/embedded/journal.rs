//! The journal: every committed batch, appended to a log file and made durable with one
//! write and one fdatasync, before anyone is told.
//!
//! Two files take turns. The records of generation `g` go to file `g % 2`, from offset
//! 0; a durable checkpoint moves the journal to generation `g + 1` in the other file.
//! Every checkpoint records in the database how much of the journal it covers: the last
//! generation it covers whole, and how many records of the next one (a checkpoint that
//! is not durable covers part of the current generation, which goes on). At open every
//! record after that point is replayed, in order, through the same writer that first
//! applied it: the batch is the unit of replay, so seqs, message ids and receipts come
//! out the same. A file is overwritten only once its generation is durably
//! checkpointed.
//!
//! Files are reused without truncation, so an fdatasync normally flushes data only, not
//! the file's length. A record is
//!
//! ```text
//! len: u32 LE | crc32: u32 LE | generation: u64 LE | payload (len bytes, a LogBatch)
//! ```
//!
//! with the CRC over generation and payload. A file's content is the longest prefix of
//! valid records of one generation: a torn write at the end fails its CRC, and stale
//! records of an older generation behind the new ones carry their old generation.

use super::layers::CursorValue;
use crate::{Action, AppendRequest, GroupChange, GroupOp, InboxTarget, ReadMark, StoreError};
use bytes::Bytes;
use prost::Message;
use redb::StorageBackend;
use std::io;

const HEADER: usize = 16;
/// Files grow by at least this much at a time, so their length rarely changes.
const GROW: u64 = 1 << 20;
/// A record longer than this is corrupt.
const MAX_RECORD: usize = 1 << 30;

/// One record: a batch as journaled, or device cursors recorded (which are not part of
/// any batch and change nothing a batch computes).
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct LogBatch {
    #[prost(message, repeated, tag = "1")]
    pub requests: Vec<LogRequest>,
    #[prost(message, repeated, tag = "2")]
    pub cursors: Vec<LogCursor>,
}

/// A device cursor as recorded (after merging with the previous one), or its removal.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct LogCursor {
    #[prost(string, tag = "1")]
    pub user: String,
    #[prost(string, tag = "2")]
    pub device: String,
    #[prost(bool, tag = "3")]
    pub removed: bool,
    #[prost(uint64, tag = "4")]
    pub inbox_epoch: u64,
    #[prost(uint64, tag = "5")]
    pub acked_seq: u64,
    #[prost(uint64, tag = "6")]
    pub last_seen_ms: u64,
}

/// One [`AppendRequest`], flattened: `action` says which fields apply.
#[derive(Clone, PartialEq, prost::Message)]
pub(super) struct LogRequest {
    #[prost(string, tag = "1")]
    pub sender: String,
    #[prost(string, tag = "2")]
    pub sender_device: String,
    #[prost(bytes = "vec", tag = "3")]
    pub client_msg_id: Vec<u8>,
    #[prost(bytes = "bytes", tag = "4")]
    pub body: Bytes,
    #[prost(string, tag = "5")]
    pub content_type: String,
    #[prost(uint64, tag = "6")]
    pub ts_ms: u64,
    /// 1 message, 2 group message, 3 group change, 4 read, 5 delivered.
    #[prost(uint32, tag = "7")]
    pub action: u32,
    #[prost(string, repeated, tag = "8")]
    pub target_users: Vec<String>,
    #[prost(string, repeated, tag = "9")]
    pub target_conversations: Vec<String>,
    #[prost(string, tag = "10")]
    pub group: String,
    /// 1 create, 2 add, 3 remove, 4 leave.
    #[prost(uint32, tag = "11")]
    pub op: u32,
    #[prost(string, repeated, tag = "12")]
    pub members: Vec<String>,
    #[prost(string, tag = "13")]
    pub name: String,
    #[prost(uint32, tag = "14")]
    pub max_members: u32,
    #[prost(string, tag = "15")]
    pub conversation: String,
    #[prost(uint64, tag = "16")]
    pub up_to_seq: u64,
    #[prost(uint64, tag = "17")]
    pub message_id: u64,
    #[prost(uint64, tag = "18")]
    pub incoming: u64,
}

impl LogRequest {
    pub fn from_request(req: &AppendRequest) -> Self {
        let mut out = LogRequest {
            sender: req.sender.clone(),
            sender_device: req.sender_device.clone(),
            client_msg_id: req.client_msg_id.to_vec(),
            body: req.body.clone(),
            content_type: req.content_type.clone(),
            ts_ms: req.ts_ms,
            ..Default::default()
        };
        match &req.action {
            Action::Message(targets) => {
                out.action = 1;
                for t in targets {
                    out.target_users.push(t.user.clone());
                    out.target_conversations.push(t.conversation.clone());
                }
            }
            Action::GroupMessage(group) => {
                out.action = 2;
                out.group = group.clone();
            }
            Action::Group(change) => {
                out.action = 3;
                out.group = change.group.clone();
                out.op = match change.op {
                    GroupOp::Create => 1,
                    GroupOp::Add => 2,
                    GroupOp::Remove => 3,
                    GroupOp::Leave => 4,
                };
                out.members = change.members.clone();
                out.name = change.name.clone();
                out.max_members = change.max_members;
            }
            Action::Read(mark) => {
                out.action = 4;
                out.conversation = mark.conversation.clone();
                out.up_to_seq = mark.up_to_seq;
                out.message_id = mark.message_id;
                out.incoming = mark.incoming;
            }
            Action::Delivered { up_to_seq } => {
                out.action = 5;
                out.up_to_seq = *up_to_seq;
            }
        }
        out
    }

    pub fn into_request(self) -> Result<AppendRequest, StoreError> {
        let corrupt = |what: &str| StoreError::Corrupt(format!("journal record: {what}"));
        let client_msg_id: [u8; 16] = self
            .client_msg_id
            .as_slice()
            .try_into()
            .map_err(|_| corrupt("client message id is not 16 bytes"))?;
        let action = match self.action {
            1 => {
                if self.target_users.len() != self.target_conversations.len() {
                    return Err(corrupt("targets and conversations differ in number"));
                }
                Action::Message(
                    self.target_users
                        .into_iter()
                        .zip(self.target_conversations)
                        .map(|(user, conversation)| InboxTarget { user, conversation })
                        .collect(),
                )
            }
            2 => Action::GroupMessage(self.group),
            3 => Action::Group(GroupChange {
                group: self.group,
                op: match self.op {
                    1 => GroupOp::Create,
                    2 => GroupOp::Add,
                    3 => GroupOp::Remove,
                    4 => GroupOp::Leave,
                    _ => return Err(corrupt("unknown group operation")),
                },
                members: self.members,
                name: self.name,
                max_members: self.max_members,
            }),
            4 => Action::Read(ReadMark {
                conversation: self.conversation,
                up_to_seq: self.up_to_seq,
                message_id: self.message_id,
                incoming: self.incoming,
            }),
            5 => Action::Delivered {
                up_to_seq: self.up_to_seq,
            },
            _ => return Err(corrupt("unknown action")),
        };
        Ok(AppendRequest {
            sender: self.sender,
            sender_device: self.sender_device,
            client_msg_id,
            action,
            body: self.body,
            content_type: self.content_type,
            ts_ms: self.ts_ms,
        })
    }
}

/// Encodes a batch as a journal payload.
pub(super) fn encode_batch(batch: &[AppendRequest]) -> Vec<u8> {
    LogBatch {
        requests: batch.iter().map(LogRequest::from_request).collect(),
        cursors: Vec::new(),
    }
    .encode_to_vec()
}

/// Encodes cursor rows (`None`: removed) as a journal payload.
pub(super) fn encode_cursors(rows: &[((String, String), Option<CursorValue>)]) -> Vec<u8> {
    let cursors = rows
        .iter()
        .map(|((user, device), row)| {
            let (inbox_epoch, acked_seq, last_seen_ms) = row.unwrap_or_default();
            LogCursor {
                user: user.clone(),
                device: device.clone(),
                removed: row.is_none(),
                inbox_epoch,
                acked_seq,
                last_seen_ms,
            }
        })
        .collect();
    LogBatch {
        requests: Vec::new(),
        cursors,
    }
    .encode_to_vec()
}

/// A decoded record.
pub(super) enum Record {
    Batch(Vec<AppendRequest>),
    Cursors(Vec<((String, String), Option<CursorValue>)>),
}

/// Decodes a journal payload.
pub(super) fn decode(payload: &[u8]) -> Result<Record, StoreError> {
    let record = LogBatch::decode(payload)
        .map_err(|e| StoreError::Corrupt(format!("journal record: {e}")))?;
    if !record.cursors.is_empty() {
        return Ok(Record::Cursors(
            record
                .cursors
                .into_iter()
                .map(|c| {
                    let row = (!c.removed).then_some((c.inbox_epoch, c.acked_seq, c.last_seen_ms));
                    ((c.user, c.device), row)
                })
                .collect(),
        ));
    }
    Ok(Record::Batch(
        record
            .requests
            .into_iter()
            .map(LogRequest::into_request)
            .collect::<Result<_, _>>()?,
    ))
}

fn crc(generation: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&generation.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// The valid records of one file: its generation and payloads, or `None` if it holds
/// none.
pub(super) fn read_file(file: &dyn StorageBackend) -> io::Result<Option<(u64, Vec<Vec<u8>>)>> {
    let len = usize::try_from(file.len()?).unwrap_or(usize::MAX);
    let mut bytes = vec![0; len];
    file.read(0, &mut bytes)?;
    let mut generation = None;
    let mut payloads = Vec::new();
    let mut at = 0;
    while at + HEADER <= bytes.len() {
        let field = |i: usize| u32::from_le_bytes(bytes[at + i..at + i + 4].try_into().unwrap());
        let size = field(0) as usize;
        let sum = field(4);
        let record_generation = u64::from_le_bytes(bytes[at + 8..at + 16].try_into().unwrap());
        if size == 0 || size > MAX_RECORD || at + HEADER + size > bytes.len() {
            break;
        }
        let payload = &bytes[at + HEADER..at + HEADER + size];
        if crc(record_generation, payload) != sum
            || generation.is_some_and(|g| g != record_generation)
        {
            break;
        }
        generation = Some(record_generation);
        payloads.push(payload.to_vec());
        at += HEADER + size;
    }
    Ok(generation.map(|g| (g, payloads)))
}

/// The writing end: the two files, the current generation and where its next record goes.
pub(super) struct Journal {
    files: [Box<dyn StorageBackend>; 2],
    /// Current lengths of the files.
    lengths: [u64; 2],
    generation: u64,
    offset: u64,
    /// Records written in this generation.
    records: u64,
    record: Vec<u8>,
}

impl Journal {
    /// Starts writing `generation` (everything before it is checkpointed).
    pub fn new(files: [Box<dyn StorageBackend>; 2], generation: u64) -> io::Result<Self> {
        let lengths = [files[0].len()?, files[1].len()?];
        Ok(Self {
            files,
            lengths,
            generation,
            offset: 0,
            records: 0,
            record: Vec::new(),
        })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Records written in the current generation so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// Moves to the next generation, in the other file, from its start.
    pub fn next_generation(&mut self) {
        self.generation += 1;
        self.offset = 0;
        self.records = 0;
    }

    /// Writes one record; with `sync`, returns after fdatasync.
    pub fn append(&mut self, payload: &[u8], sync: bool) -> io::Result<()> {
        let index = (self.generation % 2) as usize;
        self.record.clear();
        self.record
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.record
            .extend_from_slice(&crc(self.generation, payload).to_le_bytes());
        self.record
            .extend_from_slice(&self.generation.to_le_bytes());
        self.record.extend_from_slice(payload);
        let end = self.offset + self.record.len() as u64;
        let file = &self.files[index];
        if end > self.lengths[index] {
            let grown = end.max(self.lengths[index] * 2).max(GROW).div_ceil(GROW) * GROW;
            file.set_len(grown)?;
            self.lengths[index] = grown;
        }
        file.write(self.offset, &self.record)?;
        if sync {
            file.sync_data()?;
        }
        self.offset = end;
        self.records += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SimulatedDisk;

    fn files(disk: &SimulatedDisk) -> [Box<dyn StorageBackend>; 2] {
        [Box::new(disk.file(1)), Box::new(disk.file(2))]
    }

    #[test]
    fn records_read_back_by_generation_and_a_torn_tail_is_dropped() {
        let disk = SimulatedDisk::new();
        let mut journal = Journal::new(files(&disk), 6).unwrap();
        journal.append(b"one", true).unwrap();
        journal.append(b"two", true).unwrap();
        journal.append(b"three", false).unwrap();
        let file = disk.file(1);
        let (generation, payloads) = read_file(&file).unwrap().unwrap();
        assert_eq!(generation, 6);
        assert_eq!(
            payloads,
            [b"one".to_vec(), b"two".to_vec(), b"three".to_vec()]
        );
        // The unsynced third record dies with the power; the synced ones stay.
        let after = disk.power_cut();
        let (_, payloads) = read_file(&after.file(1)).unwrap().unwrap();
        assert_eq!(payloads, [b"one".to_vec(), b"two".to_vec()]);
        // A flipped byte ends the file there.
        let second_payload = (HEADER + 3 + HEADER) as u64;
        let mut bytes = [0u8; 1];
        file.read(second_payload, &mut bytes).unwrap();
        file.write(second_payload, &[bytes[0] ^ 1]).unwrap();
        let (_, payloads) = read_file(&file).unwrap().unwrap();
        assert_eq!(payloads, [b"one".to_vec()]);
        assert!(read_file(&disk.file(2)).unwrap().is_none());
    }

    #[test]
    fn a_reused_file_ignores_the_stale_records_of_an_older_generation() {
        let disk = SimulatedDisk::new();
        let mut journal = Journal::new(files(&disk), 4).unwrap();
        for payload in [b"old-1", b"old-2", b"old-3"] {
            journal.append(payload, true).unwrap();
        }
        journal.next_generation();
        journal.append(b"other file", true).unwrap();
        journal.next_generation();
        journal.append(b"new", true).unwrap();
        let (generation, payloads) = read_file(&disk.file(1)).unwrap().unwrap();
        assert_eq!(generation, 6);
        assert_eq!(payloads, [b"new".to_vec()]);
        let (generation, payloads) = read_file(&disk.file(2)).unwrap().unwrap();
        assert_eq!((generation, payloads), (5, vec![b"other file".to_vec()]));
    }

    #[test]
    fn every_action_survives_the_journal_encoding() {
        let base = AppendRequest {
            sender: "ann".into(),
            sender_device: "phone".into(),
            client_msg_id: [9; 16],
            action: Action::Delivered { up_to_seq: 3 },
            body: Bytes::from_static(b"hi"),
            content_type: "text/plain".into(),
            ts_ms: 1234,
        };
        let actions = [
            Action::Message(vec![InboxTarget {
                user: "ben".into(),
                conversation: "ann".into(),
            }]),
            Action::GroupMessage("g1".into()),
            Action::Group(GroupChange {
                group: "g1".into(),
                op: GroupOp::Remove,
                members: vec!["cat".into()],
                name: "friends".into(),
                max_members: 50,
            }),
            Action::Read(ReadMark {
                conversation: "ben".into(),
                up_to_seq: 5,
                message_id: 77,
                incoming: 2,
            }),
            Action::Delivered { up_to_seq: 3 },
        ];
        let batch: Vec<AppendRequest> = actions
            .into_iter()
            .map(|action| AppendRequest {
                action,
                ..base.clone()
            })
            .collect();
        let Record::Batch(back) = decode(&encode_batch(&batch)).unwrap() else {
            panic!("not a batch");
        };
        assert_eq!(format!("{back:?}"), format!("{batch:?}"));
        assert!(matches!(decode(b"\x38\x09"), Ok(Record::Batch(b)) if b.is_empty()));
        assert!(decode(&[0x0a, 0x02, 0x38, 0x09]).is_err());
        let rows = vec![
            (("ann".to_string(), "phone".to_string()), Some((3, 9, 12))),
            (("ann".to_string(), "tablet".to_string()), None),
        ];
        let Record::Cursors(back) = decode(&encode_cursors(&rows)).unwrap() else {
            panic!("not cursors");
        };
        assert_eq!(back, rows);
    }
}
