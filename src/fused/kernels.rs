//! The fused kernels themselves, on plain `f32` slices in row-major order. Outputs are
//! [`Uninit`]: each kernel writes every element of them and never reads one it has not written.
//!
//! Work is split into fixed blocks of rows (never "one block per thread"), and every sum runs
//! in a fixed order inside its block, so results are bit-identical whatever the thread count:
//! resumed and repeated runs stay bit-exact.
//!
//! Each kernel is a parallel split over blocks plus a function for one block, which
//! [`vectorized!`] compiles for the CPU's widest vector instructions.

use std::sync::atomic::{AtomicU8, Ordering};

use rayon::prelude::*;

use crate::buffer::{Uninit, write_mapped};

/// Rows handed to one task: enough work to amortise scheduling, small enough to balance.
fn rows_per_task(row_len: usize) -> usize {
    (16_384 / row_len.max(1)).clamp(1, 256)
}

/// Elements handed to one task by the purely element-wise kernels.
const CHUNK: usize = 16_384;

/// Defines a function whose body is compiled for the widest vector instructions this CPU has
/// (AVX-512, else AVX2) and picks the right copy at run time, so its loops run 16 or 8 lanes wide
/// instead of x86-64's baseline 4: the element-wise kernels are compute-bound on `exp` at these
/// sizes. Rust never fuses a multiply and an add unless asked, so every copy computes
/// bit-identical results. Everything the body calls must be `#[inline(always)]` to benefit.
///
/// [`set_widest_isa`] lowers the widest set it may pick, so tests can check that claim.
macro_rules! vectorized {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn body($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                fn avx512($($arg: $ty),*) {
                    body($($arg),*)
                }
                #[target_feature(enable = "avx2")]
                fn avx2($($arg: $ty),*) {
                    body($($arg),*)
                }
                if allows(Isa::Avx512) && std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the instructions `avx512` is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if allows(Isa::Avx2) && std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body($($arg),*)
        }
    };
}

/// Vector instruction sets [`vectorized!`] picks from, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// x86-64's baseline (SSE2), or whatever the target has on other architectures.
    Baseline,
    Avx2,
    Avx512,
}

static WIDEST_ALLOWED: AtomicU8 = AtomicU8::new(Isa::Avx512 as u8);

/// Lets the kernels use instruction sets up to `isa` only (they still need the CPU to have
/// them). Results are the same on every set, so this only changes speed; it is for tests.
pub fn set_widest_isa(isa: Isa) {
    WIDEST_ALLOWED.store(isa as u8, Ordering::Relaxed);
}

#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
#[inline(always)]
fn allows(isa: Isa) -> bool {
    WIDEST_ALLOWED.load(Ordering::Relaxed) >= isa as u8
}

/// `exp(x)` that the compiler can vectorise: `2^n * p(r)` with `x = n ln2 + r`, `|r| <= ln2/2`
/// and a degree-6 Taylor polynomial (relative error below 2e-7, about one float ulp).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    // Adding and subtracting 1.5 * 2^23 rounds to the nearest integer without a call to
    // `roundf`, which x86-64's baseline instruction set cannot inline.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.0, 88.0);
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    // ln 2 split in two so that n * LN2_HI is exact.
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6;
    let p = 1.0
        + r * (1.0
            + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // `shifted`'s low mantissa bits hold n itself: 2^n is built from them with integer
    // arithmetic, which vectorises (a float-to-int cast checks every lane for NaN one by one).
    let two_n = shifted.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23;
    p * f32::from_bits(two_n)
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// Lanes of the running sums in [`sum_of`] and [`max_of`]: one AVX-512 register.
const LANES: usize = 16;

/// `sum of term(i)` for `i in 0..n`, as [`LANES`] interleaved running sums added pairwise at
/// the end. A single running sum is one long chain of dependent additions that cannot be
/// vectorised; this order is just as fixed, so results stay deterministic.
#[inline(always)]
fn sum_of(n: usize, term: impl Fn(usize) -> f32) -> f32 {
    let mut acc = [0.0f32; LANES];
    let full = n - n % LANES;
    for base in (0..full).step_by(LANES) {
        for (lane, a) in acc.iter_mut().enumerate() {
            *a += term(base + lane);
        }
    }
    for (lane, i) in (full..n).enumerate() {
        acc[lane] += term(i);
    }
    let mut width = LANES;
    while width > 1 {
        width /= 2;
        for lane in 0..width {
            acc[lane] += acc[lane + width];
        }
    }
    acc[0]
}

/// The largest of `values` (`-inf` for none), in [`LANES`] running maxima like [`sum_of`].
#[inline(always)]
fn max_of(values: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = values.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(chunk) {
            *a = a.max(v);
        }
    }
    for (a, &v) in acc.iter_mut().zip(chunks.remainder()) {
        *a = a.max(v);
    }
    acc.iter().fold(f32::NEG_INFINITY, |m, &a| m.max(a))
}

