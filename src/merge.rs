//! `kiln merge --config RECIPE.yml --out DIR`: mergekit's YAML recipes, run with mergekit's
//! semantics (mergekit 0.1.5 is the reference; tests/python/merge_check.py runs both) over kiln
//! bundles, kiln checkpoints and Hugging Face directories of one architecture.
//!
//! A recipe names its inputs under `models:` (each with `parameters`) or `slices:` (`sources`
//! with `layer_range`, stacked into the output's layers), a `merge_method`, a `base_model`,
//! global `parameters` and a `dtype`. A parameter may be a scalar, a gradient (a list
//! interpolated over a slice's layers) or a list of `{filter, value}` picked by the first
//! filter that is a substring of the tensor's name; it is looked up on the model's source, then
//! the slice, then the recipe, then its default.
//!
//! Methods:
//! - `linear`: `sum(w_i x_i)`, divided by `sum(w_i)` unless `normalize: false`;
//! - `slerp`: spherical interpolation from the base (`t = 0`) to the other model (`t = 1`) of
//!   the whole flattened tensor, linear where the two are nearly parallel;
//! - `task_arithmetic`, `ties`, `dare_ties`, `dare_linear`: the base plus the weighted task
//!   vectors `d_i = x_i - base`, each first sparsified (TIES: its `density` largest
//!   magnitudes; DARE: a random `density` share, seeded by `--seed` and the tensor's name,
//!   rescaled to keep its L1 norm), signs elected by the weighted sum (TIES), `normalize` and
//!   `lambda` as mergekit has them.
//!
//! Tensors are merged one at a time as the bundle writer reaches them: memory holds a few
//! tensors, not whole models. Differences from mergekit, on purpose: biases are merged like any
//! tensor (mergekit's Llama definition drops them, leaving a broken model), and under a 16-bit
//! `dtype` the arithmetic is f32 rounded once at the end (mergekit's task-arithmetic family
//! rounds after every operation). DARE's masks are kiln's own random draws, so they match
//! mergekit's in distribution, not bit for bit (mergekit draws from torch's global generator).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};
use rand::{Rng, SeedableRng};
use serde_json::{Value as Json, json};

use crate::config::ExportDtype;
use crate::export::{Bundle, ExportReport};
use crate::model::{ArchConfig, LlamaShape};
use crate::model_files::ModelFiles;
use crate::safetensors_io::{PendingTensor, TensorSource};

/// The merge methods kiln runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Linear,
    Slerp,
    TaskArithmetic,
    Ties,
    DareTies,
    DareLinear,
}

impl Method {
    fn parse(name: &str) -> Result<Self> {
        Ok(match name {
            "linear" => Method::Linear,
            "slerp" => Method::Slerp,
            "task_arithmetic" => Method::TaskArithmetic,
            "ties" => Method::Ties,
            "dare_ties" => Method::DareTies,
            "dare_linear" => Method::DareLinear,
            other => bail!("merge_method `{other}` is not one kiln runs (linear, slerp, task_arithmetic, ties, dare_ties, dare_linear)"),
        })
    }

    /// `normalize`'s default (mergekit's registry).
    fn normalizes(self) -> bool {
        matches!(self, Method::Linear | Method::Ties)
    }

    /// `rescale`'s default.
    fn rescales(self) -> bool {
        matches!(self, Method::DareTies | Method::DareLinear)
    }
}

/// One input of a slice.
#[derive(Debug, Clone)]
struct Source {
    model: String,
    layers: (usize, usize),
    parameters: Json,
}

#[derive(Debug, Clone)]
struct Slice {
    sources: Vec<Source>,
    parameters: Json,
    base_model: Option<String>,
}

/// A parsed recipe, `models:` already turned into one slice over every layer.
#[derive(Debug, Clone)]
pub struct Recipe {
    method: Method,
    base_model: Option<String>,
    parameters: Json,
    slices: Vec<Slice>,
    dtype: Option<ExportDtype>,
    out_dtype: Option<ExportDtype>,
    /// The recipe as written, for the model card.
    text: String,
}

