//! A Llama decoder (RMSNorm, rotary embeddings in Hugging Face's rotate-half convention,
//! SwiGLU MLP, grouped-query attention, optional tied embeddings).
//!
//! Field names mirror Hugging Face's `LlamaForCausalLM`, so every parameter's module path *is*
//! its Hugging Face tensor name (`model.layers.0.self_attn.q_proj.weight`, `lm_head.weight`).
//! The one difference is layout: a Burn `Linear` stores its weight `[in, out]` where PyTorch
//! stores `[out, in]`; `params::named_params` and friends own that transpose.

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::activation::{log_softmax, silu};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::config::ModelConfig;
use crate::fused;

/// Everything that fixes the model's shape: the `[model]` config plus the vocabulary size,
/// which comes from the tokenizer.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
}

impl LlamaShape {
    pub fn new(config: &ModelConfig, vocab_size: usize) -> Self {
        Self {
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
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    /// Number of trainable parameters (a tied head counts once, as in Hugging Face).
    pub fn num_params(&self) -> usize {
        let h = self.hidden_size;
        let kv = self.num_kv_heads * self.head_dim();
        let attn = 2 * h * h + 2 * h * kv;
        let mlp = 3 * h * self.intermediate_size;
        let layer = attn + mlp + 2 * h;
        let head = if self.tie_word_embeddings { 0 } else { self.vocab_size * h };
        self.vocab_size * h + self.num_layers * layer + h + head
    }
}

#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    eps: f64,
}

impl RmsNorm {
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if fused::available(&x.device(), x.dtype()) {
            return fused::rms_norm(x, self.weight.val(), self.eps);
        }
        let rms = x.clone().square().mean_dim(D - 1).add_scalar(self.eps).sqrt();
        (x / rms) * self.weight.val().unsqueeze()
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
}

/// Dropout masks drawn on the host from a ChaCha stream seeded per step.
///
/// Burn's backends keep one process-wide RNG (Flex: a global mutex), so two models training
/// in one process, or parallel tests, would interleave their draws. A stream owned by the step
/// makes dropout a pure function of `(seed, step)`, identical on every backend.
pub struct DropoutMasks {
    rng: ChaCha8Rng,
    rate: f64,
}

impl DropoutMasks {
    pub fn new(rate: f64, seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
            rate,
        }
    }

    /// `x` with each element zeroed with probability `rate` and the rest scaled by
    /// `1 / (1 - rate)`.
    fn apply(&mut self, x: Tensor<2>) -> Tensor<2> {
        if self.rate <= 0.0 {
            return x;
        }
        let keep = 1.0 - self.rate;
        let dims = x.dims();
        let n: usize = dims.iter().product();
        let scale = (1.0 / keep) as f32;
        let mask: Vec<f32> = (0..n)
            .map(|_| if self.rng.random::<f64>() < keep { scale } else { 0.0 })
            .collect();
        let device = x.device().without_autodiff();
        x * Tensor::<2>::from_data(TensorData::new(mask, dims), &device)
    }
}

/// Cached keys and values of one layer, `[batch, kv_heads, positions, head_dim]`.
#[derive(Debug, Clone, Default)]
pub struct LayerCache {
    kv: Option<(Tensor<4>, Tensor<4>)>,
}

/// Keys and values of every layer for incremental decoding.
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<LayerCache>,
}

impl KvCache {
    pub fn new(num_layers: usize) -> Self {
        Self {
            layers: vec![LayerCache::default(); num_layers],
        }
    }

    /// Positions already held (the next token's position).
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.kv.as_ref())
            .map_or(0, |(k, _)| k.dims()[2])
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// cos/sin tables of the rotary embedding for every position, `[max_pos, head_dim]`, computed
/// once on the host in f64 (Hugging Face: `inv_freq = 1 / theta^(2i/d)`, `emb = cat(f, f)`).
#[derive(Debug, Clone)]
pub struct RotaryTables {
    cos: Vec<f32>,
    sin: Vec<f32>,
    head_dim: usize,
    max_positions: usize,
}

