//! kiln's `Learner`: owns the step loop (forward, backward, clipping, AdamW, schedule),
//! periodic evaluation, early stopping, metric logging and checkpointing.
//!
//! The loop is kiln's own rather than Burn's `SupervisedTraining` because a run must be
//! resumable at any step: the whole state of a run is the model, the optimizer moments (and
//! EMA weights), and a handful of numbers (step, data position, best metric), and randomness is
//! derived from `(seed, step)` instead of living in a backend's global RNG.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::module::Module;
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor};
use indicatif::{ProgressBar, ProgressStyle};

use crate::backend;
use crate::checkpoint::policy::{Policy, Progress};
use crate::checkpoint::sidecar::{
    BURN_VERSION, BestMetricState, EarlyStoppingState, FORMAT_VERSION, KindLabel,
    LogWindowState, OptimizerState, RngState, ScheduleState, Sidecar,
};
use crate::checkpoint::storage::LocalFs;
use crate::checkpoint::{self, CheckpointManager, LoadedCheckpoint, Snapshot};
use crate::config::{BackendKind, Config, DataConfig, Metric, Precision};
use crate::data::{Batch, Corpus, DataPosition, TrainLoader, validation_batches};
use crate::distributed::World;
use crate::dataset::{Dataset, TOKENIZER_FILE};
use crate::prepare::{self, TokenizerChoice};
use crate::ema::Ema;
use crate::metrics::{MetricRecord, MetricsLog};
use crate::model::{ArchConfig, CausalLm, HfLayout, LanguageModel};
use crate::pretrained::{self, LoadOptions};
use crate::loss_scale::LossScale;
use crate::optim::{AdamW, AdamWConfig, clip_grad_norm};
use crate::params::{self, pending};
use crate::plot::loss_curve_svg;
use crate::resume::{check_same_shape, restore_tensors};
use crate::safetensors_io::PendingTensor;
use crate::schedule::WarmupCosine;
use crate::tokenizer::KilnTokenizer;

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

    fn build(config: Config, resume: Option<&Path>, world: Arc<World>) -> Result<Self> {
        let out = config.output_dir.clone();
        let leader = world.is_leader();
        std::fs::create_dir_all(&out)
            .with_context(|| format!("cannot create output directory {}", out.display()))?;
        let lock = if leader { Some(lock_output_dir(&out)?) } else { None };
        let checkpoints = CheckpointManager::open(
            &config.checkpoint_dir(),
            policy(&config),
            Arc::new(LocalFs),
            config.checkpoint.async_save,
        )?;
        // A fresh run must not mix its checkpoints (and top-K rotation) with an earlier run's.
        if resume.is_none() && !checkpoint::list(checkpoints.dir())?.is_empty() {
            bail!(
                "{} already holds checkpoints of an earlier run; continue it with --resume {}, \
                 or start a new run in another output_dir (--output-dir DIR)",
                checkpoints.dir().display(),
                checkpoints.dir().join("checkpoint_latest.safetensors").display()
            );
        }
        // The checkpoint's files are hashed in the background from here on; its tensors are read
        // meanwhile, and verified before anything of this run is written.
        let mut resume = match resume {
            Some(p) => {
                let ck = checkpoint::open(p).with_context(|| format!("cannot resume from {}", p.display()))?;
                Some((ck, p))
            }
            None => None,
        };

        let t = &config.training;
        let device = backend::device(t.backend)?;
        check_precision(t.precision, t.backend, &device)?;
        let device = device.autodiff();
        // Fine-tuning starts from a pretrained directory's weights, architecture and tokenizer.
        let pretrained = match (&resume, &config.model.init_from) {
            (None, Some(dir)) => {
                let mut options = LoadOptions::with_rules(&config.model.init_key_map)?;
                options.allow_partial = config.model.init_allow_partial;
                let p = pretrained::load(dir, &device, &options)
                    .with_context(|| format!("model.init_from = {}", dir.display()))?;
                if p.tokenizer.is_none() {
                    bail!("model.init_from = {} has no tokenizer.json to tokenize the corpus with", dir.display());
                }
                Some(p)
            }
            _ => None,
        };
        // A resume keeps the checkpoint's tokenizer and a fine-tune the pretrained one; a run
        // from scratch trains one on the sources while preparing them.
        let configured = TokenizerChoice::from_config(&config.data)?;
        let given = match (&resume, &pretrained) {
            (Some((ck, _)), _) => {
                let s = &ck.sidecar;
                Some(KilnTokenizer::from_json(&s.tokenizer.to_string(), s.special_tokens.clone()).context("the checkpoint's tokenizer")?)
            }
            (None, Some(p)) => Some(p.tokenizer.clone().expect("checked above")),
            (None, None) => match &configured {
                TokenizerChoice::Given(tokenizer) => Some(tokenizer.clone()),
                TokenizerChoice::Train { .. } => None,
            },
        };
        let dataset_dir = prepared_dataset(&config.data, &configured, given.as_ref())?;
        let dataset = Dataset::open(&dataset_dir)?;
        let tokenizer = match given {
            Some(t) => t,
            None => KilnTokenizer::from_file(&dataset_dir.join(TOKENIZER_FILE))?,
        };
        let data_sha256 = dataset.content_sha256();

        let (arch, model) = match (pretrained, &resume) {
            (Some(p), _) => {
                check_seq_len(&config, &p.arch, "the pretrained model's")?;
                (p.arch, p.model.with_dropout(config.model.dropout))
            }
            (None, Some((ck, _))) => {
                // A resume continues the checkpoint's architecture. A fine-tune took it from
                // `init_from` (the `[model]` shape keys are ignored there); a run from scratch
                // took it from `[model]`, which must still describe it rather than be ignored.
                let arch = ck.sidecar.model.clone();
                if config.model.init_from.is_none() {
                    check_same_shape(&arch, &ArchConfig::new(&config.model, tokenizer.vocab_size()))?;
                }
                check_seq_len(&config, &arch, "the checkpoint's")?;
                // Every weight is about to be replaced by the checkpoint's.
                let model = CausalLm::for_loading(&arch, config.model.dropout, &device);
                (arch, model)
            }
            (None, None) => {
                let arch = ArchConfig::new(&config.model, tokenizer.vocab_size());
                let model = CausalLm::init(
                    &arch,
                    config.model.initializer_range,
                    config.model.dropout,
                    t.seed,
                    &device,
                );
                (arch, model)
            }
        };
        let (model, restored) = match &mut resume {
            Some((ck, path)) => {
                let restored = restore_tensors(ck, model, t.ema_decay.is_some(), &device)
                    .with_context(|| format!("cannot resume from {}", path.display()))?;
                (restored.model, Some((restored.moments, restored.ema)))
            }
            None => (model, None),
        };
        let model = model.with_compute_dtype(t.precision.dtype());

        if leader {
            std::fs::write(out.join("config.toml"), config.to_toml_string())
                .with_context(|| format!("cannot write {}", out.join("config.toml").display()))?;
            tokenizer.save(&out.join("tokenizer.json"))?;
        }
        if dataset.manifest.vocab_size != tokenizer.vocab_size() {
            bail!("{}: prepared with a vocabulary of {} tokens, but the tokenizer has {}", dataset_dir.display(), dataset.manifest.vocab_size, tokenizer.vocab_size());
        }
        let corpus = Arc::new(Corpus::new(dataset, config.data.train_weights(), config.data.val_fraction, config.data.seq_len)?);
        // The loader serves global batches; validation holds `eval_batches` of them, evaluated
        // `batch_size` windows at a time, so both are the same however a step is split.
        let loader = TrainLoader::new(corpus.clone(), config.data.seq_len, t.global_batch() * world.size(), t.seed)?;
        let val_batches = validation_batches(&corpus, config.data.seq_len, t.batch_size, t.eval_batches * t.grad_accum_steps * world.size());

        let optim = AdamW::new(AdamWConfig {
            beta1: t.beta1,
            beta2: t.beta2,
            eps: t.eps,
            weight_decay: t.weight_decay,
        });
        let schedule = WarmupCosine {
            peak_lr: t.learning_rate,
            min_lr: t.min_lr,
            warmup_steps: t.warmup_steps,
            decay_steps: t.lr_decay_steps(),
        };
        let ema = t.ema_decay.map(Ema::new);
        let metrics_path = out.join("metrics.jsonl");
        let history = resume.as_ref().map(|(ck, _)| ck.sidecar.metrics_history.clone());
        // Only rank 0 writes `metrics.jsonl`; every rank keeps the history its sidecar needs.
        let metrics = match history {
            Some(history) if !leader => MetricsLog::in_memory(history),
            None if !leader => MetricsLog::in_memory(Vec::new()),
            Some(history) => MetricsLog::resume(&metrics_path, history)?,
            None => MetricsLog::create(&metrics_path)?,
        };
        let tokenizer_json = serde_json::from_str(&tokenizer.to_json()?)
            .context("the tokenizer's own JSON does not parse")?;
        let loss_scale = (t.precision == Precision::Fp16).then(LossScale::default);
        let mut learner = Self {
            config,
            tokenizer,
            tokenizer_json,
            arch,
            device,
            model: Some(model),
            optim,
            ema,
            schedule,
            loader,
            val_batches,
            step: 0,
            best: None,
            metrics,
            checkpoints,
            progress: false,
            stop_after_step: None,
            loss_scale,
            last_train_loss: None,
            window: LogWindow::new(),
            data_sha256,
            started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            train_seconds_before: 0.0,
            fit_started: None,
            exported_best_step: None,
            exported: Vec::new(),
            world,
            _lock: lock,
        };
        if let (Some((ck, _)), Some((moments, ema))) = (resume, restored) {
            learner.optim.moments = moments;
            if let (Some(learner_ema), Some(weights)) = (&mut learner.ema, ema) {
                learner_ema.weights = weights;
            }
            learner.restore(&ck.sidecar)?;
        }
        Ok(learner)
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
    fn gradients(&self, batch: &Batch) -> Result<(f64, GradientsParams)> {
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
            crate::optim::map_flat_grads(self.model(), &mut grads, |flat| self.world.sum_f32(flat));
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

    /// Runs the loop until `max_steps`, the last epoch, early stopping or an interrupt; saves
    /// checkpoints as the policy says and `checkpoint_latest` at the end.
    pub fn fit(&mut self) -> Result<TrainSummary> {
        let started = Instant::now();
        let t = self.config.training.clone();
        let bar = self.progress_bar();
        self.window.restart_clock();
        self.fit_started = Some(started);
        let mut last_eval_step = None;
        let mut last_save_step = None;
        let mut final_train_loss = None;

        let stop_reason = loop {
            // A signal to any rank stops all of them at the same step.
            if self.world.any(INTERRUPTED.load(Ordering::SeqCst)) {
                break StopReason::Interrupted;
            }
            if self.step >= t.max_steps {
                break StopReason::MaxSteps;
            }
            let Some(batch) = self.loader.next_batch() else {
                let completed = self.epoch() + 1;
                self.loader.start_epoch(completed);
                self.save_if_due(Progress {
                    step: self.step,
                    epoch_completed: Some(completed),
                    ..Default::default()
                }, &mut last_save_step)?;
                if completed >= t.epochs {
                    break StopReason::Epochs;
                }
                if self.world.is_leader() {
                    self.export_bundles(false)?;
                }
                continue;
            };
            let lr = self.schedule.lr(self.step);
            let skipped_before = self.loss_scale.map(|s| s.skipped_steps);
            let (loss, grad_norm) = self.train_step(&batch)?;
            let skipped = self.loss_scale.map(|s| s.skipped_steps) != skipped_before;
            // A background save that failed stops the run at the next step, not the next save.
            self.checkpoints.poll()?;
            self.window.add(loss, (!skipped).then_some(grad_norm), batch.num_tokens());
            final_train_loss = Some(loss);
            bar.set_position(self.step as u64);
            bar.set_message(format!(
                "loss {loss:.4} | lr {lr:.2e} | {:.0} tok/s | epoch {}",
                self.window.tokens_per_sec(),
                self.epoch()
            ));

            if self.step % t.log_every_steps == 0 {
                let mut record = self.window.take(self.step, self.epoch(), lr);
                if let Some(scaler) = &self.loss_scale {
                    record.loss_scale = Some(scaler.scale);
                    record.skipped_steps.get_or_insert(0);
                }
                self.last_train_loss = record.train_loss;
                self.metrics.append(record)?;
            }
            let mut progress = Progress {
                step: self.step,
                ..Default::default()
            };
            let mut stop_early = false;
            if self.step % t.eval_every_steps == 0 || self.step == t.max_steps {
                (progress.improved, stop_early) = self.eval_and_log(&bar)?;
                last_eval_step = Some(self.step);
            }
            self.save_if_due(progress, &mut last_save_step)?;
            if stop_early {
                break StopReason::EarlyStopping;
            }
            if self.stop_after_step == Some(self.step) {
                break StopReason::Interrupted;
            }
        };
        // A finished run ends on an evaluation; an interrupted one stops as soon as it can.
        let mut improved = false;
        if stop_reason != StopReason::Interrupted && last_eval_step != Some(self.step) && self.step > 0 {
            (improved, _) = self.eval_and_log(&bar)?;
        }
        if last_save_step != Some(self.step) || improved {
            let ending = Progress {
                step: self.step,
                improved,
                ending: true,
                ..Default::default()
            };
            self.save_if_due(ending, &mut last_save_step)?;
        }
        self.checkpoints.wait()?;
        bar.finish_and_clear();
        if self.world.is_leader() {
            self.write_loss_curve()?;
            if stop_reason != StopReason::Interrupted {
                self.export_bundles(true)?;
            }
        }
        // No rank exits before rank 0 has written everything.
        self.world.barrier();
        let final_val_loss = self.metrics.history.iter().rev().find_map(|r| r.val_loss);
        Ok(TrainSummary {
            steps: self.step,
            epochs_completed: self.epoch(),
            final_train_loss,
            final_val_loss,
            best: self.best,
            stop_reason,
            wall_seconds: started.elapsed().as_secs_f64(),
            output_dir: self.config.output_dir.clone(),
        })
    }

    fn save_if_due(&mut self, progress: Progress, last_save_step: &mut Option<usize>) -> Result<()> {
        let kinds = self.checkpoints.policy().kinds_to_write(progress);
        if kinds.is_empty() {
            return Ok(());
        }
        // Every rank holds the same state; rank 0 writes it, the others wait for its capture.
        if self.world.is_leader() {
            let snapshot = self.snapshot();
            self.checkpoints.save(kinds, snapshot)?;
        }
        self.world.barrier();
        *last_save_step = Some(self.step);
        Ok(())
    }

    fn eval_and_log(&mut self, bar: &ProgressBar) -> Result<(bool, bool)> {
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

    fn progress_bar(&self) -> ProgressBar {
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

    /// Seconds spent in `fit` over all sessions of this run.
    pub fn train_seconds(&self) -> f64 {
        self.train_seconds_before + self.fit_started.map_or(0.0, |t| t.elapsed().as_secs_f64())
    }

    /// The ModelSaver: exports the best checkpoint when it is newer than the last one exported
    /// (`export.on_best`), and at the end of the run the final state (`export.at_end`). Bundles
    /// are made from the checkpoint files, so what is exported is exactly what was saved.
    fn export_bundles(&mut self, ending: bool) -> Result<()> {
        let e = self.config.export.clone();
        let best_is_new = self.best.is_some_and(|b| Some(b.step) != self.exported_best_step);
        if !(e.on_best && best_is_new) && !(ending && e.at_end) {
            return Ok(());
        }
        self.checkpoints.wait()?;
        let max_shard = crate::export::parse_size(&e.max_shard_size)?;
        let ck_dir = self.config.checkpoint_dir();
        if e.on_best && best_is_new {
            let name = crate::checkpoint::policy::Kind::Best.name(self.config.checkpoint.metric);
            let ck = checkpoint::load(&ck_dir.join(format!("{name}.safetensors")))?;
            let dir = self.config.bundle_dir().join(format!("model_{}_epoch{}", e.version, ck.sidecar.epoch));
            self.export_one(&ck, &dir, max_shard)?;
            self.exported_best_step = self.best.map(|b| b.step);
        }
        if ending && e.at_end {
            let ck = checkpoint::load(&ck_dir.join("checkpoint_latest.safetensors"))?;
            let mut dir = self.config.bundle_dir().join(format!("model_{}_final", e.version));
            if dir.exists() {
                // A run extended after it once finished: keep the earlier final bundle.
                dir = self.config.bundle_dir().join(format!("model_{}_final_step{}", e.version, self.step));
            }
            self.export_one(&ck, &dir, max_shard)?;
        }
        Ok(())
    }

    fn export_one(&mut self, ck: &LoadedCheckpoint, dir: &Path, max_shard: u64) -> Result<()> {
        if dir.exists() {
            tracing::warn!("{} exists; kiln never overwrites a bundle, so it is kept as it is", dir.display());
            return Ok(());
        }
        crate::export::export_checkpoint(ck, dir, max_shard, self.config.export.dtype)?;
        self.exported.push(dir.to_path_buf());
        Ok(())
    }

    /// Captures the training state for a checkpoint: tensor handles (copied off the device
    /// later, by the writer) and the sidecar fields.
    pub fn snapshot(&self) -> Snapshot {
        let model = self.model();
        let weights = params::pending_params(model);
        let mut optim = Vec::new();
        for (name, m) in &self.optim.moments {
            let transposed = model.stored_transposed(name, m.shape.len());
            optim.push(pending_flat(format!("exp_avg.{name}"), &m.exp_avg, &m.shape, transposed));
            optim.push(pending_flat(format!("exp_avg_sq.{name}"), &m.exp_avg_sq, &m.shape, transposed));
        }
        if let Some(ema) = &self.ema {
            for (name, e) in &ema.weights {
                let transposed = model.stored_transposed(name, e.shape.len());
                optim.push(pending_flat(format!("ema.{name}"), &e.value, &e.shape, transposed));
            }
        }
        let c = &self.config;
        let mut current = BTreeMap::new();
        if let Some(v) = self.last_train_loss {
            current.insert("train_loss".to_string(), v);
        }
        if let Some(v) = self.metrics.history.iter().rev().find_map(|r| r.val_loss) {
            current.insert("val_loss".to_string(), v);
            current.insert("val_perplexity".to_string(), v.exp());
        }
        current.insert("lr".to_string(), self.schedule.lr(self.step));
        let sidecar = Sidecar {
            format_version: FORMAT_VERSION,
            kind: KindLabel::Latest,
            name: String::new(),
            epoch: self.epoch(),
            global_step: self.step,
            data_position: self.data_position(),
            global_batch: Some(c.training.global_batch() * self.world.size()),
            world_size: self.world.size(),
            rng: RngState::new(c.training.seed),
            lr_schedule: ScheduleState {
                schedule: self.schedule,
                step: self.step,
                next_lr: self.schedule.lr(self.step),
            },
            optimizer: OptimizerState {
                name: "adamw".into(),
                hyperparameters: self.optim.config,
                step: self.optim.step,
            },
            ema_decay: self.ema.as_ref().map(|e| e.decay),
            loss_scale: self.loss_scale,
            metrics: current,
            best_metric: self.best.map(|b| BestMetricState {
                name: c.checkpoint.metric,
                mode: c.checkpoint.mode,
                value: b.value,
                step: b.step,
            }),
            early_stopping: EarlyStoppingState {
                patience: c.training.early_stopping_patience,
                evals_without_improvement: self.best.map_or(0, |b| b.evals_without_improvement),
            },
            metrics_history: self.metrics.history.clone(),
            log_window: self.window.state(),
            model: self.arch.clone(),
            config: c.clone(),
            tokenizer: self.tokenizer_json.clone(),
            special_tokens: Some(self.tokenizer.special_tokens().clone()),
            data_sha256: self.data_sha256.clone(),
            started_at: self.started_at.clone(),
            train_seconds: self.train_seconds(),
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            kiln_version: env!("CARGO_PKG_VERSION").into(),
            burn_version: BURN_VERSION.into(),
            backend: c.training.backend.name().into(),
            files: Vec::new(),
        };
        let weights_metadata = BTreeMap::from([
            ("format".to_string(), "pt".to_string()),
            ("architecture".to_string(), self.arch.architecture().class_name().to_string()),
            ("kiln_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ("global_step".to_string(), self.step.to_string()),
        ]);
        Snapshot {
            weights,
            optim,
            sidecar,
            weights_metadata,
        }
    }

    /// Restores the rest of a checkpoint's state (its tensors are in place already, from
    /// [`restore_tensors`]) into this freshly built learner.
    fn restore(&mut self, s: &Sidecar) -> Result<()> {
        if s.data_sha256 != self.data_sha256 {
            tracing::warn!(
                "the data (data.path or data.sources) differs from the tokens the checkpoint was \
                 trained on; the batch order will not match the interrupted run"
            );
        }
        self.optim.step = s.optimizer.step;
        // A run resumed in fp16 continues the checkpoint's scale; one that switched to fp16
        // starts from the initial scale.
        if self.loss_scale.is_some() {
            self.loss_scale = Some(s.loss_scale.unwrap_or_default());
        }
        let world = self.world.size();
        let (saved, now) = (s.global_batch(), self.config.training.global_batch() * world);
        if saved != now {
            let t = &self.config.training;
            let per_step = t.batch_size * world;
            let hint = if saved % per_step == 0 {
                format!("training.grad_accum_steps = {} keeps it with training.batch_size = {} on {world} process(es)", saved / per_step, t.batch_size)
            } else {
                format!("training.batch_size x processes ({per_step}) must divide {saved}")
            };
            bail!(
                "the checkpoint was trained with {saved} windows per optimizer step, but this run \
                 gives {now} (training.batch_size = {} x training.grad_accum_steps = {} x {world} \
                 process(es)); the data order and the optimizer's trajectory depend on it: {hint}",
                t.batch_size,
                t.grad_accum_steps
            );
        }
        let position = s.data_position;
        if position.batch_in_epoch > self.loader.batches_per_epoch() {
            bail!(
                "the checkpoint stopped at batch {} of epoch {}, but with this config an epoch \
                 has only {} batches (data.seq_len changed?)",
                position.batch_in_epoch,
                position.epoch,
                self.loader.batches_per_epoch()
            );
        }
        self.loader.seek(position);
        self.step = s.global_step;
        // Older kiln could record a NaN best; a best is only ever a finite value.
        self.best = s.best_metric.as_ref().filter(|b| b.value.is_finite()).map(|b| BestMetric {
            value: b.value,
            step: b.step,
            evals_without_improvement: s.early_stopping.evals_without_improvement,
        });
        self.last_train_loss = s.metrics.get("train_loss").copied();
        self.window = LogWindow::from_state(s.log_window);
        self.started_at = s.started_at.clone();
        self.train_seconds_before = s.train_seconds;
        // Bundles of bests reached before the interruption were exported then.
        self.exported_best_step = self.best.map(|b| b.step);
        Ok(())
    }
}

/// A flattened state tensor written in its parameter's Hugging Face layout.
fn pending_flat(name: String, flat: &Tensor<1>, shape: &[usize], transposed: bool) -> PendingTensor {
    match *shape {
        [rows, cols] => pending(name, flat.clone().reshape([rows, cols]), transposed),
        _ => pending(name, flat.clone(), false),
    }
}

/// Refuses a sequence length longer than the positions of a model whose architecture came from
/// elsewhere than `[model]` (`whose`: "the checkpoint's", ...).
fn check_seq_len(config: &Config, arch: &ArchConfig, whose: &str) -> Result<()> {
    let seq_len = config.data.seq_len;
    if seq_len > arch.max_position_embeddings() {
        bail!("data.seq_len = {seq_len} exceeds {whose} max_position_embeddings = {}", arch.max_position_embeddings());
    }
    if seq_len > arch.max_context() {
        bail!(
            "data.seq_len = {seq_len} exceeds {whose} sliding_window = {}; kiln computes contexts \
             up to the window exactly and does not mask longer ones",
            arch.max_context()
        );
    }
    Ok(())
}

fn policy(config: &Config) -> Policy {
    let c = &config.checkpoint;
    Policy {
        save_every_steps: c.save_every_steps,
        save_every_epochs: c.save_every_epochs,
        keep_top_k: c.keep_top_k,
        metric: c.metric,
        mode: c.mode,
    }
}

/// The prepared dataset a run trains on, prepared now unless one matches. With a `given`
/// tokenizer (a checkpoint's, a pretrained one), the dataset prepared with the `configured`
/// tokenizer is used when that tokenizer is the given one (a resumed run from scratch), else
/// one prepared with the given tokenizer.
fn prepared_dataset(data: &DataConfig, configured: &TokenizerChoice, given: Option<&KilnTokenizer>) -> Result<std::path::PathBuf> {
    let choice = match given {
        None => configured.clone(),
        Some(tokenizer) => {
            if let Some(dir) = prepare::find(data, configured)? {
                let manifest = crate::dataset::Manifest::read(&dir)?;
                if manifest.tokenizer_sha256 == prepare::tokenizer_sha256(tokenizer)? {
                    return Ok(dir);
                }
            }
            TokenizerChoice::Given(tokenizer.clone())
        }
    };
    Ok(prepare::prepare(data, &choice)?.dir)
}

/// Refuses a `training.precision` the backend cannot compute in, before anything is prepared.
fn check_precision(precision: Precision, backend: BackendKind, device: &Device) -> Result<()> {
    match precision {
        Precision::Fp32 => Ok(()),
        _ if device.supports_dtype(precision.dtype()) => Ok(()),
        _ => bail!(
            "config key `training.precision`: the {} backend cannot compute in {}; use backend \
             flex or cuda, or precision \"fp32\"",
            backend.name(),
            precision.name()
        ),
    }
}

/// Takes the run's lock file, so that two trainers never interleave checkpoints in one
/// directory. The OS releases the lock when the process dies, however it dies.
fn lock_output_dir(out: &Path) -> Result<File> {
    // A lock just released can still look held for a moment: a child process that another
    // thread of this process is starting inherits a copy of the descriptor (and so the lock)
    // until it reaches `exec`, which closes it. A trainer that really holds the directory
    // holds it far longer than this grace period.
    const GRACE: std::time::Duration = std::time::Duration::from_secs(2);
    let path = out.join(".kiln.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot create lock file {}", path.display()))?;
    let started = Instant::now();
    loop {
        match file.try_lock() {
            Ok(()) => return Ok(file),
            Err(std::fs::TryLockError::WouldBlock) if started.elapsed() < GRACE => {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(std::fs::TryLockError::WouldBlock) => bail!(
                "another kiln process is training in {} (it holds {}); wait for it to finish \
                 or choose another output_dir",
                out.display(),
                path.display()
            ),
            Err(std::fs::TryLockError::Error(e)) => {
                return Err(e).with_context(|| format!("cannot lock {}", path.display()));
            }
        }
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

/// Training-loss and throughput accumulator between two log lines.
#[derive(Debug)]
struct LogWindow {
    loss_sum: f64,
    grad_norm_sum: f64,
    steps: usize,
    /// Steps skipped by fp16 loss scaling, which have no gradient norm.
    skipped: u64,
    tokens: usize,
    started: Instant,
    excluded: std::time::Duration,
}

impl LogWindow {
    fn new() -> Self {
        Self {
            loss_sum: 0.0,
            grad_norm_sum: 0.0,
            steps: 0,
            skipped: 0,
            tokens: 0,
            started: Instant::now(),
            excluded: std::time::Duration::ZERO,
        }
    }

    fn from_state(state: LogWindowState) -> Self {
        Self {
            loss_sum: state.loss_sum,
            grad_norm_sum: state.grad_norm_sum,
            steps: state.steps,
            skipped: state.skipped,
            ..Self::new()
        }
    }

    fn state(&self) -> LogWindowState {
        LogWindowState {
            loss_sum: self.loss_sum,
            grad_norm_sum: self.grad_norm_sum,
            steps: self.steps,
            skipped: self.skipped,
        }
    }

    /// Throughput counts from here (e.g. the start of `fit`, not of set-up).
    fn restart_clock(&mut self) {
        self.started = Instant::now();
        self.tokens = 0;
        self.excluded = std::time::Duration::ZERO;
    }

    /// One step's loss and gradient norm (`None`: skipped by fp16 loss scaling).
    fn add(&mut self, loss: f64, grad_norm: Option<f64>, tokens: usize) {
        self.loss_sum += loss;
        match grad_norm {
            Some(norm) => self.grad_norm_sum += norm,
            None => self.skipped += 1,
        }
        self.steps += 1;
        self.tokens += tokens;
    }

    /// Time spent outside training (evaluation) does not count against throughput.
    fn exclude(&mut self, d: std::time::Duration) {
        self.excluded += d;
    }

    /// Mean training loss of the steps in this window, if any.
    fn mean_loss(&self) -> Option<f64> {
        (self.steps > 0).then(|| self.loss_sum / self.steps as f64)
    }

    fn tokens_per_sec(&self) -> f64 {
        let secs = (self.started.elapsed().saturating_sub(self.excluded)).as_secs_f64();
        if secs > 0.0 { self.tokens as f64 / secs } else { 0.0 }
    }

    fn take(&mut self, step: usize, epoch: usize, lr: f64) -> MetricRecord {
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
            ..Default::default()
        };
        *self = Self::new();
        record
    }
}
