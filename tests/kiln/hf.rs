//! Compatibility with Hugging Face `transformers`, both directions, checked by Python itself
//! (tests/python/hf_compat.py; `.ci/run` installs torch, transformers, safetensors, tokenizers).

use std::path::{Path, PathBuf};
use std::process::Command;

use burn::tensor::{Device, Int, Tensor, TensorData};
use kiln::config::{Config, TokenizerKind};
use kiln::generate::{SamplingOptions, generate_ids};
use kiln::model::{CausalLm, LanguageModel};
use kiln::pretrained::{self, LoadOptions};
use kiln::train::Learner;
use serde_json::Value;

use super::common::{copy_dir, repo_path, tiny_config};

fn python(args: &[&str]) -> String {
    let output = Command::new("python3")
        .arg(repo_path("tests/python/hf_compat.py"))
        .args(args)
        .output()
        .expect("python3 must be installed (see .ci/run)");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "hf_compat.py {args:?} failed (needs torch, transformers, safetensors and tokenizers: `bash scripts/test.sh` installs them into .venv):\n{stderr}"
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn logits(model: &impl LanguageModel, ids: &[u32]) -> Vec<f32> {
    let device = Device::flex();
    let input: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
    let t = Tensor::<2, Int>::from_data(TensorData::new(input, [1, ids.len()]), &device);
    model.forward(t).into_data().convert::<f32>().try_into_vec::<f32>().unwrap()
}

fn write_f32(path: &Path, values: &[f32]) {
    std::fs::write(path, values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>()).unwrap();
}

/// Trains a tiny model with `adjust` applied to the config and returns its final bundle.
fn trained_bundle(dir: &Path, adjust: impl FnOnce(&mut Config)) -> (Config, PathBuf) {
    let mut config = tiny_config(dir);
    config.training.max_steps = 12;
    adjust(&mut config);
    let mut learner = Learner::new(config.clone()).unwrap();
    learner.fit().unwrap();
    let bundle = config.bundle_dir().join("model_v1.0_final");
    assert!(learner.exported.contains(&bundle), "{:?}", learner.exported);
    (config, bundle)
}

/// kiln's logits and tokenization of a bundle, checked by transformers.
fn check_in_transformers(bundle: &Path, work: &Path, sample: &str) -> Value {
    let p = pretrained::load(bundle, &Device::flex(), &LoadOptions::default()).unwrap();
    assert!(p.report.unexpected.is_empty() && p.report.missing.is_empty(), "{:?}", p.report);
    let tokenizer = p.tokenizer.as_ref().unwrap();
    let ids = tokenizer.encode(sample).unwrap();
    let ids = &ids[..ids.len().min(40)];
    std::fs::write(work.join("ids.json"), serde_json::to_string(ids).unwrap()).unwrap();
    write_f32(&work.join("logits.f32"), &logits(&p.model, ids));
    std::fs::write(work.join("text.txt"), sample).unwrap();
    let all_ids = tokenizer.encode(sample).unwrap();
    std::fs::write(work.join("text_ids.json"), serde_json::to_string(&all_ids).unwrap()).unwrap();
    let s = |p: PathBuf| p.display().to_string();
    let out = python(&[
        "check-bundle",
        &s(bundle.to_path_buf()),
        "--ids",
        &s(work.join("ids.json")),
        "--logits",
        &s(work.join("logits.f32")),
        "--text",
        &s(work.join("text.txt")),
        "--text-ids",
        &s(work.join("text_ids.json")),
    ]);
    serde_json::from_str(out.trim().lines().last().unwrap()).unwrap()
}

const SAMPLE: &str = "ROMEO:\nBut, soft! what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n";

#[test]
fn kiln_bundles_load_in_transformers_with_the_same_logits_and_tokens() {
    // Character tokenizer, untied, multi-head; then BPE, tied, grouped-query, another theta,
    // exported again through `kiln export` in small shards.
    let dir = tempfile::tempdir().unwrap();
    let (_, bundle) = trained_bundle(dir.path(), |_| {});
    let report = check_in_transformers(&bundle, dir.path(), SAMPLE);
    assert!(report["max_logit_diff"].as_f64().unwrap() <= 1e-4);

    let dir = tempfile::tempdir().unwrap();
    let (config, bundle) = trained_bundle(dir.path(), |c| {
        c.data.tokenizer = TokenizerKind::Bpe.into();
        c.data.vocab_size = 300;
        c.model.tie_word_embeddings = true;
        c.model.num_kv_heads = 1;
        c.model.rope_theta = 500_000.0;
    });
    check_in_transformers(&bundle, dir.path(), SAMPLE);

    let sharded = dir.path().join("sharded");
    let latest = config.checkpoint_dir().join("checkpoint_latest.safetensors");
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["export", "--checkpoint"])
        .arg(&latest)
        .args(["--max-shard-size", "20KB", "--out"])
        .arg(&sharded)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let index: Value = serde_json::from_str(&std::fs::read_to_string(sharded.join("model.safetensors.index.json")).unwrap()).unwrap();
    let files: std::collections::BTreeSet<&str> = index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(files.len() > 2, "{files:?}");
    assert!(files.iter().all(|f| f.starts_with("model-000") && f.contains(&format!("-of-{:05}", files.len()))));
    assert!(!sharded.join("model.safetensors").exists());
    let report = check_in_transformers(&sharded, dir.path(), SAMPLE);
    assert_eq!(index["metadata"]["total_parameters"], report["params"]);
    // The same weights, whether sharded or not.
    let a = pretrained::load(&bundle, &Device::flex(), &LoadOptions::default()).unwrap();
    let b = pretrained::load(&sharded, &Device::flex(), &LoadOptions::default()).unwrap();
    assert!(kiln::params::named_tensors(&a.model) == kiln::params::named_tensors(&b.model));
    // An index that puts a tensor in a shard which does not hold it is refused, naming both.
    let misplaced = dir.path().join("misplaced");
    copy_dir(&sharded, &misplaced);
    let mut wrong = index.clone();
    let (name, shard) = wrong["weight_map"].as_object().unwrap().iter().next().map(|(n, s)| (n.clone(), s.as_str().unwrap().to_string())).unwrap();
    let other = files.iter().find(|f| **f != shard).unwrap().to_string();
    wrong["weight_map"][&name] = Value::from(other.clone());
    std::fs::write(misplaced.join("model.safetensors.index.json"), wrong.to_string()).unwrap();
    let err = format!("{:#}", pretrained::load(&misplaced, &Device::flex(), &LoadOptions::default()).err().unwrap());
    assert!(err.contains(&format!("`{name}` in {other}, which does not hold it")), "{err}");

    // `kiln inspect` describes a bundle through its directory or its index.
    for target in [sharded.clone(), sharded.join("model.safetensors.index.json")] {
        let output = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["inspect", "--json"]).arg(&target).output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let v: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(v["sharded"], true);
        assert_eq!(v["parameters"], index["metadata"]["total_parameters"]);
        assert_eq!(v["bytes"], index["metadata"]["total_size"]);
        assert_eq!(v["files"].as_array().unwrap().len(), files.len());
        assert_eq!(v["tensors"].as_array().unwrap().len(), index["weight_map"].as_object().unwrap().len());
        assert_eq!(v["architecture"]["num_key_value_heads"], 1);
    }
    let output = Command::new(env!("CARGO_BIN_EXE_kiln")).arg("inspect").arg(&bundle).output().unwrap();
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success() && table.contains("model.safetensors") && table.contains("training"), "{table}");

    // A bundle is never overwritten.
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["export", "--checkpoint"])
        .arg(&latest)
        .arg("--out")
        .arg(&sharded)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&output.stderr).contains("never overwrites"));
}

