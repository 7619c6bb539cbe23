//! Simulated time: integer nanoseconds, never floating point, so sums are exact and repeatable.

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

use serde::{Deserialize, Serialize};

/// A point in simulated (or, for the engine, wall) time, in nanoseconds since the run started.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct SimTime(pub u64);

impl SimTime {
    pub const ZERO: SimTime = SimTime(0);
    pub const MAX: SimTime = SimTime(u64::MAX);

    pub fn from_secs_f64(secs: f64) -> SimTime {
        debug_assert!(
            secs.is_finite() && secs >= 0.0,
            "time must be finite and >= 0: {secs}"
        );
        SimTime((secs * 1e9).round().clamp(0.0, u64::MAX as f64) as u64)
    }

    pub fn from_millis(ms: u64) -> SimTime {
        SimTime(ms * 1_000_000)
    }

    pub fn as_nanos(self) -> u64 {
        self.0
    }

    pub fn as_secs_f64(self) -> f64 {
        self.0 as f64 / 1e9
    }

    pub fn saturating_sub(self, other: SimTime) -> SimTime {
        SimTime(self.0.saturating_sub(other.0))
    }
}

impl Add<u64> for SimTime {
    type Output = SimTime;
    fn add(self, nanos: u64) -> SimTime {
        SimTime(self.0.saturating_add(nanos))
    }
}

impl AddAssign<u64> for SimTime {
    fn add_assign(&mut self, nanos: u64) {
        self.0 = self.0.saturating_add(nanos);
    }
}

impl Sub for SimTime {
    type Output = u64;
    fn sub(self, other: SimTime) -> u64 {
        debug_assert!(self >= other, "time went backwards: {self} - {other}");
        self.0.saturating_sub(other.0)
    }
}

impl fmt::Display for SimTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.6}s", self.as_secs_f64())
    }
}

/// Where the run loop reads "now". The simulator's clock is virtual and moves only when the run
/// loop advances it; the engine's wall clock reads the OS (that implementation lives in `engine`,
/// the only crate allowed to read the OS clock).
pub trait Clock {
    fn now(&self) -> SimTime;
    /// Moves the clock forward to `to` (virtual) or waits until then (wall). Never moves backwards.
    fn advance_to(&mut self, to: SimTime);
}

/// The simulator's clock: time is whatever the run loop last set.
#[derive(Clone, Debug, Default)]
pub struct VirtualClock {
    now: SimTime,
}

impl Clock for VirtualClock {
    fn now(&self) -> SimTime {
        self.now
    }

    fn advance_to(&mut self, to: SimTime) {
        assert!(
            to >= self.now,
            "virtual clock moved backwards: {} -> {}",
            self.now,
            to
        );
        self.now = to;
    }
}