/// `ln(sum(exp(row)))`, shifted by the row's maximum so that no term overflows.
#[inline(always)]
fn log_sum_exp(row: &[f32]) -> f32 {
    let max = max_of(row);
    max + sum_of(row.len(), |i| exp(row[i] - max)).ln()
}

/// RMSNorm over rows of `weight.len()`: `y = x / sqrt(mean(x^2) + eps) * weight`; also returns
/// each row's `1 / sqrt(mean(x^2) + eps)` for the backward pass.
pub fn rms_norm(x: &[f32], weight: &[f32], eps: f32, y: &mut Uninit, inv_rms: &mut Uninit) {
    let h = weight.len();
    let block = rows_per_task(h);
    y.par_chunks_mut(block * h)
        .zip(inv_rms.par_chunks_mut(block))
        .zip(x.par_chunks(block * h))
        .for_each(|((y, inv_rms), x)| rms_norm_rows(x, weight, eps, y, inv_rms));
}

vectorized! {
    fn rms_norm_rows(x: &[f32], weight: &[f32], eps: f32, y: &mut Uninit, inv_rms: &mut Uninit) {
        let h = weight.len();
        for ((y, x), inv_rms) in y.chunks_exact_mut(h).zip(x.chunks_exact(h)).zip(inv_rms) {
            let mean_sq = sum_of(h, |i| x[i] * x[i]) / h as f32;
            let r = 1.0 / (mean_sq + eps).sqrt();
            inv_rms.write(r);
            for ((y, x), w) in y.iter_mut().zip(x).zip(weight) {
                y.write(x * r * w);
            }
        }
    }
}

/// Gradients of [`rms_norm`] with respect to `x` and `weight`, given the output gradient `gy`.
///
/// With `r = inv_rms`: `gx = r * (gy*w - x * r^2 * mean(gy*w*x))`, `gw = sum over rows of gy*x*r`.
pub fn rms_norm_backward(gy: &[f32], x: &[f32], weight: &[f32], inv_rms: &[f32], gx: &mut Uninit) -> Vec<f32> {
    let h = weight.len();
    let block = rows_per_task(h);
    let partial_gw: Vec<Vec<f32>> = gx
        .par_chunks_mut(block * h)
        .zip(gy.par_chunks(block * h))
        .zip(x.par_chunks(block * h))
        .zip(inv_rms.par_chunks(block))
        .map(|(((gx, gy), x), inv_rms)| {
            let mut gw = vec![0.0f32; h];
            rms_norm_backward_rows(gy, x, weight, inv_rms, gx, &mut gw);
            gw
        })
        .collect();
    sum_in_order(partial_gw, h)
}

vectorized! {
    /// One block of [`rms_norm_backward`]; adds the block's weight gradient into `gw`.
    fn rms_norm_backward_rows(gy: &[f32], x: &[f32], weight: &[f32], inv_rms: &[f32], gx: &mut Uninit, gw: &mut [f32]) {
        let h = weight.len();
        for (((gx, gy), x), &r) in gx.chunks_exact_mut(h).zip(gy.chunks_exact(h)).zip(x.chunks_exact(h)).zip(inv_rms) {
            let dot = sum_of(h, |i| gy[i] * weight[i] * x[i]) / h as f32;
            let c = r * r * dot;
            for ((((gx, g), w), x), gw) in gx.iter_mut().zip(gy).zip(weight).zip(x).zip(gw.iter_mut()) {
                gx.write(r * (g * w - x * c));
                *gw += g * x * r;
            }
        }
    }
}

/// Sums equal-length vectors in their given order (a fixed order keeps results deterministic).
fn sum_in_order(parts: Vec<Vec<f32>>, len: usize) -> Vec<f32> {
    let mut total = vec![0.0f32; len];
    for part in parts {
        for (t, p) in total.iter_mut().zip(part) {
            *t += p;
        }
    }
    total
}

