//! The `kiln` binary, run as a user would.

use std::process::Command;

use super::common::small_corpus;

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

fn write_config(dir: &std::path::Path, body: &str) -> std::path::PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("run{n}.toml"));
    std::fs::write(&path, body).unwrap();
    path
}

#[test]
fn train_runs_end_to_end_with_overrides() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 40_000);
    let cache = dir.path().join("cache");
    let config = write_config(
        dir.path(),
        &format!(
            "[model]\nhidden_size = 32\nnum_layers = 1\nnum_heads = 2\nnum_kv_heads = 1\n\
             intermediate_size = 64\nmax_position_embeddings = 32\n\
             [data]\npath = {corpus:?}\nseq_len = 16\ncache_dir = {cache:?}\n\
             [training]\nbatch_size = 4\nmax_steps = 1000\neval_every_steps = 4\neval_batches = 1\n"
        ),
    );
    let out = dir.path().join("custom-out");
    let output = kiln()
        .args(["train", "--config"])
        .arg(&config)
        .args(["--set", "training.max_steps=8", "--backend", "ndarray", "--output-dir"])
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kiln train failed:\n{stderr}");
    assert!(stderr.contains("done after 8 steps"), "{stderr}");
    let resolved = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(resolved.contains("backend = \"ndarray\""), "{resolved}");
    assert!(resolved.contains("max_steps = 8"), "{resolved}");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("val_loss")).count(), 2);
}

#[test]
fn user_errors_exit_nonzero_with_one_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    // Every run writes into the temporary directory, never into the repository's outputs/.
    let out = format!("output_dir = {:?}\n", dir.path().join("out"));
    let cases: Vec<(Vec<String>, &str)> = vec![
        (
            vec!["--config".into(), write_config(dir.path(), &format!("{out}[model]\nnum_heads = 5\n")).display().to_string()],
            "model.num_heads",
        ),
        (vec!["--config".into(), dir.path().join("missing.toml").display().to_string()], "missing.toml"),
        (
            vec![
                "--config".into(),
                write_config(dir.path(), &format!("{out}[data]\npath = \"/nonexistent/corpus.txt\"\n")).display().to_string(),
            ],
            "data.path",
        ),
        (
            vec!["--config".into(), write_config(dir.path(), "[training\n").display().to_string()],
            "invalid TOML",
        ),
    ];
    for (args, expected) in cases {
        let output = kiln().arg("train").args(&args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{args:?}: {stderr}");
    }
    // A backend name clap rejects, and one this build may lack, are errors too.
    let config = write_config(dir.path(), &out);
    let output = kiln()
        .args(["train", "--backend", "tpu", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown backend"));
}

#[test]
fn every_command_has_help() {
    for args in [vec!["--help"], vec!["train", "--help"]] {
        let output = kiln().args(&args).output().unwrap();
        assert!(output.status.success(), "{args:?}");
        assert!(String::from_utf8_lossy(&output.stdout).contains("Usage"));
    }
}
