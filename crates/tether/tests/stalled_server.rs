//! A stalled server (SIGSTOP: its kernel still ACKs, its application is dead): the SDK
//! reports *server unresponsive* (from TCP_INFO) within the heartbeat bounds and moves
//! to the next server in its list; after SIGCONT the first server serves again.

mod common;

use common::{RawClient, ServerProc};
use std::time::{Duration, Instant};
use tether_client::{Client, ClientConfig, ClientEvent, DisconnectReason};

/// I = 1 s, P = 0.5 s, m = 2 (the SDK's): dead at last_rx + 2 s.
const I: Duration = Duration::from_millis(1000);
const DEAD_AFTER: Duration = Duration::from_millis(2000);
const MARGIN: Duration = Duration::from_millis(1000);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_server_is_diagnosed_and_the_client_fails_over() {
    let dir = tempfile::tempdir().unwrap();
    let flags = ["--heartbeat-min-ms", "500", "--pong-timeout-ms", "500"];
    let a = ServerProc::start(&dir.path().join("a"), &flags);
    let b = ServerProc::start(&dir.path().join("b"), &flags);
    // One secret for both, so one token works on either.
    std::fs::copy(
        dir.path().join("a").join("jwt-secret"),
        dir.path().join("b").join("jwt-secret"),
    )
    .unwrap();
    drop(b);
    let b = ServerProc::start(&dir.path().join("b"), &flags);

    let mut cfg = ClientConfig::new(a.addr.to_string(), a.token("erin"), "phone");
    cfg.servers.push(b.addr.to_string());
    cfg.heartbeat_interval = I;
    cfg.pong_timeout = Duration::from_millis(500);
    cfg.backoff_base = Duration::from_millis(50);
    cfg.backoff_cap = Duration::from_millis(200);
    let client = Client::start(cfg).unwrap();
    let first = client
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(first.server, a.addr.to_string());
    let mut events = client.events();
    // Let a few heartbeats pass, then freeze the server.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    while events.try_recv().is_ok() {}
    let stopped = Instant::now();
    common::signal(a.pid(), "STOP");

    let (diagnosed_after, reason) = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Ok(ClientEvent::Disconnected { reason, .. })) => break (stopped.elapsed(), reason),
            Ok(Ok(_)) => {}
            other => panic!("no disconnect: {other:?}"),
        }
    };
    assert_eq!(reason, DisconnectReason::ServerUnresponsive);
    // The last frame came at most I before the stop (a PONG), so the verdict falls in
    // [stop + I, stop + 2 s] plus scheduling margin; never before I.
    assert!(
        diagnosed_after >= DEAD_AFTER - I - Duration::from_millis(50),
        "diagnosed {diagnosed_after:?} after the stop: too early"
    );
    assert!(
        diagnosed_after <= DEAD_AFTER + MARGIN,
        "diagnosed {diagnosed_after:?} after the stop: too late"
    );
    let moved = loop {
        match tokio::time::timeout(Duration::from_secs(10), events.recv()).await {
            Ok(Ok(ClientEvent::Connected(info))) => break info,
            Ok(Ok(_)) => {}
            other => panic!("not reconnected: {other:?}"),
        }
    };
    assert_eq!(
        moved.server,
        b.addr.to_string(),
        "failed over to the next server"
    );

    common::signal(a.pid(), "CONT");
    let token = a.token("frank");
    let addr = a.addr;
    let welcome = tokio::task::spawn_blocking(move || RawClient::login(addr, &token, "d", 1).1)
        .await
        .unwrap();
    assert!(welcome.inbox_epoch != 0, "the first server serves again");
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_changed_reconnects_at_once_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    let mut cfg = ClientConfig::new(server.addr.to_string(), server.token("gina"), "phone");
    // A long backoff: only an immediate attempt can be back quickly.
    cfg.backoff_base = Duration::from_secs(5);
    cfg.backoff_cap = Duration::from_secs(30);
    let client = Client::start(cfg).unwrap();
    client
        .wait_connected(Duration::from_secs(10))
        .await
        .unwrap();
    let mut events = client.events();
    while events.try_recv().is_ok() {}
    let changed = Instant::now();
    client.network_changed().await;
    loop {
        match tokio::time::timeout(Duration::from_secs(5), events.recv()).await {
            Ok(Ok(ClientEvent::Connected(_))) => break,
            Ok(Ok(_)) => {}
            other => panic!("not back: {other:?}"),
        }
    }
    assert!(
        changed.elapsed() < Duration::from_secs(2),
        "back after {:?}",
        changed.elapsed()
    );
    client.close().await;
}
