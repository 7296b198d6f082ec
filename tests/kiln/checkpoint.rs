//! The CheckpointManager: exact resume, policies, crash safety, hostile files.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use kiln::checkpoint::policy::Kind;
use kiln::checkpoint::sidecar::{CheckpointPaths, Sidecar};
use kiln::checkpoint::storage::{LocalFs, Storage, SyncWrite};
use kiln::checkpoint::{self, CheckpointManager};
use kiln::config::{BackendKind, Config};
use kiln::params::named_tensors;
use kiln::safetensors_io::digest_file;
use kiln::train::{Learner, StopReason};

use super::common::{copy_dir, small_corpus, tiny_config};

/// A tiny config whose epochs are short (about 14 steps), so runs cross epoch boundaries.
fn short_epoch_config(dir: &Path) -> Config {
    let mut config = tiny_config(dir);
    config.data.path = small_corpus(dir, 4_000);
    config.data.val_fraction = 0.2;
    config.training.batch_size = 6;
    config.training.max_steps = 50;
    config.training.epochs = 100;
    config.training.eval_every_steps = 7;
    config.training.log_every_steps = 3;
    config.checkpoint.save_every_steps = 5;
    config.checkpoint.save_every_epochs = 1;
    config.checkpoint.keep_top_k = 2;
    config
}

/// Final weights, optimizer moments (as host vectors) and metrics lines of a finished learner.
struct Outcome {
    weights: Vec<kiln::params::NamedTensor>,
    moments: Vec<(String, Vec<f32>, Vec<f32>)>,
    ema: Vec<(String, Vec<f32>)>,
    metrics: Vec<String>,
    optim_step: u64,
}

fn outcome(learner: &Learner) -> Outcome {
    let host = |t: &burn::tensor::Tensor<1>| t.to_data().convert::<f32>().try_into_vec::<f32>().unwrap();
    let metrics = std::fs::read_to_string(learner.config.output_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v.as_object_mut().unwrap().remove("tokens_per_sec");
            v.to_string()
        })
        .collect();
    Outcome {
        weights: named_tensors(learner.model()),
        moments: learner
            .optim
            .moments
            .iter()
            .map(|(n, m)| (n.clone(), host(&m.exp_avg), host(&m.exp_avg_sq)))
            .collect(),
        ema: learner
            .ema
            .as_ref()
            .map(|e| e.weights.iter().map(|(n, w)| (n.clone(), host(&w.value))).collect())
            .unwrap_or_default(),
        metrics,
        optim_step: learner.optim.step,
    }
}

fn assert_same(a: &Outcome, b: &Outcome, what: &str) {
    assert_eq!(a.optim_step, b.optim_step, "{what}: optimizer steps");
    assert_eq!(a.weights.len(), b.weights.len());
    for (x, y) in a.weights.iter().zip(&b.weights) {
        assert!(x == y, "{what}: weights of {} differ", x.name);
    }
    assert_eq!(a.moments.len(), b.moments.len());
    for (x, y) in a.moments.iter().zip(&b.moments) {
        assert!(x == y, "{what}: optimizer moments of {} differ", x.0);
    }
    assert!(a.ema == b.ema, "{what}: EMA weights differ");
    assert_eq!(a.metrics, b.metrics, "{what}: metrics.jsonl differs");
}

fn resume_case(backend: BackendKind, interrupt_at: usize, dropout: f64) {
    let full_dir = tempfile::tempdir().unwrap();
    let mut config = short_epoch_config(full_dir.path());
    config.training.backend = backend;
    config.model.dropout = dropout;
    config.training.ema_decay = Some(0.9);
    let mut full = Learner::new(config.clone()).unwrap();
    let per_epoch = full.loader.batches_per_epoch();
    assert!(per_epoch < 20 && interrupt_at % per_epoch != 0, "the interruption must fall mid-epoch");
    full.fit().unwrap();
    let expected = outcome(&full);
    drop(full);

    let dir = tempfile::tempdir().unwrap();
    let mut config = config;
    config.output_dir = dir.path().join("out");
    let mut first = Learner::new(config.clone()).unwrap();
    first.stop_after_step = Some(interrupt_at);
    let summary = first.fit().unwrap();
    assert_eq!(summary.stop_reason, StopReason::Interrupted);
    assert_eq!(summary.steps, interrupt_at);
    drop(first);

    let latest = config.checkpoint_dir().join("checkpoint_latest.safetensors");
    let mut resumed = Learner::resume(config, &latest).unwrap();
    assert_eq!(resumed.step, interrupt_at);
    let summary = resumed.fit().unwrap();
    assert_eq!(summary.steps, 50);
    assert_same(&expected, &outcome(&resumed), &format!("{backend:?}, interrupted at {interrupt_at}"));
}

