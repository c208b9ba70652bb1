//! Failed sign-ins counted per client address, as Postfix's anvil and
//! Dovecot's auth penalty do: after a few failures an address's password
//! checks wait first, and over its budget it is refused without a check
//! until its window ends. Pure: the caller passes the time and the budget.
//!
//! It lives beside the session rather than in `Users` because `Users` is
//! rebuilt on every reload, and a reload must not hand a guesser a fresh
//! budget.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::time::Duration;

use tokio::time::Instant;

/// Failures an address may have before its checks are delayed: a person
/// mistyping a password twice or thrice waits for nothing.
const FREE_FAILURES: u32 = 3;
/// The first delay; each further failure doubles it, up to the maximum.
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// Like Dovecot's auth penalty cap.
const MAX_DELAY: Duration = Duration::from_secs(15);
/// Addresses remembered at once; beyond it the oldest window is forgotten,
/// so a flood from many addresses costs bounded memory.
const MAX_ADDRESSES: usize = 10_000;

/// How many failed sign-ins an address may have per window.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub failures: u32,
    pub window: Duration,
}

/// What to do with a sign-in attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Check the password after `delay` (zero for an address in good standing).
    Check { delay: Duration },
    /// Over budget: answer at once, without a check, for `remaining`.
    Refuse { remaining: Duration },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub verdict: Verdict,
    /// Failures counted in the address's window so far.
    pub failures: u32,
    /// True the first time in a window that the address is slowed or
    /// refused: the moment to log it, once.
    pub first_throttled: bool,
}

struct Window {
    started: Instant,
    /// Checks that failed in this window.
    failures: u32,
    /// Checks admitted and not answered yet.
    pending: u32,
    throttled: bool,
}

#[derive(Default)]
pub struct SignInThrottle {
    windows: HashMap<IpAddr, Window>,
    /// The same addresses in the order their windows started, which is the
    /// order they end in (the budget's window is the same for all).
    by_age: VecDeque<IpAddr>,
}

impl SignInThrottle {
    /// Whether and when to check a sign-in from `address` now. The delay
    /// grows with the failures so far. Once an address has failed, checks
    /// still unanswered count against its budget too, so parallel guesses
    /// cannot all pass before the first answer; an address in good standing
    /// may sign in on many connections at once (a program with a pool).
    /// Every admitted check is settled by `failed`, `succeeded` or
    /// `not_checked`.
    pub fn admit(&mut self, address: IpAddr, now: Instant, budget: Budget) -> Admission {
        self.forget_ended(now, budget.window);
        let window = self.window(address.to_canonical(), now);
        let failures = window.failures;
        let counted = match failures {
            0 => 0,
            _ => failures + window.pending,
        };
        let verdict = if counted >= budget.failures {
            Verdict::Refuse {
                remaining: (window.started + budget.window).saturating_duration_since(now),
            }
        } else {
            window.pending += 1;
            Verdict::Check {
                delay: delay_after(failures),
            }
        };
        let throttled = verdict
            != Verdict::Check {
                delay: Duration::ZERO,
            };
        let first_throttled = throttled && !window.throttled;
        window.throttled |= throttled;
        Admission {
            verdict,
            failures,
            first_throttled,
        }
    }

    /// The admitted check failed (or its client left before the answer).
    pub fn failed(&mut self, address: IpAddr) {
        self.settle(address, |window| window.failures += 1);
    }

    /// The admitted check could not run (every checker was busy): it is not
    /// the client's failure.
    pub fn not_checked(&mut self, address: IpAddr) {
        self.settle(address, |_| {});
    }

    /// The password was right: the address starts afresh.
    pub fn succeeded(&mut self, address: IpAddr) {
        self.settle(address, |window| window.failures = 0);
    }

    /// Ends one pending check of `address`; its window may have ended
    /// meanwhile, and then there is nothing to count.
    fn settle(&mut self, address: IpAddr, how: impl FnOnce(&mut Window)) {
        if let Some(window) = self.windows.get_mut(&address.to_canonical()) {
            window.pending = window.pending.saturating_sub(1);
            how(window);
        }
    }

    /// The address's current window, opened now if it has none.
    fn window(&mut self, address: IpAddr, now: Instant) -> &mut Window {
        if !self.windows.contains_key(&address) {
            if self.windows.len() >= MAX_ADDRESSES {
                self.forget_oldest();
            }
            let window = Window {
                started: now,
                failures: 0,
                pending: 0,
                throttled: false,
            };
            self.windows.insert(address, window);
            self.by_age.push_back(address);
        }
        self.windows.get_mut(&address).expect("inserted above")
    }

