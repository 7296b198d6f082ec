//! Damaged, truncated and hostile checkpoints are refused with a clear error, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use kiln::checkpoint::{self, sidecar::Sidecar};
use kiln::config::Config;
use kiln::safetensors_io::digest_file;
use kiln::train::Learner;
use serde_json::Value;

use super::common::tiny_config;

/// A finished tiny run; returns its config and checkpoint directory.
fn trained(dir: &Path) -> (Config, PathBuf) {
    let mut config = tiny_config(dir);
    config.training.max_steps = 3;
    let ck_dir = config.checkpoint_dir();
    Learner::new(config.clone()).unwrap().fit().unwrap();
    (config, ck_dir)
}

/// Splits a safetensors file into its header JSON and data bytes.
fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let mut h = serde_json::to_vec(header).unwrap();
    h.resize(h.len().next_multiple_of(8), b' ');
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    out
}

/// Rewrites the sidecar's record of the weights file to match its current bytes, so that a
/// test reaches the checks behind the checksum.
fn reseal(ck_dir: &Path) {
    let path = ck_dir.join("checkpoint_latest.meta.json");
    let mut sidecar = Sidecar::read(&path).unwrap();
    for f in &mut sidecar.files {
        let d = digest_file(&ck_dir.join(&f.name)).unwrap();
        f.bytes = d.bytes;
        f.sha256 = d.sha256;
    }
    std::fs::write(&path, sidecar.to_json()).unwrap();
}

struct Case {
    name: &'static str,
    /// Turns the original weights file into the damaged one.
    damage: fn(Vec<u8>) -> Vec<u8>,
    /// Update the sidecar checksums after damaging (to test what lies behind them).
    reseal: bool,
    /// Expected in the error message.
    expect: &'static str,
    /// Whether the file is still a well-formed safetensors file (`inspect` then succeeds
    /// when resealed; resuming must still fail).
    well_formed: bool,
}

fn first_tensor(header: &Value) -> String {
    header
        .as_object()
        .unwrap()
        .keys()
        .find(|k| *k != "__metadata__")
        .unwrap()
        .clone()
}

