//! The mock cloud's API behaviour: latency, a rate limit and seeded faults.

use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

/// What happens to one API call before the cloud acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The call goes through.
    Admit,
    /// The rate limit is exhausted; come back after this long.
    Throttle(Duration),
    /// An injected fault: the request is lost before the cloud acts.
    FailBefore,
    /// An injected fault: the cloud acts but the response is lost.
    FailAfter,
}

/// Token bucket plus fault injector. Uses tokio's clock so tests can pause time.
#[derive(Debug)]
pub struct ApiGate {
    rate_per_sec: Option<f64>,
    burst: f64,
    tokens: f64,
    refilled_at: Instant,
    error_rate: f64,
    rng: SmallRng,
    /// The answers of this many next writes are lost after the cloud acted.
    lose_answers: u32,
}

impl ApiGate {
    /// A gate admitting `rate_per_sec` calls a second (unlimited when `None`) and failing a
    /// `error_rate` fraction of calls, chosen by a generator seeded with `seed`.
    pub fn new(rate_per_sec: Option<f64>, error_rate: f64, seed: u64) -> Self {
        let burst = rate_per_sec.map_or(0.0, |r| r.max(1.0));
        Self {
            rate_per_sec,
            burst,
            tokens: burst,
            refilled_at: Instant::now(),
            error_rate,
            rng: SmallRng::seed_from_u64(seed),
            lose_answers: 0,
        }
    }

    /// Loses the answers of the next `n` writes after the cloud acted on them: an operator killed
    /// in the middle of a change, deterministically.
    pub fn lose_answers(&mut self, n: u32) {
        self.lose_answers = n;
    }

    /// Decides the fate of one call.
    pub fn admit(&mut self, mutating: bool) -> Admission {
        if let Some(rate) = self.rate_per_sec {
            let now = Instant::now();
            let elapsed = now.duration_since(self.refilled_at).as_secs_f64();
            self.tokens = (self.tokens + elapsed * rate).min(self.burst);
            self.refilled_at = now;
            if self.tokens < 1.0 {
                return Admission::Throttle(Duration::from_secs_f64((1.0 - self.tokens) / rate));
            }
            self.tokens -= 1.0;
        }
        if mutating && self.lose_answers > 0 {
            self.lose_answers -= 1;
            return Admission::FailAfter;
        }
        if self.error_rate > 0.0 && self.rng.random::<f64>() < self.error_rate {
            // Half of the faults on a write happen after the write took effect: the nastiest case
            // for a controller, and the one that proves ensure/delete are idempotent.
            if mutating && self.rng.random::<bool>() {
                return Admission::FailAfter;
            }
            return Admission::FailBefore;
        }
        Admission::Admit
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn rate_limit_throttles_then_refills() {
        let mut gate = ApiGate::new(Some(2.0), 0.0, 1);
        assert_eq!(gate.admit(false), Admission::Admit);
        assert_eq!(gate.admit(false), Admission::Admit);
        let Admission::Throttle(wait) = gate.admit(false) else {
            panic!("third call in a burst of 2 must be throttled")
        };
        assert!(wait <= Duration::from_millis(500) && wait > Duration::ZERO, "{wait:?}");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert_eq!(gate.admit(false), Admission::Admit);
    }

    #[test]
    fn faults_are_seeded_and_roughly_at_the_rate() {
        let run = |seed| {
            let mut gate = ApiGate::new(None, 0.3, seed);
            (0..1000).map(|_| gate.admit(true)).collect::<Vec<_>>()
        };
        let a = run(7);
        assert_eq!(a, run(7), "same seed, same faults");
        assert_ne!(a, run(8));
        let faults = a.iter().filter(|x| **x != Admission::Admit).count();
        assert!((200..400).contains(&faults), "{faults} faults of 1000 at rate 0.3");
        assert!(a.contains(&Admission::FailAfter) && a.contains(&Admission::FailBefore));
    }

    #[test]
    fn reads_never_fail_after() {
        let mut gate = ApiGate::new(None, 1.0, 3);
        assert!((0..100).all(|_| gate.admit(false) == Admission::FailBefore));
    }
}
