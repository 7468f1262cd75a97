//! Issue 2's "must show", end to end: a real `tether serve` process on loopback, the
//! `tether` CLI as users run it, and a raw protocol client where a test needs to
//! pipeline or to control client message ids.

mod common;

use common::{RawClient, ServerProc, cli_recv, cli_send, id, json_lines, tether, wait_output};
use std::collections::HashSet;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

fn texts(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["text"].as_str().unwrap().to_string())
        .collect()
}

fn seqs(lines: &[serde_json::Value]) -> Vec<u64> {
    lines.iter().map(|l| l["seq"].as_u64().unwrap()).collect()
}

/// Asserts the seqs are exactly `from..from+n`, in order.
fn assert_gap_free(lines: &[serde_json::Value], from: u64) {
    let got = seqs(lines);
    let want: Vec<u64> = (from..from + got.len() as u64).collect();
    assert_eq!(got, want, "seqs must be one gap-free increasing run");
}

#[test]
fn offline_bob_receives_exactly_alices_100_in_order_and_alices_other_device_sees_them() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("clients");
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    let mut sent_seqs = Vec::new();
    for i in 0..100 {
        let ack = cli_send(
            &server,
            "alice",
            "cli",
            &state,
            "bob",
            &format!("hello bob #{i}"),
        );
        assert!(ack["id"].as_u64().unwrap() > 0);
        sent_seqs.push(ack["seq"].as_u64().unwrap());
    }
    assert!(
        sent_seqs.windows(2).all(|w| w[0] < w[1]),
        "sender seqs increase"
    );

    let out = cli_recv(&server, "bob", "cli", &state, 100, 20);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 100);
    assert_gap_free(&lines, 1);
    let want: Vec<String> = (0..100).map(|i| format!("hello bob #{i}")).collect();
    assert_eq!(
        texts(&lines),
        want,
        "exactly those 100, in order, each once"
    );
    for l in &lines {
        assert_eq!(l["from"], "alice");
        assert!(l["id"].as_u64().unwrap() > 0 && l["ts"].as_u64().unwrap() > 0);
    }

    // Nothing more for bob's device: its state moved past all 100.
    let again = cli_recv(&server, "bob", "cli", &state, 1, 2);
    assert!(
        !again.status.success(),
        "no 101st message, so recv times out"
    );
    assert!(json_lines(&again).is_empty());

    // alice's second device sees her 100 sent messages.
    let out = cli_recv(&server, "alice", "phone", &state, 100, 20);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(texts(&lines), want);
    assert!(
        lines
            .iter()
            .all(|l| l["from"] == "alice" && l["conversation"] == "bob")
    );
    assert_eq!(
        seqs(&lines),
        sent_seqs,
        "her copies carry the seqs her SEND_ACKs announced"
    );
}

#[test]
fn acknowledged_messages_survive_sigkill_and_restart() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let state = dir.path().join("clients");
    let server = ServerProc::start(&data, &[]);
    for i in 0..20 {
        cli_send(
            &server,
            "alice",
            "cli",
            &state,
            "bob",
            &format!("before kill {i}"),
        );
    }
    // And a pipelined burst from a raw client, killed mid-stream: everything it saw
    // acknowledged must be there after the restart.
    let (mut raw, _) = RawClient::login(server.addr, &server.token("carol"), "d", 1);
    let ids: Vec<[u8; 16]> = (0..3000).map(id).collect();
    let acks = raw.send_many("bob", &ids[..2000], |i| format!("burst {i}"), 200);
    // More in flight, unacknowledged, as the server dies.
    let mut unacked = Vec::new();
    for (i, cmid) in ids[2000..].iter().enumerate() {
        tether_proto::frame::encode_to(
            &common::send_frame("bob", *cmid, &format!("burst {}", 2000 + i)),
            &mut unacked,
        );
    }
    raw.write_raw(&unacked);
    server.kill9();

    let server = ServerProc::start(&data, &[]);
    let out = cli_recv(&server, "bob", "cli", &state, 2020, 60);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_gap_free(&lines, 1);
    let got: HashSet<String> = texts(&lines).into_iter().collect();
    for i in 0..20 {
        assert!(got.contains(&format!("before kill {i}")));
    }
    for (i, _) in acks.iter().enumerate() {
        assert!(
            got.contains(&format!("burst {i}")),
            "acknowledged burst {i} lost"
        );
    }
}

