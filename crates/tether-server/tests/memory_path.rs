//! The server's whole path over the in-memory transport: login, commit, position
//! streaming, resume, dedup, kick, SYNC. Raw protocol, no SDK.

use bytes::Bytes;
use std::time::Duration;
use tether_proto::{Frame, frame, pb};
use tether_server::{Server, ServerConfig};
use tether_transport::memory::MemoryTransport;
use tether_transport::{Transport, flush, recv};

struct Fixture {
    server: Server,
    _dir: tempfile::TempDir,
}

fn fixture(config: impl FnOnce(&mut ServerConfig)) -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        http: None,
        ..ServerConfig::default()
    };
    config(&mut cfg);
    Fixture {
        server: Server::open(cfg).unwrap(),
        _dir: dir,
    }
}

impl Fixture {
    fn token(&self, user: &str) -> String {
        self.server
            .shared()
            .auth
            .mint(user, Duration::from_secs(600))
    }

    async fn hello(
        &self,
        user: &str,
        device: &str,
        epoch: u64,
        resume: Option<(u64, u64)>,
    ) -> (MemoryTransport, Vec<Frame>) {
        let mut t = self.server.connect_memory();
        t.send(&Frame::Hello(pb::Hello {
            version: 1,
            token: self.token(user),
            device_id: device.into(),
            device_epoch: epoch,
            resume: resume.map(|(inbox_epoch, last_seq)| pb::ResumePoint {
                inbox_epoch,
                last_seq,
            }),
            ..Default::default()
        }))
        .unwrap();
        flush(&mut t).await.unwrap();
        let mut before = Vec::new();
        loop {
            let f = next(&mut t).await.expect("closed during login");
            match f {
                Frame::Welcome(_) | Frame::Error(pb::Error { fatal: true, .. }) => {
                    before.push(f);
                    return (t, before);
                }
                other => before.push(other),
            }
        }
    }

    async fn login(&self, user: &str, device: &str) -> (MemoryTransport, pb::Welcome) {
        let (t, frames) = self.hello(user, device, 1, None).await;
        match frames.last() {
            Some(Frame::Welcome(w)) => (t, w.clone()),
            other => panic!("login failed: {other:?}"),
        }
    }
}

async fn next(t: &mut MemoryTransport) -> Option<Frame> {
    let raw = tokio::time::timeout(Duration::from_secs(5), recv(t))
        .await
        .expect("no frame within 5 s")
        .ok()??;
    Some(frame::from_raw(&raw).unwrap())
}

fn send(to: &str, n: u32) -> Frame {
    let mut id = [0u8; 16];
    id[..4].copy_from_slice(&n.to_le_bytes());
    Frame::Send(pb::Send {
        client_msg_id: Bytes::copy_from_slice(&id),
        target: Some(pb::send::Target::User(to.into())),
        body: Bytes::from(format!("msg {n}")),
        content_type: "text/plain".into(),
    })
}

