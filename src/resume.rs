//! Reading a checkpoint back into a run: the weights into the model, the optimizer moments and
//! EMA weights into flattened tensors in Burn layout.
//!
//! A checkpoint stores every tensor in its parameter's Hugging Face layout (Linear weights are
//! `[out, in]`; Burn's are `[in, out]`), so an exported or inspected file reads like any other
//! Hugging Face file; the transposes happen here, while the tensors are read.

use std::collections::BTreeMap;

use anyhow::{Result, anyhow, bail};
use burn::tensor::{Device, Tensor, TensorData};

use crate::checkpoint::LoadedCheckpoint;
use crate::ema::EmaTensor;
use crate::model::{ArchConfig, CausalLm, HfLayout};
use crate::optim::Moments;
use crate::params;

/// A checkpoint's tensors, read into the model and fresh tensors on the device.
pub struct RestoredTensors {
    pub model: CausalLm,
    /// The optimizer's moments by parameter name (none before the first step).
    pub moments: BTreeMap<String, Moments>,
    /// The EMA weights, when they were asked for and the checkpoint has them.
    pub ema: Option<BTreeMap<String, EmaTensor>>,
}

/// Reads a checkpoint's tensors as a resume does: its weights into `model` (built with the
/// checkpoint's architecture), its optimizer moments and, if `with_ema`, its EMA weights into
/// flattened tensors in Burn layout; then waits until the checkpoint's checksums are verified
/// (see [`crate::checkpoint::open`]). A checkpoint that fails verification is reported as
/// such, even when what was read from it also made no sense.
pub fn restore_tensors(
    ck: &mut LoadedCheckpoint,
    model: CausalLm,
    with_ema: bool,
    device: &Device,
) -> Result<RestoredTensors> {
    let read = read_tensors(ck, model, with_ema, device);
    ck.verified()?;
    read
}

fn read_tensors(
    ck: &LoadedCheckpoint,
    model: CausalLm,
    with_ema: bool,
    device: &Device,
) -> Result<RestoredTensors> {
    let s = &ck.sidecar;
    let model = params::load_named(model, &mut &ck.weights).map_err(|errors| anyhow!("checkpoint weights do not fit the model:\n  {}", errors.join("\n  ")))?;

    let inner = device.clone().without_autodiff();
    let burn_shapes = burn_shapes(&model);
    let mut moments = BTreeMap::new();
    if s.optimizer.step > 0 {
        for (name, shape) in &burn_shapes {
            let exp_avg = read_flat(ck, &format!("exp_avg.{name}"), &model, name, shape, &inner)?;
            let exp_avg_sq = read_flat(ck, &format!("exp_avg_sq.{name}"), &model, name, shape, &inner)?;
            moments.insert(
                name.clone(),
                Moments {
                    shape: shape.clone(),
                    exp_avg,
                    exp_avg_sq,
                },
            );
        }
    }
    let ema = match (with_ema, s.ema_decay) {
        (false, _) => None,
        (true, Some(_)) => {
            let mut weights = BTreeMap::new();
            for (name, shape) in &burn_shapes {
                let value = read_flat(ck, &format!("ema.{name}"), &model, name, shape, &inner)?;
                weights.insert(name.clone(), EmaTensor { shape: shape.clone(), value });
            }
            Some(weights)
        }
        (true, None) => {
            tracing::warn!(
                "training.ema_decay is set but the checkpoint has no EMA weights; the \
                 average starts from the current weights"
            );
            None
        }
    };
    Ok(RestoredTensors { model, moments, ema })
}

/// The learner's parameters with their Burn-layout shapes.
fn burn_shapes(model: &CausalLm) -> Vec<(String, Vec<usize>)> {
    params::named_shapes(model)
        .into_iter()
        .map(|(name, mut shape)| {
            if model.stored_transposed(&name, shape.len()) {
                shape.swap(0, 1);
            }
            (name, shape)
        })
        .collect()
}

/// Reads optimizer-file tensor `key` (state of `model`'s parameter `param`, Burn shape `shape`)
/// as a flattened device tensor in Burn layout.
fn read_flat(
    ck: &LoadedCheckpoint,
    key: &str,
    model: &CausalLm,
    param: &str,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor<1>> {
    let transposed = model.stored_transposed(param, shape.len());
    let mut hf_shape = shape.to_vec();
    if transposed {
        hf_shape.swap(0, 1);
    }
    let values = match *hf_shape {
        [rows, cols] if transposed => ck.optim.read_f32_transposed(key, [rows, cols])?,
        _ => ck.optim.read_f32(key, Some(&hf_shape))?.0,
    };
    let n = values.len();
    Ok(Tensor::from_data(TensorData::new(values, [n]), device))
}

/// Refuses a checkpoint whose architecture differs from the config's, naming each difference.
pub fn check_same_shape(saved: &ArchConfig, current: &ArchConfig) -> Result<()> {
    if saved == current {
        return Ok(());
    }
    let a = serde_json::to_value(saved)?;
    let b = serde_json::to_value(current)?;
    let mut diffs = Vec::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (key, va) in a {
            if b.get(key) != Some(va) {
                // Named as the run config names them.
                let named = match key.as_str() {
                    "vocab_size" => "tokenizer vocab_size",
                    "model_type" => "model.architecture",
                    "num_hidden_layers" => "model.num_layers",
                    "num_attention_heads" => "model.num_heads",
                    "num_key_value_heads" => "model.num_kv_heads",
                    other => &format!("model.{other}"),
                };
                diffs.push(format!(
                    "{named}: checkpoint {va}, config {}",
                    b.get(key).cloned().unwrap_or_default()
                ));
            }
        }
    }
    bail!(
        "the checkpoint's model shape does not match the config:\n  {}",
        diffs.join("\n  ")
    )
}

