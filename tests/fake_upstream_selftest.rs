//! Checks that the fake upstream used by the integration tests behaves like
//! the Gmail submission server it stands in for, using the same SMTP client
//! library as the relay (mail-send) plus a raw client for protocol details
//! mail-send never exercises.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use common::fake_upstream::{FakeUpstream, FakeUpstreamOptions, Script, UpstreamTls, gmail};
use mail_send::smtp::message::Message;
use mail_send::{Credentials, SmtpClient, SmtpClientBuilder};
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

const USER: &str = "relay@gmail.com";
const PASSWORD: &str = "abcd efgh ijkl mnop";
const WAIT: Duration = Duration::from_secs(10);

/// A TLS connector that trusts only the fake upstream's test CA.
fn tls_connector(ca_file: &Path) -> TlsConnector {
    let pem = std::fs::read(ca_file).expect("read CA file");
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("parse CA PEM")).expect("add CA");
    }
    let config = ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}

async fn connect(
    upstream: &FakeUpstream,
    implicit_tls: bool,
    host: &str,
    password: &str,
) -> mail_send::Result<SmtpClient<TlsStream<TcpStream>>> {
    SmtpClientBuilder::new_with_tls_connector(
        host,
        upstream.port(),
        tls_connector(upstream.ca_file()),
    )
    .implicit_tls(implicit_tls)
    .helo_host("client.test")
    .credentials(Credentials::new(USER, password))
    .timeout(WAIT)
    .connect()
    .await
}

fn message(body: &str) -> Message<'_> {
    Message::new(
        "sender@example.com",
        ["first@example.net", "second@example.org"],
        body.as_bytes(),
    )
}

async fn delivers_one_message(tls: UpstreamTls, host: &str) {
    let implicit_tls = matches!(tls, UpstreamTls::Implicit);
    let upstream = FakeUpstream::start(FakeUpstreamOptions::new(tls, USER, PASSWORD)).await;
    let mut client = connect(&upstream, implicit_tls, host, PASSWORD)
        .await
        .expect("connect and authenticate");

    let body = "Subject: hello\r\n\r\nHi there.\r\n.dot line";
    let reply = client.send(message(body)).await.expect("send");
    assert_eq!(reply.code(), 250);
    assert_eq!(reply.esc, [2, 0, 0]);
    assert_eq!(reply.message(), "OK  1700000000 a1b2c3d4e5f6 - gsmtp");

    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received.len(), 1);
    let msg = &received[0];
    // mail-send terminates the body with "\r\n.\r\n" and stuffs the dot.
    assert_eq!(msg.data, format!("{body}\r\n").into_bytes());
    assert_eq!(msg.mail_from, "sender@example.com");
    assert_eq!(msg.rcpt_to, ["first@example.net", "second@example.org"]);
    assert_eq!(msg.auth_user, USER);
    assert_eq!(msg.connection, 1);
    assert_eq!(upstream.auth_attempts(), 1);
    assert_eq!(upstream.connections(), 1);
}

#[tokio::test]
async fn starttls_with_auth_delivers_message() {
    delivers_one_message(UpstreamTls::StartTls, "127.0.0.1").await;
}

#[tokio::test]
async fn implicit_tls_with_auth_delivers_message() {
    delivers_one_message(UpstreamTls::Implicit, "localhost").await;
}

#[tokio::test]
async fn wrong_password_gets_gmail_bad_credentials() {
    let upstream = FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        USER,
        PASSWORD,
    ))
    .await;

    let Err(err) = connect(&upstream, false, "127.0.0.1", "wrong").await else {
        panic!("authentication with a wrong password succeeded");
    };
    let mail_send::Error::AuthenticationFailed(reply) = err else {
        panic!("expected AuthenticationFailed, got {err}");
    };
    assert_eq!(reply.code(), 535);
    assert!(reply.message().contains("BadCredentials"), "{reply}");
    // mail-send does not fall back to AUTH LOGIN after a 535.
    assert_eq!(upstream.auth_attempts(), 1);

    // A password change applies to later attempts.
    upstream.set_password("rotated");
    assert!(
        connect(&upstream, false, "127.0.0.1", PASSWORD)
            .await
            .is_err()
    );
    assert!(
        connect(&upstream, false, "127.0.0.1", "rotated")
            .await
            .is_ok()
    );
    assert!(upstream.received().is_empty());
}

