//! Mean cross-entropy and perplexity of a model on a text.

use anyhow::{Result, bail};
use burn::tensor::Device;

use crate::data::Batch;
use crate::model::LanguageModel;

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TextScore {
    /// Mean cross-entropy in nats per predicted token.
    pub cross_entropy: f64,
    pub perplexity: f64,
    /// Tokens predicted (the text's tokens minus one per window).
    pub tokens: usize,
}

/// Scores `ids` in consecutive windows of up to `window` predicted tokens (each window sees
/// only its own context), `batch_size` windows at a time.
pub fn score(
    model: &impl LanguageModel,
    ids: &[u32],
    window: usize,
    batch_size: usize,
    device: &Device,
) -> Result<TextScore> {
    if ids.len() < 2 {
        bail!("the text encodes to {} token(s); at least 2 are needed to predict one", ids.len());
    }
    let window = window.min(model.max_positions()).max(1);
    let full = (ids.len() - 1) / window;
    let starts: Vec<usize> = (0..full).map(|i| i * window).collect();
    let mut total = 0.0f64;
    let mut count = 0usize;
    for chunk in starts.chunks(batch_size.max(1)) {
        let batch = Batch::from_windows(ids, chunk, window);
        total += batch_loss(model, &batch, device) * batch.num_tokens() as f64;
        count += batch.num_tokens();
    }
    let rest = (ids.len() - 1) - full * window;
    if rest > 0 {
        let batch = Batch::from_windows(ids, &[full * window], rest);
        total += batch_loss(model, &batch, device) * rest as f64;
        count += rest;
    }
    let cross_entropy = total / count as f64;
    Ok(TextScore {
        cross_entropy,
        perplexity: cross_entropy.exp(),
        tokens: count,
    })
}

fn batch_loss(model: &impl LanguageModel, batch: &Batch, device: &Device) -> f64 {
    let (inputs, targets) = batch.to_tensors(device);
    model.loss(inputs, targets).into_scalar::<f32>() as f64
}
