//! The sidecar `<name>.meta.json`: everything a resume needs besides tensors, plus the size
//! and SHA-256 of each tensor file. It is written last, so a checkpoint exists only once it
//! is complete, and loading verifies the checksums before trusting the tensors.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::data::DataPosition;
use crate::metrics::MetricRecord;
use crate::model::{ArchConfig, Architecture, LlamaShape};
use crate::optim::AdamWConfig;
use crate::safetensors_io::{FileDigest, digest_file};
use crate::schedule::WarmupCosine;

use super::policy::Mode;

/// Bumped when the sidecar or tensor-file layout changes. 2: `model` is the architecture's
/// Hugging Face `config.json` (tagged by `model_type`) instead of kiln's Llama shape.
pub const FORMAT_VERSION: u32 = 2;

/// The versions this kiln reads: version 1 sidecars (Llama only) still load.
pub const READABLE_VERSIONS: [u32; 2] = [1, 2];

/// The Burn version kiln is built against (checked against Cargo.lock by a test).
pub const BURN_VERSION: &str = "0.22.1";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KindLabel {
    Latest,
    Best,
    Epoch,
    Step,
}

/// A tensor file of the checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileEntry {
    /// `weights` or `optimizer`.
    pub role: String,
    /// File name, relative to the sidecar's directory.
    pub name: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Where randomness comes from. kiln keeps no opaque generator state: every random draw is a
/// pure function of the seed and a counter recorded elsewhere in the sidecar.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    pub seed: u64,
    /// Batch order: ChaCha8 seeded from `(seed, data_position.epoch)`.
    pub data_order: String,
    /// Dropout masks: ChaCha8 seeded from `(seed, global_step)` for every step.
    pub dropout: String,
}

impl RngState {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            data_order: "chacha8(seed ^ epoch * 0x9E3779B97F4A7C15): offset, then shuffle".into(),
            dropout: "chacha8(splitmix64(seed, global_step)) per step, drawn on the host".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScheduleState {
    pub schedule: WarmupCosine,
    /// The schedule position: the learning rate of the next step is `lr(step)`.
    pub step: usize,
    pub next_lr: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    pub name: String,
    pub hyperparameters: AdamWConfig,
    /// Steps taken (AdamW's bias-correction time step).
    pub step: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestMetricState {
    pub name: crate::config::Metric,
    pub mode: Mode,
    pub value: f64,
    pub step: usize,
}

/// Training losses summed since the last `metrics.jsonl` line.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LogWindowState {
    pub loss_sum: f64,
    pub grad_norm_sum: f64,
    pub steps: usize,
    /// Of `steps`, those skipped by fp16 loss scaling (not in `grad_norm_sum`).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EarlyStoppingState {
    pub patience: usize,
    pub evals_without_improvement: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sidecar {
    pub format_version: u32,
    pub kind: KindLabel,
    pub name: String,
    /// Epoch the run is in (0-based; equals the number of completed epochs).
    pub epoch: usize,
    pub global_step: usize,
    /// Global batches of the epoch served so far (`data_position.batch_in_epoch` counts them).
    pub data_position: DataPosition,
    /// Windows per optimizer step over all processes and micro-steps; absent in checkpoints of
    /// kiln before gradient accumulation, whose global batch was `training.batch_size`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub global_batch: Option<usize>,
    /// Processes the run trained on.
    #[serde(default = "one")]
    pub world_size: usize,
    pub rng: RngState,
    pub lr_schedule: ScheduleState,
    pub optimizer: OptimizerState,
    /// EMA decay when the optimizer file carries EMA weights.
    pub ema_decay: Option<f64>,
    /// fp16 runs' dynamic loss scale.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<crate::loss_scale::LossScale>,
    /// The most recent value of each metric at save time.
    pub metrics: BTreeMap<String, f64>,
    pub best_metric: Option<BestMetricState>,
    pub early_stopping: EarlyStoppingState,
    pub metrics_history: Vec<MetricRecord>,
    pub log_window: LogWindowState,
    /// The architecture as Hugging Face's `config.json` has it.
    #[serde(deserialize_with = "arch_config_any_version")]
    pub model: ArchConfig,
    pub config: Config,
    /// The run's `tokenizer.json`, so a resume tokenizes exactly as before.
    pub tokenizer: serde_json::Value,
    /// Its special tokens (a fine-tune's come from the pretrained directory); absent in
    /// checkpoints of kiln before 0.2, whose tokenizers were always kiln's own.
    #[serde(default)]
    pub special_tokens: Option<crate::tokenizer::SpecialTokens>,
    /// SHA-256 of the training data: of the prepared token streams (`Dataset::content_sha256`);
    /// checkpoints of kiln before prepared datasets hashed the corpus text.
    pub data_sha256: String,
    /// When the run started (RFC 3339), and seconds spent training so far over all sessions.
    pub started_at: String,
    pub train_seconds: f64,
    pub created_at: String,
    pub kiln_version: String,
    pub burn_version: String,
    pub backend: String,
    pub files: Vec<FileEntry>,
}

/// `model` as either version writes it: an architecture config tagged by `model_type`, or
/// (version 1) kiln's Llama shape.
fn arch_config_any_version<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ArchConfig, D::Error> {
    use serde::de::Error;
    let value = serde_json::Value::deserialize(d)?;
    if value.get("model_type").is_some() {
        return serde_json::from_value(value).map_err(D::Error::custom);
    }
    let shape: LlamaShape = serde_json::from_value(value).map_err(D::Error::custom)?;
    Ok(ArchConfig::of_shape(Architecture::Llama, &shape, 0.02))
}

/// The three paths of checkpoint `name` in `dir`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointPaths {
    pub weights: PathBuf,
    pub optim: PathBuf,
    pub sidecar: PathBuf,
}

impl CheckpointPaths {
    pub fn new(dir: &Path, name: &str) -> Self {
        Self {
            weights: dir.join(format!("{name}.safetensors")),
            optim: dir.join(format!("{name}.optim.safetensors")),
            sidecar: dir.join(format!("{name}.meta.json")),
        }
    }

