//! Data-parallel training over MPI with real processes: `kiln train --nproc 2` (Open MPI's
//! `mpirun`, which README's test set-up installs) against one process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln::checkpoint;
use kiln::metrics::{MetricRecord, read_jsonl};
use kiln::train::Learner;

use super::common::{assert_same_losses, tiny_config};

/// The tiny config for 20 steps with a global batch of 16, as a file in `dir`; the decay is
/// pinned to 20 steps so that a run stopped early follows the same schedule.
fn write_config(dir: &Path, batch_size: usize, accum: usize) -> (kiln::config::Config, PathBuf) {
    let mut config = tiny_config(dir);
    config.training.batch_size = batch_size;
    config.training.grad_accum_steps = accum;
    config.training.max_steps = 20;
    config.training.lr_decay_steps = Some(20);
    config.checkpoint.save_every_steps = 5;
    let path = dir.join("run.toml");
    std::fs::write(&path, config.to_toml_string()).unwrap();
    (config, path)
}

fn kiln_train(config: &Path, extra: &[&str]) -> Output {
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "--config"])
        .arg(config)
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(output.status.success(), "kiln train {extra:?}: {}", String::from_utf8_lossy(&output.stderr));
    output
}

fn records(out: &Path) -> Vec<MetricRecord> {
    read_jsonl(&out.join("metrics.jsonl")).unwrap()
}

fn file_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}

