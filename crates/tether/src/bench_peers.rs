//! `tether bench peer`: the loads of `tether bench load`, aimed at an MQTT broker
//! (Mosquitto, rumqttd) or a NATS server running in another process, so that the
//! side-by-side table (scripts/side-by-side.sh) compares like with like.
//!
//! The clients are the protocols' well-kept crates (rumqttc, async-nats), never a
//! hand-written codec: a peer is measured through the client its own users run. Three
//! scenarios, each printed as one JSON object with the same keys as `bench load`:
//!
//! - `idle`: N connections that only keep alive. Server memory per connection (RSS
//!   growth from a tenth connected to all connected ÷ the connections added, as
//!   `bench load` takes it; and from before the first) and server CPU per keepalive
//!   ping over a window.
//! - `latency`: publisher/subscriber pairs at a fixed total rate, send → delivery
//!   percentiles (MQTT QoS 1; NATS core, which is at most once).
//! - `throughput`: one publisher, one subscriber, as fast as the protocol's flow
//!   control allows.
//!
//! Pings are counted where they can be seen. MQTT: rumqttc reports each PINGREQ it
//! sends and each PINGRESP it reads, which also gives the round trip. NATS: async-nats
//! answers PONGs inside its connection task and exposes no count, so the bytes the
//! kernel received on this process's connections to the server are summed
//! (`TCP_INFO`): an idle NATS connection receives nothing but 6-byte `PONG\r\n` lines
//! (and `PING\r\n`, were the server to ping first), so bytes ÷ 6 is the number of
//! keepalive exchanges. The expected number (connections × window ÷ keepalive) is
//! reported beside it as a check.

use crate::bench::{cpu_of, rss_of};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet,
    QoS, SubscribeReasonCode,
};
use serde_json::{Value, json};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::task::{JoinHandle, JoinSet};

/// Connection handshakes in flight at once while opening connections.
const CONNECTS_IN_FLIGHT: usize = 200;
/// Tries per connection before it counts as an error.
const CONNECT_ATTEMPTS: u32 = 4;
/// Pause between two tries of one connection.
const CONNECT_RETRY_DELAY: Duration = Duration::from_millis(250);
/// Handshake timeout of one try, in seconds (rumqttc takes whole seconds).
const CONNECT_TIMEOUT_S: u64 = 10;
/// Pause after an established connection fails, before the client reconnects.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// Quiet time after the last idle connection opened, before the server's RSS is read.
const SETTLE: Duration = Duration::from_secs(2);
/// Latency: traffic before recording starts.
const WARM_UP: Duration = Duration::from_secs(1);
/// Latency: time after the last send for deliveries to arrive before counting losses.
const DRAIN: Duration = Duration::from_secs(2);
/// Throughput: give up when nothing moved for this long.
const STALL: Duration = Duration::from_secs(10);
/// How often a progress line goes to stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// File descriptors kept free beside the connections (stdio, epoll, /proc reads).
const SPARE_FDS: u64 = 64;
/// Size of a NATS keepalive line, `PING\r\n` or `PONG\r\n`.
const NATS_KEEPALIVE_LINE: u64 = 6;
/// Largest latency or round trip recorded, in microseconds (a minute).
const LATENCY_CEILING_US: u64 = 60_000_000;

/// The protocol of the server under load.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    /// MQTT 3.1.1 (Mosquitto, rumqttd), through rumqttc.
    Mqtt,
    /// NATS core, through async-nats.
    Nats,
}

/// The load to apply.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Many connections that only keep alive: memory and CPU per ping.
    Idle,
    /// Pairs at a fixed total rate: delivery latency percentiles.
    Latency,
    /// One publisher, one subscriber, flat out: messages per second.
    Throughput,
}

/// `tether bench peer`: one scenario against an MQTT or NATS server in another process.
#[derive(clap::Args)]
pub struct PeerArgs {
    /// The server's protocol.
    #[arg(long, value_enum)]
    protocol: Protocol,
    /// The server's address, HOST:PORT.
    #[arg(long)]
    addr: String,
    /// The server's process id: its RSS and CPU time are read from /proc. Required
    /// for `idle`; with the other scenarios it adds the server's CPU time.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, value_enum)]
    scenario: Scenario,
    /// Idle connections to hold.
    #[arg(long, default_value_t = 18_000)]
    connections: usize,
    /// Keepalive in seconds: MQTT keep_alive, NATS client ping_interval.
    #[arg(long, default_value_t = 30)]
    keepalive: u64,
    /// Seconds measured: the idle window (default 120) or the latency recording
    /// (default 10).
    #[arg(long)]
    duration: Option<u64>,
    /// Publisher/subscriber pairs (latency), two connections each.
    #[arg(long, default_value_t = 1000)]
    pairs: usize,
    /// Messages per second over all pairs (latency).
    #[arg(long, default_value_t = 5000)]
    rate: u64,
    /// Messages to send (throughput).
    #[arg(long, default_value_t = 200_000)]
    messages: u64,
    /// Message body in bytes; at least 8, which carry the send time.
    #[arg(long, default_value_t = 64)]
    body: usize,
    /// Label echoed in the JSON, e.g. "mosquitto".
    #[arg(long)]
    name: Option<String>,
}

