//! Holds: a refused sign-in holds the whole account (no bounce, no retry
//! storm); one probe at a time checks whether signing in works again; a
//! release makes the held mail due.

use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::Delivery;
use super::account::Account;
use crate::spool::{State, operations};
use crate::transport::{Failure, Outcome};

/// Why an account is on hold: the refused sign-in, with its hint.
#[derive(Clone)]
pub struct Hold {
    /// When it began (clock millis); `None` for a hold carried over from
    /// the previous run, which is probed at once and counts as older than
    /// any retry request.
    pub(super) since: Option<u64>,
    pub failure: Failure,
}

impl Hold {
    /// Whether a message goes out despite the hold: an operator asked for
    /// its retry (`retry_requested_at`) after the hold began.
    pub(super) fn lets_through(&self, retry_requested_at: Option<u64>) -> bool {
        retry_requested_at.is_some_and(|at| self.since.is_none_or(|since| at >= since))
    }
}

impl Delivery {
    /// Puts `account` on hold (again) for `failure`, and lets the notice
    /// engine decide whether that is said: once per hold, then daily.
    pub(super) async fn start_hold(&self, account: &Account, failure: &Failure) {
        let new = {
            let mut hold = account.hold.lock().expect("hold lock");
            let new = hold.as_ref().is_none_or(|hold| hold.since.is_none());
            *hold = Some(Hold {
                since: Some(self.clock.now()),
                failure: failure.clone(),
            });
            new
        };
        if new {
            let name = &account.name;
            error!(
                account = %name,
                reason = failure.reason,
                upstream_reply = %failure.reply,
                hint = failure.hint.as_deref().unwrap_or_default(),
                "account on hold: the upstream refused sign-in; its mail waits in held/ and goes out by itself once sign-in works (probe, restart, or `sendbridge queue retry --account {name}`)"
            );
            account.hold_started.notify_one();
        }
        let (name, failure, spool) = (account.name.clone(), failure.clone(), self.spool.clone());
        self.notice(move |notifier, accounts, now| {
            let waiting = spool.list(State::Held).map_or(0, |held| {
                held.iter()
                    .filter(|envelope| envelope.account == name)
                    .count()
            });
            notifier.account_held(&name, &failure, waiting, accounts, now);
        })
        .await;
    }

    /// Ends a hold and makes the account's held mail due now.
    pub(super) async fn release_hold(&self, account: &Account, why: &str) {
        if account.hold.lock().expect("hold lock").take().is_none() {
            return;
        }
        let now = self.clock.now();
        let name = account.name.clone();
        let released = self
            .io(move |spool| operations::release_held(spool, &name, now))
            .await;
        let name = &account.name;
        match released {
            Ok(ids) => {
                for id in &ids {
                    info!(id = %id, account = %name, "message released from hold");
                }
                warn!(account = %name, released = ids.len(), why, "account hold released: held mail is being sent");
                let (name, released) = (name.clone(), ids.len());
                self.notice(move |notifier, accounts, now| {
                    notifier.account_released(&name, released, accounts, now);
                })
                .await;
            }
            Err(err) => {
                error!(account = %name, error = %err, "hold released, but held mail could not be requeued")
            }
        }
        self.wake_scheduler.notify_one();
    }

    /// While the account is on hold, tries one sign-in at backoff intervals.
    pub(super) async fn prober(self: Arc<Self>, account: Arc<Account>) {
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
                match account.settings().transport.probe(&mut None).await {
                    Ok(()) => {
                        self.release_hold(&account, "sign-in works again").await;
                        break;
                    }
                    Err(outcome) => {
                        if let Outcome::AuthFailed(failure) = &outcome {
                            self.start_hold(&account, failure).await;
                        }
                        delay =
                            (delay * 2).clamp(self.settings.retry_initial, self.settings.retry_max);
                        warn!(account = %account.name, outcome = %outcome.describe(), next_probe_in_s = delay.as_secs(), "account still on hold");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reply::Reply;

    #[test]
    fn only_a_retry_requested_since_the_hold_began_goes_through() {
        // (hold began, retry requested, goes through)
        let table = [
            (Some(1_000), None, false),
            (Some(1_000), Some(999), false),
            (Some(1_000), Some(1_000), true),
            (Some(1_000), Some(2_000), true),
            // Carried over from the previous run: older than any request.
            (None, Some(0), true),
            (None, None, false),
        ];
        for (since, requested, expected) in table {
            let hold = Hold {
                since,
                failure: Failure {
                    reply: Reply::new(535, [5, 7, 8], "no"),
                    reason: "upstream_auth",
                    hint: None,
                },
            };
            assert_eq!(
                hold.lets_through(requested),
                expected,
                "{since:?} {requested:?}"
            );
        }
    }
}
