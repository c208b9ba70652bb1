//! Typed configuration: the sections and keys with their defaults.
//! Loading (defaults < TOML file < `SENDBRIDGE_*` env) is in `load`, checks
//! and `*_file` secrets (Docker and Kubernetes secrets) in `validate`, how
//! durations, addresses and networks are read in `values`, and which
//! settings take effect only at start in `startup`.

mod account;
mod listeners;
mod load;
mod presets;
mod service_account;
mod startup;
mod validate;
mod values;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::secret::Secret;
use values::{duration, networks, optional_address};

pub use account::*;
pub use listeners::{Listener, ListenerConfig, ListenerTls, TlsProfile};
pub use presets::{Preset, Provider, preset};
pub use service_account::ServiceAccountKey;
pub use startup::Startup;

const GMAIL_HOST: &str = "smtp.gmail.com";
const MICROSOFT_HOST: &str = "smtp.office365.com";
const GRAPH_API_URL: &str = "https://graph.microsoft.com";
const GMAIL_API_URL: &str = "https://gmail.googleapis.com";
pub const DEFAULT_CONFIG_PATH: &str = "config/sendbridge.toml";
/// Names another default path, still optional: the container image points
/// it at a file that may or may not be mounted.
pub const CONFIG_PATH_ENV: &str = "SENDBRIDGE_CONFIG";
/// Read when neither `--config` nor `$SENDBRIDGE_CONFIG` names a file and
/// `config/sendbridge.toml` is not in the working directory: `sendmail`
/// runs from cron and PHP in any directory, and should find its relay.
pub const SYSTEM_CONFIG_PATH: &str = "/etc/sendbridge/sendbridge.toml";

/// Which secrets a command reads and requires. Only commands that sign in
/// upstream or send mail themselves (`run`, `check`, `oauth`, `notify
/// test`) need them all; `queue`, `sendmail` and the like start without.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Secrets {
    All,
    /// Only `admin.token`: for commands that call the admin interface.
    AdminToken,
    None,
}

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
    pub notify: NotifyConfig,
    /// `[[routes]]`, in order: the first that matches chooses the account.
    pub routes: Vec<RouteConfig>,
    /// What loading changed on its own (a cleaned app password), for the
    /// log at start and reload, and `check`; never a secret.
    #[serde(skip)]
    pub notes: Vec<String>,
    pub sendmail: SendmailConfig,
    /// `[[listeners]]`, after `server.listen` and `server.listen_tls`.
    pub listeners: Vec<ListenerConfig>,
    /// The configuration file that was read, if one existed (for messages
    /// that say which configuration a command used).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// `[sendmail]`: messages queued with `sendbridge sendmail` (README,
/// "Scripts and cron").
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SendmailConfig {
    /// The configured local user these messages are sent as: its account
    /// (and routes) apply, as if it had signed in.
    pub user: Option<String>,
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
    /// How long a verified user name and password may sign in again
    /// without argon2; zero turns the cache off.
    #[serde(deserialize_with = "duration")]
    pub auth_cache_ttl: Duration,
    /// The SASL mechanisms offered in EHLO and accepted in AUTH.
    pub auth_mechanisms: Vec<AuthMechanism>,
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
            auth_cache_ttl: Duration::from_secs(3600),
            auth_mechanisms: vec![AuthMechanism::Plain, AuthMechanism::Login],
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

/// A SASL mechanism local users may sign in with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AuthMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "LOGIN")]
    Login,
    /// RFC 2195; needs the user's plain password (`password` or
    /// `password_file`), which a `password_hash` cannot give.
    #[serde(rename = "CRAM-MD5")]
    CramMd5,
}

impl AuthMechanism {
    /// As SMTP names it.
    pub fn name(&self) -> &'static str {
        match self {
            AuthMechanism::Plain => "PLAIN",
            AuthMechanism::Login => "LOGIN",
            AuthMechanism::CramMd5 => "CRAM-MD5",
        }
    }
}

/// `[[routes]]`: mail whose sender matches goes through `account`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// `a@x.example` (the local part exact, the domain in any case),
    /// `@x.example` (any address at the domain) or `*` (every sender).
    pub sender: String,
    pub account: String,
    /// Only for these signed-in users; without it, for every user and for
    /// trusted-network clients.
    #[serde(default)]
    pub users: Option<Vec<String>>,
    /// Which address `sender` is matched against.
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteMatch {
    /// The envelope sender (MAIL FROM): decided at MAIL.
    #[default]
    Envelope,
    /// The address in the From header field: decided at the end of DATA.
    From,
}

impl RouteConfig {
    /// Whether the route is for the user named `user` (configuration keys
    /// are compared in any case, as sign-ins are).
    pub fn applies_to(&self, user: &str) -> bool {
        self.users
            .as_ref()
            .is_none_or(|users| users.iter().any(|name| name.eq_ignore_ascii_case(user)))
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
    /// The upstream account this login sends through, unless a route
    /// chooses another; may be left out when routes decide for it.
    pub account: Option<String>,
}

/// `[notify]`: who hears of mail the relay cannot deliver (README,
/// "Notices").
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NotifyConfig {
    /// Addresses that get admin alerts by email.
    pub admin: Vec<String>,
    /// The account notices are sent through; when unset, the message's own
    /// account if it can sign in, else any other that can.
    pub account: Option<String>,
    /// URL that gets admin alerts as HTTP POST.
    pub webhook: Option<String>,
    pub webhook_format: WebhookFormat,
    /// Bounces to the envelope sender when mail is refused or given up.
    pub bounces: bool,
    /// A notice to the sender when a message is still undelivered after
    /// this long; zero turns it off.
    #[serde(deserialize_with = "duration")]
    pub delay_warning: Duration,
    pub language: Language,
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            admin: Vec::new(),
            account: None,
            webhook: None,
            webhook_format: WebhookFormat::Json,
            bounces: true,
            delay_warning: Duration::from_secs(4 * 3600),
            language: Language::En,
        }
    }
}

