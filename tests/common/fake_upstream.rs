//! A fake upstream SMTP submission server that mimics Gmail closely enough for
//! integration tests: STARTTLS or implicit TLS with a throw-away test CA,
//! AUTH PLAIN/LOGIN and XOAUTH2, Gmail's reply texts, and scriptable replies
//! per stage.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::slice::Iter;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use smtp_proto::request::receiver::{DataReceiver, LineReceiver, RequestReceiver};
use smtp_proto::{AUTH_LOGIN, AUTH_PLAIN, AUTH_XOAUTH2, Request};
use tempfile::TempDir;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Gmail's reply texts (multi-line replies joined by "\r\n", no trailing CRLF).
pub mod gmail {
    pub const BAD_CREDENTIALS: &str = "535-5.7.8 Username and Password not accepted. For more information, go to\r\n535 5.7.8  https://support.google.com/mail/?p=BadCredentials a1b2c3d4e5f6 - gsmtp";
    pub const APP_PASSWORD_REQUIRED: &str = "534-5.7.9 Application-specific password required. For more information, go to\r\n534 5.7.9  https://support.google.com/mail/?p=InvalidSecondFactor a1b2c3d4e5f6 - gsmtp";
    pub const DAILY_LIMIT: &str = "550-5.4.5 Daily user sending limit exceeded. For more information on Gmail\r\n550-5.4.5 sending limits go to\r\n550 5.4.5  https://support.google.com/a/answer/166852 a1b2c3d4e5f6 - gsmtp";
    pub const TRY_AGAIN_LATER: &str =
        "421 4.7.0 Try again later, closing connection. a1b2c3d4e5f6 - gsmtp";
    pub const RECIPIENT_UNKNOWN: &str = "550-5.1.1 The email account that you tried to reach does not exist. Please try\r\n550-5.1.1 double-checking the recipient's email address for typos or\r\n550-5.1.1 unnecessary spaces. For more information, go to\r\n550 5.1.1  https://support.google.com/mail/?p=NoSuchUser a1b2c3d4e5f6 - gsmtp";
    pub const UNAUTHENTICATED_SENDER: &str = "550-5.7.26 This mail has been blocked because the sender is unauthenticated.\r\n550-5.7.26 Gmail requires all senders to authenticate with either SPF or DKIM.\r\n550-5.7.26\r\n550-5.7.26  Authentication results:\r\n550-5.7.26  DKIM = did not pass\r\n550-5.7.26  SPF [legacy.example] with ip: [192.0.2.1] = did not pass\r\n550 5.7.26  https://support.google.com/mail/answer/81126#authentication a1b2c3d4e5f6 - gsmtp";
    pub const TOO_MANY_RECIPIENTS: &str = "452 4.5.3 Your message has too many recipients. For more information regarding Google's sending limits, go to https://support.google.com/mail/?p=TooManyRecipientsError a1b2c3d4e5f6 - gsmtp";
    pub const OK_QUEUED: &str = "250 2.0.0 OK  1700000000 a1b2c3d4e5f6 - gsmtp";
    /// The JSON inside the `334` challenge that refuses an XOAUTH2 token.
    pub const XOAUTH2_ERROR: &str =
        r#"{"status":"400","schemes":"Bearer","scope":"https://mail.google.com/"}"#;
}

/// How the fake upstream offers TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    /// Plain-text greeting; TLS is negotiated with STARTTLS (port 587 style).
    StartTls,
    /// TLS handshake right after connecting (port 465 style).
    Implicit,
}

/// One accepted message.
#[derive(Clone, Debug)]
pub struct Received {
    /// User that authenticated on the connection the message came over.
    pub auth_user: String,
    /// Address inside `MAIL FROM:<...>`.
    pub mail_from: String,
    /// Addresses inside `RCPT TO:<...>`, as smtp-proto parses them
    /// (quotes removed).
    pub rcpt_to: Vec<String>,
    /// The MAIL and accepted RCPT command lines as they came, without CRLF.
    pub commands: Vec<String>,
    /// Message content, dot-unstuffed, without the final ".\r\n" line.
    pub data: Vec<u8>,
    /// 1-based index of the TCP connection the message came over.
    pub connection: usize,
}

impl Received {
    /// The message as the legacy program wrote it: without the Received
    /// field sendbridge puts first (checked to be there, and ours).
    pub fn without_trace(&self) -> String {
        without_trace(&String::from_utf8_lossy(&self.data))
    }

