//! A local Gmail API over real TLS (`users.messages.send` as Google
//! documents it): the JSON form with `raw` (base64url MIME), and the
//! resumable upload of `message/rfc822` through the upload URI. It keeps
//! each message sent, and answers scripted errors in Google's shape
//! (`{"error":{"code","message","errors":[{"reason"}],"status"}}`, with
//! `Retry-After` when asked) before the next requests.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use serde_json::json;
use tokio::sync::watch;

use super::fake_upstream::without_trace;
use super::https::HttpsServer;

/// A message Google accepted.
#[derive(Debug, Clone)]
pub struct SentMessage {
    pub mime: Vec<u8>,
    /// `json` or `upload`: which way it came.
    pub way: &'static str,
    pub token: String,
}

impl SentMessage {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.mime).into_owned()
    }

    /// The message as the legacy program wrote it, after the Bcc field
    /// `bcc` (the addresses added for the API, or none).
    pub fn as_written_after(&self, bcc: &str) -> String {
        let text = self.text();
        let rest = text
            .strip_prefix(bcc)
            .unwrap_or_else(|| panic!("{bcc:?} first: {text}"));
        without_trace(rest)
    }
}

/// A scripted error answer.
#[derive(Debug, Clone)]
pub struct Failure {
    pub status: u16,
    pub reason: &'static str,
    pub grpc_status: &'static str,
    pub message: &'static str,
    pub retry_after: Option<&'static str>,
}

#[derive(Default)]
struct Shared {
    /// Answered, in order, to the next requests that carry a valid token.
    failures: Mutex<VecDeque<Failure>>,
    /// Tokens answered 401 (revoked, expired early).
    refused_tokens: Mutex<Vec<String>>,
    /// JSON requests above this size get 413.
    json_limit: Mutex<Option<usize>>,
    /// Resumable sessions opened: the declared length, by upload id.
    sessions: Mutex<Vec<usize>>,
    /// Every request: (method path, Authorization).
    requests: Mutex<Vec<(String, String)>>,
    sent: watch::Sender<Vec<SentMessage>>,
    base: Mutex<String>,
}

pub struct FakeGmailApi {
    server: HttpsServer,
    shared: Arc<Shared>,
}

impl FakeGmailApi {
    pub async fn start() -> FakeGmailApi {
        let shared = Arc::new(Shared::default());
        let app = Router::new()
            .route("/gmail/v1/users/me/messages/send", post(send_json))
            .route(
                "/upload/gmail/v1/users/me/messages/send",
                post(start_upload).put(finish_upload),
            )
            // Gmail takes 35 MB through the upload URI.
            .layer(DefaultBodyLimit::max(40 * 1024 * 1024))
            .with_state(shared.clone());
        let server = HttpsServer::start(app).await;
        *shared.base.lock().unwrap() = server.base();
        FakeGmailApi { server, shared }
    }

    /// `accounts.<name>.api_url`.
    pub fn base(&self) -> String {
        self.server.base()
    }

    pub fn ca_file(&self) -> &std::path::Path {
        self.server.ca_file()
    }

    pub fn fail_next(&self, failure: Failure) {
        self.shared.failures.lock().unwrap().push_back(failure);
    }

    pub fn refuse_token(&self, token: &str) {
        self.shared
            .refused_tokens
            .lock()
            .unwrap()
            .push(token.to_string());
    }

    pub fn limit_json(&self, bytes: usize) {
        *self.shared.json_limit.lock().unwrap() = Some(bytes);
    }

    /// Every request so far as "METHOD /path".
    pub fn requests(&self) -> Vec<String> {
        let requests = self.shared.requests.lock().unwrap();
        requests
            .iter()
            .map(|(request, _)| request.clone())
            .collect()
    }

    pub fn sent(&self) -> Vec<SentMessage> {
        self.shared.sent.borrow().clone()
    }

    pub async fn wait_for_sent(&self, n: usize, timeout: std::time::Duration) -> Vec<SentMessage> {
        let mut sent = self.shared.sent.subscribe();
        let found = tokio::time::timeout(timeout, sent.wait_for(|sent| sent.len() >= n)).await;
        match found {
            Ok(Ok(sent)) => sent.clone(),
            _ => panic!(
                "{n} message(s) expected within {timeout:?}; got {:?}",
                self.requests()
            ),
        }
    }
}

type Api = State<Arc<Shared>>;

