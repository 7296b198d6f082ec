//! `kiln quantize` to GGUF and GGUF read back (`inspect`, `generate`, `eval`, `convert`),
//! checked against the `gguf` package's reader and reference quantizer
//! (tests/python/gguf_check.py; `bash scripts/test.sh` installs `gguf` into .venv).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln::config::{TokenizerKind, TokenizerSetting};
use kiln::train::Learner;

use super::common::{repo_path, tiny_config};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln")).args(args).output().unwrap()
}

fn ok(output: Output, what: &str) -> String {
    assert!(output.status.success(), "{what} failed:\n{}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A tiny Llama with a 300-token byte-level BPE, trained a few steps and exported: every
/// matrix row divides into 32-value blocks, so each type quantizes every matrix.
fn bpe_bundle(dir: &Path, tokenizer: TokenizerKind) -> PathBuf {
    bundle_of(dir, tokenizer, kiln::model::Architecture::Llama)
}

fn bundle_of(dir: &Path, tokenizer: TokenizerKind, architecture: kiln::model::Architecture) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let mut config = tiny_config(dir);
    config.model.architecture = architecture;
    config.data.tokenizer = TokenizerSetting::Train(tokenizer);
    config.data.vocab_size = 300;
    config.model.hidden_size = 64;
    config.model.num_heads = 2;
    config.model.num_kv_heads = 1;
    config.model.intermediate_size = 128;
    config.training.max_steps = 6;
    config.training.eval_every_steps = 6;
    let mut learner = Learner::new(config).unwrap();
    learner.fit().unwrap();
    learner.exported.last().expect("the final bundle").clone()
}

fn gguf_check(file: &Path, bundle: &Path, ty: &str, dequantized: &Path) -> serde_json::Value {
    let output = Command::new("python3")
        .arg(repo_path("tests/python/gguf_check.py"))
        .args(["check", s(file), s(bundle), "--type", ty, "--dequantized", s(dequantized)])
        .output()
        .expect("python3 runs");
    assert!(
        output.status.success(),
        "gguf_check.py failed (needs numpy, safetensors and gguf: `bash scripts/test.sh` installs them):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(output.stdout.trim_ascii()).unwrap()
}

#[test]
fn quantized_files_hold_the_gguf_packages_own_blocks_and_read_back_as_it_reads_them() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bpe_bundle(dir.path(), TokenizerKind::Bpe);
    // Largest dequantization error relative to the block's largest magnitude: half a step
    // (1/254 for Q8_0, 1/16 for Q4_0, whose far end clamps a full step, 1/8) plus the f16 scale.
    for (ty, bound) in [("f32", 0.0), ("f16", 1.0 / 2048.0), ("bf16", 1.0 / 256.0), ("q8_0", 1.0 / 254.0 + 1.0 / 2048.0), ("q4_0", 1.0 / 8.0 + 1.0 / 1024.0)] {
        let file = dir.path().join(format!("model-{ty}.gguf"));
        ok(kiln(&["quantize", s(&bundle), "--type", ty, "--out", s(&file)]), "kiln quantize");
        let back = dir.path().join(format!("back-{ty}.safetensors"));
        ok(kiln(&["convert", s(&file), s(&back)]), "kiln convert FILE.gguf");
        let report = gguf_check(&file, &bundle, ty, &back);
        let errors = report["max_relative_error"].as_object().unwrap();
        for (stored, err) in errors {
            let err = err.as_f64().unwrap();
            let bound = if stored == "F32" { 0.0 } else { bound };
            assert!(err <= bound, "{ty}: {stored} tensors err {err} > {bound}");
        }
        assert!(errors.contains_key(&ty.to_uppercase()), "{ty}: no tensor of that type: {report}");
    }
    // An existing file is never replaced.
    let again = kiln(&["quantize", s(&bundle), "--type", "f32", "--out", s(&dir.path().join("model-f32.gguf"))]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
}

#[test]
fn a_gpt2_is_written_as_llama_cpps_gpt2_and_reads_back_as_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bundle_of(dir.path(), TokenizerKind::Bpe, kiln::model::Architecture::Gpt2);
    for ty in ["f32", "q8_0"] {
        let file = dir.path().join(format!("gpt2-{ty}.gguf"));
        ok(kiln(&["quantize", s(&bundle), "--type", ty, "--out", s(&file)]), "kiln quantize");
        let back = dir.path().join(format!("gpt2-back-{ty}.safetensors"));
        ok(kiln(&["convert", s(&file), s(&back)]), "kiln convert");
        gguf_check(&file, &bundle, ty, &back);
        if ty == "f32" {
            let generate = |model: &Path| ok(kiln(&["generate", "--model", s(model), "--prompt", "ROMEO:", "--max-new-tokens", "16", "--temperature", "0"]), "kiln generate");
            assert_eq!(generate(&file), generate(&bundle));
        }
    }
}

#[test]
fn a_gguf_file_generates_scores_and_inspects_as_its_source_model() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bpe_bundle(dir.path(), TokenizerKind::Bpe);
    let f32_file = dir.path().join("model.gguf");
    let q8_file = dir.path().join("model-q8.gguf");
    ok(kiln(&["quantize", s(&bundle), "--type", "f32", "--out", s(&f32_file)]), "quantize f32");
    ok(kiln(&["quantize", s(&bundle), "--type", "q8_0", "--out", s(&q8_file)]), "quantize q8_0");

    let generate = |model: &Path| ok(kiln(&["generate", "--model", s(model), "--prompt", "ROMEO:", "--max-new-tokens", "24", "--temperature", "0"]), "kiln generate");
    assert_eq!(generate(&f32_file), generate(&bundle), "greedy continuations differ");
    generate(&q8_file);

    let text = dir.path().join("text.txt");
    std::fs::write(&text, &std::fs::read_to_string(repo_path("data/shakespeare.txt")).unwrap()[200_000..204_000]).unwrap();
    let eval = |model: &Path| -> f64 {
        // The same windows for all (a bundle would default to its training sequence length).
        let out = ok(kiln(&["eval", "--model", s(model), "--text-file", s(&text), "--json", "--seq-len", "32"]), "kiln eval");
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["cross_entropy"].as_f64().unwrap()
    };
    let (reference, f32_loss, q8_loss) = (eval(&bundle), eval(&f32_file), eval(&q8_file));
    assert!((f32_loss - reference).abs() <= 1e-5 * reference, "f32 GGUF loss {f32_loss} against {reference}");
    assert!((q8_loss - reference).abs() <= 0.02 * reference, "q8_0 GGUF loss {q8_loss} against {reference}");

    let shown = ok(kiln(&["inspect", s(&q8_file)]), "kiln inspect");
    for text in ["GGUF v3", "general.architecture = \"llama\"", "tokenizer.ggml.pre = \"gpt-2\"", "blk.1.attn_q.weight", "Q8_0", "output_norm.weight"] {
        assert!(shown.contains(text), "inspect lacks {text}:\n{shown}");
    }
    let report: serde_json::Value = serde_json::from_str(&ok(kiln(&["inspect", s(&q8_file), "--json"]), "inspect --json")).unwrap();
    let source = kiln::safetensors_io::SafetensorsFile::open(&bundle.join("model.safetensors")).unwrap();
    assert_eq!(report["tensors"].as_array().unwrap().len(), source.tensors().len());

    // A checkpoint quantizes to the same tensors as the bundle exported from it.
    let checkpoint = bundle.parent().unwrap().parent().unwrap().parent().unwrap().join("checkpoints/checkpoint_latest.safetensors");
    let from_checkpoint = dir.path().join("from-checkpoint.gguf");
    ok(kiln(&["quantize", s(&checkpoint), "--type", "f32", "--out", s(&from_checkpoint)]), "quantize a checkpoint");
    let (a, b) = (kiln::gguf::GgufFile::open(&f32_file).unwrap(), kiln::gguf::GgufFile::open(&from_checkpoint).unwrap());
    assert_eq!(a.tensors, b.tensors);
    for t in &a.tensors {
        assert_eq!(a.bytes(t), b.bytes(t), "{}", t.name);
    }
}

