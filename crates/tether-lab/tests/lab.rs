//! The lab against the real kernel: each test builds its own namespaces (so they run in
//! parallel) and fails, never skips, without root or the tools. Waits are real I/O with
//! deadlines; the only sleeps are the idle periods the NAT must see.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use tether_lab::chart::{self, HLine, Series};
use tether_lab::{Lab, LabError, LabSpec, PID_DIR};

const IO_WAIT: Duration = Duration::from_secs(3);

fn lab_with_timeout(nat_timeout: Duration) -> Lab {
    Lab::create(LabSpec::with_nat_timeout(nat_timeout)).unwrap_or_else(|e| {
        panic!("cannot build the network lab (needs root; apt-get install -y iproute2 nftables conntrack iputils-ping): {e}")
    })
}

fn lab() -> Lab {
    lab_with_timeout(Duration::from_secs(30))
}

/// Runs `f` on a thread inside namespace `ns` and returns its result.
fn in_ns<R: Send + 'static>(lab: &Lab, ns: &str, f: impl FnOnce() -> R + Send + 'static) -> R {
    lab.spawn_thread_in(ns, "in-ns", f)
        .join()
        .expect("thread in namespace panicked")
}

fn listen(lab: &Lab, port: u16) -> TcpListener {
    in_ns(lab, lab.server_ns(), move || {
        TcpListener::bind((Lab::server_ip(), port))
    })
    .expect("server bind")
}

/// A connection from the client namespace to the server's `port`.
fn connect(lab: &Lab, port: u16, timeout: Duration) -> io::Result<TcpStream> {
    in_ns(lab, lab.client_ns(), move || {
        TcpStream::connect_timeout(&SocketAddr::from((Lab::server_ip(), port)), timeout)
    })
}

/// The next connection on `listener`, within [`IO_WAIT`].
fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    listener.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + IO_WAIT;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false).unwrap();
                return (stream, peer);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => panic!("no connection reached the server: {e}"),
        }
    }
}

/// Reads exactly `n` bytes, or fails after `timeout` without them.
fn read_n(stream: &mut TcpStream, n: usize, timeout: Duration) -> io::Result<Vec<u8>> {
    stream.set_read_timeout(Some(timeout))?;
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf)?;
    Ok(buf)
}

/// The client sends `msg`, the server reads and echoes it, the client reads it back.
fn round_trip(client: &mut TcpStream, server: &mut TcpStream, msg: &[u8]) {
    client.write_all(msg).unwrap();
    let got = read_n(server, msg.len(), IO_WAIT).expect("server did not receive");
    server.write_all(&got).unwrap();
    let echo = read_n(client, msg.len(), IO_WAIT).expect("client got no echo");
    assert_eq!(echo, msg);
}

