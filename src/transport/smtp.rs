//! The SMTP transport: delivery to an upstream submission server (Gmail, Microsoft 365, …) with
//! mail-send: TLS always verified, AUTH with the account's app password or an
//! OAuth 2.0 access token (XOAUTH2), and every result turned into an
//! [`Outcome`].

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_send::smtp::AssertReply;
use mail_send::smtp::message::Parameters;
use mail_send::{Credentials, SmtpClient};
use rustls::ProtocolVersion;
use smtp_proto::{AUTH_XOAUTH2, EXT_PIPELINING, EXT_START_TLS, EhloResponse};
use tokio::io::{AsyncRead, AsyncWrite, BufWriter};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tracing::warn;

use super::{BodyFlags, Failure, Outcome, Sent};
use crate::access_tokens::{AccessTokens, TokenSource};
use crate::config::{AccountConfig, AuthMethod, UpstreamTls, preset};
use crate::observe::metrics;
use crate::provider_replies::diagnose;
use crate::reply::Reply;
use crate::secret::Secret;
use transaction::Commands;

mod transaction;

/// Counts the upstream's reply code, when the outcome came with a reply.
fn count_reply(account: &str, outcome: &Outcome) {
    if let Some(reply) = outcome.reply() {
        metrics::upstream_reply(account, reply.code);
    }
}

/// How an account signs in upstream.
enum SignIn {
    /// AUTH PLAIN or LOGIN with the app password.
    Password(Credentials<String>),
    /// AUTH XOAUTH2 with an access token from `tokens`.
    OAuth2 {
        username: String,
        tokens: Arc<dyn AccessTokens>,
    },
}

/// What one sign-in attempt offers.
enum Auth<'a> {
    Password(&'a Credentials<String>),
    XOAuth2 {
        username: &'a str,
        token: &'a Secret,
    },
}

/// One configured upstream account, ready to open connections.
pub struct SmtpTransport {
    name: String,
    host: String,
    port: u16,
    tls: UpstreamTls,
    connector: TlsConnector,
    helo_name: String,
    sign_in: SignIn,
    sender: String,
    timeout: Duration,
    /// The provider preset's setup steps, added to sign-in hints.
    setup: Option<String>,
}

/// Any stream mail-send can speak SMTP over (TCP, or TLS over TCP).
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A signed-in upstream connection, reusable for several messages: a TLS
/// handshake plus AUTH per message is the main cost of a relay.
pub struct SmtpConnection {
    client: SmtpClient<Box<dyn Stream>>,
    /// Whether a transaction may still be open on the server (one ended
    /// without the final reply to DATA, or failed midway). The reply to
    /// DATA ends a transaction by itself (RFC 5321 4.1.1.4): a RSET before
    /// every message would cost a round trip each.
    needs_reset: bool,
    /// The server offers PIPELINING: a transaction's commands go together.
    pipelining: bool,
}

impl SmtpConnection {
    /// Says goodbye; the connection is gone either way.
    pub async fn quit(mut self) {
        let _ = self.client.cmd(b"QUIT\r\n").await;
    }
}

