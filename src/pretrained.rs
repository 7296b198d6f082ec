//! Loading a Hugging Face model directory (or a kiln bundle, which is one) of an architecture
//! kiln runs (`model`): `config.json`, `model.safetensors` or shards with
//! `model.safetensors.index.json`, and `tokenizer.json` with its special tokens.
//!
//! Weights are safetensors or, when a directory has none, PyTorch's `pytorch_model.bin` (or its
//! shards; see `pytorch`). Tensors may be F32, F16 or BF16 (computation is in f32). A tied head is stored once, under
//! `model.embed_tokens.weight`. Weights saved under other names are mapped with regex rules
//! (`pattern=replacement`, applied in order to each stored name); every expected tensor that is
//! not found is reported as missing and every stored tensor that is not used as unexpected.
//! Missing tensors are an error unless partial loading is asked for explicitly, in which case
//! they keep their fresh initialisation.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::Device;
use regex::Regex;
use serde_json::Value;

use crate::export::{INDEX_FILE, WEIGHTS_FILE};
use crate::model::{ArchConfig, CausalLm};
use crate::params;
use crate::pytorch::{TORCH_INDEX_FILE, TORCH_WEIGHTS_FILE, TorchWeights};
use crate::safetensors_io::SafetensorsFile;
use crate::tokenizer::KilnTokenizer;
use crate::weight_index::weight_files;

/// How to match stored tensors to kiln's parameters.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `(pattern, replacement)` rules applied in order to every stored tensor name.
    pub key_map: Vec<(Regex, String)>,
    /// Keep the fresh initialisation of tensors the files lack instead of failing.
    pub allow_partial: bool,
}

impl LoadOptions {
    /// Parses `pattern=replacement` rules (regex syntax, `$1` for groups).
    pub fn with_rules(rules: &[String]) -> Result<Self> {
        let mut key_map = Vec::new();
        for rule in rules {
            let (pattern, replacement) = rule
                .split_once('=')
                .ok_or_else(|| anyhow!("key map rule `{rule}`: expected PATTERN=REPLACEMENT"))?;
            let regex = Regex::new(pattern)
                .with_context(|| format!("key map rule `{rule}`: invalid regex"))?;
            key_map.push((regex, replacement.to_string()));
        }
        Ok(Self {
            key_map,
            allow_partial: false,
        })
    }

    fn map_name(&self, name: &str) -> String {
        let mut name = name.to_string();
        for (re, replacement) in &self.key_map {
            name = re.replace_all(&name, replacement.as_str()).into_owned();
        }
        name
    }
}

/// What loading matched.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    /// Expected tensors the files lack (only non-empty with `allow_partial`).
    pub missing: Vec<String>,
    /// Stored tensors that no parameter used.
    pub unexpected: Vec<String>,
    /// Stored names that the key map changed, as (stored, used-as).
    pub renamed: Vec<(String, String)>,
    /// Layer indices with gaps (a pruned model) loaded in order, as (stored, used-as).
    pub reindexed_layers: Vec<(usize, usize)>,
}

pub struct Pretrained {
    pub dir: PathBuf,
    /// The directory's `config.json`.
    pub arch: ArchConfig,
    pub model: CausalLm,
    /// `tokenizer.json`, when the directory has one.
    pub tokenizer: Option<KilnTokenizer>,
    pub report: LoadReport,
    /// `training_metadata.json` of a kiln bundle.
    pub training_metadata: Option<Value>,
}

/// The weight files of a directory: every stored tensor name with the file holding it.
pub struct WeightFiles {
    files: Vec<SafetensorsFile>,
    /// Stored name -> index into `files`.
    pub names: BTreeMap<String, usize>,
}

impl WeightFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        let Some(located) = weight_files(dir, WEIGHTS_FILE, INDEX_FILE)? else {
            bail!("{} has neither {WEIGHTS_FILE} nor {INDEX_FILE}", dir.display());
        };
        let mut files = Vec::new();
        let mut names = BTreeMap::new();
        for name in &located.files {
            let file = SafetensorsFile::open(&dir.join(name))?;
            for (tensor, ..) in file.tensors() {
                if names.insert(tensor.clone(), files.len()).is_some() {
                    bail!("{}: tensor `{tensor}` is stored twice", dir.display());
                }
            }
            files.push(file);
        }
        if let Some(index) = &located.index {
            index.check(|tensor| names.get(tensor).map(|&i| located.files[i].as_str()))?;
        }
        Ok(Self { files, names })
    }

    /// The weight files, in file-name order.
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }
}

