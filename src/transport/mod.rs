//! How messages leave the relay: what every transport returns (an
//! [`Outcome`] per attempt, per recipient) and the seam the delivery engine
//! calls ([`Transport`], [`Connection`]). A new transport (an HTTP API such
//! as Microsoft Graph sendMail or the Gmail API) is a module beside `smtp`
//! and one variant of each enum here; delivery does not change.

pub mod api_recipients;
pub mod gmail_api;
pub mod graph;
mod graph_large;
mod graph_token;
pub mod http;
pub mod smtp;

use rustls::ProtocolVersion;

use crate::access_tokens::{AccessTokens, TokenFailure, TokenSource};
use crate::config::{AccountConfig, TransportKind};
use crate::provider_replies::{Class, Diagnosis, diagnose};
use crate::reply::Reply;
use crate::secret::Secret;

/// How one attempt to hand a message to the provider ended (DESIGN.md,
/// "Outcome classes").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The provider accepted the message (its 2xx reply).
    Delivered(Reply),
    /// A permanent rejection of the message or a recipient.
    Rejected(Failure),
    /// The provider refused our sign-in: the account's secret needs fixing.
    AuthFailed(Failure),
    /// The provider's sending limit (Gmail 550 5.4.5): wait for its window;
    /// never a bounce.
    OverLimit(Failure),
    /// Worth retrying: a 4xx reply, or no reply at all.
    Deferred(Deferral),
}

/// A provider's answer that did not deliver, with the stable reason code for
/// logs and what to change, as fields of their own (never inside the reply).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub reply: Reply,
    pub reason: &'static str,
    pub hint: Option<String>,
}

/// A temporary failure, with the provider's reply or without one
/// (unreachable server, TLS failure, timeout, no access token).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deferral {
    pub reply: Option<Reply>,
    /// What went wrong: the reply, or what failed when there was none.
    pub what: String,
    pub reason: &'static str,
    pub hint: Option<String>,
    /// How long the provider asked us to wait (HTTP `Retry-After`): the
    /// next attempt comes no sooner.
    pub retry_after: Option<std::time::Duration>,
}

/// The reason code of a refused sign-in that only a person can fix by
/// signing in again (an OAuth 2.0 refresh token refused): the account is
/// held and the `signin_needed` alert says what to run.
pub const SIGN_IN_NEEDED: &str = "signin_needed";

/// The reason code of a failure without a reply.
const UNAVAILABLE: &str = "upstream_unavailable";

impl Outcome {
    /// Sorts a provider's reply into the classes of DESIGN.md, known
    /// provider replies first, with their reason code and hint for
    /// `account`.
    pub fn from_reply(account: &str, reply: Reply) -> Outcome {
        if (200..300).contains(&reply.code) {
            return Outcome::Delivered(reply);
        }
        let Diagnosis {
            class,
            reason,
            hint,
        } = diagnose(account, &reply);
        match class {
            Class::AuthFailed => Outcome::AuthFailed(Failure {
                reply,
                reason,
                hint,
            }),
            Class::Rejected => Outcome::Rejected(Failure {
                reply,
                reason,
                hint,
            }),
            Class::OverLimit => Outcome::OverLimit(Failure {
                reply,
                reason,
                hint,
            }),
            Class::Deferred => Outcome::Deferred(Deferral {
                what: reply.to_string(),
                reply: Some(reply),
                reason,
                hint,
                retry_after: None,
            }),
        }
    }

    /// No reply: `what` failed, and `hint` says what may fix it.
    pub fn unavailable(what: impl Into<String>, hint: Option<String>) -> Outcome {
        Outcome::Deferred(Deferral {
            reply: None,
            what: what.into(),
            reason: UNAVAILABLE,
            hint,
            retry_after: None,
        })
    }

    /// The provider's reply, unless there was none.
    pub fn reply(&self) -> Option<&Reply> {
        match self {
            Outcome::Delivered(reply) => Some(reply),
            Outcome::Rejected(failure)
            | Outcome::AuthFailed(failure)
            | Outcome::OverLimit(failure) => Some(&failure.reply),
            Outcome::Deferred(deferral) => deferral.reply.as_ref(),
        }
    }

