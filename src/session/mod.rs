//! The inbound SMTP session, generic over the stream so tests can drive it
//! in memory and STARTTLS can restart it over TLS.

mod data;
mod input;
mod memory;
mod record;
mod sasl;
mod sign_in;
mod throttle;
mod transcript;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use smtp_proto::{
    AUTH_LOGIN, AUTH_PLAIN, EXT_8BIT_MIME, EXT_AUTH, EXT_ENHANCED_STATUS_CODES, EXT_PIPELINING,
    EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS, EhloResponse, MAIL_BODY_8BITMIME, MAIL_BODY_BINARYMIME,
    MAIL_SMTPUTF8, Request,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

pub use record::SessionRecord;
pub use transcript::clean as clean_transcripts;

use crate::address::{AddressError, Role, parse_command_path};
use crate::config::{Config, ServerConfig, Transcripts};
use crate::delivery::Delivery;
use crate::policy::Policy;
use crate::reply::{Refusal, Reply};
use crate::rewrite::{RewriteError, RewritePolicy, Trace, rewrite};
use crate::spool::Envelope;
use crate::upstream::BodyFlags;
use crate::users::{SignedIn, Users};
use data::DataEnd;
use input::Line;
use memory::MemoryBudget;
use throttle::SignInThrottle;

/// Read buffer per connection: small, so idle connections stay cheap.
const READ_BUFFER: usize = 8 * 1024;
/// Like Postfix's `smtpd_hard_error_limit`: a client this confused is dropped.
const MAX_ERRORS: u32 = 20;
const MAX_AUTH_FAILURES: u32 = 3;

/// What every session shares.
pub struct SessionContext {
    settings: RwLock<Arc<Settings>>,
    pub delivery: Arc<Delivery>,
    pub tls: Option<TlsAcceptor>,
    pub shutdown: CancellationToken,
    pub transcripts_dir: PathBuf,
    /// Shared by every session: `server.message_memory_budget`.
    memory: MemoryBudget,
    /// Outlives reloads, which replace the users.
    sign_in_throttle: Mutex<SignInThrottle>,
}

/// The part of the configuration a reload replaces; a session picks up the
/// current one before each command.
pub struct Settings {
    pub server: ServerConfig,
    pub users: Users,
    pub policy: Policy,
    /// Per upstream account.
    pub rewrites: HashMap<String, RewritePolicy>,
    pub transcripts: Transcripts,
}

impl Settings {
    /// Hashes plain-text passwords: slow on purpose, so not on the runtime.
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let rewrites = config
            .accounts
            .iter()
            .map(|(name, account)| {
                let policy = RewritePolicy::new(account, &config.server.hostname);
                (name.clone(), policy)
            })
            .collect();
        Ok(Settings {
            server: config.server.clone(),
            users: Users::new(config)?,
            policy: Policy::new(config),
            rewrites,
            transcripts: config.log.transcripts,
        })
    }
}

impl SessionContext {
    pub fn new(
        settings: Settings,
        delivery: Arc<Delivery>,
        tls: Option<TlsAcceptor>,
        shutdown: CancellationToken,
    ) -> Self {
        SessionContext {
            memory: MemoryBudget::new(
                settings.server.message_memory_budget,
                settings.server.max_message_size,
            ),
            settings: RwLock::new(Arc::new(settings)),
            transcripts_dir: delivery.spool().transcripts_dir(),
            delivery,
            tls,
            shutdown,
            sign_in_throttle: Mutex::default(),
        }
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("settings lock").clone()
    }

    /// New sessions and the next command of open ones use `settings`.
    pub fn replace_settings(&self, settings: Settings) {
        *self.settings.write().expect("settings lock") = Arc::new(settings);
    }
}

/// How a session ended. The record goes on to the next session over TLS,
/// or to [`SessionRecord::finish`].
pub enum SessionEnd<S> {
    Closed(SessionRecord),
    /// The client asked for STARTTLS: the caller wraps the stream in TLS and
    /// starts a fresh session over it (RFC 3207 forgets all prior state).
    StartTls(S, SessionRecord),
}

