//! A local webhook receiver on 127.0.0.1 (axum over real HTTP): keeps every
//! POST it gets and answers with a status the test chooses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tokio::sync::watch;

/// One POST as it arrived.
#[derive(Debug, Clone)]
pub struct Posted {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Posted {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(key, _)| key.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

struct Shared {
    posted: watch::Sender<Vec<Posted>>,
    status: AtomicU16,
}

pub struct WebhookReceiver {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
}

async fn receive(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let headers = headers
        .iter()
        .map(|(name, value)| {
            let value = value.to_str().unwrap_or_default().to_string();
            (name.to_string(), value)
        })
        .collect();
    shared.posted.send_modify(|posted| {
        posted.push(Posted {
            headers,
            body: body.to_vec(),
        })
    });
    StatusCode::from_u16(shared.status.load(Ordering::SeqCst)).unwrap()
}

impl WebhookReceiver {
    /// Answers 200 until told otherwise.
    pub async fn start() -> WebhookReceiver {
        let shared = Arc::new(Shared {
            posted: watch::Sender::new(Vec::new()),
            status: AtomicU16::new(200),
        });
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        WebhookReceiver { addr, shared }
    }

    /// The URL for `notify.webhook`, with a query that stands for a token.
    pub fn url(&self) -> String {
        format!("http://{}/hook?token=SECRET", self.addr)
    }

    /// The status every later POST is answered with.
    pub fn answer_with(&self, status: u16) {
        self.shared.status.store(status, Ordering::SeqCst);
    }

    pub fn posted(&self) -> Vec<Posted> {
        self.shared.posted.borrow().clone()
    }

    /// Every POST so far, once there are at least `n`; panics after 30 s.
    pub async fn wait_for(&self, n: usize) -> Vec<Posted> {
        let mut posted = self.shared.posted.subscribe();
        let waited = tokio::time::timeout(
            Duration::from_secs(30),
            posted.wait_for(|posted| posted.len() >= n),
        )
        .await;
        match waited {
            Ok(posted) => posted.unwrap().clone(),
            Err(_) => panic!("webhook: {n} POST(s) expected, got {:?}", self.posted()),
        }
    }
}