/// `export.dtype` and `kiln export --dtype`: a bf16 or f16 bundle holds exactly PyTorch's
/// `.to(dtype)` of the fp32 weights, says so as `torch_dtype`, and loads in transformers in that
/// dtype with logits within 5% (of the largest logit) of fp32's; the checkpoint stays fp32.
#[test]
fn bundles_export_in_the_dtype_asked_and_load_in_transformers_so() {
    let dir = tempfile::tempdir().unwrap();
    let (config, bf16) = trained_bundle(dir.path(), |c| c.export.dtype = kiln::config::ExportDtype::Bfloat16);
    let latest = config.checkpoint_dir().join("checkpoint_latest.safetensors");
    let export = |dtype: &str, out: &Path| {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["export", "--checkpoint"])
            .arg(&latest)
            .args(["--dtype", dtype, "--out"])
            .arg(out)
            .output()
            .unwrap()
    };
    let (fp32, fp16) = (dir.path().join("fp32"), dir.path().join("fp16"));
    for (dtype, out) in [("float32", &fp32), ("fp16", &fp16)] {
        let output = export(dtype, out);
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    }
    let s = |p: &Path| p.display().to_string();
    for (bundle, dtype) in [(&bf16, "bfloat16"), (&fp16, "float16")] {
        let report: Value = serde_json::from_str(python(&["check-dtype", &s(&fp32), &s(bundle), "--dtype", dtype]).trim()).unwrap();
        assert!(report["max_logit_diff"].as_f64().unwrap() > 0.0, "{dtype}: nothing was narrowed: {report}");
    }
    let json: Value = serde_json::from_str(&std::fs::read_to_string(fp32.join("config.json")).unwrap()).unwrap();
    assert_eq!(json["torch_dtype"], "float32");
    let ck = kiln::checkpoint::load(&latest).unwrap();
    assert!(ck.weights.tensors().iter().all(|(_, dtype, _, _)| *dtype == safetensors::Dtype::F32));

    let output = export("int8", &dir.path().join("int8"));
    assert_eq!(output.status.code(), Some(2), "clap refuses an unknown dtype");
    assert!(String::from_utf8_lossy(&output.stderr).contains("unknown dtype `int8`"));
    assert!(!dir.path().join("int8").exists());
}