/// Checks the bearer token and plays a scripted failure; `Ok` carries the
/// token when the request goes on.
fn admit(shared: &Shared, request: String, headers: &HeaderMap) -> Result<String, Failure> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    shared
        .requests
        .lock()
        .unwrap()
        .push((request, authorization.clone()));
    let token = authorization
        .strip_prefix("Bearer ")
        .unwrap_or_default()
        .to_string();
    if token.is_empty() || shared.refused_tokens.lock().unwrap().contains(&token) {
        return Err(Failure {
            status: 401,
            reason: "authError",
            grpc_status: "UNAUTHENTICATED",
            message: "Invalid Credentials",
            retry_after: None,
        });
    }
    if let Some(failure) = shared.failures.lock().unwrap().pop_front() {
        return Err(failure);
    }
    Ok(token)
}

fn google_error(failure: &Failure) -> Response {
    let body = json!({ "error": {
        "code": failure.status,
        "message": failure.message,
        "errors": [{ "message": failure.message, "domain": "global", "reason": failure.reason }],
        "status": failure.grpc_status,
    }});
    let mut response = (
        StatusCode::from_u16(failure.status).unwrap(),
        axum::Json(body),
    )
        .into_response();
    if let Some(retry_after) = failure.retry_after {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static(retry_after));
    }
    response
}

fn accepted(shared: &Shared, mime: Vec<u8>, way: &'static str, token: String) -> Response {
    let mut id = 0;
    shared.sent.send_modify(|sent| {
        sent.push(SentMessage { mime, way, token });
        id = sent.len();
    });
    let id = format!("18c{id:013x}");
    axum::Json(json!({ "id": id, "threadId": id, "labelIds": ["SENT"] })).into_response()
}

async fn send_json(State(shared): Api, headers: HeaderMap, body: Bytes) -> Response {
    let token = match admit(
        &shared,
        "POST /gmail/v1/users/me/messages/send".into(),
        &headers,
    ) {
        Ok(token) => token,
        Err(refused) => return google_error(&refused),
    };
    if shared
        .json_limit
        .lock()
        .unwrap()
        .is_some_and(|limit| body.len() > limit)
    {
        return (StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large").into_response();
    }
    let value: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    let raw = value["raw"].as_str().unwrap_or_default();
    let Ok(mime) = URL_SAFE
        .decode(raw)
        .or_else(|_| URL_SAFE_NO_PAD.decode(raw))
    else {
        return google_error(&Failure {
            status: 400,
            reason: "invalidArgument",
            grpc_status: "INVALID_ARGUMENT",
            message: "Invalid value for ByteString",
            retry_after: None,
        });
    };
    if !super::https::names_a_recipient(&mime) {
        return google_error(&Failure {
            status: 400,
            reason: "invalidArgument",
            grpc_status: "INVALID_ARGUMENT",
            message: "Recipient address required",
            retry_after: None,
        });
    }
    accepted(&shared, mime, "json", token)
}

#[derive(serde::Deserialize)]
struct UploadQuery {
    #[serde(rename = "uploadType")]
    upload_type: String,
    upload_id: Option<usize>,
}

async fn start_upload(
    State(shared): Api,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
) -> Response {
    let request = format!(
        "POST /upload/gmail/v1/users/me/messages/send?uploadType={}",
        query.upload_type
    );
    if let Err(refused) = admit(&shared, request, &headers) {
        return google_error(&refused);
    }
    let header = |name: &str| headers.get(name).and_then(|value| value.to_str().ok());
    if query.upload_type != "resumable" || header("x-upload-content-type") != Some("message/rfc822")
    {
        return (
            StatusCode::BAD_REQUEST,
            "expected a resumable message/rfc822 upload",
        )
            .into_response();
    }
    let Some(length) = header("x-upload-content-length").and_then(|value| value.parse().ok())
    else {
        return (StatusCode::BAD_REQUEST, "X-Upload-Content-Length missing").into_response();
    };
    let id = {
        let mut sessions = shared.sessions.lock().unwrap();
        sessions.push(length);
        sessions.len() - 1
    };
    let location = format!(
        "{}/upload/gmail/v1/users/me/messages/send?uploadType=resumable&upload_id={id}",
        shared.base.lock().unwrap()
    );
    (StatusCode::OK, [(header::LOCATION, location)]).into_response()
}

async fn finish_upload(
    State(shared): Api,
    Query(query): Query<UploadQuery>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let request = "PUT /upload/gmail/v1/users/me/messages/send?uploadType=resumable".to_string();
    let token = match admit(&shared, request, &headers) {
        Ok(token) => token,
        Err(refused) => return google_error(&refused),
    };
    let declared = query
        .upload_id
        .and_then(|id| shared.sessions.lock().unwrap().get(id).copied());
    if declared != Some(body.len()) {
        return (
            StatusCode::BAD_REQUEST,
            "no such upload session, or not its length",
        )
            .into_response();
    }
    accepted(&shared, body.to_vec(), "upload", token)
}