impl RotaryTables {
    pub fn new(head_dim: usize, max_positions: usize, theta: f64) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            for i in 0..head_dim {
                let inv_freq = 1.0 / theta.powf((2 * (i % half)) as f64 / head_dim as f64);
                let angle = pos as f64 * inv_freq;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Self {
            cos,
            sin,
            head_dim,
            max_positions,
        }
    }

    /// Rotates `x` (`[batch, heads, seq, head_dim]`) as positions `start..start + seq`.
    pub fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        self.slice(start, x.dims()[2], &x.device()).rotate(x.swap_dims(1, 2)).swap_dims(1, 2)
    }

    /// The tables for positions `start..start + len`.
    fn slice(&self, start: usize, len: usize, device: &Device) -> Rotary {
        let range = start * self.head_dim..(start + len) * self.head_dim;
        let shape = [len, self.head_dim];
        let make = |v: &[f32]| Tensor::from_data(TensorData::new(v[range.clone()].to_vec(), shape), device);
        Rotary {
            cos: make(&self.cos),
            sin: make(&self.sin),
        }
    }
}

/// cos and sin tables `[positions, head_dim]` for the positions of one forward pass.
struct Rotary {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl Rotary {
    /// Rotates `x` laid out `[batch, seq, heads, head_dim]`, keeping that layout:
    /// `x * cos + rotate_half(x) * sin`, with `rotate_half(x) = cat(-x2, x1)`.
    fn rotate(&self, x: Tensor<4>) -> Tensor<4> {
        if fused::available(&x.device(), x.dtype()) {
            return fused::rotary(x, self.cos.clone(), self.sin.clone());
        }
        let [b, s, h, d] = x.dims();
        let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..d / 2]);
        let x2 = x.clone().slice([0..b, 0..s, 0..h, d / 2..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let table = |t: &Tensor<2>| t.clone().reshape([1, s, 1, d]);
        x * table(&self.cos) + rotated * table(&self.sin)
    }
}

impl LlamaAttention {
    /// `x` is the residual stream of `batch` sequences, flattened to `[batch * seq, hidden]`.
    fn forward(&self, x: Tensor<2>, batch: usize, rotary: &Rotary, cache: Option<&mut LayerCache>) -> Tensor<2> {
        let [tokens, hidden] = x.dims();
        let (b, s) = (batch, tokens / batch);
        let head_dim = hidden / self.num_heads;
        let fused = fused::available(&x.device(), x.dtype());
        let scale = (head_dim as f64).powf(-0.5);
        // `[batch, seq, heads, head_dim]`, the order the projections produce.
        let heads = |t: Tensor<2>, n: usize| t.reshape([b, s, n, head_dim]);
        let q = rotary.rotate(heads(project(&self.q_proj, x.clone()), self.num_heads));
        let k = rotary.rotate(heads(project(&self.k_proj, x.clone()), self.num_kv_heads));
        let v = heads(project(&self.v_proj, x), self.num_kv_heads);
        if fused && cache.is_none() {
            let out = fused::causal_attention(q, k, v, scale);
            return project(&self.o_proj, out.reshape([tokens, hidden]));
        }
        let (q, mut k, mut v) = (q.swap_dims(1, 2), k.swap_dims(1, 2), v.swap_dims(1, 2));

        let past = match cache {
            Some(cache) => {
                let past = cache.kv.as_ref().map_or(0, |(pk, _)| pk.dims()[2]);
                if let Some((pk, pv)) = cache.kv.take() {
                    k = Tensor::cat(vec![pk, k], 2);
                    v = Tensor::cat(vec![pv, v], 2);
                }
                cache.kv = Some((k.clone(), v.clone()));
                past
            }
            None => 0,
        };

        let k = repeat_kv(k, self.num_heads / self.num_kv_heads);
        let v = repeat_kv(v, self.num_heads / self.num_kv_heads);
        if fused {
            let scores = q.matmul(k.swap_dims(2, 3));
            let out = fused::causal_softmax(scores, scale).matmul(v);
            return project(&self.o_proj, out.swap_dims(1, 2).reshape([tokens, hidden]));
        }
        // A query block that starts after cached positions needs the causal mask shifted by
        // `past` (bottom-right aligned); a single new token sees everything cached.
        let (mask, is_causal) = match (past, s) {
            (0, _) => (None, true),
            (_, 1) => (None, false),
            _ => (Some(shifted_causal_mask(s, past, &k.device())), false),
        };
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal,
        };
        let out = attention(q, k, v, mask, None, options);
        project(&self.o_proj, out.swap_dims(1, 2).reshape([tokens, hidden]))
    }
}

