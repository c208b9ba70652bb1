//! The budget for message bytes held in memory by all sessions at once
//! (`server.message_memory_budget`). Without it, N parallel clients could
//! make the relay hold N × `max_message_size`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reservations are taken in steps of this many bytes, so a message costs a
/// handful of semaphore operations rather than one per read.
const STEP: usize = 1024 * 1024;

/// How long a message waits for others to finish before it is refused.
const WAIT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct MemoryBudget {
    /// One permit per STEP bytes.
    steps: Arc<Semaphore>,
}

impl MemoryBudget {
    pub fn new(bytes: usize) -> Self {
        MemoryBudget {
            steps: Arc::new(Semaphore::new(bytes.div_ceil(STEP).max(1))),
        }
    }

    /// An empty reservation for one message.
    pub fn reservation(&self) -> Reservation {
        Reservation {
            budget: self.clone(),
            permit: None,
            bytes: 0,
        }
    }
}

/// What one message holds of the budget; returned when dropped.
pub struct Reservation {
    budget: MemoryBudget,
    permit: Option<OwnedSemaphorePermit>,
    bytes: usize,
}

impl Reservation {
    /// Grows the reservation to cover `len` bytes, waiting up to [`WAIT`]
    /// for other messages to release theirs. False when it could not.
    pub async fn cover(&mut self, len: usize) -> bool {
        if len <= self.bytes {
            return true;
        }
        let steps = (len - self.bytes).div_ceil(STEP);
        let Ok(steps32) = u32::try_from(steps) else {
            return false;
        };
        let acquire = self.budget.steps.clone().acquire_many_owned(steps32);
        let Ok(Ok(permit)) = tokio::time::timeout(WAIT, acquire).await else {
            return false;
        };
        match &mut self.permit {
            Some(held) => held.merge(permit),
            None => self.permit = Some(permit),
        }
        self.bytes += steps * STEP;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_message_waits_for_room_then_gives_up() {
        let budget = MemoryBudget::new(3 * STEP);
        let mut first = budget.reservation();
        assert!(first.cover(STEP + 1).await, "two steps");
        let mut second = budget.reservation();
        assert!(second.cover(STEP).await, "the last step");

        let started = tokio::time::Instant::now();
        assert!(!second.cover(2 * STEP).await, "no room for a fourth step");
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
        let budget = MemoryBudget::new(STEP);
        let mut reservation = budget.reservation();
        assert!(reservation.cover(10).await);
        assert!(reservation.cover(STEP).await);
        assert_eq!(budget.steps.available_permits(), 0);
        drop(reservation);
        assert_eq!(budget.steps.available_permits(), 1);
    }
}
