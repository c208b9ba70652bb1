//! The last notices, for the status page: a bounded ring in memory, and
//! the notices metric beside it.

use std::collections::VecDeque;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::observe::metrics;

/// How many notices the status page shows.
pub const KEPT: usize = 50;

/// One notice: what, to whom, through which channel, and how it went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recent {
    /// Unix milliseconds.
    pub at: u64,
    /// `bounce`, `delay_warning`, or an alert's event name.
    pub event: String,
    /// Addresses, or the webhook's origin (never its path or query).
    pub to: String,
    /// `email`, `webhook`, or `none`.
    pub channel: String,
    pub outcome: String,
}

#[derive(Default)]
pub struct RecentNotices {
    ring: Mutex<VecDeque<Recent>>,
}

impl RecentNotices {
    /// Notes a notice and counts it.
    pub fn add(
        &self,
        at: u64,
        event: &'static str,
        to: String,
        channel: &'static str,
        outcome: String,
    ) {
        metrics::notice(event, channel);
        let mut ring = self.ring.lock().expect("recent lock");
        if ring.len() == KEPT {
            ring.pop_back();
        }
        ring.push_front(Recent {
            at,
            event: event.to_string(),
            to,
            channel: channel.to_string(),
            outcome,
        });
    }

    /// Newest first.
    pub fn list(&self) -> Vec<Recent> {
        self.ring
            .lock()
            .expect("recent lock")
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ring_keeps_the_newest() {
        let recent = RecentNotices::default();
        for at in 0..(KEPT as u64 + 3) {
            recent.add(at, "bounce", "a@b".into(), "email", "queued".into());
        }
        let list = recent.list();
        assert_eq!(list.len(), KEPT);
        assert_eq!(list[0].at, KEPT as u64 + 2);
        assert_eq!(list[KEPT - 1].at, 3);
    }
}
