//! Accepted connections must be answered in time. Until the server writes the first byte of its
//! first response (the 101 of a WebSocket upgrade, a refusal, a REST reply), a connection has a
//! deadline: one that sends no complete request by then (nothing at all, or a request dribbled
//! byte by byte) is closed. Without it such connections were held for ever, each an open file,
//! and nothing bounded how many.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::serve::Listener;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Sleep;

/// Wraps a listener so that each connection gets `deadline` to be answered (see the module).
pub struct Answered<L> {
    inner: L,
    deadline: Option<Duration>,
}

impl<L> Answered<L> {
    /// `None` turns the deadline off.
    pub fn new(inner: L, deadline: Option<Duration>) -> Self {
        Self { inner, deadline }
    }
}

impl<L> Listener for Answered<L>
where
    L: Listener<Io = TcpStream>,
{
    type Io = Connection;
    type Addr = L::Addr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = self.inner.accept().await;
        let deadline = self.deadline.map(|d| Box::pin(tokio::time::sleep(d)));
        (Connection { io, deadline }, addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.inner.local_addr()
    }
}

/// An accepted connection; its deadline is dropped with the first byte written to it.
pub struct Connection {
    io: TcpStream,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Connection {
    fn wrote(&mut self, n: usize) {
        if n > 0 {
            self.deadline = None;
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if read.is_pending() {
            if let Some(deadline) = this.deadline.as_mut() {
                if deadline.as_mut().poll(cx).is_ready() {
                    this.deadline = None;
                    tracing::debug!(
                        "connection closed: no request answered within HTTP_REQUEST_TIMEOUT_MS"
                    );
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "no complete request within HTTP_REQUEST_TIMEOUT_MS",
                    )));
                }
            }
        }
        read
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            this.wrote(n);
        }
        written
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = written {
            this.wrote(n);
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
