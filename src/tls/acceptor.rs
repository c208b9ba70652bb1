//! One seam for both TLS libraries: a listener's acceptor, and the stream
//! a handshake gives the session, whichever library made it.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use openssl::ssl::{Ssl, SslAcceptor};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_openssl::SslStream;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

/// A listener's TLS: rustls (`modern`) or OpenSSL (`legacy`).
#[derive(Clone)]
pub enum Acceptor {
    Modern(TlsAcceptor),
    Legacy(SslAcceptor),
}

impl Acceptor {
    /// The server side of a TLS handshake over `stream`.
    pub async fn accept<S>(&self, stream: S) -> io::Result<InboundTls<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        match self {
            Acceptor::Modern(acceptor) => {
                Ok(InboundTls::Modern(Box::new(acceptor.accept(stream).await?)))
            }
            Acceptor::Legacy(acceptor) => {
                let ssl = Ssl::new(acceptor.context()).map_err(io::Error::other)?;
                let mut tls = SslStream::new(ssl, stream).map_err(io::Error::other)?;
                Pin::new(&mut tls)
                    .accept()
                    .await
                    .map_err(io::Error::other)?;
                Ok(InboundTls::Legacy(tls))
            }
        }
    }
}

/// A client's connection after the handshake.
pub enum InboundTls<S> {
    /// Boxed: rustls keeps its buffers inline, OpenSSL's are on its heap.
    Modern(Box<TlsStream<S>>),
    Legacy(SslStream<S>),
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for InboundTls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            InboundTls::Modern(tls) => Pin::new(tls).poll_read(cx, buf),
            InboundTls::Legacy(tls) => Pin::new(tls).poll_read(cx, buf),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for InboundTls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            InboundTls::Modern(tls) => Pin::new(tls).poll_write(cx, buf),
            InboundTls::Legacy(tls) => Pin::new(tls).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            InboundTls::Modern(tls) => Pin::new(tls).poll_flush(cx),
            InboundTls::Legacy(tls) => Pin::new(tls).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            InboundTls::Modern(tls) => Pin::new(tls).poll_shutdown(cx),
            InboundTls::Legacy(tls) => Pin::new(tls).poll_shutdown(cx),
        }
    }
}