    /// Everything after the empty line that ends the header section.
    pub fn body(&self) -> &[u8] {
        let end = self
            .data
            .windows(4)
            .position(|window| window == b"\r\n\r\n")
            .expect("a header section");
        &self.data[end + 4..]
    }
}

/// Replies to script. Each is a full raw reply, possibly multi-line, lines
/// separated by "\r\n", without the final CRLF. `None` means the default
/// success reply. A reply starting with "421" closes the connection after it
/// is sent.
#[derive(Clone, Default)]
pub struct Script {
    /// Default: "220 smtp.fake.test ESMTP ready".
    pub greeting: Option<String>,
    /// The EHLO reply once TLS is on (default: Gmail's capabilities).
    pub ehlo: Option<String>,
    /// Sent instead of 235/535 (or XOAUTH2's 334 challenge) after any AUTH
    /// attempt, even one with the correct password or token; the client
    /// counts as authenticated iff it is a 2xx.
    pub auth: Option<String>,
    pub mail: Option<String>,
    /// Applies to every RCPT not named in `rcpt_for`.
    pub rcpt: Option<String>,
    /// Replies to RCPT for particular addresses.
    pub rcpt_for: Vec<(String, String)>,
    /// Like Gmail, refuse RCPTs beyond this many per transaction with
    /// `gmail::TOO_MANY_RECIPIENTS`.
    pub max_recipients: Option<usize>,
    /// Reply after the end of the message (not the 354).
    pub data: Option<String>,
    /// Never answer the end of a message (nor record it): a provider that
    /// hangs mid-delivery.
    pub stall_after_data: bool,
    /// Answer MAIL and RCPT only together with DATA: a client that waits
    /// for each reply before its next command (rather than pipelining)
    /// never gets one.
    pub answer_with_data: bool,
}

#[derive(Clone)]
pub struct FakeUpstreamOptions {
    pub tls: UpstreamTls,
    pub username: String,
    pub password: String,
    pub script: Script,
    /// true: the leaf certificate is signed by the CA in `ca_file()`;
    /// false: the leaf is self-signed, so a client trusting only that CA
    /// rejects it.
    pub trusted_cert: bool,
    /// 0 picks a free port; a fixed one lets a test bring an upstream "back".
    pub port: u16,
}

impl FakeUpstreamOptions {
    pub fn new(tls: UpstreamTls, username: &str, password: &str) -> Self {
        FakeUpstreamOptions {
            tls,
            username: username.to_string(),
            password: password.to_string(),
            script: Script::default(),
            trusted_cert: true,
            port: 0,
        }
    }
}

/// A running fake upstream on 127.0.0.1. Dropping it (or calling `stop`)
/// ends the listener and every connection task.
pub struct FakeUpstream {
    addr: SocketAddr,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: TaskTracker,
    ca_file: PathBuf,
    // Keeps the directory holding `ca_file` alive.
    _ca_dir: TempDir,
}

/// State shared between the test-facing handle and the connection tasks.
struct Shared {
    username: String,
    password: Mutex<String>,
    /// The one OAuth 2.0 access token XOAUTH2 accepts; none at first.
    access_token: Mutex<Option<String>>,
    script: Mutex<Script>,
    // A watch channel so `wait_for_messages` can be woken on every new message.
    received: watch::Sender<Vec<Received>>,
    /// Messages left unanswered by `stall_after_data`.
    stalled: watch::Sender<usize>,
    connections: AtomicUsize,
    auth_attempts: AtomicUsize,
    xoauth2_attempts: AtomicUsize,
    rsets: AtomicUsize,
    /// What clients answered to XOAUTH2's error challenge.
    xoauth2_challenge_answers: Mutex<Vec<String>>,
}

/// How long the server waits for client input (or a TLS handshake) before
/// dropping the connection, so a broken test cannot hang a task forever.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

