//! `tether chaos`: the delivery guarantee (DESIGN §6) under everything a mobile network
//! and a crashing server can do, with numbers anyone can read.
//!
//! M senders send to K recipients with D devices each, through a proxy that kills
//! connections at random (reset or silent), while the server process is SIGKILLed and
//! restarted at random moments. Some of those kills are simulated power cuts: that
//! server process ran with `--simulate-power-loss`, so every store write it had not
//! fdatasynced dies with it. With `--lab` (root) the clients reach the server through the
//! network lab's NAT with packet loss and blackhole periods.
//!
//! At the end every device must hold every acknowledged message exactly once, each
//! sender's messages in the order they were sent; a message reported *unconfirmed* may
//! arrive at most once.

mod proxy;

use proxy::{Kill, Proxy};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tether_client::{Client, ClientConfig, ClientError, ClientEvent, ClientMsgId};
use tether_lab::{Lab, LabSpec};

/// Arguments of `tether chaos`.
#[derive(clap::Args, Debug, Clone)]
pub struct ChaosArgs {
    /// Sending users (one device each).
    #[arg(long, default_value_t = 4)]
    pub senders: usize,
    /// Receiving users.
    #[arg(long, default_value_t = 4)]
    pub recipients: usize,
    /// Devices per receiving user.
    #[arg(long, default_value_t = 2)]
    pub devices: usize,
    /// Messages in total.
    #[arg(long, default_value_t = 10_000)]
    pub messages: usize,
    /// Messages per second, all senders together.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Server SIGKILLs (crashes; the page cache survives).
    #[arg(long, default_value_t = 5)]
    pub server_kills: usize,
    /// Simulated power cuts (SIGKILL of a server whose unsynced writes die with it).
    #[arg(long, default_value_t = 2)]
    pub power_cuts: usize,
    /// Connection kills by the proxy (a fifth of them silent).
    #[arg(long, default_value_t = 300)]
    pub conn_kills: usize,
    /// Run through the network lab (root): NAT with `--loss` and blackhole periods.
    #[arg(long)]
    pub lab: bool,
    /// Packet loss in the lab, percent, both directions.
    #[arg(long, default_value_t = 10)]
    pub loss: u8,
    /// Blackhole periods in the lab (2 to 8 s each).
    #[arg(long, default_value_t = 4)]
    pub blackholes: usize,
    /// Clients' outbox: how long a send may go unanswered on a live connection, ms.
    #[arg(long, default_value_t = 5_000)]
    pub ack_timeout_ms: u64,
    /// Clients' outbox: unanswered tries before a send is reported unconfirmed.
    #[arg(long, default_value_t = 3)]
    pub max_tries: u32,
    /// Clients' outbox: how long a send may wait without a session, ms.
    #[arg(long, default_value_t = 30_000)]
    pub offline_window_ms: u64,
    /// Random seed (chosen and printed when absent).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Directory for report.json, report.md and server.log (default: a new temp dir).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// Client heartbeat in the run: short, so silent kills are noticed within seconds.
const HEARTBEAT: Duration = Duration::from_secs(4);
const PONG_MS: u64 = 1500;
const SERVER_PORT: u16 = 7400;
/// How long the run may take to deliver everything after the last send is answered.
const SETTLE: Duration = Duration::from_secs(120);

/// The report, also written as report.json.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub seed: u64,
    pub lab: bool,
    pub loss_percent: u8,
    pub blackholes: usize,
    pub senders: usize,
    pub recipients: usize,
    pub devices_per_recipient: usize,
    pub sent: usize,
    pub acknowledged: usize,
    pub unconfirmed: usize,
    pub send_errors: usize,
    pub server_kills: usize,
    pub power_cuts: usize,
    pub conn_kills_reset: usize,
    pub conn_kills_silent: usize,
    pub connections_accepted: u64,
    pub sessions: u64,
    /// SEND_ACKs that said "duplicate": retries the server recognised.
    pub duplicates_suppressed_server: u64,
    /// Replayed DELIVERs the SDK dropped before the app saw them.
    pub duplicates_suppressed_client: u64,
    pub sends_transmitted: u64,
    pub delivered_per_device: Vec<DeviceReport>,
    pub duplicates_shown: usize,
    pub out_of_order: usize,
    pub lost: usize,
    pub unconfirmed_delivered_once: usize,
    pub unconfirmed_not_delivered: usize,
    pub clients_stopped: usize,
    /// Deliveries a device was not owed (wrong recipient, failed send, bad body).
    pub unexpected: usize,
    pub send_seconds: f64,
    pub settle_seconds: f64,
    pub problems: Vec<String>,
}

