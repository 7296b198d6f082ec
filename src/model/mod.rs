//! The architectures kiln trains and loads, one file each, as Hugging Face names them:
//! - `llama`: Llama, and the decoder Qwen2 and Mistral share; `qwen2`, `mistral`: their
//!   `config.json` as a serde struct, and how it maps onto that decoder;
//! - `gpt2`: GPT-2, its config and its network;
//! - `ops`: the operations the model files are written in (fused CPU kernel or Burn op).
//!
//! Everything outside this module sees two types: [`ArchConfig`], an architecture's
//! `config.json` (what a checkpoint's sidecar stores and a bundle writes), and [`CausalLm`],
//! the network, with the [`LanguageModel`] operations every architecture has.

pub mod gpt2;
pub mod llama;
pub mod mistral;
pub mod ops;
pub mod qwen2;

use anyhow::{Context, Result, anyhow, bail};
use burn::module::Module;
use burn::tensor::{Device, FloatDType, Int, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use gpt2::{Gpt2Config, Gpt2LMHeadModel};
pub use llama::{LlamaConfig, LlamaForCausalLM, LlamaShape};
pub use mistral::MistralConfig;
pub use ops::{DropoutMasks, KvCache, RotaryTables, cross_entropy};
pub use qwen2::Qwen2Config;

use crate::config::ModelConfig;

/// `model.architecture`: which network a run trains from scratch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    #[default]
    Llama,
    Qwen2,
    Mistral,
    Gpt2,
}

impl Architecture {
    /// `model_type` in `config.json`.
    pub fn model_type(self) -> &'static str {
        match self {
            Architecture::Llama => "llama",
            Architecture::Qwen2 => "qwen2",
            Architecture::Mistral => "mistral",
            Architecture::Gpt2 => "gpt2",
        }
    }

    /// The transformers class, for `architectures` in `config.json`.
    pub fn class_name(self) -> &'static str {
        match self {
            Architecture::Llama => "LlamaForCausalLM",
            Architecture::Qwen2 => "Qwen2ForCausalLM",
            Architecture::Mistral => "MistralForCausalLM",
            Architecture::Gpt2 => "GPT2LMHeadModel",
        }
    }
}

/// An architecture's Hugging Face `config.json` (the keys kiln reads and writes), tagged by
/// `model_type` as the file is. Always checked: built by [`ArchConfig::from_hf`] or
/// [`ArchConfig::new`], or read back from a sidecar and checked there.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model_type")]
pub enum ArchConfig {
    #[serde(rename = "llama")]
    Llama(LlamaConfig),
    #[serde(rename = "qwen2")]
    Qwen2(Qwen2Config),
    #[serde(rename = "mistral")]
    Mistral(MistralConfig),
    #[serde(rename = "gpt2")]
    Gpt2(Gpt2Config),
}

impl ArchConfig {
    /// The architecture a run from scratch trains: `[model]` plus the tokenizer's size.
    pub fn new(config: &ModelConfig, vocab_size: usize) -> Self {
        if config.architecture == Architecture::Gpt2 {
            return ArchConfig::Gpt2(Gpt2Config {
                vocab_size,
                n_positions: config.max_position_embeddings,
                n_embd: config.hidden_size,
                n_layer: config.num_layers,
                n_head: config.num_heads,
                n_inner: Some(config.intermediate_size),
                activation_function: "gelu_new".into(),
                layer_norm_epsilon: config.rms_norm_eps,
                initializer_range: config.initializer_range,
                tie_word_embeddings: config.tie_word_embeddings,
                scale_attn_weights: true,
                scale_attn_by_inverse_layer_idx: false,
            });
        }
        let shape = LlamaShape {
            vocab_size,
            hidden_size: config.hidden_size,
            num_layers: config.num_layers,
            num_heads: config.num_heads,
            num_kv_heads: config.num_kv_heads,
            intermediate_size: config.intermediate_size,
            max_position_embeddings: config.max_position_embeddings,
            rope_theta: config.rope_theta,
            rms_norm_eps: config.rms_norm_eps,
            tie_word_embeddings: config.tie_word_embeddings,
            qkv_bias: config.architecture == Architecture::Qwen2,
            o_bias: false,
            mlp_bias: false,
            sliding_window: config.sliding_window,
        };
        Self::of_shape(config.architecture, &shape, config.initializer_range)
    }

    /// The config of a Llama-family `architecture` that describes `shape` (GPT-2 is not one:
    /// its config is its shape).
    pub fn of_shape(architecture: Architecture, shape: &LlamaShape, initializer_range: f64) -> Self {
        match architecture {
            Architecture::Qwen2 => ArchConfig::Qwen2(Qwen2Config::from_shape(shape, initializer_range)),
            Architecture::Mistral => ArchConfig::Mistral(MistralConfig::from_shape(shape, initializer_range)),
            Architecture::Llama | Architecture::Gpt2 => ArchConfig::Llama(LlamaConfig::from_shape(shape, initializer_range)),
        }
    }

