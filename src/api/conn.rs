//! Client connections whose writes wait one turn of the scheduler.
//!
//! HTTP/2 writes a connection's pending frames each time the connection task runs, and
//! the task runs as soon as one reply is ready: a group commit that answers a hundred
//! writes at once would leave in a hundred system calls. Waiting one turn, the connection
//! task lets the other replies of that group reach it first, and they leave together.
//! The wait is a single yield: a lone reply is delayed by one trip through the run queue.
//! The load generator's connections do the same with requests.
//!
//! On the server the yield is taken only while the connection has other requests still
//! unanswered, whose replies could join the write. A lone client's reply has none to
//! wait for, and on a multi-threaded runtime the yield would cost more than a trip: a
//! task that wakes itself is queued where another worker can take it, tokio wakes an
//! idle worker to do so, and the reply waits for another CPU to wake up (tens of
//! microseconds on a virtual machine) to be written from there. The connection learns
//! which requests are open from the HTTP/2 frame headers that pass through it: a
//! HEADERS frame on a new client stream opens one; the server's frame that ends the
//! stream (END_STREAM) or a reset from either side closes it.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// What every HTTP/2 client sends first, before its frames.
const PREFACE_BYTES: usize = 24;
const FRAME_HEADER_BYTES: usize = 9;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const END_STREAM: u8 = 0x1;
/// Open requests tracked at most, so that a peer cannot grow the list without bound.
/// Past it none is added: the connection then yields less often, which costs only the
/// gathering of replies.
const MAX_OPEN: usize = 4096;

/// A frame's header: its payload's length, type, flags and stream.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Frame {
    len: usize,
    kind: u8,
    flags: u8,
    stream: u32,
}

impl Frame {
    fn parse(h: &[u8; FRAME_HEADER_BYTES]) -> Frame {
        Frame {
            len: (h[0] as usize) << 16 | (h[1] as usize) << 8 | h[2] as usize,
            kind: h[3],
            flags: h[4],
            stream: u32::from_be_bytes([h[5], h[6], h[7], h[8]]) & 0x7fff_ffff,
        }
    }

    /// Sent by the server, this frame ends its stream.
    fn ends_stream(&self) -> bool {
        ((self.kind == HEADERS || self.kind == DATA) && self.flags & END_STREAM != 0) || self.kind == RST_STREAM
    }
}

/// A position in a byte stream of frames, fed as the bytes pass.
#[derive(Clone, Copy, Debug, Default)]
struct Frames {
    /// Bytes to pass over before the first frame (the client's preface).
    skip: usize,
    head: [u8; FRAME_HEADER_BYTES],
    /// Bytes of `head` gathered.
    have: usize,
}

impl Frames {
    /// Passes `bytes`, calling `frame` with each header completed in them.
    fn feed(&mut self, mut bytes: &[u8], mut frame: impl FnMut(Frame)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER_BYTES - self.have).min(bytes.len());
            self.head[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME_HEADER_BYTES {
                let f = Frame::parse(&self.head);
                self.have = 0;
                self.skip = f.len;
                frame(f);
            }
        }
    }
}

/// A server connection's requests not yet answered, as its frames show them.
#[derive(Debug)]
struct Requests {
    read: Frames,
    written: Frames,
    /// Client streams opened and not yet ended by the server or reset.
    open: Vec<u32>,
    last_opened: u32,
}

impl Requests {
    fn new() -> Self {
        Requests {
            read: Frames { skip: PREFACE_BYTES, ..Frames::default() },
            written: Frames::default(),
            open: Vec::new(),
            last_opened: 0,
        }
    }

    fn close(open: &mut Vec<u32>, stream: u32) {
        if let Some(i) = open.iter().position(|&s| s == stream) {
            open.swap_remove(i);
        }
    }

    fn on_read(&mut self, bytes: &[u8]) {
        let (open, last) = (&mut self.open, &mut self.last_opened);
        self.read.feed(bytes, |f| match f.kind {
            HEADERS if f.stream > *last && f.stream % 2 == 1 => {
                *last = f.stream;
                if open.len() < MAX_OPEN {
                    open.push(f.stream);
                }
            }
            RST_STREAM => Self::close(open, f.stream),
            _ => {}
        });
    }

