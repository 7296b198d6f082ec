//! Output buffers that are written without being cleared first, and written by many parallel
//! tasks at once.
//!
//! Why: the fused kernels and the checkpoint reader produce large `f32` outputs whose every
//! element they write. Zero-filling them first (as `vec![0.0; n]` or Burn's own ops do) is an
//! extra pass over memory that costs as much as the kernel itself for the element-wise ones.
//! So an output starts as a vector's spare capacity (`[MaybeUninit<f32>]`) and becomes a
//! `Vec<f32>` only once it is filled ([`filled`], [`filled_many`]).
//!
//! Kernels that split an output into disjoint chunks take `&mut [MaybeUninit<f32>]` and need no
//! `unsafe`. Products and transposes whose tasks write interleaved or strided elements (and read
//! back what they wrote) share the buffer through [`Dst`] (write, and read back once written)
//! and read their inputs through [`Src`]; both borrow the buffer for their lifetime, so neither
//! outlives it.

use std::marker::PhantomData;
use std::mem::MaybeUninit;

/// Output memory that may not be initialised yet.
pub type Uninit = [MaybeUninit<f32>];

/// New buffers of the lengths in `lens` that `fill` writes completely, never cleared first.
///
/// # Safety
/// `fill` must write every element of every buffer it is given.
pub unsafe fn filled_many<const N: usize>(lens: [usize; N], fill: impl FnOnce([&mut Uninit; N])) -> [Vec<f32>; N] {
    let mut bufs: [Vec<f32>; N] = lens.map(Vec::with_capacity);
    let mut i = 0;
    fill(bufs.each_mut().map(|buf| {
        let len = lens[i];
        i += 1;
        &mut buf.spare_capacity_mut()[..len]
    }));
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
pub unsafe fn filled(len: usize, fill: impl FnOnce(&mut Uninit)) -> Vec<f32> {
    // SAFETY: passed on to the caller.
    let [buf] = unsafe { filled_many([len], |[buf]| fill(buf)) };
    buf
}

/// Writes `f(v)` for each value of `values` into `out` (of the same length) and returns `out`,
/// now initialised, for kernels that go on to work in place.
#[inline(always)]
pub fn write_mapped<'a>(out: &'a mut Uninit, values: &[f32], f: impl Fn(f32) -> f32) -> &'a mut [f32] {
    assert_eq!(out.len(), values.len(), "output and input differ in length");
    for (o, &v) in out.iter_mut().zip(values) {
        o.write(f(v));
    }
    // SAFETY: every element was written just above.
    unsafe { out.assume_init_mut() }
}

/// A buffer that parallel tasks write, each its own elements, through a shared handle: element
/// `i` may be written by one task at a time, and read (through [`Dst::read`]) once written
/// and while nobody writes it.
#[derive(Clone, Copy)]
pub struct Dst<'a> {
    ptr: *mut f32,
    len: usize,
    _buffer: PhantomData<&'a mut Uninit>,
}

// SAFETY: a `Dst` is the `&mut` it was made from, shared between tasks; every access through
// it is an `unsafe` method whose caller promises that no two tasks touch an element at once.
unsafe impl Send for Dst<'_> {}
unsafe impl Sync for Dst<'_> {}

impl<'a> Dst<'a> {
    /// Shares an initialised buffer (scratch space, or an output that is accumulated into).
    pub fn new(values: &'a mut [f32]) -> Self {
        Self { ptr: values.as_mut_ptr(), len: values.len(), _buffer: PhantomData }
    }

