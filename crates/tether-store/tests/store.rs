//! The embedded store's rules, through the public `Store` API.

use bytes::Bytes;
use std::time::{Duration, Instant};
use tether_store::{
    Action, AppendOutcome, AppendRequest, Committed, CompactPolicy, DeviceCursor, Durability,
    EmbeddedStore, EntryKind, InboxTarget, SimulatedDisk, Store, StoreError, StoredEntry,
};

fn target(user: &str, conversation: &str) -> InboxTarget {
    InboxTarget {
        user: user.into(),
        conversation: conversation.into(),
    }
}

/// `sender/device` sends `body` to `to`; the copy in the sender's own inbox is included.
fn send(sender: &str, device: &str, id: u8, to: &str, body: &str, ts_ms: u64) -> AppendRequest {
    AppendRequest {
        sender: sender.into(),
        sender_device: device.into(),
        client_msg_id: [id; 16],
        action: Action::Message(vec![target(to, sender), target(sender, to)]),
        body: Bytes::copy_from_slice(body.as_bytes()),
        content_type: "text/plain".into(),
        ts_ms,
    }
}

fn memory_store() -> EmbeddedStore {
    EmbeddedStore::open_with_backend(SimulatedDisk::new(), Durability::Fsync).unwrap()
}

fn new_ack(outcome: &AppendOutcome) -> Committed {
    match outcome {
        AppendOutcome::New { ack, .. } => *ack,
        other => panic!("expected a new message, got {other:?}"),
    }
}

fn all(store: &EmbeddedStore, user: &str) -> Vec<StoredEntry> {
    store.read_range(user, 0, u64::MAX, usize::MAX).unwrap()
}

fn seqs(store: &EmbeddedStore, user: &str) -> Vec<u64> {
    all(store, user).iter().map(|e| e.seq).collect()
}

/// Compaction by age only: retention and device expiry.
fn by_age(entries_before_ms: u64, devices_before_ms: u64) -> CompactPolicy {
    CompactPolicy {
        entries_before_ms,
        devices_before_ms,
        remove_acked: false,
    }
}

/// Compaction of what every live device acked; nothing is past retention, and devices
/// seen before `devices_before_ms` are expired.
fn acked(devices_before_ms: u64) -> CompactPolicy {
    CompactPolicy {
        entries_before_ms: 0,
        devices_before_ms,
        remove_acked: true,
    }
}

/// `(user, device)` holds everything up to `acked_seq` of `epoch`, seen at `last_seen_ms`.
fn set_cursor(
    store: &EmbeddedStore,
    user: &str,
    device: &str,
    epoch: u64,
    acked_seq: u64,
    last_seen_ms: u64,
) {
    let cursor = DeviceCursor {
        inbox_epoch: epoch,
        acked_seq,
        last_seen_ms,
    };
    store
        .set_cursors(&[(user.into(), device.into(), cursor)])
        .unwrap();
    // As the server does on every ACK: the delivered mark follows (compaction never
    // passes it, so delivered receipts are written before their entries go).
    delivered(store, user, acked_seq);
}

/// Seqs of the messages (not receipts) in `user`'s inbox.
fn message_seqs(store: &EmbeddedStore, user: &str) -> Vec<u64> {
    all(store, user)
        .into_iter()
        .filter(|e| e.kind == EntryKind::Message)
        .map(|e| e.seq)
        .collect()
}

/// A device of `user` holds its inbox up to `seq`.
fn delivered(store: &EmbeddedStore, user: &str, seq: u64) {
    let outcome = store
        .append(&[AppendRequest {
            sender: user.into(),
            sender_device: "d".into(),
            client_msg_id: [0; 16],
            action: Action::Delivered { up_to_seq: seq },
            body: Bytes::new(),
            content_type: String::new(),
            ts_ms: 1,
        }])
        .unwrap();
    assert!(
        matches!(outcome[0], AppendOutcome::New { .. }),
        "{outcome:?}"
    );
}

/// `count` messages from alice's phone to bob, client ids 1..=count, at 1, 2, ... ms.
fn alice_to_bob(store: &EmbeddedStore, count: u8) -> Vec<Committed> {
    let batch: Vec<_> = (1..=count)
        .map(|i| send("alice", "phone", i, "bob", &format!("m{i}"), u64::from(i)))
        .collect();
    store.append(&batch).unwrap().iter().map(new_ack).collect()
}

