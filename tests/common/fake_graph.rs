//! A local Microsoft Graph on 127.0.0.1 over real TLS (the test CA of the
//! fake SMTP upstream), answering as Graph documents it: `sendMail` with
//! base64 MIME (202), drafts created from MIME (201 with an id),
//! attachments in one request or through an upload session (PUT ranges to
//! an upload URL that takes no token), `send` (202), error bodies
//! `{"error":{"code","message"}}` with their status and headers such as
//! Retry-After, and 413 for a request body over 4 MB.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use serde_json::json;
use tokio::sync::watch;

use super::https::HttpsServer;

/// Graph's request limit.
pub const MAX_REQUEST: usize = 4 * 1024 * 1024;

/// A message Graph sent.
#[derive(Debug, Clone)]
pub struct GraphSent {
    /// The `{id}` of `/users/{id}/…`.
    pub mailbox: String,
    /// The MIME as posted (for a draft: the draft's).
    pub mime: Vec<u8>,
    /// Attachments added to the draft: (name, decoded bytes).
    pub attachments: Vec<(String, Vec<u8>)>,
    /// `sendMail`, or `draft` for a draft sent.
    pub via: &'static str,
    /// Extended properties patched onto the draft.
    pub patched: Vec<String>,
}

/// One request as it arrived (method, path, whether it had a bearer token,
/// body length).
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub bearer: Option<String>,
    pub content_range: Option<String>,
    pub len: usize,
}

/// An answer the test chooses for the next matching request.
#[derive(Debug, Clone)]
pub struct Scripted {
    /// The path ends with this (e.g. `/sendMail`).
    pub path_suffix: &'static str,
    pub status: u16,
    pub code: &'static str,
    pub message: String,
    pub retry_after: Option<&'static str>,
    /// Answers only after this long (a Graph that is slow to answer).
    pub delay: Option<Duration>,
}

impl Scripted {
    pub fn error(
        path_suffix: &'static str,
        status: u16,
        code: &'static str,
        message: &str,
    ) -> Self {
        Scripted {
            path_suffix,
            status,
            code,
            message: message.to_string(),
            retry_after: None,
            delay: None,
        }
    }
}

#[derive(Default)]
struct Draft {
    mailbox: String,
    mime: Vec<u8>,
    attachments: Vec<(String, Vec<u8>)>,
    patched: Vec<String>,
}

struct Upload {
    draft: String,
    name: String,
    size: usize,
    received: Vec<u8>,
}

#[derive(Default)]
struct Shared {
    addr: Option<SocketAddr>,
    token: String,
    script: VecDeque<Scripted>,
    drafts: BTreeMap<String, Draft>,
    uploads: BTreeMap<String, Upload>,
    seen: Vec<Seen>,
    next_id: usize,
}

pub struct FakeGraph {
    server: HttpsServer,
    shared: Arc<Mutex<Shared>>,
    sent: watch::Sender<Vec<GraphSent>>,
}

type AppState = (Arc<Mutex<Shared>>, watch::Sender<Vec<GraphSent>>);

impl FakeGraph {
    /// Accepts `token` as the bearer of every request but uploads.
    pub async fn start(token: &str) -> FakeGraph {
        let shared = Arc::new(Mutex::new(Shared {
            token: token.to_string(),
            ..Shared::default()
        }));
        let sent = watch::Sender::new(Vec::new());
        let app = Router::new()
            .fallback(answer)
            .layer(DefaultBodyLimit::max(4 * MAX_REQUEST))
            .with_state((shared.clone(), sent.clone()));
        let server = HttpsServer::start(app).await;
        // Upload URLs name the server; no request comes before this returns.
        shared.lock().unwrap().addr = Some(server.addr);
        FakeGraph {
            server,
            shared,
            sent,
        }
    }

    /// `api_url` for the account.
    pub fn url(&self) -> String {
        self.server.base()
    }

    pub fn ca_file(&self) -> &Path {
        self.server.ca_file()
    }

    pub fn set_token(&self, token: &str) {
        self.shared.lock().unwrap().token = token.to_string();
    }

    /// Answers the next request whose path ends with `scripted.path_suffix`
    /// with it, once.
    pub fn script(&self, scripted: Scripted) {
        self.shared.lock().unwrap().script.push_back(scripted);
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().unwrap().seen.clone()
    }

    pub fn sent(&self) -> Vec<GraphSent> {
        self.sent.borrow().clone()
    }

