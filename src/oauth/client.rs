//! The token endpoint as a client sees it: form POSTs, JSON answers
//! (RFC 6749 §4-5, device authorization RFC 8628). Blocking ureq calls run
//! on tokio's blocking pool; every request is bounded by a timeout. Nothing
//! here logs: answers carry tokens.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use ureq::http::Method;

use super::endpoints::Endpoints;
use crate::config::AccountConfig;
use crate::secret::Secret;
use crate::transport::http::{HttpClient, Request};

/// Bounds each request as a whole, connecting included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEVICE_CODE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";
const JWT_BEARER_GRANT: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";

/// Tokens the endpoint issued.
#[derive(Debug)]
pub struct Issued {
    pub access_token: Secret,
    pub expires_in: Duration,
    /// A new refresh token, when the provider issued or rotated one.
    pub refresh_token: Option<Secret>,
    /// The scopes granted, space-separated, when the endpoint says
    /// (RFC 6749 §5.1).
    pub scope: Option<String>,
}

/// A device code to show a person (RFC 8628 §3.2).
#[derive(Debug)]
pub struct DeviceAuthorization {
    pub device_code: Secret,
    pub user_code: String,
    pub verification_uri: String,
    pub expires_in: Duration,
    pub interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointError {
    /// An OAuth error answer, e.g. `invalid_grant` or `authorization_pending`.
    Refused {
        error: String,
        description: Option<String>,
    },
    /// No usable answer: network, timeout, 5xx, not an OAuth answer.
    Unreachable(String),
}

impl EndpointError {
    /// The endpoint's words, for logs and messages (never a token).
    pub fn reason(&self) -> String {
        match self {
            EndpointError::Refused {
                error,
                description: Some(description),
            } => format!("{error}: {description}"),
            EndpointError::Refused { error, .. } => error.clone(),
            EndpointError::Unreachable(reason) => reason.clone(),
        }
    }
}

/// Every field any of the answers has (Google says `verification_url`).
#[derive(Deserialize, Default)]
#[serde(default)]
struct Answer {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
    refresh_token: Option<String>,
    scope: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
    device_code: Option<String>,
    user_code: Option<String>,
    #[serde(alias = "verification_url")]
    verification_uri: Option<String>,
    interval: Option<serde_json::Value>,
}

#[derive(Clone)]
pub struct TokenClient {
    http: HttpClient,
    endpoints: Arc<Endpoints>,
    client_id: String,
    client_secret: Option<Secret>,
}

impl TokenClient {
    /// The token client of `account`, an `auth = "oauth2"` account; its
    /// `ca_file` is trusted for the token endpoint too.
    pub fn new(account: &AccountConfig) -> anyhow::Result<TokenClient> {
        let config = account
            .oauth2
            .as_ref()
            .expect("config validation requires [oauth2] with auth = \"oauth2\"");
        Ok(TokenClient {
            http: HttpClient::new(account.ca_file.as_deref(), REQUEST_TIMEOUT)?,
            endpoints: Arc::new(Endpoints::resolve(account)),
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
        })
    }

