//! The ModelSaver: versioned inference bundles in the layout Hugging Face `transformers` loads
//! (`AutoModelForCausalLM.from_pretrained(dir)`, `AutoTokenizer.from_pretrained(dir)`).
//!
//! A bundle is written into a hidden staging directory and renamed into place when complete,
//! so a half-written bundle never appears under its name, and an existing bundle is never
//! overwritten.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

use crate::checkpoint::storage::{LocalFs, Storage, parent, write_atomic};
use crate::config::ExportDtype;
use crate::model::ArchConfig;
use crate::safetensors_io::{PendingTensor, write_to};
use crate::tokenizer::KilnTokenizer;

/// The weights file of an unsharded bundle, and the index of a sharded one.
pub const WEIGHTS_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Everything a bundle is made from.
pub struct Bundle {
    /// The architecture, written as `config.json`.
    pub arch: ArchConfig,
    /// Tensors under Hugging Face names and layout, in state-dict order.
    pub tensors: Vec<PendingTensor>,
    pub tokenizer: KilnTokenizer,
    /// `training_metadata.json`.
    pub training_metadata: Value,
    /// The run's loss curve, copied into the bundle and shown in the model card.
    pub loss_curve_svg: Option<String>,
    /// The weights' dtype, written as `torch_dtype`.
    pub dtype: ExportDtype,
    /// Custom `__metadata__` entries of every weights file (see [`check_metadata`]).
    pub metadata: BTreeMap<String, String>,
    /// The model card, when not the one made from `training_metadata` (a merge's).
    pub card: Option<String>,
}

/// Refuses custom safetensors metadata that would clash with what loaders read: the `format`
/// key (transformers requires `"pt"`) and empty keys.
pub fn check_metadata(metadata: &BTreeMap<String, String>) -> std::result::Result<(), String> {
    if metadata.contains_key("format") {
        return Err("`format` is kiln's (\"pt\", which transformers requires); choose another key".into());
    }
    if metadata.contains_key("") {
        return Err("a key is empty".into());
    }
    Ok(())
}

/// Parses `KEY=VALUE` pairs (`kiln export --metadata`) over `base` (the run's `export.metadata`).
pub fn metadata_with(base: &BTreeMap<String, String>, pairs: &[String]) -> Result<BTreeMap<String, String>> {
    let mut metadata = base.clone();
    for pair in pairs {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("--metadata {pair:?}: expected KEY=VALUE");
        };
        metadata.insert(key.to_string(), value.to_string());
    }
    check_metadata(&metadata).map_err(|e| anyhow!("--metadata: {e}"))?;
    Ok(metadata)
}

/// Parses a shard size as Hugging Face does: decimal units (`"500MB"`, `"2GB"`), binary units
/// (`"512MiB"`), or a plain number of bytes.
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| anyhow!("`{text}` is not a size (examples: 500MB, 2GB, 1000000)"))?;
    let factor: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        other => bail!("`{text}`: unknown size unit `{other}` (use B, KB, MB, GB, TB, KiB, MiB, GiB)"),
    };
    let bytes = number * factor as f64;
    if !(bytes.is_finite() && bytes >= 1.0) {
        bail!("`{text}` must be at least one byte");
    }
    Ok(bytes as u64)
}

/// Groups tensors into shards as `huggingface_hub.split_torch_state_dict_into_shards` does:
/// in order, starting a new shard when the next tensor would push the current one past
/// `max_shard_size`; a tensor larger than the limit gets a shard of its own, emitted at once.
pub fn plan_shards(sizes: &[(String, u64)], max_shard_size: u64) -> Vec<Vec<usize>> {
    let mut shards: Vec<Vec<usize>> = Vec::new();
    let mut current: Vec<usize> = Vec::new();
    let mut current_size = 0u64;
    for (i, (_, size)) in sizes.iter().enumerate() {
        if *size > max_shard_size {
            shards.push(vec![i]);
            continue;
        }
        if !current.is_empty() && current_size + size > max_shard_size {
            shards.push(std::mem::take(&mut current));
            current_size = 0;
        }
        current.push(i);
        current_size += size;
    }
    if !current.is_empty() {
        shards.push(current);
    }
    shards
}

/// `config.json`: the architecture's Hugging Face config with its class, special-token ids and
/// dtype, as `save_pretrained` writes it.
pub fn config_json(arch: &ArchConfig, tokenizer: &KilnTokenizer) -> Value {
    let special = tokenizer.special_tokens();
    let mut config = arch.to_hf();
    let extra = json!({
        "architectures": [arch.architecture().class_name()],
        "attention_dropout": 0.0,
        "use_cache": true,
        "bos_token_id": special.bos_token_id,
        "eos_token_id": special.eos_json(),
        "pad_token_id": special.pad_token_id,
        "torch_dtype": "float32",
    });
    if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra) {
        config.extend(extra);
    }
    config
}

