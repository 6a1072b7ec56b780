//! The one RTT estimator of the project (RFC 6298), shared by the reliable channel (RTO, link
//! cost), the client (PoP choice, liveness timeouts) and, through the reliable channel, the relay.

use std::time::Duration;

/// Smoothed RTT and its variation from samples, as RFC 6298 section 2: the first sample `R`
/// gives `SRTT = R`, `RTTVAR = R/2`; each later one `RTTVAR ← 3/4·RTTVAR + 1/4·|SRTT − R|`,
/// then `SRTT ← 7/8·SRTT + 1/8·R` (in this order). Also keeps the smallest sample and a count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RttEstimator {
    srtt: Duration,
    rttvar: Duration,
    min_rtt: Duration,
    samples: u64,
}

impl RttEstimator {
    /// An estimator from its first sample.
    pub fn new(first: Duration) -> RttEstimator {
        RttEstimator {
            srtt: first,
            rttvar: first / 2,
            min_rtt: first,
            samples: 1,
        }
    }

    /// Takes a new sample.
    pub fn update(&mut self, r: Duration) {
        let diff = self.srtt.abs_diff(r);
        self.rttvar = self.rttvar * 3 / 4 + diff / 4;
        self.srtt = self.srtt * 7 / 8 + r / 8;
        self.min_rtt = self.min_rtt.min(r);
        self.samples += 1;
    }

    /// Takes a sample into `slot`, starting the estimator with it if there is none yet.
    pub fn sample(slot: &mut Option<RttEstimator>, r: Duration) {
        match slot {
            Some(e) => e.update(r),
            None => *slot = Some(RttEstimator::new(r)),
        }
    }

    /// Smoothed RTT.
    pub fn srtt(&self) -> Duration {
        self.srtt
    }

    /// RTT variation.
    pub fn rttvar(&self) -> Duration {
        self.rttvar
    }

    /// Smallest sample seen.
    pub fn min_rtt(&self) -> Duration {
        self.min_rtt
    }

    /// Samples taken.
    pub fn samples(&self) -> u64 {
        self.samples
    }

    /// `SRTT + max(granularity, 4·RTTVAR)`: RFC 6298's RTO before clamping, and the time
    /// after which silence from a peer is unusual (`2·SRTT + 4·RTTVAR` is built the same way).
    pub fn rto(&self, granularity: Duration) -> Duration {
        self.srtt + granularity.max(self.rttvar * 4)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn follows_rfc6298() {
        let ms = Duration::from_millis;
        let mut r = RttEstimator::new(ms(100));
        assert_eq!((r.srtt(), r.rttvar()), (ms(100), ms(50)));
        assert_eq!(r.rto(ms(1)), ms(300));
        r.update(ms(60));
        // RTTVAR = 3/4·50 + 1/4·40 = 47.5; SRTT = 7/8·100 + 1/8·60 = 95.
        assert_eq!(r.rttvar(), Duration::from_micros(47_500));
        assert_eq!(r.srtt(), ms(95));
        assert_eq!((r.min_rtt(), r.samples()), (ms(60), 2));
        assert_eq!(r.rto(ms(1)), ms(95 + 190));
        // The clock granularity is the floor of the variation term.
        assert_eq!(RttEstimator::new(Duration::ZERO).rto(ms(2)), ms(2));
        let mut slot = None;
        RttEstimator::sample(&mut slot, ms(10));
        RttEstimator::sample(&mut slot, ms(10));
        assert_eq!(slot.map(|e| (e.srtt(), e.samples())), Some((ms(10), 2)));
    }
}
