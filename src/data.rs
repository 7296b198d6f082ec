//! The corpus: read as UTF-8 text, as token ids, its train/validation split, and the batch
//! order.
//!
//! Training examples are windows of `seq_len + 1` tokens (inputs and the targets shifted by
//! one). Each epoch cuts the training split into non-overlapping windows starting at an
//! epoch-dependent offset and visits them in an epoch-seeded shuffled order. Both depend only
//! on `(seed, epoch)`, so the loader's whole state is two numbers, [`DataPosition`], and a resumed
//! run sees exactly the batches the interrupted one would have.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Train and validation token ids: the validation split is the corpus's tail.
#[derive(Debug, Clone)]
pub struct Splits {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

impl Splits {
    pub fn new(mut tokens: Vec<u32>, val_fraction: f64, seq_len: usize) -> Result<Self> {
        let n_val = ((tokens.len() as f64) * val_fraction).round() as usize;
        let val = tokens.split_off(tokens.len() - n_val);
        let splits = Self { train: tokens, val };
        for (name, part) in [("training", &splits.train), ("validation", &splits.val)] {
            if part.len() < seq_len + 1 {
                bail!(
                    "the {name} split has {} tokens, fewer than one window of data.seq_len + 1 = {}; \
                     use a larger corpus, a shorter data.seq_len or another data.val_fraction",
                    part.len(),
                    seq_len + 1
                );
            }
        }
        Ok(splits)
    }
}

/// Where the training loader stands: the epoch and the number of batches of it already served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DataPosition {
    pub epoch: usize,
    pub batch_in_epoch: usize,
}

/// A batch of token ids, `[batch, seq_len]` each, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub batch_size: usize,
    pub seq_len: usize,
    pub inputs: Vec<i32>,
    pub targets: Vec<i32>,
}

impl Batch {
    /// The windows of `seq_len + 1` tokens starting at `starts`.
    pub fn from_windows(tokens: &[u32], starts: &[usize], seq_len: usize) -> Self {
        let mut inputs = Vec::with_capacity(starts.len() * seq_len);
        let mut targets = Vec::with_capacity(starts.len() * seq_len);
        for &s in starts {
            inputs.extend(tokens[s..s + seq_len].iter().map(|&t| t as i32));
            targets.extend(tokens[s + 1..s + seq_len + 1].iter().map(|&t| t as i32));
        }
        Self {
            batch_size: starts.len(),
            seq_len,
            inputs,
            targets,
        }
    }

    pub fn num_tokens(&self) -> usize {
        self.batch_size * self.seq_len
    }

    /// Inputs and targets as `[batch, seq_len]` integer tensors on `device`.
    pub fn to_tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let shape = [self.batch_size, self.seq_len];
        let make = |v: &[i32]| Tensor::from_data(TensorData::new(v.to_vec(), shape), device);
        (make(&self.inputs), make(&self.targets))
    }
}

/// Serves training batches in the deterministic order described in the module docs.
pub struct TrainLoader {
    tokens: Vec<u32>,
    seq_len: usize,
    batch_size: usize,
    seed: u64,
    position: DataPosition,
    /// Window start offsets of the current epoch, in visiting order.
    order: Vec<usize>,
}

impl TrainLoader {
    pub fn new(tokens: Vec<u32>, seq_len: usize, batch_size: usize, seed: u64) -> Result<Self> {
        let windows = (tokens.len() - 1) / seq_len;
        if windows < batch_size + 1 {
            bail!(
                "the training split holds {windows} windows of data.seq_len = {seq_len} tokens, \
                 too few for one batch of training.batch_size = {batch_size} (plus one for the \
                 epoch offset); use a larger corpus or smaller values"
            );
        }
        let mut loader = Self {
            tokens,
            seq_len,
            batch_size,
            seed,
            position: DataPosition::default(),
            order: Vec::new(),
        };
        loader.seek(DataPosition::default());
        Ok(loader)
    }

    pub fn position(&self) -> DataPosition {
        self.position
    }

    /// Full batches per epoch (a last partial batch is dropped).
    pub fn batches_per_epoch(&self) -> usize {
        self.order.len() / self.batch_size
    }

