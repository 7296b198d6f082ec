//! What a run reports: the log window behind each `metrics.jsonl` line (mean loss, gradient
//! norm, throughput, fp16's skipped steps), the progress bar, and the loss curve.

use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};

use super::Learner;
use crate::checkpoint::sidecar::LogWindowState;
use crate::data::Batch;
use crate::metrics::MetricRecord;
use crate::plot::loss_curve_svg;

impl Learner {
    /// One optimizer step on `batch`, added to the log window and the progress bar, and a
    /// `metrics.jsonl` line every `training.log_every_steps`. Returns the step's loss.
    pub(super) fn step_and_log(&mut self, batch: &Batch, bar: &ProgressBar) -> Result<f64> {
        let lr = self.schedule.lr(self.step);
        let skipped_before = self.loss_scale.map(|s| s.skipped_steps);
        let (loss, grad_norm) = self.train_step(batch)?;
        let skipped = self.loss_scale.map(|s| s.skipped_steps) != skipped_before;
        let allreduce = std::mem::take(&mut self.allreduce_time);
        self.window.add(loss, (!skipped).then_some(grad_norm), batch.num_tokens(), allreduce);
        bar.set_position(self.step as u64);
        bar.set_message(format!("loss {loss:.4} | lr {lr:.2e} | {:.0} tok/s | epoch {}", self.window.tokens_per_sec(), self.epoch()));
        if self.step % self.config.training.log_every_steps == 0 {
            let mut record = self.window.take(self.step, self.epoch(), lr);
            if let Some(scaler) = &self.loss_scale {
                record.loss_scale = Some(scaler.scale);
                record.skipped_steps.get_or_insert(0);
            }
            self.last_train_loss = record.train_loss;
            self.metrics.append(record)?;
        }
        Ok(loss)
    }

    pub(super) fn progress_bar(&self) -> ProgressBar {
        if !self.progress {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(self.config.training.max_steps as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30.cyan/blue}] {pos}/{len} {msg} | ETA {eta}",
            )
            .expect("the template is valid")
            .progress_chars("=> "),
        );
        bar.set_position(self.step as u64);
        bar
    }

    /// Writes `loss_curve.svg` into the output directory.
    pub fn write_loss_curve(&self) -> Result<()> {
        let path = self.config.output_dir.join("loss_curve.svg");
        if let Some(svg) = loss_curve_svg(&self.metrics.history, "kiln: loss curve") {
            std::fs::write(&path, svg)
                .with_context(|| format!("cannot write {}", path.display()))?;
        }
        Ok(())
    }
}

/// Training-loss and throughput accumulator between two log lines.
#[derive(Debug)]
pub(super) struct LogWindow {
    loss_sum: f64,
    grad_norm_sum: f64,
    steps: usize,
    /// Steps skipped by fp16 loss scaling, which have no gradient norm.
    skipped: u64,
    tokens: usize,
    allreduce: std::time::Duration,
    started: Instant,
    excluded: std::time::Duration,
}

impl LogWindow {
    pub(super) fn new() -> Self {
        Self {
            loss_sum: 0.0,
            grad_norm_sum: 0.0,
            steps: 0,
            skipped: 0,
            tokens: 0,
            allreduce: std::time::Duration::ZERO,
            started: Instant::now(),
            excluded: std::time::Duration::ZERO,
        }
    }

    pub(super) fn from_state(state: LogWindowState) -> Self {
        Self {
            loss_sum: state.loss_sum,
            grad_norm_sum: state.grad_norm_sum,
            steps: state.steps,
            skipped: state.skipped,
            ..Self::new()
        }
    }

    pub(super) fn state(&self) -> LogWindowState {
        LogWindowState {
            loss_sum: self.loss_sum,
            grad_norm_sum: self.grad_norm_sum,
            steps: self.steps,
            skipped: self.skipped,
        }
    }

    /// Throughput counts from here (e.g. the start of `fit`, not of set-up).
    pub(super) fn restart_clock(&mut self) {
        self.started = Instant::now();
        self.tokens = 0;
        self.excluded = std::time::Duration::ZERO;
    }

    /// One step's loss, gradient norm (`None`: skipped by fp16 loss scaling), tokens and time
    /// in the all-reduce.
    pub(super) fn add(&mut self, loss: f64, grad_norm: Option<f64>, tokens: usize, allreduce: std::time::Duration) {
        self.allreduce += allreduce;
        self.loss_sum += loss;
        match grad_norm {
            Some(norm) => self.grad_norm_sum += norm,
            None => self.skipped += 1,
        }
        self.steps += 1;
        self.tokens += tokens;
    }

    /// Time spent outside training (evaluation) does not count against throughput.
    pub(super) fn exclude(&mut self, d: std::time::Duration) {
        self.excluded += d;
    }

    /// Mean training loss of the steps in this window, if any.
    pub(super) fn mean_loss(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.loss_sum / self.steps as f64)
    }

    pub(super) fn tokens_per_sec(&self) -> f64 {
        let secs = (self.started.elapsed().saturating_sub(self.excluded)).as_secs_f64();
        if secs > 0.0 { self.tokens as f64 / secs } else { 0.0 }
    }

    pub(super) fn take(&mut self, step: usize, epoch: usize, lr: f64) -> MetricRecord {
        let n = self.steps.max(1) as f64;
        let taken = self.steps as u64 - self.skipped;
        let record = MetricRecord {
            step,
            epoch,
            train_loss: Some(self.loss_sum / n),
            lr: Some(lr),
            tokens_per_sec: Some(self.tokens_per_sec()),
            grad_norm: (taken > 0).then(|| self.grad_norm_sum / taken as f64),
            skipped_steps: (self.skipped > 0).then_some(self.skipped),
            allreduce_seconds: (!self.allreduce.is_zero()).then(|| self.allreduce.as_secs_f64() / n),
            ..Default::default()
        };
        *self = Self::new();
        record
    }
}
