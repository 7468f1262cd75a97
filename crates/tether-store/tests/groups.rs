//! Groups, receipts and conversations in the embedded store, through the public `Store`
//! API: who gets which membership and group entries, the membership policy, 1:1 and
//! aggregated group receipts, unread counts, compaction against the delivered mark, and
//! what survives a power cut.

use bytes::Bytes;
use prost::Message;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicU64, Ordering};
use tether_proto::pb;
use tether_store::embedded::DELIVERED_SCAN;
use tether_store::{
    Action, AppendOutcome, AppendRequest, Committed, CompactPolicy, DeviceCursor, Durability,
    EmbeddedStore, EntryKind, GroupChange, GroupOp, InboxTarget, ReadMark, Refuse, SimulatedDisk,
    Store, StoredEntry,
};

/// The member cap every change carries unless a test is about the cap.
const MAX_MEMBERS: u32 = 64;

fn memory_store() -> EmbeddedStore {
    EmbeddedStore::open_with_backend(SimulatedDisk::new(), Durability::Fsync).unwrap()
}

/// A client message id no other request uses (tests about dedup repeat a request).
fn fresh_id() -> [u8; 16] {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    u128::from(NEXT.fetch_add(1, Ordering::Relaxed)).to_be_bytes()
}

/// A request from `sender`'s phone.
fn request(sender: &str, action: Action, body: &str) -> AppendRequest {
    AppendRequest {
        sender: sender.into(),
        sender_device: "phone".into(),
        client_msg_id: fresh_id(),
        action,
        body: Bytes::copy_from_slice(body.as_bytes()),
        content_type: "text/plain".into(),
        ts_ms: 1_000,
    }
}

/// Commits one request alone and returns its outcome.
fn commit(store: &EmbeddedStore, req: AppendRequest) -> AppendOutcome {
    let mut outcomes = store.append(&[req]).unwrap();
    assert_eq!(outcomes.len(), 1);
    outcomes.remove(0)
}

/// A membership change of `group` by `sender`, with the usual member cap.
fn change_request(sender: &str, group: &str, op: GroupOp, members: &[&str]) -> AppendRequest {
    capped_change_request(sender, group, op, members, MAX_MEMBERS)
}

fn capped_change_request(
    sender: &str,
    group: &str,
    op: GroupOp,
    members: &[&str],
    max_members: u32,
) -> AppendRequest {
    let change = GroupChange {
        group: group.into(),
        op,
        members: members.iter().map(|m| m.to_string()).collect(),
        name: format!("{group} name"),
        max_members,
    };
    request(sender, Action::Group(change), "")
}

fn group_change(
    store: &EmbeddedStore,
    sender: &str,
    group: &str,
    op: GroupOp,
    members: &[&str],
) -> AppendOutcome {
    commit(store, change_request(sender, group, op, members))
}

/// `owner` creates `group` with `others`; returns the create's ack.
fn create(store: &EmbeddedStore, owner: &str, group: &str, others: &[&str]) -> Committed {
    new_ack(&group_change(store, owner, group, GroupOp::Create, others))
}

fn group_message(sender: &str, group: &str, body: &str) -> AppendRequest {
    request(sender, Action::GroupMessage(group.into()), body)
}

fn group_send(store: &EmbeddedStore, sender: &str, group: &str, body: &str) -> AppendOutcome {
    commit(store, group_message(sender, group, body))
}

/// A 1:1 message from `sender` to `to`, with the copy in the sender's own inbox.
fn direct(sender: &str, to: &str, body: &str) -> AppendRequest {
    let target = |user: &str, conversation: &str| InboxTarget {
        user: user.into(),
        conversation: conversation.into(),
    };
    request(
        sender,
        Action::Message(vec![target(to, sender), target(sender, to)]),
        body,
    )
}

fn direct_send(store: &EmbeddedStore, sender: &str, to: &str, body: &str) -> Committed {
    new_ack(&commit(store, direct(sender, to, body)))
}

/// A device of `user` holds its inbox up to `up_to_seq`.
fn delivered(store: &EmbeddedStore, user: &str, up_to_seq: u64) -> AppendOutcome {
    let outcome = commit(store, request(user, Action::Delivered { up_to_seq }, ""));
    assert!(
        matches!(outcome, AppendOutcome::New { .. }),
        "delivered mark refused: {outcome:?}"
    );
    outcome
}

/// `user` read `conversation` up to `up_to_seq` of its inbox.
fn read(store: &EmbeddedStore, user: &str, conversation: &str, up_to_seq: u64) -> AppendOutcome {
    let mark = ReadMark {
        conversation: conversation.into(),
        up_to_seq,
        message_id: 0,
        incoming: 0,
    };
    commit(store, request(user, Action::Read(mark), ""))
}

fn new_ack(outcome: &AppendOutcome) -> Committed {
    match outcome {
        AppendOutcome::New { ack, .. } => *ack,
        other => panic!("expected a new commit, got {other:?}"),
    }
}