struct HfCase {
    name: &'static str,
    args: &'static [&'static str],
}

#[test]
fn transformers_models_load_in_kiln_with_the_same_logits_and_greedy_text() {
    let cases = [
        HfCase { name: "untied f32 single file", args: &["--dtype", "float32"] },
        HfCase { name: "tied bf16 sharded gqa", args: &["--tied", "--kv-heads", "2", "--dtype", "bfloat16", "--shard-size", "30KB", "--rope-theta", "500000"] },
        HfCase { name: "untied f16 sharded mqa", args: &["--kv-heads", "1", "--dtype", "float16", "--shard-size", "40KB"] },
        HfCase { name: "pytorch_model.bin only", args: &["--torch-bin", "only"] },
        HfCase { name: "safetensors preferred to a zeroed pytorch_model.bin", args: &["--torch-bin", "beside-zeroed", "--dtype", "bfloat16"] },
    ];
    let prompt = "To be, or not to be";
    for case in cases {
        let dir = tempfile::tempdir().unwrap();
        let model_dir = dir.path().join("hf");
        // The character tokenizer of hf_compat.py maps printable ASCII from 32 upwards.
        let ids: Vec<u32> = prompt.bytes().map(|b| (b - 32) as u32).collect();
        std::fs::write(dir.path().join("ids.json"), serde_json::to_string(&ids).unwrap()).unwrap();
        let mut args = vec!["make-model", model_dir.to_str().unwrap(), "--ids", dir.path().join("ids.json").to_str().unwrap().to_owned().leak()];
        args.extend_from_slice(case.args);
        python(&args);

        let p = pretrained::load(&model_dir, &Device::flex(), &LoadOptions::default()).unwrap();
        assert!(p.report.missing.is_empty() && p.report.unexpected.is_empty(), "{}: {:?}", case.name, p.report);
        let tokenizer = p.tokenizer.as_ref().unwrap();
        assert_eq!(tokenizer.encode(prompt).unwrap(), ids, "{}", case.name);
        let reference: Vec<f32> = std::fs::read(model_dir.join("reference_logits.f32"))
            .unwrap()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let ours = logits(&p.model, &ids);
        let diff = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-4, "{}: logits differ by {diff}", case.name);

        let greedy: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(model_dir.join("reference_greedy.json")).unwrap()).unwrap();
        let options = SamplingOptions { max_new_tokens: greedy.len(), temperature: 0.0, top_k: None, seed: 0, eos_token_ids: Vec::new() };
        let ours = generate_ids(&p.model, &ids, &options, &Device::flex()).unwrap();
        assert_eq!(ours, greedy, "{}: greedy continuation", case.name);

        // The CLI prints the same continuation.
        let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["generate", "--model"])
            .arg(&model_dir)
            .args(["--prompt", prompt, "--temperature", "0", "--max-new-tokens", &greedy.len().to_string()])
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let text = String::from_utf8_lossy(&output.stdout);
        assert_eq!(text.trim_end_matches('\n'), tokenizer.decode(&greedy).unwrap(), "{}", case.name);
    }
}

/// Copies an HF directory's single weights file with every tensor renamed by `rename`.
fn renamed_copy(src: &Path, dst: &Path, rename: impl Fn(&str) -> Option<String>) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let file = kiln::safetensors_io::SafetensorsFile::open(&src.join("model.safetensors")).unwrap();
    let mut tensors = Vec::new();
    for (name, dtype, shape, _) in file.tensors() {
        let Some(new) = rename(&name) else { continue };
        let bytes = file.read_raw(&name).unwrap().1;
        tensors.push(kiln::safetensors_io::PendingTensor::from_bytes(new, dtype, shape, bytes));
    }
    let mut out = std::fs::File::create(dst.join("model.safetensors")).unwrap();
    kiln::safetensors_io::write_to(&mut out, &Default::default(), tensors).unwrap();
}

