//! Shared by the end-to-end tests: a real `tether serve` process on loopback, the CLI,
//! and a small blocking raw-protocol client.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_proto::{Frame, PREAMBLE, frame, pb};

/// The `tether` binary under test.
pub fn tether() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tether"))
}

/// A running `tether serve`.
pub struct ServerProc {
    child: Child,
    /// Client address.
    pub addr: SocketAddr,
    /// HTTP address.
    pub http: SocketAddr,
    /// TLS over TCP address, if started with `--tls-listen`.
    pub tls: Option<SocketAddr>,
    /// QUIC (UDP) address, if started with `--quic-listen`.
    pub quic: Option<SocketAddr>,
    /// HTTPS address, if started with `--https-listen`.
    pub https: Option<SocketAddr>,
    /// Data directory.
    pub data: PathBuf,
    log: Arc<Mutex<String>>,
    wrapped: bool,
}

impl ServerProc {
    /// Starts `tether serve` on free ports with `data` and extra arguments.
    pub fn start(data: &Path, extra: &[&str]) -> Self {
        Self::start_wrapped(&[], data, extra)
    }

    /// Same, run under a wrapper command (e.g. strace).
    pub fn start_wrapped(wrapper: &[&str], data: &Path, extra: &[&str]) -> Self {
        let mut cmd = if let Some((first, rest)) = wrapper.split_first() {
            let mut c = Command::new(first);
            c.args(rest).arg(env!("CARGO_BIN_EXE_tether"));
            c
        } else {
            tether()
        };
        cmd.arg("serve").arg("--data").arg(data);
        if !extra.contains(&"--listen") {
            cmd.args(["--listen", "127.0.0.1:0"]);
        }
        cmd.args(["--http", "127.0.0.1:0"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn tether serve");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("tether server listening")
                    && let Some(tx) = tx.take()
                {
                    let _ = tx.send(line.clone());
                }
                sink.lock().unwrap().push_str(&line);
                sink.lock().unwrap().push('\n');
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("server did not start; log:\n{}", log.lock().unwrap()));
        let field = |name: &str| -> SocketAddr {
            let start = line.find(name).expect(name) + name.len();
            let rest = &line[start..];
            let end = rest.find([' ', ')']).unwrap_or(rest.len());
            rest[..end].parse().expect("address")
        };
        let optional = |name: &str| line.contains(name).then(|| field(name));
        Self {
            child,
            addr: field("addr="),
            http: field("http=Some("),
            tls: optional("tls=Some("),
            quic: optional("quic=Some("),
            https: optional("https=Some("),
            data: data.to_path_buf(),
            log,
            wrapped: !wrapper.is_empty(),
        }
    }

    /// The server's process id (not the wrapper's).
    pub fn pid(&self) -> u32 {
        if !self.wrapped {
            return self.child.id();
        }
        let out = Command::new("pgrep")
            .args(["-P", &self.child.id().to_string()])
            .output()
            .expect("pgrep");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .and_then(|l| l.trim().parse().ok())
            .expect("the wrapped server's pid")
    }

    /// SIGKILL, no goodbye.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        signal(self.pid(), "TERM");
        self.child.wait().expect("wait")
    }

    /// What the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether the server logs `needle` within `within`. Its log reaches us through a
    /// pipe and a reader thread, so a line can trail what the server did (a metric, a
    /// reply) by a moment. Polls; fine in async tests too (short sleeps).
    pub fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let until = std::time::Instant::now() + within;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// A token for `user` from this server's data dir.
    pub fn token(&self, user: &str) -> String {
        let out = tether()
            .args(["token", user, "--data"])
            .arg(&self.data)
            .output()
            .expect("tether token");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    }
}

impl Drop for ServerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `sig` (STOP, CONT, TERM, ...) to a process; panics if `kill` fails.
pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("kill")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// A loopback address with a port free right now (for a server that must restart on
/// the same address).
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
}

/// Runs the CLI to completion with a timeout.
pub fn run_cli(args: &[&str], timeout: Duration) -> Output {
    let child = tether()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tether");
    wait_output(child, timeout)
}

