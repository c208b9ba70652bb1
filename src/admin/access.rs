//! Who may use the admin interface, and which form posts are genuine.
//!
//! Without `[admin] token` only loopback clients are served, and only under
//! a loopback host name (a web page whose name was made to resolve to
//! 127.0.0.1, "DNS rebinding", is refused). With a token every request must
//! carry it, as `Authorization: Bearer <token>` or a `token` query
//! parameter (for a browser). Form posts also need the page's form token,
//! random per process, and must not come from another site.

use std::net::IpAddr;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::secret::Secret;

/// Why a request was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum Denied {
    /// No token is configured and the client is not on this machine.
    NotLoopback,
    /// No token is configured and the Host header names another site.
    ForeignHost,
    /// The token is missing or wrong.
    Token,
    /// A form post without the page's form token, or from another site.
    CrossSite,
}

impl IntoResponse for Denied {
    fn into_response(self) -> Response {
        let (status, text) = match self {
            Denied::NotLoopback => (
                StatusCode::FORBIDDEN,
                "the admin interface serves clients on this machine only; set admin.token to allow others\n",
            ),
            Denied::ForeignHost => (
                StatusCode::FORBIDDEN,
                "use http://127.0.0.1:<port>/ or http://localhost:<port>/\n",
            ),
            Denied::Token => {
                let text =
                    "admin.token required: Authorization: Bearer <token>, or ?token=<token>\n";
                let challenge = [(header::WWW_AUTHENTICATE, "Bearer")];
                return (StatusCode::UNAUTHORIZED, challenge, text).into_response();
            }
            Denied::CrossSite => (
                StatusCode::FORBIDDEN,
                "form expired or posted from another site: reload the status page and try again\n",
            ),
        };
        (status, text).into_response()
    }
}

pub struct Access {
    token: Option<Secret>,
}

impl Access {
    pub fn new(token: Option<Secret>) -> Self {
        Access { token }
    }

    /// Whether a request from `client` with these headers and `token`
    /// query parameter may be served.
    pub fn check(
        &self,
        client: IpAddr,
        headers: &HeaderMap,
        query_token: Option<&str>,
    ) -> Result<(), Denied> {
        let Some(token) = &self.token else {
            if !client.to_canonical().is_loopback() {
                return Err(Denied::NotLoopback);
            }
            return match headers.get(header::HOST).map(|host| host.to_str()) {
                None => Ok(()),
                Some(Ok(host)) if is_loopback_host(host) => Ok(()),
                Some(_) => Err(Denied::ForeignHost),
            };
        };
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .and_then(bearer_token);
        match bearer.or(query_token) {
            Some(offered) if equal(offered, token.expose()) => Ok(()),
            _ => Err(Denied::Token),
        }
    }

    /// The token to carry in links and forms: the configured one, when the
    /// request carried it in its address (a browser has no other way).
    pub fn url_token(&self, offered: Option<&str>) -> Option<&str> {
        let token = self.token.as_ref()?.expose();
        offered
            .filter(|offered| equal(offered, token))
            .map(|_| token)
    }
}

/// The token of `Bearer <token>`: the scheme in any case (RFC 9110
/// 11.1), any number of spaces after it.
fn bearer_token(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

/// The host part of a Host header (`name:port`, `[v6]:port`) is loopback.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// A per-process secret the status page embeds in its forms: another site
/// cannot read the page, so cannot post a form the relay accepts.
pub struct FormToken(String);

impl FormToken {
    pub fn random() -> Self {
        FormToken(format!("{:032x}", rand::random::<u128>()))
    }

    pub fn value(&self) -> &str {
        &self.0
    }

    /// A form post is genuine: it carries this token, and the browser (when
    /// it says) did not send it from another site.
    pub fn check(&self, offered: &str, headers: &HeaderMap) -> Result<(), Denied> {
        let fetched_from = headers
            .get("sec-fetch-site")
            .and_then(|value| value.to_str().ok());
        let same_site = fetched_from.is_none_or(|site| site == "same-origin" || site == "none");
        if same_site && equal(offered, &self.0) && same_origin(headers) {
            Ok(())
        } else {
            Err(Denied::CrossSite)
        }
    }
}

/// An Origin header, when there is one, names the host the request went to.
fn same_origin(headers: &HeaderMap) -> bool {
    let header_text = |name| headers.get(name).and_then(|value| value.to_str().ok());
    match (header_text(header::ORIGIN), header_text(header::HOST)) {
        (None, _) => true,
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, origin_host)| origin_host.eq_ignore_ascii_case(host)),
        (Some(_), None) => false,
    }
}