#[test]
fn other_names_load_through_key_maps_and_partial_loading_is_explicit() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    std::fs::write(dir.path().join("ids.json"), "[1, 2, 3]").unwrap();
    python(&["make-model", hf.to_str().unwrap(), "--ids", dir.path().join("ids.json").to_str().unwrap(), "--new-tokens", "1"]);
    let reference = pretrained::load(&hf, &Device::flex(), &LoadOptions::default()).unwrap();

    // GPT-style names: transformer.h.N.* instead of model.layers.N.*
    let renamed = dir.path().join("renamed");
    renamed_copy(&hf, &renamed, |n| Some(n.replace("model.layers.", "transformer.h.")));
    let err = pretrained::load(&renamed, &Device::flex(), &LoadOptions::default()).err().unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("missing tensor `model.layers.0.self_attn.q_proj.weight`"), "{msg}");
    let options = LoadOptions::with_rules(&[r"^transformer\.h\.(\d+)\.=model.layers.$1.".to_string()]).unwrap();
    let mapped = pretrained::load(&renamed, &Device::flex(), &options).unwrap();
    assert!(kiln::params::named_tensors(&mapped.model) == kiln::params::named_tensors(&reference.model));
    assert_eq!(mapped.report.renamed.len(), 18);
    assert!(mapped.report.unexpected.is_empty());

    // A dropped tensor and an extra one: refused, unless partial loading is asked for.
    let partial = dir.path().join("partial");
    renamed_copy(&hf, &partial, |n| match n {
        "model.norm.weight" => None,
        "lm_head.weight" => Some("extra.head".to_string()),
        other => Some(other.to_string()),
    });
    assert!(pretrained::load(&partial, &Device::flex(), &LoadOptions::default()).is_err());
    let options = LoadOptions { allow_partial: true, ..Default::default() };
    let loaded = pretrained::load(&partial, &Device::flex(), &options).unwrap();
    assert_eq!(loaded.report.missing, ["model.norm.weight", "lm_head.weight"]);
    assert_eq!(loaded.report.unexpected, ["extra.head"]);
    // The missing ones keep exactly a fresh model's values (in Burn's layout, the head
    // transposed like every Linear weight); the rest are the stored ones.
    let fresh = CausalLm::init(&loaded.arch, loaded.arch.initializer_range(), 0.0, 0, &Device::flex());
    let by_name = |model: &CausalLm| -> std::collections::BTreeMap<String, Vec<f32>> {
        kiln::params::named_tensors(model).into_iter().map(|t| (t.name, t.values)).collect()
    };
    let (loaded_values, fresh_values, stored_values) = (by_name(&loaded.model), by_name(&fresh), by_name(&reference.model));
    for (name, values) in &loaded_values {
        let expected = if ["model.norm.weight", "lm_head.weight"].contains(&name.as_str()) { &fresh_values } else { &stored_values };
        assert!(*values == expected[name], "{name}");
    }
    assert!(loaded_values["lm_head.weight"] != stored_values["lm_head.weight"]);

    // Fine-tuning starts from the pretrained weights and tokenizer.
    let run = dir.path().join("run");
    std::fs::create_dir_all(&run).unwrap();
    let mut config = tiny_config(&run);
    config.model.init_from = Some(hf.clone());
    config.data.seq_len = 16;
    let text: String = std::fs::read_to_string(&config.data.path).unwrap().chars().filter(|c| *c == '\n' || (' '..='~').contains(c)).collect();
    std::fs::write(&config.data.path, text).unwrap();
    let learner = Learner::new(config).unwrap();
    assert!(kiln::params::named_tensors(learner.model()) == kiln::params::named_tensors(&reference.model));
    assert_eq!(learner.arch, reference.arch);
}

#[test]
fn bundles_carry_metadata_and_a_model_card() {
    let dir = tempfile::tempdir().unwrap();
    let (config, bundle) = trained_bundle(dir.path(), |c| c.training.eval_every_steps = 4);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json", "training_metadata.json", "README.md", "loss_curve.svg"] {
        assert!(bundle.join(f).exists(), "bundle lacks {f}");
    }
    let meta: Value = serde_json::from_str(&std::fs::read_to_string(bundle.join("training_metadata.json")).unwrap()).unwrap();
    assert_eq!(meta["global_step"], 12);
    assert_eq!(meta["hyperparameters"]["training"]["batch_size"], config.training.batch_size);
    assert_eq!(meta["data"]["sha256"].as_str().unwrap().len(), 64);
    assert!(meta["final_metrics"]["val_loss"].as_f64().unwrap() > 0.0);
    assert_eq!(meta["best_metric"]["name"], "val_loss");
    assert!(meta["wall_seconds"].as_f64().unwrap() > 0.0);
    assert!(meta["hardware"]["cores"].as_u64().unwrap() >= 1);
    assert_eq!(meta["kiln_version"], env!("CARGO_PKG_VERSION"));
    assert!(chrono::DateTime::parse_from_rfc3339(meta["exported_at"].as_str().unwrap()).is_ok());
    let card = std::fs::read_to_string(bundle.join("README.md")).unwrap();
    for needle in ["# model_v1.0_final", "LlamaForCausalLM", "## Architecture", "## Training", "AutoModelForCausalLM.from_pretrained", "kiln generate", "## Limitations", "loss_curve.svg", "| parameters |"] {
        assert!(card.contains(needle), "model card lacks {needle:?}");
    }
    // The best bundle was exported too, from the best checkpoint.
    let best = std::fs::read_dir(config.bundle_dir()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with("model_v1.0_epoch")).count();
    assert_eq!(best, 1);

    // kiln eval on the bundle agrees with the validation loss it reports for the same text.
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["eval", "--json", "--model"])
        .arg(&bundle)
        .arg("--text-file")
        .arg(&config.data.path)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let v: Value = serde_json::from_slice(&output.stdout).unwrap();
    let ce = v["cross_entropy"].as_f64().unwrap();
    assert!((v["perplexity"].as_f64().unwrap() - ce.exp()).abs() < 1e-9);
    assert!(ce > 1.0 && ce < 4.5, "{ce}");
    assert_eq!(v["window"], config.data.seq_len);
}

