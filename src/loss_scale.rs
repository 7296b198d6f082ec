//! Dynamic loss scaling for fp16 training, as PyTorch's `torch.amp.GradScaler` does it.
//!
//! fp16 keeps values only down to ~6e-8 (and normal ones to ~6e-5), so many gradients of a
//! language model would flush to zero in an fp16 backward pass. The loss is multiplied by a
//! large scale before the backward pass, which lifts the gradients into fp16's range; they are
//! divided by it again, in fp32, before clipping and AdamW. A scale too large overflows to
//! inf/NaN instead: that step is skipped (weights, moments and EMA untouched) and the scale
//! halved. After `GROWTH_INTERVAL` finite steps in a row it doubles, to stay near the largest
//! scale that fits. The state lives in the checkpoint sidecar, so a resume continues with it.

use serde::{Deserialize, Serialize};

/// GradScaler's defaults: `init_scale=2**16`, `growth_factor=2`, `backoff_factor=0.5`,
/// `growth_interval=2000`.
pub const INITIAL_SCALE: f64 = 65536.0;
pub const GROWTH_INTERVAL: u64 = 2000;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct LossScale {
    /// What the loss is multiplied by before the backward pass.
    pub scale: f64,
    /// Finite steps since the scale last changed.
    pub good_steps: u64,
    /// Steps skipped for overflowing gradients over the whole run.
    pub skipped_steps: u64,
}

impl Default for LossScale {
    fn default() -> Self {
        Self::new(INITIAL_SCALE)
    }
}

impl LossScale {
    pub fn new(scale: f64) -> Self {
        Self {
            scale,
            good_steps: 0,
            skipped_steps: 0,
        }
    }

    /// Records whether this step's unscaled gradients were all finite; returns whether the
    /// optimizer step is to be taken.
    pub fn update(&mut self, finite: bool) -> bool {
        if finite {
            self.good_steps += 1;
            if self.good_steps == GROWTH_INTERVAL {
                self.scale *= 2.0;
                self.good_steps = 0;
            }
        } else {
            self.scale *= 0.5;
            self.good_steps = 0;
            self.skipped_steps += 1;
        }
        finite
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overflow_halves_the_scale_and_a_long_finite_run_doubles_it() {
        let mut s = LossScale::default();
        assert!(!s.update(false));
        assert_eq!((s.scale, s.good_steps, s.skipped_steps), (32768.0, 0, 1));
        for _ in 0..GROWTH_INTERVAL - 1 {
            assert!(s.update(true));
        }
        assert_eq!(s.scale, 32768.0);
        assert!(s.update(true));
        assert_eq!((s.scale, s.good_steps, s.skipped_steps), (65536.0, 0, 1));
        // An overflow restarts the count towards the next growth.
        s.update(true);
        s.update(false);
        assert_eq!((s.scale, s.good_steps), (32768.0, 0));
    }
}
