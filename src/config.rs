//! The run configuration: a TOML file with `[model]`, `[data]` and `[training]` sections.
//!
//! Every key has a default (so a config file only names what it changes), unknown keys and
//! wrong types are errors that name the full key (`model.hiden_size`), and `validate` rejects
//! values that parse but cannot work together (`num_heads` not dividing `hidden_size`, ...).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// A configuration error, always naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: invalid TOML: {message}")]
    Syntax { path: String, message: String },
    #[error("config key `{key}`: {message}")]
    Key { key: String, message: String },
    #[error("--set {0}: expected key=value, e.g. --set training.max_steps=200")]
    Override(String),
}

fn key_error(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Key {
        key: key.to_string(),
        message: message.into(),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Top-level directory for checkpoints, exports, metrics and plots.
    pub output_dir: PathBuf,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub training: TrainingConfig,
    pub checkpoint: CheckpointConfig,
    pub export: ExportConfig,
}

/// The ModelSaver: inference bundles under `<output_dir>/models/inference/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Version in bundle names (`model_<version>_final`).
    pub version: String,
    /// Shard the weights past this size: `"500MB"`, `"2GB"` (decimal, as Hugging Face), or bytes.
    pub max_shard_size: String,
    /// Export `model_<version>_epoch<N>` from the best checkpoint whenever the tracked metric
    /// has improved, at the end of each epoch and of the run.
    pub on_best: bool,
    /// Export `model_<version>_final` when training ends.
    pub at_end: bool,
    /// The dtype of the bundle's weights (`torch_dtype` in its `config.json`); checkpoints stay
    /// fp32 whatever it is.
    pub dtype: ExportDtype,
    /// Custom entries of the weights files' safetensors `__metadata__` (`[export.metadata]`,
    /// strings), beside the `"format": "pt"` transformers reads.
    pub metadata: BTreeMap<String, String>,
}

/// A bundle's weight dtype, named as `config.json`'s `torch_dtype` (`bf16`/`fp16` accepted).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportDtype {
    #[default]
    #[serde(alias = "fp32", alias = "f32")]
    Float32,
    #[serde(alias = "bf16")]
    Bfloat16,
    #[serde(alias = "fp16", alias = "f16")]
    Float16,
}

impl ExportDtype {
    /// The `torch_dtype` name.
    pub fn name(self) -> &'static str {
        match self {
            ExportDtype::Float32 => "float32",
            ExportDtype::Bfloat16 => "bfloat16",
            ExportDtype::Float16 => "float16",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "float32" | "fp32" | "f32" => Some(Self::Float32),
            "bfloat16" | "bf16" => Some(Self::Bfloat16),
            "float16" | "fp16" | "f16" => Some(Self::Float16),
            _ => None,
        }
    }
}

/// The architecture trained from scratch; shape keys follow Hugging Face `LlamaConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// `llama`, `qwen2` (biases on the query/key/value projections), `mistral` (with
    /// `sliding_window`) or `gpt2` (learned positions, LayerNorm, GELU; `rms_norm_eps` is its
    /// LayerNorm epsilon, `intermediate_size` its `n_inner`, `rope_theta` unused).
    pub architecture: crate::model::Architecture,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    /// Key/value heads for grouped-query attention; equal to `num_heads` for plain multi-head.
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// A sliding attention window (Mistral's `sliding_window`, Qwen2's with
    /// `use_sliding_window`); `data.seq_len` may not exceed it.
    pub sliding_window: Option<usize>,
    /// Standard deviation of the normal initialisation (`initializer_range` in Hugging Face).
    pub initializer_range: f64,
    /// Dropout on the embeddings and on each residual branch during training (0 disables it).
    pub dropout: f64,
    /// A Hugging Face Llama directory or kiln bundle to fine-tune from. Its `config.json` then
    /// fixes the architecture (the keys above are ignored) and its `tokenizer.json` the vocabulary.
    pub init_from: Option<PathBuf>,
    /// Rules `PATTERN=REPLACEMENT` (regex) renaming the stored tensors of `init_from`.
    pub init_key_map: Vec<String>,
    /// Keep the fresh initialisation of tensors `init_from` lacks instead of failing.
    pub init_allow_partial: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenizerKind {
    /// One token per Unicode character of the corpus.
    Char,
    /// Byte-level BPE (GPT-2 style) trained on the corpus up to `data.vocab_size` tokens.
    Bpe,
}

