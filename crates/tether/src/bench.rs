//! `tether bench`: the numbers behind DESIGN §8, measured on this machine.
//!
//! Each benchmark runs a real server in this process (its own data dir in a temp
//! directory) and drives it with lean protocol clients written directly against
//! tether-proto and tether-transport, so the load generator costs little. Results
//! print as one JSON object per run; BENCHMARKS.md records them with machine, date
//! and load.

use bytes::Bytes;
use clap::{Args, Subcommand};
use serde_json::{Value, json};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tether_proto::{Frame, frame, pb};
use tether_server::{Server, ServerConfig};
use tether_store::Durability;
use tether_transport::tcp::TcpTransport;
use tether_transport::{Transport, flush, recv};

#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    which: Which,
}

#[derive(Subcommand)]
enum Which {
    /// Frame encode + decode rate.
    Codec {
        /// Frames per kind.
        #[arg(long, default_value_t = 2_000_000)]
        frames: u64,
    },
    /// One sender → one receiver over TCP loopback, pipelined: messages per second.
    Throughput {
        #[arg(long, default_value_t = 200_000)]
        messages: u64,
        /// Sends in flight (un-acknowledged) at once.
        #[arg(long, default_value_t = 2048)]
        window: usize,
        #[arg(long, default_value = "fsync")]
        durability: Durability,
        /// Body size in bytes.
        #[arg(long, default_value_t = 64)]
        body: usize,
        #[command(flatten)]
        target: Target,
    },
    /// Many pairs at a fixed total rate: send → deliver latency percentiles.
    Latency {
        #[arg(long, default_value_t = 1000)]
        pairs: usize,
        /// Messages per second in total.
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value = "fsync")]
        durability: Durability,
        #[command(flatten)]
        target: Target,
    },
    /// Group fan-out: senders in a group of N members send pipelined; every member's
    /// device receives. Committed and delivered copies (members × messages) per second,
    /// for each group size given.
    Fanout {
        /// Group sizes to run, one after the other (the server's cap is 500).
        #[arg(long, value_delimiter = ',', default_value = "10,100,500")]
        members: Vec<usize>,
        /// Group messages per group size.
        #[arg(long, default_value_t = 2_000)]
        messages: u64,
        /// Members that send (each on its own connection), sharing the messages.
        #[arg(long, default_value_t = 4)]
        senders: usize,
        /// Sends in flight per sender.
        #[arg(long, default_value_t = 256)]
        window: usize,
        #[arg(long, default_value = "fsync")]
        durability: Durability,
        /// Body size in bytes.
        #[arg(long, default_value_t = 64)]
        body: usize,
    },
    /// Each transport (tcp, tls, ws proto/json, wss, quic) against a `tether serve`
    /// child: bytes on the wire per heartbeat and per small message, 1:1 latency, and
    /// server memory per idle session.
    Transports {
        /// PING → PONG round trips per transport.
        #[arg(long, default_value_t = 2000)]
        heartbeats: u64,
        /// Messages (one in flight) per transport.
        #[arg(long, default_value_t = 2000)]
        messages: u64,
        /// Idle sessions held per transport for the memory figure.
        #[arg(long, default_value_t = 2000)]
        sessions: usize,
        #[arg(long, default_value = "relaxed", value_parser = ["relaxed", "fsync"])]
        durability: String,
    },
    /// The load generator: many connections (real sockets from worker processes, or
    /// in-memory sessions), heartbeats, 1:1 / group traffic, reconnect storms; a
    /// Markdown and JSON report.
    Load(crate::load::LoadArgs),
    /// Hidden: one worker process of `bench load`.
    #[command(hide = true)]
    LoadWorker(crate::load::WorkerArgs),
    /// MQTT (Mosquitto, rumqttd) or NATS servers under the same loads, for the
    /// side-by-side table (scripts/side-by-side.sh).
    Peer(crate::bench_peers::PeerArgs),
    /// This machine's scheduling floor: threads that never sleep, and how long the
    /// CPU was taken from them (host preemption on a VM). Run it beside a latency
    /// benchmark's results to read their tail.
    Hiccups {
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Spinning threads (default: one per CPU).
        #[arg(long)]
        threads: Option<usize>,
    },
    /// This machine's floor for CPU per keepalive: a bare single-threaded epoll echo
    /// server (no protocol, no sessions) answering 2-byte pings from idle
    /// connections, measured as `bench load` measures Tether.
    Floor {
        #[arg(long, default_value_t = 19_000)]
        connections: usize,
        /// Seconds between pings of a connection.
        #[arg(long, default_value_t = 30)]
        interval: u64,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// Hidden: the echo server of `bench floor`.
    #[command(hide = true)]
    FloorServer,
    /// Server memory per idle authenticated session over the in-memory transport.
    Memory {
        #[arg(long, default_value_t = 100_000)]
        sessions: usize,
    },
    /// Server memory per idle authenticated TCP session: logs N real connections into a
    /// `tether serve` running in another process and reads that process's RSS.
    MemoryTcp {
        #[arg(long, default_value_t = 18_000)]
        sessions: usize,
        /// The server's process id (its RSS is read from /proc).
        #[arg(long)]
        pid: u32,
        #[command(flatten)]
        target: Target,
    },
}

