//! Which files hold a directory's weights: the shards a `*.index.json` names (Hugging Face's
//! sharded layout, the same for safetensors and PyTorch files), else the single weights file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::Value;

/// A directory's weight files, by name inside it.
#[derive(Debug)]
pub struct WeightFileNames {
    /// File names, sorted, each once.
    pub files: Vec<String>,
    /// The index they came from, when the weights are sharded.
    pub index: Option<WeightIndex>,
}

/// A sharded checkpoint's index: stored tensor name -> the shard holding it.
#[derive(Debug)]
pub struct WeightIndex {
    path: PathBuf,
    weight_map: BTreeMap<String, String>,
}

/// The files of `dir`'s weights: those `index` names when it exists (the index wins, as in
/// transformers), else `single`, else `None`. Shard names must stay inside the directory.
pub fn weight_files(dir: &Path, single: &str, index: &str) -> Result<Option<WeightFileNames>> {
    let index_path = dir.join(index);
    if index_path.exists() {
        let index = WeightIndex::read(&index_path)?;
        let mut files: Vec<String> = index.weight_map.values().cloned().collect();
        files.sort();
        files.dedup();
        return Ok(Some(WeightFileNames { files, index: Some(index) }));
    }
    if dir.join(single).exists() {
        return Ok(Some(WeightFileNames { files: vec![single.to_string()], index: None }));
    }
    Ok(None)
}

impl WeightIndex {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
        let v: Value = serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
        let map = v["weight_map"].as_object().ok_or_else(|| anyhow!("{}: no `weight_map`", path.display()))?;
        let mut weight_map = BTreeMap::new();
        for (tensor, file) in map {
            let file = file.as_str().ok_or_else(|| anyhow!("{}: weight_map values must be file names", path.display()))?;
            if file.is_empty() || file.contains('/') || file.contains('\\') || file.starts_with('.') {
                bail!("{}: shard name `{file}` points outside the directory", path.display());
            }
            weight_map.insert(tensor.clone(), file.to_owned());
        }
        Ok(Self { path: path.to_owned(), weight_map })
    }

    /// Checks that every tensor the index lists is in the shard it names; `holder` gives the
    /// file name actually holding a stored tensor.
    pub fn check<'a>(&self, holder: impl Fn(&str) -> Option<&'a str>) -> Result<()> {
        for (tensor, shard) in &self.weight_map {
            if holder(tensor) != Some(shard.as_str()) {
                bail!("{}: lists tensor `{tensor}` in {shard}, which does not hold it", self.path.display());
            }
        }
        Ok(())
    }
}
