//! Text generation with a KV cache: greedy at temperature 0, else temperature and top-k
//! sampling from a seeded ChaCha stream (so a seed reproduces a continuation).

use anyhow::{Result, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::model::{KvCache, LanguageModel};

#[derive(Debug, Clone, PartialEq)]
pub struct SamplingOptions {
    pub max_new_tokens: usize,
    /// 0 means greedy (argmax).
    pub temperature: f64,
    /// Sample among the `top_k` most likely tokens only (`None`: all).
    pub top_k: Option<usize>,
    pub seed: u64,
    /// Stop after emitting any of these tokens.
    pub eos_token_ids: Vec<u32>,
}

/// Continues `prompt` (token ids) and returns only the new ids. Generation stops at
/// `max_new_tokens`, at the end-of-sequence token, or when the context is full.
pub fn generate_ids(
    model: &impl LanguageModel,
    prompt: &[u32],
    options: &SamplingOptions,
    device: &Device,
) -> Result<Vec<u32>> {
    if prompt.is_empty() {
        bail!("the prompt encodes to no tokens; give at least one character");
    }
    if !(options.temperature.is_finite() && options.temperature >= 0.0) {
        bail!("--temperature must be a number of at least 0");
    }
    if options.top_k == Some(0) {
        bail!("--top-k must be at least 1");
    }
    let max_positions = model.max_positions();
    // Keep the most recent context that fits, leaving room for one new token.
    let prompt = &prompt[prompt.len().saturating_sub(max_positions - 1)..];
    let mut rng = ChaCha8Rng::seed_from_u64(options.seed);
    let mut cache = KvCache::new(model.num_layers());
    let mut logits = last_logits(model, prompt, &mut cache, device);
    let mut out = Vec::with_capacity(options.max_new_tokens);
    while out.len() < options.max_new_tokens {
        let next = choose(&logits, options, &mut rng);
        out.push(next);
        if options.eos_token_ids.contains(&next) || cache.len() >= max_positions {
            break;
        }
        logits = last_logits(model, &[next], &mut cache, device);
    }
    Ok(out)
}

/// Logits of the last position after feeding `ids` through the cache.
fn last_logits(model: &impl LanguageModel, ids: &[u32], cache: &mut KvCache, device: &Device) -> Vec<f32> {
    let input: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let n = input.len();
    let tokens = Tensor::<2, Int>::from_data(TensorData::new(input, [1, n]), device);
    model
        .last_logits(tokens, Some(cache))
        .into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("converted to f32")
}

/// Picks the next token from `logits`.
pub fn choose(logits: &[f32], options: &SamplingOptions, rng: &mut ChaCha8Rng) -> u32 {
    if options.temperature == 0.0 {
        // First maximum, as torch.argmax.
        let mut best = 0;
        for (i, &l) in logits.iter().enumerate() {
            if l > logits[best] {
                best = i;
            }
        }
        return best as u32;
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
    if let Some(k) = options.top_k {
        order.truncate(k.min(order.len()));
    }
    let max = logits[order[0]] as f64;
    let weights: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / options.temperature).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut r = rng.random::<f64>() * total;
    for (w, &i) in weights.iter().zip(&order) {
        r -= w;
        if r <= 0.0 {
            return i as u32;
        }
    }
    *order.last().expect("at least one candidate") as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(temperature: f64, top_k: Option<usize>) -> SamplingOptions {
        SamplingOptions { max_new_tokens: 1, temperature, top_k, seed: 0, eos_token_ids: Vec::new() }
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        assert_eq!(choose(&[0.1, 3.0, 3.0, -1.0], &opts(0.0, None), &mut rng), 1);
    }

    #[test]
    fn top_k_restricts_and_temperature_sharpens() {
        let logits = [2.0f32, 1.0, 0.5, 0.0];
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut counts = [0usize; 4];
        for _ in 0..4000 {
            counts[choose(&logits, &opts(1.0, Some(2)), &mut rng) as usize] += 1;
        }
        assert_eq!(counts[2] + counts[3], 0);
        // p(0)/p(1) = e under temperature 1.
        let ratio = counts[0] as f64 / counts[1] as f64;
        assert!((ratio - std::f64::consts::E).abs() < 0.3, "{ratio}");
        let mut cold = [0usize; 4];
        for _ in 0..2000 {
            cold[choose(&logits, &opts(0.1, None), &mut rng) as usize] += 1;
        }
        assert!(cold[0] > 1990, "{cold:?}");
    }
}
