//! `kiln convert IN OUT`: rewrite a weights file in another format, chosen by the extensions:
//!
//! - a PyTorch checkpoint (`.bin`, `.pt`, `.pth`, read by [`crate::pytorch`], so a hostile
//!   pickle is refused and nothing in it runs) to `.safetensors`, as below;
//! - a GGUF file of a Llama or Qwen2 model to `.safetensors`: its tensors dequantized to F32,
//!   under their Hugging Face names and in their layout (see [`crate::gguf_model`]);
//! - any of these or a `.safetensors` file to `.json`, a dump for debugging: every tensor's
//!   name, dtype, shape and values (as f32), and the file's metadata, refused past
//!   [`JSON_MAX_VALUES`] values, which no text editor would open anyway.
//!
//! The output holds what Python's `safetensors.torch.save_file(torch.load(IN, weights_only=True),
//! OUT)` would write: the same names, dtypes, shapes and bytes, each tensor contiguous (a strided
//! view is gathered; tensors sharing a storage are written separately), with the header metadata
//! `{"format": "pt"}` that transformers checks for. Tensors are streamed through the repo's
//! safetensors writer a batch at a time, so a large checkpoint is never held in memory whole.
//! The file is written under a temporary name beside OUT, fsynced, then linked to OUT only if
//! OUT does not exist yet: a failed convert leaves nothing under OUT's name, and an existing
//! OUT is never replaced.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result, anyhow, bail};

use crate::checkpoint::storage::{LocalFs, Storage, parent, write_temp};
use crate::pytorch::TorchFile;
use crate::safetensors_io::{PendingTensor, TensorSource, write_to};

/// Converts `input` to `output`, choosing the conversion by their extensions.
pub fn convert(input: &Path, output: &Path) -> Result<()> {
    let ext = |p: &Path| p.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    match (ext(input).as_str(), ext(output).as_str()) {
        ("bin" | "pt" | "pth", "safetensors") => torch_to_safetensors(input, output),
        ("gguf", "safetensors") => gguf_to_safetensors(input, output),
        ("bin" | "pt" | "pth" | "gguf" | "safetensors", "json") => json_dump(input, output),
        _ => bail!(
            "kiln convert: cannot convert {} to {}; supported: a PyTorch file (.bin, .pt or .pth) \
             or a .gguf to .safetensors, and any of these or a .safetensors to .json",
            input.display(),
            output.display()
        ),
    }
}

/// The most values a `.json` dump holds (about 150 MB of text).
pub const JSON_MAX_VALUES: u64 = 10_000_000;

fn gguf_to_safetensors(input: &Path, output: &Path) -> Result<()> {
    if output.symlink_metadata().is_ok() {
        return Err(exists_error(output));
    }
    let model = crate::gguf_model::GgufModel::open(input)?;
    let tmp = crate::checkpoint::storage::temp_path(output);
    if let Err(e) = model.write_safetensors(&tmp) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("cannot sync {}", tmp.display()))?;
    place_new(&LocalFs, &tmp, output)?;
    eprintln!("kiln: converted {} tensors from {} to {}", model.num_tensors(), input.display(), output.display());
    Ok(())
}

/// Every tensor of a file: name, dtype, shape.
type TensorList = Vec<(String, String, Vec<usize>)>;

