//! Probe sessions (DESIGN §5) over the in-memory transport: no registry entry, no
//! delivery, nothing but PONG, a deadline that follows the candidate, one per device,
//! rate-limited.

use bytes::Bytes;
use std::time::{Duration, Instant};
use tether_proto::pb::ErrorCode;
use tether_proto::{Frame, frame, pb};
use tether_server::config::HeartbeatLimits;
use tether_server::probe::ProbeLimits;
use tether_server::{Server, ServerConfig};
use tether_transport::memory::MemoryTransport;
use tether_transport::{Transport, flush, recv};

fn server(dir: &tempfile::TempDir, gap: Duration) -> Server {
    Server::open(ServerConfig {
        data_dir: dir.path().to_path_buf(),
        http: None,
        heartbeat: HeartbeatLimits {
            min_interval: Duration::from_millis(100),
            pong_timeout: Duration::from_millis(100),
            grace: Duration::from_millis(100),
            ..Default::default()
        },
        probes: ProbeLimits { min_gap: gap },
        ..ServerConfig::default()
    })
    .unwrap()
}

fn token(s: &Server, user: &str) -> String {
    s.shared().auth.mint(user, Duration::from_secs(600))
}

async fn next(t: &mut MemoryTransport, within: Duration) -> Option<Frame> {
    let raw = tokio::time::timeout(within, recv(t)).await.ok()?.ok()??;
    Some(frame::from_raw(&raw).unwrap())
}

async fn hello(
    s: &Server,
    user: &str,
    device: &str,
    probe: bool,
    interval_ms: u32,
) -> (MemoryTransport, Frame) {
    let mut t = s.connect_memory();
    t.send(&Frame::Hello(pb::Hello {
        version: 1,
        token: token(s, user),
        device_id: device.into(),
        device_epoch: 1,
        heartbeat_interval_ms: interval_ms,
        probe,
        ..Default::default()
    }))
    .unwrap();
    flush(&mut t).await.unwrap();
    let reply = next(&mut t, Duration::from_secs(5))
        .await
        .expect("no reply to HELLO");
    (t, reply)
}

async fn ping(t: &mut MemoryTransport) -> Option<Frame> {
    t.send(&Frame::Ping(pb::Ping::default())).unwrap();
    flush(t).await.unwrap();
    next(t, Duration::from_secs(5)).await
}

#[tokio::test]
async fn a_probe_is_not_a_session_and_receives_nothing_but_pong() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir, Duration::ZERO);
    let (mut main, w) = hello(&s, "bob", "phone", false, 60_000).await;
    assert!(matches!(w, Frame::Welcome(_)));
    assert_eq!(s.shared().registry.len(), 1);

    let (mut probe, w) = hello(&s, "bob", "phone", true, 60_000).await;
    let Frame::Welcome(w) = w else {
        panic!("probe refused: {w:?}")
    };
    assert_eq!(w.user_id, "bob");
    assert_eq!(
        w.heartbeat.unwrap().interval_ms,
        60_000,
        "the candidate is accepted as asked"
    );
    // Same device, no kick either way, no registry entry.
    assert_eq!(s.shared().registry.len(), 1);
    assert_eq!(s.shared().probes.active(), 1);

    // A message to bob reaches the main session only.
    let (mut alice, _) = hello(&s, "alice", "laptop", false, 0).await;
    alice
        .send(&Frame::Send(pb::Send {
            client_msg_id: Bytes::from_static(&[7; 16]),
            target: Some(pb::send::Target::User("bob".into())),
            body: Bytes::from_static(b"hi"),
            content_type: String::new(),
        }))
        .unwrap();
    flush(&mut alice).await.unwrap();
    let delivered = loop {
        match next(&mut main, Duration::from_secs(5)).await {
            Some(Frame::Deliver(d)) => break d.entry.unwrap(),
            Some(_) => continue,
            None => panic!("main session got no DELIVER"),
        }
    };
    assert_eq!(&delivered.body[..], b"hi");
    assert_eq!(
        next(&mut probe, Duration::from_millis(300)).await,
        None,
        "nothing unasked on a probe"
    );
    assert!(matches!(ping(&mut probe).await, Some(Frame::Pong(_))));
    assert!(
        matches!(ping(&mut main).await, Some(Frame::Pong(_))),
        "the main session is untouched"
    );

    // Anything but PING is a protocol error that ends only the probe.
    probe.send(&Frame::Ack(pb::Ack { seq: 1 })).unwrap();
    flush(&mut probe).await.unwrap();
    match next(&mut probe, Duration::from_secs(5)).await {
        Some(Frame::Error(e)) => {
            assert!(e.fatal);
            assert_eq!(e.code, ErrorCode::UnexpectedKind as i32);
        }
        other => panic!("expected ERROR, got {other:?}"),
    }
    assert!(matches!(ping(&mut main).await, Some(Frame::Pong(_))));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.shared().probes.active(), 0);
}