/// Two processes of 8 windows train as one process of 16 does: every logged training and
/// validation loss over 20 steps agrees to 2e-4 relative, and the run writes exactly the
/// checkpoint files, whose sidecar records both processes.
#[test]
fn two_processes_of_8_train_as_one_of_16_and_write_the_same_checkpoints() {
    let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (config_one, _) = write_config(one.path(), 16, 1);
    Learner::new(config_one.clone()).unwrap().fit().unwrap();
    let (config_two, path_two) = write_config(two.path(), 8, 1);
    let output = kiln_train(&path_two, &["--nproc", "2"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("x 2 processes"), "{stderr}");

    let (a, b) = (records(&config_one.output_dir), records(&config_two.output_dir));
    assert!(a.iter().filter(|r| r.val_loss.is_some()).count() >= 2, "{a:?}");
    assert_same_losses(&a, &b, "1 x 16 against 2 x 8");
    assert_eq!(file_names(&config_one.checkpoint_dir()), file_names(&config_two.checkpoint_dir()));
    let latest = checkpoint::require_latest(&config_two.checkpoint_dir()).unwrap();
    assert_eq!((latest.world_size, latest.global_batch, latest.global_step), (2, Some(16), 20));
    checkpoint::load(&config_two.checkpoint_dir().join("checkpoint_latest.safetensors")).unwrap();
}

/// A checkpoint of 2 processes resumes on 1 (with the global batch kept by accumulation), and
/// one of 1 process on 2; either way the run continues as the uninterrupted one-process run.
/// A world that cannot keep the global batch is refused, saying how.
#[test]
fn checkpoints_resume_on_another_number_of_processes() {
    let whole = tempfile::tempdir().unwrap();
    let (config, _) = write_config(whole.path(), 16, 1);
    Learner::new(config.clone()).unwrap().fit().unwrap();
    let reference = records(&config.output_dir);

    // 2 processes to step 10, then 1 process of 8 x 2 to the end.
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = write_config(dir.path(), 8, 1);
    kiln_train(&path, &["--nproc", "2", "--set", "training.max_steps=10"]);
    let (config, path) = write_config(dir.path(), 8, 2);
    let latest = config.checkpoint_dir().join("checkpoint_latest.safetensors");
    kiln_train(&path, &["--resume", latest.to_str().unwrap()]);
    assert_same_losses(&reference, &records(&config.output_dir), "2 processes resumed on 1");

    // 1 process of 16 to step 10, then 2 processes of 8.
    let dir = tempfile::tempdir().unwrap();
    let (_, path) = write_config(dir.path(), 16, 1);
    kiln_train(&path, &["--set", "training.max_steps=10"]);
    let (config, path) = write_config(dir.path(), 8, 1);
    let latest = config.checkpoint_dir().join("checkpoint_latest.safetensors");
    let saved = tempfile::tempdir().unwrap();
    super::common::copy_dir(&config.checkpoint_dir(), saved.path());
    kiln_train(&path, &["--resume", latest.to_str().unwrap(), "--nproc", "2"]);
    assert_same_losses(&reference, &records(&config.output_dir), "1 process resumed on 2");
    assert_eq!(checkpoint::require_latest(&config.checkpoint_dir()).unwrap().world_size, 2);

    // 16 windows per step cannot be 2 processes of 16.
    super::common::copy_dir(saved.path(), &config.checkpoint_dir());
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "--config"])
        .arg(&path)
        .args(["--resume", latest.to_str().unwrap(), "--nproc", "2", "--set", "training.batch_size=16"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(stderr.contains("16 windows per optimizer step") && stderr.contains("must divide 16"), "{stderr}");
}

/// The pid of the rank `rank` training into `out` (found by its command line and MPI's
/// environment), waiting up to a minute for it to appear.
fn rank_pid(out: &Path, rank: usize) -> u32 {
    let wanted = format!("OMPI_COMM_WORLD_RANK={rank}");
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(60) {
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
            let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            let has = |haystack: &[u8], needle: &[u8]| haystack.split(|&b| b == 0).any(|s| s == needle);
            let in_run = String::from_utf8_lossy(&cmdline).contains(&*out.to_string_lossy());
            if in_run && has(&environ, wanted.as_bytes()) {
                return pid;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("no rank {rank} training into {}", out.display());
}

/// A long 2-process run, started; returns the launcher and the checkpoint directory once the
/// ranks have logged a few steps.
fn start_long_run(dir: &Path) -> (std::process::Child, PathBuf) {
    let (config, path) = write_config(dir, 8, 1);
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "--config"])
        .arg(&path)
        .args(["--nproc", "2", "--set", "training.max_steps=1000000", "--set", "training.epochs=100000"])
        .args(["--set", "checkpoint.save_every_steps=7", "--output-dir"])
        .arg(&config.output_dir)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = config.output_dir.join("metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 4 && started.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, config.checkpoint_dir())
}

/// A rank killed with SIGKILL stops the whole run, non-zero, within a minute (never a hang),
/// and the checkpoints on disk stay loadable. SIGTERM to one rank stops both at the same step:
/// one save of `checkpoint_latest` by rank 0, and exit 0.
#[test]
fn a_killed_rank_stops_the_run_and_sigterm_to_one_rank_saves_once_and_exits_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, ck_dir) = start_long_run(dir.path());
    let pid = rank_pid(&dir.path().join("out"), 1);
    assert!(Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap().success());
    let killed = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(killed.elapsed() < Duration::from_secs(60), "the run did not stop within 60 s of a rank's death");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success());
    let latest = checkpoint::require_latest(&ck_dir).unwrap();
    checkpoint::load(&ck_dir.join("checkpoint_latest.safetensors")).unwrap();
    assert!(latest.global_step >= 7);

    let dir = tempfile::tempdir().unwrap();
    let (child, ck_dir) = start_long_run(dir.path());
    let pid = rank_pid(&dir.path().join("out"), 1);
    assert!(Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("interrupted; checkpoint_latest saved"), "{stderr}");
    let latest = checkpoint::require_latest(&ck_dir).unwrap();
    assert_eq!(latest.world_size, 2);
    // The save was of the step both ranks stopped at: the last one logged.
    let logged = read_jsonl(&dir.path().join("out/metrics.jsonl")).unwrap();
    assert!(logged.iter().all(|r| r.step <= latest.global_step));
    checkpoint::load(&ck_dir.join("checkpoint_latest.safetensors")).unwrap();
}
