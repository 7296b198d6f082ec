use kiln::config::BackendKind;
use kiln::metrics::read_jsonl;
use kiln::params::named_tensors;
use kiln::train::{Learner, StopReason};

use super::common::{assert_same_losses, tiny_config, without_throughput};

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

/// `training.precision = "bf16"` on flex: Burn's ops in bf16 over fp32 master weights. bf16
/// keeps 8 significant bits, so a run follows the fp32 run to rounding, not exactly: over 30
/// steps of the tiny config every logged loss (training and validation) stays within 3% of
/// fp32's, the loss falls as fp32's does, and yet the weights differ (bf16 really ran). A bf16
/// run stopped and resumed ends bit for bit where the uninterrupted one did: checkpoints hold
/// the fp32 weights and moments, and the bf16 steps are deterministic on the CPU.
#[test]
fn bf16_training_follows_fp32_and_resumes_bit_exact() {
    use kiln::config::Precision;
    let losses = |out: &std::path::Path| -> Vec<f64> {
        read_jsonl(&out.join("metrics.jsonl")).unwrap().iter().filter_map(|r| r.train_loss.or(r.val_loss)).collect()
    };
    let run = |precision: Precision, stop: Option<usize>| {
        let dir = tempfile::tempdir().unwrap();
        let mut config = tiny_config(dir.path());
        config.training.precision = precision;
        config.checkpoint.save_every_steps = 10;
        let mut learner = Learner::new(config.clone()).unwrap();
        learner.stop_after_step = stop;
        learner.fit().unwrap();
        if stop.is_some() {
            drop(learner);
            learner = Learner::resume(config.clone(), &config.checkpoint_dir().join("checkpoint_latest.safetensors")).unwrap();
            learner.fit().unwrap();
        }
        let weights = named_tensors(learner.model());
        (losses(&config.output_dir), weights, dir)
    };
    let (fp32, fp32_weights, _a) = run(Precision::Fp32, None);
    let (bf16, bf16_weights, _b) = run(Precision::Bf16, None);
    assert_eq!(fp32.len(), bf16.len());
    for (f, b) in fp32.iter().zip(&bf16) {
        assert!((f - b).abs() <= 0.03 * f, "bf16 loss {b} against fp32 {f}:\n{bf16:?}\n{fp32:?}");
    }
    assert!(bf16.last().unwrap() < &(bf16[0] - 0.5), "bf16 loss did not fall: {bf16:?}");
    assert!(fp32_weights != bf16_weights, "bf16 computed exactly what fp32 did");
    for w in &bf16_weights {
        assert!(w.values.iter().all(|v| v.is_finite()), "{}", w.name);
    }
    let (resumed, resumed_weights, _c) = run(Precision::Bf16, Some(13));
    assert!(resumed_weights == bf16_weights, "a resumed bf16 run ends elsewhere");
    assert_eq!(resumed[resumed.len() - 3..], bf16[bf16.len() - 3..]);
}

