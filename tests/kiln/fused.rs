//! The fused kernels (on Flex and on ndarray) against the composed tensor ops they replace (run
//! on ndarray with the kernels switched off for the test's thread): forward values and the
//! gradients of every input, plus determinism under different thread counts.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};
use kiln::fused::linear_cross_entropy::{self as lce, Layout};
use kiln::fused::{self, attention, kernels, linear};
use burn::module::Param;
use burn::tensor::Gradients;
use kiln::model::{LanguageModel, LlamaForCausalLM, LlamaShape};
use kiln::params::NamedVisitor;
use rand::{Rng, SeedableRng};
use std::mem::MaybeUninit;
use rand_chacha::ChaCha8Rng;

fn random(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

fn values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

#[allow(deprecated)]
fn ndarray() -> Device {
    Device::ndarray().autodiff()
}

fn flex() -> Device {
    Device::flex().autodiff()
}

/// Runs a kernel on outputs of `lens` elements, first set to NaN, and returns them, after
/// checking that it wrote every element (the promise its callers rely on to skip clearing).
fn written<const N: usize>(lens: [usize; N], kernel: impl FnOnce([&mut [MaybeUninit<f32>]; N])) -> [Vec<f32>; N] {
    let mut outs = lens.map(|n| vec![MaybeUninit::new(f32::NAN); n]);
    kernel(outs.each_mut().map(|o| o.as_mut_slice()));
    // SAFETY: every element was initialised (to NaN) before the kernel ran.
    let outs = outs.map(|o| unsafe { o.assume_init_ref() }.to_vec());
    for (i, out) in outs.iter().enumerate() {
        assert!(out.iter().all(|v| !v.is_nan()), "output {i} has elements the kernel did not write");
    }
    outs
}

/// Largest `|a - b| / (1 + |b|)` over all elements.
fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    assert_eq!(a.len(), b.len(), "{what}: lengths differ");
    let worst = a.iter().zip(b).map(|(x, y)| (x - y).abs() / (1.0 + y.abs())).fold(0.0f32, f32::max);
    assert!(worst <= tol, "{what}: largest relative difference {worst:e} > {tol:e}");
}

/// Runs `op` fused on Flex and on ndarray and composed on ndarray with the same inputs, each
/// made differentiable, and compares the outputs and every input's gradient under the loss
/// `sum(output * weights)` with random `weights`.
fn check<const D: usize, const N: usize>(
    what: &str,
    inputs: [(Vec<f32>, Vec<usize>); N],
    op: impl Fn([Tensor<D>; N], &Device) -> Tensor<D>,
) {
    let run = |device: &Device| {
        let tensors: [Tensor<D>; N] = inputs.clone().map(|(v, s)| {
            let dims: [usize; D] = std::array::from_fn(|i| s.get(i).copied().unwrap_or(1));
            let t = Tensor::<D>::from_data(TensorData::new(v, dims), device);
            t.require_grad()
        });
        let out = op(tensors.clone(), device);
        let n: usize = out.dims().iter().product();
        let weights = Tensor::<D>::from_data(TensorData::new(random(n, 99, 1.0), out.dims()), device);
        let grads = (out.clone() * weights).sum().backward();
        let input_grads: Vec<Vec<f32>> = tensors.iter().map(|t| values(t.grad(&grads).expect("a gradient"))).collect();
        (values(out.inner()), input_grads)
    };
    let (reference_out, reference_grads) = fused::composed(|| run(&ndarray()));
    for (backend, device) in [("flex", flex()), ("ndarray", ndarray())] {
        let (fused_out, fused_grads) = run(&device);
        assert_close(&format!("{what} forward on {backend}"), &fused_out, &reference_out, 2e-6);
        for (i, (f, r)) in fused_grads.iter().zip(&reference_grads).enumerate() {
            assert_close(&format!("{what} gradient of input {i} on {backend}"), f, r, 1e-5);
        }
    }
}

#[test]
fn exp_matches_f64_to_an_ulp() {
    for i in -8700..=8800 {
        let x = i as f32 / 100.0;
        let want = (x as f64).exp();
        let got = kernels::exp(x) as f64;
        assert!(((got - want) / want).abs() < 3e-7, "exp({x}) = {got}, want {want}");
    }
}

