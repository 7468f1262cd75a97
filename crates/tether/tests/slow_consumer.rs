//! A slow consumer stops only its own stream (issue 5, DESIGN §6 "streaming by
//! position"). One device of user `sink` stops reading its socket while 50,000
//! messages are sent to `sink` by pipelined SDK senders; meanwhile another pair of
//! users chats at 20 msg/s and `sink`'s second device reads along. Then:
//! (a) the server's RSS stays within a bound: nothing is queued for a device that does
//!     not read; (b) the pair's p99 latency stays bounded and nothing of theirs is
//!     lost; (c) the second device receives all 50,000 in real time, before the first
//!     resumes; (d) the stalled device, reading again, gets all 50,000 exactly once and
//!     in order. Also: before the resume, the server sent every stalled stream at most
//!     one credit window (its DELIVER counter, exactly).
//!
//! A real `tether serve` with the default `fsync` durability. `sink`'s devices speak the
//! raw protocol, so every DELIVER the server sends is seen, duplicates included.
//!
//! Why the RSS bound is +96 MiB: the store's page cache keeps what is written (redb,
//! 1 GiB cap), so the server grows by ~60 MiB for this flood whether or not `sink`'s
//! first device stalls (measured +58 to +60 MiB stalled, +58 reading along; debug
//! build, 2 vCPU; BENCHMARKS.md "slow consumer"). To make a per-device queue visible
//! above that, 14 more devices of `sink` log in and never read, and the senders never
//! read their own copies: 19 stalled streams, which a queueing server would hold
//! 850,000 DELIVERs for. Measured with the stream's limits removed (no credit window,
//! no send-buffer high-water mark): +143 to +145 MiB, the rest sat in kernel socket
//! buffers.

mod common;

use common::{RawClient, ServerProc};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tether_client::{Client, ClientConfig, ClientHandle, ClientMsgId, SendTicket};
use tether_proto::{Frame, pb};

const MESSAGES: usize = 50_000;
const SENDERS: usize = 4;
/// Sends each sender keeps un-acknowledged.
const PIPELINE: usize = 64;
/// More devices of `sink` that log in and never read at all (see the RSS bound);
/// with `stalled` and `live` that is the server's default cap of 16 devices per user.
const IDLE_DEVICES: usize = 14;
/// Body bytes of the flood's messages.
const BODY: usize = 128;
/// The pair: one message every 100 ms each way, 20 msg/s in all.
const PAIR_EVERY: Duration = Duration::from_millis(100);
/// The server's credit window (its default).
const CREDIT: u64 = 256;