const HOSTNAME: &str = "smtp.fake.test";
const DEFAULT_GREETING: &str = "220 smtp.fake.test ESMTP ready";
const IMPROPER_PIPELINING: &str = "503 5.5.0 Error: improper command pipelining";
const EHLO_BEFORE_TLS: &str = "250-smtp.fake.test at your service\r\n250-STARTTLS\r\n250-ENHANCEDSTATUSCODES\r\n250 PIPELINING";
const EHLO_AFTER_TLS: &str = "250-smtp.fake.test at your service\r\n250-SIZE 35882577\r\n250-8BITMIME\r\n250-AUTH LOGIN PLAIN XOAUTH2\r\n250-ENHANCEDSTATUSCODES\r\n250-PIPELINING\r\n250 SMTPUTF8";
const READY_FOR_TLS: &str = "220 2.0.0 Ready to start TLS";
const STARTTLS_REQUIRED: &str = "530 5.7.0 Must issue a STARTTLS command first.";
const AUTH_REQUIRED: &str = "530-5.7.0 Authentication Required. For more information, go to\r\n530 5.7.0  https://support.google.com/mail/?p=WantAuthError - gsmtp";
const AUTH_OK: &str = "235 2.7.0 Accepted";
const AUTH_UNSUPPORTED: &str = "504 5.7.4 Unrecognized authentication type.";
const AUTH_UNDECODABLE: &str = "501 5.5.2 Cannot Decode response";
const AUTH_ABORTED: &str = "501 5.7.0 Authentication aborted";
const ALREADY_AUTHENTICATED: &str = "503 5.5.1 Already authenticated.";
const TLS_ALREADY_ACTIVE: &str = "503 5.5.1 TLS already active.";
const NESTED_MAIL: &str = "503 5.5.1 Nested MAIL command.";
const MAIL_FIRST: &str = "503 5.5.1 MAIL first.";
const RCPT_FIRST: &str = "503 5.5.1 RCPT first.";
const MAIL_OK: &str = "250 2.1.0 OK";
const RCPT_OK: &str = "250 2.1.5 OK";
const DATA_GO_AHEAD: &str = "354 Go ahead";
const RSET_OK: &str = "250 2.1.5 Flushed";
const NOOP_OK: &str = "250 2.0.0 OK";
const QUIT_OK: &str = "221 2.0.0 closing connection";
const UNRECOGNIZED: &str = "502 5.5.1 Unrecognized command.";
const LINE_TOO_LONG: &str = "500 5.5.2 Line too long.";
const SYNTAX_ERROR: &str = "501 5.5.2 Syntax error.";

