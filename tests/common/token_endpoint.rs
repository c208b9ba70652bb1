//! A local OAuth 2.0 token endpoint on 127.0.0.1 (axum over real HTTP):
//! scripted answers for the refresh_token, authorization_code,
//! client_credentials and device_code grants, and a count of requests per
//! grant. Every token, code and secret it deals in contains "SECRET", so
//! tests can check none of them reaches any output.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use sendbridge::config::Config;
use sendbridge::oauth::{Store, Stored, Tokens};
use sendbridge::secret::Secret;
use serde_json::json;

pub const CLIENT_SECRET: &str = "client-SECRET";
pub const DEVICE_CODE: &str = "device-SECRET";
pub const USER_CODE: &str = "WDJB-MJHT";

/// What the endpoint does; tests change it between calls.
#[derive(Debug)]
pub struct Script {
    /// The lifetime of every access token issued.
    pub expires_in: u64,
    /// A new refresh token with every refresh.
    pub rotate: bool,
    /// An OAuth error (e.g. `invalid_grant`) for every refresh.
    pub refuse_refresh: Option<&'static str>,
    /// `authorization_pending` answers before a device code is redeemed.
    pub pending_polls: usize,
    /// The refresh token the endpoint accepts.
    pub refresh_token: Option<String>,
    issued: usize,
    /// Requests per grant type (and `device` for device codes).
    pub requests: BTreeMap<String, usize>,
    /// Every form received, in order.
    pub forms: Vec<BTreeMap<String, String>>,
}

pub struct TokenEndpoint {
    pub addr: SocketAddr,
    script: Arc<Mutex<Script>>,
}

impl TokenEndpoint {
    pub async fn start() -> TokenEndpoint {
        let script = Arc::new(Mutex::new(Script {
            expires_in: 3600,
            rotate: false,
            refuse_refresh: None,
            pending_polls: 0,
            refresh_token: None,
            issued: 0,
            requests: BTreeMap::new(),
            forms: Vec::new(),
        }));
        let app = Router::new()
            .route("/token", post(token))
            .route("/device", post(device))
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        TokenEndpoint { addr, script }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn script(&self) -> std::sync::MutexGuard<'_, Script> {
        self.script.lock().unwrap()
    }

    /// How many requests of `grant` arrived.
    pub fn requests(&self, grant: &str) -> usize {
        self.script().requests.get(grant).copied().unwrap_or(0)
    }

    /// The last form of `grant`.
    pub fn last_form(&self, grant: &str) -> BTreeMap<String, String> {
        let script = self.script();
        let mut forms = script.forms.iter().rev();
        forms
            .find(|form| form.get("grant_type").map(String::as_str) == Some(grant))
            .cloned()
            .unwrap_or_else(|| panic!("no {grant} request"))
    }
}

/// `Tokens` of a Google account `gmail` whose token endpoint is at
/// `token_url`, its store under `spool`; `extra` goes into its oauth2 table.
pub fn gmail_tokens(token_url: &str, spool: &Path, extra: &str) -> Arc<Tokens> {
    let config = Config::from_toml(&format!(
        r#"
        [accounts.gmail]
        username = "me@example.com"
        auth = "oauth2"
        [accounts.gmail.oauth2]
        provider = "google"
        client_id = "client-id"
        client_secret = "{CLIENT_SECRET}"
        token_url = "{token_url}"
        {extra}
        "#
    ))
    .unwrap();
    Tokens::new("gmail", &config.accounts["gmail"], spool).unwrap()
}

/// What `sendbridge oauth login` leaves behind for `account`.
pub fn store_refresh_token(spool: &Path, account: &str, username: &str, refresh_token: &str) {
    let stored = Stored {
        refresh_token: Some(Secret::new(refresh_token)),
        username: username.into(),
        ..Stored::default()
    };
    Store::new(spool, account).unwrap().save(&stored).unwrap();
}

type Shared = State<Arc<Mutex<Script>>>;

async fn token(State(script): Shared, Form(form): Form<BTreeMap<String, String>>) -> Response {
    let mut script = script.lock().unwrap();
    let grant = form.get("grant_type").cloned().unwrap_or_default();
    *script.requests.entry(grant.clone()).or_default() += 1;
    script.forms.push(form.clone());
    let field = |name: &str| form.get(name).map(String::as_str);
    if field("client_secret") != Some(CLIENT_SECRET) {
        return refuse("invalid_client", "Unauthorized");
    }
    match grant.as_str() {
        "refresh_token" => {
            if let Some(error) = script.refuse_refresh {
                return refuse(error, "Token has been expired or revoked.");
            }
            if field("refresh_token") != script.refresh_token.as_deref() {
                return refuse("invalid_grant", "Bad refresh token.");
            }
            let rotate = script.rotate;
            issue(&mut script, rotate)
        }
        "authorization_code" => issue(&mut script, true),
        "client_credentials" => issue(&mut script, false),
        "urn:ietf:params:oauth:grant-type:device_code" => {
            if field("device_code") != Some(DEVICE_CODE) {
                return refuse("invalid_grant", "Unknown device code.");
            }
            if script.pending_polls > 0 {
                script.pending_polls -= 1;
                return refuse("authorization_pending", "Not yet.");
            }
            issue(&mut script, true)
        }
        _ => refuse("unsupported_grant_type", "What grant?"),
    }
}

async fn device(State(script): Shared, Form(form): Form<BTreeMap<String, String>>) -> Response {
    let mut script = script.lock().unwrap();
    *script.requests.entry("device".to_string()).or_default() += 1;
    script.forms.push(form);
    Json(json!({
        "device_code": DEVICE_CODE,
        "user_code": USER_CODE,
        "verification_uri": "https://login.example/device",
        "expires_in": 600,
        "interval": 1,
    }))
    .into_response()
}

/// Access token `access-SECRET-<n>`, and with `refresh` a new refresh token
/// `refresh-SECRET-<n>` that replaces the accepted one.
fn issue(script: &mut Script, refresh: bool) -> Response {
    script.issued += 1;
    let n = script.issued;
    let mut answer = json!({
        "access_token": format!("access-SECRET-{n}"),
        "token_type": "Bearer",
        "expires_in": script.expires_in,
    });
    if refresh {
        let token = format!("refresh-SECRET-{n}");
        answer["refresh_token"] = json!(token);
        script.refresh_token = Some(token);
    }
    Json(answer).into_response()
}

fn refuse(error: &str, description: &str) -> Response {
    let body = json!({ "error": error, "error_description": description });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}