/// Allowed RSS growth over the level before the flood (see the module doc).
const RSS_GROWTH_BOUND_MIB: u64 = 96;
/// The pair's p99 while the flood runs and `sink` stalls. Measured 53-64 ms (debug
/// build, 2 vCPU), 101 ms with two busy loops beside it: the flood's own 256 pipelined
/// sends wait in the commit path ahead of each pair message. A stream that blocked
/// on the stalled device would take seconds, or forever.
const PAIR_P99_BOUND: Duration = Duration::from_millis(500);
/// The second device's p99 lag (server receipt of the SEND → DELIVER read), and how
/// long after the last SEND_ACK it may still be reading; measured 58-111 ms and ~0.
/// Held behind the stalled device it would wait for the resume.
const LIVE_P99_BOUND: Duration = Duration::from_millis(2000);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A counter from the server's /metrics.
fn metric(server: &ServerProc, name: &str) -> u64 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(server.http).expect("metrics endpoint");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics")) as u64
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Bytes of every file under `dir` (the store's data file grows with what it holds).
fn dir_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let Ok(meta) = entry.metadata() else { continue };
        total += if meta.is_dir() {
            dir_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

/// Samples the server's RSS every 10 ms until stopped.
struct RssSampler {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start(pid: u32) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (samples.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !st.load(Ordering::Relaxed) {
                s.lock().unwrap().push((Instant::now(), rss_kib(pid)));
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        Self {
            samples,
            stop,
            thread: Some(thread),
        }
    }

    /// Highest RSS sampled in `[from, to)`, KiB.
    fn peak(&self, from: Instant, to: Instant) -> u64 {
        let samples = self.samples.lock().unwrap();
        samples
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, kib)| *kib)
            .max()
            .unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn ack(c: &mut RawClient, seq: u64) {
    c.send(&Frame::Ack(pb::Ack { seq }));
}

/// What one raw device read: entries in arrival order, with their lag.
struct Received {
    entries: Vec<pb::Entry>,
    /// Server receipt of the SEND (entry ts) → DELIVER read here, per entry.
    lags: Vec<Duration>,
    done_at: Instant,
}

/// Reads `n` DELIVERs, ACKing every 64 (and the last); panics on an ERROR.
fn read_entries(c: &mut RawClient, n: usize) -> Received {
    let mut entries = Vec::with_capacity(n);
    let mut lags = Vec::with_capacity(n);
    while entries.len() < n {
        match c.read() {
            Frame::Deliver(d) => {
                let e = d.entry.expect("DELIVER without entry");
                lags.push(Duration::from_millis(now_ms().saturating_sub(e.ts_ms)));
                let seq = e.seq;
                entries.push(e);
                if entries.len() % 64 == 0 || entries.len() == n {
                    ack(c, seq);
                }
            }
            Frame::Error(e) => panic!("server sent ERROR: {e:?}"),
            _ => {}
        }
    }
    Received {
        entries,
        lags,
        done_at: Instant::now(),
    }
}

/// One side of the pair: sends to `peer` every `PAIR_EVERY` until `stop`; each body
/// carries its number and send time. Returns the numbers whose send was confirmed.
async fn pair_sender(
    h: ClientHandle,
    peer: &'static str,
    base: Instant,
    stop: Arc<AtomicBool>,
) -> Vec<u64> {
    let mut tick = tokio::time::interval(PAIR_EVERY);
    let mut sends = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let body = format!("{n} {}", base.elapsed().as_nanos());
        let h = h.clone();
        sends.push((
            n,
            tokio::spawn(async move { h.send(peer, body.into()).await }),
        ));
        n += 1;
    }
    let mut confirmed = Vec::new();
    for (n, send) in sends {
        send.await
            .unwrap()
            .unwrap_or_else(|e| panic!("pair send {n} to {peer} failed: {e}"));
        confirmed.push(n);
    }
    confirmed
}

/// The other side of the pair: receives from `peer` until `count` says how many to
/// expect and all arrived; returns (number, sent at, latency) per message.
async fn pair_receiver(
    mut c: Client,
    peer: &'static str,
    base: Instant,
    expected: tokio::sync::watch::Receiver<Option<usize>>,
) -> Vec<(u64, Duration, Duration)> {
    let mut got = Vec::new();
    loop {
        if let Some(n) = *expected.borrow()
            && got.len() >= n
        {
            return got;
        }
        let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(100), c.recv()).await else {
            continue;
        };
        if e.from != peer || e.r#type != tether_client::EntryType::Message as i32 {
            continue; // our own copy of what we sent, or the peer's receipts
        }
        let text = String::from_utf8_lossy(&e.body).into_owned();
        let mut parts = text.split(' ');
        let n: u64 = parts.next().unwrap().parse().unwrap();
        let sent = Duration::from_nanos(parts.next().unwrap().parse().unwrap());
        got.push((n, sent, base.elapsed().saturating_sub(sent)));
    }
}

fn sdk(server: &ServerProc, user: &str, device: &str, auto_ack: bool) -> Client {
    let mut cfg = ClientConfig::new(server.addr.to_string(), server.token(user), device);
    cfg.auto_ack = auto_ack;
    Client::start(cfg).unwrap()
}

