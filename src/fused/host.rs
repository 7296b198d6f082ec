//! The fused ops on the CPU backends' own tensors (Flex and NdArray): borrow each input's `f32`
//! buffer (copying only a strided view), run the kernel, wrap the new buffer as a tensor of the
//! right shape. [`Host`] is all that differs between the two backends.

#![allow(deprecated)] // NdArray is deprecated in favour of Flex, but kiln still offers it

use std::borrow::Cow;

use burn::backend::flex::FlexTensor;
use burn::backend::ndarray::NdArrayTensor;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Flex, NdArray, TensorMetadata};
use burn::tensor::{Shape, TensorData};

use super::linear_cross_entropy::{self, Dims as LceDims, Layout, Wanted};
use super::{FusedOps, attention, kernels, linear};
use crate::buffer::{filled, filled_many};

/// A CPU backend whose `f32` tensors the kernels read as slices and build from vectors.
pub trait Host: FusedOps {
    /// The tensor's values in row-major order, borrowed when it is contiguous.
    fn values(t: &FloatTensor<Self>) -> Cow<'_, [f32]>;
    /// A tensor of `shape` holding `values`.
    fn tensor(values: Vec<f32>, shape: Shape) -> FloatTensor<Self>;
    /// An integer tensor's values in row-major order, whatever its integer type.
    fn ints(t: &IntTensor<Self>) -> Vec<i64>;
    /// The tensors after `update` changed their values in place (in private copies where a
    /// buffer is shared or strided).
    fn update<const N: usize>(ts: [FloatTensor<Self>; N], update: impl FnOnce([&mut [f32]; N])) -> [FloatTensor<Self>; N];
}

impl Host for Flex {
    fn values(t: &FlexTensor) -> Cow<'_, [f32]> {
        match t.as_slice::<f32>() {
            Some(v) => Cow::Borrowed(v),
            None => Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("a contiguous f32 tensor").to_vec()),
        }
    }

    fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    fn ints(t: &FlexTensor) -> Vec<i64> {
        t.clone().into_data().iter::<i64>().collect()
    }

    fn update<const N: usize>(ts: [FlexTensor; N], update: impl FnOnce([&mut [f32]; N])) -> [FlexTensor; N] {
        // Only a buffer that holds exactly the elements in order can be changed in place
        // (`storage_mut` still copies it first if another tensor shares it).
        let mut ts = ts.map(|t| {
            let exact = t.as_slice::<f32>().is_some_and(|v| v.len() * 4 == t.bytes().len());
            if exact { t } else { t.to_contiguous() }
        });
        update(ts.each_mut().map(|t| t.storage_mut::<f32>()));
        ts
    }
}

impl Host for NdArray {
    fn values(t: &NdArrayTensor) -> Cow<'_, [f32]> {
        let NdArrayTensor::F32(storage) = t else { panic!("the fused kernels take f32 tensors, not {:?}", t.dtype()) };
        let view = storage.view();
        match view.to_slice() {
            Some(v) => Cow::Borrowed(v),
            None => Cow::Owned(storage.view().iter().copied().collect()),
        }
    }

    fn tensor(values: Vec<f32>, shape: Shape) -> NdArrayTensor {
        NdArrayTensor::from_data(TensorData::new(values, shape))
    }

    fn ints(t: &NdArrayTensor) -> Vec<i64> {
        // (A macro: the storage type of each arm is private to burn-ndarray.)
        macro_rules! widen {
            ($s:expr) => {
                $s.view().iter().map(|&v| i64::from(v)).collect()
            };
        }
        match t {
            NdArrayTensor::I64(s) => widen!(s),
            NdArrayTensor::I32(s) => widen!(s),
            NdArrayTensor::I16(s) => widen!(s),
            NdArrayTensor::I8(s) => widen!(s),
            NdArrayTensor::U32(s) => widen!(s),
            NdArrayTensor::U16(s) => widen!(s),
            NdArrayTensor::U8(s) => widen!(s),
            other => panic!("expected an integer tensor, not {:?}", other.dtype()),
        }
    }

    fn update<const N: usize>(ts: [NdArrayTensor; N], update: impl FnOnce([&mut [f32]; N])) -> [NdArrayTensor; N] {
        fn array(t: &mut NdArrayTensor) -> &mut burn::backend::ndarray::SharedArray<f32> {
            match t {
                NdArrayTensor::F32(storage) => storage.ensure_owned(),
                other => panic!("the fused kernels take f32 tensors, not {:?}", other.dtype()),
            }
        }
        let mut ts = ts.map(|mut t| {
            let a = array(&mut t);
            if !a.is_standard_layout() {
                *a = a.as_standard_layout().into_owned().into_shared();
            }
            t
        });
        // `as_slice_mut` copies a buffer first if another tensor shares it.
        update(ts.each_mut().map(|t| array(t).as_slice_mut().expect("a standard-layout array")));
        ts
    }
}