fn cases() -> Vec<Case> {
    vec![
        Case { name: "truncated", damage: |b| b[..b.len() / 2].to_vec(), reseal: false, expect: "truncated", well_formed: false },
        Case { name: "truncated, resealed", damage: |b| b[..b.len() - 10].to_vec(), reseal: true, expect: "do not end exactly", well_formed: false },
        Case { name: "trailing bytes", damage: |mut b| { b.extend([0u8; 16]); b }, reseal: true, expect: "trailing bytes", well_formed: false },
        Case {
            name: "header length past the end",
            damage: |mut b| { let n = (b.len() as u64) * 2; b[..8].copy_from_slice(&n.to_le_bytes()); b },
            reseal: true, expect: "points past the end", well_formed: false,
        },
        Case {
            name: "absurd header length",
            damage: |mut b| { b[..8].copy_from_slice(&u64::MAX.to_le_bytes()); b },
            reseal: true, expect: "points past the end", well_formed: false,
        },
        Case {
            name: "offsets past the end",
            damage: |b| {
                let (mut h, data) = split(&b);
                let last = h.as_object().unwrap().iter()
                    .filter(|(k, _)| *k != "__metadata__")
                    .max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap())
                    .map(|(k, _)| k.clone()).unwrap();
                let end = h[&last]["data_offsets"][1].as_u64().unwrap();
                h[&last]["data_offsets"][1] = (end + 4096).into();
                join(&h, &data)
            },
            reseal: true, expect: "not a valid safetensors file", well_formed: false,
        },
        Case {
            name: "overlapping tensors",
            damage: |b| {
                let (mut h, data) = split(&b);
                let mut tensors: Vec<(String, u64, u64)> = h.as_object().unwrap().iter()
                    .filter(|(k, _)| *k != "__metadata__")
                    .map(|(k, v)| (k.clone(), v["data_offsets"][0].as_u64().unwrap(), v["data_offsets"][1].as_u64().unwrap()))
                    .collect();
                tensors.sort_by_key(|t| t.1);
                // The second tensor starts inside the first.
                let (name, start, end) = tensors[1].clone();
                h[&name]["data_offsets"] = serde_json::json!([start - 4, end - 4]);
                join(&h, &data)
            },
            reseal: true, expect: "overlap", well_formed: false,
        },
        Case {
            name: "garbage header",
            damage: |mut b| { for x in &mut b[8..40] { *x = b'#'; } b },
            reseal: true, expect: "not a valid safetensors file", well_formed: false,
        },
        Case {
            name: "flipped data byte",
            damage: |mut b| { let i = b.len() - 3; b[i] ^= 0x40; b },
            reseal: false, expect: "SHA-256 does not match", well_formed: true,
        },
        Case {
            name: "missing tensor",
            damage: |b| {
                // The last tensor in the data is dropped from the header and its bytes cut, so
                // the file stays well formed: only the model's own list of parameters can tell.
                let (mut h, mut data) = split(&b);
                let (name, start) = h.as_object().unwrap().iter()
                    .filter(|(k, _)| *k != "__metadata__")
                    .map(|(k, v)| (k.clone(), v["data_offsets"][0].as_u64().unwrap()))
                    .max_by_key(|t| t.1).unwrap();
                h.as_object_mut().unwrap().remove(&name);
                data.truncate(start as usize);
                join(&h, &data)
            },
            reseal: true, expect: "is missing", well_formed: true,
        },
        Case {
            name: "wrong dtype",
            damage: |b| {
                let (mut h, data) = split(&b);
                let name = first_tensor(&h);
                h[&name]["dtype"] = "I32".into();
                join(&h, &data)
            },
            reseal: true, expect: "dtype I32", well_formed: true,
        },
        Case {
            name: "wrong shape",
            damage: |b| {
                let (mut h, data) = split(&b);
                let name = h.as_object().unwrap().iter()
                    .find(|(k, v)| *k != "__metadata__" && v["shape"].as_array().unwrap().len() == 2
                        && v["shape"][0] != v["shape"][1])
                    .map(|(k, _)| k.clone()).unwrap();
                let shape = h[&name]["shape"].clone();
                h[&name]["shape"] = serde_json::json!([shape[1], shape[0]]);
                join(&h, &data)
            },
            reseal: true, expect: "has shape", well_formed: true,
        },
    ]
}

#[test]
fn damaged_weights_files_are_refused_everywhere() {
    let dir = tempfile::tempdir().unwrap();
    let (config, ck_dir) = trained(dir.path());
    let weights = ck_dir.join("checkpoint_latest.safetensors");
    let original = std::fs::read(&weights).unwrap();
    let sidecar = std::fs::read(ck_dir.join("checkpoint_latest.meta.json")).unwrap();
    for case in cases() {
        std::fs::write(&weights, (case.damage)(original.clone())).unwrap();
        std::fs::write(ck_dir.join("checkpoint_latest.meta.json"), &sidecar).unwrap();
        if case.reseal {
            reseal(&ck_dir);
        }
        // Loading (and so resuming) refuses it.
        let mut resume_config = config.clone();
        let resume_dir = dir.path().join(format!("resume-{}", case.name.replace(' ', "-")));
        resume_config.output_dir = resume_dir.clone();
        let err = match Learner::resume(resume_config, &weights) {
            Ok(_) => panic!("{}: resuming from a damaged checkpoint succeeded", case.name),
            Err(e) => format!("{e:#}"),
        };
        assert!(err.contains(case.expect), "{}: resume error {err:?} lacks {:?}", case.name, case.expect);
        // The tensors are read while the files are hashed, but the run wrote nothing.
        for file in ["config.toml", "tokenizer.json", "metrics.jsonl"] {
            assert!(!resume_dir.join(file).exists(), "{}: a refused resume wrote {file}", case.name);
        }

        // `kiln inspect` exits non-zero with one clear message unless the file is well formed
        // and its checksums verify.
        let output = Command::new(env!("CARGO_BIN_EXE_kiln")).arg("inspect").arg(&weights).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{}: {stderr}", case.name);
        let should_pass = case.well_formed && case.reseal;
        assert_eq!(output.status.success(), should_pass, "{}: inspect said {stderr}", case.name);
        if !should_pass {
            assert!(stderr.starts_with("error: "), "{}: {stderr}", case.name);
        }
        // `kiln checkpoints` lists it as invalid (or, for a well-formed resealed file, valid).
        let output = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["checkpoints", "--json"]).arg(&ck_dir).output().unwrap();
        assert!(output.status.success());
        let listing: Value = serde_json::from_slice(&output.stdout).unwrap();
        let row = listing["checkpoints"].as_array().unwrap().iter().find(|r| r["name"] == "checkpoint_latest").unwrap();
        assert_eq!(row["valid"], Value::Bool(should_pass), "{}: {row}", case.name);
    }
}