/// A pretrained tokenizer's `tokenizer_config.json` as it was (special tokens, chat template,
/// added tokens); for kiln's own tokenizers one that names the class and the special tokens.
fn tokenizer_config_json(arch: &ArchConfig, tokenizer: &KilnTokenizer) -> Value {
    let special = tokenizer.special_tokens();
    if let Some(config) = &special.tokenizer_config {
        return config.clone();
    }
    let token = |id: Option<u32>| id.and_then(|id| tokenizer.id_to_token(id));
    // Without `tokenizer_class`, transformers guesses a class from config.json's model type
    // (LlamaTokenizer), which cannot represent a character vocabulary.
    json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": arch.max_context(),
        "clean_up_tokenization_spaces": false,
        "bos_token": token(special.bos_token_id),
        "eos_token": token(special.eos_token_ids.first().copied()),
        "unk_token": null,
        "pad_token": token(special.pad_token_id),
    })
}

fn generation_config_json(tokenizer: &KilnTokenizer) -> Value {
    let special = tokenizer.special_tokens();
    json!({
        "_from_model_config": true,
        "bos_token_id": special.bos_token_id,
        "eos_token_id": special.eos_json(),
        "pad_token_id": special.pad_token_id,
        "do_sample": false,
    })
}

/// What a finished export wrote.
#[derive(Debug, Clone)]
pub struct ExportReport {
    pub dir: PathBuf,
    pub files: Vec<String>,
    pub shards: usize,
}

/// Writes `bundle` to `dir`, which must not exist yet.
pub fn write_bundle(dir: &Path, bundle: Bundle, max_shard_size: u64) -> Result<ExportReport> {
    if dir.exists() {
        bail!(
            "{} already exists; kiln never overwrites a bundle (choose another --version or --out)",
            dir.display()
        );
    }
    let storage = LocalFs;
    let root = parent(dir);
    std::fs::create_dir_all(root).with_context(|| format!("cannot create {}", root.display()))?;
    let staging = crate::checkpoint::storage::temp_path(dir);
    std::fs::create_dir(&staging).with_context(|| format!("cannot create {}", staging.display()))?;
    let result = fill(&staging, bundle, max_shard_size, &storage);
    let files = match result {
        Ok(files) => files,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    // `rename` onto an existing directory would fail (or replace an empty one); check again
    // right before, since an export may have raced us.
    if dir.exists() {
        let _ = std::fs::remove_dir_all(&staging);
        bail!("{} appeared while exporting; kiln never overwrites a bundle", dir.display());
    }
    std::fs::rename(&staging, dir)
        .with_context(|| format!("cannot move the bundle into {}", dir.display()))?;
    storage.sync_dir(root)?;
    let shards = files.iter().filter(|f| f.ends_with(".safetensors")).count();
    Ok(ExportReport {
        dir: dir.to_path_buf(),
        files,
        shards,
    })
}

fn fill(
    dir: &Path,
    bundle: Bundle,
    max_shard_size: u64,
    storage: &dyn Storage,
) -> Result<Vec<String>> {
    let mut files: Vec<String> = Vec::new();
    let put = |files: &mut Vec<String>, name: &str, bytes: &[u8]| -> Result<()> {
        write_atomic(storage, &dir.join(name), bytes)
            .with_context(|| format!("cannot write {}", dir.join(name).display()))?;
        files.push(name.to_string());
        Ok(())
    };
    let arch = bundle.arch.clone();
    let mut config = config_json(&arch, &bundle.tokenizer);
    config["torch_dtype"] = Value::from(bundle.dtype.name());
    put(&mut files, "config.json", &pretty(&config))?;
    put(&mut files, "generation_config.json", &pretty(&generation_config_json(&bundle.tokenizer)))?;
    put(&mut files, "tokenizer.json", bundle.tokenizer.to_json()?.as_bytes())?;
    put(&mut files, "tokenizer_config.json", &pretty(&tokenizer_config_json(&arch, &bundle.tokenizer)))?;
    put(&mut files, "training_metadata.json", &pretty(&bundle.training_metadata))?;
    if let Some(svg) = &bundle.loss_curve_svg {
        put(&mut files, "loss_curve.svg", svg.as_bytes())?;
    }
    let card = match &bundle.card {
        Some(card) => card.clone(),
        None => model_card(&arch, &bundle.training_metadata, bundle.loss_curve_svg.is_some(), &bundle.tokenizer),
    };
    put(&mut files, "README.md", card.as_bytes())?;

    // Weights, sharded past the limit.
    let sizes: Vec<(String, u64)> = bundle
        .tensors
        .iter()
        .map(|t| (t.name.clone(), t.byte_len() as u64))
        .collect();
    let total_size: u64 = sizes.iter().map(|s| s.1).sum();
    let total_parameters: u64 = bundle
        .tensors
        .iter()
        .map(|t| t.shape.iter().product::<usize>() as u64)
        .sum();
    let plan = plan_shards(&sizes, max_shard_size);
    let mut metadata = bundle.metadata.clone();
    metadata.insert("format".to_string(), "pt".to_string());
    let mut slots: Vec<Option<PendingTensor>> = bundle.tensors.into_iter().map(Some).collect();
    let n = plan.len();
    let mut weight_map = BTreeMap::new();
    for (k, members) in plan.iter().enumerate() {
        let name = if n == 1 {
            WEIGHTS_FILE.to_string()
        } else {
            format!("model-{:05}-of-{n:05}.safetensors", k + 1)
        };
        let tensors: Vec<PendingTensor> = members
            .iter()
            .map(|&i| slots[i].take().expect("each tensor is in one shard"))
            .collect();
        for t in &tensors {
            weight_map.insert(t.name.clone(), name.clone());
        }
        let path = dir.join(&name);
        let mut file = storage.create(&path)?;
        write_to(&mut *file, &metadata, tensors)
            .and_then(|_| file.sync())
            .with_context(|| format!("cannot write {}", path.display()))?;
        files.push(name);
    }
    if n > 1 {
        let index = json!({
            "metadata": {"total_parameters": total_parameters, "total_size": total_size},
            "weight_map": weight_map,
        });
        let mut text = serde_json::to_string_pretty(&index)?;
        text.push('\n');
        put(&mut files, INDEX_FILE, text.as_bytes())?;
    }
    storage.sync_dir(dir)?;
    Ok(files)
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).expect("JSON values serialize");
    s.push('\n');
    s.into_bytes()
}

