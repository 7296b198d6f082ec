//! Shared fixtures: a small real corpus and a tiny model config that trains in seconds.

use std::path::{Path, PathBuf};

use kiln::config::Config;

/// The first `bytes` bytes of the bundled Shakespeare corpus, written to `dir/corpus.txt`.
pub fn small_corpus(dir: &Path, bytes: usize) -> PathBuf {
    let full = std::fs::read_to_string(repo_path("data/shakespeare.txt")).unwrap();
    let mut end = bytes.min(full.len());
    while !full.is_char_boundary(end) {
        end -= 1;
    }
    let path = dir.join("corpus.txt");
    std::fs::write(&path, &full[..end]).unwrap();
    path
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A config for a ~50k-parameter model on a 60 kB corpus, writing into `dir`.
pub fn tiny_config(dir: &Path) -> Config {
    let corpus = small_corpus(dir, 60_000);
    let text = format!(
        r#"
output_dir = {out:?}
[model]
hidden_size = 32
num_layers = 2
num_heads = 4
num_kv_heads = 2
intermediate_size = 64
max_position_embeddings = 64
[data]
path = {corpus:?}
cache_dir = {cache:?}
seq_len = 32
val_fraction = 0.1
[training]
seed = 7
batch_size = 8
max_steps = 30
learning_rate = 3e-3
warmup_steps = 5
min_lr = 3e-4
eval_every_steps = 10
eval_batches = 2
log_every_steps = 5
"#,
        out = dir.join("out"),
        corpus = corpus,
        cache = dir.join("cache"),
    );
    Config::from_toml_str(&text, "tiny test config", &[]).unwrap()
}

/// Copies the files of `from` (not its subdirectories) into `to`, replacing what `to` held.
pub fn copy_dir(from: &Path, to: &Path) {
    if to.exists() {
        std::fs::remove_dir_all(to).unwrap();
    }
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// Every logged training and validation loss of two runs agrees to 2e-4 relative, step by step.
pub fn assert_same_losses(a: &[kiln::metrics::MetricRecord], b: &[kiln::metrics::MetricRecord], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: different log lengths\n{a:?}\n{b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.step, y.step, "{what}");
        for (p, q) in [(x.train_loss, y.train_loss), (x.val_loss, y.val_loss)] {
            assert_eq!(p.is_some(), q.is_some(), "{what}: step {}", x.step);
            if let (Some(p), Some(q)) = (p, q) {
                assert!((p - q).abs() <= 2e-4 * p.abs(), "{what}: step {}: {p} against {q}", x.step);
            }
        }
    }
}

/// The records without their wall-clock throughput, which no two runs share.
pub fn without_throughput(records: &[kiln::metrics::MetricRecord]) -> Vec<kiln::metrics::MetricRecord> {
    records.iter().map(|r| kiln::metrics::MetricRecord { tokens_per_sec: None, allreduce_seconds: None, ..r.clone() }).collect()
}
