//! A client-side, adaptive rate limiter: a token bucket whose rate follows the cloud's limit.
//!
//! Clouds publish rate limits per API class but enforce them per account and region, shared with
//! every other tool there, so the real limit is only learnt from throttling answers. The limiter
//! does what TCP does with a congestion window: it climbs a little with every call that goes
//! through and drops by a fixed fraction when the cloud throttles, so a busy controller runs just
//! below the cloud's limit with few throttled calls, and every caller slows down together.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio::time::Instant;

/// How the rate moves.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LimiterConfig {
    /// Calls a second at start.
    pub initial_rate: f64,
    /// The rate never drops below this.
    pub min_rate: f64,
    /// The rate never climbs above this.
    pub max_rate: f64,
    /// Calls that may start at once after a quiet spell.
    pub burst: f64,
    /// Calls a second added per call that went through (additive increase).
    pub increase: f64,
    /// The same before the first throttle: one a call doubles the rate every second, so the
    /// limiter finds a generous cloud's pace quickly (TCP's slow start).
    pub slow_start_increase: f64,
    /// Fraction of the rate kept after a throttle (multiplicative decrease).
    pub decrease: f64,
}

impl LimiterConfig {
    /// A limiter starting at `initial_rate` calls a second, free to climb tenfold.
    pub fn starting_at(initial_rate: f64) -> Self {
        Self {
            initial_rate,
            min_rate: (initial_rate / 20.0).max(0.1),
            max_rate: initial_rate * 10.0,
            burst: 1.0,
            increase: 0.05,
            slow_start_increase: 1.0,
            decrease: 0.8,
        }
    }
}

#[derive(Debug)]
struct State {
    rate: f64,
    /// When the next call may start; calls are spaced `1 / rate` apart.
    next_free: Instant,
    /// Set by a throttle: nobody starts before then.
    paused_until: Option<Instant>,
    /// When the rate last dropped: one burst of throttles is one decrease.
    decreased_at: Option<Instant>,
}

impl State {
    fn slow_start(&self) -> bool {
        self.decreased_at.is_none()
    }
}

/// The limiter; share it (`Arc`) between every caller of one API class.
#[derive(Debug)]
pub struct AdaptiveLimiter {
    config: LimiterConfig,
    state: Mutex<State>,
}

impl AdaptiveLimiter {
    /// A limiter with `config`.
    pub fn new(config: LimiterConfig) -> Self {
        let rate = config.initial_rate.clamp(config.min_rate, config.max_rate);
        // A new limiter has been quiet forever: its first `burst` calls start at once.
        let now = Instant::now();
        let next_free = now.checked_sub(Duration::from_secs_f64(config.burst.max(1.0) / rate)).unwrap_or(now);
        Self { config, state: Mutex::new(State { rate, next_free, paused_until: None, decreased_at: None }) }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a few numbers, each write complete: a poisoned lock is still consistent.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current rate in calls a second.
    pub fn rate(&self) -> f64 {
        self.lock().rate
    }

    /// Reserves the next slot and waits for it.
    pub async fn acquire(&self) {
        let start = {
            let mut s = self.lock();
            let now = Instant::now();
            let interval = Duration::from_secs_f64(1.0 / s.rate);
            // A quiet spell earns at most `burst` calls in advance, never more.
            let earliest = now.checked_sub(interval.mul_f64(self.config.burst.max(1.0) - 1.0)).unwrap_or(now);
            let mut start = s.next_free.max(earliest);
            if let Some(until) = s.paused_until {
                start = start.max(until);
            }
            s.next_free = start + interval;
            start
        };
        tokio::time::sleep_until(start).await;
    }

    /// A call went through: climb a little.
    pub fn succeeded(&self) {
        let mut s = self.lock();
        let step = if s.slow_start() { self.config.slow_start_increase } else { self.config.increase };
        s.rate = (s.rate + step).min(self.config.max_rate);
    }

    /// The cloud throttled a call: drop the rate (once per burst of throttles) and pause every
    /// caller for `retry_after`, or one interval at the new rate. Returns the pause.
    pub fn throttled(&self, retry_after: Option<Duration>) -> Duration {
        let mut s = self.lock();
        let now = Instant::now();
        let interval = Duration::from_secs_f64(1.0 / s.rate);
        // Calls already under way when the first throttle came back were sent at the old rate:
        // their throttles are echoes of the same overshoot, not new evidence.
        if s.decreased_at.is_none_or(|t| now.duration_since(t) > interval.mul_f64(4.0)) {
            s.rate = (s.rate * self.config.decrease).max(self.config.min_rate);
            s.decreased_at = Some(now);
        }
        let pause = retry_after.unwrap_or_else(|| Duration::from_secs_f64(1.0 / s.rate));
        let until = now + pause;
        if s.paused_until.is_none_or(|u| u < until) {
            s.paused_until = Some(until);
        }
        s.next_free = s.next_free.max(until);
        pause
    }
}

/// Client-side rate limits per API class (reads, writes): each an adaptive token bucket that
/// starts at the rate the cloud documents for the class, drops when the cloud throttles (every
/// caller of the class slows down together) and climbs back on success, never above that rate.
#[derive(Debug)]
pub struct RateLimiter {
    read: AdaptiveLimiter,
    write: AdaptiveLimiter,
}

impl RateLimiter {
    /// A limiter allowing `read_rate` reads and `write_rate` writes a second at most.
    pub fn new(read_rate: f64, write_rate: f64) -> Self {
        let ceiling = |rate: f64| LimiterConfig {
            max_rate: rate,
            burst: rate.max(1.0),
            slow_start_increase: 0.0,
            ..LimiterConfig::starting_at(rate)
        };
        Self { read: AdaptiveLimiter::new(ceiling(read_rate)), write: AdaptiveLimiter::new(ceiling(write_rate)) }
    }

