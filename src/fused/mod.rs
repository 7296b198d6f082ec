//! Fused CPU kernels for the parts of a Llama step that Burn runs as chains of small
//! element-wise ops (RMSNorm, the SwiGLU gate, causal attention and its softmax alone for
//! decoding with a cache, the rotary embedding, the cross-entropy loss and the output layer
//! fused with it, the AdamW update), and for the linear layers,
//! whose products Burn surrounds with zero-fills and a poorly parallel weight gradient.
//!
//! Why: on Burn's CPU backends every element-wise op is its own pass over memory with its own
//! allocation and its own autodiff node, and many of those passes run on one thread. A Llama
//! layer spends ~20 of them forward and more backward on work that is one pass here, split
//! across threads, with the backward pass written by hand (docs/BENCHMARKS.md has the figures).
//! They are a Burn backend extension: the CPU backends (`Flex`, `NdArray`; see [`host`]) run
//! the kernels on their own buffers, `Autodiff<B>` records one graph node per op with its own
//! backward.
//!
//! Only those two backends use them ([`available`]); wgpu and cuda run the composed tensor ops
//! in `model::ops`, which are also the reference the tests hold these kernels to.

// Burn deprecates its NdArray backend in favour of Flex; kiln still offers both, and the
// extension and its availability check name it.
#![allow(deprecated)]

pub mod attention;
mod autodiff;
mod host;
pub mod kernels;
pub mod linear;
pub mod linear_cross_entropy;
pub(crate) mod matmul;

use std::cell::Cell;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, DispatchDevice, backend_extension};
use burn::tensor::{DType, Device, Int, Tensor};

/// The fused ops, implemented for `Flex`, `NdArray` and `Autodiff` over either.
#[backend_extension(Flex, NdArray, Autodiff)]
pub trait FusedOps: Backend {
    /// `x / sqrt(mean(x^2, last dim) + eps) * weight`.
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self>;
    /// `silu(gate) * up`.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Softmax of `scale * scores` over the last dimension with a bottom-right aligned causal
    /// mask (`[.., queries, keys]`, query `i` sees keys `..= i + keys - queries`).
    fn causal_softmax(scores: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
    /// `x W` for `x` `[tokens, d_in]` and a weight `[d_in, d_out]` (a bias-free linear layer).
    fn linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `softmax(scale * q k^T + causal mask) v` per head, on queries `[batch, queries, heads,
    /// head_dim]` and keys/values `[batch, keys, kv_heads, head_dim]` (grouped-query: query
    /// head `h` reads key/value head `h / (heads / kv_heads)`); the output has the queries'
    /// layout. The mask is bottom-right aligned, as [`FusedOps::causal_softmax`]'s.
    fn causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f64) -> FloatTensor<Self>;
    /// Rotary embedding (rotate-half) of `x` `[batch, positions, heads, head_dim]` with tables
    /// `[positions, head_dim]`; the tables are constants (no gradient).
    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Mean cross-entropy `[1]` of logits `[rows, vocab]` against target ids (`rows` of them):
    /// the mean over rows of `logsumexp(row) - row[target]`. Differentiable in the logits.
    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self>;
    /// [`FusedOps::cross_entropy`] of the output layer's logits `x W` against the targets, for
    /// `x` `[tokens, hidden]` and a bias-free weight laid out as `layout` says, without ever
    /// holding all the logits (see [`linear_cross_entropy`]). Differentiable in `x` and the
    /// weight.
    fn linear_cross_entropy(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        layout: linear_cross_entropy::Layout,
    ) -> FloatTensor<Self>;
    /// One AdamW step: the updated parameter and moments (updated in place when no other
    /// tensor shares their buffers). Not differentiable; the inputs are plain values.
    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        step: kernels::AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// On unless `KILN_FUSED=0` (or `off`/`false`) is set, an escape hatch that also lets the
/// benchmark measure what the kernels gain.
static ENABLED: LazyLock<AtomicBool> = LazyLock::new(|| {
    let off = matches!(std::env::var("KILN_FUSED").as_deref(), Ok("0" | "off" | "false"));
    AtomicBool::new(!off)
});

/// Turns the fused kernels on or off for the whole process (the benchmark's A/B switch).
pub fn set_enabled(enabled: bool) {
    ENABLED.store(enabled, Ordering::Relaxed);
}

thread_local! {
    static COMPOSED_HERE: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the fused kernels off on this thread only: the composed ops it then runs are
/// the independent reference the tests compare the kernels with, while other tests go on.
pub fn composed<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPOSED_HERE.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(COMPOSED_HERE.with(|c| c.replace(true)));
    f()
}

/// Whether tensors of this dtype on `device` run the fused kernels (f32 on Flex or NdArray,
/// unless switched off).
pub fn available(device: &Device, dtype: DType) -> bool {
    dtype == DType::F32
        && ENABLED.load(Ordering::Relaxed)
        && !COMPOSED_HERE.with(Cell::get)
        && matches!(device.clone().without_autodiff().as_dispatch(), DispatchDevice::Flex(_) | DispatchDevice::NdArray(_))
}

pub fn rms_norm<const D: usize>(x: Tensor<D>, weight: Tensor<1>, eps: f64) -> Tensor<D> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::rms_norm(x.into_dispatch(), weight.into_dispatch(), eps))
}

pub fn swiglu<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::swiglu(gate.into_dispatch(), up.into_dispatch()))
}

pub fn causal_softmax<const D: usize>(scores: Tensor<D>, scale: f64) -> Tensor<D> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::causal_softmax(scores.into_dispatch(), scale))
}

/// A bias-free linear layer on rows of `x`; see [`FusedOps::linear`].
pub fn linear(x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::linear(x.into_dispatch(), weight.into_dispatch()))
}

/// Causal attention on the token-ordered layout; see [`FusedOps::causal_attention`].
pub fn causal_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f64) -> Tensor<4> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::causal_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale,
    ))
}

pub fn rotary(x: Tensor<4>, cos: Tensor<2>, sin: Tensor<2>) -> Tensor<4> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::rotary(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
    ))
}

/// Mean cross-entropy of logits `[rows, vocab]` against target ids; see [`FusedOps::cross_entropy`].
pub fn cross_entropy<const D: usize>(logits: Tensor<2>, targets: Tensor<D, Int>) -> Tensor<1> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::cross_entropy(logits.into_dispatch(), targets.into_dispatch()))
}

/// The mean cross-entropy of the output layer `x W` against target ids; see
/// [`FusedOps::linear_cross_entropy`].
pub fn linear_cross_entropy<const D: usize>(
    x: Tensor<2>,
    weight: Tensor<2>,
    targets: Tensor<D, Int>,
    layout: linear_cross_entropy::Layout,
) -> Tensor<1> {
    Tensor::from_dispatch(<burn::backend::Dispatch as FusedOps>::linear_cross_entropy(
        x.into_dispatch(),
        weight.into_dispatch(),
        targets.into_dispatch(),
        layout,
    ))
}

/// One AdamW step on tensors of the same shape; returns `(param, exp_avg, exp_avg_sq)`.
pub fn adamw<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    exp_avg: Tensor<D>,
    exp_avg_sq: Tensor<D>,
    step: kernels::AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    let (p, m, v) = <burn::backend::Dispatch as FusedOps>::adamw(
        param.into_dispatch(),
        grad.into_dispatch(),
        exp_avg.into_dispatch(),
        exp_avg_sq.into_dispatch(),
        step,
    );
    (Tensor::from_dispatch(p), Tensor::from_dispatch(m), Tensor::from_dispatch(v))
}
