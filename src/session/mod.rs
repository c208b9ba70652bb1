//! The inbound SMTP session, generic over the stream so tests can drive it
//! in memory and STARTTLS can restart it over TLS.

mod auth;
mod data;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use smtp_proto::request::receiver::{LineReceiver, MAX_LINE_LENGTH, RequestReceiver};
use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_AUTH, EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING,
    EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS, EhloResponse, MAIL_BODY_8BITMIME, MAIL_BODY_BINARYMIME,
    MAIL_SMTPUTF8, Request,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

pub use auth::{SignedIn, Users, hash_password};

use crate::config::ServerConfig;
use crate::delivery::Delivery;
use crate::policy::Policy;
use crate::reply::Reply;
use crate::secret::Secret;
use crate::spool::Envelope;
use crate::upstream::BodyFlags;
use auth::SaslError;

/// A user name and password from a SASL exchange.
type Credentials = (String, Secret);
use data::DataEnd;

/// Read buffer per connection: small, so idle connections stay cheap.
const READ_BUFFER: usize = 8 * 1024;
/// Like Postfix's `smtpd_hard_error_limit`: a client this confused is dropped.
const MAX_ERRORS: u32 = 20;
const MAX_AUTH_FAILURES: u32 = 3;

/// What every session shares.
pub struct SessionContext {
    pub server: ServerConfig,
    pub users: Users,
    pub policy: Policy,
    pub delivery: Arc<Delivery>,
    pub tls: Option<TlsAcceptor>,
    pub shutdown: CancellationToken,
}

/// How a session ended.
pub enum SessionEnd<S> {
    Closed,
    /// The client asked for STARTTLS: the caller wraps the stream in TLS and
    /// starts a fresh session over it (RFC 3207 forgets all prior state).
    StartTls(S),
}

/// Why the session stopped reading.
enum Stop {
    Eof,
    Timeout,
    Shutdown,
    Io(std::io::Error),
}

struct Transaction {
    account: String,
    mail_from: String,
    recipients: Vec<String>,
    flags: BodyFlags,
}

