//! `tether bench floor`: the least CPU any server on this machine spends answering an
//! idle connection's keepalive, measured the way DESIGN §8 measures Tether (server
//! utime+stime over a window ÷ pings answered, clients in another process on
//! loopback).
//!
//! The server here does nothing but the system calls: one thread, one epoll set (mio),
//! and per ping one `recv` of 2 bytes and one `send` of 2 bytes back, with no protocol,
//! no session, no timer and no allocation. Whatever it costs per ping is what the
//! kernel charges for loopback TCP on this VM: the `send` also runs the client
//! socket's receive path and wakes the client, and that is billed to the server.
//! A real server's figure is this floor plus its own work.

use crate::bench::{BenchResult, cpu_of};
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use serde_json::json;
use std::io::{self, BufRead, Read, Write};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LISTENER: Token = Token(usize::MAX);
/// How often the client sends a batch: pings are spread evenly over the interval.
const TICK: Duration = Duration::from_millis(5);

/// The echo server: prints its port, then answers until killed.
pub fn serve() -> BenchResult {
    crate::load::raise_fd_limit();
    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut listener = listen().map_err(|e| e.to_string())?;
    poll.registry()
        .register(&mut listener, LISTENER, Interest::READABLE)
        .map_err(|e| e.to_string())?;
    println!(
        "{}",
        listener.local_addr().map_err(|e| e.to_string())?.port()
    );
    io::stdout().flush().map_err(|e| e.to_string())?;
    let mut conns: Vec<Option<TcpStream>> = Vec::new();
    let mut events = Events::with_capacity(1024);
    let mut buf = [0u8; 64];
    let linger = std::env::var("TETHER_FLOOR_LINGER_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map(Duration::from_millis);
    loop {
        if let Some(linger) = linger {
            std::thread::sleep(linger);
        }
        poll.poll(&mut events, None).map_err(|e| e.to_string())?;
        for event in &events {
            if event.token() == LISTENER {
                while let Ok((mut s, _)) = listener.accept() {
                    let token = Token(conns.len());
                    if poll
                        .registry()
                        .register(&mut s, token, Interest::READABLE)
                        .is_ok()
                    {
                        conns.push(Some(s));
                    }
                }
                continue;
            }
            let Some(slot) = conns.get_mut(event.token().0) else {
                continue;
            };
            let Some(s) = slot.as_mut() else { continue };
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        *slot = None;
                        break;
                    }
                    Ok(n) => {
                        // 2 bytes into an empty socket buffer: never partial.
                        let _ = s.write(&buf[..n]);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        *slot = None;
                        break;
                    }
                }
            }
        }
    }
}

/// Starts the echo server in a child process, holds `connections` to it, each pinging
/// every `interval` (spread evenly), and reports the server's CPU per ping.
pub fn run(connections: usize, interval: Duration, window: Duration) -> BenchResult {
    crate::load::raise_fd_limit();
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = Command::new(exe)
        .args(["bench", "floor-server"])
        .stdout(Stdio::piped())
        .stdin(Stdio::null())
        .spawn()
        .map_err(|e| format!("starting the echo server: {e}"))?;
    let result = drive(&mut child, connections, interval, window);
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// The echo server's listener on 127.0.0.1, with a backlog like Tether's (mio's `bind`
/// uses 128: a batch of 500 connects overflowed it and waited 1 s for SYN retransmits).
fn listen() -> io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    socket.listen(4096)?;
    Ok(TcpListener::from_std(socket.into()))
}

/// Source addresses 127.0.0.2 … 127.0.0.9 in turn: a run's ports in TIME_WAIT do not
/// block the next run's.
const SOURCES: u8 = 8;