#[test]
fn what_gguf_cannot_hold_or_kiln_cannot_read_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // A character vocabulary has no llama.cpp tokenizer type.
    let char_bundle = bpe_bundle(&dir.path().join("char"), TokenizerKind::Char);
    let out = dir.path().join("char.gguf");
    let refused = kiln(&["quantize", s(&char_bundle), "--type", "f32", "--out", s(&out)]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("character vocabulary") && !stderr.contains("panicked"), "{stderr}");
    assert!(!out.exists());
    let refused = kiln(&["quantize", s(&char_bundle), "--type", "q5_k", "--out", s(&out)]);
    assert!(String::from_utf8_lossy(&refused.stderr).contains("unknown type"));

    // Damaged files: truncated, a wrong magic, an absurd tensor count.
    let bundle = bpe_bundle(&dir.path().join("bpe"), TokenizerKind::Bpe);
    let good = dir.path().join("good.gguf");
    ok(kiln(&["quantize", s(&bundle), "--type", "q4_0", "--out", s(&good)]), "quantize");
    let bytes = std::fs::read(&good).unwrap();
    let mut bad_count = bytes.clone();
    bad_count[8..16].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    for (name, damaged) in [("truncated.gguf", bytes[..bytes.len() / 2].to_vec()), ("magic.gguf", [b"GGML", &bytes[4..]].concat()), ("count.gguf", bad_count)] {
        let path = dir.path().join(name);
        std::fs::write(&path, damaged).unwrap();
        for args in [vec!["inspect", s(&path)], vec!["generate", "--model", s(&path), "--prompt", "a"], vec!["convert", s(&path), s(&dir.path().join("x.safetensors"))]] {
            let output = kiln(&args);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(1), "{args:?}: {stderr}");
            assert!(stderr.contains(name) && !stderr.contains("panicked"), "{args:?}: {stderr}");
        }
    }
}