pub async fn run(args: BenchArgs) -> ExitCode {
    let result = match args.which {
        Which::Codec { frames } => codec(frames),
        Which::Throughput {
            messages,
            window,
            durability,
            body,
            target,
        } => throughput(messages, window, durability, body, &target).await,
        Which::Latency {
            pairs,
            rate,
            seconds,
            durability,
            target,
        } => latency(Shape::Pairs(pairs), rate, seconds, durability, &target).await,
        Which::Fanout {
            members,
            messages,
            senders,
            window,
            durability,
            body,
        } => fanout(&members, messages, senders, window, durability, body).await,
        Which::Memory { sessions } => memory(sessions).await,
        Which::Hiccups { seconds, threads } => {
            let threads = threads.unwrap_or_else(|| {
                std::thread::available_parallelism().map_or(1, std::num::NonZero::get)
            });
            tokio::task::spawn_blocking(move || crate::hiccups::run(seconds, threads))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r)
        }
        Which::Floor {
            connections,
            interval,
            seconds,
        } => tokio::task::spawn_blocking(move || {
            crate::floor::run(
                connections,
                Duration::from_secs(interval),
                Duration::from_secs(seconds),
            )
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r),
        Which::FloorServer => tokio::task::spawn_blocking(crate::floor::serve)
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r),
        Which::Load(args) => crate::load::run(args).await,
        Which::LoadWorker(args) => crate::load::worker(args).await,
        Which::Peer(args) => crate::bench_peers::run(args).await,
        Which::Transports {
            heartbeats,
            messages,
            sessions,
            durability,
        } => crate::bench_transports::run(heartbeats, messages, sessions, &durability).await,
        Which::MemoryTcp {
            sessions,
            pid,
            target,
        } => memory_tcp(sessions, pid, &target).await,
    };
    match result {
        Ok(report) => {
            println!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether bench: {e}");
            ExitCode::FAILURE
        }
    }
}

pub(crate) type BenchResult = Result<serde_json::Value, String>;

fn codec(frames: u64) -> BenchResult {
    let samples: Vec<(&str, Frame)> = vec![
        ("ping", Frame::Ping(pb::Ping::default())),
        (
            "send_64B",
            Frame::Send(pb::Send {
                client_msg_id: Bytes::from(vec![7u8; 16]),
                target: Some(pb::send::Target::User("bob".into())),
                body: Bytes::from(vec![b'x'; 64]),
                content_type: String::new(),
            }),
        ),
        (
            "deliver_64B",
            Frame::Deliver(pb::Deliver {
                entry: Some(pb::Entry {
                    seq: 123_456,
                    message_id: 987_654,
                    from: "alice".into(),
                    from_device: "phone".into(),
                    conversation: "alice".into(),
                    body: Bytes::from(vec![b'x'; 64]),
                    content_type: String::new(),
                    ts_ms: 1_790_000_000_000,
                    r#type: 1,
                    incoming: 42,
                }),
            }),
        ),
    ];
    let mut out = serde_json::Map::new();
    for (name, f) in samples {
        let mut wire = Vec::with_capacity(1 << 20);
        let started = Instant::now();
        let mut bytes = 0u64;
        let mut n = 0u64;
        while n < frames {
            wire.clear();
            for _ in 0..1000 {
                frame::encode_to(&f, &mut wire);
            }
            let mut rest = &wire[..];
            while let Ok(Some((raw, used))) = tether_proto::decode_frame(rest, 1 << 20) {
                let decoded = frame::from_raw(&raw).map_err(|e| e.to_string())?;
                std::hint::black_box(&decoded);
                rest = &rest[used..];
                n += 1;
            }
            bytes += wire.len() as u64;
        }
        let secs = started.elapsed().as_secs_f64();
        out.insert(
            name.into(),
            serde_json::json!({
                "frames_per_sec": (n as f64 / secs).round(),
                "mb_per_sec": ((bytes as f64 / secs) / 1e6 * 10.0).round() / 10.0,
                "wire_bytes": wire.len() / 1000,
            }),
        );
    }
    Ok(serde_json::json!({"bench": "codec", "encode_and_decode": out}))
}