/// SwiGLU's gate: `silu(gate) * up`, with `silu(g) = g * sigmoid(g)`.
pub fn swiglu(gate: &[f32], up: &[f32], out: &mut Uninit) {
    out.par_chunks_mut(CHUNK)
        .zip(gate.par_chunks(CHUNK))
        .zip(up.par_chunks(CHUNK))
        .for_each(|((out, gate), up)| swiglu_chunk(gate, up, out));
}

vectorized! {
    fn swiglu_chunk(gate: &[f32], up: &[f32], out: &mut Uninit) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            o.write(g * sigmoid(g) * u);
        }
    }
}

/// Gradients of [`swiglu`]: `d gate = gh * up * s * (1 + g (1 - s))`, `d up = gh * g * s`.
pub fn swiglu_backward(gh: &[f32], gate: &[f32], up: &[f32], d_gate: &mut Uninit, d_up: &mut Uninit) {
    d_gate
        .par_chunks_mut(CHUNK)
        .zip(d_up.par_chunks_mut(CHUNK))
        .zip(gh.par_chunks(CHUNK))
        .zip(gate.par_chunks(CHUNK).zip(up.par_chunks(CHUNK)))
        .for_each(|(((d_gate, d_up), gh), (gate, up))| swiglu_backward_chunk(gh, gate, up, d_gate, d_up));
}

vectorized! {
    fn swiglu_backward_chunk(gh: &[f32], gate: &[f32], up: &[f32], d_gate: &mut Uninit, d_up: &mut Uninit) {
        for ((((dg, du), &gh), &g), &u) in d_gate.iter_mut().zip(d_up.iter_mut()).zip(gh).zip(gate).zip(up) {
            let s = sigmoid(g);
            du.write(gh * g * s);
            dg.write(gh * u * s * (1.0 + g * (1.0 - s)));
        }
    }
}

/// Softmax of `scale * scores` along the last dimension with a causal mask: query `i` of each
/// `[queries, keys]` matrix sees keys `0..=i + (keys - queries)` (bottom-right aligned, as after
/// cached positions); masked probabilities are exactly 0.
pub fn causal_softmax(scores: &[f32], queries: usize, keys: usize, scale: f32, out: &mut Uninit) {
    let past = keys - queries;
    let block = rows_per_task(keys);
    out.par_chunks_mut(block * keys)
        .zip(scores.par_chunks(block * keys))
        .enumerate()
        .for_each(|(task, (out, scores))| {
            let out = write_mapped(out, scores, |s| s * scale);
            softmax_rows(out, keys, |row| (task * block + row) % queries + past + 1);
        });
}

vectorized! {
    /// Softmax in place over each row of `keys` values in `rows`, row `r` over its first
    /// `visible(r)` values; the rest become 0.
    pub fn softmax_rows(rows: &mut [f32], keys: usize, visible: impl Fn(usize) -> usize) {
        for (r, row) in rows.chunks_exact_mut(keys).enumerate() {
            let (seen, hidden) = row.split_at_mut(visible(r));
            let max = max_of(seen);
            seen.iter_mut().for_each(|s| *s = exp(*s - max));
            let inv = 1.0 / sum_of(seen.len(), |i| seen[i]);
            seen.iter_mut().for_each(|s| *s *= inv);
            hidden.fill(0.0);
        }
    }
}

/// Gradient of [`causal_softmax`] with respect to the scores, from its output `probs` and the
/// output gradient `gp`: `scale * p * (gp - sum(gp * p))` per row.
pub fn causal_softmax_backward(gp: &[f32], probs: &[f32], queries: usize, keys: usize, scale: f32, gs: &mut Uninit) {
    let past = keys - queries;
    let block = rows_per_task(keys);
    gs.par_chunks_mut(block * keys)
        .zip(gp.par_chunks(block * keys).zip(probs.par_chunks(block * keys)))
        .enumerate()
        .for_each(|(task, (gs, (gp, probs)))| {
            let gs = gs.write_copy_of_slice(gp);
            softmax_backward_rows(gs, probs, keys, scale, |row| (task * block + row) % queries + past + 1);
        });
}