fn refusal(outcome: &AppendOutcome) -> Refuse {
    match outcome {
        AppendOutcome::Refused { code, .. } => *code,
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn entries(store: &EmbeddedStore, user: &str) -> Vec<StoredEntry> {
    store.read_range(user, 0, u64::MAX, usize::MAX).unwrap()
}

fn in_conversation(store: &EmbeddedStore, user: &str, conversation: &str) -> Vec<StoredEntry> {
    entries(store, user)
        .into_iter()
        .filter(|e| e.conversation == conversation)
        .collect()
}

/// Entries of `user`'s inbox in `conversation` of one kind.
fn of_kind(
    store: &EmbeddedStore,
    user: &str,
    conversation: &str,
    kind: EntryKind,
) -> Vec<StoredEntry> {
    in_conversation(store, user, conversation)
        .into_iter()
        .filter(|e| e.kind == kind)
        .collect()
}

fn head(store: &EmbeddedStore, user: &str) -> u64 {
    store.inbox_info(user).unwrap().head
}

fn heads(store: &EmbeddedStore, users: &[&str]) -> Vec<u64> {
    users.iter().map(|u| head(store, u)).collect()
}

fn message_ids(entries: &[StoredEntry]) -> Vec<u64> {
    entries.iter().map(|e| e.message_id).collect()
}

fn receipt_body(entry: &StoredEntry) -> pb::ReceiptBody {
    assert_eq!(entry.kind, EntryKind::Receipt, "{entry:?}");
    pb::ReceiptBody::decode(entry.body.clone()).unwrap()
}

fn group_event(entry: &StoredEntry) -> pb::GroupEvent {
    assert_eq!(entry.kind, EntryKind::Membership, "{entry:?}");
    pb::GroupEvent::decode(entry.body.clone()).unwrap()
}

/// The receipts in `user`'s inbox under `conversation`, decoded.
fn receipts(store: &EmbeddedStore, user: &str, conversation: &str) -> Vec<pb::ReceiptBody> {
    of_kind(store, user, conversation, EntryKind::Receipt)
        .iter()
        .map(receipt_body)
        .collect()
}

/// The aggregated group receipts (by "every other member") of one kind in `user`'s inbox.
fn aggregated(
    store: &EmbeddedStore,
    user: &str,
    group: &str,
    kind: pb::ReceiptKind,
) -> Vec<pb::ReceiptBody> {
    receipts(store, user, &format!("g:{group}"))
        .into_iter()
        .filter(|r| r.by.is_empty() && r.kind == kind as i32)
        .collect()
}

/// The seq of message `message_id` in `user`'s inbox.
fn seq_of(store: &EmbeddedStore, user: &str, message_id: u64) -> u64 {
    entries(store, user)
        .iter()
        .find(|e| e.message_id == message_id)
        .unwrap_or_else(|| panic!("{user} has no copy of message {message_id}"))
        .seq
}

fn conversation(store: &EmbeddedStore, user: &str, id: &str) -> pb::Conversation {
    store
        .conversations(user, "", usize::MAX)
        .unwrap()
        .into_iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("{user} has no conversation {id:?}"))
}

fn group_info(store: &EmbeddedStore, group: &str) -> pb::GroupInfo {
    store.group(group).unwrap().expect("group exists")
}

fn summary(store: &EmbeddedStore, group: &str) -> pb::GroupSummary {
    group_info(store, group)
        .summary
        .expect("group has a summary")
}

fn member(store: &EmbeddedStore, group: &str, user: &str) -> pb::GroupMember {
    group_info(store, group)
        .members
        .into_iter()
        .find(|m| m.user == user)
        .unwrap_or_else(|| panic!("{user} is not a member of {group}"))
}

fn member_names(store: &EmbeddedStore, group: &str) -> Vec<String> {
    group_info(store, group)
        .members
        .into_iter()
        .map(|m| m.user)
        .collect()
}

fn kind(event: &pb::GroupEvent) -> pb::GroupEventKind {
    pb::GroupEventKind::try_from(event.kind).unwrap()
}

fn strings(names: &[&str]) -> Vec<String> {
    names.iter().map(|n| n.to_string()).collect()
}

// ---- membership entries and group messages ------------------------------------------

#[test]
fn create_writes_a_created_entry_to_every_member_and_lists_the_group_for_each() {
    let store = memory_store();
    let ack = create(&store, "ann", "team", &["ben", "cat"]);

    for user in ["ann", "ben", "cat"] {
        let all = entries(&store, user);
        assert_eq!(all.len(), 1, "{user}: {all:?}");
        let entry = &all[0];
        assert_eq!(entry.kind, EntryKind::Membership);
        assert_eq!(entry.conversation, "g:team");
        assert_eq!(entry.message_id, ack.message_id);
        assert_eq!(entry.from, "ann");
        let event = group_event(entry);
        assert_eq!(kind(&event), pb::GroupEventKind::Created);
        assert_eq!(event.group, "team");
        assert_eq!(event.actor, "ann");
        assert_eq!(event.members, strings(&["ann", "ben", "cat"]));
        assert_eq!(event.owner, "ann");
        assert_eq!(event.size, 3);
        assert_eq!(event.name, "team name");

        let groups = store.groups_of(user).unwrap();
        assert_eq!(
            groups,
            vec![pb::GroupSummary {
                group: "team".into(),
                name: "team name".into(),
                owner: "ann".into(),
                size: 3,
            }],
            "{user}"
        );
    }
    assert_eq!(ack.sender_seq, 1, "the creator's own copy");
    assert!(store.groups_of("dan").unwrap().is_empty());

    let info = group_info(&store, "team");
    assert_eq!(info.summary.unwrap().owner, "ann");
    let mut members = info.members;
    members.sort_by(|a, b| a.user.cmp(&b.user));
    assert_eq!(
        members.iter().map(|m| m.user.as_str()).collect::<Vec<_>>(),
        ["ann", "ben", "cat"]
    );
    for m in &members {
        assert_eq!(m.joined_message_id, ack.message_id, "{}", m.user);
    }
    assert_eq!(store.group("nope").unwrap(), None);
}

#[test]
fn group_messages_land_once_in_every_members_inbox_in_one_order_whatever_the_batching() {
    let store = memory_store();
    let members = ["ann", "ben", "cat", "dan", "eve"];
    create(&store, "ann", "team", &members[1..]);
    let mut rng = StdRng::seed_from_u64(0x7e7e);

    // (sender, body, ack) in commit order.
    let mut sent: Vec<(String, String, Committed)> = Vec::new();
    while sent.len() < 200 {
        let size = rng.random_range(1..=24).min(200 - sent.len());
        let batch: Vec<AppendRequest> = (0..size)
            .map(|i| {
                let sender = members[rng.random_range(0..members.len())];
                group_message(sender, "team", &format!("m{}", sent.len() + i))
            })
            .collect();
        let outcomes = store.append(&batch).unwrap();
        for (req, outcome) in batch.iter().zip(&outcomes) {
            let body = String::from_utf8(req.body.to_vec()).unwrap();
            sent.push((req.sender.clone(), body, new_ack(outcome)));
        }
    }
    let expected_ids: Vec<u64> = sent.iter().map(|(_, _, ack)| ack.message_id).collect();
    assert!(expected_ids.windows(2).all(|w| w[0] < w[1]));

    for user in members {
        let all = entries(&store, user);
        // The create and 200 messages, nothing twice, nothing elsewhere.
        assert_eq!(all.len(), 201, "{user}");
        assert!(all.iter().all(|e| e.conversation == "g:team"), "{user}");
        let messages: Vec<_> = all
            .into_iter()
            .filter(|e| e.kind == EntryKind::Message)
            .collect();
        assert_eq!(message_ids(&messages), expected_ids, "{user}");
        for (entry, (sender, body, _)) in messages.iter().zip(&sent) {
            assert_eq!(&entry.from, sender);
            assert_eq!(entry.body, body.as_bytes());
        }
    }
    for (sender, body, ack) in &sent {
        let own = store
            .read_range(sender, ack.sender_seq, ack.sender_seq, 1)
            .unwrap();
        assert_eq!(own.len(), 1);
        assert_eq!(own[0].message_id, ack.message_id, "{sender} {body}");
        assert_eq!(&own[0].from, sender);
    }
}

#[test]
fn a_non_members_group_send_is_forbidden_and_a_send_to_an_unknown_group_not_found() {
    let store = memory_store();
    let members = ["ann", "ben", "cat"];
    create(&store, "ann", "team", &["ben", "cat"]);
    let before = heads(&store, &members);

    let outcomes = store
        .append(&[
            group_message("zed", "team", "let me in"),
            group_message("ben", "team", "hello"),
            group_message("ann", "nope", "anyone?"),
            group_message("zed", "team", "again"),
        ])
        .unwrap();
    assert_eq!(refusal(&outcomes[0]), Refuse::Forbidden);
    new_ack(&outcomes[1]);
    assert_eq!(refusal(&outcomes[2]), Refuse::NotFound);
    assert_eq!(refusal(&outcomes[3]), Refuse::Forbidden);

    // Only ben's message was written, once per member.
    let after = heads(&store, &members);
    assert_eq!(after, before.iter().map(|h| h + 1).collect::<Vec<_>>());
    assert_eq!(head(&store, "zed"), 0);
    assert!(store.conversations("zed", "", 10).unwrap().is_empty());
    assert_eq!(store.group("nope").unwrap(), None);
}

#[test]
fn an_added_member_starts_at_its_added_entry_and_gets_exactly_the_messages_after_it() {
    let store = memory_store();
    create(&store, "ann", "team", &["ben", "cat"]);
    group_send(&store, "ann", "team", "before");

    // The add lands mid-batch, between messages.
    let outcomes = store
        .append(&[
            group_message("ben", "team", "m1"),
            change_request("cat", "team", GroupOp::Add, &["fay"]),
            group_message("ann", "team", "m2"),
            group_message("fay", "team", "m3"),
        ])
        .unwrap();
    let added = new_ack(&outcomes[1]);
    let after_add: Vec<u64> = outcomes[2..]
        .iter()
        .map(|o| new_ack(o).message_id)
        .collect();
    let later = new_ack(&group_send(&store, "cat", "team", "m4")).message_id;

    let fay = in_conversation(&store, "fay", "g:team");
    assert_eq!(fay[0].message_id, added.message_id);
    let event = group_event(&fay[0]);
    assert_eq!(kind(&event), pb::GroupEventKind::Added);
    assert_eq!(event.actor, "cat");
    assert_eq!(event.members, strings(&["fay"]));
    assert_eq!(event.owner, "ann");
    assert_eq!(event.size, 4);
    let fay_messages: Vec<_> = fay[1..].to_vec();
    assert!(fay_messages.iter().all(|e| e.kind == EntryKind::Message));
    assert_eq!(
        message_ids(&fay_messages),
        [after_add.clone(), vec![later]].concat()
    );

    // Everyone saw the add, in the same place.
    for user in ["ann", "ben", "cat"] {
        let ids = message_ids(&in_conversation(&store, user, "g:team"));
        let at = ids.iter().position(|id| *id == added.message_id).unwrap();
        assert_eq!(
            ids[at + 1..],
            [after_add.clone(), vec![later]].concat(),
            "{user}"
        );
    }
    assert_eq!(
        member(&store, "team", "fay").joined_message_id,
        added.message_id
    );
    assert_eq!(summary(&store, "team").size, 4);
    assert_eq!(store.groups_of("fay").unwrap().len(), 1);
}

#[test]
fn a_removed_member_ends_at_its_removed_entry_and_may_no_longer_send() {
    let store = memory_store();
    create(&store, "ann", "team", &["ben", "cat", "dan"]);
    let outcomes = store
        .append(&[
            group_message("dan", "team", "m1"),
            change_request("ann", "team", GroupOp::Remove, &["dan"]),
            group_message("ben", "team", "m2"),
            group_message("dan", "team", "m3"),
        ])
        .unwrap();
    let removed = new_ack(&outcomes[1]);
    let m2 = new_ack(&outcomes[2]).message_id;
    assert_eq!(refusal(&outcomes[3]), Refuse::Forbidden);
    assert_eq!(
        refusal(&group_send(&store, "dan", "team", "m4")),
        Refuse::Forbidden
    );
    group_send(&store, "cat", "team", "m5");

    let dan = entries(&store, "dan");
    let last = dan.last().unwrap();
    assert_eq!(last.message_id, removed.message_id, "{dan:?}");
    let event = group_event(last);
    assert_eq!(kind(&event), pb::GroupEventKind::Removed);
    assert_eq!(event.actor, "ann");
    assert_eq!(event.members, strings(&["dan"]));
    assert_eq!(event.size, 3);

    for user in ["ann", "ben", "cat"] {
        let ids = message_ids(&in_conversation(&store, user, "g:team"));
        assert!(
            ids.contains(&removed.message_id) && ids.contains(&m2),
            "{user}"
        );
    }
    assert_eq!(
        member_names(&store, "team"),
        strings(&["ann", "ben", "cat"])
    );
    assert!(store.groups_of("dan").unwrap().is_empty());
    assert_eq!(store.groups_of("ben").unwrap()[0].size, 3);
}

#[test]
fn only_the_owner_removes_and_only_current_members_and_never_itself() {
    let store = memory_store();
    let members = ["ann", "ben", "cat"];
    create(&store, "ann", "team", &["ben", "cat"]);
    let before = heads(&store, &members);

    let remove = |sender, who: &[&str]| group_change(&store, sender, "team", GroupOp::Remove, who);
    assert_eq!(refusal(&remove("ben", &["cat"])), Refuse::Forbidden);
    assert_eq!(refusal(&remove("ann", &["zed"])), Refuse::Conflict);
    assert_eq!(refusal(&remove("ann", &["ben", "zed"])), Refuse::Conflict);
    assert_eq!(refusal(&remove("ann", &["ann"])), Refuse::BadRequest);
    assert_eq!(refusal(&remove("ann", &[])), Refuse::BadRequest);
    assert_eq!(refusal(&remove("zed", &["ben"])), Refuse::Forbidden);
    // Others' changes: a non-member adds nobody, a member re-adds nobody.
    let add = |sender, who: &[&str]| group_change(&store, sender, "team", GroupOp::Add, who);
    assert_eq!(refusal(&add("zed", &["yan"])), Refuse::Forbidden);
    assert_eq!(refusal(&add("ben", &["cat"])), Refuse::Conflict);
    assert_eq!(
        refusal(&group_change(&store, "ann", "nope", GroupOp::Add, &["ben"])),
        Refuse::NotFound
    );
    assert_eq!(
        refusal(&group_change(&store, "zed", "team", GroupOp::Leave, &[])),
        Refuse::Forbidden
    );

    assert_eq!(heads(&store, &members), before, "refusals write nothing");
    assert_eq!(member_names(&store, "team"), strings(&members));
    new_ack(&remove("ann", &["cat"]));
    assert_eq!(member_names(&store, "team"), strings(&["ann", "ben"]));
}

#[test]
fn an_owner_who_leaves_passes_ownership_to_the_longest_standing_member() {
    let store = memory_store();
    create(&store, "zed", "team", &["yan"]);
    // "abe" sorts first but joined last.
    new_ack(&group_change(&store, "yan", "team", GroupOp::Add, &["abe"]));

    let left = new_ack(&group_change(&store, "zed", "team", GroupOp::Leave, &[]));
    let zed = entries(&store, "zed");
    let last = zed.last().unwrap();
    assert_eq!(last.message_id, left.message_id);
    let event = group_event(last);
    assert_eq!(kind(&event), pb::GroupEventKind::Left);
    assert_eq!(event.actor, "zed");
    assert_eq!(event.members, strings(&["zed"]));
    assert_eq!(event.owner, "yan");
    assert_eq!(event.size, 2);
    assert_eq!(summary(&store, "team").owner, "yan");
    assert_eq!(store.groups_of("abe").unwrap()[0].owner, "yan");
    assert!(store.groups_of("zed").unwrap().is_empty());

    // A member who is not the owner leaves: the owner stays.
    new_ack(&group_change(&store, "yan", "team", GroupOp::Add, &["bob"]));
    new_ack(&group_change(&store, "bob", "team", GroupOp::Leave, &[]));
    assert_eq!(summary(&store, "team").owner, "yan");

    new_ack(&group_change(&store, "yan", "team", GroupOp::Leave, &[]));
    assert_eq!(summary(&store, "team").owner, "abe");
}

#[test]
fn a_group_every_member_left_is_a_tombstone_whose_id_is_not_reused() {
    let store = memory_store();
    create(&store, "ann", "team", &["ben"]);
    new_ack(&group_change(&store, "ann", "team", GroupOp::Leave, &[]));
    new_ack(&group_change(&store, "ben", "team", GroupOp::Leave, &[]));

    let info = group_info(&store, "team");
    assert!(info.members.is_empty());
    assert_eq!(info.summary.unwrap().size, 0);
    assert!(store.groups_of("ben").unwrap().is_empty());
    assert_eq!(
        refusal(&group_change(&store, "cat", "team", GroupOp::Create, &[])),
        Refuse::Conflict
    );
    assert_eq!(
        refusal(&group_send(&store, "ben", "team", "hello?")),
        Refuse::NotFound
    );
    assert_eq!(
        refusal(&group_change(&store, "ben", "team", GroupOp::Add, &["ann"])),
        Refuse::NotFound
    );
}

#[test]
fn create_and_add_beyond_max_members_are_group_full() {
    let store = memory_store();
    let capped = |sender, op, members: &[&str]| {
        commit(
            &store,
            capped_change_request(sender, "team", op, members, 3),
        )
    };
    // The creator counts.
    assert_eq!(
        refusal(&capped("ann", GroupOp::Create, &["ben", "cat", "dan"])),
        Refuse::GroupFull
    );
    assert_eq!(store.group("team").unwrap(), None);
    assert_eq!(head(&store, "ben"), 0);
    // Naming the creator or someone twice does not count twice.
    new_ack(&capped(
        "ann",
        GroupOp::Create,
        &["ann", "ben", "ben", "cat"],
    ));
    assert_eq!(summary(&store, "team").size, 3);

    let before = heads(&store, &["ann", "ben", "cat", "dan"]);
    assert_eq!(
        refusal(&capped("ben", GroupOp::Add, &["dan"])),
        Refuse::GroupFull
    );
    assert_eq!(heads(&store, &["ann", "ben", "cat", "dan"]), before);
    new_ack(&capped("cat", GroupOp::Leave, &[]));
    new_ack(&capped("ben", GroupOp::Add, &["dan"]));
    assert_eq!(
        member_names(&store, "team"),
        strings(&["ann", "ben", "dan"])
    );
}

#[test]
fn create_of_an_existing_group_is_conflict_and_bad_ids_are_bad_request() {
    let store = memory_store();
    create(&store, "ann", "team", &["ben"]);
    assert_eq!(
        refusal(&group_change(
            &store,
            "cat",
            "team",
            GroupOp::Create,
            &["dan"]
        )),
        Refuse::Conflict
    );
    assert_eq!(summary(&store, "team").owner, "ann");
    assert_eq!(head(&store, "dan"), 0);

    let too_long = "x".repeat(65);
    for bad in ["", "has space", "g:nested", "ünïcode", too_long.as_str()] {
        assert_eq!(
            refusal(&group_change(&store, "ann", bad, GroupOp::Create, &["ben"])),
            Refuse::BadRequest,
            "group id {bad:?}"
        );
    }
    for bad_member in ["", "g:team"] {
        assert_eq!(
            refusal(&group_change(
                &store,
                "ann",
                "other",
                GroupOp::Create,
                &[bad_member]
            )),
            Refuse::BadRequest,
            "member {bad_member:?}"
        );
    }
    assert_eq!(store.group("other").unwrap(), None);
    assert_eq!(store.groups_of("ann").unwrap().len(), 1);
}

#[test]
fn a_repeated_group_change_is_a_duplicate_with_the_original_ack_and_writes_nothing() {
    let store = memory_store();
    let create_req = change_request("ann", "team", GroupOp::Create, &["ben"]);
    let original = new_ack(&commit(&store, create_req.clone()));
    assert_eq!(
        commit(&store, create_req),
        AppendOutcome::Duplicate(original)
    );

    let add = change_request("ben", "team", GroupOp::Add, &["cat"]);
    let outcomes = store.append(&[add.clone(), add.clone()]).unwrap();
    let added = new_ack(&outcomes[0]);
    assert_eq!(outcomes[1], AppendOutcome::Duplicate(added));
    let before = heads(&store, &["ann", "ben", "cat"]);
    assert_eq!(commit(&store, add), AppendOutcome::Duplicate(added));
    assert_eq!(heads(&store, &["ann", "ben", "cat"]), before);

    let memberships = |user| of_kind(&store, user, "g:team", EntryKind::Membership).len();
    assert_eq!(memberships("ann"), 2);
    assert_eq!(memberships("cat"), 1);
    assert_eq!(summary(&store, "team").size, 3);
}

#[test]
fn a_repeated_group_message_is_a_duplicate_and_lands_once() {
    let store = memory_store();
    create(&store, "ann", "team", &["ben"]);
    let message = group_message("ben", "team", "once");
    let outcomes = store.append(&[message.clone(), message.clone()]).unwrap();
    let original = new_ack(&outcomes[0]);
    assert_eq!(outcomes[1], AppendOutcome::Duplicate(original));
    assert_eq!(commit(&store, message), AppendOutcome::Duplicate(original));
    for user in ["ann", "ben"] {
        assert_eq!(of_kind(&store, user, "g:team", EntryKind::Message).len(), 1);
    }
}

// ---- 1:1 receipts -------------------------------------------------------------------

#[test]
fn delivered_writes_one_receipt_per_peer_up_to_its_last_message_and_only_once() {
    let store = memory_store();
    let alice: Vec<Committed> = (1..=3)
        .map(|i| direct_send(&store, "alice", "bob", &format!("a{i}")))
        .collect();
    let carol = direct_send(&store, "carol", "bob", "c1");
    let bob_head = head(&store, "bob");
    assert_eq!(bob_head, 4);
    let alice_head = head(&store, "alice");

    delivered(&store, "bob", bob_head);
    let to_alice = of_kind(&store, "alice", "bob", EntryKind::Receipt);
    assert_eq!(to_alice.len(), 1, "{to_alice:?}");
    assert_eq!(to_alice[0].seq, alice_head + 1);
    assert_eq!(to_alice[0].from, "bob");
    assert_eq!(
        receipt_body(&to_alice[0]),
        pb::ReceiptBody {
            kind: pb::ReceiptKind::Delivered as i32,
            conversation: "bob".into(),
            by: "bob".into(),
            up_to_message_id: alice[2].message_id,
            up_to_seq: 0,
            unread: 0,
        }
    );
    let to_carol = receipts(&store, "carol", "bob");
    assert_eq!(to_carol.len(), 1);
    assert_eq!(to_carol[0].up_to_message_id, carol.message_id);
    assert!(
        receipts(&store, "bob", "alice").is_empty(),
        "no receipt for bob"
    );

    // The mark is stored: the same or a lower one writes nothing.
    let everyone = ["alice", "bob", "carol"];
    let before = heads(&store, &everyone);
    delivered(&store, "bob", bob_head);
    delivered(&store, "bob", 2);
    delivered(&store, "bob", bob_head + 10);
    assert_eq!(heads(&store, &everyone), before);
}

#[test]
fn delivered_up_to_part_of_the_inbox_covers_only_that_part() {
    let store = memory_store();
    let alice: Vec<Committed> = (1..=3)
        .map(|i| direct_send(&store, "alice", "bob", &format!("a{i}")))
        .collect();
    delivered(&store, "bob", 2);
    delivered(&store, "bob", 3);
    let ups: Vec<u64> = receipts(&store, "alice", "bob")
        .iter()
        .map(|r| r.up_to_message_id)
        .collect();
    assert_eq!(ups, [alice[1].message_id, alice[2].message_id]);
}

#[test]
fn a_delivered_mark_scans_at_most_delivered_scan_entries_and_reports_how_far_it_got() {
    let store = memory_store();
    let count = DELIVERED_SCAN + 10;
    let batch: Vec<AppendRequest> = (0..count)
        .map(|i| direct("alice", "bob", &format!("a{i}")))
        .collect();
    let sent: Vec<Committed> = store.append(&batch).unwrap().iter().map(new_ack).collect();

    let first = new_ack(&delivered(&store, "bob", count));
    assert_eq!(first.sender_seq, DELIVERED_SCAN);
    let second = new_ack(&delivered(&store, "bob", count));
    assert_eq!(second.sender_seq, count);
    let ups: Vec<u64> = receipts(&store, "alice", "bob")
        .iter()
        .map(|r| r.up_to_message_id)
        .collect();
    let last_scanned = usize::try_from(DELIVERED_SCAN).unwrap() - 1;
    assert_eq!(
        ups,
        [
            sent[last_scanned].message_id,
            sent.last().unwrap().message_id
        ]
    );
}

#[test]
fn read_sends_a_read_receipt_to_the_peer_and_echoes_the_unread_count_to_the_reader() {
    let store = memory_store();
    let alice: Vec<Committed> = (1..=3)
        .map(|i| direct_send(&store, "alice", "bob", &format!("a{i}")))
        .collect();
    assert_eq!(conversation(&store, "bob", "alice").unread, 3);
    let second = seq_of(&store, "bob", alice[1].message_id);

    new_ack(&read(&store, "bob", "alice", second));
    let to_alice = receipts(&store, "alice", "bob");
    assert_eq!(
        to_alice,
        vec![pb::ReceiptBody {
            kind: pb::ReceiptKind::Read as i32,
            conversation: "bob".into(),
            by: "bob".into(),
            up_to_message_id: alice[1].message_id,
            up_to_seq: 0,
            unread: 0,
        }]
    );
    let echo = receipts(&store, "bob", "alice");
    assert_eq!(
        echo,
        vec![pb::ReceiptBody {
            kind: pb::ReceiptKind::Read as i32,
            conversation: "alice".into(),
            by: "bob".into(),
            up_to_message_id: alice[1].message_id,
            up_to_seq: second,
            unread: 1,
        }]
    );
    let conv = conversation(&store, "bob", "alice");
    assert_eq!(
        (conv.unread, conv.read_up_to, conv.incoming),
        (1, second, 3)
    );

    // Reading the same place again writes nothing.
    let before = heads(&store, &["alice", "bob"]);
    new_ack(&read(&store, "bob", "alice", second));
    new_ack(&read(&store, "bob", "alice", 1));
    assert_eq!(heads(&store, &["alice", "bob"]), before);

    let third = seq_of(&store, "bob", alice[2].message_id);
    new_ack(&read(&store, "bob", "alice", third));
    assert_eq!(conversation(&store, "bob", "alice").unread, 0);
    let last = receipts(&store, "alice", "bob").pop().unwrap();
    assert_eq!(last.up_to_message_id, alice[2].message_id);
    let echo = receipts(&store, "bob", "alice").pop().unwrap();
    assert_eq!((echo.up_to_seq, echo.unread), (third, 0));
}

#[test]
fn read_is_refused_for_a_foreign_conversation_a_seq_of_another_or_beyond_head() {
    let store = memory_store();
    direct_send(&store, "alice", "bob", "a1");
    let carol = direct_send(&store, "carol", "bob", "c1");
    let everyone = ["alice", "bob", "carol"];
    let before = heads(&store, &everyone);
    let bob_head = head(&store, "bob");

    assert_eq!(refusal(&read(&store, "bob", "zed", 1)), Refuse::Forbidden);
    assert_eq!(
        refusal(&read(&store, "nobody", "bob", 1)),
        Refuse::Forbidden
    );
    let carols_seq = seq_of(&store, "bob", carol.message_id);
    assert_eq!(
        refusal(&read(&store, "bob", "alice", carols_seq)),
        Refuse::BadRequest
    );
    assert_eq!(
        refusal(&read(&store, "bob", "alice", bob_head + 1)),
        Refuse::BadRequest
    );
    assert_eq!(
        refusal(&read(&store, "bob", "alice", 0)),
        Refuse::BadRequest
    );

    assert_eq!(heads(&store, &everyone), before);
    assert_eq!(conversation(&store, "bob", "alice").unread, 1);
}

// ---- group receipts -----------------------------------------------------------------

#[test]
fn a_group_delivered_receipt_waits_for_every_other_member_and_is_one_aggregated_entry() {
    let store = memory_store();
    let created = create(&store, "ann", "team", &["ben", "cat", "dan"]);
    group_send(&store, "ann", "team", "m1");
    let m2 = new_ack(&group_send(&store, "ann", "team", "m2")).message_id;

    delivered(&store, "ben", head(&store, "ben"));
    delivered(&store, "cat", head(&store, "cat"));
    assert!(receipts(&store, "ann", "g:team").is_empty());
    assert_eq!(member(&store, "team", "ben").delivered_up_to, m2);
    assert_eq!(member(&store, "team", "cat").delivered_up_to, m2);
    assert_eq!(
        member(&store, "team", "dan").delivered_up_to,
        created.message_id
    );

    let ann_head = head(&store, "ann");
    delivered(&store, "dan", head(&store, "dan"));
    let all = of_kind(&store, "ann", "g:team", EntryKind::Receipt);
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].seq, ann_head + 1);
    assert_eq!(all[0].from, "");
    let body = receipt_body(&all[0]);
    assert_eq!(body.kind, pb::ReceiptKind::Delivered as i32);
    assert_eq!(body.conversation, "g:team");
    assert_eq!(body.by, "");
    assert!(body.up_to_message_id >= m2, "{body:?}");

    // Members who sent nothing get nothing; a repeated mark writes nothing.
    for user in ["ben", "cat", "dan"] {
        assert!(receipts(&store, user, "g:team").is_empty(), "{user}");
    }
    let before = heads(&store, &["ann", "ben", "cat", "dan"]);
    delivered(&store, "dan", head(&store, "dan"));
    assert_eq!(heads(&store, &["ann", "ben", "cat", "dan"]), before);
}

