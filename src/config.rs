//! Typed configuration: built-in defaults < TOML file < `SENDBRIDGE_*` env.
//!
//! Secrets may come from `*_file` keys (Docker and Kubernetes secrets); they
//! are read and trimmed here so the rest of the relay only sees `Secret`s.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize};

use crate::secret::Secret;

mod startup;

pub use startup::Startup;

const GMAIL_HOST: &str = "smtp.gmail.com";
const MICROSOFT_HOST: &str = "smtp.office365.com";
pub const DEFAULT_CONFIG_PATH: &str = "config/sendbridge.toml";
/// Names another default path, still optional: the container image points
/// it at a file that may or may not be mounted.
pub const CONFIG_PATH_ENV: &str = "SENDBRIDGE_CONFIG";
const ENV_PREFIX: &str = "SENDBRIDGE_";

/// An invalid configuration: one message naming the key and the problem.
#[derive(Debug, thiserror::Error)]
#[error("{key}: {problem}")]
pub struct ConfigError {
    pub key: String,
    pub problem: String,
}

impl ConfigError {
    fn new(key: impl Into<String>, problem: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            problem: problem.into(),
        }
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: TlsConfig,
    pub users: BTreeMap<String, UserConfig>,
    pub accounts: BTreeMap<String, AccountConfig>,
    pub spool: SpoolConfig,
    pub delivery: DeliveryConfig,
    pub log: LogConfig,
    pub admin: AdminConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SpoolConfig {
    /// Relative paths are resolved against the working directory.
    pub dir: PathBuf,
}

impl Default for SpoolConfig {
    fn default() -> Self {
        SpoolConfig {
            dir: PathBuf::from("spool"),
        }
    }
}

/// When the client hears back (DESIGN.md, "Delivery model").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// Spool, then wait up to `sync_timeout` for the first attempt.
    #[default]
    Hybrid,
    /// Spool and answer 250 at once.
    Queue,
    /// Answer with the upstream's verdict; the client retries failures.
    Passthrough,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeliveryConfig {
    pub mode: DeliveryMode,
    #[serde(deserialize_with = "duration")]
    pub sync_timeout: Duration,
    /// First retry delay after a temporary failure; doubles per attempt.
    #[serde(deserialize_with = "duration")]
    pub retry_initial: Duration,
    #[serde(deserialize_with = "duration")]
    pub retry_max: Duration,
    /// After this long in the queue a message is given up (moved to rejected/).
    #[serde(deserialize_with = "duration")]
    pub max_age: Duration,
    /// An unused upstream connection is closed after this long.
    #[serde(deserialize_with = "duration")]
    pub idle_timeout: Duration,
    /// How often the queue directory is re-read, so `queue retry` from the
    /// command line takes effect without a signal.
    #[serde(deserialize_with = "duration")]
    pub scan_interval: Duration,
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        DeliveryConfig {
            mode: DeliveryMode::Hybrid,
            sync_timeout: Duration::from_secs(5),
            retry_initial: Duration::from_secs(60),
            retry_max: Duration::from_secs(3600),
            max_age: Duration::from_secs(5 * 24 * 3600),
            idle_timeout: Duration::from_secs(30),
            scan_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Plain SMTP listener; offers STARTTLS when a certificate is available.
    pub listen: SocketAddr,
    /// Optional implicit-TLS listener (SMTPS).
    pub listen_tls: Option<SocketAddr>,
    /// Name used in our greeting and in EHLO towards the upstream.
    pub hostname: String,
    pub max_message_size: usize,
    pub max_recipients: usize,
    pub max_connections: usize,
    /// Clients from these networks may send without AUTH (as `default_account`).
    #[serde(deserialize_with = "networks")]
    pub trusted_networks: Vec<IpNet>,
    pub default_account: Option<String>,
    /// Refuse AUTH on unencrypted connections, except from loopback clients.
    pub require_tls_for_auth: bool,
    /// How long we wait for a client's next command.
    #[serde(deserialize_with = "duration")]
    pub command_timeout: Duration,
    /// How long we wait for each piece of a message during DATA.
    #[serde(deserialize_with = "duration")]
    pub data_timeout: Duration,
    /// How long a whole message may take after DATA, however it trickles in.
    #[serde(deserialize_with = "duration")]
    pub data_deadline: Duration,
    /// Bytes of messages being received that all sessions together may hold
    /// in memory; a message that would exceed it waits briefly, then `452`.
    pub message_memory_budget: usize,
    /// On SIGTERM, how long open sessions may go on before `421 4.3.0`
    /// (and how long in-flight deliveries may take to finish).
    #[serde(deserialize_with = "duration")]
    pub shutdown_grace: Duration,
    /// Failed sign-ins a client address may have per `auth_failure_window`
    /// before its sign-ins are refused (`454 4.7.0`) until the window ends.
    pub auth_failure_limit: u32,
    #[serde(deserialize_with = "duration")]
    pub auth_failure_window: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 2525)),
            listen_tls: None,
            hostname: default_hostname(),
            max_message_size: 25 * 1024 * 1024,
            max_recipients: 100,
            max_connections: 1000,
            trusted_networks: Vec::new(),
            default_account: None,
            require_tls_for_auth: false,
            command_timeout: Duration::from_secs(300),
            data_timeout: Duration::from_secs(180),
            data_deadline: Duration::from_secs(600),
            message_memory_budget: 256 * 1024 * 1024,
            shutdown_grace: Duration::from_secs(10),
            auth_failure_limit: 10,
            auth_failure_window: Duration::from_secs(15 * 60),
        }
    }
}