#[test]
fn resume_mid_epoch_is_bit_exact_on_ndarray() {
    resume_case(BackendKind::Ndarray, 23, 0.0);
}

#[test]
fn resume_mid_epoch_is_bit_exact_on_flex_with_dropout() {
    resume_case(BackendKind::Flex, 31, 0.1);
}

#[test]
fn policies_keep_latest_best_epochs_and_the_top_k_steps() {
    let dir = tempfile::tempdir().unwrap();
    let config = short_epoch_config(dir.path());
    let ck_dir = config.checkpoint_dir();
    let mut learner = Learner::new(config).unwrap();
    let per_epoch = learner.loader.batches_per_epoch();
    learner.fit().unwrap();
    let history = learner.metrics.history.clone();
    drop(learner);

    let names: Vec<String> = checkpoint::list(&ck_dir).unwrap().into_iter().map(|l| l.name).collect();
    // Step checkpoints are saved every 5 steps with the latest val_loss at that time.
    let val_at = |step: usize| {
        history
            .iter()
            .filter(|r| r.step <= step)
            .filter_map(|r| r.val_loss)
            .next_back()
    };
    let mut candidates: Vec<(usize, f64)> = (1..=10)
        .map(|i| i * 5)
        .filter_map(|s| val_at(s).map(|v| (s, v)))
        .collect();
    candidates.sort_by(|a, b| a.1.partial_cmp(&b.1).unwrap().then(b.0.cmp(&a.0)));
    let mut kept_steps: Vec<usize> = candidates.iter().take(2).map(|c| c.0).collect();
    // Steps 1-4 have no val_loss yet and rank last; they can only be kept if fewer than 2 have one.
    kept_steps.sort();
    let mut expected: Vec<String> = vec!["checkpoint_latest".into(), "checkpoint_best_val_loss".into()];
    expected.extend((1..=50 / per_epoch).map(|e| format!("checkpoint_epoch_{e}")));
    expected.extend(kept_steps.iter().map(|s| format!("checkpoint_step_{s}")));
    expected.sort();
    assert_eq!(names, expected);

    let best = Sidecar::read(&CheckpointPaths::new(&ck_dir, "checkpoint_best_val_loss").sidecar).unwrap();
    let min = history.iter().filter_map(|r| r.val_loss).fold(f64::INFINITY, f64::min);
    assert_eq!(best.metrics["val_loss"], min);
    let latest = checkpoint::require_latest(&ck_dir).unwrap();
    assert_eq!(latest.global_step, 50);
    for listed in checkpoint::list(&ck_dir).unwrap() {
        checkpoint::verify(&listed.paths).unwrap_or_else(|e| panic!("{}: {e}", listed.name));
    }
}

