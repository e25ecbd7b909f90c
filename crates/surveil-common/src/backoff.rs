//! [`Backoff`]: the one reconnect and retry delay every client uses
//! (runner, observer): exponential from a first step, capped, with "equal
//! jitter" so a fleet cut off together does not come back in step.
//!
//! Pure arithmetic: it never sleeps and never reads the clock. The random
//! source is injectable, so tests (and the runner's pure core) get the
//! same delays on every run.

use std::fmt;
use std::time::Duration;

/// A source of numbers in `[0, 1]`; values outside are clamped.
type Random = Box<dyn FnMut() -> f64 + Send>;

/// Exponential backoff with jitter.
///
/// The n-th delay after a reset is drawn from `[step / 2, step]` where
/// `step = min(first · 2ⁿ⁻¹, cap)`: half fixed, so retries never come
/// back-to-back, half random, so clients spread out.
///
/// ```
/// use std::time::Duration;
/// use surveil_common::Backoff;
/// // Always the top of the range: no jitter, for a predictable example.
/// let mut backoff = Backoff::with_random(Duration::from_millis(100), Duration::from_secs(1), || 1.0);
/// let delays: Vec<u128> = (0..5).map(|_| backoff.next_delay().as_millis()).collect();
/// assert_eq!(delays, [100, 200, 400, 800, 1000]);
/// backoff.reset();
/// assert_eq!(backoff.next_delay(), Duration::from_millis(100));
/// ```
pub struct Backoff {
    first: Duration,
    cap: Duration,
    step: Duration,
    random: Random,
}

impl Backoff {
    /// Starts at `first` and doubles up to `cap` (at least `first`), with
    /// jitter from the thread's random generator.
    pub fn new(first: Duration, cap: Duration) -> Self {
        Self::with_random(first, cap, rand::random::<f64>)
    }

    /// [`Backoff::new`] with the jitter drawn from `random` (numbers in
    /// `[0, 1]`): a seeded generator in tests, `|| 1.0` for none.
    pub fn with_random(
        first: Duration,
        cap: Duration,
        random: impl FnMut() -> f64 + Send + 'static,
    ) -> Self {
        // A zero step would never grow: retries would spin.
        let first = first.max(Duration::from_millis(1));
        Backoff {
            first,
            cap: cap.max(first),
            step: first,
            random: Box::new(random),
        }
    }

    /// The delay before the next attempt; each call doubles the step for
    /// the one after, up to the cap.
    pub fn next_delay(&mut self) -> Duration {
        let step = self.step;
        self.step = step.saturating_mul(2).min(self.cap);
        let random = (self.random)();
        let jitter = if random.is_nan() {
            0.0
        } else {
            random.clamp(0.0, 1.0)
        };
        let half = step / 2;
        half + (step - half).mul_f64(jitter)
    }

    /// Back to the first step, after a success.
    pub fn reset(&mut self) {
        self.step = self.first;
    }
}

impl fmt::Debug for Backoff {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backoff")
            .field("first", &self.first)
            .field("cap", &self.cap)
            .field("step", &self.step)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn grows_exponentially_is_capped_and_resets() {
        let mut b = Backoff::with_random(100 * MS, 3000 * MS, || 1.0);
        let top: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert_eq!(
            top,
            [100, 200, 400, 800, 1600, 3000, 3000, 3000].map(|ms| ms * MS)
        );
        b.reset();
        assert_eq!(b.next_delay(), 100 * MS);

        let mut b = Backoff::with_random(100 * MS, 3000 * MS, || 0.0);
        let bottom: Vec<Duration> = (0..7).map(|_| b.next_delay()).collect();
        assert_eq!(
            bottom,
            [50, 100, 200, 400, 800, 1500, 1500].map(|ms| ms * MS)
        );
    }

    #[test]
    fn jitter_stays_in_the_upper_half_of_the_step_even_for_bad_randomness() {
        let mut values = [0.25, -3.0, 7.0, f64::NAN, 0.5].into_iter().cycle();
        let mut b = Backoff::with_random(200 * MS, 200 * MS, move || values.next().unwrap());
        let got: Vec<Duration> = (0..5).map(|_| b.next_delay()).collect();
        assert_eq!(got, [125, 100, 200, 100, 150].map(|ms| ms * MS));
    }

    #[test]
    fn random_jitter_is_within_bounds() {
        let mut b = Backoff::new(100 * MS, 1000 * MS);
        let mut step = 100 * MS;
        for _ in 0..50 {
            let d = b.next_delay();
            assert!(
                d >= step / 2 && d <= step,
                "{d:?} outside [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(1000 * MS);
        }
    }

    #[test]
    fn degenerate_bounds_still_back_off() {
        let mut b = Backoff::with_random(Duration::ZERO, Duration::ZERO, || 1.0);
        assert_eq!(b.next_delay(), MS);
        assert_eq!(b.next_delay(), MS, "capped at the first step");
        let mut b = Backoff::with_random(500 * MS, 100 * MS, || 1.0);
        assert_eq!(
            b.next_delay(),
            500 * MS,
            "the cap is at least the first step"
        );
        assert_eq!(b.next_delay(), 500 * MS);
    }
}
