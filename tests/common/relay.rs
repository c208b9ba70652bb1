//! Starts the relay in this process, on 127.0.0.1:0, delivering to a fake
//! upstream; the relay is stopped when the handle drops.

use std::net::SocketAddr;
use std::path::PathBuf;

use sendbridge::access_tokens::TokenSource;
use sendbridge::config::Config;
use sendbridge::oauth::token_service;
use sendbridge::relay::Reloader;
use tokio_util::sync::CancellationToken;

use super::fake_upstream::{FakeUpstream, UpstreamTls};
use super::smtp::Client;

pub const UPSTREAM_USER: &str = "me@gmail.com";
pub const UPSTREAM_PASSWORD: &str = "abcdabcdabcdabcd";
pub const LOCAL_USER: &str = "invoices";
pub const LOCAL_PASSWORD: &str = "old-password";

pub struct Relay {
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    /// Every listener's key and address (`server.listen`, `listeners[0]`, …).
    pub listeners: Vec<(String, SocketAddr)>,
    /// The admin interface, unless the configuration turned it off.
    pub admin_addr: Option<SocketAddr>,
    /// The relay's own (generated) certificate, for clients using STARTTLS.
    pub cert: PathBuf,
    pub spool: PathBuf,
    reloader: Reloader,
    stop: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
    dir: Option<tempfile::TempDir>,
}

/// A configuration with account `gmail` pointing at `upstream` and local
/// user `invoices`; `extra` is appended TOML (it may add a `[server]` table).
pub fn config_for(upstream: &FakeUpstream, tls: UpstreamTls, extra: &str) -> Config {
    let tls = match tls {
        UpstreamTls::StartTls => "starttls",
        UpstreamTls::Implicit => "implicit",
    };
    config_with_account(
        upstream.port(),
        tls,
        upstream.ca_file().to_str().unwrap(),
        extra,
    )
}

/// A fake Gmail (STARTTLS, `UPSTREAM_USER` with `UPSTREAM_PASSWORD`) and a
/// relay delivering to it, configured by `config_for` with `extra`.
pub async fn relay_with_upstream(extra: &str) -> (FakeUpstream, Relay) {
    let upstream = FakeUpstream::start(super::fake_upstream::FakeUpstreamOptions::new(
        UpstreamTls::StartTls,
        UPSTREAM_USER,
        UPSTREAM_PASSWORD,
    ))
    .await;
    let relay = Relay::start(config_for(&upstream, UpstreamTls::StartTls, extra)).await;
    (upstream, relay)
}

