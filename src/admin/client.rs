//! The admin interface as `sendbridge health` and `sendbridge status` reach
//! it: plain HTTP to the configured address, with the token when there is
//! one.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use anyhow::Context;

use crate::config::AdminConfig;
use crate::secret::Secret;

pub struct AdminClient {
    base: String,
    token: Option<Secret>,
    agent: ureq::Agent,
}

/// A response: status code and body.
pub struct Answer {
    pub status: u16,
    pub body: String,
}

impl AdminClient {
    /// `timeout` bounds each request as a whole, connecting included.
    pub fn new(config: &AdminConfig, timeout: Duration) -> anyhow::Result<AdminClient> {
        let listen = config.listen.context(
            "admin.listen is empty: the admin interface is off (set it, e.g. to 127.0.0.1:9025)",
        )?;
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            // The relay is on this machine: a proxy from the environment
            // would only get in the way.
            .proxy(None)
            .max_redirects(0)
            .build()
            .into();
        Ok(AdminClient {
            base: format!("http://{}", reachable(listen)),
            token: config.token.clone(),
            agent,
        })
    }

    /// GETs `path` (e.g. `/healthz`); an error when nothing answers.
    pub fn get(&self, path: &str) -> anyhow::Result<Answer> {
        let url = format!("{}{path}", self.base);
        let mut request = self.agent.get(&url);
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {}", token.expose()));
        }
        let mut response = request
            .call()
            .with_context(|| format!("no answer from the admin interface at {url}"))?;
        let body = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer of {url}"))?;
        Ok(Answer {
            status: response.status().as_u16(),
            body,
        })
    }
}

/// Where to connect for a listen address: a wildcard address (0.0.0.0, as
/// in a container) is served on loopback too.
fn reachable(listen: SocketAddr) -> SocketAddr {
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, listen.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_listen_addresses_are_reached_on_loopback() {
        let reached = |text: &str| reachable(text.parse().unwrap()).to_string();
        assert_eq!(reached("0.0.0.0:9025"), "127.0.0.1:9025");
        assert_eq!(reached("[::]:9025"), "[::1]:9025");
        assert_eq!(reached("192.0.2.1:9025"), "192.0.2.1:9025");
    }
}