async fn send_all(
    t: &mut MemoryTransport,
    to: &str,
    range: std::ops::Range<u32>,
) -> Vec<pb::SendAck> {
    let n = range.len();
    for i in range {
        t.send(&send(to, i)).unwrap();
    }
    flush(t).await.unwrap();
    let mut acks = Vec::new();
    while acks.len() < n {
        match next(t).await.unwrap() {
            Frame::SendAck(a) => acks.push(a),
            Frame::Deliver(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    acks
}

async fn deliveries(t: &mut MemoryTransport, n: usize) -> Vec<pb::Entry> {
    let mut got = Vec::new();
    while got.len() < n {
        if let Frame::Deliver(d) = next(t).await.unwrap() {
            let e = d.entry.unwrap();
            t.send(&Frame::Ack(pb::Ack { seq: e.seq })).unwrap();
            flush(t).await.unwrap();
            got.push(e);
        }
    }
    got
}

#[tokio::test]
async fn offline_recipient_gets_everything_in_order_and_sender_devices_see_their_sends() {
    let f = fixture(|_| {});
    let (mut alice, _) = f.login("alice", "laptop").await;
    let acks = send_all(&mut alice, "bob", 0..100).await;
    assert!(acks.windows(2).all(|w| w[0].seq < w[1].seq));

    let (mut bob, welcome) = f.login("bob", "phone").await;
    assert_eq!((welcome.start_seq, welcome.head), (1, 100));
    let got = deliveries(&mut bob, 100).await;
    let seqs: Vec<u64> = got.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=100).collect::<Vec<_>>());
    assert_eq!(got[41].body, Bytes::from("msg 41"));
    assert_eq!(got[0].from, "alice");

    let (mut alice2, _) = f.login("alice", "tablet").await;
    let mine = deliveries(&mut alice2, 100).await;
    assert!(
        mine.iter()
            .all(|e| e.from == "alice" && e.conversation == "bob")
    );
}

#[tokio::test]
async fn live_messages_stream_to_a_connected_recipient() {
    let f = fixture(|_| {});
    let (mut bob, _) = f.login("bob", "phone").await;
    let (mut alice, _) = f.login("alice", "laptop").await;
    send_all(&mut alice, "bob", 0..10).await;
    let got = deliveries(&mut bob, 10).await;
    assert_eq!(got.last().unwrap().seq, 10);
}

#[tokio::test]
async fn resend_of_a_client_msg_id_is_stored_once_and_gets_the_original_ack() {
    let f = fixture(|_| {});
    let (mut alice, _) = f.login("alice", "laptop").await;
    let first = send_all(&mut alice, "bob", 5..6).await;
    let mut again = send_all(&mut alice, "bob", 5..6).await;
    assert!(!first[0].duplicate);
    assert!(again[0].duplicate, "the resend is flagged as a duplicate");
    again[0].duplicate = false;
    assert_eq!(first, again);
    let (_bob, welcome) = f.login("bob", "phone").await;
    assert_eq!(welcome.head, 1);
}

#[tokio::test]
async fn device_resumes_from_its_own_point_and_server_cursor() {
    let f = fixture(|_| {});
    let (mut alice, _) = f.login("alice", "laptop").await;
    send_all(&mut alice, "bob", 0..20).await;
    let (mut bob, welcome) = f.login("bob", "phone").await;
    deliveries(&mut bob, 20).await;
    drop(bob);
    // Own resume point wins.
    let (_t, frames) = f
        .hello("bob", "phone", 2, Some((welcome.inbox_epoch, 12)))
        .await;
    let Some(Frame::Welcome(w)) = frames.last() else {
        panic!("{frames:?}")
    };
    assert_eq!(w.start_seq, 13);
    drop(_t);
    // Without one, the server cursor (moved by ACKs, flushed within 200 ms).
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (_t, frames) = f.hello("bob", "phone", 3, None).await;
    let Some(Frame::Welcome(w)) = frames.last() else {
        panic!("{frames:?}")
    };
    assert_eq!(w.start_seq, 21);
}

#[tokio::test]
async fn bad_resume_points_are_errors_not_silent_skips() {
    let f = fixture(|_| {});
    let (mut alice, welcome) = f.login("alice", "laptop").await;
    send_all(&mut alice, "bob", 0..3).await;
    let (_t, frames) = f
        .hello("bob", "phone", 1, Some((welcome.inbox_epoch, 4)))
        .await;
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == pb::ErrorCode::ResumeAheadOfHead as i32)
    );
    let (_t, frames) = f
        .hello("bob", "phone", 2, Some((welcome.inbox_epoch ^ 1, 2)))
        .await;
    assert!(
        matches!(&frames[0], Frame::Error(e) if e.code == pb::ErrorCode::InboxEpochChanged as i32 && !e.fatal)
    );
    assert!(matches!(frames.last(), Some(Frame::Welcome(w)) if w.start_seq == 1));
}