/// Nothing is waiting to be read on `stream` (the peer's data never arrived).
fn assert_nothing_arrived(stream: &TcpStream, side: &str) {
    stream.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    match (&*stream).read(&mut buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        other => panic!("{side} should have received nothing, got {other:?}"),
    }
    stream.set_nonblocking(false).unwrap();
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Segments sent but not acknowledged, from TCP_INFO.
fn tcpi_unacked(stream: &TcpStream) -> u32 {
    // SAFETY: tcp_info is plain integers; all-zero is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes passed.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "TCP_INFO: {}", io::Error::last_os_error());
    info.tcpi_unacked
}

fn namespaces_listed() -> String {
    let out = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lab_namespaces(lab: &Lab) -> Vec<String> {
    let mut names = vec![lab.client_ns().to_owned(), lab.server_ns().to_owned()];
    names.extend((0..2).map(|i| lab.router_ns(i).to_owned()));
    names
}

fn listed(listing: &str, ns: &str) -> bool {
    listing
        .lines()
        .any(|line| line.split_whitespace().next() == Some(ns))
}

#[test]
fn nat_forgets_an_idle_mapping_but_keeps_one_refreshed_by_small_messages() {
    const IDLE_PORT: u16 = 7001;
    const ALIVE_PORT: u16 = 7002;
    let lab = lab_with_timeout(Duration::from_secs(10));
    let idle_listener = listen(&lab, IDLE_PORT);
    let alive_listener = listen(&lab, ALIVE_PORT);
    let mut idle_client = connect(&lab, IDLE_PORT, IO_WAIT).expect("connect idle");
    let (mut idle_server, _) = accept(&idle_listener);
    let mut alive_client = connect(&lab, ALIVE_PORT, IO_WAIT).expect("connect alive");
    let (mut alive_server, _) = accept(&alive_listener);
    let start = Instant::now();
    round_trip(&mut idle_client, &mut idle_server, b"hello");
    assert_eq!(lab.conntrack_entries(0, IDLE_PORT).unwrap(), 1);
    assert_eq!(lab.conntrack_entries(0, ALIVE_PORT).unwrap(), 1);

    // 3 bytes every 4 s, echoed, for 24 s: each refreshes the 10 s mapping.
    let keepalive = thread::spawn(move || {
        for beat in 1..=6u8 {
            thread::sleep(Duration::from_secs(4));
            round_trip(&mut alive_client, &mut alive_server, &[beat; 3]);
        }
    });

    thread::sleep(Duration::from_secs(12).saturating_sub(start.elapsed()));
    assert_eq!(
        lab.conntrack_entries(0, IDLE_PORT).unwrap(),
        0,
        "idle mapping should have expired"
    );
    idle_client.write_all(b"late").unwrap();
    let reply = read_n(&mut idle_client, 1, Duration::from_secs(3));
    assert!(
        matches!(&reply, Err(e) if is_timeout(e)),
        "expected no reply, got {reply:?}"
    );
    assert!(
        tcpi_unacked(&idle_client) > 0,
        "the late write should be unacknowledged"
    );
    assert_nothing_arrived(&idle_server, "the server");
    assert_eq!(
        lab.conntrack_entries(0, IDLE_PORT).unwrap(),
        0,
        "a mid-stream packet must not re-create the mapping"
    );
    assert_eq!(lab.conntrack_entries(0, ALIVE_PORT).unwrap(), 1);

    keepalive.join().expect("the refreshed connection died");
    assert!(start.elapsed() >= Duration::from_secs(24));
    assert_eq!(lab.conntrack_entries(0, ALIVE_PORT).unwrap(), 1);
}

/// Sends `count` numbered datagrams from `from` and counts how many `to` receives.
fn datagrams_delivered(
    from: &UdpSocket,
    to: &UdpSocket,
    peer: SocketAddr,
    count: u16,
) -> (u16, Option<SocketAddr>) {
    for i in 0..count {
        from.send_to(&i.to_be_bytes(), peer).unwrap();
        thread::sleep(Duration::from_micros(500));
    }
    to.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 16];
    let (mut received, mut last_sender) = (0, None);
    while let Ok((_, sender)) = to.recv_from(&mut buf) {
        received += 1;
        last_sender = Some(sender);
    }
    (received, last_sender)
}

fn loss_percent(sent: u16, received: u16) -> f64 {
    100.0 * f64::from(sent - received) / f64::from(sent)
}

#[test]
fn blackhole_stops_connections_and_loss_drops_packets_in_both_directions() {
    const PORT: u16 = 7100;
    let lab = lab();
    let listener = listen(&lab, PORT);

    lab.blackhole(0, true).unwrap();
    let refused = connect(&lab, PORT, Duration::from_secs(2));
    assert!(
        matches!(&refused, Err(e) if is_timeout(e)),
        "expected a timeout, got {refused:?}"
    );
    lab.blackhole(0, false).unwrap();
    let mut client = connect(&lab, PORT, IO_WAIT).expect("connect after the blackhole");
    let (mut server, _) = accept(&listener);
    round_trip(&mut client, &mut server, b"back");

    lab.set_loss(0, 20).unwrap();
    // One way each, 200 datagrams: the brief's 5..40 % band around 20 % is > 5 sigma wide.
    let server_udp = in_ns(&lab, lab.server_ns(), || {
        UdpSocket::bind((Lab::server_ip(), PORT + 1))
    })
    .unwrap();
    let client_udp = in_ns(&lab, lab.client_ns(), || UdpSocket::bind(("0.0.0.0", 0))).unwrap();
    let service = SocketAddr::from((Lab::server_ip(), PORT + 1));
    let (up, nat_peer) = datagrams_delivered(&client_udp, &server_udp, service, 200);
    let nat_peer = nat_peer.expect("no datagram reached the server");
    assert_eq!(nat_peer.ip(), Lab::router_nat_ip(0));
    let (down, _) = datagrams_delivered(&server_udp, &client_udp, nat_peer, 200);
    for (direction, received) in [("client to server", up), ("server to client", down)] {
        let loss = loss_percent(200, received);
        eprintln!("{direction}: {loss} % lost");
        assert!(
            (5.0..=40.0).contains(&loss),
            "{direction}: {loss} % lost at 20 % loss"
        );
    }

    // Round trips lose on either leg: 1 - 0.8² = 36 % expected; the band is ±5 sigma.
    let ping = lab
        .command_in(lab.client_ns(), "ping")
        .args([
            "-q",
            "-c",
            "200",
            "-i",
            "0.01",
            "-W",
            "1",
            &Lab::server_ip().to_string(),
        ])
        .output()
        .expect("cannot run ping (apt-get install -y iputils-ping)");
    let summary = String::from_utf8_lossy(&ping.stdout);
    let line = summary
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| {
            panic!(
                "no ping summary: {summary} {}",
                String::from_utf8_lossy(&ping.stderr)
            )
        });
    let numbers: Vec<u16> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .take(2)
        .collect();
    let loss = loss_percent(numbers[0], numbers[1]);
    eprintln!("ping: {loss} % lost");
    assert!(
        (19.0..=53.0).contains(&loss),
        "ping: {loss} % lost ({line})"
    );

    lab.set_loss(0, 0).unwrap();
    round_trip(&mut client, &mut server, b"clean");
}