/// What one device received.
#[derive(Debug, Default, Serialize, Clone)]
pub struct DeviceReport {
    pub device: String,
    pub delivered: usize,
    pub expected: usize,
}

impl Report {
    fn passed(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Runs `tether chaos`.
pub fn run(args: ChaosArgs) -> ExitCode {
    match run_inner(&args) {
        Ok(report) => {
            print!("{}", render(&report));
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("tether chaos: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the server runs and how to reach it.
struct Env {
    exe: PathBuf,
    data: PathBuf,
    out: PathBuf,
    lab: Option<Lab>,
    listen: SocketAddr,
    http: SocketAddr,
}

impl Env {
    fn spawn_server(&self, power_loss: Option<u64>) -> Result<Child, String> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.out.join("server.log"))
            .map_err(|e| e.to_string())?;
        let mut cmd = match &self.lab {
            Some(lab) => lab.command_in(lab.server_ns(), &self.exe),
            None => Command::new(&self.exe),
        };
        cmd.arg("serve")
            .arg("--data")
            .arg(&self.data)
            .args(["--listen", &self.listen.to_string()])
            .args(["--http", &self.http.to_string()])
            .args(["--heartbeat-min-ms", "1000"])
            .args(["--pong-timeout-ms", &PONG_MS.to_string()])
            .args(["--max-misses", "2"])
            .args(["--deadline-grace-ms", "1000"])
            .env("TETHER_LOG", "warn,tether_server=info,tether_store=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(|e| e.to_string())?)
            .stderr(log);
        if let Some(seed) = power_loss {
            cmd.args(["--simulate-power-loss", &seed.to_string()]);
        }
        cmd.spawn()
            .map_err(|e| format!("cannot start the server: {e}"))
    }
}

impl Env {
    /// Waits until the server accepts TCP connections (20 s at most) and is still alive.
    fn wait_ready(&self, child: &mut Child) -> bool {
        let end = Instant::now() + Duration::from_secs(20);
        while Instant::now() < end {
            if !matches!(child.try_wait(), Ok(None)) {
                return false;
            }
            if std::net::TcpStream::connect_timeout(&self.listen, Duration::from_secs(1)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

/// One server lifetime's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Crash {
    Kill,
    PowerCut,
}

fn run_inner(args: &ChaosArgs) -> Result<Report, String> {
    if args.senders == 0 || args.recipients == 0 || args.devices == 0 || args.messages == 0 {
        return Err("senders, recipients, devices and messages must be positive".into());
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    eprintln!("tether chaos: seed {seed}");
    let out = match &args.out {
        Some(dir) => dir.clone(),
        None => tempfile::Builder::new()
            .prefix("tether-chaos-")
            .tempdir()
            .map_err(|e| e.to_string())?
            .keep(),
    };
    std::fs::create_dir_all(&out).map_err(|e| e.to_string())?;
    let data = out.join("server-data");
    let _ = std::fs::remove_dir_all(&data);
    let _ = std::fs::remove_file(out.join("server.log"));
    let lab = if args.lab {
        tether_lab::require_root().map_err(|e| e.to_string())?;
        tether_lab::install_interrupt_cleanup();
        let lab = Lab::create(LabSpec::with_nat_timeout(Duration::from_secs(120)))
            .map_err(|e| e.to_string())?;
        Some(lab)
    } else {
        None
    };
    let (listen, http) = match &lab {
        Some(_) => (
            SocketAddr::from((Lab::server_ip(), SERVER_PORT)),
            SocketAddr::from((Lab::server_ip(), SERVER_PORT + 1)),
        ),
        None => (free_port()?, free_port()?),
    };
    let env = Arc::new(Env {
        exe: std::env::current_exe().map_err(|e| e.to_string())?,
        data,
        out: out.clone(),
        lab,
        listen,
        http,
    });
    let mut rng = StdRng::seed_from_u64(seed);
    let mut crashes: Vec<Crash> = std::iter::repeat_n(Crash::Kill, args.server_kills)
        .chain(std::iter::repeat_n(Crash::PowerCut, args.power_cuts))
        .collect();
    crashes.shuffle(&mut rng);

    let first = env.spawn_server(power_loss_seed(&crashes, 0, &mut rng))?;
    wait_for(
        || env.data.join("jwt-secret").exists(),
        Duration::from_secs(20),
    )
    .map_err(|_| "the server did not start (see server.log)".to_string())?;

    let client_side = {
        let env = env.clone();
        let args = args.clone();
        move || -> Result<Report, String> {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            rt.block_on(drive(env, args, seed, crashes, first))
        }
    };
    let result = match &env.lab {
        Some(lab) => lab
            .spawn_thread_in(lab.client_ns(), "chaos-clients", client_side)
            .join()
            .map_err(|_| "the client thread panicked".to_string())?,
        None => client_side(),
    };
    let report = result?;
    std::fs::write(
        out.join("report.json"),
        serde_json::to_vec_pretty(&report).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    std::fs::write(out.join("report.md"), render(&report)).map_err(|e| e.to_string())?;
    eprintln!("tether chaos: report in {}", out.display());
    Ok(report)
}

/// The seed for server lifetime `i` if it must end in a power cut.
fn power_loss_seed(crashes: &[Crash], i: usize, rng: &mut StdRng) -> Option<u64> {
    (crashes.get(i) == Some(&Crash::PowerCut)).then(|| rng.random())
}

fn free_port() -> Result<SocketAddr, String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    l.local_addr().map_err(|e| e.to_string())
}

fn wait_for(f: impl Fn() -> bool, limit: Duration) -> Result<(), ()> {
    let end = Instant::now() + limit;
    while !f() {
        if Instant::now() > end {
            return Err(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// What one sender learned about one of its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acked,
    Unconfirmed,
    Failed,
}

/// One message: sender index, number within the sender, recipient index.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct MsgKey {
    sender: u32,
    n: u32,
}

fn body(key: MsgKey, recipient: usize) -> bytes::Bytes {
    bytes::Bytes::from(format!("{}:{}:{recipient}", key.sender, key.n))
}

fn parse_body(b: &[u8]) -> Option<(MsgKey, usize)> {
    let s = std::str::from_utf8(b).ok()?;
    let mut it = s.split(':');
    let sender = it.next()?.parse().ok()?;
    let n = it.next()?.parse().ok()?;
    let recipient = it.next()?.parse().ok()?;
    Some((MsgKey { sender, n }, recipient))
}

/// Everything one device handed to the app, in order.
#[derive(Default)]
struct DeviceLog {
    received: Vec<MsgKey>,
    /// The recipient each message named, by arrival.
    addressed_to: Vec<usize>,
    /// Entries whose body is not a chaos message.
    unparsable: usize,
}

struct Device {
    name: String,
    /// Recipient index, or `None` for a sender's own device (its copies of what it sent).
    recipient: Option<usize>,
    sender: Option<u32>,
    log: Arc<parking_lot::Mutex<DeviceLog>>,
    client: tether_client::ClientHandle,
}

fn client_config(
    env: &Env,
    args: &ChaosArgs,
    proxy: SocketAddr,
    user: &str,
    device: &str,
) -> Result<ClientConfig, String> {
    let token = tether_server::auth::mint_token(&env.data, user).map_err(|e| e.to_string())?;
    let mut c = ClientConfig::new(proxy.to_string(), token, device);
    c.heartbeat_interval = HEARTBEAT;
    c.pong_timeout = Duration::from_millis(PONG_MS);
    c.connect_timeout = Duration::from_secs(3);
    c.backoff_base = Duration::from_millis(200);
    c.backoff_cap = Duration::from_secs(2);
    c.auto_ack = true;
    c.state_path = Some(
        env.out
            .join("clients")
            .join(format!("{user}@{device}.json")),
    );
    c.outbox.ack_timeout = Duration::from_millis(args.ack_timeout_ms);
    c.outbox.max_tries = args.max_tries.max(1);
    c.outbox.offline_window = Duration::from_millis(args.offline_window_ms);
    Ok(c)
}

async fn drive(
    env: Arc<Env>,
    args: ChaosArgs,
    seed: u64,
    crashes: Vec<Crash>,
    first: Child,
) -> Result<Report, String> {
    let mut report = Report {
        seed,
        lab: args.lab,
        loss_percent: if args.lab { args.loss } else { 0 },
        blackholes: if args.lab { args.blackholes } else { 0 },
        senders: args.senders,
        recipients: args.recipients,
        devices_per_recipient: args.devices,
        ..Report::default()
    };
    let _ = std::fs::remove_dir_all(env.out.join("clients"));
    let proxy = Proxy::start(SocketAddr::from(([127, 0, 0, 1], 0)), env.listen)
        .await
        .map_err(|e| format!("proxy: {e}"))?;

    // Devices: every recipient's devices, and each sender's own device.
    let mut devices = Vec::new();
    let mut clients = Vec::new();
    for r in 0..args.recipients {
        for d in 0..args.devices {
            let user = format!("r{r}");
            let device = format!("d{d}");
            let client = Client::start(client_config(&env, &args, proxy.addr(), &user, &device)?)
                .map_err(|e| e.to_string())?;
            devices.push(Device {
                name: format!("{user}/{device}"),
                recipient: Some(r),
                sender: None,
                log: Default::default(),
                client: client.handle(),
            });
            clients.push(client);
        }
    }
    for s in 0..args.senders {
        let user = format!("s{s}");
        let client = Client::start(client_config(&env, &args, proxy.addr(), &user, "phone")?)
            .map_err(|e| e.to_string())?;
        devices.push(Device {
            name: format!("{user}/phone"),
            recipient: None,
            sender: Some(s as u32),
            log: Default::default(),
            client: client.handle(),
        });
        clients.push(client);
    }
    let stopped = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut readers = Vec::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for (device, mut client) in devices.iter().zip(clients) {
        let mut stop = stop_rx.clone();
        let log = device.log.clone();
        let stopped = stopped.clone();
        let mut events = client.events();
        tokio::spawn(async move {
            loop {
                let e = match events.recv().await {
                    Ok(e) => e,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(_) => break,
                };
                if let ClientEvent::Stopped(err) = e {
                    if !matches!(err, ClientError::Closed) {
                        tracing::error!(%err, "a chaos client stopped");
                        stopped.fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
            }
        });
        readers.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    entry = client.recv() => match entry {
                        // Delivered and read receipts ride the same stream; the
                        // verdict is about messages.
                        Some(entry) if entry.r#type != tether_client::EntryType::Message as i32 => {}
                        Some(entry) => {
                            let mut log = log.lock();
                            match parse_body(&entry.body) {
                                Some((key, recipient)) => {
                                    log.received.push(key);
                                    log.addressed_to.push(recipient);
                                }
                                None => log.unparsable += 1,
                            }
                        }
                        None => break,
                    },
                    _ = stop.changed() => break,
                }
            }
            client.close().await;
        }));
    }

    // Senders.
    let per_sender = args.messages.div_ceil(args.senders);
    let gap = Duration::from_secs_f64(args.senders as f64 / args.rate);
    let send_duration = gap * per_sender as u32;
    let outcomes = Arc::new(parking_lot::Mutex::new(
        HashMap::<MsgKey, (usize, Outcome)>::new(),
    ));
    let mut sender_tasks = Vec::new();
    for s in 0..args.senders {
        let handle = devices[args.recipients * args.devices + s].client.clone();
        let outcomes = outcomes.clone();
        let recipients = args.recipients;
        let count = args.messages.saturating_sub(s * per_sender).min(per_sender);
        let mut rng = StdRng::seed_from_u64(seed ^ (s as u64 + 1));
        sender_tasks.push(tokio::spawn(async move {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let waiter = tokio::spawn({
                let outcomes = outcomes.clone();
                async move {
                    while let Some((key, recipient, ticket)) = rx.recv().await {
                        let ticket: tether_client::SendTicket = ticket;
                        let outcome = match ticket.outcome().await {
                            Ok(_) => Outcome::Acked,
                            Err(ClientError::Unconfirmed { .. }) => Outcome::Unconfirmed,
                            Err(e) => {
                                tracing::error!(%e, "send failed");
                                Outcome::Failed
                            }
                        };
                        outcomes.lock().insert(key, (recipient, outcome));
                    }
                }
            });
            let start = tokio::time::Instant::now();
            for n in 0..count {
                tokio::time::sleep_until(start + gap * n as u32).await;
                let key = MsgKey {
                    sender: s as u32,
                    n: n as u32,
                };
                let recipient = rng.random_range(0..recipients);
                match handle
                    .enqueue(
                        ClientMsgId::generate(),
                        &format!("r{recipient}"),
                        body(key, recipient),
                        "text/plain",
                    )
                    .await
                {
                    Ok(ticket) => {
                        let _ = tx.send((key, recipient, ticket));
                    }
                    Err(e) => {
                        tracing::error!(%e, "enqueue failed");
                        outcomes.lock().insert(key, (recipient, Outcome::Failed));
                    }
                }
            }
            drop(tx);
            let _ = waiter.await;
        }));
    }

    // Chaos: server crashes and power cuts, connection kills, lab impairments.
    let started = Instant::now();
    let chaos_on = Arc::new(AtomicBool::new(true));
    let server_env = env.clone();
    let server_plan = crashes.clone();
    let mut server_rng = StdRng::seed_from_u64(seed ^ 0x5e5e);
    let server_task = tokio::task::spawn_blocking(move || {
        let mut child = first;
        let mut done = Vec::new();
        let events = server_plan.len();
        for (i, crash) in server_plan.iter().enumerate() {
            // Spread over 10 %..85 % of the send phase, jittered within each slot.
            let slot = send_duration.as_secs_f64() * 0.75 / events as f64;
            let at = send_duration.as_secs_f64() * 0.10
                + slot * (i as f64 + server_rng.random_range(0.2..0.8));
            let wait = Duration::from_secs_f64(at).saturating_sub(started.elapsed());
            std::thread::sleep(wait);
            // The server must still be up: a restart that died on its own (e.g. a store
            // that would not open after a power cut) is a failure, not a kill.
            if let Ok(Some(status)) = child.try_wait() {
                return (
                    done,
                    Err(format!("the server exited by itself: {status}")),
                    None,
                );
            }
            let _ = child.kill();
            let _ = child.wait();
            done.push(*crash);
            tracing::info!(?crash, t = started.elapsed().as_secs_f64(), "server killed");
            let next = power_loss_seed(&server_plan, i + 1, &mut server_rng);
            match server_env.spawn_server(next) {
                Ok(c) => child = c,
                Err(e) => return (done, Err(e), None),
            }
            if !server_env.wait_ready(&mut child) {
                return (
                    done,
                    Err("a restarted server never accepted connections".into()),
                    None,
                );
            }
        }
        (done, Ok(()), Some(child))
    });
    let killer = {
        let chaos_on = chaos_on.clone();
        let every = send_duration / args.conn_kills.max(1) as u32;
        let proxy_ref = Arc::new(proxy);
        let p = proxy_ref.clone();
        let mut rng = StdRng::seed_from_u64(seed ^ 0xc0ffee);
        let task = tokio::spawn(async move {
            let (mut reset, mut silent) = (0usize, 0usize);
            let mut tick = tokio::time::interval(every.max(Duration::from_millis(10)));
            tick.tick().await;
            while chaos_on.load(Ordering::Relaxed) {
                tick.tick().await;
                let how = if rng.random_bool(0.2) {
                    Kill::Silent
                } else {
                    Kill::Reset
                };
                if p.kill_one(&mut rng, how) {
                    match how {
                        Kill::Reset => reset += 1,
                        Kill::Silent => silent += 1,
                    }
                }
            }
            (reset, silent)
        });
        (task, proxy_ref)
    };
    let lab_task = env.lab.as_ref().map(|_| {
        let env = env.clone();
        let loss = args.loss;
        let blackholes = args.blackholes;
        let mut rng = StdRng::seed_from_u64(seed ^ 0xb1ac);
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let lab = env.lab.as_ref().expect("lab");
            lab.set_loss(0, loss).map_err(|e| e.to_string())?;
            for i in 0..blackholes {
                let slot = send_duration.as_secs_f64() * 0.8 / blackholes as f64;
                let at = send_duration.as_secs_f64() * 0.1
                    + slot * (i as f64 + rng.random_range(0.1..0.5));
                std::thread::sleep(Duration::from_secs_f64(at).saturating_sub(started.elapsed()));
                let hold = Duration::from_secs_f64(rng.random_range(2.0..8.0));
                lab.blackhole(0, true).map_err(|e| e.to_string())?;
                tracing::info!(seconds = hold.as_secs_f64(), "blackhole");
                std::thread::sleep(hold);
                lab.blackhole(0, false).map_err(|e| e.to_string())?;
            }
            Ok(())
        })
    });

    let mut sender_panics = 0;
    for t in sender_tasks {
        sender_panics += usize::from(t.await.is_err());
    }
    report.send_seconds = started.elapsed().as_secs_f64();
    let (done, server_result, mut final_server) = server_task.await.map_err(|e| e.to_string())?;
    chaos_on.store(false, Ordering::Relaxed);
    let (reset, silent) = killer.0.await.map_err(|e| e.to_string())?;
    if let Some(t) = lab_task {
        t.await.map_err(|e| e.to_string())??;
    }
    if let Some(lab) = &env.lab {
        lab.set_loss(0, 0).map_err(|e| e.to_string())?;
    }
    server_result?;
    report.server_kills = done.iter().filter(|c| **c == Crash::Kill).count();
    report.power_cuts = done.iter().filter(|c| **c == Crash::PowerCut).count();
    report.conn_kills_reset = reset;
    report.conn_kills_silent = silent;
    report.connections_accepted = killer.1.accepted.load(Ordering::Relaxed);

    // Expected deliveries.
    let outcomes = std::mem::take(&mut *outcomes.lock());
    report.sent = outcomes.len();
    report.acknowledged = outcomes.values().filter(|o| o.1 == Outcome::Acked).count();
    report.unconfirmed = outcomes
        .values()
        .filter(|o| o.1 == Outcome::Unconfirmed)
        .count();
    report.send_errors = outcomes.values().filter(|o| o.1 == Outcome::Failed).count();
    let expected = |d: &Device| -> Vec<MsgKey> {
        let mut keys: Vec<MsgKey> = outcomes
            .iter()
            .filter(|(k, (r, o))| {
                *o == Outcome::Acked
                    && match (d.recipient, d.sender) {
                        (Some(rr), _) => *r == rr,
                        (None, Some(s)) => k.sender == s,
                        _ => false,
                    }
            })
            .map(|(k, _)| *k)
            .collect();
        keys.sort_by_key(|k| (k.sender, k.n));
        keys
    };
    let settle_start = Instant::now();
    loop {
        let all = devices.iter().all(|d| {
            let log = d.log.lock();
            let got: std::collections::HashSet<_> = log.received.iter().copied().collect();
            expected(d).iter().all(|k| got.contains(k))
        });
        if all || settle_start.elapsed() > SETTLE {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report.settle_seconds = settle_start.elapsed().as_secs_f64();
    // A quiet period longer than a silent link takes to be noticed (heartbeat + 2 P +
    // grace), so late replays or late commits of unconfirmed sends would be seen too.
    tokio::time::sleep(HEARTBEAT + Duration::from_millis(3 * PONG_MS) + Duration::from_secs(2))
        .await;
    let _ = stop_tx.send(true);
    for r in readers {
        let _ = tokio::time::timeout(Duration::from_secs(10), r).await;
    }
    let final_alive = final_server
        .as_mut()
        .is_some_and(|c| matches!(c.try_wait(), Ok(None)));

    // Verdict per device.
    // Unconfirmed messages: delivered to how many of their recipient's devices.
    let mut unconfirmed_seen: HashMap<MsgKey, usize> = outcomes
        .iter()
        .filter(|(_, (_, o))| *o == Outcome::Unconfirmed)
        .map(|(k, _)| (*k, 0))
        .collect();
    for d in &devices {
        let log = d.log.lock();
        let want = expected(d);
        let mut count: HashMap<MsgKey, usize> = HashMap::new();
        let mut last: HashMap<u32, u32> = HashMap::new();
        for k in &log.received {
            *count.entry(*k).or_default() += 1;
            if let Some(prev) = last.insert(k.sender, k.n)
                && prev >= k.n
            {
                report.out_of_order += 1;
            }
        }
        report.duplicates_shown += count.values().map(|c| c - 1).sum::<usize>();
        // Nothing arrives that this device was not owed: the right recipient (or the
        // sender's own copies), a send that was acknowledged or unconfirmed, a chaos body.
        let misaddressed = log
            .received
            .iter()
            .zip(&log.addressed_to)
            .filter(|(k, r)| match (d.recipient, d.sender) {
                (Some(rr), _) => **r != rr,
                (None, Some(s)) => k.sender != s,
                _ => true,
            })
            .count();
        let never_sent = log
            .received
            .iter()
            .filter(|k| {
                !matches!(
                    outcomes.get(k),
                    Some((_, Outcome::Acked | Outcome::Unconfirmed))
                )
            })
            .count();
        for (what, n) in [
            ("misaddressed", misaddressed),
            ("of a failed or unknown send", never_sent),
            ("unparsable", log.unparsable),
        ] {
            if n > 0 {
                report.unexpected += n;
                report
                    .problems
                    .push(format!("{}: {n} deliveries {what}", d.name));
            }
        }
        let lost = want.iter().filter(|k| !count.contains_key(k)).count();
        report.lost += lost;
        if lost > 0 {
            report.problems.push(format!(
                "{}: {lost} acknowledged messages never arrived",
                d.name
            ));
        }
        if d.recipient.is_some() {
            for (k, seen) in &mut unconfirmed_seen {
                *seen += usize::from(count.contains_key(k));
            }
        }
        report.delivered_per_device.push(DeviceReport {
            device: d.name.clone(),
            delivered: log.received.len(),
            expected: want.len(),
        });
    }
    report.unconfirmed_delivered_once = unconfirmed_seen.values().filter(|c| **c > 0).count();
    report.unconfirmed_not_delivered = unconfirmed_seen.values().filter(|c| **c == 0).count();
    for d in &devices {
        let stats = d.client.stats();
        report.sessions += stats.sessions;
        report.duplicates_suppressed_server += stats.duplicate_acks;
        report.duplicates_suppressed_client += stats.replays_dropped;
        report.sends_transmitted += stats.sends_transmitted;
    }
    report.clients_stopped = stopped.load(Ordering::Relaxed);

    if report.duplicates_shown > 0 {
        report
            .problems
            .push(format!("{} duplicates shown", report.duplicates_shown));
    }
    if report.out_of_order > 0 {
        report
            .problems
            .push(format!("{} out of order", report.out_of_order));
    }
    if report.send_errors > 0 {
        report
            .problems
            .push(format!("{} sends failed outright", report.send_errors));
    }
    if report.sent != args.messages || sender_panics > 0 {
        report.problems.push(format!(
            "{} of {} messages sent ({sender_panics} sender tasks panicked)",
            report.sent, args.messages
        ));
    }
    if report.acknowledged == 0 {
        report.problems.push("nothing was acknowledged".into());
    }
    if !final_alive {
        report
            .problems
            .push("the server was not running at the end".into());
    }
    if report.clients_stopped > 0 {
        report
            .problems
            .push(format!("{} clients stopped", report.clients_stopped));
    }
    if report.server_kills + report.power_cuts < crashes.len() {
        report
            .problems
            .push("not every planned server crash happened".into());
    }

    if let Some(mut server) = final_server {
        let _ = server.kill();
        let _ = server.wait();
    }
    Ok(report)
}

fn render(r: &Report) -> String {
    let mut s = String::new();
    let network = if r.lab {
        format!(
            "lab NAT with {} % loss and {} blackhole periods",
            r.loss_percent, r.blackholes
        )
    } else {
        "loopback".to_string()
    };
    s.push_str(&format!(
        "# tether chaos (seed {})\n\n{} senders → {} recipients × {} devices over {network}\n\
         server SIGKILLs {} · simulated power cuts {} · connection kills {} ({} reset, {} silent) · \
         connections {} · sessions {}\n\n",
        r.seed,
        r.senders,
        r.recipients,
        r.devices_per_recipient,
        r.server_kills,
        r.power_cuts,
        r.conn_kills_reset + r.conn_kills_silent,
        r.conn_kills_reset,
        r.conn_kills_silent,
        r.connections_accepted,
        r.sessions,
    ));
    s.push_str("| | |\n|---|---|\n");
    for (k, v) in [
        ("sent", r.sent.to_string()),
        ("acknowledged", r.acknowledged.to_string()),
        ("reported unconfirmed", r.unconfirmed.to_string()),
        ("send errors", r.send_errors.to_string()),
        (
            "duplicates suppressed (server: retried SENDs answered as duplicates)",
            r.duplicates_suppressed_server.to_string(),
        ),
        (
            "duplicates suppressed (client: replayed DELIVERs dropped)",
            r.duplicates_suppressed_client.to_string(),
        ),
        ("duplicates shown", r.duplicates_shown.to_string()),
        ("out of order", r.out_of_order.to_string()),
        ("lost", r.lost.to_string()),
        (
            "unconfirmed delivered (once / never)",
            format!(
                "{} / {}",
                r.unconfirmed_delivered_once, r.unconfirmed_not_delivered
            ),
        ),
        ("send phase, s", format!("{:.1}", r.send_seconds)),
        ("settle, s", format!("{:.1}", r.settle_seconds)),
    ] {
        s.push_str(&format!("| {k} | {v} |\n"));
    }
    s.push_str("\n| device | delivered | acknowledged for it |\n|---|---|---|\n");
    for d in &r.delivered_per_device {
        s.push_str(&format!(
            "| {} | {} | {} |\n",
            d.device, d.delivered, d.expected
        ));
    }
    s.push_str(&format!(
        "\n{}\n",
        if r.passed() {
            "PASS: every acknowledged message reached every device once, in order".to_string()
        } else {
            format!("FAIL: {}", r.problems.join("; "))
        }
    ));
    s
}
