//! A local OAuth 2.0 token endpoint on 127.0.0.1 (axum over real HTTP):
//! scripted answers for the refresh_token, authorization_code,
//! client_credentials and device_code grants, Google's service account
//! grant (jwt-bearer: the assertion's RS256 signature verified with the
//! key's public half, its claims checked), and a count of requests per
//! grant. Every token, code and secret it deals in contains "SECRET", so
//! tests can check none of them reaches any output.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use aws_lc_rs::signature::{KeyPair as _, RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use axum::extract::{Form, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
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
    /// The service account whose assertions are accepted.
    pub service_account: Option<Assertions>,
    /// The `scope` field of every answer with a token, when set.
    pub scope: Option<String>,
}

/// What a service account's assertion must say, and the key it is signed
/// with (public half, PKCS#1 DER). `scope` is the one domain-wide
/// delegation grants; any other is refused as Google does.
#[derive(Debug, Clone)]
pub struct Assertions {
    pub public_key: Vec<u8>,
    pub issuer: String,
    pub subject: String,
    pub scope: String,
    pub audience: String,
}

pub const SERVICE_ACCOUNT_EMAIL: &str = "relay@project.iam.gserviceaccount.com";
pub const SERVICE_ACCOUNT_CLIENT_ID: &str = "109876543210987654321";

/// The TOML of account `ws`, the mailbox printer@example.com, signed in by
/// the service account whose key is `key_file`.
pub fn service_account_toml(key_file: &Path) -> String {
    format!(
        r#"
        [accounts.ws]
        username = "printer@example.com"
        auth = "oauth2"
        [accounts.ws.oauth2]
        provider = "google"
        flow = "service_account"
        service_account_file = "{}"
        "#,
        key_file.display()
    )
}

/// A service account JSON key (a fresh RSA key) written into `dir` as the
/// Cloud console downloads it, and what the endpoint must then accept from
/// `subject` for `scope` at `token_uri`.
pub fn service_account_key(
    dir: &Path,
    token_uri: &str,
    subject: &str,
    scope: &str,
) -> (PathBuf, Assertions) {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let rsa = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&pair.serialize_der()).unwrap();
    let key = json!({
        "type": "service_account",
        "project_id": "project",
        "private_key_id": "0123456789abcdef",
        "private_key": pair.serialize_pem(),
        "client_email": SERVICE_ACCOUNT_EMAIL,
        "client_id": SERVICE_ACCOUNT_CLIENT_ID,
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
    });
    let path = dir.join("service-account.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&key).unwrap()).unwrap();
    let assertions = Assertions {
        public_key: rsa.public_key().as_ref().to_vec(),
        issuer: SERVICE_ACCOUNT_EMAIL.into(),
        subject: subject.into(),
        scope: scope.into(),
        audience: token_uri.into(),
    };
    (path, assertions)
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
            service_account: None,
            scope: None,
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
    if grant == "urn:ietf:params:oauth:grant-type:jwt-bearer" {
        return redeem_assertion(&mut script, field("assertion").unwrap_or_default());
    }
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
    if let Some(scope) = &script.scope {
        answer["scope"] = json!(scope);
    }
    if refresh {
        let token = format!("refresh-SECRET-{n}");
        answer["refresh_token"] = json!(token);
        script.refresh_token = Some(token);
    }
    Json(answer).into_response()
}

/// Google's answers to a service account's assertion (no client
/// credentials: the signature is the proof).
fn redeem_assertion(script: &mut Script, jwt: &str) -> Response {
    let expected = script
        .service_account
        .clone()
        .expect("a service account is scripted");
    match check_assertion(&expected, jwt) {
        Ok(()) => issue(script, false),
        Err(Refusal::NotDelegated) => {
            let body = json!({
                "error": "unauthorized_client",
                "error_description": "Client is unauthorized to retrieve access tokens using this method, or client not authorized for any of the scopes requested.",
            });
            (StatusCode::UNAUTHORIZED, Json(body)).into_response()
        }
        Err(Refusal::Invalid(description)) => refuse("invalid_grant", description),
    }
}

enum Refusal {
    /// Domain-wide delegation does not grant the scope.
    NotDelegated,
    Invalid(&'static str),
}

impl From<&'static str> for Refusal {
    fn from(description: &'static str) -> Refusal {
        Refusal::Invalid(description)
    }
}

fn check_assertion(expected: &Assertions, jwt: &str) -> Result<(), Refusal> {
    let parts: Vec<&str> = jwt.split('.').collect();
    let [header, claims, signature] = parts[..] else {
        return Err("Invalid JWT: not three parts.".into());
    };
    let decode = |part: &str| -> Option<serde_json::Value> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
    };
    let header = decode(header).ok_or("Invalid JWT header.")?;
    if header != json!({ "alg": "RS256", "typ": "JWT" }) {
        return Err("Invalid JWT header.".into());
    }
    let signed = &jwt[..jwt.rfind('.').unwrap()];
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| "Invalid JWT Signature.")?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, &expected.public_key)
        .verify(signed.as_bytes(), &signature)
        .map_err(|_| "Invalid JWT Signature.")?;
    let claims = decode(claims).ok_or("Invalid JWT claims.")?;
    let text = |name: &str| claims[name].as_str().unwrap_or_default().to_string();
    if text("iss") != expected.issuer {
        return Err("Invalid JWT Signature.".into());
    }
    if text("sub") != expected.subject {
        return Err("Invalid email or User ID".into());
    }
    if text("aud") != expected.audience {
        return Err("Invalid JWT: Failed audience check.".into());
    }
    if text("scope") != expected.scope {
        return Err(Refusal::NotDelegated);
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let (iat, exp) = (claims["iat"].as_u64(), claims["exp"].as_u64());
    match (iat, exp) {
        (Some(iat), Some(exp)) if iat <= now + 60 && now < exp && exp - iat <= 3600 => Ok(()),
        _ => Err("Invalid JWT: Token must be a short-lived token (60 minutes) and in a reasonable timeframe. Check your iat and exp values in the JWT claim.".into()),
    }
}

fn refuse(error: &str, description: &str) -> Response {
    let body = json!({ "error": error, "error_description": description });
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}
