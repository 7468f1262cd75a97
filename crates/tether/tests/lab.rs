//! The smart heartbeat proven against a real Linux NAT (issue 4, DESIGN §5): each test
//! runs one `tether lab run` scenario in its own network namespaces, in parallel with
//! the others, and checks the numbers in its report. Needs root (CAP_NET_ADMIN) and
//! nftables/conntrack: without them the scenario fails, and so does the test.
//!
//! Run with many test threads (the scenarios mostly wait on timers):
//! `cargo test -p tether --test lab -- --test-threads 16`.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

/// Runs a scenario; returns its report. Panics with the scenario's output on failure.
fn scenario(name: &str, args: &[&str]) -> Value {
    let out: PathBuf = std::env::temp_dir().join(format!(
        "tether-lab-test-{}-{}-{}",
        std::process::id(),
        name,
        args.join("_").replace('-', "")
    ));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["lab", "run", name, "--out"])
        .arg(&out)
        .args(args)
        .env("TETHER_LOG", "warn")
        .output()
        .expect("run tether lab");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    let report = std::fs::read(out.join("report.json")).unwrap_or_else(|e| {
        panic!(
            "{name}: no report ({e}); stdout:\n{stdout}\nstderr tail:\n{}",
            tail(&stderr)
        )
    });
    let report: Value = serde_json::from_slice(&report).expect("report.json");
    for check in report["checks"].as_array().expect("checks") {
        assert!(
            check["pass"].as_bool() == Some(true),
            "{name} {args:?}: check `{}` failed: {}\nreport: {}",
            check["name"],
            check["detail"],
            out.display()
        );
    }
    assert!(
        run.status.success(),
        "{name}: exit {:?}\n{stdout}",
        run.status
    );
    assert!(out.join("chart.svg").exists() && out.join("report.md").exists());
    report
}

fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn num(report: &Value, key: &str) -> f64 {
    report["numbers"][key]
        .as_f64()
        .unwrap_or_else(|| panic!("report lacks {key}: {report}"))
}

#[test]
fn fixed_heartbeat_below_the_nat_timeout_survives_and_above_it_dies_and_recovers() {
    let r = scenario("fixed", &["--nat-timeout", "12"]);
    // Detected dead at I + m·P after the last frame (16 + 2·2 = 20 s), within 1 s.
    let after = num(&r, "above_detected_after_s");
    assert!((19.0..=21.0).contains(&after), "{after}");
    assert!(num(&r, "below_observed_s") >= 5.0 * 12.0);
}

fn smart_on(t: f64) {
    let r = scenario("smart", &["--nat-timeout", &format!("{t}")]);
    let ratio = num(&r, "converged_ratio");
    assert!((0.9..1.0).contains(&ratio), "interval / T = {ratio}");
    assert!(num(&r, "probes") <= 10.0);
    assert!(num(&r, "held_intervals") >= 10.0);
}

#[test]
fn smart_heartbeat_converges_below_a_12s_nat() {
    smart_on(12.0);
}

#[test]
fn smart_heartbeat_converges_below_a_25s_nat() {
    smart_on(25.0);
}

#[test]
fn smart_heartbeat_converges_below_a_50s_nat() {
    smart_on(50.0);
}

#[test]
fn five_percent_loss_while_learning_does_not_teach_a_wrong_interval() {
    let r = scenario("loss", &["--nat-timeout", "25"]);
    let ratio = num(&r, "converged_ratio");
    assert!((0.9..1.0).contains(&ratio), "interval / T = {ratio}");
}

#[test]
fn switching_networks_reuses_each_learned_interval_at_once() {
    let r = scenario("switch", &["--nat-timeout", "25", "--nat-timeout-2", "12"]);
    assert!(num(&r, "learned_0_s") > 22.5 && num(&r, "learned_1_s") < 12.0);
}

#[test]
fn blackhole_is_detected_on_both_sides_and_nothing_is_lost() {
    let r = scenario("blackhole", &["--nat-timeout", "60"]);
    let client = num(&r, "client_detect_after_last_rx_s");
    assert!((8.5..=9.5).contains(&client), "{client}");
}

#[test]
fn comparison_of_fixed_mars_like_and_smart_heartbeats_on_one_nat() {
    let r = scenario("compare", &["--nat-timeout", "25", "--duration", "480"]);
    let smart = num(&r, "smart-side_heartbeats_per_scaled_day");
    let fixed = num(&r, "fixed-30s_heartbeats_per_scaled_day");
    assert!(
        smart < fixed,
        "smart {smart} vs fixed {fixed} heartbeats per day"
    );
    assert_eq!(num(&r, "smart-side_main_lost"), 0.0);
    assert!(
        num(&r, "mars-like_main_lost") >= 1.0,
        "the crawl loses its main link on failed probes"
    );
}