/// A directory's weights: safetensors, preferred when present, else PyTorch's
/// `pytorch_model.bin` (or its shards).
pub(crate) enum Stored {
    Safetensors(WeightFiles),
    Torch(TorchWeights),
}

impl Stored {
    pub(crate) fn open(dir: &Path) -> Result<Self> {
        if dir.join(WEIGHTS_FILE).exists() || dir.join(INDEX_FILE).exists() {
            return WeightFiles::open(dir).map(Stored::Safetensors);
        }
        match TorchWeights::open(dir)? {
            Some(torch) => Ok(Stored::Torch(torch)),
            None => bail!(
                "{} has no weights: neither {WEIGHTS_FILE}, {INDEX_FILE}, {TORCH_WEIGHTS_FILE} nor {TORCH_INDEX_FILE}",
                dir.display()
            ),
        }
    }

    /// Every stored tensor name.
    pub(crate) fn names(&self) -> Vec<String> {
        match self {
            Stored::Safetensors(w) => w.names.keys().cloned().collect(),
            Stored::Torch(w) => w.names().keys().cloned().collect(),
        }
    }

    /// The shape of stored tensor `stored`, if there is one of that name.
    pub(crate) fn shape(&self, stored: &str) -> Option<Vec<usize>> {
        match self {
            Stored::Safetensors(w) => w.names.get(stored).and_then(|&i| w.files[i].info(stored).ok()).map(|info| info.shape.clone()),
            Stored::Torch(w) => w.names().get(stored).map(|t| t.shape.clone()),
        }
    }

    /// Tensor `stored` in Hugging Face layout, or (`transposed`) transposed to Burn's.
    pub(crate) fn read(&self, stored: &str, hf_shape: &[usize], transposed: bool) -> Result<Vec<f32>, String> {
        use params::ParamSource;
        match self {
            Stored::Safetensors(w) => {
                let mut file = &w.files[w.names[stored]];
                if transposed { file.transposed_values(stored, hf_shape) } else { file.values(stored, hf_shape) }
            }
            Stored::Torch(w) => {
                let mut source = w;
                if transposed { source.transposed_values(stored, hf_shape) } else { source.values(stored, hf_shape) }
            }
        }
    }
}

/// kiln's parameters from a directory's weight files, noting which stored tensors were used
/// and which parameters the files lack.
struct DirSource<'a> {
    weights: &'a Stored,
    /// kiln name -> stored name.
    available: &'a BTreeMap<String, String>,
    /// With partial loading, parameters the files lack keep these initial values.
    initial: Option<BTreeMap<String, Vec<f32>>>,
    used: BTreeSet<String>,
    missing: Vec<String>,
}

impl DirSource<'_> {
    /// Parameter `name` from the files, or what a parameter they lack gets (Hugging Face
    /// layout unless `transposed`), or the error.
    fn get(&mut self, name: &str, hf_shape: &[usize], transposed: bool) -> Result<Vec<f32>, String> {
        if let Some(stored) = self.available.get(name) {
            self.used.insert(stored.clone());
            return self.weights.read(stored, hf_shape, transposed);
        }
        self.missing.push(name.to_string());
        let values = match &self.initial {
            Some(init) => init[name].clone(),
            None => return Err(format!("missing tensor `{name}`")),
        };
        Ok(match *hf_shape {
            [rows, cols] if transposed => params::transpose(&values, rows, cols),
            _ => values,
        })
    }
}

impl params::ParamSource for DirSource<'_> {
    fn values(&mut self, name: &str, hf_shape: &[usize]) -> Result<Vec<f32>, String> {
        self.get(name, hf_shape, false)
    }

    fn transposed_values(&mut self, name: &str, hf_shape: &[usize]) -> Result<Vec<f32>, String> {
        self.get(name, hf_shape, true)
    }
}