/// Runs the scenario and returns its JSON report.
pub async fn run(args: PeerArgs) -> Result<Value, String> {
    if args.keepalive == 0 {
        return Err("--keepalive must be at least 1 second".into());
    }
    let fd_limit = raise_fd_limit()?;
    let needed = match args.scenario {
        Scenario::Idle => args.connections as u64,
        Scenario::Latency => 2 * args.pairs as u64,
        Scenario::Throughput => 2,
    } + SPARE_FDS;
    if needed > fd_limit {
        return Err(format!(
            "this load needs {needed} file descriptors but the limit is {fd_limit} (ulimit -n)"
        ));
    }
    clock(); // Fixes the time base before anything is stamped.
    let target = Arc::new(Target::new(&args).await?);
    let numbers = match args.scenario {
        Scenario::Idle => idle(&target, &args).await?,
        Scenario::Latency => latency(&target, &args).await?,
        Scenario::Throughput => throughput(&target, &args).await?,
    };
    let mut report = json!({
        "bench": "peer",
        "name": args.name.clone().unwrap_or_else(|| target.protocol_name().into()),
        "protocol": target.protocol_name(),
        "scenario": match args.scenario {
            Scenario::Idle => "idle",
            Scenario::Latency => "latency",
            Scenario::Throughput => "throughput",
        },
        "addr": args.addr,
    });
    if let (Some(report), Value::Object(numbers)) = (report.as_object_mut(), numbers) {
        report.extend(numbers);
    }
    Ok(report)
}

/// The server under load and how to open a connection to it.
struct Target {
    protocol: Protocol,
    /// HOST:PORT as given.
    addr: String,
    host: String,
    port: u16,
    /// What HOST:PORT resolves to: the peer address of our connections.
    resolved: Vec<SocketAddr>,
    keepalive: Duration,
    /// Unique per run: prefixes client ids, topics and subjects.
    run: String,
}

impl Target {
    async fn new(args: &PeerArgs) -> Result<Target, String> {
        let bad = || format!("--addr {}: expected HOST:PORT", args.addr);
        let (host, port) = args.addr.rsplit_once(':').ok_or_else(bad)?;
        let port: u16 = port.parse().map_err(|_| bad())?;
        let resolved: Vec<SocketAddr> = tokio::net::lookup_host(&args.addr)
            .await
            .map_err(|e| format!("cannot resolve {}: {e}", args.addr))?
            .collect();
        Ok(Target {
            protocol: args.protocol,
            addr: args.addr.clone(),
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string(),
            port,
            resolved,
            keepalive: Duration::from_secs(args.keepalive),
            run: format!("tb{:08x}", rand::random::<u32>()),
        })
    }

    fn protocol_name(&self) -> &'static str {
        match self.protocol {
            Protocol::Mqtt => "mqtt",
            Protocol::Nats => "nats",
        }
    }

    /// An MQTT client (clean session, TCP_NODELAY) whose event loop a task must poll.
    fn mqtt(&self, client_id: String, inflight: u16, requests: usize) -> (AsyncClient, EventLoop) {
        let mut options = MqttOptions::new(client_id, self.host.clone(), self.port);
        options
            .set_keep_alive(self.keepalive)
            .set_clean_session(true)
            .set_inflight(inflight.max(1))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut eventloop) = AsyncClient::new(options, requests.max(1));
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        network.set_connection_timeout(CONNECT_TIMEOUT_S);
        eventloop.set_network_options(network);
        (client, eventloop)
    }

    /// NATS options every connection shares; async-nats sets TCP_NODELAY itself.
    fn nats(&self) -> async_nats::ConnectOptions {
        async_nats::ConnectOptions::new()
            .ping_interval(self.keepalive)
            .connection_timeout(Duration::from_secs(CONNECT_TIMEOUT_S))
    }

    /// Report for a connection that could not be opened.
    fn unreachable(&self, why: &str) -> String {
        format!("cannot connect to {}: {why}", self.addr)
    }
}

/// Polls a new MQTT client until the broker's CONNACK, retrying a failed try.
async fn mqtt_connect(eventloop: &mut EventLoop) -> Result<(), String> {
    let mut last = String::new();
    for attempt in 0..CONNECT_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(CONNECT_RETRY_DELAY).await;
        }
        // Until it is connected, a poll returns the CONNACK or the reason there is none.
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
            Ok(other) => last = format!("unexpected {other:?} before CONNACK"),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

/// Subscribes with QoS 1 and polls until the broker's SUBACK grants it.
async fn mqtt_subscribe(
    client: &AsyncClient,
    eventloop: &mut EventLoop,
    topic: &str,
) -> Result<(), String> {
    client
        .subscribe(topic, QoS::AtLeastOnce)
        .await
        .map_err(|e| format!("subscribe {topic}: {e}"))?;
    let granted = async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    return if ack.return_codes.contains(&SubscribeReasonCode::Failure) {
                        Err(format!("subscribe {topic}: refused"))
                    } else {
                        Ok(())
                    };
                }
                Ok(_) => {}
                Err(e) => return Err(format!("subscribe {topic}: {e}")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(CONNECT_TIMEOUT_S), granted)
        .await
        .map_err(|_| format!("subscribe {topic}: no SUBACK"))?
}

/// Polls an MQTT connection's event loop until the task is aborted, handing every
/// outcome to `on_poll`. After an error it pauses; the next poll reconnects. The
/// client is kept because its event loop stops once every client handle is gone.
async fn drive_mqtt(
    mut eventloop: EventLoop,
    client: AsyncClient,
    mut on_poll: impl FnMut(Result<Event, ConnectionError>),
) {
    let _client = client;
    loop {
        let polled = eventloop.poll().await;
        let failed = polled.is_err();
        on_poll(polled);
        if failed {
            tokio::time::sleep(RECONNECT_PAUSE).await;
        }
    }
}

