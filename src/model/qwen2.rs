//! Qwen2 (the Qwen2.5 family): the Llama decoder with biases on the query, key and value
//! projections (none on the output projection), usually with a tied head. Only the config
//! differs from `llama.rs`, so this file holds Hugging Face's `Qwen2Config` and how it maps
//! onto the decoder; the tensors are named and laid out as Llama's.

use serde::{Deserialize, Serialize};

use super::llama::{DecoderConfig, LlamaShape};

/// Hugging Face's `Qwen2Config`, as `config.json` holds it (the keys kiln reads and writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Qwen2Config {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    /// The window applies only when this is set.
    #[serde(default)]
    pub use_sliding_window: bool,
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

impl Qwen2Config {
    pub fn from_shape(s: &LlamaShape, initializer_range: f64) -> Self {
        Self {
            decoder: DecoderConfig::from_shape(s, initializer_range),
            use_sliding_window: s.sliding_window.is_some(),
            sliding_window: s.sliding_window,
        }
    }

    pub fn shape(&self) -> LlamaShape {
        LlamaShape {
            qkv_bias: true,
            sliding_window: self.sliding_window.filter(|_| self.use_sliding_window),
            ..self.decoder.shape()
        }
    }
}