/// Spaces, newlines, tabs, digits, punctuation, accents and CJK, some of it unseen in training.
const MIXED_TEXT: &str = "Hello world, 2024!\nCafé — naïve 東京 テスト\n  two  spaces\tand tab\nIt's fine, isn't it?\n";

#[test]
fn pretrained_tokenizers_encode_and_decode_as_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, MIXED_TEXT).unwrap();
    let out = dir.path().join("tok");
    python(&["make-tokenizers", out.to_str().unwrap(), "--text", text.to_str().unwrap()]);
    let expected: Value = serde_json::from_str(&std::fs::read_to_string(out.join("expected.json")).unwrap()).unwrap();
    for family in ["llama2", "llama3", "gpt2", "t5"] {
        let tokenizer = kiln::tokenizer::KilnTokenizer::from_dir(&out.join(family)).unwrap().unwrap();
        assert_eq!(tokenizer.kind(), None, "{family} is not one of kiln's own tokenizers");
        let ids = tokenizer.encode(MIXED_TEXT).unwrap();
        let want: Vec<u32> = serde_json::from_value(expected[family]["ids"].clone()).unwrap();
        assert_eq!(ids, want, "{family}: ids differ from transformers' tokenizer(text)");
        assert_eq!(tokenizer.decode(&ids).unwrap(), expected[family]["decoded"].as_str().unwrap(), "{family}: decode");
        // A corpus is the same tokens without the post-processor's, however it is cut up.
        let corpus = MIXED_TEXT.repeat(3000);
        let plain = tokenizer.encode_corpus(&corpus).unwrap();
        let added = match family {
            "llama2" | "llama3" => 1,
            "t5" => 1,
            _ => 0,
        };
        let one: Vec<u32> = if family == "t5" { want[..want.len() - added].to_vec() } else { want[added..].to_vec() };
        assert!(plain.len() >= one.len() * 3000 / 2, "{family}: {} tokens for the corpus", plain.len());
        if family == "gpt2" || family == "llama3" {
            // Byte-level pieces concatenate exactly.
            assert_eq!(plain, one.repeat(3000), "{family}: corpus tokens");
        }
    }
    // The special tokens a directory declares come with it.
    let llama3 = kiln::tokenizer::KilnTokenizer::from_dir(&out.join("llama3")).unwrap().unwrap();
    let special = llama3.special_tokens();
    assert_eq!((special.bos_token_id, special.eos_token_ids.as_slice()), (Some(0), &[1][..]));
    assert!(special.tokenizer_config.as_ref().unwrap()["chat_template"].is_string());
}

/// `tiny_config` in `dir`, its corpus reduced to the printable ASCII that the character
/// tokenizer of hf_compat.py covers.
fn ascii_config(dir: &Path) -> Config {
    std::fs::create_dir_all(dir).unwrap();
    let config = tiny_config(dir);
    let text: String = std::fs::read_to_string(&config.data.path).unwrap().chars().filter(|c| *c == '\n' || (' '..='~').contains(c)).collect();
    std::fs::write(&config.data.path, text).unwrap();
    config
}

/// The final weights of a run, by name.
fn final_weights(learner: &Learner) -> Vec<kiln::params::NamedTensor> {
    kiln::params::named_tensors(learner.model())
}

