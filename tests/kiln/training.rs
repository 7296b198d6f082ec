use kiln::config::BackendKind;
use kiln::metrics::read_jsonl;
use kiln::params::named_tensors;
use kiln::train::{Learner, StopReason};

use super::common::tiny_config;

#[test]
fn a_short_run_lowers_the_loss_and_writes_its_outputs() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.training.max_steps = 60;
    let mut learner = Learner::new(config).unwrap();
    let first = learner.evaluate();
    let summary = learner.fit().unwrap();
    assert_eq!(summary.steps, 60);
    assert_eq!(summary.stop_reason, StopReason::MaxSteps);
    let last = summary.final_val_loss.unwrap();
    // A uniform guess over the vocabulary costs ln(vocab) nats; training must beat the start
    // by a clear margin.
    assert!(first > 3.0, "initial val loss {first}");
    assert!(last < first - 0.5, "val loss went from {first} to {last}");

    let out = dir.path().join("out");
    let records = read_jsonl(&out.join("metrics.jsonl")).unwrap();
    let train: Vec<f64> = records.iter().filter_map(|r| r.train_loss).collect();
    assert_eq!(train.len(), 12);
    assert!(train.last().unwrap() < &(train[0] - 0.5), "{train:?}");
    let evals: Vec<usize> = records.iter().filter(|r| r.val_loss.is_some()).map(|r| r.step).collect();
    assert_eq!(evals, [10, 20, 30, 40, 50, 60]);
    assert!(records.iter().all(|r| r.epoch == 0));
    assert!(records.iter().filter_map(|r| r.lr).all(|lr| lr > 0.0 && lr <= 3e-3));
    assert!(records.iter().filter_map(|r| r.tokens_per_sec).all(|t| t > 0.0));
    let svg = std::fs::read_to_string(out.join("loss_curve.svg")).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 2);
    assert!(out.join("tokenizer.json").exists());
    assert!(out.join("config.toml").exists());
}

/// Runs the tiny config for `steps` on `backend`; returns the metrics lines and final weights.
pub fn run(backend: BackendKind, steps: usize, dropout: f64) -> (String, Vec<kiln::params::NamedTensor>) {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.training.backend = backend;
    config.training.max_steps = steps;
    config.model.dropout = dropout;
    let mut learner = Learner::new(config).unwrap();
    learner.fit().unwrap();
    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    // Throughput is wall-clock and differs between runs; everything else must not.
    let metrics = metrics
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_sec");
            v.to_string()
        })
        .collect::<Vec<_>>()
        .join("\n");
    (metrics, named_tensors(learner.model()))
}

#[test]
fn same_seed_gives_bit_identical_runs_on_each_cpu_backend() {
    for backend in [BackendKind::Flex, BackendKind::Ndarray] {
        // Dropout on, so the per-step dropout streams are exercised too.
        let (metrics_a, weights_a) = run(backend, 20, 0.1);
        let (metrics_b, weights_b) = run(backend, 20, 0.1);
        assert_eq!(metrics_a, metrics_b, "{backend:?}: loss curves differ");
        assert!(weights_a == weights_b, "{backend:?}: final weights differ");
        let (metrics_c, _) = run(backend, 20, 0.0);
        assert_ne!(metrics_a, metrics_c, "{backend:?}: dropout changed nothing");
    }
}

#[test]
fn cpu_backends_agree_with_each_other() {
    let (_, flex) = run(BackendKind::Flex, 10, 0.0);
    let (_, ndarray) = run(BackendKind::Ndarray, 10, 0.0);
    for (a, b) in flex.iter().zip(&ndarray) {
        assert_eq!(a.name, b.name);
        let diff = a.values.iter().zip(&b.values).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(diff < 1e-3, "{}: flex and ndarray differ by {diff}", a.name);
    }
}

#[test]
fn epochs_bound_the_run_and_early_stopping_stops_it() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.training.max_steps = 10_000;
    config.training.epochs = 1;
    let mut learner = Learner::new(config).unwrap();
    let per_epoch = learner.loader.batches_per_epoch();
    let summary = learner.fit().unwrap();
    assert_eq!(summary.stop_reason, StopReason::Epochs);
    assert_eq!(summary.steps, per_epoch);
    assert_eq!(summary.epochs_completed, 1);

    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.training.max_steps = 10_000;
    config.training.epochs = 100;
    // Updates far below the weights' rounding step leave the model, and so the validation
    // loss, exactly as they were: the first evaluation stays the best.
    config.training.learning_rate = 1e-12;
    config.training.min_lr = 1e-12;
    config.training.eval_every_steps = 5;
    config.training.early_stopping_patience = 2;
    let mut learner = Learner::new(config).unwrap();
    let summary = learner.fit().unwrap();
    assert_eq!(summary.stop_reason, StopReason::EarlyStopping);
    let best = summary.best.unwrap();
    assert_eq!(best.evals_without_improvement, 2);
    assert_eq!(best.step, 5);
    assert_eq!(summary.steps, 15);
}