#[test]
fn a_group_read_receipt_waits_for_every_other_member_and_is_one_aggregated_entry() {
    let store = memory_store();
    create(&store, "ann", "team", &["ben", "cat", "dan"]);
    group_send(&store, "ann", "team", "m1");
    let m2 = new_ack(&group_send(&store, "ann", "team", "m2")).message_id;

    for user in ["ben", "cat"] {
        new_ack(&read(&store, user, "g:team", seq_of(&store, user, m2)));
        assert_eq!(member(&store, "team", user).read_up_to, m2);
        // Its own devices follow: an echo by the reader.
        let echo = receipts(&store, user, "g:team");
        assert_eq!(echo.len(), 1);
        assert_eq!(echo[0].by, user);
        assert_eq!(echo[0].unread, 0);
    }
    assert!(aggregated(&store, "ann", "team", pb::ReceiptKind::Read).is_empty());
    assert!(receipts(&store, "ann", "g:team").is_empty());

    new_ack(&read(&store, "dan", "g:team", seq_of(&store, "dan", m2)));
    let reads = aggregated(&store, "ann", "team", pb::ReceiptKind::Read);
    assert_eq!(reads.len(), 1, "{reads:?}");
    assert!(reads[0].up_to_message_id >= m2);
    assert_eq!(reads[0].conversation, "g:team");
    // Reading is not delivering: no delivered receipt came with it.
    assert!(aggregated(&store, "ann", "team", pb::ReceiptKind::Delivered).is_empty());
    assert_eq!(receipts(&store, "ann", "g:team").len(), 1);
}