fn default_hostname() -> String {
    gethostname::gethostname()
        .into_string()
        .ok()
        .filter(|name| !name.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Default for TlsConfig {
    fn default() -> Self {
        TlsConfig {
            cert: PathBuf::from("certs/sendbridge.crt"),
            key: PathBuf::from("certs/sendbridge.key"),
        }
    }
}

/// A local login of a legacy program.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    /// argon2 PHC string, from `sendbridge hash-password`.
    pub password_hash: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<PathBuf>,
    /// The upstream account this login sends through.
    pub account: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    /// AUTH PLAIN/LOGIN with `password` (an app password).
    #[default]
    Password,
    /// AUTH XOAUTH2 with an OAuth 2.0 access token.
    Oauth2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
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
}

/// `[accounts.<name>.oauth2]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    pub provider: OAuthProvider,
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
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Which sessions keep their SMTP dialogue under `<spool>/transcripts/`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transcripts {
    Off,
    /// Sessions that ended in a rejection, local or upstream.
    #[default]
    Rejected,
    All,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// env-filter syntax; `SENDBRIDGE_LOG` overrides it.
    pub level: String,
    pub format: LogFormat,
    pub transcripts: Transcripts,
    /// Transcripts older than this are deleted.
    #[serde(deserialize_with = "duration")]
    pub transcript_max_age: Duration,
    /// The oldest transcripts are deleted beyond this total size.
    pub transcript_max_bytes: u64,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".to_string(),
            format: LogFormat::Text,
            transcripts: Transcripts::Rejected,
            transcript_max_age: Duration::from_secs(7 * 24 * 3600),
            transcript_max_bytes: 50 * 1024 * 1024,
        }
    }
}

/// The operator's HTTP interface: health, readiness, metrics, status page.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// `None` (an empty string in the file) turns the interface off.
    #[serde(deserialize_with = "optional_address")]
    pub listen: Option<SocketAddr>,
    /// Required of every request when set; only then are clients other than
    /// loopback served.
    pub token: Option<Secret>,
    pub token_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Some(SocketAddr::from(([127, 0, 0, 1], 9025))),
            token: None,
            token_file: None,
        }
    }
}

impl AdminConfig {
    fn validate(&mut self) -> Result<(), ConfigError> {
        self.token = resolve_secret("admin.token", self.token.take(), &self.token_file)?;
        let Some(token) = &self.token else {
            return Ok(());
        };
        // It travels in URLs (the status page's links) and headers as is.
        let url_safe = |b: u8| b.is_ascii_alphanumeric() || b"-._~".contains(&b);
        if token.expose().len() < 16 || !token.expose().bytes().all(url_safe) {
            return Err(ConfigError::new(
                "admin.token",
                "use at least 16 letters, digits or -._~ (e.g. the output of `openssl rand -hex 32`)",
            ));
        }
        Ok(())
    }
}