    /// The checkpoint a user-given path refers to: any of its three files, or the name.
    pub fn from_any(path: &Path) -> Self {
        let dir = super::storage::parent(path);
        let file = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let name = [".optim.safetensors", ".meta.json", ".safetensors"]
            .iter()
            .find_map(|suffix| file.strip_suffix(suffix))
            .unwrap_or(&file);
        Self::new(dir, name)
    }

    pub fn name(&self) -> String {
        let file = self.sidecar.file_name().unwrap_or_default().to_string_lossy();
        file.trim_end_matches(".meta.json").to_string()
    }

    pub fn all(&self) -> [&Path; 3] {
        [&self.weights, &self.optim, &self.sidecar]
    }
}

/// Why a checkpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{0}: no such checkpoint (its sidecar is missing, so it was never completed)")]
    Missing(PathBuf),
    #[error("{path}: unreadable sidecar: {reason}")]
    Sidecar { path: PathBuf, reason: String },
    #[error("{path}: sidecar format_version {found} is not supported (this kiln reads 1 and {FORMAT_VERSION})")]
    Version { path: PathBuf, found: u32 },
    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },
}

fn one() -> usize {
    1
}

impl Sidecar {
    /// Windows per optimizer step of the run that wrote this checkpoint.
    pub fn global_batch(&self) -> usize {
        self.global_batch.unwrap_or(self.config.training.batch_size)
    }