#[tokio::test]
async fn newer_login_kicks_older_and_older_never_evicts_newer() {
    let f = fixture(|_| {});
    let (mut old, _) = f.hello("bob", "phone", 5, None).await;
    let (_new, frames) = f.hello("bob", "phone", 6, None).await;
    assert!(matches!(frames.last(), Some(Frame::Welcome(_))));
    assert!(
        matches!(next(&mut old).await, Some(Frame::Kick(k)) if k.reason == pb::KickReason::Replaced as i32)
    );
    let (_stale, frames) = f.hello("bob", "phone", 4, None).await;
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == pb::ErrorCode::StaleDeviceEpoch as i32)
    );
}

#[tokio::test]
async fn a_refused_login_does_not_kick_the_working_session() {
    let f = fixture(|_| {});
    let (mut live, frames) = f.hello("bob", "phone", 5, None).await;
    let Some(Frame::Welcome(w)) = frames.last() else {
        panic!("{frames:?}")
    };
    // Newer epoch, but a resume point above head: refused, and must not cost `live`.
    let (_bad, frames) = f.hello("bob", "phone", 6, Some((w.inbox_epoch, 99))).await;
    assert!(matches!(frames.last(), Some(Frame::Error(e)) if e.fatal));
    let (mut alice, _) = f.login("alice", "laptop").await;
    send_all(&mut alice, "bob", 0..3).await;
    let got = deliveries(&mut live, 3).await;
    assert_eq!(got.len(), 3, "the working session still receives, no KICK");
}

#[tokio::test]
async fn a_backlog_larger_than_the_send_buffer_streams_without_client_traffic() {
    let f = fixture(|_| {});
    let (mut alice, _) = f.login("alice", "laptop").await;
    for i in 0..100u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_le_bytes());
        alice
            .send(&Frame::Send(pb::Send {
                client_msg_id: Bytes::copy_from_slice(&id),
                target: Some(pb::send::Target::User("bob".into())),
                body: Bytes::from(vec![b'z'; 4096]),
                content_type: String::new(),
            }))
            .unwrap();
    }
    flush(&mut alice).await.unwrap();
    let mut acks = 0;
    while acks < 100 {
        if let Some(Frame::SendAck(_)) = next(&mut alice).await {
            acks += 1;
        }
    }
    // 100 × 4 KiB is far above the 64 KiB high-water mark; bob never sends a frame.
    let (mut bob, _) = f.login("bob", "phone").await;
    let mut got = 0;
    while got < 100 {
        if let Some(Frame::Deliver(_)) = next(&mut bob).await {
            got += 1;
        }
    }
}

#[tokio::test]
async fn sync_reads_history_in_bounded_batches() {
    let f = fixture(|_| {});
    let (mut alice, _) = f.login("alice", "laptop").await;
    send_all(&mut alice, "bob", 0..300).await;
    let (mut bob, _) = f.login("bob", "phone").await;
    bob.send(&Frame::Sync(pb::Sync {
        from_seq: 1,
        to_seq: 0,
        limit: 1000,
    }))
    .unwrap();
    flush(&mut bob).await.unwrap();
    let done = loop {
        if let Frame::SyncDone(d) = next(&mut bob).await.unwrap() {
            break d;
        }
    };
    assert_eq!(done.entries.len(), 64, "capped per batch");
    assert_eq!(done.next_seq, 65);
    assert_eq!(done.head, 300);
}

