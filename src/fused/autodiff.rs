//! Hand-written backward passes of the fused ops on `Autodiff<B>` for the [`Host`] backends:
//! each op is one node in the autodiff graph instead of the chain of nodes it replaces.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, AutodiffBackend};

use super::host::{self, Host};
use super::linear_cross_entropy::{Layout, Wanted};
use super::{FusedOps, kernels};

/// Hands each gradient to its parent, skipping parents that do not require one. (A macro
/// because burn-autodiff does not export the parent node type.)
macro_rules! register {
    ($b:ty, $grads:expr, $parents:expr, [$($value:expr),+]) => {{
        let values: Vec<FloatTensor<$b>> = vec![$($value),+];
        for (parent, value) in $parents.into_iter().zip(values) {
            if let Some(parent) = parent {
                $grads.register::<$b>(parent.id, value);
            }
        }
    }};
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: Host> Backward<B, 2> for RmsNormBackward {
    /// Input, weight and each row's inverse RMS.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, weight, inv_rms) = ops.state;
        let gy = grads.consume::<B>(&ops.node);
        let (gx, gw) = host::rms_norm_backward::<B>(&gy, &x, &weight, &inv_rms);
        register!(B, grads, ops.parents, [gx, gw]);
    }
}

#[derive(Debug)]
struct SwigluBackward;

impl<B: Host> Backward<B, 2> for SwigluBackward {
    /// Gate and up projections.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let gh = grads.consume::<B>(&ops.node);
        let (d_gate, d_up) = host::swiglu_backward::<B>(&gh, &gate, &up);
        register!(B, grads, ops.parents, [d_gate, d_up]);
    }
}

#[derive(Debug)]
struct CausalSoftmaxBackward;

impl<B: Host> Backward<B, 1> for CausalSoftmaxBackward {
    /// The probabilities (the op's output) and the score scale.
    type State = (FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (probs, scale) = ops.state;
        let gp = grads.consume::<B>(&ops.node);
        register!(B, grads, ops.parents, [host::causal_softmax_backward::<B>(&gp, &probs, scale)]);
    }
}

#[derive(Debug)]
struct LinearBackward;

impl<B: Host> Backward<B, 2> for LinearBackward {
    /// Input and weight.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w) = ops.state;
        let gy = grads.consume::<B>(&ops.node);
        let dims = host::linear_dims::<B>(&x, &w);
        let [x_parent, w_parent] = ops.parents;
        // Each gradient only when its input wants one (frozen weights, constant inputs).
        if let Some(parent) = x_parent {
            grads.register::<B>(parent.id, host::linear_input_grad::<B>(&gy, &w, dims));
        }
        if let Some(parent) = w_parent {
            grads.register::<B>(parent.id, host::linear_weight_grad::<B>(&x, &gy, dims));
        }
    }
}

#[derive(Debug)]
struct AttentionBackward;

impl<B: Host> Backward<B, 3> for AttentionBackward {
    /// Queries, keys, values, the probabilities and the score scale.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (q, k, v, probs, scale) = ops.state;
        let gout = grads.consume::<B>(&ops.node);
        let (dq, dk, dv) = host::attention_backward::<B>(&gout, &q, &k, &v, &probs, scale);
        register!(B, grads, ops.parents, [dq, dk, dv]);
    }
}

#[derive(Debug)]
struct RotaryBackward;

impl<B: Host> Backward<B, 1> for RotaryBackward {
    /// The cos and sin tables.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, sin) = ops.state;
        let gy = grads.consume::<B>(&ops.node);
        register!(B, grads, ops.parents, [host::rotary::<B>(&gy, &cos, &sin, true)]);
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: Host> Backward<B, 1> for CrossEntropyBackward {
    /// Logits, target ids and each row's log-sum-exp.
    type State = (FloatTensor<B>, Vec<usize>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, ids, lse) = ops.state;
        let g = grads.consume::<B>(&ops.node);
        register!(B, grads, ops.parents, [host::cross_entropy_backward::<B>(&g, &logits, &ids, &lse)]);
    }
}

#[derive(Debug)]
struct LinearCrossEntropyBackward;

