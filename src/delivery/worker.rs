//! Worker loops: connection reuse, and sending in parts within the daily
//! sending window.

use super::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::oneshot;
use tracing::warn;

use crate::config::DeliveryMode;
use crate::reply::Reply;
use crate::spool::{Envelope, RefusedRecipient};
use crate::transport::smtp::Connection;
use crate::transport::{BodyFlags, Outcome, Sent};

/// A message for a worker, moved to `active/` by whoever queued it, with the
/// envelope as just written. `message` is the bytes when the session still
/// holds them (saves reading them back); `verdict` is the waiting session.
pub(super) struct Job {
    pub(super) envelope: Envelope,
    pub(super) message: Option<Arc<Vec<u8>>>,
    pub(super) verdict: Option<oneshot::Sender<Outcome>>,
}

impl Delivery {
    pub(super) async fn worker(self: Arc<Self>, account: Arc<Account>) {
        let mut connection: Option<Connection> = None;
        let mut generation = account.generation();
        loop {
            let next_job = async { account.queue.lock().await.recv().await };
            let job = tokio::select! {
                job = next_job => job,
                _ = tokio::time::sleep(self.settings.idle_timeout), if connection.is_some() => {
                    connection.take().expect("checked").quit().await;
                    continue;
                }
                _ = self.shutdown.cancelled() => None,
                _ = account.retired.cancelled() => None,
            };
            let Some(job) = job else { break };
            if account.generation() != generation {
                // Opened with settings a reload replaced.
                if let Some(old) = connection.take() {
                    old.quit().await;
                }
                generation = account.generation();
            }
            self.deliver(&account, job, &mut connection).await;
        }
        if let Some(connection) = connection {
            connection.quit().await;
        }
    }

    pub(super) async fn deliver(
        &self,
        account: &Account,
        job: Job,
        connection: &mut Option<Connection>,
    ) {
        // Only a waiting passthrough client keeps the message itself; every
        // other message was acknowledged and must stay in the spool.
        let client_keeps_it =
            job.verdict.is_some() && self.settings.mode == DeliveryMode::Passthrough;
        let mut envelope = job.envelope;
        if let Some(hold) = account.hold() {
            let operator_retry = envelope
                .retry_requested_at
                .is_some_and(|at| hold.since.is_none_or(|since| at >= since));
            if !operator_retry {
                let verdict = Verdict::Done(Outcome::AuthFailed(hold.reply.clone()));
                self.settle(&mut envelope, &verdict, client_keeps_it).await;
                notify(job.verdict, Outcome::AuthFailed(hold.reply));
                return;
            }
        }
        let message = match job.message {
            Some(message) => message,
            None => {
                let id = envelope.id.clone();
                match self.io(move |spool| spool.read_message(&id)).await {
                    Ok(message) => Arc::new(message),
                    Err(err) => {
                        // Deleted by an operator meanwhile, or unreadable.
                        warn!(id = %envelope.id, error = %err, "queued message vanished before delivery");
                        return;
                    }
                }
            }
        };
        let verdict = self
            .attempt(account, connection, &mut envelope, &message)
            .await;
        if !matches!(verdict, Verdict::Postponed { .. }) {
            envelope.attempts += 1;
        }
        self.settle(&mut envelope, &verdict, client_keeps_it).await;
        let outcome = match verdict {
            Verdict::Done(outcome) => outcome,
            Verdict::Postponed { reply, .. } => Outcome::OverLimit(reply),
        };
        match &outcome {
            Outcome::AuthFailed(reply) => self.start_hold(&envelope.account, account, reply),
            Outcome::Delivered(_) if account.hold().is_some() => {
                self.release_hold(
                    &envelope.account,
                    account,
                    "a retried message was delivered",
                )
                .await;
            }
            _ => {}
        }
        notify(job.verdict, outcome);
    }

