//! The training data as the loop sees it: a prepared dataset's sources split into training and
//! validation tokens, the batch order, and the fixed validation batches.
//!
//! Training examples are windows of `seq_len + 1` tokens (inputs and the targets shifted by
//! one), which may cross document boundaries (packing, as nanoGPT and llm.c do). Each epoch
//! cuts every source's training tokens into non-overlapping windows from an epoch-dependent
//! offset and visits them in an epoch-seeded shuffled order; sources take turns by weight in a
//! fixed interleave (smooth weighted round-robin: after any number of windows each source's
//! share is within one window of its weight's). A source drawn more often than it has windows
//! starts another shuffled pass over them. All of it depends only on `(seed, epoch)`, so the
//! loader's whole state is two numbers, [`DataPosition`], and a resumed run sees exactly the
//! batches the interrupted one would have. The order is one global sequence of windows, which
//! several processes can divide by index.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::Split;
use crate::dataset::{Dataset, SourceTokens};

/// A prepared dataset split for a run. With sources named `split = "validation"`, those are
/// evaluated whole and every token of the others is trained on; otherwise each source's last
/// documents, `val_fraction` of its tokens, are held out (see [`held_out_start`]).
pub struct Corpus {
    dataset: Dataset,
    /// Per training source: the manifest source and its training tokens `0..end`.
    train: Vec<Part>,
    /// Per evaluated source: the manifest source and its validation tokens.
    val: Vec<Part>,
    /// Per training source: windows in one pass over its training tokens.
    windows: Vec<usize>,
    /// Per training source: its weight in the mixture.
    weights: Vec<f64>,
}

/// Tokens `start..end` of manifest source `source`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub source: usize,
    pub start: u64,
    pub end: u64,
}

impl Part {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

impl Corpus {
    /// Splits `dataset`; `weights` (one per training source) default to each source's training
    /// tokens.
    pub fn new(dataset: Dataset, weights: Option<Vec<f64>>, val_fraction: f64, seq_len: usize) -> Result<Self> {
        let entries = &dataset.manifest.sources;
        let named = entries.iter().any(|e| e.split == Split::Validation);
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for (i, (tokens, entry)) in dataset.sources.iter().zip(entries).enumerate() {
            let n = tokens.len();
            let whole = Part { source: i, start: 0, end: n };
            match (named, entry.split) {
                (true, Split::Train) => train.push(whole),
                (true, Split::Validation) => val.push(whole),
                (false, _) => {
                    let cut = n - ((n as f64) * val_fraction).round() as u64;
                    let at = held_out_start(tokens, dataset.manifest.eos_token_id, cut, seq_len as u64 + 1);
                    train.push(Part { end: at, ..whole });
                    val.push(Part { start: at, ..whole });
                }
            }
        }
        let hint = if named { "a larger source or a shorter data.seq_len" } else { "a larger corpus, a shorter data.seq_len or another data.val_fraction" };
        for (name, parts) in [("training", &train), ("validation", &val)] {
            if let Some(p) = parts.iter().find(|p| p.len() < seq_len as u64 + 1) {
                bail!(
                    "the {name} split of source {} ({}) has {} tokens, fewer than one window of data.seq_len + 1 = {}; use {hint}",
                    p.source,
                    entries[p.source].path.display(),
                    p.len(),
                    seq_len + 1
                );
            }
        }
        let windows: Vec<usize> = train.iter().map(|p| windows_per_pass(p.len(), seq_len)).collect();
        if let Some(i) = windows.iter().position(|&w| w == 0) {
            bail!(
                "the training split of source {} ({}) has {} tokens, too few for a window of \
                 data.seq_len + 1 = {} from any offset; use a larger corpus or a shorter data.seq_len",
                train[i].source,
                entries[train[i].source].path.display(),
                train[i].len(),
                seq_len + 1
            );
        }
        let weights = match weights {
            Some(w) => {
                if w.len() != train.len() {
                    bail!("{} weights for {} training sources", w.len(), train.len());
                }
                w
            }
            None => windows.iter().map(|&w| w as f64).collect(),
        };
        Ok(Self { dataset, train, val, windows, weights })
    }

    pub fn dataset(&self) -> &Dataset {
        &self.dataset
    }

