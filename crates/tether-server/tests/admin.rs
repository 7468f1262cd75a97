//! The admin HTTP API over real sockets: a server with its HTTP port, devices logged in
//! over TCP, and plain HTTP/1.1 requests.

use std::time::Duration;
use tether_proto::pb::{self, ErrorCode, KickReason};
use tether_proto::{Frame, PREAMBLE, frame};
use tether_server::{RunningServer, Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Fixture {
    server: RunningServer,
    admin_token: String,
    _dir: tempfile::TempDir,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: Some("127.0.0.1:0".parse().unwrap()),
        ..ServerConfig::default()
    };
    let server = Server::open(cfg).unwrap().bind().await.unwrap();
    let admin_token = std::fs::read_to_string(dir.path().join("admin-token")).unwrap();
    Fixture {
        server,
        admin_token: admin_token.trim().to_owned(),
        _dir: dir,
    }
}

/// One HTTP/1.1 request; returns the status and the body.
async fn http(
    f: &Fixture,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(f.server.http_addr.unwrap())
        .await
        .unwrap();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: tether\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").unwrap().1.to_owned();
    (status, body)
}

async fn admin(f: &Fixture, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
    let (status, body) = http(f, method, path, Some(&f.admin_token), body).await;
    let json = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    (status, json)
}

/// A raw protocol connection.
struct Device {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Device {
    async fn login(f: &Fixture, user: &str, device: &str) -> (Device, Frame) {
        let token = f
            .server
            .server()
            .shared()
            .auth
            .mint(user, Duration::from_secs(600));
        Self::login_with(f, &token, device).await
    }

    async fn login_with(f: &Fixture, token: &str, device: &str) -> (Device, Frame) {
        let s = TcpStream::connect(f.server.addr).await.unwrap();
        let mut d = Device { s, buf: Vec::new() };
        let mut out = PREAMBLE.to_vec();
        frame::encode_to(
            &Frame::Hello(pb::Hello {
                version: 1,
                token: token.into(),
                device_id: device.into(),
                device_epoch: 1,
                heartbeat_interval_ms: 45_000,
                heartbeat_mode: pb::HeartbeatMode::Idle as i32,
                ..Default::default()
            }),
            &mut out,
        );
        d.s.write_all(&out).await.unwrap();
        let first = d.next().await.expect("closed during login");
        (d, first)
    }

    async fn write(&mut self, f: &Frame) {
        let mut out = Vec::new();
        frame::encode_to(f, &mut out);
        self.s.write_all(&out).await.unwrap();
    }

    /// The next frame, or None at close (3 s at most).
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if let Ok(Some((raw, used))) = tether_proto::decode_frame(&self.buf, 1 << 20) {
                self.buf.drain(..used);
                return Some(frame::from_raw(&raw).unwrap());
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(3), self.s.read(&mut chunk))
                .await
                .expect("no frame within 3 s")
                .ok()?;
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next frame that is not a PONG or a head notification.
    async fn next_deliver(&mut self) -> pb::Entry {
        loop {
            match self.next().await {
                Some(Frame::Deliver(d)) => return d.entry.unwrap(),
                Some(_) => continue,
                None => panic!("closed before a DELIVER"),
            }
        }
    }
}

#[tokio::test]
async fn requests_without_the_admin_token_get_401_and_the_openapi_document_is_public() {
    let f = start().await;
    for (method, path) in [
        ("GET", "/admin/v1/health"),
        ("GET", "/admin/v1/users/ann/sessions"),
        ("GET", "/admin/v1/users/ann/presence"),
        ("POST", "/admin/v1/users/ann/messages"),
        ("POST", "/admin/v1/users/ann/devices/phone/kick"),
        ("POST", "/admin/v1/users/ann/devices/phone/revoke"),
    ] {
        let (status, body) = http(&f, method, path, None, "{}").await;
        assert_eq!(status, 401, "{method} {path}: {body}");
        assert!(body.contains("admin token"), "{body}");
        let (status, _) = http(&f, method, path, Some("not-the-token"), "{}").await;
        assert_eq!(status, 401, "{method} {path} with a wrong token");
    }
    // The revoke above did not happen: a login of that device still works.
    let (_ann, welcome) = Device::login(&f, "ann", "phone").await;
    assert!(matches!(welcome, Frame::Welcome(_)), "{welcome:?}");

    let (status, body) = http(&f, "GET", "/admin/v1/openapi.json", None, "").await;
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/admin/v1/health",
        "/admin/v1/users/{user}/sessions",
        "/admin/v1/users/{user}/presence",
        "/admin/v1/users/{user}/messages",
        "/admin/v1/users/{user}/devices/{device}/kick",
        "/admin/v1/users/{user}/devices/{device}/revoke",
    ] {
        assert!(
            doc["paths"][path].is_object(),
            "{path} missing from the document"
        );
    }
    let (status, health) = admin(&f, "GET", "/admin/v1/health", "").await;
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["sessions"], 1);
}

