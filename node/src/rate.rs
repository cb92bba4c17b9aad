//! Token buckets: how often something a remote party can cause may happen
//! (sync's inbound requests and dials on someone's behalf; the node's
//! introductions of patients it holds nothing of). Absent a bucket, it is full.

use std::time::Instant;

/// A token bucket's refill rate and size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: f64,
    /// The bucket's size: what may happen at once.
    pub burst: f64,
}

impl Rate {
    /// `burst` at once, refilled at `per_minute`.
    pub fn per_minute(per_minute: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_minute) / 60.0,
            burst: f64::from(burst),
        }
    }

    /// `burst` at once, refilled at `per_second`.
    pub fn per_second(per_second: u32, burst: u32) -> Self {
        Self {
            per_second: f64::from(per_second),
            burst: f64::from(burst),
        }
    }
}

/// A token bucket, refilled lazily when looked at.
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    /// A full bucket.
    pub fn full(rate: Rate, at: Instant) -> Self {
        Self { tokens: rate.burst, at }
    }

    fn refill(&mut self, rate: Rate, at: Instant) {
        let elapsed = at.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate.per_second).min(rate.burst);
        self.at = at;
    }

    /// Takes one token if there is one.
    pub fn take(&mut self, rate: Rate, at: Instant) -> bool {
        self.refill(rate, at);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Takes one token from each of `a` and `b`, or from neither.
    pub fn take_both(a: (&mut Self, Rate), b: (&mut Self, Rate), at: Instant) -> bool {
        a.0.refill(a.1, at);
        b.0.refill(b.1, at);
        if a.0.tokens < 1.0 || b.0.tokens < 1.0 {
            return false;
        }
        a.0.tokens -= 1.0;
        b.0.tokens -= 1.0;
        true
    }

    /// Whether it is full again (and may be forgotten).
    pub fn is_full(&self, rate: Rate, at: Instant) -> bool {
        let mut b = *self;
        b.refill(rate, at);
        b.tokens >= rate.burst
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_bucket_spends_its_burst_then_refills_at_its_rate() {
        let rate = Rate::per_minute(60, 2);
        let t0 = Instant::now();
        let mut b = Bucket::full(rate, t0);
        assert!(b.take(rate, t0) && b.take(rate, t0));
        assert!(!b.take(rate, t0));
        assert!(b.take(rate, t0 + Duration::from_secs(1)));
        assert!(!b.is_full(rate, t0 + Duration::from_secs(1)));
        assert!(b.is_full(rate, t0 + Duration::from_secs(3)));
    }

    #[test]
    fn both_or_neither() {
        let (small, big) = (Rate::per_minute(0, 1), Rate::per_minute(0, 5));
        let t0 = Instant::now();
        let (mut a, mut b) = (Bucket::full(small, t0), Bucket::full(big, t0));
        assert!(Bucket::take_both((&mut a, small), (&mut b, big), t0));
        assert!(!Bucket::take_both((&mut a, small), (&mut b, big), t0));
        assert!(b.take(big, t0), "b kept its tokens when a was empty");
    }
}
