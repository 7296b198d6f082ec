//! kiln's safetensors reader against files written by the `safetensors` crate itself.
//!
//! The reader reads each tensor with positioned reads in 512 KiB blocks spread over the
//! threads, straight into the returned buffer; every value must come back bit for bit, at any
//! offset, whatever the block boundaries.

use std::collections::HashMap;
use std::path::Path;

use half::{bf16, f16};
use kiln::safetensors_io::{ReadError, SafetensorsFile};
use safetensors::tensor::{Dtype, TensorView};

/// Bytes of `values`, little-endian.
fn le<T: Copy, const N: usize>(values: &[T], to_le: fn(T) -> [u8; N]) -> Vec<u8> {
    values.iter().flat_map(|&v| to_le(v)).collect()
}

/// Writes, with the `safetensors` crate: F32 tensors of odd lengths (one spanning several read
/// blocks and ending inside one, one holding every bit pattern class: NaN payloads, infinities,
/// signed zero, subnormals), an F16, a BF16 and an I32 tensor. Returns the expected f32 values.
fn write_reference(path: &Path) -> HashMap<String, (Vec<usize>, Dtype, Vec<u8>, Vec<f32>)> {
    let mut tensors = HashMap::new();
    let big: Vec<f32> = (0..400_003).map(|i| ((i as f32) * 0.37).sin() * 1e3).collect();
    let odd: Vec<f32> = vec![
        f32::NAN, f32::from_bits(0x7fc0_1234), f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0,
        f32::from_bits(1), f32::MIN_POSITIVE, f32::MAX, -1.5,
    ];
    let small: Vec<f32> = (0..7).map(|i| i as f32 - 3.25).collect();
    for (name, shape, values) in [("a.big", vec![400_003], big), ("b.odd", vec![2, 5], odd), ("c.small", vec![7], small)] {
        let bytes = le(&values, f32::to_le_bytes);
        tensors.insert(name.to_string(), (shape, Dtype::F32, bytes, values));
    }
    let halves: Vec<f16> = (0..1001).map(|i| f16::from_f32(i as f32 / 7.0 - 50.0)).collect();
    tensors.insert(
        "d.half".into(),
        (vec![7, 143], Dtype::F16, le(&halves, f16::to_le_bytes), halves.iter().map(|h| h.to_f32()).collect()),
    );
    let brains: Vec<bf16> = (0..513).map(|i| bf16::from_f32((i as f32).sqrt() - 11.0)).collect();
    tensors.insert(
        "e.bf16".into(),
        (vec![513], Dtype::BF16, le(&brains, bf16::to_le_bytes), brains.iter().map(|b| b.to_f32()).collect()),
    );
    let ints: Vec<i32> = (0..9).collect();
    tensors.insert("f.int".into(), (vec![9], Dtype::I32, le(&ints, i32::to_le_bytes), Vec::new()));

    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(name, (shape, dtype, bytes, _))| (name.clone(), TensorView::new(*dtype, shape.clone(), bytes).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
    tensors
}

/// A temporary directory holding `reference.safetensors`, and what it holds.
fn reference() -> (tempfile::TempDir, HashMap<String, (Vec<usize>, Dtype, Vec<u8>, Vec<f32>)>) {
    let dir = tempfile::tempdir().unwrap();
    let expected = write_reference(&dir.path().join("reference.safetensors"));
    (dir, expected)
}

#[test]
fn reader_returns_exactly_what_the_safetensors_crate_wrote() {
    let (dir, expected) = reference();
    let path = dir.path().join("reference.safetensors");
    let file = SafetensorsFile::open(&path).unwrap();

    for (name, (shape, dtype, bytes, values)) in &expected {
        let (info, raw) = file.read_raw(name).unwrap();
        assert_eq!((info.dtype, &info.shape), (*dtype, shape), "{name}");
        assert!(raw == *bytes, "{name}: raw bytes differ");
        if *dtype == Dtype::I32 {
            let err = file.read_f32(name, None).unwrap_err();
            assert!(matches!(err, ReadError::Dtype { .. }), "{name}: {err}");
            continue;
        }
        let (got, got_shape) = file.read_f32(name, Some(shape)).unwrap();
        assert_eq!(&got_shape, shape, "{name}");
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert!(bits(&got) == bits(values), "{name}: values differ");
    }

    let err = file.read_f32("a.big", Some(&[400_004])).unwrap_err();
    assert!(err.to_string().contains("has shape [400003], expected [400004]"), "{err}");
    let err = file.read_f32("missing", None).unwrap_err();
    assert!(err.to_string().contains("`missing` is missing"), "{err}");
}

#[test]
fn a_file_cut_short_after_opening_is_a_read_error_not_a_crash() {
    let (dir, expected) = reference();
    let path = dir.path().join("reference.safetensors");
    let file = SafetensorsFile::open(&path).unwrap();
    // Where each tensor ends in the file, in file order.
    let bytes = std::fs::read(&path).unwrap();
    let data_start = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut ends: Vec<(usize, String)> = expected
        .keys()
        .map(|name| (data_start + file.info(name).unwrap().data_offsets.1, name.clone()))
        .collect();
    ends.sort();
    // Something else truncates the file while kiln has it open (kiln itself never does): the
    // cut falls 3 bytes into the third tensor.
    let cut = ends[1].0 + 3;
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(cut as u64).unwrap();

    for (end, name) in &ends {
        let (raw, f32s) = (file.read_raw(name), file.read_f32(name, None));
        if *end <= cut {
            assert!(raw.is_ok(), "{name} lies before the cut");
            assert_eq!(f32s.is_ok(), expected[name].1 != Dtype::I32, "{name}");
        } else {
            let err = raw.unwrap_err();
            assert!(matches!(err, ReadError::Io { .. }) && err.to_string().contains("cannot read"), "{name}: {err}");
            // An I32 tensor is refused as f32 by its dtype before anything is read.
            let err = f32s.unwrap_err();
            match expected[name].1 {
                Dtype::I32 => assert!(matches!(err, ReadError::Dtype { .. }), "{name}: {err}"),
                _ => assert!(matches!(err, ReadError::Io { .. }) && err.to_string().contains("cannot read"), "{name}: {err}"),
            }
        }
    }
}

/// `t[c][r] = v[r][c]`, written out as the definition.
fn transposed(values: &[f32], rows: usize, cols: usize) -> Vec<u32> {
    let mut out = vec![0u32; values.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = values[r * cols + c].to_bits();
        }
    }
    out
}