/// Mask (true = hidden) for `s` queries at positions `past..past + s` over `past + s` keys.
fn shifted_causal_mask(s: usize, past: usize, device: &Device) -> Tensor<4, burn::tensor::Bool> {
    let total = past + s;
    let data: Vec<bool> = (0..s)
        .flat_map(|i| (0..total).map(move |j| j > past + i))
        .collect();
    Tensor::from_data(TensorData::new(data, [1, 1, s, total]), device)
}

/// `layer` applied to rows of `x`; on the CPU backends through the fused product (Burn's
/// `Linear` otherwise, and for layers with a bias, which kiln's Llama never has).
fn project(layer: &Linear, x: Tensor<2>) -> Tensor<2> {
    if layer.bias.is_none() && fused::available(&x.device(), x.dtype()) {
        return fused::linear(x, layer.weight.val());
    }
    layer.forward(x)
}

/// Repeats each key/value head `n_rep` times (Hugging Face `repeat_kv`): query head `h` uses
/// key/value head `h / n_rep`.
fn repeat_kv(x: Tensor<4>, n_rep: usize) -> Tensor<4> {
    if n_rep == 1 {
        return x;
    }
    let [b, kvh, s, d] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([b, kvh, n_rep, s, d])
        .reshape([b, kvh * n_rep, s, d])
}

impl LlamaMlp {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let gate = project(&self.gate_proj, x.clone());
        let up = project(&self.up_proj, x);
        let hidden = if fused::available(&gate.device(), gate.dtype()) {
            fused::swiglu(gate, up)
        } else {
            silu(gate) * up
        };
        project(&self.down_proj, hidden)
    }
}

impl LlamaForCausalLM {
    /// A randomly initialised model: every matrix and embedding from N(0, `init_std`), every
    /// norm weight 1, as Hugging Face's `LlamaPreTrainedModel._init_weights`. Values come from a
    /// ChaCha RNG seeded with `seed`, so they are identical on every backend.
    pub fn init(
        shape: &LlamaShape,
        init_std: f64,
        dropout: f64,
        seed: u64,
        device: &Device,
    ) -> Self {
        Self::build(shape, dropout, ParamInit::normal(seed, init_std, device), device)
    }

    /// A model of `shape` with zero matrices, to load weights into: loading replaces every
    /// parameter, and fails if the files lack one. Drawing `init`'s normal values would be
    /// wasted there (half a second at 100M parameters, on the path of every resume).
    pub fn for_loading(shape: &LlamaShape, dropout: f64, device: &Device) -> Self {
        Self::build(shape, dropout, ParamInit::zeros(device), device)
    }