#[test]
fn removing_or_losing_the_member_who_held_the_others_back_releases_the_aggregated_receipt() {
    let store = memory_store();
    for (group, release) in [("removed", GroupOp::Remove), ("left", GroupOp::Leave)] {
        create(&store, "ann", group, &["ben", "cat", "dan"]);
        group_send(&store, "ann", group, "m1");
        let m2 = new_ack(&group_send(&store, "ann", group, "m2")).message_id;
        let conversation = format!("g:{group}");
        for user in ["ben", "cat"] {
            delivered(&store, user, head(&store, user));
        }
        assert!(receipts(&store, "ann", &conversation).is_empty(), "{group}");

        let ann_head = head(&store, "ann");
        let outcome = match release {
            GroupOp::Remove => group_change(&store, "ann", group, GroupOp::Remove, &["dan"]),
            _ => group_change(&store, "dan", group, GroupOp::Leave, &[]),
        };
        new_ack(&outcome);
        // The membership entry, then the receipt, in the same commit.
        let ann = entries(&store, "ann");
        assert_eq!(ann.len() as u64, ann_head + 2, "{group}");
        assert_eq!(ann[ann.len() - 2].kind, EntryKind::Membership);
        let body = receipt_body(&ann[ann.len() - 1]);
        assert_eq!(body.kind, pb::ReceiptKind::Delivered as i32, "{group}");
        assert_eq!(body.by, "");
        assert!(body.up_to_message_id >= m2, "{group}: {body:?}");
        assert!(aggregated(&store, "ann", group, pb::ReceiptKind::Read).is_empty());
        // The one who is gone gets none.
        assert!(receipts(&store, "dan", &conversation).is_empty(), "{group}");
    }
}