#[test]
fn append_assigns_consecutive_seqs_per_inbox_and_global_message_ids() {
    let store = memory_store();
    let outcomes = store
        .append(&[
            send("alice", "phone", 1, "bob", "hi bob", 1_000),
            send("bob", "laptop", 2, "alice", "hi alice", 1_001),
            send("alice", "phone", 3, "carol", "hi carol", 1_002),
        ])
        .unwrap();

    assert_eq!(
        outcomes,
        vec![
            AppendOutcome::New {
                ack: Committed {
                    message_id: 1,
                    sender_seq: 1,
                    ts_ms: 1_000
                },
                heads: vec![("bob".into(), 1), ("alice".into(), 1)],
            },
            AppendOutcome::New {
                ack: Committed {
                    message_id: 2,
                    sender_seq: 2,
                    ts_ms: 1_001
                },
                heads: vec![("alice".into(), 2), ("bob".into(), 2)],
            },
            AppendOutcome::New {
                ack: Committed {
                    message_id: 3,
                    sender_seq: 3,
                    ts_ms: 1_002
                },
                heads: vec![("carol".into(), 1), ("alice".into(), 3)],
            },
        ]
    );

    // A later batch continues where the last one stopped.
    let next = store
        .append(&[send("carol", "tab", 4, "alice", "yo", 1_003)])
        .unwrap();
    assert_eq!(
        next[0],
        AppendOutcome::New {
            ack: Committed {
                message_id: 4,
                sender_seq: 2,
                ts_ms: 1_003
            },
            heads: vec![("alice".into(), 4), ("carol".into(), 2)],
        }
    );

    let alice = all(&store, "alice");
    assert_eq!(
        alice.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    assert_eq!(
        alice[1],
        StoredEntry {
            seq: 2,
            message_id: 2,
            from: "bob".into(),
            from_device: "laptop".into(),
            conversation: "bob".into(),
            body: Bytes::from_static(b"hi alice"),
            content_type: "text/plain".into(),
            ts_ms: 1_001,
            kind: EntryKind::Message,
            incoming: 1,
        }
    );
    // The sender's own copy names the recipient as the conversation.
    assert_eq!(alice[0].conversation, "bob");
    assert_eq!(alice[0].from, "alice");
    assert_eq!(store.inbox_info("alice").unwrap().head, 4);
    assert_eq!(store.inbox_info("bob").unwrap().head, 2);
}

#[test]
fn sender_seq_is_zero_when_the_senders_inbox_is_not_a_target() {
    let store = memory_store();
    let mut req = send("alice", "phone", 1, "bob", "x", 5);
    if let Action::Message(targets) = &mut req.action {
        targets.truncate(1);
    }
    let outcomes = store.append(&[req]).unwrap();
    assert_eq!(new_ack(&outcomes[0]).sender_seq, 0);
    assert_eq!(store.inbox_info("alice").unwrap().head, 0);
    assert_eq!(all(&store, "bob")[0].kind, EntryKind::Message);
}

#[test]
fn a_user_listed_twice_in_targets_gets_one_copy() {
    let store = memory_store();
    let mut req = send("alice", "phone", 1, "bob", "x", 5);
    if let Action::Message(targets) = &mut req.action {
        targets.push(target("bob", "g:team"));
    }
    let outcomes = store.append(&[req]).unwrap();
    match &outcomes[0] {
        AppendOutcome::New { heads, .. } => {
            assert_eq!(heads, &vec![("bob".into(), 1), ("alice".into(), 1)]);
        }
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(all(&store, "bob").len(), 1);
}

#[test]
fn read_range_is_inclusive_ascending_and_respects_limit() {
    let store = memory_store();
    let batch: Vec<_> = (1..=10)
        .map(|i| send("alice", "phone", i, "bob", &format!("m{i}"), u64::from(i)))
        .collect();
    store.append(&batch).unwrap();

    let seqs = |from, to, limit| {
        store
            .read_range("bob", from, to, limit)
            .unwrap()
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>()
    };
    assert_eq!(seqs(3, 6, 100), vec![3, 4, 5, 6]);
    assert_eq!(seqs(3, 6, 2), vec![3, 4]);
    assert_eq!(seqs(9, 20, 100), vec![9, 10]);
    assert_eq!(seqs(6, 3, 100), Vec::<u64>::new());
    assert_eq!(seqs(1, 10, 0), Vec::<u64>::new());
    assert_eq!(store.read_range("bob", 7, 7, 1).unwrap()[0].body, "m7");
    // Another user's inbox with a name that sorts right after is not mixed in.
    store
        .append(&[send("x", "d", 1, "bob2", "other", 1)])
        .unwrap();
    assert_eq!(seqs(1, u64::MAX, 100).len(), 10);
}

#[test]
fn duplicate_client_msg_id_returns_the_original_ack_and_writes_nothing() {
    let store = memory_store();
    let first = store
        .append(&[send("alice", "phone", 7, "bob", "once", 100)])
        .unwrap();
    let original = new_ack(&first[0]);

    let retry = store
        .append(&[send("alice", "phone", 7, "bob", "changed body", 200)])
        .unwrap();
    assert_eq!(retry, vec![AppendOutcome::Duplicate(original)]);
    assert_eq!(store.inbox_info("bob").unwrap().head, 1);
    assert_eq!(store.inbox_info("alice").unwrap().head, 1);
    assert_eq!(all(&store, "bob")[0].body, "once");

    // The next new message still gets the next message id.
    let next = store
        .append(&[send("alice", "phone", 8, "bob", "two", 300)])
        .unwrap();
    assert_eq!(new_ack(&next[0]).message_id, original.message_id + 1);
}

#[test]
fn same_client_msg_id_from_another_device_is_not_a_duplicate() {
    let store = memory_store();
    let outcomes = store
        .append(&[
            send("alice", "phone", 7, "bob", "from phone", 100),
            send("alice", "laptop", 7, "bob", "from laptop", 100),
            send("carol", "phone", 7, "bob", "other sender", 100),
        ])
        .unwrap();
    let ids: Vec<u64> = outcomes.iter().map(|o| new_ack(o).message_id).collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(store.inbox_info("bob").unwrap().head, 3);
}

#[test]
fn duplicates_inside_one_batch_get_the_ack_of_the_first() {
    let store = memory_store();
    let outcomes = store
        .append(&[
            send("alice", "phone", 7, "bob", "a", 100),
            send("alice", "phone", 8, "bob", "b", 100),
            send("alice", "phone", 7, "bob", "a again", 101),
        ])
        .unwrap();
    let first = new_ack(&outcomes[0]);
    assert_eq!(outcomes[2], AppendOutcome::Duplicate(first));
    assert_eq!(store.inbox_info("bob").unwrap().head, 2);
}

#[test]
fn data_and_epoch_survive_close_and_reopen() {
    for durability in [Durability::Fsync, Durability::Relaxed] {
        let dir = tempfile::tempdir().unwrap();
        let (epoch, ack) = {
            let store = EmbeddedStore::open(dir.path(), durability).unwrap();
            assert_eq!(store.durability(), durability);
            let outcomes = store
                .append(&[send("alice", "phone", 1, "bob", "kept", 42)])
                .unwrap();
            (
                store.inbox_info("bob").unwrap().epoch,
                new_ack(&outcomes[0]),
            )
        };
        assert_ne!(epoch, 0);
        assert!(epoch < 1 << 53);

        let store = EmbeddedStore::open(dir.path(), durability).unwrap();
        let info = store.inbox_info("bob").unwrap();
        assert_eq!((info.epoch, info.head, info.low), (epoch, 1, 1));
        assert_eq!(all(&store, "bob")[0].body, "kept");
        assert_eq!(
            store
                .append(&[send("alice", "phone", 1, "bob", "kept", 42)])
                .unwrap(),
            vec![AppendOutcome::Duplicate(ack)]
        );
        let next = store
            .append(&[send("alice", "phone", 2, "bob", "after", 43)])
            .unwrap();
        assert_eq!(new_ack(&next[0]).message_id, 2);

        let fresh_dir = tempfile::tempdir().unwrap();
        let fresh = EmbeddedStore::open(fresh_dir.path(), durability).unwrap();
        assert_ne!(fresh.inbox_info("bob").unwrap().epoch, epoch);
    }
}

#[test]
fn second_open_of_a_directory_in_use_is_refused_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let first = EmbeddedStore::open(dir.path(), Durability::Fsync).unwrap();
    match EmbeddedStore::open(dir.path(), Durability::Fsync) {
        Err(StoreError::Locked(path)) => assert!(path.contains(&*dir.path().to_string_lossy())),
        other => panic!("expected Locked, got {other:?}"),
    }
    drop(first);
    EmbeddedStore::open(dir.path(), Durability::Fsync).unwrap();
}

#[test]
fn cursors_only_move_forward_within_an_epoch_and_reset_across_epochs() {
    let store = memory_store();
    let cursor = |inbox_epoch, acked_seq, last_seen_ms| DeviceCursor {
        inbox_epoch,
        acked_seq,
        last_seen_ms,
    };
    let set = |c: DeviceCursor| {
        store
            .set_cursors(&[("alice".into(), "phone".into(), c)])
            .unwrap()
    };
    assert_eq!(store.cursor("alice", "phone").unwrap(), None);

    set(cursor(5, 10, 1_000));
    assert_eq!(
        store.cursor("alice", "phone").unwrap(),
        Some(cursor(5, 10, 1_000))
    );
    // Smaller seq in the same epoch: seq kept, last seen updated.
    set(cursor(5, 7, 2_000));
    assert_eq!(
        store.cursor("alice", "phone").unwrap(),
        Some(cursor(5, 10, 2_000))
    );
    set(cursor(5, 12, 3_000));
    assert_eq!(
        store.cursor("alice", "phone").unwrap(),
        Some(cursor(5, 12, 3_000))
    );
    // Another epoch replaces the cursor, even with a smaller seq.
    set(cursor(6, 2, 4_000));
    assert_eq!(
        store.cursor("alice", "phone").unwrap(),
        Some(cursor(6, 2, 4_000))
    );
    // Devices are independent.
    assert_eq!(store.cursor("alice", "laptop").unwrap(), None);

    // Several updates in one call apply in order.
    store
        .set_cursors(&[
            ("bob".into(), "tab".into(), cursor(6, 9, 10)),
            ("bob".into(), "tab".into(), cursor(6, 4, 11)),
        ])
        .unwrap();
    assert_eq!(store.cursor("bob", "tab").unwrap(), Some(cursor(6, 9, 11)));
}

#[test]
fn compact_removes_old_entries_dedup_keys_and_idle_devices_and_moves_low_not_head() {
    let store = memory_store();
    let batch: Vec<_> = (1..=6)
        .map(|i| {
            send(
                "alice",
                "phone",
                i,
                "bob",
                &format!("m{i}"),
                u64::from(i) * 100,
            )
        })
        .collect();
    let acks: Vec<Committed> = store.append(&batch).unwrap().iter().map(new_ack).collect();
    let device = |last_seen_ms| DeviceCursor {
        inbox_epoch: 1,
        acked_seq: 3,
        last_seen_ms,
    };
    store
        .set_cursors(&[
            ("bob".into(), "old".into(), device(50)),
            ("bob".into(), "recent".into(), device(500)),
        ])
        .unwrap();

    // Entries at 100, 200, 300 are older than 350, in both bob's and alice's inbox.
    let stats = store.compact(&by_age(350, 100)).unwrap();
    assert_eq!((stats.entries, stats.dedup_keys, stats.devices), (6, 3, 1));

    for user in ["alice", "bob"] {
        let info = store.inbox_info(user).unwrap();
        assert_eq!((info.head, info.low), (6, 4), "{user}");
        let seqs: Vec<u64> = all(&store, user).iter().map(|e| e.seq).collect();
        assert_eq!(seqs, vec![4, 5, 6], "{user}");
    }
    assert_eq!(store.cursor("bob", "old").unwrap(), None);
    assert_eq!(store.cursor("bob", "recent").unwrap(), Some(device(500)));

    // A kept dedup key still answers; a removed one no longer does (its window passed).
    assert_eq!(
        store.append(&[batch[4].clone()]).unwrap(),
        vec![AppendOutcome::Duplicate(acks[4])]
    );
    let resent = store.append(&[batch[0].clone()]).unwrap();
    assert!(matches!(resent[0], AppendOutcome::New { .. }));
    assert_eq!(store.inbox_info("bob").unwrap().head, 7);

    // Compacting everything leaves an empty inbox at low = head + 1; heads never move back.
    let stats = store.compact(&by_age(u64::MAX, 0)).unwrap();
    assert_eq!(stats.entries, 8);
    let info = store.inbox_info("bob").unwrap();
    assert_eq!((info.head, info.low), (7, 8));
    assert!(all(&store, "bob").is_empty());
    assert_eq!(store.compact(&by_age(u64::MAX, 0)).unwrap().entries, 0);
    assert_eq!(store.inbox_info("bob").unwrap().low, 8);
    let next = store
        .append(&[send("alice", "phone", 99, "bob", "new", 1)])
        .unwrap();
    assert_eq!(new_ack(&next[0]).sender_seq, 8);
    let info = store.inbox_info("bob").unwrap();
    assert_eq!((info.head, info.low), (8, 8));
}

#[test]
fn compact_removes_only_the_old_prefix_so_an_inbox_stays_contiguous() {
    let store = memory_store();
    // Timestamps 100, 900, 200: the clock stepped back for the third message.
    store
        .append(&[
            send("alice", "phone", 1, "bob", "a", 100),
            send("alice", "phone", 2, "bob", "b", 900),
            send("alice", "phone", 3, "bob", "c", 200),
        ])
        .unwrap();
    let stats = store.compact(&by_age(500, 0)).unwrap();
    assert_eq!(stats.entries, 2); // seq 1 in bob's and in alice's inbox
    let seqs: Vec<u64> = all(&store, "bob").iter().map(|e| e.seq).collect();
    assert_eq!(seqs, vec![2, 3]);
    assert_eq!(store.inbox_info("bob").unwrap().low, 2);
}

#[test]
fn empty_store_reports_unknown_inbox_as_head_0_low_1_in_the_store_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let store = EmbeddedStore::open(dir.path(), Durability::Fsync).unwrap();
    let info = store.inbox_info("nobody").unwrap();
    assert_eq!((info.head, info.low), (0, 1));
    assert_ne!(info.epoch, 0);
    assert_eq!(store.inbox_info("someone else").unwrap().epoch, info.epoch);
    assert!(
        store
            .read_range("nobody", 0, u64::MAX, 100)
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.cursor("nobody", "phone").unwrap(), None);
    assert_eq!(
        store.compact(&by_age(u64::MAX, u64::MAX)).unwrap(),
        Default::default()
    );
}