#[test]
fn rms_norm_matches_the_composed_ops() {
    let (rows, h) = (300, 24); // more rows than one task holds, so partial sums are combined
    check::<3, 2>(
        "rms_norm",
        [(random(rows * h, 1, 2.0), vec![3, rows / 3, h]), (random(h, 2, 1.5), vec![h])],
        |[x, w], device| {
            let w: Tensor<1> = w.reshape([h]);
            if fused::available(device, x.dtype()) {
                fused::rms_norm(x, w, 1e-5)
            } else {
                let rms = x.clone().square().mean_dim(2).add_scalar(1e-5).sqrt();
                (x / rms) * w.unsqueeze()
            }
        },
    );
}

#[test]
fn swiglu_matches_the_composed_ops() {
    let n = 40_000; // several tasks
    check::<2, 2>(
        "swiglu",
        [(random(n, 3, 6.0), vec![100, n / 100]), (random(n, 4, 2.0), vec![100, n / 100])],
        |[gate, up], device| {
            if fused::available(device, gate.dtype()) { fused::swiglu(gate, up) } else { silu(gate) * up }
        },
    );
}

/// The reference: scale, mask (true = hidden, bottom-right aligned), softmax.
fn composed_causal_softmax(scores: Tensor<4>, scale: f64) -> Tensor<4> {
    let [b, h, q, k] = scores.dims();
    let past = k - q;
    let mask: Vec<bool> = (0..q).flat_map(|i| (0..k).map(move |j| j > i + past)).collect();
    let mask = Tensor::<4, Bool>::from_data(TensorData::new(mask, [1, 1, q, k]), &scores.device()).expand([b, h, q, k]);
    softmax(scores.mul_scalar(scale).mask_fill(mask, f32::NEG_INFINITY), 3)
}

#[test]
fn causal_softmax_matches_the_composed_ops() {
    // Square (training) and queries after cached keys (generation).
    for (q, k) in [(17, 17), (5, 12), (1, 9)] {
        let (b, h) = (2, 3);
        check::<4, 1>(
            &format!("causal_softmax {q}x{k}"),
            [(random(b * h * q * k, 5, 4.0), vec![b, h, q, k])],
            |[scores], device| {
                if fused::available(device, scores.dtype()) {
                    fused::causal_softmax(scores, 0.125)
                } else {
                    composed_causal_softmax(scores, 0.125)
                }
            },
        );
    }
}

#[test]
fn linear_matches_the_composed_matmul() {
    // One token slice, and several (the weight gradient then sums slices of 512 tokens).
    for tokens in [37, 1100] {
        let (d_in, d_out) = (24, 40);
        check::<2, 2>(
            &format!("linear over {tokens} tokens"),
            [(random(tokens * d_in, 31, 1.0), vec![tokens, d_in]), (random(d_in * d_out, 32, 0.5), vec![d_in, d_out])],
            |[x, w], device| {
                if fused::available(device, x.dtype()) { fused::linear(x, w) } else { x.matmul(w) }
            },
        );
    }
}

#[test]
fn a_frozen_linear_weight_gets_no_gradient_but_its_input_does() {
    let device = flex();
    let x = Tensor::<2>::from_data(TensorData::new(random(6 * 4, 33, 1.0), [6, 4]), &device).require_grad();
    let w = Tensor::<2>::from_data(TensorData::new(random(4 * 3, 34, 1.0), [4, 3]), &device);
    let grads = fused::linear(x.clone(), w.clone()).sum().backward();
    assert!(w.grad(&grads).is_none());
    // d sum(x W) / dx = each row of x gets the row sums of W.
    let row_sums: Vec<f32> = values(w.inner().sum_dim(1).reshape([4]));
    let want: Vec<f32> = (0..6).flat_map(|_| row_sums.clone()).collect();
    assert_close("input gradient", &values(x.grad(&grads).unwrap()), &want, 1e-6);
}

