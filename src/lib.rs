//! kiln: train decoder-only language models (Llama, Qwen2, Mistral) with Burn, on CPU or GPU,
//! with checkpoints you can trust and exports in Hugging Face's formats.
//!
//! One module per concern:
//! - run set-up: `config` (the TOML run config), `backend` (device selection), `cuda_check`
//!   (what the cuda backend needs on the machine), `cli`;
//! - data: `tokenizer`, `data` (splits and batch order);
//! - the network: `model` (one file per architecture, and the ops they are written in),
//!   `params` (parameters by Hugging Face name), `fused`
//!   (fused CPU kernels with hand-written backward passes, used on Flex and ndarray);
//! - training: `train` (the `Learner` loop), `resume` (a checkpoint read back into a run),
//!   `optim` (AdamW and clipping), `loss_scale` (fp16's dynamic loss scaling), `schedule`
//!   (learning rate), `ema`, `metrics`, `plot`;
//! - files: `safetensors_io`, `checkpoint` (the CheckpointManager), `export` (the ModelSaver),
//!   `pretrained` (loading Hugging Face directories), `inspect`,
//!   `pytorch` (`pytorch_model.bin`/`.pt`/`.pth`, read without running their pickle), `convert`;
//! - inference: `generate`, `evaluate`.

pub mod backend;
pub mod buffer;
pub mod byte_level_bpe;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod convert;
#[cfg(feature = "cuda")]
pub mod cuda_check;
pub mod data;
pub mod dataset;
pub mod distributed;
pub mod ema;
pub mod evaluate;
pub mod export;
pub mod fused;
pub mod generate;
pub mod gguf;
pub mod gguf_model;
pub mod inspect;
pub mod loss_scale;
pub mod merge;
pub mod metrics;
pub mod model;
pub mod model_files;
pub mod optim;
pub mod params;
pub mod plot;
pub mod prepare;
pub mod pretrained;
pub mod pytorch;
pub mod quantize;
pub mod quants;
pub mod resume;
pub mod safetensors_io;
pub mod schedule;
pub mod sources;
pub mod tokenizer;
pub mod train;
pub mod weight_index;
