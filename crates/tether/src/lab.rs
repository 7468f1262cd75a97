//! `tether lab`: scenarios that prove the heartbeat against a real Linux NAT (DESIGN §5,
//! issue 4). Each run builds its own namespaces (tether-lab): a client behind two NAT
//! routers whose conntrack forgets idle flows after a set timeout, and a Tether server
//! (this binary, `serve`) in the server namespace. Clients are the real SDK, each on a
//! thread inside the client namespace. Every run writes `report.json`, `report.md`,
//! `chart.svg` and `events.jsonl` to its output directory and tears the lab down on
//! exit, failure or Ctrl-C.
//!
//! Intervals are scaled: `SCALE` = 0.2, so a real 30 s heartbeat is 6 s here and the
//! NAT timeouts (≥ 10 s) stand for 50 s and more.

use bytes::Bytes;
use parking_lot::Mutex;
use serde::Serialize;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tether_client::smart::{ProbeMode, SmartConfig, SmartEventKind, SmartSettings};
use tether_client::{
    Client, ClientConfig, ClientEvent, ClientHandle, DisconnectReason, NetConnector,
};
use tether_core::heartbeat::HeartbeatMode;
use tether_lab::chart::{HLine, Series};
use tether_lab::{Lab, LabSpec, RouterSpec};

/// Real seconds → lab seconds.
pub const SCALE: f64 = 0.2;
/// Pong timeout `P` in the lab (10 s real).
const PONG: Duration = Duration::from_secs(2);
/// `m`.
const MISSES: u32 = 2;
/// Server grace (5 s real).
const GRACE: Duration = Duration::from_secs(1);
const PORT: u16 = 7400;
const HTTP_PORT: u16 = 7401;

#[derive(clap::Args)]
pub struct LabArgs {
    #[command(subcommand)]
    command: LabCommand,
}

#[derive(clap::Subcommand)]
enum LabCommand {
    /// Run one scenario: fixed, smart, loss, switch, blackhole, compare.
    Run(RunArgs),
    /// Remove namespaces left by lab runs whose process died.
    Cleanup,
}

#[derive(clap::Args, Clone)]
pub struct RunArgs {
    /// fixed | smart | loss | switch | blackhole | compare
    scenario: String,
    /// NAT idle timeout of router 0, seconds (≥ 10).
    #[arg(long, default_value_t = 25)]
    nat_timeout: u64,
    /// NAT idle timeout of router 1 (the second network), seconds.
    #[arg(long, default_value_t = 12)]
    nat_timeout_2: u64,
    /// Length of the observation (compare: the whole run), seconds.
    #[arg(long, default_value_t = 600)]
    duration: u64,
    /// Output directory (default lab-out/<scenario>-<nat timeout>).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(args: LabArgs) -> std::process::ExitCode {
    match args.command {
        LabCommand::Cleanup => {
            tether_lab::cleanup_stale("t");
            std::process::ExitCode::SUCCESS
        }
        LabCommand::Run(args) => match run_scenario(&args) {
            Ok(report) => {
                let failed: Vec<_> = report.checks.iter().filter(|c| !c.pass).collect();
                for c in &report.checks {
                    println!(
                        "{} {}: {}",
                        if c.pass { "ok  " } else { "FAIL" },
                        c.name,
                        c.detail
                    );
                }
                if failed.is_empty() {
                    std::process::ExitCode::SUCCESS
                } else {
                    std::process::ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("tether lab: {e}");
                std::process::ExitCode::from(2)
            }
        },
    }
}

/// What a scenario found: numbers, checks, chart data.
#[derive(Serialize, Default)]
pub struct Report {
    scenario: String,
    nat_timeouts_s: Vec<f64>,
    checks: Vec<Check>,
    numbers: serde_json::Map<String, serde_json::Value>,
    #[serde(skip)]
    series: Vec<Series>,
    #[serde(skip)]
    lines: Vec<HLine>,
    #[serde(skip)]
    table: Vec<Vec<String>>,
}

#[derive(Serialize)]
struct Check {
    name: String,
    pass: bool,
    detail: String,
}

impl Report {
    fn check(&mut self, name: &str, pass: bool, detail: impl Into<String>) {
        self.checks.push(Check {
            name: name.into(),
            pass,
            detail: detail.into(),
        });
    }
    fn num(&mut self, name: &str, v: impl Into<serde_json::Value>) {
        self.numbers.insert(name.into(), v.into());
    }
}

fn run_scenario(args: &RunArgs) -> Result<Report, String> {
    tether_lab::require_root().map_err(|e| e.to_string())?;
    tether_lab::install_interrupt_cleanup();
    let out = args.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!("lab-out/{}-{}", args.scenario, args.nat_timeout))
    });
    std::fs::create_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    let env = Env::start(args, &out)?;
    let mut report = Report {
        scenario: args.scenario.clone(),
        nat_timeouts_s: vec![args.nat_timeout as f64, args.nat_timeout_2 as f64],
        ..Default::default()
    };
    match args.scenario.as_str() {
        "fixed" => fixed(&env, &mut report),
        "smart" => smart(&env, &mut report, 0),
        "loss" => smart(&env, &mut report, 5),
        "switch" => switch(&env, &mut report),
        "blackhole" => blackhole(&env, &mut report),
        "compare" => compare(&env, &mut report, Duration::from_secs(args.duration)),
        other => return Err(format!("unknown scenario `{other}`")),
    }
    env.write_outputs(&report)?;
    Ok(report)
}

// ----- environment: lab, server, agents -----

/// Seconds since the run started (one clock for every thread).
#[derive(Clone, Copy)]
struct Clock(Instant);