    fn build(shape: &LlamaShape, dropout: f64, mut init: ParamInit, device: &Device) -> Self {
        let h = shape.hidden_size;
        let kv = shape.num_kv_heads * shape.head_dim();
        let mut layers = Vec::with_capacity(shape.num_layers);
        let embed = Embedding {
            weight: init.matrix(shape.vocab_size, h),
        };
        for _ in 0..shape.num_layers {
            layers.push(LlamaDecoderLayer {
                self_attn: LlamaAttention {
                    q_proj: init.linear(h, h),
                    k_proj: init.linear(h, kv),
                    v_proj: init.linear(h, kv),
                    o_proj: init.linear(h, h),
                    num_heads: shape.num_heads,
                    num_kv_heads: shape.num_kv_heads,
                },
                mlp: LlamaMlp {
                    gate_proj: init.linear(h, shape.intermediate_size),
                    up_proj: init.linear(h, shape.intermediate_size),
                    down_proj: init.linear(shape.intermediate_size, h),
                },
                input_layernorm: RmsNorm::ones(h, shape.rms_norm_eps, device),
                post_attention_layernorm: RmsNorm::ones(h, shape.rms_norm_eps, device),
            });
        }
        let lm_head = (!shape.tie_word_embeddings).then(|| init.linear(h, shape.vocab_size));
        Self {
            model: LlamaModel {
                embed_tokens: embed,
                layers,
                norm: RmsNorm::ones(h, shape.rms_norm_eps, device),
            },
            lm_head,
            dropout,
            rope: RotaryTables::new(shape.head_dim(), shape.max_position_embeddings, shape.rope_theta),
        }
    }

    /// The same model with another training-time dropout rate.
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }

    pub fn dropout(&self) -> f64 {
        self.dropout
    }

    pub fn max_positions(&self) -> usize {
        self.rope.max_positions
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, tokens: Tensor<2, Int>) -> Tensor<3> {
        self.forward_with(tokens, None, None)
    }

    /// Like `forward`, continuing from (and extending) `cache` when given: the tokens are at
    /// positions `cache.len()..`.
    pub fn forward_cached(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<3> {
        self.forward_with(tokens, cache, None)
    }

    /// Logits `[batch, vocab]` of the last position only, continuing from (and extending)
    /// `cache` as [`Self::forward_cached`] does: all that sampling the next token needs, without
    /// the output layer's product for every other position of a prompt.
    pub fn last_logits(&self, tokens: Tensor<2, Int>, cache: Option<&mut KvCache>) -> Tensor<2> {
        let [b, s] = tokens.dims();
        let x = self.hidden_states(tokens, cache, None);
        let hidden = x.dims()[1];
        let last = x.reshape([b, s, hidden]).slice([0..b, s - 1..s, 0..hidden]).reshape([b, hidden]);
        self.output_layer(last)
    }

    /// The full forward pass; `dropout` (training only) masks the embeddings and each residual
    /// branch.
    pub fn forward_with(
        &self,
        tokens: Tensor<2, Int>,
        cache: Option<&mut KvCache>,
        dropout: Option<&mut DropoutMasks>,
    ) -> Tensor<3> {
        let [b, s] = tokens.dims();
        let logits = self.output_layer(self.hidden_states(tokens, cache, dropout));
        let vocab = logits.dims()[1];
        logits.reshape([b, s, vocab])
    }

    /// The final (normalised) hidden states `[batch * seq, hidden]` that the output layer reads.
    fn hidden_states(
        &self,
        tokens: Tensor<2, Int>,
        mut cache: Option<&mut KvCache>,
        mut dropout: Option<&mut DropoutMasks>,
    ) -> Tensor<2> {
        let mut drop = |x: Tensor<2>| match dropout.as_deref_mut() {
            Some(masks) => masks.apply(x),
            None => x,
        };
        let [b, s] = tokens.dims();
        let start = cache.as_ref().map_or(0, |c| c.len());
        let device = tokens.device();
        let rotary = self.rope.slice(start, s, &device);
        // The residual stream is kept as `[batch * seq, hidden]`: every projection is then one
        // 2-D matmul, and its weight gradient one matmul over all tokens instead of a batch of
        // per-sequence products summed afterwards.
        let hidden = self.model.embed_tokens.weight.dims()[1];
        let mut x = drop(self.model.embed_tokens.forward(tokens).reshape([b * s, hidden]));
        for (i, layer) in self.model.layers.iter().enumerate() {
            let layer_cache = cache.as_mut().map(|c| &mut c.layers[i]);
            let attn = layer
                .self_attn
                .forward(layer.input_layernorm.forward(x.clone()), b, &rotary, layer_cache);
            x = x + drop(attn);
            let mlp = layer.mlp.forward(layer.post_attention_layernorm.forward(x.clone()));
            x = x + drop(mlp);
        }
        self.model.norm.forward(x)
    }

    /// Logits `[rows, vocab]` of hidden states `[rows, hidden]`.
    fn output_layer(&self, x: Tensor<2>) -> Tensor<2> {
        match &self.lm_head {
            Some(head) => project(head, x),
            None => x.matmul(self.model.embed_tokens.weight.val().transpose()),
        }
    }

    /// Mean next-token cross-entropy (nats/token) of `targets` under `forward(inputs)`.
    pub fn loss(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>) -> Tensor<1> {
        self.loss_with(inputs, targets, None)
    }

    /// The training loss, with dropout masks drawn from a stream seeded by `dropout_seed`.
    pub fn train_loss(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>, dropout_seed: u64) -> Tensor<1> {
        let mut masks = DropoutMasks::new(self.dropout, dropout_seed);
        self.loss_with(inputs, targets, (self.dropout > 0.0).then_some(&mut masks))
    }

    fn loss_with(&self, inputs: Tensor<2, Int>, targets: Tensor<2, Int>, dropout: Option<&mut DropoutMasks>) -> Tensor<1> {
        let [b, s] = inputs.dims();
        let x = self.hidden_states(inputs, None, dropout);
        // Where the fused kernels run, the output layer and the loss are one op that never
        // holds all the logits (the largest tensor of a step with a real vocabulary).
        if fused::available(&x.device(), x.dtype()) {
            let head = match &self.lm_head {
                Some(head) if head.bias.is_none() => Some((head.weight.val(), fused::linear_cross_entropy::Layout::HiddenVocab)),
                Some(_) => None,
                None => Some((self.model.embed_tokens.weight.val(), fused::linear_cross_entropy::Layout::VocabHidden)),
            };
            if let Some((weight, layout)) = head {
                return fused::linear_cross_entropy(x, weight, targets, layout);
            }
        }
        let logits = self.output_layer(x);
        let vocab = logits.dims()[1];
        cross_entropy(logits.reshape([b, s, vocab]), targets)
    }
}