#[tokio::test]
async fn a_body_too_big_for_the_deliver_frame_is_refused_not_stored() {
    let f = fixture(|_| {});
    let (mut alice, _) = f.login("alice", "laptop").await;
    let big = Frame::Send(pb::Send {
        client_msg_id: Bytes::from(vec![9u8; 16]),
        target: Some(pb::send::Target::User("bob".into())),
        body: Bytes::from(vec![b'x'; tether_proto::DEFAULT_MAX_FRAME - 100]),
        content_type: String::new(),
    });
    alice.send(&big).unwrap();
    flush(&mut alice).await.unwrap();
    match next(&mut alice).await.unwrap() {
        Frame::Error(e) => {
            assert_eq!(e.code, pb::ErrorCode::FrameTooLarge as i32);
            assert!(!e.fatal);
            assert_eq!(&e.client_msg_id[..], &[9u8; 16]);
        }
        other => panic!("{other:?}"),
    }
    // The largest allowed body is stored and delivered within the frame limit.
    let ok = Frame::Send(pb::Send {
        client_msg_id: Bytes::from(vec![10u8; 16]),
        target: Some(pb::send::Target::User("bob-with-a-long-name".repeat(6))),
        body: Bytes::from(vec![
            b'y';
            tether_proto::max_body(tether_proto::DEFAULT_MAX_FRAME)
        ]),
        content_type: "text/plain".into(),
    });
    alice.send(&ok).unwrap();
    flush(&mut alice).await.unwrap();
    loop {
        match next(&mut alice).await.unwrap() {
            Frame::SendAck(_) => break,
            Frame::Deliver(_) => {}
            other => panic!("{other:?}"),
        }
    }
    let (mut bob, _) = f.login(&"bob-with-a-long-name".repeat(6), "phone").await;
    bob.set_max_frame(tether_proto::DEFAULT_MAX_FRAME);
    let got = deliveries(&mut bob, 1).await;
    assert_eq!(
        got[0].body.len(),
        tether_proto::max_body(tether_proto::DEFAULT_MAX_FRAME)
    );
}

#[tokio::test]
async fn credit_window_bounds_unacked_deliveries() {
    let f = fixture(|c| c.credit_window = 8);
    let (mut alice, _) = f.login("alice", "laptop").await;
    send_all(&mut alice, "bob", 0..50).await;
    let (mut bob, _) = f.login("bob", "phone").await;
    let mut got = 0;
    while let Ok(Some(Ok(Some(raw)))) =
        tokio::time::timeout(Duration::from_millis(200), recv(&mut bob))
            .await
            .map(Some)
    {
        if raw.kind == tether_proto::kind::DELIVER {
            got += 1;
        }
    }
    assert_eq!(got, 8, "exactly the window, then the stream waits for ACKs");
    bob.send(&Frame::Ack(pb::Ack { seq: 8 })).unwrap();
    flush(&mut bob).await.unwrap();
    let more = deliveries(&mut bob, 42).await;
    assert_eq!(more.first().unwrap().seq, 9);
    assert_eq!(more.last().unwrap().seq, 50);
}

#[tokio::test]
async fn an_ack_beyond_the_last_deliver_is_refused_and_opens_no_credit() {
    let f = fixture(|c| c.credit_window = 8);
    let (mut alice, _) = f.login("alice", "laptop").await;
    send_all(&mut alice, "bob", 0..20).await;
    let (mut bob, _) = f.login("bob", "phone").await;
    for seq in 1..=8 {
        match next(&mut bob).await.unwrap() {
            Frame::Deliver(d) => assert_eq!(d.entry.unwrap().seq, seq),
            other => panic!("unexpected {other:?}"),
        }
    }
    bob.send(&Frame::Ack(pb::Ack { seq: 15 })).unwrap();
    flush(&mut bob).await.unwrap();
    match next(&mut bob).await.unwrap() {
        Frame::Error(e) => {
            assert!(!e.fatal, "{e:?}");
            assert_eq!(e.code, pb::ErrorCode::BadRequest as i32);
            assert!(e.reason.contains("beyond the last DELIVER 8"), "{e:?}");
        }
        other => panic!("expected ERROR, got {other:?}"),
    }
    // Nothing was released: the window is still full until a real ACK.
    assert!(
        tokio::time::timeout(Duration::from_millis(200), recv(&mut bob))
            .await
            .is_err(),
        "a bogus ACK must not reopen the window"
    );
    bob.send(&Frame::Ack(pb::Ack { seq: 8 })).unwrap();
    flush(&mut bob).await.unwrap();
    let more = deliveries(&mut bob, 12).await;
    assert_eq!(more.first().unwrap().seq, 9);
    assert_eq!(more.last().unwrap().seq, 20);
}