/// The reference attention on `[batch, seq, heads, head_dim]` tensors: heads first, keys and
/// values repeated per query group, scores, masked softmax, weighted values, token order again.
fn composed_attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f64) -> Tensor<4> {
    let [b, sk, kv_heads, d] = k.dims();
    let n_rep = q.dims()[2] / kv_heads;
    let repeat = |t: Tensor<4>| {
        let t = t.swap_dims(1, 2);
        t.unsqueeze_dim::<5>(2).expand([b, kv_heads, n_rep, sk, d]).reshape([b, kv_heads * n_rep, sk, d])
    };
    let (k, v) = (repeat(k), repeat(v));
    let scores = q.swap_dims(1, 2).matmul(k.swap_dims(2, 3));
    composed_causal_softmax(scores, scale).matmul(v).swap_dims(1, 2)
}

#[test]
fn causal_attention_matches_the_composed_ops() {
    // Several 64-row query blocks, queries after cached keys, grouped-query heads, one query.
    for (sq, sk, heads, kv_heads) in [(130, 130, 4, 2), (70, 150, 2, 2), (1, 9, 4, 1), (5, 5, 3, 3)] {
        let (b, d) = (2, 8);
        let what = format!("causal_attention {sq} queries, {sk} keys, {heads}/{kv_heads} heads");
        check::<4, 3>(
            &what,
            [
                (random(b * sq * heads * d, 21, 1.0), vec![b, sq, heads, d]),
                (random(b * sk * kv_heads * d, 22, 1.0), vec![b, sk, kv_heads, d]),
                (random(b * sk * kv_heads * d, 23, 1.0), vec![b, sk, kv_heads, d]),
            ],
            |[q, k, v], device| {
                if fused::available(device, q.dtype()) {
                    fused::causal_attention(q, k, v, 0.3)
                } else {
                    composed_attention(q, k, v, 0.3)
                }
            },
        );
    }
}

#[test]
fn rotary_matches_the_rotate_half_formula_with_its_gradient() {
    let (b, s, n, d) = (2, 7, 3, 8);
    let tables = kiln::model::RotaryTables::new(d, 16, 10000.0);
    check::<4, 1>("rotary", [(random(b * s * n * d, 6, 1.0), vec![b, s, n, d])], |[x], _device| {
        // RotaryTables::apply takes [batch, heads, seq, head_dim] and picks the path itself.
        tables.apply(x.swap_dims(1, 2), 3)
    });
}

#[test]
fn cross_entropy_matches_log_softmax_and_gather_with_its_gradient() {
    // 300 rows of a 257-token vocabulary: several tasks of 63 rows, rows that end mid-vector.
    let (rows, vocab) = (300, 257);
    let logits = random(rows * vocab, 12, 8.0);
    let ids: Vec<i32> = (0..rows).map(|i| (i * 97 % vocab) as i32).collect();
    let run = |device: &Device| {
        let x = Tensor::<2>::from_data(TensorData::new(logits.clone(), [rows, vocab]), device).require_grad();
        let targets = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), [3, rows / 3]), device);
        // Through model.rs's entry point, which picks the fused op where it is available; the
        // factor checks that the upstream gradient reaches the logits' gradient.
        let loss = kiln::model::cross_entropy(x.clone().reshape([3, rows / 3, vocab]), targets);
        let grads = loss.clone().mul_scalar(2.5).backward();
        (values(loss.inner()), values(x.grad(&grads).expect("a gradient")))
    };
    let (reference_loss, reference_grad) = fused::composed(|| run(&ndarray()));
    for (backend, device) in [("flex", flex()), ("ndarray", ndarray()), ("flex without autodiff", Device::flex())] {
        if device.is_autodiff() {
            let (loss, grad) = run(&device);
            assert_close(&format!("cross-entropy on {backend}"), &loss, &reference_loss, 2e-6);
            assert_close(&format!("cross-entropy gradient on {backend}"), &grad, &reference_grad, 1e-6);
        } else {
            let x = Tensor::<2>::from_data(TensorData::new(logits.clone(), [rows, vocab]), &device);
            let targets = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [rows]), &device);
            assert_close(&format!("cross-entropy on {backend}"), &values(fused::cross_entropy(x, targets)), &reference_loss, 2e-6);
        }
    }
}

