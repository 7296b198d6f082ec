//! `kiln inspect` and `kiln checkpoints`: what is in a safetensors file, and which checkpoints
//! a run has, as a human table or JSON.

use std::path::Path;

use anyhow::{Result, bail};
use serde_json::{Value, json};

use crate::checkpoint::sidecar::{CheckpointPaths, Sidecar};
use crate::checkpoint::{self, storage::parent};
use crate::safetensors_io::SafetensorsFile;

/// The facts `inspect` reports about one safetensors file.
pub fn describe_file(path: &Path) -> Result<Value> {
    let file = SafetensorsFile::open(path)?;
    let bytes = std::fs::metadata(path)?.len();
    let tensors: Vec<Value> = file
        .tensors()
        .into_iter()
        .map(|(name, dtype, shape, size)| {
            json!({"name": name, "dtype": format!("{dtype:?}"), "shape": shape, "bytes": size})
        })
        .collect();
    let parameters: u64 = file
        .tensors()
        .iter()
        .map(|(_, _, shape, _)| shape.iter().product::<usize>() as u64)
        .sum();
    Ok(json!({
        "path": path.display().to_string(),
        "bytes": bytes,
        "metadata": file.metadata(),
        "parameters": parameters,
        "tensors": tensors,
    }))
}

/// The facts `inspect` reports about a GGUF file: its metadata (long arrays shortened to their
/// first items and length) and tensors.
pub fn describe_gguf(path: &Path) -> Result<Value> {
    let file = crate::gguf::GgufFile::open(path)?;
    let metadata: serde_json::Map<String, Value> = file.metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.display()))).collect();
    let tensors: Vec<Value> = file
        .tensors
        .iter()
        .map(|t| json!({"name": t.name, "type": t.ty.name(), "shape": t.shape, "bytes": t.byte_len()}))
        .collect();
    let parameters: u64 = file.tensors.iter().map(|t| t.shape.iter().product::<usize>() as u64).sum();
    Ok(json!({
        "path": path.display().to_string(),
        "bytes": std::fs::metadata(path)?.len(),
        "gguf_version": file.version,
        "alignment": file.alignment,
        "metadata": metadata,
        "parameters": parameters,
        "tensors": tensors,
    }))
}

fn print_gguf(r: &Value) {
    println!("file        {}", r["path"].as_str().unwrap_or(""));
    println!("format      GGUF v{} (alignment {})", r["gguf_version"], r["alignment"]);
    println!("size        {}", human_bytes(r["bytes"].as_u64().unwrap_or(0)));
    println!("parameters  {}", r["parameters"]);
    println!("metadata");
    for (k, v) in r["metadata"].as_object().into_iter().flatten() {
        println!("  {k} = {}", v.as_str().unwrap_or(""));
    }
    println!("tensors");
    for t in r["tensors"].as_array().into_iter().flatten() {
        println!("  {:<40} {:<5} {:?}", t["name"].as_str().unwrap_or(""), t["type"].as_str().unwrap_or(""), t["shape"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect::<Vec<_>>()).unwrap_or_default());
    }
}

/// Sidecar summary of the checkpoint `path` belongs to, with its verification result; `None`
/// when the file is not part of a checkpoint.
fn describe_checkpoint(path: &Path) -> Option<Value> {
    let paths = CheckpointPaths::from_any(path);
    if !paths.sidecar.exists() {
        return None;
    }
    Some(match Sidecar::read(&paths.sidecar) {
        Ok(sidecar) => {
            let verified = sidecar.verify_files(parent(&paths.sidecar));
            let mut v = summary(&sidecar);
            v["valid"] = json!(verified.is_ok());
            if let Err(e) = verified {
                v["error"] = json!(e.to_string());
            }
            v
        }
        Err(e) => json!({"valid": false, "error": e.to_string()}),
    })
}

fn summary(s: &Sidecar) -> Value {
    json!({
        "name": s.name,
        "kind": s.kind,
        "epoch": s.epoch,
        "global_step": s.global_step,
        "data_position": s.data_position,
        "metrics": s.metrics,
        "best_metric": s.best_metric,
        "optimizer_step": s.optimizer.step,
        "ema_decay": s.ema_decay,
        "created_at": s.created_at,
        "backend": s.backend,
        "kiln_version": s.kiln_version,
        "files": s.files,
    })
}

