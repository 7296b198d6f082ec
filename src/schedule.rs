//! Learning-rate schedule: linear warmup to the peak, cosine decay to `min_lr`, then flat.
//!
//! The schedule is a pure function of the step, so its whole state is the step number.

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WarmupCosine {
    pub peak_lr: f64,
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// Step at which the cosine reaches `min_lr`.
    pub decay_steps: usize,
}

impl WarmupCosine {
    /// Learning rate for optimizer step `step` (0-based: the first update uses `lr(0)`).
    /// As in nanoGPT, warmup reaches the peak at step `warmup_steps`: `lr(i) = peak * (i+1)/(warmup+1)`.
    pub fn lr(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.peak_lr * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        if step >= self.decay_steps {
            return self.min_lr;
        }
        let progress =
            (step - self.warmup_steps) as f64 / (self.decay_steps - self.warmup_steps) as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.min_lr + cosine * (self.peak_lr - self.min_lr)
    }
}
