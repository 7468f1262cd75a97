//! The SDK driven against a scripted fake server over in-memory pipes: every rule of
//! the client side of the protocol that needs a peer to show.

use bytes::Bytes;
use std::path::Path;
use std::time::Duration;
use tether_client::{
    Client, ClientConfig, ClientError, ClientEvent, ClientMsgId, ConnState, DisconnectReason,
    GiveUp, MemoryListener, PendingSend, StateFile, memory_connector,
};
use tether_proto::pb::{self, ErrorCode, KickReason};
use tether_proto::{Frame, frame};
use tether_transport::memory::MemoryTransport;
use tether_transport::{Transport, flush, recv};

const WAIT: Duration = Duration::from_secs(10);

/// The server end of one connection.
struct Peer {
    t: MemoryTransport,
}

impl Peer {
    async fn accept(listener: &mut MemoryListener) -> Peer {
        let t = tokio::time::timeout(WAIT, listener.accept())
            .await
            .expect("no connection in time")
            .expect("listener closed");
        Peer { t }
    }

    async fn expect_within(&mut self, limit: Duration) -> Frame {
        let raw = tokio::time::timeout(limit, recv(&mut self.t))
            .await
            .expect("no frame in time")
            .expect("transport error")
            .expect("client closed the connection");
        frame::from_raw(&raw).expect("client sent an invalid frame")
    }

    async fn expect(&mut self) -> Frame {
        self.expect_within(WAIT).await
    }

    /// The next frame that is not a PING/ACK (answering PINGs).
    async fn expect_send(&mut self) -> pb::Send {
        loop {
            match self.expect().await {
                Frame::Send(s) => return s,
                Frame::Ping(_) => self.send(Frame::Pong(pb::Pong::default())).await,
                Frame::Ack(_) => {}
                other => panic!("expected SEND, got {other:?}"),
            }
        }
    }

    async fn expect_ack(&mut self) -> u64 {
        loop {
            match self.expect().await {
                Frame::Ack(a) => return a.seq,
                Frame::Ping(_) => self.send(Frame::Pong(pb::Pong::default())).await,
                other => panic!("expected ACK, got {other:?}"),
            }
        }
    }

    async fn send(&mut self, frame: Frame) {
        self.t.send(&frame).unwrap();
        flush(&mut self.t).await.unwrap();
    }

    async fn hello(&mut self) -> pb::Hello {
        match self.expect().await {
            Frame::Hello(h) => h,
            other => panic!("expected HELLO, got {other:?}"),
        }
    }

    /// Reads HELLO and answers WELCOME.
    async fn login(&mut self, inbox_epoch: u64, start_seq: u64) -> pb::Hello {
        let hello = self.hello().await;
        self.send(welcome(inbox_epoch, start_seq)).await;
        hello
    }

    async fn deliver(&mut self, seq: u64) {
        self.send(Frame::Deliver(pb::Deliver {
            entry: Some(entry(seq)),
        }))
        .await;
    }

    async fn send_ack(&mut self, send: &pb::Send, seq: u64) {
        self.send(Frame::SendAck(pb::SendAck {
            client_msg_id: send.client_msg_id.clone(),
            message_id: 1000 + seq,
            seq,
            ts_ms: 1_700_000_000_000 + seq,
            duplicate: false,
        }))
        .await;
    }

    /// True if the client closes the connection within `limit`.
    async fn closed_within(&mut self, limit: Duration) -> bool {
        let closed = async {
            loop {
                match recv(&mut self.t).await {
                    Ok(Some(_)) => continue,
                    Ok(None) | Err(_) => return,
                }
            }
        };
        tokio::time::timeout(limit, closed).await.is_ok()
    }
}

fn welcome(inbox_epoch: u64, start_seq: u64) -> Frame {
    Frame::Welcome(pb::Welcome {
        session_id: format!("s-{start_seq}"),
        user_id: "alice".into(),
        server_time_ms: 1,
        inbox_epoch,
        start_seq,
        heartbeat: None,
        dedup_window_ms: 86_400_000,
        max_frame: 0,
        head: start_seq.saturating_sub(1),
        probe: false,
    })
}

fn entry(seq: u64) -> pb::Entry {
    pb::Entry {
        seq,
        message_id: 500 + seq,
        from: "bob".into(),
        from_device: "phone".into(),
        conversation: "bob".into(),
        body: Bytes::from(format!("m{seq}")),
        content_type: "text/plain".into(),
        ts_ms: 1,
        r#type: pb::EntryType::Message as i32,
        incoming: seq,
    }
}

