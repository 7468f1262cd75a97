//! `tether`: run a server, mint tokens, send and receive from the command line,
//! and run the benchmarks.

/// mimalloc instead of glibc malloc: the commit thread frees what connection tasks
/// allocated, and glibc's per-arena locking made that a visible cost (measured in
/// BENCHMARKS.md: ~85k → ~105k msg/s durable one-pair throughput; idle session memory
/// 710 → 818 B, still within the 1 KiB budget).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod bench;
mod bench_peers;
mod bench_transports;
mod chaos;
mod client_cmds;
mod floor;
mod hiccups;
mod lab;
mod load;

use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use tether_server::{Server, ServerConfig, StartPolicy};
use tether_store::Durability;

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "Tether: IM long connections that stay alive and lose nothing"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a server with the embedded store.
    Serve(ServeArgs),
    /// Print a login token for a user (signed with the data dir's secret).
    Token(TokenArgs),
    /// Write a self-signed development certificate and key (PEM) for TLS, WSS and QUIC.
    Cert(CertArgs),
    /// Send one message; exits 0 only after the server's SEND_ACK.
    Send(client_cmds::SendArgs),
    /// Print delivered messages as JSON lines and acknowledge them.
    Recv(client_cmds::RecvArgs),
    /// Interactive terminal chat with one peer.
    Chat(client_cmds::ChatArgs),
    /// Groups: create, add, remove, leave, list.
    Group(client_cmds::GroupArgs),
    /// This user's conversations (1:1 and group) with last seq and unread count.
    Conversations(client_cmds::ConversationsArgs),
    /// Benchmarks (codec, throughput, latency, memory per session).
    Bench(bench::BenchArgs),
    /// Network lab (root): prove the heartbeat against a real NAT in namespaces.
    Lab(lab::LabArgs),
    /// Delivery under chaos: connection kills, server SIGKILLs, simulated power cuts,
    /// and (root, `--lab`) a lossy NAT with blackholes; prints what arrived where.
    Chaos(chaos::ChaosArgs),
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Data directory (store and token secret).
    #[arg(long, default_value = "tether-data")]
    data: PathBuf,
    /// Address for client connections.
    #[arg(long, default_value = "127.0.0.1:7400")]
    listen: SocketAddr,
    /// Address for HTTP (/metrics, /healthz, and WebSocket sessions at /ws).
    #[arg(long, default_value = "127.0.0.1:7401")]
    http: SocketAddr,
    /// Address for TLS over TCP (`tls://`); needs --tls-cert and --tls-key.
    #[arg(long)]
    tls_listen: Option<SocketAddr>,
    /// UDP address for QUIC (`quic://`, ALPN tether/1); needs --tls-cert and --tls-key.
    #[arg(long)]
    quic_listen: Option<SocketAddr>,
    /// Address for HTTPS: the HTTP routes, and WebSocket over TLS (`wss://…/ws`).
    #[arg(long)]
    https_listen: Option<SocketAddr>,
    /// Certificate chain (PEM) for TLS, QUIC and HTTPS (`tether cert` makes a
    /// self-signed one for development).
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// `fsync` (acknowledged = on disk, survives power loss) or `relaxed` (written to
    /// the OS: survives a crash of the server, not a power cut).
    #[arg(long, default_value = "fsync")]
    durability: Durability,
    /// Where a device that never connected starts: `beginning`, `head` or `last:N`.
    #[arg(long, default_value = "beginning")]
    start_policy: StartPolicy,
    /// Milliseconds a new connection has to send HELLO.
    #[arg(long, default_value_t = 10_000)]
    login_deadline_ms: u64,
    /// Largest frame after login, bytes.
    #[arg(long, default_value_t = tether_proto::DEFAULT_MAX_FRAME)]
    max_frame: usize,
    /// Most un-ACKed DELIVERs per connection.
    #[arg(long, default_value_t = 256)]
    credit_window: u32,
    /// Days messages (and their dedup keys) are kept at most; also the dedup window
    /// announced to clients.
    #[arg(long, default_value_t = 30)]
    retention_days: u64,
    /// Keep messages every device already has, for SYNC history, until retention. By
    /// default a message is removed once every live device of its inbox's user has
    /// acknowledged it, as WhatsApp- or WeChat-style servers do (dedup keys still stay
    /// for the whole retention).
    #[arg(long)]
    keep_acked_history: bool,
    /// Seconds between compaction runs (retention, acknowledged messages, expired
    /// devices).
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(1..))]
    compact_interval_secs: u64,
    /// Days a device may stay unseen before its server cursor is dropped.
    #[arg(long, default_value_t = 90)]
    device_expiry_days: u64,
    /// Most devices per user. A new device beyond it evicts the least recently seen
    /// device that is not connected; if all are connected it is refused (DEVICE_LIMIT).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    max_devices: u32,
    /// Most members a group may have (GROUP_FULL beyond it). Each group message is one
    /// inbox copy per member, all in one commit.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u32).range(2..=100_000))]
    max_group_members: u32,
    /// Heartbeat interval given to clients that ask for none, ms.
    #[arg(long, default_value_t = 30_000)]
    heartbeat_default_ms: u64,
    /// Shortest heartbeat interval accepted, ms (requests are clamped).
    #[arg(long, default_value_t = 5_000)]
    heartbeat_min_ms: u64,
    /// Longest heartbeat interval accepted, ms (requests are clamped).
    #[arg(long, default_value_t = 1_800_000)]
    heartbeat_max_ms: u64,
    /// `P`: how long clients wait for a PONG, ms (announced in WELCOME).
    #[arg(long, default_value_t = 5_000)]
    pong_timeout_ms: u64,
    /// `m`: PINGs a client may miss before its link is dead (announced in WELCOME).
    #[arg(long, default_value_t = 2)]
    max_misses: u32,
    /// Grace added to the server's deadline `I + m·P` for RTT and timer slack, ms.
    #[arg(long, default_value_t = 5_000)]
    deadline_grace_ms: u64,
    /// TCP_USER_TIMEOUT on client sockets, ms: unacknowledged data older than this
    /// aborts the connection in the kernel (0 = the kernel's default).
    #[arg(long, default_value_t = 60_000)]
    tcp_user_timeout_ms: u64,
    /// Logins admitted per second; beyond it clients get ERROR OVERLOADED with
    /// retry_after_ms.
    #[arg(long, default_value_t = 4000.0)]
    login_rate: f64,
    /// Logins admitted at once before the rate applies.
    #[arg(long, default_value_t = 2000)]
    login_burst: u32,
    /// Threads that run connections (default: one per core, or TOKIO_WORKER_THREADS).
    /// The commit and checkpoint threads come on top.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    workers: Option<u16>,
    /// Run TCP and TLS connections on `--workers` single-threaded runtimes, each
    /// connection pinned to one, instead of the shared work-stealing runtime. Idle
    /// PINGs cost less CPU (about 18 % with heartbeats spread out), messages between
    /// connections on different threads wait longer (1:1 p50 +0.1 ms): for gateways
    /// whose connections are mostly idle. See SCALE.md, session 15.
    #[arg(long)]
    per_core_runtimes: bool,
    /// On SIGTERM, clients are told (GOAWAY) to reconnect after a random delay within
    /// this many ms, so a restart does not bring them all back at once.
    #[arg(long, default_value_t = 10_000)]
    drain_window_ms: u64,
    /// On SIGTERM, the address clients should move to instead.
    #[arg(long)]
    drain_to: Option<String>,
    /// Development only: the HTTP port mints a login token for any user
    /// (`POST /dev/token`), so the chat page at `/` logs in by name. Never on a
    /// server others can reach.
    #[arg(long)]
    dev_login: bool,
    /// Least time between two probe sessions (smart heartbeat side probes) of one
    /// device, ms.
    #[arg(long, default_value_t = 500)]
    probe_min_gap_ms: u64,
    /// Testing only: keep the store's unsynced writes in process memory (seeded
    /// random early write-back), so killing this process is a simulated power cut.
    /// Used by `tether chaos`; never in production.
    #[arg(long, value_name = "SEED")]
    simulate_power_loss: Option<u64>,
}

