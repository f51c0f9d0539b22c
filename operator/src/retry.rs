//! How long a failed Service waits before its next reconcile, by error class.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use hawser_providers::ErrorClass;

/// Bounded exponential backoff with jitter, per Service.
#[derive(Debug)]
pub struct RetryPolicy {
    min: Duration,
    max: Duration,
    /// Wait after input the user must fix, or a fatal error: not hot, but not never either,
    /// since the cloud side (quota, permissions) may be fixed without touching the Service.
    slow: Duration,
    seed: Option<u64>,
    failures: Mutex<HashMap<String, u32>>,
}

impl RetryPolicy {
    /// Backoff from `min` to `max`; `slow` for errors retrying cannot fix soon; `seed` fixes the jitter (tests).
    pub fn new(min: Duration, max: Duration, slow: Duration, seed: Option<u64>) -> Self {
        Self { min, max, slow, seed, failures: Mutex::default() }
    }

    /// The delay before retrying `key` after an error of `class`; counts the failure.
    pub fn on_failure(&self, key: &str, class: Option<ErrorClass>, retry_after: Option<Duration>) -> Duration {
        let attempt = {
            let mut failures = self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let n = failures.entry(key.to_owned()).or_insert(0);
            *n = n.saturating_add(1);
            *n
        };
        match class {
            Some(ErrorClass::InvalidInput | ErrorClass::Fatal) => self.slow,
            Some(ErrorClass::Throttled) if retry_after.is_some() => {
                retry_after.unwrap_or(self.min).clamp(self.min, self.max)
            }
            _ => {
                let mut builder = ExponentialBuilder::new()
                    .with_min_delay(self.min)
                    .with_max_delay(self.max)
                    .with_factor(2.0)
                    .without_max_times();
                builder = match self.seed {
                    Some(seed) => builder.with_jitter_seed(seed).with_jitter(),
                    None => builder.with_jitter(),
                };
                builder
                    .build()
                    .nth(attempt.saturating_sub(1) as usize)
                    .unwrap_or(self.max)
                    .min(self.max.saturating_mul(2))
            }
        }
    }

    /// `key` succeeded: its next failure starts from the shortest delay.
    pub fn on_success(&self, key: &str) {
        self.failures.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> RetryPolicy {
        RetryPolicy::new(Duration::from_secs(1), Duration::from_secs(300), Duration::from_secs(600), Some(7))
    }

    #[test]
    fn transient_errors_back_off_exponentially_with_jitter_and_a_bound() {
        let p = policy();
        let delays: Vec<Duration> = (0..12).map(|_| p.on_failure("ns/a", Some(ErrorClass::Transient), None)).collect();
        assert!(delays[0] >= Duration::from_secs(1) && delays[0] < Duration::from_secs(3), "{delays:?}");
        assert!(delays[3] >= Duration::from_secs(8), "grows: {delays:?}");
        assert!(delays.iter().all(|d| *d <= Duration::from_secs(600)), "bounded (max plus jitter): {delays:?}");
        assert!(delays[11] >= Duration::from_secs(300), "{delays:?}");
    }

    #[test]
    fn success_resets_and_services_are_independent() {
        let p = policy();
        for _ in 0..5 {
            p.on_failure("ns/a", Some(ErrorClass::Conflict), None);
        }
        assert!(p.on_failure("ns/b", Some(ErrorClass::Conflict), None) < Duration::from_secs(3));
        p.on_success("ns/a");
        assert!(p.on_failure("ns/a", Some(ErrorClass::Conflict), None) < Duration::from_secs(3));
    }

    #[test]
    fn invalid_input_and_fatal_are_not_retried_hot_and_throttles_honour_retry_after() {
        let p = policy();
        assert_eq!(p.on_failure("a", Some(ErrorClass::InvalidInput), None), Duration::from_secs(600));
        assert_eq!(p.on_failure("a", Some(ErrorClass::Fatal), None), Duration::from_secs(600));
        assert_eq!(
            p.on_failure("a", Some(ErrorClass::Throttled), Some(Duration::from_secs(9))),
            Duration::from_secs(9)
        );
    }
}
