//! `kiln merge` against mergekit (tests/python/merge_check.py runs mergekit 0.1.5 on the same
//! recipes and models; `bash scripts/test.sh` installs it into .venv).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln::safetensors_io::SafetensorsFile;

use super::common::repo_path;

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap()
}

fn python(args: &[&str]) {
    let output = Command::new("python3").arg(repo_path("tests/python/merge_check.py")).args(args).output().expect("python3 runs");
    assert!(
        output.status.success(),
        "merge_check.py {args:?} failed (needs torch, transformers and mergekit: `bash scripts/test.sh` installs them):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The models of `make-models`, in a temporary directory.
fn models() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    python(&["make-models", models.to_str().unwrap()]);
    (dir, models)
}

/// `recipe` with `{name}` replaced by the path of model `name`.
fn recipe(models: &Path, text: &str) -> String {
    let mut out = text.to_string();
    for name in ["base", "a", "b", "c", "far", "para", "wide", "gpt2a", "gpt2b"] {
        out = out.replace(&format!("{{{name}}}"), models.join(name).to_str().unwrap());
    }
    out
}

fn tensors(path: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let file = SafetensorsFile::open(path).unwrap();
    file.tensors()
        .into_iter()
        .map(|(name, _, _, _)| {
            let (values, shape) = file.read_f32(&name, None).unwrap();
            (name, shape, values)
        })
        .collect()
}

/// Recipes covering each method, parameter precedence, gradients, filters and slices (every
/// one in float32, so that mergekit's arithmetic is f32 as kiln's).
const RECIPES: [(&str, &str); 13] = [
    ("linear", "merge_method: linear\ndtype: float32\nmodels:\n  - model: {a}\n    parameters: {weight: 0.6}\n  - model: {b}\n    parameters: {weight: 0.4}\n"),
    (
        "linear-gradients-filters",
        "merge_method: linear\ndtype: float32\nparameters: {normalize: false, weight: 0.25}\nmodels:\n  - model: {a}\n    parameters: {weight: [1.0, 0.2, 0.5]}\n  - model: {b}\n    parameters:\n      weight: [{filter: mlp, value: 0.7}, {value: 0.1}]\n  - model: {c}\n    parameters:\n      weight: [{filter: self_attn, value: 0.3}]\n",
    ),
    ("slerp", "merge_method: slerp\ndtype: float32\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {far}\nparameters: {t: 0.35}\n"),
    (
        "slerp-gradient",
        "merge_method: slerp\ndtype: float32\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\nparameters:\n  t:\n    - filter: self_attn\n      value: [0, 0.5, 0.3, 0.7, 1]\n    - filter: mlp\n      value: [1, 0.5, 0.7, 0.3, 0]\n    - value: 0.5\n",
    ),
    ("slerp-parallel", "merge_method: slerp\ndtype: float32\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {para}\nparameters: {t: 0.3}\n"),
    (
        "task-arithmetic",
        "merge_method: task_arithmetic\ndtype: float32\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {weight: 0.5}\n  - model: {b}\n    parameters: {weight: 0.3}\n  - model: {c}\n    parameters: {weight: -0.2}\nparameters: {lambda: 0.8}\n",
    ),
    (
        "task-arithmetic-normalized",
        "merge_method: task_arithmetic\ndtype: float32\nbase_model: {base}\nmodels:\n  - model: {base}\n    parameters: {weight: 9}\n  - model: {a}\n    parameters: {weight: 2}\n  - model: {b}\n    parameters: {weight: 1}\nparameters: {normalize: true}\n",
    ),
    (
        "ties",
        "merge_method: ties\ndtype: float32\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {density: [1, 0.7, 0.1], weight: 1.0}\n  - model: {b}\n    parameters: {density: 0.5, weight: [0, 0.3, 0.7, 1]}\n  - model: {c}\n    parameters:\n      density: 0.33\n      weight: [{filter: mlp, value: 0.5}, {value: 0}]\nparameters: {int8_mask: true}\n",
    ),
    (
        "ties-rescaled",
        "merge_method: ties\ndtype: float32\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {weight: 0.7, density: 0.3}\n  - model: {b}\n    parameters: {weight: 0.5, density: 0.6}\nparameters: {normalize: false, rescale: true, lambda: 1.3}\n",
    ),
    (
        "dare-ties-dense",
        "merge_method: dare_ties\ndtype: float32\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {weight: 0.6, density: 1.0}\n  - model: {b}\n    parameters: {weight: 0.4, density: 1.0}\n",
    ),
    (
        "dare-linear-dense",
        "merge_method: dare_linear\ndtype: float32\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {weight: 0.6, density: 1.0}\n  - model: {b}\n    parameters: {weight: 0.4, density: 1.0}\n",
    ),
    (
        "slices",
        "merge_method: linear\ndtype: float32\nparameters: {weight: 0.5}\nslices:\n  - sources:\n      - model: {a}\n        layer_range: [0, 2]\n        parameters: {weight: [0.1, 0.9]}\n      - model: {b}\n        layer_range: [0, 2]\n  - sources:\n      - model: {a}\n        layer_range: [3, 4]\n      - model: {b}\n        layer_range: [1, 2]\n    parameters: {weight: [0.2, 0.8]}\n",
    ),
    ("gpt2-ties", "merge_method: ties\ndtype: float32\nbase_model: {gpt2a}\nmodels:\n  - model: {gpt2b}\n    parameters: {weight: [0.3, 1.0], density: 0.5}\n"),
];

#[test]
fn every_method_matches_mergekit_on_the_same_recipe() {
    let (dir, models) = models();
    for (name, text) in RECIPES {
        let path = dir.path().join(format!("{name}.yml"));
        std::fs::write(&path, recipe(&models, text)).unwrap();
        let ours = dir.path().join(format!("kiln-{name}"));
        let output = kiln(&["merge", "--config", path.to_str().unwrap(), "--out", ours.to_str().unwrap()]);
        assert!(output.status.success(), "{name}: kiln merge failed:\n{}", String::from_utf8_lossy(&output.stderr));
        let theirs = dir.path().join(format!("mergekit-{name}"));
        python(&["run", path.to_str().unwrap(), theirs.to_str().unwrap()]);
        let (a, b) = (tensors(&ours.join("model.safetensors")), tensors(&theirs.join("model.safetensors")));
        let names = |t: &[(String, Vec<usize>, Vec<f32>)]| t.iter().map(|x| x.0.clone()).collect::<Vec<_>>();
        assert_eq!(names(&a), names(&b), "{name}: tensor names");
        for ((n, sa, va), (_, sb, vb)) in a.iter().zip(&b) {
            assert_eq!(sa, sb, "{name}: {n}");
            for (i, (x, y)) in va.iter().zip(vb).enumerate() {
                assert!((x - y).abs() <= 1e-5 * y.abs() + 1e-6, "{name}: {n}[{i}]: kiln {x}, mergekit {y}");
            }
        }
        let config: serde_json::Value = serde_json::from_slice(&std::fs::read(ours.join("config.json")).unwrap()).unwrap();
        let reference: serde_json::Value = serde_json::from_slice(&std::fs::read(theirs.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["num_hidden_layers"], reference["num_hidden_layers"], "{name}");
        let card = std::fs::read_to_string(ours.join("README.md")).unwrap();
        assert!(card.contains("## Recipe") && card.contains("merge_method"), "{name}: the card lacks the recipe");
    }
    // A merged bundle is a model kiln runs.
    let output = kiln(&["generate", "--model", dir.path().join("kiln-ties").to_str().unwrap(), "--prompt", "AB", "--max-new-tokens", "5"]);
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn dare_drops_a_density_share_rescales_the_rest_and_repeats_with_its_seed() {
    let (dir, models) = models();
    let text = "merge_method: dare_linear\nbase_model: {base}\nmodels:\n  - model: {a}\n    parameters: {weight: 1.0, density: 0.5}\n";
    let path = dir.path().join("dare.yml");
    std::fs::write(&path, recipe(&models, text)).unwrap();
    let merge = |out: &str, seed: &str| {
        let out = dir.path().join(out);
        let output = kiln(&["merge", "--config", path.to_str().unwrap(), "--out", out.to_str().unwrap(), "--seed", seed]);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        tensors(&out.join("model.safetensors"))
    };
    let (first, again, other) = (merge("one", "3"), merge("two", "3"), merge("three", "4"));
    assert_eq!(first, again, "the same seed gives the same merge");
    assert_ne!(first, other, "another seed draws other masks");
    let base = tensors(&models.join("base/model.safetensors"));
    let a = tensors(&models.join("a/model.safetensors"));
    let (mut kept, mut total) = (0usize, 0usize);
    for ((name, _, out), ((_, _, b), (_, _, x))) in first.iter().zip(base.iter().zip(&a)) {
        let d: Vec<f32> = x.iter().zip(b).map(|(x, b)| x - b).collect();
        let merged: Vec<f32> = out.iter().zip(b).map(|(o, b)| o - b).collect();
        let keep: Vec<bool> = merged.iter().map(|m| *m != 0.0).collect();
        // mergekit's rescale: sum|d| / sum|kept d|, one factor for the whole tensor.
        let sum_all: f32 = d.iter().map(|v| v.abs()).sum();
        let sum_kept: f32 = d.iter().zip(&keep).filter(|(_, k)| **k).map(|(v, _)| v.abs()).sum();
        let c = sum_all / sum_kept;
        for ((m, v), k) in merged.iter().zip(&d).zip(&keep) {
            if *k {
                assert!((m - v * c).abs() <= 1e-4 * (v * c).abs() + 1e-6, "{name}: {m} is not {v} x {c}");
            }
        }
        kept += keep.iter().filter(|k| **k).count();
        total += keep.len();
    }
    // A Bernoulli(0.5) share over `total` draws: within 4 standard deviations.
    let share = kept as f64 / total as f64;
    let sigma = (0.25 / total as f64).sqrt();
    assert!((share - 0.5).abs() < 4.0 * sigma, "kept {share} of {total}");
}

#[test]
fn recipes_kiln_cannot_run_are_refused_naming_what_is_wrong() {
    let (dir, models) = models();
    let cases = [
        ("slerp of three", "merge_method: slerp\nbase_model: {a}\nmodels:\n  - model: {a}\n  - model: {b}\n  - model: {c}\nparameters: {t: 0.5}\n", "exactly two"),
        ("ties without a base", "merge_method: ties\nmodels:\n  - model: {a}\n    parameters: {weight: 1}\n  - model: {b}\n    parameters: {weight: 1}\n", "base_model"),
        ("a missing weight", "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {weight: 1}\n  - model: {b}\n", "parameter `weight`"),
        ("shapes", "merge_method: linear\nmodels:\n  - model: {a}\n    parameters: {weight: 1}\n  - model: {wide}\n    parameters: {weight: 1}\n", "mlp.gate_proj.weight"),
        ("an unknown method", "merge_method: della\nmodels:\n  - model: {a}\n", "della"),
        ("a missing model", "merge_method: linear\nmodels:\n  - model: /nonexistent/model\n    parameters: {weight: 1}\n", "/nonexistent/model"),
        ("not YAML", "merge_method: [linear\n", "YAML"),
        ("an unknown key", "merge_method: linear\nmodel: {a}\n", "`model`"),
    ];
    for (what, text, message) in cases {
        let path = dir.path().join("bad.yml");
        std::fs::write(&path, recipe(&models, text)).unwrap();
        let out = dir.path().join("out");
        let output = kiln(&["merge", "--config", path.to_str().unwrap(), "--out", out.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(1), "{what}: {stderr}");
        assert!(stderr.contains(message) && !stderr.contains("panicked"), "{what}: expected `{message}` in:\n{stderr}");
        assert!(!out.exists(), "{what}: a failed merge left {}", out.display());
    }
}
