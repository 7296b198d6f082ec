//! kiln's streaming safetensors writer against the `safetensors` crate's own serializer.
//!
//! The writer reads device tensors off the device in batches (one read transaction per batch of
//! neighbours) and transposes Linear weights on the way out; whatever the batching, the file
//! must be byte for byte the one the crate writes from the same values.

use std::collections::{BTreeMap, HashMap};

use burn::tensor::{Device, Tensor, TensorData};
use kiln::config::BackendKind;
use kiln::params::{pending, transpose};
use kiln::safetensors_io::{PendingTensor, write_to};
use safetensors::tensor::{Dtype, TensorView};

/// 70 tensors of uneven sizes, so that batches hold from one to several tensors: vectors,
/// untransposed and transposed matrices on the device, and host tensors in between. Returns
/// what the writer gets and, per name, the Hugging Face shape and values the file must hold.
fn mixed_tensors(device: &Device) -> (Vec<PendingTensor>, Vec<(String, Vec<usize>, Vec<f32>)>) {
    let mut pending_tensors = Vec::new();
    let mut expected = Vec::new();
    for i in 0..70usize {
        // Names out of sorted order, so the writer's sort matters.
        let name = format!("t{:03}", (i * 37) % 70);
        let (rows, cols) = (1 + i % 7, 1 + (i * 13) % 300);
        let values: Vec<f32> = (0..rows * cols).map(|k| ((i * 1000 + k) as f32).sin()).collect();
        match i % 4 {
            0 => {
                pending_tensors.push(PendingTensor::from_f32(&name, vec![rows, cols], values.clone()));
                expected.push((name, vec![rows, cols], values));
            }
            1 => {
                let t = Tensor::<1>::from_data(TensorData::new(values.clone(), [rows * cols]), device);
                pending_tensors.push(pending(name.clone(), t, false));
                expected.push((name, vec![rows * cols], values));
            }
            2 => {
                let t = Tensor::<2>::from_data(TensorData::new(values.clone(), [rows, cols]), device);
                pending_tensors.push(pending(name.clone(), t, false));
                expected.push((name, vec![rows, cols], values));
            }
            _ => {
                // A Linear weight: Burn [in, out] on the device, Hugging Face [out, in] on disk.
                let t = Tensor::<2>::from_data(TensorData::new(values.clone(), [rows, cols]), device);
                pending_tensors.push(pending(name.clone(), t, true));
                expected.push((name, vec![cols, rows], transpose(&values, rows, cols)));
            }
        }
    }
    (pending_tensors, expected)
}

fn crate_serialized(expected: &[(String, Vec<usize>, Vec<f32>)], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let bytes: Vec<Vec<u8>> = expected.iter().map(|(_, _, v)| kiln::safetensors_io::f32_bytes(v)).collect();
    let views: Vec<(String, TensorView)> = expected
        .iter()
        .zip(&bytes)
        .map(|((name, shape, _), b)| (name.clone(), TensorView::new(Dtype::F32, shape.clone(), b).unwrap()))
        .collect();
    let info: HashMap<String, String> = metadata.clone().into_iter().collect();
    safetensors::tensor::serialize(views, Some(info)).unwrap()
}

fn writes_what_the_crate_writes(kind: BackendKind) {
    let device = kiln::backend::device(kind).unwrap();
    let (tensors, expected) = mixed_tensors(&device);
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut out = Vec::new();
    let digest = write_to(&mut out, &metadata, tensors).unwrap();
    assert_eq!(out, crate_serialized(&expected, &metadata), "{kind:?}");
    assert_eq!(digest.bytes, out.len() as u64);
    let file_sha = {
        use sha2::Digest;
        kiln::safetensors_io::hex(&sha2::Sha256::digest(&out))
    };
    assert_eq!(digest.sha256, file_sha);
}

#[test]
fn batched_device_reads_write_the_crates_bytes_on_flex() {
    writes_what_the_crate_writes(BackendKind::Flex);
}

/// CubeCL reads a batch in one transaction and makes the transposed views contiguous on the
/// device first: a different code path from the CPU backends'.
#[cfg(feature = "wgpu")]
#[test]
fn batched_device_reads_write_the_crates_bytes_on_wgpu() {
    writes_what_the_crate_writes(BackendKind::Wgpu);
}
