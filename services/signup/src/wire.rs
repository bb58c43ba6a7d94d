//! The connection to the relay, which can hold a message back. A [`Gate`] sits on the TCP
//! stream, under the TLS layer (if any) and lettre; once told to [`hold`](GateHandle::hold), it
//! keeps what is written instead of sending it, until the writer waits for the relay's answer.
//! The `mail` stage then starts committing its decision to send and
//! [`release`](GateHandle::release)s the message in the same poll: the COMMIT and the whole
//! message, final dot included, leave in two writes with nothing between them, whatever the
//! message's size or the TLS records it makes.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use lettre::transport::smtp::client::AsyncTokioStream;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

#[derive(Debug, Default)]
struct State {
    mode: Mode,
    /// What was written while holding.
    held: Vec<u8>,
    /// How much of `held` went out since the release.
    sent: usize,
    /// The writer is waiting for an answer to what is held.
    stalled: bool,
    /// The reader to wake on release.
    waker: Option<Waker>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Mode {
    #[default]
    Open,
    Hold,
    Release,
}

/// The stage's side of a [`Gate`].
#[derive(Clone, Debug, Default)]
pub struct GateHandle(Arc<Mutex<State>>);

impl GateHandle {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keep everything written from now on.
    pub fn hold(&self) {
        let mut s = self.lock();
        s.mode = Mode::Hold;
        s.stalled = false;
    }

    /// Whether the writer wrote all it had and now waits for the relay's answer.
    pub fn stalled(&self) -> bool {
        let s = self.lock();
        s.mode == Mode::Hold && s.stalled
    }

    /// How many bytes are held.
    pub fn held(&self) -> usize {
        self.lock().held.len()
    }