fn flood_body(sender: usize, i: usize) -> bytes::Bytes {
    let mut body = format!("{sender}:{i}:").into_bytes();
    body.resize(BODY, b'x');
    body.into()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_stops_reading_stalls_only_its_own_stream() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let server = ServerProc::start(&data, &[]);
    let pid = server.pid();
    let base = Instant::now();

    // sink's two devices, raw protocol, long heartbeat: neither sends anything unless
    // told to, and neither may expire during the test.
    let sink_token = server.token("sink");
    let (mut stalled, w1) = RawClient::login_with(server.addr, &sink_token, "stalled", 1, 600_000);
    let (mut live, w2) = RawClient::login_with(server.addr, &sink_token, "live", 1, 600_000);
    assert_eq!((w1.start_seq, w2.start_seq), (1, 1));
    let idle: Vec<RawClient> = (0..IDLE_DEVICES)
        .map(|i| RawClient::login_with(server.addr, &sink_token, &format!("idle{i}"), 1, 600_000).0)
        .collect();

    // The pair, and the senders (who never read their own copies: with sink's first
    // device and the idle ones, 19 streams stall).
    let p = sdk(&server, "pat", "phone", true);
    let q = sdk(&server, "quinn", "phone", true);
    let senders: Vec<Client> = (0..SENDERS)
        .map(|k| sdk(&server, &format!("sender{k}"), "d", false))
        .collect();
    for c in senders.iter().chain([&p, &q]) {
        c.wait_connected(Duration::from_secs(20)).await.unwrap();
    }

    let rss = RssSampler::start(pid);
    let stop_pair = Arc::new(AtomicBool::new(false));
    let (expect_at_q, q_expects) = tokio::sync::watch::channel(None);
    let (expect_at_p, p_expects) = tokio::sync::watch::channel(None);
    let p_sends = tokio::spawn(pair_sender(p.handle(), "quinn", base, stop_pair.clone()));
    let q_sends = tokio::spawn(pair_sender(q.handle(), "pat", base, stop_pair.clone()));
    let at_q = tokio::spawn(pair_receiver(q, "pat", base, q_expects));
    let at_p = tokio::spawn(pair_receiver(p, "quinn", base, p_expects));

    // Baseline: the pair alone for 3 s.
    let baseline_from = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let flood_from = Instant::now();
    let rss_before = rss.peak(flood_from - Duration::from_millis(500), flood_from);
    let store_before = dir_bytes(&data);

    // sink's second device reads along from here.
    let live_reader = std::thread::spawn(move || read_entries(&mut live, MESSAGES));

    // The flood: SENDERS × (MESSAGES / SENDERS), each sender pipelined.
    let mut flood = Vec::new();
    for (k, c) in senders.iter().enumerate() {
        let h = c.handle();
        flood.push(tokio::spawn(async move {
            // Queued in order (the SDK keeps that order to the commit), answers awaited
            // PIPELINE behind.
            let mut tickets = std::collections::VecDeque::with_capacity(PIPELINE);
            let mut ids = Vec::with_capacity(MESSAGES / SENDERS);
            for i in 0..MESSAGES / SENDERS {
                if tickets.len() == PIPELINE {
                    let t: SendTicket = tickets.pop_front().unwrap();
                    ids.push(t.outcome().await.expect("flood send failed").message_id);
                }
                let ticket = h
                    .enqueue(ClientMsgId::generate(), "sink", flood_body(k, i), "")
                    .await
                    .expect("flood enqueue failed");
                tickets.push_back(ticket);
            }
            for t in tickets {
                ids.push(t.outcome().await.expect("flood send failed").message_id);
            }
            ids
        }));
    }
    let mut message_ids = Vec::with_capacity(MESSAGES);
    for f in flood {
        message_ids.extend(f.await.unwrap());
    }
    let flood_done = Instant::now();
    let flood_took = flood_done - flood_from;

    let live_got = tokio::task::spawn_blocking(move || live_reader.join().unwrap())
        .await
        .unwrap();
    // Stay stalled a little longer while the pair keeps talking.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let resume_at = Instant::now();
    let rss_stall_peak = rss.peak(flood_from, resume_at);
    let delivered_in_stall = metric(&server, "tether_messages_delivered_total");
    let store_after = dir_bytes(&data);
    stop_pair.store(true, Ordering::Relaxed);

    // The stalled device reads again.
    let stalled_got = tokio::task::spawn_blocking(move || read_entries(&mut stalled, MESSAGES))
        .await
        .unwrap();
    let replay_took = stalled_got.done_at - resume_at;
    let rss_replay_peak = rss.peak(resume_at, Instant::now());

    // The pair: every confirmed send arrives, once.
    let p_confirmed = p_sends.await.unwrap();
    let q_confirmed = q_sends.await.unwrap();
    expect_at_q.send_replace(Some(p_confirmed.len()));
    expect_at_p.send_replace(Some(q_confirmed.len()));
    let (at_q, at_p) = tokio::time::timeout(Duration::from_secs(20), async {
        (at_q.await.unwrap(), at_p.await.unwrap())
    })
    .await
    .expect("pair messages lost: not all arrived within 20 s");
    for (got, confirmed, who) in [
        (&at_q, &p_confirmed, "pat→quinn"),
        (&at_p, &q_confirmed, "quinn→pat"),
    ] {
        let mut numbers: Vec<u64> = got.iter().map(|(n, _, _)| *n).collect();
        numbers.sort_unstable();
        assert_eq!(&numbers, confirmed, "{who}: lost or duplicated");
    }
    let (mut baseline, mut during) = (Vec::new(), Vec::new());
    for (_, sent, latency) in at_q.iter().chain(&at_p) {
        let sent_at = base + *sent;
        if sent_at >= baseline_from && sent_at < flood_from {
            baseline.push(*latency);
        } else if sent_at >= flood_from && sent_at < resume_at {
            during.push(*latency);
        }
    }
    baseline.sort_unstable();
    during.sort_unstable();
    let mut live_lags = live_got.lags.clone();
    live_lags.sort_unstable();

    let rss_growth = rss_stall_peak.saturating_sub(rss_before);
    let store_growth_kib = store_after.saturating_sub(store_before) / 1024;
    println!(
        "slow consumer: {MESSAGES} × {BODY} B from {SENDERS} pipelined senders in {:.1} s \
         ({:.0} msg/s); stalled device resumed and drained in {:.2} s",
        flood_took.as_secs_f64(),
        MESSAGES as f64 / flood_took.as_secs_f64(),
        replay_took.as_secs_f64(),
    );
    println!(
        "  server RSS: before {:.1} MiB, stall peak {:.1} MiB (+{:.1} MiB), replay peak \
         {:.1} MiB; store files grew {:.1} MiB; bound +{RSS_GROWTH_BOUND_MIB} MiB",
        mib(rss_before),
        mib(rss_stall_peak),
        mib(rss_growth),
        mib(rss_replay_peak),
        mib(store_growth_kib),
    );
    println!(
        "  pair latency: baseline p50 {:.1} ms p99 {:.1} ms ({} msgs); during the stall \
         p50 {:.1} ms p99 {:.1} ms max {:.1} ms ({} msgs); bound p99 {:?}",
        ms(percentile(&baseline, 0.5)),
        ms(percentile(&baseline, 0.99)),
        baseline.len(),
        ms(percentile(&during, 0.5)),
        ms(percentile(&during, 0.99)),
        ms(percentile(&during, 1.0)),
        during.len(),
        PAIR_P99_BOUND,
    );
    println!(
        "  DELIVERs sent before the resume: {delivered_in_stall} (the second device's \
         {MESSAGES}, the pair's, and at most {CREDIT} to each of the {} stalled streams)",
        1 + IDLE_DEVICES + SENDERS
    );
    println!(
        "  sink's second device: all {MESSAGES} read {:.2} s after the flood began ({:.0} ms \
         after the last SEND_ACK); lag p50 {:.0} ms p99 {:.0} ms max {:.0} ms; bound p99 {:?}",
        (live_got.done_at - flood_from).as_secs_f64(),
        ms(live_got.done_at.saturating_duration_since(flood_done)),
        ms(percentile(&live_lags, 0.5)),
        ms(percentile(&live_lags, 0.99)),
        ms(percentile(&live_lags, 1.0)),
        LIVE_P99_BOUND,
    );

    // (c) The other device was not held back by the stalled one (which was still
    // stalled until `resume_at`, after this device had everything).
    let live_seqs: Vec<u64> = live_got.entries.iter().map(|e| e.seq).collect();
    assert_eq!(live_seqs, (1..=MESSAGES as u64).collect::<Vec<_>>());
    let caught_up = live_got.done_at.saturating_duration_since(flood_done);
    assert!(
        caught_up <= LIVE_P99_BOUND,
        "the second device had everything only {caught_up:?} after the last SEND_ACK"
    );
    assert!(
        percentile(&live_lags, 0.99) <= LIVE_P99_BOUND,
        "second device lagged: p99 {:?}",
        percentile(&live_lags, 0.99)
    );

    // (d) Everything, once, in order, for the device that stalled.
    let seqs: Vec<u64> = stalled_got.entries.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=MESSAGES as u64).collect::<Vec<_>>(),
        "seqs not contiguous"
    );
    let mut delivered_ids: Vec<u64> = stalled_got.entries.iter().map(|e| e.message_id).collect();
    delivered_ids.sort_unstable();
    message_ids.sort_unstable();
    assert_eq!(delivered_ids, message_ids, "message ids: lost or twice");
    let mut last_per_sender = [None::<usize>; SENDERS];
    for e in &stalled_got.entries {
        let text = String::from_utf8_lossy(&e.body[..16.min(e.body.len())]).into_owned();
        let mut parts = text.split(':');
        let k: usize = parts.next().unwrap().parse().unwrap();
        let i: usize = parts.next().unwrap().parse().unwrap();
        assert_eq!(e.from, format!("sender{k}"));
        assert!(
            last_per_sender[k].is_none_or(|last| i > last),
            "sender{k}'s messages out of order at {i}"
        );
        last_per_sender[k] = Some(i);
    }

    // (a) No queue for the stalled devices.
    assert!(
        rss_growth <= RSS_GROWTH_BOUND_MIB * 1024,
        "server RSS grew {:.1} MiB during the stall (bound {RSS_GROWTH_BOUND_MIB} MiB)",
        mib(rss_growth),
    );

    // (b) The pair did not notice.
    assert!(
        during.len() >= 20,
        "too few pair messages during the stall: {}",
        during.len()
    );
    assert!(
        percentile(&during, 0.99) <= PAIR_P99_BOUND,
        "pair p99 during the stall {:?} (baseline {:?})",
        percentile(&during, 0.99),
        percentile(&baseline, 0.99)
    );
    // What the server sent at all before the resume: the second device's 50,000, the
    // pair's (each message to its recipient, the sender's own copy, and at most one
    // delivered receipt back to the sender), and at most one credit window to each of
    // the streams that stalled.
    let pair_msgs = (p_confirmed.len() + q_confirmed.len()) as u64;
    let stalled_streams = (1 + IDLE_DEVICES + SENDERS) as u64;
    assert!(
        delivered_in_stall <= MESSAGES as u64 + 3 * pair_msgs + stalled_streams * CREDIT,
        "{delivered_in_stall} DELIVERs sent before the resume: more than the credit windows allow"
    );
    drop(rss);
    drop(idle);
    drop(senders);
}