#[test]
fn the_sidecar_carries_everything_the_spec_names() {
    let dir = tempfile::tempdir().unwrap();
    let config = short_epoch_config(dir.path());
    let ck_dir = config.checkpoint_dir();
    Learner::new(config).unwrap().fit().unwrap();
    let text = std::fs::read_to_string(ck_dir.join("checkpoint_latest.meta.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    for key in [
        "format_version", "kind", "epoch", "global_step", "data_position", "rng", "lr_schedule",
        "optimizer", "metrics", "best_metric", "config", "created_at", "kiln_version", "backend",
        "files", "metrics_history", "early_stopping",
    ] {
        assert!(!v[key].is_null(), "sidecar lacks {key}");
    }
    assert_eq!(v["kind"], "latest");
    assert_eq!(v["global_step"], 50);
    assert_eq!(v["optimizer"]["step"], 50);
    assert_eq!(v["best_metric"]["name"], "val_loss");
    assert_eq!(v["best_metric"]["mode"], "min");
    assert!(chrono::DateTime::parse_from_rfc3339(v["created_at"].as_str().unwrap()).is_ok());
    let files = v["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    for f in files {
        let digest = digest_file(&ck_dir.join(f["name"].as_str().unwrap())).unwrap();
        assert_eq!(f["bytes"], digest.bytes);
        assert_eq!(f["sha256"], digest.sha256.as_str());
    }
    // The weights file is a plain Hugging Face-style safetensors file.
    let weights = kiln::safetensors_io::SafetensorsFile::open(&ck_dir.join("checkpoint_latest.safetensors")).unwrap();
    assert_eq!(weights.metadata()["format"], "pt");
    assert!(weights.contains("model.layers.0.self_attn.q_proj.weight"));
    let optim = kiln::safetensors_io::SafetensorsFile::open(&ck_dir.join("checkpoint_latest.optim.safetensors")).unwrap();
    assert!(optim.contains("exp_avg.model.layers.0.self_attn.q_proj.weight"));
    assert!(optim.contains("exp_avg_sq.lm_head.weight"));

    // Metrics read back bit for bit: the best metric decides what a resumed run keeps. (A
    // 17-digit value like this one came back one ulp off before serde_json's
    // float_roundtrip parser was enabled.)
    let path = ck_dir.join("checkpoint_latest.meta.json");
    let mut sidecar = Sidecar::read(&path).unwrap();
    let awkward = [2.9820950031280518, 0.1 + 0.2, 1e-300 / 3.0, f64::MAX, 5e-324];
    for (i, v) in awkward.iter().enumerate() {
        sidecar.metrics.insert(format!("m{i}"), *v);
    }
    std::fs::write(&path, sidecar.to_json()).unwrap();
    let back = Sidecar::read(&path).unwrap();
    for (i, v) in awkward.iter().enumerate() {
        assert_eq!(back.metrics[&format!("m{i}")].to_bits(), v.to_bits(), "metric {v:e} changed in the sidecar");
    }
}

#[test]
fn async_and_sync_saves_write_identical_files() {
    let mut files = Vec::new();
    for async_save in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = short_epoch_config(dir.path());
        config.checkpoint.async_save = async_save;
        config.training.max_steps = 20;
        let ck_dir = config.checkpoint_dir();
        Learner::new(config).unwrap().fit().unwrap();
        let mut set = Vec::new();
        for listed in checkpoint::list(&ck_dir).unwrap() {
            let weights = std::fs::read(&listed.paths.weights).unwrap();
            let optim = std::fs::read(&listed.paths.optim).unwrap();
            let mut sidecar = listed.sidecar.unwrap();
            // Wall-clock fields differ between any two runs.
            sidecar.created_at.clear();
            sidecar.started_at.clear();
            sidecar.train_seconds = 0.0;
            for r in &mut sidecar.metrics_history {
                r.tokens_per_sec = None;
            }
            sidecar.config.checkpoint.async_save = true;
            sidecar.config.output_dir = PathBuf::new();
            sidecar.config.data.path = PathBuf::new();
            sidecar.config.data.cache_dir = PathBuf::new();
            set.push((listed.name, weights, optim, sidecar));
        }
        files.push(set);
    }
    assert_eq!(files[0].len(), files[1].len());
    for (a, b) in files[0].iter().zip(&files[1]) {
        assert_eq!(a.0, b.0);
        assert!(a.1 == b.1, "{}: weights differ between async and sync saves", a.0);
        assert!(a.2 == b.2, "{}: optimizer files differ", a.0);
        assert_eq!(a.3, b.3, "{}: sidecars differ", a.0);
    }
}

#[test]
fn a_second_trainer_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config = short_epoch_config(dir.path());
    let first = Learner::new(config.clone()).unwrap();
    let err = Learner::new(config.clone()).err().expect("second learner must fail").to_string();
    assert!(err.contains("another kiln process"), "{err}");
    drop(first);
    Learner::new(config).unwrap();
}

