//! The fused ops on Flex tensors: borrow each input's `f32` buffer (copying only a strided
//! view), run the kernel, wrap the new buffer as a tensor of the right shape.

use burn::backend::flex::FlexTensor;
use burn::backend::{Flex, TensorMetadata};
use burn::tensor::{Shape, TensorData};

use super::{FusedOps, attention, kernels, linear};

/// The tensor's values in row-major order, borrowed when it is contiguous.
fn values(t: &FlexTensor) -> std::borrow::Cow<'_, [f32]> {
    match t.as_slice::<f32>() {
        Some(v) => std::borrow::Cow::Borrowed(v),
        None => std::borrow::Cow::Owned(t.to_contiguous().as_slice::<f32>().expect("a contiguous f32 tensor").to_vec()),
    }
}

fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Size of the last dimension and the number of rows before it.
fn rows(shape: &Shape) -> (usize, usize) {
    let last = shape[shape.num_dims() - 1];
    (shape.num_elements() / last.max(1), last)
}

pub(super) fn rms_norm_forward(x: &FlexTensor, weight: &FlexTensor, eps: f64) -> (FlexTensor, FlexTensor) {
    let shape = x.shape();
    let (n, _) = rows(&shape);
    let mut y = vec![0.0; shape.num_elements()];
    let mut inv_rms = vec![0.0; n];
    kernels::rms_norm(&values(x), &values(weight), eps as f32, &mut y, &mut inv_rms);
    (tensor(y, shape), tensor(inv_rms, Shape::new([n])))
}

pub(super) fn rms_norm_backward(gy: &FlexTensor, x: &FlexTensor, weight: &FlexTensor, inv_rms: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let shape = x.shape();
    let mut gx = vec![0.0; shape.num_elements()];
    let gw = kernels::rms_norm_backward(&values(gy), &values(x), &values(weight), &values(inv_rms), &mut gx);
    (tensor(gx, shape), tensor(gw, weight.shape()))
}

pub(super) fn swiglu_backward(gh: &FlexTensor, gate: &FlexTensor, up: &FlexTensor) -> (FlexTensor, FlexTensor) {
    let shape = gate.shape();
    let (mut d_gate, mut d_up) = (vec![0.0; shape.num_elements()], vec![0.0; shape.num_elements()]);
    kernels::swiglu_backward(&values(gh), &values(gate), &values(up), &mut d_gate, &mut d_up);
    (tensor(d_gate, shape.clone()), tensor(d_up, shape))
}

/// `(queries, keys)`: the last two dimensions of attention scores.
fn score_dims(shape: &Shape) -> (usize, usize) {
    let d = shape.num_dims();
    let (queries, keys) = (shape[d - 2], shape[d - 1]);
    assert!(queries <= keys, "causal softmax over {queries} queries but only {keys} keys");
    (queries, keys)
}

pub(super) fn causal_softmax_backward(gp: &FlexTensor, probs: &FlexTensor, scale: f64) -> FlexTensor {
    let shape = probs.shape();
    let (queries, keys) = score_dims(&shape);
    let mut gs = vec![0.0; shape.num_elements()];
    kernels::causal_softmax_backward(&values(gp), &values(probs), queries, keys, scale as f32, &mut gs);
    tensor(gs, shape)
}

/// `x` is `[batch, positions, heads, head_dim]`, the tables `[positions, head_dim]`.
pub(super) fn rotary(x: &FlexTensor, cos: &FlexTensor, sin: &FlexTensor, inverse: bool) -> FlexTensor {
    let shape = x.shape();
    let (heads, head_dim) = (shape[2], shape[3]);
    let mut y = vec![0.0; shape.num_elements()];
    kernels::rotary(&values(x), &values(cos), &values(sin), heads, head_dim, inverse, &mut y);
    tensor(y, shape)
}

/// Sizes of attention over queries `[batch, queries, heads, head_dim]` and keys/values
/// `[batch, keys, kv_heads, head_dim]`.
fn attention_dims(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor) -> attention::Dims {
    let (qs, ks) = (q.shape(), k.shape());
    assert!(qs.num_dims() == 4 && ks.num_dims() == 4, "attention takes [batch, seq, heads, head_dim] tensors");
    assert_eq!(ks, v.shape(), "keys and values differ in shape");
    assert!(qs[0] == ks[0] && qs[3] == ks[3], "queries {qs:?} and keys {ks:?} do not match");
    attention::Dims { batch: qs[0], queries: qs[1], keys: ks[1], heads: qs[2], kv_heads: ks[2], head_dim: qs[3] }
}