    /// Moves to `position`, e.g. one restored from a checkpoint.
    pub fn seek(&mut self, position: DataPosition) {
        self.order = epoch_order(self.tokens.len(), self.seq_len, self.seed, position.epoch);
        self.position = position;
    }

    /// The next batch of the current epoch, or `None` once the epoch is exhausted (call
    /// [`TrainLoader::start_epoch`] to go on).
    pub fn next_batch(&mut self) -> Option<Batch> {
        let i = self.position.batch_in_epoch;
        if i >= self.batches_per_epoch() {
            return None;
        }
        let starts = &self.order[i * self.batch_size..(i + 1) * self.batch_size];
        let batch = Batch::from_windows(&self.tokens, starts, self.seq_len);
        self.position.batch_in_epoch += 1;
        Some(batch)
    }

    pub fn start_epoch(&mut self, epoch: usize) {
        self.seek(DataPosition {
            epoch,
            batch_in_epoch: 0,
        });
    }
}

/// Window starts for one epoch: non-overlapping windows from a random offset in `[0, seq_len)`,
/// shuffled; both drawn from a ChaCha stream seeded by `(seed, epoch)`.
fn epoch_order(n_tokens: usize, seq_len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let offset = rng.random_range(0..seq_len);
    let mut starts: Vec<usize> = (offset..)
        .step_by(seq_len)
        .take_while(|s| s + seq_len < n_tokens)
        .collect();
    starts.shuffle(&mut rng);
    starts
}

/// The fixed validation batches: up to `max_batches` batches of windows spread evenly over the
/// validation split, the same at every evaluation.
pub fn validation_batches(
    tokens: &[u32],
    seq_len: usize,
    batch_size: usize,
    max_batches: usize,
) -> Vec<Batch> {
    let windows = (tokens.len() - 1) / seq_len;
    let wanted = (batch_size * max_batches).min(windows);
    let starts: Vec<usize> = (0..wanted).map(|k| (k * windows / wanted) * seq_len).collect();
    starts
        .chunks(batch_size)
        .map(|chunk| Batch::from_windows(tokens, chunk, seq_len))
        .collect()
}

/// Reads the training corpus, which must be UTF-8 text.
pub fn read_corpus(path: &Path) -> Result<String> {
    read_text(path, "data.path = ")
}

/// Reads a non-empty UTF-8 text file; `what` prefixes the path in errors.
pub fn read_text(path: &Path, what: &str) -> Result<String> {
    let bytes = std::fs::read(path)
        .with_context(|| format!("cannot read {what}{}", path.display()))?;
    let text = String::from_utf8(bytes).map_err(|e| {
        anyhow!(
            "{what}{} is not UTF-8 text (invalid byte at offset {})",
            path.display(),
            e.utf8_error().valid_up_to()
        )
    })?;
    if text.is_empty() {
        bail!("{what}{} is empty", path.display());
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_that_differ_between_epochs() {
        let a = epoch_order(10_000, 64, 7, 0);
        let b = epoch_order(10_000, 64, 7, 1);
        assert_ne!(a, b);
        assert_eq!(a, epoch_order(10_000, 64, 7, 0));
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), a.len());
        assert!(a.iter().all(|s| s + 64 < 10_000));
    }

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        let tokens: Vec<u32> = (0..1000).collect();
        let mut loader = TrainLoader::new(tokens, 8, 4, 1).unwrap();
        let batch = loader.next_batch().unwrap();
        for (i, t) in batch.inputs.iter().zip(&batch.targets) {
            assert_eq!(i + 1, *t);
        }
    }

    #[test]
    fn seeking_replays_the_same_batches() {
        let tokens: Vec<u32> = (0..5000).map(|i| i % 97).collect();
        let mut a = TrainLoader::new(tokens.clone(), 16, 4, 3).unwrap();
        for _ in 0..5 {
            a.next_batch();
        }
        let pos = a.position();
        let expected: Vec<Batch> = (0..3).map(|_| a.next_batch().unwrap()).collect();
        let mut b = TrainLoader::new(tokens, 16, 4, 3).unwrap();
        b.seek(pos);
        let replayed: Vec<Batch> = (0..3).map(|_| b.next_batch().unwrap()).collect();
        assert_eq!(expected, replayed);
    }
}