impl FakeUpstream {
    /// Starts the server on 127.0.0.1 with an ephemeral port.
    pub async fn start(opts: FakeUpstreamOptions) -> FakeUpstream {
        // Several tests (and the relay under test) may race to install it.
        let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();

        let pki = if opts.trusted_cert {
            // One CA per test process: an upstream restarted on the same port
            // is trusted like the one it replaces.
            static TRUSTED: std::sync::OnceLock<TestPki> = std::sync::OnceLock::new();
            let pki = TRUSTED.get_or_init(|| generate_pki(true));
            TestPki {
                ca_pem: pki.ca_pem.clone(),
                leaf_cert: pki.leaf_cert.clone(),
                leaf_key: pki.leaf_key.clone_key(),
            }
        } else {
            generate_pki(false)
        };
        let ca_dir = TempDir::new().expect("create temp dir for the test CA");
        let ca_file = ca_dir.path().join("ca.pem");
        std::fs::write(&ca_file, &pki.ca_pem).expect("write test CA PEM");

        let tls_config = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(vec![pki.leaf_cert], pki.leaf_key)
            .expect("build TLS server config");
        let acceptor = TlsAcceptor::from(Arc::new(tls_config));

        let listener = TcpListener::bind(("127.0.0.1", opts.port))
            .await
            .expect("bind fake upstream");
        let addr = listener.local_addr().expect("fake upstream local addr");

        let shared = Arc::new(Shared {
            username: opts.username,
            password: Mutex::new(opts.password),
            access_token: Mutex::new(None),
            script: Mutex::new(opts.script),
            received: watch::Sender::new(Vec::new()),
            stalled: watch::Sender::new(0),
            connections: AtomicUsize::new(0),
            auth_attempts: AtomicUsize::new(0),
            xoauth2_attempts: AtomicUsize::new(0),
            rsets: AtomicUsize::new(0),
            xoauth2_challenge_answers: Mutex::new(Vec::new()),
        });
        let cancel = CancellationToken::new();
        let tasks = TaskTracker::new();

        let accept_loop = AcceptLoop {
            listener,
            acceptor,
            implicit_tls: matches!(opts.tls, UpstreamTls::Implicit),
            shared: shared.clone(),
            cancel: cancel.clone(),
            tasks: tasks.clone(),
        };
        tasks.spawn(accept_loop.run());

        FakeUpstream {
            addr,
            shared,
            cancel,
            tasks,
            ca_file,
            _ca_dir: ca_dir,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// PEM file holding the test CA certificate.
    pub fn ca_file(&self) -> &Path {
        &self.ca_file
    }

    pub fn received(&self) -> Vec<Received> {
        self.shared.received.borrow().clone()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// AUTH exchanges that got as far as checking credentials.
    pub fn auth_attempts(&self) -> usize {
        self.shared.auth_attempts.load(Ordering::SeqCst)
    }

    /// AUTH XOAUTH2 exchanges, whatever their result.
    pub fn xoauth2_attempts(&self) -> usize {
        self.shared.xoauth2_attempts.load(Ordering::SeqCst)
    }

    /// RSET commands, over all connections.
    pub fn rsets(&self) -> usize {
        self.shared.rsets.load(Ordering::SeqCst)
    }

    /// The lines clients sent in answer to XOAUTH2's error challenge
    /// (RFC 7628 wants an empty one).
    pub fn xoauth2_challenge_answers(&self) -> Vec<String> {
        self.shared
            .xoauth2_challenge_answers
            .lock()
            .unwrap()
            .clone()
    }

    /// Makes `token` the only access token later XOAUTH2 attempts accept.
    pub fn set_access_token(&self, token: &str) {
        *self.shared.access_token.lock().unwrap() = Some(token.to_string());
    }

    /// Replaces the script; affects commands processed from now on.
    pub fn set_script(&self, script: Script) {
        *self.shared.script.lock().unwrap() = script;
    }

    /// Changes the password accepted by later AUTH attempts.
    pub fn set_password(&self, password: &str) {
        *self.shared.password.lock().unwrap() = password.to_string();
    }

    /// Returns all received messages as soon as there are at least `n`.
    /// Panics if that does not happen within `timeout`.
    pub async fn wait_for_messages(&self, n: usize, timeout: Duration) -> Vec<Received> {
        let mut rx = self.shared.received.subscribe();
        match tokio::time::timeout(timeout, rx.wait_for(|received| received.len() >= n)).await {
            Ok(received) => received
                .expect("the sender lives as long as FakeUpstream")
                .clone(),
            Err(_) => panic!(
                "fake upstream: timed out after {timeout:?} waiting for {n} message(s); received so far: {:?}",
                self.received()
            ),
        }
    }

    /// Waits until a message has been received and left unanswered
    /// (`Script::stall_after_data`).
    pub async fn wait_for_stall(&self, timeout: Duration) {
        let mut stalled = self.shared.stalled.subscribe();
        tokio::time::timeout(timeout, stalled.wait_for(|&n| n > 0))
            .await
            .expect("a message stalls")
            .expect("the sender lives as long as FakeUpstream");
    }

    /// Closes the listener and all connections, and waits until every task
    /// has finished, so connecting afterwards is refused.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }
}

impl Drop for FakeUpstream {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// `text` without the Received field sendbridge puts first (checked to be
/// there, and ours): the message as the legacy program wrote it.
pub fn without_trace(text: &str) -> String {
    assert!(text.starts_with("Received: from "), "{text}");
    let mut lines = text.split_inclusive("\r\n");
    let first = lines.next().unwrap_or_default();
    let continued: Vec<&str> = lines
        .clone()
        .take_while(|line| line.starts_with([' ', '\t']))
        .collect();
    let trace = [first]
        .into_iter()
        .chain(continued.iter().copied())
        .collect::<String>();
    assert!(trace.contains("(sendbridge)"), "{trace}");
    text[trace.len()..].to_string()
}

pub struct TestPki {
    pub ca_pem: String,
    pub leaf_cert: CertificateDer<'static>,
    pub leaf_key: PrivateKeyDer<'static>,
}

/// Creates a test CA and a server certificate for "localhost" and 127.0.0.1.
/// The server certificate is signed by the CA when `trusted`, self-signed
/// otherwise.
pub fn generate_pki(trusted: bool) -> TestPki {
    let ca_key = KeyPair::generate().expect("generate CA key");
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sendbridge fake upstream test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key).expect("self-sign CA");
    let ca = Issuer::new(ca_params, ca_key);

    let leaf_key = KeyPair::generate().expect("generate server key");
    let mut leaf_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server cert params");
    // A subject of its own: a self-signed leaf named just "localhost" would
    // be matched against system roots with that name (Debian's snakeoil
    // certificate), and fail for the wrong reason.
    leaf_params
        .distinguished_name
        .push(DnType::CommonName, "sendbridge fake upstream server");
    leaf_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let leaf_cert = if trusted {
        leaf_params.signed_by(&leaf_key, &ca)
    } else {
        leaf_params.self_signed(&leaf_key)
    }
    .expect("sign server cert");

    TestPki {
        ca_pem: ca_cert.pem(),
        leaf_cert: leaf_cert.der().clone(),
        leaf_key: PrivatePkcs8KeyDer::from(leaf_key.serialize_der()).into(),
    }
}

struct AcceptLoop {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    implicit_tls: bool,
    shared: Arc<Shared>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl AcceptLoop {
    /// Accepts connections until cancelled; the listener is closed when this returns.
    async fn run(self) {
        loop {
            let tcp = tokio::select! {
                _ = self.cancel.cancelled() => return,
                accepted = self.listener.accept() => match accepted {
                    Ok((tcp, _)) => tcp,
                    Err(err) => {
                        eprintln!("fake upstream: accept failed: {err}");
                        return;
                    }
                },
            };
            let session = Session {
                shared: self.shared.clone(),
                connection: self.shared.connections.fetch_add(1, Ordering::SeqCst) + 1,
                acceptor: self.acceptor.clone(),
                auth_user: None,
                envelope: None,
            };
            let cancel = self.cancel.clone();
            let implicit_tls = self.implicit_tls;
            self.tasks.spawn(async move {
                let connection = session.connection;
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    result = session.run(tcp, implicit_tls) => match result {
                        // The client hanging up without QUIT is routine.
                        Ok(()) => {}
                        Err(err) if err.kind() == std::io::ErrorKind::UnexpectedEof => {}
                        Err(err) => eprintln!("fake upstream: connection {connection}: {err}"),
                    }
                }
            });
        }
    }
}

/// Whether the SMTP dialogue ended or the client asked to switch to TLS.
enum Outcome<S> {
    Closed,
    StartTls(S),
}

/// A message transaction in progress (after an accepted MAIL).
struct Envelope {
    mail_from: String,
    rcpt_to: Vec<String>,
    commands: Vec<String>,
}

/// Per-connection SMTP state.
struct Session {
    shared: Arc<Shared>,
    connection: usize,
    acceptor: TlsAcceptor,
    auth_user: Option<String>,
    envelope: Option<Envelope>,
}

impl Session {
    async fn run(mut self, tcp: TcpStream, implicit_tls: bool) -> std::io::Result<()> {
        let greeting = self
            .script()
            .greeting
            .unwrap_or_else(|| DEFAULT_GREETING.to_string());
        if implicit_tls {
            let mut tls = Conn::new(self.tls_handshake(tcp).await?);
            if tls.reply_or_close(&greeting).await? {
                self.dialogue(tls, true).await?;
            }
        } else {
            let mut plain = Conn::new(tcp);
            if !plain.reply_or_close(&greeting).await? {
                return Ok(());
            }
            if let Outcome::StartTls(tcp) = self.dialogue(plain, false).await? {
                // RFC 3207: the session restarts from scratch after STARTTLS.
                let tls = Conn::new(self.tls_handshake(tcp).await?);
                self.dialogue(tls, true).await?;
            }
        }
        Ok(())
    }

    async fn tls_handshake(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::server::TlsStream<TcpStream>> {
        tokio::time::timeout(READ_TIMEOUT, self.acceptor.accept(tcp))
            .await
            .map_err(|_| timed_out())?
    }

    fn script(&self) -> Script {
        self.shared.script.lock().unwrap().clone()
    }

    /// Serves commands until QUIT, a closing 421, or STARTTLS (only offered
    /// while `tls_active` is false).
    async fn dialogue<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        mut conn: Conn<S>,
        tls_active: bool,
    ) -> std::io::Result<Outcome<S>> {
        let mut requests = RequestReceiver::default();
        loop {
            // The raw line, for tests that check exactly what was sent.
            let mut line = String::new();
            let request = conn
                .receive(|bytes| {
                    let before = bytes.as_slice();
                    match requests.ingest(bytes) {
                        Err(smtp_proto::Error::NeedsMoreData { .. }) => None,
                        parsed => {
                            let consumed = &before[..before.len() - bytes.len()];
                            line = String::from_utf8_lossy(consumed).trim_end().to_string();
                            Some(parsed.map(Request::into_owned))
                        }
                    }
                })
                .await?;

            let script = self.script();
            conn.hold = script.answer_with_data
                && matches!(request, Ok(Request::Mail { .. } | Request::Rcpt { .. }));
            // As Postfix's reject_unauth_pipelining: commands sent before
            // the reply to the one before, to a server that did not offer
            // PIPELINING, are refused.
            let ehlo = match tls_active {
                true => script.ehlo.as_deref().unwrap_or(EHLO_AFTER_TLS),
                false => EHLO_BEFORE_TLS,
            };
            let improper = !ehlo.contains("PIPELINING")
                && conn.pos < conn.buf.len()
                && matches!(request, Ok(Request::Mail { .. } | Request::Rcpt { .. }));
            let reply: Cow<'static, str> = match request {
                _ if improper => IMPROPER_PIPELINING.into(),
                Ok(Request::Ehlo { .. }) => {
                    self.envelope = None;
                    if tls_active {
                        self.script().ehlo.map_or(EHLO_AFTER_TLS.into(), Cow::Owned)
                    } else {
                        EHLO_BEFORE_TLS.into()
                    }
                }
                Ok(Request::Helo { .. }) => {
                    self.envelope = None;
                    format!("250 {HOSTNAME} at your service").into()
                }
                Ok(Request::StartTls) if tls_active => TLS_ALREADY_ACTIVE.into(),
                Ok(Request::StartTls) => {
                    conn.reply(READY_FOR_TLS).await?;
                    conn.send_replies().await?;
                    // Anything pipelined after STARTTLS arrived in plain text
                    // and must not be executed inside the TLS session, so
                    // only the stream is handed back; `conn`'s buffer is dropped.
                    return Ok(Outcome::StartTls(conn.stream));
                }
                Ok(
                    Request::Auth { .. }
                    | Request::Mail { .. }
                    | Request::Rcpt { .. }
                    | Request::Data,
                ) if !tls_active => STARTTLS_REQUIRED.into(),
                Ok(Request::Auth { .. }) if self.auth_user.is_some() => {
                    ALREADY_AUTHENTICATED.into()
                }
                Ok(Request::Auth {
                    mechanism,
                    initial_response,
                }) => self.auth(&mut conn, mechanism, initial_response).await?,
                Ok(Request::Mail { .. } | Request::Rcpt { .. } | Request::Data)
                    if self.auth_user.is_none() =>
                {
                    AUTH_REQUIRED.into()
                }
                Ok(Request::Mail { .. }) if self.envelope.is_some() => NESTED_MAIL.into(),
                Ok(Request::Mail { from }) => {
                    let reply = self.script().mail.unwrap_or_else(|| MAIL_OK.into());
                    if is_positive(&reply) {
                        self.envelope = Some(Envelope {
                            mail_from: from.address,
                            rcpt_to: Vec::new(),
                            commands: vec![line],
                        });
                    }
                    reply.into()
                }
                Ok(Request::Rcpt { .. } | Request::Data) if self.envelope.is_none() => {
                    MAIL_FIRST.into()
                }
                Ok(Request::Rcpt { to }) => {
                    let script = self.script();
                    let accepted = self.envelope.as_ref().map_or(0, |e| e.rcpt_to.len());
                    let named = script
                        .rcpt_for
                        .iter()
                        .find(|(address, _)| *address == to.address);
                    let reply = match (named, script.max_recipients) {
                        (_, Some(max)) if accepted >= max => gmail::TOO_MANY_RECIPIENTS.into(),
                        (Some((_, reply)), _) => reply.clone(),
                        (None, _) => script.rcpt.unwrap_or_else(|| RCPT_OK.into()),
                    };
                    if is_positive(&reply) {
                        if let Some(envelope) = &mut self.envelope {
                            envelope.rcpt_to.push(to.address);
                            envelope.commands.push(line);
                        }
                    }
                    reply.into()
                }
                Ok(Request::Data) => match self.envelope.take() {
                    Some(envelope) if !envelope.rcpt_to.is_empty() => {
                        self.data(&mut conn, envelope).await?.into()
                    }
                    no_recipients => {
                        self.envelope = no_recipients;
                        RCPT_FIRST.into()
                    }
                },
                Ok(Request::Rset) => {
                    self.shared.rsets.fetch_add(1, Ordering::SeqCst);
                    self.envelope = None;
                    RSET_OK.into()
                }
                Ok(Request::Noop { .. }) => NOOP_OK.into(),
                Ok(Request::Quit) => {
                    conn.reply(QUIT_OK).await?;
                    conn.close().await;
                    return Ok(Outcome::Closed);
                }
                Ok(_) | Err(smtp_proto::Error::UnknownCommand) => UNRECOGNIZED.into(),
                Err(smtp_proto::Error::ResponseTooLong) => LINE_TOO_LONG.into(),
                Err(_) => SYNTAX_ERROR.into(),
            };

            if !conn.reply_or_close(&reply).await? {
                return Ok(Outcome::Closed);
            }
        }
    }

    /// Runs one AUTH exchange and returns the final reply.
    async fn auth<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        mechanism: u64,
        initial_response: String,
    ) -> std::io::Result<Cow<'static, str>> {
        let (username, password) = match mechanism {
            AUTH_PLAIN => {
                let response = if initial_response.is_empty() {
                    conn.challenge("334 ").await?
                } else {
                    initial_response
                };
                if response == "*" {
                    return Ok(AUTH_ABORTED.into());
                }
                // "=" is an explicitly empty initial response (RFC 4954).
                let decoded = if response == "=" {
                    Some(String::new())
                } else {
                    decode_base64(&response)
                };
                // authzid NUL authcid NUL passwd
                match decoded
                    .as_deref()
                    .map(|d| d.split('\0').collect::<Vec<_>>())
                {
                    Some(parts) if parts.len() == 3 => (parts[1].to_string(), parts[2].to_string()),
                    _ => return Ok(AUTH_UNDECODABLE.into()),
                }
            }
            AUTH_LOGIN => {
                // "Username:" and "Password:" prompts, as Gmail sends them.
                let username = if initial_response.is_empty() {
                    conn.challenge("334 VXNlcm5hbWU6").await?
                } else {
                    initial_response
                };
                if username == "*" {
                    return Ok(AUTH_ABORTED.into());
                }
                let password = conn.challenge("334 UGFzc3dvcmQ6").await?;
                if password == "*" {
                    return Ok(AUTH_ABORTED.into());
                }
                match (decode_base64(&username), decode_base64(&password)) {
                    (Some(username), Some(password)) => (username, password),
                    _ => return Ok(AUTH_UNDECODABLE.into()),
                }
            }
            AUTH_XOAUTH2 => return self.xoauth2(conn, initial_response).await,
            _ => return Ok(AUTH_UNSUPPORTED.into()),
        };

        self.shared.auth_attempts.fetch_add(1, Ordering::SeqCst);
        let accepted =
            username == self.shared.username && password == *self.shared.password.lock().unwrap();
        let reply = match self.script().auth {
            Some(scripted) => scripted,
            None if accepted => AUTH_OK.to_string(),
            None => gmail::BAD_CREDENTIALS.to_string(),
        };
        if is_positive(&reply) {
            self.auth_user = Some(username);
        }
        Ok(reply.into())
    }

