//! Loading a Hugging Face Llama directory (or a kiln bundle, which is one): `config.json`,
//! `model.safetensors` or shards with `model.safetensors.index.json`, and `tokenizer.json`.
//!
//! Tensors may be F32, F16 or BF16 (computation is in f32). A tied head is stored once, under
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
use crate::model::{LlamaForCausalLM, LlamaShape};
use crate::params;
use crate::safetensors_io::SafetensorsFile;
use crate::tokenizer::KilnTokenizer;

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
}

pub struct Pretrained {
    pub dir: PathBuf,
    pub shape: LlamaShape,
    pub initializer_range: f64,
    pub model: LlamaForCausalLM,
    /// `tokenizer.json`, when the directory has one.
    pub tokenizer: Option<KilnTokenizer>,
    pub report: LoadReport,
    /// `training_metadata.json` of a kiln bundle.
    pub training_metadata: Option<Value>,
}

/// Reads `config.json` as a Llama architecture kiln can run.
pub fn read_config(dir: &Path) -> Result<(LlamaShape, f64)> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (is {} a model directory?)", path.display(), dir.display()))?;
    let c: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let model_type = c["model_type"].as_str().unwrap_or("");
    if model_type != "llama" {
        bail!("{}: model_type is {:?}; kiln runs Llama models (model_type \"llama\")", path.display(), c["model_type"]);
    }
    let int = |key: &str| -> Result<usize> {
        c[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| anyhow!("{}: `{key}` is missing or not a whole number", path.display()))
    };
    let num_heads = int("num_attention_heads")?;
    let hidden_size = int("hidden_size")?;
    let num_kv_heads = match c.get("num_key_value_heads") {
        Some(Value::Null) | None => num_heads,
        Some(_) => int("num_key_value_heads")?,
    };
    if let Some(head_dim) = c["head_dim"].as_u64()
        && head_dim as usize * num_heads != hidden_size
    {
        bail!("{}: head_dim {head_dim} x {num_heads} heads != hidden_size {hidden_size}; kiln needs head_dim = hidden_size / num_attention_heads", path.display());
    }
    // transformers 5 nests RoPE settings under `rope_parameters`; 4.x has `rope_theta` and
    // `rope_scaling` at the top.
    let rope = c.get("rope_parameters").filter(|v| v.is_object());
    let rope_theta = rope
        .and_then(|r| r["rope_theta"].as_f64())
        .or_else(|| c["rope_theta"].as_f64())
        .unwrap_or(10000.0);
    let rope_type = rope
        .and_then(|r| r["rope_type"].as_str().map(str::to_owned))
        .or_else(|| c["rope_scaling"].get("rope_type").and_then(|t| t.as_str()).map(str::to_owned))
        .unwrap_or_else(|| "default".to_string());
    if rope_type != "default" {
        bail!("{}: RoPE scaling `{rope_type}` is not supported by kiln (only the default rotary embedding)", path.display());
    }
    for flag in ["attention_bias", "mlp_bias"] {
        if c[flag].as_bool() == Some(true) {
            bail!("{}: `{flag}` = true is not supported by kiln (Llama layers without biases only)", path.display());
        }
    }
    if let Some(act) = c["hidden_act"].as_str()
        && act != "silu"
    {
        bail!("{}: hidden_act `{act}` is not supported (Llama uses silu)", path.display());
    }
    let shape = LlamaShape {
        vocab_size: int("vocab_size")?,
        hidden_size,
        num_layers: int("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        intermediate_size: int("intermediate_size")?,
        max_position_embeddings: int("max_position_embeddings")?,
        rope_theta,
        rms_norm_eps: c["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        tie_word_embeddings: c["tie_word_embeddings"].as_bool().unwrap_or(false),
    };
    if shape.num_heads == 0 || shape.num_kv_heads == 0 || shape.num_heads % shape.num_kv_heads != 0 || shape.head_dim() % 2 != 0 {
        bail!("{}: unsupported head configuration ({} heads, {} key/value heads, hidden {})", path.display(), shape.num_heads, shape.num_kv_heads, shape.hidden_size);
    }
    Ok((shape, c["initializer_range"].as_f64().unwrap_or(0.02)))
}

/// The weight files of a directory: every stored tensor name with the file holding it.
pub struct WeightFiles {
    files: Vec<SafetensorsFile>,
    /// Stored name -> index into `files`.
    pub names: BTreeMap<String, usize>,
}

impl WeightFiles {
    pub fn open(dir: &Path) -> Result<Self> {
        let single = dir.join(WEIGHTS_FILE);
        let index = dir.join(INDEX_FILE);
        let file_names: Vec<String> = if index.exists() {
            let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
            let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", index.display()))?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| anyhow!("{}: no `weight_map`", index.display()))?;
            let mut files: Vec<String> = map
                .values()
                .map(|f| f.as_str().map(str::to_owned).ok_or_else(|| anyhow!("{}: weight_map values must be file names", index.display())))
                .collect::<Result<_>>()?;
            files.sort();
            files.dedup();
            files
        } else if single.exists() {
            vec![WEIGHTS_FILE.to_string()]
        } else {
            bail!("{} has neither {WEIGHTS_FILE} nor {INDEX_FILE}", dir.display());
        };
        let mut files = Vec::new();
        let mut names = BTreeMap::new();
        for name in file_names {
            if name.contains('/') || name.contains('\\') || name.starts_with('.') {
                bail!("{}: shard name `{name}` points outside the directory", index.display());
            }
            let file = SafetensorsFile::open(&dir.join(&name))?;
            for (tensor, ..) in file.tensors() {
                if names.insert(tensor.clone(), files.len()).is_some() {
                    bail!("{}: tensor `{tensor}` is stored twice", dir.display());
                }
            }
            files.push(file);
        }
        Ok(Self { files, names })
    }

    /// The weight files, in file-name order.
    pub fn files(&self) -> &[SafetensorsFile] {
        &self.files
    }
}

/// kiln's parameters from a directory's weight files, noting which stored tensors were used
/// and which parameters the files lack.
struct DirSource<'a> {
    weights: &'a WeightFiles,
    /// kiln name -> stored name.
    available: &'a BTreeMap<String, String>,
    /// With partial loading, parameters the files lack keep these initial values.
    initial: Option<BTreeMap<String, Vec<f32>>>,
    used: BTreeSet<String>,
    missing: Vec<String>,
}

