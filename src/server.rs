//! Listeners, the accept loop with its connection limit, TLS wrapping, and
//! graceful shutdown of the sessions. What the sessions hand messages to
//! is built by the composition root (`relay`).

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

use crate::config::{Config, Listener, ListenerTls, ServerConfig, TlsConfig, TlsProfile};
use crate::policy::{Trust, open_relay_warnings_for};
use crate::session::{ListenerRules, Session, SessionContext, SessionEnd, SessionRecord};
use crate::tls::{Acceptor, InboundTls};

/// After the grace period, how long sessions get to say 421 and close.
const SESSION_CLOSE_BOUND: Duration = Duration::from_secs(5);
/// After a failed accept the listener rests this long, doubling up to
/// `ACCEPT_PAUSE_MAX` while accepts keep failing (as Go's net/http does).
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(10);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);
/// At most one "accept failed" line per this interval.
const ACCEPT_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// The relay's SMTP listeners, bound before anything else starts so that a
/// second relay on the same address stops before it touches the spool.
pub struct Listeners(Vec<BoundListener>);

struct BoundListener {
    socket: TcpListener,
    serving: Arc<Serving>,
}

/// How a listener's connections are served.
struct Serving {
    /// Set when the listener speaks TLS from the first byte.
    implicit: Option<Acceptor>,
    /// For STARTTLS, when offered.
    starttls: Option<Acceptor>,
    rules: Arc<ListenerRules>,
}

impl Listeners {
    /// Binds every listener of `config` (`Config::all_listeners`), with the
    /// TLS of its profile over `certificate`; implicit TLS needs one.
    /// Errors name the key.
    pub async fn bind(
        config: &Config,
        certificate: Option<&TlsConfig>,
    ) -> anyhow::Result<Listeners> {
        let mut acceptors = Acceptors::new(certificate);
        let mut bound = Vec::new();
        for Listener { key, settings } in config.all_listeners() {
            let acceptor = match settings.tls {
                ListenerTls::None => None,
                tls => {
                    let acceptor = acceptors.get(settings.tls_profile)?;
                    if acceptor.is_none() && tls == ListenerTls::Implicit {
                        anyhow::bail!(
                            "{key}: implicit TLS needs a certificate (tls.cert and tls.key)"
                        );
                    }
                    acceptor
                }
            };
            let address = settings.address;
            let socket = TcpListener::bind(address)
                .await
                .with_context(|| format!("{key}: cannot listen on {address}"))?;
            let address = socket.local_addr()?;
            if settings.tls_profile == TlsProfile::Legacy {
                warn!(listener = %key, "{}", crate::tls::legacy::warning(address));
            }
            if let Some(networks) = &settings.trusted_networks {
                for warning in open_relay_warnings_for(&format!("{key}.trusted_networks"), networks)
                {
                    warn!("{warning}");
                }
            }
            let (implicit, starttls) = match settings.tls {
                ListenerTls::Implicit => (acceptor, None),
                _ => (None, acceptor),
            };
            let rules = Arc::new(ListenerRules {
                trust: Trust::of(&settings),
                offers_starttls: starttls.is_some(),
                key,
            });
            let serving = Arc::new(Serving {
                implicit,
                starttls,
                rules,
            });
            bound.push(BoundListener { socket, serving });
        }
        Ok(Listeners(bound))
    }
}

/// Each profile's acceptor, made once over the certificate when a listener
/// first needs it.
struct Acceptors<'a> {
    certificate: Option<&'a TlsConfig>,
    modern: Option<Acceptor>,
    legacy: Option<Acceptor>,
}

impl<'a> Acceptors<'a> {
    fn new(certificate: Option<&'a TlsConfig>) -> Self {
        Acceptors {
            certificate,
            modern: None,
            legacy: None,
        }
    }

    /// `None` without a certificate.
    fn get(&mut self, profile: TlsProfile) -> anyhow::Result<Option<Acceptor>> {
        let Some(certificate) = self.certificate else {
            return Ok(None);
        };
        let made = match profile {
            TlsProfile::Modern => &mut self.modern,
            TlsProfile::Legacy => &mut self.legacy,
        };
        if made.is_none() {
            *made = Some(match profile {
                TlsProfile::Modern => Acceptor::Modern(crate::tls::modern_acceptor(certificate)?),
                TlsProfile::Legacy => Acceptor::Legacy(crate::tls::legacy::acceptor(certificate)?),
            });
        }
        Ok(made.clone())
    }
}