/// The generated `README.md` model card.
pub fn model_card(arch: &ArchConfig, meta: &Value, has_curve: bool, tokenizer: &KilnTokenizer) -> String {
    let class = arch.architecture().class_name();
    let model_type = arch.architecture().model_type();
    let get = |path: &[&str]| -> String {
        let mut v = meta;
        for p in path {
            v = &v[*p];
        }
        match v {
            Value::Null => "n/a".to_string(),
            Value::String(s) => s.clone(),
            Value::Number(n) => match n.as_f64() {
                Some(f) if n.is_f64() => format!("{f:.4}"),
                _ => n.to_string(),
            },
            other => other.to_string(),
        }
    };
    let params = arch.num_params();
    let mut card = String::new();
    let _ = writeln!(card, "---\nlibrary_name: transformers\npipeline_tag: text-generation\ntags:\n- kiln\n- {model_type}\n---\n");
    let origin = match meta["hyperparameters"]["model"]["init_from"].as_str() {
        Some(base) => format!("fine-tuned from `{base}`"),
        None => "trained from scratch".to_string(),
    };
    let _ = write!(
        card,
        "# {name}\n\n\
         A {params_h}-parameter decoder-only language model ({class}), {origin} with kiln \
         (Rust, Burn {burn}) on `{data}`. Expect text in the style of its corpus, not facts.\n\n",
        name = get(&["bundle_name"]),
        params_h = human_count(params),
        burn = get(&["burn_version"]),
        data = get(&["data", "path"]),
    );
    card.push_str("## Architecture\n\n| | |\n| --- | --- |\n");
    let mut rows = vec![
        ("architecture", class.to_string()),
        ("parameters", format!("{params} ({})", human_count(params))),
    ];
    rows.extend(arch.summary());
    rows.push(("vocabulary", format!("{} ({} tokenizer)", arch.vocab_size(), tokenizer.describe())));
    rows.push(("context length", arch.max_context().to_string()));
    for (k, v) in rows {
        let _ = writeln!(card, "| {k} | {v} |");
    }
    card.push_str("\n## Training\n\n| | |\n| --- | --- |\n");
    for (k, v) in [
        ("data", format!("`{}` (sha256 `{}`)", get(&["data", "path"]), get(&["data", "sha256"]))),
        ("steps", get(&["global_step"])),
        ("epochs completed", get(&["epochs_completed"])),
        ("tokens seen", get(&["tokens_seen"])),
        ("batch size x sequence length", format!("{} x {}", get(&["hyperparameters", "training", "batch_size"]), get(&["hyperparameters", "data", "seq_len"]))),
        ("gradient accumulation steps", get(&["hyperparameters", "training", "grad_accum_steps"])),
        ("optimizer", format!("AdamW (lr {}, betas {}/{}, weight decay {}), warmup {} steps, cosine to {}",
            get(&["hyperparameters", "training", "learning_rate"]),
            get(&["hyperparameters", "training", "beta1"]),
            get(&["hyperparameters", "training", "beta2"]),
            get(&["hyperparameters", "training", "weight_decay"]),
            get(&["hyperparameters", "training", "warmup_steps"]),
            get(&["hyperparameters", "training", "min_lr"]))),
        ("final train loss", get(&["final_metrics", "train_loss"])),
        ("final validation loss", get(&["final_metrics", "val_loss"])),
        ("best validation metric", format!("{} {} at step {}", get(&["best_metric", "name"]), get(&["best_metric", "value"]), get(&["best_metric", "step"]))),
        ("training time", format!("{} s", get(&["wall_seconds"]))),
        ("backend / hardware", format!("{} / {}", get(&["backend"]), get(&["hardware", "cpu"]))),
        ("exported", get(&["exported_at"])),
        ("kiln version", get(&["kiln_version"])),
    ] {
        let _ = writeln!(card, "| {k} | {v} |");
    }
    if has_curve {
        card.push_str("\n![Loss curve](loss_curve.svg)\n");
    }
    let _ = write!(
        card,
        "\n## Use\n\nWith kiln:\n\n```sh\nkiln generate --model . --prompt \"ROMEO:\" --max-new-tokens 200 --temperature 0.8 --top-k 40\nkiln eval --model . --text-file some.txt\n```\n\n\
         With Python `transformers`:\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n\
         model = AutoModelForCausalLM.from_pretrained(\"path/to/this/dir\")\n\
         tokenizer = AutoTokenizer.from_pretrained(\"path/to/this/dir\")\n\
         ids = tokenizer(\"ROMEO:\", return_tensors=\"pt\").input_ids\n\
         out = model.generate(ids, max_new_tokens=200, do_sample=True, temperature=0.8, top_k=40)\n\
         print(tokenizer.decode(out[0]))\n```\n\n\
         ## Limitations\n\n\
         - Trained on a single small corpus; it knows nothing beyond it and reproduces its style, \
         spelling and biases.\n\
         - With a character-level vocabulary, characters never seen in training cannot be encoded.\n\
         - Context is limited to {ctx} tokens; no instruction tuning, no safety tuning.\n\
         - Validation loss is measured on the held-out tail of the same corpus, which flatters \
         the model compared with text from elsewhere.\n",
        ctx = arch.max_context(),
    );
    card
}