pub struct Session<S> {
    ctx: Arc<SessionContext>,
    stream: S,
    id: String,
    peer: SocketAddr,
    tls: bool,
    input: Box<[u8]>,
    /// Unconsumed bytes are `input[start..end]`.
    start: usize,
    end: usize,
    output: Vec<u8>,
    requests: RequestReceiver,
    helo: Option<String>,
    signed_in: Option<SignedIn>,
    transaction: Option<Transaction>,
    errors: u32,
    auth_failures: u32,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub fn new(
        ctx: Arc<SessionContext>,
        stream: S,
        id: String,
        peer: SocketAddr,
        tls: bool,
    ) -> Self {
        Session {
            ctx,
            stream,
            id,
            peer,
            tls,
            input: vec![0; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            output: Vec::new(),
            requests: RequestReceiver::default(),
            helo: None,
            signed_in: None,
            transaction: None,
            errors: 0,
            auth_failures: 0,
        }
    }

    /// Runs the session. `greet` is false after STARTTLS, where the client
    /// speaks first.
    pub async fn run(mut self, greet: bool) -> SessionEnd<S> {
        if greet {
            let greeting = Reply::bare(
                220,
                format!("{} ESMTP sendbridge", self.ctx.server.hostname),
            );
            self.reply(greeting);
        }
        let stop = loop {
            match self.next_request().await {
                Ok(Some(request)) => match self.handle(request).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Quit) => break None,
                    Ok(Flow::StartTls) => {
                        if self.flush().await.is_err() {
                            return SessionEnd::Closed;
                        }
                        return SessionEnd::StartTls(self.stream);
                    }
                    Err(stop) => break Some(stop),
                },
                Ok(None) => {}
                Err(stop) => break Some(stop),
            }
            if self.errors >= MAX_ERRORS {
                self.reply(Reply::new(
                    421,
                    [4, 7, 0],
                    "Too many errors, closing connection",
                ));
                break None;
            }
        };
        let hostname = &self.ctx.server.hostname;
        match stop {
            Some(Stop::Timeout) => {
                let reply = Reply::new(
                    421,
                    [4, 4, 2],
                    format!("{hostname} Timeout, closing connection"),
                );
                self.reply(reply);
            }
            Some(Stop::Shutdown) => {
                let reply = Reply::new(
                    421,
                    [4, 3, 0],
                    format!("{hostname} Service shutting down, try again later"),
                );
                self.reply(reply);
            }
            Some(Stop::Io(err)) => tracing::debug!(error = %err, "connection failed"),
            Some(Stop::Eof) | None => {}
        }
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        SessionEnd::Closed
    }

    /// Parses the next command; `Ok(None)` when a syntax error was answered.
    async fn next_request(&mut self) -> Result<Option<Request<String>>, Stop> {
        loop {
            let mut bytes = self.input[self.start..self.end].iter();
            let parsed = self.requests.ingest(&mut bytes).map(Request::into_owned);
            let consumed = self.end - bytes.len() - self.start;
            self.start += consumed;
            let error = match parsed {
                // smtp-proto bounds lines it had to buffer across reads; a
                // line that arrived whole in one read is bounded here.
                Ok(_) if consumed > MAX_LINE_LENGTH => smtp_proto::Error::ResponseTooLong,
                Ok(request) => return Ok(Some(request)),
                Err(smtp_proto::Error::NeedsMoreData { .. }) => {
                    let timeout = self.ctx.server.command_timeout;
                    self.read_more(timeout, true).await?;
                    continue;
                }
                Err(error) => error,
            };
            let reply = match error {
                smtp_proto::Error::ResponseTooLong => Reply::new(500, [5, 5, 2], "Line too long"),
                smtp_proto::Error::UnknownCommand => {
                    Reply::new(500, [5, 5, 2], "Syntax error, command unrecognized")
                }
                smtp_proto::Error::InvalidSenderAddress => {
                    Reply::new(501, [5, 1, 7], "Invalid sender address")
                }
                smtp_proto::Error::InvalidRecipientAddress => {
                    Reply::new(501, [5, 1, 3], "Invalid recipient address")
                }
                smtp_proto::Error::SyntaxError { syntax } => {
                    Reply::new(501, [5, 5, 4], format!("Syntax: {syntax}"))
                }
                smtp_proto::Error::InvalidParameter { param } => {
                    Reply::new(501, [5, 5, 4], format!("Invalid parameter {param}"))
                }
                smtp_proto::Error::UnsupportedParameter { param } => {
                    Reply::new(555, [5, 5, 4], format!("Unsupported parameter {param}"))
                }
                other => Reply::new(500, [5, 5, 2], other.to_string()),
            };
            self.error(reply);
            return Ok(None);
        }
    }

    async fn handle(&mut self, request: Request<String>) -> Result<Flow, Stop> {
        match request {
            Request::Ehlo { host } => self.ehlo(host, true),
            Request::Helo { host } => self.ehlo(host, false),
            Request::StartTls => return Ok(self.starttls()),
            Request::Auth {
                mechanism,
                initial_response,
            } => return self.auth(mechanism, initial_response).await,
            Request::Mail { from } => self.mail(from),
            Request::Rcpt { to } => self.rcpt(to.address),
            Request::Data => return self.data().await,
            Request::Rset => {
                self.transaction = None;
                self.reply(Reply::new(250, [2, 0, 0], "Reset"));
            }
            Request::Noop { .. } => self.reply(Reply::new(250, [2, 0, 0], "OK")),
            Request::Vrfy { .. } => self.reply(Reply::new(
                252,
                [2, 5, 0],
                "Cannot VRFY user, but will accept message and attempt delivery",
            )),
            Request::Help { .. } => self.reply(Reply::new(
                214,
                [2, 0, 0],
                "sendbridge relays mail to the configured provider; see its README",
            )),
            Request::Quit => {
                self.reply(Reply::new(221, [2, 0, 0], "Bye"));
                return Ok(Flow::Quit);
            }
            Request::Lhlo { .. }
            | Request::Bdat { .. }
            | Request::Expn { .. }
            | Request::Etrn { .. }
            | Request::Atrn { .. }
            | Request::Burl { .. } => {
                self.error(Reply::new(502, [5, 5, 1], "Command not implemented"));
            }
        }
        Ok(Flow::Continue)
    }

    fn ehlo(&mut self, host: String, extended: bool) {
        self.transaction = None;
        self.helo = Some(host);
        let hostname = &self.ctx.server.hostname;
        if !extended {
            self.reply(Reply::bare(250, hostname.clone()));
            return;
        }
        let mut ehlo = EhloResponse::new(hostname.as_str());
        ehlo.capabilities =
            EXT_PIPELINING | EXT_SIZE | EXT_8BIT_MIME | EXT_ENHANCED_STATUS_CODES | EXT_SMTP_UTF8;
        ehlo.size = self.ctx.server.max_message_size;
        if self.auth_allowed() && self.signed_in.is_none() {
            ehlo.capabilities |= EXT_AUTH;
            ehlo.auth_mechanisms = AUTH_PLAIN | AUTH_LOGIN;
        }
        if !self.tls && self.ctx.tls.is_some() {
            ehlo.capabilities |= EXT_START_TLS;
        }
        // smtp-proto's first line carries a joke; operators grep for ours.
        let mut lines = Vec::new();
        let _ = ehlo.write(&mut lines);
        let first_line_end = lines.iter().position(|&b| b == b'\n').map_or(0, |i| i + 1);
        self.output
            .extend_from_slice(format!("250-{hostname} at your service\r\n").as_bytes());
        self.output.extend_from_slice(&lines[first_line_end..]);
    }

    fn starttls(&mut self) -> Flow {
        if self.tls {
            self.error(Reply::new(503, [5, 5, 1], "Already running TLS"));
            return Flow::Continue;
        }
        if self.ctx.tls.is_none() {
            self.error(Reply::new(502, [5, 5, 1], "STARTTLS not available"));
            return Flow::Continue;
        }
        self.reply(Reply::new(220, [2, 0, 0], "Ready to start TLS"));
        // Anything pipelined after STARTTLS arrived in plaintext and must not
        // be executed inside the TLS session (CVE-2011-0411).
        self.start = self.end;
        Flow::StartTls
    }

    /// AUTH on unencrypted connections is allowed unless configured
    /// otherwise; loopback clients never cross a network.
    fn auth_allowed(&self) -> bool {
        self.tls || !self.ctx.server.require_tls_for_auth || self.peer.ip().is_loopback()
    }

    async fn auth(&mut self, mechanism: u64, initial_response: String) -> Result<Flow, Stop> {
        if self.helo.is_none() {
            self.error(Reply::new(503, [5, 5, 1], "Send EHLO first"));
            return Ok(Flow::Continue);
        }
        if self.signed_in.is_some() {
            self.error(Reply::new(503, [5, 5, 1], "Already authenticated"));
            return Ok(Flow::Continue);
        }
        if self.transaction.is_some() {
            self.error(Reply::new(
                503,
                [5, 5, 1],
                "AUTH not allowed during a mail transaction",
            ));
            return Ok(Flow::Continue);
        }
        if !self.auth_allowed() {
            self.error(Reply::new(
                538,
                [5, 7, 11],
                "Encryption required: use STARTTLS first",
            ));
            return Ok(Flow::Continue);
        }
        let credentials = match mechanism {
            AUTH_PLAIN => self.sasl_plain(initial_response).await?,
            AUTH_LOGIN => self.sasl_login(initial_response).await?,
            _ => {
                self.error(Reply::new(
                    504,
                    [5, 5, 4],
                    "Unrecognized authentication type; use PLAIN or LOGIN",
                ));
                return Ok(Flow::Continue);
            }
        };
        let (username, password) = match credentials {
            Ok(credentials) => credentials,
            Err(SaslError::Cancelled) => {
                self.error(Reply::new(501, [5, 0, 0], "Authentication cancelled"));
                return Ok(Flow::Continue);
            }
            Err(SaslError::Malformed) => {
                self.error(Reply::new(
                    501,
                    [5, 5, 2],
                    "Cannot decode the AUTH response",
                ));
                return Ok(Flow::Continue);
            }
        };
        match self.ctx.users.verify(&username, password).await {
            Some(signed_in) => {
                info!(user = %signed_in.user, account = %signed_in.account, "client signed in");
                self.signed_in = Some(signed_in);
                self.reply(Reply::new(235, [2, 7, 0], "Authentication successful"));
            }
            None => {
                self.auth_failures += 1;
                warn!(
                    user = ?username,
                    reason = "auth_failed",
                    "local sign-in failed: wrong user name or password; check the SMTP user and password set in the sending program against [users] in the sendbridge config"
                );
                self.error(Reply::new(
                    535,
                    [5, 7, 8],
                    "Authentication credentials invalid",
                ));
                if self.auth_failures >= MAX_AUTH_FAILURES {
                    self.reply(Reply::new(
                        421,
                        [4, 7, 0],
                        "Too many failed sign-ins, closing connection",
                    ));
                    return Ok(Flow::Quit);
                }
            }
        }
        Ok(Flow::Continue)
    }

    async fn sasl_plain(
        &mut self,
        initial: String,
    ) -> Result<Result<Credentials, SaslError>, Stop> {
        let response = if initial.is_empty() {
            self.reply(Reply::bare(334, ""));
            self.read_auth_line().await?
        } else {
            initial
        };
        Ok(auth::decode_response(&response).and_then(|decoded| auth::parse_plain(&decoded)))
    }

    async fn sasl_login(
        &mut self,
        initial: String,
    ) -> Result<Result<Credentials, SaslError>, Stop> {
        let username = if initial.is_empty() {
            self.reply(Reply::bare(334, auth::LOGIN_USERNAME_CHALLENGE));
            self.read_auth_line().await?
        } else {
            initial
        };
        let username = match auth::decode_response(&username).and_then(auth::parse_login_field) {
            Ok(username) => username,
            Err(err) => return Ok(Err(err)),
        };
        self.reply(Reply::bare(334, auth::LOGIN_PASSWORD_CHALLENGE));
        let password = self.read_auth_line().await?;
        Ok(auth::decode_response(&password)
            .and_then(auth::parse_login_field)
            .map(|password| (username, Secret::new(password))))
    }

    /// One line of a SASL exchange. It holds a secret: never log it.
    async fn read_auth_line(&mut self) -> Result<String, Stop> {
        let mut line = LineReceiver::new(());
        loop {
            let mut bytes = self.input[self.start..self.end].iter();
            let complete = line.ingest(&mut bytes);
            self.start = self.end - bytes.len();
            if complete {
                return Ok(String::from_utf8_lossy(&line.buf).into_owned());
            }
            self.read_more(self.ctx.server.command_timeout, false)
                .await?;
        }
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>) {
        if self.helo.is_none() {
            return self.error(Reply::new(503, [5, 5, 1], "Send HELO or EHLO first"));
        }
        if self.transaction.is_some() {
            return self.error(Reply::new(503, [5, 5, 1], "Nested MAIL command"));
        }
        let user_account = self.signed_in.as_ref().map(|s| s.account.as_str());
        let account = match self.ctx.policy.account_for(user_account, self.peer.ip()) {
            Ok(account) => account,
            Err(reply) => {
                warn!(
                    from = ?from.address,
                    reason = "relay_denied",
                    reply = %reply,
                    "refused MAIL from a client that did not sign in and is not in server.trusted_networks"
                );
                return self.error(reply);
            }
        };
        if from.flags & MAIL_BODY_BINARYMIME != 0 {
            return self.error(Reply::new(
                555,
                [5, 5, 4],
                "BODY=BINARYMIME is not supported",
            ));
        }
        if from.size > self.ctx.server.max_message_size {
            return self.error(Reply::new(
                552,
                [5, 3, 4],
                format!(
                    "Message size exceeds fixed maximum message size ({} bytes)",
                    self.ctx.server.max_message_size
                ),
            ));
        }
        self.transaction = Some(Transaction {
            account,
            mail_from: from.address,
            recipients: Vec::new(),
            flags: BodyFlags {
                eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
                smtputf8: from.flags & MAIL_SMTPUTF8 != 0,
            },
        });
        self.reply(Reply::new(250, [2, 1, 0], "Sender OK"));
    }

    fn rcpt(&mut self, address: String) {
        let max = self.ctx.server.max_recipients;
        let Some(transaction) = self.transaction.as_mut() else {
            return self.error(Reply::new(503, [5, 5, 1], "Send MAIL first"));
        };
        if transaction.recipients.len() >= max {
            return self.reply(Reply::new(
                452,
                [4, 5, 3],
                format!("Too many recipients (at most {max})"),
            ));
        }
        transaction.recipients.push(address);
        self.reply(Reply::new(250, [2, 1, 5], "Recipient OK"));
    }

    async fn data(&mut self) -> Result<Flow, Stop> {
        match &self.transaction {
            None => {
                self.error(Reply::new(503, [5, 5, 1], "Send MAIL first"));
                return Ok(Flow::Continue);
            }
            Some(transaction) if transaction.recipients.is_empty() => {
                self.error(Reply::new(503, [5, 5, 1], "Send RCPT first"));
                return Ok(Flow::Continue);
            }
            Some(_) => {}
        }
        self.reply(Reply::bare(354, "Start mail input; end with <CRLF>.<CRLF>"));
        let received = self.receive_message().await?;
        let transaction = self.transaction.take().expect("checked above");
        let message = match received {
            DataEnd::Complete(message) => message,
            DataEnd::TooLarge(size) => {
                let max = self.ctx.server.max_message_size;
                warn!(
                    from = ?transaction.mail_from,
                    size,
                    reason = "too_large",
                    "refused a message over server.max_message_size ({max} bytes)"
                );
                self.reply(Reply::new(
                    552,
                    [5, 3, 4],
                    format!("Message size exceeds fixed maximum message size ({max} bytes)"),
                ));
                return Ok(Flow::Continue);
            }
        };
        let envelope = Envelope {
            session_id: self.id.clone(),
            client: self.peer.to_string(),
            user: self.signed_in.as_ref().map(|s| s.user.clone()),
            account: transaction.account,
            mail_from: transaction.mail_from,
            recipients: transaction.recipients,
            flags: transaction.flags,
            ..Envelope::default()
        };
        let (user, account, from, recipients, size) = (
            envelope.user.clone(),
            envelope.account.clone(),
            envelope.mail_from.clone(),
            envelope.recipients.len(),
            message.len(),
        );
        // The client hears nothing until the message is stored (and, per the
        // delivery mode, attempted): flush what we owe it now.
        self.flush().await.map_err(Stop::Io)?;
        let started = Instant::now();
        let reply = self.ctx.delivery.submit(envelope, message).await;
        info!(
            user = user.as_deref().unwrap_or("-"),
            account = %account,
            from = ?from,
            recipients,
            size,
            reply = %reply,
            duration_ms = started.elapsed().as_millis() as u64,
            "message received"
        );
        self.reply(reply);
        Ok(Flow::Continue)
    }

    /// Reads more bytes into the empty input buffer. `interruptible` lets a
    /// shutdown end the wait; a message in progress is never cut off by it.
    async fn read_more(&mut self, timeout: Duration, interruptible: bool) -> Result<(), Stop> {
        self.flush().await.map_err(Stop::Io)?;
        debug_assert_eq!(self.start, self.end, "all buffered input is consumed first");
        let shutdown = self.ctx.shutdown.clone();
        let read = tokio::time::timeout(timeout, self.stream.read(&mut self.input));
        let result = tokio::select! {
            result = read => result,
            _ = shutdown.cancelled(), if interruptible => return Err(Stop::Shutdown),
        };
        match result {
            Err(_) => Err(Stop::Timeout),
            Ok(Err(err)) => Err(Stop::Io(err)),
            Ok(Ok(0)) => Err(Stop::Eof),
            Ok(Ok(n)) => {
                self.start = 0;
                self.end = n;
                Ok(())
            }
        }
    }

    fn reply(&mut self, reply: Reply) {
        reply.write_to(&mut self.output);
    }

    fn error(&mut self, reply: Reply) {
        self.errors += 1;
        self.reply(reply);
    }

    async fn flush(&mut self) -> std::io::Result<()> {
        if self.output.is_empty() {
            return Ok(());
        }
        let write = async {
            self.stream.write_all(&self.output).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.ctx.server.command_timeout, write).await {
            Ok(result) => result?,
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
        self.output.clear();
        Ok(())
    }
}

