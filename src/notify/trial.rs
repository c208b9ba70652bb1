//! `sendbridge notify test`: a test alert through every configured channel
//! at once, sent directly (not queued), so the answer is the channel's own.

use std::sync::Arc;

use super::channels::{self, email_account, webhook_origin};
use super::compose;
use super::notice::{Alert, Event};
use crate::access_tokens::TokenSource;
use crate::config::Config;
use crate::spool::unix_millis;
use crate::transport::{BodyFlags, Outcome, Transport};

/// How one channel took the test alert.
#[derive(Debug)]
pub struct Tried {
    /// `email to it@example.com`, `webhook https://ntfy.sh`.
    pub channel: String,
    /// What the receiver answered, or why it failed.
    pub result: Result<String, String>,
}

/// Sends the test alert to `notify.admin` (through `notify.account`, or
/// the first account, by name, that signs in) and to `notify.webhook`.
/// Empty when neither is configured.
pub async fn send_test(config: &Config, tokens: &TokenSource) -> Vec<Tried> {
    let notify = &config.notify;
    let alert = Alert {
        event: Event::Test,
        account: None,
        message_id: None,
        recipients: Vec::new(),
        reply: None,
        hint: None,
        count: None,
        at: unix_millis(),
        relay: config.server.hostname.clone(),
    };
    let mut tried = Vec::new();
    if !notify.admin.is_empty() {
        tried.push(Tried {
            channel: format!("email to {}", notify.admin.join(", ")),
            result: email(config, &alert, tokens).await,
        });
    }
    if let Some(url) = &notify.webhook {
        let body = compose::webhook_body(&alert, notify.webhook_format, notify.language);
        let result = channels::post(url.clone(), Arc::new(body), &[]).await;
        tried.push(Tried {
            channel: format!("webhook {}", webhook_origin(url)),
            result: result.map(|status| format!("HTTP {status}")),
        });
    }
    tried
}

/// Tries the accounts in the order notices use them until one signs in
/// and takes the message.
async fn email(config: &Config, alert: &Alert, tokens: &TokenSource) -> Result<String, String> {
    let notify = &config.notify;
    let from = format!(
        "Mail Delivery System <mailer-daemon@{}>",
        config.server.hostname
    );
    let message = compose::alert_email(alert, &from, &notify.admin, notify.language);
    let mut accounts: Vec<channels::SendingAccount> = config
        .accounts
        .keys()
        .map(|name| channels::SendingAccount {
            name: name.clone(),
            on_hold: false,
        })
        .collect();
    let mut failures = Vec::new();
    while let Some(name) = email_account(&accounts, notify.account.as_deref(), None) {
        let account = &config.accounts[&name];
        let result = match Transport::new(&name, account, &config.server.hostname, tokens) {
            Ok(transport) => send(&transport, &notify.admin, &message).await,
            Err(err) => Err(format!("{err:#}")),
        };
        match result {
            Ok(reply) => return Ok(format!("{reply} (via account {name})")),
            Err(why) => failures.push(format!("account {name}: {why}")),
        }
        // Not this one again.
        for candidate in &mut accounts {
            candidate.on_hold |= candidate.name == name;
        }
    }
    if failures.is_empty() {
        return Err("no account configured to send it".into());
    }
    Err(failures.join("; "))
}

async fn send(transport: &Transport, to: &[String], message: &[u8]) -> Result<String, String> {
    let mut connection = transport
        .connect()
        .await
        .map_err(|outcome| outcome.describe())?;
    let sent = transport
        .send(&mut connection, to, BodyFlags::default(), message)
        .await;
    connection.quit().await;
    if let Some((address, refusal)) = sent.refused.first() {
        return Err(format!("{address} refused: {}", refusal.describe()));
    }
    match sent.outcome {
        Some(Outcome::Delivered(reply)) => Ok(reply.to_string()),
        Some(other) => Err(other.describe()),
        None => Err("every recipient refused".into()),
    }
}