/// Size of the last dimension and the number of rows before it.
fn rows(shape: &Shape) -> (usize, usize) {
    let last = shape[shape.num_dims() - 1];
    (shape.num_elements() / last.max(1), last)
}

pub(super) fn rms_norm_forward<B: Host>(x: &FloatTensor<B>, weight: &FloatTensor<B>, eps: f64) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = x.shape();
    let (n, _) = rows(&shape);
    // SAFETY: the kernel writes every row of `y` and every row's `inv_rms`.
    let [y, inv_rms] = unsafe {
        filled_many([shape.num_elements(), n], |[y, inv_rms]| {
            kernels::rms_norm(&B::values(x), &B::values(weight), eps as f32, y, inv_rms)
        })
    };
    (B::tensor(y, shape), B::tensor(inv_rms, Shape::new([n])))
}

pub(super) fn rms_norm_backward<B: Host>(gy: &FloatTensor<B>, x: &FloatTensor<B>, weight: &FloatTensor<B>, inv_rms: &FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = x.shape();
    let mut gw = Vec::new();
    // SAFETY: the kernel writes every row of `gx`.
    let gx = unsafe {
        filled(shape.num_elements(), |gx| {
            gw = kernels::rms_norm_backward(&B::values(gy), &B::values(x), &B::values(weight), &B::values(inv_rms), gx)
        })
    };
    (B::tensor(gx, shape), B::tensor(gw, weight.shape()))
}

pub(super) fn swiglu_backward<B: Host>(gh: &FloatTensor<B>, gate: &FloatTensor<B>, up: &FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = gate.shape();
    let n = shape.num_elements();
    // SAFETY: the kernel writes every element of both gradients.
    let [d_gate, d_up] = unsafe {
        filled_many([n, n], |[d_gate, d_up]| {
            kernels::swiglu_backward(&B::values(gh), &B::values(gate), &B::values(up), d_gate, d_up)
        })
    };
    (B::tensor(d_gate, shape.clone()), B::tensor(d_up, shape))
}

/// `(queries, keys)`: the last two dimensions of attention scores.
fn score_dims(shape: &Shape) -> (usize, usize) {
    let d = shape.num_dims();
    let (queries, keys) = (shape[d - 2], shape[d - 1]);
    assert!(queries <= keys, "causal softmax over {queries} queries but only {keys} keys");
    (queries, keys)
}

pub(super) fn causal_softmax_backward<B: Host>(gp: &FloatTensor<B>, probs: &FloatTensor<B>, scale: f64) -> FloatTensor<B> {
    let shape = probs.shape();
    let (queries, keys) = score_dims(&shape);
    // SAFETY: the kernel writes every row of `gs`, masked entries included.
    let gs = unsafe {
        filled(shape.num_elements(), |gs| {
            kernels::causal_softmax_backward(&B::values(gp), &B::values(probs), queries, keys, scale as f32, gs)
        })
    };
    B::tensor(gs, shape)
}