#[test]
fn two_devices_each_get_everything_and_resume_from_their_own_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("clients");
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    for i in 0..10 {
        cli_send(
            &server,
            "alice",
            "cli",
            &state,
            "bob",
            &format!("first {i}"),
        );
    }
    let laptop = json_lines(&cli_recv(&server, "bob", "laptop", &state, 10, 20));
    let phone = json_lines(&cli_recv(&server, "bob", "phone", &state, 10, 20));
    assert_eq!(texts(&laptop), texts(&phone));
    assert_eq!(laptop.len(), 10);

    for i in 0..5 {
        cli_send(
            &server,
            "alice",
            "cli",
            &state,
            "bob",
            &format!("second {i}"),
        );
    }
    // The laptop reads 3 of the 5 and stops; the phone reads all 5.
    let laptop = json_lines(&cli_recv(&server, "bob", "laptop", &state, 3, 20));
    assert_eq!(seqs(&laptop), vec![11, 12, 13]);
    let phone = json_lines(&cli_recv(&server, "bob", "phone", &state, 5, 20));
    assert_eq!(seqs(&phone), vec![11, 12, 13, 14, 15]);
    let laptop = json_lines(&cli_recv(&server, "bob", "laptop", &state, 2, 20));
    assert_eq!(
        seqs(&laptop),
        vec![14, 15],
        "the laptop resumes from its own cursor"
    );
}

#[test]
fn a_resent_client_msg_id_is_stored_once_and_answered_with_the_original_ack() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    let (mut alice, _) = RawClient::login(server.addr, &server.token("alice"), "laptop", 1);
    let first = alice.send_text("bob", id(42), "only once");
    let mut second = alice.send_text("bob", id(42), "only once");
    assert!(!first.duplicate && second.duplicate);
    second.duplicate = false;
    assert_eq!(
        first, second,
        "the original SEND_ACK, message id and seq included"
    );
    // Also across a reconnect.
    drop(alice);
    let (mut alice, _) = RawClient::login(server.addr, &server.token("alice"), "laptop", 2);
    let third = alice.send_text("bob", id(42), "only once");
    assert!(third.duplicate);
    assert_eq!(
        (third.message_id, third.seq, third.ts_ms),
        (first.message_id, first.seq, first.ts_ms)
    );
    let (_bob, welcome) = RawClient::login(server.addr, &server.token("bob"), "phone", 1);
    assert_eq!(welcome.head, 1, "stored once");
}

fn outbox_len(state_file: &Path) -> usize {
    std::fs::read_to_string(state_file)
        .ok()
        .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
        .and_then(|v| v["outbox"].as_array().map(Vec::len))
        .unwrap_or(0)
}

#[test]
fn a_client_killed_before_its_send_ack_resends_from_its_state_file() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let state = dir.path().join("clients");
    let server = ServerProc::start(&data, &[]);
    let pid = server.pid();
    // Freeze the server: the send reaches its socket but is never committed.
    common::signal(pid, "STOP");
    let mut args: Vec<String> = vec!["send".into(), "--to".into(), "bob".into()];
    args.extend(common::cli_auth(&server, "alice", "cli", &state));
    args.push("written before the crash".into());
    let mut child = tether()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let state_file = state.join("alice@cli.json");
    let deadline = Instant::now() + Duration::from_secs(10);
    while outbox_len(&state_file) == 0 {
        assert!(
            Instant::now() < deadline,
            "the send never reached the state file's outbox"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    assert!(json_lines(&out).is_empty(), "no SEND_ACK was printed");
    // The server dies without ever committing it.
    common::signal(pid, "CONT");
    server.kill9();

    let server = ServerProc::start(&data, &[]);
    let ack = cli_send(
        &server,
        "alice",
        "cli",
        &state,
        "bob",
        "written after the restart",
    );
    assert_eq!(outbox_len(&state_file), 0, "outbox drained");
    assert_eq!(
        ack["seq"].as_u64(),
        Some(2),
        "the resent one took seq 1 first"
    );
    let lines = json_lines(&cli_recv(&server, "bob", "cli", &state, 2, 20));
    assert_eq!(
        texts(&lines),
        vec!["written before the crash", "written after the restart"],
        "resent first, in order, each once"
    );
    let more = cli_recv(&server, "bob", "cli", &state, 1, 2);
    assert!(json_lines(&more).is_empty(), "no duplicate");
}

#[test]
fn a_device_replaying_10000_while_new_messages_arrive_sees_one_gap_free_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("clients");
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    let (mut alice, _) = RawClient::login(server.addr, &server.token("alice"), "laptop", 1);
    let ids: Vec<[u8; 16]> = (0..12_000).map(id).collect();
    alice.send_many("bob", &ids[..10_000], |i| format!("m{i}"), 500);

    let mut args: Vec<String> = vec![
        "recv".into(),
        "--count".into(),
        "12000".into(),
        "--timeout".into(),
        "120".into(),
    ];
    args.extend(common::cli_auth(&server, "bob", "cli", &state));
    let recv = tether()
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // New messages while the backlog replays.
    alice.send_many("bob", &ids[10_000..], |i| format!("m{}", 10_000 + i), 50);
    let out = wait_output(recv, Duration::from_secs(150));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 12_000);
    assert_gap_free(&lines, 1);
    let want: Vec<String> = (0..12_000).map(|i| format!("m{i}")).collect();
    assert_eq!(texts(&lines), want);
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body
}

fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{text}"))
}

#[test]
fn metrics_endpoint_counts_connections_logins_commits_and_deliveries() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("clients");
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    for i in 0..3 {
        cli_send(&server, "alice", "cli", &state, "bob", &format!("m{i}"));
    }
    assert_eq!(
        json_lines(&cli_recv(&server, "bob", "cli", &state, 3, 20)).len(),
        3
    );
    let text = http_get(server.http, "/metrics");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(metric(&text, "tether_messages_committed_total"), 3.0);
    assert!(metric(&text, "tether_messages_delivered_total") >= 3.0);
    assert!(metric(&text, "tether_logins_total") >= 4.0);
    assert!(metric(&text, "tether_connections_accepted_total") >= 4.0);
    assert_eq!(metric(&text, "tether_commit_latency_seconds_count"), 3.0);
    assert!(http_get(server.http, "/healthz").ends_with("ok\n"));
}

#[test]
fn chat_sends_typed_lines_and_shows_incoming_messages() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("clients");
    let server = ServerProc::start(&dir.path().join("data"), &[]);
    let mut args: Vec<String> = vec!["chat".into(), "--to".into(), "bob".into()];
    args.extend(common::cli_auth(&server, "alice", "chat", &state));
    let mut chat = tether()
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = chat.stdin.take().unwrap();
    writeln!(stdin, "hi bob, typed in chat").unwrap();
    // bob sees it, and answers.
    let lines = json_lines(&cli_recv(&server, "bob", "cli", &state, 1, 20));
    assert_eq!(texts(&lines), vec!["hi bob, typed in chat"]);
    cli_send(&server, "bob", "cli", &state, "alice", "hello alice");
    // Give the chat a moment to show it, then end it with Ctrl-D (EOF).
    std::thread::sleep(Duration::from_millis(500));
    drop(stdin);
    let out = wait_output(chat, Duration::from_secs(20));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("me: hi bob, typed in chat"), "{stdout}");
    assert!(stdout.contains("bob: hello alice"), "{stdout}");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn connections_on_different_connection_threads_deliver_to_each_other_in_order() {
    // `--per-core-runtimes --workers 4`: four connection threads, connections dealt
    // out in turn. Receiver
    // i is the i-th connection (thread i % 4), its sender the (6+i)-th (thread
    // (i+2) % 4), so every message crosses from one thread's runtime to another's.
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(
        &dir.path().join("data"),
        &["--per-core-runtimes", "--workers", "4"],
    );
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", server.pid()))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("tether-conn-"))
        .collect();
    assert_eq!(
        threads.len(),
        4,
        "one runtime thread per worker: {threads:?}"
    );

    let mut receivers: Vec<RawClient> = (0..6)
        .map(|i| RawClient::login(server.addr, &server.token(&format!("u{i}")), "rx", 1).0)
        .collect();
    let mut senders: Vec<RawClient> = (0..6)
        .map(|i| RawClient::login(server.addr, &server.token(&format!("s{i}")), "tx", 1).0)
        .collect();
    for (i, s) in senders.iter_mut().enumerate() {
        let ids: Vec<[u8; 16]> = (0..50).map(|n| id(1000 * i as u64 + n)).collect();
        let acks = s.send_many(&format!("u{i}"), &ids, |n| format!("{i}:{n}"), 16);
        assert_eq!(acks.len(), 50);
    }
    for (i, r) in receivers.iter_mut().enumerate() {
        let mut got = Vec::new();
        while got.len() < 50 {
            if let tether_proto::Frame::Deliver(d) = r.read() {
                let e = d.entry.unwrap();
                r.send(&tether_proto::Frame::Ack(tether_proto::pb::Ack {
                    seq: e.seq,
                }));
                assert_eq!(e.from, format!("s{i}"));
                got.push(String::from_utf8(e.body.to_vec()).unwrap());
            }
        }
        let want: Vec<String> = (0..50).map(|n| format!("{i}:{n}")).collect();
        assert_eq!(got, want, "receiver {i}: each once, in order");
    }
}