/// The body of a webhook POST.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum WebhookFormat {
    /// Fields `event`, `account`, `message_id`, `recipients`, `reply`,
    /// `hint`, `count`, `at`, `relay`.
    #[default]
    Json,
    /// `{"text": …}`: Slack, Mattermost and Teams workflows.
    Slack,
    /// A plain-text body with a title header (ntfy.sh).
    Ntfy,
}

/// The language of notices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    #[default]
    En,
    De,
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

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) const GMAIL: &str = r#"
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
    fn the_credentials_cache_lasts_an_hour_and_zero_turns_it_off() {
        let cases = [
            ("", Duration::from_secs(3600)),
            ("auth_cache_ttl = \"10m\"", Duration::from_secs(600)),
            ("auth_cache_ttl = 0", Duration::ZERO),
        ];
        for (line, ttl) in cases {
            let config = Config::from_toml(&format!("[server]\n{line}")).unwrap();
            assert_eq!(config.server.auth_cache_ttl, ttl, "{line:?}");
        }
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
    fn api_transports_have_their_base_url_and_need_oauth2() {
        const APP: &str = "auth = \"oauth2\"\n[accounts.m365.oauth2]\nprovider = \"microsoft\"\nclient_id = \"id\"\nclient_secret = \"s\"\ntenant = \"contoso.com\"\nflow = \"client_credentials\"";
        // (transport and api_url lines, transport, api_url)
        let table = [
            ("", TransportKind::Smtp, None),
            (
                "transport = \"graph\"",
                TransportKind::Graph,
                Some("https://graph.microsoft.com"),
            ),
            (
                "transport = \"graph\"\napi_url = \"https://graph.microsoft.us/\"",
                TransportKind::Graph,
                Some("https://graph.microsoft.us"),
            ),
            (
                "transport = \"gmail-api\"",
                TransportKind::GmailApi,
                Some("https://gmail.googleapis.com"),
            ),
        ];
        for (lines, transport, api_url) in table {
            let config = Config::from_toml(&format!(
                "[accounts.m365]\nusername = \"me@contoso.com\"\n{lines}\n{APP}"
            ))
            .unwrap();
            let account = &config.accounts["m365"];
            assert_eq!(account.transport, transport, "{lines}");
            assert_eq!(account.api_url(), api_url, "{lines}");
            assert!(account.save_to_sent_items);
        }
        let err = Config::from_toml(
            "[accounts.m365]\nusername = \"me@contoso.com\"\ntransport = \"graph\"\npassword = \"p\"",
        )
        .unwrap_err();
        assert_eq!(err.key, "accounts.m365.auth");
        let err = Config::from_toml(&format!(
            "[accounts.m365]\nusername = \"me@contoso.com\"\ntransport = \"graph\"\napi_url = \"http://graph.example\"\n{APP}"
        ))
        .unwrap_err();
        assert_eq!(err.key, "accounts.m365.api_url");
        let err = Config::from_toml(
            "[accounts.m365]\nusername = \"me@contoso.com\"\ntransport = \"ews\"",
        )
        .unwrap_err();
        assert_eq!(err.key, "accounts.m365.transport");
    }

    #[test]
    fn unknown_accounts_are_refused() {
        let err = Config::from_toml(&format!("{GMAIL}\naccount = \"outlook\"")).unwrap_err();
        assert_eq!(err.key, "users.invoices.account");
    }

    #[test]
    fn routes_must_name_known_accounts_and_users() {
        let two =
            format!("{GMAIL}\n[accounts.m365]\nusername = \"me@x.example\"\npassword = \"x\"");
        let route = |body: &str| {
            format!(
                "{two}\n[[routes]]\nsender = \"@x.example\"\naccount = \"m365\"\n[[routes]]\n{body}"
            )
        };
        // (second route, the key named in the error)
        let cases = [
            ("sender = \"*\"\naccount = \"outlook\"", "routes.1.account"),
            (
                "sender = \"*\"\naccount = \"gmail\"\nusers = [\"nobody\"]",
                "routes.1.users",
            ),
            (
                "sender = \"*\"\naccount = \"gmail\"\nusers = []",
                "routes.1.users",
            ),
            (
                "sender = \"x.example\"\naccount = \"gmail\"",
                "routes.1.sender",
            ),
            (
                "sender = \"*\"\naccount = \"gmail\"\nmatch = \"subject\"",
                "routes.1.match",
            ),
        ];
        for (body, key) in cases {
            let err = Config::from_toml(&route(body)).unwrap_err();
            assert_eq!(err.key, key, "{body}: {err}");
        }
        let config = Config::from_toml(&route(
            "sender = \"*\"\naccount = \"gmail\"\nusers = [\"INVOICES\"]\nmatch = \"from\"",
        ))
        .unwrap();
        assert_eq!(config.routes[1].matches, RouteMatch::From);
    }

    #[test]
    fn a_user_needs_an_account_unless_a_route_is_for_it() {
        let two =
            format!("{GMAIL}\n[accounts.m365]\nusername = \"me@x.example\"\npassword = \"x\"");
        let err = Config::from_toml(&two).unwrap_err();
        assert_eq!(err.key, "users.invoices.account");
        assert!(err.problem.contains("[[routes]]"), "{err}");
        for users in ["users = [\"invoices\"]", ""] {
            let routed =
                format!("{two}\n[[routes]]\nsender = \"@x.example\"\naccount = \"m365\"\n{users}");
            let config = Config::from_toml(&routed).unwrap();
            assert_eq!(config.users["invoices"].account, None, "{users}");
        }
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