    /// Reads a `config.json` (`origin` names it in errors), as transformers 4 and 5 write it.
    pub fn from_hf(mut json: Value, origin: &str) -> Result<Self> {
        let Some(map) = json.as_object_mut() else {
            bail!("{origin}: not a JSON object");
        };
        let model_type = map.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
        if !["llama", "qwen2", "mistral", "gpt2"].contains(&model_type.as_str()) {
            bail!(
                "{origin}: model_type is {:?}; kiln runs the architectures llama, qwen2, mistral and gpt2",
                map.get("model_type").cloned().unwrap_or(Value::Null)
            );
        }
        // transformers 5 nests the RoPE settings under `rope_parameters`; 4.x has
        // `rope_theta` and `rope_scaling` at the top.
        if let Some(rope) = map.get("rope_parameters").filter(|v| v.is_object()).cloned() {
            if let Some(theta) = rope.get("rope_theta") {
                map.insert("rope_theta".into(), theta.clone());
            }
            map.insert("rope_scaling".into(), rope);
        }
        // A key written as `null` means its default, as in transformers.
        map.retain(|_, v| !v.is_null());
        let config: Self = serde_path_to_error::deserialize(json)
            .map_err(|e| anyhow!("{origin}: `{}`: {}", e.path(), e.inner()))?;
        config.check(origin)?;
        Ok(config)
    }

    /// Reads a model directory's `config.json`.
    pub fn read(dir: &std::path::Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {} (is {} a model directory?)", path.display(), dir.display()))?;
        let json: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        Self::from_hf(json, &path.display().to_string())
    }

    /// Refuses what kiln cannot compute (`origin` names the file).
    pub fn check(&self, origin: &str) -> Result<()> {
        match self {
            ArchConfig::Llama(c) => c.decoder.check(origin),
            ArchConfig::Qwen2(c) => c.decoder.check(origin),
            ArchConfig::Mistral(c) => c.decoder.check(origin),
            ArchConfig::Gpt2(c) => c.check(origin),
        }
    }

    /// The `config.json` keys kiln writes for this architecture, `model_type` included.
    pub fn to_hf(&self) -> Value {
        serde_json::to_value(self).expect("configs serialize")
    }

    pub fn architecture(&self) -> Architecture {
        match self {
            ArchConfig::Llama(_) => Architecture::Llama,
            ArchConfig::Qwen2(_) => Architecture::Qwen2,
            ArchConfig::Mistral(_) => Architecture::Mistral,
            ArchConfig::Gpt2(_) => Architecture::Gpt2,
        }
    }

    /// The decoder shape of a Llama-family architecture.
    pub fn llama_shape(&self) -> Option<LlamaShape> {
        match self {
            ArchConfig::Llama(c) => Some(c.shape()),
            ArchConfig::Qwen2(c) => Some(c.shape()),
            ArchConfig::Mistral(c) => Some(c.shape()),
            ArchConfig::Gpt2(_) => None,
        }
    }

    pub fn initializer_range(&self) -> f64 {
        match self {
            ArchConfig::Llama(c) => c.decoder.initializer_range,
            ArchConfig::Qwen2(c) => c.decoder.initializer_range,
            ArchConfig::Mistral(c) => c.decoder.initializer_range,
            ArchConfig::Gpt2(c) => c.initializer_range,
        }
    }