/// The target ids of a cross-entropy over `vocab` classes as indices. An id outside the
/// vocabulary is a bug upstream (kiln checks tokenizers against the model when loading), so
/// it panics with the id, as Burn's own `gather` would.
fn target_ids<B: Host>(targets: &IntTensor<B>, vocab: usize) -> Vec<usize> {
    B::ints(targets)
        .into_iter()
        .map(|id| match usize::try_from(id) {
            Ok(i) if i < vocab => i,
            _ => panic!("target id {id} is outside the vocabulary of {vocab} tokens"),
        })
        .collect()
}

/// `(rows, vocab)` of `[rows, vocab]` logits, checked against the number of targets.
fn logit_dims<B: Host>(logits: &FloatTensor<B>, targets: &IntTensor<B>) -> (usize, usize) {
    let (shape, target_shape) = (logits.shape(), targets.shape());
    assert!(shape.num_dims() == 2, "cross-entropy takes [rows, vocab] logits, not {shape:?}");
    assert_eq!(shape[0], target_shape.num_elements(), "{shape:?} logits but {target_shape:?} targets");
    (shape[0], shape[1])
}

/// The mean loss `[1]`, each row's log-sum-exp and the target ids (what the backward pass needs).
pub(super) fn cross_entropy_forward<B: Host>(logits: &FloatTensor<B>, targets: &IntTensor<B>) -> (FloatTensor<B>, FloatTensor<B>, Vec<usize>) {
    let (rows, vocab) = logit_dims::<B>(logits, targets);
    let ids = target_ids::<B>(targets, vocab);
    // SAFETY: the kernel writes every row's loss and log-sum-exp.
    let [losses, lse] = unsafe {
        filled_many([rows, rows], |[losses, lse]| kernels::cross_entropy(&B::values(logits), &ids, vocab, losses, lse))
    };
    (B::tensor(vec![kernels::mean_loss(&losses)], Shape::new([1])), B::tensor(lse, Shape::new([rows])), ids)
}

/// The mean loss `[1]` of the output layer `x W` against `targets`, and the gradients of it
/// that `wanted` asks for (the input's, the weight's in its own layout).
pub(super) fn linear_cross_entropy<B: Host>(
    x: &FloatTensor<B>,
    weight: &FloatTensor<B>,
    targets: &IntTensor<B>,
    layout: Layout,
    wanted: Wanted,
) -> (FloatTensor<B>, Option<FloatTensor<B>>, Option<FloatTensor<B>>) {
    let (xs, ws) = (x.shape(), weight.shape());
    assert!(xs.num_dims() == 2 && ws.num_dims() == 2, "the output layer takes a [tokens, hidden] input and a 2-D weight");
    let (hidden, vocab) = match layout {
        Layout::HiddenVocab => (ws[0], ws[1]),
        Layout::VocabHidden => (ws[1], ws[0]),
    };
    assert_eq!(xs[1], hidden, "output layer input {xs:?} does not match its weight {ws:?} ({layout:?})");
    assert_eq!(xs[0], targets.shape().num_elements(), "{xs:?} inputs but {:?} targets", targets.shape());
    let dims = LceDims { tokens: xs[0], hidden, vocab, layout };
    let ids = target_ids::<B>(targets, vocab);
    let out = linear_cross_entropy::forward(&B::values(x), &B::values(weight), &ids, dims, wanted, dims.slice_tokens());
    (
        B::tensor(vec![kernels::mean_loss(&out.losses)], Shape::new([1])),
        out.input_grad.map(|g| B::tensor(g, xs)),
        out.weight_grad.map(|g| B::tensor(g, ws)),
    )
}

/// `t * factor`, in place where `t` owns its buffer (a gradient from the forward pass times the
/// upstream gradient, which is 1 unless the loss was scaled).
pub(super) fn scaled<B: Host>(t: FloatTensor<B>, factor: f32) -> FloatTensor<B> {
    if factor == 1.0 {
        return t;
    }
    let [t] = B::update([t], |[v]| v.iter_mut().for_each(|x| *x *= factor));
    t
}