/// Where the load goes: a server in this process (default) or one already running in
/// another process (`--server` with its `--data`, to mint tokens), so the load generator
/// does not share a runtime with the server.
#[derive(Args, Clone)]
pub(crate) struct Target {
    /// Address of a running `tether serve` to load instead of an in-process server.
    #[arg(long, requires = "data")]
    pub(crate) server: Option<std::net::SocketAddr>,
    /// That server's data directory (for its token secret).
    #[arg(long)]
    pub(crate) data: Option<std::path::PathBuf>,
}

/// The server under load, with a way to mint tokens.
struct BenchServer {
    addr: std::net::SocketAddr,
    auth: tether_server::auth::Authenticator,
    /// Present when the server runs in this process.
    running: Option<tether_server::RunningServer>,
    _dir: Option<tempfile::TempDir>,
}

impl BenchServer {
    async fn connect(target: &Target, durability: Durability) -> Result<Self, String> {
        match (&target.server, &target.data) {
            (Some(addr), Some(data)) => Ok(Self {
                addr: *addr,
                auth: tether_server::auth::Authenticator::open(data).map_err(|e| e.to_string())?,
                running: None,
                _dir: None,
            }),
            _ => Self::start(durability).await,
        }
    }

    fn in_process(&self) -> Result<&tether_server::RunningServer, String> {
        self.running
            .as_ref()
            .ok_or_else(|| "this benchmark needs the in-process server".into())
    }

    fn metrics(&self) -> Option<&tether_server::metrics::Metrics> {
        self.running.as_ref().map(|r| &*r.server().shared().metrics)
    }

    async fn shutdown(self) {
        if let Some(running) = self.running {
            running.shutdown().await;
        }
    }

    async fn start(durability: Durability) -> Result<Self, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let config = ServerConfig {
            data_dir: dir.path().to_path_buf(),
            listen: "127.0.0.1:0".parse().map_err(|e| format!("{e}"))?,
            http: None,
            durability,
            // Benchmarks log in thousands of clients at once on purpose.
            login_rate: 1e9,
            login_burst: u32::MAX,
            replay_rate: 1e9,
            replay_burst: u32::MAX,
            ..ServerConfig::default()
        };
        let server = Server::open(config).map_err(|e| e.to_string())?;
        let running = server.bind().await.map_err(|e| e.to_string())?;
        Ok(Self {
            addr: running.addr,
            auth: running.server().shared().auth.clone(),
            running: Some(running),
            _dir: Some(dir),
        })
    }

    fn token(&self, user: &str) -> String {
        self.auth.mint(user, Duration::from_secs(3600))
    }

    async fn login(&self, user: &str, device: &str) -> Result<TcpTransport, String> {
        let mut t = TcpTransport::connect(self.addr, 1 << 20)
            .await
            .map_err(|e| e.to_string())?;
        login(&mut t, &self.token(user), device).await?;
        Ok(t)
    }
}

