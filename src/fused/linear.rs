//! Bias-free linear layers, `y = x W` with `x` `[tokens, d_in]` and `W` `[d_in, d_out]` (Burn's
//! layout), and their two gradients, through gemm directly.
//!
//! Why: Burn's matmul zero-fills every output before gemm overwrites it, and computes the weight
//! gradient `x^T dy` as one product whose sum runs over all tokens: its output is small
//! (`d_in x d_out`) and gemm splits only outputs between threads, so the two threads spend
//! much of it waiting on each other. Here outputs are written without being cleared, and the
//! weight gradient sums fixed slices of tokens on separate threads and adds the slices in a
//! fixed order, so it stays bit-identical on any number of threads.

use rayon::prelude::*;

use super::matmul::{View, matmul, matmul_parallel};
use crate::buffer::{Dst, Src, filled};

/// Tokens per partial weight gradient: several slices for two threads to share, each long
/// enough to keep the microkernel efficient.
const TOKENS_PER_SLICE: usize = 512;

/// Sizes of one linear layer applied to `tokens` rows.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub tokens: usize,
    pub d_in: usize,
    pub d_out: usize,
}

impl Dims {
    fn x(&self) -> View {
        View::rows(0, self.tokens, self.d_in, self.d_in)
    }

    fn y(&self) -> View {
        View::rows(0, self.tokens, self.d_out, self.d_out)
    }

    fn w(&self) -> View {
        View::rows(0, self.d_in, self.d_out, self.d_out)
    }

    /// Panics unless the buffers given (input, weight, output gradient) have their sizes.
    fn check(&self, x: Option<usize>, w: Option<usize>, dy: Option<usize>) {
        let expect = [(x, self.tokens * self.d_in, "input"), (w, self.d_in * self.d_out, "weight"), (dy, self.tokens * self.d_out, "output gradient")];
        for (len, want, what) in expect {
            assert!(len.is_none_or(|len| len == want), "linear {what} has {len:?} elements, not {want}");
        }
    }
}

/// `x W`, `[tokens, d_out]`.
pub fn forward(x: &[f32], w: &[f32], dims: Dims) -> Vec<f32> {
    dims.check(Some(x.len()), Some(w.len()), None);
    // SAFETY: the product writes every element of the new buffer.
    unsafe { filled(dims.tokens * dims.d_out, |y| matmul_parallel(Dst::uninit(y), dims.y(), Src::new(x), dims.x(), Src::new(w), dims.w(), false)) }
}

/// `dy W^T`, the gradient of the input, `[tokens, d_in]`.
pub fn input_grad(dy: &[f32], w: &[f32], dims: Dims) -> Vec<f32> {
    dims.check(None, Some(w.len()), Some(dy.len()));
    // SAFETY: the product writes every element of the new buffer.
    unsafe { filled(dims.tokens * dims.d_in, |dx| matmul_parallel(Dst::uninit(dx), dims.x(), Src::new(dy), dims.y(), Src::new(w), dims.w().t(), false)) }
}

/// `x^T dy`, the gradient of the weight, `[d_in, d_out]`: partial sums over fixed slices of
/// tokens, computed in parallel and added in slice order.
pub fn weight_grad(x: &[f32], dy: &[f32], dims: Dims) -> Vec<f32> {
    dims.check(Some(x.len()), None, Some(dy.len()));
    let (x, dy, w) = (Src::new(x), Src::new(dy), dims.w());
    let slices = dims.tokens.div_ceil(TOKENS_PER_SLICE).max(1);
    if slices == 1 {
        // SAFETY: the product writes every element of the new buffer.
        return unsafe { filled(w.rows * w.cols, |dw| matmul_parallel(Dst::uninit(dw), w, x, dims.x().t(), dy, dims.y(), false)) };
    }
    let partial = |slice: usize| {
        let start = slice * TOKENS_PER_SLICE;
        let len = TOKENS_PER_SLICE.min(dims.tokens - start);
        let xs = dims.x().block(start, 0, len, dims.d_in).t();
        let dys = dims.y().block(start, 0, len, dims.d_out);
        // SAFETY: the product writes every element of the new buffer, which only it sees.
        unsafe { filled(w.rows * w.cols, |dw| matmul(Dst::uninit(dw), w, x, xs, dy, dys, 1.0, false)) }
    };
    let mut partials: Vec<Vec<f32>> = (0..slices).into_par_iter().map(partial).collect();
    let mut sum = partials.remove(0);
    // Element blocks in parallel, the slices of each element in order.
    sum.par_chunks_mut(16_384).enumerate().for_each(|(block, out)| {
        let range = block * 16_384..block * 16_384 + out.len();
        for p in &partials {
            for (o, v) in out.iter_mut().zip(&p[range.clone()]) {
                *o += v;
            }
        }
    });
    sum
}