    /// Drafts created and not sent or deleted.
    pub fn drafts_left(&self) -> usize {
        self.shared.lock().unwrap().drafts.len()
    }

    pub async fn wait_for_sent(&self, n: usize, timeout: Duration) -> Vec<GraphSent> {
        let mut sent = self.sent.subscribe();
        let waited = tokio::time::timeout(timeout, sent.wait_for(|sent| sent.len() >= n)).await;
        let sent = waited.expect("Graph sent the messages in time").unwrap();
        sent.clone()
    }
}

fn not_found() -> Response {
    graph_error(
        404,
        "ErrorItemNotFound",
        "The specified object was not found in the store.",
    )
}

fn graph_error(status: u16, code: &str, message: &str) -> Response {
    let status = StatusCode::from_u16(status).unwrap();
    let body = json!({"error": {"code": code, "message": message}}).to_string();
    (status, [("Content-Type", "application/json")], body).into_response()
}

/// Answers after the scripted delay, if any.
async fn answer(
    state: State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let response = respond(state, method, uri, headers, body);
    if let Some(Delay(delay)) = response.extensions().get::<Delay>() {
        tokio::time::sleep(*delay).await;
    }
    response
}

#[derive(Clone, Copy)]
struct Delay(Duration);

fn respond(
    State((shared, sent)): State<AppState>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = percent_decoded(uri.path());
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let bearer = header("authorization").and_then(|v| v.strip_prefix("Bearer ").map(String::from));
    let mut shared = shared.lock().unwrap();
    shared.seen.push(Seen {
        method: method.to_string(),
        path: path.clone(),
        bearer: bearer.clone(),
        content_range: header("content-range"),
        len: body.len(),
    });
    if body.len() > MAX_REQUEST {
        return graph_error(
            413,
            "ErrorRequestEntityTooLarge",
            "The request is too large.",
        );
    }
    if let Some(upload) = path.strip_prefix("/upload/") {
        return upload_range(
            &mut shared,
            upload,
            bearer.is_some(),
            header("content-range"),
            &body,
        );
    }
    if bearer.as_deref() != Some(shared.token.as_str()) {
        return graph_error(
            401,
            "InvalidAuthenticationToken",
            "Access token has expired or is not yet valid.",
        );
    }
    if let Some(index) = shared
        .script
        .iter()
        .position(|s| path.ends_with(s.path_suffix))
    {
        let scripted = shared.script.remove(index).unwrap();
        let mut response = graph_error(scripted.status, scripted.code, &scripted.message);
        if let Some(after) = scripted.retry_after {
            response
                .headers_mut()
                .insert("Retry-After", after.parse().unwrap());
        }
        if let Some(delay) = scripted.delay {
            response.extensions_mut().insert(Delay(delay));
        }
        return response;
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mime = || BASE64.decode(body.as_ref());
    match (method.as_str(), segments.as_slice()) {
        ("POST", ["v1.0", "users", mailbox, "sendMail"]) => {
            let Ok(mime) = mime() else {
                return graph_error(
                    400,
                    "ErrorMimeContentInvalidBase64String",
                    "Invalid base64 string for MIME content.",
                );
            };
            if !super::https::names_a_recipient(&mime) {
                return graph_error(
                    400,
                    "ErrorInvalidRecipients",
                    "At least one recipient is not valid., A message can't be sent because it contains no recipients.",
                );
            }
            let mailbox = mailbox.to_string();
            sent.send_modify(|sent| {
                sent.push(GraphSent {
                    mailbox,
                    mime,
                    attachments: Vec::new(),
                    via: "sendMail",
                    patched: Vec::new(),
                })
            });
            StatusCode::ACCEPTED.into_response()
        }
        ("POST", ["v1.0", "users", mailbox, "messages"]) => {
            let Ok(mime) = mime() else {
                return graph_error(
                    400,
                    "ErrorMimeContentInvalidBase64String",
                    "Invalid base64 string for MIME content.",
                );
            };
            shared.next_id += 1;
            let id = format!("AAMkAD{}=", shared.next_id);
            let draft = Draft {
                mailbox: mailbox.to_string(),
                mime,
                ..Draft::default()
            };
            shared.drafts.insert(id.clone(), draft);
            (
                StatusCode::CREATED,
                axum::Json(json!({"id": id, "isDraft": true})),
            )
                .into_response()
        }
        ("PATCH", ["v1.0", "users", _, "messages", id]) => {
            let Some(draft) = shared.drafts.get_mut(*id) else {
                return not_found();
            };
            let patch: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            for property in patch["singleValueExtendedProperties"]
                .as_array()
                .into_iter()
                .flatten()
            {
                draft
                    .patched
                    .push(format!("{}={}", property["id"], property["value"]));
            }
            (StatusCode::OK, axum::Json(json!({"id": id}))).into_response()
        }
        ("POST", ["v1.0", "users", _, "messages", id, "attachments"]) => {
            let attachment: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let Some(draft) = shared.drafts.get_mut(*id) else {
                return not_found();
            };
            let bytes = BASE64
                .decode(attachment["contentBytes"].as_str().unwrap_or_default())
                .unwrap_or_default();
            let name = attachment["name"].as_str().unwrap_or_default().to_string();
            draft.attachments.push((name, bytes));
            (StatusCode::CREATED, axum::Json(json!({"id": "att"}))).into_response()
        }
        (
            "POST",
            [
                "v1.0",
                "users",
                _,
                "messages",
                id,
                "attachments",
                "createUploadSession",
            ],
        ) => {
            if !shared.drafts.contains_key(*id) {
                return not_found();
            }
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            let item = &request["AttachmentItem"];
            shared.next_id += 1;
            let session = format!("session{}", shared.next_id);
            let upload = Upload {
                draft: id.to_string(),
                name: item["name"].as_str().unwrap_or_default().to_string(),
                size: item["size"].as_u64().unwrap_or_default() as usize,
                received: Vec::new(),
            };
            shared.uploads.insert(session.clone(), upload);
            let addr = shared.addr.unwrap();
            let url = format!(
                "https://127.0.0.1:{}/upload/{session}?authtoken=embedded",
                addr.port()
            );
            (
                StatusCode::CREATED,
                axum::Json(json!({"uploadUrl": url, "expirationDateTime": "2026-12-08T00:00:00Z", "nextExpectedRanges": ["0-"]})),
            )
                .into_response()
        }
        ("POST", ["v1.0", "users", _, "messages", id, "send"]) => {
            let Some(draft) = shared.drafts.remove(*id) else {
                return not_found();
            };
            sent.send_modify(|sent| {
                sent.push(GraphSent {
                    mailbox: draft.mailbox,
                    mime: draft.mime,
                    attachments: draft.attachments,
                    via: "draft",
                    patched: draft.patched,
                })
            });
            StatusCode::ACCEPTED.into_response()
        }
        ("DELETE", ["v1.0", "users", _, "messages", id]) => {
            shared.drafts.remove(*id);
            StatusCode::NO_CONTENT.into_response()
        }
        _ => graph_error(400, "BadRequest", "Resource not found for the segment."),
    }
}

/// `PUT {uploadUrl}` with `Content-Range: bytes start-end/total`: 200 with
/// the next expected range, 201 when the attachment is whole. The URL is
/// its own authorization; a request with a token is refused, as documented.
fn upload_range(
    shared: &mut Shared,
    session: &str,
    has_token: bool,
    range: Option<String>,
    body: &[u8],
) -> Response {
    if has_token {
        return graph_error(
            401,
            "InvalidAuthenticationToken",
            "Do not send an Authorization header to the upload URL.",
        );
    }
    let Some(upload) = shared.uploads.get_mut(session) else {
        return graph_error(
            404,
            "ErrorItemNotFound",
            "The upload session was not found.",
        );
    };
    let expected = format!(
        "bytes {}-{}/{}",
        upload.received.len(),
        upload.received.len() + body.len().max(1) - 1,
        upload.size
    );
    if range.as_deref() != Some(expected.as_str()) {
        return graph_error(
            416,
            "InvalidRange",
            &format!("expected {expected}, got {range:?}"),
        );
    }
    upload.received.extend_from_slice(body);
    if upload.received.len() < upload.size {
        let next = format!("{}-", upload.received.len());
        return (
            StatusCode::OK,
            axum::Json(json!({"nextExpectedRanges": [next]})),
        )
            .into_response();
    }
    let upload = shared.uploads.remove(session).unwrap();
    if let Some(draft) = shared.drafts.get_mut(&upload.draft) {
        draft.attachments.push((upload.name, upload.received));
    }
    (
        StatusCode::CREATED,
        [("Location", "https://graph.test/attachments/1")],
    )
        .into_response()
}

/// `%XX` escapes decoded, as a server reads a path.
fn percent_decoded(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = bytes
            .get(i + 1..i + 3)
            .and_then(|hex| std::str::from_utf8(hex).ok())
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}