/// The same configuration for an upstream at any port.
pub fn config_with_account(port: u16, tls: &str, ca_file: &str, extra: &str) -> Config {
    let password = format!(r#"password = "{UPSTREAM_PASSWORD}""#);
    config_signing_in(port, tls, ca_file, &password, extra)
}

/// Like `config_for` with STARTTLS, but account `gmail` signs in with
/// XOAUTH2 (its tokens come from the relay's token source).
pub fn oauth_config_for(upstream: &FakeUpstream, extra: &str) -> Config {
    let sign_in = r#"auth = "oauth2"
        [accounts.gmail.oauth2]
        provider = "google"
        client_id = "sendbridge-test""#;
    let ca_file = upstream.ca_file().to_str().unwrap();
    config_signing_in(upstream.port(), "starttls", ca_file, sign_in, extra)
}

/// Account `gmail` with the sign-in settings `sign_in` (TOML that ends the
/// account's table), and local user `invoices`.
fn config_signing_in(port: u16, tls: &str, ca_file: &str, sign_in: &str, extra: &str) -> Config {
    let toml = format!(
        r#"
        [accounts.gmail]
        host = "localhost"
        port = {port}
        tls = "{tls}"
        username = "{UPSTREAM_USER}"
        ca_file = "{ca_file}"
        timeout = "10s"
        {sign_in}
        [users.{LOCAL_USER}]
        password = "{LOCAL_PASSWORD}"
        account = "gmail"
        {extra}
        "#
    );
    Config::from_toml(&toml).expect("test configuration is valid")
}

/// The same account and user as environment variables, for a relay
/// process (`RelayProcess`), the way a container is configured.
pub fn env_for(upstream: &FakeUpstream) -> Vec<(String, String)> {
    [
        ("SENDBRIDGE_ACCOUNTS__GMAIL__HOST", "localhost".to_string()),
        (
            "SENDBRIDGE_ACCOUNTS__GMAIL__PORT",
            upstream.port().to_string(),
        ),
        (
            "SENDBRIDGE_ACCOUNTS__GMAIL__CA_FILE",
            upstream.ca_file().display().to_string(),
        ),
        ("SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME", UPSTREAM_USER.into()),
        (
            "SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD",
            UPSTREAM_PASSWORD.into(),
        ),
        (
            "SENDBRIDGE_USERS__INVOICES__PASSWORD",
            LOCAL_PASSWORD.into(),
        ),
    ]
    .into_iter()
    .map(|(key, value)| (key.to_string(), value))
    .collect()
}

/// `env_for`'s pairs as `RelayProcess::start` takes them.
pub fn as_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

impl Relay {
    pub async fn start(config: Config) -> Relay {
        Relay::start_with(config, None).await
    }

    /// With `tokens` for `auth = "oauth2"` accounts instead of the relay's
    /// token service.
    pub async fn start_with(config: Config, tokens: Option<TokenSource>) -> Relay {
        Relay::launch(config, tokens, None).await
    }

    /// With the spool in `spool` (e.g. a small file system of its own)
    /// instead of the relay's temporary directory.
    pub async fn start_with_spool(config: Config, spool: PathBuf) -> Relay {
        Relay::launch(config, None, Some(spool)).await
    }

    async fn launch(
        mut config: Config,
        tokens: Option<TokenSource>,
        spool: Option<PathBuf>,
    ) -> Relay {
        sendbridge::tls::install_crypto_provider();
        let dir = tempfile::tempdir().unwrap();
        config.server.listen = "127.0.0.1:0".parse().unwrap();
        if config.server.listen_tls.is_some() {
            config.server.listen_tls = Some("127.0.0.1:0".parse().unwrap());
        }
        if config.admin.listen.is_some() {
            config.admin.listen = Some("127.0.0.1:0".parse().unwrap());
        }
        // Shared by every relay of this test process; installed once.
        sendbridge::observe::metrics::install(&config.admin);
        config.server.hostname = "relay.test".to_string();
        config.tls.cert = dir.path().join("relay.crt");
        config.tls.key = dir.path().join("relay.key");
        config.spool.dir = spool.unwrap_or_else(|| dir.path().join("spool"));
        let stop = CancellationToken::new();
        let tokens = tokens.unwrap_or_else(|| token_service(&config.spool.dir));
        let relay = sendbridge::relay::Relay::start(&config, stop.clone(), tokens)
            .await
            .expect("relay starts");
        let reloader = relay.reloader(config.clone());
        Relay {
            addr: relay.local_addr(),
            tls_addr: relay.tls_local_addr(),
            listeners: relay.listener_addrs(),
            admin_addr: relay.admin_addr(),
            cert: config.tls.cert.clone(),
            spool: config.spool.dir.clone(),
            reloader,
            stop,
            task: Some(tokio::spawn(relay.run())),
            dir: Some(dir),
        }
    }

    /// Applies a changed configuration as SIGHUP does (listeners, spool and
    /// certificates stay as they are).
    pub async fn reload(&self, config: Config) -> anyhow::Result<()> {
        self.reloader.reload(config).await
    }

    /// A connected client that said EHLO.
    pub async fn greeted_client(&self) -> Client {
        let mut client = Client::connect(self.addr).await;
        client.ehlo().await;
        client
    }

    /// A client that said EHLO and signed in as the local user.
    pub async fn signed_in_client(&self) -> Client {
        let mut client = self.greeted_client().await;
        let reply = client.login_plain(LOCAL_USER, LOCAL_PASSWORD).await;
        assert_eq!(reply.code, 235, "{reply:?}");
        client
    }

    /// Stops accepting, lets sessions end, and waits for the relay to
    /// return. The directory with the spool lives as long as the result.
    pub async fn stop(mut self) -> tempfile::TempDir {
        self.stop.cancel();
        if let Some(task) = self.task.take() {
            task.await.expect("relay task ends cleanly");
        }
        self.dir.take().expect("stopped once")
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
