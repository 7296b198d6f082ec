//! kiln's `Learner`: the training loop, read top to bottom in [`Learner::fit`], over small
//! parts each in its own file:
//!
//! - `setup.rs`: building a run (lock, tokenizer, prepared data, model, optimizer, metrics
//!   file), fresh, fine-tuned or resumed;
//! - `step.rs`: one optimizer step, split into computing the gradients (micro-batches summed,
//!   then all-reduced over the ranks) and applying them (clipping, fp16 loss scaling, AdamW,
//!   EMA), so accumulation and the all-reduce sit between the two;
//! - `evaluation.rs`: validation loss, the tracked metric, early stopping;
//! - `checkpointing.rs`: the policy's saves, the snapshot a checkpoint holds, restoring one,
//!   and the ModelSaver's bundles;
//! - `logging.rs`: the log window behind `metrics.jsonl`, the progress bar, the loss curve.
//!
//! The loop is kiln's own rather than Burn's `SupervisedTraining` because a run must be
//! resumable at any step: the whole state of a run is the model, the optimizer moments (and
//! EMA weights), and a handful of numbers (step, data position, best metric), and randomness is
//! derived from `(seed, step)` instead of living in a backend's global RNG.

mod checkpointing;
mod evaluation;
mod logging;
mod setup;
mod step;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};
use burn::tensor::Device;

use crate::checkpoint::CheckpointManager;
use crate::checkpoint::policy::Progress;
use crate::config::Config;
use crate::data::{Batch, DataPosition, TrainLoader};
use crate::distributed::World;
use crate::ema::Ema;
use crate::loss_scale::LossScale;
use crate::metrics::MetricsLog;
use crate::model::{ArchConfig, CausalLm};
use crate::optim::AdamW;
use crate::schedule::WarmupCosine;
use crate::tokenizer::KilnTokenizer;

use logging::LogWindow;

/// Best value of the tracked metric so far, and early-stopping bookkeeping.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BestMetric {
    pub value: f64,
    pub step: usize,
    /// Evaluations since `value` last improved.
    pub evals_without_improvement: usize,
}

/// Why a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    MaxSteps,
    Epochs,
    EarlyStopping,
    /// Ctrl-C / SIGTERM (or `stop_after_step`): `checkpoint_latest` was saved.
    Interrupted,
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps: usize,
    pub epochs_completed: usize,
    pub final_train_loss: Option<f64>,
    pub final_val_loss: Option<f64>,
    pub best: Option<BestMetric>,
    pub stop_reason: StopReason,
    pub wall_seconds: f64,
    pub output_dir: PathBuf,
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Installs the Ctrl-C / SIGTERM handler: the first signal lets the step in progress finish,
/// saves `checkpoint_latest` and exits cleanly; a second one exits at once (checkpoints on
/// disk stay intact either way, as every save is crash-safe).
pub fn install_signal_handler() -> Result<()> {
    ctrlc::set_handler(|| {
        if INTERRUPTED.swap(true, Ordering::SeqCst) {
            eprintln!("kiln: second interrupt, exiting without saving");
            std::process::exit(130);
        }
        eprintln!("kiln: interrupt received; finishing the step and saving checkpoint_latest");
    })
    .context("cannot install the Ctrl-C handler")
}

pub struct Learner {
    pub config: Config,
    pub tokenizer: KilnTokenizer,
    /// The tokenizer as saved in every checkpoint sidecar (serialized once).
    tokenizer_json: serde_json::Value,
    /// The architecture being trained, as its Hugging Face `config.json`.
    pub arch: ArchConfig,
    /// The autodiff device training runs on.
    pub device: Device,
    /// Absent only for the instant an optimizer step holds it (see [`Learner::model`]).
    model: Option<CausalLm>,
    pub optim: AdamW,
    pub ema: Option<Ema>,
    pub schedule: WarmupCosine,
    pub loader: TrainLoader,
    val_batches: Vec<Batch>,
    /// Optimizer steps completed.
    pub step: usize,
    pub best: Option<BestMetric>,
    pub metrics: MetricsLog,
    pub checkpoints: CheckpointManager,
    /// Show a progress bar (off in tests and when stderr is not a terminal).
    pub progress: bool,
    /// Behave as if interrupted once this step completes (tests and tooling).
    pub stop_after_step: Option<usize>,
    /// fp16's dynamic loss scale (`None` in fp32 and bf16, whose range needs none).
    pub loss_scale: Option<LossScale>,
    /// Mean training loss over the most recent log window.
    last_train_loss: Option<f64>,
    /// Losses of the steps since the last `metrics.jsonl` line (saved in checkpoints, so a
    /// resumed run logs the same means).
    window: LogWindow,
    data_sha256: String,
    /// When the run first started, and training seconds of earlier sessions (for resumes).
    started_at: String,
    train_seconds_before: f64,
    fit_started: Option<Instant>,
    /// Steps of this session's last evaluation and last save: the end of a run adds neither
    /// twice.
    last_eval_step: Option<usize>,
    last_save_step: Option<usize>,
    /// Time the step in progress has spent in the gradient all-reduce (zero in a world of one).
    allreduce_time: std::time::Duration,
    /// Step of the best checkpoint last exported as a bundle.
    exported_best_step: Option<usize>,
    /// Bundles written by the ModelSaver during this session.
    pub exported: Vec<PathBuf>,
    /// The processes training this run together (a world of one unless launched by MPI).
    pub world: Arc<World>,
    /// Held by rank 0 for the lifetime of the run; a second trainer on the same directory fails
    /// to take it.
    _lock: Option<File>,
}