fn human_count(n: usize) -> String {
    match n {
        n if n >= 1_000_000_000 => format!("{:.1}B", n as f64 / 1e9),
        n if n >= 1_000_000 => format!("{:.1}M", n as f64 / 1e6),
        n if n >= 1_000 => format!("{:.1}k", n as f64 / 1e3),
        n => n.to_string(),
    }
}

/// A short description of the machine, for `training_metadata.json`.
pub fn hardware() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string());
    let memory_gb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map(|kb| (kb / 1e6 * 10.0).round() / 10.0)
    });
    json!({
        "cpu": cpu,
        "cores": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        "memory_gb": memory_gb,
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_like_hugging_face() {
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1.5GB").unwrap(), 1_500_000_000);
        assert_eq!(parse_size("10KiB").unwrap(), 10_240);
        assert_eq!(parse_size("12345").unwrap(), 12_345);
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn shards_fill_in_order_and_big_tensors_stand_alone() {
        let sizes: Vec<(String, u64)> = [40, 30, 50, 200, 10, 10]
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("t{i}"), *s))
            .collect();
        // As huggingface_hub: an oversized tensor's shard is emitted at once, before the
        // shard still being filled.
        assert_eq!(plan_shards(&sizes, 100), vec![vec![0, 1], vec![3], vec![2, 4, 5]]);
        assert_eq!(plan_shards(&sizes, 1000), vec![vec![0, 1, 2, 3, 4, 5]]);
    }
}