/// YAML as JSON values (mergekit's recipes use maps, lists and scalars only).
fn yaml_to_json(yaml: &yaml_rust2::Yaml) -> Result<Json> {
    use yaml_rust2::Yaml;
    Ok(match yaml {
        Yaml::Real(s) => json!(yaml.as_f64().ok_or_else(|| anyhow!("`{s}` is not a number"))?),
        Yaml::Integer(i) => json!(i),
        Yaml::String(s) => Json::String(s.clone()),
        Yaml::Boolean(b) => Json::Bool(*b),
        Yaml::Array(items) => Json::Array(items.iter().map(yaml_to_json).collect::<Result<_>>()?),
        Yaml::Hash(map) => {
            let mut out = serde_json::Map::new();
            for (k, v) in map {
                let key = match k {
                    Yaml::String(s) => s.clone(),
                    Yaml::Integer(i) => i.to_string(),
                    other => bail!("a map key {other:?} is not a string"),
                };
                out.insert(key, yaml_to_json(v)?);
            }
            Json::Object(out)
        }
        Yaml::Null => Json::Null,
        Yaml::Alias(_) | Yaml::BadValue => bail!("YAML aliases are not read"),
    })
}

fn dtype_of(value: &Json, key: &str) -> Result<Option<ExportDtype>> {
    match value {
        Json::Null => Ok(None),
        Json::String(s) => ExportDtype::parse(s.trim_start_matches("torch.")).map(Some).ok_or_else(|| anyhow!("`{key}`: {s:?} is not float32, bfloat16 or float16")),
        other => bail!("`{key}`: {other} is not a dtype name"),
    }
}

impl Recipe {
    pub fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("merge recipe {}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let docs = yaml_rust2::YamlLoader::load_from_str(text).map_err(|e| anyhow!("not YAML: {e}"))?;
        let [doc] = docs.as_slice() else {
            bail!("expected one YAML document, found {}", docs.len());
        };
        let root = yaml_to_json(doc)?;
        let map = root.as_object().ok_or_else(|| anyhow!("the recipe is not a map"))?;
        const KNOWN: [&str; 9] = ["merge_method", "base_model", "parameters", "models", "slices", "dtype", "out_dtype", "tokenizer_source", "chat_template"];
        if let Some(key) = map.keys().find(|k| !KNOWN.contains(&k.as_str())) {
            bail!("`{key}` is not a recipe key kiln reads ({})", KNOWN.join(", "));
        }
        if map.get("tokenizer_source").is_some_and(|v| !v.is_null() && v != "base") {
            bail!("`tokenizer_source`: kiln keeps the base (or first) model's tokenizer; vocabularies are not merged");
        }
        let method = Method::parse(map.get("merge_method").and_then(Json::as_str).ok_or_else(|| anyhow!("`merge_method` is missing"))?)?;
        let model_ref = |v: &Json, key: &str| -> Result<String> {
            v.as_str().map(str::to_owned).or_else(|| v.get("model").and_then(Json::as_str).map(str::to_owned)).ok_or_else(|| anyhow!("`{key}` does not name a model"))
        };
        let base_model = map.get("base_model").filter(|v| !v.is_null()).map(|v| model_ref(v, "base_model")).transpose()?;
        let params = |v: Option<&Json>, key: &str| -> Result<Json> {
            match v {
                None | Some(Json::Null) => Ok(json!({})),
                Some(p @ Json::Object(_)) => Ok(p.clone()),
                Some(other) => bail!("`{key}` is not a map: {other}"),
            }
        };
        let slices = match (map.get("models"), map.get("slices")) {
            (Some(models), None) => {
                let models = models.as_array().ok_or_else(|| anyhow!("`models` is not a list"))?;
                let mut sources = Vec::new();
                for (i, m) in models.iter().enumerate() {
                    let model = model_ref(m, &format!("models[{i}].model"))?;
                    if sources.iter().any(|s: &Source| s.model == model) {
                        bail!("models[{i}]: `{model}` is listed twice");
                    }
                    sources.push(Source { model, layers: (0, usize::MAX), parameters: params(m.get("parameters"), &format!("models[{i}].parameters"))? });
                }
                if let Some(base) = &base_model
                    && !sources.iter().any(|s| &s.model == base)
                {
                    sources.push(Source { model: base.clone(), layers: (0, usize::MAX), parameters: json!({}) });
                }
                vec![Slice { sources, parameters: json!({}), base_model: None }]
            }
            (None, Some(slices)) => {
                let list = slices.as_array().ok_or_else(|| anyhow!("`slices` is not a list"))?;
                let mut out = Vec::new();
                for (i, s) in list.iter().enumerate() {
                    let what = format!("slices[{i}]");
                    let sources = s.get("sources").and_then(Json::as_array).ok_or_else(|| anyhow!("`{what}.sources` is missing"))?;
                    let mut parsed = Vec::new();
                    for (j, src) in sources.iter().enumerate() {
                        let what = format!("{what}.sources[{j}]");
                        let range = src.get("layer_range").and_then(Json::as_array).ok_or_else(|| anyhow!("`{what}.layer_range` is missing"))?;
                        let [a, b] = range.as_slice() else { bail!("`{what}.layer_range` is not [start, end]") };
                        let (a, b) = (a.as_u64().ok_or_else(|| anyhow!("`{what}.layer_range`: {a} is not a layer"))?, b.as_u64().ok_or_else(|| anyhow!("`{what}.layer_range`: {b} is not a layer"))?);
                        if b <= a {
                            bail!("`{what}.layer_range` [{a}, {b}] is empty");
                        }
                        parsed.push(Source { model: model_ref(src, &format!("{what}.model"))?, layers: (a as usize, b as usize), parameters: params(src.get("parameters"), &format!("{what}.parameters"))? });
                    }
                    if parsed.windows(2).any(|w| w[0].layers.1 - w[0].layers.0 != w[1].layers.1 - w[1].layers.0) {
                        bail!("`{what}`: all sources of a slice must hold the same number of layers");
                    }
                    let base = s.get("base_model").filter(|v| !v.is_null()).map(|v| model_ref(v, &format!("{what}.base_model"))).transpose()?;
                    out.push(Slice { sources: parsed, parameters: params(s.get("parameters"), &format!("{what}.parameters"))?, base_model: base });
                }
                if out.is_empty() {
                    bail!("`slices` is empty");
                }
                out
            }
            (Some(_), Some(_)) => bail!("a recipe has `models` or `slices`, not both"),
            (None, None) => bail!("a recipe needs `models` or `slices`"),
        };
        Ok(Self {
            method,
            base_model,
            parameters: params(map.get("parameters"), "parameters")?,
            slices,
            dtype: dtype_of(map.get("dtype").unwrap_or(&Json::Null), "dtype")?,
            out_dtype: dtype_of(map.get("out_dtype").unwrap_or(&Json::Null), "out_dtype")?,
            text: text.to_string(),
        })
    }

