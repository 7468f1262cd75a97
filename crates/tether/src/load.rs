//! `tether bench load`: the load generator (issue 8).
//!
//! Two ways to load a server:
//!
//! - **Real sockets** (`--transport tcp|tls|ws|wss|quic`): a `tether serve` child process
//!   (or a running server: `--server URL --data DIR --pid PID`) and worker processes
//!   (`tether bench load-worker`, this binary), each holding its share of SDK clients on
//!   its own source address 127.0.0.x, because one process may open at most 20,000
//!   files. The server's memory and CPU are read from /proc for its process alone, so
//!   the clients' cost never counts (DESIGN §8). A reconnect storm (`--restart-after`)
//!   SIGKILLs the server mid-run and starts it again on the same ports and data.
//! - **In memory** (`--transport memory`): the server and lean protocol clients in this
//!   process, on two runtimes with named threads; the server's CPU is the process's
//!   minus the client threads', its memory the RSS delta minus the simulated wire and
//!   client ends (measured first, with no server ends, and kept while the sessions are
//!   measured).
//!
//! `--pattern pairs` and `--pattern one-pair` run the 1:1 latency and throughput
//! benchmarks against the child server (lean clients in this process).
//!
//! The report is JSON on stdout and Markdown on stderr (and `--json` / `--markdown`).

use crate::bench::{BenchResult, cpu_of, cpu_of_stat, rss_of};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tether_proto::{Frame, frame, pb};
use tether_transport::{Transport, flush, recv};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Pattern {
    /// Connections that only heartbeat.
    Idle,
    /// Heartbeating connections in pairs; each sender sends to its partner at
    /// `--msg-rate` in all, checked for exactly-once, in-order delivery (with
    /// `--restart-after`: across a server crash).
    Chat,
    /// 1:1 latency: `--pairs` pairs at `--rate` messages/s in all (lean clients).
    Pairs,
    /// One-pair throughput ceiling: `--messages` pipelined (lean clients).
    OnePair,
    /// Group fan-out latency: `--groups` groups of `--members`; one member of each
    /// sends to its group, `--rate` messages/s in all, and every other member receives
    /// (lean clients; each copy timed and checked for exactly-once, in-order).
    Groups,
    /// In memory only: PINGs as fast as the server answers them, for the heartbeat
    /// rate per core.
    Flood,
}

#[derive(Args)]
pub struct LoadArgs {
    /// tcp, tls, ws, wss, quic (real sockets from worker processes) or memory (in this
    /// process).
    #[arg(long, default_value = "tcp")]
    transport: String,
    #[arg(long, value_enum, default_value = "idle")]
    pattern: Pattern,
    /// Connections (sessions) to hold.
    #[arg(long, default_value_t = 1000)]
    connections: usize,
    /// Seconds between PINGs of a connection.
    #[arg(long, default_value_t = 30.0)]
    heartbeat: f64,
    /// idle (PING after `--heartbeat` without sending) or fixed (every `--heartbeat`).
    #[arg(long, default_value = "idle", value_parser = ["idle", "fixed"])]
    heartbeat_mode: String,
    /// Seconds of the measured window, once every connection is up.
    #[arg(long, default_value_t = 60)]
    duration: u64,
    /// Chat: messages per second over all pairs.
    #[arg(long, default_value_t = 200.0)]
    msg_rate: f64,
    /// Pairs: pairs of connections.
    #[arg(long, default_value_t = 1000)]
    pairs: usize,
    /// Pairs: messages per second in all.
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Groups: groups, and members in each (the sender included).
    #[arg(long, default_value_t = 100)]
    groups: usize,
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(2..=500))]
    members: u64,
    /// One-pair: messages.
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Message body bytes.
    #[arg(long, default_value_t = 64)]
    body: usize,
    #[arg(long, default_value = "fsync")]
    durability: tether_store::Durability,
    /// Start the connections evenly over this many seconds instead of all at once, so
    /// their heartbeats are spread over the interval as real clients' are (0: as fast
    /// as the server takes them; their PINGs then come in waves).
    #[arg(long, default_value_t = 0.0)]
    connect_over: f64,
    /// Worker processes (default: one per 9,500 connections).
    #[arg(long)]
    workers: Option<usize>,
    /// Source addresses 127.0.0.2 … 127.0.0.(1+N), one per worker in turn.
    #[arg(long, default_value_t = 2)]
    sources: u8,
    /// Reconnect storm: SIGKILL the server this many seconds into the window and start
    /// it again; report how long until every client is back.
    #[arg(long)]
    restart_after: Option<f64>,
    /// The child server's login admission rate (logins/s) and burst.
    #[arg(long, default_value_t = 1e6)]
    login_rate: f64,
    #[arg(long, default_value_t = 1_000_000)]
    login_burst: u32,
    /// The child server's connection worker threads (`serve --workers`; default: one
    /// per core).
    #[arg(long)]
    server_workers: Option<usize>,
    /// The child server runs TCP and TLS connections on one single-threaded runtime per
    /// worker (`serve --per-core-runtimes`).
    #[arg(long)]
    server_per_core_runtimes: bool,
    /// Load a running server instead of a child: its URL (tcp://…, tls://…), …
    #[arg(long, requires_all = ["data", "pid"])]
    server: Option<String>,
    /// … its data directory (for the token secret) …
    #[arg(long)]
    data: Option<PathBuf>,
    /// … and its process id (memory and CPU are read from /proc).
    #[arg(long)]
    pid: Option<u32>,
    /// … and, optionally, its HTTP address (`--http`), for its counters: PINGs
    /// answered, expiries, and the cursor writes the window waits for.
    #[arg(long)]
    server_http: Option<SocketAddr>,
    /// CA certificate for tls/wss/quic against `--server`.
    #[arg(long)]
    ca: Option<PathBuf>,
    /// Also write the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Also write the Markdown report here.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// No progress bar (logs instead).
    #[arg(long)]
    no_progress: bool,
}

pub async fn run(args: LoadArgs) -> BenchResult {
    raise_fd_limit();
    let report = match (args.transport.as_str(), args.pattern) {
        ("memory", Pattern::Flood) => flood(&args).await?,
        ("memory", Pattern::Idle) => memory_idle(&args).await?,
        ("memory", p) => return Err(format!("--transport memory runs idle or flood, not {p:?}")),
        (_, Pattern::Flood) => return Err("--pattern flood runs over --transport memory".into()),
        (_, Pattern::Pairs | Pattern::OnePair | Pattern::Groups) => lean_pattern(&args).await?,
        (_, Pattern::Idle | Pattern::Chat) => sockets(&args).await?,
    };
    let markdown = markdown(&report);
    eprintln!("\n{markdown}");
    if let Some(path) = &args.json {
        std::fs::write(
            path,
            serde_json::to_string_pretty(&report).unwrap_or_default(),
        )
        .map_err(|e| format!("{}: {e}", path.display()))?;
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, &markdown).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(report)
}

/// Raises the soft open-files limit to the hard one (20,000 here).
pub(crate) fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

pub(crate) fn machine() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    json!({
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "cpu": cpu,
        "mem_total_kib": std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| s.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok())),
        "loadavg_at_start": load.split_whitespace().take(3).collect::<Vec<_>>().join(" "),
        "unix_time": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
    })
}