/// Connects to NATS, retrying a failed try; `options` builds each try's options.
async fn nats_connect(
    target: &Target,
    options: impl Fn() -> async_nats::ConnectOptions,
) -> Result<async_nats::Client, String> {
    let mut last = String::new();
    for attempt in 0..CONNECT_ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(CONNECT_RETRY_DELAY).await;
        }
        match options().connect(target.addr.as_str()).await {
            Ok(client) => return Ok(client),
            Err(e) => last = e.to_string(),
        }
    }
    Err(last)
}

// ---------------------------------------------------------------------------------
// idle

/// Counters every idle connection task shares.
#[derive(Default)]
struct Tally {
    connected: AtomicU64,
    failed: AtomicU64,
    /// MQTT: PINGRESPs received.
    pings: AtomicU64,
    /// Established connections that failed (MQTT poll errors, NATS disconnect events).
    disconnects: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl Tally {
    fn fail(&self, why: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.first_error.lock().get_or_insert(why);
    }

    fn settled(&self) -> u64 {
        self.connected.load(Ordering::Relaxed) + self.failed.load(Ordering::Relaxed)
    }
}

/// Idle: open N keepalive-only connections, then measure the server over a window.
async fn idle(target: &Arc<Target>, args: &PeerArgs) -> Result<Value, String> {
    let pid = args
        .server_pid
        .ok_or("--server-pid is required for the idle scenario")?
        .to_string();
    let wanted = args.connections as u64;
    let window = Duration::from_secs(args.duration.unwrap_or(120));
    let tally = Arc::new(Tally::default());
    let rtt = Arc::new(Latencies::new()?);
    let slots = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT));
    let mut holders = JoinSet::new();
    let mut progress = Progress::new();
    let say_connected = |tally: &Tally| {
        format!(
            "{} connected, {} failed of {wanted}; pings {}",
            tally.connected.load(Ordering::Relaxed),
            tally.failed.load(Ordering::Relaxed),
            tally.pings.load(Ordering::Relaxed),
        )
    };

    let rss_before = rss_of(&pid)?;
    // RSS once a tenth is up, as `bench load` takes it: the growth from there on
    // leaves out the server's fixed start-up cost.
    let mut tenth: Option<(u64, u64)> = None;
    let mut note_tenth = |tally: &Tally| -> Result<(), String> {
        let up = tally.connected.load(Ordering::Relaxed);
        if tenth.is_none() && up > 0 && up >= wanted / 10 {
            tenth = Some((up, rss_of(&pid)?));
        }
        Ok(())
    };
    let started = Instant::now();
    for i in 0..args.connections {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|e| e.to_string())?;
        let (held, counts, rtt) = (target.clone(), tally.clone(), rtt.clone());
        holders.spawn(async move {
            match held.protocol {
                Protocol::Mqtt => hold_mqtt(&held, i, permit, &counts, &rtt).await,
                Protocol::Nats => hold_nats(&held, i, permit, &counts).await,
            }
        });
        note_tenth(&tally)?;
        progress.say(|| say_connected(&tally));
    }
    while tally.settled() < wanted {
        tokio::time::sleep(Duration::from_millis(50)).await;
        note_tenth(&tally)?;
        progress.say(|| say_connected(&tally));
    }
    let connect_time = started.elapsed();
    let connected = tally.connected.load(Ordering::Relaxed);
    let errors = tally.failed.load(Ordering::Relaxed);
    eprintln!(
        "bench peer: {connected} connected, {errors} failed in {:.1} s",
        connect_time.as_secs_f64()
    );
    if connected == 0 {
        let why = tally.first_error.lock().clone().unwrap_or_default();
        return Err(target.unreachable(&why));
    }
    tokio::time::sleep(SETTLE).await;
    let rss_connected = rss_of(&pid)?;

    let pings_before = pings_so_far(target, &tally)?;
    let disconnects_before = tally.disconnects.load(Ordering::Relaxed);
    let cpu_before = cpu_of(&pid)?;
    rtt.set_recording(true);
    let window_start = Instant::now();
    while let Some(left) = window
        .checked_sub(window_start.elapsed())
        .filter(|d| !d.is_zero())
    {
        tokio::time::sleep(left.min(PROGRESS_EVERY)).await;
        eprintln!(
            "bench peer: window {:.0}/{} s, pings {}, disconnects {}",
            window_start.elapsed().as_secs_f64(),
            window.as_secs(),
            pings_so_far(target, &tally)?.saturating_sub(pings_before),
            tally.disconnects.load(Ordering::Relaxed) - disconnects_before,
        );
    }
    let cpu = cpu_of(&pid)?.saturating_sub(cpu_before);
    let window_secs = window_start.elapsed().as_secs_f64();
    rtt.set_recording(false);
    let pings = pings_so_far(target, &tally)?.saturating_sub(pings_before);
    let disconnects = tally.disconnects.load(Ordering::Relaxed) - disconnects_before;
    let rss_end = rss_of(&pid)?;
    holders.shutdown().await;

    let expected = connected as f64 * window_secs / target.keepalive.as_secs_f64();
    let (ping_count_method, ping_rtt_us, ping_rtt_method) = match target.protocol {
        Protocol::Mqtt => (
            "client: PINGRESP events (rumqttc)",
            rtt.summary(false),
            "client: PINGREQ written → PINGRESP read, per connection (rumqttc events)",
        ),
        Protocol::Nats => (
            "client kernel: TCP bytes received from the server ÷ 6 (each PONG/PING line); \
             async-nats exposes no ping count",
            Value::Null,
            "not measured: async-nats answers keepalives inside its connection task",
        ),
    };
    Ok(json!({
        "connections": connected,
        "connections_wanted": wanted,
        "keepalive_s": target.keepalive.as_secs(),
        "window_s": window_secs,
        "connect_s": connect_time.as_secs_f64(),
        "connect_per_sec": connected as f64 / connect_time.as_secs_f64().max(1e-9),
        "server_rss_before_bytes": rss_before,
        "server_rss_connected_bytes": rss_connected,
        "server_rss_end_bytes": rss_end,
        "server_bytes_per_connection": tenth
            .filter(|&(up, _)| up < connected)
            .map(|(up, rss)| rss_connected.saturating_sub(rss) as f64 / (connected - up) as f64),
        "server_bytes_per_connection_incl_startup":
            rss_connected.saturating_sub(rss_before) as f64 / connected as f64,
        "server_cpu_s": cpu.as_secs_f64(),
        "pings_answered": pings,
        "pings_expected": expected.round(),
        "ping_count_method": ping_count_method,
        "server_cpu_us_per_ping": (pings > 0).then(|| cpu.as_secs_f64() * 1e6 / pings as f64),
        "ping_rtt_us": ping_rtt_us,
        "ping_rtt_method": ping_rtt_method,
        "errors": errors,
        "disconnects": disconnects,
        "method": "server RSS and utime+stime from /proc/<server pid>; bytes per connection = \
                   RSS growth from a tenth connected to all connected (+2 s) ÷ the connections \
                   added (incl_startup: from before the first); CPU per ping over the window",
    }))
}

