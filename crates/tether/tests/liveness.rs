//! Server liveness deadlines on a real server process: a session that stays silent is
//! closed no earlier than `I + m·P + grace` after its last frame and no later than that
//! plus the sweep period and a margin; one that pings stays. Run serially.

mod common;

use common::{RawClient, ServerProc};
use std::io::Read;
use std::time::{Duration, Instant};
use tether_proto::{Frame, pb};

/// I = 1 s (requested and accepted), P = 0.5 s, m = 1, grace = 0.25 s: deadline 1.75 s.
const FLAGS: &[&str] = &[
    "--heartbeat-min-ms",
    "500",
    "--pong-timeout-ms",
    "500",
    "--max-misses",
    "1",
    "--deadline-grace-ms",
    "250",
];
const DEADLINE: Duration = Duration::from_millis(1750);
/// Sweep period (250 ms) plus scheduling slack on a loaded 2-core machine.
const MARGIN: Duration = Duration::from_millis(1000);

fn login(server: &ServerProc, user: &str, interval_ms: u32) -> (RawClient, Instant) {
    let sent = Instant::now();
    let (c, w) = RawClient::login_with(server.addr, &server.token(user), "d", 1, interval_ms);
    assert_eq!(
        w.heartbeat.unwrap().interval_ms,
        interval_ms,
        "accepted as asked"
    );
    (c, sent)
}

fn metric(server: &ServerProc, name: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(server.http).unwrap();
    std::io::Write::write_all(
        &mut s,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing"))
}

#[test]
fn a_silent_session_is_closed_within_its_deadline_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(&dir.path().join("data"), FLAGS);
    let (mut silent, hello_sent) = login(&server, "carol", 1000);
    let closed = silent.read_until_closed();
    let after = hello_sent.elapsed();
    assert!(
        after >= DEADLINE,
        "closed after {after:?}, before the deadline {DEADLINE:?}"
    );
    assert!(
        after <= DEADLINE + MARGIN,
        "closed after {after:?}, too late"
    );
    assert!(
        matches!(closed.last(), Some(Frame::Error(e)) if e.code == pb::ErrorCode::IdleTimeout as i32 && e.fatal),
        "{closed:?}"
    );
    assert_eq!(metric(&server, "tether_sessions_expired_total"), 1.0);
    assert_eq!(
        metric(&server, "tether_connections_open"),
        0.0,
        "presence gone"
    );
    assert!(
        server.wait_log("liveness deadline passed", Duration::from_secs(5)),
        "logged with its reason"
    );
}

#[test]
fn a_session_that_pings_stays_and_a_longer_interval_moves_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProc::start(&dir.path().join("data"), FLAGS);
    let (mut c, _) = login(&server, "dave", 1000);
    // Four seconds of PINGs every 900 ms: well past one deadline, never closed.
    for _ in 0..4 {
        std::thread::sleep(Duration::from_millis(900));
        c.send(&Frame::Ping(pb::Ping::default()));
        assert!(matches!(c.read(), Frame::Pong(_)));
    }
    // Ask for 3 s: the PONG echoes it and the deadline becomes 3 + 0.5 + 0.25 s.
    let asked = Instant::now();
    c.send(&Frame::Ping(pb::Ping {
        next_interval_ms: 3000,
    }));
    match c.read() {
        Frame::Pong(p) => assert_eq!(p.interval_ms, 3000),
        other => panic!("{other:?}"),
    }
    c.read_until_closed();
    let after = asked.elapsed();
    let longer = Duration::from_millis(3750);
    assert!(
        after >= longer && after <= longer + MARGIN,
        "closed after {after:?}"
    );
}

fn spawn_recv(
    server: &ServerProc,
    user: &str,
    state: &std::path::Path,
    count: usize,
    extra: &[&str],
) -> std::process::Child {
    let mut args: Vec<String> = vec![
        "recv".into(),
        "--count".into(),
        count.to_string(),
        "--timeout".into(),
        "60".into(),
    ];
    args.extend(common::cli_auth(server, user, "cli", state));
    args.extend(extra.iter().map(|s| s.to_string()));
    common::tether()
        .args(&args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

fn wait_metric(server: &ServerProc, name: &str, want: f64, within: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if metric(server, name) == want {
            return started.elapsed();
        }
        assert!(started.elapsed() < within, "{name} never reached {want}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_silent_client_is_dropped_in_bounds_and_gets_what_was_sent_meanwhile_once() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("clients");
    let server = ServerProc::start(&dir.path().join("data"), FLAGS);
    let recv = spawn_recv(
        &server,
        "bob",
        &state,
        3,
        &["--heartbeat-interval-ms", "1000"],
    );
    wait_metric(
        &server,
        "tether_connections_open",
        1.0,
        Duration::from_secs(10),
    );
    std::thread::sleep(Duration::from_millis(300));
    let stopped = Instant::now();
    common::signal(recv.id(), "STOP");
    // Its last frame (a PING) left at most I before the stop: the server drops it in
    // [stop + DEADLINE - I, stop + DEADLINE] plus the sweep and scheduling margin.
    wait_metric(
        &server,
        "tether_sessions_expired_total",
        1.0,
        Duration::from_secs(10),
    );
    let dropped = stopped.elapsed();
    assert!(
        dropped >= DEADLINE - Duration::from_millis(1000),
        "dropped after {dropped:?}"
    );
    assert!(dropped <= DEADLINE + MARGIN, "dropped after {dropped:?}");
    assert_eq!(
        metric(&server, "tether_connections_open"),
        0.0,
        "presence gone"
    );
    for i in 0..3 {
        common::cli_send(
            &server,
            "alice",
            "cli",
            &state,
            "bob",
            &format!("while away {i}"),
        );
    }
    common::signal(recv.id(), "CONT");
    let out = common::wait_output(recv, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = common::json_lines(&out);
    let texts: Vec<&str> = lines.iter().map(|l| l["text"].as_str().unwrap()).collect();
    assert_eq!(
        texts,
        ["while away 0", "while away 1", "while away 2"],
        "once each, in order"
    );
}

#[test]
fn after_a_server_crash_clients_reconnect_resume_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("clients");
    let data = dir.path().join("data");
    let addr = common::free_addr().to_string();
    let flags = ["--listen", addr.as_str()];
    let server = ServerProc::start(&data, &flags);
    let recv = spawn_recv(&server, "bob", &state, 20, &[]);
    for i in 0..10 {
        common::cli_send(&server, "alice", "cli", &state, "bob", &format!("m{i}"));
    }
    // Let the receiver see some of them, then crash the server.
    std::thread::sleep(Duration::from_millis(300));
    server.kill9();
    std::thread::sleep(Duration::from_millis(500));
    let server = ServerProc::start(&data, &flags);
    for i in 10..20 {
        common::cli_send(&server, "alice", "cli", &state, "bob", &format!("m{i}"));
    }
    let out = common::wait_output(recv, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = common::json_lines(&out);
    let texts: Vec<String> = lines
        .iter()
        .map(|l| l["text"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    assert_eq!(texts, want, "nothing lost, nothing twice, in order");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("disconnected"),
        "the CLI said why it lost the link: {stderr}"
    );
}
