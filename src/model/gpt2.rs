//! GPT-2: learned position embeddings, pre-LayerNorm blocks with biases everywhere, one fused
//! query/key/value projection (`c_attn`), a GELU MLP, and an output layer tied to the token
//! embedding; and Hugging Face's `GPT2Config`.
//!
//! Field names mirror Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`).
//! Its projections are `Conv1D` modules, which store their weights `[in, out]`: Burn's Linear
//! layout, so unlike Llama's nothing is transposed but an untied `lm_head.weight`.

use anyhow::{Result, bail};
use burn::module::Module;
use burn::nn::{Embedding, Linear};
use burn::tensor::{Device, FloatDType, Int, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::ops::{self, DropoutMasks, KvCache, LayerCache, LayerNorm, ParamInit, project};

/// Hugging Face's `GPT2Config`, as `config.json` holds it (the keys kiln reads and writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub n_positions: usize,
    pub n_embd: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// The MLP width; `4 * n_embd` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n_inner: Option<usize>,
    #[serde(default = "default_activation")]
    pub activation_function: String,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_initializer_range")]
    pub initializer_range: f64,
    #[serde(default = "default_true")]
    pub tie_word_embeddings: bool,
    #[serde(default = "default_true")]
    pub scale_attn_weights: bool,
    #[serde(default)]
    pub scale_attn_by_inverse_layer_idx: bool,
}

fn default_activation() -> String {
    "gelu_new".to_string()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_initializer_range() -> f64 {
    0.02
}
fn default_true() -> bool {
    true
}

impl Gpt2Config {
    pub fn inner(&self) -> usize {
        self.n_inner.unwrap_or(4 * self.n_embd)
    }

    /// Refuses what kiln does not compute; `origin` names the file.
    pub fn check(&self, origin: &str) -> Result<()> {
        if gelu_is_tanh(&self.activation_function).is_none() {
            bail!("{origin}: activation_function `{}` is not supported (gelu_new, gelu_pytorch_tanh or gelu)", self.activation_function);
        }
        if !self.scale_attn_weights || self.scale_attn_by_inverse_layer_idx {
            bail!("{origin}: kiln scales GPT-2 attention by 1/sqrt(head_dim) only (scale_attn_weights = true, scale_attn_by_inverse_layer_idx = false)");
        }
        let (h, n) = (self.n_embd, self.n_head);
        if n == 0 || h % n != 0 {
            bail!("{origin}: n_head {n} does not divide n_embd {h}");
        }
        if self.vocab_size == 0 || self.n_layer == 0 || self.n_positions == 0 || self.inner() == 0 {
            bail!("{origin}: vocab_size, n_layer, n_positions and n_inner must be at least 1");
        }
        Ok(())
    }

    /// Number of trainable parameters (a tied head counts once, as in Hugging Face).
    pub fn num_params(&self) -> usize {
        let (h, f) = (self.n_embd, self.inner());
        let layer = 4 * h + (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h);
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        (self.vocab_size + self.n_positions) * h + self.n_layer * layer + 2 * h + head
    }

    /// The parameter names in Hugging Face state-dict order.
    pub fn hf_param_names(&self) -> Vec<String> {
        let mut names = vec!["transformer.wte.weight".to_string(), "transformer.wpe.weight".to_string()];
        for i in 0..self.n_layer {
            for part in ["ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj"] {
                names.push(format!("transformer.h.{i}.{part}.weight"));
                names.push(format!("transformer.h.{i}.{part}.bias"));
            }
        }
        names.push("transformer.ln_f.weight".to_string());
        names.push("transformer.ln_f.bias".to_string());
        if !self.tie_word_embeddings {
            names.push("lm_head.weight".to_string());
        }
        names
    }
}

/// Whether `activation` is GELU's tanh approximation (`Some(true)`), exact (`Some(false)`), or
/// not GELU.
fn gelu_is_tanh(activation: &str) -> Option<bool> {
    match activation {
        "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(true),
        "gelu" => Some(false),
        _ => None,
    }
}

/// The name a stored tensor of a GPT-2 checkpoint has in kiln, or `None` for a buffer that is
/// no weight. The original checkpoints name tensors without the `transformer.` prefix and keep
/// the causal-mask buffers `attn.bias` and `attn.masked_bias`.
pub fn canonical_name(stored: &str) -> Option<String> {
    let name = if stored.starts_with("transformer.") || stored.starts_with("lm_head.") {
        stored.to_string()
    } else {
        format!("transformer.{stored}")
    };
    let buffer = name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias");
    (!buffer).then_some(name)
}

#[derive(Module, Debug)]
pub struct Gpt2Attention {
    pub c_attn: Linear,
    pub c_proj: Linear,
    #[module(skip)]
    num_heads: usize,
}

#[derive(Module, Debug)]
pub struct Gpt2Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
}

#[derive(Module, Debug)]
pub struct Gpt2Block {
    pub ln_1: LayerNorm,
    pub attn: Gpt2Attention,
    pub ln_2: LayerNorm,
    pub mlp: Gpt2Mlp,
}

#[derive(Module, Debug)]
pub struct Gpt2Model {
    pub wte: Embedding,
    pub wpe: Embedding,
    pub h: Vec<Gpt2Block>,
    pub ln_f: LayerNorm,
}

