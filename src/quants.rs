//! ggml's tensor encodings, computed as the `gguf` Python package's reference quantizer
//! (`gguf.quants.quantize`, which matches ggml-quants.c) computes them, so that kiln's blocks
//! are bit for bit its blocks:
//!
//! - F16 and BF16: each value rounded to nearest even (BF16's NaNs kept quiet NaNs);
//! - Q8_0: blocks of 32 values; `d = max|x| / 127` (stored as f16), `q = round(x / d)` with
//!   ties away from zero, computed as `x * (1 / d)` in f32, as int8;
//! - Q4_0: blocks of 32 values; `d = m / -8` where `m` is the value of largest magnitude
//!   (stored as f16), `q = min(15, trunc(x * (1 / d) + 8.5))` with the product and sum in f64
//!   rounded once to f32, packed two to a byte: value `j` in the low nibble of byte `j`, value
//!   `j + 16` in its high nibble.
//!
//! Dequantization is `d * q` (Q8_0) and `d * (q - 8)` (Q4_0) in f32, as ggml's.

use crate::gguf::TensorType;

/// Encodes row-major `values` as `ty`. Quantized types need a multiple of 32 values (whole
/// rows of whole blocks; checked by the caller against the tensor's shape).
pub fn quantize(values: &[f32], ty: TensorType) -> Vec<u8> {
    match ty {
        TensorType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        TensorType::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect(),
        TensorType::BF16 => values.iter().flat_map(|&v| bf16_bits(v).to_le_bytes()).collect(),
        TensorType::Q8_0 => values.chunks_exact(32).flat_map(q8_0_block).collect(),
        TensorType::Q4_0 => values.chunks_exact(32).flat_map(q4_0_block).collect(),
    }
}

/// gguf-py's BF16: NaNs forced quiet, others rounded to nearest even.
fn bf16_bits(v: f32) -> u16 {
    let n = v.to_bits();
    let n = if n & 0x7fff_ffff > 0x7f80_0000 { (n & 0xffff_0000) | (64 << 16) } else { n };
    ((n as u64 + (0x7fff + ((n as u64 >> 16) & 1))) >> 16) as u16
}

/// The reciprocal gguf-py multiplies by: `1 / d`, or 0 for an all-zero block.
fn inverse(d: f32) -> f32 {
    if d == 0.0 { 0.0 } else { 1.0 / d }
}

fn q8_0_block(block: &[f32]) -> [u8; 34] {
    let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = inverse(d);
    let mut out = [0u8; 34];
    out[..2].copy_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
    for (o, &x) in out[2..].iter_mut().zip(block) {
        // f32::round rounds ties away from zero, as gguf-py's `np_roundf`.
        *o = ((x * id).round() as i8) as u8;
    }
    out
}

fn q4_0_block(block: &[f32]) -> [u8; 18] {
    // The first value of the largest magnitude, sign kept (numpy's argmax takes the first).
    let mut max = 0f32;
    for &x in block {
        if x.abs() > max.abs() {
            max = x;
        }
    }
    let d = max / -8.0;
    let id = inverse(d);
    let q = |x: f32| -> u8 {
        let v = (x as f64 * id as f64 + 8.5) as f32;
        (v.trunc() as u8).min(15)
    };
    let mut out = [0u8; 18];
    out[..2].copy_from_slice(&half::f16::from_f32(d).to_bits().to_le_bytes());
    for j in 0..16 {
        out[2 + j] = q(block[j]) | (q(block[j + 16]) << 4);
    }
    out
}

/// Decodes `bytes` of type `ty` to f32.
pub fn dequantize(bytes: &[u8], ty: TensorType) -> Vec<f32> {
    let f16 = |b: &[u8]| half::f16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32();
    match ty {
        TensorType::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
        TensorType::F16 => bytes.chunks_exact(2).map(f16).collect(),
        TensorType::BF16 => bytes.chunks_exact(2).map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f32()).collect(),
        TensorType::Q8_0 => bytes
            .chunks_exact(34)
            .flat_map(|b| {
                let d = f16(&b[..2]);
                b[2..].iter().map(move |&q| d * (q as i8) as f32)
            })
            .collect(),
        TensorType::Q4_0 => bytes
            .chunks_exact(18)
            .flat_map(|b| {
                let d = f16(&b[..2]);
                let low = b[2..].iter().map(move |&q| d * ((q & 0x0f) as i32 - 8) as f32);
                let high = b[2..].iter().map(move |&q| d * ((q >> 4) as i32 - 8) as f32);
                low.chain(high)
            })
            .collect(),
    }
}

/// The largest error dequantization may show against `x` for type `ty`, per value, given the
/// largest magnitude `amax` of its block: half a quantization step (plus the scale's own f16
/// rounding), or half a unit in the last place of the narrow float.
pub fn error_bound(ty: TensorType, x: f32, amax: f32) -> f32 {
    match ty {
        TensorType::F32 => 0.0,
        TensorType::F16 => x.abs() * 2f32.powi(-11) + 2f32.powi(-25),
        TensorType::BF16 => x.abs() * 2f32.powi(-8),
        // Steps of amax / 127 (Q8_0) and amax / 8 (Q4_0, one side of zero reaches only 7 steps
        // before clamping), the scale rounded to f16 (relative 2^-11) moving every step.
        TensorType::Q8_0 => amax / 127.0 * 0.5 + amax * 2f32.powi(-11) + 1e-12,
        TensorType::Q4_0 => amax / 8.0 + amax * 2f32.powi(-10) + 1e-12,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_trip_within_their_bound() {
        let values: Vec<f32> = (0..256).map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 37.0).collect();
        for ty in [TensorType::F32, TensorType::F16, TensorType::BF16, TensorType::Q8_0, TensorType::Q4_0] {
            let bytes = quantize(&values, ty);
            assert_eq!(bytes.len() as u64, ty.byte_len(&[values.len()]).unwrap(), "{ty:?}");
            let back = dequantize(&bytes, ty);
            for (block, got) in values.chunks(32).zip(back.chunks(32)) {
                let amax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
                for (&x, &y) in block.iter().zip(got) {
                    assert!((x - y).abs() <= error_bound(ty, x, amax), "{ty:?}: {x} came back as {y}");
                }
            }
        }
    }

    #[test]
    fn an_all_zero_block_quantizes_to_zero_scale() {
        let zeros = [0f32; 32];
        assert_eq!(dequantize(&quantize(&zeros, TensorType::Q8_0), TensorType::Q8_0), zeros);
        assert_eq!(dequantize(&quantize(&zeros, TensorType::Q4_0), TensorType::Q4_0), zeros);
    }
}