/// The facts `inspect` reports about a bundle or Hugging Face directory (or its shard index):
/// the architecture from `config.json`, every tensor with the file holding it, and the index.
pub fn describe_bundle(dir: &Path) -> Result<Value> {
    let arch = crate::model::ArchConfig::read(dir)?;
    let weights = crate::pretrained::WeightFiles::open(dir)?;
    let mut tensors = Vec::new();
    let mut parameters = 0u64;
    let mut tensor_bytes = 0u64;
    for file in weights.files() {
        let file_name = file.path().file_name().unwrap_or_default().to_string_lossy().into_owned();
        for (name, dtype, shape, size) in file.tensors() {
            parameters += shape.iter().product::<usize>() as u64;
            tensor_bytes += size as u64;
            tensors.push(json!({"name": name, "dtype": format!("{dtype:?}"), "shape": shape, "bytes": size, "file": file_name}));
        }
    }
    let files: Vec<Value> = weights
        .files()
        .iter()
        .map(|f| {
            json!({
                "name": f.path().file_name().unwrap_or_default().to_string_lossy(),
                "bytes": std::fs::metadata(f.path()).map(|m| m.len()).unwrap_or(0),
                "metadata": f.metadata(),
            })
        })
        .collect();
    let index = std::fs::read_to_string(dir.join(crate::export::INDEX_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    if let Some(index) = &index
        && let Some(total) = index["metadata"]["total_size"].as_u64()
        && total != tensor_bytes
    {
        bail!(
            "{}: total_size {total} does not match the {tensor_bytes} bytes of tensors in the shards",
            dir.join(crate::export::INDEX_FILE).display()
        );
    }
    let training = std::fs::read_to_string(dir.join("training_metadata.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok());
    Ok(json!({
        "path": dir.display().to_string(),
        "architecture": arch.to_hf(),
        "parameters": parameters,
        "bytes": tensor_bytes,
        "files": files,
        "sharded": index.is_some(),
        "index_metadata": index.as_ref().map(|i| i["metadata"].clone()),
        "tensors": tensors,
        "training": training.map(|t| json!({
            "global_step": t["global_step"],
            "final_metrics": t["final_metrics"],
            "best_metric": t["best_metric"],
            "exported_at": t["exported_at"],
        })),
    }))
}

fn print_bundle(r: &Value) {
    println!("bundle      {}", r["path"].as_str().unwrap_or(""));
    println!("model       {}", r["architecture"]);
    println!("parameters  {}", r["parameters"]);
    println!("size        {}", human_bytes(r["bytes"].as_u64().unwrap_or(0)));
    if r["sharded"].as_bool() == Some(true) {
        println!("index       {}", r["index_metadata"]);
    }
    println!("files");
    for f in r["files"].as_array().into_iter().flatten() {
        println!(
            "  {}  {}  {}",
            f["name"].as_str().unwrap_or(""),
            human_bytes(f["bytes"].as_u64().unwrap_or(0)),
            f["metadata"]
        );
    }
    if !r["training"].is_null() {
        println!("training    {}", r["training"]);
    }
    let tensors = r["tensors"].as_array().cloned().unwrap_or_default();
    let width = tensors.iter().map(|t| t["name"].as_str().unwrap_or("").len()).max().unwrap_or(4).max(4);
    println!("tensors     {}", tensors.len());
    println!("  {:width$}  {:5}  {:20}  file", "name", "dtype", "shape");
    for t in &tensors {
        println!(
            "  {:width$}  {:5}  {:20}  {}",
            t["name"].as_str().unwrap_or(""),
            t["dtype"].as_str().unwrap_or(""),
            t["shape"].to_string(),
            t["file"].as_str().unwrap_or("")
        );
    }
}

pub fn inspect(path: &Path, as_json: bool) -> Result<()> {
    if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) {
        let report = describe_gguf(path)?;
        if as_json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_gguf(&report);
        }
        return Ok(());
    }
    // A bundle (directory) or its shard index describes the whole model.
    let bundle_dir = if path.is_dir() {
        Some(path.to_path_buf())
    } else if path.to_string_lossy().ends_with(".index.json") {
        Some(parent(path).to_path_buf())
    } else {
        None
    };
    if let Some(dir) = bundle_dir {
        let report = describe_bundle(&dir)?;
        if as_json {
            println!("{}", serde_json::to_string_pretty(&report)?);
        } else {
            print_bundle(&report);
        }
        return Ok(());
    }
    let mut report = describe_file(path)?;
    let checkpoint = describe_checkpoint(path);
    let invalid = checkpoint
        .as_ref()
        .and_then(|c| c.get("error").and_then(Value::as_str).map(str::to_owned));
    if let Some(c) = checkpoint {
        report["checkpoint"] = c;
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_file(&report);
    }
    if let Some(error) = invalid {
        bail!("checkpoint does not verify: {error}");
    }
    Ok(())
}

fn print_file(r: &Value) {
    println!("file        {}", r["path"].as_str().unwrap_or(""));
    println!("size        {}", human_bytes(r["bytes"].as_u64().unwrap_or(0)));
    println!("parameters  {}", r["parameters"]);
    if let Some(meta) = r["metadata"].as_object()
        && !meta.is_empty()
    {
        println!("metadata");
        for (k, v) in meta {
            println!("  {k} = {}", v.as_str().unwrap_or(""));
        }
    }
    let tensors = r["tensors"].as_array().cloned().unwrap_or_default();
    let width = tensors
        .iter()
        .map(|t| t["name"].as_str().unwrap_or("").len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!("tensors     {}", tensors.len());
    println!("  {:width$}  {:5}  shape", "name", "dtype");
    for t in &tensors {
        println!(
            "  {:width$}  {:5}  {}",
            t["name"].as_str().unwrap_or(""),
            t["dtype"].as_str().unwrap_or(""),
            t["shape"]
        );
    }
    if let Some(c) = r.get("checkpoint") {
        println!("checkpoint");
        if let Some(kind) = c.get("kind") {
            println!("  name      {}", c["name"].as_str().unwrap_or(""));
            println!("  kind      {}", kind.as_str().unwrap_or(""));
            println!("  epoch     {}", c["epoch"]);
            println!("  step      {}", c["global_step"]);
            println!("  metrics   {}", c["metrics"]);
            if !c["best_metric"].is_null() {
                println!("  best      {}", c["best_metric"]);
            }
            println!("  created   {}", c["created_at"].as_str().unwrap_or(""));
            println!("  backend   {}", c["backend"].as_str().unwrap_or(""));
        }
        match c["valid"].as_bool() {
            Some(true) => println!("  checksums verified"),
            _ => println!("  checksums FAILED: {}", c["error"].as_str().unwrap_or("")),
        }
    }
}

pub fn checkpoints(dir: &Path, as_json: bool) -> Result<()> {
    // A run's output directory holds its checkpoints in `checkpoints/`.
    let dir = if dir.join("checkpoints").is_dir() {
        dir.join("checkpoints")
    } else {
        dir.to_path_buf()
    };
    if !dir.is_dir() {
        bail!("{} is not a directory", dir.display());
    }
    let mut rows = Vec::new();
    for listed in checkpoint::list(&dir)? {
        let size: u64 = listed
            .paths
            .all()
            .iter()
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let row = match &listed.sidecar {
            Ok(s) => {
                let verified = checkpoint::verify(&listed.paths);
                let metric = s.best_metric.as_ref().map_or(s.config.checkpoint.metric, |b| b.name);
                json!({
                    "name": listed.name,
                    "kind": s.kind,
                    "epoch": s.epoch,
                    "step": s.global_step,
                    "metric": metric,
                    "value": s.metrics.get(metric.name()),
                    "bytes": size,
                    "valid": verified.is_ok(),
                    "error": verified.err().map(|e| e.to_string()),
                })
            }
            Err(e) => json!({"name": listed.name, "bytes": size, "valid": false, "error": e}),
        };
        rows.push(row);
    }
    if as_json {
        println!("{}", serde_json::to_string_pretty(&json!({"dir": dir.display().to_string(), "checkpoints": rows}))?);
        return Ok(());
    }
    if rows.is_empty() {
        println!("no checkpoints in {}", dir.display());
        return Ok(());
    }
    let width = rows
        .iter()
        .map(|r| r["name"].as_str().unwrap_or("").len())
        .max()
        .unwrap_or(4);
    println!(
        "{:width$}  {:6}  {:>5}  {:>8}  {:>22}  {:>10}  valid",
        "name", "kind", "epoch", "step", "metric", "size"
    );
    for r in &rows {
        let metric = match (r["metric"].as_str(), r["value"].as_f64()) {
            (Some(m), Some(v)) => format!("{m} {v:.4}"),
            (Some(m), None) => format!("{m} -"),
            _ => "-".into(),
        };
        let valid = if r["valid"].as_bool() == Some(true) {
            "yes".to_string()
        } else {
            format!("NO: {}", r["error"].as_str().unwrap_or(""))
        };
        println!(
            "{:width$}  {:6}  {:>5}  {:>8}  {:>22}  {:>10}  {valid}",
            r["name"].as_str().unwrap_or(""),
            r["kind"].as_str().unwrap_or("?"),
            r["epoch"].as_u64().map_or("-".into(), |v| v.to_string()),
            r["step"].as_u64().map_or("-".into(), |v| v.to_string()),
            metric,
            human_bytes(r["bytes"].as_u64().unwrap_or(0)),
        );
    }
    Ok(())
}

pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1000.0 && unit < UNITS.len() - 1 {
        v /= 1000.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
