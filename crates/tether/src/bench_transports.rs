//! `tether bench transports`: what each transport costs (issue 7, must-show 4).
//!
//! One `tether serve` child process (this binary) with every listener on, loaded from
//! this process through the SDK's connector:
//!
//! - **bytes on the wire** per heartbeat (PING + PONG) and per small message (SEND,
//!   SEND_ACK, DELIVER, ACK, and the delivered receipt's DELIVER and ACK): the
//!   loopback interface's byte and packet counters over N sequential round trips, so
//!   IP, TCP/UDP, TLS, WebSocket and QUIC overheads and pure ACK packets all count;
//! - **1:1 latency**: SEND written → DELIVER read, one message in flight;
//! - **server memory per idle session**: RSS delta of the server process over S
//!   logged-in idle sessions (the clients live in this process; the kernel's socket
//!   memory is not in RSS).
//!
//! Run it on an otherwise idle machine: the loopback counters are machine-wide.

use bytes::Bytes;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_client::{BoxTransport, Connector, NetConnector};
use tether_proto::{Frame, frame, pb};
use tether_transport::{flush, recv};

/// A `tether serve` child with every listener.
struct Child_ {
    child: Child,
    pid: String,
    data: std::path::PathBuf,
    urls: Vec<(&'static str, String)>,
}

impl Drop for Child_ {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(dir: &Path, durability: &str) -> Result<Child_, String> {
    let (cert, key) =
        tether_transport::tls::self_signed(&["127.0.0.1".into()], 7).map_err(|e| e.to_string())?;
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, cert).map_err(|e| e.to_string())?;
    std::fs::write(&key_path, key).map_err(|e| e.to_string())?;
    let data = dir.join("data");
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .arg("serve")
        .arg("--data")
        .arg(&data)
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .args([
            "--tls-listen",
            "127.0.0.1:0",
            "--quic-listen",
            "127.0.0.1:0",
        ])
        .args(["--https-listen", "127.0.0.1:0", "--durability", durability])
        .args(["--login-rate", "1000000", "--login-burst", "1000000"])
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .env("TETHER_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("spawn tether serve: {e}"))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let line = loop {
        match lines.next() {
            Some(Ok(l)) if l.contains("tether server listening") => break l,
            Some(Ok(_)) => {}
            _ => return Err("the server did not start".into()),
        }
    };
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines.by_ref() {});
    let field = |name: &str| -> Result<SocketAddr, String> {
        let start = line.find(name).ok_or(format!("no {name} in {line}"))? + name.len();
        let rest = &line[start..];
        let end = rest.find([' ', ')']).unwrap_or(rest.len());
        rest[..end].parse().map_err(|e| format!("{name}: {e}"))
    };
    let (tcp, tls, quic, http, https) = (
        field("addr=")?,
        field("tls=Some(")?,
        field("quic=Some(")?,
        field("http=Some(")?,
        field("https=Some(")?,
    );
    let pid = child.id().to_string();
    Ok(Child_ {
        child,
        pid,
        data,
        urls: vec![
            ("tcp", format!("tcp://{tcp}")),
            ("tls", format!("tls://{tls}")),
            ("ws (proto)", format!("ws://{http}/ws")),
            ("ws (json)", format!("ws://{http}/ws?encoding=json")),
            ("wss", format!("wss://{https}/ws")),
            ("quic", format!("quic://{quic}")),
        ],
    })
}

/// Loopback interface counters: (bytes, packets).
fn lo_counters() -> Result<(u64, u64), String> {
    let read = |f: &str| -> Result<u64, String> {
        std::fs::read_to_string(format!("/sys/class/net/lo/statistics/{f}"))
            .map_err(|e| e.to_string())?
            .trim()
            .parse()
            .map_err(|e: std::num::ParseIntError| e.to_string())
    };
    Ok((read("tx_bytes")?, read("tx_packets")?))
}

struct Raw {
    t: BoxTransport,
}

impl Raw {
    async fn login(
        connector: &NetConnector,
        url: &str,
        token: String,
        device: &str,
        epoch: u64,
    ) -> Result<Self, String> {
        let t = connector
            .connect(url)
            .await
            .map_err(|e| format!("{url}: {e}"))?;
        let mut raw = Raw { t };
        raw.send(Frame::Hello(pb::Hello {
            version: 1,
            token,
            device_id: device.into(),
            device_epoch: epoch,
            heartbeat_interval_ms: 30_000,
            ..Default::default()
        }))
        .await?;
        loop {
            match raw.next().await? {
                Frame::Welcome(_) => return Ok(raw),
                Frame::Error(e) if e.fatal => return Err(format!("login refused: {}", e.reason)),
                _ => {}
            }
        }
    }

    async fn send(&mut self, f: Frame) -> Result<(), String> {
        self.t.send(&f).map_err(|e| e.to_string())?;
        flush(&mut self.t).await.map_err(|e| e.to_string())
    }