/// `data.tokenizer`: a kind kiln trains on the sources (`"char"`, `"bpe"`), or any other string
/// as the path of a `tokenizer.json` used as it is.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSetting {
    Train(TokenizerKind),
    File(PathBuf),
}

impl From<TokenizerKind> for TokenizerSetting {
    fn from(kind: TokenizerKind) -> Self {
        Self::Train(kind)
    }
}

impl Serialize for TokenizerSetting {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Train(kind) => kind.serialize(s),
            Self::File(path) => path.serialize(s),
        }
    }
}

impl<'de> Deserialize<'de> for TokenizerSetting {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d).map_err(|_| serde::de::Error::custom("expected \"char\", \"bpe\" or the path of a tokenizer.json"))?;
        Ok(match text.as_str() {
            "char" => Self::Train(TokenizerKind::Char),
            "bpe" => Self::Train(TokenizerKind::Bpe),
            _ => Self::File(PathBuf::from(text)),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// A UTF-8 text file: the shorthand for one `.txt` source when `sources` is empty.
    /// Relative paths are resolved against the working directory.
    pub path: PathBuf,
    /// The dataset's sources (`[[data.sources]]`); empty means `path` alone.
    pub sources: Vec<SourceConfig>,
    /// Where prepared datasets (token shards and their manifest) are kept, shared by runs.
    pub cache_dir: PathBuf,
    /// Skip unreadable records (a bad jsonl line, a missing field, invalid UTF-8), counting
    /// them, instead of stopping at the first with an error naming it.
    pub skip_bad_records: bool,
    /// At most this many MiB of documents (the first of each source, in equal shares) train a
    /// `bpe` tokenizer, so a large corpus is never held in memory.
    pub tokenizer_sample_mib: usize,
    /// Tokens per prepared shard file (the last of a source holds the rest).
    pub shard_tokens: u64,
    pub tokenizer: TokenizerSetting,
    /// Target vocabulary size for `bpe` (ignored for `char`, whose vocabulary is the corpus's characters).
    pub vocab_size: usize,
    /// Tokens of context per training example.
    pub seq_len: usize,
    /// Fraction of each training source held out for validation (its last documents) when no
    /// source has `split = "validation"`.
    pub val_fraction: f64,
}

/// One `[[data.sources]]` entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// A file, a directory (its dataset files) or a glob, of `.txt` and `.jsonl` (optionally
    /// `.gz`) files.
    pub path: PathBuf,
    /// The jsonl key holding each document's text.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// This source's share of the training windows, relative to the others' weights; without
    /// weights, sources are sampled in proportion to their tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<f64>,
    /// `"train"` (default) or `"validation"`: a run with validation sources evaluates on them,
    /// whole, and trains on every token of the others.
    #[serde(default, skip_serializing_if = "Split::is_train")]
    pub split: Split,
}

/// Which part of a run a source feeds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    #[default]
    Train,
    Validation,
}

impl Split {
    pub fn is_train(&self) -> bool {
        *self == Split::Train
    }
}

fn default_text_field() -> String {
    "text".to_string()
}

impl DataConfig {
    /// The sources to prepare: `[[data.sources]]`, or `data.path` as one text source.
    pub fn effective_sources(&self) -> Vec<SourceConfig> {
        if self.sources.is_empty() {
            vec![SourceConfig { path: self.path.clone(), text_field: default_text_field(), weight: None, split: Split::Train }]
        } else {
            self.sources.clone()
        }
    }

    /// Whether some source is named for validation (then nothing is held out of the others).
    pub fn has_validation_sources(&self) -> bool {
        self.sources.iter().any(|s| s.split == Split::Validation)
    }