    /// AUTH XOAUTH2 as Gmail answers it: 235 for the current access token;
    /// otherwise a 334 challenge with a base64 JSON error, and after the
    /// client's answer to it, 535 5.7.8.
    async fn xoauth2<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        initial_response: String,
    ) -> std::io::Result<Cow<'static, str>> {
        self.shared.xoauth2_attempts.fetch_add(1, Ordering::SeqCst);
        let response = if initial_response.is_empty() {
            conn.challenge("334 ").await?
        } else {
            initial_response
        };
        if let Some(scripted) = self.script().auth {
            return Ok(scripted.into());
        }
        // user=<user> ^A auth=Bearer <token> ^A ^A
        let offered = decode_base64(&response);
        let expected = self
            .shared
            .access_token
            .lock()
            .unwrap()
            .as_ref()
            .map(|token| {
                format!(
                    "user={}\x01auth=Bearer {token}\x01\x01",
                    self.shared.username
                )
            });
        if offered.is_some() && offered == expected {
            self.auth_user = Some(self.shared.username.clone());
            return Ok(AUTH_OK.into());
        }
        let error = BASE64.encode(gmail::XOAUTH2_ERROR);
        let answer = conn.challenge(&format!("334 {error}")).await?;
        self.shared
            .xoauth2_challenge_answers
            .lock()
            .unwrap()
            .push(answer);
        Ok(gmail::BAD_CREDENTIALS.into())
    }

    /// Receives the message after DATA and returns the final reply; the
    /// message is recorded only if that reply is a 2xx.
    async fn data<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        envelope: Envelope,
    ) -> std::io::Result<String> {
        conn.reply(DATA_GO_AHEAD).await?;

        let mut receiver = DataReceiver::new();
        // DataReceiver only recognises a dot at the start of a line once it
        // has seen a CRLF, so feed it the CRLF that ended the DATA command;
        // otherwise a stuffed dot on the first line would not be removed.
        receiver.ingest(&mut b"\r\n".iter(), &mut Vec::new());
        let mut data = Vec::new();
        conn.receive(|bytes| receiver.ingest(bytes, &mut data).then_some(()))
            .await?;
        if self.script().stall_after_data {
            self.shared.stalled.send_modify(|stalled| *stalled += 1);
            std::future::pending::<()>().await;
        }

        let reply = self
            .script()
            .data
            .unwrap_or_else(|| gmail::OK_QUEUED.to_string());
        if is_positive(&reply) {
            let message = Received {
                auth_user: self.auth_user.clone().unwrap_or_default(),
                mail_from: envelope.mail_from,
                rcpt_to: envelope.rcpt_to,
                commands: envelope.commands,
                data,
                connection: self.connection,
            };
            self.shared
                .received
                .send_modify(|received| received.push(message));
        }
        Ok(reply)
    }
}