    /// One line for the log and the envelope's history, with the whole
    /// reply.
    pub fn describe(&self) -> String {
        let (what, reply) = match self {
            Outcome::Delivered(reply) => ("delivered", reply),
            Outcome::Rejected(failure) => ("rejected", &failure.reply),
            Outcome::AuthFailed(failure) => ("sign-in refused", &failure.reply),
            Outcome::OverLimit(failure) => ("over the sending limit", &failure.reply),
            Outcome::Deferred(deferral) => match &deferral.reply {
                Some(reply) => ("deferred", reply),
                None => return format!("deferred: {}", deferral.what),
            },
        };
        format!("{what}: {}", reply.one_line())
    }
}

impl Deferral {
    /// What went wrong and, when known, what to change, in one sentence:
    /// for someone who sees no separate hint (an SMTP client, a table cell).
    pub fn explained(&self) -> String {
        match &self.hint {
            Some(hint) => format!("{}; {hint}", self.what),
            None => self.what.clone(),
        }
    }
}

/// What the client declared in MAIL FROM that the upstream must hear too.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BodyFlags {
    pub eight_bit: bool,
    pub smtputf8: bool,
}

/// What one transaction did.
#[derive(Debug)]
pub struct Sent {
    /// Recipients refused one by one, each with its own outcome.
    pub refused: Vec<(String, Outcome)>,
    /// The verdict for the other recipients: the reply to the message, or
    /// what ended the transaction. `None` when every recipient was refused.
    pub outcome: Option<Outcome>,
}

/// One configured account's way to the provider, ready to open connections.
pub enum Transport {
    Smtp(smtp::SmtpTransport),
    Graph(graph::GraphTransport),
    GmailApi(gmail_api::GmailApiTransport),
}

/// An open, signed-in connection of a [`Transport`], reusable for several
/// messages.
pub enum Connection {
    Smtp(smtp::SmtpConnection),
    /// HTTPS connections are the client's to reuse; nothing is open here.
    Graph,
    /// Likewise.
    GmailApi,
}

impl Transport {
    /// The transport `account` is configured for. `tokens` is asked for the
    /// token source of an `auth = "oauth2"` account only.
    pub fn new(
        name: &str,
        account: &AccountConfig,
        helo_name: &str,
        tokens: &TokenSource,
    ) -> anyhow::Result<Self> {
        match account.transport {
            TransportKind::Smtp => {
                smtp::SmtpTransport::new(name, account, helo_name, tokens).map(Transport::Smtp)
            }
            TransportKind::Graph => {
                graph::GraphTransport::new(name, account, tokens).map(Transport::Graph)
            }
            TransportKind::GmailApi => {
                gmail_api::GmailApiTransport::new(name, account, tokens).map(Transport::GmailApi)
            }
        }
    }

    /// Which transport this is (`accounts.<name>.transport`).
    pub fn kind(&self) -> TransportKind {
        match self {
            Transport::Smtp(_) => TransportKind::Smtp,
            Transport::Graph(_) => TransportKind::Graph,
            Transport::GmailApi(_) => TransportKind::GmailApi,
        }
    }

    pub fn name(&self) -> &str {
        match self {
            Transport::Smtp(smtp) => smtp.name(),
            Transport::Graph(graph) => graph.name(),
            Transport::GmailApi(gmail) => gmail.name(),
        }
    }

    /// Connects and signs in. The error is the attempt's outcome.
    pub async fn connect(&self) -> Result<Connection, Outcome> {
        match self {
            Transport::Smtp(smtp) => smtp.connect(&mut None).await.map(Connection::Smtp),
            Transport::Graph(graph) => graph.connect().await.map(|()| Connection::Graph),
            Transport::GmailApi(gmail) => gmail.connect().await.map(|()| Connection::GmailApi),
        }
    }

