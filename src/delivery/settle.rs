//! What an attempt's verdict does to a message: [`transition`] decides it
//! without I/O (envelope + verdict + now + settings → next state, history
//! note, log line, metric), and [`Delivery::settle`] is the one place that
//! carries a transition out.

use std::time::Duration;

use tracing::{error, info, warn};

use super::Delivery;
use super::scheduler::Unsaved;
use crate::config::DeliveryConfig;
use crate::notify::GivenUp;
use crate::notify::notice::Event;
use crate::observe::list;
use crate::observe::metrics::{self, MessageEvent};
use crate::provider_replies::diagnose;
use crate::reply::Reply;
use crate::spool::{Envelope, State};
use crate::spool_space::is_full;
use crate::transport::{Deferral, Failure, Outcome};

/// How delivering a message ended this time, over all its parts: its
/// outcome, except that over a sending limit the message is postponed,
/// which is not an attempt and never a reason to give it up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Verdict {
    Delivered(Reply),
    Rejected(Failure),
    AuthFailed(Failure),
    Deferred(Deferral),
    Postponed { until: u64, failure: Failure },
}

impl Verdict {
    /// `outcome` as a verdict; over a limit, the message waits until
    /// `resume()`.
    pub(super) fn of(outcome: Outcome, resume: impl FnOnce() -> u64) -> Verdict {
        match outcome {
            Outcome::Delivered(reply) => Verdict::Delivered(reply),
            Outcome::Rejected(failure) => Verdict::Rejected(failure),
            Outcome::AuthFailed(failure) => Verdict::AuthFailed(failure),
            Outcome::Deferred(deferral) => Verdict::Deferred(deferral),
            Outcome::OverLimit(failure) => Verdict::Postponed {
                until: resume(),
                failure,
            },
        }
    }

    /// Whether it counts as a delivery attempt.
    pub(super) fn is_attempt(&self) -> bool {
        !matches!(self, Verdict::Postponed { .. })
    }
}

/// What a waiting client is told.
impl From<Verdict> for Outcome {
    fn from(verdict: Verdict) -> Outcome {
        match verdict {
            Verdict::Delivered(reply) => Outcome::Delivered(reply),
            Verdict::Rejected(failure) => Outcome::Rejected(failure),
            Verdict::AuthFailed(failure) => Outcome::AuthFailed(failure),
            Verdict::Deferred(deferral) => Outcome::Deferred(deferral),
            Verdict::Postponed { failure, .. } => Outcome::OverLimit(failure),
        }
    }
}

/// Where a message goes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Next {
    /// Delivered to every recipient: it leaves the spool.
    Delivered,
    /// Passthrough: the client was refused and keeps the message; our copy
    /// goes.
    Returned,
    /// Tried again at `at` (clock millis).
    Deferred { at: u64 },
    /// Waits for the account's sign-in to work.
    Held,
    /// Waits in `rejected/` for the operator.
    Rejected,
}

impl Next {
    /// The state directory the envelope moves to; `None`: it is removed.
    fn state(self) -> Option<State> {
        match self {
            Next::Delivered | Next::Returned => None,
            Next::Deferred { .. } => Some(State::Deferred),
            Next::Held => Some(State::Held),
            Next::Rejected => Some(State::Rejected),
        }
    }

    fn event(self) -> MessageEvent {
        match self {
            Next::Delivered => MessageEvent::Delivered,
            Next::Returned => MessageEvent::Returned,
            Next::Deferred { .. } => MessageEvent::Deferred,
            Next::Held => MessageEvent::Held,
            Next::Rejected => MessageEvent::Rejected,
        }
    }
}