impl SmtpTransport {
    /// `tokens` is asked for the token source of an `auth = "oauth2"`
    /// account only.
    pub fn new(
        name: &str,
        account: &AccountConfig,
        helo_name: &str,
        tokens: &TokenSource,
    ) -> anyhow::Result<Self> {
        let connector = crate::tls::upstream_connector(account.ca_file.as_deref())
            .map_err(|err| anyhow::anyhow!("accounts.{name}.ca_file: {err:#}"))?;
        let sign_in = match account.auth {
            AuthMethod::Password => {
                let password = account
                    .password
                    .as_ref()
                    .expect("config validation requires a password");
                SignIn::Password(Credentials::new(
                    account.username.clone(),
                    password.expose().to_string(),
                ))
            }
            AuthMethod::Oauth2 => SignIn::OAuth2 {
                username: account.username.clone(),
                tokens: tokens(name, account)?,
            },
        };
        Ok(SmtpTransport {
            name: name.to_string(),
            host: account.host.clone(),
            port: account.port,
            tls: account.tls_mode(),
            connector,
            helo_name: helo_name.to_string(),
            sign_in,
            sender: account.sender().to_string(),
            timeout: account.timeout,
            setup: account
                .provider
                .map(|provider| preset(provider).setup_for(name)),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// A refused sign-in with `reply`, with what to do about it. An OAuth
    /// 2.0 account whose token the provider refused (535/534) was refused a
    /// freshly refreshed one too: the password hints do not apply.
    pub fn sign_in_refused(&self, reply: Reply) -> Failure {
        let oauth2 = matches!(self.sign_in, SignIn::OAuth2 { .. });
        let mut failure = sign_in_refused(&self.name, oauth2, reply);
        if let (Some(hint), Some(setup)) = (&mut failure.hint, &self.setup) {
            *hint = format!("{hint}. {setup}");
        }
        failure
    }

    /// Connects, secures and signs in; the error is the attempt's outcome.
    /// Notes in `tls_version` the TLS version as soon as it is negotiated,
    /// so that a failed sign-in still shows it. It stays `None` without TLS
    /// (`tls = "none"`, or failed before).
    pub async fn connect(
        &self,
        tls_version: &mut Option<ProtocolVersion>,
    ) -> Result<SmtpConnection, Outcome> {
        match &self.sign_in {
            SignIn::Password(credentials) => {
                self.connect_with(Auth::Password(credentials), tls_version)
                    .await
            }
            SignIn::OAuth2 {
                username, tokens, ..
            } => {
                self.connect_with_token(username, tokens.as_ref(), tls_version)
                    .await
            }
        }
    }

    /// Signs in with the current access token and, when the provider refuses
    /// it (revoked or expired early), once more with a fresh one, over a new
    /// connection: some servers hang up after a refused AUTH.
    async fn connect_with_token(
        &self,
        username: &str,
        tokens: &dyn AccessTokens,
        tls_version: &mut Option<ProtocolVersion>,
    ) -> Result<SmtpConnection, Outcome> {
        let mut refusal = None;
        for _ in 0..2 {
            let token = super::access_token(tokens, self.timeout).await?;
            match self
                .connect_with(
                    Auth::XOAuth2 {
                        username,
                        token: &token,
                    },
                    tls_version,
                )
                .await
            {
                Err(refused @ Outcome::AuthFailed(_)) => {
                    tokens.refused(&token);
                    refusal = Some(refused);
                }
                connected => return connected,
            }
        }
        Err(refusal.expect("two refusals"))
    }

    async fn connect_with(
        &self,
        auth: Auth<'_>,
        tls_version: &mut Option<ProtocolVersion>,
    ) -> Result<SmtpConnection, Outcome> {
        let opening = self.open(auth, tls_version);
        let outcome = match tokio::time::timeout(self.timeout, opening).await {
            Ok(Ok(connection)) => return Ok(connection),
            Ok(Err(err)) => self.classify(err),
            Err(_) => self.classify(mail_send::Error::Timeout),
        };
        count_reply(&self.name, &outcome);
        Err(outcome)
    }

    /// mail-send's builder, but with TCP_NODELAY: the terminating "." of a
    /// message is a small write of its own, and without NODELAY it waits for
    /// a delayed ACK (~40 ms per message; measured by the load benchmark).
    async fn open(
        &self,
        auth: Auth<'_>,
        tls_version: &mut Option<ProtocolVersion>,
    ) -> mail_send::Result<SmtpConnection> {
        let stream = TcpStream::connect((self.host.as_str(), self.port)).await?;
        stream.set_nodelay(true)?;
        let mut client = SmtpClient {
            stream,
            timeout: self.timeout,
        };
        let mut client = match self.tls {
            UpstreamTls::Implicit => {
                let mut client = client.into_tls(&self.connector, &self.host).await?;
                client.read().await?.assert_positive_completion()?;
                boxed_tls(client, tls_version)
            }
            UpstreamTls::Starttls => {
                client.read().await?.assert_positive_completion()?;
                if !client
                    .ehlo(&self.helo_name)
                    .await?
                    .has_capability(EXT_START_TLS)
                {
                    return Err(mail_send::Error::MissingStartTls);
                }
                boxed_tls(
                    client.start_tls(&self.connector, &self.host).await?,
                    tls_version,
                )
            }
            UpstreamTls::None => {
                client.read().await?.assert_positive_completion()?;
                boxed(client)
            }
        };
        let capabilities = client.ehlo(&self.helo_name).await?;
        match auth {
            Auth::Password(credentials) => {
                client.authenticate(credentials, &capabilities).await?;
            }
            Auth::XOAuth2 { username, token } => {
                self.xoauth2(&mut client, &capabilities, username, token)
                    .await?
            }
        }
        Ok(SmtpConnection {
            client,
            needs_reset: false,
            pipelining: capabilities.has_capability(EXT_PIPELINING),
        })
    }

    /// AUTH XOAUTH2 (Google's and Microsoft's SASL profile). A refusal comes
    /// either at once (Microsoft: `535 5.7.3`) or, as with Gmail, as a `334`
    /// challenge holding a base64 JSON error that the client must answer
    /// with an empty line before the final `535`. mail-send answers that
    /// challenge by sending the token again, so the exchange is done here.
    async fn xoauth2(
        &self,
        client: &mut SmtpClient<Box<dyn Stream>>,
        capabilities: &EhloResponse<String>,
        username: &str,
        token: &Secret,
    ) -> mail_send::Result<()> {
        if capabilities.auth_mechanisms & AUTH_XOAUTH2 == 0 {
            return Err(mail_send::Error::UnsupportedAuthMechanism);
        }
        let initial = BASE64.encode(format!(
            "user={username}\x01auth=Bearer {}\x01\x01",
            token.expose()
        ));
        let mut reply = client.cmd(format!("AUTH XOAUTH2 {initial}\r\n")).await?;
        if reply.code() == 334 {
            self.log_token_refusal(reply.message());
            reply = client.cmd(b"\r\n").await?;
        }
        match reply.code() {
            235 => Ok(()),
            _ => Err(mail_send::Error::AuthenticationFailed(reply)),
        }
    }

    /// Logs what the provider's XOAUTH2 error challenge says (its `status`
    /// and `scope`; it never holds the token).
    fn log_token_refusal(&self, challenge: &str) {
        let error: serde_json::Value = BASE64
            .decode(challenge.trim())
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .unwrap_or_default();
        let field = |name: &str| error[name].as_str().unwrap_or_default().to_string();
        warn!(
            account = %self.name,
            oauth_status = %field("status"),
            oauth_scope = %field("scope"),
            "the upstream refused the OAuth 2.0 access token"
        );
    }

    /// Sends one message over `connection` to `recipients` (at most the
    /// provider's per-message limit). `message` is the content as spooled,
    /// ending in CRLF.
    pub async fn send(
        &self,
        connection: &mut SmtpConnection,
        recipients: &[String],
        flags: BodyFlags,
        message: &[u8],
    ) -> Sent {
        let mut refused = Vec::new();
        let result = self
            .transaction(connection, recipients, flags, message, &mut refused)
            .await;
        connection.needs_reset = !matches!(result, Ok(Some(_)));
        let outcome = match result {
            Ok(Some(reply)) => Some(Outcome::Delivered(reply.into())),
            Ok(None) => None,
            Err(err) => Some(self.classify(err)),
        };
        for counted in refused.iter().map(|(_, refusal)| refusal).chain(&outcome) {
            count_reply(&self.name, counted);
        }
        Sent { refused, outcome }
    }

    /// MAIL, one RCPT per recipient (refusals collected in `refused`), and
    /// DATA when anyone was accepted: `Ok(None)` when no one was.
    async fn transaction(
        &self,
        connection: &mut SmtpConnection,
        recipients: &[String],
        flags: BodyFlags,
        message: &[u8],
        refused: &mut Vec<(String, Outcome)>,
    ) -> mail_send::Result<Option<smtp_proto::Response<String>>> {
        let mut params = Parameters::new();
        let size = message.len().to_string();
        params.add(("SIZE", size.as_str()));
        if flags.eight_bit {
            params.add(("BODY", "8BITMIME"));
        }
        if flags.smtputf8 {
            params.add("SMTPUTF8");
        }
        let commands = Commands::new(connection.needs_reset, &self.sender, &params, recipients);
        let transacted = transaction::run(
            &mut connection.client,
            connection.pipelining,
            &commands,
            message,
        )
        .await;
        refused.extend(
            transacted
                .refused
                .into_iter()
                .map(|(at, reply)| (recipients[at].clone(), self.outcome(reply.into()))),
        );
        transacted.result
    }

    /// A reply's outcome; a refused sign-in gets this account's hint.
    fn outcome(&self, reply: Reply) -> Outcome {
        match Outcome::from_reply(&self.name, reply) {
            Outcome::AuthFailed(failure) => {
                Outcome::AuthFailed(self.sign_in_refused(failure.reply))
            }
            other => other,
        }
    }

    fn classify(&self, err: mail_send::Error) -> Outcome {
        use mail_send::Error;
        let unavailable = |what: String| Outcome::unavailable(what, None);
        match err {
            // Any permanent refusal of AUTH is a sign-in problem; a temporary
            // one (Gmail's 454 "too many login attempts") is retried.
            Error::AuthenticationFailed(reply) => match self.outcome(reply.into()) {
                Outcome::Rejected(failure) => {
                    Outcome::AuthFailed(self.sign_in_refused(failure.reply))
                }
                other => other,
            },
            Error::UnexpectedReply(reply) => self.outcome(reply.into()),
            Error::Timeout => unavailable(format!("timed out after {}s", self.timeout.as_secs())),
            Error::Io(err) => self
                .tls_failure(&err)
                .unwrap_or_else(|| unavailable(err.to_string())),
            Error::Tls(err) => self.describe_tls(&err),
            Error::MissingStartTls => Outcome::unavailable(
                "the server does not offer STARTTLS",
                Some(format!(
                    "if it expects TLS from the start, set accounts.{}.tls = \"implicit\"",
                    self.name
                )),
            ),
            Error::UnsupportedAuthMechanism => match self.sign_in {
                SignIn::Password(_) => unavailable(
                    "the server offers no sign-in method sendbridge supports (PLAIN, LOGIN)"
                        .to_string(),
                ),
                SignIn::OAuth2 { .. } => Outcome::unavailable(
                    "the server does not offer AUTH XOAUTH2",
                    Some(format!(
                        "check accounts.{}.host, or sign in with an app password (auth = \"password\")",
                        self.name
                    )),
                ),
            },
            Error::UnparseableReply => {
                unavailable("the connection closed or the server's reply was not SMTP".to_string())
            }
            other => unavailable(other.to_string()),
        }
    }

    /// A TLS failure that an I/O error wraps.
    fn tls_failure(&self, err: &std::io::Error) -> Option<Outcome> {
        err.get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
            .map(|tls| self.describe_tls(tls))
    }

    fn describe_tls(&self, err: &rustls::Error) -> Outcome {
        match err {
            rustls::Error::InvalidCertificate(reason) => Outcome::unavailable(
                format!("the server's TLS certificate is not trusted ({reason:?})"),
                Some(format!(
                    "if it uses a private CA, set accounts.{}.ca_file",
                    self.name
                )),
            ),
            other => Outcome::unavailable(format!("TLS failed: {other}"), None),
        }
    }
}

/// Boxes the stream behind a write buffer: mail-send writes a message's
/// content, each dot it stuffs and the terminating "." separately, and
/// flushes after every command and message, so the buffer only joins the
/// pieces; over TLS each write would otherwise be a record and a system
/// call of its own. Writes of at least its size pass straight through.
fn boxed<T: Stream + 'static>(client: SmtpClient<T>) -> SmtpClient<Box<dyn Stream>> {
    SmtpClient {
        stream: Box::new(BufWriter::new(client.stream)),
        timeout: client.timeout,
    }
}

/// Like [`boxed`], but first notes the TLS version, which boxing hides.
fn boxed_tls(
    client: SmtpClient<TlsStream<TcpStream>>,
    tls_version: &mut Option<ProtocolVersion>,
) -> SmtpClient<Box<dyn Stream>> {
    *tls_version = client.stream.get_ref().1.protocol_version();
    boxed(client)
}

/// The reason code of every refused sign-in.
const SIGN_IN_REFUSED: &str = "upstream_auth";

/// A refused sign-in and what to do about it: for a refused OAuth 2.0
/// token, what the provider requires of the token; otherwise the
/// provider-specific hint, or where the credentials are configured.
fn sign_in_refused(account: &str, oauth2: bool, reply: Reply) -> Failure {
    let hint = if oauth2 && matches!(reply.code, 534 | 535) {
        format!(
            "the provider refused a freshly refreshed OAuth 2.0 access token: accounts.{account}.username must be the mailbox that signed in (`sendbridge oauth login {account}`), the app needs the mail scope (Gmail https://mail.google.com/, Microsoft SMTP.Send), and Microsoft 365 needs Authenticated SMTP enabled for the mailbox"
        )
    } else {
        diagnose(account, &reply).hint.unwrap_or_else(|| {
            format!("check accounts.{account}.username and accounts.{account}.password")
        })
    };
    Failure {
        reply,
        reason: SIGN_IN_REFUSED,
        hint: Some(hint),
    }
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use tokio::io::ReadBuf;

    use super::*;

    /// A stream that accepts every write, counting them and keeping the
    /// bytes.
    #[derive(Clone, Default)]
    struct Recorder(Arc<std::sync::Mutex<(usize, Vec<u8>)>>);

    impl Recorder {
        fn writes(&self) -> usize {
            self.0.lock().unwrap().0
        }

        fn bytes(&self) -> Vec<u8> {
            self.0.lock().unwrap().1.clone()
        }
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<std::io::Result<usize>> {
            let mut recorded = self.0.lock().unwrap();
            recorded.0 += 1;
            recorded.1.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    impl AsyncRead for Recorder {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            _: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_small_message_reaches_the_stream_in_one_write() {
        let stream = Recorder::default();
        let mut client = boxed(SmtpClient {
            stream: stream.clone(),
            timeout: Duration::from_secs(1),
        });
        // Each dot-stuffed piece and the terminator are written on their
        // own; over TLS each write would be a record and a system call.
        let content = transaction::wire_content(b"Subject: a\r\n\r\n.one\r\n.two\r\nend\r\n");
        transaction::write_content(&mut client.stream, &content)
            .await
            .unwrap();
        assert_eq!(stream.writes(), 1);
    }

    #[tokio::test]
    async fn content_is_written_as_mail_send_writes_it() {
        let contents: [&[u8]; 8] = [
            b"",
            b".",
            b"a.b\r\n.c",
            b"a\r\n..b\r\n...",
            b"bare\n.lf and bare\r.cr",
            b"end with a dot\r\n.",
            b"\r\n.\r\n.\r\n",
            b"no dots at all",
        ];
        for content in contents {
            let theirs = Recorder::default();
            SmtpClient {
                stream: theirs.clone(),
                timeout: Duration::from_secs(1),
            }
            .write_message(content)
            .await
            .unwrap();
            let ours = Recorder::default();
            transaction::write_content(&mut ours.clone(), content)
                .await
                .unwrap();
            assert_eq!(
                String::from_utf8_lossy(&ours.bytes()),
                String::from_utf8_lossy(&theirs.bytes()),
                "{:?}",
                String::from_utf8_lossy(content)
            );
        }
    }

    #[test]
    fn refused_sign_ins_get_the_hint_that_fits_the_account() {
        // (OAuth 2.0 account, code, status, the hint contains)
        let table = [
            (false, 534, [5, 7, 9], "accounts.gmail.password"),
            (false, 535, [5, 7, 3], "check accounts.gmail.username"),
            (
                true,
                535,
                [5, 7, 8],
                "freshly refreshed OAuth 2.0 access token",
            ),
            (true, 530, [5, 7, 0], "accounts.gmail.password"),
        ];
        for (oauth2, code, status, expected) in table {
            let reply = Reply::new(code, status, "Application-specific password required.");
            let failure = sign_in_refused("gmail", oauth2, reply);
            assert_eq!(failure.reason, "upstream_auth");
            let hint = failure.hint.unwrap();
            assert!(hint.contains(expected), "{code}: {hint}");
        }
    }
}
