//! Tokio's paused clock, frozen: it never auto-advances, so real network I/O
//! (which takes real time) cannot make timers fire early; time moves only by
//! `tokio::time::advance`. Tokio inhibits auto-advance while a blocking task
//! runs, so one blocking task is held for the clock's lifetime.

use std::future::Future;
use std::sync::mpsc;
use std::time::Duration;

pub struct FrozenClock {
    release: mpsc::Sender<()>,
}

impl FrozenClock {
    /// Call inside a `#[tokio::test(start_paused = true)]`.
    pub fn new() -> Self {
        let (release, held) = mpsc::channel::<()>();
        tokio::task::spawn_blocking(move || {
            let _ = held.recv();
        });
        FrozenClock { release }
    }

    /// Awaits `future`, failing the test after `limit` of real time (tokio
    /// timers do not run on a frozen clock).
    pub async fn within<T>(&self, limit: Duration, future: impl Future<Output = T>) -> T {
        let (expired, deadline) = tokio::sync::oneshot::channel::<()>();
        std::thread::spawn(move || {
            std::thread::sleep(limit);
            let _ = expired.send(());
        });
        tokio::select! {
            output = future => output,
            _ = deadline => panic!("not done within {limit:?} of real time"),
        }
    }
}

impl Drop for FrozenClock {
    fn drop(&mut self) {
        // Ends the blocking task, so the runtime can shut down.
        let _ = self.release.send(());
    }
}