vectorized! {
    /// Turns rows of probability gradients into score gradients in place, given the
    /// probabilities: `scale * p * (g - sum(g * p))` over each row's first `visible(r)` entries,
    /// 0 after them.
    pub fn softmax_backward_rows(grads: &mut [f32], probs: &[f32], keys: usize, scale: f32, visible: impl Fn(usize) -> usize) {
        for (r, (row, p)) in grads.chunks_exact_mut(keys).zip(probs.chunks_exact(keys)).enumerate() {
            let (seen, hidden) = row.split_at_mut(visible(r));
            let dot = sum_of(seen.len(), |i| seen[i] * p[i]);
            for (g, &p) in seen.iter_mut().zip(p) {
                *g = scale * p * (*g - dot);
            }
            hidden.fill(0.0);
        }
    }
}

/// Cross-entropy of rows of `vocab` logits against their target ids: each row's loss
/// `lse - logit[target]`, with `lse = max + ln(sum(exp(logit - max)))`, and that `lse`, which
/// the backward pass needs. One read of the logits, no `[rows, vocab]` temporaries.
pub fn cross_entropy(logits: &[f32], targets: &[usize], vocab: usize, losses: &mut Uninit, lse: &mut Uninit) {
    let block = rows_per_task(vocab);
    losses
        .par_chunks_mut(block)
        .zip(lse.par_chunks_mut(block))
        .zip(logits.par_chunks(block * vocab).zip(targets.par_chunks(block)))
        .for_each(|((losses, lse), (logits, targets))| cross_entropy_rows(logits, targets, vocab, losses, lse));
}

vectorized! {
    fn cross_entropy_rows(logits: &[f32], targets: &[usize], vocab: usize, losses: &mut Uninit, lse: &mut Uninit) {
        for (((row, &target), loss), lse_out) in logits.chunks_exact(vocab).zip(targets).zip(losses).zip(lse) {
            let lse = log_sum_exp(row);
            lse_out.write(lse);
            loss.write(lse - row[target]);
        }
    }
}

/// Gradient of `scale * sum of` [`cross_entropy`]'s losses with respect to the logits, from
/// each row's `lse`: `scale * (softmax(row) - onehot(target))`. (The mean loss over `n` rows
/// with upstream gradient `g` has `scale = g / n`.)
pub fn cross_entropy_backward(logits: &[f32], targets: &[usize], lse: &[f32], vocab: usize, scale: f32, grad: &mut Uninit) {
    let block = rows_per_task(vocab);
    grad.par_chunks_mut(block * vocab)
        .zip(logits.par_chunks(block * vocab))
        .zip(targets.par_chunks(block).zip(lse.par_chunks(block)))
        .for_each(|((grad, logits), (targets, lse))| cross_entropy_backward_rows(logits, targets, lse, vocab, scale, grad));
}

vectorized! {
    fn cross_entropy_backward_rows(logits: &[f32], targets: &[usize], lse: &[f32], vocab: usize, scale: f32, grad: &mut Uninit) {
        for (((g, row), &target), &lse) in grad.chunks_exact_mut(vocab).zip(logits.chunks_exact(vocab)).zip(targets).zip(lse) {
            let g = write_mapped(g, row, |x| scale * exp(x - lse));
            g[target] -= scale;
        }
    }
}

/// The mean of per-row losses, summed in row order in `f64` (a long batch's losses add up), so
/// it is the same on any number of threads.
pub fn mean_loss(losses: &[f32]) -> f32 {
    (losses.iter().map(|&l| l as f64).sum::<f64>() / losses.len().max(1) as f64) as f32
}

/// [`cross_entropy`] and [`cross_entropy_backward`] in one pass over each row: the logits are
/// overwritten with their gradient `scale * (softmax(row) - onehot(target))` (bit for bit what
/// the backward kernel writes) while the row is still in cache. For a loss whose logits are
/// needed only for their gradient (the fused output layer).
pub fn cross_entropy_in_place(logits: &mut [f32], targets: &[usize], vocab: usize, scale: f32, losses: &mut Uninit) {
    let block = rows_per_task(vocab);
    losses
        .par_chunks_mut(block)
        .zip(logits.par_chunks_mut(block * vocab).zip(targets.par_chunks(block)))
        .for_each(|(losses, (logits, targets))| cross_entropy_in_place_rows(logits, targets, vocab, scale, losses));
}