#[tokio::test]
async fn scripted_data_reply_is_returned_and_message_not_recorded() {
    let mut opts = FakeUpstreamOptions::new(UpstreamTls::StartTls, USER, PASSWORD);
    opts.script.data = Some(gmail::DAILY_LIMIT.to_string());
    let upstream = FakeUpstream::start(opts).await;
    let mut client = connect(&upstream, false, "127.0.0.1", PASSWORD)
        .await
        .expect("connect");

    let Err(mail_send::Error::UnexpectedReply(reply)) = client.send(message("first")).await else {
        panic!("the scripted 550 was not returned");
    };
    assert_eq!(reply.code(), 550);
    assert_eq!(reply.esc, [5, 4, 5]);
    assert!(
        reply
            .message()
            .contains("Daily user sending limit exceeded"),
        "{reply}"
    );
    assert!(upstream.received().is_empty());

    // Replacing the script affects the next transaction on the same connection.
    upstream.set_script(Script::default());
    client
        .send(message("second"))
        .await
        .expect("send after reset");
    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].data, b"second\r\n");
}

#[tokio::test]
async fn scripted_421_closes_the_connection() {
    let mut opts = FakeUpstreamOptions::new(UpstreamTls::Implicit, USER, PASSWORD);
    opts.script.mail = Some(gmail::TRY_AGAIN_LATER.to_string());
    let upstream = FakeUpstream::start(opts).await;
    let mut client = connect(&upstream, true, "127.0.0.1", PASSWORD)
        .await
        .expect("connect");

    let Err(mail_send::Error::UnexpectedReply(reply)) = client.send(message("body")).await else {
        panic!("the scripted 421 was not returned");
    };
    assert_eq!(reply.code(), 421);
    assert!(
        client.noop().await.is_err(),
        "connection still open after 421"
    );
}

#[tokio::test]
async fn untrusted_certificate_fails_the_handshake() {
    for tls in [UpstreamTls::StartTls, UpstreamTls::Implicit] {
        let implicit_tls = matches!(tls, UpstreamTls::Implicit);
        let mut opts = FakeUpstreamOptions::new(tls, USER, PASSWORD);
        opts.trusted_cert = false;
        let upstream = FakeUpstream::start(opts).await;

        let Err(err) = connect(&upstream, implicit_tls, "localhost", PASSWORD).await else {
            panic!("handshake with an untrusted certificate succeeded");
        };
        assert!(
            matches!(&err, mail_send::Error::Tls(e) if matches!(**e, rustls::Error::InvalidCertificate(_))),
            "expected a certificate error, got {err}"
        );
        assert_eq!(upstream.auth_attempts(), 0);
    }
}

#[tokio::test]
async fn messages_record_their_connection_index() {
    let upstream = FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        USER,
        PASSWORD,
    ))
    .await;

    let mut client = connect(&upstream, false, "127.0.0.1", PASSWORD)
        .await
        .expect("connect");
    client.send(message("one")).await.expect("first send");
    client.send(message("two")).await.expect("second send");
    let mut second_client = connect(&upstream, false, "127.0.0.1", PASSWORD)
        .await
        .expect("connect again");
    second_client
        .send(message("three"))
        .await
        .expect("third send");

    let received = upstream.wait_for_messages(3, WAIT).await;
    let summary: Vec<_> = received
        .iter()
        .map(|m| (m.data.as_slice(), m.connection))
        .collect();
    assert_eq!(
        summary,
        [
            (&b"one\r\n"[..], 1),
            (&b"two\r\n"[..], 1),
            (&b"three\r\n"[..], 2)
        ]
    );
    assert_eq!(upstream.connections(), 2);
}

#[tokio::test]
async fn stop_refuses_new_connections_and_drops_open_ones() {
    let upstream = FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::Implicit,
        USER,
        PASSWORD,
    ))
    .await;
    let mut client = connect(&upstream, true, "127.0.0.1", PASSWORD)
        .await
        .expect("connect");
    let addr = upstream.addr();

    upstream.stop().await;

    let err = TcpStream::connect(addr)
        .await
        .expect_err("connected to a stopped upstream");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    assert!(
        client.noop().await.is_err(),
        "open connection survived stop()"
    );
}

/// Minimal line-based SMTP client for checking exact replies.
struct RawClient<S> {
    stream: BufReader<S>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> RawClient<S> {
    fn new(stream: S) -> Self {
        RawClient {
            stream: BufReader::new(stream),
        }
    }

    /// Reads one (possibly multi-line) reply, lines joined by "\r\n".
    async fn reply(&mut self) -> String {
        let mut lines = Vec::new();
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(WAIT, self.stream.read_line(&mut line))
                .await
                .expect("reply timed out")
                .expect("read reply");
            assert!(read > 0, "connection closed; got {lines:?}");
            let line = line.trim_end_matches("\r\n").to_string();
            let last = line.as_bytes().get(3) != Some(&b'-');
            lines.push(line);
            if last {
                return lines.join("\r\n");
            }
        }
    }