fn config(state: Option<&Path>) -> (ClientConfig, MemoryListener) {
    let (connector, listener) = memory_connector(64 * 1024);
    let mut cfg = ClientConfig::new("memory", "token", "dev1");
    cfg.connector = std::sync::Arc::new(connector);
    cfg.state_path = state.map(Path::to_path_buf);
    cfg.backoff_base = Duration::from_millis(5);
    cfg.backoff_cap = Duration::from_millis(50);
    (cfg, listener)
}

fn id_of(send: &pb::Send) -> ClientMsgId {
    ClientMsgId::from_slice(&send.client_msg_id).unwrap()
}

async fn recv_entry(client: &mut Client) -> pb::Entry {
    tokio::time::timeout(WAIT, client.recv())
        .await
        .expect("no entry in time")
        .expect("client stopped")
}

#[tokio::test]
async fn first_login_has_no_resume_point_and_each_attempt_has_a_newer_device_epoch() {
    let (cfg, mut listener) = config(None);
    let client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    let first = peer.login(7, 1).await;
    assert_eq!(first.version, 1);
    assert_eq!(first.device_id, "dev1");
    assert_eq!(first.resume, None);
    client.wait_connected(WAIT).await.unwrap();
    drop(peer);
    let mut peer = Peer::accept(&mut listener).await;
    let second = peer.hello().await;
    assert!(second.device_epoch > first.device_epoch);
    assert_eq!(
        second.resume,
        Some(pb::ResumePoint {
            inbox_epoch: 7,
            last_seq: 0
        })
    );
    client.close().await;
}

#[tokio::test]
async fn device_epoch_is_persisted_before_hello_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("alice@dev1.json");
    let (cfg, mut listener) = config(Some(&path));
    let client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    let hello = peer.hello().await;
    let state = StateFile::load(&path).unwrap().unwrap();
    assert_eq!(state.device_epoch, hello.device_epoch);
    client.close().await;
}

#[tokio::test]
async fn a_send_is_in_the_state_file_before_its_send_frame_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.json");
    let (cfg, mut listener) = config(Some(&path));
    let client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    let handle = client.handle();
    let sending = tokio::spawn(async move { handle.send("bob", Bytes::from("hi")).await });
    let send = peer.expect_send().await;
    let state = StateFile::load(&path).unwrap().unwrap();
    assert_eq!(state.outbox.len(), 1);
    assert_eq!(state.outbox[0].client_msg_id, id_of(&send));
    assert_eq!(state.outbox[0].body, Bytes::from("hi"));
    peer.send_ack(&send, 4).await;
    let ack = sending.await.unwrap().unwrap();
    assert_eq!(
        (ack.seq, ack.message_id, ack.client_msg_id),
        (4, 1004, id_of(&send))
    );
    client.close().await;
    assert!(StateFile::load(&path).unwrap().unwrap().outbox.is_empty());
}

#[tokio::test]
async fn after_reconnect_all_unconfirmed_sends_are_resent_in_order_with_the_same_ids_before_new_ones()
 {
    let (cfg, mut listener) = config(None);
    let client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    let mut pending = Vec::new();
    let mut first_ids = Vec::new();
    for text in ["a", "b"] {
        let handle = client.handle();
        pending.push(tokio::spawn(async move {
            handle.send("bob", Bytes::from(text)).await
        }));
        first_ids.push(id_of(&peer.expect_send().await));
    }
    // The connection dies with both sends unconfirmed; a new send comes meanwhile.
    drop(peer);
    tokio::time::sleep(Duration::from_millis(1)).await;
    let handle = client.handle();
    pending.push(tokio::spawn(async move {
        handle.send("bob", Bytes::from("c")).await
    }));
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    let mut resent = Vec::new();
    for _ in 0..3 {
        resent.push(peer.expect_send().await);
    }
    let bodies: Vec<_> = resent.iter().map(|s| s.body.clone()).collect();
    assert_eq!(
        bodies,
        vec![Bytes::from("a"), Bytes::from("b"), Bytes::from("c")]
    );
    assert_eq!(id_of(&resent[0]), first_ids[0]);
    assert_eq!(id_of(&resent[1]), first_ids[1]);
    for (n, send) in resent.iter().enumerate() {
        peer.send_ack(send, n as u64 + 1).await;
    }
    for (n, task) in pending.into_iter().enumerate() {
        assert_eq!(task.await.unwrap().unwrap().seq, n as u64 + 1);
    }
    client.close().await;
}

