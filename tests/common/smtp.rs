//! A deliberately raw SMTP client for tests: exact lines out, exact replies
//! in, so tests can pipeline, smuggle and misbehave like real old software.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// Every read in a test is bounded: a hang fails instead of blocking CI.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// A reply: code and the text of all lines joined by `\n`, each line without
/// its code and separator (enhanced status codes stay in the text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub text: String,
}

pub struct Client {
    stream: BufReader<Box<dyn Stream>>,
}

impl Client {
    /// Connects and reads the greeting (which must be 220).
    pub async fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr)
            .await
            .expect("relay accepts connections");
        let mut client = Client::over(Box::new(stream));
        let greeting = client.read_reply().await;
        assert_eq!(greeting.code, 220, "greeting: {greeting:?}");
        client
    }

    /// Connected from `source`, a loopback address other than 127.0.0.1
    /// (Linux routes all of 127.0.0.0/8 to loopback); greeting unread.
    pub async fn connect_from(source: &str, relay: SocketAddr) -> Client {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let stream = socket.connect(relay).await.unwrap();
        Client::over(Box::new(stream))
    }

    /// Connects over implicit TLS, trusting `cert`.
    pub async fn connect_tls(addr: SocketAddr, cert: &Path) -> Client {
        let stream = TcpStream::connect(addr).await.unwrap();
        let tls = tls_connect(stream, cert).await;
        let mut client = Client::over(Box::new(tls));
        assert_eq!(client.read_reply().await.code, 220);
        client
    }

    pub fn over(stream: Box<dyn Stream>) -> Client {
        Client {
            stream: BufReader::new(stream),
        }
    }

    pub async fn write(&mut self, bytes: &[u8]) {
        self.stream.get_mut().write_all(bytes).await.unwrap();
        self.stream.get_mut().flush().await.unwrap();
    }

    pub async fn read_reply(&mut self) -> Reply {
        self.try_reply()
            .await
            .expect("a complete reply before the connection closed")
    }

    /// The next reply, or `None` when the connection closed, failed or
    /// stayed silent for the read timeout.
    pub async fn try_reply(&mut self) -> Option<Reply> {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(READ_TIMEOUT, self.stream.read_line(&mut line))
                .await
                .ok()?
                .ok()?;
            if read == 0 {
                return None;
            }
            let line = line.trim_end_matches(['\r', '\n']);
            let code: u16 = line.get(..3)?.parse().ok()?;
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line.get(4..).unwrap_or("").to_string());
            if last {
                return Some(Reply {
                    code,
                    text: lines.join("\n"),
                });
            }
        }
    }

    /// Writes raw bytes and reads the reply; `None` if the connection broke.
    pub async fn try_cmd_raw(&mut self, bytes: &[u8]) -> Option<Reply> {
        self.stream.get_mut().write_all(bytes).await.ok()?;
        self.stream.get_mut().flush().await.ok()?;
        self.try_reply().await
    }

    /// One command line; `None` if the connection broke.
    pub async fn try_cmd(&mut self, line: &str) -> Option<Reply> {
        self.try_cmd_raw(format!("{line}\r\n").as_bytes()).await
    }

    /// Sends one command line and reads its reply.
    pub async fn cmd(&mut self, line: &str) -> Reply {
        self.write(format!("{line}\r\n").as_bytes()).await;
        self.read_reply().await
    }

    /// Asserts the reply code of a command, returning the reply.
    pub async fn expect(&mut self, line: &str, code: u16) -> Reply {
        let reply = self.cmd(line).await;
        assert_eq!(reply.code, code, "{line:?} got {reply:?}");
        reply
    }

    pub async fn ehlo(&mut self) -> Reply {
        self.expect("EHLO legacy.test", 250).await
    }

    pub async fn login_plain(&mut self, user: &str, password: &str) -> Reply {
        self.cmd(&format!("AUTH PLAIN {}", plain(user, password)))
            .await
    }

    /// MAIL, RCPT for each recipient, DATA and the content (dot-stuffed by
    /// the caller if needed, ending in CRLF); returns the reply to the data.
    pub async fn send_mail(&mut self, from: &str, to: &[&str], content: &str) -> Reply {
        self.expect(&format!("MAIL FROM:<{from}>"), 250).await;
        for rcpt in to {
            self.expect(&format!("RCPT TO:<{rcpt}>"), 250).await;
        }
        self.expect("DATA", 354).await;
        self.write(content.as_bytes()).await;
        self.write(b".\r\n").await;
        self.read_reply().await
    }

    /// Upgrades with STARTTLS, trusting `cert`.
    pub async fn starttls(mut self, cert: &Path) -> Client {
        self.expect("STARTTLS", 220).await;
        self.into_tls(cert).await
    }

    /// Starts the TLS handshake on this connection (after a 220 to STARTTLS).
    pub async fn into_tls(self, cert: &Path) -> Client {
        let stream = self.stream.into_inner();
        Client::over(Box::new(tls_connect(stream, cert).await))
    }

    /// True once the server closed the connection.
    pub async fn is_closed(&mut self) -> bool {
        let mut line = String::new();
        matches!(
            tokio::time::timeout(READ_TIMEOUT, self.stream.read_line(&mut line)).await,
            Ok(Ok(0)) | Ok(Err(_))
        )
    }
}

/// The AUTH PLAIN initial response for `user` and `password`.
pub fn plain(user: &str, password: &str) -> String {
    BASE64.encode(format!("\0{user}\0{password}"))
}

async fn tls_connect<S: Stream + 'static>(
    stream: S,
    cert: &Path,
) -> tokio_rustls::client::TlsStream<S> {
    let pem = std::fs::read(cert).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    connector
        .connect(name, stream)
        .await
        .expect("TLS handshake with the relay")
}