    /// Passes `bytes` the server wrote from `written`, calling `ended` with each stream
    /// a frame in them ends.
    fn answers(written: &mut Frames, bytes: &[u8], mut ended: impl FnMut(u32)) {
        written.feed(bytes, |f| {
            if f.ends_stream() {
                ended(f.stream);
            }
        });
    }

    fn on_written(&mut self, bytes: &[u8]) {
        let open = &mut self.open;
        Self::answers(&mut self.written, bytes, |s| Self::close(open, s));
    }

    /// Whether requests other than those `bytes` answer are still open.
    fn others_open(&self, bytes: &[u8]) -> bool {
        let mut answered = 0;
        Self::answers(&mut self.written.clone(), bytes, |s| answered += usize::from(self.open.contains(&s)));
        self.open.len() > answered
    }
}

/// A connection that yields once before each flush's first write.
pub struct Coalesced<T> {
    inner: T,
    /// This flush has already yielded: write now.
    yielded: bool,
    /// On a server: its open requests; yields only while others than the ones a write
    /// answers are open.
    requests: Option<Requests>,
}

impl<T> Coalesced<T> {
    /// Yields before every flush.
    pub fn new(inner: T) -> Self {
        Self { inner, yielded: false, requests: None }
    }

    /// A server's connection: yields before a flush only while other requests than the
    /// ones it answers are open.
    pub fn serving(inner: T) -> Self {
        Self { inner, yielded: false, requests: Some(Requests::new()) }
    }

    fn yield_once(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        if self.requests.as_ref().is_some_and(|r| !r.others_open(buf)) {
            return Poll::Ready(());
        }
        // Woken at once: the task goes to the back of the run queue, behind the tasks
        // whose replies are ready.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        ready!(Pin::new(&mut me.inner).poll_read(cx, buf))?;
        if let Some(r) = &mut me.requests {
            r.on_read(&buf.filled()[before..]);
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.yield_once(cx, buf));
        let n = ready!(Pin::new(&mut me.inner).poll_write(cx, buf))?;
        if let Some(r) = &mut me.requests {
            r.on_written(&buf[..n.min(buf.len())]);
        }
        Poll::Ready(Ok(n))
    }