#[tokio::test]
async fn sends_restored_from_the_state_file_are_resent_first_and_confirmed_by_event() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.json");
    let left_over = PendingSend {
        client_msg_id: ClientMsgId([9; 16]),
        to: "bob".into(),
        body: Bytes::from("from last run"),
        content_type: "text/plain".into(),
        queued_ms: 0,
        group: None,
    };
    StateFile {
        inbox_epoch: 3,
        last_seq: 20,
        device_epoch: 5,
        outbox: vec![left_over.clone()],
        ..Default::default()
    }
    .save(&path)
    .unwrap();
    let (cfg, mut listener) = config(Some(&path));
    let client = Client::start(cfg).unwrap();
    let mut events = client.events();
    let mut peer = Peer::accept(&mut listener).await;
    let hello = peer.login(3, 21).await;
    assert_eq!(
        hello.resume,
        Some(pb::ResumePoint {
            inbox_epoch: 3,
            last_seq: 20
        })
    );
    assert!(hello.device_epoch > 5);
    let handle = client.handle();
    let new_send = tokio::spawn(async move { handle.send("bob", Bytes::from("new")).await });
    let first = peer.expect_send().await;
    assert_eq!(id_of(&first), ClientMsgId([9; 16]));
    assert_eq!(first.body, left_over.body);
    let second = peer.expect_send().await;
    assert_eq!(second.body, Bytes::from("new"));
    peer.send_ack(&first, 30).await;
    peer.send_ack(&second, 31).await;
    assert_eq!(new_send.await.unwrap().unwrap().seq, 31);
    let acked = loop {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ClientEvent::SendAcked(ack) => break ack,
            _ => continue,
        }
    };
    assert_eq!((acked.client_msg_id, acked.seq), (ClientMsgId([9; 16]), 30));
    client.close().await;
}

#[tokio::test]
async fn replayed_delivers_are_dropped_and_entries_reach_the_app_once_in_order() {
    let (cfg, mut listener) = config(None);
    let mut client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    for seq in [1, 2, 2, 1, 3] {
        peer.deliver(seq).await;
    }
    let seqs = [
        recv_entry(&mut client).await.seq,
        recv_entry(&mut client).await.seq,
        recv_entry(&mut client).await.seq,
    ];
    assert_eq!(seqs, [1, 2, 3]);
    assert!(
        tokio::time::timeout(Duration::from_millis(50), client.recv())
            .await
            .is_err(),
        "a duplicate reached the app"
    );
    client.close().await;
}

#[tokio::test]
async fn ack_persists_the_cursor_then_sends_a_cumulative_ack() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.json");
    let (cfg, mut listener) = config(Some(&path));
    let mut client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(4, 10).await;
    for seq in 10..13 {
        peer.deliver(seq).await;
    }
    for _ in 10..13 {
        recv_entry(&mut client).await;
    }
    client.ack(12);
    assert_eq!(peer.expect_ack().await, 12);
    let state = StateFile::load(&path).unwrap().unwrap();
    assert_eq!((state.inbox_epoch, state.last_seq), (4, 12));
    client.close().await;
}

#[tokio::test]
async fn a_gap_in_delivery_reconnects_with_the_resume_point_and_never_skips() {
    let (cfg, mut listener) = config(None);
    let mut client = Client::start(cfg).unwrap();
    let mut events = client.events();
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    peer.deliver(1).await;
    assert_eq!(recv_entry(&mut client).await.seq, 1);
    client.ack(1);
    assert_eq!(peer.expect_ack().await, 1);
    peer.deliver(3).await;
    assert!(peer.closed_within(WAIT).await);
    let mut peer = Peer::accept(&mut listener).await;
    let hello = peer.login(1, 2).await;
    assert_eq!(hello.resume.unwrap().last_seq, 1);
    peer.deliver(2).await;
    peer.deliver(3).await;
    assert_eq!(recv_entry(&mut client).await.seq, 2);
    assert_eq!(recv_entry(&mut client).await.seq, 3);
    let reason = loop {
        if let ClientEvent::Disconnected { reason, .. } = events.recv().await.unwrap() {
            break reason;
        }
    };
    assert!(
        matches!(reason, DisconnectReason::ProtocolError { .. }),
        "{reason:?}"
    );
    client.close().await;
}