#[test]
fn every_architecture_loads_evaluates_fine_tunes_exports_and_resumes() {
    let prompt = "To be, or not to be";
    let ids: Vec<u32> = prompt.bytes().map(|b| (b - 32) as u32).collect();
    for (arch, args) in [
        ("llama", &["--kv-heads", "2"][..]),
        ("qwen2", &["--kv-heads", "2", "--tied"][..]),
        ("mistral", &["--kv-heads", "2", "--sliding-window", "64"][..]),
        ("gpt2", &["--tied"][..]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let hf = dir.path().join("hf");
        std::fs::write(dir.path().join("ids.json"), serde_json::to_string(&ids).unwrap()).unwrap();
        let mut make = vec!["make-model", hf.to_str().unwrap(), "--arch", arch, "--ids", dir.path().join("ids.json").to_str().unwrap().to_owned().leak()];
        make.extend_from_slice(args);
        python(&make);

        // Loaded as transformers wrote it: the same logits and greedy text.
        let p = pretrained::load(&hf, &Device::flex(), &LoadOptions::default()).unwrap();
        assert!(p.report.missing.is_empty() && p.report.unexpected.is_empty(), "{arch}: {:?}", p.report);
        assert_eq!(p.arch.architecture().model_type(), arch);
        let reference: Vec<f32> = std::fs::read(hf.join("reference_logits.f32")).unwrap().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect();
        let ours = logits(&p.model, &ids);
        let diff = ours.iter().zip(&reference).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(diff <= 1e-4, "{arch}: logits differ by {diff}");
        let greedy: Vec<u32> = serde_json::from_str(&std::fs::read_to_string(hf.join("reference_greedy.json")).unwrap()).unwrap();
        let options = SamplingOptions { max_new_tokens: greedy.len(), temperature: 0.0, top_k: None, seed: 0, eos_token_ids: Vec::new() };
        assert_eq!(generate_ids(&p.model, &ids, &options, &Device::flex()).unwrap(), greedy, "{arch}: greedy continuation");

        // `kiln eval` scores a text as transformers does over the same windows.
        let text_path = dir.path().join("eval.txt");
        std::fs::write(&text_path, SAMPLE).unwrap();
        let output = Command::new(env!("CARGO_BIN_EXE_kiln")).args(["eval", "--json", "--seq-len", "16", "--model"]).arg(&hf).arg("--text-file").arg(&text_path).output().unwrap();
        assert!(output.status.success(), "{arch}: {}", String::from_utf8_lossy(&output.stderr));
        let ours: Value = serde_json::from_slice(&output.stdout).unwrap();
        let text_ids = p.tokenizer.as_ref().unwrap().encode(SAMPLE).unwrap();
        std::fs::write(dir.path().join("text_ids.json"), serde_json::to_string(&text_ids).unwrap()).unwrap();
        let theirs: Value = serde_json::from_str(python(&["eval-loss", hf.to_str().unwrap(), "--ids", dir.path().join("text_ids.json").to_str().unwrap(), "--window", "16"]).trim()).unwrap();
        let (a, b) = (ours["cross_entropy"].as_f64().unwrap(), theirs["cross_entropy"].as_f64().unwrap());
        assert!((a - b).abs() <= 1e-5 * b.abs(), "{arch}: kiln eval {a}, transformers {b}");
        assert_eq!(ours["tokens"], theirs["tokens"]);

        // Fine-tuned from it; the bundle loads in transformers as the same architecture.
        let mut config = ascii_config(&dir.path().join("tune"));
        config.model.init_from = Some(hf.clone());
        config.data.seq_len = 16;
        config.training.max_steps = 12;
        let mut learner = Learner::new(config.clone()).unwrap();
        learner.fit().unwrap();
        let bundle = config.bundle_dir().join("model_v1.0_final");
        let json: Value = serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap()).unwrap();
        assert_eq!(json["model_type"], arch);
        check_bundle_as(&bundle, dir.path(), SAMPLE, arch);
        let tuned = final_weights(&learner);
        drop(learner);

        // Interrupted and resumed, the fine-tune ends bit for bit where it would have.
        assert!(interrupted_and_resumed(config, &dir.path().join("tune2/out"), 5) == tuned, "{arch}: resumed fine-tune differs");

        // Trained from scratch with `model.architecture`, resumed bit for bit too.
        let mut config = ascii_config(&dir.path().join("scratch"));
        config.model.architecture = serde_json::from_value(Value::from(arch)).unwrap();
        if arch == "gpt2" {
            config.model.num_kv_heads = config.model.num_heads;
            config.model.tie_word_embeddings = true;
        }
        config.training.max_steps = 10;
        let mut full = Learner::new(config.clone()).unwrap();
        let summary = full.fit().unwrap();
        let first_loss = full.metrics.history.iter().find_map(|r| r.train_loss).unwrap();
        assert!(summary.final_train_loss.unwrap() < first_loss, "{arch}: loss did not fall");
        let expected = final_weights(&full);
        drop(full);
        let out = dir.path().join("scratch2/out");
        assert!(interrupted_and_resumed(config, &out, 4) == expected, "{arch}: resumed run from scratch differs");
        let bundle = out.join("models/inference/model_v1.0_final");
        let json: Value = serde_json::from_str(&std::fs::read_to_string(bundle.join("config.json")).unwrap()).unwrap();
        assert_eq!((json["model_type"].as_str(), json["architectures"][0].as_str()), (Some(arch), Some(p.arch.architecture().class_name())));
    }
}

/// The final weights of `config` run in `out`, stopped after `stop` steps and resumed from
/// its `checkpoint_latest` to the end.
fn interrupted_and_resumed(mut config: Config, out: &Path, stop: usize) -> Vec<kiln::params::NamedTensor> {
    config.output_dir = out.to_path_buf();
    let mut first = Learner::new(config.clone()).unwrap();
    first.stop_after_step = Some(stop);
    first.fit().unwrap();
    drop(first);
    let mut resumed = Learner::resume(config.clone(), &config.checkpoint_dir().join("checkpoint_latest.safetensors")).unwrap();
    resumed.fit().unwrap();
    final_weights(&resumed)
}