#[test]
fn switching_routers_keeps_new_connections_and_kills_old_flows() {
    const PORT: u16 = 7200;
    let lab = lab();
    let listener = listen(&lab, PORT);
    let mut old_client = connect(&lab, PORT, IO_WAIT).expect("connect via router 0");
    let (mut old_server, old_peer) = accept(&listener);
    assert_eq!(old_peer.ip(), Lab::router_nat_ip(0));
    round_trip(&mut old_client, &mut old_server, b"wifi");

    lab.use_router(1).unwrap();
    assert_eq!(lab.active_router(), 1);
    let mut new_client = connect(&lab, PORT, IO_WAIT).expect("connect via router 1");
    let (mut new_server, new_peer) = accept(&listener);
    assert_eq!(
        new_peer.ip(),
        "10.201.2.1".parse::<std::net::IpAddr>().unwrap()
    );
    round_trip(&mut new_client, &mut new_server, b"cellular");

    old_client.write_all(b"still there?").unwrap();
    let reply = read_n(&mut old_client, 1, Duration::from_secs(2));
    assert!(
        matches!(&reply, Err(e) if is_timeout(e)),
        "old flow answered: {reply:?}"
    );
    assert_nothing_arrived(&old_server, "the server (old flow)");
}

#[test]
fn labs_run_side_by_side_and_leave_no_namespaces_behind() {
    const PORT: u16 = 7300;
    let labs = [lab(), lab()];
    assert_ne!(labs[0].tag(), labs[1].tag());
    // Each server answers with its own tag on the same address and port: the first lab
    // is asked once, the second once before and once after the first is torn down.
    let servers: Vec<_> = labs
        .iter()
        .zip([1, 2])
        .map(|(lab, connections)| {
            let listener = listen(lab, PORT);
            let tag = lab.tag().to_owned();
            thread::spawn(move || {
                for _ in 0..connections {
                    let (mut stream, _) = accept(&listener);
                    stream.write_all(tag.as_bytes()).unwrap();
                }
            })
        })
        .collect();
    let ask = |lab: &Lab| {
        let mut stream = connect(lab, PORT, IO_WAIT).expect("connect");
        read_n(&mut stream, lab.tag().len(), IO_WAIT).expect("read tag")
    };
    for lab in &labs {
        assert_eq!(ask(lab), lab.tag().as_bytes());
    }

    let [mut first, second] = labs;
    let first_names = lab_namespaces(&first);
    let first_pid_file = Path::new(PID_DIR).join(format!("{}.pid", first.tag()));
    assert!(first_pid_file.exists());
    first.teardown();
    first.teardown();
    drop(first);
    let listing = namespaces_listed();
    for ns in &first_names {
        assert!(!listed(&listing, ns), "{ns} survived teardown:\n{listing}");
    }
    assert!(!first_pid_file.exists());

    assert_eq!(
        ask(&second),
        second.tag().as_bytes(),
        "the other lab was disturbed"
    );
    let second_names = lab_namespaces(&second);
    drop(second);
    let listing = namespaces_listed();
    for ns in &second_names {
        assert!(!listed(&listing, ns), "{ns} survived drop:\n{listing}");
    }
    for server in servers {
        server.join().unwrap();
    }
}