/// Sends HELLO and waits for WELCOME.
async fn login<T: Transport>(t: &mut T, token: &str, device: &str) -> Result<pb::Welcome, String> {
    t.send(&Frame::Hello(pb::Hello {
        version: 1,
        token: token.into(),
        device_id: device.into(),
        device_epoch: 1,
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
            Frame::Welcome(w) => return Ok(w),
            Frame::Error(e) => return Err(format!("login refused: {}", e.reason)),
            _ => {}
        }
    }
}

fn send_frame(to: &str, id: u64, body: Bytes) -> Frame {
    // Time-ordered ids, as the SDK makes them: a big-endian counter, then random bits.
    let mut cmid = [0u8; 16];
    cmid[..8].copy_from_slice(&id.to_be_bytes());
    cmid[8..].copy_from_slice(&rand::random::<u64>().to_le_bytes());
    Frame::Send(pb::Send {
        client_msg_id: Bytes::copy_from_slice(&cmid),
        target: Some(pb::send::Target::User(to.into())),
        body,
        content_type: String::new(),
    })
}

pub(crate) async fn throughput(
    messages: u64,
    window: usize,
    durability: Durability,
    body: usize,
    target: &Target,
) -> BenchResult {
    let server = BenchServer::connect(target, durability).await?;
    // Fresh users per run, so runs against one external server do not mix.
    let run: u32 = rand::random();
    let (alice, bob) = (format!("alice-{run:x}"), format!("bob-{run:x}"));
    let mut sender = server.login(&alice, "bench").await?;
    let mut receiver = server.login(&bob, "bench").await?;
    let body = Bytes::from(vec![b'x'; body]);

    let receiving = tokio::spawn(async move {
        let mut got = 0u64;
        let mut last = 0u64;
        while got < messages {
            let raw = recv(&mut receiver)
                .await
                .map_err(|e| e.to_string())?
                .ok_or("receiver closed")?;
            if let Frame::Deliver(d) = frame::from_raw(&raw).map_err(|e| e.to_string())? {
                let seq = d.entry.map(|e| e.seq).unwrap_or(0);
                if seq != last + 1 {
                    return Err(format!("gap: {last} then {seq}"));
                }
                last = seq;
                got += 1;
                if got.is_multiple_of(128) || got == messages {
                    receiver
                        .send(&Frame::Ack(pb::Ack { seq }))
                        .map_err(|e| e.to_string())?;
                    flush(&mut receiver).await.map_err(|e| e.to_string())?;
                }
            }
        }
        Ok::<_, String>(Instant::now())
    });

    let started = Instant::now();
    let mut sent = 0u64;
    let mut acked = 0u64;
    while acked < messages {
        while sent < messages && (sent - acked) < window as u64 {
            sender
                .send(&send_frame(&bob, sent, body.clone()))
                .map_err(|e| e.to_string())?;
            sent += 1;
        }
        flush(&mut sender).await.map_err(|e| e.to_string())?;
        let raw = recv(&mut sender)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("sender closed")?;
        match frame::from_raw(&raw).map_err(|e| e.to_string())? {
            Frame::SendAck(_) => acked += 1,
            Frame::Error(e) => return Err(format!("send refused: {}", e.reason)),
            _ => {}
        }
    }
    let acked_at = Instant::now();
    let received_at = receiving.await.map_err(|e| e.to_string())??;
    let secs = (received_at.max(acked_at) - started).as_secs_f64();
    let metrics = server.metrics();
    let external = server.running.is_none();
    let committed = metrics.map(|m| m.messages_committed.get());
    server.shutdown().await;
    Ok(serde_json::json!({
        "bench": "throughput",
        "durability": durability.to_string(),
        "messages": messages,
        "window": window,
        "seconds": (secs * 1000.0).round() / 1000.0,
        "msgs_per_sec": (messages as f64 / secs).round(),
        "committed": committed,
        "server": if external { "external process" } else { "in process" },
    }))
}

/// Who sends to whom in a latency run.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Shape {
    /// Pairs: each sender sends 1:1 to its own receiver.
    Pairs(usize),
    /// Groups of `members`: one member sends to the group, every other member's device
    /// receives a copy.
    Groups { groups: usize, members: usize },
}

impl Shape {
    fn units(self) -> usize {
        match self {
            Shape::Pairs(n) => n,
            Shape::Groups { groups, .. } => groups,
        }
    }
    fn receivers_per_unit(self) -> usize {
        match self {
            Shape::Pairs(_) => 1,
            Shape::Groups { members, .. } => members.saturating_sub(1),
        }
    }
}

/// What the receiving devices of a latency run got, and whether it came exactly once
/// and in order (summed over receivers as they go: they are aborted at the end).
#[derive(Default)]
struct Received {
    messages: AtomicU64,
    duplicates: AtomicU64,
    out_of_order: AtomicU64,
    gaps: AtomicU64,
}

/// Creates `group` owned by the sender's connection, with `members` in it, and waits
/// for the server to confirm.
async fn create_group(
    owner: &mut TcpTransport,
    group: &str,
    members: &[String],
) -> Result<(), String> {
    let mut cmid = [0u8; 16];
    cmid[..8].copy_from_slice(&rand::random::<u64>().to_le_bytes());
    owner
        .send(&Frame::GroupChange(pb::GroupChange {
            client_msg_id: Bytes::copy_from_slice(&cmid),
            group: group.into(),
            op: pb::GroupOp::Create as i32,
            members: members.to_vec(),
            name: String::new(),
        }))
        .map_err(|e| e.to_string())?;
    flush(owner).await.map_err(|e| e.to_string())?;
    loop {
        let raw = recv(owner)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("owner closed")?;
        match frame::from_raw(&raw).map_err(|e| e.to_string())? {
            Frame::SendAck(_) => return Ok(()),
            Frame::Error(e) => return Err(format!("group create refused: {}", e.reason)),
            _ => {}
        }
    }
}

