//! Issue 6 against a real `tether serve` process: groups, receipts, roaming and
//! authorization, through the Rust SDK (and raw frames where a client must misbehave).

mod common;

use bytes::Bytes;
use common::{RawClient, ServerProc, id};
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::Duration;
use tether_client::{
    Client, ClientConfig, ClientError, Entry, EntryType, ErrorCode, GroupEventKind, ReceiptKind,
    group_event_of, receipt_of,
};
use tether_proto::{Frame, pb};
use tokio::time::timeout;

const WAIT: Duration = Duration::from_secs(60);

/// An SDK client of `user` on `device`, with its own state file in `dir`.
fn client(server: &ServerProc, dir: &Path, user: &str, device: &str) -> Client {
    let token = tether_server::auth::mint_token(&server.data, user).unwrap();
    let mut config = ClientConfig::new(server.addr.to_string(), token, device);
    config.state_path = Some(dir.join(format!("{user}@{device}.json")));
    config.auto_ack = true;
    config.backoff_base = Duration::from_millis(50);
    config.backoff_cap = Duration::from_millis(500);
    Client::start(config).unwrap()
}

/// Receives entries until `done` says the collection is complete.
async fn collect(c: &mut Client, mut done: impl FnMut(&[Entry]) -> bool) -> Vec<Entry> {
    let mut got = Vec::new();
    while !done(&got) {
        let entry = timeout(WAIT, c.recv())
            .await
            .unwrap_or_else(|_| panic!("stuck after {} entries: {got:?}", got.len()))
            .expect("client stopped");
        got.push(entry);
    }
    got
}

fn is_message(e: &Entry) -> bool {
    e.r#type == EntryType::Message as i32
}

fn messages_in<'a>(entries: &'a [Entry], conversation: &str) -> Vec<&'a Entry> {
    entries
        .iter()
        .filter(|e| is_message(e) && e.conversation == conversation)
        .collect()
}

fn rejected_code(e: ClientError) -> ErrorCode {
    match e {
        ClientError::Rejected { code, .. } => code,
        other => panic!("expected a refusal, got {other}"),
    }
}

