//! One optimizer step, in two halves: [`Learner::gradients`] runs this rank's micro-batches
//! forward and backward and sums their gradients, then sums them over the ranks;
//! [`Learner::apply_gradients`] clips them and steps AdamW. fp16's loss scaling sits between
//! the two ([`Learner::train_step`]).

use std::time::Instant;

use anyhow::{Result, bail};
use burn::optim::GradientsParams;

use super::Learner;
use crate::data::Batch;
use crate::model::LanguageModel;
use crate::optim::clip_grad_norm;

impl Learner {
    /// One optimizer step on the global batch `batch`; returns its mean loss and the gradient
    /// norm before clipping (infinite when fp16 loss scaling skipped the step).
    pub fn train_step(&mut self, batch: &Batch) -> Result<(f64, f64)> {
        let (loss, mut grads) = self.gradients(batch)?;
        let Some(scaler) = self.loss_scale else {
            return Ok((loss, self.apply_gradients(grads)));
        };
        // fp16: the gradients are unscaled in fp32 before anything reads them, and a step
        // whose gradients overflowed is skipped.
        crate::optim::scale_grads(self.model(), &mut grads, 1.0 / scaler.scale);
        let norm = crate::optim::grad_norm(self.model(), &grads);
        let scaler = self.loss_scale.as_mut().expect("matched above");
        if !scaler.update(norm.is_finite()) {
            tracing::warn!(
                "step {}: fp16 gradients overflowed at loss scale {}; step skipped, scale now {}",
                self.step + 1,
                scaler.scale * 2.0,
                scaler.scale
            );
            // The batch is consumed and the schedule moves on, as with PyTorch's GradScaler;
            // weights, AdamW's moments and step count, and the EMA are untouched.
            self.step += 1;
            return Ok((loss, f64::INFINITY));
        }
        Ok((loss, self.apply_gradients(grads)))
    }

    /// The mean loss of the global batch `batch` and its gradient (times fp16's loss scale):
    /// this rank's micro-batches of `training.batch_size` windows run forward and backward one
    /// after the other, each on its share of the mean loss, and their gradients are summed (so
    /// only one micro-batch's activations are alive at a time), then summed over the ranks.
    fn gradients(&mut self, batch: &Batch) -> Result<(f64, GradientsParams)> {
        let t = &self.config.training;
        let mut loss_sum = 0.0;
        let mut total: Option<GradientsParams> = None;
        // Rank r takes micro-batches r * grad_accum_steps.. of the global batch.
        let first = self.world.rank() * t.grad_accum_steps;
        let mine = batch.micro_batches(t.batch_size).enumerate().skip(first).take(t.grad_accum_steps);
        for (micro, part) in mine {
            let (inputs, targets) = part.to_tensors(&self.device);
            // Randomness (dropout) is a function of (seed, step, micro-batch), so a resumed
            // run draws the same.
            let loss = self.model().train_loss(inputs, targets, dropout_seed(t.seed, self.step, micro));
            let loss_value = loss.clone().into_scalar::<f32>() as f64;
            if !loss_value.is_finite() {
                bail!(
                    "training loss became {loss_value} at step {}; lower training.learning_rate or \
                     set training.grad_clip",
                    self.step + 1
                );
            }
            // Micro-batches hold equal numbers of tokens but for a global batch's last one.
            let share = part.batch_size as f64 / batch.batch_size as f64;
            loss_sum += loss_value * share;
            let factor = self.loss_scale.map_or(1.0, |s| s.scale) * share;
            let loss = if factor == 1.0 { loss } else { loss.mul_scalar(factor) };
            let grads = GradientsParams::from_grads(loss.backward(), self.model());
            match &mut total {
                None => total = Some(grads),
                Some(acc) => crate::optim::add_grads(self.model(), acc, grads),
            }
        }
        let mut grads = total.expect("every rank has at least one micro-batch");
        if self.world.size() > 1 {
            // The ranks' shares of the mean loss and of its gradient add up to the whole.
            let mut loss = [loss_sum];
            self.world.sum_f64(&mut loss);
            loss_sum = loss[0];
            let started = Instant::now();
            crate::optim::map_flat_grads(self.model(), &mut grads, |flat| self.world.sum_f32(flat));
            self.allreduce_time += started.elapsed();
        }
        Ok((loss_sum, grads))
    }

    /// Clips `grads`, takes one optimizer step at this step's learning rate, updates the EMA
    /// and advances the step counter. Returns the gradient norm before clipping.
    pub fn apply_gradients(&mut self, mut grads: GradientsParams) -> f64 {
        let grad_norm = clip_grad_norm(self.model(), &mut grads, self.config.training.grad_clip);
        let lr = self.schedule.lr(self.step);
        // The optimizer takes the model by value so that tensors no one else holds can be
        // updated in place.
        let model = self.model.take().expect("the model is present between steps");
        let model = self.optim.step(lr, model, grads);
        if let Some(ema) = &mut self.ema {
            ema.update(&model);
        }
        self.model = Some(model);
        self.step += 1;
        grad_norm
    }
}

/// The dropout seed of micro-batch `micro` (its index in the global batch) of step `step`.
fn dropout_seed(seed: u64, step: usize, micro: usize) -> u64 {
    match micro {
        0 => step_seed(seed, step),
        m => step_seed(step_seed(seed, step), m),
    }
}

/// A SplitMix64 mix of the run seed and the step.
fn step_seed(seed: u64, step: usize) -> u64 {
    let mut z = seed
        .wrapping_add(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}
