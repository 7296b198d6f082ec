//! Throughput of the `gemm` crate (the matmul Burn's Flex backend and kiln's fused linear layers
//! call) on the three products of a linear layer over 2,048 tokens, with the small training
//! shape's layer sizes and the output layer of an 8,192-token vocabulary. It is how kiln chose
//! to split the weight gradient over token slices:
//!
//!     cargo run --release --features wgpu --example gemm_shapes
//!
//! Columns (GFLOP/s, all threads of the machine): `forward` is `x W`, `input grad` `dy W^T`,
//! `weight grad, one product` `x^T dy` as Burn computes it, `weight grad, token slices` the
//! same as kiln computes it (one single-threaded product per 512-token slice, then the sum).
//! The matching PyTorch figures come from `torch.mm` on the same shapes.

use std::time::Instant;

use gemm::Parallelism;

const TOKENS: usize = 2048;
const SLICE: usize = 512;

/// `dst = lhs . rhs` for row-major `dst` (`m x n`), with the strides of `lhs` and `rhs` given
/// as (row, column).
#[allow(clippy::too_many_arguments)]
fn product(m: usize, n: usize, k: usize, dst: &mut [f32], lhs: &[f32], l: (usize, usize), rhs: &[f32], r: (usize, usize), par: Parallelism) {
    assert!(dst.len() >= m * n);
    assert!(lhs.len() > (m - 1) * l.0 + (k - 1) * l.1 && rhs.len() > (k - 1) * r.0 + (n - 1) * r.1);
    let s = |v: usize| v as isize;
    // SAFETY: the asserts above keep every access inside the buffers.
    unsafe {
        gemm::gemm(m, n, k, dst.as_mut_ptr(), 1, s(n), false, lhs.as_ptr(), s(l.1), s(l.0), rhs.as_ptr(), s(r.1), s(r.0), 0.0, 1.0, false, false, false, par);
    }
}

/// GFLOP/s of `f` doing `flops`: median of 15 runs after 3 warm-ups.
fn rate(flops: f64, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let mut times: Vec<f64> = (0..15)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    flops / times[times.len() / 2] / 1e9
}

fn main() {
    let threads = Parallelism::Rayon(0);
    println!("| d_in x d_out | forward | input grad | weight grad, one product | weight grad, token slices |");
    println!("| --- | ---: | ---: | ---: | ---: |");
    for (d_in, d_out) in [(384, 384), (384, 1024), (1024, 384), (384, 8192)] {
        let fill = |n: usize, seed: usize| -> Vec<f32> { (0..n).map(|i| ((i * seed) % 1000) as f32 / 1000.0 - 0.5).collect() };
        let (x, w, dy) = (fill(TOKENS * d_in, 7919), fill(d_in * d_out, 104_729), fill(TOKENS * d_out, 31));
        let flops = 2.0 * (TOKENS * d_in * d_out) as f64;
        let (mut y, mut dx, mut dw) = (vec![0.0; TOKENS * d_out], vec![0.0; TOKENS * d_in], vec![0.0; d_in * d_out]);
        let forward = rate(flops, || product(TOKENS, d_out, d_in, &mut y, &x, (d_in, 1), &w, (d_out, 1), threads));
        let input = rate(flops, || product(TOKENS, d_in, d_out, &mut dx, &dy, (d_out, 1), &w, (1, d_out), threads));
        let weight = rate(flops, || product(d_in, d_out, TOKENS, &mut dw, &x, (1, d_in), &dy, (d_out, 1), threads));
        let mut parts = vec![vec![0.0f32; d_in * d_out]; TOKENS / SLICE];
        let sliced = rate(flops, || {
            use rayon::prelude::*;
            parts.par_iter_mut().enumerate().for_each(|(i, part)| {
                let (xs, dys) = (&x[i * SLICE * d_in..], &dy[i * SLICE * d_out..]);
                product(d_in, d_out, SLICE, part, xs, (1, d_in), dys, (d_out, 1), Parallelism::None);
            });
            let (first, rest) = parts.split_at_mut(1);
            for p in rest.iter() {
                first[0].iter_mut().zip(p).for_each(|(a, b)| *a += b);
            }
        });
        println!("| {d_in} x {d_out} | {forward:.0} | {input:.0} | {weight:.0} | {sliced:.0} |");
    }
}