impl Config {
    /// Loads and validates the configuration. `path` is the `--config`
    /// argument: when given it must exist; the default path (or
    /// `$SENDBRIDGE_CONFIG`) is optional so that environment variables alone
    /// can configure the relay.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let file = match path {
            Some(path) if !path.is_file() => {
                return Err(ConfigError::new(
                    "--config",
                    format!("{} does not exist or is not a file", path.display()),
                ));
            }
            Some(path) => path.to_path_buf(),
            None => std::env::var_os(CONFIG_PATH_ENV)
                .map_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH), PathBuf::from),
        };
        Self::from_figment(Figment::from(Toml::file(file)))
    }

    /// Builds the configuration from a TOML string plus the environment; for
    /// tests and `check`.
    pub fn from_toml(toml: &str) -> Result<Config, ConfigError> {
        Self::from_figment(Figment::from(Toml::string(toml)))
    }

    fn from_figment(figment: Figment) -> Result<Config, ConfigError> {
        // Only variables with a `__` name a key: `SENDBRIDGE_LOG` is the log
        // filter, not the `[log]` section.
        let env = Env::prefixed(ENV_PREFIX)
            .filter(|key| key.as_str().contains("__"))
            .split("__");
        let mut figment = figment.merge(env.clone());
        // Figment parses env values, so a password such as `0123` or `true`
        // would arrive as a number or bool, or lose its leading zero. Secrets
        // are merged again as the raw strings they were.
        for (key, raw) in env.iter() {
            if is_secret_key(key.as_str()) {
                figment = figment.merge(Serialized::global(key.as_str(), raw));
            }
        }
        let mut config: Config = figment.extract().map_err(describe_figment_error)?;
        config.validate()?;
        Ok(config)
    }

    /// Checks references between sections and reads secret files.
    pub fn validate(&mut self) -> Result<(), ConfigError> {
        if self.server.hostname.trim().is_empty() {
            return Err(ConfigError::new("server.hostname", "must not be empty"));
        }
        if self.server.max_connections == 0 {
            return Err(ConfigError::new(
                "server.max_connections",
                "must be at least 1",
            ));
        }
        if self.server.message_memory_budget < self.server.max_message_size {
            return Err(ConfigError::new(
                "server.message_memory_budget",
                format!(
                    "must be at least server.max_message_size ({} bytes), or no message of that size could be received",
                    self.server.max_message_size
                ),
            ));
        }
        if self.server.auth_failure_limit == 0 {
            return Err(ConfigError::new(
                "server.auth_failure_limit",
                "must be at least 1",
            ));
        }
        if self.server.auth_failure_window.is_zero() {
            return Err(ConfigError::new(
                "server.auth_failure_window",
                "must be longer than zero",
            ));
        }
        if self.server.max_recipients == 0 {
            return Err(ConfigError::new(
                "server.max_recipients",
                "must be at least 1",
            ));
        }
        for (name, account) in &mut self.accounts {
            account.validate(name)?;
        }
        if let Some(default) = &self.server.default_account {
            if !self.accounts.contains_key(default) {
                return Err(ConfigError::new(
                    "server.default_account",
                    format!("no account named \"{default}\" in [accounts]"),
                ));
            }
        }
        let fallback_account = self.fallback_account().map(str::to_string);
        for (name, user) in &mut self.users {
            user.validate(name, fallback_account.as_deref(), &self.accounts)?;
        }
        self.admin.validate()
    }

    /// The account for logins that name none: `server.default_account`, or
    /// the only account when there is exactly one.
    fn fallback_account(&self) -> Option<&str> {
        match (&self.server.default_account, self.accounts.len()) {
            (Some(name), _) => Some(name),
            (None, 1) => self.accounts.keys().next().map(String::as_str),
            _ => None,
        }
    }
}