    fn forget_ended(&mut self, now: Instant, length: Duration) {
        while let Some(oldest) = self.by_age.front() {
            if now.saturating_duration_since(self.windows[oldest].started) < length {
                return;
            }
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        if let Some(oldest) = self.by_age.pop_front() {
            self.windows.remove(&oldest);
        }
    }
}

/// The wait before the check that follows `failures` failed ones.
fn delay_after(failures: u32) -> Duration {
    match failures.checked_sub(FREE_FAILURES) {
        None => Duration::ZERO,
        Some(doublings) => FIRST_DELAY
            .checked_mul(1 << doublings.min(16))
            .map_or(MAX_DELAY, |delay| delay.min(MAX_DELAY)),
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    const BUDGET: Budget = Budget {
        failures: 6,
        window: Duration::from_secs(600),
    };

    fn check(seconds: u64) -> Verdict {
        Verdict::Check {
            delay: Duration::from_secs(seconds),
        }
    }

    fn refuse(seconds: u64) -> Verdict {
        Verdict::Refuse {
            remaining: Duration::from_secs(seconds),
        }
    }

    enum Step {
        /// Seconds after the start, the verdict expected, whether it is the
        /// first throttling in the window; the check (if any) fails.
        Fails(u64, Verdict, bool),
        /// Seconds after the start; the check succeeds.
        Succeeds(u64),
        /// Seconds after the start, the verdict; every checker is busy.
        Busy(u64, Verdict),
        /// Seconds after the start, the verdict; no answer yet.
        Pending(u64, Verdict),
    }
    use Step::*;

    fn run(address: &str, steps: &[Step]) {
        let start = Instant::now();
        let address: IpAddr = address.parse().unwrap();
        let mut throttle = SignInThrottle::default();
        for (n, step) in steps.iter().enumerate() {
            let at = match *step {
                Fails(at, ..) | Succeeds(at) | Busy(at, _) | Pending(at, _) => at,
            };
            let admission = throttle.admit(address, start + Duration::from_secs(at), BUDGET);
            match *step {
                Fails(_, verdict, first) => {
                    assert_eq!(admission.verdict, verdict, "step {n}");
                    assert_eq!(admission.first_throttled, first, "step {n}");
                    throttle.failed(address);
                }
                Succeeds(_) => throttle.succeeded(address),
                Busy(_, verdict) => {
                    assert_eq!(admission.verdict, verdict, "step {n}");
                    throttle.not_checked(address);
                }
                Pending(_, verdict) => assert_eq!(admission.verdict, verdict, "step {n}"),
            }
        }
    }

    #[test]
    fn failures_are_free_then_slowed_with_a_growing_delay_then_refused() {
        run(
            "192.0.2.7",
            &[
                Fails(0, check(0), false),
                Fails(1, check(0), false),
                Fails(2, check(0), false),
                Fails(3, check(1), true),
                Fails(5, check(2), false),
                Fails(8, check(4), false),
                Fails(20, refuse(580), false),
                Fails(599, refuse(1), false),
            ],
        );
    }

    #[test]
    fn a_window_ends_and_the_address_starts_afresh() {
        run(
            "192.0.2.7",
            &[
                Fails(0, check(0), false),
                Fails(0, check(0), false),
                Fails(0, check(0), false),
                Fails(0, check(1), true),
                Fails(0, check(2), false),
                Fails(0, check(4), false),
                Fails(0, refuse(600), false),
                Fails(600, check(0), false),
                Fails(601, check(0), false),
                Fails(602, check(0), false),
                // Logged again: a new window.
                Fails(603, check(1), true),
            ],
        );
    }

    #[test]
    fn success_resets_the_address() {
        run(
            "2001:db8::7",
            &[
                Fails(0, check(0), false),
                Fails(1, check(0), false),
                Fails(2, check(0), false),
                Succeeds(3),
                Fails(4, check(0), false),
                Fails(5, check(0), false),
                Fails(6, check(0), false),
                // Logged already in this window.
                Fails(7, check(1), false),
            ],
        );
    }

    #[test]
    fn the_delay_doubles_up_to_its_cap() {
        let delays: Vec<u64> = (0..10).map(|n| delay_after(n).as_secs()).collect();
        assert_eq!(delays, [0, 0, 0, 1, 2, 4, 8, 15, 15, 15]);
        assert_eq!(delay_after(u32::MAX), MAX_DELAY);
    }

    #[test]
    fn a_check_that_could_not_run_does_not_count() {
        run(
            "192.0.2.7",
            &[
                Fails(0, check(0), false),
                Fails(0, check(0), false),
                Busy(0, check(0)),
                Busy(0, check(0)),
                Fails(0, check(0), false),
                Fails(0, check(1), true),
            ],
        );
    }

    #[test]
    fn parallel_sign_ins_of_an_address_in_good_standing_are_not_slowed() {
        let steps: Vec<Step> = (0..20).map(|_| Pending(0, check(0))).collect();
        run("192.0.2.7", &steps);
    }

    /// Parallel guesses after a failure: each counts before any answer.
    #[test]
    fn once_an_address_failed_unanswered_checks_count_against_its_budget() {
        run(
            "192.0.2.7",
            &[
                Fails(0, check(0), false),
                Pending(1, check(0)),
                Pending(1, check(0)),
                Pending(1, check(0)),
                Pending(1, check(0)),
                Pending(1, check(0)),
                Pending(1, refuse(599)),
            ],
        );
    }

    #[test]
    fn addresses_are_counted_apart_and_mapped_ipv4_is_ipv4() {
        let now = Instant::now();
        let mut throttle = SignInThrottle::default();
        let flooding: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..BUDGET.failures {
            throttle.admit(flooding, now, BUDGET);
            throttle.failed(flooding);
        }
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        assert_eq!(throttle.admit(mapped, now, BUDGET).verdict, refuse(600));
        assert_eq!(throttle.admit(other, now, BUDGET).verdict, check(0));
    }

    #[test]
    fn memory_is_bounded_by_forgetting_the_oldest_window() {
        let now = Instant::now();
        let mut throttle = SignInThrottle::default();
        let address = |n: u32| IpAddr::from(Ipv4Addr::from(0x0a00_0000 + n));
        let first = address(0);
        for _ in 0..BUDGET.failures {
            throttle.admit(first, now, BUDGET);
            throttle.failed(first);
        }
        for n in 1..=MAX_ADDRESSES as u32 {
            throttle.admit(address(n), now, BUDGET);
        }
        assert_eq!(throttle.windows.len(), MAX_ADDRESSES);
        assert_eq!(throttle.by_age.len(), MAX_ADDRESSES);
        assert_eq!(throttle.admit(first, now, BUDGET).verdict, check(0));
    }
}