    /// Sends the message to its pending recipients in parts of at most the
    /// provider's per-message limit, within the account's sending window.
    /// Each recipient's result is recorded in the envelope, which is stored
    /// when the attempt settles, so a retry never sends to anyone twice (a
    /// crash before that may: delivery is at-least-once).
    pub(super) async fn attempt(
        &self,
        account: &Account,
        connection: &mut Option<Connection>,
        envelope: &mut Envelope,
        message: &[u8],
    ) -> Verdict {
        let pending = envelope.pending();
        let mut last_delivered = None;
        let mut problem = None;
        let mut parts = pending.chunks(account.recipients_per_message.load(Ordering::Acquire));
        for part in parts.by_ref() {
            let admitted = account
                .window
                .lock()
                .expect("window lock")
                .admit(self.clock.now(), part.len() as u32);
            let send = match admitted {
                Ok(send) => send,
                Err(until) => {
                    let reply =
                        Reply::new(451, [4, 7, 0], "over the account's daily sending limit");
                    return Verdict::Postponed { until, reply };
                }
            };
            let sent = self
                .send_part(account, connection, part, envelope.flags, message)
                .await;
            for (address, outcome) in &sent.refused {
                record_recipient(envelope, address, outcome, &mut problem);
            }
            let Some(outcome) = sent.outcome else {
                account.window.lock().expect("window lock").cancel(send);
                continue;
            };
            for address in part {
                if !sent.refused.iter().any(|(refused, _)| refused == address) {
                    record_recipient(envelope, address, &outcome, &mut problem);
                }
            }
            let mut window = account.window.lock().expect("window lock");
            if let Outcome::Delivered(reply) = outcome {
                window.confirm(send);
                last_delivered = Some(reply);
            } else {
                window.cancel(send);
                // The verdict was on the message or the connection: the
                // remaining parts would fare the same.
                if let Outcome::Rejected(reply) = &outcome {
                    for address in parts.flatten() {
                        record_recipient(
                            envelope,
                            address,
                            &Outcome::Rejected(reply.clone()),
                            &mut problem,
                        );
                    }
                }
                break;
            }
        }
        if let Some(Outcome::OverLimit(reply)) = problem {
            let until = account
                .window
                .lock()
                .expect("window lock")
                .pause(self.clock.now());
            return Verdict::Postponed { until, reply };
        }
        let unfinished = !envelope.pending().is_empty();
        match (problem, last_delivered) {
            (Some(problem), _) if unfinished => Verdict::Done(problem),
            // Delivered, to everyone or to all but refused recipients.
            (_, Some(reply)) => Verdict::Done(Outcome::Delivered(reply)),
            // Every recipient refused.
            (Some(problem), None) => Verdict::Done(problem),
            (None, None) => Verdict::Done(Outcome::Delivered(Reply::new(
                250,
                [2, 0, 0],
                "already delivered to every recipient",
            ))),
        }
    }

    /// One upstream transaction over a reused or new connection. A reused
    /// connection the server closed meanwhile is replaced once.
    pub(super) async fn send_part(
        &self,
        account: &Account,
        connection: &mut Option<Connection>,
        recipients: &[String],
        flags: BodyFlags,
        message: &[u8],
    ) -> Sent {
        let upstream = account.upstream();
        for _ in 0..2 {
            let reused = connection.is_some();
            let mut current = match connection.take() {
                Some(current) => current,
                None => match upstream.connect().await {
                    Ok(current) => current,
                    Err(outcome) => {
                        return Sent {
                            refused: Vec::new(),
                            outcome: Some(outcome),
                        };
                    }
                },
            };
            let sent = upstream
                .send(&mut current, recipients, flags, message)
                .await;
            match &sent.outcome {
                Some(Outcome::Deferred { reply: None, .. }) if reused => continue,
                // The connection is still in step after a verdict on the message.
                None
                | Some(Outcome::Delivered(_) | Outcome::Rejected(_) | Outcome::OverLimit(_)) => {
                    *connection = Some(current)
                }
                _ => {}
            }
            return sent;
        }
        unreachable!("the second attempt uses a new connection and returns")
    }
}

/// Hands a message in `active/` to one of its account's workers.
pub(super) fn queue_job(account: &Account, envelope: Envelope) {
    let _ = account.jobs.send(Job {
        envelope,
        message: None,
        verdict: None,
    });
}

/// How delivering a message ended this time, over all its parts.
pub(super) enum Verdict {
    Done(Outcome),
    /// Over a sending limit: the rest waits until `until`. Not an attempt,
    /// and never a reason to give the message up.
    Postponed {
        until: u64,
        reply: Reply,
    },
}

/// Notes one recipient's result in the envelope, and keeps in `problem`
/// the most pressing reason the message is not done.
fn record_recipient(
    envelope: &mut Envelope,
    address: &str,
    outcome: &Outcome,
    problem: &mut Option<Outcome>,
) {
    match outcome {
        Outcome::Delivered(_) => envelope.delivered.push(address.to_string()),
        Outcome::Rejected(reply) => envelope.refused.push(RefusedRecipient {
            address: address.to_string(),
            reply: reply.clone(),
        }),
        _ => {}
    }
    let urgency = |outcome: &Outcome| match outcome {
        Outcome::Delivered(_) => 0,
        Outcome::Rejected(_) => 1,
        Outcome::Deferred { .. } => 2,
        Outcome::OverLimit(_) => 3,
        Outcome::AuthFailed(_) => 4,
    };
    if urgency(outcome) > problem.as_ref().map_or(0, urgency) {
        *problem = Some(outcome.clone());
    }
}

pub(super) fn notify(verdict: Option<oneshot::Sender<Outcome>>, outcome: Outcome) {
    if let Some(verdict) = verdict {
        let _ = verdict.send(outcome);
    }
}