#[test]
fn json_dumps_hold_every_tensor_and_refuse_what_is_too_large() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = bpe_bundle(dir.path(), TokenizerKind::Bpe);
    let weights = bundle.join("model.safetensors");
    let dump = dir.path().join("dump.json");
    ok(kiln(&["convert", s(&weights), s(&dump)]), "convert to json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&dump).unwrap()).unwrap();
    let file = kiln::safetensors_io::SafetensorsFile::open(&weights).unwrap();
    let tensors = json["tensors"].as_array().unwrap();
    assert_eq!(tensors.len(), file.tensors().len());
    assert_eq!(json["metadata"]["format"], "pt");
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let (values, shape) = file.read_f32(name, None).unwrap();
        assert_eq!(t["shape"], serde_json::json!(shape), "{name}");
        let dumped: Vec<f32> = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
        assert_eq!(dumped, values, "{name}");
    }
    // A GGUF file dumps its own names, types and dequantized values.
    let gguf = dir.path().join("model.gguf");
    ok(kiln(&["quantize", s(&bundle), "--type", "q8_0", "--out", s(&gguf)]), "quantize");
    let gguf_dump = dir.path().join("gguf.json");
    ok(kiln(&["convert", s(&gguf), s(&gguf_dump)]), "convert gguf to json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&gguf_dump).unwrap()).unwrap();
    let file = kiln::gguf::GgufFile::open(&gguf).unwrap();
    let t = json["tensors"].as_array().unwrap().iter().find(|t| t["name"] == "blk.0.ffn_down.weight").unwrap();
    assert_eq!(t["dtype"], "Q8_0");
    let dumped: Vec<f32> = t["values"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
    assert_eq!(dumped, file.read_f32("blk.0.ffn_down.weight").unwrap());
    // Past the limit: refused, nothing written.
    let big = dir.path().join("big.safetensors");
    let n = kiln::convert::JSON_MAX_VALUES as usize + 1;
    let tensor = kiln::safetensors_io::PendingTensor::from_bytes("big", safetensors::Dtype::F32, vec![n], vec![0u8; 4 * n]);
    let mut out = std::fs::File::create(&big).unwrap();
    kiln::safetensors_io::write_to(&mut out, &Default::default(), vec![tensor]).unwrap();
    let refused = kiln(&["convert", s(&big), s(&dir.path().join("big.json"))]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("at most") && stderr.contains("big.safetensors"), "{stderr}");
    assert!(!dir.path().join("big.json").exists());
}

fn hf_compat(args: &[&str]) {
    let output = Command::new("python3").arg(repo_path("tests/python/hf_compat.py")).args(args).output().expect("python3 runs");
    assert!(output.status.success(), "hf_compat.py {args:?} failed:\n{}", String::from_utf8_lossy(&output.stderr));
}

#[test]
fn pretrained_tokenizers_become_llama_cpps_vocabularies_and_read_back_as_they_were() {
    let dir = tempfile::tempdir().unwrap();
    let text = dir.path().join("text.txt");
    std::fs::write(&text, "Hello world, héllo wörld! 12 345\n\tTabs and  spaces.").unwrap();
    let tokenizers = dir.path().join("tok");
    hf_compat(&["make-tokenizers", s(&tokenizers), "--text", s(&text)]);
    std::fs::write(dir.path().join("ids.json"), "[1, 40, 41]").unwrap();
    // (tokenizer, BOS and EOS ids, llama.cpp's model, its pre-tokenizer)
    for (name, special, model, pre) in [("llama2", "1,2", "llama", None), ("llama3", "0,1", "gpt2", Some("llama-bpe"))] {
        let hf = dir.path().join(format!("hf-{name}"));
        hf_compat(&["make-model", s(&hf), "--ids", s(&dir.path().join("ids.json")), "--vocab", "500", "--tokenizer-from", s(&tokenizers.join(name)), "--special-ids", special, "--new-tokens", "1"]);
        let file = dir.path().join(format!("{name}.gguf"));
        ok(kiln(&["quantize", s(&hf), "--type", "f32", "--out", s(&file)]), "kiln quantize");
        let gguf = kiln::gguf::GgufFile::open(&file).unwrap();
        let get = |k: &str| gguf.get(k).unwrap_or_else(|| panic!("{name}: no {k}")).clone();
        assert_eq!(get("tokenizer.ggml.model").as_str(), Some(model), "{name}");
        assert_eq!(gguf.get("tokenizer.ggml.pre").and_then(|v| v.as_str().map(str::to_owned)).as_deref(), pre, "{name}");
        let (bos, eos) = special.split_once(',').unwrap();
        assert_eq!(get("tokenizer.ggml.bos_token_id").as_u64(), Some(bos.parse().unwrap()), "{name}");
        assert_eq!(get("tokenizer.ggml.eos_token_id").as_u64(), Some(eos.parse().unwrap()), "{name}");
        let tokens = get("tokenizer.ggml.tokens");
        let types = get("tokenizer.ggml.token_type");
        let (tokens, types) = (tokens.as_array().unwrap(), types.as_array().unwrap());
        assert_eq!(tokens.len(), 500, "{name}: padded to the model's rows");
        let type_of = |token: &str| tokens.iter().position(|t| t.as_str() == Some(token)).map(|i| types[i].as_u64().unwrap());
        if name == "llama2" {
            assert_eq!(type_of("<0x41>"), Some(6), "byte tokens are BYTE");
            assert_eq!(type_of("<unk>"), Some(2));
            assert_eq!(type_of("<s>"), Some(3));
            assert_eq!(get("tokenizer.ggml.add_bos_token").as_bool(), Some(true));
            assert_eq!(get("tokenizer.ggml.add_space_prefix").as_bool(), Some(true));
            let scores = get("tokenizer.ggml.scores");
            assert!(scores.as_array().unwrap().iter().any(|v| v.as_f64().unwrap() < 0.0), "merged tokens score below 0");
        } else {
            assert!(get("tokenizer.ggml.merges").as_array().is_some_and(|m| !m.is_empty()));
        }
        assert_eq!(*types.last().unwrap(), kiln::gguf::Value::I32(5), "{name}: padding rows are UNUSED");
        // The file reads back with the tokenizer it was written with.
        let generate = |model: &Path| ok(kiln(&["generate", "--model", s(model), "--prompt", "Hello world", "--max-new-tokens", "8", "--temperature", "0"]), "kiln generate");
        assert_eq!(generate(&file), generate(&hf), "{name}");
    }
}
