//! Frames over a byte stream: preamble, varint length prefix, no buffers while idle.
//!
//! [`StreamTransport`] owns the framing for every stream transport: plain TCP
//! ([`TcpTransport`]), TLS over TCP and a QUIC bidirectional stream. What differs
//! between them (the kind, the peer address, TCP_INFO) comes from [`StreamIo`].

use crate::{Transport, TransportError, TransportKind};
use std::cell::RefCell;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use tether_proto::{Frame, PREAMBLE, RawFrame, codec, frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Size of the per-thread read buffer: one read takes at most this much.
const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    /// Shared by every connection polled on this thread, so an idle connection owns none.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH_LEN]);
}

/// A byte stream a [`StreamTransport`] can run over.
pub trait StreamIo: AsyncRead + AsyncWrite + Send + Unpin + 'static {
    /// Which transport this stream makes.
    fn kind(&self) -> TransportKind;
    /// The peer's address, for logs.
    fn peer(&self) -> String;
    /// TCP_INFO of the underlying TCP socket, where there is one.
    fn tcp_snapshot(&self) -> Option<tether_core::diagnosis::TcpSnapshot> {
        None
    }
    /// Moves the local end to a new socket, keeping the session (QUIC migration).
    fn rebind(&mut self) -> Option<io::Result<SocketAddr>> {
        None
    }
}

impl StreamIo for TcpStream {
    fn kind(&self) -> TransportKind {
        TransportKind::Tcp
    }
    fn peer(&self) -> String {
        self.peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into())
    }
    fn tcp_snapshot(&self) -> Option<tether_core::diagnosis::TcpSnapshot> {
        tcp_info(self)
    }
}

/// A boxed stream: for streams with a large state (TLS), kept once on the heap. A
/// session's future can hold its transport in more than one place (an `async fn`'s
/// arguments keep their room for the future's whole life), so a large inline stream
/// would cost that many times over.
impl<S: StreamIo> StreamIo for Box<S> {
    fn kind(&self) -> TransportKind {
        (**self).kind()
    }
    fn peer(&self) -> String {
        (**self).peer()
    }
    fn tcp_snapshot(&self) -> Option<tether_core::diagnosis::TcpSnapshot> {
        (**self).tcp_snapshot()
    }
    fn rebind(&mut self) -> Option<io::Result<SocketAddr>> {
        (**self).rebind()
    }
}

/// Whole frames over a byte stream.
#[derive(Debug)]
pub struct StreamTransport<S> {
    io: S,
    /// Partial input and unwritten output; `None` (no allocation) when idle. Behind
    /// one pointer, so the idle transport inside every session's task stays small
    /// (four inline `Vec`s and positions were 64 B of it).
    bufs: Option<Box<Buffers>>,
    max_frame: u32,
    /// Bytes handed to `io` that it has not confirmed flushed (TLS, QUIC buffer them).
    unflushed: bool,
    /// The server side still expects the client's preamble.
    expect_preamble: bool,
}

/// What a stream transport holds between calls while it is not idle.
#[derive(Debug, Default)]
struct Buffers {
    /// Bytes received but not yet taken as frames.
    inbuf: Vec<u8>,
    /// Read position in `inbuf`.
    inpos: usize,
    /// Encoded frames waiting for the stream.
    out: Vec<u8>,
    /// Write position in `out`.
    outpos: usize,
}

impl Buffers {
    fn partial_in(&self) -> usize {
        self.inbuf.len() - self.inpos
    }

    fn queued_out(&self) -> usize {
        self.out.len() - self.outpos
    }
}

/// Whole frames over a plain TCP stream.
pub type TcpTransport = StreamTransport<TcpStream>;

impl TcpTransport {
    /// The server side of an accepted connection: the first 4 bytes must be the preamble.
    pub fn accepted(stream: TcpStream, max_frame: usize) -> Self {
        let _ = stream.set_nodelay(true);
        Self::server(stream, max_frame)
    }

