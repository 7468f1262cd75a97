//! Bad input over real TCP on loopback: each case gets ERROR with a code and a reason,
//! only the offending connection closes, and everyone else keeps being served.

use bytes::Bytes;
use prost::Message;
use std::time::Duration;
use tether_proto::pb::{self, ErrorCode};
use tether_proto::{Frame, PREAMBLE, frame, kind};
use tether_server::{RunningServer, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn start() -> (RunningServer, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: None,
        login_deadline: Duration::from_millis(500),
        ..ServerConfig::default()
    };
    let running = Server::open(cfg).unwrap().bind().await.unwrap();
    (running, dir)
}

fn token(s: &RunningServer, user: &str) -> String {
    s.server()
        .shared()
        .auth
        .mint(user, Duration::from_secs(600))
}

fn encode(f: &Frame) -> Vec<u8> {
    let mut out = Vec::new();
    frame::encode_to(f, &mut out);
    out
}

fn hello(token: &str, device: &str) -> Frame {
    Frame::Hello(pb::Hello {
        version: 1,
        token: token.into(),
        device_id: device.into(),
        device_epoch: 1,
        ..Default::default()
    })
}

fn send(to: &str, n: u8) -> Frame {
    Frame::Send(pb::Send {
        client_msg_id: Bytes::from(vec![n; 16]),
        target: Some(pb::send::Target::User(to.into())),
        body: Bytes::from_static(b"hi"),
        content_type: String::new(),
    })
}

/// Reads frames until EOF (or 3 s), returning them.
async fn read_until_close(s: &mut TcpStream) -> Vec<Frame> {
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut buf)).await;
    let mut frames = Vec::new();
    let mut rest = &buf[..];
    while let Ok(Some((raw, used))) = tether_proto::decode_frame(rest, 1 << 20) {
        frames.push(frame::from_raw(&raw).unwrap());
        rest = &rest[used..];
    }
    frames
}

async fn connect(s: &RunningServer) -> TcpStream {
    TcpStream::connect(s.addr).await.unwrap()
}

/// Sends `bytes` on a fresh connection and expects a fatal ERROR with `code`, then close.
async fn expect_fatal(s: &RunningServer, bytes: &[u8], code: ErrorCode) -> pb::Error {
    let mut c = connect(s).await;
    c.write_all(bytes).await.unwrap();
    let frames = read_until_close(&mut c).await;
    match frames.last() {
        Some(Frame::Error(e)) if e.code == code as i32 && e.fatal && !e.reason.is_empty() => {
            e.clone()
        }
        other => panic!("expected fatal {code:?}, got {other:?} (all: {frames:?})"),
    }
}

fn preamble_and(frames: &[Frame]) -> Vec<u8> {
    let mut out = PREAMBLE.to_vec();
    for f in frames {
        out.extend(encode(f));
    }
    out
}

/// A logged-in raw connection, with WELCOME read.
async fn logged_in(s: &RunningServer, user: &str, device: &str) -> TcpStream {
    logged_in_with_rest(s, user, device).await.0
}

/// Same, also returning bytes that arrived after WELCOME.
async fn logged_in_with_rest(s: &RunningServer, user: &str, device: &str) -> (TcpStream, Vec<u8>) {
    let mut c = connect(s).await;
    c.write_all(&preamble_and(&[hello(&token(s, user), device)]))
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    loop {
        let n = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed during login");
        got.extend_from_slice(&buf[..n]);
        if let Ok(Some((raw, used))) = tether_proto::decode_frame(&got, 1 << 20) {
            assert_eq!(raw.kind, kind::WELCOME, "{:?}", frame::from_raw(&raw));
            return (c, got[used..].to_vec());
        }
    }
}

#[tokio::test]
async fn missing_or_wrong_preamble_and_garbage_are_bad_preamble() {
    let (s, _d) = start().await;
    expect_fatal(&s, &encode(&hello("x", "d")), ErrorCode::BadPreamble).await;
    expect_fatal(&s, b"TTH\x02", ErrorCode::BadPreamble).await;
    expect_fatal(
        &s,
        b"\x16\x03\x01\x02\x00garbage that is not tether",
        ErrorCode::BadPreamble,
    )
    .await;
}

#[tokio::test]
async fn garbage_after_the_preamble_is_malformed() {
    let (s, _d) = start().await;
    let mut bytes = PREAMBLE.to_vec();
    bytes.extend_from_slice(&[0x05, kind::HELLO, 0xFF, 0xFF, 0xFF, 0xFF]);
    expect_fatal(&s, &bytes, ErrorCode::MalformedFrame).await;
    let mut zero = PREAMBLE.to_vec();
    zero.push(0);
    expect_fatal(&s, &zero, ErrorCode::MalformedFrame).await;
}

