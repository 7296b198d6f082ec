//! The Llama decoder (RMSNorm, rotary embeddings in Hugging Face's rotate-half convention,
//! SwiGLU MLP, grouped-query attention, optional tied embeddings), and Hugging Face's
//! `LlamaConfig`. Qwen2 and Mistral are this decoder with biases on the query/key/value
//! projections and a sliding attention window (`qwen2.rs`, `mistral.rs`).
//!
//! Field names mirror Hugging Face's `LlamaForCausalLM`, so every parameter's module path *is*
//! its Hugging Face tensor name (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`).
//! Linear weights are the one difference in layout: Burn stores them `[in, out]` where PyTorch
//! stores `[out, in]` ([`LlamaForCausalLM::stored_transposed`]).

use anyhow::{Result, bail};
use burn::module::Module;
use burn::nn::{Embedding, Linear};
use burn::tensor::{Device, FloatDType, Int, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::ops::{self, DropoutMasks, KvCache, LayerCache, ParamInit, RmsNorm, Rotary, RotaryTables, project};

/// Everything that fixes a Llama-family decoder's shape.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaShape {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// Biases on the query, key and value projections (Qwen2; Llama's `attention_bias`).
    #[serde(default)]
    pub qkv_bias: bool,
    /// A bias on the output projection (Llama's `attention_bias` only).
    #[serde(default)]
    pub o_bias: bool,
    /// Biases on the MLP's projections (Llama's `mlp_bias`).
    #[serde(default)]
    pub mlp_bias: bool,
    /// Mistral's sliding attention window. Contexts up to it are computed exactly; kiln does
    /// not mask longer ones, it refuses them (see [`LlamaShape::max_context`]).
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

impl LlamaShape {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// The longest context the model computes exactly: its positions, or its sliding window
    /// when that is shorter.
    pub fn max_context(&self) -> usize {
        self.sliding_window.map_or(self.max_position_embeddings, |w| w.min(self.max_position_embeddings))
    }

    /// Number of trainable parameters (a tied head counts once, as in Hugging Face).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let kv = self.num_kv_heads * self.head_dim();
        let attn = 2 * h * h + 2 * h * kv + usize::from(self.qkv_bias) * (h + 2 * kv) + usize::from(self.o_bias) * h;
        let mlp = 3 * h * self.intermediate_size + usize::from(self.mlp_bias) * (2 * self.intermediate_size + h);
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_layers * layer + h + head
    }

    /// The parameter names in Hugging Face state-dict order (the order `save_pretrained`
    /// writes and shards them in).
    pub fn hf_param_names(&self) -> Vec<String> {
        let mut names = vec![EMBEDDING.to_string()];
        for i in 0..self.num_layers {
            let mut parts = Vec::new();
            for (proj, bias) in [("q_proj", self.qkv_bias), ("k_proj", self.qkv_bias), ("v_proj", self.qkv_bias), ("o_proj", self.o_bias)] {
                parts.push(format!("self_attn.{proj}.weight"));
                if bias {
                    parts.push(format!("self_attn.{proj}.bias"));
                }
            }
            for proj in ["gate_proj", "up_proj", "down_proj"] {
                parts.push(format!("mlp.{proj}.weight"));
                if self.mlp_bias {
                    parts.push(format!("mlp.{proj}.bias"));
                }
            }
            parts.push("input_layernorm.weight".into());
            parts.push("post_attention_layernorm.weight".into());
            names.extend(parts.into_iter().map(|p| format!("model.layers.{i}.{p}")));
        }
        names.push("model.norm.weight".to_string());
        if !self.tie_word_embeddings {
            names.push("lm_head.weight".to_string());
        }
        names
    }

    /// Checks what any Llama-family config must satisfy; `origin` names the file.
    pub fn check(&self, origin: &str) -> Result<()> {
        let (h, n, kv) = (self.hidden_size, self.num_heads, self.num_kv_heads);
        if n == 0 || kv == 0 || h % n != 0 || n % kv != 0 || self.head_dim() % 2 != 0 {
            bail!("{origin}: unsupported head configuration ({n} heads, {kv} key/value heads, hidden {h}; kiln needs heads dividing hidden_size, key/value heads dividing heads, and an even head size)");
        }
        if self.vocab_size == 0 || self.num_layers == 0 || self.intermediate_size == 0 || self.max_position_embeddings == 0 {
            bail!("{origin}: vocab_size, num_hidden_layers, intermediate_size and max_position_embeddings must be at least 1");
        }
        Ok(())
    }
}