    /// The configured weights of the training sources, in order, if they have any.
    pub fn train_weights(&self) -> Option<Vec<f64>> {
        self.sources.iter().filter(|s| s.split.is_train()).map(|s| s.weight).collect::<Option<Vec<f64>>>().filter(|w| !w.is_empty())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Flex,
    Ndarray,
    Wgpu,
    Cuda,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Flex => "flex",
            BackendKind::Ndarray => "ndarray",
            BackendKind::Wgpu => "wgpu",
            BackendKind::Cuda => "cuda",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "flex" => Some(Self::Flex),
            "ndarray" => Some(Self::Ndarray),
            "wgpu" => Some(Self::Wgpu),
            "cuda" => Some(Self::Cuda),
            _ => None,
        }
    }
}

/// The float type a training step computes in (`training.precision`). Master weights, AdamW
/// moments, gradients, clipping and the loss stay fp32 whatever it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

impl Precision {
    pub fn name(self) -> &'static str {
        match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Fp16 => "fp16",
        }
    }

    /// The dtype of the forward and backward passes.
    pub fn dtype(self) -> burn::tensor::FloatDType {
        use burn::tensor::FloatDType;
        match self {
            Precision::Fp32 => FloatDType::F32,
            Precision::Bf16 => FloatDType::BF16,
            Precision::Fp16 => FloatDType::F16,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainingConfig {
    pub backend: BackendKind,
    /// What the forward and backward passes compute in: `fp32`, `bf16` or `fp16`.
    pub precision: Precision,
    pub seed: u64,
    /// Windows per micro-step (and per process, once several train together).
    pub batch_size: usize,
    /// Micro-steps whose gradients are summed into one optimizer step: an optimizer step sees
    /// `batch_size x grad_accum_steps` windows, the global batch.
    pub grad_accum_steps: usize,
    /// Stop after this many optimizer steps (whichever of `max_steps` and `epochs` comes first).
    pub max_steps: usize,
    /// Stop after this many passes over the training split.
    pub epochs: usize,
    /// Peak learning rate, reached after `warmup_steps`.
    pub learning_rate: f64,
    pub warmup_steps: usize,
    /// Floor of the cosine decay, reached at `lr_decay_steps`.
    pub min_lr: f64,
    /// Step at which the cosine decay reaches `min_lr`; defaults to `max_steps`.
    pub lr_decay_steps: Option<usize>,
    /// Decoupled (AdamW) weight decay, applied to matrices and embeddings but not to norms.
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Clip the global gradient norm to this value (0 disables clipping).
    pub grad_clip: f64,
    pub eval_every_steps: usize,
    pub eval_batches: usize,
    /// Stop when validation loss has not improved for this many evaluations (0 disables).
    pub early_stopping_patience: usize,
    /// Write a `metrics.jsonl` line with the training loss every this many steps.
    pub log_every_steps: usize,
    /// Keep an exponential moving average of the weights with this decay (e.g. 0.999).
    pub ema_decay: Option<f64>,
}

/// Metrics a checkpoint policy can track; all are read at evaluation steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Mean validation loss (nats/token) over the fixed validation batches.
    ValLoss,
    /// `exp(val_loss)`.
    ValPerplexity,
    /// Mean training loss of the most recent log window (of the steps since the last log line
    /// when none has been written yet).
    TrainLoss,
}

impl Metric {
    /// The name in configs, checkpoint names and sidecars (`checkpoint_best_val_loss`).
    pub fn name(self) -> &'static str {
        match self {
            Metric::ValLoss => "val_loss",
            Metric::ValPerplexity => "val_perplexity",
            Metric::TrainLoss => "train_loss",
        }
    }
}

impl std::fmt::Display for Metric {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Write `checkpoint_step_N` every this many steps (0 disables).
    pub save_every_steps: usize,
    /// Write `checkpoint_epoch_N` every this many epochs (0 disables).
    pub save_every_epochs: usize,
    /// Step checkpoints kept (the best by `metric`).
    pub keep_top_k: usize,
    /// The tracked metric.
    pub metric: Metric,
    pub mode: crate::checkpoint::policy::Mode,
    /// Write checkpoints on a background thread while training continues.
    pub async_save: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            output_dir: PathBuf::from("outputs"),
            model: ModelConfig::default(),
            data: DataConfig::default(),
            training: TrainingConfig::default(),
            checkpoint: CheckpointConfig::default(),
            export: ExportConfig::default(),
        }
    }
}