    /// The model's facts as the model card lists them: (label, value).
    pub fn summary(&self) -> Vec<(&'static str, String)> {
        match (self, self.llama_shape()) {
            (ArchConfig::Gpt2(c), _) => vec![
                ("layers", c.n_layer.to_string()),
                ("hidden size", c.n_embd.to_string()),
                ("attention heads", c.n_head.to_string()),
                ("MLP (GELU) size", c.inner().to_string()),
                ("positions (learned)", c.n_positions.to_string()),
                ("tied embeddings", c.tie_word_embeddings.to_string()),
            ],
            (_, Some(s)) => vec![
                ("layers", s.num_layers.to_string()),
                ("hidden size", s.hidden_size.to_string()),
                ("attention heads", s.num_heads.to_string()),
                ("key/value heads", s.num_kv_heads.to_string()),
                ("MLP (SwiGLU) size", s.intermediate_size.to_string()),
                ("rope theta", s.rope_theta.to_string()),
                ("sliding window", s.sliding_window.map_or("none".into(), |w| w.to_string())),
                ("tied embeddings", s.tie_word_embeddings.to_string()),
            ],
            (_, None) => Vec::new(),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match (self, self.llama_shape()) {
            (ArchConfig::Gpt2(c), _) => c.vocab_size,
            (_, shape) => shape.map_or(0, |s| s.vocab_size),
        }
    }

    /// The positions the model has.
    pub fn max_position_embeddings(&self) -> usize {
        match (self, self.llama_shape()) {
            (ArchConfig::Gpt2(c), _) => c.n_positions,
            (_, shape) => shape.map_or(0, |s| s.max_position_embeddings),
        }
    }

    /// The longest context the model computes exactly (its positions, or a shorter sliding
    /// window).
    pub fn max_context(&self) -> usize {
        match (self, self.llama_shape()) {
            (ArchConfig::Gpt2(c), _) => c.n_positions,
            (_, shape) => shape.map_or(0, |s| s.max_context()),
        }
    }

    /// Number of trainable parameters (a tied head counts once, as in Hugging Face).
    pub fn num_params(&self) -> usize {
        match (self, self.llama_shape()) {
            (ArchConfig::Gpt2(c), _) => c.num_params(),
            (_, shape) => shape.map_or(0, |s| s.num_params()),
        }
    }

    /// The parameter names in Hugging Face state-dict order.
    pub fn hf_param_names(&self) -> Vec<String> {
        match (self, self.llama_shape()) {
            (ArchConfig::Gpt2(c), _) => c.hf_param_names(),
            (_, shape) => shape.map_or(Vec::new(), |s| s.hf_param_names()),
        }
    }

    /// The name a stored tensor has in kiln, or `None` for a stored buffer that is no weight
    /// (GPT-2's causal masks).
    pub fn canonical_name(&self, stored: &str) -> Option<String> {
        match self {
            ArchConfig::Gpt2(_) => gpt2::canonical_name(stored),
            _ => Some(stored.to_string()),
        }
    }
}

/// The network of any architecture kiln runs. Its module paths are the Hugging Face tensor
/// names (the variant adds no path component; see `params`).
#[derive(Module, Debug)]
pub enum CausalLm {
    /// Llama, Qwen2 and Mistral.
    Llama(LlamaForCausalLM),
    Gpt2(Gpt2LMHeadModel),
}

impl CausalLm {
    /// A randomly initialised model, identical on every backend for a seed.
    pub fn init(config: &ArchConfig, init_std: f64, dropout: f64, seed: u64, device: &Device) -> Self {
        match (config, config.llama_shape()) {
            (ArchConfig::Gpt2(c), _) => CausalLm::Gpt2(Gpt2LMHeadModel::init(c, init_std, dropout, seed, device)),
            (_, Some(shape)) => CausalLm::Llama(LlamaForCausalLM::init(&shape, init_std, dropout, seed, device)),
            (_, None) => unreachable!("every other architecture is of the Llama family"),
        }
    }

    /// A model with zero parameters, to load every weight into.
    pub fn for_loading(config: &ArchConfig, dropout: f64, device: &Device) -> Self {
        match (config, config.llama_shape()) {
            (ArchConfig::Gpt2(c), _) => CausalLm::Gpt2(Gpt2LMHeadModel::for_loading(c, dropout, device)),
            (_, Some(shape)) => CausalLm::Llama(LlamaForCausalLM::for_loading(&shape, dropout, device)),
            (_, None) => unreachable!("every other architecture is of the Llama family"),
        }
    }

    /// The same model with another training-time dropout rate.
    pub fn with_dropout(self, dropout: f64) -> Self {
        match self {
            CausalLm::Llama(m) => CausalLm::Llama(m.with_dropout(dropout)),
            CausalLm::Gpt2(m) => CausalLm::Gpt2(m.with_dropout(dropout)),
        }
    }

    /// The same model computing its activations in `dtype` (`training.precision`); the
    /// parameters stay fp32.
    pub fn with_compute_dtype(self, dtype: FloatDType) -> Self {
        match self {
            CausalLm::Llama(m) => CausalLm::Llama(m.with_compute_dtype(dtype)),
            CausalLm::Gpt2(m) => CausalLm::Gpt2(m.with_compute_dtype(dtype)),
        }
    }
}

/// Whether a parameter is stored transposed relative to Hugging Face's layout (Burn's Linear
/// weights are `[in, out]`, PyTorch's `[out, in]`); each architecture has its table.
pub trait HfLayout {
    fn stored_transposed(&self, name: &str, rank: usize) -> bool;
}

impl HfLayout for LlamaForCausalLM {
    fn stored_transposed(&self, name: &str, rank: usize) -> bool {
        LlamaForCausalLM::stored_transposed(name, rank)
    }
}

impl HfLayout for CausalLm {
    fn stored_transposed(&self, name: &str, rank: usize) -> bool {
        match self {
            CausalLm::Llama(_) => LlamaForCausalLM::stored_transposed(name, rank),
            CausalLm::Gpt2(_) => Gpt2LMHeadModel::stored_transposed(name, rank),
        }
    }
}

/// What every architecture computes; the provided methods are written once on top of the
/// four an architecture defines.
pub trait LanguageModel {
    /// The final (normalised) hidden states `[batch * seq, hidden]` of token ids
    /// `[batch, seq]`, continuing from (and extending) `cache` when given; `dropout` (training
    /// only) masks the embeddings and each residual branch.
    fn hidden_states(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>, dropout: Option<&mut DropoutMasks>) -> Tensor<2>;
    /// Logits `[rows, vocab]` of hidden states `[rows, hidden]`.
    fn output_layer(&self, x: Tensor<2>) -> Tensor<2>;
    /// Mean next-token cross-entropy of `targets` given the final hidden states.
    fn head_loss(&self, x: Tensor<2>, targets: Tensor<2, Int>) -> Tensor<1>;
    fn dropout(&self) -> f64;
    /// The longest context the model computes exactly.
    fn max_positions(&self) -> usize;
    fn num_layers(&self) -> usize;

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_with(tokens, None, None)
    }

