//! A token bucket for log lines the workload can trigger (every refusal):
//! a burst, then a steady rate; what is held back is counted and reported
//! with the next line that goes out.
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct RateLimit {
    per_second: u32,
    burst: u32,
    tokens: u32,
    last: Option<Instant>,
    suppressed: u64,
}

impl RateLimit {
    pub fn new(per_second: u32, burst: u32) -> RateLimit {
        RateLimit {
            per_second: per_second.max(1),
            burst: burst.max(1),
            tokens: burst.max(1),
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(n)` when a line may go out now, `n` being how many were held
    /// back since the last one; `None` when this one is held back.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let last = *self.last.get_or_insert(now);
        let elapsed = now.saturating_duration_since(last);
        let step = Duration::from_secs(1) / self.per_second;
        let earned = elapsed.as_nanos() / step.as_nanos().max(1);
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            self.tokens = self.tokens.saturating_add(earned).min(self.burst);
            self.last = Some(last + step * earned.min(self.burst));
            if self.tokens == self.burst {
                self.last = Some(now);
            }
        }
        if self.tokens == 0 {
            self.suppressed += 1;
            return None;
        }
        self.tokens -= 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut r = RateLimit::new(10, 3);
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0), Some(0));
        assert_eq!(r.allow(t0), Some(0));
        for _ in 0..100 {
            assert_eq!(r.allow(t0), None);
        }
        // One token every 100 ms: the next line reports the 100 held back.
        assert_eq!(r.allow(t0 + Duration::from_millis(50)), None);
        assert_eq!(r.allow(t0 + Duration::from_millis(100)), Some(101));
        assert_eq!(r.allow(t0 + Duration::from_millis(150)), None);
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert!(r.allow(later).is_some());
        assert!(r.allow(later).is_some());
        assert!(r.allow(later).is_some());
        assert_eq!(r.allow(later), None);
    }
}
