//! Building a run: the lock on its output directory, the tokenizer, the prepared data, the
//! model (fresh, fine-tuned from a pretrained directory, or a checkpoint's), the optimizer and
//! the metrics file. A resume then restores the rest of its state (`checkpointing.rs`).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use burn::tensor::Device;

use super::Learner;
use super::checkpointing::policy;
use super::logging::LogWindow;
use crate::backend;
use crate::checkpoint::storage::LocalFs;
use crate::checkpoint::{self, CheckpointManager};
use crate::config::{BackendKind, Config, DataConfig, Precision};
use crate::data::{Corpus, TrainLoader, validation_batches};
use crate::dataset::{Dataset, TOKENIZER_FILE};
use crate::distributed::World;
use crate::ema::Ema;
use crate::loss_scale::LossScale;
use crate::metrics::MetricsLog;
use crate::model::{ArchConfig, CausalLm};
use crate::optim::{AdamW, AdamWConfig};
use crate::prepare::{self, TokenizerChoice};
use crate::pretrained::{self, LoadOptions};
use crate::resume::{check_same_shape, restore_tensors};
use crate::schedule::WarmupCosine;
use crate::tokenizer::KilnTokenizer;

impl Learner {
    pub(super) fn build(config: Config, resume: Option<&Path>, world: Arc<World>) -> Result<Self> {
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
            last_eval_step: None,
            last_save_step: None,
            allreduce_time: std::time::Duration::ZERO,
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