#[test]
fn transposed_reads_match_the_definition_bit_for_bit() {
    // Shapes around the reader's 128-row strips and 16-column blocks, thin ones, and one tensor
    // with every bit pattern class; each tensor sits at an odd place in the file.
    let shapes = [(1, 1), (1, 300), (300, 1), (127, 129), (128, 16), (129, 17), (300, 2050), (2, 5)];
    let tensors: Vec<(String, usize, usize, Vec<f32>)> = shapes
        .iter()
        .enumerate()
        .map(|(i, &(rows, cols))| {
            let values: Vec<f32> = match (rows, cols) {
                (2, 5) => vec![
                    f32::NAN, f32::from_bits(0x7fc0_1234), f32::INFINITY, f32::NEG_INFINITY, -0.0, 0.0,
                    f32::from_bits(1), f32::MIN_POSITIVE, f32::MAX, -1.5,
                ],
                _ => (0..rows * cols).map(|k| ((k * 7 + i) as f32 * 0.61).cos() * 3.0).collect(),
            };
            (format!("t{i}.weight"), rows, cols, values)
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("linear.safetensors");
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, _, _, v)| le(v, f32::to_le_bytes)).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|((name, rows, cols, _), b)| (name.clone(), TensorView::new(Dtype::F32, vec![*rows, *cols], b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, &path).unwrap();

    let file = SafetensorsFile::open(&path).unwrap();
    for (name, rows, cols, values) in &tensors {
        let got = file.read_f32_transposed(name, [*rows, *cols]).unwrap();
        let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
        assert!(bits == transposed(values, *rows, *cols), "{name} [{rows}, {cols}]");
    }
    let err = file.read_f32_transposed("t6.weight", [2050, 300]).unwrap_err();
    assert!(err.to_string().contains("has shape [300, 2050], expected [2050, 300]"), "{err}");
    let err = file.read_f32_transposed("t9.weight", [1, 1]).unwrap_err();
    assert!(matches!(err, ReadError::Missing { .. }), "{err}");

    // Half-precision tensors are converted, then transposed; a 1-D tensor is refused by its shape.
    let (dir, expected) = reference();
    let file = SafetensorsFile::open(&dir.path().join("reference.safetensors")).unwrap();
    let got = file.read_f32_transposed("d.half", [7, 143]).unwrap();
    let bits: Vec<u32> = got.iter().map(|v| v.to_bits()).collect();
    assert!(bits == transposed(&expected["d.half"].3, 7, 143), "d.half");
    let err = file.read_f32_transposed("f.int", [3, 3]).unwrap_err();
    assert!(err.to_string().contains("has shape [9], expected [3, 3]"), "{err}");
}

#[test]
fn a_transposed_read_of_a_file_cut_short_is_a_read_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cut.safetensors");
    let values: Vec<f32> = (0..1000 * 64).map(|k| k as f32).collect();
    let bytes = le(&values, f32::to_le_bytes);
    let views = vec![("w".to_string(), TensorView::new(Dtype::F32, vec![1000, 64], &bytes).unwrap())];
    safetensors::serialize_to_file(views, None, &path).unwrap();
    let file = SafetensorsFile::open(&path).unwrap();
    let len = std::fs::metadata(&path).unwrap().len();
    // Cut inside the last strip of rows, after the others were readable.
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len(len - 1000).unwrap();
    let err = file.read_f32_transposed("w", [1000, 64]).unwrap_err();
    assert!(matches!(err, ReadError::Io { .. }) && err.to_string().contains("cannot read"), "{err}");
}