impl<B: Host> Backward<B, 2> for LinearCrossEntropyBackward {
    /// The gradients of the mean loss with respect to the input and the weight (each only when
    /// that parent requires one), computed by the forward pass.
    type State = (Option<FloatTensor<B>>, Option<FloatTensor<B>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (dx, dw) = ops.state;
        let g = B::values(&grads.consume::<B>(&ops.node))[0];
        for (parent, grad) in ops.parents.into_iter().zip([dx, dw]) {
            if let (Some(parent), Some(grad)) = (parent, grad) {
                grads.register::<B>(parent.id, host::scaled::<B>(grad, g));
            }
        }
    }
}

impl<B: Host, C: CheckpointStrategy> FusedOps for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let (y, inv_rms) = host::rms_norm_forward::<B>(x.primitive(), weight.primitive(), eps);
        match RmsNormBackward.prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x.into_primitive(), weight.into_primitive(), inv_rms), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = B::swiglu(gate.primitive().clone(), up.primitive().clone());
        match SwigluBackward.prepare::<C>([gate.node(), up.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((gate.into_primitive(), up.into_primitive()), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn causal_softmax(scores: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        let probs = B::causal_softmax(scores.primitive().clone(), scale);
        match CausalSoftmaxBackward.prepare::<C>([scores.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((probs.clone(), scale), probs),
            OpsKind::UnTracked(prep) => prep.finish(probs),
        }
    }

    fn linear(x: FloatTensor<Self>, weight: FloatTensor<Self>) -> FloatTensor<Self> {
        let y = <B as FusedOps>::linear(x.primitive().clone(), weight.primitive().clone());
        match LinearBackward.prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((x.into_primitive(), weight.into_primitive()), y),
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn causal_attention(q: FloatTensor<Self>, k: FloatTensor<Self>, v: FloatTensor<Self>, scale: f64) -> FloatTensor<Self> {
        let (out, probs) = host::attention_forward::<B>(q.primitive(), k.primitive(), v.primitive(), scale);
        match AttentionBackward.prepare::<C>([q.node(), k.node(), v.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                prep.finish((q.into_primitive(), k.into_primitive(), v.into_primitive(), probs, scale), out)
            }
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }

    fn adamw(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        exp_avg: FloatTensor<Self>,
        exp_avg_sq: FloatTensor<Self>,
        step: kernels::AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        // An optimizer step is outside the graph: run it on the inner tensors.
        let (p, m, v) = B::adamw(Self::inner(param), Self::inner(grad), Self::inner(exp_avg), Self::inner(exp_avg_sq), step);
        (Self::from_inner(p), Self::from_inner(m), Self::from_inner(v))
    }

    fn cross_entropy(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let (loss, lse, ids) = host::cross_entropy_forward::<B>(logits.primitive(), &targets);
        match CrossEntropyBackward.prepare::<C>([logits.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((logits.into_primitive(), ids, lse), loss),
            OpsKind::UnTracked(prep) => prep.finish(loss),
        }
    }

    fn linear_cross_entropy(x: FloatTensor<Self>, weight: FloatTensor<Self>, targets: IntTensor<Self>, layout: Layout) -> FloatTensor<Self> {
        // The gradients come out of the same pass over the logits as the loss, so which ones to
        // compute is decided here, from which inputs require one.
        let wanted = Wanted { input: x.is_tracked(), weight: weight.is_tracked() };
        match LinearCrossEntropyBackward.prepare::<C>([x.node(), weight.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (loss, dx, dw) = host::linear_cross_entropy::<B>(x.primitive(), weight.primitive(), &targets, layout, wanted);
                prep.finish((dx, dw), loss)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(host::linear_cross_entropy::<B>(x.primitive(), weight.primitive(), &targets, layout, Wanted::NONE).0)
            }
        }
    }

    fn rotary(x: FloatTensor<Self>, cos: FloatTensor<Self>, sin: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = host::rotary::<B>(x.primitive(), cos.primitive(), sin.primitive(), false);
        match RotaryBackward.prepare::<C>([x.node()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => prep.finish((cos.into_primitive(), sin.into_primitive()), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        }
    }
}