/// The token embedding: the one 2-D parameter of the family that is not a Linear weight.
pub const EMBEDDING: &str = "model.embed_tokens.weight";

/// The `config.json` keys that Llama, Qwen2 and Mistral share, as Hugging Face names them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<Value>,
    #[serde(default = "default_rms_norm_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
}

fn default_rope_theta() -> f64 {
    10000.0
}
fn default_rms_norm_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".to_string()
}
fn default_initializer_range() -> f64 {
    0.02
}

impl DecoderConfig {
    pub fn from_shape(s: &LlamaShape, initializer_range: f64) -> Self {
        Self {
            vocab_size: s.vocab_size,
            hidden_size: s.hidden_size,
            intermediate_size: s.intermediate_size,
            num_hidden_layers: s.num_layers,
            num_attention_heads: s.num_heads,
            num_key_value_heads: Some(s.num_kv_heads),
            head_dim: Some(s.head_dim()),
            max_position_embeddings: s.max_position_embeddings,
            rope_theta: s.rope_theta,
            rope_scaling: None,
            rms_norm_eps: s.rms_norm_eps,
            tie_word_embeddings: s.tie_word_embeddings,
            hidden_act: "silu".into(),
            initializer_range,
        }
    }

    /// Refuses what kiln does not compute: RoPE scaling, another activation, a head size other
    /// than `hidden / heads`, an impossible head layout. `origin` names the file in errors.
    pub fn check(&self, origin: &str) -> Result<()> {
        let rope_type = self
            .rope_scaling
            .as_ref()
            .and_then(|r| r.get("rope_type").or_else(|| r.get("type")))
            .and_then(Value::as_str)
            .unwrap_or("default");
        if rope_type != "default" {
            bail!("{origin}: RoPE scaling `{rope_type}` is not supported by kiln (only the default rotary embedding)");
        }
        if self.hidden_act != "silu" {
            bail!("{origin}: hidden_act `{}` is not supported (this architecture's MLP is SwiGLU, silu)", self.hidden_act);
        }
        let num_heads = self.num_attention_heads;
        if let Some(head_dim) = self.head_dim
            && head_dim * num_heads != self.hidden_size
        {
            bail!("{origin}: head_dim {head_dim} x {num_heads} heads != hidden_size {}; kiln needs head_dim = hidden_size / num_attention_heads", self.hidden_size);
        }
        self.shape().check(origin)
    }

    /// The decoder shape of these keys, without biases or a window (see [`Self::check`]).
    pub fn shape(&self) -> LlamaShape {
        LlamaShape {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            num_layers: self.num_hidden_layers,
            num_heads: self.num_attention_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(self.num_attention_heads),
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
            rope_theta: self.rope_theta,
            rms_norm_eps: self.rms_norm_eps,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
        }
    }
}

/// Hugging Face's `LlamaConfig`, as `config.json` holds it (the keys kiln reads and writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    /// Biases on all four attention projections.
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub mlp_bias: bool,
}

impl LlamaConfig {
    pub fn from_shape(s: &LlamaShape, initializer_range: f64) -> Self {
        Self {
            decoder: DecoderConfig::from_shape(s, initializer_range),
            attention_bias: s.qkv_bias,
            mlp_bias: s.mlp_bias,
        }
    }

    pub fn shape(&self) -> LlamaShape {
        LlamaShape {
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            ..self.decoder.shape()
        }
    }
}