/// Paced 1:1 or group messages; latency is SEND written → DELIVER read, per copy (the
/// send time travels in the body), and each receiver checks that its copies came
/// exactly once and in order.
pub(crate) async fn latency(
    shape: Shape,
    rate: u64,
    seconds: u64,
    durability: Durability,
    target: &Target,
) -> BenchResult {
    let server = Arc::new(BenchServer::connect(target, durability).await?);
    let run: u32 = rand::random();
    let epoch = Instant::now();
    let steal_before = crate::hiccups::steal_ms();
    let units = shape.units().max(1);
    let total = rate * seconds;
    let per_unit_interval = Duration::from_secs_f64(units as f64 / rate as f64);
    let per_unit = total / units as u64;
    let expected = per_unit * (units * shape.receivers_per_unit()) as u64;
    let samples = Arc::new(parking_samples(expected as usize));
    let received = Arc::new(Received::default());
    let mut receivers = Vec::new();
    let mut senders = Vec::new();
    for i in 0..units {
        let (tx, target, rx_users) = match shape {
            Shape::Pairs(_) => {
                let rx = format!("r{i}-{run:x}");
                let tx = server.login(&format!("s{i}-{run:x}"), "bench").await?;
                (tx, pb::send::Target::User(rx.clone()), vec![rx])
            }
            Shape::Groups { members, .. } => {
                let group = format!("g{i}-{run:x}");
                let users: Vec<String> = (1..members).map(|m| format!("{group}-m{m}")).collect();
                let mut tx = server.login(&format!("{group}-m0"), "bench").await?;
                create_group(&mut tx, &group, &users).await?;
                (tx, pb::send::Target::Group(group), users)
            }
        };
        for user in rx_users {
            let mut rx = server.login(&user, "bench").await?;
            let (samples, got) = (samples.clone(), received.clone());
            receivers.push(tokio::spawn(async move {
                let bump = |a: &AtomicU64| a.fetch_add(1, Ordering::Relaxed);
                let (mut last_seq, mut last_n) = (0u64, None::<u64>);
                loop {
                    let raw = match recv(&mut rx).await {
                        Ok(Some(raw)) => raw,
                        _ => return,
                    };
                    let Ok(Frame::Deliver(d)) = frame::from_raw(&raw) else {
                        continue;
                    };
                    let Some(entry) = d.entry else { continue };
                    // The inbox itself: every seq once, one after the other.
                    if entry.seq <= last_seq {
                        bump(&got.duplicates);
                        continue;
                    }
                    if last_seq != 0 && entry.seq != last_seq + 1 {
                        bump(&got.gaps);
                    }
                    last_seq = entry.seq;
                    let _ = rx.send(&Frame::Ack(pb::Ack { seq: entry.seq }));
                    let _ = flush(&mut rx).await;
                    if entry.r#type != pb::EntryType::Message as i32 {
                        continue; // the group's creation
                    }
                    let word = |at: usize| {
                        entry
                            .body
                            .get(at..at + 8)
                            .and_then(|b| b.try_into().ok())
                            .map(u64::from_le_bytes)
                    };
                    let (Some(sent_ns), Some(n)) = (word(0), word(8)) else {
                        continue;
                    };
                    // The sender's own numbering: each message once, in order.
                    match last_n {
                        Some(prev) if n == prev => {
                            bump(&got.duplicates);
                        }
                        Some(prev) if n < prev => {
                            bump(&got.out_of_order);
                        }
                        _ => {}
                    }
                    last_n = Some(last_n.map_or(n, |prev| prev.max(n)));
                    bump(&got.messages);
                    let now_ns = epoch.elapsed().as_nanos() as u64;
                    samples.push(sent_ns, now_ns.saturating_sub(sent_ns));
                }
            }));
        }
        senders.push(((tx, target), i));
    }
    let mut tasks = Vec::new();
    for ((mut tx, target), i) in senders {
        let offset = per_unit_interval.mul_f64(i as f64 / units as f64);
        tasks.push(tokio::spawn(async move {
            let start = tokio::time::Instant::now() + offset;
            let mut ticker = tokio::time::interval_at(start, per_unit_interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut acks = 0u64;
            for n in 0..per_unit {
                ticker.tick().await;
                let now_ns = epoch.elapsed().as_nanos() as u64;
                let mut body = now_ns.to_le_bytes().to_vec();
                body.extend_from_slice(&n.to_le_bytes());
                body.resize(64, b'x');
                let Frame::Send(mut send) = send_frame("", n, Bytes::from(body)) else {
                    unreachable!("send_frame makes a SEND")
                };
                send.target = Some(target.clone());
                if tx.send(&Frame::Send(send)).is_err() || flush(&mut tx).await.is_err() {
                    return acks;
                }
                // Drain SEND_ACKs without blocking the schedule (and without a timer:
                // tokio's are per millisecond, and a thousand of them each tick load
                // the generator, not the server).
                let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
                while let std::task::Poll::Ready(Ok(Some(raw))) = tx.poll_recv(&mut cx) {
                    if raw.kind == tether_proto::kind::SEND_ACK {
                        acks += 1;
                    }
                }
            }
            acks
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    // Let the last deliveries land.
    let deadline = Instant::now() + Duration::from_secs(5);
    while (samples.len() as u64) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for r in receivers {
        r.abort();
    }
    let seen = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let server_metrics: Vec<String> = server
        .metrics()
        .map(|m| m.render())
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.starts_with("tether_commit_duration_seconds_bucket")
                || l.starts_with("tether_commit_latency_seconds_bucket")
                || l.starts_with("tether_commit_batch_messages_count")
        })
        .map(str::to_string)
        .collect();
    let taken = samples.take();
    if std::env::var_os("TETHER_BENCH_TIMELINE").is_some() {
        print_timeline(&taken);
    }
    let mut lat: Vec<u64> = taken.into_iter().map(|(_, l)| l).collect();
    lat.sort_unstable();
    let pct = |p: f64| -> f64 {
        if lat.is_empty() {
            return f64::NAN;
        }
        let i = ((lat.len() as f64 * p).ceil() as usize).clamp(1, lat.len()) - 1;
        (lat[i] as f64 / 1e3).round() / 1e3
    };
    let (pairs, groups, members) = match shape {
        Shape::Pairs(n) => (json!(n), Value::Null, Value::Null),
        Shape::Groups { groups, members } => (Value::Null, json!(groups), json!(members)),
    };
    Ok(serde_json::json!({
        "bench": "latency",
        "durability": durability.to_string(),
        "pairs": pairs,
        "groups": groups,
        "members": members,
        "rate_per_sec": rate,
        "sent": per_unit * units as u64,
        "expected": expected,
        "delivered": lat.len(),
        "sessions": units * (1 + shape.receivers_per_unit()),
        "received_messages": seen(&received.messages),
        "duplicates": seen(&received.duplicates),
        "out_of_order": seen(&received.out_of_order),
        "inbox_gaps": seen(&received.gaps),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "max_ms": pct(1.0),
        "server": if server.running.is_none() { "external process" } else { "in process" },
        "server_commit_histogram": server_metrics,
        "steal_ms_all_cpus": crate::hiccups::steal_ms().saturating_sub(steal_before),
    }))
}

/// With `TETHER_BENCH_TIMELINE=1`: percentiles per second of the run, then every
/// message slower than 1.5 ms by when it was sent (ms since the start: latency µs),
/// one line per stall. A stall shows as consecutive sends all arriving at one moment.
fn print_timeline(samples: &[(u64, u64)]) {
    let mut by_second: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for &(sent_ns, took_ns) in samples {
        by_second
            .entry(sent_ns / 1_000_000_000)
            .or_default()
            .push(took_ns);
    }
    for (second, mut v) in by_second {
        v.sort_unstable();
        let at = |p: f64| v[((v.len() as f64 * p) as usize).min(v.len() - 1)] / 1000;
        eprintln!(
            "second {second}: {} messages, µs p50 {} p99 {} p999 {} max {}",
            v.len(),
            at(0.5),
            at(0.99),
            at(0.999),
            at(1.0)
        );
    }
    let mut slow: Vec<(u64, u64)> = samples
        .iter()
        .filter(|&&(_, took_ns)| took_ns > 1_500_000)
        .map(|&(sent_ns, took_ns)| (sent_ns / 1_000_000, took_ns / 1000))
        .collect();
    slow.sort_unstable();
    let mut line = String::new();
    let mut last_ms = 0;
    for (sent_ms, took_us) in slow {
        if sent_ms > last_ms + 3 && !line.is_empty() {
            eprintln!("{line}");
            line.clear();
        }
        line.push_str(&format!("{sent_ms}:{took_us} "));
        last_ms = sent_ms;
    }
    if !line.is_empty() {
        eprintln!("{line}");
    }
}

/// One group size of `tether bench fanout`.
async fn fanout(
    sizes: &[usize],
    messages: u64,
    senders: usize,
    window: usize,
    durability: Durability,
    body: usize,
) -> BenchResult {
    let server = BenchServer::start(durability).await?;
    let body = Bytes::from(vec![b'x'; body]);
    let mut runs = Vec::new();
    for &n in sizes {
        let senders = senders.clamp(1, n);
        let per_sender = messages.div_ceil(senders as u64);
        let total = per_sender * senders as u64;
        let group = format!("fan{n}-{:x}", rand::random::<u32>());
        let users: Vec<String> = (0..n).map(|i| format!("{group}-m{i}")).collect();

        // The owner creates the group with everyone in it.
        let mut owner = server.login(&users[0], "tx").await?;
        create_group(&mut owner, &group, &users[1..]).await?;

        // Every member's "rx" device receives and ACKs, like an app would.
        let mut receivers = Vec::new();
        for user in &users {
            let mut rx = server.login(user, "rx").await?;
            receivers.push(tokio::spawn(async move {
                let mut got = 0u64;
                let mut unacked = 0u32;
                while got < total {
                    let raw = match recv(&mut rx).await {
                        Ok(Some(raw)) => raw,
                        _ => return Err(format!("receiver closed after {got}")),
                    };
                    if let Ok(Frame::Deliver(d)) = frame::from_raw(&raw) {
                        let Some(entry) = d.entry else { continue };
                        if entry.r#type == pb::EntryType::Message as i32 {
                            got += 1;
                        }
                        unacked += 1;
                        if unacked >= 64 || got == total {
                            unacked = 0;
                            let _ = rx.send(&Frame::Ack(pb::Ack { seq: entry.seq }));
                            let _ = flush(&mut rx).await;
                        }
                    }
                }
                Ok::<_, String>(Instant::now())
            }));
        }
        let mut txs = vec![owner];
        for user in users.iter().take(senders).skip(1) {
            txs.push(server.login(user, "tx").await?);
        }
        let started = Instant::now();
        let mut sending = Vec::new();
        for (s, mut tx) in txs.into_iter().enumerate() {
            let group = group.clone();
            let body = body.clone();
            sending.push(tokio::spawn(async move {
                let (mut sent, mut acked) = (0u64, 0u64);
                while acked < per_sender {
                    while sent < per_sender && sent - acked < window as u64 {
                        let Frame::Send(mut send) =
                            send_frame("", (s as u64) << 40 | sent, body.clone())
                        else {
                            unreachable!()
                        };
                        send.target = Some(pb::send::Target::Group(group.clone()));
                        tx.send(&Frame::Send(send)).map_err(|e| e.to_string())?;
                        sent += 1;
                    }
                    flush(&mut tx).await.map_err(|e| e.to_string())?;
                    let raw = recv(&mut tx)
                        .await
                        .map_err(|e| e.to_string())?
                        .ok_or("sender closed")?;
                    match frame::from_raw(&raw).map_err(|e| e.to_string())? {
                        Frame::SendAck(_) => acked += 1,
                        Frame::Error(e) => return Err(format!("send refused: {}", e.reason)),
                        _ => {}
                    }
                }
                Ok::<_, String>(Instant::now())
            }));
        }
        let mut committed_at = started;
        for t in sending {
            committed_at = committed_at.max(t.await.map_err(|e| e.to_string())??);
        }
        let mut delivered_at = started;
        for r in receivers {
            delivered_at = delivered_at.max(r.await.map_err(|e| e.to_string())??);
        }
        let commit_secs = (committed_at - started).as_secs_f64();
        let deliver_secs = (delivered_at - started).as_secs_f64();
        let copies = total * n as u64;
        runs.push(serde_json::json!({
            "members": n,
            "senders": senders,
            "messages": total,
            "copies": copies,
            "commit_seconds": (commit_secs * 1000.0).round() / 1000.0,
            "messages_committed_per_sec": (total as f64 / commit_secs).round(),
            "copies_committed_per_sec": (copies as f64 / commit_secs).round(),
            "all_delivered_seconds": (deliver_secs * 1000.0).round() / 1000.0,
            "copies_delivered_per_sec": (copies as f64 / deliver_secs).round(),
        }));
    }
    server.shutdown().await;
    Ok(serde_json::json!({
        "bench": "fanout",
        "durability": durability.to_string(),
        "window_per_sender": window,
        "runs": runs,
        "server": "in process",
    }))
}

/// Latency samples collected from many tasks.
struct Samples {
    inner: std::sync::Mutex<Vec<(u64, u64)>>,
    count: AtomicU64,
}

fn parking_samples(capacity: usize) -> Samples {
    Samples {
        inner: std::sync::Mutex::new(Vec::with_capacity(capacity)),
        count: AtomicU64::new(0),
    }
}

impl Samples {
    fn push(&self, sent_ns: u64, v: u64) {
        if let Ok(mut g) = self.inner.lock() {
            g.push((sent_ns, v));
        }
        self.count.fetch_add(1, Ordering::Relaxed);
    }
    fn len(&self) -> usize {
        self.count.load(Ordering::Relaxed) as usize
    }
    fn take(&self) -> Vec<(u64, u64)> {
        self.inner
            .lock()
            .map(|mut g| std::mem::take(&mut *g))
            .unwrap_or_default()
    }
}

/// Resident set size of this process, bytes.
fn rss_bytes() -> Result<u64, String> {
    rss_of("self")
}

/// Resident set size of process `pid` ("self" for this one), bytes.
pub(crate) fn rss_of(pid: &str) -> Result<u64, String> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).map_err(|e| e.to_string())?;
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .ok_or("bad /proc/self/statm")?;
    Ok(pages * 4096)
}

