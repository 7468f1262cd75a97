//! DESIGN §9: in `fsync` mode every SEND_ACK is written to the socket only after an
//! fdatasync that began after its SEND was read and returned before the ACK's write.
//! Checked on the real server process under strace; a negative control in `relaxed`
//! mode proves the check can fail. Needs strace (installed by the README's test
//! command); without it this test fails loudly.

mod common;

use common::{RawClient, ServerProc, id};
use std::collections::HashMap;
use std::path::Path;
use tether_proto::{Frame, PREAMBLE, frame};

#[derive(Debug)]
enum Event {
    /// A SEND with this client message id finished arriving at `t`.
    SendRead { cmid: Vec<u8>, t: f64 },
    /// A SEND_ACK for this id started being written at `t`.
    AckWrite { cmid: Vec<u8>, t: f64 },
    /// An fdatasync/fsync ran over [start, end].
    Sync { start: f64, end: f64 },
}

/// Decodes strace's `-xx` string ("\x01\x03...") into bytes.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && b.get(i + 1) == Some(&b'x')
            && let Some(v) = s
                .get(i + 2..i + 4)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// One finished syscall: (name, start, end, first arg, first string arg).
struct Call {
    name: String,
    start: f64,
    end: f64,
    fd: i64,
    data: Option<Vec<u8>>,
}

fn parse_strace(text: &str) -> Vec<Call> {
    let mut pending: HashMap<String, (f64, String)> = HashMap::new();
    let mut calls = Vec::new();
    for line in text.lines() {
        // "PID  SECONDS.MICROS syscall(...) = ret <duration>"
        let Some((pid, rest)) = line.trim_start().split_once(char::is_whitespace) else {
            continue;
        };
        let Some((ts, rest)) = rest.trim_start().split_once(' ') else {
            continue;
        };
        let Ok(ts) = ts.parse::<f64>() else { continue };
        let (start, body) = if let Some(r) = rest.strip_prefix("<... ") {
            let Some((_, after)) = r.split_once(" resumed>") else {
                continue;
            };
            let Some((start, head)) = pending.remove(pid) else {
                continue;
            };
            (start, format!("{head}{after}"))
        } else if let Some(head) = rest.strip_suffix(" <unfinished ...>") {
            pending.insert(pid.to_string(), (ts, head.to_string()));
            continue;
        } else {
            (ts, rest.to_string())
        };
        let Some((name, args)) = body.split_once('(') else {
            continue;
        };
        let dur = body
            .rsplit_once('<')
            .and_then(|(_, d)| d.trim_end_matches('>').parse::<f64>().ok())
            .unwrap_or(0.0);
        let end = if rest.starts_with("<... ") {
            ts
        } else {
            ts + dur
        };
        let fd = args
            .split([',', ')'])
            .next()
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or(-1);
        let data = args
            .split_once('"')
            .and_then(|(_, r)| r.split_once('"'))
            .map(|(s, _)| unescape(s));
        calls.push(Call {
            name: name.to_string(),
            start,
            end,
            fd,
            data,
        });
    }
    calls
}

