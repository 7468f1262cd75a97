//! `tether bench load` runs as a user would run it, at a small scale, and its report
//! says what happened: a `tether serve` child, worker processes on 127.0.0.2-3, real
//! sockets. Budgets are not asserted here (DESIGN §8: benchmarks prove them); what is
//! asserted is that the load generator measures and that the server behaves: no
//! spurious deadline expiry, every acknowledged message delivered exactly once and in
//! order across a SIGKILL, logins within the admission limit.

mod common;

use serde_json::Value;

fn load(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("report.json");
    let out = common::tether()
        .args(["bench", "load", "--no-progress", "--json"])
        .arg(&json)
        .args(args)
        .output()
        .expect("run tether bench load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "bench load {args:?} failed:\n{stderr}"
    );
    // The Markdown report goes to stderr, the JSON to stdout and the file.
    assert!(
        stderr.contains("| what | value |"),
        "no Markdown report:\n{stderr}"
    );
    let printed: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    let written: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(printed, written);
    eprintln!("{stderr}");
    written
}

fn u(v: &Value) -> u64 {
    v.as_u64()
        .or_else(|| v.as_f64().map(|f| f as u64))
        .unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn idle_tcp_connections_heartbeat_without_expiring_and_the_server_is_measured() {
    let n = 300;
    let r = load(&[
        "--transport",
        "tcp",
        "--connections",
        "300",
        "--workers",
        "2",
        "--heartbeat",
        "5",
        "--duration",
        "11",
    ]);
    assert_eq!(u(&r["connections"]), n);
    assert_eq!(u(&r["workers"]), 2);
    // Each connection PINGs every 5 s (idle mode): about 2 per connection in 11 s.
    let pings = u(&r["pings_answered"]);
    assert!(
        (n..=4 * n).contains(&pings),
        "{pings} PINGs answered by the server for {n} connections over 11 s"
    );
    assert_eq!(u(&r["deadlines_expired"]), 0, "{r}");
    assert_eq!(r["disconnect_reasons"], serde_json::json!({}), "{r}");
    assert_eq!(u(&r["client"]["errors"]), 0, "{r}");
    // What the clients saw matches the server's count (within a round in flight).
    let pongs = u(&r["client"]["pongs"]);
    assert!(
        pongs + n >= pings && pongs <= pings + n,
        "{pongs} vs {pings}"
    );
    assert!(u(&r["ping_rtt_us"]["count"]) > 0, "{r}");
    assert!(r["server_cpu_us_per_ping"].as_f64().unwrap() > 0.0, "{r}");
    assert!(u(&r["server_rss_connected_bytes"]) > u(&r["server_rss_before_bytes"]));
    // The window waited for the logins' cursor writes (a number, not null).
    assert!(r["settle_s"].as_f64().is_some(), "{r}");
}

/// `bench floor`: a bare echo server in a child process answers every ping, and its
/// CPU is measured.
#[test]
fn the_keepalive_floor_answers_every_ping_and_measures_its_server() {
    let out = common::tether()
        .args([
            "bench",
            "floor",
            "--connections",
            "2000",
            "--interval",
            "1",
            "--seconds",
            "5",
        ])
        .output()
        .expect("run tether bench floor");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    // 2,000 connections pinging every second for 5 s: about 10,000, each answered (the
    // last few may still be in flight when the window closes). Enough that the server's
    // CPU time, counted in 10 ms ticks, is several ticks (600 pings took 0 or 1).
    let (sent, answered) = (u(&r["pings_sent"]), u(&r["pings_answered"]));
    assert!((9_000..=11_000).contains(&sent), "{r}");
    assert!(answered + 200 >= sent && answered <= sent, "{r}");
    assert!(r["server_cpu_us_per_ping"].as_f64().unwrap() > 0.0, "{r}");
}

#[test]
fn chat_across_a_server_sigkill_loses_and_repeats_nothing_within_the_admission_limit() {
    let r = load(&[
        "--transport",
        "tcp",
        "--pattern",
        "chat",
        "--connections",
        "300",
        "--workers",
        "2",
        "--heartbeat",
        "5",
        "--duration",
        "15",
        "--restart-after",
        "4",
        "--msg-rate",
        "150",
        "--login-rate",
        "150",
        "--login-burst",
        "50",
    ]);
    let storm = &r["storm"];
    let restarted = storm["server_restarted_after_s"].as_f64().unwrap();
    let back = storm["all_back_after_kill_s"].as_f64().unwrap();
    // 300 logins through a 150/s bucket with a burst of 50 need at least 1.6 s.
    assert!(
        back >= restarted + 1.5 && back <= 10.0,
        "all back {back} s after the kill (restart took {restarted} s)"
    );
    let max_rate = storm["max_logins_per_s"].as_f64().unwrap();
    assert!(
        max_rate <= 200.0 * 1.1,
        "{max_rate} logins/s through a 150/s + 50 bucket"
    );
    assert!(
        u(&storm["logins_throttled"]) > 0,
        "admission never pushed back: {storm}"
    );
    let c = &r["client"];
    assert!(u(&c["acked"]) >= 500, "too little traffic to tell: {c}");
    assert_eq!(u(&c["lost"]), 0, "{c}");
    assert_eq!(u(&c["duplicates"]), 0, "{c}");
    assert_eq!(u(&c["out_of_order"]), 0, "{c}");
    assert_eq!(u(&c["send_failures"]), 0, "{c}");
    assert!(u(&c["received"]) >= u(&c["acked"]), "{c}");
    // Every client had a session before the kill and one after it.
    assert!(u(&c["sessions"]) >= 600, "{c}");
}

#[test]
fn tls_connections_heartbeat_through_the_load_generator() {
    let r = load(&[
        "--transport",
        "tls",
        "--connections",
        "100",
        "--heartbeat",
        "5",
        "--duration",
        "7",
    ]);
    assert!(u(&r["pings_answered"]) >= 100, "{r}");
    assert_eq!(u(&r["deadlines_expired"]), 0, "{r}");
    assert_eq!(r["disconnect_reasons"], serde_json::json!({}), "{r}");
}

#[test]
fn in_memory_sessions_are_held_and_heartbeat_in_one_process() {
    let r = load(&[
        "--transport",
        "memory",
        "--connections",
        "5000",
        "--heartbeat",
        "5",
        "--duration",
        "8",
    ]);
    let pings = u(&r["pings_answered"]);
    assert!(
        (5000..=15_000).contains(&pings),
        "{pings} PINGs in 8 s at 5 s"
    );
    assert_eq!(u(&r["deadlines_expired"]), 0, "{r}");
    assert_eq!(u(&r["registered_at_end"]), 5000, "{r}");
    assert_eq!(u(&r["client"]["sessions_lost"]), 0, "{r}");
    let bytes = r["server_bytes_per_connection"].as_f64().unwrap();
    assert!(
        bytes > 0.0 && bytes < 64.0 * 1024.0,
        "{bytes} B per session"
    );

    let flood = load(&[
        "--transport",
        "memory",
        "--pattern",
        "flood",
        "--connections",
        "100",
        "--duration",
        "2",
    ]);
    assert!(u(&flood["pings_answered"]) > 1000, "{flood}");
    assert!(flood["pongs_per_server_cpu_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn group_fan_out_is_timed_per_copy_and_every_copy_arrives_once_in_order() {
    // 8 groups of 6: each group's sender sends to the group, 5 members receive.
    let r = load(&[
        "--transport",
        "tcp",
        "--pattern",
        "groups",
        "--groups",
        "8",
        "--members",
        "6",
        "--rate",
        "200",
        "--duration",
        "2",
        "--durability",
        "relaxed",
    ]);
    let d = &r["delivery"];
    // 200/s for 2 s over 8 groups: 50 messages each, 5 copies of each.
    assert_eq!(u(&d["sent"]), 400, "{r}");
    assert_eq!(u(&d["expected_copies"]), 2000, "{r}");
    assert_eq!(u(&d["received_copies"]), 2000, "{r}");
    assert_eq!(u(&d["duplicates"]), 0, "{r}");
    assert_eq!(u(&d["out_of_order"]), 0, "{r}");
    assert_eq!(u(&d["inbox_gaps"]), 0, "{r}");
    assert_eq!(u(&r["latency_us"]["count"]), 2000, "{r}");
    let (p50, max) = (
        r["latency_us"]["p50"].as_f64().unwrap(),
        r["latency_us"]["max"].as_f64().unwrap(),
    );
    assert!(p50 > 0.0 && p50 <= max, "{r}");
    assert_eq!(r["groups"], serde_json::json!({"groups": 8, "members": 6}));
}

#[test]
fn bad_arguments_are_refused_with_a_reason() {
    let out = common::tether()
        .args([
            "bench",
            "load",
            "--transport",
            "memory",
            "--pattern",
            "chat",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("memory runs idle or flood"), "{stderr}");
}
