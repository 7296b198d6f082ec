//! Checkpointing: the saves the policy asks for (rank 0 writes, the others wait), the
//! snapshot a checkpoint holds, the rest of a checkpoint's state restored into a freshly built
//! learner, and the ModelSaver's bundles made from the checkpoint files.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Result, bail};
use burn::tensor::Tensor;

use super::logging::LogWindow;
use super::{BestMetric, Learner};
use crate::checkpoint::policy::{Policy, Progress};
use crate::checkpoint::sidecar::{
    BURN_VERSION, BestMetricState, EarlyStoppingState, FORMAT_VERSION, KindLabel, OptimizerState, RngState,
    ScheduleState, Sidecar,
};
use crate::checkpoint::{self, LoadedCheckpoint, Snapshot};
use crate::config::Config;
use crate::model::HfLayout;
use crate::params::{self, pending};
use crate::safetensors_io::PendingTensor;

impl Learner {
    /// Saves the checkpoints the policy asks for at `progress`, if any.
    pub(super) fn save_if_due(&mut self, progress: Progress) -> Result<()> {
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
        self.last_save_step = Some(self.step);
        Ok(())
    }

    /// The ModelSaver: exports the best checkpoint when it is newer than the last one exported
    /// (`export.on_best`), and at the end of the run the final state (`export.at_end`). Bundles
    /// are made from the checkpoint files, so what is exported is exactly what was saved.
    pub(super) fn export_bundles(&mut self, ending: bool) -> Result<()> {
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
        crate::export::export_checkpoint(ck, dir, max_shard, self.config.export.dtype, &self.config.export.metadata)?;
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
    pub(super) fn restore(&mut self, s: &Sidecar) -> Result<()> {
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

pub(super) fn policy(config: &Config) -> Policy {
    let c = &config.checkpoint;
    Policy {
        save_every_steps: c.save_every_steps,
        save_every_epochs: c.save_every_epochs,
        keep_top_k: c.keep_top_k,
        metric: c.metric,
        mode: c.mode,
    }
}