    /// The first buffer that is not empty, as a writer that cannot write vectored does.
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let buf = bufs.iter().find(|b| !b.is_empty()).map_or(&[][..], |b| &**b);
        self.poll_write(cx, buf)
    }

    /// No, whatever the socket can do. h2 copies a frame's payload into its write buffer
    /// up to 256 bytes when the connection writes vectored, and 1 KiB when it does not;
    /// a larger payload is kept aside and must be written before the next frame is
    /// buffered. With vectored writes, every request or reply carrying a few hundred bytes
    /// (a put of a 256-byte value, a range that returns one) would leave in a system call
    /// of its own, however many were ready together.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        // Everything buffered was written: the next write starts a new flush.
        me.yielded = false;
        Pin::new(&mut me.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Coalesced<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::Wake;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn a_write_yields_once_then_goes_through_and_a_flush_starts_over() {
        let (a, mut b) = tokio::io::duplex(1024);
        let mut c = Coalesced::new(a);
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);

        assert!(Pin::new(&mut c).poll_write(&mut cx, b"one").is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1, "the yield wakes the task at once");
        assert!(matches!(Pin::new(&mut c).poll_write(&mut cx, b"one"), Poll::Ready(Ok(3))));
        assert!(matches!(Pin::new(&mut c).poll_write(&mut cx, b"two"), Poll::Ready(Ok(3))));
        assert!(matches!(Pin::new(&mut c).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert!(Pin::new(&mut c).poll_write(&mut cx, b"three").is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);

        // Through the async helpers, as a real writer uses it.
        c.write_all(b"three").await.unwrap();
        c.flush().await.unwrap();
        let mut got = [0u8; 11];
        b.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"onetwothree");
        b.write_all(b"back").await.unwrap();
        let mut back = [0u8; 4];
        c.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"back");
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: usize) -> Vec<u8> {
        let mut f = vec![(payload >> 16) as u8, (payload >> 8) as u8, payload as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend(std::iter::repeat_n(0xAB, payload));
        f
    }

    const SETTINGS: u8 = 0x4;

    /// What a client sends for one unary call on `stream`: headers, then its message.
    fn call(stream: u32) -> Vec<u8> {
        [frame(HEADERS, 0x4, stream, 40), frame(DATA, END_STREAM, stream, 300)].concat()
    }

    /// The server's answer on `stream`: headers, the message, trailers that end it.
    fn answer(stream: u32) -> Vec<u8> {
        [frame(HEADERS, 0x4, stream, 20), frame(DATA, 0, stream, 200), frame(HEADERS, 0x5, stream, 30)].concat()
    }

    fn opening() -> Vec<u8> {
        [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec(), frame(SETTINGS, 0, 0, 18)].concat()
    }

    #[test]
    fn requests_open_with_the_clients_headers_and_close_with_the_answer_that_ends_them() {
        let mut r = Requests::new();
        r.on_read(&[opening(), call(1)].concat());
        assert_eq!(r.open, vec![1]);
        assert!(!r.others_open(&answer(1)), "the only request is the one answered");
        r.on_read(&call(3));
        assert!(r.others_open(&answer(1)), "3 waits for its answer");
        assert!(!r.others_open(&[answer(1), answer(3)].concat()));
        r.on_written(&answer(1));
        assert_eq!(r.open, vec![3]);
        // The client's trailers or a stream it already opened open nothing.
        r.on_read(&frame(HEADERS, 0x5, 1, 10));
        assert_eq!(r.open, vec![3]);
        // A reset from the client closes its stream.
        r.on_read(&[call(5), frame(RST_STREAM, 0, 3, 4)].concat());
        assert_eq!(r.open, vec![5]);
        // So does one from the server.
        assert!(!r.others_open(&frame(RST_STREAM, 0, 5, 4)));
        r.on_written(&frame(RST_STREAM, 0, 5, 4));
        assert!(r.open.is_empty());
    }

    #[test]
    fn frames_are_followed_whatever_pieces_the_bytes_come_in() {
        let read = [opening(), call(1), call(3), frame(DATA, 0, 3, 70_000), call(5)].concat();
        let written = [answer(3), frame(DATA, 0, 1, 70_000), answer(1)].concat();
        for piece in [1, 2, 7, 9, 10, 100, 4096] {
            let mut r = Requests::new();
            read.chunks(piece).for_each(|c| r.on_read(c));
            assert_eq!(r.open, vec![1, 3, 5], "read in pieces of {piece}");
            let mut chunks = written.chunks(piece);
            // Before each write, what is left of the answers is looked at from where the
            // last write stopped, inside a frame or not.
            while let Some(c) = chunks.next() {
                let rest: Vec<u8> = std::iter::once(c).chain(chunks.clone()).flatten().copied().collect();
                assert!(r.others_open(&rest), "5 is never answered");
                r.on_written(c);
            }
            assert_eq!(r.open, vec![5], "written in pieces of {piece}");
        }
    }

    #[tokio::test]
    async fn a_server_connection_yields_only_while_other_requests_are_open() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut c = Coalesced::serving(a);
        let wakes = Arc::new(Count(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(wakes.clone());
        let mut cx = Context::from_waker(&waker);

        b.write_all(&[opening(), call(1)].concat()).await.unwrap();
        let mut got = vec![0u8; opening().len() + call(1).len()];
        c.read_exact(&mut got).await.unwrap();
        let one = answer(1);
        assert!(
            matches!(Pin::new(&mut c).poll_write(&mut cx, &one), Poll::Ready(Ok(n)) if n == one.len()),
            "a lone answer is written at once"
        );
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        assert!(matches!(Pin::new(&mut c).poll_flush(&mut cx), Poll::Ready(Ok(()))));

        b.write_all(&[call(3), call(5)].concat()).await.unwrap();
        let mut got = vec![0u8; 2 * call(3).len()];
        c.read_exact(&mut got).await.unwrap();
        let three = answer(3);
        assert!(Pin::new(&mut c).poll_write(&mut cx, &three).is_pending(), "5 may join it");
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        let both = [answer(3), answer(5)].concat();
        assert!(matches!(Pin::new(&mut c).poll_write(&mut cx, &both), Poll::Ready(Ok(n)) if n == both.len()));
        assert!(matches!(Pin::new(&mut c).poll_flush(&mut cx), Poll::Ready(Ok(()))));
        assert!(c.requests.as_ref().unwrap().open.is_empty());

        let mut out = vec![0u8; one.len() + both.len()];
        b.read_exact(&mut out).await.unwrap();
        assert_eq!(out, [one, both].concat());
    }
}