fn new_histogram() -> Histogram<u64> {
    // Microseconds, 1 µs … 10 min, 3 significant digits.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

fn percentiles(h: &Histogram<u64>) -> Value {
    if h.is_empty() {
        return Value::Null;
    }
    json!({
        "count": h.len(),
        "p50": h.value_at_quantile(0.50),
        "p99": h.value_at_quantile(0.99),
        "p999": h.value_at_quantile(0.999),
        "max": h.max(),
    })
}

fn histogram_to_json(h: &Histogram<u64>) -> Value {
    Value::Array(
        h.iter_recorded()
            .map(|v| json!([v.value_iterated_to(), v.count_at_value()]))
            .collect(),
    )
}

fn merge_histogram(into: &mut Histogram<u64>, from: &Value) {
    for pair in from.as_array().into_iter().flatten() {
        if let (Some(v), Some(n)) = (pair[0].as_u64(), pair[1].as_u64()) {
            let _ = into.record_n(v.max(1), n);
        }
    }
}

// ---------------------------------------------------------------------------------
// The server child process.

/// A `tether serve` child on fixed ports (so a restart comes back on the same ones).
struct ServerChild {
    child: Option<Child>,
    args: Vec<String>,
    data: PathBuf,
    http: SocketAddr,
    url: String,
    ca: Option<PathBuf>,
}

fn free_port() -> Result<u16, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(l.local_addr().map_err(|e| e.to_string())?.port())
}

impl ServerChild {
    fn spawn(dir: &Path, args: &LoadArgs) -> Result<Self, String> {
        let data = dir.join("data");
        let port = free_port()?;
        let http = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut argv: Vec<String> = vec![
            "serve".into(),
            "--data".into(),
            data.display().to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", free_port()?),
            "--http".into(),
            http.to_string(),
            "--durability".into(),
            args.durability.to_string(),
            "--login-rate".into(),
            args.login_rate.to_string(),
            "--login-burst".into(),
            args.login_burst.to_string(),
        ];
        if let Some(n) = args.server_workers {
            argv.extend(["--workers".into(), n.to_string()]);
        }
        if args.server_per_core_runtimes {
            argv.push("--per-core-runtimes".into());
        }
        let mut ca = None;
        let url = match args.transport.as_str() {
            "tcp" => {
                // The TCP listener is the main one.
                argv[4] = format!("127.0.0.1:{port}");
                format!("tcp://127.0.0.1:{port}")
            }
            "tls" | "quic" | "wss" => {
                let (cert, key) = tether_transport::tls::self_signed(&["127.0.0.1".into()], 30)
                    .map_err(|e| e.to_string())?;
                let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
                std::fs::write(&c, cert).map_err(|e| e.to_string())?;
                std::fs::write(&k, key).map_err(|e| e.to_string())?;
                argv.extend([
                    "--tls-cert".into(),
                    c.display().to_string(),
                    "--tls-key".into(),
                    k.display().to_string(),
                ]);
                ca = Some(c);
                let (flag, url) = match args.transport.as_str() {
                    "tls" => ("--tls-listen", format!("tls://127.0.0.1:{port}")),
                    "quic" => ("--quic-listen", format!("quic://127.0.0.1:{port}")),
                    _ => ("--https-listen", format!("wss://127.0.0.1:{port}/ws")),
                };
                argv.extend([flag.into(), format!("127.0.0.1:{port}")]);
                url
            }
            "ws" => format!("ws://{http}/ws"),
            other => return Err(format!("unknown transport {other}")),
        };
        let mut s = Self {
            child: None,
            args: argv,
            data,
            http,
            url,
            ca,
        };
        s.start()?;
        Ok(s)
    }