#[test]
fn marks_committed_in_the_same_batch_as_the_messages_they_cover_release_the_receipt() {
    let store = memory_store();
    create(&store, "ann", "team", &["ben", "cat"]);
    // Heads after the two messages: the create, then m1 and m2.
    let outcomes = store
        .append(&[
            group_message("ann", "team", "m1"),
            group_message("ann", "team", "m2"),
            request("ben", Action::Delivered { up_to_seq: 3 }, ""),
            request("cat", Action::Delivered { up_to_seq: 3 }, ""),
        ])
        .unwrap();
    let m2 = new_ack(&outcomes[1]).message_id;
    let receipts = aggregated(&store, "ann", "team", pb::ReceiptKind::Delivered);
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    assert!(receipts[0].up_to_message_id >= m2);
    assert_eq!(
        entries(&store, "ann").last().unwrap().kind,
        EntryKind::Receipt
    );
}

/// `ann` sends `count` messages to a group of `size`; after each, every other member, in
/// a random order, delivers and reads it. Returns ann's aggregated (delivered, read)
/// receipts and the message ids.
fn receipts_for_one_sender(size: usize, count: usize) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
    let store = memory_store();
    let others: Vec<String> = (1..size).map(|i| format!("member{i:02}")).collect();
    let names: Vec<&str> = others.iter().map(String::as_str).collect();
    create(&store, "ann", "big", &names);
    let mut rng = StdRng::seed_from_u64(size as u64);
    let mut sent = Vec::new();
    for i in 0..count {
        let id = new_ack(&group_send(&store, "ann", "big", &format!("m{i}"))).message_id;
        sent.push(id);
        let mut order = names.clone();
        order.shuffle(&mut rng);
        for user in &order {
            delivered(&store, user, head(&store, user));
        }
        order.shuffle(&mut rng);
        for user in &order {
            new_ack(&read(&store, user, "g:big", seq_of(&store, user, id)));
        }
    }
    let ups = |kind| -> Vec<u64> {
        aggregated(&store, "ann", "big", kind)
            .iter()
            .map(|r| r.up_to_message_id)
            .collect()
    };
    let all = receipts(&store, "ann", "g:big");
    let (delivered, read) = (ups(pb::ReceiptKind::Delivered), ups(pb::ReceiptKind::Read));
    assert_eq!(
        all.len(),
        delivered.len() + read.len(),
        "only aggregated receipts"
    );
    (delivered, read, sent)
}

