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
//!
//! A stream the client still sends on (a watch, a lease's keep-alives) is not waiting
//! for one answer: its replies come when something happens, perhaps long after. Replies
//! to requests the client has sent whole (END_STREAM from the client) wait only for
//! other such requests, so that a client's lone put is not held back by the watch it
//! keeps on the same connection, as etcd's clients do. A write that carries a streamed
//! reply (watch events) still waits for every other open stream: events fan out to many
//! streams at once, and those of the others may join it.

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

/// A client stream opened and not yet ended by the server or reset.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Open {
    stream: u32,
    /// The client has sent all of its request (END_STREAM).
    whole: bool,
}

/// A server connection's requests not yet answered, as its frames show them.
#[derive(Debug)]
struct Requests {
    read: Frames,
    written: Frames,
    open: Vec<Open>,
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

    fn find(&self, stream: u32) -> Option<&Open> {
        self.open.iter().find(|o| o.stream == stream)
    }

    fn close(open: &mut Vec<Open>, stream: u32) {
        if let Some(i) = open.iter().position(|o| o.stream == stream) {
            open.swap_remove(i);
        }
    }

    fn on_read(&mut self, bytes: &[u8]) {
        let (open, last) = (&mut self.open, &mut self.last_opened);
        self.read.feed(bytes, |f| {
            let ends = f.flags & END_STREAM != 0;
            match f.kind {
                HEADERS if f.stream > *last && f.stream % 2 == 1 => {
                    *last = f.stream;
                    if open.len() < MAX_OPEN {
                        open.push(Open { stream: f.stream, whole: ends });
                    }
                }
                HEADERS | DATA if ends => {
                    if let Some(o) = open.iter_mut().find(|o| o.stream == f.stream) {
                        o.whole = true;
                    }
                }
                RST_STREAM => Self::close(open, f.stream),
                _ => {}
            }
        });
    }

    fn on_written(&mut self, bytes: &[u8]) {
        let open = &mut self.open;
        self.written.feed(bytes, |f| {
            if f.ends_stream() {
                Self::close(open, f.stream);
            }
        });
    }

    /// Whether requests other than those `bytes` answer are still open whose replies
    /// could join them: when `bytes` carry part of a streamed reply, any open stream;
    /// otherwise requests the client has sent whole.
    fn others_open(&self, bytes: &[u8]) -> bool {
        let (mut streamed, mut answered, mut answered_whole) = (false, 0, 0);
        self.written.clone().feed(bytes, |f| {
            let open = self.find(f.stream);
            streamed |= open.is_some_and(|o| !o.whole);
            if f.ends_stream() {
                answered += usize::from(open.is_some());
                answered_whole += usize::from(open.is_some_and(|o| o.whole));
            }
        });
        if streamed {
            self.open.len() > answered
        } else {
            self.open.iter().filter(|o| o.whole).count() > answered_whole
        }
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

    /// A streaming call the client keeps sending on (a watch): headers and a first
    /// message, no END_STREAM.
    fn stream(stream: u32) -> Vec<u8> {
        [frame(HEADERS, 0x4, stream, 40), frame(DATA, 0, stream, 30)].concat()
    }

    /// Events on a streaming call: a message that does not end it.
    fn events(stream: u32) -> Vec<u8> {
        frame(DATA, 0, stream, 120)
    }

    impl Requests {
        fn streams(&self) -> Vec<u32> {
            self.open.iter().map(|o| o.stream).collect()
        }
    }

    #[test]
    fn requests_open_with_the_clients_headers_and_close_with_the_answer_that_ends_them() {
        let mut r = Requests::new();
        r.on_read(&[opening(), call(1)].concat());
        assert_eq!(r.streams(), vec![1]);
        assert!(!r.others_open(&answer(1)), "the only request is the one answered");
        r.on_read(&call(3));
        assert!(r.others_open(&answer(1)), "3 waits for its answer");
        assert!(!r.others_open(&[answer(1), answer(3)].concat()));
        r.on_written(&answer(1));
        assert_eq!(r.streams(), vec![3]);
        // The client's trailers or a stream it already opened open nothing.
        r.on_read(&frame(HEADERS, 0x5, 1, 10));
        assert_eq!(r.streams(), vec![3]);
        // A reset from the client closes its stream.
        r.on_read(&[call(5), frame(RST_STREAM, 0, 3, 4)].concat());
        assert_eq!(r.streams(), vec![5]);
        // So does one from the server.
        assert!(!r.others_open(&frame(RST_STREAM, 0, 5, 4)));
        r.on_written(&frame(RST_STREAM, 0, 5, 4));
        assert!(r.open.is_empty());
    }

    #[test]
    fn an_answer_waits_for_requests_sent_whole_and_events_for_any_open_stream() {
        let mut r = Requests::new();
        r.on_read(&[opening(), stream(1), call(3)].concat());
        assert_eq!(r.streams(), vec![1, 3]);
        assert!(!r.others_open(&answer(3)), "the watch on 1 has no answer coming that could join 3's");
        r.on_read(&call(5));
        assert!(r.others_open(&answer(3)), "5 was sent whole: its answer is on its way");
        assert!(!r.others_open(&[answer(3), answer(5)].concat()));
        r.on_written(&[answer(3), answer(5)].concat());
        assert_eq!(r.streams(), vec![1]);

        // Events fan out to every watch stream at once: a write of them waits for the
        // other open streams, whose events may join it.
        r.on_read(&stream(7));
        assert!(!r.others_open(&answer(9)), "two watches and nothing else: an answer goes at once");
        assert!(r.others_open(&events(1)), "7's events may join 1's");
        // A stream the client ends later (a request sent in parts) waits for its answer.
        r.on_read(&frame(DATA, END_STREAM, 7, 10));
        assert_eq!(r.open.iter().filter(|o| o.whole).map(|o| o.stream).collect::<Vec<_>>(), vec![7]);
        assert!(r.others_open(&answer(9)), "7 is sent whole now");
        assert!(!r.others_open(&answer(7)));
    }

    #[test]
    fn frames_are_followed_whatever_pieces_the_bytes_come_in() {
        let read = [opening(), call(1), call(3), frame(DATA, 0, 3, 70_000), call(5)].concat();
        let written = [answer(3), frame(DATA, 0, 1, 70_000), answer(1)].concat();
        for piece in [1, 2, 7, 9, 10, 100, 4096] {
            let mut r = Requests::new();
            read.chunks(piece).for_each(|c| r.on_read(c));
            assert_eq!(r.streams(), vec![1, 3, 5], "read in pieces of {piece}");
            let mut chunks = written.chunks(piece);
            // Before each write, what is left of the answers is looked at from where the
            // last write stopped, inside a frame or not.
            while let Some(c) = chunks.next() {
                let rest: Vec<u8> = std::iter::once(c).chain(chunks.clone()).flatten().copied().collect();
                assert!(r.others_open(&rest), "5 is never answered");
                r.on_written(c);
            }
            assert_eq!(r.streams(), vec![5], "written in pieces of {piece}");
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
