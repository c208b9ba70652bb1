//! Queue operations that several consumers need, written once: the CLI's
//! `queue retry`/`delete`, the status page's buttons, `oauth login` (which
//! makes held mail due) and the delivery engine releasing a hold.

use anyhow::Context;

use super::{Envelope, Spool, State, unix_millis};
use crate::spool_space::is_full;

/// Which queued messages `retry` makes due now.
pub enum RetryTarget {
    One(String),
    All,
    Account(String),
    /// One account's messages in one state: the status page's buttons.
    AccountIn(String, State),
}

impl RetryTarget {
    fn covers(&self, state: State, envelope: &Envelope) -> bool {
        match self {
            RetryTarget::One(id) => *id == envelope.id,
            RetryTarget::All => true,
            RetryTarget::Account(name) => *name == envelope.account,
            RetryTarget::AccountIn(name, wanted) => *name == envelope.account && *wanted == state,
        }
    }
}

/// What `retry` did.
#[derive(Debug, Default)]
pub struct Retried {
    /// Messages made due now.
    pub due: usize,
    /// Why others were left alone, one line each.
    pub skipped: Vec<String>,
}

/// `sendbridge queue retry`: due now; held and rejected messages go back to
/// the queue, and an account's hold is lifted for them. The running relay
/// picks the change up at its next scan.
pub fn retry(spool: &Spool, target: RetryTarget) -> anyhow::Result<Retried> {
    let now = unix_millis();
    let mut retried = Retried::default();
    let chosen: Vec<(State, String)> = match &target {
        RetryTarget::One(id) => vec![(locate(spool, id)?, id.clone())],
        _ => {
            let mut chosen = Vec::new();
            for state in [State::Deferred, State::Held, State::Rejected] {
                for envelope in spool.list(state)? {
                    if target.covers(state, &envelope) {
                        chosen.push((state, envelope.id));
                    }
                }
            }
            chosen
        }
    };
    for (state, id) in chosen {
        if state == State::Active {
            retried
                .skipped
                .push(format!("{id}: being delivered right now"));
            continue;
        }
        let mut envelope = spool.read_envelope(state, &id)?;
        envelope.retry_requested_at = Some(now);
        // Refused recipients get another chance; delivered ones never do.
        envelope.refused.clear();
        match make_due(
            spool,
            &mut envelope,
            state,
            now,
            &format!("retry requested (was {state})"),
        ) {
            Ok(()) => retried.due += 1,
            // The relay moved it meanwhile (e.g. started delivering it).
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                retried
                    .skipped
                    .push(format!("{id}: moved meanwhile, skipped"));
            }
            Err(err) => return Err(err.into()),
        }
    }
    Ok(retried)
}

/// Makes `account`'s held mail due now, when its hold ends. Returns the
/// ids released.
pub fn release_held(spool: &Spool, account: &str, now: u64) -> std::io::Result<Vec<String>> {
    let mut released = Vec::new();
    for mut envelope in spool.list(State::Held)? {
        if envelope.account == account {
            make_due(spool, &mut envelope, State::Held, now, "hold released")?;
            released.push(envelope.id);
        }
    }
    Ok(released)
}

/// Moves a message from `state` to `deferred/`, due `now`, with `note` in
/// its history. On a full disk it is moved as it is (a rename needs no
/// space), without the note: due or not, the scheduler finds it.
fn make_due(
    spool: &Spool,
    envelope: &mut Envelope,
    state: State,
    now: u64,
    note: &str,
) -> std::io::Result<()> {
    envelope.next_attempt_at = now;
    envelope.record(now, note);
    spool
        .update(envelope, state, State::Deferred)
        .or_else(|err| match is_full(&err) {
            true => spool.move_to(&envelope.id, state, State::Deferred),
            false => Err(err),
        })
}

/// `sendbridge queue delete ID`.
pub fn delete(spool: &Spool, id: &str) -> anyhow::Result<()> {
    let state = locate(spool, id)?;
    spool.remove(state, id)?;
    Ok(())
}

/// The state of message `id`, or an error naming the spool.
pub fn locate(spool: &Spool, id: &str) -> anyhow::Result<State> {
    spool
        .find(id)?
        .with_context(|| format!("no message {id} in the queue ({})", spool.root().display()))
}
