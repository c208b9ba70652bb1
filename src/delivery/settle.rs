//! What an attempt's verdict does to the message.

use super::worker::Verdict;
use super::*;
use std::time::Duration;

use tracing::{error, info, warn};

use crate::config::DeliveryConfig;
use crate::observe::metrics::{self, Event};
use crate::provider_replies::diagnose;
use crate::spool::{Envelope, State};
use crate::spool_space::is_full;
use crate::transport::Outcome;

impl Delivery {
    /// Records an attempt's verdict in the spool. With `discard`, the client
    /// still holds the message (passthrough) and a failure deletes our copy.
    pub(super) async fn settle(&self, envelope: &mut Envelope, verdict: &Verdict, discard: bool) {
        let now = self.clock.now();
        let id = envelope.id.clone();
        let account = envelope.account.clone();
        envelope.retry_requested_at = None;
        let outcome = match verdict {
            Verdict::Done(outcome) => outcome,
            Verdict::Postponed { until, reply } => {
                if discard {
                    info!(id = %id, account = %account, reason = "daily_limit", "message returned to the client (passthrough): over the daily sending limit");
                    metrics::message(&account, Event::Returned);
                    self.discard(State::Active, &id).await;
                    return;
                }
                envelope.next_attempt_at = *until;
                envelope.last_reply = Some(reply.to_string());
                let wait_s = until.saturating_sub(now) / 1000;
                let hint = diagnose(&account, reply).hint.unwrap_or_else(|| {
                    format!("the limit is accounts.{account}.daily_message_limit / daily_recipient_limit")
                });
                warn!(id = %id, account = %account, reason = "daily_limit", upstream_reply = %reply, resume_in_s = wait_s, hint = %hint, "message waits for the daily sending limit's window");
                metrics::message(&account, Event::Deferred);
                envelope.record(
                    now,
                    format!("deferred: daily sending limit; resumes in {wait_s}s"),
                );
                self.store(envelope, State::Deferred).await;
                return;
            }
        };
        let delivered = matches!(outcome, Outcome::Delivered(_));
        if discard && !delivered {
            info!(id = %id, account = %account, outcome = %describe(outcome), "message returned to the client (passthrough)");
            metrics::message(&account, Event::Returned);
            self.discard(State::Active, &id).await;
            return;
        }
        let to = match outcome {
            Outcome::Delivered(reply) if envelope.refused.is_empty() => {
                info!(id = %id, account = %account, attempts = envelope.attempts, recipients = envelope.delivered.len(), upstream_reply = %reply, "message delivered");
                metrics::delivered(
                    &account,
                    Duration::from_millis(now.saturating_sub(envelope.received_at)),
                );
                if let Err(err) = self.io(move |spool| spool.remove(State::Active, &id)).await {
                    error!(id = %envelope.id, error = %err, "delivered, but cannot remove it from the spool: it may be sent again");
                }
                return;
            }
            Outcome::Delivered(_) | Outcome::Rejected(_) => {
                let first = envelope.refused[0].reply.clone();
                let diagnosis = diagnose(&account, &first);
                let refused: Vec<&str> = envelope
                    .refused
                    .iter()
                    .map(|refused| refused.address.as_str())
                    .collect();
                warn!(id = %id, account = %account, reason = diagnosis.reason, delivered = envelope.delivered.len(), refused = ?refused, upstream_reply = %first, hint = diagnosis.hint.as_deref().unwrap_or(""), "upstream refused the message or some recipients; kept in rejected/ (`queue retry` sends to the refused recipients again)");
                metrics::message(&account, Event::Rejected);
                envelope.last_reply = Some(first.to_string());
                State::Rejected
            }
            Outcome::AuthFailed(reply) => {
                info!(id = %id, account = %account, "message held until the account's sign-in works");
                metrics::message(&account, Event::Held);
                envelope.last_reply = Some(reply.to_string());
                State::Held
            }
            Outcome::OverLimit(_) => unreachable!("over-limit outcomes are postponed"),
            Outcome::Deferred { reason, reply } => {
                envelope.last_reply = Some(reason.clone());
                let diagnosis = reply.as_ref().map(|reply| diagnose(&account, reply));
                let code = diagnosis
                    .as_ref()
                    .map_or("upstream_unavailable", |d| d.reason);
                let hint = diagnosis.and_then(|d| d.hint).unwrap_or_default();
                let age = Duration::from_millis(now.saturating_sub(envelope.received_at));
                if age >= self.settings.max_age {
                    warn!(id = %id, account = %account, attempts = envelope.attempts, last_reply = %reason, reason = "expired", hint = %hint, "message given up after delivery.max_age; kept in rejected/");
                    metrics::message(&account, Event::Rejected);
                    State::Rejected
                } else {
                    let delay = retry_delay(&self.settings, envelope.attempts);
                    envelope.next_attempt_at = now + delay.as_millis() as u64;
                    info!(id = %id, account = %account, attempts = envelope.attempts, retry_in_s = delay.as_secs(), reason = code, last_reply = %reason, hint = %hint, "message deferred");
                    metrics::message(&account, Event::Deferred);
                    State::Deferred
                }
            }
        };
        envelope.record(now, format!("{to}: {}", describe(outcome)));
        self.store(envelope, to).await;
    }