#[tokio::test]
async fn length_over_the_pre_auth_limit_is_refused_before_the_body() {
    let (s, _d) = start().await;
    let mut bytes = PREAMBLE.to_vec();
    prost::encoding::encode_varint(4097, &mut bytes);
    let e = expect_fatal(&s, &bytes, ErrorCode::FrameTooLarge).await;
    assert!(e.reason.contains("4097"), "{}", e.reason);
}

#[tokio::test]
async fn length_over_the_post_auth_limit_is_refused() {
    let (s, _d) = start().await;
    let mut c = logged_in(&s, "alice", "d").await;
    let mut bytes = Vec::new();
    prost::encoding::encode_varint(64 * 1024 + 1, &mut bytes);
    c.write_all(&bytes).await.unwrap();
    let frames = read_until_close(&mut c).await;
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == ErrorCode::FrameTooLarge as i32 && e.fatal)
    );
}

#[tokio::test]
async fn truncated_frame_then_eof_is_malformed() {
    let (s, _d) = start().await;
    let mut c = connect(&s).await;
    let full = preamble_and(&[hello(&token(&s, "alice"), "d")]);
    c.write_all(&full[..full.len() - 3]).await.unwrap();
    c.shutdown().await.unwrap();
    let frames = read_until_close(&mut c).await;
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == ErrorCode::MalformedFrame as i32),
        "{frames:?}"
    );
}

#[tokio::test]
async fn unknown_critical_kind_is_an_error_and_unknown_ignorable_kind_is_skipped() {
    let (s, _d) = start().await;
    let mut c = logged_in(&s, "alice", "d").await;
    // Ignorable 0x45 with a payload, then a PING: the PONG proves the frame was skipped.
    let mut bytes = Vec::new();
    tether_proto::encode_raw(0x45, b"future feature", &mut bytes);
    bytes.extend(encode(&Frame::Ping(pb::Ping::default())));
    c.write_all(&bytes).await.unwrap();
    let mut buf = [0u8; 2];
    tokio::time::timeout(Duration::from_secs(3), c.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, [1, kind::PONG], "2-byte PONG");
    // Critical 0x30: fatal.
    let mut bytes = Vec::new();
    tether_proto::encode_raw(0x30, b"", &mut bytes);
    c.write_all(&bytes).await.unwrap();
    let frames = read_until_close(&mut c).await;
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == ErrorCode::UnknownKind as i32 && e.reason.contains("0x30")),
        "{frames:?}"
    );
}

#[tokio::test]
async fn send_before_hello_is_unexpected() {
    let (s, _d) = start().await;
    let e = expect_fatal(
        &s,
        &preamble_and(&[send("bob", 1)]),
        ErrorCode::UnexpectedKind,
    )
    .await;
    assert!(e.reason.contains("SEND before HELLO"), "{}", e.reason);
}

#[tokio::test]
async fn bad_expired_and_wrongly_signed_tokens_fail_auth() {
    let (s, _d) = start().await;
    let auth = &s.server().shared().auth;
    let foreign = tether_server::auth::Authenticator::new(b"some other server's secret");
    for bad in [
        "not.a.jwt".to_string(),
        auth.mint_expired("alice"),
        foreign.mint("alice", Duration::from_secs(600)),
    ] {
        let e = expect_fatal(
            &s,
            &preamble_and(&[hello(&bad, "d")]),
            ErrorCode::AuthFailed,
        )
        .await;
        assert!(e.reason.starts_with("invalid token"), "{}", e.reason);
    }
}

#[tokio::test]
async fn second_hello_is_unexpected() {
    let (s, _d) = start().await;
    let mut c = logged_in(&s, "alice", "d").await;
    c.write_all(&encode(&hello(&token(&s, "alice"), "d")))
        .await
        .unwrap();
    let frames = read_until_close(&mut c).await;
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == ErrorCode::UnexpectedKind as i32 && e.reason.contains("second HELLO")),
        "{frames:?}"
    );
}

#[tokio::test]
async fn valid_frames_missing_required_fields_are_refused() {
    let (s, _d) = start().await;
    let no_device = Frame::Hello(pb::Hello {
        version: 1,
        token: token(&s, "alice"),
        ..Default::default()
    });
    let e = expect_fatal(&s, &preamble_and(&[no_device]), ErrorCode::MissingField).await;
    assert!(e.reason.contains("device_id"), "{}", e.reason);

    let mut c = logged_in(&s, "alice", "d").await;
    let no_target = pb::Send {
        client_msg_id: Bytes::from(vec![1; 16]),
        target: None,
        body: Bytes::from_static(b"x"),
        content_type: String::new(),
    };
    let mut bytes = Vec::new();
    tether_proto::encode_raw(kind::SEND, &no_target.encode_to_vec(), &mut bytes);
    c.write_all(&bytes).await.unwrap();
    let frames = read_until_close(&mut c).await;
    assert!(
        matches!(frames.last(), Some(Frame::Error(e)) if e.code == ErrorCode::MissingField as i32 && e.reason.contains("target")),
        "{frames:?}"
    );
}