    /// The tokens of training source `s` (its training part starts at 0).
    fn train_tokens(&self, s: usize) -> &SourceTokens {
        &self.dataset.sources[self.train[s].source]
    }

    fn num_train_sources(&self) -> usize {
        self.train.len()
    }

    /// What is trained on, one part per training source.
    pub fn train_parts(&self) -> &[Part] {
        &self.train
    }

    /// What is evaluated on, one part per evaluated source.
    pub fn validation_parts(&self) -> &[Part] {
        &self.val
    }
}

/// Where a source's held-out tail starts, so that validation is whole documents: the document
/// start nearest to `cut` that leaves both parts at least `min_part` tokens, or `cut` itself
/// when there is none (one long document, or a tokenizer without an end-of-text id, whose
/// stream marks no documents).
fn held_out_start(tokens: &SourceTokens, eos: Option<u32>, cut: u64, min_part: u64) -> u64 {
    let Some(eos) = eos else { return cut };
    let n = tokens.len();
    if cut < min_part || n - cut < min_part {
        return cut;
    }
    // Document starts are the positions just after an end-of-text id.
    const CHUNK: u64 = 1 << 16;
    let mut buf = vec![0u32; CHUNK as usize];
    let mut after = None;
    let mut pos = cut - 1;
    while pos < n - min_part {
        let len = CHUNK.min(n - min_part - pos);
        tokens.copy_to(pos, &mut buf[..len as usize]);
        if let Some(i) = buf[..len as usize].iter().position(|&t| t == eos) {
            after = Some(pos + i as u64 + 1);
            break;
        }
        pos += len;
    }
    // Before the cut, look no further back than the one found after it.
    let lowest = match after {
        Some(a) => cut.saturating_sub(a - cut).max(min_part),
        None => min_part,
    };
    let mut before = None;
    // Ids `lowest - 1 .. cut - 1` (a document start `p` follows an end at `p - 1`).
    let mut end = cut - 1;
    while end > lowest - 1 && before.is_none() {
        let len = CHUNK.min(end - (lowest - 1));
        let from = end - len;
        tokens.copy_to(from, &mut buf[..len as usize]);
        before = buf[..len as usize].iter().rposition(|&t| t == eos).map(|i| from + i as u64 + 1);
        end = from;
    }
    match (before, after) {
        (Some(b), Some(a)) => if cut - b <= a - cut { b } else { a },
        (Some(b), None) => b,
        (None, Some(a)) => a,
        (None, None) => cut,
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

    /// The batch cut into consecutive batches of `size` windows (the last one may be smaller):
    /// the micro-batches of a global batch.
    pub fn micro_batches(&self, size: usize) -> impl Iterator<Item = Batch> + '_ {
        let n = size.max(1) * self.seq_len;
        self.inputs.chunks(n).zip(self.targets.chunks(n)).map(|(inputs, targets)| Batch {
            batch_size: inputs.len() / self.seq_len,
            seq_len: self.seq_len,
            inputs: inputs.to_vec(),
            targets: targets.to_vec(),
        })
    }

    /// Inputs and targets as `[batch, seq_len]` integer tensors on `device`.
    pub fn to_tensors(&self, device: &Device) -> (Tensor<2, Int>, Tensor<2, Int>) {
        let shape = [self.batch_size, self.seq_len];
        let make = |v: &[i32]| Tensor::from_data(TensorData::new(v.to_vec(), shape), device);
        (make(&self.inputs), make(&self.targets))
    }
}

/// Serves training batches in the deterministic order described in the module docs. Its batches
/// are global batches (every window of one optimizer step), so the order and the cursor do not
/// depend on how a step is split into micro-batches.
pub struct TrainLoader {
    corpus: Arc<Corpus>,
    seq_len: usize,
    batch_size: usize,
    seed: u64,
    position: DataPosition,
    mixer: Mixer,
    /// Windows drawn from each source so far this epoch.
    drawn: Vec<usize>,
    /// Per source: the pass over its windows in use, and that pass's window starts in order.
    passes: Vec<(usize, Vec<u64>)>,
}

impl TrainLoader {
    pub fn new(corpus: Arc<Corpus>, seq_len: usize, batch_size: usize, seed: u64) -> Result<Self> {
        let windows: usize = corpus.windows.iter().sum();
        if windows < batch_size {
            bail!(
                "the training split holds {windows} windows of data.seq_len = {seq_len} tokens (those \
                 that fit whatever the epoch's offset), too few for one optimizer step of {batch_size} \
                 (training.batch_size x training.grad_accum_steps); use a larger corpus or smaller values"
            );
        }
        let n = corpus.num_train_sources();
        let mixer = Mixer::new(&corpus.weights);
        let mut loader = Self {
            corpus,
            seq_len,
            batch_size,
            seed,
            position: DataPosition::default(),
            mixer,
            drawn: vec![0; n],
            passes: vec![(usize::MAX, Vec::new()); n],
        };
        loader.seek(DataPosition::default());
        Ok(loader)
    }