/// The largest connection future that makes a 256 B tokio task (see below).
const TASK_256: usize = 152;

#[tokio::test]
async fn connection_future_stays_small() {
    let f = fixture(|_| {});
    let (_client, server_end) = tether_transport::memory::pair(4096);
    let fut = tether_server::connection::serve(f.server.shared().clone(), server_end);
    let size = std::mem::size_of_val(&fut);
    println!("serve() future over the memory transport: {size} bytes");
    // tokio allocates a task as its future plus 104 B of header and trailer, rounded
    // up to 128 B steps on x86_64 (its cells are cache-line aligned): a future of
    // 152 B or less makes a 256 B task. 128 B (2026-11-22), since the task is a
    // hand-written state machine; 208 B as an `async fn` (a 384 B task), 264 B before
    // the transport argument was boxed.
    assert!(
        size <= TASK_256,
        "the per-connection future grew to {size} bytes"
    );

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (client, accepted) = tokio::join!(
        tokio::net::TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    let _client = client.unwrap();
    let tcp = tether_transport::tcp::TcpTransport::accepted(accepted.unwrap().0, 4096);
    let fut = tether_server::connection::serve(f.server.shared().clone(), tcp);
    let size = std::mem::size_of_val(&fut);
    println!("serve() future over TCP: {size} bytes");
    // 120 B (2026-11-22); 256 B as an `async fn`, 360 B before the transport argument
    // was boxed.
    assert!(
        size <= TASK_256,
        "the per-connection future grew to {size} bytes"
    );

    // What the accept loop spawns: the stream handed over to a connection thread is
    // registered inside the login phase, so the task is no bigger.
    let (client, accepted) = tokio::join!(
        tokio::net::TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    let _client2 = client.unwrap();
    let std_stream = accepted.unwrap().0.into_std().unwrap();
    let fut = tether_server::serve_tcp(f.server.shared().clone(), std_stream);
    let size = std::mem::size_of_val(&fut);
    println!("an accepted TCP connection's task (register, then serve()): {size} bytes");
    assert!(
        size <= TASK_256,
        "the accepted TCP connection's future grew to {size} bytes"
    );

    // A TLS connection's task, handshake included: the rustls state (about 1.2 KB
    // inline) must live once on the heap, not in the future (it was 3,992 B when the
    // stream was inline: the transport had three slots in it).
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = tether_transport::tls::self_signed(&["127.0.0.1".into()], 1).unwrap();
    std::fs::write(dir.path().join("c.pem"), cert).unwrap();
    std::fs::write(dir.path().join("k.pem"), key).unwrap();
    let config = tether_transport::tls::server_config(
        &dir.path().join("c.pem"),
        &dir.path().join("k.pem"),
        &[tether_transport::tls::ALPN],
    )
    .unwrap();
    let (client, accepted) = tokio::join!(
        tokio::net::TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    let _client = client.unwrap();
    let (stream, peer) = accepted.unwrap();
    let fut = tether_server::serve_tls(
        f.server.shared().clone(),
        config,
        stream.into_std().unwrap(),
        peer,
    );
    let size = std::mem::size_of_val(&fut);
    println!("a TLS connection's task (handshake, then serve()): {size} bytes");
    // 88 B (2026-11-22): the handshake runs in the login phase's box. 264 B when the
    // task awaited the handshake and then `serve()` inline.
    assert!(
        size <= TASK_256,
        "the TLS connection's future grew to {size} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backlog_replays_are_paced_while_live_messages_go_straight_through() {
    let f = fixture(|c| {
        c.replay_rate = 2000.0;
        c.replay_burst = 500;
        c.deadline_sweep = Duration::from_millis(50);
    });
    let (mut alice, _) = f.login("alice", "laptop").await;
    for chunk in 0..6u32 {
        send_all(&mut alice, "bob", chunk * 500..chunk * 500 + 500).await;
    }
    let (mut carol, _) = f.login("carol", "phone").await;
    let (mut bob, _) = f.login("bob", "phone").await;
    let replay = tokio::spawn(async move {
        let started = std::time::Instant::now();
        let got = deliveries(&mut bob, 3000).await;
        (started.elapsed(), got.last().unwrap().seq)
    });
    // A live message while bob's replay is paced: carol gets it at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let sent = std::time::Instant::now();
    send_all(&mut alice, "carol", 9000..9001).await;
    deliveries(&mut carol, 1).await;
    let live = sent.elapsed();
    let (took, last) = replay.await.unwrap();
    assert_eq!(last, 3000);
    assert!(
        live < Duration::from_millis(500),
        "live message took {live:?}"
    );
    // 3,000 entries, the last 256 (one credit window) unpaced, 500 of burst, then
    // 2,000/s: at least ~1.1 s; at most that plus sweeps and slack.
    assert!(
        took >= Duration::from_millis(1000),
        "replay took {took:?}: not paced"
    );
    assert!(took <= Duration::from_millis(3500), "replay took {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_talks_while_the_server_is_backpressured_is_not_expired() {
    let f = fixture(|c| {
        c.heartbeat.min_interval = Duration::from_millis(500);
        c.heartbeat.pong_timeout = Duration::from_millis(250);
        c.heartbeat.max_misses = 1;
        c.heartbeat.grace = Duration::from_millis(100);
        c.deadline_sweep = Duration::from_millis(50);
    });
    let (mut alice, _) = f.login("alice", "laptop").await;
    for chunk in 0..4u32 {
        let mut frames = Vec::new();
        for i in chunk * 64..chunk * 64 + 64 {
            let mut id = [0u8; 16];
            id[..4].copy_from_slice(&i.to_le_bytes());
            frames.push(Frame::Send(pb::Send {
                client_msg_id: Bytes::copy_from_slice(&id),
                target: Some(pb::send::Target::User("bob".into())),
                body: Bytes::from(vec![b'q'; 4096]),
                content_type: String::new(),
            }));
        }
        for fr in &frames {
            alice.send(fr).unwrap();
        }
        flush(&mut alice).await.unwrap();
        let mut acks = 0;
        while acks < 64 {
            if let Some(Frame::SendAck(_)) = next(&mut alice).await {
                acks += 1;
            }
        }
    }
    // bob asks for I = 1 s (deadline 1.35 s), then only PINGs for 3 s without reading:
    // the server's send side is full, so it has stopped reading bob.
    let mut bob = f.server.connect_memory();
    bob.send(&Frame::Hello(pb::Hello {
        version: 1,
        token: f.token("bob"),
        device_id: "phone".into(),
        device_epoch: 1,
        heartbeat_interval_ms: 1000,
        ..Default::default()
    }))
    .unwrap();
    flush(&mut bob).await.unwrap();
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        bob.send(&Frame::Ping(pb::Ping::default())).unwrap();
        let _ = tokio::time::timeout(Duration::from_millis(10), flush(&mut bob)).await;
    }
    // Now bob reads: everything arrives, and no IDLE_TIMEOUT.
    let mut delivered = 0;
    while delivered < 256 {
        match next(&mut bob).await.expect("closed") {
            Frame::Deliver(d) => {
                delivered += 1;
                bob.send(&Frame::Ack(pb::Ack {
                    seq: d.entry.unwrap().seq,
                }))
                .unwrap();
                let _ = tokio::time::timeout(Duration::from_millis(10), flush(&mut bob)).await;
            }
            Frame::Error(e) => panic!("expired while talking: {e:?}"),
            _ => {}
        }
    }
}

/// On one connection, a SEND's SEND_ACK comes before the DELIVER of the sender's own
/// copy (same seq). The commit queues the answer before it publishes the new head, and
/// the connection answers what is queued before it streams. Pipelined SENDs on a
/// multi-threaded runtime make the commit finish while the connection is busy with the
/// next frame, which is when a DELIVER could overtake its SEND_ACK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_senders_own_deliver_never_overtakes_its_send_ack() {
    let f = fixture(|c| c.durability = tether_store::Durability::Relaxed);
    let (mut alice, _) = f.login("alice", "phone").await;
    let total = 3_000u32;
    let mut acked = std::collections::HashSet::new();
    let (mut sent, mut acks, mut delivered) = (0u32, 0u32, 0u32);
    while delivered < total {
        // Keep up to 16 SENDs in flight.
        while sent < total && sent - acks < 16 {
            alice.send(&send("bob", sent)).unwrap();
            sent += 1;
        }
        flush(&mut alice).await.unwrap();
        match next(&mut alice).await.unwrap() {
            Frame::SendAck(a) => {
                acked.insert(a.seq);
                acks += 1;
            }
            Frame::Deliver(d) => {
                let seq = d.entry.unwrap().seq;
                assert!(
                    acked.contains(&seq),
                    "DELIVER {seq} came before its SEND_ACK (after {acks} acks)"
                );
                alice.send(&Frame::Ack(pb::Ack { seq })).unwrap();
                delivered += 1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(acks, total);
}

/// An ACK the device sent before a newer login of it took over still moves the
/// device's cursor. Here the old session has stopped reading (its send buffer is past
/// the high-water mark, the device reads nothing), so the ACK is still unread when the
/// replacement closes the session.
#[tokio::test]
async fn an_ack_waiting_when_a_newer_login_takes_over_still_moves_the_cursor() {
    let f = fixture(|_| {});
    let (mut old, _) = f.login("alice", "phone").await;
    let (mut bob, _) = f.login("bob", "laptop").await;
    for i in 0..100u32 {
        let mut id = [0u8; 16];
        id[..4].copy_from_slice(&i.to_le_bytes());
        bob.send(&Frame::Send(pb::Send {
            client_msg_id: Bytes::copy_from_slice(&id),
            target: Some(pb::send::Target::User("alice".into())),
            body: Bytes::from(vec![b'z'; 4096]),
            content_type: String::new(),
        }))
        .unwrap();
    }
    flush(&mut bob).await.unwrap();
    let mut acks = 0;
    while acks < 100 {
        if let Some(Frame::SendAck(_)) = next(&mut bob).await {
            acks += 1;
        }
    }
    // 400 KiB for alice: the pipe (256 KiB) fills, then the server's queue passes the
    // 64 KiB high-water mark and it stops reading alice's phone.
    tokio::time::sleep(Duration::from_millis(100)).await;
    // DELIVER 1..=3 were sent (alice has them in the pipe).
    old.send(&Frame::Ack(pb::Ack { seq: 3 })).unwrap();
    flush(&mut old).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    let (newer, _) = f.hello("alice", "phone", 2, None).await;
    drop(newer);
    // Cursors are written within 200 ms.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    for epoch in 3.. {
        let (t, frames) = f.hello("alice", "phone", epoch, None).await;
        drop(t);
        let Some(Frame::Welcome(w)) = frames.last() else {
            panic!("login failed: {frames:?}");
        };
        if w.start_seq == 4 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the cursor stayed at {}: the ACK of 3 was dropped",
            w.start_seq - 1
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(old);
}

/// With relaxed durability connections commit on their own threads. Eight senders on
/// a two-thread runtime pipeline at once, so committers race for the commit lock and
/// take over each other's queued sends. Every SEND is answered once, with growing
/// seqs, and every message reaches its recipient once, in each sender's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_commits_on_connection_threads_lose_and_repeat_nothing() {
    const SENDERS: u32 = 8;
    const EACH: u32 = 400;
    let f = std::sync::Arc::new(fixture(|c| {
        c.durability = tether_store::Durability::Relaxed
    }));
    let (mut bob, _) = f.login("bob", "laptop").await;
    let mut senders = Vec::new();
    for s in 0..SENDERS {
        let f = f.clone();
        senders.push(tokio::spawn(async move {
            let (mut t, _) = f.login(&format!("s{s}"), "phone").await;
            let (mut sent, mut acks, mut last_seq) = (0u32, 0u32, 0u64);
            while acks < EACH {
                while sent < EACH && sent - acks < 32 {
                    let mut id = [0u8; 16];
                    id[..4].copy_from_slice(&sent.to_le_bytes());
                    t.send(&Frame::Send(pb::Send {
                        client_msg_id: Bytes::copy_from_slice(&id),
                        target: Some(pb::send::Target::User("bob".into())),
                        body: Bytes::from(format!("{s} {sent}")),
                        content_type: "text/plain".into(),
                    }))
                    .unwrap();
                    sent += 1;
                }
                flush(&mut t).await.unwrap();
                match next(&mut t).await.unwrap() {
                    Frame::SendAck(a) => {
                        assert!(!a.duplicate, "s{s}: a first send answered as a duplicate");
                        assert!(a.seq > last_seq, "s{s}: seq {} after {last_seq}", a.seq);
                        last_seq = a.seq;
                        acks += 1;
                    }
                    Frame::Deliver(d) => {
                        let seq = d.entry.unwrap().seq;
                        t.send(&Frame::Ack(pb::Ack { seq })).unwrap();
                    }
                    Frame::Error(e) => panic!("s{s}: {e:?}"),
                    _ => {}
                }
            }
            acks
        }));
    }
    let mut next_of = vec![0u32; SENDERS as usize];
    let (mut got, mut last_seq) = (0u32, 0u64);
    while got < SENDERS * EACH {
        let Frame::Deliver(d) = next(&mut bob).await.unwrap() else {
            continue;
        };
        let e = d.entry.unwrap();
        assert_eq!(e.seq, last_seq + 1, "bob's inbox skipped or repeated a seq");
        last_seq = e.seq;
        bob.send(&Frame::Ack(pb::Ack { seq: e.seq })).unwrap();
        flush(&mut bob).await.unwrap();
        let body = String::from_utf8(e.body.to_vec()).unwrap();
        let (s, n) = body.split_once(' ').unwrap();
        let (s, n): (usize, u32) = (s.parse().unwrap(), n.parse().unwrap());
        assert_eq!(
            n, next_of[s],
            "from s{s}: message {n} out of order or repeated"
        );
        next_of[s] += 1;
        got += 1;
    }
    for s in senders {
        assert_eq!(s.await.unwrap(), EACH);
    }
    let metrics = &f.server.shared().metrics;
    assert!(
        metrics.commits_inline.get() > 0,
        "no commit was made on a connection's thread"
    );
}

/// With `fsync` durability a commit waits for the disk, which must not stall a
/// connection's thread: the commit thread makes every commit.
#[tokio::test]
async fn fsync_commits_stay_on_the_commit_thread() {
    let f = fixture(|c| c.durability = tether_store::Durability::Fsync);
    let (mut alice, _) = f.login("alice", "phone").await;
    let acks = send_all(&mut alice, "bob", 0..20).await;
    assert_eq!(acks.len(), 20);
    let metrics = &f.server.shared().metrics;
    assert_eq!(metrics.commits_inline.get(), 0);
    assert!(metrics.commits_by_thread.get() > 0);
}