#[derive(Module, Debug)]
pub struct LlamaAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub o_proj: Linear,
    #[module(skip)]
    num_heads: usize,
    #[module(skip)]
    num_kv_heads: usize,
}

#[derive(Module, Debug)]
pub struct LlamaMlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

#[derive(Module, Debug)]
pub struct LlamaDecoderLayer {
    pub self_attn: LlamaAttention,
    pub mlp: LlamaMlp,
    pub input_layernorm: RmsNorm,
    pub post_attention_layernorm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct LlamaModel {
    pub embed_tokens: Embedding,
    pub layers: Vec<LlamaDecoderLayer>,
    pub norm: RmsNorm,
}

#[derive(Module, Debug)]
pub struct LlamaForCausalLM {
    pub model: LlamaModel,
    /// `None` when the output projection is tied to `model.embed_tokens`.
    pub lm_head: Option<Linear>,
    /// Training-time dropout rate (see [`DropoutMasks`]).
    #[module(skip)]
    dropout: f64,
    #[module(skip)]
    rope: RotaryTables,
    /// The longest context computed exactly ([`LlamaShape::max_context`]).
    #[module(skip)]
    max_context: usize,
    /// The dtype of the activations (`training.precision`); parameters stay fp32.
    #[module(skip)]
    compute: FloatDType,
}

impl LlamaAttention {
    /// `x` is the residual stream of `batch` sequences, flattened to `[batch * seq, hidden]`.
    fn forward(&self, x: Tensor<2>, batch: usize, rotary: &Rotary, cache: Option<&mut LayerCache>) -> Tensor<2> {
        let [tokens, hidden] = x.dims();
        let (b, s) = (batch, tokens / batch);
        let head_dim = hidden / self.num_heads;
        // `[batch, seq, heads, head_dim]`, the order the projections produce.
        let heads = |t: Tensor<2>, n: usize| t.reshape([b, s, n, head_dim]);
        let q = rotary.rotate(heads(project(&self.q_proj, x.clone()), self.num_heads));
        let k = rotary.rotate(heads(project(&self.k_proj, x.clone()), self.num_kv_heads));
        let v = heads(project(&self.v_proj, x), self.num_kv_heads);
        project(&self.o_proj, ops::causal_attention(q, k, v, cache))
    }
}

impl LlamaMlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let gate = project(&self.gate_proj, x.clone());
        let up = project(&self.up_proj, x);
        project(&self.down_proj, ops::swiglu(gate, up))
    }
}

impl LlamaForCausalLM {
    /// A randomly initialised model: every matrix and embedding from N(0, `init_std`), every
    /// norm weight 1 and bias 0, as Hugging Face's `LlamaPreTrainedModel._init_weights`. Values
    /// come from a ChaCha RNG seeded with `seed`, so they are identical on every backend.
    pub fn init(shape: &LlamaShape, init_std: f64, dropout: f64, seed: u64, device: &Device) -> Self {
        Self::build(shape, dropout, ParamInit::normal(seed, init_std, device))
    }

    /// A model of `shape` with zero matrices, to load weights into: loading replaces every
    /// parameter, and fails if the files lack one. Drawing `init`'s normal values would be
    /// wasted there (half a second at 100M parameters, on the path of every resume).
    pub fn for_loading(shape: &LlamaShape, dropout: f64, device: &Device) -> Self {
        Self::build(shape, dropout, ParamInit::zeros(device))
    }