/// Must-show 1: 50 members on 2 devices each; 1,000 group messages from 5 senders at
/// once; every device gets every message exactly once, and all see the same order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_members_on_two_devices_each_get_every_group_message_once_in_one_order() {
    const MEMBERS: usize = 50;
    const SENDERS: usize = 5;
    const PER_SENDER: usize = 200;
    const TOTAL: usize = SENDERS * PER_SENDER;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    let users: Vec<String> = (0..MEMBERS).map(|i| format!("u{i:02}")).collect();

    let owner = client(&server, dir.path(), &users[0], "a");
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    owner.group_create("big", "Fifty", &others).await.unwrap();
    let info = owner.group_info("big").await.unwrap();
    assert_eq!(info.members.len(), MEMBERS);

    // Every member on devices "a" and "b"; u00..u04 on "a" are the senders.
    let mut devices = vec![(users[0].clone(), "a", owner)];
    for user in &users {
        for device in ["a", "b"] {
            if !(user == &users[0] && device == "a") {
                devices.push((
                    user.clone(),
                    device,
                    client(&server, dir.path(), user, device),
                ));
            }
        }
    }
    let mut sends = Vec::new();
    for (s, user) in users.iter().take(SENDERS).enumerate() {
        let (_, _, c) = devices
            .iter()
            .find(|(u, d, _)| u == user && *d == "a")
            .unwrap();
        let handle = c.handle();
        sends.push(tokio::spawn(async move {
            let mut tickets = Vec::new();
            for n in 0..PER_SENDER {
                let body = Bytes::from(format!("{s}:{n}"));
                let id = tether_client::ClientMsgId::generate();
                tickets.push(handle.enqueue(id, "g:big", body, "").await.unwrap());
            }
            for t in tickets {
                t.outcome().await.unwrap();
            }
        }));
    }
    let mut collectors = Vec::new();
    for (user, device, mut c) in devices {
        collectors.push(tokio::spawn(async move {
            let got = collect(&mut c, |got| messages_in(got, "g:big").len() >= TOTAL).await;
            let order: Vec<u64> = messages_in(&got, "g:big")
                .iter()
                .map(|e| e.message_id)
                .collect();
            let bodies: Vec<String> = messages_in(&got, "g:big")
                .iter()
                .map(|e| String::from_utf8_lossy(&e.body).into_owned())
                .collect();
            (user, device, order, bodies, c)
        }));
    }
    for s in sends {
        timeout(WAIT, s).await.unwrap().unwrap();
    }
    let mut orders = Vec::new();
    let mut clients = Vec::new();
    for c in collectors {
        let (user, device, order, bodies, client) = timeout(WAIT, c).await.unwrap().unwrap();
        assert_eq!(order.len(), TOTAL, "{user}/{device}");
        let distinct: HashSet<&String> = bodies.iter().collect();
        assert_eq!(distinct.len(), TOTAL, "{user}/{device} got a message twice");
        // Each sender's messages keep the order they were sent in.
        for s in 0..SENDERS {
            let mine: Vec<usize> = bodies
                .iter()
                .filter_map(|b| b.strip_prefix(&format!("{s}:")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(mine, (0..PER_SENDER).collect::<Vec<_>>(), "{user}/{device}");
        }
        orders.push((user, device, order));
        clients.push(client);
    }
    let first = orders[0].2.clone();
    for (user, device, order) in &orders {
        assert_eq!(order, &first, "{user}/{device} saw another order");
    }
    assert_eq!(orders.len(), MEMBERS * 2);
    for c in clients {
        c.close().await;
    }
}

/// Must-show 2: a member added mid-stream gets exactly what follows its membership
/// entry; a removed member gets nothing after its removal and cannot send.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_added_member_gets_from_its_join_on_and_a_removed_one_nothing_after() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    let alice = client(&server, dir.path(), "alice", "phone");
    let mut bob = client(&server, dir.path(), "bob", "phone");
    let mut carol = client(&server, dir.path(), "carol", "phone");
    alice.group_create("team", "Team", &["bob"]).await.unwrap();

    // alice streams 60 messages; carol joins after 20, bob is removed after 40.
    let mut sent = Vec::new();
    let mut join = None;
    let mut removal = None;
    for n in 0..60 {
        if n == 20 {
            // Any member may add: bob adds carol.
            join = Some(bob.group_add("team", &["carol"]).await.unwrap().message_id);
        }
        if n == 40 {
            // Only the owner removes.
            let refused = carol.group_remove("team", &["bob"]).await.unwrap_err();
            assert_eq!(rejected_code(refused), ErrorCode::Forbidden);
            removal = Some(
                alice
                    .group_remove("team", &["bob"])
                    .await
                    .unwrap()
                    .message_id,
            );
        }
        let ack = alice
            .send_to_group("team", Bytes::from(format!("m{n}")))
            .await
            .unwrap();
        sent.push(ack.message_id);
    }
    let (join, removal) = (join.unwrap(), removal.unwrap());
    let last = *sent.last().unwrap();

    let carols = collect(&mut carol, |got| got.iter().any(|e| e.message_id == last)).await;
    let group: Vec<&Entry> = carols
        .iter()
        .filter(|e| e.conversation == "g:team")
        .collect();
    let first = group_event_of(group[0]).expect("carol's first group entry is her membership");
    assert_eq!(first.kind, GroupEventKind::Added as i32);
    assert_eq!(first.members, vec!["carol".to_string()]);
    assert_eq!(group[0].message_id, join);
    let got: Vec<u64> = group
        .iter()
        .filter(|e| is_message(e))
        .map(|e| e.message_id)
        .collect();
    let expected: Vec<u64> = sent.iter().copied().filter(|m| *m > join).collect();
    assert_eq!(
        got, expected,
        "carol gets exactly the messages after her join"
    );
    assert_eq!(expected.len(), 40);

    // bob: everything up to his removal, the removal, then nothing of the group.
    let bobs = collect(&mut bob, |got| got.iter().any(|e| e.message_id == removal)).await;
    let removed_entry = bobs.iter().find(|e| e.message_id == removal).unwrap();
    let event = group_event_of(removed_entry).unwrap();
    assert_eq!(event.kind, GroupEventKind::Removed as i32);
    assert_eq!(event.members, vec!["bob".to_string()]);
    let got: Vec<u64> = messages_in(&bobs, "g:team")
        .iter()
        .map(|e| e.message_id)
        .collect();
    let expected: Vec<u64> = sent.iter().copied().filter(|m| *m < removal).collect();
    assert_eq!(got, expected);
    let refused = bob.send_to_group("team", Bytes::from("still here?")).await;
    assert_eq!(rejected_code(refused.unwrap_err()), ErrorCode::Forbidden);
    // Nothing of the group reaches bob afterwards: a later message from him to
    // himself is the next thing he gets.
    alice
        .send_to_group("team", Bytes::from("after"))
        .await
        .unwrap();
    let marker = bob.send("bob", Bytes::from("marker")).await.unwrap();
    let later = collect(&mut bob, |got| {
        got.iter().any(|e| e.message_id == marker.message_id)
    })
    .await;
    assert!(
        later
            .iter()
            .all(|e| e.conversation != "g:team" || e.r#type == EntryType::Receipt as i32),
        "bob got group traffic after his removal: {later:?}"
    );
    let groups: Vec<String> = bob
        .groups()
        .await
        .unwrap()
        .into_iter()
        .map(|g| g.group)
        .collect();
    assert!(groups.is_empty(), "{groups:?}");
    let info = alice.group_info("team").await.unwrap();
    let members: HashSet<String> = info.members.into_iter().map(|m| m.user).collect();
    assert_eq!(members, HashSet::from(["alice".into(), "carol".into()]));
    for c in [alice, bob, carol] {
        c.close().await;
    }
}

/// The receipt entries of `entries` as (kind, by, up to message id).
fn receipts(entries: &[Entry], conversation: &str) -> Vec<(i32, String, u64)> {
    entries
        .iter()
        .filter(|e| e.conversation == conversation)
        .filter_map(receipt_of)
        .map(|r| (r.kind, r.by, r.up_to_message_id))
        .collect()
}

/// Must-show 3: delivered and read receipts reach every device of the sender once,
/// although the sender was offline when they were made and the server was SIGKILLed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn receipts_reach_every_sender_device_once_across_offline_and_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ServerProc::start(&data, &[]);
    let mut phone = client(&server, dir.path(), "alice", "phone");
    let mut laptop = client(&server, dir.path(), "alice", "laptop");
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(
            phone
                .send("bob", Bytes::from(format!("m{n}")))
                .await
                .unwrap()
                .message_id,
        );
    }
    // Both of alice's devices hold her three sends, then go offline.
    for c in [&mut phone, &mut laptop] {
        collect(c, |got| got.iter().filter(|e| is_message(e)).count() == 3).await;
    }
    phone.close().await;
    laptop.close().await;

    let mut bob = client(&server, dir.path(), "bob", "phone");
    let got = collect(&mut bob, |got| got.len() == 3).await;
    // Delivered: bob's ACKs (auto). Read: up to the second message.
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob.mark_read(&got[1]).await;
    let echo = collect(&mut bob, |got| !got.is_empty()).await;
    let r = receipt_of(&echo[0]).expect("bob's own devices get his read echo");
    assert_eq!((r.kind, r.by.as_str()), (ReceiptKind::Read as i32, "bob"));
    assert_eq!((r.up_to_seq, r.unread), (got[1].seq, 1));
    bob.close().await;
    server.kill9();

    let server = ServerProc::start(&data, &[]);
    let mut phone = client(&server, dir.path(), "alice", "phone");
    let mut laptop = client(&server, dir.path(), "alice", "laptop");
    let expected = vec![
        (ReceiptKind::Delivered as i32, "bob".to_string(), ids[2]),
        (ReceiptKind::Read as i32, "bob".to_string(), ids[1]),
    ];
    for c in [&mut phone, &mut laptop] {
        let got = collect(c, |got| receipts(got, "bob").len() >= 2).await;
        assert_eq!(receipts(&got, "bob"), expected);
    }
    // Once: a further message to himself is the next thing alice's devices get.
    let marker = phone.send("alice", Bytes::from("marker")).await.unwrap();
    for c in [&mut phone, &mut laptop] {
        let got = collect(c, |got| {
            got.iter().any(|e| e.message_id == marker.message_id)
        })
        .await;
        assert!(
            receipts(&got, "bob").is_empty(),
            "a receipt came twice: {got:?}"
        );
    }
    phone.close().await;
    laptop.close().await;
}