    pub fn position(&self) -> DataPosition {
        self.position
    }

    pub fn corpus(&self) -> &Corpus {
        &self.corpus
    }

    /// Full batches per epoch: an epoch is as many windows as the sources hold (a last partial
    /// batch is dropped).
    pub fn batches_per_epoch(&self) -> usize {
        self.corpus.windows.iter().sum::<usize>() / self.batch_size
    }

    /// Moves to `position`, e.g. one restored from a checkpoint: replays the interleave up to
    /// it (no tokens are read).
    pub fn seek(&mut self, position: DataPosition) {
        if position.epoch != self.position.epoch {
            self.passes.iter_mut().for_each(|p| p.0 = usize::MAX);
        }
        self.position = position;
        self.mixer.reset();
        self.drawn.iter_mut().for_each(|d| *d = 0);
        for _ in 0..position.batch_in_epoch * self.batch_size {
            self.drawn[self.mixer.next()] += 1;
        }
    }

    /// The next batch of the current epoch, or `None` once the epoch is exhausted (call
    /// [`TrainLoader::start_epoch`] to go on).
    pub fn next_batch(&mut self) -> Option<Batch> {
        if self.position.batch_in_epoch >= self.batches_per_epoch() {
            return None;
        }
        let window = self.seq_len + 1;
        let mut tokens = vec![0u32; self.batch_size * window];
        for chunk in tokens.chunks_exact_mut(window) {
            let s = self.mixer.next();
            let k = self.drawn[s];
            self.drawn[s] += 1;
            let start = self.window_start(s, k);
            self.corpus.train_tokens(s).copy_to(start, chunk);
        }
        let starts: Vec<usize> = (0..self.batch_size).map(|i| i * window).collect();
        self.position.batch_in_epoch += 1;
        Some(Batch::from_windows(&tokens, &starts, self.seq_len))
    }

    /// The start of source `s`'s `k`-th window this epoch.
    fn window_start(&mut self, s: usize, k: usize) -> u64 {
        let per_pass = self.corpus.windows[s];
        let pass = k / per_pass;
        if self.passes[s].0 != pass {
            let order = epoch_order(self.corpus.train[s].end, self.seq_len, self.seed, self.position.epoch, s, pass);
            debug_assert_eq!(order.len(), per_pass);
            self.passes[s] = (pass, order);
        }
        self.passes[s].1[k % per_pass]
    }

    pub fn start_epoch(&mut self, epoch: usize) {
        self.seek(DataPosition {
            epoch,
            batch_in_epoch: 0,
        });
    }
}

/// Windows of `seq_len + 1` tokens that fit, one after the other, in `n_tokens` tokens
/// whatever the offset in `[0, seq_len)` they start from.
fn windows_per_pass(n_tokens: u64, seq_len: usize) -> usize {
    let seq_len = seq_len as u64;
    (n_tokens + 1).saturating_sub(2 * seq_len).div_ceil(seq_len) as usize
}

/// Smooth weighted round-robin over sources: each turn every source gains its weight in credit
/// and the richest (the first among equals) is drawn and pays the total. Deterministic, and
/// after any number of turns each source's count is within one of its weight's share.
#[derive(Debug, Clone)]
struct Mixer {
    weights: Vec<f64>,
    total: f64,
    credit: Vec<f64>,
}

impl Mixer {
    fn new(weights: &[f64]) -> Self {
        Self { weights: weights.to_vec(), total: weights.iter().sum(), credit: vec![0.0; weights.len()] }
    }

    fn reset(&mut self) {
        self.credit.iter_mut().for_each(|c| *c = 0.0);
    }