fn dead_pid() -> u32 {
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// Leaves namespace `ns` and a pid file naming a dead process, as a crashed run would.
fn fake_stale_lab(tag: &str, ns: &str) {
    std::fs::create_dir_all(PID_DIR).unwrap();
    std::fs::write(
        Path::new(PID_DIR).join(format!("{tag}.pid")),
        format!("{}\n", dead_pid()),
    )
    .unwrap();
    let status = Command::new("ip")
        .args(["netns", "add", ns])
        .status()
        .unwrap();
    assert!(status.success());
}

#[test]
fn stale_labs_are_cleaned_and_live_tags_are_refused() {
    let pid = std::process::id();
    let tag = format!("st{pid}");
    fake_stale_lab(&tag, &format!("{tag}-c"));
    let spec = LabSpec {
        tag: Some(tag.clone()),
        ..LabSpec::with_nat_timeout(Duration::from_secs(30))
    };
    let lab = Lab::create(spec.clone()).expect("a stale lab's tag can be reused");
    assert_eq!(lab.tag(), tag);
    match Lab::create(spec) {
        Err(LabError::TagInUse { pid: owner, .. }) => assert_eq!(owner, pid),
        other => panic!("a live tag must be refused, got {other:?}"),
    }
    drop(lab);

    let stale = format!("sx{pid}");
    let stale_ns = format!("{stale}-s");
    fake_stale_lab(&stale, &stale_ns);
    tether_lab::cleanup_stale(&stale);
    assert!(!listed(&namespaces_listed(), &stale_ns));
    assert!(!Path::new(PID_DIR).join(format!("{stale}.pid")).exists());
}

#[test]
fn settings_out_of_range_are_refused() {
    let lab = lab();
    assert!(matches!(
        lab.set_loss(0, 101),
        Err(LabError::InvalidLoss(101))
    ));
    assert!(matches!(lab.set_loss(2, 5), Err(LabError::NoSuchRouter(2))));
    assert!(matches!(
        lab.set_nat_timeout(1, Duration::from_millis(500)),
        Err(LabError::InvalidTimeout(_))
    ));
    lab.set_nat_timeout(1, Duration::from_secs(7)).unwrap();
    assert_eq!(lab.nat_timeout(1), Duration::from_secs(7));
    let out = lab
        .command_in(lab.router_ns(1), "sysctl")
        .args(["-n", "net.netfilter.nf_conntrack_tcp_timeout_established"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "7");
    let bad_tag = LabSpec {
        tag: Some("has-dash".into()),
        ..LabSpec::with_nat_timeout(Duration::from_secs(5))
    };
    assert!(matches!(
        Lab::create(bad_tag),
        Err(LabError::InvalidTag { .. })
    ));
}

#[test]
fn chart_is_a_well_formed_svg_naming_every_series() {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tether-lab-chart.svg");
    let series = [
        Series {
            label: "smart heartbeat".into(),
            points: vec![(0.0, 5.0), (30.0, 10.0), (60.0, 20.0), (90.0, 15.0)],
            marks: vec![(60.0, 20.0, "failed".into())],
        },
        Series {
            label: "fixed <30 s> & co".into(),
            points: vec![(0.0, 30.0), (120.0, 30.0)],
            marks: vec![],
        },
    ];
    let lines = [
        HLine {
            label: "NAT timeout 25 s".into(),
            y: 25.0,
            from_t: 0.0,
            to_t: 60.0,
        },
        HLine {
            label: "NAT timeout 12 s".into(),
            y: 12.0,
            from_t: 60.0,
            to_t: 120.0,
        },
    ];
    chart::write_svg(&path, "Heartbeat vs NAT", &series, &lines).unwrap();
    let svg = std::fs::read_to_string(&path).unwrap();
    let trimmed = svg.trim();
    assert!(
        trimmed.starts_with("<svg") || trimmed.starts_with("<?xml"),
        "{}",
        &svg[..80.min(svg.len())]
    );
    assert!(trimmed.ends_with("</svg>"));
    for text in [
        "smart heartbeat",
        "fixed &lt;30 s&gt; &amp; co",
        "NAT timeout 25 s",
        "NAT timeout 12 s",
        "failed",
        "Heartbeat vs NAT",
    ] {
        assert!(svg.contains(text), "missing {text:?}");
    }
    assert!(
        svg.contains("stroke-dasharray") || svg.matches("<polyline").count() > 10,
        "NAT lines should be dashed"
    );
    assert_eq!(svg.matches("<svg").count(), 1);
}
