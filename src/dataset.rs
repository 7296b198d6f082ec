//! A prepared dataset: `manifest.json`, `tokenizer.json` and the token shards the manifest
//! lists, as `kiln prepare` writes them (see `prepare.rs`) and training reads them.
//!
//! A shard is a flat array of little-endian token ids (`u16` for vocabularies up to 65,536,
//! else `u32`), no header: llm.c's and nanoGPT's layout, readable with
//! `np.memmap(path, dtype="<u2")`. Each source's documents are tokenized in order, each followed
//! by the tokenizer's end-of-text id when it has one, and the source's stream is cut into
//! shards of at most [`SHARD_TOKENS`] tokens; a document may continue into the next shard.
//!
//! Opening checks every shard's size and SHA-256 against the manifest before a single token is
//! served, and memory-maps it: what training holds in memory does not grow with the corpus.

use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use memmap2::Mmap;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Split;
use crate::safetensors_io::hex;
use crate::sources::{FileStamp, Skipped};

pub const MANIFEST_FILE: &str = "manifest.json";
pub const TOKENIZER_FILE: &str = "tokenizer.json";
pub const FORMAT_VERSION: u32 = 1;

/// Tokens per shard: 256 MiB of `u16` ids.
pub const SHARD_TOKENS: u64 = 1 << 27;

/// How token ids are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenDtype {
    U16,
    U32,
}

impl TokenDtype {
    /// The narrowest type that holds every id of a vocabulary of `vocab_size` tokens.
    pub fn for_vocab(vocab_size: usize) -> Self {
        if vocab_size <= 1 << 16 { Self::U16 } else { Self::U32 }
    }

    pub fn width(self) -> usize {
        match self {
            Self::U16 => 2,
            Self::U32 => 4,
        }
    }
}

/// `manifest.json`: what was prepared from what. Written last, atomically; a directory
/// without one is not a prepared dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    /// SHA-256 of what the tokens depend on (the sources' files and fields, the tokenizer);
    /// the directory is named by its start.
    pub key: String,
    pub num_tokens: u64,
    pub num_documents: u64,
    /// Follows every document; `None` for a tokenizer without one (kiln's character tokenizer),
    /// whose documents are simply concatenated.
    pub eos_token_id: Option<u32>,
    pub dtype: TokenDtype,
    pub vocab_size: usize,
    pub tokenizer_sha256: String,
    /// Records skipped under `data.skip_bad_records`.
    pub skipped: Skipped,
    pub sources: Vec<SourceEntry>,
    pub shards: Vec<ShardEntry>,
    pub created_at: String,
}

/// One source as prepared.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceEntry {
    /// The path (file, directory or glob) as configured.
    pub path: PathBuf,
    pub text_field: String,
    /// The weight configured when prepared (training uses the config's current weights).
    pub weight: Option<f64>,
    /// `validation` for a source named for evaluation only; absent means `train`.
    #[serde(default, skip_serializing_if = "Split::is_train")]
    pub split: Split,
    /// Every file read, as it was.
    pub files: Vec<FileStamp>,
    pub num_documents: u64,
    pub num_tokens: u64,
    pub skipped: Skipped,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardEntry {
    /// Relative to the manifest's directory.
    pub path: String,
    /// Index into `sources`; a source's shards follow each other in order.
    pub source: usize,
    pub num_tokens: u64,
    pub sha256: String,
}

impl Manifest {
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(MANIFEST_FILE);
        let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let manifest: Manifest = serde_json::from_str(&text).with_context(|| format!("{} is not a kiln dataset manifest", path.display()))?;
        if manifest.format_version != FORMAT_VERSION {
            bail!("{}: format_version {} is not {FORMAT_VERSION}, the one this kiln reads", path.display(), manifest.format_version);
        }
        for (i, shard) in manifest.shards.iter().enumerate() {
            if shard.source >= manifest.sources.len() {
                bail!("{}: shard {i} belongs to source {}, which is not listed", path.display(), shard.source);
            }
            if shard.path.is_empty() || shard.path.contains(['/', '\\']) || shard.path.starts_with('.') {
                bail!("{}: shard path `{}` points outside the directory", path.display(), shard.path);
            }
        }
        Ok(manifest)
    }
}

/// One memory-mapped shard.
struct Shard {
    map: Mmap,
    /// The source-stream position of its first token.
    start: u64,
    num_tokens: u64,
}

/// A source's token stream: its shards one after the other.
pub struct SourceTokens {
    dtype: TokenDtype,
    shards: Vec<Shard>,
    num_tokens: u64,
}

impl SourceTokens {
    pub fn len(&self) -> u64 {
        self.num_tokens
    }

    pub fn is_empty(&self) -> bool {
        self.num_tokens == 0
    }

    /// Tokens `start..start + out.len()` of the stream into `out`, across shards if need be.
    pub fn copy_to(&self, start: u64, out: &mut [u32]) {
        let end = start + out.len() as u64;
        assert!(end <= self.num_tokens, "tokens {start}..{end} past the stream's {}", self.num_tokens);
        // The shard holding `start`: the last one starting at or before it.
        let mut i = self.shards.partition_point(|s| s.start <= start) - 1;
        let (mut pos, mut filled) = (start, 0usize);
        while filled < out.len() {
            let shard = &self.shards[i];
            let from = (pos - shard.start) as usize;
            let n = ((shard.num_tokens as usize) - from).min(out.len() - filled);
            let dst = &mut out[filled..filled + n];
            match self.dtype {
                TokenDtype::U16 => {
                    for (d, b) in dst.iter_mut().zip(shard.map[from * 2..(from + n) * 2].chunks_exact(2)) {
                        *d = u16::from_le_bytes([b[0], b[1]]) as u32;
                    }
                }
                TokenDtype::U32 => {
                    for (d, b) in dst.iter_mut().zip(shard.map[from * 4..(from + n) * 4].chunks_exact(4)) {
                        *d = u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                    }
                }
            }
            filled += n;
            pos += n as u64;
            i += 1;
        }
    }