/// The log line of a transition, with the fields that do not come from the
/// envelope.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Log {
    ReturnedOverLimit,
    Returned {
        outcome: String,
    },
    WaitsForWindow {
        upstream_reply: String,
        resume_in_s: u64,
        hint: String,
    },
    Delivered {
        upstream_reply: String,
    },
    Refused {
        reason: &'static str,
        refused: Vec<String>,
        upstream_reply: String,
        hint: String,
    },
    Held,
    Expired {
        last_reply: String,
        hint: String,
    },
    Deferred {
        retry_in_s: u64,
        reason: &'static str,
        last_reply: String,
        hint: String,
    },
}

/// What settling a verdict does, decided.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Transition {
    pub(super) next: Next,
    /// For the envelope, unless the message leaves the spool.
    pub(super) last_reply: Option<String>,
    /// For the envelope's history, likewise.
    pub(super) note: Option<String>,
    pub(super) log: Log,
    /// The notice a message given up raises, once per message.
    pub(super) raised: Option<Raised>,
}

/// A message refused for good or given up: the admin alert's event, and
/// whether its sender gets a bounce.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Raised {
    pub(super) event: Event,
    pub(super) hint: Option<String>,
    /// Not when a waiting client heard the refusal itself (hybrid mode's
    /// 5xx): it was never told `250`.
    pub(super) bounce: bool,
}

/// How the client that handed the message over takes part in this verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) struct Client {
    /// A waiting passthrough client still holds the message, so anything
    /// but delivery returns it.
    pub(super) keeps_it: bool,
    /// A client still waits for this verdict and hears it.
    pub(super) waits: bool,
}

/// Decides what `verdict` does to the message of `envelope` at `now`.
pub(super) fn transition(
    envelope: &Envelope,
    verdict: &Verdict,
    client: Client,
    now: u64,
    settings: &DeliveryConfig,
) -> Transition {
    let mut step = decide(envelope, verdict, client.keeps_it, now, settings);
    step.raised = raised(envelope, verdict, &step.log, client.waits);
    step
}

/// The notice of a message that reaches `rejected/` and was not noticed
/// about yet.
fn raised(envelope: &Envelope, verdict: &Verdict, log: &Log, client_waits: bool) -> Option<Raised> {
    let (event, hint) = match log {
        Log::Refused { hint, .. } => (Event::MessageRejected, hint),
        Log::Expired { hint, .. } => (Event::MessageExpired, hint),
        _ => return None,
    };
    if envelope.notices.bounced {
        return None;
    }
    let heard = client_waits && matches!(verdict, Verdict::Rejected(_));
    Some(Raised {
        event,
        hint: (!hint.is_empty()).then(|| hint.clone()),
        bounce: !heard,
    })
}