/// Constant time for equal lengths; the length of the token is no secret.
fn equal(offered: &str, expected: &str) -> bool {
    offered.as_bytes().ct_eq(expected.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| (name.parse().unwrap(), value.parse().unwrap()))
            .collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn without_a_token_only_loopback_clients_and_hosts_are_served() {
        let access = Access::new(None);
        let local = headers(&[("host", "127.0.0.1:9025")]);
        for client in ["127.0.0.1", "127.3.2.1", "::1", "::ffff:127.0.0.1"] {
            assert_eq!(access.check(ip(client), &local, None), Ok(()), "{client}");
        }
        for client in ["192.0.2.7", "10.0.0.1", "::ffff:192.0.2.7", "2001:db8::1"] {
            assert_eq!(
                access.check(ip(client), &local, None),
                Err(Denied::NotLoopback),
                "{client}"
            );
        }
        for host in ["localhost:9025", "[::1]:9025", "LOCALHOST"] {
            let named = headers(&[("host", host)]);
            assert_eq!(
                access.check(ip("127.0.0.1"), &named, None),
                Ok(()),
                "{host}"
            );
        }
        let rebound = headers(&[("host", "attacker.example:9025")]);
        assert_eq!(
            access.check(ip("127.0.0.1"), &rebound, None),
            Err(Denied::ForeignHost)
        );
    }

    #[test]
    fn with_a_token_any_client_needs_it() {
        let access = Access::new(Some(Secret::new("0123456789abcdef")));
        let none = HeaderMap::new();
        let remote = ip("192.0.2.7");
        assert_eq!(access.check(remote, &none, None), Err(Denied::Token));
        assert_eq!(
            access.check(ip("127.0.0.1"), &none, None),
            Err(Denied::Token)
        );
        assert_eq!(
            access.check(remote, &none, Some("0123456789abcdeX")),
            Err(Denied::Token)
        );
        assert_eq!(
            access.check(remote, &none, Some("0123456789abcdef")),
            Ok(())
        );
        let bearer = headers(&[("authorization", "Bearer 0123456789abcdef")]);
        assert_eq!(access.check(remote, &bearer, None), Ok(()));
    }

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        let cases = [
            ("Bearer abc", Some("abc")),
            ("bearer abc", Some("abc")),
            ("BEARER abc", Some("abc")),
            ("bEaReR   abc", Some("abc")),
            ("Basic abc", None),
            ("Bearerabc", None),
            ("Bearer", None),
            ("Bearers abc", None),
        ];
        for (authorization, token) in cases {
            assert_eq!(bearer_token(authorization), token, "{authorization:?}");
        }
        let access = Access::new(Some(Secret::new("0123456789abcdef")));
        let lower = headers(&[("authorization", "bearer 0123456789abcdef")]);
        assert_eq!(access.check(ip("192.0.2.7"), &lower, None), Ok(()));
    }

    #[test]
    fn form_posts_need_the_token_and_the_same_site() {
        let form = FormToken::random();
        let token = form.value().to_string();
        let host = ("host", "127.0.0.1:9025");
        assert_eq!(form.check(&token, &headers(&[host])), Ok(()));
        let browser = [
            host,
            ("origin", "http://127.0.0.1:9025"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(form.check(&token, &headers(&browser)), Ok(()));
        assert_eq!(
            form.check("guess", &headers(&[host])),
            Err(Denied::CrossSite)
        );
        let other_site = [host, ("sec-fetch-site", "cross-site")];
        assert_eq!(
            form.check(&token, &headers(&other_site)),
            Err(Denied::CrossSite)
        );
        let other_origin = [host, ("origin", "http://attacker.example")];
        assert_eq!(
            form.check(&token, &headers(&other_origin)),
            Err(Denied::CrossSite)
        );
    }
}