impl AccountConfig {
    fn validate(&mut self, name: &str) -> Result<(), ConfigError> {
        let key = |field: &str| format!("accounts.{name}.{field}");
        // The name also names files in the spool.
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(ConfigError::new(
                format!("accounts.{name}"),
                "account names may use letters, digits, - and _ only",
            ));
        }
        if self.host.trim().is_empty() {
            return Err(ConfigError::new(key("host"), "must not be empty"));
        }
        if self.port == 0 {
            return Err(ConfigError::new(key("port"), "must not be 0"));
        }
        if self.max_connections == 0 {
            return Err(ConfigError::new(
                key("max_connections"),
                "must be at least 1",
            ));
        }
        if self.max_recipients_per_message == 0 {
            return Err(ConfigError::new(
                key("max_recipients_per_message"),
                "must be at least 1",
            ));
        }
        if let Some(entry) = self.allowed_from.iter().find(|entry| !entry.contains('@')) {
            return Err(ConfigError::new(
                key("allowed_from"),
                format!("\"{entry}\" is neither an address nor @domain"),
            ));
        }
        let is_field_name = |name: &String| {
            !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
        };
        if let Some(name) = self.remove_headers.iter().find(|name| !is_field_name(name)) {
            return Err(ConfigError::new(
                key("remove_headers"),
                format!("\"{name}\" is not a header field name"),
            ));
        }
        if self.username.trim().is_empty() {
            return Err(ConfigError::new(
                key("username"),
                "missing: set it to the mailbox address, e.g. me@gmail.com",
            ));
        }
        let password = resolve_secret(&key("password"), self.password.take(), &self.password_file)?;
        match (self.auth, password, &mut self.oauth2) {
            (AuthMethod::Password, Some(password), _) => self.password = Some(password),
            (AuthMethod::Password, None, _) => {
                return Err(ConfigError::new(
                    key("password"),
                    "missing: set password or password_file (for Gmail a 16-character app password)",
                ));
            }
            (AuthMethod::Oauth2, _, None) => {
                return Err(ConfigError::new(
                    key("oauth2"),
                    "missing: auth = \"oauth2\" needs [accounts.<name>.oauth2] with provider and client_id",
                ));
            }
            (AuthMethod::Oauth2, _, Some(oauth2)) => {
                oauth2.validate(&key("oauth2"))?;
                // The default host is Gmail's; Microsoft accounts mean Microsoft's.
                if oauth2.provider == OAuthProvider::Microsoft && self.host == GMAIL_HOST {
                    self.host = MICROSOFT_HOST.to_string();
                }
            }
        }
        if let Some(ca_file) = &self.ca_file {
            if !ca_file.is_file() {
                return Err(ConfigError::new(
                    key("ca_file"),
                    format!("{} does not exist", ca_file.display()),
                ));
            }
        }
        Ok(())
    }
}

impl OAuth2Config {
    fn validate(&mut self, prefix: &str) -> Result<(), ConfigError> {
        let key = |field: &str| format!("{prefix}.{field}");
        if self.client_id.trim().is_empty() {
            return Err(ConfigError::new(key("client_id"), "must not be empty"));
        }
        self.client_secret = resolve_secret(
            &key("client_secret"),
            self.client_secret.take(),
            &self.client_secret_file,
        )?;
        if self.provider == OAuthProvider::Custom && self.token_url.is_none() {
            return Err(ConfigError::new(
                key("token_url"),
                "missing: provider = \"custom\" needs token_url (and auth_url or device_url for sign-in)",
            ));
        }
        if self.flow == OAuthFlow::ClientCredentials {
            if self.client_secret.is_none() {
                return Err(ConfigError::new(
                    key("client_secret"),
                    "missing: flow = \"client_credentials\" needs client_secret or client_secret_file",
                ));
            }
            if self.provider == OAuthProvider::Microsoft && self.tenant.is_none() {
                return Err(ConfigError::new(
                    key("tenant"),
                    "missing: app-only sign-in needs the tenant id or domain",
                ));
            }
        }
        Ok(())
    }
}

impl UserConfig {
    fn validate(
        &mut self,
        name: &str,
        fallback_account: Option<&str>,
        accounts: &BTreeMap<String, AccountConfig>,
    ) -> Result<(), ConfigError> {
        let key = |field: &str| format!("users.{name}.{field}");
        let password = resolve_secret(&key("password"), self.password.take(), &self.password_file)?;
        match (&self.password_hash, password) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(
                    key("password_hash"),
                    "set either password_hash or password/password_file, not both",
                ));
            }
            (None, None) => {
                return Err(ConfigError::new(
                    key("password"),
                    "missing: set password, password_file or password_hash",
                ));
            }
            (Some(hash), None) => {
                if argon2::PasswordHash::new(hash).is_err() {
                    return Err(ConfigError::new(
                        key("password_hash"),
                        "not an argon2 PHC string; create one with `sendbridge hash-password`",
                    ));
                }
            }
            (None, Some(password)) => self.password = Some(password),
        }
        match self.account.as_deref().or(fallback_account) {
            Some(account) if accounts.contains_key(account) => {
                self.account = Some(account.to_string());
                Ok(())
            }
            Some(account) => Err(ConfigError::new(
                key("account"),
                format!("no account named \"{account}\" in [accounts]"),
            )),
            None => Err(ConfigError::new(
                key("account"),
                "missing: name the upstream account this login sends through",
            )),
        }
    }
}