/// A child process being started by another thread holds a copy of every open descriptor,
/// the run's lock among them, until it execs. Here one holds it on for 300 ms after the
/// trainer is dropped, as a slow `exec` on a loaded machine would: the next trainer waits for
/// it rather than refusing a directory nobody trains in.
#[test]
fn a_lock_held_on_by_a_starting_child_process_is_waited_for() {
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    let config = short_epoch_config(dir.path());
    let first = Learner::new(config.clone()).unwrap();
    let lock_path = config.output_dir.join(".kiln.lock").canonicalize().unwrap();
    let fd: i32 = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| e.ok())
        .find(|e| std::fs::read_link(e.path()).is_ok_and(|target| target == lock_path))
        .map(|e| e.file_name().to_str().unwrap().parse().unwrap())
        .expect("the learner holds its lock file open");
    let mut command = std::process::Command::new("sleep");
    command.arg("0.3");
    // SAFETY: fcntl is async-signal-safe; it only clears close-on-exec on the lock's descriptor.
    unsafe {
        command.pre_exec(move || {
            if libc::fcntl(fd, libc::F_SETFD, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().unwrap();
    drop(first);
    let second = Learner::new(config.clone());
    child.wait().unwrap();
    second.unwrap();
}

#[test]
fn a_fresh_run_refuses_a_directory_with_another_runs_checkpoints() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = short_epoch_config(dir.path());
    config.training.max_steps = 3;
    Learner::new(config.clone()).unwrap().fit().unwrap();
    let before = digests(&config.checkpoint_dir());
    let err = format!("{:#}", Learner::new(config.clone()).err().expect("must refuse"));
    assert!(err.contains("already holds checkpoints") && err.contains("--resume"), "{err}");
    assert_eq!(digests(&config.checkpoint_dir()), before);
}

#[test]
fn resuming_into_a_different_model_shape_names_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = short_epoch_config(dir.path());
    config.training.max_steps = 5;
    Learner::new(config.clone()).unwrap().fit().unwrap();
    let latest = config.checkpoint_dir().join("checkpoint_latest.safetensors");
    config.model.num_layers = 3;
    let err = format!("{:#}", Learner::resume(config, &latest).err().unwrap());
    assert!(err.contains("model.num_layers: checkpoint 2, config 3"), "{err}");
}

/// A storage that fails with "no space left" at its `fail_at`-th operation from the last reset.
struct FailingFs {
    ops: AtomicUsize,
    fail_at: AtomicUsize,
}

impl FailingFs {
    fn leaked() -> &'static FailingFs {
        Box::leak(Box::new(FailingFs {
            ops: AtomicUsize::new(0),
            fail_at: AtomicUsize::new(usize::MAX),
        }))
    }

    fn arm(&self, fail_at: usize) {
        self.ops.store(0, Ordering::SeqCst);
        self.fail_at.store(fail_at, Ordering::SeqCst);
    }

    fn tick(&self) -> std::io::Result<()> {
        if self.ops.fetch_add(1, Ordering::SeqCst) == self.fail_at.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }
}

struct FailingFile {
    inner: Box<dyn SyncWrite>,
    fs: &'static FailingFs,
}

impl std::io::Write for FailingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.fs.tick()?;
        self.inner.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

impl SyncWrite for FailingFile {
    fn sync(&mut self) -> std::io::Result<()> {
        self.fs.tick()?;
        self.inner.sync()
    }
}

struct Failing(&'static FailingFs);

impl Storage for Failing {
    fn create(&self, path: &Path) -> std::io::Result<Box<dyn SyncWrite>> {
        self.0.tick()?;
        Ok(Box::new(FailingFile { inner: LocalFs.create(path)?, fs: self.0 }))
    }
    fn rename(&self, from: &Path, to: &Path) -> std::io::Result<()> {
        self.0.tick()?;
        LocalFs.rename(from, to)
    }
    fn hard_link(&self, original: &Path, link: &Path) -> std::io::Result<()> {
        self.0.tick()?;
        LocalFs.hard_link(original, link)
    }
    fn remove(&self, path: &Path) -> std::io::Result<()> {
        self.0.tick()?;
        LocalFs.remove(path)
    }
    fn sync_dir(&self, dir: &Path) -> std::io::Result<()> {
        self.0.tick()?;
        LocalFs.sync_dir(dir)
    }
}

/// Name and SHA-256 of every visible file in `dir`.
fn digests(dir: &Path) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), digest_file(&p).unwrap().sha256))
        .collect();
    out.sort();
    out
}