#[tokio::test]
async fn sessions_and_presence_describe_connected_and_known_devices() {
    let f = start().await;
    let (_, presence) = admin(&f, "GET", "/admin/v1/users/ann/presence", "").await;
    assert_eq!(presence["online"], false);
    assert_eq!(presence["last_seen_ms"], serde_json::Value::Null);

    let (mut phone, _) = Device::login(&f, "ann", "phone").await;
    let (status, sessions) = admin(&f, "GET", "/admin/v1/users/ann/sessions", "").await;
    assert_eq!(status, 200, "{sessions}");
    let connected = sessions["connected"].as_array().unwrap();
    assert_eq!(connected.len(), 1, "{sessions}");
    assert_eq!(connected[0]["device"], "phone");
    assert_eq!(connected[0]["transport"], "tcp");
    assert_eq!(connected[0]["heartbeat_interval_ms"], 45_000);
    assert_eq!(connected[0]["heartbeat_mode"], "idle");
    assert!(connected[0]["last_frame_ms_ago"].as_u64().unwrap() < 5_000);
    // No PING yet: no RTT sample. After one, the kernel's RTT of the path.
    assert_eq!(connected[0]["rtt_ms"], serde_json::Value::Null);
    phone.write(&Frame::Ping(pb::Ping::default())).await;
    assert!(matches!(phone.next().await, Some(Frame::Pong(_))));
    let (_, sessions) = admin(&f, "GET", "/admin/v1/users/ann/sessions", "").await;
    let rtt = sessions["connected"][0]["rtt_ms"].as_f64().unwrap();
    assert!(rtt > 0.0 && rtt < 1_000.0, "{sessions}");
    let (_, presence) = admin(&f, "GET", "/admin/v1/users/ann/presence", "").await;
    assert_eq!(presence["online"], true);
    assert_eq!(presence["devices"], serde_json::json!(["phone"]));

    drop(phone.s.shutdown().await);
    drop(phone);
    // Once the session is gone: offline, with the cursor's last-seen time.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (_, presence) = admin(&f, "GET", "/admin/v1/users/ann/presence", "").await;
        // The cursor (with its last-seen time) is written within a flush interval.
        if presence["online"] == false && presence["last_seen_ms"].is_u64() {
            assert!(presence["last_seen_ms"].as_u64().unwrap() > 1_700_000_000_000);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{presence}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, sessions) = admin(&f, "GET", "/admin/v1/users/ann/sessions", "").await;
    assert_eq!(sessions["connected"], serde_json::json!([]));
    assert_eq!(sessions["devices"][0]["device"], "phone");

    let (status, body) = admin(&f, "GET", "/admin/v1/users/g:team/presence", "").await;
    assert_eq!(status, 400, "{body}");
}

