//! The client's answer per delivery mode: spool first, then, per mode, wait
//! for the first attempt.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tracing::error;

use super::Delivery;
use super::worker::Job;
use crate::config::DeliveryMode;
use crate::observe::metrics::{self, MessageEvent};
use crate::reply::{Refusal, Reply};
use crate::spool::{Envelope, State};
use crate::spool_space::is_full;
use crate::transport::{Deferral, Outcome};

impl Delivery {
    /// Stores a message; [`Submission::answer`] then answers the client per
    /// the delivery mode.
    pub async fn submit(&self, mut envelope: Envelope, message: Vec<u8>) -> Submission {
        let account_name = envelope.account.clone();
        let Some(account) = self.account(&account_name) else {
            let reply = Reply::new(451, [4, 3, 5], "No such upstream account configured");
            let hint = format!("add [accounts.{account_name}] to the configuration");
            return Submitted::refused(reply, None, Refusal::new("no_account", hint)).into();
        };
        let hold = account.hold();
        if let (Some(hold), DeliveryMode::Passthrough) = (&hold, self.settings.mode) {
            // The client keeps the message; no need to store it first.
            let outcome = Outcome::AuthFailed(hold.failure.clone());
            return Submitted::from_outcome(&account.name, None, &outcome).into();
        }
        let state = if hold.is_some() {
            State::Held
        } else {
            State::Active
        };
        let now = self.clock.now();
        envelope.received_at = now;
        envelope.record(
            now,
            format!(
                "received from {} ({} bytes)",
                envelope.client,
                message.len()
            ),
        );
        let message = Arc::new(message);
        let stored = if state == State::Active {
            let accepted = self.spool.accept_active(&mut envelope, &message).await;
            accepted.map(|()| envelope)
        } else {
            let (spool, message) = (self.spool.clone(), message.clone());
            let storing = tokio::task::spawn_blocking(move || {
                spool
                    .accept(&mut envelope, &message, state)
                    .map(|()| envelope)
            });
            match storing.await {
                Ok(stored) => stored,
                Err(_) => {
                    let reply = Reply::new(451, [4, 3, 0], "Internal error, try again later");
                    let refusal = Refusal::new("internal", "see the error above");
                    return Submitted::refused(reply, None, refusal).into();
                }
            }
        };
        let envelope = match stored {
            Ok(envelope) => {
                self.space.wrote();
                envelope
            }
            Err(err) => {
                let refusal = if is_full(&err) {
                    // Logged once a minute, not per message.
                    self.space.failed();
                    Refusal::new("spool_full", self.space.hint())
                } else {
                    let hint = format!(
                        "check free space and permissions of spool.dir ({})",
                        self.spool.root().display()
                    );
                    error!(error = %err, reason = "spool_failed", hint = %hint, "cannot store a message: nothing was acknowledged");
                    Refusal::new("spool_failed", hint)
                };
                let reply = Reply::new(
                    452,
                    [4, 3, 1],
                    "Insufficient system storage, try again later",
                );
                return Submitted::refused(reply, None, refusal).into();
            }
        };
        let id = envelope.id.clone();
        // No log line of its own: the session's "message received" line
        // names the id and the state.
        metrics::message(&envelope.account, MessageEvent::Accepted);
        if state == State::Held {
            metrics::message(&envelope.account, MessageEvent::Held);
        }
        let queued = Submitted {
            reply: Reply::new(250, [2, 0, 0], format!("OK queued as {id}")),
            id: Some(id),
            state: Some(state),
            refusal: None,
        };
        if hold.is_some() {
            return queued.into();
        }
        let mode = self.settings.mode;
        let (verdict, outcome) = if mode == DeliveryMode::Queue {
            (None, None)
        } else {
            let (sender, receiver) = oneshot::channel();
            (Some(sender), Some(receiver))
        };
        let job = Job {
            envelope,
            message: outcome.is_some().then_some(message),
            verdict,
        };
        if account.jobs.send(job).is_err() {
            // Shutting down: the message is safe in active/ and resumes at start.
            return queued.into();
        }
        Submission {
            stored: queued,
            first_attempt: outcome.map(|outcome| FirstAttempt {
                outcome,
                mode,
                sync_timeout: self.settings.sync_timeout,
                account: account.name.clone(),
            }),
        }
    }
}

/// A message handed over: what storing it answered, and, per the delivery
/// mode, the first attempt whose verdict may be the client's answer.
pub struct Submission {
    stored: Submitted,
    first_attempt: Option<FirstAttempt>,
}

struct FirstAttempt {
    outcome: oneshot::Receiver<Outcome>,
    mode: DeliveryMode,
    sync_timeout: Duration,
    account: String,
}