enum Flow {
    Continue,
    Quit,
    StartTls,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};

    /// The context and the spool directory it uses (removed when dropped).
    fn context(toml: &str) -> (Arc<SessionContext>, tempfile::TempDir) {
        let spool = tempfile::tempdir().unwrap();
        let mut config = Config::from_toml(toml).unwrap();
        config.spool.dir = spool.path().to_path_buf();
        config.server.hostname = "relay.test".to_string();
        let ctx = Arc::new(SessionContext {
            users: Users::new(&config).unwrap(),
            policy: Policy::new(&config),
            delivery: Delivery::start(&config, CancellationToken::new()).unwrap(),
            server: config.server,
            tls: None,
            shutdown: CancellationToken::new(),
        });
        (ctx, spool)
    }

    /// A session over an in-memory pipe; returns the client's end.
    fn start(
        (ctx, _spool): &(Arc<SessionContext>, tempfile::TempDir),
    ) -> (BufReader<DuplexStream>, tokio::task::JoinHandle<()>) {
        let ctx = ctx.clone();
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer = "192.0.2.10:40000".parse().unwrap();
        let session = Session::new(ctx, server, "test".into(), peer, false);
        let task = tokio::spawn(async move {
            session.run(true).await;
        });
        (BufReader::new(client), task)
    }

    async fn line(client: &mut BufReader<DuplexStream>) -> String {
        let mut line = String::new();
        client.read_line(&mut line).await.unwrap();
        line
    }

    #[tokio::test(start_paused = true)]
    async fn idle_client_is_dropped_after_command_timeout() {
        let ctx = context("[server]\ncommand_timeout = \"5m\"");
        let (mut client, task) = start(&ctx);
        assert!(line(&mut client).await.starts_with("220 relay.test"));
        let started = tokio::time::Instant::now();

        let reply = line(&mut client).await;

        assert_eq!(
            reply,
            "421 4.4.2 relay.test Timeout, closing connection\r\n"
        );
        assert_eq!(started.elapsed(), Duration::from_secs(300));
        task.await.unwrap();
        assert_eq!(line(&mut client).await, "", "connection closed");
    }

    #[tokio::test(start_paused = true)]
    async fn stalled_data_is_dropped_after_data_timeout() {
        let ctx = context(
            "[server]\ncommand_timeout = \"5m\"\ndata_timeout = \"3m\"\ntrusted_networks = [\"192.0.2.0/24\"]\ndefault_account = \"gmail\"\n\
             [accounts.gmail]\nusername = \"me@gmail.com\"\npassword = \"x\"",
        );
        let (mut client, task) = start(&ctx);
        line(&mut client).await;
        client
            .get_mut()
            .write_all(
                b"HELO printer\r\nMAIL FROM:<a@b.example>\r\nRCPT TO:<c@d.example>\r\nDATA\r\n",
            )
            .await
            .unwrap();
        for expected in ["250 ", "250 2.1.0", "250 2.1.5", "354 "] {
            assert!(line(&mut client).await.starts_with(expected));
        }
        client
            .get_mut()
            .write_all(b"Subject: half a message\r\n")
            .await
            .unwrap();
        let started = tokio::time::Instant::now();

        let reply = line(&mut client).await;

        assert!(reply.starts_with("421 4.4.2"), "{reply}");
        assert_eq!(started.elapsed(), Duration::from_secs(180));
        task.await.unwrap();
    }

    #[tokio::test]
    async fn too_many_errors_close_the_session() {
        let ctx = context("");
        let (mut client, task) = start(&ctx);
        line(&mut client).await;
        client
            .get_mut()
            .write_all("FROB\r\n".repeat(MAX_ERRORS as usize).as_bytes())
            .await
            .unwrap();
        for _ in 0..MAX_ERRORS {
            assert!(line(&mut client).await.starts_with("500 5.5.2"));
        }
        assert_eq!(
            line(&mut client).await,
            "421 4.7.0 Too many errors, closing connection\r\n"
        );
        task.await.unwrap();
    }
}
