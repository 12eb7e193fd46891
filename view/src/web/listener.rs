//! The view's listener, bounded: connections in total and per client address, how long a
//! connection may send nothing, and how long a client may take to send one request. Without
//! bounds, idle TCP connections held the node's file descriptors until `/health` stopped
//! answering; and a client trickling a byte at a time would hold one for ever.
//!
//! With a certificate ([`BoundedListener::with_tls`]) every connection is HTTPS. The TLS
//! handshake is the connection's first reads and writes, under the same bounds, on the
//! connection's own task: accepting never waits for a client's handshake.

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
use tokio_rustls::TlsAcceptor;

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
    tls: Option<TlsAcceptor>,
}

impl BoundedListener {
    /// Plain HTTP.
    pub fn new(listener: TcpListener) -> BoundedListener {
        BoundedListener {
            listener,
            total: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
            per_address: Arc::default(),
            tls: None,
        }
    }

    /// HTTPS only, with `config` (see `tls::server_config`).
    pub fn with_tls(mut self, config: Arc<rustls::ServerConfig>) -> BoundedListener {
        self.tls = Some(TlsAcceptor::from(config));
        self
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

/// A connection to the view: plain, or TLS from its first byte.
pub enum ViewStream {
    Plain(BoundedStream),
    Handshaking(Box<tokio_rustls::Accept<BoundedStream>>),
    Tls(Box<tokio_rustls::server::TlsStream<BoundedStream>>),
    /// The handshake failed; the connection is closed.
    Failed,
}

impl ViewStream {
    /// Drives the TLS handshake, if one is under way, to its end.
    fn poll_handshake(&mut self, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let ViewStream::Handshaking(accepting) = self else {
            return Poll::Ready(Ok(()));
        };
        match Pin::new(accepting.as_mut()).poll(context) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(stream)) => {
                *self = ViewStream::Tls(Box::new(stream));
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(error)) => {
                // Plain HTTP sent to the HTTPS port, scanners, clients that distrust the
                // certificate: the client's own concern, so not a warning here.
                tracing::debug!(%error, "a view connection's TLS handshake failed");
                *self = ViewStream::Failed;
                Poll::Ready(Err(error))
            }
        }
    }

    fn failed() -> std::io::Error {
        std::io::Error::new(
            std::io::ErrorKind::NotConnected,
            "the connection's TLS handshake failed",
        )
    }
}

impl AsyncRead for ViewStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        buffer: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_handshake(context))?;
        match self.get_mut() {
            ViewStream::Plain(stream) => Pin::new(stream).poll_read(context, buffer),
            ViewStream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(context, buffer),
            ViewStream::Handshaking(_) | ViewStream::Failed => Poll::Ready(Err(Self::failed())),
        }
    }
}

impl AsyncWrite for ViewStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        std::task::ready!(self.poll_handshake(context))?;
        match self.get_mut() {
            ViewStream::Plain(stream) => Pin::new(stream).poll_write(context, data),
            ViewStream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(context, data),
            ViewStream::Handshaking(_) | ViewStream::Failed => Poll::Ready(Err(Self::failed())),
        }
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<std::io::Result<()>> {
        std::task::ready!(self.poll_handshake(context))?;
        match self.get_mut() {
            ViewStream::Plain(stream) => Pin::new(stream).poll_flush(context),
            ViewStream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(context),
            ViewStream::Handshaking(_) | ViewStream::Failed => Poll::Ready(Err(Self::failed())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            ViewStream::Plain(stream) => Pin::new(stream).poll_shutdown(context),
            ViewStream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(context),
            ViewStream::Handshaking(_) | ViewStream::Failed => Poll::Ready(Ok(())),
        }
    }
}

impl axum::serve::Listener for BoundedListener {
    type Io = ViewStream;
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
            let stream = match &self.tls {
                None => ViewStream::Plain(stream),
                Some(acceptor) => ViewStream::Handshaking(Box::new(acceptor.accept(stream))),
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