/// The output layer and the loss as Burn composes them: the reference for the fused op.
fn composed_linear_cross_entropy(x: Tensor<2>, w: Tensor<2>, targets: Tensor<1, Int>, layout: Layout) -> Tensor<1> {
    let logits = match layout {
        Layout::HiddenVocab => x.matmul(w),
        Layout::VocabHidden => x.matmul(w.transpose()),
    };
    let [rows, vocab] = logits.dims();
    fused::composed(|| kiln::model::cross_entropy(logits.reshape([1, rows, vocab]), targets.reshape([1, rows])))
}

#[test]
fn linear_cross_entropy_matches_the_output_layer_then_the_loss_with_both_gradients() {
    // 600 tokens of an 8,192-token vocabulary: two slices of logits (512 and 88 tokens).
    let (tokens, hidden, vocab) = (600, 48, 8192);
    let x = random(tokens * hidden, 41, 1.0);
    let w = random(hidden * vocab, 42, 0.5);
    let ids: Vec<i32> = (0..tokens).map(|i| (i * 7919 % vocab) as i32).collect();
    for layout in [Layout::HiddenVocab, Layout::VocabHidden] {
        let w_dims = match layout {
            Layout::HiddenVocab => [hidden, vocab],
            Layout::VocabHidden => [vocab, hidden],
        };
        let run = |device: &Device, fused_op: bool| {
            let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [tokens, hidden]), device).require_grad();
            let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), w_dims), device).require_grad();
            let targets = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [tokens]), device);
            let loss = if fused_op {
                fused::linear_cross_entropy(xt.clone(), wt.clone(), targets, layout)
            } else {
                composed_linear_cross_entropy(xt.clone(), wt.clone(), targets, layout)
            };
            // The factor checks that the upstream gradient reaches both gradients.
            let grads = loss.clone().mul_scalar(2.5).backward();
            let grad = |t: &Tensor<2>| values(t.grad(&grads).expect("a gradient"));
            (values(loss.inner()), grad(&xt), grad(&wt))
        };
        let (loss, dx, dw) = run(&ndarray(), false);
        for (backend, device) in [("flex", flex()), ("ndarray", ndarray())] {
            let (f_loss, f_dx, f_dw) = run(&device, true);
            let what = format!("{layout:?} on {backend}");
            assert_close(&format!("loss, {what}"), &f_loss, &loss, 2e-6);
            assert_close(&format!("input gradient, {what}"), &f_dx, &dx, 1e-6);
            assert_close(&format!("weight gradient, {what}"), &f_dw, &dw, 1e-6);
        }
        // Without autodiff: the loss alone.
        let device = Device::flex();
        let xt = Tensor::<2>::from_data(TensorData::new(x.clone(), [tokens, hidden]), &device);
        let wt = Tensor::<2>::from_data(TensorData::new(w.clone(), w_dims), &device);
        let targets = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [tokens]), &device);
        assert_close(&format!("loss, {layout:?} without autodiff"), &values(fused::linear_cross_entropy(xt, wt, targets, layout)), &loss, 2e-6);
    }
}

#[test]
fn linear_cross_entropy_gives_a_frozen_weight_no_gradient_and_its_input_the_right_one() {
    let (tokens, hidden, vocab) = (20, 8, 30);
    let device = flex();
    let targets = Tensor::<1, Int>::from_data(TensorData::new((0..tokens as i32).collect::<Vec<_>>(), [tokens]), &device);
    let input = || Tensor::<2>::from_data(TensorData::new(random(tokens * hidden, 43, 1.0), [tokens, hidden]), &device).require_grad();
    let w = Tensor::<2>::from_data(TensorData::new(random(hidden * vocab, 44, 1.0), [hidden, vocab]), &device);
    let x = input();
    let grads = fused::linear_cross_entropy(x.clone(), w.clone(), targets.clone(), Layout::HiddenVocab).backward();
    assert!(w.grad(&grads).is_none(), "a weight that requires no gradient got one");
    let x_ref = input();
    let ref_grads = composed_linear_cross_entropy(x_ref.clone(), w, targets, Layout::HiddenVocab).backward();
    assert_close("input gradient", &values(x.grad(&grads).unwrap()), &values(x_ref.grad(&ref_grads).unwrap()), 1e-6);
}

