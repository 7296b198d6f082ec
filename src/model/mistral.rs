//! Mistral: the Llama decoder with a sliding attention window. Only the config differs from
//! `llama.rs`, so this file holds Hugging Face's `MistralConfig` and how it maps onto the
//! decoder; the tensors are named and laid out as Llama's.
//!
//! kiln computes contexts up to the window exactly and refuses longer ones (training with a
//! longer `data.seq_len` is an error; generation and evaluation keep to the window) rather than
//! masking them: Mistral v0.2 and later have no window at all.

use serde::{Deserialize, Serialize};

use super::llama::{DecoderConfig, LlamaShape};

/// Hugging Face's `MistralConfig`, as `config.json` holds it (the keys kiln reads and writes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MistralConfig {
    #[serde(flatten)]
    pub decoder: DecoderConfig,
    /// `null` (Mistral v0.2 and later) is no window.
    #[serde(default)]
    pub sliding_window: Option<usize>,
}

impl MistralConfig {
    pub fn from_shape(s: &LlamaShape, initializer_range: f64) -> Self {
        Self {
            decoder: DecoderConfig::from_shape(s, initializer_range),
            sliding_window: s.sliding_window,
        }
    }

    pub fn shape(&self) -> LlamaShape {
        LlamaShape {
            sliding_window: self.sliding_window,
            ..self.decoder.shape()
        }
    }
}