/// Turns syscalls into protocol events by decoding each socket's byte streams.
fn events(calls: &[Call]) -> Vec<Event> {
    let mut inbound: HashMap<i64, Vec<u8>> = HashMap::new();
    let mut outbound: HashMap<i64, Vec<u8>> = HashMap::new();
    let mut out = Vec::new();
    for c in calls {
        match c.name.as_str() {
            "fdatasync" | "fsync" => out.push(Event::Sync {
                start: c.start,
                end: c.end,
            }),
            "read" | "recvfrom" => {
                let Some(data) = &c.data else { continue };
                let buf = inbound.entry(c.fd).or_default();
                buf.extend_from_slice(data);
                if buf.starts_with(&PREAMBLE) {
                    buf.drain(..PREAMBLE.len());
                }
                while let Ok(Some((raw, used))) = tether_proto::decode_frame(buf, 1 << 20) {
                    buf.drain(..used);
                    if let Ok(Frame::Send(s)) = frame::from_raw(&raw) {
                        out.push(Event::SendRead {
                            cmid: s.client_msg_id.to_vec(),
                            t: c.end,
                        });
                    }
                }
            }
            "write" | "sendto" => {
                let Some(data) = &c.data else { continue };
                let buf = outbound.entry(c.fd).or_default();
                buf.extend_from_slice(data);
                loop {
                    match tether_proto::decode_frame(buf, 1 << 20) {
                        Ok(Some((raw, used))) => {
                            buf.drain(..used);
                            if let Ok(Frame::SendAck(a)) = frame::from_raw(&raw) {
                                out.push(Event::AckWrite {
                                    cmid: a.client_msg_id.to_vec(),
                                    t: c.start,
                                });
                            }
                        }
                        Ok(None) => break,
                        // Not a frame stream (logs, eventfd): forget this fd's bytes.
                        Err(_) => {
                            buf.clear();
                            break;
                        }
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// For every SEND_ACK: was there a sync inside [its SEND's arrival, the ACK's write]?
/// Returns (acks checked, acks without a covering sync).
fn check(events: &[Event]) -> (usize, usize) {
    let mut read_at: HashMap<&[u8], f64> = HashMap::new();
    let syncs: Vec<(f64, f64)> = events
        .iter()
        .filter_map(|e| match e {
            Event::Sync { start, end } => Some((*start, *end)),
            _ => None,
        })
        .collect();
    let (mut checked, mut uncovered) = (0, 0);
    for e in events {
        match e {
            Event::SendRead { cmid, t } => {
                read_at.entry(cmid).or_insert(*t);
            }
            Event::AckWrite { cmid, t } => {
                let read = read_at
                    .get(cmid.as_slice())
                    .copied()
                    .expect("ACK for a SEND never read");
                checked += 1;
                if !syncs.iter().any(|(s, e)| *s >= read && *e <= *t) {
                    uncovered += 1;
                }
            }
            Event::Sync { .. } => {}
        }
    }
    (checked, uncovered)
}

fn run_traced(durability: &str, dir: &Path) -> (usize, usize) {
    assert!(
        std::process::Command::new("strace")
            .arg("-V")
            .output()
            .is_ok(),
        "strace is not installed: run the README's test command (it installs strace)"
    );
    let trace = dir.join("trace.txt");
    let trace_arg = trace.to_str().unwrap().to_string();
    let wrapper = [
        "strace",
        "-f",
        "-ttt",
        "-T",
        "-xx",
        "-s",
        "65536",
        "-e",
        "trace=read,recvfrom,write,sendto,fdatasync,fsync",
        "-o",
        trace_arg.as_str(),
    ];
    let server =
        ServerProc::start_wrapped(&wrapper, &dir.join("data"), &["--durability", durability]);
    let (mut alice, _) = RawClient::login(server.addr, &server.token("alice"), "laptop", 1);
    for n in 0..30 {
        alice.send_text("bob", id(n), &format!("message {n}"));
    }
    server.terminate();
    let text = std::fs::read_to_string(&trace).expect("strace output");
    check(&events(&parse_strace(&text)))
}

#[test]
fn every_send_ack_follows_the_fdatasync_that_covers_it() {
    let dir = tempfile::tempdir().unwrap();
    let (checked, uncovered) = run_traced("fsync", dir.path());
    assert_eq!(checked, 30, "every SEND_ACK was seen in the trace");
    assert_eq!(
        uncovered, 0,
        "{uncovered} SEND_ACKs were written before a covering fdatasync"
    );
}

#[test]
fn relaxed_mode_acks_without_fdatasync_so_the_check_can_fail() {
    let dir = tempfile::tempdir().unwrap();
    let (checked, uncovered) = run_traced("relaxed", dir.path());
    assert_eq!(checked, 30);
    assert_eq!(
        uncovered, 30,
        "relaxed mode must not fdatasync before acking"
    );
}