    fn build(shape: &LlamaShape, dropout: f64, mut init: ParamInit) -> Self {
        let h = shape.hidden_size;
        let kv = shape.num_kv_heads * shape.head_dim();
        let ffn = shape.intermediate_size;
        let device = init.device;
        let embed_tokens = init.embedding(shape.vocab_size, h);
        let mut layers = Vec::with_capacity(shape.num_layers);
        for _ in 0..shape.num_layers {
            layers.push(LlamaDecoderLayer {
                self_attn: LlamaAttention {
                    q_proj: init.linear(h, h, shape.qkv_bias),
                    k_proj: init.linear(h, kv, shape.qkv_bias),
                    v_proj: init.linear(h, kv, shape.qkv_bias),
                    o_proj: init.linear(h, h, shape.o_bias),
                    num_heads: shape.num_heads,
                    num_kv_heads: shape.num_kv_heads,
                },
                mlp: LlamaMlp {
                    gate_proj: init.linear(h, ffn, shape.mlp_bias),
                    up_proj: init.linear(h, ffn, shape.mlp_bias),
                    down_proj: init.linear(ffn, h, shape.mlp_bias),
                },
                input_layernorm: RmsNorm::ones(h, shape.rms_norm_eps, device),
                post_attention_layernorm: RmsNorm::ones(h, shape.rms_norm_eps, device),
            });
        }
        let lm_head = (!shape.tie_word_embeddings).then(|| init.linear(h, shape.vocab_size, false));
        Self {
            model: LlamaModel {
                embed_tokens,
                layers,
                norm: RmsNorm::ones(h, shape.rms_norm_eps, device),
            },
            lm_head,
            dropout,
            rope: RotaryTables::new(shape.head_dim(), shape.max_position_embeddings, shape.rope_theta),
            max_context: shape.max_context(),
            compute: FloatDType::F32,
        }
    }

    /// Whether the named parameter is stored transposed relative to Hugging Face: every
    /// Linear weight (every 2-D parameter but the embedding).
    pub fn stored_transposed(name: &str, rank: usize) -> bool {
        rank == 2 && name != EMBEDDING
    }

    /// The same model with another training-time dropout rate.
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }

    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    /// The same model computing in `dtype` (its parameters stay as they are).
    pub fn with_compute_dtype(mut self, dtype: FloatDType) -> Self {
        self.compute = dtype;
        self
    }

    /// The longest context the model computes exactly.
    pub fn max_positions(&self) -> usize {
        self.max_context
    }

    pub fn num_layers(&self) -> usize {
        self.model.layers.len()
    }

    /// The final (normalised) hidden states `[batch * seq, hidden]` that the output layer reads;
    /// `dropout` (training only) masks the embeddings and each residual branch.
    pub fn hidden_states(
        &self,
        tokens: Tensor<2, Int>,
        mut cache: Option<&mut KvCache>,
        mut dropout: Option<&mut DropoutMasks>,
    ) -> Tensor<2> {
        let [b, s] = tokens.dims();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let rotary = self.rope.slice(start, s, &tokens.device());
        // The residual stream is kept as `[batch * seq, hidden]`: every projection is then one
        // 2-D matmul, and its weight gradient one matmul over all tokens instead of a batch of
        // per-sequence products summed afterwards.
        let hidden = self.model.embed_tokens.weight.dims()[1];
        let embedded = self.model.embed_tokens.forward(tokens).reshape([b * s, hidden]).cast(self.compute);
        let mut x = ops::drop(&mut dropout, embedded);
        for (i, layer) in self.model.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let attn = layer
                .self_attn
                .forward(layer.input_layernorm.forward(x.clone()), b, &rotary, layer_cache);
            x = x + ops::drop(&mut dropout, attn);
            let mlp = layer.mlp.forward(layer.post_attention_layernorm.forward(x.clone()));
            x = x + ops::drop(&mut dropout, mlp);
        }
        self.model.norm.forward(x)
    }

    /// Logits `[rows, vocab]` of hidden states `[rows, hidden]`.
    pub fn output_layer(&self, x: Tensor<2>) -> Tensor<2> {
        ops::output_logits(self.lm_head.as_ref(), &self.model.embed_tokens, x)
    }

    /// Mean next-token cross-entropy of `targets` given the final hidden states `x`.
    pub fn head_loss(&self, x: Tensor<2>, targets: Tensor<2, Int>) -> Tensor<1> {
        ops::head_loss(self.lm_head.as_ref(), &self.model.embed_tokens, x, targets)
    }
}