#[tokio::test]
async fn another_inbox_epoch_restarts_the_cursor_at_welcome_start_seq() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.json");
    StateFile {
        inbox_epoch: 1,
        last_seq: 50,
        ..Default::default()
    }
    .save(&path)
    .unwrap();
    let (cfg, mut listener) = config(Some(&path));
    let mut client = Client::start(cfg).unwrap();
    let mut events = client.events();
    let mut peer = Peer::accept(&mut listener).await;
    let hello = peer.hello().await;
    assert_eq!(hello.resume.unwrap().last_seq, 50);
    peer.send(frame::error(
        ErrorCode::InboxEpochChanged,
        "new inbox",
        false,
    ))
    .await;
    peer.send(welcome(2, 1)).await;
    peer.deliver(1).await;
    assert_eq!(recv_entry(&mut client).await.seq, 1);
    let reset = loop {
        if let ClientEvent::InboxReset {
            old_epoch,
            new_epoch,
            start_seq,
        } = events.recv().await.unwrap()
        {
            break (old_epoch, new_epoch, start_seq);
        }
    };
    assert_eq!(reset, (1, 2, 1));
    client.ack(1);
    assert_eq!(peer.expect_ack().await, 1);
    let state = StateFile::load(&path).unwrap().unwrap();
    assert_eq!((state.inbox_epoch, state.last_seq), (2, 1));
    client.close().await;
}

#[tokio::test]
async fn kick_for_a_newer_login_stops_the_client_and_it_never_reconnects() {
    let (cfg, mut listener) = config(None);
    let mut client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    client.wait_connected(WAIT).await.unwrap();
    peer.send(Frame::Kick(pb::Kick {
        reason: KickReason::Replaced as i32,
        detail: "newer login".into(),
    }))
    .await;
    assert!(
        tokio::time::timeout(WAIT, client.recv())
            .await
            .unwrap()
            .is_none()
    );
    assert!(matches!(
        client.state(),
        ConnState::Stopped(ClientError::Kicked {
            reason: KickReason::Replaced,
            ..
        })
    ));
    assert!(matches!(
        client.send("bob", Bytes::from("x")).await,
        Err(ClientError::Kicked { .. })
    ));
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.accept())
            .await
            .map_or(true, |accepted| accepted.is_none()),
        "the client reconnected after KICK"
    );
}

#[tokio::test]
async fn auth_failure_stops_the_client_with_the_servers_reason() {
    let (cfg, mut listener) = config(None);
    let client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    peer.hello().await;
    peer.send(frame::error(ErrorCode::AuthFailed, "bad signature", true))
        .await;
    match client.wait_connected(WAIT).await {
        Err(ClientError::AuthFailed(reason)) => assert_eq!(reason, "bad signature"),
        other => panic!("expected AuthFailed, got {other:?}"),
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(300), listener.accept())
            .await
            .map_or(true, |accepted| accepted.is_none()),
        "the client reconnected after an auth failure"
    );
}

#[tokio::test]
async fn a_rejected_send_fails_with_the_servers_code_and_leaves_the_outbox() {
    let (cfg, mut listener) = config(None);
    let client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    let handle = client.handle();
    let sending = tokio::spawn(async move { handle.send("nobody", Bytes::from("x")).await });
    let send = peer.expect_send().await;
    let mut error = frame::error(ErrorCode::BadRequest, "no such user", false);
    if let Frame::Error(e) = &mut error {
        e.client_msg_id = send.client_msg_id.clone();
    }
    peer.send(error).await;
    match sending.await.unwrap() {
        Err(ClientError::Rejected { code, reason }) => {
            assert_eq!(code, ErrorCode::BadRequest);
            assert_eq!(reason, "no such user");
        }
        other => panic!("expected Rejected, got {other:?}"),
    }
    // The connection survives a non-fatal error.
    let handle = client.handle();
    let next = tokio::spawn(async move { handle.send("bob", Bytes::from("y")).await });
    let send = peer.expect_send().await;
    assert_eq!(send.body, Bytes::from("y"));
    peer.send_ack(&send, 1).await;
    assert!(next.await.unwrap().is_ok());
    client.close().await;
}

#[tokio::test]
async fn sync_asks_bounded_batches_until_the_range_is_done() {
    let (cfg, mut listener) = config(None);
    let client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    let handle = client.handle();
    let syncing = tokio::spawn(async move { handle.sync(1, 6).await });
    let mut asked = Vec::new();
    loop {
        let Frame::Sync(s) = peer.expect().await else {
            panic!("expected SYNC");
        };
        asked.push(s.from_seq);
        let end = (s.from_seq + 2).min(6);
        peer.send(Frame::SyncDone(pb::SyncDone {
            entries: (s.from_seq..end).map(entry).collect(),
            next_seq: end,
            head: 9,
        }))
        .await;
        if end == 6 {
            break;
        }
    }
    assert_eq!(asked, vec![1, 3, 5]);
    let seqs: Vec<_> = syncing
        .await
        .unwrap()
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    client.close().await;
}

