//! Listeners, the accept loop with its connection limit, TLS wrapping, and
//! graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, warn};

use crate::access_tokens::TokenSource;
use crate::admin::Admin;
use crate::config::Config;
use crate::delivery::Delivery;
use crate::session::{
    Session, SessionContext, SessionEnd, SessionRecord, Settings, clean_transcripts,
};

/// After the grace period, how long sessions get to say 421 and close.
const SESSION_CLOSE_BOUND: Duration = Duration::from_secs(5);
const TRANSCRIPT_CLEANING_INTERVAL: Duration = Duration::from_secs(3600);
/// After a failed accept the listener rests this long, doubling up to
/// `ACCEPT_PAUSE_MAX` while accepts keep failing (as Go's net/http does).
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// At most one "accept failed" line per this interval.
const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

pub struct Server {
    plain: TcpListener,
    implicit_tls: Option<TcpListener>,
    ctx: Arc<SessionContext>,
    connections: Arc<Semaphore>,
    max_connections: usize,
    transcript_limits: (Duration, u64),
    shutdown_grace: Duration,
    /// Cancelled from outside: stop accepting and begin shutting down.
    stop: CancellationToken,
    /// Cancelled by `run` once the sessions are done.
    stop_delivery: CancellationToken,
    admin: Option<Admin>,
}