/// `check_in_transformers` for a bundle of architecture `arch`, whose tokenizer may add special
/// tokens (so no round trip of the text is asked for).
fn check_bundle_as(bundle: &Path, work: &Path, sample: &str, arch: &str) -> Value {
    let p = pretrained::load(bundle, &Device::flex(), &LoadOptions::default()).unwrap();
    assert!(p.report.unexpected.is_empty() && p.report.missing.is_empty(), "{:?}", p.report);
    let tokenizer = p.tokenizer.as_ref().unwrap();
    let ids = tokenizer.encode(sample).unwrap();
    let ids = &ids[..ids.len().min(40)];
    std::fs::write(work.join("ids.json"), serde_json::to_string(ids).unwrap()).unwrap();
    write_f32(&work.join("logits.f32"), &logits(&p.model, ids));
    std::fs::write(work.join("text.txt"), sample).unwrap();
    std::fs::write(work.join("text_ids.json"), serde_json::to_string(&tokenizer.encode(sample).unwrap()).unwrap()).unwrap();
    let s = |p: PathBuf| p.display().to_string();
    let mut args = vec![
        "check-bundle".to_string(), s(bundle.to_path_buf()), "--arch".into(), arch.into(),
        "--ids".into(), s(work.join("ids.json")), "--logits".into(), s(work.join("logits.f32")),
        "--text".into(), s(work.join("text.txt")), "--text-ids".into(), s(work.join("text_ids.json")),
    ];
    // transformers 5 swaps a qwen2 directory's tokenizer for its Qwen2Tokenizer pipeline
    // (README: what loads), which a character vocabulary is not.
    if arch == "qwen2" {
        args.push("--tokenizer-as-is".into());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = python(&args);
    serde_json::from_str(out.trim().lines().last().unwrap()).unwrap()
}

#[test]
fn a_fine_tune_killed_after_a_checkpoint_resumes_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    std::fs::write(dir.path().join("ids.json"), "[1, 2, 3]").unwrap();
    python(&["make-model", hf.to_str().unwrap(), "--ids", dir.path().join("ids.json").to_str().unwrap(), "--new-tokens", "1", "--rope-theta", "500000", "--max-positions", "48"]);
    let config_file = |out: &Path| {
        let config = ascii_config(out);
        let text = format!(
            "output_dir = {:?}\n[model]\ninit_from = {hf:?}\n[data]\npath = {:?}\nseq_len = 16\ncache_dir = {:?}\n\
             [training]\nbatch_size = 4\nmax_steps = 40\nwarmup_steps = 2\neval_every_steps = 10\neval_batches = 1\n\
             [checkpoint]\nsave_every_steps = 2\nasync_save = false\n",
            out.join("out"), config.data.path, out.join("cache"),
        );
        let path = out.join("tune.toml");
        std::fs::write(&path, text).unwrap();
        path
    };
    let kiln = || Command::new(env!("CARGO_BIN_EXE_kiln"));
    let whole = dir.path().join("whole");
    let output = kiln().args(["train", "--config"]).arg(config_file(&whole)).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let cut = dir.path().join("cut");
    let config = config_file(&cut);
    let mut child = kiln().args(["train", "--config"]).arg(&config).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let ck_dir = cut.join("out/checkpoints");
    let started = std::time::Instant::now();
    while !ck_dir.join("checkpoint_step_6.meta.json").exists() && started.elapsed() < std::time::Duration::from_secs(120) {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let latest = ck_dir.join("checkpoint_latest.safetensors");
    let step = kiln::checkpoint::load(&latest).unwrap().sidecar.global_step;
    assert!((6..40).contains(&step), "killed at step {step}");
    let output = kiln().args(["train", "--config"]).arg(&config).arg("--resume").arg(&latest).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));

    let weights = |run: &Path| {
        let file = kiln::safetensors_io::SafetensorsFile::open(&run.join("out/checkpoints/checkpoint_latest.safetensors")).unwrap();
        file.tensors().into_iter().map(|(name, ..)| { let bytes = file.read_raw(&name).unwrap().1; (name, bytes) }).collect::<Vec<_>>()
    };
    let (a, b) = (weights(&whole), weights(&cut));
    assert_eq!(a.len(), b.len());
    assert!(a == b, "the resumed fine-tune's weights differ from the uninterrupted one's");
}