    fn class(&self, mutating: bool) -> &AdaptiveLimiter {
        if mutating { &self.write } else { &self.read }
    }

    /// Waits until a call of this class may start.
    pub async fn acquire(&self, mutating: bool) {
        self.class(mutating).acquire().await;
    }

    /// The cloud throttled a call of this class: the class slows down and pauses.
    pub fn throttled(&self, mutating: bool) -> Duration {
        self.class(mutating).throttled(None)
    }

    /// A call of this class went through.
    pub fn succeeded(&self, mutating: bool) {
        self.class(mutating).succeeded();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn class_limits_space_calls_and_throttling_slows_one_class_down() {
        let limiter = RateLimiter::new(2.0, 1.0);
        let start = Instant::now();
        limiter.acquire(false).await;
        limiter.acquire(false).await;
        assert_eq!(start.elapsed(), Duration::ZERO, "a burst of 2 reads is free");
        limiter.acquire(false).await;
        assert!(start.elapsed() >= Duration::from_millis(500), "{:?}", start.elapsed());

        let pause = limiter.throttled(false);
        let before = Instant::now();
        limiter.acquire(false).await;
        assert!(before.elapsed() >= pause, "reads wait for the pause");
        assert!(limiter.read.rate() < 2.0, "and go slower");
        assert!((limiter.write.rate() - 1.0).abs() < 1e-9, "writes are another class");
        for _ in 0..1000 {
            limiter.succeeded(false);
        }
        assert!((limiter.read.rate() - 2.0).abs() < 1e-9, "back to the cloud's rate, never above");
    }

    #[tokio::test(start_paused = true)]
    async fn spaces_calls_at_the_rate() {
        let limiter = AdaptiveLimiter::new(LimiterConfig {
            increase: 0.0,
            slow_start_increase: 0.0,
            ..LimiterConfig::starting_at(10.0)
        });
        let started = Instant::now();
        for _ in 0..11 {
            limiter.acquire().await;
        }
        assert_eq!(started.elapsed(), Duration::from_secs(1), "11 calls at 10/s take 1 s");
    }

    #[tokio::test(start_paused = true)]
    async fn throttle_drops_once_per_burst_and_pauses_everyone() {
        let limiter = AdaptiveLimiter::new(LimiterConfig::starting_at(10.0));
        assert_eq!(limiter.throttled(Some(Duration::from_secs(2))), Duration::from_secs(2));
        let after_one = limiter.rate();
        assert!((after_one - 8.0).abs() < 1e-9, "{after_one}");
        limiter.throttled(None);
        assert!((limiter.rate() - after_one).abs() < 1e-9, "an echo of the same overshoot does not drop again");
        let started = Instant::now();
        limiter.acquire().await;
        assert!(started.elapsed() >= Duration::from_secs(2), "waits out the cloud's retry-after");
        tokio::time::advance(Duration::from_secs(5)).await;
        limiter.throttled(None);
        assert!(limiter.rate() < after_one, "a later throttle is new evidence");
    }

    #[tokio::test(start_paused = true)]
    async fn success_climbs_fast_until_the_first_throttle_then_slowly_within_bounds() {
        let config = LimiterConfig::starting_at(10.0);
        let limiter = AdaptiveLimiter::new(config);
        for _ in 0..10 {
            limiter.succeeded();
        }
        assert!((limiter.rate() - 20.0).abs() < 1e-9, "slow start doubles: {}", limiter.rate());
        limiter.throttled(None);
        assert!((limiter.rate() - 16.0).abs() < 1e-9, "{}", limiter.rate());
        for _ in 0..20 {
            limiter.succeeded();
        }
        assert!((limiter.rate() - 17.0).abs() < 1e-9, "then climbs additively: {}", limiter.rate());
        for _ in 0..100_000 {
            limiter.succeeded();
        }
        assert!((limiter.rate() - config.max_rate).abs() < 1e-9);
    }

    /// Against a cloud that admits `limit` calls a second (a token bucket like the mock's), the
    /// limiter settles just under the limit: most calls go through, few are throttled.
    #[tokio::test(start_paused = true)]
    async fn converges_near_a_hidden_limit_with_few_throttles() {
        let limit = 20.0;
        let limiter = AdaptiveLimiter::new(LimiterConfig::starting_at(50.0));
        let (mut tokens, mut refilled) = (limit, Instant::now());
        let (mut ok, mut throttled) = (0u32, 0u32);
        let started = Instant::now();
        while ok < 2000 {
            limiter.acquire().await;
            let now = Instant::now();
            tokens = (tokens + now.duration_since(refilled).as_secs_f64() * limit).min(limit);
            refilled = now;
            if tokens >= 1.0 {
                tokens -= 1.0;
                ok += 1;
                limiter.succeeded();
            } else {
                throttled += 1;
                limiter.throttled(Some(Duration::from_secs_f64((1.0 - tokens) / limit)));
            }
        }
        let bound = f64::from(ok) / limit;
        let took = started.elapsed().as_secs_f64();
        let share = f64::from(throttled) / f64::from(ok + throttled);
        assert!(took <= bound * 1.15, "2000 calls took {took:.1} s, bound {bound:.1} s");
        assert!(share <= 0.05, "{throttled} throttled of {}", ok + throttled);
    }
}
