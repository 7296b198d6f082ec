//! kiln: train Llama-style language models with Burn, on CPU or GPU, with checkpoints you can
//! trust and exports in Hugging Face's formats.
//!
//! One module per concern: `config` (the TOML run config), `tokenizer`, `data` (splits and batch
//! order), `model` (the Llama network), `params` (parameters by Hugging Face name), `optim`
//! (AdamW and clipping), `schedule` (learning rate), `train` (the `Learner` loop), `metrics`,
//! `plot`, `backend` (device selection) and `cli`.

pub mod backend;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod evaluate;
pub mod ema;
pub mod export;
pub mod generate;
pub mod metrics;
pub mod inspect;
pub mod model;
pub mod optim;
pub mod params;
pub mod plot;
pub mod pretrained;
pub mod safetensors_io;
pub mod schedule;
pub mod tokenizer;
pub mod train;