fn decide(
    envelope: &Envelope,
    verdict: &Verdict,
    client_keeps_it: bool,
    now: u64,
    settings: &DeliveryConfig,
) -> Transition {
    let returned = |log| Transition {
        next: Next::Returned,
        last_reply: None,
        note: None,
        log,
        raised: None,
    };
    let stays = |next: Next, last_reply: String, log| {
        let note = match verdict {
            Verdict::Postponed { .. } => format!(
                "deferred: daily sending limit; resumes in {}s",
                until_s(next, now)
            ),
            _ => format!(
                "{}: {}",
                next.state().expect("kept"),
                Outcome::from(verdict.clone()).describe()
            ),
        };
        Transition {
            next,
            last_reply: Some(last_reply),
            note: Some(note),
            log,
            raised: None,
        }
    };
    match verdict {
        Verdict::Postponed { .. } if client_keeps_it => returned(Log::ReturnedOverLimit),
        Verdict::Postponed { until, failure } => {
            let next = Next::Deferred { at: *until };
            let log = Log::WaitsForWindow {
                upstream_reply: failure.reply.to_string(),
                resume_in_s: until_s(next, now),
                hint: failure.hint.clone().unwrap_or_default(),
            };
            stays(next, failure.reply.to_string(), log)
        }
        _ if client_keeps_it && !matches!(verdict, Verdict::Delivered(_)) => {
            returned(Log::Returned {
                outcome: Outcome::from(verdict.clone()).describe(),
            })
        }
        Verdict::Delivered(reply) if envelope.refused.is_empty() => Transition {
            next: Next::Delivered,
            last_reply: None,
            note: None,
            log: Log::Delivered {
                upstream_reply: reply.to_string(),
            },
            raised: None,
        },
        Verdict::Delivered(_) | Verdict::Rejected(_) => {
            let first = &envelope.refused[0].reply;
            let diagnosis = diagnose(&envelope.account, first);
            let log = Log::Refused {
                reason: diagnosis.reason,
                refused: envelope
                    .refused
                    .iter()
                    .map(|refused| refused.address.clone())
                    .collect(),
                upstream_reply: first.to_string(),
                hint: diagnosis.hint.unwrap_or_default(),
            };
            stays(Next::Rejected, first.to_string(), log)
        }
        Verdict::AuthFailed(failure) => stays(Next::Held, failure.reply.to_string(), Log::Held),
        Verdict::Deferred(deferral) => {
            let age = Duration::from_millis(now.saturating_sub(envelope.received_at));
            let hint = deferral.hint.clone().unwrap_or_default();
            let last_reply = deferral.what.clone();
            if age >= settings.max_age {
                let log = Log::Expired {
                    last_reply: last_reply.clone(),
                    hint,
                };
                stays(Next::Rejected, last_reply, log)
            } else {
                // The provider's Retry-After, when it is later than ours.
                let delay = retry_delay(settings, envelope.attempts)
                    .max(deferral.retry_after.unwrap_or_default());
                let log = Log::Deferred {
                    retry_in_s: delay.as_secs(),
                    reason: deferral.reason,
                    last_reply: last_reply.clone(),
                    hint,
                };
                let at = now + delay.as_millis() as u64;
                stays(Next::Deferred { at }, last_reply, log)
            }
        }
    }
}

