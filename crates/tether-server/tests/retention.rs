//! Retention, acked compaction and the device cap through the whole server (issue 5):
//! raw protocol over the in-memory transport, an embedded store in a temp dir that the
//! test also reads (and reopens, for a restart).

use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tether_proto::{Frame, frame, pb};
use tether_server::{STORE_DIR, Server, ServerConfig};
use tether_store::{DeviceCursor, Durability, EmbeddedStore, Store, StoreError};
use tether_transport::memory::MemoryTransport;
use tether_transport::{Transport, flush, recv};

/// A server over a store the test holds too.
struct Fixture {
    server: Server,
    store: Arc<EmbeddedStore>,
}

fn config(dir: &Path, tune: impl FnOnce(&mut ServerConfig)) -> ServerConfig {
    let mut cfg = ServerConfig {
        data_dir: dir.to_path_buf(),
        http: None,
        ..ServerConfig::default()
    };
    tune(&mut cfg);
    cfg
}

fn start(cfg: ServerConfig, store: EmbeddedStore) -> Fixture {
    let store = Arc::new(store);
    Fixture {
        server: Server::with_store(cfg, store.clone()).unwrap(),
        store,
    }
}

fn open_store(dir: &Path) -> Result<EmbeddedStore, StoreError> {
    EmbeddedStore::open(&dir.join(STORE_DIR), Durability::Fsync)
}

impl Fixture {
    fn epoch(&self) -> u64 {
        self.store.inbox_info("anyone").unwrap().epoch
    }

    /// Logs in; returns the transport and every frame up to WELCOME or a fatal ERROR.
    async fn hello(&self, user: &str, device: &str, epoch: u64) -> (MemoryTransport, Vec<Frame>) {
        let mut t = self.server.connect_memory();
        t.send(&Frame::Hello(pb::Hello {
            version: 1,
            token: self
                .server
                .shared()
                .auth
                .mint(user, Duration::from_secs(600)),
            device_id: device.into(),
            device_epoch: epoch,
            ..Default::default()
        }))
        .unwrap();
        flush(&mut t).await.unwrap();
        let mut frames = Vec::new();
        loop {
            let f = next(&mut t).await.expect("closed during login");
            let last = matches!(
                f,
                Frame::Welcome(_) | Frame::Error(pb::Error { fatal: true, .. })
            );
            frames.push(f);
            if last {
                return (t, frames);
            }
        }
    }

    async fn login(&self, user: &str, device: &str) -> (Device, pb::Welcome) {
        let (t, frames) = self.hello(user, device, 1).await;
        match frames.last() {
            Some(Frame::Welcome(w)) => (
                Device {
                    t,
                    delivered: w.start_seq - 1,
                },
                w.clone(),
            ),
            other => panic!("login of {user}/{device} failed: {other:?}"),
        }
    }

    /// Records a cursor as if `device` had been seen `ago` before now.
    fn known_device(&self, user: &str, device: &str, acked_seq: u64, ago: Duration) {
        let cursor = DeviceCursor {
            inbox_epoch: self.epoch(),
            acked_seq,
            last_seen_ms: unix_ms() - ago.as_millis() as u64,
        };
        self.store
            .set_cursors(&[(user.into(), device.into(), cursor)])
            .unwrap();
    }