#[test]
fn a_sender_gets_at_most_two_receipt_entries_per_group_message_whatever_the_group_size() {
    for size in [3, 30] {
        let (delivered, read, sent) = receipts_for_one_sender(size, 5);
        // One of each per message: the one sent when the last other member had it.
        assert_eq!(delivered.len(), sent.len(), "size {size}: {delivered:?}");
        assert_eq!(read.len(), sent.len(), "size {size}: {read:?}");
        for (i, id) in sent.iter().enumerate() {
            assert!(delivered[i] >= *id, "size {size}");
            assert!(read[i] >= *id, "size {size}");
            if let Some(next) = sent.get(i + 1) {
                assert!(delivered[i] < *next && read[i] < *next, "size {size}");
            }
        }
    }
}

/// Checks the aggregate rule for every current member of `group` as a sender: its
/// aggregated receipts of `kind` ascend, each covers at least one of its messages not
/// covered before, none claims more than the other members' marks, and none is owed.
fn check_aggregates(store: &EmbeddedStore, group: &str, kind: pb::ReceiptKind, context: &str) {
    let info = group_info(store, group);
    let mark = |m: &pb::GroupMember| match kind {
        pb::ReceiptKind::Read => m.read_up_to,
        _ => m.delivered_up_to,
    };
    for sender in &info.members {
        let others = info
            .members
            .iter()
            .filter(|m| m.user != sender.user)
            .map(mark)
            .min()
            .unwrap_or(u64::MAX);
        let own: Vec<u64> = of_kind(
            store,
            &sender.user,
            &format!("g:{group}"),
            EntryKind::Message,
        )
        .iter()
        .filter(|e| e.from == sender.user)
        .map(|e| e.message_id)
        .collect();
        let ups: Vec<u64> = aggregated(store, &sender.user, group, kind)
            .iter()
            .map(|r| r.up_to_message_id)
            .collect();
        let who = format!("{context}: {} {kind:?} {ups:?}, own {own:?}", sender.user);
        let mut covered = sender.joined_message_id;
        for up in &ups {
            assert!(*up > covered, "{who}: not ascending");
            assert!(
                own.iter().any(|id| *id > covered && id <= up),
                "{who}: a receipt for nothing new"
            );
            assert!(
                *up <= others,
                "{who}: claims more than the others' {others}"
            );
            covered = *up;
        }
        assert!(
            !own.iter().any(|id| *id > covered && *id <= others),
            "{who}: owed a receipt up to {others}"
        );
    }
}