#[test]
fn a_fine_tune_keeps_its_base_models_special_tokens_and_stops_at_the_same_eos() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, MIXED_TEXT).unwrap();
    let tokenizers = dir.path().join("tok");
    python(&["make-tokenizers", tokenizers.to_str().unwrap(), "--text", text.to_str().unwrap()]);
    let hf = dir.path().join("hf");
    std::fs::write(dir.path().join("ids.json"), "[0, 40, 41]").unwrap();
    python(&[
        "make-model", hf.to_str().unwrap(), "--ids", dir.path().join("ids.json").to_str().unwrap(), "--vocab", "500",
        "--tokenizer-from", tokenizers.join("llama3").to_str().unwrap(), "--special-ids", "0,1", "--new-tokens", "1",
    ]);
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let mut config = tiny_config(&dir.path().join("run"));
    config.model.init_from = Some(hf.clone());
    config.data.seq_len = 16;
    config.training.max_steps = 6;
    let mut learner = Learner::new(config.clone()).unwrap();
    learner.fit().unwrap();
    drop(learner);
    let bundle = config.bundle_dir().join("model_v1.0_final");
    let read = |name: &str| -> Value { serde_json::from_str(&std::fs::read_to_string(bundle.join(name)).unwrap()).unwrap() };
    for name in ["config.json", "generation_config.json"] {
        assert_eq!((read(name)["bos_token_id"].as_u64(), read(name)["eos_token_id"].as_u64()), (Some(0), Some(1)), "{name}");
    }
    let tokenizer_config = read("tokenizer_config.json");
    let base: Value = serde_json::from_str(&std::fs::read_to_string(hf.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tokenizer_config, base, "tokenizer_config.json carries over as the base model had it");
    assert_eq!(tokenizer_config["eos_token"], "<|end_of_text|>");
    assert!(tokenizer_config["chat_template"].as_str().unwrap().contains("<|begin_of_text|>"));

    // Stop at a token the model is sure to produce: the fifth of its unstopped continuation.
    let prompt = "Hello world";
    let generate = |extra: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["generate", "--model"]).arg(&bundle)
            .args(["--prompt", prompt, "--temperature", "0", "--max-new-tokens", "20"])
            .args(extra)
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8_lossy(&output.stdout).trim_end_matches('\n').to_string()
    };
    let p = pretrained::load(&bundle, &Device::flex(), &LoadOptions::default()).unwrap();
    let tokenizer = p.tokenizer.as_ref().unwrap();
    let ids = tokenizer.encode(prompt).unwrap();
    assert_eq!(ids[0], 0, "the prompt starts with <|begin_of_text|>");
    let options = SamplingOptions { max_new_tokens: 20, temperature: 0.0, top_k: None, seed: 0, eos_token_ids: Vec::new() };
    let free = generate_ids(&p.model, &ids, &options, &Device::flex()).unwrap();
    let k = (4..free.len()).find(|&i| !free[..i].contains(&free[i])).expect("a token not produced before");
    let mut generation = read("generation_config.json");
    generation["eos_token_id"] = serde_json::json!([free[k], 1]);
    std::fs::write(bundle.join("generation_config.json"), generation.to_string()).unwrap();

    let ours = generate(&[]);
    let theirs: Value = serde_json::from_str(python(&["generate", bundle.to_str().unwrap(), "--prompt", prompt, "--new-tokens", "20"]).trim()).unwrap();
    assert_eq!(theirs["prompt_ids"], serde_json::json!(ids));
    assert_eq!(theirs["ids"], serde_json::json!(free[..=k]), "transformers stopped at the EOS");
    assert_eq!(ours, theirs["text"].as_str().unwrap(), "kiln stops where transformers does");
    assert_eq!(ours, tokenizer.decode(&free[..=k]).unwrap());
}

#[test]
fn key_maps_never_merge_two_tensors_and_layer_gaps_load_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    std::fs::write(dir.path().join("ids.json"), "[1, 2, 3]").unwrap();
    python(&["make-model", hf.to_str().unwrap(), "--ids", dir.path().join("ids.json").to_str().unwrap(), "--new-tokens", "1", "--layers", "3"]);
    let reference = pretrained::load(&hf, &Device::flex(), &LoadOptions::default()).unwrap();

    // A rule that sends q_proj and k_proj to one name is refused, naming both.
    let options = LoadOptions::with_rules(&[r"\.(q|k)_proj\.=.qk_proj.".to_string()]).unwrap();
    let msg = format!("{:#}", pretrained::load(&hf, &Device::flex(), &options).err().unwrap());
    assert!(msg.contains("q_proj") && msg.contains("k_proj") && msg.contains("qk_proj"), "{msg}");

    // A pruned model whose layers are numbered 0, 2, 7 with a config of three layers.
    let pruned = dir.path().join("pruned");
    renamed_copy(&hf, &pruned, |n| Some(n.replace("layers.2.", "layers.7.").replace("layers.1.", "layers.2.")));
    let names: Vec<String> = kiln::safetensors_io::SafetensorsFile::open(&pruned.join("model.safetensors")).unwrap().tensors().into_iter().map(|t| t.0).collect();
    assert!(names.iter().any(|n| n.contains("layers.7.")) && !names.iter().any(|n| n.contains("layers.1.")), "{names:?}");
    let loaded = pretrained::load(&pruned, &Device::flex(), &LoadOptions::default()).unwrap();
    assert!(kiln::params::named_tensors(&loaded.model) == kiln::params::named_tensors(&reference.model));
    assert_eq!(loaded.report.reindexed_layers, [(2, 1), (7, 2)]);
}