/// The logits' gradient, given the gradient `g` `[1]` of the mean loss.
pub(super) fn cross_entropy_backward<B: Host>(g: &FloatTensor<B>, logits: &FloatTensor<B>, ids: &[usize], lse: &FloatTensor<B>) -> FloatTensor<B> {
    let shape = logits.shape();
    let (rows, vocab) = (shape[0], shape[1]);
    let scale = B::values(g)[0] / rows as f32;
    // SAFETY: the kernel writes every element of every row.
    let grad = unsafe {
        filled(shape.num_elements(), |grad| {
            kernels::cross_entropy_backward(&B::values(logits), ids, &B::values(lse), vocab, scale, grad)
        })
    };
    B::tensor(grad, shape)
}

/// `x` is `[batch, positions, heads, head_dim]`, the tables `[positions, head_dim]`.
pub(super) fn rotary<B: Host>(x: &FloatTensor<B>, cos: &FloatTensor<B>, sin: &FloatTensor<B>, inverse: bool) -> FloatTensor<B> {
    let shape = x.shape();
    let (heads, head_dim) = (shape[2], shape[3]);
    // SAFETY: the kernel writes every row of `y`.
    let y = unsafe {
        filled(shape.num_elements(), |y| {
            kernels::rotary(&B::values(x), &B::values(cos), &B::values(sin), heads, head_dim, inverse, y)
        })
    };
    B::tensor(y, shape)
}

/// Sizes of attention over queries `[batch, queries, heads, head_dim]` and keys/values
/// `[batch, keys, kv_heads, head_dim]`.
fn attention_dims<B: Host>(q: &FloatTensor<B>, k: &FloatTensor<B>, v: &FloatTensor<B>) -> attention::Dims {
    let (qs, ks) = (q.shape(), k.shape());
    assert!(qs.num_dims() == 4 && ks.num_dims() == 4, "attention takes [batch, seq, heads, head_dim] tensors");
    assert_eq!(ks, v.shape(), "keys and values differ in shape");
    assert!(qs[0] == ks[0] && qs[3] == ks[3], "queries {qs:?} and keys {ks:?} do not match");
    attention::Dims { batch: qs[0], queries: qs[1], keys: ks[1], heads: qs[2], kv_heads: ks[2], head_dim: qs[3] }
}

/// The attention output and the probabilities the backward pass needs.
pub(super) fn attention_forward<B: Host>(q: &FloatTensor<B>, k: &FloatTensor<B>, v: &FloatTensor<B>, scale: f64) -> (FloatTensor<B>, FloatTensor<B>) {
    let dims = attention_dims::<B>(q, k, v);
    let (out, probs) = attention::forward(&B::values(q), &B::values(k), &B::values(v), dims, scale as f32);
    let probs_shape = Shape::new([dims.batch, dims.heads, dims.queries, dims.keys]);
    (B::tensor(out, q.shape()), B::tensor(probs, probs_shape))
}

pub(super) fn attention_backward<B: Host>(
    gout: &FloatTensor<B>,
    q: &FloatTensor<B>,
    k: &FloatTensor<B>,
    v: &FloatTensor<B>,
    probs: &FloatTensor<B>,
    scale: f64,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let dims = attention_dims::<B>(q, k, v);
    let (dq, dk, dv) = attention::backward(&B::values(gout), &B::values(q), &B::values(k), &B::values(v), &B::values(probs), dims, scale as f32);
    (B::tensor(dq, q.shape()), B::tensor(dk, k.shape()), B::tensor(dv, v.shape()))
}

/// Sizes of `x` `[tokens, d_in]` times `w` `[d_in, d_out]`.
pub(super) fn linear_dims<B: Host>(x: &FloatTensor<B>, w: &FloatTensor<B>) -> linear::Dims {
    let (xs, ws) = (x.shape(), w.shape());
    assert!(xs.num_dims() == 2 && ws.num_dims() == 2 && xs[1] == ws[0], "linear of {xs:?} by {ws:?}");
    linear::Dims { tokens: xs[0], d_in: ws[0], d_out: ws[1] }
}