    /// Moves an envelope out of `active/` with its new contents.
    ///
    /// When they cannot be written (a full disk), the message stays in
    /// `active/`, which only this process touches (`queue retry` skips it; a
    /// restart returns it to `deferred/`), and the new envelope waits in
    /// `unsaved`: the scheduler writes it once there is space, or hands it to
    /// a worker as it is when it is due again. So a full disk delays no
    /// retry, and the recipients this attempt delivered to never get the
    /// message again while the relay runs; a restart before the write may
    /// repeat them, as a crash before any update may (at-least-once).
    pub(super) async fn store(&self, envelope: &Envelope, to: State) {
        let updated = envelope.clone();
        let stored = self
            .io(move |spool| spool.update(&updated, State::Active, to))
            .await;
        let kept = match stored {
            Ok(()) => {
                self.space.wrote();
                false
            }
            // Deleted by an operator while it was being delivered.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                warn!(id = %envelope.id, error = %err, "message deleted from the spool during its delivery attempt");
                false
            }
            Err(err) => {
                if is_full(&err) {
                    self.space.failed();
                } else {
                    error!(id = %envelope.id, error = %err, "cannot record a delivery attempt in the spool; kept in memory and written again at the next scan");
                }
                let unsaved = Unsaved {
                    envelope: envelope.clone(),
                    to,
                };
                self.unsaved
                    .lock()
                    .expect("unsaved lock")
                    .insert(envelope.id.clone(), unsaved);
                true
            }
        };
        // The scheduler plans with every retry's time.
        if to == State::Deferred || kept {
            self.wake_scheduler.notify_one();
        }
    }
}

/// `retry_initial`, doubling per attempt, at most `retry_max`.
pub(super) fn retry_delay(settings: &DeliveryConfig, attempts: u32) -> Duration {
    let doublings = attempts.saturating_sub(1).min(30);
    settings
        .retry_initial
        .saturating_mul(1 << doublings)
        .min(settings.retry_max)
}

pub(super) fn describe(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Delivered(reply) => format!("delivered: {reply}"),
        Outcome::Rejected(reply) => format!("rejected: {reply}"),
        Outcome::AuthFailed(reply) => format!("sign-in refused: {reply}"),
        Outcome::OverLimit(reply) => format!("over the sending limit: {reply}"),
        Outcome::Deferred { reason, .. } => format!("deferred: {reason}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn retry_delay_doubles_up_to_the_cap() {
        let settings = DeliveryConfig::default();
        let delays: Vec<u64> = (1..=8)
            .map(|n| retry_delay(&settings, n).as_secs())
            .collect();
        assert_eq!(delays, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(retry_delay(&settings, u32::MAX).as_secs(), 3600);
    }
}