    /// Tokens `start..end` as a vector.
    pub fn read(&self, start: u64, end: u64) -> Vec<u32> {
        let mut out = vec![0u32; (end - start) as usize];
        self.copy_to(start, &mut out);
        out
    }
}

/// A prepared dataset opened for training: every shard verified and mapped.
pub struct Dataset {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// One per manifest source.
    pub sources: Vec<SourceTokens>,
}

impl Dataset {
    /// Opens the dataset in `dir`, refusing it (naming the shard) if any shard is missing,
    /// truncated or altered, or holds an id outside the vocabulary.
    pub fn open(dir: &Path) -> Result<Self> {
        let manifest = Manifest::read(dir)?;
        let width = manifest.dtype.width() as u64;
        let maps: Vec<Mmap> = manifest
            .shards
            .par_iter()
            .map(|entry| -> Result<Mmap> {
                let path = dir.join(&entry.path);
                let file = File::open(&path).with_context(|| format!("prepared dataset {}: shard {} is missing", dir.display(), path.display()))?;
                let size = file.metadata().with_context(|| format!("cannot read {}", path.display()))?.len();
                if size != entry.num_tokens * width {
                    bail!(
                        "shard {} holds {size} bytes, not the {} its {} tokens take: truncated or altered; \
                         delete {} to prepare it again",
                        path.display(),
                        entry.num_tokens * width,
                        entry.num_tokens,
                        dir.display()
                    );
                }
                verify(&file, entry, &manifest).map_err(|e| match e {
                    Verify::Io(e) => anyhow!(e).context(format!("cannot read {}", path.display())),
                    Verify::Digest => anyhow!(
                        "shard {} does not match its SHA-256 in {}: altered or damaged; delete {} to prepare it again",
                        path.display(),
                        dir.join(MANIFEST_FILE).display(),
                        dir.display()
                    ),
                    Verify::Id(id) => anyhow!("shard {}: token id {id} is outside the vocabulary of {}", path.display(), manifest.vocab_size),
                })?;
                // SAFETY: the map is only read; a shard is never written after its manifest
                // exists, and one changed underneath (after the check above) yields other ids,
                // never memory unsafety for `u8` reads.
                let map = unsafe { Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
                Ok(map)
            })
            .collect::<Result<_>>()?;
        let mut sources: Vec<SourceTokens> =
            manifest.sources.iter().map(|_| SourceTokens { dtype: manifest.dtype, shards: Vec::new(), num_tokens: 0 }).collect();
        for (entry, map) in manifest.shards.iter().zip(maps) {
            let source = &mut sources[entry.source];
            source.shards.push(Shard { map, start: source.num_tokens, num_tokens: entry.num_tokens });
            source.num_tokens += entry.num_tokens;
        }
        for (i, (source, entry)) in sources.iter().zip(&manifest.sources).enumerate() {
            if source.num_tokens != entry.num_tokens {
                bail!("{}: source {i} lists {} tokens but its shards hold {}", dir.join(MANIFEST_FILE).display(), entry.num_tokens, source.num_tokens);
            }
        }
        Ok(Self { dir: dir.to_owned(), manifest, sources })
    }

    /// SHA-256 of the token streams themselves (each source's shard hashes in order): equal for
    /// equal tokens, whichever files, times or directory they came from.
    pub fn content_sha256(&self) -> String {
        let mut sha = Sha256::new();
        for (i, source) in self.manifest.sources.iter().enumerate() {
            sha.update(format!("source {i}: {} tokens\n", source.num_tokens));
            for shard in self.manifest.shards.iter().filter(|s| s.source == i) {
                sha.update(format!("{} {}\n", shard.num_tokens, shard.sha256));
            }
        }
        hex(&sha.finalize())
    }
}

enum Verify {
    Io(std::io::Error),
    Digest,
    Id(usize),
}

/// Checks a shard's SHA-256 and ids with ordinary reads, not through its map: the pages stay
/// in the page cache rather than in the process's resident set, so a run's resident memory
/// does not grow with the corpus when it starts.
fn verify(file: &File, entry: &ShardEntry, manifest: &Manifest) -> std::result::Result<(), Verify> {
    use std::io::Read;
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut reader = file;
    // The size was checked against the manifest: whole ids, `left` bytes of them.
    let mut left = entry.num_tokens as usize * manifest.dtype.width();
    while left > 0 {
        let chunk = &mut buf[..left.min(4 << 20)];
        reader.read_exact(chunk).map_err(Verify::Io)?;
        sha.update(&*chunk);
        if let Some(id) = first_id_outside(chunk, manifest.dtype, manifest.vocab_size) {
            return Err(Verify::Id(id));
        }
        left -= chunk.len();
    }
    if hex(&sha.finalize()) != entry.sha256 { Err(Verify::Digest) } else { Ok(()) }
}

fn first_id_outside(bytes: &[u8], dtype: TokenDtype, vocab_size: usize) -> Option<usize> {
    match dtype {
        TokenDtype::U16 => bytes.chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) as usize).find(|&id| id >= vocab_size),
        TokenDtype::U32 => bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize).find(|&id| id >= vocab_size),
    }
}