    async fn send(&mut self, raw: &str) {
        let stream = self.stream.get_mut();
        stream.write_all(raw.as_bytes()).await.expect("write");
        stream.flush().await.expect("flush");
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(&format!("{line}\r\n")).await;
        self.reply().await
    }
}

/// Connects to a StartTls upstream, checks the plain-text phase, and returns
/// a client that has upgraded to TLS and sent a fresh EHLO.
async fn raw_starttls(upstream: &FakeUpstream) -> RawClient<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(upstream.addr()).await.expect("connect");
    let mut plain = RawClient::new(tcp);
    assert_eq!(plain.reply().await, "220 smtp.fake.test ESMTP ready");
    let ehlo = plain.cmd("EHLO client.test").await;
    assert!(
        ehlo.contains("STARTTLS") && !ehlo.contains("AUTH"),
        "{ehlo}"
    );
    let must_starttls = "530 5.7.0 Must issue a STARTTLS command first.";
    assert_eq!(
        plain.cmd("AUTH PLAIN AHVzZXIAcGFzcw==").await,
        must_starttls
    );
    assert_eq!(plain.cmd("MAIL FROM:<a@example.com>").await, must_starttls);
    assert_eq!(plain.cmd("STARTTLS").await, "220 2.0.0 Ready to start TLS");

    let tls = tls_connector(upstream.ca_file())
        .connect(
            ServerName::try_from("localhost").unwrap(),
            plain.stream.into_inner(),
        )
        .await
        .expect("TLS handshake");
    let mut client = RawClient::new(tls);
    let ehlo = client.cmd("EHLO client.test").await;
    for capability in [
        "250-AUTH LOGIN PLAIN",
        "250-SIZE 35882577",
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250-PIPELINING",
        "250 SMTPUTF8",
    ] {
        assert!(
            ehlo.contains(capability),
            "{capability} missing from {ehlo}"
        );
    }
    client
}

#[tokio::test]
async fn raw_protocol_details() {
    let upstream = FakeUpstream::start(FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        USER,
        PASSWORD,
    ))
    .await;

    // Connection 1: auth gating, a failed AUTH PLAIN without initial
    // response, then a successful AUTH LOGIN.
    let mut client = raw_starttls(&upstream).await;
    let reply = client.cmd("MAIL FROM:<a@example.com>").await;
    assert!(
        reply.starts_with("530-5.7.0 Authentication Required."),
        "{reply}"
    );
    assert_eq!(client.cmd("AUTH PLAIN").await, "334 ");
    let reply = client.cmd(&BASE64.encode(format!("\0{USER}\0wrong"))).await;
    assert_eq!(reply, gmail::BAD_CREDENTIALS);
    assert_eq!(client.cmd("AUTH LOGIN").await, "334 VXNlcm5hbWU6");
    assert_eq!(client.cmd(&BASE64.encode(USER)).await, "334 UGFzc3dvcmQ6");
    assert_eq!(
        client.cmd(&BASE64.encode(PASSWORD)).await,
        "235 2.7.0 Accepted"
    );
    assert_eq!(client.cmd("QUIT").await, "221 2.0.0 closing connection");

    // Connection 2: AUTH PLAIN without initial response, then a pipelined
    // transaction whose body starts with a stuffed dot.
    let mut client = raw_starttls(&upstream).await;
    assert_eq!(client.cmd("AUTH PLAIN").await, "334 ");
    let reply = client
        .cmd(&BASE64.encode(format!("\0{USER}\0{PASSWORD}")))
        .await;
    assert_eq!(reply, "235 2.7.0 Accepted");
    client
        .send("MAIL FROM:<a@example.com>\r\nRCPT TO:<b@example.com>\r\nDATA\r\n")
        .await;
    assert_eq!(client.reply().await, "250 2.1.0 OK");
    assert_eq!(client.reply().await, "250 2.1.5 OK");
    assert_eq!(client.reply().await, "354 Go ahead");
    let reply = client.cmd("..first\r\nmiddle\r\n..\r\n.").await;
    assert_eq!(reply, gmail::OK_QUEUED);
    assert_eq!(client.cmd("RSET").await, "250 2.1.5 Flushed");
    assert_eq!(client.cmd("NOOP").await, "250 2.0.0 OK");
    assert_eq!(client.cmd("QUIT").await, "221 2.0.0 closing connection");

    let received = upstream.wait_for_messages(1, WAIT).await;
    assert_eq!(received[0].data, b".first\r\nmiddle\r\n.\r\n");
    assert_eq!(received[0].rcpt_to, ["b@example.com"]);
    assert_eq!(received[0].connection, 2);
    assert_eq!(upstream.auth_attempts(), 3);
}