#[tokio::test]
async fn a_bad_token_on_a_probe_is_refused_like_any_login() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir, Duration::ZERO);
    let mut t = s.connect_memory();
    t.send(&Frame::Hello(pb::Hello {
        version: 1,
        token: "not-a-token".into(),
        device_id: "phone".into(),
        probe: true,
        ..Default::default()
    }))
    .unwrap();
    flush(&mut t).await.unwrap();
    match next(&mut t, Duration::from_secs(5)).await {
        Some(Frame::Error(e)) => assert_eq!(e.code, ErrorCode::AuthFailed as i32),
        other => panic!("expected AUTH_FAILED, got {other:?}"),
    }
    assert_eq!(s.shared().probes.active(), 0);
}

#[tokio::test]
async fn the_probe_deadline_follows_the_candidate() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir, Duration::ZERO);
    // Deadline = I + m·P + grace = 600 + 2·100 + 100 = 900 ms.
    let (mut probe, w) = hello(&s, "bob", "phone", true, 600).await;
    assert!(matches!(w, Frame::Welcome(_)));
    // A PING inside the candidate keeps it alive and restarts the deadline.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(matches!(ping(&mut probe).await, Some(Frame::Pong(_))));
    let silent_from = Instant::now();
    // Then silence: the server closes it, without sending anything, after ~900 ms.
    let got = next(&mut probe, Duration::from_secs(5)).await;
    let after = silent_from.elapsed();
    assert_eq!(got, None, "closed without a frame");
    assert!(
        after >= Duration::from_millis(850),
        "closed early: {after:?}"
    );
    assert!(
        after <= Duration::from_millis(1500),
        "closed late: {after:?}"
    );
}

#[tokio::test]
async fn one_probe_per_device_and_probe_logins_are_rate_limited() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(&dir, Duration::from_millis(400));
    let (mut first, w) = hello(&s, "bob", "phone", true, 60_000).await;
    assert!(matches!(w, Frame::Welcome(_)));
    // Too soon: refused with a retry hint no longer than the gap.
    let (_t, refused) = hello(&s, "bob", "phone", true, 60_000).await;
    match refused {
        Frame::Error(e) => {
            assert_eq!(e.code, ErrorCode::Overloaded as i32);
            assert!(
                e.retry_after_ms > 0 && e.retry_after_ms <= 400,
                "{}",
                e.retry_after_ms
            );
        }
        other => panic!("expected OVERLOADED, got {other:?}"),
    }
    // Another device of the same user is not limited by bob/phone's slot.
    let (_tablet, w) = hello(&s, "bob", "tablet", true, 60_000).await;
    assert!(matches!(w, Frame::Welcome(_)));
    assert_eq!(s.shared().probes.active(), 2);
    // After the gap a new probe of the device ends the old one.
    tokio::time::sleep(Duration::from_millis(450)).await;
    let (mut second, w) = hello(&s, "bob", "phone", true, 60_000).await;
    assert!(matches!(w, Frame::Welcome(_)));
    assert_eq!(
        next(&mut first, Duration::from_secs(5)).await,
        None,
        "the older probe is closed"
    );
    assert!(matches!(ping(&mut second).await, Some(Frame::Pong(_))));
    assert_eq!(s.shared().probes.active(), 2);
    assert_eq!(s.shared().registry.len(), 0, "probes never register");
}
