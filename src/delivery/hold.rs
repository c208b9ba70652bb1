//! Holds: a refused sign-in holds the account; one probe at a time checks
//! whether it works again; a release makes held mail due.

use super::*;
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::reply::Reply;
use crate::spool::operations;
use crate::transport::Outcome;

/// Why an account is on hold, and what to do about it.
#[derive(Clone)]
pub struct Hold {
    /// When it began (clock millis); `None` for a hold carried over from
    /// the previous run, which is probed at once and counts as older than
    /// any retry request.
    pub(super) since: Option<u64>,
    pub reply: Reply,
    pub hint: String,
}

impl Delivery {
    pub(super) fn start_hold(&self, name: &str, account: &Account, reply: &Reply) {
        let hint = account.upstream().sign_in_hint(reply);
        let mut hold = account.hold.lock().expect("hold lock");
        let new = hold.as_ref().is_none_or(|hold| hold.since.is_none());
        *hold = Some(Hold {
            since: Some(self.clock.now()),
            reply: reply.clone(),
            hint: hint.clone(),
        });
        drop(hold);
        if new {
            error!(
                account = %name,
                reason = "upstream_auth",
                upstream_reply = %reply,
                hint = %hint,
                "account on hold: the upstream refused sign-in; its mail waits in held/ and goes out by itself once sign-in works (probe, restart, or `sendbridge queue retry --account {name}`)"
            );
            account.hold_started.notify_one();
        }
    }

    /// Ends a hold and makes the account's held mail due now.
    pub(super) async fn release_hold(&self, name: &str, account: &Account, why: &str) {
        if account.hold.lock().expect("hold lock").take().is_none() {
            return;
        }
        let now = self.clock.now();
        let name_owned = name.to_string();
        let released = self
            .io(move |spool| operations::release_held(spool, &name_owned, now))
            .await;
        match released {
            Ok(ids) => {
                for id in &ids {
                    info!(id = %id, account = %name, "message released from hold");
                }
                warn!(account = %name, released = ids.len(), why, "account hold released: held mail is being sent")
            }
            Err(err) => {
                error!(account = %name, error = %err, "hold released, but held mail could not be requeued")
            }
        }
        self.wake_scheduler.notify_one();
    }

    /// While the account is on hold, tries one sign-in at backoff intervals.
    pub(super) async fn prober(self: Arc<Self>, name: String, account: Arc<Account>) {
        loop {
            let Some(hold) = account.hold() else {
                tokio::select! {
                    _ = account.hold_started.notified() => continue,
                    _ = self.shutdown.cancelled() => return,
                    _ = account.retired.cancelled() => return,
                }
            };
            // A hold carried over from the last run is probed at once.
            let mut delay = if hold.since.is_none() {
                Duration::ZERO
            } else {
                self.settings.retry_initial
            };
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = self.shutdown.cancelled() => return,
                }
                if account.hold().is_none() {
                    break;
                }
                match account.upstream().probe().await {
                    Ok(()) => {
                        self.release_hold(&name, &account, "sign-in works again")
                            .await;
                        break;
                    }
                    Err(outcome) => {
                        if let Outcome::AuthFailed(reply) = &outcome {
                            self.start_hold(&name, &account, reply);
                        }
                        delay =
                            (delay * 2).clamp(self.settings.retry_initial, self.settings.retry_max);
                        warn!(account = %name, outcome = %describe(&outcome), next_probe_in_s = delay.as_secs(), "account still on hold");
                    }
                }
            }
        }
    }
}
