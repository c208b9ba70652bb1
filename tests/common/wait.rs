//! Bounded waiting for state the relay settles just after an event a test
//! awaited (a spool file removed after the upstream's 250, a hold lifted).

use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// Waits until `condition` holds, checking every few milliseconds; panics
/// naming `what` after 30 s.
pub async fn eventually<F: Future<Output = bool>>(what: &str, mut condition: impl FnMut() -> F) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !condition().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