#[test]
fn linear_cross_entropy_slices_change_no_loss_and_no_gradient_beyond_rounding() {
    // Every slice size from one token to all of them, through the slice-level function.
    let (tokens, hidden, vocab) = (300, 24, 257);
    let x = random(tokens * hidden, 45, 1.0);
    let w = random(vocab * hidden, 46, 0.5);
    let ids: Vec<usize> = (0..tokens).map(|i| i * 97 % vocab).collect();
    let dims = lce::Dims { tokens, hidden, vocab, layout: Layout::VocabHidden };
    let all = lce::Wanted { input: true, weight: true };
    let whole = lce::forward(&x, &w, &ids, dims, all, tokens);
    let (dx, dw) = (whole.input_grad.clone().unwrap(), whole.weight_grad.clone().unwrap());
    for slice in [1, 7, 64, 299] {
        let sliced = lce::forward(&x, &w, &ids, dims, all, slice);
        // (gemm picks its kernel by shape, so a row's logits may round differently in a slice
        // of another size.)
        assert_close(&format!("losses, slices of {slice}"), &sliced.losses, &whole.losses, 1e-6);
        assert_close(&format!("input gradient, slices of {slice}"), sliced.input_grad.as_ref().unwrap(), &dx, 1e-6);
        assert_close(&format!("weight gradient, slices of {slice}"), sliced.weight_grad.as_ref().unwrap(), &dw, 1e-6);
        let loss_only = lce::forward(&x, &w, &ids, dims, lce::Wanted::NONE, slice);
        assert_eq!(loss_only.losses, sliced.losses, "losses without gradients, slices of {slice}");
        assert!(loss_only.input_grad.is_none() && loss_only.weight_grad.is_none());
    }
    let input_only = lce::forward(&x, &w, &ids, dims, lce::Wanted { input: true, weight: false }, 64);
    assert!(input_only.weight_grad.is_none());
    assert_close("input gradient alone", input_only.input_grad.as_ref().unwrap(), &dx, 1e-6);
}

#[test]
fn the_in_place_loss_kernel_writes_the_bits_of_the_loss_and_gradient_kernels() {
    let (rows, vocab) = (300, 257);
    let logits = random(rows * vocab, 47, 8.0);
    let ids: Vec<usize> = (0..rows).map(|i| i * 31 % vocab).collect();
    let [losses, lse] = written([rows, rows], |[losses, lse]| kernels::cross_entropy(&logits, &ids, vocab, losses, lse));
    let [grad] = written([rows * vocab], |[grad]| kernels::cross_entropy_backward(&logits, &ids, &lse, vocab, 0.003, grad));
    let mut in_place = logits.clone();
    let [in_place_losses] = written([rows], |[losses]| kernels::cross_entropy_in_place(&mut in_place, &ids, vocab, 0.003, losses));
    assert_eq!(in_place_losses, losses);
    assert_eq!(in_place, grad);
}

#[test]
fn the_cpu_backends_use_the_kernels_unless_switched_off_on_the_thread() {
    for device in [flex(), ndarray(), flex().without_autodiff(), ndarray().without_autodiff()] {
        assert!(fused::available(&device, burn::tensor::DType::F32), "{device:?}");
        assert!(!fused::available(&device, burn::tensor::DType::F64), "{device:?} f64");
        assert!(!fused::composed(|| fused::available(&device, burn::tensor::DType::F32)), "{device:?} composed");
        assert!(fused::available(&device, burn::tensor::DType::F32), "{device:?} after composed");
    }
}

