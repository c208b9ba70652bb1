//! Where delivery hands what happened to the notice engine (`notify`):
//! with the accounts as they are now (an account on hold carries no
//! notice), off the async workers, and with the scheduler woken for the
//! notices it queued.

use std::sync::Arc;

use tokio::runtime::Handle;

use super::Delivery;
use crate::notify::{Notifier, SendingAccount};

impl Delivery {
    /// The configured accounts and whether each is on hold.
    fn sending_accounts(&self) -> Vec<SendingAccount> {
        self.account_holds()
            .into_iter()
            .map(|(name, hold)| SendingAccount {
                name,
                on_hold: hold.is_some(),
            })
            .collect()
    }

    /// Runs `notice` on the blocking pool (it reads and queues mail), then
    /// wakes the scheduler for what it queued.
    pub(super) async fn notice(
        &self,
        notice: impl FnOnce(&Notifier, &[SendingAccount], u64) + Send + 'static,
    ) {
        let notifier = self.notifier.clone();
        let accounts = self.sending_accounts();
        let now = self.clock.now();
        let _ = tokio::task::spawn_blocking(move || notice(&notifier, &accounts, now)).await;
        self.wake_scheduler.notify_one();
    }

    /// The `spool_full` alert, once per time the spool's disk is full.
    pub(super) fn tell_when_the_spool_fills(self: &Arc<Self>) {
        // Weak: the watch is part of the delivery it would keep alive.
        let delivery = Arc::downgrade(self);
        self.space.when_full(move || {
            let (Some(delivery), Ok(runtime)) = (delivery.upgrade(), Handle::try_current()) else {
                return;
            };
            runtime.spawn(async move {
                let hint = delivery.space.hint();
                delivery
                    .notice(move |notifier, accounts, now| notifier.spool_full(hint, accounts, now))
                    .await;
            });
        });
    }
}
