//! A TCP proxy between the chaos clients and the server that can kill any connection
//! it carries: with a reset (both ends see RST at once), or silently (it stops
//! forwarding and keeps both sockets open, as a dead radio link or a NAT that dropped
//! the mapping would; only the heartbeat can tell).

use parking_lot::Mutex;
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

/// How a connection is killed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kill {
    /// Both ends get an RST.
    Reset,
    /// Nothing is forwarded any more; both ends stay open until they give up.
    Silent,
}

/// Longest a silently killed connection is held open.
const SILENT_HOLD: Duration = Duration::from_secs(60);

/// The proxy: accepts on `addr`, forwards each connection to the upstream.
pub struct Proxy {
    addr: SocketAddr,
    links: Arc<Mutex<HashMap<u64, oneshot::Sender<Kill>>>>,
    /// Connections accepted.
    pub accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on `bind` (port 0: any) and forwards to `upstream`.
    pub async fn start(bind: SocketAddr, upstream: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(bind).await?;
        let addr = listener.local_addr()?;
        let links: Arc<Mutex<HashMap<u64, oneshot::Sender<Kill>>>> = Default::default();
        let accepted = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let links = links.clone();
            let accepted = accepted.clone();
            async move {
                let mut next_id = 0u64;
                loop {
                    let Ok((client, _)) = listener.accept().await else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::Relaxed);
                    next_id += 1;
                    let (kill_tx, kill_rx) = oneshot::channel();
                    links.lock().insert(next_id, kill_tx);
                    let links = links.clone();
                    let id = next_id;
                    tokio::spawn(async move {
                        carry(client, upstream, kill_rx).await;
                        links.lock().remove(&id);
                    });
                }
            }
        });
        Ok(Proxy {
            addr,
            links,
            accepted,
            task,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills one open connection chosen at random; false if none is open.
    pub fn kill_one(&self, rng: &mut impl Rng, how: Kill) -> bool {
        let mut links = self.links.lock();
        if links.is_empty() {
            return false;
        }
        let pick = rng.random_range(0..links.len());
        let id = *links.keys().nth(pick).expect("in range");
        let kill = links.remove(&id).expect("present");
        kill.send(how).is_ok()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Forwards one connection until either end closes or it is killed.
async fn carry(mut client: TcpStream, upstream: SocketAddr, kill: oneshot::Receiver<Kill>) {
    let connect = tokio::time::timeout(Duration::from_secs(3), TcpStream::connect(upstream));
    let mut server = match connect.await {
        Ok(Ok(s)) => s,
        // The server is down (killed, restarting): the client sees a reset.
        _ => return reset(&client),
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let how = tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => return,
        how = kill => match how {
            Ok(how) => how,
            Err(_) => return,
        },
    };
    match how {
        Kill::Reset => {
            reset(&client);
            reset(&server);
        }
        Kill::Silent => {
            // Swallow whatever either side still sends, never answer, until both give up.
            let _ = tokio::time::timeout(SILENT_HOLD, async {
                tokio::join!(swallow(&mut client), swallow(&mut server));
            })
            .await;
            reset(&client);
            reset(&server);
        }
    }
}

async fn swallow(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

/// Closing with SO_LINGER 0 sends RST instead of FIN.
fn reset(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}