/// Exactly one of an inline secret and a secret file; a file's trailing
/// newline (as editors and `echo` leave it) is not part of the secret.
fn resolve_secret(
    key: &str,
    inline: Option<Secret>,
    file: &Option<PathBuf>,
) -> Result<Option<Secret>, ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => Err(ConfigError::new(
            key,
            format!("set either {key} or {key}_file, not both"),
        )),
        (Some(secret), None) => Ok(Some(secret)),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|err| {
                ConfigError::new(
                    format!("{key}_file"),
                    format!("cannot read {}: {err}", path.display()),
                )
            })?;
            let secret = text
                .strip_suffix('\n')
                .map(|rest| rest.strip_suffix('\r').unwrap_or(rest))
                .unwrap_or(&text);
            if secret.is_empty() {
                return Err(ConfigError::new(
                    format!("{key}_file"),
                    format!("{} is empty", path.display()),
                ));
            }
            Ok(Some(Secret::new(secret)))
        }
        (None, None) => Ok(None),
    }
}

fn is_secret_key(key: &str) -> bool {
    let last = key.rsplit('.').next().unwrap_or(key);
    last == "password" || last == "token" || last.ends_with("secret")
}

/// Turns figment's error into `key: problem` without the provider noise.
fn describe_figment_error(err: figment::Error) -> ConfigError {
    use figment::error::{Actual, Kind};

    let key = err.path.join(".");
    let expected = |what: &str| match what {
        "u8" | "u16" | "u32" | "u64" | "usize" | "i32" | "i64" => "a number".to_string(),
        "a boolean" | "bool" => "true or false".to_string(),
        other => other.to_string(),
    };
    let got = |actual: &Actual| match actual {
        Actual::Str(s) => format!("\"{s}\""),
        other => other.to_string(),
    };
    let problem = match &err.kind {
        Kind::InvalidType(actual, exp) | Kind::InvalidValue(actual, exp) => {
            format!("expected {}, got {}", expected(exp), got(actual))
        }
        // figment's path already ends with the unknown key.
        Kind::UnknownField(..) => "unknown key (misspelled?)".to_string(),
        Kind::UnknownVariant(value, allowed) => {
            format!("\"{value}\" is not one of: {}", allowed.join(", "))
        }
        other => other.to_string(),
    };
    ConfigError::new(
        if key.is_empty() {
            "config".to_string()
        } else {
            key
        },
        problem,
    )
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Seconds(u64),
        Text(String),
    }
    match Raw::deserialize(deserializer)? {
        Raw::Seconds(secs) => Ok(Duration::from_secs(secs)),
        Raw::Text(text) => humantime::parse_duration(&text).map_err(|_| {
            serde::de::Error::invalid_value(
                serde::de::Unexpected::Str(&text),
                &"a duration such as 30s, 5m or 1h",
            )
        }),
    }
}

/// An address, or an empty string for none.
fn optional_address<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.trim().is_empty() {
        return Ok(None);
    }
    text.trim().parse().map(Some).map_err(|_| {
        serde::de::Error::invalid_value(
            serde::de::Unexpected::Str(&text),
            &"an address such as 127.0.0.1:9025, or \"\" for off",
        )
    })
}