#[tokio::test]
async fn a_pushed_message_is_durable_before_the_answer_reaches_the_device_once_and_dedups() {
    let f = start().await;
    let (mut phone, _) = Device::login(&f, "ann", "phone").await;
    let id = "0123456789abcdef0123456789abcdef";
    let request = format!(r#"{{"body":"maintenance at 5","from":"ops","client_msg_id":"{id}"}}"#);
    let (status, pushed) = admin(&f, "POST", "/admin/v1/users/ann/messages", &request).await;
    assert_eq!(status, 200, "{pushed}");
    assert_eq!(pushed["duplicate"], false);
    let message_id = pushed["message_id"].as_u64().unwrap();
    let entry = phone.next_deliver().await;
    assert_eq!(entry.body.as_ref(), b"maintenance at 5");
    assert_eq!(entry.from, "ops");
    assert_eq!(entry.conversation, "ops");
    assert_eq!(entry.message_id, message_id);

    // The same id again: the original answer, and no second copy.
    let (status, again) = admin(&f, "POST", "/admin/v1/users/ann/messages", &request).await;
    assert_eq!(status, 200);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["message_id"].as_u64(), Some(message_id));
    let stored = f
        .server
        .server()
        .shared()
        .store
        .read_range("ann", 0, u64::MAX, 100)
        .unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");

    for bad in [
        r#"{"bdy":"x"}"#,
        r#"{"body":"x","client_msg_id":"12"}"#,
        "not json",
        r#"{"body":"x","from":"g:team"}"#,
    ] {
        let (status, body) = admin(&f, "POST", "/admin/v1/users/ann/messages", bad).await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert!(body["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
}

#[tokio::test]
async fn a_kicked_device_is_told_why_and_a_revoked_one_cannot_log_in_with_its_old_token() {
    let f = start().await;
    let shared = f.server.server().shared().clone();
    let (mut phone, _) = Device::login(&f, "ann", "phone").await;
    let (status, body) = admin(
        &f,
        "POST",
        "/admin/v1/users/ann/devices/phone/kick",
        r#"{"reason":"account review"}"#,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    match phone.next().await {
        Some(Frame::Kick(k)) => {
            assert_eq!(k.reason, KickReason::Operator as i32);
            assert_eq!(k.detail, "account review");
        }
        other => panic!("expected KICK, got {other:?}"),
    }
    assert!(
        phone.next().await.is_none(),
        "the connection closes after KICK"
    );
    let (status, _) = admin(&f, "POST", "/admin/v1/users/ann/devices/phone/kick", "").await;
    assert_eq!(status, 404, "a device that is not connected");

    // Revoke: the connected laptop is kicked, and its token no longer logs in.
    let old_token = shared.auth.mint("ann", Duration::from_secs(600));
    let (mut laptop, _) = Device::login_with(&f, &old_token, "laptop").await;
    let (status, body) = admin(&f, "POST", "/admin/v1/users/ann/devices/laptop/revoke", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["kicked"], true);
    match laptop.next().await {
        Some(Frame::Kick(k)) => assert_eq!(k.reason, KickReason::TokenRevoked as i32),
        other => panic!("expected KICK, got {other:?}"),
    }
    let (_, refused) = Device::login_with(&f, &old_token, "laptop").await;
    match refused {
        Frame::Error(e) => {
            assert_eq!(e.code, ErrorCode::AuthFailed as i32);
            assert!(e.fatal && e.reason.contains("revoked"), "{e:?}");
        }
        other => panic!("expected ERROR, got {other:?}"),
    }
    // Another device of the user is not affected; a token issued after the revocation
    // (tokens carry whole seconds) logs the laptop in again.
    let (_phone, welcome) = Device::login_with(&f, &old_token, "phone").await;
    assert!(matches!(welcome, Frame::Welcome(_)), "{welcome:?}");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let new_token = shared.auth.mint("ann", Duration::from_secs(600));
    let (_laptop, welcome) = Device::login_with(&f, &new_token, "laptop").await;
    assert!(matches!(welcome, Frame::Welcome(_)), "{welcome:?}");

    assert_eq!(shared.metrics.disconnects("kicked"), 1);
    assert_eq!(shared.metrics.disconnects("token_revoked"), 1);
    let (status, metrics) = http(&f, "GET", "/metrics", None, "").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"tether_disconnects_total{reason="kicked"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"tether_sessions{transport="tcp"} 2"#),
        "{metrics}"
    );
    assert!(metrics.contains("tether_heartbeat_interval_seconds_bucket"));
}