impl<'a> DirSource<'a> {
    /// The file and stored name of parameter `name`, if the files have it.
    fn find(&mut self, name: &str) -> Option<(&'a SafetensorsFile, &'a str)> {
        let stored = self.available.get(name)?;
        self.used.insert(stored.clone());
        let file = &self.weights.files[self.weights.names[stored]];
        Some((file, stored))
    }

    /// What a parameter the files lack gets (Hugging Face layout), or the error.
    fn fallback(&mut self, name: &str) -> Result<Vec<f32>, String> {
        self.missing.push(name.to_string());
        match &self.initial {
            Some(init) => Ok(init[name].clone()),
            None => Err(format!("missing tensor `{name}`")),
        }
    }
}

impl params::ParamSource for DirSource<'_> {
    fn values(&mut self, name: &str, hf_shape: &[usize]) -> Result<Vec<f32>, String> {
        match self.find(name) {
            Some((mut file, stored)) => file.values(stored, hf_shape),
            None => self.fallback(name),
        }
    }

    fn transposed_values(&mut self, name: &str, hf_shape: &[usize]) -> Result<Vec<f32>, String> {
        match (self.find(name), hf_shape) {
            (Some((mut file, stored)), _) => file.transposed_values(stored, hf_shape),
            (None, &[rows, cols]) => Ok(params::transpose(&self.fallback(name)?, rows, cols)),
            (None, _) => self.fallback(name),
        }
    }
}

/// Loads a model directory onto `device`.
pub fn load(dir: &Path, device: &Device, options: &LoadOptions) -> Result<Pretrained> {
    let (shape, initializer_range) = read_config(dir)?;
    let weights = WeightFiles::open(dir)?;
    // kiln name -> stored name.
    let mut available: BTreeMap<String, String> = BTreeMap::new();
    let mut renamed = Vec::new();
    for stored in weights.names.keys() {
        let mapped = options.map_name(stored);
        if mapped != *stored {
            renamed.push((stored.clone(), mapped.clone()));
        }
        available.insert(mapped, stored.clone());
    }
    // With partial loading, tensors the files lack keep a fresh model's initial values;
    // without it, loading replaces every parameter or fails.
    let (model, initial) = if options.allow_partial {
        let model = LlamaForCausalLM::init(&shape, initializer_range, 0.0, 0, device);
        let initial: BTreeMap<String, Vec<f32>> = params::named_tensors(&model)
            .into_iter()
            .map(|t| (t.name, t.values))
            .collect();
        (model, Some(initial))
    } else {
        (LlamaForCausalLM::for_loading(&shape, 0.0, device), None)
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
    let unexpected: Vec<String> = weights
        .names
        .keys()
        .filter(|n| !used.contains(*n))
        .cloned()
        .collect();
    let tokenizer_path = dir.join("tokenizer.json");
    let tokenizer = if tokenizer_path.exists() {
        Some(KilnTokenizer::from_file(&tokenizer_path)?)
    } else {
        None
    };
    if let Some(t) = &tokenizer
        && t.vocab_size() > shape.vocab_size
    {
        bail!(
            "{}: the tokenizer has {} tokens but the model's vocab_size is {}",
            dir.display(),
            t.vocab_size(),
            shape.vocab_size
        );
    }
    let training_metadata = std::fs::read_to_string(dir.join("training_metadata.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    Ok(Pretrained {
        dir: dir.to_path_buf(),
        shape,
        initializer_range,
        model,
        tokenizer,
        report: LoadReport {
            missing,
            unexpected,
            renamed,
        },
        training_metadata,
    })
}