/// fp16 with dynamic loss scaling, on flex. Started at a loss scale of 2^30, the scaled
/// gradients overflow fp16: such a step changes nothing (weights, AdamW's step count) and halves
/// the scale, until it fits and training proceeds; `metrics.jsonl` logs the scale and the
/// skipped steps. The loss falls and tracks fp32's within 3% once the scale fits, and a run
/// stopped and resumed ends bit for bit where the uninterrupted one did, scale included (the
/// sidecar carries it).
#[test]
fn fp16_loss_scaling_skips_overflowing_steps_and_resumes_bit_exact() {
    use kiln::config::Precision;
    use kiln::loss_scale::LossScale;
    let huge = 2f64.powi(30);
    let fp16_config = |dir: &std::path::Path| {
        let mut config = tiny_config(dir);
        config.training.precision = Precision::Fp16;
        config.training.max_steps = 40;
        config.checkpoint.save_every_steps = 10;
        config
    };

    // One overflowing step, by hand.
    let dir = tempfile::tempdir().unwrap();
    let mut learner = Learner::new(fp16_config(dir.path())).unwrap();
    assert_eq!(learner.loss_scale, Some(LossScale::default()));
    learner.loss_scale = Some(LossScale::new(huge));
    let before = named_tensors(learner.model());
    let batch = learner.loader.next_batch().unwrap();
    let (loss, norm) = learner.train_step(&batch).unwrap();
    assert!(loss.is_finite() && !norm.is_finite(), "loss {loss}, gradient norm {norm}");
    assert!(named_tensors(learner.model()) == before, "a skipped step changed the weights");
    assert_eq!(learner.loss_scale.unwrap(), LossScale { scale: huge / 2.0, good_steps: 0, skipped_steps: 1 });
    assert_eq!(learner.step, 1);
    drop(learner);

    let run = |stop: Option<usize>| {
        let dir = tempfile::tempdir().unwrap();
        let config = fp16_config(dir.path());
        let mut learner = Learner::new(config.clone()).unwrap();
        learner.loss_scale = Some(LossScale::new(huge));
        learner.stop_after_step = stop;
        learner.fit().unwrap();
        if stop.is_some() {
            drop(learner);
            learner = Learner::resume(config.clone(), &config.checkpoint_dir().join("checkpoint_latest.safetensors")).unwrap();
            learner.fit().unwrap();
        }
        let records = read_jsonl(&config.output_dir.join("metrics.jsonl")).unwrap();
        (records, named_tensors(learner.model()), learner.loss_scale.unwrap(), dir)
    };
    let (records, weights, scale, _a) = run(None);
    assert!(scale.skipped_steps >= 2 && scale.scale < huge / 2.0, "{scale:?}");
    let logged: Vec<_> = records.iter().filter(|r| r.train_loss.is_some()).collect();
    assert!(logged.iter().all(|r| r.loss_scale.is_some()), "every log line has the scale");
    assert_eq!(logged.iter().filter_map(|r| r.skipped_steps).sum::<u64>(), scale.skipped_steps);
    let train: Vec<f64> = logged.iter().filter_map(|r| r.train_loss).collect();
    assert!(train.last().unwrap() < &(train[0] - 0.5), "fp16 loss did not fall: {train:?}");
    for w in &weights {
        assert!(w.values.iter().all(|v| v.is_finite()), "{}", w.name);
    }
    let (resumed_records, resumed, resumed_scale, _b) = run(Some(13));
    assert!(resumed == weights, "a resumed fp16 run ends elsewhere");
    assert_eq!(resumed_scale, scale);
    // The same log, but for wall-clock throughput.
    assert_eq!(without_throughput(&resumed_records), without_throughput(&records));

    // With a scale that fits from the start, fp16 follows fp32 as bf16 does.
    let (dir_a, dir_b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let val = |dir: &std::path::Path, precision: Precision| {
        let mut config = tiny_config(dir);
        config.training.precision = precision;
        Learner::new(config.clone()).unwrap().fit().unwrap();
        read_jsonl(&config.output_dir.join("metrics.jsonl")).unwrap().iter().filter_map(|r| r.train_loss.or(r.val_loss)).collect::<Vec<f64>>()
    };
    let (fp32, fp16) = (val(dir_a.path(), Precision::Fp32), val(dir_b.path(), Precision::Fp16));
    assert_eq!(fp32.len(), fp16.len());
    for (f, h) in fp32.iter().zip(&fp16) {
        assert!((f - h).abs() <= 0.03 * f, "fp16 loss {h} against fp32 {f}:\n{fp16:?}\n{fp32:?}");
    }
}

/// Precisions a backend cannot compute in are refused, naming the key, before anything runs.
#[test]
fn a_precision_the_backend_lacks_is_refused_naming_the_key() {
    use kiln::config::Precision;
    let mut cases = vec![
        (BackendKind::Ndarray, Precision::Bf16, "the ndarray backend cannot compute in bf16"),
        (BackendKind::Ndarray, Precision::Fp16, "the ndarray backend cannot compute in fp16"),
    ];
    // WGSL has no bf16 type, so no wgpu adapter (lavapipe here) computes in it.
    if cfg!(feature = "wgpu") {
        cases.push((BackendKind::Wgpu, Precision::Bf16, "the wgpu backend cannot compute in bf16"));
    }
    for (backend, precision, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let mut config = tiny_config(dir.path());
        config.training.backend = backend;
        config.training.precision = precision;
        let err = format!("{:#}", Learner::new(config).err().expect("refused"));
        assert!(err.contains("training.precision") && err.contains(expected), "{err}");
        assert!(!dir.path().join("cache").exists(), "nothing was prepared: {err}");
    }
}

/// The losses logged (training, then validation, in file order) and the run's final weights,
/// for the tiny config with `batch_size` windows per micro-step and `accum` micro-steps.
fn accumulating_run(
    dir: &std::path::Path,
    batch_size: usize,
    accum: usize,
    stop: Option<usize>,
) -> (Vec<kiln::metrics::MetricRecord>, Vec<kiln::params::NamedTensor>) {
    let mut config = tiny_config(dir);
    config.training.batch_size = batch_size;
    config.training.grad_accum_steps = accum;
    config.training.max_steps = 20;
    config.checkpoint.save_every_steps = 5;
    let mut learner = Learner::new(config.clone()).unwrap();
    learner.stop_after_step = stop;
    learner.fit().unwrap();
    let records = read_jsonl(&config.output_dir.join("metrics.jsonl")).unwrap();
    (records, named_tensors(learner.model()))
}

/// A global batch of 16 windows gives the same run whether it is one micro-step of 16, two of
/// 8 or four of 4: the loader serves the same windows (it deals in global batches), each
/// micro-batch's gradient is of its share of the mean loss, and validation evaluates the same
/// windows in micro-batches. Every logged training and validation loss over 20 steps agrees to
/// 2e-4 relative; the weights differ only by rounding.
#[test]
fn gradient_accumulation_gives_the_global_batchs_run_however_it_is_split() {
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let (whole, whole_weights) = accumulating_run(dirs[0].path(), 16, 1, None);
    let (halves, _) = accumulating_run(dirs[1].path(), 8, 2, None);
    let (quarters, quarter_weights) = accumulating_run(dirs[2].path(), 4, 4, None);
    assert!(whole.iter().filter(|r| r.val_loss.is_some()).count() >= 2, "{whole:?}");
    assert_same_losses(&whole, &halves, "1 x 16 against 2 x 8");
    assert_same_losses(&whole, &quarters, "1 x 16 against 4 x 4");
    let train: Vec<f64> = whole.iter().filter_map(|r| r.train_loss).collect();
    assert!(train.last().unwrap() < &(train[0] - 0.3), "the loss did not fall: {train:?}");
    for (a, b) in whole_weights.iter().zip(&quarter_weights) {
        let worst = a.values.iter().zip(&b.values).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(worst < 1e-3, "{}: weights differ by {worst}", a.name);
    }
    // The checkpoint says how many windows a step took.
    let sidecar = kiln::checkpoint::sidecar::Sidecar::read(&dirs[2].path().join("out/checkpoints/checkpoint_latest.meta.json")).unwrap();
    assert_eq!((sidecar.global_batch, sidecar.world_size), (Some(16), 1));
}

/// An accumulating run stopped mid-way and resumed ends bit for bit where the uninterrupted
/// one did. Its checkpoint also resumes with the global batch split otherwise (8 x 2 from
/// 4 x 4), continuing the same data, and is refused, with the way out named, when the global
/// batch would change.
#[test]
fn an_accumulating_run_resumes_bit_exact_and_on_another_split_of_its_global_batch() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (records, weights) = accumulating_run(a.path(), 4, 4, None);
    accumulating_run(b.path(), 4, 4, Some(7));
    let resume = |batch_size: usize, accum: usize| {
        let mut config = tiny_config(b.path());
        config.training.batch_size = batch_size;
        config.training.grad_accum_steps = accum;
        config.training.max_steps = 20;
        config.checkpoint.save_every_steps = 5;
        let out = config.output_dir.clone();
        let checkpoint = config.checkpoint_dir().join("checkpoint_latest.safetensors");
        Learner::resume(config, &checkpoint).map(|mut learner| {
            learner.fit().unwrap();
            (read_jsonl(&out.join("metrics.jsonl")).unwrap(), named_tensors(learner.model()))
        })
    };
    let saved = tempfile::tempdir().unwrap();
    super::common::copy_dir(&b.path().join("out/checkpoints"), saved.path());

    let (resumed_records, resumed_weights) = resume(4, 4).unwrap();
    assert!(resumed_weights == weights, "a resumed accumulating run ends elsewhere");
    assert_eq!(without_throughput(&resumed_records), without_throughput(&records));

    super::common::copy_dir(saved.path(), &b.path().join("out/checkpoints"));
    let (resplit_records, _) = resume(8, 2).unwrap();
    assert_same_losses(&records, &resplit_records, "4 x 4 resumed as 8 x 2");

    super::common::copy_dir(saved.path(), &b.path().join("out/checkpoints"));
    let err = format!("{:#}", resume(8, 1).err().expect("a changed global batch is refused"));
    assert!(err.contains("16 windows per optimizer step") && err.contains("training.grad_accum_steps = 2"), "{err}");
}