#[derive(clap::Args)]
struct CertArgs {
    /// Names the certificate is valid for (DNS names or IP addresses).
    #[arg(long = "host", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
    hosts: Vec<String>,
    /// Where to write cert.pem and key.pem.
    #[arg(long, default_value = "tether-data/tls")]
    out: PathBuf,
    /// Days the certificate is valid.
    #[arg(long, default_value_t = 365)]
    days: u32,
}

fn make_cert(args: CertArgs) -> ExitCode {
    let written = (|| -> std::io::Result<(PathBuf, PathBuf)> {
        let (cert, key) = tether_transport::tls::self_signed(&args.hosts, args.days)?;
        std::fs::create_dir_all(&args.out)?;
        let (cert_path, key_path) = (args.out.join("cert.pem"), args.out.join("key.pem"));
        std::fs::write(&cert_path, cert)?;
        let mut options = std::fs::OpenOptions::new();
        std::os::unix::fs::OpenOptionsExt::mode(
            options.write(true).create(true).truncate(true),
            0o600,
        );
        std::io::Write::write_all(&mut options.open(&key_path)?, key.as_bytes())?;
        Ok((cert_path, key_path))
    })();
    match written {
        Ok((cert, key)) => {
            println!(
                "wrote {} and {} (self-signed, for {}; development only)",
                cert.display(),
                key.display(),
                args.hosts.join(", ")
            );
            println!(
                "serve: tether serve --tls-listen 127.0.0.1:7443 --quic-listen 127.0.0.1:7443 --https-listen 127.0.0.1:7444 --tls-cert {} --tls-key {}",
                cert.display(),
                key.display()
            );
            println!("clients: add --ca {} to trust it", cert.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("tether cert: {e}");
            ExitCode::FAILURE
        }
    }
}

#[derive(clap::Args)]
struct TokenArgs {
    /// The user id (the token's `sub`).
    user: String,
    /// Data directory holding the secret (created if missing).
    #[arg(long, default_value = "tether-data")]
    data: PathBuf,
}

fn init_logging() {
    init_logging_with("info");
}

/// Logging to stderr, filtered by `TETHER_LOG` or else `default`.
fn init_logging_with(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TETHER_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// No transparent huge pages for this process. mimalloc asks for them on its arenas,
/// and with the kernel's usual `defrag=madvise` a fault in such an arena zeroes 2 MiB
/// and may compact memory first, on the faulting thread. That put milliseconds into
/// the message path whenever the store's layers grew: 1:1 p99 at 5k msg/s fell from
/// 1.5–2.7 ms to 0.8–0.9 ms without them (SCALE.md, session 14). mimalloc's own switch
/// (`MIMALLOC_ALLOW_THP=0`) is read before `main`; this is the same prctl it makes.
fn no_huge_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE takes plain integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if rc != 0 {
        eprintln!(
            "tether: cannot turn off transparent huge pages: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn main() -> ExitCode {
    no_huge_pages();
    let cli = Cli::parse();
    if let Command::Lab(args) = cli.command {
        // Its own threads and runtimes, one per namespace.
        init_logging();
        return lab::run(args);
    }
    if let Command::Chaos(args) = cli.command {
        // Its own runtime, in the lab's client namespace with `--lab`.
        init_logging_with("warn,tether::chaos=info");
        return chaos::run(args);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Command::Serve(ServeArgs {
        workers: Some(n), ..
    }) = &cli.command
    {
        builder.worker_threads(usize::from(*n));
    }
    let runtime = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("tether: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => {
                init_logging();
                serve(args).await
            }
            Command::Token(args) => match tether_server::auth::mint_token(&args.data, &args.user) {
                Ok(token) => {
                    println!("{token}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tether token: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Cert(args) => make_cert(args),
            Command::Send(args) => client_cmds::run_send(args).await,
            Command::Recv(args) => client_cmds::run_recv(args).await,
            Command::Chat(args) => client_cmds::run_chat(args).await,
            Command::Group(args) => client_cmds::run_group(args).await,
            Command::Conversations(args) => client_cmds::run_conversations(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Lab(_) | Command::Chaos(_) => {
                unreachable!("handled before the runtime starts")
            }
        }
    })
}

async fn serve(args: ServeArgs) -> ExitCode {
    let config = ServerConfig {
        data_dir: args.data,
        listen: args.listen,
        http: Some(args.http),
        durability: args.durability,
        start_policy: args.start_policy,
        login_deadline: Duration::from_millis(args.login_deadline_ms),
        max_frame: args.max_frame,
        credit_window: args.credit_window.max(1),
        retention: Duration::from_secs(args.retention_days * 24 * 3600),
        compact_acked: !args.keep_acked_history,
        compact_interval: Duration::from_secs(args.compact_interval_secs),
        device_expiry: Duration::from_secs(args.device_expiry_days * 24 * 3600),
        max_devices: args.max_devices,
        max_group_members: args.max_group_members,
        heartbeat: tether_server::config::HeartbeatLimits {
            default_interval: Duration::from_millis(args.heartbeat_default_ms),
            min_interval: Duration::from_millis(args.heartbeat_min_ms),
            max_interval: Duration::from_millis(args.heartbeat_max_ms.max(args.heartbeat_min_ms)),
            pong_timeout: Duration::from_millis(args.pong_timeout_ms),
            max_misses: args.max_misses,
            grace: Duration::from_millis(args.deadline_grace_ms),
        },
        drain_window: Duration::from_millis(args.drain_window_ms),
        drain_to: args.drain_to,
        probes: tether_server::probe::ProbeLimits {
            min_gap: Duration::from_millis(args.probe_min_gap_ms),
        },
        simulate_power_loss: args.simulate_power_loss,
        dev_login: args.dev_login,
        login_rate: args.login_rate,
        login_burst: args.login_burst,
        tcp_user_timeout: (args.tcp_user_timeout_ms > 0)
            .then(|| Duration::from_millis(args.tcp_user_timeout_ms)),
        tls: args
            .tls_cert
            .zip(args.tls_key)
            .map(|(cert, key)| tether_server::TlsFiles { cert, key }),
        tls_listen: args.tls_listen,
        quic_listen: args.quic_listen,
        https: args.https_listen,
        connection_threads: if args.per_core_runtimes {
            args.workers.map_or_else(
                || std::thread::available_parallelism().map_or(1, |n| n.get()),
                usize::from,
            )
        } else {
            0
        },
        ..ServerConfig::default()
    };
    let server = match Server::open(config) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tether serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    let running = match server.bind().await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tether serve: {e}");
            return ExitCode::FAILURE;
        }
    };
    wait_for_stop_signal().await;
    tracing::info!("stopping: draining sessions and flushing the store");
    running.drain().await;
    ExitCode::SUCCESS
}

async fn wait_for_stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
