//! A small HTTP client for the admin interface: ureq, blocking, run off the
//! async runtime; redirects are not followed, so tests see them.

use std::net::SocketAddr;
use std::time::Duration;

/// A response.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub location: Option<String>,
    pub body: String,
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(20)))
        .http_status_as_error(false)
        .max_redirects(0)
        .proxy(None)
        .build()
        .into()
}

/// GET `path` with extra request headers.
pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Answer {
    let url = format!("http://{addr}{path}");
    let headers = owned(headers);
    blocking(move || {
        let mut request = agent().get(&url);
        for (name, value) in headers {
            request = request.header(name, value);
        }
        request.call()
    })
    .await
}

/// POST a form (`application/x-www-form-urlencoded`) to `path`.
pub async fn post_form(addr: SocketAddr, path: &str, fields: &[(&str, &str)]) -> Answer {
    let url = format!("http://{addr}{path}");
    let fields = owned(fields);
    blocking(move || agent().post(&url).send_form(fields)).await
}

/// Name-value pairs the blocking thread can own.
fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

async fn blocking(
    request: impl FnOnce() -> Result<ureq::http::Response<ureq::Body>, ureq::Error> + Send + 'static,
) -> Answer {
    tokio::task::spawn_blocking(move || {
        let mut response = request().expect("the admin interface answers");
        let location = response
            .headers()
            .get("location")
            .map(|value| value.to_str().unwrap().to_string());
        Answer {
            status: response.status().as_u16(),
            location,
            body: response.body_mut().read_to_string().unwrap(),
        }
    })
    .await
    .unwrap()
}