/// CPU time (user + system) process `pid` ("self" for this one) has used so far.
pub(crate) fn cpu_of(pid: &str) -> Result<Duration, String> {
    cpu_of_stat(&format!("/proc/{pid}/stat"))
}

/// CPU time (user + system) from a `/proc/.../stat` file (a process or one thread).
pub(crate) fn cpu_of_stat(path: &str) -> Result<Duration, String> {
    let stat = std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}"))?;
    // The command name may hold spaces; the fields after it are fixed.
    let rest = stat.rsplit_once(')').ok_or("bad stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(|| format!("bad stat field {i}"))
    };
    // utime and stime are fields 14 and 15 of stat(5); here 11 and 12 after the name.
    let total = ticks(11)? + ticks(12)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_nanos(total * 1_000_000_000 / hz))
}

async fn memory(sessions: usize) -> BenchResult {
    let server = BenchServer::start(Durability::Fsync).await?;
    let srv = server.in_process()?.server().clone();
    let token = server.token("warmup");
    // Warm up allocator pools, the runtime and the store's caches.
    let mut warm = Vec::new();
    for i in 0..1000 {
        let mut t = srv.connect_memory();
        login(&mut t, &token, &format!("w{i}")).await?;
        warm.push(t);
    }

    // Phase A: the client simulator's own cost: pipes with only their client ends held
    // (the server end is dropped; the shared pipe lives on), measured and subtracted.
    let before_pipes = rss_bytes()?;
    let mut pipes = Vec::with_capacity(sessions);
    for _ in 0..sessions {
        let (client, server_end) = tether_transport::memory::pair(tether_proto::PRE_AUTH_MAX_FRAME);
        drop(server_end);
        pipes.push(client);
    }
    let pipes_bytes = rss_bytes()?.saturating_sub(before_pipes);

    // Phase B: the same number of real sessions, each logged in and idle.
    // One user per session (the costlier case for the registry: one entry per user).
    let tokens: Vec<String> = (0..sessions)
        .map(|i| server.token(&format!("u{i}")))
        .collect();
    let mut clients = Vec::with_capacity(sessions);
    let before = rss_bytes()?;
    let started = Instant::now();
    for token in &tokens {
        let mut t = srv.connect_memory();
        login(&mut t, token, "phone").await?;
        clients.push(t);
    }
    let login_secs = started.elapsed().as_secs_f64();
    // Let every connection task settle into its idle wait.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let total = rss_bytes()?.saturating_sub(before);
    let registered = srv.shared().registry.len();
    // The deadline wheel's cost: advance it past every session's deadline (each is
    // visited about once per deadline period; this is the whole period at once).
    let shared = srv.shared();
    let wheel_started = Instant::now();
    let signalled = shared.deadlines.advance(shared.now_ms() + 120_000);
    let wheel_ns = wheel_started.elapsed().as_nanos() as f64;
    let per_session_total = total as f64 / sessions as f64;
    let per_pipe = pipes_bytes as f64 / sessions as f64;
    drop(pipes);
    Ok(serde_json::json!({
        "bench": "memory",
        "transport": "memory",
        "sessions": sessions,
        "registered": registered,
        "login_rate_per_sec": (sessions as f64 / login_secs).round(),
        "rss_delta_bytes": total,
        "bytes_per_session_including_pipe_and_client_end": per_session_total.round(),
        "bytes_per_pipe_and_client_end": per_pipe.round(),
        "server_bytes_per_session": (per_session_total - per_pipe).round(),
        "deadline_wheel_ns_per_session_per_deadline_period": (wheel_ns / signalled.max(1) as f64 * 10.0).round() / 10.0,
        "deadline_wheel_signalled": signalled,
        "method": "RSS delta over N logged-in idle in-memory sessions, minus the RSS delta of N bare pipes (the simulated wire + client end, measured separately in the same process)",
    }))
}