    fn next(&mut self) -> usize {
        if self.weights.len() == 1 {
            return 0;
        }
        for (c, w) in self.credit.iter_mut().zip(&self.weights) {
            *c += w;
        }
        let best = (1..self.credit.len()).fold(0, |best, i| if self.credit[i] > self.credit[best] { i } else { best });
        self.credit[best] -= self.total;
        best
    }
}

/// Window starts of one pass over a source's `n_tokens` training tokens in an epoch:
/// [`windows_per_pass`] non-overlapping windows from a random offset in `[0, seq_len)`, shuffled; both drawn from a
/// ChaCha stream seeded by `(seed, epoch, source, pass)` (source 0's first pass by `(seed,
/// epoch)` alone).
fn epoch_order(n_tokens: u64, seq_len: usize, seed: u64, epoch: usize, source: usize, pass: usize) -> Vec<u64> {
    let mix = (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ (source as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9)
        ^ (pass as u64).wrapping_mul(0x94D0_49BB_1331_11EB);
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ mix);
    let offset = rng.random_range(0..seq_len) as u64;
    let mut starts: Vec<u64> = (0..windows_per_pass(n_tokens, seq_len) as u64).map(|i| offset + i * seq_len as u64).collect();
    starts.shuffle(&mut rng);
    starts
}

/// The fixed validation batches: up to `max_batches` batches of windows spread evenly over each
/// evaluated source's validation tokens (sources share them by their validation windows), the
/// same at every evaluation.
pub fn validation_batches(corpus: &Corpus, seq_len: usize, batch_size: usize, max_batches: usize) -> Vec<Batch> {
    let window = seq_len + 1;
    let windows: Vec<usize> = corpus.val.iter().map(|p| ((p.len() - 1) / seq_len as u64) as usize).collect();
    let total: usize = windows.iter().sum();
    let wanted = (batch_size * max_batches).min(total);
    let mut tokens = Vec::new();
    for (part, &w) in corpus.val.iter().zip(&windows) {
        let share = if corpus.val.len() == 1 { wanted } else { ((wanted * w) as f64 / total as f64).round().max(1.0) as usize };
        let share = share.min(w);
        for k in 0..share {
            let from = part.start + ((k * w / share) * seq_len) as u64;
            let mut buf = vec![0u32; window];
            corpus.dataset.sources[part.source].copy_to(from, &mut buf);
            tokens.extend(buf);
        }
    }
    let starts: Vec<usize> = (0..tokens.len() / window).map(|i| i * window).collect();
    starts.chunks(batch_size).map(|chunk| Batch::from_windows(&tokens, chunk, seq_len)).collect()
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
    fn epoch_orders_are_permutations_that_differ_between_epochs_sources_and_passes() {
        let a = epoch_order(10_000, 64, 7, 0, 0, 0);
        assert_ne!(a, epoch_order(10_000, 64, 7, 1, 0, 0));
        assert_ne!(a, epoch_order(10_000, 64, 7, 0, 1, 0));
        assert_ne!(a, epoch_order(10_000, 64, 7, 0, 0, 1));
        assert_eq!(a, epoch_order(10_000, 64, 7, 0, 0, 0));
        let mut sorted = a.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), a.len());
        assert!(a.iter().all(|s| s + 64 < 10_000));
        assert_eq!(a.len(), windows_per_pass(10_000, 64));
        // Every offset leaves room for that many windows, and the last offset no more.
        for (n, seq) in [(10u64, 4usize), (11, 4), (12, 4), (129, 64), (10_000, 64), (7, 4)] {
            let fits = |offset: u64| (0..).take_while(|i| offset + i * seq as u64 + (seq as u64) < n).count();
            assert_eq!(windows_per_pass(n, seq), fits(seq as u64 - 1), "{n} tokens, windows of {seq}");
        }
    }

    #[test]
    fn the_mixer_keeps_every_prefix_within_one_of_the_weights() {
        let weights = [3.0, 1.0, 0.5];
        let mut mixer = Mixer::new(&weights);
        let mut counts = [0usize; 3];
        for turn in 1..=1000usize {
            counts[mixer.next()] += 1;
            for (c, w) in counts.iter().zip(weights) {
                let expected = turn as f64 * w / 4.5;
                assert!((*c as f64 - expected).abs() <= 1.0, "turn {turn}: {counts:?}");
            }
        }
    }
}