    /// Every model the recipe reads, in order of first mention.
    fn models(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for m in self.base_model.iter().chain(self.slices.iter().flat_map(|s| s.base_model.iter().chain(s.sources.iter().map(|x| &x.model)))) {
            if !out.contains(m) {
                out.push(m.clone());
            }
        }
        out
    }
}

/// mergekit's `evaluate_setting`: the value of `setting` for `tensor` at layer position `t`
/// (0 to 1 through a slice), or `None` where a filter list has no match.
fn evaluate(tensor: &str, setting: &Json, t: f64) -> Result<Option<Json>> {
    match setting {
        Json::Null => Ok(None),
        Json::Object(_) => evaluate(tensor, &Json::Array(vec![setting.clone()]), t),
        Json::Array(items) if items.is_empty() => Ok(None),
        Json::Array(items) if items.iter().all(|v| !v.is_object() && !v.is_array()) => {
            if items.iter().any(|v| !v.is_number()) {
                return Ok(Some(items[(t * (items.len() - 1) as f64) as usize].clone()));
            }
            let values: Vec<f64> = items.iter().filter_map(Json::as_f64).collect();
            let scaled = t * (values.len() - 1) as f64;
            let i0 = scaled as usize;
            let i1 = (i0 + 1).min(values.len() - 1);
            let frac = scaled - i0 as f64;
            Ok(Some(json!((1.0 - frac) * values[i0] + frac * values[i1])))
        }
        Json::Array(items) => {
            for item in items {
                let Some(cond) = item.as_object() else {
                    bail!("a parameter list mixes {{filter, value}} entries with {item}");
                };
                let filter = cond.get("filter").and_then(Json::as_str);
                if filter.is_none_or(|f| f == "*" || tensor.contains(f)) {
                    let value = cond.get("value").ok_or_else(|| anyhow!("a {{filter, value}} entry has no value"))?;
                    return evaluate(tensor, value, t);
                }
            }
            Ok(None)
        }
        scalar => Ok(Some(scalar.clone())),
    }
}