impl Learner {
    /// Prepares a fresh run: tokenizer, data, model and optimizer.
    pub fn new(config: Config) -> Result<Self> {
        Self::new_in(config, None, Arc::new(World::single()))
    }

    /// Prepares a run that continues from a checkpoint (any of its three files).
    pub fn resume(config: Config, checkpoint: &Path) -> Result<Self> {
        Self::new_in(config, Some(checkpoint), Arc::new(World::single()))
    }

    /// Prepares this process's part of a run trained by `world`: fresh, or continuing from
    /// `resume`. Rank 0 sets up first (it takes the lock, prepares the data, writes the run's
    /// files) and the other ranks after it, finding everything in place and writing nothing.
    pub fn new_in(config: Config, resume: Option<&Path>, world: Arc<World>) -> Result<Self> {
        world.clone().leader_first(|| Self::build(config, resume, world))
    }

    /// The model being trained.
    pub fn model(&self) -> &CausalLm {
        self.model
            .as_ref()
            .expect("the model is only taken out during an optimizer step")
    }

    pub fn epoch(&self) -> usize {
        self.loader.position().epoch
    }

    pub fn data_position(&self) -> DataPosition {
        self.loader.position()
    }

    /// The prepared dataset the run trains on.
    pub fn dataset_dir(&self) -> &Path {
        &self.loader.corpus().dataset().dir
    }

    /// Runs the loop until `max_steps`, the last epoch, early stopping or an interrupt; saves
    /// checkpoints as the policy says and `checkpoint_latest` at the end.
    pub fn fit(&mut self) -> Result<TrainSummary> {
        let started = Instant::now();
        let bar = self.progress_bar();
        self.window.restart_clock();
        self.fit_started = Some(started);
        let mut final_train_loss = None;

        let stop_reason = loop {
            // A signal to any rank stops all of them at the same step.
            if self.world.any(INTERRUPTED.load(Ordering::SeqCst)) {
                break StopReason::Interrupted;
            }
            if self.step >= self.config.training.max_steps {
                break StopReason::MaxSteps;
            }
            let Some(batch) = self.loader.next_batch() else {
                if self.end_epoch()? {
                    break StopReason::Epochs;
                }
                continue;
            };
            final_train_loss = Some(self.step_and_log(&batch, &bar)?);
            // A background save that failed stops the run at the next step, not the next save.
            self.checkpoints.poll()?;
            let (improved, stop_early) = self.evaluate_if_due(&bar)?;
            self.save_if_due(Progress { step: self.step, improved, ..Default::default() })?;
            if stop_early {
                break StopReason::EarlyStopping;
            }
            if self.stop_after_step == Some(self.step) {
                break StopReason::Interrupted;
            }
        };
        self.finish(stop_reason, &bar)?;
        Ok(TrainSummary {
            steps: self.step,
            epochs_completed: self.epoch(),
            final_train_loss,
            final_val_loss: self.metrics.history.iter().rev().find_map(|r| r.val_loss),
            best: self.best,
            stop_reason,
            wall_seconds: started.elapsed().as_secs_f64(),
            output_dir: self.config.output_dir.clone(),
        })
    }

    /// The loader ran out of the epoch's batches: saves what the policy keeps per epoch, starts
    /// the next epoch and exports a new best. Returns whether that was the last epoch.
    fn end_epoch(&mut self) -> Result<bool> {
        let completed = self.epoch() + 1;
        self.loader.start_epoch(completed);
        self.save_if_due(Progress { step: self.step, epoch_completed: Some(completed), ..Default::default() })?;
        if completed >= self.config.training.epochs {
            return Ok(true);
        }
        if self.world.is_leader() {
            self.export_bundles(false)?;
        }
        Ok(false)
    }

    /// The end of a run: a finished run ends on an evaluation and a save (an interrupted one
    /// only saves), then rank 0 writes the loss curve and the final bundles while the others
    /// wait, so that no rank exits before everything is written.
    fn finish(&mut self, stop_reason: StopReason, bar: &indicatif::ProgressBar) -> Result<()> {
        let mut improved = false;
        if stop_reason != StopReason::Interrupted && self.last_eval_step != Some(self.step) && self.step > 0 {
            (improved, _) = self.eval_and_log(bar)?;
        }
        if self.last_save_step != Some(self.step) || improved {
            self.save_if_due(Progress { step: self.step, improved, ending: true, ..Default::default() })?;
        }
        self.checkpoints.wait()?;
        bar.finish_and_clear();
        if self.world.is_leader() {
            self.write_loss_curve()?;
            if stop_reason != StopReason::Interrupted {
                self.export_bundles(true)?;
            }
        }
        self.world.barrier();
        Ok(())
    }

    /// Seconds spent in `fit` over all sessions of this run.
    pub fn train_seconds(&self) -> f64 {
        self.train_seconds_before + self.fit_started.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }
}
