//! The facts the admin interface reports: readiness, and the status the
//! page, `/status.json` and `sendbridge status` show. Reading them is
//! blocking file I/O on the spool.

use std::cmp::Reverse;
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::delivery::Delivery;
use crate::notify::Recent;
use crate::routes::RouteView;
use crate::spool::{Envelope, State};

const OK: &str = "ok";
/// How many rejected messages the status shows, newest first.
const LAST_REJECTIONS: usize = 10;

/// `/readyz`: ready when every check says "ok".
#[derive(Debug, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: Checks,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Checks {
    /// The SMTP listeners accept connections (the admin interface serves
    /// alongside them): "ok", or "shutting down".
    pub listeners: String,
    /// A message could be stored now: "ok", or the error.
    pub spool: String,
    /// Per account: "ok", or that it is on hold, with the reply and hint.
    pub accounts: BTreeMap<String, String>,
}

impl Readiness {
    pub fn check(delivery: &Delivery, shutting_down: bool) -> Readiness {
        let listeners = if shutting_down { "shutting down" } else { OK };
        let spool = match delivery.spool().check_writable() {
            Ok(()) => OK.to_string(),
            Err(err) => format!(
                "cannot write to {}: {err}",
                delivery.spool().root().join("incoming").display()
            ),
        };
        let accounts = delivery
            .account_holds()
            .into_iter()
            .map(|(name, hold)| {
                let state = match hold.map(HoldStatus::from) {
                    Some(hold) => format!("on hold: {} — hint: {}", hold.reply, hold.hint),
                    None => OK.to_string(),
                };
                (name, state)
            })
            .collect();
        let checks = Checks {
            listeners: listeners.to_string(),
            spool,
            accounts,
        };
        Readiness {
            ready: checks.problems().is_empty(),
            checks,
        }
    }
}

impl Checks {
    /// The checks that are not "ok", as `name: why`.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (name, state) in [("listeners", &self.listeners), ("spool", &self.spool)] {
            if state != OK {
                problems.push(format!("{name}: {state}"));
            }
        }
        for (name, state) in &self.accounts {
            if state != OK {
                problems.push(format!("account {name}: {state}"));
            }
        }
        problems
    }
}

/// What the status page, `/status.json` and `sendbridge status` show.
#[derive(Debug, Serialize, Deserialize)]
pub struct Status {
    pub accounts: Vec<AccountStatus>,
    /// Messages per queue state (active, deferred, held, rejected).
    pub queue: BTreeMap<String, usize>,
    /// The newest rejected messages first.
    pub rejections: Vec<Rejection>,
    /// The last notices (bounces, delay warnings, alerts), newest first.
    #[serde(default)]
    pub notices: Vec<Recent>,
    /// `[[routes]]` as the running relay applies them, in order.
    #[serde(default)]
    pub routes: Vec<RouteView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct AccountStatus {
    pub name: String,
    /// `accounts.<name>.transport`: smtp, graph, gmail-api.
    #[serde(default)]
    pub transport: String,
    /// Set while the account is on hold.
    pub hold: Option<HoldStatus>,
    /// Messages of this account in `held/` and in `rejected/`.
    pub held: usize,
    pub rejected: usize,
}

impl AccountStatus {
    pub fn state(&self) -> &'static str {
        if self.hold.is_some() { "on hold" } else { OK }
    }
}

/// Why an account is on hold and what to change, as the status reports it.
#[derive(Debug, Serialize, Deserialize)]
pub struct HoldStatus {
    /// The provider's reply to our sign-in, on one line.
    pub reply: String,
    pub hint: String,
}

impl From<crate::delivery::Hold> for HoldStatus {
    fn from(hold: crate::delivery::Hold) -> Self {
        HoldStatus {
            reply: hold.failure.reply.one_line(),
            hint: hold.failure.hint.unwrap_or_default(),
        }
    }
}

/// A message in `rejected/`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Rejection {
    pub id: String,
    pub account: String,
    /// When it was rejected (its last recorded event), unix milliseconds.
    pub at: u64,
    /// The refused recipients, or all of them when the whole message was.
    pub recipients: Vec<String>,
    pub last_reply: Option<String>,
}

impl From<Envelope> for Rejection {
    fn from(envelope: Envelope) -> Self {
        let at = envelope
            .history
            .last()
            .map_or(envelope.received_at, |event| event.at);
        let recipients = if envelope.refused.is_empty() {
            envelope.recipients
        } else {
            envelope
                .refused
                .into_iter()
                .map(|refused| refused.address)
                .collect()
        };
        Rejection {
            id: envelope.id,
            account: envelope.account,
            at,
            recipients,
            last_reply: envelope.last_reply,
        }
    }
}

impl Status {
    pub fn collect(delivery: &Delivery, routes: Vec<RouteView>) -> std::io::Result<Status> {
        let spool = delivery.spool();
        let mut queue = BTreeMap::new();
        for state in State::ALL {
            queue.insert(state.to_string(), spool.ids(state)?.len());
        }
        let held = spool.list(State::Held)?;
        let rejected = spool.list(State::Rejected)?;
        let count = |envelopes: &[Envelope], account: &str| {
            envelopes
                .iter()
                .filter(|envelope| envelope.account == account)
                .count()
        };
        let transports = delivery.account_transports();
        let accounts = delivery
            .account_holds()
            .into_iter()
            .map(|(name, hold)| AccountStatus {
                transport: transports
                    .get(&name)
                    .copied()
                    .unwrap_or_default()
                    .to_string(),
                hold: hold.map(HoldStatus::from),
                held: count(&held, &name),
                rejected: count(&rejected, &name),
                name,
            })
            .collect();
        let mut rejections: Vec<Rejection> = rejected.into_iter().map(Rejection::from).collect();
        rejections.sort_by_key(|rejection| Reverse(rejection.at));
        rejections.truncate(LAST_REJECTIONS);
        Ok(Status {
            accounts,
            queue,
            rejections,
            notices: delivery.recent_notices(),
            routes,
        })
    }
}