impl Server {
    /// Builds everything the relay needs and binds its listeners. Errors
    /// name what to fix. Cancelling `stop` begins a graceful shutdown.
    /// `tokens` gives `auth = "oauth2"` accounts their access tokens.
    pub async fn bind(
        config: &Config,
        stop: CancellationToken,
        tokens: TokenSource,
    ) -> anyhow::Result<Server> {
        let tls =
            crate::tls::inbound_acceptor(&config.tls, &config.server.hostname, &config.spool.dir)?;
        let listen = config.server.listen;
        let plain = TcpListener::bind(listen)
            .await
            .with_context(|| format!("server.listen: cannot listen on {listen}"))?;
        let implicit_tls = match config.server.listen_tls {
            None => None,
            Some(_) if tls.is_none() => {
                anyhow::bail!("server.listen_tls: needs a certificate (tls.cert and tls.key)")
            }
            Some(addr) => Some(
                TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("server.listen_tls: cannot listen on {addr}"))?,
            ),
        };
        let admin_listener = crate::admin::bind(&config.admin).await?;
        let stop_delivery = CancellationToken::new();
        let delivery = Delivery::start(config, stop_delivery.clone(), tokens)?;
        // The admin interface stops when shutdown begins.
        let admin = admin_listener
            .map(|listener| Admin::new(listener, &config.admin, delivery.clone(), stop.clone()));
        // Cancelled when the grace period for open sessions is over.
        let close_sessions = CancellationToken::new();
        let settings = Settings::new(config)?;
        let ctx = SessionContext::new(settings, delivery, tls, close_sessions);
        Ok(Server {
            plain,
            implicit_tls,
            connections: Arc::new(Semaphore::new(config.server.max_connections)),
            max_connections: config.server.max_connections,
            transcript_limits: (
                config.log.transcript_max_age,
                config.log.transcript_max_bytes,
            ),
            ctx: Arc::new(ctx),
            shutdown_grace: config.server.shutdown_grace,
            stop,
            stop_delivery,
            admin,
        })
    }

    /// Applies reloaded configurations to this server while it runs.
    pub fn reloader(&self, running: Config) -> Reloader {
        Reloader {
            ctx: self.ctx.clone(),
            running: tokio::sync::Mutex::new(running),
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.plain
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// The admin interface's address, unless it is off.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(Admin::local_addr)
    }

    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.implicit_tls.as_ref().map(|listener| {
            listener
                .local_addr()
                .expect("a bound listener has an address")
        })
    }

    /// Serves until `stop` is cancelled. Then: no new connections; open
    /// sessions may finish for `server.shutdown_grace`, after which they are
    /// told `421 4.3.0` and closed; in-flight deliveries finish or return to
    /// the queue.
    pub async fn run(self) {
        let sessions = TaskTracker::new();
        let ctx = &self.ctx;
        info!(
            listen = %self.local_addr(),
            listen_tls = ?self.tls_local_addr(),
            starttls = ctx.tls.is_some(),
            admin = %self.admin_addr().map_or("off".to_string(), |addr| addr.to_string()),
            "sendbridge is accepting connections"
        );
        let plain = self.accept_loop(&self.plain, false, &sessions);
        let implicit_tls = async {
            if let Some(listener) = &self.implicit_tls {
                self.accept_loop(listener, true, &sessions).await;
            }
        };
        let admin = async {
            if let Some(admin) = &self.admin {
                admin.serve().await;
            }
        };
        tokio::join!(plain, implicit_tls, admin, self.clean_transcripts());
        // New connections are refused from here on.
        drop((self.plain, self.implicit_tls));
        sessions.close();
        if !sessions.is_empty() {
            info!(
                open = sessions.len(),
                grace_s = self.shutdown_grace.as_secs(),
                "shutting down: open sessions may finish"
            );
        }
        if tokio::time::timeout(self.shutdown_grace, sessions.wait())
            .await
            .is_err()
        {
            info!(
                open = sessions.len(),
                "shutdown grace period over: closing open sessions with 421"
            );
            ctx.close_sessions.cancel();
            if tokio::time::timeout(SESSION_CLOSE_BOUND, sessions.wait())
                .await
                .is_err()
            {
                warn!(
                    open = sessions.len(),
                    "sessions still open after being told to close"
                );
            }
        }
        self.stop_delivery.cancel();
        ctx.delivery.stopped(self.shutdown_grace).await;
        info!("sendbridge stopped");
    }

    /// Keeps the transcripts directory within its age and size bounds.
    async fn clean_transcripts(&self) {
        let (max_age, max_bytes) = self.transcript_limits;
        loop {
            let dir = self.ctx.transcripts_dir.clone();
            let cleaned =
                tokio::task::spawn_blocking(move || clean_transcripts(&dir, max_age, max_bytes))
                    .await;
            match cleaned {
                Ok(Ok(0)) | Err(_) => {}
                Ok(Ok(deleted)) => info!(deleted, "old session transcripts deleted"),
                Ok(Err(err)) => warn!(error = %err, "cannot clean the transcripts directory"),
            }
            tokio::select! {
                _ = tokio::time::sleep(TRANSCRIPT_CLEANING_INTERVAL) => {}
                _ = self.stop.cancelled() => return,
            }
        }
    }

    async fn accept_loop(
        &self,
        listener: &TcpListener,
        implicit_tls: bool,
        sessions: &TaskTracker,
    ) {
        let mut failures = AcceptFailures::default();
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = self.stop.cancelled() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => {
                    failures.succeeded();
                    accepted
                }
                Err(err) => {
                    // Typically EMFILE: the connection stays in the backlog
                    // and accepting again at once fails again. Rest, and
                    // keep serving the open sessions meanwhile.
                    let pause = failures.failed(&err, Instant::now());
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = self.stop.cancelled() => return,
                    }
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let id = new_session_id();
            let span = tracing::info_span!("session", id = %id, client = %peer);
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                warn!(parent: &span, limit = self.max_connections, "refused a connection over server.max_connections");
                sessions.spawn(refuse_busy(
                    stream,
                    self.ctx.settings().server.command_timeout,
                ));
                continue;
            };
            let ctx = self.ctx.clone();
            sessions.spawn(
                async move {
                    serve(ctx, stream, id, peer, implicit_tls).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
    }
}

