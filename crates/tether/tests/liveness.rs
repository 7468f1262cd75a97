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
        server.log().contains("liveness deadline passed"),
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