async fn memory_tcp(sessions: usize, pid: u32, target: &Target) -> BenchResult {
    if target.server.is_none() {
        return Err("memory-tcp needs --server and --data of a running `tether serve`".into());
    }
    let server = Arc::new(BenchServer::connect(target, Durability::Fsync).await?);
    let pid = pid.to_string();
    let run: u32 = rand::random();
    // Warm up the server's allocator and runtime before the baseline.
    let mut held = Vec::with_capacity(sessions + 500);
    for i in 0..500 {
        held.push(server.login(&format!("w{i}-{run:x}"), "phone").await?);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = rss_of(&pid)?;
    let started = Instant::now();
    for chunk in (0..sessions).collect::<Vec<_>>().chunks(200) {
        let logins = chunk.iter().map(|i| {
            let server = server.clone();
            let user = format!("u{i}-{run:x}");
            async move { server.login(&user, "phone").await }
        });
        for t in futures_util::future::join_all(logins).await {
            held.push(t?);
        }
    }
    let login_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_of(&pid)?;
    let delta = after.saturating_sub(before);
    Ok(serde_json::json!({
        "bench": "memory-tcp",
        "transport": "tcp",
        "sessions": sessions,
        "login_rate_per_sec": (sessions as f64 / login_secs).round(),
        "server_rss_before_bytes": before,
        "server_rss_after_bytes": after,
        "server_bytes_per_session": (delta as f64 / sessions as f64).round(),
        "method": "RSS delta of the server process (another process) over N logged-in idle TCP sessions; kernel socket memory is not in RSS",
    }))
}