/// Mean cross-entropy of logits `[b, s, v]` against target ids `[b, s]`.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    let logits = logits.reshape([b * s, v]);
    if fused::available(&logits.device(), logits.dtype()) {
        return fused::cross_entropy(logits, targets);
    }
    let log_probs = log_softmax(logits, 1);
    let picked = log_probs.gather(1, targets.reshape([b * s, 1]));
    picked.mean().neg()
}

/// Where a new model's matrices come from: one seeded stream drawn in a fixed order, or zeros.
struct ParamInit<'a> {
    /// Normal values in a seeded order; `None`: zeros, for a model about to be loaded.
    normal: Option<(ChaCha8Rng, Normal<f32>)>,
    device: &'a Device,
}

impl<'a> ParamInit<'a> {
    fn normal(seed: u64, std: f64, device: &'a Device) -> Self {
        let normal = Normal::new(0.0, std as f32).expect("init std is validated positive");
        Self {
            normal: Some((ChaCha8Rng::seed_from_u64(seed), normal)),
            device,
        }
    }

    fn zeros(device: &'a Device) -> Self {
        Self { normal: None, device }
    }

    fn matrix(&mut self, rows: usize, cols: usize) -> Param<Tensor<2>> {
        let values: Vec<f32> = match &mut self.normal {
            Some((rng, normal)) => (0..rows * cols).map(|_| normal.sample(rng)).collect(),
            None => vec![0.0; rows * cols],
        };
        Param::from_data(TensorData::new(values, [rows, cols]), self.device)
    }

    /// A bias-free Linear; Burn stores its weight `[in, out]`.
    fn linear(&mut self, d_in: usize, d_out: usize) -> Linear {
        Linear {
            weight: self.matrix(d_in, d_out),
            bias: None,
        }
    }
}

impl RmsNorm {
    fn ones(size: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_data(TensorData::new(vec![1.0f32; size], [size]), device),
            eps,
        }
    }
}