#[test]
fn cursors_become_durable_with_the_next_append_checkpoint_or_sync_not_before() {
    let cursor = |acked_seq| DeviceCursor {
        inbox_epoch: 1,
        acked_seq,
        last_seen_ms: 5,
    };
    let disk = SimulatedDisk::new();
    let store = EmbeddedStore::open_with_backend(disk.clone(), Durability::Fsync).unwrap();
    store.set_checkpoint_policy(Duration::from_secs(3600), usize::MAX);
    store
        .set_cursors(&[("bob".into(), "phone".into(), cursor(3))])
        .unwrap();
    // Visible at once, but not yet on disk (its journal record is not synced).
    assert_eq!(store.cursor("bob", "phone").unwrap().unwrap().acked_seq, 3);
    let cut = EmbeddedStore::open_with_backend(disk.power_cut(), Durability::Fsync).unwrap();
    assert_eq!(cut.cursor("bob", "phone").unwrap(), None);
    // The next append's sync carries it to disk.
    store
        .append(&[send("alice", "d", 1, "bob", "x", 10)])
        .unwrap();
    let cut = EmbeddedStore::open_with_backend(disk.power_cut(), Durability::Fsync).unwrap();
    assert_eq!(cut.cursor("bob", "phone").unwrap().unwrap().acked_seq, 3);
    // So does sync, and so does a removal.
    store
        .set_cursors(&[("bob".into(), "phone".into(), cursor(4))])
        .unwrap();
    store
        .set_cursors(&[("bob".into(), "tablet".into(), cursor(4))])
        .unwrap();
    assert!(store.remove_device("bob", "tablet").unwrap());
    store.sync().unwrap();
    let cut = EmbeddedStore::open_with_backend(disk.power_cut(), Durability::Fsync).unwrap();
    assert_eq!(cut.cursor("bob", "phone").unwrap().unwrap().acked_seq, 4);
    assert_eq!(cut.cursor("bob", "tablet").unwrap(), None);
    // And the next checkpoint once writes stop (the commit loop's housekeeping calls
    // idle()), on its own thread, with nothing else written.
    store.set_checkpoint_policy(Duration::ZERO, usize::MAX);
    store
        .set_cursors(&[("bob".into(), "phone".into(), cursor(5))])
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        store.idle().unwrap();
        let cut = EmbeddedStore::open_with_backend(disk.power_cut(), Durability::Fsync).unwrap();
        if cut.cursor("bob", "phone").unwrap().unwrap().acked_seq == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint wrote the cursor");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn acked_compaction_removes_entries_up_to_the_least_advanced_live_device_keeping_the_inbox_contiguous()
 {
    let store = memory_store();
    let epoch = store.inbox_info("bob").unwrap().epoch;
    alice_to_bob(&store, 6);
    set_cursor(&store, "bob", "phone", epoch, 4, 1_000);
    set_cursor(&store, "bob", "laptop", epoch, 2, 1_000);

    let stats = store.compact(&acked(500)).unwrap();
    // bob's laptop has only 1..=2; alice has no device, so her copies all stay.
    assert_eq!((stats.entries, stats.acked_entries), (2, 2));
    assert_eq!(seqs(&store, "bob"), vec![3, 4, 5, 6]);
    let info = store.inbox_info("bob").unwrap();
    assert_eq!((info.low, info.head), (3, 6));
    assert_eq!(message_seqs(&store, "alice"), vec![1, 2, 3, 4, 5, 6]);

    // The laptop catches up past the phone: now the phone is the least advanced.
    set_cursor(&store, "bob", "laptop", epoch, 6, 1_100);
    store.compact(&acked(500)).unwrap();
    assert_eq!(seqs(&store, "bob"), vec![5, 6]);

    // Everything acked: the inbox is empty at low = head + 1, and the next entry
    // continues the sequence.
    set_cursor(&store, "bob", "phone", epoch, 6, 1_200);
    assert_eq!(store.compact(&acked(500)).unwrap().acked_entries, 2);
    let info = store.inbox_info("bob").unwrap();
    assert_eq!((info.low, info.head), (7, 6));
    store
        .append(&[send("alice", "phone", 50, "bob", "later", 7)])
        .unwrap();
    assert_eq!(seqs(&store, "bob"), vec![7]);
    assert_eq!(store.inbox_info("bob").unwrap().low, 7);
}

#[test]
fn acked_compaction_never_moves_low_back_nor_past_head() {
    let store = memory_store();
    let epoch = store.inbox_info("bob").unwrap().epoch;
    alice_to_bob(&store, 6);
    set_cursor(&store, "bob", "phone", epoch, 6, 1_000);
    store.compact(&by_age(4, 0)).unwrap();
    assert_eq!(store.inbox_info("bob").unwrap().low, 4);

    // A cursor below low (a device resumed from an old point) keeps nothing back.
    set_cursor(&store, "bob", "laptop", epoch, 1, 1_000);
    store.compact(&acked(500)).unwrap();
    assert_eq!(store.inbox_info("bob").unwrap().low, 4);
    assert_eq!(seqs(&store, "bob"), vec![4, 5, 6]);

    // A cursor above head (it cannot happen, but a store must not trust it) empties
    // the inbox without moving its head.
    store.remove_device("bob", "laptop").unwrap();
    set_cursor(&store, "bob", "phone", epoch, 1_000, 1_000);
    store.compact(&acked(500)).unwrap();
    let info = store.inbox_info("bob").unwrap();
    assert_eq!((info.low, info.head), (7, 6));
}

#[test]
fn an_inbox_whose_user_has_no_live_device_keeps_everything_until_retention() {
    let store = memory_store();
    let epoch = store.inbox_info("bob").unwrap().epoch;
    alice_to_bob(&store, 4);
    // bob's only devices: one from another epoch, one not seen since before the expiry.
    set_cursor(&store, "bob", "old-epoch", epoch ^ 1, 4, 1_000);
    set_cursor(&store, "bob", "expired", epoch, 4, 100);

    let stats = store.compact(&acked(500)).unwrap();
    assert_eq!((stats.entries, stats.devices), (0, 1));
    assert_eq!(seqs(&store, "bob"), vec![1, 2, 3, 4]);
    assert_eq!(store.cursor("bob", "expired").unwrap(), None);

    // Retention still applies.
    let stats = store
        .compact(&CompactPolicy {
            entries_before_ms: 3,
            ..acked(500)
        })
        .unwrap();
    assert_eq!((stats.entries, stats.acked_entries), (4, 0)); // 1..=2 of bob and alice
    assert_eq!(seqs(&store, "bob"), vec![3, 4]);
}

#[test]
fn cursors_from_another_epoch_or_expired_do_not_hold_entries_back() {
    let store = memory_store();
    let epoch = store.inbox_info("bob").unwrap().epoch;
    alice_to_bob(&store, 6);
    set_cursor(&store, "bob", "phone", epoch, 5, 1_000);
    set_cursor(&store, "bob", "tablet", epoch ^ 1, 0, 1_000);
    set_cursor(&store, "bob", "watch", epoch, 0, 100);

    let stats = store.compact(&acked(500)).unwrap();
    assert_eq!((stats.acked_entries, stats.devices), (5, 1));
    assert_eq!(seqs(&store, "bob"), vec![6]);
    // The other-epoch cursor is not expired, so it stays (a login resets it).
    assert!(store.cursor("bob", "tablet").unwrap().is_some());
}

#[test]
fn without_remove_acked_entries_every_device_has_stay_until_retention() {
    let store = memory_store();
    let epoch = store.inbox_info("bob").unwrap().epoch;
    alice_to_bob(&store, 3);
    set_cursor(&store, "bob", "phone", epoch, 3, 1_000);
    set_cursor(&store, "alice", "phone", epoch, 3, 1_000);
    assert_eq!(store.compact(&by_age(0, 500)).unwrap().entries, 0);
    assert_eq!(seqs(&store, "bob"), vec![1, 2, 3]);
    // Her inbox holds bob's delivered receipt besides.
    assert_eq!(message_seqs(&store, "alice"), vec![1, 2, 3]);
}

#[test]
fn a_dedup_key_outlives_its_entries_removed_by_acked_compaction_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let x = send("alice", "phone", 42, "bob", "x", 10);
    let original = {
        let store = EmbeddedStore::open(dir.path(), Durability::Fsync).unwrap();
        let epoch = store.inbox_info("bob").unwrap().epoch;
        alice_to_bob(&store, 3);
        let original = new_ack(&store.append(std::slice::from_ref(&x)).unwrap()[0]);
        assert_eq!(original.sender_seq, 4);
        // bob's delivered receipt lands in alice's inbox at 5.
        set_cursor(&store, "bob", "phone", epoch, 4, 1_000);
        set_cursor(&store, "alice", "phone", epoch, 5, 1_000);
        store.sync().unwrap();
        original
    };

    // Restart, then every copy of every message goes: all devices have them.
    let store = EmbeddedStore::open(dir.path(), Durability::Fsync).unwrap();
    let stats = store.compact(&acked(500)).unwrap();
    assert_eq!((stats.acked_entries, stats.dedup_keys), (9, 0));
    assert!(all(&store, "bob").is_empty() && all(&store, "alice").is_empty());

    // The resend is still recognised: the original ack, and nothing written.
    assert_eq!(
        store.append(std::slice::from_ref(&x)).unwrap(),
        vec![AppendOutcome::Duplicate(original)]
    );
    for (user, head) in [("alice", 5), ("bob", 4)] {
        let info = store.inbox_info(user).unwrap();
        assert_eq!((info.low, info.head), (head + 1, head), "{user}");
    }
    // Until its own age passes retention.
    let stats = store.compact(&by_age(11, 0)).unwrap();
    assert_eq!(stats.dedup_keys, 4);
    assert!(matches!(
        store.append(&[x]).unwrap()[0],
        AppendOutcome::New { .. }
    ));
}