/// The outputs of every kernel on the same inputs, named.
fn every_kernel_output() -> Vec<(&'static str, Vec<f32>)> {
    let (rows, h) = (1000, 64);
    let (x, w, gy) = (random(rows * h, 7, 3.0), random(h, 8, 1.0), random(rows * h, 9, 1.0));
    let [y, inv] = written([rows * h, rows], |[y, inv]| kernels::rms_norm(&x, &w, 1e-6, y, inv));
    let mut gw = Vec::new();
    let [gx] = written([rows * h], |[gx]| gw = kernels::rms_norm_backward(&gy, &x, &w, &inv, gx));
    let [p] = written([rows * h], |[p]| kernels::causal_softmax(&x, 50, h, 0.3, p));
    let [gs] = written([rows * h], |[gs]| kernels::causal_softmax_backward(&gy, &p, 50, h, 0.3, gs));
    let [s] = written([rows * h], |[s]| kernels::swiglu(&x, &gy, s));
    let [d_gate, d_up] = written([rows * h; 2], |[d_gate, d_up]| kernels::swiglu_backward(&w.repeat(rows), &x, &gy, d_gate, d_up));
    // As [batch 2, positions 100, heads 5, head_dim 64] with tables for 100 positions.
    let (cos, sin) = (random(100 * h, 10, 1.0), random(100 * h, 11, 1.0));
    let [r] = written([rows * h], |[r]| kernels::rotary(&x, &cos, &sin, 5, h, false, r));
    let [r_inv] = written([rows * h], |[r]| kernels::rotary(&x, &cos, &sin, 5, h, true, r));
    let (mut param, mut m, mut v) = (x.clone(), gy.clone(), gx.iter().map(|g| g * g).collect::<Vec<_>>());
    let step = kernels::AdamWStep { lr: 1e-3, beta1: 0.9, beta2: 0.99, eps: 1e-8, weight_decay: 0.1, bias_correction1: 0.19, bias_correction2_sqrt: 0.14 };
    kernels::adamw(&mut param, &gy, &mut m, &mut v, &step);
    // 1000 x 64 values as queries, keys, values and output gradient of 2 sequences of 100
    // positions, 5 heads of 64 over 5 key/value heads (several query blocks each).
    let dims = attention::Dims { batch: 2, queries: 100, keys: 100, heads: 5, kv_heads: 5, head_dim: 64 };
    let (out, probs) = attention::forward(&x, &gy, &gx, dims, 0.125);
    let (dq, dk, dv) = attention::backward(&gy, &x, &gy, &gx, &probs, dims, 0.125);
    // The same values as a linear layer over 1000 tokens of 64 into 64.
    let lin = linear::Dims { tokens: rows, d_in: h, d_out: h };
    let (ly, ldx, ldw) = (linear::forward(&x, &gx[..h * h], lin), linear::input_grad(&gy, &gx[..h * h], lin), linear::weight_grad(&x, &gy, lin));
    // The same values as 1000 rows of logits over 64 tokens.
    let ids: Vec<usize> = (0..rows).map(|i| i * 37 % h).collect();
    let [ce, lse] = written([rows, rows], |[ce, lse]| kernels::cross_entropy(&x, &ids, h, ce, lse));
    let [dce] = written([rows * h], |[dce]| kernels::cross_entropy_backward(&x, &ids, &lse, h, 0.01, dce));
    let mut dce_in_place = x.clone();
    let [ce_in_place] = written([rows], |[ce]| kernels::cross_entropy_in_place(&mut dce_in_place, &ids, h, 0.01, ce));
    // As an output layer from 1000 tokens of 64 into a vocabulary of 64, in slices of 300.
    let head = lce::Dims { tokens: rows, hidden: h, vocab: h, layout: Layout::HiddenVocab };
    let fused_head = lce::forward(&x, &gx[..h * h], &ids, head, lce::Wanted { input: true, weight: true }, 300);
    vec![
        ("rms_norm output", y),
        ("rms_norm inverse rms", inv),
        ("rms_norm input gradient", gx),
        ("rms_norm weight gradient", gw),
        ("causal softmax", p),
        ("causal softmax gradient", gs),
        ("swiglu", s),
        ("swiglu gate gradient", d_gate),
        ("swiglu up gradient", d_up),
        ("rotary", r),
        ("rotary inverse", r_inv),
        ("adamw parameter", param),
        ("adamw first moment", m),
        ("adamw second moment", v),
        ("attention output", out),
        ("attention probabilities", probs),
        ("attention dq", dq),
        ("attention dk", dk),
        ("attention dv", dv),
        ("linear output", ly),
        ("linear input gradient", ldx),
        ("linear weight gradient", ldw),
        ("cross-entropy losses", ce),
        ("cross-entropy log-sum-exp", lse),
        ("cross-entropy gradient", dce),
        ("cross-entropy in place losses", ce_in_place),
        ("cross-entropy in place gradient", dce_in_place),
        ("output layer and loss: losses", fused_head.losses),
        ("output layer and loss: input gradient", fused_head.input_grad.unwrap()),
        ("output layer and loss: weight gradient", fused_head.weight_grad.unwrap()),
    ]
}