/// Must-show 4: what one device sends shows on the user's other device, and unread
/// counts agree across devices after reading on one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roaming_sent_messages_and_unread_counts_follow_the_user_across_devices() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    let a_phone = client(&server, dir.path(), "alice", "phone");
    let mut a_laptop = client(&server, dir.path(), "alice", "laptop");
    let mut b_phone = client(&server, dir.path(), "bob", "phone");
    let mut b_laptop = client(&server, dir.path(), "bob", "laptop");
    a_phone.group_create("duo", "", &["bob"]).await.unwrap();

    let sent = a_phone
        .send("bob", Bytes::from("from the phone"))
        .await
        .unwrap();
    let on_laptop = collect(&mut a_laptop, |got| got.iter().any(is_message)).await;
    let copy = on_laptop.iter().find(|e| is_message(e)).unwrap();
    assert_eq!(copy.message_id, sent.message_id);
    assert_eq!(
        (copy.from.as_str(), copy.from_device.as_str()),
        ("alice", "phone")
    );
    assert_eq!(copy.conversation, "bob");
    for n in 0..2 {
        a_laptop
            .send("bob", Bytes::from(format!("laptop {n}")))
            .await
            .unwrap();
    }
    a_laptop
        .send_to_group("duo", Bytes::from("to the group"))
        .await
        .unwrap();

    // bob: 3 unread from alice, 1 in the group, on both devices.
    let mut b_entries = Vec::new();
    for c in [&mut b_phone, &mut b_laptop] {
        b_entries.push(collect(c, |got| got.iter().filter(|e| is_message(e)).count() == 4).await);
    }
    let unread = |list: Vec<pb::Conversation>| -> HashMap<String, u64> {
        list.into_iter().map(|c| (c.id, c.unread)).collect()
    };
    let want = HashMap::from([("alice".to_string(), 3), ("g:duo".to_string(), 1)]);
    assert_eq!(unread(b_phone.conversations().await.unwrap()), want);
    assert_eq!(unread(b_laptop.conversations().await.unwrap()), want);

    // Reading on the phone up to the second message from alice.
    let second = messages_in(&b_entries[0], "alice")[1].clone();
    b_phone.mark_read(&second).await;
    let echo = collect(&mut b_laptop, |got| {
        got.iter().any(|e| receipt_of(e).is_some())
    })
    .await;
    let r = echo.iter().find_map(receipt_of).unwrap();
    assert_eq!(
        (r.conversation.as_str(), r.by.as_str(), r.unread),
        ("alice", "bob", 1)
    );
    let want = HashMap::from([("alice".to_string(), 1), ("g:duo".to_string(), 1)]);
    assert_eq!(unread(b_phone.conversations().await.unwrap()), want);
    assert_eq!(unread(b_laptop.conversations().await.unwrap()), want);
    // The group read on the laptop clears it on the phone.
    let in_group = messages_in(&b_entries[1], "g:duo")[0].clone();
    b_laptop.mark_read(&in_group).await;
    collect(&mut b_phone, |got| {
        got.iter().filter(|e| receipt_of(e).is_some()).count() == 2
    })
    .await;
    let want = HashMap::from([("alice".to_string(), 1), ("g:duo".to_string(), 0)]);
    assert_eq!(unread(b_phone.conversations().await.unwrap()), want);
    // alice's own messages never count as unread for her.
    let mine = unread(a_phone.conversations().await.unwrap());
    assert_eq!(
        mine,
        HashMap::from([("bob".into(), 0), ("g:duo".into(), 0)])
    );
    for c in [a_phone, a_laptop, b_phone, b_laptop] {
        c.close().await;
    }
}

