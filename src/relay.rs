//! The composition root: builds the parts of a running relay in order
//! (listeners, delivery with the spool, the SMTP server, the admin
//! interface), serves until shutdown, stops them in order, and applies
//! reloads. Nothing below calls it.

mod process;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::access_tokens::TokenSource;
use crate::admin::Admin;
use crate::config::Config;
use crate::delivery::Delivery;
use crate::observe;
use crate::pickup::Pickup;
use crate::server::{Listeners, Server};
use crate::session::{SessionContext, Settings, clean_transcripts};

pub use process::signal_reload;

const TRANSCRIPT_CLEANING_INTERVAL: Duration = Duration::from_secs(3600);

/// `sendbridge run`: the relay until SIGTERM or SIGINT, reloading on SIGHUP,
/// with a pid file in the spool for `sendbridge reload`.
pub async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    process::raise_descriptor_limit(&config);
    process::return_large_buffers_to_the_system();
    let stop = CancellationToken::new();
    let tokens = crate::oauth::token_service(&config.spool.dir);
    let relay = Relay::start(&config, stop.clone(), tokens).await?;
    if config.accounts.is_empty() {
        warn!(
            "no upstream account configured: set [accounts.<name>] username and password in config/sendbridge.toml, or e.g. SENDBRIDGE_ACCOUNTS__GMAIL__USERNAME and SENDBRIDGE_ACCOUNTS__GMAIL__PASSWORD (a Gmail app password), plus a local login SENDBRIDGE_USERS__<NAME>__PASSWORD"
        );
    }
    let pid_file = process::PidFile::create(&config.spool.dir)?;
    let reloader = relay.reloader(config);
    tokio::spawn(process::trim_freed_memory(stop.clone()));
    tokio::spawn(process::handle_signals(stop, reloader, path));
    relay.run().await;
    drop(pid_file);
    Ok(())
}

/// A relay built and listening, not yet serving.
pub struct Relay {
    server: Server,
    admin: Option<Admin>,
    delivery: Arc<Delivery>,
    ctx: Arc<SessionContext>,
    /// Takes mail queued by `sendbridge sendmail`.
    pickup: Pickup,
    /// Cancelled from outside: shutdown begins.
    stop: CancellationToken,
    /// Cancelled by `run` once the sessions are done.
    stop_delivery: CancellationToken,
    shutdown_grace: Duration,
    transcript_limits: (Duration, u64),
    /// A certificate was found or generated.
    starttls: bool,
}

impl Relay {
    /// Builds everything the relay needs and binds its listeners. Errors
    /// name what to fix. Cancelling `stop` begins a graceful shutdown.
    /// `tokens` gives `auth = "oauth2"` accounts their access tokens.
    pub async fn start(
        config: &Config,
        stop: CancellationToken,
        tokens: TokenSource,
    ) -> anyhow::Result<Relay> {
        log_notes(config);
        let certificate =
            crate::tls::certificate(&config.tls, &config.server.hostname, &config.spool.dir)?;
        let listeners = Listeners::bind(config, certificate.as_ref()).await?;
        let admin_listener = crate::admin::bind(&config.admin).await?;
        let stop_delivery = CancellationToken::new();
        let delivery = Delivery::start(config, stop_delivery.clone(), tokens)?;
        // Delivery's workers stop if the rest cannot be built.
        let stop_delivery_on_error = stop_delivery.clone().drop_guard();
        let settings = Settings::new(config)?;
        let close_sessions = CancellationToken::new();
        let ctx = Arc::new(SessionContext::new(
            settings,
            delivery.clone(),
            close_sessions.clone(),
        )?);
        let pickup = Pickup::bind(
            &config.spool.dir,
            ctx.clone(),
            config.delivery.scan_interval,
        )
        .map_err(|err| {
            anyhow::anyhow!(
                "cannot create the maildrop in spool.dir ({}): {err}",
                config.spool.dir.display()
            )
        })?;
        let starttls = certificate.is_some();
        let server = Server::new(
            listeners,
            ctx.clone(),
            &config.server,
            stop.clone(),
            close_sessions,
        );
        // The admin interface stops when shutdown begins.
        let admin = admin_listener.map(|listener| {
            let sessions = ctx.clone();
            Admin::new(
                listener,
                &config.admin,
                delivery.clone(),
                sessions,
                stop.clone(),
            )
        });
        stop_delivery_on_error.disarm();
        Ok(Relay {
            server,
            admin,
            delivery,
            ctx,
            pickup,
            stop,
            stop_delivery,
            shutdown_grace: config.server.shutdown_grace,
            starttls,
            transcript_limits: (
                config.log.transcript_max_age,
                config.log.transcript_max_bytes,
            ),
        })
    }