    pub fn endpoints(&self) -> &Endpoints {
        &self.endpoints
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub async fn refresh(&self, refresh_token: &Secret) -> Result<Issued, EndpointError> {
        let form = vec![
            ("grant_type", "refresh_token".to_string()),
            ("refresh_token", refresh_token.expose().to_string()),
        ];
        issued(self.post(self.endpoints.token_url.clone(), form).await?)
    }

    /// Redeems an authorization code with its PKCE verifier.
    pub async fn exchange_code(
        &self,
        code: &Secret,
        verifier: &Secret,
        redirect_uri: &str,
    ) -> Result<Issued, EndpointError> {
        let form = vec![
            ("grant_type", "authorization_code".to_string()),
            ("code", code.expose().to_string()),
            ("code_verifier", verifier.expose().to_string()),
            ("redirect_uri", redirect_uri.to_string()),
        ];
        issued(self.post(self.endpoints.token_url.clone(), form).await?)
    }

    /// App-only: the client's own credentials for a token.
    pub async fn client_credentials(&self) -> Result<Issued, EndpointError> {
        let form = vec![
            ("grant_type", "client_credentials".to_string()),
            ("scope", self.endpoints.scope()),
        ];
        issued(self.post(self.endpoints.token_url.clone(), form).await?)
    }

    /// A service account's signed assertion for a token (RFC 7523 §2.1):
    /// the assertion is the credential, no client ID or secret goes along.
    pub async fn jwt_bearer(&self, assertion: &Secret) -> Result<Issued, EndpointError> {
        let form = vec![
            ("grant_type", JWT_BEARER_GRANT.to_string()),
            ("assertion", assertion.expose().to_string()),
        ];
        issued(self.send(self.endpoints.token_url.clone(), form).await?)
    }

    pub async fn device_authorization(&self) -> Result<DeviceAuthorization, EndpointError> {
        let url = self.endpoints.device_url.clone().ok_or_else(|| {
            EndpointError::Unreachable("no device_url for this provider".to_string())
        })?;
        let answer = self
            .post(url, vec![("scope", self.endpoints.scope())])
            .await?;
        let missing = |field: &str| {
            EndpointError::Unreachable(format!("the device code answer has no {field}"))
        };
        Ok(DeviceAuthorization {
            device_code: Secret::new(answer.device_code.ok_or_else(|| missing("device_code"))?),
            user_code: answer.user_code.ok_or_else(|| missing("user_code"))?,
            verification_uri: answer
                .verification_uri
                .ok_or_else(|| missing("verification_uri"))?,
            expires_in: seconds(answer.expires_in.as_ref()).unwrap_or(Duration::from_secs(900)),
            // RFC 8628 §3.2: 5 seconds unless the endpoint says otherwise.
            interval: seconds(answer.interval.as_ref()).unwrap_or(Duration::from_secs(5)),
        })
    }

    /// One poll; `authorization_pending` and `slow_down` come back as
    /// `Refused` for the caller's loop.
    pub async fn poll_device(&self, device_code: &Secret) -> Result<Issued, EndpointError> {
        let form = vec![
            ("grant_type", DEVICE_CODE_GRANT.to_string()),
            ("device_code", device_code.expose().to_string()),
        ];
        issued(self.post(self.endpoints.token_url.clone(), form).await?)
    }

    /// POSTs `form` plus the client's credentials.
    async fn post(
        &self,
        url: String,
        mut form: Vec<(&'static str, String)>,
    ) -> Result<Answer, EndpointError> {
        form.push(("client_id", self.client_id.clone()));
        if let Some(secret) = &self.client_secret {
            form.push(("client_secret", secret.expose().to_string()));
        }
        self.send(url, form).await
    }

    /// POSTs `form` as it is; an OAuth error answer becomes `Refused`,
    /// anything unusable `Unreachable`.
    async fn send(
        &self,
        url: String,
        form: Vec<(&'static str, String)>,
    ) -> Result<Answer, EndpointError> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form)
            .finish();
        let request = Request::new(Method::POST, url)
            .body("application/x-www-form-urlencoded", body.into_bytes());
        let response = self
            .http
            .send(request)
            .await
            .map_err(EndpointError::Unreachable)?;
        let status = response.status;
        let answer: Answer = serde_json::from_slice(&response.body).unwrap_or_default();
        match (status, answer.error.clone()) {
            (200..=299, None) => Ok(answer),
            (400..=499, Some(error)) if error != "temporarily_unavailable" => {
                Err(EndpointError::Refused {
                    error,
                    description: answer.error_description,
                })
            }
            (status, error) => Err(EndpointError::Unreachable(format!(
                "the token endpoint answered HTTP {status}{}",
                error.map(|error| format!(" ({error})")).unwrap_or_default()
            ))),
        }
    }
}

fn issued(answer: Answer) -> Result<Issued, EndpointError> {
    let access_token = answer.access_token.ok_or_else(|| {
        EndpointError::Unreachable("the token endpoint's answer has no access_token".to_string())
    })?;
    Ok(Issued {
        access_token: Secret::new(access_token),
        // Without expires_in, assume the common hour.
        expires_in: seconds(answer.expires_in.as_ref()).unwrap_or(Duration::from_secs(3600)),
        refresh_token: answer.refresh_token.map(Secret::new),
        scope: answer.scope,
    })
}

/// A number of seconds, as a JSON number or (some providers) a string.
fn seconds(value: Option<&serde_json::Value>) -> Option<Duration> {
    let seconds = match value? {
        serde_json::Value::Number(number) => number.as_u64()?,
        serde_json::Value::String(text) => text.parse().ok()?,
        _ => return None,
    };
    Some(Duration::from_secs(seconds))
}