/// A non-blocking connect from source address 127.0.0.(2 + i % 8).
fn connect_from(i: usize, server: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    let source: SocketAddr = ([127, 0, 0, 2 + (i % usize::from(SOURCES)) as u8], 0).into();
    tether_client::connector::bind_port_at_connect(&socket);
    socket.bind(&source.into())?;
    match socket.connect(&server.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

fn drive(
    child: &mut std::process::Child,
    connections: usize,
    interval: Duration,
    window: Duration,
) -> BenchResult {
    let mut line = String::new();
    io::BufReader::new(child.stdout.take().ok_or("no stdout")?)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let port: u16 = line
        .trim()
        .parse()
        .map_err(|e| format!("port {line:?}: {e}"))?;
    let server: SocketAddr = ([127, 0, 0, 1], port).into();
    let pid = child.id().to_string();

    let mut poll = Poll::new().map_err(|e| e.to_string())?;
    let mut events = Events::with_capacity(1024);
    let mut conns = Vec::with_capacity(connections);
    let started = Instant::now();
    // Non-blocking connects, a batch at a time, each done when it is writable.
    for batch in (0..connections).collect::<Vec<_>>().chunks(500) {
        for &i in batch {
            let mut s = connect_from(i, server).map_err(|e| format!("connect {i}: {e}"))?;
            poll.registry()
                .register(&mut s, Token(i), Interest::WRITABLE)
                .map_err(|e| e.to_string())?;
            conns.push(s);
        }
        let mut pending = batch.len();
        while pending > 0 {
            poll.poll(&mut events, Some(Duration::from_secs(10)))
                .map_err(|e| e.to_string())?;
            if events.is_empty() {
                return Err(format!("{pending} connects still pending after 10 s"));
            }
            for event in &events {
                let s = &mut conns[event.token().0];
                if let Some(e) = s.take_error().map_err(|e| e.to_string())? {
                    return Err(format!("connect: {e}"));
                }
                s.set_nodelay(true).map_err(|e| e.to_string())?;
                poll.registry()
                    .reregister(s, event.token(), Interest::READABLE)
                    .map_err(|e| e.to_string())?;
                pending -= 1;
            }
        }
    }
    let connect_s = started.elapsed().as_secs_f64();
    // Accepts and registrations settle before the window.
    std::thread::sleep(Duration::from_secs(1));

    let per_tick = (connections as f64 * TICK.as_secs_f64() / interval.as_secs_f64()).max(1.0);
    let mut buf = [0u8; 64];
    let (mut sent, mut echoed, mut owed) = (0u64, 0u64, 0.0f64);
    let mut next = 0usize;
    let cpu0 = cpu_of(&pid)?;
    let client0 = cpu_of("self")?;
    let start = Instant::now();
    let mut tick = start;
    while start.elapsed() < window {
        let now = Instant::now();
        if now >= tick {
            owed += per_tick;
            while owed >= 1.0 {
                owed -= 1.0;
                if conns[next].write(b"\x01\x00").is_ok() {
                    sent += 1;
                }
                next = (next + 1) % connections;
            }
            tick += TICK;
        }
        let wait = tick.saturating_duration_since(Instant::now());
        poll.poll(&mut events, Some(wait))
            .map_err(|e| e.to_string())?;
        for event in &events {
            let s = &mut conns[event.token().0];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    return Err("the echo server closed a connection".into());
                }
                echoed += n as u64 / 2;
            }
        }
    }
    let elapsed = start.elapsed();
    let server_cpu = cpu_of(&pid)? - cpu0;
    let client_cpu = cpu_of("self")? - client0;
    // The server closes first, so the TIME_WAIT states are its, not this side's ports.
    let _ = child.kill();
    let _ = child.wait();
    if echoed == 0 {
        return Err("no ping was answered".into());
    }
    Ok(json!({
        "bench": "floor",
        "machine": crate::load::machine(),
        "method": "a single-threaded mio echo server in a child process: per ping one 2-byte recv and one 2-byte send; server CPU = utime+stime of that process over the window ÷ pings answered; clients in this process, spread evenly over the interval",
        "connections": connections,
        "interval_s": interval.as_secs_f64(),
        "connect_s": (connect_s * 100.0).round() / 100.0,
        "window_s": (elapsed.as_secs_f64() * 10.0).round() / 10.0,
        "pings_sent": sent,
        "pings_answered": echoed,
        "server_cpu_s": (server_cpu.as_secs_f64() * 1000.0).round() / 1000.0,
        "server_cpu_us_per_ping": ((server_cpu.as_secs_f64() * 1e6 / echoed as f64) * 100.0).round() / 100.0,
        "client_cpu_us_per_ping": ((client_cpu.as_secs_f64() * 1e6 / echoed as f64) * 100.0).round() / 100.0,
    }))
}