/// Seconds from `now` until a deferred message is due.
fn until_s(next: Next, now: u64) -> u64 {
    match next {
        Next::Deferred { at } => at.saturating_sub(now) / 1000,
        _ => 0,
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

impl Log {
    /// Writes the line for the message of `envelope`.
    fn emit(&self, envelope: &Envelope) {
        let (id, account) = (&envelope.id, &envelope.account);
        match self {
            Log::ReturnedOverLimit => {
                info!(id = %id, account = %account, reason = "daily_limit", "message returned to the client (passthrough): over the daily sending limit")
            }
            Log::Returned { outcome } => {
                info!(id = %id, account = %account, outcome = %outcome, "message returned to the client (passthrough)")
            }
            Log::WaitsForWindow {
                upstream_reply,
                resume_in_s,
                hint,
            } => {
                warn!(id = %id, account = %account, reason = "daily_limit", upstream_reply = %upstream_reply, resume_in_s, hint = %hint, "message waits for the daily sending limit's window")
            }
            Log::Delivered { upstream_reply } => {
                info!(id = %id, account = %account, attempts = envelope.attempts, recipients = envelope.delivered.len(), upstream_reply = %upstream_reply, "message delivered")
            }
            Log::Refused {
                reason,
                refused,
                upstream_reply,
                hint,
            } => {
                warn!(id = %id, account = %account, reason, delivered = envelope.delivered.len(), refused = list(refused), upstream_reply = %upstream_reply, hint = %hint, "upstream refused the message or some recipients; kept in rejected/ (`queue retry` sends to the refused recipients again)")
            }
            Log::Held => {
                info!(id = %id, account = %account, "message held until the account's sign-in works")
            }
            Log::Expired { last_reply, hint } => {
                warn!(id = %id, account = %account, attempts = envelope.attempts, last_reply = %last_reply, reason = "expired", hint = %hint, "message given up after delivery.max_age; kept in rejected/")
            }
            Log::Deferred {
                retry_in_s,
                reason,
                last_reply,
                hint,
            } => {
                info!(id = %id, account = %account, attempts = envelope.attempts, retry_in_s, reason, last_reply = %last_reply, hint = %hint, "message deferred")
            }
        }
    }
}

impl Delivery {
    /// Carries out what `verdict` does to the message: the log line, the
    /// metric, the notice it raises, and the envelope's move in the spool.
    pub(super) async fn settle(&self, envelope: &mut Envelope, verdict: &Verdict, client: Client) {
        let now = self.clock.now();
        let step = transition(envelope, verdict, client, now, &self.settings);
        step.log.emit(envelope);
        let account = &envelope.account;
        match step.next {
            Next::Delivered => {
                let waited = Duration::from_millis(now.saturating_sub(envelope.received_at));
                metrics::delivered(account, waited);
            }
            next => metrics::message(account, next.event()),
        }
        let Some(to) = step.next.state() else {
            // Here rather than on a blocking thread: one unlink (two
            // more names looked up, usually absent) and no fsync cost less
            // than handing them over (measured: see README's queue section).
            if let Err(err) = self.spool.remove(State::Active, &envelope.id) {
                match step.next {
                    Next::Delivered => {
                        error!(id = %envelope.id, error = %err, "delivered, but cannot remove it from the spool: it may be sent again")
                    }
                    _ => error!(error = %err, "cannot remove a message from the spool"),
                }
            }
            return;
        };
        envelope.retry_requested_at = None;
        envelope.last_reply = step.last_reply;
        if let Next::Deferred { at } = step.next {
            envelope.next_attempt_at = at;
        }
        if let Some(note) = step.note {
            envelope.record(now, note);
        }
        if let Some(raised) = step.raised {
            // Queued before the envelope says so: a crash in between may
            // repeat the notice, never lose it.
            let given_up = envelope.clone();
            self.notice(move |notifier, accounts, now| {
                let Raised {
                    event,
                    hint,
                    bounce,
                } = raised;
                let given_up = GivenUp {
                    envelope: &given_up,
                    event,
                    hint,
                    bounce,
                };
                notifier.message_given_up(given_up, accounts, now);
            })
            .await;
            envelope.notices.bounced = true;
        }
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
    async fn store(&self, envelope: &Envelope, to: State) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spool::RefusedRecipient;

    #[test]
    fn retry_delay_doubles_up_to_the_cap() {
        let settings = DeliveryConfig::default();
        let delays: Vec<u64> = (1..=8)
            .map(|n| retry_delay(&settings, n).as_secs())
            .collect();
        assert_eq!(delays, [60, 120, 240, 480, 960, 1920, 3600, 3600]);
        assert_eq!(retry_delay(&settings, u32::MAX).as_secs(), 3600);
    }

    const NOW: u64 = 1_700_000_000_000;

    fn failure(code: u16, status: [u8; 3]) -> Failure {
        Failure {
            reply: Reply::new(code, status, "no"),
            reason: "test",
            hint: Some("set accounts.a.x".into()),
        }
    }

    fn deferral() -> Deferral {
        Deferral {
            reply: None,
            what: "timed out after 30s".into(),
            reason: "upstream_unavailable",
            hint: None,
            retry_after: None,
        }
    }

    /// An envelope received `age_ms` ago after one attempt, with the given
    /// recipients refused.
    fn envelope(age_ms: u64, refused: &[&str]) -> Envelope {
        Envelope {
            account: "a".into(),
            received_at: NOW - age_ms,
            attempts: 1,
            refused: refused
                .iter()
                .map(|address| RefusedRecipient {
                    address: address.to_string(),
                    reply: Reply::new(550, [5, 1, 1], "no such user"),
                })
                .collect(),
            ..Envelope::default()
        }
    }

    #[test]
    fn verdicts_move_messages_to_their_next_state() {
        let settings = DeliveryConfig::default();
        let day = 24 * 3600 * 1000;
        let max_age = settings.max_age.as_millis() as u64;
        let delivered = Verdict::Delivered(Reply::new(250, [2, 0, 0], "OK"));
        let postponed = Verdict::Postponed {
            until: NOW + 90_000,
            failure: failure(550, [5, 4, 5]),
        };
        // (verdict, envelope, client keeps it, next state)
        let table = [
            (&delivered, envelope(0, &[]), false, Next::Delivered),
            (&delivered, envelope(0, &["x@b"]), false, Next::Rejected),
            (&delivered, envelope(0, &[]), true, Next::Delivered),
            (&delivered, envelope(0, &["x@b"]), true, Next::Rejected),
            (
                &Verdict::Rejected(failure(550, [5, 1, 1])),
                envelope(0, &["x@b"]),
                false,
                Next::Rejected,
            ),
            (
                &Verdict::AuthFailed(failure(535, [5, 7, 8])),
                envelope(0, &[]),
                false,
                Next::Held,
            ),
            (
                &Verdict::AuthFailed(failure(535, [5, 7, 8])),
                envelope(0, &[]),
                true,
                Next::Returned,
            ),
            (
                &Verdict::Deferred(deferral()),
                envelope(day, &[]),
                false,
                Next::Deferred { at: NOW + 60_000 },
            ),
            (
                &Verdict::Deferred(deferral()),
                envelope(max_age, &[]),
                false,
                Next::Rejected,
            ),
            // A Retry-After later than the backoff is honoured; an earlier
            // one does not make the retry come sooner.
            (
                &Verdict::Deferred(Deferral {
                    retry_after: Some(Duration::from_secs(600)),
                    ..deferral()
                }),
                envelope(day, &[]),
                false,
                Next::Deferred { at: NOW + 600_000 },
            ),
            (
                &Verdict::Deferred(Deferral {
                    retry_after: Some(Duration::from_secs(5)),
                    ..deferral()
                }),
                envelope(day, &[]),
                false,
                Next::Deferred { at: NOW + 60_000 },
            ),
            (
                &postponed,
                envelope(max_age, &[]),
                false,
                Next::Deferred { at: NOW + 90_000 },
            ),
            (&postponed, envelope(0, &[]), true, Next::Returned),
        ];
        for (verdict, envelope, keeps, expected) in table {
            let client = Client {
                keeps_it: keeps,
                waits: keeps,
            };
            let step = transition(&envelope, verdict, client, NOW, &settings);
            assert_eq!(step.next, expected, "{verdict:?}, client keeps it: {keeps}");
            let leaves = matches!(expected, Next::Delivered | Next::Returned);
            assert_eq!(step.note.is_none(), leaves, "{verdict:?}");
            assert_eq!(step.last_reply.is_none(), leaves, "{verdict:?}");
        }
    }

    #[test]
    fn transitions_name_their_metric() {
        let table = [
            (Next::Delivered, "Delivered"),
            (Next::Returned, "Returned"),
            (Next::Deferred { at: 0 }, "Deferred"),
            (Next::Held, "Held"),
            (Next::Rejected, "Rejected"),
        ];
        for (next, event) in table {
            assert_eq!(format!("{:?}", next.event()), event);
        }
    }

    #[test]
    fn notes_and_log_lines_carry_the_reply_reason_and_hint() {
        let settings = DeliveryConfig::default();
        let deferred = Verdict::Deferred(Deferral {
            reply: None,
            what: "the server does not offer STARTTLS".into(),
            reason: "upstream_unavailable",
            hint: Some("set accounts.a.tls".into()),
            retry_after: None,
        });
        let step = transition(
            &envelope(0, &[]),
            &deferred,
            Client::default(),
            NOW,
            &settings,
        );
        assert_eq!(
            step.last_reply.as_deref(),
            Some("the server does not offer STARTTLS"),
            "the hint is a field of its own"
        );
        assert_eq!(
            step.note.as_deref(),
            Some("deferred: deferred: the server does not offer STARTTLS")
        );
        assert_eq!(
            step.log,
            Log::Deferred {
                retry_in_s: 60,
                reason: "upstream_unavailable",
                last_reply: "the server does not offer STARTTLS".into(),
                hint: "set accounts.a.tls".into(),
            }
        );

        let postponed = Verdict::Postponed {
            until: NOW + 90_500,
            failure: failure(451, [4, 7, 0]),
        };
        let step = transition(
            &envelope(0, &[]),
            &postponed,
            Client::default(),
            NOW,
            &settings,
        );
        assert_eq!(
            step.note.as_deref(),
            Some("deferred: daily sending limit; resumes in 90s")
        );
        assert_eq!(
            step.log,
            Log::WaitsForWindow {
                upstream_reply: "451 4.7.0 no".into(),
                resume_in_s: 90,
                hint: "set accounts.a.x".into(),
            }
        );

        let refused = Verdict::Delivered(Reply::new(250, [2, 0, 0], "OK"));
        let step = transition(
            &envelope(0, &["x@b"]),
            &refused,
            Client::default(),
            NOW,
            &settings,
        );
        let Log::Refused {
            refused,
            upstream_reply,
            ..
        } = step.log
        else {
            panic!("partly refused: {:?}", step.log);
        };
        assert_eq!(refused, ["x@b"]);
        assert_eq!(upstream_reply, "550 5.1.1 no such user");
    }

    #[test]
    fn a_message_given_up_raises_one_notice_and_a_bounce_unless_the_client_heard_it() {
        let settings = DeliveryConfig::default();
        let max_age = settings.max_age.as_millis() as u64;
        let partly = Verdict::Delivered(Reply::new(250, [2, 0, 0], "OK"));
        let rejected = Verdict::Rejected(failure(550, [5, 1, 1]));
        let expired = Verdict::Deferred(deferral());
        let bounced = |mut envelope: Envelope| {
            envelope.notices.bounced = true;
            envelope
        };
        let waiting = Client {
            keeps_it: false,
            waits: true,
        };
        let gone = Client::default();
        let rejected_event = Some((Event::MessageRejected, true));
        // (verdict, envelope, client, raised: (event, bounce))
        let table = [
            (&partly, envelope(0, &["x@b"]), gone, rejected_event),
            // The client hears 250 for the others: the refused one bounces.
            (&partly, envelope(0, &["x@b"]), waiting, rejected_event),
            (&rejected, envelope(0, &["x@b"]), gone, rejected_event),
            // Hybrid mode: the waiting client got the 5xx itself.
            (
                &rejected,
                envelope(0, &["x@b"]),
                waiting,
                Some((Event::MessageRejected, false)),
            ),
            (
                &expired,
                envelope(max_age, &[]),
                gone,
                Some((Event::MessageExpired, true)),
            ),
            (&expired, envelope(0, &[]), gone, None),
            (&partly, envelope(0, &[]), gone, None),
            // Noticed about before (a retry from rejected/): never again.
            (&rejected, bounced(envelope(0, &["x@b"])), gone, None),
            (&expired, bounced(envelope(max_age, &[])), gone, None),
        ];
        for (verdict, envelope, client, expected) in table {
            let step = transition(&envelope, verdict, client, NOW, &settings);
            let raised = step.raised.map(|raised| (raised.event, raised.bounce));
            assert_eq!(raised, expected, "{verdict:?} {client:?}");
        }
    }

    #[test]
    fn over_a_limit_the_message_is_postponed_not_attempted() {
        let over = Outcome::OverLimit(failure(550, [5, 4, 5]));
        let verdict = Verdict::of(over.clone(), || 42);
        assert!(!verdict.is_attempt());
        assert_eq!(
            verdict,
            Verdict::Postponed {
                until: 42,
                failure: failure(550, [5, 4, 5])
            }
        );
        assert_eq!(Outcome::from(verdict), over, "the client hears the limit");
        let deferred = Verdict::of(Outcome::Deferred(deferral()), || unreachable!());
        assert!(deferred.is_attempt());
    }
}