pub struct Server {
    listeners: Vec<BoundListener>,
    ctx: Arc<SessionContext>,
    connections: Arc<Semaphore>,
    max_connections: usize,
    shutdown_grace: Duration,
    /// Cancelled from outside: stop accepting and begin shutting down.
    stop: CancellationToken,
    /// Cancelled by `run` when the grace period for open sessions is over;
    /// the sessions of `ctx` watch it.
    close_sessions: CancellationToken,
}

impl Server {
    /// Serves sessions of `ctx` on `listeners`; `close_sessions` is the
    /// token `ctx` was made with. Cancelling `stop` begins a graceful
    /// shutdown.
    pub fn new(
        listeners: Listeners,
        ctx: Arc<SessionContext>,
        config: &ServerConfig,
        stop: CancellationToken,
        close_sessions: CancellationToken,
    ) -> Server {
        Server {
            listeners: listeners.0,
            connections: Arc::new(Semaphore::new(config.max_connections)),
            max_connections: config.max_connections,
            ctx,
            shutdown_grace: config.shutdown_grace,
            stop,
            close_sessions,
        }
    }

    /// Each listener's key and bound address, in the order configured.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.listeners
            .iter()
            .map(|listener| {
                let addr = listener
                    .socket
                    .local_addr()
                    .expect("a bound listener has an address");
                (listener.serving.rules.key.clone(), addr)
            })
            .collect()
    }

    fn addr_of(&self, key: &str) -> Option<SocketAddr> {
        self.listener_addrs()
            .into_iter()
            .find_map(|(listener, addr)| (listener == key).then_some(addr))
    }

    /// `server.listen`'s address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr_of("server.listen")
            .expect("server.listen is always bound")
    }

    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.addr_of("server.listen_tls")
    }

    /// Serves until `stop` is cancelled. Then: no new connections; open
    /// sessions may finish for `server.shutdown_grace`, after which they are
    /// told `421 4.3.0` and closed (bounded). Returns when they are done.
    pub async fn run(self) {
        let sessions = TaskTracker::new();
        let accepting = self
            .listeners
            .iter()
            .map(|listener| self.accept_loop(listener, &sessions));
        futures_util::future::join_all(accepting).await;
        // New connections are refused from here on.
        drop(self.listeners);
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
            self.close_sessions.cancel();
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
    }

    async fn accept_loop(&self, listener: &BoundListener, sessions: &TaskTracker) {
        let mut failures = AcceptFailures::default();
        loop {
            let accepted = tokio::select! {
                accepted = listener.socket.accept() => accepted,
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
            let span = tracing::info_span!("session", session = %id, client = %peer);
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                warn!(parent: &span, limit = self.max_connections, "refused a connection over server.max_connections");
                sessions.spawn(refuse_busy(
                    stream,
                    self.ctx.settings().server.command_timeout,
                ));
                continue;
            };
            let ctx = self.ctx.clone();
            let serving = listener.serving.clone();
            sessions.spawn(
                async move {
                    serve(ctx, serving, stream, id, peer).await;
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
    serving: Arc<Serving>,
    stream: TcpStream,
    id: String,
    peer: SocketAddr,
) {
    tracing::debug!("connected");
    let rules = &serving.rules;
    let record = SessionRecord::new(&ctx, &id, peer);
    // A session over TLS: implicit from the start, or after STARTTLS.
    let over_tls = async |acceptor: &Acceptor, stream, id, record, greet| {
        let Some(tls) = handshake(&ctx, acceptor, stream).await else {
            return record;
        };
        let session = Session::new(ctx.clone(), tls, id, peer, rules.clone(), true, record);
        closed(session.run(greet).await)
    };
    let record = if let Some(acceptor) = &serving.implicit {
        over_tls(acceptor, stream, id, record, true).await
    } else {
        let session = Session::new(
            ctx.clone(),
            stream,
            id.clone(),
            peer,
            rules.clone(),
            false,
            record,
        );
        match session.run(true).await {
            SessionEnd::Closed(record) => record,
            SessionEnd::StartTls(stream, record) => match &serving.starttls {
                Some(acceptor) => over_tls(acceptor, stream, id, record, false).await,
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
    acceptor: &Acceptor,
    stream: S,
) -> Option<InboundTls<S>> {
    let timeout = ctx.settings().server.command_timeout;
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(err)) => {
            let hint = matches!(acceptor, Acceptor::Modern(_)).then_some(
                "an old device that speaks only TLS 1.0/1.1 or TLS_RSA suites needs a listener with tls_profile = \"legacy\" ([[listeners]])",
            );
            warn!(error = %err, hint, "TLS handshake with the client failed");
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