    /// Like `forward`, continuing from (and extending) `cache` when given: the tokens are at
    /// positions `cache.len()..`.
    fn forward_cached(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.forward_with(tokens, cache, None)
    }

    /// The full forward pass.
    fn forward_with(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>, dropout: Option<&mut DropoutMasks>) -> Tensor<3> {
        let [b, s] = tokens.dims();
        let logits = self.output_layer(self.hidden_states(tokens, cache, dropout));
        let vocab = logits.dims()[1];
        logits.reshape([b, s, vocab])
    }

    /// Logits `[batch, vocab]` of the last position only, continuing from (and extending)
    /// `cache`: all that sampling the next token needs, without the output layer's product for
    /// every other position of a prompt.
    fn last_logits(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<2> {
        let [b, s] = tokens.dims();
        let x = self.hidden_states(tokens, cache, None);
        let hidden = x.dims()[1];
        let last = x.reshape([b, s, hidden]).slice([0..b, s - 1..s, 0..hidden]).reshape([b, hidden]);
        self.output_layer(last)
    }

    /// Mean next-token cross-entropy (nats/token) of `targets` under `forward(inputs)`.
    fn loss(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<1> {
        let x = self.hidden_states(inputs, None, None);
        self.head_loss(x, targets)
    }

    /// The training loss, with dropout masks drawn from a stream seeded by `dropout_seed`.
    fn train_loss(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>, dropout_seed: u64) -> Tensor<1> {
        let mut masks = DropoutMasks::new(self.dropout(), dropout_seed);
        let x = self.hidden_states(inputs, None, (self.dropout() > 0.0).then_some(&mut masks));
        self.head_loss(x, targets)
    }
}

/// `LanguageModel` for a model type with inherent methods of the same names.
macro_rules! language_model {
    ($($model:ty),*) => {$(
        impl LanguageModel for $model {
            fn hidden_states(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>, dropout: Option<&mut DropoutMasks>) -> Tensor<2> {
                <$model>::hidden_states(self, tokens, cache, dropout)
            }
            fn output_layer(&self, x: Tensor<2>) -> Tensor<2> {
                <$model>::output_layer(self, x)
            }
            fn head_loss(&self, x: Tensor<2>, targets: Tensor<2, Int>) -> Tensor<1> {
                <$model>::head_loss(self, x, targets)
            }
            fn dropout(&self) -> f64 {
                <$model>::dropout(self)
            }
            fn max_positions(&self) -> usize {
                <$model>::max_positions(self)
            }
            fn num_layers(&self) -> usize {
                <$model>::num_layers(self)
            }
        }
    )*};
}

language_model!(LlamaForCausalLM, Gpt2LMHeadModel);

impl HfLayout for Gpt2LMHeadModel {
    fn stored_transposed(&self, name: &str, rank: usize) -> bool {
        Gpt2LMHeadModel::stored_transposed(name, rank)
    }
}

impl CausalLm {
    fn inner(&self) -> &dyn LanguageModel {
        match self {
            CausalLm::Llama(m) => m,
            CausalLm::Gpt2(m) => m,
        }
    }
}

impl LanguageModel for CausalLm {
    fn hidden_states(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>, dropout: Option<&mut DropoutMasks>) -> Tensor<2> {
        self.inner().hidden_states(tokens, cache, dropout)
    }
    fn output_layer(&self, x: Tensor<2>) -> Tensor<2> {
        self.inner().output_layer(x)
    }
    fn head_loss(&self, x: Tensor<2>, targets: Tensor<2, Int>) -> Tensor<1> {
        self.inner().head_loss(x, targets)
    }
    fn dropout(&self) -> f64 {
        self.inner().dropout()
    }
    fn max_positions(&self) -> usize {
        self.inner().max_positions()
    }
    fn num_layers(&self) -> usize {
        self.inner().num_layers()
    }
}