    /// Applies reloaded configurations to this relay while it runs.
    pub fn reloader(&self, running: Config) -> Reloader {
        Reloader {
            ctx: self.ctx.clone(),
            delivery: self.delivery.clone(),
            running: tokio::sync::Mutex::new(running),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.server.tls_local_addr()
    }

    /// Every listener's key and bound address (`Config::all_listeners`).
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.server.listener_addrs()
    }

    /// The admin interface's address, unless it is off.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(Admin::local_addr)
    }

    /// Serves until `stop` is cancelled, then stops in order: no new
    /// connections and the admin interface closes; open sessions finish or
    /// are closed (`Server::run`); then in-flight deliveries finish or
    /// return to the queue.
    pub async fn run(self) {
        info!(
            listen = %self.local_addr(),
            listen_tls = self.tls_local_addr().map(display),
            listeners = observe::list(&self.listener_addrs().iter().map(|(key, addr)| format!("{key} {addr}")).collect::<Vec<_>>()),
            starttls = self.starttls,
            admin = %self.admin_addr().map_or("off".to_string(), |addr| addr.to_string()),
            "sendbridge is accepting connections"
        );
        let admin = self.admin.as_ref();
        let admin = async move {
            if let Some(admin) = admin {
                admin.serve().await;
            }
        };
        let cleaning = keep_transcripts_clean(&self.ctx, self.transcript_limits, &self.stop);
        let pickup = self.pickup.run(self.stop.clone());
        tokio::join!(self.server.run(), admin, cleaning, pickup);
        self.stop_delivery.cancel();
        self.delivery.stopped(self.shutdown_grace).await;
        info!("sendbridge stopped");
    }
}

/// What loading the configuration changed on its own.
fn log_notes(config: &Config) {
    for note in &config.notes {
        info!("{note}");
    }
}

/// Keeps the transcripts directory within its age and size bounds until
/// `stop` is cancelled.
async fn keep_transcripts_clean(
    ctx: &SessionContext,
    (max_age, max_bytes): (Duration, u64),
    stop: &CancellationToken,
) {
    loop {
        let dir = ctx.transcripts_dir.clone();
        let cleaned =
            tokio::task::spawn_blocking(move || clean_transcripts(&dir, max_age, max_bytes)).await;
        match cleaned {
            Ok(Ok(0)) | Err(_) => {}
            Ok(Ok(deleted)) => info!(deleted, "old session transcripts deleted"),
            Ok(Err(err)) => warn!(error = %err, "cannot clean the transcripts directory"),
        }
        tokio::select! {
            _ = tokio::time::sleep(TRANSCRIPT_CLEANING_INTERVAL) => {}
            _ = stop.cancelled() => return,
        }
    }
}

/// Replaces users, accounts and session settings without dropping
/// connections (SIGHUP, `sendbridge reload`).
pub struct Reloader {
    ctx: Arc<SessionContext>,
    delivery: Arc<Delivery>,
    running: tokio::sync::Mutex<Config>,
}

impl Reloader {
    /// Applies `config`, or nothing when any of it cannot be applied; warns
    /// about changes to startup settings, which wait for a restart.
    pub async fn reload(&self, config: Config) -> anyhow::Result<()> {
        let mut running = self.running.lock().await;
        log_notes(&config);
        let config = Arc::new(config);
        let settings = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || Settings::new(&config)).await??
        };
        self.delivery.reload(&config).await?;
        self.ctx.replace_settings(settings);
        let needs_restart = running.startup().changed_keys(&config.startup());
        if !needs_restart.is_empty() {
            warn!(
                keys = observe::list(&needs_restart),
                "these changes take effect at the next restart"
            );
        }
        *running = Arc::unwrap_or_clone(config);
        Ok(())
    }
}