#[tokio::test]
async fn go_away_reconnects_after_the_hinted_delay() {
    let (cfg, mut listener) = config(None);
    let client = Client::start(cfg).unwrap();
    let mut events = client.events();
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    peer.send(Frame::GoAway(pb::GoAway {
        min_delay_ms: 10,
        max_delay_ms: 20,
        alternate_address: String::new(),
    }))
    .await;
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    let retry_in = loop {
        if let ClientEvent::Disconnected {
            reason: DisconnectReason::GoingAway,
            retry_in,
        } = events.recv().await.unwrap()
        {
            break retry_in.unwrap();
        }
    };
    assert!(retry_in >= Duration::from_millis(10) && retry_in <= Duration::from_millis(20));
    client.close().await;
}

#[tokio::test(start_paused = true)]
async fn an_idle_client_pings_and_reconnects_when_nothing_comes_back() {
    let (mut cfg, mut listener) = config(None);
    cfg.heartbeat_interval = Duration::from_secs(30);
    cfg.pong_timeout = Duration::from_secs(10);
    let client = Client::start(cfg).unwrap();
    let mut events = client.events();
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    let start = tokio::time::Instant::now();
    let long = Duration::from_secs(600);
    assert!(matches!(peer.expect_within(long).await, Frame::Ping(_)));
    assert_eq!(start.elapsed().as_secs(), 30);
    peer.send(Frame::Pong(pb::Pong::default())).await;
    assert!(matches!(peer.expect_within(long).await, Frame::Ping(_)));
    assert_eq!(start.elapsed().as_secs(), 60);
    // Silence from now on: one re-PING after the pong timeout, then the link is dead.
    assert!(matches!(peer.expect_within(long).await, Frame::Ping(_)));
    assert_eq!(start.elapsed().as_secs(), 70);
    assert!(peer.closed_within(long).await);
    assert_eq!(start.elapsed().as_secs(), 80);
    let reason = loop {
        if let ClientEvent::Disconnected { reason, .. } = events.recv().await.unwrap() {
            break reason;
        }
    };
    assert_eq!(reason, DisconnectReason::UnknownTimeout);
    let _again = Peer::accept(&mut listener).await;
    client.close().await;
}

#[tokio::test]
async fn over_tcp_the_preamble_precedes_hello() {
    use tether_transport::tcp::TcpTransport;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let client = Client::start(ClientConfig::new(addr, "token", "dev1")).unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    // The server side checks the preamble before it yields a frame.
    let mut server = TcpTransport::accepted(stream, 4096);
    let raw = tokio::time::timeout(WAIT, recv(&mut server))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(matches!(frame::from_raw(&raw).unwrap(), Frame::Hello(_)));
    server.send(&welcome(1, 1)).unwrap();
    flush(&mut server).await.unwrap();
    let info = client.wait_connected(WAIT).await.unwrap();
    assert_eq!(info.inbox_epoch, 1);
    client.close().await;
}

#[tokio::test(start_paused = true)]
async fn retry_after_is_a_floor_for_the_next_attempt() {
    let (cfg, mut listener) = config(None);
    let client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    peer.hello().await;
    let mut e = frame::error(ErrorCode::Overloaded, "busy", true);
    if let Frame::Error(ref mut inner) = e {
        inner.retry_after_ms = 3_000;
    }
    peer.send(e).await;
    let refused = tokio::time::Instant::now();
    // The backoff alone would retry within 5 ms (base) here; the floor holds it off.
    let _again = tokio::time::timeout(Duration::from_secs(60), listener.accept())
        .await
        .expect("no retry")
        .expect("listener gone");
    let waited = refused.elapsed();
    assert!(
        waited >= Duration::from_millis(3_000) && waited <= Duration::from_millis(3_100),
        "retried after {waited:?}"
    );
    client.close().await;
}

