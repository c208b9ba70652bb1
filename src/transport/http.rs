//! The one HTTPS client of the API transports (Microsoft Graph, the Gmail
//! API) and of the token endpoints: blocking ureq calls on tokio's blocking
//! pool, the account's `timeout` on every request as a whole, answers read
//! up to a bound, and the account's `ca_file` trusted for every endpoint.
//! Nothing here logs: requests carry access tokens, answers may carry them.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use ureq::http;
use ureq::tls::{Certificate, RootCerts, TlsConfig};

use crate::secret::Secret;

/// The most of an answer that is read; the APIs answer with small JSON
/// documents (a created draft's echo included).
const MAX_ANSWER: u64 = 4 * 1024 * 1024;

/// An HTTPS client for one account's endpoints.
#[derive(Clone)]
pub struct HttpClient {
    agent: ureq::Agent,
}

/// One request. `bearer` becomes the `Authorization` header.
pub struct Request {
    pub method: http::Method,
    pub url: String,
    pub bearer: Option<Secret>,
    /// Further header fields, e.g. `Content-Type`, `Content-Range`.
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Request {
    pub fn new(method: http::Method, url: impl Into<String>) -> Request {
        Request {
            method,
            url: url.into(),
            bearer: None,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn bearer(mut self, token: &Secret) -> Request {
        self.bearer = Some(token.clone());
        self
    }

    pub fn header(mut self, name: &'static str, value: impl Into<String>) -> Request {
        self.headers.push((name, value.into()));
        self
    }

    pub fn body(mut self, content_type: &str, body: Vec<u8>) -> Request {
        self.body = body;
        self.header("Content-Type", content_type)
    }
}

/// An answer, whatever its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// `Retry-After` as a delay from when the answer came.
    pub retry_after: Option<Duration>,
    /// `Location` (e.g. a created resource, or where to upload next).
    pub location: Option<String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

impl HttpClient {
    /// Verifies servers against the system's roots plus `ca_file` (the
    /// bundled Mozilla roots when there is neither, as in a `scratch`
    /// container); every request ends after `timeout`. Redirects are not
    /// followed: they would carry the token elsewhere.
    pub fn new(ca_file: Option<&Path>, timeout: Duration) -> anyhow::Result<HttpClient> {
        let tls = TlsConfig::builder()
            // Explicit, so the library works before (or without) a
            // process-wide default provider.
            .unversioned_rustls_crypto_provider(Arc::new(
                rustls::crypto::aws_lc_rs::default_provider(),
            ))
            .root_certs(root_certs(ca_file)?)
            .build();
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .max_redirects(0)
            .tls_config(tls)
            .build()
            .into();
        Ok(HttpClient { agent })
    }

    /// Sends `request`; the error says what failed (no answer, a timeout,
    /// an answer over the bound), never with a token.
    pub async fn send(&self, request: Request) -> Result<Response, String> {
        let agent = self.agent.clone();
        tokio::task::spawn_blocking(move || call(&agent, request))
            .await
            .map_err(|err| err.to_string())?
    }
}

fn call(agent: &ureq::Agent, request: Request) -> Result<Response, String> {
    let Request {
        method,
        url,
        bearer,
        headers,
        body,
    } = request;
    // The URL without its query, for messages.
    let target = url.split('?').next().unwrap_or_default().to_string();
    let mut builder = http::Request::builder()
        .method(method.clone())
        .uri(&url)
        .header("Accept", "application/json");
    if let Some(token) = &bearer {
        builder = builder.header("Authorization", format!("Bearer {}", token.expose()));
    }
    for (name, value) in headers {
        builder = builder.header(name, value);
    }
    let request = builder
        .body(body)
        .map_err(|err| format!("{method} {target}: {err}"))?;
    let mut response = agent
        .run(request)
        .map_err(|err| format!("no answer to {method} {target}: {err}"))?;
    let header = |name: http::HeaderName| {
        response
            .headers()
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
    };
    let retry_after =
        header(http::header::RETRY_AFTER).and_then(|value| retry_after(&value, SystemTime::now()));
    let location = header(http::header::LOCATION);
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_ANSWER)
        .read_to_vec()
        .map_err(|err| format!("reading the answer to {method} {target}: {err}"))?;
    Ok(Response {
        status,
        retry_after,
        location,
        body,
    })
}

/// `Retry-After` (RFC 9110 §10.2.3): delay-seconds or an HTTP-date, as the
/// delay from `now` (zero for a date past).
pub fn retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn root_certs(ca_file: Option<&Path>) -> anyhow::Result<RootCerts> {
    // Unreadable system certificates are skipped.
    let mut certs: Vec<Certificate<'static>> = rustls_native_certs::load_native_certs()
        .certs
        .iter()
        .map(|der| Certificate::from_der(der).to_owned())
        .collect();
    if let Some(ca_file) = ca_file {
        let pem =
            std::fs::read(ca_file).with_context(|| format!("cannot read {}", ca_file.display()))?;
        for item in ureq::tls::parse_pem(&pem) {
            if let ureq::tls::PemItem::Certificate(cert) =
                item.with_context(|| format!("{} is not PEM", ca_file.display()))?
            {
                certs.push(cert);
            }
        }
    }
    Ok(if certs.is_empty() {
        RootCerts::WebPki
    } else {
        RootCerts::from(certs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Mon, 07 Dec 2026 15:00:00 GMT").unwrap();
        // (header value, delay)
        let table = [
            ("120", Some(Duration::from_secs(120))),
            (" 0 ", Some(Duration::ZERO)),
            (
                "Mon, 07 Dec 2026 15:01:30 GMT",
                Some(Duration::from_secs(90)),
            ),
            // RFC 850 and asctime forms are HTTP-dates too.
            (
                "Monday, 07-Dec-26 15:00:10 GMT",
                Some(Duration::from_secs(10)),
            ),
            ("Mon Dec  7 15:00:05 2026", Some(Duration::from_secs(5))),
            ("Mon, 07 Dec 2026 14:00:00 GMT", Some(Duration::ZERO)),
            ("-5", None),
            ("1.5", None),
            ("soon", None),
            ("", None),
        ];
        for (value, delay) in table {
            assert_eq!(retry_after(value, now), delay, "{value:?}");
        }
    }
}
