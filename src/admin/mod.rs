//! The operator's HTTP interface on `[admin] listen`: liveness, readiness,
//! Prometheus metrics and a status page with retry buttons. It runs beside
//! the SMTP listeners and stops with them.
//!
//! Every connection is bounded: one request per connection, a deadline for
//! its headers and one for the whole exchange, small request bodies, and a
//! limit on concurrent connections.

mod access;
pub mod client;
mod page;
pub mod status;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Form, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::config::AdminConfig;
use crate::delivery::Delivery;
use crate::observe::metrics::{self, QueueGauges};
use crate::session::SessionContext;
use crate::spool;
use crate::spool::operations::{self, RetryTarget};
use access::{Access, FormToken};
use page::PageContext;
use status::{Readiness, Status};

/// Concurrent connections; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 16;
/// For the request line and headers.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// For a whole connection: request, handling and response.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest request head hyper buffers (its minimum).
const MAX_HEAD: usize = 8 * 1024;
/// Form posts are a few short fields.
const MAX_BODY: usize = 4 * 1024;
const METRICS_UPKEEP: Duration = Duration::from_secs(5);
/// How long requests in progress may take to finish after shutdown begins.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Binds `[admin] listen`; `None` when the interface is off.
pub async fn bind(config: &AdminConfig) -> anyhow::Result<Option<TcpListener>> {
    let Some(addr) = config.listen else {
        return Ok(None);
    };
    let listener = TcpListener::bind(addr).await.with_context(|| {
        format!("admin.listen: cannot listen on {addr} (set admin.listen = \"\" to turn the admin interface off)")
    })?;
    Ok(Some(listener))
}

pub struct Admin {
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
}

/// What the handlers share.
struct Shared {
    delivery: Arc<Delivery>,
    /// The current session settings, for the routes the status shows.
    sessions: Arc<SessionContext>,
    access: Access,
    form_token: FormToken,
    stop: CancellationToken,
}

impl Admin {
    /// The interface on `listener`; it stops accepting when `stop` (the
    /// relay's shutdown) is cancelled.
    pub fn new(
        listener: TcpListener,
        config: &AdminConfig,
        delivery: Arc<Delivery>,
        sessions: Arc<SessionContext>,
        stop: CancellationToken,
    ) -> Admin {
        let listen = listener.local_addr().ok();
        if config.token.is_none() && listen.is_some_and(|addr| !addr.ip().is_loopback()) {
            warn!(
                listen = listen.map(display),
                "admin.listen is reachable from other machines, but without admin.token only clients on this machine are served"
            );
        }
        let shared = Arc::new(Shared {
            delivery,
            sessions,
            access: Access::new(config.token.clone()),
            form_token: FormToken::random(),
            stop: stop.clone(),
        });
        let router = Router::new()
            .route("/healthz", get(healthz))
            .route("/readyz", get(readyz))
            .route("/metrics", get(scrape))
            .route("/status.json", get(status_json))
            .route("/", get(status_page))
            .route("/retry", post(retry))
            .layer(middleware::from_fn_with_state(shared.clone(), guard))
            .layer(DefaultBodyLimit::max(MAX_BODY))
            .with_state(shared);
        Admin {
            listener,
            router,
            stop,
        }
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until shutdown, then lets requests in progress finish (bounded).
    pub async fn serve(&self) {
        let connections = TaskTracker::new();
        tokio::join!(self.accept_loop(&connections), self.upkeep_metrics());
        connections.close();
        let _ = tokio::time::timeout(SHUTDOWN_GRACE, connections.wait()).await;
    }

    async fn accept_loop(&self, connections: &TaskTracker) {
        let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        loop {
            // A free slot first: over the limit, clients wait in the backlog.
            let next = async {
                let permit = limit.clone().acquire_owned().await.expect("never closed");
                (permit, self.listener.accept().await)
            };
            let (permit, accepted) = tokio::select! {
                _ = self.stop.cancelled() => return,
                next = next => next,
            };
            let (stream, client) = match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    warn!(error = %err, "admin interface: accept failed");
                    // Typically EMFILE: give connections time to close.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let service = self.router.clone().layer(Extension(ConnectInfo(client)));
            connections.spawn(async move {
                serve_connection(stream, service).await;
                drop(permit);
            });
        }
    }

    async fn upkeep_metrics(&self) {
        let mut interval = tokio::time::interval(METRICS_UPKEEP);
        loop {
            tokio::select! {
                _ = interval.tick() => metrics::upkeep(),
                _ = self.stop.cancelled() => return,
            }
        }
    }
}

/// One request over one connection, within the deadlines.
async fn serve_connection(stream: TcpStream, service: Router) {
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD)
        .keep_alive(false);
    let connection =
        builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
    if tokio::time::timeout(CONNECTION_TIMEOUT, connection)
        .await
        .is_err()
    {
        debug!("admin interface: connection timed out");
    }
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// Refuses requests the access rules do not allow (see `access`).
async fn guard(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(client): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let query = Query::<TokenQuery>::try_from_uri(request.uri()).ok();
    let token = query.as_ref().and_then(|query| query.token.as_deref());
    match shared.access.check(client.ip(), request.headers(), token) {
        Ok(()) => next.run(request).await,
        Err(denied) => {
            warn!(client = %client, path = request.uri().path(), refusal = ?denied, "admin interface: request refused");
            denied.into_response()
        }
    }
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(shared): State<Arc<Shared>>) -> Response {
    let readiness = blocking(&shared, |shared| {
        Ok(Readiness::check(
            &shared.delivery,
            shared.stop.is_cancelled(),
        ))
    })
    .await;
    match readiness {
        Ok(readiness) if readiness.ready => Json(readiness).into_response(),
        Ok(readiness) => (StatusCode::SERVICE_UNAVAILABLE, Json(readiness)).into_response(),
        Err(response) => response,
    }
}

async fn scrape(State(shared): State<Arc<Shared>>) -> Response {
    match blocking(&shared, |shared| queue_gauges(shared.delivery.spool())).await {
        Ok(queue) => match metrics::render(&queue) {
            Some(text) => {
                let content_type = [(header::CONTENT_TYPE, "text/plain; version=0.0.4")];
                (content_type, text).into_response()
            }
            None => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no metrics recorder in this process\n",
            )
                .into_response(),
        },
        Err(response) => response,
    }
}