fn json_dump(input: &Path, output: &Path) -> Result<()> {
    use serde_json::{Value, json};
    if output.symlink_metadata().is_ok() {
        return Err(exists_error(output));
    }
    let ext = input.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase).unwrap_or_default();
    let (list, metadata, read): (TensorList, Value, Box<dyn Fn(&str) -> Result<Vec<f32>>>) = match ext.as_str() {
        "safetensors" => {
            let file = crate::safetensors_io::SafetensorsFile::open(input)?;
            let list = file.tensors().into_iter().map(|(n, d, s, _)| (n, format!("{d:?}"), s)).collect();
            let metadata = json!(file.metadata());
            (list, metadata, Box::new(move |name: &str| Ok(file.read_f32(name, None)?.0)))
        }
        "gguf" => {
            let file = crate::gguf::GgufFile::open(input)?;
            let list = file.tensors.iter().map(|t| (t.name.clone(), t.ty.name().to_string(), t.shape.clone())).collect();
            let metadata = Value::Object(file.metadata.iter().map(|(k, v)| (k.clone(), Value::String(v.display()))).collect());
            (list, metadata, Box::new(move |name: &str| file.read_f32(name)))
        }
        _ => {
            let file = TorchFile::open(input)?;
            let list = file.tensors().into_iter().map(|(n, d, s)| (n, format!("{d:?}"), s)).collect();
            (list, json!({}), Box::new(move |name: &str| file.read_f32(name)))
        }
    };
    let total: u64 = list.iter().map(|(_, _, s)| s.iter().product::<usize>() as u64).sum();
    if total > JSON_MAX_VALUES {
        bail!(
            "{} holds {total} values; a .json dump is for inspecting small models and holds at most \
             {JSON_MAX_VALUES} (convert to .safetensors instead)",
            input.display()
        );
    }
    let mut tensors = Vec::with_capacity(list.len());
    for (name, dtype, shape) in &list {
        let values = read(name).with_context(|| format!("{}: tensor `{name}`", input.display()))?;
        // JSON has no NaN or infinity: they are written as strings.
        let values: Vec<Value> = values.into_iter().map(|v| if v.is_finite() { json!(v) } else { json!(v.to_string()) }).collect();
        tensors.push(json!({"name": name, "dtype": dtype, "shape": shape, "values": values}));
    }
    let dump = json!({"source": input.display().to_string(), "metadata": metadata, "tensors": tensors});
    let text = serde_json::to_vec_pretty(&dump)?;
    crate::checkpoint::storage::write_atomic(&LocalFs, output, &text).with_context(|| format!("cannot write {}", output.display()))?;
    eprintln!("kiln: dumped {} tensors ({total} values) from {} to {}", list.len(), input.display(), output.display());
    Ok(())
}

fn exists_error(output: &Path) -> anyhow::Error {
    anyhow!("{} already exists; kiln convert never overwrites a file", output.display())
}

fn torch_to_safetensors(input: &Path, output: &Path) -> Result<()> {
    if output.symlink_metadata().is_ok() {
        return Err(exists_error(output));
    }
    let torch = Arc::new(TorchFile::open(input)?);
    // The writer asks each tensor for its bytes when it reaches it and cannot be told of a
    // failure, so a failed read hands it no bytes (which it rejects as the wrong size) and
    // leaves its error here, to be reported instead.
    let failure: Arc<Mutex<Option<anyhow::Error>>> = Arc::default();
    let mut tensors = Vec::new();
    for (name, dtype, shape) in torch.tensors() {
        if name == "__metadata__" {
            bail!("{}: a tensor named `__metadata__` cannot be stored in safetensors", input.display());
        }
        let (torch, failure, key) = (torch.clone(), failure.clone(), name.clone());
        let read = move || match torch.read_bytes(&key) {
            Ok(bytes) => bytes.into(),
            Err(e) => {
                failure.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(e);
                Vec::new().into()
            }
        };
        tensors.push(PendingTensor { name, dtype, shape, source: TensorSource::Host(Box::new(read)) });
    }
    let count = tensors.len();
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let storage = LocalFs;
    let written = write_temp(&storage, output, |w| write_to(w, &metadata, tensors));
    let failed = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
    let (tmp, digest) = match (written, failed) {
        (written, Some(e)) => {
            if let Ok((tmp, _)) = written {
                let _ = storage.remove(&tmp);
            }
            return Err(e.context(format!("cannot convert {}", input.display())));
        }
        (Err(e), None) => return Err(anyhow!(e).context(format!("cannot write {}", output.display()))),
        (Ok(done), None) => done,
    };
    place_new(&storage, &tmp, output)?;
    eprintln!(
        "kiln: converted {count} tensors from {} to {} ({} bytes)",
        input.display(),
        output.display(),
        digest.bytes
    );
    Ok(())
}

/// Gives the finished temporary file `tmp` the name `target` unless that name is taken: a hard
/// link fails rather than replace, where a rename would replace. On a file system without hard
/// links, renames after checking the name is free.
pub(crate) fn place_new(storage: &dyn Storage, tmp: &Path, target: &Path) -> Result<()> {
    let placed = match storage.hard_link(tmp, target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(exists_error(target)),
        Err(_) if target.symlink_metadata().is_err() => {
            storage.rename(tmp, target).with_context(|| format!("cannot create {}", target.display()))
        }
        Err(e) => Err(anyhow!(e).context(format!("cannot create {}", target.display()))),
    };
    // After a link the temporary name is left over; after a rename it is already gone.
    let _ = storage.remove(tmp);
    placed?;
    storage.sync_dir(parent(target)).with_context(|| format!("cannot sync {}", parent(target).display()))
}
