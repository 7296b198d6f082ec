//! kiln's integration tests, in one binary so that Burn is linked once.

mod common;

mod cli;
mod config;
mod model;
mod fused;
mod optim;
mod schedule;
mod tokenizer;
mod training;
#[cfg(feature = "wgpu")]
mod wgpu;
#[cfg(feature = "cuda")]
mod cuda;
mod checkpoint;
mod crash;
mod hostile;
mod hf;
mod writer;
mod reader;
mod pytorch;
mod dataset;
mod gguf;
mod merge;
#[cfg(feature = "mpi")]
mod distributed;
