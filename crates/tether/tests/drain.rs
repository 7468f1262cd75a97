//! Drain (DESIGN §4): on SIGTERM the server sends GOAWAY with a randomised reconnect
//! delay over its drain window, flushes and exits; SDK clients come back to the
//! restarted server spread over that window, not in one stampede, and messages sent
//! across the drain arrive once each, in order. Real processes.

mod common;

use common::{ServerProc, free_addr};
use std::time::{Duration, Instant};
use tether_client::{Client, ClientConfig, ClientEvent};

const CLIENTS: usize = 200;
/// Recipients of the traffic that flows across the drain.
const RECIPIENTS: usize = 10;
/// Long against the ~1.5 s it takes to restart the (debug) server here: clients whose
/// delay ends before it is back bunch up when it returns.
const WINDOW: Duration = Duration::from_millis(8000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drained_clients_come_back_spread_over_the_window() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let addr = free_addr().to_string();
    let flags = ["--listen", addr.as_str(), "--drain-window-ms", "8000"];
    let server = ServerProc::start(&data, &flags);

    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut cfg = ClientConfig::new(&addr, server.token(&format!("u{i}")), "phone");
        cfg.backoff_base = Duration::from_millis(100);
        cfg.backoff_cap = Duration::from_millis(500);
        let client = Client::start(cfg).unwrap();
        client
            .wait_connected(Duration::from_secs(10))
            .await
            .unwrap();
        let events = client.events();
        clients.push((client, events));
    }
    // Consume each client's first Connected event.
    for (_, events) in &mut clients {
        loop {
            match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
                Ok(Ok(ClientEvent::Connected(_))) => break,
                Ok(Ok(_)) => {}
                other => panic!("no first connection: {other:?}"),
            }
        }
    }

    // Traffic across the drain: a sender writes to u0..u9 round robin every 20 ms.
    let sender = Client::start(ClientConfig::new(&addr, server.token("sender"), "s")).unwrap();
    sender
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    let handle = sender.handle();
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let drained = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let drain_seen = drained.clone();
    let traffic = tokio::spawn(async move {
        let mut sent: Vec<Vec<String>> = vec![Vec::new(); RECIPIENTS];
        let (mut n, mut before, mut after) = (0usize, 0usize, 0usize);
        loop {
            if stop_rx.try_recv().is_ok() {
                return (sent, before, after);
            }
            let to = n % RECIPIENTS;
            let text = format!("m{n}");
            handle
                .send(&format!("u{to}"), text.clone().into())
                .await
                .expect("send confirmed eventually");
            sent[to].push(text);
            if drain_seen.load(std::sync::atomic::Ordering::Acquire) {
                after += 1;
            } else {
                before += 1;
            }
            n += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;

    // One watcher per client, so each reconnect is timed when it happens.
    let t0 = Instant::now();
    let watchers: Vec<_> = clients
        .iter_mut()
        .map(|(_, events)| {
            let mut events = events.resubscribe();
            tokio::spawn(async move {
                let mut went_away = false;
                loop {
                    match tokio::time::timeout(Duration::from_secs(20), events.recv()).await {
                        Ok(Ok(ClientEvent::Connected(_))) => return (t0.elapsed(), went_away),
                        Ok(Ok(ClientEvent::Disconnected { reason, .. })) => {
                            went_away |= format!("{reason:?}").contains("GoingAway");
                        }
                        Ok(Ok(_)) => {}
                        other => panic!("client not back: {other:?}"),
                    }
                }
            })
        })
        .collect();
    drained.store(true, std::sync::atomic::Ordering::Release);
    let status = tokio::task::spawn_blocking(move || server.terminate())
        .await
        .unwrap();
    assert!(status.success(), "drained and exited cleanly: {status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "drain took {:?}",
        t0.elapsed()
    );
    let server = ServerProc::start(&data, &flags);

    let mut back = Vec::new();
    let mut went_away = 0;
    for w in watchers {
        let (at, away) = w.await.unwrap();
        back.push(at);
        went_away += usize::from(away);
    }
    assert_eq!(went_away, CLIENTS, "every client was told GOAWAY");
    back.sort();
    // Reconnects per second after SIGTERM.
    let mut histogram = vec![0usize; 12];
    for t in &back {
        histogram[(t.as_secs() as usize).min(11)] += 1;
    }
    println!("reconnects per second after SIGTERM: {histogram:?}");
    let (first, last) = (back[0], back[CLIENTS - 1]);
    // The window, plus the backoff cap, plus slack.
    assert!(
        last <= WINDOW + Duration::from_millis(500) + Duration::from_secs(2),
        "last back at {last:?}"
    );
    assert!(
        last - first >= WINDOW / 2,
        "spread over the window: {first:?}..{last:?}"
    );
    assert!(
        histogram.iter().all(|&n| n <= CLIENTS / 2),
        "no stampede into one second: {histogram:?}"
    );
    // Stop the traffic; every message reaches its recipient once, in order.
    let _ = stop_tx.send(());
    let (sent, before, after) = traffic.await.unwrap();
    assert!(
        before > 0 && after > 0,
        "traffic flowed across the drain: {before} sends before it, {after} after"
    );
    for (i, want) in sent.iter().enumerate() {
        let client = &mut clients[i].0;
        let mut got = Vec::new();
        while got.len() < want.len() {
            let entry = tokio::time::timeout(Duration::from_secs(10), client.recv())
                .await
                .unwrap_or_else(|_| panic!("u{i} got {} of {}", got.len(), want.len()))
                .unwrap();
            client.ack(entry.seq);
            got.push(String::from_utf8_lossy(&entry.body).into_owned());
        }
        assert_eq!(&got, want, "u{i}: once each, in order");
        let extra = tokio::time::timeout(Duration::from_millis(200), client.recv()).await;
        assert!(extra.is_err(), "u{i}: nothing twice");
    }
    drop(server);
}