impl Default for ExportConfig {
    fn default() -> Self {
        Self {
            version: "v1.0".to_string(),
            max_shard_size: "2GB".to_string(),
            on_best: true,
            at_end: true,
            dtype: ExportDtype::Float32,
            metadata: BTreeMap::new(),
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self {
            save_every_steps: 500,
            save_every_epochs: 1,
            keep_top_k: 3,
            metric: Metric::ValLoss,
            mode: crate::checkpoint::policy::Mode::Min,
            async_save: true,
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            architecture: crate::model::Architecture::Llama,
            hidden_size: 128,
            num_layers: 4,
            num_heads: 4,
            num_kv_heads: 4,
            intermediate_size: 384,
            max_position_embeddings: 256,
            rope_theta: 10000.0,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            sliding_window: None,
            initializer_range: 0.02,
            dropout: 0.0,
            init_from: None,
            init_key_map: Vec::new(),
            init_allow_partial: false,
        }
    }
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            path: PathBuf::from("data/shakespeare.txt"),
            sources: Vec::new(),
            cache_dir: PathBuf::from("data/cache"),
            skip_bad_records: false,
            tokenizer_sample_mib: 256,
            shard_tokens: crate::dataset::SHARD_TOKENS,
            tokenizer: TokenizerSetting::Train(TokenizerKind::Char),
            vocab_size: 512,
            seq_len: 64,
            val_fraction: 0.1,
        }
    }
}

impl Default for TrainingConfig {
    fn default() -> Self {
        Self {
            backend: BackendKind::Flex,
            precision: Precision::Fp32,
            seed: 1337,
            batch_size: 16,
            grad_accum_steps: 1,
            max_steps: 2000,
            epochs: 1,
            learning_rate: 1e-3,
            warmup_steps: 100,
            min_lr: 1e-4,
            lr_decay_steps: None,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.99,
            eps: 1e-8,
            grad_clip: 1.0,
            eval_every_steps: 250,
            eval_batches: 20,
            early_stopping_patience: 0,
            log_every_steps: 10,
            ema_decay: None,
        }
    }
}

impl Config {
    /// The checkpoint directory of this run.
    pub fn checkpoint_dir(&self) -> PathBuf {
        self.output_dir.join("checkpoints")
    }

    /// Where the ModelSaver puts inference bundles.
    pub fn bundle_dir(&self) -> PathBuf {
        self.output_dir.join("models").join("inference")
    }
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }
}

impl TrainingConfig {
    pub fn lr_decay_steps(&self) -> usize {
        self.lr_decay_steps.unwrap_or(self.max_steps)
    }

    /// Windows per optimizer step: `batch_size x grad_accum_steps` (one process).
    pub fn global_batch(&self) -> usize {
        self.batch_size * self.grad_accum_steps
    }
}

