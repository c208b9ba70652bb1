//! The inbound SMTP session, generic over the stream so tests can drive it
//! in memory and STARTTLS can restart it over TLS.

mod connection;
mod data;
mod dot_reader;
mod ehlo;
mod mail;
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

use smtp_proto::Request;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;
use tracing::debug;

pub use record::SessionRecord;
pub use transcript::clean as clean_transcripts;

use crate::config::{Config, ServerConfig, Transcripts};
use crate::delivery::Delivery;
use crate::policy::{Choice, Policy, Trust};
use crate::reply::{Refusal, Reply};
use crate::rewrite::RewritePolicy;
use crate::transport::BodyFlags;
use crate::users::{CredentialCache, SignedIn, Users};
use connection::{Connection, Line, Stop};
use memory::MemoryBudget;
use throttle::SignInThrottle;

/// Like Postfix's `smtpd_hard_error_limit`: a client this confused is dropped.
const MAX_ERRORS: u32 = 20;
const MAX_AUTH_FAILURES: u32 = 3;

/// What every session shares.
pub struct SessionContext {
    settings: RwLock<Arc<Settings>>,
    pub delivery: Arc<Delivery>,
    /// Cancelled when the shutdown grace period is over: open sessions
    /// answer `421` and close.
    pub close_sessions: CancellationToken,
    pub transcripts_dir: PathBuf,
    /// Shared by every session: `server.message_memory_budget`.
    memory: MemoryBudget,
    /// Outlives reloads, which replace the users.
    sign_in_throttle: Mutex<SignInThrottle>,
    /// Outlives reloads too, which drop the entries of changed users.
    credentials: Arc<CredentialCache>,
}

/// What a session needs to know of the listener its client came in on
/// (set at start, like the listener).
#[derive(Debug)]
pub struct ListenerRules {
    /// The key that configured the listener (`server.listen`,
    /// `listeners[1]`), for hints.
    pub key: String,
    pub trust: Trust,
    /// The listener speaks `starttls` and has a certificate.
    pub offers_starttls: bool,
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
    /// `sendmail.user`: who mail from the maildrop is sent as.
    pub sendmail_user: Option<String>,
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
            sendmail_user: config.sendmail.user.clone(),
        })
    }
}

impl SessionContext {
    pub fn new(
        settings: Settings,
        delivery: Arc<Delivery>,
        close_sessions: CancellationToken,
    ) -> anyhow::Result<Self> {
        Ok(SessionContext {
            memory: MemoryBudget::new(
                settings.server.message_memory_budget,
                settings.server.max_message_size,
            ),
            settings: RwLock::new(Arc::new(settings)),
            transcripts_dir: delivery.spool().transcripts_dir(),
            delivery,
            close_sessions,
            sign_in_throttle: Mutex::default(),
            credentials: Arc::new(CredentialCache::new()?),
        })
    }

    pub fn settings(&self) -> Arc<Settings> {
        self.settings.read().expect("settings lock").clone()
    }

    /// New sessions and the next command of open ones use `settings`.
    pub fn replace_settings(&self, settings: Settings) {
        let mut current = self.settings.write().expect("settings lock");
        let cache_on = !settings.server.auth_cache_ttl.is_zero();
        self.credentials
            .retain(|user| cache_on && current.users.same_password(&settings.users, user));
        *current = Arc::new(settings);
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

struct Transaction {
    account: Choice,
    mail_from: String,
    recipients: Vec<String>,
    flags: BodyFlags,
    /// MAIL FROM's SIZE= (RFC 1870), 0 when not given: the message buffer
    /// is sized for it up front.
    declared_size: usize,
}

pub struct Session<S> {
    ctx: Arc<SessionContext>,
    settings: Arc<Settings>,
    conn: Connection<S>,
    id: String,
    peer: SocketAddr,
    listener: Arc<ListenerRules>,
    tls: bool,
    helo: Option<String>,
    /// EHLO rather than HELO, for the Received field.
    extended: bool,
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
        listener: Arc<ListenerRules>,
        tls: bool,
        record: SessionRecord,
    ) -> Self {
        let settings = ctx.settings();
        let conn = Connection::new(
            stream,
            !tls,
            settings.server.command_timeout,
            ctx.close_sessions.clone(),
            record,
        );
        Session {
            settings,
            ctx,
            conn,
            id,
            peer,
            listener,
            tls,
            helo: None,
            extended: false,
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
                format!("{} ESMTP sendbridge", self.settings.server.hostname),
            );
            self.reply(greeting);
        }
        let stop = loop {
            self.settings = self.ctx.settings();
            self.conn
                .set_command_timeout(self.settings.server.command_timeout);
            match self.next_request().await {
                Ok(Some(request)) => match self.handle(request).await {
                    Ok(Flow::Continue) => {}
                    Ok(Flow::Quit) => break None,
                    Ok(Flow::StartTls) => {
                        return match self.conn.start_tls().await {
                            Ok((stream, mut record)) => {
                                record.note("TLS started");
                                SessionEnd::StartTls(stream, record)
                            }
                            Err(record) => SessionEnd::Closed(record),
                        };
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
        SessionEnd::Closed(self.conn.close().await)
    }

    /// Reads and parses the next command; `Ok(None)` when an error was
    /// answered.
    async fn next_request(&mut self) -> Result<Option<Request<String>>, Stop> {
        if let Line::TooLong = self.conn.read_line().await? {
            self.error(Reply::new(500, [5, 5, 2], "Line too long"));
            return Ok(None);
        }
        match Request::parse(&mut self.conn.line().iter()) {
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
            Request::Rset => self.rset(),
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

    /// Notes a refusal for the session's closing log line and transcript.
    fn rejected(&mut self, reply: &Reply, refusal: Refusal, message_id: Option<String>) {
        debug!(reason = refusal.reason, reply = %reply, "refused");
        self.conn.record.rejected(reply, refusal, message_id);
    }

    fn reply(&mut self, reply: Reply) {
        self.conn.reply(&reply);
    }

    fn error(&mut self, reply: Reply) {
        self.errors += 1;
        self.reply(reply);
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
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, DuplexStream};

    /// The context and the spool directory it uses (removed when dropped).
    pub(super) fn context(toml: &str) -> (Arc<SessionContext>, tempfile::TempDir) {
        let spool = tempfile::tempdir().unwrap();
        let mut config = Config::from_toml(toml).unwrap();
        config.spool.dir = spool.path().to_path_buf();
        config.server.hostname = "relay.test".to_string();
        let tokens = crate::oauth::token_service(&config.spool.dir);
        let delivery = Delivery::start(&config, CancellationToken::new(), tokens).unwrap();
        let settings = Settings::new(&config).unwrap();
        let ctx = SessionContext::new(settings, delivery, CancellationToken::new()).unwrap();
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
        let listener = Arc::new(ListenerRules {
            key: "server.listen".into(),
            trust: Trust::Server,
            offers_starttls: false,
        });
        let session = Session::new(ctx, server, "test".into(), peer, listener, false, record);
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