impl From<Submitted> for Submission {
    fn from(stored: Submitted) -> Self {
        Submission {
            stored,
            first_attempt: None,
        }
    }
}

impl Submission {
    /// The answer as the message was stored (or refused), before any
    /// delivery attempt.
    pub fn stored(&self) -> &Submitted {
        &self.stored
    }

    /// For a submitter no client waits on (the maildrop): in `passthrough`
    /// mode it keeps the message until the first attempt's verdict, so it
    /// gets that verdict; otherwise what storing answered, and a later
    /// refusal bounces to the sender, who heard nothing.
    pub async fn answer_for_no_client(self) -> Submitted {
        match &self.first_attempt {
            Some(first) if first.mode == DeliveryMode::Passthrough => self.answer().await,
            _ => self.stored,
        }
    }

    /// What the client hears: in `hybrid` mode a refusal of the first
    /// attempt within `sync_timeout`, in `passthrough` mode its verdict.
    pub async fn answer(self) -> Submitted {
        let Some(first) = self.first_attempt else {
            return self.stored;
        };
        let queued = self.stored;
        let (account, id) = (&first.account, queued.id.clone());
        let answer = match first.mode {
            DeliveryMode::Hybrid => {
                match tokio::time::timeout(first.sync_timeout, first.outcome).await {
                    Ok(Ok(rejected @ Outcome::Rejected(_))) => {
                        Submitted::from_outcome(account, id, &rejected)
                    }
                    _ => return queued,
                }
            }
            DeliveryMode::Passthrough => match first.outcome.await {
                Ok(Outcome::Delivered(_)) => return queued,
                Ok(other) => Submitted::from_outcome(account, id, &other),
                Err(_) => {
                    let reply = Reply::new(451, [4, 3, 0], "Delivery interrupted, try again later");
                    Submitted::refused(reply, id, Refusal::new("internal", "the relay is stopping"))
                }
            },
            DeliveryMode::Queue => return queued,
        };
        Submitted {
            state: queued.state,
            ..answer
        }
    }
}

/// What the client hears about a message it handed over.
#[derive(Debug)]
pub struct Submitted {
    pub reply: Reply,
    /// The spool id, when the message was stored.
    pub id: Option<String>,
    /// The state it was stored in.
    pub state: Option<State>,
    /// Why the message was refused, when it was.
    pub refusal: Option<Refusal>,
}

impl Submitted {
    fn refused(reply: Reply, id: Option<String>, refusal: Refusal) -> Self {
        Submitted {
            reply,
            id,
            state: None,
            refusal: Some(refusal),
        }
    }

    /// What a client hears when the upstream's verdict is its answer:
    /// verdicts on the message pass through; an upstream sign-in failure
    /// never looks like the client's own login failing.
    fn from_outcome(account: &str, id: Option<String>, outcome: &Outcome) -> Self {
        let refusal = |reason, hint: &Option<String>| {
            Some(Refusal {
                reason,
                hint: hint.clone(),
            })
        };
        let (reply, refusal) = match outcome {
            Outcome::Delivered(reply) => (reply.clone(), None),
            Outcome::Rejected(failure) => (
                failure.reply.clone(),
                refusal(failure.reason, &failure.hint),
            ),
            Outcome::AuthFailed(failure) => {
                // Quoted on one line: the client's reply stays one line.
                let reply = failure.reply.one_line();
                let hint = failure.hint.as_deref().unwrap_or_default();
                let text =
                    format!("Upstream account {account} refused the sign-in ({reply}); {hint}");
                (
                    Reply::new(454, [4, 7, 0], text),
                    refusal(failure.reason, &failure.hint),
                )
            }
            Outcome::OverLimit(failure) => {
                let text = format!(
                    "Upstream account {account} is over its daily sending limit ({}); try again later",
                    failure.reply.one_line()
                );
                (
                    Reply::new(451, [4, 7, 0], text),
                    refusal(failure.reason, &failure.hint),
                )
            }
            // 421 would tell the client that *we* are closing the connection.
            Outcome::Deferred(Deferral {
                reply: Some(reply),
                reason,
                hint,
                ..
            }) => {
                let code = if reply.code == 421 { 451 } else { reply.code };
                (
                    Reply {
                        code,
                        ..reply.clone()
                    },
                    refusal(reason, hint),
                )
            }
            Outcome::Deferred(deferral @ Deferral { reply: None, .. }) => {
                let text = format!("Upstream unavailable: {}", deferral.explained());
                (
                    Reply::new(451, [4, 4, 1], text),
                    refusal(deferral.reason, &deferral.hint),
                )
            }
        };
        Submitted {
            reply,
            id,
            state: None,
            refusal,
        }
    }
}