/// A parameter's value as mergekit validates it.
fn as_f64(value: &Json, name: &str) -> Result<f64> {
    match value {
        Json::Number(n) => Ok(n.as_f64().unwrap_or(f64::NAN)),
        Json::Bool(b) => Ok(f64::from(u8::from(*b))),
        Json::String(s) => s.trim().parse().map_err(|_| anyhow!("parameter `{name}`: {s:?} is not a number")),
        other => bail!("parameter `{name}`: {other} is not a number"),
    }
}

fn as_bool(value: &Json, name: &str) -> Result<bool> {
    match value {
        Json::Bool(b) => Ok(*b),
        Json::Number(n) if n.as_f64() == Some(0.0) || n.as_f64() == Some(1.0) => Ok(n.as_f64() == Some(1.0)),
        Json::String(s) if ["true", "false"].contains(&s.to_ascii_lowercase().as_str()) => Ok(s.eq_ignore_ascii_case("true")),
        other => bail!("parameter `{name}`: {other} is not a bool"),
    }
}

/// One output tensor and where it comes from.
#[derive(Debug, Clone)]
struct Planned {
    name: String,
    slice: usize,
    /// Each source's tensor name (its layer index where the slice takes other layers).
    inputs: Vec<String>,
    t: f64,
}

/// Where a layer tensor's name holds its layer index: Llama-family's and GPT-2's.
const LAYER_PREFIXES: [&str; 2] = ["model.layers.", "transformer.h."];

/// A layer tensor's name and its layer index.
fn split_layer(name: &str) -> Option<(&'static str, usize, &str)> {
    LAYER_PREFIXES.iter().find_map(|prefix| {
        let (layer, rest) = name.strip_prefix(prefix)?.split_once('.')?;
        Some((*prefix, layer.parse().ok()?, rest))
    })
}

fn with_layer(name: &str, layer: usize) -> String {
    match split_layer(name) {
        Some((prefix, _, rest)) => format!("{prefix}{layer}.{rest}"),
        None => name.to_string(),
    }
}

fn layer_of(name: &str) -> Option<usize> {
    split_layer(name).map(|(_, layer, _)| layer)
}

/// The tensors before the layers (embeddings), which come from the first slice; the others
/// outside the layers (final norm, head) come from the last.
fn is_embedding(name: &str) -> bool {
    matches!(name, crate::model::llama::EMBEDDING | "transformer.wte.weight" | "transformer.wpe.weight")
}

fn num_layers(arch: &ArchConfig) -> usize {
    match arch {
        ArchConfig::Gpt2(c) => c.n_layer,
        other => other.llama_shape().map_or(0, |s| s.num_layers),
    }
}

/// `arch` with `layers` layers.
fn with_layers(arch: &ArchConfig, layers: usize) -> ArchConfig {
    match arch {
        ArchConfig::Gpt2(c) => ArchConfig::Gpt2(crate::model::Gpt2Config { n_layer: layers, ..c.clone() }),
        other => {
            let shape = other.llama_shape().expect("a Llama-family architecture");
            ArchConfig::of_shape(other.architecture(), &LlamaShape { num_layers: layers, ..shape }, other.initializer_range())
        }
    }
}

pub struct Merger {
    recipe: Recipe,
    models: BTreeMap<String, ModelFiles>,
    arch: ArchConfig,
    plan: Vec<Planned>,
    seed: u64,
    /// The model whose config and tokenizer the output takes.
    donor: String,
}