    /// Shares a buffer that is not initialised yet.
    pub fn uninit(values: &'a mut Uninit) -> Self {
        Self { ptr: values.as_mut_ptr().cast(), len: values.len(), _buffer: PhantomData }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The start of the buffer, for products that write through it (see `fused::matmul`).
    pub(crate) fn as_mut_ptr(self) -> *mut f32 {
        self.ptr
    }

    /// Writes element `i`, for tasks whose elements interleave (no slice of them exists).
    ///
    /// # Safety
    /// No other task may touch element `i` meanwhile.
    #[inline(always)]
    pub unsafe fn write(self, i: usize, v: f32) {
        assert!(i < self.len, "element {i} outside its buffer of {}", self.len);
        // SAFETY: in bounds (checked); exclusive (the caller's promise).
        unsafe { self.ptr.add(i).write(v) };
    }

    /// Sets elements `offset..offset + len` to `v`.
    ///
    /// # Safety
    /// No other task may touch them meanwhile.
    pub unsafe fn fill(self, offset: usize, len: usize, v: f32) {
        assert!(offset + len <= self.len, "elements {offset}..{} outside its buffer of {}", offset + len, self.len);
        // SAFETY: in bounds (checked); exclusive (the caller's promise); `write` never reads
        // what was there.
        let out = unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset).cast::<MaybeUninit<f32>>(), len) };
        out.iter_mut().for_each(|o| {
            o.write(v);
        });
    }

    /// Elements `offset..offset + len`, to work on in place.
    ///
    /// # Safety
    /// They must all be written already, and no other task may touch them while the slice lives.
    pub unsafe fn slice_mut(self, offset: usize, len: usize) -> &'a mut [f32] {
        assert!(offset + len <= self.len, "slice {offset}..{} outside its buffer of {}", offset + len, self.len);
        // SAFETY: in bounds (checked); initialised and exclusive (the caller's promise).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(offset), len) }
    }

    /// The buffer as an input to a product.
    ///
    /// # Safety
    /// The elements read through it must be written already and not written by any task
    /// while they are read.
    pub unsafe fn read(self) -> Src<'a> {
        Src { ptr: self.ptr, len: self.len, _buffer: PhantomData }
    }
}

/// A buffer that products read: a `&[f32]`, or a [`Dst`] whose elements being read are done.
#[derive(Clone, Copy)]
pub struct Src<'a> {
    ptr: *const f32,
    len: usize,
    _buffer: PhantomData<&'a [f32]>,
}

// SAFETY: a `Src` is a shared borrow, made from a `&[f32]` or under `Dst::read`'s promise that
// nobody writes the elements it reads.
unsafe impl Send for Src<'_> {}
unsafe impl Sync for Src<'_> {}

impl<'a> Src<'a> {
    pub fn new(values: &'a [f32]) -> Self {
        Self { ptr: values.as_ptr(), len: values.len(), _buffer: PhantomData }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn as_ptr(self) -> *const f32 {
        self.ptr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filled_buffers_hold_what_was_written() {
        // SAFETY: both closures write every element.
        let [a, b] = unsafe {
            filled_many([3, 2], |[a, b]| {
                write_mapped(a, &[1.0, 2.0, 3.0], |v| v * 2.0);
                b.iter_mut().for_each(|x| {
                    x.write(-1.0);
                });
            })
        };
        assert_eq!((a, b), (vec![2.0, 4.0, 6.0], vec![-1.0, -1.0]));
        let empty = unsafe { filled(0, |_| {}) };
        assert!(empty.is_empty());
    }

    #[test]
    fn shared_writes_land_in_place_and_read_back() {
        let mut values = vec![0.0f32; 4];
        let dst = Dst::new(&mut values);
        // SAFETY: one thread; each element written once before it is read.
        unsafe {
            dst.write(3, 7.0);
            dst.slice_mut(0, 2).copy_from_slice(&[1.0, 2.0]);
            let src = dst.read();
            assert_eq!((src.len(), *src.as_ptr().add(3)), (4, 7.0));
        }
        assert_eq!(values, [1.0, 2.0, 0.0, 7.0]);
    }

    #[test]
    #[should_panic(expected = "outside its buffer")]
    fn a_write_past_the_end_panics() {
        let mut values = vec![0.0f32; 2];
        // SAFETY: exclusive; out of bounds is checked and panics.
        unsafe { Dst::new(&mut values).write(2, 1.0) };
    }
}