#[test]
fn aggregated_receipts_follow_the_smallest_mark_of_the_other_members_under_random_traffic() {
    let store = memory_store();
    let members = ["ann", "ben", "cat", "dan", "eve", "fay"];
    create(&store, "ann", "team", &members[1..]);
    let mut rng = StdRng::seed_from_u64(42);
    for step in 0..400 {
        let user = members[rng.random_range(0..members.len())];
        let user_head = head(&store, user);
        match rng.random_range(0..10) {
            0..4 => {
                new_ack(&group_send(&store, user, "team", &format!("s{step}")));
            }
            4..7 => {
                delivered(&store, user, rng.random_range(0..=user_head));
            }
            _ => {
                let seq = rng.random_range(1..=user_head);
                new_ack(&read(&store, user, "g:team", seq));
            }
        }
        let context = format!("step {step}");
        check_aggregates(&store, "team", pb::ReceiptKind::Delivered, &context);
        check_aggregates(&store, "team", pb::ReceiptKind::Read, &context);
    }
    // Everyone catches up: every sender is told about everything.
    for user in members {
        delivered(&store, user, head(&store, user));
        let last = in_conversation(&store, user, "g:team")
            .into_iter()
            .filter(|e| e.kind == EntryKind::Message)
            .last()
            .unwrap();
        new_ack(&read(&store, user, "g:team", last.seq));
    }
    for user in members {
        let own = of_kind(&store, user, "g:team", EntryKind::Message)
            .into_iter()
            .filter(|e| e.from == user)
            .map(|e| e.message_id)
            .max();
        let Some(own) = own else { continue };
        for kind in [pb::ReceiptKind::Delivered, pb::ReceiptKind::Read] {
            let last = aggregated(&store, user, "team", kind).pop();
            assert!(
                last.is_some_and(|r| r.up_to_message_id >= own),
                "{user} {kind:?}"
            );
        }
    }
}

// ---- conversations and unread counts ------------------------------------------------

#[test]
fn unread_counts_messages_from_others_only_and_receipts_do_not_move_last_seq() {
    let store = memory_store();
    // bob: a1(1) a2(2) b1(3) a3(4); alice: a1(1) a2(2) b1(3) a3(4).
    direct_send(&store, "alice", "bob", "a1");
    direct_send(&store, "alice", "bob", "a2");
    direct_send(&store, "bob", "alice", "b1");
    direct_send(&store, "alice", "bob", "a3");
    let bob = conversation(&store, "bob", "alice");
    assert_eq!(
        (bob.last_seq, bob.incoming, bob.unread, bob.read_up_to),
        (4, 3, 3, 0)
    );
    let alice = conversation(&store, "alice", "bob");
    assert_eq!((alice.last_seq, alice.incoming, alice.unread), (4, 1, 1));

    delivered(&store, "bob", 4);
    new_ack(&read(&store, "bob", "alice", 3)); // up to his own reply: a1, a2 read
    assert_eq!(head(&store, "bob"), 5, "the read echo");
    assert_eq!(head(&store, "alice"), 6, "delivered and read receipts");
    let bob = conversation(&store, "bob", "alice");
    assert_eq!(
        (bob.last_seq, bob.incoming, bob.unread, bob.read_up_to),
        (4, 3, 1, 3)
    );
    let alice = conversation(&store, "alice", "bob");
    assert_eq!((alice.last_seq, alice.incoming, alice.unread), (4, 1, 1));

    // A group: the create moves last_seq but is not unread; own messages are not either.
    create(&store, "ann", "team", &["ben"]);
    let ben = conversation(&store, "ben", "g:team");
    assert_eq!((ben.last_seq, ben.incoming, ben.unread), (1, 0, 0));
    group_send(&store, "ann", "team", "n1");
    group_send(&store, "ann", "team", "n2");
    group_send(&store, "ben", "team", "n3");
    let ben = conversation(&store, "ben", "g:team");
    assert_eq!((ben.last_seq, ben.incoming, ben.unread), (4, 2, 2));
    let ann = conversation(&store, "ann", "g:team");
    assert_eq!((ann.last_seq, ann.incoming, ann.unread), (4, 1, 1));

    // Aggregated receipts and echoes land, last_seq stays.
    delivered(&store, "ben", 4);
    new_ack(&read(&store, "ben", "g:team", 3));
    assert_eq!(
        aggregated(&store, "ann", "team", pb::ReceiptKind::Read).len(),
        1
    );
    assert_eq!(head(&store, "ann"), 6);
    let ann = conversation(&store, "ann", "g:team");
    assert_eq!(ann.last_seq, 4);
    let ben = conversation(&store, "ben", "g:team");
    assert_eq!((ben.last_seq, ben.unread, ben.read_up_to), (4, 0, 3));
    let echo = receipts(&store, "ben", "g:team").pop().unwrap();
    assert_eq!(
        (echo.by.as_str(), echo.up_to_seq, echo.unread),
        ("ben", 3, 0)
    );
}

#[test]
fn conversations_are_listed_by_id_after_a_cursor_up_to_a_limit() {
    let store = memory_store();
    for peer in ["dave", "alice", "carol"] {
        direct_send(&store, peer, "bob", "hi");
    }
    create(&store, "ann", "team", &["bob"]);
    let ids = |after: &str, limit| -> Vec<String> {
        store
            .conversations("bob", after, limit)
            .unwrap()
            .into_iter()
            .map(|c| c.id)
            .collect()
    };
    assert_eq!(ids("", 10), strings(&["alice", "carol", "dave", "g:team"]));
    assert_eq!(ids("", 2), strings(&["alice", "carol"]));
    assert_eq!(ids("carol", 10), strings(&["dave", "g:team"]));
    assert_eq!(ids("g:team", 10), Vec::<String>::new());
    assert!(store.conversations("nobody", "", 10).unwrap().is_empty());
}

// ---- compaction and durability ------------------------------------------------------

