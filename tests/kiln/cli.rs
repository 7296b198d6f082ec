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

/// The safetensors `__metadata__` of `path`, read from the header as the format defines it
/// (8-byte little-endian length, then JSON), not through kiln.
fn safetensors_metadata(path: &std::path::Path) -> serde_json::Value {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"].clone()
}

#[test]
fn custom_safetensors_metadata_goes_into_bundles_and_inspect_shows_it() {
    let dir = tempfile::tempdir().unwrap();
    let corpus = small_corpus(dir.path(), 20_000);
    let out = dir.path().join("out");
    let body = format!(
        "output_dir = {out:?}\n[model]\nhidden_size = 16\nnum_layers = 1\nnum_heads = 2\nnum_kv_heads = 1\n\
         intermediate_size = 32\nmax_position_embeddings = 16\n\
         [data]\npath = {corpus:?}\nseq_len = 8\ncache_dir = {:?}\n\
         [training]\nbatch_size = 2\nmax_steps = 2\neval_batches = 1\n\
         [export]\non_best = false\n[export.metadata]\nlicense = \"mit\"\nproject = \"kiln tests\"\n",
        dir.path().join("cache")
    );
    let config = write_config(dir.path(), &body);
    let output = kiln().args(["train", "--config"]).arg(&config).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    // The bundle exported at the end of training carries the config's entries.
    let final_bundle = out.join("models/inference/model_v1.0_final/model.safetensors");
    assert_eq!(safetensors_metadata(&final_bundle), serde_json::json!({"format": "pt", "license": "mit", "project": "kiln tests"}));

    // `kiln export --metadata` adds entries and overrides the config's.
    let bundle = dir.path().join("exported");
    let checkpoint = out.join("checkpoints/checkpoint_latest.safetensors");
    let output = kiln()
        .args(["export", "--checkpoint"])
        .arg(&checkpoint)
        .arg("--out")
        .arg(&bundle)
        .args(["--metadata", "license=apache-2.0", "--metadata", "author=a=b"])
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let weights = bundle.join("model.safetensors");
    assert_eq!(
        safetensors_metadata(&weights),
        serde_json::json!({"format": "pt", "license": "apache-2.0", "project": "kiln tests", "author": "a=b"})
    );
    let output = kiln().arg("inspect").arg(&weights).output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    for text in ["license", "apache-2.0", "author", "a=b", "project"] {
        assert!(stdout.contains(text), "inspect does not show {text}:\n{stdout}");
    }

    // Refused: kiln's own `format` key, a pair without `=`, and the same in the config.
    for (pair, message) in [("format=np", "format"), ("license", "KEY=VALUE")] {
        let output = kiln()
            .args(["export", "--checkpoint"])
            .arg(&checkpoint)
            .arg("--out")
            .arg(dir.path().join("refused"))
            .args(["--metadata", pair])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{pair}: {stderr}");
        assert!(stderr.contains(message) && !stderr.contains("panicked"), "{pair}: {stderr}");
        assert!(!dir.path().join("refused").exists());
    }
    let bad = write_config(dir.path(), &body.replace("license = \"mit\"", "format = \"np\""));
    let output = kiln().args(["train", "--config"]).arg(&bad).arg("--output-dir").arg(dir.path().join("bad")).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("export.metadata"), "{stderr}");
}
