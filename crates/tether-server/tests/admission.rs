//! Admission control over real TCP: logins beyond the token bucket get ERROR
//! OVERLOADED with a retry_after_ms (each its own slot, one token apart), and succeed
//! once they wait that long.

use std::time::Duration;
use tether_proto::pb::{self, ErrorCode};
use tether_proto::{Frame, PREAMBLE, frame};
use tether_server::{Server, ServerConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn hello_reply(addr: std::net::SocketAddr, token: &str, device: String) -> Frame {
    let mut c = TcpStream::connect(addr).await.unwrap();
    let mut bytes = PREAMBLE.to_vec();
    frame::encode_to(
        &Frame::Hello(pb::Hello {
            version: 1,
            token: token.into(),
            device_id: device,
            device_epoch: 1,
            ..Default::default()
        }),
        &mut bytes,
    );
    c.write_all(&bytes).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some((raw, _))) = tether_proto::decode_frame(&buf, 1 << 20) {
            return frame::from_raw(&raw).unwrap();
        }
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed without a reply");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test]
async fn logins_beyond_the_bucket_are_told_when_to_retry_and_then_admitted() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = ServerConfig {
        data_dir: dir.path().to_path_buf(),
        listen: "127.0.0.1:0".parse().unwrap(),
        http: None,
        login_rate: 4.0,
        login_burst: 3,
        ..ServerConfig::default()
    };
    let running = Server::open(cfg).unwrap().bind().await.unwrap();
    let token = running
        .server()
        .shared()
        .auth
        .mint("alice", Duration::from_secs(60));
    let replies = futures_util::future::join_all(
        (0..10).map(|i| hello_reply(running.addr, &token, format!("d{i}"))),
    )
    .await;
    let welcomed = replies
        .iter()
        .filter(|f| matches!(f, Frame::Welcome(_)))
        .count();
    let waits: Vec<u32> = replies
        .iter()
        .filter_map(|f| match f {
            Frame::Error(e) if e.code == ErrorCode::Overloaded as i32 && e.fatal => {
                Some(e.retry_after_ms)
            }
            _ => None,
        })
        .collect();
    assert!(
        (3..=4).contains(&welcomed),
        "burst of 3 (+1 refilled at most): {welcomed}"
    );
    assert_eq!(welcomed + waits.len(), 10, "{replies:?}");
    // At 4 logins/s a token comes every 250 ms, and each refused login is given its
    // own slot in that queue: 250 ms, 500 ms, 750 ms, ... (not all "250 ms", which
    // would bring the whole herd back at once).
    let mut sorted = waits.clone();
    sorted.sort_unstable();
    for (i, w) in sorted.iter().enumerate() {
        let slot = 250 * (i as u32 + 1);
        assert!(
            w + 30 >= slot && *w <= slot,
            "refusal {i} told to wait {w} ms, its slot is {slot} ms: {sorted:?}"
        );
    }
    assert_eq!(
        running.server().shared().metrics.logins_throttled.get(),
        waits.len() as u64
    );

    tokio::time::sleep(Duration::from_millis(
        u64::from(*waits.iter().max().unwrap()) + 10,
    ))
    .await;
    assert!(matches!(
        hello_reply(running.addr, &token, "late".into()).await,
        Frame::Welcome(_)
    ));
}
