//! The operations the model files are written in: norms, projections, rotary embeddings,
//! causal attention, MLP activations and the loss. Each picks kiln's fused CPU kernel where it
//! runs (Flex and ndarray, f32; see `fused`) and the composed Burn ops elsewhere, so that the
//! model files read as the maths.
//!
//! Mixed precision (`training.precision`): the activations carry the compute dtype from the
//! embedding on, and each op casts its fp32 parameters to it where it uses them, so gradients
//! flow back to fp32 master weights as fp32. Norm statistics and the loss are computed in fp32,
//! as PyTorch's autocast does. In fp32 every cast is a no-op.

use burn::module::{Module, Param};
use burn::nn::{Embedding, Linear};
use burn::tensor::activation::{gelu, log_softmax, silu, tanh};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Device, FloatDType, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

use crate::fused;

fn fused_here(x: &Tensor<2>) -> bool {
    fused::available(&x.device(), x.dtype())
}

/// Root-mean-square norm with a learned scale (Llama, Qwen2, Mistral).
#[derive(Module, Debug)]
pub struct RmsNorm {
    pub weight: Param<Tensor<1>>,
    #[module(skip)]
    eps: f64,
}

impl RmsNorm {
    pub fn ones(size: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_data(TensorData::new(vec![1.0f32; size], [size]), device),
            eps,
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let dtype = x.dtype();
        if dtype != DType::F32 {
            return self.forward(x.cast(FloatDType::F32)).cast(dtype);
        }
        if fused::available(&x.device(), dtype) {
            return fused::rms_norm(x, self.weight.val(), self.eps);
        }
        let rms = x.clone().square().mean_dim(D - 1).add_scalar(self.eps).sqrt();
        (x / rms) * self.weight.val().unsqueeze()
    }
}

/// Layer norm with a learned scale and shift, named as PyTorch's `nn.LayerNorm` (GPT-2).
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    #[module(skip)]
    eps: f64,
}

impl LayerNorm {
    pub fn new(size: usize, eps: f64, device: &Device) -> Self {
        Self {
            weight: Param::from_data(TensorData::new(vec![1.0f32; size], [size]), device),
            bias: Param::from_data(TensorData::new(vec![0.0f32; size], [size]), device),
            eps,
        }
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let dtype = x.dtype();
        if dtype != DType::F32 {
            return self.forward(x.cast(FloatDType::F32)).cast(dtype);
        }
        let mean = x.clone().mean_dim(1);
        let centered = x - mean;
        let var = centered.clone().square().mean_dim(1);
        let normed = centered / var.add_scalar(self.eps).sqrt();
        normed * self.weight.val().unsqueeze() + self.bias.val().unsqueeze()
    }
}

/// `layer` applied to rows of `x`: through the fused product on the CPU backends, with the
/// bias (Qwen2's q/k/v, GPT-2's every projection) added after it; Burn's `Linear` elsewhere.
pub fn project(layer: &Linear, x: Tensor<2>) -> Tensor<2> {
    let dtype = x.dtype();
    if dtype != layer.weight.val().dtype() {
        let out = x.matmul(layer.weight.val().cast(dtype));
        return match &layer.bias {
            Some(bias) => out + bias.val().cast(dtype).unsqueeze(),
            None => out,
        };
    }
    if !fused_here(&x) {
        return layer.forward(x);
    }
    let out = fused::linear(x, layer.weight.val());
    match &layer.bias {
        Some(bias) => out + bias.val().unsqueeze(),
        None => out,
    }
}

/// SwiGLU's gate: `silu(gate) * up`.
pub fn swiglu(gate: Tensor<2>, up: Tensor<2>) -> Tensor<2> {
    if fused::available(&gate.device(), gate.dtype()) {
        return fused::swiglu(gate, up);
    }
    silu(gate) * up
}