impl Merger {
    /// Opens every model of `recipe` and plans the output: its architecture (the donor's, with
    /// the slices' layers) and each of its tensors' inputs.
    pub fn new(recipe: Recipe, seed: u64) -> Result<Self> {
        let mut models = BTreeMap::new();
        for name in recipe.models() {
            let files = ModelFiles::open(Path::new(&name)).with_context(|| format!("model `{name}`"))?;
            models.insert(name, files);
        }
        let donor = recipe.base_model.clone().unwrap_or_else(|| recipe.slices[0].sources[0].model.clone());
        let donor_arch = models[&donor].arch.clone();
        for (name, m) in &models {
            if m.arch.architecture() != donor_arch.architecture() {
                bail!("model `{name}` is a {}, the others {}: kiln merges models of one architecture", m.arch.architecture().class_name(), donor_arch.architecture().class_name());
            }
        }
        // Slices resolve their layer ranges; `models:` takes every layer of each model.
        let mut slices = recipe.slices.clone();
        for slice in &mut slices {
            for source in &mut slice.sources {
                let n = num_layers(&models[&source.model].arch);
                if source.layers.1 == usize::MAX {
                    source.layers = (0, n);
                }
                if source.layers.1 > n {
                    bail!("model `{}` has {n} layers; layer_range [{}, {}] runs past them", source.model, source.layers.0, source.layers.1);
                }
            }
            if slice.sources.windows(2).any(|w| w[0].layers.1 - w[0].layers.0 != w[1].layers.1 - w[1].layers.0) {
                bail!("all inputs to a slice must hold the same number of layers");
            }
        }
        let total_layers: usize = slices.iter().map(|s| s.sources[0].layers.1 - s.sources[0].layers.0).sum();
        let arch = if total_layers == num_layers(&donor_arch) { donor_arch.clone() } else { with_layers(&donor_arch, total_layers) };

        // Every output tensor: embeddings from the first slice, the final norm and head from
        // the last, both at t = 0; layer tensors at their place in their slice.
        let mut plan = Vec::new();
        let names = arch.hf_param_names();
        let (first, last) = (0, slices.len() - 1);
        for name in names.iter().filter(|n| layer_of(n).is_none()) {
            let slice = if is_embedding(name) { first } else { last };
            plan.push(Planned { name: name.clone(), slice, inputs: vec![name.clone(); slices[slice].sources.len()], t: 0.0 });
        }
        let mut out_layer = 0;
        for (s, slice) in slices.iter().enumerate() {
            let n = slice.sources[0].layers.1 - slice.sources[0].layers.0;
            for idx in 0..n {
                let t = if n > 1 { idx as f64 / (n - 1) as f64 } else { 1.0 };
                for name in names.iter().filter(|name| layer_of(name) == Some(out_layer)) {
                    let inputs = slice.sources.iter().map(|src| with_layer(name, src.layers.0 + idx)).collect();
                    plan.push(Planned { name: name.clone(), slice: s, inputs, t });
                }
                out_layer += 1;
            }
        }
        let recipe = Recipe { slices, ..recipe };
        // Shapes agree tensor by tensor before anything is written.
        for p in &plan {
            let src = &recipe.slices[p.slice].sources;
            let mut shapes = Vec::new();
            for (source, input) in src.iter().zip(&p.inputs) {
                let shape = models[&source.model].shape(input).with_context(|| format!("model `{}`", source.model))?;
                shapes.push((source.model.as_str(), input.as_str(), shape));
            }
            if let Some(w) = shapes.windows(2).find(|w| w[0].2 != w[1].2) {
                bail!("tensor `{}` is {:?} in `{}` but {:?} in `{}` ({}): shapes must match", w[0].1, w[0].2, w[0].0, w[1].2, w[1].0, w[1].1);
            }
        }
        Ok(Self { recipe, models, arch, plan, seed, donor })
    }

    /// The value of a parameter for one tensor: per-input (`source` given) looks at that
    /// source's parameters first; then the slice's; then the recipe's.
    fn parameter(&self, p: &Planned, source: Option<usize>, name: &str) -> Result<Option<Json>> {
        let slice = &self.recipe.slices[p.slice];
        let mut levels = Vec::new();
        if let Some(i) = source {
            levels.push((&slice.sources[i].parameters, p.inputs[i].as_str()));
        }
        levels.push((&slice.parameters, p.name.as_str()));
        levels.push((&self.recipe.parameters, p.name.as_str()));
        for (params, tensor) in levels {
            if let Some(setting) = params.get(name)
                && let Some(value) = evaluate(tensor, setting, p.t)?
            {
                return Ok(Some(value));
            }
        }
        Ok(None)
    }

    fn f64_param(&self, p: &Planned, source: Option<usize>, name: &str, default: Option<f64>) -> Result<f64> {
        match self.parameter(p, source, name)? {
            Some(v) => as_f64(&v, name),
            None => default.ok_or_else(|| {
                let model = source.map_or(String::new(), |i| format!(" of `{}`", self.recipe.slices[p.slice].sources[i].model));
                anyhow!("parameter `{name}`{model} is missing for tensor `{}`", p.name)
            }),
        }
    }

    fn bool_param(&self, p: &Planned, name: &str, default: bool) -> Result<bool> {
        self.parameter(p, None, name)?.map_or(Ok(default), |v| as_bool(&v, name))
    }