/// A client stream plus the bytes read from it but not yet parsed, and
/// replies not yet sent: as Postfix does, replies to pipelined commands go
/// out together once the commands read so far are answered.
struct Conn<S> {
    stream: S,
    buf: Vec<u8>,
    pos: usize,
    replies: Vec<u8>,
    /// Keep replies even when no input waits (`Script::answer_with_data`).
    hold: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    fn new(stream: S) -> Self {
        Conn {
            stream,
            buf: Vec::with_capacity(8192),
            pos: 0,
            replies: Vec::new(),
            hold: false,
        }
    }

    /// Feeds buffered input to `ingest` until it yields a value, reading
    /// more from the client whenever the buffer runs dry. `ingest` must
    /// advance the iterator past everything it consumed.
    async fn receive<T>(
        &mut self,
        mut ingest: impl FnMut(&mut Iter<'_, u8>) -> Option<T>,
    ) -> std::io::Result<T> {
        loop {
            let mut bytes = self.buf[self.pos..].iter();
            let value = ingest(&mut bytes);
            self.pos = self.buf.len() - bytes.len();
            if let Some(value) = value {
                return Ok(value);
            }
            self.buf.drain(..self.pos);
            self.pos = 0;
            if !self.hold {
                self.send_replies().await?;
            }
            let read = tokio::time::timeout(READ_TIMEOUT, self.stream.read_buf(&mut self.buf))
                .await
                .map_err(|_| timed_out())??;
            if read == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
        }
    }

    /// Sends an AUTH challenge and returns the client's response line.
    async fn challenge(&mut self, prompt: &str) -> std::io::Result<String> {
        self.reply(prompt).await?;
        let mut line = LineReceiver::new(());
        self.receive(|bytes| line.ingest(bytes).then_some(()))
            .await?;
        Ok(String::from_utf8_lossy(&line.buf).into_owned())
    }

    /// Sends `reply`, or keeps it while pipelined commands wait to be read.
    async fn reply(&mut self, reply: &str) -> std::io::Result<()> {
        self.replies
            .extend_from_slice(format!("{reply}\r\n").as_bytes());
        if self.pos == self.buf.len() && !self.hold {
            self.send_replies().await?;
        }
        Ok(())
    }

    async fn send_replies(&mut self) -> std::io::Result<()> {
        if !self.replies.is_empty() {
            self.stream.write_all(&self.replies).await?;
            self.replies.clear();
            self.stream.flush().await?;
        }
        Ok(())
    }

    /// Sends `reply`; if it is a 421, closes the connection as real servers
    /// do. Returns whether the connection is still open.
    async fn reply_or_close(&mut self, reply: &str) -> std::io::Result<bool> {
        self.reply(reply).await?;
        if reply.starts_with("421") {
            self.close().await;
            return Ok(false);
        }
        Ok(true)
    }

    /// Shuts the stream down cleanly (sending TLS close_notify if any).
    async fn close(&mut self) {
        // The client may already be gone; nothing useful to do about it.
        let _ = self.send_replies().await;
        let _ = self.stream.shutdown().await;
    }
}

fn is_positive(reply: &str) -> bool {
    reply.starts_with('2')
}

fn decode_base64(text: &str) -> Option<String> {
    let bytes = BASE64.decode(text.trim()).ok()?;
    String::from_utf8(bytes).ok()
}

fn timed_out() -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::TimedOut, "client idle for too long")
}