/// GELU in the tanh approximation GPT-2 uses (`gelu_new`, `gelu_pytorch_tanh`), or exact.
pub fn gelu_act(x: Tensor<2>, tanh_approximation: bool) -> Tensor<2> {
    if !tanh_approximation {
        return gelu(x);
    }
    let c = (2.0 / std::f64::consts::PI).sqrt();
    let inner = (x.clone() + x.clone().powi_scalar(3).mul_scalar(0.044715)).mul_scalar(c);
    x.mul_scalar(0.5) * (tanh(inner).add_scalar(1.0))
}

/// Logits `[rows, vocab]` of hidden states `[rows, hidden]` through an output layer that is
/// either its own Linear or the (tied) embedding table.
pub fn output_logits(head: Option<&Linear>, embedding: &Embedding, x: Tensor<2>) -> Tensor<2> {
    match head {
        Some(head) => project(head, x),
        None => {
            let dtype = x.dtype();
            x.matmul(embedding.weight.val().cast(dtype).transpose())
        }
    }
}

/// Mean next-token cross-entropy of hidden states `x` (`[batch * seq, hidden]`) against
/// `targets` through the output layer. Where the fused kernels run, the output layer and the
/// loss are one op that never holds all the logits (the largest tensor of a step with a real
/// vocabulary).
pub fn head_loss(head: Option<&Linear>, embedding: &Embedding, x: Tensor<2>, targets: Tensor<2, Int>) -> Tensor<1> {
    use fused::linear_cross_entropy::Layout;
    if fused_here(&x) {
        let fused_head = match head {
            Some(head) if head.bias.is_none() => Some((head.weight.val(), Layout::HiddenVocab)),
            Some(_) => None,
            None => Some((embedding.weight.val(), Layout::VocabHidden)),
        };
        if let Some((weight, layout)) = fused_head {
            return fused::linear_cross_entropy(x, weight, targets, layout);
        }
    }
    let [b, s] = targets.dims();
    let logits = output_logits(head, embedding, x);
    let vocab = logits.dims()[1];
    cross_entropy(logits.reshape([b, s, vocab]), targets)
}

/// Mean cross-entropy of logits `[b, s, v]` against target ids `[b, s]`.
pub fn cross_entropy(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    let logits = logits.reshape([b * s, v]).cast(FloatDType::F32);
    if fused::available(&logits.device(), logits.dtype()) {
        return fused::cross_entropy(logits, targets);
    }
    let log_probs = log_softmax(logits, 1);
    let picked = log_probs.gather(1, targets.reshape([b * s, 1]));
    picked.mean().neg()
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
    pub fn apply(&mut self, x: Tensor<2>) -> Tensor<2> {
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
        let dtype = x.dtype();
        x * Tensor::<2>::from_data(TensorData::new(mask, dims), &device).cast(dtype)
    }
}