/// Reads frames until an ERROR (returned) or `other` says stop.
fn next_error(c: &mut RawClient) -> pb::Error {
    loop {
        match c.read() {
            Frame::Error(e) => return e,
            Frame::QueryResult(r) => panic!("answered instead of refused: {r:?}"),
            _ => {}
        }
    }
}

/// Must-show 5: a non-member cannot send to, read or query a group, nor read another
/// user's inbox by any frame; each refusal is a clear, non-fatal error.
#[test]
fn a_non_member_can_neither_send_to_nor_read_a_group_nor_anyone_elses_inbox() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    let (mut alice, _) = RawClient::login(server.addr, &server.token("alice"), "phone", 1);
    alice.send(&Frame::GroupChange(pb::GroupChange {
        client_msg_id: id(1).to_vec().into(),
        group: "team".into(),
        op: pb::GroupOp::Create as i32,
        members: vec!["bob".into()],
        name: String::new(),
    }));
    for n in 0..20 {
        alice.send(&Frame::Send(pb::Send {
            client_msg_id: id(100 + n).to_vec().into(),
            target: Some(pb::send::Target::Group("team".into())),
            body: Bytes::from_static(b"secret"),
            content_type: String::new(),
        }));
    }
    let last = id(119);
    loop {
        match alice.read() {
            Frame::SendAck(a) if a.client_msg_id[..] == last[..] => break,
            Frame::Error(e) => panic!("alice refused: {e:?}"),
            _ => {}
        }
    }
    let (mut mallory, _) = RawClient::login(server.addr, &server.token("mallory"), "m", 1);
    mallory.send_text("mallory", id(2), "note to self");

    // SEND to the group.
    mallory.send(&Frame::Send(pb::Send {
        client_msg_id: id(3).to_vec().into(),
        target: Some(pb::send::Target::Group("team".into())),
        body: Bytes::from_static(b"let me in"),
        content_type: String::new(),
    }));
    let e = next_error(&mut mallory);
    assert_eq!((e.code, e.fatal), (pb::ErrorCode::Forbidden as i32, false));
    assert_eq!(&e.client_msg_id[..], &id(3)[..]);
    // Adding herself.
    mallory.send(&Frame::GroupChange(pb::GroupChange {
        client_msg_id: id(4).to_vec().into(),
        group: "team".into(),
        op: pb::GroupOp::Add as i32,
        members: vec!["mallory".into()],
        name: String::new(),
    }));
    assert_eq!(
        next_error(&mut mallory).code,
        pb::ErrorCode::Forbidden as i32
    );
    // The group's members and receipt marks.
    mallory.send(&Frame::Query(pb::Query {
        id: 7,
        what: Some(pb::query::What::Group(pb::GetGroup {
            group: "team".into(),
        })),
    }));
    let e = next_error(&mut mallory);
    assert_eq!((e.code, e.query_id), (pb::ErrorCode::Forbidden as i32, 7));
    // Read receipts for the group, or for a conversation she is not in.
    for conversation in ["g:team", "alice"] {
        mallory.send(&Frame::Receipt(pb::Receipt {
            conversation: conversation.into(),
            read_up_to: 1,
            ..Default::default()
        }));
        assert_eq!(
            next_error(&mut mallory).code,
            pb::ErrorCode::Forbidden as i32,
            "{conversation}"
        );
    }
    // A "user" that names the group.
    mallory.send(&common::send_frame("g:team", id(5), "sneaky"));
    assert_eq!(
        next_error(&mut mallory).code,
        pb::ErrorCode::BadRequest as i32
    );
    // SYNC reads her own inbox only, whatever range she asks for.
    mallory.send(&Frame::Sync(pb::Sync {
        from_seq: 1,
        to_seq: 1_000,
        limit: 1_000,
    }));
    let done = loop {
        if let Frame::SyncDone(d) = mallory.read() {
            break d;
        }
    };
    assert_eq!(done.head, 1);
    assert_eq!(done.entries.len(), 1);
    assert_eq!(done.entries[0].body, Bytes::from_static(b"note to self"));
    // Her conversations and groups are hers alone.
    mallory.send(&Frame::Query(pb::Query {
        id: 8,
        what: Some(pb::query::What::Conversations(Default::default())),
    }));
    let result = loop {
        if let Frame::QueryResult(r) = mallory.read() {
            break r;
        }
    };
    let ids: Vec<String> = result.conversations.into_iter().map(|c| c.id).collect();
    assert_eq!(ids, vec!["mallory".to_string()]);
    // Still connected: every refusal was non-fatal.
    mallory.send(&Frame::Ping(pb::Ping::default()));
    loop {
        if let Frame::Pong(_) = mallory.read() {
            break;
        }
    }
    // And bob, a member, got the 20 messages.
    let (_bob, welcome) = RawClient::login(server.addr, &server.token("bob"), "phone", 1);
    assert_eq!(welcome.head, 21, "the membership entry and 20 messages");
}

