//! Evaluation: the mean validation loss over the run's fixed validation batches (split over
//! the ranks), the tracked metric it gives, the best value so far and early stopping.

use std::time::Instant;

use anyhow::Result;
use burn::module::Module;
use indicatif::ProgressBar;

use super::{BestMetric, Learner};
use crate::config::Metric;
use crate::metrics::MetricRecord;
use crate::model::LanguageModel;

impl Learner {
    /// Evaluates when `training.eval_every_steps` says so and at `max_steps`; returns (the
    /// tracked metric improved, early stopping says stop), both false without an evaluation.
    pub(super) fn evaluate_if_due(&mut self, bar: &ProgressBar) -> Result<(bool, bool)> {
        let t = &self.config.training;
        if self.step % t.eval_every_steps != 0 && self.step != t.max_steps {
            return Ok((false, false));
        }
        let result = self.eval_and_log(bar)?;
        self.last_eval_step = Some(self.step);
        Ok(result)
    }

    /// Mean validation loss (nats/token) over the fixed validation batches.
    pub fn evaluate(&self) -> f64 {
        let model = self.model().valid();
        let device = self.device.clone().without_autodiff();
        // Each rank evaluates every world-size-th batch; the sums are then added up.
        let mut sums = [0.0, 0.0];
        let (rank, size) = (self.world.rank(), self.world.size());
        for batch in self.val_batches.iter().skip(rank).step_by(size) {
            let (inputs, targets) = batch.to_tensors(&device);
            let loss = model.loss(inputs, targets).into_scalar::<f32>() as f64;
            sums[0] += loss * batch.num_tokens() as f64;
            sums[1] += batch.num_tokens() as f64;
        }
        self.world.sum_f64(&mut sums);
        sums[0] / sums[1]
    }

    /// The tracked metric (`checkpoint.metric`) for an evaluation with this validation loss:
    /// `None` when it has not been measured yet.
    fn tracked_metric(&self, val_loss: f64) -> Option<f64> {
        match self.config.checkpoint.metric {
            Metric::ValLoss => Some(val_loss),
            Metric::ValPerplexity => Some(val_loss.exp()),
            // Before the first log line, the steps taken so far are the window.
            Metric::TrainLoss => self.last_train_loss.or_else(|| self.window.mean_loss()),
        }
    }

    /// Records an evaluation; returns (improved, early stopping says stop). Only a finite
    /// measured value can become the best; any other is reported and counts as an evaluation
    /// without improvement.
    fn record_eval(&mut self, val_loss: f64) -> (bool, bool) {
        let metric = self.config.checkpoint.metric;
        let value = match self.tracked_metric(val_loss) {
            Some(v) if v.is_finite() => Some(v),
            other => {
                tracing::warn!(
                    "step {}: {metric} is {}; it is not taken as a best value",
                    self.step,
                    other.map_or("not measured yet".to_string(), |v| v.to_string())
                );
                None
            }
        };
        let mode = self.config.checkpoint.mode;
        let improved = value.is_some_and(|v| self.best.is_none_or(|b| mode.improves(v, b.value)));
        self.best = match (self.best, value) {
            (_, Some(value)) if improved => Some(BestMetric {
                value,
                step: self.step,
                evals_without_improvement: 0,
            }),
            (Some(b), _) => Some(BestMetric {
                evals_without_improvement: b.evals_without_improvement + 1,
                ..b
            }),
            (None, _) => None,
        };
        let patience = self.config.training.early_stopping_patience;
        let stop = patience > 0 && self.best.is_some_and(|b| b.evals_without_improvement >= patience);
        (improved, stop)
    }


    pub(super) fn eval_and_log(&mut self, bar: &ProgressBar) -> Result<(bool, bool)> {
        let eval_started = Instant::now();
        let val_loss = self.evaluate();
        self.window.exclude(eval_started.elapsed());
        let (improved, stop) = self.record_eval(val_loss);
        self.metrics.append(MetricRecord {
            step: self.step,
            epoch: self.epoch(),
            val_loss: Some(val_loss),
            ..Default::default()
        })?;
        let best = self.best.map_or("n/a".to_string(), |b| format!("{:.4}", b.value));
        let line = format!(
            "step {:>6} | epoch {} | val_loss {val_loss:.4} | best {} {best}",
            self.step,
            self.epoch(),
            self.config.checkpoint.metric,
        );
        if bar.is_hidden() {
            if self.progress {
                eprintln!("{line}");
            }
        } else {
            bar.println(line);
        }
        Ok((improved, stop))
    }
}