#[test]
fn devices_lists_one_users_cursors_and_remove_device_forgets_one() {
    let store = memory_store();
    for (user, device) in [
        ("bo", "z"),
        ("bob", "phone"),
        ("bob", "laptop"),
        ("bob2", "tab"),
    ] {
        set_cursor(&store, user, device, 7, 1, 5);
    }
    let names = |user| -> Vec<String> {
        store
            .devices(user)
            .unwrap()
            .into_iter()
            .map(|(d, _)| d)
            .collect()
    };
    assert_eq!(names("bob"), vec!["laptop", "phone"]);
    assert_eq!(store.devices("bob").unwrap()[0].1.acked_seq, 1);
    assert!(names("nobody").is_empty());

    assert!(store.remove_device("bob", "laptop").unwrap());
    assert!(!store.remove_device("bob", "laptop").unwrap());
    assert_eq!(names("bob"), vec!["phone"]);
    assert_eq!(names("bob2"), vec!["tab"]);
    assert_eq!(names("bo"), vec!["z"]);
}

#[test]
fn readers_see_every_committed_message_while_checkpoints_hand_layers_to_the_database() {
    // Checkpoints as often as the thread can take them: every committed row is at some
    // moment in the live layer, the frozen one, or the database, and a reader running
    // meanwhile must find it in one of them, never in none.
    let store = std::sync::Arc::new(memory_store());
    store.set_checkpoint_policy(Duration::ZERO, 1);
    let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (store, acked, stop) = (store.clone(), acked.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut checks = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Acquire) {
                    let n = acked.load(std::sync::atomic::Ordering::Acquire);
                    let bob = seqs(&store, "bob");
                    assert!(
                        bob.len() as u64 >= n,
                        "{} of {n} acknowledged seen",
                        bob.len()
                    );
                    assert_eq!(bob, (1..=bob.len() as u64).collect::<Vec<_>>());
                    assert!(store.inbox_info("bob").unwrap().head >= n);
                    checks += 1;
                }
                checks
            })
        })
        .collect();
    for i in 1..=150u64 {
        let id = (i as u128).to_le_bytes();
        let mut req = send("alice", "phone", 0, "bob", &format!("m{i}"), i);
        req.client_msg_id = id;
        new_ack(&store.append(&[req]).unwrap()[0]);
        acked.store(i, std::sync::atomic::Ordering::Release);
    }
    stop.store(true, std::sync::atomic::Ordering::Release);
    for r in readers {
        assert!(r.join().unwrap() > 0, "a reader never ran");
    }
    assert_eq!(seqs(&store, "bob"), (1..=150).collect::<Vec<_>>());
}