    /// Connects to a server and queues the preamble.
    pub async fn connect(addr: SocketAddr, max_frame: usize) -> io::Result<Self> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(Self::client(stream, max_frame))
    }

    /// The underlying stream (for socket options and TCP_INFO).
    pub fn stream(&self) -> &TcpStream {
        &self.io
    }
}

impl<S: StreamIo> StreamTransport<S> {
    /// The server side of a stream: the first 4 bytes must be the preamble.
    pub fn server(io: S, max_frame: usize) -> Self {
        Self::new(io, max_frame, true)
    }

    /// The client side of a connected stream; queues the preamble.
    pub fn client(io: S, max_frame: usize) -> Self {
        let mut t = Self::new(io, max_frame, false);
        t.bufs().out.extend_from_slice(&PREAMBLE);
        t
    }

    fn new(io: S, max_frame: usize, expect_preamble: bool) -> Self {
        Self {
            io,
            bufs: None,
            unflushed: false,
            max_frame: max_frame.min(u32::MAX as usize) as u32,
            expect_preamble,
        }
    }

    /// The underlying stream.
    pub fn io(&self) -> &S {
        &self.io
    }

    /// The underlying stream, to change.
    pub fn io_mut(&mut self) -> &mut S {
        &mut self.io
    }

    /// Takes the next frame (or checks the preamble) out of `buf`, returning it and the
    /// bytes consumed. `Ok((None, 0))` means more bytes are needed.
    fn take(&mut self, buf: &[u8]) -> Result<(Option<RawFrame>, usize), TransportError> {
        let mut used = 0;
        if self.expect_preamble {
            let n = buf.len().min(PREAMBLE.len());
            if buf[..n] != PREAMBLE[..n] {
                return Err(TransportError::BadPreamble);
            }
            if n < PREAMBLE.len() {
                return Ok((None, 0));
            }
            self.expect_preamble = false;
            used = PREAMBLE.len();
        }
        match codec::decode_frame(&buf[used..], self.max_frame as usize)? {
            Some((frame, n)) => Ok((Some(frame), used + n)),
            None => Ok((None, used)),
        }
    }

    /// The buffers, allocated on first use.
    fn bufs(&mut self) -> &mut Buffers {
        self.bufs.get_or_insert_with(Box::default)
    }

    /// Bytes received that do not yet form a whole frame.
    fn partial_in(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.partial_in())
    }

    /// Gives back whatever is drained: a taken input buffer, a written output buffer,
    /// and the box once both are empty (idle again).
    fn compact(&mut self) {
        let Some(b) = self.bufs.as_mut() else { return };
        if b.inpos >= b.inbuf.len() {
            b.inbuf = Vec::new();
            b.inpos = 0;
        }
        if b.outpos >= b.out.len() {
            b.out = Vec::new();
            b.outpos = 0;
        }
        if b.inbuf.is_empty() && b.out.is_empty() {
            self.bufs = None;
        }
    }

    /// Takes the next frame out of the bytes held from earlier reads, if they hold one.
    fn take_held(&mut self) -> Result<Option<RawFrame>, TransportError> {
        let Some(mut b) = self.bufs.take() else {
            return Ok(None);
        };
        let result = self.take(&b.inbuf[b.inpos..]);
        let frame = match result {
            Ok((frame, used)) => {
                b.inpos += used;
                frame
            }
            Err(e) => {
                self.bufs = Some(b);
                return Err(e);
            }
        };
        self.bufs = Some(b);
        if frame.is_some() {
            self.compact();
        }
        Ok(frame)
    }

    /// Handles `n` fresh bytes in `scratch`: `Ok(None)` when they hold no whole frame.
    fn took(&mut self, scratch: &[u8]) -> Result<Option<Option<RawFrame>>, TransportError> {
        let n = scratch.len();
        if n == 0 {
            let partial = self.partial_in();
            return if partial == 0 && !self.expect_preamble {
                Ok(Some(None))
            } else if self.expect_preamble && partial == 0 {
                Err(TransportError::BadPreamble)
            } else {
                Err(TransportError::Truncated(partial))
            };
        }
        if self.partial_in() > 0 {
            // A partial frame is waiting: drop what was already taken, so the
            // buffer never holds more than one partial frame plus one read.
            let b = self.bufs();
            b.inbuf.drain(..b.inpos);
            b.inpos = 0;
            b.inbuf.extend_from_slice(scratch);
            return Ok(self.take_held()?.map(Some));
        }
        // Common case: parse straight out of the scratch buffer.
        let (frame, used) = self.take(scratch)?;
        if used < n {
            let b = self.bufs();
            b.inbuf = scratch[used..n].to_vec();
            b.inpos = 0;
        }
        Ok(frame.map(Some))
    }
}