/// Why the session stopped reading.
enum Stop {
    Eof,
    Timeout,
    Shutdown,
    /// The first bytes were a TLS handshake on the plain port.
    TlsOnPlainPort,
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
    settings: Arc<Settings>,
    stream: S,
    id: String,
    peer: SocketAddr,
    tls: bool,
    input: Box<[u8]>,
    /// Unconsumed bytes are `input[start..end]`.
    start: usize,
    end: usize,
    output: Vec<u8>,
    /// The command line being read, kept while it is handled.
    line: Vec<u8>,
    lines_read: u64,
    helo: Option<String>,
    /// EHLO rather than HELO, for the Received field.
    extended: bool,
    signed_in: Option<SignedIn>,
    transaction: Option<Transaction>,
    errors: u32,
    auth_failures: u32,
    record: SessionRecord,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Session<S> {
    pub fn new(
        ctx: Arc<SessionContext>,
        stream: S,
        id: String,
        peer: SocketAddr,
        tls: bool,
        record: SessionRecord,
    ) -> Self {
        Session {
            settings: ctx.settings(),
            ctx,
            stream,
            id,
            peer,
            tls,
            input: vec![0; READ_BUFFER].into_boxed_slice(),
            start: 0,
            end: 0,
            output: Vec::new(),
            line: Vec::new(),
            lines_read: 0,
            helo: None,
            extended: false,
            signed_in: None,
            transaction: None,
            errors: 0,
            auth_failures: 0,
            record,
        }
    }