/// The attention output and the probabilities the backward pass needs.
pub(super) fn attention_forward(q: &FlexTensor, k: &FlexTensor, v: &FlexTensor, scale: f64) -> (FlexTensor, FlexTensor) {
    let dims = attention_dims(q, k, v);
    let (out, probs) = attention::forward(&values(q), &values(k), &values(v), dims, scale as f32);
    let probs_shape = Shape::new([dims.batch, dims.heads, dims.queries, dims.keys]);
    (tensor(out, q.shape()), tensor(probs, probs_shape))
}

pub(super) fn attention_backward(
    gout: &FlexTensor,
    q: &FlexTensor,
    k: &FlexTensor,
    v: &FlexTensor,
    probs: &FlexTensor,
    scale: f64,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let dims = attention_dims(q, k, v);
    let (dq, dk, dv) = attention::backward(&values(gout), &values(q), &values(k), &values(v), &values(probs), dims, scale as f32);
    (tensor(dq, q.shape()), tensor(dk, k.shape()), tensor(dv, v.shape()))
}

/// Sizes of `x` `[tokens, d_in]` times `w` `[d_in, d_out]`.
pub(super) fn linear_dims(x: &FlexTensor, w: &FlexTensor) -> linear::Dims {
    let (xs, ws) = (x.shape(), w.shape());
    assert!(xs.num_dims() == 2 && ws.num_dims() == 2 && xs[1] == ws[0], "linear of {xs:?} by {ws:?}");
    linear::Dims { tokens: xs[0], d_in: ws[0], d_out: ws[1] }
}

pub(super) fn linear_input_grad(gy: &FlexTensor, w: &FlexTensor, dims: linear::Dims) -> FlexTensor {
    tensor(linear::input_grad(&values(gy), &values(w), dims), Shape::new([dims.tokens, dims.d_in]))
}

pub(super) fn linear_weight_grad(x: &FlexTensor, gy: &FlexTensor, dims: linear::Dims) -> FlexTensor {
    tensor(linear::weight_grad(&values(x), &values(gy), dims), Shape::new([dims.d_in, dims.d_out]))
}

impl FusedOps for Flex {
    fn linear(x: FlexTensor, weight: FlexTensor) -> FlexTensor {
        let dims = linear_dims(&x, &weight);
        tensor(linear::forward(&values(&x), &values(&weight), dims), Shape::new([dims.tokens, dims.d_out]))
    }

    fn causal_attention(q: FlexTensor, k: FlexTensor, v: FlexTensor, scale: f64) -> FlexTensor {
        attention_forward(&q, &k, &v, scale).0
    }

    fn rms_norm(x: FlexTensor, weight: FlexTensor, eps: f64) -> FlexTensor {
        rms_norm_forward(&x, &weight, eps).0
    }

    fn swiglu(gate: FlexTensor, up: FlexTensor) -> FlexTensor {
        let shape = gate.shape();
        let mut out = vec![0.0; shape.num_elements()];
        kernels::swiglu(&values(&gate), &values(&up), &mut out);
        tensor(out, shape)
    }

    fn causal_softmax(scores: FlexTensor, scale: f64) -> FlexTensor {
        let shape = scores.shape();
        let (queries, keys) = score_dims(&shape);
        let mut out = vec![0.0; shape.num_elements()];
        kernels::causal_softmax(&values(&scores), queries, keys, scale as f32, &mut out);
        tensor(out, shape)
    }

    fn rotary(x: FlexTensor, cos: FlexTensor, sin: FlexTensor) -> FlexTensor {
        rotary(&x, &cos, &sin, false)
    }

    fn adamw(
        param: FlexTensor,
        grad: FlexTensor,
        exp_avg: FlexTensor,
        exp_avg_sq: FlexTensor,
        step: kernels::AdamWStep,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (mut param, mut exp_avg, mut exp_avg_sq) = (owned(param), owned(exp_avg), owned(exp_avg_sq));
        let grad = values(&grad);
        kernels::adamw(
            param.storage_mut::<f32>(),
            &grad,
            exp_avg.storage_mut::<f32>(),
            exp_avg_sq.storage_mut::<f32>(),
            &step,
        );
        (param, exp_avg, exp_avg_sq)
    }
}

/// `t` with a buffer that holds exactly its elements in order, so that the buffer can be
/// updated in place (`storage_mut` still copies it first if another tensor shares it).
fn owned(t: FlexTensor) -> FlexTensor {
    let exact = t.as_slice::<f32>().is_some_and(|v| v.len() * 4 == t.bytes().len());
    if exact { t } else { t.to_contiguous() }
}