#[test]
fn acked_compaction_never_passes_the_delivered_mark() {
    let store = memory_store();
    let epoch = store.inbox_info("bob").unwrap().epoch;
    let sent: Vec<Committed> = (1..=6)
        .map(|i| direct_send(&store, "alice", "bob", &format!("a{i}")))
        .collect();
    // The device holds everything, but receipts were written only up to 3.
    let cursor = DeviceCursor {
        inbox_epoch: epoch,
        acked_seq: 6,
        last_seen_ms: 5_000,
    };
    store
        .set_cursors(&[("bob".into(), "phone".into(), cursor)])
        .unwrap();
    delivered(&store, "bob", 3);
    let policy = CompactPolicy {
        entries_before_ms: 0,
        devices_before_ms: 0,
        remove_acked: true,
    };
    store.compact(&policy).unwrap();
    let info = store.inbox_info("bob").unwrap();
    assert_eq!((info.low, info.head), (4, 6));
    assert_eq!(
        entries(&store, "bob")
            .iter()
            .map(|e| e.seq)
            .collect::<Vec<_>>(),
        [4, 5, 6]
    );

    delivered(&store, "bob", 6);
    let ups: Vec<u64> = receipts(&store, "alice", "bob")
        .iter()
        .map(|r| r.up_to_message_id)
        .collect();
    assert_eq!(ups, [sent[2].message_id, sent[5].message_id]);
    store.compact(&policy).unwrap();
    let info = store.inbox_info("bob").unwrap();
    assert_eq!((info.low, info.head), (7, 6));
    // Alice has no live device: her receipts stay.
    assert_eq!(receipts(&store, "alice", "bob").len(), 2);
}

#[test]
fn group_state_and_marks_survive_a_power_cut() {
    let disk = SimulatedDisk::new();
    let store = EmbeddedStore::open_with_backend(disk.clone(), Durability::Fsync).unwrap();
    create(&store, "ann", "team", &["ben", "cat", "dan"]);
    group_send(&store, "ann", "team", "m1");
    let psst = direct_send(&store, "ben", "ann", "psst");
    new_ack(&group_change(&store, "ben", "team", GroupOp::Add, &["eve"]));
    new_ack(&group_change(&store, "ann", "team", GroupOp::Leave, &[]));
    let m2 = new_ack(&group_send(&store, "ben", "team", "m2")).message_id;
    for user in ["cat", "dan"] {
        delivered(&store, user, head(&store, user));
    }
    new_ack(&read(&store, "cat", "g:team", seq_of(&store, "cat", m2)));
    new_ack(&read(
        &store,
        "ann",
        "ben",
        seq_of(&store, "ann", psst.message_id),
    ));
    // eve has not delivered m2 yet: ben is owed nothing.
    assert!(aggregated(&store, "ben", "team", pb::ReceiptKind::Delivered).is_empty());

    // Every append above returned, so all of it is on disk.
    let cut = EmbeddedStore::open_with_backend(disk.power_cut(), Durability::Fsync).unwrap();
    assert_eq!(cut.group("team").unwrap(), store.group("team").unwrap());
    assert_eq!(summary(&cut, "team").owner, "ben");
    assert_eq!(member(&cut, "team", "cat").delivered_up_to, m2);
    assert_eq!(member(&cut, "team", "cat").read_up_to, m2);
    for user in ["ann", "ben", "cat", "dan", "eve"] {
        assert_eq!(
            cut.conversations(user, "", usize::MAX).unwrap(),
            store.conversations(user, "", usize::MAX).unwrap(),
            "{user}"
        );
        assert_eq!(
            cut.groups_of(user).unwrap(),
            store.groups_of(user).unwrap(),
            "{user}"
        );
        assert_eq!(entries(&cut, user), entries(&store, user), "{user}");
    }
    assert_eq!(conversation(&cut, "ann", "ben").unread, 0);
    drop(store);

    // The marks came back too: repeated marks write nothing, and eve's delivery
    // releases exactly one aggregated receipt to ben.
    let everyone = ["ann", "ben", "cat", "dan", "eve"];
    let before = heads(&cut, &everyone);
    delivered(&cut, "cat", head(&cut, "cat"));
    new_ack(&read(
        &cut,
        "ann",
        "ben",
        seq_of(&cut, "ann", psst.message_id),
    ));
    assert_eq!(heads(&cut, &everyone), before);
    delivered(&cut, "eve", head(&cut, "eve"));
    let receipts = aggregated(&cut, "ben", "team", pb::ReceiptKind::Delivered);
    assert_eq!(receipts.len(), 1, "{receipts:?}");
    assert!(receipts[0].up_to_message_id >= m2);
}

/// Batches of every kind (1:1 and group messages, membership changes, delivered and read
/// marks, duplicates), with checkpoints never, now and then, or nearly every batch; then
/// a power cut. The store that comes back must be the store that acknowledged: every
/// inbox, conversation and group identical, and the next commit numbered alike.
#[test]
fn a_replayed_journal_rebuilds_exactly_the_store_that_acknowledged_it() {
    const USERS: [&str; 5] = ["ann", "ben", "cat", "dan", "eve"];
    for (seed, rows) in [(1u64, usize::MAX), (2, 60), (3, 5)] {
        let disk = SimulatedDisk::new();
        let store = EmbeddedStore::open_with_backend(disk.clone(), Durability::Fsync).unwrap();
        store.set_checkpoint_policy(std::time::Duration::from_secs(3600), rows);
        let mut rng = StdRng::seed_from_u64(seed);
        create(&store, "ann", "team", &["ben", "cat"]);
        let mut last = None;
        for _ in 0..80 {
            let mut batch = Vec::new();
            for _ in 0..rng.random_range(1..6) {
                let user = USERS[rng.random_range(0..USERS.len())];
                let other = USERS[rng.random_range(0..USERS.len())];
                let req = match rng.random_range(0..9) {
                    0..=2 => direct(user, other, "hi"),
                    3 | 4 => group_message(user, "team", "all"),
                    5 => change_request(user, "team", GroupOp::Add, &[other]),
                    6 => change_request(user, "team", GroupOp::Leave, &[]),
                    7 => request(
                        user,
                        Action::Delivered {
                            up_to_seq: head(&store, user),
                        },
                        "",
                    ),
                    _ => match entries(&store, user).last() {
                        Some(entry) => request(
                            user,
                            Action::Read(ReadMark {
                                conversation: entry.conversation.clone(),
                                up_to_seq: entry.seq,
                                message_id: entry.message_id,
                                incoming: entry.incoming,
                            }),
                            "",
                        ),
                        None => direct(user, other, "first"),
                    },
                };
                batch.push(req);
            }
            // Now and then a resend of the previous batch's first request.
            if let Some(previous) = last.take().filter(|_| rng.random_bool(0.2)) {
                batch.push(previous);
            }
            last = Some(batch[0].clone());
            store.append(&batch).unwrap();
        }

        let cut = EmbeddedStore::open_with_backend(disk.power_cut(), Durability::Fsync).unwrap();
        let context = format!("seed {seed}, checkpoint at {rows} rows");
        assert_eq!(
            cut.group("team").unwrap(),
            store.group("team").unwrap(),
            "{context}"
        );
        for user in USERS {
            assert_eq!(
                entries(&cut, user),
                entries(&store, user),
                "{context}: {user}"
            );
            assert_eq!(
                cut.conversations(user, "", usize::MAX).unwrap(),
                store.conversations(user, "", usize::MAX).unwrap(),
                "{context}: {user}"
            );
            assert_eq!(
                cut.groups_of(user).unwrap(),
                store.groups_of(user).unwrap(),
                "{context}: {user}"
            );
        }
        let next = direct("eve", "ann", "after");
        assert_eq!(
            commit(&cut, next.clone()),
            commit(&store, next),
            "{context}"
        );
        assert!(
            USERS.iter().map(|u| head(&store, u)).sum::<u64>() > 200,
            "{context}: the workload wrote too little"
        );
    }
}