/// Waits for a child with a deadline, killing it past the deadline. Its output is
/// drained while it runs, so a chatty child never blocks on a full pipe.
pub fn wait_output(mut child: Child, timeout: Duration) -> Output {
    fn drain<R: Read + Send + 'static>(r: Option<R>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            if let Some(mut r) = r {
                let _ = r.read_to_end(&mut buf);
            }
            buf
        })
    }
    let stdout = drain(child.stdout.take());
    let stderr = drain(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break (status, false);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break (child.wait().expect("wait"), true);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        status,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    if timed_out {
        let text = String::from_utf8_lossy(&out.stdout);
        let tail: Vec<&str> = text.lines().rev().take(5).collect();
        panic!(
            "timed out after {timeout:?}; {} stdout lines, last: {:?}\nstderr:\n{}",
            text.lines().count(),
            tail,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// Parses stdout JSON lines.
pub fn json_lines(out: &Output) -> Vec<serde_json::Value> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}")))
        .collect()
}

/// A blocking raw-protocol client.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    /// Connects, logs in, returns the client and WELCOME.
    pub fn login(addr: SocketAddr, token: &str, device: &str, epoch: u64) -> (Self, pb::Welcome) {
        Self::login_with(addr, token, device, epoch, 0)
    }

    /// Same, asking for a heartbeat interval (0 = the server's default).
    pub fn login_with(
        addr: SocketAddr,
        token: &str,
        device: &str,
        epoch: u64,
        heartbeat_interval_ms: u32,
    ) -> (Self, pb::Welcome) {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut c = Self {
            stream,
            buf: Vec::new(),
        };
        c.stream.write_all(&PREAMBLE).unwrap();
        c.send(&Frame::Hello(pb::Hello {
            version: 1,
            token: token.into(),
            device_id: device.into(),
            device_epoch: epoch,
            heartbeat_interval_ms,
            ..Default::default()
        }));
        loop {
            match c.read() {
                Frame::Welcome(w) => return (c, w),
                Frame::Error(e) if e.fatal => panic!("login refused: {e:?}"),
                _ => {}
            }
        }
    }

    /// Writes raw bytes.
    pub fn write_raw(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Writes one frame.
    pub fn send(&mut self, f: &Frame) {
        let mut out = Vec::new();
        frame::encode_to(f, &mut out);
        self.stream.write_all(&out).unwrap();
    }

    /// Reads one frame (panics on EOF or after the read timeout).
    pub fn read(&mut self) -> Frame {
        loop {
            if let Some((raw, used)) = tether_proto::decode_frame(&self.buf, 1 << 20).unwrap() {
                self.buf.drain(..used);
                return frame::from_raw(&raw).unwrap();
            }
            let mut chunk = [0u8; 65536];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "server closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads frames until the server closes the connection (10 s at most).
    pub fn read_until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        let mut chunk = [0u8; 65536];
        loop {
            while let Some((raw, used)) = tether_proto::decode_frame(&self.buf, 1 << 20).unwrap() {
                self.buf.drain(..used);
                frames.push(frame::from_raw(&raw).unwrap());
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return frames,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) => panic!("not closed: {e}"),
            }
        }
    }

    /// Sends one message and waits for its SEND_ACK (skipping other frames).
    pub fn send_text(&mut self, to: &str, id: [u8; 16], text: &str) -> pb::SendAck {
        self.send(&send_frame(to, id, text));
        loop {
            match self.read() {
                Frame::SendAck(a) if a.client_msg_id[..] == id[..] => return a,
                Frame::Error(e) => panic!("send refused: {e:?}"),
                _ => {}
            }
        }
    }
}

/// A SEND frame.
pub fn send_frame(to: &str, id: [u8; 16], text: &str) -> Frame {
    Frame::Send(pb::Send {
        client_msg_id: bytes::Bytes::copy_from_slice(&id),
        target: Some(pb::send::Target::User(to.into())),
        body: bytes::Bytes::copy_from_slice(text.as_bytes()),
        content_type: "text/plain".into(),
    })
}

/// A distinct client message id from a number.
pub fn id(n: u64) -> [u8; 16] {
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&n.to_le_bytes());
    id[8..].copy_from_slice(&0x7e7e_7e7e_u64.to_le_bytes());
    id
}

impl RawClient {
    /// Pipelines `ids` (in order) to `to`, `window` at a time; returns the SEND_ACKs in
    /// the order they arrived.
    pub fn send_many(
        &mut self,
        to: &str,
        ids: &[[u8; 16]],
        text: impl Fn(usize) -> String,
        window: usize,
    ) -> Vec<pb::SendAck> {
        let mut acks = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(window.max(1)).enumerate() {
            let (c, chunk) = chunk;
            let mut out = Vec::new();
            for (i, id) in chunk.iter().enumerate() {
                frame::encode_to(&send_frame(to, *id, &text(c * window + i)), &mut out);
            }
            self.stream.write_all(&out).unwrap();
            let want = acks.len() + chunk.len();
            while acks.len() < want {
                match self.read() {
                    Frame::SendAck(a) => acks.push(a),
                    Frame::Error(e) => panic!("send refused: {e:?}"),
                    _ => {}
                }
            }
        }
        acks
    }
}

/// CLI arguments that log `user` in against `server` with state under `state_dir`.
pub fn cli_auth(server: &ServerProc, user: &str, device: &str, state_dir: &Path) -> Vec<String> {
    vec![
        "--server".into(),
        server.addr.to_string(),
        "--user".into(),
        user.into(),
        "--data".into(),
        server.data.to_string_lossy().into_owned(),
        "--device".into(),
        device.into(),
        "--state-dir".into(),
        state_dir.to_string_lossy().into_owned(),
    ]
}

/// `tether send` as `user`; returns the parsed JSON line (panics unless exit 0).
pub fn cli_send(
    server: &ServerProc,
    user: &str,
    device: &str,
    state_dir: &Path,
    to: &str,
    text: &str,
) -> serde_json::Value {
    let mut args: Vec<String> = vec!["send".into(), "--to".into(), to.into()];
    args.extend(cli_auth(server, user, device, state_dir));
    args.push(text.into());
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run_cli(&argv, Duration::from_secs(30));
    assert!(
        out.status.success(),
        "tether send failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines = json_lines(&out);
    assert_eq!(lines.len(), 1, "one JSON line: {lines:?}");
    lines[0].clone()
}

/// `tether recv --count n` as `user`; returns the output.
pub fn cli_recv(
    server: &ServerProc,
    user: &str,
    device: &str,
    state_dir: &Path,
    count: usize,
    timeout_secs: u64,
) -> Output {
    let mut args: Vec<String> = vec![
        "recv".into(),
        "--count".into(),
        count.to_string(),
        "--timeout".into(),
        timeout_secs.to_string(),
    ];
    args.extend(cli_auth(server, user, device, state_dir));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    run_cli(&argv, Duration::from_secs(timeout_secs + 30))
}