/// One idle MQTT connection: connects, then polls for good, counting PINGRESPs and
/// timing each PINGREQ → PINGRESP.
async fn hold_mqtt(
    target: &Target,
    i: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
    tally: &Tally,
    rtt: &Latencies,
) {
    let (client, mut eventloop) = target.mqtt(format!("{}-i{i}", target.run), 10, 4);
    let connected = mqtt_connect(&mut eventloop).await;
    drop(permit);
    if let Err(why) = connected {
        tally.fail(why);
        return;
    }
    tally.connected.fetch_add(1, Ordering::Relaxed);
    let mut ping_sent: Option<Instant> = None;
    drive_mqtt(eventloop, client, |polled| match polled {
        Ok(Event::Outgoing(Outgoing::PingReq)) => ping_sent = Some(Instant::now()),
        Ok(Event::Incoming(Packet::PingResp)) => {
            tally.pings.fetch_add(1, Ordering::Relaxed);
            if let Some(sent) = ping_sent.take() {
                rtt.record(sent.elapsed());
            }
        }
        Ok(_) => {}
        Err(_) => {
            ping_sent = None;
            tally.disconnects.fetch_add(1, Ordering::Relaxed);
        }
    })
    .await;
}

/// One idle NATS connection: connects, then holds the client (async-nats pings in its
/// own task) until aborted.
async fn hold_nats(
    target: &Target,
    i: usize,
    permit: tokio::sync::OwnedSemaphorePermit,
    tally: &Arc<Tally>,
) {
    let options = || {
        let tally = tally.clone();
        target
            .nats()
            .name(format!("{}-i{i}", target.run))
            // An idle connection reads only short lines; keep its buffer small.
            .read_buffer_capacity(4096)
            .event_callback(move |event| {
                let tally = tally.clone();
                async move {
                    if let async_nats::Event::Disconnected = event {
                        tally.disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
    };
    let connected = nats_connect(target, options).await;
    drop(permit);
    match connected {
        Ok(client) => {
            tally.connected.fetch_add(1, Ordering::Relaxed);
            let _client = client;
            std::future::pending::<()>().await;
        }
        Err(why) => tally.fail(why),
    }
}

/// Keepalive exchanges seen so far: MQTT PINGRESP events; for NATS the TCP bytes
/// received from the server divided by the length of a PONG line.
fn pings_so_far(target: &Target, tally: &Tally) -> Result<u64, String> {
    match target.protocol {
        Protocol::Mqtt => Ok(tally.pings.load(Ordering::Relaxed)),
        Protocol::Nats => Ok(tcp_bytes_received_from(&target.resolved)? / NATS_KEEPALIVE_LINE),
    }
}

/// Bytes the kernel has received so far on this process's TCP connections whose peer
/// is one of `server`. Sockets opened by the client libraries are found in
/// /proc/self/fd and asked for `TCP_INFO`; a socket that closes meanwhile is skipped.
fn tcp_bytes_received_from(server: &[SocketAddr]) -> Result<u64, String> {
    let fds = std::fs::read_dir("/proc/self/fd").map_err(|e| format!("/proc/self/fd: {e}"))?;
    let mut total = 0;
    for entry in fds.flatten() {
        let Some(fd) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
            continue;
        };
        if peer_of(fd).is_some_and(|peer| server.contains(&peer)) {
            total += tcp_bytes_received(fd).unwrap_or(0);
        }
    }
    Ok(total)
}

/// The peer address of socket `fd`, if it is a connected IPv4 or IPv6 socket.
fn peer_of(fd: libc::c_int) -> Option<SocketAddr> {
    // SAFETY: sockaddr_storage is plain data, valid when all zero.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: getpeername writes at most `len` bytes into `storage`, which we own; an
    // fd that is not a socket, or has closed, only makes it fail.
    if unsafe { libc::getpeername(fd, (&raw mut storage).cast(), &mut len) } != 0 {
        return None;
    }
    match libc::c_int::from(storage.ss_family) {
        libc::AF_INET => {
            // SAFETY: for AF_INET the kernel wrote a sockaddr_in, which fits in storage.
            let v4: libc::sockaddr_in = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::from((ip, u16::from_be(v4.sin_port))))
        }
        libc::AF_INET6 => {
            // SAFETY: for AF_INET6 the kernel wrote a sockaddr_in6, which fits in storage.
            let v6: libc::sockaddr_in6 = unsafe { std::ptr::read((&raw const storage).cast()) };
            let ip = Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some(SocketAddr::from((ip, u16::from_be(v6.sin6_port))))
        }
        _ => None,
    }
}

/// `tcpi_bytes_received` of TCP socket `fd` (Linux 4.1 and later).
fn tcp_bytes_received(fd: libc::c_int) -> Option<u64> {
    // SAFETY: tcp_info is plain data, valid when all zero.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which we own.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    let needed = std::mem::offset_of!(libc::tcp_info, tcpi_bytes_received) + 8;
    (rc == 0 && len as usize >= needed).then_some(info.tcpi_bytes_received)
}

// ---------------------------------------------------------------------------------
// latency

/// What a latency run's senders and receivers share. Only messages stamped inside
/// [record_from, record_until) count, so warm-up traffic never does.
struct Flow {
    record_from: AtomicU64,
    record_until: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
    latencies: Latencies,
}

impl Flow {
    fn new() -> Result<Flow, String> {
        let latencies = Latencies::new()?;
        latencies.set_recording(true);
        Ok(Flow {
            // Nothing counts until the window is set.
            record_from: AtomicU64::new(u64::MAX),
            record_until: AtomicU64::new(u64::MAX),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latencies,
        })
    }

    fn counts(&self, stamp: u64) -> bool {
        (self.record_from.load(Ordering::Relaxed)..self.record_until.load(Ordering::Relaxed))
            .contains(&stamp)
    }

    fn sent(&self, stamp: u64) {
        if self.counts(stamp) {
            self.sent.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn delivered(&self, payload: &[u8]) {
        let now = clock();
        if let Some(stamp) = stamp_of(payload).filter(|&s| self.counts(s)) {
            self.received.fetch_add(1, Ordering::Relaxed);
            self.latencies
                .record(Duration::from_nanos(now.saturating_sub(stamp)));
        }
    }

    fn error(&self) {
        self.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// The sending side of one pair.
enum Publisher {
    Mqtt {
        client: AsyncClient,
        topic: String,
    },
    Nats {
        client: async_nats::Client,
        subject: String,
    },
}

impl Publisher {
    async fn publish(&self, body: Bytes) -> Result<(), String> {
        match self {
            Publisher::Mqtt { client, topic } => client
                .publish_bytes(topic.clone(), QoS::AtLeastOnce, false, body)
                .await
                .map_err(|e| e.to_string()),
            Publisher::Nats { client, subject } => client
                .publish(subject.clone(), body)
                .await
                .map_err(|e| e.to_string()),
        }
    }
}

/// A pair's publisher and the tasks that keep its two connections going.
type OpenPair = (Publisher, Vec<JoinHandle<()>>);

/// Latency: pairs at a fixed total rate, staggered; send → delivery percentiles.
async fn latency(target: &Arc<Target>, args: &PeerArgs) -> Result<Value, String> {
    if args.pairs == 0 || args.rate == 0 {
        return Err("--pairs and --rate must be at least 1".into());
    }
    let record = Duration::from_secs(args.duration.unwrap_or(10));
    let body = args.body.max(8);
    let flow = Arc::new(Flow::new()?);
    let pid = args.server_pid.map(|p| p.to_string());

    let slots = Arc::new(Semaphore::new(CONNECTS_IN_FLIGHT / 2));
    let mut opening = JoinSet::new();
    for i in 0..args.pairs {
        let (target, flow, slots) = (target.clone(), flow.clone(), slots.clone());
        opening.spawn(async move {
            let _permit = slots.acquire().await.map_err(|e| e.to_string())?;
            match target.protocol {
                Protocol::Mqtt => open_mqtt_pair(&target, i, flow).await,
                Protocol::Nats => open_nats_pair(&target, i, flow).await,
            }
        });
    }
    let mut publishers = Vec::with_capacity(args.pairs);
    let mut background = Vec::with_capacity(2 * args.pairs);
    let mut failed = 0u64;
    let mut first_error = None;
    let mut progress = Progress::new();
    while let Some(opened) = opening.join_next().await {
        match opened.map_err(|e| e.to_string()).and_then(|r| r) {
            Ok((publisher, tasks)) => {
                publishers.push(publisher);
                background.extend(tasks);
            }
            Err(why) => {
                failed += 1;
                first_error.get_or_insert(why);
            }
        }
        progress.say(|| format!("{} of {} pairs open", publishers.len(), args.pairs));
    }
    if publishers.is_empty() {
        return Err(target.unreachable(&first_error.unwrap_or_default()));
    }
    let pairs = publishers.len();
    eprintln!(
        "bench peer: {pairs} pairs open ({failed} failed); {} msg/s for {} s after a {} s warm-up",
        args.rate,
        record.as_secs(),
        WARM_UP.as_secs()
    );

    // Each pair sends every pairs/rate seconds; pair k starts k/rate seconds in, so
    // the sends of all pairs interleave evenly.
    let start = Instant::now() + Duration::from_millis(200);
    let record_from = start + WARM_UP;
    let record_until = record_from + record;
    flow.record_from
        .store(clock_at(record_from), Ordering::Relaxed);
    flow.record_until
        .store(clock_at(record_until), Ordering::Relaxed);
    let period = Duration::from_secs_f64(pairs as f64 / args.rate as f64);
    let mut senders = JoinSet::new();
    for (k, publisher) in publishers.into_iter().enumerate() {
        let first = start + Duration::from_secs_f64(k as f64 / args.rate as f64);
        let flow = flow.clone();
        let until = clock_at(record_until);
        senders.spawn(async move {
            let mut ticks = tokio::time::interval_at(first.into(), period);
            loop {
                ticks.tick().await;
                let stamp = clock();
                if stamp >= until {
                    break;
                }
                match publisher.publish(stamped(body, stamp)).await {
                    Ok(()) => flow.sent(stamp),
                    Err(_) => flow.error(),
                }
            }
        });
    }

    tokio::time::sleep_until(record_from.into()).await;
    let cpu_before = pid.as_deref().map(cpu_of).transpose()?;
    // The host's share of the window (see `bench hiccups`): the tail follows it.
    let steal_before = crate::hiccups::steal_ms();
    while Instant::now() < record_until {
        tokio::time::sleep(PROGRESS_EVERY.min(record_until - Instant::now())).await;
        eprintln!(
            "bench peer: recording, {} sent, {} received",
            flow.sent.load(Ordering::Relaxed),
            flow.received.load(Ordering::Relaxed)
        );
    }
    let cpu = match (pid.as_deref(), cpu_before) {
        (Some(pid), Some(before)) => Some(cpu_of(pid)?.saturating_sub(before)),
        _ => None,
    };
    let steal_ms = crate::hiccups::steal_ms().saturating_sub(steal_before);
    tokio::time::sleep(DRAIN).await;
    // A sender stuck behind a full request queue must not hold the report back.
    senders.shutdown().await;
    for task in &background {
        task.abort();
    }

    let sent = flow.sent.load(Ordering::Relaxed);
    let received = flow.received.load(Ordering::Relaxed);
    Ok(json!({
        "pairs": pairs,
        "connections": 2 * pairs,
        "rate": args.rate,
        "duration_s": record.as_secs(),
        "body": body,
        "qos": match target.protocol {
            Protocol::Mqtt => json!(1),
            Protocol::Nats => json!("core (at most once, in memory)"),
        },
        "latency_us": flow.latencies.summary(true),
        "sent": sent,
        "messages": received,
        "lost": sent.saturating_sub(received),
        "errors": failed + flow.errors.load(Ordering::Relaxed),
        "server_cpu_s": cpu.map(|c| c.as_secs_f64()),
        "steal_ms_all_cpus": steal_ms,
    }))
}

/// Opens MQTT pair `i`: a subscriber (QoS 1, granted before this returns) whose
/// deliveries feed `flow`, and a publisher.
async fn open_mqtt_pair(target: &Target, i: usize, flow: Arc<Flow>) -> Result<OpenPair, String> {
    let topic = format!("tether-bench/{}/{i}", target.run);
    let (sub_client, mut sub_loop) = target.mqtt(format!("{}-s{i}", target.run), 10, 10);
    mqtt_connect(&mut sub_loop)
        .await
        .map_err(|e| target.unreachable(&e))?;
    mqtt_subscribe(&sub_client, &mut sub_loop, &topic).await?;
    let (pub_client, mut pub_loop) = target.mqtt(format!("{}-p{i}", target.run), 100, 10);
    mqtt_connect(&mut pub_loop)
        .await
        .map_err(|e| target.unreachable(&e))?;
    let deliveries = flow.clone();
    let subscriber = tokio::spawn(drive_mqtt(
        sub_loop,
        sub_client,
        move |polled| match polled {
            Ok(Event::Incoming(Packet::Publish(publish))) => deliveries.delivered(&publish.payload),
            Ok(_) => {}
            Err(_) => deliveries.error(),
        },
    ));
    let driver = tokio::spawn(drive_mqtt(pub_loop, pub_client.clone(), move |polled| {
        if polled.is_err() {
            flow.error();
        }
    }));
    Ok((
        Publisher::Mqtt {
            client: pub_client,
            topic,
        },
        vec![subscriber, driver],
    ))
}

/// Opens NATS pair `i`: a subscriber whose deliveries feed `flow`, and a publisher.
async fn open_nats_pair(target: &Target, i: usize, flow: Arc<Flow>) -> Result<OpenPair, String> {
    let subject = format!("tether-bench.{}.{i}", target.run);
    let sub_client = nats_connect(target, || target.nats())
        .await
        .map_err(|e| target.unreachable(&e))?;
    let mut subscription = sub_client
        .subscribe(subject.clone())
        .await
        .map_err(|e| format!("subscribe {subject}: {e}"))?;
    sub_client
        .flush()
        .await
        .map_err(|e| format!("subscribe {subject}: {e}"))?;
    let pub_client = nats_connect(target, || target.nats())
        .await
        .map_err(|e| target.unreachable(&e))?;
    let subscriber = tokio::spawn(async move {
        let _client = sub_client;
        while let Some(message) = subscription.next().await {
            flow.delivered(&message.payload);
        }
    });
    Ok((
        Publisher::Nats {
            client: pub_client,
            subject,
        },
        vec![subscriber],
    ))
}

// ---------------------------------------------------------------------------------
// throughput

/// Throughput: one publisher, one subscriber, `--messages` as fast as flow control
/// allows; timed from the first publish until the last delivery (and, for MQTT, the
/// last PUBACK).
async fn throughput(target: &Arc<Target>, args: &PeerArgs) -> Result<Value, String> {
    let messages = args.messages;
    if messages == 0 {
        return Err("--messages must be at least 1".into());
    }
    let body_len = args.body.max(1);
    let body = Bytes::from(vec![b'.'; body_len]);
    let pid = args.server_pid.map(|p| p.to_string());
    let delivered = Arc::new(Progressed::default());
    let acked = Arc::new(Progressed::default());
    let errors = Arc::new(AtomicU64::new(0));
    const MQTT_INFLIGHT: u16 = 1000;

    let (start, publishing, background) = match target.protocol {
        Protocol::Mqtt => {
            let topic = format!("tether-bench/{}/throughput", target.run);
            let (sub_client, mut sub_loop) = target.mqtt(format!("{}-ts", target.run), 100, 10);
            mqtt_connect(&mut sub_loop)
                .await
                .map_err(|e| target.unreachable(&e))?;
            mqtt_subscribe(&sub_client, &mut sub_loop, &topic).await?;
            let (pub_client, mut pub_loop) = target.mqtt(
                format!("{}-tp", target.run),
                MQTT_INFLIGHT,
                usize::from(MQTT_INFLIGHT),
            );
            mqtt_connect(&mut pub_loop)
                .await
                .map_err(|e| target.unreachable(&e))?;
            let (deliveries, sub_errors) = (delivered.clone(), errors.clone());
            let subscriber =
                tokio::spawn(drive_mqtt(
                    sub_loop,
                    sub_client,
                    move |polled| match polled {
                        Ok(Event::Incoming(Packet::Publish(_))) => deliveries.step(),
                        Ok(_) => {}
                        Err(_) => {
                            sub_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                ));
            let (acks, pub_errors) = (acked.clone(), errors.clone());
            let driver =
                tokio::spawn(drive_mqtt(
                    pub_loop,
                    pub_client.clone(),
                    move |polled| match polled {
                        Ok(Event::Incoming(Packet::PubAck(_))) => acks.step(),
                        Ok(_) => {}
                        Err(_) => {
                            pub_errors.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                ));
            let start = clock();
            let publishing = tokio::spawn(async move {
                for _ in 0..messages {
                    pub_client
                        .publish_bytes(topic.clone(), QoS::AtLeastOnce, false, body.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                Ok::<(), String>(())
            });
            (start, publishing, vec![subscriber, driver])
        }
        Protocol::Nats => {
            let subject = format!("tether-bench.{}.throughput", target.run);
            let capacity = usize::try_from(messages).unwrap_or(usize::MAX).max(1 << 16);
            let sub_client = nats_connect(target, || target.nats().subscription_capacity(capacity))
                .await
                .map_err(|e| target.unreachable(&e))?;
            let mut subscription = sub_client
                .subscribe(subject.clone())
                .await
                .map_err(|e| format!("subscribe {subject}: {e}"))?;
            let pub_client = nats_connect(target, || target.nats())
                .await
                .map_err(|e| target.unreachable(&e))?;
            let ready = Arc::new(AtomicBool::new(false));
            let (deliveries, subscribed) = (delivered.clone(), ready.clone());
            let subscriber = tokio::spawn(async move {
                let _client = sub_client;
                while let Some(message) = subscription.next().await {
                    // Empty messages are the probes that show the subscription is live.
                    if message.payload.is_empty() {
                        subscribed.store(true, Ordering::Relaxed);
                    } else {
                        deliveries.step();
                    }
                }
            });
            // The SUB travels on another connection than the PUBs: probe until the
            // server routes to it, so no measured message is published into the void.
            let probing = async {
                while !ready.load(Ordering::Relaxed) {
                    pub_client
                        .publish(subject.clone(), Bytes::new())
                        .await
                        .map_err(|e| e.to_string())?;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Ok::<(), String>(())
            };
            tokio::time::timeout(Duration::from_secs(CONNECT_TIMEOUT_S), probing)
                .await
                .map_err(|_| format!("subscription to {subject} never received a probe"))??;
            let start = clock();
            let publishing = tokio::spawn(async move {
                for _ in 0..messages {
                    pub_client
                        .publish(subject.clone(), body.clone())
                        .await
                        .map_err(|e| e.to_string())?;
                }
                pub_client.flush().await.map_err(|e| e.to_string())?;
                Ok::<(), String>(())
            });
            (start, publishing, vec![subscriber])
        }
    };
    let cpu_before = pid.as_deref().map(cpu_of).transpose()?;
    let needs_acks = target.protocol == Protocol::Mqtt;

    let mut progress = Progress::new();
    let mut last_moved = Instant::now();
    let mut last_seen = (0, 0);
    loop {
        tokio::time::sleep(Duration::from_millis(10)).await;
        let seen = (delivered.count(), acked.count());
        let complete = seen.0 >= messages && (!needs_acks || seen.1 >= messages);
        if complete {
            break;
        }
        if seen != last_seen {
            last_seen = seen;
            last_moved = Instant::now();
        } else if last_moved.elapsed() >= STALL {
            eprintln!(
                "bench peer: nothing moved for {} s; stopping",
                STALL.as_secs()
            );
            break;
        }
        progress.say(|| format!("{} of {messages} delivered, {} acked", seen.0, seen.1));
    }
    let cpu = match (pid.as_deref(), cpu_before) {
        (Some(pid), Some(before)) => Some(cpu_of(pid)?.saturating_sub(before)),
        _ => None,
    };
    let publish_error = if publishing.is_finished() {
        publishing
            .await
            .map_err(|e| e.to_string())
            .and_then(|r| r)
            .err()
    } else {
        publishing.abort();
        None
    };
    for task in &background {
        task.abort();
    }

    let received = delivered.count();
    let done = delivered
        .last_at()
        .max(if needs_acks { acked.last_at() } else { 0 });
    let seconds = Duration::from_nanos(done.saturating_sub(start)).as_secs_f64();
    Ok(json!({
        "messages": messages,
        "body": body_len,
        "received": received,
        "acked": needs_acks.then(|| acked.count()),
        "lost": messages.saturating_sub(received),
        "seconds": seconds,
        "msgs_per_sec": (seconds > 0.0).then(|| received as f64 / seconds),
        "qos": match target.protocol {
            Protocol::Mqtt => json!(1),
            Protocol::Nats => json!("core (at most once, in memory)"),
        },
        "inflight": needs_acks.then_some(MQTT_INFLIGHT),
        "errors": errors.load(Ordering::Relaxed) + u64::from(publish_error.is_some()),
        "publish_error": publish_error,
        "server_cpu_s": cpu.map(|c| c.as_secs_f64()),
    }))
}

/// A count that also remembers when (on [`clock`]) it last moved.
#[derive(Default)]
struct Progressed {
    count: AtomicU64,
    last_at: AtomicU64,
}

impl Progressed {
    fn step(&self) {
        self.count.fetch_add(1, Ordering::Relaxed);
        self.last_at.store(clock(), Ordering::Relaxed);
    }

    fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    fn last_at(&self) -> u64 {
        self.last_at.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------
// shared pieces

/// Microsecond percentiles, recorded only while switched on.
struct Latencies {
    recording: AtomicBool,
    histogram: Mutex<Histogram<u64>>,
}

impl Latencies {
    fn new() -> Result<Latencies, String> {
        let histogram = Histogram::new_with_bounds(1, LATENCY_CEILING_US, 3)
            .map_err(|e| format!("histogram: {e}"))?;
        Ok(Latencies {
            recording: AtomicBool::new(false),
            histogram: Mutex::new(histogram),
        })
    }

    fn set_recording(&self, on: bool) {
        self.recording.store(on, Ordering::Relaxed);
    }

    fn record(&self, took: Duration) {
        if self.recording.load(Ordering::Relaxed) {
            let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
            self.histogram.lock().saturating_record(us);
        }
    }

    /// `{p50, p99, [p999,] max, samples}`, or null when nothing was recorded.
    fn summary(&self, with_p999: bool) -> Value {
        let histogram = self.histogram.lock();
        if histogram.is_empty() {
            return Value::Null;
        }
        let mut summary = json!({
            "p50": histogram.value_at_quantile(0.50),
            "p99": histogram.value_at_quantile(0.99),
            "max": histogram.max(),
            "samples": histogram.len(),
        });
        if let (true, Some(fields)) = (with_p999, summary.as_object_mut()) {
            fields.insert("p999".into(), json!(histogram.value_at_quantile(0.999)));
        }
        summary
    }
}

/// Prints a progress line to stderr at most every [`PROGRESS_EVERY`].
struct Progress {
    last: Instant,
}

impl Progress {
    fn new() -> Progress {
        Progress {
            last: Instant::now(),
        }
    }

    fn say(&mut self, line: impl FnOnce() -> String) {
        if self.last.elapsed() >= PROGRESS_EVERY {
            self.last = Instant::now();
            eprintln!("bench peer: {}", line());
        }
    }
}

/// The process-wide time base that message stamps count from.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since [`base`]: the stamp a message carries.
fn clock() -> u64 {
    clock_at(Instant::now())
}

/// Nanoseconds from [`base`] to `at` (zero before it).
fn clock_at(at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(base()).as_nanos()).unwrap_or(u64::MAX)
}

/// A body of `len` bytes that starts with `stamp`.
fn stamped(len: usize, stamp: u64) -> Bytes {
    let mut body = BytesMut::with_capacity(len.max(8));
    body.put_u64_le(stamp);
    body.resize(len.max(8), b'.');
    body.freeze()
}

/// The stamp a body starts with, if it is long enough to hold one.
fn stamp_of(body: &[u8]) -> Option<u64> {
    let stamp: [u8; 8] = body.get(..8)?.try_into().ok()?;
    Some(u64::from_le_bytes(stamp))
}

/// Raises this process's soft open-file limit to its hard limit; returns the limit.
fn raise_fd_limit() -> Result<u64, String> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into `limit`, which we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(format!("getrlimit: {}", std::io::Error::last_os_error()));
    }
    if limit.rlim_cur < limit.rlim_max {
        limit.rlim_cur = limit.rlim_max;
        // SAFETY: setrlimit reads `limit`; raising the soft limit to the hard one is allowed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
            return Err(format!("setrlimit: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(limit.rlim_cur)
}