#[test]
fn a_failing_save_at_any_operation_leaves_earlier_checkpoints_intact() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = short_epoch_config(dir.path());
    config.training.max_steps = 10;
    config.checkpoint.keep_top_k = 1;
    let ck_dir = config.checkpoint_dir();
    let mut learner = Learner::new(config).unwrap();
    learner.fit().unwrap();
    let policy = learner.checkpoints.policy().clone();
    // A save that replaces latest and best, adds a step checkpoint and deletes the older one.
    let kinds = || vec![Kind::Latest, Kind::Best, Kind::Step { step: 15 }];
    let pristine = dir.path().join("pristine");
    copy_dir(&ck_dir, &pristine);
    let before = digests(&pristine);

    let fs = FailingFs::leaked();
    let mut m = CheckpointManager::open(&ck_dir, policy.clone(), Arc::new(Failing(fs)), false).unwrap();
    fs.arm(usize::MAX);
    m.save(kinds(), learner.snapshot()).unwrap();
    let total = fs.ops.load(Ordering::SeqCst);
    drop(m);
    assert!(total > 20, "a save should take many operations, counted {total}");
    assert!(digests(&ck_dir) != before);

    let mut reported = 0;
    for fail_at in 0..total {
        copy_dir(&pristine, &ck_dir);
        let mut m = CheckpointManager::open(&ck_dir, policy.clone(), Arc::new(Failing(fs)), false).unwrap();
        fs.arm(fail_at);
        let result = m.save(kinds(), learner.snapshot());
        drop(m);
        // A failure while removing a temporary file is harmless (recovery removes it) and
        // not reported; every other one is.
        if let Err(err) = result {
            let msg = format!("{err:#}");
            assert!(msg.contains("os error 28"), "op {fail_at}: {msg}");
            reported += 1;
        }

        // Every checkpoint on disk verifies, straight away and after the next start's recovery,
        // and every earlier one still exists (untouched, or replaced whole by the new state).
        for pass in ["after the failure", "after recovery"] {
            for listed in checkpoint::list(&ck_dir).unwrap() {
                checkpoint::verify(&listed.paths).unwrap_or_else(|e| {
                    panic!("failure at op {fail_at}, {pass}: {} does not verify: {e}", listed.name)
                });
            }
            checkpoint::require_latest(&ck_dir).unwrap();
            let now: Vec<String> = digests(&ck_dir).into_iter().map(|d| d.0).collect();
            // Step checkpoints may go by policy once the new one is complete; nothing else may.
            for (name, _) in before.iter().filter(|(n, _)| !n.starts_with("checkpoint_step_")) {
                assert!(now.contains(name), "failure at op {fail_at}, {pass}: {name} is gone");
            }
            assert!(now.iter().any(|n| n.starts_with("checkpoint_step_")), "op {fail_at}: no step checkpoint left");
            CheckpointManager::open(&ck_dir, policy.clone(), Arc::new(LocalFs), false).unwrap();
        }
        let debris: Vec<String> = std::fs::read_dir(&ck_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with('.'))
            .collect();
        assert!(debris.is_empty(), "failure at op {fail_at}: debris left after recovery: {debris:?}");
    }
    assert!(reported * 4 >= total * 3, "only {reported} of {total} failures were reported");
}

#[test]
fn a_background_save_failure_is_reported_by_the_next_poll() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = short_epoch_config(dir.path());
    config.training.max_steps = 2;
    let mut learner = Learner::new(config).unwrap();
    learner.fit().unwrap();
    let fs = FailingFs::leaked();
    let ck_dir = dir.path().join("async-ck");
    let policy = learner.checkpoints.policy().clone();
    let mut m = CheckpointManager::open(&ck_dir, policy, Arc::new(Failing(fs)), true).unwrap();
    fs.arm(5);
    m.save(vec![Kind::Latest], learner.snapshot()).unwrap(); // runs in the background
    let started = std::time::Instant::now();
    let err = loop {
        match m.poll() {
            Err(e) => break format!("{e:#}"),
            Ok(()) if started.elapsed() < std::time::Duration::from_secs(30) => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            Ok(()) => panic!("the failed background save was never reported"),
        }
    };
    assert!(err.contains("os error 28"), "{err}");
    // Reported once; the manager is usable again.
    m.poll().unwrap();
}

#[test]
fn train_loss_tracked_before_the_first_log_line_gives_a_finite_best() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = tiny_config(dir.path());
    config.checkpoint.metric = kiln::config::Metric::TrainLoss;
    config.training.eval_every_steps = 2;
    config.training.log_every_steps = 5;
    config.training.max_steps = 12;
    let mut learner = Learner::new(config.clone()).unwrap();
    let summary = learner.fit().unwrap();
    let best = summary.best.expect("a best value");
    assert!(best.value.is_finite() && best.value > 0.0, "{best:?}");
    let ck = checkpoint::load(&config.checkpoint_dir().join("checkpoint_best_train_loss.safetensors")).unwrap();
    let recorded = ck.sidecar.best_metric.unwrap();
    assert_eq!(recorded.name, kiln::config::Metric::TrainLoss);
    assert!(recorded.value.is_finite());
    // The first evaluation (step 2) came before any log line: its best is the mean of the
    // two steps' losses, not NaN.
    assert!(learner.exported.iter().any(|b| b.file_name().unwrap().to_string_lossy().contains("epoch")));
}