/// A listener's run of failed accepts: how long to rest after each, and
/// when to say so.
#[derive(Debug, Default)]
struct AcceptFailures {
    /// The rest after the last failure; zero after a success.
    pause: Duration,
    /// When the last "accept failed" line was logged, during this run.
    warned_at: Option<Instant>,
    /// Failures since that line.
    unlogged: u64,
}

impl AcceptFailures {
    /// Logs at most one line per `ACCEPT_WARNING_INTERVAL`, with the count
    /// of failures since the last; returns how long to rest.
    fn failed(&mut self, err: &std::io::Error, now: Instant) -> Duration {
        let (pause, suppressed) = self.next(now);
        if let Some(suppressed) = suppressed {
            let out_of_descriptors =
                matches!(err.raw_os_error(), Some(libc::EMFILE | libc::ENFILE));
            let hint = out_of_descriptors.then_some(
                "out of file descriptors: raise the open-file limit (ulimit -n, systemd LimitNOFILE=) or lower server.max_connections",
            );
            warn!(
                error = %err,
                suppressed,
                pause_ms = pause.as_millis() as u64,
                hint,
                "accept failed; open sessions go on, new connections wait"
            );
        }
        pause
    }

    /// The decision of `failed`: the rest, and whether to log (with the
    /// number of failures not logged since the last line).
    fn next(&mut self, now: Instant) -> (Duration, Option<u64>) {
        self.pause = (self.pause * 2).clamp(ACCEPT_PAUSE_MIN, ACCEPT_PAUSE_MAX);
        let due = self
            .warned_at
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_WARNING_INTERVAL);
        if !due {
            self.unlogged += 1;
            return (self.pause, None);
        }
        self.warned_at = Some(now);
        (self.pause, Some(std::mem::take(&mut self.unlogged)))
    }

    fn succeeded(&mut self) {
        if self.warned_at.is_some() {
            info!(suppressed = self.unlogged, "accept works again");
        }
        *self = AcceptFailures::default();
    }
}

async fn refuse_busy(mut stream: TcpStream, timeout: Duration) {
    let reply = b"421 4.3.2 Too many connections, try again later\r\n";
    let _ = tokio::time::timeout(timeout, stream.write_all(reply)).await;
}

async fn serve(
    ctx: Arc<SessionContext>,
    stream: TcpStream,
    id: String,
    peer: SocketAddr,
    implicit_tls: bool,
) {
    tracing::debug!("connected");
    let record = SessionRecord::new(&ctx, &id, peer);
    let record = if implicit_tls {
        match handshake(&ctx, stream).await {
            Some(tls) => closed(
                Session::new(ctx.clone(), tls, id, peer, true, record)
                    .run(true)
                    .await,
            ),
            None => record,
        }
    } else {
        match Session::new(ctx.clone(), stream, id.clone(), peer, false, record)
            .run(true)
            .await
        {
            SessionEnd::Closed(record) => record,
            SessionEnd::StartTls(stream, record) => match handshake(&ctx, stream).await {
                Some(tls) => closed(
                    Session::new(ctx.clone(), tls, id, peer, true, record)
                        .run(false)
                        .await,
                ),
                None => record,
            },
        }
    };
    record.finish(&ctx).await;
}

/// The record of a session over TLS, which cannot start TLS again.
fn closed<S>(end: SessionEnd<S>) -> SessionRecord {
    match end {
        SessionEnd::Closed(record) | SessionEnd::StartTls(_, record) => record,
    }
}

async fn handshake<S: AsyncRead + AsyncWrite + Unpin>(
    ctx: &SessionContext,
    stream: S,
) -> Option<tokio_rustls::server::TlsStream<S>> {
    let acceptor = ctx.tls.as_ref()?;
    let timeout = ctx.settings().server.command_timeout;
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(err)) => {
            warn!(error = %err, "TLS handshake with the client failed");
            None
        }
        Err(_) => {
            warn!("TLS handshake with the client timed out");
            None
        }
    }
}

/// Short, unique enough to grep a day of logs for one session.
fn new_session_id() -> String {
    format!("{:012x}", rand::random::<u64>() & 0xffff_ffff_ffff)
}