/// The CLI: `tether group create|add|remove|leave|list`, `tether send --group`, and
/// `tether recv` showing entry types.
#[test]
fn the_cli_manages_groups_sends_to_them_and_shows_entry_types() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    let state = dir.path().join("state");
    let cli = |user: &str, args: &[&str]| {
        let mut argv: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        argv.extend(common::cli_auth(&server, user, "cli", &state));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        let out = common::run_cli(&argv, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "tether {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        common::json_lines(&out)
    };
    cli(
        "alice",
        &["group", "create", "club", "bob", "--name", "Club"],
    );
    cli("bob", &["group", "add", "club", "carol"]);
    let groups = cli("carol", &["group", "list"]);
    assert_eq!(groups.len(), 1);
    assert_eq!(
        (groups[0]["group"].as_str(), groups[0]["size"].as_u64()),
        (Some("club"), Some(3))
    );
    let sent = cli("carol", &["send", "--group", "club", "hello club"]);
    assert!(sent[0]["id"].as_u64().unwrap() > 0);
    cli("alice", &["group", "remove", "club", "bob"]);
    cli("carol", &["group", "leave", "club"]);
    let members = cli("alice", &["group", "list", "club"]);
    assert_eq!(members.len(), 1);
    assert_eq!(members[0]["user"].as_str(), Some("alice"));

    // bob: created, added, the message, his removal; recv --read marks the message read.
    let out = common::cli_recv(&server, "bob", "cli", &state, 4, 20);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = common::json_lines(&out);
    let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(
        types,
        vec!["membership", "membership", "message", "membership"]
    );
    assert_eq!(lines[0]["group"]["event"].as_str(), Some("created"));
    assert_eq!(lines[3]["group"]["event"].as_str(), Some("removed"));
    assert_eq!(lines[2]["text"].as_str(), Some("hello club"));
    // A 1:1 message read with `recv --read` comes back to the sender as receipts.
    cli("alice", &["send", "--to", "bob", "are you there?"]);
    let mut args: Vec<String> = ["recv", "--count", "1", "--timeout", "20", "--read"]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(common::cli_auth(&server, "bob", "cli", &state));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = common::run_cli(&argv, Duration::from_secs(40));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // alice: her own copies and group entries first; then delivered and read by bob.
    // 6 of her own and group entries, then bob's two receipts.
    let out = common::cli_recv(&server, "alice", "cli", &state, 8, 20);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = common::json_lines(&out);
    let receipts: Vec<(&str, &str)> = lines
        .iter()
        .filter(|l| l["type"] == "receipt")
        .map(|l| {
            (
                l["receipt"]["kind"].as_str().unwrap(),
                l["receipt"]["by"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(receipts.contains(&("delivered", "bob")), "{lines:?}");
    assert!(receipts.contains(&("read", "bob")), "{lines:?}");
}
