//! A model's files read tensor by tensor, as the model tools (`kiln merge`, `kiln quantize`)
//! need them: a Hugging Face directory or kiln bundle (`config.json`, safetensors or PyTorch
//! weights, `tokenizer.json`), or a kiln checkpoint (its weights file and sidecar). Tensors come
//! out by their Hugging Face names, in Hugging Face layout, as f32, one at a time, so a tool's
//! memory is a few tensors rather than whole models.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};

use crate::model::ArchConfig;
use crate::params::ParamSource;
use crate::pretrained::Stored;
use crate::safetensors_io::SafetensorsFile;
use crate::tokenizer::KilnTokenizer;

/// One tensor on the host: its shape and its values in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

enum Weights {
    Dir(Stored),
    Checkpoint(Box<SafetensorsFile>),
}

pub struct ModelFiles {
    /// The directory or checkpoint file, as given.
    pub path: PathBuf,
    pub arch: ArchConfig,
    pub tokenizer: Option<KilnTokenizer>,
    /// `training_metadata.json` of a kiln bundle.
    pub training_metadata: Option<serde_json::Value>,
    weights: Weights,
    /// Hugging Face parameter name -> the name it is stored under.
    stored: BTreeMap<String, String>,
}

impl ModelFiles {
    /// Opens a model directory or a kiln checkpoint (any of its three files; its checksums are
    /// verified first).
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            let arch = ArchConfig::read(path)?;
            let weights = Stored::open(path)?;
            let mut stored = BTreeMap::new();
            for name in weights.names() {
                if let Some(canonical) = arch.canonical_name(&name)
                    && let Some(first) = stored.insert(canonical.clone(), name.clone())
                {
                    bail!("{}: both `{first}` and `{name}` hold `{canonical}`", path.display());
                }
            }
            let training_metadata = std::fs::read_to_string(path.join("training_metadata.json")).ok().and_then(|t| serde_json::from_str(&t).ok());
            let model = Self { path: path.to_owned(), arch, tokenizer: KilnTokenizer::from_dir(path)?, training_metadata, weights: Weights::Dir(weights), stored };
            model.check_complete()?;
            return Ok(model);
        }
        if !path.exists() {
            bail!("{} does not exist", path.display());
        }
        let ck = crate::checkpoint::load(path).with_context(|| format!("{} is neither a model directory nor a readable kiln checkpoint", path.display()))?;
        let s = &ck.sidecar;
        let tokenizer = KilnTokenizer::from_json(&s.tokenizer.to_string(), s.special_tokens.clone()).context("the checkpoint's tokenizer")?;
        let stored = s.model.hf_param_names().into_iter().map(|n| (n.clone(), n)).collect();
        let model = Self {
            path: path.to_owned(),
            arch: s.model.clone(),
            tokenizer: Some(tokenizer),
            training_metadata: None,
            weights: Weights::Checkpoint(Box::new(ck.weights)),
            stored,
        };
        model.check_complete()?;
        Ok(model)
    }

    fn check_complete(&self) -> Result<()> {
        if let Some(missing) = self.arch.hf_param_names().into_iter().find(|n| !self.stored.contains_key(n)) {
            bail!("{}: tensor `{missing}` is missing", self.path.display());
        }
        Ok(())
    }

    /// The model's parameters, by Hugging Face name, in state-dict order.
    pub fn names(&self) -> Vec<String> {
        self.arch.hf_param_names()
    }

    /// The shape of parameter `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let stored = self.stored_name(name)?;
        match &self.weights {
            Weights::Dir(w) => w.shape(stored),
            Weights::Checkpoint(f) => f.info(stored).ok().map(|i| i.shape.clone()),
        }
        .ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", self.path.display()))
    }

    /// Parameter `name` as f32 (from F32, F16 or BF16) in Hugging Face layout.
    pub fn read(&self, name: &str) -> Result<HostTensor> {
        let shape = self.shape(name)?;
        let stored = self.stored_name(name)?;
        let values = match &self.weights {
            Weights::Dir(w) => w.read(stored, &shape, false),
            Weights::Checkpoint(f) => (&**f).values(stored, &shape),
        }
        .map_err(|e| anyhow!("{}: {e}", self.path.display()))?;
        Ok(HostTensor { shape, values })
    }

    fn stored_name(&self, name: &str) -> Result<&str> {
        self.stored.get(name).map(String::as_str).ok_or_else(|| anyhow!("{}: tensor `{name}` is missing", self.path.display()))
    }
}