    /// The merged values of planned tensor `p`.
    fn merge_tensor(&self, p: &Planned) -> Result<Vec<f32>> {
        let slice = &self.recipe.slices[p.slice];
        let base = slice.base_model.as_ref().or(self.recipe.base_model.as_ref());
        let base_index = base.and_then(|b| slice.sources.iter().position(|s| &s.model == b));
        let read = |i: usize| -> Result<Vec<f32>> {
            let mut values = self.models[&slice.sources[i].model].read(&p.inputs[i])?.values;
            // mergekit casts what it loads to the recipe's dtype.
            if let Some(dtype) = self.recipe.dtype {
                crate::export::round_to(&mut values, dtype);
            }
            Ok(values)
        };
        let method = self.recipe.method;
        match method {
            Method::Linear => {
                let mut acc: Vec<f32> = Vec::new();
                let mut total = 0f32;
                for i in 0..slice.sources.len() {
                    let w = self.f64_param(p, Some(i), "weight", None)? as f32;
                    let x = read(i)?;
                    if acc.is_empty() {
                        acc = vec![0f32; x.len()];
                    }
                    acc.iter_mut().zip(&x).for_each(|(a, v)| *a += v * w);
                    total += w;
                }
                if self.bool_param(p, "normalize", true)? {
                    acc.iter_mut().for_each(|a| *a /= total);
                }
                Ok(acc)
            }
            Method::Slerp => {
                let b = base_index.ok_or_else(|| anyhow!("slerp needs a base_model among its models"))?;
                if slice.sources.len() != 2 {
                    bail!("slerp merges exactly two models (the base and one other), not {}", slice.sources.len());
                }
                let t = self.f64_param(p, None, "t", None)? as f32;
                let (a, other) = (read(b)?, read(1 - b)?);
                Ok(slerp(t, &a, &other))
            }
            _ => {
                let b = base_index.ok_or_else(|| anyhow!("{method:?} needs a base_model"))?;
                let base_values = read(b)?;
                let mut deltas = Vec::new();
                let mut weights = Vec::new();
                let rescale = self.bool_param(p, "rescale", method.rescales())?;
                for i in (0..slice.sources.len()).filter(|&i| i != b) {
                    let weight = self.f64_param(p, Some(i), "weight", None)? as f32;
                    let density = self.f64_param(p, Some(i), "density", Some(1.0))?;
                    let mut d: Vec<f32> = read(i)?.iter().zip(&base_values).map(|(x, b)| x - b).collect();
                    d = match method {
                        Method::Ties => magnitude(&d, density, rescale),
                        Method::DareTies | Method::DareLinear => {
                            let seed = tensor_seed(self.seed, &p.name, &slice.sources[i].model);
                            random(&d, density, rescale, seed)
                        }
                        _ => d,
                    };
                    d.iter_mut().for_each(|v| *v *= weight);
                    deltas.push(d);
                    weights.push(weight);
                }
                if deltas.is_empty() {
                    return Ok(base_values);
                }
                let normalize = self.bool_param(p, "normalize", method.normalizes())?;
                let lambda = self.f64_param(p, None, "lambda", Some(1.0))? as f32;
                let consensus = matches!(method, Method::Ties | Method::DareTies);
                Ok(combine(&base_values, &deltas, &weights, consensus, normalize, lambda))
            }
        }
    }

