//! The output layer and the loss as one op, `mean(cross_entropy(x W, targets))`, taken over
//! slices of tokens with both gradients computed as each slice goes by (Liger-Kernel's fused
//! linear cross-entropy).
//!
//! Why: with a real tokenizer's vocabulary the logits are the largest tensor of a step
//! (`tokens x vocab`: 67 MB for 2,048 tokens of an 8,192-token vocabulary, 1.6 GB for 8,192
//! tokens of GPT-2's 50,257), and an autodiff graph keeps them from the forward pass to the
//! backward pass, then allocates their gradient beside them. Here one slice of logits exists at
//! a time: its losses are taken, it is overwritten with its own gradient while still in cache,
//! and that gradient goes straight into the input's and the weight's gradients. The backward
//! pass only scales those by the upstream gradient. The arithmetic is the same three products;
//! what goes is the memory, the page faults of allocating it every step, and the passes over it.
//!
//! Slices run in order, each product split over threads by gemm (which divides outputs, never
//! sums) and the weight gradient accumulated slice after slice, so the results are the same on
//! any number of threads.

use super::kernels;
use super::matmul::{View, matmul_parallel};
use std::mem::MaybeUninit;

use crate::buffer::{Dst, Src, filled};

/// Logits per slice (16 MiB of them), unless that is fewer than [`MIN_SLICE_TOKENS`] tokens.
const SLICE_LOGITS: usize = 1 << 22;

/// Fewest tokens in a slice: the weight gradient sums over a slice's tokens, and gemm needs a
/// long enough sum to run at full speed (256 measured ~10% slower at a 16,384-token vocabulary).
const MIN_SLICE_TOKENS: usize = 512;

/// How the output layer's weight is laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// `[hidden, vocab]`, a Burn `Linear` (`lm_head`).
    HiddenVocab,
    /// `[vocab, hidden]`, the token embedding when the output layer is tied to it.
    VocabHidden,
}

/// Sizes of the output layer applied to `tokens` rows.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub tokens: usize,
    pub hidden: usize,
    pub vocab: usize,
    pub layout: Layout,
}

impl Dims {
    fn x(&self) -> View {
        View::rows(0, self.tokens, self.hidden, self.hidden)
    }

    /// The weight as the `[hidden, vocab]` matrix that multiplies `x`.
    fn w(&self) -> View {
        match self.layout {
            Layout::HiddenVocab => View::rows(0, self.hidden, self.vocab, self.vocab),
            Layout::VocabHidden => View::rows(0, self.vocab, self.hidden, self.hidden).t(),
        }
    }

    /// The weight gradient as stored, in the weight's own layout.
    fn dw(&self) -> View {
        match self.layout {
            Layout::HiddenVocab => View::rows(0, self.hidden, self.vocab, self.vocab),
            Layout::VocabHidden => View::rows(0, self.vocab, self.hidden, self.hidden),
        }
    }

    /// Tokens per slice: [`SLICE_LOGITS`] logits, at least [`MIN_SLICE_TOKENS`] tokens.
    pub fn slice_tokens(&self) -> usize {
        (SLICE_LOGITS / self.vocab.max(1)).max(MIN_SLICE_TOKENS)
    }
}

/// The gradients to compute: only those whose tensor requires one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wanted {
    pub input: bool,
    pub weight: bool,
}

impl Wanted {
    pub const NONE: Wanted = Wanted { input: false, weight: false };
}

/// What [`forward`] computes.
pub struct Output {
    /// Each token's loss, `logsumexp(logits) - logits[target]`.
    pub losses: Vec<f32>,
    /// The gradient of the mean loss with respect to `x`, `[tokens, hidden]`, when wanted.
    pub input_grad: Option<Vec<f32>>,
    /// The gradient of the mean loss with respect to the weight, in its layout, when wanted.
    pub weight_grad: Option<Vec<f32>>,
}

/// The losses of `x W` (`x` `[tokens, hidden]`) against `targets`, and the gradients of their
/// mean that `wanted` asks for, `slice_tokens` rows of logits at a time.
pub fn forward(x: &[f32], w: &[f32], targets: &[usize], dims: Dims, wanted: Wanted, slice_tokens: usize) -> Output {
    let Dims { tokens, hidden, vocab, .. } = dims;
    assert_eq!(x.len(), tokens * hidden, "output layer input has {} elements, not {tokens} x {hidden}", x.len());
    assert_eq!(w.len(), hidden * vocab, "output layer weight has {} elements, not {hidden} x {vocab}", w.len());
    assert_eq!(targets.len(), tokens, "{} targets for {tokens} tokens", targets.len());
    assert!(targets.iter().all(|&t| t < vocab), "a target id is outside the vocabulary of {vocab}");
    let slice_tokens = slice_tokens.clamp(1, tokens.max(1));
    // Each row's gradient is `scale * (softmax - onehot)`: the mean's factor, applied once here.
    let scale = 1.0 / tokens.max(1) as f32;
    let mut logits = vec![0.0f32; slice_tokens * vocab];
    let mut lse = vec![MaybeUninit::uninit(); if wanted == Wanted::NONE { slice_tokens } else { 0 }];
    let mut input_grad = wanted.input.then(|| vec![0.0f32; tokens * hidden]);
    let mut weight_grad = wanted.weight.then(|| vec![0.0f32; hidden * vocab]);
    let (xb, wb) = (Src::new(x), Src::new(w));
    let each_slice = |losses: &mut [MaybeUninit<f32>]| for (slice, start) in (0..tokens).step_by(slice_tokens).enumerate() {
        let n = slice_tokens.min(tokens - start);
        let rows = start..start + n;
        let xs = dims.x().block(start, 0, n, hidden);
        let ls = View::rows(0, n, vocab, vocab);
        let slice_logits = &mut logits[..n * vocab];
        // SAFETY (each product): the views were made for these buffers and are checked against
        // them; nothing else touches the outputs, which are only read after gemm returns.
        unsafe { matmul_parallel(Dst::new(slice_logits), ls, xb, xs, wb, dims.w(), false) };
        if wanted == Wanted::NONE {
            kernels::cross_entropy(slice_logits, &targets[rows.clone()], vocab, &mut losses[rows], &mut lse[..n]);
            continue;
        }
        kernels::cross_entropy_in_place(slice_logits, &targets[rows.clone()], vocab, scale, &mut losses[rows]);
        let dlogits = Src::new(slice_logits);
        if let Some(dx) = input_grad.as_mut() {
            // dx[slice] = dlogits W^T
            unsafe { matmul_parallel(Dst::new(dx), xs, dlogits, ls, wb, dims.w().t(), false) };
        }
        if let Some(dw) = weight_grad.as_mut() {
            // dW += x[slice]^T dlogits, or its transpose for a [vocab, hidden] weight.
            let first = slice == 0;
            let dw_view = dims.dw();
            unsafe {
                match dims.layout {
                    Layout::HiddenVocab => matmul_parallel(Dst::new(dw), dw_view, xb, xs.t(), dlogits, ls, !first),
                    Layout::VocabHidden => matmul_parallel(Dst::new(dw), dw_view, dlogits, ls.t(), xb, xs, !first),
                }
            }
        }
    };
    // SAFETY: the slices cover every token, and each writes its tokens' losses.
    let losses = unsafe { filled(tokens, each_slice) };
    Output { losses, input_grad, weight_grad }
}