impl<S: StreamIo> Transport for StreamTransport<S> {
    fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<RawFrame>, TransportError>> {
        // Frames already received come first.
        if self.partial_in() > 0
            && let Some(frame) = self.take_held()?
        {
            return Poll::Ready(Ok(Some(frame)));
        }
        loop {
            let step = SCRATCH.with(|scratch| {
                let mut scratch = scratch.borrow_mut();
                let mut buf = ReadBuf::new(&mut scratch[..]);
                match Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                    Poll::Pending => return Poll::Pending,
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(TransportError::Io(e))),
                    Poll::Ready(Ok(())) => {}
                }
                let n = buf.filled().len();
                Poll::Ready(self.took(&scratch[..n]))
            });
            if let Some(frame) = ready!(step)? {
                return Poll::Ready(Ok(frame));
            }
        }
    }

    fn set_max_frame(&mut self, limit: usize) {
        self.max_frame = limit.min(u32::MAX as usize) as u32;
    }

    fn send(&mut self, f: &Frame) -> Result<(), TransportError> {
        frame::encode_to(f, &mut self.bufs().out);
        Ok(())
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), TransportError>> {
        if let Some(b) = self.bufs.as_mut() {
            while b.outpos < b.out.len() {
                match ready!(Pin::new(&mut self.io).poll_write(cx, &b.out[b.outpos..])) {
                    Ok(0) => return Poll::Ready(Err(TransportError::Closed)),
                    Ok(n) => {
                        b.outpos += n;
                        self.unflushed = true;
                    }
                    Err(e) => return Poll::Ready(Err(e.into())),
                }
            }
            self.compact();
        }
        if self.unflushed {
            ready!(Pin::new(&mut self.io).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    fn queued_bytes(&self) -> usize {
        self.bufs.as_ref().map_or(0, |b| b.queued_out())
    }

    fn flush_pending(&self) -> bool {
        self.queued_bytes() > 0 || self.unflushed
    }

    fn shutdown(&mut self) {
        // Best effort, without waiting: TCP shuts its write side, TLS queues
        // close_notify and writes what it can, QUIC finishes the stream.
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let _ = Pin::new(&mut self.io).poll_shutdown(&mut cx);
    }

    fn kind(&self) -> TransportKind {
        self.io.kind()
    }

    fn peer(&self) -> String {
        self.io.peer()
    }

    fn tcp_snapshot(&self) -> Option<tether_core::diagnosis::TcpSnapshot> {
        self.io.tcp_snapshot()
    }

    fn rebind(&mut self) -> Option<io::Result<SocketAddr>> {
        self.io.rebind()
    }
}

/// Reads TCP_INFO of a socket (Linux).
#[cfg(target_os = "linux")]
pub(crate) fn tcp_info(stream: &TcpStream) -> Option<tether_core::diagnosis::TcpSnapshot> {
    use std::os::fd::AsRawFd;
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes, zero-initialised, and the kernel
    // writes at most `len` bytes of a `struct tcp_info` into it; the fd is a live socket
    // owned by `stream` for the duration of the call.
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: zero-initialised and (partly) filled by the kernel: every field is valid.
    let info = unsafe { info.assume_init() };
    Some(tether_core::diagnosis::TcpSnapshot {
        unacked: info.tcpi_unacked,
        retransmits: info.tcpi_retransmits,
        total_retrans: info.tcpi_total_retrans,
        last_ack_recv_ms: info.tcpi_last_ack_recv,
        rtt_us: info.tcpi_rtt,
    })
}

#[cfg(not(target_os = "linux"))]
pub(crate) fn tcp_info(_stream: &TcpStream) -> Option<tether_core::diagnosis::TcpSnapshot> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{flush, recv};
    use tether_proto::{DEFAULT_MAX_FRAME, pb};
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    async fn pair() -> (TcpTransport, TcpTransport) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpTransport::connect(addr, DEFAULT_MAX_FRAME);
        let (client, accepted) = tokio::join!(client, listener.accept());
        (
            client.unwrap(),
            TcpTransport::accepted(accepted.unwrap().0, 4096),
        )
    }

    #[tokio::test]
    async fn frames_cross_with_preamble_and_leave_no_idle_buffers() {
        let (mut c, mut s) = pair().await;
        for i in 0..100u64 {
            c.send(&Frame::Ack(pb::Ack { seq: i })).unwrap();
        }
        flush(&mut c).await.unwrap();
        assert!(c.bufs.is_none(), "nothing left to write: no buffers");
        for i in 0..100u64 {
            let raw = recv(&mut s).await.unwrap().unwrap();
            assert_eq!(
                frame::from_raw(&raw).unwrap(),
                Frame::Ack(pb::Ack { seq: i })
            );
        }
        assert!(s.bufs.is_none(), "idle server keeps no read buffer");
    }

    #[tokio::test]
    async fn a_stream_of_reads_ending_mid_frame_never_grows_the_buffer() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut s = TcpTransport::accepted(accepted, 4096);
        raw.write_all(&PREAMBLE).await.unwrap();
        // 2-byte frames written 3 bytes at a time: every read ends inside a frame.
        let wire: Vec<u8> = std::iter::repeat_n([1u8, 0x40], 30_000).flatten().collect();
        let writer = tokio::spawn(async move {
            for chunk in wire.chunks(3) {
                raw.write_all(chunk).await.unwrap();
            }
            raw
        });
        let mut largest = 0;
        for _ in 0..30_000 {
            assert!(recv(&mut s).await.unwrap().is_some());
            largest = largest.max(s.bufs.as_ref().map_or(0, |b| b.inbuf.len()));
        }
        drop(writer.await.unwrap());
        assert!(largest <= 64 * 1024 + 2, "buffer grew to {largest} bytes");
    }

    #[tokio::test]
    async fn tcp_info_shows_everything_acknowledged_on_a_quiet_healthy_link() {
        let (mut c, mut s) = pair().await;
        c.send(&Frame::Ping(pb::Ping::default())).unwrap();
        flush(&mut c).await.unwrap();
        recv(&mut s).await.unwrap().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        let snap = c.tcp_snapshot().expect("TCP_INFO on Linux");
        assert_eq!(snap.unacked, 0, "{snap:?}");
    }

    #[tokio::test]
    async fn wrong_preamble_fails_at_once() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut s = TcpTransport::accepted(accepted, 4096);
        raw.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        assert!(matches!(
            recv(&mut s).await,
            Err(TransportError::BadPreamble)
        ));
    }

    #[tokio::test]
    async fn oversized_length_fails_before_the_body_arrives() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut s = TcpTransport::accepted(accepted, 4096);
        let mut bytes = PREAMBLE.to_vec();
        prost_varint(1 << 20, &mut bytes);
        raw.write_all(&bytes).await.unwrap();
        assert!(matches!(
            recv(&mut s).await,
            Err(TransportError::Frame(
                tether_proto::FrameError::TooLarge { .. }
            ))
        ));
    }

    #[tokio::test]
    async fn eof_inside_a_frame_is_truncated() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut raw = TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await.unwrap();
        let mut s = TcpTransport::accepted(accepted, 4096);
        let mut bytes = PREAMBLE.to_vec();
        bytes.extend_from_slice(&[10, 5, 1, 2]);
        raw.write_all(&bytes).await.unwrap();
        raw.shutdown().await.unwrap();
        assert!(matches!(
            recv(&mut s).await,
            Err(TransportError::Truncated(4))
        ));
    }

    fn prost_varint(v: u64, out: &mut Vec<u8>) {
        let mut v = v;
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }
}
