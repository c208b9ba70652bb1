//! Where a notice goes out: which account carries a notice email, and the
//! webhook POST (bounded, retried, off the async workers).

use std::sync::Arc;
use std::time::Duration;

use super::compose::WebhookBody;

/// Each webhook request, connecting included, ends within this.
const WEBHOOK_TIMEOUT: Duration = Duration::from_secs(10);
/// Waits before the second and third try.
pub const WEBHOOK_BACKOFF: [Duration; 2] = [Duration::from_secs(1), Duration::from_secs(5)];

/// An upstream account as notices see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendingAccount {
    pub name: String,
    /// Its sign-in was refused: it carries no notice.
    pub on_hold: bool,
}

/// The account a notice email goes through: `notify.account` (`configured`),
/// else the message's own account (`own`), else any other (by name), the
/// first of them that is not on hold. `None`: no account can send.
pub fn email_account(
    accounts: &[SendingAccount],
    configured: Option<&str>,
    own: Option<&str>,
) -> Option<String> {
    let usable = |name: &str| accounts.iter().any(|a| a.name == name && !a.on_hold);
    let mut others: Vec<&str> = accounts.iter().map(|a| a.name.as_str()).collect();
    others.sort();
    configured
        .into_iter()
        .chain(own)
        .chain(others)
        .find(|name| usable(name))
        .map(str::to_string)
}

/// The webhook's address without path or query, which may hold a token
/// (Slack's and Teams' URLs do): for logs and the status page.
pub fn webhook_origin(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // user:password@host
    let host = host.rsplit('@').next().unwrap_or_default();
    format!("{scheme}://{host}")
}

fn agent() -> ureq::Agent {
    let tls = ureq::tls::TlsConfig::builder()
        // Explicit: the process's aws-lc-rs provider, never a second one.
        .unversioned_rustls_crypto_provider(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .build();
    ureq::Agent::config_builder()
        .timeout_global(Some(WEBHOOK_TIMEOUT))
        .http_status_as_error(false)
        .max_redirects(0)
        .tls_config(tls)
        .build()
        .into()
}

/// One POST of `body` to `url`; blocking. `Ok` with the status of a 2xx
/// answer, else what went wrong.
fn post_once(agent: &ureq::Agent, url: &str, body: &WebhookBody) -> Result<u16, String> {
    let mut request = agent.post(url).header("Content-Type", body.content_type);
    for (name, value) in &body.headers {
        request = request.header(name, value);
    }
    match request.send(&body.body[..]) {
        Ok(response) if response.status().is_success() => Ok(response.status().as_u16()),
        Ok(response) => Err(format!("answered HTTP {}", response.status().as_u16())),
        // ureq's errors name the host, never the path or query.
        Err(err) => Err(err.to_string()),
    }
}

/// POSTs `body` to `url`, tried again after each of `backoff` while it
/// fails; each try runs on the blocking pool. The last error when every
/// try failed.
pub async fn post(
    url: String,
    body: Arc<WebhookBody>,
    backoff: &[Duration],
) -> Result<u16, String> {
    let agent = agent();
    let mut delays = backoff.iter();
    loop {
        let (agent, url, body) = (agent.clone(), url.clone(), body.clone());
        let result = tokio::task::spawn_blocking(move || post_once(&agent, &url, &body))
            .await
            .unwrap_or_else(|err| Err(err.to_string()));
        match (result, delays.next()) {
            (Err(_), Some(delay)) => tokio::time::sleep(*delay).await,
            (result, _) => return result,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notice_email_goes_through_the_first_account_not_on_hold() {
        let accounts = |held: &[&str]| -> Vec<SendingAccount> {
            ["backup", "gmail", "office"]
                .iter()
                .map(|name| SendingAccount {
                    name: name.to_string(),
                    on_hold: held.contains(name),
                })
                .collect()
        };
        // (on hold, notify.account, the message's account, chosen)
        type Case<'a> = (
            &'a [&'a str],
            Option<&'a str>,
            Option<&'a str>,
            Option<&'a str>,
        );
        let table: [Case; 7] = [
            (&[], Some("office"), Some("gmail"), Some("office")),
            (&[], None, Some("gmail"), Some("gmail")),
            (&["gmail"], None, Some("gmail"), Some("backup")),
            (&["office"], Some("office"), Some("gmail"), Some("gmail")),
            (&["backup", "gmail"], None, Some("gmail"), Some("office")),
            (&[], None, None, Some("backup")),
            (
                &["backup", "gmail", "office"],
                Some("office"),
                Some("gmail"),
                None,
            ),
        ];
        for (held, configured, own, expected) in table {
            assert_eq!(
                email_account(&accounts(held), configured, own).as_deref(),
                expected,
                "held {held:?}, notify.account {configured:?}, own {own:?}"
            );
        }
    }

    #[test]
    fn the_webhook_origin_leaves_out_paths_tokens_and_passwords() {
        let table = [
            (
                "https://hooks.slack.com/services/T0/B0/SECRET",
                "https://hooks.slack.com",
            ),
            ("https://ntfy.sh/invoices?auth=SECRET", "https://ntfy.sh"),
            (
                "http://user:SECRET@127.0.0.1:8080/x",
                "http://127.0.0.1:8080",
            ),
        ];
        for (url, origin) in table {
            assert_eq!(webhook_origin(url), origin);
        }
    }
}