    /// Send what is held at the writer's next poll, then pass everything through again.
    pub fn release(&self) {
        let mut s = self.lock();
        if s.mode == Mode::Hold {
            s.mode = Mode::Release;
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
    }
}

/// A stream that passes through, except while its [`GateHandle`] holds.
#[derive(Debug)]
pub struct Gate<S> {
    inner: S,
    handle: GateHandle,
}

impl<S> Gate<S> {
    pub fn new(inner: S) -> (Self, GateHandle) {
        let handle = GateHandle::default();
        (
            Self {
                inner,
                handle: handle.clone(),
            },
            handle,
        )
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> Gate<S> {
    /// Ready once nothing is held back: sends what a release let go. Pending while holding.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let handle = self.handle.clone();
        let mut s = handle.lock();
        match s.mode {
            Mode::Open => Poll::Ready(Ok(())),
            Mode::Hold => {
                s.stalled = true;
                s.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            Mode::Release => {
                while s.sent < s.held.len() {
                    let from = s.sent;
                    let n = match Pin::new(&mut self.inner).poll_write(cx, &s.held[from..]) {
                        Poll::Ready(Ok(0)) => {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        Poll::Ready(Ok(n)) => n,
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => return Poll::Pending,
                    };
                    s.sent += n;
                }
                std::task::ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
                s.held.clear();
                s.sent = 0;
                s.stalled = false;
                s.mode = Mode::Open;
                Poll::Ready(Ok(()))
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Gate<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A reader waits for the answer to what was written: what is held must go first.
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gate<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        {
            let mut s = this.handle.lock();
            if s.mode == Mode::Hold {
                s.held.extend_from_slice(buf);
                return Poll::Ready(Ok(buf.len()));
            }
        }
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.handle.lock().mode == Mode::Hold {
            // Held bytes count as written; they leave on release.
            return Poll::Ready(Ok(()));
        }
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Closing while holding drops what is held: the relay never sees the message's end.
        if this.handle.lock().mode == Mode::Hold {
            return Pin::new(&mut this.inner).poll_shutdown(cx);
        }
        std::task::ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// What lettre talks over: TCP under a [`Gate`], with TLS from the first byte above it when
/// `mail.tls = "tls"` (STARTTLS is lettre's own upgrade of a plain one).
#[derive(Debug)]
pub enum Wire {
    Plain(Gate<TcpStream>),
    Tls(Box<TlsStream<Gate<TcpStream>>>),
}

impl Wire {
    /// A TCP connection to `host:port` with Nagle's algorithm off (the message leaves in one
    /// write that must not wait for an acknowledgement), and TLS over it when `tls` is given.
    pub async fn connect(
        host: &str,
        port: u16,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> io::Result<(Self, GateHandle)> {
        let tcp = TcpStream::connect((host, port)).await?;
        tcp.set_nodelay(true)?;
        let (gate, handle) = Gate::new(tcp);
        let wire = match tls {
            None => Wire::Plain(gate),
            Some(config) => {
                let name = ServerName::try_from(host.to_owned())
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
                let tls = tokio_rustls::TlsConnector::from(config)
                    .connect(name, gate)
                    .await?;
                Wire::Tls(Box::new(tls))
            }
        };
        Ok((wire, handle))
    }
}

impl AsyncTokioStream for Wire {
    fn peer_addr(&self) -> io::Result<SocketAddr> {
        match self {
            Wire::Plain(g) => g.get_ref().peer_addr(),
            Wire::Tls(t) => t.get_ref().0.get_ref().peer_addr(),
        }
    }
}

impl AsyncRead for Wire {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Wire::Plain(g) => Pin::new(g).poll_read(cx, buf),
            Wire::Tls(t) => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Wire::Plain(g) => Pin::new(g).poll_write(cx, buf),
            Wire::Tls(t) => Pin::new(t.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Wire::Plain(g) => Pin::new(g).poll_flush(cx),
            Wire::Tls(t) => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Wire::Plain(g) => Pin::new(g).poll_shutdown(cx),
            Wire::Tls(t) => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// The certificates in PEM file `path` (`mail.ca_file`): roots trusted for the relay besides
/// the system's.
pub fn read_ca_file(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("mail.ca_file {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "mail.ca_file {}: no PEM certificate in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// A TLS client configuration trusting the system's roots and `extra`.
pub fn tls_config(extra: &[CertificateDer<'static>]) -> Result<rustls::ClientConfig, String> {
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    for cert in extra {
        roots
            .add(cert.clone())
            .map_err(|e| format!("mail.ca_file: {e}"))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn holds_writes_until_released_then_sends_them_before_reading() {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let (mut gate, handle) = Gate::new(near);
        gate.write_all(b"DATA\r\n").await.unwrap();
        let mut got = [0u8; 6];
        far.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"DATA\r\n");

        handle.hold();
        gate.write_all(b"body").await.unwrap();
        gate.flush().await.unwrap();
        gate.write_all(b"\r\n.\r\n").await.unwrap();
        gate.flush().await.unwrap();
        assert_eq!(handle.held(), 9);
        assert!(!handle.stalled(), "the writer has not waited yet");
        far.write_all(b"250 OK\r\n").await.unwrap();

        // The writer waits for the answer: it stalls, and nothing reached the far end.
        let mut answer = vec![0u8; 8];
        let mut read = Box::pin(gate.read_exact(&mut answer));
        assert!(futures_poll_once(read.as_mut()).await.is_none());
        assert!(handle.stalled());
        let mut probe = [0u8; 1];
        assert!(
            tokio::time::timeout(std::time::Duration::ZERO, far.read(&mut probe))
                .await
                .is_err(),
            "held bytes must not leave before the release"
        );

        handle.release();
        read.await.unwrap();
        assert_eq!(&answer, b"250 OK\r\n");
        let mut sent = [0u8; 9];
        far.read_exact(&mut sent).await.unwrap();
        assert_eq!(&sent, b"body\r\n.\r\n");
        assert_eq!(handle.held(), 0);

        // Open again: writes pass straight through.
        gate.write_all(b"QUIT\r\n").await.unwrap();
        let mut quit = [0u8; 6];
        far.read_exact(&mut quit).await.unwrap();
        assert_eq!(&quit, b"QUIT\r\n");
    }

    #[tokio::test]
    async fn closing_while_holding_sends_nothing_held() {
        let (near, mut far) = tokio::io::duplex(1 << 16);
        let (mut gate, handle) = Gate::new(near);
        handle.hold();
        gate.write_all(b"body\r\n.\r\n").await.unwrap();
        gate.shutdown().await.unwrap();
        drop(gate);
        let mut rest = Vec::new();
        far.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty(), "{rest:?}");
    }

    /// Polls `f` once: its output if it was ready.
    async fn futures_poll_once<F: Future + Unpin>(mut f: F) -> Option<F::Output> {
        std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut f).poll(cx) {
                Poll::Ready(v) => Some(v),
                Poll::Pending => None,
            })
        })
        .await
    }
}