    /// Runs the session. `greet` is false after STARTTLS, where the client
    /// speaks first.
    pub async fn run(mut self, greet: bool) -> SessionEnd<S> {
        if greet {
            let greeting = Reply::bare(
                220,
                format!("{} ESMTP sendbridge", self.settings.server.hostname),
            );
            self.reply(greeting);
        }
        let stop = loop {
            self.settings = self.ctx.settings();
            match self.next_request().await {
                Ok(Some(request)) => match self.handle(request).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Quit) => break None,
                    Ok(Flow::StartTls) => {
                        if self.flush().await.is_err() {
                            return SessionEnd::Closed(self.record);
                        }
                        self.record.note("TLS started");
                        return SessionEnd::StartTls(self.stream, self.record);
                    }
                    Err(stop) => break Some(stop),
                },
                Ok(None) => {}
                Err(stop) => break Some(stop),
            }
            if self.errors >= MAX_ERRORS {
                let reply = Reply::new(421, [4, 7, 0], "Too many errors, closing connection");
                let hint = "the client does not speak SMTP as expected; see its transcript (log.transcripts)";
                self.rejected(&reply, Refusal::new("protocol_errors", hint), None);
                self.reply(reply);
                break None;
            }
        };
        let hostname = &self.settings.server.hostname;
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
            Some(Stop::TlsOnPlainPort) => {
                // Nothing an SMTP reply could say reaches a TLS client.
                let reply = Reply::new(500, [5, 5, 1], "This port speaks plain SMTP; use STARTTLS");
                let hint = match self.settings.server.listen_tls {
                    Some(tls) => format!("the client speaks TLS on the plain port: point it at the implicit-TLS port {} (server.listen_tls), or set it to STARTTLS", tls.port()),
                    None => "the client speaks TLS on the plain port: give it an implicit-TLS listener (server.listen_tls, usually port 465), or set it to STARTTLS".to_string(),
                };
                self.rejected(&reply, Refusal::new("tls_on_plain_port", hint), None);
            }
            Some(Stop::Io(err)) => tracing::debug!(error = %err, "connection failed"),
            Some(Stop::Eof) | None => {}
        }
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
        SessionEnd::Closed(self.record)
    }

    /// Reads and parses the next command; `Ok(None)` when an error was
    /// answered.
    async fn next_request(&mut self) -> Result<Option<Request<String>>, Stop> {
        if let Line::TooLong = self.read_line().await? {
            self.error(Reply::new(500, [5, 5, 2], "Line too long"));
            return Ok(None);
        }
        match Request::parse(&mut self.line.iter()) {
            Ok(request) => Ok(Some(request.into_owned())),
            Err(error) => {
                self.error(parse_error_reply(error));
                Ok(None)
            }
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
            Request::Rcpt { .. } => self.rcpt(),
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
        self.extended = extended;
        let hostname = &self.settings.server.hostname;
        if !extended {
            self.reply(Reply::bare(250, hostname.clone()));
            return;
        }
        let mut ehlo = EhloResponse::new(hostname.as_str());
        ehlo.capabilities =
            EXT_PIPELINING | EXT_SIZE | EXT_8BIT_MIME | EXT_ENHANCED_STATUS_CODES | EXT_SMTP_UTF8;
        ehlo.size = self.settings.server.max_message_size;
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
        self.tls || !self.settings.server.require_tls_for_auth || self.peer.ip().is_loopback()
    }

    fn mail(&mut self, from: smtp_proto::MailFrom<String>) {
        if self.helo.is_none() {
            return self.error(Reply::new(503, [5, 5, 1], "Send HELO or EHLO first"));
        }
        if self.transaction.is_some() {
            return self.error(Reply::new(503, [5, 5, 1], "Nested MAIL command"));
        }
        let user_account = self.signed_in.as_ref().map(|s| s.account.as_str());
        let account = match self
            .settings
            .policy
            .account_for(user_account, self.peer.ip())
        {
            Ok(account) => account,
            Err(reply) => {
                let hint = "the client neither signed in nor is in server.trusted_networks: set the SMTP user and password from [users] in the sending program, or add its network to server.trusted_networks";
                self.rejected(&reply, Refusal::new("relay_denied", hint), None);
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
        if from.size > self.settings.server.max_message_size {
            let (reply, refusal) = self.too_large();
            self.rejected(&reply, refusal, None);
            return self.error(reply);
        }
        let smtputf8 = from.flags & MAIL_SMTPUTF8 != 0;
        let mail_from = match parse_command_path(&self.line, Role::Sender, smtputf8) {
            Ok(address) => address,
            Err(error) => return self.bad_address(error, Role::Sender),
        };
        self.transaction = Some(Transaction {
            account,
            mail_from,
            recipients: Vec::new(),
            flags: BodyFlags {
                eight_bit: from.flags & MAIL_BODY_8BITMIME != 0,
                smtputf8,
            },
        });
        self.reply(Reply::new(250, [2, 1, 0], "Sender OK"));
    }

    fn rcpt(&mut self) {
        let max = self.settings.server.max_recipients;
        let Some(transaction) = self.transaction.as_mut() else {
            return self.error(Reply::new(503, [5, 5, 1], "Send MAIL first"));
        };
        let smtputf8 = transaction.flags.smtputf8;
        let address = match parse_command_path(&self.line, Role::Recipient, smtputf8) {
            Ok(address) => address,
            Err(error) => return self.bad_address(error, Role::Recipient),
        };
        let transaction = self.transaction.as_mut().expect("checked above");
        if transaction.recipients.len() >= max {
            let reply = Reply::new(
                452,
                [4, 5, 3],
                format!("Too many recipients (at most {max})"),
            );
            let hint = format!(
                "the client sent more than server.max_recipients ({max}) recipients; raise it (messages over the provider's limit are sent in parts)"
            );
            self.rejected(&reply, Refusal::new("too_many_recipients", hint), None);
            return self.reply(reply);
        }
        transaction.recipients.push(address);
        self.reply(Reply::new(250, [2, 1, 5], "Recipient OK"));
    }

    /// Refuses an address smtp-proto let through but RFC 5321 does not.
    fn bad_address(&mut self, error: AddressError, role: Role) {
        let status = match role {
            Role::Sender => [5, 1, 7],
            Role::Recipient => [5, 1, 3],
        };
        let reply = match error {
            AddressError::Syntax => Reply::new(501, status, "Invalid address syntax (RFC 5321)"),
            AddressError::ControlCharacter => Reply::new(
                501,
                status,
                "Control characters are not allowed in addresses",
            ),
            AddressError::NeedsSmtpUtf8 => Reply::new(
                553,
                [5, 6, 7],
                "Non-ASCII address without SMTPUTF8: declare it on MAIL FROM (RFC 6531)",
            ),
        };
        self.error(reply);
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
        let command_end_bare = !self.line.ends_with(b"\r\n");
        let received = self.receive_message(command_end_bare).await?;
        let transaction = self.transaction.take().expect("checked above");
        // `_memory` is held until the message is stored.
        let (message, bare_end, _memory) = match received {
            DataEnd::Complete {
                message,
                bare_end,
                memory,
            } => (message, bare_end, memory),
            DataEnd::NoMemory => {
                self.record
                    .note("message over server.message_memory_budget, not kept");
                let reply = Reply::new(
                    452,
                    [4, 3, 1],
                    "Insufficient system resources, try again later",
                );
                let budget = self.settings.server.message_memory_budget;
                let hint = format!(
                    "messages being received at once exceeded server.message_memory_budget ({budget} bytes); the client retries later, or raise the budget"
                );
                self.rejected(&reply, Refusal::new("memory_budget", hint), None);
                self.reply(reply);
                return Ok(Flow::Continue);
            }
            DataEnd::TooLarge => {
                self.record
                    .note("message over server.max_message_size, not kept");
                let (reply, refusal) = self.too_large();
                self.rejected(&reply, refusal, None);
                self.reply(reply);
                return Ok(Flow::Continue);
            }
        };
        self.record.message(&message);
        let account = transaction.account.clone();
        let Some(policy) = self.settings.rewrites.get(&account) else {
            // The account was removed by a reload during the transaction.
            let reply = Reply::new(451, [4, 3, 5], "No such upstream account configured");
            let hint = format!("add [accounts.{account}] to the configuration");
            self.rejected(&reply, Refusal::new("no_account", hint), None);
            self.reply(reply);
            return Ok(Flow::Continue);
        };
        let rewritten = match rewrite(message, policy, &self.trace()) {
            Ok(mut rewritten) => {
                if bare_end {
                    rewritten
                        .changes
                        .push("accepted <LF>.<LF> as the end of the message".to_string());
                }
                rewritten
            }
            Err(RewriteError::LineTooLong { line, length }) => {
                let reply = Reply::new(
                    550,
                    [5, 6, 0],
                    format!(
                        "Line {line} is {length} octets long; at most 998 are allowed (RFC 5322)"
                    ),
                );
                let hint = format!(
                    "the program sends lines over 998 octets; set accounts.{account}.long_lines = \"wrap\" to wrap them instead"
                );
                self.rejected(&reply, Refusal::new("long_lines", hint), None);
                self.reply(reply);
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
        let (user, from, recipients, size) = (
            envelope.user.clone(),
            envelope.mail_from.clone(),
            envelope.recipients.len(),
            rewritten.message.len(),
        );
        // The client hears nothing until the message is stored (and, per the
        // delivery mode, attempted): flush what we owe it now.
        self.flush().await.map_err(Stop::Io)?;
        let started = Instant::now();
        let submitted = self.ctx.delivery.submit(envelope, rewritten.message).await;
        info!(
            id = submitted.id.as_deref().unwrap_or("-"),
            user = user.as_deref().unwrap_or("-"),
            account = %account,
            from = ?from,
            recipients,
            size,
            rewrites = ?rewritten.changes,
            reply = %submitted.reply,
            duration_ms = started.elapsed().as_millis() as u64,
            "message received"
        );
        match submitted.refusal {
            Some(refusal) => self.rejected(&submitted.reply, refusal, submitted.id),
            None => self.record.accepted(),
        }
        self.reply(submitted.reply);
        Ok(Flow::Continue)
    }

    fn too_large(&self) -> (Reply, Refusal) {
        let max = self.settings.server.max_message_size;
        let reply = Reply::new(
            552,
            [5, 3, 4],
            format!("Message size exceeds fixed maximum message size ({max} bytes)"),
        );
        let hint = format!(
            "the message is larger than server.max_message_size ({max} bytes); the provider's own limit (Gmail: 25 MB) applies too"
        );
        (reply, Refusal::new("too_large", hint))
    }

    /// Where the message came from, for the Received field.
    fn trace(&self) -> Trace {
        let protocol = match (self.extended, self.tls, self.signed_in.is_some()) {
            (false, _, _) => "SMTP",
            (true, false, false) => "ESMTP",
            (true, false, true) => "ESMTPA",
            (true, true, false) => "ESMTPS",
            (true, true, true) => "ESMTPSA",
        };
        Trace {
            helo: self.helo.clone().unwrap_or_default(),
            client_ip: self.peer.ip(),
            protocol,
            session_id: self.id.clone(),
            now_unix: crate::spool::unix_millis() as i64 / 1000,
        }
    }

    /// Notes a refusal for the session's closing log line and transcript.
    fn rejected(&mut self, reply: &Reply, refusal: Refusal, message_id: Option<String>) {
        debug!(reason = refusal.reason, reply = %reply, "refused");
        self.record.rejected(reply, refusal, message_id);
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
        self.record.server(&self.output);
        let write = async {
            self.stream.write_all(&self.output).await?;
            self.stream.flush().await
        };
        match tokio::time::timeout(self.settings.server.command_timeout, write).await {
            Ok(result) => result?,
            Err(_) => return Err(std::io::ErrorKind::TimedOut.into()),
        }
        self.output.clear();
        Ok(())
    }
}

/// The answer to a command line smtp-proto could not parse.
fn parse_error_reply(error: smtp_proto::Error) -> Reply {
    use smtp_proto::Error;
    match error {
        Error::UnknownCommand => Reply::new(500, [5, 5, 2], "Syntax error, command unrecognized"),
        Error::InvalidSenderAddress => Reply::new(501, [5, 1, 7], "Invalid sender address"),
        Error::InvalidRecipientAddress => Reply::new(501, [5, 1, 3], "Invalid recipient address"),
        Error::SyntaxError { syntax } => Reply::new(501, [5, 5, 4], format!("Syntax: {syntax}")),
        Error::InvalidParameter { param } => {
            Reply::new(501, [5, 5, 4], format!("Invalid parameter {param}"))
        }
        Error::UnsupportedParameter { param } => {
            Reply::new(555, [5, 5, 4], format!("Unsupported parameter {param}"))
        }
        // A whole line that still "needs more data" is malformed.
        Error::NeedsMoreData { .. } => Reply::new(500, [5, 5, 2], "Syntax error"),
        other => Reply::new(500, [5, 5, 2], other.to_string()),
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
    use std::time::Duration;
    use tokio::io::{AsyncBufReadExt, BufReader, DuplexStream};

    /// The context and the spool directory it uses (removed when dropped).
    pub(super) fn context(toml: &str) -> (Arc<SessionContext>, tempfile::TempDir) {
        let spool = tempfile::tempdir().unwrap();
        let mut config = Config::from_toml(toml).unwrap();
        config.spool.dir = spool.path().to_path_buf();
        config.server.hostname = "relay.test".to_string();
        let tokens = crate::oauth::token_service(&config.spool.dir);
        let delivery = Delivery::start(&config, CancellationToken::new(), tokens).unwrap();
        let settings = Settings::new(&config).unwrap();
        let ctx = SessionContext::new(settings, delivery, None, CancellationToken::new());
        let ctx = Arc::new(ctx);
        (ctx, spool)
    }

    /// A session over an in-memory pipe; returns the client's end.
    pub(super) fn start(
        (ctx, _spool): &(Arc<SessionContext>, tempfile::TempDir),
    ) -> (BufReader<DuplexStream>, tokio::task::JoinHandle<()>) {
        let ctx = ctx.clone();
        let (client, server) = tokio::io::duplex(64 * 1024);
        let peer = "192.0.2.10:40000".parse().unwrap();
        let record = SessionRecord::new(&ctx, "test", peer);
        let session = Session::new(ctx, server, "test".into(), peer, false, record);
        let task = tokio::spawn(async move {
            session.run(true).await;
        });
        (BufReader::new(client), task)
    }

    pub(super) async fn line(client: &mut BufReader<DuplexStream>) -> String {
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
