//! Causal self-attention in one pass per head, forward and backward, on the `[batch, seq,
//! heads, head_dim]` layout the projections produce.
//!
//! Why: composed from tensor ops, attention transposes queries, keys and values into
//! `[batch, heads, seq, head_dim]`, materialises the scores and their gradients as separate
//! `[batch, heads, seq, seq]` tensors, and copies the output back into token order, all of it
//! allocated and zero-filled first. Here each head's scores live in one buffer, the products
//! read and write the token-ordered tensors in place through strides, and query blocks skip
//! the keys the causal mask hides. The probabilities are kept for the backward pass.
//!
//! Work is split by (sequence, head) for the forward pass and by (sequence, key/value head) for
//! the backward pass, each task single-threaded and summing in a fixed order, so results do not
//! depend on the number of threads.

use rayon::prelude::*;

use super::kernels::{softmax_backward_rows, softmax_rows};
use super::matmul::{View, matmul};
use crate::buffer::{Dst, Src, Uninit, filled_many};

/// Query rows per block: the causal mask lets a block skip the keys after its last query.
const BLOCK: usize = 64;

/// Sizes of one attention call. Queries are the last `queries` of `keys` positions (bottom-right
/// aligned causal mask): query `i` sees keys `0..=i + keys - queries`.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub batch: usize,
    pub queries: usize,
    pub keys: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl Dims {
    fn past(&self) -> usize {
        self.keys - self.queries
    }

    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }

    /// Query head `h` of sequence `b` in `[batch, queries, heads, head_dim]`.
    fn query(&self, b: usize, h: usize) -> View {
        let row = self.heads * self.head_dim;
        View::rows(b * self.queries * row + h * self.head_dim, self.queries, self.head_dim, row)
    }

    /// Key/value head `g` of sequence `b` in `[batch, keys, kv_heads, head_dim]`.
    fn key(&self, b: usize, g: usize) -> View {
        let row = self.kv_heads * self.head_dim;
        View::rows(b * self.keys * row + g * self.head_dim, self.keys, self.head_dim, row)
    }

    /// The `[queries, keys]` probabilities of head `h` of sequence `b`.
    fn probs(&self, b: usize, h: usize) -> View {
        View::rows((b * self.heads + h) * self.queries * self.keys, self.queries, self.keys, self.keys)
    }

    /// Keys visible to query rows `..end`.
    fn visible(&self, end: usize) -> usize {
        (end + self.past()).min(self.keys)
    }

    fn check(&self, q: usize, kv: usize) {
        assert!(self.queries <= self.keys, "attention of {} queries over only {} keys", self.queries, self.keys);
        assert!(self.kv_heads > 0 && self.heads.is_multiple_of(self.kv_heads), "heads must be a multiple of kv_heads");
        assert_eq!(q, self.batch * self.queries * self.heads * self.head_dim, "queries have the wrong size");
        assert_eq!(kv, self.batch * self.keys * self.kv_heads * self.head_dim, "keys/values have the wrong size");
    }
}

/// Row blocks `(start, end)` of `0..n`.
fn blocks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n).step_by(BLOCK).map(move |s| (s, (s + BLOCK).min(n)))
}

/// `softmax(scale * q k^T + causal mask) v` for every head; returns the output
/// `[batch, queries, heads, head_dim]` and the probabilities `[batch, heads, queries, keys]`.
pub fn forward(q: &[f32], k: &[f32], v: &[f32], dims: Dims, scale: f32) -> (Vec<f32>, Vec<f32>) {
    dims.check(q.len(), k.len());
    assert_eq!(k.len(), v.len(), "keys and values differ in size");
    let lens = [q.len(), dims.batch * dims.heads * dims.queries * dims.keys];
    let (q, k, v) = (Src::new(q), Src::new(k), Src::new(v));
    let d = dims.head_dim;
    let fill = |[out, probs]: [&mut Uninit; 2]| {
        let (out_buf, probs_buf) = (Dst::uninit(out), Dst::uninit(probs));
        (0..dims.batch * dims.heads).into_par_iter().for_each(|task| {
            let (b, h) = (task / dims.heads, task % dims.heads);
            let (qv, kv, pv) = (dims.query(b, h), dims.key(b, h / dims.group()), dims.probs(b, h));
            for (start, end) in blocks(dims.queries) {
                let (rows, keys) = (end - start, dims.visible(end));
                let p = pv.block(start, 0, rows, keys);
                // SAFETY: this task alone writes head `h` of sequence `b` in both outputs; the
                // product writes the block's visible columns and `fill` the rest of its rows
                // before the softmax and `p v` read them.
                unsafe {
                    matmul(probs_buf, p, q, qv.block(start, 0, rows, d), k, kv.block(0, 0, keys, d).t(), scale, false);
                    for row in 0..rows {
                        probs_buf.fill(p.offset + row * dims.keys + keys, dims.keys - keys, 0.0);
                    }
                    let p_rows = probs_buf.slice_mut(p.offset, rows * dims.keys);
                    softmax_rows(p_rows, dims.keys, |i| start + i + dims.past() + 1);
                    matmul(out_buf, qv.block(start, 0, rows, d), probs_buf.read(), p, v, kv.block(0, 0, keys, d), 1.0, false);
                }
            }
        });
    };
    // SAFETY: every (sequence, head) task writes all of its output rows and probability rows,
    // and the tasks cover every pair.
    let [out, probs] = unsafe { filled_many(lens, fill) };
    (out, probs)
}

