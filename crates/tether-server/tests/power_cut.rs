//! DESIGN §9 through the whole server: senders pipeline SENDs over the in-memory
//! transport into a server whose store sits on a simulated disk; at random instants
//! the power is "cut" (every byte not covered by a sync is dropped, or a random part
//! of it torn in). Every SEND_ACK and every DELIVER a client saw before the cut must be
//! in the image the server restarts from.

use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tether_proto::{Frame, frame, pb};
use tether_server::{Server, ServerConfig};
use tether_store::{
    Action, AppendOutcome, AppendRequest, Durability, EmbeddedStore, InboxTarget, SimulatedDisk,
    Store,
};
use tether_transport::{Transport, flush, recv};

#[derive(Default)]
struct Seen {
    /// (sender, client msg id) → (message id, sender seq, body), from SEND_ACKs.
    acked: HashMap<(String, [u8; 16]), (u64, u64, Bytes)>,
    /// bob's seq → body, from DELIVERs.
    delivered: HashMap<u64, Bytes>,
}

async fn login(server: &Server, user: &str) -> tether_transport::memory::MemoryTransport {
    let mut t = server.connect_memory();
    let token = server.shared().auth.mint(user, Duration::from_secs(600));
    t.send(&Frame::Hello(pb::Hello {
        version: 1,
        token,
        device_id: "d".into(),
        device_epoch: 1,
        ..Default::default()
    }))
    .unwrap();
    flush(&mut t).await.unwrap();
    loop {
        let raw = recv(&mut t).await.unwrap().unwrap();
        if let Frame::Welcome(_) = frame::from_raw(&raw).unwrap() {
            return t;
        }
    }
}

async fn one_round(seed: u64, torn: bool) -> (usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let disk = SimulatedDisk::new();
    let store = EmbeddedStore::open_with_backend(disk.clone(), Durability::Fsync).unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        http: None,
        ..ServerConfig::default()
    };
    let server = Server::with_store(cfg, Arc::new(store)).unwrap();
    let seen = Arc::new(Mutex::new(Seen::default()));

    let mut tasks = Vec::new();
    for s in 0..3u8 {
        let mut t = login(&server, &format!("sender{s}")).await;
        let seen = seen.clone();
        tasks.push(tokio::spawn(async move {
            let mut bodies = HashMap::new();
            for n in 0..400u32 {
                let mut id = [s; 16];
                id[..4].copy_from_slice(&n.to_le_bytes());
                let body = Bytes::from(format!("s{s} m{n}"));
                bodies.insert(id, body.clone());
                let f = Frame::Send(pb::Send {
                    client_msg_id: Bytes::copy_from_slice(&id),
                    target: Some(pb::send::Target::User("bob".into())),
                    body,
                    content_type: String::new(),
                });
                if t.send(&f).is_err() || flush(&mut t).await.is_err() {
                    return;
                }
                // Keep a few sends in flight; record acks as they come.
                while let Ok(Ok(Some(raw))) =
                    tokio::time::timeout(Duration::from_micros(50), recv(&mut t)).await
                {
                    if let Ok(Frame::SendAck(a)) = frame::from_raw(&raw) {
                        let id: [u8; 16] = a.client_msg_id[..].try_into().unwrap();
                        let body = bodies[&id].clone();
                        seen.lock()
                            .acked
                            .insert((format!("sender{s}"), id), (a.message_id, a.seq, body));
                    }
                }
            }
        }));
    }
    let mut bob = login(&server, "bob").await;
    let seen_bob = seen.clone();
    tasks.push(tokio::spawn(async move {
        while let Ok(Some(raw)) = recv(&mut bob).await {
            if let Ok(Frame::Deliver(d)) = frame::from_raw(&raw) {
                let e = d.entry.unwrap();
                seen_bob.lock().delivered.insert(e.seq, e.body.clone());
                let _ = bob.send(&Frame::Ack(pb::Ack { seq: e.seq }));
                let _ = flush(&mut bob).await;
            }
        }
    }));

    // Cut at a pseudo-random instant while traffic flows.
    tokio::time::sleep(Duration::from_millis(30 + (seed * 37) % 150)).await;
    // What clients saw *before* the cut must be durable: copy it first, then cut.
    let (acked, delivered) = {
        let s = seen.lock();
        (s.acked.clone(), s.delivered.clone())
    };
    let image = if torn {
        disk.power_cut_torn(seed)
    } else {
        disk.power_cut()
    };
    for t in &tasks {
        t.abort();
    }

    let store = EmbeddedStore::open_with_backend(image, Durability::Fsync).unwrap();
    let head = store.inbox_info("bob").unwrap().head;
    let inbox: HashMap<u64, Bytes> = store
        .read_range("bob", 1, head, head as usize)
        .unwrap()
        .into_iter()
        .map(|e| (e.seq, e.body))
        .collect();
    for (seq, body) in &delivered {
        assert_eq!(
            inbox.get(seq),
            Some(body),
            "delivered seq {seq} lost (seed {seed})"
        );
    }
    for ((sender, id), (message_id, sender_seq, body)) in &acked {
        let again = AppendRequest {
            sender: sender.clone(),
            sender_device: "d".into(),
            client_msg_id: *id,
            action: Action::Message(vec![
                InboxTarget {
                    user: "bob".into(),
                    conversation: sender.clone(),
                },
                InboxTarget {
                    user: sender.clone(),
                    conversation: "bob".into(),
                },
            ]),
            body: body.clone(),
            content_type: String::new(),
            ts_ms: 0,
        };
        match &store.append(&[again]).unwrap()[0] {
            AppendOutcome::Duplicate(ack) => {
                assert_eq!(
                    (ack.message_id, ack.sender_seq),
                    (*message_id, *sender_seq),
                    "seed {seed}"
                );
            }
            AppendOutcome::New { .. } => {
                panic!("acknowledged send {id:?} of {sender} lost (seed {seed})")
            }
            other => panic!("a resend was answered {other:?} (seed {seed})"),
        }
        assert!(
            inbox.values().any(|b| b == body),
            "body of an acknowledged send missing (seed {seed})"
        );
    }
    server.shutdown().await;
    (acked.len(), delivered.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_or_delivered_message_survives_a_power_cut() {
    let mut total = (0, 0);
    for seed in 0..8 {
        let (a, d) = one_round(seed, seed % 2 == 1).await;
        total.0 += a;
        total.1 += d;
    }
    // The cuts must have landed while traffic flowed, or this proved nothing.
    assert!(
        total.0 > 200 && total.1 > 100,
        "acked {} delivered {}",
        total.0,
        total.1
    );
}
