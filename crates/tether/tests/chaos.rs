//! Issue 5, must-show 2 and 3: `tether chaos` in the suite. 10,000 messages from 4
//! senders to 4 recipients with 2 devices each, while a proxy kills hundreds of
//! connections (reset or silent), the server is SIGKILLed 5 times and suffers 2
//! simulated power cuts (its unsynced store writes die with it); then the same through
//! the network lab's NAT with 10 % loss and blackhole periods (root: without it the
//! run fails, and so does the test). Every acknowledged message must reach every device
//! of its recipient (and the sender's own device) exactly once, in order.

use serde_json::Value;
use std::process::Command;

fn chaos(name: &str, extra: &[&str]) -> Value {
    let out = std::env::temp_dir().join(format!("tether-chaos-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let run = Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "chaos",
            "--messages",
            "10000",
            "--rate",
            "125",
            "--senders",
            "4",
            "--recipients",
            "4",
            "--devices",
            "2",
            "--server-kills",
            "5",
            "--power-cuts",
            "2",
            "--conn-kills",
            "300",
            "--out",
        ])
        .arg(&out)
        .args(extra)
        .env("TETHER_LOG", "warn")
        .output()
        .expect("run tether chaos");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    println!("{stdout}");
    let report = std::fs::read(out.join("report.json")).unwrap_or_else(|e| {
        let lines: Vec<&str> = stderr.lines().collect();
        panic!(
            "{name}: no report ({e}); stdout:\n{stdout}\nstderr tail:\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        )
    });
    let r: Value = serde_json::from_slice(&report).expect("report.json");
    let n = |k: &str| {
        r[k].as_u64()
            .unwrap_or_else(|| panic!("{k} missing in {r}"))
    };
    assert!(
        run.status.success(),
        "{name}: exit {:?}\n{stdout}",
        run.status
    );
    assert!(
        r["problems"].as_array().unwrap().is_empty(),
        "{name}: {}",
        r["problems"]
    );
    // The run did what it claims.
    assert!(n("sent") >= 10_000, "{r}");
    assert_eq!(n("acknowledged") + n("unconfirmed"), n("sent"), "{r}");
    assert_eq!(n("send_errors"), 0);
    assert!(n("server_kills") >= 5 && n("power_cuts") >= 2, "{r}");
    assert!(
        n("conn_kills_reset") + n("conn_kills_silent") >= 200,
        "hundreds of connection kills: {r}"
    );
    assert!(n("conn_kills_silent") > 0, "{r}");
    // Kills hit sends in flight: clients resent them, and every resend went through the
    // server's dedup check. Whether any resend was of a send already committed (answered
    // as a duplicate, or left unconfirmed though delivered) is chance: runs gave 0 to 3
    // (CI, 2026-11-22: 0 and 0 with 5,329 resends). The dedup answer itself is tested
    // deterministically (conformance, `send_deliver_ack_and_dedup`).
    assert!(n("sends_transmitted") > n("sent"), "resends happened: {r}");
    // The guarantee.
    assert_eq!(n("lost"), 0);
    assert_eq!(n("duplicates_shown"), 0);
    assert_eq!(n("out_of_order"), 0);
    assert_eq!(n("clients_stopped"), 0);
    assert_eq!(
        n("unexpected"),
        0,
        "nothing arrives that a device was not owed"
    );
    assert!(
        n("acknowledged") * 2 >= n("sent"),
        "most sends acknowledged: {r}"
    );
    let devices = r["delivered_per_device"].as_array().unwrap();
    assert_eq!(devices.len(), 4 * 2 + 4);
    for d in devices {
        assert!(
            d["delivered"].as_u64() >= d["expected"].as_u64() && d["expected"].as_u64() > Some(0),
            "{d}"
        );
    }
    // Unconfirmed sends were delivered at most once (shown-duplicates is 0) and are all
    // accounted for.
    assert_eq!(
        n("unconfirmed_delivered_once") + n("unconfirmed_not_delivered"),
        n("unconfirmed")
    );
    r
}

#[test]
fn chaos_on_loopback_loses_nothing_and_shows_nothing_twice() {
    // Short outbox timers: a send on a silently killed connection (noticed after about
    // 7 s) runs out of tries after 4 s, so some sends end *unconfirmed*, some of them
    // after the server committed them.
    let r = chaos(
        "loopback",
        &[
            "--ack-timeout-ms",
            "2000",
            "--max-tries",
            "2",
            "--offline-window-ms",
            "10000",
        ],
    );
    assert_eq!(r["lab"], false);
    assert!(r["unconfirmed"].as_u64() > Some(0), "{r}");
}

#[test]
fn chaos_through_a_lossy_nat_with_blackholes_loses_nothing() {
    let r = chaos("lab", &["--lab", "--loss", "10", "--blackholes", "4"]);
    assert_eq!(r["lab"], true);
    assert_eq!(r["loss_percent"], 10);
    assert_eq!(r["blackholes"], 4);
}
