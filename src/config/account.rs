//! `[accounts.<name>]`: the provider account a message leaves through,
//! its transport (SMTP or an HTTP API), sign-in (password or OAuth 2.0)
//! and what the relay repairs for it.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::values::duration;
use super::{GMAIL_API_URL, GMAIL_HOST, GRAPH_API_URL, Provider, ServiceAccountKey};
use crate::secret::Secret;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamTls {
    Starttls,
    Implicit,
    None,
}

/// An upstream submission account (Gmail, Microsoft 365, any provider).
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountConfig {
    /// Host, port, TLS and sign-in as this provider documents them; the
    /// keys set here override it (README, "Provider presets").
    pub provider: Option<Provider>,
    pub host: String,
    pub port: u16,
    /// Defaults from the port: 465 is implicit TLS, anything else STARTTLS.
    pub tls: Option<UpstreamTls>,
    pub username: String,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// Extra CA certificates (PEM) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Envelope sender used upstream; defaults to `username`.
    pub sender: Option<String>,
    /// Bound on connecting, TLS, AUTH and each SMTP command upstream.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    /// Concurrent deliveries (and upstream connections) for this account.
    pub max_connections: usize,
    /// What happens to a From address the provider would not let us send as.
    pub from_policy: FromPolicy,
    /// Verified "send mail as" addresses: exact addresses or `@domain`.
    /// The sender and username are always allowed.
    pub allowed_from: Vec<String>,
    /// Header fields removed before sending (Bcc always is).
    pub remove_headers: Vec<String>,
    /// Lines over 998 octets in the body: wrapped, or the message refused.
    pub long_lines: LongLines,
    /// The provider's limit of recipients per message (Gmail: 100); larger
    /// messages are sent as several transactions.
    pub max_recipients_per_message: usize,
    /// Messages per rolling 24 hours; over it, mail waits in the queue.
    pub daily_message_limit: Option<u32>,
    /// Recipients per rolling 24 hours; over it, mail waits in the queue.
    pub daily_recipient_limit: Option<u32>,
    /// How sendbridge signs in upstream.
    pub auth: AuthMethod,
    /// Required with `auth = "oauth2"`.
    pub oauth2: Option<OAuth2Config>,
    /// How messages leave for the provider: SMTP, or an HTTP API.
    pub transport: TransportKind,
    /// The API's bare base URL (`graph`, `gmail-api`), e.g.
    /// `https://graph.microsoft.com`; defaults per transport. For tests and
    /// sovereign clouds.
    pub api_url: Option<String>,
    /// Graph only: keep a copy in the mailbox's Sent Items (Graph's own
    /// default).
    pub save_to_sent_items: bool,
}

/// `accounts.<name>.transport`: the last hop. The spool, holds, retries,
/// repairs, limits, notices and metrics are the same for each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TransportKind {
    /// SMTP submission with `host`, `port` and `tls`.
    #[default]
    Smtp,
    /// Microsoft Graph `sendMail` as the mailbox `username`.
    Graph,
    /// Gmail API `messages.send` as the mailbox `username`.
    GmailApi,
}

impl TransportKind {
    /// The name in the configuration, logs, metrics and the status page.
    pub fn name(self) -> &'static str {
        match self {
            TransportKind::Smtp => "smtp",
            TransportKind::Graph => "graph",
            TransportKind::GmailApi => "gmail-api",
        }
    }

    /// Whether this transport is an HTTP API (signs in with OAuth 2.0 only,
    /// needs no `host` or `port`).
    pub fn is_api(self) -> bool {
        self != TransportKind::Smtp
    }

    fn default_api_url(self) -> Option<&'static str> {
        match self {
            TransportKind::Smtp => None,
            TransportKind::Graph => Some(GRAPH_API_URL),
            TransportKind::GmailApi => Some(GMAIL_API_URL),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// AUTH PLAIN/LOGIN with `password` (an app password).
    #[default]
    Password,
    /// AUTH XOAUTH2 with an OAuth 2.0 access token.
    Oauth2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OAuthProvider {
    Google,
    Microsoft,
    /// Endpoints and scopes from `token_url`, `auth_url`, `device_url`, `scopes`.
    Custom,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OAuthFlow {
    /// A person signs in once (`sendbridge oauth login`); a refresh token
    /// is kept.
    #[default]
    AuthorizationCode,
    /// Like `authorization_code`, but the sign-in happens with a code typed
    /// on any device (Microsoft).
    DeviceCode,
    /// App-only, no person involved (Microsoft `SMTP.SendAsApp`).
    ClientCredentials,
    /// A Google service account with domain-wide delegation signs in as
    /// the mailbox (JWT bearer grant, RFC 7523), no person involved.
    ServiceAccount,
}

/// `[accounts.<name>.oauth2]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    pub provider: OAuthProvider,
    /// Required, except with `flow = "service_account"` (from the key file).
    #[serde(default)]
    pub client_id: String,
    #[serde(default)]
    pub client_secret: Option<Secret>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Microsoft tenant id or domain; default `common` (`organizations` for
    /// device codes), required for client credentials.
    #[serde(default)]
    pub tenant: Option<String>,
    #[serde(default)]
    pub flow: OAuthFlow,
    /// Overrides of the provider's endpoints and scopes (required for
    /// `custom`; also used by tests).
    #[serde(default)]
    pub token_url: Option<String>,
    #[serde(default)]
    pub auth_url: Option<String>,
    #[serde(default)]
    pub device_url: Option<String>,
    #[serde(default)]
    pub scopes: Option<Vec<String>>,
    /// The service account's JSON key (`flow = "service_account"`).
    #[serde(default)]
    pub service_account_file: Option<PathBuf>,
    /// Read from `service_account_file` by validation.
    #[serde(skip)]
    pub service_account: Option<ServiceAccountKey>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FromPolicy {
    /// Send the From header as the program wrote it.
    #[default]
    Keep,
    /// Replace a From address not in `allowed_from` by the account's sender,
    /// keeping the display name; the original goes into Reply-To.
    Rewrite,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LongLines {
    /// Break long lines as Postfix does (CRLF and a space).
    #[default]
    Wrap,
    /// Refuse the message with 550 5.6.0.
    Reject,
}

impl Default for AccountConfig {
    fn default() -> Self {
        AccountConfig {
            provider: None,
            host: GMAIL_HOST.to_string(),
            port: 587,
            tls: None,
            username: String::new(),
            password: None,
            password_file: None,
            ca_file: None,
            sender: None,
            timeout: Duration::from_secs(60),
            max_connections: 4,
            from_policy: FromPolicy::Keep,
            allowed_from: Vec::new(),
            remove_headers: Vec::new(),
            long_lines: LongLines::Wrap,
            max_recipients_per_message: 100,
            daily_message_limit: None,
            daily_recipient_limit: None,
            auth: AuthMethod::Password,
            oauth2: None,
            transport: TransportKind::Smtp,
            api_url: None,
            save_to_sent_items: true,
        }
    }
}

impl AccountConfig {
    pub fn tls_mode(&self) -> UpstreamTls {
        self.tls.unwrap_or(match self.port {
            465 => UpstreamTls::Implicit,
            _ => UpstreamTls::Starttls,
        })
    }

    pub fn sender(&self) -> &str {
        self.sender.as_deref().unwrap_or(&self.username)
    }

    /// The API's base URL without a trailing `/`: `api_url`, or the
    /// transport's own; `None` for SMTP.
    pub fn api_url(&self) -> Option<&str> {
        let url = self
            .api_url
            .as_deref()
            .or(self.transport.default_api_url())?;
        Some(url.trim_end_matches('/'))
    }
}
