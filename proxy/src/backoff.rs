//! The one exponential backoff: every reconnect, respawn and retry delay in
//! Daisy is `base × 2^n`, capped at `max`, with or without ±25% jitter.
//!
//! - [`Policy`] is the arithmetic, for schedules indexed by a count kept
//!   elsewhere: a run's attempt (the worker's retry delays, stored with the
//!   run), a plugin slot's crashes in a row (the respawn delay).
//! - [`Backoff`] is a policy with its own count, for loops that retry until
//!   something works: reconnecting to RabbitMQ, retrying a database write.
//!   [`Backoff::reconnect`] is the schedule they all use.
//!
//! The post-submission crate's resender keeps its own doubling (it does not
//! depend on this crate).

use std::time::Duration;

/// Doubling stops after this many steps (a million times `base`), past any
/// `max` Daisy uses; it keeps the arithmetic far from overflow.
const MAX_DOUBLINGS: u32 = 20;

/// `base × 2^n`, capped at `max`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    base: Duration,
    max: Duration,
}

impl Policy {
    /// From `base`, doubling up to `max`.
    pub const fn new(base: Duration, max: Duration) -> Policy {
        Policy { base, max }
    }

    /// The delay after `n` doublings, exactly.
    pub fn step(&self, n: u32) -> Duration {
        self.base
            .saturating_mul(1 << n.min(MAX_DOUBLINGS))
            .min(self.max)
    }

    /// [`Policy::step`] ±25%, so that many waiters do not come back at once.
    pub fn delay(&self, n: u32) -> Duration {
        jitter(self.step(n))
    }
}

/// A [`Policy`] counting its own failures in a row.
#[derive(Debug, Clone)]
pub struct Backoff {
    policy: Policy,
    failures: u32,
}

impl Backoff {
    /// From `base`, doubling up to `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            policy: Policy::new(base, max),
            failures: 0,
        }
    }

    /// The schedule of Daisy's reconnect and retry loops: 100 ms, doubling
    /// up to 5 s.
    pub fn reconnect() -> Backoff {
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
    }

    /// The next delay: the current step, ±25% jitter.
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.policy.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// Back to the first step (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// `d` ±25%.
pub fn jitter(d: Duration) -> Duration {
    d.mul_f64(0.75 + fastrand::f64() * 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_from_base_and_stop_at_max() {
        let policy = Policy::new(Duration::from_millis(50), Duration::from_millis(3200));
        let steps: Vec<u64> = (0..9).map(|n| policy.step(n).as_millis() as u64).collect();
        assert_eq!(steps, [50, 100, 200, 400, 800, 1600, 3200, 3200, 3200]);
        // No overflow however far it goes.
        let huge = Policy::new(Duration::from_secs(1), Duration::MAX);
        assert_eq!(huge.step(u32::MAX), Duration::from_secs(1 << 20));
    }

    #[test]
    fn backoff_jitters_within_a_quarter_and_resets_to_base() {
        let mut backoff = Backoff::reconnect();
        for expected in [100u64, 200, 400, 800, 1600, 3200, 5000, 5000] {
            let delay = backoff.next_delay().as_millis() as u64;
            assert!(
                (expected * 3 / 4..=expected * 5 / 4).contains(&delay),
                "{delay} ms for a step of {expected} ms"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(125));
    }
}