impl Config {
    /// Reads a config file, applies `--set key=value` overrides, and validates the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, &path.display().to_string(), overrides)
    }

    /// Parses TOML text (`origin` names it in errors), applies overrides and validates.
    pub fn from_toml_str(
        text: &str,
        origin: &str,
        overrides: &[String],
    ) -> Result<Self, ConfigError> {
        let mut table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            ConfigError::Syntax {
                path: origin.to_string(),
                message: e.message().to_string(),
            }
        })?;
        for item in overrides {
            apply_override(&mut table, item)?;
        }
        let config: Config = serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| key_error(&e.path().to_string(), e.inner().message().to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// The resolved configuration as TOML, as saved beside outputs.
    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("a Config always serializes to TOML")
    }

    /// Checks relations between keys that types alone cannot express.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let m = &self.model;
        positive("model.hidden_size", m.hidden_size)?;
        positive("model.num_layers", m.num_layers)?;
        positive("model.num_heads", m.num_heads)?;
        positive("model.num_kv_heads", m.num_kv_heads)?;
        positive("model.intermediate_size", m.intermediate_size)?;
        positive("model.max_position_embeddings", m.max_position_embeddings)?;
        if m.hidden_size % m.num_heads != 0 {
            return Err(key_error(
                "model.num_heads",
                format!(
                    "{} does not divide model.hidden_size = {}",
                    m.num_heads, m.hidden_size
                ),
            ));
        }
        if m.num_heads % m.num_kv_heads != 0 {
            return Err(key_error(
                "model.num_kv_heads",
                format!(
                    "{} does not divide model.num_heads = {} (grouped-query attention shares each \
                     key/value head among a whole number of query heads)",
                    m.num_kv_heads, m.num_heads
                ),
            ));
        }
        let gpt2 = m.architecture == crate::model::Architecture::Gpt2;
        if gpt2 && m.num_kv_heads != m.num_heads {
            return Err(key_error(
                "model.num_kv_heads",
                format!("{} must equal model.num_heads = {} for GPT-2, which has no grouped-query attention", m.num_kv_heads, m.num_heads),
            ));
        }
        if !gpt2 && m.head_dim() % 2 != 0 {
            return Err(key_error(
                "model.num_heads",
                format!(
                    "head dimension hidden_size / num_heads = {} must be even for rotary embeddings",
                    m.head_dim()
                ),
            ));
        }
        finite_positive("model.rope_theta", m.rope_theta)?;
        finite_positive("model.rms_norm_eps", m.rms_norm_eps)?;
        finite_positive("model.initializer_range", m.initializer_range)?;
        fraction("model.dropout", m.dropout, true)?;

        let d = &self.data;
        positive("data.seq_len", d.seq_len)?;
        // A fine-tune's positions come from `init_from`'s config.json, checked when it is read.
        if m.init_from.is_none() && d.seq_len > m.max_position_embeddings {
            return Err(key_error(
                "data.seq_len",
                format!(
                    "{} exceeds model.max_position_embeddings = {}",
                    d.seq_len, m.max_position_embeddings
                ),
            ));
        }
        if let Some(window) = m.sliding_window {
            positive("model.sliding_window", window)?;
            if !matches!(m.architecture, crate::model::Architecture::Mistral | crate::model::Architecture::Qwen2) {
                return Err(key_error("model.sliding_window", "is for model.architecture = \"mistral\" or \"qwen2\"; this architecture attends to the whole context"));
            }
            if m.init_from.is_none() && d.seq_len > window {
                return Err(key_error(
                    "data.seq_len",
                    format!("{} exceeds model.sliding_window = {window}; kiln computes contexts up to the window exactly and does not mask longer ones", d.seq_len),
                ));
            }
        }
        fraction("data.val_fraction", d.val_fraction, false)?;
        positive("data.tokenizer_sample_mib", d.tokenizer_sample_mib)?;
        if d.shard_tokens == 0 {
            return Err(key_error("data.shard_tokens", "must be at least 1"));
        }
        let weighted = d.sources.iter().filter(|s| s.split.is_train() && s.weight.is_some()).count();
        if !d.sources.is_empty() && d.sources.iter().all(|s| s.split == Split::Validation) {
            return Err(key_error("data.sources", "every source has split = \"validation\"; at least one must be for training"));
        }
        for (i, source) in d.sources.iter().enumerate() {
            if source.text_field.is_empty() {
                return Err(key_error(&format!("data.sources[{i}].text_field"), "must not be empty"));
            }
            if source.split == Split::Validation {
                if source.weight.is_some() {
                    return Err(key_error(&format!("data.sources[{i}].weight"), "is for training sources; a validation source is evaluated whole"));
                }
                continue;
            }
            match source.weight {
                Some(w) => finite_positive(&format!("data.sources[{i}].weight"), w)?,
                None if weighted > 0 => {
                    return Err(key_error(
                        &format!("data.sources[{i}].weight"),
                        "is missing while other sources have one; give every source a weight, or none (then each counts by its tokens)",
                    ));
                }
                None => {}
            }
        }
        if d.tokenizer == TokenizerSetting::Train(TokenizerKind::Bpe) && d.vocab_size < 257 {
            return Err(key_error(
                "data.vocab_size",
                format!(
                    "{} is too small for byte-level BPE, which needs the 256 byte tokens plus at \
                     least one merge",
                    d.vocab_size
                ),
            ));
        }

        let t = &self.training;
        positive("training.batch_size", t.batch_size)?;
        positive("training.grad_accum_steps", t.grad_accum_steps)?;
        positive("training.max_steps", t.max_steps)?;
        positive("training.epochs", t.epochs)?;
        positive("training.eval_every_steps", t.eval_every_steps)?;
        positive("training.eval_batches", t.eval_batches)?;
        positive("training.log_every_steps", t.log_every_steps)?;
        finite_positive("training.learning_rate", t.learning_rate)?;
        if !(t.min_lr.is_finite() && t.min_lr >= 0.0 && t.min_lr <= t.learning_rate) {
            return Err(key_error(
                "training.min_lr",
                format!(
                    "{} must lie between 0 and training.learning_rate = {}",
                    t.min_lr, t.learning_rate
                ),
            ));
        }
        if let Some(steps) = t.lr_decay_steps
            && steps <= t.warmup_steps
        {
            return Err(key_error(
                "training.lr_decay_steps",
                format!("{steps} must exceed training.warmup_steps = {}", t.warmup_steps),
            ));
        }
        nonnegative("training.weight_decay", t.weight_decay)?;
        nonnegative("training.grad_clip", t.grad_clip)?;
        fraction("training.beta1", t.beta1, true)?;
        fraction("training.beta2", t.beta2, true)?;
        finite_positive("training.eps", t.eps)?;
        if let Some(decay) = t.ema_decay {
            fraction("training.ema_decay", decay, false)?;
        }

        let c = &self.checkpoint;
        positive("checkpoint.keep_top_k", c.keep_top_k)?;
        let e = &self.export;
        crate::export::parse_size(&e.max_shard_size)
            .map_err(|err| key_error("export.max_shard_size", err.to_string()))?;
        if e.version.is_empty() || e.version.contains(['/', '\\']) || e.version.starts_with('.') {
            return Err(key_error("export.version", format!("{:?} cannot be part of a directory name", e.version)));
        }
        if let Err(message) = crate::export::check_metadata(&e.metadata) {
            return Err(key_error("export.metadata", message));
        }
        if let Some(rule) = self.model.init_key_map.iter().find(|r| !r.contains('=')) {
            return Err(key_error("model.init_key_map", format!("rule {rule:?} is not PATTERN=REPLACEMENT")));
        }
        Ok(())
    }
}

