//! `kiln convert IN OUT`: rewrite a weights file in another format. For now a PyTorch
//! checkpoint (`.bin`, `.pt`, `.pth`, read by [`crate::pytorch`], so a hostile pickle is refused
//! and nothing in it runs) to `.safetensors`.
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
        _ => bail!(
            "kiln convert: cannot convert {} to {}; supported: a PyTorch file (.bin, .pt or .pth) to .safetensors",
            input.display(),
            output.display()
        ),
    }
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
fn place_new(storage: &dyn Storage, tmp: &Path, target: &Path) -> Result<()> {
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