    pub fn read(path: &Path) -> Result<Self, CheckpointError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(CheckpointError::Missing(path.to_path_buf()));
            }
            Err(e) => {
                return Err(CheckpointError::Sidecar {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        };
        // Check the version before the full schema, so an old or future file says so.
        let version = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("format_version").and_then(|v| v.as_u64()));
        if let Some(found) = version
            && !READABLE_VERSIONS.iter().any(|v| u64::from(*v) == found)
        {
            return Err(CheckpointError::Version {
                path: path.to_path_buf(),
                found: found as u32,
            });
        }
        let mut sidecar: Self = serde_json::from_str(&text).map_err(|e| CheckpointError::Sidecar {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if sidecar.format_version == 1
            && let Some(shape) = sidecar.model.llama_shape()
        {
            // Version 1 kept no initializer_range beside the shape; the run's config has it.
            let range = sidecar.config.model.initializer_range;
            sidecar.model = ArchConfig::of_shape(Architecture::Llama, &shape, range);
        }
        sidecar.model.check(&format!("{} `model`", path.display())).map_err(|e| CheckpointError::Sidecar {
            path: path.to_path_buf(),
            reason: format!("{e:#}"),
        })?;
        sidecar.check_roles().map_err(|reason| CheckpointError::Sidecar {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(sidecar)
    }

    /// A checkpoint is one weights file and one optimizer file. Anything else is refused before
    /// a file is opened (each recorded file is hashed on a thread of its own, so a sidecar
    /// listing thousands must not get that far).
    fn check_roles(&self) -> Result<(), String> {
        let mut roles: Vec<&str> = self.files.iter().map(|f| f.role.as_str()).collect();
        roles.sort_unstable();
        if roles != ["optimizer", "weights"] {
            let listed = match roles.len() {
                0 => "none".to_string(),
                1..=4 => roles.join(", "),
                _ => format!("{}, ...", roles[..4].join(", ")),
            };
            return Err(format!(
                "`files` must record one `weights` and one `optimizer` file; it records {} ({listed})",
                roles.len(),
            ));
        }
        Ok(())
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("sidecars always serialize")
    }

    /// Checks every tensor file against the size and SHA-256 recorded here.
    pub fn verify_files(&self, dir: &Path) -> Result<(), CheckpointError> {
        self.verify_files_at(|name| dir.join(name))
    }

    /// Like [`Sidecar::verify_files`], with the file of each recorded name given by `locate`
    /// (e.g. the backup copy of a checkpoint being replaced).
    pub fn verify_files_at(&self, locate: impl Fn(&str) -> PathBuf) -> Result<(), CheckpointError> {
        self.start_verifying(locate)?.finish()
    }

    /// Starts hashing every tensor file on a thread of its own (hashing dominates loading and
    /// the files are independent) and returns at once, so that the caller can read the files
    /// meanwhile. Names that leave the checkpoint directory are refused before anything is read.
    pub fn start_verifying(&self, locate: impl Fn(&str) -> PathBuf) -> Result<Verification, CheckpointError> {
        for entry in &self.files {
            entry.check_name(&locate(&entry.name))?;
        }
        let checks = self
            .files
            .iter()
            .map(|entry| {
                let path = locate(&entry.name);
                let (entry, file) = (entry.clone(), path.clone());
                std::thread::Builder::new()
                    .name("kiln-verify".into())
                    .spawn(move || entry.verify(file))
                    .map_err(|e| CheckpointError::File {
                        path,
                        problem: format!("cannot start verifying: {e}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Verification { checks })
    }
}

/// The checksums of a checkpoint's tensor files, being verified on background threads.
#[derive(Debug)]
#[must_use = "a checkpoint is verified only once `finish` says so"]
pub struct Verification {
    checks: Vec<std::thread::JoinHandle<Result<(), CheckpointError>>>,
}

impl Verification {
    /// Waits for every file; the first failure in the sidecar's file order.
    pub fn finish(mut self) -> Result<(), CheckpointError> {
        self.join()
    }

    fn join(&mut self) -> Result<(), CheckpointError> {
        let mut result = Ok(());
        for check in self.checks.drain(..) {
            let checked = check.join().expect("hashing threads do not panic");
            if result.is_ok() {
                result = checked;
            }
        }
        result
    }
}

impl Drop for Verification {
    /// Abandoned (an error elsewhere came first): no thread outlives it reading the files.
    fn drop(&mut self) {
        let _ = self.join();
    }
}

impl FileEntry {
    pub fn new(role: &str, name: &str, digest: FileDigest) -> Self {
        Self {
            role: role.into(),
            name: name.into(),
            bytes: digest.bytes,
            sha256: digest.sha256,
        }
    }

    /// A sidecar names its files relative to its own directory and never outside it.
    fn check_name(&self, path: &Path) -> Result<(), CheckpointError> {
        if self.name.contains('/') || self.name.contains('\\') || self.name.starts_with('.') {
            return Err(CheckpointError::File {
                path: path.to_path_buf(),
                problem: "the sidecar names a file outside the checkpoint directory".into(),
            });
        }
        Ok(())
    }

    /// Hashes the file at `path` and compares its size and SHA-256 with this record.
    fn verify(&self, path: PathBuf) -> Result<(), CheckpointError> {
        let found = digest_file(&path).map_err(|e| CheckpointError::File {
            path: path.clone(),
            problem: format!("cannot read: {e}"),
        })?;
        if found.bytes != self.bytes {
            return Err(CheckpointError::File {
                path,
                problem: format!(
                    "is {} bytes but the sidecar recorded {} (truncated or replaced)",
                    found.bytes, self.bytes
                ),
            });
        }
        if found.sha256 != self.sha256 {
            return Err(CheckpointError::File {
                path,
                problem: "SHA-256 does not match the sidecar (the file is corrupted)".into(),
            });
        }
        Ok(())
    }
}