fn positive(key: &str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(key_error(key, "must be at least 1"));
    }
    Ok(())
}

fn finite_positive(key: &str, value: f64) -> Result<(), ConfigError> {
    if !(value.is_finite() && value > 0.0) {
        return Err(key_error(key, format!("{value} must be a finite number above 0")));
    }
    Ok(())
}

fn nonnegative(key: &str, value: f64) -> Result<(), ConfigError> {
    if !(value.is_finite() && value >= 0.0) {
        return Err(key_error(key, format!("{value} must be a finite number of at least 0")));
    }
    Ok(())
}

/// `value` in (0, 1), or in [0, 1) when `zero_ok`.
fn fraction(key: &str, value: f64, zero_ok: bool) -> Result<(), ConfigError> {
    let low_ok = if zero_ok { value >= 0.0 } else { value > 0.0 };
    if !(low_ok && value < 1.0) {
        let range = if zero_ok { "[0, 1)" } else { "(0, 1)" };
        return Err(key_error(key, format!("{value} must lie in {range}")));
    }
    Ok(())
}

/// Applies one `section.key=value` override. The value is read as TOML (`200`, `3e-4`, `true`,
/// `"wgpu"`); anything that is not valid TOML is taken as a bare string, so `--set
/// training.backend=wgpu` works without shell quoting.
fn apply_override(table: &mut toml::Table, item: &str) -> Result<(), ConfigError> {
    let (key, raw) = item
        .split_once('=')
        .ok_or_else(|| ConfigError::Override(item.to_string()))?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(ConfigError::Override(item.to_string()));
    }
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));

    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("split yields at least one part");
    let mut node = table;
    let mut walked = String::new();
    for part in parts {
        if !walked.is_empty() {
            walked.push('.');
        }
        walked.push_str(part);
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry
            .as_table_mut()
            .ok_or_else(|| key_error(&walked, "is a value, not a section"))?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}
