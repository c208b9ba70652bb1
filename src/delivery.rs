//! The seam between a finished SMTP transaction and the upstream.
//!
//! This is pass-through delivery: the client's DATA reply waits for the
//! upstream's verdict. The durable spool replaces the body of [`Delivery::submit`]
//! (DESIGN.md, "Delivery model"); the session does not change.

use std::collections::HashMap;
use std::net::SocketAddr;

use crate::config::Config;
use crate::reply::Reply;
use crate::upstream::{BodyFlags, Outcome, Upstream, hint};

/// Everything about a message except its bytes.
#[derive(Debug, Clone)]
pub struct Envelope {
    pub session_id: String,
    pub client: SocketAddr,
    /// Local user that signed in; `None` for trusted-network clients.
    pub user: Option<String>,
    pub account: String,
    /// MAIL FROM as the client sent it (upstream uses the account's sender).
    pub mail_from: String,
    pub recipients: Vec<String>,
    pub flags: BodyFlags,
}

pub struct Delivery {
    upstreams: HashMap<String, Upstream>,
}

impl Delivery {
    pub fn new(config: &Config) -> anyhow::Result<Self> {
        let upstreams = config
            .accounts
            .iter()
            .map(|(name, account)| {
                Upstream::new(name, account, &config.server.hostname).map(|up| (name.clone(), up))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Delivery { upstreams })
    }

    /// Hands one message to its account's upstream and returns the reply
    /// for the client together with the outcome for the log line.
    pub async fn submit(&self, envelope: &Envelope, message: &[u8]) -> (Reply, Outcome) {
        let Some(upstream) = self.upstreams.get(&envelope.account) else {
            // Config validation makes this unreachable; answer safely anyway.
            let reply = Reply::new(451, [4, 3, 5], "No such upstream account configured");
            let outcome = Outcome::Deferred {
                reply: None,
                reason: reply.text.clone(),
            };
            return (reply, outcome);
        };
        let outcome = upstream
            .send(&envelope.recipients, envelope.flags, message)
            .await;
        (client_reply(upstream.name(), &outcome), outcome)
    }
}

/// What the legacy client hears. Upstream verdicts on the message pass
/// through; an upstream sign-in failure never looks like the client's own
/// login failing, and is temporary so the client keeps the message.
fn client_reply(account: &str, outcome: &Outcome) -> Reply {
    match outcome {
        Outcome::Delivered(reply) | Outcome::Rejected(reply) => reply.clone(),
        Outcome::AuthFailed(reply) => {
            let hint = hint(account, reply).unwrap_or_else(|| {
                format!("check accounts.{account}.username and accounts.{account}.password")
            });
            tracing::warn!(account, upstream_reply = %reply, hint = %hint, "upstream refused sign-in");
            Reply::new(
                454,
                [4, 7, 0],
                format!("Upstream account {account} refused the sign-in ({reply}); {hint}"),
            )
        }
        // 421 would tell the client that *we* are closing the connection.
        Outcome::Deferred {
            reply: Some(reply), ..
        } if reply.code == 421 => Reply {
            code: 451,
            ..reply.clone()
        },
        Outcome::Deferred {
            reply: Some(reply), ..
        } => reply.clone(),
        Outcome::Deferred {
            reply: None,
            reason,
        } => Reply::new(451, [4, 4, 1], format!("Upstream unavailable: {reason}")),
    }
}
