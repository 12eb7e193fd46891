//! The view's listener, bounded: connections in total and per client address, how long a
//! connection may send nothing, and how long a client may take to send one request. Without
//! bounds, idle TCP connections held the node's file descriptors until `/health` stopped
//! answering; and a client trickling a byte at a time would hold one for ever.

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{Instant, Sleep};

/// Connections open at once, from everyone.
pub const MAX_CONNECTIONS: usize = 256;
/// Connections open at once from one address (a clinical system's proxy may carry many
/// users, so this is not one).
pub const MAX_PER_ADDRESS: usize = 64;
/// How long a connection may send nothing (a request's headers, or the next request on a
/// kept-alive connection) before it is closed.
pub const IDLE: Duration = Duration::from_secs(30);
/// How long a client may take from the first byte of a request until the node answers: the
/// view's requests are headers and a small form, sent at once by any real client.
pub const REQUEST_TIME: Duration = Duration::from_secs(20);

pub struct BoundedListener {
    listener: TcpListener,
    total: Arc<Semaphore>,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl BoundedListener {
    pub fn new(listener: TcpListener) -> BoundedListener {
        BoundedListener {
            listener,
            total: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            per_address: Arc::default(),
        }
    }
}

/// A connection's hold on the bounds, given back when the connection is dropped.
struct Held {
    _permit: OwnedSemaphorePermit,
    address: IpAddr,
    per_address: Arc<Mutex<HashMap<IpAddr, usize>>>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self
            .per_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(count) = counts.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                counts.remove(&self.address);
            }
        }
    }
}

/// A client connection that is closed when it sends nothing for [`IDLE`].
pub struct BoundedStream {
    stream: TcpStream,
    /// Fires at the first of: [`IDLE`] after the last byte either way, or the request's
    /// deadline.
    idle: Pin<Box<Sleep>>,
    /// When the request being received must be answered by: set by its first byte, cleared
    /// when the answer starts.
    request_deadline: Option<Instant>,
    _held: Held,
}

impl axum::serve::Listener for BoundedListener {
    type Io = BoundedStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            // Wait for room before accepting: the backlog, not our descriptors, holds the rest.
            let permit = self
                .total
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let (stream, address) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accepting a view connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let ip = address.ip();
            {
                let mut counts = self
                    .per_address
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let count = counts.entry(ip).or_default();
                if *count >= MAX_PER_ADDRESS {
                    tracing::warn!(
                        "a client address holds too many view connections; closing a new one"
                    );
                    continue; // dropped: closed at once, the permit returned
                }
                *count += 1;
            }
            let _ = stream.set_nodelay(true);
            let held = Held {
                _permit: permit,
                address: ip,
                per_address: self.per_address.clone(),
            };
            let stream = BoundedStream {
                stream,
                idle: Box::pin(tokio::time::sleep(IDLE)),
                request_deadline: None,
                _held: held,
            };
            return (stream, address);
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

impl AsyncRead for BoundedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buffer.filled().len();
        match Pin::new(&mut self.stream).poll_read(context, buffer) {
            Poll::Ready(result) => {
                if buffer.filled().len() > before {
                    let now = Instant::now();
                    let deadline = *self.request_deadline.get_or_insert(now + REQUEST_TIME);
                    self.idle.as_mut().reset((now + IDLE).min(deadline));
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.idle.as_mut().poll(context) {
                Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    if self.request_deadline.is_some() {
                        "the client took too long to send its request"
                    } else {
                        "the client sent nothing for too long"
                    },
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for BoundedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        // A response being sent is activity (the client is reading it), and the end of the
        // request it answers.
        self.request_deadline = None;
        self.idle.as_mut().reset(Instant::now() + IDLE);
        Pin::new(&mut self.stream).poll_write(context, data)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(context)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(context)
    }
}