/// CIDRs; a bare address means that one host.
fn networks<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| {
            text.parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    serde::de::Error::invalid_value(
                        serde::de::Unexpected::Str(text),
                        &"a network such as 192.168.1.0/24 or an address",
                    )
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GMAIL: &str = r#"
        [accounts.gmail]
        username = "me@gmail.com"
        password = "abcdabcdabcdabcd"
        [users.invoices]
        password = "old-password"
    "#;

    #[test]
    fn defaults_follow_the_contract() {
        let config = Config::from_toml(GMAIL).unwrap();
        assert_eq!(config.server.listen.to_string(), "127.0.0.1:2525");
        assert_eq!(config.server.max_message_size, 26_214_400);
        assert_eq!(config.server.max_recipients, 100);
        assert!(config.server.trusted_networks.is_empty());
        let gmail = &config.accounts["gmail"];
        assert_eq!((gmail.host.as_str(), gmail.port), ("smtp.gmail.com", 587));
        assert_eq!(gmail.tls_mode(), UpstreamTls::Starttls);
        assert_eq!(gmail.sender(), "me@gmail.com");
        // The only account is the one a login without `account` uses.
        assert_eq!(config.users["invoices"].account.as_deref(), Some("gmail"));
    }

    #[test]
    fn port_465_means_implicit_tls() {
        let config =
            Config::from_toml(&GMAIL.replace("username =", "port = 465\nusername =")).unwrap();
        assert_eq!(config.accounts["gmail"].tls_mode(), UpstreamTls::Implicit);
    }

    #[test]
    fn type_errors_name_the_key() {
        let err = Config::from_toml(&GMAIL.replace("username =", "port = \"abc\"\nusername ="))
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "accounts.gmail.port: expected a number, got \"abc\""
        );
    }

    #[test]
    fn misspelled_keys_are_named() {
        let err = Config::from_toml("[server]\nlisten_port = 25").unwrap_err();
        assert_eq!(
            err.to_string(),
            "server.listen_port: unknown key (misspelled?)"
        );
    }

    #[test]
    fn the_sign_in_failure_budget_is_at_least_one_failure_per_window() {
        let config =
            Config::from_toml("[server]\nauth_failure_limit = 5\nauth_failure_window = \"1h\"")
                .unwrap();
        assert_eq!(config.server.auth_failure_limit, 5);
        assert_eq!(config.server.auth_failure_window, Duration::from_secs(3600));
        for (bad, key) in [
            ("auth_failure_limit = 0", "server.auth_failure_limit"),
            ("auth_failure_window = \"0s\"", "server.auth_failure_window"),
        ] {
            let err = Config::from_toml(&format!("[server]\n{bad}")).unwrap_err();
            assert_eq!(err.key, key);
        }
    }

    #[test]
    fn unknown_accounts_are_refused() {
        let err = Config::from_toml(&format!("{GMAIL}\naccount = \"outlook\"")).unwrap_err();
        assert_eq!(err.key, "users.invoices.account");
    }

    #[test]
    fn password_file_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("app-password");
        std::fs::write(&file, "abcdabcdabcdabcd\r\n").unwrap();
        let toml = GMAIL.replace(
            "password = \"abcdabcdabcdabcd\"",
            &format!("password_file = {:?}", file.display().to_string()),
        );
        let config = Config::from_toml(&toml).unwrap();
        assert_eq!(
            config.accounts["gmail"].password.as_ref().unwrap().expose(),
            "abcdabcdabcdabcd"
        );
    }

    #[test]
    fn admin_listen_defaults_to_loopback_and_empty_turns_it_off() {
        let config = Config::from_toml("").unwrap();
        assert_eq!(config.admin.listen, Some("127.0.0.1:9025".parse().unwrap()));
        let config = Config::from_toml("[admin]\nlisten = \"\"").unwrap();
        assert_eq!(config.admin.listen, None);
        let err = Config::from_toml("[admin]\nlisten = \"nowhere\"").unwrap_err();
        assert_eq!(err.key, "admin.listen");
    }

    #[test]
    fn admin_token_must_be_long_and_url_safe() {
        let config = Config::from_toml("[admin]\ntoken = \"0123456789abcdef0123\"").unwrap();
        assert_eq!(
            config.admin.token.as_ref().map(Secret::expose),
            Some("0123456789abcdef0123")
        );
        for bad in ["short", "0123456789abcdef 0123", "0123456789abcdef&x=1"] {
            let err = Config::from_toml(&format!("[admin]\ntoken = {bad:?}")).unwrap_err();
            assert_eq!(err.key, "admin.token", "{bad}");
        }
    }

    #[test]
    fn durations_and_networks_are_lenient() {
        let config = Config::from_toml(
            "[server]\ncommand_timeout = \"2m\"\ndata_timeout = 30\ntrusted_networks = [\"10.0.0.0/8\", \"192.168.1.7\"]",
        )
        .unwrap();
        assert_eq!(config.server.command_timeout, Duration::from_secs(120));
        assert_eq!(config.server.data_timeout, Duration::from_secs(30));
        assert_eq!(
            config.server.trusted_networks[1].to_string(),
            "192.168.1.7/32"
        );
    }
}