#[tokio::test]
async fn no_hello_within_the_login_deadline_is_a_timeout() {
    let (s, _d) = start().await;
    let started = std::time::Instant::now();
    let e = expect_fatal(&s, &PREAMBLE, ErrorCode::LoginTimeout).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(450) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    assert!(e.reason.contains("500 ms"));
}

#[tokio::test]
async fn resume_points_above_head_or_from_another_epoch_are_answered() {
    let (s, _d) = start().await;
    let mk = |last_seq, inbox_epoch| {
        Frame::Hello(pb::Hello {
            version: 1,
            token: token(&s, "carol"),
            device_id: "d".into(),
            device_epoch: 1,
            resume: Some(pb::ResumePoint {
                inbox_epoch,
                last_seq,
            }),
            ..Default::default()
        })
    };
    // Learn the epoch from a plain login.
    let mut c = connect(&s).await;
    c.write_all(&preamble_and(&[hello(&token(&s, "carol"), "probe-epoch")]))
        .await
        .unwrap();
    let mut buf = vec![0u8; 1024];
    let n = c.read(&mut buf).await.unwrap();
    let Ok(Some((raw, _))) = tether_proto::decode_frame(&buf[..n], 4096) else {
        panic!()
    };
    let Ok(Frame::Welcome(w)) = frame::from_raw(&raw) else {
        panic!()
    };
    drop(c);

    let e = expect_fatal(
        &s,
        &preamble_and(&[mk(5, w.inbox_epoch)]),
        ErrorCode::ResumeAheadOfHead,
    )
    .await;
    assert!(e.reason.contains("above the inbox head 0"), "{}", e.reason);

    let mut c = connect(&s).await;
    c.write_all(&preamble_and(&[mk(5, w.inbox_epoch + 1)]))
        .await
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        let n = tokio::time::timeout(Duration::from_secs(3), c.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        let mut rest = &buf[..n];
        while let Ok(Some((raw, used))) = tether_proto::decode_frame(rest, 4096) {
            got.push(frame::from_raw(&raw).unwrap());
            rest = &rest[used..];
        }
    }
    assert!(
        matches!(&got[0], Frame::Error(e) if e.code == ErrorCode::InboxEpochChanged as i32 && !e.fatal)
    );
    assert!(
        matches!(&got[1], Frame::Welcome(w2) if w2.inbox_epoch == w.inbox_epoch && w2.start_seq == 1)
    );
}

#[tokio::test]
async fn a_flood_of_bad_peers_does_not_disturb_a_good_session() {
    let (s, _d) = start().await;
    let mut alice = logged_in(&s, "alice", "d").await;
    alice.write_all(&encode(&send("bob", 1))).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = alice.read(&mut buf).await.unwrap();
    assert!(n > 0);

    let bad: Vec<Vec<u8>> = vec![
        b"garbage".to_vec(),
        preamble_and(&[send("bob", 2)]),
        {
            let mut b = PREAMBLE.to_vec();
            prost::encoding::encode_varint(1 << 30, &mut b);
            b
        },
        preamble_and(&[hello("bad", "d")]),
    ];
    let mut tasks = Vec::new();
    for i in 0..200 {
        let bytes = bad[i % bad.len()].clone();
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            let mut c = TcpStream::connect(addr).await.unwrap();
            let _ = c.write_all(&bytes).await;
            read_until_close(&mut c).await
        }));
    }
    for t in tasks {
        let frames = t.await.unwrap();
        assert!(matches!(frames.last(), Some(Frame::Error(e)) if e.fatal));
    }
    // alice is still served, and what was acknowledged is there for bob.
    alice
        .write_all(&encode(&Frame::Ping(pb::Ping::default())))
        .await
        .unwrap();
    let mut two = [0u8; 2];
    alice.read_exact(&mut two).await.unwrap();
    let (mut bob, mut rest) = logged_in_with_rest(&s, "bob", "d").await;
    while tether_proto::decode_frame(&rest, 1 << 20)
        .unwrap()
        .is_none()
    {
        let n = tokio::time::timeout(Duration::from_secs(3), bob.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0);
        rest.extend_from_slice(&buf[..n]);
    }
    let Ok(Some((raw, _))) = tether_proto::decode_frame(&rest, 1 << 20) else {
        panic!()
    };
    assert!(
        matches!(frame::from_raw(&raw), Ok(Frame::Deliver(d)) if d.entry.as_ref().unwrap().seq == 1)
    );
}