/// Loads a model directory onto `device`.
pub fn load(dir: &Path, device: &Device, options: &LoadOptions) -> Result<Pretrained> {
    let arch = ArchConfig::read(dir)?;
    let weights = Stored::open(dir)?;
    // kiln name -> stored name.
    let mut available: BTreeMap<String, String> = BTreeMap::new();
    let mut renamed = Vec::new();
    let mut buffers = BTreeSet::new();
    let stored_names = weights.names();
    for stored in &stored_names {
        // Names as the architecture spells them (GPT-2's original checkpoints lack the
        // `transformer.` prefix and keep causal-mask buffers), then the user's rules.
        let Some(mapped) = arch.canonical_name(&options.map_name(stored)) else {
            buffers.insert(stored.clone());
            continue;
        };
        if mapped != *stored {
            renamed.push((stored.clone(), mapped.clone()));
        }
        if let Some(first) = available.insert(mapped.clone(), stored.clone()) {
            bail!(
                "{}: the key map sends both `{first}` and `{stored}` to `{mapped}`; make the rules \
                 tell them apart",
                dir.display()
            );
        }
    }
    let (available, reindexed_layers) = reindex_layers(available);
    // With partial loading, tensors the files lack keep a fresh model's initial values;
    // without it, loading replaces every parameter or fails.
    let (model, initial) = if options.allow_partial {
        let model = CausalLm::init(&arch, arch.initializer_range(), 0.0, 0, device);
        let initial: BTreeMap<String, Vec<f32>> = params::named_tensors(&model)
            .into_iter()
            .map(|t| (t.name, t.values))
            .collect();
        (model, Some(initial))
    } else {
        (CausalLm::for_loading(&arch, 0.0, device), None)
    };
    let mut source = DirSource {
        weights: &weights,
        available: &available,
        initial,
        used: BTreeSet::new(),
        missing: Vec::new(),
    };
    let loaded = params::load_named(model, &mut source);
    let DirSource { used, missing, .. } = source;
    let model = loaded.map_err(|errors| {
        let hint = if missing.is_empty() {
            ""
        } else {
            "
(map stored names with key map rules, or allow partial loading to keep the \
             initialisation of missing tensors)"
        };
        anyhow!("cannot load {}:\n  {}{hint}", dir.display(), errors.join("\n  "))
    })?;
    let unexpected: Vec<String> = stored_names
        .iter()
        .filter(|n| !used.contains(*n) && !buffers.contains(*n))
        .cloned()
        .collect();
    let tokenizer = KilnTokenizer::from_dir(dir)?;
    if let Some(t) = &tokenizer
        && t.vocab_size() > arch.vocab_size()
    {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocab_size is {}",
            dir.display(),
            t.vocab_size(),
            arch.vocab_size()
        );
    }
    let training_metadata = std::fs::read_to_string(dir.join("training_metadata.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    Ok(Pretrained {
        dir: dir.to_path_buf(),
        arch,
        model,
        tokenizer,
        report: LoadReport {
            missing,
            unexpected,
            renamed,
            reindexed_layers,
        },
        training_metadata,
    })
}

/// Renumbers layer indices with gaps (`model.layers.0`, `.2`, `.5` of a pruned model) to
/// `0, 1, 2` in their order, as Burn's recorders do; returns the (stored, used-as) pairs of the
/// indices that changed. Names are `kiln name -> stored name`.
fn reindex_layers(available: BTreeMap<String, String>) -> (BTreeMap<String, String>, Vec<(usize, usize)>) {
    let layer = Regex::new(r"^(model\.layers\.|transformer\.h\.)(\d+)\.").expect("a valid regex");
    let indices: BTreeSet<usize> = available
        .keys()
        .filter_map(|n| layer.captures(n).and_then(|c| c[2].parse().ok()))
        .collect();
    let order: BTreeMap<usize, usize> = indices.iter().enumerate().map(|(new, &old)| (old, new)).collect();
    let changed: Vec<(usize, usize)> = order.iter().filter(|(old, new)| old != new).map(|(&o, &n)| (o, n)).collect();
    if changed.is_empty() {
        return (available, changed);
    }
    let renamed = available
        .into_iter()
        .map(|(name, stored)| {
            let name = match layer.captures(&name).and_then(|c| Some((c[1].to_string(), c[2].parse::<usize>().ok()?, c[0].len()))) {
                Some((prefix, old, end)) => format!("{prefix}{}.{}", order[&old], &name[end..]),
                None => name,
            };
            (name, stored)
        })
        .collect();
    (renamed, changed)
}