    fn start(&mut self) -> Result<(), String> {
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let mut child = Command::new(exe)
            .args(&self.args)
            .env("TETHER_LOG", "warn,tether_server=info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn tether serve: {e}"))?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        loop {
            match lines.next() {
                Some(Ok(l)) if l.contains("tether server listening") => break,
                Some(Ok(_)) => {}
                _ => return Err("the server did not start".into()),
            }
        }
        // Keep draining its log so it never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines.by_ref() {});
        self.child = Some(child);
        Ok(())
    }

    fn pid(&self) -> String {
        self.child
            .as_ref()
            .map(|c| c.id().to_string())
            .unwrap_or_default()
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the server has written every pending cursor move (two scrapes in a row
/// show none); returns the seconds it took.
async fn cursors_written(http: SocketAddr, limit: Duration) -> Result<f64, String> {
    let started = Instant::now();
    let mut zero_before = false;
    loop {
        let pending = scrape(http)?
            .get("tether_cursor_writes_pending")
            .copied()
            .ok_or("the server exports no tether_cursor_writes_pending")?;
        if pending == 0.0 && zero_before {
            return Ok((started.elapsed().as_secs_f64() * 10.0).round() / 10.0);
        }
        zero_before = pending == 0.0;
        if started.elapsed() > limit {
            return Err(format!(
                "{pending} cursor moves still unwritten after {limit:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The server's Prometheus counters (`tether_<name>_total` and gauges), by name.
fn scrape(http: SocketAddr) -> Result<BTreeMap<String, f64>, String> {
    let mut s = std::net::TcpStream::connect_timeout(&http, Duration::from_secs(2))
        .map_err(|e| format!("metrics {http}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: {http}\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    Ok(text
        .lines()
        .filter(|l| l.starts_with("tether_") && !l.contains('{'))
        .filter_map(|l| {
            let (name, value) = l.split_once(' ')?;
            Some((name.to_string(), value.trim().parse().ok()?))
        })
        .collect())
}

fn counter(m: &BTreeMap<String, f64>, name: &str) -> u64 {
    m.get(&format!("tether_{name}_total"))
        .or_else(|| m.get(&format!("tether_{name}")))
        .copied()
        .unwrap_or(0.0) as u64
}

// ---------------------------------------------------------------------------------
// Real sockets: the parent.

/// What one worker last said.
#[derive(Default, Clone)]
struct WorkerView {
    connected: u64,
    sessions: u64,
    pings: u64,
    pongs: u64,
    disconnects: u64,
    errors: u64,
    sent: u64,
    received: u64,
    done: Option<Value>,
    failed: Option<String>,
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    view: Arc<parking_lot::Mutex<WorkerView>>,
}

impl Worker {
    fn tell(&mut self, what: &str) {
        let _ = writeln!(self.stdin, "{what}");
        let _ = self.stdin.flush();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn sum(workers: &[Worker], f: impl Fn(&WorkerView) -> u64) -> u64 {
    workers.iter().map(|w| f(&w.view.lock())).sum()
}

fn failure(workers: &[Worker]) -> Option<String> {
    workers.iter().find_map(|w| w.view.lock().failed.clone())
}

fn progress_bar(len: u64, hidden: bool) -> ProgressBar {
    let bar = if hidden {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(len)
    };
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {pos}/{len} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar
}

async fn sockets(args: &LoadArgs) -> BenchResult {
    let machine = machine();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut child = None;
    let (url, data, ca, pid, http) = match (&args.server, &args.data, args.pid) {
        (Some(url), Some(data), Some(pid)) => (
            url.clone(),
            data.clone(),
            args.ca.clone(),
            pid.to_string(),
            args.server_http,
        ),
        _ => {
            let c = ServerChild::spawn(dir.path(), args)?;
            let v = (
                c.url.clone(),
                c.data.clone(),
                c.ca.clone(),
                c.pid(),
                Some(c.http),
            );
            child = Some(c);
            v
        }
    };
    if args.restart_after.is_some() && child.is_none() {
        return Err("--restart-after needs the child server (no --server)".into());
    }
    let n = args.connections;
    let workers_n = args.workers.unwrap_or(n.div_ceil(9_500)).clamp(1, n.max(1));
    let run: u32 = rand::random();
    let rss_before = rss_of(&pid)?;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut workers = Vec::new();
    let per = n.div_ceil(workers_n);
    // Pairs must not straddle workers.
    let per = per + per % 2;
    let mut first = 0;
    for w in 0..workers_n {
        let count = per.min(n - first);
        if count == 0 {
            break;
        }
        let source = IpAddr::from([127, 0, 0, 2 + (w as u8 % args.sources.max(1))]);
        let share = args.msg_rate * count as f64 / n as f64;
        let mut cmd = Command::new(&exe);
        cmd.args(["bench", "load-worker", "--url", &url, "--data"])
            .arg(&data)
            .args(["--first", &first.to_string(), "--count", &count.to_string()])
            .args([
                "--source",
                &source.to_string(),
                "--run",
                &format!("{run:x}"),
            ])
            .args(["--heartbeat", &args.heartbeat.to_string()])
            .args(["--heartbeat-mode", &args.heartbeat_mode])
            .args(["--connect-over", &args.connect_over.to_string()])
            .args([
                "--msg-rate",
                &share.to_string(),
                "--body",
                &args.body.to_string(),
            ]);
        if args.pattern == Pattern::Chat {
            cmd.arg("--chat");
        }
        if let Some(ca) = &ca {
            cmd.arg("--ca").arg(ca);
        }
        let mut c = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("spawn worker: {e}"))?;
        let stdin = c.stdin.take().ok_or("no worker stdin")?;
        let stdout = c.stdout.take().ok_or("no worker stdout")?;
        let view = Arc::new(parking_lot::Mutex::new(WorkerView::default()));
        let v = view.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let mut v = v.lock();
                let get = |k: &str| msg[k].as_u64().unwrap_or(0);
                match msg["ev"].as_str() {
                    Some("progress") => {
                        v.connected = get("connected");
                        v.sessions = get("sessions");
                        v.pings = get("pings");
                        v.pongs = get("pongs");
                        v.disconnects = get("disconnects");
                        v.errors = get("errors");
                        v.sent = get("sent");
                        v.received = get("received");
                    }
                    Some("done") => v.done = Some(msg),
                    Some("failed") => v.failed = Some(msg["error"].to_string()),
                    _ => {}
                }
            }
            let mut v = v.lock();
            if v.done.is_none() && v.failed.is_none() {
                v.failed = Some("worker exited".into());
            }
        });
        workers.push(Worker {
            child: c,
            stdin,
            view,
        });
        first += count;
    }

    // Connect.
    let bar = progress_bar(n as u64, args.no_progress);
    bar.set_message("connecting");
    let started = Instant::now();
    let connect_limit =
        Duration::from_secs(60 + n as u64 / 200) + Duration::from_secs_f64(args.connect_over);
    // RSS once a tenth is up: the slope from there excludes the fixed start-up cost.
    let mut tenth: Option<(u64, u64)> = None;
    loop {
        if let Some(e) = failure(&workers) {
            return Err(format!("a worker failed: {e}"));
        }
        let up = sum(&workers, |v| v.connected);
        bar.set_position(up);
        if tenth.is_none() && up >= n as u64 / 10 && up > 0 {
            tenth = Some((up, rss_of(&pid)?));
        }
        if up >= n as u64 {
            break;
        }
        if started.elapsed() > connect_limit {
            return Err(format!(
                "only {up} of {n} connected after {connect_limit:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    bar.set_message("settling");
    tokio::time::sleep(Duration::from_secs(3)).await;
    // Every login moves its device's cursor, and the server writes those moves in
    // bounded chunks (a few hundred a second, so they never hold up a commit): a window
    // that starts before they are written bills that work to the heartbeats.
    let settle_s = match http {
        Some(h) => cursors_written(h, Duration::from_secs(60 + n as u64 / 200)).await?,
        None => 0.0,
    };
    let rss_after = rss_of(&pid)?;

    // The measured window.
    let m0 = match http {
        Some(h) => scrape(h)?,
        None => BTreeMap::new(),
    };
    let cpu0 = cpu_of(&pid)?;
    let window_start = Instant::now();
    for w in &mut workers {
        w.tell("go");
    }
    let total = Duration::from_secs(args.duration);
    let mut storm = Value::Null;
    let mut killed_at = None;
    bar.set_length(args.duration);
    bar.set_position(0);
    while window_start.elapsed() < total {
        if let Some(e) = failure(&workers) {
            return Err(format!("a worker failed: {e}"));
        }
        let pongs = sum(&workers, |v| v.pongs);
        let disc = sum(&workers, |v| v.disconnects);
        let up = sum(&workers, |v| v.connected);
        bar.set_position(window_start.elapsed().as_secs());
        bar.set_message(format!(
            "window: {up} up, {pongs} PONGs, {disc} disconnects, {} sent, {} received",
            sum(&workers, |v| v.sent),
            sum(&workers, |v| v.received)
        ));
        if let (Some(after), None) = (args.restart_after, killed_at)
            && window_start.elapsed().as_secs_f64() >= after
        {
            let c = child.as_mut().ok_or("no child server")?;
            storm = reconnect_storm(c, &workers, n as u64, args, &bar).await?;
            killed_at = Some(Instant::now());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let window = window_start.elapsed();
    let pid_now = child.as_ref().map(|c| c.pid()).unwrap_or(pid.clone());
    let cpu1 = cpu_of(&pid_now)?;
    let m1 = match http {
        Some(h) => scrape(h)?,
        None => BTreeMap::new(),
    };
    let rss_end = rss_of(&pid_now)?;
    bar.set_message("draining");
    for w in &mut workers {
        w.tell("stop");
    }
    let drain_started = Instant::now();
    while workers.iter().any(|w| w.view.lock().done.is_none()) {
        if let Some(e) = failure(&workers) {
            return Err(format!("a worker failed: {e}"));
        }
        if drain_started.elapsed() > Duration::from_secs(60) {
            return Err("workers did not finish within 60 s of stop".into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();

    // Aggregate.
    let mut rtt = new_histogram();
    let mut latency = new_histogram();
    let mut reasons: BTreeMap<String, u64> = BTreeMap::new();
    let mut totals: BTreeMap<&str, u64> = BTreeMap::new();
    for w in &workers {
        let v = w.view.lock();
        let done = v.done.as_ref().ok_or("no report")?;
        merge_histogram(&mut rtt, &done["rtt"]);
        merge_histogram(&mut latency, &done["latency"]);
        for (k, c) in done["reasons"].as_object().into_iter().flatten() {
            *reasons.entry(k.clone()).or_default() += c.as_u64().unwrap_or(0);
        }
        for key in [
            "pings",
            "pongs",
            "sessions",
            "errors",
            "sent",
            "acked",
            "received",
            "lost",
            "duplicates",
            "out_of_order",
            "send_failures",
        ] {
            *totals.entry(key).or_default() += done[key].as_u64().unwrap_or(0);
        }
    }
    let pings_answered = counter(&m1, "heartbeats").saturating_sub(counter(&m0, "heartbeats"));
    let cpu = cpu1.saturating_sub(cpu0);
    let cpu_per_ping = if killed_at.is_none() && pings_answered > 0 {
        json!((cpu.as_secs_f64() * 1e6 / pings_answered as f64 * 100.0).round() / 100.0)
    } else {
        Value::Null
    };
    let expired = if killed_at.is_none() {
        json!(counter(&m1, "sessions_expired").saturating_sub(counter(&m0, "sessions_expired")))
    } else {
        json!(counter(&m1, "sessions_expired"))
    };
    Ok(json!({
        "bench": "load",
        "transport": args.transport,
        "pattern": format!("{:?}", args.pattern).to_lowercase(),
        "connections": n,
        "workers": workers.len(),
        "sources": args.sources,
        "heartbeat_s": args.heartbeat,
        "heartbeat_mode": args.heartbeat_mode,
        "connect_over_s": args.connect_over,
        "server_per_core_runtimes": args.server_per_core_runtimes,
        "durability": args.durability.to_string(),
        "window_s": (window.as_secs_f64() * 10.0).round() / 10.0,
        "machine": machine,
        "connect_s": (connect_secs * 100.0).round() / 100.0,
        "settle_s": settle_s,
        "connect_per_sec": (n as f64 / connect_secs).round(),
        "server_rss_before_bytes": rss_before,
        "server_rss_connected_bytes": rss_after,
        "server_rss_end_bytes": rss_end,
        // Too few connections to sample at a tenth: the whole delta stands in.
        "server_bytes_per_connection": tenth.filter(|(up, _)| *up < n as u64).map(|(up, rss)| (rss_after.saturating_sub(rss) as f64 / (n as u64 - up) as f64).round())
            .unwrap_or((rss_after.saturating_sub(rss_before) as f64 / n as f64).round()),
        "server_bytes_per_connection_incl_startup": (rss_after.saturating_sub(rss_before) as f64 / n as f64).round(),
        "server_cpu_s": (cpu.as_secs_f64() * 1000.0).round() / 1000.0,
        "pings_answered": pings_answered,
        "server_cpu_us_per_ping": cpu_per_ping,
        "ping_rtt_us": percentiles(&rtt),
        "deadlines_expired": expired,
        "client": totals,
        "disconnect_reasons": reasons,
        "latency_us": percentiles(&latency),
        "storm": storm,
        "method": "server RSS and utime+stime from /proc/<server pid>; clients in separate worker processes; bytes per connection = RSS growth from a tenth connected to all connected ÷ the connections added (incl_startup: from before the first); PINGs answered from the server's tether_heartbeats_total",
    }))
}

/// SIGKILLs the server, starts it again on the same ports and data, and waits until
/// every worker's clients are connected again.
async fn reconnect_storm(
    c: &mut ServerChild,
    workers: &[Worker],
    n: u64,
    args: &LoadArgs,
    bar: &ProgressBar,
) -> BenchResult {
    bar.set_message("SIGKILL, restart");
    let sessions_before = sum(workers, |v| v.sessions);
    let killed = Instant::now();
    c.kill();
    c.start()?;
    let up = killed.elapsed();
    // Done when every client has a new session and all are up at once.
    let sessions0 = sessions_before;
    let mut per_second = Vec::new();
    let mut last_logins = 0;
    let mut last_tick = Instant::now();
    let limit = Duration::from_secs(120);
    loop {
        let back = sum(workers, |v| v.connected);
        let new_sessions = sum(workers, |v| v.sessions).saturating_sub(sessions0);
        let back = if new_sessions >= n {
            back
        } else {
            back.min(new_sessions)
        };
        bar.set_message(format!("storm: {back}/{n} back"));
        if last_tick.elapsed() >= Duration::from_secs(1) || back >= n {
            let m = scrape(c.http)?;
            let logins = counter(&m, "logins");
            let secs = last_tick.elapsed().as_secs_f64().max(0.05);
            per_second.push(json!({
                "t_s": (killed.elapsed().as_secs_f64() * 10.0).round() / 10.0,
                "logins": logins - last_logins,
                "logins_per_s": ((logins - last_logins) as f64 / secs).round(),
                "interval_s": (secs * 100.0).round() / 100.0,
                "throttled_total": counter(&m, "logins_throttled"),
                "clients_back": back,
            }));
            last_logins = logins;
            last_tick = Instant::now();
        }
        if back >= n {
            break;
        }
        if killed.elapsed() > limit {
            return Err(format!(
                "only {back} of {n} back {limit:?} after the restart"
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let all_back = killed.elapsed();
    let m = scrape(c.http)?;
    let max_rate = per_second
        .iter()
        // A short last interval would overstate the rate (the burst in a sliver).
        .filter(|s| s["interval_s"].as_f64().unwrap_or(0.0) >= 0.9)
        .filter_map(|s| s["logins_per_s"].as_f64())
        .fold(0.0, f64::max);
    Ok(json!({
        "server_restarted_after_s": (up.as_secs_f64() * 1000.0).round() / 1000.0,
        "all_back_after_kill_s": (all_back.as_secs_f64() * 1000.0).round() / 1000.0,
        "logins_after_restart": counter(&m, "logins"),
        "logins_throttled": counter(&m, "logins_throttled"),
        "max_logins_per_s": max_rate,
        "admission_rate_per_s": args.login_rate,
        "admission_burst": args.login_burst,
        "timeline": per_second,
    }))
}

// ---------------------------------------------------------------------------------
// Real sockets: one worker process.

#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long)]
    url: String,
    #[arg(long)]
    data: PathBuf,
    #[arg(long)]
    ca: Option<PathBuf>,
    #[arg(long)]
    first: usize,
    #[arg(long)]
    count: usize,
    #[arg(long)]
    source: Option<IpAddr>,
    #[arg(long)]
    run: String,
    #[arg(long)]
    heartbeat: f64,
    #[arg(long)]
    heartbeat_mode: String,
    /// Seconds over which this worker's connections start, evenly.
    #[arg(long, default_value_t = 0.0)]
    connect_over: f64,
    #[arg(long)]
    msg_rate: f64,
    #[arg(long)]
    body: usize,
    /// Send in pairs (even → odd) and check delivery.
    #[arg(long)]
    chat: bool,
}

#[derive(Default)]
struct Counts {
    connected: AtomicU64,
    sessions: AtomicU64,
    pings: AtomicU64,
    pongs: AtomicU64,
    disconnects: AtomicU64,
    errors: AtomicU64,
    sent: AtomicU64,
    acked: AtomicU64,
    send_failures: AtomicU64,
    received: AtomicU64,
    duplicates: AtomicU64,
    out_of_order: AtomicU64,
}

fn load(a: &AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}

fn bump(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

/// A disconnect reason without its details.
fn reason_label(reason: &tether_client::DisconnectReason) -> String {
    let text = format!("{reason:?}");
    let end = text.find([' ', '{', '(']).unwrap_or(text.len());
    text[..end].to_string()
}

pub async fn worker(args: WorkerArgs) -> BenchResult {
    raise_fd_limit();
    match worker_inner(args).await {
        Ok(v) => {
            println!("{v}");
            std::process::exit(0)
        }
        Err(e) => {
            println!("{}", json!({"ev": "failed", "error": e}));
            std::process::exit(1)
        }
    }
}

async fn worker_inner(args: WorkerArgs) -> BenchResult {
    use tether_client::{Client, ClientConfig, ClientEvent, NetConnector};
    let auth = tether_server::auth::Authenticator::open(&args.data).map_err(|e| e.to_string())?;
    let connector = Arc::new(
        NetConnector::new(None, None)
            .with_ca_file(args.ca.clone())
            .with_source(args.source),
    );
    let counts = Arc::new(Counts::default());
    let rtt = Arc::new(parking_lot::Mutex::new(new_histogram()));
    let latency = Arc::new(parking_lot::Mutex::new(new_histogram()));
    let reasons = Arc::new(parking_lot::Mutex::new(BTreeMap::<String, u64>::new()));
    let base = Instant::now();
    let sending = Arc::new(AtomicBool::new(false));
    let heartbeat = Duration::from_secs_f64(args.heartbeat);
    let mode = if args.heartbeat_mode == "fixed" {
        tether_core::heartbeat::HeartbeatMode::Fixed
    } else {
        tether_core::heartbeat::HeartbeatMode::Idle
    };
    let user = |i: usize| format!("load-{}-{i}", args.run);
    let senders = if args.chat { args.count / 2 } else { 0 };
    let period = if senders > 0 && args.msg_rate > 0.0 {
        Duration::from_secs_f64(senders as f64 / args.msg_rate)
    } else {
        Duration::ZERO
    };
    // Per sender: the last counter acknowledged (sender side), per receiver: the last
    // received (receiver side).
    let acked_last: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.count).map(|_| AtomicU64::new(0)).collect());
    let received_last: Arc<Vec<AtomicU64>> =
        Arc::new((0..args.count).map(|_| AtomicU64::new(0)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = Vec::with_capacity(args.count);
    for k in 0..args.count {
        let i = args.first + k;
        let mut config = ClientConfig::new(
            args.url.clone(),
            auth.mint(&user(i), Duration::from_secs(24 * 3600)),
            "load",
        );
        config.heartbeat_interval = heartbeat;
        config.heartbeat_mode = mode;
        config.connector = connector.clone();
        config.auto_ack = true;
        config.entry_buffer = 16;
        let counts = counts.clone();
        let (rtt, latency, reasons) = (rtt.clone(), latency.clone(), reasons.clone());
        let gate = gate.clone();
        let (sending, stop) = (sending.clone(), stop.clone());
        let (acked_last, received_last) = (acked_last.clone(), received_last.clone());
        let partner = user(i + 1);
        let chat = args.chat;
        let body_len = args.body;
        let start_at = Duration::from_secs_f64(args.connect_over * k as f64 / args.count as f64);
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(tokio::time::Instant::from_std(base + start_at)).await;
            let permit = gate.acquire_owned().await;
            let mut client = match Client::start(config) {
                Ok(c) => c,
                Err(e) => {
                    bump(&counts.errors);
                    return Err(e.to_string());
                }
            };
            let handle = client.handle();
            let mut events = handle.events();
            // Events: connection state, heartbeats, reasons.
            let ev_counts = counts.clone();
            tokio::spawn(async move {
                let mut up = false;
                let mut permit = permit.ok();
                loop {
                    match events.recv().await {
                        Ok(ClientEvent::Connected(_)) => {
                            bump(&ev_counts.sessions);
                            if !up {
                                up = true;
                                bump(&ev_counts.connected);
                            }
                            permit.take();
                        }
                        Ok(ClientEvent::Disconnected { reason, .. }) => {
                            if up {
                                up = false;
                                ev_counts.connected.fetch_sub(1, Ordering::Relaxed);
                            }
                            bump(&ev_counts.disconnects);
                            *reasons.lock().entry(reason_label(&reason)).or_default() += 1;
                        }
                        Ok(ClientEvent::Ping { probe: false, .. }) => bump(&ev_counts.pings),
                        Ok(ClientEvent::Pong {
                            probe: false,
                            rtt: d,
                            ..
                        }) => {
                            bump(&ev_counts.pongs);
                            let _ = rtt.lock().record((d.as_micros() as u64).max(1));
                        }
                        Ok(ClientEvent::Stopped(e)) => {
                            bump(&ev_counts.errors);
                            *reasons.lock().entry(format!("stopped: {e}")).or_default() += 1;
                            break;
                        }
                        Ok(_) => {}
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                        Err(_) => break,
                    }
                }
            });
            if chat && k % 2 == 0 {
                // Its own inbox (copies of what it sends, receipts) is drained aside.
                tokio::spawn(async move { while client.recv().await.is_some() {} });
                // Sender: one message at a time to the partner, counter in the body.
                let mut next = 1u64;
                let mut tick = tokio::time::interval(period.max(Duration::from_millis(1)));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                // Phases spread over one period.
                tokio::time::sleep(period.mul_f64(rand::random::<f64>())).await;
                loop {
                    tick.tick().await;
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if !sending.load(Ordering::Relaxed) {
                        continue;
                    }
                    let mut body = Vec::with_capacity(body_len.max(16));
                    body.extend_from_slice(&next.to_be_bytes());
                    body.extend_from_slice(&(base.elapsed().as_micros() as u64).to_be_bytes());
                    body.resize(body_len.max(16), b'x');
                    bump(&counts.sent);
                    match handle.send(&partner, Bytes::from(body)).await {
                        Ok(_) => {
                            acked_last[k].store(next, Ordering::Relaxed);
                            bump(&counts.acked);
                            next += 1;
                        }
                        Err(e) => {
                            bump(&counts.send_failures);
                            tracing::warn!(error = %e, "send failed");
                        }
                    }
                }
                // Keep the session (and its heartbeat) until the process ends.
                std::future::pending::<()>().await;
            } else if chat {
                while let Some(entry) = client.recv().await {
                    if entry.body.len() < 16 {
                        continue;
                    }
                    let counter =
                        u64::from_be_bytes(entry.body[..8].try_into().unwrap_or_default());
                    let sent = u64::from_be_bytes(entry.body[8..16].try_into().unwrap_or_default());
                    let now = base.elapsed().as_micros() as u64;
                    let _ = latency.lock().record(now.saturating_sub(sent).max(1));
                    bump(&counts.received);
                    let last = received_last[k].load(Ordering::Relaxed);
                    if counter <= last {
                        bump(&counts.duplicates);
                    } else {
                        if counter != last + 1 {
                            bump(&counts.out_of_order);
                        }
                        received_last[k].store(counter, Ordering::Relaxed);
                    }
                }
            } else {
                // Idle: hold the client; entries (none expected) are drained.
                while client.recv().await.is_some() {}
            }
            Ok::<(), String>(())
        }));
    }

    // Progress to the parent; commands from it.
    let (cmd_tx, mut cmd_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            if cmd_tx.send(line.trim().to_string()).is_err() {
                break;
            }
        }
    });
    let progress = |c: &Counts| {
        println!(
            "{}",
            json!({
                "ev": "progress",
                "connected": load(&c.connected),
                "sessions": load(&c.sessions),
                "pings": load(&c.pings),
                "pongs": load(&c.pongs),
                "disconnects": load(&c.disconnects),
                "errors": load(&c.errors),
                "sent": load(&c.sent),
                "received": load(&c.received),
            })
        );
    };
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = tick.tick() => progress(&counts),
            cmd = cmd_rx.recv() => match cmd.as_deref() {
                Some("go") => sending.store(true, Ordering::Relaxed),
                Some("stop") | None => break,
                Some(_) => {}
            },
        }
    }
    // Stop sending; wait until every receiver has what its sender had acknowledged.
    stop.store(true, Ordering::Relaxed);
    sending.store(false, Ordering::Relaxed);
    let drain = Instant::now();
    let caught_up = || {
        (0..args.count).step_by(2).all(|k| {
            k + 1 >= args.count
                || received_last[k + 1].load(Ordering::Relaxed)
                    >= acked_last[k].load(Ordering::Relaxed)
        })
    };
    while args.chat && !caught_up() && drain.elapsed() < Duration::from_secs(20) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    progress(&counts);
    let lost: u64 = if args.chat {
        (0..args.count)
            .step_by(2)
            .filter(|k| k + 1 < args.count)
            .map(|k| {
                acked_last[k]
                    .load(Ordering::Relaxed)
                    .saturating_sub(received_last[k + 1].load(Ordering::Relaxed))
            })
            .sum()
    } else {
        0
    };
    let c = &counts;
    let report = json!({
        "ev": "done",
        "pings": load(&c.pings),
        "pongs": load(&c.pongs),
        "sessions": load(&c.sessions),
        "errors": load(&c.errors),
        "sent": load(&c.sent),
        "acked": load(&c.acked),
        "send_failures": load(&c.send_failures),
        "received": load(&c.received),
        "duplicates": load(&c.duplicates),
        "out_of_order": load(&c.out_of_order),
        "lost": lost,
        "rtt": histogram_to_json(&rtt.lock()),
        "latency": histogram_to_json(&latency.lock()),
        "reasons": &*reasons.lock(),
    });
    drop(tasks);
    Ok(report)
}

// ---------------------------------------------------------------------------------
// Pairs and one-pair: the lean-client benchmarks against the child server.

async fn lean_pattern(args: &LoadArgs) -> BenchResult {
    if args.transport != "tcp" {
        return Err("--pattern pairs, groups and one-pair run over tcp".into());
    }
    let machine = machine();
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut child_args = LoadArgs { ..clone_args(args) };
    child_args.transport = "tcp".into();
    let c = ServerChild::spawn(dir.path(), &child_args)?;
    let addr: SocketAddr = c
        .url
        .trim_start_matches("tcp://")
        .parse()
        .map_err(|e| format!("{e}"))?;
    let target = crate::bench::Target {
        server: Some(addr),
        data: Some(c.data.clone()),
    };
    let pid = c.pid();
    let cpu0 = cpu_of(&pid)?;
    let started = Instant::now();
    let inner = match args.pattern {
        Pattern::Pairs | Pattern::Groups => {
            let shape = match args.pattern {
                Pattern::Pairs => crate::bench::Shape::Pairs(args.pairs),
                _ => crate::bench::Shape::Groups {
                    groups: args.groups,
                    members: args.members as usize,
                },
            };
            crate::bench::latency(shape, args.rate, args.duration, args.durability, &target).await?
        }
        _ => {
            crate::bench::throughput(args.messages, 2048, args.durability, args.body, &target)
                .await?
        }
    };
    let cpu = cpu_of(&pid)?.saturating_sub(cpu0);
    let us = |k: &str| inner[k].as_f64().map(|ms| (ms * 1000.0).round());
    let timed = matches!(args.pattern, Pattern::Pairs | Pattern::Groups);
    let latency = if timed {
        json!({"count": inner["delivered"], "p50": us("p50_ms"), "p99": us("p99_ms"), "p999": us("p999_ms"), "max": us("max_ms")})
    } else {
        Value::Null
    };
    Ok(json!({
        "bench": "load",
        "transport": "tcp",
        "pattern": format!("{:?}", args.pattern).to_lowercase(),
        "durability": args.durability.to_string(),
        "machine": machine,
        "connections": inner.get("sessions").cloned().unwrap_or(json!(2)),
        "pairs": match args.pattern { Pattern::Pairs => json!(args.pairs), Pattern::OnePair => json!(1), _ => Value::Null },
        "groups": if args.pattern == Pattern::Groups { json!({"groups": args.groups, "members": args.members}) } else { Value::Null },
        "rate_per_sec": if timed { json!(args.rate) } else { Value::Null },
        "delivery": if timed {
            json!({
                "sent": inner["sent"], "expected_copies": inner["expected"],
                "received_copies": inner["received_messages"], "duplicates": inner["duplicates"],
                "out_of_order": inner["out_of_order"], "inbox_gaps": inner["inbox_gaps"],
            })
        } else {
            Value::Null
        },
        "latency_us": latency,
        "msgs_per_sec": inner.get("msgs_per_sec").cloned().unwrap_or(Value::Null),
        "server_cpu_s": (cpu.as_secs_f64() * 1000.0).round() / 1000.0,
        "wall_s": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        "detail": inner,
        "method": "lean protocol clients in this process, the server in a child process; latency = SEND written → DELIVER read (timestamp in the body)",
    }))
}

fn clone_args(a: &LoadArgs) -> LoadArgs {
    LoadArgs {
        transport: a.transport.clone(),
        pattern: a.pattern,
        connections: a.connections,
        heartbeat: a.heartbeat,
        heartbeat_mode: a.heartbeat_mode.clone(),
        connect_over: a.connect_over,
        duration: a.duration,
        msg_rate: a.msg_rate,
        pairs: a.pairs,
        groups: a.groups,
        members: a.members,
        rate: a.rate,
        messages: a.messages,
        body: a.body,
        durability: a.durability,
        workers: a.workers,
        sources: a.sources,
        restart_after: a.restart_after,
        login_rate: a.login_rate,
        login_burst: a.login_burst,
        server_workers: a.server_workers,
        server_per_core_runtimes: a.server_per_core_runtimes,
        server: a.server.clone(),
        data: a.data.clone(),
        pid: a.pid,
        server_http: None,
        ca: a.ca.clone(),
        json: None,
        markdown: None,
        no_progress: a.no_progress,
    }
}

// ---------------------------------------------------------------------------------
// In memory: sessions in this process.

/// Runtimes for the in-memory benchmarks: the server on one, the clients on another
/// whose threads are named `load-cli` so their CPU can be told apart.
fn client_runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("load-cli")
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// CPU used by this process's threads, split into (client threads, everything else).
fn thread_cpu() -> (Duration, Duration) {
    let mut clients = Duration::ZERO;
    let mut rest = Duration::ZERO;
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return (clients, rest);
    };
    for task in dir.flatten() {
        let path = task.path();
        let comm = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        let cpu = cpu_of_stat(&path.join("stat").display().to_string()).unwrap_or_default();
        if comm.starts_with("load-cli") {
            clients += cpu;
        } else {
            rest += cpu;
        }
    }
    (clients, rest)
}

/// CPU of threads that have exited is not in /proc/self/task; the process total is.
fn server_cpu() -> Duration {
    let total = cpu_of("self").unwrap_or_default();
    total.saturating_sub(thread_cpu().0)
}

async fn memory_server(
    durability: tether_store::Durability,
) -> Result<(tether_server::Server, tempfile::TempDir), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let config = tether_server::ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
        http: None,
        durability,
        login_rate: 1e9,
        login_burst: u32::MAX,
        replay_rate: 1e9,
        replay_burst: u32::MAX,
        ..tether_server::ServerConfig::default()
    };
    let server = tether_server::Server::open(config).map_err(|e| e.to_string())?;
    Ok((server, dir))
}

async fn hello<T: Transport>(t: &mut T, token: &str, interval_ms: u32) -> Result<(), String> {
    t.send(&Frame::Hello(pb::Hello {
        version: 1,
        token: token.into(),
        device_id: "load".into(),
        device_epoch: 1,
        heartbeat_interval_ms: interval_ms,
        ..Default::default()
    }))
    .map_err(|e| e.to_string())?;
    flush(t).await.map_err(|e| e.to_string())?;
    loop {
        let raw = recv(t)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("closed during login")?;
        match frame::from_raw(&raw).map_err(|e| e.to_string())? {
            Frame::Welcome(_) => return Ok(()),
            Frame::Error(e) => return Err(format!("login refused: {}", e.reason)),
            _ => {}
        }
    }
}

/// Waits for a PONG; anything else that arrives is skipped.
async fn pong<T: Transport>(t: &mut T) -> Result<(), String> {
    loop {
        let raw = recv(t)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("session closed")?;
        match frame::from_raw(&raw).map_err(|e| e.to_string())? {
            Frame::Pong(_) => return Ok(()),
            Frame::Error(e) => return Err(format!("error: {}", e.reason)),
            _ => {}
        }
    }
}

/// `--transport memory --pattern idle`: N in-memory sessions held for the window, each
/// PINGing every `--heartbeat`.
async fn memory_idle(args: &LoadArgs) -> BenchResult {
    let machine = machine();
    let n = args.connections;
    let (server, _dir) = memory_server(args.durability).await?;
    let cli = client_runtime(1)?;
    let interval_ms = (args.heartbeat * 1000.0) as u32;
    let bar = progress_bar(n as u64, args.no_progress);

    // Warm up allocator pools, the runtime and the store.
    let auth = server.shared().auth.clone();
    let mut warm = Vec::new();
    for i in 0..1000 {
        let mut t = server.connect_memory();
        let token = auth.mint(&format!("warm{i}"), Duration::from_secs(86_400));
        hello(&mut t, &token, interval_ms).await?;
        warm.push(t);
    }

    // Phase A: the simulated wire and client ends alone.
    bar.set_message("measuring the client ends");
    let before_pipes = rss_of("self")?;
    let mut pipes = Vec::with_capacity(n);
    for _ in 0..n {
        let (client, server_end) = tether_transport::memory::pair(tether_proto::PRE_AUTH_MAX_FRAME);
        drop(server_end);
        pipes.push(client);
    }
    let pipes_bytes = rss_of("self")?.saturating_sub(before_pipes);
    // The warm-up sessions end here; they are not pinged.
    drop(warm);

    // Phase B: N sessions, one user each, logged in from the client runtime.
    bar.set_message("logging in");
    let tokens: Vec<String> = (0..n)
        .map(|i| auth.mint(&format!("u{i}"), Duration::from_secs(86_400)))
        .collect();
    let before = rss_of("self")?;
    let started = Instant::now();
    let mut sessions = Vec::with_capacity(n);
    let chunk = 10_000;
    for (c, batch) in tokens.chunks(chunk).enumerate() {
        let ends: Vec<_> = batch.iter().map(|_| server.connect_memory()).collect();
        let batch: Vec<String> = batch.to_vec();
        let logged = cli
            .spawn(async move {
                let mut ends = ends;
                let logins = ends
                    .iter_mut()
                    .zip(batch.iter())
                    .map(|(t, token)| hello(t, token, interval_ms));
                for r in futures_util::future::join_all(logins).await {
                    r?;
                }
                Ok::<_, String>(ends)
            })
            .await
            .map_err(|e| e.to_string())??;
        sessions.extend(logged);
        bar.set_position(((c + 1) * chunk).min(n) as u64);
    }
    drop(tokens);
    let login_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_sessions = rss_of("self")?.saturating_sub(before);
    let per_session = rss_sessions as f64 / n as f64 - pipes_bytes as f64 / n as f64;

    // The window: pingers on the client runtime, each owning a slice of the sessions
    // and PINGing each one once per interval, spread evenly.
    bar.set_length(args.duration);
    bar.set_position(0);
    bar.set_message("holding");
    let metrics = server.shared().metrics.clone();
    let expired0 = metrics.sessions_expired.get();
    let beats0 = metrics.heartbeats.get();
    let cpu0 = server_cpu();
    let cli_cpu0 = thread_cpu().0;
    let window = Duration::from_secs(args.duration);
    let interval = Duration::from_secs_f64(args.heartbeat);
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let late = Arc::new(AtomicU64::new(0));
    // Sessions are dealt round-robin to the slices, so each slice holds them in login
    // order spread over the whole login phase, and its first round (spread like every
    // round) reaches each one about as long after its login as the rounds are apart.
    let slices = 64usize;
    let mut dealt: Vec<Vec<_>> = (0..slices)
        .map(|_| Vec::with_capacity(n / slices + 1))
        .collect();
    for (i, t) in sessions.into_iter().enumerate() {
        dealt[i % slices].push((t, true));
    }
    let mut pingers = Vec::new();
    for mut mine in dealt {
        if mine.is_empty() {
            break;
        }
        let (stop, errors, late) = (stop.clone(), errors.clone(), late.clone());
        pingers.push(cli.spawn(async move {
            // One PING per session per interval, spread evenly over 90 % of it, in the
            // same order every round, so each session's PINGs are an interval apart.
            while !stop.load(Ordering::Relaxed) {
                let round = Instant::now();
                let step = interval.mul_f64(0.9) / mine.len().max(1) as u32;
                let batch = 64;
                for (b, group) in mine.chunks_mut(batch).enumerate() {
                    // Send a batch of PINGs, then collect their PONGs.
                    for (t, alive) in group.iter_mut() {
                        if *alive
                            && (t.send(&Frame::Ping(pb::Ping::default())).is_err()
                                || flush(t).await.is_err())
                        {
                            *alive = false;
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    for (t, alive) in group.iter_mut() {
                        if *alive && pong(t).await.is_err() {
                            *alive = false;
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let due = round + step * ((b + 1) * batch) as u32;
                    tokio::time::sleep_until(due.into()).await;
                    if stop.load(Ordering::Relaxed) {
                        return mine;
                    }
                }
                if round.elapsed() > interval {
                    late.fetch_add(1, Ordering::Relaxed);
                }
                tokio::time::sleep_until((round + interval).into()).await;
            }
            mine
        }));
    }
    let window_start = Instant::now();
    let mut rss_samples = Vec::new();
    while window_start.elapsed() < window {
        tokio::time::sleep(Duration::from_secs(1)).await;
        bar.set_position(window_start.elapsed().as_secs());
        bar.set_message(format!(
            "holding: {} PONGs, {} expired, {} errors",
            metrics.heartbeats.get() - beats0,
            metrics.sessions_expired.get() - expired0,
            errors.load(Ordering::Relaxed)
        ));
        if window_start.elapsed().as_secs().is_multiple_of(60) {
            rss_samples.push(rss_of("self")?);
        }
    }
    let beats = metrics.heartbeats.get() - beats0;
    let expired = metrics.sessions_expired.get() - expired0;
    let cpu = server_cpu().saturating_sub(cpu0);
    let cli_cpu = thread_cpu().0.saturating_sub(cli_cpu0);
    let rss_end = rss_of("self")?;
    stop.store(true, Ordering::Relaxed);
    let registered = server.shared().registry.len();
    bar.finish_and_clear();
    let mut held = Vec::new();
    for p in pingers {
        if let Ok(s) = p.await {
            held.extend(s.into_iter().map(|(t, _)| t));
        }
    }
    drop(pipes);
    // Dropping a million sessions takes a while; the numbers are in.
    std::mem::forget(held);
    std::mem::forget(cli);
    Ok(json!({
        "bench": "load",
        "transport": "memory",
        "pattern": "idle",
        "connections": n,
        "registered_at_end": registered,
        "heartbeat_s": args.heartbeat,
        "window_s": window.as_secs(),
        "machine": machine,
        "connect_per_sec": (n as f64 / login_secs).round(),
        "rss_sessions_delta_bytes": rss_sessions,
        "client_ends_bytes": pipes_bytes,
        "server_bytes_per_connection": per_session.round(),
        // The same at the window's end. Right after the logins the store still holds
        // every new device's rows in memory until its checkpoint has written them to
        // the database (bounded, not per session); by the end it has.
        "server_bytes_per_connection_at_end": ((rss_end as f64 - before as f64 - pipes_bytes as f64) / n as f64).round(),
        "server_rss_end_minus_start_bytes": rss_end as i64 - (before + rss_sessions) as i64,
        "rss_per_minute_bytes": rss_samples,
        "pings_answered": beats,
        "server_cpu_s": (cpu.as_secs_f64() * 1000.0).round() / 1000.0,
        "client_cpu_s": (cli_cpu.as_secs_f64() * 1000.0).round() / 1000.0,
        "server_cpu_us_per_ping": (cpu.as_secs_f64() * 1e6 / beats.max(1) as f64 * 100.0).round() / 100.0,
        "deadlines_expired": expired,
        "client": {"sessions_lost": errors.load(Ordering::Relaxed), "late_rounds": late.load(Ordering::Relaxed)},
        "method": "one process; server CPU = process utime+stime minus the client runtime's threads (load-cli); server bytes = RSS delta over N logged-in sessions minus the RSS delta of N bare pipes with their client ends",
    }))
}

/// `--transport memory --pattern flood`: `--connections` sessions PINGing back to back
/// (8 in flight each): PONGs per second of server CPU.
async fn flood(args: &LoadArgs) -> BenchResult {
    let machine = machine();
    let n = args.connections;
    let (server, _dir) = memory_server(args.durability).await?;
    let cli = client_runtime(1)?;
    let auth = server.shared().auth.clone();
    let mut sessions = Vec::with_capacity(n);
    for i in 0..n {
        let mut t = server.connect_memory();
        let token = auth.mint(&format!("f{i}"), Duration::from_secs(86_400));
        hello(&mut t, &token, 30_000).await?;
        sessions.push(t);
    }
    let metrics = server.shared().metrics.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let beats0 = metrics.heartbeats.get();
    let cpu0 = server_cpu();
    let cli0 = thread_cpu().0;
    let started = Instant::now();
    let mut tasks = Vec::new();
    for mut t in sessions {
        let stop = stop.clone();
        tasks.push(cli.spawn(async move {
            let depth = 8;
            for _ in 0..depth {
                let _ = t.send(&Frame::Ping(pb::Ping::default()));
            }
            let _ = flush(&mut t).await;
            while !stop.load(Ordering::Relaxed) {
                // One PONG in, one PING out: `depth` stay in flight.
                if pong(&mut t).await.is_err() {
                    break;
                }
                if t.send(&Frame::Ping(pb::Ping::default())).is_err()
                    || flush(&mut t).await.is_err()
                {
                    break;
                }
            }
            t
        }));
    }
    let window = Duration::from_secs(args.duration);
    tokio::time::sleep(window).await;
    let beats = metrics.heartbeats.get() - beats0;
    let cpu = server_cpu().saturating_sub(cpu0);
    let cli_cpu = thread_cpu().0.saturating_sub(cli0);
    let secs = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    std::mem::forget(tasks);
    std::mem::forget(cli);
    Ok(json!({
        "bench": "load",
        "transport": "memory",
        "pattern": "flood",
        "connections": n,
        "window_s": (secs * 10.0).round() / 10.0,
        "machine": machine,
        "pings_answered": beats,
        "pongs_per_sec": (beats as f64 / secs).round(),
        "server_cpu_s": (cpu.as_secs_f64() * 1000.0).round() / 1000.0,
        "client_cpu_s": (cli_cpu.as_secs_f64() * 1000.0).round() / 1000.0,
        "pongs_per_server_cpu_second": (beats as f64 / cpu.as_secs_f64().max(1e-9)).round(),
        "server_cpu_us_per_ping": (cpu.as_secs_f64() * 1e6 / beats.max(1) as f64 * 1000.0).round() / 1000.0,
        "method": "one process, server and clients on separate runtimes; server CPU = process utime+stime minus the client runtime's threads (load-cli); per core = PONGs ÷ server CPU seconds",
    }))
}

// ---------------------------------------------------------------------------------
// Markdown.

fn markdown(r: &Value) -> String {
    let mut out = String::new();
    let m = &r["machine"];
    out.push_str(&format!(
        "## tether bench load: {} over {}, {}\n\n",
        r["pattern"].as_str().unwrap_or("?"),
        r["transport"].as_str().unwrap_or("?"),
        r["connections"]
    ));
    out.push_str(&format!(
        "Machine: {} × {}, {} KiB; load average at start {}.\n\n| what | value |\n|---|---|\n",
        m["cpus"],
        m["cpu"].as_str().unwrap_or("?"),
        m["mem_total_kib"],
        m["loadavg_at_start"].as_str().unwrap_or("?")
    ));
    let mut row = |k: &str, v: &Value| {
        if !v.is_null() {
            let text = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            out.push_str(&format!("| {k} | {text} |\n"));
        }
    };
    for key in [
        "durability",
        "heartbeat_s",
        "heartbeat_mode",
        "window_s",
        "workers",
        "connect_per_sec",
        "settle_s",
        "server_bytes_per_connection",
        "server_bytes_per_connection_at_end",
        "server_cpu_us_per_ping",
        "pings_answered",
        "pongs_per_sec",
        "pongs_per_server_cpu_second",
        "deadlines_expired",
        "ping_rtt_us",
        "pairs",
        "groups",
        "rate_per_sec",
        "latency_us",
        "delivery",
        "msgs_per_sec",
        "server_cpu_s",
        "client_cpu_s",
        "client",
        "disconnect_reasons",
    ] {
        row(key, &r[key]);
    }
    if let Some(storm) = r["storm"].as_object() {
        for key in [
            "server_restarted_after_s",
            "all_back_after_kill_s",
            "max_logins_per_s",
            "admission_rate_per_s",
            "admission_burst",
            "logins_throttled",
        ] {
            row(
                &format!("storm: {key}"),
                storm.get(key).unwrap_or(&Value::Null),
            );
        }
    }
    out
}
