//! Client connections whose writes wait one turn of the scheduler.
//!
//! HTTP/2 writes a connection's pending frames each time the connection task runs, and
//! the task runs as soon as one reply is ready: a group commit that answers a hundred
//! writes at once would leave in a hundred system calls. Waiting one turn, the connection
//! task lets the other replies of that group reach it first, and they leave together.
//! The wait is a single yield: a lone reply is delayed by one trip through the run queue.
//! The load generator's connections do the same with requests.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// A connection that yields once before each flush's first write.
pub struct Coalesced<T> {
    inner: T,
    /// This flush has already yielded: write now.
    yielded: bool,
}

impl<T> Coalesced<T> {
    pub fn new(inner: T) -> Self {
        Self { inner, yielded: false }
    }

    fn yield_once(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.yielded {
            return Poll::Ready(());
        }
        self.yielded = true;
        // Woken at once: the task goes to the back of the run queue, behind the tasks
        // whose replies are ready.
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.yield_once(cx));
        Pin::new(&mut me.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let me = self.get_mut();
        ready!(me.yield_once(cx));
        Pin::new(&mut me.inner).poll_write_vectored(cx, bufs)
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
}