/// `training_metadata.json` for a bundle made from the checkpoint `sidecar`.
pub fn training_metadata(sidecar: &crate::checkpoint::sidecar::Sidecar, bundle_name: &str) -> Value {
    let c = &sidecar.config;
    json!({
        "bundle_name": bundle_name,
        "source_checkpoint": sidecar.name,
        "hyperparameters": c,
        "final_metrics": sidecar.metrics,
        "best_metric": sidecar.best_metric,
        "global_step": sidecar.global_step,
        "epochs_completed": sidecar.epoch,
        "tokens_seen": sidecar.global_step * sidecar.global_batch() * c.data.seq_len,
        "wall_seconds": (sidecar.train_seconds * 1000.0).round() / 1000.0,
        "started_at": sidecar.started_at,
        "checkpoint_created_at": sidecar.created_at,
        "exported_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "data": {"path": c.data.path.display().to_string(), "sources": c.data.effective_sources(), "sha256": sidecar.data_sha256, "tokenizer": c.data.tokenizer, "val_fraction": c.data.val_fraction},
        "kiln_version": env!("CARGO_PKG_VERSION"),
        "burn_version": sidecar.burn_version,
        "backend": sidecar.backend,
        "hardware": hardware(),
    })
}

/// Exports a verified checkpoint as a bundle in `dir`. The weights are copied tensor by tensor
/// from the checkpoint file (already in Hugging Face names and layout), in state-dict order.
pub fn export_checkpoint(
    ck: &crate::checkpoint::LoadedCheckpoint,
    dir: &Path,
    max_shard_size: u64,
    dtype: ExportDtype,
    metadata: &BTreeMap<String, String>,
) -> Result<ExportReport> {
    let s = &ck.sidecar;
    let tokenizer = KilnTokenizer::from_json(&s.tokenizer.to_string(), s.special_tokens.clone())?;
    let names = s.model.hf_param_names();
    let mut tensors = Vec::with_capacity(names.len());
    for name in names {
        let info = ck.weights.info(&name)?;
        if info.dtype != safetensors::Dtype::F32 {
            bail!("{}: `{name}` is {:?}; kiln checkpoints hold F32", ck.paths.weights.display(), info.dtype);
        }
        let bytes = ck.weights.read_bytes(info)?;
        let (dtype, bytes) = narrow(&bytes, dtype);
        tensors.push(PendingTensor::from_bytes(name, dtype, info.shape.clone(), bytes));
    }
    let bundle_name = dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let bundle = Bundle {
        arch: s.model.clone(),
        tensors,
        tokenizer,
        training_metadata: training_metadata(s, &bundle_name),
        loss_curve_svg: crate::plot::loss_curve_svg(&s.metrics_history, &format!("{bundle_name}: loss curve")),
        dtype,
        metadata: metadata.clone(),
        card: None,
    };
    write_bundle(dir, bundle, max_shard_size)
}

/// The safetensors dtype of a bundle exported in `dtype`.
pub fn safetensors_dtype(dtype: ExportDtype) -> safetensors::Dtype {
    match dtype {
        ExportDtype::Float32 => safetensors::Dtype::F32,
        ExportDtype::Bfloat16 => safetensors::Dtype::BF16,
        ExportDtype::Float16 => safetensors::Dtype::F16,
    }
}

/// f32 values as little-endian bytes of `dtype` (see [`narrow`]).
pub fn narrow_values(values: &[f32], dtype: ExportDtype) -> Vec<u8> {
    narrow(&crate::safetensors_io::f32_bytes(values), dtype).1
}

/// Rounds f32 values to the nearest `dtype` value, in place (as a cast to it and back).
pub fn round_to(values: &mut [f32], dtype: ExportDtype) {
    match dtype {
        ExportDtype::Float32 => {}
        ExportDtype::Bfloat16 => values.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
        ExportDtype::Float16 => values.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
    }
}

/// Little-endian f32 bytes as `dtype`, rounded to nearest even as PyTorch's `.to()` does.
fn narrow(f32_bytes: &[u8], dtype: ExportDtype) -> (safetensors::Dtype, Vec<u8>) {
    let values = f32_bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
    match dtype {
        ExportDtype::Float32 => (safetensors::Dtype::F32, f32_bytes.to_vec()),
        ExportDtype::Bfloat16 => (
            safetensors::Dtype::BF16,
            values.flat_map(|v| half::bf16::from_f32(v).to_bits().to_le_bytes()).collect(),
        ),
        ExportDtype::Float16 => (
            safetensors::Dtype::F16,
            values.flat_map(|v| half::f16::from_f32(v).to_bits().to_le_bytes()).collect(),
        ),
    }
}