/// The regular files directly in `dir`, with their contents.
fn files_in(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect();
    files.sort();
    files
}

#[test]
fn resuming_from_a_corrupted_optimizer_file_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (config, ck_dir) = trained(dir.path());
    let before = files_in(&config.output_dir);
    let checkpoints_before = files_in(&ck_dir);
    // A flipped bit in the last tensor's data: the file stays well formed and every tensor
    // reads, so only its checksum can tell.
    let optim = ck_dir.join("checkpoint_latest.optim.safetensors");
    let mut bytes = std::fs::read(&optim).unwrap();
    let i = bytes.len() - 5;
    bytes[i] ^= 0x01;
    // A new file: checkpoints saved at the same step share their files through hard links.
    std::fs::remove_file(&optim).unwrap();
    std::fs::write(&optim, &bytes).unwrap();

    let err = match Learner::resume(config.clone(), &ck_dir.join("checkpoint_latest.safetensors")) {
        Ok(_) => panic!("resuming from a corrupted optimizer file succeeded"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("checkpoint_latest.optim.safetensors") && err.contains("SHA-256 does not match"), "{err}");
    // Same output directory: its config, tokenizer, metrics and loss curve are untouched, and
    // so is every checkpoint but the damaged file.
    assert!(files_in(&config.output_dir) == before, "a refused resume changed the run's files");
    let checkpoints_after = files_in(&ck_dir);
    assert_eq!(checkpoints_after.len(), checkpoints_before.len());
    for ((path, after), (_, before)) in checkpoints_after.iter().zip(&checkpoints_before) {
        assert_eq!(after == before, *path != optim, "{}", path.display());
    }

    // `checkpoint::open` hands out the files at once; reading them works, verifying does not.
    let mut ck = checkpoint::open(&optim).unwrap();
    let (name, ..) = ck.optim.tensors().pop().unwrap();
    assert!(ck.optim.read_f32(&name, None).is_ok());
    let err = ck.verified().unwrap_err().to_string();
    assert!(err.contains("SHA-256 does not match"), "{err}");
    // Restoring the byte makes it whole again.
    bytes[i] ^= 0x01;
    std::fs::write(&optim, &bytes).unwrap();
    checkpoint::open(&optim).unwrap().verified().unwrap();
}

#[test]
fn open_uses_a_complete_backup_as_load_does() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ck_dir) = trained(dir.path());
    let paths = checkpoint::sidecar::CheckpointPaths::new(&ck_dir, "checkpoint_latest");
    let backup = |p: &Path| p.with_file_name(format!(".{}.prev", p.file_name().unwrap().to_string_lossy()));
    // A replacement interrupted after the backup was made and the new weights file landed
    // (here: damaged), before its sidecar did.
    for file in [&paths.weights, &paths.optim, &paths.sidecar] {
        std::fs::copy(file, backup(file)).unwrap();
    }
    let mut bytes = std::fs::read(&paths.weights).unwrap();
    let i = bytes.len() - 5;
    bytes[i] ^= 0x01;
    std::fs::write(&paths.weights, &bytes).unwrap();

    let mut ck = checkpoint::open(&paths.weights).unwrap();
    ck.verified().unwrap();
    assert_eq!(ck.paths.weights, backup(&paths.weights));
    let loaded = checkpoint::load(&paths.weights).unwrap();
    assert_eq!(loaded.paths, ck.paths);
}