vectorized! {
    fn cross_entropy_in_place_rows(logits: &mut [f32], targets: &[usize], vocab: usize, scale: f32, losses: &mut Uninit) {
        for ((row, &target), loss) in logits.chunks_exact_mut(vocab).zip(targets).zip(losses) {
            let lse = log_sum_exp(row);
            loss.write(lse - row[target]);
            for x in row.iter_mut() {
                *x = scale * exp(*x - lse);
            }
            row[target] -= scale;
        }
    }
}

/// Rotary embedding in Hugging Face's rotate-half convention on `x` laid out
/// `[batch, positions, heads, head_dim]`, with `cos`/`sin` tables `[positions, head_dim]`:
/// `y = x * cos + rotate_half(x) * sin`, `rotate_half(x) = cat(-x2, x1)`.
///
/// `inverse` applies the transposed rotation (`sin` negated), which is the backward pass; that
/// holds because both halves of each table row are equal (`emb = cat(freqs, freqs)`).
pub fn rotary(x: &[f32], cos: &[f32], sin: &[f32], heads: usize, head_dim: usize, inverse: bool, out: &mut Uninit) {
    let sign = if inverse { -1.0f32 } else { 1.0 };
    let positions = cos.len() / head_dim;
    let block = rows_per_task(head_dim);
    out.par_chunks_mut(block * head_dim)
        .zip(x.par_chunks(block * head_dim))
        .enumerate()
        .for_each(|(task, (out, x))| {
            rotate_rows(x, cos, sin, sign, out, head_dim, |row| ((task * block + row) / heads) % positions);
        });
}

vectorized! {
    /// [`rotary`] on rows of `head_dim` values, row `r` at position `position(r)`.
    fn rotate_rows(x: &[f32], cos: &[f32], sin: &[f32], sign: f32, out: &mut Uninit, head_dim: usize, position: impl Fn(usize) -> usize) {
        let half = head_dim / 2;
        for (r, (y, x)) in out.chunks_exact_mut(head_dim).zip(x.chunks_exact(head_dim)).enumerate() {
            let start = position(r) * head_dim;
            let table = start..start + head_dim;
            let (cos1, cos2) = cos[table.clone()].split_at(half);
            let (sin1, sin2) = sin[table].split_at(half);
            let (x1, x2) = x.split_at(half);
            let (y1, y2) = y.split_at_mut(half);
            for i in 0..half {
                y1[i].write(x1[i] * cos1[i] - sign * x2[i] * sin1[i]);
                y2[i].write(x2[i] * cos2[i] + sign * x1[i] * sin2[i]);
            }
        }
    }
}

/// One AdamW step (PyTorch semantics) in place on a parameter and its moments:
/// `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`, `p *= 1 - lr wd`,
/// `p -= lr / bc1 * m / (sqrt(v) / sqrt(bc2) + eps)`.
pub fn adamw(param: &mut [f32], grad: &[f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32], h: &AdamWStep) {
    param
        .par_chunks_mut(CHUNK)
        .zip(grad.par_chunks(CHUNK))
        .zip(exp_avg.par_chunks_mut(CHUNK).zip(exp_avg_sq.par_chunks_mut(CHUNK)))
        .for_each(|((p, g), (m, v))| adamw_chunk(p, g, m, v, h));
}

vectorized! {
    fn adamw_chunk(param: &mut [f32], grad: &[f32], exp_avg: &mut [f32], exp_avg_sq: &mut [f32], h: &AdamWStep) {
        let (b1, b2) = (h.beta1 as f32, h.beta2 as f32);
        let decay = (1.0 - h.lr * h.weight_decay) as f32;
        let step_size = (h.lr / h.bias_correction1) as f32;
        let inv_bc2_sqrt = (1.0 / h.bias_correction2_sqrt) as f32;
        let eps = h.eps as f32;
        for (((p, &g), m), v) in param.iter_mut().zip(grad).zip(exp_avg.iter_mut()).zip(exp_avg_sq.iter_mut()) {
            *m = b1 * *m + (1.0 - b1) * g;
            *v = b2 * *v + (1.0 - b2) * g * g;
            *p = *p * decay - step_size * *m / (v.sqrt() * inv_bc2_sqrt + eps);
        }
    }
}

/// The scalars of one AdamW step; `weight_decay` is 0 for parameters that are not decayed.
#[derive(Debug, Clone, Copy)]
pub struct AdamWStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub bias_correction1: f64,
    pub bias_correction2_sqrt: f64,
}
