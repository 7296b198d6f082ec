//! One small matrix product on strided views of `f32` buffers, through the `gemm` crate (the
//! same microkernels Burn's Flex backend uses), for kernels that run many of them in parallel
//! and write each result straight into its place in a larger tensor.

use crate::buffer::{Dst, Src};

/// A `rows x cols` matrix inside a buffer: element `(i, j)` is at
/// `offset + i * row_stride + j * col_stride`.
#[derive(Debug, Clone, Copy)]
pub struct View {
    pub offset: usize,
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl View {
    /// Rows `rows` of a row-major matrix whose rows are `row_stride` apart.
    pub fn rows(offset: usize, rows: usize, cols: usize, row_stride: usize) -> Self {
        Self { offset, rows, cols, row_stride, col_stride: 1 }
    }

    /// The transposed matrix (the same elements).
    pub fn t(self) -> Self {
        Self { rows: self.cols, cols: self.rows, row_stride: self.col_stride, col_stride: self.row_stride, ..self }
    }

    /// The first `rows` rows and `cols` columns from row `row`, column `col`.
    pub fn block(self, row: usize, col: usize, rows: usize, cols: usize) -> Self {
        assert!(row + rows <= self.rows && col + cols <= self.cols, "block outside its matrix");
        Self { offset: self.offset + row * self.row_stride + col * self.col_stride, rows, cols, ..self }
    }

    /// Panics unless every element lies inside a buffer of `len` elements.
    fn check(&self, len: usize) {
        if self.rows > 0 && self.cols > 0 {
            let last = self.offset + (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < len, "matrix view ends at {last}, past its buffer of {len}");
        }
    }
}

/// `dst = scale * lhs . rhs`, or `dst += scale * lhs . rhs` when `accumulate`, single-threaded
/// (callers parallelise over many products). With `accumulate` false, `dst` is only written, so
/// it may be memory nobody has initialised yet.
///
/// # Safety
/// The elements `lhs` and `rhs` view must be written and not being written by another task;
/// no other task may touch `dst`'s elements during the call; with `accumulate`, they must be
/// written already.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(dst: Dst, d: View, lhs: Src, l: View, rhs: Src, r: View, scale: f32, accumulate: bool) {
    unsafe { product(dst, d, lhs, l, rhs, r, scale, accumulate, gemm::Parallelism::None) }
}

/// [`matmul`] split over the threads of the current rayon pool by gemm itself (it divides the
/// output, never the sum, so the result is the same on any number of threads).
///
/// # Safety
/// As [`matmul`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_parallel(dst: Dst, d: View, lhs: Src, l: View, rhs: Src, r: View, accumulate: bool) {
    unsafe { product(dst, d, lhs, l, rhs, r, 1.0, accumulate, gemm::Parallelism::Rayon(0)) }
}

#[allow(clippy::too_many_arguments)]
unsafe fn product(dst: Dst, d: View, lhs: Src, l: View, rhs: Src, r: View, scale: f32, accumulate: bool, parallelism: gemm::Parallelism) {
    assert!(d.rows == l.rows && d.cols == r.cols && l.cols == r.rows, "matmul shapes do not agree");
    d.check(dst.len());
    l.check(lhs.len());
    r.check(rhs.len());
    let stride = |s: usize| s as isize;
    // SAFETY: every view was checked against its buffer above; the caller vouches for the rest.
    unsafe {
        gemm::gemm(
            d.rows,
            d.cols,
            l.cols,
            dst.as_mut_ptr().add(d.offset),
            stride(d.col_stride),
            stride(d.row_stride),
            accumulate,
            lhs.as_ptr().add(l.offset),
            stride(l.col_stride),
            stride(l.row_stride),
            rhs.as_ptr().add(r.offset),
            stride(r.col_stride),
            stride(r.row_stride),
            1.0,
            scale,
            false,
            false,
            false,
            parallelism,
        );
    }
}