    fn known(&self, user: &str, device: &str) -> bool {
        self.store.cursor(user, device).unwrap().is_some()
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

async fn next(t: &mut MemoryTransport) -> Option<Frame> {
    let raw = tokio::time::timeout(Duration::from_secs(5), recv(t))
        .await
        .expect("no frame within 5 s")
        .ok()??;
    Some(frame::from_raw(&raw).unwrap())
}

/// Polls `done` every 10 ms for up to 10 s (the commit thread works on its own time).
async fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn send_frame(to: &str, id: u8, body: &str) -> Frame {
    Frame::Send(pb::Send {
        client_msg_id: Bytes::from(vec![id; 16]),
        target: Some(pb::send::Target::User(to.into())),
        body: Bytes::copy_from_slice(body.as_bytes()),
        content_type: "text/plain".into(),
    })
}

/// A logged-in device that ACKs every DELIVER as it reads it.
struct Device {
    t: MemoryTransport,
    /// Highest seq delivered (and ACKed).
    delivered: u64,
}

impl Device {
    /// Sends one message and returns its SEND_ACK. DELIVERs read meanwhile (e.g. the
    /// sender's own copies, which may come before or after the ack) are ACKed.
    async fn send(&mut self, to: &str, id: u8, body: &str) -> pb::SendAck {
        self.t.send(&send_frame(to, id, body)).unwrap();
        flush(&mut self.t).await.unwrap();
        loop {
            match self.read().await {
                Frame::SendAck(a) => return a,
                Frame::Deliver(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    /// Reads until everything up to `seq` was delivered.
    async fn receive_through(&mut self, seq: u64) {
        while self.delivered < seq {
            self.read().await;
        }
    }

    async fn read(&mut self) -> Frame {
        let f = next(&mut self.t).await.expect("closed");
        if let Frame::Deliver(d) = &f {
            let seq = d.entry.as_ref().unwrap().seq;
            self.delivered = self.delivered.max(seq);
            self.t.send(&Frame::Ack(pb::Ack { seq })).unwrap();
            flush(&mut self.t).await.unwrap();
        }
        f
    }
}

fn refused_with(frames: &[Frame]) -> Option<(pb::ErrorCode, String)> {
    match frames.last() {
        Some(Frame::Error(e)) if e.fatal => Some((e.code(), e.reason.clone())),
        _ => None,
    }
}

#[tokio::test]
async fn a_new_device_beyond_the_cap_evicts_the_least_recently_seen_offline_device() {
    let dir = tempfile::tempdir().unwrap();
    let f = start(
        config(dir.path(), |c| c.max_devices = 3),
        open_store(dir.path()).unwrap(),
    );
    let hour = Duration::from_secs(3600);
    f.known_device("bob", "old", 0, 3 * hour);
    f.known_device("bob", "recent", 0, hour);
    // Neither counts: one expired long ago, one from another store epoch.
    f.known_device("bob", "expired", 0, 1000 * 24 * hour);
    f.store
        .set_cursors(&[(
            "bob".into(),
            "other-epoch".into(),
            DeviceCursor {
                inbox_epoch: f.epoch() ^ 1,
                acked_seq: 0,
                last_seen_ms: unix_ms(),
            },
        )])
        .unwrap();
    // Connected, and seen least recently of all by its cursor: still not evicted.
    let (_tablet, _) = f.login("bob", "tablet").await;
    eventually("tablet's login cursor", || f.known("bob", "tablet")).await;
    f.known_device("bob", "tablet", 0, 5 * hour);

    // bob has tablet, old and recent: a fourth device pushes out the oldest offline one.
    let (_laptop, _) = f.login("bob", "laptop").await;
    assert!(
        !f.known("bob", "old"),
        "least recently seen offline device evicted"
    );
    assert!(f.known("bob", "recent") && f.known("bob", "tablet"));
    assert!(f.known("bob", "expired") && f.known("bob", "other-epoch"));
    assert_eq!(f.server.shared().metrics.devices_evicted.get(), 1);

    // laptop counts while connected even if its cursor is not written yet: the next
    // new device makes `recent` go.
    let (_watch, _) = f.login("bob", "watch").await;
    assert!(!f.known("bob", "recent"));
    assert_eq!(f.server.shared().metrics.devices_evicted.get(), 2);

    // A device the server knows logs in at the cap without evicting anything.
    f.known_device("bob", "recent", 0, hour);
    let (_recent, _) = f.login("bob", "recent").await;
    assert_eq!(f.server.shared().metrics.devices_evicted.get(), 2);
    assert_eq!(f.server.shared().registry.connected_devices("bob").len(), 4);
}

#[tokio::test]
async fn a_new_device_is_refused_with_device_limit_when_every_device_is_connected() {
    let dir = tempfile::tempdir().unwrap();
    let f = start(
        config(dir.path(), |c| c.max_devices = 2),
        open_store(dir.path()).unwrap(),
    );
    let (mut phone, _) = f.login("bob", "phone").await;
    let (mut laptop, _) = f.login("bob", "laptop").await;
    // Their cursors are written, so they would be candidates if being connected did
    // not protect them.
    eventually("login cursors", || {
        f.known("bob", "phone") && f.known("bob", "laptop")
    })
    .await;

    let (_t, frames) = f.hello("bob", "tablet", 1).await;
    let (code, reason) = refused_with(&frames).expect("refused");
    assert_eq!(code, pb::ErrorCode::DeviceLimit);
    assert!(reason.contains("at most 2 devices"), "{reason}");
    assert!(!f.known("bob", "tablet"));
    assert_eq!(f.server.shared().metrics.devices_evicted.get(), 0);

    // The connected devices were not disturbed: both still receive.
    let (mut alice, _) = f.login("alice", "phone").await;
    alice.send("bob", 1, "still here?").await;
    phone.receive_through(1).await;
    laptop.receive_through(1).await;

    // A newer login of a device bob already has is not a new device.
    let (_laptop2, frames) = f.hello("bob", "laptop", 2).await;
    assert!(
        matches!(frames.last(), Some(Frame::Welcome(_))),
        "{frames:?}"
    );

    // Once one goes offline, the new device gets in.
    drop(phone);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_t, frames) = f.hello("bob", "tablet", 1).await;
        if matches!(frames.last(), Some(Frame::Welcome(_))) {
            break;
        }
        assert!(Instant::now() < deadline, "still refused: {frames:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_login_records_the_device_before_its_first_ack() {
    let dir = tempfile::tempdir().unwrap();
    let f = start(config(dir.path(), |_| {}), open_store(dir.path()).unwrap());
    let (mut alice, _) = f.login("alice", "phone").await;
    for id in 1..=3 {
        alice.send("bob", id, "m").await;
    }
    let before = unix_ms();
    let (_bob, welcome) = f.login("bob", "phone").await;
    assert_eq!(welcome.start_seq, 1);
    // Without a single ACK, bob's phone holds everything back from acked compaction.
    eventually("bob's login cursor", || f.known("bob", "phone")).await;
    let cursor = f.store.cursor("bob", "phone").unwrap().unwrap();
    assert_eq!(
        (cursor.inbox_epoch, cursor.acked_seq),
        (welcome.inbox_epoch, 0)
    );
    assert!(cursor.last_seen_ms >= before);
}

/// Issue 5, must-show 5: a duplicate SEND arriving after a server restart, and after
/// compaction of unrelated entries (and of its own copies, which every device had), is
/// still recognised.
#[tokio::test]
async fn a_duplicate_send_after_a_restart_and_compaction_gets_the_original_ack() {
    let dir = tempfile::tempdir().unwrap();
    // First run: no compaction.
    let f = start(config(dir.path(), |_| {}), open_store(dir.path()).unwrap());
    let (mut alice, _) = f.login("alice", "phone").await;
    let (mut carol, _) = f.login("carol", "phone").await;
    for id in 1..=3 {
        carol.send("bob", id, "older, unrelated").await;
    }
    carol.receive_through(3).await;
    let x = alice.send("bob", 77, "X").await;
    assert_eq!(x.seq, 1);
    alice.receive_through(1).await;
    let (mut bob, _) = f.login("bob", "phone").await;
    bob.receive_through(4).await;
    // bob's ACK sends delivered receipts: alice's at 2, carol's at 4.
    alice.receive_through(2).await;
    carol.receive_through(4).await;
    // Every device has everything once its cursor is written.
    for (user, acked) in [("alice", 2), ("bob", 4), ("carol", 4)] {
        eventually("cursors", || {
            f.store
                .cursor(user, "phone")
                .unwrap()
                .is_some_and(|c| c.acked_seq == acked)
        })
        .await;
    }

    // Restart: stop the server and reopen the store from its directory.
    f.server.shutdown().await;
    drop((alice, bob, carol));
    let Fixture { server, store } = f;
    drop((server, store));
    let deadline = Instant::now() + Duration::from_secs(10);
    let reopened = loop {
        match open_store(dir.path()) {
            Ok(store) => break store,
            Err(StoreError::Locked(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reopening the store: {e}"),
        }
    };
    let f = start(
        config(dir.path(), |c| {
            c.compact_interval = Duration::from_millis(50)
        }),
        reopened,
    );

    // Compaction removes carol's messages and X, in every inbox: all were acked.
    eventually("acked compaction", || {
        ["alice", "bob", "carol"].iter().all(|user| {
            let info = f.store.inbox_info(user).unwrap();
            info.low == info.head + 1
        })
    })
    .await;
    let heads: Vec<u64> = ["alice", "bob"]
        .iter()
        .map(|user| f.store.inbox_info(user).unwrap().head)
        .collect();
    assert_eq!(heads, vec![2, 4]);

    // The resend of X is recognised: the original ack, and nothing new in any inbox.
    let (mut alice, _) = f.login("alice", "phone").await;
    let again = alice.send("bob", 77, "X").await;
    assert_eq!(
        (again.message_id, again.seq, again.ts_ms),
        (x.message_id, x.seq, x.ts_ms)
    );
    for (user, head) in [("alice", 2), ("bob", 4)] {
        let info = f.store.inbox_info(user).unwrap();
        assert_eq!((info.head, info.low), (head, head + 1), "{user}");
    }
    // A new message still gets the next seq: the resend was not taken for it (the two
    // delivered receipts took the message ids after X).
    let y = alice.send("bob", 78, "Y").await;
    assert_eq!((y.seq, y.message_id), (3, x.message_id + 3));
}