    /// Writes the merged model as a bundle in `out` (which must not exist): the donor's config
    /// (with the output's layers) and tokenizer, a model card with the recipe.
    pub fn write(self, out: &Path, max_shard_size: u64) -> Result<ExportReport> {
        let donor = &self.models[&self.donor];
        let tokenizer = donor.tokenizer.clone().ok_or_else(|| anyhow!("model `{}` has no tokenizer.json for the merged model", self.donor))?;
        let dtype = self.recipe.out_dtype.or(self.recipe.dtype).unwrap_or_default();
        let merger = Arc::new(self);
        let failure: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
        let mut tensors = Vec::new();
        for (index, p) in merger.plan.iter().enumerate() {
            let shape = merger.models[&merger.recipe.slices[p.slice].sources[0].model].shape(&p.inputs[0])?;
            let (m, failure) = (merger.clone(), failure.clone());
            let read = move || -> crate::safetensors_io::TensorBytes {
                let p = &m.plan[index];
                match m.merge_tensor(p).with_context(|| format!("tensor `{}`", p.name)) {
                    Ok(values) => crate::export::narrow_values(&values, dtype).into(),
                    Err(e) => {
                        failure.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert(e);
                        Vec::new().into()
                    }
                }
            };
            tensors.push(PendingTensor { name: p.name.clone(), dtype: crate::export::safetensors_dtype(dtype), shape, source: TensorSource::Host(Box::new(read)) });
        }
        let bundle = Bundle {
            arch: merger.arch.clone(),
            tensors,
            tokenizer: tokenizer.clone(),
            training_metadata: json!({
                "merge": {"method": format!("{:?}", merger.recipe.method), "recipe": merger.recipe.text, "models": merger.models.keys().collect::<Vec<_>>(), "seed": merger.seed},
                "kiln_version": env!("CARGO_PKG_VERSION"),
                "exported_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            }),
            loss_curve_svg: None,
            dtype,
            metadata: BTreeMap::from([("merge_method".to_string(), format!("{:?}", merger.recipe.method))]),
            card: Some(merger.card(&tokenizer)),
        };
        let written = crate::export::write_bundle(out, bundle, max_shard_size);
        if let Some(e) = failure.lock().unwrap_or_else(|e| e.into_inner()).take() {
            return Err(e.context(format!("cannot merge into {}", out.display())));
        }
        written
    }

    fn card(&self, tokenizer: &crate::tokenizer::KilnTokenizer) -> String {
        let class = self.arch.architecture().class_name();
        let models: Vec<String> = self.models.keys().map(|m| format!("- `{m}`")).collect();
        format!(
            "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- kiln\n- merge\n- {}\n---\n\n\
             # Merged model\n\n\
             A {class} of {} parameters ({} layers, {} tokenizer of `{}`), merged by kiln {} with \
             mergekit's `{:?}` semantics from:\n\n{}\n\n## Recipe\n\n```yaml\n{}\n```\n",
            self.arch.architecture().model_type(),
            self.arch.num_params(),
            num_layers(&self.arch),
            tokenizer.describe(),
            self.donor,
            env!("CARGO_PKG_VERSION"),
            self.recipe.method,
            models.join("\n"),
            self.recipe.text.trim_end(),
        )
    }
}

/// mergekit's slerp of two whole tensors, in f32: spherical from `a` (`t = 0`) to `b`, linear
/// where they are nearly parallel (|cos| > 0.9995).
fn slerp(t: f32, a: &[f32], b: &[f32]) -> Vec<f32> {
    let norm = |v: &[f32]| {
        let n = v.iter().map(|x| (*x as f64) * (*x as f64)).sum::<f64>().sqrt() as f32;
        if n > 1e-8 { n } else { 1.0 }
    };
    let (na, nb) = (norm(a), norm(b));
    let dot = a.iter().zip(b).map(|(x, y)| ((x / na) * (y / nb)) as f64).sum::<f64>().clamp(-1.0, 1.0) as f32;
    let (ca, cb) = if dot.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta = dot.acos();
        let s = theta.sin();
        (((1.0 - t) * theta).sin() / s, (t * theta).sin() / s)
    };
    a.iter().zip(b).map(|(x, y)| ca * x + cb * y).collect()
}

/// `masked * (sum|d| / sum|masked|)`: mergekit's L1 rescale of a sparsified task vector.
fn rescaled(d: &[f32], keep: &[bool], rescale: bool) -> Vec<f32> {
    let masked: Vec<f32> = d.iter().zip(keep).map(|(v, k)| if *k { *v } else { 0.0 }).collect();
    if !rescale {
        return masked;
    }
    let before: f32 = d.iter().map(|v| v.abs()).sum();
    let after: f32 = masked.iter().map(|v| v.abs()).sum();
    if before < 1e-7 || after < 1e-7 {
        return masked;
    }
    let scale = before / after;
    masked.into_iter().map(|v| v * scale).collect()
}

/// TIES' trim: keeps the `density` share of largest magnitudes of the whole tensor.
fn magnitude(d: &[f32], density: f64, rescale: bool) -> Vec<f32> {
    if density >= 1.0 {
        return d.to_vec();
    }
    if density <= 0.0 || d.is_empty() {
        return vec![0.0; d.len()];
    }
    let k = ((density * d.len() as f64) as usize).max(1);
    let mut order: Vec<usize> = (0..d.len()).collect();
    order.sort_by(|&i, &j| d[j].abs().total_cmp(&d[i].abs()));
    let mut keep = vec![false; d.len()];
    order[..k].iter().for_each(|&i| keep[i] = true);
    rescaled(d, &keep, rescale)
}

/// DARE's drop: keeps each value with probability `density`, from a stream seeded by `seed`.
fn random(d: &[f32], density: f64, rescale: bool, seed: u64) -> Vec<f32> {
    if density >= 1.0 {
        return d.to_vec();
    }
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let keep: Vec<bool> = d.iter().map(|_| rng.random::<f64>() < density).collect();
    rescaled(d, &keep, rescale)
}

/// A DARE mask's seed: the run's seed, the output tensor and the model, so that a mask does not
/// depend on the order tensors are written in.
fn tensor_seed(seed: u64, tensor: &str, model: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{seed}\0{tensor}\0{model}").as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The base plus the (weighted, sparsified) task vectors: with `consensus`, each element keeps
/// only the vectors whose sign agrees with their sum's (ties go to +), divided (`normalize`) by
/// the agreeing weights; without, all of them, divided by the sum of weights.
fn combine(base: &[f32], deltas: &[Vec<f32>], weights: &[f32], consensus: bool, normalize: bool, lambda: f32) -> Vec<f32> {
    let total_weight: f32 = weights.iter().sum();
    (0..base.len())
        .map(|e| {
            let (mut mixed, mut divisor) = (0f32, 0f32);
            if consensus {
                let sum: f32 = deltas.iter().map(|d| d[e]).sum();
                let majority = if sum >= 0.0 { 1.0 } else { -1.0 };
                for (d, w) in deltas.iter().zip(weights) {
                    let sign = if d[e] > 0.0 { 1.0 } else if d[e] < 0.0 { -1.0 } else { 0.0 };
                    if sign == majority {
                        mixed += d[e];
                        divisor += w;
                    }
                }
                if divisor == 0.0 {
                    divisor = 1.0;
                }
            } else {
                mixed = deltas.iter().map(|d| d[e]).sum();
                divisor = if total_weight.abs() < 1e-8 { 1.0 } else { total_weight };
            }
            if normalize {
                mixed /= divisor;
            }
            if lambda != 1.0 {
                mixed *= lambda;
            }
            base[e] + mixed
        })
        .collect()
}


#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gradients_interpolate_and_filters_pick_the_first_match() {
        let g = json!([0, 0.5, 0.3, 0.7, 1]);
        let v = evaluate("x", &g, 1.0 / 3.0).unwrap().unwrap().as_f64().unwrap();
        assert!((v - (2.0 / 3.0 * 0.5 + 1.0 / 3.0 * 0.3)).abs() < 1e-12);
        assert_eq!(evaluate("x", &g, 0.0).unwrap(), Some(json!(0.0)));
        let filtered = json!([{"filter": "self_attn", "value": 0.1}, {"filter": "mlp", "value": [0.0, 1.0]}]);
        assert_eq!(evaluate("model.layers.0.self_attn.q_proj.weight", &filtered, 0.5).unwrap(), Some(json!(0.1)));
        assert_eq!(evaluate("model.layers.0.mlp.up_proj.weight", &filtered, 0.5).unwrap(), Some(json!(0.5)));
        assert_eq!(evaluate("model.norm.weight", &filtered, 0.5).unwrap(), None);
    }

    #[test]
    fn ties_keeps_the_agreeing_signs_weighted_mean() {
        // Element 0: +2 (w 1) and -1 (w 1): sum +1, keeps +2 alone; element 1: both negative.
        let out = combine(&[10.0, 10.0], &[vec![2.0, -1.0], vec![-1.0, -3.0]], &[1.0, 1.0], true, true, 1.0);
        assert_eq!(out, vec![12.0, 8.0]);
        assert_eq!(magnitude(&[0.1, -0.5, 0.3, 0.0], 0.5, false), vec![0.0, -0.5, 0.3, 0.0]);
    }

    #[test]
    fn slerp_ends_at_its_inputs_and_falls_back_to_lerp_when_parallel() {
        let (a, b) = (vec![1.0, 0.0], vec![0.0, 1.0]);
        assert_eq!(slerp(0.0, &a, &b), a);
        let mid = slerp(0.5, &a, &b);
        assert!((mid[0] - std::f32::consts::FRAC_1_SQRT_2).abs() < 1e-6);
        assert_eq!(slerp(0.25, &[1.0, 1.0], &[2.0, 2.0]), vec![1.25, 1.25]);
    }
}