#[test]
fn an_idle_store_runs_a_due_checkpoint_with_nothing_else_written() {
    let cursor = |acked_seq| DeviceCursor {
        inbox_epoch: 1,
        acked_seq,
        last_seen_ms: 5,
    };
    let disk = SimulatedDisk::new();
    let store = EmbeddedStore::open_with_backend(disk.clone(), Durability::Fsync).unwrap();
    store.set_checkpoint_policy(Duration::from_millis(300), usize::MAX);
    store
        .set_cursors(&[("bob".into(), "phone".into(), cursor(3))])
        .unwrap();
    // Not due yet, and nothing synced the cursor's journal record.
    store.idle().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let cut = EmbeddedStore::open_with_backend(disk.power_cut(), Durability::Fsync).unwrap();
    assert_eq!(cut.cursor("bob", "phone").unwrap(), None);
    // Once due, housekeeping alone checkpoints it (no write follows).
    std::thread::sleep(Duration::from_millis(300));
    store.idle().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cut = EmbeddedStore::open_with_backend(disk.power_cut(), Durability::Fsync).unwrap();
        if cut.cursor("bob", "phone").unwrap().map(|c| c.acked_seq) == Some(3) {
            break;
        }
        assert!(Instant::now() < deadline, "idle() ran no checkpoint");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_checkpoint_that_is_not_durable_reaches_the_disk_only_with_a_durable_one_and_replay_skips_what_it_covers()
 {
    let disk = SimulatedDisk::new();
    let store = EmbeddedStore::open_with_backend(disk.clone(), Durability::Fsync).unwrap();
    store.set_checkpoint_policy(Duration::from_secs(3600), usize::MAX);
    let send_n = |ids: std::ops::RangeInclusive<u8>| {
        for id in ids {
            let body = format!("m{id}");
            store
                .append(&[send("alice", "d", id, "bob", &body, u64::from(id))])
                .unwrap();
        }
    };
    let bodies = |store: &EmbeddedStore| -> Vec<String> {
        all(store, "bob")
            .iter()
            .map(|e| String::from_utf8(e.body.to_vec()).unwrap())
            .collect()
    };
    let expected: Vec<String> = (1..=8).map(|i| format!("m{i}")).collect();
    send_n(1..=5);
    store.checkpoint_on_this_thread(false).unwrap();
    send_n(6..=8);
    assert_eq!(seqs(&store, "bob"), (1..=8).collect::<Vec<_>>());

    // A power cut now: the database is back where it was before that checkpoint, and
    // the journal (all eight batches, synced) brings everything back once.
    let cut = EmbeddedStore::open_with_backend(disk.power_cut(), Durability::Fsync).unwrap();
    assert_eq!(cut.replayed_at_open(), 8);
    assert_eq!(bodies(&cut), expected);
    assert_eq!(seqs(&cut, "alice"), (1..=8).collect::<Vec<_>>());
    drop(cut);

    // A clean close makes the pending checkpoint durable (redb does, at close): the
    // reopened store replays only the three batches after it, and nothing twice.
    drop(store);
    let reopened = EmbeddedStore::open_with_backend(disk.clone(), Durability::Fsync).unwrap();
    assert_eq!(reopened.replayed_at_open(), 3);
    assert_eq!(bodies(&reopened), expected);
    let next = reopened
        .append(&[send("alice", "d", 9, "bob", "m9", 9)])
        .unwrap();
    assert_eq!(new_ack(&next[0]).sender_seq, 9);
    assert_eq!(seqs(&reopened, "bob"), (1..=9).collect::<Vec<_>>());

    // A durable checkpoint covers the whole generation: nothing is replayed after it.
    reopened.checkpoint_on_this_thread(true).unwrap();
    let cut = EmbeddedStore::open_with_backend(disk.power_cut(), Durability::Fsync).unwrap();
    assert_eq!(cut.replayed_at_open(), 0);
    assert_eq!(seqs(&cut, "bob"), (1..=9).collect::<Vec<_>>());
}
