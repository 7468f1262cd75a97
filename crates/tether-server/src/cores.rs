//! Connection threads: one single-threaded Tokio runtime per core, each with its own
//! epoll, and the accepted TCP and TLS connections dealt out to them in turn.
//!
//! Opt-in (`tether serve --per-core-runtimes`): a trade between idle and busy
//! connections. An idle gateway's work is one PING now and then on one of many
//! connections. On the work-stealing runtime the worker that wakes in epoll for it may
//! also wake a second worker to look for work to steal, which finds none and parks
//! again; here only the connection's own thread wakes. A message, though, goes from the
//! sender's connection to the receiver's: on the work-stealing runtime the receiver's
//! task usually runs next on the same worker, here it wakes another thread whenever the
//! two connections were given different ones.
//!
//! Measured on 2 vCPUs, 2026-11-22 (SCALE.md, session 15), against the shared runtime:
//! 19,000 idle TCP connections with their PINGs spread over the interval cost 18 % less
//! server CPU (a quarter of the CPU migrations); with PINGs in waves, the same; 1:1
//! messages at 5,000/s over 1,000 pairs had a p50 of 0.32–0.34 ms instead of
//! 0.23–0.24 ms. So the default stays the shared runtime.
//!
//! A connection stays on the thread it was given for its whole life; delivering to it
//! from another thread wakes its runtime (its queue and its epoll's waker). The commit
//! path is unchanged: relaxed commits still run on whichever connection thread flushes
//! (see [`crate::commit`]). WebSocket and QUIC sessions stay on the shared runtime.
//!
//! With zero threads ([`crate::ServerConfig::connection_threads`], the default)
//! connections run on the caller's runtime.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::runtime::{Builder, Handle};
use tokio::sync::oneshot;

/// The connection threads of one server.
#[derive(Debug, Default)]
pub struct ConnectionThreads {
    handles: Vec<Handle>,
    /// Dropping these ends the threads (and cancels the tasks left on them).
    _stops: Vec<oneshot::Sender<()>>,
    next: AtomicUsize,
}

impl ConnectionThreads {
    /// Starts `count` threads, each running a current-thread runtime (none for 0).
    pub fn start(count: usize) -> io::Result<Self> {
        let mut handles = Vec::with_capacity(count);
        let mut stops = Vec::with_capacity(count);
        for i in 0..count {
            let runtime = Builder::new_current_thread().enable_all().build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            handles.push(runtime.handle().clone());
            stops.push(stop);
            std::thread::Builder::new()
                .name(format!("tether-conn-{i}"))
                .spawn(move || {
                    // Runs the tasks handed to it until the server is dropped; the
                    // runtime is dropped here, on its own thread.
                    let _ = runtime.block_on(stopped);
                })?;
        }
        Ok(Self {
            handles,
            _stops: stops,
            next: AtomicUsize::new(0),
        })
    }

    /// How many threads there are (0: the caller's runtime).
    pub fn len(&self) -> usize {
        self.handles.len()
    }

    /// Whether connections run on the caller's runtime.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// The runtime the next connection goes to, in turn; `None` for the caller's.
    pub fn next(&self) -> Option<&Handle> {
        if self.handles.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.handles.len();
        Some(&self.handles[i])
    }

    /// Runs `task` on the next connection thread, or on the caller's runtime if there
    /// are none.
    pub fn spawn<F>(&self, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        match self.next() {
            Some(handle) => drop(handle.spawn(task)),
            None => drop(tokio::spawn(task)),
        }
    }
}

/// Serves an accepted TCP stream on the next connection thread. The stream leaves
/// the accepting runtime's epoll here; `serve` makes the connection's task, which
/// registers it with its own thread's ([`register`]) when it first runs, inside its
/// login phase, so the task is no bigger than one spawned on the accepting runtime.
pub(crate) fn hand_over<F, Fut>(
    threads: &ConnectionThreads,
    stream: tokio::net::TcpStream,
    serve: F,
) where
    F: FnOnce(std::net::TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    match stream.into_std() {
        Ok(stream) => threads.spawn(serve(stream)),
        Err(e) => tracing::warn!(error = %e, "cannot hand an accepted connection to its thread"),
    }
}

/// Registers a handed-over stream with the runtime this runs on.
pub(crate) fn register(stream: std::net::TcpStream) -> Option<tokio::net::TcpStream> {
    tokio::net::TcpStream::from_std(stream)
        .inspect_err(|e| tracing::warn!(error = %e, "cannot register an accepted connection"))
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::{Arc, Mutex};

    #[tokio::test]
    async fn tasks_are_dealt_out_to_every_thread_in_turn() {
        let threads = ConnectionThreads::start(3).unwrap();
        let names = Arc::new(Mutex::new(Vec::new()));
        let (done, mut finished) = tokio::sync::mpsc::channel(6);
        for _ in 0..6 {
            let (names, done) = (names.clone(), done.clone());
            threads.spawn(async move {
                let name = std::thread::current().name().unwrap_or("").to_string();
                names.lock().unwrap().push(name);
                done.send(()).await.unwrap();
            });
        }
        for _ in 0..6 {
            finished.recv().await.unwrap();
        }
        let names = names.lock().unwrap();
        let distinct: HashSet<&String> = names.iter().collect();
        assert_eq!(names.len(), 6);
        assert_eq!(
            distinct,
            ["tether-conn-0", "tether-conn-1", "tether-conn-2"]
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .iter()
                .collect()
        );
    }

    #[tokio::test]
    async fn an_accepted_stream_is_served_on_its_thread() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let threads = ConnectionThreads::start(1).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        hand_over(&threads, accepted, |stream| async move {
            let mut stream = register(stream).unwrap();
            let thread = std::thread::current().name().unwrap_or("").to_string();
            let mut buf = [0u8; 4];
            stream.read_exact(&mut buf).await.unwrap();
            stream.write_all(thread.as_bytes()).await.unwrap();
        });
        client.write_all(b"ping").await.unwrap();
        let mut reply = String::new();
        client.read_to_string(&mut reply).await.unwrap();
        assert_eq!(reply, "tether-conn-0");
    }

    #[tokio::test]
    async fn without_threads_tasks_run_on_the_callers_runtime() {
        let threads = ConnectionThreads::start(0).unwrap();
        assert!(threads.next().is_none());
        let (tx, rx) = oneshot::channel();
        threads.spawn(async move {
            let _ = tx.send(std::thread::current().name().map(str::to_string));
        });
        let name = rx.await.unwrap();
        assert!(!name.unwrap_or_default().starts_with("tether-conn"));
    }
}
