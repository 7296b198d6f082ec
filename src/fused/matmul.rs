//! One small matrix product on strided views of `f32` buffers, through the `gemm` crate (the
//! same microkernels Burn's Flex backend uses), for kernels that run many of them in parallel
//! and write each result straight into its place in a larger tensor.

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

/// A buffer seen through a raw pointer, so that parallel tasks can read and write their own
/// elements of it (never the same ones) and products can read elements other tasks have
/// finished writing.
#[derive(Clone, Copy)]
pub struct Buf {
    ptr: *mut f32,
    len: usize,
}

// SAFETY: a `Buf` is only written through `matmul`, `slice_mut` and `write`, whose callers
// promise that no two tasks touch the same elements at once.
unsafe impl Send for Buf {}
unsafe impl Sync for Buf {}

impl Buf {
    /// A buffer that is only read.
    pub fn of(values: &[f32]) -> Self {
        Self { ptr: values.as_ptr().cast_mut(), len: values.len() }
    }

    pub fn of_mut(values: &mut [f32]) -> Self {
        Self { ptr: values.as_mut_ptr(), len: values.len() }
    }

    /// The first `len` elements of `buf`'s spare capacity: the caller writes every one of them
    /// before it calls `buf.set_len(len)` (see [`filled_many`]).
    pub(crate) fn spare(buf: &mut Vec<f32>, len: usize) -> Self {
        assert!(buf.is_empty() && buf.capacity() >= len);
        Self { ptr: buf.spare_capacity_mut().as_mut_ptr().cast(), len }
    }

    /// All of the buffer.
    ///
    /// # Safety
    /// As [`Buf::slice_mut`].
    pub unsafe fn whole<'a>(self) -> &'a mut [f32] {
        unsafe { self.slice_mut(0, self.len) }
    }

    /// Writes element `i`, for tasks whose elements interleave (no slice of them exists).
    ///
    /// # Safety
    /// No other task may touch element `i` meanwhile.
    pub unsafe fn write(self, i: usize, v: f32) {
        assert!(i < self.len, "element outside its buffer");
        unsafe { *self.ptr.add(i) = v };
    }

    /// Elements `offset..offset + len`.
    ///
    /// # Safety
    /// They must all be written, and no other task may touch them while the slice lives.
    pub unsafe fn slice_mut<'a>(self, offset: usize, len: usize) -> &'a mut [f32] {
        assert!(offset + len <= self.len, "slice outside its buffer");
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }
}

/// New buffers of the lengths in `lens` that `fill` writes completely (never reads), so they
/// are never cleared first.
///
/// # Safety
/// `fill` must write every element of every buffer.
pub unsafe fn filled_many<const N: usize>(lens: [usize; N], fill: impl FnOnce([Buf; N])) -> [Vec<f32>; N] {
    let mut bufs: [Vec<f32>; N] = lens.map(Vec::with_capacity);
    fill(std::array::from_fn(|i| Buf::spare(&mut bufs[i], lens[i])));
    for (buf, len) in bufs.iter_mut().zip(lens) {
        // SAFETY: `fill` wrote all `len` elements (the caller's promise).
        unsafe { buf.set_len(len) };
    }
    bufs
}

/// [`filled_many`] for one buffer.
///
/// # Safety
/// `fill` must write every element.
pub unsafe fn filled(len: usize, fill: impl FnOnce(Buf)) -> Vec<f32> {
    let [buf] = unsafe { filled_many([len], |[buf]| fill(buf)) };
    buf
}

/// `dst = scale * lhs . rhs`, or `dst += scale * lhs . rhs` when `accumulate`, single-threaded
/// (callers parallelise over many products). With `accumulate` false, `dst` is only written, so
/// it may be memory nobody has initialised yet.
///
/// # Safety
/// The elements `lhs` and `rhs` view must be written and not being written by another task;
/// no other task may touch `dst`'s elements during the call.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(dst: Buf, d: View, lhs: Buf, l: View, rhs: Buf, r: View, scale: f32, accumulate: bool) {
    unsafe { product(dst, d, lhs, l, rhs, r, scale, accumulate, gemm::Parallelism::None) }
}

/// [`matmul`] split over the threads of the current rayon pool by gemm itself (it divides the
/// output, never the sum, so the result is the same on any number of threads).
///
/// # Safety
/// As [`matmul`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_parallel(dst: Buf, d: View, lhs: Buf, l: View, rhs: Buf, r: View, accumulate: bool) {
    unsafe { product(dst, d, lhs, l, rhs, r, 1.0, accumulate, gemm::Parallelism::Rayon(0)) }
}

#[allow(clippy::too_many_arguments)]
unsafe fn product(dst: Buf, d: View, lhs: Buf, l: View, rhs: Buf, r: View, scale: f32, accumulate: bool, parallelism: gemm::Parallelism) {
    assert!(d.rows == l.rows && d.cols == r.cols && l.cols == r.rows, "matmul shapes do not agree");
    d.check(dst.len);
    l.check(lhs.len);
    r.check(rhs.len);
    let stride = |s: usize| s as isize;
    // SAFETY: every view was checked against its buffer above; the caller vouches for the rest.
    unsafe {
        gemm::gemm(
            d.rows,
            d.cols,
            l.cols,
            dst.ptr.add(d.offset),
            stride(d.col_stride),
            stride(d.row_stride),
            accumulate,
            lhs.ptr.add(l.offset),
            stride(l.col_stride),
            stride(l.row_stride),
            rhs.ptr.add(r.offset),
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
