//! Listeners, the accept loop with its connection limit, TLS wrapping, and
//! graceful shutdown.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, warn};

use crate::config::Config;
use crate::delivery::Delivery;
use crate::session::{Session, SessionContext, SessionEnd, SessionRecord, clean_transcripts};

/// How long open sessions may take to finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
const TRANSCRIPT_CLEANING_INTERVAL: Duration = Duration::from_secs(3600);

pub struct Server {
    plain: TcpListener,
    implicit_tls: Option<TcpListener>,
    ctx: Arc<SessionContext>,
    connections: Arc<Semaphore>,
    transcript_limits: (Duration, u64),
}

impl Server {
    /// Builds everything the relay needs and binds its listeners. Errors
    /// name what to fix.
    pub async fn bind(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Server> {
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
        let delivery = Delivery::start(config, shutdown.clone())?;
        let ctx = SessionContext::new(config, delivery, tls, shutdown)?;
        Ok(Server {
            plain,
            implicit_tls,
            connections: Arc::new(Semaphore::new(config.server.max_connections)),
            transcript_limits: (
                config.log.transcript_max_age,
                config.log.transcript_max_bytes,
            ),
            ctx: Arc::new(ctx),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.plain
            .local_addr()
            .expect("a bound listener has an address")
    }

    pub fn tls_local_addr(&self) -> Option<SocketAddr> {
        self.implicit_tls.as_ref().map(|listener| {
            listener
                .local_addr()
                .expect("a bound listener has an address")
        })
    }

    /// Serves until the shutdown token is cancelled, then waits (bounded) for
    /// open sessions to end.
    pub async fn run(self) {
        let sessions = TaskTracker::new();
        let ctx = &self.ctx;
        info!(
            listen = %self.local_addr(),
            listen_tls = ?self.tls_local_addr(),
            starttls = ctx.tls.is_some(),
            "sendbridge is accepting connections"
        );
        let plain = self.accept_loop(&self.plain, false, &sessions);
        let implicit_tls = async {
            if let Some(listener) = &self.implicit_tls {
                self.accept_loop(listener, true, &sessions).await;
            }
        };
        tokio::join!(plain, implicit_tls, self.clean_transcripts());
        sessions.close();
        if tokio::time::timeout(SHUTDOWN_GRACE, sessions.wait())
            .await
            .is_err()
        {
            warn!(
                open = sessions.len(),
                "sessions still open after the shutdown grace period"
            );
        }
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
                _ = self.ctx.shutdown.cancelled() => return,
            }
        }
    }

    async fn accept_loop(
        &self,
        listener: &TcpListener,
        implicit_tls: bool,
        sessions: &TaskTracker,
    ) {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = self.ctx.shutdown.cancelled() => return,
            };
            let (stream, peer) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Typically EMFILE: keep serving the open sessions.
                    warn!(error = %err, "accept failed");
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let id = new_session_id();
            let span = tracing::info_span!("session", id = %id, client = %peer);
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                warn!(parent: &span, limit = self.connections.available_permits(), "refused a connection over server.max_connections");
                sessions.spawn(refuse_busy(stream, self.ctx.server.command_timeout));
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
    match tokio::time::timeout(ctx.server.command_timeout, acceptor.accept(stream)).await {
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