#[test]
fn hostile_sidecars_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ck_dir) = trained(dir.path());
    let path = ck_dir.join("checkpoint_latest.meta.json");
    let weights = ck_dir.join("checkpoint_latest.safetensors");
    let original = std::fs::read_to_string(&path).unwrap();

    let mut v: Value = serde_json::from_str(&original).unwrap();
    v["files"][0]["name"] = "../../etc/passwd".into();
    std::fs::write(&path, v.to_string()).unwrap();
    let err = format!("{:#}", checkpoint::load(&weights).unwrap_err());
    assert!(err.contains("outside the checkpoint directory"), "{err}");
    let err = format!("{:#}", checkpoint::open(&weights).unwrap_err());
    assert!(err.contains("outside the checkpoint directory"), "{err}");

    // One file per role, exactly two: a sidecar listing thousands would otherwise start as
    // many hashing threads, and one missing a file would leave that file unverified.
    let base: Value = serde_json::from_str(&original).unwrap();
    let (weights_entry, optim_entry) = (&base["files"][0], &base["files"][1]);
    for files in [
        vec![],
        vec![weights_entry.clone()],
        vec![weights_entry.clone(), weights_entry.clone()],
        vec![weights_entry.clone(), optim_entry.clone(), optim_entry.clone()],
        vec![optim_entry.clone(); 5000],
    ] {
        let mut v: Value = serde_json::from_str(&original).unwrap();
        let count = files.len();
        v["files"] = files.into();
        std::fs::write(&path, v.to_string()).unwrap();
        for err in [checkpoint::load(&weights).unwrap_err(), checkpoint::open(&weights).unwrap_err()] {
            let err = format!("{err:#}");
            assert!(err.contains("unreadable sidecar"), "{err}");
            assert!(err.contains(&format!("it records {count} (")), "{err}");
            assert!(err.len() < 1000, "the error lists every entry: {err}");
        }
    }
    let mut v: Value = serde_json::from_str(&original).unwrap();
    v["files"][1]["role"] = "weights".into();
    std::fs::write(&path, v.to_string()).unwrap();
    let err = format!("{:#}", checkpoint::load(&weights).unwrap_err());
    assert!(err.contains("it records 2 (weights, weights)"), "{err}");

    let mut v: Value = serde_json::from_str(&original).unwrap();
    v["format_version"] = 99.into();
    std::fs::write(&path, v.to_string()).unwrap();
    let err = format!("{:#}", checkpoint::load(&weights).unwrap_err());
    assert!(err.contains("format_version 99"), "{err}");

    std::fs::write(&path, &original[..original.len() / 2]).unwrap();
    let err = format!("{:#}", checkpoint::load(&weights).unwrap_err());
    assert!(err.contains("unreadable sidecar"), "{err}");

    std::fs::remove_file(&path).unwrap();
    let err = format!("{:#}", checkpoint::load(&weights).unwrap_err());
    assert!(err.contains("no such checkpoint"), "{err}");

    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["train", "--config"])
        .arg(dir.path().join("missing-config-is-fine-here.toml"))
        .output()
        .unwrap();
    assert!(!output.status.success());
}

#[test]
fn inspect_and_checkpoints_describe_a_run() {
    let dir = tempfile::tempdir().unwrap();
    let (_, ck_dir) = trained(dir.path());
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let output = Command::new(kiln).args(["inspect", "--json"]).arg(ck_dir.join("checkpoint_latest.safetensors")).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let v: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(v["metadata"]["format"], "pt");
    assert_eq!(v["checkpoint"]["valid"], true);
    assert_eq!(v["checkpoint"]["global_step"], 3);
    let tensors = v["tensors"].as_array().unwrap();
    let q = tensors.iter().find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q["dtype"], "F32");
    assert_eq!(q["shape"], serde_json::json!([32, 32]));
    let params: u64 = tensors.iter().map(|t| t["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap()).product::<u64>()).sum();
    assert_eq!(v["parameters"], params);

    let output = Command::new(kiln).arg("inspect").arg(ck_dir.join("checkpoint_latest.optim.safetensors")).output().unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(table.contains("exp_avg_sq.model.norm.weight"), "{table}");
    assert!(table.contains("checksums verified"), "{table}");

    let output = Command::new(kiln).arg("checkpoints").arg(dir.path().join("out")).output().unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success());
    assert!(table.contains("checkpoint_latest") && table.contains("checkpoint_best_val_loss"), "{table}");
    assert!(table.lines().skip(1).all(|l| l.ends_with("yes")), "{table}");
}
