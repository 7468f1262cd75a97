//! Issue 5, must-show 5, across a real process restart: a duplicate SEND after SIGKILL,
//! a restart and acked compaction still gets its original SEND_ACK.

mod common;

use common::{RawClient, ServerProc, id};
use std::time::{Duration, Instant};
use tether_proto::{Frame, pb};

/// Reads frames until the DELIVER of `seq`, ACKing every DELIVER.
fn receive_through(c: &mut RawClient, seq: u64) {
    loop {
        if let Frame::Deliver(d) = c.read() {
            let got = d.entry.unwrap().seq;
            c.send(&Frame::Ack(pb::Ack { seq: got }));
            if got >= seq {
                return;
            }
        }
    }
}

/// Logs `device` in again (newer device epochs, no resume point) until the server's
/// cursor for it says it has everything up to `acked`. Returns the last epoch used.
fn wait_for_cursor(server: &ServerProc, token: &str, device: &str, acked: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    for epoch in 2.. {
        let (_c, welcome) = RawClient::login(server.addr, token, device, epoch);
        if welcome.start_seq == acked + 1 {
            return epoch;
        }
        assert!(
            Instant::now() < deadline,
            "cursor of {device} not at {acked} (welcome: {welcome:?}); log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    unreachable!()
}

/// The `acked_entries` of the server's latest compaction log line, if any ran.
fn last_acked_compaction(log: &str) -> Option<u64> {
    let line = log.lines().rev().find(|l| l.contains("acked_entries: "))?;
    let rest = &line[line.find("acked_entries: ")? + "acked_entries: ".len()..];
    rest[..rest.find(|c: char| !c.is_ascii_digit())?]
        .parse()
        .ok()
}

#[test]
fn a_duplicate_send_after_sigkill_restart_and_acked_compaction_gets_the_original_ack() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ServerProc::start(&data, &[]);
    let (alice_token, bob_token) = (server.token("alice"), server.token("bob"));

    let (mut alice, _) = RawClient::login(server.addr, &alice_token, "phone", 1);
    for n in 0..3 {
        alice.send_text("bob", id(n), "older");
    }
    let x = alice.send_text("bob", id(77), "X");
    assert_eq!(x.seq, 4);
    // alice's phone gets its own copies; bob's phone gets everything.
    receive_through(&mut alice, 4);
    let (mut bob, _) = RawClient::login(server.addr, &bob_token, "phone", 1);
    receive_through(&mut bob, 4);
    // Cursors are written within 200 ms, and made durable by the next commit.
    drop((alice, bob));
    let epoch = wait_for_cursor(&server, &alice_token, "phone", 4);
    wait_for_cursor(&server, &bob_token, "phone", 4);
    let (mut alice, _) = RawClient::login(server.addr, &alice_token, "phone", epoch + 1);
    alice.send_text("carol", id(500), "makes the cursors durable");
    server.kill9();

    let server = ServerProc::start(&data, &["--compact-interval-secs", "1"]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while last_acked_compaction(&server.log()) != Some(8) {
        assert!(
            Instant::now() < deadline,
            "no compaction of the 8 acked entries (4 in bob's inbox, 4 in alice's); log:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let (mut alice, _) = RawClient::login(server.addr, &alice_token, "phone", epoch + 2);
    let again = alice.send_text("bob", id(77), "X");
    assert_eq!(
        (again.message_id, again.seq, again.ts_ms),
        (x.message_id, x.seq, x.ts_ms)
    );
    // Nothing new in bob's inbox: same head, and everything in it was compacted.
    let (_bob, welcome) = RawClient::login(server.addr, &bob_token, "phone", 99);
    assert_eq!((welcome.head, welcome.start_seq), (4, 5));
}