    async fn next(&mut self) -> Result<Frame, String> {
        match tokio::time::timeout(Duration::from_secs(10), recv(&mut self.t)).await {
            Ok(Ok(Some(raw))) => frame::from_raw(&raw).map_err(|e| e.to_string()),
            Ok(Ok(None)) => Err("closed".into()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no frame within 10 s".into()),
        }
    }
}

/// Waits for the loopback counters to stop moving (delayed ACKs), then reads them.
async fn settled_counters() -> Result<(u64, u64), String> {
    tokio::time::sleep(Duration::from_millis(250)).await;
    lo_counters()
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub async fn run(
    heartbeats: u64,
    messages: u64,
    sessions: usize,
    durability: &str,
) -> Result<serde_json::Value, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let server = spawn_server(dir.path(), durability)?;
    let auth = tether_server::auth::Authenticator::open(&server.data).map_err(|e| e.to_string())?;
    let token =
        |user: &str| -> Result<String, String> { Ok(auth.mint(user, Duration::from_secs(3600))) };
    let connector =
        Arc::new(NetConnector::new(None, None).with_ca_file(Some(dir.path().join("cert.pem"))));
    let mut rows = Vec::new();
    let mut table = String::from(
        "| transport | wire B / heartbeat | packets / heartbeat | wire B / message | packets / message | p50 µs | p99 µs | server B / idle session |\n|---|---|---|---|---|---|---|---|\n",
    );
    for (run, (name, url)) in server.urls.iter().enumerate() {
        eprintln!("bench transports: {name} ({url})");
        let (alice_id, bob_id) = (format!("a{run}"), format!("b{run}"));
        let mut alice = Raw::login(&connector, url, token(&alice_id)?, "d", 1).await?;
        let mut bob = Raw::login(&connector, url, token(&bob_id)?, "d", 1).await?;
        // Heartbeats: sequential PING → PONG.
        let (b0, p0) = settled_counters().await?;
        for _ in 0..heartbeats {
            alice.send(Frame::Ping(pb::Ping::default())).await?;
            while !matches!(alice.next().await?, Frame::Pong(_)) {}
        }
        let (b1, p1) = settled_counters().await?;
        // Messages: one in flight; SEND → SEND_ACK at alice, DELIVER → ACK at bob, and
        // the delivered receipt back to alice, acknowledged.
        let body = Bytes::from_static(b"hello, 16 bytes!");
        let mut latencies = Vec::with_capacity(messages as usize);
        for n in 0..messages {
            let mut id = [0u8; 16];
            id[..8].copy_from_slice(&n.to_be_bytes());
            id[8] = run as u8 + 1;
            let sent = Instant::now();
            alice
                .send(Frame::Send(pb::Send {
                    client_msg_id: Bytes::copy_from_slice(&id),
                    target: Some(pb::send::Target::User(bob_id.clone())),
                    body: body.clone(),
                    ..Default::default()
                }))
                .await?;
            let seq = loop {
                if let Frame::Deliver(d) = bob.next().await? {
                    break d.entry.map_or(0, |e| e.seq);
                }
            };
            latencies.push(sent.elapsed().as_secs_f64() * 1e6);
            bob.send(Frame::Ack(pb::Ack { seq })).await?;
            // SEND_ACK and the receipt, in either order.
            let (mut acked, mut receipt) = (false, None);
            while !(acked && receipt.is_some()) {
                match alice.next().await? {
                    Frame::SendAck(_) => acked = true,
                    Frame::Deliver(d) => receipt = d.entry.map(|e| e.seq),
                    _ => {}
                }
            }
            alice
                .send(Frame::Ack(pb::Ack {
                    seq: receipt.unwrap_or(0),
                }))
                .await?;
        }
        let (b2, p2) = settled_counters().await?;
        drop((alice, bob));
        latencies.sort_by(f64::total_cmp);
        // Memory: S idle sessions. A first round creates the users and devices in the
        // store, 100 sessions at a time, each closed at once; then the same devices log
        // in again and stay, and only what the sessions hold is charged.
        let mut before = 0;
        let mut after = 0;
        for round in 1..=2u64 {
            let mut held = Vec::with_capacity(sessions);
            tokio::time::sleep(Duration::from_millis(500)).await;
            before = crate::bench::rss_of(&server.pid)?;
            for chunk in (0..sessions).collect::<Vec<_>>().chunks(100) {
                let logins = chunk.iter().map(|i| {
                    let (connector, url) = (connector.clone(), url.clone());
                    let t = token(&format!("s{run}-{i}"));
                    async move { Raw::login(&connector, &url, t?, "d", round).await }
                });
                for r in futures_util::future::join_all(logins).await {
                    held.push(r?);
                }
                if round == 1 {
                    // Only creating users and devices: close each chunk at once.
                    held.clear();
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
            after = crate::bench::rss_of(&server.pid)?;
            drop(held);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let per_session = after.saturating_sub(before) as f64 / sessions as f64;
        let hb = (b1 - b0) as f64 / heartbeats as f64;
        let hb_packets = (p1 - p0) as f64 / heartbeats as f64;
        let msg = (b2 - b1) as f64 / messages as f64;
        let msg_packets = (p2 - p1) as f64 / messages as f64;
        let (p50, p99) = (pct(&latencies, 0.5), pct(&latencies, 0.99));
        table.push_str(&format!(
            "| {name} | {hb:.0} | {hb_packets:.2} | {msg:.0} | {msg_packets:.2} | {p50:.0} | {p99:.0} | {per_session:.0} |\n"
        ));
        rows.push(serde_json::json!({
            "transport": name,
            "wire_bytes_per_heartbeat": hb.round(),
            "packets_per_heartbeat": hb_packets,
            "wire_bytes_per_message": msg.round(),
            "packets_per_message": msg_packets,
            "latency_p50_us": p50.round(),
            "latency_p99_us": p99.round(),
            "server_bytes_per_idle_session": per_session.round(),
        }));
    }
    println!("{table}");
    Ok(serde_json::json!({
        "bench": "transports",
        "durability": durability,
        "heartbeats": heartbeats,
        "messages": messages,
        "idle_sessions": sessions,
        "method": "loopback interface counters over sequential round trips (IP/TCP/UDP headers and pure ACKs included); latency SEND written → DELIVER read, one in flight; memory = RSS delta of the server process over idle logged-in sessions",
        "results": rows,
    }))
}
