//! Crash safety with real processes: SIGKILL at random moments (saves included), and Ctrl-C.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln::checkpoint;
use rand::{Rng, SeedableRng};

use super::common::small_corpus;

/// A run that saves a checkpoint (latest + step) every step, so kills land inside saves often.
fn write_config(dir: &Path) -> std::path::PathBuf {
    let corpus = small_corpus(dir, 30_000);
    let text = format!(
        "output_dir = {out:?}\n\
         [model]\nhidden_size = 64\nnum_layers = 2\nnum_heads = 4\nnum_kv_heads = 2\n\
         intermediate_size = 128\nmax_position_embeddings = 32\n\
         [data]\npath = {corpus:?}\nseq_len = 32\ncache_dir = {cache:?}\n\
         [training]\nbatch_size = 4\nmax_steps = 100000\nepochs = 1000\neval_every_steps = 3\n\
         eval_batches = 1\nwarmup_steps = 2\n\
         [checkpoint]\nsave_every_steps = 1\nkeep_top_k = 2\n",
        out = dir.join("out"),
        cache = dir.join("cache"),
    );
    let path = dir.join("crash.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

#[test]
fn sigkill_at_random_moments_always_leaves_a_loadable_latest() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let ck_dir = dir.path().join("out/checkpoints");
    let latest = ck_dir.join("checkpoint_latest.safetensors");
    let latest_sidecar = ck_dir.join("checkpoint_latest.meta.json");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(20261122);
    let mut last_step = 0;
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(150);
    while kills < 15 && Instant::now() < deadline {
        let mut cmd = kiln();
        cmd.args(["train", "--config"]).arg(&config);
        if latest_sidecar.exists() {
            cmd.arg("--resume").arg(&latest);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
        // Wait for the first save of this run, then kill at a random moment after it.
        let started = Instant::now();
        while !latest_sidecar.exists() && started.elapsed() < Duration::from_secs(60) {
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(rng.random_range(50..1500)));
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        kills += 1;

        // Before any recovery runs: latest loads (falling back to its complete backup if the
        // kill fell inside its replacement), and every visible checkpoint verifies.
        let ck = checkpoint::load(&latest)
            .unwrap_or_else(|e| panic!("after kill {kills}: checkpoint_latest does not load: {e:#}"));
        let step = ck.sidecar.global_step;
        assert!(step >= last_step, "after kill {kills}: latest went back from {last_step} to {step}");
        last_step = step;
        for listed in checkpoint::list(&ck_dir).unwrap() {
            let name = &listed.name;
            if name == "checkpoint_latest" {
                continue; // may be mid-replacement; covered by load() above
            }
            if let Err(e) = checkpoint::verify(&listed.paths) {
                // A named set may be mid-replacement too; then its backup must be complete.
                let backup = ck_dir.join(format!(".{name}.meta.json.prev"));
                assert!(backup.exists(), "after kill {kills}: {name} is broken without a backup: {e}");
            }
        }
    }
    assert!(kills >= 8, "only {kills} kills in the time allowed");
    assert!(last_step > 0);

    // A final run recovers: debris is removed and every checkpoint verifies.
    let output = kiln()
        .args(["train", "--config"])
        .arg(&config)
        .arg("--resume")
        .arg(&latest)
        .args(["--set", &format!("training.max_steps={}", last_step + 2)])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for entry in std::fs::read_dir(&ck_dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().into_owned();
        assert!(!name.starts_with('.'), "debris left: {name}");
    }
    for listed in checkpoint::list(&ck_dir).unwrap() {
        checkpoint::verify(&listed.paths).unwrap_or_else(|e| panic!("{}: {e}", listed.name));
    }
    assert_eq!(checkpoint::require_latest(&ck_dir).unwrap().global_step, last_step + 2);
}

#[test]
fn ctrl_c_and_sigterm_finish_the_step_save_latest_and_exit_cleanly() {
    for signal in ["-INT", "-TERM"] {
        interrupt_with(signal);
    }
}

fn interrupt_with(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path());
    let ck_dir = dir.path().join("out/checkpoints");
    let child = kiln()
        .args(["train", "--config"])
        .arg(&config)
        .args(["--set", "checkpoint.save_every_steps=0", "--set", "training.eval_every_steps=1000000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let it train a little; no save is due before the signal (no step saves, no evaluations).
    let metrics = dir.path().join("out/metrics.jsonl");
    let started = Instant::now();
    while std::fs::read_to_string(&metrics).map_or(0, |m| m.lines().count()) < 3
        && started.elapsed() < Duration::from_secs(60)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!ck_dir.join("checkpoint_latest.meta.json").exists());
    let status = Command::new("kill").args([signal, &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{signal}: {stderr}");
    assert!(stderr.contains("interrupted"), "{signal}: {stderr}");
    let latest = checkpoint::require_latest(&ck_dir).unwrap();
    assert!(latest.global_step > 0);
}