    /// Sends one message over `connection` (opened by this transport) to
    /// `recipients`, at most the provider's per-message limit. `message` is
    /// the content as spooled, ending in CRLF.
    pub async fn send(
        &self,
        connection: &mut Connection,
        recipients: &[String],
        flags: BodyFlags,
        message: &[u8],
    ) -> Sent {
        match (self, connection) {
            (Transport::Smtp(smtp), Connection::Smtp(connection)) => {
                smtp.send(connection, recipients, flags, message).await
            }
            (Transport::Graph(graph), Connection::Graph) => graph.send(recipients, message).await,
            (Transport::GmailApi(gmail), Connection::GmailApi) => {
                gmail.send(recipients, message).await
            }
            _ => unreachable!("a connection is used with the transport that opened it"),
        }
    }

    /// Checks that signing in works (for an account on hold, and `sendbridge
    /// check`), and notes in `tls_version` the TLS version as soon as it is
    /// negotiated, so that a refused sign-in still shows it.
    pub async fn probe(&self, tls_version: &mut Option<ProtocolVersion>) -> Result<(), Outcome> {
        match self {
            Transport::Graph(graph) => graph.probe().await,
            Transport::GmailApi(gmail) => gmail.probe().await,
            Transport::Smtp(_) => {
                self.connect_noting(tls_version).await?.quit().await;
                Ok(())
            }
        }
    }

    async fn connect_noting(
        &self,
        tls_version: &mut Option<ProtocolVersion>,
    ) -> Result<Connection, Outcome> {
        match self {
            Transport::Smtp(smtp) => smtp.connect(tls_version).await.map(Connection::Smtp),
            Transport::Graph(graph) => graph.connect().await.map(|()| Connection::Graph),
            Transport::GmailApi(gmail) => gmail.connect().await.map(|()| Connection::GmailApi),
        }
    }

    /// What an API transport's access allows, for `sendbridge check`; `None`
    /// for SMTP, where signing in says it all.
    pub async fn access(&self) -> Option<String> {
        match self {
            Transport::Smtp(_) => None,
            Transport::Graph(graph) => Some(graph.access().await),
            Transport::GmailApi(gmail) => Some(gmail.access()),
        }
    }

    /// A refused sign-in with `reply`, with the hint that fits this account
    /// (for a hold carried over from the previous run).
    pub fn sign_in_refused(&self, reply: Reply) -> Failure {
        match self {
            Transport::Smtp(smtp) => smtp.sign_in_refused(reply),
            Transport::Graph(graph) => graph.sign_in_refused(reply),
            Transport::GmailApi(gmail) => gmail.sign_in_refused(reply),
        }
    }
}

impl Connection {
    /// Whether the server may have closed it while it was idle, so that a
    /// failure without a reply says nothing about the message. An API
    /// transport has no connection of its own to go stale.
    pub fn may_have_gone_stale(&self) -> bool {
        matches!(self, Connection::Smtp(_))
    }

    /// Says goodbye; the connection is gone either way.
    pub async fn quit(self) {
        match self {
            Connection::Smtp(connection) => connection.quit().await,
            Connection::Graph | Connection::GmailApi => {}
        }
    }
}

/// The current access token of an OAuth 2.0 account, within the account's
/// `timeout`: a token service that hangs must not hold up the account's
/// workers for good.
async fn access_token(
    tokens: &dyn AccessTokens,
    timeout: std::time::Duration,
) -> Result<Secret, Outcome> {
    match tokio::time::timeout(timeout, tokens.current()).await {
        Ok(token) => token.map_err(token_failure),
        Err(_) => Err(token_failure(TokenFailure::Unavailable {
            reason: format!("no answer within {}s", timeout.as_secs()),
        })),
    }
}

/// Sends the request `request` builds with the current access token; when
/// the API refuses the token (401), once more with a fresh one, and that
/// answer stands. For the HTTP API transports.
async fn send_with_token(
    http: &http::HttpClient,
    tokens: &dyn AccessTokens,
    timeout: std::time::Duration,
    request: impl Fn() -> http::Request,
) -> Result<http::Response, Outcome> {
    let mut refused = None;
    for _ in 0..2 {
        let token = access_token(tokens, timeout).await?;
        let response = http
            .send(request().bearer(&token))
            .await
            .map_err(|what| Outcome::unavailable(what, None))?;
        if response.status != 401 {
            return Ok(response);
        }
        tokens.refused(&token);
        refused = Some(response);
    }
    Ok(refused.expect("two refusals"))
}