#[derive(Module, Debug)]
pub struct Gpt2LMHeadModel {
    pub transformer: Gpt2Model,
    /// `None` when the output layer is tied to `transformer.wte` (GPT-2's own choice).
    pub lm_head: Option<Linear>,
    #[module(skip)]
    dropout: f64,
    #[module(skip)]
    gelu_tanh: bool,
    #[module(skip)]
    max_positions: usize,
    /// The dtype of the activations (`training.precision`); parameters stay fp32.
    #[module(skip)]
    compute: FloatDType,
}

impl Gpt2Attention {
    /// `x` is the residual stream of `batch` sequences, `[batch * seq, hidden]`.
    fn forward(&self, x: Tensor<2>, batch: usize, cache: Option<&mut LayerCache>) -> Tensor<2> {
        let [tokens, hidden] = x.dims();
        let (b, s) = (batch, tokens / batch);
        let head_dim = hidden / self.num_heads;
        let qkv = project(&self.c_attn, x);
        // `c_attn` produces the queries, keys and values side by side.
        let part = |i: usize| qkv.clone().slice([0..tokens, i * hidden..(i + 1) * hidden]).reshape([b, s, self.num_heads, head_dim]);
        project(&self.c_proj, ops::causal_attention(part(0), part(1), part(2), cache))
    }
}

impl Gpt2LMHeadModel {
    /// A randomly initialised model: matrices and embeddings from N(0, `init_std`), biases 0,
    /// norms 1, from a seeded ChaCha stream (identical on every backend).
    pub fn init(config: &Gpt2Config, init_std: f64, dropout: f64, seed: u64, device: &Device) -> Self {
        Self::build(config, dropout, ParamInit::normal(seed, init_std, device))
    }

    /// A model with zero parameters, to load every weight into.
    pub fn for_loading(config: &Gpt2Config, dropout: f64, device: &Device) -> Self {
        Self::build(config, dropout, ParamInit::zeros(device))
    }

    fn build(c: &Gpt2Config, dropout: f64, mut init: ParamInit) -> Self {
        let (h, f) = (c.n_embd, c.inner());
        let device = init.device;
        let eps = c.layer_norm_epsilon;
        let wte = init.embedding(c.vocab_size, h);
        let wpe = init.embedding(c.n_positions, h);
        let blocks = (0..c.n_layer)
            .map(|_| Gpt2Block {
                ln_1: LayerNorm::new(h, eps, device),
                attn: Gpt2Attention {
                    c_attn: init.linear(h, 3 * h, true),
                    c_proj: init.linear(h, h, true),
                    num_heads: c.n_head,
                },
                ln_2: LayerNorm::new(h, eps, device),
                mlp: Gpt2Mlp {
                    c_fc: init.linear(h, f, true),
                    c_proj: init.linear(f, h, true),
                },
            })
            .collect();
        let lm_head = (!c.tie_word_embeddings).then(|| init.linear(h, c.vocab_size, false));
        Self {
            transformer: Gpt2Model {
                wte,
                wpe,
                h: blocks,
                ln_f: LayerNorm::new(h, eps, device),
            },
            lm_head,
            dropout,
            gelu_tanh: gelu_is_tanh(&c.activation_function).unwrap_or(true),
            max_positions: c.n_positions,
            compute: FloatDType::F32,
        }
    }

    /// Only an untied output layer is a PyTorch `nn.Linear` (`[out, in]`); `Conv1D` weights are
    /// stored as Burn holds them.
    pub fn stored_transposed(name: &str, rank: usize) -> bool {
        rank == 2 && name == "lm_head.weight"
    }

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

    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    pub fn num_layers(&self) -> usize {
        self.transformer.h.len()
    }

    pub fn hidden_states(
        &self,
        tokens: Tensor<2, Int>,
        mut cache: Option<&mut KvCache>,
        mut dropout: Option<&mut DropoutMasks>,
    ) -> Tensor<2> {
        let [b, s] = tokens.dims();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let device = tokens.device();
        let positions: Vec<i32> = (start..start + s).map(|p| p as i32).collect();
        let positions = Tensor::<2, Int>::from_data(TensorData::new(positions, [1, s]), &device);
        let t = &self.transformer;
        let hidden = t.wte.weight.dims()[1];
        let x = (t.wte.forward(tokens) + t.wpe.forward(positions)).cast(self.compute);
        let mut x = ops::drop(&mut dropout, x.reshape([b * s, hidden]));
        for (i, block) in t.h.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let attn = block.attn.forward(block.ln_1.forward(x.clone()), b, layer_cache);
            x = x + ops::drop(&mut dropout, attn);
            let inner = ops::gelu_act(project(&block.mlp.c_fc, block.ln_2.forward(x.clone())), self.gelu_tanh);
            x = x + ops::drop(&mut dropout, project(&block.mlp.c_proj, inner));
        }
        t.ln_f.forward(x)
    }

    pub fn output_layer(&self, x: Tensor<2>) -> Tensor<2> {
        ops::output_logits(self.lm_head.as_ref(), &self.transformer.wte, x)
    }

    pub fn head_loss(&self, x: Tensor<2>, targets: Tensor<2, Int>) -> Tensor<1> {
        ops::head_loss(self.lm_head.as_ref(), &self.transformer.wte, x, targets)
    }
}