fn assert_same_bits(expected: &[(&str, Vec<f32>)], got: &[(&str, Vec<f32>)], case: &str) {
    assert_eq!(expected.len(), got.len());
    let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
    for ((name, a), (_, b)) in expected.iter().zip(got) {
        assert!(a.iter().all(|v| v.is_finite()), "{name}: not finite");
        assert_eq!(bits(a), bits(b), "{name}, {case}");
    }
}

#[test]
fn kernels_give_identical_bits_on_any_number_of_threads() {
    let on_threads = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(every_kernel_output)
    };
    let one = on_threads(1);
    for threads in [2, 3, 8] {
        assert_same_bits(&one, &on_threads(threads), &format!("{threads} threads"));
    }
}

#[test]
fn kernels_give_identical_bits_on_every_vector_instruction_set() {
    // Each set the CPU lacks falls back to the next narrower one, so this compares whatever the
    // machine has (AVX-512, AVX2 and SSE2 on the CI machine) against the baseline.
    kernels::set_widest_isa(kernels::Isa::Baseline);
    let baseline = every_kernel_output();
    for isa in [kernels::Isa::Avx2, kernels::Isa::Avx512] {
        kernels::set_widest_isa(isa);
        assert_same_bits(&baseline, &every_kernel_output(), &format!("{isa:?} against the baseline"));
    }
}

#[test]
fn whole_model_loss_and_gradients_match_between_fused_and_composed_ops() {
    for tie_word_embeddings in [false, true] {
        whole_model_matches(LlamaShape { tie_word_embeddings, ..small_shape() });
    }
}

fn small_shape() -> LlamaShape {
    LlamaShape {
        vocab_size: 40,
        hidden_size: 32,
        num_layers: 2,
        num_heads: 4,
        num_kv_heads: 2,
        intermediate_size: 48,
        max_position_embeddings: 32,
        rope_theta: 10000.0,
        rms_norm_eps: 1e-5,
        tie_word_embeddings: false,
        qkv_bias: false,
        o_bias: false,
        mlp_bias: false,
        sliding_window: None,
    }
}

fn whole_model_matches(shape: LlamaShape) {
    let ids: Vec<i32> = (0..2 * 12).map(|i| (i * 7 % 40) as i32).collect();
    let run = |device: &Device| {
        let model = LlamaForCausalLM::init(&shape, 0.2, 0.0, 11, device);
        let batch = |offset: usize| {
            let v: Vec<i32> = ids.iter().map(|&t| (t + offset as i32) % 40).collect();
            Tensor::from_data(TensorData::new(v, [2, 12]), device)
        };
        let loss = model.loss(batch(0), batch(1));
        let grads = loss.backward();
        let mut collect = Grads { grads: &grads, all: vec![loss.into_scalar::<f32>()] };
        kiln::params::visit_named(&model, &mut collect);
        assert_eq!(collect.all.len(), 1 + shape.num_params());
        collect.all
    };
    let reference = fused::composed(|| run(&ndarray()));
    let tied = shape.tie_word_embeddings;
    assert_close(&format!("model loss and gradients on flex (tied: {tied})"), &run(&flex()), &reference, 2e-5);
    assert_close(&format!("model loss and gradients on ndarray (tied: {tied})"), &run(&ndarray()), &reference, 2e-5);
}

/// Every parameter's gradient, in module order.
struct Grads<'a> {
    grads: &'a Gradients,
    all: Vec<f32>,
}

impl NamedVisitor for Grads<'_> {
    fn visit<const D: usize>(&mut self, name: &str, param: &Param<Tensor<D>>) {
        let grad = param.val().grad(self.grads).unwrap_or_else(|| panic!("no gradient for {name}"));
        self.all.extend(values(grad));
    }
}