/// No access token: a person must sign in again (the account goes on hold,
/// with the token service's hint), or the token service is unreachable for
/// now (retried).
fn token_failure(failure: TokenFailure) -> Outcome {
    match failure {
        TokenFailure::SignInNeeded { reason, hint } => Outcome::AuthFailed(Failure {
            reply: Reply::new(
                535,
                [5, 7, 8],
                format!("OAuth 2.0 sign-in needed: {reason}"),
            ),
            reason: SIGN_IN_NEEDED,
            hint: Some(hint),
        }),
        TokenFailure::Unavailable { reason } => {
            Outcome::unavailable(format!("no OAuth 2.0 access token: {reason}"), None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(code: u16, status: [u8; 3]) -> Outcome {
        Outcome::from_reply("gmail", Reply::new(code, status, "text"))
    }

    #[test]
    fn replies_sort_into_outcome_classes() {
        assert!(matches!(outcome(250, [2, 0, 0]), Outcome::Delivered(_)));
        assert!(matches!(outcome(535, [5, 7, 8]), Outcome::AuthFailed(_)));
        assert!(matches!(outcome(534, [5, 7, 9]), Outcome::AuthFailed(_)));
        assert!(matches!(outcome(530, [5, 7, 0]), Outcome::AuthFailed(_)));
        assert!(matches!(outcome(535, [5, 7, 139]), Outcome::AuthFailed(_)));
        assert!(matches!(outcome(550, [5, 7, 30]), Outcome::AuthFailed(_)));
        assert!(matches!(outcome(550, [5, 7, 1]), Outcome::Rejected(_)));
        assert!(matches!(outcome(550, [5, 1, 1]), Outcome::Rejected(_)));
        assert!(matches!(outcome(550, [5, 4, 5]), Outcome::OverLimit(_)));
        assert!(matches!(
            outcome(421, [4, 7, 0]),
            Outcome::Deferred(Deferral { reply: Some(_), .. })
        ));
    }

    #[test]
    fn outcomes_carry_reason_and_hint_as_fields() {
        let Outcome::OverLimit(failure) = outcome(550, [5, 4, 5]) else {
            panic!("Gmail's daily limit");
        };
        assert_eq!(failure.reason, "daily_limit");
        assert!(
            failure
                .hint
                .unwrap()
                .contains("accounts.gmail.daily_message_limit")
        );
        assert_eq!(failure.reply.text, "text", "the reply stays the provider's");
    }

    #[test]
    fn a_deferral_explains_itself_with_its_hint() {
        // (what, hint, explained)
        let table = [
            ("timed out after 30s", None, "timed out after 30s"),
            (
                "the server does not offer STARTTLS",
                Some("set accounts.a.tls"),
                "the server does not offer STARTTLS; set accounts.a.tls",
            ),
        ];
        for (what, hint, explained) in table {
            let Outcome::Deferred(deferral) = Outcome::unavailable(what, hint.map(String::from))
            else {
                panic!("no reply defers");
            };
            assert_eq!(deferral.reason, "upstream_unavailable");
            assert_eq!(deferral.explained(), explained);
        }
    }

    #[test]
    fn a_needed_oauth_sign_in_holds_with_the_token_services_hint() {
        let failure = TokenFailure::SignInNeeded {
            reason: "invalid_grant".into(),
            hint: "run `sendbridge oauth login gmail`".into(),
        };
        let Outcome::AuthFailed(failure) = token_failure(failure) else {
            panic!("a needed sign-in is a refused sign-in");
        };
        assert_eq!(
            failure.reply.to_string(),
            "535 5.7.8 OAuth 2.0 sign-in needed: invalid_grant"
        );
        assert_eq!(
            failure.hint.as_deref(),
            Some("run `sendbridge oauth login gmail`")
        );
        assert_eq!(failure.reason, "signin_needed", "its own alert");
    }

    #[test]
    fn an_unavailable_token_service_defers() {
        let failure = TokenFailure::Unavailable {
            reason: "timeout".into(),
        };
        assert_eq!(
            token_failure(failure),
            Outcome::unavailable("no OAuth 2.0 access token: timeout", None)
        );
    }
}