pub(super) fn linear_input_grad<B: Host>(gy: &FloatTensor<B>, w: &FloatTensor<B>, dims: linear::Dims) -> FloatTensor<B> {
    B::tensor(linear::input_grad(&B::values(gy), &B::values(w), dims), Shape::new([dims.tokens, dims.d_in]))
}

pub(super) fn linear_weight_grad<B: Host>(x: &FloatTensor<B>, gy: &FloatTensor<B>, dims: linear::Dims) -> FloatTensor<B> {
    B::tensor(linear::weight_grad(&B::values(x), &B::values(gy), dims), Shape::new([dims.d_in, dims.d_out]))
}

fn swiglu<B: Host>(gate: &FloatTensor<B>, up: &FloatTensor<B>) -> FloatTensor<B> {
    let shape = gate.shape();
    // SAFETY: the kernel writes every element of `out`.
    let out = unsafe { filled(shape.num_elements(), |out| kernels::swiglu(&B::values(gate), &B::values(up), out)) };
    B::tensor(out, shape)
}

fn causal_softmax<B: Host>(scores: &FloatTensor<B>, scale: f64) -> FloatTensor<B> {
    let shape = scores.shape();
    let (queries, keys) = score_dims(&shape);
    // SAFETY: the kernel writes every row of `out`, masked entries included.
    let out = unsafe {
        filled(shape.num_elements(), |out| kernels::causal_softmax(&B::values(scores), queries, keys, scale as f32, out))
    };
    B::tensor(out, shape)
}

fn linear_forward<B: Host>(x: &FloatTensor<B>, weight: &FloatTensor<B>) -> FloatTensor<B> {
    let dims = linear_dims::<B>(x, weight);
    B::tensor(linear::forward(&B::values(x), &B::values(weight), dims), Shape::new([dims.tokens, dims.d_out]))
}

fn adamw<B: Host>(
    param: FloatTensor<B>,
    grad: &FloatTensor<B>,
    exp_avg: FloatTensor<B>,
    exp_avg_sq: FloatTensor<B>,
    step: &kernels::AdamWStep,
) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
    let grad = B::values(grad);
    let [p, m, v] = B::update([param, exp_avg, exp_avg_sq], |[p, m, v]| kernels::adamw(p, &grad, m, v, step));
    (p, m, v)
}

/// The fused ops on a [`Host`] backend: the same kernels on both.
macro_rules! host_fused_ops {
    ($backend:ty) => {
        impl FusedOps for $backend {
            fn linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
                linear_forward::<Self>(&x, &weight)
            }

            fn causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
                attention_forward::<Self>(&q, &k, &v, scale).0
            }

            fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
                rms_norm_forward::<Self>(&x, &weight, eps).0
            }

            fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
                swiglu::<Self>(&gate, &up)
            }

            fn causal_softmax(scores: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
                causal_softmax::<Self>(&scores, scale)
            }

            fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
                rotary::<Self>(&x, &cos, &sin, false)
            }

            fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
                cross_entropy_forward::<Self>(&logits, &targets).0
            }

            fn linear_cross_entropy(x: FloatTensor<Self>, weight: FloatTensor<Self>, targets: IntTensor<Self>, layout: Layout) -> FloatTensor<Self> {
                linear_cross_entropy::<Self>(&x, &weight, &targets, layout, Wanted::NONE).0
            }

            fn adamw(
                param: FloatTensor<Self>,
                grad: FloatTensor<Self>,
                exp_avg: FloatTensor<Self>,
                exp_avg_sq: FloatTensor<Self>,
                step: kernels::AdamWStep,
            ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
                adamw::<Self>(param, &grad, exp_avg, exp_avg_sq, &step)
            }
        }
    };
}

host_fused_ops!(Flex);
host_fused_ops!(NdArray);
