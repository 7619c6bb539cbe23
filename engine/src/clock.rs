//! The wall clock of real runs: the only place in the workspace that reads the OS clock.

use std::time::{Duration, Instant};

use sim::time::{Clock, SimTime};

/// Nanoseconds since the run started, from a monotonic OS clock. `advance_to` waits (sleeping for
/// most of the gap, then spinning for the last stretch, so a prefetch timer fires on time).
#[derive(Debug, Clone)]
pub struct WallClock {
    start: Instant,
}

/// Below this gap `advance_to` spins instead of sleeping (OS sleeps overshoot by tens of us).
const SPIN_BELOW: Duration = Duration::from_micros(200);

impl WallClock {
    pub fn start() -> Self {
        Self::from_epoch(Instant::now())
    }

    /// A clock whose zero is `epoch`: give the swap engine the same epoch, so its copy times and
    /// the run loop's step times are on one time line.
    pub fn from_epoch(epoch: Instant) -> Self {
        WallClock { start: epoch }
    }

    pub fn epoch(&self) -> Instant {
        self.start
    }
}

impl Clock for WallClock {
    fn now(&self) -> SimTime {
        SimTime(self.start.elapsed().as_nanos().min(u64::MAX as u128) as u64)
    }

    fn advance_to(&mut self, to: SimTime) {
        loop {
            let now = self.now();
            if now >= to {
                return;
            }
            let gap = Duration::from_nanos(to.0 - now.0);
            if gap > SPIN_BELOW {
                std::thread::sleep(gap - SPIN_BELOW);
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wall_clock_is_monotonic_and_waits_until_the_target() {
        let mut clock = WallClock::start();
        let a = clock.now();
        let target = a + 2_000_000;
        clock.advance_to(target);
        let b = clock.now();
        assert!(b >= target, "advance_to returned early: {b} < {target}");
        clock.advance_to(a);
        assert!(clock.now() >= b, "time never goes backwards");
    }
}