/// The queue's size per state, read from the spool now. Blocking.
fn queue_gauges(spool: &spool::Spool) -> std::io::Result<QueueGauges> {
    let mut messages = Vec::new();
    for state in spool::State::ALL {
        messages.push((state.dir_name(), spool.ids(state)?.len()));
    }
    Ok(QueueGauges {
        messages,
        spool_bytes: spool.data_bytes()?,
    })
}

fn collect_status(shared: &Shared) -> std::io::Result<Status> {
    let routes = shared.sessions.settings().policy.routes().views();
    Status::collect(&shared.delivery, routes)
}

async fn status_json(State(shared): State<Arc<Shared>>) -> Response {
    match blocking(&shared, collect_status).await {
        Ok(status) => Json(status).into_response(),
        Err(response) => response,
    }
}

#[derive(Deserialize)]
struct PageQuery {
    token: Option<String>,
    retried: Option<usize>,
}

async fn status_page(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<PageQuery>,
) -> Response {
    let status = match blocking(&shared, collect_status).await {
        Ok(status) => status,
        Err(response) => return response,
    };
    let html = page::render(
        &status,
        &PageContext {
            form_token: shared.form_token.value(),
            access_token: shared.access.url_token(query.token.as_deref()),
            retried: query.retried,
        },
    );
    let headers = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
        // The admin token may be in the address.
        (header::REFERRER_POLICY, "no-referrer"),
        (header::CACHE_CONTROL, "no-store"),
    ];
    (headers, Html(html)).into_response()
}

#[derive(Deserialize)]
struct RetryForm {
    account: String,
    state: spool::State,
    form_token: String,
}

/// A retry button: the account's held or rejected mail is due now, as
/// `sendbridge queue retry` makes it, and the queue is read at once.
async fn retry(
    State(shared): State<Arc<Shared>>,
    Query(query): Query<TokenQuery>,
    headers: HeaderMap,
    Form(form): Form<RetryForm>,
) -> Response {
    if let Err(denied) = shared.form_token.check(&form.form_token, &headers) {
        // Quoted and escaped: the value is whatever the posting page sent.
        warn!(
            account = form.account.as_str(),
            "admin interface: retry form refused: not from the status page"
        );
        return denied.into_response();
    }
    let known = shared
        .delivery
        .account_holds()
        .iter()
        .any(|(name, _)| *name == form.account);
    if !known || !matches!(form.state, spool::State::Held | spool::State::Rejected) {
        return (StatusCode::BAD_REQUEST, "no such account or state\n").into_response();
    }
    let (account, state) = (form.account.clone(), form.state);
    let retried = blocking(&shared, move |shared| {
        let target = RetryTarget::AccountIn(account, state);
        let retried =
            operations::retry(shared.delivery.spool(), target).map_err(std::io::Error::other)?;
        Ok(retried.due)
    })
    .await;
    let count = match retried {
        Ok(count) => count,
        Err(response) => return response,
    };
    shared.delivery.scan_now();
    info!(account = %form.account, state = %form.state, count, "retry requested on the status page");
    let token = shared
        .access
        .url_token(query.token.as_deref())
        .map_or(String::new(), |token| format!("&token={token}"));
    Redirect::to(&format!("/?retried={count}{token}")).into_response()
}

/// Runs spool I/O off the async workers; a failure is a 500 naming it.
async fn blocking<T: Send + 'static>(
    shared: &Arc<Shared>,
    work: impl FnOnce(&Shared) -> std::io::Result<T> + Send + 'static,
) -> Result<T, Response> {
    let shared = shared.clone();
    let result = tokio::task::spawn_blocking(move || work(&shared))
        .await
        .map_err(std::io::Error::other)
        .and_then(|result| result);
    result.map_err(|err| {
        warn!(error = %err, "admin interface: cannot read the spool");
        let text = format!("cannot read the spool: {err}\n");
        (StatusCode::INTERNAL_SERVER_ERROR, text).into_response()
    })
}