/// Gradients of [`forward`] with respect to `q`, `k` and `v`, from the output gradient `gout`
/// `[batch, queries, heads, head_dim]` and the saved probabilities.
pub fn backward(gout: &[f32], q: &[f32], k: &[f32], v: &[f32], probs: &[f32], dims: Dims, scale: f32) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    dims.check(q.len(), k.len());
    assert!(gout.len() == q.len() && v.len() == k.len(), "attention gradient inputs differ in size");
    assert_eq!(probs.len(), dims.batch * dims.heads * dims.queries * dims.keys, "probabilities have the wrong size");
    let lens = [q.len(), k.len(), v.len()];
    let (gout, q, k, v, probs_buf) = (Src::new(gout), Src::new(q), Src::new(k), Src::new(v), Src::new(probs));
    let d = dims.head_dim;
    let dsv = View::rows(0, dims.queries, dims.keys, dims.keys);
    let fill = |[dq, dk, dv]: [&mut Uninit; 3]| {
        let (dq_buf, dk_buf, dv_buf) = (Dst::uninit(dq), Dst::uninit(dk), Dst::uninit(dv));
        (0..dims.batch * dims.kv_heads).into_par_iter().for_each_init(
            || vec![0.0f32; dims.queries * dims.keys],
            |scratch, task| {
                let (b, g) = (task / dims.kv_heads, task % dims.kv_heads);
                let kv = dims.key(b, g);
                let ds = Dst::new(scratch);
                for (i, h) in (g * dims.group()..(g + 1) * dims.group()).enumerate() {
                    let (qv, pv) = (dims.query(b, h), dims.probs(b, h));
                    // SAFETY: this task alone writes key/value head `g` of sequence `b` in dk and
                    // dv, the query heads of that group in dq, and its own scratch `ds`.
                    unsafe {
                        for (start, end) in blocks(dims.queries) {
                            let (rows, keys) = (end - start, dims.visible(end));
                            // dP = dO v^T, then dS = scale * P * (dP - rowsum(P * dP)), in place.
                            let block = dsv.block(start, 0, rows, keys);
                            matmul(ds, block, gout, qv.block(start, 0, rows, d), v, kv.block(0, 0, keys, d).t(), 1.0, false);
                            let p_rows = &probs[pv.offset + start * dims.keys..pv.offset + end * dims.keys];
                            let ds_rows = ds.slice_mut(start * dims.keys, rows * dims.keys);
                            softmax_backward_rows(ds_rows, p_rows, dims.keys, scale, |r| start + r + dims.past() + 1);
                            // dQ = dS k over the visible keys.
                            matmul(dq_buf, qv.block(start, 0, rows, d), ds.read(), block, k, kv.block(0, 0, keys, d), 1.0, false);
                        }
                        // dV += P^T dO and dK += dS^T q, each key block over the queries that see
                        // it; the group's first head writes, the others add.
                        for (start, end) in blocks(dims.keys) {
                            let from = start.saturating_sub(dims.past()).min(dims.queries);
                            let (rows, queries) = (end - start, dims.queries - from);
                            let dst = kv.block(start, 0, rows, d);
                            let rhs_q = qv.block(from, 0, queries, d);
                            matmul(dv_buf, dst, probs_buf, pv.t().block(start, from, rows, queries), gout, rhs_q, 1.0, i > 0);
                            matmul(dk_buf, dst, ds.read(), dsv.t().block(start, from, rows, queries), q, rhs_q, 1.0, i > 0);
                        }
                    }
                }
            },
        );
    };
    // SAFETY: every (sequence, key/value head) task writes all rows of its head in dk and dv and
    // of its group's query heads in dq, and the tasks cover every pair.
    let [dq, dk, dv] = unsafe { filled_many(lens, fill) };
    (dq, dk, dv)
}