impl Clock {
    fn t(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

struct Env {
    lab: Lab,
    server: Mutex<Child>,
    data: PathBuf,
    out: PathBuf,
    clock: Clock,
    log: Arc<Mutex<Vec<serde_json::Value>>>,
}

impl Env {
    fn start(args: &RunArgs, out: &Path) -> Result<Env, String> {
        let lab = Lab::create(LabSpec {
            tag: None,
            routers: [
                RouterSpec {
                    nat_timeout: Duration::from_secs(args.nat_timeout),
                },
                RouterSpec {
                    nat_timeout: Duration::from_secs(args.nat_timeout_2),
                },
            ],
        })
        .map_err(|e| e.to_string())?;
        let data = out.join("server-data");
        let _ = std::fs::remove_dir_all(&data);
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let log = std::fs::File::create(out.join("server.log")).map_err(|e| e.to_string())?;
        let ip = Lab::server_ip();
        let mut cmd = lab.command_in(lab.server_ns(), &exe);
        cmd.args(["serve", "--durability", "relaxed", "--data"])
            .arg(&data)
            .args([
                "--listen",
                &format!("{ip}:{PORT}"),
                "--http",
                &format!("{ip}:{HTTP_PORT}"),
            ])
            .args([
                "--heartbeat-min-ms",
                "1000",
                "--heartbeat-default-ms",
                "6000",
            ])
            .args(["--pong-timeout-ms", &PONG.as_millis().to_string()])
            .args(["--max-misses", &MISSES.to_string()])
            .args(["--deadline-grace-ms", &GRACE.as_millis().to_string()])
            .args(["--probe-min-gap-ms", "200"])
            .env("TETHER_LOG", "info,tether_server::probe=debug")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        let server = cmd
            .spawn()
            .map_err(|e| format!("cannot start the server: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !data.join("jwt-secret").exists() {
            if Instant::now() > deadline {
                return Err("the server did not start (see server.log)".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(Env {
            lab,
            server: Mutex::new(server),
            data,
            out: out.to_path_buf(),
            clock: Clock(Instant::now()),
            log: Default::default(),
        })
    }

    fn token(&self, user: &str) -> String {
        tether_server::auth::mint_token(&self.data, user).expect("token")
    }

    /// A client config for the lab's scaled timings.
    fn config(&self, user: &str, device: &str) -> ClientConfig {
        let mut c = ClientConfig::new(
            format!("{}:{PORT}", Lab::server_ip()),
            self.token(user),
            device,
        );
        c.pong_timeout = PONG;
        c.connect_timeout = Duration::from_secs(3);
        c.backoff_base = Duration::from_millis(200);
        c.backoff_cap = Duration::from_secs(2);
        c.auto_ack = true;
        c.connector = Arc::new(NetConnector::new(
            // A backstop far past any interval here: it must never warm the NAT.
            Some(Duration::from_secs(600)),
            Some(Duration::from_secs(12)),
        ));
        c
    }

    fn smart_settings(&self, mode: ProbeMode) -> SmartSettings {
        SmartSettings {
            config: SmartConfig {
                reprobe_after: Duration::from_secs(3600),
                ..SmartConfig::default()
            }
            .scaled(SCALE),
            probe: mode,
        }
    }

    /// Starts a client on a thread in `ns`.
    fn agent(&self, ns: &str, name: &str, config: ClientConfig) -> Agent {
        let records = Arc::new(Mutex::new(AgentLog::default()));
        let (handle_tx, handle_rx) = std::sync::mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let (clock, log, rec, stop2, label) = (
            self.clock,
            self.log.clone(),
            records.clone(),
            stop.clone(),
            name.to_string(),
        );
        let thread = self.lab.spawn_thread_in(ns, name, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let mut client = Client::start(config).expect("client config");
                let mut events = client.events();
                let _ = handle_tx.send(client.handle());
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                loop {
                    tokio::select! {
                        e = events.recv() => {
                            let Ok(e) = e else { continue };
                            let t = clock.t();
                            log.lock().push(event_json(&label, t, &e));
                            rec.lock().events.push((t, e));
                        }
                        entry = client.recv() => {
                            let Some(entry) = entry else { break };
                            let t = clock.t();
                            let body = String::from_utf8_lossy(&entry.body).to_string();
                            log.lock().push(serde_json::json!({"t": t, "agent": label, "received": body, "seq": entry.seq}));
                            rec.lock().received.push((t, entry.seq, body));
                        }
                        _ = tick.tick() => if stop2.load(Ordering::Relaxed) { break },
                    }
                }
                client.close().await;
            });
        });
        let handle = handle_rx.recv().expect("client started");
        Agent {
            handle,
            records,
            stop,
            thread: Some(thread),
        }
    }

    /// Sends `body` to `to` from `from` (an agent in the server namespace); returns the
    /// send time.
    fn push(&self, rt: &tokio::runtime::Runtime, from: &Agent, to: &str, body: &str) -> f64 {
        let t = self.clock.t();
        let h = from.handle.clone();
        self.log
            .lock()
            .push(serde_json::json!({"t": t, "push": body, "to": to}));
        let (to, body) = (to.to_string(), body.to_string());
        rt.block_on(async move { h.send(&to, Bytes::from(body)).await })
            .expect("push acknowledged");
        t
    }

    fn sleep_until(&self, t: f64) {
        let now = self.clock.t();
        if t > now {
            std::thread::sleep(Duration::from_secs_f64(t - now));
        }
    }

    /// `tether_sessions_expired_total` from the server's /metrics.
    fn sessions_expired(&self) -> Option<u64> {
        let h = self
            .lab
            .spawn_thread_in(self.lab.server_ns(), "metrics", || {
                let mut s = std::net::TcpStream::connect((Lab::server_ip(), HTTP_PORT)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
                s.write_all(b"GET /metrics HTTP/1.0\r\nHost: lab\r\n\r\n")
                    .ok()?;
                let mut text = String::new();
                s.read_to_string(&mut text).ok()?;
                text.lines()
                    .find(|l| l.starts_with("tether_sessions_expired_total"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse::<f64>().ok())
                    .map(|v| v as u64)
            });
        h.join().ok().flatten()
    }

    fn write_outputs(&self, report: &Report) -> Result<(), String> {
        let w = |name: &str, bytes: &[u8]| {
            std::fs::write(self.out.join(name), bytes).map_err(|e| format!("{name}: {e}"))
        };
        w(
            "report.json",
            &serde_json::to_vec_pretty(report).unwrap_or_default(),
        )?;
        let mut events = Vec::new();
        for e in self.log.lock().iter() {
            events.extend_from_slice(e.to_string().as_bytes());
            events.push(b'\n');
        }
        w("events.jsonl", &events)?;
        let mut md = format!(
            "# Lab: {}\n\nNAT timeouts (s): router 0 = {}, router 1 = {}; intervals scaled by {SCALE} (a real 30 s = 6 s here); P = {} s, m = {MISSES}.\n\n",
            report.scenario,
            report.nat_timeouts_s[0],
            report.nat_timeouts_s[1],
            PONG.as_secs()
        );
        if let Some((head, rows)) = report.table.split_first() {
            md += &format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
            for r in rows {
                md += &format!("| {} |\n", r.join(" | "));
            }
            md.push('\n');
        }
        md += "## Checks\n\n";
        for c in &report.checks {
            md += &format!(
                "- {} **{}**: {}\n",
                if c.pass { "✔" } else { "✘" },
                c.name,
                c.detail
            );
        }
        md += "\n## Numbers\n\n";
        for (k, v) in &report.numbers {
            md += &format!("- {k}: {v}\n");
        }
        md += "\n![interval over time](chart.svg)\n";
        w("report.md", md.as_bytes())?;
        tether_lab::chart::write_svg(
            &self.out.join("chart.svg"),
            &format!("Heartbeat interval over time: {}", report.scenario),
            &report.series,
            &report.lines,
        )
        .map_err(|e| format!("chart: {e}"))
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let mut server = self.server.lock();
        let _ = server.kill();
        let _ = server.wait();
        self.lab.teardown();
    }
}

fn event_json(agent: &str, t: f64, e: &ClientEvent) -> serde_json::Value {
    let detail = match e {
        ClientEvent::Smart(s) => serde_json::to_value(s).unwrap_or_default(),
        ClientEvent::Ping { probe, idle } => {
            serde_json::json!({"event": "Ping", "probe": probe, "idle_ms": idle.as_millis() as u64})
        }
        ClientEvent::Pong { probe, idle, rtt } => serde_json::json!({
            "event": "Pong", "probe": probe, "idle_ms": idle.as_millis() as u64,
            "rtt_us": rtt.as_micros() as u64
        }),
        ClientEvent::Disconnected { reason, .. } => {
            serde_json::json!({"event": "Disconnected", "reason": reason.to_string()})
        }
        ClientEvent::Connected(info) => serde_json::json!({
            "event": "Connected", "interval_ms": info.heartbeat_interval.as_millis() as u64
        }),
        other => serde_json::json!({"event": format!("{other:?}")}),
    };
    serde_json::json!({"t": t, "agent": agent, "e": detail})
}

#[derive(Default)]
struct AgentLog {
    events: Vec<(f64, ClientEvent)>,
    received: Vec<(f64, u64, String)>,
    /// Interval changes made from outside the SDK (the Mars-like controller).
    set_intervals: Vec<(f64, f64)>,
}

struct Agent {
    handle: ClientHandle,
    records: Arc<Mutex<AgentLog>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    fn stop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    fn disconnects(&self, from: f64, to: f64) -> Vec<(f64, DisconnectReason)> {
        self.records
            .lock()
            .events
            .iter()
            .filter(|(t, _)| *t >= from && *t <= to)
            .filter_map(|(t, e)| match e {
                ClientEvent::Disconnected { reason, .. } => Some((*t, reason.clone())),
                _ => None,
            })
            .collect()
    }

    fn count(&self, f: impl Fn(&ClientEvent) -> bool) -> usize {
        self.records
            .lock()
            .events
            .iter()
            .filter(|(_, e)| f(e))
            .count()
    }

    /// Waits until `f` matches an event (after `after`), up to `limit` seconds.
    fn wait_for(
        &self,
        clock: Clock,
        after: f64,
        limit: f64,
        f: impl Fn(&ClientEvent) -> bool,
    ) -> Option<(f64, ClientEvent)> {
        let end = clock.t() + limit;
        loop {
            if let Some(hit) = self
                .records
                .lock()
                .events
                .iter()
                .find(|(t, e)| *t >= after && f(e))
                .cloned()
            {
                return Some(hit);
            }
            if clock.t() > end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn received(&self, body: &str) -> Vec<f64> {
        self.records
            .lock()
            .received
            .iter()
            .filter(|(_, _, b)| b == body)
            .map(|(t, _, _)| *t)
            .collect()
    }

    /// The main connection's interval over time, from connects and smart decisions
    /// (a step line for the chart), and failures to mark.
    fn interval_series(&self, label: &str, fixed: Option<f64>, end: f64) -> Series {
        let mut points = Vec::new();
        let mut marks = Vec::new();
        let log = self.records.lock();
        let events = &log.events;
        let smart = events
            .iter()
            .any(|(_, e)| matches!(e, ClientEvent::Smart(_)));
        let main_probe = label.contains("main");
        let mut run = 0.0;
        for (t, e) in events {
            match e {
                // Without a smart heartbeat the interval is the one each session got.
                ClientEvent::Connected(info) if fixed.is_none() && !smart => {
                    points.push((*t, info.heartbeat_interval.as_secs_f64()))
                }
                ClientEvent::Smart(s) => match &s.kind {
                    SmartEventKind::IntervalChanged { interval_ms, .. }
                    | SmartEventKind::Switched { interval_ms, .. } => {
                        run = *interval_ms as f64 / 1000.0;
                        points.push((*t, run))
                    }
                    // Probing on the main connection runs it at the candidate.
                    SmartEventKind::ProbeStarted { candidate_ms } if main_probe => {
                        points.push((*t, *candidate_ms as f64 / 1000.0))
                    }
                    SmartEventKind::ProbeFailed { candidate_ms, .. } => {
                        marks.push((*t, *candidate_ms as f64 / 1000.0, "probe failed".into()));
                        points.push((*t, run));
                    }
                    SmartEventKind::ProbeSucceeded { candidate_ms, .. } => {
                        marks.push((*t, *candidate_ms as f64 / 1000.0, "probe ok".into()));
                        points.push((*t, run));
                    }
                    SmartEventKind::ProbeDiscarded { .. } => points.push((*t, run)),
                    _ => {}
                },
                ClientEvent::Disconnected { reason, .. } => marks.push((
                    *t,
                    points.last().map_or(0.0, |p| p.1),
                    format!("lost: {reason}"),
                )),
                _ => {}
            }
        }
        points.extend(log.set_intervals.iter().copied());
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if let Some(v) = fixed {
            points = vec![(0.0, v)];
        }
        // The step line runs to the end of the run.
        if let Some(&(_, last)) = points.last() {
            points.push((end, last));
        }
        Series {
            label: label.into(),
            points,
            marks,
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop();
    }
}

fn root_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn connected(e: &ClientEvent) -> bool {
    matches!(e, ClientEvent::Connected(_))
}

fn converged(e: &ClientEvent) -> Option<(u64, u32)> {
    match e {
        ClientEvent::Smart(s) => match s.kind {
            SmartEventKind::Converged {
                interval_ms,
                probes,
                ..
            } => Some((interval_ms, probes)),
            _ => None,
        },
        _ => None,
    }
}

fn nat_line(report: &mut Report, t: f64, from: f64, to: f64) {
    report.lines.push(HLine {
        label: format!("NAT timeout {t} s"),
        y: t,
        from_t: from,
        to_t: to,
    });
}

// ----- scenarios -----

/// Must-show 1: below T a fixed heartbeat survives; above T the link dies, the client
/// says *network dead* within `I + m·P` and reconnects, and a push sent after the
/// mapping died arrives after the reconnect, once.
fn fixed(env: &Env, report: &mut Report) {
    let t_nat = env.lab.nat_timeout(0).as_secs_f64();
    let rt = root_rt();
    let below = Duration::from_secs_f64(t_nat * 2.0 / 3.0);
    let above = Duration::from_secs_f64(t_nat * 4.0 / 3.0);
    let mut cfg = env.config("below", "phone");
    cfg.heartbeat_interval = below;
    cfg.heartbeat_mode = HeartbeatMode::Fixed;
    let a = env.agent(env.lab.client_ns(), "fixed-below", cfg);
    let mut cfg = env.config("above", "phone");
    cfg.heartbeat_interval = above;
    cfg.heartbeat_mode = HeartbeatMode::Fixed;
    let b = env.agent(env.lab.client_ns(), "fixed-above", cfg);
    let pusher = env.agent(
        env.lab.server_ns(),
        "pusher",
        env.config("pusher", "server"),
    );
    let up_b = b.wait_for(env.clock, 0.0, 10.0, connected).map(|x| x.0);
    let up_a = a.wait_for(env.clock, 0.0, 10.0, connected).map(|x| x.0);
    let (Some(up_a), Some(up_b)) = (up_a, up_b) else {
        report.check("connected", false, "the clients did not connect");
        return;
    };
    // The mapping of B dies at up_b + T; push just after that, before B's PING.
    let push_at = up_b + t_nat + (above.as_secs_f64() - t_nat) / 2.0;
    env.sleep_until(push_at);
    let pushed = env.push(&rt, &pusher, "above", "after-the-mapping-died");
    let bound = above.as_secs_f64() + f64::from(MISSES) * PONG.as_secs_f64();
    let dead = b.wait_for(env.clock, up_b, bound + 10.0, |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    });
    let observe_until = up_a + 5.0 * t_nat;
    env.sleep_until(observe_until.max(pushed + 2.0 * bound));
    let detail = match &dead {
        Some((t, ClientEvent::Disconnected { reason, .. })) => {
            let after = t - up_b;
            report.num("above_detected_after_s", after);
            report.check(
                "above T: network dead within I + m·P",
                *reason == DisconnectReason::NetworkDead
                    && after <= bound + 1.0
                    && after >= bound - 1.0,
                format!(
                    "{reason} after {after:.2} s of silence; I + m·P = {bound:.1} s (margin 1 s)"
                ),
            );
            *t
        }
        _ => {
            report.check(
                "above T: network dead within I + m·P",
                false,
                "no disconnect seen",
            );
            f64::INFINITY
        }
    };
    let reconnect = b.wait_for(env.clock, detail, 5.0, connected).map(|x| x.0);
    report.check(
        "above T: reconnects at once",
        reconnect.is_some_and(|r| r - detail < 3.0),
        format!(
            "reconnected {:?} s after the verdict",
            reconnect.map(|r| r - detail)
        ),
    );
    let got = b.received("after-the-mapping-died");
    report.check(
        "push after the mapping died: delivered after the reconnect, once",
        // After the dead-link verdict, so on the new session. (Not compared with the
        // Connected event's time: the entry and the event reach the recorder on
        // different channels, microseconds apart in either order.)
        got.len() == 1 && reconnect.is_some() && got[0] >= detail,
        format!("pushed at {pushed:.1} s, received at {got:?}, reconnected at {reconnect:?}"),
    );
    let lost_a = a.disconnects(up_a, observe_until);
    report.num("below_interval_s", below.as_secs_f64());
    report.num("above_interval_s", above.as_secs_f64());
    report.num("below_observed_s", observe_until - up_a);
    report.check(
        "below T: survives many T",
        lost_a.is_empty(),
        format!(
            "{} disconnects over {:.0} s = {:.1} T",
            lost_a.len(),
            observe_until - up_a,
            (observe_until - up_a) / t_nat
        ),
    );
    report.series = vec![
        a.interval_series(
            &format!("fixed {:.0} s", below.as_secs_f64()),
            Some(below.as_secs_f64()),
            env.clock.t(),
        ),
        b.interval_series(
            &format!("fixed {:.0} s", above.as_secs_f64()),
            Some(above.as_secs_f64()),
            env.clock.t(),
        ),
    ];
    nat_line(report, t_nat, 0.0, env.clock.t());
}

/// Must-shows 2 and 3: the smart heartbeat (side probes) learns T, then holds.
fn smart(env: &Env, report: &mut Report, loss: u8) {
    let t_nat = env.lab.nat_timeout(0).as_secs_f64();
    let rt = root_rt();
    let mut cfg = env.config("smart", "phone");
    cfg.smart_heartbeat = Some(env.smart_settings(ProbeMode::Side));
    cfg.network_id = "wifi".into();
    if loss > 0 {
        env.lab.set_loss(0, loss).expect("loss");
    }
    let c = env.agent(env.lab.client_ns(), "smart", cfg);
    let pusher = env.agent(
        env.lab.server_ns(),
        "pusher",
        env.config("pusher", "server"),
    );
    let Some((up, _)) = c.wait_for(env.clock, 0.0, 10.0, connected) else {
        report.check("connected", false, "no connection");
        return;
    };
    // Learning: push a message every ~7 s and time its arrival.
    let limit = 30.0 * t_nat + 120.0;
    let mut pushes = Vec::new();
    let mut conv = None;
    let mut n = 0;
    let mut outage = None;
    std::thread::scope(|s| {
        if loss > 0 {
            // Beyond random loss, an outage across the first probe's PING: both that
            // PING and the main link's companion PING are swallowed, so the attribution
            // rule must discard the probe rather than learn a failure.
            s.spawn(|| {
                let started = c.wait_for(env.clock, up, 10.0, |e| {
                    matches!(e, ClientEvent::Smart(s) if matches!(s.kind, SmartEventKind::ProbeStarted { .. }))
                });
                if let Some((t, ClientEvent::Smart(s))) = started
                    && let SmartEventKind::ProbeStarted { candidate_ms } = s.kind
                {
                    let ping = t + candidate_ms as f64 / 1000.0;
                    env.sleep_until(ping - 1.0);
                    env.lab.blackhole(0, true).expect("blackhole");
                    env.sleep_until(ping + 3.0);
                    env.lab.blackhole(0, false).expect("blackhole off");
                    outage = Some((ping - 1.0, ping + 3.0));
                }
            });
        }
        while env.clock.t() < up + limit {
            if let Some(hit) = c.wait_for(env.clock, up, 0.0, |e| converged(e).is_some()) {
                conv = Some(hit);
                break;
            }
            n += 1;
            let body = format!("learning-{n}");
            let t = env.push(&rt, &pusher, "smart", &body);
            pushes.push((t, body));
            std::thread::sleep(Duration::from_secs(7));
        }
    });
    if loss > 0 {
        env.lab.set_loss(0, 0).expect("loss off");
    }
    let Some((t_conv, e)) = conv else {
        report.check(
            "converges",
            false,
            format!("no convergence within {limit:.0} s"),
        );
        return;
    };
    let (interval_ms, probes) = converged(&e).unwrap();
    let interval = interval_ms as f64 / 1000.0;
    report.num("nat_timeout_s", t_nat);
    report.num("converged_interval_s", interval);
    report.num("converged_ratio", interval / t_nat);
    report.num("probes", probes);
    report.num("time_to_converge_s", t_conv - up);
    let discards = c.count(|e| matches!(e, ClientEvent::Smart(s) if matches!(s.kind, SmartEventKind::ProbeDiscarded { .. })));
    report.num("probes_discarded", discards as u64);
    if loss > 0 {
        report.num("loss_percent", u64::from(loss));
        report.check(
            "a probe whose PING met an outage is discarded, not learned",
            outage.is_some() && discards >= 1,
            format!("outage {outage:?} s; {discards} probes discarded"),
        );
    }
    report.check(
        "converges within 10 % below T",
        interval >= 0.9 * t_nat && interval < t_nat,
        format!(
            "interval {interval:.2} s for T = {t_nat} s ({:.1} %)",
            100.0 * interval / t_nat
        ),
    );
    report.check(
        "in ≤ 10 probes",
        loss > 0 || probes <= 10,
        format!(
            "{probes} probes ({discards} discarded and not counted){}",
            if loss > 0 {
                " — not required under loss"
            } else {
                ""
            }
        ),
    );
    // Pushes during learning arrive within RTT + margin (the main link stays warm).
    std::thread::sleep(Duration::from_secs(1));
    let mut worst: f64 = 0.0;
    let mut missing = 0;
    for (t, body) in &pushes {
        match c.received(body).as_slice() {
            [r] => worst = worst.max(r - t),
            _ => missing += 1,
        }
    }
    report.num("pushes_during_learning", pushes.len() as u64);
    report.num("worst_push_latency_ms", (worst * 1000.0).round());
    // Under the injected outage a push can wait for the link to return (≤ 4 s + RTO).
    let margin = if loss > 0 { 8.0 } else { 0.5 };
    report.check(
        "messages pushed while learning arrive at once",
        missing == 0 && worst <= margin,
        format!(
            "{} pushes, {missing} missing or duplicated, worst latency {:.0} ms (bound {:.0} ms)",
            pushes.len(),
            worst * 1000.0,
            margin * 1000.0
        ),
    );
    // Hold: ≥ 10 intervals at the learned value with no NAT drop.
    let hold_end = t_conv + 10.5 * interval;
    env.sleep_until(hold_end);
    let pings = c.count(|e| matches!(e, ClientEvent::Ping { probe: false, .. }));
    report.num("held_intervals", ((hold_end - t_conv) / interval).floor());
    report.num("main_pings_total", pings as u64);
    let lost = c.disconnects(up, hold_end);
    report.check(
        "main connection never lost (learning and ≥ 10 intervals after)",
        lost.is_empty(),
        format!("{} disconnects: {lost:?}", lost.len()),
    );
    report.series = vec![c.interval_series("smart (side probe)", None, env.clock.t())];
    nat_line(report, t_nat, 0.0, env.clock.t());
}

/// Must-show 4: two networks with different T; switching back reuses what was learned.
fn switch(env: &Env, report: &mut Report) {
    let (t0, t1) = (
        env.lab.nat_timeout(0).as_secs_f64(),
        env.lab.nat_timeout(1).as_secs_f64(),
    );
    let mut cfg = env.config("roamer", "phone");
    cfg.smart_heartbeat = Some(env.smart_settings(ProbeMode::Side));
    cfg.network_id = "net-0".into();
    let c = env.agent(env.lab.client_ns(), "roamer", cfg);
    let rt = root_rt();
    let learn = |after: f64, t_nat: f64| {
        c.wait_for(env.clock, after, 30.0 * t_nat + 120.0, |e| {
            converged(e).is_some()
        })
        .map(|(t, e)| (t, converged(&e).unwrap().0 as f64 / 1000.0))
    };
    let Some((c0, i0)) = learn(0.0, t0) else {
        report.check("learns network 0", false, "no convergence");
        return;
    };
    let mut segments = vec![(0.0, t0)];
    let mut go = |router: usize, id: &str| {
        env.lab.use_router(router).expect("route");
        // Read the clock before the switch: its `Switched` event is stamped during the
        // call, and a loaded machine must not make it look older than the switch.
        let t = env.clock.t();
        let h = c.handle.clone();
        let id = id.to_string();
        rt.block_on(async move { h.switch_network(id).await });
        segments.push((t, if router == 0 { t0 } else { t1 }));
        t
    };
    let s1 = go(1, "net-1");
    let Some((c1, i1)) = learn(s1, t1) else {
        report.check("learns network 1", false, "no convergence");
        return;
    };
    report.num("learned_0_s", i0);
    report.num("learned_1_s", i1);
    report.num("learn_0_s", c0);
    report.num("learn_1_s", c1 - s1);
    let switched = |after: f64| {
        c.wait_for(env.clock, after, 5.0, |e| {
            matches!(e, ClientEvent::Smart(s) if matches!(s.kind, SmartEventKind::Switched { .. }))
        })
        .and_then(|(t, e)| match e {
            ClientEvent::Smart(s) => match s.kind {
                SmartEventKind::Switched { interval_ms, remembered, .. } => {
                    Some((t, interval_ms as f64 / 1000.0, remembered))
                }
                _ => None,
            },
            _ => None,
        })
    };
    let mut ok = true;
    let mut details = Vec::new();
    for (router, id, expect, t_nat) in [
        (0, "net-0", i0, t0),
        (1, "net-1", i1, t1),
        (0, "net-0", i0, t0),
    ] {
        std::thread::sleep(Duration::from_secs_f64(2.0 * expect));
        let at = go(router, id);
        let sw = switched(at);
        // Hold two intervals: no probe should start, no connection should be lost.
        std::thread::sleep(Duration::from_secs_f64(2.5 * expect));
        let probes = c
            .records
            .lock()
            .events
            .iter()
            .filter(|(t, e)| *t >= at && matches!(e, ClientEvent::Smart(s) if matches!(s.kind, SmartEventKind::ProbeStarted { .. })))
            .count();
        let lost = c.disconnects(at + 1.0, env.clock.t());
        let good = sw.is_some_and(|(_, i, r)| r && (i - expect).abs() < 0.001)
            && probes == 0
            && lost.is_empty();
        ok &= good;
        details.push(format!(
            "to {id} (T {t_nat} s): interval {:?} s at once (learned {expect:.2}), {probes} new probes, {} losses",
            sw.map(|x| x.1),
            lost.len()
        ));
    }
    report.check(
        "switching back and forth reuses each learned value immediately",
        ok,
        details.join("; "),
    );
    report.check(
        "each network learned within 10 % below its T",
        i0 >= 0.9 * t0 && i0 < t0 && i1 >= 0.9 * t1 && i1 < t1,
        format!("net-0: {i0:.2} s of {t0} s; net-1: {i1:.2} s of {t1} s"),
    );
    let end = env.clock.t();
    report.series = vec![c.interval_series("smart, roaming", None, env.clock.t())];
    for (i, (from, t)) in segments.iter().enumerate() {
        let to = segments.get(i + 1).map_or(end, |s| s.0);
        nat_line(report, *t, *from, to);
    }
}

/// Must-show 5: a blackhole (cable pulled): the client notices within its bound, the
/// server drops the half-open session within its deadline, and on recovery nothing
/// sent meanwhile is lost.
fn blackhole(env: &Env, report: &mut Report) {
    let rt = root_rt();
    let interval = Duration::from_secs(5);
    let mut cfg = env.config("cut", "phone");
    cfg.heartbeat_interval = interval;
    let c = env.agent(env.lab.client_ns(), "cut", cfg);
    let pusher = env.agent(
        env.lab.server_ns(),
        "pusher",
        env.config("pusher", "server"),
    );
    let Some((up, _)) = c.wait_for(env.clock, 0.0, 10.0, connected) else {
        report.check("connected", false, "no connection");
        return;
    };
    // Mid-interval, so no PING races the cut.
    env.sleep_until(up + 3.5 * interval.as_secs_f64());
    let expired_before = env.sessions_expired().unwrap_or(0);
    env.lab.blackhole(0, true).expect("blackhole");
    let cut = env.clock.t();
    // The last frame the client received before the cut: a PONG.
    let last_rx = c
        .records
        .lock()
        .events
        .iter()
        .rev()
        .find(|(t, e)| *t <= cut && matches!(e, ClientEvent::Pong { .. }))
        .map_or(up, |x| x.0);
    let bound = interval.as_secs_f64() + f64::from(MISSES) * PONG.as_secs_f64();
    let server_bound = bound + GRACE.as_secs_f64() + 0.25;
    for i in 0..5 {
        env.push(&rt, &pusher, "cut", &format!("during-outage-{i}"));
    }
    // Server side: the session expires by its deadline.
    let mut expired_at = None;
    while env.clock.t() < cut + server_bound + 5.0 {
        if env.sessions_expired().unwrap_or(0) > expired_before {
            expired_at = Some(env.clock.t());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let dead = c.wait_for(env.clock, cut, 1.0, |e| {
        matches!(e, ClientEvent::Disconnected { .. })
    });
    match &dead {
        Some((t, ClientEvent::Disconnected { reason, .. })) => {
            let after = t - last_rx;
            report.num("client_detect_after_last_rx_s", after);
            report.check(
                "client detects within I + m·P",
                after <= bound + 0.5 && after >= bound - 0.5,
                format!("{reason} {after:.2} s after the last frame received; bound {bound:.1} s"),
            );
        }
        _ => report.check("client detects within I + m·P", false, "no disconnect"),
    }
    match expired_at {
        Some(t) => {
            // The server's last frame from the client can be up to one interval before the cut.
            let after = t - last_rx;
            report.num("server_expired_after_last_rx_s", after);
            report.check(
                "server drops the half-open session within its deadline",
                after >= bound + GRACE.as_secs_f64() - 0.5 && after <= server_bound + 1.0,
                format!("expired {after:.2} s after the client's last traffic; deadline I + m·P + grace = {:.1} s", bound + GRACE.as_secs_f64()),
            );
        }
        None => report.check(
            "server drops the half-open session within its deadline",
            false,
            "never expired",
        ),
    }
    std::thread::sleep(Duration::from_secs(3));
    env.lab.blackhole(0, false).expect("restore");
    let restored = env.clock.t();
    let back = c
        .wait_for(env.clock, restored, 10.0, connected)
        .map(|x| x.0);
    std::thread::sleep(Duration::from_secs(2));
    let got: Vec<String> = c
        .records
        .lock()
        .received
        .iter()
        .map(|r| r.2.clone())
        .collect();
    let expected: Vec<String> = (0..5).map(|i| format!("during-outage-{i}")).collect();
    report.check(
        "after the link returns: everything once, in order",
        back.is_some() && got == expected,
        format!(
            "reconnected {:?} s after the link returned; received {got:?}",
            back.map(|b| b - restored)
        ),
    );
    report.series =
        vec![c.interval_series("idle 5 s", Some(interval.as_secs_f64()), env.clock.t())];
    nat_line(
        report,
        env.lab.nat_timeout(0).as_secs_f64(),
        0.0,
        env.clock.t(),
    );
}

/// A Mars-like crawl on the main connection (DESIGN §5, scaled): start 210 s, +60 s
/// after 3 successes, −80 s after 2 failures.
fn mars(env: &Env, c: &Agent, rt: &tokio::runtime::Runtime, until: f64) {
    let s = |secs: f64| Duration::from_secs_f64(secs * SCALE);
    let (mut interval, step_up, step_down, floor, cap) =
        (s(210.0), s(60.0), s(80.0), s(60.0), s(890.0));
    let (mut ok, mut failed, mut seen) = (0, 0, 0);
    while env.clock.t() < until {
        std::thread::sleep(Duration::from_millis(100));
        let events: Vec<ClientEvent> = c.records.lock().events[seen..]
            .iter()
            .map(|x| x.1.clone())
            .collect();
        seen += events.len();
        let before = interval;
        for e in events {
            match e {
                ClientEvent::Pong {
                    probe: false, idle, ..
                } if idle >= interval.mul_f64(0.95) => {
                    ok += 1;
                    if ok == 3 {
                        (ok, failed) = (0, 0);
                        interval = (interval + step_up).min(cap);
                    }
                }
                ClientEvent::Disconnected {
                    reason: DisconnectReason::NetworkDead,
                    ..
                } => {
                    failed += 1;
                    ok = 0;
                    if failed == 2 {
                        failed = 0;
                        interval = interval.saturating_sub(step_down).max(floor);
                    }
                }
                _ => {}
            }
        }
        if interval != before {
            let h = c.handle.clone();
            rt.block_on(async move { h.set_heartbeat_interval(interval).await });
            let t = env.clock.t();
            c.records
                .lock()
                .set_intervals
                .push((t, interval.as_secs_f64()));
        }
    }
}

/// Must-show 6: four strategies on the same NAT at once.
fn compare(env: &Env, report: &mut Report, duration: Duration) {
    let t_nat = env.lab.nat_timeout(0).as_secs_f64();
    let rt = root_rt();
    let strategies = ["fixed-30s", "mars-like", "smart-side", "smart-main"];
    let mut agents = HashMap::new();
    for name in strategies {
        let mut cfg = env.config(name, "phone");
        match name {
            "fixed-30s" => {
                cfg.heartbeat_interval = Duration::from_secs_f64(30.0 * SCALE);
                cfg.heartbeat_mode = HeartbeatMode::Fixed;
            }
            "mars-like" => cfg.heartbeat_interval = Duration::from_secs_f64(210.0 * SCALE),
            "smart-side" => cfg.smart_heartbeat = Some(env.smart_settings(ProbeMode::Side)),
            _ => cfg.smart_heartbeat = Some(env.smart_settings(ProbeMode::Main)),
        }
        agents.insert(name, env.agent(env.lab.client_ns(), name, cfg));
    }
    let pusher = env.agent(
        env.lab.server_ns(),
        "pusher",
        env.config("pusher", "server"),
    );
    for a in agents.values() {
        a.wait_for(env.clock, 0.0, 10.0, connected);
    }
    let start = env.clock.t();
    let end = start + duration.as_secs_f64();
    // Mars' controller on its own thread. Each client gets a push every 60 s (a real
    // 5 min: rare enough that the heartbeat, not the traffic, keeps the mapping),
    // staggered by 15 s.
    let mars_agent = agents.remove("mars-like").unwrap();
    let mut pushes = Vec::new();
    std::thread::scope(|s| {
        s.spawn(|| mars(env, &mars_agent, &root_rt(), end));
        let mut n = 0;
        'outer: loop {
            n += 1;
            for (k, name) in strategies.iter().enumerate() {
                let at = start + 60.0 * f64::from(n) + 15.0 * k as f64;
                if at > end - 5.0 {
                    break 'outer;
                }
                env.sleep_until(at);
                let body = format!("{name}-{n}");
                let t = env.push(&rt, &pusher, name, &body);
                pushes.push((*name, t, body));
            }
        }
        env.sleep_until(end);
    });
    agents.insert("mars-like", mars_agent);
    std::thread::sleep(Duration::from_secs(3));
    let day = 86_400.0 * SCALE;
    report.table.push(
        [
            "strategy",
            "heartbeats per scaled day",
            "final interval (s)",
            "time to converge (s)",
            "main connections lost",
            "messages delayed > 1 s",
            "worst delay (s)",
        ]
        .map(String::from)
        .to_vec(),
    );
    for name in strategies {
        let a = &agents[name];
        let pings = a.count(|e| matches!(e, ClientEvent::Ping { .. }));
        let lost = a.disconnects(start, end).len();
        let series = a.interval_series(
            name,
            if name == "fixed-30s" { Some(6.0) } else { None },
            env.clock.t(),
        );
        // The last point is the end of the run; the one before it the last change.
        let final_interval = series.points.last().map_or(0.0, |p| p.1);
        let last_change = series.points.len().saturating_sub(2);
        let settled = series
            .points
            .get(last_change)
            .map_or(0.0, |p| (p.0 - start).max(0.0));
        let converge = match name {
            "fixed-30s" => "0 (never learns)".to_string(),
            "mars-like" if final_interval >= t_nat => format!("not converged ({settled:.0})"),
            _ => format!("{settled:.0}"),
        };
        let mut delayed = 0;
        let mut worst: f64 = 0.0;
        for (who, t, body) in &pushes {
            if *who != name {
                continue;
            }
            let delay = a.received(body).first().map_or(f64::INFINITY, |r| r - t);
            worst = worst.max(delay);
            if delay > 1.0 {
                delayed += 1;
            }
        }
        let per_day = pings as f64 * day / duration.as_secs_f64();
        report.num(
            &format!("{name}_heartbeats_per_scaled_day"),
            per_day.round(),
        );
        report.num(&format!("{name}_main_lost"), lost as u64);
        report.num(&format!("{name}_delayed"), delayed as u64);
        report.num(&format!("{name}_final_interval_s"), final_interval);
        report.table.push(vec![
            name.into(),
            format!("{per_day:.0}"),
            format!("{final_interval:.2}"),
            converge,
            lost.to_string(),
            delayed.to_string(),
            format!("{worst:.2}"),
        ]);
        report.series.push(series);
    }
    let side_lost = report.numbers["smart-side_main_lost"].as_u64().unwrap_or(1);
    let side_delayed = report.numbers["smart-side_delayed"].as_u64().unwrap_or(1);
    report.check(
        "smart with side probe: no main connection lost, no message delayed",
        side_lost == 0 && side_delayed == 0,
        format!("{side_lost} lost, {side_delayed} delayed"),
    );
    let side_final = report.numbers["smart-side_final_interval_s"]
        .as_f64()
        .unwrap_or(0.0);
    report.check(
        "smart converged within 10 % below T",
        side_final >= 0.9 * t_nat && side_final < t_nat,
        format!("{side_final:.2} s for T = {t_nat} s"),
    );
    nat_line(report, t_nat, 0.0, env.clock.t());
}
