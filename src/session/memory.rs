//! The budget for message bytes held in memory by all sessions at once
//! (`server.message_memory_budget`). Without it, N parallel clients could
//! make the relay hold N × `max_message_size`.
//!
//! Messages grow as they arrive, so reservations grow too, and sessions that
//! hold part of the budget while waiting for more could wait on each other
//! forever. Grants follow the banker's rule instead: every message may claim
//! up to one `max_message_size`, and a grant is made only when, afterwards,
//! the largest holder could still get all it may claim. That holder can
//! always finish and give its part back, so some message always progresses.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

/// Reservations are taken in steps of this many bytes, so a message costs a
/// handful of grants rather than one per read.
const STEP: usize = 1024 * 1024;

/// How long a message waits for room before it is refused with `452`.
const WAIT: Duration = Duration::from_secs(10);

/// The bookkeeping, in steps; pure, so the rule has table tests.
#[derive(Debug)]
struct Ledger {
    free: usize,
    /// What one message may hold at most.
    claim: usize,
    held: HashMap<u64, usize>,
}

impl Ledger {
    /// Grants `steps` more to `holder` if the state stays safe.
    fn grant(&mut self, holder: u64, steps: usize) -> bool {
        let holds = self.held.get(&holder).copied().unwrap_or(0);
        if steps > self.free || holds + steps > self.claim {
            return false;
        }
        let largest = self
            .held
            .iter()
            .map(|(&id, &held)| if id == holder { held + steps } else { held })
            .chain([holds + steps])
            .max()
            .unwrap_or(0);
        // The largest holder needs the least to finish; once it has, every
        // other one can finish in turn.
        if self.free - steps < self.claim - largest {
            return false;
        }
        self.free -= steps;
        *self.held.entry(holder).or_default() += steps;
        true
    }

    fn release(&mut self, holder: u64) {
        self.free += self.held.remove(&holder).unwrap_or(0);
    }
}

#[derive(Clone)]
pub struct MemoryBudget {
    shared: Arc<Shared>,
}

struct Shared {
    ledger: Mutex<Ledger>,
    released: Notify,
    next_id: std::sync::atomic::AtomicU64,
}

impl MemoryBudget {
    /// `bytes` in all; a single message may hold up to `max_message` (plus
    /// a read buffer). The budget never goes below one message's claim.
    pub fn new(bytes: usize, max_message: usize) -> Self {
        let claim = (max_message + super::connection::CONTENT_READ).div_ceil(STEP);
        let ledger = Ledger {
            free: bytes.div_ceil(STEP).max(claim),
            claim,
            held: HashMap::new(),
        };
        MemoryBudget {
            shared: Arc::new(Shared {
                ledger: Mutex::new(ledger),
                released: Notify::new(),
                next_id: Default::default(),
            }),
        }
    }

    /// An empty reservation for one message.
    pub fn reservation(&self) -> Reservation {
        let id = self
            .shared
            .next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Reservation {
            shared: self.shared.clone(),
            id,
            bytes: 0,
        }
    }
}

/// What one message holds of the budget; given back when dropped.
pub struct Reservation {
    shared: Arc<Shared>,
    id: u64,
    bytes: usize,
}

impl Reservation {
    /// Grows the reservation to cover `len` bytes, waiting up to [`WAIT`]
    /// for other messages to give theirs back. False when it could not.
    pub async fn cover(&mut self, len: usize) -> bool {
        if len <= self.bytes {
            return true;
        }
        let steps = (len - self.bytes).div_ceil(STEP);
        let waited = tokio::time::timeout(WAIT, async {
            loop {
                // Registered before trying, so a release in between wakes us.
                let released = self.shared.released.notified();
                if self
                    .shared
                    .ledger
                    .lock()
                    .expect("ledger")
                    .grant(self.id, steps)
                {
                    return;
                }
                released.await;
            }
        });
        if waited.await.is_err() {
            return false;
        }
        self.bytes += steps * STEP;
        true
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.bytes > 0 {
            self.shared.ledger.lock().expect("ledger").release(self.id);
            self.shared.released.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ledger(free: usize, claim: usize, held: &[(u64, usize)]) -> Ledger {
        Ledger {
            free,
            claim,
            held: held.iter().copied().collect(),
        }
    }

    #[test]
    fn grants_keep_the_largest_holder_able_to_finish() {
        // (free, claim, held, holder, steps, granted)
        type Case = (usize, usize, &'static [(u64, usize)], u64, usize, bool);
        let cases: &[Case] = &[
            (16, 8, &[], 1, 1, true),
            (16, 8, &[], 1, 9, false),
            (2, 8, &[(1, 6)], 1, 2, true),
            // Another message may not take what the largest still needs.
            (2, 8, &[(1, 6)], 2, 1, false),
            (3, 8, &[(1, 6)], 2, 1, true),
            // Growing the largest holder is always safe while room lasts.
            (7, 8, &[(1, 1), (2, 1)], 2, 7, true),
            (0, 8, &[(1, 8)], 2, 1, false),
            // Eight messages of one step each, a budget of two claims: the
            // ninth still fits, since one of them can grow to its claim.
            (
                8,
                8,
                &[
                    (1, 1),
                    (2, 1),
                    (3, 1),
                    (4, 1),
                    (5, 1),
                    (6, 1),
                    (7, 1),
                    (8, 1),
                ],
                9,
                1,
                true,
            ),
        ];
        for &(free, claim, held, holder, steps, granted) in cases {
            let mut ledger = ledger(free, claim, held);
            assert_eq!(
                ledger.grant(holder, steps),
                granted,
                "{free} {claim} {held:?} {holder} {steps}"
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_waits_for_room_then_gives_up() {
        let budget = MemoryBudget::new(3 * STEP, 2 * STEP);
        let claim = budget.shared.ledger.lock().unwrap().claim;
        assert_eq!(claim, 3);
        let mut first = budget.reservation();
        assert!(first.cover(STEP + 1).await, "two steps");
        let mut second = budget.reservation();

        let started = tokio::time::Instant::now();
        assert!(
            !second.cover(STEP).await,
            "the first one needs the last step"
        );
        assert_eq!(started.elapsed(), WAIT);

        let waiting = tokio::spawn(async move { second.cover(2 * STEP).await });
        tokio::task::yield_now().await;
        drop(first);
        assert!(
            waiting.await.unwrap(),
            "room once the first message is gone"
        );
    }

    #[tokio::test]
    async fn covering_what_is_covered_takes_nothing() {
        let budget = MemoryBudget::new(STEP, 1);
        let free = || budget.shared.ledger.lock().unwrap().free;
        let mut reservation = budget.reservation();
        assert!(reservation.cover(10).await);
        assert!(reservation.cover(STEP).await);
        assert_eq!(free(), 0);
        drop(reservation);
        assert_eq!(free(), 1);
    }
}