/// Replaces users, accounts and session settings without dropping
/// connections (SIGHUP, `sendbridge reload`).
pub struct Reloader {
    ctx: Arc<SessionContext>,
    running: tokio::sync::Mutex<Config>,
}

impl Reloader {
    /// Applies `config`, or nothing when any of it cannot be applied.
    pub async fn reload(&self, config: Config) -> anyhow::Result<()> {
        let mut running = self.running.lock().await;
        let config = Arc::new(config);
        let settings = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || Settings::new(&config)).await??
        };
        self.ctx.delivery.reload(&config).await?;
        self.ctx.replace_settings(settings);
        let needs_restart = needs_restart(&running, &config);
        if !needs_restart.is_empty() {
            warn!(keys = ?needs_restart, "these changes take effect at the next restart");
        }
        *running = Arc::unwrap_or_clone(config);
        Ok(())
    }
}

/// Keys a running relay cannot change: listeners, certificates, the spool,
/// the delivery engine and logging are set up once.
fn needs_restart(running: &Config, new: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    let mut check = |key: &str, changed: bool| {
        if changed {
            keys.push(key.to_string());
        }
    };
    check("server.listen", running.server.listen != new.server.listen);
    check(
        "server.listen_tls",
        running.server.listen_tls != new.server.listen_tls,
    );
    check(
        "server.max_connections",
        running.server.max_connections != new.server.max_connections,
    );
    check(
        "server.shutdown_grace",
        running.server.shutdown_grace != new.server.shutdown_grace,
    );
    check(
        "tls",
        running.tls.cert != new.tls.cert || running.tls.key != new.tls.key,
    );
    check("spool.dir", running.spool.dir != new.spool.dir);
    check("delivery", running.delivery != new.delivery);
    check(
        "log",
        running.log.level != new.log.level || running.log.format != new.log.format,
    );
    for (name, account) in &new.accounts {
        if let Some(old) = running.accounts.get(name) {
            check(
                &format!("accounts.{name}.max_connections"),
                old.max_connections != account.max_connections,
            );
        }
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    const RUNNING: &str = r#"
        [accounts.gmail]
        username = "me@gmail.com"
        password = "abcdabcdabcdabcd"
        [users.invoices]
        password = "old-password"
    "#;

    #[test]
    fn failed_accepts_rest_longer_each_time_and_are_logged_once_per_interval() {
        let start = Instant::now();
        let mut failures = AcceptFailures::default();
        let ms = Duration::from_millis;
        // (milliseconds since the first failure, rest, failures to log)
        let expected = [
            (0, ms(10), Some(0)),
            (10, ms(20), None),
            (30, ms(40), None),
            (70, ms(80), None),
            (150, ms(160), None),
            (310, ms(320), None),
            (630, ms(640), None),
            (1270, ms(1000), None),
            (2270, ms(1000), None),
            (10_000, ms(1000), Some(8)),
            (11_000, ms(1000), None),
        ];
        for (at, pause, logged) in expected {
            assert_eq!(failures.next(start + ms(at)), (pause, logged), "at {at} ms");
        }

        failures.succeeded();
        let later = start + Duration::from_secs(12);
        assert_eq!(failures.next(later), (ms(10), Some(0)), "a new run");
    }

    #[test]
    fn a_reload_names_what_waits_for_a_restart() {
        let running = Config::from_toml(RUNNING).unwrap();
        let reloaded = Config::from_toml(&format!(
            "{RUNNING}\n[users.scanner]\npassword = \"x\"\n[server]\nlisten = \"127.0.0.1:2526\"\n[delivery]\nmode = \"queue\""
        ))
        .unwrap();

        assert_eq!(
            needs_restart(&running, &reloaded),
            ["server.listen", "delivery"]
        );
        assert!(needs_restart(&running, &running).is_empty());
    }
}
