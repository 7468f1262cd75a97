//! An in-memory pipe of whole frames, for one process holding very many sessions
//! (far beyond the 20,000 file descriptors a process may open here) and for
//! measuring a session's memory without the kernel's socket buffers.
//!
//! Each direction holds at most [`PIPE_CAPACITY`] bytes of frames, like a socket
//! buffer: a writer that outruns its reader waits in `poll_flush`.

use crate::{Transport, TransportError, TransportKind};
use atomic_waker::AtomicWaker;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use std::task::{Context, Poll};
use tether_proto::{Frame, FrameError, RawFrame, frame};

/// Bytes of frames one direction of a pipe holds before the writer must wait.
pub const PIPE_CAPACITY: usize = 256 * 1024;

#[derive(Debug, Default)]
struct Direction {
    queue: Mutex<Queue>,
    /// Woken when frames arrive (or the writer closes).
    reader: AtomicWaker,
    /// Woken when room frees up (or the reader closes).
    writer: AtomicWaker,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<RawFrame>,
    bytes: usize,
    writer_closed: bool,
    reader_closed: bool,
}

#[derive(Debug, Default)]
struct Pipe {
    /// Client → server.
    up: Direction,
    /// Server → client.
    down: Direction,
}

/// One end of an in-memory pipe.
#[derive(Debug)]
pub struct MemoryTransport {
    pipe: Arc<Pipe>,
    /// True for the client end (sends on `up`).
    client: bool,
    /// Frames not yet accepted by the pipe; empty (no allocation) when idle.
    out: VecDeque<RawFrame>,
    out_bytes: usize,
    max_frame: usize,
}

/// A connected pair: (client end, server end). `server_max_frame` is the limit the
/// server end enforces until it is changed.
pub fn pair(server_max_frame: usize) -> (MemoryTransport, MemoryTransport) {
    let pipe = Arc::new(Pipe::default());
    let client = MemoryTransport {
        pipe: pipe.clone(),
        client: true,
        out: VecDeque::new(),
        out_bytes: 0,
        max_frame: usize::MAX,
    };
    let server = MemoryTransport {
        pipe,
        client: false,
        out: VecDeque::new(),
        out_bytes: 0,
        max_frame: server_max_frame,
    };
    (client, server)
}

impl MemoryTransport {
    fn rx(&self) -> &Direction {
        if self.client {
            &self.pipe.down
        } else {
            &self.pipe.up
        }
    }
    fn tx(&self) -> &Direction {
        if self.client {
            &self.pipe.up
        } else {
            &self.pipe.down
        }
    }

    /// Queues an already encoded frame, e.g. one with an unknown kind (for tests).
    pub fn send_raw(&mut self, raw: RawFrame) {
        self.out_bytes += raw.wire_len();
        self.out.push_back(raw);
    }
}

impl Transport for MemoryTransport {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<RawFrame>, TransportError>> {
        let rx = self.rx();
        let mut q = rx.queue.lock();
        if q.frames.is_empty() && !q.writer_closed {
            drop(q);
            rx.reader.register(cx.waker());
            q = rx.queue.lock();
        }
        match q.frames.pop_front() {
            Some(raw) => {
                q.bytes -= raw.wire_len();
                if q.frames.is_empty() {
                    q.frames = VecDeque::new();
                }
                drop(q);
                rx.writer.wake();
                let len = 1 + raw.payload.len();
                if len > self.max_frame {
                    return Poll::Ready(Err(TransportError::Frame(FrameError::TooLarge {
                        len: len as u64,
                        limit: self.max_frame,
                    })));
                }
                Poll::Ready(Ok(Some(raw)))
            }
            None if q.writer_closed => Poll::Ready(Ok(None)),
            None => Poll::Pending,
        }
    }

    fn set_max_frame(&mut self, limit: usize) {
        self.max_frame = limit;
    }

    fn send(&mut self, f: &Frame) -> Result<(), TransportError> {
        self.send_raw(frame::to_raw(f));
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        if self.out.is_empty() {
            return Poll::Ready(Ok(()));
        }
        let pipe = self.pipe.clone();
        let tx = if self.client { &pipe.up } else { &pipe.down };
        let mut registered = false;
        loop {
            let mut q = tx.queue.lock();
            if q.reader_closed {
                return Poll::Ready(Err(TransportError::Closed));
            }
            let mut moved = false;
            while let Some(front) = self.out.front() {
                let len = front.wire_len();
                // An empty pipe always takes one frame, so large frames cannot stall.
                if q.bytes > 0 && q.bytes + len > PIPE_CAPACITY {
                    break;
                }
                q.bytes += len;
                self.out_bytes -= len;
                if let Some(f) = self.out.pop_front() {
                    q.frames.push_back(f);
                }
                moved = true;
            }
            drop(q);
            if moved {
                tx.reader.wake();
            }
            if self.out.is_empty() {
                self.out = VecDeque::new();
                return Poll::Ready(Ok(()));
            }
            if registered {
                return Poll::Pending;
            }
            tx.writer.register(cx.waker());
            registered = true;
        }
    }

    fn queued_bytes(&self) -> usize {
        self.out_bytes
    }

    fn shutdown(&mut self) {
        let tx = self.tx();
        tx.queue.lock().writer_closed = true;
        tx.reader.wake();
    }

    fn kind(&self) -> TransportKind {
        TransportKind::Memory
    }

    fn peer(&self) -> String {
        "memory".into()
    }
}

impl Drop for MemoryTransport {
    fn drop(&mut self) {
        // Whatever was queued is lost, as with a socket closed by its process.
        self.shutdown();
        let rx = self.rx();
        rx.queue.lock().reader_closed = true;
        rx.writer.wake();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{flush, recv};
    use tether_proto::pb;

    #[tokio::test]
    async fn frames_cross_in_order_and_eof_follows_drop() {
        let (mut c, mut s) = pair(4096);
        for i in 0..10 {
            c.send(&Frame::Ack(pb::Ack { seq: i })).unwrap();
        }
        flush(&mut c).await.unwrap();
        drop(c);
        for i in 0..10 {
            let raw = recv(&mut s).await.unwrap().unwrap();
            assert_eq!(
                frame::from_raw(&raw).unwrap(),
                Frame::Ack(pb::Ack { seq: i })
            );
        }
        assert!(recv(&mut s).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn frame_over_the_receivers_limit_is_rejected() {
        let (mut c, mut s) = pair(16);
        c.send_raw(RawFrame {
            kind: 5,
            payload: vec![0u8; 100].into(),
        });
        flush(&mut c).await.unwrap();
        assert!(matches!(
            recv(&mut s).await,
            Err(TransportError::Frame(FrameError::TooLarge { .. }))
        ));
    }

    #[tokio::test]
    async fn writer_waits_when_the_pipe_is_full() {
        let (mut c, mut s) = pair(usize::MAX);
        for _ in 0..10 {
            c.send_raw(RawFrame {
                kind: 5,
                payload: vec![0u8; PIPE_CAPACITY / 4].into(),
            });
        }
        let waker = futures_noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(c.poll_flush(&mut cx).is_pending());
        assert!(c.queued_bytes() > 0);
        for _ in 0..10 {
            let reading = recv(&mut s);
            let flushing = flush(&mut c);
            let (got, _) = tokio::join!(reading, async {
                let _ = tokio::time::timeout(std::time::Duration::from_millis(1), flushing).await;
            });
            assert!(got.unwrap().is_some());
        }
    }

    fn futures_noop_waker() -> std::task::Waker {
        std::task::Waker::noop().clone()
    }
}