/// `dropout` applied to `x` when training with one, `x` itself otherwise.
pub fn drop(dropout: &mut Option<&mut DropoutMasks>, x: Tensor<2>) -> Tensor<2> {
    match dropout.as_deref_mut() {
        Some(masks) => masks.apply(x),
        None => x,
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
    pub(crate) layers: Vec<LayerCache>,
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
        Self { cos, sin, head_dim }
    }

    /// Rotates `x` (`[batch, heads, seq, head_dim]`) as positions `start..start + seq`.
    pub fn apply(&self, x: Tensor<4>, start: usize) -> Tensor<4> {
        self.slice(start, x.dims()[2], &x.device()).rotate(x.swap_dims(1, 2)).swap_dims(1, 2)
    }

    /// The tables for positions `start..start + len`.
    pub fn slice(&self, start: usize, len: usize, device: &Device) -> Rotary {
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
pub struct Rotary {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl Rotary {
    /// Rotates `x` laid out `[batch, seq, heads, head_dim]`, keeping that layout:
    /// `x * cos + rotate_half(x) * sin`, with `rotate_half(x) = cat(-x2, x1)`.
    pub fn rotate(&self, x: Tensor<4>) -> Tensor<4> {
        if fused::available(&x.device(), x.dtype()) {
            return fused::rotary(x, self.cos.clone(), self.sin.clone());
        }
        let [b, s, h, d] = x.dims();
        let dtype = x.dtype();
        let x1 = x.clone().slice([0..b, 0..s, 0..h, 0..d / 2]);
        let x2 = x.clone().slice([0..b, 0..s, 0..h, d / 2..d]);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        let table = |t: &Tensor<2>| t.clone().cast(dtype).reshape([1, s, 1, d]);
        x * table(&self.cos) + rotated * table(&self.sin)
    }
}

/// Causal multi-head attention of queries `q` (`[batch, seq, heads, head_dim]`) over keys and
/// values `k`, `v` (`[batch, seq, kv_heads, head_dim]`, grouped-query when fewer), continuing
/// from and extending `cache` when given. Returns `[batch * seq, heads * head_dim]`.
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, cache: Option<&mut LayerCache>) -> Tensor<2> {
    let [b, s, num_heads, head_dim] = q.dims();
    let num_kv_heads = k.dims()[2];
    let tokens = b * s;
    let width = num_heads * head_dim;
    let fused = fused::available(&q.device(), q.dtype());
    let scale = (head_dim as f64).powf(-0.5);
    if fused && cache.is_none() {
        return fused::causal_attention(q, k, v, scale).reshape([tokens, width]);
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
    let k = repeat_kv(k, num_heads / num_kv_heads);
    let v = repeat_kv(v, num_heads / num_kv_heads);
    if fused {
        let scores = q.matmul(k.swap_dims(2, 3));
        let out = fused::causal_softmax(scores, scale).matmul(v);
        return out.swap_dims(1, 2).reshape([tokens, width]);
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
    out.swap_dims(1, 2).reshape([tokens, width])
}

/// Mask (true = hidden) for `s` queries at positions `past..past + s` over `past + s` keys.
fn shifted_causal_mask(s: usize, past: usize, device: &Device) -> Tensor<4, burn::tensor::Bool> {
    let total = past + s;
    let data: Vec<bool> = (0..s)
        .flat_map(|i| (0..total).map(move |j| j > past + i))
        .collect();
    Tensor::from_data(TensorData::new(data, [1, 1, s, total]), device)
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

/// Where a new model's parameters come from: one seeded stream drawn in a fixed order, or
/// zeros for a model about to be loaded.
pub struct ParamInit<'a> {
    normal: Option<(ChaCha8Rng, Normal<f32>)>,
    pub device: &'a Device,
}

impl<'a> ParamInit<'a> {
    /// Matrices and embeddings from N(0, `std`), as Hugging Face's `_init_weights`; biases 0.
    pub fn normal(seed: u64, std: f64, device: &'a Device) -> Self {
        let normal = Normal::new(0.0, std as f32).expect("init std is validated positive");
        Self {
            normal: Some((ChaCha8Rng::seed_from_u64(seed), normal)),
            device,
        }
    }

    pub fn zeros(device: &'a Device) -> Self {
        Self { normal: None, device }
    }

    pub fn matrix(&mut self, rows: usize, cols: usize) -> Param<Tensor<2>> {
        let values: Vec<f32> = match &mut self.normal {
            Some((rng, normal)) => (0..rows * cols).map(|_| normal.sample(rng)).collect(),
            None => vec![0.0; rows * cols],
        };
        Param::from_data(TensorData::new(values, [rows, cols]), self.device)
    }

    pub fn embedding(&mut self, rows: usize, cols: usize) -> Embedding {
        Embedding {
            weight: self.matrix(rows, cols),
        }
    }

    /// A Linear; Burn stores its weight `[in, out]`. A bias starts at zero.
    pub fn linear(&mut self, d_in: usize, d_out: usize, bias: bool) -> Linear {
        Linear {
            weight: self.matrix(d_in, d_out),
            bias: bias.then(|| Param::from_data(TensorData::new(vec![0.0f32; d_out], [d_out]), self.device)),
        }
    }
}