/// Waits for the send task while answering PINGs; panics on any other frame.
async fn answer_pings_until<T>(peer: &mut Peer, task: &mut tokio::task::JoinHandle<T>) -> T {
    loop {
        tokio::select! {
            out = &mut *task => return out.unwrap(),
            frame = peer.expect_within(Duration::from_secs(600)) => match frame {
                Frame::Ping(_) => peer.send(Frame::Pong(pb::Pong::default())).await,
                other => panic!("unexpected {other:?}"),
            },
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_unanswered_send_goes_again_every_ack_timeout_then_is_unconfirmed() {
    let (cfg, mut listener) = config(None);
    let client = Client::start(cfg).unwrap();
    let mut peer = Peer::accept(&mut listener).await;
    peer.login(1, 1).await;
    client.wait_connected(WAIT).await.unwrap();
    let handle = client.handle();
    let start = tokio::time::Instant::now();
    let mut task =
        tokio::spawn(async move { handle.send("bob", Bytes::from_static(b"hello")).await });
    let first = peer.expect_send().await;
    assert_eq!(start.elapsed().as_secs(), 0);
    for want in [15, 30] {
        let again = loop {
            match peer.expect_within(Duration::from_secs(600)).await {
                Frame::Send(s) => break s,
                Frame::Ping(_) => peer.send(Frame::Pong(pb::Pong::default())).await,
                other => panic!("expected SEND, got {other:?}"),
            }
        };
        assert_eq!(
            again.client_msg_id, first.client_msg_id,
            "same id on every try"
        );
        assert_eq!(start.elapsed().as_secs(), want);
    }
    let outcome = answer_pings_until(&mut peer, &mut task).await;
    assert_eq!(start.elapsed().as_secs(), 45);
    match outcome {
        Err(ClientError::Unconfirmed {
            client_msg_id,
            reason: GiveUp::NoAck { tries: 3 },
        }) => assert_eq!(client_msg_id, id_of(&first)),
        other => panic!("{other:?}"),
    }
    client.close().await;
}

#[tokio::test(start_paused = true)]
async fn a_send_without_a_session_is_unconfirmed_after_the_offline_window() {
    let (cfg, listener) = config(None);
    // Nobody ever accepts: every attempt fails.
    drop(listener);
    let client = Client::start(cfg).unwrap();
    let start = tokio::time::Instant::now();
    let outcome = client.send("bob", Bytes::from_static(b"hello")).await;
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(120) && waited <= Duration::from_secs(122),
        "gave up after {waited:?}"
    );
    assert!(
        matches!(
            outcome,
            Err(ClientError::Unconfirmed {
                reason: GiveUp::Offline { .. },
                ..
            })
        ),
        "{outcome:?}"
    );
    client.close().await;
}

#[tokio::test]
async fn a_restored_send_older_than_the_dedup_window_is_never_resent() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.json");
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let pending = |n: u8, queued_ms: u64| PendingSend {
        client_msg_id: ClientMsgId([n; 16]),
        to: "bob".into(),
        body: Bytes::from(vec![n]),
        content_type: String::new(),
        queued_ms,
        group: None,
    };
    StateFile {
        inbox_epoch: 1,
        device_epoch: 1,
        // Two hours old, and one minute old; the server remembers ids for one hour.
        outbox: vec![pending(1, now_ms - 7_200_000), pending(2, now_ms - 60_000)],
        ..Default::default()
    }
    .save(&path)
    .unwrap();
    let (cfg, mut listener) = config(Some(&path));
    let client = Client::start(cfg).unwrap();
    let mut events = client.events();
    let mut peer = Peer::accept(&mut listener).await;
    peer.hello().await;
    let Frame::Welcome(mut w) = welcome(1, 1) else {
        unreachable!()
    };
    w.dedup_window_ms = 3_600_000;
    peer.send(Frame::Welcome(w)).await;
    let only = peer.expect_send().await;
    assert_eq!(
        id_of(&only),
        ClientMsgId([2; 16]),
        "the old send never leaves"
    );
    let given_up = loop {
        match tokio::time::timeout(WAIT, events.recv())
            .await
            .unwrap()
            .unwrap()
        {
            ClientEvent::SendUnconfirmed {
                client_msg_id,
                reason,
            } => break (client_msg_id, reason),
            _ => continue,
        }
    };
    assert_eq!(given_up.0, ClientMsgId([1; 16]));
    assert!(
        matches!(given_up.1, GiveUp::DedupWindow { .. }),
        "{given_up:?}"
    );
    // And it is gone from the state file, while the young one stays until answered.
    peer.send_ack(&only, 1).await;
    tokio::time::timeout(WAIT, async {
        loop {
            let state = StateFile::load(&path).unwrap().unwrap();
            if state.outbox.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the state file still holds the given-up send");
    client.close().await;
}
